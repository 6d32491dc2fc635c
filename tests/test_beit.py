"""BEiT (arXiv 2106.08254): block masking, the masked-token cross-entropy, the two-resolution views, the frozen DALL-E
tokenizer and its released pickle, the recipe, and the release against the authors' model.

The authors' model is written out below from microsoft/unilm ``beit/modeling_pretrain.py``
(``VisionTransformerForMaskedImageModeling``) on ``modeling_finetune.py``'s ``Attention`` / ``Block`` /
``RelativePositionBias`` (the same code SimMIM's ViT copies: its test's classes are reused), and DALL-E's encoder from
openai/DALL-E ``dall_e/encoder.py`` / ``utils.py`` with their ``attrs`` classes, pickled under their module names.
"""

import math
import os
import sys
import types
import warnings
from collections import OrderedDict
from functools import partial

import attr
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import build, perturb_, relative_error
from PIL import Image
from safetensors.torch import save_file
from test_simmim import AuthorsBlock, AuthorsRelativePositionBias
from torch import nn

import sslhub
from sslhub.batch import Batch, Sample
from sslhub.configuration import SSLConfig
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError
from sslhub.export import export_transformers
from sslhub.methods.beit import BEIT_VIT, BEiTHparams
from sslhub.modeling import SSLForPreTraining
from sslhub.registry import get_pretrained
from sslhub.tokenizers import DalleEncoder, map_pixels
from sslhub.training import PretrainArguments, Pretrainer

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "beit_vit_tiny_patch4_32px"
TINY_VIT = {**BEIT_VIT, "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
TOKENIZER = {"tokenizer_hidden": 8, "tokenizer_blocks_per_group": 1, "vocab_size": 64}
TINY = {"backbone_kwargs": TINY_VIT, **TOKENIZER, "tokenizer_path": "random"}


def pil_image(size=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def pixels(image):
    """``ToTensor``: (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255


# ---- the authors' model ----------------------------------------------------------------------------------------
class AuthorsBEiT(nn.Module):
    """``VisionTransformerForMaskedImageModeling`` (shared relative position bias, no absolute position embedding,
    layer scale): its names, ``forward(x, bool_masked_pos, return_all_tokens)``."""

    def __init__(self, img_size, patch, dim, depth, heads, vocab):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.rel_pos_bias = AuthorsRelativePositionBias(img_size // patch, heads)
        self.blocks = nn.ModuleList(AuthorsBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab)

    def forward_features(self, x, bool_masked_pos):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        w = bool_masked_pos.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(x.shape[0], x.shape[1], -1) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        bias = self.rel_pos_bias()
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)

    def forward(self, x, bool_masked_pos, return_all_tokens=False):
        x = self.forward_features(x, bool_masked_pos)[:, 1:]
        return self.lm_head(x) if return_all_tokens else self.lm_head(x[bool_masked_pos])


def save_beit_file(path, model):
    """``utils.save_model``'s container."""
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 799, "scaler": {}}, path)


