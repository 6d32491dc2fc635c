"""Optimizers of the official recipes, from one table (``OPTIMIZERS``): PyTorch's SGD and AdamW, LARS as the
self-supervised papers' code writes it, and LARC from timm.

``lars``: LARS (You et al. 2017, arXiv 1708.03888) of MoCo v3 (``moco/optimizer.py``), MAE's linear probe
(``util/lars.py``), SimCLR (``lars_optimizer.py``) and Barlow Twins: a tensor with more than one dimension gets
``u = g + λ w`` scaled by the trust ratio ``η ||w|| / ||u||`` (1 when a norm is 0); biases and norm parameters get
``u = g``; then heavy-ball momentum ``μ ← m μ + u`` and ``w ← w - lr μ``.

Why not timm's ``Lars`` for it: timm (as NVIDIA apex's LARC) divides by ``||g|| + λ ||w||`` and leaves a tensor whose
gradient is zero at ratio 1. Measured on a ResNet-18 step (BENCHMARKS.md): the updates agree to 1e-5 relative for
ordinary tensors at λ = 1e-6, but MoCo v3 zero-initialises the last BN of each residual block, so at the first steps
the convolutions before it have zero gradient: the official rule moves them by ``lr η ||w||`` towards 0, timm's by
``lr λ w`` — 100 % different. ``larc``: timm's ``Lars(trust_clip=False, always_adapt=True)``, which is NVIDIA apex's
LARC as SwAV's ``main_swav.py`` wraps SGD with it (``clip=False``: ratio ``η ||w|| / (||g|| + λ ||w|| + ε)``, not
capped at ``lr``) except for a tensor with zero gradient, which apex leaves alone and timm decays by ``lr λ w``
(measured on a SwAV step at lr 4.8: 0 with SwAV's initialisation, 5e-5 of the update with zero-initialised residual
BatchNorms, ``tests/test_swav.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import Lars
from torch import nn

TRUST_COEFFICIENT = 0.001


class LARS(torch.optim.Optimizer):
    """LARS as MoCo v3, MAE, SimCLR and Barlow Twins write it (module docstring); ``eta`` is the trust coefficient."""

    def __init__(
        self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = TRUST_COEFFICIENT
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        update = param.grad
        if param.ndim > 1:
            update = update.add(param, alpha=group["weight_decay"])
            param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
            trust = torch.where(
                (param_norm > 0) & (update_norm > 0),
                group["eta"] * param_norm / update_norm,
                torch.ones_like(param_norm),
            )
            update = update.mul(trust)
        state = self.state[param]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(param)
        state["mu"].mul_(group["momentum"]).add_(update)
        param.add_(state["mu"], alpha=-group["lr"])


def _sgd(groups, lr: float, momentum: float = 0.9, **_) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def _adamw(groups, lr: float, betas: tuple[float, float] = (0.9, 0.999), **_) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def _lars(groups, lr: float, momentum: float = 0.9, **_) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=momentum)


def _larc(groups, lr: float, momentum: float = 0.9, **_) -> torch.optim.Optimizer:
    """apex's LARC as SwAV wraps SGD with it (``clip=False``): every tensor adapted, its group's weight decay inside
    the ratio."""
    groups = [{**group, "always_adapt": True} for group in groups]
    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=TRUST_COEFFICIENT, trust_clip=False)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
    "lars": _lars,
    "larc": _larc,
}


def create_optimizer(
    name: str, groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter], lr: float, **options
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``OPTIMIZERS``) over parameter ``groups`` (dicts with ``params`` and
    ``weight_decay``, or bare parameters: one group without weight decay) at ``lr``; ``options``: ``momentum``
    (SGD, LARS, LARC), ``betas`` (AdamW)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; sslhub has {sorted(OPTIMIZERS)}")
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups, "weight_decay": 0.0}]
    return OPTIMIZERS[name](groups, lr, **options)
