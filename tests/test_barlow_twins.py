"""Barlow Twins (arXiv 2103.03230, facebookresearch/barlowtwins) built through ``sslhub.create_model``.

Each test checks one rule of the paper / ``main.py`` against numbers computed here: the hyperparameters, the projector
index by index, the loss (the official forward written out: per-view passes, ``bn`` without affine, C / N, on- and
off-diagonal sums), ``bn``'s running statistics, the cross-correlation summed over two real gloo processes with
main.py's gradient, the two LARS groups and their schedule against ``adjust_learning_rate`` and the official LARS,
the views, the evaluation pre-processing, the released encoder, a short run of the trainer, and both release files
(``resnet50.pth``, ``checkpoint.pth``) written with the authors' names and container and compared with torchvision.
"""

import copy
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from helpers import assert_released_is, build, perturb_, relative_error
from PIL import Image
from torch import nn
from torchvision import transforms as tv1
from torchvision.transforms import v2

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint
from sslhub.conversion.layouts import detect_layout
from sslhub.conversion.loading import load_file_state
from sslhub.distributed import global_batch_norm
from sslhub.losses import cross_correlation, redundancy_reduction
from sslhub.methods import TrainingProgress
from sslhub.methods.barlow_twins import BarlowTwinsHparams
from sslhub.optim import LARS
from sslhub.registry import get_method, get_preset, get_pretrained
from sslhub.training import PretrainArguments, Pretrainer, build_optimizer

TINY = {"projector_dims": (16, 16, 8)}
BATCH = 6

pytestmark = pytest.mark.usefixtures("single_thread")


def build_tiny(**overrides):
    return build("barlow_twins_resnet18_32px", backbone="test_resnet", **{**TINY, **overrides})


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def two_views(size=32, batch=BATCH):
    x = images(batch, 3, size, size)
    return [x, x + 0.3 * images(batch, 3, size, size, seed=1)]


# ---- the authors' objective (main.py), written out --------------------------------------------------------------
def off_diagonal(matrix):
    """``main.py`` ``off_diagonal``: the n(n-1) entries off the diagonal, from the flattened matrix."""
    n = matrix.shape[0]
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def official_loss(z1, z2, lambd, batch_size):
    """``BarlowTwins.forward`` after the projector, in one process: ``bn`` = BatchNorm1d(affine=False) in training
    mode (batch mean, biased variance, eps 1e-5), ``c = bn(z1)ᵀ bn(z2) / batch_size``, then
    ``Σ (diag(c) - 1)² + λ Σ off_diagonal(c)²``."""

    def standardise(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = standardise(z1).T @ standardise(z2) / batch_size
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum()


def official_projector(sizes):
    """``main.py``: ``[Linear(bias=False), BatchNorm1d, ReLU]`` per hidden size, then ``Linear(bias=False)``."""
    layers = []
    for d_in, d_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


# ---- hyperparameters and architecture ---------------------------------------------------------------------------
def test_defaults_are_the_papers_and_main_pys():
    hp = BarlowTwinsHparams()
    assert hp.projector_dims == (8192, 8192, 8192) and hp.lambd == 0.0051
    assert (hp.optimizer, hp.lr, hp.lr_biases, hp.lr_batch_size, hp.sgd_momentum) == ("lars", 0.2, 0.0048, 256, 0.9)
    assert hp.weight_decay == 1.5e-6  # the paper's value; main.py's --weight-decay default is 1e-6
    assert (hp.warmup_epochs, hp.warmup_start_ratio, hp.min_lr_ratio, hp.lr_schedule) == (10, 0.0, 0.001, "cosine")
    assert hp.epochs == 1000 and hp.sync_batch_norm and hp.lr_scaling == "linear"
    assert hp.blur_p == (1.0, 0.1) and hp.solarize_p == (0.0, 0.2)
    assert not hp.gradient_through_all_reduce
    resnet50 = get_preset("barlow_twins_resnet50")
    assert resnet50.backbone == "resnet50" and resnet50.method_kwargs == {} and resnet50.image_size == 224


def test_projector_and_bn_are_main_pys_index_by_index():
    method = build("barlow_twins_resnet18", projector_dims=(32, 32, 16)).method
    reference = official_projector([512, 32, 32, 16])
    assert [type(m) for m in method.projector] == [type(m) for m in reference]
    assert method.projector.state_dict().keys() == reference.state_dict().keys()
    for mine, theirs in zip(method.projector, reference, strict=True):
        if isinstance(theirs, nn.Linear):
            assert mine.weight.shape == theirs.weight.shape and mine.bias is None
    assert isinstance(method.bn, nn.BatchNorm1d) and not method.bn.affine and method.bn.num_features == 16
    assert method.bn.state_dict().keys() == {"running_mean", "running_var", "num_batches_tracked"}
    method.projector.load_state_dict(reference.state_dict())
    features = images(5, 512)
    with torch.no_grad():
        torch.testing.assert_close(method.projector.eval()(features), reference.eval()(features))


def test_backbone_is_zero_init_residual_as_torchvision():
    """``torchvision.models.resnet50(zero_init_residual=True)``: timm zero-initialises the same last BN of each
    residual branch."""
    encoder = build("barlow_twins_resnet18", projector_dims=(8, 8, 8)).method.encoder.backbone
    for block in (encoder.layer1[0], encoder.layer4[1]):
        assert not block.bn2.weight.any() and block.bn1.weight.eq(1).all()


# ---- the objective ------------------------------------------------------------------------------------------------
def test_loss_is_the_official_forward_with_a_pass_per_view():
    """Each view through backbone + projector on its own (BatchNorm statistics per view); a joint pass of both views
    would give other BatchNorm statistics and another loss."""
    model = build_tiny(lambd=0.02)
    method = model.method.train()
    x1, x2 = two_views()
    reference = copy.deepcopy(method)
    loss = method(Batch.of([x1, x2])).loss
    z1, z2 = reference.projector(reference.encoder(x1)), reference.projector(reference.encoder(x2))
    expected = official_loss(z1, z2, 0.02, BATCH)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, redundancy_reduction(cross_correlation(z1, z2), 0.02))  # the shared loss
    joint = reference.projector(reference.encoder(torch.cat([x1, x2])))
    assert abs(official_loss(*joint.chunk(2), 0.02, BATCH).item() - loss.item()) > 1e-3


