"""Model classes: save/load round trips, Auto* registration, outputs and the timm hand-over."""

import subprocess
import sys

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import sslhub
from sslhub.cli import main as cli_main
from sslhub.conversion.loading import CheckpointError
from sslhub.modeling import TASKS, VERBOSE_ENV, model_class


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_list_methods_and_models():
    assert {"moco_v2", "dino", "mae"} <= set(sslhub.list_methods())
    dino = sslhub.list_models("dino_*")
    assert "dino_vit_small_patch16_224" in dino and all(name.startswith("dino_") for name in dino)
    for name in ("moco_v2_resnet50", "mae_vit_huge_patch14_224", "dino_resnet50", "dino_vit_base_patch16_224"):
        assert name in sslhub.list_models()
    releases = sslhub.list_models("dino_*", pretrained=True)  # timm's list_models(pretrained=True): model.tag names
    assert releases == sslhub.list_pretrained("dino_*") and "dino_vit_small_patch16_224.in1k" in releases


def test_cli_list_takes_a_word_the_names_contain(capsys):
    assert cli_main(["list", "dino"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "dino_vit_small_patch16_224" in listed and "dinov2_vit_small_patch14_518" in listed
    assert all("dino" in name for name in listed) and "ibot_vit_small_patch16_224" not in listed
    assert cli_main(["list", "--pretrained", "jigsaw_resnet50"]) == 0
    assert "jigsaw_resnet50.in1k_perm2k" in capsys.readouterr().out


def test_cli_output_to_a_closed_pipe_ends_quietly():
    """``sslhub list --pretrained | head -1``: the reader closes the pipe early (here before the first line); exit 141
    (SIGPIPE), no traceback."""
    command = [sys.executable, "-m", "sslhub", "list", "--pretrained"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        process.stdout.close()
        stderr = process.stderr.read()
    assert process.returncode == 141 and stderr == "", stderr


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError, match="Unknown model 'moco_v2_resnet5'"):
        sslhub.create_model("moco_v2_resnet5")
    with pytest.raises(ValueError, match="Unknown hyperparameter.*tempreature"):
        sslhub.create_model("moco_v2_resnet18_32px", tempreature=0.1)
    with pytest.raises(ValueError, match="Unknown task"):
        sslhub.create_model("moco_v2_resnet18_32px", task="segmentation")


def test_features_output_contract_cnn(images):
    model = sslhub.create_model("moco_v2_resnet18_32px").eval()
    out = model(images)
    assert out.last_hidden_state.shape == (2, 512, 1, 1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=(2, 3)))


def test_features_output_contract_vit(images):
    model = sslhub.create_model("dino_vit_tiny_patch4_32px").eval()
    out = model(images)
    assert out.last_hidden_state.shape == (2, 1 + 64, 192)
    timm_vit = sslhub.to_timm(model)
    tokens = timm_vit.norm(timm_vit.blocks(timm_vit._pos_embed(timm_vit.patch_embed(images))))
    torch.testing.assert_close(out.pooler_output, tokens[:, 0])


@pytest.mark.parametrize("preset", ["moco_v2_resnet18_32px", "dino_vit_tiny_patch4_32px", "mae_vit_tiny_patch4_32px"])
def test_pretraining_round_trip_is_exact(preset, tmp_path, images):
    model = (
        sslhub.create_model(preset, task="pretraining", out_dim=256)
        if preset.startswith("dino")
        else (sslhub.create_model(preset, task="pretraining"))
    )
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
    assert "library_name: sslhub" in (tmp_path / "README.md").read_text()
    loaded = sslhub.from_pretrained(tmp_path)
    assert type(loaded) is sslhub.SSLForPreTraining
    assert loaded.config.method_kwargs == model.config.method_kwargs
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    # buffers that are not parameters (queue, center, fixed position embeddings) are stored too
    stored = load_file(tmp_path / "model.safetensors")
    assert any(k.endswith(("queue", "center", "pos_embed")) for k in stored)
    feats_a = model.released_model().eval()(images).pooler_output
    feats_b = loaded.released_model().eval()(images).pooler_output
    assert torch.equal(feats_a, feats_b)


def test_auto_classes_round_trip(tmp_path, images):
    model = sslhub.create_model("moco_v2_resnet18_32px").eval()
    model.save_pretrained(tmp_path)
    auto = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(auto) is sslhub.SSLModel
    assert torch.equal(auto(images).pooler_output, model(images).pooler_output)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, sslhub.SSLConfig) and config.backbone == "resnet18"
    classifier = transformers.AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3).eval()
    assert type(classifier) is sslhub.SSLForImageClassification
    assert torch.equal(classifier.ssl(images).pooler_output, model(images).pooler_output)
    assert classifier(images).logits.shape == (2, 3)


