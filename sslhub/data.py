"""Image data for pretraining and evaluation: the built-in digits, Fashion-MNIST, image folders, HF datasets.

Every source becomes an ``ImageDataset`` of RGB PIL images (+ integer labels when known) whose augmentations
are a pure function of ``(seed, epoch, index)``: views do not depend on workers, prefetching or the number of
processes, and a resumed run sees exactly the views of an uninterrupted one. Image folders and HF datasets whose
decoded images fit in ``DECODED_CACHE_BYTES`` are decoded once, into memory; ``loader_options`` gives the loaders'
worker settings. ``labelled_splits`` gives the (train, evaluation) pair of labelled data that kNN, linear probes and
fine-tuning use.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import random
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from sslhub.batch import Sample

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
HF_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGEFOLDER_METADATA = ("metadata.csv", "metadata.jsonl")
HELD_OUT_SPLITS = ("validation", "val", "test")
MAX_READ_RETRIES = 50  # consecutive unreadable files an ImageDataset replaces before it gives up (timm's _ERROR_RETRY)
MAX_AUTO_WORKERS = 8  # "auto" never starts more worker processes than this
PREFETCH_FACTOR = 2  # batches each worker prepares ahead (torch's default); each one is held in (pinned) memory
DECODED_CACHE_BYTES = 1 << 30  # image folders whose decoded RGB images fit in this are decoded once, into memory
ACCEPTED = (
    "'builtin', 'fashion-mnist', a directory saved with datasets' save_to_disk, an imagefolder directory "
    "with metadata.csv / metadata.jsonl, or a folder of images"
)


class DatasetNotFoundError(FileNotFoundError):
    """A named dataset whose files are not installed."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Integer images ('I;16*', and 'I', PIL's mode for 16-bit PNG / TIFF) are
    taken as 16-bit and float images ('F') as [0, 1], both rescaled to 0-255 rather than clipped; transparency
    is dropped."""
    if image.mode.startswith("I") or image.mode == "F":
        top = 1.0 if image.mode == "F" else 65535.0
        array = np.clip(np.asarray(image, dtype=np.float64), 0.0, top) * (255.0 / top)
        image = Image.fromarray(np.round(array).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return image if image.mode == "RGB" else image.convert("RGB")


def available_cpus() -> int:
    """CPUs this process may run on: ``os.sched_getaffinity`` (which honours ``taskset`` and cgroup cpusets), else
    ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def num_workers(value: int | str = "auto") -> int:
    """Data-loading worker processes for ``value``: a number as given, or ``"auto"``: this process's share of the
    CPUs (available CPUs / processes on this machine, ``LOCAL_WORLD_SIZE`` under ``torchrun`` and ``accelerate
    launch``) minus one for the training process itself, at most ``MAX_AUTO_WORKERS`` and at least 0."""
    if value == "auto":
        share = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return max(0, min(MAX_AUTO_WORKERS, share - 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"num_workers must be 'auto' or an integer >= 0, got {value!r}")
    return value


def loader_options(workers: int | str, pin_memory: bool, persistent: bool = True) -> dict:
    """``DataLoader`` keyword arguments for ``workers`` (see ``num_workers``) and pinned memory: with workers, they
    stay alive across epochs when ``persistent`` (``ImageDataset.set_epoch`` reaches them through shared memory) and
    each prepares ``PREFETCH_FACTOR`` batches ahead."""
    count = num_workers(workers)
    options = {"num_workers": count, "pin_memory": pin_memory}
    if count:
        options |= {"persistent_workers": persistent, "prefetch_factor": PREFETCH_FACTOR}
    return options


def _open(item) -> Image.Image:
    """An ``ImageDataset`` source item as a PIL image: images pass, arrays are wrapped, paths are read and turned
    upright as their EXIF orientation says (``ImageOps.exif_transpose``, as a camera's viewer shows them)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    try:
        with Image.open(item) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
    except OSError as error:
        raise OSError(f"cannot read image {item}: {error}") from error
    return image


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one item's views (numpy ``SeedSequence`` hash of the three numbers)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and python's ``random`` for the block; restore both afterwards. Only the CPU
    generator: ``torch.manual_seed`` would also reseed every GPU, which ``fork_rng(devices=[])`` does not
    restore."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class ImageDataset(Dataset):
    """``(transform(RGB image), label)`` items; the label is -1 when the data has none.

    ``images`` is list-like: PIL images (any mode), image file paths or uint8 arrays. ``__getitem__`` runs the
    transform with the RNGs seeded from ``(seed, epoch, index)`` (``set_epoch`` before each epoch) and leaves
    the global RNG states as they were. ``fingerprint`` identifies images that are costly to hash one by one
    (an HF dataset's fingerprint); ``None`` when the items themselves identify the data. ``decoded``, when given,
    holds every item already decoded to an RGB uint8 array (``image_folder``'s in-memory cache), read instead.

    A file that turns out unreadable when read (a truncated JPEG of a folder too large to decode at discovery) is
    skipped with a warning naming it and counted in ``unreadable`` (per process): the next readable item takes its
    place, with the skipped index's views seed, as timm's ``ImageDataset`` does, up to ``MAX_READ_RETRIES`` in a row.
    """

    def __init__(
        self,
        images: Sequence,
        labels: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        fingerprint: str | None = None,
        decoded: Sequence[np.ndarray] | None = None,
    ):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if decoded is not None and len(decoded) != len(images):
            raise ValueError(f"{len(decoded)} decoded images for {len(images)} images")
        self.images = images
        self.labels = None if labels is None else [int(label) for label in labels]
        self.classes = None if classes is None else list(classes)
        self.transform = transform
        self.seed = seed
        self.fingerprint = fingerprint
        self.decoded = decoded
        self.unreadable: set[str] = set()
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # seen by persistent loader workers

    def __len__(self) -> int:
        return len(self.images)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the views, here and in the worker processes that hold a copy of this dataset."""
        self._epoch.fill_(epoch)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        """(RGB image, label) of item ``index``, or of the next readable item when its file cannot be read."""
        for retry in range(MAX_READ_RETRIES):
            item = (index + retry) % len(self)
            source = self.images[item] if self.decoded is None else self.decoded[item]
            try:
                image = to_rgb(_open(source))
            except OSError as error:
                if not isinstance(source, str | os.PathLike):
                    raise
                self.unreadable.add(str(source))
                warnings.warn(f"Skipped an unreadable image ({len(self.unreadable)} so far): {error}", stacklevel=3)
                continue
            return image, -1 if self.labels is None else self.labels[item]
        raise OSError(f"{MAX_READ_RETRIES} images in a row from item {index} on cannot be read; the last: {source}")

    def __getitem__(self, index: int) -> tuple:
        index = range(len(self))[index]  # negative indices get the same views as their positive twins
        image, label = self._read(index)
        if self.transform is None:
            return image, label
        with _seeded_rngs(view_seed(self.seed, self.epoch, index)):
            return self.transform(image), label


def _pick_split(split: str, name: str, /, **splits):
    if split not in splits:
        raise ValueError(f"{name!r} has the splits {list(splits)}, not {split!r}")
    return splits[split]


def builtin_digits(split: str) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0-16 -> 0-255) with a seeded stratified 80 / 20
    train / test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train, test = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target)
    chosen = _pick_split(split, "builtin", train=train, test=test)
    return ImageDataset(images[chosen], digits.target[chosen], [str(digit) for digit in range(10)])


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped unsigned-byte IDX file (LeCun's MNIST format): big-endian magic ``0x0800 + ndim`` (2051
    images, 2049 labels), ``ndim`` sizes, then the bytes; so images start at offset 16 and labels at 8."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    header = 4 * (1 + ndim)
    magic, *shape = struct.unpack_from(f">{1 + ndim}I", data.ljust(header, b"\0"))  # too short: magic 0
    if magic != 0x800 + ndim or len(data) != header + math.prod(shape):
        raise ValueError(f"{path} is not a {ndim}-d unsigned-byte IDX file (magic {magic}, {len(data)} B)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist(split: str) -> ImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28) from the Debian package ``dataset-fashion-mnist``, or
    from ``$SSLHUB_FASHION_MNIST_DIR``."""
    root = Path(os.environ.get("SSLHUB_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = _pick_split(split, "fashion-mnist", train="train", test="t10k")
    image_file, label_file = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [file.name for file in (image_file, label_file) if not file.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST: {', '.join(missing)} not found in {root}. Install the data with "
            "`apt-get install -y dataset-fashion-mnist` (Debian / Ubuntu, as root), or point "
            "SSLHUB_FASHION_MNIST_DIR at a directory holding the files."
        )
    return ImageDataset(_read_idx(image_file, 3), _read_idx(label_file, 1), FASHION_MNIST_CLASSES)


def _list_files(directory: Path) -> list[Path]:
    """Every file under ``directory`` outside hidden files and folders, following links as torchvision's
    ImageFolder does but entering no directory twice (by its real path): a link back to a parent (a loop) or a
    second link to a folder already walked adds nothing, and a real folder wins over a link to it beside it;
    sorted."""
    files, walked = [], {os.path.realpath(directory)}
    for root, folders, names in os.walk(directory, followlinks=True):
        kept = []
        for folder in sorted(folders, key=lambda name: (os.path.islink(os.path.join(root, name)), name)):
            real = os.path.realpath(os.path.join(root, folder))
            if not folder.startswith(".") and real not in walked:
                walked.add(real)
                kept.append(folder)
        folders[:] = kept
        files += [Path(root, name) for name in names if not name.startswith(".")]
    return sorted(files)


def _decoded_bytes(source) -> int | None:
    """Bytes of an image (a path or a binary file object) decoded to RGB, from its header once ``verify`` has checked
    the file; ``None`` when it is not a readable image."""
    if isinstance(source, Path) and source.suffix.lower() not in Image.registered_extensions():
        return None
    try:
        with Image.open(source) as image:
            image.verify()
            return 3 * image.width * image.height
    except Exception:  # PIL raises many kinds of errors for corrupt files
        return None


def _decode(path: Path) -> np.ndarray | None:
    """``path``'s image as an RGB uint8 array, or ``None`` when it cannot be decoded (e.g. a truncated file)."""
    try:
        return np.asarray(to_rgb(_open(path)))
    except OSError:
        return None


def image_folder(directory: Path, cache_bytes: int = DECODED_CACHE_BYTES) -> ImageDataset:
    """Images found recursively; class = first-level subfolder when every image sits in one, else no labels.
    Unreadable and non-image files are skipped with one warning that names them.

    When the decoded RGB images take at most ``cache_bytes`` (sizes from the file headers), they are decoded once
    here, in threads, and held as uint8 arrays (``ImageDataset.decoded``; ``images`` stays the file paths): the
    source images, before any augmentation, so that epochs and worker processes (which share them copy-on-write)
    never read or decode a file again. Files that verify but fail to decode are skipped too."""
    files = _list_files(directory)
    with ThreadPoolExecutor() as pool:  # file reads and decoding (PIL releases the GIL) overlap
        sizes = list(pool.map(_decoded_bytes, files))
        images = [file for file, size in zip(files, sizes, strict=True) if size is not None]
        decoded = None
        if sum(size for size in sizes if size is not None) <= cache_bytes:
            decoded = list(pool.map(_decode, images))
            images = [file for file, array in zip(images, decoded, strict=True) if array is not None]
            decoded = [array for array in decoded if array is not None]
    kept = set(images)
    skipped = [str(file.relative_to(directory)) for file in files if file not in kept]
    if skipped:
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(
            f"Skipped {len(skipped)} unreadable or non-image file(s) in {directory}: {', '.join(skipped[:10])}{more}",
            stacklevel=3,
        )
    if not images:
        raise ValueError(f"No readable images found in {directory}")
    parts = [image.relative_to(directory).parts for image in images]
    if any(len(part) == 1 for part in parts):  # an image outside every subfolder: no classes
        return ImageDataset(images, decoded=decoded)
    classes = sorted({part[0] for part in parts})
    index = {name: i for i, name in enumerate(classes)}
    return ImageDataset(images, [index[part[0]] for part in parts], classes, decoded=decoded)


def _hf_decoded(dataset, column: str, cache_bytes: int) -> list[np.ndarray] | None:
    """The images of ``dataset[column]`` decoded as ``datasets`` decodes them (the feature's ``decode_example``), as
    RGB uint8 arrays, when they take at most ``cache_bytes`` (sizes from the encoded images' headers); else, or when
    one cannot be read (left to fail where it is used, as without the cache), ``None``. A table larger than the
    budget is not looked into: its images, compressed, already take more."""
    if dataset.data.nbytes > cache_bytes:
        return None
    feature = dataset.features[column]
    encoded = list(dataset.cast_column(column, dataclasses.replace(feature, decode=False))[column])
    if None in encoded:  # a row without image
        return None
    sources = [Path(item["path"]) if item["bytes"] is None else io.BytesIO(item["bytes"]) for item in encoded]
    with ThreadPoolExecutor() as pool:
        sizes = list(pool.map(_decoded_bytes, sources))
        if None in sizes or sum(sizes) > cache_bytes:
            return None
        try:
            return list(pool.map(lambda item: np.asarray(to_rgb(feature.decode_example(item))), encoded))
        except OSError:
            return None


def hf_dataset(
    dataset,
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    name: str = "dataset",
    cache_bytes: int = DECODED_CACHE_BYTES,
) -> ImageDataset:
    """A Hugging Face ``datasets.Dataset``: images from ``image_column`` (default: the first ``Image()``
    feature), labels from ``label_column`` (default: the first ``ClassLabel`` feature, else a column named
    "label", else none). Other than ``ClassLabel``, integer labels are kept as class ids and other values are
    numbered in sorted order. Images whose decoded RGB arrays take at most ``cache_bytes`` are decoded once, into
    memory (``ImageDataset.decoded``), as in ``image_folder``."""
    from datasets import ClassLabel, Value
    from datasets import Image as HFImage

    features = dataset.features
    columns = list(features)
    image_column = image_column or next((c for c in columns if isinstance(features[c], HFImage)), None)
    if image_column is None:
        raise ValueError(f"{name}: no Image() column; columns are {columns} (pass the image column)")
    if label_column is None:
        label_column = next((c for c in columns if isinstance(features[c], ClassLabel)), None)
        label_column = label_column or ("label" if "label" in features else None)
    for role, column in (("image", image_column), ("label", label_column)):
        if column is not None and column not in features:
            raise ValueError(f"{name}: no {role} column {column!r}; columns are {columns}")
    labels = classes = None
    if label_column is not None:
        feature, labels = features[label_column], dataset[label_column][:]
        if isinstance(feature, ClassLabel):
            classes = feature.names
        elif not (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
            classes = sorted(set(labels))
            index = {value: i for i, value in enumerate(classes)}
            labels, classes = [index[value] for value in labels], [str(value) for value in classes]
    decoded = _hf_decoded(dataset, image_column, cache_bytes)
    return ImageDataset(dataset[image_column], labels, classes, fingerprint=dataset._fingerprint, decoded=decoded)


def load_image_dataset(
    spec: str, split: str = "train", *, image_column: str | None = None, label_column: str | None = None
) -> ImageDataset:
    """``"builtin"`` (scikit-learn digits, the default data), ``"fashion-mnist"``, a directory saved with HF
    ``save_to_disk``, an HF ``imagefolder`` directory (with ``metadata.csv`` / ``.jsonl``) or any folder of
    images. The column arguments apply to HF data."""
    if spec == "builtin":
        return builtin_digits(split)
    if spec == "fashion-mnist":
        return fashion_mnist(split)
    path = _directory(spec)
    splits = _hf_splits(path)
    if splits is not None:
        return hf_dataset(_pick_split(split, spec, **splits), image_column, label_column, name=spec)
    return image_folder(_pick_split(split, spec, train=path))


def _directory(spec: str) -> Path:
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"data {spec!r} is not a directory; expected {ACCEPTED}")
    return path


def _hf_splits(path: Path) -> dict | None:
    """The splits (name -> ``datasets.Dataset``) of a ``save_to_disk`` or ``imagefolder``-with-metadata directory;
    ``None`` for any other folder."""
    if any((path / marker).is_file() for marker in HF_SAVED_MARKERS):
        from datasets import DatasetDict, load_from_disk

        loaded = load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, DatasetDict) else {"train": loaded}
    if any((path / name).is_file() for name in IMAGEFOLDER_METADATA):
        from datasets import load_dataset

        return dict(load_dataset("imagefolder", data_dir=str(path)))
    return None


class _Selection(Sequence):
    """``items[indices[i]]`` for each ``i``, read lazily (HF image columns decode on access)."""

    def __init__(self, items: Sequence, indices: Sequence[int]):
        self.items, self.indices = items, [int(index) for index in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.items[self.indices[index]]


def subset(dataset: ImageDataset, indices: Sequence[int]) -> ImageDataset:
    """The items ``indices`` of ``dataset`` as a new ``ImageDataset`` with the same classes, seed and transform."""
    fingerprint = None
    if dataset.fingerprint is not None:
        fingerprint = hashlib.sha256(f"{dataset.fingerprint}:{list(map(int, indices))}".encode()).hexdigest()[:16]
    labels = None if dataset.labels is None else [dataset.labels[index] for index in indices]
    images = _Selection(dataset.images, indices)
    decoded = None if dataset.decoded is None else _Selection(dataset.decoded, indices)
    return ImageDataset(images, labels, dataset.classes, dataset.transform, dataset.seed, fingerprint, decoded)


def stratified_split(dataset: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, validation): a seeded split keeping every class's share (scikit-learn ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    counts = np.bincount(dataset.labels)
    single = [dataset.classes[label] for label in np.flatnonzero(counts == 1)]
    if single:
        raise ValueError(f"class(es) {single} have a single image; a stratified train / validation split needs two")
    try:
        train, held_out = train_test_split(
            np.arange(len(dataset)), test_size=val_fraction, random_state=seed, stratify=dataset.labels
        )
    except ValueError as error:  # e.g. fewer validation images than classes
        raise ValueError(f"cannot split {len(dataset)} images {val_fraction:.0%} for validation: {error}") from error
    return subset(dataset, np.sort(train)), subset(dataset, np.sort(held_out))


def _labelled_folder(directory: Path) -> ImageDataset:
    """A class-per-subfolder image folder; every non-hidden subfolder must hold a readable image."""
    dataset = image_folder(directory)
    if dataset.labels is None:
        raise ValueError(
            f"{directory}: labelled data needs one subfolder per class (e.g. {directory}/cat/1.png); "
            "found images outside class subfolders"
        )
    folders = sorted(entry.name for entry in directory.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    empty = [folder for folder in folders if folder not in dataset.classes]
    if empty:
        raise ValueError(f"{directory}: class folder(s) {empty} hold no readable images")
    return dataset


def _labelled_hf(dataset, image_column: str | None, label_column: str | None, name: str) -> ImageDataset:
    images = hf_dataset(dataset, image_column, label_column, name=name)
    if images.labels is None:
        raise ValueError(
            f"{name}: no label column (no ClassLabel feature and no column named 'label'); columns are "
            f"{list(dataset.features)} (pass the label column)"
        )
    return images


def _held_out_sources(
    spec: str, image_column: str | None, label_column: str | None
) -> tuple[ImageDataset, ImageDataset | None]:
    """(training data, the data's own held-out split or ``None``), both labelled."""
    if spec in ("builtin", "fashion-mnist"):
        return load_image_dataset(spec, "train"), load_image_dataset(spec, "test")
    path = _directory(spec)
    splits = _hf_splits(path)
    if splits is not None:
        held_out = next((splits[name] for name in HELD_OUT_SPLITS if name in splits), None)
        train = _labelled_hf(_pick_split("train", spec, **splits), image_column, label_column, f"{spec} (train)")
        if held_out is None:
            return train, None
        return train, _labelled_hf(held_out, image_column, label_column, f"{spec} (held-out split)")
    folders = [path / name for name in HELD_OUT_SPLITS if (path / name).is_dir()]
    if (path / "train").is_dir() and folders:
        return _labelled_folder(path / "train"), _labelled_folder(folders[0])
    return _labelled_folder(path), None


def _with_classes(dataset: ImageDataset, classes: list[str], where: str) -> ImageDataset:
    """``dataset`` relabelled to the indices of ``classes`` (matched by name)."""
    unknown = sorted(set(dataset.classes) - set(classes))
    if unknown:
        raise ValueError(f"{where} has class(es) {unknown} that the training data lacks ({classes})")
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[dataset.classes[label]] for label in dataset.labels]
    return ImageDataset(
        dataset.images, labels, classes, dataset.transform, dataset.seed, dataset.fingerprint, dataset.decoded
    )


def labelled_splits(
    spec: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """(train, evaluation) labelled datasets of ``spec`` (see :func:`load_image_dataset`), without transforms.

    The evaluation set is the data's own held-out split when it has one: the "test" split of ``builtin`` /
    ``fashion-mnist``, an HF dataset's "validation" or "test" split, or the ``val/``, ``validation/`` or ``test/``
    folder next to ``train/`` (each with one subfolder per class). Otherwise it is a seeded stratified
    ``val_fraction`` of the training images. Labels of both refer to the training data's ``classes``.
    """
    train, held_out = _held_out_sources(spec, image_column, label_column)
    labels = train.labels + (held_out.labels if held_out is not None else [])
    if min(labels) < 0:
        raise ValueError(f"{spec}: some items have no label (label -1); drop them before evaluating")
    if train.classes is None:  # integer labels without names
        train.classes = [str(label) for label in range(max(labels) + 1)]
        if held_out is not None:
            held_out.classes = train.classes
    present = sorted({train.classes[label] for label in train.labels})
    if len(present) < 2:
        raise ValueError(f"{spec}: classification needs at least two classes; the training data has {present}")
    if held_out is None:
        return stratified_split(train, val_fraction, seed)
    return train, _with_classes(held_out, train.classes, f"{spec} (held-out split)")


def _item_identity(item) -> bytes:
    """Bytes that change when an image item changes: a file's resolved path, size and modification time, or the
    pixels of an in-memory image."""
    if isinstance(item, (str, os.PathLike)):
        stat = os.stat(item)
        return f"{Path(item).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    if isinstance(item, Image.Image):
        return f"{item.mode}:{item.size}:".encode() + item.tobytes()
    array = np.ascontiguousarray(item)
    return f"{array.dtype}:{array.shape}:".encode() + array.tobytes()


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """A hash of what ``dataset`` holds: labels, classes, and its ``fingerprint`` (HF data) or every image's identity
    (files: path, size, mtime; arrays and PIL images: pixels). The transform is not part of it."""
    digest = hashlib.sha256(repr((len(dataset), dataset.labels, dataset.classes, dataset.fingerprint)).encode())
    if dataset.fingerprint is None:
        for item in dataset.images:
            digest.update(_item_identity(item))
    return digest.hexdigest()


class ViewDataset(Dataset):
    """Pretraining items: each image of ``images`` under a method's view recipe as a ``Sample`` (index, views, label
    when known, the recipe's extras, and the seed its views were drawn with). Views are a pure function of
    ``(seed, epoch, index)`` as in ``ImageDataset``; ``set_epoch`` before each epoch. ``images`` is not modified."""

    def __init__(self, images: ImageDataset, recipe: Callable, seed: int = 0):
        self.images = ImageDataset(
            images.images, images.labels, images.classes, recipe, seed, images.fingerprint, images.decoded
        )

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> Sample:
        index = range(len(self))[index]
        views, label = self.images[index]
        seed = view_seed(self.images.seed, self.images.epoch, index)
        return Sample(index, views.views, None if label < 0 else label, views.extras, seed)
