"""View pieces on torchvision.transforms.v2, and the view-recipe contract (DESIGN.md §5).

A method's recipe (in its own file) is a few lines composing these pieces: crops, flips, colour jitter and
distortion, grayscale, blur, solarisation, then ``view(...)`` normalises to a float tensor. A ``ViewRecipe`` maps an
RGB PIL image to ``Views`` (the view tensors plus the method's extras) and collates samples into a ``Batch``;
``eval_transform`` maps an image to the one tensor an encoder is evaluated on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv  # what ColorJitter's hue uses
from torchvision.transforms.v2.functional._misc import _get_gaussian_kernel1d  # GaussianBlur's kernel

from sslhub.batch import Batch, Sample, collate_samples

BICUBIC = v2.InterpolationMode.BICUBIC
BILINEAR = v2.InterpolationMode.BILINEAR
# CIFAR-10's channel statistics as the CIFAR recipes of InstDisc (cifar.py) and InvaSpread (demo_seen.py) normalise
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@dataclass
class Views:
    """What a recipe makes of one image: the view tensors (float32, normalised, CHW) and the method's extras."""

    views: list[torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)


class ViewRecipe:
    """A method's data side: ``recipe(image) -> Views`` and ``recipe.collate(samples) -> Batch``. Subclasses
    implement ``make_views``; ``collate`` stacks views per position and collates extras with
    ``default_collate`` (override it for batch-level extras, drawing from ``sslhub.batch.batch_generator``)."""

    def make_views(self, image) -> Views:
        raise NotImplementedError

    def __call__(self, image) -> Views:
        return self.make_views(image)

    def collate(self, samples: Sequence[Sample]) -> Batch:
        return collate_samples(samples)


