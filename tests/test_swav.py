"""SwAV (arXiv 2006.09882; facebookresearch/swav) built through ``sslhub.create_model(preset, task="pretraining")``.

Each test checks one rule of ``main_swav.py`` / ``src/resnet50.py`` / ``src/multicropdataset.py`` /
``eval_linear.py`` against numbers computed here: the hyperparameters of the scripts, the heads index by index, the
training step (prototype normalisation, multi-resolution forward, the queue, Sinkhorn-Knopp in the authors' K x B
form, the swapped prediction) written out as the official loop, the frozen prototypes, the queue across a resume, the
views and the evaluation pre-processing, the released files read into the authors' own ResNet-50 forward, and the LARC
rule of ``apex.parallel.LARC`` (``clip=False``) that ``main_swav.py`` wraps around SGD.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_released_is, build, perturb_, relative_error
from PIL import Image
from timm.optim import Lars
from torch import nn
from torchvision import transforms as T

import sslhub
from sslhub.batch import Batch
from sslhub.conversion.convert import convert_checkpoint, read_checkpoint
from sslhub.methods import TrainingProgress
from sslhub.methods.swav import SwAV, SwAVHparams, crop_sizes, swav_views
from sslhub.optim import create_optimizer
from sslhub.registry import get_preset, get_pretrained
from sslhub.training import PretrainArguments, pretrain

BATCH = 4
TINY = SwAV.tiny_overrides  # ResNet-18, 2 x 32 px + 2 x 16 px crops, projection 512-64-32, 32 prototypes
STD = [0.228, 0.224, 0.225]

pytestmark = pytest.mark.usefixtures("single_thread")


def build_swav(**overrides):
    return build("swav_resnet18_32px", **{**TINY, **overrides})


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def crops(seed=0):
    """Two 32 px and two 16 px crops of a batch of 4."""
    return [images(BATCH, 3, 32, 32, seed=seed + i) for i in range(2)] + [
        images(BATCH, 3, 16, 16, seed=seed + 10 + i) for i in range(2)
    ]


# ---- hyperparameters, heads, initialisation ---------------------------------------------------------------------
def test_defaults_are_the_800ep_script_and_bs256_tags_the_small_batch_scripts():
    hp = SwAVHparams()
    script = {  # scripts/swav_800ep_pretrain.sh (batch 64 x 64 GPUs), main_swav.py defaults for the rest
        "nmb_crops": (2, 6), "min_scale_crops": (0.14, 0.05), "max_scale_crops": (1.0, 0.14),
        "crops_for_assign": (0, 1), "temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3, "feat_dim": 128,
        "hidden_mlp": 2048, "nmb_prototypes": 3000, "queue_length": 0, "epoch_queue_starts": 15, "epochs": 800,
        "lr": 4.8, "lr_batch_size": 4096, "weight_decay": 1e-6, "warmup_epochs": 10, "optimizer": "larc",
        "sync_batch_norm": True, "blur_p": 0.5, "freeze_prototypes_epochs": 1.0,
    }  # fmt: skip
    assert {name: getattr(hp, name) for name in script} == script
    assert hp.min_lr_ratio * hp.lr == pytest.approx(0.0048)  # --final_lr
    assert hp.warmup_start_ratio * hp.lr == pytest.approx(0.3)  # --start_warmup
    assert crop_sizes(hp, 224) == [224, 96] and crop_sizes(hp, 32) == [32, 14]  # --size_crops, scaled
    small = get_pretrained("swav_resnet50.in1k_400ep_bs256").overrides  # swav_400ep_bs256_pretrain.sh
    assert small == {"epochs": 400, "lr": 0.6, "lr_batch_size": 256, "warmup_epochs": 0, "queue_length": 3840,
                     "epoch_queue_starts": 15}  # fmt: skip
    assert get_pretrained("swav_resnet50").tag == "in1k_800ep"  # hubconf.py's resnet50
    with pytest.raises(ValueError, match="one entry per"):
        SwAVHparams(nmb_crops=(2, 6), min_scale_crops=(0.14,))


def test_projection_head_prototypes_and_initialisation_are_src_resnet50s():
    """``projection_head`` = Linear(2048, 2048) + bias, BN, ReLU, Linear(2048, 128) + bias (indices 0-3);
    ``prototypes`` = Linear(128, 3000) without bias; convolutions Kaiming fan-out, every BN at 1 / 0
    (``zero_init_residual=False``: timm's default zero-initialises the last BN of each block)."""
    method = build("swav_resnet50").method
    head = method.projection_head
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[0].bias is not None) == (2048, 2048, True)
    assert (head[3].in_features, head[3].out_features, head[3].bias is not None) == (2048, 128, True)
    assert (method.prototypes.in_features, method.prototypes.out_features) == (128, 3000)
    assert method.prototypes.bias is None
    for block in method.encoder.backbone.layer1:
        assert torch.equal(block.bn3.weight, torch.ones(256))
    assert [type(m) for m in build_swav(hidden_mlp=0).method.projection_head] == [nn.Linear]  # --hidden_mlp 0
    assert get_preset("swav_resnet50").image_std == tuple(STD)


