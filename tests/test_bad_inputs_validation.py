"""Bad input refused with one sentence naming the key, flag or file (issue 15): method hyperparameters, config
values, run arguments, output directories, data folders (symlink loops, EXIF orientation, truncated files), and the
command line's ``--debug``, Ctrl-C, SIGTERM, a lost peer process and its warnings."""

import dataclasses
import json
import os
import typing
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sslhub
from sslhub import cli
from sslhub.configuration import SSLConfig
from sslhub.data import MAX_READ_RETRIES, ImageDataset, hf_dataset, image_folder
from sslhub.files import check_writable
from sslhub.registry import get_method

TINY = "moco_v2_resnet18_32px"


def run_cli(argv, capsys):
    """(exit status, stderr lines) of ``sslhub ARGV``."""
    status = cli.main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


# ---- method hyperparameters --------------------------------------------------------------------------------------


def wrong_value(annotation):
    """A value of the wrong type for a field annotated ``annotation``: a string, or a number for a string field."""
    return 3 if str in (annotation, *typing.get_args(annotation)) else "abc"


@pytest.mark.parametrize("method", sslhub.list_methods())
def test_every_hyperparameter_refuses_a_value_of_the_wrong_type(method):
    hparams = get_method(method).Hparams
    hints = typing.get_type_hints(hparams)
    for field in dataclasses.fields(hparams):
        with pytest.raises(ValueError, match=rf"\bfor {field.name}, got"):
            hparams(**{field.name: wrong_value(hints[field.name])})


@pytest.mark.parametrize("method", sslhub.list_methods())
def test_every_temperature_must_be_positive(method):
    hparams = get_method(method).Hparams
    temperatures = [f.name for f in dataclasses.fields(hparams) if "temperature" in f.name or f.name.endswith("_temp")]
    for name in temperatures:
        for value in (0, -0.1):
            with pytest.raises(ValueError, match=rf"^{name} must be > 0"):
                hparams(**{name: value})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("temperature", "abc", "expected a finite number for temperature, got 'abc'"),
        ("temperature", float("nan"), "expected a finite number for temperature, got nan"),
        ("temperature", 0, "temperature must be > 0, got 0"),
        ("queue_size", -5, "queue_size must be >= 1, got -5"),
        ("queue_size", 2.5, "expected an integer for queue_size, got 2.5"),
        ("lr", 0, "lr must be > 0, got 0"),
        ("epochs", 0, "epochs must be >= 1, got 0"),
        ("weight_decay", -1e-4, "weight_decay must be >= 0, got -0.0001"),
        ("betas", [0.9], r"expected a list of 2 items \(a finite number, a finite number\) for betas"),
        ("shuffle_bn", "yes", "expected true or false for shuffle_bn, got 'yes'"),
    ],
)
def test_bad_hyperparameter_is_one_sentence_naming_it(key, value, message):
    with pytest.raises(ValueError, match=message):
        SSLConfig.from_preset(TINY, **{key: value})


def test_every_preset_still_validates():
    for name in sslhub.list_models():
        SSLConfig.from_preset(name)


@pytest.mark.parametrize(
    "value, message",
    [("temperature=abc", "expected a finite number for temperature, got 'abc'"), ("queue_size=-5", "queue_size")],
)
def test_cli_set_refuses_a_bad_hyperparameter_in_one_line(tmp_path, capsys, value, message):
    out = tmp_path / "out"
    status, err = run_cli(["pretrain", "--set", value, "--output-dir", str(out), "--log-with", "none"], capsys)
    assert status == 2 and len(err) == 1 and message in err[0]
    assert not any(out.iterdir())  # nothing written


