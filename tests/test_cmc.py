"""CMC (arXiv 1906.05849): the Lab input, the two-bank NCE / softmax objective, banks over resume (two processes:
tests/test_memory_banks.py), the authors' releases against their model written out, RGB users getting the authors'
features."""

import argparse
import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import pretrain_silently, random_batch_norm_statistics, relative_error
from PIL import Image
from skimage import color
from sklearn.datasets import load_digits
from torch import nn
from torchvision import transforms as tv1
from torchvision.models.resnet import BasicBlock, Bottleneck

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import load_file_state
from sslhub.memory_bank import noise_indices
from sslhub.methods.cmc import LAB_MEAN, LAB_STD, LabBranchesEncoder, convert_cmc
from sslhub.registry import get_pretrained
from sslhub.training import PretrainArguments, pretrain
from sslhub.transforms import rgb_to_lab

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = {"dim": 16, "nce_k": 8, "num_samples": 12}


def tiny_cmc(**overrides):
    torch.manual_seed(0)
    return sslhub.create_model("cmc_resnet18_32px", task="pretraining", **{**TINY, **overrides})


def test_rgb_to_lab_is_scikit_image_rgb2lab():
    rgb = np.random.default_rng(0).integers(0, 256, (17, 19, 3), dtype=np.uint8)
    rgb[0, :4] = [[0, 0, 0], [255, 255, 255], [3, 2, 1], [128, 128, 128]]  # black, white, the linear segment, grey
    expected = torch.from_numpy(color.rgb2lab(rgb)).permute(2, 0, 1).float()
    actual = rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.allclose(actual, expected, atol=2e-3) and relative_error(actual, expected) < 1e-5


# ---- the objective -------------------------------------------------------------------------------------------------
def frozen_batch_norm(method):
    """Training mode (bank updates) with BatchNorm on running statistics: each image's features depend on it alone."""
    method.train()
    for module in method.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return method


def lab_batch(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    index = torch.tensor([0, 5, 9, 2, 11, 7, 3, 8])[:count]
    return Batch(views=[torch.randn(count, 3, 32, 32, generator=generator)], index=index)


def official_nce_average(memory_l, memory_ab, z_l, z_ab, index, noise, temperature, momentum, softmax):
    """``NCEAverage.forward`` then ``NCECriterion`` / ``NCESoftmaxLoss``, written out plainly (one image at a time)."""
    n = memory_l.shape[0]
    losses, z = [], []
    for feature, bank in ((z_l, memory_ab), (z_ab, memory_l)):
        out = (
            torch.stack(
                [bank[torch.tensor([i, *noise_row])] @ f for i, noise_row, f in zip(index, noise, feature, strict=True)]
            )
            / temperature
        )
        if softmax:
            losses.append(F.cross_entropy(out, torch.zeros(len(index), dtype=torch.long)))
            continue
        out = out.exp()
        z.append(out.mean() * n)
        p = out / z[-1]
        m, pn = out.shape[1] - 1, 1 / n
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + m * pn + 1e-7))
        log_d0 = torch.log(m * pn / (p[:, 1:] + m * pn + 1e-7))
        losses.append(-(log_d1.sum() + log_d0.sum()) / len(index))
    new_l, new_ab = memory_l.clone(), memory_ab.clone()
    for i, fl, fab in zip(index, z_l, z_ab, strict=True):
        for bank, f in ((new_l, fl), (new_ab, fab)):
            row = bank[i] * momentum + f * (1 - momentum)
            bank[i] = row / row.pow(2).sum().sqrt()
    return losses[0] + losses[1], z, new_l, new_ab


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_loss_and_bank_updates_are_nce_average_and_its_criteria_written_out(objective):
    method = frozen_batch_norm(tiny_cmc(objective=objective).method)
    batch = lab_batch()
    memory_l, memory_ab = method.memory_l.clone(), method.memory_ab.clone()
    with torch.no_grad():
        z_l, z_ab = method.embed(batch.views[0])
        noise = noise_indices(12, 4, 8, step=0, seed=0)
        expected, z, new_l, new_ab = official_nce_average(
            memory_l, memory_ab, z_l, z_ab, batch.index, noise, 0.1, 0.5, objective == "softmax"
        )
        loss = method(batch).loss
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(method.memory_l, new_l, atol=1e-6) and torch.allclose(method.memory_ab, new_ab, atol=1e-6)
    if objective == "nce":
        assert torch.allclose(method.nce_z, torch.stack(z), rtol=1e-5)  # fixed on the first batch ...
        with torch.no_grad():
            method(lab_batch(seed=2))
        assert torch.allclose(method.nce_z, torch.stack(z), rtol=1e-5)  # ... and kept
    assert int(method.nce_step) == (2 if objective == "nce" else 1)


