"""LocalMIM (arXiv 2303.05251; Haoqing-Wang/LocalMIM): HOG targets and the multi-scale mask against plain loops, the
README recipe, and the release and the pretraining loss against the authors' model.

The authors' model is written out below from ``ViT/models_mim.py`` (their names, their container of ``util/misc.py
save_model``): ``MaskedAutoencoderViT`` with timm's ``PatchEmbed`` / ``Block``, one LayerNorm per supervised block
(``norm.0..3``), four ``MAE_Decoder`` (``decoder.k``, scale heads ``pred``) and the ``HOGLayer`` targets
(``hog_enc.k``). Two generalisations to tiny sizes: the HOG pools are ``patch / scale`` (the authors fix 4, 8, 16,
32, which is that for patch 16) and the tiny encoder has 7 blocks so that ``ID = [1, 3, depth-3, depth-1]`` names four
different blocks.
"""

import argparse
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import build, relative_error
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.loading import CheckpointError
from sslhub.methods.localmim import LocalMIMHparams, mask_at_scale
from sslhub.registry import get_pretrained
from sslhub.targets import hog_features

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "localmim_vit_tiny_patch4_32px"
SCALES = (4.0, 2.0, 1.0, 0.5)
# the authors' tiny model: 32 px, patch 4, width 32, 7 blocks (ID = 1, 3, 4, 6), decoders 1 x 32 with 4 heads
TINY = {"img_size": 32, "patch": 4, "dim": 32, "depth": 7, "heads": 2, "decoder_dim": 32, "decoder_heads": 4}
TINY_OVERRIDES = {"backbone_kwargs": {"depth": 7, "embed_dim": 32, "num_heads": 2}, "decoder_num_heads": 4}