# ---- config.json values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, key",
    [
        ({"image_size": "big"}, "image_size"),
        ({"image_size": -32}, "image_size"),
        ({"image_size": 32.5}, "image_size"),
        ({"pooling": "max"}, "pooling"),
        ({"image_std": [0.2, 0.0, 0.2]}, "image_std"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"method_kwargs": {"queue_size": -5}}, "queue_size"),
        ({"method_kwargs": {"temperature": "abc"}}, "temperature"),
    ],
)
def test_bad_config_json_values_do_not_load(tmp_path, change, key):
    values = SSLConfig.from_preset(TINY).to_dict()
    for name, value in change.items():
        values[name] = {**values[name], **value} if isinstance(value, dict) else value
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: .*\b{key}\b"):
        SSLConfig.from_pretrained(tmp_path)


def test_a_good_config_json_still_loads(tmp_path):
    SSLConfig.from_preset(TINY, image_size=48).save_pretrained(tmp_path)
    assert SSLConfig.from_pretrained(tmp_path).image_size == 48


# ---- run arguments -----------------------------------------------------------------------------------------------

PRETRAIN_BAD = [
    ("--epochs", "0"),
    ("--epochs", "-1"),
    ("--max-steps", "0"),
    ("--keep-checkpoints", "0"),
    ("--checkpoint-every", "0"),
    ("--gradient-accumulation-steps", "0"),
    ("--batch-size", "0"),
    ("--lr", "-0.1"),  # 0 is allowed: the weights stay (tests/test_shared_components.py's momentum check)
    ("--log-every", "0"),
    ("--image-size", "-32"),
]
FINETUNE_BAD = [
    ("--epochs", "0"),
    ("--batch-size", "0"),
    ("--gradient-accumulation-steps", "0"),
    ("--keep-checkpoints", "0"),
    ("--val-fraction", "1"),
    ("--layer-decay", "0"),
    ("--drop-path", "1"),
]


