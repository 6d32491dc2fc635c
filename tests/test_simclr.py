"""SimCLR v1 and v2 (arXiv 2002.05709, 2006.10029; google-research/simclr) built through
``sslhub.create_model(preset, task="pretraining")``, and the authors' releases as their PyTorch conversions write them.

The references are written out here: the TF loss (``objective.add_contrastive_loss``), the TF projection head and the
TF ResNet-50 forward (``resnet.py``: strided convolutions padded explicitly and symmetrically, the stem max-pool
'SAME', BatchNorm eps 1e-5), in plain torch ops. The converted files are built with the converters' key names and
containers: tonylins/simclr-converter ``{'state_dict': resnet_wider.resnet50x1().state_dict()}`` (torchvision names)
and Separius/SimCLRv2-Pytorch ``{'resnet': ResNet (net.*), 'head': ContrastiveHead (layers.*)}``.
"""

import copy
import dataclasses
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_released_is, build, perturb_, relative_error, zoo_script
from PIL import Image
from torch import nn
from torchvision.transforms import v2

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.conversion.loading import CheckpointError
from sslhub.losses import nt_xent
from sslhub.methods import simclr
from sslhub.methods.simclr import TFColorJitter, convert_simclr_v2
from sslhub.registry import get_method, get_preset, get_pretrained
from sslhub.training import PretrainArguments, pretrain, scaled_learning_rate

BATCH = 4
TINY = {"proj_hidden_dim": 64, "embed_dim": 32}

pytestmark = pytest.mark.usefixtures("single_thread")


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def two_views():
    x = images(BATCH, 3, 32, 32)
    return [x, x + 0.1 * images(BATCH, 3, 32, 32, seed=1)]


# ---- hyperparameters -------------------------------------------------------------------------------------------------
def test_v1_defaults_are_the_papers_and_run_py_at_be133b3():
    """§2.3 "Default setting": LARS lr 4.8 = 0.3 x BatchSize / 256, wd 1e-6, 10 warm-up epochs then cosine, 100 epochs
    at batch 4096; run.py: τ 0.1, colour strength 1.0, blur, global BN, head nl_0 / nl_1 to 128-d."""
    hp = get_method("simclr_v1").Hparams()
    assert (hp.optimizer, hp.weight_decay, hp.warmup_epochs, hp.epochs, hp.lr_schedule) == (
        "lars", 1e-6, 10, 100, "cosine"
    )  # fmt: skip
    assert scaled_learning_rate(hp, 4096) == pytest.approx(4.8)
    assert scaled_learning_rate(dataclasses.replace(hp, lr=0.075, lr_batch_size=1, lr_scaling="sqrt"), 4096) == (
        pytest.approx(4.8)
    )  # the README: 0.3 linear = 0.075 sqrt at batch 4096
    assert (hp.temperature, hp.embed_dim, hp.proj_hidden_dim, hp.num_proj_layers) == (0.1, 128, None, 2)
    assert (hp.color_strength, hp.brightness, hp.blur, hp.crop_scale_min) == (1.0, "additive", True, 0.08)
    assert hp.sync_batch_norm and hp.sgd_momentum == 0.9 and hp.tf_padding is None


def test_v2_defaults_are_the_v2_papers_recipe():
    """arXiv 2006.10029 §4: 800 epochs at batch 4096, lr up to 6.4 = 0.1 x sqrt(BatchSize) over the first 5 % of the
    epochs, then cosine; wd 1e-4; 3-layer head; run.py (HEAD): τ 0.1, brightness impl 'simclrv2'."""
    hp = get_method("simclr_v2").Hparams()
    assert scaled_learning_rate(hp, 4096) == pytest.approx(6.4)
    assert hp.warmup_epochs == 0.05 * hp.epochs == 40 and hp.epochs == 800
    assert (hp.optimizer, hp.weight_decay, hp.temperature, hp.num_proj_layers, hp.embed_dim) == (
        "lars", 1e-4, 0.1, 3, 128
    )  # fmt: skip
    assert (hp.brightness, hp.blur, hp.ft_proj_selector, hp.sync_batch_norm) == ("multiplicative", True, 0, True)
    with pytest.raises(ValueError, match="ft_proj_selector"):
        get_method("simclr_v2").Hparams(ft_proj_selector=4)


