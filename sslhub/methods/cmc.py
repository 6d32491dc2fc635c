"""CMC: contrastive multiview coding, with the L and ab channels of L*a*b* images as two views.

Tian, Krishnan & Isola, "Contrastive Multiview Coding", arXiv 1906.05849 (ECCV 2020). Follows HobbitLong/CMC
(``train_CMC.py``, ``models/resnet.py``, ``NCE/NCEAverage.py``, ``NCE/NCECriterion.py``, ``LinearProbing.py``).

Two encoders, f_L on the L channel and f_ab on the ab channels (``ResNetV1/V2/V3``: two ResNets of width 0.5, 1 or 2
whose stem stays 64 channels), each with a 128-d linear embedding, L2-normalised. Each view is contrasted against a
memory bank of the other view (eq. 2-3, 8): the L embedding against the ab bank, the ab embedding against the L bank,
with the positive = the image's own row and K noise rows drawn uniformly (the same rows for both banks, as
``NCEAverage``), the loss L(V1, V2) = L_{V1} + L_{V2} with NCE (eq. 12, ``sslhub.losses.nce_loss``, P_n = 1/N, a
normalisation constant Z per view fixed on the first batch) or softmax cross-entropy over the 1 + K scores
(``--softmax``); afterwards both banks take the batch's embeddings with momentum 0.5 (``sslhub.memory_bank``).

The encoder's input is the authors': an RGB image converted to L*a*b* (scikit-image ``rgb2lab``) and normalised
with the Lab statistics of ``train_CMC.py`` (L: mean 50, std 50; a: 6.025, 92.208; b: -6.6895, 101.1675), channel 0
= L, channels 1-2 = ab; ``input_transform`` is that conversion, so evaluation, fine-tuning and
``sslhub.create_transform(model)`` take RGB images. The released encoder is both branches; its ``pooler_output`` is
the concatenation [f_L, f_ab] of their pooled features that ``LinearProbing.py --layer 6`` classifies.

Deviations: the noise indices come from a generator seeded by the training step (every process and a resumed run
draw the same ones) instead of the CUDA RNG; the pooling is a global mean (the authors' ``AvgPool2d(7)`` is the same
on 224 px inputs, where the last feature map is 7 x 7); under several processes Z is the mean over the processes'
first batches; the banks of a release are not converted (``task="pretraining"`` starts new banks sized for its own
training set and re-estimates Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from sslhub.backbones import Encoder, create_backbone
from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import mean_over_processes
from sslhub.losses import nce_loss
from sslhub.memory_bank import bind_banks, initial_bank, momentum_update, noise_indices
from sslhub.methods.base import ExportTargets, MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, MultiView, crop, flip, lab_input

OBJECTIVES = ("nce", "softmax")
# train_CMC.py's Lab normalisation: the midpoint and half-range of L in [0, 100], a in [-86.183, 98.233] and b in
# [-107.857, 94.478]
LAB_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)
BRANCHES = {"l_to_ab": 1, "ab_to_l": 2}  # the authors' module names and their input channels (L, then ab)


@dataclass
class CMCHparams(MethodHparams):
    """Defaults of ``train_CMC.py``: SGD lr 0.03 at batch 128 (4 GPUs, README), momentum 0.9, weight decay 1e-4, 240
    epochs, lr x0.1 after epochs 120, 160 and 200 (``adjust_learning_rate``); NCE with K = 16384 noise samples
    (``--nce_k``), τ = 0.07, bank momentum 0.5, 128-d features; crops of 8-100 % of the image for ResNets on
    ImageNet (``crop_low`` 0.08). The released ResNets were trained with K = 4096 (README)."""

    optimizer: str = "sgd"
    lr: float = 0.03
    lr_batch_size: int = 128
    weight_decay: float = 1e-4
    epochs: int = 240
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (120, 160, 200)
    objective: str = hparam("nce", "'nce' (NCE with nce_k noise samples, eq. 12) or 'softmax' (--softmax)")
    dim: int = hparam(128, "dimension of each view's L2-normalised embedding and memory bank (--feat_dim)")
    temperature: float = hparam(0.07, "temperature τ of the scores (--nce_t)")
    nce_k: int = hparam(16384, "noise samples per image (--nce_k)")
    bank_momentum: float = hparam(0.5, "momentum of the memory bank update (--nce_m)")
    num_samples: int = hparam(0, "rows of each memory bank = training images (0: set by the trainer, bind_dataset)")
    noise_seed: int = hparam(0, "seed of the noise-index generator (mixed with the step; equal on every process)")
    crop_scale_min: float = hparam(0.08, "smallest area fraction of the random resized crop (--crop_low)")

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: expected one of {OBJECTIVES}")
        if self.num_samples < 0 or self.nce_k < 1:
            raise ValueError(f"num_samples {self.num_samples} must be >= 0 and nce_k {self.nce_k} >= 1")


class LabBranchesEncoder(Encoder):
    """CMC's encoder (``models/resnet.py`` ``ResNetV1/V2/V3``): a timm ResNet ``l_to_ab`` on channel 0 (L) and one
    ``ab_to_l`` on channels 1-2 (ab) of a normalised L*a*b* image; ``forward_features`` is their feature maps stacked
    along the channels, ``pool`` the global mean, so ``pooler_output`` = [f_L, f_ab]."""

    def __init__(self, backbone: str, **backbone_kwargs):
        super().__init__()
        for name, channels in BRANCHES.items():
            self.add_module(name, create_backbone(backbone, in_chans=channels, **backbone_kwargs))
        self.branch_features = self.l_to_ab.num_features
        self.num_features = 2 * self.branch_features

    def forward_branches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled features (f_L, f_ab) of the two branches."""
        hidden = self.forward_features(images)
        return self.pool(hidden).split(self.branch_features, dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CMC takes normalised L*a*b* images (B, 3, H, W), got shape {tuple(images.shape)}")
        lightness, colour = images.split([1, 2], dim=1)
        return torch.cat([self.l_to_ab.forward_features(lightness), self.ab_to_l.forward_features(colour)], dim=1)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.mean(dim=(2, 3))

    @property
    def architecture_note(self) -> str:
        return (
            "Two ResNets, one on the L channel and one on the ab channels of the normalised L*a*b* image (channel 0 "
            "and channels 1-2); pooler_output concatenates their pooled features (L first). Feed RGB images through "
            "`sslhub.create_transform(model)`, which converts them to Lab as the authors' code does."
        )


def convert_cmc(container, source: str) -> Converted:
    """HobbitLong/CMC ``train_CMC.py``'s checkpoint: ``{'opt', 'model', 'contrast', 'optimizer', 'epoch', ['amp']}``;
    ``model`` of ``MyResNetsCMC``, whose ``nn.DataParallel`` inside the module makes the keys
    ``encoder.module.l_to_ab.<torchvision ResNet names>`` and ``encoder.module.ab_to_l.*``, each ResNet's ``fc`` the
    view's embedding (``head_l`` / ``head_ab`` here). ``opt`` (argparse arguments) gives the NCE hyperparameters;
    ``contrast`` (``NCEAverage``'s buffers: the two banks) is not converted."""
    reader = KeyReader(entry(container, "model", source), source)
    state = reader.take("encoder.module.")
    reader.finish()
    backbone, method = {}, {}
    for key, value in state.items():
        branch, _, rest = key.partition(".")
        if branch not in BRANCHES:
            raise CheckpointError(f"{source}: key 'encoder.module.{key}' is not in a CMC branch {sorted(BRANCHES)}")
        if rest.startswith("fc."):
            method[f"head_{'l' if branch == 'l_to_ab' else 'ab'}.{rest[len('fc.') :]}"] = value
        else:
            backbone[key] = value
    for head in ("head_l", "head_ab"):
        if method.get(f"{head}.weight") is None or method[f"{head}.weight"].ndim != 2:
            raise CheckpointError(f"{source}: no 2-d fc.weight in both branches (the embeddings): not a CMC checkpoint")
    dim = method["head_l.weight"].shape[0]
    overrides = {"dim": dim}
    opt = container.get("opt")
    recorded = {"nce_k": "nce_k", "temperature": "nce_t", "bank_momentum": "nce_m"}
    overrides |= {name: getattr(opt, arg) for name, arg in recorded.items() if hasattr(opt, arg)}
    if hasattr(opt, "softmax"):
        overrides["objective"] = "softmax" if opt.softmax else "nce"
    empty = initial_bank(0, dim)
    method |= {"memory_l": empty, "memory_ab": empty.clone(), "nce_z": torch.tensor([-1.0, -1.0])}
    method["nce_step"] = torch.tensor(0)
    left_out = leftover_entries(container, {"model", "opt", "contrast"})
    left_out += ["contrast (memory banks not converted)", "opt (read as hyperparameters)"]
    return Converted("cmc", backbone, method, {"encoder.": backbone}, overrides, sorted(left_out))


def _is_cmc(container) -> bool:
    state = container.get("model") if isinstance(container, dict) else None
    if not isinstance(state, dict):
        return False
    return any(str(key).startswith("encoder.module.l_to_ab.") for key in state) and any(
        str(key).startswith("encoder.module.ab_to_l.") for key in state
    )


CMC_LAYOUT = CheckpointLayout("cmc", _is_cmc, convert_cmc)


@register_method("cmc")
class CMC(SSLMethod):
    """One view per image (a Lab crop); the model splits it into L and ab. z_L = normalise(fc_L(f_L(L))),
    z_ab = normalise(fc_ab(f_ab(ab))); with the banks V_L, V_ab and the rows R = [i, noise_1..K] of image i:
    s_L = V_ab[R]·z_L / τ and s_ab = V_L[R]·z_ab / τ (``NCEAverage``: ``out_l``, ``out_ab``); the loss is
    NCE(exp(s_L) / Z_L) + NCE(exp(s_ab) / Z_ab) or CE(s_L, 0) + CE(s_ab, 0); then V_L[i] ← normalise(0.5 V_L[i] +
    0.5 z_L), V_ab likewise."""

    Hparams = CMCHparams
    paper = "Contrastive Multiview Coding (CMC)"
    arxiv = "1906.05849"
    citation = (
        "@inproceedings{tian2020contrastive,\n  title     = {Contrastive Multiview Coding},\n  author    = {Tian, "
        "Yonglong and Krishnan, Dilip and Isola, Phillip},\n  booktitle = {ECCV},\n  year      = {2020},\n}"
    )
    released = "both branches (L and ab ResNets); pooler_output = their pooled features concatenated, L first"
    # LinearProbing.py: --layer 6, SGD momentum 0.9, no weight decay, batch 256, 60 epochs; the README's lr 30 for
    # resnet50v1 / v2 (50 for v3). Its schedule (x0.2 at epochs 30, 40, 50) is sslhub's cosine here.
    linear_recipe = LinearRecipe("HobbitLong/CMC LinearProbing.py (--layer 6, lr 30; v3: 50)", 30.0, 60, 256)
    export_targets = ExportTargets(encoder=None)
    replicated_buffers = ("memory_l", "memory_ab", "nce_z", "nce_step")
    checkpoint_layouts = (CMC_LAYOUT,)
    tiny_preset = "cmc_resnet18_32px"
    tiny_overrides = {"dim": 16, "nce_k": 8, "num_samples": 64}

    # Evaluation: ``LinearProbing.py``'s validation pre-processing: bilinear resize of the short side to 256, centre
    # crop 224, then Lab (images of 64 px or less are not cropped, as sslhub's default).
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        width = self.encoder.branch_features
        self.head_l = nn.Linear(width, hp.dim)  # models/resnet.py: each ResNet's fc = Linear(feat, low_dim)
        self.head_ab = nn.Linear(width, hp.dim)
        self.register_buffer("memory_l", initial_bank(hp.num_samples, hp.dim))
        self.register_buffer("memory_ab", initial_bank(hp.num_samples, hp.dim))
        self.register_buffer("nce_z", torch.tensor([-1.0, -1.0]))  # NCEAverage's params[2:4], Z_l and Z_ab
        self.register_buffer("nce_step", torch.tensor(0, dtype=torch.long))

    @classmethod
    def build_encoder(cls, config, **backbone_overrides) -> LabBranchesEncoder:
        return LabBranchesEncoder(config.backbone, **{**config.backbone_kwargs, **backbone_overrides})

    def bind_dataset(self, num_samples: int) -> None:
        """Allocate both banks for ``num_samples`` images (``sslhub.memory_bank.bind_banks``)."""
        bind_banks(self, num_samples, ["memory_l", "memory_ab"])

    @classmethod
    def input_transform(cls, config):
        """``RGB2Lab``, ``ToTensor``, ``Normalize`` with the config's (Lab) mean and std (``train_CMC.py``)."""
        return lab_input(config.image_mean, config.image_std)

    def view_recipe(self):
        """``train_CMC.py``'s transform: random resized crop (``crop_low``-1), horizontal flip, Lab, normalisation."""
        cfg = self.config
        pieces = [crop(cfg.image_size, (self.hparams.crop_scale_min, 1.0)), flip(), *self.input_transform(cfg)]
        return MultiView([v2.Compose(pieces)])

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' features (``forward(x, layer=7)``): each view's L2-normalised 128-d embedding (z_L, z_ab)."""
        pooled_l, pooled_ab = self.encoder.forward_branches(images)
        return F.normalize(self.head_l(pooled_l), dim=1), F.normalize(self.head_ab(pooled_ab), dim=1)

    def forward(self, batch: Batch) -> MethodOutput:
        hp = self.hparams
        if len(batch.views) != 1:
            raise ValueError(
                f"CMC takes 1 view (a Lab image that the model splits into L and ab), got {len(batch.views)}"
            )
        if self.memory_l.shape[0] == 0:
            raise ValueError("CMC's memory banks are empty: set num_samples or train with the Pretrainer")
        z_l, z_ab = self.embed(batch.views[0])
        index = batch.index.to(z_l.device)
        num_samples = self.memory_l.shape[0]
        noise = noise_indices(num_samples, len(index), hp.nce_k, int(self.nce_step), hp.noise_seed, index.device)
        rows = torch.cat([index[:, None], noise], dim=1)  # (B, 1 + K), the positive first
        scores_l = torch.einsum("bkd,bd->bk", self.memory_ab.to(z_l.dtype)[rows], z_l) / hp.temperature
        scores_ab = torch.einsum("bkd,bd->bk", self.memory_l.to(z_ab.dtype)[rows], z_ab) / hp.temperature
        if hp.objective == "softmax":  # NCESoftmaxLoss
            positive = torch.zeros_like(index)
            loss_l, loss_ab = F.cross_entropy(scores_l, positive), F.cross_entropy(scores_ab, positive)
        else:  # NCECriterion on exp(s) / Z
            similarity_l, similarity_ab = scores_l.exp(), scores_ab.exp()
            if (self.nce_z < 0).any():
                first = torch.stack([similarity_l.detach().mean(), similarity_ab.detach().mean()])
                self.nce_z.copy_(mean_over_processes(first) * num_samples)
            loss_l = nce_loss(similarity_l / self.nce_z[0], 1.0 / num_samples)
            loss_ab = nce_loss(similarity_ab / self.nce_z[1], 1.0 / num_samples)
        if self.training:
            momentum_update(self.memory_l, z_l, index, hp.bank_momentum)
            momentum_update(self.memory_ab, z_ab, index, hp.bank_momentum)
            self.nce_step += 1
        return MethodOutput(loss_l + loss_ab, {"loss_l": loss_l.item(), "loss_ab": loss_ab.item()})


# models/resnet.py: ResNetV1 / V2 / V3 = two ResNet-50s of width 0.5 / 1 / 2 (the stem stays 64 channels)
WIDTHS = {"v1": 0.5, "v2": 1, "v3": 2}
for _version, _width in WIDTHS.items():
    register_preset(
        Preset(
            f"cmc_resnet50{_version}",
            "cmc",
            "resnet50",
            backbone_kwargs={"channels": tuple(int(64 * _width) * 2**i for i in range(4))} if _width != 1 else {},
            image_mean=LAB_MEAN,
            image_std=LAB_STD,
            description=f"CMC resnet50{_version}: two ResNet-50s of width {_width} on L and ab, 224 px: train_CMC.py, "
            "NCE K 16384, τ 0.07, SGD lr 0.03 per 128, x0.1 at 120/160/200 of 240 epochs",
        )
    )
register_preset(
    Preset(
        "cmc_resnet18",
        "cmc",
        "resnet18",
        image_mean=LAB_MEAN,
        image_std=LAB_STD,
        description="CMC resnet18v2: two ResNet-18s on L and ab, 224 px, the recipe of train_CMC.py",
    )
)
# Small images (the README's STL-10 setting: τ 0.1; the default K 4096 of the README; crops of 20-100 % as train_CMC.py
# outside ImageNet ResNets), two ResNet-18s; lr 0.03 per 128 and the step schedule of train_CMC.py.
register_preset(
    Preset(
        "cmc_resnet18_32px",
        "cmc",
        "resnet18",
        image_size=32,
        image_mean=LAB_MEAN,
        image_std=LAB_STD,
        method_kwargs={"temperature": 0.1, "nce_k": 4096, "crop_scale_min": 0.2},
        description="CMC, two ResNet-18s for 32 px images: τ 0.1 (README, STL-10), K 4096, crops 0.2-1",
    )
)

# HobbitLong/CMC README, "Pretrained Models": a Dropbox folder holding CMC_resnet50v2.pth and CMC_resnet50v3.pth (named
# there) and the v1 file (name inferred from them); trained with NCE, Lab, 4096 negatives and amp, v2 / v3 with
# FastAutoAugment. The README states no accuracy per file (only "up to 68.4 %" top-1 for its best ResNet).
CMC_RELEASES = "https://www.dropbox.com/sh/5k4t77mt4011gyr/AABkBvKm2bGNNut0m6bLMK84a"
for _version in WIDTHS:
    register_pretrained(
        PretrainedTag(
            f"cmc_resnet50{_version}",
            "in1k",
            url=f"{CMC_RELEASES}/CMC_resnet50{_version}.pth?dl=1",
            download_name=f"CMC_resnet50{_version}.pth",
            layout="cmc",
            license="BSD-2-Clause",
            epochs=None,
            source="HobbitLong/CMC README, Pretrained Models (Dropbox folder; NCE loss, Lab, 4096 negatives, amp"
            + (", FastAutoAugment" if _version != "v1" else "")
            + "); no per-file accuracy is published (README: CMC ResNets up to 68.4 % ImageNet linear top-1); "
            "pooler_output = [f_L, f_ab], the feature LinearProbing.py --layer 6 classifies"
            + ("; linear lr 50 for v3 (README)" if _version == "v3" else ""),
        )
    )