class MultiView(ViewRecipe):
    """One transform per view, each an independent draw: ``MultiView([t1, t2])(x).views == [t1(x), t2(x)]``. When
    every transform is a fused ``View``, an RGB PIL image becomes one uint8 tensor that all views crop from."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)
        self.fused = all(isinstance(transform, View) for transform in self.transforms)

    def make_views(self, image) -> Views:
        if self.fused and isinstance(image, Image.Image) and image.mode == "RGB":
            image = tvf.pil_to_tensor(image)
        return Views([transform(image) for transform in self.transforms])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


# ---- pieces --------------------------------------------------------------------------------------------------------
def crop(size: int, scale: tuple[float, float] = (0.08, 1.0), interpolation=BILINEAR) -> v2.Transform:
    """Random resized crop of ``size`` px covering ``scale`` of the image, aspect ratio 3/4 to 4/3 (Inception)."""
    return v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interpolation)


def padded_crop(size: int, padding: int) -> v2.Compose:
    """The CIFAR recipe's crop: a random ``size`` px crop of the image zero-padded by ``padding`` px on each side
    (``RandomCrop(32, padding=4)``), after resizing the short side to ``size`` (identity on 32 px CIFAR images)."""
    return v2.Compose([v2.Resize(size), v2.RandomCrop(size, padding=padding)])


def flip(p: float = 0.5) -> v2.Transform:
    return v2.RandomHorizontalFlip(p)


def color_jitter(
    brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1, p: float = 0.8
) -> v2.Transform:
    """Colour jitter applied with probability ``p`` (``p=1``: always, MoCo v1)."""
    jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
    return jitter if p >= 1 else v2.RandomApply([jitter], p=p)


def grayscale(p: float = 0.2) -> v2.Transform:
    return v2.RandomGrayscale(p=p)


def color_distortion(
    strength: float = 0.5, p: float = 0.8, grayscale_p: float = 0.2, saturation: float | None = None
) -> list[v2.Transform]:
    """SimCLR's colour distortion of strength s (arXiv 2002.05709, Appendix A): colour jitter (brightness, contrast
    and saturation 0.8 s, hue 0.2 s) with probability ``p``, then grayscale with probability ``grayscale_p``. SimCLR
    uses s = 1, MoCo v2 and DINO s = 0.5 (0.4 / 0.4 / 0.4 / 0.1); BYOL lowers the saturation to 0.2
    (``saturation``)."""
    amount = 0.8 * strength
    jitter = color_jitter(amount, amount, amount if saturation is None else saturation, 0.2 * strength, p)
    return [jitter, grayscale(grayscale_p)]


def simclr_blur_kernel(size: int) -> int:
    """SimCLR's blur kernel for ``size`` px views (TF ``data_util.random_blur``: ``kernel_size=height // 10``, made odd
    as ``2 * (kernel_size // 2) + 1``), at least 3: 23 px at 224."""
    return max(3, 2 * (size // 20) + 1)


class PillowGaussianBlur(v2.Transform):
    """Pillow's Gaussian blur of radius σ ~ U[``sigma``] (``ImageFilter.GaussianBlur(radius=σ)``, no kernel size),
    as the official MoCo v2 (``moco/loader.py GaussianBlur``), DINO (``utils.GaussianBlur``) and SwAV
    (``PILRandomGaussianBlur``) blur; σ is drawn from torch's generator (the authors': Python's ``random``), so views
    stay a function of the sample's seed. On PIL images."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        low, high = (float(s) for s in sigma)
        if not 0 < low <= high:
            raise ValueError(f"PillowGaussianBlur: sigma must be a range 0 < low <= high, got {tuple(sigma)}")
        self.sigma = [low, high]  # a list, as v2.GaussianBlur keeps it

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": torch.empty(1).uniform_(*self.sigma).item()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, Image.Image):
            raise TypeError(f"PillowGaussianBlur blurs PIL images (place it before normalize), got {type(inpt)}")
        return inpt.filter(ImageFilter.GaussianBlur(params["sigma"]))


def blur(p: float, sigma: tuple[float, float] = (0.1, 2.0), kernel_size: int | None = None) -> v2.Transform:
    """Gaussian blur with σ ~ U[``sigma``], with probability ``p``: Pillow's radius-σ blur (``PillowGaussianBlur``)
    as the official PyTorch code, or torchvision's blur with a ``kernel_size`` kernel for the recipes whose official
    code blurs with a kernel (TF SimCLR and BYOL: ``simclr_blur_kernel``; DINOv2: 9)."""
    piece = PillowGaussianBlur(sigma) if kernel_size is None else v2.GaussianBlur(kernel_size, sigma=sigma)
    return v2.RandomApply([piece], p=p)


def solarize(p: float, threshold: int = 128) -> v2.Transform:
    return v2.RandomSolarize(threshold, p=p)


# The principal components of ImageNet's RGB pixels in [0, 1] (columns, largest first), as AlexNet's PCA lighting
# noise uses them (fb.resnet.torch ``transforms.lua``, eigval [0.2175, 0.0188, 0.0045]).
IMAGENET_PIXEL_PCS = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def log_uniform(low: float, high: float, shape: Sequence[int] = ()) -> torch.Tensor:
    """Draws from [low, high] uniform in log scale (a factor and its inverse equally likely when low = 1 / high)."""
    return low * (high / low) ** torch.rand(shape)


class PCAContrast:
    """Exemplar-CNN's "contrast 1" (arXiv 1406.6909 §2.1): the projection of every pixel onto each principal component
    of the data's pixels is multiplied by its own factor in ``factors`` (log-uniform), the same for all pixels of the
    image: ``p' = U diag(f) Uᵀ p``, clamped to [0, 1]. On a float RGB tensor in [0, 1] (after ``v2.ToDtype``)."""

    def __init__(self, components: torch.Tensor = IMAGENET_PIXEL_PCS, factors: tuple[float, float] = (0.5, 2.0)):
        self.components, self.factors = components, tuple(factors)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        u = self.components.to(image)
        mixing = u @ torch.diag(log_uniform(*self.factors, (3,)).to(image)) @ u.t()
        return torch.einsum("ij,...jhw->...ihw", mixing, image.as_subclass(torch.Tensor)).clamp(0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(factors={self.factors})"


class HSVPowerContrast:
    """Exemplar-CNN's "contrast 2" (arXiv 1406.6909 §2.1): saturation and value (HSV) each raised to a power in
    ``powers``, multiplied by a factor in ``factors`` (both log-uniform) and shifted by a value in ``shifts``
    (uniform), one draw per channel for the whole image, clamped to [0, 1]. On a float RGB tensor in [0, 1]."""

    def __init__(self, powers=(0.25, 4.0), factors=(0.7, 1.4), shifts=(-0.1, 0.1)):
        self.powers, self.factors, self.shifts = tuple(powers), tuple(factors), tuple(shifts)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        hue, saturation, value = _rgb_to_hsv(image.as_subclass(torch.Tensor)).unbind(-3)
        power, factor = log_uniform(*self.powers, (2,)), log_uniform(*self.factors, (2,))
        shift = torch.empty(2).uniform_(*self.shifts)
        saturation, value = (
            (channel.pow(power[i].item()) * factor[i].item() + shift[i].item()).clamp(0, 1)
            for i, channel in enumerate((saturation, value))
        )
        return _hsv_to_rgb(torch.stack([hue, saturation, value], dim=-3))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(powers={self.powers}, factors={self.factors}, shifts={self.shifts})"


def normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """``ToTensor`` + ``Normalize`` of the official recipes, ending in a plain ``torch.Tensor``."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


# sRGB (D65) -> CIE XYZ and the D65 reference white, as scikit-image's ``rgb2lab`` (CMC's ``RGB2Lab`` calls it)
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* of sRGB values in [0, 1], channels first (..., 3, H, W): sRGB gamma undone (threshold 0.04045),
    XYZ under D65, ``f(t) = t^(1/3)`` above (6/29)^3 and ``7.787 t + 16/116`` below; L in [0, 100], a and b about
    [-86, 98] and [-108, 94] (scikit-image ``rgb2lab``, illuminant D65, 2° observer)."""
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab expects (..., 3, H, W) RGB values, got shape {tuple(rgb.shape)}")
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,...jhw->...ihw", _XYZ_FROM_RGB.to(rgb), linear) / _D65_WHITE.to(rgb)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """sRGB values in [0, 1] of CIE L*a*b* values (..., 3, H, W): the inverse of ``rgb_to_lab`` (scikit-image
    ``lab2rgb``, D65, 2° observer), colours outside the sRGB gamut clipped to [0, 1]."""
    if lab.ndim < 3 or lab.shape[-3] != 3:
        raise ValueError(f"lab_to_rgb expects (..., 3, H, W) L*a*b* values, got shape {tuple(lab.shape)}")
    lightness, a, b = lab.unbind(-3)
    fy = (lightness + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    xyz = torch.where(f > 0.206893, f**3, (f - 16 / 116) / 7.787).clamp_min(0) * _D65_WHITE.to(lab)[:, None, None]
    linear = torch.einsum("ij,...jhw->...ihw", torch.linalg.inv(_XYZ_FROM_RGB).to(lab), xyz)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp(0, 1)


class RGBToLab:
    """``rgb_to_lab`` as a pipeline step on a float RGB image tensor in [0, 1] (after ``v2.ToDtype(scale=True)``)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return rgb_to_lab(image.as_subclass(torch.Tensor))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def lab_input(mean: Sequence[float], std: Sequence[float]) -> list:
    """An RGB image -> its normalised L*a*b* tensor (CMC ``train_CMC.py``: ``RGB2Lab``, ``ToTensor``, ``Normalize``
    with the Lab statistics ``mean`` / ``std``); the Lab counterpart of ``normalize``."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        RGBToLab(),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


# ---- fused views ----------------------------------------------------------------------------------------------------
# ``View`` runs the pieces below on one uint8 (3, H, W) tensor with the random draws of the torchvision transforms
# they are (same calls, same order: the same seed gives the same parameters), crop first, uint8 between pieces, one
# float conversion at the end. Colour work runs on the tensor's numpy planes; Pillow's blur converts to PIL and back.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2)
_HUE_OFFSETS = np.array([5, 3, 1], np.float32).reshape(3, 1, 1)  # R, G, B positions on the hue hexagon


def _luma(x: np.ndarray) -> np.ndarray:
    return _GRAY_WEIGHTS[0] * x[0] + _GRAY_WEIGHTS[1] * x[1] + _GRAY_WEIGHTS[2] * x[2]


def _shift_hue(x: np.ndarray, hue: float) -> np.ndarray:
    """torchvision's ``adjust_hue`` of float planes (3, H, W) in [0, 255]: the hexcone hue h (``_rgb_to_hsv``, in
    sextants) shifted by 6·``hue``, value and chroma kept; channel n = V - C·clamp(min(k, 4 - k), 0, 1) with
    k = (n + h) mod 6, n = 5, 3, 1 for R, G, B (``_hsv_to_rgb`` written without branches)."""
    r, g, b = x
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    is_r = value == r
    is_g = (value == g) & ~is_r
    is_b = ~(is_r | is_g)
    sextant = is_r * (g - b) + is_g * (b - r + 2 * chroma) + is_b * (r - g + 4 * chroma)
    k = _HUE_OFFSETS + (sextant / np.maximum(chroma, 1e-6) + 6 * hue)
    k -= 6 * np.floor(k / 6)
    return value - chroma * np.clip(np.minimum(k, 4 - k), 0, 1)


def jitter_colors(
    image: torch.Tensor,
    order: Sequence[int],
    brightness: float | None,
    contrast: float | None,
    saturation: float | None,
    hue: float | None,
) -> torch.Tensor:
    """``ColorJitter``'s operations (0 brightness, 1 contrast, 2 saturation, 3 hue) in ``order`` on a uint8
    (3, H, W) tensor, as torchvision's float kernels (each clamps to the range; contrast blends with the mean luma,
    saturation with the luma), in one float32 pass rounded once. Official PIL code rounds to uint8 after each
    operation and shifts the hue in 8-bit HSV: pixels differ by a few levels; factors and order are the same."""
    x = image.numpy().astype(np.float32)
    for index in order:
        if index == 0 and brightness is not None:
            x = np.clip(x * brightness, 0, 255)
        elif index == 1 and contrast is not None:
            x = np.clip(contrast * x + (1 - contrast) * _luma(x).mean(), 0, 255)
        elif index == 2 and saturation is not None:
            x = np.clip(saturation * x + (1 - saturation) * _luma(x), 0, 255)
        elif index == 3 and hue is not None:
            x = _shift_hue(x, hue)
    return torch.from_numpy(np.rint(x).astype(np.uint8))


def pil_grayscale(image: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")`` of a uint8 (3, H, W) tensor, repeated to 3 channels: L = (19595 R + 38470 G +
    7471 B + 2^15) >> 16 (``Convert.c``), what the official ``RandomGrayscale`` on PIL images computes."""
    r, g, b = image.numpy().astype(np.int32)
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    return torch.from_numpy(luma.astype(np.uint8)).expand(3, -1, -1)


def pillow_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``PillowGaussianBlur`` of a uint8 (3, H, W) tensor (through a PIL image and back)."""
    blurred = Image.fromarray(image.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(sigma))
    return torch.from_numpy(np.array(blurred)).permute(2, 0, 1)


def kernel_blur(image: torch.Tensor, kernel_size: Sequence[int], sigma: Sequence[float]) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (reflected borders, kernel ``kernel_size``, std ``sigma`` per axis) of a uint8
    (3, H, W) tensor as two 1-D passes: torchvision convolves with the outer product of the same two kernels."""
    width, height = kernel_size
    x = nnf.pad(image[None].to(torch.float32), [width // 2, width // 2, height // 2, height // 2], mode="reflect")
    along_x = _get_gaussian_kernel1d(width, sigma[0], torch.float32, None).view(1, 1, 1, width)
    along_y = _get_gaussian_kernel1d(height, sigma[1], torch.float32, None).view(1, 1, height, 1)
    x = nnf.conv2d(nnf.conv2d(x, along_x.expand(3, 1, 1, width), groups=3), along_y.expand(3, 1, height, 1), groups=3)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def _solarize(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """``solarize``: values >= ``threshold`` inverted (``255 - v``), as one 256-entry lookup."""
    levels = np.arange(256, dtype=np.uint8)
    return torch.from_numpy(np.where(levels >= threshold, 255 - levels, levels).take(image.numpy()))


def _drawn(transform) -> bool:
    """The gate of a random transform applied with probability p, drawn as torchvision does."""
    return bool(torch.rand(1) < transform.p)


def _fused_crop(transform: v2.RandomResizedCrop, image: torch.Tensor) -> torch.Tensor:
    params = transform.make_params([image])
    return tvf.resized_crop(image, **params, size=transform.size, interpolation=transform.interpolation, antialias=True)


def _fused_apply(transform: v2.RandomApply, image: torch.Tensor) -> torch.Tensor:
    if _drawn(transform):
        for inner in transform.transforms:
            image = _FUSED[type(inner)](inner, image)
    return image


def _fused_jitter(transform: v2.ColorJitter, image: torch.Tensor) -> torch.Tensor:
    params = transform.make_params([image])
    return jitter_colors(
        image,
        params["fn_idx"].tolist(),
        params["brightness_factor"],
        params["contrast_factor"],
        params["saturation_factor"],
        params["hue_factor"],
    )


_FUSED: dict[type, Callable] = {
    v2.RandomResizedCrop: _fused_crop,
    v2.RandomApply: _fused_apply,
    v2.RandomHorizontalFlip: lambda t, image: image.flip(-1) if _drawn(t) else image,
    v2.ColorJitter: _fused_jitter,
    v2.RandomGrayscale: lambda t, image: pil_grayscale(image) if _drawn(t) else image,
    v2.RandomSolarize: lambda t, image: _solarize(image, t.threshold) if _drawn(t) else image,
    PillowGaussianBlur: lambda t, image: pillow_blur(image, t.make_params([image])["sigma"]),
    v2.GaussianBlur: lambda t, image: kernel_blur(image, t.kernel_size, t.make_params([image])["sigma"]),
}


def _fusable(transform) -> bool:
    return type(transform) in _FUSED and all(_fusable(t) for t in getattr(transform, "transforms", []))


class View(v2.Compose):
    """One view, ``v2.Compose([*pieces, *normalize(mean, std)])`` (what ``view`` builds from pieces it can fuse),
    run fused on an RGB PIL image or a uint8 (3, H, W) tensor: the same random draws as the composed transforms, the
    crop on the uint8 tensor (torchvision's antialiased resize, Pillow's resampling within one level), the colour
    pieces in numpy (``jitter_colors``, ``pil_grayscale``), one float conversion at the end.
    Other inputs run the composed transforms."""

    def __init__(self, pieces: Sequence[Callable], mean: Sequence[float], std: Sequence[float]):
        super().__init__([*pieces, *normalize(mean, std)])
        self.pieces = list(pieces)
        self.offset = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255)

    def forward(self, *inputs: Any) -> Any:
        image = inputs[0] if len(inputs) == 1 else None
        if isinstance(image, Image.Image) and image.mode == "RGB":
            image = tvf.pil_to_tensor(image)
        elif not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[:-2] == (3,)):
            return super().forward(*inputs)
        image = image.as_subclass(torch.Tensor)
        for piece in self.pieces:
            image = _FUSED[type(piece)](piece, image)
        return (image.to(torch.float32, memory_format=torch.contiguous_format) - self.offset) * self.scale


def view(*pieces: v2.Transform | Sequence[v2.Transform], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One view: the ``pieces`` in order (a piece may be a list of transforms), then ``normalize``; a fused ``View``
    when every piece is one it fuses (crop, flip, jitter, grayscale, blur, solarise)."""
    flat = [t for piece in pieces for t in (piece if isinstance(piece, list | tuple) else [piece])]
    if all(_fusable(t) for t in flat) and len(mean) == 3:
        return View(flat, mean, std)
    return v2.Compose([*flat, *normalize(mean, std)])


def asymmetric_pair(
    crop_transform: v2.Transform,
    mean: Sequence[float],
    std: Sequence[float],
    blur_p: tuple[float, float] = (1.0, 0.1),
    solarize_p: tuple[float, float] = (0.0, 0.2),
    blur_kernel_size: int | None = None,
) -> list[v2.Compose]:
    """BYOL's asymmetric views (arXiv 2006.07733, Table 6), as MoCo v3 and DINO use them: ``crop_transform``, flip,
    colour jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale (p=0.2), then blur with p=``blur_p[i]`` and solarise
    (threshold 128) with p=``solarize_p[i]`` for view i. The blur is Pillow's (radius σ), or torchvision's with a
    ``blur_kernel_size`` kernel (``blur``)."""
    return [
        view(
            crop_transform,
            flip(),
            color_distortion(saturation=0.2),
            blur(blur_p[i], kernel_size=blur_kernel_size),
            *([solarize(solarize_p[i])] if solarize_p[i] > 0 else []),
            mean=mean,
            std=std,
        )
        for i in range(2)
    ]


class CropWithBox:
    """A random resized crop, then a horizontal flip with probability ``flip_p``, that also returns where the view
    lies in the image: ``(x0, y0, x1, y1)``, the view's first and last pixel column / row divided by the image's
    width - 1 / height - 1, x0 and x1 swapped when flipped (x then runs along the view's columns). PixPro's
    ``RandomResizedCropCoord`` + ``RandomHorizontalFlipCoord`` (arXiv 2011.10043, ``transform_coord.py``)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0), interpolation=BILINEAR, flip_p=0.5):
        self.crop, self.flip_p = v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interpolation), flip_p

    def __call__(self, image) -> tuple[Any, torch.Tensor]:
        top, left, height, width = self.crop.get_params(image, list(self.crop.scale), list(self.crop.ratio))
        image_height, image_width = v2.functional.get_size(image)
        right, bottom = left + width - 1, top + height - 1
        box = torch.tensor([left, top, right, bottom]) / torch.tensor([image_width - 1, image_height - 1] * 2)
        view = v2.functional.resized_crop(image, top, left, height, width, self.crop.size, self.crop.interpolation)
        if torch.rand(()) < self.flip_p:
            view, box = v2.functional.horizontal_flip(view), box[[2, 1, 0, 3]]
        return view, box

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop}, flip_p={self.flip_p})"


