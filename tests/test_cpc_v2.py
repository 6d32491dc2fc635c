"""CPC v2 (arXiv 1905.09272) built through ``sslhub.create_model``.

The references are written out here with plain loops: the patch grid as crops at (i * stride, j * stride), the
loss of the paper's Appendix A.2 pseudo-code (every prediction emb_scale * W_k c_ij scored against the target
T z_{i+k,j} and every other target of the batch), and the causality of the masked context network (rows >= r never
reach the context of rows < r).
"""

import numpy as np
import pytest
import torch
from helpers import build
from PIL import Image
from torch import nn

from sslhub.batch import Batch, Sample
from sslhub.methods.cpc_v2 import (
    ContextNetwork,
    CPCv2Hparams,
    augment_patches,
    grid_size,
    patch_grid,
)
from sslhub.registry import get_preset
from sslhub.training import build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = {"backbone": "test_resnet", "context_layers": 1, "context_dim": 8, "target_dim": 8}


def tiny(**overrides):
    return build("cpc_v2_resnet18_32px", **{**TINY, **overrides})


# ---- the patch grid ------------------------------------------------------------------------------------------------
def test_patch_grid_is_the_crops_at_multiples_of_the_stride():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    patches = patch_grid(images, 8, 4)
    assert patches.shape == (2, 7, 7, 3, 8, 8)
    for i in range(7):
        for j in range(7):
            torch.testing.assert_close(patches[:, i, j], images[:, :, i * 4 : i * 4 + 8, j * 4 : j * 4 + 8])
    assert patch_grid(torch.zeros(1, 3, 224, 224), 64, 32).shape == (1, 6, 6, 3, 64, 64)
    assert (grid_size(224, 64, 32), grid_size(256, 64, 32), grid_size(32, 16, 8)) == (6, 7, 3)
    with pytest.raises(ValueError, match="smaller than one 16 px patch"):
        patch_grid(torch.zeros(1, 3, 8, 8), 16, 8)


def test_encoder_encodes_each_patch_alone_and_mean_pools():
    """``last_hidden_state``: z_ij = the backbone's map of patch ij, mean-pooled; ``pooler_output``: the mean of the
    grid. No statistic crosses patches (layer norm): a patch's feature is the same encoded alone."""
    model = tiny()
    released = model.released_model().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    backbone = model.method.encoder.backbone.eval()
    with torch.no_grad():
        output = released(images)
        expected = torch.zeros(2, backbone.num_features, 3, 3)
        for i in range(3):
            for j in range(3):
                patch = images[:, :, i * 8 : i * 8 + 16, j * 8 : j * 8 + 16]
                expected[:, :, i, j] = backbone.forward_features(patch).mean(dim=(2, 3))
        alone = backbone.forward_features(images[:1, :, :16, :16]).mean(dim=(2, 3))
    torch.testing.assert_close(output.last_hidden_state, expected)
    torch.testing.assert_close(output.pooler_output, expected.mean(dim=(2, 3)))
    torch.testing.assert_close(alone[0], expected[0, :, 0, 0])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert all(m.num_groups == 1 for m in backbone.modules() if isinstance(m, nn.GroupNorm))
    assert all(key.startswith("backbone.") for key in model.method.encoder.state_dict())


# ---- context network -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", [1, 2, 4])
def test_context_network_is_causal_in_rows(row):
    """Changing the latents of rows >= r leaves the context of rows < r unchanged (and changes row r itself); the
    gradient of row < r contexts with respect to rows >= r is zero."""
    torch.manual_seed(0)
    network = ContextNetwork(8, 6, 3)
    z = torch.randn(2, 8, 5, 4)
    changed = z.clone()
    changed[:, :, row:] += torch.randn_like(changed[:, :, row:])
    with torch.no_grad():
        before, after = network(z), network(changed)
    torch.testing.assert_close(after[:, :, :row], before[:, :, :row])
    assert not torch.allclose(after[:, :, row], before[:, :, row])
    leaf = z.clone().requires_grad_()
    network(leaf)[:, :, :row].sum().backward()
    assert leaf.grad[:, :, row:].abs().max() == 0 and leaf.grad[:, :, :row].abs().max() > 0


