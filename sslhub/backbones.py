"""timm backbones without classifier, their feature size and pooling (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.layers import Conv2dSame
from timm.layers.pool2d_same import MaxPool2dSame
from torch import nn

POOLINGS = ("avg", "cls", "mean")
# TensorFlow "SAME" padding of a ResNet: "max_pool" = the stem max-pool only (SimCLR's TF ResNet pads its strided
# convolutions explicitly, as PyTorch does), "same" = every strided convolution and pool (Haiku's ResNet, BYOL).
TF_PADDINGS = ("max_pool", "same")


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the timm model ``name`` with no classifier and no pooling (randomly initialised).

    ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size=32, patch_size=4`` for a small ViT).
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"Unknown timm backbone {name!r}. Similar timm models: {close}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
    except TypeError as err:
        raise ValueError(f"timm backbone {name!r} does not accept the options {sorted(kwargs)}: {err}") from err


def is_vision_transformer(backbone: nn.Module) -> bool:
    """True for token-based backbones (timm ViT family), False for convolutional feature maps."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "num_prefix_tokens")


def default_pooling(backbone: nn.Module) -> str:
    """Final-norm class token for ViTs with one, global average pooling otherwise."""
    if is_vision_transformer(backbone) and getattr(backbone, "cls_token", None) is not None:
        return "cls"
    return "mean" if is_vision_transformer(backbone) else "avg"


def pool_features(hidden: torch.Tensor, pooling: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Pool ``forward_features`` output to (B, D).

    ``avg``: mean over the spatial map (B, C, H, W) -> (B, C); ``cls``: first token of (B, N, D);
    ``mean``: mean of the patch tokens (prefix tokens excluded).
    """
    if hidden.ndim == 4:
        if pooling != "avg":
            raise ValueError(f"pooling {pooling!r} needs tokens; a convolutional feature map only supports 'avg'")
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        if num_prefix_tokens == 0:
            raise ValueError("pooling 'cls' needs a backbone with a class token")
        return hidden[:, 0]
    if pooling in ("mean", "avg"):
        return hidden[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"Unknown pooling {pooling!r}; expected one of {POOLINGS}")


def tf_same_padding_(module: nn.Module, mode: str) -> nn.Module:
    """Make a timm CNN compute TensorFlow's ``padding='SAME'`` (``TF_PADDINGS``): pad ``(k - s) // 2`` before and the
    rest after, so a stride-2 layer on an even input pads one pixel more at the bottom / right than PyTorch's
    symmetric padding (timm's ``Conv2dSame`` / ``MaxPool2dSame``, which pad for the actual input size). Stride-1
    odd-kernel convolutions are the same in both frameworks and stay. Parameters and state-dict keys are unchanged."""
    if mode not in TF_PADDINGS:
        raise ValueError(f"tf_padding {mode!r}: expected one of {TF_PADDINGS} (or None for PyTorch padding)")
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            replacement = MaxPool2dSame(child.kernel_size, child.stride, 0, child.dilation, child.ceil_mode)
        elif mode == "same" and isinstance(child, nn.Conv2d) and max(child.stride) > 1:
            replacement = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                     child.dilation, child.groups, child.bias is not None)  # fmt: skip
            replacement.weight, replacement.bias = child.weight, child.bias
        else:
            tf_same_padding_(child, mode)
            continue
        setattr(module, name, replacement)
    return module


def tf_padding_note(tf_padding: str | None) -> str:
    """What a model card says about an encoder made to pad as TensorFlow (``tf_same_padding_``); "" for PyTorch's."""
    if tf_padding is None:
        return ""
    layers = "stem max-pool" if tf_padding == "max_pool" else "strided convolutions and max-pool"
    return (
        f"Padding: TensorFlow's 'SAME' in the {layers} (`tf_padding={tf_padding!r}`), as the model these weights were "
        "trained in. `sslhub.to_timm(model)` keeps it; a stock timm model holding the same weights pads symmetrically "
        "and computes other features."
    )


def forward_by_resolution(network: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """``network`` over the crops, each run of consecutive crops of one resolution as one batch (DINO's
    ``MultiCropWrapper``, SwAV's ``ResNet.forward``: BatchNorm sees all crops of a size together); the outputs are
    concatenated in crop order."""
    outputs, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        outputs.append(network(torch.cat(list(crops[start:end]))))
        start = end
    return torch.cat(outputs)


class Encoder(nn.Module):
    """What ``SSLModel`` holds and a method releases: images (B, C, H, W) -> ``forward_features`` (feature map or
    tokens, the model's ``last_hidden_state``) -> ``pool`` (B, D) (its ``pooler_output``). ``forward`` is both.
    ``timm_model`` is the single timm module the encoder is, or ``None`` (two branches, a hybrid ...)."""

    num_features: int

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(images))

    @property
    def timm_model(self) -> nn.Module | None:
        return None

    @property
    def architecture_note(self) -> str:
        """What a model card should say about the encoder beyond its timm backbone ("" when nothing)."""
        return ""

    @property
    def exports_to_timm(self) -> bool:
        """Whether a stock timm model of the backbone, with timm's own pooling, computes this encoder's pooled
        output (what ``sslhub.export_timm`` writes)."""
        return self.timm_model is not None


class TimmEncoder(Encoder):
    """A timm backbone (``create_backbone``) followed by its pooling: the default encoder of a method.
    ``pooling`` ``None`` picks ``default_pooling`` of the backbone; ``tf_padding`` (``TF_PADDINGS``) makes a CNN pad
    as the TensorFlow / JAX model whose weights it holds (``tf_same_padding_``)."""

    def __init__(self, name: str, pooling: str | None = None, tf_padding: str | None = None, **kwargs):
        super().__init__()
        self.backbone = create_backbone(name, **kwargs)
        self.tf_padding = tf_padding
        if tf_padding is not None:
            tf_same_padding_(self.backbone, tf_padding)
        self.pooling = pooling or default_pooling(self.backbone)
        self.num_prefix_tokens = getattr(self.backbone, "num_prefix_tokens", 0)
        self.num_features = self.backbone.num_features

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return pool_features(hidden, self.pooling, self.num_prefix_tokens)

    @property
    def timm_model(self) -> nn.Module:
        return self.backbone

    @property
    def exports_to_timm(self) -> bool:
        return self.tf_padding is None

    @property
    def architecture_note(self) -> str:
        return tf_padding_note(self.tf_padding)
