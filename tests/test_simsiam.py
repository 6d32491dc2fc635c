"""SimSiam (arXiv 2011.10566, facebookresearch/simsiam) built through ``sslhub.create_model(preset, task=...)``.

Each test checks one rule of the paper / official code against a reference computed here: the authors' model
(``simsiam/builder.py``) written out below on torchvision's ResNet, the loss of ``main_simsiam.py`` written with its
formula, torchvision's evaluation transforms, and the cosine of ``adjust_learning_rate``. The conversion tests write
files with the authors' key names and container (``main_simsiam.py`` ``save_checkpoint`` of DDP(SimSiam)) and compare
features with the authors' model holding the same weights.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_released_is, build, perturb_, relative_error
from PIL import Image
from torch import nn
from torchvision import transforms as tv1
from torchvision.transforms import v2

import sslhub
from sslhub.batch import Batch
from sslhub.configuration import SSLConfig
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout, get_layout
from sslhub.conversion.loading import CheckpointError, load_file_state
from sslhub.methods import TrainingProgress
from sslhub.methods.simsiam import SimSiamHparams
from sslhub.registry import get_method, get_preset, get_pretrained
from sslhub.training import PretrainArguments, Pretrainer, build_optimizer

BATCH = 4
SMALL = {"dim": 64, "pred_dim": 16}

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- the authors' model, written out (simsiam/builder.py) ----------------------------------------------------------
def official_simsiam(arch="resnet18", dim=2048, pred_dim=512, proj_layers=3, hidden=None):
    """``SimSiam(models.__dict__[arch], dim, pred_dim)``: torchvision ResNet(num_classes=dim, zero_init_residual=True)
    whose ``fc`` becomes (Linear(no bias), BN, ReLU) x 2, the original fc (bias frozen), BN(affine=False); predictor
    Linear(no bias), BN, ReLU, Linear. ``proj_layers=2`` / ``hidden``: the paper's CIFAR variant (one hidden layer)."""
    encoder = getattr(torchvision.models, arch)(num_classes=dim, zero_init_residual=True)
    width = encoder.fc.in_features
    hidden = hidden or width
    layers, d_in = [], width
    for _ in range(proj_layers - 1):
        layers += [nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d_in = hidden
    last = nn.Linear(d_in, dim)
    encoder.fc = nn.Sequential(*layers, last, nn.BatchNorm1d(dim, affine=False))
    last.bias.requires_grad = False
    predictor = nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True), nn.Linear(pred_dim, dim)
    )
    return encoder, predictor


def official_loss(encoder, predictor, x1, x2, stop_gradient=True):
    """``main_simsiam.py``: ``-(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2`` with z detached (``builder.py``), the
    cosine written out."""
    z1, z2 = encoder(x1), encoder(x2)
    p1, p2 = predictor(z1), predictor(z2)
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()

    def cos(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    return -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5


@torch.no_grad()
def randomise_batch_norm_(module, generator):
    """Non-trivial running statistics (and affine parameters, where there are) in every BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 1.5, generator=generator)
            if m.affine:
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)


def official_state_from_sslhub(method):
    """The sslhub method's weights in the authors' module names (torchvision and timm ResNets share key names)."""
    encoder = dict(method.encoder.backbone.state_dict())
    encoder |= {f"fc.{key}": value for key, value in method.projector.state_dict().items()}
    return encoder, method.predictor.state_dict()


def views(seed=0, size=32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, size, size, generator=gen)
    return [x, x + 0.2 * torch.randn(BATCH, 3, size, size, generator=gen)]


# ---- hyperparameters -----------------------------------------------------------------------------------------------
def test_defaults_are_main_simsiam_with_fix_pred_lr():
    """README / ``main_simsiam.py``: SGD lr 0.05 per 256 images, momentum 0.9, wd 1e-4, 100 epochs, no warm-up,
    cosine to 0, dim 2048, pred-dim 512, ``--fix-pred-lr``, SyncBN; MoCo v2's crop scale 0.2 and blur p = 0.5."""
    hp = SimSiamHparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.lr_scaling, hp.sgd_momentum) == ("sgd", 0.05, 256, "linear", 0.9)
    assert (hp.weight_decay, hp.weight_decay_end, hp.epochs, hp.warmup_epochs, hp.min_lr) == (1e-4, None, 100, 0, 0)
    assert (hp.dim, hp.pred_dim, hp.proj_layers, hp.proj_hidden_dim) == (2048, 512, 3, None)
    assert hp.fix_pred_lr and hp.sync_batch_norm and hp.clip_grad is None
    assert (hp.crop_scale_min, hp.blur_p, hp.lr_schedule) == (0.2, 0.5, "cosine_epoch")
    with pytest.raises(ValueError, match="proj_layers"):
        SimSiamHparams(proj_layers=0)


