"""Learning-quality benchmark: each method pretrained on Fashion-MNIST for a fixed CPU budget, by sslhub and by lightly.

For every method the script
1. times real sslhub training steps (runs of 2 and 7 steps; start-up cost cancels),
2. pretrains the method's 32 px preset for ``--epochs`` epochs on a stratified subset of the Fashion-MNIST train
   split sized so that training fits into ``--budget`` seconds (the whole split when it fits),
3. trains lightly's same method where its benchmark has one (not InstDisc, InvaSpread, CPC v2 or the MIM family but MAE)
   (``LIGHTLY_RECIPES``: lightly's modules, lightly's transforms and lightly's CIFAR-10 benchmark recipe,
   ``lightly-ai/lightly`` ``docs/source/getting_started/benchmarks/cifar10_benchmark.py``) on the same timm backbone
   (``timm.create_model(preset backbone, num_classes=0)``), the same training images, batch size and number of
   optimizer steps, in a plain PyTorch loop,
4. reports weighted-kNN top-1 (k=20, T=0.07) of each trained encoder (sslhub: the released encoder; lightly: its
   backbone) on the full 10k test split, with a fixed stratified ``--bank`` images of the train split as memory
   bank and the sslhub preset's evaluation transform for both, next to the same backbone at random initialisation
   and kNN on raw pixels (32 px, centred) with the same bank.

lightly's recipe at 32 px (batch 128 as the benchmark's default; its learning rates scale with ``batch / 128``):
SGD lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4, cosine over the epochs stepped per epoch
(``CosineAnnealingLR(optim, max_epochs)``), for MoCo (``MoCoProjectionHead`` 512-128, memory bank 4096, τ 0.1,
momentum 0.99, symmetric loss, shuffled keys), SimCLR (``SimCLRProjectionHead`` 512-128, τ 0.5; SimCLR v2 with the
3 layers lightly's head documents for v2), SimSiam (2-layer projector 2048, predictor 512, lr 0.06 unscaled),
Barlow Twins (2-layer projector 2048, λ 0.005), BYOL (heads 1024-256, momentum 0.99) and DINO (2-layer head 2048-256
with BatchNorm and GELU, 2048 prototypes, momentum 0.99); SwAV with Adam lr 1e-3 x batch/128 and weight decay 1e-6
(``SwaVProjectionHead`` 512-128, 512 prototypes). Transforms: ``SimCLRTransform`` (colour strength 0.5) for MoCo and
SimCLR, ``BYOLTransform`` for BYOL and Barlow Twins, ``SimSiamTransform``, ``SwaVTransform`` (2 crops, scale
0.14-1, colour 0.5), ``DINOTransform`` (2 global crops, no local crop, colour 0.5), all without blur. The benchmark
has no MAE: MAE follows lightly's ``benchmarks/imagenet/vitb16/mae.py`` (AdamW lr 1.5e-4 x batch/256, weight decay
0.05 without norms and biases, betas 0.9 / 0.95, 40 of 800 epochs linear warm-up then cosine per step, MSE on the
raw masked patches, ``MAETransform``) with the decoder of ``mae_vit_tiny_patch4_32px`` (lightly's 8 x 512 is ViT-B's).
Deviations, all for the comparison: the input size is the preset's, lightly's transforms normalise with the preset's
mean / std (so training and the shared evaluation transform agree), the head input is the timm backbone's width
(512 for a ResNet-18, as the benchmark's), ``SwaVTransform`` gets ``crop_max_scales=[1.0]`` (lightly 1.6 requires one
per crop size).

    python scripts/bench_learning.py --budget 600

Needs ``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from lightly.loss import BarlowTwinsLoss, DINOLoss, NTXentLoss, SwaVLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    DINOProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SimSiamPredictionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import get_weight_decay_parameters
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    DINOTransform,
    MAETransform,
    SimCLRTransform,
    SimSiamTransform,
    SwaVTransform,
)
from lightly.utils.scheduler import CosineWarmupScheduler
from lightly_baselines import (
    Options,
    Setup,
    Step,
    constant,
    lightly_byol,
    lightly_dino,
    lightly_mae,
    lightly_moco,
    lightly_simsiam,
    lightly_swav,
    lightly_two_views,
    mae_decoder,
    projection_head,
    timm_backbone,
)
from PIL import Image as PILImage
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Subset

import sslhub
from sslhub.configuration import SSLConfig
from sslhub.data import ImageDataset, load_image_dataset, subset
from sslhub.methods.base import TrainingProgress
from sslhub.probes import extract_features, knn_accuracy, knn_evaluate
from sslhub.training import PretrainArguments, pretrain
from sslhub.transforms import eval_transform

PRESETS = {
    "moco_v2": "moco_v2_resnet18_32px",
    "dino": "dino_vit_tiny_patch4_32px",
    "mae": "mae_vit_tiny_patch4_32px",
    "simclr_v1": "simclr_v1_resnet18_32px",
    "simclr_v2": "simclr_v2_resnet18_32px",
    "byol": "byol_resnet18_32px",
    "simsiam": "simsiam_resnet18_32px",
    "barlow_twins": "barlow_twins_resnet18_32px",
    "swav": "swav_resnet18_32px",
    # lightly's benchmark has none of the methods below, and its SimMIM needs a timm ViT, not the BEiT-style encoder:
    # sslhub rows only. CMC and Colorization are left out: Fashion-MNIST is grey, so CMC's ab view and Colorization's
    # target are zero (tests/test_cmc.py and tests/test_training.py train them on coloured digits).
    "instdisc": "instdisc_resnet18_32px",
    "invaspread": "invaspread_resnet18_32px",
    "cpc_v2": "cpc_v2_resnet18_32px",
    "simmim": "simmim_vit_tiny_patch4_32px",
    "beit": "beit_vit_tiny_patch4_32px",
    "ibot": "ibot_vit_tiny_patch4_32px",
    "convmae": "convmae_convvit_tiny_32px",
    "deepmim": "deepmim_vit_tiny_patch4_32px",
    "localmim": "localmim_vit_tiny_patch4_32px",
    "pixpro": "pixpro_resnet18_32px",
    "rotnet": "rotnet_resnet18_32px",
    "context_prediction": "context_prediction_resnet18_32px",
    "counting": "counting_resnet18_32px",
    "exemplar": "exemplar_resnet18_32px",
    "jigsaw": "jigsaw_resnet18_32px",
    "jigsaw_clustering": "jigsaw_clustering_resnet18_32px",
}
# Method hyperparameters every run of a method needs: BEiT's tokenizer file (a random frozen tokenizer here: the
# DALL-E file cannot be downloaded offline).
OVERRIDES = {"beit": {"tokenizer_path": "random"}}
CIFAR10_BENCHMARK = "lightly cifar10_benchmark.py"  # docs/source/getting_started/benchmarks/


# ---- the sslhub side ---------------------------------------------------------------------------------------------
def stratified(dataset: ImageDataset, size: int, seed: int = 0) -> list[int]:
    if size >= len(dataset):
        return list(range(len(dataset)))
    chosen, _ = train_test_split(list(range(len(dataset))), train_size=size, random_state=seed, stratify=dataset.labels)
    return sorted(chosen)


def save_training_subset(train: ImageDataset, indices: list[int], directory: Path) -> str:
    """The chosen training images as an HF ``save_to_disk`` directory, the format ``--data DIR`` reads."""
    if not directory.is_dir():
        features = Features(image=Image(), label=ClassLabel(names=list(train.classes)))
        rows = {
            "image": [PILImage.fromarray(train.images[i]) for i in indices],
            "label": [int(train.labels[i]) for i in indices],
        }
        DatasetDict(train=Dataset.from_dict(rows, features=features)).save_to_disk(str(directory))
    return str(directory)


def run_args(method: str, data: str, output_dir: Path, batch_size: int, **extra) -> PretrainArguments:
    return PretrainArguments(
        model=PRESETS[method],
        overrides=OVERRIDES.get(method, {}),
        data=data,
        output_dir=str(output_dir),
        batch_size=batch_size,
        knn_every=0,
        log_with=None,
        progress=False,
        checkpoint_every=10**9,
        **extra,
    )


def seconds_per_step(method: str, data: str, workdir: Path, batch_size: int) -> float:
    times = []
    for steps in (2, 7):
        start = time.perf_counter()
        pretrain(run_args(method, data, workdir / f"calibrate_{steps}", batch_size, epochs=1, max_steps=steps))
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / 5


# ---- lightly's recipes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LightlyRecipe:
    """One method as lightly trains it: ``build(backbone, setup) -> Step`` (heads, loss, momentum from lightly's
    modules), ``views(size, normalize)`` (lightly's transform), ``optimizer(networks, batch_size)``, ``schedule(
    optimizer, steps_per_epoch, epochs) -> (lr scheduler, "epoch" | "step")`` and where it comes from."""

    build: Callable[[nn.Module, Setup], Step]
    views: Callable[[int, dict], Callable]
    optimizer: Callable[[nn.Module, int], torch.optim.Optimizer]
    schedule: Callable[[torch.optim.Optimizer, int, int], tuple]
    source: str = CIFAR10_BENCHMARK


def trainable(networks: nn.Module) -> list[nn.Parameter]:
    return [p for p in networks.parameters() if p.requires_grad]


def cifar10_sgd(networks: nn.Module, batch_size: int, scaled: bool = True) -> torch.optim.Optimizer:
    """The benchmark's SGD: lr 0.06 x ``lr_factor`` (batch / 128; SimSiam: unscaled), momentum 0.9, wd 5e-4."""
    lr = 6e-2 * (batch_size / 128 if scaled else 1.0)
    return torch.optim.SGD(trainable(networks), lr=lr, momentum=0.9, weight_decay=5e-4)


