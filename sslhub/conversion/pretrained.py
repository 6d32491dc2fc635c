"""``create_model("name.tag", pretrained=True)``: fetch the authors' release, convert it once, cache the result.

Where the weights come from, in order: ``pretrained_path`` (a file or HF directory already on disk); the file of
that name in ``$SSLHUB_PRETRAINED_DIR``; the Hub copy in timm format (``huggingface_hub`` and its cache,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) when the tag names one and the task needs only the encoder; else the authors'
URL (``torch.hub`` download with a progress bar, into the sslhub cache). The converted model is saved as an sslhub
checkpoint under ``$SSLHUB_CACHE`` (default ``~/.cache/sslhub``), so the next call only loads safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from sslhub.configuration import SSLConfig
from sslhub.conversion.convert import build_converted_model, read_checkpoint, save_atomically
from sslhub.conversion.loading import CheckpointError
from sslhub.files import cache_root, write_atomically
from sslhub.modeling import model_class
from sslhub.registry import PretrainedTag, get_method, get_preset, get_pretrained

logger = logging.getLogger(__name__)
PRETRAINED_DIR_ENV = "SSLHUB_PRETRAINED_DIR"
PASS_FILE = "pass --pretrained-path FILE (Python: pretrained_path=FILE)"  # a release's file, on the CLI and in Python
CACHE_FORMAT = 2  # bump when converted checkpoints of the same release would be written differently


def _download_url(url: str, destination: Path) -> Path:
    if destination.is_file():
        return destination
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"{destination.name} is not in the sslhub cache and HF_HUB_OFFLINE is set: download {url} yourself and "
            f"{PASS_FILE} or put it in ${PRETRAINED_DIR_ENV} as {destination.name}"
        )
    import torch.hub

    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(destination), progress=True)  # writes a temp file, then renames
    return destination


def release_source(tag: PretrainedTag, task: str, pretrained_path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``(path, layout)`` of the file to convert for ``tag``; layout ``""`` means "detect from the file"."""
    if pretrained_path is not None:
        path = Path(pretrained_path)
        if not path.exists():
            raise CheckpointError(f"--pretrained-path (pretrained_path) {str(path)!r} does not exist")
        return path, ""
    want_full = task == "pretraining" and tag.full_url
    url = tag.full_url if want_full else tag.url
    name = url.rsplit("/", 1)[-1] if want_full else tag.file_name
    local_dir = os.environ.get(PRETRAINED_DIR_ENV)
    if local_dir and (Path(local_dir) / name).is_file():
        return Path(local_dir) / name, ""
    if tag.converted_file:
        raise CheckpointError(
            f"{tag.name}: sslhub reads {tag.converted_file}, the PyTorch conversion of the authors' {url} "
            f"({tag.conversion}); {PASS_FILE} or put it in ${PRETRAINED_DIR_ENV}"
        )
    if tag.hf_hub_id and not want_full:
        try:
            return Path(hf_hub_download(tag.hf_hub_id, tag.hf_filename)), "backbone"
        except HfHubHTTPError as err:
            raise CheckpointError(
                f"{tag.name}: could not download {tag.hf_filename} from {tag.hf_hub_id} ({err})"
            ) from err
        except LocalEntryNotFoundError as err:
            raise CheckpointError(
                f"{tag.name}: {tag.hf_hub_id}/{tag.hf_filename} is not in the Hugging Face cache and the Hub cannot be "
                f"reached (offline); {PASS_FILE} with {tag.file_name} from {tag.url}"
            ) from err
    return _download_url(url, cache_root() / "downloads" / name), ""


