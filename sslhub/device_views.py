"""Fused views finished batched on the device (``sslhub pretrain --augment-on cuda``, or ``cpu``).

In the loader workers a recipe made of fused ``View``s runs *deferred* (``DeferredViews``): each view makes exactly
the random draws of the CPU path (same calls, same order, so the same seed gives the same parameters), runs its
pieces up to the last random resized crop there (the crop needs the variable-size source image), and records the
parameters of the pieces after it (flip, colour jitter order and factors, grayscale, Pillow or kernel blur σ,
solarise: a gate and the parameters per piece) as one float32 row per view. The loader collates the uint8 crops and
the rows; ``DeferredViews.apply`` runs the remaining pieces on the whole batch with per-sample parameters
(``batched_jitter``, ``batched_grayscale``, ``batched_pillow_blur``, ``batched_kernel_blur``, ``batched_solarize``,
then the normalisation) before the method's forward. Each batched piece computes what the CPU piece of
``sslhub.transforms`` computes, sample by sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from sslhub.batch import Batch, Sample
from sslhub.transforms import _FUSED, _GRAY_WEIGHTS, MultiView, PillowGaussianBlur, View, ViewRecipe, Views, _drawn

PARAMETERS = "deferred_view_parameters"  # the extras key of the per-view parameter rows, (B, width) per view
BLUR_PASSES = 3  # ImageFilter.GaussianBlur's box blurs (ImagingGaussianBlur(..., passes=3))
_GATED = (v2.RandomHorizontalFlip, v2.RandomGrayscale, v2.RandomSolarize)  # a gate p and no other parameter
_WIDTHS = {v2.ColorJitter: 9, PillowGaussianBlur: 2, v2.GaussianBlur: 3, **dict.fromkeys(_GATED, 1)}


# ---- batched pieces: (B, 3, H, W) uint8 in, uint8 out, one parameter row per sample -------------------------------
def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float32, device=x.device)
    return weights[0] * x[:, 0:1] + weights[1] * x[:, 1:2] + weights[2] * x[:, 2:3]


def _shift_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """``sslhub.transforms._shift_hue`` of float (B, 3, H, W) in [0, 255], hue shift per sample (B, 1, 1, 1)."""
    r, g, b = x.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    is_r = value == r
    is_g = (value == g) & ~is_r
    is_b = ~(is_r | is_g)
    sextant = is_r * (g - b) + is_g * (b - r + 2 * chroma) + is_b * (r - g + 4 * chroma)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = offsets + ((sextant / chroma.clamp_min(1e-6)).unsqueeze(1) + 6 * hue)
    k = k - 6 * torch.floor(k / 6)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def batched_jitter(images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``jitter_colors`` per sample: ``order`` (B, 4) the operations (0 brightness, 1 contrast, 2 saturation, 3 hue)
    in the order ColorJitter drew them, ``factors`` (B, 4) their factors, NaN for an operation the jitter lacks
    (a zero range); one float32 pass rounded once."""
    x = images.to(torch.float32)
    present = ~factors.isnan()
    factors = factors.nan_to_num(0.0)
    b, c, s, h = (_per_sample(factors[:, i]) for i in range(4))
    operations = (
        lambda x: (x * b).clamp(0, 255),
        lambda x: (c * x + (1 - c) * _luma(x).mean((-2, -1), keepdim=True)).clamp(0, 255),
        lambda x: (s * x + (1 - s) * _luma(x)).clamp(0, 255),
        lambda x: _shift_hue(x, h),
    )
    for position in range(4):
        for index, operation in enumerate(operations):
            x = torch.where(_per_sample((order[:, position] == index) & present[:, index]), operation(x), x)
    return x.round().to(torch.uint8)


def batched_grayscale(images: torch.Tensor) -> torch.Tensor:
    """``pil_grayscale`` of every sample: Pillow's L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, on 3 channels."""
    r, g, b = images.to(torch.int32).unbind(1)
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8).unsqueeze(1).expand_as(images)


