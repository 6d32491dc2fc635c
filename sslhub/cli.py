"""Command-line front: ``sslhub list | hparams | pretrain | eval | finetune | convert | export | push``
(``python -m sslhub``). The flags of ``pretrain`` and ``finetune`` are generated from their argument dataclasses;
``--method-module`` imports a user's module that registers its own methods before the command runs."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

from sslhub.arguments import add_dataclass_arguments, dataclass_values, worker_count
from sslhub.modeling import VERBOSE_ENV
from sslhub.registry import get_method, get_preset, get_pretrained, list_models, list_pretrained

PRETRAIN_EXCLUDED = ("overrides",)  # given as --set KEY=VALUE
RESUMABLE = ("pretrain", "finetune")  # the commands an interrupted run of can be resumed
INTERRUPTED = 130  # exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it
BROKEN_PIPE = 141  # exit status when the reader of the output closed it (128 + SIGPIPE)
TERMINATED = 143  # exit status of a run stopped by SIGTERM (128 + 15): torchrun's when another process failed
PEER_FAILED = 1  # exit status of a process whose collective lost another process of the run
# What gloo / NCCL raise in a process whose peer died during a collective (a RuntimeError naming the transport).
LOST_PEER = re.compile(r"gloo|nccl|connection (reset|closed) by peer", re.IGNORECASE)


PACKAGE_DIR = Path(__file__).resolve().parent


def _one_line_warnings(command: str, default):
    """A ``warnings.showwarning`` that prints sslhub's own warnings as ``sslhub COMMAND: warning: ...``, without the
    file and line of its code; other packages' warnings as ``default`` shows them."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            print(f"sslhub {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


class Terminated(BaseException):
    """SIGTERM as an exception, so that a run stops as after Ctrl-C: cleanups (staging directories) run, one line."""


def _terminate_handler(main_pid: int):
    """The SIGTERM handler of the process ``main_pid``: ``Terminated`` there; processes forked from it (data-loading
    workers) keep the default, dying at once as before."""

    def handler(signum, frame):
        if os.getpid() == main_pid:
            raise Terminated
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    return handler


DEBUG_HELP = "on an error, show the Python traceback instead of the one-line message"
VERBOSE_HELP = "show transformers' progress bars and load reports when sslhub loads and saves models"
PRETRAINED_PATH_HELP = "the authors' file (or transformers directory) of a --model preset.tag already on disk"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _method_modules_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--method-module",
        metavar="MODULE",
        action="append",
        default=[],
        help="import this module (installed, on PYTHONPATH or in the current directory) first, so that the methods "
        "it registers can be used, e.g. my_pkg.my_method",
    )
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    parent.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parent


def import_method_modules(modules: list[str]) -> None:
    """Import the user's method modules (``--method-module``), searched on ``sys.path`` and, as ``python -m`` does,
    in the current directory; a module that cannot be imported is a clear error."""
    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--method-module {module}: cannot import it ({err})") from None


# ---- list / hparams ------------------------------------------------------------------------------------------------


def _run_list(ns: argparse.Namespace) -> int:
    """Presets (or releases) whose name matches the pattern: shell-style, or a plain word anywhere in the name
    (``sslhub list dino`` = ``sslhub list '*dino*'``)."""
    pattern = ns.pattern if any(char in ns.pattern for char in "*?[") else f"*{ns.pattern}*"
    if ns.pretrained:
        for name in list_pretrained(pattern):
            tag = get_pretrained(name)
            metrics = ", ".join(f"{metric} {value:.1f}" for metric, value in tag.metrics.items())
            print(f"{name:42s} {tag.license:13s} {metrics:28s} {tag.hf_hub_id or tag.url}")
        return 0
    for name in list_models(pattern):
        preset = get_preset(name)
        print(f"{name:32s} {preset.method:10s} {preset.backbone:26s} {preset.image_size:4d}px  {preset.description}")
    return 0


def _run_hparams(ns: argparse.Namespace) -> int:
    """Each hyperparameter of a preset's method: its value in the preset (the paper's default unless the preset sets
    it) and its help line; these are the KEYs of ``sslhub pretrain --set KEY=VALUE``."""
    preset = get_preset(ns.model)
    method = get_method(preset.method)
    values = method.validate_hparams(preset.method_kwargs)
    print(f"{preset.name}: method {method.name} ({method.paper}, arXiv {method.arxiv or '-'})")
    for name, text in method.hparam_help().items():
        print(f"  {name:24s} {json.dumps(values[name]):>14s}  {text}")
    return 0


