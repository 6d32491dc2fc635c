"""Speed of one pretraining step: sslhub vs. the bare backbone bound vs. the same step built from lightly.

For each method (MoCo v2, DINO, MAE) the script reports the median wall time of one optimizer step on pre-made
random views (no data loading, no augmentation), after warm-up steps:

- **sslhub step**: exactly what ``sslhub.training.Pretrainer`` does per step: ``on_step_start``,
  ``model(views).loss``, ``backward``, ``on_before_optimizer_step``, ``optimizer.step``, ``zero_grad``, the
  momentum update of the method's ``momentum_pairs`` and ``on_step_end``, with the optimizer of
  ``sslhub.training.build_optimizer``.
- **bare bound**: the method's own encoder (``build_encoder``: timm backbone + pooling) forward + backward (loss =
  sum of the pooled features) and an SGD / AdamW step on the views the method back-propagates through, plus a no-grad
  forward on the views only the momentum / teacher encoder sees. MoCo: grad on the query view, no grad on the
  key view; DINO: grad on all crops, no grad on the 2 global crops; MAE: grad on the full view. MAE's encoder
  sees only 25 % of the patches, so its sslhub/bound ratio can be below 1.
- **lightly step**: the same method from lightly's own modules (as lightly's ``examples/pytorch``) on the same
  timm backbone with the same head sizes and hyperparameters. MoCo v2: ``MoCoProjectionHead`` +
  ``NTXentLoss(memory_bank_size=(K, D))`` + ``update_momentum``; DINO: ``DINOProjectionHead`` + ``DINOLoss`` +
  ``update_momentum``, one forward per crop as lightly's example, global-norm clipping (what lightly's benchmarks
  get from Lightning's ``gradient_clip_val``) and ``cancel_last_layer_gradients``; MAE:
  ``MaskedVisionTransformerTIMM`` + ``MAEDecoderTIMM``, MSE on the (per-patch normalised) masked patches.

Steps are timed in epoch 10 of 100 (past DINO's frozen last layer, so every parameter is updated); the three steps
of a method take turns, so a load change on a shared machine hits them alike.

    python scripts/bench_pretrain_step.py --size small --threads 2 --repeats 20           # CPU, 32 px presets
    python scripts/bench_pretrain_step.py --size base --device cuda --bf16 --channels-last  # GPU, 224 px presets

Time on an idle machine only: a busy one gives 10x outliers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightly
import timm
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, NTXentLoss
from lightly.models import utils as lightly_utils
from lightly.models.modules import (
    DINOProjectionHead,
    MAEDecoderTIMM,
    MaskedVisionTransformerTIMM,
    MoCoProjectionHead,
)
from lightly.utils.scheduler import cosine_schedule
from torch import nn

import sslhub
from sslhub.backbones import is_vision_transformer
from sslhub.methods.base import MethodHparams, TrainingProgress, update_momentum_pairs
from sslhub.modeling import SSLForPreTraining
from sslhub.training import build_optimizer

# method -> (preset, overrides, default batch size)
PRESETS = {
    "small": {
        "moco_v2": ("moco_v2_resnet18_32px", {}, 128),
        "dino": ("dino_vit_tiny_patch4_32px", {"out_dim": 4096}, 64),
        "mae": ("mae_vit_tiny_patch4_32px", {}, 128),
    },
    "base": {
        "moco_v2": ("moco_v2_resnet50", {}, 64),
        "dino": ("dino_vit_small_patch16_224", {}, 32),
        "mae": ("mae_vit_base_patch16_224", {}, 64),
    },
}

# method -> (views with gradient, views seen only by the momentum / teacher encoder), for the bare bound
BOUND_VIEWS: dict[str, Callable[[list], tuple[list, list]]] = {
    "moco_v2": lambda views: (views[:1], views[1:]),
    "dino": lambda views: (views, views[:2]),
    "mae": lambda views: (views, []),
}

STEPS_PER_EPOCH = 100


@dataclass
class Options:
    """Where and how every step runs."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False

    def place(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device).train()
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


@dataclass
class Step:
    """One training step: ``forward(views, progress) -> loss``, backward, the hooks around the optimizer step."""

    forward: Callable[[list[torch.Tensor], TrainingProgress], torch.Tensor]
    optimizer: torch.optim.Optimizer
    before_optimizer_step: Callable[[TrainingProgress], None] = lambda progress: None
    after_optimizer_step: Callable[[TrainingProgress], None] = lambda progress: None

    def __call__(self, views: list[torch.Tensor], progress: TrainingProgress, options: Options) -> None:
        with options.autocast():
            loss = self.forward(views, progress)
        loss.backward()
        self.before_optimizer_step(progress)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_optimizer_step(progress)


def progress_at(index: int) -> TrainingProgress:
    return TrainingProgress(10 * STEPS_PER_EPOCH + index, 100 * STEPS_PER_EPOCH, STEPS_PER_EPOCH)


def seconds(step: Step, views: list[torch.Tensor], progress: TrainingProgress, options: Options) -> float:
    """Wall time of one step (CUDA synchronised before and after)."""
    synchronize = torch.cuda.synchronize if options.device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    step(views, progress, options)
    synchronize()
    return time.perf_counter() - start