# ---- the training step, as main_swav.py's train() loop ----------------------------------------------------------
@torch.no_grad()
def official_sinkhorn(out, epsilon=0.05, iterations=3):
    """``distributed_sinkhorn`` in one process: Q = exp(out / ε)ᵀ (K x B), rows to 1/K, columns to 1/B."""
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def official_swav_loss(method, views, queue, use_the_queue, temperature=0.1):
    """One iteration of ``train()``: normalise the prototypes, multi-resolution forward, codes of crops 0 and 1
    (with the queue's scores first once used), queue shifted by a batch, loss over every other crop."""
    with torch.no_grad():
        w = F.normalize(method.prototypes.weight.data.clone(), dim=1, p=2)
        method.prototypes.weight.copy_(w)
    sizes = torch.tensor([view.shape[-1] for view in views])
    ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
    start, features = 0, []
    for end in ends:
        features.append(method.encoder(torch.cat(views[start:end])))
        start = end
    embedding = F.normalize(method.projection_head(torch.cat(features)), dim=1, p=2)
    output = method.prototypes(embedding)
    embedding = embedding.detach()
    bs, n_crops = views[0].shape[0], len(views)
    loss = 0
    for i, crop_id in enumerate((0, 1)):
        with torch.no_grad():
            out = output[bs * crop_id : bs * (crop_id + 1)].detach()
            if queue is not None:
                if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                    use_the_queue = True
                    out = torch.cat((torch.mm(queue[i], method.prototypes.weight.t()), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs : (crop_id + 1) * bs]
            q = official_sinkhorn(out)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(n_crops), crop_id):
            x = output[bs * v : bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    return loss / 2, use_the_queue


def test_training_steps_are_main_swav_train_with_the_queue():
    """Five steps at epoch 15 with ``--queue_length 10`` at batch 4 (rounded to 8 = two batches): the queue fills
    for two steps, then its scores precede the batch's in Sinkhorn-Knopp; losses and queue as the official loop."""
    method = build_swav(queue_length=10, epoch_queue_starts=15).method.train()
    perturb_(method, ("prototypes.",), scale=0.5)
    reference = copy.deepcopy(method)
    queue, use_the_queue = torch.zeros(2, 8, 32), False  # main_swav.py: zeros(2, queue_length // world_size, 32)
    method.on_step_start(TrainingProgress(15 * 10, 100 * 10, 10))
    for step in range(5):
        views = crops(seed=10 * step)
        loss = method(Batch.of(views)).loss
        expected, use_the_queue = official_swav_loss(reference, views, queue, use_the_queue)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        torch.testing.assert_close(method.queue[:, :8], queue, msg=f"step {step}")
        assert use_the_queue == (step >= 2)
    assert torch.equal(method.queue[:, 8:], torch.zeros(2, 2, 32))  # rows past the rounded length stay unused
    norms = method.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(32))  # normalised in place before the forward


