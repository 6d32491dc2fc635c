"""DINOv2 (arXiv 2304.07193): its losses, block masking, the objective built by ``create_model``, a short pretraining
run, and the official releases (authors' backbone files, transformers ``Dinov2Model`` directories).

Loss references are the official code's algorithms written out with loops in numpy / float64; method tests recompute
what the objective should feed the (separately tested) loss functions from its own networks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from torch import nn

import sslhub
from sslhub.batch import Batch, Sample
from sslhub.conversion.convert import convert_checkpoint
from sslhub.losses import ibot_patch_cross_entropy, koleo_loss, multi_crop_cross_entropy, sinkhorn_knopp
from sslhub.masking import BlockMaskingGenerator, sample_ibot_masks
from sslhub.methods import TrainingProgress
from sslhub.methods.base import update_momentum_pairs
from sslhub.methods.dinov2 import masked_forward_features
from sslhub.registry import get_preset, get_pretrained
from sslhub.training import PretrainArguments, pretrain

BATCH = 4
TINY = "dinov2_vit_tiny_patch4_32px"
SMALL_HEADS = {"out_dim": 64, "ibot_out_dim": 48, "hidden_dim": 32, "bottleneck_dim": 16, "ibot_bottleneck_dim": 16}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def build(**overrides):
    torch.manual_seed(0)
    kwargs = {"backbone_kwargs": {"depth": 2}, **SMALL_HEADS, **overrides}
    return sslhub.create_model(TINY, task="pretraining", **kwargs).method


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dinov2_views():
    """Two 32 px global crops and two 12 px local crops."""
    x = images(BATCH, 3, 32, 32)
    return [x, x.flip(-1), x[..., 4:16, 4:16], x[..., 16:28, 8:20]]


def progress(epoch, step_in_epoch=0, steps_per_epoch=10, epochs=50):
    return TrainingProgress(epoch * steps_per_epoch + step_in_epoch, epochs * steps_per_epoch, steps_per_epoch)


# ---- losses -------------------------------------------------------------------------------------------------------
def reference_sinkhorn(logits: np.ndarray, temperature: float, iterations: int) -> np.ndarray:
    """``DINOLoss.sinkhorn_knopp_teacher`` with explicit row and column sums on Q = exp(g / τ)ᵀ (K x B)."""
    q = np.exp(logits / temperature).T
    prototypes, samples = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(prototypes):
            q[k] = q[k] / q[k].sum() / prototypes
        for b in range(samples):
            q[:, b] = q[:, b] / q[:, b].sum() / samples
    return (q * samples).T


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_knopp_is_the_official_algorithm(gen, iterations):
    logits = torch.randn(6, 5, generator=gen)
    assignments = sinkhorn_knopp(logits, 0.3, iterations)
    np.testing.assert_allclose(np64(assignments), reference_sinkhorn(np64(logits), 0.3, iterations), rtol=1e-5)
    np.testing.assert_allclose(np64(assignments.sum(dim=1)), np.ones(6), rtol=1e-5)


def test_sinkhorn_knopp_spreads_the_batch_over_the_prototypes(gen):
    logits = torch.randn(64, 8, generator=gen) + torch.linspace(0, 3, 8)  # a softmax would favour the last ones
    usage = sinkhorn_knopp(logits, 0.5, iterations=50).sum(dim=0)
    np.testing.assert_allclose(np64(usage), np.full(8, 64 / 8), rtol=1e-3)
    assert F.softmax(logits / 0.5, dim=1).sum(dim=0).std() > 10 * usage.std()


def reference_koleo(features: np.ndarray) -> float:
    """-mean_i log min_{j≠i} ||x_i - x_j|| of the L2-normalised rows."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    nearest = [min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i) for i in range(len(x))]
    return float(-np.mean(np.log(nearest)))


def test_koleo_is_minus_mean_log_nearest_neighbour_distance(gen):
    features = torch.randn(7, 5, generator=gen) * torch.rand(7, 1, generator=gen)  # norms must not matter
    assert koleo_loss(features).item() == pytest.approx(reference_koleo(np64(features)), rel=1e-5)