def test_bn_updates_its_running_statistics_once_per_view():
    method = build_tiny().method.train()
    x1, x2 = two_views()
    with torch.no_grad():
        z1, z2 = method.embed(x1), method.embed(x2)
        method.bn.reset_running_stats()
        method(Batch.of([x1, x2]))
    expected_mean = 0.1 * (0.9 * z1.mean(0) + z2.mean(0))  # momentum 0.1 from 0, z1 first
    expected_var = 0.9 * (0.9 + 0.1 * z1.var(0)) + 0.1 * z2.var(0)  # unbiased variances, from 1
    assert method.bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(method.bn.running_mean, expected_mean)
    torch.testing.assert_close(method.bn.running_var, expected_var)


def test_cross_correlation_is_float32_under_bf16_autocast():
    method = build_tiny().method.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = (method.embed(x) for x in two_views())
        correlation = method.cross_correlation(z1, z2)
    assert z1.dtype == torch.bfloat16 and correlation.dtype == torch.float32
    torch.testing.assert_close(correlation, cross_correlation(z1.float(), z2.float()))


# ---- two processes: the all-reduced cross-correlation -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _embeddings(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    return torch.randn(4, 6, generator=gen) * (rank + 1), torch.randn(4, 6, generator=gen) + rank


def _correlation_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for through in (False, True):
        torch.manual_seed(0)
        method = sslhub.create_model(
            "barlow_twins_resnet18_32px", task="pretraining", backbone="test_resnet", projector_dims=(6, 6, 6),
            gradient_through_all_reduce=through,
        ).method.train()  # fmt: skip
        global_batch_norm(method)  # what the trainer does with sync_batch_norm on several processes
        z1, z2 = (z.requires_grad_(True) for z in _embeddings(rank))
        correlation = method.cross_correlation(z1, z2)
        redundancy_reduction(correlation, 0.0051).backward()
        results[through] = {"c": correlation.detach(), "grad1": z1.grad, "grad2": z2.grad}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_sum_the_global_cross_correlation_with_main_pys_gradient(tmp_path):
    """C of the global batch (global BatchNorm, C_local / N summed over processes) on every process. main.py's
    ``all_reduce`` is not differentiated: each process gets the gradient of the global loss for its own rows,
    which DDP's averaging turns into 1/world_size of the global gradient; ``gradient_through_all_reduce`` gives
    world_size times that, the global gradient after averaging."""
    # fork: the workers start from this process's imports (spawning two fresh interpreters costs ~20 s of imports);
    # spawn once CUDA is in use, since a forked child cannot run autograd after the parent ran it on a GPU
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_correlation_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method=start_method)
    parts = [_embeddings(rank) for rank in range(2)]
    z1 = torch.cat([p[0] for p in parts]).requires_grad_(True)
    z2 = torch.cat([p[1] for p in parts]).requires_grad_(True)
    official_loss(z1, z2, 0.0051, 8).backward()  # one process holding the global batch of 8
    expected_c = cross_correlation(z1.detach(), z2.detach())
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(4 * rank, 4 * rank + 4)
        for through, factor in ((False, 1.0), (True, 2.0)):
            torch.testing.assert_close(results[through]["c"], expected_c)
            torch.testing.assert_close(results[through]["grad1"], factor * z1.grad[rows])
            torch.testing.assert_close(results[through]["grad2"], factor * z2.grad[rows])


