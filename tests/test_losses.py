"""Building blocks of the objectives: losses, masking utilities and heads.

Every reference is the paper's (or official code's) equation written out with explicit loops in numpy / float64,
never a call to the function under test.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslhub.heads import DINOHead, MLPHead
from sslhub.losses import (
    alignment_loss,
    barlow_twins,
    cross_correlation,
    debiased_nt_xent,
    dino_cross_entropy,
    flat_nce,
    hard_negative_nt_xent,
    info_nce_with_queue,
    masked_patch_mse,
    negative_cosine,
    normalized_mse,
    nt_xent,
    redundancy_reduction,
    sinkhorn_knopp,
    swapped_prediction,
    uniformity_loss,
)
from sslhub.masking import patchify, random_masking, sincos_2d_position_embedding


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def unit_rows(gen, *shape):
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def np64(tensor):
    return tensor.detach().double().numpy()


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# ---- MoCo InfoNCE (arXiv 1911.05722, eq. 1) -------------------------------------------------------------------------
def reference_info_nce(query, key, queue, temperature):
    q, k, negatives = np64(query), np64(key), np64(queue)
    losses = []
    for i in range(len(q)):
        positive = math.exp(q[i] @ k[i] / temperature)
        negative = sum(math.exp(q[i] @ n / temperature) for n in negatives)
        losses.append(-math.log(positive / (positive + negative)))
    return float(np.mean(losses))


@pytest.mark.parametrize("temperature", [0.2, 0.07])
def test_info_nce_with_queue_is_moco_eq1(gen, temperature):
    query, key, queue = unit_rows(gen, 5, 8), unit_rows(gen, 5, 8), unit_rows(gen, 11, 8)
    loss = info_nce_with_queue(query, key, queue, temperature)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(reference_info_nce(query, key, queue, temperature), rel=1e-5)


def test_info_nce_with_queue_is_low_when_the_positive_matches(gen):
    key, queue = unit_rows(gen, 4, 16), unit_rows(gen, 32, 16)
    matched = info_nce_with_queue(key, key, queue, 0.1)
    mismatched = info_nce_with_queue(key, key.roll(1, dims=0), queue, 0.1)
    assert matched < 0.1 * mismatched


# ---- DINO cross-entropy with centering (arXiv 2104.14294, eq. 2-3) ---------------------------------------------------
def reference_dino(student, teacher, center, student_temperature, teacher_temperature):
    """Mean over (teacher global crop t, student crop s != t) pairs of the batch mean of -sum P_t log P_s."""
    c = np64(center)[0]
    pair_losses = []
    for t, teacher_crop in enumerate(teacher):
        for s, student_crop in enumerate(student):
            if s == t:
                continue
            sample_losses = []
            for g_t, g_s in zip(np64(teacher_crop), np64(student_crop), strict=True):
                p_t = softmax((g_t - c) / teacher_temperature)
                log_p_s = np.log(softmax(g_s / student_temperature))
                sample_losses.append(-(p_t * log_p_s).sum())
            pair_losses.append(np.mean(sample_losses))
    return float(np.mean(pair_losses))


def dino_logits(gen, n_global=2, n_local=2, batch=3, dim=7):
    student = [torch.randn(batch, dim, generator=gen).requires_grad_() for _ in range(n_global + n_local)]
    teacher = [torch.randn(batch, dim, generator=gen).requires_grad_() for _ in range(n_global)]
    center = torch.randn(1, dim, generator=gen)
    return student, teacher, center


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_cross_entropy_is_eq2_with_centering_and_two_temperatures(gen, n_local):
    student, teacher, center = dino_logits(gen, n_local=n_local)
    loss = dino_cross_entropy(student, teacher, center, 0.1, 0.04)
    assert loss.item() == pytest.approx(reference_dino(student, teacher, center, 0.1, 0.04), rel=1e-5)


def test_dino_cross_entropy_depends_on_the_center(gen):
    student, teacher, center = dino_logits(gen)
    centered = dino_cross_entropy(student, teacher, center, 0.1, 0.04)
    uncentered = dino_cross_entropy(student, teacher, torch.zeros_like(center), 0.1, 0.04)
    assert centered.item() != pytest.approx(uncentered.item(), rel=1e-3)


def test_dino_cross_entropy_gradient_reaches_the_student_only(gen):
    student, teacher, center = dino_logits(gen)
    dino_cross_entropy(student, teacher, center, 0.1, 0.04).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


# ---- MAE masked pixel MSE (arXiv 2111.06377, §3) --------------------------------------------------------------------
def reference_masked_mse(prediction, target, mask, norm_pix_loss):
    errors = []
    for pred_row, target_row, mask_row in zip(np64(prediction), np64(target), np64(mask), strict=True):
        for pred, patch, masked in zip(pred_row, target_row, mask_row, strict=True):
            if not masked:
                continue
            if norm_pix_loss:
                mean = patch.sum() / len(patch)
                unbiased_var = ((patch - mean) ** 2).sum() / (len(patch) - 1)
                patch = (patch - mean) / math.sqrt(unbiased_var + 1e-6)
            errors.append(((pred - patch) ** 2).sum() / len(patch))
    return float(np.mean(errors))


def mae_tensors(gen, batch=3, length=6, patch_dim=4):
    prediction = torch.randn(batch, length, patch_dim, generator=gen)
    target = 3.0 * torch.randn(batch, length, patch_dim, generator=gen) + 1.0
    target[0, 0] = 0.5 + 1e-3 * torch.randn(patch_dim, generator=gen)  # variance ~ eps: where eps must sit matters
    mask = torch.zeros(batch, length)
    for row, masked in enumerate(([0, 2, 3], [1], [0, 1, 4, 5])):
        mask[row, masked] = 1.0
    return prediction, target, mask


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_masked_patch_mse_is_mae_loss_on_masked_patches(gen, norm_pix_loss):
    prediction, target, mask = mae_tensors(gen)
    loss = masked_patch_mse(prediction, target, mask, norm_pix_loss=norm_pix_loss)
    assert loss.item() == pytest.approx(reference_masked_mse(prediction, target, mask, norm_pix_loss), rel=1e-4)


def test_masked_patch_mse_ignores_visible_patches(gen):
    prediction, target, mask = mae_tensors(gen)
    changed = torch.where(mask.bool().unsqueeze(-1), prediction, prediction + 100.0)
    torch.testing.assert_close(masked_patch_mse(changed, target, mask), masked_patch_mse(prediction, target, mask))


# ---- masking utilities ----------------------------------------------------------------------------------------------
def position_tokens(batch, length, dim=3):
    """Token (b, l) holds the value 1000 * b + l in every channel, so a token tells where it came from."""
    values = 1000 * torch.arange(batch).view(-1, 1) + torch.arange(length).view(1, -1)
    return values.unsqueeze(-1).expand(-1, -1, dim).float()


@pytest.mark.parametrize(("length", "ratio"), [(49, 0.75), (16, 0.5), (10, 0.6), (64, 0.9)])
def test_random_masking_keeps_int_l_times_one_minus_ratio(length, ratio):
    torch.manual_seed(0)
    visible, mask, ids_restore = random_masking(position_tokens(8, length), ratio)
    keep = int(length * (1 - ratio))
    assert visible.shape == (8, keep, 3)
    assert mask.shape == ids_restore.shape == (8, length)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [length - keep] * 8
    assert len({tuple(row.tolist()) for row in mask}) > 1


def test_random_masking_visible_tokens_are_those_where_mask_is_zero():
    torch.manual_seed(0)
    tokens = position_tokens(6, 20)
    visible, mask, _ = random_masking(tokens, 0.75)
    for b in range(6):
        kept_positions = sorted(int(v) - 1000 * b for v in visible[b, :, 0])
        assert kept_positions == torch.nonzero(mask[b] == 0).flatten().tolist()


def test_random_masking_keeps_lowest_noise_in_noise_order():
    tokens, noise = position_tokens(2, 8), torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.6]] * 2)
    noise[1] = 1 - noise[1]
    visible, mask, _ = random_masking(tokens, 0.5, noise=noise)
    assert visible[0, :, 0].tolist() == [1, 5, 3, 0]
    assert visible[1, :, 0].tolist() == [1002, 1004, 1006, 1007]
    assert mask.tolist() == [[0, 0, 1, 0, 1, 0, 1, 1], [1, 1, 0, 1, 0, 1, 0, 0]]


def test_ids_restore_puts_tokens_back_in_patch_order():
    """The MAE decoder's use: append placeholders for the masked tokens, then gather with ``ids_restore``."""
    torch.manual_seed(0)
    tokens = position_tokens(4, 12)
    visible, mask, ids_restore = random_masking(tokens, 0.75)
    placeholders = torch.full((4, 12 - visible.shape[1], 3), -1.0)
    shuffled = torch.cat([visible, placeholders], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    expected = torch.where(mask.bool().unsqueeze(-1), torch.full_like(tokens, -1.0), tokens)
    torch.testing.assert_close(restored, expected)


def test_patchify_orders_patches_row_major_and_pixels_p_p_c(gen):
    images, p = torch.randn(2, 3, 8, 12, generator=gen), 4
    patches = patchify(images, p)
    assert patches.shape == (2, 6, p * p * 3)
    for i in range(2):
        for j in range(3):
            block = images[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
            manual = np.stack([np64(block[n]).transpose(1, 2, 0).reshape(-1) for n in range(2)])
            np.testing.assert_array_equal(np64(patches[:, i * 3 + j]), manual)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(images, 5)


def reference_sincos_2d(dim, rows, cols):
    """MAE ``get_2d_sincos_pos_embed``: channels [sin(col ω), cos(col ω), sin(row ω), cos(row ω)],
    ω_i = 10000^(-i / (D/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    emb = np.zeros((rows * cols, dim))
    for r in range(rows):
        for c in range(cols):
            emb[r * cols + c] = np.concatenate(
                [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
            )
    return emb


@pytest.mark.parametrize(("dim", "grid"), [(16, (3, 5)), (192, (8, 8))])
def test_sincos_2d_position_embedding_matches_mae_formula(dim, grid):
    emb = sincos_2d_position_embedding(dim, grid, cls_token=True)
    assert emb.shape == (1 + grid[0] * grid[1], dim) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.zeros(dim))
    np.testing.assert_allclose(np64(emb[1:]), reference_sincos_2d(dim, *grid), atol=1e-6)
    torch.testing.assert_close(sincos_2d_position_embedding(dim, grid), emb[1:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_embedding(dim + 2, grid)


# ---- heads ----------------------------------------------------------------------------------------------------------
def reference_dino_head(head, x):
    """Linear layers with exact GELU between them, L2 normalisation, then the weight-normed ``g * v / ||v||`` layer."""
    h = x.double()
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    for index, linear in enumerate(linears):
        h = h @ linear.weight.double().t() + linear.bias.double()
        if index < len(linears) - 1:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = h / h.pow(2).sum(dim=-1, keepdim=True).sqrt()
    v, g = head.last_layer.weight_v.double(), head.last_layer.weight_g.double()
    weight = g * v / v.pow(2).sum(dim=1, keepdim=True).sqrt()
    return (h @ weight.t()).detach()


def test_dino_head_is_mlp_then_normalise_then_weight_normed_layer(gen):
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=6, nlayers=3, norm_last_layer=False)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 6)]
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0, generator=gen)
        for linear in linears:
            linear.bias.normal_(generator=gen)
    x = torch.randn(5, 8, generator=gen)
    out = head(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.double(), reference_dino_head(head, x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(3.0)
    torch.testing.assert_close(head(x), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_norm_last_layer_freezes_the_norm(gen, norm_last_layer):
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=6, norm_last_layer=norm_last_layer)
    head(torch.randn(4, 8, generator=gen)).pow(2).sum().backward()
    weight_g = head.last_layer.weight_g
    assert weight_g.requires_grad is not norm_last_layer
    assert (weight_g.grad is None) is norm_last_layer
    assert head.last_layer.weight_v.grad.abs().sum() > 0
    if norm_last_layer:
        assert torch.equal(weight_g, torch.ones_like(weight_g))


def test_mlp_head_is_linear_relu_linear(gen):
    head = MLPHead((6, 9, 4))
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (6, 9, 4)
    x = torch.randn(5, 6, generator=gen)
    hidden = (x @ head[0].weight.t() + head[0].bias).clamp(min=0)
    torch.testing.assert_close(head(x), hidden @ head[2].weight.t() + head[2].bias)


@pytest.mark.parametrize(
    "kwargs, layers",
    [
        (
            {"batch_norm": True, "hidden_bias": True, "bias": False},
            [(nn.Linear, True), nn.BatchNorm1d, nn.ReLU, (nn.Linear, False)],
        ),  # BYOL  # fmt: skip
        ({"batch_norm": True, "bias": True}, [(nn.Linear, False), nn.BatchNorm1d, nn.ReLU, (nn.Linear, True)]),
        ({"bias": False}, [(nn.Linear, False), nn.ReLU, (nn.Linear, False)]),
    ],
)
def test_mlp_head_biases_follow_the_options(kwargs, layers):
    head = MLPHead((6, 9, 4), **kwargs)
    assert len(head) == len(layers)
    for module, expected in zip(head, layers, strict=True):
        kind, bias = expected if isinstance(expected, tuple) else (expected, None)
        assert type(module) is kind
        if bias is not None:
            assert (module.bias is not None) is bias


def test_mlp_head_last_bn_without_affine_or_with_a_scale_and_a_zero_bias(gen):
    plain = MLPHead((6, 4), last_bn=True)[-1]
    assert isinstance(plain, nn.BatchNorm1d) and not plain.affine
    head = MLPHead((6, 9, 4), batch_norm=True, bias=False, last_bn=True, last_bn_scale=True)
    scaled = head[-1]
    assert scaled.weight.requires_grad and not scaled.bias.requires_grad and torch.equal(scaled.bias, torch.zeros(4))
    head(torch.randn(8, 6, generator=gen)).sum().backward()
    assert scaled.weight.grad is not None and scaled.bias.grad is None


# ---- SimCLR NT-Xent (arXiv 2002.05709, eq. 1) ------------------------------------------------------------------------
def reference_nt_xent(z1, z2, temperature):
    """Eq. 1 with explicit loops: 2N unit vectors, l(i, j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), mean over the
    2N (anchor, positive) pairs."""
    z = np.concatenate([np64(z1), np64(z2)])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(z[i] @ z[k] / temperature) for k in range(2 * n) if k != i)
        losses.append(-math.log(math.exp(z[i] @ z[j] / temperature) / denominator))
    return float(np.mean(losses))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_is_simclr_eq1(gen, temperature):
    z1, z2 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(reference_nt_xent(z1, z2, temperature), rel=1e-5)


def test_nt_xent_of_local_anchors_against_the_global_batch_averages_to_the_global_loss(gen):
    """Across processes each rank contrasts its anchors with every rank's projections; the mean of the ranks'
    losses (DDP's gradient average) is the loss of the whole batch, gradients included."""
    z1 = torch.randn(8, 5, generator=gen, requires_grad=True)
    z2 = torch.randn(8, 5, generator=gen, requires_grad=True)
    whole = nt_xent(z1, z2, 0.2)
    (grad1, grad2) = torch.autograd.grad(whole, (z1, z2))
    ranks = [nt_xent(z1[r * 4 : r * 4 + 4], z2[r * 4 : r * 4 + 4], 0.2, z1, z2, offset=r * 4) for r in range(2)]
    split = sum(ranks) / 2
    torch.testing.assert_close(split, whole)
    for split_grad, grad in zip(torch.autograd.grad(split, (z1, z2)), (grad1, grad2), strict=True):
        torch.testing.assert_close(split_grad, grad)


# ---- SimSiam (arXiv 2011.10566, eq. 1) and BYOL (arXiv 2006.07733, eq. 2) --------------------------------------------
def test_negative_cosine_is_simsiam_d_with_stop_gradient(gen):
    p = torch.randn(4, 7, generator=gen, requires_grad=True)
    z = torch.randn(4, 7, generator=gen, requires_grad=True)
    expected = -np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(np64(p), np64(z), strict=True)])
    loss = negative_cosine(p, z)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None


def test_normalized_mse_is_byol_eq2(gen):
    p = torch.randn(4, 7, generator=gen, requires_grad=True)
    z = torch.randn(4, 7, generator=gen, requires_grad=True)
    expected = np.mean(
        [((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2).sum() for a, b in zip(np64(p), np64(z), strict=True)]
    )
    loss = normalized_mse(p, z)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None


# ---- Barlow Twins (arXiv 2103.03230, eq. 1-2) ------------------------------------------------------------------------
def reference_cross_correlation(z1, z2, eps=1e-5):
    """Eq. 2 with the official code's normalisation: each dimension standardised over the batch (BatchNorm without
    affine: biased variance), then C_ij = Σ_b a_bi c_bj / N."""
    a, c = np64(z1), np64(z2)
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + eps)
    c = (c - c.mean(0)) / np.sqrt(c.var(0) + eps)
    n, d = a.shape
    return np.array([[sum(a[b, i] * c[b, j] for b in range(n)) / n for j in range(d)] for i in range(d)])


def test_barlow_twins_is_eq1_on_the_batch_normalised_cross_correlation(gen):
    z1, z2 = torch.randn(10, 4, generator=gen) * 3 + 1, torch.randn(10, 4, generator=gen)
    c = reference_cross_correlation(z1, z2)
    np.testing.assert_allclose(np64(cross_correlation(z1, z2)), c, rtol=1e-5, atol=1e-6)
    on = sum((1 - c[i, i]) ** 2 for i in range(4))
    off = sum(c[i, j] ** 2 for i in range(4) for j in range(4) if i != j)
    assert barlow_twins(z1, z2, 0.0051).item() == pytest.approx(on + 0.0051 * off, rel=1e-5)
    assert redundancy_reduction(torch.eye(4), 0.5).item() == 0.0


# ---- SwAV swapped prediction (arXiv 2006.09882, eq. 1-3) -------------------------------------------------------------
def test_sinkhorn_codes_have_uniform_prototype_marginals_and_rows_summing_to_one(gen):
    cosines = (
        F.normalize(torch.randn(12, 4, generator=gen), dim=1) @ F.normalize(torch.randn(6, 4, generator=gen), dim=1).T
    )
    codes = sinkhorn_knopp(cosines, 0.05, iterations=500)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))
    torch.testing.assert_close(codes.sum(dim=0), torch.full((6,), 2.0), rtol=1e-3, atol=1e-3)


