"""Colorization (arXiv 1603.08511): the 313 ab bins, the soft encoding (§3.1), the class rebalancing (eq. 3-4) and its
running prior, the loss (eq. 2), the annealed mean (eq. 5) and ``colorize``, the L input, the VISSL files converted
against their model written out, bad files, the releases."""

import numpy as np
import pytest
import timm
import torch
import torchvision
from helpers import random_batch_norm_statistics, relative_error
from PIL import Image
from skimage import color
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, load_file_state
from sslhub.data import ImageDataset, ViewDataset
from sslhub.methods.colorization import (
    AB_BINS,
    annealed_mean,
    colorize,
    estimate_ab_prior,
    rebalancing_weights,
    smoothed_prior,
    soft_encode,
    stride_one_,
)
from sslhub.registry import get_pretrained
from sslhub.transforms import lab_to_rgb, rgb_to_lab

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "colorization_resnet18_32px"


# ---- the quantised ab space ----------------------------------------------------------------------------------------
def test_the_313_bins_are_the_in_gamut_10_grid_of_the_paper():
    bins = AB_BINS.long().tolist()
    assert len(bins) == 313 == len({tuple(b) for b in bins})  # Figure 3a: "313 ab pairs in gamut"
    assert all(a % 10 == 0 and b % 10 == 0 for a, b in bins) and [0, 0] in bins
    a_values, b_values = {a for a, _ in bins}, {b for _, b in bins}
    assert (min(a_values), max(a_values), min(b_values), max(b_values)) == (-90, 100, -110, 100)
    assert bins == sorted(bins)  # pts_in_hull.npy's order: a, then b
    for a in a_values:  # every row of constant a is one run of b
        row = [b for x, b in bins if x == a]
        assert row == list(range(row[0], row[-1] + 1, 10))
    # every 8-bit sRGB colour rounds onto a bin: the sRGB gamut quantised to the grid (261 bins) lies inside the 313
    levels = np.arange(0, 256, 5)
    rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3) / 255.0
    rounded = {tuple(p) for p in (np.round(color.rgb2lab(rgb)[0, :, 1:] / 10) * 10).astype(int).tolist()}
    assert rounded <= {tuple(b) for b in bins} and len(rounded) > 250


def test_soft_encoding_is_the_five_nearest_bins_with_a_gaussian_kernel():
    generator = torch.Generator().manual_seed(0)
    ab = torch.rand(2, 2, 3, 4, generator=generator) * 160 - 80
    encoded = soft_encode(ab, AB_BINS, neighbours=5, sigma=5.0)
    assert encoded.shape == (2, 313, 3, 4)
    centres = AB_BINS.numpy().astype(np.float64)
    for i in range(2):
        for y in range(3):
            for x in range(4):
                point = ab[i, :, y, x].double().numpy()
                distance = np.sqrt(((centres - point) ** 2).sum(1))
                nearest = np.argsort(distance)[:5]
                kernel = np.exp(-(distance[nearest] ** 2) / (2 * 5.0**2))
                expected = np.zeros(313)
                expected[nearest] = kernel / kernel.sum()
                np.testing.assert_allclose(encoded[i, :, y, x].numpy(), expected, atol=1e-5)


def test_rebalancing_weights_follow_eq_4_on_the_smoothed_prior():
    counts = torch.zeros(313, dtype=torch.float64)
    counts[[0, 150, 151, 300]] = torch.tensor([5.0, 100.0, 20.0, 1.0], dtype=torch.float64)
    prior = smoothed_prior(counts, AB_BINS, sigma=5.0)
    centres = AB_BINS.double()
    empirical = counts / counts.sum()
    smoothed = torch.zeros(313, dtype=torch.float64)
    for q in range(313):  # p̃(c_q) = Σ_r exp(-|c_q - c_r|² / 2σ²) p_r, renormalised
        for r in (0, 150, 151, 300):  # the bins with counts
            smoothed[q] += torch.exp(-((centres[q] - centres[r]) ** 2).sum() / 50) * empirical[r]
    smoothed /= smoothed.sum()
    torch.testing.assert_close(prior, smoothed)
    weights = rebalancing_weights(prior, 0.5)
    unnormalised = 1 / (0.5 * smoothed + 0.5 / 313)
    torch.testing.assert_close(weights, unnormalised / (smoothed * unnormalised).sum())
    assert (prior * weights).sum().item() == pytest.approx(1.0)  # E_p̃[w] = 1
    assert weights[300] > weights[0] > weights[150]  # rarer colours weigh more
    before_any_count = rebalancing_weights(smoothed_prior(torch.zeros(313), AB_BINS, 5.0), 0.5)
    torch.testing.assert_close(before_any_count, torch.ones(313, dtype=torch.float64))


