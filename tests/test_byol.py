"""BYOL (arXiv 2006.07733, google-deepmind/deepmind-research byol/) and its release converted by byol-convert.

Each test checks one rule of the paper / official code against numbers computed here: the defaults of
``configs/byol.py``, the MLPs of ``networks.MLP`` index by index, the symmetrised loss of ``loss_fn``, the target EMA
of ``_update_fn`` with ``schedules.target_ema``, the learning-rate schedule, LARS's exclusions, the released online
encoder, the views of ``augmentations.augment_config``, a short run of the trainer, and the released ResNet-50: a
file written as ajtejankar/byol-convert writes it from the Haiku parameters, converted by sslhub and compared with a
written-out forward of the Haiku ResNet (TensorFlow 'SAME' padding as explicit asymmetric ``F.pad``).
"""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_released_is, build, params, perturb_, relative_error, zoo_script
from timm.layers import Conv2dSame
from torch import nn
from torchvision.transforms import v2

import sslhub
from sslhub.batch import Batch
from sslhub.configuration import SSLConfig
from sslhub.conversion.convert import build_converted_model, convert_checkpoint, read_checkpoint
from sslhub.conversion.layouts import detect_layout
from sslhub.conversion.loading import CheckpointError
from sslhub.conversion.pretrained import release_source
from sslhub.losses import normalized_mse
from sslhub.methods import TrainingProgress
from sslhub.methods.base import update_momentum_pairs
from sslhub.optim import LARS
from sslhub.registry import get_method, get_pretrained
from sslhub.training import (
    PretrainArguments,
    build_optimizer,
    learning_rate_at,
    pretrain,
    scaled_learning_rate,
    warmup_steps,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"projector_hidden_dim": 32, "predictor_hidden_dim": 24, "embed_dim": 16}
ONLINE, TARGET = ("online_encoder.", "online_projector."), ("target_encoder.", "target_projector.")


def build_small(**overrides):
    return build("byol_resnet18_32px", **SMALL, **overrides)


def views(seed=0, batch=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    return [x, x + 0.3 * torch.randn(batch, 3, 32, 32, generator=gen)]


def target_name_to_online(name):
    return name.replace("target_", "online_", 1)


# ---- hyperparameters (configs/byol.py, paper §3.3 / Appendix C) ----------------------------------------------------
def test_defaults_are_the_official_1000_epoch_recipe():
    hp = get_method("byol").Hparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.lr_scaling) == ("lars", 0.2, 256, "linear")
    assert (hp.weight_decay, hp.weight_decay_end, hp.sgd_momentum) == (1.5e-6, None, 0.9)
    assert (hp.warmup_epochs, hp.warmup_start_ratio, hp.min_lr, hp.min_lr_ratio) == (10, 0.0, 0.0, 0.0)
    assert (hp.epochs, hp.lr_schedule, hp.clip_grad) == (1000, "cosine", None)
    assert (hp.momentum, hp.projector_hidden_dim, hp.embed_dim, hp.predictor_hidden_dim) == (0.996, 4096, 256, 4096)
    assert hp.sync_batch_norm is True and hp.tf_padding is None and hp.crop_scale_min == 0.08
    assert tuple(hp.blur_prob) == (1.0, 0.1) and tuple(hp.solarize_prob) == (0.0, 0.2)
    recipe = get_method("byol").get_linear_recipe()  # configs/eval.py: 80 epochs, 0.2 per 256, no weight decay
    assert (recipe.base_lr, recipe.epochs, recipe.weight_decay, recipe.warmup_epochs) == (0.2, 80, 0.0, 0)
    with pytest.raises(ValueError, match="tf_padding"):
        get_method("byol").Hparams(tf_padding="valid")


