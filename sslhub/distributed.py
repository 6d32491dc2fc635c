"""Collectives used by the objectives; each is the identity in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_all(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0 (no gradient), as MoCo's ``concat_all_gather``."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, keeping the autograd graph: each process receives the
    gradient of its own slice summed over the processes' losses (``torch.distributed.nn.functional.all_gather``), so
    with DDP's gradient averaging the update is that of the mean loss over the global batch (SimCLR's negatives
    from every replica, arXiv 2002.05709 §2.2)."""
    if world_size() == 1:
        return tensor
    return torch.cat(dist_nn.all_gather(tensor.contiguous()))


@torch.no_grad()
def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over processes (DINO's all-reduced batch center)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / world_size()


@torch.no_grad()
def shuffle_across_processes(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffling BN (MoCo, arXiv 1911.05722, §3.3): give each process a random slice of the global batch.

    Returns the local shuffled batch and the permutation needed by ``unshuffle_across_processes``.
    """
    if world_size() == 1:
        return batch, torch.arange(batch.shape[0], device=batch.device)
    gathered = gather_all(batch)
    permutation = torch.randperm(gathered.shape[0], device=batch.device)
    dist.broadcast(permutation, src=0)
    local = permutation.view(world_size(), -1)[dist.get_rank()]
    return gathered[local], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_across_processes(batch: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo ``shuffle_across_processes`` on the encoder output."""
    if world_size() == 1:
        return batch
    local = unshuffle.view(world_size(), -1)[dist.get_rank()]
    return gather_all(batch)[local]
