"""RotNet (arXiv 1803.07728): the four rotations, the batch of all four copies, the loss (eq. 1-2), the VISSL and
MMSelfSup files converted against their models written out, bad files, the releases."""

import sys
import types

import numpy as np
import pytest
import torch
import torchvision
from helpers import noise_images, random_batch_norm_statistics, recipe_batch, relative_error
from PIL import Image
from torch import nn
from vissl_models import VisslModel, vissl_checkpoint

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import build_converted_model, convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, StandIn, load_file_state
from sslhub.conversion.vissl import VISSL_TRUNK, read_vissl
from sslhub.methods.rotnet import rotations
from sslhub.registry import get_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "rotnet_resnet18_32px"


def quarter_turn_counter_clockwise(image: torch.Tensor) -> torch.Tensor:
    """out[r, c] = image[c, W - 1 - r]: the top row comes from the right-hand column (PIL's rotate(90))."""
    height, width = image.shape[-2:]
    out = image.new_empty(*image.shape[:-2], width, height)
    for r in range(width):
        for c in range(height):
            out[..., r, c] = image[..., c, width - 1 - r]
    return out


def test_the_four_rotations_are_exact_counter_clockwise_quarter_turns():
    image = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    expected = [image]
    for _ in range(3):
        expected.append(quarter_turn_counter_clockwise(expected[-1]))
    for k, (actual, reference) in enumerate(zip(rotations(image), expected, strict=True)):
        assert torch.equal(actual, reference) and torch.equal(actual, torch.rot90(image, k, dims=(1, 2)))
    pixels = np.random.default_rng(0).integers(0, 255, (6, 4, 3), dtype=np.uint8)  # VISSL: TF.rotate(img, 90 k)
    for k, actual in enumerate(rotations(torch.from_numpy(pixels).permute(2, 0, 1))):
        rotated = np.array(Image.fromarray(pixels).rotate(90 * k, expand=True))
        assert torch.equal(actual, torch.from_numpy(rotated).permute(2, 0, 1))


@pytest.mark.parametrize("preset", [PRESET, "rotnet_resnet50"])
def test_every_image_has_its_four_rotations_in_the_batch_with_their_ids(preset):
    model = sslhub.create_model(preset, task="pretraining", image_size=32)
    batch = recipe_batch(model, noise_images(3))
    assert len(batch.views) == 4 and batch.extras["rotation"].tolist() == [[0, 1, 2, 3]] * 3
    upright = batch.views[0]
    assert upright.shape == (3, 3, 32, 32) and not torch.equal(upright[0], upright[1])  # one crop per image
    for k in range(1, 4):
        assert torch.equal(batch.views[k], torch.rot90(upright, k, dims=(2, 3)))