def test_the_l_and_ab_branches_see_only_their_channels():
    encoder = tiny_cmc().method.encoder.eval()
    images = torch.randn(2, 3, 32, 32)
    changed = images.clone()
    changed[:, 1:] += 1.0  # ab only
    with torch.no_grad():
        (l1, ab1), (l2, ab2) = encoder.forward_branches(images), encoder.forward_branches(changed)
        pooled = encoder(images)
    assert torch.equal(l1, l2) and not torch.allclose(ab1, ab2)
    assert torch.equal(pooled, torch.cat([l1, ab1], dim=1)) and pooled.shape == (2, 2 * 512)


def test_pretrainer_binds_both_banks_and_resume_restores_them_exactly(image_folder, tmp_path):
    def args(output_dir, **extra):
        return PretrainArguments(
            model="cmc_resnet18_32px", data=str(image_folder), output_dir=str(output_dir), epochs=1, batch_size=16,
            overrides={"dim": 16, "nce_k": 8}, log_with=None, progress=False, knn_every=0, checkpoint_every=1, **extra,
        )  # fmt: skip

    full = pretrain(args(tmp_path / "full"))
    first = pretrain(args(tmp_path / "cut", max_steps=2))
    resumed = pretrain(args(tmp_path / "cut", resume="latest"))
    assert len(full.losses) == 3 and first.losses == full.losses[:2] and resumed.losses == full.losses[2:]
    final_full = sslhub.from_pretrained(tmp_path / "full" / "pretraining").method
    final_resumed = sslhub.from_pretrained(tmp_path / "cut" / "pretraining").method
    assert final_full.memory_l.shape == final_full.memory_ab.shape == (48, 16)
    for name in ("memory_l", "memory_ab", "nce_z", "nce_step"):
        assert torch.equal(getattr(final_full, name), getattr(final_resumed, name)), name


@pytest.fixture(scope="module")
def coloured_digits(tmp_path_factory):
    """The built-in digits with strokes of one random hue per image: L and ab both show the digit's shape, and the
    colour says nothing about the class (grey digits, as ``--data builtin``, have ab = 0: nothing to contrast)."""
    root = tmp_path_factory.mktemp("coloured-digits")
    digits, rng = load_digits(), np.random.default_rng(0)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        hue = np.array(colorsys.hsv_to_rgb(rng.random(), 1.0, 1.0))
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(np.round(image[..., None] / 16 * hue * 255).astype(np.uint8)).save(
            root / str(label) / f"{i}.png"
        )
    return root


def test_small_preset_learns_on_coloured_digits(coloured_digits, tmp_path):
    """Two epochs of ``cmc_resnet18_32px`` (measured 2026-12-02: kNN 0.194 at random init -> 0.472 after 28 steps)."""
    result = pretrain_silently("cmc_resnet18_32px", tmp_path, data=str(coloured_digits), epochs=2, batch_size=128)
    assert result.knn_final > result.knn_random_init + 0.2


# ---- the authors' model and releases ------------------------------------------------------------------------------
class AuthorsResNet(nn.Module):
    """HobbitLong/CMC ``models/resnet.py`` ``ResNet(block, layers, low_dim, in_channel, width)``: stem 64 channels,
    stage planes int(64 * width) * (1, 2, 4, 8), ``AvgPool2d(7)``, ``fc`` and ``Normalize``; ``forward(x, layer)``."""

    def __init__(self, block, layers, in_channel, width, low_dim=128):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channel, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        base = int(64 * width)
        for i, count in enumerate(layers):
            self.add_module(f"layer{i + 1}", self._make_layer(block, base * 2**i, count, 1 if i == 0 else 2))
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(base * 8 * block.expansion, low_dim)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, layer=7):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).view(x.size(0), -1)
        if layer == 6:
            return x
        x = self.fc(x)
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class AuthorsResNetsCMC(nn.Module):
    """``MyResNetsCMC(name)`` with ``ResNetV1/V2/V3`` inside an ``nn.DataParallel`` (hence ``encoder.module.``)."""

    def __init__(self, block, layers, width):
        super().__init__()
        views = nn.Module()
        views.l_to_ab, views.ab_to_l = AuthorsResNet(block, layers, 1, width), AuthorsResNet(block, layers, 2, width)
        self.encoder = nn.DataParallel(views)

    def forward(self, x, layer=7):
        lightness, colour = torch.split(x, [1, 2], dim=1)
        views = self.encoder.module
        return views.l_to_ab(lightness, layer), views.ab_to_l(colour, layer)


def authors_model(block, layers, width) -> AuthorsResNetsCMC:
    torch.manual_seed(0)
    model = AuthorsResNetsCMC(block, layers, width)
    return random_batch_norm_statistics(model)


def save_cmc_file(path, model, name):
    """``train_CMC.py``'s save: ``opt`` (argparse), ``model``, ``contrast`` (NCEAverage buffers), optimizer, epoch."""
    opt = argparse.Namespace(model=name, nce_k=4096, nce_t=0.07, nce_m=0.5, softmax=False, feat_dim=128, view="Lab")
    contrast = {"params": torch.tensor([4096, 0.07, 12.0, 13.0, 0.5]), "memory_l": torch.randn(5, 128),
                "memory_ab": torch.randn(5, 128)}  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    torch.save({"opt": opt, "model": model.state_dict(), "contrast": contrast, "optimizer": optimizer.state_dict(),
                "epoch": 240}, path)  # fmt: skip


