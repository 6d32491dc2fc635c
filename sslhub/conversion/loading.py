"""Reading checkpoint files without executing code: safetensors, or ``torch.load(weights_only=True)`` with an
allow-list of the harmless types the official training checkpoints contain."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

# DINO's and MAE's full checkpoints store their argparse arguments (``{'args': Namespace(...)}``).
SAFE_GLOBALS = [argparse.Namespace]
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and what is wrong."""


def load_file_state(path: str | os.PathLike) -> dict:
    """The object stored in a checkpoint file: a ``.safetensors`` file, or a PyTorch file read with
    ``torch.load(weights_only=True)`` (only tensors, containers, numbers, strings and ``argparse.Namespace``).
    A file that would need other code to load is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), None)
        if reason is None:  # a corrupt pickle stream, not a refused type
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]})") from err
        raise CheckpointError(
            f"{path}: refused to load: the file needs code beyond weights (torch.load(weights_only=True) failed: "
            f"{reason[:300]}). sslhub never unpickles arbitrary objects; re-save the state dict with "
            "torch.save(model.state_dict(), ...) or as safetensors."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


def load_hf_directory(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A Hugging Face model directory (``config.json`` + ``model.safetensors`` [sharded] or ``pytorch_model.bin``):
    ``(state_dict, config as a dict)``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a model directory needs a config.json")
    config = json.loads(config_file.read_text())
    weights = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no weights file; expected one of {list(HF_WEIGHT_FILES)}")
    if weights.name.endswith(".index.json"):
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file_state(path / shard))
        return state, config
    return load_file_state(weights), config
