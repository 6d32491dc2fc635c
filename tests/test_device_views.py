"""Views finished batched on the device (``--augment-on``): each batched piece against the CPU piece it replaces,
deferred recipes against the fused views, the parameter distributions, and a pretraining run."""

import numpy as np
import pytest
import torch
from helpers import noise_images, pretrain_silently
from PIL import Image, ImageFilter
from scipy import stats
from torchvision.transforms import v2

import sslhub
from sslhub.data import ImageDataset, ViewDataset
from sslhub.device_views import (
    PARAMETERS,
    DeferredView,
    DeferredViews,
    batched_grayscale,
    batched_jitter,
    batched_kernel_blur,
    batched_pillow_blur,
    batched_solarize,
)
from sslhub.registry import get_method
from sslhub.transforms import (
    PillowGaussianBlur,
    View,
    blur,
    color_distortion,
    flip,
    jitter_colors,
    kernel_blur,
    pil_grayscale,
    solarize,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def crops(count=6, size=32, seed=0) -> torch.Tensor:
    """Uint8 (count, 3, size, size): half noise, half smoothed noise (neighbouring pixels close, as in photos)."""
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, 3, size, size), dtype=np.uint8))
    smooth = torch.nn.functional.avg_pool2d(images[count // 2 :].float(), 5, 1, 2, count_include_pad=False)
    images[count // 2 :] = smooth.round().to(torch.uint8)
    return images


@pytest.mark.parametrize("hue", [0.1, None])
def test_batched_jitter_equals_jitter_colors_per_sample(hue):
    images, generator = crops(), torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(4, generator=generator) for _ in images])
    factors = torch.empty(len(images), 4).uniform_(0.2, 1.8, generator=generator)
    factors[:, 3] = torch.empty(len(images)).uniform_(-0.5, 0.5, generator=generator) if hue else float("nan")
    expected = [
        jitter_colors(image, o.tolist(), *f[:3].tolist(), None if hue is None else f[3].item())
        for image, o, f in zip(images, order, factors, strict=True)
    ]
    assert torch.equal(batched_jitter(images, order, factors), torch.stack(expected))


def test_batched_grayscale_and_solarize_equal_pillow_and_the_lookup():
    images = crops()
    gray = [torch.from_numpy(np.array(Image.fromarray(i.permute(1, 2, 0).numpy()).convert("L"))) for i in images]
    assert torch.equal(batched_grayscale(images), torch.stack(gray)[:, None].expand(-1, 3, -1, -1))
    assert torch.equal(batched_grayscale(images), torch.stack([pil_grayscale(image) for image in images]))
    solarized = torch.where(images >= 128, 255 - images.int(), images.int()).to(torch.uint8)  # written out
    assert torch.equal(batched_solarize(images, 128.0), solarized)


@pytest.mark.parametrize(("size", "sigmas"), [(32, (0.1, 0.7, 1.3, 2.0, 5.0, 11.0)), (6, (0.3, 4.0, 9.0, 40.0))])
def test_batched_pillow_blur_equals_pillow_gaussian_blur(size, sigmas):
    """Pillow's integer box blurs reproduced exactly, up to radii wider than the image (size 6, σ 40)."""
    images = crops(len(sigmas), size)
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    expected = [
        np.array(Image.fromarray(image.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(s.item())))
        for image, s in zip(images, sigma, strict=True)
    ]
    assert torch.equal(batched_pillow_blur(images, sigma), torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))


@pytest.mark.parametrize("kernel_size", [(3, 3), (9, 5), (23, 23)])
def test_batched_kernel_blur_equals_kernel_blur_per_sample(kernel_size):
    images = crops()
    sigma = torch.empty(len(images), 2).uniform_(0.1, 2.0, generator=torch.Generator().manual_seed(2))
    expected = torch.stack([kernel_blur(i, kernel_size, s.tolist()) for i, s in zip(images, sigma, strict=True)])
    torch.testing.assert_close(batched_kernel_blur(images, kernel_size, sigma), expected, atol=1, rtol=0)


def recipe_of(method: str):
    cls = get_method(method)
    model = sslhub.create_model(cls.tiny_preset, task="pretraining", **cls.tiny_overrides)
    return model.method.view_recipe()


