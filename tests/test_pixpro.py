"""PixPro (arXiv 2011.10043, zdaxie/PixPro): the positive pixel pairs from the views' boxes, the pixel propagation
module, the pixel loss, the momentum schedule, the recorded crop boxes, the instance branch and the authors' release
(their PixPro model written out here with their key names, saved as main_pretrain.py saves it)."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import build, relative_error
from PIL import Image
from torch import nn

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError
from sslhub.methods import TrainingProgress
from sslhub.methods.pixpro import positive_mask, propagate
from sslhub.registry import get_method, get_pretrained
from sslhub.transforms import CropWithBox

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"projector_hidden_dim": 32, "embed_dim": 16}


def build_small(**overrides):
    return build("pixpro_resnet18_32px", **SMALL, **overrides)


def images(seed=0, batch=3, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# (B, 2, 4) boxes (x0, y0, x1, y1) of two views; the second view of image 1 is flipped (x0 > x1)
BOXES = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 0.5]],
                      [[0.2, 0.1, 0.7, 0.9], [0.9, 0.3, 0.1, 0.8]],
                      [[0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]]])  # fmt: skip


def test_defaults_are_the_400_epoch_script():
    hp = get_method("pixpro").Hparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.lr_scaling, hp.sgd_momentum) == ("lars", 1.0, 256, "linear", 0.9)
    assert (hp.weight_decay, hp.warmup_epochs, hp.warmup_start_ratio, hp.min_lr) == (1e-5, 5, 0.01, 1e-6)
    assert hp.epochs == 400
    assert (hp.gamma, hp.momentum, hp.pos_ratio, hp.clamp_value, hp.transform_layers) == (2.0, 0.99, 0.7, 0.0, 1)
    assert (hp.instance_loss_weight, hp.projector_hidden_dim, hp.embed_dim, hp.crop_scale_min) == (0.0, 4096, 256, 0.08)
    assert hp.sync_batch_norm and tuple(hp.blur_prob) == (1.0, 0.1) and tuple(hp.solarize_prob) == (0.0, 0.2)
    recipe = get_method("pixpro").get_linear_recipe()
    assert (recipe.base_lr, recipe.epochs, recipe.batch_size, recipe.warmup_epochs) == (30.0, 100, 256, 5)
    with pytest.raises(ValueError, match="transform_layers 3"):
        get_method("pixpro").Hparams(transform_layers=3)


def test_small_preset_keeps_a_4x4_map_and_the_resnet50_a_7x7_one():
    method = build_small().method
    assert method.encoder.forward_features(images()).shape == (3, 512, 4, 4)
    assert sslhub.create_model("pixpro_resnet18").config.backbone_kwargs == {}  # 224 px: the stride-32 ResNet
    with torch.device("meta"):
        big = sslhub.create_model("pixpro_resnet50", task="pretraining").method
    assert big.encoder.forward_features(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 2048, 7, 7)
    assert [type(m) for m in big.projector.children()][:2] == [nn.Conv2d, nn.BatchNorm2d]
    assert big.projector.fc1.weight.shape == (4096, 2048, 1, 1) and big.projector.fc2.weight.shape == (256, 4096, 1, 1)
    assert big.value_transform.weight.shape == (256, 256, 1, 1) and big.value_transform.bias is not None


# ---- positive pairs (§3.1, regression_loss's pos_mask) ---------------------------------------------------------------
def written_out_mask(box_q, box_k, size, threshold):
    """For every pixel (row r, column c) of a size x size map: its bin centre x0 + (c + 0.5)(x1 - x0) / size, ...;
    positive when the distance of two centres / the larger bin diagonal < threshold."""

    def centres(box):
        x0, y0, x1, y1 = box
        width, height = (x1 - x0) / size, (y1 - y0) / size
        points = [(x0 + (c + 0.5) * width, y0 + (r + 0.5) * height) for r in range(size) for c in range(size)]
        return points, math.hypot(width, height)

    (points_q, diag_q), (points_k, diag_k) = centres(box_q), centres(box_k)
    return torch.tensor([[float(math.dist(p, q) / max(diag_q, diag_k) < threshold) for q in points_k]
                         for p in points_q])  # fmt: skip


def test_positive_mask_is_the_normalised_distance_below_the_threshold():
    mask = positive_mask(BOXES[:, 0], BOXES[:, 1], 4, 4, 0.7)
    assert mask.shape == (3, 16, 16)
    for b in range(3):
        expected = written_out_mask(BOXES[b, 0].tolist(), BOXES[b, 1].tolist(), 4, 0.7)
        assert torch.equal(mask[b], expected), b
    # one box against itself: neighbouring bins lie one bin width = 0.707 diagonals apart, above T = 0.7, so each
    # pixel pairs with itself only; against its mirror image (x0, x1 swapped) pixel (r, c) pairs with (r, 3 - c)
    whole, mirrored = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(positive_mask(whole, whole, 4, 4, 0.7)[0], torch.eye(16))
    assert torch.equal(
        positive_mask(whole, mirrored, 4, 4, 0.7)[0], torch.eye(16).reshape(16, 4, 4).flip(2).reshape(16, 16)
    )
    assert positive_mask(whole, whole, 4, 4, 0.71)[0].sum() == 16 + 2 * 24  # and the 4-neighbours above 0.707
    assert not positive_mask(BOXES[2:, 0], BOXES[2:, 1], 4, 4, 0.7).any()  # disjoint quarters: no pair
    assert torch.equal(positive_mask(BOXES[:, 1], BOXES[:, 0], 4, 4, 0.7), mask.transpose(1, 2))


# ---- pixel propagation module (eq. 1, 2, featprop) ----------------------------------------------------------------
def test_propagation_is_the_sharpened_similarity_weighted_sum_of_normalised_values():
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(2, 5, 3, 3, generator=gen), torch.randn(2, 5, 3, 3, generator=gen)
    for gamma, clamp in ((2.0, 0.0), (1.0, -1.0), (0.5, 0.1)):
        y = propagate(x, g, gamma, clamp)
        for b in range(2):
            pixels, values = x[b].reshape(5, 9).t(), g[b].reshape(5, 9).t()
            for i in range(9):
                expected = torch.zeros(5)
                for j in range(9):
                    s = max(F.cosine_similarity(pixels[i], pixels[j], dim=0).item(), clamp)
                    s = (s + (1e-6 if gamma < 1 else 0)) ** gamma
                    expected += s * values[j] / values[j].norm()
                torch.testing.assert_close(y[b].reshape(5, 9)[:, i], expected, atol=1e-5, rtol=1e-5)


# ---- the loss (eq. 3, 4) -----------------------------------------------------------------------------------------
def test_loss_is_minus_two_mean_cosine_over_positive_pairs_symmetrised():
    model = build_small()
    method = model.method.train()
    x1, x2 = images(1), images(2)
    with torch.no_grad():
        loss = method(Batch.of([x1, x2], boxes=BOXES)).loss
        maps = [method.encoder.forward_features(x) for x in (x1, x2)]
        projections = [method.projector(f) for f in maps]
        values = [method.value_transform(p) for p in projections]
        y = [propagate(p, v, 2.0) for p, v in zip(projections, values, strict=True)]
        z = [method.projector_k(method.encoder_k.forward_features(x)) for x in (x1, x2)]
    expected = 0.0
    for q, k, box_q, box_k in ((0, 1, 0, 1), (1, 0, 1, 0)):
        per_image = []
        for b in range(3):
            mask = written_out_mask(BOXES[b, box_q].tolist(), BOXES[b, box_k].tolist(), 4, 0.7)
            yq, zk = y[q][b].reshape(16, 16).t(), z[k][b].reshape(16, 16).t()
            cosine = F.cosine_similarity(yq[:, None], zk[None], dim=-1)
            per_image.append((cosine * mask).sum() / (mask.sum() + 1e-6))
        expected += -2 * sum(per_image) / 3
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"batch.extras\['boxes'\] of shape \(3, 2, 4\)"):
        method(Batch.of([x1, x2]))
    with pytest.raises(ValueError, match="2 views"):
        method(Batch.of([x1], boxes=BOXES))


def test_gradients_reach_the_online_networks_and_not_the_momentum_copies():
    method = build_small().method.train()
    method(Batch.of([images(1), images(2)], boxes=BOXES)).loss.backward()
    for name, p in method.named_parameters():
        if name.startswith(("encoder_k.", "projector_k.")):
            assert not p.requires_grad and p.grad is None, name
    assert method.value_transform.weight.grad.abs().sum() > 0 and method.projector.fc1.weight.grad.abs().sum() > 0


def test_momentum_follows_the_cosine_schedule_one_step_ahead():
    """``_momentum_update_key_encoder`` at forward k+1 uses m = 1 - (1 - 0.99)(cos(π (k+1) / K) + 1) / 2."""
    method = build_small().method
    for step in (0, 4, 9):
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * (step + 1) / 10) + 1) / 2
        assert method.momentum_at(TrainingProgress(step, 10, 5)) == pytest.approx(expected)
    assert [len(pair) for pair in method.momentum_pairs()] == [2, 2]
    assert method.momentum_pairs()[0] == (method.encoder, method.encoder_k)


def test_instance_branch_adds_the_weighted_byol_loss():
    method = build_small(instance_loss_weight=0.5).method.train()
    assert len(method.momentum_pairs()) == 3
    x1, x2 = images(1), images(2)
    with torch.no_grad():
        pixel_only = build_small().method.train()
        pixel_only.load_state_dict(method.state_dict(), strict=False)
        loss, pixel = method(Batch.of([x1, x2], boxes=BOXES)).loss, pixel_only(Batch.of([x1, x2], boxes=BOXES)).loss
        maps = [method.encoder.forward_features(x) for x in (x1, x2)]
        p = [F.normalize(method.predictor(method.projector_instance(f)).mean((2, 3)), dim=1) for f in maps]
        maps_k = [method.encoder_k.forward_features(x) for x in (x1, x2)]
        z = [F.normalize(method.projector_instance_k(f).mean((2, 3)), dim=1) for f in maps_k]
        instance = -2 * (p[0] * z[1]).sum(1).mean() - 2 * (p[1] * z[0]).sum(1).mean()
    torch.testing.assert_close(loss, pixel + 0.5 * instance, atol=1e-5, rtol=1e-5)


# ---- views (get_transform('BYOL') with transform_coord.py) --------------------------------------------------------
def test_crop_box_is_the_crop_in_normalised_image_coordinates_swapped_when_flipped(monkeypatch):
    image = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3))
    crop = CropWithBox(8, flip_p=0.0)
    monkeypatch.setattr(crop.crop, "get_params", lambda *_: (10, 20, 16, 24))  # top, left, height, width
    view, box = crop(image)
    torch.testing.assert_close(box, torch.tensor([20 / 59, 10 / 39, 43 / 59, 25 / 39]))
    expected = image.crop((20, 10, 44, 26)).resize((8, 8), Image.BILINEAR)
    assert np.abs(np.asarray(view, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    flipped = CropWithBox(8, flip_p=1.0)
    monkeypatch.setattr(flipped.crop, "get_params", lambda *_: (10, 20, 16, 24))
    flipped_view, flipped_box = flipped(image)
    torch.testing.assert_close(flipped_box, torch.tensor([43 / 59, 10 / 39, 20 / 59, 25 / 39]))
    assert np.array_equal(np.asarray(flipped_view), np.asarray(view)[:, ::-1])


def test_view_recipe_records_both_boxes_and_the_asymmetric_colour_steps():
    recipe = build_small().method.view_recipe()
    torch.manual_seed(0)
    sample = recipe(Image.fromarray(np.full((48, 48, 3), 128, dtype=np.uint8)))
    assert [v.shape for v in sample.views] == [(3, 32, 32)] * 2 and sample.extras["boxes"].shape == (2, 4)
    assert ((sample.extras["boxes"] >= 0) & (sample.extras["boxes"] <= 1)).all()
    text = repr(sslhub.create_model("pixpro_resnet50", task="pretraining", **SMALL).method.view_recipe())
    assert text.count("RandomSolarize") == 1 and text.count("GaussianBlur") == 2 and "scale=(0.08, 1.0)" in text


# ---- the authors' release (contrast/models/PixPro.py, contrast/resnet.py early_return) ----------------------------
class AuthorsMLP2d(nn.Module):
    def __init__(self, in_dim, inner_dim, out_dim):
        super().__init__()
        self.linear1 = nn.Conv2d(in_dim, inner_dim, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(inner_dim)
        self.relu1 = nn.ReLU(inplace=True)
        self.linear2 = nn.Conv2d(inner_dim, out_dim, 1, bias=True)

    def forward(self, x):
        return self.linear2(self.relu1(self.bn1(self.linear1(x))))


class AuthorsEncoder(nn.Module):
    """contrast/resnet.py with head_type='early_return': torchvision's ResNet names, C5 returned, no fc."""

    def __init__(self, arch):
        super().__init__()
        resnet = getattr(torchvision.models, arch)()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AuthorsPixPro(nn.Module):
    def __init__(self, arch, inner_dim, out_dim):
        super().__init__()
        self.encoder, self.encoder_k = AuthorsEncoder(arch), AuthorsEncoder(arch)
        dim = 2048 if arch == "resnet50" else 512
        self.projector, self.projector_k = AuthorsMLP2d(dim, inner_dim, out_dim), AuthorsMLP2d(dim, inner_dim, out_dim)
        self.value_transform = nn.Conv2d(out_dim, out_dim, 1, bias=True)

    def featprop(self, feat):
        n, c, h, w = feat.shape
        value = F.normalize(self.value_transform(feat), dim=1).view(n, c, -1)
        feat = F.normalize(feat, dim=1).view(n, c, -1)
        attention = torch.clamp(torch.bmm(feat.transpose(1, 2), feat), min=0.0) ** 2
        return torch.bmm(value, attention.transpose(1, 2)).view(n, c, h, w)

    def regression_loss(self, q, k, coord_q, coord_k, pos_ratio=0.7):
        n, c, h, w = q.shape
        q, k = q.view(n, c, -1), k.view(n, c, -1)
        x_array = torch.arange(0.0, float(w)).view(1, 1, -1).repeat(1, h, 1)
        y_array = torch.arange(0.0, float(h)).view(1, -1, 1).repeat(1, 1, w)
        q_w, q_h = (
            ((coord_q[:, 2] - coord_q[:, 0]) / w).view(-1, 1, 1),
            ((coord_q[:, 3] - coord_q[:, 1]) / h).view(-1, 1, 1),
        )
        k_w, k_h = (
            ((coord_k[:, 2] - coord_k[:, 0]) / w).view(-1, 1, 1),
            ((coord_k[:, 3] - coord_k[:, 1]) / h).view(-1, 1, 1),
        )
        max_diag = torch.max(torch.sqrt(q_w**2 + q_h**2), torch.sqrt(k_w**2 + k_h**2))
        cqx, cqy = (
            (x_array + 0.5) * q_w + coord_q[:, 0].view(-1, 1, 1),
            (y_array + 0.5) * q_h + coord_q[:, 1].view(-1, 1, 1),
        )
        ckx, cky = (
            (x_array + 0.5) * k_w + coord_k[:, 0].view(-1, 1, 1),
            (y_array + 0.5) * k_h + coord_k[:, 1].view(-1, 1, 1),
        )
        dist = torch.sqrt((cqx.view(-1, h * w, 1) - ckx.view(-1, 1, h * w)) ** 2
                          + (cqy.view(-1, h * w, 1) - cky.view(-1, 1, h * w)) ** 2) / max_diag  # fmt: skip
        pos_mask = (dist < pos_ratio).float()
        logit = torch.bmm(q.transpose(1, 2), k)
        return -2 * ((logit * pos_mask).sum(-1).sum(-1) / (pos_mask.sum(-1).sum(-1) + 1e-6)).mean()

    def forward(self, im_1, im_2, coord1, coord2):
        pred_1 = F.normalize(self.featprop(self.projector(self.encoder(im_1))), dim=1)
        pred_2 = F.normalize(self.featprop(self.projector(self.encoder(im_2))), dim=1)
        proj_1_ng = F.normalize(self.projector_k(self.encoder_k(im_1)), dim=1)
        proj_2_ng = F.normalize(self.projector_k(self.encoder_k(im_2)), dim=1)
        return self.regression_loss(pred_1, proj_2_ng, coord1, coord2) + self.regression_loss(
            pred_2, proj_1_ng, coord2, coord1
        )


