"""Colorization: learn features by predicting the colour (ab) of an image from its lightness (L) in CIE L*a*b*.

Zhang, Isola & Efros, "Colorful Image Colorization", arXiv 1603.08511 (ECCV 2016). The network sees L only and
predicts at every location of its output map a distribution Ẑ over Q = 313 quantised ab bins (grid size 10, the
in-gamut ones). With Z the soft-encoded ground truth (§3.1: the 5 nearest bins of the true ab, weighted by a Gaussian
kernel of σ = 5, normalised), the loss is the class-rebalanced multinomial cross-entropy (eq. 2-4)

    L(Ẑ, Z) = -Σ_{h,w} v(Z_{h,w}) Σ_q Z_{h,w,q} log Ẑ_{h,w,q},   v(Z_{h,w}) = w_{q*},  q* = argmax_q Z_{h,w,q},
    w ∝ ((1 - λ) p̃ + λ / Q)^-1,  Σ_q p̃_q w_q = 1,  λ = 0.5,

p̃ the empirical ab distribution of the training data smoothed by a Gaussian of σ = 5. Colours are decoded with the
annealed mean (eq. 5) H(Z) = Σ_q f_T(Z)_q c_q, f_T(z) = exp(log z / T) / Σ_q exp(log z_q / T), T = 0.38
(``colorize``).

Followed: the authors' richzhang/colorization ``models/colorization_train_val_v2.prototxt`` (L centred by -50; ab
subsampled to the output map by a stride-4 1x1 convolution of weight 1, i.e. every 4th pixel; ``NonGrayMaskLayer``:
an image whose subsampled ab never exceeds 5 in magnitude gets no loss; ``PriorBoostLayer`` weight of the nearest
bin; ``ClassRebalanceMultLayer`` multiplies the gradient by it; a 1x1 convolution ``conv8_313`` predicts the bins),
``resources/caffe_traininglayers.py`` (``NNEncode``, ``PriorFactor``: alpha 1, gamma = λ 0.5, normalised so the
prior's expectation of w is 1) and ``train/solver.prototxt`` (Adam lr 3e-5, β 0.9 / 0.99, weight decay 1e-3, batch 40,
500k iterations, lr x0.1 after 225k; random 176 px crops of 256 px images, mirrored). The ResNet-50 and the input
are VISSL's (``vissl/models/trunks/resnext.py``: ``INPUT_TYPE lab`` → a 1-channel conv1 that reads channel 0 of the
Lab tensor, ``LAYER4_STRIDE 1`` → layer4 built with stride 1 and NO dilation, output stride 16;
``vissl/data/ssl_transforms/img_pil_to_lab_tensor.py``: OpenCV's 8-bit Lab rescaled to L - 50 in [-50, 50],
a and b in [-128, 127]), the encoders of the Goyal'19 releases (arXiv 1905.01235).

The 313 bins (``AB_BINS``): the authors ship them as ``resources/pts_in_hull.npy`` (not downloadable here). sslhub
holds them as ``AUTHORS_BIN_ROWS``: for each a in -90, -80, ..., 100 the contiguous run of b (step 10) of that row,
from a transcription of the file in a public re-implementation; it matches the paper's Figure 3a (313 bins, a in
[-90, 100], b in [-110, 100]) and is ordered as the file (a, then b, ascending), so the authors' ``prior_probs.npy``
plugs in as ``prior_file``. No principled rule tried here reproduces exactly 313 (``tests/test_colorization.py``
checks the facts that do hold): the nearest grid point of every one of the 2^24 8-bit sRGB colours gives 261 bins,
all among the 313; grid points in gamut for some L give 229; cells meeting the gamut's ab hull 269. The authors' set
is wider than sRGB (e.g. (a, b) = (100, 0) is 14 units outside it): it could not be verified against their file.

Deviations:

- the prior p̃: the authors precompute it once on ImageNet (``prior_probs.npy``). sslhub's trainer tells a method only
  the dataset's size, so by default the method keeps a running histogram ``ab_counts`` of the nearest bins of every
  training target it has seen (all-reduced over processes, a buffer saved with the model, so a resumed run continues
  it exactly) and computes w from it at every step: an estimate of the same distribution that converges to it within
  the first epoch. ``prior_file`` fixes the prior instead (the authors' ``prior_probs.npy``, or the output of
  ``estimate_ab_prior`` on a dataset saved with ``numpy.save``); the σ = 5 smoothing is applied to either
  (``prior_sigma 0`` skips it, for a file that is already smoothed: whether the authors' is could not be verified);
- the soft encoding uses the paper's 5 neighbours (``NNEncLayer`` sets 10; ``neighbours 10``): with σ = 5 on a
  10-spaced grid the 6th-10th neighbours weigh 2 % or less;
- the loss is the mean of v · CE over the images and output locations (the authors' caffe layer passes the
  unweighted loss forward and scales the gradient by v; its normalisation is in their caffe fork, not verified);
- the head on a ResNet: one 1x1 convolution from the final feature map to the 313 bins (the authors' ``conv8_313``
  on their VGG-style network; Goyal'19's pretext head is not published and the VISSL files hold the trunk only);
- optimisation of the presets: the authors' solver (there is no VISSL colorization pretraining config, only the
  benchmark ``models/resnet50_colorization.yaml``; Goyal'19's pretraining recipe is not in their code), with
  sslhub's AdamW (decoupled weight decay, not on norms and biases) for caffe's Adam with L2 weight decay, the 500k
  iterations of 40 images as 16 epochs with the step at epoch 7;
- the input L is the float L* of ``sslhub.transforms.rgb_to_lab`` (scikit-image's formula) minus 50; VISSL's OpenCV
  8-bit Lab rounds L* to steps of 100/255 and a, b to integers (at most 0.2 and 0.5 apart).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from sslhub.backbones import TimmEncoder
from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted
from sslhub.conversion.loading import CheckpointError, load_file_state
from sslhub.conversion.vissl import VISSL_ZOO, read_vissl, vissl_heads
from sslhub.distributed import sum_over_processes
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, MultiView, RGBToLab, lab_to_rgb, padded_crop, rgb_to_lab

# pts_in_hull.npy, row by row: a -> (first b, last b), b in steps of 10 (module docstring).
AUTHORS_BIN_ROWS = {
    -90: (50, 90), -80: (20, 90), -70: (0, 90), -60: (-20, 90), -50: (-30, 100), -40: (-40, 100), -30: (-50, 100),
    -20: (-50, 100), -10: (-60, 100), 0: (-70, 100), 10: (-80, 90), 20: (-80, 90), 30: (-90, 90), 40: (-100, 90),
    50: (-100, 80), 60: (-110, 80), 70: (-110, 80), 80: (-110, 70), 90: (-110, 70), 100: (-90, 0),
}  # fmt: skip
BIN_SPACING = 10
AB_BINS = torch.tensor(
    [[a, b] for a, (first, last) in AUTHORS_BIN_ROWS.items() for b in range(first, last + 1, BIN_SPACING)],
    dtype=torch.float32,
)  # (313, 2) bin centres c_q
NUM_BINS = len(AB_BINS)
L_CENTRE = 50.0  # the authors' data_l_meansub and VISSL's ImgPil2LabTensor: L - 50
GRAY_THRESHOLD = 5.0  # NonGrayMaskLayer: an image is grey when no |a| or |b| exceeds it


@dataclass
class ColorizationHparams(MethodHparams):
    """Defaults of the authors' ``train/solver.prototxt`` and training layers (module docstring): Adam lr 3e-5 for 40
    images, β (0.9, 0.99), weight decay 1e-3, 500k iterations (16 ImageNet epochs), lr x0.1 after 225k (epoch 7)."""

    optimizer: str = "adamw"
    lr: float = 3e-5
    lr_batch_size: int = 40
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-3
    epochs: int = 16
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (7,)
    neighbours: int = hparam(5, "nearest bins of the soft encoding (paper §3.1: 5; NNEncLayer: 10)")
    encoding_sigma: float = hparam(5.0, "σ of the soft encoding's Gaussian kernel, in ab units")
    rebalance_lambda: float = hparam(0.5, "λ: weight of the uniform distribution mixed into the prior (eq. 4)")
    prior_sigma: float = hparam(5.0, "σ of the Gaussian smoothing of the empirical ab prior p̃ (0: no smoothing)")
    prior_file: str = hparam(
        "", "a .npy / .pt file of the 313 bins' prior (counts or probabilities: prior_probs.npy, estimate_ab_prior); "
        "'' keeps a running histogram of the training targets"
    )  # fmt: skip
    temperature: float = hparam(0.38, "T of the annealed-mean decoding (eq. 5, colorize)")
    stride_one_stages: tuple[str, ...] = hparam(
        ("layer4",), "ResNet stages built with stride 1 and no dilation (VISSL LAYER4_STRIDE 1: output stride 16)"
    )
    resize_ratio: float = hparam(256 / 176, "short side resized to image_size x this before the random crop (256/176)")
    crop_padding: int = hparam(0, "> 0: a random crop after zero padding by this many pixels instead (CIFAR recipes)")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.neighbours <= NUM_BINS or not 0 <= self.rebalance_lambda <= 1:
            raise ValueError(
                f"neighbours {self.neighbours} must be in [1, {NUM_BINS}] and rebalance_lambda "
                f"{self.rebalance_lambda} in [0, 1]"
            )
        if self.temperature <= 0 or self.encoding_sigma <= 0 or self.prior_sigma < 0 or self.resize_ratio < 1:
            raise ValueError(
                f"temperature {self.temperature} and encoding_sigma {self.encoding_sigma} must be > 0, prior_sigma "
                f"{self.prior_sigma} >= 0 and resize_ratio {self.resize_ratio} >= 1"
            )


# ---- the quantised ab space ----------------------------------------------------------------------------------------
def _squared_distances(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(N, 2) points x (Q, 2) bin centres -> (N, Q) squared distances."""
    return (ab[:, None, :] - bins[None]).square().sum(-1)


