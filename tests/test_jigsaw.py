"""Jigsaw puzzles (arXiv 1603.09246): the maximal-Hamming permutation set (Algorithm 1) and its reload, the shuffled
tiles and their labels, the per-tile normalisation, the loss written out, VISSL's file converted against its model
written out, files of other methods refused, the releases."""

import itertools

import numpy as np
import pytest
import torch
from helpers import noise_images, random_batch_norm_statistics, recipe_batch, relative_error
from torch import nn
from vissl_models import VisslModel as RotNetVisslModel
from vissl_models import VisslTrunk, vissl_checkpoint

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, load_file_state
from sslhub.methods.context_prediction import PatchGrid
from sslhub.methods.jigsaw import JigsawViews, maximal_hamming_permutations, normalize_tiles
from sslhub.registry import get_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "jigsaw_resnet18_32px"
TINY = {"backbone": "test_resnet", "num_permutations": 10, "tile_dim": 16}


# ---- the permutation set -------------------------------------------------------------------------------------------
def algorithm_1(first: int, count: int) -> np.ndarray:
    """The paper's Algorithm 1 as VISSL writes it (generate_jigsaw_permutations.py, max_avg): take permutation j out
    of the 9! (lexicographic), then j = argmax over the rest of the mean Hamming distance to those taken."""
    rest = np.array(list(itertools.permutations(range(9))))
    chosen, j = [], first
    for _ in range(count):
        chosen.append(rest[j])
        rest = np.delete(rest, j, axis=0)
        distances = (np.stack(chosen)[:, None, :] != rest[None, :, :]).mean(axis=2)  # cdist(..., "hamming")
        j = int(distances.mean(axis=0).argmax())
    return np.stack(chosen)


def test_permutation_set_is_algorithm_1_from_a_seeded_first_permutation():
    permutations = maximal_hamming_permutations(8, seed=3)
    first = list(itertools.permutations(range(9))).index(tuple(permutations[0].tolist()))
    assert np.array_equal(permutations.numpy(), algorithm_1(first, 8))
    assert torch.equal(maximal_hamming_permutations(8, seed=3), permutations)
    assert not torch.equal(maximal_hamming_permutations(8, seed=4), permutations)
    large = maximal_hamming_permutations(100, seed=0)
    assert len({tuple(p) for p in large.tolist()}) == 100 and all(sorted(p) == list(range(9)) for p in large.tolist())
    hamming = (large[:, None, :] != large[None, :, :]).sum(-1)
    assert hamming[~torch.eye(100, dtype=torch.bool)].float().mean() > 8.0  # far apart: 9 would be all different


def test_a_saved_model_carries_its_permutation_set(tmp_path):
    model = sslhub.create_model(PRESET, task="pretraining", **TINY)
    assert torch.equal(model.method.permutations, maximal_hamming_permutations(10, seed=0))
    other = maximal_hamming_permutations(10, seed=7)
    model.method.permutations.copy_(other)  # a set the hyperparameters would not regenerate
    model.save_pretrained(tmp_path)
    loaded = sslhub.SSLForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(loaded.method.permutations, other)
    assert torch.equal(loaded.method.view_recipe().permutations, other)