def test_loss_is_the_cross_entropy_of_each_images_four_rotations_written_out():
    torch.manual_seed(0)
    model = sslhub.create_model(PRESET, task="pretraining").eval()  # eval: each image's logits on their own
    method = model.method
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    views = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    with torch.no_grad():
        output = model(Batch(views, torch.arange(3), extras={"rotation": torch.arange(4).repeat(3, 1)}))
        expected = 0.0
        for image in images:  # eq. 2: -1/4 Σ_y log F^y(g(X, y)), averaged over the N images
            for y in range(4):
                logits = method.head(method.encoder(torch.rot90(image, y, dims=(1, 2))[None]))[0]
                expected -= (logits[y] - torch.logsumexp(logits, 0)) / 4
        expected /= 3
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.0 <= output.metrics["rotation_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="4 rotated views"):
        model(Batch([images], torch.arange(3)))


def test_batch_norm_is_not_decayed_in_the_vissl_recipe():
    model = sslhub.create_model("rotnet_resnet18_32px", task="pretraining", decay_batch_norm=False)
    decayed, exempt = model.method.param_groups()
    names = {id(p): n for n, p in model.method.named_parameters()}
    assert decayed["weight_decay"] == 5e-4 and exempt["weight_decay"] == 0.0
    assert {names[id(p)] for p in exempt["params"]} == {
        n for n, _ in model.method.named_parameters() if ".bn" in n or "downsample.1" in n
    }
    assert "head.bias" in {names[id(p)] for p in decayed["params"]}  # regularize_bias: True
    assert len(sslhub.create_model(PRESET, task="pretraining").method.param_groups()) == 1  # the authors decay all


# ---- the authors' models, written out ------------------------------------------------------------------------------
def test_vissl_file_converts_to_the_vissl_model_written_out(tmp_path):
    model = VisslModel("resnet18")
    path = tmp_path / "model_final_checkpoint_phase125.torch"
    torch.save(vissl_checkpoint(model), path)
    container = load_file_state(path)
    assert detect_layout(container) is get_layout("rotnet_vissl")
    converted = read_checkpoint(path)
    assert "classy_state_dict.optimizer (not converted)" in converted.left_out and "loss (not converted)" in (
        converted.left_out
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pooled, logits = model.trunk(images), model(images)
        features = convert_checkpoint(PRESET, path)(images).pooler_output
        method = convert_checkpoint(PRESET, path, task="pretraining").method
        assert relative_error(features, pooled) < 1e-4
        assert relative_error(method.head(method.encoder(images)), logits) < 1e-4


class MMSelfSupResNet(nn.Module):
    """mmcls ResNet (style 'pytorch', the stride on the 3x3 conv): conv1, bn1, layer1-4 with conv/bn 1-3 and
    downsample.0/1, torchvision's names; returns the last stage's map (``out_indices=[4]``)."""

    def __init__(self, arch: str):
        super().__init__()
        net = getattr(torchvision.models, arch)()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class RotationPred(nn.Module):
    """mmselfsup RotationPred: ``backbone`` + ``ClsHead(with_avg_pool=True, num_classes=4)`` (avg-pool, ``fc_cls``),
    trained on labels i = ``mmcv.imrotate(img, 90 i)``, a CLOCKWISE turn."""

    def __init__(self, arch: str):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = MMSelfSupResNet(arch)
        self.head = nn.Module()
        self.head.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.head.fc_cls = nn.Linear(self.backbone.layer4[-1].conv1.in_channels, 4)
        random_batch_norm_statistics(self)

    def features(self, x):
        return self.head.avg_pool(self.backbone(x)).flatten(1)

    def forward(self, x):
        return self.head.fc_cls(self.features(x))


def save_mmselfsup_file(path, model: RotationPred, history) -> None:
    """mmengine ``save_checkpoint`` + mmselfsup ``tools/model_converters/publish_model.py`` (optimizer removed, legacy
    serialisation); ``message_hub`` holds mmengine ``HistoryBuffer`` objects (of a class importable only while
    saving, as on the authors' machine) whose history is ``history``."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self, values):
            self.max_length, self._log_history, self._count_history = 1000000, values, values

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    names = ["mmengine", "mmengine.logging", module.__name__]
    sys.modules.update({names[0]: types.ModuleType(names[0]), names[1]: types.ModuleType(names[1]), names[2]: module})
    try:
        container = {
            "meta": {"epoch": 70, "iter": 700000, "cfg": "model = dict(type='RotationPred')", "seed": 0},
            "state_dict": model.state_dict(),
            "message_hub": {"log_scalars": {"train/loss": HistoryBuffer(history)}, "runtime_info": {"epoch": 70}},
            "param_schedulers": [{"milestones": {30: 1, 50: 1}, "gamma": 0.1}],
        }
        torch.save(container, path, _use_new_zipfile_serialization=False)
    finally:
        for name in names:
            del sys.modules[name]


def clockwise_label(image: torch.Tensor, rotated: torch.Tensor) -> int:
    """MMSelfSup's label of ``rotated``: the i with ``rotated`` = ``image`` turned clockwise by 90 i."""
    turns = [i for i in range(4) if torch.equal(torch.rot90(image, -i, dims=(-2, -1)), rotated)]
    assert len(turns) == 1
    return turns[0]


def test_mmselfsup_file_converts_and_its_labels_become_counter_clockwise(tmp_path):
    model = RotationPred("resnet18")
    path = tmp_path / "rotation-pred_resnet18.pth"
    save_mmselfsup_file(path, model, [0.9, 0.8])
    container = load_file_state(path)
    assert detect_layout(container) is get_layout("rotnet_mmselfsup")
    assert sorted(read_checkpoint(path).left_out) == [
        "message_hub (not converted)", "meta (not converted)", "param_schedulers (not converted)"
    ]  # fmt: skip
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        released = convert_checkpoint(PRESET, path)
        assert relative_error(released(image).pooler_output, model.features(image)) < 1e-4
        method = convert_checkpoint(PRESET, path, task="pretraining").method
        for k, rotated in enumerate(rotations(image)):
            theirs = model(rotated)[0, clockwise_label(image, rotated)]
            ours = method.head(method.encoder(rotated))[0, k]
            assert relative_error(ours, theirs) < 1e-4
        assert relative_error(method.head(method.encoder(image)), model(image)[:, [0, 3, 2, 1]]) < 1e-4


def test_mmselfsup_file_with_numpy_history_loads(tmp_path):
    """mmengine's message hub keeps numpy arrays: they load as arrays, the HistoryBuffer as an inert stand-in."""
    path = tmp_path / "rotation-pred.pth"
    model = RotationPred("resnet18")
    save_mmselfsup_file(path, model, np.array([0.9, 0.8]))
    loaded = load_file_state(path)
    history = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(history, StandIn)
    assert np.array_equal(history.__dict__["_log_history"], np.array([0.9, 0.8]))
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in model.state_dict().items())


def test_bad_files_give_errors_naming_what_is_wrong(tmp_path):
    vissl = get_layout("rotnet_vissl")
    checkpoint = vissl_checkpoint(VisslModel("resnet18"))
    trunk = checkpoint["classy_state_dict"]["base_model"]["model"]["trunk"]
    with pytest.raises(CheckpointError, match="not a VISSL checkpoint: expected 'classy_state_dict'"):
        vissl.convert({"state_dict": trunk}, "f.torch")
    simclr = vissl_checkpoint(VisslModel("resnet18", head_dims=((None, 512), (512, 128))))
    assert not vissl.detect(simclr)  # a VISSL SimCLR file: same container, other heads
    with pytest.raises(CheckpointError, match="RotNet's VISSL head is .*'1.clf.0.weight'"):
        vissl.convert(simclr, "simclr.torch")
    clusterfit = vissl_checkpoint(VisslModel("resnet18", head_dims=((None, 16000),)))
    assert not vissl.detect(clusterfit)
    with pytest.raises(CheckpointError, match=r"\(16000, 512\) / \(16000,\), expected \(4, features\)"):
        vissl.convert(clusterfit, "clusterfit.torch")
    trunk["fc.weight"] = torch.zeros(4, 512)
    with pytest.raises(CheckpointError, match=r"keys outside '_feature_blocks.' .*'fc.weight'"):
        vissl.convert(checkpoint, "f.torch")
    state = {f"backbone.{k}": v for k, v in RotationPred("resnet18").backbone.state_dict().items()}
    state |= {"head.fc_cls.weight": torch.zeros(4, 512), "head.fc_cls.bias": torch.zeros(4), "neck.w": torch.ones(1)}
    with pytest.raises(CheckpointError, match="unexpected keys for this layout: \\['neck.w'\\]"):
        get_layout("rotnet_mmselfsup").convert({"state_dict": state}, "m.pth")


def test_a_vissl_file_without_heads_is_a_plain_encoder(tmp_path):
    model = VisslModel("resnet18")
    container = {"model_state_dict": model.trunk.state_dict()}  # family B (converted legacy models)
    assert VISSL_TRUNK.detect(container) and not get_layout("rotnet_vissl").detect(container)
    assert read_vissl(container, "b.torch").heads == {}
    converted = VISSL_TRUNK.convert(container, "b.torch")
    encoder = build_converted_model(sslhub.SSLConfig.from_preset(PRESET), converted)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(encoder(images).pooler_output, model.trunk(images)) < 1e-4
    assert not VISSL_TRUNK.detect(vissl_checkpoint(model))


def test_releases_resolve_and_the_vissl_in1k_tag_builds_resnet50(tmp_path):
    expected = {
        "rotnet_resnet50.in1k": ("rotnet_vissl", {"linear": 48.2}, "model_final_checkpoint_phase125.torch", 105),
        "rotnet_resnet50.in22k": ("rotnet_vissl", {"linear": 54.89}, "converted_vissl_rn50_rotnet_in22k_ep105.torch",
                                  105),
        "rotnet_resnet50.in1k_mmselfsup": ("rotnet_mmselfsup", {"linear": 47.0},
                                           "rotation-pred_resnet50_8xb16-steplr-70e_in1k_20220825-a8bf5f69.pth", 70),
    }  # fmt: skip
    for name, (layout, metrics, file_name, epochs) in expected.items():
        tag = get_pretrained(name)
        assert (tag.layout, tag.metrics, tag.file_name, tag.epochs) == (layout, metrics, file_name, epochs)
        assert get_layout(tag.layout).name == layout
    assert get_pretrained("rotnet_resnet50.in22k").pretraining_data == "imagenet-22k"
    model = VisslModel("resnet50")
    path = tmp_path / "model_final_checkpoint_phase125.torch"
    torch.save(vissl_checkpoint(model), path)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    released = sslhub.create_model("rotnet_resnet50.in1k", pretrained=True, pretrained_path=path)
    with torch.no_grad():
        features = released(images).pooler_output
        assert features.shape == (1, 2048) and relative_error(features, model.trunk(images)) < 1e-4
