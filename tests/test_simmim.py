"""SimMIM (arXiv 2111.09886): the mask generator, eq. 1, the recipe, and the release against the authors' model.

The authors' model is written out below from microsoft/SimMIM ``models/vision_transformer.py`` and
``models/simmim.py`` (their names, their container): the BEiT-style ViT with ``q_bias`` / ``v_bias``, layer scale,
the shared ``RelativePositionBias`` with its class-token rows, ``VisionTransformerForSimMIM`` and ``SimMIM``.
"""

import math
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import build, relative_error
from PIL import Image
from torch import nn

import sslhub
from sslhub.batch import Batch, Sample
from sslhub.conversion.convert import convert_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError
from sslhub.methods.simmim import SIMMIM_VIT, SimMIMHparams, SimMIMMasks, masked_pixel_l1
from sslhub.registry import get_pretrained
from sslhub.training import PretrainArguments, Pretrainer

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = {"backbone_kwargs": {**SIMMIM_VIT, "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


# ---- the authors' model ----------------------------------------------------------------------------------------
class AuthorsAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim) * 0.1), nn.Parameter(torch.randn(dim) * 0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rel_pos_bias):
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) + rel_pos_bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class AuthorsBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = AuthorsAttention(dim, num_heads)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma_1 = nn.Parameter(0.1 + 0.05 * torch.randn(dim))  # INIT_VALUES 0.1, moved as training would
        self.gamma_2 = nn.Parameter(0.1 + 0.05 * torch.randn(dim))

    def forward(self, x, rel_pos_bias):
        x = x + self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class AuthorsRelativePositionBias(nn.Module):
    """``RelativePositionBias``: (2Wh-1)(2Ww-1) + 3 rows (the last three: cls->token, token->cls, cls->cls)."""

    def __init__(self, side, num_heads):
        super().__init__()
        self.side, distances = side, (2 * side - 1) ** 2 + 3
        self.relative_position_bias_table = nn.Parameter(torch.randn(distances, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        relative[:, :, 0] += side - 1
        relative[:, :, 1] += side - 1
        relative[:, :, 0] *= 2 * side - 1
        index = torch.zeros((side * side + 1,) * 2, dtype=relative.dtype)
        index[1:, 1:] = relative.sum(-1)
        index[0, 0:], index[0:, 0], index[0, 0] = distances - 3, distances - 2, distances - 1
        self.register_buffer("relative_position_index", index)

    def forward(self):
        n = self.side * self.side + 1
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)


class AuthorsSimMIM(nn.Module):
    """``SimMIM(VisionTransformerForSimMIM(...), encoder_stride=patch)``: ``encoder.*`` and ``decoder.0.*``."""

    def __init__(self, img_size, patch, dim, depth, heads):
        super().__init__()
        side = img_size // patch
        self.patch, self.encoder = patch, nn.Module()
        self.encoder.patch_embed = nn.Module()
        self.encoder.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.encoder.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.encoder.rel_pos_bias = AuthorsRelativePositionBias(side, heads)
        self.encoder.blocks = nn.ModuleList(AuthorsBlock(dim, heads) for _ in range(depth))
        self.encoder.norm = nn.LayerNorm(dim, eps=1e-6)
        self.encoder.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.decoder = nn.Sequential(nn.Conv2d(dim, patch**2 * 3, 1), nn.PixelShuffle(patch))

    def encode(self, x, mask):
        enc = self.encoder
        x = enc.patch_embed.proj(x).flatten(2).transpose(1, 2)
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1 - w) + enc.mask_token.expand(x.shape[0], x.shape[1], -1) * w
        x = torch.cat((enc.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        bias = enc.rel_pos_bias()
        for block in enc.blocks:
            x = block(x, bias)
        return enc.norm(x)

    def forward(self, x, mask):
        z = self.encode(x, mask)[:, 1:]
        side = math.isqrt(z.shape[1])
        x_rec = self.decoder(z.permute(0, 2, 1).reshape(z.shape[0], -1, side, side))
        pixels = mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2).unsqueeze(1).contiguous()
        return (F.l1_loss(x, x_rec, reduction="none") * pixels).sum() / (pixels.sum() + 1e-5) / 3


def save_simmim_file(path, model):
    """``utils.py save_checkpoint``."""
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "max_accuracy": 0.0, "epoch": 799,
                "config": "simmim_pretrain"}, path)  # fmt: skip


