"""Command-line front: ``sslhub list | pretrain | eval | finetune | convert | export | push`` (``python -m sslhub``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sslhub.evaluate import add_eval_parser, run_eval
from sslhub.finetune import add_finetune_parser, run_finetune
from sslhub.hub import add_push_parser, run_push
from sslhub.registry import get_preset, get_pretrained, list_models, list_pretrained

# flag -> (type, help); defaults come from PretrainArguments
PRETRAIN_FLAGS = {
    "model": (str, "preset name (`sslhub list`) or an sslhub pretraining checkpoint directory to continue from"),
    "data": (str, "'builtin' (scikit-learn digits), 'fashion-mnist', an image folder or an HF dataset directory"),
    "output_dir": (str, "where the models, checkpoints and logs go"),
    "epochs": (int, "number of epochs (default: the method's)"),
    "batch_size": (int, "images per process and step"),
    "lr": (float, "absolute learning rate (default: the method's base lr x global batch / 256)"),
    "warmup_epochs": (float, "linear warm-up epochs (default: the method's)"),
    "weight_decay": (float, "weight decay (default: the method's)"),
    "image_size": (int, "training image size (default: the preset's)"),
    "seed": (int, "random seed: data order and augmentations are functions of it"),
    "num_workers": (int, "data-loading worker processes"),
    "mixed_precision": (str, "'no', 'fp16' or 'bf16'"),
    "gradient_accumulation_steps": (int, "micro-batches per optimizer step"),
    "checkpoint_every": (int, "save a resumable checkpoint every N optimizer steps"),
    "keep_checkpoints": (int, "how many checkpoints to keep"),
    "max_steps": (int, "stop after this many optimizer steps (schedules still span --epochs)"),
    "knn_every": (int, "weighted-kNN monitor every N epochs when the data has labels (0: off)"),
    "knn_k": (int, "neighbours of the kNN monitor"),
    "log_every": (int, "log the loss every N steps"),
    "image_column": (str, "image column of an HF dataset"),
    "label_column": (str, "label column of an HF dataset"),
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_pretrain_parser(subparsers) -> None:
    from sslhub.training import PretrainArguments

    parser = subparsers.add_parser("pretrain", help="pretrain a self-supervised model with Accelerate")
    defaults = PretrainArguments()
    for name, (kind, text) in PRETRAIN_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name), help=text)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the newest checkpoint in --output-dir, or from the checkpoint directory given",
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="method hyperparameter, e.g. --set temperature=0.1 --set queue_size=4096 (values parsed as JSON)",
    )
    parser.add_argument("--log-with", default="tensorboard", help="Accelerate tracker, or 'none'")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_pretrain(ns: argparse.Namespace) -> int:
    from sslhub.training import PretrainArguments, pretrain

    overrides = {}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    values = {name: getattr(ns, name) for name in PRETRAIN_FLAGS}
    args = PretrainArguments(
        **values,
        resume=ns.resume,
        overrides=overrides,
        log_with=None if ns.log_with == "none" else ns.log_with,
        progress=not ns.no_progress,
    )
    result = pretrain(args)
    print(f"Saved the released encoder to {result.output_dir}/ and the pretraining model to pretraining/ in it")
    if result.knn_final is not None:
        print(
            f"kNN top-1 (k={args.knn_k}) on {args.data}: random init {result.knn_random_init:.4f} -> "
            f"after {result.steps} steps {result.knn_final:.4f}"
        )
    return 0


def _run_list(ns: argparse.Namespace) -> int:
    if ns.pretrained:
        for name in list_pretrained(ns.pattern):
            tag = get_pretrained(name)
            metrics = ", ".join(f"{metric} {value:.1f}" for metric, value in tag.metrics.items())
            print(f"{name:42s} {tag.license:13s} {metrics:28s} {tag.hf_hub_id or tag.url}")
        return 0
    for name in list_models(ns.pattern):
        preset = get_preset(name)
        print(f"{name:32s} {preset.method:10s} {preset.backbone:26s} {preset.image_size:4d}px  {preset.description}")
    return 0


def _add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert an official checkpoint (file or transformers directory) into an sslhub checkpoint"
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


def _run_convert(ns: argparse.Namespace) -> int:
    from sslhub.conversion.convert import convert_checkpoint, save_atomically

    model = convert_checkpoint(ns.model, ns.checkpoint, task=ns.task, layout=ns.layout)
    save_atomically(model, ns.output)
    print(f"Converted {ns.checkpoint} ({ns.model}, {ns.task}) to {ns.output}")
    return 0


def _add_export_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write an sslhub model as a plain timm or transformers checkpoint")
    parser.add_argument("--model", required=True, help="sslhub checkpoint directory or Hub id, or preset.tag")
    parser.add_argument("--format", required=True, choices=["timm", "transformers"])
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def _run_export(ns: argparse.Namespace) -> int:
    from sslhub.export import export_timm, export_transformers
    from sslhub.factory import create_model, from_pretrained

    if "." in ns.model and not Path(ns.model).exists():
        model = create_model(ns.model, pretrained=True)
    else:
        model = from_pretrained(ns.model)
    export = export_timm if ns.format == "timm" else export_transformers
    print(f"Exported {ns.model} as a {ns.format} checkpoint to {export(model, ns.output, overwrite=ns.overwrite)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sslhub", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    list_parser = subparsers.add_parser("list", help="list the model presets")
    list_parser.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'dino_*'")
    list_parser.add_argument("--pretrained", action="store_true", help="list the releases with official weights")
    _add_pretrain_parser(subparsers)
    _add_convert_parser(subparsers)
    _add_export_parser(subparsers)
    add_eval_parser(subparsers)
    add_finetune_parser(subparsers)
    add_push_parser(subparsers)
    ns = parser.parse_args(argv)
    try:
        return {
            "list": _run_list,
            "pretrain": _run_pretrain,
            "convert": _run_convert,
            "export": _run_export,
            "eval": run_eval,
            "finetune": run_finetune,
            "push": run_push,
        }[ns.command](ns)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        print(f"sslhub {ns.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
