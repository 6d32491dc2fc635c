"""ConvMAE (arXiv 2205.03892): the ConvViT encoder, the masked convolutions, the recipe, and the release against the
authors' model.

The authors' model is written out below from Alpha-VL/ConvMAE ``vision_transformer.py`` (``PatchEmbed``, ``CMlp``,
``CBlock``, ``Attention``, ``Mlp``, ``Block``), ``models_convmae.py`` (``MaskedAutoencoderConvViT``: their names, their
``{'model': ...}`` container, ``forward_encoder`` / ``forward_decoder`` / ``forward_loss`` with the noise given instead
of drawn, the 14 x 14 grid and 56 / 28 maps of the mask written for any grid) and ``models_convvit.py`` (``ConvViT``
with ``global_pool``: mean of the stage-3 tokens, then a new ``fc_norm``).
"""

import numpy as np
import pytest
import torch
from helpers import build, relative_error
from torch import nn

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError
from sslhub.methods.convmae import ConvMAEHparams
from sslhub.registry import get_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "convmae_convvit_tiny_32px"
# 32 px, patch sizes 1-2-2 (an 8 x 8 token grid), 2 + 2 + 2 blocks, widths <= 32, one decoder block
SMALL = {"img_size": 32, "patch_size": (1, 2, 2), "embed_dim": (16, 24, 32), "depth": (2, 2, 2), "num_heads": 2}
SMALL_DECODER = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4}


# ---- the authors' model ----------------------------------------------------------------------------------------
def authors_sincos(dim, side):
    """``util/pos_embed.py get_2d_sincos_pos_embed`` (no class token), in numpy."""
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)))
    grid = grid.reshape(2, 1, side, side)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


class AuthorsPatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj, self.norm, self.act = nn.Conv2d(in_chans, dim, patch, patch), nn.LayerNorm(dim), nn.GELU()

    def forward(self, x):
        return self.act(self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class AuthorsCBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)  # nn.LayerNorm(dim): eps 1e-5
        self.conv1, self.conv2 = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.mlp = nn.Module()  # CMlp
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x, mask=None):
        h = self.conv1(self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        x = x + self.conv2(self.attn(h if mask is None else mask * h))
        h = self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(h)))


class AuthorsBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def attention(self, x):
        B, N, C = x.shape
        qkv = self.attn.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(dim=-1)
        return self.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm2(x))))


