"""Speed of one pretraining step: sslhub vs. the bare backbone bound vs. the same step built from lightly.

For each method (``METHODS``: MoCo v2, DINO, MAE, SimCLR v1 / v2, BYOL, SimSiam, Barlow Twins, SwAV, iBOT, InstDisc,
InvaSpread, CMC, CPC v2, SimMIM, BEiT, ConvMAE, DeepMIM, LocalMIM, PixPro, RotNet, Jigsaw, Context prediction,
Colorization, Counting, Exemplar-CNN, Jigsaw Clustering; lightly has no step for the last seventeen) the script
reports the median wall time of one optimizer step on one pre-made batch (no data loading, no augmentation in the
timed steps), after warm-up steps. The batch is made once, before timing, by the method's own view recipe and
collate from random images of the preset's size: its views and extras (masks, rotation / permutation / position
ids, boxes) are what the trainer would feed.

- **sslhub step**: exactly what ``sslhub.training.Pretrainer`` does per step: ``on_step_start``,
  ``model(views).loss``, ``backward``, ``on_before_optimizer_step``, ``optimizer.step``, ``zero_grad``, the
  momentum update of the method's ``momentum_pairs`` and ``on_step_end``, with the optimizer of
  ``sslhub.training.build_optimizer`` (the method's parameter groups).
- **bare bound**: the method's own encoder (``build_encoder``: timm backbone + pooling) forward + backward (loss =
  sum of the pooled features) and a step of the method's optimizer kind on the views the method back-propagates
  through, plus a no-grad forward on the views only the momentum / teacher / target encoder sees. MoCo: grad on the
  query view, no grad on the key view; DINO: grad on all crops, no grad on the 2 global crops; BYOL: grad on both
  views, no grad on both views again (target); SimCLR, SimSiam, Barlow Twins, SwAV: grad on all views; MAE: grad on
  the full view. MAE's encoder sees only 25 % of the patches, so its sslhub/bound ratio can be below 1.
- **lightly step**: the same method from lightly's own modules (``lightly_baselines.py``, as lightly's
  ``examples/pytorch``) on the same timm backbone with the same head sizes and hyperparameters. MoCo v2:
  ``MoCoProjectionHead`` + ``NTXentLoss(memory_bank_size=(K, D))`` + ``update_momentum``; DINO:
  ``DINOProjectionHead`` + ``DINOLoss`` + ``update_momentum``, one forward per crop as lightly's example,
  global-norm clipping (what lightly's benchmarks get from Lightning's ``gradient_clip_val``) and
  ``cancel_last_layer_gradients``; MAE: ``MaskedVisionTransformerTIMM`` + ``MAEDecoderTIMM``, MSE on the (per-patch
  normalised) masked patches; SimCLR: ``SimCLRProjectionHead`` (the preset's layers) + ``NTXentLoss``; BYOL:
  ``BYOLProjectionHead`` + ``BYOLPredictionHead`` + ``NegativeCosineSimilarity`` + ``update_momentum`` on a cosine
  schedule; SimSiam: the projector of ``SimSiamProjectionHead``'s blocks + ``SimSiamPredictionHead`` +
  ``NegativeCosineSimilarity``; Barlow Twins: ``BarlowTwinsProjectionHead``'s blocks + ``BarlowTwinsLoss``; SwAV:
  ``SwaVProjectionHead`` + ``SwaVPrototypes`` + ``SwaVLoss``, one forward per crop.
  iBOT: ``MaskedVisionTransformerTIMM`` (mask token) + ``DINOProjectionHead`` + ``DINOLoss`` + ``IBOTPatchLoss``
  with ``random_block_mask`` on half of the global crops, as lightly's ``examples/pytorch/ibot.py``.

The bound and lightly use the method's optimizer kind (``sslhub.optim.create_optimizer``: SGD, AdamW, LARS or LARC)
over one parameter group with the method's weight decay, so the comparison is about the method, not the optimizer.
Steps are timed in epoch 10 of 100 (past DINO's frozen last layer and SwAV's frozen prototypes, so every parameter
is updated); the three steps of a method take turns, so a load change on a shared machine hits them alike.

    python scripts/bench_pretrain_step.py --size small --threads 2 --repeats 20           # CPU, 32 px presets
    python scripts/bench_pretrain_step.py --size base --device cuda --bf16 --channels-last  # GPU, 224 px presets

Time on an idle machine only: a busy one gives 10x outliers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightly
import numpy as np
import timm
import torch
from lightly.loss import BarlowTwinsLoss, DINOLoss, IBOTPatchLoss, NTXentLoss, SwaVLoss
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
from lightly_baselines import (
    Options,
    Setup,
    Step,
    Views,
    constant,
    cosine,
    lightly_byol,
    lightly_dino,
    lightly_ibot,
    lightly_mae,
    lightly_moco,
    lightly_simsiam,
    lightly_swav,
    lightly_two_views,
    mae_decoder,
    projection_head,
    timm_backbone,
)
from PIL import Image
from torch import nn

import sslhub
from sslhub.backbones import is_vision_transformer
from sslhub.batch import Batch
from sslhub.data import ImageDataset, ViewDataset
from sslhub.methods.base import MethodHparams, TrainingProgress, update_momentum_pairs
from sslhub.modeling import SSLForPreTraining
from sslhub.optim import create_optimizer
from sslhub.training import build_optimizer, scaled_learning_rate

STEPS_PER_EPOCH = 100


def progress_at(index: int) -> TrainingProgress:
    return TrainingProgress(10 * STEPS_PER_EPOCH + index, 100 * STEPS_PER_EPOCH, STEPS_PER_EPOCH)


def seconds(step: Step, views: Views, progress: TrainingProgress, options: Options) -> float:
    """Wall time of one step (CUDA synchronised before and after)."""
    synchronize = torch.cuda.synchronize if options.device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    step(views, progress, options)
    synchronize()
    return time.perf_counter() - start


def median_seconds(steps: dict[str, Step], views: Views, options: Options, warmup: int, repeats: int) -> dict:
    """Median step time of each of ``steps`` after ``warmup`` untimed steps. The steps take turns, so a load change
    on a shared machine hits all of them alike instead of whichever happens to run then."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            times[name].append(seconds(step, views, progress_at(index), options))
    return {name: statistics.median(values[warmup:]) for name, values in times.items()}