def authors_input(image: Image.Image) -> torch.Tensor:
    """``LinearProbing.py``'s validation transform: Resize(256), CenterCrop(224), RGB2Lab, ToTensor, Normalize."""
    cropped = tv1.CenterCrop(224)(tv1.Resize(256)(image))
    lab = color.rgb2lab(np.asarray(cropped, np.uint8))
    return tv1.Normalize(LAB_MEAN, LAB_STD)(tv1.ToTensor()(lab)).float()


def photo(seed=0, size=(300, 260)) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BILINEAR)


def test_resnet50v1_release_gives_rgb_users_the_authors_features(tmp_path):
    tag = get_pretrained("cmc_resnet50v1.in1k")
    assert (tag.layout, tag.license, tag.file_name) == ("cmc", "BSD-2-Clause", "CMC_resnet50v1.pth")
    model = authors_model(Bottleneck, [3, 4, 6, 3], 0.5)
    path = tmp_path / tag.file_name
    save_cmc_file(path, model, "resnet50v1")
    assert detect_layout(load_file_state(path)) is get_layout("cmc")
    released = sslhub.create_model("cmc_resnet50v1.in1k", pretrained=True, pretrained_path=path)
    image = photo()
    pixels = sslhub.create_transform(released)(image)
    expected_pixels = authors_input(image)
    assert relative_error(pixels, expected_pixels) < 1e-5
    with torch.no_grad():
        feat_l, feat_ab = model(expected_pixels[None], layer=6)
        features = released(pixels[None]).pooler_output
    assert features.shape == (1, 2048) and relative_error(features, torch.cat([feat_l, feat_ab], dim=1)) < 1e-4
    card = str(released.model_card())
    assert "not a single timm model" in card and "sslhub.create_transform(model)" in card and "L*a*b*" in card


def test_conversion_keeps_the_embeddings_and_reads_the_run_arguments(tmp_path):
    model = authors_model(BasicBlock, [2, 2, 2, 2], 1)  # resnet18v2, the cmc_resnet18 preset
    path = tmp_path / "ckpt_epoch_240.pth"
    save_cmc_file(path, model, "resnet18v2")
    converted = read_checkpoint(path)
    assert converted.method_overrides == {
        "dim": 128, "nce_k": 4096, "temperature": 0.07, "bank_momentum": 0.5, "objective": "nce"
    }  # fmt: skip
    assert any("contrast" in entry for entry in converted.left_out)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        method = convert_checkpoint("cmc_resnet18", path, task="pretraining").method
        z_l, z_ab = method.embed(images)
        expected_l, expected_ab = model(images)
    assert relative_error(z_l, expected_l) < 1e-4 and relative_error(z_ab, expected_ab) < 1e-4
    assert method.memory_l.shape == (0, 128) and (method.nce_z < 0).all() and method.hparams.nce_k == 4096


@pytest.mark.parametrize("version, width", [("v2", 1), ("v3", 2)])
def test_v2_and_v3_layouts_have_the_authors_names_and_shapes(version, width):
    with torch.device("meta"):  # shapes only: a ResNet-50 x2 pair holds 750 MB of weights
        model = AuthorsResNetsCMC(Bottleneck, [3, 4, 6, 3], width)
        config = sslhub.SSLConfig.from_preset(f"cmc_resnet50{version}")
        encoder = LabBranchesEncoder(config.backbone, **config.backbone_kwargs)
    converted = convert_cmc({"model": model.state_dict()}, "file")
    expected = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in converted.backbone.items()} == expected
    assert converted.method["head_l.weight"].shape == (128, 2048 * width)


def test_a_file_of_another_method_is_not_taken_for_cmc():
    assert not get_layout("cmc").detect({"model": {"encoder.module.conv1.weight": torch.zeros(1)}})
    assert not get_layout("cmc").detect({"state_dict": {}})


def test_evaluation_and_fine_tuning_feed_the_encoder_normalised_lab():
    """A uniform image survives crops, flips and resizing unchanged, so every pipeline must give its Lab colour."""
    from sslhub.finetune import FinetuneArguments, train_transform

    config = sslhub.create_model("cmc_resnet18_32px").config
    image = Image.new("RGB", (48, 40), (200, 30, 90))
    lab = color.rgb2lab(np.array([[[200, 30, 90]]], np.uint8))[0, 0]
    expected = torch.tensor((lab - np.array(LAB_MEAN)) / np.array(LAB_STD), dtype=torch.float32)
    finetune = train_transform(config, FinetuneArguments(model="x", data="builtin", auto_augment=None, reprob=0.0))
    for pipeline in (sslhub.evaluation.get_method("cmc").eval_transform(config), finetune):
        pixels = pipeline(image)
        assert pixels.shape == (3, 32, 32)
        assert torch.allclose(pixels, expected[:, None, None].expand(3, 32, 32), atol=1e-4)
