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
from sslhub.losses import dino_cross_entropy, info_nce_with_queue, masked_patch_mse
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
