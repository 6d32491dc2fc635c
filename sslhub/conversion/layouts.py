"""Finding the layout of a checkpoint: the layouts every registered method declares, then the generic ones that no
method owns (a plain state dict of the encoder in timm / torchvision names)."""

from __future__ import annotations

import torch

from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, preview
from sslhub.conversion.loading import CheckpointError
from sslhub.conversion.vissl import VISSL_TRUNK
from sslhub.registry import list_layouts

CLASSIFIER_PREFIXES = ("fc.", "head.")


def convert_backbone(container, source: str) -> Converted:
    """A plain state dict of the encoder in timm / torchvision names (DINO's ``dino_*_pretrain.pth``, timm's Hub
    ``model.safetensors``). A classifier (``fc.*`` / ``head.*``) is left out."""
    reader = KeyReader(container, source)
    left_out = [key for prefix in CLASSIFIER_PREFIXES for key in reader.leave_out(prefix)]
    return Converted("backbone", reader.take(""), left_out=left_out)


def _is_state_dict(container) -> bool:
    return isinstance(container, dict) and bool(container) and all(torch.is_tensor(v) for v in container.values())


BACKBONE = CheckpointLayout("backbone", _is_state_dict, convert_backbone)
GENERIC_LAYOUTS = (VISSL_TRUNK, BACKBONE)


def all_layouts() -> dict[str, CheckpointLayout]:
    """Every layout by name: the methods' (in registration order), then the generic ones."""
    return {**{layout.name: layout for layout in list_layouts().values()}, **{g.name: g for g in GENERIC_LAYOUTS}}


def get_layout(name: str) -> CheckpointLayout:
    layouts = all_layouts()
    if name not in layouts:
        raise CheckpointError(f"unknown layout {name!r}; sslhub reads {sorted(layouts)}")
    return layouts[name]


def detect_layout(container) -> CheckpointLayout:
    """The first layout that claims a loaded checkpoint file."""
    if not isinstance(container, dict):
        raise CheckpointError(f"a checkpoint is a dict; got {type(container).__name__}")
    for layout in all_layouts().values():
        if not layout.hf_model_types and layout.detect(container):
            return layout
    raise CheckpointError(
        f"unrecognised checkpoint layout (top-level entries {preview(container)}); give the layout explicitly, "
        f"one of {sorted(all_layouts())}"
    )
