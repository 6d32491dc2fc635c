"""Pure loss functions, one per equation; each docstring gives the equation and its paper."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslhub.distributed import sum_over_processes


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


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709, eq. 1 and Algorithm 1).

    With ``u = z / ||z||`` and ``s_ij = u_i·u_j / τ`` over the 2N projections of two views,
    ``l(i, j) = -log( exp(s_ij) / Σ_{k≠i} exp(s_ik) )`` and ``L = 1/2N Σ_k [l(2k-1, 2k) + l(2k, 2k-1)]``: each of the 2N
    anchors against its positive (the other view of its image) and the 2N - 2 other projections as negatives.
    ``z1``, ``z2``: (N, D) unnormalised projections of the two views. Across processes (SimCLR ``objective.py``), pass
    the projections of every process as ``all_z1`` / ``all_z2`` (M, D) with this process's rows at ``offset``: the
    local anchors are contrasted with the global batch, and the mean over processes of the results is the loss of
    the global batch.
    """
    positive, negatives = _pair_logits(z1, z2, temperature, all_z1, all_z2, offset)
    return (torch.logsumexp(torch.cat([positive[:, None], negatives], dim=1), dim=1) - positive).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z)`` with stop-gradient (Chen & He 2020, arXiv 2011.10566, eq. 1 and 3):
    ``-mean_i cos(p_i, stopgrad(z_i))`` over the (N, D) rows. The symmetrised loss is
    ``(negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2`` (eq. 4)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, arXiv 2006.07733, eq. 2):
    ``mean_i || p_i/||p_i|| - z_i/||z_i|| ||² = mean_i (2 - 2 cos(p_i, z_i))`` over the (N, D) rows; ``z`` is the
    target network's projection (no gradient flows into it). BYOL symmetrises it over the two views (eq. 3)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins' empirical cross-correlation (Zbontar et al. 2021, arXiv 2103.03230, eq. 2): each embedding
    dimension standardised over the batch (BatchNorm without affine parameters: batch mean, biased variance, ``eps``),
    then ``C = z1ᵀ z2 / N`` (D x D) for the (N, D) embeddings of the two views."""
    z1 = F.batch_norm(z1, None, None, training=True, eps=eps)
    z2 = F.batch_norm(z2, None, None, training=True, eps=eps)
    return z1.t() @ z2 / z1.shape[0]


def redundancy_reduction(correlation: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins' objective (arXiv 2103.03230, eq. 1) on a cross-correlation matrix C:
    ``Σ_i (1 - C_ii)² + λ Σ_i Σ_{j≠i} C_ij²``."""
    on_diagonal = (torch.diagonal(correlation) - 1).square().sum()
    off_diagonal = correlation.square().sum() - torch.diagonal(correlation).square().sum()
    return on_diagonal + lambd * off_diagonal


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """Barlow Twins' loss on one batch (arXiv 2103.03230, eq. 1-2; ``main.py`` ``BarlowTwins.forward``): the
    ``redundancy_reduction`` of the ``cross_correlation`` of the (N, D) projector outputs of the two views."""
    return redundancy_reduction(cross_correlation(z1, z2), lambd)