@pytest.mark.parametrize(("method", "weight_decay"), [("simclr_v1", 1e-6), ("simclr_v2", 1e-4)])
def test_32px_presets_are_the_readme_cifar_command_and_inputs_are_unnormalised(method, weight_decay):
    """README (be133b3 for v1, HEAD for v2): --train_batch_size=512 --train_epochs=1000 --learning_rate=1.0
    --temperature=0.5 --use_blur=False --color_jitter_strength=0.5, weight decay 1e-6 (v1) / 1e-4 (v2)."""
    hp = build(f"{method}_resnet18_32px").method.hparams
    assert scaled_learning_rate(hp, 512) == pytest.approx(2.0)
    assert (hp.epochs, hp.temperature, hp.blur, hp.color_strength, hp.weight_decay) == (1000, 0.5, False, 0.5,
                                                                                        weight_decay)  # fmt: skip
    for name in (f"{method}_resnet18_32px", f"{method}_resnet18", f"{method}_resnet50"):
        preset = get_preset(name)
        assert preset.image_mean == (0.0, 0.0, 0.0) and preset.image_std == (1.0, 1.0, 1.0), name


# ---- heads -----------------------------------------------------------------------------------------------------------
def assert_tf_linear_bn_layer(linear, norm, dims, centred):
    """``linear_layer(use_bn=True)``: dense without bias (N(0, 0.01)), BatchNorm with γ, with β only if centred."""
    assert (linear.in_features, linear.out_features, linear.bias) == (*dims, None)
    assert 0.005 < linear.weight.std().item() < 0.015
    assert isinstance(norm, nn.BatchNorm1d) and norm.affine and norm.eps == 1e-5 and norm.weight.requires_grad
    assert norm.bias.requires_grad == centred and (centred or not norm.bias.any())


def test_v1_head_is_nl_0_and_nl_1_of_model_util_at_be133b3():
    head = build("simclr_v1_resnet18_32px").method.head
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert_tf_linear_bn_layer(head[0], head[1], (512, 512), centred=True)
    assert_tf_linear_bn_layer(head[3], head[4], (512, 128), centred=False)


def test_v2_head_is_three_layers_in_separius_contrastive_head_indices():
    head = build("simclr_v2_resnet18_32px").method.encoder.head
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert_tf_linear_bn_layer(head[0], head[1], (512, 512), centred=True)
    assert_tf_linear_bn_layer(head[3], head[4], (512, 512), centred=True)
    assert_tf_linear_bn_layer(head[6], head[7], (512, 128), centred=False)
    trainable = {name for name, p in head.named_parameters() if p.requires_grad}
    assert "7.bias" not in trainable and "7.weight" in trainable


# ---- loss ------------------------------------------------------------------------------------------------------------
def tf_contrastive_loss(hidden, temperature, replica=0, other=None):
    """``objective.add_contrastive_loss`` written out: L2-normalised halves, logits against the (cross-replica)
    batch, self-similarities minus 1e9, softmax cross-entropy of each half, loss_a + loss_b. ``other``: the
    projections of the other replica (concatenated before this one's when ``replica`` is 1)."""
    hidden = F.normalize(hidden, dim=-1)
    h1, h2 = hidden.chunk(2)
    large1, large2 = h1, h2
    if other is not None:
        o1, o2 = F.normalize(other, dim=-1).chunk(2)
        large1, large2 = (torch.cat([o1, h1]), torch.cat([o2, h2])) if replica else (torch.cat([h1, o1]),
                                                                                     torch.cat([h2, o2]))  # fmt: skip
    n, total = h1.shape[0], large1.shape[0]
    index = torch.arange(n) + replica * n
    labels, masks = F.one_hot(index, 2 * total).float(), F.one_hot(index, total).float()
    logits_aa = h1 @ large1.t() / temperature - masks * 1e9
    logits_bb = h2 @ large2.t() / temperature - masks * 1e9
    logits_ab, logits_ba = h1 @ large2.t() / temperature, h2 @ large1.t() / temperature
    loss_a = -(labels * F.log_softmax(torch.cat([logits_ab, logits_aa], 1), 1)).sum(1).mean()
    loss_b = -(labels * F.log_softmax(torch.cat([logits_ba, logits_bb], 1), 1)).sum(1).mean()
    return loss_a + loss_b