def test_32px_preset_is_the_papers_cifar_recipe():
    """arXiv 2011.10566 Appendix: ResNet-18, 2-layer projector with 2048-d output, no blur, lr 0.03, wd 5e-4, 800
    epochs (hidden 2048 as solo-learn's CIFAR config)."""
    preset = get_preset("simsiam_resnet18_32px")
    assert (preset.backbone, preset.image_size) == ("resnet18", 32)
    hp = SimSiamHparams(**preset.method_kwargs)
    assert (hp.lr, hp.weight_decay, hp.epochs, hp.proj_layers, hp.proj_hidden_dim, hp.blur_p) == (
        0.03, 5e-4, 800, 2, 2048, 0.0
    )  # fmt: skip
    assert (hp.dim, hp.pred_dim, hp.fix_pred_lr) == (2048, 512, True)


# ---- architecture --------------------------------------------------------------------------------------------------
def _layer_signature(module):
    if isinstance(module, nn.Linear):
        return ("Linear", module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.BatchNorm1d):
        return ("BN", module.num_features, module.affine, module.eps, module.momentum)
    return (type(module).__name__,)


@pytest.mark.parametrize(
    ("preset", "layers", "hidden"), [("simsiam_resnet18", 3, None), ("simsiam_resnet18_32px", 2, 2048)]
)
def test_projector_and_predictor_are_the_authors_index_by_index(preset, layers, hidden):
    method = build(preset, image_size=32).method
    encoder, predictor = official_simsiam("resnet18", 2048, 512, layers, hidden)
    for ours, theirs in ((method.projector, encoder.fc), (method.predictor, predictor)):
        assert [_layer_signature(m) for m in ours] == [_layer_signature(m) for m in theirs]
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }
        trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    # fc.6.bias on ImageNet ("hack: not use bias as it is followed by BN"): frozen there, a constant buffer here
    frozen = [n for n, p in encoder.fc.named_parameters() if not p.requires_grad]
    assert frozen == [f"{3 * (layers - 1)}.bias"]
    assert frozen[0] in dict(method.projector.named_buffers())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_zero_initialises_the_last_bn_of_each_block_as_zero_init_residual(arch):
    method = build("simsiam_resnet18", backbone=arch, image_size=32, **SMALL).method
    reference = getattr(torchvision.models, arch)(zero_init_residual=True)
    zeros = {n for n, p in reference.named_parameters() if n.endswith(".weight") and p.ndim == 1 and not p.any()}
    ours = {n for n, p in method.encoder.backbone.named_parameters() if n.endswith(".weight") and p.ndim == 1}
    assert zeros and {n for n in ours if not method.encoder.backbone.get_parameter(n).any()} == zeros


# ---- the loss ------------------------------------------------------------------------------------------------------
def test_loss_and_gradients_equal_the_authors_model_with_stop_gradient():
    """Eq. 4 with stop-gradient: the sslhub loss and every gradient equal ``main_simsiam.py``'s on the authors'
    model holding the same weights; without the stop-gradient the gradients differ (so the test can fail)."""
    model = build("simsiam_resnet18", image_size=32, **SMALL)
    method = model.method.train()
    perturb_(method, ("projector.", "predictor."), scale=0.1)
    encoder, predictor = official_simsiam("resnet18", **SMALL)
    encoder_state, predictor_state = official_state_from_sslhub(method)
    encoder.load_state_dict(encoder_state)
    predictor.load_state_dict(predictor_state)
    encoder.train(), predictor.train()
    x1, x2 = views()

    loss = method(Batch.of([x1, x2])).loss
    loss.backward()
    expected = official_loss(encoder, predictor, x1, x2)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    theirs = {f"encoder.backbone.{n}": p.grad for n, p in encoder.named_parameters() if not n.startswith("fc.")}
    theirs |= {f"projector.{n[3:]}": p.grad for n, p in encoder.named_parameters() if n.startswith("fc.")}
    theirs |= {f"predictor.{n}": p.grad for n, p in predictor.named_parameters()}
    assert theirs.pop("projector.6.bias") is None  # frozen there, a buffer here
    ours = {n: p.grad for n, p in method.named_parameters()}
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    encoder.zero_grad(), predictor.zero_grad()
    official_loss(encoder, predictor, x1, x2, stop_gradient=False).backward()
    without = encoder.fc[0].weight.grad
    assert relative_error(method.projector[0].weight.grad, without) > 1e-2