def test_annealed_mean_interpolates_between_the_mean_and_the_mode():
    probabilities = torch.softmax(torch.randn(1, 313, 2, 2, generator=torch.Generator().manual_seed(1)) * 3, dim=1)
    at_t = annealed_mean(probabilities, AB_BINS, 0.38)
    z = probabilities[0, :, 1, 0].double()
    f_t = torch.exp(torch.log(z) / 0.38) / torch.exp(torch.log(z) / 0.38).sum()  # eq. 5
    torch.testing.assert_close(at_t[0, :, 1, 0].double(), (f_t[:, None] * AB_BINS.double()).sum(0), atol=1e-4, rtol=0)
    mean = torch.einsum("bqhw,qc->bchw", probabilities, AB_BINS)
    torch.testing.assert_close(annealed_mean(probabilities, AB_BINS, 1.0), mean, atol=1e-4, rtol=0)
    mode = AB_BINS[probabilities.argmax(1)].permute(0, 3, 1, 2)
    torch.testing.assert_close(annealed_mean(probabilities, AB_BINS, 0.01), mode, atol=1e-3, rtol=0)


def test_lab_to_rgb_inverts_rgb_to_lab_as_scikit_image():
    rgb = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4, rtol=0)
    lab = torch.stack([torch.full((4, 4), 60.0), torch.linspace(-100, 100, 16).reshape(4, 4), torch.full((4, 4), 30.0)])
    expected = color.lab2rgb(lab.permute(1, 2, 0).double().numpy())  # out-of-gamut colours clipped
    np.testing.assert_allclose(lab_to_rgb(lab).permute(1, 2, 0).numpy(), expected, atol=2e-4)


def test_estimate_ab_prior_counts_every_pixels_nearest_bin():
    red = Image.new("RGB", (4, 2), (200, 30, 30))
    gray = torch.full((3, 2, 2), 0.5)
    prior = estimate_ab_prior([red, gray])
    lab = color.rgb2lab(np.array([[[200, 30, 30]]], np.uint8))[0, 0]
    red_bin = int(((AB_BINS - torch.tensor(lab[1:], dtype=torch.float32)) ** 2).sum(1).argmin())
    gray_bin = AB_BINS.tolist().index([0.0, 0.0])
    assert prior[red_bin].item() == pytest.approx(8 / 12) and prior[gray_bin].item() == pytest.approx(4 / 12)


# ---- data, encoder and loss ----------------------------------------------------------------------------------------
def coloured_images(count, size=40, seed=1):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def recipe_batch(model, images):
    recipe = model.method.view_recipe()
    dataset = ViewDataset(ImageDataset(images, labels=[0] * len(images)), recipe, seed=0)
    return recipe.collate([dataset[i] for i in range(len(images))])


@pytest.mark.parametrize("preset", [PRESET, "colorization_resnet50"])
def test_the_view_is_the_lab_image_with_l_centred(preset):
    model = sslhub.create_model(preset, task="pretraining")
    size = model.config.image_size
    uniform = Image.new("RGB", (size + 20, size + 30), (40, 160, 90))  # any crop, flip or resize keeps its colour
    batch = recipe_batch(model, [uniform])
    lab = torch.tensor(color.rgb2lab(np.array([[[40, 160, 90]]], np.uint8))[0, 0], dtype=torch.float32)
    assert batch.views[0].shape == (1, 3, size, size)
    pixels = batch.views[0][0].flatten(1).t()  # (L - 50, a, b) per pixel
    colour, padding = torch.tensor([lab[0] - 50, lab[1], lab[2]]), torch.tensor([-50.0, 0.0, 0.0])  # padding: black
    is_colour, is_padding = ((pixels - colour).abs() < 1e-3).all(1), ((pixels - padding).abs() < 1e-3).all(1)
    assert (is_colour | is_padding).all() and is_colour.float().mean() >= (24 / 32) ** 2