def make_optimizer(params, hparams: MethodHparams, lr: float) -> torch.optim.Optimizer:
    """The method's optimizer kind (``sslhub.optim``) with its lr, momentum / betas and weight decay, over one
    group of the trainable ``params`` (for the bound and lightly)."""
    group = {"params": [p for p in params if p.requires_grad], "weight_decay": hparams.weight_decay}
    return create_optimizer(hparams.optimizer, [group], lr, momentum=hparams.sgd_momentum, betas=hparams.betas)


def setup_of(model: SSLForPreTraining, lr: float, options: Options) -> Setup:
    """How a lightly step of ``model``'s method is made: on ``options``, with the method's optimizer kind."""
    return Setup(options, lambda networks: make_optimizer(networks.parameters(), model.method.hparams, lr))


def encoder_kwargs(model: SSLForPreTraining, trained: bool = True) -> dict:
    """Extra timm options of the encoder: DINO's ViTs take several crop sizes, and its student uses drop path."""
    method = model.method
    if method.name not in ("dino", "ibot") or not is_vision_transformer(method.student.timm_model):
        return {}
    return {"dynamic_img_size": True, **({"drop_path_rate": method.hparams.drop_path_rate} if trained else {})}


def timm_model(model: SSLForPreTraining, trained: bool = True) -> nn.Module:
    """The preset's backbone as a lightly user builds it (``timm_backbone``), with DINO's encoder options."""
    config = model.config
    return timm_backbone(config.backbone, **config.backbone_kwargs, **encoder_kwargs(model, trained))


