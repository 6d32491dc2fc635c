"""Bad inputs to loading, conversion and export (issue 15): each is refused with one sentence naming the file, key or
flag, writes nothing half-done and deletes nothing sslhub did not write."""

import json
import logging
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import sslhub
from sslhub.cli import main as cli_main
from sslhub.conversion.convert import convert_checkpoint
from sslhub.conversion.loading import CheckpointError, load_file_state

PRESET = "moco_v2_resnet18_32px"


def encoder_dir(path, task="features"):
    """A saved random ``PRESET`` model (``SSLModel`` by default)."""
    torch.manual_seed(0)
    sslhub.create_model(PRESET, task=task).save_pretrained(path)
    return path


def edit_weights(directory, edit):
    """Rewrite ``directory/model.safetensors`` with ``edit(state)`` applied."""
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def user_files(directory):
    """A directory holding the user's own files: notes.txt and sub/data.csv."""
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return directory


def assert_user_files_kept(directory):
    assert (directory / "notes.txt").read_text() == "mine"
    assert (directory / "sub" / "data.csv").read_text() == "a,b\n1,2\n"


def timm_backbone_file(tmp_path, edit=None):
    """The timm state dict of ``PRESET``'s backbone saved as a PyTorch file (the generic "backbone" layout)."""
    torch.manual_seed(0)
    state = sslhub.to_timm(sslhub.create_model(PRESET)).state_dict()
    if edit is not None:
        edit(state)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    return path


# ---- strict loading ------------------------------------------------------------------------------------------------


