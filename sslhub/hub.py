"""Model cards: Hub metadata (``ModelCardData`` + ``model-index``) and a README body rendered from the
package template ``sslhub/templates/modelcard.md`` with ``huggingface_hub.ModelCard.from_template``."""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = "templates/modelcard.md"
CARD_TASKS = ("features", "pretraining")

# ``--data`` values of sslhub.data that are not paths: (display name, Hub dataset id or None).
_NAMED_DATA = {
    "builtin": ("scikit-learn digits (builtin)", None),
    "fashion-mnist": ("Fashion-MNIST", "zalando-datasets/fashion_mnist"),
}


def _describe_data(data: str) -> tuple[str, str | None]:
    """(display name, Hub dataset id) of a training ``data`` value; a local path shows only its last component."""
    if data in _NAMED_DATA:
        return _NAMED_DATA[data]
    if os.path.isabs(data) or os.path.exists(data):
        return f"{Path(data).name or data} (local data)", None
    return data, data


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _accuracy(name: str, value: Any) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"result {name!r} = {value} is not an accuracy in [0, 1] (give fractions, not percent)")
    return value


def render_model_card(
    *,
    method: str,
    backbone: str,
    task: str,
    num_parameters: int,
    method_info: dict[str, str],
    training: dict[str, Any] | None = None,
    results: dict[str, float] | None = None,
    model_id: str | None = None,
    license: str = "apache-2.0",
    source: str | None = None,
    pretrained_name: str | None = None,
) -> ModelCard:
    """The model card (README.md) of an sslhub checkpoint.

    ``task``: ``"features"`` (released encoder) or ``"pretraining"`` (full objective state).
    ``method_info``: ``paper`` (title), ``arxiv`` (id), ``citation`` (BibTeX), ``released_encoder`` (text).
    ``training``: flat dict of pretraining hyperparameters; ``training["data"]`` names the data (a local path is
    shown by its last component only). ``results``: metric name -> top-1 accuracy in [0, 1] (e.g.
    ``{"kNN top-1 (k=20)": 0.91}``; ``None`` values are skipped), written to the body and to ``model-index``.
    ``source``: where converted weights come from (the authors' release), shown under "Pretraining";
    ``pretrained_name``: the ``"preset.tag"`` that ``sslhub.create_model(..., pretrained=True)`` loads.
    """
    if task not in CARD_TASKS:
        raise ValueError(f"task must be one of {CARD_TASKS}, got {task!r}")
    hyperparameters = dict(training or {})
    data = hyperparameters.pop("data", None)
    data_name, dataset_id = _describe_data(str(data)) if data is not None else (None, None)
    name = model_id or f"{method}_{backbone}"
    results = {metric: _accuracy(metric, value) for metric, value in (results or {}).items() if value is not None}
    if results and data_name is None:
        raise ValueError('results need training["data"] to name the dataset they were measured on')
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or data_name,
            dataset_name=data_name,
            metric_type="accuracy",
            metric_name=metric,
            metric_value=value,
        )
        for metric, value in results.items()
    ]
    card_data = ModelCardData(
        library_name="sslhub",
        pipeline_tag="image-feature-extraction",
        tags=["self-supervised", method, backbone],
        license=license,
        datasets=[dataset_id] if dataset_id else None,
        eval_results=eval_results or None,
        model_name=name if eval_results else None,
    )
    template = resources.files("sslhub").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=name,
        repo=model_id or "path/to/this/model",
        task=task,
        method=method,
        backbone=backbone,
        num_parameters=f"{num_parameters / 1e6:.1f}M ({num_parameters:,})",
        paper=method_info.get("paper"),
        arxiv=method_info.get("arxiv"),
        citation=(method_info.get("citation") or "").strip(),
        released_encoder=method_info.get("released_encoder"),
        data_name=data_name,
        source=source,
        pretrained_name=pretrained_name,
        hyperparameters=[(_cell(key), _cell(value)) for key, value in hyperparameters.items()],
        results=[(_cell(metric), f"{100 * value:.2f}%") for metric, value in results.items()],
    )


def save_model_card(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write ``card`` to ``directory/README.md`` atomically (temporary file in the same directory + os.replace)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "README.md"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".README.md.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0o600; a README is meant to be read
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(str(card))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