# ---- the views -----------------------------------------------------------------------------------------------------
def coordinate_image(side: int) -> torch.Tensor:
    """Channel 0 holds each pixel's row, channel 1 its column, channel 2 zeros."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows, cols, torch.zeros_like(rows)]).float()


def test_view_t_is_the_tile_of_the_cell_its_permutation_names():
    grid, permutations = PatchGrid(7, 3, 2), maximal_hamming_permutations(5)
    recipe = JigsawViews(lambda image: image, grid, permutations, tile_normalization=False)
    image = coordinate_image(30)  # 3 cells of 10 px: VISSL's crop of 3 (tile + gap)
    torch.manual_seed(0)
    labels = []
    for _ in range(100):
        made = recipe(image)
        label = int(made.extras["permutation"])
        labels.append(label)
        assert len(made.views) == 9 and all(view.shape == (3, 7, 7) for view in made.views)
        for t, view in enumerate(made.views):
            row, col = divmod(int(permutations[label, t]), 3)  # row-major cells
            top, left = int(view[0, 0, 0]), int(view[1, 0, 0])
            assert 10 * row <= top <= 10 * row + 2 and 10 * col <= left <= 10 * col + 2
            assert torch.equal(view, image[:, top : top + 7, left : left + 7])
    assert set(labels) == set(range(5))


def test_vissl_geometry_is_85px_cells_with_a_64px_tile_at_offsets_0_to_20():
    """VISSL ImgPatchesFromTensor(patch_jitter=21) on a 255 px crop: grid 85, tile 85 - 21, offset randint(0, 21)."""
    grid = PatchGrid(64, 21, 20)
    assert grid.side == 254 <= 255 and 255 // 3 == 64 + 21
    hp = sslhub.create_model("jigsaw_resnet50", task="features").config.method_kwargs
    assert (hp["tile_size"], hp["gap"], hp["jitter"], hp["resize"], hp["num_permutations"]) == (64, 21, 20, 256, 2000)
    torch.manual_seed(1)
    offsets = []
    for _ in range(100):
        for cell, (top, left) in enumerate(grid.corners().tolist()):
            row, col = divmod(cell, 3)
            offsets += [top - 85 * row, left - 85 * col]
    assert min(offsets) == 0 and max(offsets) == 20


def test_recipe_batch_holds_nine_tiles_and_the_permutation_ids():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY)
    batch = recipe_batch(model, noise_images(3, size=32))
    assert len(batch.views) == 9 and all(view.shape == (3, 3, 7, 7) for view in batch.views)
    label = batch.extras["permutation"]
    assert label.shape == (3,) and label.dtype == torch.long and int(label.max()) < 10


def test_each_tile_is_normalised_by_its_own_mean_and_std():
    offsets = torch.arange(9.0)[:, None, None, None]
    tiles = torch.randn(9, 3, 7, 7, generator=torch.Generator().manual_seed(0)) * 3 + offsets
    tiles[4] = 0.5  # a flat tile: no division by zero
    normalised = normalize_tiles(tiles)
    for k in range(9):
        if k != 4:
            expected = (tiles[k] - tiles[k].mean()) / tiles[k].std()
            assert torch.allclose(normalised[k], expected, atol=1e-5)
    assert torch.equal(normalised[4], torch.zeros(3, 7, 7))
    model = sslhub.create_model(PRESET, task="pretraining", tile_normalization=True, **TINY)
    views = recipe_batch(model, noise_images(3, size=32)).views
    assert all(abs(float(v[0].mean())) < 1e-5 and abs(float(v[0].std()) - 1) < 1e-4 for v in views)


# ---- the objective -------------------------------------------------------------------------------------------------
def test_loss_is_the_cross_entropy_of_the_concatenated_tile_features_written_out():
    torch.manual_seed(0)
    model = sslhub.create_model(PRESET, task="pretraining", **TINY).eval()
    method = model.method
    batch = recipe_batch(model, noise_images(3, size=32))
    with torch.no_grad():
        output = model(batch)
        fc, bn = method.tile_fc[0], method.tile_fc[1]
        expected = 0.0
        for image in range(3):
            towers = []
            for view in batch.views:  # input order t = 0..8
                pooled = method.encoder.backbone.forward_features(view[image : image + 1]).mean(dim=(2, 3))[0]
                hidden = fc.weight @ pooled + fc.bias
                hidden = (hidden - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
                towers.append(hidden.clamp_min(0))
            logits = method.head.weight @ torch.cat(towers) + method.head.bias
            expected -= logits.log_softmax(0)[int(batch.extras["permutation"][image])]
    assert output.loss.item() == pytest.approx(expected.item() / 3, rel=1e-5)
    assert 0.0 <= output.metrics["permutation_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="9 shuffled tiles"):
        model(Batch(batch.views[:4], torch.arange(3), extras=batch.extras))


def test_batch_norm_is_not_decayed_as_vissl_regularize_bn_false():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY)
    decayed, exempt = model.method.param_groups()
    names = {id(p): n for n, p in model.method.named_parameters()}
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (1e-4, 0.0)
    assert {"tile_fc.1.weight", "tile_fc.1.bias"} <= {names[id(p)] for p in exempt["params"]}
    assert {"tile_fc.0.bias", "head.weight"} <= {names[id(p)] for p in decayed["params"]}
    (everything,) = sslhub.create_model(PRESET, task="pretraining", decay_batch_norm=True, **TINY).method.param_groups()
    assert everything["weight_decay"] == 1e-4 and len(everything["params"]) == len(list(model.method.parameters()))


# ---- VISSL's model, written out ------------------------------------------------------------------------------------
class VisslBnMLP(nn.Module):
    """vissl/models/heads/mlp.py ``mlp`` with ``dims [in, out], use_bn, use_relu, skip_last_layer_relu_bn False``."""

    def __init__(self, dims):
        super().__init__()
        self.clf = nn.Sequential(nn.Linear(*dims), nn.BatchNorm1d(dims[1]), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.clf(x)


class SiameseConcatView(nn.Module):
    """vissl/models/heads/siamese_concat_view.py: (N * towers) x C -> N x (towers * C)."""

    def forward(self, x):
        return x.view(x.shape[0] // 9, -1)


class VisslJigsaw(nn.Module):
    """BaseSSLMultiInputOutputModel with jigsaw_8gpu_resnet's heads on a (N * 9) tile batch (siamese_collator)."""

    def __init__(self, arch: str, tile_dim: int = 32, permutations: int = 100):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = VisslTrunk(arch)
        width = self.trunk._feature_blocks["layer4"][-1].conv1.in_channels
        last = nn.Module()
        last.clf = nn.Sequential(nn.Linear(9 * tile_dim, permutations))
        self.heads = nn.ModuleList([VisslBnMLP((width, tile_dim)), SiameseConcatView(), last])
        random_batch_norm_statistics(self)
        for bn in (self.heads[0].clf[1],):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, tiles):
        x = self.heads[1](self.heads[0](self.trunk(tiles)))
        return self.heads[2].clf(x)


