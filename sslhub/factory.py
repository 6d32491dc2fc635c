"""The one-line entry points: ``create_model``, ``from_pretrained`` and ``to_timm``."""

from __future__ import annotations

import os

from torch import nn

from sslhub.configuration import SSLConfig
from sslhub.hub import HUB_KWARGS, resolve_checkpoint
from sslhub.modeling import SSLForImageClassification, SSLForPreTraining, SSLModel, SSLPreTrainedModel
from sslhub.registry import get_pretrained

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
    name: str,
    task: str = "features",
    pretrained: bool = False,
    pretrained_path: str | os.PathLike | None = None,
    **overrides,
) -> SSLPreTrainedModel:
    """A preset (``sslhub.list_models()``), randomly initialised, or with ``pretrained=True`` a released
    ``"preset.tag"`` (``sslhub.list_pretrained()``) with the authors' weights, converted on first use and cached.

    ``task``: ``"features"`` (``SSLModel``, the released encoder), ``"pretraining"`` (``SSLForPreTraining``) or
    ``"classification"`` (``SSLForImageClassification``, pass ``num_labels``). ``overrides`` replace config fields
    or method hyperparameters, e.g. ``create_model("moco_v2_resnet18", task="pretraining", queue_size=4096)``.
    ``pretrained_path``: the release's file (or Hugging Face directory) already on disk, for offline use.
    """
    model_class = _model_class(task)
    if pretrained:
        from sslhub.conversion.pretrained import load_pretrained

        return load_pretrained(name, task, pretrained_path, **overrides)
    if pretrained_path is not None:
        raise ValueError("pretrained_path is only used with pretrained=True")
    preset, _, tag = name.partition(".")
    if tag:
        overrides = {**get_pretrained(name).overrides, **overrides}
    return model_class(SSLConfig.from_preset(preset, **overrides))


def from_pretrained(name_or_path: str | os.PathLike, task: str | None = None, **kwargs) -> SSLPreTrainedModel:
    """Load an sslhub checkpoint (local directory or Hub repo id) as the class it was saved from, or as ``task``.

    A Hub repo comes through huggingface_hub (its cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``; ``revision``, ``token``,
    ``cache_dir``, ``force_download`` and ``local_files_only`` go there): config and safetensors only, no remote code.
    What cannot be loaded raises ``sslhub.hub.HubError`` with one sentence (``sslhub.hub.resolve_checkpoint``).
    """
    path = resolve_checkpoint(name_or_path, **{key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs})
    if task is None:
        config = SSLConfig.from_pretrained(path)
        saved = (config.architectures or ["SSLModel"])[0]
        model_class = {cls.__name__: cls for cls in TASKS.values()}.get(saved, SSLModel)
    else:
        model_class = _model_class(task)
    return model_class.from_pretrained(path, use_safetensors=True, **kwargs)


def to_timm(model: nn.Module) -> nn.Module:
    """The plain timm backbone inside an sslhub model (its state dict loads into ``timm.create_model``)."""
    if isinstance(model, SSLModel):
        return model.backbone
    if isinstance(model, SSLForImageClassification):
        return model.ssl.backbone
    if isinstance(model, SSLForPreTraining):
        return model.method.released_backbone
    raise TypeError(f"to_timm expects an sslhub model, got {type(model).__name__}")
