"""DINO: self-distillation with no labels.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", arXiv 2104.14294 (ICCV 2021).
Follows facebookresearch/dino (``main_dino.py``, ``vision_transformer.DINOHead``, ``utils.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sslhub.backbones import forward_by_resolution, is_vision_transformer
from sslhub.batch import Batch
from sslhub.conversion.keys import (
    CheckpointLayout,
    Converted,
    KeyReader,
    entry,
    leftover_entries,
    prefixed,
    strip_module,
)
from sslhub.distributed import mean_over_processes
from sslhub.heads import DINOHead
from sslhub.losses import dino_cross_entropy
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, cosine_schedule, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BICUBIC, MultiView, asymmetric_pair, blur, color_distortion, crop, flip, view


@dataclass
class DINOHparams(MethodHparams):
    """Defaults of the paper's ViT-S/16 recipe (``main_dino.py`` arguments; README's 300-epoch command):
    AdamW lr 5e-4 per 256 images, 10 warm-up epochs, cosine to 1e-6, weight decay cosine 0.04 -> 0.4,
    per-parameter gradient clipping at 3.0, teacher temperature 0.04 -> 0.07 over 30 epochs.
    """

    optimizer: str = "adamw"
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.4
    clip_grad: float | None = 3.0
    epochs: int = 100
    out_dim: int = hparam(65536, "number of prototypes K of the DINO head (--out_dim)")
    hidden_dim: int = hparam(2048, "hidden width of the DINO head's MLP")
    bottleneck_dim: int = hparam(256, "bottleneck width before the weight-normed last layer")
    head_layers: int = hparam(3, "number of linear layers of the head's MLP")
    use_bn_in_head: bool = hparam(False, "BatchNorm in the head's MLP (--use_bn_in_head)")
    norm_last_layer: bool = hparam(True, "freeze the weight norm g of the last layer at 1 (--norm_last_layer)")
    momentum_teacher: float = hparam(0.996, "initial teacher momentum, raised to 1 on a cosine (--momentum_teacher)")
    warmup_teacher_temp: float = hparam(0.04, "initial teacher temperature (--warmup_teacher_temp)")
    teacher_temp: float = hparam(0.07, "teacher temperature after the warm-up (--teacher_temp)")
    warmup_teacher_temp_epochs: int = hparam(30, "epochs of the linear teacher-temperature warm-up")
    student_temp: float = hparam(0.1, "student temperature τ_s")
    center_momentum: float = hparam(0.9, "momentum of the center c, eq. 4")
    freeze_last_layer: int = hparam(1, "epochs during which the head's last layer is not updated")
    drop_path_rate: float = hparam(0.1, "stochastic depth of the student ViT")
    global_crops_scale: tuple[float, float] = hparam((0.4, 1.0), "area range of the 2 global crops")
    local_crops_scale: tuple[float, float] = hparam((0.05, 0.4), "area range of the local crops")
    local_crops_number: int = hparam(8, "number of local crops")
    local_crop_size: int | None = hparam(None, "side of the local crops (None: 96/224 of the image size)")
    sync_batch_norm: bool = True  # main_dino.py converts a backbone or head with BatchNorm to SyncBN


def warmup_then_constant(start: float, end: float, warmup_epochs: int, epoch: int) -> float:
    """``np.linspace(start, end, warmup_epochs)[epoch]``, then ``end``: DINO's teacher-temperature schedule."""
    if epoch >= warmup_epochs:
        return end
    return start + epoch * (end - start) / max(1, warmup_epochs - 1)


def dino_views(global_size: int, local_size: int, hp, mean: Sequence[float], std: Sequence[float]) -> MultiView:
    """DINO ``DataAugmentationDINO`` (facebookresearch/dino ``main_dino.py``): ``[global 1, global 2, local
    1..n]``. Every crop is a bicubic random resized crop, flip, colour jitter 0.4/0.4/0.2/0.1 (p=0.8) and
    grayscale (p=0.2); the two global crops are BYOL's pair (global 1 always blurred, global 2 blurred with p=0.1
    and solarised with p=0.2), the locals blurred with p=0.5."""
    global_crop = crop(global_size, hp.global_crops_scale, BICUBIC)
    local = view(
        crop(local_size, hp.local_crops_scale, BICUBIC),
        flip(),
        color_distortion(saturation=0.2),
        blur(p=0.5),
        mean=mean,
        std=std,
    )
    return MultiView(asymmetric_pair(global_crop, mean, std) + [local] * hp.local_crops_number)