def swapped_prediction(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float, assigned: Sequence[int]
) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, arXiv 2006.09882, eq. 1-2; ``main_swav.py`` ``train``).

    ``scores[v]``: (B, K) prototype scores ``zᵀC`` of crop v; ``codes[j]``: (B, K) the Sinkhorn-Knopp codes q of crop
    ``assigned[j]``. With ``p_v = softmax(scores[v] / τ)``,
    ``L = 1/|A| Σ_{j} 1/(V-1) Σ_{v ≠ assigned[j]} mean_b( -Σ_k q_j[b, k] log p_v[b, k] )`` over the V crops; no
    gradient flows into the codes.
    """
    total = 0.0
    for code, crop in zip(codes, assigned, strict=True):
        terms = [
            -(code.detach() * F.log_softmax(score / temperature, dim=1)).sum(dim=1).mean()
            for v, score in enumerate(scores)
            if v != crop
        ]
        total = total + sum(terms) / len(terms)
    return total / len(assigned)


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
    targets = [F.softmax((t - center) / teacher_temperature, dim=-1) for t in teacher_logits]
    return multi_crop_cross_entropy(student_logits, targets, student_temperature)


def multi_crop_cross_entropy(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temperature: float
) -> torch.Tensor:
    """Multi-crop self-distillation cross-entropy (DINO, arXiv 2104.14294, eq. 3; DINOv2, arXiv 2304.07193, §4
    "Image-level objective").

    ``L = mean over pairs (t, s), s ≠ t, of  mean_b -Σ_k P_t[b, k] log softmax(g_s[b] / τ_s)[k]``.
    ``student_logits``: one (B, K) tensor per crop, the global crops first, in the teacher's order;
    ``teacher_probs``: one (B, K) target distribution per global crop (no gradient flows into it).
    """
    log_probs = [F.log_softmax(s / student_temperature, dim=-1) for s in student_logits]
    total, terms = 0.0, 0
    for t_index, target in enumerate(teacher_probs):
        for s_index, log_prob in enumerate(log_probs):
            if s_index == t_index:
                continue
            total = total + (-target.detach() * log_prob).sum(dim=-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp centering of the teacher (SwAV, arXiv 2006.09882, eq. 3; DINOv2, arXiv 2304.07193, §4
    "Sinkhorn-Knopp centering"; ``DINOLoss.sinkhorn_knopp_teacher`` / ``iBOTPatchLoss.sinkhorn_knopp_teacher``).

    ``Q = exp(g_t / τ_t)`` (B x K, B rows over all processes), scaled to sum 1; then ``iterations`` times: each
    prototype column to total 1/K, each sample row to total 1/B. Returns ``B Q``: one assignment distribution per
    row (rows sum to 1, prototypes used about equally over the global batch). Column sums and the row count are
    all-reduced over processes (``sslhub.distributed``); computed in float32.
    """
    q = torch.exp(teacher_logits.float() / temperature)
    rows = sum_over_processes(q.new_tensor(float(q.shape[0])))
    prototypes = q.shape[1]
    q /= sum_over_processes(q.sum())
    for _ in range(iterations):
        q /= sum_over_processes(q.sum(dim=0, keepdim=True))
        q /= prototypes
        q /= q.sum(dim=1, keepdim=True)
        q /= rows
    return q * rows


