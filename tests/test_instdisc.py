"""InstDisc (arXiv 1805.01978): NCE loss, full softmax, the memory bank update, the dataset-size seam, exact resume."""

import math

import pytest
import torch
import torch.nn.functional as F

import sslhub
from sslhub.batch import Batch
from sslhub.losses import nce_loss
from sslhub.memory_bank import momentum_update, noise_indices
from sslhub.training import PretrainArguments, pretrain

TINY = {"dim": 16, "nce_k": 8, "num_samples": 20}


def tiny_instdisc(**overrides):
    return sslhub.create_model("instdisc_resnet18_32px", task="pretraining", **{**TINY, **overrides})


def test_nce_loss_matches_nce_criterion_written_out():
    torch.manual_seed(0)
    probabilities = torch.rand(5, 1 + 7) * 3
    n = 100
    pn, k, eps = 1 / n, 7, 1e-7
    expected = 0.0
    for row in probabilities.tolist():
        expected -= math.log(row[0] / (row[0] + k * pn + eps))
        expected -= sum(math.log(k * pn / (p + k * pn + eps)) for p in row[1:])
    assert nce_loss(probabilities, 1 / n).item() == pytest.approx(expected / 5, rel=1e-5)
    with pytest.raises(ValueError, match="1 \\+ K"):
        nce_loss(torch.rand(4, 1), 0.1)


def test_bank_update_is_momentum_then_renormalise():
    torch.manual_seed(0)
    bank = torch.randn(10, 4)
    before = bank.clone()
    features = F.normalize(torch.randn(3, 4), dim=1)
    index = torch.tensor([7, 2, 5])
    momentum_update(bank, features, index, 0.5)
    for row, i in enumerate(index.tolist()):
        mixed = 0.5 * before[i] + 0.5 * features[row]
        assert torch.allclose(bank[i], mixed / mixed.norm(), atol=1e-6)
    untouched = [i for i in range(10) if i not in index.tolist()]
    assert torch.equal(bank[untouched], before[untouched])
    with pytest.raises(IndexError, match="outside the memory bank"):
        momentum_update(bank, features, torch.tensor([0, 1, 10]), 0.5)


def test_noise_indices_are_uniform_in_range_and_a_function_of_the_step():
    a, b = noise_indices(50, 4, 6, step=3, seed=0), noise_indices(50, 4, 6, step=3, seed=0)
    assert a.shape == (4, 6) and torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) < 50
    assert not torch.equal(a, noise_indices(50, 4, 6, step=4, seed=0))


def views(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_softmax_objective_is_cross_entropy_over_the_whole_bank():
    model = tiny_instdisc(objective="softmax").eval()
    method = model.method
    x, index = views(), torch.tensor([3, 0, 11, 19])
    with torch.no_grad():
        loss = model(Batch([x], index)).loss
        f = F.normalize(method.head(method.encoder(x)), dim=1)
        logits = f @ method.memory.t() / 0.1  # τ of the 32 px preset (cifar.py)
        expected = -sum(logits[r].log_softmax(0)[i] for r, i in enumerate(index.tolist())) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_nce_objective_fixes_z_on_the_first_batch_and_updates_the_bank():
    model = tiny_instdisc().train()
    method = model.method
    bank_before = method.memory.clone()
    x, index = views(), torch.tensor([3, 0, 11, 19])
    with torch.no_grad():
        f = F.normalize(method.head(method.encoder(x)), dim=1)  # BN in train mode: same batch, same statistics
        noise = noise_indices(20, 4, 8, step=0, seed=0)
        rows = bank_before[torch.cat([index[:, None], noise], 1)]
        similarity = torch.exp((rows @ f[:, :, None]).squeeze(2) / 0.1)
        z = similarity.mean() * 20
        expected = nce_loss(similarity / z, 1 / 20)
        loss = model(Batch([x], index)).loss
    assert method.nce_z.item() == pytest.approx(z.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert int(method.nce_step) == 1 and not torch.equal(method.memory[index], bank_before[index])
    assert torch.allclose(method.memory[index].norm(dim=1), torch.ones(4), atol=1e-6)
    with torch.no_grad():
        model(Batch([views(seed=1)], index))
    assert method.nce_z.item() == pytest.approx(z.item(), rel=1e-5)  # fixed after the first batch


def test_bind_dataset_sizes_the_bank_and_saved_models_rebuild_it(tmp_path):
    model = tiny_instdisc(num_samples=0)
    assert model.method.memory.shape == (0, 16)
    model.method.bind_dataset(30)
    assert model.method.memory.shape == (30, 16) and model.config.method_kwargs["num_samples"] == 30
    model.save_pretrained(tmp_path)
    reloaded = sslhub.from_pretrained(tmp_path, task="pretraining")
    assert torch.equal(reloaded.method.memory, model.method.memory)
    with pytest.raises(ValueError, match="30 rows but the training set has 40"):
        reloaded.method.bind_dataset(40)


def test_pretrainer_binds_the_dataset_and_resume_restores_the_bank_exactly(image_folder, tmp_path):
    def args(output_dir, **extra):
        return PretrainArguments(
            model="instdisc_resnet18_32px", data=str(image_folder), output_dir=str(output_dir), epochs=1,
            batch_size=16, overrides={"dim": 16, "nce_k": 8}, log_with=None, progress=False, knn_every=0,
            checkpoint_every=1, **extra,
        )  # fmt: skip

    full = pretrain(args(tmp_path / "full"))
    first = pretrain(args(tmp_path / "cut", max_steps=2))
    resumed = pretrain(args(tmp_path / "cut", resume="latest"))
    assert len(full.losses) == 3 and first.losses == full.losses[:2] and resumed.losses == full.losses[2:]
    final_full = sslhub.from_pretrained(tmp_path / "full" / "pretraining").method
    final_resumed = sslhub.from_pretrained(tmp_path / "cut" / "pretraining").method
    assert final_full.memory.shape == (48, 16)
    for name in ("memory", "nce_z", "nce_step"):
        assert torch.equal(getattr(final_full, name), getattr(final_resumed, name)), name


def _bank_worker(rank, world, port, bank, features, index, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    half = len(index) // world
    mine = slice(rank * half, (rank + 1) * half)
    bank = bank.clone()  # spawn hands the processes one shared-memory tensor; each process holds its own bank
    momentum_update(bank, features[mine], index[mine], 0.5)
    out[f"bank{rank}"] = bank
    out[f"noise{rank}"] = noise_indices(bank.shape[0], half, 5, step=7, seed=3)
    dist.destroy_process_group()


def test_two_processes_hold_the_same_bank_and_noise_as_one_process_on_the_global_batch():
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    bank, features = torch.randn(12, 4), F.normalize(torch.randn(6, 4), dim=1)
    index = torch.tensor([0, 5, 9, 2, 11, 7])
    single = bank.clone()
    momentum_update(single, features, index, 0.5)
    single_noise = noise_indices(12, 6, 5, step=7, seed=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_bank_worker, args=(2, port, bank, features, index, out), nprocs=2)
    assert torch.equal(out["bank0"], single) and torch.equal(out["bank1"], single)
    assert torch.equal(torch.cat([out["noise0"], out["noise1"]]), single_noise)