@pytest.mark.parametrize("preset", ["simclr_v1_resnet18_32px", "simclr_v2_resnet18_32px"])
def test_loss_is_the_tf_loss_of_both_views_projected_in_one_batch(preset):
    """model.py: both views concatenated through the network (BatchNorm over the 2N images), the TF loss
    loss_a + loss_b = 2 x the paper's eq. 1 mean (``nt_xent``)."""
    method = build(preset, temperature=0.2, **TINY).method.train()
    snapshot = copy.deepcopy(method)
    views = two_views()
    loss = method(Batch.of(views)).loss
    with torch.no_grad():
        joint = snapshot.project(torch.cat(views))
        separate = torch.cat([snapshot.project(view) for view in views])
    torch.testing.assert_close(loss, tf_contrastive_loss(joint, 0.2))
    torch.testing.assert_close(loss, 2 * nt_xent(*joint.chunk(2), 0.2))
    assert abs(loss.item() - tf_contrastive_loss(separate, 0.2).item()) > 1e-3  # per-view BN would differ


def test_across_processes_negatives_are_gathered_with_this_replicas_rows_at_its_offset(monkeypatch):
    """``tpu_cross_replica_concat``: as replica 1 of 2, the local anchors are contrasted with both replicas'
    projections, their positives at rows N..2N-1; the gathered tensors keep the local gradient."""
    method = build("simclr_v1_resnet18_32px", **TINY).method.train()
    other = images(2 * BATCH, 32, seed=5)
    gathered = []

    def fake_gather(z):
        gathered.append(z)
        half = other[:BATCH] if len(gathered) == 1 else other[BATCH:]
        return torch.cat([half, z])

    monkeypatch.setattr(simclr, "rank", lambda: 1)
    monkeypatch.setattr(simclr, "gather_with_grad", fake_gather)
    snapshot = copy.deepcopy(method)
    loss = method(Batch.of(two_views()))
    with torch.no_grad():
        expected = tf_contrastive_loss(snapshot.project(torch.cat(two_views())), method.hparams.temperature, 1, other)
    torch.testing.assert_close(loss.loss, expected)
    assert all(z.requires_grad for z in gathered)


# ---- released encoder ------------------------------------------------------------------------------------------------
def test_v1_releases_the_resnet_without_the_head():
    model = build("simclr_v1_resnet18_32px", **TINY)
    other = copy.deepcopy(model.method.encoder)
    perturb_(other, ("backbone.",))
    assert_released_is(model, model.method.encoder, other)
    assert not any(key.startswith("head") for key in model.released_model().state_dict())


@pytest.mark.parametrize(("selector", "width"), [(0, 512), (1, 64), (2, 64), (-1, 32)])
def test_v2_releases_resnet_and_head_pooled_after_ft_proj_selector_layers(selector, width):
    """``projection_head``: hiddens_list = [h, relu(bn(W0 h)), relu(bn(W1 ·)), bn(W2 ·)], fine-tuning takes
    hiddens_list[ft_proj_selector]. Checked against the layers written out with the encoder's own weights."""
    model = build("simclr_v2_resnet18_32px", ft_proj_selector=selector, **TINY)
    perturb_(model.method, ("encoder.head.",), scale=0.2)
    for norm in model.method.encoder.head:
        if isinstance(norm, nn.BatchNorm1d):
            norm.running_mean.uniform_(-0.1, 0.1), norm.running_var.uniform_(0.5, 1.5)
    released = model.released_model().eval()
    assert released.num_features == width and type(released.encoder) is simclr.SimCLRv2Encoder
    pixels = images(2, 3, 32, 32)
    state = released.encoder.head.state_dict()
    with torch.no_grad():
        hidden = released.encoder.backbone.forward_features(pixels).mean((2, 3))
        outputs = [hidden]
        for layer in range(3):
            w, p = state[f"{3 * layer}.weight"], f"{3 * layer + 1}."
            x = (outputs[-1] @ w.t() - state[p + "running_mean"]) / torch.sqrt(state[p + "running_var"] + 1e-5)
            x = x * state[p + "weight"] + state[p + "bias"]
            outputs.append(F.relu(x) if layer < 2 else x)
        torch.testing.assert_close(released(pixels).pooler_output, outputs[selector])
    if selector == 0:
        other = copy.deepcopy(model.method.encoder)
        perturb_(other, ("backbone.",))
        assert_released_is(model, model.method.encoder, other)