@pytest.mark.parametrize("flag, value", PRETRAIN_BAD)
def test_pretrain_refuses_bad_run_arguments(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    status, err = run_cli(["pretrain", flag, value, "--output-dir", str(out)], capsys)
    assert status == 2 and len(err) == 1
    assert f"{flag} must be" in err[0] and f"got {value}" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("flag, value", FINETUNE_BAD)
def test_finetune_refuses_bad_run_arguments(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    argv = ["finetune", "--model", TINY, "--data", "builtin", flag, value, "--output-dir", str(out)]
    status, err = run_cli(argv, capsys)
    assert status == 2 and len(err) == 1 and f"{flag} must be" in err[0]
    assert not out.exists()


def test_python_api_arguments_are_checked_too(tmp_path):
    from sslhub.finetune import FinetuneArguments
    from sslhub.training import PretrainArguments

    with pytest.raises(ValueError, match="--max-steps must be >= 1, got 0"):
        PretrainArguments(output_dir=str(tmp_path), max_steps=0)
    with pytest.raises(ValueError, match="--epochs expects a finite number, got '3'"):
        FinetuneArguments(model=TINY, data="builtin", epochs="3")
    PretrainArguments(output_dir=str(tmp_path), max_steps=1, epochs=1, lr=0.1)  # in bounds


# ---- output directory --------------------------------------------------------------------------------------------


def test_check_writable_creates_the_directory_and_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable(target) == target and target.is_dir() and not any(target.iterdir())


def test_output_dir_that_is_a_file_or_under_one_is_refused(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(ValueError, match=f"output directory {file} is a file"):
        check_writable(file)
    with pytest.raises(ValueError, match=f"output directory {file / 'sub'} is not writable"):
        check_writable(file / "sub")
    assert file.read_text() == "mine"


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a /sys pseudo file system")
def test_output_dir_under_sys_is_refused():
    with pytest.raises(ValueError, match="output directory /sys/sslhub-out is not writable"):
        check_writable("/sys/sslhub-out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_writable(tmp_path / "out")
    finally:
        tmp_path.chmod(0o755)


def test_pretrain_and_finetune_check_the_output_dir_before_training(tmp_path, monkeypatch):
    from helpers import tiny_args

    from sslhub import finetune, training

    file = tmp_path / "taken"
    file.write_text("")
    monkeypatch.setattr(training, "seeded_accelerator", pytest.fail)  # nothing starts before the check
    with pytest.raises(ValueError, match="is a file"):
        training.Pretrainer(tiny_args("builtin", file))
    monkeypatch.setattr(finetune, "seeded_accelerator", pytest.fail)
    with pytest.raises(ValueError, match="is a file"):
        finetune.Finetuner(finetune.FinetuneArguments(model=TINY, data="builtin", output_dir=str(file)))


# ---- data discovery ----------------------------------------------------------------------------------------------


def write_classes(root, count=3):
    """``root/{cats,dogs}/{i}.png``: ``count`` distinct 8x8 images per class."""
    for c, label in enumerate(("cats", "dogs")):
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), 10 * i + 100 * c, np.uint8)).save(root / label / f"{i}.png")


def test_symlink_loop_and_duplicate_links_add_no_items(tmp_path):
    write_classes(tmp_path)
    (tmp_path / "cats" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a loop back to the root
    (tmp_path / "dogs" / "again").symlink_to(tmp_path / "dogs", target_is_directory=True)  # a loop to itself
    (tmp_path / "alias").symlink_to(tmp_path / "cats", target_is_directory=True)  # a second link to a class folder
    dataset = image_folder(tmp_path)
    assert len(dataset) == 6 and dataset.classes == ["cats", "dogs"]
    expected = [f"{label}/{i}.png" for label in ("cats", "dogs") for i in range(3)]
    assert [str(path.relative_to(tmp_path)) for path in dataset.images] == expected
    assert dataset.labels == [0, 0, 0, 1, 1, 1]


def test_a_linked_folder_outside_the_data_is_still_followed(tmp_path):
    write_classes(tmp_path / "elsewhere")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cats").symlink_to(tmp_path / "elsewhere" / "cats", target_is_directory=True)
    (tmp_path / "data" / "dogs").symlink_to(tmp_path / "elsewhere" / "dogs", target_is_directory=True)
    assert image_folder(tmp_path / "data").labels == [0, 0, 0, 1, 1, 1]


def rotated_photo(path) -> np.ndarray:
    """A JPEG whose EXIF orientation says "rotate 90 degrees clockwise to display"; returns its upright pixels."""
    pixels = np.random.default_rng(0).integers(0, 255, (16, 32, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    stored = np.asarray(Image.open(path).convert("RGB"))  # the decoder's pixels, not rotated
    return np.rot90(stored, k=-1)


@pytest.mark.parametrize("cache_bytes", [1 << 20, 0])
def test_exif_orientation_is_applied(tmp_path, cache_bytes):
    upright = rotated_photo(tmp_path / "photo.jpg")
    image, _ = image_folder(tmp_path, cache_bytes=cache_bytes)[0]
    assert image.size == (16, 32)
    np.testing.assert_array_equal(np.asarray(image), upright)


@pytest.mark.parametrize("cache_bytes", [1 << 20, 0])
def test_exif_orientation_is_applied_to_hugging_face_datasets(tmp_path, cache_bytes):
    """``datasets`` decodes an ``Image()`` column upright (its ``decode_example`` transposes by EXIF), read lazily or
    into sslhub's decoded cache."""
    import datasets

    upright = rotated_photo(tmp_path / "photo.jpg")
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "photo.jpg")]}).cast_column("image", datasets.Image())
    image, _ = hf_dataset(table, cache_bytes=cache_bytes)[0]
    np.testing.assert_array_equal(np.asarray(image), upright)


def truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_jpeg_is_skipped_at_discovery_when_decoded(tmp_path):
    write_classes(tmp_path)
    truncated_jpeg(tmp_path / "cats" / "broken.jpg")
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable or non-image file\(s\) .*cats/broken.jpg"):
        dataset = image_folder(tmp_path)
    assert len(dataset) == 6 and dataset.decoded is not None


