"""View recipes: number, size, values and randomness of the views each method trains on (each method's
``view_recipe()``), the view pieces they are made of, and the evaluation transform."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

import sslhub
from sslhub.methods.moco import moco_views
from sslhub.methods.simclr import SimCLRV2Hparams, simclr_views
from sslhub.registry import get_method
from sslhub.transforms import (
    BICUBIC,
    BILINEAR,
    MultiView,
    PillowGaussianBlur,
    View,
    Views,
    blur,
    color_distortion,
    crop,
    eval_transform,
    flip,
    grayscale,
    jitter_colors,
    kernel_blur,
    pil_grayscale,
    pillow_blur,
    simclr_blur_kernel,
    solarize,
    view,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the presets' (ImageNet) mean and std


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def method_recipe(method: str, **overrides) -> MultiView:
    """``view_recipe()`` of the method's tiny 32 px model (``tiny_preset`` + ``tiny_overrides``)."""
    cls = get_method(method)
    model = sslhub.create_model(cls.tiny_preset, task="pretraining", **{**cls.tiny_overrides, **overrides})
    assert tuple(model.config.image_mean) == MEAN and tuple(model.config.image_std) == STD
    return model.method.view_recipe()


def find(transform, kind) -> list:
    """Every transform of type ``kind`` inside a (nested) v2 pipeline or a ``MultiView``."""
    found = [transform] if isinstance(transform, kind) else []
    for child in getattr(transform, "transforms", []):
        found += find(child, kind)
    return found


def jitter_ranges(jitter: v2.ColorJitter) -> tuple:
    return jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


def test_moco_v2_gives_two_different_views_of_the_same_shape(image):
    torch.manual_seed(0)
    made = method_recipe("moco_v2")(image)
    assert isinstance(made, Views) and made.extras == {}
    views = made.views
    assert len(views) == 2 and all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert all(type(v) is torch.Tensor for v in views)
    assert not torch.equal(views[0], views[1])


def test_blur_is_pillows_radius_sigma_blur_unless_a_kernel_is_given():
    """MoCo v2 blurs with PIL's radius σ (``moco/loader.py``); SimCLR keeps TF's kernel of ~10 % of the side."""
    (pillow,) = find(moco_views(224, MEAN, STD, (0.2, 1.0), aug_plus=True).transforms[0], PillowGaussianBlur)
    assert pillow.sigma == [0.1, 2.0] and not find(method_recipe("moco_v2"), v2.GaussianBlur)
    assert [simclr_blur_kernel(size) for size in (224, 96, 32, 8)] == [23, 9, 3, 3]
    simclr = simclr_views(224, MEAN, STD, SimCLRV2Hparams())
    assert [tuple(b.kernel_size) for b in find(simclr, v2.GaussianBlur)] == [(23, 23)] * 2
    assert tuple(blur(0.5, kernel_size=9).transforms[0].kernel_size) == (9, 9)  # DINOv2's
    with pytest.raises(ValueError, match="sigma"):
        PillowGaussianBlur((0.0, 2.0))


def test_color_distortion_of_strength_s_is_simclrs():
    """SimCLR (arXiv 2002.05709, Appendix A): jitter brightness / contrast / saturation 0.8 s and hue 0.2 s with
    p=0.8, then grayscale with p=0.2."""
    for strength in (0.25, 0.5, 1.0):
        jitter_apply, gray = color_distortion(strength=strength)
        assert isinstance(jitter_apply, v2.RandomApply) and jitter_apply.p == 0.8
        assert isinstance(gray, v2.RandomGrayscale) and gray.p == 0.2
        (jitter,) = jitter_apply.transforms
        amount = 0.8 * strength
        expected = [(1 - amount, 1 + amount)] * 3 + [(-0.2 * strength, 0.2 * strength)]
        assert [tuple(r) for r in jitter_ranges(jitter)] == [pytest.approx(r) for r in expected], strength
    assert jitter_ranges(color_distortion()[0].transforms[0]) == (
        (0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)
    )  # fmt: skip  # the default s = 0.5: MoCo v2's 0.4 / 0.4 / 0.4 / 0.1
    byol_apply, _ = color_distortion(saturation=0.2)  # BYOL / DINO lower only the saturation
    assert jitter_ranges(byol_apply.transforms[0]) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    always, gray = color_distortion(strength=1.0, p=1.0, grayscale_p=0.5)  # p = 1: the jitter itself, always applied
    assert isinstance(always, v2.ColorJitter) and gray.p == 0.5
    assert jitter_ranges(always)[3] == pytest.approx((-0.2, 0.2))


