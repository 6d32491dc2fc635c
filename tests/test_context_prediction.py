"""Context prediction (arXiv 1505.05192): the 3 x 3 patch grid (positions, gap, jitter) and its position ids, the
8-way cross-entropy, the colour handling, MMSelfSup's RelativeLoc file converted against its model written out, bad
files, the release."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import noise_images, random_batch_norm_statistics, recipe_batch, relative_error
from torch import nn

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, load_file_state
from sslhub.methods import TrainingProgress
from sslhub.methods.context_prediction import GreenMagentaProjection, PatchGrid, downsample_patches
from sslhub.registry import get_pretrained
from sslhub.training import PretrainArguments, Pretrainer

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "context_prediction_resnet18_32px"
TINY = {"backbone": "test_resnet", "hidden_dim": 16}


def paper_position(d_row: int, d_col: int) -> int:
    """Where a neighbour lies around the centre, row-major without the centre (deepcontext ``pos2lbl``):
    0 1 2 / 3 _ 4 / 5 6 7."""
    return {(-1, -1): 0, (-1, 0): 1, (-1, 1): 2, (0, -1): 3, (0, 1): 4, (1, -1): 5, (1, 0): 6, (1, 1): 7}[d_row, d_col]


def coordinate_image(side: int) -> torch.Tensor:
    """Channel 0 holds each pixel's row, channel 1 its column, channel 2 zeros."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows, cols, torch.zeros_like(rows)]).float()


@pytest.mark.parametrize("patch, gap, jitter", [(64, 21, 21), (96, 48, 14), (8, 3, 2)])
def test_patch_grid_places_each_patch_in_its_cell_with_the_gap_and_jitter(patch, gap, jitter):
    grid = PatchGrid(patch, gap, jitter)
    assert grid.side == 3 * patch + 2 * gap + jitter
    image = coordinate_image(grid.side)
    offsets = []
    torch.manual_seed(0)
    for _ in range(200):
        corners = grid.corners()
        patches = grid.cut(image, corners)
        assert patches.shape == (9, 3, patch, patch)
        for cell, (top, left) in enumerate(corners.tolist()):
            row, col = divmod(cell, 3)
            offsets += [top - row * (patch + gap), left - col * (patch + gap)]
            assert patches[cell, 0, 0, 0] == top and patches[cell, 1, 0, 0] == left  # the crop at that corner
            assert top + patch <= grid.side and left + patch <= grid.side
        tops, lefts = corners[:, 0].reshape(3, 3), corners[:, 1].reshape(3, 3)
        horizontal_gaps = lefts[:, 1:] - (lefts[:, :-1] + patch)
        vertical_gaps = tops[1:, :] - (tops[:-1, :] + patch)
        for gaps in (horizontal_gaps, vertical_gaps):
            assert int(gaps.min()) >= gap - jitter >= 0 and int(gaps.max()) <= gap + jitter
    assert min(offsets) == 0 and max(offsets) == jitter  # the jitter spans 0..J and no further


def test_mmselfsup_geometry_is_cells_of_a_third_with_a_random_64px_patch():
    """MMSelfSup ``image_to_patches``: 255 // 3 = 85 px cells, a 64 px patch at a random offset 0..21 in each."""
    grid = PatchGrid(64, 21, 21)
    assert grid.side == 255 and 255 // 3 == 64 + 21
    torch.manual_seed(1)
    for _ in range(50):
        for cell, (top, left) in enumerate(grid.corners().tolist()):
            row, col = divmod(cell, 3)
            assert row * 85 <= top <= row * 85 + 85 - 64 and col * 85 <= left <= col * 85 + 85 - 64


def test_recipe_gives_the_centre_then_its_eight_neighbours_with_their_positions():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY)
    hp = model.method.hparams
    batch = recipe_batch(model, noise_images(3))
    assert len(batch.views) == 9 and all(v.shape == (3, 3, 8, 8) for v in batch.views)
    corners, position = batch.extras["corners"], batch.extras["position"]
    assert corners.shape == (3, 9, 2) and position.shape == (3, 8)
    stride = hp.patch_size + hp.gap
    for image in range(3):
        centre = corners[image, 0]
        assert all(stride <= int(v) <= stride + hp.jitter for v in centre)
        for k in range(8):
            d_row, d_col = (torch.round((corners[image, 1 + k] - centre).float() / stride)).long().tolist()
            assert int(position[image, k]) == paper_position(d_row, d_col)
    assert sorted(position[0].tolist()) == list(range(8))