def make_batch(model: SSLForPreTraining, batch: int, options: Options, seed: int = 0) -> Batch:
    """A batch of ``batch`` random images of the preset's size made by the method's own view recipe and collate, as
    the trainer makes it: the views and the recipe's extras (masks, rotation / permutation / position ids, boxes)."""
    size = model.config.image_size
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    recipe = model.method.view_recipe()
    dataset = ViewDataset(ImageDataset(images, labels=[0] * batch), recipe, seed=seed)
    made = recipe.collate([dataset[i] for i in range(batch)]).to(options.device)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    made.views = [view.contiguous(memory_format=memory_format) if view.ndim == 4 else view for view in made.views]
    return made


def describe_views(views: Views) -> str:
    counts: dict[str, int] = {}
    for view in views:
        grid = f"{view.shape[1]}x{view.shape[2]} grid of " if view.ndim == 6 else ""  # CPC's patch grids
        size = f"{grid}{view.shape[-1]}px"
        counts[size] = counts.get(size, 0) + 1
    return " + ".join(f"{n}x{size}" for size, n in counts.items())


def batched_by_size(views: Views) -> Views:
    """Consecutive views of one resolution concatenated into one batch (DINO's ``MultiCropWrapper``)."""
    groups: list[Views] = []
    for view in views:
        if groups and groups[-1][0].shape[-2:] == view.shape[-2:]:
            groups[-1].append(view)
        else:
            groups.append([view])
    return [torch.cat(group) for group in groups]


# ---- the measured steps -------------------------------------------------------------------------------------------
def sslhub_step(model: SSLForPreTraining, lr: float, options: Options, made: Batch) -> Step:
    """The trainer's step (``Pretrainer.train_epoch`` without Accelerate's no-op wrappers on one process) on the
    views with ``made``'s extras."""
    model = options.place(model)
    method = model.method

    method.bind_dataset(BANK_ROWS)  # memory banks (InstDisc, CMC) get one row per image; a no-op for the others

    def forward(views, progress):
        method.on_step_start(progress)
        size = len(made)
        index = (torch.arange(size) + progress.step * size) % BANK_ROWS  # the sample indices of the batch contract
        return model(Batch(views, index.to(made.index.device), None, made.extras)).loss

    def after_optimizer_step(progress):
        pairs = method.momentum_pairs()
        if pairs:
            update_momentum_pairs(pairs, method.momentum_at(progress))
        method.on_step_end(progress)

    return Step(forward, build_optimizer(method, lr), method.on_before_optimizer_step, after_optimizer_step)


def bound_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """Bare backbone: forward + backward + optimizer step on the trained views, no-grad forward on the others."""
    encoder = options.place(type(model.method).build_encoder(model.config, **encoder_kwargs(model)))
    split = METHODS[model.method.name].bound_views

    def forward(views, progress):
        trained, teacher_only = split(views)
        with torch.no_grad():
            for images in batched_by_size(teacher_only):
                encoder(images)
        return sum(encoder(images).sum() for images in batched_by_size(trained))

    return Step(forward, make_optimizer(encoder.parameters(), model.method.hparams, lr))


def lightly_moco_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's MoCo example: query / momentum encoders, ``NTXentLoss`` with a memory bank as the queue."""
    hp = model.method.hparams
    backbone = timm_model(model)
    dim = backbone.num_features
    projector = MoCoProjectionHead(dim, hp.mlp_hidden_dim or dim, hp.embed_dim)
    criterion = NTXentLoss(temperature=hp.temperature, memory_bank_size=(hp.queue_size, hp.embed_dim))
    return lightly_moco(backbone, projector, criterion, constant(hp.momentum), setup_of(model, lr, options))


