"""A memory bank of one L2-normalised feature per training image, indexed by the sample index (``Batch.index``).

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", arXiv 1805.01978, §3.1-3.3:
the bank holds v_i for every image i, is updated with the batch's features by a momentum (proximal) rule and is
the source of the noise samples of the NCE approximation. Every process holds the same bank: the update applies
the features and indices of the global batch (all-gathered), and the noise indices are drawn from a generator
seeded by the training step and a run seed that all processes share, each process taking its slice of the draws
of the global batch, so a run on P processes equals a run on one process with the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslhub.distributed import gather_all, rank, world_size


def initial_bank(num_samples: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The initial bank: U(-s, s) with s = 1 / sqrt(dim / 3), as lemniscate's ``NCEAverage`` / ``LinearAverage``
    (each coordinate of variance 1/dim, so rows of norm about 1, not normalised)."""
    if num_samples < 0 or dim < 1:
        raise ValueError(f"memory bank of {num_samples} rows of {dim} features: expected num_samples >= 0, dim >= 1")
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_samples, dim, generator=generator) * (2 * stdv) - stdv


@torch.no_grad()
def momentum_update(bank: torch.Tensor, features: torch.Tensor, index: torch.Tensor, momentum: float) -> None:
    """``v_i ← normalise(m v_i + (1 - m) f_i)`` for the rows of the global batch (features and indices gathered from
    every process), in place: eq. 8 of arXiv 1805.01978 with lemniscate's momentum form."""
    features, index = gather_all(features.detach().to(bank.dtype)), gather_all(index.to(bank.device))
    if index.numel() and (index.min() < 0 or index.max() >= bank.shape[0]):
        raise IndexError(f"sample index {int(index.max())} outside the memory bank of {bank.shape[0]} rows")
    rows = bank.index_select(0, index) * momentum + features * (1 - momentum)
    bank.index_copy_(0, index, F.normalize(rows, dim=1))


def noise_indices(
    num_samples: int, batch_size: int, k: int, step: int, seed: int, device: torch.device | None = None
) -> torch.Tensor:
    """(batch_size, k) indices drawn uniformly from [0, num_samples) for this process's part of the global batch:
    the draws of the whole global batch come from a generator seeded by (``seed``, ``step``), and process r takes
    rows r*batch_size to (r+1)*batch_size (the official noise distribution is uniform: ``AliasMethod`` over ones)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draws = torch.randint(num_samples, (batch_size * world_size(), k), generator=generator)
    start = rank() * batch_size
    return draws[start : start + batch_size].to(device)


def bind_banks(method, num_samples: int, banks: Sequence[str]) -> None:
    """``SSLMethod.bind_dataset`` of a method with memory banks of one row per training image (InstDisc, CMC): with
    the hparam ``num_samples`` 0 (a new run) the buffers named ``banks`` get ``num_samples`` rows of ``hparams.dim``
    (``initial_bank``) and the hparam records the size, so a saved model rebuilds them; banks sized for another
    dataset (a model pretrained elsewhere) are an error."""
    if method.record_num_samples(num_samples, "memory bank", "rows"):
        for name in banks:
            setattr(method, name, initial_bank(num_samples, method.hparams.dim).to(getattr(method, name).device))
