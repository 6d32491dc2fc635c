"""View recipes on torchvision.transforms.v2: each maps a PIL image to the list of views its method trains on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC


class MultiView:
    """Applies one transform per view: ``MultiView([t1, t2, t2])(image) -> [t1(image), t2(image), t2(image)]``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _blur_kernel(image_size: int) -> int:
    """Odd kernel of about 10 % of the image side, at least 3: SimCLR's size for the σ∈[0.1, 2] blur that MoCo v2
    applies with PIL's radius-based filter."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _color_distortion(jitter: tuple[float, float, float, float]) -> list:
    """Colour jitter (p=0.8) then grayscale (p=0.2), the SimCLR distortion used by MoCo v2 and DINO."""
    return [v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8), v2.RandomGrayscale(p=0.2)]


def _blur(image_size: int, p: float) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(_blur_kernel(image_size), sigma=(0.1, 2.0))], p=p)


def two_view_moco_v2(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = (0.2, 1.0)
) -> MultiView:
    """MoCo v2 ``aug_plus`` (facebookresearch/moco ``main_moco.py``), drawn twice: random resized crop (scale
    0.2-1), colour jitter 0.4/0.4/0.4/0.1 (p=0.8), grayscale (p=0.2), Gaussian blur σ∈[0.1, 2] (p=0.5), flip."""
    view = v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
            *_color_distortion((0.4, 0.4, 0.4, 0.1)),
            _blur(image_size, p=0.5),
            v2.RandomHorizontalFlip(),
            *_to_normalized_tensor(mean, std),
        ]
    )
    return MultiView([view, view])


def multi_crop_dino(
    global_size: int,
    local_size: int,
    n_local: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> MultiView:
    """DINO ``DataAugmentationDINO`` (facebookresearch/dino ``main_dino.py``): 2 global crops (blur p=1.0; blur
    p=0.1 + solarisation p=0.2) and ``n_local`` local crops (blur p=0.5), each with flip, colour jitter
    0.4/0.4/0.2/0.1 (p=0.8) and grayscale (p=0.2); bicubic resized crops."""

    def crop(size: int, scale: tuple[float, float], extra: list) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(),
                *_color_distortion((0.4, 0.4, 0.2, 0.1)),
                *extra,
                *_to_normalized_tensor(mean, std),
            ]
        )

    global_1 = crop(global_size, global_scale, [_blur(global_size, p=1.0)])
    global_2 = crop(global_size, global_scale, [_blur(global_size, p=0.1), v2.RandomSolarize(128, p=0.2)])
    local = crop(local_size, local_scale, [_blur(local_size, p=0.5)])
    return MultiView([global_1, global_2] + [local] * n_local)


def single_view_mae(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = (0.2, 1.0)
) -> MultiView:
    """MAE pretraining (facebookresearch/mae ``main_pretrain.py``): bicubic random resized crop (scale 0.2-1) and
    flip only."""
    view = v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalized_tensor(mean, std),
        ]
    )
    return MultiView([view])


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float | None = None
) -> v2.Compose:
    """Resize to ``image_size / crop_pct`` (bicubic) and centre-crop, as timm / DINO evaluation (crop 0.875);
    images of 64 px or less are resized without cropping."""
    crop_pct = crop_pct if crop_pct is not None else (1.0 if image_size <= 64 else 0.875)
    return v2.Compose(
        [
            v2.Resize(int(round(image_size / crop_pct)), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalized_tensor(mean, std),
        ]
    )
