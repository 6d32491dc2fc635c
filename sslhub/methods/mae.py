"""MAE: masked autoencoders.

He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377 (CVPR 2022).
Follows facebookresearch/mae (``models_mae.py``, ``main_pretrain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslhub.backbones import is_vision_transformer
from sslhub.heads import MAEDecoder, xavier_init_weights
from sslhub.losses import masked_patch_mse
from sslhub.masking import patchify, random_masking, sincos_2d_position_embedding
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import single_view_mae


@dataclass
class MAEHparams(MethodHparams):
    """Defaults of ``main_pretrain.py`` / the paper's Table 8: AdamW β=(0.9, 0.95), base lr 1.5e-4 per 256 images,
    wd 0.05, 40 warm-up epochs, cosine; 75 % masking, normalised-pixel targets, decoder 8 x 512."""

    optimizer: str = "adamw"
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_epochs: float = 40
    epochs: int = 800
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    crop_scale_min: float = 0.2


@register_method("mae")
class MAE(SSLMethod):
    """A ViT encoder sees only the visible 25 % of the patches (plus the class token); a light decoder gets the
    encoded patches and mask tokens with fixed sin-cos position embeddings and predicts the pixels of the masked
    patches; loss = MSE on masked patches against per-patch normalised targets. The released encoder is the ViT
    without the decoder (its position embedding is the fixed sin-cos one).
    """

    Hparams = MAEHparams
    paper = "Masked Autoencoders Are Scalable Vision Learners (MAE)"
    arxiv = "2111.06377"
    citation = (
        "@inproceedings{he2022masked,\n  title={Masked Autoencoders Are Scalable Vision Learners},\n"
        "  author={He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\'a}r, Piotr"
        " and Girshick, Ross},\n  booktitle={CVPR},\n  year={2022}\n}"
    )
    released = "encoder (ViT without the decoder)"

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.create_backbone()
        if not is_vision_transformer(self.encoder) or getattr(self.encoder, "cls_token", None) is None:
            raise ValueError(f"MAE needs a ViT backbone with a class token, got {config.backbone!r}")
        self._init_encoder()
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        self.decoder = MAEDecoder(
            self.encoder.patch_embed.grid_size,
            self.patch_size,
            self.encoder.embed_dim,
            embed_dim=hp.decoder_embed_dim,
            depth=hp.decoder_depth,
            num_heads=hp.decoder_num_heads,
        )

    def _init_encoder(self) -> None:
        """``MaskedAutoencoderViT.initialize_weights``: fixed sin-cos position embedding, xavier patch projection
        and linear layers, normal(0.02) class token."""
        enc = self.encoder
        pos = sincos_2d_position_embedding(enc.embed_dim, enc.patch_embed.grid_size, cls_token=True)
        enc.pos_embed.data.copy_(pos.unsqueeze(0))
        enc.pos_embed.requires_grad_(False)
        enc.apply(xavier_init_weights)
        weight = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.data.view(weight.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)

    @property
    def released_backbone(self):
        return self.encoder

    def view_transform(self):
        cfg = self.config
        return single_view_mae(cfg.image_size, cfg.image_mean, cfg.image_std, scale=(self.hparams.crop_scale_min, 1.0))

    def encode_visible(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """``forward_encoder``: embed patches, add position embeddings, keep a random 25 %, prepend the class token,
        run the blocks and the final norm. Returns (tokens, mask, ids_restore)."""
        enc = self.encoder
        patches = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        visible, mask, ids_restore = random_masking(patches, self.hparams.mask_ratio, noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(visible.shape[0], -1, -1)
        tokens = enc.norm(enc.blocks(enc.norm_pre(torch.cat([cls, visible], dim=1))))
        return tokens, mask, ids_restore

    def forward(self, views: list[torch.Tensor], noise: torch.Tensor | None = None) -> MethodOutput:
        images = views[0]
        tokens, mask, ids_restore = self.encode_visible(images, noise)
        prediction = self.decoder(tokens, ids_restore)
        loss = masked_patch_mse(prediction, patchify(images, self.patch_size), mask, self.hparams.norm_pix_loss)
        return MethodOutput(loss)


for _arch in ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"):
    register_preset(Preset(f"mae_{_arch}", "mae", _arch, description=f"MAE on a timm {_arch}"))

register_preset(
    Preset(
        "mae_vit_tiny_patch4_32px",
        "mae",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4},
        method_kwargs={
            "decoder_embed_dim": 128,
            "decoder_depth": 2,
            "decoder_num_heads": 4,
            "warmup_epochs": 2,
        },
        description="MAE, ViT-Tiny with 4 px patches for 32 px images; decoder 2 x 128 and 2 warm-up epochs",
    )
)

# The released 1600-epoch norm-pix-loss encoders (facebookresearch/mae README and FINETUNE.md; the files hold no
# decoder): fine-tuning top-1 from the README, linear probing from the paper (Table 3 / §4), timm's ``.mae`` copies.
for _preset, _size, _hub, _finetune, _linear in (
    ("mae_vit_base_patch16_224", "base", "timm/vit_base_patch16_224.mae", 83.6, 68.0),
    ("mae_vit_large_patch16_224", "large", "timm/vit_large_patch16_224.mae", 85.9, 75.8),
    ("mae_vit_huge_patch14_224", "huge", "timm/vit_huge_patch14_224.mae", 86.9, 76.6),
):
    register_pretrained(
        PretrainedTag(
            _preset,
            "in1k",
            url=f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{_size}.pth",
            layout="mae",
            license="cc-by-nc-4.0",
            epochs=1600,
            metrics={"finetune": _finetune, "linear": _linear},
            hf_hub_id=_hub,
            source="facebookresearch/mae README and FINETUNE.md",
        )
    )
