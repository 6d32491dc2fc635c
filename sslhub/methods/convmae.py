"""ConvMAE: masked autoencoders on a hybrid convolution-transformer encoder with masked convolutions.

Gao, Ma, Li, Dai & Qiao, "ConvMAE: Masked Convolution Meets Masked Autoencoders" (renamed MCMAE), arXiv 2205.03892
(NeurIPS 2022). Follows Alpha-VL/ConvMAE (``models_convmae.py`` ``MaskedAutoencoderConvViT``, ``vision_transformer.py``
``PatchEmbed`` / ``CBlock`` / ``Block``, ``models_convvit.py`` ``ConvViT``, ``main_pretrain.py``, ``main_linprobe.py``,
``PRETRAIN.md``, ``FINETUNE.md``, ``README.md``).

- Encoder (ConvViT): three stages at 1/4, 1/8 and 1/16 of the image. Each stage starts with a ``PatchEmbed``
  (convolution with kernel = stride = patch size, LayerNorm over channels (eps 1e-5), GELU); stages 1 and 2 are
  ``CBlock``s, ``x + conv2(dwconv5x5(m ⊙ conv1(LN(x))))`` then ``x + MLP(LN(x))`` with 1x1 convolutions (LayerNorm eps
  1e-5, whatever ``norm_layer`` says), stage 3 is a linear ``patch_embed4`` on the flattened tokens, a fixed 2-D sin-cos
  position embedding (no class token) and ViT blocks (LayerNorm eps 1e-6, qkv bias: timm's ``Block``). ConvMAE-Base:
  patch sizes (4, 2, 2), widths (256, 384, 768), depths (2, 2, 11), 12 heads, MLP ratio 4, 224 px (14 x 14 tokens).
- Masking (``forward_encoder``): MAE's random masking of 75 % of the 1/16 tokens (``sslhub.masking.random_masking``:
  the tokens of lowest noise stay); the mask, 1 = visible, is repeated to the 1/8 and 1/4 grids and multiplies the
  input of every depthwise convolution of stages 1 and 2 (the masked convolution, so no visible position sees a masked
  one); stage 3 runs on the visible tokens only.
- Multi-scale fusion: the stage-1 and stage-2 maps go through strided convolutions to the 1/16 grid
  (``stage1_output_decode``: kernel = stride = 4, ``stage2_output_decode``: 2), are gathered at the visible tokens and
  added to the stage-3 output before the final LayerNorm ``norm``: ``norm(blocks3(x) + s1 + s2)``.
- Decoder and loss: MAE's decoder (``sslhub.heads.MAEDecoder`` without class token; 8 blocks of width 512, 16 heads,
  fixed sin-cos positions) predicts the 16 x 16 x 3 pixels of every 1/16 token; MSE on the masked tokens against
  per-patch normalised pixels (``norm_pix_loss``, ``sslhub.losses.masked_patch_mse``).
- Recipe (``PRETRAIN.md``, ``main_pretrain.py``): random resized crop 224 of 20-100 % (bicubic), flip, ImageNet
  mean / std (MAE's ``view_recipe``); AdamW β (0.9, 0.95), base lr 1.5e-4 per 256 images (``--blr``; the script's own
  default is 1e-3), weight decay 0.05 except on 1-d parameters and biases (timm's ``add_weight_decay``), 40 warm-up
  epochs then half-cosine per step, 1600 epochs, batch 3 x 8 x 128 = 3072, mask ratio 0.75, ``--norm_pix_loss``.
- Initialisation (``initialize_weights``): xavier-uniform linear layers and ``patch_embed3`` (as a linear layer), zero
  biases, unit LayerNorms, normal(0.02) mask token; the other convolutions keep PyTorch's default.

Released encoder: ConvViT as the authors' linear probe (``main_linprobe.py --global_pool``, FINETUNE.md) runs it, with
no mask and without the pretraining-only parts (``stage*_output_decode``, ``norm``, the decoder, which
``load_state_dict(strict=False)`` skips there): ``last_hidden_state`` = the stage-3 tokens (B, L, D) after the last
block, ``pooler_output`` = LayerNorm of their mean. That LayerNorm is the probe's ``fc_norm``, new and frozen there
(unit weight, zero bias, eps 1e-6), so here it has no parameters; fine-tuning's trainable ``fc_norm`` affine is
absorbed by the linear classifier after it. The released ``pos_embed`` is a parameter (fine-tuning trains it);
pretraining keeps it fixed.

Deviations and facts not verified: the authors' ``forward_encoder`` hard-codes the 14 x 14 grid and the 4 / 2 fusion
kernels; here the grid follows ``img_size`` and the kernels are the products of the later patch sizes (the same for
ConvMAE-Base). FINETUNE.md's single-node linear-probe command omits ``--global_pool`` (then the probe reads the first
token after ``norm``); the multi-node command, followed here, passes it; which one gave the README's 70.9 is not
stated. No dropout / drop path in pretraining (the authors' defaults); ``drop_path_rate`` in the encoder's arguments is
the fine-tuning one (linear over all 15 blocks, as ``ConvViT``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from sslhub.backbones import Encoder
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, prefixed
from sslhub.heads import MAEDecoder, xavier_init_weights
from sslhub.masking import random_masking, sincos_2d_position_embedding
from sslhub.methods.base import ExportTargets, SSLMethod
from sslhub.methods.mae import MAE, MAEHparams, convert_mae
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained

# models_convmae.py convmae_convvit_base_patch16 / models_convvit.py convvit_base_patch16
CONVVIT_ARCHITECTURES = {
    "convvit_base_patch16": {
        "patch_size": (4, 2, 2),
        "embed_dim": (256, 384, 768),
        "depth": (2, 2, 11),
        "num_heads": 12,
    },
}
FUSION_KEYS = ("stage1_output_decode.", "stage2_output_decode.", "norm.")  # pretraining-only parts of the encoder


@dataclass
class ConvMAEHparams(MAEHparams):
    """``PRETRAIN.md`` (ConvMAE-Base): MAE's recipe and decoder (``MAEHparams``) for 1600 epochs."""

    epochs: int = 1600


