"""Training that never ends silently wrong (issue 15): divergence stops the run, checkpoints and final models are
complete or absent, a dead loader worker and a full disk are one sentence, model cards state the run's own facts."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import tiny_args
from huggingface_hub import ModelCard
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

import sslhub
from sslhub import evaluation
from sslhub.checkpointing import checkpoint_dirs, resolve_resume, save_checkpoint
from sslhub.conversion.loading import CheckpointError
from sslhub.finetune import FinetuneArguments, Finetuner
from sslhub.hub.cards import describe_data
from sslhub.modeling import SSLForPreTraining
from sslhub.training import DivergenceGuard, TrainingError, loader_batches, pretrain, save_final_models

pytestmark = pytest.mark.usefixtures("single_thread")


def test_guard_passes_finite_steps_and_names_the_step_and_last_finite_loss():
    model = torch.nn.Linear(3, 2)
    guard = DivergenceGuard(Accelerator(cpu=True), model, "unused-dir", "lower --lr")
    assert guard.check(1, torch.tensor(0.5)) == 0.5
    with pytest.raises(TrainingError, match=r"step 2: the loss is inf \(the last finite loss was 0\.5 at step 1\)"):
        guard.check(2, torch.tensor(float("inf")))
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(TrainingError, match="step 3: the weights are not finite after it.*lower --lr"):
        guard.check(3, torch.tensor(0.25))


def test_guard_checks_floating_buffers_too():
    model = torch.nn.BatchNorm1d(4)
    guard = DivergenceGuard(Accelerator(cpu=True), model, "unused-dir", "lower --lr")
    model.running_var[2] = float("nan")
    with pytest.raises(TrainingError, match="step 1: the weights are not finite.*no step had a finite loss"):
        guard.check(1, torch.tensor(1.0))


def test_diverging_pretraining_stops_without_final_model_and_keeps_the_last_finite_checkpoint(image_folder, tmp_path):
    """τ = 1e-30 overflows MoCo's InfoNCE within a few steps (without the guard: 100 of 120 tensors NaN, exit 0)."""
    args = tiny_args(
        image_folder,
        tmp_path,
        epochs=2,
        checkpoint_every=1,
        keep_checkpoints=1,
        knn_every=0,
        overrides={"queue_size": 64, "temperature": 1e-30},
    )
    with pytest.raises(TrainingError) as raised:
        pretrain(args)
    message = str(raised.value)
    step = int(re.search(r"diverged at optimizer step (\d+)", message).group(1))
    assert "\n" not in message and "last finite loss was" in message
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "pretraining").exists()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [f"step_{step - 1:08d}"]
    assert str(checkpoint_dirs(tmp_path)[-1]) in message
    weights = load_file(checkpoint_dirs(tmp_path)[-1] / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
    assert not list((tmp_path / "checkpoints").glob(".partial*"))


def new_finetuner(image_folder, tmp_path, **arguments) -> Finetuner:
    """A ``Finetuner`` of the bare MoCo v2 preset (it warns of its random initialisation) on the test images."""
    args = FinetuneArguments(
        model="moco_v2_resnet18_32px", data=str(image_folder), output_dir=str(tmp_path), batch_size=16,
        log_with=None, progress=False, num_workers=0, checkpoint_every=10**6, **arguments,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="random initialisation"):
        return Finetuner(args)


def test_diverging_finetuning_stops_without_final_model(image_folder, tmp_path):
    finetuner = new_finetuner(image_folder, tmp_path, epochs=2, lr=1e30, mixup=0.0, cutmix=0.0, auto_augment=None)
    with pytest.raises(TrainingError, match=r"diverged at optimizer step \d+: .*lower --lr or --base-lr"):
        finetuner.run()
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "metrics.json").exists()


def test_eval_refuses_a_model_with_nan_weights(image_folder, tmp_path):
    """As a model object (the check in ``evaluation``) and as a directory (refused already when it is loaded)."""
    model = sslhub.create_model("moco_v2_resnet18_32px")
    name, weight = next((n, p) for n, p in model.named_parameters() if p.ndim > 1)
    with torch.no_grad():
        weight[0].fill_(float("nan"))
    options = {"k": (5,), "progress": False, "num_workers": 0, "cache": False}
    with pytest.raises(CheckpointError, match=rf"1 of its \d+ weight tensors hold NaN or inf \({name}\)"):
        evaluation.knn(model, image_folder, **options)
    model.save_pretrained(tmp_path / "nan-model")
    with pytest.raises(CheckpointError, match=rf"nan-model.*NaN or inf.*{name}"):
        evaluation.knn(tmp_path / "nan-model", image_folder, **options)


def _prepared_accelerator():
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(3, 2))
    return accelerator


def _fail_writing_safetensors(monkeypatch, error):
    """The model file of Accelerate's ``save_state`` is half-written, then ``error`` (a full disk, Ctrl-C)."""

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 16)
        raise error

    monkeypatch.setattr("accelerate.utils.other.safe_save_file", failing_save)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'),
    ],
)
def test_full_disk_while_checkpointing_names_the_directory_and_removes_the_partial_checkpoint(
    tmp_path, monkeypatch, error
):
    accelerator = _prepared_accelerator()
    save_checkpoint(accelerator, str(tmp_path), 1, 2, {"trainer": {"step": 1}})
    _fail_writing_safetensors(monkeypatch, error)
    with pytest.raises(CheckpointError) as raised:
        save_checkpoint(accelerator, str(tmp_path), 2, 2, {"trainer": {"step": 2}})
    message = str(raised.value)
    assert f"step_00000002 into {tmp_path / 'checkpoints'} (" in message and " free there): the disk is full" in message
    assert re.search(r"\(\d+\.\d (GiB|MiB) free there\)", message)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


