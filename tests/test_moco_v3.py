"""MoCo v3 (arXiv 2104.02057, facebookresearch/moco-v3) and the LARS optimizer its ResNet recipe uses.

Each test checks one rule of the paper / official code against numbers computed here: the 2τ-scaled symmetric
contrastive loss, the momentum schedule and update (applied by the trainer through ``momentum_pairs`` /
``momentum_at``), the MLP layouts, the ViT changes (frozen patch projection, fixed
sin-cos position embedding, 12 heads), the optimizer recipes, the LARS update, the released encoder and a short run
of the trainer.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build, params, perturb_
from torch import nn
from torchvision.transforms import v2

import sslhub
from sslhub.batch import Batch
from sslhub.losses import moco_v3_contrastive
from sslhub.methods import TrainingProgress
from sslhub.methods.base import update_momentum_pairs
from sslhub.optim import LARS
from sslhub.training import PretrainArguments, build_optimizer, pretrain

BATCH = 4
SMALL = {"mlp_hidden_dim": 32, "embed_dim": 16}
BASE, MOMENTUM = ("base_encoder.", "base_projector."), ("momentum_encoder.", "momentum_projector.")


pytestmark = pytest.mark.usefixtures("single_thread")


def build_vit(**overrides):
    return build("moco_v3_vit_tiny_patch4_32px", backbone_kwargs={"depth": 1}, **SMALL, **overrides)


def build_resnet(**overrides):
    return build("moco_v3_resnet50", backbone="resnet18", image_size=32, **SMALL, **overrides)


BUILDERS = pytest.mark.parametrize("builder", [build_vit, build_resnet], ids=["vit", "resnet"])


def views(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    return [x, x + 0.1 * torch.randn(BATCH, 3, 32, 32, generator=gen)]


def batch(seed=0):
    return Batch.of(views(seed))


def momentum_name_to_base(name):
    return name.replace("momentum_", "base_", 1)


# ---- the loss (eq. 1, Algorithm 1) ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("temperature", "offset"), [(0.2, 0), (1.0, 3)])
def test_moco_v3_contrastive_is_2tau_times_cross_entropy_with_positives_at_offset(temperature, offset):
    gen = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(3, 8, generator=gen), dim=1)
    keys = F.normalize(torch.randn(6, 8, generator=gen), dim=1)  # keys of 2 processes; this one is rank offset / 3
    q, k = query.double().numpy(), keys.double().numpy()
    losses = []
    for i in range(3):
        terms = [math.exp(q[i] @ k[j] / temperature) for j in range(6)]
        losses.append(-math.log(terms[i + offset] / sum(terms)))
    expected = 2 * temperature * float(np.mean(losses))
    assert moco_v3_contrastive(query, keys, temperature, offset).item() == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def outputs(method, x):
    """Predictions of the base branch and keys of the momentum branch, recomputed with the current weights."""
    query = method.predictor(method.base_projector(method.base_encoder(x)))
    return query, method.momentum_projector(method.momentum_encoder(x))


@BUILDERS
def test_loss_is_symmetrised_ctr_of_predictions_against_momentum_keys(builder):
    method = builder(temperature=0.3).method.train()
    perturb_(method, MOMENTUM)
    x1, x2 = views()
    loss = method(Batch.of([x1, x2])).loss
    (q1, k1), (q2, k2) = outputs(method, x1), outputs(method, x2)

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.3
        return -logits.log_softmax(dim=1).diagonal().mean() * 2 * 0.3

    torch.testing.assert_close(loss, ctr(q1, k2) + ctr(q2, k1))


# ---- momentum encoder -----------------------------------------------------------------------------------------------
def test_momentum_follows_half_cosine_from_moco_m_to_1_per_iteration():
    """``adjust_moco_momentum`` at fractional epoch ``epoch + i / iters``, which the official code uses to update the
    momentum encoder at the start of iteration i: sslhub's trainer applies it after the optimizer step before, as
    ``momentum_at`` of that step. ``on_step_start`` sets the logged ``momentum`` of iteration i."""
    method = build_vit(momentum=0.99).method
    epochs, iters = 50, 10
    for epoch, i in ((0, 0), (0, 1), (0, 3), (13, 7), (25, 0), (49, 9)):
        step = epoch * iters + i
        fractional_epoch = epoch + i / iters
        expected = 1 - 0.5 * (1 + math.cos(math.pi * fractional_epoch / epochs)) * (1 - 0.99)  # adjust_moco_momentum
        if step > 0:
            assert method.momentum_at(TrainingProgress(step - 1, epochs * iters, iters)) == pytest.approx(
                expected, abs=1e-12
            )
        method.on_step_start(TrainingProgress(step, epochs * iters, iters))
        assert method.momentum == pytest.approx(expected, abs=1e-12)
    constant = build_vit(momentum=0.99, momentum_cosine=False).method
    assert constant.momentum_at(TrainingProgress(137, 500, 10)) == 0.99
    constant.on_step_start(TrainingProgress(137, 500, 10))
    assert constant.momentum == 0.99


@BUILDERS
def test_momentum_encoder_is_ema_of_base_encoder_and_projector_and_predictor_has_no_twin(builder):
    """θ_k ← m θ_k + (1 - m) θ_q over the backbone and the projector, applied by the trainer after each optimizer step
    with ``momentum_at``; the forward pass itself moves no weight."""
    method = builder(momentum=0.9, momentum_cosine=False).method.train()
    perturb_(method, MOMENTUM)
    base, momentum, predictor = params(method, BASE), params(method, MOMENTUM), params(method, ("predictor.",))
    assert {momentum_name_to_base(n) for n in momentum} == set(base)  # backbone + projector, nothing else
    assert predictor and not any("predictor" in n for n in momentum)
    method(batch())
    for name, value in params(method, BASE + MOMENTUM + ("predictor.",)).items():
        assert torch.equal(value, {**base, **momentum, **predictor}[name]), name
    m = method.momentum_at(TrainingProgress(3, 100, 10))
    assert m == 0.9
    update_momentum_pairs(method.momentum_pairs(), m)
    expected = {n: 0.9 * v + 0.1 * base[momentum_name_to_base(n)] for n, v in momentum.items()}
    for name, value in params(method, MOMENTUM).items():
        torch.testing.assert_close(value, expected[name], msg=name)
    for name, value in params(method, BASE + ("predictor.",)).items():
        torch.testing.assert_close(value, {**base, **predictor}[name], msg=name)


def test_eval_forward_does_not_update_the_momentum_encoder():
    method = build_vit().method
    perturb_(method, MOMENTUM)
    momentum = params(method, MOMENTUM)
    method.eval()(batch())
    for name, value in params(method, MOMENTUM).items():
        assert torch.equal(value, momentum[name]), name


@BUILDERS
def test_gradients_reach_base_encoder_and_predictor_but_not_momentum_encoder(builder):
    method = builder().method.train()
    method(batch()).loss.backward()
    for name, p in method.named_parameters():
        if name.startswith(MOMENTUM):
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad.abs().sum() > 0 for p in method.predictor.parameters())
    assert method.base_projector[0].weight.grad.abs().sum() > 0
    first_trainable = next(p for p in method.base_encoder.parameters() if p.requires_grad)  # ResNet conv1, ViT cls
    assert first_trainable.grad.abs().sum() > 0
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    assert not any(id(p) in trainable for n, p in method.named_parameters() if n.startswith(MOMENTUM))


# ---- architecture ---------------------------------------------------------------------------------------------------
def layout(head):
    return [(type(m).__name__, getattr(m, "bias", None) is not None or getattr(m, "affine", False)) for m in head]


LINEAR, BN, BN_NO_AFFINE, RELU = ("Linear", False), ("BatchNorm1d", True), ("BatchNorm1d", False), ("ReLU", False)


@pytest.mark.parametrize(
    ("builder", "projector", "predictor"),
    [
        (build_resnet, [LINEAR, BN, RELU, LINEAR, BN_NO_AFFINE], [LINEAR, BN, RELU, LINEAR]),
        (
            build_vit,
            [LINEAR, BN, RELU, LINEAR, BN, RELU, LINEAR, BN_NO_AFFINE],
            [LINEAR, BN, RELU, LINEAR, BN_NO_AFFINE],
        ),
    ],
    ids=["resnet", "vit"],
)
def test_mlps_follow_build_mlp_index_by_index(builder, projector, predictor):
    method = builder().method
    assert layout(method.base_projector) == projector and layout(method.momentum_projector) == projector
    assert layout(method.predictor) == predictor
    feature_dim = method.base_encoder.backbone.num_features
    assert method.base_projector[0].in_features == feature_dim and method.base_projector[0].out_features == 32
    assert method.base_projector[-2 if projector[-1][0] == "BatchNorm1d" else -1].out_features == 16
    assert (method.predictor[0].in_features, method.predictor[3].out_features) == (16, 16)


def moco_v3_sincos(dim, grid):
    """``vits.build_2d_sincos_position_embedding`` written out: token (row r, column c) of the row-major patch grid
    gets [sin(r ω), cos(r ω), sin(c ω), cos(c ω)] with ω_d = 10000^(-d / (dim/4)); the class token zeros."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    rows = [np.zeros(dim)]
    for r in range(grid):
        for c in range(grid):
            rows.append(np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)]))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def test_vit_has_frozen_random_patch_projection_and_fixed_sincos_position_embedding():
    method = build_vit().method
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    for encoder in (method.base_encoder.backbone, method.momentum_encoder.backbone):
        torch.testing.assert_close(encoder.pos_embed[0], moco_v3_sincos(192, 8))
        proj = encoder.patch_embed.proj
        for frozen in (encoder.pos_embed, proj.weight, proj.bias):
            assert not frozen.requires_grad and id(frozen) not in trainable
        bound = math.sqrt(6 / (3 * 4 * 4 + 192))  # xavier-uniform over 3·p·p + D, as vits.py
        assert 0.9 * bound < proj.weight.abs().max() <= bound and not proj.bias.any()
    assert method.base_encoder.backbone.blocks[0].attn.qkv.weight.requires_grad
    unfrozen = build_vit(stop_grad_conv1=False).method
    assert unfrozen.base_encoder.backbone.patch_embed.proj.weight.requires_grad


