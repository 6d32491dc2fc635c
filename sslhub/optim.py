"""Optimizers the official recipes use and PyTorch lacks."""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, arXiv 1708.03888) as MoCo v3 uses it (facebookresearch/moco-v3 ``moco/optimizer.py``).

    For a parameter ``w`` with gradient ``g`` and more than one dimension: ``u = g + λ w`` scaled by the trust ratio
    ``η ||w|| / ||u||`` (1 when either norm is 0); biases and norm parameters (``ndim <= 1``) get ``u = g``, neither
    weight decay nor trust ratio. Then heavy-ball momentum ``μ ← m μ + u`` and ``w ← w - lr μ``.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
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
