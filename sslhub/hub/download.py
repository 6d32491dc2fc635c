"""Downloading a checkpoint (``sslhub.from_pretrained``): huggingface_hub's cache, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE``; only ``config.json`` and safetensors are fetched, never pickles or code; what cannot be done raises
``HubError`` with one sentence."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sslhub.hub.checkpoints import CONFIG_NAME, WEIGHT_PATTERNS, check_checkpoint, check_config
from sslhub.hub.errors import LOGIN_HINT, explained, http_error, status_text

HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only")


def _download_message(err: BaseException, repo_id: str, revision: str | None) -> str | None:
    """One sentence for a failed download of ``repo_id``; ``None`` for errors this does not know."""
    endpoint, err = constants.ENDPOINT, http_error(err) or err
    if isinstance(err, GatedRepoError):
        return f"{repo_id} is gated: request access on its Hub page, then use a token that has it ({LOGIN_HINT})"
    if isinstance(err, RepositoryNotFoundError) and err.response.status_code == 401:
        return (
            f"{repo_id} is private, gated or missing on {endpoint}: log in with a token that can read it ({LOGIN_HINT})"
        )
    if isinstance(err, RepositoryNotFoundError):
        return f"there is no Hub repo {repo_id} on {endpoint} (a private one also needs a token that can read it)"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} (give a branch, a tag or a commit id)"
    if isinstance(err, LocalEntryNotFoundError):
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{endpoint} cannot be reached"
        return f"{repo_id} (revision {revision or 'main'}) is not in the Hugging Face cache and {where}"
    if isinstance(err, EntryNotFoundError):
        return f"{repo_id} has no {CONFIG_NAME}, so it is not an sslhub checkpoint (convert one with `sslhub convert`)"
    if isinstance(err, HFValidationError):
        return f"{repo_id!r} is neither a local directory nor a Hub repo id (org/name)"
    if isinstance(err, HfHubHTTPError) and err.response.status_code == 401:
        return f"{endpoint} did not accept the token for {repo_id} ({status_text(err)}; {LOGIN_HINT})"
    if isinstance(err, HfHubHTTPError):
        return f"downloading {repo_id} from {endpoint} failed ({status_text(err)})"
    return None


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """The directory of an sslhub checkpoint: ``name_or_path`` itself when it is a local directory, else the snapshot
    of the Hub repo ``name_or_path`` at ``revision`` downloaded by huggingface_hub (its cache, ``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE``). Only ``config.json`` and safetensors files are fetched (never pickles or code), and the config
    is checked before the weights are downloaded. Raises ``HubError`` with one sentence when that is not possible."""
    if Path(name_or_path).is_dir():
        return check_checkpoint(name_or_path)
    repo_id, name = str(name_or_path), f"{name_or_path} (revision {revision or 'main'})"
    hub = {
        "token": token,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "local_files_only": local_files_only,
    }
    with explained(_download_message, repo_id, revision):
        config = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **hub))
        check_config(config, name)  # before any weights are downloaded
        commit = config.parent.name  # the cache keeps a commit's files in snapshots/{commit id}/
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=[CONFIG_NAME, *WEIGHT_PATTERNS], **hub)
    return check_checkpoint(folder, name)