def cifar10_adam(networks: nn.Module, batch_size: int) -> torch.optim.Optimizer:
    """The benchmark's SwaV optimizer: Adam lr 1e-3 x batch / 128, weight decay 1e-6."""
    return torch.optim.Adam(trainable(networks), lr=1e-3 * batch_size / 128, weight_decay=1e-6)


def vitb16_mae_adamw(networks: nn.Module, batch_size: int) -> torch.optim.Optimizer:
    """``benchmarks/imagenet/vitb16/mae.py``: AdamW lr 1.5e-4 x batch / 256, weight decay 0.05 except norms and
    biases (``get_weight_decay_parameters``), betas 0.9 / 0.95."""
    decay, no_decay = get_weight_decay_parameters([networks])
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1.5e-4 * batch_size / 256, weight_decay=0.05, betas=(0.9, 0.95))


def cosine_per_epoch(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> tuple:
    """The benchmark's ``CosineAnnealingLR(optim, max_epochs)``, stepped once per epoch (Lightning's default)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs), "epoch"


def warmup_cosine_per_step(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> tuple:
    """MAE's ``CosineWarmupScheduler``: linear warm-up over 40 / 800 of the steps, then cosine, per step."""
    total = steps_per_epoch * epochs
    return CosineWarmupScheduler(optimizer, warmup_epochs=total * 40 / 800, max_epochs=total), "step"


# lightly's transforms as the benchmark sets them (no blur at 32 px), at ``size`` with the preset's ``normalize``
def simclr_views(size: int, normalize: dict) -> Callable:
    return SimCLRTransform(input_size=size, cj_strength=0.5, gaussian_blur=0.0, normalize=normalize)


def byol_views(size: int, normalize: dict) -> Callable:
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0, normalize=normalize),
        view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0, normalize=normalize),
    )