# ---- pretrain / finetune -------------------------------------------------------------------------------------------


def _add_pretrain_parser(subparsers, parents) -> None:
    from sslhub.training import PretrainArguments

    parser = subparsers.add_parser("pretrain", parents=parents, help="pretrain a self-supervised model (Accelerate)")
    add_dataclass_arguments(parser, PretrainArguments, exclude=PRETRAIN_EXCLUDED)
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="method hyperparameter (`sslhub hparams MODEL` lists them), e.g. --set temperature=0.1 (values: JSON)",
    )


def _run_pretrain(ns: argparse.Namespace) -> int:
    from sslhub.training import PretrainArguments, pretrain

    overrides = {}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    args = PretrainArguments(**dataclass_values(ns, PretrainArguments, PRETRAIN_EXCLUDED), overrides=overrides)
    result = pretrain(args)
    print(f"Saved the released encoder to {result.output_dir}/ and the pretraining model to pretraining/ in it")
    if result.knn_final is not None:
        print(
            f"kNN top-1 (k={args.knn_k}) on {args.data}: random init {result.knn_random_init:.4f} -> "
            f"after {result.steps} steps {result.knn_final:.4f}"
        )
    return 0


def _add_finetune_parser(subparsers, parents) -> None:
    from sslhub.finetune import FinetuneArguments

    parser = subparsers.add_parser(
        "finetune", parents=parents, help="fine-tune a model on labelled images (MAE / BEiT recipe)"
    )
    add_dataclass_arguments(parser, FinetuneArguments)


def _run_finetune(ns: argparse.Namespace) -> int:
    from sslhub.finetune import FinetuneArguments, finetune

    args = FinetuneArguments(**dataclass_values(ns, FinetuneArguments))
    result = finetune(args)
    report = result.report
    print(
        f"Fine-tuned {args.model} on {args.data} for {result.steps} steps: validation top-1 {report['top1']:.4f}, "
        f"top-5 {report['top5']:.4f} ({report['num_samples']} images)"
    )
    for name, accuracy in report["per_class_accuracy"].items():
        print(f"  {name}: {accuracy:.4f}")
    print(f"Saved the classifier, metrics.json and confusion_matrix.png to {result.output_dir}")
    return 0


# ---- eval ----------------------------------------------------------------------------------------------------------


def _add_eval_parser(subparsers, parents) -> None:
    """``sslhub eval knn | linear``: the arguments of ``sslhub.evaluation.knn`` and ``linear``."""
    common = argparse.ArgumentParser(add_help=False, parents=parents)
    common.add_argument("--model", required=True, help="preset, preset.tag, checkpoint dir or Hub id")
    common.add_argument("--pretrained-path", metavar="FILE", help=PRETRAINED_PATH_HELP)
    common.add_argument("--data", required=True, help="image folder (a subfolder per class), HF dataset dir, 'builtin'")
    common.add_argument("--output-dir", help="for metrics.json and confusion_matrix.png (default: sslhub-eval/...)")
    common.add_argument("--image-column", help="image column of an HF dataset")
    common.add_argument("--label-column", help="label column of an HF dataset")
    common.add_argument("--val-fraction", type=float, default=0.2, help="held out when the data has no split")
    common.add_argument("--seed", type=int, default=0, help="seed of the split and of the linear probe")
    common.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch")
    common.add_argument(
        "--num-workers",
        type=worker_count,
        default="auto",
        help="data-loading worker processes, or 'auto': min(8, available CPUs - 1), at least 0",
    )
    common.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    common.add_argument("--no-cache", action="store_true", help="extract features again, do not cache them")
    common.add_argument("--no-card", action="store_true", help="leave the checkpoint's model card as it is")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser = subparsers.add_parser("eval", help="kNN or linear-probe accuracy of frozen features on labelled images")
    protocols = parser.add_subparsers(dest="protocol", required=True)
    knn_parser = protocols.add_parser("knn", parents=[common], help="weighted kNN (InstDisc / DINO)")
    knn_parser.add_argument("--k", type=int, nargs="+", default=[20, 200], help="numbers of neighbours")
    knn_parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    linear_parser = protocols.add_parser("linear", parents=[common], help="linear probe (official recipe or L-BFGS)")
    linear_parser.add_argument("--method", choices=["sgd", "lbfgs"], default="sgd", help="recipe or L-BFGS")
    linear_parser.add_argument("--epochs", type=int, help="default: the recipe's, at least 1000 steps")
    linear_parser.add_argument("--lr", type=float, help="absolute learning rate (default: the recipe's)")
    linear_parser.add_argument("--train-batch-size", type=int, help="linear-probe batch (default: the recipe's)")
    linear_parser.add_argument("--weight-decay", type=float, help="default: the recipe's (0)")
    linear_parser.add_argument(
        "--batchnorm", action=argparse.BooleanOptionalAction, help="BatchNorm without affine before the layer"
    )
    linear_parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of --method lbfgs")
    linear_parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations of --method lbfgs")


