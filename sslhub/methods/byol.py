"""BYOL: bootstrap your own latent — an online network predicts the projection of a slowly moving target network.

Grill et al., "Bootstrap your own latent: A new approach to self-supervised Learning", arXiv 2006.07733 (NeurIPS
2020). Follows google-deepmind/deepmind-research ``byol/`` (``byol_experiment.py``, ``configs/byol.py``,
``utils/networks.py``, ``utils/augmentations.py``, ``utils/dataset.py``, ``utils/schedules.py``,
``utils/optimizers.py``, ``configs/eval.py``). The released ResNet-50 is read as its PyTorch conversion by
ajtejankar/byol-convert (``convert.py``, ``resnet.py``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn

from sslhub.backbones import TF_PADDINGS, TimmEncoder
from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader
from sslhub.heads import MLPHead
from sslhub.losses import normalized_mse
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, cosine_schedule, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BICUBIC, MultiView, asymmetric_pair, crop, simclr_blur_kernel


@dataclass
class BYOLHparams(MethodHparams):
    """Defaults of the official 1000-epoch ResNet-50 run (``configs/byol.py`` presets for 1000 epochs, paper §3.3 and
    Appendix C): LARS (trust coefficient η = 1e-3, momentum 0.9; biases and BatchNorm parameters excluded from the
    adaptation and the weight decay, which sslhub's ``lars`` does for every tensor with ndim ≤ 1) at lr 0.2 per 256
    images, weight decay 1.5e-6, 10 warm-up epochs from 0 then cosine to 0, τ_base 0.996; projector and predictor
    hidden 4096, output 256 (``network_config``); BatchNorm decay 0.9 (PyTorch momentum 0.1) and ε 1e-5, global over
    all replicas (``cross_replica_axis``). The 40 / 100 / 300-epoch presets of ``configs/byol.py`` are lr 0.45 / 0.45
    / 0.3, weight decay 1e-6, τ_base 0.97 / 0.99 / 0.99. ``tf_padding``: the JAX model's 'SAME' padding, needed to
    compute what the authors' weights compute (set by the release, not for training).
    """

    optimizer: str = "lars"
    lr: float = 0.2
    weight_decay: float = 1.5e-6
    warmup_epochs: float = 10
    epochs: int = 1000
    sync_batch_norm: bool = True  # bn_config['cross_replica_axis'] = 'i': statistics of the global batch
    momentum: float = hparam(0.996, "τ_base of the target EMA, raised to 1 on a half-cosine (base_target_ema)")
    projector_hidden_dim: int = hparam(4096, "hidden width of the projector MLP (projector_hidden_size)")
    embed_dim: int = hparam(256, "output size of the projector and the predictor (projector_output_size)")
    predictor_hidden_dim: int = hparam(4096, "hidden width of the predictor MLP (predictor_hidden_size)")
    crop_scale_min: float = hparam(0.08, "smallest area fraction of the random resized crop (dataset.py)")
    blur_prob: tuple[float, float] = hparam((1.0, 0.1), "Gaussian-blur probability of view 1 and view 2")
    solarize_prob: tuple[float, float] = hparam((0.0, 0.2), "solarisation probability of view 1 and view 2")
    tf_padding: str | None = hparam(
        None, "TensorFlow padding of the ResNet: 'same' as the authors' Haiku model (their weights), None: PyTorch's"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.tf_padding is not None and self.tf_padding not in TF_PADDINGS:
            raise ValueError(f"tf_padding {self.tf_padding!r}: expected one of {TF_PADDINGS} or None")


@torch.no_grad()
def haiku_linear_init_(head: nn.Module) -> nn.Module:
    """Haiku's ``hk.Linear`` initialisation for every linear layer of ``head``: weights from a normal distribution
    of standard deviation 1/√fan_in truncated at two standard deviations, zero biases."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            std = 1 / math.sqrt(module.in_features)
            trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return head


def byol_mlp(dims: tuple[int, int, int]) -> MLPHead:
    """``networks.MLP``: Linear (with bias) -> BatchNorm -> ReLU -> Linear (no bias), output not normalised."""
    return haiku_linear_init_(MLPHead(dims, batch_norm=True, bias=False, hidden_bias=True))


# ---- the authors' release, as ajtejankar/byol-convert writes it ---------------------------------------------------
CONVERTED_KEYS = ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "fc.weight", "fc.bias")


