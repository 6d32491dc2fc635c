"""DeepMIM: MAE with deep supervision of intermediate encoder blocks.

Ren, Wei, Albanie, Zhang & Hu, "DeepMIM: Deep Supervision for Masked Image Modeling", arXiv 2303.08817 (WACV 2025).
Follows OliverRensu/DeepMIM (``models_mae.py``, ``engine_pretrain.py``, ``main_pretrain.py``, README), itself built on
facebookresearch/mae.

- Encoder (``forward_encoder``): MAE's ViT on the visible 25 % of the patches (``sslhub.methods.mae``); the raw outputs
  of blocks 6, 8 and 10 of ViT-B (``count == 6 / 8 / 10``, before any norm) and the final-norm output of block 12 are
  kept.
- Decoders (``forward_decoder1..4``): one MAE decoder per kept output, each with its own embedding, mask token, blocks,
  norm and prediction (``sslhub.heads.MAEDecoder``), the fixed sin-cos position embedding shared; ViT-B: 4 blocks of
  width 512 with 16 heads (``mae_vit_base_patch16_dec512d8b`` sets ``decoder_depth=4`` despite its name).
- Loss (``engine_pretrain.py``): ``L = Σ_k L_k``, the unweighted sum of the four reconstruction losses; here each
  ``L_k`` is MAE's eq.: the MSE on the masked patches against per-patch normalised pixels (``masked_patch_mse``).
- Recipe (README): 1600 epochs, 40 warm-up, AdamW β (0.9, 0.95), base lr 1.5e-4 per 256 images (batch 4096), weight
  decay 0.05 except norms and biases, mask ratio 0.75, bicubic random resized crop (0.2, 1) and flip.

Deviation: the authors' code implements only DeepMIM-CLIP: each decoder predicts the 512-d output tokens of a frozen
CLIP ViT-B/16 (``clip.VisionTransformer``) on the masked patches, with the loss ``2 - 2 cos`` of the L2-normalised
features. The paper also reports DeepMIM on MAE's pixel target (84.2 top-1 with ViT-B, abstract); this module builds
that pixel-target DeepMIM, with the decoders and blocks of the released CLIP code (the pixel run's decoder sizes and
epochs are not in the authors' code or README: not verified). The released checkpoint (DeepMIM-CLIP) converts to the
encoder only; its CLIP-feature decoders are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, leftover_entries
from sslhub.conversion.loading import CheckpointError
from sslhub.losses import masked_patch_mse
from sslhub.masking import patchify
from sslhub.methods.base import ExportTargets, MethodOutput, hparam
from sslhub.methods.mae import MAE, MAEHparams, finetune_only_linear_recipe, visible_tokens
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained


@dataclass
class DeepMIMHparams(MAEHparams):
    """README's pretraining command over ``main_pretrain.py``'s defaults; decoders of ``mae_vit_base_patch16``."""

    epochs: int = 1600
    decoder_depth: int = 4
    deep_supervision_blocks: tuple[int, ...] = hparam(
        (5, 7, 9), "0-based encoder blocks whose raw outputs get an extra decoder, besides the final-norm output"
    )

    def __post_init__(self):
        super().__post_init__()
        blocks = list(self.deep_supervision_blocks)
        if any(b < 0 for b in blocks) or blocks != sorted(set(blocks)):
            raise ValueError(f"deep_supervision_blocks must be increasing 0-based block indices, got {blocks}")


# Key prefixes of the four decoders of ``MaskedAutoencoderViT`` (``decoder_embed1``, ``mask_token1`` ...) and their
# shared ``decoder_pos_embed``.
DEEPMIM_DECODER_PREFIXES = ("decoder_", "mask_token")


def _state(container) -> dict:
    """``util/misc.py save_model``'s ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``, or the bare state dict."""
    return container["model"] if isinstance(container.get("model"), dict) else container


def convert_deepmim(container, source: str) -> Converted:
    """OliverRensu/DeepMIM ``MaskedAutoencoderViT`` (DeepMIM-CLIP): the encoder in timm ViT names (``patch_embed``,
    ``cls_token``, fixed sin-cos ``pos_embed``, ``blocks``, ``norm``) and four CLIP-feature decoders
    (``decoder_embed1..4``, ``mask_token1..4``, ``decoder_blocks1..4``, ``decoder_norm1..4``, ``decoder_pred1..4``,
    ``decoder_pos_embed``), which are left out: sslhub's DeepMIM regresses pixels."""
    reader = KeyReader(_state(container), source)
    decoders = [key for prefix in DEEPMIM_DECODER_PREFIXES for key in reader.leave_out(prefix)]
    encoder = reader.take("")
    reader.finish()
    if "patch_embed.proj.weight" not in encoder:
        raise CheckpointError(f"{source}: no encoder (patch_embed.proj.weight) in the DeepMIM checkpoint")
    left_out = [f"{len(decoders)} tensors of the CLIP-feature decoders (decoder_*, mask_token*; not converted)"]
    if _state(container) is not container:
        left_out += leftover_entries(container, {"model"})
    return Converted("deepmim", encoder, left_out=left_out)


def _is_deepmim(container) -> bool:
    state = _state(container) if isinstance(container, dict) else None
    return isinstance(state, dict) and "decoder_embed1.weight" in state and "patch_embed.proj.weight" in state


