"""``SSLConfig``: one Hugging Face config for every sslhub model (DESIGN.md §2)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import PretrainedConfig
from transformers.utils import CONFIG_NAME

from sslhub.backbones import POOLINGS
from sslhub.registry import get_method, get_preset


class SSLConfig(PretrainedConfig):
    """Method, timm backbone and the method's hyperparameters.

    ``method_kwargs`` is validated and completed by the method's hyperparameter dataclass, so a saved
    ``config.json`` lists every hyperparameter the model was built with.
    """

    model_type = "sslhub"
    # What ``from_pretrained(..., KEY=VALUE)`` applies to a loaded config, as transformers applies config attributes.
    load_overrides = ("num_labels", "id2label", "label2id", "image_size", "image_mean", "image_std", "pooling")

    method: str | None = None  # a registered method id; None only in transformers' default-valued instance
    backbone: str = "resnet50"
    backbone_kwargs: dict | None = None
    pooling: str | None = None
    image_size: int = 224
    image_mean: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    image_std: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_STD
    method_kwargs: dict | None = None
    preset: str | None = None

    def __post_init__(self, **kwargs):
        _check_fields(self)
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        if self.method is not None:
            self.method_kwargs = get_method(self.method).validate_hparams(self.method_kwargs or {})
        super().__post_init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> SSLConfig:
        """transformers' ``from_pretrained``; a value the checks refuse (``_check_fields``, the method's
        hyperparameters) is a ``ValueError`` naming the ``config.json`` it was read from."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ValueError as err:
            raise ValueError(f"{Path(pretrained_model_name_or_path) / CONFIG_NAME}: {err}") from err

    @classmethod
    def from_preset(cls, name: str, **overrides) -> SSLConfig:
        """Config of the preset ``name``; ``overrides`` replace config fields or method hyperparameters.

        ``create_model("moco_v2_resnet18", temperature=0.1, image_size=64)``: ``temperature`` is a MoCo
        hyperparameter, ``image_size`` a config field; ``backbone_kwargs`` entries are merged.
        """
        preset = get_preset(name)
        fields = {
            "method": preset.method,
            "backbone": preset.backbone,
            "image_size": preset.image_size,
            "backbone_kwargs": dict(preset.backbone_kwargs),
            "method_kwargs": dict(preset.method_kwargs),
            "preset": preset.name,
        }
        for name in ("image_mean", "image_std"):
            if getattr(preset, name) is not None:
                fields[name] = list(getattr(preset, name))
        return cls(**_merged(fields, overrides))

    def with_overrides(self, **overrides) -> SSLConfig:
        """A copy with config fields or method hyperparameters replaced, validated like ``from_preset``."""
        fields = self.to_dict()
        fields.pop("model_type", None)
        if "num_labels" in overrides and "id2label" not in overrides:  # new labels, named as transformers names them
            fields.pop("id2label", None), fields.pop("label2id", None)
        if "id2label" in overrides and "label2id" not in overrides:
            overrides = {**overrides, "label2id": {label: int(i) for i, label in overrides["id2label"].items()}}
        return type(self)(**_merged(fields, overrides))


def _check_fields(config: SSLConfig) -> None:
    """The config fields a ``config.json`` or an override can get wrong: a positive integer ``image_size``, a known
    ``pooling`` (or None), three finite ``image_mean`` values and three positive ``image_std`` values, dicts of
    keyword arguments, a backbone name; a ``ValueError`` naming the key otherwise."""
    if isinstance(config.image_size, bool) or not isinstance(config.image_size, int) or config.image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels), got {config.image_size!r}")
    if config.pooling is not None and config.pooling not in POOLINGS:
        raise ValueError(f"pooling {config.pooling!r}: expected one of {POOLINGS} or None")
    if not isinstance(config.backbone, str) or not config.backbone:
        raise ValueError(f"backbone must be a timm model name, got {config.backbone!r}")
    for name in ("backbone_kwargs", "method_kwargs"):
        if not isinstance(getattr(config, name), dict | None):
            raise ValueError(f"{name} must be a dict of keyword arguments, got {getattr(config, name)!r}")
    for name, low in (("image_mean", -math.inf), ("image_std", 0.0)):
        values = getattr(config, name)
        numbers = isinstance(values, list | tuple) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > low for v in values
        )
        if not numbers or len(values) != 3:
            kind = "positive" if low == 0 else "finite"
            raise ValueError(f"{name} must be 3 {kind} numbers (one per RGB channel), got {values!r}")


def _merged(fields: dict, overrides: dict) -> dict:
    """``fields`` with ``overrides`` applied: method hyperparameters go into ``method_kwargs``, ``backbone_kwargs`` and
    ``method_kwargs`` entries are merged, anything else must be a config field."""
    fields = {
        **fields,
        "backbone_kwargs": dict(fields.get("backbone_kwargs") or {}),
        "method_kwargs": dict(fields.get("method_kwargs") or {}),
    }
    method = overrides.get("method", fields["method"])
    hparam_names = get_method(method).hparam_names()
    config_names = {f.name for f in dataclasses.fields(SSLConfig)} | {"num_labels"}
    unknown = set(overrides) - hparam_names - config_names
    if unknown:
        raise ValueError(
            f"Unknown hyperparameter(s) {sorted(unknown)}: neither a hyperparameter of method {method!r} "
            f"({sorted(hparam_names)}) nor a config field ({sorted(config_names)})"
        )
    for key, value in overrides.items():
        if key in ("backbone_kwargs", "method_kwargs"):
            fields[key].update(value)
        elif key in hparam_names:
            fields["method_kwargs"][key] = value
        else:
            fields[key] = value
    return fields
