"""iBOT (arXiv 2111.07832; bytedance/ibot): the masks, the loss against the paper's formula, the schedules, the teacher,
the gradient edits, the recipe, and the release against the authors' model.

The authors' model is written out below from bytedance/ibot ``models/vision_transformer.py`` (their ViT with
``masked_embed`` replacing the patch embeddings in ``prepare_tokens`` / ``mask_model``), ``models/head.py``
(``iBOTHead``: ``torch.nn.utils.weight_norm`` last layers, ``last_layer2`` the same module when shared), ``utils.py``
(``MultiCropWrapper``: ``backbone.*`` / ``head.*``, DDP's ``module.`` for the student) and
``extract_backbone_weights.py`` (the ``{'state_dict': ...}`` container of ``checkpoint_teacher.pth``).
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build, perturb_, relative_error
from PIL import Image
from scipy import ndimage
from torch import nn

import sslhub
from sslhub.batch import Batch, Sample
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError
from sslhub.methods import TrainingProgress
from sslhub.methods.base import update_momentum_pairs
from sslhub.methods.dinov2 import masked_forward_features
from sslhub.methods.ibot import IBOTHparams, IBOTMasks
from sslhub.registry import get_preset, get_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 4
VIT = {"embed_dim": 48, "depth": 2, "num_heads": 3}  # 32 px, 4 px patches: an 8 x 8 grid
HEAD = {"out_dim": 256, "patch_out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32}
PRESET = "ibot_vit_tiny_patch4_32px"


def build_ibot(**overrides):
    return build(PRESET, **HEAD, local_crops_number=2, backbone_kwargs=VIT, **overrides)


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ibot_views():
    """Two 32 px global crops and two 16 px local crops."""
    x = images(BATCH, 3, 32, 32)
    return [x, x.flip(-1), x[..., 8:24, 8:24], x[..., :16, 16:]]


def some_masks(seed=3):
    """(B, 2, 64) masks: random patches, image 1's first crop unmasked."""
    masks = torch.rand(BATCH, 2, 64, generator=torch.Generator().manual_seed(seed)) < 0.4
    masks[1, 0] = False
    return masks


def progress(epoch, step_in_epoch=0, steps_per_epoch=10, epochs=50):
    return TrainingProgress(epoch * steps_per_epoch + step_in_epoch, epochs * steps_per_epoch, steps_per_epoch)


# ---- the authors' model ---------------------------------------------------------------------------------------------
class AuthorsBlock(nn.Module):
    """``Block``: pre-norm attention and MLP, qkv bias, LayerNorm eps 1e-6, no layer scale (``init_values=0``)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attention(self, x):
        B, N, C = x.shape
        q, k, v = self.attn.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(dim=-1)
        return self.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class AuthorsViT(nn.Module):
    """``VisionTransformer(return_all_tokens=True, masked_im_modeling=...)``: all tokens after the final norm."""

    def __init__(self, img_size=32, patch=4, dim=48, depth=2, heads=3, masked_im_modeling=False):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (img_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(AuthorsBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if masked_im_modeling:
            self.masked_embed = nn.Parameter(0.5 * torch.randn(1, dim))  # trained: no longer zero

    def forward(self, x, mask=None):
        """``prepare_tokens``: patch embedding (B, D, h, w), ``mask_model`` writes ``masked_embed`` at the masked
        (B, h, w) positions, then flatten, class token, position embedding."""
        x = self.patch_embed.proj(x)
        if mask is not None:
            x.permute(0, 2, 3, 1)[mask, :] = self.masked_embed.to(x.dtype)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def weight_normed(in_dim, out_dim):
    with warnings.catch_warnings():  # the deprecated API the authors' files were written with (weight_g / weight_v)
        warnings.simplefilter("ignore", FutureWarning)
        layer = nn.utils.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 1.5)  # norm_last_layer=False: g was trained
    return layer


class AuthorsHead(nn.Module):
    """``iBOTHead(norm=None, act='gelu', nlayers=3)``: ``mlp.{0,2,4}``, ``last_layer`` on the class token and
    ``last_layer2`` on the patch tokens, one module under both names when ``shared_head``."""

    def __init__(self, dim=48, out_dim=256, patch_out_dim=128, shared=True, hidden=64, bottleneck=32):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.last_layer = weight_normed(bottleneck, out_dim)
        self.last_layer2 = self.last_layer if shared else weight_normed(bottleneck, patch_out_dim)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


class AuthorsWrapper(nn.Module):
    """``MultiCropWrapper(backbone, head)``."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head