def test_swapped_prediction_is_swav_eq1_over_every_other_crop(gen):
    scores = [torch.randn(3, 5, generator=gen, requires_grad=True) for _ in range(4)]
    codes = [torch.softmax(torch.randn(3, 5, generator=gen), dim=1) for _ in range(2)]
    expected = []
    for code, crop in zip(codes, (0, 1), strict=True):
        terms = []
        for v, score in enumerate(scores):
            if v == crop:
                continue
            p = np.array([softmax(row / 0.1) for row in np64(score)])
            terms.append(np.mean([-(q * np.log(row)).sum() for q, row in zip(np64(code), p, strict=True)]))
        expected.append(np.mean(terms))
    loss = swapped_prediction(scores, codes, 0.1, assigned=(0, 1))
    assert loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-5)
    loss.backward()
    assert all(score.grad is not None for score in scores)


# ---- contrastive-loss variants (DCL, HCL, FlatNCE, alignment / uniformity) -------------------------------------------


def pairs_reference(z1, z2, temperature):
    """Per anchor k of the 2N (view 1 then view 2): (positive logit, [negative logits]) from explicit loops."""
    u = [F.normalize(z, dim=1).double().numpy() for z in (z1, z2)]
    n = u[0].shape[0]
    rows = []
    for view in range(2):
        for i in range(n):
            anchor = u[view][i]
            pos = float(anchor @ u[1 - view][i]) / temperature
            negs = [float(anchor @ u[v][j]) / temperature for v in range(2) for j in range(n) if (v, j) not in
                    ((view, i), (1 - view, i))]  # fmt: skip
            rows.append((pos, negs))
    return rows


