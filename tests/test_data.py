"""Data sources, image-mode conversion, deterministic views (``ViewDataset`` samples) and their collation into a
``Batch``."""

import gzip
import random
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sslhub.batch import Batch, Sample, collate_samples
from sslhub.data import (
    DatasetNotFoundError,
    ImageDataset,
    ViewDataset,
    dataset_fingerprint,
    labelled_splits,
    load_image_dataset,
    to_rgb,
    view_seed,
)
from sslhub.methods.moco import moco_views
from sslhub.transforms import ViewRecipe, Views, view


def noise_images(count: int, size: int = 24) -> list[Image.Image]:
    return [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8))
        for i in range(count)
    ]


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as deep:
        rgb = to_rgb(deep)
    assert rgb.mode == "RGB" and np.asarray(rgb)[0].tolist() == [[v] * 3 for v in (0, 1, 128, 255)]
    as_int = Image.fromarray(np.array([[65535, 32768]], dtype=np.int32))  # mode "I", as older Pillow opens it
    assert np.asarray(to_rgb(as_int))[0, :, 0].tolist() == [255, 128]


def test_other_modes_become_rgb():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 100, 50] * 256)
    palette.info["transparency"] = bytes([0, 255])  # per-entry alpha, as PIL reads a PNG tRNS chunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning about palette transparency either
        converted = {
            "RGBA": to_rgb(rgba),
            "P": to_rgb(palette),
            "L": to_rgb(Image.new("L", (1, 1), 77)),
            "LA": to_rgb(Image.new("LA", (1, 1), (77, 0))),
            "CMYK": to_rgb(Image.new("RGB", (1, 1), (10, 20, 30)).convert("CMYK")),
            "F": to_rgb(Image.fromarray(np.array([[0.5]], dtype=np.float32))),
        }
    assert all(image.mode == "RGB" for image in converted.values())
    pixels = {mode: np.asarray(image)[0, 0].tolist() for mode, image in converted.items()}
    assert pixels == {
        "RGBA": [10, 20, 30],
        "P": [200, 100, 50],
        "L": [77, 77, 77],
        "LA": [77, 77, 77],
        "CMYK": [10, 20, 30],
        "F": [128, 128, 128],
    }


def two_views(size: int = 16):
    """MoCo v2's recipe (two independent draws of crop, jitter, grayscale, blur, flip) with mean = std = 0.5."""
    return moco_views(size, (0.5,) * 3, (0.5,) * 3, (0.2, 1.0), aug_plus=True)


def test_views_are_a_function_of_seed_epoch_and_index():
    dataset = ViewDataset(ImageDataset(noise_images(3)), two_views(), seed=7)
    torch_before, python_before = torch.get_rng_state(), random.getstate()
    sample = dataset[1]
    assert torch.equal(torch.get_rng_state(), torch_before) and random.getstate() == python_before
    assert isinstance(sample, Sample) and (sample.index, sample.label, sample.extras) == (1, None, {})
    assert sample.seed == view_seed(7, 0, 1)
    first = sample.views
    assert first[0].shape == first[1].shape == (3, 16, 16) and not torch.equal(first[0], first[1])
    torch.manual_seed(123)  # the global RNG must not matter
    random.seed(123)
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[1].views, strict=True))
    assert dataset[-2].index == 1 and all(torch.equal(a, b) for a, b in zip(first, dataset[-2].views, strict=True))
    assert not torch.equal(dataset[2].views[0], first[0])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1].views[0], first[0]) and dataset[1].seed == view_seed(7, 1, 1)
    dataset.set_epoch(0)
    assert not torch.equal(ViewDataset(ImageDataset(noise_images(3)), two_views(), seed=8)[1].views[0], first[0])
    # the same draws as the ImageDataset of one view transform: the recipe runs under the same seeded RNGs
    single = ImageDataset(noise_images(3), transform=two_views().transforms[0], seed=7)
    assert torch.equal(single[1][0], first[0])


def test_view_dataset_carries_labels_and_leaves_the_images_untouched():
    images = ImageDataset(noise_images(3), [2, 0, 1], ["a", "b", "c"])
    dataset = ViewDataset(images, two_views(), seed=3)
    assert len(dataset) == 3 and [dataset[i].label for i in range(3)] == [2, 0, 1]
    assert images.transform is None and images.seed == 0 and images[0][0].mode == "RGB"