def median_seconds(
    steps: dict[str, Step], views: list[torch.Tensor], options: Options, warmup: int, repeats: int
) -> dict[str, float]:
    """Median step time of each of ``steps`` after ``warmup`` untimed steps. The steps take turns, so a load change
    on a shared machine hits all of them alike instead of whichever happens to run then."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            times[name].append(seconds(step, views, progress_at(index), options))
    return {name: statistics.median(values[warmup:]) for name, values in times.items()}


def make_optimizer(params, hparams: MethodHparams, lr: float) -> torch.optim.Optimizer:
    """The method's optimizer kind with its lr, momentum / betas and weight decay (for the bound and lightly)."""
    params = [p for p in params if p.requires_grad]
    if hparams.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=hparams.sgd_momentum, weight_decay=hparams.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(hparams.betas), weight_decay=hparams.weight_decay)


def encoder_kwargs(model: SSLForPreTraining, trained: bool = True) -> dict:
    """Extra timm options of the encoder: DINO's ViTs take several crop sizes, and its student uses drop path."""
    method = model.method
    if method.name != "dino" or not is_vision_transformer(method.student.timm_model):
        return {}
    return {"dynamic_img_size": True, **({"drop_path_rate": method.hparams.drop_path_rate} if trained else {})}


def timm_model(model: SSLForPreTraining, trained: bool = True) -> nn.Module:
    """The backbone as a lightly user builds it: plain ``timm.create_model`` with timm's own pooling."""
    config = model.config
    return timm.create_model(config.backbone, num_classes=0, **config.backbone_kwargs, **encoder_kwargs(model, trained))


def make_views(model: SSLForPreTraining, batch: int, options: Options) -> list[torch.Tensor]:
    """Random views of the method's shapes: MoCo 2 views; DINO 2 global + N local crops; MAE 1 view."""
    method, size = model.method, model.config.image_size
    if method.name == "dino":
        sizes = [size] * 2 + [method.local_crop_size()] * method.hparams.local_crops_number
    else:
        sizes = [size] * {"moco_v2": 2, "mae": 1}[method.name]
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    return [torch.randn(batch, 3, s, s, device=options.device).contiguous(memory_format=memory_format) for s in sizes]


def describe_views(views: list[torch.Tensor]) -> str:
    counts: dict[int, int] = {}
    for view in views:
        counts[view.shape[-1]] = counts.get(view.shape[-1], 0) + 1
    return " + ".join(f"{n}x{size}px" for size, n in counts.items())