def test_a_missing_tensor_is_refused_by_from_pretrained_and_export(tmp_path, capsys):
    directory = encoder_dir(tmp_path / "enc")
    edit_weights(directory, lambda state: state.pop("encoder.backbone.bn1.running_var"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): \['encoder.backbone.bn1.running_var'\]"):
        sslhub.from_pretrained(directory)
    output = tmp_path / "exported"
    assert cli_main(["export", "--model", str(directory), "--format", "timm", "--output", str(output)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: the one-line error
    assert last.startswith(f"sslhub export: error: {directory}") and "encoder.backbone.bn1.running_var" in last
    assert not output.exists()


def test_an_unexpected_tensor_is_refused_but_a_classifier_loads_as_its_encoder(tmp_path):
    directory = encoder_dir(tmp_path / "enc")
    edit_weights(directory, lambda state: state.update(extra=torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): \['extra'\]"):
        sslhub.from_pretrained(directory)
    torch.manual_seed(0)
    classifier = sslhub.create_model(PRESET, task="classification", num_labels=3)
    classifier.save_pretrained(tmp_path / "clf")
    encoder = sslhub.from_pretrained(tmp_path / "clf", task="features")  # the classifier is dropped, as asked
    assert torch.equal(encoder.encoder.backbone.conv1.weight, classifier.ssl.encoder.backbone.conv1.weight)


def test_pretraining_from_an_encoder_directory_is_refused_naming_what_it_holds(tmp_path):
    directory = encoder_dir(tmp_path / "out")
    with pytest.raises(CheckpointError, match="holds an SSLModel \\(encoder only\\); pretraining needs an "
                       "SSLForPreTraining directory: OUT/pretraining"):  # fmt: skip
        sslhub.from_pretrained(directory, task="pretraining")
    encoder_dir(directory / "pretraining", task="pretraining")  # as `sslhub pretrain --output-dir out` writes it
    with pytest.raises(CheckpointError, match=f"SSLForPreTraining directory: {directory / 'pretraining'}$"):
        sslhub.from_pretrained(directory, task="pretraining")
    pretraining = sslhub.from_pretrained(directory / "pretraining", task="pretraining")
    assert type(pretraining).__name__ == "SSLForPreTraining"


def test_pretrain_from_an_encoder_directory_exits_2_before_training(tmp_path, capsys):
    directory = encoder_dir(tmp_path / "enc")
    output = tmp_path / "run"
    args = ["pretrain", "--model", str(directory), "--data", "builtin", "--output-dir", str(output), "--epochs", "1"]
    assert cli_main([*args, "--no-progress", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds an SSLModel (encoder only); pretraining needs an SSLForPreTraining directory" in err
    assert not (output / "model.safetensors").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_on_load_and_on_convert(tmp_path, capsys, value):
    directory = encoder_dir(tmp_path / "enc")
    edit_weights(directory, lambda state: state["encoder.backbone.layer1.0.conv1.weight"].view(-1)[7].fill_(value))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) hold NaN or inf values: \['encoder.backbone.layer1"):
        sslhub.from_pretrained(directory)

    def poison(state):
        state["fc.weight" if "fc.weight" in state else "conv1.weight"].view(-1)[0] = value

    path = timm_backbone_file(tmp_path, poison)
    with pytest.raises(CheckpointError, match=r"backbone.pth.*hold NaN or inf values: \['conv1.weight'\]"):
        convert_checkpoint(PRESET, path)
    output = tmp_path / "converted"
    assert cli_main(["convert", "--model", PRESET, "--checkpoint", str(path), "--output", str(output)]) == 2
    assert "NaN or inf" in capsys.readouterr().err and not output.exists()


def test_truncated_or_wrong_shape_safetensors_is_one_sentence_naming_the_file(tmp_path):
    """A truncated file, a file without header, a truncated shard of a sharded checkpoint (named, not
    ``model.safetensors``), a tensor of another shape."""
    directory = encoder_dir(tmp_path / "enc")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"^{weights} is not a readable safetensors file"):
        sslhub.from_pretrained(directory)
    weights.write_bytes(b"\x00" * 64)  # not even a header
    with pytest.raises(CheckpointError, match=f"^{weights} is not a readable safetensors file"):
        sslhub.from_pretrained(directory)
    sharded = tmp_path / "sharded"
    sslhub.from_pretrained(encoder_dir(tmp_path / "whole")).save_pretrained(sharded, max_shard_size="10MB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"^{shards[-1]} is not a readable safetensors file"):
        sslhub.from_pretrained(sharded)
    other = encoder_dir(tmp_path / "shape")
    edit_weights(other, lambda state: state.update({"encoder.backbone.conv1.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError) as raised:
        sslhub.from_pretrained(other)
    assert str(raised.value).count("\n") == 0
    assert "wrong shape (1): ['encoder.backbone.conv1.weight: file (3, 3) vs model (64, 3, 7, 7)']" in str(raised.value)


def test_a_load_that_matches_prints_no_load_report(tmp_path, monkeypatch):
    records = []  # what transformers' own handler would print (its library logger does not propagate to pytest's)
    handler = logging.Handler()
    handler.emit = records.append
    monkeypatch.setattr(logging.getLogger("transformers"), "handlers", [handler])
    directory = encoder_dir(tmp_path / "enc")
    sslhub.from_pretrained(directory)
    sslhub.from_pretrained(directory, task="classification")  # a new classifier: no report of it
    torch.manual_seed(0)
    sslhub.create_model(PRESET, task="classification", num_labels=3).save_pretrained(tmp_path / "clf")
    sslhub.from_pretrained(tmp_path / "clf", task="features")  # the classifier dropped: no report either
    assert not [record.getMessage() for record in records if "LOAD REPORT" in record.getMessage()]
    assert records == []  # nor the tensor-parallel warning a quieter logger level would cause


@pytest.mark.filterwarnings("ignore:.*preset without weights:UserWarning")
def test_cli_release_errors_name_the_pretrained_path_flag(tmp_path, monkeypatch, capsys):
    """A release not on disk (offline, nothing cached), a --pretrained-path that does not exist, and one given with a
    model that is no release: eval, finetune and export each say so naming --pretrained-path."""
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))
    commands = {
        "eval": ["eval", "knn", "--data", "builtin", "--output-dir", str(tmp_path / "eval"), "--no-progress"],
        "finetune": ["finetune", "--data", "builtin", "--output-dir", str(tmp_path / "ft"), "--no-progress"],
        "export": ["export", "--format", "timm", "--output", str(tmp_path / "export")],
    }
    release, missing = "dino_vit_small_patch16_224.in1k", str(tmp_path / "missing.pth")
    for name, command in commands.items():
        for model, extra, message in [
            (release, [], "(offline); pass --pretrained-path FILE (Python: pretrained_path=FILE)"),
            (release, ["--pretrained-path", missing], f"(pretrained_path) {missing!r} does not exist"),
            (PRESET, ["--pretrained-path", missing], "is the file of a release 'preset.tag'"),
        ]:
            assert cli_main([*command, "--model", model, *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"sslhub {name}: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "export").exists()


# ---- output directories --------------------------------------------------------------------------------------------


def test_convert_into_a_non_empty_directory_needs_overwrite_and_keeps_the_users_files(tmp_path, capsys):
    path = timm_backbone_file(tmp_path)
    output = user_files(tmp_path / "out")
    (output / "model.safetensors.index.json").write_text("{}")  # an earlier sharded save's index: stale weights
    args = ["convert", "--model", PRESET, "--checkpoint", str(path), "--output", str(output)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"{output} is not empty; pass --overwrite" in err and "overwrite=True" not in err
    assert sorted(p.name for p in output.iterdir()) == ["model.safetensors.index.json", "notes.txt", "sub"]
    assert cli_main([*args, "--overwrite"]) == 0
    assert_user_files_kept(output)
    assert sorted(p.name for p in output.iterdir()) == [
        ".sslhub-files", "README.md", "config.json", "model.safetensors", "notes.txt", "preprocessor_config.json", "sub"
    ]  # fmt: skip
    written = sslhub.from_pretrained(output).encoder.backbone.conv1.weight
    assert torch.equal(written, torch.load(path, weights_only=True)["conv1.weight"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left


def test_overwrite_replaces_only_the_files_sslhub_wrote(tmp_path, capsys):
    """The user's own README.md in the output is not sslhub's to replace, even with --overwrite (nothing is written);
    sslhub's own output is replaced, and files the user added to it stay."""
    path = timm_backbone_file(tmp_path)
    output = user_files(tmp_path / "out")
    (output / "README.md").write_text("my project")
    args = ["convert", "--model", PRESET, "--checkpoint", str(path), "--output", str(output), "--overwrite"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "holds ['README.md'], which sslhub did not write there" in err and err.count("\n") == 1
    assert (output / "README.md").read_text() == "my project"
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "notes.txt", "sub"]
    ours = tmp_path / "ours"
    assert cli_main([*args[:-2], str(ours)]) == 0
    (ours / "notes.txt").write_text("mine")
    card = (ours / "README.md").read_text()
    assert cli_main([*args[:-2], str(ours), "--overwrite"]) == 0
    assert (ours / "notes.txt").read_text() == "mine" and (ours / "README.md").read_text() == card


def test_export_into_a_non_empty_directory_names_the_flag_and_keeps_the_users_files(tmp_path, capsys):
    directory = encoder_dir(tmp_path / "enc")
    output = user_files(tmp_path / "out")
    args = ["export", "--model", str(directory), "--format", "timm", "--output", str(output)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt", "sub"]
    assert cli_main([*args, "--overwrite"]) == 0
    assert_user_files_kept(output)
    assert {"config.json", "model.safetensors"} <= {p.name for p in output.iterdir()}
    file = tmp_path / "a_file"
    file.write_text("x")
    assert cli_main([*args[:-1], str(file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and file.read_text() == "x"


def test_a_moco_file_converted_as_dino_is_refused_naming_both(tmp_path, capsys):
    torch.manual_seed(0)
    moco = sslhub.create_model(PRESET, task="pretraining").method
    state = {f"module.encoder_q.{k}": v for k, v in moco.encoder_q.backbone.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v for k, v in moco.encoder_k.backbone.state_dict().items()}
    state |= {"module.queue": moco.queue, "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": state}, path)
    output = tmp_path / "out"
    assert cli_main(["convert", "--model", "dino_resnet50", "--checkpoint", str(path), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "'moco' checkpoint of moco_v1, moco_v2, not of 'dino'" in err and not output.exists()


# ---- the conversion cache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "nan", "config"])
def test_a_corrupted_cached_conversion_is_converted_again(tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))
    name = "dino_vit_small_patch16_224.in1k"
    torch.manual_seed(0)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(sslhub.to_timm(sslhub.create_model(name.partition(".")[0])).state_dict(), path)
    expected = sslhub.create_model(name, pretrained=True, pretrained_path=path).encoder.backbone.cls_token.clone()
    cached = tmp_path / "cache" / "converted" / name / "features"
    weights = cached / "model.safetensors"
    if damage == "truncated":  # a new file: the one loaded above may still be memory-mapped
        data = weights.read_bytes()
        weights.unlink()
        weights.write_bytes(data[:1000])
    elif damage == "nan":
        edit_weights(cached, lambda state: state["encoder.backbone.cls_token"].fill_(float("nan")))
    else:
        (cached / "config.json").write_text('{"method": ')
    with caplog.at_level("WARNING", logger="sslhub.conversion.pretrained"):
        again = sslhub.create_model(name, pretrained=True, pretrained_path=path)
    assert f"the cached conversion {cached} does not load" in caplog.text
    assert torch.equal(again.encoder.backbone.cls_token, expected)
    assert json.loads((cached / "source.json").read_text())["source"] == str(path.resolve())
    sslhub.from_pretrained(cached)  # the cache is whole again


# ---- no unsafe advice ----------------------------------------------------------------------------------------------


def torch_file_with_pickle(path, pickled: bytes):
    """A ``torch.save`` zip archive whose ``data.pkl`` is ``pickled``."""
    torch.save({"a": 1}, path.with_suffix(".base"))
    with zipfile.ZipFile(path.with_suffix(".base")) as source, zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, pickled if name.endswith("/data.pkl") else source.read(name))
    return path


@pytest.mark.parametrize(
    "pickled, reason",
    [
        (b"(S'touch MARKER'\nios\nsystem\n.", r"the pickle calls code \(os.system\)"),  # protocol 0's INST
        (b"\x80\x02\x82\x01.", r"not a readable PyTorch checkpoint \(Unsupported operand"),  # EXT1: no global
    ],
    ids=["inst-os-system", "unsupported-opcode"],
)
def test_a_refused_pickle_names_the_file_runs_nothing_and_never_suggests_weights_only_false(
    tmp_path, monkeypatch, pickled, reason
):
    monkeypatch.chdir(tmp_path)
    path = torch_file_with_pickle(tmp_path / "file.pth", pickled)
    with pytest.raises(CheckpointError, match=f"^{path}: .*{reason}") as raised:
        load_file_state(path)
    message = str(raised.value)
    assert "weights_only` set to `False`" not in message and "weights_only=False" not in message.replace(" ", "")
    assert "add_safe_globals" not in message and "\n" not in message
    assert not (tmp_path / "MARKER").exists()
