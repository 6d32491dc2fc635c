"""View recipes: number, size, values and randomness of the views each method trains on."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sslhub.transforms import (
    eval_transform,
    multi_crop_dino,
    single_view_mae,
    two_view_moco_v1,
    two_view_moco_v2,
    two_view_moco_v3,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def find(transform, kind) -> list:
    """Every transform of type ``kind`` inside a (nested) v2 pipeline."""
    found = [transform] if isinstance(transform, kind) else []
    for child in getattr(transform, "transforms", []):
        found += find(child, kind)
    return found


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


def test_moco_v2_gives_two_different_views_of_the_same_shape(image):
    torch.manual_seed(0)
    views = two_view_moco_v2(32, MEAN, STD)(image)
    assert len(views) == 2 and all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert all(type(v) is torch.Tensor for v in views)
    assert not torch.equal(views[0], views[1])


def test_blur_kernel_is_odd_about_a_tenth_of_the_image_and_at_least_3():
    def kernel(size):
        blur = find(two_view_moco_v2(size, MEAN, STD).transforms[0], v2.GaussianBlur)[0]
        assert tuple(blur.sigma) == (0.1, 2.0)
        return tuple(blur.kernel_size)

    assert [kernel(224), kernel(96), kernel(32), kernel(8)] == [(23, 23), (9, 9), (3, 3), (3, 3)]


def test_colour_augmentation_in_moco_but_not_in_mae():
    """A flat colour stays that colour through MAE's crop + flip; MoCo's jitter / grayscale change it."""
    flat = Image.new("RGB", (20, 20), (200, 60, 30))
    expected = normalised([200, 60, 30])[:, None, None].expand(3, 16, 16)
    torch.manual_seed(0)
    mae = [single_view_mae(16, MEAN, STD)(flat)[0] for _ in range(4)]
    moco = [view for _ in range(2) for view in two_view_moco_v2(16, MEAN, STD)(flat)]
    assert all(torch.allclose(view, expected, atol=1e-5) for view in mae)
    assert sum(not torch.allclose(view, expected, atol=0.02) for view in moco) >= 2


def test_dino_multi_crop_sizes_and_asymmetric_global_views(image):
    recipe = multi_crop_dino(32, 16, 4, mean=MEAN, std=STD)
    views = recipe(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert len({v.sum().item() for v in views}) == 6  # independent draws
    global_1, global_2, local = recipe.transforms[:3]
    assert not find(global_1, v2.RandomSolarize) and not find(local, v2.RandomSolarize)
    assert [(t.threshold, t.p) for t in find(global_2, v2.RandomSolarize)] == [(128, 0.2)]
    assert [find(t, v2.RandomApply)[-1].p for t in (global_1, global_2, local)] == [1.0, 0.1, 0.5]  # blur
    crops = find(recipe, v2.RandomResizedCrop)
    assert [c.scale for c in crops[:3]] == [(0.4, 1.0), (0.4, 1.0), (0.05, 0.4)]
    assert {c.interpolation for c in crops} == {v2.InterpolationMode.BICUBIC}
    jitter = find(global_1, v2.ColorJitter)[0]  # DINO lowers saturation to 0.2; MoCo v2 keeps 0.4
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
    )  # fmt: skip
    assert find(two_view_moco_v2(32, MEAN, STD), v2.ColorJitter)[0].saturation == (0.6, 1.4)


def test_moco_v1_views_are_crop_grayscale_jitter_flip_without_blur(image):
    """``main_moco.py`` without ``--aug-plus``: jitter 0.4/0.4/0.4/0.4 always applied, after grayscale (p=0.2)."""
    recipe = two_view_moco_v1(32, MEAN, STD)
    view = recipe.transforms[0]
    crop, gray, jitter, flip = view.transforms[:4]
    assert [type(t) for t in (crop, gray, jitter, flip)] == [
        v2.RandomResizedCrop, v2.RandomGrayscale, v2.ColorJitter, v2.RandomHorizontalFlip
    ]  # fmt: skip
    assert crop.scale == (0.2, 1.0) and gray.p == 0.2
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.4, 0.4)
    )  # fmt: skip
    assert not find(recipe, v2.RandomApply) and not find(recipe, v2.GaussianBlur)
    views = recipe(image)
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 and not torch.equal(views[0], views[1])


def test_moco_v3_views_are_byols_asymmetric_pair(image):
    """facebookresearch/moco-v3 ``main_moco.py``: bilinear crops of scale (0.08, 1), jitter 0.4/0.4/0.2/0.1 (p=0.8),
    grayscale (p=0.2); blur p=1.0 / 0.1, solarise p=0 / 0.2."""
    recipe = two_view_moco_v3(32, MEAN, STD)
    first, second = recipe.transforms
    assert [find(view, v2.RandomApply)[-1].p for view in (first, second)] == [1.0, 0.1]  # blur
    assert not find(first, v2.RandomSolarize)
    assert [(t.threshold, t.p) for t in find(second, v2.RandomSolarize)] == [(128, 0.2)]
    jitter = find(first, v2.ColorJitter)[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
    )  # fmt: skip
    assert [find(view, v2.RandomApply)[0].p for view in (first, second)] == [0.8, 0.8]  # jitter
    assert [find(view, v2.RandomGrayscale)[0].p for view in (first, second)] == [0.2, 0.2]
    crops = find(recipe, v2.RandomResizedCrop)
    assert {(c.scale, v2.InterpolationMode(c.interpolation)) for c in crops} == {
        ((0.08, 1.0), v2.InterpolationMode.BILINEAR)
    }
    views = recipe(image)
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 and not torch.equal(views[0], views[1])


def test_every_recipe_works_on_tiny_images():
    tiny = Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    for recipe in (
        two_view_moco_v1(32, MEAN, STD),
        two_view_moco_v2(32, MEAN, STD),
        two_view_moco_v3(32, MEAN, STD),
        multi_crop_dino(32, 16, 2, mean=MEAN, std=STD),
        single_view_mae(32, MEAN, STD),
    ):
        assert all(v.shape[-2:] in ((32, 32), (16, 16)) and torch.isfinite(v).all() for v in recipe(tiny))


def test_eval_transform_is_one_deterministic_normalised_tensor(image):
    evaluated = eval_transform(32, MEAN, STD)(image)
    assert type(evaluated) is torch.Tensor and evaluated.shape == (3, 32, 32)
    assert torch.equal(evaluated, eval_transform(32, MEAN, STD)(image))
    flat = eval_transform(16, MEAN, STD)(Image.new("RGB", (20, 30), (51, 102, 153)))
    assert torch.allclose(flat, normalised([51, 102, 153])[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_eval_transform_resizes_to_size_over_crop_pct_then_centre_crops():
    assert find(eval_transform(224, MEAN, STD), v2.Resize)[0].size == [256]  # 224 / 0.875
    assert find(eval_transform(32, MEAN, STD), v2.Resize)[0].size == [32]  # tiny images: no crop
    assert find(eval_transform(32, MEAN, STD, crop_pct=0.5), v2.Resize)[0].size == [64]
    # a bright border around a dark centre: the 0.875 crop keeps only the centre
    framed = np.full((256, 256, 3), 255, dtype=np.uint8)
    framed[16:240, 16:240] = 0
    cropped = eval_transform(224, (0, 0, 0), (1, 1, 1))(Image.fromarray(framed))
    assert cropped.shape == (3, 224, 224) and cropped.max() < 0.01
