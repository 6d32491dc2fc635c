"""Model cards of sslhub checkpoints: Hub metadata (``ModelCardData`` + ``model-index``) and a README body rendered
from the package template ``sslhub/templates/modelcard.md`` with ``huggingface_hub.ModelCard.from_template``."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sslhub.files import write_atomically
from sslhub.hub.checkpoints import CARD_NAME

TEMPLATE = "templates/modelcard.md"
CARD_TASKS = ("features", "pretraining", "classification")
PLACEHOLDER_REPO = "path/to/this/model"  # the card's usage snippet until the model has a repo id


# ``--data`` values of sslhub.data that are not paths: (display name, Hub dataset id or None).
_NAMED_DATA = {
    "builtin": ("scikit-learn digits (builtin)", None),
    "fashion-mnist": ("Fashion-MNIST", "zalando-datasets/fashion_mnist"),
    "lvd-142m": ("LVD-142M (DINOv2's curated data, not public)", None),
}


def describe_data(data: str) -> tuple[str, str | None]:
    """(display name, Hub dataset id) of a training ``data`` value; a local path shows only its last component."""
    if data in _NAMED_DATA:
        return _NAMED_DATA[data]
    if os.path.isabs(data) or os.path.exists(data):
        return f"{Path(data).name or data} (local data)", None
    return data, data


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def accuracy_fraction(name: str, value: Any) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"result {name!r} = {value} is not an accuracy in [0, 1] (give fractions, not percent)")
    return value


def _accuracies(metrics: dict[str, float] | None) -> dict[str, float]:
    """``metrics`` as accuracy fractions in [0, 1] (``accuracy_fraction``), without the ``None`` values."""
    return {metric: accuracy_fraction(metric, value) for metric, value in (metrics or {}).items() if value is not None}


def _table_rows(accuracies: dict[str, float]) -> list[tuple[str, str]]:
    """(metric, percentage) rows of the card's tables."""
    return [(_cell(metric), f"{100 * value:.2f}%") for metric, value in accuracies.items()]


def accuracy_result(metric: str, value: float, dataset_name: str, dataset_id: str | None = None) -> EvalResult:
    """One ``model-index`` entry: image-classification accuracy ``value`` (a fraction) of ``metric`` on a dataset
    (``dataset_id``: its Hub id when there is one)."""
    return EvalResult(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=dataset_id or dataset_name,
        dataset_name=dataset_name,
        metric_type="accuracy",
        metric_name=metric,
        metric_value=accuracy_fraction(metric, value),
    )


def render_model_card(
    *,
    method: str,
    backbone: str,
    task: str,
    num_parameters: int,
    method_info: dict[str, str],
    training: dict[str, Any] | None = None,
    results: dict[str, float] | None = None,
    baselines: dict[str, float] | None = None,
    model_id: str | None = None,
    license: str = "apache-2.0",
    source: str | None = None,
    pretrained_name: str | None = None,
    eval_data: str | None = None,
    architecture_note: str = "",
    single_timm_model: bool = True,
    backbone_kwargs: dict[str, Any] | None = None,
) -> ModelCard:
    """The model card (README.md) of an sslhub checkpoint.

    ``task``: ``"features"`` (released encoder), ``"pretraining"`` (full objective state) or ``"classification"``
    (a fine-tuned classifier: ``training`` is then the fine-tuning recipe).
    ``method_info``: ``paper`` (title), ``arxiv`` (id), ``citation`` (BibTeX), ``released_encoder`` (text).
    ``training``: flat dict of pretraining hyperparameters; ``training["data"]`` names the data (a local path is
    shown by its last component only). ``results``: metric name -> top-1 accuracy in [0, 1] (e.g.
    ``{"kNN top-1 (k=20)": 0.91}``; ``None`` values are skipped), written to the body and to ``model-index``;
    ``baselines``: the same for references that are not this model's scores (the backbone at random initialisation),
    written to the body only.
    ``source``: where converted weights come from (the authors' release), shown under "Pretraining";
    ``pretrained_name``: the ``"preset.tag"`` that ``sslhub.create_model(..., pretrained=True)`` loads;
    ``eval_data``: the data ``results`` were measured on when it is not the training data (DINOv2: LVD-142M /
    ImageNet); ``architecture_note``: what the encoder has beyond its timm backbone (``Encoder.architecture_note``);
    ``single_timm_model``: whether the encoder is one timm model (``sslhub.to_timm`` returns it), not CMC's two;
    ``backbone_kwargs``: the timm arguments the backbone is built with (SimMIM's shared relative position bias).
    """
    if task not in CARD_TASKS:
        raise ValueError(f"task must be one of {CARD_TASKS}, got {task!r}")
    hyperparameters = dict(training or {})
    data = hyperparameters.pop("data", None)
    data_name, dataset_id = describe_data(str(data)) if data is not None else (None, None)
    name = model_id or f"{method}_{backbone}"
    results, baselines = _accuracies(results), _accuracies(baselines)
    eval_name, eval_id = describe_data(eval_data) if eval_data is not None else (data_name, dataset_id)
    if results and eval_name is None:
        raise ValueError('results need training["data"] (or eval_data) to name the dataset they were measured on')
    eval_results = [accuracy_result(metric, value, eval_name, eval_id) for metric, value in results.items()]
    card_data = ModelCardData(
        library_name="sslhub",
        pipeline_tag="image-classification" if task == "classification" else "image-feature-extraction",
        tags=["self-supervised", method, backbone],
        license=license,
        datasets=sorted({id_ for id_ in (dataset_id, eval_id) if id_}) or None,
        eval_results=eval_results or None,
        model_name=name if eval_results else None,
    )
    template = resources.files("sslhub").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=name,
        repo=model_id or PLACEHOLDER_REPO,
        task=task,
        method=method,
        backbone=backbone,
        timm_call=f'timm.create_model("{backbone}", num_classes=0, global_pool=""'
        + "".join(f", {key}={value!r}" for key, value in (backbone_kwargs or {}).items())
        + ")",
        num_parameters=f"{num_parameters / 1e6:.1f}M ({num_parameters:,})",
        paper=method_info.get("paper"),
        arxiv=method_info.get("arxiv"),
        citation=(method_info.get("citation") or "").strip(),
        released_encoder=method_info.get("released_encoder"),
        architecture_note=architecture_note,
        single_timm_model=single_timm_model,
        data_name=data_name,
        eval_data_name=eval_name,
        source=source,
        pretrained_name=pretrained_name,
        hyperparameters=[(_cell(key), _cell(value)) for key, value in hyperparameters.items()],
        results=_table_rows(results),
        baselines=_table_rows(baselines),
    )


def save_model_card(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write ``card`` to ``directory/README.md`` atomically."""
    return write_atomically(Path(directory) / CARD_NAME, str(card))


def with_section(text: str, start: str, end: str, section: str) -> str:
    """``text`` with the part between the markers ``start`` and ``end`` replaced by ``section``, or it appended."""
    before, found, rest = text.partition(start)
    after = rest.partition(end)[2] if found else ""
    return f"{before.rstrip()}\n\n{start}\n{section}\n{end}\n{after.lstrip()}"
