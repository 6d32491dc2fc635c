"""Classification results: top-1 / top-5, per-class accuracy, confusion matrix, saved as JSON + PNG and written into
a checkpoint's model card as Hub ``model-index`` entries (huggingface_hub ``EvalResult``)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from sklearn.metrics import confusion_matrix

from sslhub.files import write_atomically
from sslhub.hub.cards import accuracy_result, save_model_card, with_section

RESULTS_START = "<!-- sslhub eval results: start -->"
RESULTS_END = "<!-- sslhub eval results: end -->"


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy of class scores ``logits`` (N, C) against ``labels`` (N,): ``top1``, ``top5`` (top-min(5, C)) as
    fractions, ``per_class_accuracy`` (recall of each class present in ``labels``), ``confusion_matrix`` (rows =
    true class, columns = predicted class) and ``num_samples``. Top-1 ties go to the lowest class index."""
    if logits.ndim != 2 or logits.shape[1] != len(class_names):
        raise ValueError(f"logits must be (N, {len(class_names)}) for {len(class_names)} classes, got {logits.shape}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0] or labels.numel() == 0:
        raise ValueError(f"need one label per row of logits and at least one; got {labels.shape} for {logits.shape}")
    labels = labels.cpu().long()
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must be in [0, {len(class_names)}), got [{labels.min()}, {labels.max()}]")
    logits = logits.detach().cpu().float()
    predictions = logits.argmax(dim=1)
    top_k = logits.topk(min(5, len(class_names)), dim=1).indices
    matrix = confusion_matrix(labels.numpy(), predictions.numpy(), labels=range(len(class_names)))
    per_class = {
        name: float(matrix[index, index] / matrix[index].sum())
        for index, name in enumerate(class_names)
        if matrix[index].sum() > 0
    }
    return {
        "top1": (predictions == labels).double().mean().item(),
        "top5": (top_k == labels[:, None]).any(dim=1).double().mean().item(),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "num_samples": int(labels.numel()),
    }


def confusion_matrix_png(matrix: list[list[int]], class_names: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG (matplotlib, Agg backend): counts, rows = true class; the figure grows with the
    number of classes and cells are annotated up to 30 classes."""
    from matplotlib.figure import Figure

    size = min(max(4.0, 2.5 + 0.35 * len(class_names)), 24.0)
    figure = Figure(figsize=(size, size), dpi=100, layout="constrained")  # no pyplot: no global state, Agg canvas
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=90)
    axes.set_yticks(ticks, class_names)
    axes.set(xlabel="predicted class", ylabel="true class", title=title)
    if len(class_names) <= 30:
        top = max(max(row) for row in matrix)
        for row, counts in enumerate(matrix):
            for column, count in enumerate(counts):
                color = "white" if count > top / 2 else "black"
                axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save_report(report: dict, output_dir: str | os.PathLike, title: str) -> dict[str, Path]:
    """Write ``report`` (a :func:`classification_report`, possibly with settings added) to ``output_dir`` as
    ``metrics.json`` and its confusion matrix, titled ``title`` and labelled with ``report["class_names"]`` when
    present, as ``confusion_matrix.png``; both atomically. Returns ``{"metrics": path, "confusion_matrix": path}``."""
    output_dir = Path(output_dir)
    class_names = report.get("class_names") or [str(index) for index in range(len(report["confusion_matrix"]))]
    text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    return {
        "metrics": write_atomically(output_dir / "metrics.json", text.encode()),
        "confusion_matrix": write_atomically(
            output_dir / "confusion_matrix.png", confusion_matrix_png(report["confusion_matrix"], class_names, title)
        ),
    }


def _minimal_card(model_dir: Path) -> ModelCard:
    data = ModelCardData(library_name="sslhub", tags=["self-supervised"])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {model_dir.resolve().name}\n")


def _results_section(results: list[EvalResult]) -> str:
    rows = "\n".join(f"| {r.metric_name} | {r.dataset_name} | {100 * r.metric_value:.2f}% |" for r in results)
    return (
        "## Downstream evaluation\n\nThe accuracies in this card's metadata (`model-index`); "
        "`sslhub eval knn | linear` and `sslhub finetune` add and update them.\n\n"
        f"| Metric | Dataset | Accuracy |\n| --- | --- | --- |\n{rows}"
    )


def add_results_to_model_card(
    model_dir: str | os.PathLike, results: dict[str, float], dataset_name: str, dataset_type: str | None = None
) -> Path:
    """Add or replace ``model-index`` entries (task image-classification, metric accuracy, values as fractions) in
    ``model_dir/README.md``, one per ``results`` item, keyed by metric name and dataset; other entries and metadata
    stay. A card without them gets a table of all downstream results in its body. Without a README a minimal card is
    created. ``dataset_type`` is the Hub dataset id when there is one (default: ``dataset_name``)."""
    model_dir = Path(model_dir)
    path = model_dir / "README.md"
    card = ModelCard.load(path) if path.is_file() else _minimal_card(model_dir)
    new = [accuracy_result(metric, value, dataset_name, dataset_type) for metric, value in results.items()]
    replaced = {(result.metric_name, result.dataset_name) for result in new}
    kept = [r for r in card.data.eval_results or [] if (r.metric_name, r.dataset_name) not in replaced]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or model_dir.resolve().name
    card.text = with_section(card.text, RESULTS_START, RESULTS_END, _results_section(card.data.eval_results))
    return save_model_card(card, model_dir)
