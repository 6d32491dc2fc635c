"""Whole transformers exports: every tensor of the class is written, so transformers reloads them (``AutoModel``
included) with nothing missing or initialised anew, and they compute sslhub's features; refusals name the CLI's
alternative."""

import json

import pytest
import torch
import transformers
from helpers import perturb_, random_batch_norm_statistics, relative_error

import sslhub
from sslhub import export
from sslhub.cli import main as cli_main
from sslhub.conversion.convert import convert_checkpoint
from sslhub.modeling import VERBOSE_ENV

BEIT_TINY = {  # tests/test_beit.py's tiny BEiT objective: a random 64-token tokenizer, no file
    "backbone_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "tokenizer_hidden": 8,
    "tokenizer_blocks_per_group": 1,
    "vocab_size": 64,
    "tokenizer_path": "random",
}


def reload(directory, caplog, loader=transformers.AutoModel, **kwargs):
    """The export as a transformers user loads it; transformers logs no LOAD REPORT and reports no missing,
    unexpected or misshapen tensor."""
    caplog.clear()
    model, info = loader.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    assert "LOAD REPORT" not in caplog.text
    assert type(model).__name__ == json.loads((directory / "config.json").read_text())["architectures"][0]
    return model.eval()


def perturbed(model):
    """``model`` with seeded noise on every parameter and BatchNorm statistics, in evaluation mode: a key mapped to
    the wrong tensor changes the outputs."""
    with torch.no_grad():
        perturb_(model, ("",))
    return random_batch_norm_statistics(model)