def authors_model(arch="resnet18", inner_dim=32, out_dim=16):
    torch.manual_seed(0)
    model = AuthorsPixPro(arch, inner_dim, out_dim)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def save_authors_file(path, model):
    """main_pretrain.py save_checkpoint after publish_model.py: ``{'model': DDP(PixPro).state_dict()}``."""
    torch.save({"model": {f"module.{key}": value for key, value in model.state_dict().items()}}, path)


def test_authors_file_converts_to_their_encoder_and_their_loss(tmp_path):
    authors = authors_model()
    with torch.no_grad():
        for p in authors.encoder_k.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    path = tmp_path / "pixpro_tiny.pth"
    save_authors_file(path, authors)
    container = torch.load(path, weights_only=True)
    assert detect_layout(container) is get_layout("pixpro")
    converted = read_checkpoint(path)
    assert converted.method_overrides == {"projector_hidden_dim": 32, "embed_dim": 16, "transform_layers": 1,
                                          "instance_loss_weight": 0.0}  # fmt: skip
    x1, x2 = images(4, 2, 64), images(5, 2, 64)
    with torch.no_grad():
        features = convert_checkpoint("pixpro_resnet18", path)(x1).pooler_output
        assert relative_error(features, authors.eval().encoder(x1).mean((2, 3))) < 1e-4
        timm_model = timm.create_model("resnet18", num_classes=0)
        timm_model.load_state_dict(sslhub.to_timm(convert_checkpoint("pixpro_resnet18", path)).state_dict())
        assert relative_error(timm_model.eval()(x1), features) < 1e-4
        model = convert_checkpoint("pixpro_resnet18", path, task="pretraining").train()
        authors.train()
        boxes = BOXES[:2]
        expected = authors(x1, x2, boxes[:, 0], boxes[:, 1])
        loss = model(Batch.of([x1, x2], boxes=boxes)).loss
    assert abs(loss.item() - expected.item()) <= 1e-4 * abs(expected.item())


