"""DINOv2: DINO + iBOT self-distillation with Sinkhorn-Knopp centering and the KoLeo regulariser.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv 2304.07193 (TMLR 2024).
Follows facebookresearch/dinov2 (``train/ssl_meta_arch.py``, ``train/train.py``, ``loss/*.py``,
``data/{masking,collate,augmentations}.py``, ``utils/param_groups.py``, ``configs/ssl_default_config.yaml``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import DropPath
from torch import nn

from sslhub.backbones import is_vision_transformer
from sslhub.batch import Batch, Sample, batch_generator
from sslhub.heads import DINOHead
from sslhub.losses import ibot_patch_cross_entropy, koleo_loss, multi_crop_cross_entropy, sinkhorn_knopp
from sslhub.masking import BlockMaskingGenerator, sample_ibot_masks
from sslhub.methods.base import (
    ExportTargets,
    MethodHparams,
    MethodOutput,
    SSLMethod,
    TrainingProgress,
    cosine_schedule,
    hparam,
)
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BICUBIC, MultiView, asymmetric_pair, blur, color_distortion, crop, flip, view

EMBEDDING_PARAMETERS = ("pos_embed", "patch_embed", "cls_token", "reg_token", "mask_token")  # "layer 0" of the lr decay
NO_WEIGHT_DECAY = ("norm", "gamma")  # besides biases; ``gamma`` = layer scale (``get_params_groups_with_decay``)


@dataclass
class DINOv2Hparams(MethodHparams):
    """Defaults of ``ssl_default_config.yaml`` (config keys in brackets), with Sinkhorn-Knopp centering as in the paper
    (§4) and the released ViT-L/g recipes (``train/vitl14.yaml``, ``vitg14.yaml``; the default config says
    ``train.centering: centering``, which sslhub does not offer).

    AdamW β=(0.9, 0.999), lr 4e-3 per 1024 images scaled by the square root of the batch ratio [optim.base_lr,
    optim.scaling_rule], 10 warm-up epochs, cosine to 1e-6; weight decay
    cosine 0.04 -> 0.4 [optim.weight_decay(_end)]; layer-wise lr decay 0.9 and patch-embedding lr x 0.2
    [optim.layerwise_decay, optim.patch_embed_lr_mult]; gradient norm clipped at 3.0 per student module; head last
    layers frozen for 1 epoch. DINO head 3 layers, hidden 2048, bottleneck 256, 65536 prototypes [dino.head_*], shared
    with iBOT unless ``ibot_separate_head`` [ibot.*]; loss weights DINO 1, KoLeo 0.1, iBOT 1; half of the global crops
    masked with ratios in (0.1, 0.5) [ibot.mask_*]; teacher momentum 0.992 -> 1, temperature 0.04 -> 0.07 over 30
    epochs [teacher.*]; student drop path 0.3, the same in every block [student.drop_path_*]; crops 2 x global of
    scale (0.32, 1) + 8 x local of scale (0.05, 0.32) [crops.*]. ``global_crops_size`` defaults to the config's
    image size, ``local_crops_size`` to 96/224 of it, rounded to a multiple of the patch size.
    """

    optimizer: str = "adamw"
    lr: float = 4e-3
    lr_batch_size: int = 1024
    lr_scaling: str = "sqrt"
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.4
    clip_grad: float | None = 3.0
    epochs: int = 100
    layerwise_decay: float = hparam(0.9, "layer-wise lr decay [optim.layerwise_decay]")
    patch_embed_lr_mult: float = hparam(0.2, "lr multiplier of the patch embedding [optim.patch_embed_lr_mult]")
    freeze_last_layer_epochs: int = hparam(1, "epochs without updates of the heads' last layers")
    out_dim: int = hparam(65536, "prototypes of the DINO head [dino.head_n_prototypes]")
    hidden_dim: int = hparam(2048, "hidden width of the DINO head [dino.head_hidden_dim]")
    bottleneck_dim: int = hparam(256, "bottleneck width of the DINO head [dino.head_bottleneck_dim]")
    head_layers: int = hparam(3, "linear layers of the DINO head [dino.head_nlayers]")
    ibot_separate_head: bool = hparam(False, "a separate iBOT head instead of sharing the DINO head")
    ibot_out_dim: int = hparam(65536, "prototypes of a separate iBOT head [ibot.head_n_prototypes]")
    ibot_hidden_dim: int = hparam(2048, "hidden width of a separate iBOT head")
    ibot_bottleneck_dim: int = hparam(256, "bottleneck width of a separate iBOT head")
    ibot_head_layers: int = hparam(3, "linear layers of a separate iBOT head")
    dino_loss_weight: float = hparam(1.0, "weight of the image-level DINO loss [dino.loss_weight]")
    koleo_loss_weight: float = hparam(0.1, "weight of the KoLeo regulariser [dino.koleo_loss_weight]")
    ibot_loss_weight: float = hparam(1.0, "weight of the patch-level iBOT loss [ibot.loss_weight]")
    mask_ratio_min_max: tuple[float, float] = hparam(
        (0.1, 0.5), "range of masked-patch ratios [ibot.mask_ratio_min_max]"
    )
    mask_sample_probability: float = hparam(0.5, "fraction of global crops masked [ibot.mask_sample_probability]")
    momentum_teacher: float = hparam(0.992, "initial teacher momentum [teacher.momentum_teacher]")
    final_momentum_teacher: float = hparam(1.0, "final teacher momentum [teacher.final_momentum_teacher]")
    warmup_teacher_temp: float = hparam(0.04, "initial teacher temperature [teacher.warmup_teacher_temp]")
    teacher_temp: float = hparam(0.07, "teacher temperature after the warm-up [teacher.teacher_temp]")
    warmup_teacher_temp_epochs: int = hparam(30, "epochs of the teacher-temperature warm-up")
    student_temp: float = hparam(0.1, "student temperature τ_s")
    sinkhorn_iterations: int = hparam(3, "Sinkhorn-Knopp iterations of the teacher centering")
    drop_path_rate: float = hparam(0.3, "stochastic depth of the student [student.drop_path_rate]")
    drop_path_uniform: bool = hparam(True, "the same drop-path rate in every block [student.drop_path_uniform]")
    global_crops_scale: tuple[float, float] = hparam((0.32, 1.0), "area range of the 2 global crops")
    local_crops_scale: tuple[float, float] = hparam((0.05, 0.32), "area range of the local crops")
    local_crops_number: int = hparam(8, "number of local crops [crops.local_crops_number]")
    global_crops_size: int | None = hparam(None, "side of the global crops (None: the image size)")
    local_crops_size: int | None = hparam(None, "side of the local crops (None: 96/224 of the global size)")


class DINOv2Views(MultiView):
    """DINOv2 ``DataAugmentationDINO`` (facebookresearch/dinov2 ``data/augmentations.py``, crop scales of
    ``ssl_default_config.yaml``) and ``collate_data_and_cast``: DINO's multi-crop with the blur as the released models
    were trained, and the iBOT masks of the global crops drawn per batch. DINOv2's ``GaussianBlur(p)``
    (``data/transforms.py``) hands ``RandomApply`` the probability ``1 - p``, and torchvision applies with the
    probability it is given: global 1 (p=1.0) is never blurred, global 2 (p=0.1) is blurred with probability 0.9,
    the locals with 0.5; torchvision blur, 9 x 9 kernel, σ ~ U[0.1, 2]. ``collate`` adds ``extras["masks"]``
    (2B, L): block masks of the global crops, crop 1's images then crop 2's (``sample_ibot_masks``)."""

    def __init__(self, global_size: int, local_size: int, patch_size: int, hp, mean: Sequence[float], std):
        global_crop = crop(global_size, hp.global_crops_scale, BICUBIC)
        local = view(
            crop(local_size, hp.local_crops_scale, BICUBIC),
            flip(),
            color_distortion(saturation=0.2),
            blur(p=0.5, kernel_size=9),
            mean=mean,
            std=std,
        )
        pair = asymmetric_pair(global_crop, mean, std, blur_p=(0.0, 0.9), blur_kernel_size=9)
        super().__init__(pair + [local] * hp.local_crops_number)
        grid = (global_size // patch_size, global_size // patch_size)
        self.mask_generator = BlockMaskingGenerator(grid, max_num_patches=0.5 * grid[0] * grid[1])
        self.mask_ratio_min_max = tuple(hp.mask_ratio_min_max)
        self.mask_probability = hp.mask_sample_probability

    def collate(self, samples: Sequence[Sample]) -> Batch:
        batch = super().collate(samples)
        masks = sample_ibot_masks(
            2 * len(samples),
            self.mask_generator,
            self.mask_ratio_min_max,
            self.mask_probability,
            batch_generator(samples),
        )
        batch.extras["masks"] = masks
        return batch


def uniform_drop_path_(vit: nn.Module, rate: float) -> None:
    """``drop_path_uniform``: every block drops its residual branches with probability ``rate`` (timm's ViT raises
    the rate linearly from 0 in the first block)."""
    for block in vit.blocks:
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def masked_forward_features(
    vit: nn.Module, images: torch.Tensor, masks: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """A timm ViT's ``forward_features`` with the patch embeddings of the masked patches replaced by ``mask_token``
    before the position embedding (``DinoVisionTransformer.prepare_tokens_with_masks``). ``masks``: (B, L) bool,
    True = masked, patches in row-major order; ``mask_token``: (1, D). Returns all tokens after the final norm."""
    x = vit.patch_embed(images)
    x = torch.where(masks.reshape(*x.shape[:-1], 1), mask_token.to(x.dtype), x)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    return vit.norm(vit.blocks(x))


def _head(dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, layers: int) -> DINOHead:
    """DINOv2's ``layers/dino_head.py``: the DINO head, with the norm g of its weight-normed last layer trained
    (DINOv2 has no ``norm_last_layer``)."""
    return DINOHead(dim, out_dim, hidden_dim, bottleneck_dim, layers, norm_last_layer=False)


def _layer_id(name: str, depth: int) -> int:
    """``get_vit_lr_decay_rate``: 0 for the embeddings, i + 1 for block i, depth + 1 for the rest (final norm)."""
    if name.startswith(EMBEDDING_PARAMETERS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _decays(name: str) -> bool:
    return not (name.endswith(".bias") or any(part in name for part in NO_WEIGHT_DECAY))


@register_method("dinov2")
class DINOv2(SSLMethod):
    """Student and teacher ViTs (teacher = EMA of the student, momentum 0.992 -> 1 on a cosine), each with a DINO head
    (and an iBOT head when ``ibot_separate_head``). The teacher sees the 2 global crops; the student sees them with
    the patch embeddings of half of them partly replaced by a learnable mask token (block masking), and the local
    crops. Teacher outputs are centred by Sinkhorn-Knopp (3 iterations over the global batch) at temperature
    τ_t (0.04 -> 0.07), the student's sharpened at τ_s = 0.1. Loss (§4):

    ``L = w_dino L_DINO + w_koleo Σ_crop L_KoLeo + w_ibot L_iBOT``: ``L_DINO`` DINO's cross-entropy on the class
    tokens over all (global teacher crop, other student crop) pairs ("Image-level objective"); ``L_KoLeo =
    -1/n Σ_i log d_{n,i}`` on the student's class tokens of each global crop ("KoLeo regularizer"); ``L_iBOT`` the
    cross-entropy between teacher and student head outputs on the masked patch tokens, averaged per image
    ("Patch-level objective").

    Optimisation: ``param_groups`` gives each group an ``lr_scale`` (layer-wise decay 0.9^(L+1-layer), x0.2 for the
    patch embedding) for the trainer to multiply into the scheduled lr, and weight decay 0 for biases, norms and
    layer scales; gradients are clipped to norm 3.0 per student module (backbone with mask token, each head); the heads'
    last layers get no update during the first epoch. The released encoder is the teacher's backbone.
    Deviations: "epochs" are passes over the data (the official run counts 1250 iterations as an epoch); the
    trainer scales ``lr`` linearly with the batch size where the official code scales it by sqrt(batch / 1024); a
    frozen last layer keeps its Adam moments (the official code sets its lr to 0); position embeddings are resampled
    by timm (bicubic, antialiased) rather than DINOv2's offset interpolation.
    """

    Hparams = DINOv2Hparams
    paper = "DINOv2: Learning Robust Visual Features without Supervision"
    arxiv = "2304.07193"
    citation = (
        "@article{oquab2024dinov2,\n  title={{DINOv2}: Learning Robust Visual Features without Supervision},\n"
        "  author={Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and Vo, Huy V. and Szafraniec,"
        " Marc and Khalidov, Vasil and Fernandez, Pierre and Haziza, Daniel and Massa, Francisco and El-Nouby,"
        " Alaaeldin and Assran, Mahmoud and Ballas, Nicolas and Galuba, Wojciech and Howes, Russell and Huang, Po-Yao"
        " and Li, Shang-Wen and Misra, Ishan and Rabbat, Michael and Sharma, Vasu and Synnaeve, Gabriel and Xu, Hu"
        " and J{\\'e}gou, Herv{\\'e} and Mairal, Julien and Labatut, Patrick and Joulin, Armand and Bojanowski,"
        " Piotr},\n  journal={Transactions on Machine Learning Research},\n  year={2024}\n}"
    )
    released = "teacher backbone (without the DINO / iBOT heads and the mask token)"
    # DINOv2 reports linear probes with its eval/linear.py grid search; sslhub uses DINO's eval_linear.py recipe
    linear_recipe = LinearRecipe("facebookresearch/dino eval_linear.py (DINOv2 grid-searches lr)", 0.001, 100, 1024)
    tiny_preset = "dinov2_vit_tiny_patch4_32px"
    # layer scale and registers do not fit ViTModel; transformers' Dinov2Model is not written by sslhub.export yet
    export_targets = ExportTargets(encoder=None)
    tiny_overrides = {
        "out_dim": 256,
        "ibot_out_dim": 256,
        "hidden_dim": 64,
        "bottleneck_dim": 32,
        "local_crops_number": 2,
        "backbone_kwargs": {"depth": 2},
    }

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        student_encoder = self.build_encoder(config, drop_path_rate=hp.drop_path_rate, dynamic_img_size=True)
        student = student_encoder.backbone
        if not is_vision_transformer(student) or getattr(student, "cls_token", None) is None:
            raise ValueError(f"DINOv2 needs a timm ViT with a class token, got {config.backbone!r}")
        if hp.drop_path_uniform:
            uniform_drop_path_(student, hp.drop_path_rate)
        teacher_encoder = self.build_encoder(config, dynamic_img_size=True)
        teacher_encoder.load_state_dict(student_encoder.state_dict())
        dim = student.num_features
        heads = {"dino_head": _head(dim, hp.out_dim, hp.hidden_dim, hp.bottleneck_dim, hp.head_layers)}
        if hp.ibot_separate_head:
            heads["ibot_head"] = _head(
                dim, hp.ibot_out_dim, hp.ibot_hidden_dim, hp.ibot_bottleneck_dim, hp.ibot_head_layers
            )
        self.student = nn.ModuleDict({"encoder": student_encoder, **heads})
        self.teacher = nn.ModuleDict({"encoder": teacher_encoder, **copy.deepcopy(heads)}).requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_size = student.patch_embed.patch_size
        self.teacher_temperature = hp.warmup_teacher_temp

    @property
    def released_encoder(self):
        return self.teacher["encoder"]

    # ---- views and masks ---------------------------------------------------------------------------------------
    def crop_sizes(self) -> tuple[int, int]:
        """(global, local) crop sides: the hyperparameters, else the image size and 96/224 of it rounded to a
        multiple of the patch size (DINOv2's 224 / 96 at patch 16, 224 / 98 at patch 14)."""
        hp, patch = self.hparams, self.patch_size[0]
        global_size = hp.global_crops_size or self.config.image_size
        local_size = hp.local_crops_size or max(patch, round(global_size * 96 / 224 / patch) * patch)
        return global_size, local_size

    def view_recipe(self):
        cfg = self.config
        return DINOv2Views(*self.crop_sizes(), self.patch_size[0], self.hparams, cfg.image_mean, cfg.image_std)

    def sample_masks(self, global_crops: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, L) masks of the N global crops, for batches that come without them (views given directly): block
        masking with at most half of the patches per block (``train.py``'s ``MaskingGenerator``), ratios and masked
        fraction as ``collate_data_and_cast``."""
        grid = tuple(side // patch for side, patch in zip(global_crops.shape[-2:], self.patch_size, strict=True))
        blocks = BlockMaskingGenerator(grid, max_num_patches=0.5 * grid[0] * grid[1])
        hp = self.hparams
        masks = sample_ibot_masks(
            len(global_crops), blocks, tuple(hp.mask_ratio_min_max), hp.mask_sample_probability, generator
        )
        return masks.to(global_crops.device)

    # ---- schedules ---------------------------------------------------------------------------------------------
    def teacher_temperature_at(self, progress: TrainingProgress) -> float:
        """Per iteration: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
        ``warmup_teacher_temp_epochs`` epochs (``np.linspace`` of ``CosineScheduler``), then constant."""
        hp = self.hparams
        warmup = hp.warmup_teacher_temp_epochs * progress.steps_per_epoch
        if progress.step >= warmup:
            return hp.teacher_temp
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * progress.step / max(1, warmup - 1)

    def on_step_start(self, progress: TrainingProgress) -> None:
        self.teacher_temperature = self.teacher_temperature_at(progress)

    def momentum_pairs(self):
        """Teacher ← m teacher + (1 - m) student, module by module (``update_teacher``)."""
        return [(self.student, self.teacher)]

    def momentum_at(self, progress: TrainingProgress) -> float:
        hp = self.hparams
        return cosine_schedule(hp.momentum_teacher, hp.final_momentum_teacher, progress)

    # ---- objective ---------------------------------------------------------------------------------------------
    @staticmethod
    def _head_outputs(heads: nn.ModuleDict, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor):
        """(class-token logits, patch-token logits): one pass of the shared DINO head, or DINO and iBOT heads."""
        if "ibot_head" in heads:
            return heads["dino_head"](cls_tokens), heads["ibot_head"](patch_tokens)
        logits = heads["dino_head"](torch.cat([cls_tokens, patch_tokens]))
        return logits.split([len(cls_tokens), len(patch_tokens)])

    def _class_and_patches(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens[:, 0], tokens[:, self.student["encoder"].num_prefix_tokens :]

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinkhorn-Knopp assignments of the teacher: (N, K) for the class tokens, (M, K') for the masked patches."""
        cls_tokens, patches = self._class_and_patches(self.teacher["encoder"].forward_features(global_crops))
        cls_logits, patch_logits = self._head_outputs(self.teacher, cls_tokens, patches[masks])
        centre = partial(
            sinkhorn_knopp, temperature=self.teacher_temperature, iterations=self.hparams.sinkhorn_iterations
        )
        return centre(cls_logits), centre(patch_logits)

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views``: 2 global crops, then local crops of one size. ``batch.extras["masks"]`` (2B, L) for the
        global crops (crop 1's images, then crop 2's), from ``DINOv2Views.collate``; sampled when absent."""
        views = batch.views
        if len(views) < 2:
            raise ValueError(f"DINOv2 takes 2 global crops (+ local crops), got {len(views)} view(s)")
        hp = self.hparams
        global_crops = torch.cat(views[:2])
        masks = batch.extras.get("masks")
        masks = self.sample_masks(global_crops) if masks is None else masks.to(global_crops.device)
        teacher_cls, teacher_patches = self.teacher_targets(global_crops, masks)
        student = self.student["encoder"].backbone
        global_cls, patches = self._class_and_patches(
            masked_forward_features(student, global_crops, masks, self.mask_token)
        )
        cls_tokens = [global_cls] + ([student.forward_features(torch.cat(views[2:]))[:, 0]] if len(views) > 2 else [])
        cls_logits, patch_logits = self._head_outputs(self.student, torch.cat(cls_tokens), patches[masks])
        dino = multi_crop_cross_entropy(cls_logits.chunk(len(views)), teacher_cls.chunk(2), hp.student_temp)
        koleo = sum(koleo_loss(crop) for crop in global_cls.chunk(2))
        ibot = ibot_patch_cross_entropy(patch_logits, teacher_patches, masks, hp.student_temp)
        loss = hp.dino_loss_weight * dino + hp.koleo_loss_weight * koleo + hp.ibot_loss_weight * ibot
        metrics = {"dino_loss": dino.item(), "koleo_loss": koleo.item(), "ibot_loss": ibot.item()}
        return MethodOutput(loss, {**metrics, "teacher_temperature": self.teacher_temperature})

    # ---- optimisation ------------------------------------------------------------------------------------------
    def _named_student_parameters(self):
        """(name in its student module, parameter, lr scale) for every trainable parameter (the mask token belongs
        to the backbone, as in ``DinoVisionTransformer``)."""
        hp = self.hparams
        backbone = self.student["encoder"].backbone
        depth = len(backbone.blocks)
        for name, param in [*backbone.named_parameters(), ("mask_token", self.mask_token)]:
            scale = hp.layerwise_decay ** (depth + 1 - _layer_id(name, depth))
            yield name, param, scale * (hp.patch_embed_lr_mult if name.startswith("patch_embed") else 1.0)
        for head in self._student_heads():
            yield from ((name, param, 1.0) for name, param in head.named_parameters())

    def param_groups(self) -> list[dict]:
        """``get_params_groups_with_decay``: groups of equal ``lr_scale`` and weight decay (0 for biases, norms and
        layer scales ``gamma``; the cosine-scheduled ``weight_decay`` otherwise)."""
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, param, scale in self._named_student_parameters():
            if param.requires_grad:
                groups.setdefault((scale, _decays(name)), []).append(param)
        return [
            {"params": params, "lr_scale": scale, "weight_decay": self.hparams.weight_decay if decay else 0.0}
            for (scale, decay), params in groups.items()
        ]

    def _student_heads(self) -> list[DINOHead]:
        return [module for key, module in self.student.items() if key != "encoder"]

    def _clipped_modules(self) -> list[list[nn.Parameter]]:
        backbone = [*self.student["encoder"].parameters(), self.mask_token]
        return [backbone] + [list(head.parameters()) for head in self._student_heads()]

    def on_before_optimizer_step(self, progress: TrainingProgress) -> None:
        """Gradient norm clipped to ``clip_grad`` per student module (``clip_grad_norm_`` of each FSDP module); no
        update of the heads' last layers during the first ``freeze_last_layer_epochs`` epochs."""
        if self.hparams.clip_grad is not None:
            for params in self._clipped_modules():
                nn.utils.clip_grad_norm_(params, self.hparams.clip_grad)
        if progress.epoch < self.hparams.freeze_last_layer_epochs:
            for head in self._student_heads():
                for param in head.last_layer.parameters():
                    param.grad = None


PATCH14_CROPS = {"global_crops_size": 224, "local_crops_size": 98}  # train/vitl14.yaml, vitg14.yaml
VITG14_RECIPE = {  # train/vitg14.yaml: the recipe of the released ViT-g/14 (on LVD-142M)
    "out_dim": 131072,
    "bottleneck_dim": 384,
    "ibot_separate_head": True,
    "ibot_out_dim": 131072,
    "drop_path_rate": 0.4,
    "momentum_teacher": 0.994,
    "epochs": 500,
    "weight_decay_end": 0.2,
    "lr": 2e-4,
    "warmup_epochs": 80,
    "layerwise_decay": 1.0,
}
DINOV2_SIZES = {"small": "s", "base": "b", "large": "l", "giant": "g"}


def _preset_name(size: str, registers: bool) -> str:
    return f"dinov2_vit_{size}_patch14{'_reg4' if registers else ''}_518"


for _size in DINOV2_SIZES:
    for _registers in (False, True):
        _arch = f"vit_{_size}_patch14{'_reg4' if _registers else ''}_dinov2"
        register_preset(
            Preset(
                _preset_name(_size, _registers),
                "dinov2",
                _arch,
                image_size=518,
                method_kwargs={**PATCH14_CROPS, **(VITG14_RECIPE if _size == "giant" else {})},
                description=f"DINOv2 on timm's {_arch} (518 px position embeddings, 224 / 98 px training crops)"
                + (", vitg14.yaml recipe" if _size == "giant" else ", ssl_default_config.yaml recipe"),
            )
        )

register_preset(
    Preset(
        "dinov2_vit_tiny_patch4_32px",
        "dinov2",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4, "init_values": 1e-5},
        method_kwargs={"out_dim": 4096, "ibot_out_dim": 4096, "warmup_epochs": 2, "warmup_teacher_temp_epochs": 5},
        description="DINOv2, ViT-Tiny with layer scale and 4 px patches for 32 px images; 4096 prototypes, short "
        "warm-ups",
    )
)

DINOV2_RELEASES = "https://dl.fbaipublicfiles.com/dinov2"
# facebookresearch/dinov2 README, "Pretrained models" (ImageNet k-NN and linear top-1; S/B/L distilled from g/14;
# trained on LVD-142M; no epochs stated) and timm's ``.lvd142m`` copies.
for _size, _registers, _knn, _linear in (
    ("small", False, 79.0, 81.1),
    ("small", True, 79.1, 80.9),
    ("base", False, 82.1, 84.5),
    ("base", True, 82.0, 84.6),
    ("large", False, 83.5, 86.3),
    ("large", True, 83.8, 86.7),
    ("giant", False, 83.5, 86.5),
    ("giant", True, 83.7, 87.1),
):
    _folder = f"dinov2_vit{DINOV2_SIZES[_size]}14"
    _reg = "_reg4" if _registers else ""
    register_pretrained(
        PretrainedTag(
            _preset_name(_size, _registers),
            "lvd142m",
            url=f"{DINOV2_RELEASES}/{_folder}/{_folder}{_reg}_pretrain.pth",
            layout="backbone",
            license="apache-2.0",
            epochs=None,
            metrics={"knn": _knn, "linear": _linear},
            hf_hub_id=f"timm/vit_{_size}_patch14{_reg}_dinov2.lvd142m",
            pretraining_data="lvd-142m",
            source="facebookresearch/dinov2 README, Pretrained models",
        )
    )