def test_every_direction_predicts_from_its_own_side_only():
    """Each head sees the latent grid turned so that its direction is downwards: the top-down context of row 0 sees
    row 0 only, the bottom-up context of the last row sees the last row only, the left-right context of column 0
    sees column 0 only."""
    method = tiny(directions=4).method
    assert list(method.heads) == ["top_down", "bottom_up", "left_right", "right_left"]
    for name, turns, seen in (("top_down", 0, (0, slice(None))), ("bottom_up", 2, (-1, slice(None))),
                              ("left_right", 3, (slice(None), 0)), ("right_left", 1, (slice(None), -1))):  # fmt: skip
        z = torch.randn(1, method.encoder.num_features, 7, 7, requires_grad=True)
        context = method.heads[name].context(torch.rot90(z, turns, dims=(2, 3)))
        context[:, :, 0].sum().backward()
        outside = torch.ones(7, 7, dtype=torch.bool)
        outside[seen] = False
        assert z.grad[0][:, outside].abs().max() == 0 and z.grad[0][:, ~outside].abs().max() > 0, name


# ---- InfoNCE -------------------------------------------------------------------------------------------------------
def conv1x1(conv, vector):
    return conv.weight[:, :, 0, 0] @ vector + conv.bias


def cpc_loss_by_hand(head, z, emb_scale, offsets):
    """A.2 for one direction, written out: c = context(z); targets t_bij = T z_bij; for each offset k, every image b
    and position (i, j) with i + k < rows: prediction emb_scale * W_k c_bij, positive t_{b,i+k,j}, negatives every
    other target of every image of the batch; the mean over (b, i, j), summed over k."""
    c = head.context(z)
    batch, _, rows, cols = z.shape
    targets = [conv1x1(head.target, z[b, :, i, j]) for b in range(batch) for i in range(rows) for j in range(cols)]
    total = 0.0
    for k, predictor in zip(offsets, head.predictors, strict=True):
        terms = []
        for b in range(batch):
            for i in range(rows - k):
                for j in range(cols):
                    prediction = emb_scale * conv1x1(predictor, c[b, :, i, j])
                    scores = torch.stack([torch.dot(prediction, t) for t in targets])
                    terms.append(torch.logsumexp(scores, dim=0) - scores[(b * rows + i + k) * cols + j])
        total = total + torch.stack(terms).mean()
    return total