@register_method("deepmim")
class DeepMIM(MAE):
    """MAE whose encoder blocks 6, 8 and 10 (ViT-B) are supervised too: each kept block output (raw) and the final
    output (after the encoder's norm) goes to its own MAE decoder, and the four pixel losses are summed. The released
    encoder is the ViT without the decoders, as MAE."""

    Hparams = DeepMIMHparams
    paper = "DeepMIM: Deep Supervision for Masked Image Modeling"
    arxiv = "2303.08817"
    citation = (
        "@inproceedings{ren2025deepmim,\n  title={DeepMIM: Deep Supervision for Masked Image Modeling},\n"
        "  author={Ren, Sucheng and Wei, Fangyun and Zhang, Zheng and Albanie, Samuel and Hu, Han},\n"
        "  booktitle={WACV},\n  pages={879--888},\n  year={2025}\n}"
    )
    released = "encoder (ViT without the decoders)"
    linear_recipe = finetune_only_linear_recipe("DeepMIM")
    checkpoint_layouts = (CheckpointLayout("deepmim", _is_deepmim, convert_deepmim),)
    export_targets = ExportTargets(encoder="ViTMAEModel")
    tiny_preset = "deepmim_vit_tiny_patch4_32px"
    tiny_overrides = {
        "decoder_depth": 1,
        "decoder_embed_dim": 64,
        "deep_supervision_blocks": (0,),
        "backbone_kwargs": {"depth": 2},
    }

    def __init__(self, config):
        super().__init__(config)  # the encoder and the decoder of the final output (``forward_decoder4``)
        vit = self.encoder.backbone
        self.supervised_blocks = tuple(self.hparams.deep_supervision_blocks)
        if self.supervised_blocks and self.supervised_blocks[-1] >= len(vit.blocks) - 1:
            raise ValueError(
                f"deep_supervision_blocks {list(self.supervised_blocks)} must lie before the last of the "
                f"{len(vit.blocks)} blocks (its output, after the norm, has the main decoder)"
            )
        self.deep_decoders = nn.ModuleList(self.pixel_decoder() for _ in self.supervised_blocks)

    def encode_supervised(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """``forward_encoder``: the raw outputs of the supervised blocks, then the final-norm output of the last block.
        Returns (outputs, mask, ids_restore)."""
        vit = self.encoder.backbone
        x, mask, ids_restore = visible_tokens(vit, images, self.hparams.mask_ratio, noise)
        outputs = []
        for index, block in enumerate(vit.blocks):
            x = block(x)
            if index in self.supervised_blocks:
                outputs.append(x)
        return [*outputs, vit.norm(x)], mask, ids_restore

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views[0]``: the images; ``batch.extras["noise"]`` (B, L), optional: MAE's masking noise."""
        images = batch.views[0]
        outputs, mask, ids_restore = self.encode_supervised(images, batch.extras.get("noise"))
        target = patchify(images, self.patch_size)
        losses = [
            masked_patch_mse(decoder(tokens, ids_restore), target, mask, self.hparams.norm_pix_loss)
            for decoder, tokens in zip([*self.deep_decoders, self.decoder], outputs, strict=True)
        ]
        names = [f"loss_block{index + 1}" for index in self.supervised_blocks] + ["loss_final"]
        return MethodOutput(sum(losses), {name: loss.item() for name, loss in zip(names, losses, strict=True)})


register_preset(
    Preset(
        "deepmim_vit_base_patch16_224",
        "deepmim",
        "vit_base_patch16_224",
        description="DeepMIM (pixel target) on a timm ViT-B/16: decoders 4 x 512 on blocks 6, 8, 10 and the final "
        "norm, losses summed, 1600 epochs",
    )
)

register_preset(
    Preset(
        "deepmim_vit_tiny_patch4_32px",
        "deepmim",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4},
        method_kwargs={"decoder_embed_dim": 128, "decoder_depth": 1, "decoder_num_heads": 4, "warmup_epochs": 2},
        description="DeepMIM, ViT-Tiny with 4 px patches for 32 px images: decoders 1 x 128 (half of "
        "mae_vit_tiny_patch4_32px's, as 4 of MAE's 8 blocks) on blocks 6, 8, 10 and the final norm; 2 warm-up epochs",
    )
)

# OliverRensu/DeepMIM README: DeepMIM-CLIP ViT-B, 1600 epochs (``--epochs 1600``, fine-tuned from checkpoint-1599),
# fine-tuned top-1 85.6; the pretraining file is DeepMIM-CLIP-PT.pth in the README's Google Drive folder, linked by the
# author in issue #2. The repository states no licence.
register_pretrained(
    PretrainedTag(
        "deepmim_vit_base_patch16_224",
        "in1k_clip_1600ep",
        url="https://drive.google.com/file/d/1rq9ZsXC84DQa24_Ohr0ZNNQiaEVjt3mk/view?usp=sharing",
        layout="deepmim",
        license="unknown",
        epochs=1600,
        metrics={"finetune": 85.6},
        download_name="DeepMIM-CLIP-PT.pth",
        source="OliverRensu/DeepMIM README (DeepMIM-CLIP, ViT-B, 1600 epochs: fine-tuned top-1 85.6) and issue #2 "
        "(the link of DeepMIM-CLIP-PT.pth); encoder of the CLIP-target run, its decoders are not converted",
    )
)