def test_truncated_jpeg_of_a_lazy_folder_is_skipped_and_counted_when_read(tmp_path):
    write_classes(tmp_path)
    truncated_jpeg(tmp_path / "cats" / "1.png.jpg")  # sorts between cats/1.png and cats/2.png
    dataset = image_folder(tmp_path, cache_bytes=0)  # too large to decode at discovery: read lazily
    assert dataset.decoded is None and len(dataset) == 7
    broken = [str(p) for p in dataset.images].index(str(tmp_path / "cats" / "1.png.jpg"))
    with pytest.warns(UserWarning, match=r"Skipped an unreadable image \(1 so far\): .*1\.png\.jpg"):
        image, label = dataset[broken]
    expected = np.asarray(Image.open(tmp_path / "cats" / "2.png").convert("RGB"))  # the next readable item
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert label == 0 and dataset.unreadable == {str(tmp_path / "cats" / "1.png.jpg")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [dataset[i] for i in range(len(dataset)) if i != broken]  # the others read without a warning


def test_a_folder_of_unreadable_files_read_lazily_is_a_clear_error(tmp_path):
    for i in range(MAX_READ_RETRIES):
        truncated_jpeg(tmp_path / f"{i}.jpg")
    dataset = ImageDataset([tmp_path / f"{i}.jpg" for i in range(MAX_READ_RETRIES)])
    with pytest.warns(UserWarning), pytest.raises(OSError, match=f"{MAX_READ_RETRIES} images in a row"):
        dataset[0]


# ---- command line ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    argv = ["pretrain", "--epochs", "0", "--output-dir", str(tmp_path / "out")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        cli.main(argv)


@pytest.mark.parametrize("command, hint", [("pretrain", True), ("finetune", True), ("convert", False)])
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch, command, hint):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    from sslhub import finetune, training
    from sslhub.conversion import convert

    monkeypatch.setattr(training, "pretrain", interrupted)
    monkeypatch.setattr(finetune, "finetune", interrupted)
    monkeypatch.setattr(convert, "convert_checkpoint", interrupted)
    argv = {
        "pretrain": ["pretrain", "--output-dir", str(tmp_path / "out")],
        "finetune": ["finetune", "--model", TINY, "--data", "builtin"],
        "convert": ["convert", "--model", TINY, "--checkpoint", "x.pth", "--output", str(tmp_path / "out")],
    }[command]
    status, err = run_cli(argv, capsys)
    expected = f"sslhub {command}: interrupted" + ("; resume with --resume latest" if hint else "")
    assert status == 130 and err == [expected]


def test_a_collective_that_lost_another_process_is_one_line(tmp_path, capsys, monkeypatch):
    """What gloo raises in the surviving process of a 2-process run whose other process was killed (seen with
    torchrun and kill -9), before torchrun's SIGTERM reaches it."""
    from sslhub import training

    def lost_peer(*args, **kwargs):
        raise RuntimeError(
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:24451: "
            "Connection reset by peer. This is typically caused by a remote worker hanging"
        )

    monkeypatch.setattr(training, "pretrain", lost_peer)
    status, err = run_cli(["pretrain", "--output-dir", str(tmp_path / "out")], capsys)
    assert status == 1 and len(err) == 1
    assert err[0].startswith("sslhub pretrain: error: another process of this run stopped ([/__w/pytorch")
    assert err[0].endswith("Connection reset by peer); its log names why; resume with --resume latest")

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(training, "pretrain", bug)
    with pytest.raises(RuntimeError):  # any other RuntimeError is a bug to show in full
        run_cli(["pretrain", "--output-dir", str(tmp_path / "out")], capsys)


def test_sslhubs_own_warnings_are_one_line_on_the_command_line(capsys):
    """``sslhub finetune`` warning that a run ended at chance: one line naming the command, not the file and line of
    sslhub's code; other packages' warnings keep Python's format."""
    shown = []
    show = cli._one_line_warnings("finetune", lambda *args: shown.append(args))
    show(UserWarning("fine-tuning ended at chance"), UserWarning, cli.__file__, 530)
    assert capsys.readouterr().err == "sslhub finetune: warning: fine-tuning ended at chance\n"
    show(UserWarning("theirs"), UserWarning, torch.__file__, 7)
    assert len(shown) == 1 and shown[0][2] == torch.__file__ and capsys.readouterr().err == ""