def _default_output_dir(protocol: str, model: str, data: str) -> Path:
    def stem(name: str) -> str:
        return Path(name).name if Path(name).exists() else name.replace("/", "--")

    return Path("sslhub-eval") / stem(model) / f"{protocol}-{stem(data)}"


def _print_report(name: str, report: dict, shown: int = 20) -> None:
    """Top-1 / top-5 and the per-class accuracy: of every class up to ``shown`` classes, else of the worst ones."""
    per_class = report["per_class_accuracy"]
    label = "per class"
    if len(per_class) > shown:
        per_class, label = dict(sorted(per_class.items(), key=lambda item: item[1])[:5]), "lowest per class"
    print(f"{name}: top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%")
    print(f"  {label}: " + ", ".join(f"{cls} {100 * value:.2f}%" for cls, value in per_class.items()))


def _run_eval(ns: argparse.Namespace) -> int:
    """Run ``sslhub eval knn | linear`` and print the accuracies and the files written."""
    from sslhub.evaluation import knn, linear

    output_dir = ns.output_dir or _default_output_dir(ns.protocol, ns.model, ns.data)
    options = dict(
        val_fraction=ns.val_fraction,
        seed=ns.seed,
        image_column=ns.image_column,
        label_column=ns.label_column,
        batch_size=ns.batch_size,
        num_workers=ns.num_workers,
        device=ns.device,
        cache=not ns.no_cache,
        progress=not ns.no_progress,
        output_dir=output_dir,
        update_card=not ns.no_card,
        pretrained_path=ns.pretrained_path,
    )
    if ns.protocol == "knn":
        result = knn(ns.model, ns.data, k=ns.k, temperature=ns.temperature, **options)
        reports = {f"kNN (k={k})": report for k, report in result["by_k"].items()}
    else:
        result = linear(
            ns.model,
            ns.data,
            method=ns.method,
            epochs=ns.epochs,
            lr=ns.lr,
            train_batch_size=ns.train_batch_size,
            weight_decay=ns.weight_decay,
            batchnorm=ns.batchnorm,
            C=ns.C,
            max_iter=ns.max_iter,
            **options,
        )
        reports = {f"linear probe ({ns.method})": result}
    print(
        f"{result['model']} on {result['data']}: {result['num_train']} training / {result['num_eval']} evaluation "
        f"images, {len(result['class_names'])} classes, {result['feature_dim']}-d features"
    )
    for name, report in reports.items():
        _print_report(name, report)
    for kind, path in result["files"].items():
        print(f"{'Updated' if kind == 'model_card' else 'Wrote'} {path}")
    return 0


# ---- convert / export / push ---------------------------------------------------------------------------------------


def _add_convert_parser(subparsers, parents) -> None:
    parser = subparsers.add_parser(
        "convert",
        parents=parents,
        help="convert an official checkpoint (file or transformers directory) into an sslhub checkpoint",
    )
    parser.add_argument("--model", required=True, help="sslhub preset (or preset.tag) the checkpoint belongs to")
    parser.add_argument("--checkpoint", required=True, help="the authors' file, or a transformers model directory")
    parser.add_argument("--output", required=True, help="sslhub checkpoint directory to write")
    parser.add_argument(
        "--task",
        default="features",
        choices=["features", "pretraining"],
        help="'features': the released encoder; 'pretraining': also heads / teacher / queue",
    )
    parser.add_argument("--layout", default=None, help="checkpoint layout (default: detected from the file)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty output, replacing only sslhub's files there"
    )


def _run_convert(ns: argparse.Namespace) -> int:
    from sslhub.conversion.convert import convert_checkpoint, save_atomically
    from sslhub.files import check_output_directory

    check_output_directory(ns.output, ns.overwrite, "--overwrite")  # before the conversion's work
    model = convert_checkpoint(ns.model, ns.checkpoint, task=ns.task, layout=ns.layout)
    save_atomically(model, ns.output, overwrite=ns.overwrite)
    print(f"Converted {ns.checkpoint} ({ns.model}, {ns.task}) to {ns.output}")
    return 0