def test_no_queue_before_its_epoch_and_an_eval_forward_changes_nothing():
    method = build_swav(queue_length=8, epoch_queue_starts=3).method.train()
    perturb_(method, ("prototypes.",), scale=0.5)
    method.on_step_start(TrainingProgress(29, 100, 10))  # epoch 2
    reference = copy.deepcopy(method)
    loss = method(Batch.of(crops())).loss
    torch.testing.assert_close(loss, official_swav_loss(reference, crops(), None, False)[0], rtol=1e-5, atol=1e-6)
    assert not method.queue.any()
    method.on_step_start(TrainingProgress(30, 100, 10))  # epoch 3: filled
    method(Batch.of(crops()))
    assert method.queue[:, :4].any() and not method.queue[:, 4:].any()
    method.eval()
    state = {k: v.clone() for k, v in method.state_dict().items()} | {"queue": method.queue.clone()}
    method(Batch.of(crops(seed=5)))
    for key, value in (method.state_dict() | {"queue": method.queue}).items():
        assert torch.equal(value, state[key]), key


def test_queue_rows_are_the_rounded_length_split_over_processes(monkeypatch):
    """``queue_length -= queue_length % (batch_size * world_size)``, then ``queue_length // world_size`` rows per
    process; the buffer keeps its world-size-free shape, so a checkpoint loads in any number of processes."""
    method = build_swav(queue_length=1000, epoch_queue_starts=0).method.train()
    assert method.queue.shape == (2, 1000, 32)
    monkeypatch.setattr("sslhub.methods.swav.world_size", lambda: 4)
    assert method.queue_rows(64) == (1000 - 1000 % 256) // 4 == 192
    monkeypatch.setattr("sslhub.methods.swav.world_size", lambda: 1)
    assert method.queue_rows(64) == 960
    assert "queue" in SwAV.per_process_buffers and "queue" not in method.state_dict()


def test_prototypes_get_no_gradient_during_the_first_epoch():
    """``if iteration < freeze_prototypes_niters: p.grad = None`` for the prototypes only (one epoch)."""
    method = build_swav(freeze_prototypes_epochs=1.0).method.train()
    for step, frozen in ((0, True), (9, True), (10, False)):
        method.zero_grad()
        method(Batch.of(crops())).loss.backward()
        method.on_before_optimizer_step(TrainingProgress(step, 100, 10))
        assert (method.prototypes.weight.grad is None) == frozen
        assert method.projection_head[0].weight.grad.abs().sum() > 0
    method = build_swav(freeze_prototypes_epochs=2.5).method.train()
    method(Batch.of(crops())).loss.backward()
    method.on_before_optimizer_step(TrainingProgress(24, 100, 10))
    assert method.prototypes.weight.grad is None


def test_released_encoder_is_the_resnet_without_heads():
    model = build_swav()
    other = copy.deepcopy(model.method.encoder)
    perturb_(other, ("backbone.",))
    assert_released_is(model, model.method.encoder, other)


# ---- views and evaluation pre-processing ------------------------------------------------------------------------
def test_views_are_multicropdataset():
    """``MultiCropDataset`` for the 800ep script: 2 crops of 224 px (scale 0.14-1) then 6 of 96 px (0.05-0.14),
    each flip, colour distortion s=1 (0.8/0.8/0.8/0.2, p 0.8), grayscale 0.2, blur p 0.5, SwAV's std."""
    recipe = swav_views(SwAVHparams(), 224, (0.485, 0.456, 0.406), STD)
    views = recipe(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))).views
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    for transform, scale in zip(recipe.transforms, [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6, strict=True):
        pieces = transform.transforms
        assert pieces[0].scale == scale and pieces[1].p == 0.5
        jitter = pieces[2].transforms[0]
        assert pieces[2].p == 0.8 and pieces[3].p == 0.2 and jitter.hue == (-0.2, 0.2)
        assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.2, 1.8))
        assert pieces[4].p == 0.5 and pieces[4].transforms[0].sigma == [0.1, 2.0]
        assert pieces[-2].std == STD
    cifar = build("swav_resnet18_32px").method.view_recipe()  # solo-learn: two 32 px crops, scale 0.08-1
    assert [t.transforms[0].size for t in cifar.transforms] == [(32, 32)] * 2
    assert cifar.transforms[0].transforms[0].scale == (0.08, 1.0)