def test_each_view_is_a_separate_forward_pass_with_its_own_batch_statistics():
    """``builder.py`` encodes x1 and x2 in two calls: BatchNorm normalises each view with its own statistics, which a
    single forward of the concatenated views would not."""
    method = build("simsiam_resnet18", image_size=32, **SMALL).method.train()
    x1, x2 = views()
    x2 = 3 * x2 + 1  # views with different statistics
    loss = method(Batch.of([x1, x2])).loss
    with torch.no_grad():
        z1, z2 = (method.projector(method.encoder(x)) for x in (x1, x2))
        p1, p2 = method.predictor(z1), method.predictor(z2)
        separate = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
        z = method.projector(method.encoder(torch.cat([x1, x2])))
        p = method.predictor(z)
        joint = (
            -(F.cosine_similarity(p[:BATCH], z[BATCH:]).mean() + F.cosine_similarity(p[BATCH:], z[:BATCH]).mean()) / 2
        )
    torch.testing.assert_close(loss, separate)
    assert abs(joint - separate) > 1e-4


# ---- optimisation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fix_pred_lr", [True, False])
def test_param_groups_put_the_predictor_alone_with_a_fixed_lr(fix_pred_lr):
    """``--fix-pred-lr``: {encoder (backbone + projector), fix_lr False}, {predictor, fix_lr True}; SGD weight decay
    on every parameter (BN and biases too)."""
    method = build("simsiam_resnet18", image_size=32, fix_pred_lr=fix_pred_lr, **SMALL).method
    groups = method.param_groups()
    assert len(groups) == 2
    names = {id(p): n for n, p in method.named_parameters()}
    encoder_names = {names[id(p)] for p in groups[0]["params"]}
    predictor_names = {names[id(p)] for p in groups[1]["params"]}
    expected_encoder = {n for n, p in method.named_parameters() if not n.startswith("predictor.") and p.requires_grad}
    assert encoder_names == expected_encoder and "projector.6.bias" not in encoder_names
    assert predictor_names == {n for n, _ in method.predictor.named_parameters(prefix="predictor")}
    assert [g["weight_decay"] for g in groups] == [1e-4, 1e-4]
    assert not groups[0].get("fixed_lr") and groups[1]["fixed_lr"] is fix_pred_lr


