"""Key mappings between transformers ViT-family checkpoints and timm: outputs match, round trips are exact, and keys
that do not fit are reported."""

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

from sslhub.conversion.convert import convert_checkpoint, read_checkpoint, read_hf_directory
from sslhub.conversion.hf_transformers import (
    ConversionError,
    convert_hf_encoder,
    dinov2_from_transformers,
    dinov2_timm_model,
    hf_encoder_state,
    mae_decoder_from_transformers,
    mae_decoder_kwargs,
    mae_to_transformers,
    vit_config,
    vit_from_transformers,
    vit_mae_config,
    vit_timm_kwargs,
    vit_to_transformers,
)
from sslhub.conversion.loading import CheckpointError
from sslhub.heads import MAEDecoder

TOLERANCE = 1e-4
VIT_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
    qkv_bias=True,
)
DINOV2_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initial value (zero biases, unit norms, layer scale 1.0) so a tensor put in the
    wrong place changes the output; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def hub_files(model: transformers.PreTrainedModel, directory) -> tuple[dict, dict]:
    """What a Hub directory of ``model`` holds: its checkpoint-layout tensors and its parsed ``config.json``."""
    model.save_pretrained(directory)
    return load_file(directory / "model.safetensors"), json.loads((directory / "config.json").read_text())


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def timm_vit(**kwargs) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="", **kwargs).eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda config: transformers.ViTModel(config, add_pooling_layer=False),
        lambda config: transformers.ViTModel(config),
        lambda config: transformers.ViTForImageClassification(config),
    ],
    ids=["dino_port", "with_pooler", "classifier"],
)
def test_vit_port_matches_transformers(build, tmp_path):
    hf_model = perturbed(build(transformers.ViTConfig(**VIT_SIZES, num_labels=3)))
    state, config = hub_files(hf_model, tmp_path)
    mapped, ignored = vit_from_transformers(state, config)
    assert set(ignored) == {key for key in state if key.startswith(("pooler.", "classifier."))}
    assert len(mapped) + len(ignored) < len(state)  # q, k and v became one qkv
    vit = timm_vit(**vit_timm_kwargs(config))
    vit.load_state_dict(mapped, strict=True)
    pixels = images(32)
    with torch.no_grad():
        encoder = hf_model.vit if hasattr(hf_model, "vit") else hf_model
        expected = encoder(pixels).last_hidden_state
        assert max_relative_error(vit.forward_features(pixels), expected) <= TOLERANCE


def test_vit_mae_encoder_and_decoder_match_transformers(tmp_path):
    config = transformers.ViTMAEConfig(
        **VIT_SIZES,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=96,
        mask_ratio=0.0,
    )
    hf_model = perturbed(transformers.ViTMAEForPreTraining(config))
    state, config_json = hub_files(hf_model, tmp_path)
    encoder, encoder_ignored = vit_from_transformers(state, config_json)
    decoder_state, decoder_ignored = mae_decoder_from_transformers(state, config_json)
    assert set(encoder_ignored) == {key for key in state if key.startswith("decoder.")}
    assert set(decoder_ignored) == {key for key in state if key.startswith("vit.")}
    vit = timm_vit(**vit_timm_kwargs(config_json))
    vit.load_state_dict(encoder, strict=True)
    decoder = MAEDecoder(**mae_decoder_kwargs(config_json)).eval()
    decoder.load_state_dict(decoder_state, strict=True)

    pixels = images(32)
    generator = torch.Generator().manual_seed(2)
    num_patches = (32 // 8) ** 2
    identity_order = torch.arange(num_patches, dtype=torch.float).expand(2, -1)
    visible = torch.randn(2, 1 + 5, 64, generator=generator)  # class token + 5 kept patches
    ids_restore = torch.rand(2, num_patches, generator=generator).argsort(dim=1)
    with torch.no_grad():
        hf_encoded = hf_model.vit(pixels, noise=identity_order).last_hidden_state
        assert max_relative_error(vit.forward_features(pixels), hf_encoded) <= TOLERANCE
        hf_prediction = hf_model.decoder(visible, ids_restore).logits
        assert max_relative_error(decoder(visible, ids_restore), hf_prediction) <= TOLERANCE


@pytest.mark.parametrize(
    "build",
    [
        lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINOV2_SIZES)),
        lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINOV2_SIZES, use_swiglu_ffn=True)),
        lambda: transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**DINOV2_SIZES, num_register_tokens=3)
        ),
        lambda: transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**DINOV2_SIZES, num_labels=3)),
    ],
    ids=["mlp", "swiglu", "registers", "classifier"],
)
def test_dinov2_port_matches_timm_dinov2(build, tmp_path):
    hf_model = perturbed(build())
    state, config = hub_files(hf_model, tmp_path)
    mapped, ignored = dinov2_from_transformers(state, config)
    assert set(ignored) == {key for key in state if key.endswith("mask_token") or key.startswith("classifier.")}
    name, kwargs = dinov2_timm_model(config)
    vit = timm.create_model(name, num_classes=0, global_pool="", **kwargs).eval()
    vit.load_state_dict(mapped, strict=True)
    pixels = images(28)
    with torch.no_grad():
        encoder = getattr(hf_model, "dinov2", hf_model)
        expected = encoder(pixels).last_hidden_state
        assert max_relative_error(vit.forward_features(pixels), expected) <= TOLERANCE


