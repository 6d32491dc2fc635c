"""``convert_checkpoint``: an official checkpoint (file or Hugging Face directory) into an sslhub model, loaded
strictly: every missing, unexpected or wrongly shaped key is reported, and nothing is written on failure."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from sslhub.configuration import SSLConfig
from sslhub.conversion.hf_transformers import convert_hf_encoder
from sslhub.conversion.keys import Converted, preview
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, load_file_state, load_hf_directory, non_finite
from sslhub.files import atomic_directory
from sslhub.modeling import SSLForPreTraining, SSLPreTrainedModel, model_class
from sslhub.registry import layout_methods, list_layouts

logger = logging.getLogger(__name__)


def read_checkpoint(checkpoint: str | os.PathLike, layout: str | None = None) -> Converted:
    """Load ``checkpoint`` without executing code and map it to sslhub names (``layout`` detected if not given)."""
    path = Path(checkpoint)
    if path.is_dir():
        return read_hf_directory(path)
    container = load_file_state(path)
    found = get_layout(layout) if layout else detect_layout(container)
    return found.convert(container, str(path))


def read_hf_directory(path: Path) -> Converted:
    """A transformers model directory: the layout a method declares for its ``model_type`` (e.g. the MAE objective
    of ``ViTMAEForPreTraining``) when one claims it, else its encoder alone."""
    state_dict, config = load_hf_directory(path)
    container = {"config": config, "state_dict": state_dict}
    for layout in list_layouts().values():
        if config.get("model_type") in layout.hf_model_types and layout.detect(container):
            return layout.convert(container, str(path))
    return convert_hf_encoder(state_dict, config, str(path))


def _shape_problems(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    return [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected  # the model's order: embeddings first
        if key in state and state[key].shape != expected[key].shape
    ]


def _mismatch_error(what: str, missing=(), unexpected=(), wrong=()) -> CheckpointError:
    problems = [
        f"{label} ({len(items)}): {preview(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if items
    ]
    return CheckpointError(f"{what} does not match the model:\n  " + "\n  ".join(problems))


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` after checking names, shapes and values; one error lists every difference,
    another every tensor holding NaN or inf."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = _shape_problems(state, expected)
    if missing or unexpected or wrong:
        raise _mismatch_error(what, missing, unexpected, wrong)
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensor(s) hold NaN or inf values: {preview(bad)}")
    module.load_state_dict(state)


def _timm_prefix(encoder: nn.Module) -> str:
    """Where the encoder's timm model sits inside it (``"backbone."`` for ``TimmEncoder``)."""
    inner = next(name for name, module in encoder.named_modules() if module is encoder.timm_model)
    return f"{inner}." if inner else ""


def _encoder_copies(method: nn.Module, released: nn.Module) -> list[str]:
    """Prefixes of every copy of the released encoder inside a method (MoCo query / key, DINO student / teacher):
    modules of the released encoder's class with its keys."""
    keys = released.state_dict().keys()
    return [
        f"{name}." for name, m in method.named_modules() if type(m) is type(released) and m.state_dict().keys() == keys
    ]


def _check_method(converted: Converted, method: str, what: str) -> None:
    """A layout that belongs to some methods (their training checkpoints) converts only into those methods."""
    if converted.layout in list_layouts() and method not in layout_methods(converted.layout):
        owners = layout_methods(converted.layout)
        raise CheckpointError(
            f"{what} is a {converted.layout!r} checkpoint of {', '.join(owners)}, not of {method!r}: "
            f"choose a preset of {', '.join(owners)} (`sslhub list`)"
        )


def _folded_class_position(state: dict, expected: dict, problem: str) -> bool:
    """DINOv2 register files keep a class-token slot in ``pos_embed`` that timm's reg4 models fold into
    ``cls_token`` (``_convert_dinov2``): one position more than the model, nothing else different."""
    if not problem.startswith("pos_embed:"):
        return False
    file, model = state["pos_embed"].shape, expected["pos_embed"].shape
    return "register_tokens" in state and file[0] == model[0] and file[2] == model[2] and file[1] == model[1] + 1