def test_koleo_gradient_spreads_close_points(gen):
    features = torch.randn(6, 4, generator=gen)
    features[1] = features[0] + 1e-2 * torch.randn(4, generator=gen)
    features.requires_grad_(True)
    koleo_loss(features).backward()
    spread = features.detach() - 0.01 * features.grad
    before = (F.normalize(features[0], dim=0) - F.normalize(features[1], dim=0)).norm()
    after = (F.normalize(spread[0], dim=0) - F.normalize(spread[1], dim=0)).norm()
    assert after > before


def test_ibot_loss_averages_masked_patches_per_image_over_all_images(gen):
    n, length, k, temperature = 4, 6, 5, 0.1
    student = torch.randn(n, length, k, generator=gen)
    teacher = F.softmax(torch.randn(n, length, k, generator=gen), dim=-1)
    masks = torch.zeros(n, length, dtype=torch.bool)
    masks[0, [1, 4]] = True
    masks[2, :] = True
    masks[3, 5] = True  # image 1 is not masked
    loss = ibot_patch_cross_entropy(student[masks], teacher[masks], masks, temperature)
    s, t = np64(student), np64(teacher)
    per_image = []
    for i in range(n):
        terms = []
        for j in range(length):
            if masks[i, j]:
                log_p = s[i, j] / temperature - np.log(np.exp(s[i, j] / temperature).sum())
                terms.append(-(t[i, j] * log_p).sum())
        per_image.append(np.mean(terms) if terms else 0.0)
    assert loss.item() == pytest.approx(np.mean(per_image), rel=1e-5)


# ---- block masking ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_block_masking_shape_and_count(gen, grid):
    blocks = BlockMaskingGenerator(grid, max_num_patches=0.5 * grid[0] * grid[1])
    for target in (0, 5, 12, 24):
        mask = blocks(target, gen)
        assert mask.shape == grid and mask.dtype == torch.bool
        assert mask.sum() <= target and (mask.sum() > 0) == (target > 0)


def test_block_masking_is_made_of_rectangles(gen):
    """One block (target below the minimum area): the masked patches fill their bounding box."""
    mask = BlockMaskingGenerator((10, 10))(3, gen)
    rows, cols = mask.nonzero(as_tuple=True)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and 0 < mask.sum() <= 3


def test_ibot_masks_mask_half_of_the_images_with_ratios_in_bounds(gen):
    num_images, grid = 16, (8, 8)
    blocks = BlockMaskingGenerator(grid, max_num_patches=32)
    positions = set()
    for _ in range(5):
        masks = sample_ibot_masks(num_images, blocks, (0.1, 0.5), 0.5, gen)
        assert masks.shape == (num_images, 64) and masks.dtype == torch.bool
        counts = masks.sum(dim=1)
        assert (counts > 0).sum() == num_images // 2
        bounds = torch.linspace(0.1, 0.5, num_images // 2 + 1)
        # the i-th smallest count is at most the top of the i-th ratio slice
        assert all(c <= int(64 * b) for c, b in zip(counts[counts > 0].sort().values, bounds[1:], strict=True))
        positions.add(tuple(counts.nonzero().flatten().tolist()))
    assert len(positions) > 1  # shuffled over the batch


# ---- the objective ------------------------------------------------------------------------------------------------
def test_mask_token_replaces_exactly_the_masked_patch_embeddings(gen):
    method = build().eval()  # no drop path
    vit = method.student["encoder"].backbone
    with torch.no_grad():
        method.mask_token.normal_(generator=gen)
    x, masks = images(2, 3, 32, 32), torch.rand(2, 64, generator=gen) < 0.3
    with torch.no_grad():
        torch.testing.assert_close(
            masked_forward_features(vit, x, torch.zeros_like(masks), method.mask_token), vit.forward_features(x)
        )
        vit.blocks, vit.norm = nn.Identity(), nn.Identity()  # leaves the embedded tokens
        tokens = masked_forward_features(vit, x, masks, method.mask_token)
        patches = vit.patch_embed(x).flatten(1, 2)
    expected = torch.where(masks.unsqueeze(-1), method.mask_token, patches) + vit.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[:, 1:], expected)


