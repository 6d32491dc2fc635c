"""Reusable heads: MLP projectors, the DINO head and the MAE decoder (DESIGN.md §2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from sslhub.masking import sincos_2d_position_embedding


class MLPHead(nn.Sequential):
    """Linear layers with ReLU (and optional BatchNorm) between them: ``dims = (in, hidden..., out)``.

    ``batch_norm``: Linear-BN-ReLU hidden layers; ``bias``: the output layer's bias (and the hidden layers' unless
    they have BatchNorm); ``hidden_bias``: the hidden layers' bias regardless (BYOL, SwAV keep it before BN);
    ``last_bn``: a BatchNorm after the last Linear layer, without affine parameters, or with ``last_bn_scale`` a
    learned scale γ and a bias fixed at 0 (TensorFlow's ``center=False``, SimCLR).
    MoCo v1 (arXiv 1911.05722): ``MLPHead((2048, 128))`` = fc. MoCo v2 (arXiv 2003.04297):
    ``MLPHead((2048, 2048, 128))`` = fc-ReLU-fc. MoCo v3 (arXiv 2104.02057, ``builder._build_mlp``):
    ``MLPHead((2048, 4096, 256), batch_norm=True, bias=False, last_bn=True)`` = fc-BN-ReLU-fc-BN.
    """

    def __init__(
        self,
        dims: Sequence[int],
        batch_norm: bool = False,
        bias: bool = True,
        last_bn: bool = False,
        hidden_bias: bool | None = None,
        last_bn_scale: bool = False,
    ):
        hidden_bias = bias and not batch_norm if hidden_bias is None else hidden_bias
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            hidden = i < len(dims) - 2
            layers.append(nn.Linear(d_in, d_out, bias=hidden_bias if hidden else bias))
            if hidden:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.ReLU(inplace=True))
        if last_bn:
            norm = nn.BatchNorm1d(dims[-1], affine=last_bn_scale)
            if last_bn_scale:
                norm.bias.requires_grad_(False)  # stays at 0
            layers.append(norm)
        super().__init__(*layers)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation ``W = g * v / ||v||`` (Salimans & Kingma 2016).

    Parameter names ``weight_g`` / ``weight_v`` match ``torch.nn.utils.weight_norm`` as used by DINO.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as DINO's last layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, arXiv 2104.14294, §3.1 and ``vision_transformer.DINOHead``).

    ``nlayers``-layer MLP with GELU (hidden 2048) to a ``bottleneck_dim`` (256) embedding, L2-normalised, then a
    weight-normalised linear layer to ``out_dim`` (65536) prototypes. With ``norm_last_layer`` the norm ``g`` is
    frozen at 1, which the paper reports stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MAEDecoder(nn.Module):
    """MAE decoder (He et al. 2021, arXiv 2111.06377, §3 and ``models_mae.py``).

    Embeds the visible encoder tokens to ``embed_dim``, inserts a shared learned mask token at the masked
    positions, adds fixed 2-D sin-cos position embeddings and runs ``depth`` Transformer blocks; a linear layer
    predicts the ``patch_size**2 * in_chans`` pixels of every patch (or ``out_dim`` features: DeepMIM-CLIP's teacher
    tokens). ``cls_token=False``: the encoder tokens have no
    class token in front and the position embedding no row for it (ConvMAE's ``forward_decoder``).
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        patch_size: int,
        encoder_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        cls_token: bool = True,
        out_dim: int | None = None,
    ):
        super().__init__()
        self.num_prefix_tokens = int(cls_token)
        self.decoder_embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_2d_position_embedding(embed_dim, grid_size, cls_token=cls_token)
        self.decoder_pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.decoder_norm = norm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, out_dim or patch_size**2 * in_chans)
        self.apply(xavier_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``tokens``: (B, 1 + L_visible, encoder_dim) with the cls token first (without it when ``cls_token=False``)
        -> (B, L, p*p*C) predictions."""
        x = self.decoder_embed(tokens)
        batch, num_patches = ids_restore.shape
        prefix = self.num_prefix_tokens
        mask_tokens = self.mask_token.expand(batch, num_patches + prefix - x.shape[1], -1)
        patches = torch.cat([x[:, prefix:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]


def xavier_init_weights(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