def lightly_dino_parts(model: SSLForPreTraining, batch_norm: bool):
    """Student / teacher ViTs and ``DINOProjectionHead``s of the preset's sizes (the teacher a copy, frozen later) and
    ``DINOLoss`` with the method's temperatures: what lightly's DINO and iBOT examples share."""
    hp = model.method.hparams
    student, teacher = timm_model(model), timm_model(model, trained=False)
    teacher.load_state_dict(student.state_dict())
    head_sizes = (student.num_features, hp.hidden_dim, hp.bottleneck_dim, hp.out_dim)
    student_head = DINOProjectionHead(
        *head_sizes, batch_norm=batch_norm, freeze_last_layer=hp.freeze_last_layer, norm_last_layer=hp.norm_last_layer
    )
    teacher_head = DINOProjectionHead(*head_sizes, batch_norm=batch_norm)
    teacher_head.load_state_dict(student_head.state_dict())
    criterion = DINOLoss(
        output_dim=hp.out_dim,
        warmup_teacher_temp=hp.warmup_teacher_temp,
        teacher_temp=hp.teacher_temp,
        warmup_teacher_temp_epochs=hp.warmup_teacher_temp_epochs,
        student_temp=hp.student_temp,
        center_momentum=hp.center_momentum,
    )
    return (student, teacher), (student_head, teacher_head), criterion


def lightly_dino_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's DINO example: student / teacher (+ ``DINOProjectionHead``), ``DINOLoss``, EMA of the teacher."""
    hp = model.method.hparams
    backbones, heads, criterion = lightly_dino_parts(model, hp.use_bn_in_head)
    setup = setup_of(model, lr, options)
    return lightly_dino(backbones, heads, criterion, cosine(hp.momentum_teacher), setup, hp.clip_grad)


def lightly_ibot_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's iBOT example on the preset's ViT and head sizes: ``DINOLoss`` + ``IBOTPatchLoss`` with the
    method's temperatures, a shared head, EMA of the teacher and its head."""
    hp = model.method.hparams
    backbones, heads, cls_loss = lightly_dino_parts(model, batch_norm=False)
    patch_loss = IBOTPatchLoss(hp.out_dim, hp.teacher_patch_temp, hp.student_temp, center_momentum=0.9)
    setup = setup_of(model, lr, options)
    return lightly_ibot(backbones, heads, (cls_loss, patch_loss), cosine(hp.momentum_teacher), setup, hp.clip_grad)


def lightly_mae_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's MAE example: ``MaskedVisionTransformerTIMM`` encodes the kept tokens, ``MAEDecoderTIMM`` predicts
    the masked patches; MSE against per-patch normalised pixels (``norm_pix_loss``)."""
    hp = model.method.hparams
    vit = timm_model(model)
    decoder = mae_decoder(vit, hp.decoder_embed_dim, hp.decoder_depth, hp.decoder_num_heads)
    return lightly_mae(vit, decoder, hp.mask_ratio, hp.norm_pix_loss, setup_of(model, lr, options))


def lightly_simclr_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's SimCLR example: ``SimCLRProjectionHead`` with the preset's layers (2: v1, 3: v2), ``NTXentLoss``
    with the preset's temperature, each view its own forward."""
    hp = model.method.hparams
    backbone = timm_model(model)
    dim = backbone.num_features
    head = SimCLRProjectionHead(dim, hp.proj_hidden_dim or dim, hp.embed_dim, num_layers=hp.num_proj_layers)
    return lightly_two_views(backbone, head, NTXentLoss(temperature=hp.temperature), setup_of(model, lr, options))


def lightly_byol_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's BYOL example: ``BYOLProjectionHead`` + ``BYOLPredictionHead`` of the preset's sizes, target EMA on
    lightly's ``cosine_schedule`` from τ_base to 1."""
    hp = model.method.hparams
    backbone = timm_model(model)
    projector = BYOLProjectionHead(backbone.num_features, hp.projector_hidden_dim, hp.embed_dim)
    predictor = BYOLPredictionHead(hp.embed_dim, hp.predictor_hidden_dim, hp.embed_dim)
    return lightly_byol(backbone, projector, predictor, cosine(hp.momentum), setup_of(model, lr, options))


