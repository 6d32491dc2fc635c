"""Official checkpoint layouts -> sslhub, checked against independent forwards of the same weights.

Each test writes a file with the authors' exact key names (and, for the released architectures, exact shapes), as
their code saves it, converts it with sslhub and compares the features with a forward that does not use sslhub:
torchvision's ResNet-50 for the ResNet releases, and the authors' ViT written out below for the ViT releases.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import relative_error, zoo_script
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from torch import nn

import sslhub
from sslhub.cli import main as cli_main
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import all_layouts, detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, load_file_state
from sslhub.conversion.pretrained import release_source
from sslhub.registry import get_preset, get_pretrained, layout_methods, list_layouts

ROOT = Path(__file__).resolve().parent.parent


# ---- the authors' ViT (DINO vision_transformer.py / MAE models_vit.py / MoCo v3 vits.py), written out -------------
def official_vit_state(dim: int, depth: int, patch: int, tokens: int, generator: torch.Generator) -> dict:
    """Random weights under the exact key names and shapes of the authors' ViT (qkv_bias=True, mlp_ratio 4)."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, tokens, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        for name, shape in {
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
        }.items():  # fmt: skip
            shapes[f"blocks.{i}.{name}"] = shape
    state = {}
    for key, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[key] = value + 1.0 if key.endswith("norm1.weight") or key.endswith("norm2.weight") else value
    return state


def official_vit_tokens(state: dict, images: torch.Tensor, heads: int, depth: int, patch: int) -> torch.Tensor:
    """All tokens after the final LayerNorm (eps 1e-6), cls first: the authors' ``forward`` without the head."""
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    dim = x.shape[-1]
    for i in range(depth):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(*t.shape[:2], heads, dim // heads).transpose(1, 2) for t in (q, k, v))
        attention = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(out, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
        )
    return F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)


@pytest.fixture(scope="module")
def vit_small_state():
    """DINO ViT-S/16 backbone file (``dino_deitsmall16_pretrain.pth``): 384-d, 12 blocks, 197 tokens."""
    return official_vit_state(384, 12, 16, 197, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_dino_vit_backbone_file_matches_the_authors_vit(tmp_path, vit_small_state, images):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit_small_state, path)
    model = convert_checkpoint("dino_vit_small_patch16_224", path)
    with torch.no_grad():
        out = model(images)
    expected = official_vit_tokens(vit_small_state, images, heads=6, depth=12, patch=16)
    assert out.last_hidden_state.shape == (2, 197, 384)
    assert relative_error(out.last_hidden_state, expected) < 1e-4
    assert relative_error(out.pooler_output, expected[:, 0]) < 1e-4