def simsiam_views(size: int, normalize: dict) -> Callable:
    return SimSiamTransform(input_size=size, gaussian_blur=0.0, normalize=normalize)


def swav_views(size: int, normalize: dict) -> Callable:
    return SwaVTransform(
        crop_sizes=[size],
        crop_counts=[2],
        crop_min_scales=[0.14],
        crop_max_scales=[1.0],
        cj_strength=0.5,
        gaussian_blur=0,
        normalize=normalize,
    )


def dino_views(size: int, normalize: dict) -> Callable:
    return DINOTransform(
        global_crop_size=size, n_local_views=0, cj_strength=0.5, gaussian_blur=(0, 0, 0), normalize=normalize
    )


def mae_views(size: int, normalize: dict) -> Callable:
    return MAETransform(input_size=size, normalize=normalize)


def cifar10_moco(backbone: nn.Module, setup: Setup) -> Step:
    """``MocoModel``: head 512-128, memory bank 4096, τ 0.1, momentum 0.99, symmetric loss, shuffled keys."""
    projector = MoCoProjectionHead(backbone.num_features, 512, 128)
    criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
    return lightly_moco(backbone, projector, criterion, constant(0.99), setup, symmetric=True, shuffle_keys=True)


def cifar10_simclr(backbone: nn.Module, setup: Setup, num_layers: int = 2) -> Step:
    """``SimCLRModel``: ``SimCLRProjectionHead`` 512-128 (``num_layers`` 3 for v2), ``NTXentLoss`` τ 0.5."""
    head = SimCLRProjectionHead(backbone.num_features, 512, 128, num_layers=num_layers)
    return lightly_two_views(backbone, head, NTXentLoss(), setup)


