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
- Target (``target``): ``"clip"``, the authors' code (DeepMIM-CLIP, the released run): every decoder predicts the
  512-d output tokens of a frozen CLIP ViT-B/16 image tower (``clip.VisionTransformer``, ``ln_post`` and ``proj`` on
  every token; ``sslhub.teachers.CLIPVisionTeacher``) on the full image, re-normalised with CLIP's mean and std;
  ``"pixels"``, the paper's DeepMIM on MAE (84.2 top-1 with ViT-B, abstract): MAE's per-patch normalised pixels.
- Loss (``engine_pretrain.py``): ``L = Σ_k L_k``, the unweighted sum of the four decoders' losses, each averaged over
  the masked patches: ``2 - 2 cos(p̂, t̂)`` of the L2-normalised prediction and teacher token (``forward_loss``,
  ``masked_cosine_distance``) for CLIP; MAE's MSE against normalised pixels (``masked_patch_mse``) for pixels.
- Recipe (README): 1600 epochs, 40 warm-up, AdamW β (0.9, 0.95), base lr 1.5e-4 per 256 images (batch 4096), weight
  decay 0.05 except norms and biases, mask ratio 0.75, bicubic random resized crop (0.2, 1) and flip.

The teacher is a frozen auxiliary network: ``teacher_path`` names its weights (``sslhub.teachers``: CLIP's
``visual.*`` state dict, OpenCLIP's file, or timm's names); without one a new CLIP-target pretraining model refuses
to build; ``teacher_path="random"`` keeps a random teacher (tests). The teacher sees the student's image size and
patch size, so its tokens are the student's patches.

