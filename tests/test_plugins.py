"""A method written outside sslhub (DESIGN.md §5): a user's module registers it, and ``sslhub ... --method-module``
or a ``sslhub.methods`` entry point makes every command use it without editing sslhub. The toy method below also
exercises the rest of the contract from outside: sample indices from the batch, momentum pairs, a frozen auxiliary
network loaded from a file, and per-process buffers that must survive DDP and a resume with two processes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

TOY_METHOD = '''
"""A user's own method: BYOL-like, with a frozen teacher and per-process statistics of the samples it saw."""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, register_method, register_preset
from sslhub.transforms import MultiView, crop, flip, view


@dataclass
class ToyHparams(MethodHparams):
    lr: float = hparam(0.05, "base learning rate")
    epochs: int = hparam(2, "epochs")
    momentum: float = hparam(0.9, "momentum of the target encoder")
    teacher_path: str | None = hparam(None, "safetensors file of the frozen teacher")


@register_method("toy_plugin")
class ToyPlugin(SSLMethod):
    Hparams = ToyHparams
    paper = "A toy method of the plugin test"
    linear_recipe = LinearRecipe("tests/test_plugins.py", 0.1, 10, 64)
    tiny_preset = "toy_plugin_test_resnet"
    per_process_buffers = ("seen_index_sum", "seen_count")

    def __init__(self, config):
        super().__init__(config)
        self.online = self.build_encoder(config)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.predictor = nn.Linear(self.online.num_features, self.online.num_features)
        self.teacher = nn.Conv2d(3, self.online.num_features, 8, stride=8).requires_grad_(False)
        self.register_buffer("seen_index_sum", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen_count", torch.zeros((), dtype=torch.long))

    @property
    def released_encoder(self):
        return self.online

    def view_recipe(self):
        config = self.config
        one = view(crop(config.image_size, (0.5, 1.0)), flip(), mean=config.image_mean, std=config.image_std)
        return MultiView([one, one])

    def auxiliary_networks(self):
        return {"teacher": self.teacher}

    def load_auxiliary_weights(self):
        if self.hparams.teacher_path:
            self.teacher.load_state_dict(load_file(self.hparams.teacher_path))

    def momentum_pairs(self):
        return [(self.online, self.target)]

    def momentum_at(self, progress):
        return self.hparams.momentum

    def forward(self, batch):
        if self.training:
            self.seen_index_sum += batch.index.sum()
            self.seen_count += len(batch)
        first, second = batch.views
        prediction = F.normalize(self.predictor(self.online(first)), dim=-1)
        with torch.no_grad():
            target = F.normalize(self.target(second) + self.teacher(second).mean((2, 3)), dim=-1)
        return MethodOutput((2 - 2 * (prediction * target).sum(-1)).mean())


register_preset(Preset("toy_plugin_test_resnet", "toy_plugin", "test_resnet", image_size=32))
'''

PRESET = "toy_plugin_test_resnet"
NUM_IMAGES = 48  # the image_folder fixture


@pytest.fixture
def user_package(tmp_path):
    """A directory with the user's module ``toy_plugin.py`` (not importable from the test process)."""
    root = tmp_path / "user"
    root.mkdir()
    (root / "toy_plugin.py").write_text(TOY_METHOD)
    return root


def run(args, pythonpath, cwd=None, launcher=(sys.executable, "-m")):
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([*launcher, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def pretrain_args(image_folder, output_dir, *extra):
    return ["sslhub", "pretrain", "--method-module", "toy_plugin", "--model", PRESET, "--data", str(image_folder),
            "--output-dir", str(output_dir), "--batch-size", "8", "--knn-every", "0", "--log-with", "none",
            "--no-progress", *extra]  # fmt: skip


def test_method_module_trains_and_evaluates_a_user_method(user_package, image_folder, tmp_path):
    teacher = {"weight": torch.randn(96, 3, 8, 8), "bias": torch.randn(96)}
    save_file(teacher, tmp_path / "teacher.safetensors")
    help_text = run(["sslhub", "hparams", PRESET, "--method-module", "toy_plugin"], user_package)
    assert "momentum of the target encoder" in help_text and "safetensors file of the frozen teacher" in help_text
    out = tmp_path / "run"
    run(pretrain_args(image_folder, out, "--epochs", "1", "--set", f"teacher_path={tmp_path / 'teacher.safetensors'}"),
        user_package)  # fmt: skip
    assert json.loads((out / "config.json").read_text())["method"] == "toy_plugin"
    released, full = load_file(out / "model.safetensors"), load_file(out / "pretraining" / "model.safetensors")
    assert released and all(key.startswith("encoder.") for key in released)  # the online encoder alone
    for name, value in teacher.items():  # the auxiliary network: loaded from the file, never trained or released
        assert torch.equal(full[f"method.teacher.{name}"], value)
    assert full["method.seen_count"].item() == NUM_IMAGES
    for key, value in released.items():  # the released encoder is the trained online network
        assert torch.equal(value, full["method.online." + key.removeprefix("encoder.")])
    report = run(["sslhub", "eval", "knn", "--method-module", "toy_plugin", "--model", str(out / "pretraining"),
                  "--data", str(image_folder), "--k", "5", "--no-progress", "--no-card",
                  "--output-dir", str(tmp_path / "eval")], user_package)  # fmt: skip
    assert "kNN (k=5): top-1" in report


def test_an_unknown_method_module_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-m", "sslhub", "list", "--method-module", "no_such_module"],
                               env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert completed.returncode == 2
    assert "--method-module no_such_module: cannot import it" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_an_entry_point_registers_a_user_method_on_import(user_package):
    """An installed distribution declaring ``[sslhub.methods]`` (here its ``.dist-info`` on the path) needs no
    flag: ``import sslhub`` imports it."""
    info = user_package / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sslhub.methods]\ntoy = toy_plugin\n")
    listing = run(["sslhub", "list", "toy_*"], user_package, cwd=user_package.parent)
    assert PRESET in listing and "toy_plugin" in listing
    methods = run(["-c", "import sslhub; print(sslhub.list_methods())"], user_package, launcher=(sys.executable,))
    assert "'toy_plugin'" in methods


def per_process_values(output_dir, step):
    checkpoint = output_dir / "checkpoints" / f"step_{step:08d}"
    return [{k: v.item() for k, v in load_file(checkpoint / f"per_process_{rank}.safetensors").items()}
            for rank in range(2)]  # fmt: skip


def test_per_process_buffers_survive_ddp_and_resume(user_package, image_folder, tmp_path):
    """Two gloo processes: each rank's ``seen_index_sum`` counts only the samples it saw (DDP must not broadcast
    rank 0's value over it), and a run stopped after 3 steps and resumed ends with the values of an uninterrupted
    run (each rank's value restored from its own file)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    launcher = (torchrun, "--standalone", "--nproc_per_node", "2", "-m")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(pretrain_args(image_folder, straight, "--epochs", "2"), user_package, launcher=launcher)
    run(pretrain_args(image_folder, resumed, "--epochs", "2", "--max-steps", "3"), user_package, launcher=launcher)
    assert per_process_values(resumed, 3)[0] != per_process_values(resumed, 3)[1]
    run(pretrain_args(image_folder, resumed, "--epochs", "2", "--resume"), user_package, launcher=launcher)
    ranks = per_process_values(straight, 6)
    assert [rank["seen_count"] for rank in ranks] == [NUM_IMAGES, NUM_IMAGES]  # 2 epochs, half the data each
    assert ranks[0]["seen_index_sum"] + ranks[1]["seen_index_sum"] == 2 * sum(range(NUM_IMAGES))
    assert ranks[0]["seen_index_sum"] != ranks[1]["seen_index_sum"]
    assert per_process_values(resumed, 6) == ranks


def test_toy_method_source_is_valid_python():
    compile(textwrap.dedent(TOY_METHOD), "toy_plugin.py", "exec")
