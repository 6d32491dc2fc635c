"""Method registry and presets (method x timm backbone x defaults), see DESIGN.md §2-3."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sslhub.methods.base import SSLMethod

_METHODS: dict[str, type[SSLMethod]] = {}
_PRESETS: dict[str, Preset] = {}


@dataclass(frozen=True)
class Preset:
    """A named model: one method on one timm backbone, with the options that make it that model."""

    name: str
    method: str
    backbone: str
    image_size: int = 224
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _load_methods() -> None:
    importlib.import_module("sslhub.methods")


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


def get_method(name: str) -> type[SSLMethod]:
    _load_methods()
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}. Available methods: {sorted(_METHODS)}")
    return _METHODS[name]


def get_preset(name: str) -> Preset:
    _load_methods()
    if name not in _PRESETS:
        close = [p for p in _PRESETS if p.split("_")[0] == name.split("_")[0]]
        hint = f" Presets of that method: {sorted(close)}" if close else ""
        raise ValueError(f"Unknown model {name!r}; `sslhub list` shows the presets.{hint}")
    return _PRESETS[name]


def list_methods() -> list[str]:
    """Registered method ids, e.g. ``['dino', 'mae', 'moco_v2']``."""
    _load_methods()
    return sorted(_METHODS)


def list_models(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style ``pattern`` (``'dino_*'``)."""
    _load_methods()
    return sorted(name for name in _PRESETS if fnmatch.fnmatchcase(name, pattern))
