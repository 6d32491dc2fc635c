"""DeepMIM (arXiv 2303.08817; OliverRensu/DeepMIM): the deep-supervision loss against the equations written out here,
the recipe, and the release against the authors' model.

The authors' model is written out below from ``models_mae.py`` (their names, their container of ``util/misc.py
save_model``): ``MaskedAutoencoderViT`` with timm's ``PatchEmbed`` / ``Block``, four decoders ``decoder_*1..4`` on the
raw outputs of blocks 6, 8, 10 and the final-norm output, predicting CLIP features (DeepMIM-CLIP).
"""

import argparse
from functools import partial

import pytest
import torch
from helpers import build, perturb_, relative_error
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.loading import CheckpointError
from sslhub.methods.deepmim import DeepMIMHparams
from sslhub.registry import get_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "deepmim_vit_tiny_patch4_32px"
SHALLOW = {"backbone_kwargs": {"depth": 4}, "deep_supervision_blocks": (1, 2), "decoder_embed_dim": 32}


# ---- the authors' model ----------------------------------------------------------------------------------------
class AuthorsDeepMIM(nn.Module):
    """``MaskedAutoencoderViT`` of DeepMIM's ``models_mae.py``: the encoder keeps the outputs of blocks 6, 8, 10
    (``count`` 1-based) before the final norm; decoder ``k`` reads the k-th kept output."""

    def __init__(self, img_size, patch, dim, depth, heads, decoder_dim, decoder_depth, clip_dim=16):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch, 3, dim)
        length = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, length, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.decoder_pos_embed = nn.Parameter(0.02 * torch.randn(1, length, decoder_dim), requires_grad=False)
        for k in range(1, 5):
            setattr(self, f"decoder_embed{k}", nn.Linear(dim, decoder_dim))
            setattr(self, f"mask_token{k}", nn.Parameter(0.02 * torch.randn(1, 1, decoder_dim)))
            setattr(
                self,
                f"decoder_blocks{k}",
                nn.ModuleList(Block(decoder_dim, 4, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)),
            )
            setattr(self, f"decoder_norm{k}", norm(decoder_dim))
            setattr(self, f"decoder_pred{k}", nn.Linear(decoder_dim, clip_dim))
        with torch.no_grad():  # trained norms, not the identity
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.add_(0.1 * torch.randn(module.weight.shape))
                    module.bias.add_(0.1 * torch.randn(module.bias.shape))

    def forward_encoder(self, x, noise, mask_ratio):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        keep = noise.argsort(dim=1)[:, : int(x.shape[1] * (1 - mask_ratio))]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        kept = []
        for count, block in enumerate(self.blocks, start=1):
            x = block(x)
            if count in (6, 8, 10):
                kept.append(x)
        return (*kept, self.norm(x))


def save_deepmim_file(path, model):
    """``util/misc.py save_model``."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "epoch": 1599,
            "scaler": {},
            "args": argparse.Namespace(mask_ratio=0.75, norm_pix_loss=True),
        },
        path,
    )


# ---- the loss ------------------------------------------------------------------------------------------------------
def reference_decoder(decoder, tokens, kept, length):
    """MAE's ``forward_decoder`` written out: visible tokens back at their positions, mask tokens elsewhere."""
    x = decoder.decoder_embed(tokens)
    full = decoder.mask_token.expand(x.shape[0], length, -1).clone()
    for b in range(x.shape[0]):
        full[b, kept[b]] = x[b, 1:]
    y = torch.cat([x[:, :1], full], dim=1) + decoder.decoder_pos_embed
    for block in decoder.decoder_blocks:
        y = block(y)
    return decoder.decoder_pred(decoder.decoder_norm(y))[:, 1:]


def reference_loss(method, images, noise, supervised):
    """``Σ_k`` of MAE's per-patch-normalised pixel MSE on the masked patches, decoder k on the raw output of block
    ``supervised[k]`` and the last decoder on the final-norm output."""
    vit, p = method.encoder.backbone, method.patch_size
    batch, length = noise.shape
    kept = noise.argsort(dim=1)[:, : int(length * 0.25)]
    tokens = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x = torch.stack([tokens[b, kept[b]] for b in range(batch)])
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(batch, -1, -1), x], dim=1)
    outputs = []
    for index, block in enumerate(vit.blocks):
        x = block(x)
        if index in supervised:
            outputs.append(x)
    outputs.append(vit.norm(x))
    side = images.shape[-1] // p
    patches = images.reshape(batch, 3, side, p, side, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, length, -1)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    masked = torch.ones(batch, length)
    for b in range(batch):
        masked[b, kept[b]] = 0
    total = 0.0
    for decoder, output in zip([*method.deep_decoders, method.decoder], outputs, strict=True):
        error = ((reference_decoder(decoder, output, kept, length) - target) ** 2).mean(-1)
        total = total + (error * masked).sum() / masked.sum()
    return total


