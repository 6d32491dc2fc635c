"""Method registry: methods, presets (method x timm backbone x defaults), pretrained tags and the checkpoint layouts the
methods declare (DESIGN.md §2-3, §5). Methods register themselves when their module is imported; ``sslhub`` imports
its own methods and those of installed plugins (``sslhub.methods`` entry points), ``--method-module`` any other."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sslhub.conversion.keys import CheckpointLayout
    from sslhub.methods.base import SSLMethod

_METHODS: dict[str, type[SSLMethod]] = {}
_PRESETS: dict[str, Preset] = {}
_PRETRAINED: dict[str, PretrainedTag] = {}


@dataclass(frozen=True)
class Preset:
    """A named model: one method on one timm backbone, with the options that make it that model. ``image_mean`` /
    ``image_std``: the input normalisation of the method's recipe when it is not ImageNet's (SwAV's std 0.228,
    SimCLR's unnormalised [0, 1] input)."""

    name: str
    method: str
    backbone: str
    image_size: int = 224
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class PretrainedTag:
    """Released weights of a preset, as the authors publish them: ``{preset}.{tag}``.

    ``url``: the authors' download of the released encoder; ``full_url``: their full training checkpoint (heads,
    teacher, queue), used for ``task="pretraining"`` when it exists; ``hf_hub_id`` / ``hf_filename``: a Hub copy
    in plain timm format (safetensors) when one exists, preferred for the encoder; ``layout``: the converter that
    reads the authors' file (``sslhub.conversion.layouts``); ``metrics``: the authors' published ImageNet top-1
    accuracies in percent, e.g. ``{"linear": 77.0, "knn": 74.5}``; ``epochs``: pretraining epochs (``None``
    where the authors' README does not state them); ``license``: SPDX id of the weights' licence; ``source``:
    where the facts come from; ``dataset``: what ``metrics`` were measured on, also the pretraining data unless
    ``pretraining_data`` says otherwise; ``overrides``: config fields that differ from the preset (input size,
    mean / std); ``converted_file`` / ``conversion``: for a release the authors publish only in another framework
    (TensorFlow, JAX), the name of the PyTorch conversion sslhub reads and how to make it (nothing is downloaded);
    ``download_name``: the name sslhub keeps the authors' file under (cache, ``$SSLHUB_PRETRAINED_DIR``, the zoo
    script's input folder) when another release publishes a file of the same name.
    """

    preset: str
    tag: str
    url: str
    layout: str
    license: str
    epochs: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    full_url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str = "model.safetensors"
    dataset: str = "imagenet-1k"
    pretraining_data: str | None = None
    source: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    converted_file: str | None = None
    conversion: str = ""
    download_name: str | None = None

    @property
    def name(self) -> str:
        return f"{self.preset}.{self.tag}"

    @property
    def file_name(self) -> str:
        """The file sslhub converts: the authors' download (under ``download_name`` where several releases publish
        files of one name, SimSiam's ``checkpoint_0099.pth.tar``), or the PyTorch conversion of it."""
        return self.converted_file or self.download_name or self.url.rsplit("/", 1)[-1]


def register_method(name: str) -> Callable[[type[SSLMethod]], type[SSLMethod]]:
    """Class decorator: make an ``SSLMethod`` available under ``name`` (the paper's id, e.g. ``moco_v2``)."""

    def decorator(cls: type[SSLMethod]) -> type[SSLMethod]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def register_preset(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    _PRESETS[preset.name] = preset
    return preset


def register_pretrained(tag: PretrainedTag) -> PretrainedTag:
    if tag.name in _PRETRAINED:
        raise ValueError(f"pretrained tag {tag.name!r} is registered twice")
    _PRETRAINED[tag.name] = tag
    return tag


def get_method(name: str) -> type[SSLMethod]:
    if name not in _METHODS:
        raise ValueError(
            f"Unknown method {name!r}. Available methods: {sorted(_METHODS)}; a method defined outside sslhub is "
            "registered by importing its module (`sslhub pretrain --method-module MODULE`, or an `sslhub.methods` "
            "entry point)"
        )
    return _METHODS[name]


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        close = [p for p in _PRESETS if p.split("_")[0] == name.split("_")[0]]
        hint = f" Presets of that method: {sorted(close)}" if close else ""
        raise ValueError(f"Unknown model {name!r}; `sslhub list` shows the presets.{hint}")
    return _PRESETS[name]


def get_pretrained(name: str) -> PretrainedTag:
    """The release ``name`` = ``"{preset}.{tag}"``; a preset alone picks its first registered tag (timm's rule)."""
    if name in _PRETRAINED:
        return _PRETRAINED[name]
    preset, _, tag = name.partition(".")
    candidates = [t for t in _PRETRAINED.values() if t.preset == preset]
    if candidates and not tag:
        return candidates[0]
    known = [t.name for t in candidates] or list_pretrained(f"{preset.split('_')[0]}_*")
    hint = f" Releases of that model: {known}." if known else ""
    raise ValueError(f"No pretrained weights are registered as {name!r}; `sslhub list --pretrained` shows them.{hint}")


def list_methods() -> list[str]:
    """Registered method ids, e.g. ``['dino', 'mae', 'moco_v2']``."""
    return sorted(_METHODS)


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Preset names matching a shell-style ``pattern`` (``'dino_*'``); with ``pretrained``, the ``"{preset}.{tag}"``
    names of the releases matching it, as timm's ``list_models(pretrained=True)`` lists ``model.tag`` names."""
    if pretrained:
        return list_pretrained(pattern)
    return sorted(name for name in _PRESETS if fnmatch.fnmatchcase(name, pattern))


def list_pretrained(pattern: str = "*") -> list[str]:
    """``"{preset}.{tag}"`` names of the registered releases matching ``pattern`` (``'dino_*'``)."""
    return sorted(name for name in _PRETRAINED if fnmatch.fnmatchcase(name, pattern))


def list_layouts() -> dict[str, CheckpointLayout]:
    """The checkpoint layouts the registered methods declare (``SSLMethod.checkpoint_layouts``), by name: a method
    derived from another registered method first (DeepMIM's files also look like its base MAE's), otherwise in the
    order the methods were registered."""

    def bases(method) -> int:
        return sum(issubclass(method, other) for other in _METHODS.values())

    methods = sorted(_METHODS.values(), key=bases, reverse=True)
    return {layout.name: layout for method in methods for layout in method.checkpoint_layouts}


def layout_methods(layout: str) -> list[str]:
    """The methods whose checkpoints ``layout`` describes (a layout a method inherits counts for it too)."""
    return sorted(name for name, method in _METHODS.items() if any(x.name == layout for x in method.checkpoint_layouts))
