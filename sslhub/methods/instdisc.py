"""InstDisc: instance discrimination with a non-parametric softmax over a memory bank, approximated by NCE.

Wu, Xiong, Yu & Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", arXiv 1805.01978
(CVPR 2018). Follows zhirongw/lemniscate.pytorch (``main.py``, ``cifar.py``, ``lib/NCEAverage.py``,
``lib/LinearAverage.py``, ``lib/NCECriterion.py``, ``models/resnet.py``).

Deviations from the official code: the noise indices come from a generator seeded by the training step (so every
process and a resumed run draw the same ones) instead of the global CUDA RNG; under several processes the
normalisation constant Z is the mean over the processes' first batches (the official code runs one process).
Conversion of the authors' release (``convert_lemniscate``): the memory bank stored in the file is not converted
(``task="pretraining"`` starts with an empty bank sized for its own training set and re-estimates Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import mean_over_processes
from sslhub.losses import nce_loss
from sslhub.memory_bank import bind_banks, initial_bank, momentum_update, noise_indices
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import (
    BILINEAR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    MultiView,
    color_jitter,
    crop,
    flip,
    grayscale,
    view,
)

OBJECTIVES = ("nce", "softmax")


@dataclass
class InstDiscHparams(MethodHparams):
    """Defaults of ``main.py`` (ImageNet): SGD lr 0.03 per 256 images, momentum 0.9, weight decay 1e-4, 200 epochs,
    lr x0.1 at epochs 120 and 160 (``adjust_learning_rate``); 128-d embedding, τ = 0.07 (``--nce-t``), K = 4096 noise
    samples (``--nce-k``), bank momentum 0.5 (``--nce-m``)."""

    optimizer: str = "sgd"
    lr: float = 0.03
    weight_decay: float = 1e-4
    epochs: int = 200
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (120, 160)
    objective: str = hparam("nce", "'nce' (NCE with nce_k uniform noise samples, eq. 5-7) or 'softmax' (eq. 2)")
    dim: int = hparam(128, "dimension of the L2-normalised embedding and of the memory bank (--low-dim)")
    temperature: float = hparam(0.07, "temperature τ of the non-parametric softmax (--nce-t)")
    nce_k: int = hparam(4096, "noise samples per image of the NCE approximation (--nce-k)")
    bank_momentum: float = hparam(0.5, "momentum of the memory bank update (--nce-m)")
    num_samples: int = hparam(0, "rows of the memory bank = training images (0: set by the trainer, bind_dataset)")
    noise_seed: int = hparam(0, "seed of the noise-index generator (mixed with the step; equal on every process)")
    crop_scale_min: float = hparam(0.2, "smallest area fraction of the random resized crop")
    flip: bool = hparam(True, "random horizontal flip (main.py; cifar.py leaves it out)")

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: expected one of {OBJECTIVES}")
        if self.num_samples < 0 or self.nce_k < 1:
            raise ValueError(f"num_samples {self.num_samples} must be >= 0 and nce_k {self.nce_k} >= 1")


def convert_lemniscate(container, source: str) -> Converted:
    """zhirongw/lemniscate.pytorch ``main.py``'s ``save_checkpoint``: ``{'epoch', 'arch', 'state_dict', 'lemniscate',
    'best_prec1', 'optimizer'}``; ``state_dict`` of DataParallel(``models/resnet.py``): ``module.`` + torchvision
    ResNet names (the names of timm's ResNet) with ``fc`` = Linear(feat, low_dim), the embedding head (``head``
    here). ``lemniscate`` is the pickled ``NCEAverage`` module (read as an inert stand-in): its ``params`` buffer
    [K, τ, Z, momentum] gives the NCE hyperparameters. Its ``memory`` buffer (one row per ImageNet training image,
    in the order of the authors' ``ImageFolderInstance``) is not converted: ``task="pretraining"`` gets the fc head
    and an empty bank (``num_samples=0``) that the trainer sizes for its own training set, and Z is re-estimated."""
    reader = KeyReader(entry(container, "state_dict", source), source)
    state = reader.take("module.") or reader.take("")
    reader.finish()
    head = {key[len("fc.") :]: value for key, value in state.items() if key.startswith("fc.")}
    backbone = {key: value for key, value in state.items() if not key.startswith("fc.")}
    if "weight" not in head or head["weight"].ndim != 2:
        raise CheckpointError(f"{source}: no 2-d 'module.fc.weight' (the embedding head): not a lemniscate checkpoint")
    dim = head["weight"].shape[0]
    overrides = {"dim": dim, "objective": "nce"}
    params = getattr(container.get("lemniscate"), "_buffers", {}).get("params")
    if params is not None:
        if params.numel() != 4:
            raise CheckpointError(f"{source}: lemniscate.params has {params.numel()} values, expected [K, T, Z, m]")
        k, temperature, _, momentum = params.tolist()
        overrides |= {"nce_k": int(k), "temperature": temperature, "bank_momentum": momentum}
    method = {f"head.{key}": value for key, value in head.items()}
    method |= {"memory": initial_bank(0, dim), "nce_z": torch.tensor(-1.0), "nce_step": torch.tensor(0)}
    left_out = leftover_entries(container, {"state_dict", "lemniscate"})
    left_out.append("lemniscate (memory bank not converted; params read as hyperparameters)")
    return Converted("instdisc", backbone, method, {"encoder.backbone.": backbone}, overrides, sorted(left_out))


def _is_lemniscate(container) -> bool:
    state = container.get("state_dict") if isinstance(container, dict) else None
    if not isinstance(state, dict):
        return False
    fc = state.get("module.fc.weight")
    if not torch.is_tensor(fc) or fc.ndim != 2 or any(key.startswith("module.encoder") for key in state):
        return False
    return "lemniscate" in container or ("arch" in container and fc.shape[0] == 128)


LEMNISCATE_LAYOUT = CheckpointLayout("instdisc", _is_lemniscate, convert_lemniscate)


@register_method("instdisc")
class InstDisc(SSLMethod):
    """f = normalise(fc(backbone(x))), one view per image (``main.py``'s single ``transform``). With the memory bank
    V = {v_i}: P(i|f) = exp(v_i·f/τ) / Z_i (eq. 2). ``objective="softmax"``: cross-entropy of the index over all N
    rows (``LinearAverage``); ``objective="nce"``: the positive row and K rows drawn uniformly, divided by the
    constant Z = N · mean exp(v·f/τ) estimated on the first batch and then fixed (eq. 6, ``NCEAverage``), with
    ``sslhub.losses.nce_loss`` (eq. 5-7, P_n = 1/N). After the loss the batch's rows are updated as
    v_i ← normalise(0.5 v_i + 0.5 f_i) (eq. 8, ``sslhub.memory_bank``).

    ``SSLModel``'s ``pooler_output`` is the backbone's pooled feature (what the paper's linear classifiers read);
    the authors' kNN feature, the 128-d normalised embedding, is ``embed(images)``. The released encoder is the
    backbone; the fc head is the method's ``head``.
    """

    Hparams = InstDiscHparams
    paper = "Unsupervised Feature Learning via Non-Parametric Instance Discrimination (InstDisc / NPID)"
    arxiv = "1805.01978"
    citation = (
        "@InProceedings{wu2018unsupervised,\n  author    = {Zhirong Wu and Yuanjun Xiong and Stella X. Yu and "
        "Dahua Lin},\n  title     = {Unsupervised Feature Learning via Non-Parametric Instance Discrimination},\n"
        "  booktitle = {CVPR},\n  year      = {2018},\n}"
    )
    released = "encoder backbone (pooler_output: the pooled backbone feature; the 128-d kNN embedding is embed())"
    # lemniscate.pytorch ships no linear-evaluation script (the paper trains linear classifiers on conv features).
    linear_recipe = LinearRecipe("sslhub linear protocol (lemniscate.pytorch has no linear script)", 0.1, 100, 256)
    replicated_buffers = ("memory", "nce_z", "nce_step")
    checkpoint_layouts = (LEMNISCATE_LAYOUT,)
    tiny_preset = "instdisc_resnet18_32px"
    tiny_overrides = {"dim": 16, "nce_k": 8, "num_samples": 64}

    # Evaluation: ``main.py``'s validation pre-processing: bilinear resize of the short side to 256, centre crop 224,
    # ImageNet normalisation (images of 64 px or less are not cropped, as sslhub's default).
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        self.head = nn.Linear(self.encoder.num_features, hp.dim)  # models/resnet.py: fc = Linear(feat, low_dim)
        self.register_buffer("memory", initial_bank(hp.num_samples, hp.dim))
        self.register_buffer("nce_z", torch.tensor(-1.0))  # NCEAverage's params[2]: < 0 until estimated
        self.register_buffer("nce_step", torch.tensor(0, dtype=torch.long))

    def bind_dataset(self, num_samples: int) -> None:
        """Allocate the bank for ``num_samples`` images (``sslhub.memory_bank.bind_banks``)."""
        bind_banks(self, num_samples, ["memory"])

    def view_recipe(self):
        """``main.py``'s transform: random resized crop (scale 0.2-1), grayscale p = 0.2, colour jitter 0.4 (also
        hue) always, horizontal flip, normalisation."""
        cfg, hp = self.config, self.hparams
        pieces = [crop(cfg.image_size, (hp.crop_scale_min, 1.0)), grayscale(0.2), color_jitter(0.4, 0.4, 0.4, 0.4, 1)]
        if hp.flip:
            pieces.append(flip())
        return MultiView([view(*pieces, mean=cfg.image_mean, std=cfg.image_std)])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The authors' feature (``models/resnet.py`` + ``Normalize``): the L2-normalised 128-d embedding."""
        return F.normalize(self.head(self.encoder(images)), dim=1)

    def forward(self, batch: Batch) -> MethodOutput:
        hp = self.hparams
        if len(batch.views) != 1:
            raise ValueError(f"InstDisc takes 1 view, got {len(batch.views)}")
        if self.memory.shape[0] == 0:
            raise ValueError("InstDisc's memory bank is empty: set num_samples or train with the Pretrainer")
        features = self.embed(batch.views[0])
        index = batch.index.to(features.device)
        num_samples = self.memory.shape[0]
        bank = self.memory.to(features.dtype)
        if hp.objective == "softmax":  # LinearAverage + CrossEntropyLoss
            loss = F.cross_entropy(features @ bank.t() / hp.temperature, index)
        else:  # NCEAverage + NCECriterion
            noise = noise_indices(num_samples, len(index), hp.nce_k, int(self.nce_step), hp.noise_seed, index.device)
            rows = bank[torch.cat([index[:, None], noise], dim=1)]  # (B, 1 + K, dim), the positive first
            similarity = torch.exp(torch.einsum("bkd,bd->bk", rows, features) / hp.temperature)
            if self.nce_z < 0:
                self.nce_z.fill_(mean_over_processes(similarity.detach().mean()) * num_samples)
            loss = nce_loss(similarity / self.nce_z, 1.0 / num_samples)
        if self.training:
            momentum_update(self.memory, features, index, hp.bank_momentum)
            self.nce_step += 1
        return MethodOutput(loss, {"nce_z": float(self.nce_z)} if hp.objective == "nce" else {})


for _name, _backbone in (("instdisc_resnet18", "resnet18"), ("instdisc_resnet50", "resnet50")):
    register_preset(
        Preset(
            _name,
            "instdisc",
            _backbone,
            description=f"InstDisc on a timm {_backbone}, 224 px: main.py, NCE K 4096, τ 0.07, SGD lr 0.03, "
            "steps at 120/160 of 200 epochs",
        )
    )

# cifar.py: ResNet-18 (low_dim 128), NCE K 4096, τ 0.1, bank momentum 0.5, SGD lr 0.1 at batch 128, momentum 0.9,
# wd 5e-4, 200 epochs with a constant lr (its adjust_learning_rate is commented out), no flip, CIFAR mean/std.
register_preset(
    Preset(
        "instdisc_resnet18_32px",
        "instdisc",
        "resnet18",
        image_size=32,
        image_mean=CIFAR10_MEAN,
        image_std=CIFAR10_STD,
        method_kwargs={
            "lr": 0.1,
            "lr_batch_size": 128,
            "weight_decay": 5e-4,
            "lr_milestones": (),
            "temperature": 0.1,
            "flip": False,
        },
        description="InstDisc, ResNet-18 for 32 px images: cifar.py (NCE K 4096, τ 0.1, lr 0.1 per 128, wd 5e-4, "
        "constant lr, 200 epochs, no flip)",
    )
)

# zhirongw/lemniscate.pytorch README ("Oldies": ResNet-50 with 4096 negatives and the NCE loss; the tarball holds the
# weights and the memory bank): top-1 nearest-neighbour accuracy on ImageNet val with the 128-d normalised embedding
# (``embed``, not ``pooler_output``). No linear number is stated for this file (the paper's linear results are on
# conv features of its own runs; the README's 58.5 % linear belongs to the "updated" softmax-CE model).
register_pretrained(
    PretrainedTag(
        "instdisc_resnet50",
        "in1k",
        url="https://frontiers.blob.core.windows.net/pretraining/checkpoints/pil_pretrained_models/lemniscate/"
        "lemniscate_resnet50.pth",
        layout="instdisc",
        license="unknown",
        epochs=None,
        metrics={"knn": 46.8},
        source="zhirongw/lemniscate.pytorch README, Pretrained Model (Oldies, ResNet 50); knn = top-1 nearest "
        "neighbour of the 128-d L2-normalised embedding (the method's embed), pooler_output is the 2048-d pooled "
        "backbone; the repository has no licence file",
    )
)
