"""The one-line entry points: ``create_model``, ``from_pretrained`` and ``to_timm``."""

from __future__ import annotations

import os

from torch import nn

from sslhub.configuration import SSLConfig
from sslhub.modeling import SSLForImageClassification, SSLForPreTraining, SSLModel, SSLPreTrainedModel

TASKS: dict[str, type[SSLPreTrainedModel]] = {
    "features": SSLModel,
    "pretraining": SSLForPreTraining,
    "classification": SSLForImageClassification,
}


def _model_class(task: str) -> type[SSLPreTrainedModel]:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task]


def create_model(
    name: str, task: str = "features", pretrained: bool = False, **overrides
) -> SSLPreTrainedModel:
    """A preset (``sslhub.list_models()``) as a randomly initialised model.

    ``task``: ``"features"`` (``SSLModel``, the released encoder), ``"pretraining"`` (``SSLForPreTraining``) or
    ``"classification"`` (``SSLForImageClassification``, pass ``num_labels``). ``overrides`` replace config fields
    or method hyperparameters, e.g. ``create_model("moco_v2_resnet18", task="pretraining", queue_size=4096)``.
    """
    model_class = _model_class(task)
    preset, _, tag = name.partition(".")
    if pretrained or tag:
        raise ValueError(
            f"No pretrained weights are registered for {name!r}: this release of sslhub ships architectures "
            "only. Load your own checkpoint with sslhub.from_pretrained(DIR)."
        )
    return model_class(SSLConfig.from_preset(preset, **overrides))


def from_pretrained(name_or_path: str | os.PathLike, task: str | None = None, **kwargs) -> SSLPreTrainedModel:
    """Load an sslhub checkpoint (local directory or Hub repo id) as the class it was saved from, or as ``task``."""
    if task is None:
        config = SSLConfig.from_pretrained(
            name_or_path, **{k: v for k, v in kwargs.items() if k == "revision"}
        )
        saved = (config.architectures or ["SSLModel"])[0]
        model_class = {cls.__name__: cls for cls in TASKS.values()}.get(saved, SSLModel)
    else:
        model_class = _model_class(task)
    return model_class.from_pretrained(name_or_path, **kwargs)


def to_timm(model: nn.Module) -> nn.Module:
    """The plain timm backbone inside an sslhub model (its state dict loads into ``timm.create_model``)."""
    if isinstance(model, SSLModel):
        return model.backbone
    if isinstance(model, SSLForImageClassification):
        return model.ssl.backbone
    if isinstance(model, SSLForPreTraining):
        return model.method.released_backbone
    raise TypeError(f"to_timm expects an sslhub model, got {type(model).__name__}")