def test_config_attributes_given_to_from_pretrained_apply_as_in_transformers(tmp_path, images):
    """``sslhub.from_pretrained(DIR, task="classification", num_labels=3)`` (a TypeError before): a new classifier of 3
    labels on the encoder; ``id2label`` renames a classifier's labels and keeps its weights."""
    sslhub.create_model("moco_v2_resnet18_32px").save_pretrained(tmp_path / "encoder")
    classifier = sslhub.from_pretrained(tmp_path / "encoder", task="classification", num_labels=3)
    assert classifier.classifier.out_features == 3 and classifier.config.id2label[2] == "LABEL_2"
    classifier.save_pretrained(tmp_path / "classifier")
    renamed = sslhub.from_pretrained(tmp_path / "classifier", id2label={0: "a", 1: "b", 2: "c"})
    assert renamed.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert torch.equal(renamed.classifier.weight, classifier.classifier.weight)
    assert sslhub.from_pretrained(tmp_path / "classifier", image_size=64).config.image_size == 64


def test_loads_and_saves_print_nothing_unless_verbose(tmp_path, capfd, caplog, monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    model = sslhub.create_model("moco_v2_resnet18_32px")
    capfd.readouterr()
    model.save_pretrained(tmp_path / "quiet")
    sslhub.from_pretrained(tmp_path / "quiet")
    sslhub.from_pretrained(tmp_path / "quiet", task="classification")  # a new classifier: missing keys
    assert capfd.readouterr() == ("", "") and "LOAD REPORT" not in caplog.text
    transformers.ResNetModel(transformers.ResNetConfig(depths=[1] * 4)).save_pretrained(tmp_path / "theirs")
    assert "Writing model shards" in capfd.readouterr().err  # transformers' own calls keep their bars
    monkeypatch.setenv(VERBOSE_ENV, "1")  # sslhub --verbose
    model.save_pretrained(tmp_path / "verbose")
    sslhub.from_pretrained(tmp_path / "verbose", task="classification")
    err = capfd.readouterr().err
    assert "Writing model shards" in err and "Loading weights" in err and "LOAD REPORT" in caplog.text


def test_saved_encoder_keys_are_the_encoders_own(tmp_path):
    """Checkpoint format 0.2.0: an ``SSLModel`` holds the method's encoder (``encoder.backbone.*`` for a timm one)."""
    model = sslhub.create_model("moco_v2_resnet18_32px")
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored.keys() == model.state_dict().keys()
    assert all(key.startswith("encoder.backbone.") for key in stored)
    assert "encoder.backbone.layer1.0.conv1.weight" in stored


def test_model_class_per_task():
    assert dict(TASKS) == {
        "features": sslhub.SSLModel,
        "pretraining": sslhub.SSLForPreTraining,
        "classification": sslhub.SSLForImageClassification,
    }
    assert model_class("pretraining") is sslhub.SSLForPreTraining
    with pytest.raises(ValueError, match="Unknown task 'segmentation'"):
        model_class("segmentation")


@pytest.fixture
def trained_moco(tmp_path):
    """A saved MoCo v2 pretraining checkpoint whose query encoder (the released one) moved off its initialisation,
    parameters and BatchNorm statistics, so that it differs from both a fresh model and the key encoder."""
    model = sslhub.create_model("moco_v2_resnet18_32px", task="pretraining", queue_size=64)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, tensor in model.method.encoder_q.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
                if name.endswith("running_var"):
                    tensor.abs_()
    model.save_pretrained(tmp_path / "pretraining")
    return model, tmp_path / "pretraining"


@pytest.mark.parametrize(
    "load",
    [transformers.AutoModel.from_pretrained, sslhub.SSLModel.from_pretrained, sslhub.from_pretrained],
    ids=["AutoModel", "SSLModel", "sslhub"],
)
def test_a_pretraining_checkpoint_loads_as_its_released_encoder(load, trained_moco, images):
    pretraining, directory = trained_moco
    kwargs = {"task": "features"} if load is sslhub.from_pretrained else {}
    loaded = load(directory, **kwargs).eval()
    assert type(loaded) is sslhub.SSLModel
    released = pretraining.released_model().eval()
    expected_state = released.state_dict()
    assert loaded.state_dict().keys() == expected_state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    assert not torch.equal(  # the query encoder, not the key encoder
        loaded.encoder.backbone.conv1.weight, pretraining.method.encoder_k.backbone.conv1.weight
    )
    with torch.no_grad():
        out, expected = loaded(images), released(images)
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(out.pooler_output, expected.pooler_output)


def _edited_checkpoint(source, target, edit):
    """A copy of the checkpoint directory ``source`` whose safetensors went through ``edit(state)``."""
    target.mkdir()
    for name in ("config.json", "README.md"):
        (target / name).write_bytes((source / name).read_bytes())
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("task", ["features", "pretraining"])
@pytest.mark.parametrize(
    "load",
    [transformers.AutoModel.from_pretrained, sslhub.SSLModel.from_pretrained],
    ids=["AutoModel", "SSLModel"],
)
def test_a_missing_or_misshapen_tensor_is_a_checkpoint_error(load, task, tmp_path):
    model = sslhub.create_model("moco_v2_resnet18_32px", task=task, queue_size=64)
    model.save_pretrained(tmp_path / "good")
    prefix = "method.encoder_q." if task == "pretraining" else "encoder."
    missing, misshapen = f"{prefix}backbone.layer1.0.conv1.weight", f"{prefix}backbone.bn1.weight"
    without = _edited_checkpoint(tmp_path / "good", tmp_path / "missing", lambda state: state.pop(missing))
    with pytest.raises(CheckpointError, match=r"missing.*" + missing.replace(".", r"\.")):
        load(without)

    def reshape(state):
        state[misshapen] = torch.ones(63)

    wrong = _edited_checkpoint(tmp_path / "good", tmp_path / "wrong", reshape)
    with pytest.raises(CheckpointError, match=r"wrong shape.*" + misshapen.replace(".", r"\.") + r": file \(63,\)"):
        load(wrong)


def test_to_timm_weights_load_into_plain_timm(images):
    model = sslhub.create_model("dino_vit_tiny_patch4_32px").eval()
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=0).eval()
    plain.load_state_dict(sslhub.to_timm(model).state_dict())
    torch.testing.assert_close(plain(images), model(images).pooler_output)