def test_presets_and_the_cifar_recipe_of_solo_learn():
    resnet50 = sslhub.create_model("byol_resnet50", task="pretraining", **SMALL).config
    assert resnet50.backbone == "resnet50" and resnet50.image_size == 224
    assert resnet50.method_kwargs["lr"] == 0.2 and resnet50.method_kwargs["momentum"] == 0.996
    cifar = build_small().config
    assert cifar.backbone == "resnet18" and cifar.image_size == 32
    kwargs = cifar.method_kwargs
    assert (kwargs["lr"], kwargs["weight_decay"], kwargs["momentum"], kwargs["epochs"]) == (1.0, 1e-5, 0.99, 1000)
    assert kwargs["blur_prob"] == [0.0, 0.0] and kwargs["solarize_prob"] == [0.0, 0.2]
    # Haiku's basic block (BYOL's ResNet18) keeps γ = 1 in its last BatchNorm; timm's bottleneck zero-init = Haiku's;
    # the 32 px preset keeps timm's zero-init, as every sslhub 32 px preset (the comment at the preset says why)
    basic_block = sslhub.create_model("byol_resnet18").encoder.backbone.layer1[0].bn2.weight
    assert torch.equal(basic_block, torch.ones(64))
    assert not build_small().method.online_encoder.backbone.layer1[0].bn2.weight.any()
    bottleneck = sslhub.create_model("byol_resnet50").encoder.backbone.layer1[0].bn3.weight
    assert not bottleneck.any()


# ---- architecture (networks.MLP) ------------------------------------------------------------------------------------
def test_projector_and_predictor_are_networks_mlp_index_by_index():
    """``hk.Linear(hidden, with_bias=True)`` -> ``hk.BatchNorm`` -> relu -> ``hk.Linear(out, with_bias=False)``; the
    target projector is the same module, the predictor has none; Haiku's truncated-normal initialisation."""
    method = build_small().method
    dim = method.online_encoder.num_features
    for head, (d_in, hidden, out) in (
        (method.online_projector, (dim, 32, 16)),
        (method.target_projector, (dim, 32, 16)),
        (method.predictor, (16, 24, 16)),
    ):
        assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[3].out_features) == (d_in, hidden, out)
        assert head[0].bias is not None and head[3].bias is None and head[1].affine
        assert (head[1].eps, head[1].momentum) == (1e-5, 0.1)  # Haiku decay_rate 0.9
    big = build("byol_resnet18_32px").method.online_projector  # 512 -> 4096 -> 256
    for linear in (big[0], big[3]):
        std = 1 / math.sqrt(linear.in_features)
        assert linear.weight.abs().max() <= 2 * std
        assert linear.weight.std().item() == pytest.approx(0.8796 * std, rel=0.02)  # truncated at ±2σ
    assert not big[0].bias.any()


# ---- the loss (eq. 2-3, byol_experiment.loss_fn) --------------------------------------------------------------------
def test_loss_is_the_symmetrised_normalised_mse_of_predictions_against_the_other_views_target():
    model = build_small()
    method = model.method.train()
    perturb_(method, TARGET, scale=0.2)
    x1, x2 = views()
    loss = method(Batch.of([x1, x2])).loss
    with torch.no_grad():  # each view its own forward (BatchNorm per view), the target in training mode
        p1, p2 = (method.predictor(method.online_projector(method.online_encoder(x))) for x in (x1, x2))
        z1, z2 = (method.target_projector(method.target_encoder(x)) for x in (x1, x2))

    def regression_loss(x, y):  # helpers.regression_loss: ||x/|x| - y/|y|||², summed over features
        return ((x / x.norm(dim=-1, keepdim=True) - y / y.norm(dim=-1, keepdim=True)) ** 2).sum(dim=-1)

    expected = (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, normalized_mse(p1, z2) + normalized_mse(p2, z1))
    with pytest.raises(ValueError, match="2 views"):
        method(Batch.of([x1]))


def test_gradients_reach_the_online_network_and_predictor_but_not_the_target():
    method = build_small().method.train()
    method(Batch.of(views())).loss.backward()
    for name, p in method.named_parameters():
        if name.startswith(TARGET):
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad.abs().sum() > 0 for p in method.predictor.parameters())
    assert method.online_projector[0].weight.grad.abs().sum() > 0
    assert method.online_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    assert not any(id(p) in trainable for n, p in method.named_parameters() if n.startswith(TARGET))


# ---- target network (eq. 1, schedules.target_ema, _update_fn) ------------------------------------------------------
def test_tau_follows_target_ema_at_the_step_of_the_update():
    method = build_small(momentum=0.996).method
    total = 1000
    for step in (0, 1, 250, 500, 999, 1000):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * step / total) + 1) / 2  # schedules.target_ema
        progress = TrainingProgress(step, total, 10)
        assert method.momentum_at(progress) == pytest.approx(expected, abs=1e-12)
        method.on_step_start(progress)
        assert method.tau == pytest.approx(expected, abs=1e-12)
    assert method.momentum_at(TrainingProgress(0, total, 10)) == pytest.approx(0.996)
    assert method(Batch.of(views())).metrics == {"tau": method.tau}