def lightly_simsiam_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's SimSiam example: ``SimSiamProjectionHead``'s blocks with the preset's layers (the last BatchNorm
    without affine), ``SimSiamPredictionHead``."""
    hp = model.method.hparams
    backbone = timm_model(model)
    dim = backbone.num_features
    hidden = hp.proj_hidden_dim or dim
    projector = projection_head((dim, *[hidden] * (hp.proj_layers - 1), hp.dim), nn.BatchNorm1d(hp.dim, affine=False))
    predictor = SimSiamPredictionHead(hp.dim, hp.pred_dim, hp.dim)
    return lightly_simsiam(backbone, projector, predictor, setup_of(model, lr, options))


def lightly_barlow_twins_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's Barlow Twins example: ``BarlowTwinsProjectionHead``'s blocks over the preset's ``projector_dims``,
    ``BarlowTwinsLoss`` with its λ."""
    hp = model.method.hparams
    backbone = timm_model(model)
    head = projection_head((backbone.num_features, *hp.projector_dims))
    criterion = BarlowTwinsLoss(lambda_param=hp.lambd)
    return lightly_two_views(backbone, head, criterion, setup_of(model, lr, options))


def lightly_swav_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's SwAV examples: ``SwaVProjectionHead`` + ``SwaVPrototypes`` of the preset's sizes (frozen for its
    first ``freeze_prototypes_epochs``), ``SwaVLoss`` with its temperature and Sinkhorn settings, the preset's
    assigned crops as the high-resolution ones, its queue (length, first epoch) in ``MemoryBankModule`` banks."""
    hp = model.method.hparams
    backbone = timm_model(model)
    projector = SwaVProjectionHead(backbone.num_features, hp.hidden_mlp, hp.feat_dim)
    frozen_steps = round(hp.freeze_prototypes_epochs * STEPS_PER_EPOCH)
    prototypes = SwaVPrototypes(hp.feat_dim, hp.nmb_prototypes, n_steps_frozen_prototypes=frozen_steps)
    criterion = SwaVLoss(hp.temperature, hp.sinkhorn_iterations, hp.epsilon)
    setup, queue = setup_of(model, lr, options), (hp.queue_length, hp.epoch_queue_starts)
    return lightly_swav(backbone, projector, prototypes, criterion, setup, len(hp.crops_for_assign), queue)


@dataclass(frozen=True)
class Bench:
    """How one method is measured: its preset (name, overrides, default batch size) for ``--size small`` (32 px)
    and ``base`` (224 px), ``bound_views(views) -> (views with gradient, views only the momentum / teacher encoder
    sees)`` for the bare bound, and its step built from lightly's modules (``None``: lightly has no such method)."""

    small: tuple[str, dict, int]
    base: tuple[str, dict, int]
    bound_views: Callable[[Views], tuple[Views, Views]]
    lightly: Callable[[SSLForPreTraining, float, Options], Step] | None


def all_views(views: Views) -> tuple[Views, Views]:
    return views, []