def test_loss_sums_the_pixel_losses_of_the_supervised_blocks_and_the_final_output():
    model = build(PRESET, **SHALLOW)
    perturb_(model.method, ("encoder.", "decoder.", "deep_decoders."))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = model.method(Batch.of([images], noise=noise))
        expected = reference_loss(model.method, images, noise, (1, 2))
    assert len(model.method.deep_decoders) == 2
    torch.testing.assert_close(output.loss, expected)
    assert set(output.metrics) == {"loss_block2", "loss_block3", "loss_final"}
    assert sum(output.metrics.values()) == pytest.approx(float(expected), rel=1e-5)


def test_defaults_follow_the_authors_vit_base_run():
    hp = DeepMIMHparams()
    assert (hp.epochs, hp.warmup_epochs, hp.lr, hp.lr_batch_size, hp.weight_decay, hp.betas) == (
        1600,
        40,
        1.5e-4,
        256,
        0.05,
        (0.9, 0.95),
    )
    assert (hp.mask_ratio, hp.norm_pix_loss, hp.crop_scale_min) == (0.75, True, 0.2)
    assert (hp.decoder_embed_dim, hp.decoder_depth, hp.decoder_num_heads) == (512, 4, 16)
    assert hp.deep_supervision_blocks == (5, 7, 9)  # blocks 6, 8, 10 of 12


@pytest.mark.parametrize("blocks", [(3, 1), (11,), (-1,)])
def test_supervised_blocks_must_be_increasing_and_before_the_last(blocks):
    with pytest.raises(ValueError, match="deep_supervision_blocks"):
        build(PRESET, deep_supervision_blocks=blocks)


def test_released_encoder_has_no_decoder():
    model = build(PRESET, **SHALLOW)
    released = model.released_model().encoder.state_dict()
    assert released.keys() == model.method.encoder.state_dict().keys()
    assert not any("decoder" in name or "mask_token" in name for name in released)


# ---- the authors' model and the release ----------------------------------------------------------------------------
def authors_tokens(authors, images):
    """The authors' final-norm encoder tokens with every patch kept in order (identity noise, ratio 0)."""
    noise = torch.arange(authors.patch_embed.num_patches, dtype=torch.float).expand(images.shape[0], -1)
    return authors.forward_encoder(images, noise, 0.0)[-1]


def test_authors_file_converts_to_the_encoder_and_leaves_out_the_clip_decoders(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsDeepMIM(32, 4, 192, 12, 3, 32, 1).eval()
    path = tmp_path / "checkpoint-1599.pth"
    save_deepmim_file(path, authors)
    converted = read_checkpoint(path, "deepmim")
    assert converted.method is None and "decoder_pos_embed" not in converted.backbone
    assert any("CLIP-feature decoders" in entry for entry in converted.left_out)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = authors_tokens(authors, images)
        released = convert_checkpoint(PRESET, path, layout="deepmim")(images)
        method = convert_checkpoint(PRESET, path, task="pretraining", layout="deepmim").method
        pretraining = method.encoder.backbone.forward_features(images)
    assert relative_error(released.last_hidden_state, expected) < 1e-4
    assert relative_error(pretraining, expected) < 1e-4


def test_unexpected_keys_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsDeepMIM(32, 4, 192, 12, 3, 32, 1)
    state = {**authors.state_dict(), "teacher.proj": torch.zeros(2)}
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"(?s)bad\.pth.*unexpected.*'teacher\.proj'"):
        convert_checkpoint(PRESET, tmp_path / "bad.pth", layout="deepmim")


def test_released_tag_builds_vit_base_from_the_authors_file(tmp_path):
    tag = get_pretrained("deepmim_vit_base_patch16_224.in1k_clip_1600ep")
    assert (tag.layout, tag.metrics, tag.epochs, tag.file_name) == (
        "deepmim",
        {"finetune": 85.6},
        1600,
        "DeepMIM-CLIP-PT.pth",
    )
    torch.manual_seed(0)
    authors = AuthorsDeepMIM(224, 16, 768, 12, 12, 64, 1, clip_dim=512).eval()  # decoders shrunk: left out anyway
    path = tmp_path / tag.file_name
    save_deepmim_file(path, authors)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = authors_tokens(authors, images)
        released = sslhub.create_model(tag.name, pretrained=True, pretrained_path=path)(images)
    assert released.pooler_output.shape == (1, 768)
    assert relative_error(released.last_hidden_state, expected) < 1e-4
