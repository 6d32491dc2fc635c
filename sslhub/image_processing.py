"""An sslhub model's evaluation pre-processing outside sslhub's own transforms: ``SSLImageProcessor`` (a transformers
image processor saved as ``preprocessor_config.json``, found by ``AutoImageProcessor`` and the pipelines), timm's
``pretrained_cfg`` (``to_timm``, ``export_timm``) and a stock ``BitImageProcessor`` (``export_transformers``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypedDict

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from transformers import AutoImageProcessor, BitImageProcessor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import PILImageResampling
from transformers.utils import IMAGE_PROCESSOR_NAME

from sslhub.configuration import SSLConfig
from sslhub.methods.base import SSLMethod
from sslhub.registry import get_method
from sslhub.transforms import eval_crop_pct, eval_transform


class SSLImagesKwargs(TypedDict, total=False):
    """The fields of an ``SSLImageProcessor`` (its ``preprocessor_config.json``)."""

    method: str
    image_size: int
    crop_pct: float
    interpolation: str
    image_mean: list[float]
    image_std: list[float]


FIELDS = tuple(SSLImagesKwargs.__annotations__)


def eval_preprocessing(config: SSLConfig) -> SSLImagesKwargs:
    """The fields of ``config``'s evaluation pre-processing (``SSLMethod.eval_transform``): the method (its input
    conversion, e.g. CMC's Lab), the crop size, the crop's share of the resized image, the resize interpolation
    (torchvision's name, which is also timm's), mean and std."""
    return SSLImagesKwargs(
        method=config.method,
        image_size=config.image_size,
        crop_pct=eval_crop_pct(config.image_size),
        interpolation=get_method(config.method).eval_interpolation.value,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def rgb_input(method: str) -> bool:
    """Whether the encoders of ``method`` take normalised RGB (the default ``SSLMethod.input_transform``), which timm's
    and transformers' mean / std describe; CMC's and Colorization's take L*a*b*."""
    return get_method(method).input_transform.__func__ is SSLMethod.input_transform.__func__