def test_views_do_not_depend_on_dataloader_workers():
    recipe = two_views()
    dataset = ViewDataset(ImageDataset(noise_images(4)), recipe)
    dataset.set_epoch(3)
    in_process = [dataset[i].views for i in range(4)]
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=recipe.collate)
    batches = list(loader)
    assert all(isinstance(batch, Batch) for batch in batches)
    assert torch.cat([batch.index for batch in batches]).tolist() == [0, 1, 2, 3]
    from_workers = [views for batch in batches for views in zip(*batch.views, strict=True)]
    assert all(torch.equal(a[v], b[v]) for a, b in zip(in_process, from_workers, strict=True) for v in (0, 1))


def test_image_folder_labels_and_skipped_files(tmp_path):
    for label in ("dog", "cat"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"hidden files are not data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_image_dataset(str(tmp_path))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "Skipped 2 " in messages[0], messages
    assert "broken.jpg" in messages[0] and "notes.txt" in messages[0] and ".DS_Store" not in messages[0]
    assert len(dataset) == 4 and dataset.classes == ["cat", "dog"] and dataset.labels == [0, 0, 1, 1]
    image, label = dataset[3]
    assert image.mode == "RGB" and label == 1 and image.getpixel((0, 0)) == (1, 0, 0)


def test_flat_folder_has_no_labels_and_bad_specs_are_errors(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "sub" / "b.png")
    dataset = load_image_dataset(str(tmp_path))
    assert len(dataset) == 2 and dataset.labels is None and dataset[0][1] == -1
    with pytest.raises(ValueError, match="splits \\['train'\\], not 'test'"):
        load_image_dataset(str(tmp_path), "test")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No readable images found in .*empty"):
        load_image_dataset(str(empty))
    with pytest.raises(ValueError, match="'nope'.*'builtin', 'fashion-mnist'.*save_to_disk.*of images"):
        load_image_dataset("nope")


def test_builtin_digits_split_is_stratified():
    train, test = load_image_dataset("builtin", "train"), load_image_dataset("builtin", "test")
    assert (len(train), len(test)) == (1437, 360) and train.classes == [str(d) for d in range(10)]
    per_class = np.bincount(train.labels) + np.bincount(test.labels)
    assert np.abs(np.bincount(test.labels) - 0.2 * per_class).max() <= 1  # every digit 80 / 20
    image, label = train[0]
    assert image.size == (8, 8) and image.mode == "RGB" and 0 <= label <= 9
    assert np.asarray(image).max() > 200  # 0-16 scaled to 0-255
    with pytest.raises(ValueError, match="'builtin' has the splits \\['train', 'test'\\], not 'val'"):
        load_image_dataset("builtin", "val")


def write_idx(path, array: np.ndarray) -> None:
    """IDX as on yann.lecun.com: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_missing_package(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    monkeypatch.setenv("SSLHUB_FASHION_MNIST_DIR", str(tmp_path))
    test = load_image_dataset("fashion-mnist", "test")
    assert len(test) == 3 and test.labels == [9, 0, 3] and test.classes[9] == "Ankle boot"
    assert np.array_equal(np.asarray(test[2][0])[..., 0], images[2])
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_image_dataset("fashion-mnist", "train")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((3, 1)))  # 2-d: not a labels file
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not a 1-d unsigned-byte IDX file"):
        load_image_dataset("fashion-mnist", "test")


@pytest.fixture
def pictures():
    return [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]


def test_hf_saved_dataset_and_column_errors(tmp_path, pictures):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    features = Features({"kind": ClassLabel(names=["a", "b"]), "img": HFImage()})
    data = Dataset.from_dict({"img": pictures, "kind": [0, 1, 1, 0]}, features=features)
    data.save_to_disk(tmp_path / "single")
    DatasetDict(train=data.select([0, 1]), validation=data.select([2, 3])).save_to_disk(tmp_path / "dict")
    dataset = load_image_dataset(str(tmp_path / "single"))
    assert dataset.labels == [0, 1, 1, 0] and dataset.classes == ["a", "b"]
    assert dataset[2][0].mode == "RGB" and dataset[2][0].getpixel((0, 0)) == (80, 0, 0)
    validation = load_image_dataset(str(tmp_path / "dict"), "validation")
    assert validation.labels == [1, 0] and validation[0][0].getpixel((0, 0)) == (80, 0, 0)
    with pytest.raises(ValueError, match="splits \\['train', 'validation'\\], not 'test'"):
        load_image_dataset(str(tmp_path / "dict"), "test")
    with pytest.raises(ValueError, match="no label column 'label'; columns are \\['img', 'kind'\\]"):
        load_image_dataset(str(tmp_path / "single"), label_column="label")
    with pytest.raises(ValueError, match="no image column 'image'; columns are \\['img', 'kind'\\]"):
        load_image_dataset(str(tmp_path / "single"), image_column="image")


def test_hf_imagefolder_with_metadata_and_string_labels(tmp_path, pictures, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, picture in enumerate(pictures):
        picture.save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,label\n0.png,dog\n1.png,cat\n2.png,dog\n3.png,cat\n")
    dataset = load_image_dataset(str(folder))
    assert dataset.classes == ["cat", "dog"] and dataset.labels == [1, 0, 1, 0]
    assert dataset[1][0].getpixel((0, 0)) == (40, 0, 0)


def test_collate_stacks_each_view_position_and_carries_index_labels_and_extras():
    samples = [
        Sample(3, [torch.zeros(3, 4, 4), torch.ones(3, 2, 2)], 1, {"rotation": 2, "mask": torch.tensor([True, False])}),
        Sample(7, [torch.ones(3, 4, 4), torch.zeros(3, 2, 2)], 5, {"rotation": 0, "mask": torch.tensor([False, True])}),
    ]
    batch = ViewRecipe().collate(samples)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert [v.shape for v in batch.views] == [(2, 3, 4, 4), (2, 3, 2, 2)]
    assert batch.views[0][1].eq(1).all() and batch.views[1][1].eq(0).all() and batch.views[0][0].eq(0).all()
    assert batch.labels.dtype == torch.long and batch.labels.tolist() == [1, 5]
    assert batch.index.dtype == torch.long and batch.index.tolist() == [3, 7]
    assert batch.extras["rotation"].tolist() == [2, 0]
    assert batch.extras["mask"].tolist() == [[True, False], [False, True]]
    unlabelled = [Sample(0, [torch.zeros(3, 2, 2)], None), Sample(1, [torch.zeros(3, 2, 2)], 4)]
    assert collate_samples(unlabelled).labels is None and collate_samples(unlabelled).extras == {}
    with pytest.raises(ValueError, match="same number of views"):
        collate_samples([Sample(0, [torch.zeros(3, 2, 2)]), Sample(1, [torch.zeros(3, 2, 2)] * 2)])


class QuarterTurns(ViewRecipe):
    """A recipe with extras: one view turned by a random multiple of 90 degrees, the number of turns as the extra."""

    def __init__(self):
        self.to_tensor = view(mean=(0.0,) * 3, std=(1.0,) * 3)

    def make_views(self, image) -> Views:
        turns = int(torch.randint(4, ()))
        return Views([torch.rot90(self.to_tensor(image), turns, dims=(1, 2))], {"turns": turns})


def test_recipe_extras_travel_from_the_dataset_to_the_batch():
    dataset = ViewDataset(ImageDataset(noise_images(6, size=8), [0, 1, 0, 1, 0, 1]), QuarterTurns(), seed=1)
    recipe = QuarterTurns()
    batch = next(iter(DataLoader(dataset, batch_size=6, collate_fn=recipe.collate)))
    turns = [dataset[i].extras["turns"] for i in range(6)]
    assert batch.extras["turns"].tolist() == turns and len(set(turns)) > 1
    assert batch.labels.tolist() == [0, 1, 0, 1, 0, 1] and batch.index.tolist() == list(range(6))
    plain = ImageDataset(noise_images(6, size=8), transform=view(mean=(0.0,) * 3, std=(1.0,) * 3))
    for i in range(6):
        assert torch.equal(batch.views[0][i], torch.rot90(plain[i][0], turns[i], dims=(1, 2)))


def class_folder(root, counts: dict[str, int], size: int = 8):
    """``root/<class>/<i>.png`` for each class, ``counts[class]`` small images of distinct colours."""
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (size, size), (i, len(label), 0)).save(root / label / f"{i}.png")
    return root


def test_labelled_splits_of_a_folder_are_seeded_stratified_and_disjoint(tmp_path):
    root = class_folder(tmp_path / "pets", {"cat": 10, "dog": 20, "emu": 30})
    train, held_out = labelled_splits(str(root), val_fraction=0.2, seed=0)
    assert train.classes == held_out.classes == ["cat", "dog", "emu"]
    assert np.bincount(held_out.labels).tolist() == [2, 4, 6] and np.bincount(train.labels).tolist() == [8, 16, 24]
    assert set(map(str, train.images)).isdisjoint(map(str, held_out.images))
    assert sorted(map(str, [*train.images, *held_out.images])) == sorted(str(p) for p in root.rglob("*.png"))
    assert [Path(path).parent.name for path in held_out.images] == [held_out.classes[i] for i in held_out.labels]
    assert train.transform is None and held_out.transform is None
    again, _ = labelled_splits(str(root), val_fraction=0.2, seed=0)
    other, _ = labelled_splits(str(root), val_fraction=0.2, seed=1)
    assert list(again.images) == list(train.images) and list(other.images) != list(train.images)
    image, label = held_out[0]
    assert image.mode == "RGB" and label == held_out.labels[0]


def test_labelled_splits_use_train_and_val_folders_with_the_training_classes(tmp_path):
    class_folder(tmp_path / "train", {"cat": 3, "dog": 3, "emu": 3})
    class_folder(tmp_path / "val", {"dog": 2, "emu": 1})  # no cat: labels still index the training classes
    train, held_out = labelled_splits(str(tmp_path))
    assert (len(train), len(held_out)) == (9, 3)
    assert held_out.classes == ["cat", "dog", "emu"] and held_out.labels == [1, 1, 2]
    assert all(Path(path).parts[-3] == "val" for path in held_out.images)
    class_folder(tmp_path / "val", {"owl": 1})
    with pytest.raises(ValueError, match=r"held-out split\) has class\(es\) \['owl'\] that the training data lacks"):
        labelled_splits(str(tmp_path))


def test_labelled_splits_of_hf_datasets(tmp_path, pictures):
    from datasets import Dataset, DatasetDict

    strings = Dataset.from_dict({"image": pictures * 2, "kind": ["b", "a", "c", "a", "b", "c", "a", "b"]})
    DatasetDict(train=strings, test=strings.select([0, 1])).save_to_disk(tmp_path / "dict")
    train, held_out = labelled_splits(str(tmp_path / "dict"), label_column="kind")
    assert train.classes == ["a", "b", "c"] and held_out.labels == [1, 0]  # "b", "a" in the training numbering
    assert held_out.classes == train.classes and len(train) == 8
    assert held_out[0][0].getpixel((0, 0)) == (0, 0, 0)
    integers = Dataset.from_dict({"image": pictures * 3, "label": [0, 1] * 6})
    integers.save_to_disk(tmp_path / "single")
    train, held_out = labelled_splits(str(tmp_path / "single"), val_fraction=0.5)
    assert train.classes == ["0", "1"] and sorted(held_out.labels) == [0, 0, 0, 1, 1, 1]
    assert train.fingerprint != held_out.fingerprint and None not in (train.fingerprint, held_out.fingerprint)
    assert held_out[1][0].mode == "RGB"


def test_labelled_splits_of_builtin_use_its_test_split():
    train, held_out = labelled_splits("builtin")
    assert (len(train), len(held_out)) == (1437, 360) and train.classes == held_out.classes


@pytest.mark.parametrize(
    ("build", "message"),
    [
        ("empty_class", r"class folder\(s\) \['dog'\] hold no readable images"),
        ("unreadable_class", r"class folder\(s\) \['dog'\] hold no readable images"),
        ("one_class", r"at least two classes; the training data has \['cat'\]"),
        ("flat", "needs one subfolder per class"),
        ("single_image_class", r"class\(es\) \['dog'\] have a single image"),
    ],
)
def test_labelled_splits_bad_folders(tmp_path, build, message):
    class_folder(tmp_path, {"cat": 4})
    if build in ("empty_class", "unreadable_class"):
        (tmp_path / "dog").mkdir()
    if build == "unreadable_class":
        (tmp_path / "dog" / "0.png").write_bytes(b"not a png")
    if build == "flat":
        Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    if build == "single_image_class":
        class_folder(tmp_path, {"dog": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped unreadable file
        with pytest.raises(ValueError, match=message):
            labelled_splits(str(tmp_path))


def test_labelled_splits_hf_label_column_missing_names_the_columns(tmp_path, pictures):
    from datasets import Dataset

    Dataset.from_dict({"image": pictures, "caption": ["x"] * 4}).save_to_disk(tmp_path / "captions")
    with pytest.raises(ValueError, match=r"no label column .*columns are \['image', 'caption'\]"):
        labelled_splits(str(tmp_path / "captions"))
    with pytest.raises(ValueError, match=r"no label column 'kind'; columns are \['image', 'caption'\]"):
        labelled_splits(str(tmp_path / "captions"), label_column="kind")


def test_dataset_fingerprint_follows_files_labels_and_pixels(tmp_path):
    root = class_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
    first = dataset_fingerprint(load_image_dataset(str(root)))
    assert dataset_fingerprint(load_image_dataset(str(root))) == first
    (root / "cat" / "1.png").rename(root / "dog" / "9.png")  # same pixels, another class
    assert dataset_fingerprint(load_image_dataset(str(root))) != first
    arrays = ImageDataset(np.zeros((2, 4, 4, 3), dtype=np.uint8), [0, 1])
    changed = ImageDataset(np.zeros((2, 4, 4, 3), dtype=np.uint8), [0, 1])
    changed.images[1, 0, 0, 0] = 1
    assert dataset_fingerprint(arrays) != dataset_fingerprint(changed)