def test_dinov2_names_follow_timm():
    assert dinov2_timm_model({"model_type": "dinov2", "hidden_size": 384, "num_attention_heads": 6})[0] == (
        "vit_small_patch14_dinov2"
    )
    giant = {"model_type": "dinov2", "hidden_size": 1536, "num_attention_heads": 24, "use_swiglu_ffn": True}
    name, kwargs = dinov2_timm_model({**giant, "num_hidden_layers": 40})
    assert name == "vit_giant_patch14_dinov2"
    with torch.device("meta"):
        fc1 = timm.create_model(name, num_classes=0, **kwargs).blocks[0].mlp.fc1
    assert fc1.out_features == 2 * 4096  # the packed SwiGLU width of the official ViT-g/14
    registers = {"model_type": "dinov2_with_registers", "num_register_tokens": 4}
    assert dinov2_timm_model(registers)[0] == "vit_base_patch14_reg4_dinov2"


def loaded_in_transformers(model_class, config, state: dict, directory, **kwargs) -> transformers.PreTrainedModel:
    """``state`` loaded by transformers the way a Hub directory is; any missing or unexpected key fails."""
    config.save_pretrained(directory)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    model, info = model_class.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    return model.eval()


def test_timm_to_transformers_to_timm_is_exact(tmp_path):
    vit = perturbed(timm_vit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2))
    config = vit_config(vit)
    assert (config.intermediate_size, config.layer_norm_eps, config.image_size) == (128, 1e-6, 32)
    hf_state = vit_to_transformers(vit.state_dict())
    hf_model = loaded_in_transformers(transformers.ViTModel, config, hf_state, tmp_path, add_pooling_layer=False)
    pixels = images(32)
    with torch.no_grad():
        assert max_relative_error(hf_model(pixels).last_hidden_state, vit.forward_features(pixels)) <= TOLERANCE
    back, ignored = vit_from_transformers(hf_state, config)
    assert not ignored and back.keys() == vit.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in vit.state_dict().items())


def test_mae_round_trip_is_exact(tmp_path):
    vit = perturbed(timm_vit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2))
    decoder = perturbed(MAEDecoder((4, 4), 8, 64, embed_dim=32, depth=2, num_heads=4))
    config = vit_mae_config(vit, decoder)
    hf_state = mae_to_transformers(vit.state_dict(), decoder.state_dict())
    loaded_in_transformers(transformers.ViTMAEForPreTraining, config, hf_state, tmp_path)
    encoder, _ = vit_from_transformers(hf_state, config)
    decoder_state, _ = mae_decoder_from_transformers(hf_state, config)
    for original, back in ((vit.state_dict(), encoder), (decoder.state_dict(), decoder_state)):
        assert back.keys() == original.keys()
        assert all(torch.equal(back[key], value) for key, value in original.items())