def test_bad_files_raise_errors_naming_the_key(tmp_path):
    authors = authors_model()
    state = {f"module.{key}": value for key, value in authors.state_dict().items()}
    extra = tmp_path / "extra.pth"
    torch.save({"model": {**state, "module.queue": torch.zeros(3)}}, extra)
    with pytest.raises(CheckpointError, match="module.queue"):
        read_checkpoint(extra)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {**state, "module.projector.linear3.weight": torch.zeros(3)}}, wrong)
    with pytest.raises(CheckpointError, match="linear3.weight is not a key of PixPro's MLP2d"):
        read_checkpoint(wrong)
    no_model = tmp_path / "no_model.pth"
    torch.save({"state_dict": state}, no_model)
    with pytest.raises(CheckpointError, match="expected an entry 'model'"):
        read_checkpoint(no_model, layout="pixpro")
    no_transform = tmp_path / "no_transform.pth"
    torch.save({"model": {k: v for k, v in state.items() if "value_transform" not in k}}, no_transform)
    assert read_checkpoint(no_transform).method_overrides["transform_layers"] == 0
    # the file has no g, the model asked for one
    with pytest.raises(CheckpointError, match="missing.*value_transform.weight"):
        convert_checkpoint("pixpro_resnet18", no_transform, "pretraining", transform_layers=1)


def test_released_tag_builds_the_online_resnet50(tmp_path):
    tag = get_pretrained("pixpro_resnet50.in1k_400ep")
    assert (tag.layout, tag.epochs, tag.metrics, tag.license) == ("pixpro", 400, {}, "mit")
    assert "60.2" in tag.source and tag.file_name == "pixpro_base_r50_400ep.pth" and tag.full_url == tag.url
    authors = authors_model("resnet50", 16, 8)
    path = tmp_path / tag.file_name
    save_authors_file(path, authors)
    x = images(6, 1, 64)
    released = sslhub.create_model("pixpro_resnet50.in1k_400ep", pretrained=True, pretrained_path=path)
    with torch.no_grad():
        features = released(x).pooler_output
        expected = timm.create_model("resnet50", num_classes=0).eval()
        expected.load_state_dict({k[len("encoder.") :]: v for k, v in authors.state_dict().items()
                                  if k.startswith("encoder.")})  # fmt: skip
        assert features.shape == (1, 2048) and relative_error(features, expected(x)) < 1e-4