def dcl_reference(z1, z2, temperature, tau_plus, beta=None):
    """DCL eq. 6 (HCL with weights exp(β n) normalised by their mean) with the official Nn·e^{-1/τ} clamp."""
    total = 0.0
    rows = pairs_reference(z1, z2, temperature)
    for pos, negs in rows:
        count = len(negs)
        if beta is None:
            neg_sum = sum(math.exp(n) for n in negs)
        else:
            weights = [math.exp(beta * n) for n in negs]
            mean_weight = sum(weights) / count
            neg_sum = sum(w * math.exp(n) for w, n in zip(weights, negs, strict=True)) / mean_weight
        g = (neg_sum - tau_plus * count * math.exp(pos)) / (1 - tau_plus)
        g = max(g, count * math.exp(-1 / temperature))
        total += -math.log(math.exp(pos) / (math.exp(pos) + g))
    return total / len(rows)


def random_views(seed, n=5, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.3])
def test_debiased_nt_xent_is_dcl_eq_6_with_the_official_clamp(tau_plus):
    z1, z2 = random_views(0)
    expected = dcl_reference(z1, z2, 0.5, tau_plus)
    assert debiased_nt_xent(z1, z2, 0.5, tau_plus).item() == pytest.approx(expected, rel=1e-5)


def test_debiased_nt_xent_clamps_the_negative_term_at_nn_exp_minus_one_over_tau():
    """Identical views with a large τ+: the debiased estimate is negative and the clamp decides the value."""
    z1, _ = random_views(1)
    expected = dcl_reference(z1, z1, 0.5, 0.9)
    pos = 1 / 0.5
    count = 2 * z1.shape[0] - 2
    assert expected == pytest.approx(-math.log(math.exp(pos) / (math.exp(pos) + count * math.exp(-2))))
    assert debiased_nt_xent(z1, z1, 0.5, 0.9).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("tau_plus", "beta"), [(0.0, 0.5), (0.1, 1.0), (0.1, 3.0)])
