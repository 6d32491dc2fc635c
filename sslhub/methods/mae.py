"""MAE: masked autoencoders.

He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377 (CVPR 2022).
Follows facebookresearch/mae (``models_mae.py``, ``main_pretrain.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import ViTMAEConfig

from sslhub.backbones import is_vision_transformer
from sslhub.batch import Batch
from sslhub.conversion.hf_transformers import hf_encoder_state, left_out_entries, mae_decoder_from_transformers
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.heads import MAEDecoder, xavier_init_weights
from sslhub.losses import masked_patch_mse
from sslhub.masking import patchify, random_masking, sincos_2d_position_embedding
from sslhub.methods.base import ExportTargets, MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BICUBIC, MultiView, crop, flip, view


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
    mask_ratio: float = hparam(0.75, "fraction of the patches masked (--mask_ratio)")
    norm_pix_loss: bool = hparam(True, "targets = pixels normalised per patch (--norm_pix_loss)")
    decoder_embed_dim: int = hparam(512, "width of the decoder")
    decoder_depth: int = hparam(8, "Transformer blocks of the decoder")
    decoder_num_heads: int = hparam(16, "attention heads of the decoder")
    crop_scale_min: float = hparam(0.2, "smallest area fraction of the random resized crop")


MAE_DECODER_KEYS = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")  # fmt: skip


def convert_mae(container, source: str) -> Converted:
    """facebookresearch/mae ``util/misc.py save_model``: ``{'model', ['optimizer', 'epoch', 'scaler', 'args']}``;
    ``model`` = ``MaskedAutoencoderViT`` (timm ViT names, fixed sin-cos ``pos_embed``) with the decoder
    (``mask_token``, ``decoder_*``) in pretraining / visualisation files; the released ``mae_pretrain_*.pth``
    files hold the encoder only."""
    reader = KeyReader(entry(container, "model", source), source)
    decoder = {}
    for prefix in MAE_DECODER_KEYS:
        decoder.update(prefixed(prefix, reader.take(prefix)))
    encoder = reader.take("")
    reader.finish()
    left_out = leftover_entries(container, {"model"})
    if not decoder:
        return Converted("mae", encoder, left_out=left_out)
    blocks = {int(key.split(".")[1]) for key in decoder if key.startswith("decoder_blocks.")}
    overrides = {"decoder_embed_dim": decoder["decoder_embed.weight"].shape[0], "decoder_depth": len(blocks)}
    return Converted("mae", encoder, prefixed("decoder.", decoder), {"encoder.backbone.": encoder}, overrides, left_out)


def _is_mae(container) -> bool:
    model = container.get("model")
    return isinstance(model, dict) and any(key.startswith("patch_embed.") for key in model)


def convert_vit_mae_for_pretraining(container, source: str) -> Converted:
    """A transformers ``ViTMAEForPreTraining`` directory: the encoder (``vit.*``) in timm names and the decoder
    (``decoder.*``) as MAE's ``MAEDecoder``, with the decoder sizes, ``mask_ratio`` and ``norm_pix_loss`` of its
    config as hyperparameters."""
    state_dict = container["state_dict"]
    config = ViTMAEConfig.from_dict(container["config"])
    backbone, ignored = hf_encoder_state(state_dict, container["config"], source)
    try:
        decoder, decoder_ignored = mae_decoder_from_transformers(state_dict, config)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err
    overrides = {
        "decoder_embed_dim": config.decoder_hidden_size,
        "decoder_depth": config.decoder_num_hidden_layers,
        "decoder_num_heads": config.decoder_num_attention_heads,
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
    }
    left_out = left_out_entries({key: rule for key, rule in ignored.items() if key in decoder_ignored})
    method = prefixed("decoder.", decoder)
    return Converted("vit_mae", backbone, method, {"encoder.backbone.": backbone}, overrides, left_out)


def _is_vit_mae_for_pretraining(container) -> bool:
    return any(key.startswith("decoder.") for key in container["state_dict"])


def init_mae_encoder(vit: nn.Module) -> None:
    """``MaskedAutoencoderViT.initialize_weights`` on a timm ViT: fixed sin-cos position embedding, xavier patch
    projection and linear layers, normal(0.02) class token."""
    pos = sincos_2d_position_embedding(vit.embed_dim, vit.patch_embed.grid_size, cls_token=True)
    vit.pos_embed.data.copy_(pos.unsqueeze(0))
    vit.pos_embed.requires_grad_(False)
    vit.apply(xavier_init_weights)
    weight = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.data.view(weight.shape[0], -1))
    nn.init.normal_(vit.cls_token, std=0.02)


def visible_tokens(vit: nn.Module, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """The input of ``forward_encoder``'s blocks on a timm ViT: patch embeddings plus position embeddings, the
    ``1 - mask_ratio`` lowest-noise patches kept, the class token prepended (then ``norm_pre``). Returns
    (tokens, mask, ids_restore); methods that read intermediate blocks (DeepMIM, LocalMIM) run the blocks themselves."""
    patches = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    visible, mask, ids_restore = random_masking(patches, mask_ratio, noise)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(visible.shape[0], -1, -1)
    return vit.norm_pre(torch.cat([cls, visible], dim=1)), mask, ids_restore


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
    # facebookresearch/mae main_linprobe.py: LARS lr 0.1 per 256 images at batch 16384, 90 epochs (10 warm-up),
    # BatchNorm without affine before the linear layer
    linear_recipe = LinearRecipe(
        "facebookresearch/mae main_linprobe.py", 0.1, 90, 16384, optimizer="lars", warmup_epochs=10, batchnorm=True
    )
    checkpoint_layouts = (
        CheckpointLayout("mae", _is_mae, convert_mae),
        CheckpointLayout("vit_mae", _is_vit_mae_for_pretraining, convert_vit_mae_for_pretraining, ("vit_mae",)),
    )
    export_targets = ExportTargets(encoder="ViTMAEModel", pretraining="ViTMAEForPreTraining")
    tiny_preset = "mae_vit_tiny_patch4_32px"
    tiny_overrides = {"decoder_depth": 1, "decoder_embed_dim": 64, "backbone_kwargs": {"depth": 2}}

    def __init__(self, config):
        super().__init__(config)
        self.build_vit_encoder(config)
        self.decoder = self.build_decoder()

    def build_vit_encoder(self, config) -> None:
        """``self.encoder``: the ViT (with a class token) that sees the visible patches, MAE's init; ``patch_size``."""
        self.encoder = self.build_encoder(config)
        vit = self.encoder.backbone
        if not is_vision_transformer(vit) or getattr(vit, "cls_token", None) is None:
            raise ValueError(f"{type(self).__name__} needs a ViT backbone with a class token, got {config.backbone!r}")
        init_mae_encoder(vit)
        self.patch_size = vit.patch_embed.patch_size[0]

    def build_decoder(self) -> MAEDecoder:
        """A decoder of ``hparams``' size from the encoder's tokens to ``prediction_dim()`` values per patch."""
        vit, hp = self.encoder.backbone, self.hparams
        return MAEDecoder(
            vit.patch_embed.grid_size,
            self.patch_size,
            vit.embed_dim,
            embed_dim=hp.decoder_embed_dim,
            depth=hp.decoder_depth,
            num_heads=hp.decoder_num_heads,
            out_dim=self.prediction_dim(),
        )

    def prediction_dim(self) -> int:
        """Values the decoders predict per patch: its pixels."""
        return self.patch_size**2 * 3

    def view_recipe(self):
        """``main_pretrain.py``: bicubic random resized crop and horizontal flip, nothing else."""
        cfg = self.config
        pieces = crop(cfg.image_size, (self.hparams.crop_scale_min, 1.0), BICUBIC), flip()
        return MultiView([view(*pieces, mean=cfg.image_mean, std=cfg.image_std)])

    def encode_visible(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """``forward_encoder``: embed patches, add position embeddings, keep a random 25 %, prepend the class token,
        run the blocks and the final norm. Returns (tokens, mask, ids_restore)."""
        enc = self.encoder.backbone
        tokens, mask, ids_restore = visible_tokens(enc, images, self.hparams.mask_ratio, noise)
        return enc.norm(enc.blocks(tokens)), mask, ids_restore

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views[0]``: the images; ``batch.extras["noise"]`` (B, L), optional: the masking noise (the
        lowest-noise patches stay visible), drawn uniformly when absent."""
        images = batch.views[0]
        tokens, mask, ids_restore = self.encode_visible(images, batch.extras.get("noise"))
        prediction = self.decoder(tokens, ids_restore)
        loss = masked_patch_mse(prediction, patchify(images, self.patch_size), mask, self.hparams.norm_pix_loss)
        return MethodOutput(loss)


def finetune_only_linear_recipe(method: str) -> LinearRecipe:
    """MAE's linear probe, for a method on MAE's code base whose authors publish fine-tuning only."""
    return dataclasses.replace(
        MAE.linear_recipe, source=f"facebookresearch/mae main_linprobe.py ({method} publishes fine-tuning only)"
    )


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