@pytest.mark.parametrize("separate", [False, True])
def test_loss_is_weighted_dino_koleo_and_ibot_on_masked_patches(separate):
    method = build(ibot_separate_head=separate, koleo_loss_weight=0.3, ibot_loss_weight=0.7).eval()  # no drop path
    with torch.no_grad():  # layer scales of 1e-5 would leave every class token almost the same
        for name, param in method.named_parameters():
            if name.endswith("gamma"):
                param.fill_(0.5)
    method.teacher_temperature = 0.05
    views = dinov2_views()
    global_crops = torch.cat(views[:2])
    masks = method.sample_masks(global_crops, torch.Generator().manual_seed(3))
    assert masks.any() and not masks.all()
    out = method(Batch.of(views, masks=masks))

    ibot_head = "ibot_head" if separate else "dino_head"
    with torch.no_grad():
        teacher = method.teacher["encoder"].forward_features(global_crops)
        teacher_cls = sinkhorn_knopp(method.teacher["dino_head"](teacher[:, 0]), 0.05)
        teacher_patches = sinkhorn_knopp(method.teacher[ibot_head](teacher[:, 1:][masks]), 0.05)
        student = masked_forward_features(method.student["encoder"].backbone, global_crops, masks, method.mask_token)
        local = method.student["encoder"].forward_features(torch.cat(views[2:]))[:, 0]
        student_cls = method.student["dino_head"](torch.cat([student[:, 0], local]))
        student_patches = method.student[ibot_head](student[:, 1:])[masks]  # all patches, then the masked ones
    dino = multi_crop_cross_entropy(student_cls.chunk(4), teacher_cls.chunk(2), 0.1)
    koleo = koleo_loss(student[:BATCH, 0]) + koleo_loss(student[BATCH:, 0])
    ibot = ibot_patch_cross_entropy(student_patches, teacher_patches, masks, 0.1)
    assert out.metrics["dino_loss"] == pytest.approx(dino.item(), rel=1e-4)
    assert out.metrics["koleo_loss"] == pytest.approx(koleo.item(), rel=1e-4)
    assert out.metrics["ibot_loss"] == pytest.approx(ibot.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx((dino + 0.3 * koleo + 0.7 * ibot).item(), rel=1e-4)


def test_teacher_momentum_schedule_and_ema(gen):
    """Teacher ← m teacher + (1 - m) student over the backbone and the heads (``update_teacher``), m on a cosine from
    ``momentum_teacher`` to 1, applied by the trainer after each optimizer step with ``momentum_at``; the mask token
    has no teacher copy."""
    method = build(momentum_teacher=0.9)
    at = progress(epoch=20, step_in_epoch=3)
    m = method.momentum_at(at)
    expected = 1 - (1 - 0.9) * (1 + math.cos(math.pi * at.step / at.total_steps)) / 2
    assert m == pytest.approx(expected)
    with torch.no_grad():
        for param in method.student.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    student = {k: v.clone() for k, v in method.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    mask_token = method.mask_token.detach().clone()
    update_momentum_pairs(method.momentum_pairs(), m)
    method.on_step_end(at)
    for key, value in method.teacher.state_dict().items():
        torch.testing.assert_close(value, m * teacher[key] + (1 - m) * student[key], msg=key)
    assert all(torch.equal(v, student[k]) for k, v in method.student.state_dict().items())
    assert torch.equal(method.mask_token, mask_token)


def test_teacher_temperature_warms_up_linearly_per_iteration():
    method = build(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5)
    warmup = 5 * 10  # iterations
    temperatures = [method.teacher_temperature_at(progress(0, step)) for step in range(0, 80, 1)]
    assert temperatures[0] == pytest.approx(0.04) and temperatures[warmup - 1] == pytest.approx(0.07)
    assert temperatures[20] == pytest.approx(0.04 + 0.03 * 20 / (warmup - 1))
    assert all(t == pytest.approx(0.07) for t in temperatures[warmup:])


def test_gradients_clipped_per_student_module_and_last_layers_frozen_in_epoch_one():
    method = build(ibot_separate_head=True, clip_grad=1e-3).train()
    views = dinov2_views()
    masks = method.sample_masks(torch.cat(views[:2]), torch.Generator().manual_seed(0))
    method(Batch.of(views, masks=masks)).loss.backward()
    modules = {
        "backbone": [*method.student["encoder"].parameters(), method.mask_token],
        "dino_head": list(method.student["dino_head"].parameters()),
        "ibot_head": list(method.student["ibot_head"].parameters()),
    }

    def norms():
        return {name: torch.cat([p.grad.flatten() for p in params]).norm().item() for name, params in modules.items()}

    assert all(norm > 1e-3 for norm in norms().values())
    method.on_before_optimizer_step(progress(epoch=1))
    assert norms() == pytest.approx(dict.fromkeys(modules, 1e-3), rel=1e-3)
    assert all(p.grad is not None for head in ("dino_head", "ibot_head") for p in method.student[head].parameters())
    method.on_before_optimizer_step(progress(epoch=0))
    for head in ("dino_head", "ibot_head"):
        assert all(p.grad is None for p in method.student[head].last_layer.parameters())
        assert all(p.grad is not None for p in method.student[head].mlp.parameters())
    assert all(p.grad is not None for p in method.student["encoder"].parameters())


def test_param_groups_layerwise_lr_decay_and_no_decay_rules():
    method = build(layerwise_decay=0.5, patch_embed_lr_mult=0.2, weight_decay=0.04)
    groups = method.param_groups()
    assigned = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(assigned) == sum(len(g["params"]) for g in groups) == len(trainable)  # each once, no teacher
    vit, depth = method.student["encoder"].backbone, 2
    expected = {
        vit.cls_token: (0.5**3, 0.04),
        vit.pos_embed: (0.5**3, 0.04),
        method.mask_token: (0.5**3, 0.04),
        vit.patch_embed.proj.weight: (0.5**3 * 0.2, 0.04),
        vit.patch_embed.proj.bias: (0.5**3 * 0.2, 0.0),
        vit.blocks[0].attn.qkv.weight: (0.5**depth, 0.04),
        vit.blocks[0].norm1.weight: (0.5**depth, 0.0),
        vit.blocks[1].ls1.gamma: (0.5, 0.0),
        vit.blocks[1].mlp.fc1.weight: (0.5, 0.04),
        vit.blocks[1].mlp.fc1.bias: (0.5, 0.0),
        vit.norm.weight: (1.0, 0.0),
        method.student["dino_head"].mlp[0].weight: (1.0, 0.04),
        method.student["dino_head"].last_layer.weight_g: (1.0, 0.04),
    }
    for param, (scale, decay) in expected.items():
        assert assigned[id(param)][0] == pytest.approx(scale) and assigned[id(param)][1] == decay


def test_released_encoder_is_the_teacher_backbone_in_timm_format(gen):
    model = sslhub.create_model(TINY, task="pretraining", backbone_kwargs={"depth": 2}, **SMALL_HEADS)
    with torch.no_grad():
        for param in model.method.teacher.parameters():
            param.add_(torch.randn(param.shape, generator=gen))
    assert model.method.released_encoder is model.method.teacher["encoder"]
    released = model.released_model().encoder.backbone.state_dict()
    teacher = model.method.teacher["encoder"].backbone.state_dict()
    assert released.keys() == teacher.keys()
    assert all(torch.equal(released[k], teacher[k]) for k in teacher)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2, init_values=1)
    vit.load_state_dict(released, strict=True)
    assert {key.split(".")[0] for key in model.method.state_dict()} == {"student", "teacher", "mask_token"}


def test_views_are_two_global_and_eight_local_crops_of_patch_multiples():
    method = build()
    views = method.view_recipe()(Image.new("RGB", (40, 40), (120, 30, 200))).views
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32)] * 2 + [(12, 12)] * 8
    assert build(global_crops_size=224).crop_sizes() == (224, 96)