# ---- views -----------------------------------------------------------------------------------------------------------
def view_pieces(preset, **overrides):
    return build(preset, **overrides).method.view_recipe().transforms


def test_v1_views_crop_flip_additive_colour_jitter_grayscale_blur():
    """preprocess_for_train: bicubic crop (0.08-1), flip, colour jitter s = 1 (0.8/0.8/0.8/0.2, p 0.8) with v1's
    additive brightness, grayscale (p 0.2); batch_random_blur p 0.5, kernel 23 at 224 px, σ in [0.1, 2]."""
    first, second = view_pieces("simclr_v1_resnet18")
    assert first is second or repr(first) == repr(second)
    pieces = first.transforms
    assert [type(t) for t in pieces[:7]] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToImage, v2.ToDtype,
                                             TFColorJitter, v2.RandomGrayscale, v2.RandomApply]  # fmt: skip
    crop, jitter, gray, blur = pieces[0], pieces[4], pieces[5], pieces[6]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == v2.InterpolationMode.BICUBIC
    assert tuple(crop.size) == (224, 224)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, jitter.p) == (0.8, 0.8, 0.8, 0.2, 0.8)
    assert gray.p == 0.2 and blur.p == 0.5
    assert tuple(blur.transforms[0].kernel_size) == (23, 23) and list(blur.transforms[0].sigma) == [0.1, 2.0]
    normalize = next(t for t in pieces if isinstance(t, v2.Normalize))
    assert normalize.mean == [0.0, 0.0, 0.0] and normalize.std == [1.0, 1.0, 1.0]


def test_v2_views_use_multiplicative_brightness_and_the_cifar_preset_has_no_blur():
    pieces = view_pieces("simclr_v2_resnet18")[0].transforms
    jitter = pieces[2].transforms[0]
    assert isinstance(jitter, v2.ColorJitter) and pieces[2].p == 0.8
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    assert ranges == ((pytest.approx(0.2), 1.8),) * 3 + ((-0.2, 0.2),)
    cifar = view_pieces("simclr_v2_resnet18_32px")[0].transforms
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur) for t in cifar)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    views = build("simclr_v2_resnet18_32px").method.view_recipe()(image).views
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 and all(v.min() >= 0 and v.max() <= 1 for v in views)


def test_v1_brightness_is_additive_and_clipped():
    """tf.image.random_brightness: x + δ with δ ~ U[-0.8 s, 0.8 s], then clipped to [0, 1]."""
    jitter = TFColorJitter(1.0, p=1.0)
    jitter.contrast = jitter.saturation = jitter.hue = 0.0
    image = 0.45 + 0.1 * torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    deltas = []
    for _ in range(30):
        out = jitter(image)
        inside = (out > 0) & (out < 1)
        assert out.min() >= 0 and out.max() <= 1 and ((out == 0) | (out == 1) | inside).all()
        if inside.any():
            delta = (out - image)[inside]
            assert torch.allclose(delta, delta[0].expand_as(delta), atol=1e-6)
            deltas.append(delta[0].item())
    assert len(deltas) > 10 and min(deltas) < -0.1 and max(deltas) > 0.1 and max(abs(d) for d in deltas) <= 0.8


# ---- a short pretraining run -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["simclr_v1_resnet18_32px", "simclr_v2_resnet18_32px"])
def test_pretrain_runs_on_builtin_data(tmp_path, preset):
    args = PretrainArguments(model=preset, output_dir=str(tmp_path), batch_size=16, max_steps=2, knn_every=0,
                             log_with=None, progress=False, overrides=TINY)  # fmt: skip
    result = pretrain(args)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    encoder = sslhub.from_pretrained(tmp_path)
    trained = result.model.method.encoder.state_dict()
    for name, value in encoder.encoder.state_dict().items():
        assert torch.equal(value, trained[name]), name


