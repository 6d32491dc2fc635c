"""MoCo v3: momentum contrast without a queue, with a predictor, for ResNets and Vision Transformers.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", arXiv 2104.02057 (ICCV 2021).
Follows facebookresearch/moco-v3 (``moco/builder.py``, ``main_moco.py``, ``vits.py``, ``CONFIG.md``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslhub.backbones import is_vision_transformer
from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import gather_all, rank
from sslhub.heads import MLPHead
from sslhub.losses import moco_v3_contrastive
from sslhub.masking import sincos_2d_position_embedding
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, cosine_schedule, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import MultiView, asymmetric_pair, crop


@dataclass
class MoCoV3Hparams(MethodHparams):
    """Defaults of ``main_moco.py`` with ``--moco-m-cos`` (the ResNet-50 100-epoch recipe of CONFIG.md, except its
    ``--crop-min=.2``): LARS lr 0.6 per 256 images, wd 1e-6, 10 warm-up epochs then cosine, τ = 1.0, momentum 0.99
    -> 1 on a half-cosine, projector / predictor hidden 4096 and output 256. ``stop_grad_conv1`` (ViTs only): the
    random patch projection stays frozen (§4.2).
    """

    optimizer: str = "lars"
    lr: float = 0.6
    weight_decay: float = 1e-6
    warmup_epochs: float = 10
    epochs: int = 100
    embed_dim: int = hparam(256, "output dimension of the projector and predictor (--moco-dim)")
    mlp_hidden_dim: int = hparam(4096, "hidden width of the projector and predictor (--moco-mlp-dim)")
    temperature: float = hparam(1.0, "softmax temperature τ of the contrastive loss (--moco-t)")
    momentum: float = hparam(0.99, "initial momentum m of the momentum encoder (--moco-m)")
    momentum_cosine: bool = hparam(True, "raise the momentum to 1 on a half-cosine (--moco-m-cos)")
    crop_scale_min: float = hparam(0.08, "smallest area fraction of the random resized crop (--crop-min)")
    stop_grad_conv1: bool = hparam(True, "ViTs: keep the random patch projection frozen (§4.2, --stop-grad-conv1)")
    sync_batch_norm: bool = True  # main_moco.py: nn.SyncBatchNorm.convert_sync_batchnorm(model)


VIT_RECIPE = {  # CONFIG.md, ViT-S and ViT-B: AdamW, 300 epochs, 40 warm-up, τ = 0.2, --stop-grad-conv1
    "optimizer": "adamw",
    "lr": 1.5e-4,
    "weight_decay": 0.1,
    "epochs": 300,
    "warmup_epochs": 40,
    "temperature": 0.2,
}


def init_moco_v3_vit_(vit: nn.Module, stop_grad_conv1: bool) -> None:
    """Make a timm ViT ``vits.VisionTransformerMoCo``: MoCo initialisation (timm's ``init_weights("moco")``),
    xavier-uniform patch projection over fan 3·p·p + D, fixed 2-D sin-cos position embedding (the row index in the
    first half of the channels, the column in the second; zeros for the class token) and, with
    ``stop_grad_conv1``, a frozen patch projection."""
    vit.init_weights("moco")
    proj, dim = vit.patch_embed.proj, vit.embed_dim
    bound = math.sqrt(6.0 / (proj.in_channels * math.prod(proj.kernel_size) + dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    proj.requires_grad_(not stop_grad_conv1)
    column_first = sincos_2d_position_embedding(dim, vit.patch_embed.grid_size, cls_token=True)
    with torch.no_grad():
        vit.pos_embed.copy_(column_first.roll(dim // 2, dims=1).unsqueeze(0))
    vit.pos_embed.requires_grad_(False)


def convert_moco_v3(container, source: str) -> Converted:
    """facebookresearch/moco-v3 ``main_moco.py``: ``{'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}``;
    ``state_dict`` of DDP(MoCo_ResNet / MoCo_ViT): ``module.base_encoder.*`` and ``module.momentum_encoder.*``
    (backbone with the projector ``_build_mlp`` in the classifier slot, ``fc`` for ResNets, ``head`` for ViTs) and
    ``module.predictor.*``. The released encoder is the base encoder without the projector."""
    reader = KeyReader(entry(container, "state_dict", source), source)
    encoders, projectors = {}, {}
    for name in ("base", "momentum"):
        encoder = reader.take(f"module.{name}_encoder.")
        if not encoder:
            raise CheckpointError(f"{source}: no 'module.{name}_encoder.' keys: not a MoCo v3 checkpoint")
        slot = "head." if any(key.startswith("head.") for key in encoder) else "fc."
        projectors[name] = {key[len(slot) :]: value for key, value in encoder.items() if key.startswith(slot)}
        encoders[name] = {key: value for key, value in encoder.items() if not key.startswith(slot)}
    predictor = reader.take("module.predictor.")
    reader.finish()
    method = prefixed("base_projector.", projectors["base"]) | prefixed("momentum_projector.", projectors["momentum"])
    method |= prefixed("predictor.", predictor)
    copies = {"base_encoder.backbone.": encoders["base"], "momentum_encoder.backbone.": encoders["momentum"]}
    linear = [value for key, value in projectors["base"].items() if key.endswith("weight") and value.ndim == 2]
    overrides = {"mlp_hidden_dim": linear[0].shape[0], "embed_dim": linear[-1].shape[0]}
    left_out = leftover_entries(container, {"state_dict"})
    return Converted("moco_v3", encoders["base"], method, copies, overrides, left_out)


def _is_moco_v3(container) -> bool:
    state = container.get("state_dict")
    return isinstance(state, dict) and any(key.startswith("module.base_encoder.") for key in state)


@register_method("moco_v3")
class MoCoV3(SSLMethod):
    """Base encoder f_q = backbone + projector, followed by a predictor; momentum encoder f_k = EMA of the backbone
    and projector (θ_k ← m θ_k + (1-m) θ_q, m from 0.99 to 1 on a half-cosine). For two views x1, x2:
    ``L = ctr(q1, k2) + ctr(q2, k1)`` with ``ctr`` the InfoNCE of eq. 1 against the keys of the whole (all-process)
    batch, times 2τ (Algorithm 1). No queue. Projector / predictor as ``builder._build_mlp``: ResNets 2 / 2 layers
    (predictor without last BN), ViTs 3 / 2 layers (both with last BN). Weight decay on every trainable parameter,
    as ``main_moco.py`` hands all parameters to AdamW and LARS. The released encoder is the base backbone.
    The momentum encoder is updated by the trainer after each optimizer step with the momentum of the next step, as
    the official code updates it at the start of the next forward pass (``momentum_pairs`` / ``momentum_at``).
    BatchNorm statistics are those of the global batch on several processes (SyncBN, as the official code).
    """

    Hparams = MoCoV3Hparams
    paper = "An Empirical Study of Training Self-Supervised Vision Transformers (MoCo v3)"
    arxiv = "2104.02057"
    citation = (
        "@inproceedings{chen2021empirical,\n  title={An Empirical Study of Training Self-Supervised Vision "
        "Transformers},\n  author={Chen, Xinlei and Xie, Saining and He, Kaiming},\n  booktitle={ICCV},\n"
        "  year={2021}\n}"
    )
    released = "base encoder (backbone without the projector)"
    decay_norms_and_biases = True
    # facebookresearch/moco-v3 main_lincls.py: SGD lr 0.1 per 256 images at batch 1024, 90 epochs, no weight decay
    linear_recipe = LinearRecipe("facebookresearch/moco-v3 main_lincls.py", 0.1, 90, 1024)
    checkpoint_layouts = (CheckpointLayout("moco_v3", _is_moco_v3, convert_moco_v3),)
    tiny_preset = "moco_v3_vit_tiny_patch4_32px"
    tiny_overrides = {"mlp_hidden_dim": 64, "embed_dim": 32, "backbone_kwargs": {"depth": 2}}

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.base_encoder = self.build_encoder(config)
        backbone = self.base_encoder.backbone
        vit = is_vision_transformer(backbone)
        if vit:
            init_moco_v3_vit_(backbone, hp.stop_grad_conv1)
        hidden, out = hp.mlp_hidden_dim, hp.embed_dim
        projector_dims = (backbone.num_features, *[hidden] * (2 if vit else 1), out)
        self.base_projector = MLPHead(projector_dims, batch_norm=True, bias=False, last_bn=True)
        self.momentum_encoder = copy.deepcopy(self.base_encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.base_projector).requires_grad_(False)
        self.predictor = MLPHead((out, hidden, out), batch_norm=True, bias=False, last_bn=vit)
        self.momentum = hp.momentum

    @property
    def released_encoder(self):
        return self.base_encoder

    def view_recipe(self):
        """``main_moco.py``: BYOL's asymmetric pair with bilinear random resized crops. The official code flips
        last; flipping commutes with the colour operations and the isotropic blur, so the views have the same
        distribution."""
        cfg = self.config
        crop_transform = crop(cfg.image_size, (self.hparams.crop_scale_min, 1.0))
        return MultiView(asymmetric_pair(crop_transform, cfg.image_mean, cfg.image_std))

    def momentum_schedule(self, progress: TrainingProgress) -> float:
        """``adjust_moco_momentum``: ``1 - (1 + cos(π t / T)) (1 - m) / 2`` at fractional epoch t of T."""
        hp = self.hparams
        return cosine_schedule(hp.momentum, 1.0, progress) if hp.momentum_cosine else hp.momentum

    def on_step_start(self, progress: TrainingProgress) -> None:
        self.momentum = self.momentum_schedule(progress)

    def momentum_pairs(self):
        return [(self.base_encoder, self.momentum_encoder), (self.base_projector, self.momentum_projector)]

    def momentum_at(self, progress: TrainingProgress) -> float:
        """The schedule at the next step: the official code updates with it at the start of that step."""
        return self.momentum_schedule(progress.next())

    def _contrast(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        offset = rank() * query.shape[0]
        return moco_v3_contrastive(query, gather_all(key), self.hparams.temperature, offset)

    def forward(self, batch: Batch) -> MethodOutput:
        views = batch.views
        if len(views) != 2:
            raise ValueError(f"MoCo v3 takes 2 views, got {len(views)}")
        q1, q2 = (self.predictor(self.base_projector(self.base_encoder(x))) for x in views)
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(self.momentum_encoder(x)) for x in views)
        loss = self._contrast(q1, k2) + self._contrast(q2, k1)
        return MethodOutput(loss, {"momentum": self.momentum})


register_preset(
    Preset(
        "moco_v3_resnet50",
        "moco_v3",
        "resnet50",
        method_kwargs={"crop_scale_min": 0.2},
        description="MoCo v3 ResNet-50, CONFIG.md 100-epoch recipe: LARS lr 0.6, wd 1e-6, τ 1.0, crop scale 0.2",
    )
)

for _arch, _kwargs in (("vit_small_patch16_224", {"num_heads": 12}), ("vit_base_patch16_224", {})):
    register_preset(
        Preset(
            f"moco_v3_{_arch}",
            "moco_v3",
            _arch,
            backbone_kwargs=_kwargs,  # MoCo v3's ViT-S has 12 heads, timm's (DeiT's) 6
            method_kwargs=dict(VIT_RECIPE),
            description=f"MoCo v3 on a timm {_arch} with 12 heads, CONFIG.md recipe: AdamW lr 1.5e-4, wd 0.1, τ 0.2",
        )
    )

register_preset(
    Preset(
        "moco_v3_vit_tiny_patch4_32px",
        "moco_v3",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4},
        method_kwargs={**VIT_RECIPE, "warmup_epochs": 2},
        description="MoCo v3, ViT-Tiny with 4 px patches for 32 px images; ViT recipe with 2 warm-up epochs",
    )
)

MOCO_V3_RELEASES = "https://dl.fbaipublicfiles.com/moco-v3"
# facebookresearch/moco-v3 CONFIG.md (pretraining files and linear top-1, with each run's recipe) and README
# (end-to-end fine-tuning of the ViTs); the files are full training checkpoints.
for _preset, _run, _epochs, _metrics, _recipe in (
    ("moco_v3_resnet50", "r-50-1000ep", 1000, {"linear": 74.6}, {"lr": 0.3, "weight_decay": 1.5e-6, "momentum": 0.996}),
    ("moco_v3_resnet50", "r-50-300ep", 300, {"linear": 72.8}, {"lr": 0.3}),
    ("moco_v3_resnet50", "r-50-100ep", 100, {"linear": 68.9}, {}),
    ("moco_v3_vit_small_patch16_224", "vit-s-300ep", 300, {"linear": 73.2, "finetune": 81.4}, {}),
    ("moco_v3_vit_base_patch16_224", "vit-b-300ep", 300, {"linear": 76.7, "finetune": 83.2}, {}),
):
    register_pretrained(
        PretrainedTag(
            _preset,
            f"in1k_{_epochs}ep",
            url=f"{MOCO_V3_RELEASES}/{_run}/{_run}.pth.tar",
            layout="moco_v3",
            license="cc-by-nc-4.0",
            epochs=_epochs,
            metrics=_metrics,
            source="facebookresearch/moco-v3 CONFIG.md and README",
            overrides={"epochs": _epochs, **_recipe},
        )
    )