class AuthorsConvMAE(nn.Module):
    """``MaskedAutoencoderConvViT`` (patch sizes (p1, 2, 2), as theirs: the fusion kernels 4 and 2 are fixed)."""

    def __init__(self, img, p1, dims, depths, heads, dec_dim, dec_depth, dec_heads):
        super().__init__()
        self.side, self.p = img // (4 * p1), 4 * p1
        self.patch_embed1 = AuthorsPatchEmbed(p1, 3, dims[0])
        self.patch_embed2 = AuthorsPatchEmbed(2, dims[0], dims[1])
        self.patch_embed3 = AuthorsPatchEmbed(2, dims[1], dims[2])
        self.patch_embed4 = nn.Linear(dims[2], dims[2])
        self.stage1_output_decode = nn.Conv2d(dims[0], dims[2], 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(dims[1], dims[2], 2, stride=2)
        self.pos_embed = nn.Parameter(authors_sincos(dims[2], self.side), requires_grad=False)
        self.blocks1 = nn.ModuleList(AuthorsCBlock(dims[0]) for _ in range(depths[0]))
        self.blocks2 = nn.ModuleList(AuthorsCBlock(dims[1]) for _ in range(depths[1]))
        self.blocks3 = nn.ModuleList(AuthorsBlock(dims[2], heads) for _ in range(depths[2]))
        self.norm = nn.LayerNorm(dims[2], eps=1e-6)
        self.decoder_embed = nn.Linear(dims[2], dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(authors_sincos(dec_dim, self.side), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(AuthorsBlock(dec_dim, dec_heads) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, self.p**2 * 3)
        with torch.no_grad():  # weights a trained model could have: LayerNorm affines, biases, mask token not trivial
            for name, p in self.named_parameters():
                if "pos_embed" not in name:
                    p.add_(0.1 * torch.randn(p.shape))

    def upsampled(self, mask, scale):
        g = self.side
        m = mask.reshape(-1, g, g).unsqueeze(-1).repeat(1, 1, 1, scale * scale).reshape(-1, g, g, scale, scale)
        return m.permute(0, 1, 3, 2, 4).reshape(mask.shape[0], g * scale, g * scale).unsqueeze(1)

    def forward_encoder(self, x, mask_ratio, noise):
        N, L = noise.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones([N, L])
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        mask_for_patch1, mask_for_patch2 = self.upsampled(mask, 4), self.upsampled(mask, 2)
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x, 1 - mask_for_patch1)
        stage1_embed = self.stage1_output_decode(x).flatten(2).permute(0, 2, 1)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, 1 - mask_for_patch2)
        stage2_embed = self.stage2_output_decode(x).flatten(2).permute(0, 2, 1)
        x = self.patch_embed4(self.patch_embed3(x).flatten(2).permute(0, 2, 1)) + self.pos_embed

        def keep(t):
            return torch.gather(t, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, t.shape[-1]))

        x, stage1_embed, stage2_embed = keep(x), keep(stage1_embed), keep(stage2_embed)
        for blk in self.blocks3:
            x = blk(x)
        return self.norm(x + stage1_embed + stage2_embed), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
        x = torch.cat([x, mask_tokens], dim=1)
        x = torch.gather(x, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2])) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs, pred, mask):
        p, h = self.p, imgs.shape[2] // self.p
        target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(imgs.shape[0], 3, h, p, h, p)).reshape(
            imgs.shape[0], h * h, -1
        )
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5  # --norm_pix_loss
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, noise, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def convvit_features(self, x):
        """``models_convvit.ConvViT.forward_features`` with ``global_pool``: the stage-3 tokens, and the new
        ``fc_norm`` of their mean (unit weight, zero bias: frozen at that in linear probing)."""
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        x = self.patch_embed4(self.patch_embed3(x).flatten(2).permute(0, 2, 1)) + self.pos_embed
        for blk in self.blocks3:
            x = blk(x)
        return x, nn.LayerNorm(x.shape[-1], eps=1e-6)(x.mean(dim=1))


def small_authors_model():
    torch.manual_seed(0)
    return AuthorsConvMAE(32, 1, SMALL["embed_dim"], SMALL["depth"], 2, 32, 1, 4).eval()


def save_convmae_file(path, model):
    """``util/misc.py save_model`` (MAE's)."""
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1599, "scaler": {}, "args": "pretrain"}, path)


def images(count, size=32, seed=2):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_model():
    return build(PRESET, backbone_kwargs=SMALL, **SMALL_DECODER)


# ---- the release against the authors' model -----------------------------------------------------------------------
def test_authors_file_converts_and_matches_their_model(tmp_path):
    authors = small_authors_model()
    path = tmp_path / "checkpoint.pth"
    save_convmae_file(path, authors)
    assert detect_layout(torch.load(path, weights_only=True)) is get_layout("convmae")
    pixels, noise = images(2), torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_tokens, expected_pooled = authors.convvit_features(pixels)
        expected_latent, expected_mask, _ = authors.forward_encoder(pixels, 0.75, noise)
        expected_loss, expected_prediction, _ = authors(pixels, noise)
        released = convert_checkpoint(PRESET, path, backbone_kwargs=SMALL)(pixels)
        model = convert_checkpoint(PRESET, path, task="pretraining", backbone_kwargs=SMALL, decoder_num_heads=4)
        method = model.method.eval()
        latent, mask, ids_restore = method.encode_visible(pixels, noise)
        prediction = method.decoder(latent, ids_restore)
        loss = model([pixels], noise=noise).loss
    assert model.config.method_kwargs["decoder_embed_dim"] == 32 and model.config.method_kwargs["decoder_depth"] == 1
    assert relative_error(released.last_hidden_state, expected_tokens) < 1e-4
    assert relative_error(released.pooler_output, expected_pooled) < 1e-4
    torch.testing.assert_close(mask, expected_mask)
    assert relative_error(latent, expected_latent) < 1e-4
    assert relative_error(prediction, expected_prediction) < 1e-4
    assert abs(float(loss - expected_loss)) / float(expected_loss) < 1e-4