# ---- the releases: written-out TF ResNet-50 ------------------------------------------------------------------------
def tf_conv(x, weight, stride):
    """``conv2d_fixed_padding``: strided convolutions pad (k-1)//2 before and the rest after, then 'VALID'; stride 1
    is 'SAME' (odd kernels: symmetric)."""
    k = weight.shape[-1]
    if stride > 1:
        begin = (k - 1) // 2
        return F.conv2d(F.pad(x, (begin, k - 1 - begin, begin, k - 1 - begin)), weight, stride=stride)
    return F.conv2d(x, weight, padding=(k - 1) // 2)


def tf_batch_norm(x, state, prefix, relu=True):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - state[prefix + "running_mean"].view(shape)) / torch.sqrt(state[prefix + "running_var"].view(shape) + 1e-5)
    y = y * state[prefix + "weight"].view(shape) + state[prefix + "bias"].view(shape)
    return F.relu(y) if relu else y


def tf_same_max_pool(x):
    """``tf.layers.max_pooling2d(pool_size=3, strides=2, padding='SAME')``: (k - s) // 2 before, the rest after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), 3, 2)


def tf_resnet50(state, x):
    """``resnet_v1_generator`` (50 layers, width 1) with the weights named as torchvision names them; the feature is
    ``final_avg_pool``."""
    x = tf_same_max_pool(tf_batch_norm(tf_conv(x, state["conv1.weight"], 2), state, "bn1."))
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            p, stride = f"layer{stage}.{block}.", 2 if stage > 1 and block == 0 else 1
            shortcut = x
            if block == 0:
                shortcut = tf_batch_norm(tf_conv(x, state[p + "downsample.0.weight"], stride), state,
                                         p + "downsample.1.", relu=False)  # fmt: skip
            y = tf_batch_norm(tf_conv(x, state[p + "conv1.weight"], 1), state, p + "bn1.")
            y = tf_batch_norm(tf_conv(y, state[p + "conv2.weight"], stride), state, p + "bn2.")
            y = tf_batch_norm(tf_conv(y, state[p + "conv3.weight"], 1), state, p + "bn3.", relu=False)
            x = F.relu(y + shortcut)
    return x.mean((2, 3))


def tf_head(state, h, layers):
    """``projection_head``: the first ``layers`` of Linear (no bias) - BatchNorm - ReLU (no ReLU after the last)."""
    for i in range(layers):
        h = tf_batch_norm(h @ state[f"layers.{3 * i}.weight"].t(), state, f"layers.{3 * i + 1}.", relu=i < 2)
    return h


@pytest.fixture(scope="module")
def resnet50_state():
    """A torchvision ResNet-50 with the 1000-class fc and BatchNorm statistics of real activations (one train-mode
    pass with momentum 1, then perturbed), γ / β random."""
    torch.manual_seed(7)
    net = torchvision.models.resnet50()
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = 1.0
        nn.init.uniform_(norm.weight, 0.5, 1.5), nn.init.uniform_(norm.bias, -0.2, 0.2)
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 64, 64))
    for norm in norms:
        norm.momentum = 0.1
        norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.8, 1.25))
    return net.state_dict()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # unnormalised [0, 1], as the TF input


@pytest.fixture(scope="module")
def simclr_v1_file(tmp_path_factory, resnet50_state):
    """tonylins' convert.py: torch.save({'state_dict': resnet50x1().state_dict()}); fc.bias is the initialisation."""
    path = tmp_path_factory.mktemp("simclr_v1") / "resnet50-1x.pth"
    torch.save({"state_dict": resnet50_state}, path)
    return path


def test_zoo_script_checks_the_release_against_torchvision_padded_as_tf(simclr_v1_file, tmp_path):
    result = zoo_script().convert_release(get_pretrained("simclr_v1_resnet50.in1k"), simclr_v1_file, tmp_path / "out")
    assert result["independent_rel_error"] < 1e-4 and result["reload_max_abs_diff"] == 0.0


