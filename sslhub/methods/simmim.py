"""SimMIM: masked image modelling by regressing the raw pixels of masked patches.

Xie, Zhang, Cao, Lin, Bao, Yao, Dai & Hu, "SimMIM: A Simple Framework for Masked Image Modeling", arXiv 2111.09886
(CVPR 2022). Follows microsoft/SimMIM (``models/simmim.py``, ``models/vision_transformer.py``,
``data/data_simmim.py``, ``main_simmim.py``, ``optimizer.py``, ``lr_scheduler.py``,
``configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml``).

- Masking (``MaskGenerator``, §3.1 "random masking"): the image is divided into mask patches of 32 x 32 px and
  ``ceil(0.6 n)`` of the n of them are masked, drawn uniformly without replacement; the mask is then repeated to the
  model's 16 px patch grid.
- Encoder (``VisionTransformerForSimMIM``): the BEiT-style ViT-B the authors release, timm's ``Beit`` with no
  absolute position embedding, one relative position bias shared by all blocks, layer scale 0.1, ``q_bias`` /
  ``v_bias``, LayerNorm eps 1e-6; the patch embeddings of the masked patches are replaced by a learnable
  ``mask_token`` (x (1 - w) + m w) before the class token is prepended.
- Prediction head (§3.3): one 1x1 convolution of the final-norm patch tokens to 16 x 16 x 3 values per patch and a
  pixel shuffle back to the image size.
- Loss (eq. 1): L1 between the reconstruction and the normalised input image on the masked pixels only, summed and
  divided by the number of masked pixels times the 3 channels (``(l1 * mask).sum() / (mask.sum() + 1e-5) / 3``).
- Recipe (the ViT-B config and ``config.py``): random resized crop 224, scale (0.67, 1), ratio (3/4, 4/3),
  bilinear, flip, ImageNet mean / std; AdamW β (0.9, 0.999), eps 1e-8, base lr 1e-4 per 512 images, weight decay 0.05
  except on 1-d parameters (norms, layer-scale gammas), biases and the class token (``get_pretrain_param_groups`` with
  the ViT's ``no_weight_decay``; the mask token and the relative position table are decayed, as there), 10 warm-up
  epochs (per step) from 5e-7 per 512, the lr multiplied by 0.1 at epoch 700 of 800, gradient norm clipped at 5, drop
  path 0.1.

Deviations: the released encoder's ``pooler_output`` is the mean of its final-norm patch tokens (``default_pooling =
"mean"``); the authors' fine-tuning (``simmim_finetune__vit_base__img224__800ep.yaml``) drops the final norm, gives
each block its own copy of the shared position table and puts a fresh LayerNorm after the mean of the patch tokens,
which is a fine-tuning architecture, not the released one. ``last_hidden_state`` is every token after the final norm.
The Swin encoders of the paper are not built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit, gen_relative_position_index
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.methods.base import ExportTargets, MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, ViewRecipe, Views, crop, flip, view

# timm Beit arguments of the released ViT-B (the pretraining config's MODEL.VIT and config.py's INIT_VALUES)
SIMMIM_VIT = {"use_abs_pos_emb": False, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "init_values": 0.1}


@dataclass
class SimMIMHparams(MethodHparams):
    """``simmim_pretrain__vit_base__img224__800ep.yaml`` over ``config.py``'s defaults (module docstring)."""

    optimizer: str = "adamw"
    lr: float = 1e-4
    lr_batch_size: int = 512
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    warmup_epochs: float = 10
    warmup_start_ratio: float = 5e-7 / 1e-4
    clip_grad: float | None = 5.0
    epochs: int = 800
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (700,)
    mask_ratio: float = hparam(0.6, "fraction of the mask patches masked (DATA.MASK_RATIO)")
    mask_patch_size: int = hparam(32, "side of a mask patch in pixels, a multiple of the model's patch size")
    crop_scale_min: float = hparam(0.67, "smallest area fraction of the random resized crop")
    drop_path_rate: float = hparam(0.1, "stochastic depth of the encoder (MODEL.DROP_PATH_RATE)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


class SimMIMMasks:
    """``MaskGenerator``: ``ceil(mask_ratio n)`` of the n mask patches of ``mask_patch_size`` px masked at random,
    repeated to the (H / patch_size, W / patch_size) grid of the model's patches; an int64 tensor, 1 = masked."""

    def __init__(self, image_size: int, mask_patch_size: int, patch_size: int, mask_ratio: float):
        if image_size % mask_patch_size or mask_patch_size % patch_size:
            raise ValueError(
                f"the image size ({image_size}) must be a multiple of mask_patch_size ({mask_patch_size}), and that "
                f"of the model's patch size ({patch_size})"
            )
        self.side = image_size // mask_patch_size
        self.scale = mask_patch_size // patch_size
        self.count = math.ceil(self.side**2 * mask_ratio)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        mask = torch.zeros(self.side**2, dtype=torch.long)
        mask[torch.randperm(self.side**2, generator=generator)[: self.count]] = 1
        mask = mask.reshape(self.side, self.side)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)


