"""The objectives (MoCo v1/v2, DINO, MAE) built through ``sslhub.create_model(preset, task="pretraining")``.

Each test checks one rule of the paper / official code against numbers computed here: the momentum updates, the
queue, the center, the schedules, the gradient edits, the released encoder, the MAE forward pass, and that one
optimisation step lowers the loss on a fixed batch. The loss equations themselves are checked in test_losses.py;
here they are only given the tensors the method should feed them.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build, params, perturb_
from torch import nn
from torchvision.transforms import v2

from sslhub.losses import dino_cross_entropy, info_nce_with_queue, masked_patch_mse
from sslhub.masking import patchify, sincos_2d_position_embedding
from sslhub.methods import TrainingProgress

BATCH = 4
SHALLOW = {"depth": 2}  # 2 of ViT-Tiny's 12 blocks: same code paths, a sixth of the time


pytestmark = pytest.mark.usefixtures("single_thread")


def build_moco(**overrides):
    return build("moco_v2_resnet18_32px", queue_size=64, **overrides)


def build_dino(**overrides):
    return build(
        "dino_vit_tiny_patch4_32px", out_dim=256, hidden_dim=64, bottleneck_dim=32, backbone_kwargs=SHALLOW, **overrides
    )


def build_mae(**overrides):
    return build("mae_vit_tiny_patch4_32px", backbone_kwargs=SHALLOW, **overrides)


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def moco_views():
    x = images(BATCH, 3, 32, 32)
    return [x, x + 0.1 * images(BATCH, 3, 32, 32, seed=1)]


def dino_views():
    """Two 32 px global crops and two 16 px local crops."""
    x = images(BATCH, 3, 32, 32)
    return [x, x.flip(-1), x[..., 8:24, 8:24], x[..., :16, 16:]]


def assert_params_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def progress(epoch, step_in_epoch=0, steps_per_epoch=10, epochs=50):
    return TrainingProgress(epoch * steps_per_epoch + step_in_epoch, epochs * steps_per_epoch, steps_per_epoch)


def assert_one_step_lowers_loss(method, optimizer, views, measure, **forward_kwargs):
    before = measure()
    method.train()
    optimizer.zero_grad()
    method(views, **forward_kwargs).loss.backward()
    optimizer.step()
    after = measure()
    assert after < 0.99 * before, (before, after)


# ---- MoCo v2 --------------------------------------------------------------------------------------------------------
QUERY, KEY = ("encoder_q.", "head_q."), ("encoder_k.", "head_k.")


def key_name_to_query(name):
    return name.replace("_k.", "_q.", 1)


@torch.no_grad()
def moco_embeddings(method, views):
    """Normalised query and key embeddings, recomputed in the method's current mode."""
    query = F.normalize(method.head_q(method.encoder_q(views[0])), dim=1)
    key = F.normalize(method.head_k(method.encoder_k(views[1])), dim=1)
    return query, key


def test_moco_key_encoder_is_momentum_update_of_query_encoder():
    method = build_moco(momentum=0.9).method.train()
    perturb_(method, KEY)
    query, key = params(method, QUERY), params(method, KEY)
    method(moco_views())
    expected_key = {n: 0.9 * k + 0.1 * query[key_name_to_query(n)] for n, k in key.items()}
    assert_params_equal(params(method, KEY), expected_key)
    assert_params_equal(params(method, QUERY), query)


def test_moco_loss_is_info_nce_of_updated_keys_against_the_queue_before_enqueue():
    method = build_moco(temperature=0.3).method.train()
    perturb_(method, KEY)
    queue = method.queue.clone()
    loss = method(moco_views()).loss
    query, key = moco_embeddings(method, moco_views())
    torch.testing.assert_close(loss, info_nce_with_queue(query, key, queue, 0.3))


