"""Reading the checkpoints of the VISSL model zoo (facebookresearch/vissl ``MODEL_ZOO.md``), whatever the method.

Two containers hold a VISSL ResNe(X)t (``vissl/models/trunks/resnext.py``: torchvision's ResNet parts in a
``ModuleDict`` named ``_feature_blocks``, so its keys are torchvision's names behind ``_feature_blocks.``, no ``fc``):

- family A, a VISSL training checkpoint (``vissl/hooks/log_hooks.py``: ``{'phase_idx', 'iteration', 'loss',
  'iteration_num', 'train_phase_idx', 'classy_state_dict'}``): the model is
  ``classy_state_dict → base_model → model → {'trunk', 'heads'}`` (``BaseSSLMultiInputOutputModel.get_classy_state``),
  the heads an ``nn.ModuleList``'s state dict keyed ``<head index>.<name>`` (an ``mlp`` head: ``0.clf.0.weight``);
  ``classy_state_dict`` also holds the optimizer, meters and phase counters, ``loss`` the loss module's state;
- family B, a legacy model converted for VISSL (``{'model_state_dict': trunk}``; VISSL's benchmark configs load it
  with ``APPEND_PREFIX=trunk.base_model.``): the trunk alone, no heads.

``read_vissl`` returns the trunk in torchvision / timm names (the official ``extra_scripts/convert_vissl_to_torchvision
.py`` rule: the ``_feature_blocks.`` prefix removed) and the heads as VISSL keys them; a method's layout maps the heads
(RotNet, Jigsaw, Colorization ... read the same containers). ``VISSL_TRUNK`` reads a VISSL file without heads as a
plain encoder, for any method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sslhub.conversion.keys import CheckpointLayout, Converted, preview
from sslhub.conversion.loading import CheckpointError

TRUNK_PREFIX = "_feature_blocks."
MODEL_PATH = ("classy_state_dict", "base_model", "model")  # family A: where {'trunk', 'heads'} sit
VISSL_ZOO = "https://dl.fbaipublicfiles.com/vissl/model_zoo/"  # MODEL_ZOO.md's files are under it
VISSL_LINEAR = (
    "linear = VISSL's ImageNet-1k linear benchmark (eval_resnet_8gpu_transfer_in1k_linear: the best of linear probes "
    "on conv1, res2-res5 and res5avg, not necessarily pooler_output = res5avg); VISSL is MIT-licensed and its "
    "MODEL_ZOO.md states no other licence for the weights"
)


@dataclass
class VisslModel:
    """A VISSL model read from its container: ``trunk`` in torchvision / timm names, ``heads`` keyed as VISSL's
    ``heads`` ModuleList (``"0.clf.0.weight"``), ``left_out``: the container's entries that are not the model."""

    trunk: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    left_out: list[str] = field(default_factory=list)


def vissl_family(container) -> str | None:
    """``"A"`` (a training checkpoint), ``"B"`` (``model_state_dict``) or ``None`` (not a VISSL container)."""
    if not isinstance(container, dict):
        return None
    node = container
    for key in MODEL_PATH:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and "trunk" in node:
        return "A"
    if isinstance(container.get("model_state_dict"), dict):
        return "B"
    return None


def vissl_heads(container) -> dict[str, torch.Tensor] | None:
    """The heads of a VISSL container as VISSL keys them (``{}`` for family B), ``None`` when it is not one; never
    raises, for layouts' ``detect``."""
    family = vissl_family(container)
    if family is None:
        return None
    if family == "B":
        return {}
    heads = container["classy_state_dict"]["base_model"]["model"].get("heads") or {}
    return heads if isinstance(heads, dict) and all(torch.is_tensor(v) for v in heads.values()) else None


def _tensors(state, source: str, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise CheckpointError(f"{source}: {where} is not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def _trunk_names(trunk: dict[str, torch.Tensor], source: str, where: str) -> dict[str, torch.Tensor]:
    """``_feature_blocks.<torchvision name>`` -> ``<torchvision name>``; any other key is an error naming it."""
    if not trunk:
        raise CheckpointError(f"{source}: {where} is empty")
    foreign = [key for key in trunk if not key.startswith(TRUNK_PREFIX)]
    if foreign:
        raise CheckpointError(
            f"{source}: {where} has keys outside {TRUNK_PREFIX!r} (not a VISSL ResNe(X)t trunk): {preview(foreign)}"
        )
    return {key[len(TRUNK_PREFIX) :]: value for key, value in trunk.items()}


def read_vissl(container, source: str) -> VisslModel:
    """The trunk and heads of a VISSL family A or B container (module docstring); anything else is a
    ``CheckpointError`` saying what was found."""
    family = vissl_family(container)
    if family is None:
        found = preview(container) if isinstance(container, dict) else type(container).__name__
        raise CheckpointError(
            f"{source}: not a VISSL checkpoint: expected 'classy_state_dict' -> 'base_model' -> 'model' -> 'trunk' "
            f"(a VISSL training checkpoint) or 'model_state_dict' (a converted model); found {found}"
        )
    if family == "B":
        trunk = _tensors(container["model_state_dict"], source, "model_state_dict")
        left_out = sorted(f"{key} (not converted)" for key in container if key != "model_state_dict")
        return VisslModel(_trunk_names(trunk, source, "model_state_dict"), {}, left_out)
    classy = container["classy_state_dict"]
    base_model = classy["base_model"]
    model = base_model["model"]
    where = "classy_state_dict.base_model.model"
    trunk = _tensors(model["trunk"], source, f"{where}.trunk")
    heads = _tensors(model.get("heads") or {}, source, f"{where}.heads")
    unknown = sorted(set(model) - {"trunk", "heads"})
    if unknown:
        raise CheckpointError(f"{source}: unexpected entries in {where}: {preview(unknown)} (expected trunk, heads)")
    left_out = [f"{key} (not converted)" for key in container if key != "classy_state_dict"]
    left_out += [f"classy_state_dict.{key} (not converted)" for key in classy if key != "base_model"]
    left_out += [f"classy_state_dict.base_model.{key} (not converted)" for key in base_model if key != "model"]
    return VisslModel(_trunk_names(trunk, source, f"{where}.trunk"), heads, sorted(left_out))


def convert_vissl_trunk(container, source: str) -> Converted:
    """A VISSL file without heads (family B, or family A with empty heads): its trunk as the encoder."""
    model = read_vissl(container, source)
    if model.heads:
        raise CheckpointError(
            f"{source}: a VISSL checkpoint with heads {preview(model.heads)}: convert it with its method's layout"
        )
    return Converted("vissl_trunk", model.trunk, left_out=model.left_out)


def _is_vissl_trunk(container) -> bool:
    return vissl_heads(container) == {}


# Not bound to a method (a VISSL trunk is a plain ResNe(X)t): one of the generic layouts (sslhub.conversion.layouts).
VISSL_TRUNK = CheckpointLayout("vissl_trunk", _is_vissl_trunk, convert_vissl_trunk)