def test_colour_augmentation_in_moco_but_not_in_mae():
    """A flat colour stays that colour through MAE's crop + flip; MoCo's jitter / grayscale change it."""
    flat = Image.new("RGB", (40, 40), (200, 60, 30))
    expected = normalised([200, 60, 30])[:, None, None].expand(3, 32, 32)
    mae_recipe, moco_recipe = method_recipe("mae"), method_recipe("moco_v2")
    torch.manual_seed(0)
    mae = [mae_recipe(flat).views[0] for _ in range(4)]
    moco = [view for _ in range(2) for view in moco_recipe(flat).views]
    assert all(torch.allclose(view, expected, atol=1e-5) for view in mae)
    assert sum(not torch.allclose(view, expected, atol=0.02) for view in moco) >= 2
    assert not find(mae_recipe, v2.ColorJitter) and not find(mae_recipe, v2.RandomGrayscale)


def test_dino_multi_crop_sizes_and_asymmetric_global_views(image):
    recipe = method_recipe("dino", local_crops_number=4, local_crop_size=16)
    views = recipe(image).views
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
    assert jitter_ranges(jitter) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert find(method_recipe("moco_v2"), v2.ColorJitter)[0].saturation == (0.6, 1.4)


def test_dino_local_crop_size_defaults_to_96_224_of_the_image_in_whole_patches(image):
    """32 px x 96 / 224 = 13.7 px, rounded to the 4 px patches of the tiny preset: 12 px local crops."""
    views = method_recipe("dino")(image).views
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 2


def test_moco_v1_views_are_crop_grayscale_jitter_flip_without_blur(image):
    """``main_moco.py`` without ``--aug-plus``: jitter 0.4/0.4/0.4/0.4 always applied, after grayscale (p=0.2)."""
    recipe = method_recipe("moco_v1")
    view = recipe.transforms[0]
    crop, gray, jitter, flip = view.transforms[:4]
    assert [type(t) for t in (crop, gray, jitter, flip)] == [
        v2.RandomResizedCrop, v2.RandomGrayscale, v2.ColorJitter, v2.RandomHorizontalFlip
    ]  # fmt: skip
    assert crop.scale == (0.2, 1.0) and gray.p == 0.2
    assert jitter_ranges(jitter) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.4, 0.4))
    assert not find(recipe, v2.RandomApply) and not find(recipe, v2.GaussianBlur)
    views = recipe(image).views
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 and not torch.equal(views[0], views[1])


def test_moco_v3_views_are_byols_asymmetric_pair(image):
    """facebookresearch/moco-v3 ``main_moco.py``: bilinear crops of scale (0.08, 1), jitter 0.4/0.4/0.2/0.1 (p=0.8),
    grayscale (p=0.2); blur p=1.0 / 0.1, solarise p=0 / 0.2."""
    recipe = method_recipe("moco_v3")
    first, second = recipe.transforms
    assert [find(view, v2.RandomApply)[-1].p for view in (first, second)] == [1.0, 0.1]  # blur
    assert not find(first, v2.RandomSolarize)
    assert [(t.threshold, t.p) for t in find(second, v2.RandomSolarize)] == [(128, 0.2)]
    jitter = find(first, v2.ColorJitter)[0]
    assert jitter_ranges(jitter) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert [find(view, v2.RandomApply)[0].p for view in (first, second)] == [0.8, 0.8]  # jitter
    assert [find(view, v2.RandomGrayscale)[0].p for view in (first, second)] == [0.2, 0.2]
    crops = find(recipe, v2.RandomResizedCrop)
    assert {(c.scale, v2.InterpolationMode(c.interpolation)) for c in crops} == {
        ((0.08, 1.0), v2.InterpolationMode.BILINEAR)
    }
    views = recipe(image).views
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 and not torch.equal(views[0], views[1])


def test_every_recipe_works_on_tiny_images():
    tiny = Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    for method in ("moco_v1", "moco_v2", "moco_v3", "dino", "dinov2", "mae"):
        views = method_recipe(method)(tiny).views
        assert views and all(v.shape[-2:] in ((32, 32), (12, 12)) for v in views), method
        assert all(torch.isfinite(v).all() for v in views), method


