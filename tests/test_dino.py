"""DINO (arXiv 2104.14294; facebookresearch/dino) built through ``sslhub.create_model(preset, task="pretraining")``.

Each test checks one rule of the paper / official code against numbers computed here: the center, the teacher
temperature and momentum schedules, the teacher EMA (applied by the trainer through ``momentum_pairs`` /
``momentum_at``), the gradient edits, the released encoder, and that one optimisation step lowers the loss on a fixed
batch. The loss equation itself is checked in test_losses.py; here it is only given the tensors the method should
feed it.
"""

import math

import numpy as np
import pytest
import torch
from helpers import assert_params_equal, assert_released_is, build, params, perturb_

from sslhub.batch import Batch
from sslhub.losses import dino_cross_entropy
from sslhub.methods import TrainingProgress
from sslhub.methods.base import update_momentum_pairs

BATCH = 4
SHALLOW = {"depth": 2}  # 2 of ViT-Tiny's 12 blocks: same code paths, a sixth of the time
STUDENT, TEACHER = ("student.", "student_head."), ("teacher.", "teacher_head.")


pytestmark = pytest.mark.usefixtures("single_thread")


def build_dino(**overrides):
    return build(
        "dino_vit_tiny_patch4_32px", out_dim=256, hidden_dim=64, bottleneck_dim=32, backbone_kwargs=SHALLOW, **overrides
    )


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dino_views():
    """Two 32 px global crops and two 16 px local crops."""
    x = images(BATCH, 3, 32, 32)
    return [x, x.flip(-1), x[..., 8:24, 8:24], x[..., :16, 16:]]


def progress(epoch, step_in_epoch=0, steps_per_epoch=10, epochs=50):
    return TrainingProgress(epoch * steps_per_epoch + step_in_epoch, epochs * steps_per_epoch, steps_per_epoch)


def teacher_name_to_student(name):
    return name.replace("teacher", "student", 1)


@torch.no_grad()
def dino_outputs(method, views):
    teacher = [method.teacher_head(method.teacher(v)) for v in views[:2]]
    student = [method.student_head(method.student(v)) for v in views]
    return student, teacher


# ---- objective, center, teacher -------------------------------------------------------------------------------------
def test_dino_forward_uses_center_and_teacher_temperature_then_updates_center():
    method = build_dino(drop_path_rate=0.0, center_momentum=0.8, warmup_teacher_temp_epochs=11).method.train()
    perturb_(method, STUDENT)
    center = 0.1 * images(1, 256, seed=2)
    method.center.copy_(center)
    method.on_step_start(progress(epoch=3))
    teacher_before = params(method, TEACHER)
    loss = method(Batch.of(dino_views())).loss
    student, teacher = dino_outputs(method, dino_views())
    temperature = 0.04 + 3 * (0.07 - 0.04) / 10  # epoch 3 of a linear warm-up reaching 0.07 at epoch 10
    torch.testing.assert_close(loss, dino_cross_entropy(student, teacher, center, 0.1, temperature))
    torch.testing.assert_close(method.center, 0.8 * center + 0.2 * torch.cat(teacher).mean(dim=0, keepdim=True))
    assert_params_equal(params(method, TEACHER), teacher_before)
    loss.backward()
    assert all(p.grad is None for n, p in method.named_parameters() if n.startswith(TEACHER))
    assert method.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_dino_teacher_is_ema_of_student_backbone_and_head():
    """θ_t ← m θ_t + (1 - m) θ_s over the backbone and the head, applied by the trainer after each optimizer step with
    ``momentum_at``; nothing in ``on_step_end`` moves the teacher again."""
    method = build_dino(momentum_teacher=0.7).method
    perturb_(method, STUDENT)
    student, teacher = params(method, STUDENT), params(method, TEACHER)
    at = progress(epoch=1)
    momentum = method.momentum_at(at)
    assert momentum == pytest.approx(1 - 0.3 * (1 + math.cos(math.pi * at.step / at.total_steps)) / 2, abs=1e-12)
    update_momentum_pairs(method.momentum_pairs(), momentum)
    method.on_step_end(at)
    expected = {n: momentum * t + (1 - momentum) * student[teacher_name_to_student(n)] for n, t in teacher.items()}
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
    """``momentum_schedule[it]`` of ``main_dino.py``, used for the teacher update after iteration ``it``."""
    method = build_dino().method
    total = 50 * 10
    for step in (0, 1, 137, 250, total - 1):
        expected = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * step / total))  # utils.cosine_scheduler
        assert method.momentum_at(TrainingProgress(step, total, 10)) == pytest.approx(expected, abs=1e-12)


# ---- gradient edits -------------------------------------------------------------------------------------------------
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


# ---- released encoder -----------------------------------------------------------------------------------------------
def test_released_encoder_is_the_teacher():
    model = build_dino()
    perturb_(model.method, ("student.",))
    assert_released_is(model, model.method.teacher, model.method.student)


# ---- one optimisation step ------------------------------------------------------------------------------------------
def test_dino_one_adamw_step_lowers_loss_with_fixed_center_and_teacher():
    method = build_dino(drop_path_rate=0.0).method
    batch, center = Batch.of(dino_views()), method.center.clone()

    def measure():
        method.center.copy_(center)
        with torch.no_grad():
            return method.eval()(batch).loss.item()

    optimizer = torch.optim.AdamW(method.param_groups(), lr=1e-4)
    before = measure()
    method.train()
    optimizer.zero_grad()
    method(batch).loss.backward()
    optimizer.step()
    after = measure()
    assert after < 0.99 * before, (before, after)