DINO_ARGS = (  # main_dino.py arguments with the same meaning as sslhub's DINO hyperparameters
    "out_dim", "use_bn_in_head", "norm_last_layer", "momentum_teacher", "warmup_teacher_temp", "teacher_temp",
    "warmup_teacher_temp_epochs", "weight_decay", "weight_decay_end", "clip_grad", "epochs", "freeze_last_layer",
    "lr", "warmup_epochs", "min_lr", "optimizer", "drop_path_rate", "global_crops_scale", "local_crops_number",
    "local_crops_scale",
)  # fmt: skip


def _dino_head_sizes(head: dict[str, torch.Tensor]) -> dict:
    """Head shape read off the weights: Linear layers of ``head.mlp``, BatchNorm between them, prototypes."""
    linear = sorted(int(key.split(".")[1]) for key in head if key.startswith("mlp.") and key.endswith(".weight")
                    and head[key].ndim == 2)  # fmt: skip
    weights = [head[f"mlp.{i}.weight"] for i in linear]
    return {
        "head_layers": len(weights),
        "hidden_dim": weights[0].shape[0] if len(weights) > 1 else 2048,
        "bottleneck_dim": head["last_layer.weight_v"].shape[1],
        "out_dim": head["last_layer.weight_v"].shape[0],
        "use_bn_in_head": any(key.endswith("running_mean") for key in head),
    }


def convert_dino_full(container, source: str) -> Converted:
    """facebookresearch/dino ``main_dino.py`` full checkpoint: ``{'student', 'teacher', 'optimizer', 'epoch',
    'args', 'dino_loss', ['fp16_scaler']}``. Student and teacher are ``MultiCropWrapper(backbone, DINOHead)``
    (``backbone.*``, ``head.*``, the student always and a ResNet teacher under DDP's ``module.``);
    ``dino_loss['center']`` (1, out_dim). The released encoder is the teacher backbone."""
    parts = {}
    for role in ("teacher", "student"):
        reader = KeyReader(strip_module(entry(container, role, source)), f"{source} [{role}]")
        parts[role] = reader.take("backbone."), reader.take("head.")
        reader.finish()
    center = KeyReader(entry(container, "dino_loss", source), f"{source} [dino_loss]")
    method = {"center": center.take_one("center")}
    center.finish()
    encoder_copies = {}
    for role in ("teacher", "student"):
        encoder_copies[f"{role}.backbone."], head = parts[role]
        method.update(prefixed(f"{role}_head.", head))
    overrides = {}
    args = container.get("args")
    if isinstance(args, argparse.Namespace):
        overrides = {name: getattr(args, name) for name in DINO_ARGS if hasattr(args, name)}
        if overrides.get("optimizer") not in ("sgd", "adamw", "lars"):
            overrides.pop("optimizer", None)
    overrides.update(_dino_head_sizes(parts["teacher"][1]))
    left_out = leftover_entries(container, {"teacher", "student", "dino_loss"})
    return Converted("dino_full", parts["teacher"][0], method, encoder_copies, overrides, left_out)


def _is_dino_full(container) -> bool:
    return "teacher" in container and "student" in container