def test_interrupted_checkpoint_leaves_nothing_that_resume_would_pick(tmp_path, monkeypatch):
    accelerator = _prepared_accelerator()
    save_checkpoint(accelerator, str(tmp_path), 1, 2, {"trainer": {"step": 1}})
    _fail_writing_safetensors(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 2, 2, {"trainer": {"step": 2}})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    (tmp_path / "checkpoints" / ".partial_step_00000003").mkdir()  # what kill -9 mid-write leaves
    (tmp_path / "checkpoints" / ".partial_step_00000003" / "model.safetensors").write_bytes(b"\0")
    assert resolve_resume("latest", str(tmp_path)) == tmp_path / "checkpoints" / "step_00000001"


class _KilledInWorker(Dataset):
    """Each item kills the process loading it, as the out-of-memory killer kills a loader worker."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_loader_worker_is_one_sentence():
    loader = DataLoader(_KilledInWorker(), batch_size=2, num_workers=1)
    with pytest.raises(TrainingError, match=r"^a data-loading worker process died \(DataLoader worker \(pid") as raised:
        list(loader_batches(loader))
    assert "\n" not in str(raised.value) and "--num-workers" in str(raised.value)


def _card_table(path: Path) -> dict[str, str]:
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", path.read_text(), flags=re.M)
    return dict(rows)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_card_states_the_runs_facts_and_a_failed_final_save_keeps_the_previous_files(
    image_folder, tmp_path, monkeypatch
):
    """The method's default is 200 epochs and lr 0.03 per 256 images: the card says this run's 1 epoch and its lr; the
    kNN of the random initialisation is shown as a baseline, not in ``model-index``."""
    result = pretrain(tiny_args(image_folder, tmp_path, epochs=1, checkpoint_every=10**6))
    table = _card_table(tmp_path / "README.md")
    assert table["epochs"] == "1" and table["steps"] == str(48 // 16) == str(result.steps)
    assert table["batch_size"] == "16" and table["processes"] == "1"
    assert float(table["lr"]) == pytest.approx(0.03 * 16 / 256)  # MoCo v2: base lr 0.03 per 256 images, linear
    assert "temperature" in table and "200" not in table.values()
    assert describe_data(str(image_folder))[0] in (tmp_path / "README.md").read_text()
    assert table["knn_top1_k5"] == f"{100 * result.knn_final:.2f}%"
    assert table["knn_top1_k5_at_random_init"] == f"{100 * result.knn_random_init:.2f}%"
    metadata = ModelCard.load(tmp_path / "README.md").data.eval_results  # model-index: this model's scores only
    assert [(item.metric_name, item.metric_value) for item in metadata] == [("knn_top1_k5", result.knn_final)]
    assert _card_table(tmp_path / "pretraining" / "README.md")["epochs"] == "1"

    before = _files(tmp_path)
    original = SSLForPreTraining.save_pretrained

    def fail_after_writing(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SSLForPreTraining, "save_pretrained", fail_after_writing)
    with pytest.raises(OSError):
        save_final_models(result.model, str(tmp_path), {"data": "builtin", "epochs": 7, "steps": 99})
    assert _files(tmp_path) == before
    assert not list(tmp_path.rglob(".partial*"))


def test_a_failed_finetune_save_keeps_the_previous_files(image_folder, tmp_path, monkeypatch):
    finetuner = new_finetuner(image_folder, tmp_path, epochs=1)
    report = finetuner.evaluate()
    finetuner.save(report)
    assert {"model.safetensors", "config.json", "README.md", "metrics.json", "confusion_matrix.png"} <= {
        p.name for p in tmp_path.iterdir()
    }
    before = _files(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("sslhub.finetune.save_report", full_disk)
    finetuner.state.step = 5
    with torch.no_grad():
        next(finetuner.model.parameters()).add_(1.0)
    with pytest.raises(OSError):
        finetuner.save(report)
    assert _files(tmp_path) == before
    assert not list(tmp_path.rglob(".partial*"))


def test_sigterm_stops_a_run_in_one_line_leaving_nothing_half_written(tmp_path):
    """SIGTERM, as torchrun sends the other processes when one fails (or a cluster's scheduler at the end of a job):
    exit 143, one line that names the resume, no traceback, no staging directory; the checkpoints stay."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sslhub", "pretrain", "--model", "moco_v2_resnet18_32px", "--epochs", "50"]
    command += ["--batch-size", "16", "--num-workers", "0", "--no-progress", "--log-with", "none"]
    command += ["--checkpoint-every", "1", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        assert "at random init" in process.stdout.readline()  # training has started
        while not checkpoint_dirs(out):
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stderr = process.stderr.read()
    assert process.returncode == 143
    assert stderr.splitlines()[-1] == "sslhub pretrain: terminated; resume with --resume latest", stderr
    assert "Traceback" not in stderr and not list(out.glob(".partial*"))
    assert checkpoint_dirs(out)
