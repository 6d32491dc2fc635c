"""Training checkpoints that resume exactly and never run code: Accelerate's state plus sslhub's own JSON.

A checkpoint is ``OUTPUT/checkpoints/step_NNNNNNNN/``: Accelerate's ``save_state`` (the model as safetensors, the
optimizer and the RNG states as ``torch.save`` files) and ``sslhub_state.json`` (the trainer's counters and history
and the identity of the run). It is written into a hidden directory, renamed into place once complete and removed
when the write fails or is interrupted.

On ``--resume`` every file of the checkpoint that is not safetensors or JSON is first read with
``torch.load(weights_only=True)`` (Accelerate's own loader and allow-list: tensors, numbers, plain containers, the
numpy arrays of its RNG states): a file that needs anything else (a pickle that imports or calls) is refused by name,
before Accelerate reads it. The trainer's state is never a pickle (Accelerate would read a registered object's
``custom_checkpoint_N.pkl`` with ``weights_only=False``), and the checkpoints of older sslhub versions, whose state
was such a file, are refused. The run identity (model, data, batch, seed, hyperparameter overrides) must match the
resuming run's, so a checkpoint is never continued by another run.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError

from sslhub.conversion.loading import CheckpointError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
STATE_FILE = "sslhub_state.json"
LEGACY_STATE_FILE = "custom_checkpoint_0.pkl"  # sslhub before sslhub_state.json: its state, registered with Accelerate
SAFE_SUFFIXES = (".safetensors", ".json")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    """``"latest"`` (newest checkpoint in ``output_dir``, none is fine) or a checkpoint directory."""
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint directory")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    step: int,
    keep: int,
    state: dict[str, Any],
    write_per_process: Callable | None = None,
) -> None:
    """Accelerate's state and ``state`` (JSON values: the trainer's counters and ``run`` identity) into a hidden
    directory, renamed into place once complete; keeps the newest ``keep`` checkpoints. ``write_per_process(dir)``
    runs on every process before the rename (per-process state). A write that fails (a full disk) or is interrupted
    (Ctrl-C) removes the hidden directory, so only complete checkpoints remain; a failed write is a
    ``CheckpointError`` naming the directory and its free space."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    partial = root / f".partial_step_{step:08d}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        if write_per_process is not None:
            write_per_process(partial)
        if accelerator.is_main_process:
            (partial / STATE_FILE).write_text(json.dumps(state, indent=1))
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if not _is_write_failure(err):
            raise
        reason = "the disk is full" if _is_disk_full(err) else f"{type(err).__name__}: {str(err).splitlines()[0]}"
        raise CheckpointError(
            f"could not write the checkpoint {final.name} into {root} ({_free_space(root)} free there): {reason}; "
            "free some space (or choose another --output-dir) and continue with --resume latest"
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _is_write_failure(err: BaseException) -> bool:
    """An error of writing a file: ``OSError``, safetensors' ``SafetensorError``, or ``torch.save``'s
    ``RuntimeError`` from its ``PytorchStreamWriter`` (the optimizer's state)."""
    return isinstance(err, OSError | SafetensorError) or (
        isinstance(err, RuntimeError) and "PytorchStreamWriter" in str(err)
    )


def _is_disk_full(err: BaseException) -> bool:
    """``ENOSPC``, as an ``OSError`` or inside the message of safetensors' (Rust ``StorageFull``) or torch's error."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    return any(marker in str(err) for marker in ("StorageFull", os.strerror(errno.ENOSPC), f"os error {errno.ENOSPC}"))


def _free_space(directory: Path) -> str:
    free = shutil.disk_usage(directory).free
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with Accelerate's allow-list; a file that needs more is refused."""
    try:
        return accelerate_load(path, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        named = re.search(r"GLOBAL (\S+)", str(err))
        reason = (
            f"it names the Python object {named.group(1)}, which loading would import and may call"
            if named
            else f"it is damaged or not a torch file ({type(err).__name__})"
        )
        raise CheckpointError(
            f"{path}: not a plain checkpoint file (tensors, numbers and containers only), so sslhub does not load it: "
            f"{reason}"
        ) from None


def verify_checkpoint(directory: Path) -> None:
    """Every file of ``directory`` that is not safetensors or JSON loads with ``safe_load`` (or the resume stops)."""
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.endswith(SAFE_SUFFIXES):
            safe_load(path)


def read_state(directory: Path) -> dict[str, Any]:
    """The ``sslhub_state.json`` of a checkpoint: ``{"trainer": the trainer's values, "run": the run identity}``."""
    path = directory / STATE_FILE
    if (directory / LEGACY_STATE_FILE).is_file() and not path.is_file():
        raise CheckpointError(
            f"{directory} was written by an sslhub before 2026-12 (its trainer state is the pickle "
            f"{LEGACY_STATE_FILE}, which sslhub no longer loads): start a new run, from its final model if it has one"
        )
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {STATE_FILE}: not a complete sslhub checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


# Arguments a resumed run may change: where and how it runs (the views are the same with any number of workers and
# with --augment-on), where a release's file lies, logs and checkpoints, and where it stops. All others (model, data,
# batch, seed, schedule, hyperparameters, the number of processes) make another run.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume", "max_steps", "num_workers", "augment_on", "pretrained_path", "progress", "log_with",
    "log_every", "checkpoint_every", "keep_checkpoints", "knn_every", "knn_k", "knn_max_train", "knn_max_test",
})  # fmt: skip


