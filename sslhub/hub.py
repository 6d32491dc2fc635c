"""The Hugging Face Hub side of sslhub.

Model cards: Hub metadata (``ModelCardData`` + ``model-index``) and a README body rendered from the package template
``sslhub/templates/modelcard.md`` with ``huggingface_hub.ModelCard.from_template``.

Push (``push_checkpoint``, ``sslhub push``): config, safetensors and card (plus a training-curve plot and, on request,
the TensorBoard logs) in a single commit. Download (``resolve_checkpoint``, used by ``sslhub.from_pretrained``):
huggingface_hub's cache, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``, safetensors only, never remote code. Tokens come from
huggingface_hub (``HF_TOKEN``, ``hf auth login``) and are never printed; what cannot be done raises ``HubError`` with
one sentence.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sslhub.files import write_atomically

TEMPLATE = "templates/modelcard.md"
CARD_TASKS = ("features", "pretraining", "classification")
MODEL_TYPE = "sslhub"  # SSLConfig.model_type
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PLACEHOLDER_REPO = "path/to/this/model"  # the card's usage snippet until the model has a repo id
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.md", "*.png")  # top-level files of a checkpoint that a push uploads
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
LOG_DIR = "sslhub"  # the TensorBoard run of `sslhub pretrain`, inside its output directory
EVENTS_GLOB = "events.out.tfevents.*"
LOGS_IN_REPO = "runs"  # where the Hub looks for TensorBoard logs
CURVES_FILE = "training_curves.png"
CURVES_START = "<!-- sslhub training curves: start -->"
CURVES_END = "<!-- sslhub training curves: end -->"
HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only")
LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


class HubError(ValueError):
    """A push or download that cannot go on, explained in one sentence (``sslhub`` CLI: printed, exit status 2)."""


# ``--data`` values of sslhub.data that are not paths: (display name, Hub dataset id or None).
_NAMED_DATA = {
    "builtin": ("scikit-learn digits (builtin)", None),
    "fashion-mnist": ("Fashion-MNIST", "zalando-datasets/fashion_mnist"),
    "lvd-142m": ("LVD-142M (DINOv2's curated data, not public)", None),
}


def describe_data(data: str) -> tuple[str, str | None]:
    """(display name, Hub dataset id) of a training ``data`` value; a local path shows only its last component."""
    if data in _NAMED_DATA:
        return _NAMED_DATA[data]
    if os.path.isabs(data) or os.path.exists(data):
        return f"{Path(data).name or data} (local data)", None
    return data, data


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def accuracy_fraction(name: str, value: Any) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"result {name!r} = {value} is not an accuracy in [0, 1] (give fractions, not percent)")
    return value


def accuracy_result(metric: str, value: float, dataset_name: str, dataset_id: str | None = None) -> EvalResult:
    """One ``model-index`` entry: image-classification accuracy ``value`` (a fraction) of ``metric`` on a dataset
    (``dataset_id``: its Hub id when there is one)."""
    return EvalResult(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=dataset_id or dataset_name,
        dataset_name=dataset_name,
        metric_type="accuracy",
        metric_name=metric,
        metric_value=accuracy_fraction(metric, value),
    )


def render_model_card(
    *,
    method: str,
    backbone: str,
    task: str,
    num_parameters: int,
    method_info: dict[str, str],
    training: dict[str, Any] | None = None,
    results: dict[str, float] | None = None,
    model_id: str | None = None,
    license: str = "apache-2.0",
    source: str | None = None,
    pretrained_name: str | None = None,
    eval_data: str | None = None,
) -> ModelCard:
    """The model card (README.md) of an sslhub checkpoint.

    ``task``: ``"features"`` (released encoder), ``"pretraining"`` (full objective state) or ``"classification"``
    (a fine-tuned classifier: ``training`` is then the fine-tuning recipe).
    ``method_info``: ``paper`` (title), ``arxiv`` (id), ``citation`` (BibTeX), ``released_encoder`` (text).
    ``training``: flat dict of pretraining hyperparameters; ``training["data"]`` names the data (a local path is
    shown by its last component only). ``results``: metric name -> top-1 accuracy in [0, 1] (e.g.
    ``{"kNN top-1 (k=20)": 0.91}``; ``None`` values are skipped), written to the body and to ``model-index``.
    ``source``: where converted weights come from (the authors' release), shown under "Pretraining";
    ``pretrained_name``: the ``"preset.tag"`` that ``sslhub.create_model(..., pretrained=True)`` loads;
    ``eval_data``: the data ``results`` were measured on when it is not the training data (DINOv2: LVD-142M /
    ImageNet).
    """
    if task not in CARD_TASKS:
        raise ValueError(f"task must be one of {CARD_TASKS}, got {task!r}")
    hyperparameters = dict(training or {})
    data = hyperparameters.pop("data", None)
    data_name, dataset_id = describe_data(str(data)) if data is not None else (None, None)
    name = model_id or f"{method}_{backbone}"
    results = {
        metric: accuracy_fraction(metric, value) for metric, value in (results or {}).items() if value is not None
    }
    eval_name, eval_id = describe_data(eval_data) if eval_data is not None else (data_name, dataset_id)
    if results and eval_name is None:
        raise ValueError('results need training["data"] (or eval_data) to name the dataset they were measured on')
    eval_results = [accuracy_result(metric, value, eval_name, eval_id) for metric, value in results.items()]
    card_data = ModelCardData(
        library_name="sslhub",
        pipeline_tag="image-classification" if task == "classification" else "image-feature-extraction",
        tags=["self-supervised", method, backbone],
        license=license,
        datasets=sorted({id_ for id_ in (dataset_id, eval_id) if id_}) or None,
        eval_results=eval_results or None,
        model_name=name if eval_results else None,
    )
    template = resources.files("sslhub").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=name,
        repo=model_id or PLACEHOLDER_REPO,
        task=task,
        method=method,
        backbone=backbone,
        num_parameters=f"{num_parameters / 1e6:.1f}M ({num_parameters:,})",
        paper=method_info.get("paper"),
        arxiv=method_info.get("arxiv"),
        citation=(method_info.get("citation") or "").strip(),
        released_encoder=method_info.get("released_encoder"),
        data_name=data_name,
        eval_data_name=eval_name,
        source=source,
        pretrained_name=pretrained_name,
        hyperparameters=[(_cell(key), _cell(value)) for key, value in hyperparameters.items()],
        results=[(_cell(metric), f"{100 * value:.2f}%") for metric, value in results.items()],
    )


def save_model_card(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write ``card`` to ``directory/README.md`` atomically."""
    return write_atomically(Path(directory) / "README.md", str(card))


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def _config_kind(config: dict) -> str:
    """What a ``config.json`` that is not sslhub's belongs to."""
    if config.get("model_type"):
        return f"a transformers {config['model_type']!r} model"
    return "a timm model" if "architecture" in config else "not an sslhub model"


def _check_config(config_path: Path, name: str) -> None:
    """``HubError`` unless ``config_path`` is an sslhub ``config.json``."""
    if not config_path.is_file():
        raise HubError(
            f"{name} has no {CONFIG_NAME}, so it is not an sslhub checkpoint (convert one with `sslhub convert`)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HubError(f"the {CONFIG_NAME} of {name} is not valid JSON") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        kind = _config_kind(config) if isinstance(config, dict) else "not an sslhub model"
        raise HubError(f"{name} is {kind}, not an sslhub checkpoint: convert it with `sslhub convert`")


def check_checkpoint(directory: str | os.PathLike, name: str | None = None) -> Path:
    """``directory`` if it holds an sslhub ``config.json`` and safetensors weights, else ``HubError``."""
    directory = Path(directory)
    name = name or str(directory)
    if not directory.is_dir():
        raise HubError(f"{name} is not a directory")
    _check_config(directory / CONFIG_NAME, name)
    if not any(directory.glob("*.safetensors")):
        raise HubError(
            f"{name} has no model.safetensors: sslhub only loads safetensors weights, never pickles (*.bin, *.pt)"
        )
    return directory


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The files a push uploads (path in the repo -> local file): the checkpoint's top-level ``UPLOAD_PATTERNS``.
    Refuses (``HubError``) a directory that is not an sslhub checkpoint, has no model card or holds pickles."""
    directory = check_checkpoint(directory)
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise HubError(
            f"{directory} contains pickle files ({', '.join(pickles)}): remove them, sslhub publishes safetensors only"
        )
    if not (directory / CARD_NAME).is_file():
        raise HubError(f"{directory} has no {CARD_NAME} model card: save the model with `save_pretrained`")
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and _matches(p.name, UPLOAD_PATTERNS)]
    return {path.name: path for path in files}


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


# ---- training curves -----------------------------------------------------------------------------------------------


def find_log_dir(directory: str | os.PathLike) -> Path | None:
    """The TensorBoard logs of the run that wrote ``directory``: ``OUT/sslhub`` for ``OUT`` and ``OUT/pretraining``."""
    directory = Path(directory)
    candidates = [directory / LOG_DIR] + ([directory.parent / LOG_DIR] if directory.name == "pretraining" else [])
    return next((path for path in candidates if any(path.rglob(EVENTS_GLOB))), None)


def training_curves_png(log_dir: str | os.PathLike) -> bytes | None:
    """Every scalar in the TensorBoard event files under ``log_dir`` (loss, learning rate, kNN monitor) against the
    optimizer step, one panel per tag, as a PNG (matplotlib, Agg canvas); ``None`` when nothing was logged."""
    from matplotlib.figure import Figure
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for run in sorted({path.parent for path in Path(log_dir).rglob(EVENTS_GLOB)}):
        accumulator = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            series.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    if not series:
        return None
    columns = min(3, len(series))
    rows = -(-len(series) // columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), dpi=100, layout="constrained")  # no pyplot: no global state
    panels = figure.subplots(rows, columns, squeeze=False).flat
    for axes, (tag, points) in zip(panels, sorted(series.items()), strict=False):  # the last row may have spare panels
        steps, values = zip(*sorted(points), strict=True)
        axes.plot(steps, values, marker="." if len(steps) <= 50 else None)
        axes.set(title=tag, xlabel="step")
        axes.ticklabel_format(axis="y", useOffset=False)  # plain values: a learning rate is read as such
    for axes in figure.axes[len(series) :]:
        axes.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _log_files(log_dir: Path) -> dict[str, Path]:
    """The files of a TensorBoard log directory by their path in the repo (under ``runs/``)."""
    files = [path for path in sorted(log_dir.rglob("*")) if path.is_file()]
    return {f"{LOGS_IN_REPO}/{path.relative_to(log_dir).as_posix()}": path for path in files}


def with_section(text: str, start: str, end: str, section: str) -> str:
    """``text`` with the part between the markers ``start`` and ``end`` replaced by ``section``, or it appended."""
    before, found, rest = text.partition(start)
    after = rest.partition(end)[2] if found else ""
    return f"{before.rstrip()}\n\n{start}\n{section}\n{end}\n{after.lstrip()}"


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


# ---- errors --------------------------------------------------------------------------------------------------------


def _http_error(err: BaseException) -> HfHubHTTPError | None:
    """The ``HfHubHTTPError`` behind ``err``: failed LFS uploads arrive wrapped in a ``RuntimeError``, failed forced
    downloads in a ``ValueError``."""
    while err is not None and not isinstance(err, HfHubHTTPError):
        err = err.__cause__
    return err


def _status(err: HfHubHTTPError) -> str:
    message = " ".join((err.server_message or "").split())
    return f"HTTP {err.response.status_code}" + (f": {message}" if message else "")


def _download_message(err: BaseException, repo_id: str, revision: str | None) -> str | None:
    """One sentence for a failed download of ``repo_id``; ``None`` for errors this does not know."""
    endpoint, err = constants.ENDPOINT, _http_error(err) or err
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
        return f"{endpoint} did not accept the token for {repo_id} ({_status(err)}; {LOGIN_HINT})"
    if isinstance(err, HfHubHTTPError):
        return f"downloading {repo_id} from {endpoint} failed ({_status(err)})"
    return None


def _push_message(err: BaseException, repo_id: str, directory: Path) -> str | None:
    """One sentence for a failed push to ``repo_id``; ``None`` for errors this does not know."""
    endpoint = constants.ENDPOINT
    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot push {directory} to {repo_id} while HF_HUB_OFFLINE is set"
    heading, _, reasons = str(err).partition("\n")
    if isinstance(err, ValueError) and heading.startswith("Invalid metadata in README.md"):
        return f"{endpoint} rejects the model card of {directory}: {' '.join(reasons.split())}"
    http = _http_error(err)
    if http is not None and http.response.status_code == 401:
        return f"pushing to {repo_id} needs a Hugging Face token with write access ({_status(http)}; {LOGIN_HINT})"
    if http is not None and http.response.status_code == 403:
        return f"your Hugging Face token cannot write to {repo_id} ({_status(http)})"
    if http is not None:
        return f"pushing {directory} to {repo_id} failed ({_status(http)}); nothing was committed"
    return None


@contextlib.contextmanager
def _explained(explain, *args) -> Iterator[None]:
    """Re-raise what ``explain(err, *args)`` can put in one sentence as ``HubError`` (without the traceback chain)."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:
        message = explain(err, *args)
        if message is None:
            raise
        raise HubError(message) from None


# ---- push ----------------------------------------------------------------------------------------------------------


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
    with _explained(_push_message, repo_id, directory):
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = [path for path in remote if _matches(path, WEIGHT_PATTERNS) and path not in contents]
        return api.create_commit(
            repo_id,
            [CommitOperationAdd(path, source) for path, source in contents.items()]
            + [CommitOperationDelete(path) for path in stale],
            commit_message=commit_message or f"Upload {directory.resolve().name} with sslhub",
            revision=revision,
        )


def add_push_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload an sslhub checkpoint to the Hugging Face Hub in one commit (token: HF_TOKEN or hf auth login)",
    )
    parser.add_argument(
        "directory", help="checkpoint directory: a `sslhub pretrain` OUT, OUT/pretraining, a fine-tuned model"
    )
    parser.add_argument("--repo-id", required=True, help="Hub model repo, org/name (created if missing)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit-message", default=None, help="default: 'Upload DIRNAME with sslhub'")
    parser.add_argument("--with-logs", action="store_true", help="also upload the run's TensorBoard logs to runs/")


def run_push(ns) -> int:
    info = push_checkpoint(
        ns.directory,
        ns.repo_id,
        private=ns.private,
        revision=ns.revision,
        commit_message=ns.commit_message,
        with_logs=ns.with_logs,
    )
    print(f"Pushed {ns.directory} to {ns.repo_id} in commit {info.oid}: {info.commit_url}")
    return 0


# ---- download ------------------------------------------------------------------------------------------------------


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
    with _explained(_download_message, repo_id, revision):
        config = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **hub))
        _check_config(config, name)  # before any weights are downloaded
        commit = config.parent.name  # the cache keeps a commit's files in snapshots/{commit id}/
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=[CONFIG_NAME, *WEIGHT_PATTERNS], **hub)
    return check_checkpoint(folder, name)
