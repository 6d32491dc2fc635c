"""View recipes on torchvision.transforms.v2, as in each method's official code.

A recipe maps an RGB PIL image to the list of views its method trains on (float32, normalised, CHW);
``eval_transform`` maps it to one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC


class MultiView:
    """One transform per view, each an independent draw: ``MultiView([t1, t2])(x) -> [t1(x), t2(x)]``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """``ToTensor`` + ``Normalize`` of the official recipes, ending in a plain ``torch.Tensor``."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


def _color_distortion(saturation: float) -> list[v2.Transform]:
    """SimCLR's colour distortion as MoCo v2 and DINO use it: jitter (brightness 0.4, contrast 0.4,
    ``saturation``, hue 0.1) with p=0.8, then grayscale with p=0.2."""
    return [v2.RandomApply([v2.ColorJitter(0.4, 0.4, saturation, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]


def _blur(image_size: int, p: float, kernel_size: int | None = None) -> v2.Transform:
    """Gaussian blur, σ ~ U[0.1, 2], with probability ``p``. The official code blurs with PIL (radius σ, no
    kernel size); the kernel here is SimCLR's: odd, about 10 % of the image side, at least 3, unless
    ``kernel_size`` is given (DINOv2 uses torchvision's blur with a 9 x 9 kernel)."""
    kernel = kernel_size or max(3, 2 * (image_size // 20) + 1)
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


def _byol_view(crop: v2.Transform, *extra: v2.Transform, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """``crop``, flip, colour jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale (p=0.2), then ``extra`` (blur, solarise)."""
    return v2.Compose(
        [crop, v2.RandomHorizontalFlip(), *_color_distortion(saturation=0.2), *extra, *_normalize(mean, std)]
    )


def _byol_pair(
    crop: v2.Transform,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    blur: tuple[float, float] = (1.0, 0.1),
    blur_kernel_size: int | None = None,
) -> list[v2.Compose]:
    """BYOL's asymmetric views (arXiv 2006.07733, Table 6): the first blurred with p=``blur[0]`` (always), the
    second blurred with p=``blur[1]`` (0.1) and solarised (threshold 128) with p=0.2."""
    return [
        _byol_view(crop, _blur(size, blur[0], blur_kernel_size), mean=mean, std=std),
        _byol_view(crop, _blur(size, blur[1], blur_kernel_size), v2.RandomSolarize(128, p=0.2), mean=mean, std=std),
    ]


def two_view_moco_v1(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = (0.2, 1.0)
) -> MultiView:
    """MoCo v1 (facebookresearch/moco ``main_moco.py`` without ``--aug-plus``), drawn twice: random resized crop,
    grayscale (p=0.2), colour jitter 0.4/0.4/0.4/0.4 (always), horizontal flip."""
    view = v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale),
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomHorizontalFlip(),
            *_normalize(mean, std),
        ]
    )
    return MultiView([view, view])


def two_view_moco_v2(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = (0.2, 1.0)
) -> MultiView:
    """MoCo v2 ``aug_plus`` (facebookresearch/moco ``main_moco.py``), drawn twice: random resized crop, colour
    jitter 0.4/0.4/0.4/0.1 (p=0.8), grayscale (p=0.2), blur (p=0.5), horizontal flip."""
    view = v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale),
            *_color_distortion(saturation=0.4),
            _blur(image_size, p=0.5),
            v2.RandomHorizontalFlip(),
            *_normalize(mean, std),
        ]
    )
    return MultiView([view, view])


def two_view_moco_v3(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = (0.08, 1.0)
) -> MultiView:
    """MoCo v3 (facebookresearch/moco-v3 ``main_moco.py``): BYOL's asymmetric pair with bilinear random resized
    crops. The official code flips last; flipping commutes with the colour operations and the isotropic blur, so
    the views have the same distribution."""
    return MultiView(_byol_pair(v2.RandomResizedCrop(image_size, scale=scale), image_size, mean, std))


def multi_crop_dino(
    global_size: int,
    local_size: int,
    n_local: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    *,
    mean: Sequence[float],
    std: Sequence[float],
    blur_probabilities: tuple[float, float, float] = (1.0, 0.1, 0.5),
    blur_kernel_size: int | None = None,
) -> MultiView:
    """DINO ``DataAugmentationDINO`` (facebookresearch/dino ``main_dino.py``): ``[global 1, global 2, local
    1..n]``. Every crop is a bicubic random resized crop, flip, colour jitter 0.4/0.4/0.2/0.1 (p=0.8) and
    grayscale (p=0.2); the two global crops are BYOL's pair (global 1 always blurred, global 2 blurred with p=0.1
    and solarised with p=0.2), the locals blurred with p=0.5. ``blur_probabilities`` (global 1, global 2, locals)
    and ``blur_kernel_size`` change the blur (DINOv2, see ``multi_crop_dinov2``)."""
    global_crop = v2.RandomResizedCrop(global_size, scale=global_scale, interpolation=BICUBIC)
    local_crop = v2.RandomResizedCrop(local_size, scale=local_scale, interpolation=BICUBIC)
    *global_blur, local_blur = blur_probabilities
    local = _byol_view(local_crop, _blur(local_size, local_blur, blur_kernel_size), mean=mean, std=std)
    pair = _byol_pair(global_crop, global_size, mean, std, tuple(global_blur), blur_kernel_size)
    return MultiView(pair + [local] * n_local)


def multi_crop_dinov2(
    global_size: int,
    local_size: int,
    n_local: int,
    global_scale: tuple[float, float] = (0.32, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.32),
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> MultiView:
    """DINOv2 ``DataAugmentationDINO`` (facebookresearch/dinov2 ``data/augmentations.py``, crop scales of
    ``ssl_default_config.yaml``): DINO's multi-crop with the blur as the released models were trained. DINOv2's
    ``GaussianBlur(p)`` (``data/transforms.py``) hands ``RandomApply`` the probability ``1 - p``, and torchvision
    applies with the probability it is given: global 1 (p=1.0) is never blurred, global 2 (p=0.1) is blurred with
    probability 0.9, the locals with 0.5; torchvision blur, 9 x 9 kernel, σ ~ U[0.1, 2]."""
    return multi_crop_dino(
        global_size,
        local_size,
        n_local,
        global_scale,
        local_scale,
        mean=mean,
        std=std,
        blur_probabilities=(0.0, 0.9, 0.5),
        blur_kernel_size=9,
    )


def single_view_mae(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = (0.2, 1.0)
) -> MultiView:
    """MAE pretraining (facebookresearch/mae ``main_pretrain.py``): bicubic random resized crop and horizontal
    flip, nothing else."""
    view = v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=BICUBIC),
            v2.RandomHorizontalFlip(),
            *_normalize(mean, std),
        ]
    )
    return MultiView([view])


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float | None = None
) -> v2.Compose:
    """Evaluation as timm and DINO ``eval_linear.py``: bicubic resize of the short side to
    ``int(image_size / crop_pct)``, centre crop, normalise; one tensor. ``crop_pct`` defaults to 0.875
    (256 -> 224), and to 1.0 (no crop) for images of 64 px or less."""
    if crop_pct is None:
        crop_pct = 1.0 if image_size <= 64 else 0.875
    return v2.Compose(
        [
            v2.Resize(int(image_size / crop_pct), interpolation=BICUBIC),
            v2.CenterCrop(image_size),
            *_normalize(mean, std),
        ]
    )