def test_eval_transform_is_one_deterministic_normalised_tensor(image):
    evaluated = eval_transform(32, MEAN, STD)(image)
    assert type(evaluated) is torch.Tensor and evaluated.shape == (3, 32, 32)
    assert torch.equal(evaluated, eval_transform(32, MEAN, STD)(image))
    flat = eval_transform(16, MEAN, STD)(Image.new("RGB", (20, 30), (51, 102, 153)))
    assert torch.allclose(flat, normalised([51, 102, 153])[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_a_methods_eval_transform_uses_the_configs_size_mean_and_std(image):
    model = sslhub.create_model("moco_v2_resnet18_32px", image_size=16, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    transform = get_method("moco_v2").eval_transform(model.config)
    assert repr(transform) == repr(eval_transform(16, [0.5] * 3, [0.25] * 3))
    assert torch.equal(transform(image), eval_transform(16, [0.5] * 3, [0.25] * 3)(image))


def test_eval_transform_resizes_to_size_over_crop_pct_then_centre_crops():
    assert find(eval_transform(224, MEAN, STD), v2.Resize)[0].size == [256]  # 224 / 0.875
    assert find(eval_transform(32, MEAN, STD), v2.Resize)[0].size == [32]  # tiny images: no crop
    assert find(eval_transform(32, MEAN, STD, crop_pct=0.5), v2.Resize)[0].size == [64]
    # a bright border around a dark centre: the 0.875 crop keeps only the centre
    framed = np.full((256, 256, 3), 255, dtype=np.uint8)
    framed[16:240, 16:240] = 0
    cropped = eval_transform(224, (0, 0, 0), (1, 1, 1))(Image.fromarray(framed))
    assert cropped.shape == (3, 224, 224) and cropped.max() < 0.01


# ---- fused view pieces -----------------------------------------------------------------------------------------------
def smooth_image(size=32, seed=0) -> Image.Image:
    """Random colours, lightly blurred (image-like: neighbouring pixels correlate)."""
    noise = np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    return Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1))


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_pillow_blur_is_pils_gaussian_blur_of_radius_sigma():
    image = smooth_image()
    expected = image.filter(ImageFilter.GaussianBlur(1.3))
    assert PillowGaussianBlur().transform(image, {"sigma": 1.3}).tobytes() == expected.tobytes()
    assert torch.equal(pillow_blur(as_tensor(image), 1.3), as_tensor(expected))
    with pytest.raises(TypeError, match="PIL"):
        PillowGaussianBlur()(torch.zeros(3, 8, 8))


def test_pillow_blur_draws_sigma_uniformly_from_torchs_generator():
    piece = PillowGaussianBlur((0.5, 1.5))
    torch.manual_seed(0)
    sigmas = np.array([piece.make_params([])["sigma"] for _ in range(4000)])
    torch.manual_seed(0)
    assert piece.make_params([])["sigma"] == sigmas[0]  # seeded by torch, as ViewDataset seeds each sample
    assert sigmas.min() >= 0.5 and sigmas.max() <= 1.5
    counts, _ = np.histogram(sigmas, bins=4, range=(0.5, 1.5))  # uniform: 1000 per bin, sd ~27
    assert np.all(np.abs(counts - 1000) < 120), counts


def test_blur_is_applied_with_probability_p():
    image = smooth_image(8)
    blurred = view(blur(0.3, sigma=(1.0, 2.0)), mean=(0, 0, 0), std=(1, 1, 1))
    sharp = view(blur(0.0), mean=(0, 0, 0), std=(1, 1, 1))(image)
    torch.manual_seed(0)
    applied = [not torch.equal(blurred(image), sharp) for _ in range(1000)]
    assert abs(np.mean(applied) - 0.3) < 0.05


def test_pil_grayscale_is_pillows_convert_l():
    image = smooth_image()
    expected = as_tensor(image.convert("L").convert("RGB"))
    assert torch.equal(pil_grayscale(as_tensor(image)), expected)


def test_kernel_blur_is_torchvisions_gaussian_blur():
    image = as_tensor(smooth_image())
    for kernel, sigma in (([9, 9], [1.7, 1.7]), ([3, 5], [0.4, 1.1])):
        expected = v2.functional.gaussian_blur(image, kernel, sigma).int()
        assert (kernel_blur(image, kernel, sigma).int() - expected).abs().max() <= 1


def tv_colour_ops(image, order, brightness, contrast, saturation, hue):
    """torchvision's colour ops one by one, in ``order``, on a float tensor or a PIL image."""
    ops = [
        lambda x: v2.functional.adjust_brightness(x, brightness),
        lambda x: v2.functional.adjust_contrast(x, contrast),
        lambda x: v2.functional.adjust_saturation(x, saturation),
        lambda x: v2.functional.adjust_hue(x, hue),
    ]
    for index in order:
        image = ops[index](image)
    return image


def tv_jitter(image: torch.Tensor, order, *factors) -> torch.Tensor:
    """torchvision's float colour ops on a uint8 tensor: the reference of ``jitter_colors``."""
    return tv_colour_ops(image / 255, order, *factors) * 255


@pytest.mark.parametrize(
    "order, factors",
    [
        ([0, 1, 2, 3], (1.3, 0.7, 1.2, 0.08)),
        ([3, 2, 1, 0], (0.6, 1.4, 0.0, -0.1)),
        ([1, 3, 0, 2], (1.0, 1.0, 1.0, 0.5)),
    ],
)
def test_jitter_colors_equals_torchvisions_colour_ops_in_order(order, factors):
    image = as_tensor(smooth_image())
    fused = jitter_colors(image, order, *factors)
    assert fused.dtype == torch.uint8 and fused.shape == image.shape
    assert (fused.float() - tv_jitter(image, order, *factors)).abs().max() <= 0.5 + 1e-3  # one rounding
    pil = tv_jitter_pil(smooth_image(), order, *factors)  # the official path: uint8 after each op, 8-bit HSV
    difference = (fused.int() - pil.int()).abs()
    assert difference.float().mean() < 2 and difference.max() <= 8  # PIL truncates to uint8 after each of 4 ops


def tv_jitter_pil(image: Image.Image, order, *factors) -> torch.Tensor:
    """The same ops on a PIL image (the official path: uint8 after each op, 8-bit HSV)."""
    return as_tensor(tv_colour_ops(image, order, *factors))


def composed(fused: View) -> v2.Compose:
    """The same transforms run one by one by torchvision (on a PIL image: the official path)."""
    return v2.Compose(fused.transforms)


def test_fused_view_equals_the_composed_transforms_for_the_same_seed():
    """Crop (torchvision's uint8 antialiased resize: Pillow's within one level), flip, grayscale, Pillow
    blur, solarise: the composed pipeline's tensor; the same random draws (the generator ends in the same state)."""
    image = smooth_image(40)
    pieces = crop(24, (0.3, 1.0), BILINEAR), flip(), grayscale(0.5), blur(0.5), solarize(0.5)
    fused = view(*pieces, mean=(0, 0, 0), std=(1 / 255,) * 3)  # in levels
    assert isinstance(fused, View)
    for seed in range(8):
        torch.manual_seed(seed)
        got, after = fused(image), torch.rand(1)
        torch.manual_seed(seed)
        expected, expected_after = composed(fused)(image), torch.rand(1)
        assert type(got) is torch.Tensor and got.is_contiguous() and got.shape == (3, 24, 24)
        assert (got - expected).abs().max() <= 1 + 1e-3 and (got - expected).abs().mean() < 0.5
        assert after == expected_after


def test_fused_view_with_jitter_and_bicubic_crop_is_close_to_the_composed_one():
    image = smooth_image(40)
    fused = view(crop(24, (0.3, 1.0), BICUBIC), flip(), color_distortion(), blur(1.0), mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(4):
        torch.manual_seed(seed)
        got = fused(image)
        torch.manual_seed(seed)
        difference = (got - composed(fused)(image)).abs() * 255
        assert difference.mean() < 2 and difference.max() <= 10, seed  # a few levels: rounding, not other draws


def test_views_other_than_fusable_pieces_are_composed_and_other_inputs_run_composed(image):
    assert type(view(v2.Resize(16), mean=MEAN, std=STD)) is v2.Compose
    fused = view(crop(16), flip(), mean=MEAN, std=STD)
    torch.manual_seed(0)
    gray = fused(image.convert("L"))  # not RGB: torchvision's transforms as they are
    torch.manual_seed(0)
    assert torch.equal(gray, composed(fused)(image.convert("L")))


def test_multi_view_of_fused_views_equals_each_view_on_the_image(image):
    recipe = method_recipe("dino", local_crops_number=2, local_crop_size=16)
    assert recipe.fused
    torch.manual_seed(3)
    together = recipe(image).views
    torch.manual_seed(3)
    one_by_one = [transform(image) for transform in recipe.transforms]
    assert all(torch.equal(a, b) for a, b in zip(together, one_by_one, strict=True))
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(together, recipe(image).views, strict=True))  # a function of the seed
