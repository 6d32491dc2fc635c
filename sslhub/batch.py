"""The batch contract between data, view recipes and methods (DESIGN.md §5).

A pretraining dataset yields one ``Sample`` per image: its index in the dataset, its views, its label when the data
has labels, and the extras the method's view recipe made (masks, rotation or permutation ids, colour channels ...).
The recipe's ``collate`` turns a list of samples into a ``Batch``, which is what a method's ``forward`` receives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate


@dataclass
class Sample:
    """One training image after its view recipe. ``seed`` is the seed its views were drawn with (a function of the
    run's seed, the epoch and ``index``), so batch-level randomness can be drawn reproducibly in ``collate``."""

    index: int
    views: list[torch.Tensor]
    label: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Batch:
    """What a method's ``forward`` receives: ``views`` (one (B, C, H, W) tensor per view position), ``index`` (B,)
    sample indices, ``labels`` (B,) when every sample has one, and the recipe's collated ``extras``."""

    views: list[torch.Tensor]
    index: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.views[0].shape[0]

    @classmethod
    def of(cls, views: torch.Tensor | Sequence[torch.Tensor] | Batch, **extras) -> Batch:
        """A batch from a ready ``Batch``, one tensor or a list of views (indices 0..B-1, no labels)."""
        if isinstance(views, Batch):
            return dataclasses.replace(views, extras={**views.extras, **extras}) if extras else views
        views = [views] if torch.is_tensor(views) else list(views)
        return cls(views, torch.arange(views[0].shape[0], device=views[0].device), None, extras)

    def _map(self, fn) -> Batch:
        def apply(value):
            if torch.is_tensor(value):
                return fn(value)
            if isinstance(value, dict):
                return {key: apply(item) for key, item in value.items()}
            if isinstance(value, list | tuple):
                return type(value)(apply(item) for item in value)
            return value

        return Batch(apply(self.views), apply(self.index), apply(self.labels), apply(self.extras))

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)


def stack_views(samples: Sequence[Sample]) -> list[torch.Tensor]:
    """Views stacked per position, so crops of different sizes (global / local) stay separate tensors."""
    counts = {len(sample.views) for sample in samples}
    if len(counts) != 1:
        raise ValueError(f"every sample of a batch needs the same number of views, got {sorted(counts)}")
    return [torch.stack(position) for position in zip(*(sample.views for sample in samples), strict=True)]


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """The default collation: views stacked per position, extras by ``torch.utils.data.default_collate``, labels
    when every sample has one."""
    labels = [sample.label for sample in samples]
    extras = default_collate([sample.extras for sample in samples]) if samples[0].extras else {}
    return Batch(
        stack_views(samples),
        torch.tensor([sample.index for sample in samples], dtype=torch.long),
        None if any(label is None for label in labels) else torch.tensor(labels, dtype=torch.long),
        extras,
    )


def batch_generator(samples: Sequence[Sample]) -> torch.Generator:
    """A generator for batch-level randomness in ``collate`` (e.g. DINOv2's masks), seeded from the samples' own
    seeds: the same batch gets the same draws whatever the worker, process or resume."""
    seed = np.random.SeedSequence([sample.seed for sample in samples]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed >> 1))
