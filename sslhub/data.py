"""Image data for pretraining and evaluation: the built-in digits, Fashion-MNIST, image folders, HF datasets.

Every source becomes an ``ImageDataset`` of RGB PIL images (+ integer labels when known). Its augmentations are a
pure function of ``(seed, epoch, index)``, so data order and views do not depend on workers, prefetching or the
number of processes, and a resumed run sees exactly the views of an uninterrupted one.
"""

from __future__ import annotations

import gzip
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
HF_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGEFOLDER_METADATA = ("metadata.csv", "metadata.jsonl")


class DatasetNotFoundError(FileNotFoundError):
    """A named dataset whose files are not installed."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and 32-bit integer images are rescaled, not clipped; float images are taken
    as [0, 1]; transparency (RGBA, LA, palette with transparency) is dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16).astype(np.float64)
        image = Image.fromarray(np.round(array / 257.0).astype(np.uint8))
    elif image.mode == "I":
        array = np.asarray(image, dtype=np.int64)
        scale = 257.0 if array.max(initial=0) <= 65535 else 16843009.0
        image = Image.fromarray(np.round(np.clip(array, 0, None) / scale).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.round(np.clip(np.asarray(image), 0.0, 1.0) * 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def view_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageDataset(Dataset):
    """``(transform(rgb image), label)`` items; label is -1 when the data has none.

    ``load(i)`` returns the i-th image in any PIL mode; ``labels`` are integer class ids aligned with it.
    """

    def __init__(
        self,
        load: Callable[[int], Image.Image],
        length: int,
        labels: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        seed: int = 0,
    ):
        if labels is not None and len(labels) != length:
            raise ValueError(f"{len(labels)} labels for {length} images")
        self.load = load
        self.length = length
        self.labels = None if labels is None else [int(label) for label in labels]
        self.classes = None if classes is None else list(classes)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        image = to_rgb(self.load(index))
        label = -1 if self.labels is None else self.labels[index]
        if self.transform is None:
            return image, label
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = view_seed(self.seed, self.epoch, index)
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues lazy CUDA seeding
            random.seed(seed)
            try:
                return self.transform(image), label
            finally:
                random.setstate(python_state)


def _array_dataset(images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ImageDataset:
    return ImageDataset(lambda i: Image.fromarray(images[i]), len(images), labels.tolist(), classes)


def builtin_digits(split: str) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0-16), seeded stratified 80 / 20 train / test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train, test = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target)
    chosen = {"train": train, "test": test}[_check_split(split, ("train", "test"), "builtin")]
    return _array_dataset(images[chosen], digits.target[chosen], [str(d) for d in range(10)])


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(split: str) -> ImageDataset:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or ``$SSLHUB_FASHION_MNIST_DIR``)."""
    root = Path(os.environ.get("SSLHUB_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = {"train": "train", "test": "t10k"}[_check_split(split, ("train", "test"), "fashion-mnist")]
    image_file, label_file = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not image_file.exists() or not label_file.exists():
        raise DatasetNotFoundError(
            f"Fashion-MNIST files not found in {root} ({image_file.name}, {label_file.name}). "
            "Install them with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, as root), or set "
            "SSLHUB_FASHION_MNIST_DIR to a directory holding them."
        )
    labels = _read_idx(label_file, offset=8)
    images = _read_idx(image_file, offset=16).reshape(len(labels), 28, 28)
    return _array_dataset(images, labels, FASHION_MNIST_CLASSES)


def _check_split(split: str, known: Sequence[str], name: str) -> str:
    if split not in known:
        raise ValueError(f"{name!r} has the splits {list(known)}, not {split!r}")
    return split


def _image_extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def image_folder(directory: Path) -> ImageDataset:
    """Images found recursively; class = first-level subfolder when every image sits in one. Unreadable or
    non-image files are skipped with one warning that names them."""
    extensions = _image_extensions()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.suffix.lower() in extensions]
    good = [p for p in candidates if _readable(p)]
    skipped = [p for p in files if p not in set(good)]
    if skipped:
        names = ", ".join(str(p.relative_to(directory)) for p in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(
            f"Skipped {len(skipped)} unreadable or non-image file(s) in {directory}: {names}{more}", stacklevel=3
        )
    if not good:
        raise ValueError(f"No readable images found in {directory}")
    parts = [p.relative_to(directory).parts for p in good]
    labels = classes = None
    if all(len(part) > 1 for part in parts):
        classes = sorted({part[0] for part in parts})
        labels = [classes.index(part[0]) for part in parts]
    return ImageDataset(lambda i: _open_image(good[i]), len(good), labels, classes)


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def hf_dataset(dataset, spec: str, image_column: str | None, label_column: str | None) -> ImageDataset:
    """A Hugging Face ``datasets.Dataset`` with an image column and, optionally, a class-label column."""
    from datasets import ClassLabel
    from datasets import Image as HFImage

    features = dataset.features
    if image_column is None:
        image_column = next((name for name, f in features.items() if isinstance(f, HFImage)), None)
    if image_column not in features:
        raise ValueError(f"{spec}: no image column {image_column!r}; columns are {list(features)}")
    if label_column is None:
        label_column = next((name for name, f in features.items() if isinstance(f, ClassLabel)), None)
        label_column = label_column or ("label" if "label" in features else None)
    elif label_column not in features:
        raise ValueError(f"{spec}: no label column {label_column!r}; columns are {list(features)}")
    labels = classes = None
    if label_column is not None:
        labels = dataset[label_column]
        feature = features[label_column]
        classes = feature.names if isinstance(feature, ClassLabel) else [str(c) for c in sorted(set(labels))]
    images = dataset.select_columns([image_column])
    return ImageDataset(lambda i: images[i][image_column], len(dataset), labels, classes)


def load_image_dataset(
    spec: str, split: str = "train", *, image_column: str | None = None, label_column: str | None = None
) -> ImageDataset:
    """``builtin`` (default, scikit-learn digits), ``fashion-mnist``, a directory saved with HF ``save_to_disk``, an
    HF ``imagefolder`` directory (with ``metadata.csv``/``.jsonl``) or any folder of images."""
    if spec == "builtin":
        return builtin_digits(split)
    if spec == "fashion-mnist":
        return fashion_mnist(split)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"--data {spec!r}: expected 'builtin', 'fashion-mnist', a folder of images or a Hugging Face dataset "
            "directory (save_to_disk or imagefolder), and no such directory exists"
        )
    if any((path / marker).exists() for marker in HF_SAVED_MARKERS):
        from datasets import DatasetDict, load_from_disk

        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"{spec}: no split {split!r}; splits are {list(loaded)}")
            loaded = loaded[split]
        elif split != "train":
            raise ValueError(f"{spec}: a single saved dataset has no {split!r} split")
        return hf_dataset(loaded, spec, image_column, label_column)
    if any((path / name).exists() for name in IMAGEFOLDER_METADATA):
        from datasets import load_dataset

        return hf_dataset(
            load_dataset("imagefolder", data_dir=str(path), split=split), spec, image_column, label_column
        )
    if split != "train":
        raise ValueError(f"{spec}: an image folder has only the 'train' split")
    return image_folder(path)


def multi_view_collate(batch: Sequence[tuple]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``[(views, label), ...]`` -> ``([view_0 batch, view_1 batch, ...], labels)``; a single tensor counts as one
    view."""
    views = [item[0] if isinstance(item[0], list | tuple) else [item[0]] for item in batch]
    stacked = [torch.stack(position) for position in zip(*views, strict=True)]
    return stacked, torch.tensor([item[1] for item in batch], dtype=torch.long)