def run_identity(args, processes: int) -> dict[str, Any]:
    """The values of the run's arguments (a dataclass) that a checkpoint must share with the run resuming it."""
    values = {key: value for key, value in asdict(args).items() if key not in RESUMABLE_CHANGES}
    return {**values, "processes": processes}


def check_same_run(directory: Path, saved: dict[str, Any] | None, run: dict[str, Any]) -> None:
    """``saved`` (the checkpoint's run identity) equals ``run``, or an error lists what differs."""
    if saved is None:
        return  # older checkpoints carry no identity
    run = json.loads(json.dumps(run))  # as the checkpoint holds it: tuples are lists
    changed = [f"{key} {saved.get(key)!r} there, {run.get(key)!r} here" for key in run if saved.get(key) != run[key]]
    if changed:
        raise CheckpointError(
            f"--resume {directory}: the checkpoint is of another run ({'; '.join(changed)}); resume with the same "
            "settings, or start a new run in another --output-dir"
        )


def check_new_output(output_dir: str, resume: str | None) -> None:
    """A new run (no ``resume``) must not write into an output directory that holds another run's checkpoints: its
    own would be pruned as the older ones, and a later ``--resume latest`` would continue the other run."""
    found = checkpoint_dirs(output_dir)
    if found and not resume:
        raise CheckpointError(
            f"{output_dir} holds the checkpoints of an earlier run (up to {found[-1].name}): pass --resume latest to "
            "continue it, or choose another --output-dir"
        )


def restore_checkpoint(accelerator: Accelerator, resume: str | None, output_dir: str, run: dict[str, Any], state):
    """Load the checkpoint ``resume`` names (``"latest"`` in ``output_dir``, or a directory), verified safe and of
    this ``run``, into the objects Accelerate prepared and the trainer's ``state`` (``load_state_dict`` of its JSON
    values); returns the checkpoint directory, or ``None`` when there is none to resume."""
    checkpoint = resolve_resume(resume, output_dir) if resume else None
    if checkpoint is None:
        return None
    verify_checkpoint(checkpoint)
    saved = read_state(checkpoint)
    check_same_run(checkpoint, saved.get("run"), run)
    accelerator.load_state(str(checkpoint))
    state.load_state_dict(saved["trainer"])
    accelerator.print(f"Resumed from {checkpoint} at step {state.step}")
    return checkpoint