@pytest.mark.parametrize("start", [0, 62])
def test_moco_enqueues_normalised_keys_at_pointer_with_wrap_around(start):
    method = build_moco().method.train()
    method.queue_ptr.fill_(start)
    queue = method.queue.clone()
    method(moco_views())
    _, key = moco_embeddings(method, moco_views())
    written = [(start + i) % 64 for i in range(BATCH)]
    torch.testing.assert_close(method.queue[written], key)
    torch.testing.assert_close(method.queue[written].norm(dim=1), torch.ones(BATCH))
    untouched = [i for i in range(64) if i not in written]
    assert torch.equal(method.queue[untouched], queue[untouched])
    assert method.queue_ptr.item() == (start + BATCH) % 64


def test_moco_eval_forward_changes_no_state():
    method = build_moco().method
    perturb_(method, KEY)
    method.queue_ptr.fill_(5)
    state = copy.deepcopy(method.state_dict())
    method.eval()(moco_views())
    assert_params_equal(method.state_dict(), state)


def test_moco_v1_is_moco_with_a_linear_projection_temperature_007_and_v1_views():
    """``main_moco.py`` without ``--mlp --aug-plus --cos``: fc 512 -> 128 with bias (``head_q.0``), τ = 0.07."""
    method = build("moco_v1_resnet18", image_size=32, queue_size=64).method.train()
    for head in (method.head_q, method.head_k):
        assert [type(m) for m in head] == [nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[0].bias is not None) == (512, 128, True)
    perturb_(method, KEY)
    queue = method.queue.clone()
    loss = method(moco_views()).loss
    query, key = moco_embeddings(method, moco_views())
    torch.testing.assert_close(loss, info_nce_with_queue(query, key, queue, 0.07))
    view = method.view_transform().transforms[0]
    assert [type(t) for t in view.transforms[:4]] == [
        v2.RandomResizedCrop, v2.RandomGrayscale, v2.ColorJitter, v2.RandomHorizontalFlip
    ]  # fmt: skip


# ---- DINO -----------------------------------------------------------------------------------------------------------
STUDENT, TEACHER = ("student.", "student_head."), ("teacher.", "teacher_head.")


def teacher_name_to_student(name):
    return name.replace("teacher", "student", 1)


@torch.no_grad()
def dino_outputs(method, views):
    teacher = [method.teacher_head(method.teacher(v)) for v in views[:2]]
    student = [method.student_head(method.student(v)) for v in views]
    return student, teacher


def test_dino_forward_uses_center_and_teacher_temperature_then_updates_center():
    method = build_dino(drop_path_rate=0.0, center_momentum=0.8, warmup_teacher_temp_epochs=11).method.train()
    perturb_(method, STUDENT)
    center = 0.1 * images(1, 256, seed=2)
    method.center.copy_(center)
    method.on_step_start(progress(epoch=3))
    teacher_before = params(method, TEACHER)
    loss = method(dino_views()).loss
    student, teacher = dino_outputs(method, dino_views())
    temperature = 0.04 + 3 * (0.07 - 0.04) / 10  # epoch 3 of a linear warm-up reaching 0.07 at epoch 10
    torch.testing.assert_close(loss, dino_cross_entropy(student, teacher, center, 0.1, temperature))
    torch.testing.assert_close(method.center, 0.8 * center + 0.2 * torch.cat(teacher).mean(dim=0, keepdim=True))
    assert_params_equal(params(method, TEACHER), teacher_before)
    loss.backward()
    assert all(p.grad is None for n, p in method.named_parameters() if n.startswith(TEACHER))
    assert method.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_dino_teacher_is_ema_of_student_in_on_step_end():
    method = build_dino().method
    perturb_(method, STUDENT)
    student, teacher = params(method, STUDENT), params(method, TEACHER)
    method.teacher_momentum = 0.7
    method.on_step_end(progress(epoch=1))
    expected = {n: 0.7 * t + 0.3 * student[teacher_name_to_student(n)] for n, t in teacher.items()}
    assert_params_equal(params(method, TEACHER), expected)
    assert_params_equal(params(method, STUDENT), student)


