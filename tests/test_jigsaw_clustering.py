"""Jigsaw Clustering (arXiv 2104.00323): the loader's overlapping regions, the montages and their labels as the
authors' ``_batch_gather_ddp``, the per-cell features, ``SupCluLoss`` and the two-branch loss written out, the
authors' ``JigClu`` file converted against their model written out, detection next to MoCo's files, the release."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import relative_error
from PIL import Image
from torch import nn

import sslhub
from sslhub.batch import Batch, Sample
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, load_file_state
from sslhub.data import ImageDataset, ViewDataset
from sslhub.losses import supervised_contrastive
from sslhub.methods.jigsaw_clustering import cell_features, montage_labels, region_boxes, stitch_montages
from sslhub.registry import get_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")
PRESET = "jigsaw_clustering_resnet18_32px"
TINY = {"backbone": "test_resnet", "embed_dim": 16}


def tiny_model(**overrides):
    torch.manual_seed(0)
    return sslhub.create_model(PRESET, task="pretraining", **{**TINY, **overrides})


# ---- the authors' code, written out ----------------------------------------------------------------------------
def loader_boxes(width: int, height: int, cross: float) -> list[tuple]:
    """``JigCluTransform.__call__``: ``h, w = x.size`` is PIL's (width, height); PIL's ``crop`` rounds the boxes."""
    h, w = width, height
    ch, cw = cross * h, cross * w
    boxes = [(0, 0, h // 2 + ch, w // 2 + cw), (0, w // 2 - cw, h // 2 + ch, w),
             (h // 2 - ch, 0, h, w // 2 + cw), (h // 2 - ch, w // 2 - cw, h, w)]  # fmt: skip
    return [tuple(round(v) for v in box) for box in boxes]


def batch_gather(images: list[torch.Tensor], permute: torch.Tensor):
    """``JigClu._batch_gather_ddp`` on one process: the 4 crop positions' batches, permuted and stitched 2 x 2."""
    n = images[0].shape[0]
    gathered = torch.cat(images, dim=0)[permute]
    col1 = torch.cat([gathered[0:n], gathered[n : 2 * n]], dim=3)
    col2 = torch.cat([gathered[2 * n : 3 * n], gathered[3 * n :]], dim=3)
    return torch.cat([col1, col2], dim=2)


def split_cells(q: torch.Tensor) -> torch.Tensor:
    """``JigClu.forward``: the (n, c, 2, 2) map split into f1..f4 and concatenated: row p n + i."""
    n = q.shape[0]
    c1, c2 = q.split([1, 1], dim=2)
    f1, f2 = c1.split([1, 1], dim=3)
    f3, f4 = c2.split([1, 1], dim=3)
    return torch.cat([f1, f2, f3, f4], dim=0).view(n * 4, -1)


def sup_clu_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float, base: float = 0.07):
    """``SupCluLoss.forward`` (contrast_mode 'all', one view)."""
    mask = torch.eq(labels.view(-1, 1), labels.view(1, -1)).float()
    logits = features @ features.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    logits_mask = 1 - torch.eye(features.shape[0])
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    return (-(temperature / base) * (mask * log_prob).sum(1) / mask.sum(1)).mean()


