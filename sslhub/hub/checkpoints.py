"""What an sslhub checkpoint directory is: an sslhub ``config.json`` plus safetensors weights (never pickles)."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from sslhub.hub.errors import HubError

MODEL_TYPE = "sslhub"  # SSLConfig.model_type
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.md", "*.png")  # top-level files of a checkpoint that a push uploads
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def _config_kind(config: dict) -> str:
    """What a ``config.json`` that is not sslhub's belongs to."""
    if config.get("model_type"):
        return f"a transformers {config['model_type']!r} model"
    return "a timm model" if "architecture" in config else "not an sslhub model"


def check_config(config_path: Path, name: str) -> None:
    """``HubError`` unless ``config_path`` is an sslhub ``config.json``."""
    if not config_path.is_file():
        raise HubError(
            f"{name} has no {CONFIG_NAME}, so it is not an sslhub checkpoint (convert one with `sslhub convert`)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HubError(f"the {CONFIG_NAME} of {name} is not valid JSON") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        kind = _config_kind(config) if isinstance(config, dict) else "not an sslhub model"
        raise HubError(f"{name} is {kind}, not an sslhub checkpoint: convert it with `sslhub convert`")


def check_checkpoint(directory: str | os.PathLike, name: str | None = None) -> Path:
    """``directory`` if it holds an sslhub ``config.json`` and safetensors weights, else ``HubError``."""
    directory = Path(directory)
    name = name or str(directory)
    if not directory.is_dir():
        raise HubError(f"{name} is not a directory")
    check_config(directory / CONFIG_NAME, name)
    if not any(directory.glob("*.safetensors")):
        raise HubError(
            f"{name} has no model.safetensors: sslhub only loads safetensors weights, never pickles (*.bin, *.pt)"
        )
    return directory


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The files a push uploads (path in the repo -> local file): the checkpoint's top-level ``UPLOAD_PATTERNS``.
    Refuses (``HubError``) a directory that is not an sslhub checkpoint, has no model card or holds pickles."""
    directory = check_checkpoint(directory)
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise HubError(
            f"{directory} contains pickle files ({', '.join(pickles)}): remove them, sslhub publishes safetensors only"
        )
    if not (directory / CARD_NAME).is_file():
        raise HubError(f"{directory} has no {CARD_NAME} model card: save the model with `save_pretrained`")
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and matches(p.name, UPLOAD_PATTERNS)]
    return {path.name: path for path in files}


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