def test_target_is_the_ema_of_online_encoder_and_projector_and_the_predictor_has_no_twin():
    """ξ ← τ ξ + (1 - τ) θ (``target_params + (1 - tau) * (online_params - target_params)``) over the backbone and
    the projector, applied by the trainer after each optimizer step; the forward pass moves no weight."""
    method = build_small().method.train()
    perturb_(method, TARGET)
    online, target, predictor = params(method, ONLINE), params(method, TARGET), params(method, ("predictor.",))
    assert {target_name_to_online(n) for n in target} == set(online)
    assert predictor and not any("predictor" in n for n in target)
    method(Batch.of(views()))
    for name, value in params(method, ONLINE + TARGET + ("predictor.",)).items():
        assert torch.equal(value, {**online, **target, **predictor}[name]), name
    tau = method.momentum_at(TrainingProgress(300, 1000, 10))
    update_momentum_pairs(method.momentum_pairs(), tau)
    for name, value in params(method, TARGET).items():
        online_value = online[target_name_to_online(name)]
        torch.testing.assert_close(value, target[name] + (1 - tau) * (online_value - target[name]), msg=name)
    for name, value in params(method, ONLINE + ("predictor.",)).items():
        assert torch.equal(value, {**online, **predictor}[name]), name


# ---- optimisation (schedules.learning_schedule, optimizers.lars) ----------------------------------------------------
def test_learning_rate_is_learning_schedule_with_10_warmup_epochs():
    hp = get_method("byol").Hparams()
    batch, steps_per_epoch = 4096, 312
    total = hp.epochs * steps_per_epoch
    warmup = warmup_steps(hp.warmup_epochs, steps_per_epoch, total)
    peak = scaled_learning_rate(hp, batch)
    for step in (0, 7, 3119, 3120, 4000, total - 1):
        scaled_lr = 0.2 * batch / 256
        if step < 10 * steps_per_epoch:
            expected = step / (10 * steps_per_epoch) * scaled_lr
        else:
            progress = (step - 10 * steps_per_epoch) / (total - 10 * steps_per_epoch)
            expected = scaled_lr * 0.5 * (1 + math.cos(math.pi * progress))
        got = learning_rate_at(step, total, warmup, peak, hp.min_lr, hp.warmup_start_ratio * peak)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lars_excludes_exactly_the_biases_and_batchnorm_parameters_of_exclude_bias_and_norm():
    """``optimizers.exclude_bias_and_norm``: no weight decay nor adaptation for a Haiku ``b`` or a norm module's
    parameters; sslhub's LARS excludes every tensor with ndim ≤ 1, the same set here."""
    method = build_small().method
    optimizer = build_optimizer(method, lr=0.1)
    assert type(optimizer) is LARS and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 1e-5 and optimizer.param_groups[0]["eta"] == 0.001
    norms = {id(p) for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    for name, p in method.named_parameters():
        if p.requires_grad:
            official_excluded = name.endswith(".bias") or id(p) in norms
            assert (p.ndim <= 1) == official_excluded, name
    expected = {id(p) for p in method.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == expected


# ---- released encoder, views, trainer -------------------------------------------------------------------------------
def test_released_model_is_the_online_encoder():
    model = build_small()
    perturb_(model.method, ("target_encoder.",))
    assert_released_is(model, model.method.online_encoder, model.method.target_encoder)


def test_views_are_augment_config_view1_and_view2():
    recipe = build("byol_resnet50", **SMALL).method.view_recipe()
    first, second = (view.transforms for view in recipe.transforms)
    for transforms in (first, second):
        crop = transforms[0]
        assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.08, 1.0) and tuple(crop.size) == (224, 224)
        assert crop.interpolation == v2.InterpolationMode.BICUBIC and crop.ratio == pytest.approx((3 / 4, 4 / 3))
        assert isinstance(transforms[1], v2.RandomHorizontalFlip) and transforms[1].p == 0.5
        jitter = transforms[2]
        assert jitter.p == 0.8 and (jitter.transforms[0].brightness, jitter.transforms[0].saturation) == (
            (0.6, 1.4),
            (0.8, 1.2),
        )
        assert (jitter.transforms[0].contrast, jitter.transforms[0].hue) == ((0.6, 1.4), (-0.1, 0.1))
        assert isinstance(transforms[3], v2.RandomGrayscale) and transforms[3].p == 0.2
        normalize = next(t for t in transforms if isinstance(t, v2.Normalize))
        assert normalize.mean == [0.485, 0.456, 0.406] and normalize.std == [0.229, 0.224, 0.225]
    for transforms, blur_p in ((first, 1.0), (second, 0.1)):
        blur = transforms[4]
        assert blur.p == blur_p and blur.transforms[0].kernel_size == (23, 23)  # 2 * int(224 / 10 / 2) + 1
        assert list(blur.transforms[0].sigma) == [0.1, 2.0]
    solarize = [t for t in second if isinstance(t, v2.RandomSolarize)]
    assert len(solarize) == 1 and solarize[0].p == 0.2 and solarize[0].threshold == 128  # 0.5 of [0, 1]
    assert not any(isinstance(t, v2.RandomSolarize) for t in first)
    evaluation = get_method("byol").eval_transform(build("byol_resnet50", **SMALL).config).transforms
    # dataset._decode_and_center_crop: the central 224/256 of the short side, bicubic to 224
    assert list(evaluation[0].size) == [256] and evaluation[0].interpolation == v2.InterpolationMode.BICUBIC
    assert tuple(evaluation[1].size) == (224, 224)
    cifar = build_small().method.view_recipe().transforms
    assert [view.transforms[4].p for view in cifar] == [0.0, 0.0]
    assert [t.p for t in cifar[1].transforms if isinstance(t, v2.RandomSolarize)] == [0.2]


def test_pretrain_runs_byol_on_builtin_data(tmp_path):
    args = PretrainArguments(
        model="byol_resnet18_32px",
        output_dir=str(tmp_path),
        batch_size=16,
        max_steps=2,
        knn_every=0,
        log_with=None,
        progress=False,
        overrides=dict(SMALL),
    )
    result = pretrain(args)
    assert result.steps == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    method = result.model.method
    moved = [
        not torch.equal(t, o)
        for t, o in zip(method.target_encoder.parameters(), method.online_encoder.parameters(), strict=True)
    ]
    assert any(moved)  # the target lags the online network
    encoder = sslhub.from_pretrained(tmp_path)
    online = method.online_encoder.backbone.state_dict()
    for name, value in encoder.encoder.backbone.state_dict().items():
        assert torch.equal(value, online[name]), name


# ---- the authors' release: Haiku ResNet-50 -> byol-convert -> sslhub -------------------------------------------------
HAIKU_BLOCKS, HAIKU_CHANNELS, HAIKU_STRIDES = (3, 4, 6, 3), (256, 512, 1024, 2048), (1, 2, 2, 2)
ROOT = "res_net50/~/"


def haiku_resnet50(generator: torch.Generator) -> tuple[dict, dict]:
    """Random ``online_params`` / ``online_state`` of byol_experiment's network in Haiku names and layouts (conv
    ``w`` HWIO, BatchNorm ``scale`` / ``offset`` [1, 1, 1, C], EMA states ``average`` / ``hidden`` / ``counter``),
    with the projector, predictor and the online ``classifier``; BatchNorm statistics are set by ``calibrate``."""
    params, state = {}, {}

    def conv(name, k, c_in, c_out):
        w = torch.randn(k, k, c_in, c_out, generator=generator) * math.sqrt(2 / (k * k * c_in))
        params[ROOT + name] = {"w": w.numpy()}

    def batchnorm(name, c):
        params[ROOT + name] = {
            "scale": (1 + 0.3 * torch.randn(1, 1, 1, c, generator=generator)).numpy(),
            "offset": (0.2 * torch.randn(1, 1, 1, c, generator=generator)).numpy(),
        }
        for ema in ("mean_ema", "var_ema"):
            zeros = np.zeros((1, 1, 1, c), np.float32)
            state[f"{ROOT}{name}/~/{ema}"] = {"counter": np.int32(0), "hidden": zeros, "average": zeros.copy()}

    conv("initial_conv", 7, 3, 64)
    batchnorm("initial_batchnorm", 64)
    c_in = 64
    for g, (blocks, channels) in enumerate(zip(HAIKU_BLOCKS, HAIKU_CHANNELS, strict=True)):
        for b in range(blocks):
            block = f"block_group_{g}/~/block_{b}/~/"
            if b == 0:
                conv(block + "shortcut_conv", 1, c_in, channels)
                batchnorm(block + "shortcut_batchnorm", channels)
            for k, (kernel, out) in enumerate(((1, channels // 4), (3, channels // 4), (1, channels))):
                conv(f"{block}conv_{k}", kernel, c_in if k == 0 else channels // 4, out)
                batchnorm(f"{block}batchnorm_{k}", out)
            c_in = channels
    for head, d_in in (("projector", 2048), ("predictor", 8)):  # small heads: byol-convert skips them
        params[f"{head}/~/linear"] = {"w": np.ones((d_in, 16), np.float32), "b": np.zeros(16, np.float32)}
        params[f"{head}/~/batch_norm"] = {
            "scale": np.ones((1, 16), np.float32),
            "offset": np.zeros((1, 16), np.float32),
        }
        params[f"{head}/~/linear_1"] = {"w": np.ones((16, 8), np.float32)}
        for ema in ("mean_ema", "var_ema"):
            state[f"{head}/~/batch_norm/~/{ema}"] = {"counter": np.int32(0), "hidden": np.zeros((1, 16), np.float32),
                                                    "average": np.zeros((1, 16), np.float32)}  # fmt: skip
    params["classifier"] = {
        "w": (0.01 * torch.randn(2048, 1000, generator=generator)).numpy(),
        "b": (0.01 * torch.randn(1000, generator=generator)).numpy(),
    }
    return params, state


def tf_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's 'SAME': output ceil(size / stride), total padding max((out - 1) s + k - size, 0), the smaller
    half before (top / left), the rest after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class HaikuResNet50:
    """``networks.ResNetTorso`` (v1, bottleneck, ``use_projection`` in the first block of every group) with
    ``hk.nets.ResNet.BlockV1`` written out: every convolution and the max-pool 'SAME', the stride on the 3x3
    convolution, BatchNorm from the EMA ``average`` (ε 1e-5), mean over the spatial map. ``calibrate=True`` sets
    every BatchNorm's EMA to the statistics of the batch it sees (biased variance, as Haiku) before using them."""

    def __init__(self, params, state, calibrate=False):
        self.params, self.state, self.calibrate = params, state, calibrate

    def conv(self, name, x, stride=1):
        w = torch.from_numpy(self.params[ROOT + name]["w"]).permute(3, 2, 0, 1)
        return F.conv2d(tf_same(x, w.shape[-1], stride), w, stride=stride)

    def bn(self, name, x):
        p, mean_ema, var_ema = (self.params[ROOT + name], self.state[f"{ROOT}{name}/~/mean_ema"],
                                self.state[f"{ROOT}{name}/~/var_ema"])  # fmt: skip
        if self.calibrate:
            for ema, value in ((mean_ema, x.mean(dim=(0, 2, 3))), (var_ema, x.var(dim=(0, 2, 3), unbiased=False))):
                ema["average"] = ema["hidden"] = value.reshape(1, 1, 1, -1).numpy()
                ema["counter"] = np.int32(1000)
        mean, var = (torch.from_numpy(ema["average"]).reshape(1, -1, 1, 1) for ema in (mean_ema, var_ema))
        scale, offset = (torch.from_numpy(p[k]).reshape(1, -1, 1, 1) for k in ("scale", "offset"))
        return (x - mean) * torch.rsqrt(var + 1e-5) * scale + offset

    @torch.no_grad()
    def feature_map(self, images):
        x = F.relu(self.bn("initial_batchnorm", self.conv("initial_conv", images, 2)))
        x = F.max_pool2d(tf_same(x, 3, 2, float("-inf")), 3, 2)
        for g, (blocks, stride) in enumerate(zip(HAIKU_BLOCKS, HAIKU_STRIDES, strict=True)):
            for b in range(blocks):
                block, s = f"block_group_{g}/~/block_{b}/~/", stride if b == 0 else 1
                shortcut = (
                    self.bn(block + "shortcut_batchnorm", self.conv(block + "shortcut_conv", x, s)) if b == 0 else x
                )
                out = F.relu(self.bn(block + "batchnorm_0", self.conv(block + "conv_0", x)))
                out = F.relu(self.bn(block + "batchnorm_1", self.conv(block + "conv_1", out, s)))
                out = self.bn(block + "batchnorm_2", self.conv(block + "conv_2", out))
                x = F.relu(out + shortcut)
        return x


def byol_convert(params: dict, state: dict) -> dict:
    """ajtejankar/byol-convert ``convert.py``, its renaming rules written out: online params and BatchNorm states
    without projector / predictor, Haiku module paths -> torchvision names, conv ``w`` permuted (3, 2, 0, 1),
    classifier ``w`` transposed, BatchNorm tensors squeezed, ``mean_ema`` / ``var_ema`` ``average`` as running stats;
    no ``num_batches_tracked``."""

    def torch_name(module):
        if module == "classifier":
            return "fc"
        if found := re.search(r"initial_(conv|batchnorm)$", module):
            return {"conv": "conv1", "batchnorm": "bn1"}[found[1]]
        if found := re.search(r"block_group_(\d)/~/block_(\d+)/~/(conv|batchnorm)_(\d)$", module):
            kind = {"conv": "conv", "batchnorm": "bn"}[found[3]]
            return f"layer{int(found[1]) + 1}.{found[2]}.{kind}{int(found[4]) + 1}"
        found = re.search(r"block_group_(\d)/~/block_(\d+)/~/shortcut_(conv|batchnorm)$", module)
        return f"layer{int(found[1]) + 1}.{found[2]}.downsample.{0 if found[3] == 'conv' else 1}"

    converted = {}
    for module, values in params.items():
        if module.startswith(("projector", "predictor")):
            continue
        name = torch_name(module)
        for key, value in values.items():
            tensor = torch.from_numpy(value)
            if key == "w":
                converted[f"{name}.weight"] = tensor.permute(3, 2, 0, 1) if tensor.ndim == 4 else tensor.permute(1, 0)
            else:
                field = {"b": "bias", "offset": "bias", "scale": "weight"}[key]
                converted[f"{name}.{field}"] = tensor.squeeze() if key != "b" else tensor
    for path, ema in state.items():
        if path.startswith(("projector", "predictor")):
            continue
        module, _, kind = path.rpartition("/~/")
        assert np.array_equal(ema["average"], ema["hidden"])  # as convert.py asserts
        stat = {"mean_ema": "running_mean", "var_ema": "running_var"}[kind]
        converted[f"{torch_name(module)}.{stat}"] = torch.from_numpy(ema["average"]).squeeze()
    return converted


def smooth_images(count, size, seed):
    """Images with some spatial structure (upsampled noise), so that a one-pixel shift of the sampling grid is a
    small change of content, as on photographs."""
    coarse = torch.randn(count, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


@pytest.fixture(scope="module")
def byol_release(tmp_path_factory):
    """``pretrain_res50x1.pth.tar`` as byol-convert writes it (``torch.save`` of a bare state dict) from Haiku
    parameters whose BatchNorm statistics were calibrated on images, and the Haiku model itself."""
    params, state = haiku_resnet50(torch.Generator().manual_seed(0))
    HaikuResNet50(params, state, calibrate=True).feature_map(smooth_images(8, 64, seed=3))
    path = tmp_path_factory.mktemp("byol") / "pretrain_res50x1.pth.tar"
    torch.save(byol_convert(params, state), path)
    return path, HaikuResNet50(params, state)


def test_zoo_script_checks_the_release_against_torchvision_padded_as_jax(byol_release, tmp_path):
    path, _ = byol_release
    result = zoo_script().convert_release(get_pretrained("byol_resnet50.in1k_1000ep"), path, tmp_path / "out")
    assert result["independent_rel_error"] < 1e-4 and result["reload_max_abs_diff"] == 0.0


def test_byol_convert_file_is_detected_and_every_key_taken_or_left_out(byol_release):
    path, _ = byol_release
    file = torch.load(path, weights_only=True)
    assert "fc.weight" in file and not any(k.endswith("num_batches_tracked") for k in file)
    assert not any("projector" in k or "predictor" in k for k in file)
    assert file.keys() == {k for k in torchvision.models.resnet50().state_dict() if "num_batches" not in k}
    converted = read_checkpoint(path)
    assert converted.layout == "byol_convert" and converted.method is None
    assert converted.method_overrides == {"tf_padding": "same"}
    assert sorted(k.split(" ")[0] for k in converted.left_out) == ["fc.bias", "fc.weight"]
    assert converted.backbone["layer1.0.bn1.num_batches_tracked"].item() == 0
    assert get_pretrained("byol_resnet50.in1k_1000ep").layout == "byol_convert"
    plain = torchvision.models.resnet50().state_dict()  # a PyTorch-trained file keeps its counters: not BYOL's
    assert detect_layout(plain).name == "backbone"


def test_converted_release_computes_the_haiku_resnet_and_plain_padding_does_not(byol_release, capsys):
    path, haiku = byol_release
    images = smooth_images(2, 64, seed=5)
    expected_map = haiku.feature_map(images)
    expected = expected_map.mean(dim=(2, 3))
    model = convert_checkpoint("byol_resnet50", path)  # the file records tf_padding='same'
    assert model.config.method_kwargs["tf_padding"] == "same"
    assert isinstance(model.encoder.backbone.conv1, Conv2dSame)
    with torch.no_grad():
        out = model(images)
    errors = {
        "converted (pooled)": relative_error(out.pooler_output, expected),
        "converted (feature map)": relative_error(out.last_hidden_state, expected_map),
    }
    released = sslhub.create_model("byol_resnet50.in1k_1000ep", pretrained=True, pretrained_path=path)
    with torch.no_grad():
        errors["create_model(pretrained=True)"] = relative_error(released(images).pooler_output, expected)
    torchvision_model = torchvision.models.resnet50()
    missing, unexpected = torchvision_model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert unexpected == [] and all(key.endswith("num_batches_tracked") for key in missing)
    torchvision_model.fc = nn.Identity()
    with torch.no_grad():
        plain = relative_error(torchvision_model.eval()(images), expected)
        padded_wrongly = build_converted_model(SSLConfig.from_preset("byol_resnet50"), read_checkpoint(path))
        plain_sslhub = relative_error(padded_wrongly(images).pooler_output, expected)
    with capsys.disabled():
        print(f"\nBYOL release vs the Haiku forward: {errors}; PyTorch padding: torchvision {plain:.3f}, "
              f"sslhub tf_padding=None {plain_sslhub:.3f}")  # fmt: skip
    assert max(errors.values()) < 1e-4
    assert plain > 0.02 and plain_sslhub == pytest.approx(plain, rel=1e-3)


def test_release_continues_pretraining_from_the_online_encoder(byol_release):
    path, _ = byol_release
    model = convert_checkpoint("byol_resnet50", path, task="pretraining", **SMALL)
    file = torch.load(path, weights_only=True)
    for encoder in (model.method.online_encoder, model.method.target_encoder):
        assert isinstance(encoder.backbone.layer2[0].conv2, Conv2dSame)
        state = encoder.backbone.state_dict()
        for key, value in file.items():
            if not key.startswith("fc."):
                assert torch.equal(state[key], value), key


def test_release_reads_only_the_pytorch_conversion_and_says_how_to_make_it(tmp_path, monkeypatch):
    tag = get_pretrained("byol_resnet50.in1k_1000ep")
    assert (
        tag.url.endswith("/deepmind-byol/checkpoints/pretrain_res50x1.pkl")
        and tag.file_name == "pretrain_res50x1.pth.tar"
    )
    assert (tag.epochs, tag.metrics, tag.license) == (1000, {"linear": 74.4}, "cc-by-nc-4.0")
    assert tag.overrides["tf_padding"] == "same"
    monkeypatch.delenv("SSLHUB_PRETRAINED_DIR", raising=False)
    with pytest.raises(CheckpointError, match=r"pretrain_res50x1\.pth\.tar.*byol-convert"):
        release_source(tag, "features")
    (tmp_path / "pretrain_res50x1.pth.tar").write_bytes(b"")
    monkeypatch.setenv("SSLHUB_PRETRAINED_DIR", str(tmp_path))
    assert release_source(tag, "features") == (tmp_path / "pretrain_res50x1.pth.tar", "")
