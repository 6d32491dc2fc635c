"""Export back to timm and transformers: the reloaded models reproduce sslhub's outputs, and writes are atomic."""

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file

import sslhub
from sslhub import export
from sslhub.cli import main as cli_main


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def released(model) -> sslhub.SSLModel:
    return (model.released_model() if isinstance(model, sslhub.SSLForPreTraining) else model).eval()


@pytest.mark.parametrize(
    "preset, task, overrides",
    [
        ("dino_vit_tiny_patch4_32px", "features", {}),
        ("dino_vit_tiny_patch4_32px", "features", {"pooling": "mean"}),
        ("moco_v2_resnet18_32px", "pretraining", {}),
    ],
    ids=["vit_cls", "vit_mean", "resnet_pretraining"],
)
def test_export_timm_reloads_in_plain_timm_with_the_same_pooled_features(preset, task, overrides, tmp_path, images):
    model = sslhub.create_model(preset, task=task, **overrides)
    directory = export.export_timm(model, tmp_path / "timm")
    config = json.loads((directory / "config.json").read_text())
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 32, 32] and pretrained_cfg["tag"] == model.config.method
    assert (pretrained_cfg["mean"], pretrained_cfg["std"]) == (model.config.image_mean, model.config.image_std)
    assert "license" not in pretrained_cfg  # timm's default cfg describes other weights
    timm_model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors")),
        **{**config["model_args"], "num_classes": 0},
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model(images), released(model)(images).pooler_output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["features", "pretraining"])
def test_export_transformers_dino_vit_gives_the_same_tokens(task, tmp_path, images):
    model = sslhub.create_model("dino_vit_tiny_patch4_32px", task=task)
    directory = export.export_transformers(model, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["layer_norm_eps"]) == ("vit", ["ViTModel"], 1e-6)
    hf_model = transformers.ViTModel.from_pretrained(directory).eval()
    with torch.no_grad():
        expected = released(model)(images).last_hidden_state
        torch.testing.assert_close(hf_model(images).last_hidden_state, expected, rtol=1e-4, atol=1e-5)


def test_export_transformers_mae_gives_the_same_loss_and_tokens(tmp_path, images):
    model = sslhub.create_model("mae_vit_tiny_patch4_32px", task="pretraining").eval()
    directory = export.export_transformers(model, tmp_path / "hf")
    assert "decoder.decoder_layers.1.attention.attention.query.weight" in load_file(directory / "model.safetensors")
    hf_model = transformers.ViTMAEForPreTraining.from_pretrained(directory).eval()
    assert (hf_model.config.mask_ratio, hf_model.config.norm_pix_loss) == (0.75, True)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # same noise -> same 75 % masked patches, decoder predictions and normalised-pixel loss
        torch.testing.assert_close(hf_model(images, noise=noise).loss, model([images], noise=noise).loss)
        encoder = transformers.ViTMAEModel.from_pretrained(directory, mask_ratio=0.0).eval()
        in_order = torch.arange(64.0).expand(2, -1)
        expected = model.released_model()(images).last_hidden_state
        torch.testing.assert_close(encoder(images, noise=in_order).last_hidden_state, expected, rtol=1e-4, atol=1e-5)


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model = sslhub.create_model("dino_vit_tiny_patch4_32px")
    monkeypatch.setitem(export.TIMM_POOLING, "cls", "avg")  # a wrong pooling: the reloaded features differ
    with pytest.raises(ValueError, match="does not reproduce sslhub's output"):
        export.export_timm(model, tmp_path / "out")
    monkeypatch.undo()

    def disk_full(tensors, path, metadata=None):
        path.write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.export_transformers(model, tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_export_replaces_its_own_files_only_when_asked_and_never_the_users(tmp_path):
    model = sslhub.create_model("dino_vit_tiny_patch4_32px")
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_timm(model, target)
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    export.export_timm(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [".sslhub-files", "config.json", "model.safetensors", "old.txt"]
    assert (target / "old.txt").read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_export_of_a_saved_checkpoint(tmp_path, images, capsys):
    model = sslhub.create_model("dino_vit_tiny_patch4_32px").eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (
        cli_main(
            ["export", "--model", str(tmp_path / "ckpt"), "--format", "transformers", "--output", str(tmp_path / "hf")]
        )
        == 0
    )
    assert "Exported" in capsys.readouterr().out
    vit = transformers.ViTModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = model(images).last_hidden_state
        assert torch.allclose(vit(images).last_hidden_state, expected, atol=1e-5)


def test_export_timm_refuses_an_encoder_that_pads_as_tensorflow_in_one_sentence(tmp_path):
    """A release whose ResNet pads as its TensorFlow / JAX model (BYOL's 'SAME') has no faithful timm config."""
    model = sslhub.create_model("byol_resnet18_32px", tf_padding="same")
    with pytest.raises(ValueError, match="no timm export") as info:
        export.export_timm(model, tmp_path / "timm")
    assert "TensorFlow's 'SAME'" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "timm").exists()