def extract_backbone_weights(checkpoint_state, with_head):
    """``extract_backbone_weights.py``: ``backbone.`` / ``module.backbone.`` stripped; other keys only with
    ``--with_head``, unchanged."""
    output = {}
    for key, value in checkpoint_state.items():
        if key.startswith("backbone"):
            output[key[9:]] = value
        elif key.startswith("module.backbone"):
            output[key[16:]] = value
        elif with_head:
            output[key] = value
    return {"state_dict": output}


def save_teacher_file(path, teacher, with_head=True):
    torch.save(extract_backbone_weights(teacher.state_dict(), with_head), path)
    return path


# ---- the release ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_teacher_file_converts_and_matches_the_authors_model(tmp_path, shared):
    torch.manual_seed(0)
    authors = AuthorsWrapper(AuthorsViT(), AuthorsHead(shared=shared)).eval()
    path = save_teacher_file(tmp_path / "checkpoint_teacher.pth", authors)
    container = torch.load(path, weights_only=True)
    assert detect_layout(container) is get_layout("ibot_backbone")
    assert {"head.last_layer.weight_v", "head.last_layer2.weight_v"} <= set(container["state_dict"])
    x = images(2, 3, 32, 32, seed=1)
    with torch.no_grad():
        tokens = authors.backbone(x)
        cls_out, patch_out = authors.head(tokens)
        released = convert_checkpoint(PRESET, path, backbone_kwargs=VIT)(x)
        method = convert_checkpoint(PRESET, path, task="pretraining", backbone_kwargs=VIT).method.eval()
        converted_tokens = method.teacher.forward_features(x)
        heads = [
            (head(converted_tokens[:, 0]), head.forward_patches(converted_tokens[:, 1:]))
            for head in (method.teacher_head, method.student_head)
        ]
    assert relative_error(released.pooler_output, tokens[:, 0]) < 1e-4
    assert relative_error(released.last_hidden_state, tokens) < 1e-4
    assert (method.hparams.shared_head, method.hparams.shared_head_teacher) == (shared, shared)
    assert (method.hparams.out_dim, method.hparams.hidden_dim, method.hparams.bottleneck_dim) == (256, 64, 32)
    for cls_logits, patch_logits in heads:
        assert relative_error(cls_logits, cls_out) < 1e-4
        assert relative_error(patch_logits, patch_out) < 1e-4
    assert torch.equal(method.masked_embed, torch.zeros(1, 48)) and not method.center.any()


def test_student_file_gives_the_authors_masked_embedding_before_the_position_embedding(tmp_path):
    """A student under DDP (``module.backbone.*``, ``module.head.*``) with its ``masked_embed``: the converted student
    replaces the masked patch embeddings as the authors' ``prepare_tokens`` does."""
    torch.manual_seed(0)
    authors = AuthorsWrapper(AuthorsViT(masked_im_modeling=True), AuthorsHead()).eval()
    state = {f"module.{key}": value for key, value in authors.state_dict().items()}
    path = tmp_path / "checkpoint_student.pth"
    torch.save(extract_backbone_weights(state, with_head=True), path)
    x = images(2, 3, 32, 32, seed=1)
    mask = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        expected_tokens = authors.backbone(x.clone(), mask)
        expected_cls, expected_patches = authors.head(expected_tokens)
        method = convert_checkpoint(PRESET, path, task="pretraining", backbone_kwargs=VIT).method.eval()
        tokens = masked_forward_features(method.student.backbone, x, mask.flatten(1), method.masked_embed)
        cls_logits, patch_logits = method.student_head(tokens[:, 0]), method.student_head.forward_patches(tokens[:, 1:])
    torch.testing.assert_close(method.masked_embed, authors.backbone.masked_embed)
    assert relative_error(tokens, expected_tokens) < 1e-4
    assert relative_error(cls_logits, expected_cls) < 1e-4 and relative_error(patch_logits, expected_patches) < 1e-4
    without_head = tmp_path / "backbone_only.pth"
    torch.save(extract_backbone_weights(state, with_head=False), without_head)
    assert any("masked_embed" in note for note in read_checkpoint(without_head).left_out)