def cifar10_simsiam(backbone: nn.Module, setup: Setup) -> Step:
    """``SimSiamModel``: 2-layer projector to 2048 (last BatchNorm affine), predictor 2048-512-2048."""
    projector = projection_head((backbone.num_features, 2048, 2048), nn.BatchNorm1d(2048))
    return lightly_simsiam(backbone, projector, SimSiamPredictionHead(2048, 512, 2048), setup)


def cifar10_barlow_twins(backbone: nn.Module, setup: Setup) -> Step:
    """``BarlowTwinsModel``: 2-layer projector to 2048 (no BatchNorm after the last Linear), λ 0.005."""
    head = projection_head((backbone.num_features, 2048, 2048))
    return lightly_two_views(backbone, head, BarlowTwinsLoss(), setup)


def cifar10_byol(backbone: nn.Module, setup: Setup) -> Step:
    """``BYOLModel``: projection and prediction heads 1024-256, constant momentum 0.99."""
    projector = BYOLProjectionHead(backbone.num_features, 1024, 256)
    return lightly_byol(backbone, projector, BYOLPredictionHead(256, 1024, 256), constant(0.99), setup)


def cifar10_swav(backbone: nn.Module, setup: Setup) -> Step:
    """``SwaVModel``: ``SwaVProjectionHead`` 512-128, 512 prototypes, ``SwaVLoss`` defaults, no queue."""
    projector = SwaVProjectionHead(backbone.num_features, 512, 128)
    return lightly_swav(backbone, projector, SwaVPrototypes(128, 512), SwaVLoss(), setup)


def cifar10_dino_head(width: int) -> DINOProjectionHead:
    """The benchmark's DINO head: ``DINOProjectionHead`` to 2048 prototypes with its MLP cut to 2 layers (GELU)."""
    head = DINOProjectionHead(width, 2048, 256, 2048, batch_norm=True)
    head.layers = projection_head((width, 2048, 256), activation=nn.GELU).layers
    return head


def cifar10_dino(backbone: nn.Module, setup: Setup) -> Step:
    """The teacher backbone is a copy of the student's, the teacher head a head of its own (as the benchmark)."""
    heads = (cifar10_dino_head(backbone.num_features), cifar10_dino_head(backbone.num_features))
    criterion = DINOLoss(output_dim=2048)
    return lightly_dino((backbone, copy.deepcopy(backbone)), heads, criterion, constant(0.99), setup)


def vitb16_mae(backbone: nn.Module, setup: Setup, decoder: tuple[int, int, int] = (128, 2, 4)) -> Step:
    """lightly's MAE recipe, mask ratio 0.75, MSE on raw patches, with ``decoder`` = (width, depth, heads): those of
    ``mae_vit_tiny_patch4_32px``."""
    return lightly_mae(backbone, mae_decoder(backbone, *decoder), 0.75, False, setup)