def test_released_model_is_the_papers_encoder():
    moco = sslhub.create_model("moco_v2_resnet18_32px", task="pretraining", queue_size=64)
    dino = sslhub.create_model("dino_vit_tiny_patch4_32px", task="pretraining", out_dim=256)
    mae = sslhub.create_model("mae_vit_tiny_patch4_32px", task="pretraining")
    assert sslhub.to_timm(moco) is moco.method.encoder_q.backbone
    assert sslhub.to_timm(dino) is dino.method.teacher.backbone
    assert sslhub.to_timm(mae) is mae.method.encoder.backbone
    assert moco.method.released_encoder is moco.method.encoder_q
    assert dino.method.released_encoder is dino.method.teacher
    assert mae.method.released_encoder is mae.method.encoder
    with torch.no_grad():
        dino.method.teacher.backbone.cls_token.add_(1.0)
    released = dino.released_model()
    assert torch.equal(released.encoder.backbone.cls_token, dino.method.teacher.backbone.cls_token)
    assert not torch.equal(released.encoder.backbone.cls_token, dino.method.student.backbone.cls_token)


def test_classification_loss_and_pretrained_not_registered():
    model = sslhub.create_model("moco_v2_resnet18_32px", task="classification", num_labels=4)
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 3]))
    assert out.loss.ndim == 0 and out.logits.shape == (2, 4)
    with pytest.raises(ValueError, match="No pretrained weights"):
        sslhub.create_model("moco_v2_resnet18", pretrained=True)