def test_loss_is_cross_entropy_of_the_neighbours_position_written_out():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY).eval()
    method = model.method
    batch = recipe_batch(model, noise_images(3))
    with torch.no_grad():
        loss = model(batch).loss
        pooled = [method.encoder.backbone.forward_features(view).mean(dim=(2, 3)) for view in batch.views]
        bn = method.neck.bn
        expected = 0.0
        for image in range(3):
            for k in range(8):
                pair = torch.cat([pooled[1 + k][image], pooled[0][image]])  # [neighbour, centre]
                hidden = method.neck.fc.weight @ pair + method.neck.fc.bias
                hidden = (hidden - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
                logits = method.head.weight @ hidden.clamp_min(0) + method.head.bias
                expected -= logits.log_softmax(0)[int(batch.extras["position"][image, k])]
    assert loss.item() == pytest.approx(expected.item() / 24, rel=1e-5)


def test_training_step_learns_and_reports_the_position_accuracy():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY).train()
    output = model(recipe_batch(model, noise_images(3)))
    output.loss.backward()
    assert 0 <= output.metrics["position_accuracy"] <= 1
    assert model.method.head.weight.grad.abs().sum() > 0 and model.method.neck.fc.weight.grad.abs().sum() > 0


def test_neck_and_head_decay_five_times_more(tmp_path):
    method = sslhub.create_model(PRESET, task="pretraining", **TINY).method
    backbone_group, head_group = method.param_groups()
    assert backbone_group["weight_decay"] == 1e-4 and head_group["weight_decay"] == pytest.approx(5e-4)
    assert head_group["weight_decay_scale"] == 5.0
    heads = {id(p) for p in [*method.neck.parameters(), *method.head.parameters()]}
    assert {id(p) for p in head_group["params"]} == heads
    assert len(backbone_group["params"]) + len(head_group["params"]) == len(list(method.parameters()))
    args = PretrainArguments(model=PRESET, data="builtin", output_dir=str(tmp_path), batch_size=32, knn_every=0,
                             log_with=None, progress=False, overrides=TINY)  # fmt: skip
    trainer = Pretrainer(args)
    trainer.set_schedules(TrainingProgress(3, trainer.total_steps, trainer.steps_per_epoch))  # the trainer keeps x5
    assert [group["weight_decay"] for group in trainer.optimizer.param_groups] == pytest.approx([1e-4, 5e-4])


def test_projection_removes_the_green_magenta_axis_and_keeps_gray():
    project = GreenMagentaProjection()
    gray, axis = torch.full((3, 1, 1), 0.4), torch.tensor([-1.0, 2.0, -1.0]).reshape(3, 1, 1)
    torch.testing.assert_close(project(gray + 0.1 * axis), gray)
    pixels = torch.rand(3, 4, 4)
    torch.testing.assert_close(project(project(pixels)), project(pixels))  # a projection
    assert torch.allclose((project(pixels) * axis).sum(0), torch.zeros(4, 4), atol=1e-6)


def test_colour_dropping_keeps_one_channel_and_downsampling_pixelates():
    model = sslhub.create_model(PRESET, task="pretraining", color_dropping=True, grayscale_p=0.0, **TINY)
    batch = recipe_batch(model, noise_images(3))
    for view in batch.views:
        zero_channels = (view.abs().flatten(2).amax(2) == 0).sum(1)
        assert zero_channels.tolist() == [2, 2, 2]
    patches = torch.rand(9, 3, 64, 64)
    torch.manual_seed(0)
    assert torch.equal(downsample_patches(patches, 0.0), patches)
    coarse = downsample_patches(patches, 1.0)
    assert coarse.shape == patches.shape and all(not torch.equal(a, b) for a, b in zip(coarse, patches, strict=True))


