"""Resuming reads no pickle that could run code, and never continues another run's checkpoint."""

import json
import pathlib

import pytest
import torch
from helpers import pretrain_silently

from sslhub.checkpointing import STATE_FILE, checkpoint_dirs
from sslhub.cli import main as cli_main
from sslhub.conversion.loading import CheckpointError

pytestmark = pytest.mark.usefixtures("single_thread")
RUN = dict(model="moco_v2_resnet18_32px", overrides={"queue_size": 64}, epochs=1, batch_size=16, checkpoint_every=2)
RUN["knn_every"] = 0


class TouchesAFile:
    """Unpickled with ``weights_only=False``, this creates ``marker``: the stand-in for any code a file could run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def cut_run(image_folder, output_dir, **changes):
    """Two steps of a run, checkpointed at step 2; returns the checkpoint directory."""
    pretrain_silently(data=str(image_folder), output_dir=output_dir, max_steps=2, **{**RUN, **changes})
    (checkpoint,) = checkpoint_dirs(output_dir)
    return checkpoint


def resume(image_folder, output_dir, **changes):
    return pretrain_silently(data=str(image_folder), output_dir=output_dir, resume="latest", **{**RUN, **changes})


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_checkpoint_file_that_would_run_code_is_refused_by_name_and_nothing_runs(image_folder, tmp_path, name):
    checkpoint = cut_run(image_folder, tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"state": TouchesAFile(marker)}, checkpoint / name)
    with pytest.raises(CheckpointError, match=f"{name}: not a plain checkpoint file .* Python object") as error:
        resume(image_folder, tmp_path / "run")
    assert not marker.exists()
    assert "weights_only" not in str(error.value) and "trust" not in str(error.value)  # never the unsafe way


def test_the_cli_refuses_it_in_one_line(image_folder, tmp_path, capsys):
    checkpoint = cut_run(image_folder, tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"state": TouchesAFile(marker)}, checkpoint / "random_states_0.pkl")
    capsys.readouterr()
    argv = ["pretrain", "--model", RUN["model"], "--data", str(image_folder), "--output-dir", str(tmp_path / "run")]
    argv += ["--batch-size", "16", "--epochs", "1", "--knn-every", "0", "--checkpoint-every", "2", "--set"]
    argv += ["queue_size=64", "--resume", "latest", "--log-with", "none", "--no-progress", "--num-workers", "0"]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "random_states_0.pkl" in error and not marker.exists()


def test_the_trainer_state_is_json_and_resume_continues_from_it(image_folder, tmp_path):
    checkpoint = cut_run(image_folder, tmp_path / "run")
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    assert saved["trainer"]["step"] == 2 and saved["run"]["batch_size"] == 16 and saved["run"]["processes"] == 1
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # nothing of sslhub's goes through pickle
    assert resume(image_folder, tmp_path / "run").steps == 3  # 48 images / 16: one epoch of 3 steps


def test_a_checkpoint_of_an_older_sslhub_is_refused_with_what_to_do(image_folder, tmp_path):
    """Before ``sslhub_state.json`` the trainer's state was Accelerate's ``custom_checkpoint_0.pkl``, a pickle."""
    checkpoint = cut_run(image_folder, tmp_path / "run")
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).unlink()
    torch.save({"json": json.dumps(saved["trainer"])}, checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match="written by an sslhub before .* start a new run"):
        resume(image_folder, tmp_path / "run")


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"batch_size": 8}, "batch_size 16 there, 8 here"), ({"seed": 1}, "seed 0 there, 1 here")],
)
def test_resume_refuses_the_checkpoint_of_another_run(image_folder, tmp_path, changes, message):
    cut_run(image_folder, tmp_path / "run")
    with pytest.raises(CheckpointError, match=f"checkpoint is of another run \\({message}\\)"):
        resume(image_folder, tmp_path / "run", **changes)


def test_resume_refuses_other_data(image_folder, tmp_path):
    cut_run(image_folder, tmp_path / "run")
    with pytest.raises(CheckpointError, match="data .* there, 'builtin' here"):
        pretrain_silently(data="builtin", output_dir=tmp_path / "run", resume="latest", **RUN)


def test_a_new_run_into_the_output_of_an_earlier_one_is_refused(image_folder, tmp_path):
    checkpoint = cut_run(image_folder, tmp_path / "run")
    with pytest.raises(CheckpointError, match="earlier run .*step_00000002.*--resume latest"):
        pretrain_silently(data=str(image_folder), output_dir=tmp_path / "run", **RUN)
    assert checkpoint_dirs(tmp_path / "run") == [checkpoint]  # the earlier run's checkpoint is kept