def test_a_head_without_its_patch_layer_is_refused(tmp_path):
    torch.manual_seed(0)
    file = extract_backbone_weights(AuthorsWrapper(AuthorsViT(), AuthorsHead()).state_dict(), with_head=True)
    del file["state_dict"]["head.last_layer2.weight_g"], file["state_dict"]["head.last_layer2.weight_v"]
    torch.save(file, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth.*head.last_layer2.weight_g"):
        convert_checkpoint(PRESET, tmp_path / "bad.pth", backbone_kwargs=VIT)


def test_released_tags_build_the_vit_from_the_authors_backbone_file(tmp_path):
    small, base = get_pretrained("ibot_vit_small_patch16_224.in1k"), get_pretrained("ibot_vit_base_patch16_224.in1k")
    assert small.metrics == {"knn": 75.2, "linear": 77.9, "finetune": 82.3} and small.epochs == 800
    assert base.metrics == {"knn": 77.1, "linear": 79.5, "finetune": 84.0}
    assert small.url.endswith("/ibot/vits_16/checkpoint_teacher.pth") and base.url.endswith(
        "/vitb_16/checkpoint_teacher.pth"
    )
    assert {small.layout, small.license} == {"ibot_backbone", "apache-2.0"} and small.file_name != base.file_name
    torch.manual_seed(0)
    authors = AuthorsViT(img_size=224, patch=16, dim=384, depth=12, heads=6).eval()
    path = save_teacher_file(tmp_path / small.file_name, AuthorsWrapper(authors, AuthorsHead(dim=384)), with_head=False)
    x = images(1, 3, 224, 224, seed=3)
    with torch.no_grad():
        expected = authors(x)
        released = sslhub.create_model(small.name, pretrained=True, pretrained_path=path)(x)
    assert released.pooler_output.shape == (1, 384)
    assert relative_error(released.last_hidden_state, expected) < 1e-4


# ---- the loss -------------------------------------------------------------------------------------------------------
def plain_masked_tokens(vit, crop, mask, masked_embed):
    """The student's tokens of a masked crop written out: patch embeddings, masked ones replaced, class token, position
    embedding, blocks, final norm."""
    x = vit.patch_embed(crop).reshape(crop.shape[0], -1, vit.embed_dim)
    x = torch.where(mask[..., None], masked_embed, x)
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + vit.pos_embed
    return vit.norm(vit.blocks(x))


def cross_entropy(target_probs, student_logits, student_temp):
    return -(target_probs * F.log_softmax(student_logits / student_temp, dim=-1)).sum(dim=-1)


def test_loss_is_the_papers_formula_and_both_centres_move():
    """``λ1 L_[CLS] + λ2 L_MIM`` written plainly: class tokens over (teacher global crop, other student crop) pairs;
    masked patches averaged per image, then over every image (unmasked ones count 0) and both global crops."""
    overrides = dict(
        lambda1=0.6,
        lambda2=1.7,
        teacher_patch_temp=0.09,
        warmup_teacher_temp_epochs=11,
        center_momentum=0.8,
        patch_center_momentum=0.7,
        drop_path_rate=0.0,
    )
    method = build_ibot(**overrides).method.train()
    perturb_(method, ("student.", "student_head.", "masked_embed"))
    center, center2 = 0.1 * images(1, 256, seed=4), 0.1 * images(1, 1, 256, seed=5)
    method.center.copy_(center)
    method.center2.copy_(center2)
    method.on_step_start(progress(epoch=3))
    views, masks = ibot_views(), some_masks()
    loss = method(Batch.of(views, masks=masks)).loss
    tau, tau_patch = 0.04 + 3 * 0.03 / 10, 0.04 + 3 * 0.05 / 10
    with torch.no_grad():
        teacher_tokens = [method.teacher.backbone.forward_features(v) for v in views[:2]]
        t_cls = [method.teacher_head(t[:, 0]) for t in teacher_tokens]
        t_patch = [method.teacher_head.forward_patches(t[:, 1:]) for t in teacher_tokens]
        student = method.student.backbone
        s_tokens = [plain_masked_tokens(student, views[q], masks[:, q], method.masked_embed) for q in range(2)]
        s_cls = [method.student_head(t[:, 0]) for t in s_tokens]
        s_cls += [method.student_head(student.forward_features(v)[:, 0]) for v in views[2:]]
        s_patch = [method.student_head.forward_patches(t[:, 1:]) for t in s_tokens]
    cls_terms = [
        cross_entropy(F.softmax((t_cls[q] - center) / tau, dim=-1), s_cls[v], 0.1).mean()
        for q in range(2)
        for v in range(4)
        if v != q
    ]
    patch_terms = []
    for q in range(2):
        per_image = []
        for b in range(BATCH):
            m = masks[b, q]
            ce = cross_entropy(F.softmax((t_patch[q][b] - center2[0]) / tau_patch, dim=-1), s_patch[q][b], 0.1)
            per_image.append(ce[m].sum() / m.sum() if m.any() else torch.tensor(0.0))
        patch_terms.append(torch.stack(per_image).mean())
    expected = 0.6 * sum(cls_terms) / len(cls_terms) + 1.7 * sum(patch_terms) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.center, 0.8 * center + 0.2 * torch.cat(t_cls).mean(dim=0, keepdim=True))
    torch.testing.assert_close(method.center2, 0.7 * center2 + 0.3 * torch.cat(t_patch).mean(dim=(0, 1)))
    loss.backward()
    assert method.masked_embed.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in method.named_parameters() if n.startswith(("teacher.", "teacher_head.")))