def test_released_tag_builds_convvit_base_from_the_authors_file(tmp_path):
    tag = get_pretrained("convmae_convvit_base_patch16.in1k_1600ep")
    assert (tag.layout, tag.metrics, tag.epochs, tag.license) == (
        "convmae",
        {"finetune": 85.0, "linear": 70.9},
        1600,
        "mit",
    )
    torch.manual_seed(0)
    authors = AuthorsConvMAE(224, 4, (256, 384, 768), (2, 2, 11), 12, 512, 8, 16).eval()
    path = tmp_path / tag.file_name
    save_convmae_file(path, authors)
    pixels = images(1, 224, seed=4)
    with torch.no_grad():
        expected_tokens, expected_pooled = authors.convvit_features(pixels)
        released = sslhub.create_model(tag.name, pretrained=True, pretrained_path=path)(pixels)
    assert released.last_hidden_state.shape == (1, 196, 768)
    assert relative_error(released.last_hidden_state, expected_tokens) < 1e-4
    assert relative_error(released.pooler_output, expected_pooled) < 1e-4


def test_a_file_of_another_architecture_is_refused_naming_the_key(tmp_path):
    authors = small_authors_model()
    save_convmae_file(tmp_path / "checkpoint.pth", authors)
    with pytest.raises(CheckpointError, match=r"wrong shape.*patch_embed1\.proj\.weight"):
        convert_checkpoint(PRESET, tmp_path / "checkpoint.pth")  # the preset's widths, not the file's
    state = {**authors.state_dict(), "head.weight": torch.zeros(10, 32)}
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="head.weight"):
        convert_checkpoint(PRESET, tmp_path / "extra.pth", backbone_kwargs=SMALL)