def batched_solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """``_solarize``: values >= ``threshold`` inverted."""
    return torch.where(images >= threshold, 255 - images, images)


def pillow_box_radius(sigma: torch.Tensor, passes: int = BLUR_PASSES) -> torch.Tensor:
    """Pillow's "extended" box radius of a Gaussian blur of std ``sigma`` (float32) as ``passes`` box blurs, in
    Pillow's precision (``libImaging/BoxBlur.c _gaussian_blur_radius``, after Gwosdek et al. 2011): σ² = r²/n,
    L = sqrt(12 σ² + 1) (double), l = floor((L - 1) / 2), a = (2l + 1)(l(l + 1) - 3σ²) / (6(σ² - (l + 1)²)), l + a."""
    sigma2 = sigma * sigma / passes
    length = torch.sqrt(12.0 * sigma2.double() + 1.0).float()
    whole = torch.floor((length.double() - 1.0) / 2.0).float()
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    fraction = fraction / (6 * (sigma2 - (whole + 1) * (whole + 1)))
    return whole + fraction


def _box_pass(x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """One ``ImagingHorizontalBoxBlur`` along the last axis of int64 (B, C, H, W) with a fractional radius per
    sample (B,): r = int(radius), ww = uint(2^24 / (2 radius + 1)) (float32), fw = (2^24 - (2r + 1) ww) / 2; out =
    (ww Σ_{|k|<=r} in[x+k] + fw (in[x-r-1] + in[x+r+1]) + 2^23) >> 24, indices clamped to the line (edge pixels
    repeated, as the C loop's accumulator does)."""
    width = x.shape[-1]
    whole = radius.to(torch.int64)
    ww = (torch.tensor(2.0**24, device=x.device) / (radius * 2 + 1)).to(torch.int64)
    fw = (2**24 - (whole * 2 + 1) * ww) // 2
    whole, ww, fw = _per_sample(whole), _per_sample(ww), _per_sample(fw)
    position = torch.arange(width, device=x.device)
    shape = (*x.shape[:-1], width)

    def take(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return source.gather(-1, index.expand(shape))

    sums = nnf.pad(x.cumsum(-1), (1, 0))  # sums[..., j] = Σ_{i<j} x[..., i]
    low, high = (position - whole).clamp(min=0), (position + whole).clamp(max=width - 1)
    window = take(sums, high + 1) - take(sums, low)
    window += x[..., :1] * (whole - position).clamp(min=0) + x[..., -1:] * (position + whole - width + 1).clamp(min=0)
    far = take(x, (position - whole - 1).clamp(min=0)) + take(x, (position + whole + 1).clamp(max=width - 1))
    return (window * ww + far * fw + 2**23) >> 24


def batched_pillow_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``pillow_blur`` per sample (``sigma`` (B,) float32): Pillow's ``ImagingGaussianBlur``, ``BLUR_PASSES`` box
    blurs of the extended radius ``pillow_box_radius`` along the rows, then as many along the columns, each pass
    rounded to 8 bits as Pillow's."""
    radius = pillow_box_radius(sigma.to(torch.float32))
    x = images.to(torch.int64)
    for _ in range(BLUR_PASSES):
        x = _box_pass(x, radius)
    x = x.transpose(-1, -2)
    for _ in range(BLUR_PASSES):
        x = _box_pass(x, radius)
    return x.transpose(-1, -2).to(torch.uint8)


def _gaussian_kernels(size: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_get_gaussian_kernel1d`` for each σ of ``sigma`` (B,): (B, size)."""
    limit = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-limit, limit, steps=size, dtype=torch.float32, device=sigma.device)
    return torch.softmax(x.div(sigma.to(torch.float32)[:, None]).pow(2).neg(), dim=1)


def batched_kernel_blur(images: torch.Tensor, kernel_size: Sequence[int], sigma: torch.Tensor) -> torch.Tensor:
    """``kernel_blur`` per sample (``sigma`` (B, 2): σ along x and y): reflected borders, one grouped 1-D
    convolution per axis over all samples and channels."""
    width, height = kernel_size
    batch, channels, rows, columns = images.shape
    x = nnf.pad(images.to(torch.float32), [width // 2, width // 2, height // 2, height // 2], mode="reflect")
    x = x.reshape(1, batch * channels, *x.shape[-2:])
    along_x = _gaussian_kernels(width, sigma[:, 0]).repeat_interleave(channels, 0).view(-1, 1, 1, width)
    along_y = _gaussian_kernels(height, sigma[:, 1]).repeat_interleave(channels, 0).view(-1, 1, height, 1)
    x = nnf.conv2d(nnf.conv2d(x, along_x, groups=batch * channels), along_y, groups=batch * channels)
    return x.view(batch, channels, rows, columns).round_().clamp_(0, 255).to(torch.uint8)


# ---- deferred views -------------------------------------------------------------------------------------------------
def _leaves(transform) -> list:
    """The pieces ``transform`` applies, ``RandomApply`` unwrapped: one parameter slot each."""
    if isinstance(transform, v2.RandomApply):
        return [leaf for inner in transform.transforms for leaf in _leaves(inner)]
    return [transform]


def _record(transform, image: torch.Tensor, on: bool, row: list[float]) -> None:
    """Append ``transform``'s slots to ``row`` (per leaf: applied 0/1, then its parameters), drawing exactly what the
    fused CPU piece draws: nothing inside a ``RandomApply`` whose gate is closed."""
    if isinstance(transform, v2.RandomApply):
        on = on and _drawn(transform)
        for inner in transform.transforms:
            _record(inner, image, on, row)
    elif isinstance(transform, _GATED):
        row.append(float(on and _drawn(transform)))
    elif isinstance(transform, v2.ColorJitter):
        if on:
            params = transform.make_params([image])
            names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
            factors = [math.nan if params[name] is None else params[name] for name in names]
            row += [1.0, *params["fn_idx"].tolist(), *factors]
        else:
            row += [0.0, 0, 1, 2, 3, *(math.nan,) * 4]
    elif isinstance(transform, PillowGaussianBlur):
        row += [1.0, transform.make_params([image])["sigma"]] if on else [0.0, 1.0]
    elif isinstance(transform, v2.GaussianBlur):
        row += [1.0, *transform.make_params([image])["sigma"]] if on else [0.0, 1.0, 1.0]


def _apply_leaf(transform, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The batched piece of ``transform`` on uint8 ``x`` with its slots (B, width), where its gate is open."""
    on = _per_sample(slot[:, 0] > 0)
    if isinstance(transform, v2.RandomHorizontalFlip):
        out = x.flip(-1)
    elif isinstance(transform, v2.RandomGrayscale):
        out = batched_grayscale(x)
    elif isinstance(transform, v2.RandomSolarize):
        out = batched_solarize(x, transform.threshold)
    elif isinstance(transform, v2.ColorJitter):
        out = batched_jitter(x, slot[:, 1:5].to(torch.int64), slot[:, 5:9])
    elif isinstance(transform, PillowGaussianBlur):
        out = batched_pillow_blur(x, slot[:, 1])
    else:
        out = batched_kernel_blur(x, transform.kernel_size, slot[:, 1:3])
    return torch.where(on, out, x)


def _split(view: View) -> tuple[list, list]:
    """``view``'s pieces up to its last random resized crop (run in the workers), and the others."""
    crops = [i for i, piece in enumerate(view.pieces) if isinstance(piece, v2.RandomResizedCrop)]
    cut = crops[-1] + 1 if crops else 0
    return view.pieces[:cut], view.pieces[cut:]


class DeferredView:
    """A fused ``View`` split in two: ``defer(image) -> (uint8 crop, parameter row)`` in the workers (the pieces up
    to the last random resized crop, then the draws of the others), ``apply(crops, rows)`` on the batch."""

    def __init__(self, view: View):
        self.prefix, self.rest = _split(view)
        self.leaves = [leaf for piece in self.rest for leaf in _leaves(piece)]
        self.width = sum(_WIDTHS[type(leaf)] for leaf in self.leaves)
        self.offset, self.scale = view.offset, view.scale

    def defer(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for piece in self.prefix:
            image = _FUSED[type(piece)](piece, image)
        row: list[float] = []
        for piece in self.rest:
            _record(piece, image, True, row)
        return image, torch.tensor(row, dtype=torch.float32)

    def apply(self, crops: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if crops.dtype != torch.uint8 or rows.shape != (crops.shape[0], self.width):
            raise ValueError(
                f"DeferredView.apply takes uint8 crops (B, 3, H, W) and rows (B, {self.width}), got "
                f"{crops.dtype} {tuple(crops.shape)} and {tuple(rows.shape)}"
            )
        start = 0
        for leaf in self.leaves:
            width = _WIDTHS[type(leaf)]
            crops = _apply_leaf(leaf, crops, rows[:, start : start + width])
            start += width
        offset, scale = self.offset.to(crops.device), self.scale.to(crops.device)
        return (crops.to(torch.float32) - offset) * scale


def deferrable(recipe) -> bool:
    """Whether ``recipe`` is a ``MultiView`` of fused ``View``s that makes its views the ``MultiView`` way, with no
    crop left after each view's last random resized crop."""
    return (
        isinstance(recipe, MultiView)
        and recipe.fused
        and type(recipe).make_views is MultiView.make_views
        and all(type(leaf) in _WIDTHS for t in recipe.transforms for p in _split(t)[1] for leaf in _leaves(p))
    )


class DeferredViews(ViewRecipe):
    """A method's ``MultiView`` of fused views run deferred: samples hold the uint8 crops and, in
    ``extras[PARAMETERS]``, one parameter row per view; ``collate`` is the recipe's; ``apply(batch)`` finishes the
    views batched wherever the batch (or ``device``) is. Same seed, same parameters and views as the recipe."""

    def __init__(self, recipe: ViewRecipe, method: str):
        if not deferrable(recipe):
            raise ValueError(
                f"--augment-on: {method}'s view recipe is not made of fused views (crop, flip, colour, blur, "
                f"solarise), so its augmentations cannot run batched on the device; train {method} without it"
            )
        self.recipe = recipe
        self.views = [DeferredView(transform) for transform in recipe.transforms]

    def make_views(self, image) -> Views:
        if isinstance(image, Image.Image) and image.mode == "RGB":
            image = tvf.pil_to_tensor(image)
        elif not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[:-2] == (3,)):
            raise TypeError(f"DeferredViews takes RGB PIL images or uint8 (3, H, W) tensors, got {type(image)}")
        crops, rows = zip(*(view.defer(image.as_subclass(torch.Tensor)) for view in self.views), strict=True)
        return Views(list(crops), {PARAMETERS: list(rows)})

    def collate(self, samples: Sequence[Sample]) -> Batch:
        return self.recipe.collate(samples)

    def apply(self, batch: Batch, device: torch.device | str | None = None) -> Batch:
        """``batch`` with its views finished (float32, normalised) on ``device`` (default: where they are), returned
        where the views came from, and the parameter rows dropped from its extras."""
        extras = dict(batch.extras)
        rows = extras.pop(PARAMETERS)
        device = batch.views[0].device if device is None else torch.device(device)
        views = [
            view.apply(crops.to(device), position_rows.to(device)).to(crops.device)
            for view, crops, position_rows in zip(self.views, batch.views, rows, strict=True)
        ]
        return Batch(views, batch.index, batch.labels, extras)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.recipe})"
