"""DeepMIM (arXiv 2303.08817; OliverRensu/DeepMIM): the deep-supervision loss against the equations written out here,
the recipe, and the release against the authors' model.

The authors' model is written out below from ``models_mae.py`` (their names, their container of ``util/misc.py
save_model``): ``MaskedAutoencoderViT`` with timm's ``PatchEmbed`` / ``Block``, four decoders ``decoder_*1..4`` on the
raw outputs of blocks 6, 8, 10 and the final-norm output, predicting CLIP features (DeepMIM-CLIP), and their teacher,
``clip.py``'s ``VisionTransformer`` (OpenAI CLIP's image tower, its names under ``visual.``).
"""

import argparse
from collections import OrderedDict
from functools import partial

import pytest
import torch
from helpers import build, perturb_, relative_error
from safetensors.torch import save_file
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.loading import CheckpointError
from sslhub.methods.deepmim import DeepMIMHparams
from sslhub.registry import get_pretrained
from sslhub.teachers import CLIP_MEAN, CLIP_STD

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

    def forward_decoder(self, k, x, ids_restore):
        x = getattr(self, f"decoder_embed{k}")(x)
        mask_tokens = getattr(self, f"mask_token{k}").repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for block in getattr(self, f"decoder_blocks{k}"):
            x = block(x)
        return getattr(self, f"decoder_pred{k}")(getattr(self, f"decoder_norm{k}")(x))

    @staticmethod
    def forward_loss(pred, teacher_out, mask):
        pred = pred / pred.norm(dim=2, keepdim=True)
        teacher_out = teacher_out / teacher_out.norm(dim=2, keepdim=True)
        loss = 2 - 2 * (pred * teacher_out).sum(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, teacher_out, noise, mask_ratio=0.75):
        """The four losses of ``forward``, with the masking noise given (``random_masking``'s ``torch.rand``)."""
        length = noise.shape[1]
        ids_restore = noise.argsort(dim=1).argsort(dim=1)
        mask = (ids_restore >= int(length * (1 - mask_ratio))).float()
        latents = self.forward_encoder(imgs, noise, mask_ratio)
        return [
            self.forward_loss(self.forward_decoder(k, latent, ids_restore)[:, 1:], teacher_out[:, 1:], mask)
            for k, latent in enumerate(latents, start=1)
        ]


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class AuthorsResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(d_model)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class AuthorsCLIPVisionTransformer(nn.Module):
    """``clip.py VisionTransformer``: ``ln_post`` and ``proj`` on every token (DeepMIM's teacher)."""

    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *[AuthorsResidualAttentionBlock(width, heads) for _ in range(layers)]
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        with torch.no_grad():  # trained norms and biases, not the initial ones
            for module in self.modules():
                if isinstance(module, nn.LayerNorm | nn.MultiheadAttention):
                    for name, p in module.named_parameters():
                        if name.endswith("bias") or isinstance(module, nn.LayerNorm):
                            p.add_(0.1 * torch.randn(p.shape))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x) @ self.proj


def authors_teacher_input(images, mean, std):
    """``engine_pretrain.py``: the student's normalisation undone, CLIP's applied."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    clip_mean, clip_std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images * std + mean - clip_mean) / clip_std


TEACHER = {"teacher_width": 64, "teacher_depth": 2, "teacher_dim": 32}


def save_clip_file(path, clip):
    """A CLIP state dict (``torch.save(model.state_dict())`` of ``clip.load``'s model, or OpenCLIP's file): the
    image tower under ``visual.``, the text tower beside it."""
    state = {f"visual.{key}": value for key, value in clip.state_dict().items()}
    state.update({"token_embedding.weight": torch.randn(10, 8), "text_projection": torch.randn(8, 8)})
    if str(path).endswith(".safetensors"):
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    else:
        torch.save(state, path)


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


def reference_predictions(method, images, noise, supervised):
    """Decoder k on the raw output of block ``supervised[k]``, the last decoder on the final-norm output: their
    predictions for every patch, and the mask (1 = masked)."""
    vit = method.encoder.backbone
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
    masked = torch.ones(batch, length)
    for b in range(batch):
        masked[b, kept[b]] = 0
    decoders = [*method.deep_decoders, method.decoder]
    return [reference_decoder(d, output, kept, length) for d, output in zip(decoders, outputs, strict=True)], masked


def reference_pixel_loss(method, images, noise, supervised):
    """``Σ_k`` of MAE's per-patch-normalised pixel MSE on the masked patches."""
    predictions, masked = reference_predictions(method, images, noise, supervised)
    batch, length = noise.shape
    p, side = method.patch_size, images.shape[-1] // method.patch_size
    patches = images.reshape(batch, 3, side, p, side, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, length, -1)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    return sum((((prediction - target) ** 2).mean(-1) * masked).sum() / masked.sum() for prediction in predictions)


