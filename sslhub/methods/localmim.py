"""LocalMIM: masked image modelling with local multi-scale reconstruction.

Wang, Tang, Wang, Guo, Deng & Han, "Masked Image Modeling with Local Multi-Scale Reconstruction", arXiv 2303.05251
(CVPR 2023). Follows Haoqing-Wang/LocalMIM (``ViT/models_mim.py``, ``ViT/run_pretrain.py``, ``ViT/engine_pretrain.py``,
``ViT/util/lr_sched.py``, ``ViT/README.md``; the pixel target from ``Swin/models_mim.py``), built on MAE.

- Encoder (``forward_encoder``): MAE's ViT on the visible 25 % of the patches (``sslhub.methods.mae``); the outputs of
  blocks ``ID = [1, 3, depth-3, depth-1]`` (0-based; blocks 2, 4, 10, 12 of ViT-B) each pass their own LayerNorm
  (eps 1e-6); the last one is the encoder's final norm.
- Decoders (``MAE_Decoder``): one per supervised block, an MAE decoder (embedding, mask token, fixed sin-cos position
  embedding, ``depth`` blocks with qkv bias, norm; ViT-B: 1 block of width 256, 8 heads) whose patch tokens are laid
  out on the patch grid and go through a scale head: scale 4: ConvT 2x2/2 (D -> D/2), LayerNorm2d, GELU, ConvT 2x2/2
  (-> D/4); scale 2: ConvT 2x2/2 (-> D/2); scale 1: nothing; scale 0.5: 2x2 average pooling; then a 1x1 conv to the
  target dimension. Lower blocks predict finer cells: ``patch_size / scale`` = 4, 8, 16, 32 px for ViT-B/16.
- Targets (``forward_loss``), one per cell size: HOG (the ViT runs and releases; ``sslhub.targets.hog_features``,
  ``HOGLayer``: Sobel pair with reflect padding, orientation ``atan2(g_0, g_1)`` in 9 unsigned bins of π, each pixel's
  magnitude in its one bin (no interpolation, no Gaussian window), average pooling over the cell, L2 normalisation over
  the bins of each colour channel, channels R, G, B one after the other) or pixels, each cell normalised by its own
  mean and variance (``--target Pixel`` with ``norm_pix_loss`` of ``Swin/models_mim.py``). Both are computed on the
  normalised input image; the HOG targets get no further normalisation.
- Loss: ``L = Σ_k Σ_i M_k,i mean_d (ŷ_k,i,d - y_k,i,d)² / Σ_i M_k,i``, unweighted over the scales; the mask ``M_k`` is
  the patch mask repeated to the finer grids, averaged over 2 x 2 patches for the coarse one (``recal_mask``).
- Recipe (README, ViT-B): 1600 epochs, 40 warm-up, AdamW β (0.9, 0.95), base lr 2e-4 per 256 images (batch 8 x 256),
  cosine to min_lr 1e-6 (absolute), weight decay 0.05 except 1-d parameters and biases (timm's ``add_weight_decay``),
  mask ratio 0.75, bicubic random resized crop (0.2, 1) and flip (``run_pretrain.py``).

Verified against the authors' code (written out in ``tests/test_localmim.py``, equal to float precision): the encoder
tokens, the four HOG targets, the multi-scale masks and the loss terms of a tiny model converted from their
``save_model`` file. LocalMIM subclasses MAE so that its layout is tried before MAE's, whose detector also claims
these files.

Deviations and unverified facts: the HOG cells are ``patch_size / scale`` (the authors fix the pools at 4, 8, 16, 32,
the same for patch 16; other patch sizes do not fit their fixed pools). The ViT code has no pixel target;
``target="pixel"`` applies the Swin code's per-cell normalised pixels to the ViT's four scales (whether this is the
paper's ViT pixel setting could not be checked). The ViT-L run's ``--hog_bias`` (a randomly initialised, frozen bias
of the Sobel convolution) is not built and ``hog_bias`` files are refused; its 18 bins are ``hog_bins=18``. The
released file's exact content (decoders and Sobel filters included, or the encoder only) could not be inspected;
the layout reads the whole model or its encoder with the per-scale norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.heads import MAEDecoder
from sslhub.losses import masked_patch_mse
from sslhub.masking import patchify
from sslhub.methods.base import ExportTargets, MethodOutput, SSLMethod, hparam
from sslhub.methods.mae import MAE, MAEHparams, finetune_only_linear_recipe, visible_tokens
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.targets import SOBEL, hog_features

TARGETS = ("hog", "pixel")
SCALES = (4.0, 2.0, 1.0, 0.5)


@dataclass
class LocalMIMHparams(MAEHparams):
    """``ViT/README.md``'s ViT-B command over ``run_pretrain.py``'s defaults; decoders of ``MIM_vit_base_patch16``."""

    lr: float = 2e-4
    min_lr: float = 1e-6
    epochs: int = 1600
    norm_pix_loss: bool = hparam(True, "pixel target: each cell normalised by its own mean and variance")
    decoder_embed_dim: int = 256
    decoder_depth: int = 1
    decoder_num_heads: int = 8
    target: str = hparam("hog", "'hog' (HOG of every cell, the ViT runs) or 'pixel' (per-cell normalised pixels)")
    hog_bins: int = hparam(9, "orientation bins of the HOG target per colour channel (--hog_nbins)")
    supervised_blocks: tuple[int, ...] = hparam(
        (1, 3, -3, -1), "encoder blocks decoded, one per scale, Python indices (ID = [1, 3, depth-3, depth-1])"
    )
    scales: tuple[float, ...] = hparam(
        SCALES, "each decoder's output grid over the patch grid (4, 2: up-sampled; 0.5: pooled); cells patch/scale px"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.target not in TARGETS:
            raise ValueError(f"target {self.target!r}: expected one of {TARGETS}")
        if any(scale not in SCALES for scale in self.scales) or len(self.scales) != len(self.supervised_blocks):
            raise ValueError(
                f"scales {list(self.scales)}: one of {SCALES} for each of the supervised_blocks "
                f"{list(self.supervised_blocks)}"
            )


def scale_head(dim: int, scale: float, out_dim: int) -> nn.Sequential:
    """``MAE_Decoder.pred``: the up-sampling (transposed convolutions) or pooling of a (B, dim, h, w) token grid to
    ``scale`` times its resolution, then a 1x1 convolution to ``out_dim``."""
    layers: list[nn.Module] = []
    hidden = dim
    if scale == 4:
        layers = [
            nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            LayerNorm2d(dim // 2, eps=1e-6),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
        ]
        hidden = dim // 4
    elif scale == 2:
        layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
    elif scale == 0.5:
        layers = [nn.AvgPool2d(2, 2)]
    return nn.Sequential(*layers, nn.Conv2d(hidden, out_dim, 1))


class LocalMIMDecoder(MAEDecoder):
    """``MAE_Decoder``: the MAE decoder's blocks and norm, whose patch tokens (B, h w, D) go as a (B, D, h, w) grid
    through ``scale_head`` instead of MAE's linear prediction; returns (B, h w scale², out_dim), row-major."""

    def __init__(
        self, grid_size, encoder_dim: int, scale: float, out_dim: int, embed_dim: int, depth: int, num_heads: int
    ):
        super().__init__(grid_size, 1, encoder_dim, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        self.grid_size = tuple(grid_size)
        self.decoder_pred = nn.Identity()  # the scale head predicts
        self.pred = scale_head(embed_dim, scale, out_dim)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = super().forward(tokens, ids_restore)
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_size)
        return self.pred(grid).flatten(2).transpose(1, 2)