# ---- optimisation -------------------------------------------------------------------------------------------------
def test_parameter_groups_split_by_ndim_as_main_py():
    method = build_tiny().method
    weights, biases = method.param_groups()
    assert {id(p) for p in weights["params"]} == {id(p) for p in method.parameters() if p.ndim != 1}
    assert {id(p) for p in biases["params"]} == {id(p) for p in method.parameters() if p.ndim == 1}
    assert (weights["weight_decay"], biases["weight_decay"]) == (1e-4, 0.0)
    assert "lr_scale" not in weights and biases["lr_scale"] == pytest.approx(0.0072 / 0.3)
    assert any(p is method.projector[1].weight for p in biases["params"])  # BatchNorm γ: a "bias" of main.py
    assert any(p is method.projector[6].weight for p in weights["params"])


def official_lars_step(params, lr, weight_decay, momentum=0.9, eta=0.001):
    """``main.py`` ``LARS.step`` with ``weight_decay_filter`` and ``lars_adaptation_filter`` (ndim == 1 excluded
    from both), on (weight, grad, lr of its group) triples, from zero momentum: one step."""
    out = []
    for w, g, group_lr in params:
        dp = g
        if w.ndim != 1:
            dp = dp + weight_decay * w
            w_norm, u_norm = w.norm(), dp.norm()
            q = eta * w_norm / u_norm if w_norm > 0 and u_norm > 0 else torch.tensor(1.0)
            dp = dp * q
        out.append(w - group_lr * dp)
    return out