def test_simclr_v1_file_computes_the_tf_resnet(simclr_v1_file, resnet50_state, pixels, tmp_path, monkeypatch):
    """The converted model equals the TF forward (stem max-pool 'SAME'); the converter's own PyTorch model (torchvision
    layout, symmetric max-pool padding) does not."""
    converted = read_checkpoint(simclr_v1_file)
    assert converted.layout == "simclr_v1" and converted.method_overrides == {"tf_padding": "max_pool"}
    assert any("fc.bias" in entry for entry in converted.left_out) and "fc.weight" not in converted.backbone
    backbone = {k: v for k, v in resnet50_state.items() if not k.startswith("fc.")}
    with torch.no_grad():
        expected = tf_resnet50(backbone, pixels)
        model = convert_checkpoint("simclr_v1_resnet50", simclr_v1_file)
        assert model.config.method_kwargs["tf_padding"] == "max_pool"
        assert relative_error(model(pixels).pooler_output, expected) < 1e-4
        torchvision_net = torchvision.models.resnet50()
        torchvision_net.fc = nn.Identity()
        torchvision_net.load_state_dict(backbone)
        assert relative_error(torchvision_net.eval()(pixels), expected) > 1e-2  # 0.67 at 64 px, 0.14 at 224 px
        monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))
        release = sslhub.create_model("simclr_v1_resnet50.in1k", pretrained=True, pretrained_path=simclr_v1_file)
        assert relative_error(release(pixels).pooler_output, expected) < 1e-4
    with pytest.raises(CheckpointError, match="resnet50-1x.pth"):  # nothing to download: a PyTorch conversion
        sslhub.create_model("simclr_v1_resnet50.in1k", pretrained=True)


def separius_name(key: str) -> str:
    """torchvision name -> Separius' ``resnet.ResNet`` name: ``net.0`` = Stem(conv, BatchNormRelu, max-pool),
    ``net.s.blocks.b`` = BottleneckBlock(projection = Projection(shortcut conv, bn = BatchNormRelu), net = [conv,
    BatchNormRelu, conv, BatchNormRelu, conv, BatchNormRelu(relu=False)])."""
    stem = {"conv1.": "net.0.0.", "bn1.": "net.0.1.0."}
    for old, new in stem.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith("fc."):
        return key
    stage, block, module, rest = key.split(".", 3)
    block_names = {"conv1": "net.0", "bn1": "net.1.0", "conv2": "net.2", "bn2": "net.3.0", "conv3": "net.4",
                   "bn3": "net.5.0", "downsample": {"0": "projection.shortcut", "1": "projection.bn.0"}}  # fmt: skip
    name = block_names[module]
    if isinstance(name, dict):
        index, rest = rest.split(".", 1)
        name = name[index]
    return f"net.{stage[-1]}.blocks.{block}.{name}.{rest}"


def contrastive_head_state(dim=2048, out=128):
    """Separius' ``ContrastiveHead(2048)``: layers = [Linear(no bias), BatchNorm1d, ReLU] x 2 + [Linear, BatchNorm1d]
    with the last BatchNorm's bias 0 (TF ``center=False``)."""
    torch.manual_seed(11)
    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(),
                                   nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(),
                                   nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out)])  # fmt: skip
    for module in holder.layers:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.03)
        if isinstance(module, nn.BatchNorm1d):
            nn.init.uniform_(module.weight, 0.5, 1.5), nn.init.uniform_(module.bias, -0.2, 0.2)
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
    nn.init.zeros_(holder.layers[7].bias)
    return holder.state_dict()


@pytest.fixture(scope="module")
def simclr_v2_file(tmp_path_factory, resnet50_state):
    """Separius' convert.py: torch.save({'resnet': model.state_dict(), 'head': head.state_dict()}) as r50_1x_sk0.pth."""
    head = contrastive_head_state()
    resnet = {separius_name(key): value for key, value in resnet50_state.items()}
    path = tmp_path_factory.mktemp("simclr_v2") / "r50_1x_sk0.pth"
    torch.save({"resnet": resnet, "head": head}, path)
    return path, head


