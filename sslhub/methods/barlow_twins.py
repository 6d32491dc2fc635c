"""Barlow Twins: self-supervised learning by making the cross-correlation of two views' embeddings the identity.

Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", arXiv 2103.03230
(ICML 2021). Follows facebookresearch/barlowtwins (``main.py`` ``BarlowTwins``, ``LARS``, ``adjust_learning_rate``,
``Transform``; ``evaluate.py``; ``hubconf.py``; README "Pretrained Model").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import sum_over_processes, sum_with_grad, world_size
from sslhub.heads import MLPHead
from sslhub.losses import redundancy_reduction
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BICUBIC, BILINEAR, MultiView, asymmetric_pair, crop


@dataclass
class BarlowTwinsHparams(MethodHparams):
    """Defaults of the paper ("Implementation Details", arXiv 2103.03230) and ``main.py``: projector 8192-8192-8192,
    λ = 0.0051 (eq. 1), LARS (η 0.001, momentum 0.9; biases and BatchNorm parameters, the tensors with one dimension,
    excluded from weight decay and from the trust-ratio adaptation) with learning rate 0.2 for the weights and 0.0048
    for the biases / BatchNorm parameters per 256 images, 10 warm-up epochs from 0, then a half-cosine to 1/1000 of
    the peak (``adjust_learning_rate``), 1000 epochs (batch 2048 in the paper: pass ``--batch-size``, the learning
    rates scale linearly), SyncBatchNorm.

    Deviation: weight decay 1.5e-6 as the paper (and the issue) state; ``main.py``'s ``--weight-decay`` default is
    1e-6. ``lr_biases / lr`` is the ``lr_scale`` of the bias group, so ``--lr`` (an absolute rate for the weights)
    keeps the official ratio 0.0048 / 0.2 = 0.024, which replaced the ``--scale-loss 0.024`` of the code before June
    2021 (with LARS, scaling the loss changes little but the updates of the non-adapted tensors).
    """

    optimizer: str = "lars"
    lr: float = 0.2
    min_lr_ratio: float = 0.001
    warmup_epochs: float = 10
    weight_decay: float = 1.5e-6
    epochs: int = 1000
    sync_batch_norm: bool = True  # main.py: nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr_biases: float = hparam(
        0.0048, "base lr of biases and BatchNorm parameters per 256 images (--learning-rate-biases)"
    )
    projector_dims: tuple[int, ...] = hparam((8192, 8192, 8192), "projector widths after the backbone (--projector)")
    lambd: float = hparam(0.0051, "weight λ of the off-diagonal terms, eq. 1 (--lambd)")
    blur_p: tuple[float, float] = hparam((1.0, 0.1), "Gaussian-blur probability of view 1 and view 2 (Transform)")
    solarize_p: tuple[float, float] = hparam((0.0, 0.2), "solarisation probability of view 1 and view 2 (Transform)")
    gradient_through_all_reduce: bool = hparam(
        False,
        "back-propagate through the sum of the cross-correlation over processes (the global loss's gradient); "
        "False: main.py's torch.distributed.all_reduce, whose gradient is 1/world_size of it",
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.projector_dims:
            raise ValueError("projector_dims: at least one layer")
        if self.lr <= 0:
            raise ValueError(f"lr {self.lr}: the biases' rate is a multiple of it (lr_biases / lr), give lr > 0")


def convert_barlow_twins(container, source: str) -> Converted:
    """facebookresearch/barlowtwins ``main.py`` ``checkpoint.pth``: ``{'epoch', 'model', 'optimizer'}``; ``model`` =
    ``model.state_dict()`` of DDP(SyncBN(BarlowTwins)): ``module.backbone.*`` (torchvision ResNet-50 with ``fc =
    Identity``: no ``fc`` keys), ``module.projector.{0,3,6}.weight`` (Linear without bias) and ``{1,4}.*``
    (BatchNorm), ``module.bn.*`` (BatchNorm1d without affine: running statistics only). The released encoder
    (``resnet50.pth`` = ``model.module.backbone.state_dict()``) is the backbone."""
    reader = KeyReader(entry(container, "model", source), source)
    backbone = reader.take("module.backbone.")
    if not backbone:
        raise CheckpointError(f"{source}: no 'module.backbone.' keys: not a Barlow Twins checkpoint")
    projector, bn = reader.take("module.projector."), reader.take("module.bn.")
    reader.finish()
    if not projector:
        raise CheckpointError(f"{source}: no 'module.projector.' keys: not a Barlow Twins training checkpoint")
    linear = sorted(
        int(key.split(".")[0]) for key, value in projector.items() if key.endswith("weight") and value.ndim == 2
    )
    overrides = {"projector_dims": tuple(projector[f"{index}.weight"].shape[0] for index in linear)}
    method = prefixed("projector.", projector) | prefixed("bn.", bn)
    left_out = leftover_entries(container, {"model"})
    return Converted("barlow_twins", backbone, method, {"encoder.backbone.": backbone}, overrides, left_out)


def _is_barlow_twins(container) -> bool:
    model = container.get("model")
    return (
        isinstance(model, dict)
        and any(key.startswith("module.projector.") for key in model)
        and any(key.startswith("module.backbone.") for key in model)
    )


@register_method("barlow_twins")
class BarlowTwins(SSLMethod):
    """One network f = backbone + projector for both views (no momentum encoder, no predictor, no stop-gradient).
    ``z1 = f(y1)``, ``z2 = f(y2)``, each view in its own forward pass (BatchNorm statistics per view, as ``main.py``);
    ``C = bn(z1)ᵀ bn(z2) / N`` with ``bn`` a BatchNorm1d without affine parameters (eq. 2: each dimension standardised
    over the batch) and N the global batch; ``L = Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²`` (eq. 1,
    ``sslhub.losses.redundancy_reduction``).

    On several processes: every BatchNorm, ``bn`` included, uses global-batch statistics (SyncBN), and C is summed
    over processes as ``main.py``'s ``torch.distributed.all_reduce(c)``: the loss is that of the global batch, but
    that sum is not differentiated, so each process back-propagates through its own term only, and after DDP's
    gradient averaging the update follows 1/world_size of the global loss's gradient (lightly issue #1977). sslhub
    keeps this (``C = C_local + stopgrad(Σ_p C_p - C_local)``); ``gradient_through_all_reduce`` gives the global
    gradient instead. C is computed in float32 outside autocast (the official code runs it in fp16 under AMP).
    ``bn`` is a module of the method, so its running statistics (``module.bn.*``) load from the full checkpoint;
    it updates them twice per step (z1, then z2), as ``main.py``, and in eval mode C uses them (an eval-mode loss is
    a monitor only; the official code never computes one).

    Optimisation: LARS with two parameter groups, tensors with more than one dimension at ``lr`` with weight decay,
    one-dimensional tensors (biases, BatchNorm) at ``lr_biases`` without it. The released encoder is the backbone.
    """

    Hparams = BarlowTwinsHparams
    paper = "Barlow Twins: Self-Supervised Learning via Redundancy Reduction"
    arxiv = "2103.03230"
    citation = (
        "@inproceedings{zbontar2021barlow,\n  title={Barlow Twins: Self-Supervised Learning via Redundancy Reduction},"
        "\n  author={Zbontar, Jure and Jing, Li and Misra, Ishan and LeCun, Yann and Deny, St{\\'e}phane},\n"
        "  booktitle={ICML},\n  year={2021}\n}"
    )
    released = "backbone (without the projector)"
    # facebookresearch/barlowtwins evaluate.py (README: --lr-classifier 0.3): SGD momentum 0.9, lr 0.3 at batch 256,
    # weight decay 1e-6, 100 epochs, cosine (per epoch) to 0; random resized crop + flip for training.
    linear_recipe = LinearRecipe("facebookresearch/barlowtwins evaluate.py", 0.3, 100, 256, weight_decay=1e-6)
    checkpoint_layouts = (CheckpointLayout("barlow_twins", _is_barlow_twins, convert_barlow_twins),)
    tiny_preset = "barlow_twins_resnet18_32px"
    tiny_overrides = {"projector_dims": (64, 64, 64)}

    # Evaluation: ``evaluate.py`` validation: bilinear resize of the short side to 256 (8/7 of the size; none at 64 px
    # or less), centre crop, ImageNet normalisation.
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        dims = (self.encoder.num_features, *hp.projector_dims)
        self.projector = MLPHead(dims, batch_norm=True, bias=False)  # [Linear, BN, ReLU] x (n - 1), Linear
        self.bn = nn.BatchNorm1d(dims[-1], affine=False)

    def view_recipe(self):
        """``main.py`` ``Transform``: BYOL's asymmetric pair with bicubic random resized crops (scale 0.08-1), flip,
        colour jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale (p=0.2), Gaussian blur (p 1.0 / 0.1, σ in [0.1, 2]) and
        solarisation (p 0.0 / 0.2), in the official order; the blur is Pillow's of radius σ, as the official code."""
        cfg, hp = self.config, self.hparams
        pair = asymmetric_pair(
            crop(cfg.image_size, (0.08, 1.0), BICUBIC),
            cfg.image_mean,
            cfg.image_std,
            blur_p=tuple(hp.blur_p),
            solarize_p=tuple(hp.solarize_p),
        )
        return MultiView(pair)

    def param_groups(self):
        """``main.py``: ``param.ndim != 1`` (weights) and ``param.ndim == 1`` (biases, BatchNorm), the latter at
        ``lr_biases / lr`` of the scheduled rate and without weight decay."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim != 1], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0, "lr_scale": hp.lr_biases / hp.lr},
        ]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images))

    def cross_correlation(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """``C = bn(z1)ᵀ bn(z2) / N`` over the global batch of N = world_size x local images, summed over processes
        (class docstring), in float32."""
        with torch.autocast(z1.device.type, enabled=False):
            local = self.bn(z1.float()).t() @ self.bn(z2.float()) / (z1.shape[0] * world_size())
        if world_size() == 1:
            return local
        if self.hparams.gradient_through_all_reduce:
            return sum_with_grad(local)
        return local + (sum_over_processes(local.detach()) - local.detach())

    def forward(self, batch: Batch) -> MethodOutput:
        views = batch.views
        if len(views) != 2:
            raise ValueError(f"Barlow Twins takes 2 views, got {len(views)}")
        z1, z2 = self.embed(views[0]), self.embed(views[1])
        return MethodOutput(redundancy_reduction(self.cross_correlation(z1, z2), self.hparams.lambd))


register_preset(
    Preset(
        "barlow_twins_resnet18",
        "barlow_twins",
        "resnet18",
        description="Barlow Twins on a timm resnet18, 224 px, the paper's recipe (projector 8192-8192-8192)",
    )
)
register_preset(
    Preset(
        "barlow_twins_resnet50",
        "barlow_twins",
        "resnet50",
        description="Barlow Twins ResNet-50, main.py recipe: projector 8192-8192-8192, λ 0.0051, LARS lr 0.2 / "
        "0.0048 (weights / biases), wd 1.5e-6, 1000 epochs",
    )
)
# solo-learn scripts/pretrain/cifar/barlow.yaml: projector 2048-2048-2048, λ 0.0051, LARS lr 0.3 per 256 images at
# batch 256, weight decay 1e-4, 1000 epochs; views without blur, solarisation 0 / 0.2 (augmentations/asymmetric.yaml).
# Kept from main.py instead of solo-learn's optimizer: its LARS (η 0.001, no clipping; solo-learn's is apex-LARC-like,
# η 0.02 with the rate clipped) and the biases' rate at 0.024 of the weights' (solo-learn: the same rate and a loss
# scale of 0.1, 0.1 of the weights' for the non-adapted biases), and bias-free projector layers (solo-learn: biases).
register_preset(
    Preset(
        "barlow_twins_resnet18_32px",
        "barlow_twins",
        "resnet18",
        image_size=32,
        method_kwargs={
            "projector_dims": (2048, 2048, 2048),
            "lr": 0.3,
            "lr_biases": 0.0072,
            "weight_decay": 1e-4,
            "blur_p": (0.0, 0.0),
            "solarize_p": (0.0, 0.2),
        },
        description="Barlow Twins, ResNet-18 for 32 px images: solo-learn's CIFAR recipe (projector 2048-2048-2048, "
        "LARS lr 0.3 with main.py's bias ratio, wd 1e-4, no blur)",
    )
)

BARLOW_TWINS_RELEASES = "https://dl.fbaipublicfiles.com/barlowtwins"
# facebookresearch/barlowtwins: the README's files (since the "New checkpoint" commit of December 2021) and the
# torch.hub file of hubconf.py (the README's files from June to December 2021, run ep1000_bs2048_lrw0.2_lrb0.0048_
# lambd0.0051 of the current main.py); both 1000 epochs at batch 2048, linear top-1 73.5 % (top-5 91.0 %).
for _tag, _folder, _source in (
    ("in1k", "ljng", "facebookresearch/barlowtwins README, Pretrained Model"),
    (
        "in1k_hub",
        "ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051",
        "facebookresearch/barlowtwins hubconf.py, the torch.hub file, also the README's from June to December 2021",
    ),
):
    register_pretrained(
        PretrainedTag(
            "barlow_twins_resnet50",
            _tag,
            url=f"{BARLOW_TWINS_RELEASES}/{_folder}/resnet50.pth",
            full_url=f"{BARLOW_TWINS_RELEASES}/{_folder}/checkpoint.pth",
            layout="backbone",
            license="mit",
            epochs=1000,
            metrics={"linear": 73.5},
            source=_source,
        )
    )
