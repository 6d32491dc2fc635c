"""View recipes: number, size and randomness of the views each method trains on."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sslhub.transforms import eval_transform, multi_crop_dino, single_view_mae, two_view_moco_v2

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def find(transform, kind):
    """Every transform of type ``kind`` inside a (nested) v2 pipeline."""
    found = [transform] if isinstance(transform, kind) else []
    for child in getattr(transform, "transforms", []):
        found += find(child, kind)
    return found


def test_moco_v2_two_different_normalised_views(image):
    torch.manual_seed(0)
    views = two_view_moco_v2(32, MEAN, STD)(image)
    assert len(views) == 2 and all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])
    assert views[0].min() < 0  # normalised, not [0, 1]
    blur = find(two_view_moco_v2(224, MEAN, STD).transforms[0], v2.GaussianBlur)[0]
    assert tuple(blur.kernel_size) == (23, 23) and tuple(blur.sigma) == (0.1, 2.0)  # odd, ~10 % of the side
    assert tuple(find(two_view_moco_v2(32, MEAN, STD).transforms[0], v2.GaussianBlur)[0].kernel_size) == (3, 3)


def test_dino_multi_crop_sizes_and_asymmetric_global_views(image):
    recipe = multi_crop_dino(32, 16, 4, mean=MEAN, std=STD)
    views = recipe(image)
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32)] * 2 + [(16, 16)] * 4
    assert not find(recipe.transforms[0], v2.RandomSolarize) and find(recipe.transforms[1], v2.RandomSolarize)
    blur_p = [find(t, v2.RandomApply)[-1].p for t in recipe.transforms[:3]]
    assert blur_p == [1.0, 0.1, 0.5]


def test_mae_single_view_and_eval_transform(image):
    views = single_view_mae(32, MEAN, STD)(image)
    assert len(views) == 1 and views[0].shape == (3, 32, 32)
    evaluated = eval_transform(32, MEAN, STD)(image)
    assert torch.is_tensor(evaluated) and evaluated.shape == (3, 32, 32)
    assert torch.equal(evaluated, eval_transform(32, MEAN, STD)(image))  # deterministic
    assert list(find(eval_transform(224, MEAN, STD), v2.Resize)[0].size) == [256]  # 224 / 0.875
