"""Collectives used by the objectives, and BatchNorm over every process; each is the identity in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


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
    return sum_over_processes(tensor) / world_size()


@torch.no_grad()
def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes, without gradient (``torch.distributed.all_reduce`` as the official code calls it:
    SwAV's Sinkhorn-Knopp, Barlow Twins' cross-correlation)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: every process's input receives the sum of the
    gradients of every process's output."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes keeping the autograd graph: the gradient of each process's input is the sum of
    the gradients of every process's output."""
    if world_size() == 1:
        return tensor
    return _SumOverProcesses.apply(tensor.contiguous())


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


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch of all processes (SimCLR's global BN,
    arXiv 2002.05709 §2.2; ``torch.nn.SyncBatchNorm`` of the official PyTorch code), for any device and backend
    (``SyncBatchNorm`` runs on CUDA only): mean, then biased variance, each summed over processes with gradient
    (two passes, as stable as one process's BatchNorm); running statistics with the unbiased global variance. One
    process, or eval mode, is the plain BatchNorm. Same parameters and buffers as the BatchNorm it replaces."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or world_size() == 1:
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = sum_over_processes(input.new_tensor(float(input.numel() // input.shape[1])))
        mean = sum_with_grad(input.sum(dims)) / count
        centred = input - mean.reshape(shape)
        variance = sum_with_grad(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach() * count / (count - 1))
        output = centred * torch.rsqrt(variance + self.eps).reshape(shape)
        if self.affine:
            output = output * self.weight.reshape(shape) + self.bias.reshape(shape)
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_variance: torch.Tensor) -> None:
        """``_BatchNorm``'s update: exponential average with ``momentum``, cumulative average when it is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_variance.to(self.running_var.dtype), factor)


def global_batch_norm(module: nn.Module, cuda: bool = False) -> nn.Module:
    """``module`` with every BatchNorm computing global-batch statistics in training: ``torch.nn.SyncBatchNorm`` for a
    model that will run on CUDA, ``GlobalBatchNorm`` elsewhere (both keep the layer's parameters, buffers and
    state-dict keys)."""
    converted = nn.SyncBatchNorm | GlobalBatchNorm
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, converted):
        if cuda:
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)  # fmt: skip
        replacement.training = module.training
        if module.affine:
            replacement.weight, replacement.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(replacement, name, getattr(module, name))
        return replacement
    for name, child in module.named_children():
        converted = global_batch_norm(child, cuda)
        if converted is not child:
            setattr(module, name, converted)
    return module