METHODS: dict[str, Bench] = {
    "moco_v2": Bench(
        ("moco_v2_resnet18_32px", {}, 128),
        ("moco_v2_resnet50", {}, 64),
        lambda views: (views[:1], views[1:]),  # query view; key view
        lightly_moco_step,
    ),
    "dino": Bench(
        ("dino_vit_tiny_patch4_32px", {"out_dim": 4096}, 64),
        ("dino_vit_small_patch16_224", {}, 32),
        lambda views: (views, views[:2]),  # all crops; the 2 global crops through the teacher
        lightly_dino_step,
    ),
    "mae": Bench(
        ("mae_vit_tiny_patch4_32px", {}, 128), ("mae_vit_base_patch16_224", {}, 64), all_views, lightly_mae_step
    ),
    "simclr_v1": Bench(
        ("simclr_v1_resnet18_32px", {}, 128), ("simclr_v1_resnet50", {}, 64), all_views, lightly_simclr_step
    ),
    "simclr_v2": Bench(
        ("simclr_v2_resnet18_32px", {}, 128), ("simclr_v2_resnet50", {}, 64), all_views, lightly_simclr_step
    ),
    "byol": Bench(
        ("byol_resnet18_32px", {}, 128),
        ("byol_resnet50", {}, 64),
        lambda views: (views, views),  # both views through the online network; both again through the target
        lightly_byol_step,
    ),
    "simsiam": Bench(("simsiam_resnet18_32px", {}, 128), ("simsiam_resnet50", {}, 64), all_views, lightly_simsiam_step),
    "barlow_twins": Bench(
        ("barlow_twins_resnet18_32px", {}, 128),
        ("barlow_twins_resnet50", {}, 64),
        all_views,
        lightly_barlow_twins_step,
    ),
    "swav": Bench(("swav_resnet18_32px", {}, 128), ("swav_resnet50", {}, 32), all_views, lightly_swav_step),
    # lightly has no InstDisc, InvaSpread, CMC or CPC: sslhub against the bound only
    "instdisc": Bench(("instdisc_resnet18_32px", {}, 128), ("instdisc_resnet50", {}, 64), all_views, None),
    "invaspread": Bench(("invaspread_resnet18_32px", {}, 128), ("invaspread_resnet50", {}, 64), all_views, None),
    "cmc": Bench(("cmc_resnet18_32px", {}, 128), ("cmc_resnet50v1", {}, 64), all_views, None),
    # CPC v2's view is one grid of patches (B, rows, cols, C, p, p): the bound is the patch encoder on it
    "cpc_v2": Bench(("cpc_v2_resnet18_32px", {}, 128), ("cpc_v2_resnet50", {}, 16), all_views, None),
    # lightly's SimMIM (MaskedVisionTransformerTIMM) needs a timm VisionTransformer, not the BEiT-style encoder
    # SimMIM releases: a lightly row would time another backbone, so the bound only
    "simmim": Bench(("simmim_vit_tiny_patch4_32px", {}, 128), ("simmim_vit_base_patch16_224", {}, 64), all_views, None),
    # BEiT's second view is the tokenizer's: the bound is the ViT on the first (the frozen tokenizer is extra work)
    "beit": Bench(
        ("beit_vit_tiny_patch4_32px", {"tokenizer_path": "random"}, 128),
        ("beit_base_patch16_224", {"tokenizer_path": "random"}, 64),
        lambda views: (views[:1], []),
        None,
    ),
    "ibot": Bench(
        ("ibot_vit_tiny_patch4_32px", {"out_dim": 4096, "patch_out_dim": 4096}, 64),
        ("ibot_vit_small_patch16_224", {}, 32),
        lambda views: (views, views[:2]),  # all crops; the 2 global crops through the teacher
        lightly_ibot_step,
    ),
    # ConvMAE's, DeepMIM's and LocalMIM's encoders see 25 % of the tokens: their ratio to the full-view bound can be < 1
    "convmae": Bench(("convmae_convvit_tiny_32px", {}, 128), ("convmae_convvit_base_patch16", {}, 64), all_views, None),
    "deepmim": Bench(
        ("deepmim_vit_tiny_patch4_32px", {}, 128), ("deepmim_vit_base_patch16_224", {}, 64), all_views, None
    ),
    "localmim": Bench(
        ("localmim_vit_tiny_patch4_32px", {}, 128), ("localmim_vit_base_patch16_224", {}, 64), all_views, None
    ),
    # PixPro: both views through the online encoder, both again through the momentum encoder
    "pixpro": Bench(("pixpro_resnet18_32px", {}, 128), ("pixpro_resnet50", {}, 64), lambda views: (views, views), None),
    "rotnet": Bench(("rotnet_resnet18_32px", {}, 128), ("rotnet_resnet50", {}, 64), all_views, None),
    "jigsaw": Bench(("jigsaw_resnet18_32px", {}, 128), ("jigsaw_resnet50", {}, 64), all_views, None),
    "context_prediction": Bench(
        ("context_prediction_resnet18_32px", {}, 128), ("context_prediction_resnet50", {}, 64), all_views, None
    ),
    "colorization": Bench(("colorization_resnet18_32px", {}, 128), ("colorization_resnet50", {}, 32), all_views, None),
    "counting": Bench(("counting_resnet18_32px", {}, 128), ("counting_resnet50", {}, 64), all_views, None),
    "exemplar": Bench(("exemplar_resnet18_32px", {}, 128), ("exemplar_resnet50", {}, 64), all_views, None),
    "jigsaw_clustering": Bench(
        ("jigsaw_clustering_resnet18_32px", {}, 128), ("jigsaw_clustering_resnet50", {}, 64), all_views, None
    ),
}
# Rows of the memory banks in the benchmark (CIFAR-10's 50,000 training images).
BANK_ROWS = 50_000