def test_sgd_step_never_moves_the_frozen_projector_bias():
    method = build("simsiam_resnet18", image_size=32, **SMALL).method.train()
    bias = method.projector[6].bias.detach().clone()
    weight = method.projector[6].weight.detach().clone()
    optimizer = build_optimizer(method, 0.5)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    for seed in range(2):
        method(Batch.of(views(seed))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(method.projector[6].bias, bias) and not method.projector[6].bias.requires_grad
    assert not torch.equal(method.projector[6].weight, weight)


def test_the_frozen_bias_stays_frozen_through_a_saved_checkpoint(tmp_path):
    """A continued run (``sslhub pretrain --model DIR``) loads the method with ``from_pretrained``: the projector's
    bias must still be out of the optimizer, with its value."""
    model = build("simsiam_resnet18", image_size=32, **SMALL)
    model.save_pretrained(tmp_path)
    method = sslhub.from_pretrained(tmp_path).method
    assert torch.equal(method.projector[6].bias, model.method.projector[6].bias)
    assert not any(p.requires_grad is False for p in method.parameters())
    assert "projector.6.bias" not in dict(method.named_parameters())


def _tiny_args(tmp_path, **overrides):
    values = dict(
        model="simsiam_resnet18_32px",
        output_dir=str(tmp_path),
        batch_size=64,
        knn_every=0,
        log_with=None,
        progress=False,
        overrides={"backbone": "test_resnet", **SMALL, "proj_hidden_dim": 32},
    )
    return PretrainArguments(**(values | overrides))


def test_trainer_keeps_the_predictor_at_init_lr_and_anneals_the_encoder(tmp_path):
    """``adjust_learning_rate``: ``init_lr = lr x batch / 256``; at every step of epoch e of E the encoder group is
    at ``init_lr · 0.5 (1 + cos(π e / E))``, the ``fix_lr`` group at ``init_lr``."""
    trainer = Pretrainer(_tiny_args(tmp_path, epochs=4))
    init_lr = 0.03 * 64 / 256
    assert trainer.peak_lr == pytest.approx(init_lr)
    total, per_epoch = trainer.total_steps, trainer.steps_per_epoch
    for step in (0, per_epoch - 1, per_epoch, total // 2 + 1, total - 1):
        trainer.set_schedules(TrainingProgress(step, total, per_epoch))
        encoder_group, predictor_group = trainer.optimizer.param_groups
        epoch = step // per_epoch
        assert encoder_group["lr"] == pytest.approx(init_lr * 0.5 * (1 + math.cos(math.pi * epoch / 4)))
        assert predictor_group["lr"] == pytest.approx(init_lr)
        assert encoder_group["weight_decay"] == predictor_group["weight_decay"] == 5e-4


def test_pretrain_runs_simsiam_on_builtin_data_and_releases_the_encoder(tmp_path):
    result = Pretrainer(_tiny_args(tmp_path, max_steps=2)).run()
    assert result.steps == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert all(-1.0 <= loss <= 1.0 for loss in result.losses)
    released = sslhub.from_pretrained(tmp_path)
    trained = result.model.method.encoder.state_dict()
    assert released.encoder.state_dict().keys() == trained.keys()
    for name, value in released.encoder.state_dict().items():
        assert torch.equal(value, trained[name]), name


# ---- released encoder, views, evaluation ----------------------------------------------------------------------------
def test_released_encoder_is_the_backbone_without_the_projector():
    model = build("simsiam_resnet18", image_size=32, **SMALL)
    other = copy.deepcopy(model.method.encoder)
    perturb_(other, ("backbone.",))
    assert_released_is(model, model.method.encoder, other)
    released = model.released_model().encoder.state_dict()
    assert not any("fc" in key or key.startswith(("projector", "predictor")) for key in released)
    assert model.released_model().num_features == 512


@pytest.mark.parametrize(("preset", "blur_p"), [("simsiam_resnet50", 0.5), ("simsiam_resnet18_32px", 0.0)])
def test_views_are_moco_v2_augmentation_twice(preset, blur_p):
    """``main_simsiam.py``: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2,
    blur σ ∈ [0.1, 2] p 0.5 (none in the CIFAR recipe), flip; ``TwoCropsTransform`` draws two views."""
    model = build(preset, backbone="test_resnet", **SMALL)  # the recipe depends on the hyperparameters and the size
    recipe, size = model.method.view_recipe(), model.config.image_size
    first, second = recipe.transforms
    assert first is second
    pieces = first.transforms
    expected = [v2.RandomResizedCrop, v2.RandomApply, v2.RandomGrayscale, *([v2.RandomApply] if blur_p else []),
                v2.RandomHorizontalFlip]  # fmt: skip
    assert [type(t) for t in pieces[: len(expected)]] == expected
    crop, jitter, gray = pieces[0], pieces[1], pieces[2]
    assert crop.scale == (0.2, 1.0) and crop.interpolation == v2.InterpolationMode.BILINEAR
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], v2.ColorJitter)
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert gray.p == 0.2
    if blur_p:
        assert pieces[3].p == 0.5 and list(pieces[3].transforms[0].sigma) == [0.1, 2.0]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    x1, x2 = recipe.make_views(image).views
    assert x1.shape == x2.shape == (3, size, size)
    assert not torch.equal(x1, x2)