def test_vissl_file_converts_its_trunk_and_records_the_permutation_count(tmp_path):
    model = VisslJigsaw("resnet18")
    path = tmp_path / "model_final_checkpoint_phase104.torch"
    torch.save(vissl_checkpoint(model), path)
    assert detect_layout(load_file_state(path)) is get_layout("jigsaw_vissl")
    converted = read_checkpoint(path)
    assert converted.method is None and converted.method_overrides == {"num_permutations": 100}
    assert any(entry.startswith("classy_state_dict.base_model.model.heads (not converted") for entry in
               converted.left_out)  # fmt: skip
    assert "classy_state_dict.optimizer (not converted)" in converted.left_out
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = convert_checkpoint(PRESET, path)(images).pooler_output
        assert relative_error(features, model.trunk(images)) < 1e-4
        pretraining = convert_checkpoint(PRESET, path, task="pretraining", tile_dim=32).method
        assert pretraining.head.out_features == 100 and pretraining.permutations.shape == (100, 9)
        assert relative_error(pretraining.encoder(images), model.trunk(images)) < 1e-4


def test_rotnet_and_jigsaw_vissl_files_are_told_apart_by_their_heads(tmp_path):
    jigsaw, rotnet = vissl_checkpoint(VisslJigsaw("resnet18")), vissl_checkpoint(RotNetVisslModel("resnet18"))
    assert detect_layout(jigsaw) is get_layout("jigsaw_vissl")
    assert detect_layout(rotnet) is get_layout("rotnet_vissl")
    with pytest.raises(CheckpointError, match=r"VISSL Jigsaw's heads are .*\('0.clf.0.weight', \(4, 512\)\)"):
        get_layout("jigsaw_vissl").convert(rotnet, "rotnet.torch")
    with pytest.raises(CheckpointError, match="RotNet's VISSL head is"):
        get_layout("rotnet_vissl").convert(jigsaw, "jigsaw.torch")
    heads = jigsaw["classy_state_dict"]["base_model"]["model"]["heads"]
    heads["2.clf.0.weight"] = torch.zeros(100, 8 * 32)  # 8 towers: not this head
    assert not get_layout("jigsaw_vissl").detect(jigsaw)
    with pytest.raises(CheckpointError, match=r"\('2.clf.0.weight', \(100, 256\)\)"):
        get_layout("jigsaw_vissl").convert(jigsaw, "f.torch")


def test_releases_resolve_and_the_perm100_tag_builds_timm_resnet50(tmp_path):
    expected = {
        "in1k_perm100": ("jigsaw_vissl", 48.57, 100, None), "in1k_perm2k": ("jigsaw_vissl", 46.73, 2000, None),
        "in1k_perm10k": ("jigsaw_vissl", 48.11, 10000, None),
        "in22k_perm2k": ("jigsaw_vissl", 44.84, 2000, "imagenet-22k"),
        "in1k_goyal19": ("vissl_trunk", 46.58, 2000, None),
        "in22k_goyal19": ("vissl_trunk", 53.09, 2000, "imagenet-22k"),
        "yfcc100m_goyal19": ("vissl_trunk", 51.37, 2000, "yfcc100m"),
    }  # fmt: skip
    names = set()
    for tag, (layout, linear, count, data) in expected.items():
        release = get_pretrained(f"jigsaw_resnet50.{tag}")
        assert (release.layout, release.metrics, release.pretraining_data) == (layout, {"linear": linear}, data)
        assert release.overrides.get("num_permutations", 2000) == count and get_layout(layout).name == layout
        names.add(release.file_name)
    assert len(names) == len(expected)  # the three phase104 files are kept apart
    model = VisslJigsaw("resnet50", tile_dim=16)
    path = tmp_path / "model_final_checkpoint_phase104.torch"
    torch.save(vissl_checkpoint(model), path)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    released = sslhub.create_model("jigsaw_resnet50.in1k_perm100", pretrained=True, pretrained_path=path)
    with torch.no_grad():
        features = released(images).pooler_output
        assert features.shape == (1, 2048) and relative_error(features, model.trunk(images)) < 1e-4
        tiles = torch.randn(18, 3, 64, 64, generator=torch.Generator().manual_seed(7))
        assert model(tiles).shape == (2, 100)  # the model written out runs VISSL's heads on two puzzles