CIFAR10 = {"optimizer": cifar10_sgd, "schedule": cosine_per_epoch}
LIGHTLY_RECIPES = {
    "moco_v2": LightlyRecipe(cifar10_moco, simclr_views, **CIFAR10),
    "dino": LightlyRecipe(cifar10_dino, dino_views, **CIFAR10),
    "mae": LightlyRecipe(
        vitb16_mae, mae_views, vitb16_mae_adamw, warmup_cosine_per_step, "lightly imagenet/vitb16/mae.py"
    ),
    "simclr_v1": LightlyRecipe(cifar10_simclr, simclr_views, **CIFAR10),
    "simclr_v2": LightlyRecipe(functools.partial(cifar10_simclr, num_layers=3), simclr_views, **CIFAR10),
    "byol": LightlyRecipe(cifar10_byol, byol_views, **CIFAR10),
    "simsiam": LightlyRecipe(
        cifar10_simsiam, simsiam_views, functools.partial(cifar10_sgd, scaled=False), cosine_per_epoch
    ),
    "barlow_twins": LightlyRecipe(cifar10_barlow_twins, byol_views, **CIFAR10),
    "swav": LightlyRecipe(cifar10_swav, swav_views, cifar10_adam, cosine_per_epoch),
}


# ---- the lightly side --------------------------------------------------------------------------------------------
def lightly_epochs(step: Step, loader: DataLoader, epochs: int, scheduler, interval: str, options: Options) -> int:
    """Train ``epochs`` epochs of ``loader`` (views, labels) with ``step``, the scheduler stepped per ``interval``;
    returns the number of optimizer steps."""
    progress = TrainingProgress(0, epochs * len(loader), len(loader))
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        for views, _ in loader:
            step([view.to(options.device) for view in views], progress, options)
            progress = progress.next()
            if interval == "step":
                scheduler.step()
        if interval == "epoch":
            scheduler.step()
    return progress.step


def train_lightly(method: str, config: SSLConfig, data: ImageDataset, ns: argparse.Namespace, knn: Callable) -> dict:
    """lightly's ``method`` on ``config``'s timm backbone, trained on ``data`` (its transform replaced by lightly's
    views) with ``ns.batch_size`` for ``ns.epochs``; ``knn(backbone)`` at random initialisation and after training."""
    recipe, options = LIGHTLY_RECIPES[method], Options(torch.device("cpu"))
    torch.manual_seed(ns.seed)
    backbone = timm_backbone(config.backbone, **config.backbone_kwargs)
    random_init = knn(backbone)
    data.transform = recipe.views(config.image_size, {"mean": list(config.image_mean), "std": list(config.image_std)})
    generator = torch.Generator().manual_seed(ns.seed)
    loader = DataLoader(data, batch_size=ns.batch_size, shuffle=True, drop_last=True, generator=generator)
    start = time.perf_counter()
    step = recipe.build(backbone, Setup(options, functools.partial(recipe.optimizer, batch_size=ns.batch_size)))
    scheduler, interval = recipe.schedule(step.optimizer, len(loader), ns.epochs)
    steps = lightly_epochs(step, loader, ns.epochs, scheduler, interval, options)
    train_seconds = time.perf_counter() - start
    return dict(
        implementation="lightly",
        preset=recipe.source,
        steps=steps,
        seconds_per_step=round(train_seconds / steps, 3),
        train_seconds=round(train_seconds),
        knn_learned=knn(backbone),
        knn_random_init=random_init,
    )


def train_sslhub(method: str, data: str, output_dir: Path, ns: argparse.Namespace, knn: Callable) -> dict:
    """``method``'s preset pretrained on ``data`` with ``ns.batch_size`` for ``ns.epochs``; ``knn(model)`` of its
    released encoder at random initialisation and after training."""
    preset = PRESETS[method]
    random_init = knn(sslhub.create_model(preset))
    start = time.perf_counter()
    result = pretrain(run_args(method, data, output_dir, ns.batch_size, epochs=ns.epochs, seed=ns.seed))
    train_seconds = time.perf_counter() - start
    return dict(
        implementation="sslhub",
        preset=preset,
        steps=result.steps,
        train_seconds=round(train_seconds),
        knn_learned=knn(sslhub.from_pretrained(result.output_dir)),
        knn_random_init=random_init,
    )


