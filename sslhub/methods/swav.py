"""SwAV: swapping assignments between multi-crop views, with online Sinkhorn-Knopp clustering.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", arXiv 2006.09882
(NeurIPS 2020). Follows facebookresearch/swav (``main_swav.py``, ``src/resnet50.py``, ``src/multicropdataset.py``,
``eval_linear.py``, ``hubconf.py``, ``scripts/swav_*_pretrain.sh``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslhub.backbones import forward_by_resolution
from sslhub.batch import Batch
from sslhub.conversion.keys import (
    CheckpointLayout,
    Converted,
    KeyReader,
    leftover_entries,
    prefixed,
    strip_module,
)
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import world_size
from sslhub.heads import MLPHead
from sslhub.losses import sinkhorn_knopp, swapped_prediction
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, MultiView, blur, color_distortion, crop, flip, view

SWAV_MEAN = (0.485, 0.456, 0.406)
SWAV_STD = (0.228, 0.224, 0.225)  # src/multicropdataset.py and eval_linear.py: 0.228, not ImageNet's 0.229
OFFICIAL_SIZES = (224, 96)  # --size_crops of the multi-crop scripts, scaled to the image size when not given


@dataclass
class SwAVHparams(MethodHparams):
    """Defaults of ``scripts/swav_800ep_pretrain.sh`` (batch 4096 = 64 GPUs x 64): multi-crop 2 x 224 (scale
    0.14-1) + 6 x 96 (0.05-0.14), projection 2048 -> 2048 -> 128, 3000 prototypes, τ = 0.1, Sinkhorn-Knopp with
    ε = 0.05 and 3 iterations (eq. 3), codes of crops 0 and 1, no queue, prototypes frozen for the first epoch
    (``--freeze_prototypes_niters 313``), LARC (apex, ``clip=False``) around SGD with momentum 0.9 and wd 1e-6 on
    every tensor, lr 4.8 at batch 4096 warmed up linearly for 10 epochs from 0.3 (``--start_warmup``), then a
    cosine to 0.0048 (``--final_lr``), 800 epochs, synchronised BatchNorm.

    Deviations from the official code: the trainer scales ``lr`` linearly with the batch size (``main_swav.py``
    takes ``--base_lr`` as is; at batch 4096 they agree); the warm-up reaches the peak one step after
    ``np.linspace``'s last point; ``freeze_prototypes_epochs`` counts epochs (313 iterations at batch 4096 and 5005
    at batch 256 are one ImageNet epoch plus one step); BatchNorm is synchronised over all processes (the 4096
    scripts use apex SyncBN in groups of 8 GPUs, the bs256 scripts PyTorch's global SyncBN); the
    queue is kept in the first ``queue_length // world_size`` rows of a buffer of ``queue_length`` rows, so that its
    shape does not depend on the number of processes.
    """

    optimizer: str = "larc"
    lr: float = 4.8
    lr_batch_size: int = 4096
    min_lr_ratio: float = 0.001
    warmup_epochs: float = 10
    warmup_start_ratio: float = 0.0625
    weight_decay: float = 1e-6
    epochs: int = 800
    sync_batch_norm: bool = True  # main_swav.py --sync_bn (apex in groups of 8 for batch 4096, pytorch for 256)
    nmb_crops: tuple[int, ...] = hparam((2, 6), "number of crops of each resolution (--nmb_crops)")
    size_crops: tuple[int, ...] | None = hparam(
        None, "side of the crops of each resolution (--size_crops; None: 224 and 96 scaled to the image size)"
    )
    min_scale_crops: tuple[float, ...] = hparam((0.14, 0.05), "smallest crop area fraction (--min_scale_crops)")
    max_scale_crops: tuple[float, ...] = hparam((1.0, 0.14), "largest crop area fraction (--max_scale_crops)")
    blur_p: float = hparam(0.5, "probability of the Gaussian blur of every crop (PILRandomGaussianBlur)")
    crops_for_assign: tuple[int, ...] = hparam((0, 1), "crops whose Sinkhorn codes are predicted (--crops_for_assign)")
    temperature: float = hparam(0.1, "softmax temperature τ of the swapped prediction, eq. 2 (--temperature)")
    epsilon: float = hparam(0.05, "entropy regularisation ε of the Sinkhorn-Knopp codes, eq. 3 (--epsilon)")
    sinkhorn_iterations: int = hparam(3, "Sinkhorn-Knopp iterations (--sinkhorn_iterations)")
    feat_dim: int = hparam(128, "dimension of the projected, L2-normalised embedding z (--feat_dim)")
    hidden_mlp: int = hparam(2048, "hidden width of the projection head, 0: one linear layer (--hidden_mlp)")
    nmb_prototypes: int = hparam(3000, "number of prototypes K (--nmb_prototypes)")
    queue_length: int = hparam(0, "embeddings kept from earlier batches for the codes, over all processes (0: none)")
    epoch_queue_starts: int = hparam(15, "epoch from which the queue is filled and used (--epoch_queue_starts)")
    freeze_prototypes_epochs: float = hparam(1.0, "epochs at the start during which the prototypes are not updated")

    def __post_init__(self):
        super().__post_init__()
        groups = len(self.nmb_crops)
        sizes = () if self.size_crops is None else tuple(self.size_crops)
        if len(self.min_scale_crops) != groups or len(self.max_scale_crops) != groups or len(sizes) not in (0, groups):
            raise ValueError(
                f"nmb_crops {list(self.nmb_crops)}, size_crops {self.size_crops}, min_scale_crops "
                f"{list(self.min_scale_crops)} and max_scale_crops {list(self.max_scale_crops)} need one entry per "
                "resolution"
            )
        crops = sum(self.nmb_crops)
        if crops < 2 or not self.crops_for_assign or any(not 0 <= c < crops for c in self.crops_for_assign):
            raise ValueError(f"crops_for_assign {list(self.crops_for_assign)} must name some of the {crops} crops")


def crop_sizes(hp: SwAVHparams, image_size: int) -> list[int]:
    """``size_crops``, else 224 / 96 of the scripts scaled to ``image_size`` (one size per resolution)."""
    if hp.size_crops is not None:
        return [int(size) for size in hp.size_crops]
    if len(hp.nmb_crops) > len(OFFICIAL_SIZES):
        raise ValueError(f"{len(hp.nmb_crops)} crop resolutions: give size_crops")
    return [max(1, round(size * image_size / OFFICIAL_SIZES[0])) for size in OFFICIAL_SIZES[: len(hp.nmb_crops)]]


def swav_views(hp: SwAVHparams, image_size: int, mean: Sequence[float], std: Sequence[float]) -> MultiView:
    """``MultiCropDataset``: for each resolution, ``nmb_crops`` independent crops = random resized crop of that size
    and scale range (bilinear), flip, colour distortion of strength 1 (jitter 0.8/0.8/0.8/0.2 with p=0.8, grayscale
    p=0.2), Gaussian blur σ ~ U[0.1, 2] with p=0.5, normalised with SwAV's mean / std; crops in resolution order."""
    transforms = []
    for count, size, low, high in zip(
        hp.nmb_crops, crop_sizes(hp, image_size), hp.min_scale_crops, hp.max_scale_crops, strict=True
    ):
        one = view(
            crop(size, (low, high)),
            flip(),
            color_distortion(strength=1.0),
            *([blur(p=hp.blur_p)] if hp.blur_p > 0 else []),
            mean=mean,
            std=std,
        )
        transforms += [one] * count
    return MultiView(transforms)


# ---- the authors' files -------------------------------------------------------------------------------------------
def _swav_state(container):
    """The model state of a SwAV file: the released ``*_pretrain.pth.tar`` is the state dict itself, a
    ``main_swav.py`` checkpoint keeps it under ``'state_dict'``."""
    state = container.get("state_dict", container) if isinstance(container, dict) else None
    return state if isinstance(state, dict) else None


def convert_swav(container, source: str) -> Converted:
    """facebookresearch/swav ``src/resnet50.py`` under DDP: ``module.<torchvision ResNet-50 names>`` (no ``fc``;
    conv1 padding 2 after a ``ConstantPad2d(1)``, which is torchvision's padding 3, no parameters),
    ``module.projection_head.{0,1,3}`` (Linear with bias, BN, ReLU, Linear with bias; one Linear when
    ``--hidden_mlp 0``) and ``module.prototypes.weight`` (K, feat_dim). The releases are this state dict alone
    (``hubconf.py`` strips ``module.`` and loads it into torchvision's ResNet-50); ``main_swav.py``'s
    ``checkpoint.pth.tar`` wraps it as ``{'epoch', 'state_dict', 'optimizer', 'amp'}``. The queue is never in it
    (``queue{rank}.pth``)."""
    wrapped = "state_dict" in container
    reader = KeyReader(strip_module(_swav_state(container)), source)
    head = reader.take("projection_head.")
    prototypes = reader.take("prototypes.")
    if set(prototypes) != {"weight"}:
        raise CheckpointError(f"{source}: expected one 'prototypes.weight', got prototypes.{sorted(prototypes)}")
    backbone = reader.take("")
    reader.finish()
    if "weight" in head:  # --hidden_mlp 0: projection_head = nn.Linear
        head = prefixed("0.", head)
    linear = sorted(int(key.split(".")[0]) for key in head if key.endswith(".weight") and head[key].ndim == 2)
    method = {**prefixed("projection_head.", head), "prototypes.weight": prototypes["weight"]}
    overrides = {
        "hidden_mlp": head["0.weight"].shape[0] if len(linear) > 1 else 0,
        "feat_dim": prototypes["weight"].shape[1],
        "nmb_prototypes": prototypes["weight"].shape[0],
    }
    left_out = leftover_entries(container, {"state_dict"}) if wrapped else []
    return Converted("swav", backbone, method, {"encoder.backbone.": backbone}, overrides, left_out)


def _is_swav(container) -> bool:
    state = _swav_state(container)
    return state is not None and any(key.removeprefix("module.") == "prototypes.weight" for key in state)


SWAV_LAYOUT = CheckpointLayout("swav", _is_swav, convert_swav)


@register_method("swav")
class SwAV(SSLMethod):
    """Encoder f (ResNet, average-pooled), projection head g (Linear-BN-ReLU-Linear) and prototypes C (K x d, rows
    L2-normalised before every training forward). Every crop's embedding z = g(f(x)) / ||g(f(x))|| is scored
    against the prototypes; for each crop of ``crops_for_assign`` the codes q are Sinkhorn-Knopp over the scores of
    the (all-process) batch, optionally preceded by the queue's scores (eq. 3), and every other crop predicts them
    with a softmax at temperature τ (swapped prediction, eq. 1-2). Crops of one resolution go through the encoder as
    one batch, and the projection head sees all crops together (``ResNet.forward``). The released encoder is the
    ResNet without the projection head and prototypes.

    The queue (``queue_length`` > 0, from epoch ``epoch_queue_starts``) holds this process's latest
    ``queue_length // world_size`` embeddings of each assigned crop; its scores are used once it is full. It is a
    per-process buffer of world-size-independent shape (crops x queue_length x feat_dim, of which the first
    ``queue_length // world_size`` rows are used), saved in each process's checkpoint file and not in the model's
    state dict (the authors save it as ``queue{rank}.pth``, apart from the model).
    """

    Hparams = SwAVHparams
    paper = "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments (SwAV)"
    arxiv = "2006.09882"
    citation = (
        "@inproceedings{caron2020unsupervised,\n  title={Unsupervised Learning of Visual Features by Contrasting "
        "Cluster Assignments},\n  author={Caron, Mathilde and Misra, Ishan and Mairal, Julien and Goyal, Priya and "
        "Bojanowski, Piotr and Joulin, Armand},\n  booktitle={NeurIPS},\n  year={2020}\n}"
    )
    released = "ResNet encoder (without the projection head and prototypes)"
    # facebookresearch/swav eval_linear.py: SGD lr 0.3 (batch 32 x 8 GPUs), wd 1e-6, cosine to 0, 100 epochs
    linear_recipe = LinearRecipe("facebookresearch/swav eval_linear.py", 0.3, 100, 256, weight_decay=1e-6)
    checkpoint_layouts = (SWAV_LAYOUT,)
    per_process_buffers = ("queue",)
    tiny_preset = "swav_resnet18_32px"
    tiny_overrides = {
        "hidden_mlp": 64,
        "feat_dim": 32,
        "nmb_prototypes": 32,
        "nmb_crops": (2, 2),
        "size_crops": (32, 16),
        "min_scale_crops": (0.14, 0.05),
        "max_scale_crops": (1.0, 0.14),
    }

    # Evaluation: ``eval_linear.py``: ``Resize(256)`` (bilinear) of the short side, ``CenterCrop(224)``, normalise;
    # the same ratio at other sizes (no crop at 64 px or less).
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        hidden = (hp.hidden_mlp,) if hp.hidden_mlp else ()  # --hidden_mlp 0: one linear layer
        dims = (self.encoder.num_features, *hidden, hp.feat_dim)
        self.projection_head = MLPHead(dims, batch_norm=True, hidden_bias=True)
        self.prototypes = nn.Linear(hp.feat_dim, hp.nmb_prototypes, bias=False)
        queue = torch.zeros(len(hp.crops_for_assign), hp.queue_length, hp.feat_dim)
        self.register_buffer("queue", queue, persistent=False)
        self.epoch = 0
        self._queue_checked = False

    @property
    def num_crops(self) -> int:
        return sum(self.hparams.nmb_crops)

    def view_recipe(self):
        cfg = self.config
        return swav_views(self.hparams, cfg.image_size, cfg.image_mean, cfg.image_std)

    def on_step_start(self, progress: TrainingProgress) -> None:
        self.epoch = progress.epoch
        self._clear_queue_once(resumed=progress.step > 0)

    @torch.no_grad()
    def _clear_queue_once(self, resumed: bool = False) -> None:
        """Empty the queue before its first use unless a resumed run restored it. The queue is no part of the model's
        files (as in ``main_swav.py``): transformers' ``from_pretrained`` materialises such a buffer uninitialised,
        and a run starting at step 0 starts with an empty queue, as the official one does."""
        if not self._queue_checked:
            if not resumed:
                self.queue.zero_()
            self._queue_checked = True

    def freeze_prototypes_steps(self, progress: TrainingProgress) -> int:
        return round(self.hparams.freeze_prototypes_epochs * progress.steps_per_epoch)

    def on_before_optimizer_step(self, progress: TrainingProgress) -> None:
        """``main_swav.py``: the prototypes' gradients are dropped (``p.grad = None``: no momentum, no decay) while
        the iteration is below ``freeze_prototypes_niters``, here ``freeze_prototypes_epochs`` epochs."""
        if progress.step < self.freeze_prototypes_steps(progress):
            self.prototypes.weight.grad = None
        super().on_before_optimizer_step(progress)

    def queue_rows(self, batch_size: int) -> int:
        """Rows of the queue this process uses: ``queue_length`` rounded down to a multiple of the global batch
        (``args.queue_length -= args.queue_length % (batch_size * world_size)``), divided among the processes; 0
        when the queue is off (not training, ``queue_length`` 0, or before ``epoch_queue_starts``)."""
        hp, processes = self.hparams, world_size()
        if not self.training or self.epoch < hp.epoch_queue_starts:
            return 0
        return (hp.queue_length - hp.queue_length % (batch_size * processes)) // processes

    @torch.no_grad()
    def _codes(self, index: int, scores: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Sinkhorn-Knopp codes of one crop's batch; with a full queue the queue's scores are put first. The queue
        then moves down by one batch and takes this batch's embeddings at its front."""
        batch_size = scores.shape[0]
        rows = self.queue_rows(batch_size)
        scores = scores.detach()
        if rows:
            self._clear_queue_once()
            queue = self.queue[index, :rows]
            if not torch.all(queue[-1] == 0):  # full: its last row has been written
                scores = torch.cat(((queue @ self.prototypes.weight.t().to(queue.dtype)).float(), scores.float()))
            queue[batch_size:] = queue[:-batch_size].clone()
            queue[:batch_size] = embedding.to(queue.dtype)
        return sinkhorn_knopp(scores, self.hparams.epsilon, self.hparams.sinkhorn_iterations)[-batch_size:]

    def forward(self, batch: Batch) -> MethodOutput:
        hp, views = self.hparams, batch.views
        if len(views) != self.num_crops:
            raise ValueError(f"SwAV takes {self.num_crops} crops (nmb_crops {list(hp.nmb_crops)}), got {len(views)}")
        if self.training:  # main_swav.py: the prototypes are L2-normalised in place before each forward
            with torch.no_grad():
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        embedding = F.normalize(self.projection_head(forward_by_resolution(self.encoder, views)), dim=1)
        batch_size = views[0].shape[0]
        scores = list(self.prototypes(embedding).split(batch_size))
        embeddings = embedding.detach().split(batch_size)
        codes = [self._codes(i, scores[crop], embeddings[crop]) for i, crop in enumerate(hp.crops_for_assign)]
        return MethodOutput(swapped_prediction(scores, codes, hp.temperature, hp.crops_for_assign))


# src/resnet50.py initialises as timm does (Kaiming fan-out convolutions, BN 1 / 0) but with zero_init_residual=False:
# the last BN of each residual branch starts at 1, not at timm's 0
for _name, _backbone in (("swav_resnet18", "resnet18"), ("swav_resnet50", "resnet50")):
    register_preset(
        Preset(
            _name,
            "swav",
            _backbone,
            backbone_kwargs={"zero_init_last": False},
            image_std=SWAV_STD,
            description=f"SwAV on a timm {_backbone}, swav_800ep_pretrain.sh recipe: 2x224 + 6x96 crops, LARC lr 4.8 "
            "at batch 4096, 3000 prototypes",
        )
    )

# solo-learn scripts/pretrain/cifar/swav.yaml (+ augmentations/symmetric.yaml): ResNet-18, two 32 px crops of scale
# 0.08-1 (no small crops), blur p 0.5, queue 3840 from epoch 50, prototypes frozen for 2 epochs, 1000 epochs with 10
# warm-up epochs, lr 0.6 per 256 images; the official bs256 recipe's LARC (solo-learn uses its LARS, η 0.02, clipped).
# The ResNet-18 keeps timm's zero-initialised last BatchNorm γ, as every sslhub 32 px preset: without it a random
# ResNet-18 is already a 0.92 kNN feature on the built-in digits that 110 steps lower to 0.81 (with it: 0.19 -> 0.66),
# measured 2026-12-02.
CIFAR_RECIPE = {
    "nmb_crops": (2,),
    "size_crops": (32,),
    "min_scale_crops": (0.08,),
    "max_scale_crops": (1.0,),
    "queue_length": 3840,
    "epoch_queue_starts": 50,
    "freeze_prototypes_epochs": 2.0,
    "lr": 0.6,
    "lr_batch_size": 256,
    "warmup_start_ratio": 0.0,
    "epochs": 1000,
}
register_preset(
    Preset(
        "swav_resnet18_32px",
        "swav",
        "resnet18",
        image_size=32,
        image_std=SWAV_STD,
        method_kwargs=CIFAR_RECIPE,
        description="SwAV, ResNet-18 for 32 px images: solo-learn's CIFAR recipe (2x32 crops, queue 3840 from epoch "
        "50, prototypes frozen 2 epochs, lr 0.6 per 256)",
    )
)

SWAV_RELEASES = "https://dl.fbaipublicfiles.com/deepcluster"
SMALL_BATCH = {  # scripts/swav_{200,400}ep_bs256_pretrain.sh: batch 256 (4 GPUs x 64), no warm-up, a queue
    "lr": 0.6,
    "lr_batch_size": 256,
    "warmup_epochs": 0,
    "queue_length": 3840,
    "epoch_queue_starts": 15,
}
TWO_CROPS = {"nmb_crops": (2,), "size_crops": (224,), "min_scale_crops": (0.08,), "max_scale_crops": (1.0,)}
# facebookresearch/swav README ("Model Zoo"): ResNet-50 state dicts (with projection head and prototypes), ImageNet
# linear top-1; each tag's recipe from its script. The first tag is the preset's default (hubconf.py's resnet50).
for _run, _tag, _epochs, _linear, _recipe in (
    ("swav_800ep_pretrain", "in1k_800ep", 800, 75.3, {}),
    ("swav_400ep_pretrain", "in1k_400ep", 400, 74.6, {}),
    ("swav_200ep_pretrain", "in1k_200ep", 200, 73.9, {}),
    ("swav_100ep_pretrain", "in1k_100ep", 100, 72.1, {}),
    ("swav_400ep_bs256_pretrain", "in1k_400ep_bs256", 400, 74.3, SMALL_BATCH),
    ("swav_200ep_bs256_pretrain", "in1k_200ep_bs256", 200, 72.7, SMALL_BATCH),
    ("swav_400ep_2x224_pretrain", "in1k_400ep_2x224", 400, 70.1, TWO_CROPS),
):
    register_pretrained(
        PretrainedTag(
            "swav_resnet50",
            _tag,
            url=f"{SWAV_RELEASES}/{_run}.pth.tar",
            layout="swav",
            license="cc-by-nc-4.0",
            epochs=_epochs,
            metrics={"linear": _linear},
            source=f"facebookresearch/swav README, Model Zoo (scripts/{_run}.sh)",
            overrides={"epochs": _epochs, **_recipe},
        )
    )
