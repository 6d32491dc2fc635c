"""Components every method shares (DESIGN.md §5): momentum pairs updated by the trainer once per optimizer step, the
all-gather that keeps gradients and BatchNorm over the global batch (two real gloo processes), TensorFlow's 'SAME'
padding and the multi-resolution forward of multi-crop methods."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import build, perturb_
from torch import nn

from sslhub.backbones import TimmEncoder, forward_by_resolution, tf_same_padding_
from sslhub.distributed import GlobalBatchNorm, gather_with_grad, global_batch_norm
from sslhub.methods.base import update_momentum_pairs
from sslhub.training import PretrainArguments, pretrain


def test_update_momentum_pairs_is_the_ema_of_parameters_only():
    online, target = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.fill_(2.0), target.weight.fill_(1.0), online.running_mean.fill_(5.0)
    update_momentum_pairs([(online, target)], 0.9)
    torch.testing.assert_close(target.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(target.running_mean, torch.zeros(3))  # buffers are the target's own (BN statistics)
    with pytest.raises(ValueError, match="differ in size"):
        update_momentum_pairs([(online, torch.nn.Linear(3, 3, bias=False))], 0.9)


def test_trainer_updates_momentum_once_per_optimizer_step_under_accumulation(image_folder, tmp_path, single_thread):
    """With lr 0 the query encoder stays put, so after N optimizer steps each key parameter is
    ``q + m^N (k0 - q)`` (MoCo eq. 2 applied N times). 48 images, 8 per micro-batch, 2 micro-batches per step:
    N = 3; an update per micro-batch (round 1's MoCo) would give m^6."""
    model = build("moco_v2_resnet18_32px", backbone="test_resnet", momentum=0.5, queue_size=16)
    perturb_(model.method, ("encoder_k", "head_k"), scale=0.5)
    pairs = model.method.momentum_pairs()
    before = [(q.detach().clone(), k.detach().clone()) for online, target in pairs
              for q, k in zip(online.parameters(), target.parameters(), strict=True)]  # fmt: skip
    assert any(not torch.equal(q, k) for q, k in before)
    model.save_pretrained(tmp_path / "start")
    result = pretrain(
        PretrainArguments(
            model=str(tmp_path / "start"),
            data=str(image_folder),
            output_dir=str(tmp_path / "run"),
            epochs=1,
            batch_size=8,
            gradient_accumulation_steps=2,
            lr=0.0,
            knn_every=0,
            log_with=None,
            progress=False,
        )
    )
    assert result.steps == 3
    after = [k for _, target in result.model.method.momentum_pairs() for k in target.parameters()]
    for (q, k0), k in zip(before, after, strict=True):
        torch.testing.assert_close(k, q + 0.5**3 * (k0 - q), rtol=1e-5, atol=1e-6)


# ---- gather with gradients -----------------------------------------------------------------------------------------


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))


def _loss(gathered: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """A SimCLR-like loss of one process: its own rows against every gathered row, weighted by rank."""
    return (rank + 1) * torch.logsumexp(local @ gathered.T, dim=1).sum()


def _gather_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    local = _inputs(rank).requires_grad_(True)
    gathered = gather_with_grad(local)
    _loss(gathered, local, rank).backward()
    torch.save({"gathered": gathered.detach(), "grad": local.grad}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gather_with_grad_returns_each_process_the_gradient_of_every_loss(tmp_path):
    mp.spawn(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    inputs = [_inputs(rank).requires_grad_(True) for rank in range(2)]
    everything = torch.cat(inputs)
    sum(_loss(everything, inputs[rank], rank) for rank in range(2)).backward()  # one process, plain autograd
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["gathered"], everything.detach())
        torch.testing.assert_close(result["grad"], inputs[rank].grad)


def test_gather_with_grad_is_the_identity_in_one_process():
    local = torch.randn(2, 3, requires_grad=True)
    assert gather_with_grad(local) is local


# ---- BatchNorm over the global batch ---------------------------------------------------------------------------------
def _bn_inputs() -> torch.Tensor:
    return torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(7)) * 2 + 1


def _bn_network() -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5), net[1].bias.uniform_(-0.5, 0.5)
    return net


def _bn_loss(output: torch.Tensor) -> torch.Tensor:
    return (output * torch.arange(output.numel()).reshape(output.shape).sin()).sum()


