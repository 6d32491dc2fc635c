"""MoCo v1 and v2: momentum contrast with a queue of negatives; v2 adds an MLP head and stronger augmentation.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", arXiv 1911.05722 (CVPR 2020);
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297.
Follows facebookresearch/moco (``moco/builder.py``, ``main_moco.py``; v2 with ``--mlp --moco-t 0.2 --aug-plus --cos``,
v1 with none of them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslhub.backbones import PooledBackbone, default_pooling
from sslhub.distributed import gather_all, shuffle_across_processes, unshuffle_across_processes
from sslhub.heads import MLPHead
from sslhub.losses import info_nce_with_queue
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import two_view_moco_v1, two_view_moco_v2


@dataclass
class MoCoV2Hparams(MethodHparams):
    """Defaults of MoCo v2 (arXiv 2003.04297 §2, ``main_moco.py``): SGD lr 0.03 per 256 images, cosine, wd 1e-4.

    ``mlp``: 2-layer MLP head (``--mlp``) instead of MoCo v1's linear projection; ``aug_plus``: MoCo v2's
    augmentation (``--aug-plus``, with blur) instead of MoCo v1's.
    """

    optimizer: str = "sgd"
    lr: float = 0.03
    weight_decay: float = 1e-4
    epochs: int = 200
    embed_dim: int = 128
    mlp_hidden_dim: int | None = None
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    shuffle_bn: bool = True
    crop_scale_min: float = 0.2
    mlp: bool = True
    aug_plus: bool = True


@register_method("moco_v2")
class MoCoV2(SSLMethod):
    """Query encoder f_q (trained) and key encoder f_k (EMA of f_q, eq. 2: θ_k ← m θ_k + (1-m) θ_q), a queue
    of K past keys as negatives and the InfoNCE loss (eq. 1) with τ = 0.2 (v1: 0.07). Keys are computed with shuffled BN
    across processes. The released encoder is the query encoder's backbone.
    """

    Hparams = MoCoV2Hparams
    paper = "Improved Baselines with Momentum Contrastive Learning (MoCo v2)"
    arxiv = "2003.04297"
    citation = (
        "@article{chen2020mocov2,\n  title={Improved Baselines with Momentum Contrastive Learning},\n"
        "  author={Chen, Xinlei and Fan, Haoqi and Girshick, Ross and He, Kaiming},\n"
        "  journal={arXiv preprint arXiv:2003.04297},\n  year={2020}\n}"
    )
    released = "query encoder (backbone without the MLP head)"

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        backbone = self.create_backbone()
        self.encoder_q = PooledBackbone(backbone, config.pooling or default_pooling(backbone))
        dim = backbone.num_features
        self.head_q = MLPHead((dim, hp.mlp_hidden_dim or dim, hp.embed_dim) if hp.mlp else (dim, hp.embed_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(hp.queue_size, hp.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def released_backbone(self):
        return self.encoder_q.backbone

    def view_transform(self):
        cfg = self.config
        recipe = two_view_moco_v2 if self.hparams.aug_plus else two_view_moco_v1
        return recipe(cfg.image_size, cfg.image_mean, cfg.image_std, scale=(self.hparams.crop_scale_min, 1.0))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        m = self.hparams.momentum
        query = [*self.encoder_q.parameters(), *self.head_q.parameters()]
        key = [*self.encoder_k.parameters(), *self.head_k.parameters()]
        torch._foreach_lerp_(key, query, 1 - m)

    @torch.no_grad()
    def _encode_keys(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.shuffle_bn:
            images, unshuffle = shuffle_across_processes(images)
        keys = F.normalize(self.head_k(self.encoder_k(images)), dim=1)
        return unshuffle_across_processes(keys, unshuffle) if self.hparams.shuffle_bn else keys

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = gather_all(keys)
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.hparams.queue_size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.hparams.queue_size)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        if len(views) != 2:
            raise ValueError(f"MoCo takes 2 views (query, key), got {len(views)}")
        image_q, image_k = views
        query = F.normalize(self.head_q(self.encoder_q(image_q)), dim=1)
        if self.training:
            self._momentum_update_key_encoder()
        keys = self._encode_keys(image_k)
        loss = info_nce_with_queue(query, keys, self.queue.clone().detach(), self.hparams.temperature)
        if self.training:
            self._dequeue_and_enqueue(keys)
        return MethodOutput(loss)


@dataclass
class MoCoV1Hparams(MoCoV2Hparams):
    """Defaults of MoCo v1 (arXiv 1911.05722 §4, ``main_moco.py`` defaults): linear projection to 128-d, τ = 0.07,
    MoCo v1 augmentation, SGD lr 0.03 per 256 images with wd 1e-4 for 200 epochs, lr x0.1 at epochs 120 and 160."""

    temperature: float = 0.07
    mlp: bool = False
    aug_plus: bool = False
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (120, 160)


@register_method("moco_v1")
class MoCoV1(MoCoV2):
    """MoCo v1 (He et al. 2019, arXiv 1911.05722): MoCo v2's objective (eq. 1-2, queue, shuffled BN) with a linear
    projection head ``fc`` (2048 -> 128, kept as ``head_q.0``), τ = 0.07, MoCo v1's augmentation and a step lr
    schedule. The released encoder is the query encoder's backbone.
    """

    Hparams = MoCoV1Hparams
    paper = "Momentum Contrast for Unsupervised Visual Representation Learning (MoCo)"
    arxiv = "1911.05722"
    citation = (
        "@inproceedings{he2020momentum,\n  title={Momentum Contrast for Unsupervised Visual Representation Learning},"
        "\n  author={He, Kaiming and Fan, Haoqi and Wu, Yuxin and Xie, Saining and Girshick, Ross},\n"
        "  booktitle={CVPR},\n  year={2020}\n}"
    )
    released = "query encoder (backbone without the linear projection)"


for _name, _backbone in (("moco_v1_resnet18", "resnet18"), ("moco_v1_resnet50", "resnet50")):
    register_preset(Preset(_name, "moco_v1", _backbone, description=f"MoCo v1 on a timm {_backbone}, 224 px"))

for _name, _backbone in (("moco_v2_resnet18", "resnet18"), ("moco_v2_resnet50", "resnet50")):
    register_preset(Preset(_name, "moco_v2", _backbone, description=f"MoCo v2 on a timm {_backbone}, 224 px"))

register_preset(
    Preset(
        "moco_v2_resnet18_32px",
        "moco_v2",
        "resnet18",
        image_size=32,
        method_kwargs={"queue_size": 4096},
        description="MoCo v2, ResNet-18 for 32 px images (CIFAR-size data): queue 4096 as lightly's CIFAR benchmark",
    )
)

MOCO_RELEASES = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints"
# facebookresearch/moco README ("Models"): full training checkpoints (query and key encoders, heads, queue), ImageNet
# linear top-1 of the released 200 / 800-epoch ResNet-50s; the first tag of a preset is its default.
for _preset, _run, _epochs, _linear in (
    ("moco_v1_resnet50", "moco_v1_200ep", 200, 60.6),
    ("moco_v2_resnet50", "moco_v2_800ep", 800, 71.1),
    ("moco_v2_resnet50", "moco_v2_200ep", 200, 67.7),
):
    register_pretrained(
        PretrainedTag(
            _preset,
            f"in1k_{_epochs}ep",
            url=f"{MOCO_RELEASES}/{_run}/{_run}_pretrain.pth.tar",
            layout="moco",
            license="cc-by-nc-4.0",
            epochs=_epochs,
            metrics={"linear": _linear},
            source="facebookresearch/moco README, Models",
            overrides={"epochs": _epochs},
        )
    )
