"""Data sources, image-mode conversion, deterministic views and the multi-view collate."""

import gzip
import random
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sslhub.data import DatasetNotFoundError, ImageDataset, load_image_dataset, multi_view_collate, to_rgb
from sslhub.transforms import two_view_moco_v2


def random_views(image_size=16):
    return two_view_moco_v2(image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_16_bit_and_other_modes_become_8_bit_rgb(tmp_path):
    array16 = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(array16).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as deep:
        rgb = to_rgb(deep)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 100, 50] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [200, 100, 50]
    assert np.asarray(to_rgb(Image.new("L", (1, 1), 77)))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0.5]], dtype=np.float32))))[0, 0, 0] == 128


def test_views_are_a_function_of_seed_epoch_and_index():
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)) for i in range(3)]
    dataset = ImageDataset(lambda i: images[i], 3, transform=random_views(), seed=7)
    state_before, python_before = torch.get_rng_state(), random.getstate()
    first = dataset[1][0]
    assert torch.equal(torch.get_rng_state(), state_before) and random.getstate() == python_before
    torch.manual_seed(123)  # the global RNG must not matter
    again = dataset[1][0]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # the two views are different draws
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][0][0], first[0])
    dataset.set_epoch(0)
    dataset.seed = 8
    assert not torch.equal(dataset[1][0][0], first[0])


def test_image_folder_labels_and_skipped_files(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_image_dataset(str(tmp_path))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "Skipped 2" in messages[0]
    assert "broken.jpg" in messages[0] and "notes.txt" in messages[0]
    assert len(dataset) == 4 and dataset.classes == ["cat", "dog"] and dataset.labels == [0, 0, 1, 1]
    image, label = dataset[3]
    assert image.mode == "RGB" and label == 1


def test_flat_folder_has_no_labels_and_empty_folder_is_an_error(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    dataset = load_image_dataset(str(tmp_path))
    assert dataset.labels is None and dataset[0][1] == -1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No readable images found in .*empty"):
        load_image_dataset(str(empty))
    with pytest.raises(ValueError, match="'nope'.*builtin"):
        load_image_dataset("nope")


def test_builtin_digits_split():
    train, test = load_image_dataset("builtin", "train"), load_image_dataset("builtin", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert np.bincount(test.labels).min() >= 35  # stratified: every digit ~36 times
    image, label = train[0]
    assert image.size == (8, 8) and 0 <= label <= 9


def write_idx(path, array: np.ndarray) -> None:
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


def test_hf_saved_dataset_and_column_errors(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    pictures = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    features = Features({"img": HFImage(), "kind": ClassLabel(names=["a", "b"])})
    Dataset.from_dict({"img": pictures, "kind": [0, 1, 1, 0]}, features=features).save_to_disk(tmp_path / "ds")
    dataset = load_image_dataset(str(tmp_path / "ds"))
    assert dataset.labels == [0, 1, 1, 0] and dataset.classes == ["a", "b"]
    assert np.asarray(dataset[2][0])[0, 0].tolist() == [80, 0, 0]
    with pytest.raises(ValueError, match=r"no label column 'label'; columns are \['img', 'kind'\]"):
        load_image_dataset(str(tmp_path / "ds"), label_column="label")


def test_multi_view_collate_stacks_each_view_position():
    batch = [([torch.zeros(3, 4, 4), torch.ones(3, 2, 2)], 1), ([torch.ones(3, 4, 4), torch.zeros(3, 2, 2)], 5)]
    views, labels = multi_view_collate(batch)
    assert [v.shape for v in views] == [(2, 3, 4, 4), (2, 3, 2, 2)]
    assert views[0][1].eq(1).all() and views[1][1].eq(0).all() and labels.tolist() == [1, 5]
