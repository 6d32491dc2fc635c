"""DINO: self-distillation with no labels.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", arXiv 2104.14294 (ICCV 2021).
Follows facebookresearch/dino (``main_dino.py``, ``vision_transformer.DINOHead``, ``utils.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslhub.backbones import PooledBackbone, default_pooling, is_vision_transformer
from sslhub.distributed import mean_over_processes
from sslhub.heads import DINOHead
from sslhub.losses import dino_cross_entropy
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, cosine_schedule
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import multi_crop_dino


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
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer: int = 1
    drop_path_rate: float = 0.1
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    local_crop_size: int | None = None


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

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        with torch.device("meta"):  # only the architecture is needed to choose the options
            probe = self.create_backbone()
        vit = is_vision_transformer(probe)
        extra = {"dynamic_img_size": True} if hasattr(probe, "dynamic_img_size") else {}  # timm ViTs; XCiT is native
        student = self.create_backbone(drop_path_rate=hp.drop_path_rate, **extra) if vit else self.create_backbone()
        teacher = self.create_backbone(**extra)
        teacher.load_state_dict(student.state_dict())
        pooling = config.pooling or default_pooling(student)
        self.student = PooledBackbone(student, pooling)
        self.teacher = PooledBackbone(teacher, pooling).requires_grad_(False)
        head_kwargs = dict(
            out_dim=hp.out_dim,
            hidden_dim=hp.hidden_dim,
            bottleneck_dim=hp.bottleneck_dim,
            nlayers=hp.head_layers,
            use_bn=hp.use_bn_in_head,
        )
        self.student_head = DINOHead(student.num_features, norm_last_layer=hp.norm_last_layer, **head_kwargs)
        self.teacher_head = DINOHead(student.num_features, **head_kwargs).requires_grad_(False)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.register_buffer("center", torch.zeros(1, hp.out_dim))
        self.teacher_temperature = hp.warmup_teacher_temp
        self.teacher_momentum = hp.momentum_teacher

    @property
    def released_backbone(self):
        return self.teacher.backbone

    def local_crop_size(self) -> int:
        """``local_crop_size`` or 96/224 of the image size, rounded to a multiple of the ViT patch size."""
        if self.hparams.local_crop_size:
            return self.hparams.local_crop_size
        size = self.config.image_size * 96 / 224
        patch = getattr(getattr(self.student.backbone, "patch_embed", None), "patch_size", (1, 1))[0]
        return max(patch, round(size / patch) * patch)

    def view_transform(self):
        cfg, hp = self.config, self.hparams
        return multi_crop_dino(
            cfg.image_size,
            self.local_crop_size(),
            hp.local_crops_number,
            global_scale=tuple(hp.global_crops_scale),
            local_scale=tuple(hp.local_crops_scale),
            mean=cfg.image_mean,
            std=cfg.image_std,
        )

    @staticmethod
    def _multi_crop_forward(backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run consecutive crops of equal resolution as one batch (``MultiCropWrapper``), then the head once."""
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(backbone(torch.cat(crops[start:end])))
            start = end
        return list(head(torch.cat(features)).chunk(len(crops)))

    def teacher_temperature_at(self, epoch: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs, then constant."""
        hp = self.hparams
        if epoch >= hp.warmup_teacher_temp_epochs:
            return hp.teacher_temp
        step = (hp.teacher_temp - hp.warmup_teacher_temp) / max(1, hp.warmup_teacher_temp_epochs - 1)
        return hp.warmup_teacher_temp + epoch * step

    def on_step_start(self, progress: TrainingProgress) -> None:
        self.teacher_temperature = self.teacher_temperature_at(progress.epoch)
        self.teacher_momentum = cosine_schedule(self.hparams.momentum_teacher, 1.0, progress)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
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
            params = [*self.student.parameters(), *self.student_head.parameters()]
            grads = [p.grad for p in params if p.grad is not None]
            scales = [torch.clamp(self.hparams.clip_grad / (n + 1e-6), max=1.0) for n in torch._foreach_norm(grads)]
            torch._foreach_mul_(grads, scales)
        if progress.epoch < self.hparams.freeze_last_layer:
            for param in self.student_head.last_layer.parameters():
                param.grad = None

    @torch.no_grad()
    def on_step_end(self, progress: TrainingProgress) -> None:
        student = [*self.student.parameters(), *self.student_head.parameters()]
        teacher = [*self.teacher.parameters(), *self.teacher_head.parameters()]
        torch._foreach_lerp_(teacher, student, 1 - self.teacher_momentum)


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