def _global_bn_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    net = global_batch_norm(_bn_network())
    output = net(_bn_inputs()[rank * 4 : rank * 4 + 4])
    loss = _bn_loss(torch.cat([torch.zeros_like(output)] * rank + [output] + [torch.zeros_like(output)] * (1 - rank)))
    loss.backward()
    state = {name: value for name, value in net.state_dict().items()}
    grads = {name: p.grad for name, p in net.named_parameters()}
    torch.save({"output": output.detach(), "state": state, "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_global_batch_norm_over_two_processes_is_batch_norm_of_the_whole_batch(tmp_path):
    """Two processes with half the batch each compute what one BatchNorm computes on the whole batch: outputs, running
    statistics, and (summed over the processes, as DDP's average of per-process losses scaled back) the gradients."""
    mp.spawn(_global_bn_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    net = _bn_network()
    output = net(_bn_inputs())
    _bn_loss(output).backward()
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    torch.testing.assert_close(torch.cat([r["output"] for r in results]), output.detach(), rtol=1e-5, atol=1e-6)
    for result in results:
        for name, value in net.state_dict().items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, p in net.named_parameters():
        summed = results[0]["grads"][name] + results[1]["grads"][name]
        torch.testing.assert_close(summed, p.grad, rtol=1e-4, atol=1e-5)  # gradients of order 1


def test_global_batch_norm_keeps_parameters_and_keys_and_is_plain_bn_in_one_process():
    net = _bn_network()
    keys, weight = net.state_dict().keys(), net[1].weight
    expected = net(_bn_inputs())
    converted = global_batch_norm(net)
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[4], GlobalBatchNorm)
    assert converted.state_dict().keys() == keys and converted[1].weight is weight
    torch.testing.assert_close(converted(_bn_inputs()), expected)
    assert isinstance(global_batch_norm(_bn_network(), cuda=True)[1], nn.SyncBatchNorm)


# ---- TensorFlow 'SAME' padding ---------------------------------------------------------------------------------------
def tf_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's 'SAME' padding written out: output ceil(n / s), total padding max((out - 1) s + k - n, 0), the
    smaller half before."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


@pytest.mark.parametrize("size", [16, 17])
def test_tf_same_padding_pads_strided_convs_and_max_pools_like_tensorflow(size):
    """``"same"``: every strided convolution and the max-pool pad as TensorFlow (one more pixel after on even inputs);
    ``"max_pool"``: only the max-pool. Stride-1 convolutions, parameters and keys stay."""
    torch.manual_seed(0)
    plain = TimmEncoder("resnet18").eval()
    same = TimmEncoder("resnet18", tf_padding="same").eval()
    pool_only = TimmEncoder("resnet18", tf_padding="max_pool").eval()
    same.load_state_dict(plain.state_dict()), pool_only.load_state_dict(plain.state_dict())
    assert same.state_dict().keys() == plain.state_dict().keys()
    plain_modules, same_modules = dict(plain.named_modules()), dict(same.named_modules())
    pool_modules = dict(pool_only.named_modules())
    strided = [name for name, m in plain_modules.items() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert "backbone.conv1" in strided and "backbone.layer2.0.conv1" in strided
    with torch.no_grad():
        for name, conv in plain_modules.items():
            if not isinstance(conv, nn.Conv2d):
                continue
            x = torch.randn(1, conv.in_channels, size, size)
            k, s = conv.kernel_size[0], conv.stride[0]
            expected = F.conv2d(tf_same(x, k, s), conv.weight, conv.bias, stride=s) if s > 1 else conv(x)
            torch.testing.assert_close(same_modules[name](x), expected, msg=name)
            assert torch.equal(pool_modules[name](x), conv(x)), name
        x = torch.randn(1, 64, size, size)
        pooled = F.max_pool2d(tf_same(x, 3, 2, float("-inf")), 3, 2)
        torch.testing.assert_close(same.backbone.maxpool(x), pooled)
        torch.testing.assert_close(pool_only.backbone.maxpool(x), pooled)
        images = torch.randn(1, 3, 2 * size, 2 * size)
        if size % 2 == 0:  # even inputs: the features differ from PyTorch's symmetric padding
            assert not torch.allclose(same(images), plain(images))
    with pytest.raises(ValueError, match="tf_padding"):
        tf_same_padding_(nn.Sequential(), "valid")


def test_forward_by_resolution_batches_consecutive_crops_of_one_size():
    calls = []

    def network(x):
        calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))

    crops = [torch.randn(2, 3, s, s) for s in (8, 8, 4, 4, 4, 8)]
    out = forward_by_resolution(network, crops)
    assert calls == [(4, 3, 8, 8), (6, 3, 4, 4), (2, 3, 8, 8)]
    torch.testing.assert_close(out, torch.cat([c.mean(dim=(2, 3)) for c in crops]))
