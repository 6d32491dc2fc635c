"""Two real processes on the CPU (gloo through torchrun): DDP pretraining keeps both ranks identical."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_two_processes(output_dir: Path, data: Path, model: str, overrides: dict) -> list[dict]:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(output_dir),
        str(data),
        model,
        json.dumps(overrides),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_dino_two_processes_end_identical(image_folder, tmp_path):
    kwargs = {
        "out_dim": 128,
        "hidden_dim": 64,
        "bottleneck_dim": 32,
        "local_crops_number": 2,
        "backbone_kwargs": {"depth": 2},
    }
    rank0, rank1 = run_two_processes(tmp_path, image_folder, "dino_vit_tiny_patch4_32px", kwargs)
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    # 48 images, 8 per process -> 3 global batches of 16 per epoch
    assert len(rank0["losses"]) == 2 * 3
    assert rank0["losses"] != rank1["losses"]  # each rank saw its own shard
    assert rank0["digests"] == rank1["digests"]  # parameters, teacher and the all-reduced center agree
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "pretraining" / "model.safetensors").exists()


def test_moco_two_processes_share_parameters_and_queue(image_folder, tmp_path):
    rank0, rank1 = run_two_processes(tmp_path, image_folder, "moco_v2_resnet18_32px", {"queue_size": 64})
    assert rank0["num_processes"] == 2
    assert rank0["batch_norms"] == ["BatchNorm2d"]  # shuffling BN: per-process statistics
    shared = [k for k in rank0["digests"] if k in rank0["parameters"] or k.endswith(("queue", "queue_ptr"))]
    assert any(k.endswith("queue") for k in shared) and any("encoder_k" in k for k in shared)
    for key in shared:
        assert rank0["digests"][key] == rank1["digests"][key], key


def test_simclr_two_processes_normalise_and_contrast_over_the_global_batch(image_folder, tmp_path):
    """SimCLR's global BN (``sync_batch_norm``: every BatchNorm of the model over both processes' images) and
    negatives gathered with gradients: both ranks end with the same parameters and BatchNorm statistics."""
    rank0, rank1 = run_two_processes(tmp_path, image_folder, "simclr_v1_resnet18_32px", {"proj_hidden_dim": 64})
    assert rank0["num_processes"] == 2 and rank0["batch_norms"] == ["GlobalBatchNorm"]
    assert rank0["losses"] != rank1["losses"]  # each rank's anchors are its own shard
    assert rank0["digests"] == rank1["digests"]
