"""Key layouts of the official checkpoint files, mapped to sslhub names.

Each layout function reads what ``torch.load`` returned for one kind of official file and gives ``Converted``:
the released encoder in timm names and, when the file holds it, the state of the whole pretraining objective in
the names of the sslhub method (``SSLForPreTraining.method``). Every key of the file is either mapped or left
out by a named rule (optimizer state, epoch counters, ...); anything else is an error that lists it.
Facts per layout: ``shared/reference/official-checkpoints.md`` and the authors' code cited in each docstring.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sslhub.conversion.loading import CheckpointError

Tensor = torch.Tensor


@dataclass
class Converted:
    """``backbone``: released encoder (timm names, or the authors' names that the architecture's timm
    ``checkpoint_filter_fn`` maps); ``method_encoders``: every encoder copy of the objective by its prefix in
    ``SSLForPreTraining.method`` (``"encoder_q.backbone."``), ``method``: the rest of the objective (heads, queue,
    center), both ``None`` when the file holds only the released encoder; ``method_overrides``: hyperparameters the
    file fixes (head sizes, queue length, the run's arguments); ``left_out``: entries deliberately not converted."""

    layout: str
    backbone: dict[str, Tensor]
    method: dict[str, Tensor] | None = None
    method_encoders: dict[str, dict[str, Tensor]] | None = None
    method_overrides: dict = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)


class KeyReader:
    """Takes keys out of a flat state dict; ``finish()`` fails on keys nobody took or left out by name."""

    def __init__(self, state: dict, source: str):
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{source}: expected a state dict of tensors, got {type(state).__name__}")
        self.state, self.source, self.used = state, source, set()

    def take(self, prefix: str, rename: Callable[[str], str] = lambda key: key) -> dict[str, Tensor]:
        """Entries under ``prefix`` with the prefix stripped (then ``rename``d)."""
        found = {key: value for key, value in self.state.items() if key.startswith(prefix) and key not in self.used}
        self.used.update(found)
        return {rename(key[len(prefix) :]): value for key, value in found.items()}

    def take_one(self, key: str) -> Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.source}: key {key!r} is missing; the file has {_preview(self.state)}")
        self.used.add(key)
        return self.state[key]

    def leave_out(self, prefix: str) -> list[str]:
        return sorted(self.take(prefix))

    def finish(self) -> None:
        rest = [key for key in self.state if key not in self.used]
        if rest:
            raise CheckpointError(f"{self.source}: unexpected keys for this layout: {_preview(rest)}")


def _preview(keys, limit: int = 12) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(repr(k) for k in keys[:limit]) + "]" + more


def _entry(container, key: str, source: str):
    if not isinstance(container, dict) or key not in container:
        found = _preview(container) if isinstance(container, dict) else type(container).__name__
        raise CheckpointError(f"{source}: expected an entry {key!r} in the checkpoint; found {found}")
    return container[key]


