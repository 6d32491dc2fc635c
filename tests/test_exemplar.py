"""Exemplar-CNN (arXiv 1406.6909): the transformations' magnitudes (§2.1), the surrogate-class loss (§2.2), the
N-way classifier sized by the training set."""

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import sslhub
from sslhub.batch import Batch
from sslhub.data import ImageDataset, ViewDataset
from sslhub.training import PretrainArguments, pretrain
from sslhub.transforms import IMAGENET_PIXEL_PCS, HSVPowerContrast, PCAContrast

pytestmark = pytest.mark.usefixtures("single_thread")

PRESET = "exemplar_resnet18_32px"
TINY = {"num_samples": 10, "hidden_dim": 16}
DRAWS = 300


def tiny_exemplar(**overrides):
    torch.manual_seed(0)
    return sslhub.create_model(PRESET, task="pretraining", **{**TINY, **overrides})


def seeded_draws(transform, image, count=DRAWS):
    outputs = []
    for seed in range(count):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    return outputs


# ---- the transformations (§2.1) ------------------------------------------------------------------------------------
def blob_centres(image: torch.Tensor) -> list[np.ndarray]:
    """Centroids (x, y) of the red and of the green blob."""
    return [np.array([(image[c] * grid).sum() / image[c].sum() for grid in pixel_grid(image)]) for c in (0, 1)]


def pixel_grid(image):
    ys, xs = torch.meshgrid(torch.arange(image.shape[1]), torch.arange(image.shape[2]), indexing="ij")
    return xs.float(), ys.float()


def test_translation_scaling_and_rotation_stay_in_the_papers_ranges():
    """A red blob at the image centre moves only by the translation (≤ 0.2 of 64 px); a green blob 12 px right of it
    turns about the centre by the angle (≤ 20°) and moves away from it by the scale (0.7 - 1.4)."""
    affine = next(t for t in tiny_exemplar().method.transformations().transforms if isinstance(t, v2.RandomAffine))
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[0, 31:34, 31:34] = 255
    image[1, 31:34, 43:46] = 255
    shifts, scales, angles = [], [], []
    for moved in seeded_draws(affine, image.float()):
        red, green = blob_centres(moved)
        arm = green - red
        shifts.append(np.abs(red - 32).max())
        scales.append(np.linalg.norm(arm) / 12)
        angles.append(abs(math.degrees(math.atan2(arm[1], arm[0]))))
    assert max(shifts) <= 0.2 * 64 + 1 and max(shifts) > 0.15 * 64
    assert 0.7 - 0.05 <= min(scales) < 0.8 and 1.3 < max(scales) <= 1.4 + 0.05
    assert max(angles) <= 20 + 2 and max(angles) > 15


def principal_coordinates(image: torch.Tensor) -> torch.Tensor:
    """(3, pixels): each pixel's projection on the principal components."""
    return IMAGENET_PIXEL_PCS.t() @ image.reshape(3, -1)


def test_pca_contrast_multiplies_each_principal_coordinate_by_one_factor_in_half_to_two():
    """Contrast 1: p' = Σ_k f_k (u_k · p) u_k with one f_k per component for all pixels, f_k in [0.5, 2]."""
    generator = torch.Generator().manual_seed(0)
    grey = torch.rand(1, 8, 8, generator=generator) * 0.1 + 0.3
    image = grey + 0.02 * torch.randn(3, 8, 8, generator=generator)  # inside [0, 1] after any factor
    before = principal_coordinates(image)
    factors = []
    for output in seeded_draws(PCAContrast(), image):
        after = principal_coordinates(output)
        f = (after * before).sum(1) / (before * before).sum(1)  # least squares, per component
        expected = sum(f[k] * (IMAGENET_PIXEL_PCS[:, k : k + 1] @ before[k : k + 1]) for k in range(3))
        torch.testing.assert_close(output.reshape(3, -1), expected, atol=1e-4, rtol=0)
        factors.append(f)
    factors = torch.stack(factors)
    assert factors.min() >= 0.5 - 1e-3 and factors.max() <= 2 + 1e-3
    assert factors.min() < 0.55 and factors.max() > 1.8 and not torch.allclose(factors[:, 0], factors[:, 1])
    assert 0.8 < factors.median() < 1.25  # a factor and its inverse equally likely