def test_the_evaluation_input_is_vissls_img_pil_to_lab_tensor_l_channel():
    """VISSL's test transform: Resize(256), CenterCrop(224), ImgPil2LabTensor (OpenCV's 8-bit Lab: L* x 255 / 100
    rounded, rescaled to L x 100 / 255 - 50); the model keeps channel 0. sslhub's float L* - 50 is within the 8-bit
    rounding of it; a and b likewise (a + 128 rounded - 128)."""
    model = sslhub.create_model("colorization_resnet50")
    image = coloured_images(1, size=256)[0]
    ours = sslhub.create_transform(model)(image)
    lab = color.rgb2lab(np.asarray(image)[16:240, 16:240])
    vissl_l = np.round(lab[..., 0] * 255 / 100) * 100 / 255 - 50
    vissl_ab = np.round(lab[..., 1:] + 128) - 128
    assert ours.shape == (3, 224, 224)
    assert np.abs(ours[0].numpy() - vissl_l).max() <= 100 / 255 / 2 + 1e-3
    assert np.abs(ours[1:].permute(1, 2, 0).numpy() - vissl_ab).max() <= 0.5 + 1e-3


def test_encoders_see_one_channel_and_keep_a_spatial_map():
    small = sslhub.create_model(PRESET, task="pretraining").method
    assert small.encoder.backbone.conv1.in_channels == 1
    assert small.predict_logits(torch.zeros(2, 3, 32, 32)).shape == (2, 313, 4, 4)  # layer3 / layer4 at stride 1
    large = sslhub.create_model("colorization_resnet50").encoder
    assert large.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 4, 4)  # output stride 16
    lab = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the encoder reads L alone
        assert torch.equal(large(lab), large(torch.cat([lab[:, :1], torch.randn(1, 2, 64, 64)], dim=1)))
    with pytest.raises(ValueError, match=r"takes \(L - 50, a, b\) images"):
        large(torch.zeros(1, 1, 64, 64))
    assert large.backbone.layer4[0].conv2.dilation == (1, 1) and not large.exports_to_timm
    with pytest.raises(ValueError, match="no ResNet stage 'layer5'"):
        stride_one_(timm.create_model("resnet18"), ["layer5"])


def test_loss_is_the_rebalanced_cross_entropy_written_out_and_grey_images_are_skipped():
    torch.manual_seed(0)
    model = sslhub.create_model(PRESET, task="pretraining")
    method = model.method
    images = coloured_images(3, size=32)
    grey = Image.fromarray(np.repeat(np.asarray(images[0])[..., :1], 3, axis=2))
    batch = recipe_batch(model, [*images, grey])
    method.ab_counts[:] = 0
    method.ab_counts[[10, 200]] = torch.tensor([30.0, 10.0], dtype=torch.float64)
    before = method.ab_counts.clone()
    model.train()
    output = model(batch)
    with torch.no_grad():
        logits = method.predict_logits(batch.views[0])  # train-mode BatchNorm: the same batch statistics
    ab = batch.views[0][:, 1:, ::8, ::8]  # the ab of every 8th pixel: the 4 x 4 map's locations
    centres = AB_BINS.double().numpy()
    counts = before.clone()
    targets = {}
    for i in range(4):
        for y in range(4):
            for x in range(4):
                distance = np.sqrt(((centres - ab[i, :, y, x].double().numpy()) ** 2).sum(1))
                nearest = np.argsort(distance)[:5]
                kernel = np.exp(-(distance[nearest] ** 2) / 50)
                targets[i, y, x] = (nearest, kernel / kernel.sum())
                counts[nearest[0]] += 1
    torch.testing.assert_close(method.ab_counts, counts)  # the running histogram took the batch's 64 targets
    weights = rebalancing_weights(smoothed_prior(counts, AB_BINS, 5.0), 0.5)
    expected = 0.0
    for (i, y, x), (nearest, z) in targets.items():
        colourful = bool((ab[i].abs() > 5).any())
        log_probabilities = torch.log_softmax(logits[i, :, y, x].double(), 0)[nearest]
        expected += weights[nearest[0]] * colourful * -(torch.tensor(z) * log_probabilities).sum()
    expected /= len(targets)
    assert not (ab[3].abs() > 5).any()  # the grey image: no loss
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert output.metrics["colourful"] == 0.75
    model.eval()
    model(batch)
    torch.testing.assert_close(method.ab_counts, counts)  # evaluation does not count
    with pytest.raises(ValueError, match=r"takes 1 view, the \(L - 50, a, b\) image"):
        model(Batch([batch.views[0][:, :1]], batch.index))


