"""MoCo v2: momentum contrast with an MLP head and stronger augmentation.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", arXiv 1911.05722 (CVPR 2020);
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297.
Follows facebookresearch/moco (``moco/builder.py``, ``main_moco.py`` with ``--mlp --moco-t 0.2 --aug-plus --cos``).
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
from sslhub.registry import Preset, register_method, register_preset
from sslhub.transforms import two_view_moco_v2


@dataclass
class MoCoV2Hparams(MethodHparams):
    """Defaults of MoCo v2 (arXiv 2003.04297 §2, ``main_moco.py``): SGD lr 0.03 per 256 images, cosine, wd 1e-4."""

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


@register_method("moco_v2")
class MoCoV2(SSLMethod):
    """Query encoder f_q (trained) and key encoder f_k (EMA of f_q, eq. 2: θ_k ← m θ_k + (1-m) θ_q), a queue
    of K past keys as negatives and the InfoNCE loss (eq. 1) with τ = 0.2. Keys are computed with shuffled BN
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
        self.head_q = MLPHead((dim, hp.mlp_hidden_dim or dim, hp.embed_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(hp.queue_size, hp.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def released_backbone(self):
        return self.encoder_q.backbone

    def view_transform(self):
        cfg = self.config
        return two_view_moco_v2(
            cfg.image_size, cfg.image_mean, cfg.image_std, scale=(self.hparams.crop_scale_min, 1.0)
        )

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
            raise ValueError(f"MoCo v2 takes 2 views (query, key), got {len(views)}")
        image_q, image_k = views
        query = F.normalize(self.head_q(self.encoder_q(image_q)), dim=1)
        if self.training:
            self._momentum_update_key_encoder()
        keys = self._encode_keys(image_k)
        loss = info_nce_with_queue(query, keys, self.queue.clone().detach(), self.hparams.temperature)
        if self.training:
            self._dequeue_and_enqueue(keys)
        return MethodOutput(loss)


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