# ---- the authors' model ----------------------------------------------------------------------------------------
class ChannelsFirstLayerNorm(nn.Module):
    """``models_mim.py LayerNorm``: ConvNeXt's LayerNorm over the channels of (B, C, H, W), eps 1e-6."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + self.bias[:, None, None]


class AuthorsDecoder(nn.Module):
    """``MAE_Decoder``: MAE's decoder on the (B, 1 + visible, D) tokens, the patch tokens as a grid through ``pred``."""

    def __init__(self, inp_dim, embed_dim, out_dim, scale, num_patches, heads):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.num_patches = num_patches
        self.embed = nn.Linear(inp_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, heads, 4.0, qkv_bias=True, norm_layer=norm)])
        self.norm = norm(embed_dim)
        hidden = embed_dim
        if scale == 4.0:
            layers = [
                nn.ConvTranspose2d(embed_dim, embed_dim // 2, 2, 2),
                ChannelsFirstLayerNorm(embed_dim // 2),
                nn.GELU(),
                nn.ConvTranspose2d(embed_dim // 2, embed_dim // 4, 2, 2),
            ]
            hidden = embed_dim // 4
        elif scale == 2.0:
            layers, hidden = [nn.ConvTranspose2d(embed_dim, embed_dim // 2, 2, 2)], embed_dim // 2
        elif scale == 1.0:
            layers = []
        else:
            layers = [nn.AvgPool2d(2, 2)]
        self.pred = nn.Sequential(*layers, nn.Conv2d(hidden, out_dim, 1))

    def forward(self, x, ids_restore):
        x = self.embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        side = int(self.num_patches**0.5)
        x = self.pred(x[:, 1:].transpose(1, 2).reshape(x.size(0), -1, side, side))
        return x.flatten(2, 3).transpose(1, 2)


class AuthorsHOGLayer(nn.Module):
    """``HOGLayer``: Sobel pair (reflect padding), orientation ``atan2(g0, g1)`` in ``nbins`` bins of π, the magnitude
    scattered to its bin, averaged over ``pool`` x ``pool`` cells, L2-normalised over the bins."""

    def __init__(self, nbins, pool, bias=False):
        super().__init__()
        self.nbins = nbins
        self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect", bias=bias)
        mat = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        self.conv.weight.data = torch.cat((mat[None], mat.t()[None]), dim=0)[:, None]
        self.pooler = nn.AvgPool2d(pool, stride=pool)

    @torch.no_grad()
    def forward(self, x):
        gxy = self.conv(x)
        norm = gxy.norm(dim=1)[:, None]
        phase = torch.atan2(gxy[:, 0], gxy[:, 1])
        phase_int = (phase / math.pi * self.nbins)[:, None]
        out = torch.zeros((gxy.shape[0], self.nbins, *gxy.shape[2:]))
        out.scatter_(1, phase_int.floor().long() % self.nbins, norm)
        return F.normalize(self.pooler(out), p=2, dim=1)


class AuthorsLocalMIM(nn.Module):
    """``MaskedAutoencoderViT`` of ``ViT/models_mim.py`` (the masking noise an argument instead of ``torch.rand``)."""

    def __init__(self, img_size, patch, dim, depth, heads, decoder_dim, decoder_heads, nbins=9, hog_bias=False):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch, 3, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.ID = [1, 3, depth - 3, depth - 1]
        self.scale = list(SCALES)
        self.norm = nn.ModuleList(norm(dim) for _ in self.ID)
        self.decoder = nn.ModuleList(
            AuthorsDecoder(dim, decoder_dim, 3 * nbins, s, num_patches, decoder_heads) for s in self.scale
        )
        self.hog_enc = nn.ModuleList(AuthorsHOGLayer(nbins, int(patch / s), hog_bias) for s in self.scale)
        with torch.no_grad():  # trained weights: nothing at its initial value, the Sobel filters untouched
            for name, value in self.named_parameters():
                if not name.startswith("hog_enc."):
                    value.add_(0.1 * torch.randn(value.shape))

    def HOG(self, imgs, k):
        channels = [self.hog_enc[k](imgs[:, c : c + 1]) for c in range(3)]
        return torch.cat(channels, 1).flatten(2, 3).transpose(1, 2)

    def random_masking(self, x, noise, mask_ratio):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_keep = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L])
        mask[:, :len_keep] = 0
        return x_keep, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, x, noise, mask_ratio):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, noise, mask_ratio)
        x = torch.cat(((self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x), dim=1)
        latent = []
        for i in range(len(self.blocks)):
            x = self.blocks[i](x)
            if i in self.ID:
                latent.append(self.norm[self.ID.index(i)](x))
        return latent, mask, ids_restore

    def recal_mask(self, mask, k):
        B, L, s = mask.size(0), mask.size(1), self.scale[k]
        H = W = int(L**0.5)
        if s >= 1.0:
            s = int(s)
            return mask.reshape(B, H, W).unsqueeze(3).unsqueeze(2).repeat(1, 1, s, 1, s).reshape(B, -1)
        s = int(1 / s)
        return mask.reshape(B, H // s, s, W // s, s).transpose(2, 3).mean((-2, -1)).reshape(B, -1)

    def losses(self, imgs, noise, mask_ratio=0.75):
        """``forward`` + ``forward_loss``, the four terms of the sum kept apart."""
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, mask_ratio)
        pred = [self.decoder[i](latent[i], ids_restore) for i in range(len(latent))]
        target = [self.HOG(imgs, k) for k in range(len(self.hog_enc))]
        terms = []
        for k in range(len(pred)):
            M = self.recal_mask(mask, k)
            terms.append((((pred[k] - target[k]) ** 2).mean(dim=-1) * M).sum() / M.sum())
        return terms


def save_localmim_file(path, model):
    """``util/misc.py save_model``."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "epoch": 1599,
            "scaler": {},
            "args": argparse.Namespace(hog_nbins=9, hog_bias=False, mask_ratio=0.75),
        },
        path,
    )


def authors_tokens(authors, images):
    """The authors' last-scale encoder tokens (``norm[3]``) with every patch kept in order (sorted noise, ratio 0)."""
    noise = torch.arange(authors.patch_embed.num_patches, dtype=torch.float).expand(images.shape[0], -1)
    return authors.forward_encoder(images, noise, 0.0)[0][-1]


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    torch.manual_seed(0)
    authors = AuthorsLocalMIM(**TINY).eval()
    path = tmp_path_factory.mktemp("localmim") / "checkpoint-1599.pth"
    save_localmim_file(path, authors)
    return authors, path


# ---- the targets and the mask --------------------------------------------------------------------------------------
def plain_hog(image, cell, nbins):
    """HOG of one (C, H, W) image with loops: Sobel gradients on the reflect-padded channel, each pixel's magnitude
    in bin ``floor(atan2(g0, g1) nbins / π) mod nbins``, averaged over the cell, L2-normalised per channel."""
    channels, height, width = image.shape
    sobel = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]

    def reflect(i, n):
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    out = torch.zeros(channels * nbins, height // cell, width // cell, dtype=torch.float64)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                g0 = g1 = 0.0
                for a in range(3):
                    for b in range(3):
                        value = float(image[c, reflect(y + a - 1, height), reflect(x + b - 1, width)])
                        g0 += sobel[a][b] * value
                        g1 += sobel[b][a] * value
                bin_ = math.floor(math.atan2(g0, g1) / math.pi * nbins) % nbins
                out[c * nbins + bin_, y // cell, x // cell] += math.hypot(g0, g1) / cell**2
        block = out[c * nbins : (c + 1) * nbins]
        block /= block.norm(dim=0).clamp_min(1e-12)
    return out


@pytest.mark.parametrize(("cell", "nbins"), [(1, 9), (2, 9), (4, 18)])
def test_hog_features_match_a_plain_loop(cell, nbins):
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(cell), dtype=torch.float64)
    hog = hog_features(images, cell, nbins)
    assert hog.shape == (2, 3 * nbins, 8 // cell, 8 // cell)
    for image, features in zip(images, hog, strict=True):
        torch.testing.assert_close(features, plain_hog(image, cell, nbins))


def test_hog_refuses_cells_that_do_not_tile_the_image():
    with pytest.raises(ValueError, match="not divisible by the HOG cell size 3"):
        hog_features(torch.zeros(1, 3, 8, 8), 3)


@pytest.mark.parametrize("scale", SCALES)
def test_mask_at_scale_is_the_authors_recal_mask(scale):
    mask = (torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) < 0.75).float()
    authors = AuthorsLocalMIM.__new__(AuthorsLocalMIM)
    authors.scale = list(SCALES)
    expected = authors.recal_mask(mask, SCALES.index(scale))
    torch.testing.assert_close(mask_at_scale(mask, (8, 8), scale), expected)


def test_coarse_mask_is_the_masked_fraction_of_each_2x2_block():
    mask = torch.zeros(1, 16)
    mask[0, [0, 1, 4, 10]] = 1  # block (0, 0): patches 0, 1, 4 masked; block (1, 1): patch 10
    torch.testing.assert_close(mask_at_scale(mask, (4, 4), 0.5), torch.tensor([[0.75, 0.0, 0.0, 0.25]]))


def test_pixel_target_is_each_cells_normalised_pixels():
    """``--target Pixel`` (``Swin/models_mim.py``): the (cell, cell, channel) pixels of every cell, normalised by
    their mean and unbiased variance, against the decoder of that scale, on the recalculated mask."""
    method = build(PRESET, target="pixel", backbone_kwargs={"depth": 7}, decoder_embed_dim=32).method
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        output = method(Batch.of([images], noise=noise))
        outputs, mask, ids_restore = method.encode_supervised(images, noise)
        expected = 0.0
        for decoder, tokens, cell, scale in zip(method.decoders, outputs, (1, 2, 4, 8), SCALES, strict=True):
            side = 32 // cell
            cells = images.reshape(2, 3, side, cell, side, cell).permute(0, 2, 4, 3, 5, 1).reshape(2, side**2, -1)
            target = (cells - cells.mean(-1, keepdim=True)) / (cells.var(-1, keepdim=True) + 1e-6).sqrt()
            weights = mask_at_scale(mask, (8, 8), scale)
            error = ((decoder(tokens, ids_restore) - target) ** 2).mean(-1)
            expected = expected + (error * weights).sum() / weights.sum()
    torch.testing.assert_close(output.loss, expected)


# ---- the recipe ----------------------------------------------------------------------------------------------------
def test_defaults_follow_the_readme_vit_base_command():
    """``run_pretrain.py --batch_size 256 (x 8 GPUs) --model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75
    --epochs 1600 --warmup_epochs 40 --blr 2e-4 --weight_decay 0.05`` (min_lr 1e-6, AdamW β (0.9, 0.95))."""
    hp = LocalMIMHparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.min_lr, hp.betas, hp.weight_decay) == (
        "adamw",
        2e-4,
        256,
        1e-6,
        (0.9, 0.95),
        0.05,
    )
    assert (hp.epochs, hp.warmup_epochs, hp.mask_ratio, hp.crop_scale_min) == (1600, 40, 0.75, 0.2)
    assert (hp.target, hp.hog_bins, hp.decoder_embed_dim, hp.decoder_depth, hp.decoder_num_heads) == (
        "hog",
        9,
        256,
        1,
        8,
    )
    method = build(PRESET).method  # 12 blocks, as ViT-B
    assert method.supervised_blocks == (1, 3, 9, 11)  # ID = [1, 3, depth-3, depth-1]
    assert method.cell_sizes == [1, 2, 4, 8]  # patch / (4, 2, 1, 0.5): 4, 8, 16, 32 px for patch 16


@pytest.mark.parametrize("blocks", [(3, 1, 5, 6), (1, 3, 4, 5), (1, 3, 4, 99)])
def test_supervised_blocks_must_be_increasing_and_end_at_the_last(blocks):
    with pytest.raises(ValueError, match="supervised_blocks"):
        build(PRESET, supervised_blocks=blocks, backbone_kwargs={"depth": 7})


# ---- the authors' model and the release ----------------------------------------------------------------------------
def test_authors_file_gives_their_encoder_tokens_and_their_loss(authors_file):
    authors, path = authors_file
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_tokens = authors_tokens(authors, images)
        expected_terms = authors.losses(images, noise)
        expected_targets = [authors.HOG(images, k) for k in range(4)]
        released = convert_checkpoint(PRESET, path, **TINY_OVERRIDES)(images)
        model = convert_checkpoint(PRESET, path, task="pretraining", **TINY_OVERRIDES)
        output = model.method(Batch.of([images], noise=noise))
        targets = model.method.targets(images)
    assert model.method.supervised_blocks == (1, 3, 4, 6)
    assert relative_error(released.last_hidden_state, expected_tokens) < 1e-4
    for target, expected in zip(targets, expected_targets, strict=True):
        assert relative_error(target, expected) < 1e-5
    assert relative_error(output.loss, sum(expected_terms)) < 1e-4
    assert list(output.metrics) == ["loss_1px", "loss_2px", "loss_4px", "loss_8px"]
    for metric, expected in zip(output.metrics.values(), expected_terms, strict=True):
        assert metric == pytest.approx(float(expected), rel=1e-4)


def test_an_encoder_only_file_gives_the_encoder_and_leaves_out_the_lower_norms(tmp_path, authors_file):
    authors, _ = authors_file
    encoder = {k: v for k, v in authors.state_dict().items() if not k.startswith(("decoder.", "hog_enc."))}
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    converted = read_checkpoint(tmp_path / "encoder.pth")
    assert converted.layout == "localmim" and converted.method is None
    assert {"model.norm.0.weight", "model.norm.2.bias"} <= set(converted.left_out)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        released = convert_checkpoint(PRESET, tmp_path / "encoder.pth", **TINY_OVERRIDES)(images)
    assert relative_error(released.last_hidden_state, authors_tokens(authors, images)) < 1e-4


def test_a_hog_bias_file_is_refused(tmp_path):
    torch.manual_seed(0)
    save_localmim_file(tmp_path / "large.pth", AuthorsLocalMIM(**TINY, hog_bias=True))
    with pytest.raises(CheckpointError, match=r"large\.pth.*hog_enc\.0\.conv\.bias.*--hog_bias"):
        convert_checkpoint(PRESET, tmp_path / "large.pth", **TINY_OVERRIDES)


def test_unexpected_keys_are_refused_by_name(tmp_path, authors_file):
    authors, _ = authors_file
    state = authors.state_dict()
    torch.save({"model": {**state, "teacher.proj": torch.zeros(2)}}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"(?s)extra\.pth.*teacher\.proj"):
        convert_checkpoint(PRESET, tmp_path / "extra.pth", **TINY_OVERRIDES)
    torch.save({"model": {**state, "decoder.0.head.weight": torch.zeros(2)}}, tmp_path / "decoder.pth")
    with pytest.raises(CheckpointError, match=r"decoder\.pth.*unexpected decoder key 'decoder\.0\.head\.weight'"):
        convert_checkpoint(PRESET, tmp_path / "decoder.pth", **TINY_OVERRIDES)


def test_released_tag_builds_vit_base_from_the_authors_file(tmp_path):
    tag = get_pretrained("localmim_vit_base_patch16_224.in1k_hog_1600ep")
    assert (tag.layout, tag.metrics, tag.epochs, tag.file_name) == (
        "localmim",
        {"finetune": 84.0},
        1600,
        "vit_base_localmim_hog_1600ep_pretrain.pth",
    )
    torch.manual_seed(0)
    authors = AuthorsLocalMIM(224, 16, 768, 12, 12, 32, 4).eval()  # decoders shrunk: the features task skips them
    path = tmp_path / tag.file_name
    save_localmim_file(path, authors)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = authors_tokens(authors, images)
        released = sslhub.create_model(tag.name, pretrained=True, pretrained_path=path)(images)
    assert released.pooler_output.shape == (1, 768)
    assert relative_error(released.last_hidden_state, expected) < 1e-4