def _strip_module(state: dict) -> dict:
    """DistributedDataParallel's ``module.`` prefix removed where present."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + key: value for key, value in state.items()}


def _leftover_entries(container: dict, used: set[str]) -> list[str]:
    return sorted(f"{key} (not converted)" for key in container if key not in used)


# ---- MoCo v1 / v2 ------------------------------------------------------------------------------------------------
def _moco_head(fc: dict[str, Tensor]) -> dict[str, Tensor]:
    """v1 ``fc`` = Linear(2048, 128) -> ``MLPHead`` index 0; v2 ``fc.0`` / ``fc.2`` (Linear, ReLU, Linear) keep
    their indices."""
    return {key if key[0].isdigit() else f"0.{key}": value for key, value in fc.items()}


def moco(container, source: str) -> Converted:
    """facebookresearch/moco ``main_moco.py`` (v1, and v2 with ``--mlp``): ``{'epoch', 'arch', 'state_dict',
    'optimizer'}``; ``state_dict`` of DDP(MoCo): ``module.encoder_{q,k}.<torchvision ResNet>`` with the projection
    in ``fc``, ``module.queue`` (dim, K) L2-normalised columns and ``module.queue_ptr`` (1,)."""
    reader = KeyReader(_entry(container, "state_dict", source), source)
    encoders = {}
    for name in ("q", "k"):
        encoder = reader.take(f"module.encoder_{name}.")
        if not encoder:
            raise CheckpointError(f"{source}: no 'module.encoder_{name}.' keys: not a MoCo v1/v2 checkpoint")
        head = {key[3:]: value for key, value in encoder.items() if key.startswith("fc.")}
        backbone = {key: value for key, value in encoder.items() if not key.startswith("fc.")}
        encoders[name] = backbone, _moco_head(head)
    queue, pointer = reader.take_one("module.queue"), reader.take_one("module.queue_ptr")
    reader.finish()
    (backbone_q, head_q), (backbone_k, head_k) = encoders["q"], encoders["k"]
    method = {
        **_prefixed("head_q.", head_q),
        **_prefixed("head_k.", head_k),
        "queue": queue.t().contiguous(),
        "queue_ptr": pointer.reshape(()),
    }
    encoder_copies = {"encoder_q.backbone.": backbone_q, "encoder_k.backbone.": backbone_k}
    overrides = {"embed_dim": queue.shape[0], "queue_size": queue.shape[1]}
    if "2.weight" in head_q:
        overrides["mlp_hidden_dim"] = head_q["0.weight"].shape[0]
    left_out = _leftover_entries(container, {"state_dict"})
    return Converted("moco", backbone_q, method, encoder_copies, overrides, left_out)


def moco_v3(container, source: str) -> Converted:
    """facebookresearch/moco-v3 ``main_moco.py``: ``{'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}``;
    ``state_dict`` of DDP(MoCo_ResNet / MoCo_ViT): ``module.base_encoder.*`` and ``module.momentum_encoder.*``
    (backbone with the projector ``_build_mlp`` in the classifier slot, ``fc`` for ResNets, ``head`` for ViTs) and
    ``module.predictor.*``. The released encoder is the base encoder without the projector."""
    reader = KeyReader(_entry(container, "state_dict", source), source)
    encoders, projectors = {}, {}
    for name in ("base", "momentum"):
        encoder = reader.take(f"module.{name}_encoder.")
        if not encoder:
            raise CheckpointError(f"{source}: no 'module.{name}_encoder.' keys: not a MoCo v3 checkpoint")
        slot = "head." if any(key.startswith("head.") for key in encoder) else "fc."
        projectors[name] = {key[len(slot) :]: value for key, value in encoder.items() if key.startswith(slot)}
        encoders[name] = {key: value for key, value in encoder.items() if not key.startswith(slot)}
    predictor = reader.take("module.predictor.")
    reader.finish()
    method = _prefixed("base_projector.", projectors["base"]) | _prefixed("momentum_projector.", projectors["momentum"])
    method |= _prefixed("predictor.", predictor)
    copies = {"base_encoder.backbone.": encoders["base"], "momentum_encoder.backbone.": encoders["momentum"]}
    linear = [value for key, value in projectors["base"].items() if key.endswith("weight") and value.ndim == 2]
    overrides = {"mlp_hidden_dim": linear[0].shape[0], "embed_dim": linear[-1].shape[0]}
    left_out = _leftover_entries(container, {"state_dict"})
    return Converted("moco_v3", encoders["base"], method, copies, overrides, left_out)


# ---- DINO ----------------------------------------------------------------------------------------------------------
DINO_ARGS = (  # main_dino.py arguments with the same meaning as sslhub's DINO hyperparameters
    "out_dim", "use_bn_in_head", "norm_last_layer", "momentum_teacher", "warmup_teacher_temp", "teacher_temp",
    "warmup_teacher_temp_epochs", "weight_decay", "weight_decay_end", "clip_grad", "epochs", "freeze_last_layer",
    "lr", "warmup_epochs", "min_lr", "optimizer", "drop_path_rate", "global_crops_scale", "local_crops_number",
    "local_crops_scale",
)  # fmt: skip


def _dino_head_sizes(head: dict[str, Tensor]) -> dict:
    """Head shape read off the weights: Linear layers of ``head.mlp``, BatchNorm between them, prototypes."""
    linear = sorted(int(key.split(".")[1]) for key in head if key.startswith("mlp.") and key.endswith(".weight")
                    and head[key].ndim == 2)  # fmt: skip
    weights = [head[f"mlp.{i}.weight"] for i in linear]
    return {
        "head_layers": len(weights),
        "hidden_dim": weights[0].shape[0] if len(weights) > 1 else 2048,
        "bottleneck_dim": head["last_layer.weight_v"].shape[1],
        "out_dim": head["last_layer.weight_v"].shape[0],
        "use_bn_in_head": any(key.endswith("running_mean") for key in head),
    }


def dino_full(container, source: str) -> Converted:
    """facebookresearch/dino ``main_dino.py`` full checkpoint: ``{'student', 'teacher', 'optimizer', 'epoch',
    'args', 'dino_loss', ['fp16_scaler']}``. Student and teacher are ``MultiCropWrapper(backbone, DINOHead)``
    (``backbone.*``, ``head.*``, the student always and a ResNet teacher under DDP's ``module.``);
    ``dino_loss['center']`` (1, out_dim). The released encoder is the teacher backbone."""
    parts = {}
    for role in ("teacher", "student"):
        reader = KeyReader(_strip_module(_entry(container, role, source)), f"{source} [{role}]")
        parts[role] = reader.take("backbone."), reader.take("head.")
        reader.finish()
    center = KeyReader(_entry(container, "dino_loss", source), f"{source} [dino_loss]")
    method = {"center": center.take_one("center")}
    center.finish()
    encoder_copies = {}
    for role in ("teacher", "student"):
        encoder_copies[f"{role}.backbone."], head = parts[role]
        method.update(_prefixed(f"{role}_head.", head))
    overrides = {}
    args = container.get("args")
    if isinstance(args, argparse.Namespace):
        overrides = {name: getattr(args, name) for name in DINO_ARGS if hasattr(args, name)}
        if overrides.get("optimizer") not in ("sgd", "adamw", "lars"):
            overrides.pop("optimizer", None)
    overrides.update(_dino_head_sizes(parts["teacher"][1]))
    left_out = _leftover_entries(container, {"teacher", "student", "dino_loss"})
    return Converted("dino_full", parts["teacher"][0], method, encoder_copies, overrides, left_out)


# ---- MAE -----------------------------------------------------------------------------------------------------------
MAE_DECODER_KEYS = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")  # fmt: skip


def mae(container, source: str) -> Converted:
    """facebookresearch/mae ``util/misc.py save_model``: ``{'model', ['optimizer', 'epoch', 'scaler', 'args']}``;
    ``model`` = ``MaskedAutoencoderViT`` (timm ViT names, fixed sin-cos ``pos_embed``) with the decoder
    (``mask_token``, ``decoder_*``) in pretraining / visualisation files; the released ``mae_pretrain_*.pth``
    files hold the encoder only."""
    reader = KeyReader(_entry(container, "model", source), source)
    decoder = {}
    for prefix in MAE_DECODER_KEYS:
        decoder.update(_prefixed(prefix, reader.take(prefix)))
    encoder = reader.take("")
    reader.finish()
    left_out = _leftover_entries(container, {"model"})
    if not decoder:
        return Converted("mae", encoder, left_out=left_out)
    blocks = {int(key.split(".")[1]) for key in decoder if key.startswith("decoder_blocks.")}
    overrides = {"decoder_embed_dim": decoder["decoder_embed.weight"].shape[0], "decoder_depth": len(blocks)}
    return Converted("mae", encoder, _prefixed("decoder.", decoder), {"encoder.": encoder}, overrides, left_out)


# ---- plain backbones (DINO backbone-only files, timm files) -------------------------------------------------------
CLASSIFIER_PREFIXES = ("fc.", "head.")


def backbone(container, source: str) -> Converted:
    """A plain state dict of the encoder in timm / torchvision names (DINO's ``dino_*_pretrain.pth``, timm's Hub
    ``model.safetensors``). A classifier (``fc.*`` / ``head.*``) is left out."""
    reader = KeyReader(container, source)
    left_out = [key for prefix in CLASSIFIER_PREFIXES for key in reader.leave_out(prefix)]
    return Converted("backbone", reader.take(""), left_out=left_out)


LAYOUTS: dict[str, Callable[[object, str], Converted]] = {
    "moco": moco,
    "moco_v3": moco_v3,
    "dino_full": dino_full,
    "mae": mae,
    "backbone": backbone,
}


def detect_layout(container) -> str:
    """The layout of a loaded checkpoint file, from its top-level entries and key prefixes."""
    if not isinstance(container, dict):
        raise CheckpointError(f"a checkpoint is a dict; got {type(container).__name__}")
    if "teacher" in container and "student" in container:
        return "dino_full"
    if isinstance(container.get("state_dict"), dict):
        keys = container["state_dict"]
        if any(key.startswith("module.encoder_q.") for key in keys):
            return "moco"
        if any(key.startswith("module.base_encoder.") for key in keys):
            return "moco_v3"
    if isinstance(container.get("model"), dict):
        return "mae"
    if container and all(torch.is_tensor(value) for value in container.values()):
        return "backbone"
    raise CheckpointError(
        f"unrecognised checkpoint layout (top-level entries {_preview(container)}); give the layout explicitly, "
        f"one of {sorted(LAYOUTS)}"
    )