class SSLImageProcessor(BaseImageProcessor):
    """sslhub's evaluation pre-processing as a transformers image processor: ``processor(images, return_tensors="pt")
    ["pixel_values"]`` is ``sslhub.create_transform(model)`` of each image (converted to RGB), stacked: resize of the
    short side to ``int(image_size / crop_pct)`` with ``interpolation``, centre crop of ``image_size`` px, then the
    method's input conversion (normalised RGB; CMC: normalised L*a*b*). Images are PIL images, or arrays / tensors
    that transformers' ``to_pil_image`` converts.

    Every sslhub ``save_pretrained`` writes one; ``AutoImageProcessor`` and ``pipeline`` load it once sslhub is
    imported. ``from_config(config)`` builds it from an ``SSLConfig``."""

    valid_kwargs = SSLImagesKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, method: str, image_size: int, crop_pct: float, interpolation: str, image_mean: list[float],
                 image_std: list[float], **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.method, self.image_size, self.crop_pct = method, image_size, crop_pct
        self.interpolation, self.image_mean, self.image_std = interpolation, list(image_mean), list(image_std)
        self.transform()  # a ValueError naming the field it cannot use

    @classmethod
    def from_config(cls, config: SSLConfig, **overrides) -> SSLImageProcessor:
        """The processor of ``config``'s evaluation pre-processing; ``overrides`` replace its fields."""
        return cls(**{**eval_preprocessing(config), **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SSLImageProcessor:
        """transformers' ``from_pretrained``; a checkpoint directory saved without ``preprocessor_config.json`` (by an
        older sslhub) gets the processor of its ``config.json``, with the fields among ``kwargs`` replaced."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and not (path / IMAGE_PROCESSOR_NAME).is_file():
            fields = {key: value for key, value in kwargs.items() if key in FIELDS}
            return cls.from_config(SSLConfig.from_pretrained(path), **fields)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def fields(self) -> SSLImagesKwargs:
        return SSLImagesKwargs(**{name: getattr(self, name) for name in FIELDS})

    def transform(self) -> v2.Compose:
        """The torchvision transform of one RGB PIL image, as ``SSLMethod.eval_transform`` builds it."""
        try:
            interpolation = v2.InterpolationMode(self.interpolation)
        except ValueError:
            modes = [mode.value for mode in v2.InterpolationMode]
            raise ValueError(
                f"{IMAGE_PROCESSOR_NAME}: interpolation must be one of {modes}, got {self.interpolation!r}"
            ) from None
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, int | float) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"{IMAGE_PROCESSOR_NAME}: crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
        # The method's input conversion reads the config's mean and std (CMC: the Lab statistics).
        config = SSLConfig(method=self.method, image_size=self.image_size, image_mean=self.image_mean,
                           image_std=self.image_std)  # fmt: skip
        to_input = get_method(self.method).input_transform(config)
        return eval_transform(self.image_size, self.image_mean, self.image_std, self.crop_pct, interpolation, to_input)

    def preprocess(self, images, return_tensors: str | None = None, **overrides) -> BatchFeature:
        """``{"pixel_values": (B, C, image_size, image_size)}`` of one image or a list; ``overrides`` replace fields
        for this call (``pipeline(..., image_processor_kwargs={"crop_pct": 0.875})``)."""
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise ValueError(f"SSLImageProcessor: unknown argument(s) {unknown}; its fields are {list(FIELDS)}")
        transform = (type(self)(**{**self.fields(), **overrides}) if overrides else self).transform()
        images = images if isinstance(images, list | tuple) else [images]
        pixels = [transform(_rgb_image(image)) for image in images]
        return BatchFeature({"pixel_values": torch.stack(pixels)}, tensor_type=return_tensors)


def _rgb_image(image) -> Image.Image:
    image = image if isinstance(image, Image.Image) else to_pil_image(image)
    return image.convert("RGB")


# Fields of a timm model's pretrained cfg that describe the architecture, not the weights it was released with.
_ARCHITECTURE_CFG_FIELDS = ("architecture", "fixed_input_size", "first_conv", "classifier")


def timm_pretrained_cfg(config: SSLConfig, model: nn.Module) -> dict:
    """The timm ``pretrained_cfg`` of the timm model ``model`` holding ``config``'s encoder: its input size, mean and
    std, crop_pct and interpolation of the method's evaluation pre-processing (so that timm's
    ``create_transform(**resolve_data_config(model=model))`` is ``sslhub.create_transform`` for RGB methods; the mean /
    std of CMC and Colorization describe their L*a*b* input only with sslhub's transform), tag = the method,
    ``model``'s classes (0: an sslhub encoder has no classifier) and its architecture fields. Nothing of the stock
    timm weights (url, Hub id, tag, licence, test size); ``pool_size`` None, as timm's ``save_for_hf`` writes for
    another input size (output strides vary too)."""
    fields = eval_preprocessing(config)
    channels = config.backbone_kwargs.get("in_chans", 3)
    return {
        **{key: model.pretrained_cfg[key] for key in _ARCHITECTURE_CFG_FIELDS if key in model.pretrained_cfg},
        "tag": config.method,
        "custom_load": False,
        "input_size": (channels, config.image_size, config.image_size),
        "interpolation": fields["interpolation"],
        "crop_pct": fields["crop_pct"],
        "crop_mode": "center",
        "mean": tuple(fields["image_mean"]),
        "std": tuple(fields["image_std"]),
        "num_classes": model.num_classes,
        "pool_size": None,
    }


def stock_image_processor(config: SSLConfig) -> BitImageProcessor:
    """``config``'s evaluation pre-processing as transformers' ``BitImageProcessor`` (DINOv2's on the Hub), for an
    export loaded by transformers alone: short side resized to ``int(image_size / crop_pct)``, centre crop, rescale,
    mean / std. With ``backend="pil"`` its pixel values are sslhub's, except that transformers floors an odd crop
    offset where torchvision rounds it (half to even: a one-pixel shift when the resized side exceeds the crop by
    3 mod 4); the default torchvision backend resizes tensors, whose antialiasing differs from PIL's."""
    if not rgb_input(config.method):
        raise ValueError(
            f"the {config.method} encoder takes L*a*b* input, which no stock transformers image processor computes; "
            "use sslhub.SSLImageProcessor"
        )
    fields = eval_preprocessing(config)
    size = fields["image_size"]
    return BitImageProcessor(
        size={"shortest_edge": int(size / fields["crop_pct"])},
        crop_size={"height": size, "width": size},
        resample=PILImageResampling[fields["interpolation"].upper()],
        image_mean=fields["image_mean"],
        image_std=fields["image_std"],
    )


AutoImageProcessor.register(
    SSLConfig, image_processor_classes={"torchvision": SSLImageProcessor, "pil": SSLImageProcessor}
)
