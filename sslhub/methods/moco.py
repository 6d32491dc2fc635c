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

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import gather_all, shuffle_across_processes, unshuffle_across_processes
from sslhub.heads import MLPHead
from sslhub.losses import info_nce_with_queue
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import MultiView, blur, color_distortion, color_jitter, crop, flip, grayscale, view


@dataclass
class MoCoV2Hparams(MethodHparams):
    """Defaults of MoCo v2 (arXiv 2003.04297 §2, ``main_moco.py``): SGD lr 0.03 per 256 images, cosine, wd 1e-4."""

    optimizer: str = "sgd"
    lr: float = 0.03
    weight_decay: float = 1e-4
    epochs: int = 200
    embed_dim: int = hparam(128, "output dimension of the projection (--moco-dim)")
    mlp_hidden_dim: int | None = hparam(None, "hidden width of the MLP head (None: the backbone's feature width)")
    queue_size: int = hparam(65536, "number of negative keys in the queue K (--moco-k)")
    momentum: float = hparam(0.999, "momentum m of the key encoder update, eq. 2 (--moco-m)")
    temperature: float = hparam(0.2, "softmax temperature τ of the InfoNCE loss, eq. 1 (--moco-t)")
    shuffle_bn: bool = hparam(True, "shuffle the keys across processes before the key encoder (shuffling BN, §3.3)")
    crop_scale_min: float = hparam(0.2, "smallest area fraction of the random resized crop")
    mlp: bool = hparam(True, "2-layer MLP head (--mlp) instead of MoCo v1's linear projection")
    aug_plus: bool = hparam(True, "MoCo v2's augmentation (--aug-plus, with blur) instead of MoCo v1's")


def moco_views(image_size: int, mean, std, scale: tuple[float, float], aug_plus: bool) -> MultiView:
    """``main_moco.py``'s two views, drawn twice. ``aug_plus`` (v2): random resized crop, colour jitter
    0.4/0.4/0.4/0.1 (p=0.8), grayscale (p=0.2), blur (p=0.5), flip. Without (v1): random resized crop, grayscale
    (p=0.2), colour jitter 0.4/0.4/0.4/0.4 (always), flip."""
    if aug_plus:
        pieces = [crop(image_size, scale), color_distortion(strength=0.5), blur(p=0.5), flip()]
    else:
        pieces = [crop(image_size, scale), grayscale(0.2), color_jitter(0.4, 0.4, 0.4, 0.4, p=1.0), flip()]
    one = view(*pieces, mean=mean, std=std)
    return MultiView([one, one])


def _moco_head(fc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v1 ``fc`` = Linear(2048, 128) -> ``MLPHead`` index 0; v2 ``fc.0`` / ``fc.2`` (Linear, ReLU, Linear) keep
    their indices."""
    return {key if key[0].isdigit() else f"0.{key}": value for key, value in fc.items()}


def convert_moco(container, source: str) -> Converted:
    """facebookresearch/moco ``main_moco.py`` (v1, and v2 with ``--mlp``): ``{'epoch', 'arch', 'state_dict',
    'optimizer'}``; ``state_dict`` of DDP(MoCo): ``module.encoder_{q,k}.<torchvision ResNet>`` with the projection
    in ``fc``, ``module.queue`` (dim, K) L2-normalised columns and ``module.queue_ptr`` (1,)."""
    reader = KeyReader(entry(container, "state_dict", source), source)
    encoders = {}
    for name in ("q", "k"):
        encoder = reader.take(f"module.encoder_{name}.")
        if not encoder:
            raise CheckpointError(f"{source}: no 'module.encoder_{name}.' keys: not a MoCo v1/v2 checkpoint")
        head = {key[3:]: value for key, value in encoder.items() if key.startswith("fc.")}
        backbone = {key: value for key, value in encoder.items() if not key.startswith("fc.")}
        encoders[name] = backbone, _moco_head(head)
    queue, pointer = reader.take_one("module.queue"), reader.take_one("module.queue_ptr")
    reader.finish()
    (backbone_q, head_q), (backbone_k, head_k) = encoders["q"], encoders["k"]
    method = {
        **prefixed("head_q.", head_q),
        **prefixed("head_k.", head_k),
        "queue": queue.t().contiguous(),
        "queue_ptr": pointer.reshape(()),
    }
    encoder_copies = {"encoder_q.backbone.": backbone_q, "encoder_k.backbone.": backbone_k}
    overrides = {"embed_dim": queue.shape[0], "queue_size": queue.shape[1]}
    if "2.weight" in head_q:
        overrides["mlp_hidden_dim"] = head_q["0.weight"].shape[0]
    left_out = leftover_entries(container, {"state_dict"})
    return Converted("moco", backbone_q, method, encoder_copies, overrides, left_out)


def _is_moco(container) -> bool:
    state = container.get("state_dict")
    return isinstance(state, dict) and any(key.startswith("module.encoder_q.") for key in state)


MOCO_LAYOUT = CheckpointLayout("moco", _is_moco, convert_moco)


@register_method("moco_v2")
class MoCoV2(SSLMethod):
    """Query encoder f_q (trained) and key encoder f_k (EMA of f_q, eq. 2: θ_k ← m θ_k + (1-m) θ_q), a queue
    of K past keys as negatives and the InfoNCE loss (eq. 1) with τ = 0.2 (v1: 0.07). Keys are computed with shuffled BN
    across processes. The released encoder is the query encoder's backbone.

    The key encoder is updated by the trainer once per optimizer step, after it (``momentum_pairs``); the official
    code updates it at the start of the next forward pass, which is the same sequence of encoders.
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
    # facebookresearch/moco main_lincls.py: SGD lr 30 (batch 256), no weight decay, 100 epochs
    linear_recipe = LinearRecipe("facebookresearch/moco main_lincls.py", 30.0, 100, 256)
    checkpoint_layouts = (MOCO_LAYOUT,)
    tiny_preset = "moco_v2_resnet18_32px"
    tiny_overrides = {"queue_size": 64}

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder_q = self.build_encoder(config)
        dim = self.encoder_q.num_features
        self.head_q = MLPHead((dim, hp.mlp_hidden_dim or dim, hp.embed_dim) if hp.mlp else (dim, hp.embed_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(hp.queue_size, hp.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def released_encoder(self):
        return self.encoder_q

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        return moco_views(cfg.image_size, cfg.image_mean, cfg.image_std, (hp.crop_scale_min, 1.0), hp.aug_plus)

    def momentum_pairs(self):
        return [(self.encoder_q, self.encoder_k), (self.head_q, self.head_k)]

    def momentum_at(self, progress: TrainingProgress) -> float:
        return self.hparams.momentum

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

    def forward(self, batch: Batch) -> MethodOutput:
        if len(batch.views) != 2:
            raise ValueError(f"MoCo takes 2 views (query, key), got {len(batch.views)}")
        image_q, image_k = batch.views
        query = F.normalize(self.head_q(self.encoder_q(image_q)), dim=1)
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
    tiny_preset = "moco_v1_resnet18_32px"


for _name, _backbone in (("moco_v1_resnet18", "resnet18"), ("moco_v1_resnet50", "resnet50")):
    register_preset(Preset(_name, "moco_v1", _backbone, description=f"MoCo v1 on a timm {_backbone}, 224 px"))

register_preset(
    Preset(
        "moco_v1_resnet18_32px",
        "moco_v1",
        "resnet18",
        image_size=32,
        method_kwargs={"queue_size": 4096},
        description="MoCo v1, ResNet-18 for 32 px images (CIFAR-size data): queue 4096 as MoCo v2's 32 px preset",
    )
)

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