def mask_at_scale(mask: torch.Tensor, grid_size, scale: float) -> torch.Tensor:
    """``recal_mask``: the (B, h w) patch mask on the grid of ``scale``: each patch's value repeated scale x scale
    times (scale >= 1), or averaged over 2 x 2 patches (scale 0.5). (B, h w scale²), row-major."""
    grid = mask.reshape(mask.shape[0], 1, *grid_size)
    if scale >= 1:
        grid = grid.repeat_interleave(int(scale), 2).repeat_interleave(int(scale), 3)
    else:
        grid = F.avg_pool2d(grid, round(1 / scale))
    return grid.flatten(1)


# ``MAE_Decoder``'s names -> ``LocalMIMDecoder``'s (MAEDecoder's, plus the scale head ``pred``).
DECODER_NAMES = {
    "embed": "decoder_embed",
    "mask_token": "mask_token",
    "pos_embed": "decoder_pos_embed",
    "blocks": "decoder_blocks",
    "norm": "decoder_norm",
    "pred": "pred",
}


def _decoder_key(key: str, source: str) -> str:
    index, part, *rest = key.split(".", 2)
    if part not in DECODER_NAMES:
        raise CheckpointError(f"{source}: unexpected decoder key 'decoder.{key}' (expected {sorted(DECODER_NAMES)})")
    return ".".join([index, DECODER_NAMES[part], *rest])