def test_hard_negative_nt_xent_is_hcl_with_importance_weights(tau_plus, beta):
    z1, z2 = random_views(2)
    expected = dcl_reference(z1, z2, 0.5, tau_plus, beta)
    assert hard_negative_nt_xent(z1, z2, 0.5, tau_plus, beta).item() == pytest.approx(expected, rel=1e-5)


def test_flat_nce_value_is_one_and_its_gradient_is_the_papers():
    """Algorithm 1: the gradient is E_anchor Σ_k softmax_k(n - p) ∇(n_k - p), written out with a loop."""
    z1, z2 = (z.requires_grad_() for z in random_views(3))
    loss = flat_nce(z1, z2, 0.5)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    r1, r2 = (z.detach().clone().requires_grad_() for z in (z1, z2))
    u = [F.normalize(r, dim=1) for r in (r1, r2)]
    n = r1.shape[0]
    surrogate = 0
    for view in range(2):
        for i in range(n):
            pos = u[view][i] @ u[1 - view][i] / 0.5
            negs = torch.stack([u[view][i] @ u[v][j] / 0.5 for v in range(2) for j in range(n) if (v, j) not in
                                ((view, i), (1 - view, i))])  # fmt: skip
            weights = torch.softmax(negs - pos, dim=0).detach()
            surrogate = surrogate + (weights * (negs - pos)).sum()
    (surrogate / (2 * n)).backward()
    torch.testing.assert_close(z1.grad, r1.grad)
    torch.testing.assert_close(z2.grad, r2.grad)