def is_release_name(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a release, ``"preset.tag"``, rather than a checkpoint directory or a Hub id
    (``org/name``)."""
    return "." in str(name) and "/" not in str(name) and not Path(name).is_dir()


def refuse_pretrained_path(model, pretrained_path) -> None:
    """A release file given for a model that is not a release (a preset, a directory, a Hub id): ``ValueError``."""
    if pretrained_path is not None:
        raise ValueError(
            f"--pretrained-path (pretrained_path) is the file of a release 'preset.tag' (`sslhub list --pretrained`); "
            f"{str(model)!r} is not one"
        )


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": CACHE_FORMAT}


def load_pretrained(name: str, task: str = "features", pretrained_path=None, **overrides):
    """The release ``name`` (``"preset.tag"``) as a ``task`` model, converted on first use and cached; a cached
    conversion that no longer loads (a truncated or edited file, NaN weights) is converted again, with a warning
    naming it."""
    tag = get_pretrained(name)
    cached_task = "pretraining" if task == "pretraining" else "features"
    path, layout = release_source(tag, cached_task, pretrained_path)
    cache_dir = cache_root() / "converted" / tag.name / cached_task
    stamp = _stamp(path)
    stamp_file = cache_dir / "source.json"
    if stamp_file.is_file() and _read_stamp(stamp_file) == stamp:
        try:
            return _load_cached(cache_dir, task, overrides)
        except (CheckpointError, OSError) as err:  # transformers raises OSError for an unreadable config.json
            logger.warning("the cached conversion %s does not load (%s): converting %s again", cache_dir, err, path)
    _convert_into_cache(tag, path, layout, cached_task, cache_dir, stamp)
    return _load_cached(cache_dir, task, overrides)


def _read_stamp(stamp_file: Path) -> dict | None:
    """The source a cached conversion was made from (``_stamp``), or None when the stamp cannot be read."""
    try:
        return json.loads(stamp_file.read_text())
    except (OSError, ValueError):  # a truncated stamp: the cache is converted again
        return None


def _convert_into_cache(tag: PretrainedTag, path: Path, layout: str, task: str, cache_dir: Path, stamp: dict) -> None:
    """Convert ``path`` into ``cache_dir`` (sslhub's own directory, replaced whole: an earlier conversion's files go
    first) and stamp it with its source; the stamp goes first, so that a conversion cut short is never taken for a
    finished one."""
    (cache_dir / "source.json").unlink(missing_ok=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    converted = read_checkpoint(path, layout or None)
    config = SSLConfig.from_preset(tag.preset, **tag.overrides)
    recorded = {k: v for k, v in converted.method_overrides.items() if k in config.method_kwargs}
    model = build_converted_model(config.with_overrides(**recorded), converted, task, str(path))
    save_atomically(model, cache_dir, model.model_card(**release_card_fields(tag)))
    write_atomically(cache_dir / "source.json", json.dumps(stamp))


def _load_cached(cache_dir: Path, task: str, overrides: dict):
    """The cached conversion as a ``task`` model, ``overrides`` applied to its config; loaded strictly."""
    config = SSLConfig.from_pretrained(cache_dir).with_overrides(**overrides)
    return model_class(task).from_pretrained(cache_dir, config=config, use_safetensors=True)


METRIC_NAMES = {"knn": "k-NN", "linear": "linear probe", "finetune": "fine-tuning"}


def release_card_fields(tag: PretrainedTag) -> dict:
    """What a converted release's model card says: source, licence, epochs and the authors' metrics."""
    training = {"data": tag.pretraining_data or tag.dataset} | (
        {"epochs": tag.epochs} if tag.epochs is not None else {}
    )
    results = {
        f"ImageNet {METRIC_NAMES.get(metric, metric)} top-1 (authors)": round(value / 100, 6)
        for metric, value in tag.metrics.items()
    }
    method = get_method(get_preset(tag.preset).method)
    return {
        "training": training,
        "results": results,
        "license": tag.license,
        "model_id": tag.name,
        "pretrained_name": tag.name,
        "eval_data": tag.dataset,
        "source": f"{tag.source or method.paper}: {tag.url}"
        + (f", read as its PyTorch conversion {tag.converted_file} ({tag.conversion})" if tag.converted_file else ""),
    }