def _add_export_parser(subparsers, parents) -> None:
    parser = subparsers.add_parser(
        "export", parents=parents, help="write an sslhub model as a plain timm or transformers checkpoint"
    )
    parser.add_argument("--model", required=True, help="sslhub checkpoint directory or Hub id, or preset.tag")
    parser.add_argument("--pretrained-path", metavar="FILE", help=PRETRAINED_PATH_HELP)
    parser.add_argument("--format", required=True, choices=["timm", "transformers"])
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty output, replacing only sslhub's files there"
    )


def _run_export(ns: argparse.Namespace) -> int:
    from sslhub.conversion.pretrained import is_release_name, refuse_pretrained_path
    from sslhub.export import export_timm, export_transformers
    from sslhub.factory import create_model, from_pretrained
    from sslhub.files import check_output_directory

    check_output_directory(ns.output, ns.overwrite, "--overwrite")  # before loading the model

    if is_release_name(ns.model):
        model = create_model(ns.model, pretrained=True, pretrained_path=ns.pretrained_path)
    else:
        refuse_pretrained_path(ns.model, ns.pretrained_path)
        model = from_pretrained(ns.model)
    export = export_timm if ns.format == "timm" else export_transformers
    print(f"Exported {ns.model} as a {ns.format} checkpoint to {export(model, ns.output, overwrite=ns.overwrite)}")
    return 0


def _add_push_parser(subparsers) -> None:
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


def _run_push(ns: argparse.Namespace) -> int:
    from sslhub.hub.push import push_checkpoint

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


# ---- main ----------------------------------------------------------------------------------------------------------


RUNNERS = {
    "list": _run_list,
    "hparams": _run_hparams,
    "pretrain": _run_pretrain,
    "eval": _run_eval,
    "finetune": _run_finetune,
    "convert": _run_convert,
    "export": _run_export,
    "push": _run_push,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslhub", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    parents = [_method_modules_parser()]
    list_parser = subparsers.add_parser("list", parents=parents, help="list the model presets")
    list_parser.add_argument(
        "pattern", nargs="?", default="*", help="shell-style pattern ('dino_*') or a word the name contains ('dino')"
    )
    list_parser.add_argument("--pretrained", action="store_true", help="list the releases with official weights")
    hparams_parser = subparsers.add_parser(
        "hparams", parents=parents, help="a preset's method hyperparameters: value and help (the keys of --set)"
    )
    hparams_parser.add_argument("model", help="preset name (`sslhub list`)")
    _add_pretrain_parser(subparsers, parents)
    _add_eval_parser(subparsers, parents)
    _add_finetune_parser(subparsers, parents)
    _add_convert_parser(subparsers, parents)
    _add_export_parser(subparsers, parents)
    _add_push_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; sslhub's own errors print one line (exit status 2), Ctrl-C one line (130), SIGTERM one line
    (143: torchrun stops the other processes so when one fails) and a collective that lost another process of the run
    one line (1), unless ``--debug`` asks for the traceback."""
    ns = build_parser().parse_args(argv)
    if ns.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by sslhub.modeling.quiet_transformers, here and in worker processes
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous = signal.signal(signal.SIGTERM, _terminate_handler(os.getpid())) if in_main_thread else None
    show_warning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(ns.command, show_warning)
    resume_hint = "; resume with --resume latest" if ns.command in RESUMABLE else ""
    try:
        import_method_modules(getattr(ns, "method_module", []))
        return RUNNERS[ns.command](ns)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError and HubError are ValueErrors
        if ns.debug:
            raise
        print(f"sslhub {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        if ns.debug:
            raise
        terminated = isinstance(stop, Terminated)
        print(f"sslhub {ns.command}: {'terminated' if terminated else 'interrupted'}{resume_hint}", file=sys.stderr)
        return TERMINATED if terminated else INTERRUPTED
    except RuntimeError as err:
        if ns.debug or not LOST_PEER.search(str(err)):
            raise
        cause = str(err).strip().splitlines()[0].split(". This is typically")[0]  # without gloo's generic advice
        print(
            f"sslhub {ns.command}: error: another process of this run stopped ({cause}); its log names why"
            f"{resume_hint}",
            file=sys.stderr,
        )
        return PEER_FAILED
    except BrokenPipeError:  # `sslhub list | head`: the reader left, as for any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return BROKEN_PIPE
    finally:
        warnings.showwarning = show_warning
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