@pytest.mark.parametrize(
    "preset, overrides, hf_class",
    [
        ("dino_vit_tiny_patch4_32px", {}, "ViTModel"),
        ("dino_vit_tiny_patch4_32px", {"pooling": "mean"}, "ViTMSNModel"),
        ("mae_vit_tiny_patch4_32px", {}, "ViTMAEModel"),
        ("beit_vit_tiny_patch4_32px", {}, "BeitModel"),
        ("moco_v2_resnet18_32px", {"image_size": 64}, "ResNetModel"),
        ("moco_v2_resnet50", {"image_size": 64}, "ResNetModel"),
    ],
    ids=["vit_cls", "vit_mean", "mae", "beit_mean", "resnet18", "resnet50"],
)
def test_an_encoder_export_reloads_whole_in_auto_model_with_sslhubs_outputs(preset, overrides, hf_class, tmp_path,
                                                                             caplog):  # fmt: skip
    model = perturbed(sslhub.create_model(preset, **overrides))
    size = model.config.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    directory = export.export_transformers(model, tmp_path / "hf")
    inputs = {}
    if hf_class == "ViTMAEModel":  # masking nothing, patches in order
        hf_model = reload(directory, caplog, mask_ratio=0.0)
        inputs["noise"] = torch.arange((size // 4) ** 2, dtype=torch.float).expand(2, -1)
    else:
        hf_model = reload(directory, caplog)
    assert type(hf_model).__name__ == hf_class
    with torch.no_grad():
        expected, output = model(images), hf_model(images, **inputs)
    assert relative_error(output.last_hidden_state, expected.last_hidden_state) < 1e-4
    tokens = output.last_hidden_state
    if hf_class in ("ViTModel", "ResNetModel"):  # their pooler is sslhub's (ResNet's: (B, C, 1, 1))
        assert relative_error(output.pooler_output.flatten(1), expected.pooler_output) < 1e-4
    elif hf_class == "BeitModel":  # a pooler without weights, on the class token; sslhub's BEiT pools the mean
        assert torch.equal(output.pooler_output, tokens[:, 0])
        assert relative_error(tokens[:, 1:].mean(1), expected.pooler_output) < 1e-4
    else:  # no pooler
        assert getattr(output, "pooler_output", None) is None
        assert relative_error(tokens[:, 1:].mean(1) if hf_class == "ViTMSNModel" else tokens[:, 0],
                              expected.pooler_output) < 1e-4  # fmt: skip


def test_a_mean_pooled_vit_export_converts_back(tmp_path):
    model = perturbed(sslhub.create_model("dino_vit_tiny_patch4_32px", pooling="mean"))
    export.export_transformers(model, tmp_path / "hf")
    back = convert_checkpoint("dino_vit_tiny_patch4_32px", tmp_path / "hf", pooling="mean").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(back(images).pooler_output, model(images).pooler_output)


@pytest.mark.parametrize(
    "preset, overrides, hf_class",
    [
        ("mae_vit_tiny_patch4_32px", {}, transformers.ViTMAEForPreTraining),
        ("beit_vit_tiny_patch4_32px", BEIT_TINY, transformers.BeitForMaskedImageModeling),
    ],
    ids=["mae", "beit"],
)
def test_a_pretraining_export_reloads_whole(preset, overrides, hf_class, tmp_path, caplog):
    model = sslhub.create_model(preset, task="pretraining", **overrides)
    reload(export.export_transformers(model, tmp_path / "hf"), caplog, loader=hf_class)


def test_a_classifier_exports_its_encoder(tmp_path, caplog):
    classifier = perturbed(sslhub.create_model("moco_v2_resnet18_32px", task="classification", num_labels=3))
    hf_model = reload(export.export_transformers(classifier, tmp_path / "hf"), caplog)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pooled = hf_model(images).pooler_output.flatten(1)
        assert relative_error(pooled, classifier.ssl(images).pooler_output) < 1e-4


TIMM_INSTEAD = "; use `sslhub export --format timm` (sslhub.export_timm in Python)"


@pytest.mark.parametrize(
    "preset, overrides, reason, instead",
    [
        ("moco_v2_resnet18_32px", {"backbone": "resnet18d"}, "a 7x7 stride-2 stem convolution", TIMM_INSTEAD),
        ("moco_v2_resnet18_32px", {"backbone_kwargs": {"output_stride": 16}}, "strides 1, 2, 2, 2", TIMM_INSTEAD),
        ("byol_resnet18_32px", {"tf_padding": "same"}, "(TimmEncoder computes what",
         "; it has no timm export either: use the sslhub checkpoint itself"),
    ],
    ids=["deep_stem", "dilated", "tf_padding"],
)  # fmt: skip
def test_a_resnet_transformers_cannot_compute_is_refused_in_one_sentence(preset, overrides, reason, instead,
                                                                         tmp_path):  # fmt: skip
    model = sslhub.create_model(preset, **overrides)
    with pytest.raises(ValueError, match=r"^\w+ resnet18d? has no transformers export \(") as info:
        export.export_transformers(model, tmp_path / "hf")
    message = str(info.value)
    assert reason in message and message.endswith(instead) and "\n" not in message
    assert not (tmp_path / "hf").exists()


def test_cli_export_refusal_names_the_format_flag(tmp_path, capsys):
    sslhub.create_model("moco_v2_resnet18_32px", backbone="resnet18d").save_pretrained(tmp_path / "ckpt")
    args = ["export", "--model", str(tmp_path / "ckpt"), "--format", "transformers", "--output", str(tmp_path / "hf")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslhub export: error: moco_v2 resnet18d has no transformers export (")
    assert err.endswith(TIMM_INSTEAD + "\n") and not (tmp_path / "hf").exists()


def test_cli_export_of_a_release_from_its_file_and_verbose(tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(VERBOSE_ENV, "0")  # --verbose sets it; restored after the test
    name = "dino_vit_small_patch16_224.in1k"
    torch.manual_seed(0)
    release = sslhub.to_timm(sslhub.create_model(name.partition(".")[0])).state_dict()
    torch.save(release, tmp_path / "dino_deitsmall16_pretrain.pth")
    args = ["export", "--model", name, "--pretrained-path", str(tmp_path / "dino_deitsmall16_pretrain.pth")]
    assert cli_main([*args, "--format", "transformers", "--output", str(tmp_path / "hf")]) == 0
    assert "Loading weights" not in capfd.readouterr().err  # quiet by default
    vit = reload(tmp_path / "hf", caplog)
    assert torch.equal(vit.embeddings.cls_token, release["cls_token"])
    assert cli_main(["--verbose", *args, "--format", "timm", "--output", str(tmp_path / "timm")]) == 0
    assert "Loading weights" in capfd.readouterr().err
