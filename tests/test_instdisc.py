"""InstDisc (arXiv 1805.01978): NCE loss, full softmax, the memory bank update, the dataset-size seam, exact resume."""

import copy
import math
import os
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import random_batch_norm_statistics, relative_error
from torch import nn

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, StandIn, load_file_state
from sslhub.losses import nce_loss
from sslhub.memory_bank import momentum_update, noise_indices
from sslhub.registry import get_pretrained
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


# The authors' released model (lemniscate.pytorch models/resnet.py: a torchvision ResNet whose fc is the 128-d
# embedding, then L2-normalised), saved as main.py's save_checkpoint does with a pickled NCEAverage module object.
def authors_model(arch: str, low_dim: int = 128) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    model.fc = nn.Linear(model.fc.in_features, low_dim)
    return random_batch_norm_statistics(model)


def save_lemniscate_file(path, model, arch: str, legacy: bool = True, bank_rows: int = 6) -> torch.Tensor:
    """``main.py`` save_checkpoint; ``lemniscate`` is an object of a class of the authors' ``lib`` package, which is
    importable only while saving (as on the authors' machine)."""
    lib, nce = types.ModuleType("lib"), types.ModuleType("lib.NCEAverage")

    class NCEAverage(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("params", torch.tensor([4096, 0.07, 123.0, 0.5]))
            self.register_buffer("memory", F.normalize(torch.randn(bank_rows, 128), dim=1))

    NCEAverage.__module__, NCEAverage.__qualname__ = "lib.NCEAverage", "NCEAverage"
    nce.NCEAverage, lib.NCEAverage = NCEAverage, nce
    sys.modules.update({"lib": lib, "lib.NCEAverage": nce})
    try:
        lemniscate = NCEAverage()
        container = {
            "epoch": 200,
            "arch": arch,
            "state_dict": {f"module.{key}": value for key, value in model.state_dict().items()},
            "lemniscate": lemniscate,
            "best_prec1": 46.8,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9).state_dict(),
        }
        torch.save(container, path, _use_new_zipfile_serialization=not legacy)
    finally:
        del sys.modules["lib"], sys.modules["lib.NCEAverage"]
    return lemniscate.memory


def authors_features(model, images):
    backbone = copy.deepcopy(model)
    backbone.fc = nn.Identity()
    with torch.no_grad():
        return backbone(images), F.normalize(model(images), dim=1)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-format", "zip-format"])
def test_authors_file_loads_with_stand_ins_and_converts(tmp_path, legacy):
    model = authors_model("resnet18")
    path = tmp_path / "lemniscate_resnet18.pth.tar"
    memory = save_lemniscate_file(path, model, "resnet18", legacy=legacy)
    assert "lib" not in sys.modules
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    container = load_file_state(path)
    stand_in = container["lemniscate"]
    assert isinstance(stand_in, StandIn) and stand_in.stands_for == "lib.NCEAverage.NCEAverage"
    assert torch.equal(stand_in._buffers["memory"], memory) and "lib" not in sys.modules
    assert detect_layout(container) is get_layout("instdisc")
    converted = read_checkpoint(path)
    assert converted.method_overrides == {
        "dim": 128, "objective": "nce", "nce_k": 4096, "temperature": pytest.approx(0.07), "bank_momentum": 0.5
    }  # fmt: skip
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    pooled, embedding = authors_features(model, images)
    with torch.no_grad():
        assert relative_error(convert_checkpoint("instdisc_resnet18", path)(images).pooler_output, pooled) < 1e-4
        method = convert_checkpoint("instdisc_resnet18", path, task="pretraining").method
        assert relative_error(method.embed(images), embedding) < 1e-4
    assert method.memory.shape == (0, 128) and method.hparams.num_samples == 0 and float(method.nce_z) < 0


def test_released_tag_builds_resnet50_from_the_authors_file(tmp_path):
    tag = get_pretrained("instdisc_resnet50.in1k")
    assert (tag.layout, tag.metrics, tag.file_name) == ("instdisc", {"knn": 46.8}, "lemniscate_resnet50.pth")
    model = authors_model("resnet50")
    path = tmp_path / tag.file_name
    save_lemniscate_file(path, model, "resnet50")
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    pooled, _ = authors_features(model, images)
    released = sslhub.create_model("instdisc_resnet50.in1k", pretrained=True, pretrained_path=path)
    with torch.no_grad():
        features = released(images).pooler_output
    assert features.shape == (1, 2048) and relative_error(features, pooled) < 1e-4


class Pwned:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-format", "zip-format"])
@pytest.mark.parametrize("call", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_pickle_that_calls_code_is_refused_and_nothing_runs(tmp_path, call, legacy):
    marker = tmp_path / "pwned"
    argument = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Pwned(call, argument)}, path,
               _use_new_zipfile_serialization=not legacy)  # fmt: skip
    with pytest.raises(CheckpointError, match="refused to load: the pickle calls code") as error:
        load_file_state(path)
    assert str(path) in str(error.value) and ("system" in str(error.value) or "builtins.eval" in str(error.value))
    assert not marker.exists()


def test_plain_state_dict_still_loads_with_weights_only(tmp_path):
    state = authors_model("resnet18").state_dict()
    path = tmp_path / "plain.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_file_state(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