def _is_byol_convert(container) -> bool:
    """byol-convert's ``torch.save(state_dict)``: a bare torchvision ResNet state dict with the online classifier
    ``fc`` and without ``num_batches_tracked`` (the Haiku model has no such counter), which no PyTorch-trained file
    lacks."""
    return (
        isinstance(container, dict)
        and all(torch.is_tensor(value) for value in container.values())
        and all(key in container for key in CONVERTED_KEYS)
        and not any(key.endswith("num_batches_tracked") for key in container)
    )


def convert_byol(container, source: str) -> Converted:
    """ajtejankar/byol-convert ``convert.py`` output (``pretrain_res50x1.pth.tar``): the Haiku ``online_params`` /
    ``online_state`` of the authors' ``pretrain_res50x1.pkl`` in torchvision names — convolutions OIHW, BatchNorm
    ``scale`` / ``offset`` / ``mean_ema`` / ``var_ema`` squeezed to ``weight`` / ``bias`` / ``running_*``, the online
    linear classifier (``classifier``) as ``fc`` — without projector and predictor. ``fc`` is left out (the linear
    evaluation trains its own); ``num_batches_tracked`` (PyTorch's counter, unused by BatchNorm with a momentum) is 0.
    The Haiku ResNet pads every layer 'SAME' (byol-convert's ``resnet.py`` ``pad_same``), so the file records
    ``tf_padding='same'``."""
    reader = KeyReader(container, source)
    classifier = [f"fc.{key}" for key in reader.leave_out("fc.")]
    backbone = reader.take("")
    reader.finish()
    for key in [k for k in backbone if k.endswith(".running_mean")]:
        backbone[key.removesuffix("running_mean") + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    left_out = [f"{key} (the online linear classifier of pretraining)" for key in classifier]
    return Converted("byol_convert", backbone, method_overrides={"tf_padding": "same"}, left_out=left_out)


BYOL_CONVERT_LAYOUT = CheckpointLayout("byol_convert", _is_byol_convert, convert_byol)


@register_method("byol")
class BYOL(SSLMethod):
    """Online network = encoder f_θ + projector g_θ + predictor q_θ; target network = encoder f_ξ + projector g_ξ,
    an exponential moving average of the online ones (eq. 1: ξ ← τ ξ + (1 - τ) θ after each optimizer step, τ_k =
    1 - (1 - τ_base)(cos(π k / K) + 1) / 2 at step k of K; the predictor has no twin). For two views v, v':
    ``L = 2 - 2 cos(q_θ(z_θ), z'_ξ) + 2 - 2 cos(q_θ(z'_θ), z_ξ)`` (eq. 2, symmetrised as eq. 3 and
    ``byol_experiment.loss_fn``), averaged over the batch, no gradient into the target. Each view is a separate
    forward pass (BatchNorm statistics per view), the target in training mode, as the official code. The released
    encoder is the online encoder.

    Deviations from the official code: the online linear classifier that ``byol_experiment.py`` trains on the
    stop-gradient online embedding with labels (a monitor that sends no gradient into the network) is not trained
    (sslhub monitors with kNN); the target starts as a copy of the online network (the official code initialises it
    with another seed, "no significant difference" in its comment); the ResNet is timm's with timm's convolution
    initialisation (Haiku: variance scaling over fan-in), including the zero γ of the last BatchNorm of each
    bottleneck, as Haiku's ``BlockV1``; the ResNet-18 presets use timm's ``resnet18`` without zero-init-last (as
    Haiku's basic block) but also without Haiku's projection shortcut in the first block group; PyTorch's running
    variance is unbiased (Haiku's EMA of the biased batch variance); views are made with torchvision (see
    ``view_recipe``).
    """

    Hparams = BYOLHparams
    paper = "Bootstrap your own latent: A new approach to self-supervised Learning (BYOL)"
    arxiv = "2006.07733"
    citation = (
        "@inproceedings{grill2020bootstrap,\n  title={Bootstrap your own latent: A new approach to self-supervised "
        "Learning},\n  author={Grill, Jean-Bastien and Strub, Florian and Altch{\\'e}, Florent and Tallec, Corentin "
        "and Richemond, Pierre H. and Buchatskaya, Elena and Doersch, Carl and Pires, Bernardo Avila and Guo, "
        "Zhaohan Daniel and Azar, Mohammad Gheshlaghi and Piot, Bilal and Kavukcuoglu, Koray and Munos, R{\\'e}mi "
        "and Valko, Michal},\n  booktitle={NeurIPS},\n  year={2020}\n}"
    )
    released = "online encoder (backbone without projector and predictor)"
    # byol/configs/eval.py: SGD (Nesterov, momentum 0.9) at 0.2 per 256 images, no weight decay, 80 epochs, no
    # warm-up, at main_loop.py's --batch_size 4096 (the paper, Appendix C.1, sweeps lr at batch 1024)
    linear_recipe = LinearRecipe("google-deepmind/deepmind-research byol/configs/eval.py", 0.2, 80, 4096)
    checkpoint_layouts = (BYOL_CONVERT_LAYOUT,)
    tiny_preset = "byol_resnet18_32px"
    tiny_overrides = {"projector_hidden_dim": 64, "predictor_hidden_dim": 64, "embed_dim": 32}

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.online_encoder = self.build_encoder(config)
        dim = self.online_encoder.num_features
        self.online_projector = byol_mlp((dim, hp.projector_hidden_dim, hp.embed_dim))
        self.predictor = byol_mlp((hp.embed_dim, hp.predictor_hidden_dim, hp.embed_dim))
        self.target_encoder = copy.deepcopy(self.online_encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.online_projector).requires_grad_(False)
        self.tau = hp.momentum

    @classmethod
    def build_encoder(cls, config, **backbone_overrides):
        """timm backbone + average pooling, padded as TensorFlow's 'SAME' in every strided layer when ``tf_padding``
        is ``'same'`` (the authors' Haiku ResNet, whose weights give features about 10 % off with PyTorch's
        symmetric padding)."""
        kwargs = {**config.backbone_kwargs, **backbone_overrides}
        padding = (config.method_kwargs or {}).get("tf_padding")
        return TimmEncoder(config.backbone, config.pooling or cls.default_pooling, tf_padding=padding, **kwargs)

    @property
    def released_encoder(self):
        return self.online_encoder

    def view_recipe(self):
        """``augmentations.augment_config`` on ``dataset._decode_and_random_crop``: random resized crop (area 0.08-1,
        aspect 3/4-4/3) resized bicubically, flip, colour jitter 0.4 / 0.4 / 0.2 / 0.1 in random order with p=0.8,
        grayscale p=0.2, Gaussian blur (σ ~ U[0.1, 2], kernel 2·⌊size/20⌋+1 = 23 px at 224) with p=1.0 / 0.1,
        solarisation p=0.0 / 0.2, ImageNet mean / std. torchvision's operations stand for the JAX ones: brightness
        as a factor (TF: an added delta), contrast around the grayscale mean (TF: each channel's mean), blur with
        reflected borders (TF: zeros); the crop is torchvision's (10 tries, then the centre; TF: one try clipped to
        the image)."""
        cfg, hp = self.config, self.hparams
        crop_transform = crop(cfg.image_size, (hp.crop_scale_min, 1.0), BICUBIC)
        pair = asymmetric_pair(
            crop_transform,
            cfg.image_mean,
            cfg.image_std,
            blur_p=tuple(hp.blur_prob),
            solarize_p=tuple(hp.solarize_prob),
            blur_kernel_size=simclr_blur_kernel(cfg.image_size),
        )
        return MultiView(pair)

    def momentum_schedule(self, progress: TrainingProgress) -> float:
        """``schedules.target_ema``: τ_k = 1 - (1 - τ_base)(cos(π k / K) + 1) / 2 at optimizer step k of K."""
        return cosine_schedule(self.hparams.momentum, 1.0, progress)

    def on_step_start(self, progress: TrainingProgress) -> None:
        self.tau = self.momentum_schedule(progress)

    def momentum_pairs(self):
        return [(self.online_encoder, self.target_encoder), (self.online_projector, self.target_projector)]

    def momentum_at(self, progress: TrainingProgress) -> float:
        """``_update_fn`` moves the target after the optimizer update of step k with τ_k of that same step."""
        return self.momentum_schedule(progress)

    def forward(self, batch: Batch) -> MethodOutput:
        views = batch.views
        if len(views) != 2:
            raise ValueError(f"BYOL takes 2 views, got {len(views)}")
        predictions = [self.predictor(self.online_projector(self.online_encoder(x))) for x in views]
        with torch.no_grad():
            targets = [self.target_projector(self.target_encoder(x)) for x in views]
        loss = normalized_mse(predictions[0], targets[1]) + normalized_mse(predictions[1], targets[0])
        return MethodOutput(loss, {"tau": self.tau})


# ---- presets -------------------------------------------------------------------------------------------------------
register_preset(
    Preset(
        "byol_resnet18",
        "byol",
        "resnet18",
        backbone_kwargs={"zero_init_last": False},  # timm's BasicBlock zeroes its last BN γ, Haiku's BlockV1 does not
        description="BYOL on a timm resnet18, 224 px, official 1000-epoch recipe: LARS lr 0.2, wd 1.5e-6, τ 0.996",
    )
)
register_preset(
    Preset(
        "byol_resnet50",
        "byol",
        "resnet50",
        description="BYOL ResNet-50, official 1000-epoch recipe: LARS lr 0.2, wd 1.5e-6, τ 0.996, heads 4096 -> 256",
    )
)
# solo-learn scripts/pretrain/cifar/byol.yaml (+ augmentations/asymmetric.yaml): LARS lr 1.0 per 256 images
# (batch 256), wd 1e-5, τ 0.99 -> 1, 1000 epochs, 10 warm-up epochs, heads 4096 -> 256, no blur, solarisation
# 0 / 0.2, SyncBN. Its LARS (η 0.02 with clip_lr) is sslhub's 'lars' (η 0.001, no clipping) here. The ResNet-18 keeps
# timm's zero-initialised last BatchNorm γ (as every sslhub 32 px preset; solo-learn's torchvision resnet18 has
# none): without it a random ResNet-18 is already a 0.92 kNN feature on the built-in digits, which 110 steps of
# BYOL bring down to 0.84 (with it: 0.18 at random init -> 0.76), measured 2026-12-02.
register_preset(
    Preset(
        "byol_resnet18_32px",
        "byol",
        "resnet18",
        image_size=32,
        method_kwargs={
            "lr": 1.0,
            "weight_decay": 1e-5,
            "momentum": 0.99,
            "blur_prob": (0.0, 0.0),
            "solarize_prob": (0.0, 0.2),
        },
        description="BYOL, ResNet-18 for 32 px images (CIFAR-size data), solo-learn's CIFAR recipe: LARS lr 1.0, "
        "wd 1e-5, τ 0.99, no blur",
    )
)

# byol/README.md: the ResNet-50 (1x) checkpoint "should evaluate to ~74.4% top-1" (paper Table 1: 74.3); weights
# CC BY-NC 4.0. The authors publish a dill pickle of JAX arrays that sslhub does not unpickle: it reads
# byol-convert's PyTorch conversion of it (converted top-1 74.6 in byol-convert's README).
register_pretrained(
    PretrainedTag(
        "byol_resnet50",
        "in1k_1000ep",
        url="https://storage.googleapis.com/deepmind-byol/checkpoints/pretrain_res50x1.pkl",
        layout="byol_convert",
        license="cc-by-nc-4.0",
        epochs=1000,
        metrics={"linear": 74.4},
        source="google-deepmind/deepmind-research byol/README.md",
        overrides={"epochs": 1000, "tf_padding": "same"},
        converted_file="pretrain_res50x1.pth.tar",
        conversion="python convert.py pretrain_res50x1.pkl pretrain_res50x1.pth.tar (ajtejankar/byol-convert)",
    )
)