# ---- driver ------------------------------------------------------------------------------------------------------
def bench_method(method: str, splits: tuple[ImageDataset, ImageDataset], step_time: float, ns, knn: Callable) -> list:
    """The sslhub and lightly rows of ``method``: the same stratified training images (as many batches as the
    budget allows at ``step_time``), batch size, epochs and optimizer steps; kNN under the preset's evaluation
    transform, set on both ``splits`` (train, test)."""
    preset, (train, test) = PRESETS[method], splits
    config = sslhub.create_model(preset).config
    train.transform = test.transform = eval_transform(config.image_size, config.image_mean, config.image_std)
    steps_per_epoch = max(1, math.floor(ns.budget / (step_time * ns.epochs)))
    indices = stratified(train, min(len(train), steps_per_epoch * ns.batch_size))
    data = save_training_subset(train, indices, Path(ns.workdir) / f"data_{len(indices)}")
    common = dict(method=method, train_images=len(indices), epochs=ns.epochs)
    ours = {**common, **train_sslhub(method, data, Path(ns.workdir) / method / "run", ns, knn)}
    ours["seconds_per_step"] = round(step_time, 3)
    if method not in LIGHTLY_RECIPES:
        return [ours]
    theirs = {**common, **train_lightly(method, config, subset(train, indices), ns, knn)}
    if theirs["steps"] != ours["steps"]:
        raise RuntimeError(f"{method}: lightly took {theirs['steps']} steps, sslhub {ours['steps']}")
    return [ours, theirs]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| method | implementation | preset / recipe | train images | steps | s / step | train s | kNN learned "
        "| kNN random init | kNN raw pixels |",
        "|" + " --- |" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['implementation']} | {r['preset']} | {r['train_images']} | {r['steps']} | "
            f"{r['seconds_per_step']} | {r['train_seconds']} | {r['knn_learned']:.4f} | {r['knn_random_init']:.4f} | "
            f"{r['knn_raw_pixels']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--budget", type=float, default=600.0, help="sslhub training seconds per method")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bank", type=int, default=10000, help="memory-bank images from the train split")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--workdir", default="runs/bench_learning")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="data order and augmentations of both sides")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    workdir = Path(ns.workdir)

    train = load_image_dataset("fashion-mnist", "train")
    test = load_image_dataset("fashion-mnist", "test")
    bank = Subset(train, stratified(train, ns.bank))
    train.transform = test.transform = eval_transform(32, (0.5,) * 3, (0.5,) * 3)  # raw pixels, centred
    bank_x, bank_y = extract_features(torch.nn.Flatten(), bank, progress=False)
    test_x, test_y = extract_features(torch.nn.Flatten(), test, progress=False)
    pixels = knn_accuracy(bank_x, bank_y, test_x, test_y, k=ns.k)
    calibration_data = save_training_subset(train, stratified(train, 10 * ns.batch_size), workdir / "data_calibration")
    step_times = {  # all calibrations first, so they run back to back on the same machine state
        method: seconds_per_step(method, calibration_data, workdir / method, ns.batch_size) for method in ns.methods
    }
    knn = functools.partial(knn_evaluate, train_dataset=bank, test_dataset=test, k=ns.k, progress=False)
    rows = []
    for method in ns.methods:
        for row in bench_method(method, (train, test), step_times[method], ns, knn):
            rows.append({**row, "knn_raw_pixels": pixels})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {ns.threads} threads, torch {torch.__version__}")
    print(
        f"Fashion-MNIST: memory bank {len(bank)} train images (stratified), queries the 10k test split; "
        f"batch {ns.batch_size}, {ns.epochs} epochs, sslhub budget {ns.budget:.0f} s, lightly the same images and "
        f"steps; weighted kNN k={ns.k} T=0.07 under each sslhub preset's evaluation transform\n"
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