def _sobel_check(hog: dict, source: str) -> list[str]:
    """``hog_enc.{k}.conv.weight`` must be ``HOGLayer``'s fixed Sobel pair, which ``hog_features`` uses."""
    expected = torch.stack([SOBEL, SOBEL.t()]).unsqueeze(1)
    for key, value in hog.items():
        if key.endswith(".bias"):
            raise CheckpointError(
                f"{source}: model.hog_enc.{key}: a HOG layer with a bias (--hog_bias, the ViT-L run) is not built here"
            )
        if value.shape != expected.shape or not torch.equal(value.float(), expected):
            raise CheckpointError(f"{source}: model.hog_enc.{key} is not the Sobel pair of LocalMIM's HOGLayer")
    return [f"model.hog_enc.* ({len(hog)} fixed Sobel filters, computed by sslhub.targets.hog_features)"] if hog else []


def _decoder_overrides(decoders: dict, in_chans: int) -> dict:
    """Decoder width, depth and HOG bins that the decoder tensors fix."""
    blocks = {int(key.split(".")[2]) for key in decoders if key.startswith("0.decoder_blocks.")}
    last = max(int(key.split(".")[2]) for key in decoders if key.startswith("0.pred.") and key.endswith(".weight"))
    out_dim = decoders[f"0.pred.{last}.weight"].shape[0]
    return {
        "decoder_embed_dim": decoders["0.decoder_embed.weight"].shape[0],
        "decoder_depth": len(blocks),
        "target": "hog",
        "hog_bins": out_dim // in_chans,
    }


def convert_localmim(container, source: str) -> Converted:
    """Haoqing-Wang/LocalMIM ``util/misc.py save_model``: ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``;
    ``model`` = ViT ``MaskedAutoencoderViT``: the encoder in timm ViT names with one norm per scale (``norm.0..3``; the
    last is the encoder's final norm), the decoders (``decoder.{k}.*``) and the Sobel filters of the HOG target
    (``hog_enc.{k}.conv.weight``)."""
    state = container.get("model") if isinstance(container, dict) else None
    reader = KeyReader(state, source)
    left_out = _sobel_check(reader.take("hog_enc."), source)
    decoders = reader.take("decoder.", lambda key: _decoder_key(key, source))
    norms = reader.take("norm.")
    encoder = reader.take("")
    reader.finish()
    count = len({key.split(".")[0] for key in norms})
    if not count or "patch_embed.proj.weight" not in encoder:
        raise CheckpointError(f"{source}: expected LocalMIM's encoder with per-scale norms (norm.0.weight ...)")
    encoder.update({f"norm.{name}": norms[f"{count - 1}.{name}"] for name in ("weight", "bias")})
    lower_norms = {key: value for key, value in norms.items() if int(key.split(".")[0]) < count - 1}
    left_out += leftover_entries(container, {"model"})
    if not decoders:  # the norms of the lower blocks serve only their decoders
        return Converted("localmim", encoder, left_out=left_out + [f"model.norm.{key}" for key in lower_norms])
    method = {**prefixed("scale_norms.", lower_norms), **prefixed("decoders.", decoders)}
    overrides = _decoder_overrides(decoders, encoder["patch_embed.proj.weight"].shape[1])
    return Converted("localmim", encoder, method, {"encoder.backbone.": encoder}, overrides, left_out)