# ---- driver ------------------------------------------------------------------------------------------------------
def bench_method(method: str, ns: argparse.Namespace, options: Options) -> dict:
    bench = METHODS[method]
    preset, overrides, default_batch = getattr(bench, ns.size)
    batch = ns.batch_size or default_batch
    model = sslhub.create_model(preset, task="pretraining", **overrides)
    lr = scaled_learning_rate(model.method.hparams, batch)  # the trainer's scaling of the base lr
    made = make_batch(model, batch, options, ns.seed)
    views = made.views
    row = {
        "method": method,
        "config": preset + "".join(f", {k}={v}" for k, v in overrides.items()),
        "batch": batch,
        "views": describe_views(views),
    }
    builders = {"sslhub": functools.partial(sslhub_step, made=made), "bound": bound_step, "lightly": bench.lightly}
    steps = {name: build(model, lr, options) for name, build in builders.items() if build is not None}
    row.update(median_seconds(steps, views, options, ns.warmup, ns.repeats))
    del model, steps
    gc.collect()
    if options.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def machine_description(options: Options) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    parts = [f"CPU {cpu}", f"{torch.get_num_threads()} threads", f"torch {torch.__version__}"]
    parts += [f"timm {timm.__version__}", f"lightly {lightly.__version__}"]
    if options.device.type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name(options.device)}")
    precision = "bf16 autocast" if options.bf16 else "fp32"
    return ", ".join(parts) + f"; {precision}" + (", channels_last" if options.channels_last else "")


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| method | preset / config | batch | views | sslhub step (s) | bare bound (s) | sslhub / bound "
        "| lightly step (s) | sslhub / lightly |"
    )
    lines = [header, "|" + " --- |" * 9]
    for r in rows:
        lightly_cells = f"{r['lightly']:.3f} | {r['sslhub'] / r['lightly']:.2f}" if "lightly" in r else "— | —"
        lines.append(
            f"| {r['method']} | {r['config']} | {r['batch']} | {r['views']} | {r['sslhub']:.3f} | {r['bound']:.3f} "
            f"| {r['sslhub'] / r['bound']:.2f} | {lightly_cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--size", choices=["small", "base"], default="small", help="32 px presets or 224 px presets")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per method, see METHODS")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast around the forward passes")
    parser.add_argument("--channels-last", action="store_true", help="channels_last images and conv weights")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    torch.manual_seed(ns.seed)
    options = Options(torch.device(ns.device), ns.bf16, ns.channels_last)
    rows = [bench_method(method, ns, options) for method in ns.methods]
    print(markdown_table(rows))
    print(f"\nMachine: {machine_description(options)}. Median of {ns.repeats} steps after {ns.warmup} warm-up steps.")
    print("Bound = backbone forward+backward+optimizer step on the trained views + no-grad forward on the views only")
    print("the momentum/teacher/target encoder sees. MAE's encoder sees only 25 % of the patches: its ratio can be")
    print("below 1. Bound and lightly use the method's optimizer kind over one parameter group.")


if __name__ == "__main__":
    main()