Deviations: the pixel target's decoder sizes and epochs are not in the authors' code or README (this module uses the
CLIP run's); the small ``*_32px`` preset regresses pixels, so that it trains without a teacher file. The released
checkpoint (DeepMIM-CLIP) converts to the encoder and, for ``task="pretraining"``, its four CLIP-feature decoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.losses import masked_cosine_distance, masked_patch_mse
from sslhub.masking import patchify
from sslhub.methods.base import ExportTargets, MethodOutput, hparam
from sslhub.methods.mae import MAE, MAEHparams, finetune_only_linear_recipe, visible_tokens
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.teachers import OPENCLIP_VIT_B16_URL, RANDOM_WEIGHTS, CLIPVisionTeacher, load_teacher_state

TARGETS = ("clip", "pixels")


@dataclass
class DeepMIMHparams(MAEHparams):
    """README's pretraining command over ``main_pretrain.py``'s defaults; decoders of ``mae_vit_base_patch16``, the
    teacher of ``--clip_path`` (CLIP ViT-B/16)."""

    epochs: int = 1600
    decoder_depth: int = 4
    deep_supervision_blocks: tuple[int, ...] = hparam(
        (5, 7, 9), "0-based encoder blocks whose raw outputs get an extra decoder, besides the final-norm output"
    )
    target: str = hparam("clip", "'clip': a frozen CLIP image tower's tokens (the authors' code); 'pixels': MAE's")
    teacher_path: str | None = hparam(
        None,
        "the CLIP teacher's weights (target 'clip'): OpenAI's CLIP ViT-B/16, e.g. open_clip_model.safetensors from "
        f"{OPENCLIP_VIT_B16_URL}, or {RANDOM_WEIGHTS!r}",
    )
    teacher_width: int = hparam(768, "width of the CLIP teacher, width / 64 heads (ViT-B/16: 768)")
    teacher_depth: int = hparam(12, "blocks of the CLIP teacher (ViT-B/16: 12)")
    teacher_dim: int = hparam(512, "output width of the teacher's projection, predicted by the decoders (512)")

    def __post_init__(self):
        super().__post_init__()
        blocks = list(self.deep_supervision_blocks)
        if any(b < 0 for b in blocks) or blocks != sorted(set(blocks)):
            raise ValueError(f"deep_supervision_blocks must be increasing 0-based block indices, got {blocks}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")


# The authors' four decoders (``decoder_embed1``, ``mask_token1`` ... ``decoder_pred4``; 1 - 3 on blocks 6, 8, 10, 4 on
# the final norm) and their shared ``decoder_pos_embed``, by the names of ``MAEDecoder``.
DEEPMIM_DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_blocks", "decoder_norm", "decoder_pred")
AUTHORS_SUPERVISED_BLOCKS = (5, 7, 9)  # models_mae.py forward_encoder: count == 6, 8, 10


def _state(container) -> dict:
    """``util/misc.py save_model``'s ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``, or the bare state dict."""
    return container["model"] if isinstance(container.get("model"), dict) else container


def convert_deepmim(container, source: str) -> Converted:
    """OliverRensu/DeepMIM ``MaskedAutoencoderViT`` (DeepMIM-CLIP): the encoder in timm ViT names (``patch_embed``,
    ``cls_token``, fixed sin-cos ``pos_embed``, ``blocks``, ``norm``) and the four CLIP-feature decoders
    (``decoder_embed1..4``, ``mask_token1..4``, ``decoder_blocks1..4``, ``decoder_norm1..4``, ``decoder_pred1..4``,
    the shared ``decoder_pos_embed``) as ``deep_decoders.0..2`` and ``decoder``. The file has no teacher: it loads
    from ``teacher_path``."""
    reader = KeyReader(_state(container), source)
    position = reader.take_one("decoder_pos_embed")
    decoders = {}
    modules = [f"deep_decoders.{index}." for index in range(len(AUTHORS_SUPERVISED_BLOCKS))] + ["decoder."]
    for number, module in enumerate(modules, 1):
        for part in DEEPMIM_DECODER_PARTS:
            found = reader.take(f"{part}{number}")
            decoders.update(prefixed(f"{module}{part}", found))
        decoders[f"{module}decoder_pos_embed"] = position
    encoder = reader.take("")
    reader.finish()
    if "patch_embed.proj.weight" not in encoder:
        raise CheckpointError(f"{source}: no encoder (patch_embed.proj.weight) in the DeepMIM checkpoint")
    blocks = {key.split(".")[2] for key in decoders if key.startswith("decoder.decoder_blocks.")}
    overrides = {
        "target": "clip",
        "deep_supervision_blocks": AUTHORS_SUPERVISED_BLOCKS,
        "decoder_embed_dim": decoders["decoder.decoder_embed.weight"].shape[0],
        "decoder_depth": len(blocks),
        "teacher_dim": decoders["decoder.decoder_pred.weight"].shape[0],
    }
    left_out = leftover_entries(container, {"model"}) if _state(container) is not container else []
    return Converted("deepmim", encoder, decoders, {"encoder.backbone.": encoder}, overrides, left_out)


def _is_deepmim(container) -> bool:
    state = _state(container) if isinstance(container, dict) else None
    return isinstance(state, dict) and "decoder_embed1.weight" in state and "patch_embed.proj.weight" in state


@register_method("deepmim")
class DeepMIM(MAE):
    """MAE whose encoder blocks 6, 8 and 10 (ViT-B) are supervised too: each kept block output (raw) and the final
    output (after the encoder's norm) goes to its own MAE decoder, which predicts the frozen CLIP teacher's tokens
    (or the pixels) of the masked patches; the four losses are summed. The released encoder is the ViT without the
    decoders, as MAE."""

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
        hp, vit = self.hparams, self.encoder.backbone
        self.supervised_blocks = tuple(hp.deep_supervision_blocks)
        if self.supervised_blocks and self.supervised_blocks[-1] >= len(vit.blocks) - 1:
            raise ValueError(
                f"deep_supervision_blocks {list(self.supervised_blocks)} must lie before the last of the "
                f"{len(vit.blocks)} blocks (its output, after the norm, has the main decoder)"
            )
        self.deep_decoders = nn.ModuleList(self.build_decoder() for _ in self.supervised_blocks)
        self.teacher = None
        if hp.target == "clip":
            self.teacher = CLIPVisionTeacher(
                config.image_size,
                self.patch_size,
                hp.teacher_width,
                hp.teacher_depth,
                hp.teacher_dim,
                config.image_mean,
                config.image_std,
            ).requires_grad_(False)

    def prediction_dim(self) -> int:
        return self.hparams.teacher_dim if self.hparams.target == "clip" else super().prediction_dim()

    def auxiliary_networks(self):
        return {} if self.teacher is None else {"teacher": self.teacher}

    def load_auxiliary_weights(self) -> None:
        """The CLIP teacher's weights from ``teacher_path`` (module docstring); a clear error without one."""
        if self.teacher is None:
            return
        hp = self.hparams
        if hp.teacher_path is None:
            raise CheckpointError(
                "DeepMIM-CLIP predicts the tokens of a frozen CLIP image tower and none was given: set teacher_path to "
                f"OpenAI's CLIP ViT-B/16 (e.g. open_clip_model.safetensors from {OPENCLIP_VIT_B16_URL}), "
                f"teacher_path={RANDOM_WEIGHTS!r} for a random teacher, or target='pixels' for MAE's pixel target"
            )
        if hp.teacher_path == RANDOM_WEIGHTS:
            return
        from sslhub.conversion.convert import load_strict  # convert imports the model classes, which import methods

        what = (
            f"teacher {hp.teacher_path} (built with teacher_width={hp.teacher_width}, teacher_depth="
            f"{hp.teacher_depth}, teacher_dim={hp.teacher_dim}, the student's {self.patch_size} px patches and "
            f"{self.config.image_size} px images)"
        )
        load_strict(self.teacher.vit, load_teacher_state(hp.teacher_path, self.teacher), what)

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
        decoders = [*self.deep_decoders, self.decoder]
        predictions = [decoder(tokens, ids_restore) for decoder, tokens in zip(decoders, outputs, strict=True)]
        if self.teacher is None:
            target = patchify(images, self.patch_size)
            losses = [masked_patch_mse(p, target, mask, self.hparams.norm_pix_loss) for p in predictions]
        else:
            target = self.teacher(images)[:, 1:]
            losses = [masked_cosine_distance(p, target, mask) for p in predictions]
        names = [f"loss_block{index + 1}" for index in self.supervised_blocks] + ["loss_final"]
        return MethodOutput(sum(losses), {name: loss.item() for name, loss in zip(names, losses, strict=True)})


register_preset(
    Preset(
        "deepmim_vit_base_patch16_224",
        "deepmim",
        "vit_base_patch16_224",
        description="DeepMIM-CLIP on a timm ViT-B/16: decoders 4 x 512 on blocks 6, 8, 10 and the final norm predict "
        "a frozen CLIP ViT-B/16's 512-d tokens of the masked patches, losses summed, 1600 epochs (set teacher_path to "
        "the CLIP weights)",
    )
)

register_preset(
    Preset(
        "deepmim_vit_tiny_patch4_32px",
        "deepmim",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4},
        method_kwargs={
            "target": "pixels",
            "decoder_embed_dim": 128,
            "decoder_depth": 1,
            "decoder_num_heads": 4,
            "warmup_epochs": 2,
        },
        description="DeepMIM on MAE's pixel target (no teacher file needed), ViT-Tiny with 4 px patches for 32 px "
        "images: decoders 1 x 128 (half of mae_vit_tiny_patch4_32px's, as 4 of MAE's 8 blocks) on blocks 6, 8, 10 and "
        "the final norm; 2 warm-up epochs",
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
        "(the link of DeepMIM-CLIP-PT.pth); the encoder, and for pretraining its four CLIP-feature decoders (the CLIP "
        "teacher is not in the file: teacher_path)",
    )
)
