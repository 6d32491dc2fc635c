"""Learning to count (arXiv 1708.06734): the tiles and the downsampled crop, the random downsampling method, grayscale
batches, eq. 4 written out, its trivial solution, bad batches and hyperparameters, the presets."""

import numpy as np
import pytest
import torch
from helpers import noise_images, recipe_batch
from PIL import Image

import sslhub
from sslhub.batch import Batch
from sslhub.data import ImageDataset, ViewDataset
from sslhub.methods.counting import DOWNSAMPLING, counting_loss, tiles

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "counting_resnet18_32px"
TINY = {"backbone": "test_resnet", "hidden_dims": (16,), "counting_dim": 8}
PIL_FILTERS = [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS, Image.Resampling.BOX]


def normalised(pixels: np.ndarray, config) -> torch.Tensor:
    """(H, W, 3) uint8 -> the normalised (3, H, W) float tensor, written out."""
    values = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    return (values - torch.tensor(config.image_mean)[:, None, None]) / torch.tensor(config.image_std)[:, None, None]


def test_the_four_tiles_are_the_quadrants_row_major():
    image = torch.arange(2 * 6 * 4.0).reshape(2, 6, 4)
    top_left, top_right, bottom_left, bottom_right = tiles(image)
    assert torch.equal(top_left, image[:, :3, :2]) and torch.equal(top_right, image[:, :3, 2:])
    assert torch.equal(bottom_left, image[:, 3:, :2]) and torch.equal(bottom_right, image[:, 3:, 2:])
    with pytest.raises(ValueError, match="even image size"):
        tiles(torch.zeros(3, 5, 4))


def test_views_are_the_downsampled_crop_then_its_tiles_by_the_drawn_method():
    """A 32 px image with the 32 px crop of the 32 px preset at resize 32: the crop is the image itself."""
    model = sslhub.create_model(PRESET, task="pretraining", resize=32, grayscale_p=0.0, **TINY)
    images = noise_images(6, size=32)
    batch = recipe_batch(model, images)
    config = model.config
    assert len(batch.views) == 5 and all(view.shape == (6, 3, 16, 16) for view in batch.views)
    assert batch.extras["grayscale"].tolist() == [False] * 6
    for i, image in enumerate(images):
        whole = normalised(np.array(image), config)
        for j, (top, left) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
            torch.testing.assert_close(batch.views[1 + j][i], whole[:, top : top + 16, left : left + 16])
        method = int(batch.extras["interpolation"][i])
        small = np.array(image.resize((16, 16), PIL_FILTERS[method]))
        torch.testing.assert_close(batch.views[0][i], normalised(small, config), atol=1e-6, rtol=0)


def test_every_downsampling_method_is_drawn_and_each_gives_a_different_image():
    model = sslhub.create_model(PRESET, task="pretraining", grayscale_p=0.0, **TINY)
    batch = recipe_batch(model, noise_images(40, size=36))
    assert set(batch.extras["interpolation"].tolist()) == set(range(len(DOWNSAMPLING)))
    image = noise_images(1, size=32)[0]
    resized = [np.array(image.resize((16, 16), pil_filter)) for pil_filter in PIL_FILTERS]
    assert all(not np.array_equal(resized[a], resized[b]) for a in range(4) for b in range(a + 1, 4))


@pytest.mark.parametrize("grayscale_p", [0.0, 1.0])
def test_a_grayscale_batch_has_the_average_colour_in_every_view(grayscale_p):
    model = sslhub.create_model(PRESET, task="pretraining", grayscale_p=grayscale_p, **TINY)
    batch = recipe_batch(model, noise_images(3, size=40))
    mean, std = torch.tensor(model.config.image_mean), torch.tensor(model.config.image_std)
    assert batch.extras["grayscale"].tolist() == [grayscale_p == 1.0] * 3
    for view in batch.views:
        pixels = view * std[None, :, None, None] + mean[None, :, None, None]  # back to [0, 1]
        channels_equal = torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
        assert channels_equal == (grayscale_p == 1.0) and torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-5) == (
            grayscale_p == 1.0
        )


def test_the_grayscale_draw_is_one_per_batch_and_about_the_papers_two_thirds():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY)
    recipe = model.method.view_recipe()
    dataset = ViewDataset(ImageDataset(noise_images(60, size=36), labels=[0] * 60), recipe, seed=0)
    draws = []
    for start in range(0, 60, 2):
        flags = recipe.collate([dataset[start], dataset[start + 1]]).extras["grayscale"]
        assert flags[0] == flags[1]
        draws.append(bool(flags[0]))
    assert 0.4 < np.mean(draws) < 0.9  # p = 0.67: 30 draws


