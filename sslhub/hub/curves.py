"""Training curves of a ``sslhub pretrain`` run: its TensorBoard scalars plotted as one PNG for the model card."""

from __future__ import annotations

import io
import os
from pathlib import Path

LOG_DIR = "sslhub"  # the TensorBoard run of `sslhub pretrain`, inside its output directory
EVENTS_GLOB = "events.out.tfevents.*"


def find_log_dir(directory: str | os.PathLike) -> Path | None:
    """The TensorBoard logs of the run that wrote ``directory``: ``OUT/sslhub`` for ``OUT`` and ``OUT/pretraining``."""
    directory = Path(directory)
    candidates = [directory / LOG_DIR] + ([directory.parent / LOG_DIR] if directory.name == "pretraining" else [])
    return next((path for path in candidates if any(path.rglob(EVENTS_GLOB))), None)


def training_curves_png(log_dir: str | os.PathLike) -> bytes | None:
    """Every scalar in the TensorBoard event files under ``log_dir`` (loss, learning rate, kNN monitor) against the
    optimizer step, one panel per tag, as a PNG (matplotlib, Agg canvas); ``None`` when nothing was logged."""
    from matplotlib.figure import Figure
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for run in sorted({path.parent for path in Path(log_dir).rglob(EVENTS_GLOB)}):
        accumulator = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            series.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    if not series:
        return None
    columns = min(3, len(series))
    rows = -(-len(series) // columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), dpi=100, layout="constrained")  # no pyplot: no global state
    panels = figure.subplots(rows, columns, squeeze=False).flat
    for axes, (tag, points) in zip(panels, sorted(series.items()), strict=False):  # the last row may have spare panels
        steps, values = zip(*sorted(points), strict=True)
        axes.plot(steps, values, marker="." if len(steps) <= 50 else None)
        axes.set(title=tag, xlabel="step")
        axes.ticklabel_format(axis="y", useOffset=False)  # plain values: a learning rate is read as such
    for axes in figure.axes[len(series) :]:
        axes.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
