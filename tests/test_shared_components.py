"""Components every method shares (DESIGN.md §5): momentum pairs updated by the trainer once per optimizer step, and
the all-gather that keeps gradients (two real gloo processes)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import build, perturb_

from sslhub.distributed import gather_with_grad
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