def test_dino_teacher_temperature_warms_up_linearly_then_stays():
    method = build_dino(warmup_teacher_temp_epochs=30).method
    expected = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(20, 0.07)])  # main_dino.DINOLoss
    assert [method.teacher_temperature_at(e) for e in range(50)] == pytest.approx(expected.tolist(), abs=1e-9)
    for epoch in (0, 12, 29, 45):
        method.on_step_start(progress(epoch, step_in_epoch=7))
        assert method.teacher_temperature == pytest.approx(expected[epoch], abs=1e-9)


def test_dino_teacher_momentum_follows_cosine_from_0996_to_1():
    method = build_dino().method
    total = 50 * 10
    for step in (0, 1, 137, 250, total - 1):
        method.on_step_start(TrainingProgress(step, total, 10))
        expected = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * step / total))  # utils.cosine_scheduler
        assert method.teacher_momentum == pytest.approx(expected, abs=1e-12)


def set_gradients(method, norms):
    """Give every trainable student parameter a random gradient of the next norm in ``norms`` (cycled)."""
    gen, grads = torch.Generator().manual_seed(3), {}
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    for i, (name, p) in enumerate(trainable):
        g = torch.randn(p.shape, generator=gen)
        p.grad = g * norms[i % len(norms)] / g.norm()
        grads[name] = p.grad.clone()
    return grads


@pytest.mark.parametrize(("epoch", "frozen"), [(0, True), (1, False)])
def test_dino_last_layer_gradient_cancelled_in_first_epoch(epoch, frozen):
    method = build_dino().method
    grads = set_gradients(method, [1.0])
    method.on_before_optimizer_step(progress(epoch, step_in_epoch=4))
    last_layer = method.student_head.last_layer.weight_v
    assert (last_layer.grad is None) is frozen
    if not frozen:
        torch.testing.assert_close(last_layer.grad, grads["student_head.last_layer.weight_v"])
    torch.testing.assert_close(method.student_head.mlp[0].weight.grad, grads["student_head.mlp.0.weight"])


def test_dino_clips_each_parameter_gradient_to_norm_3():
    method = build_dino().method
    grads = set_gradients(method, [0.5, 10.0, 2.9, 4.0])
    method.on_before_optimizer_step(progress(epoch=1))
    for name, p in method.named_parameters():
        if name in grads:
            scale = min(1.0, 3.0 / (grads[name].norm().item() + 1e-6))
            torch.testing.assert_close(p.grad, grads[name] * scale, msg=name)


# ---- MAE ------------------------------------------------------------------------------------------------------------
def reference_mae_prediction(method, pixels, noise, mask_ratio):
    """models_mae.py written out with the timm ViT parts: keep the lowest-noise patches, encode them after the class
    token, put the decoded tokens back at their positions with mask tokens elsewhere, decode. Returns (pred, mask)."""
    enc, dec = method.encoder, method.decoder
    batch, length = noise.shape
    kept = noise.argsort(dim=1)[:, : int(length * (1 - mask_ratio))]
    tokens = enc.patch_embed(pixels) + enc.pos_embed[:, 1:]
    visible = torch.stack([tokens[b, kept[b]] for b in range(batch)])
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(batch, -1, -1)
    x = enc.norm_pre(torch.cat([cls, visible], dim=1))
    for block in enc.blocks:
        x = block(x)
    x = dec.decoder_embed(enc.norm(x))
    full = dec.mask_token.expand(batch, length, -1).clone()
    mask = torch.ones(batch, length)
    for b in range(batch):
        full[b, kept[b]] = x[b, 1:]
        mask[b, kept[b]] = 0
    y = torch.cat([x[:, :1], full], dim=1) + dec.decoder_pos_embed
    for block in dec.decoder_blocks:
        y = block(y)
    return dec.decoder_pred(dec.decoder_norm(y))[:, 1:], mask