def test_unknown_keys_are_reported(tmp_path):
    config = transformers.ViTConfig(**VIT_SIZES)
    state, _ = hub_files(transformers.ViTModel(config), tmp_path)
    state["encoder.layer.0.attention.attention.rel_pos.weight"] = torch.zeros(1)
    del state["encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(ConversionError, match="unknown keys.*rel_pos.*missing keys.*blocks.1.attn.qkv.bias") as err:
        vit_from_transformers(state, config)
    # the lone query and key biases of layer 1 cannot form a qkv: reported, not silently dropped
    assert "encoder.layer.1.attention.attention.query.bias" in err.value.unknown
    vit = timm_vit(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, reg_tokens=1)
    with pytest.raises(ConversionError, match=r"unknown keys \(1\): reg_token"):
        vit_to_transformers(vit.state_dict())
    with pytest.raises(ValueError, match="no register tokens"):
        vit_config(vit)


def test_wrong_shapes_and_sizes_give_clear_errors(tmp_path):
    state, config = hub_files(transformers.ViTModel(transformers.ViTConfig(**VIT_SIZES)), tmp_path)
    with pytest.raises(ConversionError, match=r"blocks.0.mlp.fc1.weight: got \(128, 64\), expected \(256, 64\)"):
        vit_from_transformers(state, {**config, "intermediate_size": 256})
    with pytest.raises(ConversionError, match=r"unknown keys.*encoder\.layer\.1\.") as err:
        vit_from_transformers(state, {**config, "num_hidden_layers": 1})
    assert not err.value.missing
    with pytest.raises(ConversionError, match=r"missing keys.*blocks\.2\."):
        vit_from_transformers(state, {**config, "num_hidden_layers": 3})
    with pytest.raises(ValueError, match="of type.*'dinov2'"):
        vit_from_transformers(state, {**config, "model_type": "dinov2"})
    with pytest.raises(
        CheckpointError, match="DIR: sslhub reads transformers vit, vit_mae, vit_msn and dinov2 models, not 'beit'"
    ):
        convert_hf_encoder(state, {**config, "model_type": "beit"}, source="DIR")


VIT_TINY_32PX = dict(  # sslhub's *_vit_tiny_patch4_32px presets: timm vit_tiny_patch16_224 at 32 px with 4 px patches
    hidden_size=192,
    num_hidden_layers=12,
    num_attention_heads=3,
    intermediate_size=768,
    image_size=32,
    patch_size=4,
    layer_norm_eps=1e-6,
)


def test_a_transformers_dino_directory_converts_to_an_sslhub_encoder(tmp_path):
    hf_model = perturbed(transformers.ViTModel(transformers.ViTConfig(**VIT_TINY_32PX), add_pooling_layer=True))
    hf_model.save_pretrained(tmp_path)
    model = convert_checkpoint("dino_vit_tiny_patch4_32px", tmp_path)
    pixels = images(32)
    with torch.no_grad():
        expected = hf_model(pixels).last_hidden_state
        assert max_relative_error(model(pixels).last_hidden_state, expected) <= TOLERANCE
    converted = read_checkpoint(tmp_path)
    assert converted.left_out == [
        "pooler.dense.bias (pooler (ViTModel's dense + tanh on the class token; not part of the encoder))",
        "pooler.dense.weight (pooler (ViTModel's dense + tanh on the class token; not part of the encoder))",
    ]
    assert (converted.layout, converted.method, converted.method_encoders) == ("transformers vit", None, None)
    state, config = hub_files(hf_model, tmp_path)
    backbone, ignored = hf_encoder_state(state, config, str(tmp_path))
    assert backbone.keys() == converted.backbone.keys() and set(ignored) == {"pooler.dense.bias", "pooler.dense.weight"}
    assert all(torch.equal(backbone[key], value) for key, value in converted.backbone.items())


def test_a_transformers_mae_directory_converts_to_an_sslhub_mae_with_the_same_loss(tmp_path):
    config = transformers.ViTMAEConfig(
        **VIT_TINY_32PX,
        decoder_hidden_size=128,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=512,
        norm_pix_loss=True,
    )
    hf_model = perturbed(transformers.ViTMAEForPreTraining(config))
    hf_model.save_pretrained(tmp_path)
    model = convert_checkpoint("mae_vit_tiny_patch4_32px", tmp_path, task="pretraining")
    pixels, noise = images(32), torch.rand(2, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf_model(pixels, noise=noise).loss
        assert max_relative_error(model([pixels], noise=noise).loss, expected) <= TOLERANCE
    converted = read_hf_directory(tmp_path)  # the MAE objective's layout, not the encoder alone
    assert converted.layout == "vit_mae" and converted.method.keys() == {
        f"decoder.{key}" for key in model.method.decoder.state_dict()
    }
    assert converted.method_overrides["decoder_embed_dim"] == 128 and converted.method_overrides["mask_ratio"] == 0.75
    with pytest.raises(CheckpointError, match="is a 'vit_mae' checkpoint of mae, not of 'dino'"):
        convert_checkpoint("dino_vit_tiny_patch4_32px", tmp_path)


def test_a_transformers_mae_encoder_directory_is_an_encoder(tmp_path):
    hf_model = perturbed(transformers.ViTMAEModel(transformers.ViTMAEConfig(**VIT_TINY_32PX, mask_ratio=0.0)))
    hf_model.save_pretrained(tmp_path)
    converted = read_hf_directory(tmp_path)
    assert (converted.layout, converted.method) == ("transformers vit_mae", None)
    model = convert_checkpoint("mae_vit_tiny_patch4_32px", tmp_path)
    pixels, in_order = images(32), torch.arange(64.0).expand(2, -1)
    with torch.no_grad():
        expected = hf_model(pixels, noise=in_order).last_hidden_state
        assert max_relative_error(model(pixels).last_hidden_state, expected) <= TOLERANCE