def reference_clip_loss(method, images, noise, supervised, teacher_tokens):
    """``Σ_k`` of ``2 - 2 cos`` between each masked patch's prediction and the teacher's token of that patch."""
    predictions, masked = reference_predictions(method, images, noise, supervised)
    total = 0.0
    for prediction in predictions:
        cosine = torch.nn.functional.cosine_similarity(prediction, teacher_tokens, dim=-1)
        total = total + ((2 - 2 * cosine) * masked).sum() / masked.sum()
    return total


def test_loss_sums_the_pixel_losses_of_the_supervised_blocks_and_the_final_output():
    model = build(PRESET, **SHALLOW)
    perturb_(model.method, ("encoder.", "decoder.", "deep_decoders."))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = model.method(Batch.of([images], noise=noise))
        expected = reference_pixel_loss(model.method, images, noise, (1, 2))
    assert len(model.method.deep_decoders) == 2 and model.method.teacher is None
    torch.testing.assert_close(output.loss, expected)
    assert set(output.metrics) == {"loss_block2", "loss_block3", "loss_final"}
    assert sum(output.metrics.values()) == pytest.approx(float(expected), rel=1e-5)


def test_clip_loss_sums_the_cosine_distances_to_the_teachers_tokens_of_the_masked_patches(tmp_path):
    torch.manual_seed(0)
    clip = AuthorsCLIPVisionTransformer(32, 4, 64, 2, 1, 32).eval()
    save_clip_file(tmp_path / "clip.pth", clip)
    model = build(PRESET, **SHALLOW, **TEACHER, target="clip", teacher_path=str(tmp_path / "clip.pth"))
    perturb_(model.method, ("encoder.", "decoder.", "deep_decoders."))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    config = model.config
    with torch.no_grad():
        output = model.method(Batch.of([images], noise=noise))
        teacher_tokens = clip(authors_teacher_input(images, config.image_mean, config.image_std))[:, 1:]
        expected = reference_clip_loss(model.method, images, noise, (1, 2), teacher_tokens)
    assert model.method.decoder.decoder_pred.out_features == 32
    torch.testing.assert_close(output.loss, expected)
    assert set(output.metrics) == {"loss_block2", "loss_block3", "loss_final"}


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
    assert (hp.target, hp.teacher_width, hp.teacher_depth, hp.teacher_dim) == ("clip", 768, 12, 512)  # CLIP ViT-B/16


# ---- the CLIP teacher ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_name", ["clip.pth", "open_clip_model.safetensors"])
def test_teacher_matches_the_authors_clip_image_tower(tmp_path, file_name):
    torch.manual_seed(0)
    clip = AuthorsCLIPVisionTransformer(32, 4, 128, 2, 2, 32).eval()
    save_clip_file(tmp_path / file_name, clip)
    model = build(PRESET, **SHALLOW, target="clip", teacher_path=str(tmp_path / file_name), teacher_width=128,
                  teacher_depth=2, teacher_dim=32)  # fmt: skip
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    config = model.config
    with torch.no_grad():
        expected = clip(authors_teacher_input(images, config.image_mean, config.image_std))
        actual = model.method.teacher(images)
    assert actual.shape == (2, 65, 32)
    assert relative_error(actual, expected) < 1e-4
    assert "teacher" in model.method.auxiliary_networks()
    assert not any(p.requires_grad for p in model.method.teacher.parameters())


