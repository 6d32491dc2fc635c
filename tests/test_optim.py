"""The optimizer table against the official update rules, written out plainly: LARS as MoCo v3's
``moco/optimizer.py`` (also MAE's ``util/lars.py``), LARC as NVIDIA apex's ``LARC.py`` around SGD (SwAV)."""

import copy

import pytest
import torch
from torch import nn

from sslhub.optim import OPTIMIZERS, create_optimizer


def small_net(zero_init_last_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    if zero_init_last_norm:  # MoCo v3's zero_init_residual: the conv before it gets no gradient at first
        nn.init.zeros_(net[4].weight)
    return net


def backward(net: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator)
    net.zero_grad()
    nn.functional.cross_entropy(net(images), labels).backward()


@torch.no_grad()
def moco_v3_lars_step(net, state, lr, weight_decay, momentum=0.9, eta=0.001):
    for p in net.parameters():
        dp = p.grad
        if p.ndim > 1:  # "if p.ndim > 1: # if not normalization gamma/beta or bias"
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, (eta * param_norm / update_norm), one), one)
            dp = dp.mul(q)
        mu = state.setdefault(p, torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


@torch.no_grad()
def apex_larc_sgd_step(net, state, lr, weight_decay, momentum=0.9, trust=0.001, eps=1e-8):
    """apex ``LARC(SGD(...), trust_coefficient=trust, clip=False)`` as SwAV's ``main_swav.py`` builds it."""
    for p in net.parameters():
        grad = p.grad.clone()
        param_norm, grad_norm = torch.norm(p), torch.norm(grad)
        if param_norm != 0 and grad_norm != 0:
            adaptive_lr = trust * param_norm / (grad_norm + param_norm * weight_decay + eps)
            grad += weight_decay * p
            grad *= adaptive_lr
        buf = state.get(p)
        state[p] = buf = grad if buf is None else buf.mul_(momentum).add_(grad)  # SGD without its weight decay
        p.add_(buf, alpha=-lr)


@pytest.mark.parametrize("zero_init", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-6, 1e-4])
def test_lars_is_moco_v3_lars(zero_init, weight_decay):
    ours, reference = small_net(zero_init), small_net(zero_init)
    optimizer = create_optimizer("lars", [{"params": ours.parameters(), "weight_decay": weight_decay}], lr=4.8)
    state = {}
    for step in range(3):
        backward(ours, step), backward(reference, step)
        optimizer.step()
        moco_v3_lars_step(reference, state, lr=4.8, weight_decay=weight_decay)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    if zero_init and weight_decay:  # the zero-gradient conv moved by lr * eta * ||w||, as the official rule does
        assert not torch.equal(ours[3].weight, small_net(True)[3].weight)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-6])
@pytest.mark.parametrize("lr", [4.8, 0.0048])  # SwAV's peak and final lr: a ratio capped at lr would differ at both
def test_larc_is_apex_larc_without_clipping(weight_decay, lr):
    ours, reference = small_net(False), small_net(False)
    optimizer = create_optimizer("larc", [{"params": ours.parameters(), "weight_decay": weight_decay}], lr=lr)
    state = {}
    for step in range(3):
        backward(ours, step), backward(reference, step)
        optimizer.step()
        apex_larc_sgd_step(reference, state, lr=lr, weight_decay=weight_decay)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_sgd_and_adamw_take_the_groups_weight_decay():
    net = small_net(False)
    decayed = [p for p in net.parameters() if p.ndim > 1]
    plain = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": 0.05}, {"params": plain, "weight_decay": 0.0}]
    for name in ("sgd", "adamw"):
        optimizer = create_optimizer(name, copy.deepcopy(groups), lr=0.1, momentum=0.8, betas=(0.9, 0.95))
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert create_optimizer("sgd", groups, 0.1, momentum=0.8).param_groups[0]["momentum"] == 0.8
    assert create_optimizer("adamw", groups, 0.1, betas=(0.9, 0.95)).param_groups[0]["betas"] == (0.9, 0.95)


def test_unknown_optimizer_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'") as err:
        create_optimizer("lamb", small_net(False).parameters(), 0.1)
    assert all(name in str(err.value) for name in OPTIMIZERS)