def test_collate_adds_the_block_masks_of_half_of_the_global_crops_to_the_extras():
    """``collate_data_and_cast``: masks (2B, L) of the global crops, half of them masked, drawn from the samples' seeds
    (the same batch gets the same masks)."""
    recipe = build(local_crops_number=2).view_recipe()
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    samples = [Sample(i, recipe(image).views, seed=i) for i in range(BATCH)]
    batch = recipe.collate(samples)
    masks = batch.extras["masks"]
    assert masks.shape == (2 * BATCH, 64) and masks.dtype == torch.bool
    assert (masks.sum(dim=1) > 0).sum() == BATCH
    assert torch.equal(recipe.collate(samples).extras["masks"], masks)
    assert [tuple(v.shape) for v in batch.views] == [(BATCH, 3, 32, 32)] * 2 + [(BATCH, 3, 12, 12)] * 2


def test_short_pretraining_run(tmp_path):
    result = pretrain(
        PretrainArguments(
            model=TINY,
            data="builtin",
            output_dir=str(tmp_path),
            batch_size=16,
            max_steps=2,
            knn_every=0,
            log_with=None,
            progress=False,
            overrides={"backbone_kwargs": {"depth": 2}, "local_crops_number": 2, **SMALL_HEADS},
        )
    )
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    reloaded = sslhub.from_pretrained(str(tmp_path))
    teacher = result.model.method.teacher["encoder"].backbone.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in reloaded.encoder.backbone.state_dict().items())


