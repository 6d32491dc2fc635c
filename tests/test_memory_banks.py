"""Memory-bank methods (InstDisc, CMC) on two processes: a whole training step of each on 2 gloo processes, half the
global batch each, equals the step on one process with the whole batch (banks, Z, noise draws, step, loss)."""

import socket

import torch
from torch import nn

import sslhub
from sslhub.batch import Batch

# preset -> tiny overrides; both take one 3-channel view per image (CMC splits it into L and ab itself)
METHODS = {
    "instdisc_resnet18_32px": {"dim": 16, "nce_k": 8, "num_samples": 12},
    "cmc_resnet18_32px": {"dim": 16, "nce_k": 8, "num_samples": 12},
}
IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
INDEX = torch.tensor([0, 5, 9, 2, 11, 7, 3, 8])


def tiny_method(preset: str):
    torch.manual_seed(0)
    method = sslhub.create_model(preset, task="pretraining", **METHODS[preset]).method.train()
    for module in method.modules():  # BatchNorm on running statistics: each image's features depend on it alone
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return method


def bank_state(method) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.state_dict().items() if k.startswith(("memory", "nce"))}


def _worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mine = slice(rank * 4, (rank + 1) * 4)
    for preset in METHODS:
        method = tiny_method(preset)
        with torch.no_grad():
            loss = method(Batch(views=[IMAGES[mine]], index=INDEX[mine])).loss
        out[(rank, preset)] = {"loss": loss, **bank_state(method)}
    dist.destroy_process_group()


def test_two_processes_hold_the_same_banks_as_one_process_on_the_global_batch(single_thread):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2)
    for preset in METHODS:
        single = tiny_method(preset)
        before = bank_state(single)
        with torch.no_grad():
            loss = single(Batch(views=[IMAGES], index=INDEX)).loss
        after = bank_state(single)
        assert any(not torch.equal(before[name], after[name]) for name in after), preset  # the step changed them
        for rank in (0, 1):
            for name, value in after.items():
                assert torch.allclose(out[(rank, preset)][name], value, atol=1e-6), (preset, rank, name)
        assert torch.allclose((out[(0, preset)]["loss"] + out[(1, preset)]["loss"]) / 2, loss, rtol=1e-5), preset