def test_vit_small_preset_has_12_heads_in_training_and_in_the_released_encoder():
    model = build("moco_v3_vit_small_patch16_224", backbone_kwargs={"depth": 1}, **SMALL)
    assert model.method.base_encoder.backbone.blocks[0].attn.num_heads == 12
    assert model.method.momentum_encoder.backbone.blocks[0].attn.num_heads == 12
    assert model.released_model().encoder.backbone.blocks[0].attn.num_heads == 12


# ---- optimisation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("builder", "optimizer", "weight_decay"), [(build_resnet, LARS, 1e-6), (build_vit, torch.optim.AdamW, 0.1)]
)
def test_optimizer_recipe_decays_every_trainable_parameter(builder, optimizer, weight_decay):
    """``main_moco.py`` hands ``model.parameters()`` to LARS / AdamW: one group, norms and biases included."""
    method = builder().method
    built = build_optimizer(method, lr=0.1)
    assert type(built) is optimizer and len(built.param_groups) == 1
    assert built.param_groups[0]["weight_decay"] == weight_decay
    expected = {id(p) for p in method.parameters() if p.requires_grad}
    assert {id(p) for p in built.param_groups[0]["params"]} == expected


def reference_lars(weights, grads_per_step, lr, weight_decay, momentum, eta):
    """LARS (moco-v3 ``moco/optimizer.py``) in numpy: for ndim > 1, u = g + λw, u *= η||w|| / ||u|| (1 if a norm is
    0); 1-D parameters take u = g. Then μ = m μ + u, w -= lr μ."""
    weights = [w.double().numpy().copy() for w in weights]
    velocity = [np.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for w, g, mu in zip(weights, grads, velocity, strict=True):
            g = g.double().numpy()
            if w.ndim > 1:
                u = g + weight_decay * w
                w_norm, u_norm = np.sqrt((w**2).sum()), np.sqrt((u**2).sum())
                u = u * (eta * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            else:
                u = g
            mu *= momentum
            mu += u
            w -= lr * mu
    return weights


def test_lars_update_is_the_written_out_formula():
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen), torch.zeros(3, 2)]
    params_ = [nn.Parameter(w.clone()) for w in initial]
    optimizer = LARS(params_, lr=0.7, weight_decay=0.05, momentum=0.9, eta=0.001)
    grads_per_step = [[torch.randn(w.shape, generator=gen) for w in initial] for _ in range(3)]
    for grads in grads_per_step:
        for p, g in zip(params_, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    expected = reference_lars(initial, grads_per_step, 0.7, 0.05, 0.9, 0.001)
    for p, w in zip(params_, expected, strict=True):
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=1e-5, atol=1e-7)
    assert not torch.equal(params_[2].detach(), torch.zeros(3, 2))  # zero weight: trust ratio 1, plain step