def test_patch_temperature_and_masking_wait_for_pred_start_epoch():
    """``teacher_temp2_schedule`` with ``mim_start_epoch``; ``get_pred_ratio`` is 0 before it."""
    method = build_ibot(pred_start_epoch=5, warmup_teacher_temp_epochs=10, teacher_patch_temp=0.09).method.eval()
    cls = np.concatenate([np.linspace(0.04, 0.07, 10), np.full(40, 0.07)])
    patch = np.concatenate([np.full(5, 0.04), np.linspace(0.04, 0.09, 10), np.full(35, 0.09)])
    assert [method.teacher_temperature_at(e) for e in range(50)] == pytest.approx(cls.tolist(), abs=1e-9)
    assert [method.teacher_patch_temperature_at(e) for e in range(50)] == pytest.approx(patch.tolist(), abs=1e-9)
    batch = Batch.of(ibot_views(), masks=some_masks())
    with torch.no_grad():
        for epoch, masking in ((4, False), (5, True)):
            method.on_step_start(progress(epoch, step_in_epoch=3))
            assert method.teacher_patch_temperature == pytest.approx(patch[epoch])
            assert (method(batch).metrics["patch_loss"] > 0) is masking


# ---- masks ----------------------------------------------------------------------------------------------------------
def test_prediction_ratios_half_zero_half_uniform_in_01_05():
    """``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: one of {0, U[0.1, 0.5]} per crop."""
    masks, gen = IBOTMasks((14, 14), (0.0, 0.3), (0.0, 0.2), "block"), torch.Generator().manual_seed(0)
    ratios = np.array([masks.ratio(gen) for _ in range(400)])
    assert 160 < (ratios == 0).sum() < 240
    drawn = ratios[ratios > 0]
    assert drawn.min() >= 0.1 and drawn.max() <= 0.5 and abs(drawn.mean() - 0.3) < 0.03
    counts = np.array([int(masks(gen).sum()) for _ in range(100)])
    assert 30 < (counts == 0).sum() < 70 and counts.max() <= 98 and counts[counts > 0].min() >= 4


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_masks_hold_at_most_ratio_times_patches(shape):
    """r = 0.3 of 196 patches: 'rand' masks int(58.8) of them; 'block' adds rectangles up to 58.8 (BEiT)."""
    masks, gen = IBOTMasks((14, 14), (0.3,), (0.0,), shape), torch.Generator().manual_seed(1)
    counts = [int(masks(gen).sum()) for _ in range(30)]
    assert all(mask.shape == (196,) and mask.dtype == torch.bool for mask in [masks(gen)])
    if shape == "rand":
        assert counts == [58] * 30
    else:
        assert max(counts) <= 58 and np.mean(counts) > 45