def test_schedule_and_lars_step_are_adjust_learning_rate_and_main_pys_lars(tmp_path):
    """The trainer's two groups follow ``adjust_learning_rate`` (10 warm-up epochs from 0, cosine to 1/1000 of
    batch/256, times 0.2 for weights and 0.0048 for biases); one optimizer step is main.py's LARS."""
    args = PretrainArguments(
        model="barlow_twins_resnet18_32px", data="builtin", output_dir=str(tmp_path), batch_size=32, knn_every=0,
        log_with=None, progress=False, overrides={**TINY, "backbone": "test_resnet", "lr": 0.2, "lr_biases": 0.0048,
                                                  "weight_decay": 1.5e-6},
    )  # fmt: skip
    trainer = Pretrainer(args)
    steps_per_epoch, epochs = trainer.steps_per_epoch, 1000
    assert trainer.total_steps == epochs * steps_per_epoch and trainer.warmup_steps == 10 * steps_per_epoch

    def adjust_learning_rate(step):
        max_steps, warmup_steps, base_lr = epochs * steps_per_epoch, 10 * steps_per_epoch, 32 / 256
        if step < warmup_steps:
            return base_lr * step / warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps)))
        return base_lr * q + base_lr * 0.001 * (1 - q)

    for step in (0, 7, 10 * steps_per_epoch, 123 * steps_per_epoch + 5, epochs * steps_per_epoch - 1):
        trainer.set_schedules(TrainingProgress(step, trainer.total_steps, steps_per_epoch))
        weights, biases = trainer.optimizer.param_groups
        assert weights["lr"] == pytest.approx(adjust_learning_rate(step) * 0.2, rel=1e-9, abs=1e-15)
        assert biases["lr"] == pytest.approx(adjust_learning_rate(step) * 0.0048, rel=1e-9, abs=1e-15)
        assert (weights["weight_decay"], biases["weight_decay"]) == (1.5e-6, 0.0)

    method = build_tiny(weight_decay=0.05)
    method = method.method.train()
    perturb_(method, ("encoder.", "projector."), scale=0.1)  # no zero weights: every tensor adapted
    optimizer = build_optimizer(method, lr=0.5)
    assert type(optimizer) is LARS
    for group in optimizer.param_groups:
        group["lr"] = 0.5 * group.get("lr_scale", 1.0)
    method(Batch.of(two_views())).loss.backward()
    before = [(p.detach().clone(), p.grad.clone(), 0.5 * (0.0072 / 0.3 if p.ndim == 1 else 1.0))
              for p in method.parameters()]  # fmt: skip
    optimizer.step()
    for p, expected in zip(method.parameters(), official_lars_step(before, 0.5, 0.05), strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


# ---- views, evaluation, released encoder, trainer -----------------------------------------------------------------
def test_views_are_main_pys_transform_pair():
    first, second = build("barlow_twins_resnet50", projector_dims=(8, 8, 8)).method.view_recipe().transforms
    for view, blur_p in ((first, 1.0), (second, 0.1)):
        crop, flip, jitter, gray, blur = view.transforms[:5]
        assert (crop.size, crop.scale, crop.interpolation) == ((224, 224), (0.08, 1.0), v2.InterpolationMode.BICUBIC)
        assert flip.p == 0.5 and gray.p == 0.2
        assert jitter.p == 0.8 and isinstance(jitter.transforms[0], v2.ColorJitter)
        color = jitter.transforms[0]
        assert (color.brightness, color.contrast, color.saturation, color.hue) == ((0.6, 1.4), (0.6, 1.4),
                                                                                   (0.8, 1.2), (-0.1, 0.1))  # fmt: skip
        assert blur.p == blur_p and blur.transforms[0].sigma == [0.1, 2.0]
    solarize = [t for t in second.transforms if isinstance(t, v2.RandomSolarize)]
    assert len(solarize) == 1 and solarize[0].p == 0.2 and solarize[0].threshold == 128
    assert not any(isinstance(t, v2.RandomSolarize) for t in first.transforms)
    small = build_tiny().method.view_recipe().transforms
    assert [view.transforms[4].p for view in small] == [0.0, 0.0]  # solo-learn's CIFAR views: no blur
    assert [t.p for t in small[1].transforms if isinstance(t, v2.RandomSolarize)] == [0.2]


def test_evaluation_preprocessing_is_evaluate_pys():
    """``evaluate.py`` validation: ``Resize(256)`` (bilinear), ``CenterCrop(224)``, ImageNet normalisation."""
    config = sslhub.SSLConfig.from_preset("barlow_twins_resnet50")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    reference = tv1.Compose([tv1.Resize(256), tv1.CenterCrop(224), tv1.ToTensor(),
                             tv1.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])  # fmt: skip
    mine = get_method("barlow_twins").eval_transform(config)(image)
    torch.testing.assert_close(mine, reference(image))
    recipe = get_method("barlow_twins").get_linear_recipe()
    assert (recipe.optimizer, recipe.base_lr, recipe.epochs, recipe.batch_size, recipe.weight_decay) == (
        "sgd",
        0.3,
        100,
        256,
        1e-6,
    )


def test_released_encoder_is_the_backbone_without_projector():
    model = build_tiny()
    other = copy.deepcopy(model.method.encoder)
    perturb_(other, ("backbone.",))
    assert_released_is(model, model.method.encoder, other)
    assert not any(key.startswith(("projector", "bn")) for key in model.released_model().state_dict())


def test_pretrain_runs_the_32px_preset_on_builtin_data(tmp_path):
    args = PretrainArguments(
        model="barlow_twins_resnet18_32px", data="builtin", output_dir=str(tmp_path), batch_size=32, max_steps=2,
        knn_every=0, log_with=None, progress=False, overrides={"projector_dims": (64, 64, 64)},
    )  # fmt: skip
    trainer = Pretrainer(args)
    start = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    result = trainer.run()
    assert result.steps == 2 and all(np.isfinite(result.losses))
    state = result.model.method.state_dict()
    assert not torch.equal(state["projector.6.weight"], start["projector.6.weight"])
    assert state["bn.num_batches_tracked"].item() == 4  # two views per step
    encoder = sslhub.from_pretrained(tmp_path)
    for name, value in encoder.encoder.state_dict().items():
        assert torch.equal(value, state[f"encoder.{name}"]), name


# ---- the authors' files -------------------------------------------------------------------------------------------
def official_barlow_twins(projector_sizes, seed):
    """``main.py`` ``BarlowTwins`` after ``SyncBatchNorm.convert_sync_batchnorm``, with random weights and non-trivial
    BatchNorm statistics: torchvision ResNet-50 (zero_init_residual, fc = Identity), projector, ``bn``."""
    torch.manual_seed(seed)
    model = nn.Module()
    model.backbone = torchvision.models.resnet50(zero_init_residual=True)
    model.backbone.fc = nn.Identity()
    model.projector = official_projector([2048, *projector_sizes])
    model.bn = nn.BatchNorm1d(projector_sizes[-1], affine=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(1000)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def official_features(model, x):
    with torch.no_grad():
        return model.backbone.eval()(x)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """``resnet50.pth`` (``model.module.backbone.state_dict()``) and ``checkpoint.pth`` (``{'epoch', 'model':
    DDP state dict, 'optimizer'}``), projector 64-64-32 (the release's is 8192-8192-8192, read off the file)."""
    model = official_barlow_twins((64, 64, 32), seed=3)
    directory = tmp_path_factory.mktemp("barlowtwins")
    torch.save(model.backbone.state_dict(), directory / "resnet50.pth")
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 1.5e-6, "params": [0]}]}
    torch.save({"epoch": 1000, "model": state, "optimizer": optimizer}, directory / "checkpoint.pth")
    return directory, model