def dall_e_modules():
    """openai/DALL-E's ``dall_e.utils.Conv2d``, ``dall_e.encoder.EncoderBlock`` and ``Encoder`` (attrs classes, their
    attribute names), as modules named ``dall_e.utils`` / ``dall_e.encoder`` (for ``sys.modules`` while pickling)."""
    utils, encoder = types.ModuleType("dall_e.utils"), types.ModuleType("dall_e.encoder")

    @attr.s(eq=False)
    class Conv2d(nn.Module):
        n_in: int = attr.ib()
        n_out: int = attr.ib()
        kw: int = attr.ib()
        use_float16: bool = attr.ib(default=True)
        device: torch.device = attr.ib(default=torch.device("cpu"))
        requires_grad: bool = attr.ib(default=False)

        def __attrs_post_init__(self):
            super().__init__()
            w = torch.empty((self.n_out, self.n_in, self.kw, self.kw)).normal_(
                std=1 / math.sqrt(self.n_in * self.kw**2)
            )
            self.w, self.b = nn.Parameter(w), nn.Parameter(0.1 * torch.randn(self.n_out))  # trained: nonzero bias

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    @attr.s(eq=False, repr=False)
    class EncoderBlock(nn.Module):
        n_in: int = attr.ib()
        n_out: int = attr.ib()
        n_layers: int = attr.ib()
        device: torch.device = attr.ib(default=None)
        requires_grad: bool = attr.ib(default=False)

        def __attrs_post_init__(self):
            super().__init__()
            self.n_hid = self.n_out // 4
            self.post_gain = 1 / (self.n_layers**2)
            conv = partial(Conv2d, device=self.device, requires_grad=self.requires_grad)
            self.id_path = conv(self.n_in, self.n_out, 1) if self.n_in != self.n_out else nn.Identity()
            self.res_path = nn.Sequential(
                OrderedDict(
                    [
                        ("relu_1", nn.ReLU()),
                        ("conv_1", conv(self.n_in, self.n_hid, 3)),
                        ("relu_2", nn.ReLU()),
                        ("conv_2", conv(self.n_hid, self.n_hid, 3)),
                        ("relu_3", nn.ReLU()),
                        ("conv_3", conv(self.n_hid, self.n_hid, 3)),
                        ("relu_4", nn.ReLU()),
                        ("conv_4", conv(self.n_hid, self.n_out, 1)),
                    ]
                )
            )

        def forward(self, x):
            return self.id_path(x) + self.post_gain * self.res_path(x)

    @attr.s(eq=False, repr=False)
    class Encoder(nn.Module):
        group_count: int = 4
        n_hid: int = attr.ib(default=256)
        n_blk_per_group: int = attr.ib(default=2)
        input_channels: int = attr.ib(default=3)
        vocab_size: int = attr.ib(default=8192)
        device: torch.device = attr.ib(default=torch.device("cpu"))
        requires_grad: bool = attr.ib(default=False)
        use_mixed_precision: bool = attr.ib(default=True)

        def __attrs_post_init__(self):
            super().__init__()
            blocks, n = range(self.n_blk_per_group), self.n_hid
            block = partial(EncoderBlock, n_layers=self.group_count * self.n_blk_per_group, device=self.device)

            def group(n_in, n_out, pool=True):
                layers = [(f"block_{i + 1}", block(n_in if i == 0 else n_out, n_out)) for i in blocks]
                return nn.Sequential(OrderedDict(layers + ([("pool", nn.MaxPool2d(kernel_size=2))] if pool else [])))

            self.blocks = nn.Sequential(
                OrderedDict(
                    [
                        ("input", Conv2d(self.input_channels, n, 7)),
                        ("group_1", group(n, n)),
                        ("group_2", group(n, 2 * n)),
                        ("group_3", group(2 * n, 4 * n)),
                        ("group_4", group(4 * n, 8 * n, pool=False)),
                        (
                            "output",
                            nn.Sequential(
                                OrderedDict(
                                    [
                                        ("relu", nn.ReLU()),
                                        ("conv", Conv2d(8 * n, self.vocab_size, 1, use_float16=False)),
                                    ]
                                )
                            ),
                        ),
                    ]
                )
            )

        def forward(self, x):
            return self.blocks(x)

    for cls, module in ((Conv2d, utils), (EncoderBlock, encoder), (Encoder, encoder)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    return utils, encoder


@pytest.fixture
def pickled_dall_e(monkeypatch, tmp_path):
    """``save(obj, name, **kwargs)``: ``torch.save`` an object built with DALL-E's classes while ``dall_e`` is
    importable; afterwards it is not (as for a user without the package)."""
    utils, encoder = dall_e_modules()
    package = types.ModuleType("dall_e")
    package.utils, package.encoder = utils, encoder

    def save(make, name, **kwargs):
        with monkeypatch.context() as patch:
            for module in (package, utils, encoder):
                patch.setitem(sys.modules, module.__name__, module)
            obj = make(encoder)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy format cannot find the classes' source file
                torch.save(obj, tmp_path / name, **kwargs)
        return obj, tmp_path / name

    return save


# ---- masking, loss, views ------------------------------------------------------------------------------------------
def base_method():
    """The ``beit_base_patch16_224`` objective built on the meta device (shapes and settings, no weights)."""
    with torch.device("meta"):
        return SSLForPreTraining(SSLConfig.from_preset("beit_base_patch16_224", tokenizer_path="random")).method


def test_block_masks_follow_algorithm_1_with_the_pretraining_defaults():
    generator = base_method().block_masks
    assert (generator.height, generator.width, generator.min_num_patches) == (14, 14, 16)
    assert generator.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    torch.manual_seed(0)
    counts = [int(generator(75).sum()) for _ in range(200)]
    assert max(counts) <= 75 and np.mean(counts) > 72  # ~40 % of 196, blocks placed until 75 or no room
    tiny = build(PRESET, **TINY).method
    mask = tiny.draw_mask()
    assert mask.shape == (8, 8) and mask.dtype == torch.bool and int(mask.sum()) <= 25


def test_loss_is_cross_entropy_of_the_tokens_of_the_masked_patches_only():
    method = build(PRESET, **TINY).method.eval()
    gen = torch.Generator().manual_seed(1)
    images, token_images = torch.randn(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 1:4, 2:5] = mask[1, 5:8, 0:2] = True
    with torch.no_grad():
        loss = method(Batch.of([images, token_images], mask=mask)).loss
        logits = method.mim_logits(images, mask, all_tokens=True)  # (B, 64, vocab)
        tokens = method.tokenizer(token_images).argmax(dim=1)  # (B, 8, 8): the tokenizer's argmax per patch
    terms = [
        -torch.log_softmax(logits[b, y * 8 + x], dim=0)[tokens[b, y, x]]
        for b in range(2)
        for y in range(8)
        for x in range(8)
        if mask[b, y, x]
    ]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert len(terms) == 15


def test_views_are_one_crop_at_two_sizes_with_the_same_flip():
    method = build(PRESET, **TINY, color_jitter=0.0, crop_scale_min=1.0).method  # crop = the whole image
    recipe = method.view_recipe()
    image = pil_image(48)
    plain, flipped = image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        views = recipe(image)
        assert views.views[0].shape == (3, 32, 32) and views.views[1].shape == (3, 16, 16)
        assert views.extras["mask"].shape == (8, 8)
        for name, source in (("plain", plain), ("flipped", flipped)):
            tokens = map_pixels(pixels(source.resize((16, 16), Image.LANCZOS)))
            patches = pixels(source.resize((32, 32), Image.BICUBIC))
            if torch.allclose(views.views[1], tokens, atol=1e-6):
                torch.testing.assert_close(views.views[0], (patches - 0.5) / 0.5)  # mean / std 0.5, same flip
                seen.add(name)
    assert seen == {"plain", "flipped"}
    batch = recipe.collate([Sample(i, views.views, extras=views.extras) for i in range(3)])
    assert [v.shape for v in batch.views] == [(3, 3, 32, 32), (3, 3, 16, 16)] and batch.extras["mask"].shape == (
        3,
        8,
        8,
    )


# ---- the recipe ----------------------------------------------------------------------------------------------------
def test_defaults_follow_run_beit_pretraining_and_the_readme():
    hp = BEiTHparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.betas, hp.weight_decay) == (
        "adamw",
        1.5e-3,
        2048,
        (0.9, 0.999),
        0.05,
    )
    assert (hp.warmup_epochs, hp.min_lr, hp.clip_grad, hp.epochs, hp.drop_path_rate) == (10, 1e-5, 3.0, 800, 0.1)
    assert (hp.num_mask_patches, hp.min_mask_patches_per_block, hp.max_mask_patches_per_block) == (75, 16, None)
    assert (hp.second_input_size, hp.train_interpolation, hp.second_interpolation) == (112, "bicubic", "lanczos")
    assert (hp.crop_scale_min, hp.color_jitter, hp.vocab_size, hp.tokenizer_hidden) == (0.08, 0.4, 8192, 256)
    method = base_method()
    config, vit = method.config, method.encoder.backbone
    assert list(config.image_mean) == list(config.image_std) == [0.5, 0.5, 0.5]  # IMAGENET_INCEPTION_* for 22k
    assert config.method_kwargs["epochs"] == 150  # the ImageNet-22k command: 10k warm-up steps of 6932 per epoch
    assert config.method_kwargs["warmup_epochs"] == pytest.approx(10_000 / 6932)
    assert (
        vit.pos_embed is None
        and vit.rel_pos_bias is not None
        and vit.blocks[0].attn.relative_position_bias_table is None
    )
    assert vit.norm.eps == 1e-6 and vit.blocks[0].attn.q_bias is not None and vit.blocks[0].gamma_1 is not None
    assert method.lm_head.out_features == 8192 and tuple(method.tokenizer(torch.rand(1, 3, 112, 112)).shape) == (
        1,
        8192,
        14,
        14,
    )
    tiny = build(PRESET, **TINY).method
    tiny_vit = tiny.encoder.backbone
    assert torch.allclose(tiny_vit.blocks[0].gamma_1, torch.tensor(0.1))  # layer scale 0.1
    for tensor in (tiny.mask_token, tiny_vit.cls_token, tiny.lm_head.weight, tiny_vit.blocks[0].mlp.fc1.weight):
        assert tensor.abs().max() <= 0.02  # trunc_normal_(std=0.02, a=-std, b=std)
    fc1 = tiny_vit.blocks[0].mlp.fc1.weight
    assert 0.008 < float(fc1.detach().std()) < 0.0125  # a normal cut at ±1 std keeps 0.54 of its std