def test_bad_inputs_raise_clear_errors():
    model = sslhub.create_model(PRESET, task="pretraining", **TINY)
    with pytest.raises(ValueError, match="9 views"):
        model(Batch([torch.randn(2, 3, 8, 8)] * 2))
    with pytest.raises(ValueError, match="overlap"):
        sslhub.create_model(PRESET, task="pretraining", jitter=4)
    with pytest.raises(ValueError, match="smaller than the patch grid"):
        sslhub.create_model(PRESET, task="pretraining", resize=30)
    with pytest.raises(ValueError, match="takes a 32 px crop"):
        PatchGrid(8, 3, 2).cut(torch.zeros(3, 30, 30), torch.zeros(9, 2, dtype=torch.long))


# ---- MMSelfSup's RelativeLoc, written out (models/algorithms/relative_loc.py, necks/relative_loc_neck.py,
# heads/cls_head.py; the mmcls ResNet has torchvision's names and returns the stage-4 map) ---------------------------
class AuthorsBackbone(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        net = getattr(torchvision.models, arch)()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return (self.layer4(self.layer3(self.layer2(self.layer1(x)))),)  # out_indices=[4]


class AuthorsNeck(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels * 2, out_channels)
        self.bn = nn.BatchNorm1d(out_channels, momentum=0.003)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout()

    def forward(self, x):
        x = self.avgpool(x[0])
        return [self.dropout(self.relu(self.bn(self.fc(x.view(x.size(0), -1)))))]


class AuthorsClsHead(nn.Module):
    def __init__(self, in_channels, num_classes=8):
        super().__init__()
        self.fc_cls = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc_cls(x[0])


class AuthorsRelativeLoc(nn.Module):
    def __init__(self, arch: str, channels: int, hidden: int):
        super().__init__()
        self.backbone, self.neck = AuthorsBackbone(arch), AuthorsNeck(channels, hidden)
        self.head = AuthorsClsHead(hidden)

    def forward(self, patches):
        """``patches`` (N, 9, C, H, W): the recipe's [centre, neighbours]; ``RelativeLocDataPreprocessor``: img1 the
        8N neighbours, img2 each centre repeated 8 times; ``loss``: [x1, x2] concatenated, neck, head."""
        img1 = patches[:, 1:].flatten(0, 1)
        img2 = patches[:, :1].repeat(1, 8, 1, 1, 1).flatten(0, 1)
        x = (torch.cat((self.backbone(img1)[0], self.backbone(img2)[0]), dim=1),)
        return self.head(self.neck(x))


def authors_model(arch="resnet18", channels=512, hidden=32):
    torch.manual_seed(0)
    model = AuthorsRelativeLoc(arch, channels, hidden)
    return random_batch_norm_statistics(model)


def mmselfsup_1x_label(row: int, col: int) -> int:
    """1.x ``RandomPatchWithLabels``: ``for i: for j: imcrop(img, [i g, j g, (i+1) g, (j+1) g])`` with mmcv boxes
    (x1, y1, x2, y2), so patch i * 3 + j is at column i, row j; the views after the centre are patches 0..8 but 4,
    labelled 0..7."""
    order = [(i, j) for i in range(3) for j in range(3) if i * 3 + j != 4]  # (column, row) of label 0..7
    return order.index((col, row))


def save_mmselfsup_file(path, model, version="1.x"):
    meta = {"mmengine_version": "0.1.0", "cfg": "model = dict(type='RelativeLoc')", "epoch": 70}
    if version == "0.x":
        meta = {"mmcv_version": "1.4.0", "config": "model = dict(type='RelativeLoc')", "epoch": 70}
    container = {"meta": meta, "state_dict": model.state_dict()}
    if version == "1.x":
        container["message_hub"] = {"log_scalars": {}, "runtime_info": {"epoch": 70}}
    torch.save(container, path)


def sslhub_logits(method, patches):
    return method.position_logits(patches[:, 1:].flatten(0, 1), patches[:, 0])


@pytest.mark.parametrize("version", ["1.x", "0.x"])
def test_mmselfsup_file_converts_to_the_same_features_and_position_logits(tmp_path, version):
    model = authors_model()
    path = tmp_path / "relative-loc.pth"
    save_mmselfsup_file(path, model, version)
    container = load_file_state(path)
    assert detect_layout(container) is get_layout("context_prediction_mmselfsup")
    converted = read_checkpoint(path)
    assert converted.method_overrides == {"hidden_dim": 32}
    patches = torch.randn(2, 9, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    method = convert_checkpoint(PRESET, path, task="pretraining").method
    encoder = convert_checkpoint(PRESET, path)
    with torch.no_grad():
        authors, ours = model(patches), sslhub_logits(method, patches)
        authors_pooled = model.backbone(patches[:, 0])[0].mean(dim=(2, 3))
        assert relative_error(encoder(patches[:, 0]).pooler_output, authors_pooled) < 1e-4
    for row in range(3):
        for col in range(3):
            if (row, col) == (1, 1):
                continue
            theirs = mmselfsup_1x_label(row, col) if version == "1.x" else paper_position(row - 1, col - 1)
            assert relative_error(ours[:, paper_position(row - 1, col - 1)], authors[:, theirs]) < 1e-4


def test_release_tag_builds_resnet50_from_the_mmselfsup_file(tmp_path):
    tag = get_pretrained("context_prediction_resnet50.in1k_mmselfsup")
    assert (tag.layout, tag.metrics, tag.epochs, tag.license) == ("context_prediction_mmselfsup", {"linear": 40.4},
                                                                   70, "apache-2.0")  # fmt: skip
    assert tag.file_name == "relative-loc_resnet50_8xb64-steplr-70e_in1k_20220825-daae1b41.pth"
    model = authors_model("resnet50", 2048, 16)
    path = tmp_path / tag.file_name
    save_mmselfsup_file(path, model)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    released = sslhub.create_model("context_prediction_resnet50.in1k_mmselfsup", pretrained=True, pretrained_path=path)
    timm_resnet = torchvision.models.resnet50()
    timm_resnet.fc = nn.Identity()
    timm_resnet.load_state_dict(model.backbone.state_dict(), strict=False)
    with torch.no_grad():
        features = released(images).pooler_output
        reference = model.backbone(images)[0].mean(dim=(2, 3))
        assert features.shape == (1, 2048) and relative_error(features, reference) < 1e-4
        assert relative_error(features, timm_resnet.eval()(images)) < 1e-4
    assert type(released.encoder.backbone).__module__ == "timm.models.resnet"


def test_detection_claims_only_relative_loc_files(tmp_path):
    model = authors_model()
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    rotation = {**state, "head.fc_cls.weight": torch.zeros(4, 512), "head.fc_cls.bias": torch.zeros(4)}
    for container in ({"state_dict": rotation}, state, {"state_dict": state}):
        assert not get_layout("context_prediction_mmselfsup").detect(container)
    wrong_head = {**model.state_dict(), "head.fc_cls.weight": torch.zeros(8, 31)}
    assert not get_layout("context_prediction_mmselfsup").detect({"state_dict": wrong_head})


def test_bad_files_raise_errors_that_name_the_problem(tmp_path):
    state = authors_model().state_dict()
    cases = {
        "wrong_head": ({**state, "head.fc_cls.weight": torch.zeros(4, 32), "head.fc_cls.bias": torch.zeros(4)},
                       "expected \\(8, 32\\)"),
        "no_bn": ({k: v for k, v in state.items() if not k.startswith("neck.bn.")}, "neck.fc / neck.bn"),
        "extra": ({**state, "queue": torch.zeros(3)}, "unexpected keys.*queue"),
    }  # fmt: skip
    for name, (broken, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save({"meta": {"mmengine_version": "0.1.0"}, "state_dict": broken}, path)
        with pytest.raises(CheckpointError, match=message) as error:
            read_checkpoint(path, layout="context_prediction_mmselfsup")
        assert str(path) in str(error.value)
    with pytest.raises(CheckpointError, match="expected an entry 'state_dict'"):
        get_layout("context_prediction_mmselfsup").convert({"model": state}, "file.pth")


def test_rotnet_and_relative_loc_files_go_to_their_own_method(tmp_path):
    path = tmp_path / "relative-loc.pth"
    save_mmselfsup_file(path, authors_model())
    with pytest.raises(CheckpointError, match="not of 'rotnet'"):
        convert_checkpoint("rotnet_resnet18_32px", path)


def test_released_encoder_pools_the_backbone_and_ignores_patch_size():
    encoder = sslhub.create_model(PRESET, **{"backbone": "test_resnet"}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = encoder.encoder.backbone.forward_features(images).mean(dim=(2, 3))
        torch.testing.assert_close(encoder(images).pooler_output, expected)
    assert F.normalize(expected, dim=1).shape == (2, encoder.num_features)
