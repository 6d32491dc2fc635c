"""InvaSpread (arXiv 1904.03436, mangye16/Unsupervised_Embedding_Learning) built through ``sslhub.create_model``.

The references are written out here: eq. 2-5 as ``BatchCriterion`` (``--batch-m 1``) evaluates them, with explicit
loops over the 2B features and the weights taken detached (``feat.data`` in ``BatchAverage``); the authors' network
tail (``models/resnet_cifar.py``: average pool, ``linear``, ``l2norm``); ``demo_seen.py``'s optimiser, schedule and
``transform_train``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_released_is, build, perturb_
from PIL import Image
from torchvision.transforms import v2

from sslhub.batch import Batch
from sslhub.losses import invariance_spreading
from sslhub.methods import TrainingProgress
from sslhub.methods.invaspread import InvaSpreadHparams
from sslhub.registry import get_preset
from sslhub.training import PretrainArguments, Pretrainer, build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")


def batch_criterion(z1, z2, temperature):
    """eq. 2-5 with explicit loops: features f = [x_1..x_B, x̂_1..x̂_B] normalised; for query r the weights are the
    other 2B - 1 features, detached; P(c|r) = exp(w_c·f_r/τ) / Σ_{k≠r} exp(w_k·f_r/τ); the loss is
    -(Σ_r log P(pos(r)|r) + Σ_r Σ_{c≠r,pos(r)} log(1 - P(c|r))) / 2B."""
    f = torch.cat([z1, z2])
    f = f / f.norm(dim=1, keepdim=True)
    w = f.detach()
    n = f.shape[0]
    half = n // 2
    total = torch.zeros(())
    for r in range(n):
        positive = (r + half) % n
        scores = {c: torch.exp(torch.dot(w[c], f[r]) / temperature) for c in range(n) if c != r}
        denominator = sum(scores.values())
        total = total + torch.log(scores[positive] / denominator)
        for c, score in scores.items():
            if c != positive:
                total = total + torch.log(1 - score / denominator)
    return -total / n


@pytest.mark.parametrize(("batch", "dim", "temperature"), [(2, 3, 0.1), (5, 8, 0.1), (4, 6, 0.5)])
def test_loss_and_gradients_equal_the_equation_with_detached_weights(batch, dim, temperature):
    gen = torch.Generator().manual_seed(batch)
    z1 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, expected = invariance_spreading(a1, a2, temperature), batch_criterion(b1, b2, temperature)
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    loss.backward()
    expected.backward()
    torch.testing.assert_close(a1.grad, b1.grad)
    torch.testing.assert_close(a2.grad, b2.grad)


def test_loss_is_scale_invariant_and_lower_for_invariant_spread_features():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 16, generator=gen)
    other = torch.randn(6, 16, generator=gen)
    aligned = invariance_spreading(z, 3 * z, 0.1)
    torch.testing.assert_close(aligned, invariance_spreading(2 * z, z, 0.1))
    assert aligned < invariance_spreading(z, other, 0.1)
    with pytest.raises(ValueError, match=r"got \(6, 16\), \(5, 16\)"):
        invariance_spreading(z, z[:5], 0.1)


# ---- hyperparameters -----------------------------------------------------------------------------------------------
def test_defaults_are_demo_seen():
    """``demo_seen.py``: SGD lr 0.03 at batch 128, momentum 0.9, wd 5e-4, lr x 0.1 from epoch 120, 301 epochs,
    ``--batch-t 0.1``, ``--low-dim 128``, crop scale 0.2-1."""
    hp = InvaSpreadHparams()
    assert (hp.optimizer, hp.lr, hp.lr_batch_size, hp.lr_scaling, hp.sgd_momentum) == ("sgd", 0.03, 128, "linear", 0.9)
    assert (hp.weight_decay, hp.epochs, hp.lr_schedule, hp.lr_milestones, hp.warmup_epochs) == (
        5e-4, 301, "step", (120,), 0
    )  # fmt: skip
    assert (hp.temperature, hp.embed_dim, hp.crop_scale_min, hp.sync_batch_norm) == (0.1, 128, 0.2, False)
    with pytest.raises(ValueError, match="temperature"):
        InvaSpreadHparams(temperature=0)


def test_32px_preset_is_the_cifar_recipe_and_the_trainer_follows_adjust_learning_rate(tmp_path):
    preset = get_preset("invaspread_resnet18_32px")
    assert (preset.backbone, preset.image_size) == ("resnet18", 32)
    assert preset.image_mean == (0.4914, 0.4822, 0.4465) and preset.image_std == (0.2023, 0.1994, 0.2010)
    args = PretrainArguments(
        model="invaspread_resnet18_32px",
        output_dir=str(tmp_path),
        batch_size=128,
        knn_every=0,
        log_with=None,
        progress=False,
        overrides={"backbone": "test_resnet", "embed_dim": 16},
    )
    trainer = Pretrainer(args)
    assert trainer.peak_lr == pytest.approx(0.03)
    per_epoch = trainer.steps_per_epoch
    total = per_epoch * 301
    for epoch, lr in ((0, 0.03), (119, 0.03), (120, 0.003), (200, 0.003), (300, 0.003)):
        trainer.set_schedules(TrainingProgress(epoch * per_epoch, total, per_epoch))
        group = trainer.optimizer.param_groups[0]
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == 5e-4, epoch
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)  # inside accelerate's AcceleratedOptimizer
    assert (group["momentum"], group["nesterov"]) == (0.9, False)


# ---- network, released encoder, training step ----------------------------------------------------------------------
def views(seed=0, batch=4, size=32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    return [x, x + 0.2 * torch.randn(batch, 3, size, size, generator=gen)]


def test_embedding_is_the_authors_network_tail_on_both_views_in_one_pass():
    """``ResNet.forward``: avg pool -> ``linear`` (512 -> 128) -> ``l2norm``; ``net(torch.cat((x1, x2)))`` then
    ``BatchCriterion`` (BatchNorm statistics over both views together)."""
    method = build("invaspread_resnet18_32px").method.train()
    assert tuple(method.linear.weight.shape) == (128, 512) and method.linear.bias is not None
    x1, x2 = views()
    state = copy.deepcopy(method.state_dict())
    loss = method(Batch.of([x1, x2])).loss
    method.load_state_dict(state)  # undo the BatchNorm running-statistics update
    backbone = method.encoder.backbone
    pooled = backbone.forward_features(torch.cat([x1, x2])).mean(dim=(2, 3))
    embedding = F.linear(pooled, method.state_dict()["linear.weight"], method.state_dict()["linear.bias"])
    embedding = embedding / embedding.norm(dim=1, keepdim=True)
    torch.testing.assert_close(method.embed(torch.cat([x1, x2])), embedding)
    torch.testing.assert_close(loss, batch_criterion(*embedding.chunk(2), 0.1), rtol=1e-4, atol=1e-5)


def test_released_encoder_is_the_resnet_pooled_before_the_linear_embedding():
    model = build("invaspread_resnet18_32px")
    other = copy.deepcopy(model.method.encoder)
    perturb_(other, ("backbone.",))
    assert_released_is(model, model.method.encoder, other)
    released = model.released_model().eval()
    assert released.num_features == 512
    assert not any(key.startswith("linear") for key in released.encoder.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = released(images).pooler_output
        expected = model.method.encoder.eval().backbone.forward_features(images).mean(dim=(2, 3))
    torch.testing.assert_close(pooled, expected)


def test_one_sgd_step_moves_the_backbone_and_the_linear_embedding():
    method = build("invaspread_resnet18_32px", embed_dim=16).method.train()
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    optimizer = build_optimizer(method, 0.03)
    method(Batch.of(views())).loss.backward()
    optimizer.step()
    moved = {name for name, p in method.named_parameters() if not torch.equal(p, before[name])}
    assert {"linear.weight", "linear.bias", "encoder.backbone.conv1.weight"} <= moved


def test_views_are_transform_train_drawn_twice():
    """``transform_train``: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.4) always, RandomGrayscale
    0.2, flip, ToTensor, CIFAR normalisation; ``CIFAR10Instance`` applies it twice."""
    model = build("invaspread_resnet18_32px", embed_dim=16)
    recipe = model.method.view_recipe()
    assert len(recipe.transforms) == 2
    pieces = list(recipe.transforms[0].transforms)
    crop, jitter, gray, flip = pieces[:4]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (32, 32) and crop.scale == (0.2, 1.0)
    assert isinstance(jitter, v2.ColorJitter)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4),) * 3 + ((-0.4, 0.4),)
    assert isinstance(gray, v2.RandomGrayscale) and gray.p == 0.2
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    normalize = next(t for t in pieces if isinstance(t, v2.Normalize))
    assert normalize.mean == [0.4914, 0.4822, 0.4465] and normalize.std == [0.2023, 0.1994, 0.2010]
    pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    first, second = recipe(Image.fromarray(pixels.numpy())).views
    assert first.shape == second.shape == (3, 32, 32) and not torch.equal(first, second)