def test_blocks_are_at_least_a_ninth_of_the_grid_side_squared():
    """``ImageFolderMask``'s ``low = (min(H, W) // 3) ** 2`` (16 patches on 14 x 14): r = 0.3 is made of one or two
    large blocks (1.4 connected regions on average; with 1-patch blocks allowed it would be 3.2)."""
    masks, gen = IBOTMasks((14, 14), (0.3,), (0.0,), "block"), torch.Generator().manual_seed(0)
    regions = [ndimage.label(masks(gen).reshape(14, 14).numpy())[1] for _ in range(60)]
    assert np.mean(regions) < 2.0


def test_view_recipe_adds_the_masks_of_both_global_crops():
    method = build_ibot().method
    recipe = method.view_recipe()
    crops = recipe.crops.transforms
    assert len(crops) == 4 and crops[0].transforms[0].size == (32, 32) and crops[0].transforms[0].scale == (0.25, 1.0)
    assert crops[2].transforms[0].size == (16, 16) and crops[2].transforms[0].scale == (0.05, 0.25)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    views = recipe(image)
    assert [tuple(v.shape) for v in views.views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert views.extras["masks"].shape == (2, 64) and views.extras["masks"].dtype == torch.bool
    batch = recipe.collate([Sample(i, views.views, extras=views.extras) for i in range(BATCH)])
    assert batch.extras["masks"].shape == (BATCH, 2, 64)
    with pytest.raises(ValueError, match=r"expected \(batch, 2, 64\)"):
        method(Batch.of(ibot_views(), masks=torch.zeros(BATCH, 64, dtype=torch.bool)))


# ---- teacher, gradients, recipe -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shared_head", "shared_head_teacher"), [(True, True), (False, True), (False, False)])
def test_teacher_starts_as_the_student_and_is_the_ema_of_the_parameters_both_have(shared_head, shared_head_teacher):
    """``teacher.load_state_dict(student.state_dict(), strict=False)`` then ``train_one_epoch``'s ``names_common``:
    backbone, head MLP and last layer (a shared teacher layer starts as a separate student ``last_layer2`` but follows
    the student's ``last_layer``), ``last_layer2`` when neither head shares it; ``masked_embed`` has no teacher copy."""
    method = build_ibot(shared_head=shared_head, shared_head_teacher=shared_head_teacher).method
    student_head, teacher_head = method.student_head, method.teacher_head
    assert (student_head.last_layer2 is None, teacher_head.last_layer2 is None) == (shared_head, shared_head_teacher)
    torch.testing.assert_close(teacher_head.patch_last_layer.weight_v, student_head.patch_last_layer.weight_v)
    perturb_(method, ("student.", "student_head.", "masked_embed"))
    student = {n: p.detach().clone() for n, p in method.named_parameters() if n.startswith(("student", "masked"))}
    teacher = {n: p.detach().clone() for n, p in method.named_parameters() if n.startswith("teacher")}
    update_momentum_pairs(method.momentum_pairs(), 0.7)
    for name, before in teacher.items():
        source = student[name.replace("teacher", "student", 1)]
        torch.testing.assert_close(dict(method.named_parameters())[name], 0.7 * before + 0.3 * source, msg=name)
    assert not any("masked_embed" in name for name in teacher)


def test_clipping_covers_masked_embed_and_both_last_layers_are_frozen_in_epoch_one():
    """``utils.clip_gradients`` per student parameter (norm 3.0) and ``cancel_gradients_last_layer``: every parameter
    named "last_layer*" during the first epoch."""
    method = build_ibot(shared_head=False).method
    head = method.student_head
    last_layers = [p for layer in (head.last_layer, head.last_layer2) for p in layer.parameters() if p.requires_grad]
    for epoch, frozen in ((0, True), (1, False)):
        for p in method.parameters():
            p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
        method.on_before_optimizer_step(progress(epoch))
        assert float(method.masked_embed.grad.norm()) == pytest.approx(3.0, rel=1e-5)
        assert float(head.mlp[0].weight.grad.norm()) == pytest.approx(3.0, rel=1e-5)
        assert all((p.grad is None) is frozen for p in last_layers) and len(last_layers) == 4


def test_defaults_are_the_readme_vit_s_command_and_the_architecture_the_authors():
    readme = {  # the README's ViT-S/16 command
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 30,
        "norm_last_layer": False,
        "epochs": 800,
        "shared_head": True,
        "out_dim": 8192,
        "local_crops_number": 10,
        "global_crops_scale": (0.25, 1.0),
        "local_crops_scale": (0.05, 0.25),
        "pred_ratio": (0.0, 0.3),
        "pred_ratio_var": (0.0, 0.2),
    }
    main_ibot = {  # main_ibot.py defaults and iBOTLoss constants
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_patch_temp": 0.04,
        "teacher_patch_temp": 0.07,
        "student_temp": 0.1,
        "center_momentum": 0.9,
        "patch_center_momentum": 0.9,
        "shared_head_teacher": True,
        "pred_shape": "block",
        "pred_start_epoch": 0,
        "lambda1": 1.0,
        "lambda2": 1.0,
        "momentum_teacher": 0.996,
        "optimizer": "adamw",
        "lr": 5e-4,
        "lr_batch_size": 256,
        "min_lr": 1e-6,
        "warmup_epochs": 10,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "clip_grad": 3.0,
        "freeze_last_layer": 1,
        "drop_path_rate": 0.1,
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "head_layers": 3,
        "patch_out_dim": 8192,
    }
    hp = IBOTHparams()
    assert {name: getattr(hp, name) for name in {**readme, **main_ibot}} == {**readme, **main_ibot}
    assert get_preset("ibot_vit_base_patch16_224").method_kwargs == {"norm_last_layer": True, "epochs": 400}
    with torch.device("meta"):
        method = sslhub.create_model("ibot_vit_small_patch16_224", task="pretraining").method
    vit, student_head = method.teacher.backbone, method.student_head
    assert vit.norm.eps == 1e-6 and vit.blocks[0].attn.qkv.bias is not None
    assert isinstance(vit.blocks[0].ls1, nn.Identity)  # no layer scale
    assert student_head.mlp[0].weight.shape == (2048, 384) and student_head.mlp[4].weight.shape == (256, 2048)
    assert student_head.last_layer.weight_v.shape == (8192, 256) and student_head.last_layer2 is None
    assert student_head.last_layer.weight_g.requires_grad and not method.teacher_head.last_layer.weight_g.requires_grad
    assert method.masked_embed.shape == (1, 384) and method.local_crop_size() == 96


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pred_ratio_var": (0.0, 0.4)}, "ratio >= var"),
        ({"pred_ratio": (0.3,)}, "one variance per ratio"),
        ({"pred_shape": "grid"}, "pred_shape"),
        ({"use_bn_in_head": True}, "use_bn_in_head"),
        ({"shared_head": False, "patch_out_dim": 128}, "set patch_out_dim = out_dim"),
    ],
)
def test_inconsistent_hyperparameters_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        IBOTHparams(**overrides)


def test_the_teacher_never_sees_the_masks():
    """The teacher runs on the unmasked global crops: its outputs, hence both centre updates, do not depend on the
    masks, while the student's loss does."""
    results = []
    for seed in (3, 4):
        method = build_ibot(drop_path_rate=0.0).method.train()
        loss = method(Batch.of(ibot_views(), masks=some_masks(seed))).loss
        results.append((loss.item(), method.center.clone(), method.center2.clone()))
    (loss_a, center_a, patch_center_a), (loss_b, center_b, patch_center_b) = results
    torch.testing.assert_close(center_a, center_b)
    torch.testing.assert_close(patch_center_a, patch_center_b)
    assert loss_a != pytest.approx(loss_b)