def test_the_prior_is_saved_with_the_model_and_a_prior_file_fixes_it(tmp_path):
    model = sslhub.create_model(PRESET, task="pretraining")
    model.method.ab_counts.fill_(3.0)
    state = model.state_dict()
    assert "method.ab_counts" in state and "method.ab_bins" not in state
    restored = sslhub.create_model(PRESET, task="pretraining")
    restored.load_state_dict(state)
    assert torch.equal(restored.method.ab_counts, model.method.ab_counts)
    prior = np.linspace(1, 2, 313)
    np.save(tmp_path / "prior_probs.npy", prior)
    fixed = sslhub.create_model(PRESET, task="pretraining", prior_file=str(tmp_path / "prior_probs.npy"))
    assert torch.equal(fixed.method.ab_counts, torch.from_numpy(prior))
    fixed.train()(recipe_batch(fixed, coloured_images(2, size=32)))
    assert torch.equal(fixed.method.ab_counts, torch.from_numpy(prior))
    np.save(tmp_path / "wrong.npy", np.ones(312))
    with pytest.raises(ValueError, match=r"expected 313 non-negative values .* got shape \(312,\)"):
        sslhub.create_model(PRESET, task="pretraining", prior_file=str(tmp_path / "wrong.npy"))


def test_colorize_keeps_the_size_and_the_lightness():
    torch.manual_seed(0)
    model = sslhub.create_model(PRESET, task="pretraining")
    images = [coloured_images(1, size=24)[0].resize((24, 18)), torch.rand(3, 40, 36)]
    coloured = colorize(model, images)
    assert [(image.size, image.mode) for image in coloured] == [((24, 18), "RGB"), ((36, 40), "RGB")]
    assert model.training  # restored
    for original, result in zip(images, coloured, strict=True):
        rgb = np.asarray(original) / 255.0 if isinstance(original, Image.Image) else original.permute(1, 2, 0).numpy()
        lightness = color.rgb2lab(rgb)[..., 0]
        assert np.abs(color.rgb2lab(np.asarray(result))[..., 0] - lightness).mean() < 1.0
    with pytest.raises(ValueError, match="needs a colorization model"):
        colorize(sslhub.create_model("rotnet_resnet18_32px", task="pretraining"), images)


# ---- the VISSL model, written out ----------------------------------------------------------------------------------
class VisslColorizationTrunk(nn.Module):
    """vissl/models/trunks/resnext.py with INPUT_TYPE lab and LAYER4_STRIDE 1: torchvision's ResNet, conv1 rebuilt
    with 1 input channel, layer1-4 rebuilt by ``_make_layer`` (layer4 with stride 1), in ``_feature_blocks``; the
    forward keeps channel 0 (L) of a Lab tensor (``transform_model_input_data_type``)."""

    def __init__(self, block, layers):
        super().__init__()
        torch.manual_seed(0)
        net = torchvision.models.resnet.ResNet(block, layers)
        net.inplanes = 64
        conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        stages = [net._make_layer(block, 64 * 2**i, n, stride=2 if i in (1, 2) else 1) for i, n in enumerate(layers)]
        blocks = [("conv1", conv1), ("bn1", nn.BatchNorm2d(64)), ("conv1_relu", nn.ReLU()), ("maxpool", net.maxpool)]
        blocks += [(f"layer{i + 1}", stage) for i, stage in enumerate(stages)]
        self._feature_blocks = nn.ModuleDict(
            [*blocks, ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1))]
        )
        random_batch_norm_statistics(self)

    def forward(self, lab, until="flatten"):
        x = torch.split(lab, [1, 2], dim=1)[0]
        for name, module in self._feature_blocks.items():
            x = module(x)
            if name == until:
                return x