class AuthorsResNet(torchvision.models.ResNet):
    """``resnet_jigclu.ResNet``: torchvision's ResNet without ``fc``, avgpool to 2 x 2 after an 8 x 8 bilinear
    resize, heads ``fc_clu`` (wrapped into an MLP by ``JigClu``) and ``fc_loc`` (4 locations)."""

    def __init__(self, block, layers, dim: int):
        super().__init__(block, layers)
        del self.fc
        width = 512 * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc_clu = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        self.fc_loc = nn.Linear(width, 4)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False))

    def pooled(self, x):
        """What ``main_lincls.py`` evaluates: torchvision's ResNet trunk with global average pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x)))).mean(dim=(2, 3))


def authors_model(arch: str, dim: int = 8) -> AuthorsResNet:
    torch.manual_seed(0)
    block, layers = {"resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
                     "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])}[arch]  # fmt: skip
    model = AuthorsResNet(block, layers, dim)
    with torch.no_grad():  # BatchNorm statistics a fresh model does not have
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def save_jigclu_file(path, model: AuthorsResNet, container: str = "main.py"):
    """``main.py save_checkpoint`` of DDP(JigClu): ``module.encoder.*``; ``"bare"``: the state dict alone."""
    state = {f"module.encoder.{key}": value for key, value in model.state_dict().items()}
    if container == "bare":
        torch.save(state, path)
        return
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9).state_dict()
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": optimizer}, path)


def images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ---- the view recipe ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width, height", [(100, 60), (33, 47), (500, 375)])
def test_regions_are_the_loaders_overlapping_quarters_column_by_column(width, height):
    assert region_boxes(width, height, 2, 0.3) == loader_boxes(width, height, 0.3)
    thirds = [(c * 30, r * 30, c * 30 + 30, r * 30 + 30) for c in range(3) for r in range(3)]
    assert region_boxes(90, 90, 3, 0.0) == thirds


def test_recipe_tiles_the_image_regions_and_collate_stitches_montages():
    model = tiny_model()
    recipe = model.method.view_recipe()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    dataset = ViewDataset(ImageDataset(pictures), recipe, seed=0)
    samples = [dataset[i] for i in range(3)]
    assert [tuple(v.shape) for v in samples[0].views] == [(3, 16, 16)] * 4
    batch = recipe.collate(samples)
    assert batch.views[0].shape == (3, 3, 32, 32) and batch.index.tolist() == [0, 1, 2]
    source, location = batch.extras["source_image"], batch.extras["location"]
    assert source.shape == location.shape == (3, 4)
    # every tile used once: each image gives each of its 4 locations to exactly one montage cell
    used = zip(source.flatten().tolist(), location.flatten().tolist(), strict=True)
    assert sorted(used) == [(i, k) for i in range(3) for k in range(4)]
    for i in range(3):
        for cell in range(4):
            row, col = divmod(cell, 2)
            tile = samples[source[i, cell]].views[location[i, cell]]
            assert torch.equal(batch.views[0][i, :, row * 16 : row * 16 + 16, col * 16 : col * 16 + 16], tile)
    again = recipe.collate(samples)
    assert torch.equal(again.views[0], batch.views[0])  # the permutation is a function of the samples' seeds
    reseeded = [Sample(s.index, s.views, s.label, s.extras, s.seed + 1) for s in samples]
    assert not torch.equal(recipe.collate(reseeded).extras["source_image"], source)


def test_montages_and_labels_are_the_authors_batch_gather():
    n, torch_gen = 5, torch.Generator().manual_seed(3)
    crops = [torch.randn(n, 3, 4, 4, generator=torch_gen) for _ in range(4)]
    permute = torch.randperm(4 * n, generator=torch_gen)
    expected = batch_gather(crops, permute)
    assert torch.equal(stitch_montages(torch.stack(crops), permute, 2), expected)
    source, location = montage_labels(permute, n)
    label_clu = permute % n
    label_loc = torch.tensor([0] * n + [1] * n + [2] * n + [3] * n)[permute]
    for i in range(n):
        for cell in range(4):
            assert source[i, cell] == label_clu[cell * n + i] and location[i, cell] == label_loc[cell * n + i]


def test_cell_features_are_the_quarters_of_the_8x8_resized_map():
    feature_map = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(4))
    resized = F.interpolate(feature_map, size=(8, 8), mode="bilinear", align_corners=False)
    quarters = [resized[:, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4].mean(dim=(2, 3)) for r in (0, 1) for c in (0, 1)]
    torch.testing.assert_close(cell_features(feature_map, 2), torch.stack(quarters, dim=1))
    with pytest.raises(ValueError, match=r"feature map is \(1, 1\), smaller than the 2 x 2 grid"):
        cell_features(torch.randn(2, 6, 1, 1), 2)


# ---- the loss ----------------------------------------------------------------------------------------------------
def test_supervised_contrastive_is_sup_clu_loss_and_splits_over_processes():
    features = F.normalize(torch.randn(12, 5, generator=torch.Generator().manual_seed(5)), dim=1)
    labels = torch.arange(12) % 3
    expected = sup_clu_loss(features, labels, 0.3)
    assert supervised_contrastive(features, labels, 0.3, 0.07).item() == pytest.approx(expected.item(), rel=1e-5)
    halves = [supervised_contrastive(features[s : s + 6], labels[s : s + 6], 0.3, 0.07, features, labels, s)
              for s in (0, 6)]  # fmt: skip
    assert (sum(halves) / 2).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no positive"):
        supervised_contrastive(features[:3], labels[:3], 0.3)


def test_loss_is_clustering_plus_location_written_out():
    model = tiny_model(temperature=0.2).eval()
    method = model.method
    n = 3
    crops = images(4 * n, 16, seed=6).reshape(4, n, 3, 16, 16)
    permute = torch.randperm(4 * n, generator=torch.Generator().manual_seed(7))
    source, location = montage_labels(permute, n)
    batch = Batch([stitch_montages(crops, permute, 2)], extras={"source_image": source, "location": location})
    with torch.no_grad():
        output = method(batch)
        q = method.encoder.forward_features(batch.views[0])
        q = F.adaptive_avg_pool2d(F.interpolate(q, size=(8, 8), mode="bilinear", align_corners=False), 2)
        cells = split_cells(q)
        clustering = sup_clu_loss(F.normalize(method.cluster_head(cells), dim=1), permute % n, 0.2)
        label_loc = torch.tensor([0] * n + [1] * n + [2] * n + [3] * n)[permute]
        locating = F.cross_entropy(method.location_head(cells), label_loc)
    assert output.loss.item() == pytest.approx((clustering + locating).item(), rel=1e-5)
    assert output.metrics["loss_cluster"] == pytest.approx(clustering.item(), rel=1e-5)
    with pytest.raises(ValueError, match="extras 'source_image' and 'location'"):
        method(Batch.of(batch.views[0]))


def test_hyperparameters_are_the_readme_recipe_and_bad_ones_are_refused():
    hp = sslhub.create_model("jigsaw_clustering_resnet50", task="pretraining").method.hparams
    schedule = (hp.lr, hp.lr_batch_size, hp.epochs, hp.lr_schedule, hp.weight_decay)
    assert schedule == (0.03, 256, 200, "cosine_epoch", 1e-4)
    assert (hp.temperature, hp.base_temperature, hp.cross_ratio, hp.grid, hp.embed_dim) == (0.3, 0.07, 0.3, 2, 128)
    assert hp.sync_batch_norm and (hp.cluster_weight, hp.location_weight) == (1.0, 1.0)
    with pytest.raises(ValueError, match="grid must be >= 2"):
        tiny_model(grid=1)
    with pytest.raises(ValueError, match="cross_ratio must be in"):
        tiny_model(cross_ratio=0.5)
    with pytest.raises(ValueError, match="not a multiple of grid 3"):
        tiny_model(grid=3, cross_ratio=0.1)


def test_training_steps_lower_the_loss_and_learn_the_locations():
    model = tiny_model().train()
    method = model.method
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    n = 8
    crops = images(4 * n, 16, seed=8).reshape(4, n, 3, 16, 16)
    crops[1] += 1.0  # locations told apart by brightness
    permute = torch.randperm(4 * n, generator=torch.Generator().manual_seed(9))
    source, location = montage_labels(permute, n)
    batch = Batch([stitch_montages(crops, permute, 2)], extras={"source_image": source, "location": location})
    first = method(batch)
    for _ in range(15):
        optimizer.zero_grad()
        method(batch).loss.backward()
        optimizer.step()
    last = method(batch)
    assert last.metrics["loss_cluster"] < first.metrics["loss_cluster"]
    assert last.metrics["loss_location"] < first.metrics["loss_location"]


# ---- the authors' file -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["main.py", "bare"])
def test_authors_file_converts_to_their_features_heads_and_loss(tmp_path, container):
    authors = authors_model("resnet18")
    path = tmp_path / "JigClu_resnet18.pth"
    save_jigclu_file(path, authors, container)
    assert detect_layout(load_file_state(path)) is get_layout("jigsaw_clustering")
    converted = read_checkpoint(path)
    assert converted.method_overrides == {"embed_dim": 8, "grid": 2}
    assert converted.left_out == (["arch (not converted)", "epoch (not converted)", "optimizer (not converted)"]
                                  if container == "main.py" else [])  # fmt: skip
    whole = images(2, 64, seed=10)
    with torch.no_grad():
        encoder = convert_checkpoint("jigsaw_clustering_resnet50", path, backbone="resnet18").eval()
        assert relative_error(encoder(whole).pooler_output, authors.pooled(whole)) < 1e-4
        method = convert_checkpoint("jigsaw_clustering_resnet50", path, task="pretraining", backbone="resnet18")
        method = method.method.eval()
        n = 3
        crops = images(4 * n, 32, seed=11).reshape(4, n, 3, 32, 32)
        permute = torch.randperm(4 * n, generator=torch.Generator().manual_seed(12))
        montages = batch_gather(list(crops), permute)
        cells = split_cells(authors(montages))
        q_clu = F.normalize(authors.fc_clu(cells), dim=1)
        label_loc = torch.tensor([0] * n + [1] * n + [2] * n + [3] * n)[permute]
        expected = sup_clu_loss(q_clu, permute % n, 0.3) + F.cross_entropy(authors.fc_loc(cells), label_loc)
        source, location = montage_labels(permute, n)
        output = method(Batch([montages], extras={"source_image": source, "location": location}))
        mine = cell_features(method.encoder.forward_features(montages), 2).flatten(0, 1)
        order = [cell * n + i for i in range(n) for cell in range(4)]  # sslhub's (montage, cell) rows
        assert relative_error(method.location_head(mine), authors.fc_loc(cells)[order]) < 1e-4
        assert relative_error(F.normalize(method.cluster_head(mine), dim=1), q_clu[order]) < 1e-4
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_release_tag_builds_resnet50_equal_to_the_authors_and_to_timm(tmp_path):
    tag = get_pretrained("jigsaw_clustering_resnet50.in1k")
    assert (tag.layout, tag.metrics, tag.epochs, tag.file_name) == ("jigsaw_clustering", {"linear": 66.4}, 200,
                                                                    "JigClu_200e.pth")  # fmt: skip
    authors = authors_model("resnet50", dim=128)
    path = tmp_path / tag.file_name
    save_jigclu_file(path, authors)
    released = sslhub.create_model("jigsaw_clustering_resnet50.in1k", pretrained=True, pretrained_path=path).eval()
    timm_model = timm.create_model("resnet50", num_classes=0).eval()
    timm_model.load_state_dict(sslhub.to_timm(released).state_dict())
    whole = images(1, 64, seed=13)
    with torch.no_grad():
        features = released(whole).pooler_output
        assert features.shape == (1, 2048) and relative_error(features, authors.pooled(whole)) < 1e-4
        assert relative_error(timm_model(whole), features) < 1e-4


def test_detection_tells_jigclu_from_moco_and_simsiam_files(tmp_path):
    backbone = {"conv1.weight": torch.zeros(4, 3, 7, 7), "bn1.weight": torch.ones(4)}
    moco = {f"module.encoder_{e}.{k}": v for e in "qk" for k, v in {**backbone, "fc.weight": torch.zeros(8, 4)}.items()}
    moco |= {"module.queue": torch.zeros(8, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": moco, "optimizer": {}}, tmp_path / "moco.pth")
    assert detect_layout(load_file_state(tmp_path / "moco.pth")) is get_layout("moco")
    simsiam = {f"module.encoder.{k}": v for k, v in {**backbone, "fc.0.weight": torch.zeros(4, 4)}.items()}
    simsiam["module.predictor.0.weight"] = torch.zeros(4, 4)
    assert not get_layout("jigsaw_clustering").detect({"state_dict": simsiam})
    save_jigclu_file(tmp_path / "jigclu.pth", authors_model("resnet18"))
    assert detect_layout(load_file_state(tmp_path / "jigclu.pth")) is get_layout("jigsaw_clustering")


def test_bad_files_raise_errors_that_name_the_problem(tmp_path):
    state = {f"module.encoder.{k}": v for k, v in authors_model("resnet18").state_dict().items()}
    cases = {
        "three_locations.pth": ({**state, "module.encoder.fc_loc.weight": torch.zeros(3, 512)},
                                r"fc_loc.weight has shape \(3, 512\): expected m² rows"),
        "no_mlp.pth": ({k: v for k, v in state.items() if "fc_clu.0" not in k}, r"fc_clu \['2.weight', '2.bias'\]"),
        "extra.pth": ({**state, "module.memory": torch.zeros(2)}, r"unexpected keys .*'module.memory'"),
    }  # fmt: skip
    for name, (bad, message) in cases.items():
        torch.save({"state_dict": bad}, tmp_path / name)
        with pytest.raises(CheckpointError, match=message) as error:
            read_checkpoint(tmp_path / name, layout="jigsaw_clustering")
        assert name in str(error.value)