def test_eval_transform_is_eval_linear_py():
    """``Resize(256)`` (bilinear), ``CenterCrop(224)``, ``Normalize(mean, [0.228, 0.224, 0.225])``."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 340, 3), dtype=np.uint8))
    config = sslhub.SSLConfig.from_preset("swav_resnet50")
    ours = SwAV.eval_transform(config)(image)
    official = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], STD)])
    torch.testing.assert_close(ours, official(image), rtol=0, atol=1e-5)


# ---- training runs --------------------------------------------------------------------------------------------------
def test_pretrain_runs_swav_on_builtin_data(tmp_path):
    args = PretrainArguments(
        model="swav_resnet18_32px",
        output_dir=str(tmp_path),
        batch_size=32,
        max_steps=2,
        knn_every=0,
        log_with=None,
        progress=False,
        overrides=dict(TINY),
    )
    result = pretrain(args)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    encoder = sslhub.from_pretrained(tmp_path)
    trained = result.model.method.encoder.backbone.state_dict()
    for name, value in encoder.encoder.backbone.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_queue_is_kept_across_a_resume(image_folder, tmp_path):
    """Queue from epoch 0, two batches long: a run cut after step 4 and resumed gives the uninterrupted run's
    losses and queue (the queue comes back from the per-process file)."""
    common = dict(
        model="swav_resnet18_32px", data=str(image_folder), epochs=2, batch_size=8, log_with=None, progress=False,
        knn_every=0, checkpoint_every=2, overrides={**TINY, "queue_length": 16, "epoch_queue_starts": 0},
    )  # fmt: skip
    full = pretrain(PretrainArguments(output_dir=str(tmp_path / "full"), **common))
    pretrain(PretrainArguments(output_dir=str(tmp_path / "cut"), max_steps=4, **common))
    resumed = pretrain(PretrainArguments(output_dir=str(tmp_path / "cut"), resume="latest", **common))
    assert resumed.losses == full.losses[4:]
    assert full.model.method.queue.any() and torch.equal(resumed.model.method.queue, full.model.method.queue)


# ---- the authors' files ---------------------------------------------------------------------------------------------
class AuthorsResNet(nn.Module):
    """``src/resnet50.py`` ``ResNet(normalize=True, hidden_mlp, output_dim, nmb_prototypes)``: torchvision's
    blocks, a ``ConstantPad2d(1)`` before conv1 with padding 2, average pool, projection head, prototypes."""

    def __init__(self, arch="resnet50", hidden_mlp=2048, output_dim=128, nmb_prototypes=3000):
        super().__init__()
        net = getattr(torchvision.models, arch)()
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=2, bias=False)
        for name in ("bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        width = net.fc.in_features
        if hidden_mlp:
            self.projection_head = nn.Sequential(
                nn.Linear(width, hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(inplace=True),
                nn.Linear(hidden_mlp, output_dim),
            )  # fmt: skip
        else:
            self.projection_head = nn.Linear(width, output_dim)
        self.prototypes = nn.Linear(output_dim, nmb_prototypes, bias=False)
        for module in self.modules():  # non-trivial BatchNorm statistics and affine parameters
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.2, 0.2)

    def forward_backbone(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, x):
        x = F.normalize(self.projection_head(x), dim=1, p=2)
        return x, self.prototypes(x)


@pytest.fixture(scope="module")
def swav_release(tmp_path_factory):
    """``swav_800ep_pretrain.pth.tar``: the DDP state dict (``module.`` keys) alone, as ``hubconf.py`` reads it."""
    torch.manual_seed(5)
    authors = AuthorsResNet().eval()
    path = tmp_path_factory.mktemp("swav") / "swav_800ep_pretrain.pth.tar"
    torch.save({f"module.{k}": v for k, v in authors.state_dict().items()}, path)
    return path, authors


def test_released_file_matches_the_authors_resnet50(swav_release):
    path, authors = swav_release
    pixels = images(1, 3, 64, 64, seed=3)
    model = sslhub.create_model("swav_resnet50.in1k_800ep", pretrained=True, pretrained_path=path)
    with torch.no_grad():
        pooled = model(pixels).pooler_output
        expected = authors.forward_backbone(pixels)
    error = relative_error(pooled, expected)
    print(f"\nswav layout, released file, backbone: max relative error {error:.2e}")
    assert pooled.shape == (1, 2048) and error < 1e-4
    assert model.config.image_std == STD
    assert read_checkpoint(path).layout == "swav"


def test_released_file_loads_the_heads_for_pretraining_with_the_tags_recipe(swav_release):
    path, authors = swav_release
    model = sslhub.create_model("swav_resnet50.in1k_200ep_bs256", task="pretraining", pretrained=True,
                                pretrained_path=path)  # fmt: skip
    method = model.method
    features = images(3, 2048, seed=4)
    with torch.no_grad():
        embedding, scores = authors.forward_head(features)
        ours = F.normalize(method.projection_head(features), dim=1)
        error = max(relative_error(ours, embedding), relative_error(method.prototypes(ours), scores))
    print(f"\nswav layout, released file, projection head + prototypes: max relative error {error:.2e}")
    assert error < 1e-4
    assert torch.equal(method.encoder.backbone.layer4[2].conv3.weight, authors.layer4[2].conv3.weight)
    kwargs = model.config.method_kwargs
    assert (kwargs["queue_length"], kwargs["lr"], kwargs["lr_batch_size"], kwargs["epochs"]) == (3840, 0.6, 256, 200)
    assert method.queue.shape == (2, 3840, 128)
    method.train().on_step_start(TrainingProgress(0, 100, 10))  # a new run: the queue (no part of files) starts empty
    assert not method.queue.any()


def test_training_checkpoint_with_a_linear_head(tmp_path):
    """``main_swav.py``'s ``checkpoint.pth.tar`` (``{'epoch', 'state_dict', 'optimizer', 'amp'}``) of a ResNet-18 run
    with ``--hidden_mlp 0`` (``projection_head`` one Linear) and 64 prototypes of dimension 32."""
    torch.manual_seed(6)
    authors = AuthorsResNet("resnet18", hidden_mlp=0, output_dim=32, nmb_prototypes=64).eval()
    state = {f"module.{k}": v for k, v in authors.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"state": {}}, "amp": {}}, path)
    converted = read_checkpoint(path)
    assert converted.left_out == ["amp (not converted)", "epoch (not converted)", "optimizer (not converted)"]
    model = convert_checkpoint("swav_resnet18", path, task="pretraining")
    kwargs = model.config.method_kwargs
    assert (kwargs["hidden_mlp"], kwargs["feat_dim"], kwargs["nmb_prototypes"]) == (0, 32, 64)
    pixels = images(2, 3, 64, 64, seed=7)
    with torch.no_grad():
        method = model.method
        pooled = method.encoder(pixels)
        embedding, scores = authors.forward_head(authors.forward_backbone(pixels))
        ours = F.normalize(method.projection_head(pooled), dim=1)
        error = max(relative_error(pooled, authors.forward_backbone(pixels)), relative_error(ours, embedding),
                    relative_error(method.prototypes(ours), scores))  # fmt: skip
    print(f"\nswav layout, training checkpoint: max relative error {error:.2e}")
    assert error < 1e-4


# ---- LARC (apex.parallel.LARC with clip=False around SGD, main_swav.py) ---------------------------------------------
@torch.no_grad()
def apex_larc_sgd_step(params, state, lr, weight_decay, clip=False, momentum=0.9, trust=0.001, eps=1e-8):
    """``LARC.step``: for a tensor with non-zero weight and gradient, g ← (g + λw) · η||w|| / (||g|| + λ||w|| + ε)
    (``clip``: the factor divided by lr and capped at 1); any other tensor keeps its raw gradient and no decay.
    Then SGD with momentum and its own weight decay switched off."""
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad.clone()
        w_norm, g_norm = torch.norm(p), torch.norm(grad)
        if w_norm != 0 and g_norm != 0:
            adaptive = trust * w_norm / (g_norm + w_norm * weight_decay + eps)
            if clip:
                adaptive = min(adaptive / lr, 1)
            grad += weight_decay * p
            grad *= adaptive
        buf = state.get(p)
        state[p] = buf = grad if buf is None else buf.mul_(momentum).add_(grad)
        p.add_(buf, alpha=-lr)


def swav_updates(optimizer_for, zero_init_last=False, steps=1, lr=4.8, weight_decay=1e-6):
    """Parameter changes of a SwAV model after ``steps`` steps of the optimizer ``optimizer_for(params)`` (or of
    the written-out apex rule when it is None) on fixed crops."""
    method = build_swav(backbone_kwargs={"zero_init_last": zero_init_last}).method.train()
    params = [p for p in method.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer, state = optimizer_for(params) if optimizer_for else None, {}
    for step in range(steps):
        method.zero_grad(set_to_none=True)
        method(Batch.of(crops(seed=step))).loss.backward()
        if optimizer is None:
            apex_larc_sgd_step(params, state, lr, weight_decay)
        else:
            optimizer.step()
    return [p.detach() - s for p, s in zip(params, start, strict=True)], start


def test_timm_lars_without_clip_is_swavs_larc_except_lr_wd_w_on_zero_gradient_tensors():
    """The seam's open question, on a SwAV step at lr 4.8, wd 1e-6: timm's ``Lars(trust_clip=False,
    always_adapt=True)`` equals apex's LARC (``clip=False``) wherever weight and gradient are non-zero; a tensor with
    zero gradient is left alone by apex but decays by lr·λ·w in timm. With SwAV's initialisation no tensor has a
    zero gradient (the zero-weight BN biases take the raw gradient in both); with timm's ``zero_init_last`` the
    residual branches' convolutions do, and that term is the whole difference (5e-5 of the model's update here)."""

    def timm_rule(params):
        return Lars([{"params": params, "weight_decay": 1e-6}], lr=4.8, momentum=0.9, trust_clip=False,
                    always_adapt=True)  # fmt: skip

    for zero_init_last in (False, True):
        apex, start = swav_updates(None, zero_init_last)
        timm, _ = swav_updates(timm_rule, zero_init_last)
        still = [i for i, d in enumerate(apex) if not d.any()]
        assert bool(still) == zero_init_last
        for i, (a, t) in enumerate(zip(apex, timm, strict=True)):
            resolution = 2 * torch.finfo(torch.float32).eps * start[i].abs().max().item()  # Δw read off float32 w
            if i in still:
                torch.testing.assert_close(t, -4.8 * 1e-6 * start[i], rtol=0, atol=resolution)
                assert t.norm() >= 0.9 * 4.8e-6 * start[i].norm()
            else:
                torch.testing.assert_close(t, a, rtol=1e-5, atol=resolution)
        total = torch.cat([(t - a).flatten() for a, t in zip(apex, timm, strict=True)]).norm()
        print(f"\nzero_init_last={zero_init_last}: ||Δ_timm - Δ_apex|| / ||Δ_apex|| = "
              f"{(total / torch.cat([a.flatten() for a in apex]).norm()).item():.2e}")  # fmt: skip


def test_the_larc_optimizer_is_main_swavs_larc():
    """``LARC(optimizer=SGD(..., momentum=0.9, weight_decay=wd), trust_coefficient=0.001, clip=False)``: with
    clip=True every update would be min(η||w||/||g||, lr)·g instead of lr·η||w||/||g||·g, lr times smaller at the
    peak lr 4.8 and 200 times larger at the final lr 0.0048."""
    for lr in (4.8, 0.0048):

        def larc(params, lr=lr):
            return create_optimizer("larc", [{"params": params, "weight_decay": 1e-6}], lr)

        apex, _ = swav_updates(None, lr=lr)
        ours, _ = swav_updates(larc, lr=lr)
        for a, o in zip(apex, ours, strict=True):
            torch.testing.assert_close(o, a, rtol=1e-5, atol=1e-9)