def nearest_bins(ab: torch.Tensor, bins: torch.Tensor = AB_BINS) -> torch.Tensor:
    """(B, 2, H, W) ab values -> (B, H, W) index of the nearest bin centre."""
    flat = ab.movedim(1, -1).reshape(-1, 2).float()
    return _squared_distances(flat, bins.to(flat)).argmin(1).reshape(ab.shape[0], *ab.shape[2:])


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, neighbours: int = 5, sigma: float = 5.0) -> torch.Tensor:
    """The soft-encoded target Z (§3.1, ``NNEncode``): (B, 2, H, W) ab -> (B, Q, H, W) with, at each location, the
    ``neighbours`` nearest bins weighted by exp(-d² / 2σ²) and normalised to sum to 1."""
    flat = ab.movedim(1, -1).reshape(-1, 2).float()
    distances, index = _squared_distances(flat, bins.to(flat)).topk(neighbours, dim=1, largest=False)
    weights = torch.softmax(-distances / (2 * sigma**2), dim=1)  # exp(-d²/2σ²) / Σ
    encoded = torch.zeros(len(flat), len(bins), device=ab.device).scatter_(1, index, weights)
    return encoded.reshape(ab.shape[0], *ab.shape[2:], len(bins)).movedim(-1, 1)


def smoothed_prior(counts: torch.Tensor, bins: torch.Tensor, sigma: float) -> torch.Tensor:
    """p̃: the bins' empirical distribution (``counts`` normalised) smoothed by a Gaussian of σ in ab space,
    renormalised over the bins; uniform before any count (every w is then 1)."""
    counts = counts.double()
    if counts.sum() <= 0:
        return torch.full_like(counts, 1 / len(counts))
    prior = counts / counts.sum()
    if sigma > 0:
        kernel = torch.exp(-_squared_distances(bins.double(), bins.double()) / (2 * sigma**2))
        prior = kernel @ prior
    return prior / prior.sum()