def test_simclr_v2_file_computes_the_tf_resnet_and_head(simclr_v2_file, resnet50_state, pixels, tmp_path, monkeypatch):
    path, head = simclr_v2_file
    converted = read_checkpoint(path)
    assert converted.layout == "simclr_v2" and converted.method_overrides == {
        "tf_padding": "max_pool", "num_proj_layers": 3, "embed_dim": 128, "proj_hidden_dim": 2048
    }  # fmt: skip
    backbone = {k: v for k, v in resnet50_state.items() if not k.startswith("fc.")}
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))
    with torch.no_grad():
        resnet = tf_resnet50(backbone, pixels)
        model = convert_checkpoint("simclr_v2_resnet50", path)
        assert relative_error(model(pixels).pooler_output, resnet) < 1e-4
        release = sslhub.create_model("simclr_v2_resnet50.in1k", pretrained=True, pretrained_path=path,
                                      ft_proj_selector=1)  # fmt: skip
        assert release.num_features == 2048
        assert relative_error(release(pixels).pooler_output, tf_head(head, resnet, 1)) < 1e-4
        method = convert_checkpoint("simclr_v2_resnet50", path, task="pretraining").method.eval()
        assert relative_error(method.project(pixels), tf_head(head, resnet, 3)) < 1e-4
        assert method.encoder.head[7].bias.requires_grad is False and not method.encoder.head[7].bias.any()


def test_simclr_v2_deeper_resnets_map_onto_timm_and_sk_or_wide_files_are_refused(tmp_path):
    """r101_1x_sk0 / r152_1x_sk0: the same blocks, more of them; SK (ResNet-D stem, selective kernels) and 2x / 3x
    (a 128 / 192-channel 7x7 stem) have no timm equivalent."""
    for depth, layers in ((101, (3, 4, 23, 3)), (152, (3, 8, 36, 3))):
        with torch.device("meta"):
            keys = timm.create_model(f"resnet{depth}", num_classes=0).state_dict().keys()
        resnet = {separius_name(key): torch.zeros(64 if key == "conv1.weight" else 1) for key in keys}
        resnet |= {"fc.weight": torch.zeros(1000, 1), "fc.bias": torch.zeros(1000)}
        backbone = convert_simclr_v2({"resnet": resnet, "head": contrastive_head_state(8, 4)}, "file").backbone
        assert backbone.keys() == keys and sum(key.endswith(".conv1.weight") for key in keys) == sum(layers)
    sk = {"resnet": {"net.0.0.weight": torch.zeros(1), "net.0.2.weight": torch.zeros(1)}, "head": {}}
    with pytest.raises(CheckpointError, match="selective-kernel"):
        convert_simclr_v2(sk, "r50_1x_sk1.pth")
    wide = {"conv1.weight": torch.zeros(128, 3, 7, 7), "layer1.0.downsample.0.weight": torch.zeros(1),
            "fc.weight": torch.zeros(1000, 1), "fc.bias": torch.zeros(1000)}  # fmt: skip
    torch.save({"state_dict": wide}, tmp_path / "resnet50-2x.pth")
    with pytest.raises(CheckpointError, match="wide 7x7 stem"):
        read_checkpoint(tmp_path / "resnet50-2x.pth")


def test_releases_are_registered_as_pytorch_conversions_of_the_tf_checkpoints():
    v1 = get_pretrained("simclr_v1_resnet50.in1k")
    assert (v1.metrics, v1.converted_file, v1.overrides["tf_padding"]) == ({"linear": 69.1}, "resnet50-1x.pth",
                                                                            "max_pool")  # fmt: skip
    assert "tonylins/simclr-converter" in v1.conversion and v1.url.endswith("ResNet50_1x.zip")
    for preset, name, linear in (("simclr_v2_resnet50", "r50_1x_sk0", 71.7), ("simclr_v2_resnet152", "r152_1x_sk0",
                                                                             74.5)):  # fmt: skip
        tag = get_pretrained(f"{preset}.in1k")
        assert tag.converted_file == f"{name}.pth" and tag.metrics["linear"] == linear and tag.epochs == 800
        assert "Separius/SimCLRv2-Pytorch" in tag.conversion and tag.overrides["tf_padding"] == "max_pool"


# ---- other objectives (``loss``) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", simclr.LOSSES)
def test_each_loss_choice_trains_with_finite_loss_and_backbone_gradients(loss):
    method = build("simclr_v1_resnet18_32px", loss=loss, **TINY).method.train()
    out = method(Batch.of(two_views())).loss
    assert torch.isfinite(out)
    out.backward()
    grads = [p.grad for p in method.encoder.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_an_unknown_loss_choice_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="loss 'infonce'.*nt_xent.*alignment_uniformity"):
        build("simclr_v1_resnet18_32px", loss="infonce", **TINY)