@pytest.mark.parametrize(("mask_ratio", "norm_pix_loss"), [(0.75, True), (0.5, False)])
def test_mae_forward_matches_reference(mask_ratio, norm_pix_loss):
    model = build_mae(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
    perturb_(model.method, ("encoder.", "decoder."))  # e.g. the class token's (zero) position embedding counts too
    pixels, noise = images(2, 3, 32, 32), torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_prediction, expected_mask = reference_mae_prediction(model.method, pixels, noise, mask_ratio)
        tokens, mask, ids_restore = model.method.encode_visible(pixels, noise)
        prediction = model.method.decoder(tokens, ids_restore)
    assert prediction.shape == (2, 64, 4 * 4 * 3)
    torch.testing.assert_close(mask, expected_mask)
    torch.testing.assert_close(prediction, expected_prediction)
    expected_loss = masked_patch_mse(expected_prediction, patchify(pixels, 4), expected_mask, norm_pix_loss)
    torch.testing.assert_close(model([pixels], noise=noise).loss, expected_loss)


def test_mae_position_embeddings_are_fixed_sincos():
    method = build_mae().method
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    for pos_embed, dim in ((method.encoder.pos_embed, 192), (method.decoder.decoder_pos_embed, 128)):
        torch.testing.assert_close(pos_embed[0], sincos_2d_position_embedding(dim, (8, 8), cls_token=True))
        assert not pos_embed.requires_grad and id(pos_embed) not in trainable


# ---- released encoder -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("builder", "released", "other"),
    [
        (build_moco, "encoder_q.backbone", "encoder_k.backbone"),
        (build_dino, "teacher.backbone", "student.backbone"),
        (build_mae, "encoder", None),
    ],
)
def test_released_backbone_is_the_papers_encoder(builder, released, other):
    model = builder()
    if other:
        perturb_(model.method, (f"{other}.",))
    released_state = model.released_model().backbone.state_dict()
    assert_params_equal(released_state, model.method.get_submodule(released).state_dict())
    if other:
        other_state = model.method.get_submodule(other).state_dict()
        assert any(not torch.equal(value, other_state[name]) for name, value in released_state.items())


# ---- one optimisation step ------------------------------------------------------------------------------------------
def test_moco_one_sgd_step_lowers_loss_against_the_same_keys_and_queue():
    method = build_moco().method.train()
    views = moco_views()
    key_state = {n: v.clone() for n, v in method.state_dict().items() if not n.startswith(QUERY)}

    def measure():
        probe = copy.deepcopy(method)
        probe.load_state_dict(key_state, strict=False)
        with torch.no_grad():
            return probe(views).loss.item()

    optimizer = torch.optim.SGD(method.param_groups(), lr=1e-3)
    assert_one_step_lowers_loss(method, optimizer, views, measure)


def test_dino_one_adamw_step_lowers_loss_with_fixed_center_and_teacher():
    method = build_dino(drop_path_rate=0.0).method
    views, center = dino_views(), method.center.clone()

    def measure():
        method.center.copy_(center)
        with torch.no_grad():
            return method.eval()(views).loss.item()

    optimizer = torch.optim.AdamW(method.param_groups(), lr=1e-4)
    assert_one_step_lowers_loss(method, optimizer, views, measure)


def test_mae_one_adamw_step_lowers_loss_with_the_same_mask():
    method = build_mae().method
    views, noise = [images(BATCH, 3, 32, 32)], torch.rand(BATCH, 64, generator=torch.Generator().manual_seed(1))

    def measure():
        with torch.no_grad():
            return method(views, noise=noise).loss.item()

    optimizer = torch.optim.AdamW(method.param_groups(), lr=1e-4, betas=(0.9, 0.95))
    assert_one_step_lowers_loss(method, optimizer, views, measure, noise=noise)
