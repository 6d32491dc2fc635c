"""What a checkpoint layout is made of: ``CheckpointLayout`` (recognise + convert one kind of official file),
``Converted`` (its result in sslhub names) and ``KeyReader`` (take every key of a state dict exactly once).

Each method declares the layouts of its authors' files in its own module (``SSLMethod.checkpoint_layouts``); a
layout's ``convert`` reads what ``torch.load`` returned and gives the released encoder in timm names and, when the
file holds it, the state of the whole pretraining objective in the names of the sslhub method
(``SSLForPreTraining.method``). Every key of the file is either mapped or left out by a named rule (optimizer state,
epoch counters, ...); anything else is an error that lists it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sslhub.conversion.loading import CheckpointError

Tensor = torch.Tensor


@dataclass
class Converted:
    """``backbone``: released encoder (timm names, or the authors' names that the architecture's timm
    ``checkpoint_filter_fn`` maps); ``method_encoders``: every encoder copy of the objective by its prefix in
    ``SSLForPreTraining.method`` (``"encoder_q.backbone."``), ``method``: the rest of the objective (heads, queue,
    center), both ``None`` when the file holds only the released encoder; ``encoder_extras``: the parts of the
    released encoder outside its timm model, in the encoder's names (SimCLR v2's projection head, ``"head.0.weight"``);
    ``method_overrides``: hyperparameters the file fixes (head sizes, queue length, the run's arguments);
    ``left_out``: entries deliberately not converted."""

    layout: str
    backbone: dict[str, Tensor]
    method: dict[str, Tensor] | None = None
    method_encoders: dict[str, dict[str, Tensor]] | None = None
    method_overrides: dict = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    encoder_extras: dict[str, Tensor] = field(default_factory=dict)


class KeyReader:
    """Takes keys out of a flat state dict; ``finish()`` fails on keys nobody took or left out by name."""

    def __init__(self, state: dict, source: str):
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{source}: expected a state dict of tensors, got {type(state).__name__}")
        self.state, self.source, self.used = state, source, set()

    def take(self, prefix: str, rename: Callable[[str], str] = lambda key: key) -> dict[str, Tensor]:
        """Entries under ``prefix`` with the prefix stripped (then ``rename``d)."""
        found = {key: value for key, value in self.state.items() if key.startswith(prefix) and key not in self.used}
        self.used.update(found)
        return {rename(key[len(prefix) :]): value for key, value in found.items()}

    def take_one(self, key: str) -> Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.source}: key {key!r} is missing; the file has {preview(self.state)}")
        self.used.add(key)
        return self.state[key]

    def leave_out(self, prefix: str) -> list[str]:
        return sorted(self.take(prefix))

    def finish(self) -> None:
        rest = [key for key in self.state if key not in self.used]
        if rest:
            raise CheckpointError(f"{self.source}: unexpected keys for this layout: {preview(rest)}")


def preview(keys, limit: int = 12) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(repr(k) for k in keys[:limit]) + "]" + more


def entry(container, key: str, source: str):
    if not isinstance(container, dict) or key not in container:
        found = preview(container) if isinstance(container, dict) else type(container).__name__
        raise CheckpointError(f"{source}: expected an entry {key!r} in the checkpoint; found {found}")
    return container[key]


def strip_module(state: dict) -> dict:
    """DistributedDataParallel's ``module.`` prefix removed where present."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + key: value for key, value in state.items()}


def leftover_entries(container: dict, used: set[str]) -> list[str]:
    return sorted(f"{key} (not converted)" for key in container if key not in used)


@dataclass(frozen=True)
class CheckpointLayout:
    """One kind of official checkpoint: ``detect(container)`` says whether a loaded file is of this kind (keep it
    specific: the first layout that claims a file converts it), ``convert(container, source)`` maps it. For Hugging
    Face model directories, ``container`` is ``{"config": config.json as a dict, "state_dict": weights}`` and
    ``hf_model_types`` lists the transformers ``model_type`` values the layout reads."""

    name: str
    detect: Callable[[object], bool]
    convert: Callable[[object, str], Converted]
    hf_model_types: tuple[str, ...] = ()
