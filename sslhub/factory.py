"""The one-line entry points: ``create_model``, ``from_pretrained`` and ``to_timm``."""

from __future__ import annotations

import os

from torch import nn

from sslhub.configuration import SSLConfig
from sslhub.conversion.pretrained import load_pretrained
from sslhub.hub.download import HUB_KWARGS, resolve_checkpoint
from sslhub.image_processing import timm_pretrained_cfg
from sslhub.modeling import (
    TASKS,
    SSLForImageClassification,
    SSLForPreTraining,
    SSLModel,
    SSLPreTrainedModel,
    model_class,
)
from sslhub.registry import get_method, get_pretrained


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
    A new pretraining model loads its method's frozen auxiliary networks (``SSLMethod.load_auxiliary_weights``).
    """
    cls = model_class(task)
    if pretrained:
        return load_pretrained(name, task, pretrained_path, **overrides)
    if pretrained_path is not None:
        raise ValueError("pretrained_path is only used with pretrained=True")
    preset, _, tag = name.partition(".")
    if tag:
        overrides = {**get_pretrained(name).overrides, **overrides}
    model = cls(SSLConfig.from_preset(preset, **overrides))
    if isinstance(model, SSLForPreTraining):
        model.method.load_auxiliary_weights()
    return model


def from_pretrained(name_or_path: str | os.PathLike, task: str | None = None, **kwargs) -> SSLPreTrainedModel:
    """Load an sslhub checkpoint (local directory or Hub repo id) as the class it was saved from, or as ``task``
    (a pretraining checkpoint loads as ``"features"`` or ``"classification"`` through its released encoder).

    A Hub repo comes through huggingface_hub (its cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``; ``revision``, ``token``,
    ``cache_dir``, ``force_download`` and ``local_files_only`` go there): config and safetensors only, no remote code.
    What cannot be loaded raises ``sslhub.hub.HubError`` with one sentence (``sslhub.hub.resolve_checkpoint``).
    """
    path = resolve_checkpoint(name_or_path, **{key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs})
    if task is None:
        config = SSLConfig.from_pretrained(path)
        saved = (config.architectures or ["SSLModel"])[0]
        cls = {cls.__name__: cls for cls in TASKS.values()}.get(saved, SSLModel)
    else:
        cls = model_class(task)
    return cls.from_pretrained(path, use_safetensors=True, **kwargs)


def create_transform(model: nn.Module):
    """The evaluation pre-processing of an sslhub model (``SSLModel``, ``SSLForImageClassification``,
    ``SSLForPreTraining``): RGB PIL image -> the tensor its encoder takes, as the model's method declares it
    (resize, centre crop, normalisation; CMC: conversion to normalised L*a*b*). The counterpart of timm's
    ``create_transform(**resolve_data_config(model=model))``."""
    config = getattr(model, "config", None)
    if not isinstance(config, SSLConfig):
        raise TypeError(f"create_transform expects an sslhub model, got {type(model).__name__}")
    return get_method(config.method).eval_transform(config)


def to_timm(model: nn.Module) -> nn.Module:
    """The plain timm model inside an sslhub model's released encoder (its state dict loads into
    ``timm.create_model``), its ``pretrained_cfg`` set to the sslhub model's input size and evaluation pre-processing
    (``sslhub.image_processing.timm_pretrained_cfg``); ``TypeError`` when the method's encoder is not a single timm
    model."""
    if isinstance(model, SSLModel):
        encoder = model.encoder
    elif isinstance(model, SSLForImageClassification):
        encoder = model.ssl.encoder
    elif isinstance(model, SSLForPreTraining):
        encoder = model.method.released_encoder
    else:
        raise TypeError(f"to_timm expects an sslhub model, got {type(model).__name__}")
    if encoder.timm_model is None:
        raise TypeError(
            f"the {model.config.method} encoder ({type(encoder).__name__}) is not a single timm model; "
            "use the sslhub model itself"
        )
    timm_model = encoder.timm_model
    timm_model.pretrained_cfg = timm_model.default_cfg = timm_pretrained_cfg(model.config, timm_model)
    return timm_model