def ibot_patch_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor, student_temperature: float
) -> torch.Tensor:
    """iBOT masked-patch self-distillation (iBOT, arXiv 2111.07832, §3; DINOv2, arXiv 2304.07193, §4 "Patch-level
    objective"; ``iBOTPatchLoss.forward_masked``).

    ``L = 1/N Σ_n 1/|M_n| Σ_{i ∈ M_n} -Σ_k P_t[n, i, k] log softmax(g_s[n, i] / τ_s)[k]`` over the N images of
    ``masks`` (N, L) (True = masked patch); an image without masked patches adds 0. ``student_logits`` and
    ``teacher_probs``: (M, K), one row per masked patch in the row-major order of ``masks[masks]``.
    """
    per_patch = -(teacher_probs.detach() * F.log_softmax(student_logits / student_temperature, dim=-1)).sum(dim=-1)
    weights = (1 / masks.sum(dim=-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return (per_patch * weights).sum() / masks.shape[0]


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al., arXiv 1806.03198, §4; DINOv2, arXiv 2304.07193, §4 "KoLeo
    regularizer"; ``KoLeoLoss``): the Kozachenko-Leonenko differential-entropy estimate of the batch, to maximise.

    ``L = -1/n Σ_i log(d_{n,i} + ε)`` with ``d_{n,i} = min_{j≠i} ||x_i - x_j||`` over the L2-normalised rows of
    ``features`` (n, D); distances as ``nn.PairwiseDistance(eps=1e-8)``, in float32.
    """
    x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.t()
        similarity.fill_diagonal_(-1)
        nearest = similarity.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


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


def masked_cosine_distance(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Feature-distillation loss of DeepMIM-CLIP (OliverRensu/DeepMIM ``models_mae.py forward_loss``): ``2 - 2 cos``
    between each predicted and target token, L2-normalised, averaged over the masked tokens only.
    ``prediction``, ``target``: (B, L, D); ``mask``: (B, L) with 1 for masked tokens."""
    per_token = 2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum()


def invariance_spreading(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """InvaSpread's instance loss with in-batch features as classifier weights (Ye, Zhang, Yuen, Chang 2019, arXiv
    1904.03436, eq. 2-5; the official ``BatchCriterion`` with ``negM = 1``).

    The 2N L2-normalised features ``f = [u(z1); u(z2)]`` act as query and, detached (the official ``feat.data``), as
    the weights ``w``. For query ``r``, ``P(c | r) = exp(w_c·f_r/τ) / Σ_{k≠r} exp(w_k·f_r/τ)`` over the 2N - 1 other
    features; ``p(r)`` is the other view of its image. ``L = -1/2N Σ_r [log P(p(r) | r) + Σ_{c∉{r, p(r)}} log(1 -
    P(c | r))]``: every view recognised as its instance (eq. 3) and not as any of the 2N - 2 other features, both
    views of the other images (eq. 4), in both directions. ``z1``, ``z2``: (N, D) unnormalised features of the two
    views of the same N images.
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 2:
        raise ValueError(
            f"invariance_spreading: z1, z2 (N, D), one shape, N >= 2; got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    features = F.normalize(torch.cat([z1, z2]), dim=1)
    total = features.shape[0]
    logits = features @ features.detach().t() / temperature
    self_mask = torch.eye(total, dtype=torch.bool, device=features.device)
    log_p = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    positives = torch.arange(total, device=features.device).roll(total // 2)
    positive_mask = F.one_hot(positives, total).bool()
    log_not = torch.log1p(-log_p.exp()).masked_fill(self_mask | positive_mask, 0.0)
    return -(log_p[positive_mask].sum() + log_not.sum()) / total


def nce_loss(probabilities: torch.Tensor, noise_probability: float, eps: float = 1e-7) -> torch.Tensor:
    """Noise-contrastive estimation (Gutmann & Hyvärinen 2010) as InstDisc uses it (arXiv 1805.01978 eq. 5-7,
    lemniscate's ``NCECriterion``): ``probabilities`` (B, 1 + K) are the unnormalised model probabilities
    P(i|v) = exp(v_i·f/τ) / Z, the positive in column 0 and the K noise samples after it; with P_n the noise
    probability (1/N for uniform noise), ``L = -log(P_0 / (P_0 + K P_n)) - Σ_k log(K P_n / (P_k + K P_n))``, averaged
    over the batch; ``eps`` in the denominators as the official code."""
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"probabilities of shape (B, 1 + K) with K >= 1 expected, got {tuple(probabilities.shape)}")
    k_pn = (probabilities.shape[1] - 1) * noise_probability
    log_data = torch.log(probabilities[:, 0] / (probabilities[:, 0] + k_pn + eps))
    log_noise = torch.log(k_pn / (probabilities[:, 1:] + k_pn + eps))
    return -(log_data.sum() + log_noise.sum()) / probabilities.shape[0]


def supervised_contrastive(
    anchors: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    base_temperature: float | None = None,
    contrast: torch.Tensor | None = None,
    contrast_labels: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Supervised contrastive loss L^sup_out (Khosla et al. 2020, arXiv 2004.11362, eq. 2), as Jigsaw Clustering's
    clustering loss (arXiv 2104.00323, ``SupCluLoss``): with ``s_ia = z_i·z_a / τ`` over L2-normalised rows and P(i)
    the other rows of anchor i's label, ``L = -(τ / τ_b) mean_i 1/|P(i)| Σ_{p∈P(i)} log( exp(s_ip) / Σ_{a≠i}
    exp(s_ia) )`` (τ_b = ``base_temperature``, default τ: no scaling). ``anchors`` (N, D), ``labels`` (N,); across
    processes pass every process's rows as ``contrast`` / ``contrast_labels`` (M, ...) with the anchors at ``offset``.
    Every anchor needs a positive."""
    contrast = anchors if contrast is None else contrast
    contrast_labels = labels if contrast_labels is None else contrast_labels
    logits = anchors @ contrast.t() / temperature
    self_mask = F.one_hot(torch.arange(anchors.shape[0], device=anchors.device) + offset, contrast.shape[0]).bool()
    positives = (labels[:, None] == contrast_labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("supervised_contrastive: an anchor has no positive (no other row with its label)")
    log_prob = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    mean_log_prob = (log_prob * positives).sum(dim=1) / counts
    return -(temperature / (base_temperature or temperature)) * mean_log_prob.mean()


def _pair_logits(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    all_z1: torch.Tensor | None,
    all_z2: torch.Tensor | None,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive (2N,) and negative (2N, 2M - 2) logits ``u_i·u_j / τ`` of the 2N anchors (``nt_xent``'s conventions).

    Anchors are ``z1`` then ``z2``; the negatives of an anchor are every other projection of the (gathered) batch except
    itself and its positive, in the order [other view, same view].
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all_z1 = z1 if all_z1 is None else F.normalize(all_z1, dim=1)
    all_z2 = z2 if all_z2 is None else F.normalize(all_z2, dim=1)
    batch, total = z1.shape[0], all_z1.shape[0]
    keep = ~F.one_hot(torch.arange(batch, device=z1.device) + offset, total).bool()
    positives, negatives = [], []
    for anchors, same_view, other_view in ((z1, all_z1, all_z2), (z2, all_z2, all_z1)):
        other = anchors @ other_view.t() / temperature
        same = anchors @ same_view.t() / temperature
        positives.append(other[~keep])
        negatives.append(torch.cat([other[keep].view(batch, -1), same[keep].view(batch, -1)], dim=1))
    return torch.cat(positives), torch.cat(negatives)


def _debiased_loss(
    positive: torch.Tensor, negatives: torch.Tensor, weighted_sum: torch.Tensor, temperature: float, tau_plus: float
) -> torch.Tensor:
    """``-log(e^pos / (e^pos + g))`` with DCL's debiased negative term ``g`` (arXiv 2007.00224 eq. 6), log-space."""
    count = negatives.shape[1]
    exp_positive = positive.exp()
    g = (weighted_sum - tau_plus * count * exp_positive) / (1 - tau_plus)
    g = g.clamp(min=count * math.exp(-1 / temperature))
    return (torch.log(exp_positive + g) - positive).mean()


def debiased_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    tau_plus: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Debiased contrastive loss (Chuang et al. 2020, "Debiased Contrastive Learning", arXiv 2007.00224, eq. 6).

    For each of the 2N anchors with positive logit ``p`` and the ``Nn = 2M - 2`` negative logits ``n_k`` (``s = u·v/τ``
    as in ``nt_xent``), ``g = max((Σ_k e^{n_k} - τ+ Nn e^{p}) / (1 - τ+), Nn e^{-1/τ})`` and
    ``L = mean(-log(e^p / (e^p + g)))``; the lower clamp and ``Nn`` (all other projections of the batch) follow the
    official code (chingyaoc/DCL). ``tau_plus = 0`` gives ``nt_xent`` up to the clamp. ``all_z*``/``offset`` as in
    ``nt_xent``.
    """
    positive, negatives = _pair_logits(z1, z2, temperature, all_z1, all_z2, offset)
    return _debiased_loss(positive, negatives, negatives.exp().sum(dim=1), temperature, tau_plus)


def hard_negative_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    tau_plus: float,
    beta: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Hard-negative contrastive loss (Robinson et al. 2021, arXiv 2010.04592, eq. 3 with the estimator of §3.2).

    As ``debiased_nt_xent`` but the negative sum ``Σ_k e^{n_k}`` is replaced by the importance-weighted
    ``Nn Σ_k w_k e^{n_k}`` with ``w_k = e^{β n_k} / Σ_j e^{β n_j}`` (the official code joshr17/HCL: weights
    ``exp(β·n)`` over the mean weight, then the τ+ debiasing and the ``Nn e^{-1/τ}`` clamp). ``beta = 0`` gives
    ``debiased_nt_xent``.
    """
    positive, negatives = _pair_logits(z1, z2, temperature, all_z1, all_z2, offset)
    weights = torch.softmax(beta * negatives, dim=1)
    weighted_sum = negatives.shape[1] * (weights * negatives.exp()).sum(dim=1)
    return _debiased_loss(positive, negatives, weighted_sum, temperature, tau_plus)


def flat_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """FlatNCE (Chen et al. 2021, "Simpler, Faster, Stronger: Breaking The log-K Curse On Contrastive Learners With
    FlatNCE", arXiv 2107.01152, Algorithm 1).

    Per anchor ``c = logsumexp_k(n_k - p)`` over the negatives, and the loss is ``mean(exp(c - stopgrad(c)))``: its
    value is 1 by construction; its gradient is ``mean(Σ_k softmax(n - p)_k ∇(n_k - p))``.
    """
    positive, negatives = _pair_logits(z1, z2, temperature, all_z1, all_z2, offset)
    c = torch.logsumexp(negatives - positive[:, None], dim=1)
    return torch.exp(c - c.detach()).mean()


def alignment_loss(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2) -> torch.Tensor:
    """Alignment ``E ||f(x) - f(y)||^α`` on L2-normalised features (Wang & Isola 2020, arXiv 2005.10242, eq. 4)."""
    return (F.normalize(z1, dim=1) - F.normalize(z2, dim=1)).norm(dim=1).pow(alpha).mean()


def uniformity_loss(z: torch.Tensor, t: float = 2) -> torch.Tensor:
    """Uniformity ``log E_{i<j} e^{-t ||f_i - f_j||^2}`` on L2-normalised features (arXiv 2005.10242, eq. 5)."""
    return torch.pdist(F.normalize(z, dim=1), p=2).pow(2).mul(-t).exp().mean().log()
