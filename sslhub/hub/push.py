"""Publishing a checkpoint: config, safetensors and model card (plus a training-curve plot and, on request, the
TensorBoard logs) in a single Hub commit. Tokens come from huggingface_hub (``HF_TOKEN``, ``hf auth login``) and are
never printed; a failed push raises ``HubError`` with one sentence and commits nothing."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled

from sslhub.hub.cards import PLACEHOLDER_REPO, with_section
from sslhub.hub.checkpoints import CARD_NAME, PICKLE_SUFFIXES, WEIGHT_PATTERNS, checkpoint_files, matches
from sslhub.hub.curves import find_log_dir, training_curves_png
from sslhub.hub.errors import LOGIN_HINT, HubError, explained, http_error, status_text

LOGS_IN_REPO = "runs"  # where the Hub looks for TensorBoard logs
CURVES_FILE = "training_curves.png"
CURVES_START = "<!-- sslhub training curves: start -->"
CURVES_END = "<!-- sslhub training curves: end -->"


def _log_files(log_dir: Path) -> dict[str, Path]:
    """The files of a TensorBoard log directory by their path in the repo (under ``runs/``)."""
    files = [path for path in sorted(log_dir.rglob("*")) if path.is_file()]
    return {f"{LOGS_IN_REPO}/{path.relative_to(log_dir).as_posix()}": path for path in files}


def _card_for_repo(card: str, repo_id: str, curves: bool, logs: bool) -> str:
    """The card as pushed to ``repo_id``: its usage snippet names the repo, and a section shows the training curves."""
    card = card.replace(PLACEHOLDER_REPO, repo_id)
    if not curves:
        return card
    section = f"## Training curves\n\n![Training curves]({CURVES_FILE})"
    if logs:
        section += (
            f"\n\nTensorBoard logs of the run: [`{LOGS_IN_REPO}/`]({LOGS_IN_REPO}) (the Hub's *Training metrics* tab)."
        )
    return with_section(card, CURVES_START, CURVES_END, section)


def _push_message(err: BaseException, repo_id: str, directory: Path) -> str | None:
    """One sentence for a failed push to ``repo_id``; ``None`` for errors this does not know."""
    endpoint = constants.ENDPOINT
    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot push {directory} to {repo_id} while HF_HUB_OFFLINE is set"
    heading, _, reasons = str(err).partition("\n")
    if isinstance(err, ValueError) and heading.startswith("Invalid metadata in README.md"):
        return f"{endpoint} rejects the model card of {directory}: {' '.join(reasons.split())}"
    http = http_error(err)
    if http is not None and http.response.status_code == 401:
        return f"pushing to {repo_id} needs a Hugging Face token with write access ({status_text(http)}; {LOGIN_HINT})"
    if http is not None and http.response.status_code == 403:
        return f"your Hugging Face token cannot write to {repo_id} ({status_text(http)})"
    if http is not None:
        return f"pushing {directory} to {repo_id} failed ({status_text(http)}); nothing was committed"
    return None


def push_checkpoint(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    with_logs: bool = False,
    token: str | bool | None = None,
) -> CommitInfo:
    """Upload the sslhub checkpoint in ``directory`` to the Hub model repo ``repo_id`` in a single commit.

    Uploads ``config.json``, the safetensors weights, the ``README.md`` card (its usage snippet set to ``repo_id``) and
    the other top-level JSON / PNG files; when the run's TensorBoard logs exist (``OUT/sslhub`` for ``OUT`` and
    ``OUT/pretraining``) a training-curve plot is added to the card, and ``with_logs`` uploads the logs to ``runs/``.
    Weight files of an earlier push that this one does not replace are deleted in the same commit. The repo is created
    if needed (``private`` applies to a new repo only); ``revision`` is a branch, created from main if missing.
    ``token``: default huggingface_hub's (``HF_TOKEN``, ``hf auth login``). Returns the commit
    (``.oid``, ``.commit_url``); raises ``HubError`` for a directory that is not a pushable checkpoint or a failed push.
    """
    directory = Path(directory)
    files = checkpoint_files(directory)
    log_dir = find_log_dir(directory)
    logs = _log_files(log_dir) if with_logs and log_dir else {}
    if any(path.suffix in PICKLE_SUFFIXES for path in logs.values()):
        raise HubError(f"the logs in {log_dir} contain pickle files: push without --with-logs")
    curves = training_curves_png(log_dir) if log_dir else None
    card = _card_for_repo(files.pop(CARD_NAME).read_text(encoding="utf-8"), repo_id, curves is not None, bool(logs))
    contents: dict[str, Path | bytes] = {**files, **logs, CARD_NAME: card.encode()}
    if curves is not None:
        contents[CURVES_FILE] = curves
    with explained(_push_message, repo_id, directory):
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = [path for path in remote if matches(path, WEIGHT_PATTERNS) and path not in contents]
        return api.create_commit(
            repo_id,
            [CommitOperationAdd(path, source) for path, source in contents.items()]
            + [CommitOperationDelete(path) for path in stale],
            commit_message=commit_message or f"Upload {directory.resolve().name} with sslhub",
            revision=revision,
        )