class SimMIMViews(ViewRecipe):
    """``SimMIMTransform``: one augmented view and its mask (``extras["mask"]``, the model's patch grid)."""

    def __init__(self, transform, masks: SimMIMMasks):
        self.transform, self.masks = transform, masks

    def make_views(self, image) -> Views:
        return Views([self.transform(image)], {"mask": self.masks()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform}, mask_patches={self.masks.side}x{self.masks.side})"


def masked_pixel_l1(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's eq. 1 as ``SimMIM.forward``: ``mask`` (B, h, w) on the patch grid, repeated to pixels; the L1 error
    summed over the masked pixels and channels, divided by (masked pixels + 1e-5) x channels."""
    scale = images.shape[-1] // mask.shape[-1]
    pixels = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).unsqueeze(1).to(images.dtype)
    error = F.l1_loss(images, reconstruction, reduction="none")
    return (error * pixels).sum() / (pixels.sum() + 1e-5) / images.shape[1]


def _relative_position_check(encoder: dict, source: str, file_prefix: str = "encoder.") -> list[str]:
    """The file's ``rel_pos_bias.relative_position_index`` (``file_prefix`` + that in the file: SimMIM's model keeps
    its encoder under ``encoder.``, BEiT's at the top) must be the one timm's ``Beit`` computes for its grid (BEiT's
    index with the class-token rows); it is a buffer timm builds itself, so it is left out."""
    index = encoder.pop("rel_pos_bias.relative_position_index", None)
    if index is None:
        return []
    key = f"{file_prefix}rel_pos_bias.relative_position_index"
    side = math.isqrt(index.shape[0] - 1)
    expected = gen_relative_position_index((side, side))
    if index.shape != expected.shape or not torch.equal(index.long(), expected):
        raise CheckpointError(f"{source}: {key} is not BEiT's index of a {side}x{side} grid")
    return [f"{key} (timm computes the same index)"]


def convert_simmim(container, source: str) -> Converted:
    """microsoft/SimMIM ``utils.py save_checkpoint``: ``{'model', 'optimizer', 'lr_scheduler', 'max_accuracy',
    'epoch', 'config'}``; ``model`` = ``SimMIM(encoder, encoder_stride)``: ``encoder.*`` (timm ``Beit`` names, plus
    ``mask_token`` and the shared ``rel_pos_bias.relative_position_index``) and ``decoder.0.*`` (the 1x1 conv)."""
    reader = KeyReader(entry(container, "model", source), source)
    mask_token = reader.take_one("encoder.mask_token")
    decoder = reader.take("decoder.")
    encoder = reader.take("encoder.")
    reader.finish()
    left_out = _relative_position_check(encoder, source) + leftover_entries(container, {"model"})
    method = {"mask_token": mask_token, **prefixed("decoder.", decoder)}
    return Converted("simmim", encoder, method, {"encoder.backbone.": encoder}, left_out=left_out)


def _is_simmim(container) -> bool:
    model = container.get("model") if isinstance(container, dict) else None
    return isinstance(model, dict) and "encoder.mask_token" in model and "decoder.0.weight" in model


@register_method("simmim")
class SimMIM(SSLMethod):
    """The encoder sees every patch, the masked ones as ``mask_token``; a 1x1 conv + pixel shuffle predicts the
    image; L1 on the masked pixels. Released: the encoder (without mask token and prediction head)."""

    Hparams = SimMIMHparams
    paper = "SimMIM: A Simple Framework for Masked Image Modeling"
    arxiv = "2111.09886"
    citation = (
        "@inproceedings{xie2022simmim,\n  title={SimMIM: A Simple Framework for Masked Image Modeling},\n  author="
        "{Xie, Zhenda and Zhang, Zheng and Cao, Yue and Lin, Yutong and Bao, Jianmin and Yao, Zhuliang and Dai, Qi "
        "and Hu, Han},\n  booktitle={CVPR},\n  year={2022}\n}"
    )
    released = "encoder (BEiT-style ViT without the mask token and the prediction head)"
    default_pooling = "mean"
    no_weight_decay = ("encoder.backbone.cls_token",)  # VisionTransformer.no_weight_decay (no pos_embed here)
    # The paper evaluates by fine-tuning (simmim_finetune__vit_base__img224__800ep.yaml); it gives no linear recipe.
    linear_recipe = LinearRecipe("sslhub linear protocol (SimMIM publishes fine-tuning only)", 0.1, 90, 256)
    checkpoint_layouts = (CheckpointLayout("simmim", _is_simmim, convert_simmim),)
    export_targets = ExportTargets(encoder="BeitModel")
    tiny_preset = "simmim_vit_tiny_patch4_32px"
    tiny_overrides = {"backbone_kwargs": {**SIMMIM_VIT, "img_size": 32, "patch_size": 4, "embed_dim": 32,
                                          "depth": 2, "num_heads": 2}}  # fmt: skip

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config, drop_path_rate=hp.drop_path_rate)
        vit = self.encoder.backbone
        if not isinstance(vit, Beit):
            raise ValueError(f"SimMIM's encoder is timm's Beit (a BEiT-style ViT), got {config.backbone!r}")
        self.patch_size = vit.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # VisionTransformerForSimMIM._trunc_normal_
        self.decoder = nn.Sequential(
            nn.Conv2d(vit.num_features, self.patch_size**2 * 3, kernel_size=1), nn.PixelShuffle(self.patch_size)
        )
        self.masks = SimMIMMasks(config.image_size, hp.mask_patch_size, self.patch_size, hp.mask_ratio)

    def view_recipe(self):
        cfg = self.config
        transform = view(crop(cfg.image_size, (self.hparams.crop_scale_min, 1.0), BILINEAR), flip(),
                         mean=cfg.image_mean, std=cfg.image_std)  # fmt: skip
        return SimMIMViews(transform, self.masks)

    def encode_masked(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``VisionTransformerForSimMIM.forward``: patch embeddings blended with the mask token by the (B, h, w)
        mask, class token prepended, blocks with the shared relative position bias, final norm. Returns the patch
        tokens as a (B, D, h, w) map."""
        vit = self.encoder.backbone
        x = vit.patch_embed(images)
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = vit.pos_drop(torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        rel_pos_bias = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
        for block in vit.blocks:
            x = block(x, shared_rel_pos_bias=rel_pos_bias)
        patches = vit.norm(x)[:, 1:]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, *mask.shape[-2:])

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views[0]``: the images; ``batch.extras["mask"]`` (B, h, w), 1 = masked: drawn by
        ``SimMIMMasks`` when absent."""
        images = batch.views[0]
        mask = batch.extras.get("mask")
        if mask is None:
            mask = torch.stack([self.masks() for _ in range(images.shape[0])])
        mask = mask.to(images.device)
        reconstruction = self.decoder(self.encode_masked(images, mask))
        return MethodOutput(masked_pixel_l1(images, reconstruction, mask))


register_preset(
    Preset(
        "simmim_vit_base_patch16_224",
        "simmim",
        "beit_base_patch16_224",
        backbone_kwargs=dict(SIMMIM_VIT),
        description="SimMIM on the released BEiT-style ViT-B/16 (shared relative position bias, layer scale 0.1): "
        "32 px mask patches, ratio 0.6, L1 on masked pixels, AdamW lr 1e-4 per 512, 800 epochs",
    )
)

register_preset(
    Preset(
        "simmim_vit_tiny_patch4_32px",
        "simmim",
        "beit_base_patch16_224",
        image_size=32,
        backbone_kwargs={**SIMMIM_VIT, "img_size": 32, "patch_size": 4, "embed_dim": 192, "num_heads": 3},
        method_kwargs={"mask_patch_size": 8, "warmup_epochs": 2, "lr_milestones": ()},
        description="SimMIM, BEiT-style ViT-Tiny (192 wide, 12 blocks) with 4 px patches for 32 px images: 8 px mask "
        "patches (2 x 2 model patches, as 32 / 16 at 224 px), ratio 0.6, 2 warm-up epochs, no lr step",
    )
)

# microsoft/SimMIM README, "ViT-Base" row: pre-trained 800 epochs at 224 px, fine-tuned 100 epochs: 83.8 top-1.
# The file is on Google Drive only; it holds the whole SimMIM model (encoder, mask token, prediction head).
register_pretrained(
    PretrainedTag(
        "simmim_vit_base_patch16_224",
        "in1k_800ep",
        url="https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw/view?usp=sharing",
        full_url="https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw/view?usp=sharing",
        layout="simmim",
        license="mit",
        epochs=800,
        metrics={"finetune": 83.8},
        source="microsoft/SimMIM README (ViT-Base, 800 epochs, 224 px: fine-tuned top-1 83.8)",
    )
)