class BoxedViews(ViewRecipe):
    """One view per ``(geometric, photometric)`` pair: ``geometric(image) -> (view, box)`` (``CropWithBox``), then
    ``photometric(view)`` -> tensor; ``extras["boxes"]`` holds the (n_views, 4) boxes, collated to (B, n_views, 4)."""

    def __init__(self, pairs: Sequence[tuple[Callable, Callable]]):
        self.pairs = list(pairs)

    def make_views(self, image) -> Views:
        views, boxes = [], []
        for geometric, photometric in self.pairs:
            view, box = geometric(image)
            views.append(photometric(view))
            boxes.append(box)
        return Views(views, {"boxes": torch.stack(boxes)})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pairs})"


def eval_crop_pct(image_size: int) -> float:
    """The share of the resized image that ``eval_transform``'s centre crop keeps by default: 0.875 (256 -> 224), and
    1.0 (no crop) for images of 64 px or less."""
    return 1.0 if image_size <= 64 else 0.875


def eval_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float | None = None,
    interpolation: v2.InterpolationMode = BICUBIC,
    to_input: Sequence[Callable] | None = None,
) -> v2.Compose:
    """Evaluation as timm and DINO ``eval_linear.py``: bicubic resize of the short side to
    ``int(image_size / crop_pct)``, centre crop, normalise; one tensor. ``crop_pct`` defaults to
    ``eval_crop_pct(image_size)``; ``interpolation=BILINEAR`` is torchvision's
    ``Resize(256)`` default that the linear evaluations of SimSiam, Barlow Twins and SwAV use. ``to_input`` replaces
    the final ``normalize(mean, std)`` for an encoder whose input is not normalised RGB (CMC's Lab: ``lab_input``)."""
    if crop_pct is None:
        crop_pct = eval_crop_pct(image_size)
    return v2.Compose(
        [
            v2.Resize(int(image_size / crop_pct), interpolation=interpolation),
            v2.CenterCrop(image_size),
            *(normalize(mean, std) if to_input is None else to_input),
        ]
    )