def test_evaluation_is_main_lincls_validation_transform():
    """``main_lincls.py``: Resize(256) (bilinear), CenterCrop(224), ToTensor, Normalize(ImageNet)."""
    config = SSLConfig.from_preset("simsiam_resnet50")
    ours = get_method("simsiam").eval_transform(config)
    reference = tv1.Compose(
        [
            tv1.Resize(256),
            tv1.CenterCrop(224),
            tv1.ToTensor(),
            tv1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    torch.testing.assert_close(ours(image), reference(image))


# ---- the authors' files ----------------------------------------------------------------------------------------------
def save_official_checkpoint(path, encoder, predictor, epoch, arch):
    """``main_simsiam.py`` ``save_checkpoint``: ``{'epoch', 'arch', 'state_dict' (DDP: 'module.'), 'optimizer'}``,
    the optimizer with ``--fix-pred-lr``'s two groups."""
    state = {f"module.encoder.{k}": v for k, v in encoder.state_dict().items()}
    state |= {f"module.predictor.{k}": v for k, v in predictor.state_dict().items()}
    n_encoder = len(list(encoder.parameters()))
    optimizer = {
        "state": {},
        "param_groups": [
            {"lr": 0.0, "momentum": 0.9, "weight_decay": 1e-4, "fix_lr": False, "params": list(range(n_encoder))},
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "fix_lr": True,
             "params": list(range(n_encoder, n_encoder + 4))},
        ],
    }  # fmt: skip
    torch.save({"epoch": epoch, "arch": arch, "state_dict": state, "optimizer": optimizer}, path)


@pytest.fixture(scope="module")
def simsiam_resnet50_file(tmp_path_factory):
    """``checkpoint_0099.pth.tar`` of the released runs: ResNet-50, dim 2048, pred-dim 512, random weights with
    non-trivial BatchNorm statistics everywhere (backbone, projector, predictor)."""
    torch.manual_seed(0)
    encoder, predictor = official_simsiam("resnet50")
    randomise_batch_norm_(nn.ModuleList([encoder, predictor]), torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("simsiam") / "checkpoint_0099.pth.tar"
    save_official_checkpoint(path, encoder, predictor, 100, "resnet50")
    return path, encoder.eval(), predictor.eval()


def torchvision_features(encoder, images):
    backbone = copy.deepcopy(encoder)
    backbone.fc = nn.Identity()
    with torch.no_grad():
        return backbone.eval()(images)


def test_released_file_is_detected_and_every_key_is_read(simsiam_resnet50_file):
    path, _, _ = simsiam_resnet50_file
    assert detect_layout(load_file_state(path)) is get_layout("simsiam")
    converted = read_checkpoint(path)
    assert converted.layout == "simsiam"
    assert converted.left_out == ["arch (not converted)", "epoch (not converted)", "optimizer (not converted)"]
    assert converted.method_overrides == {"dim": 2048, "pred_dim": 512, "proj_layers": 3, "proj_hidden_dim": None}
    assert not any(key.startswith("fc.") for key in converted.backbone)
    tags = [get_pretrained(f"simsiam_resnet50.{tag}") for tag in ("in1k_100ep", "in1k_100ep_bs256")]
    assert all(tag.layout == "simsiam" for tag in tags)
    assert len({tag.file_name for tag in tags}) == 2  # both runs publish checkpoint_0099.pth.tar


def test_released_encoder_matches_torchvision_resnet50(simsiam_resnet50_file):
    """``main_lincls.py`` keeps ``module.encoder.*`` minus ``fc``: features equal torchvision's ResNet-50."""
    path, encoder, _ = simsiam_resnet50_file
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = torchvision_features(encoder, images)
    for model in (
        convert_checkpoint("simsiam_resnet50", path),
        sslhub.create_model("simsiam_resnet50.in1k_100ep", pretrained=True, pretrained_path=path),
    ):
        with torch.no_grad():
            pooled = model(images).pooler_output
        assert pooled.shape == (1, 2048)
        assert relative_error(pooled, expected) < 1e-4


def test_pretraining_model_holds_the_files_projector_and_predictor(simsiam_resnet50_file):
    """``task="pretraining"``: z = f(x) (backbone + projector) and p = h(z) equal the authors' model in eval mode;
    the projector's frozen bias is the file's and stays frozen."""
    path, encoder, predictor = simsiam_resnet50_file
    model = sslhub.create_model(
        "simsiam_resnet50.in1k_100ep", task="pretraining", pretrained=True, pretrained_path=path
    )
    method = model.method.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z, expected_z = method.projector(method.encoder(images)), encoder(images)
        p, expected_p = method.predictor(z), predictor(expected_z)
    assert relative_error(z, expected_z) < 1e-4 and relative_error(p, expected_p) < 1e-4
    assert torch.equal(method.projector[6].bias, encoder.fc[6].bias)
    assert torch.equal(method.projector[7].running_var, encoder.fc[7].running_var)
    assert model.config.method_kwargs["epochs"] == 100
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    assert id(method.projector[6].bias) not in trainable and not method.projector[6].bias.requires_grad


def test_cifar_style_file_reads_head_sizes_and_refuses_other_methods(tmp_path):
    """A 2-layer projector (the paper's CIFAR variant, hidden 2048) with dim 256 / pred-dim 64 on ResNet-18: the
    sizes come from the file; a MoCo preset refuses the file."""
    torch.manual_seed(4)
    encoder, predictor = official_simsiam("resnet18", 256, 64, proj_layers=2, hidden=2048)
    randomise_batch_norm_(nn.ModuleList([encoder, predictor]), torch.Generator().manual_seed(5))
    path = tmp_path / "checkpoint_0799.pth.tar"
    save_official_checkpoint(path, encoder, predictor, 800, "resnet18")
    method = convert_checkpoint("simsiam_resnet18", path, task="pretraining", image_size=32).method
    hp = method.hparams
    assert (hp.dim, hp.pred_dim, hp.proj_layers, hp.proj_hidden_dim) == (256, 64, 2, 2048)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert relative_error(method.projector(method.encoder(images)), encoder.eval()(images)) < 1e-4
    with pytest.raises(CheckpointError, match="is a 'simsiam' checkpoint of simsiam, not of 'moco_v2'"):
        convert_checkpoint("moco_v2_resnet18_32px", path)