def test_optimizer_groups_follow_get_parameter_groups_and_skip_the_tokenizer(image_folder, tmp_path):
    args = PretrainArguments(
        model=PRESET,
        data=str(image_folder),
        output_dir=str(tmp_path),
        batch_size=8,
        knn_every=0,
        log_with=None,
        progress=False,
        overrides=TINY,
    )
    trainer = Pretrainer(args)
    names = {id(p): n for n, p in trainer.method.named_parameters()}
    grouped = {names[id(p)]: g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(name.startswith("tokenizer.") for name in grouped)
    assert grouped["encoder.backbone.cls_token"] == 0 and grouped["encoder.backbone.blocks.0.gamma_1"] == 0
    assert grouped["mask_token"] > 0 and grouped["encoder.backbone.rel_pos_bias.relative_position_bias_table"] > 0
    assert grouped["lm_head.weight"] > 0 and grouped["lm_head.bias"] == 0
    assert trainer.peak_lr == pytest.approx(1.5e-3 * 8 / 2048)


# ---- the tokenizer -------------------------------------------------------------------------------------------------
def test_a_new_pretraining_model_refuses_to_build_without_a_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match=r"encoder\.pkl from https://cdn\.openai\.com/dall-e/encoder\.pkl"):
        sslhub.create_model(PRESET, task="pretraining", backbone_kwargs=TINY_VIT, **TOKENIZER)
    with pytest.raises(CheckpointError, match=f"tokenizer file '{tmp_path / 'none.pkl'}' does not exist.*encoder.pkl"):
        sslhub.create_model(
            PRESET, task="pretraining", backbone_kwargs=TINY_VIT, **TOKENIZER, tokenizer_path=str(tmp_path / "none.pkl")
        )
    assert sslhub.create_model(PRESET, backbone_kwargs=TINY_VIT)  # the released encoder needs no tokenizer