def official_moco_v3_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """moco-v3 ``_build_mlp``: [Linear(no bias), BN, ReLU] * (num_layers - 1), Linear(no bias), BN(affine=False)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    for module in layers:
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
    return nn.Sequential(*layers)


def test_moco_v3_vit_small_file_has_twelve_heads_and_its_heads(tmp_path, vit_small_state, images):
    """``vit-s-300ep.pth.tar``: MoCo v3's ViT-S has 12 heads (README), the same tensor shapes as DINO's ViT-S with
    6, so only the forward can tell them apart. Projector 3 layers in ``head``, predictor 2 layers with a last BN
    (hidden 512 / out 64 here instead of 4096 / 256, to keep the file small: the sizes are read off the file)."""
    torch.manual_seed(7)
    projector, predictor = official_moco_v3_mlp(3, 384, 512, 64, True), official_moco_v3_mlp(2, 64, 512, 64, True)
    state = {"module.predictor." + k: v for k, v in predictor.state_dict().items()}
    for name in ("base", "momentum"):  # the same tensors twice: torch.save stores them once
        state |= {f"module.{name}_encoder.{k}": v for k, v in vit_small_state.items()}
        state |= {f"module.{name}_encoder.head.{k}": v for k, v in projector.state_dict().items()}
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {}, "scaler": {}}, path)

    model = convert_checkpoint("moco_v3_vit_small_patch16_224", path)
    with torch.no_grad():
        pooled = model(images).pooler_output
    expected = official_vit_tokens(vit_small_state, images, heads=12, depth=12, patch=16)[:, 0]
    assert relative_error(pooled, expected) < 1e-4

    full = convert_checkpoint("moco_v3_vit_small_patch16_224", path, task="pretraining").method
    assert (full.hparams.mlp_hidden_dim, full.hparams.embed_dim) == (512, 64)
    with torch.no_grad():
        tokens = full.base_encoder.backbone.forward_features(images)
        assert relative_error(full.base_projector(tokens[:, 0]), projector.eval()(expected)) < 1e-4
        assert relative_error(full.predictor(projector(expected)), predictor.eval()(projector(expected))) < 1e-4
    assert torch.equal(full.momentum_projector[7].running_mean, projector[7].running_mean)


def test_mae_encoder_file_matches_the_authors_vit(tmp_path, images):
    """``mae_pretrain_vit_base.pth`` = ``{'model': encoder}``; all tokens in input order, no masking."""
    state = official_vit_state(768, 12, 16, 197, torch.Generator().manual_seed(2))
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": state}, path)
    model = convert_checkpoint("mae_vit_base_patch16_224", path)
    with torch.no_grad():
        out = model(images[:1])
    expected = official_vit_tokens(state, images[:1], heads=12, depth=12, patch=16)
    assert relative_error(out.last_hidden_state, expected) < 1e-4


def test_mae_training_checkpoint_with_decoder_continues_pretraining(tmp_path):
    """``util/misc.py save_model``: ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``; ``model`` holds the
    encoder and the decoder (``mask_token``, ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks``,
    ``decoder_norm``, ``decoder_pred``) at the top level. Decoder 2 x 128 here (read off the file)."""
    g = torch.Generator().manual_seed(9)
    encoder = official_vit_state(192, 12, 4, 65, g)
    decoder = {
        "mask_token": torch.randn(1, 1, 128, generator=g),
        "decoder_embed.weight": torch.randn(128, 192, generator=g) * 0.05,
        "decoder_embed.bias": torch.zeros(128),
        "decoder_pos_embed": torch.randn(1, 65, 128, generator=g),
        "decoder_norm.weight": torch.ones(128),
        "decoder_norm.bias": torch.zeros(128),
        "decoder_pred.weight": torch.randn(48, 128, generator=g) * 0.05,  # 4 x 4 x 3 pixels per patch
        "decoder_pred.bias": torch.zeros(48),
    }
    for i in range(2):
        block = official_vit_state(128, 1, 4, 65, g)
        decoder |= {
            k.replace("blocks.0.", f"decoder_blocks.{i}."): v for k, v in block.items() if k.startswith("blocks.")
        }
    args = argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75, norm_pix_loss=True)
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": encoder | decoder, "optimizer": {}, "epoch": 799, "scaler": {}, "args": args}, path)

    model = convert_checkpoint("mae_vit_tiny_patch4_32px", path, task="pretraining")
    method = model.method
    assert (method.hparams.decoder_embed_dim, method.hparams.decoder_depth) == (128, 2)
    assert torch.equal(method.decoder.decoder_blocks[1].mlp.fc2.weight, decoder["decoder_blocks.1.mlp.fc2.weight"])
    assert torch.equal(method.decoder.mask_token, decoder["mask_token"])
    images = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.isfinite(model([images]).loss)
        released = model.released_model()(images).last_hidden_state
    assert relative_error(released, official_vit_tokens(encoder, images, 3, 12, 4)) < 1e-4


# ---- ResNet-50 releases against torchvision ---------------------------------------------------------------------
def torchvision_features(state: dict, images: torch.Tensor) -> torch.Tensor:
    net = torchvision.models.resnet50()
    net.fc = nn.Identity()
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(images)


@pytest.fixture(scope="module")
def moco_v2_file(tmp_path_factory):
    """``main_moco.py --mlp``: DDP(MoCo) with encoder_q / encoder_k = torchvision resnet50(num_classes=128) whose fc
    is Sequential(Linear(2048, 2048), ReLU, Linear(2048, 128)), queue (128, 65536), queue_ptr (1,)."""
    torch.manual_seed(3)
    state = {}
    for name in ("encoder_q", "encoder_k"):
        net = torchvision.models.resnet50(num_classes=128)
        net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), net.fc)
        for module in net.modules():  # non-trivial BatchNorm statistics
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
        state.update({f"module.{name}.{k}": v for k, v in net.state_dict().items()})
    state["module.queue"] = F.normalize(torch.randn(128, 65536), dim=0)
    state["module.queue_ptr"] = torch.tensor([256])
    path = tmp_path_factory.mktemp("moco") / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}}}, path)
    return path, state


def _encoder_q(state: dict) -> dict:
    prefix = "module.encoder_q."
    return {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and ".fc." not in f".{k[len(prefix) :]}"
    }


def test_moco_v2_file_matches_torchvision(moco_v2_file, images):
    path, state = moco_v2_file
    model = convert_checkpoint("moco_v2_resnet50", path)
    with torch.no_grad():
        pooled = model(images[:1, :, :64, :64]).pooler_output
    expected = torchvision_features(_encoder_q(state), images[:1, :, :64, :64])
    assert pooled.shape == (1, 2048)
    assert relative_error(pooled, expected) < 1e-4


def test_moco_v2_pretraining_state_continues_from_the_file(moco_v2_file):
    path, state = moco_v2_file
    model = convert_checkpoint("moco_v2_resnet50", path, task="pretraining")
    method = model.method
    assert torch.equal(method.queue, state["module.queue"].t())  # sslhub stores keys as rows
    assert method.queue_ptr.item() == 256
    assert torch.equal(method.head_q[2].weight, state["module.encoder_q.fc.2.weight"])
    assert torch.equal(method.head_k[0].bias, state["module.encoder_k.fc.0.bias"])
    key_conv = method.encoder_k.backbone.layer4[2].conv3.weight
    assert torch.equal(key_conv, state["module.encoder_k.layer4.2.conv3.weight"])
    assert model.config.method_kwargs["queue_size"] == 65536


def test_moco_v1_file_has_a_linear_head(tmp_path, moco_v2_file):
    """MoCo v1 (no ``--mlp``): ``encoder_q.fc`` is one Linear(2048, 128)."""
    _, v2_state = moco_v2_file
    state = {k: v for k, v in v2_state.items() if ".fc." not in k}
    for name in ("encoder_q", "encoder_k"):
        state[f"module.{name}.fc.weight"] = torch.randn(128, 2048)
        state[f"module.{name}.fc.bias"] = torch.randn(128)
    path = tmp_path / "moco_v1_200ep_pretrain.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, path)
    method = convert_checkpoint("moco_v1_resnet50", path, task="pretraining").method
    assert len(method.head_q) == 1 and torch.equal(method.head_q[0].weight, state["module.encoder_q.fc.weight"])
    assert torch.equal(method.head_k[0].bias, state["module.encoder_k.fc.bias"])


def test_moco_v3_resnet50_file_projector_in_fc(tmp_path, moco_v2_file, images):
    """``r-50-*ep.pth.tar``: projector ``_build_mlp(2, 2048, hidden, dim)`` in ``fc``, predictor without last BN."""
    _, v2_state = moco_v2_file
    backbone = _encoder_q(v2_state)
    torch.manual_seed(8)
    projector, predictor = official_moco_v3_mlp(2, 2048, 256, 64, True), official_moco_v3_mlp(2, 64, 256, 64, False)
    state = {"module.predictor." + k: v for k, v in predictor.state_dict().items()}
    for name in ("base", "momentum"):
        state |= {f"module.{name}_encoder.{k}": v for k, v in backbone.items()}
        state |= {f"module.{name}_encoder.fc.{k}": v for k, v in projector.state_dict().items()}
    path = tmp_path / "r-50-100ep.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {}, "scaler": {}}, path)
    crop = images[:1, :, :64, :64]
    with torch.no_grad():
        pooled = convert_checkpoint("moco_v3_resnet50", path)(crop).pooler_output
        assert relative_error(pooled, torchvision_features(backbone, crop)) < 1e-4
        method = convert_checkpoint("moco_v3_resnet50", path, task="pretraining").method
        features = torch.randn(3, 2048)
        assert relative_error(method.base_projector(features), projector.eval()(features)) < 1e-4
        assert relative_error(method.predictor(features[:, :64]), predictor.eval()(features[:, :64])) < 1e-4


def test_dino_resnet50_backbone_file_leaves_out_fc(tmp_path, images):
    torch.manual_seed(4)
    state = torchvision.models.resnet50().state_dict()  # hub loads with strict=False: fc may be in the file
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(state, path)
    model = convert_checkpoint("dino_resnet50", path)
    with torch.no_grad():
        pooled = model(images[:1, :, :64, :64]).pooler_output
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert relative_error(pooled, torchvision_features(backbone, images[:1, :, :64, :64])) < 1e-4


# ---- DINO full training checkpoint --------------------------------------------------------------------------------
def dino_head_state(dim: int, out_dim: int, generator: torch.Generator) -> dict:
    """``DINOHead(dim, out_dim)`` keys: mlp.0/2/4 (Linear, GELU between), last_layer.weight_g / weight_v."""
    sizes = [(2048, dim), (2048, 2048), (256, 2048)]
    state = {}
    for index, (rows, cols) in zip((0, 2, 4), sizes, strict=True):
        state[f"mlp.{index}.weight"] = torch.randn(rows, cols, generator=generator) / math.sqrt(cols)
        state[f"mlp.{index}.bias"] = torch.randn(rows, generator=generator) * 0.1
    state["last_layer.weight_g"] = torch.rand(out_dim, 1, generator=generator) + 0.5
    state["last_layer.weight_v"] = torch.randn(out_dim, 256, generator=generator)
    return state


def dino_head_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The DINO head as the paper describes it: 3-layer MLP (GELU), L2 normalisation, weight-normalised linear."""
    for index in (0, 2):
        x = F.gelu(F.linear(x, state[f"mlp.{index}.weight"], state[f"mlp.{index}.bias"]))
    x = F.normalize(F.linear(x, state["mlp.4.weight"], state["mlp.4.bias"]), dim=-1)
    v = state["last_layer.weight_v"]
    return x @ (state["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)).t()


def test_dino_full_checkpoint_gives_teacher_student_heads_and_center(tmp_path):
    """``main_dino.py`` save: student under DDP (``module.``), ViT teacher unwrapped; center in ``dino_loss``;
    the run's ``args`` (a pickled Namespace, allowed) set the hyperparameters."""
    g = torch.Generator().manual_seed(5)
    dim, out_dim = 192, 1024  # ViT-Tiny/4 at 32 px (17 tokens) keeps the file small; the names are the official ones
    teacher = official_vit_state(dim, 12, 4, 65, g)
    student = official_vit_state(dim, 12, 4, 65, g)
    heads = {"teacher": dino_head_state(dim, out_dim, g), "student": dino_head_state(dim, out_dim, g)}
    args = argparse.Namespace(arch="vit_tiny", out_dim=out_dim, norm_last_layer=False, momentum_teacher=0.9995,
                              teacher_temp=0.04, use_bn_in_head=False, epochs=100, optimizer="adamw")  # fmt: skip
    checkpoint = {
        "student": {f"module.backbone.{k}": v for k, v in student.items()}
        | {f"module.head.{k}": v for k, v in heads["student"].items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.items()}
        | {f"head.{k}": v for k, v in heads["teacher"].items()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": args,
        "dino_loss": {"center": torch.randn(1, out_dim, generator=g)},
    }
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save(checkpoint, path)
    images = torch.randn(2, 3, 32, 32, generator=g)

    model = convert_checkpoint("dino_vit_tiny_patch4_32px", path, task="pretraining")
    method = model.method
    hp = method.hparams
    assert (hp.out_dim, hp.norm_last_layer, hp.momentum_teacher, hp.teacher_temp) == (out_dim, False, 0.9995, 0.04)
    assert torch.equal(method.center, checkpoint["dino_loss"]["center"])
    with torch.no_grad():
        teacher_tokens = method.teacher.backbone.forward_features(images)
        student_cls = method.student.backbone.forward_features(images)[:, 0]
        teacher_out = method.teacher_head(teacher_tokens[:, 0])
    assert relative_error(teacher_tokens, official_vit_tokens(teacher, images, 3, 12, 4)) < 1e-4
    assert relative_error(student_cls, official_vit_tokens(student, images, 3, 12, 4)[:, 0]) < 1e-4
    expected_head = dino_head_forward(heads["teacher"], official_vit_tokens(teacher, images, 3, 12, 4)[:, 0])
    assert relative_error(teacher_out, expected_head) < 1e-4

    released = convert_checkpoint("dino_vit_tiny_patch4_32px", path)  # features = the teacher backbone
    with torch.no_grad():
        assert torch.allclose(released(images).last_hidden_state, teacher_tokens, atol=1e-6)
    with pytest.raises(CheckpointError, match="is a 'dino_full' checkpoint of dino, not of 'moco_v3'"):
        convert_checkpoint("moco_v3_vit_tiny_patch4_32px", path)  # same ViT-Tiny/4, another method's file


# ---- XCiT: the authors' names differ from timm's ----------------------------------------------------------------
def test_dino_xcit_backbone_file_in_the_authors_names(tmp_path):
    """facebookresearch/xcit names: ``pos_embeder.*`` and a fused class-attention ``qkv``; timm's own filter maps
    them, and features match timm's XCiT holding the same weights."""
    reference = timm.create_model("xcit_small_12_p16_224", num_classes=0, global_pool="").eval()
    state = {}
    for key, value in reference.state_dict().items():
        key = key.replace("pos_embed.", "pos_embeder.")
        if ".attn.q." in key and key.startswith("cls_attn_blocks."):
            parts = [reference.state_dict()[key.replace(".attn.q.", f".attn.{n}.")] for n in "qkv"]
            state[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
        elif not (key.startswith("cls_attn_blocks.") and (".attn.k." in key or ".attn.v." in key)):
            state[key] = value
    assert "pos_embeder.token_projection.weight" in state and "cls_attn_blocks.0.attn.qkv.weight" in state
    path = tmp_path / "dino_xcit_small_12_p16_pretrain.pth"
    torch.save(state, path)
    model = convert_checkpoint("dino_xcit_small_12_p16_224", path)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference.forward_features(images)
        out = model(images)
    assert relative_error(out.last_hidden_state, expected) < 1e-4
    assert relative_error(out.pooler_output, expected[:, 0]) < 1e-4


# ---- failures -------------------------------------------------------------------------------------------------------
class NotWeights:
    pass


def test_a_file_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": NotWeights()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        convert_checkpoint("mae_vit_tiny_patch4_32px", path)


class CallsSystem:
    def __reduce__(self):
        import os

        return (os.system, ("echo never run",))


def test_numpy_arrays_load_but_an_object_array_that_calls_code_is_refused(tmp_path):
    """mmengine files keep numpy arrays (and numpy 2 pickles dtype classes): plain arrays and scalars load; an object
    array's elements are still globals of the file, so one naming ``os.system`` is refused."""
    path = tmp_path / "arrays.pth"
    torch.save({"loss": np.arange(3.0), "ids": np.arange(4, dtype=np.int32), "lr": np.float64(0.1)}, path)
    loaded = load_file_state(path)
    assert np.array_equal(loaded["loss"], np.arange(3.0)) and loaded["ids"].dtype == np.int32 and loaded["lr"] == 0.1
    torch.save({"x": np.array([CallsSystem()], dtype=object)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refused to load.*system"):
        load_file_state(tmp_path / "evil.pth")


def test_wrong_model_for_the_file_lists_every_wrong_shape_and_writes_nothing(tmp_path, vit_small_state, capsys):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit_small_state, path)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)dino_deitsmall16_pretrain.pth.*wrong shape \(150\): "
        r"\['cls_token: file \(1, 1, 384\) vs model \(1, 1, 768\)",
    ):
        convert_checkpoint("dino_vit_base_patch16_224", path)
    output = tmp_path / "converted"
    code = cli_main(
        ["convert", "--model", "dino_vit_base_patch16_224", "--checkpoint", str(path), "--output", str(output)]
    )
    assert code == 2 and not output.exists()
    assert "does not match the model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [path]  # no partial directory either


def test_missing_and_unexpected_keys_are_named(tmp_path, vit_small_state):
    state = dict(vit_small_state)
    del state["blocks.3.mlp.fc1.bias"]
    state["blocks.0.attn.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint("dino_vit_small_patch16_224", path)
    assert "missing (1): ['blocks.3.mlp.fc1.bias']" in str(info.value)
    assert "unexpected (1): ['blocks.0.attn.extra']" in str(info.value)


def test_unknown_keys_in_a_training_checkpoint_are_an_error(tmp_path, moco_v2_file):
    _, state = moco_v2_file
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {**state, "module.something_else": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="unexpected keys for this layout: \\['module.something_else'\\]"):
        convert_checkpoint("moco_v2_resnet50", path)


def test_unreadable_and_unrecognised_files(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert_checkpoint("dino_vit_small_patch16_224", corrupt)
    odd = tmp_path / "odd.pth"
    torch.save({"weights": [1, 2, 3]}, odd)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        convert_checkpoint("dino_vit_small_patch16_224", odd)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_checkpoint("dino_vit_small_patch16_224", tmp_path / "nothing.pth")


# ---- layouts are declared by the methods ------------------------------------------------------------------------
def test_layouts_are_declared_by_the_methods_and_detected(moco_v2_file):
    layouts = list_layouts()
    assert {"moco", "moco_v3", "dino_full", "mae", "vit_mae"} <= set(layouts)
    assert layout_methods("moco") == ["moco_v1", "moco_v2"]  # MoCo v1 inherits MoCo v2's layout
    assert layout_methods("dino_full") == ["dino"] and layout_methods("vit_mae") == ["mae"]
    assert layouts["vit_mae"].hf_model_types == ("vit_mae",)
    assert get_layout("moco") is layouts["moco"]
    assert get_layout("backbone").name == "backbone" and layout_methods("backbone") == []  # generic: no owner
    with pytest.raises(CheckpointError, match="unknown layout 'mocco'"):
        get_layout("mocco")
    path, _ = moco_v2_file
    assert detect_layout(load_file_state(path)) is layouts["moco"]
    assert read_checkpoint(path).layout == "moco"
    for name in sslhub.list_pretrained():  # every release names its method's layout or a generic one (no owner)
        tag = get_pretrained(name)
        owners = layout_methods(tag.layout)
        assert tag.layout in all_layouts() and (not owners or get_preset(tag.preset).method in owners), name
    assert layout_methods("vissl_trunk") == []  # generic: VISSL's trunk-only files of any method


MOCO_FOR_DINO = (
    r"is a 'moco' checkpoint of moco_v1, moco_v2, not of 'dino': choose a preset of moco_v1, moco_v2 \(`sslhub list`\)"
)


@pytest.mark.parametrize("layout", [None, "moco"], ids=["detected", "given"])
@pytest.mark.parametrize("task", ["features", "pretraining"])
def test_a_training_checkpoint_of_another_method_is_refused(layout, task, moco_v2_file):
    path, _ = moco_v2_file
    with pytest.raises(CheckpointError, match=MOCO_FOR_DINO):
        convert_checkpoint("dino_resnet50", path, task=task, layout=layout)


def test_cli_convert_with_the_layout_of_another_method_writes_nothing(tmp_path, moco_v2_file, capsys):
    path, _ = moco_v2_file
    output = tmp_path / "converted"
    args = ["convert", "--model", "dino_resnet50", "--checkpoint", str(path), "--layout", "moco"]
    assert cli_main([*args, "--output", str(output)]) == 2
    assert "not of 'dino'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---- one line: create_model("preset.tag", pretrained=True) --------------------------------------------------------
@pytest.fixture
def sslhub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SSLHUB_CACHE", str(cache))
    return cache


def test_pretrained_release_is_converted_once_then_loaded_from_the_cache(
    tmp_path, sslhub_cache, vit_small_state, images, monkeypatch
):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit_small_state, path)
    model = sslhub.create_model("dino_vit_small_patch16_224.in1k", pretrained=True, pretrained_path=path)
    converted = sslhub_cache / "converted" / "dino_vit_small_patch16_224.in1k" / "features"
    assert (converted / "model.safetensors").is_file()
    card = (converted / "README.md").read_text()
    assert "dino_deitsmall16_pretrain.pth" in card and "74.50%" in card and "apache-2.0" in card

    conversion = sys.modules["sslhub.conversion.pretrained"]
    monkeypatch.setattr(conversion, "read_checkpoint", lambda *a, **k: pytest.fail("converted a second time"))
    again = sslhub.create_model("dino_vit_small_patch16_224.in1k", pretrained=True, pretrained_path=path)
    with torch.no_grad():
        assert torch.equal(model(images[:1]).pooler_output, again(images[:1]).pooler_output)
    classifier = sslhub.create_model(
        "dino_vit_small_patch16_224.in1k", task="classification", pretrained=True, pretrained_path=path, num_labels=5
    )
    assert torch.equal(
        classifier.ssl.encoder.backbone.blocks[5].attn.qkv.weight, vit_small_state["blocks.5.attn.qkv.weight"]
    )


def test_pretrained_dir_env_and_offline_errors(tmp_path, sslhub_cache, monkeypatch):
    state = torchvision.models.resnet50().state_dict()
    torch.save(state, tmp_path / "dino_resnet50_pretrain.pth")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):  # not on disk, offline in tests
        sslhub.create_model("dino_resnet50.in1k", pretrained=True)
    monkeypatch.setenv("SSLHUB_PRETRAINED_DIR", str(tmp_path))
    model = sslhub.create_model("dino_resnet50.in1k", pretrained=True)
    assert torch.equal(model.encoder.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        sslhub.create_model("mae_vit_base_patch16_224.in1k", pretrained=True)
    with pytest.raises(ValueError, match="No pretrained weights are registered as 'dino_resnet50.in22k'"):
        sslhub.create_model("dino_resnet50.in22k", pretrained=True)


def test_cli_convert_and_list_pretrained(tmp_path, vit_small_state, capsys):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit_small_state, path)
    output = tmp_path / "out"
    assert (
        cli_main(
            ["convert", "--model", "dino_vit_small_patch16_224", "--checkpoint", str(path), "--output", str(output)]
        )
        == 0
    )
    loaded = sslhub.from_pretrained(output)
    assert torch.equal(loaded.encoder.backbone.pos_embed, vit_small_state["pos_embed"])
    assert (output / "README.md").is_file()
    assert cli_main(["list", "--pretrained", "dino_*"]) == 0
    listed = capsys.readouterr().out
    assert "dino_vit_small_patch16_224.in1k" in listed and "mae_" not in listed


# ---- conversion/convert_official.py: the zoo script and the model_cards/ catalogue ---------------------------------
def test_zoo_script_converts_and_verifies_against_timm(tmp_path, vit_small_state):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit_small_state, path)
    result = zoo_script().convert_release(get_pretrained("dino_vit_small_patch16_224.in1k"), path, tmp_path / "out")
    assert result["independent_rel_error"] < 1e-4
    assert result["reload_max_abs_diff"] == 0.0
    assert (tmp_path / "out" / "dino_vit_small_patch16_224.in1k" / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):  # a second run keeps the first's files ...
        zoo_script().convert_release(get_pretrained("dino_vit_small_patch16_224.in1k"), path, tmp_path / "out")
    again = zoo_script().convert_release(  # ... unless told to replace them
        get_pretrained("dino_vit_small_patch16_224.in1k"), path, tmp_path / "out", overwrite=True
    )
    assert again["reload_max_abs_diff"] == 0.0


def test_model_cards_catalogue_lists_every_release_as_the_registry_renders_it(tmp_path, monkeypatch):
    script = zoo_script()
    monkeypatch.setattr(script, "CARDS", tmp_path)
    committed = ROOT / "model_cards"
    for name in sslhub.list_pretrained():
        fresh = script.write_card(get_pretrained(name), org=None)
        assert (committed / fresh.name).read_text() == fresh.read_text(), f"model_cards/{fresh.name} is stale"
        card = ModelCard.load(fresh)
        tag = get_pretrained(name)  # CMC's README publishes no accuracy per file: such a card states none
        assert card.data.license == tag.license and bool(card.data.eval_results) == bool(tag.metrics)
    assert len(list(committed.glob("*.md"))) == len(sslhub.list_pretrained())


def test_release_source_order_and_url_download(tmp_path, sslhub_cache, monkeypatch):
    """Full checkpoint for task="pretraining", the released encoder otherwise; an authors' URL is downloaded
    once into the sslhub cache (a file:// URL stands in for the network)."""
    tag = get_pretrained("dino_vit_small_patch16_224.in1k")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for name in ("dino_deitsmall16_pretrain.pth", "dino_deitsmall16_pretrain_full_checkpoint.pth"):
        (downloads / name).write_bytes(name.encode())
    monkeypatch.setenv("SSLHUB_PRETRAINED_DIR", str(downloads))
    assert release_source(tag, "pretraining")[0].name == "dino_deitsmall16_pretrain_full_checkpoint.pth"
    assert release_source(tag, "features")[0].name == "dino_deitsmall16_pretrain.pth"

    monkeypatch.delenv("SSLHUB_PRETRAINED_DIR")
    remote = dataclasses.replace(tag, url=(downloads / "dino_deitsmall16_pretrain.pth").as_uri(), hf_hub_id=None)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    path, layout = release_source(remote, "features")
    assert path == sslhub_cache / "downloads" / "dino_deitsmall16_pretrain.pth" and layout == ""
    assert path.read_bytes() == b"dino_deitsmall16_pretrain.pth"
    (downloads / "dino_deitsmall16_pretrain.pth").unlink()  # a second call must not download again
    assert release_source(remote, "features")[0] == path


def test_a_release_read_as_a_pytorch_conversion_is_never_downloaded(tmp_path, sslhub_cache, monkeypatch):
    """Releases the authors publish only for TensorFlow / JAX are read as a named PyTorch conversion: found in
    ``$SSLHUB_PRETRAINED_DIR`` under that name, else one error naming the file, the authors' URL and the converter."""
    tag = dataclasses.replace(
        get_pretrained("dino_resnet50.in1k"),
        url="https://example.org/model.ckpt.zip",
        hf_hub_id=None,
        converted_file="converted.pth",
        conversion="python convert.py model.ckpt converted.pth (some/converter)",
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError) as info:
        release_source(tag, "features")
    message = str(info.value)
    assert "converted.pth" in message and "https://example.org/model.ckpt.zip" in message
    assert "some/converter" in message and "pretrained_path" in message
    assert not (sslhub_cache / "downloads").exists()
    (tmp_path / "converted.pth").write_bytes(b"weights")
    monkeypatch.setenv("SSLHUB_PRETRAINED_DIR", str(tmp_path))
    assert release_source(tag, "features")[0] == tmp_path / "converted.pth"