@register_method("dino")
class DINO(SSLMethod):
    """Student g_θs and teacher g_θt (EMA of the student, momentum 0.996 -> 1 on a cosine). The teacher sees the 2
    global crops, the student all crops; loss = cross-entropy between the centred, sharpened teacher output and the
    student output on different crops (eq. 2-3). Center c ← m c + (1-m) mean(g_θt) with m = 0.9 (eq. 4).
    The released encoder is the teacher's backbone.
    """

    Hparams = DINOHparams
    paper = "Emerging Properties in Self-Supervised Vision Transformers (DINO)"
    arxiv = "2104.14294"
    citation = (
        "@inproceedings{caron2021emerging,\n  title={Emerging Properties in Self-Supervised Vision Transformers},\n"
        "  author={Caron, Mathilde and Touvron, Hugo and Misra, Ishan and J\\'egou, Herv\\'e and Mairal, Julien"
        " and Bojanowski, Piotr and Joulin, Armand},\n  booktitle={ICCV},\n  year={2021}\n}"
    )
    released = "teacher backbone (without the DINO head)"
    # facebookresearch/dino eval_linear.py: SGD lr 0.001 per 256 images at batch 1024, 100 epochs, on the class token
    linear_recipe = LinearRecipe("facebookresearch/dino eval_linear.py (on the pooled features)", 0.001, 100, 1024)
    checkpoint_layouts = (CheckpointLayout("dino_full", _is_dino_full, convert_dino_full),)
    tiny_preset = "dino_vit_tiny_patch4_32px"
    tiny_overrides = {
        "out_dim": 256,
        "hidden_dim": 64,
        "bottleneck_dim": 32,
        "local_crops_number": 2,
        "backbone_kwargs": {"depth": 2},
    }

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        with torch.device("meta"):  # only the architecture is needed to choose the options
            probe = self.build_encoder(config).backbone
        vit = is_vision_transformer(probe)
        extra = {"dynamic_img_size": True} if hasattr(probe, "dynamic_img_size") else {}  # timm ViTs; XCiT is native
        self.student = self.build_encoder(config, **extra, **({"drop_path_rate": hp.drop_path_rate} if vit else {}))
        self.teacher = self.build_encoder(config, **extra).requires_grad_(False)
        self.teacher.load_state_dict(self.student.state_dict())
        dim = self.student.backbone.num_features
        self.student_head = self.build_head(dim, student=True)
        self.teacher_head = self.build_head(dim, student=False).requires_grad_(False)
        self.init_teacher_head()
        self.register_buffer("center", torch.zeros(1, hp.out_dim))
        self.teacher_temperature = hp.warmup_teacher_temp

    def build_head(self, in_dim: int, student: bool) -> nn.Module:
        """The DINO head of the student (weight norm g frozen as ``norm_last_layer``) or of the teacher (frozen, as
        ``main_dino.py`` builds it)."""
        hp = self.hparams
        return DINOHead(
            in_dim,
            out_dim=hp.out_dim,
            hidden_dim=hp.hidden_dim,
            bottleneck_dim=hp.bottleneck_dim,
            nlayers=hp.head_layers,
            use_bn=hp.use_bn_in_head,
            norm_last_layer=hp.norm_last_layer if student else True,
        )

    def init_teacher_head(self) -> None:
        """The teacher's head starts as a copy of the student's."""
        self.teacher_head.load_state_dict(self.student_head.state_dict())

    @property
    def released_encoder(self):
        return self.teacher

    def local_crop_size(self) -> int:
        """``local_crop_size`` or 96/224 of the image size, rounded to a multiple of the ViT patch size."""
        if self.hparams.local_crop_size:
            return self.hparams.local_crop_size
        size = self.config.image_size * 96 / 224
        patch = getattr(getattr(self.student.backbone, "patch_embed", None), "patch_size", (1, 1))[0]
        return max(patch, round(size / patch) * patch)

    def view_recipe(self):
        cfg = self.config
        return dino_views(cfg.image_size, self.local_crop_size(), self.hparams, cfg.image_mean, cfg.image_std)

    @staticmethod
    def _multi_crop_forward(backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """``MultiCropWrapper``: the backbone over crops of equal resolution as one batch, then the head once."""
        return list(head(forward_by_resolution(backbone, crops)).chunk(len(crops)))

    def teacher_temperature_at(self, epoch: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs, then constant."""
        hp = self.hparams
        return warmup_then_constant(hp.warmup_teacher_temp, hp.teacher_temp, hp.warmup_teacher_temp_epochs, epoch)

    def on_step_start(self, progress: TrainingProgress) -> None:
        self.teacher_temperature = self.teacher_temperature_at(progress.epoch)

    def forward(self, batch: Batch) -> MethodOutput:
        views = batch.views
        if len(views) < 2:
            raise ValueError(f"DINO takes 2 global crops (+ local crops), got {len(views)} view(s)")
        with torch.no_grad():
            teacher_out = self._multi_crop_forward(self.teacher, self.teacher_head, views[:2])
        student_out = self._multi_crop_forward(self.student, self.student_head, views)
        loss = dino_cross_entropy(
            student_out, teacher_out, self.center, self.hparams.student_temp, self.teacher_temperature
        )
        if self.training:
            self._update_center(torch.cat(teacher_out))
        return MethodOutput(loss, {"teacher_temperature": self.teacher_temperature})

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = mean_over_processes(teacher_out.mean(dim=0, keepdim=True))
        self.center.mul_(self.hparams.center_momentum).add_(batch_center, alpha=1 - self.hparams.center_momentum)

    def on_before_optimizer_step(self, progress: TrainingProgress) -> None:
        """Per-parameter gradient clipping (``utils.clip_gradients``) and, during the first ``freeze_last_layer``
        epochs, no update of the head's last layer (``utils.cancel_gradients_last_layer``)."""
        if self.hparams.clip_grad is not None:
            grads = [p.grad for p in self.student_parameters() if p.grad is not None]
            scales = [torch.clamp(self.hparams.clip_grad / (n + 1e-6), max=1.0) for n in torch._foreach_norm(grads)]
            torch._foreach_mul_(grads, scales)
        if progress.epoch < self.hparams.freeze_last_layer:
            for param in self.last_layer_parameters():
                param.grad = None

    def student_parameters(self) -> list[nn.Parameter]:
        """The student's parameters, each once: what the gradient clipping sees (``utils.clip_gradients(student)``)."""
        return [*self.student.parameters(), *self.student_head.parameters()]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The parameters frozen during the first ``freeze_last_layer`` epochs."""
        return list(self.student_head.last_layer.parameters())

    def momentum_pairs(self):
        return [(self.student, self.teacher), (self.student_head, self.teacher_head)]

    def momentum_at(self, progress: TrainingProgress) -> float:
        """``momentum_schedule[it]``: cosine from ``momentum_teacher`` to 1, applied after step ``it``."""
        return cosine_schedule(self.hparams.momentum_teacher, 1.0, progress)


for _arch in (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_small_patch8_224",
    "vit_base_patch8_224",
    "xcit_small_12_p16_224",
    "xcit_small_12_p8_224",
    "xcit_medium_24_p16_224",
    "xcit_medium_24_p8_224",
):
    register_preset(Preset(f"dino_{_arch}", "dino", _arch, description=f"DINO on a timm {_arch}"))

register_preset(
    Preset(
        "dino_resnet50",
        "dino",
        "resnet50",
        method_kwargs={
            "optimizer": "sgd",
            "lr": 0.03,
            "min_lr": 0.0,
            "weight_decay": 1e-4,
            "weight_decay_end": 1e-4,
            "global_crops_scale": (0.14, 1.0),
            "local_crops_scale": (0.05, 0.14),
        },
        description="DINO ResNet-50 recipe of the official README: SGD lr 0.03, wd 1e-4, crop scales 0.14",
    )
)

register_preset(
    Preset(
        "dino_vit_tiny_patch4_32px",
        "dino",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4},
        method_kwargs={"out_dim": 4096, "warmup_epochs": 2, "warmup_teacher_temp_epochs": 5},
        description="DINO, ViT-Tiny with 4 px patches for 32 px images; 4096 prototypes, short warm-ups",
    )
)

DINO_RELEASES = "https://dl.fbaipublicfiles.com/dino"
# (preset, the authors' folder, timm's Hub copy, ImageNet kNN and linear top-1, epochs) from the README of
# facebookresearch/dino ("Pretrained models") and timm's ``.dino`` tags; epochs only where an ``args.txt`` states them.
for _preset, _folder, _hub, _knn, _linear, _epochs in (
    ("dino_vit_small_patch16_224", "dino_deitsmall16_pretrain", "timm/vit_small_patch16_224.dino", 74.5, 77.0, None),
    ("dino_vit_small_patch8_224", "dino_deitsmall8_pretrain", "timm/vit_small_patch8_224.dino", 78.3, 79.7, None),
    ("dino_vit_base_patch16_224", "dino_vitbase16_pretrain", "timm/vit_base_patch16_224.dino", 76.1, 78.2, 400),
    ("dino_vit_base_patch8_224", "dino_vitbase8_pretrain", "timm/vit_base_patch8_224.dino", 77.4, 80.1, None),
    ("dino_resnet50", "dino_resnet50_pretrain", None, 67.5, 75.3, None),
    ("dino_xcit_small_12_p16_224", "dino_xcit_small_12_p16_pretrain", None, 76.0, 77.8, None),
    ("dino_xcit_small_12_p8_224", "dino_xcit_small_12_p8_pretrain", None, 77.1, 79.2, None),
    ("dino_xcit_medium_24_p16_224", "dino_xcit_medium_24_p16_pretrain", None, 76.4, 78.8, None),
    ("dino_xcit_medium_24_p8_224", "dino_xcit_medium_24_p8_pretrain", None, 77.9, 80.3, None),
):
    register_pretrained(
        PretrainedTag(
            _preset,
            "in1k",
            url=f"{DINO_RELEASES}/{_folder}/{_folder}.pth",
            full_url=f"{DINO_RELEASES}/{_folder}/{_folder}_full_checkpoint.pth",
            layout="backbone",
            license="apache-2.0",
            epochs=_epochs,
            metrics={"knn": _knn, "linear": _linear},
            hf_hub_id=_hub,
            source="facebookresearch/dino README, Pretrained models",
        )
    )