def test_backbone_file_matches_torchvision(official_files, sslhub_cache):
    directory, model = official_files
    container = load_file_state(directory / "resnet50.pth")
    assert not any(key.startswith("fc.") for key in container) and detect_layout(container).name == "backbone"
    x = images(1, 3, 64, 64, seed=4)
    expected = official_features(model, x)
    for encoder in (
        convert_checkpoint("barlow_twins_resnet50", directory / "resnet50.pth"),
        sslhub.create_model("barlow_twins_resnet50.in1k", pretrained=True, pretrained_path=directory / "resnet50.pth"),
    ):
        with torch.no_grad():
            assert relative_error(encoder(x).pooler_output, expected) < 1e-4


def test_full_checkpoint_continues_pretraining_with_projector_and_bn(official_files, sslhub_cache):
    directory, model = official_files
    path = directory / "checkpoint.pth"
    assert detect_layout(load_file_state(path)).name == "barlow_twins"
    pretraining = sslhub.create_model("barlow_twins_resnet50.in1k", task="pretraining", pretrained=True,
                                      pretrained_path=path)  # fmt: skip
    method = pretraining.method
    assert tuple(method.hparams.projector_dims) == (64, 64, 32)
    for key, value in model.state_dict().items():  # every tensor, bn's running statistics included
        name = key.replace("backbone.", "encoder.backbone.", 1)
        assert torch.equal(method.state_dict()[name], value), key
    x = images(2, 3, 64, 64, seed=5)
    with torch.no_grad():
        assert relative_error(method.encoder(x), official_features(model, x)) < 1e-4
        features = images(3, 2048, seed=6)
        assert relative_error(method.projector(features), model.projector.eval()(features)) < 1e-4
    views = [x, x.flip(-1)]
    reference = copy.deepcopy(model).train()
    loss = method.train()(Batch.of(views)).loss
    z1, z2 = (reference.projector(reference.backbone(view)) for view in views)
    assert abs(loss.item() - official_loss(z1, z2, 0.0051, 2).item()) / loss.item() < 1e-4
    released = convert_checkpoint("barlow_twins_resnet50", path)  # features: the backbone of the checkpoint
    with torch.no_grad():
        assert relative_error(released(x).pooler_output, official_features(model, x)) < 1e-4


@pytest.fixture
def sslhub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_releases_name_the_readme_and_hubconf_files():
    readme, hub = (get_pretrained(f"barlow_twins_resnet50.{tag}") for tag in ("in1k", "in1k_hub"))
    assert get_pretrained("barlow_twins_resnet50") is readme  # the default tag
    assert readme.url == "https://dl.fbaipublicfiles.com/barlowtwins/ljng/resnet50.pth"
    assert readme.full_url == "https://dl.fbaipublicfiles.com/barlowtwins/ljng/checkpoint.pth"
    folder = "https://dl.fbaipublicfiles.com/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051"
    assert (hub.url, hub.full_url) == (f"{folder}/resnet50.pth", f"{folder}/checkpoint.pth")
    for tag in (readme, hub):
        assert (tag.metrics, tag.epochs, tag.license) == ({"linear": 73.5}, 1000, "mit")
