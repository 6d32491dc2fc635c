"""timm backbones without classifier, their feature size and pooling (DESIGN.md §2)."""

from __future__ import annotations

import timm
import torch
from torch import nn

POOLINGS = ("avg", "cls", "mean")


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


class TimmEncoder(Encoder):
    """A timm backbone (``create_backbone``) followed by its pooling: the default encoder of a method.
    ``pooling`` ``None`` picks ``default_pooling`` of the backbone."""

    def __init__(self, name: str, pooling: str | None = None, **kwargs):
        super().__init__()
        self.backbone = create_backbone(name, **kwargs)
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