# ---- official releases --------------------------------------------------------------------------------------------
def official_dinov2_state(dim: int, depth: int, registers: int, generator: torch.Generator) -> dict:
    """Random weights under the exact names and shapes of ``dinov2_vit*14[_reg4]_pretrain.pth`` (518 px, patch 14)."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + 37 * 37, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        for name, shape in {
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
            "ls1.gamma": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
            "ls2.gamma": (dim,),
        }.items():  # fmt: skip
            shapes[f"blocks.{i}.{name}"] = shape
    return {
        key: torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else 1)
        for key, shape in shapes.items()
    }


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "reg4"])
def test_official_backbone_file_gives_timms_dinov2_features(tmp_path, registers):
    state = official_dinov2_state(384, 12, 4 if registers else 0, torch.Generator().manual_seed(0))
    path = tmp_path / f"dinov2_vits14{'_reg4' if registers else ''}_pretrain.pth"
    torch.save(state, path)
    preset = f"dinov2_vit_small_patch14{'_reg4' if registers else ''}_518"
    model = convert_checkpoint(preset, path, backbone_kwargs={"dynamic_img_size": True})
    name = f"vit_small_patch14{'_reg4' if registers else ''}_dinov2"
    net = timm.create_model(name, num_classes=0, global_pool="", dynamic_img_size=True).eval()
    net.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(dict(state), net))
    x = images(2, 3, 42, 42)
    with torch.no_grad():
        out, expected = model(x), net.forward_features(x)
    assert out.last_hidden_state.shape == (2, 1 + 4 * registers + 9, 384)
    torch.testing.assert_close(out.last_hidden_state, expected)
    torch.testing.assert_close(out.pooler_output, expected[:, 0])


def test_transformers_dinov2_directory_converts_into_the_tiny_preset(tmp_path):
    config = transformers.Dinov2Config(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, mlp_ratio=4, image_size=32, patch_size=4
    )
    torch.manual_seed(0)
    hf_model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():  # move layer scales, norms and biases off their initial values
        for param in hf_model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    hf_model.save_pretrained(tmp_path)
    model = convert_checkpoint(TINY, tmp_path)
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        out, expected = model(x), hf_model(x)

    def relative(actual, reference):
        return ((actual - reference).norm() / reference.norm()).item()

    assert relative(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert relative(out.pooler_output, expected.pooler_output) <= 1e-4


def test_every_official_backbone_is_registered_as_timm_knows_it():
    """The authors' 8 backbones (README), each with timm's ``.lvd142m`` pretrained config for its backbone: the same
    authors' URL, Hub copy, licence and 518 px input."""
    names = sslhub.list_pretrained("dinov2_*")
    assert len(names) == 8 and {name.split(".")[1] for name in names} == {"lvd142m"}
    for name in names:
        tag = get_pretrained(name)
        backbone = get_preset(tag.preset).backbone
        timm_cfg = timm.models.get_pretrained_cfg(f"{backbone}.lvd142m")
        assert (tag.url, tag.hf_hub_id, tag.license) == (timm_cfg.url, timm_cfg.hf_hub_id, timm_cfg.license)
        assert get_preset(tag.preset).image_size == timm_cfg.input_size[-1] == 518
        assert tag.layout == "backbone" and set(tag.metrics) == {"knn", "linear"}