def batched_by_size(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of one resolution concatenated into one batch (DINO's ``MultiCropWrapper``)."""
    groups: list[list[torch.Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape[-2:] == view.shape[-2:]:
            groups[-1].append(view)
        else:
            groups.append([view])
    return [torch.cat(group) for group in groups]


# ---- the three measured steps ------------------------------------------------------------------------------------
def sslhub_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """The trainer's step (``Pretrainer.train_epoch`` without Accelerate's no-op wrappers on one process)."""
    model = options.place(model)
    method = model.method

    def forward(views, progress):
        method.on_step_start(progress)
        return model(views).loss

    def after_optimizer_step(progress):
        update_momentum_pairs(method.momentum_pairs(), method.momentum_at(progress))
        method.on_step_end(progress)

    return Step(forward, build_optimizer(method, lr), method.on_before_optimizer_step, after_optimizer_step)


def bound_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """Bare backbone: forward + backward + optimizer step on the trained views, no-grad forward on the others."""
    encoder = options.place(type(model.method).build_encoder(model.config, **encoder_kwargs(model)))
    split = BOUND_VIEWS[model.method.name]

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
    query = options.place(nn.Sequential(backbone, MoCoProjectionHead(dim, hp.mlp_hidden_dim or dim, hp.embed_dim)))
    key = copy.deepcopy(query)
    lightly_utils.deactivate_requires_grad(key)
    criterion = NTXentLoss(temperature=hp.temperature, memory_bank_size=(hp.queue_size, hp.embed_dim))
    criterion = criterion.to(options.device)

    def forward(views, progress):
        lightly_utils.update_momentum(query, key, m=hp.momentum)
        with torch.no_grad():
            keys = key(views[1])
        return criterion(query(views[0]), keys)

    return Step(forward, make_optimizer(query.parameters(), hp, lr))


def lightly_dino_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's DINO example: student / teacher (+ ``DINOProjectionHead``), ``DINOLoss``, EMA of the teacher."""
    hp = model.method.hparams
    student, teacher = timm_model(model), timm_model(model, trained=False)
    teacher.load_state_dict(student.state_dict())
    head_sizes = (student.num_features, hp.hidden_dim, hp.bottleneck_dim, hp.out_dim)
    student_head = DINOProjectionHead(
        *head_sizes,
        batch_norm=hp.use_bn_in_head,
        freeze_last_layer=hp.freeze_last_layer,
        norm_last_layer=hp.norm_last_layer,
    )
    teacher_head = DINOProjectionHead(*head_sizes, batch_norm=hp.use_bn_in_head)
    teacher_head.load_state_dict(student_head.state_dict())
    student_net = options.place(nn.Sequential(student, student_head))
    teacher_net = options.place(nn.Sequential(teacher, teacher_head))
    lightly_utils.deactivate_requires_grad(teacher_net)
    criterion = DINOLoss(
        output_dim=hp.out_dim,
        warmup_teacher_temp=hp.warmup_teacher_temp,
        teacher_temp=hp.teacher_temp,
        warmup_teacher_temp_epochs=hp.warmup_teacher_temp_epochs,
        student_temp=hp.student_temp,
        center_momentum=hp.center_momentum,
    ).to(options.device)

    def forward(views, progress):
        with torch.no_grad():
            teacher_out = [teacher_net(view) for view in views[:2]]
        student_out = [student_net(view) for view in views]
        return criterion(teacher_out, student_out, epoch=progress.epoch)

    def before_optimizer_step(progress):
        if hp.clip_grad is not None:
            nn.utils.clip_grad_norm_(student_net.parameters(), hp.clip_grad)
        student_head.cancel_last_layer_gradients(progress.epoch)

    def after_optimizer_step(progress):
        momentum = cosine_schedule(progress.step, progress.total_steps, hp.momentum_teacher, 1.0)
        lightly_utils.update_momentum(student_net, teacher_net, m=momentum)

    optimizer = make_optimizer(student_net.parameters(), hp, lr)
    return Step(forward, optimizer, before_optimizer_step, after_optimizer_step)


def lightly_mae_step(model: SSLForPreTraining, lr: float, options: Options) -> Step:
    """lightly's MAE example: ``MaskedVisionTransformerTIMM`` encodes the kept tokens, ``MAEDecoderTIMM`` predicts
    the masked patches; MSE against per-patch normalised pixels (``norm_pix_loss``)."""
    hp = model.method.hparams
    vit = timm_model(model)
    patch_size = vit.patch_embed.patch_size[0]
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    with warnings.catch_warnings():  # lightly 1.6 deprecates MAEDecoderTIMM (removal in 1.7)
        warnings.simplefilter("ignore", FutureWarning)
        decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            patch_size=patch_size,
            embed_dim=vit.embed_dim,
            decoder_embed_dim=hp.decoder_embed_dim,
            decoder_depth=hp.decoder_depth,
            decoder_num_heads=hp.decoder_num_heads,
        )
    net = options.place(nn.ModuleDict({"encoder": encoder, "decoder": decoder}))

    def forward(views, progress):
        images = views[0]
        batch, length = images.shape[0], encoder.sequence_length
        idx_keep, idx_mask = lightly_utils.random_token_mask((batch, length), hp.mask_ratio, device=images.device)
        encoded = decoder.embed(encoder.encode(images, idx_keep=idx_keep))
        tokens = lightly_utils.repeat_token(decoder.mask_token, (batch, length))
        tokens = lightly_utils.set_at_index(tokens, idx_keep, encoded.type_as(tokens))
        prediction = decoder.predict(lightly_utils.get_at_index(decoder.decode(tokens), idx_mask))
        target = lightly_utils.get_at_index(lightly_utils.patchify(images, patch_size), idx_mask - 1)
        if hp.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return F.mse_loss(prediction, target)

    return Step(forward, make_optimizer(net.parameters(), hp, lr))


LIGHTLY_STEPS = {"moco_v2": lightly_moco_step, "dino": lightly_dino_step, "mae": lightly_mae_step}


# ---- driver ------------------------------------------------------------------------------------------------------
def bench_method(method: str, ns: argparse.Namespace, options: Options) -> dict:
    preset, overrides, default_batch = PRESETS[ns.size][method]
    batch = ns.batch_size or default_batch
    model = sslhub.create_model(preset, task="pretraining", **overrides)
    hp = model.method.hparams
    lr = hp.lr * batch / hp.lr_batch_size  # the trainer's linear scaling
    views = make_views(model, batch, options)
    row = {
        "method": method,
        "config": preset + "".join(f", {k}={v}" for k, v in overrides.items()),
        "batch": batch,
        "views": describe_views(views),
    }
    builders = {"sslhub": sslhub_step, "bound": bound_step, "lightly": LIGHTLY_STEPS[method]}
    steps = {name: build(model, lr, options) for name, build in builders.items()}
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
        lines.append(
            f"| {r['method']} | {r['config']} | {r['batch']} | {r['views']} | {r['sslhub']:.3f} | {r['bound']:.3f} "
            f"| {r['sslhub'] / r['bound']:.2f} | {r['lightly']:.3f} | {r['sslhub'] / r['lightly']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["moco_v2", "dino", "mae"], choices=["moco_v2", "dino", "mae"])
    parser.add_argument("--size", choices=sorted(PRESETS), default="small", help="32 px presets or 224 px presets")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per method, see PRESETS")
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
    print("the momentum/teacher encoder sees. MAE's encoder sees only 25 % of the patches: its ratio can be below 1.")


if __name__ == "__main__":
    main()
