"""Data loading by default: the worker count rule, views independent of the workers (and exact resume with them), the
in-memory cache of decoded images and the throughput the pretraining loop reports."""

import argparse
import re

import numpy as np
import pytest
from helpers import tiny_args
from PIL import Image
from torch.utils.data import DataLoader

import sslhub.data
import sslhub.training
from sslhub.arguments import worker_count
from sslhub.cli import build_parser
from sslhub.data import ImageDataset, image_folder, loader_options, num_workers
from sslhub.training import PretrainArguments, Pretrainer, Throughput, pretrain


@pytest.mark.parametrize(
    "cpus, processes, expected", [(16, 1, 8), (4, 1, 3), (2, 1, 1), (1, 1, 0), (16, 4, 3), (16, 8, 1), (8, 16, 0)]
)
def test_auto_workers_are_the_processes_share_of_the_cpus_minus_one_at_most_8(monkeypatch, cpus, processes, expected):
    monkeypatch.setattr(sslhub.data.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert num_workers("auto") == expected
    assert num_workers(5) == 5


@pytest.mark.parametrize("bad", [-1, 1.5, "two", True])
def test_bad_worker_counts_are_clear_errors(bad):
    with pytest.raises(ValueError, match="num_workers must be 'auto' or an integer >= 0"):
        num_workers(bad)


def test_loader_options_keep_workers_and_prefetch_only_with_workers():
    assert loader_options(0, pin_memory=False) == {"num_workers": 0, "pin_memory": False}
    options = loader_options(2, pin_memory=True)
    assert options == {"num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 2}
    assert loader_options(2, pin_memory=False, persistent=False)["persistent_workers"] is False


def test_num_workers_flags_default_to_auto_and_take_a_number():
    parser = build_parser()
    pretrain_flags = parser.parse_args(["pretrain"])
    assert pretrain_flags.num_workers == "auto" == PretrainArguments().num_workers
    assert parser.parse_args(["pretrain", "--num-workers", "3"]).num_workers == 3
    assert parser.parse_args(["finetune", "--model", "m", "--data", "d"]).num_workers == "auto"
    assert parser.parse_args(["eval", "knn", "--model", "m", "--data", "d"]).num_workers == "auto"
    assert parser.parse_args(["eval", "linear", "--model", "m", "--data", "d", "--num-workers", "0"]).num_workers == 0
    with pytest.raises(argparse.ArgumentTypeError, match="'auto' or an integer >= 0"):
        worker_count("-2")


def test_views_do_not_depend_on_workers_and_a_run_resumed_with_workers_is_exact(image_folder, tmp_path, single_thread):
    """0 workers against 2 persistent ones, cut after step 4 (epoch 2, batch 1) and resumed: the same losses. The
    second epoch checks that ``set_epoch`` reaches workers started in the first."""
    without = pretrain(tiny_args(image_folder, tmp_path / "main", num_workers=0, checkpoint_every=2, knn_every=0))
    first = pretrain(
        tiny_args(image_folder, tmp_path / "workers", num_workers=2, checkpoint_every=2, max_steps=4, knn_every=0)
    )
    resumed = pretrain(tiny_args(image_folder, tmp_path / "workers", num_workers=2, resume="latest", knn_every=0))
    assert len(without.losses) == 6
    assert first.losses + resumed.losses == without.losses


def test_persistent_workers_see_the_epoch_set_after_they_started():
    images = ImageDataset(list(range(4)), transform=None)
    epochs = DataLoader(_EpochOf(images), batch_size=4, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in range(3):
        images.set_epoch(epoch)
        seen.append(sorted(int(value) for batch in epochs for value in batch))
    assert seen == [[0] * 4, [1] * 4, [2] * 4]


class _EpochOf:
    """Items: the epoch ``images`` has in the process that reads the item."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images.epoch


def _folder(root):
    """Three small images of different modes and sizes, and a file that is not an image."""
    rng = np.random.default_rng(0)
    root.mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (7, 9), dtype=np.uint8)).save(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)).save(root / "rgba.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _count_opens(monkeypatch) -> list:
    opened = []
    original = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(sslhub.data.Image, "open", counting_open)
    return opened


def test_small_folders_are_decoded_once_and_epochs_read_no_file(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable or non-image file\(s\).*notes.txt"):
        dataset = image_folder(root)
    assert [path.name for path in dataset.images] == ["grey.png", "rgb.png", "rgba.png"]  # the paths stay
    for path, array in zip(dataset.images, dataset.decoded, strict=True):
        np.testing.assert_array_equal(array, np.asarray(Image.open(path).convert("RGB")))
    dataset.transform = lambda image: np.asarray(image).copy()  # the cache holds sources: the transform still runs
    opened = _count_opens(monkeypatch)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        views = [dataset[index][0] for index in range(len(dataset))]
    assert opened == []
    for view, array in zip(views, dataset.decoded, strict=True):
        np.testing.assert_array_equal(view, array)
    assert sslhub.data.subset(dataset, [2, 0]).decoded[0] is dataset.decoded[2]


def test_folders_over_the_cache_budget_are_read_from_the_files(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    with pytest.warns(UserWarning, match="Skipped 1"):
        cached = image_folder(root)
        dataset = image_folder(root, cache_bytes=3 * 12 * 10)  # less than the three images' 3 x (12x10 + 7x9 + 8x8) B
    assert dataset.decoded is None
    opened = _count_opens(monkeypatch)
    for index in range(len(dataset)):
        np.testing.assert_array_equal(np.asarray(dataset[index][0]), cached.decoded[index])
    assert len(opened) == len(dataset)


class _Clock:
    """A fake ``time.perf_counter`` advanced by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_throughput_is_images_over_step_time_and_the_share_blocked_in_the_loader(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(sslhub.training.time, "perf_counter", clock)

    def batches():
        for _ in range(4):
            clock.now += 1.0  # the loader keeps the step waiting 1 s
            yield "batch"

    speed = Throughput()
    for i, _ in enumerate(speed.timed(batches())):
        clock.now += 3.0  # the step's compute
        if i % 2 == 1:  # two micro-batches of 8 images per optimizer step
            speed.step(16)
    assert speed.images == 32 and speed.seconds == 16.0 and speed.waiting == 4.0
    assert speed.metrics() == {"perf/images_per_s": 2.0, "perf/data_wait_fraction": 0.25}
    speed.reset()
    assert (speed.images, speed.seconds, speed.waiting) == (0, 0.0, 0.0)


def test_pretraining_shows_and_logs_images_per_second_and_data_wait(image_folder, tmp_path, capsys, single_thread):
    trainer = Pretrainer(
        tiny_args(image_folder, tmp_path, num_workers=0, epochs=1, progress=True, log_every=1, knn_every=0)
    )
    logged = []
    trainer.log = logged.append
    trainer.run()
    perf = [values for values in logged if "perf/images_per_s" in values]
    assert len(perf) == 3  # every step, with log_every 1
    for values in perf:
        assert values["perf/images_per_s"] > 0 and 0 <= values["perf/data_wait_fraction"] <= 1
    postfix = re.findall(r"data_wait=(\d+)%.*img_per_s=([\d.]+)", capsys.readouterr().err)
    assert postfix and all(0 <= int(wait) <= 100 and float(speed) > 0 for wait, speed in postfix)


def test_small_hf_datasets_are_decoded_once_as_datasets_decodes_them(monkeypatch):
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (6 + i, 5, 3), dtype=np.uint8)) for i in range(3)]
    features = Features({"image": HFImage(mode="L"), "label": Value("int64")})  # datasets converts to L first
    data = Dataset.from_dict({"image": pictures, "label": [0, 1, 0]}, features=features)
    dataset = sslhub.data.hf_dataset(data)
    for index, array in enumerate(dataset.decoded):
        np.testing.assert_array_equal(array, np.asarray(data[index]["image"].convert("RGB")))
    assert np.array_equal(dataset.decoded[0][..., 0], dataset.decoded[0][..., 2])  # grey, as the feature's mode
    opened = _count_opens(monkeypatch)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert [np.asarray(dataset[i][0]).shape for i in range(3)] == [(6, 5, 3), (7, 5, 3), (8, 5, 3)]
    assert opened == []
    assert sslhub.data.hf_dataset(data, cache_bytes=3 * 6 * 5).decoded is None


def test_an_unreadable_image_in_a_worker_is_skipped_and_only_unreadable_data_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "kept.png")
    dataset = ImageDataset(
        [tmp_path / "kept.png", tmp_path / "deleted.png"], transform=lambda image: image.getpixel((0, 0))
    )
    loader = DataLoader(dataset, batch_size=1, **loader_options(1, pin_memory=False, persistent=False))
    # the worker's warning goes to its stderr; the missing file's item is the next readable one, as timm does
    assert [tuple(int(c) for c in colour) for colour, _ in loader] == [(255, 0, 0)] * 2
    unreadable = ImageDataset([tmp_path / "deleted.png"], transform=lambda image: 0)
    loader = DataLoader(unreadable, batch_size=1, **loader_options(1, pin_memory=False, persistent=False))
    with pytest.raises(OSError, match="images in a row .* cannot be read; the last: .*deleted.png"):
        list(loader)