HSV_PIXELS = [(0, 0, 0), (0.5, 0.5, 0.5), (1, 1, 1), (1, 0, 0), (1, 0.5, 0.5)]  # V 0 / 0.5 / 1; S 0 / 1 / 0.5


def hsv_of(image: torch.Tensor) -> list[tuple[float, float, float]]:
    return [colorsys.rgb_to_hsv(*pixel) for pixel in image.reshape(3, -1).t().tolist()]


def hsv_pixels() -> torch.Tensor:
    return torch.tensor(HSV_PIXELS).t().reshape(3, 1, len(HSV_PIXELS))


def test_hsv_contrast_is_power_then_factor_then_shift_of_saturation_and_value():
    """x' = clamp(a x^p + b) for x = S and V (colorsys as the HSV reference), the hue kept."""
    image = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(1))
    fixed = HSVPowerContrast(powers=(2.0, 2.0), factors=(1.2, 1.2), shifts=(0.05, 0.05))
    for (h0, s0, v0), (h1, s1, v1) in zip(hsv_of(image), hsv_of(fixed(image)), strict=True):
        assert s1 == pytest.approx(min(1, 1.2 * s0**2 + 0.05), abs=1e-4)
        assert v1 == pytest.approx(min(1, 1.2 * v0**2 + 0.05), abs=1e-4)
        if s0 > 0.05:
            assert h1 == pytest.approx(h0, abs=1e-4)


def test_hsv_contrast_draws_power_factor_and_shift_in_the_papers_ranges():
    """Read back from pixels of known S and V: x = 0 gives b, x = 1 gives a + b, x = 0.5 gives a 0.5^p + b."""
    params = {"s": [], "v": []}
    for output in seeded_draws(HSVPowerContrast(), hsv_pixels()):
        (_, _, v_black), (_, _, v_half), (_, s_grey, v_white), (_, s_full, _), (_, s_half, _) = hsv_of(output)
        for name, zero, half, one in (("s", s_grey, s_half, s_full), ("v", v_black, v_half, v_white)):
            if zero > 0 and one < 1:  # unclamped
                a, b = one - zero, zero
                params[name].append((math.log((half - b) / a) / math.log(0.5), a, b))
    for name, values in params.items():
        power, factor, shift = np.array(values).T
        assert len(values) > 50, name
        assert 0.25 - 1e-3 <= power.min() < 0.35 and 3.0 < power.max() <= 4 + 1e-2, name
        assert 0.7 - 1e-3 <= factor.min() < 0.75 and factor.max() <= 1.4 + 1e-3, name
        assert shift.min() > 0 and 0.09 < shift.max() <= 0.1 + 1e-4, name  # b > 0 kept: the positive half


def test_hue_shift_is_within_a_tenth_and_keeps_saturation_and_value():
    jitter = next(t for t in tiny_exemplar().method.transformations().transforms if isinstance(t, v2.ColorJitter))
    red_and_pink = hsv_pixels()[:, :, 3:]
    shifts = []
    for output in seeded_draws(jitter, red_and_pink, 100):
        for (h0, s0, v0), (h1, s1, v1) in zip(hsv_of(red_and_pink), hsv_of(output), strict=True):
            assert (s1, v1) == pytest.approx((s0, v0), abs=1e-4)
            shifts.append((h1 - h0 + 0.5) % 1 - 0.5)
    assert max(abs(s) for s in shifts) <= 0.1 + 1e-4 and min(shifts) < -0.08 and max(shifts) > 0.08


def test_the_recipe_composes_the_papers_transformations_in_order_with_fresh_draws_per_view():
    method = tiny_exemplar(views_per_image=2).method
    kinds = [type(t) for t in method.transformations().transforms]
    order = [v2.RandomAffine, PCAContrast, HSVPowerContrast, v2.ColorJitter, v2.Normalize]
    assert [kinds.index(kind) for kind in order] == sorted(kinds.index(kind) for kind in order)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    sample = ViewDataset(ImageDataset([image]), method.view_recipe(), seed=0)[0]
    assert len(sample.views) == 2 and sample.views[0].shape == (3, 32, 32)
    assert not torch.equal(sample.views[0], sample.views[1])