# ---- the masked convolution and the fusion -------------------------------------------------------------------------
def test_visible_tokens_see_no_pixel_of_a_masked_patch():
    """The masked depthwise convolutions keep stages 1-2 of a visible 4 px patch blind to the masked ones: changing
    the pixels of the masked patches leaves the encoder's (fused, visible) tokens unchanged; changing a visible
    patch does not."""
    method = small_model().method.eval()
    pixels, noise = images(1), torch.rand(1, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens, mask, _ = method.encode_visible(pixels, noise)
        assert tokens.shape == (1, 16, 32) and int(mask.sum()) == 48
        masked_pixels = (
            mask.reshape(1, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3).bool().expand(-1, 3, -1, -1)
        )
        changed = torch.where(masked_pixels, 10 * torch.randn_like(pixels), pixels)
        torch.testing.assert_close(method.encode_visible(changed, noise)[0], tokens)
        visible_changed = torch.where(masked_pixels, pixels, pixels + 1)
        assert relative_error(method.encode_visible(visible_changed, noise)[0], tokens) > 1e-2


def test_without_masking_the_pretraining_encoder_is_the_released_one_plus_the_fusion():
    """Mask ratio 0: ``norm(blocks3(x) + s1 + s2)`` over every token, ``x`` the released encoder's stage-3 input and
    s1 / s2 the stage maps through 4x4 / 2x2 strided convolutions (written here as patch-wise linear maps)."""
    method = build(PRESET, backbone_kwargs=SMALL, mask_ratio=0.0, **SMALL_DECODER).method.eval()
    enc, pixels = method.encoder, images(2)
    noise = torch.arange(64.0).expand(2, -1)  # identity order
    with torch.no_grad():
        stage1, stage2 = enc.forward_convolutions(pixels)

        def strided(conv, fmap, k):
            patches = fmap.unfold(2, k, k).unfold(3, k, k).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
            return patches @ conv.weight.flatten(1).T + conv.bias

        fused = strided(method.stage1_output_decode, stage1, 4) + strided(method.stage2_output_decode, stage2, 2)
        expected = method.norm(enc.forward_features(pixels) + fused)
        torch.testing.assert_close(method.encode_visible(pixels, noise)[0], expected, rtol=1e-4, atol=1e-5)


# ---- the recipe and the architecture -------------------------------------------------------------------------------
def test_defaults_follow_pretrain_md_and_convvit_base():
    hp = ConvMAEHparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.betas, hp.weight_decay) == (
        "adamw",
        1.5e-4,
        256,
        (0.9, 0.95),
        0.05,
    )
    assert (hp.warmup_epochs, hp.epochs, hp.mask_ratio, hp.norm_pix_loss, hp.crop_scale_min) == (
        40,
        1600,
        0.75,
        True,
        0.2,
    )
    assert (hp.decoder_embed_dim, hp.decoder_depth, hp.decoder_num_heads) == (512, 8, 16)
    with torch.device("meta"):
        method = sslhub.create_model("convmae_convvit_base_patch16", task="pretraining").method
    enc = method.encoder
    assert (len(enc.blocks1), len(enc.blocks2), len(enc.blocks3), enc.grid_size) == (2, 2, 11, (14, 14))
    assert enc.blocks1[0].norm1.eps == 1e-5 and enc.patch_embed3.norm.eps == 1e-5 and enc.blocks3[0].norm1.eps == 1e-6
    assert enc.blocks3[0].attn.num_heads == 12 and enc.blocks3[0].attn.qkv.bias is not None
    assert enc.blocks1[0].attn.kernel_size == (5, 5) and enc.blocks1[0].attn.groups == 256
    assert method.stage1_output_decode.stride == (4, 4) and method.stage2_output_decode.kernel_size == (2, 2)
    assert method.decoder.decoder_pred.out_features == 16 * 16 * 3 and method.decoder.decoder_pos_embed.shape == (
        1,
        196,
        512,
    )


def test_position_embeddings_are_fixed_sincos_and_norms_biases_undecayed():
    method = small_model().method
    torch.testing.assert_close(method.encoder.pos_embed, authors_sincos(32, 8))
    torch.testing.assert_close(method.decoder.decoder_pos_embed, authors_sincos(32, 8))
    names = {id(p): n for n, p in method.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in method.param_groups()}
    assert "encoder.pos_embed" not in groups[0.05] | groups[0.0] and "decoder.decoder_pos_embed" not in groups[0.05]
    assert {"decoder.mask_token", "encoder.blocks1.0.attn.weight", "stage1_output_decode.weight"} <= groups[0.05]
    assert {"encoder.blocks1.0.norm1.weight", "encoder.blocks1.0.attn.bias", "norm.weight"} <= groups[0.0]
    assert sslhub.create_model(PRESET, backbone_kwargs=SMALL).encoder.pos_embed.requires_grad  # fine-tuning trains it


def test_wrong_backbone_pooling_and_image_size_are_refused():
    with pytest.raises(ValueError, match="ConvViT, one of"):
        sslhub.create_model(PRESET, backbone="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="pooling must be None"):
        sslhub.create_model(PRESET, pooling="cls")
    encoder = sslhub.create_model(PRESET, backbone_kwargs=SMALL)
    with pytest.raises(ValueError, match=r"\(B, C, 32, 32\) images"):
        encoder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="three values"):
        sslhub.create_model(PRESET, backbone_kwargs={"depth": (1, 1)})


def test_one_adamw_step_lowers_the_loss_with_the_same_mask():
    method = small_model().method.train()
    batch = Batch.of([images(4)], noise=torch.rand(4, 64, generator=torch.Generator().manual_seed(6)))

    def measure():
        with torch.no_grad():
            return method(batch).loss.item()

    optimizer = torch.optim.AdamW(method.param_groups(), lr=1e-3, betas=(0.9, 0.95))
    before = measure()
    method(batch).loss.backward()
    optimizer.step()
    assert measure() < 0.99 * before