def _is_localmim(container) -> bool:
    model = container.get("model") if isinstance(container, dict) else None
    return isinstance(model, dict) and "norm.0.weight" in model and "patch_embed.proj.weight" in model


@register_method("localmim")
class LocalMIM(MAE):
    """MAE's encoder with four supervised blocks: lower blocks reconstruct fine cells (4 px for ViT-B/16), upper ones
    coarse cells (32 px) of the masked patches, each through its own light decoder; HOG (or per-cell normalised pixel)
    targets, the four MSE losses summed. The released encoder is the ViT (its final norm = the last scale's norm)."""

    Hparams = LocalMIMHparams
    paper = "Masked Image Modeling with Local Multi-Scale Reconstruction (LocalMIM)"
    arxiv = "2303.05251"
    citation = (
        "@inproceedings{wang2023masked,\n  title={Masked Image Modeling with Local Multi-Scale Reconstruction},\n"
        "  author={Wang, Haoqing and Tang, Yehui and Wang, Yunhe and Guo, Jianyuan and Deng, Zhi-Hong and Han, Kai},\n"
        "  booktitle={CVPR},\n  pages={2122--2131},\n  year={2023}\n}"
    )
    released = "encoder (ViT without the per-scale norms of the lower blocks and the decoders)"
    linear_recipe = finetune_only_linear_recipe("LocalMIM")
    checkpoint_layouts = (CheckpointLayout("localmim", _is_localmim, convert_localmim),)
    export_targets = ExportTargets(encoder="ViTMAEModel")
    tiny_preset = "localmim_vit_tiny_patch4_32px"
    tiny_overrides = {"decoder_embed_dim": 64, "supervised_blocks": (0, 0, 1, 1), "backbone_kwargs": {"depth": 2}}

    def __init__(self, config):
        SSLMethod.__init__(self, config)  # MAE's encoder, view recipe and release, not its pixel decoder
        hp = self.hparams
        self.build_vit_encoder(config)
        vit = self.encoder.backbone
        self.grid_size = tuple(vit.patch_embed.grid_size)
        self.supervised_blocks = self._resolve_blocks(len(vit.blocks))
        self.scales = tuple(float(scale) for scale in hp.scales)
        if 0.5 in self.scales and any(side % 2 for side in self.grid_size):
            raise ValueError(f"scale 0.5 pools 2 x 2 patches: the patch grid {self.grid_size} must be even")
        self.cell_sizes = [self._cell_size(scale) for scale in self.scales]
        self.scale_norms = nn.ModuleList(nn.LayerNorm(vit.embed_dim, eps=1e-6) for _ in self.supervised_blocks[:-1])
        in_chans = vit.patch_embed.proj.in_channels
        self.decoders = nn.ModuleList(
            LocalMIMDecoder(
                self.grid_size,
                vit.embed_dim,
                scale,
                self._target_dim(cell, in_chans),
                hp.decoder_embed_dim,
                hp.decoder_depth,
                hp.decoder_num_heads,
            )
            for scale, cell in zip(self.scales, self.cell_sizes, strict=True)
        )

    def _resolve_blocks(self, depth: int) -> tuple[int, ...]:
        try:
            blocks = tuple(range(depth)[index] for index in self.hparams.supervised_blocks)
        except IndexError:
            raise ValueError(
                f"supervised_blocks {list(self.hparams.supervised_blocks)}: out of {depth} blocks"
            ) from None
        if list(blocks) != sorted(blocks) or blocks[-1] != depth - 1:
            raise ValueError(
                f"supervised_blocks {list(self.hparams.supervised_blocks)} resolve to {list(blocks)}: they must be in "
                f"order and end at the last block ({depth - 1}), whose norm is the encoder's"
            )
        return blocks

    def _cell_size(self, scale: float) -> int:
        cell = self.patch_size / scale
        if cell != int(cell) or cell < 1:
            raise ValueError(f"scale {scale} needs a patch size divisible by it, got patch size {self.patch_size}")
        return int(cell)

    def _target_dim(self, cell: int, in_chans: int) -> int:
        return in_chans * self.hparams.hog_bins if self.hparams.target == "hog" else in_chans * cell**2

    def encode_supervised(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """``forward_encoder``: the normed outputs of the supervised blocks (finest scale first). Returns (outputs,
        mask, ids_restore)."""
        vit = self.encoder.backbone
        x, mask, ids_restore = visible_tokens(vit, images, self.hparams.mask_ratio, noise)
        norms = [*self.scale_norms, vit.norm]
        outputs = []
        for index, block in enumerate(vit.blocks):
            x = block(x)
            outputs += [norm(x) for norm, kept in zip(norms, self.supervised_blocks, strict=True) if kept == index]
        return outputs, mask, ids_restore

    def targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One (B, cells, dim) target per scale: HOG or pixels of the cells, row-major."""
        if self.hparams.target == "hog":
            return [
                hog_features(images, cell, self.hparams.hog_bins).flatten(2).transpose(1, 2) for cell in self.cell_sizes
            ]
        return [patchify(images, cell) for cell in self.cell_sizes]

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views[0]``: the images; ``batch.extras["noise"]`` (B, L), optional: MAE's masking noise."""
        images = batch.views[0]
        outputs, mask, ids_restore = self.encode_supervised(images, batch.extras.get("noise"))
        normalise = self.hparams.target == "pixel" and self.hparams.norm_pix_loss
        losses = [
            masked_patch_mse(
                decoder(tokens, ids_restore), target, mask_at_scale(mask, self.grid_size, scale), normalise
            )
            for decoder, tokens, target, scale in zip(
                self.decoders, outputs, self.targets(images), self.scales, strict=True
            )
        ]
        names = [f"loss_{cell}px" for cell in self.cell_sizes]
        return MethodOutput(sum(losses), {name: loss.item() for name, loss in zip(names, losses, strict=True)})


register_preset(
    Preset(
        "localmim_vit_base_patch16_224",
        "localmim",
        "vit_base_patch16_224",
        description="LocalMIM on a timm ViT-B/16: HOG of 4, 8, 16, 32 px cells from blocks 2, 4, 10, 12, decoders "
        "1 x 256, AdamW lr 2e-4 per 256, 1600 epochs",
    )
)

register_preset(
    Preset(
        "localmim_vit_tiny_patch4_32px",
        "localmim",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4},
        method_kwargs={"decoder_embed_dim": 128, "decoder_num_heads": 4, "warmup_epochs": 2},
        description="LocalMIM, ViT-Tiny with 4 px patches for 32 px images: HOG of 1, 2, 4, 8 px cells (patch / "
        "4, 2, 1, 0.5 as at 224 px) from blocks 2, 4, 10, 12; decoders 1 x 128; 2 warm-up epochs",
    )
)

# Haoqing-Wang/LocalMIM README, "Pre-Trained Models": ViT-B, HOG target, 1600 epochs at 224 px, fine-tuned top-1 84.0;
# a GitHub release file written by save_model (the whole model, decoders included: inferred, not inspected). The
# repository has no licence file (its code headers name MAE's CC-BY-NC).
_LOCALMIM_VIT_B = (
    "https://github.com/Haoqing-Wang/LocalMIM/releases/download/pretrain/vit_base_localmim_hog_1600ep_pretrain.pth"
)
register_pretrained(
    PretrainedTag(
        "localmim_vit_base_patch16_224",
        "in1k_hog_1600ep",
        url=_LOCALMIM_VIT_B,
        full_url=_LOCALMIM_VIT_B,
        layout="localmim",
        license="unknown",
        epochs=1600,
        metrics={"finetune": 84.0},
        source="Haoqing-Wang/LocalMIM README (ViT-B, HOG, 1600 epochs, 224 px: fine-tuned top-1 84.0)",
    )
)