# ---- released encoder, views, trainer -------------------------------------------------------------------------------
@BUILDERS
def test_released_model_is_the_base_backbone_without_projector(builder):
    model = builder()
    perturb_(model.method, ("momentum_encoder.",))
    assert model.method.released_encoder is model.method.base_encoder
    released = model.released_model().encoder.state_dict()
    base = model.method.base_encoder.state_dict()
    momentum = model.method.momentum_encoder.state_dict()
    assert released.keys() == base.keys()
    for name, value in released.items():
        assert torch.equal(value, base[name]), name
    assert any(not torch.equal(value, momentum[name]) for name, value in released.items())


@pytest.mark.parametrize(("builder", "scale"), [(build_vit, (0.08, 1.0)), (build_resnet, (0.2, 1.0))])
def test_views_are_the_byol_pair_with_the_recipes_crop_scale(builder, scale):
    """CONFIG.md: ``--crop-min=.2`` for ResNet-50, the default 0.08 for ViTs; only the second view is solarised."""
    first, second = builder().method.view_recipe().transforms
    assert first.transforms[0].scale == second.transforms[0].scale == scale
    assert [type(t) for t in second.transforms].count(v2.RandomSolarize) == 1
    assert v2.RandomSolarize not in [type(t) for t in first.transforms]


def test_pretrain_runs_moco_v3_on_builtin_data(tmp_path):
    args = PretrainArguments(
        model="moco_v3_vit_tiny_patch4_32px",
        output_dir=str(tmp_path),
        batch_size=32,
        max_steps=2,
        knn_every=0,
        log_with=None,
        progress=False,
        overrides={"mlp_hidden_dim": 64, "backbone_kwargs": {"depth": 2}},
    )
    result = pretrain(args)
    assert result.steps == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    encoder = sslhub.from_pretrained(tmp_path)
    base = result.model.method.base_encoder.backbone.state_dict()
    for name, value in encoder.encoder.backbone.state_dict().items():
        assert torch.equal(value, base[name]), name