def rebalancing_weights(prior: torch.Tensor, rebalance_lambda: float = 0.5) -> torch.Tensor:
    """w ∝ ((1 - λ) p̃ + λ / Q)^-1 normalised so that Σ_q p̃_q w_q = 1 (eq. 4, ``PriorFactor``)."""
    weights = 1 / ((1 - rebalance_lambda) * prior + rebalance_lambda / len(prior))
    return weights / (prior * weights).sum()


def annealed_mean(probabilities: torch.Tensor, bins: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """H(Z) = Σ_q f_T(Z)_q c_q, f_T(z) = exp(log z / T) / Σ_q exp(log z_q / T) (eq. 5): (B, Q, h, w) -> (B, 2, h, w)."""
    annealed = torch.softmax(torch.log(probabilities.clamp_min(1e-12)) / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", annealed, bins.to(annealed))


def _rgb_tensor(image) -> torch.Tensor:
    """A PIL image (converted to RGB) or a (3, H, W) float RGB tensor in [0, 1] -> (3, H, W) float in [0, 1]."""
    if isinstance(image, Image.Image):
        return v2.functional.to_dtype(v2.functional.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    if not torch.is_tensor(image) or image.ndim != 3 or image.shape[0] != 3:
        found = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"expected an RGB PIL image or a (3, H, W) tensor in [0, 1], got {found}")
    return image.float()


def estimate_ab_prior(images: Iterable) -> torch.Tensor:
    """The empirical distribution of the 313 bins over every pixel of ``images`` (RGB PIL images or (3, H, W) tensors
    in [0, 1]), as the authors' ImageNet ``prior_probs.npy``: ``numpy.save(path, estimate_ab_prior(dataset))`` then
    ``prior_file=path`` fixes it."""
    counts = torch.zeros(NUM_BINS, dtype=torch.float64)
    for image in images:
        ab = rgb_to_lab(_rgb_tensor(image))[1:][None]
        counts += torch.bincount(nearest_bins(ab).flatten(), minlength=NUM_BINS).double()
    if counts.sum() == 0:
        raise ValueError("estimate_ab_prior got no pixels")
    return counts / counts.sum()


# ---- data ----------------------------------------------------------------------------------------------------------
class CentredLab:
    """L*a*b* (3, H, W) -> (L - 50, a, b): VISSL's ``ImgPil2LabTensor`` output (the authors' ``data_l`` is the first
    channel, their ``data_ab`` the other two)."""

    def __call__(self, lab: torch.Tensor) -> torch.Tensor:
        return torch.cat([lab[..., :1, :, :] - L_CENTRE, lab[..., 1:, :, :]], dim=-3)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---- encoder -------------------------------------------------------------------------------------------------------
def stride_one_(backbone: nn.Module, stages: Sequence[str]) -> nn.Module:
    """Give each ResNet stage in ``stages`` stride 1 without dilation (VISSL ``_make_layer(..., stride=1)``): the
    strided convolutions of its first block (the 3x3 and the downsample 1x1) get stride 1; the weights and their
    names are unchanged."""
    for name in stages:
        stage = getattr(backbone, name, None)
        if not isinstance(stage, nn.Sequential):
            raise ValueError(f"stride_one_stages: {type(backbone).__name__} has no ResNet stage {name!r}")
        for module in stage[0].modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
    return backbone


class LightnessResNetEncoder(TimmEncoder):
    """VISSL's ``INPUT_TYPE lab`` trunk: it takes the (L - 50, a, b) tensor and runs a timm ResNet with a 1-channel
    conv1 (``in_chans=1``) on channel 0 only (``transform_model_input_data_type``), the stages in
    ``stride_one_stages`` at stride 1 (``stride_one_``), globally average-pooled."""

    def __init__(self, name: str, stride_one_stages: Sequence[str] = (), **kwargs):
        super().__init__(name, **{"in_chans": 1, **kwargs})
        if self.backbone.conv1.in_channels != 1:
            raise ValueError(f"the colorization encoder reads L only: in_chans must be 1, got {kwargs['in_chans']}")
        self.stride_one_stages = tuple(stride_one_stages)
        stride_one_(self.backbone, self.stride_one_stages)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"the colorization encoder takes (L - 50, a, b) images (B, 3, H, W) and reads L; got shape "
                f"{tuple(images.shape)}"
            )
        return self.backbone.forward_features(images[:, :1])

    @property
    def exports_to_timm(self) -> bool:
        return False  # the timm model takes L alone, one channel

    @property
    def architecture_note(self) -> str:
        strides = (
            f"; {', '.join(self.stride_one_stages)} at stride 1 without dilation (VISSL LAYER4_STRIDE 1), which "
            "`sslhub.to_timm(model)` keeps: a stock timm model holding these weights strides there and computes "
            "other features"
        )
        return (
            "Input: the image's L*a*b* as (L - 50, a, b) (VISSL ImgPil2LabTensor; `sslhub.create_transform(model)` "
            "makes it from RGB); the ResNet reads channel 0, L, with a 1-channel conv1, so `sslhub.to_timm(model)` "
            "takes L - 50 alone" + (strides if self.stride_one_stages else "")
        )


# ---- official files ------------------------------------------------------------------------------------------------
def convert_vissl_colorization(container, source: str) -> Converted:
    """A VISSL colorization file (``converted_vissl_rn50_colorization_*_goyal19.torch``, family B:
    ``{'model_state_dict': trunk}``, ``sslhub.conversion.vissl``): the trunk with its 1-channel conv1 is the encoder;
    no head."""
    model = read_vissl(container, source)
    conv1 = model.trunk.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4 or conv1.shape[1] != 1:
        found = None if conv1 is None else tuple(conv1.shape)
        raise CheckpointError(
            f"{source}: a VISSL colorization trunk has a 1-channel conv1 (_feature_blocks.conv1.weight of shape "
            f"(64, 1, 7, 7), INPUT_TYPE lab); found {found}"
        )
    if model.heads:
        raise CheckpointError(f"{source}: VISSL colorization files hold the trunk only; this one has heads")
    return Converted("colorization_vissl", model.trunk, left_out=model.left_out)


def _is_vissl_colorization(container) -> bool:
    if vissl_heads(container) != {}:
        return False
    conv1 = container.get("model_state_dict", {}).get("_feature_blocks.conv1.weight")
    return torch.is_tensor(conv1) and conv1.ndim == 4 and conv1.shape[1] == 1


VISSL_LAYOUT = CheckpointLayout("colorization_vissl", _is_vissl_colorization, convert_vissl_colorization)


# ---- the method ----------------------------------------------------------------------------------------------------
@register_method("colorization")
class Colorization(SSLMethod):
    """One view per image, its (L - 50, a, b) tensor; the encoder reads L. Ẑ = softmax(head(encoder features)) over
    the 313 bins at each location of the output map; the targets Z = soft_encode(ab at the map's locations), the loss
    Σ v · CE / (B h w) with v = w_{q*} · [image not grey] (eq. 2-4). ``head``: a 1x1 convolution to the bins. The
    released encoder is the backbone."""

    Hparams = ColorizationHparams
    paper = "Colorful Image Colorization"
    arxiv = "1603.08511"
    citation = (
        "@InProceedings{zhang2016colorful,\n  author    = {Richard Zhang and Phillip Isola and Alexei A. Efros},\n"
        "  title     = {Colorful Image Colorization},\n  booktitle = {ECCV},\n  year      = {2016},\n}"
    )
    released = (
        "encoder backbone on the L channel (pooler_output: the final pooled feature, res5avg; VISSL's colorization "
        "benchmark probes conv1 and res2-res5, each average-pooled to about 9k dimensions, and reports the best "
        "layer, never res5avg; the paper's AlexNet probes peak at conv3 / conv4)"
    )
    # VISSL eval_resnet_8gpu_transfer_in1k_linear.yaml + models/resnet50_colorization.yaml: SGD (Nesterov) lr 0.01
    # per 256, 28 epochs (x0.1 at 8, 16, 24), weight decay 1e-4 (not on biases); probes on pooled conv1 / res2-res5.
    linear_recipe = LinearRecipe(
        "facebookresearch/vissl eval_resnet_8gpu_transfer_in1k_linear.yaml + models/resnet50_colorization.yaml",
        0.01, 28, 256, weight_decay=1e-4,
    )  # fmt: skip
    checkpoint_layouts = (VISSL_LAYOUT,)
    replicated_buffers = ("ab_counts",)
    tiny_preset = "colorization_resnet18_32px"
    eval_interpolation = BILINEAR  # VISSL's test transform: Resize(256) (bilinear), CenterCrop(224), ImgPil2LabTensor

    def __init__(self, config):
        super().__init__(config)
        self.encoder = self.build_encoder(config)
        self.head = nn.Conv2d(self.encoder.num_features, NUM_BINS, kernel_size=1)  # conv8_313
        self.register_buffer("ab_bins", AB_BINS.clone(), persistent=False)
        self.register_buffer("ab_counts", torch.zeros(NUM_BINS, dtype=torch.float64))

    @classmethod
    def build_encoder(cls, config, **backbone_overrides) -> LightnessResNetEncoder:
        stages = cls.Hparams(**config.method_kwargs).stride_one_stages
        kwargs = {**config.backbone_kwargs, **backbone_overrides}
        return LightnessResNetEncoder(config.backbone, stages, pooling=config.pooling or cls.default_pooling, **kwargs)

    @classmethod
    def input_transform(cls, config):
        """RGB -> L*a*b* -> (L - 50, a, b) (VISSL ``ImgPil2LabTensor``)."""
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), RGBToLab(), CentredLab(), v2.ToPureTensor()]

    def load_auxiliary_weights(self) -> None:
        """``prior_file``: the fixed ab prior (313 counts or probabilities, ``numpy.save`` / ``torch.save``)."""
        path = self.hparams.prior_file
        if not path:
            return
        values = np.load(path) if str(path).endswith(".npy") else load_file_state(path)  # no pickle runs
        prior = torch.as_tensor(np.asarray(values), dtype=torch.float64).flatten()
        if prior.shape != (NUM_BINS,) or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError(
                f"prior_file {path}: expected {NUM_BINS} non-negative values (one per ab bin, in the order of "
                f"pts_in_hull.npy), got shape {tuple(np.shape(values))} with minimum {float(np.min(values))}"
            )
        self.ab_counts.copy_(prior)

    def view_recipe(self):
        """The authors' data layer: a random crop (of the image resized to ``image_size x resize_ratio``, 176 of 256
        px; or a padded crop for small images) mirrored with probability 0.5, then (L - 50, a, b)."""
        cfg, hp = self.config, self.hparams
        if hp.crop_padding:
            cropping = padded_crop(cfg.image_size, hp.crop_padding)
        else:
            resize = round(cfg.image_size * hp.resize_ratio)
            cropping = v2.Compose([v2.Resize(resize, interpolation=BILINEAR), v2.RandomCrop(cfg.image_size)])
        return MultiView([v2.Compose([cropping, v2.RandomHorizontalFlip(), *self.input_transform(cfg)])])

    def predict_logits(self, lab: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) (L - 50, a, b), of which the encoder reads L -> (B, 313, h, w) bin logits on its output map."""
        return self.head(self.encoder.forward_features(lab))

    def class_weights(self) -> torch.Tensor:
        """w of the 313 bins (eq. 4) from the current prior ``ab_counts``."""
        hp = self.hparams
        return rebalancing_weights(smoothed_prior(self.ab_counts, self.ab_bins, hp.prior_sigma), hp.rebalance_lambda)

    def forward(self, batch: Batch) -> MethodOutput:
        hp = self.hparams
        if len(batch.views) != 1 or batch.views[0].ndim != 4 or batch.views[0].shape[1] != 3:
            raise ValueError(
                f"Colorization takes 1 view, the (L - 50, a, b) image (B, 3, H, W); got {len(batch.views)} views of "
                f"shape {[tuple(v.shape) for v in batch.views]}"
            )
        lab = batch.views[0]
        logits = self.predict_logits(lab).float()
        ab = F.interpolate(lab[:, 1:].float(), size=logits.shape[-2:], mode="nearest")  # every s-th pixel
        targets = soft_encode(ab, self.ab_bins, hp.neighbours, hp.encoding_sigma)
        nearest = targets.argmax(1)  # q*
        if self.training and not hp.prior_file:
            self.ab_counts += sum_over_processes(torch.bincount(nearest.flatten(), minlength=NUM_BINS).double())
        colourful = (ab.abs() > GRAY_THRESHOLD).flatten(1).any(1)
        weights = self.class_weights().to(logits)[nearest] * colourful[:, None, None]
        cross_entropy = -(targets * F.log_softmax(logits, dim=1)).sum(1)
        loss = (weights * cross_entropy).mean()
        metrics = {"cross_entropy": float(cross_entropy.detach().mean()), "colourful": float(colourful.float().mean())}
        return MethodOutput(loss, metrics)


@torch.no_grad()
def colorize(model, images: Sequence, temperature: float | None = None) -> list[Image.Image]:
    """Colour ``images`` (RGB PIL images or (3, H, W) tensors in [0, 1]; only their L is used) with a colorization
    model (``create_model(..., task="pretraining")`` or its ``method``): L at the image's own size, ab the annealed
    mean (eq. 5, T = ``temperature`` or the model's) of the prediction on the image resized to ``image_size``,
    bilinearly upsampled to the image size; returns RGB PIL images of the input sizes."""
    method = getattr(model, "method", model)
    if not isinstance(method, Colorization):
        raise ValueError(f"colorize needs a colorization model, got {type(method).__name__}")
    temperature = method.hparams.temperature if temperature is None else temperature
    size = method.config.image_size
    was_training, device = method.training, method.ab_bins.device
    method.eval()
    try:
        coloured = []
        for image in images:
            lab = rgb_to_lab(_rgb_tensor(image).to(device))
            centred = CentredLab()(lab)[None]
            small = F.interpolate(centred, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            probabilities = torch.softmax(method.predict_logits(small).float(), dim=1)
            ab = annealed_mean(probabilities, method.ab_bins, temperature)
            ab = F.interpolate(ab, size=lab.shape[-2:], mode="bilinear", align_corners=False)[0]
            rgb = lab_to_rgb(torch.cat([lab[:1], ab]))
            coloured.append(v2.functional.to_pil_image((rgb * 255).round().to(torch.uint8).cpu()))
        return coloured
    finally:
        method.train(was_training)


register_preset(
    Preset(
        "colorization_resnet50",
        "colorization",
        "resnet50",
        backbone_kwargs={"in_chans": 1},
        description="Colorization on a timm resnet50 with a 1-channel conv1 on L and layer4 at stride 1 (VISSL / "
        "Goyal'19), 313 ab bins, the authors' solver (Adam lr 3e-5 per 40, wd 1e-3, 16 epochs, step at 7)",
    )
)

# A ResNet-18 on 32 px images ends in a 1x1 map: one location, a single colour per image. layer3 and layer4 at stride
# 1 (VISSL's undilated LAYER4_STRIDE 1, also on layer3) keep a 4x4 map at output stride 8, the authors' subsampling
# of the ab target by the output stride (4 in their VGG network, 16 in VISSL's ResNet-50). The CIFAR recipes' padded
# crop replaces the 176-of-256 crop, which would cut a third of a 32 px image away.
register_preset(
    Preset(
        "colorization_resnet18_32px",
        "colorization",
        "resnet18",
        image_size=32,
        backbone_kwargs={"in_chans": 1},
        method_kwargs={"stride_one_stages": ("layer3", "layer4"), "crop_padding": 4},
        description="Colorization, ResNet-18 for 32 px images: layer3 / layer4 at stride 1 (a 4x4 map), padded crop "
        "+ flip, the authors' solver",
    )
)

# ---- releases ------------------------------------------------------------------------------------------------------
VISSL_SOURCE = (
    "facebookresearch/vissl MODEL_ZOO.md, Colorization, RN50 - Goyal'19 ({data}) (benchmark "
    "configs/config/model_zoo/benchmark_in1k_linear_colorization.json: STATE_DICT_KEY_NAME model_state_dict, "
    "models/resnet50_colorization.yaml: INPUT_TYPE lab, LAYER4_STRIDE 1); trained by Goyal et al. 2019 "
    "(arXiv 1905.01235, facebookresearch/fair_self_supervision_benchmark resnet50_colorization_{short}_pretext.pkl) "
    "and converted for VISSL; linear = VISSL's ImageNet-1k linear benchmark, the best of linear probes on pooled "
    "conv1 and res2-res5 (not pooler_output = res5avg); VISSL is MIT-licensed and its MODEL_ZOO.md states no other "
    "licence for the weights"
)
for _tag, _data, _short, _linear, _dataset in (
    ("in1k_goyal19", "ImageNet-1K", "in1k", 40.11, None),
    ("in22k_goyal19", "ImageNet-22K", "in22k", 49.24, "imagenet-22k"),
    ("yfcc100m_goyal19", "YFCC100M", "yfcc100m", 47.46, "yfcc100m"),
):
    register_pretrained(
        PretrainedTag(
            "colorization_resnet50",
            _tag,
            url=VISSL_ZOO + f"converted_vissl_rn50_colorization_{_short}_goyal19.torch",
            layout="colorization_vissl",
            license="mit",
            epochs=None,
            metrics={"linear": _linear},
            pretraining_data=_dataset,
            source=VISSL_SOURCE.format(data=_data, short=_short),
        )
    )