@pytest.mark.parametrize(
    "loss",
    [
        lambda *a: debiased_nt_xent(*a[:3], 0.1, *a[3:]),
        lambda *a: hard_negative_nt_xent(*a[:3], 0.1, 1.0, *a[3:]),
        lambda *a: flat_nce(*a),
    ],
)
def test_variants_with_gathered_negatives_equal_the_single_process_form(loss):
    """Two processes holding halves of the batch: the mean of their losses over the gathered rows is the global loss;
    FlatNCE (value 1) is compared on its gradient."""
    z1, z2 = (z.requires_grad_() for z in random_views(4, n=6))
    local = [loss(z1[h], z2[h], 0.5, z1, z2, h.start) for h in (slice(0, 3), slice(3, 6))]
    local_grad = torch.autograd.grad(sum(local) / 2, (z1, z2))
    whole = loss(z1, z2, 0.5)
    torch.testing.assert_close(sum(local) / 2, whole)
    for actual, expected in zip(local_grad, torch.autograd.grad(whole, (z1, z2)), strict=True):
        torch.testing.assert_close(actual, expected)


def test_alignment_and_uniformity_are_wang_and_isola_eq_4_and_5():
    z1, z2 = random_views(5)
    u1, u2 = (F.normalize(z, dim=1).double().numpy() for z in (z1, z2))
    n = u1.shape[0]
    for alpha in (1, 2):
        expected = sum(np.linalg.norm(u1[i] - u2[i]) ** alpha for i in range(n)) / n
        assert alignment_loss(z1, z2, alpha).item() == pytest.approx(expected, rel=1e-5)
    for t in (1, 2):
        kernel = [math.exp(-t * np.sum((u1[i] - u1[j]) ** 2)) for i in range(n) for j in range(i + 1, n)]
        assert uniformity_loss(z1, t).item() == pytest.approx(math.log(sum(kernel) / len(kernel)), rel=1e-5)