def test_a_teacher_in_timms_names_loads_as_saved(tmp_path):
    """timm's ``vit_base_patch16_clip_224.openai`` file, or a teacher sslhub saved, is in timm's names."""
    first = build(PRESET, **SHALLOW, **TEACHER, target="clip", teacher_path="random")
    perturb_(first.method.teacher, ("vit.",))
    save_file(first.method.teacher.vit.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(1)
    second = sslhub.create_model(PRESET, task="pretraining", **SHALLOW, **TEACHER, target="clip",
                                 teacher_path=str(tmp_path / "model.safetensors"))  # fmt: skip
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(second.method.teacher(images), first.method.teacher(images))


def test_clip_target_without_a_teacher_file_names_the_weights_to_get():
    with pytest.raises(CheckpointError, match=r"teacher_path.*CLIP ViT-B/16.*open_clip_model\.safetensors.*'random'"):
        build(PRESET, target="clip")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_teacher_files_of_other_kinds_are_refused_clearly(tmp_path):
    scripted = torch.jit.script(nn.Linear(2, 2))
    scripted.save(str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(CheckpointError, match=r"ViT-B-16\.pt is a TorchScript archive.*state dict"):
        build(PRESET, **TEACHER, target="clip", teacher_path=str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(CheckpointError, match=r"teacher file .*missing\.pth.* does not exist.*CLIP ViT-B/16"):
        build(PRESET, **TEACHER, target="clip", teacher_path=str(tmp_path / "missing.pth"))
    torch.manual_seed(0)
    save_clip_file(tmp_path / "wide.pth", AuthorsCLIPVisionTransformer(32, 4, 128, 2, 2, 32))
    with pytest.raises(CheckpointError, match=r"(?s)wide\.pth.*teacher_width=64.*patch_embed\.proj\.weight"):
        build(PRESET, **TEACHER, target="clip", teacher_path=str(tmp_path / "wide.pth"))
    save_clip_file(tmp_path / "b16.pth", AuthorsCLIPVisionTransformer(64, 16, 64, 2, 1, 32))
    with pytest.raises(CheckpointError, match=r"b16\.pth: a CLIP image tower of 16 px patches and 16 positions.*4 px"):
        build(PRESET, **TEACHER, target="clip", teacher_path=str(tmp_path / "b16.pth"))


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match=r"target must be one of \('clip', 'pixels'\), got 'hog'"):
        build(PRESET, target="hog")


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


def test_authors_file_converts_to_the_encoder_and_the_clip_decoders(tmp_path):
    torch.manual_seed(0)
    authors = AuthorsDeepMIM(32, 4, 192, 12, 3, 32, 2, clip_dim=32).eval()
    path = tmp_path / "checkpoint-1599.pth"
    save_deepmim_file(path, authors)
    converted = read_checkpoint(path, "deepmim")
    assert "decoder_pos_embed" not in converted.backbone
    assert converted.method_overrides == {"target": "clip", "deep_supervision_blocks": (5, 7, 9),
                                          "decoder_embed_dim": 32, "decoder_depth": 2, "teacher_dim": 32}  # fmt: skip
    assert converted.left_out == ["args (not converted)", "epoch (not converted)", "optimizer (not converted)",
                                  "scaler (not converted)"]  # fmt: skip
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = authors_tokens(authors, images)
        released = convert_checkpoint(PRESET, path, layout="deepmim")(images)
        method = convert_checkpoint(
            PRESET, path, task="pretraining", layout="deepmim", teacher_path="random", **TEACHER
        ).method
        pretraining = method.encoder.backbone.forward_features(images)
        output = method(Batch.of([images], noise=noise))
        authors_losses = authors(images, method.teacher(images), noise)
    assert relative_error(released.last_hidden_state, expected) < 1e-4
    assert relative_error(pretraining, expected) < 1e-4
    assert method.hparams.target == "clip" and len(method.deep_decoders) == 3
    actual = [output.metrics[name] for name in ("loss_block6", "loss_block8", "loss_block10", "loss_final")]
    assert actual == pytest.approx([float(loss) for loss in authors_losses], rel=1e-4)


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
