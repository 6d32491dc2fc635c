"""InvaSpread: instance features of the mini-batch as classifier weights, invariant to augmentation and spread apart.

Ye, Zhang, Yuen, Chang, "Unsupervised Embedding Learning via Invariant and Spreading Instance Feature", arXiv
1904.03436 (CVPR 2019). Follows mangye16/Unsupervised_Embedding_Learning (``demo_seen.py``, ``BatchAverage.py``
``BatchAverage`` + ``BatchCriterion``, ``models/resnet_cifar.py``, ``datasets/cifar.py``).

The loss is eq. 2-5 as ``BatchCriterion`` computes it with the default ``--batch-m 1``
(``sslhub.losses.invariance_spreading``): the 2B L2-normalised embeddings of B images and their augmented copies,
each against the other 2B - 1 (its positive and 2B - 2 negatives), the weights detached as ``BatchAverage`` takes
them from ``feat.data``; the sum over the 2B queries divided by 2B. The paper writes eq. 2-5 with the B original
features as the weights and the augmented copies as queries (P(i | x̂_i), 1 - P(i | x_j)); the official code,
followed here, is symmetric: every one of the 2B features is a query against the 2B - 1 others as weights.

Deviations from the official code:

- backbone: timm's ResNet with its ImageNet stem (7x7 stride-2 convolution and max-pool) and its initialisation (last
  BN of each block at γ = 0) also in the 32 px preset; the official CIFAR ResNet-18 has a 3x3 stride-1 stem without
  max-pool and PyTorch's default initialisation. The global average pool replaces ``avg_pool2d(pool_len)`` (the
  whole 4x4 map at 32 px; at STL's 96 px the official 12x12 map pooled with ``pool_len`` 7 keeps its top-left 7x7);
- ``--batch-m`` < 1 (the hard-negative ``topk`` branch of ``BatchCriterion``) is not implemented; ``m = 1`` is the
  official default (``demo_seen.py``, ``demo_unseen.py``);
- several processes: each process's batch is its own set of negatives (the official code runs one batch of 128 on
  ``DataParallel``, with BatchNorm statistics per GPU);
- the ImageNet-size presets (224 px) keep the paper's recipe (the paper trains on CIFAR-10 and STL-10 only and
  fine-tunes ImageNet-pretrained Inception-v1 on the fine-grained sets), with ImageNet's normalisation: a documented
  choice, not the authors'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslhub.batch import Batch
from sslhub.losses import invariance_spreading
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, register_method, register_preset
from sslhub.transforms import CIFAR10_MEAN, CIFAR10_STD, MultiView, color_jitter, crop, flip, grayscale, view


@dataclass
class InvaSpreadHparams(MethodHparams):
    """Defaults of ``demo_seen.py`` (the paper's CIFAR-10 / STL-10 setting, arXiv 1904.03436 §4.1 "Implementation
    details"): SGD lr 0.03 at batch 128, momentum 0.9, weight decay 5e-4, lr x 0.1 from epoch 120
    (``adjust_learning_rate``: its later branches at 160 and 200 are never reached), 301 epochs
    (``range(start_epoch, start_epoch + 301)``), τ = 0.1 (``--batch-t``), 128-d embedding (``--low-dim``)."""

    optimizer: str = "sgd"
    lr: float = 0.03
    lr_batch_size: int = 128
    weight_decay: float = 5e-4
    epochs: int = 301
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (120,)
    temperature: float = hparam(0.1, "temperature τ of eq. 2-4 (--batch-t)")
    embed_dim: int = hparam(128, "dimension of the L2-normalised embedding, the Linear after the pool (--low-dim)")
    crop_scale_min: float = hparam(0.2, "smallest area fraction of the random resized crop (demo_seen.py: 0.2)")

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be at least 1, got {self.embed_dim}")


def invaspread_views(image_size: int, mean, std, scale: tuple[float, float]) -> MultiView:
    """``demo_seen.py``'s ``transform_train``, applied twice to each image (``CIFAR10Instance``): random resized crop,
    colour jitter 0.4 / 0.4 / 0.4 / 0.4 always applied (hue 0.4, no probability), grayscale p = 0.2, horizontal
    flip."""
    one = view(crop(image_size, scale), color_jitter(0.4, 0.4, 0.4, 0.4, p=1.0), grayscale(0.2), flip(), mean=mean,
               std=std)  # fmt: skip
    return MultiView([one, one])


@register_method("invaspread")
class InvaSpread(SSLMethod):
    """The authors' network (``models/resnet_cifar.py`` ``ResNet``): a ResNet (``encoder``, a timm backbone and its
    global average pool), ``linear`` (Linear to ``embed_dim``, the authors' key) and L2 normalisation (``embed``).
    The two views of the B images go through it in one forward pass (``torch.cat((inputs1, inputs2))`` in
    ``demo_seen.py``: BatchNorm statistics over both views), and ``sslhub.losses.invariance_spreading`` (eq. 2-5) is
    the loss. The released encoder is the ResNet: its ``pooler_output`` is the pooled ResNet feature before
    ``linear`` (what a linear probe or fine-tuning starts from, and what a stock timm model computes); the paper's
    weighted kNN (k = 200, ``utils.kNN``) uses the L2-normalised 128-d embedding, ``embed`` of the pretraining
    model, whose ``linear`` is saved in the pretraining checkpoint.
    """

    Hparams = InvaSpreadHparams
    paper = "Unsupervised Embedding Learning via Invariant and Spreading Instance Feature (InvaSpread)"
    arxiv = "1904.03436"
    citation = (
        "@InProceedings{ye2019unsupervised,\n  author    = {Ye, Mang and Zhang, Xu and Yuen, Pong C. and Chang, "
        "Shih-Fu},\n  title     = {Unsupervised Embedding Learning via Invariant and Spreading Instance Feature},\n"
        "  booktitle = {CVPR},\n  year      = {2019},\n}"
    )
    released = "ResNet backbone (pooler_output: its 512-d / 2048-d average pool, without the 128-d linear embedding)"
    # The paper evaluates with a weighted kNN on the embedding (k = 200), not a linear probe; this is sslhub's
    # standard linear protocol on the pooled ResNet feature (SGD lr 0.1 per 256, 100 epochs).
    linear_recipe = LinearRecipe("sslhub linear protocol (the paper reports kNN only)", 0.1, 100, 256)
    tiny_preset = "invaspread_resnet18_32px"
    tiny_overrides = {"embed_dim": 16}

    def __init__(self, config):
        super().__init__(config)
        self.encoder = self.build_encoder(config)
        self.linear = nn.Linear(self.encoder.num_features, self.hparams.embed_dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The authors' ``net(images)``: the L2-normalised ``embed_dim`` embedding, the feature of the paper's kNN."""
        return F.normalize(self.linear(self.encoder(images)), dim=1)

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        return invaspread_views(cfg.image_size, cfg.image_mean, cfg.image_std, (hp.crop_scale_min, 1.0))

    def forward(self, batch: Batch) -> MethodOutput:
        views = batch.views
        if len(views) != 2:
            raise ValueError(f"InvaSpread takes 2 views, got {len(views)}")
        if views[0].shape != views[1].shape:
            raise ValueError(f"InvaSpread: both views of one shape, got {tuple(views[0].shape)} and "
                             f"{tuple(views[1].shape)}")  # fmt: skip
        z1, z2 = self.embed(torch.cat(views)).chunk(2)
        return MethodOutput(invariance_spreading(z1, z2, self.hparams.temperature))


for _name, _backbone in (("invaspread_resnet18", "resnet18"), ("invaspread_resnet50", "resnet50")):
    register_preset(
        Preset(
            _name,
            "invaspread",
            _backbone,
            description=f"InvaSpread on a timm {_backbone}, 224 px: the paper's CIFAR recipe (SGD lr 0.03 at batch "
            "128, wd 5e-4, τ 0.1, 128-d) at ImageNet size, a documented choice",
        )
    )

# demo_seen.py --dataset cifar: ResNet-18, 32 px, batch 128, lr 0.03, τ 0.1, 301 epochs, CIFAR-10 normalisation.
register_preset(
    Preset(
        "invaspread_resnet18_32px",
        "invaspread",
        "resnet18",
        image_size=32,
        image_mean=CIFAR10_MEAN,
        image_std=CIFAR10_STD,
        description="InvaSpread, ResNet-18 for 32 px images: demo_seen.py's CIFAR-10 recipe (batch 128, SGD lr 0.03, "
        "wd 5e-4, lr x 0.1 at epoch 120, 301 epochs, τ 0.1, 128-d)",
    )
)
