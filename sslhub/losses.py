"""Pure loss functions, one per equation; each docstring gives the equation and its paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def info_nce_with_queue(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2019, arXiv 1911.05722, eq. 1).

    ``L_q = -log( exp(q·k+/τ) / (exp(q·k+/τ) + Σ_{k-∈queue} exp(q·k-/τ)) )``, averaged over the batch.
    ``query``, ``key``: (B, D) L2-normalised; ``queue``: (K, D) L2-normalised negatives.
    """
    positive = (query * key).sum(dim=1, keepdim=True)
    negatives = query @ queue.t()
    logits = torch.cat([positive, negatives], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


def moco_v3_contrastive(
    query: torch.Tensor, keys: torch.Tensor, temperature: float, positive_offset: int = 0
) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k)`` (Chen et al. 2021, arXiv 2104.02057, eq. 1 and Algorithm 1).

    ``2τ · mean_i -log( exp(q_i·k_{i+o}/τ) / Σ_j exp(q_i·k_j/τ) )``: the positive of query ``i`` is key ``i + o``,
    every other key is a negative; the factor 2τ is the official code's. ``query``: (B, D) L2-normalised;
    ``keys``: (M, D) L2-normalised, the keys of all processes; ``positive_offset`` o = rank × B.
    """
    logits = query @ keys.t() / temperature
    labels = torch.arange(query.shape[0], device=query.device) + positive_offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def dino_cross_entropy(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """DINO self-distillation loss (Caron et al. 2021, arXiv 2104.14294, eq. 2-3 and ``DINOLoss``).

    ``P_t = softmax((g_t - c) / τ_t)`` for each global crop, ``P_s = softmax(g_s / τ_s)`` for every crop;
    ``L = mean over pairs (t, s), s ≠ t, of  -Σ_k P_t[k] log P_s[k]`` (averaged over the batch).
    ``student_logits``: one (B, K) tensor per crop, the global crops first, in the teacher's order;
    ``teacher_logits``: one (B, K) tensor per global crop; ``center``: (1, K).
    """
    targets = [F.softmax((t - center) / teacher_temperature, dim=-1).detach() for t in teacher_logits]
    log_probs = [F.log_softmax(s / student_temperature, dim=-1) for s in student_logits]
    total, terms = 0.0, 0
    for t_index, target in enumerate(targets):
        for s_index, log_prob in enumerate(log_probs):
            if s_index == t_index:
                continue
            total = total + (-target * log_prob).sum(dim=-1).mean()
            terms += 1
    return total / terms


def masked_patch_mse(
    prediction: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True
) -> torch.Tensor:
    """MAE reconstruction loss (He et al. 2021, arXiv 2111.06377, §3 "Reconstruction target").

    Mean squared error per patch, averaged over the masked patches only. With ``norm_pix_loss`` each target
    patch is normalised by its own mean and standard deviation: ``(x - μ) / sqrt(σ² + 1e-6)`` (σ² unbiased, as
    ``torch.var`` in the official code).
    ``prediction``, ``target_patches``: (B, L, P); ``mask``: (B, L) with 1 for masked patches.
    """
    if norm_pix_loss:
        mean = target_patches.mean(dim=-1, keepdim=True)
        var = target_patches.var(dim=-1, keepdim=True)
        target_patches = (target_patches - mean) / (var + 1e-6) ** 0.5
    per_patch = ((prediction - target_patches) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