@pytest.mark.parametrize(("directions", "steps_to_ignore", "steps_to_predict"), [(1, 2, 3), (4, 0, 2)])
def test_method_loss_is_the_formula_over_directions_offsets_and_positions(directions, steps_to_ignore,
                                                                          steps_to_predict):  # fmt: skip
    """The loss of a batch of images = the sum over directions of ``cpc_loss_by_hand`` on the latent grid turned by
    0°, 180°, 270°, 90° (top-down, bottom-up, left-right, right-left)."""
    grid = {"patch_size": 8, "patch_stride": 4}  # 7 x 7
    method = tiny(directions=directions, steps_to_ignore=steps_to_ignore, steps_to_predict=steps_to_predict, **grid)
    method = method.method.eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    offsets = list(range(steps_to_ignore + 1, steps_to_predict + 1))
    with torch.no_grad():
        loss = method(Batch.of(images)).loss
        z = method.encoder.forward_features(images)
        expected = sum(cpc_loss_by_hand(method.heads[name], torch.rot90(z, turns, dims=(2, 3)), 0.1, offsets)
                       for name, turns in zip(method.heads, (0, 2, 3, 1)[:directions], strict=True))  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_one_adam_step_lowers_the_loss_on_a_fixed_batch():
    method = tiny().method.train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    optimizer = build_optimizer(method, 1e-3)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.0
    before = method(Batch.of(images)).loss
    before.backward()
    moved = {name.split(".")[0] for name, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    assert moved == {"encoder", "heads"}
    assert all(p.grad.abs().sum() > 0 for p in method.heads.parameters())  # context, targets and predictors all learn
    optimizer.step()
    with torch.no_grad():
        after = method(Batch.of(images)).loss
    assert after < before


# ---- views ---------------------------------------------------------------------------------------------------------
def test_patch_augmentations_flip_and_drop_colours_per_patch():
    patches = torch.randn(3, 3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(augment_patches(patches, 0.0, 1.0), patches.flip(-1))
    torch.testing.assert_close(augment_patches(patches, 0.0, 0.0), patches)
    torch.manual_seed(0)
    dropped = augment_patches(patches, 1.0, 0.0)
    kept_channels = set()
    for i in range(3):
        for j in range(3):
            nonzero = [ch for ch in range(3) if dropped[i, j, ch].abs().sum() > 0]
            assert len(nonzero) == 1  # two of the three channels dropped
            torch.testing.assert_close(dropped[i, j, nonzero[0]], patches[i, j, nonzero[0]])
            kept_channels.add(nonzero[0])
    assert len(kept_channels) > 1  # drawn per patch


def test_view_recipe_makes_one_augmented_patch_grid_per_image():
    model = tiny()
    recipe = model.method.view_recipe()
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    torch.manual_seed(0)
    (grid,) = recipe(image).views
    assert grid.shape == (3, 3, 3, 16, 16) and grid.dtype == torch.float32
    assert [t.size for t in recipe.image.transforms[:2]] == [[37], (32, 32)]  # round(32 * 300 / 260), random crop
    plain = tiny(color_drop_p=0.0, flip_p=0.0).method.view_recipe()
    torch.manual_seed(0)
    (unaugmented,) = plain(image).views
    torch.manual_seed(0)
    torch.testing.assert_close(unaugmented, patch_grid(plain.image(image)[None], 16, 8)[0])
    batch = recipe.collate([Sample(0, [grid]), Sample(1, [unaugmented])])
    assert batch.views[0].shape == (2, 3, 3, 3, 16, 16) and len(batch) == 2


# ---- hyperparameters and presets -----------------------------------------------------------------------------------
def test_defaults_and_presets():
    hp = CPCv2Hparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.weight_decay, hp.epochs) == ("adamw", 4e-4, 512, 0.0, 200)
    assert (hp.target_dim, hp.emb_scale, hp.steps_to_ignore, hp.steps_to_predict) == (64, 0.1, 2, 3)  # A.2
    assert (hp.context_layers, hp.context_dim) == (5, 256)  # A.2's pixelCNN
    assert (hp.patch_size, hp.patch_stride, hp.directions, hp.color_drop_p, hp.flip_p) == (64, 32, 2, 1.0, 0.5)
    for name in ("cpc_v2_resnet18", "cpc_v2_resnet50"):
        preset = get_preset(name)
        assert preset.image_size == 256 and preset.backbone_kwargs == {"norm_layer": "groupnorm1"}
    small = get_preset("cpc_v2_resnet18_32px")
    assert small.image_size == 32 and small.backbone_kwargs == {"norm_layer": "groupnorm1"}
    assert grid_size(32, small.method_kwargs["patch_size"], small.method_kwargs["patch_stride"]) == 3
    with pytest.raises(ValueError, match="steps_to_predict 3 needs a grid of more than 3 rows"):
        tiny(steps_to_predict=3)
    with pytest.raises(ValueError, match="below steps_to_predict"):
        CPCv2Hparams(steps_to_ignore=3)
    with pytest.raises(ValueError, match="directions"):
        CPCv2Hparams(directions=5)