class ConvPatchEmbed(nn.Module):
    """``PatchEmbed`` of ``vision_transformer.py``: (B, C, H, W) -> (B, D, H / p, W / p) by a convolution with kernel =
    stride = ``patch_size``, a LayerNorm over the channels (eps 1e-5) and a GELU."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=1e-5)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class CBlock(nn.Module):
    """``CBlock`` of ``vision_transformer.py`` on (B, D, H, W) maps: ``x + conv2(dw5x5(m ⊙ conv1(LN(x))))`` with 1x1
    ``conv1`` / ``conv2`` and a depthwise 5x5 ``attn``, then ``x + MLP(LN(x))`` of 1x1 convolutions (timm's ``Mlp``,
    ``use_conv=True``); both LayerNorms eps 1e-5. ``visible`` (B, 1, H, W), 1 = visible: the masked convolution of
    pretraining (``None``: nothing masked)."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-5)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = LayerNorm2d(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), use_conv=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if visible is not None:
            h = h * visible
        x = x + self.drop_path(self.conv2(self.attn(h)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _three(name: str, values: Sequence) -> tuple:
    if len(values) != 3:
        raise ValueError(f"ConvViT has three stages: {name} needs three values, got {list(values)}")
    return tuple(values)


def _repeat_to(mask: torch.Tensor | None, scale: int) -> torch.Tensor | None:
    """A (B, 1, h, w) mask repeated to (B, 1, h * scale, w * scale), each token's cell a scale x scale block."""
    return None if mask is None else mask.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


class ConvViTEncoder(Encoder):
    """ConvMAE's hybrid encoder with the authors' module names (module docstring): ``patch_embed1`` + ``blocks1``
    (CBlocks, 1/p1), ``patch_embed2`` + ``blocks2`` (CBlocks), ``patch_embed3`` + ``patch_embed4`` + ``pos_embed`` +
    ``blocks3`` (timm ViT blocks, 1/(p1 p2 p3)). ``forward_features``: the (B, L, D) stage-3 tokens after the last
    block; ``pool``: LayerNorm (no affine, eps 1e-6) of their mean, the ``--global_pool`` linear-probe feature."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: Sequence[int] = (4, 2, 2),
        embed_dim: Sequence[int] = (256, 384, 768),
        depth: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: Sequence[float] = (4, 4, 4),
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.patch_size, self.embed_dim = _three("patch_size", patch_size), _three("embed_dim", embed_dim)
        self.depth, self.mlp_ratio = _three("depth", depth), _three("mlp_ratio", mlp_ratio)
        self.stride = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        if img_size % self.stride:
            raise ValueError(f"img_size {img_size} is not a multiple of the total patch size {self.stride}")
        self.img_size, self.grid_size = img_size, (img_size // self.stride,) * 2
        self.num_features = self.embed_dim[2]
        total = sum(self.depth)  # stochastic depth rising linearly over all blocks (ConvViT's dpr)
        rates = iter([drop_path_rate * i / max(1, total - 1) for i in range(total)])
        dims = (in_chans, *self.embed_dim)
        self.patch_embed1, self.patch_embed2, self.patch_embed3 = (
            ConvPatchEmbed(p, dims[i], dims[i + 1]) for i, p in enumerate(self.patch_size)
        )
        self.patch_embed4 = nn.Linear(dims[3], dims[3])
        self.pos_embed = nn.Parameter(sincos_2d_position_embedding(dims[3], self.grid_size).unsqueeze(0))
        self.blocks1 = nn.ModuleList(CBlock(dims[1], self.mlp_ratio[0], next(rates)) for _ in range(self.depth[0]))
        self.blocks2 = nn.ModuleList(CBlock(dims[2], self.mlp_ratio[1], next(rates)) for _ in range(self.depth[1]))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks3 = nn.Sequential(
            *(
                Block(dims[3], num_heads, self.mlp_ratio[2], qkv_bias=True, norm_layer=norm, drop_path=next(rates))
                for _ in range(self.depth[2])
            )
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """``MaskedAutoencoderConvViT.initialize_weights``: xavier-uniform linear layers and ``patch_embed3`` (viewed as
        a linear layer), zero biases, unit LayerNorms; the other convolutions keep PyTorch's initialisation."""
        self.apply(xavier_init_weights)
        weight = self.patch_embed3.proj.weight
        nn.init.xavier_uniform_(weight.data.view(weight.shape[0], -1))

    def forward_convolutions(self, images: torch.Tensor, visible: torch.Tensor | None = None):
        """Stages 1 and 2: their (B, D1, H/p1, W/p1) and (B, D2, ...) maps. ``visible`` (B, 1, h, w) on the stage-3
        grid, 1 = visible, repeated to each stage's grid for the masked depthwise convolutions."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"this ConvViT takes (B, C, {self.img_size}, {self.img_size}) images (its position embedding is fixed "
                f"to {self.img_size} px), got shape {tuple(images.shape)}"
            )
        p2, p3 = self.patch_size[1:]
        x = self.patch_embed1(images)
        for block in self.blocks1:
            x = block(x, _repeat_to(visible, p2 * p3))
        stage1 = x
        x = self.patch_embed2(x)
        for block in self.blocks2:
            x = block(x, _repeat_to(visible, p3))
        return stage1, x

    def embed_tokens(self, stage2: torch.Tensor) -> torch.Tensor:
        """``patch_embed3``, flattened to (B, L, D), ``patch_embed4`` and the position embedding."""
        return self.patch_embed4(self.patch_embed3(stage2).flatten(2).transpose(1, 2)) + self.pos_embed

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks3(self.embed_tokens(self.forward_convolutions(images)[1]))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(hidden.mean(dim=1), hidden.shape[-1:], eps=1e-6)

    @property
    def architecture_note(self) -> str:
        widths = ", ".join(str(d) for d in self.embed_dim)
        return (
            f"ConvMAE's ConvViT, not a timm model: convolutional stages of CBlocks (patch sizes {self.patch_size}, "
            f"widths {widths}, depths {self.depth}) then ViT blocks on the 1/{self.stride} tokens; last_hidden_state "
            "is the stage-3 tokens, pooler_output the LayerNorm (no affine) of their mean, as the authors' linear "
            "probe (main_linprobe.py --global_pool)"
        )


def _mask_from_noise(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The (B, L) mask (1 = masked) that ``random_masking`` draws from ``noise``, before any token exists."""
    return random_masking(noise.unsqueeze(-1), mask_ratio, noise)[1]


def convert_convmae(container, source: str) -> Converted:
    """Alpha-VL/ConvMAE ``util/misc.py save_model`` (MAE's): ``{'model', ['optimizer', 'epoch', 'scaler', 'args']}``;
    ``model`` = ``MaskedAutoencoderConvViT``: the encoder (``patch_embed1``-``4``, ``pos_embed``, ``blocks1``-``3``)
    and the pretraining parts, the fusion (``stage1_output_decode``, ``stage2_output_decode``, ``norm``) and MAE's
    decoder (``mask_token``, ``decoder_*``, split off by ``convert_mae`` with its sizes)."""
    reader = KeyReader(entry(container, "model", source), source)
    fusion = {key: value for prefix in FUSION_KEYS for key, value in prefixed(prefix, reader.take(prefix)).items()}
    mae = convert_mae({**container, "model": reader.take("")}, source)
    reader.finish()
    if mae.method is None:
        left_out = [f"{key} (a pretraining part, the file has no decoder)" for key in sorted(fusion)]
        return Converted("convmae", mae.backbone, left_out=mae.left_out + left_out)
    method = {**mae.method, **fusion}
    return Converted("convmae", mae.backbone, method, {"encoder.": mae.backbone}, mae.method_overrides, mae.left_out)


def _is_convmae(container) -> bool:
    model = container.get("model") if isinstance(container, dict) else None
    return isinstance(model, dict) and "patch_embed1.proj.weight" in model and "patch_embed4.weight" in model


@register_method("convmae")
class ConvMAE(SSLMethod):
    """MAE on ConvViT (module docstring): masked convolutions in stages 1-2, the visible 25 % of the tokens in stage
    3, the stage-1 / stage-2 maps fused into its output, MAE's decoder and loss. Released: the ConvViT encoder."""

    Hparams = ConvMAEHparams
    paper = "ConvMAE: Masked Convolution Meets Masked Autoencoders"
    arxiv = "2205.03892"
    citation = (
        "@article{gao2022convmae,\n  title={ConvMAE: Masked Convolution Meets Masked Autoencoders},\n  author={Gao, "
        "Peng and Ma, Teli and Li, Hongsheng and Dai, Jifeng and Qiao, Yu},\n  journal={arXiv preprint "
        "arXiv:2205.03892},\n  year={2022}\n}"
    )
    released = (
        "ConvViT encoder without the fusion convolutions, the final norm and the decoder (pooler_output: LayerNorm of "
        "the mean stage-3 token, as the authors' linear probe)"
    )
    # FINETUNE.md multi-node linear probing: main_linprobe.py --global_pool, LARS blr 0.1 at 4 x 8 x 128 = 4096
    # images, weight decay 0, 90 epochs (10 warm-up), BatchNorm without affine before the linear layer
    linear_recipe = LinearRecipe(
        "Alpha-VL/ConvMAE main_linprobe.py --global_pool (FINETUNE.md)",
        0.1,
        90,
        4096,
        optimizer="lars",
        warmup_epochs=10,
        batchnorm=True,
    )
    checkpoint_layouts = (CheckpointLayout("convmae", _is_convmae, convert_convmae),)
    export_targets = ExportTargets(encoder=None)
    tiny_preset = "convmae_convvit_tiny_32px"
    tiny_overrides = {
        "decoder_depth": 1,
        "decoder_embed_dim": 32,
        "decoder_num_heads": 4,
        "backbone_kwargs": {"embed_dim": (16, 24, 32), "depth": (1, 1, 2), "num_heads": 2},
    }

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        enc = self.encoder
        enc.pos_embed.requires_grad_(False)  # fixed sin-cos in pretraining
        widths, (p2, p3) = enc.embed_dim, enc.patch_size[1:]
        self.patch_size = enc.stride  # the pixels each stage-3 token predicts (MAE.forward's patchify)
        self.stage1_output_decode = nn.Conv2d(widths[0], widths[2], p2 * p3, stride=p2 * p3)
        self.stage2_output_decode = nn.Conv2d(widths[1], widths[2], p3, stride=p3)
        self.norm = nn.LayerNorm(widths[2], eps=1e-6)
        self.decoder = MAEDecoder(
            enc.grid_size,
            enc.stride,
            widths[2],
            embed_dim=hp.decoder_embed_dim,
            depth=hp.decoder_depth,
            num_heads=hp.decoder_num_heads,
            mlp_ratio=enc.mlp_ratio[0],
            cls_token=False,
        )

    @classmethod
    def build_encoder(cls, config, **backbone_overrides) -> ConvViTEncoder:
        if config.backbone not in CONVVIT_ARCHITECTURES:
            raise ValueError(
                f"ConvMAE's encoder is a ConvViT, one of {sorted(CONVVIT_ARCHITECTURES)}; got {config.backbone!r}"
            )
        if config.pooling is not None:
            raise ValueError(
                f"the ConvViT encoder pools as the authors' linear probe (LayerNorm of the mean token); "
                f"pooling must be None, got {config.pooling!r}"
            )
        kwargs = {**CONVVIT_ARCHITECTURES[config.backbone], **config.backbone_kwargs, **backbone_overrides}
        return ConvViTEncoder(**kwargs)

    view_recipe = MAE.view_recipe  # main_pretrain.py's transform is MAE's

    def encode_visible(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """``forward_encoder``: the mask drawn on the stage-3 grid, masked convolutions in stages 1-2, the visible
        tokens (and the fused stage-1 / stage-2 maps at them) through stage 3, ``norm(x + s1 + s2)``. Returns (tokens
        (B, L_visible, D), mask (B, L), ids_restore)."""
        enc, ratio = self.encoder, self.hparams.mask_ratio
        height, width = enc.grid_size
        if noise is None:
            noise = torch.rand(images.shape[0], height * width, device=images.device)
        visible = 1 - _mask_from_noise(noise, ratio).reshape(-1, 1, height, width).to(images.dtype)
        stage1, stage2 = enc.forward_convolutions(images, visible)
        scales = (self.stage1_output_decode(stage1), self.stage2_output_decode(stage2))
        tokens = torch.cat([enc.embed_tokens(stage2), *(s.flatten(2).transpose(1, 2) for s in scales)], dim=-1)
        kept, mask, ids_restore = random_masking(tokens, ratio, noise)  # one gather for the three, same order
        x, stage1_kept, stage2_kept = kept.chunk(3, dim=-1)
        return self.norm(enc.blocks3(x) + stage1_kept + stage2_kept), mask, ids_restore

    forward = MAE.forward  # decoder on the visible tokens + mask tokens, masked_patch_mse on the 1/16 patches


register_preset(
    Preset(
        "convmae_convvit_base_patch16",
        "convmae",
        "convvit_base_patch16",
        description="ConvMAE on ConvViT-Base (patch sizes 4-2-2, widths 256/384/768, depths 2/2/11, 12 heads), 224 px: "
        "75 % random masking of the 14 x 14 tokens with masked convolutions, multi-scale fusion, decoder 8 x 512, "
        "norm-pix MSE, AdamW lr 1.5e-4 per 256, 1600 epochs",
    )
)

register_preset(
    Preset(
        "convmae_convvit_tiny_32px",
        "convmae",
        "convvit_base_patch16",
        image_size=32,
        backbone_kwargs={
            "img_size": 32,
            "patch_size": (1, 2, 2),
            "embed_dim": (64, 96, 192),
            "depth": (1, 1, 4),
            "num_heads": 3,
        },
        method_kwargs={"decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4, "warmup_epochs": 2},
        description="ConvMAE, a small ConvViT for 32 px images: patch sizes 1-2-2 (stages at 1/1, 1/2, 1/4: the 8 x 8 "
        "tokens of 4 px patches, each over 4 x 4 and 2 x 2 cells of stages 1 and 2 as at 224 px), widths 64/96/192, "
        "depths 1/1/4, 3 heads; decoder 2 x 128, 2 warm-up epochs",
    )
)

# Alpha-VL/ConvMAE README: "Pretrain on ImageNet-1K", the ConvMAE-Base checkpoint used in the paper (the whole
# MaskedAutoencoderConvViT, decoder included; Google Drive only, under a name sslhub chooses); "Main Results on
# ImageNet-1K": ConvMAE-B, 1600 epochs, fine-tuning 85.0, linear probing 70.9.
register_pretrained(
    PretrainedTag(
        "convmae_convvit_base_patch16",
        "in1k_1600ep",
        url="https://drive.google.com/file/d/1AEPivXw0A0b_m5EwEi6fg2pOAoDr8C31/view?usp=sharing",
        layout="convmae",
        license="mit",
        epochs=1600,
        metrics={"finetune": 85.0, "linear": 70.9},
        source="Alpha-VL/ConvMAE README (ConvMAE-Base pretrained checkpoint; ImageNet-1K: 1600 epochs, fine-tuning "
        "85.0, linear probing 70.9) and FINETUNE.md",
        download_name="convmae_base_1600ep_pretrain.pth",
    )
)