def lab_tensor(images):
    """VISSL's ImgPil2LabTensor output (3, H, W): L - 50, a, b (OpenCV's rounding aside)."""
    lab = rgb_to_lab(images)
    return torch.cat([lab[:, :1] - 50, lab[:, 1:]], dim=1)


def test_vissl_file_converts_to_the_vissl_model_written_out(tmp_path):
    trunk = VisslColorizationTrunk(BasicBlock, [2, 2, 2, 2])
    path = tmp_path / "converted_vissl_rn18_colorization.torch"
    torch.save({"model_state_dict": trunk.state_dict()}, path)
    container = load_file_state(path)
    assert detect_layout(container) is get_layout("colorization_vissl")  # before the generic vissl_trunk
    assert read_checkpoint(path).left_out == []
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        encoder = convert_checkpoint(PRESET, path, stride_one_stages=("layer4",))
        hidden = encoder(lab_tensor(images)).last_hidden_state
        assert relative_error(hidden, trunk(lab_tensor(images), until="layer4")) < 1e-4


def test_the_released_resnet50_is_vissls_and_timms_resnet50_with_layer4_at_stride_1(tmp_path):
    trunk = VisslColorizationTrunk(Bottleneck, [3, 4, 6, 3])
    path = tmp_path / "converted_vissl_rn50_colorization_in1k_goyal19.torch"
    torch.save({"model_state_dict": trunk.state_dict()}, path)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    released = sslhub.create_model("colorization_resnet50.in1k_goyal19", pretrained=True, pretrained_path=path)
    stock = timm.create_model("resnet50", in_chans=1, num_classes=0, global_pool="")
    stock.load_state_dict(released.encoder.backbone.state_dict())  # timm's names and shapes, strict
    stride_one_(stock, ["layer4"]).eval()
    with torch.no_grad():
        output = released(lab_tensor(images))
        assert output.pooler_output.shape == (1, 2048)
        assert relative_error(output.pooler_output, trunk(lab_tensor(images))) < 1e-4
        assert relative_error(output.last_hidden_state, stock.forward_features(lab_tensor(images)[:, :1])) < 1e-4


def test_bad_files_give_errors_naming_what_is_wrong():
    layout = get_layout("colorization_vissl")
    rgb_trunk = {f"_feature_blocks.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    rgb_trunk = {k: v for k, v in rgb_trunk.items() if ".fc." not in k}
    assert not layout.detect({"model_state_dict": rgb_trunk})  # a 3-channel trunk: the generic vissl_trunk's
    with pytest.raises(CheckpointError, match=r"1-channel conv1 .* found \(64, 3, 7, 7\)"):
        layout.convert({"model_state_dict": rgb_trunk}, "f.torch")
    with pytest.raises(CheckpointError, match="not a VISSL checkpoint"):
        layout.convert({"state_dict": rgb_trunk}, "f.torch")


def test_releases_resolve():
    expected = {"in1k_goyal19": (40.11, None), "in22k_goyal19": (49.24, "imagenet-22k"),
                "yfcc100m_goyal19": (47.46, "yfcc100m")}  # fmt: skip
    for tag, (linear, data) in expected.items():
        release = get_pretrained(f"colorization_resnet50.{tag}")
        short = tag.removesuffix("_goyal19")
        assert release.file_name == f"converted_vissl_rn50_colorization_{short}_goyal19.torch"
        assert (release.layout, release.metrics, release.pretraining_data) == ("colorization_vissl", {"linear": linear},
                                                                               data)  # fmt: skip
