"""Dataclass fields with help text, and command-line flags generated from them: one source for the defaults and the
help of ``sslhub pretrain`` / ``finetune`` (``PretrainArguments``, ``FinetuneArguments``) and of the methods'
hyperparameters (``sslhub hparams``)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import types
import typing
from typing import Any

BOUND_CHECKS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def option(default: Any, help: str, bounds: dict[str, float] | None = None, **flag: Any) -> Any:
    """A dataclass field with its default and one line of help; ``bounds`` (e.g. ``{">=": 1}``, keys of
    ``BOUND_CHECKS``) are what ``check_bounds`` holds a number to (``None`` always passes); ``flag`` holds
    ``argparse`` options that differ from the ones derived from the field's type (``nargs``, ``const``, ``type``,
    ``choices``, ``metavar``)."""
    metadata = {"help": help, "flag": flag, "bounds": bounds or {}}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def required_option(help: str, **flag: Any) -> Any:
    """A dataclass field without default (a required flag), with one line of help."""
    return dataclasses.field(metadata={"help": help, "flag": flag})


def check_bounds(instance: Any) -> None:
    """Each field of the dataclass ``instance`` within its option's ``bounds``: a ``ValueError`` naming the flag
    (``--gradient-accumulation-steps must be >= 1, got 0``) otherwise."""
    for field in dataclasses.fields(instance):
        value, bounds = getattr(instance, field.name), field.metadata.get("bounds")
        if value is None or not bounds:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{flag} expects a finite number, got {value!r}")
        for relation, bound in bounds.items():
            if not BOUND_CHECKS[relation](value, bound):
                raise ValueError(f"{flag} must be {relation} {bound}, got {value!r}")


def none_or_str(text: str) -> str | None:
    """A flag value where ``none`` means ``None`` (e.g. ``--log-with none``)."""
    return None if text.lower() == "none" else text


def worker_count(text: str) -> int | str:
    """A ``--num-workers`` value: ``auto`` (see ``sslhub.data.num_workers``) or an integer >= 0."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}")
    return int(text)


def _flag_type(annotation) -> tuple[type, bool]:
    """(scalar type, optional) of a field annotation such as ``int``, ``float | None`` or ``str``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return (inner[0] if len(inner) == 1 else str), type(None) in args
    return annotation, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag-name`` per field of the dataclass ``cls`` (except ``exclude``), with the field's default and
    help, ``cls``'s own fields before inherited ones; booleans get ``--flag`` / ``--no-flag``, fields without
    default are required flags."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    for field in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if field.name in exclude:
            continue
        kind, optional = _flag_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        options: dict[str, Any] = {"help": field.metadata.get("help", "").replace("%", "%%")}  # argparse formats help
        if field.default is not dataclasses.MISSING:
            options["default"] = field.default
        elif field.default_factory is dataclasses.MISSING:
            options["required"] = True
        if kind is bool and not optional:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
        options |= field.metadata.get("flag", {})
        parser.add_argument(flag, **options)


def dataclass_values(namespace: argparse.Namespace, cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of ``cls``'s fields from a namespace parsed with ``add_dataclass_arguments``."""
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.name not in exclude}


@dataclasses.dataclass(kw_only=True)
class RunArguments:
    """The options every Accelerate run of ``sslhub pretrain`` and ``finetune`` shares: data columns, precision,
    accumulation, checkpoints, resume, logging and progress (keyword-only, so subclasses list their own first)."""

    image_column: str | None = option(None, "image column of an HF dataset")
    label_column: str | None = option(None, "label column of an HF dataset")
    num_workers: int | str = option(
        "auto",
        "data-loading worker processes, or 'auto': min(8, CPUs available to this process / processes on the machine "
        "- 1), at least 0",
        type=worker_count,
    )
    mixed_precision: str = option("no", "'no', 'fp16' or 'bf16'", choices=["no", "fp16", "bf16"])
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", {">=": 1})
    checkpoint_every: int = option(500, "save a resumable checkpoint every N optimizer steps", {">=": 1})
    keep_checkpoints: int = option(2, "how many checkpoints to keep", {">=": 1})
    max_steps: int | None = option(
        None, "stop after this many optimizer steps (schedules still span --epochs)", {">=": 1}
    )
    resume: str | None = option(
        None,
        "continue from the newest checkpoint in --output-dir, or from the checkpoint directory given",
        nargs="?",
        const="latest",
    )
    log_every: int = option(10, "log the loss every N steps", {">=": 1})
    log_with: str | None = option("tensorboard", "Accelerate tracker, or 'none'", type=none_or_str)
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        check_bounds(self)
