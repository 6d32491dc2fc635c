"""Model classes: save/load round trips, Auto* registration, outputs and the timm hand-over."""

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file

import sslhub


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_list_methods_and_models():
    assert {"moco_v2", "dino", "mae"} <= set(sslhub.list_methods())
    dino = sslhub.list_models("dino_*")
    assert "dino_vit_small_patch16_224" in dino and all(name.startswith("dino_") for name in dino)
    for name in ("moco_v2_resnet50", "mae_vit_huge_patch14_224", "dino_resnet50", "dino_vit_base_patch16_224"):
        assert name in sslhub.list_models()


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
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
    assert sslhub.to_timm(mae) is mae.method.encoder
    with torch.no_grad():
        dino.method.teacher.backbone.cls_token.add_(1.0)
    released = dino.released_model()
    assert torch.equal(released.backbone.cls_token, dino.method.teacher.backbone.cls_token)
    assert not torch.equal(released.backbone.cls_token, dino.method.student.backbone.cls_token)


def test_classification_loss_and_pretrained_not_registered():
    model = sslhub.create_model("moco_v2_resnet18_32px", task="classification", num_labels=4)
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 3]))
    assert out.loss.ndim == 0 and out.logits.shape == (2, 4)
    with pytest.raises(ValueError, match="No pretrained weights"):
        sslhub.create_model("moco_v2_resnet18", pretrained=True)