# ---- the objective (§2.2) ------------------------------------------------------------------------------------------
def test_loss_is_the_cross_entropy_of_every_view_with_its_images_surrogate_class():
    model = tiny_exemplar().eval()  # eval: no dropout, BatchNorm running statistics
    method = model.method
    generator = torch.Generator().manual_seed(2)
    views = [torch.randn(3, 3, 32, 32, generator=generator) for _ in range(2)]
    index = torch.tensor([7, 0, 9])
    with torch.no_grad():
        output = model(Batch(views, index))
        expected = 0.0
        for view in views:
            for image, i in zip(view, index.tolist(), strict=True):  # -<e_i, log f(T x_i)>
                logits = method.classifier(method.head(method.encoder(image[None])))[0]
                expected -= logits[i] - torch.logsumexp(logits, 0)
        expected /= 6
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 <= output.metrics["surrogate_accuracy"] <= 1
    with pytest.raises(IndexError, match="sample index 10 outside the 10 surrogate classes"):
        model(Batch([views[0]], torch.tensor([0, 10, 1])))


def test_head_is_fc_relu_dropout_before_the_n_way_layer():
    method = tiny_exemplar(dropout=0.5).method
    features = torch.randn(64, method.encoder.num_features, generator=torch.Generator().manual_seed(3))
    fc = next(m for m in method.head if isinstance(m, torch.nn.Linear))
    assert (fc.in_features, fc.out_features) == (512, 16)
    assert (method.classifier.in_features, method.classifier.out_features) == (16, 10)
    kept = torch.relu(fc(features)).detach()
    dropped = method.head.train()(features).detach()
    survivors = dropped != 0
    torch.testing.assert_close(dropped[survivors], 2 * kept[survivors])  # inverted dropout, p = 0.5
    assert 0.3 < survivors.sum() / (kept != 0).sum() < 0.7
    torch.testing.assert_close(method.head.eval()(features), kept)
    assert not any(isinstance(m, torch.nn.Linear) for m in tiny_exemplar(hidden_dim=0).method.head)


def test_bind_dataset_sizes_the_classifier_and_saved_models_keep_it(tmp_path):
    model = tiny_exemplar(num_samples=0)
    with pytest.raises(ValueError, match="no classes: set num_samples"):
        model(Batch([torch.randn(2, 3, 32, 32)], torch.arange(2)))
    model.method.bind_dataset(30)
    assert model.method.classifier.out_features == 30 and model.config.method_kwargs["num_samples"] == 30
    model.save_pretrained(tmp_path)
    reloaded = sslhub.from_pretrained(tmp_path, task="pretraining")
    assert torch.equal(reloaded.method.classifier.weight, model.method.classifier.weight)
    reloaded.method.bind_dataset(30)
    with pytest.raises(ValueError, match="30 surrogate classes but the training set has 40"):
        reloaded.method.bind_dataset(40)


def test_pretrainer_gives_every_training_image_its_class(image_folder, tmp_path):
    args = PretrainArguments(
        model=PRESET, data=str(image_folder), output_dir=str(tmp_path), epochs=1, batch_size=16,
        overrides={"hidden_dim": 16}, log_with=None, progress=False, knn_every=0, checkpoint_every=10**6,
    )  # fmt: skip
    result = pretrain(args)
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[0] == pytest.approx(math.log(48), rel=0.1)  # 48 images: chance level at the start
    trained = sslhub.from_pretrained(tmp_path / "pretraining").method
    assert trained.classifier.out_features == 48 and trained.hparams.num_samples == 48


def test_presets_follow_the_papers_recipe():
    method = sslhub.create_model("exemplar_resnet50", task="pretraining").method
    hp = method.hparams
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.sgd_momentum, hp.dropout) == ("sgd", 0.01, 128, 0.9, 0.5)
    assert (hp.translate, tuple(hp.scale), hp.degrees, hp.hue_shift) == (0.2, (0.7, 1.4), 20.0, 0.1)
    assert method.classifier.in_features == 512 and method.encoder.num_features == 2048
    assert sslhub.SSLConfig.from_preset(PRESET).image_size == 32