@pytest.mark.parametrize("method", ["moco_v2", "byol", "dino", "dinov2"])
def test_deferred_views_applied_batched_equal_the_fused_views(method):
    """Same seeds, same views: Pillow blur (MoCo v2, DINO), kernel blur and solarise (BYOL), multi-crop (DINO),
    masks drawn in the recipe's collate (DINOv2)."""
    recipe = recipe_of(method)
    deferred = DeferredViews(recipe, method)
    images = ImageDataset(noise_images(4, size=40), labels=[0, 1, 0, 1])
    fused, batched = (ViewDataset(images, r, seed=3) for r in (recipe, deferred))
    expected = recipe.collate([fused[i] for i in range(4)])
    raw = deferred.collate([batched[i] for i in range(4)])
    assert all(view.dtype == torch.uint8 for view in raw.views)
    made = deferred.apply(raw)
    assert PARAMETERS not in made.extras and made.extras.keys() == expected.extras.keys()
    for key, value in expected.extras.items():
        assert torch.equal(made.extras[key], value)
    assert torch.equal(made.index, expected.index) and torch.equal(made.labels, expected.labels)
    for actual, view in zip(made.views, expected.views, strict=True):
        torch.testing.assert_close(actual, view, atol=1e-5, rtol=0)


def test_deferred_parameters_follow_the_pieces_distributions():
    """Over 3000 seeded draws: gates open with their p (±4 binomial std), σ uniform in its range (Kolmogorov-
    Smirnov), jitter factors in their ranges, every jitter order a permutation, none drawn when a gate is closed."""
    pieces = [*color_distortion(strength=0.5, p=0.8), blur(p=0.5, sigma=(0.1, 2.0)), solarize(0.2), flip(0.5)]
    deferred = DeferredView(View(pieces, MEAN, STD))
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rows = torch.stack([deferred.defer(image)[1] for _ in range(3000)])
    jitter_on, order, factors = rows[:, 0] > 0, rows[:, 1:5], rows[:, 5:9]
    gray_on, blur_on, sigma, solarize_on, flip_on = rows[:, 9], rows[:, 10] > 0, rows[:, 11], rows[:, 12], rows[:, 13]
    for gate, p in ((jitter_on.float(), 0.8), (gray_on, 0.2), (blur_on.float(), 0.5), (solarize_on, 0.2)):
        assert abs(gate.mean().item() - p) < 4 * (p * (1 - p) / len(rows)) ** 0.5
    assert abs(flip_on.mean().item() - 0.5) < 4 * (0.25 / len(rows)) ** 0.5
    assert torch.equal(order[jitter_on].sort(1).values, torch.arange(4.0).expand(int(jitter_on.sum()), 4))
    on = factors[jitter_on]
    assert on[:, :3].min() >= 0.6 and on[:, :3].max() <= 1.4 and on[:, 3].abs().max() <= 0.1
    assert stats.kstest(on[:, 0].numpy(), stats.uniform(0.6, 0.8).cdf).pvalue > 1e-3
    assert stats.kstest(sigma[blur_on].numpy(), stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    assert factors[~jitter_on].isnan().all()


def test_refuses_recipes_that_are_not_fused_views():
    with pytest.raises(ValueError, match="rotnet's view recipe is not made of fused views"):
        DeferredViews(recipe_of("rotnet"), "rotnet")
    blurred = View([v2.RandomApply([PillowGaussianBlur()], p=0.5)], MEAN, STD)
    with pytest.raises(ValueError, match="takes uint8 crops"):
        DeferredView(blurred).apply(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2))


def test_augment_on_cpu_pretrains_and_resumes_with_the_losses_of_the_cpu_path(image_folder, tmp_path, single_thread):
    """4 steps over 2 epochs with the views made in the workers, against 2 steps with ``augment_on="cpu"`` then a
    resume to step 4: the same losses."""
    run = {"epochs": 2, "batch_size": 16, "knn_every": 0, "data": str(image_folder)}
    workers = pretrain_silently("moco_v2_resnet18_32px", tmp_path / "workers", max_steps=4, **run)
    cut = pretrain_silently("moco_v2_resnet18_32px", tmp_path / "batched", augment_on="cpu", max_steps=2, **run)
    resumed = pretrain_silently(
        "moco_v2_resnet18_32px", tmp_path / "batched", augment_on="cpu", max_steps=4, resume="latest", **run
    )
    assert (workers.steps, cut.steps, resumed.steps) == (4, 2, 4)
    np.testing.assert_allclose(cut.losses + resumed.losses, workers.losses, rtol=1e-5)


def test_augment_on_refuses_methods_without_fused_views_and_cuda_without_gpu(image_folder, tmp_path):
    with pytest.raises(ValueError, match="rotnet's view recipe"):
        pretrain_silently("rotnet_resnet18_32px", tmp_path / "rotnet", data=str(image_folder), augment_on="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--augment-on cuda needs a GPU"):
            pretrain_silently("moco_v2_resnet18_32px", tmp_path / "moco", data=str(image_folder), augment_on="cuda")