def test_a_safetensors_tokenizer_loads_and_a_wrong_size_is_named(tmp_path):
    torch.manual_seed(3)
    tokenizer = DalleEncoder(8, 1, 64, groups=2)
    save_file(tokenizer.state_dict(), tmp_path / "tokenizer.safetensors")
    model = build(PRESET, **{**TINY, "tokenizer_path": str(tmp_path / "tokenizer.safetensors")})
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(model.method.tokenizer.state_dict()[key], value)
    assert all(not p.requires_grad for p in model.method.tokenizer.parameters())
    with pytest.raises(CheckpointError, match=r"(?s)vocab_size=32\).*wrong shape.*blocks\.output\.conv\.weight"):
        build(PRESET, **{**TINY, "vocab_size": 32, "tokenizer_path": str(tmp_path / "tokenizer.safetensors")})


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dall_e_encoder_pickle_is_read_without_its_code_and_matches_it(pickled_dall_e, legacy):
    torch.manual_seed(0)
    kwargs = {"_use_new_zipfile_serialization": False} if legacy else {}
    authors, path = pickled_dall_e(
        lambda dall_e: dall_e.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=64), "encoder.pkl", **kwargs
    )
    assert "dall_e" not in sys.modules
    overrides = {**TINY, "tokenizer_groups": 4, "second_input_size": 64, "tokenizer_path": str(path)}
    tokenizer = build(PRESET, **overrides).method.tokenizer
    pixels = map_pixels(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        expected = authors(pixels)
        assert relative_error(tokenizer(pixels), expected) < 1e-6
        assert torch.equal(tokenizer.tokens(pixels), expected.argmax(dim=1).flatten(1))
    assert "dall_e" not in sys.modules


class Malicious:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_a_tokenizer_pickle_that_calls_code_is_refused(pickled_dall_e, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, path = pickled_dall_e(
        lambda dall_e: {"encoder": dall_e.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=64), "payload": Malicious()},
        "evil.pkl",
    )
    with pytest.raises(CheckpointError, match=r"refused to load: the pickle names posix\.system"):
        build(PRESET, **{**TINY, "tokenizer_groups": 4, "second_input_size": 64, "tokenizer_path": str(path)})
    torch.save({"payload": Malicious()}, tmp_path / "plain.pkl")
    with pytest.raises(CheckpointError, match=r"refused to load: the pickle calls code \(posix\.system\)"):
        build(PRESET, **{**TINY, "tokenizer_path": str(tmp_path / "plain.pkl")})
    assert not (tmp_path / "pwned").exists()


# ---- the authors' model and the release ----------------------------------------------------------------------------
def authors_tiny(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsBEiT(32, 4, 32, 2, 2, 64).eval()
    path = tmp_path / "checkpoint-799.pth"
    save_beit_file(path, authors)
    return authors, path


def test_authors_file_converts_and_its_encoder_matches_their_model(tmp_path):
    authors, path = authors_tiny(tmp_path)
    assert detect_layout(torch.load(path, weights_only=True)) is get_layout("beit")  # not MAE's timm-named layout
    converted = read_checkpoint(path)
    assert converted.method_overrides == {"vocab_size": 64} and set(converted.method) == {
        "mask_token",
        "lm_head.weight",
        "lm_head.bias",
    }
    assert "rel_pos_bias.relative_position_index (timm computes the same index)" in converted.left_out
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = authors.forward_features(images, torch.zeros(2, 64, dtype=torch.bool))
        released = convert_checkpoint(PRESET, path, backbone_kwargs=TINY_VIT)(images)
    assert relative_error(released.last_hidden_state, expected) < 1e-4
    assert relative_error(released.pooler_output, expected[:, 1:].mean(dim=1)) < 1e-4


def whole_model_from(path, tmp_path):
    """The authors' file converted to the whole BEiT objective, the tokenizer from a file of its own."""
    torch.manual_seed(4)
    tokenizer = DalleEncoder(8, 1, 64, groups=2)
    save_file(tokenizer.state_dict(), tmp_path / "tokenizer.safetensors")
    tiny = {**TINY, "tokenizer_path": str(tmp_path / "tokenizer.safetensors")}
    return convert_checkpoint(PRESET, path, task="pretraining", **tiny), tokenizer


def test_authors_file_converts_to_the_pretraining_model_with_their_masked_token_logits(tmp_path):
    authors, path = authors_tiny(tmp_path)
    model, tokenizer = whole_model_from(path, tmp_path)
    method = model.method
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(method.tokenizer.state_dict()[key], value)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.stack([method.draw_mask(torch.Generator().manual_seed(s)) for s in range(2)])
    with torch.no_grad():
        expected = authors(images, mask.flatten(1))
        assert relative_error(method.mim_logits(images, mask), expected) < 1e-4
        tokens = authors.forward_features(images, mask.flatten(1))
        assert relative_error(method.encode_masked(images, mask).flatten(2).transpose(1, 2), tokens[:, 1:]) < 1e-4


def test_converting_the_pretraining_model_without_a_tokenizer_is_refused(tmp_path):
    _, path = authors_tiny(tmp_path)
    with pytest.raises(CheckpointError, match=r"none was given.*encoder\.pkl"):
        convert_checkpoint(PRESET, path, task="pretraining", **{**TINY, "tokenizer_path": None})


def test_a_wrong_relative_position_index_is_refused(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsBEiT(32, 4, 32, 2, 2, 64)
    authors.rel_pos_bias.relative_position_index.fill_(0)
    save_beit_file(tmp_path / "bad.pth", authors)
    with pytest.raises(CheckpointError, match=r"bad\.pth: rel_pos_bias\.relative_position_index is not BEiT's index"):
        convert_checkpoint(PRESET, tmp_path / "bad.pth", backbone_kwargs=TINY_VIT)


def test_released_tag_builds_beit_base_from_the_authors_file(tmp_path):
    tag = get_pretrained("beit_base_patch16_224.pt22k")
    assert (tag.layout, tag.metrics, tag.license, tag.pretraining_data) == (
        "beit",
        {"finetune": 83.7},
        "mit",
        "imagenet-22k",
    )
    torch.manual_seed(0)
    authors = AuthorsBEiT(224, 16, 768, 12, 12, 8192).eval()
    path = tmp_path / tag.file_name
    save_beit_file(path, authors)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = authors.forward_features(images, torch.zeros(1, 196, dtype=torch.bool))
        released = sslhub.create_model("beit_base_patch16_224.pt22k", pretrained=True, pretrained_path=path)(images)
    assert released.pooler_output.shape == (1, 768)
    assert relative_error(released.last_hidden_state, expected) < 1e-4


def test_card_says_which_feature_the_authors_probe():
    card = str(build(PRESET, **TINY).released_model().model_card())
    assert "pooler_output: the mean of the final-norm patch tokens" in card and "run_linear_eval.py" in card
    assert "arXiv:2106.08254" in card


def hf_beit_config(**overrides):
    """A tiny transformers BEiT of pretraining: shared relative position bias, layer scale, no absolute positions."""
    fields = dict(
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=64,
        use_shared_relative_position_bias=True,
        use_relative_position_bias=False,
        use_absolute_position_embeddings=False,
        layer_scale_init_value=0.1,
        use_mask_token=True,
        layer_norm_eps=1e-6,
    )
    return transformers.BeitConfig(**{**fields, **overrides})


def half_masked(batch=2):
    return (torch.arange(64) % 3 == 0).reshape(8, 8).expand(batch, -1, -1)


def test_a_transformers_beit_for_masked_image_modeling_directory_converts_with_its_logits(tmp_path):
    torch.manual_seed(0)
    hf_model = transformers.BeitForMaskedImageModeling(hf_beit_config()).eval()
    with torch.no_grad():
        perturb_(hf_model, ("beit.", "lm_head."))  # layer scale and the zero-initialised biases become non-trivial
    hf_model.save_pretrained(tmp_path / "hf")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = half_masked()
    method = convert_checkpoint(PRESET, tmp_path / "hf", task="pretraining", **TINY).method
    features = convert_checkpoint(PRESET, tmp_path / "hf", backbone_kwargs=TINY_VIT)
    with torch.no_grad():
        expected = hf_model(images, bool_masked_pos=mask.flatten(1)).logits
        assert relative_error(method.mim_logits(images, mask, all_tokens=True), expected) < 1e-4
        tokens = hf_model.layernorm(hf_model.beit(images).last_hidden_state)
        assert relative_error(features(images).last_hidden_state, tokens) < 1e-4


def test_a_fine_tuned_transformers_beit_with_a_bias_per_block_is_refused(tmp_path):
    config = hf_beit_config(use_relative_position_bias=True, use_shared_relative_position_bias=False)
    transformers.BeitModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="one relative position bias per block"):
        read_checkpoint(tmp_path / "hf")


def test_export_transformers_gives_beit_for_masked_image_modeling_and_beit_model(tmp_path):
    model = build(PRESET, **TINY).eval()
    with torch.no_grad():
        perturb_(model.method, ("encoder.", "mask_token", "lm_head."))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = half_masked()
    export_transformers(model, tmp_path / "mim")
    hf_model = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "mim").eval()
    assert hf_model.config.vocab_size == 64 and hf_model.config.use_shared_relative_position_bias
    export_transformers(model.released_model(), tmp_path / "encoder")
    hf_encoder = transformers.BeitModel.from_pretrained(tmp_path / "encoder", add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = model.method.mim_logits(images, mask, all_tokens=True)
        assert relative_error(hf_model(images, bool_masked_pos=mask.flatten(1)).logits, expected) < 1e-4
        tokens = model.released_model().eval()(images).last_hidden_state
        assert relative_error(hf_encoder(images).last_hidden_state, tokens) < 1e-4
        reread = convert_checkpoint(PRESET, tmp_path / "mim", task="pretraining", **TINY).method
        assert relative_error(reread.mim_logits(images, mask, all_tokens=True), expected) < 1e-6