def eq4_written_out(down, tile_list, margin):
    """The two terms of ℓ = 1/B Σ_i |φ(D x_i) − Σ_j φ(T_j x_i)|² + max{0, M − |φ(D y_i) − Σ_j φ(T_j x_i)|²},
    y_i = x_{i+1 mod B}, each averaged over the batch, and the squared distances to the y_i."""
    batch, dims = down.shape
    positives, negatives = [], []
    for i in range(batch):
        other = (i + 1) % batch
        tile_sum = [sum(float(tile[i, k]) for tile in tile_list) for k in range(dims)]
        positives.append(sum((float(down[i, k]) - tile_sum[k]) ** 2 for k in range(dims)))
        negatives.append(sum((float(down[other, k]) - tile_sum[k]) ** 2 for k in range(dims)))
    hinges = [max(0.0, margin - negative) for negative in negatives]
    return sum(positives) / batch, sum(hinges) / batch, negatives


def test_counting_loss_is_eq_4_written_out_with_some_hinges_active():
    generator = torch.Generator().manual_seed(0)
    down, tile_list = torch.rand(5, 6, generator=generator), list(torch.rand(4, 5, 6, generator=generator) / 2)
    *_, negatives = eq4_written_out(down, tile_list, 0.0)
    margin = float(np.median(negatives))  # the hinge is active for some images and not for others
    positive, hinge, _ = eq4_written_out(down, tile_list, margin)
    terms = counting_loss(down, sum(tile_list), margin)
    assert hinge > 0 and terms["contrastive"].item() == pytest.approx(hinge, rel=1e-6)
    assert terms["equivariance"].item() == pytest.approx(positive, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(positive + hinge, rel=1e-6)


def test_the_method_applies_eq_4_to_the_non_negative_counting_vectors_of_its_views():
    torch.manual_seed(0)
    model = sslhub.create_model(PRESET, task="pretraining", **TINY).eval()
    method = model.method
    generator = torch.Generator().manual_seed(2)
    scales = torch.tensor([0.2, 1.0, 3.0, 6.0])[:, None, None, None]  # images far apart: distinct counts
    views = [torch.randn(4, 3, 16, 16, generator=generator) * scales + scales for _ in range(5)]
    with torch.no_grad():
        counts = [torch.relu(method.head(method.encoder(view))) for view in views]  # φ: the final ReLU
        *_, negatives = eq4_written_out(counts[0], counts[1:], 0.0)
        margin = float(np.median(negatives))
        method.hparams.margin = margin
        output = model(Batch(views, torch.arange(4)))
    assert all((phi >= 0).all() and phi.shape == (4, 8) for phi in counts)
    assert (torch.cat(counts) == 0).any()  # the ReLU is there and cuts
    positive, hinge, _ = eq4_written_out(counts[0], counts[1:], margin)
    assert hinge > 0
    assert output.metrics["equivariance_term"] == pytest.approx(positive, rel=1e-4)
    assert output.metrics["contrastive_term"] == pytest.approx(hinge, rel=1e-4)
    assert output.loss.item() == pytest.approx(positive + hinge, rel=1e-4)


def test_the_trivial_solution_costs_the_margin_and_a_counting_solution_costs_nothing():
    zeros = torch.zeros(4, 5)
    assert counting_loss(zeros, zeros, 10.0)["loss"].item() == pytest.approx(10.0)  # φ = 0: eq. 3's minimum
    counts = 3.0 * torch.eye(4, 5)  # φ(D x) = Σ_j φ(T_j x), images 3 apart in every direction: |Δ|² = 18 > M
    terms = counting_loss(counts, counts.clone(), 10.0)
    assert terms["loss"].item() == 0.0 and terms["contrastive"].item() == 0.0
    near = counting_loss(counts, counts + 0.5, 10.0)  # the counts disagree by 0.5 in each of 5 entries
    assert near["equivariance"].item() == pytest.approx(5 * 0.25)


def test_bad_batches_and_hyperparameters_are_refused():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY)
    views = [torch.zeros(2, 3, 16, 16)] * 5
    with pytest.raises(ValueError, match="5 views"):
        model(Batch(views[:4], torch.arange(2)))
    with pytest.raises(ValueError, match="at least 2 images"):
        model(Batch([view[:1] for view in views], torch.arange(1)))
    with pytest.raises(ValueError, match="smaller than the crop"):
        sslhub.create_model(PRESET, task="pretraining", resize=30, **TINY)
    with pytest.raises(ValueError, match="margin"):
        sslhub.create_model(PRESET, task="pretraining", margin=0.0, **TINY)
    with pytest.raises(ValueError, match="grayscale_p"):
        sslhub.create_model(PRESET, task="pretraining", grayscale_p=1.5, **TINY)


def test_presets_follow_the_paper():
    big = sslhub.create_model("counting_resnet50", task="pretraining").method
    hp = big.hparams
    assert (hp.tile_size, hp.resize, hp.margin, hp.grayscale_p) == (114, 256, 10.0, 0.67)
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.lr_scaling, hp.epochs) == ("adamw", 1e-4, 1024, "sqrt", 250)
    linears = [layer for layer in big.head if isinstance(layer, torch.nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(2048, 4096), (4096, 4096), (4096, 1000)]
    small = sslhub.create_model(PRESET, task="pretraining").method.hparams
    assert (small.tile_size, small.resize) == (16, 36)