# ---- masks and eq. 1 -----------------------------------------------------------------------------------------------
def test_mask_generator_masks_ceil_ratio_of_the_mask_patches_repeated_to_the_model_grid():
    masks = SimMIMMasks(224, 32, 16, 0.6)
    generator = torch.Generator().manual_seed(0)
    drawn = [masks(generator) for _ in range(20)]
    for mask in drawn:
        assert mask.shape == (14, 14) and mask.dtype == torch.long
        coarse = mask[::2, ::2]
        assert int(coarse.sum()) == math.ceil(49 * 0.6) == 30
        torch.testing.assert_close(mask, coarse.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert len({tuple(m.flatten().tolist()) for m in drawn}) == 20
    with pytest.raises(ValueError, match="multiple"):
        SimMIMMasks(224, 24, 16, 0.6)


def test_loss_is_l1_on_masked_pixels_per_channel():
    gen = torch.Generator().manual_seed(1)
    images, reconstruction = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    mask = torch.zeros(2, 2, 2, dtype=torch.long)
    mask[0, 0, 1] = mask[1, 1, 0] = mask[1, 1, 1] = 1
    total, count = 0.0, 0
    for b in range(2):
        for y in range(8):
            for x in range(8):
                if mask[b, y // 4, x // 4]:
                    total += (images[b, :, y, x] - reconstruction[b, :, y, x]).abs().sum()
                    count += 1
    expected = total / (count + 1e-5) / 3
    torch.testing.assert_close(masked_pixel_l1(images, reconstruction, mask), expected)


# ---- the recipe ----------------------------------------------------------------------------------------------------
def test_defaults_follow_the_vit_base_config():
    hp = SimMIMHparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.betas, hp.weight_decay) == ("adamw", 1e-4, 512, (0.9, 0.999),
                                                                                  0.05)  # fmt: skip
    assert (hp.warmup_epochs, hp.warmup_start_ratio, hp.epochs, hp.lr_milestones) == (10, pytest.approx(5e-3), 800,
                                                                                      (700,))  # fmt: skip
    assert (hp.lr_schedule, hp.clip_grad, hp.mask_ratio, hp.mask_patch_size) == ("step", 5.0, 0.6, 32)
    assert hp.crop_scale_min == 0.67
    vit = build("simmim_vit_base_patch16_224").method.encoder.backbone
    assert vit.pos_embed is None and vit.rel_pos_bias is not None and all(b.attn.relative_position_bias_table is None
                                                                         for b in vit.blocks)  # fmt: skip
    assert float(vit.blocks[0].gamma_1[0].detach()) == pytest.approx(0.1) and vit.norm.eps == 1e-6


def test_view_recipe_crops_flips_and_draws_a_mask_per_image():
    method = build("simmim_vit_tiny_patch4_32px", **TINY).method
    recipe = method.view_recipe()
    crop_transform = recipe.transform.transforms[0]
    assert crop_transform.size == (32, 32) and crop_transform.scale == (0.67, 1.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    views = recipe(image)
    assert views.views[0].shape == (3, 32, 32) and views.extras["mask"].shape == (8, 8)
    assert int(views.extras["mask"].sum()) == 4 * math.ceil(16 * 0.6)
    batch = recipe.collate([Sample(i, views.views, extras=views.extras) for i in range(2)])
    assert batch.extras["mask"].shape == (2, 8, 8)


def test_mask_token_and_class_token_are_not_decayed_as_the_official_skip_list(image_folder, tmp_path):
    args = PretrainArguments(model="simmim_vit_tiny_patch4_32px", data=str(image_folder), output_dir=str(tmp_path),
                             batch_size=8, knn_every=0, log_with=None, progress=False, overrides=TINY)  # fmt: skip
    trainer = Pretrainer(args)
    names = {id(p): n for n, p in trainer.method.named_parameters()}
    decayed = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "encoder.backbone.cls_token" not in decayed and "encoder.backbone.blocks.0.gamma_1" not in decayed
    assert {"mask_token", "encoder.backbone.rel_pos_bias.relative_position_bias_table"} <= decayed
    assert trainer.peak_lr == pytest.approx(1e-4 * 8 / 512)


# ---- the authors' model and the release ----------------------------------------------------------------------------
def test_authors_file_converts_and_matches_their_model(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsSimMIM(32, 4, 192, 12, 3).eval()
    path = tmp_path / "checkpoint.pth"
    save_simmim_file(path, authors)
    assert detect_layout(torch.load(path, weights_only=True)) is get_layout("simmim")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.stack([SimMIMMasks(32, 8, 4, 0.6)(torch.Generator().manual_seed(s)) for s in range(2)])
    with torch.no_grad():
        expected_loss = authors(images, mask)
        expected_tokens = authors.encode(images, torch.zeros_like(mask))
        released = convert_checkpoint("simmim_vit_tiny_patch4_32px", path)(images)
        method = convert_checkpoint("simmim_vit_tiny_patch4_32px", path, task="pretraining").method.eval()
        loss = method(Batch.of(images, mask=mask)).loss
    assert relative_error(released.last_hidden_state, expected_tokens) < 1e-4
    assert relative_error(released.pooler_output, expected_tokens[:, 1:].mean(dim=1)) < 1e-4
    assert abs(float(loss - expected_loss)) / float(expected_loss) < 1e-4


def test_a_wrong_relative_position_index_is_refused(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsSimMIM(32, 4, 192, 12, 3)
    authors.encoder.rel_pos_bias.relative_position_index.fill_(0)
    save_simmim_file(tmp_path / "bad.pth", authors)
    with pytest.raises(CheckpointError, match="relative_position_index is not BEiT's index of a 8x8 grid"):
        convert_checkpoint("simmim_vit_tiny_patch4_32px", tmp_path / "bad.pth")


def test_released_tag_builds_vit_base_from_the_authors_file(tmp_path):
    tag = get_pretrained("simmim_vit_base_patch16_224.in1k_800ep")
    assert (tag.layout, tag.metrics, tag.epochs, tag.license) == ("simmim", {"finetune": 83.8}, 800, "mit")
    torch.manual_seed(0)
    authors = AuthorsSimMIM(224, 16, 768, 12, 12).eval()
    path = tmp_path / tag.file_name
    save_simmim_file(path, authors)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = authors.encode(images, torch.zeros(1, 14, 14, dtype=torch.long))
        released = sslhub.create_model("simmim_vit_base_patch16_224.in1k_800ep", pretrained=True,
                                       pretrained_path=path)(images)  # fmt: skip
    assert released.pooler_output.shape == (1, 768)
    assert relative_error(released.last_hidden_state, expected) < 1e-4


def test_card_names_the_timm_arguments_its_weights_load_into():
    """The card's ``timm.create_model(...)`` call builds the shared-bias BEiT the weights belong to (a stock
    ``beit_base_patch16_224`` has per-block tables instead)."""
    model = build("simmim_vit_tiny_patch4_32px", **TINY).released_model()
    call = re.search(r"load into `(timm\.create_model\(.*?\))`", str(model.model_card())).group(1)
    assert "use_shared_rel_pos_bias=True" in call and "init_values=0.1" in call
    rebuilt = eval(call, {"timm": timm})  # noqa: S307 - the card's own code line
    rebuilt.load_state_dict(sslhub.to_timm(model).state_dict())


def test_export_transformers_writes_the_encoder_as_a_beit_model(tmp_path):
    import transformers

    from sslhub.export import export_transformers

    torch.manual_seed(0)
    model = sslhub.create_model("simmim_vit_tiny_patch4_32px", backbone_kwargs={**SIMMIM_VIT, "img_size": 32,
                                "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}).eval()  # fmt: skip
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))  # layer scale and zero biases become non-trivial
    export_transformers(model, tmp_path / "hf")
    hf_model = transformers.BeitModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    assert hf_model.config.use_shared_relative_position_bias and not hf_model.config.use_absolute_position_embeddings
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(hf_model(images).last_hidden_state, model(images).last_hidden_state) < 1e-4