def timm_filter(
    state: dict[str, torch.Tensor], encoder: nn.Module, backbone: str, what: str
) -> dict[str, torch.Tensor]:
    """The architecture's own timm ``checkpoint_filter_fn`` (authors' names -> timm names, e.g. XCiT's fused
    class-attention ``qkv``; identity for timm names), after checking that tensors named as in the model have its
    shapes."""
    expected = encoder.state_dict()
    wrong = [
        problem for problem in _shape_problems(state, expected) if not _folded_class_position(state, expected, problem)
    ]
    if wrong:  # timm would resample patch / position embeddings: a different model, never silently
        raise _mismatch_error(f"{what}, encoder for {backbone},", wrong=wrong)
    module = sys.modules[timm.models.model_entrypoint(backbone).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    return filter_fn(dict(state), encoder) if filter_fn is not None else state


def build_converted_model(
    config: SSLConfig, converted: Converted, task: str = "features", source: str = "checkpoint"
) -> SSLPreTrainedModel:
    """A ``task`` model for ``config`` holding the converted weights (eval mode).

    For ``"pretraining"`` the file's heads / teacher / queue are loaded when it has them; a file holding only the
    released encoder initialises every encoder copy from it and leaves the heads at their initialisation. Frozen
    auxiliary networks the file lacks load from the files the hyperparameters name (``load_auxiliary_weights``).
    """
    model = model_class(task)(config)
    what = f"{source} ({converted.layout})"
    _check_method(converted, config.method, what)
    if not isinstance(model, SSLForPreTraining):
        encoder = model.encoder if task == "features" else model.ssl.encoder
        if _is_timm_model_only(encoder):  # errors then name the file's own keys
            load_strict(encoder.timm_model, timm_filter(converted.backbone, encoder.timm_model, config.backbone, what),
                        what)  # fmt: skip
        else:
            load_strict(encoder, _encoder_state(encoder, converted, config, what), what)
        return model.eval()
    released = model.method.released_encoder
    model.method.load_auxiliary_weights()  # no release holds them (BEiT's tokenizer): the hyperparameters name them
    if converted.method is None:
        logger.warning("%s holds only the released encoder: the %s heads keep their initialisation", source,
                       config.method)  # fmt: skip
        encoder_state = _encoder_state(released, converted, config, what)
        for prefix in _encoder_copies(model.method, released):
            load_strict(model.method.get_submodule(prefix[:-1]), encoder_state, what)
        return model.eval()
    else:
        state = dict(converted.method)
        timm_model = released.timm_model
        for prefix, encoder_state in converted.method_encoders.items():
            mapped = (
                timm_filter(encoder_state, timm_model, config.backbone, what)
                if timm_model is not None
                else encoder_state
            )
            state.update({prefix + key: value for key, value in mapped.items()})
    for name, network in model.method.auxiliary_networks().items():
        if not any(key.startswith(f"{name}.") for key in state):
            state.update({f"{name}.{key}": value for key, value in network.state_dict().items()})
    load_strict(model.method, state, what)
    return model.eval()


def _is_timm_model_only(encoder: nn.Module) -> bool:
    """True when the encoder's weights are exactly its timm model's (a timm backbone and its pooling)."""
    if encoder.timm_model is None:
        return False
    prefix = _timm_prefix(encoder)
    return encoder.state_dict().keys() == {prefix + key for key in encoder.timm_model.state_dict()}


def _encoder_state(encoder: nn.Module, converted: Converted, config: SSLConfig, what: str) -> dict:
    """The state of a whole released encoder: its timm model's (``converted.backbone`` through timm's filter) under
    the timm model's prefix, with the encoder's other parts (``converted.encoder_extras``)."""
    if encoder.timm_model is None:
        return {**converted.backbone, **converted.encoder_extras}
    mapped = timm_filter(converted.backbone, encoder.timm_model, config.backbone, what)
    return {**{_timm_prefix(encoder) + key: value for key, value in mapped.items()}, **converted.encoder_extras}


def convert_checkpoint(
    model: str,
    checkpoint: str | os.PathLike,
    task: str = "features",
    layout: str | None = None,
    **overrides,
) -> SSLPreTrainedModel:
    """The official ``checkpoint`` as the sslhub preset ``model`` (``sslhub list``), for ``task``
    (``"features"``, ``"pretraining"``, ``"classification"``). Hyperparameters the file records (head sizes,
    queue length, a DINO run's arguments) are applied before ``overrides``. Raises ``CheckpointError`` naming the
    file and every mismatched key."""
    converted = read_checkpoint(checkpoint, layout)
    config = SSLConfig.from_preset(model.partition(".")[0])
    recorded = {key: value for key, value in converted.method_overrides.items() if key in config.method_kwargs}
    config = config.with_overrides(**{**recorded, **overrides})
    return build_converted_model(config, converted, task, str(checkpoint))


def save_atomically(
    model: SSLPreTrainedModel, output_dir: str | os.PathLike, card=None, overwrite: bool = False
) -> Path:
    """``save_pretrained`` (and ``card``) into a staging directory moved to ``output_dir``; a non-empty
    ``output_dir`` only with ``overwrite``, replacing sslhub's files in it and keeping the others
    (``sslhub.files.atomic_directory``)."""
    with atomic_directory(output_dir, overwrite) as staging:
        if card is not None:
            card.save(staging / "README.md")
        model.save_pretrained(staging)
    return Path(output_dir)
