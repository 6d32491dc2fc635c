"""Full fine-tuning of ``SSLForImageClassification`` on Accelerate (DESIGN.md §2): MAE's recipe, scaled to the data
and the run.

The parts follow MAE's ViT-B fine-tuning (facebookresearch/mae ``FINETUNE.md`` and ``main_finetune.py``, itself BEiT's
and DeiT's recipe): AdamW (β 0.9 / 0.999, weight decay 0.05, none on 1-D tensors, position embedding and class token),
layer-wise lr decay 0.65 (ViT-L / H: 0.75), drop path 0.1 (ViT-L 0.2, ViT-H 0.3), label smoothing 0.1, linear
warm-up then cosine to 1e-6 per step, 100 epochs. Three rules scale it (``scaled_recipe``), so that one set of
defaults serves 100 images and ImageNet:

- the peak lr is 2e-3 at 1024 images per step (MAE: 5e-4 x 1024 / 256) and scales with the square root of the batch,
  the rule for Adam (Malladi et al. 2022, arXiv 2205.10287); MAE scales linearly, which gives a 64-image batch
  1.25e-4, a quarter of the square-root rule's 5e-4 (measured on 1,437 digits, 220 steps, without the strong
  regularisation and 5 % warm-up: 0.48 top-1 against 0.86);
- warm-up is 5 % of the run (MAE: 5 of 100 epochs);
- the strong regularisation, mixup 0.8 / cutmix 1.0, RandAugment ``rand-m9-mstd0.5-inc1`` and random erasing 0.25,
  is on only when the training split has at least ``LARGE_DATA_IMAGES`` images: on the digits at lr 1e-3 it kept
  the model at 0.49 where the same run without it reached 0.92; with both, MAE's recipe ended at chance (0.14).

Every value is a flag that overrides its rule. timm gives the parts (``create_transform``, ``Mixup``,
``SoftTargetCrossEntropy``, ``param_groups_layer_decay``); schedule, checkpoints and exact resume are those of
``sslhub.training``. The model saved at the end is the last one, not the best on the validation split: choosing it on
the data it is reported on would overstate its accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment, posterize
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm.auto import tqdm

from sslhub.arguments import RunArguments, none_or_str, option, required_option
from sslhub.backbones import is_vision_transformer
from sslhub.checkpointing import check_new_output, restore_checkpoint, run_identity, save_checkpoint
from sslhub.configuration import SSLConfig
from sslhub.conversion.pretrained import is_release_name, refuse_pretrained_path
from sslhub.data import labelled_splits, loader_options
from sslhub.factory import create_model, from_pretrained
from sslhub.files import check_writable, move_into
from sslhub.hub.cards import describe_data, save_model_card
from sslhub.modeling import SSLForImageClassification
from sslhub.registry import get_method
from sslhub.reporting import add_results_to_model_card, classification_report, save_report
from sslhub.training import (
    MAX_WARMUP_FRACTION,
    DivergenceGuard,
    init_trackers,
    learning_rate_at,
    loader_batches,
    remaining_batches_of_epoch,
    seeded_accelerator,
    warmup_steps,
)

VIT_LAYER_DECAY = 0.65  # MAE FINETUNE.md, ViT-B (BEiT's ViT-B value too)
BETAS = (0.9, 0.999)
RESULT_NAME = "fine-tuned top-1"
LR_REFERENCE_IMAGES = 1024  # MAE ViT-B: --blr 5e-4 x 1024 images / 256 = a peak lr of 2e-3
WARMUP_FRACTION = 0.05  # MAE ViT-B: 5 warm-up epochs of 100
LARGE_DATA_IMAGES = 10_000  # training images from which mixup, cutmix, RandAugment and random erasing are on
MAE_REGULARISATION = {"mixup": 0.8, "cutmix": 1.0, "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}
NO_REGULARISATION = {"mixup": 0.0, "cutmix": 0.0, "auto_augment": None, "reprob": 0.0}
AUTO = "auto"


@dataclass(kw_only=True)
class FinetuneArguments(RunArguments):
    """Everything ``sslhub finetune`` takes (its flags are generated from these fields); defaults are MAE's ViT-B
    fine-tuning recipe scaled to the data and the run (module docstring, ``scaled_recipe``)."""

    model: str = required_option(
        "preset (random init), preset.tag (the authors' weights), sslhub checkpoint directory or Hub id"
    )
    pretrained_path: str | None = option(
        None, "the authors' file (or transformers directory) of a --model preset.tag already on disk, e.g. offline"
    )
    data: str = required_option(
        "labelled data: 'builtin', 'fashion-mnist', a folder with one subfolder per class, or HF data"
    )
    output_dir: str = option(
        "sslhub-finetune", "where the fine-tuned model, metrics.json, confusion_matrix.png and checkpoints go"
    )
    epochs: int = option(100, "number of epochs (MAE ViT-B: 100)", {">=": 1})
    batch_size: int = option(
        64, "images per process and micro-batch (MAE main_finetune.py; its ViT-B run: 32 x 32)", {">=": 1}
    )
    lr: float | None = option(
        None, "absolute peak learning rate (default: --base-lr x sqrt(images per step / 1024))", {">": 0}
    )
    base_lr: float = option(2e-3, "peak learning rate at 1024 images per step (MAE ViT-B: 2e-3)", {">": 0})
    min_lr: float = option(1e-6, "final learning rate of the cosine schedule", {">=": 0})
    layer_decay: float | None = option(
        None, "layer-wise lr decay (default: 0.65 for ViTs as MAE / BEiT ViT-B, 1 = off for others)", {">": 0, "<=": 1}
    )
    drop_path: float = option(0.1, "stochastic depth rate of the backbone (timm drop_path_rate)", {">=": 0, "<": 1})
    mixup: float | None = option(None, "mixup alpha (0: off; default: 0.8 from 10k training images, else 0)", {">=": 0})
    cutmix: float | None = option(None, "cutmix alpha (0: off; default: 1 from 10k training images, else 0)", {">=": 0})
    label_smoothing: float = option(0.1, "label smoothing", {">=": 0, "<": 1})
    weight_decay: float = option(0.05, "AdamW weight decay", {">=": 0})
    warmup_epochs: float | None = option(
        None, f"linear warm-up epochs (default: 5 % of the run; at most {MAX_WARMUP_FRACTION:.0%})", {">=": 0}
    )
    auto_augment: str | None = option(
        AUTO,
        "timm auto-augment policy, 'none' (off) or 'auto' (rand-m9-mstd0.5-inc1 from 10k training images, else none)",
        type=none_or_str,
    )
    reprob: float | None = option(
        None, "random erasing probability (default: 0.25 from 10k training images, else 0)", {">=": 0, "<=": 1}
    )
    clip_grad: float | None = option(None, "clip the gradient norm to this value (default: no clipping)", {">": 0})
    seed: int = option(0, "random seed: split, data order and augmentations are functions of it")
    val_fraction: float = option(
        0.2, "share of the images held out for validation when the data has no validation split", {">": 0, "<": 1}
    )


@dataclass
class FinetuneResult:
    output_dir: str
    steps: int
    losses: list[float]
    history: list[tuple[int, float]]  # (optimizer step, validation top-1) at each epoch end and the last step
    report: dict  # classification_report of the final model on the validation split
    model: SSLForImageClassification | None = None

    @property
    def top1(self) -> float:
        return self.report["top1"]


@dataclass
class FinetuneState:
    """What a checkpoint adds to the Accelerate state (``sslhub.checkpointing``): the optimizer step and the
    validation history."""

    step: int = 0
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, values: dict) -> None:
        self.step, self.history = values["step"], [tuple(item) for item in values["history"]]


def scaled_recipe(args: FinetuneArguments, train_images: int) -> FinetuneArguments:
    """``args`` with the values left to the recipe's rules filled in (module docstring): warm-up 5 % of the epochs, and
    MAE's mixup / cutmix / RandAugment / random erasing from ``LARGE_DATA_IMAGES`` training images, none below."""
    regularisation = MAE_REGULARISATION if train_images >= LARGE_DATA_IMAGES else NO_REGULARISATION
    unset = {field.name: field.default for field in dataclasses.fields(args)}  # None, or "auto" for auto_augment
    values = {key: value for key, value in regularisation.items() if getattr(args, key) == unset[key]}
    if args.warmup_epochs is None:
        values["warmup_epochs"] = WARMUP_FRACTION * args.epochs
    return dataclasses.replace(args, **values)


def peak_learning_rate(args: FinetuneArguments, images_per_step: int) -> float:
    """``--lr``, else ``--base-lr`` (the peak lr at 1024 images per step) x sqrt(images per step / 1024)."""
    return args.lr if args.lr is not None else args.base_lr * math.sqrt(images_per_step / LR_REFERENCE_IMAGES)


def describe_recipe(args: FinetuneArguments, train_images: int, peak_lr: float) -> str:
    """One line on what the rules chose, printed at the start of a run."""
    if args.mixup or args.cutmix or args.auto_augment or args.reprob:
        regularisation = f"mixup {args.mixup}, cutmix {args.cutmix}, {args.auto_augment}, random erasing {args.reprob}"
    else:
        regularisation = "no mixup / cutmix / RandAugment / random erasing"
    return (
        f"recipe for {train_images:,} training images ({'at least' if train_images >= LARGE_DATA_IMAGES else 'under'} "
        f"{LARGE_DATA_IMAGES:,}): {regularisation}; peak lr {peak_lr:.3g}, {args.warmup_epochs:g} warm-up epochs "
        "(flags override each)"
    )


def ended_at_chance(report: dict, num_classes: int) -> bool:
    """Whether a validation top-1 is within two binomial standard deviations of guessing one of the classes."""
    chance = 1 / num_classes
    return report["top1"] <= chance + 2 * math.sqrt(chance * (1 - chance) / report["num_samples"])


def load_classifier(
    name: str, classes: list[str], drop_path: float = 0.0, pretrained_path: str | None = None
) -> SSLForImageClassification:
    """``SSLForImageClassification`` for ``classes`` from ``name``: an sslhub checkpoint directory or Hub id
    (``SSLModel``, ``SSLForImageClassification``, or ``SSLForPreTraining`` whose released encoder is taken), a
    ``preset.tag`` (the authors' weights, from ``pretrained_path`` when given) or a bare preset (random
    initialisation, with a warning). ``drop_path`` becomes the timm backbone's ``drop_path_rate``. A classifier of
    another size is initialised anew."""
    overrides = {"id2label": dict(enumerate(classes)), "label2id": {label: i for i, label in enumerate(classes)}}
    if drop_path > 0:
        overrides["backbone_kwargs"] = {"drop_path_rate": drop_path}
    if is_release_name(name):
        return create_model(name, task="classification", pretrained=True, pretrained_path=pretrained_path, **overrides)
    refuse_pretrained_path(name, pretrained_path)
    if Path(name).is_dir() or "/" in name:
        return _classifier_from_checkpoint(name, overrides)
    model = create_model(name, task="classification", **overrides)
    warnings.warn(
        f"{name!r} is a preset without weights: fine-tuning starts from random initialisation. Give 'preset.tag' "
        "(`sslhub list --pretrained`) or a checkpoint directory to start from pretrained weights.",
        stacklevel=2,
    )
    return model


def _classifier_from_checkpoint(name: str, overrides: dict) -> SSLForImageClassification:
    try:
        config = SSLConfig.from_pretrained(name)
    except OSError as error:
        raise ValueError(
            f"--model {name!r} is neither an sslhub checkpoint directory nor a Hub repo id holding one: {error}"
        ) from error
    config = config.with_overrides(**overrides)
    return from_pretrained(name, task="classification", config=config, ignore_mismatched_sizes=True)


def param_groups(model: SSLForImageClassification, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups, each with its ``lr_scale``: no weight decay on 1-D tensors and the backbone's
    ``no_weight_decay()`` (position embedding, class token); with ``layer_decay`` < 1, the scales of timm's
    ``param_groups_layer_decay`` on a full timm model (BEiT / MAE ``lr_decay.py``), the classifier being its head: for
    a ViT of L blocks, the stem (patch and position embeddings, class token) gets ``layer_decay ** (L + 1)``, block i
    ``layer_decay ** (L - i)``, the classifier 1. timm's ``group_matcher`` puts the final norm with the last block
    (MAE's puts it with the head)."""
    encoder = model.ssl.encoder
    backbone = encoder.timm_model if encoder.timm_model is not None else encoder
    skip = sorted(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else []
    if layer_decay < 1:
        groups = param_groups_layer_decay(backbone, weight_decay, skip, layer_decay=layer_decay)
        for group in groups:
            group["lr_scale"] *= layer_decay  # the classifier is one layer above the backbone's last
    else:
        groups = param_groups_weight_decay(backbone, weight_decay, no_weight_decay_list=skip)
    return groups + param_groups_weight_decay(model.classifier, weight_decay)


def mixup_and_criterion(args: FinetuneArguments, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's batch-wise ``Mixup`` (mixup, or cutmix with probability 0.5 when both are on) whose soft targets carry
    the label smoothing, with ``SoftTargetCrossEntropy``; without mixing ``LabelSmoothingCrossEntropy`` (MAE / DeiT)."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=args.label_smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if args.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(args.label_smoothing)
    return None, nn.CrossEntropyLoss()


class NumpySeeded:
    """``transform`` with numpy's global RNG seeded from torch's and restored afterwards: timm's RandAugment picks its
    operations with numpy, which ``ImageDataset`` does not seed, and views must depend on (seed, epoch, index) only."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        state = np.random.get_state()
        np.random.seed(int(torch.randint(2**32, ())))
        try:
            return self.transform(image)
        finally:
            np.random.set_state(state)


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's ``posterize``, except that keeping 0 bits (RandAugment's increasing posterize at magnitude 10) gives the
    black image older Pillow returned: Pillow 13 raises for 0 bits."""
    return Image.new(image.mode, image.size) if bits_to_keep <= 0 else posterize(image, bits_to_keep, **kwargs)


def _with_safe_posterize(transform):
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()) if isinstance(step, RandAugment) else ():
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def train_transform(config: SSLConfig, args: FinetuneArguments) -> NumpySeeded:
    """timm's training transform (MAE ``build_transform``): bicubic random resized crop, flip, RandAugment, then the
    method's ``input_transform`` (normalisation with the model's mean and std, or CMC's Lab) and random erasing (per
    pixel); size of the model's config."""
    primary, secondary, final = create_transform(
        config.image_size,
        is_training=True,
        auto_augment=args.auto_augment,
        color_jitter=None,  # MAE: no colour jitter, also without RandAugment
        interpolation="bicubic",
        re_prob=args.reprob,
        re_mode="pixel",
        re_count=1,
        mean=config.image_mean,
        std=config.image_std,
        separate=True,
    )
    erasing = [step for step in final.transforms if isinstance(step, RandomErasing)]
    steps = [*primary.transforms, *secondary.transforms, *get_method(config.method).input_transform(config), *erasing]
    return NumpySeeded(_with_safe_posterize(transforms.Compose(steps)))


def _settings(args: FinetuneArguments) -> dict:
    return {k: v for k, v in asdict(args).items() if k not in ("resume", "progress", "log_with", "output_dir")}


class Finetuner:
    """One fine-tuning run: ``Finetuner(args).run()``. Accelerate, so one CPU, many GPUs and ``accelerate launch``
    share the code; checkpoints every ``checkpoint_every`` steps, and ``resume`` continues exactly."""

    def __init__(self, args: FinetuneArguments):
        self.args = args
        check_writable(args.output_dir)
        self.accelerator = seeded_accelerator(args)
        train, val = labelled_splits(
            args.data,
            val_fraction=args.val_fraction,
            seed=args.seed,
            image_column=args.image_column,
            label_column=args.label_column,
        )
        self.classes, self.train_data = train.classes, train
        self.args = args = scaled_recipe(args, len(train))
        model = load_classifier(args.model, self.classes, args.drop_path, args.pretrained_path)
        config = model.config
        train.transform, train.seed = train_transform(config, args), args.seed
        val.transform = get_method(config.method).eval_transform(config)
        self.mixup, self.criterion = mixup_and_criterion(args, len(self.classes))
        global_batch = args.batch_size * self.accelerator.num_processes
        self._check_batch(len(train), global_batch)
        images_per_step = global_batch * args.gradient_accumulation_steps
        self.peak_lr = peak_learning_rate(args, images_per_step)
        if args.progress and self.accelerator.is_main_process:
            print(describe_recipe(args, len(train), self.peak_lr))
        self.layer_decay = args.layer_decay
        if self.layer_decay is None:
            self.layer_decay = VIT_LAYER_DECAY if is_vision_transformer(model.ssl.encoder.timm_model) else 1.0
        optimizer = torch.optim.AdamW(
            param_groups(model, args.weight_decay, self.layer_decay), lr=self.peak_lr, betas=BETAS
        )
        self.model, self.optimizer, self.loader, self.val_loader = self.accelerator.prepare(
            model, optimizer, self._loader(train, shuffle=True), self._loader(val, shuffle=False)
        )
        self.steps_per_epoch = len(self.loader) // args.gradient_accumulation_steps
        self.total_steps = args.epochs * self.steps_per_epoch
        self.warmup_steps = warmup_steps(args.warmup_epochs, self.steps_per_epoch, self.total_steps)
        self.last_step = min(self.total_steps, args.max_steps or self.total_steps)
        self.state = FinetuneState()
        self.losses: list[float] = []
        self.report: tuple[int, dict] | None = None  # (step, report) of the latest evaluation
        self.guard = DivergenceGuard(
            self.accelerator, self.accelerator.unwrap_model(self.model), args.output_dir, "lower --lr or --base-lr"
        )

    def _check_batch(self, size: int, global_batch: int) -> None:
        if size < global_batch:
            raise ValueError(
                f"{self.args.data!r} has {size} training images, fewer than one batch of {global_batch} "
                f"({self.args.batch_size} per process x {self.accelerator.num_processes}): lower --batch-size"
            )
        if self.mixup is not None and self.args.batch_size % 2:
            raise ValueError(
                f"mixup / cutmix mix pairs of images: --batch-size must be even, not {self.args.batch_size}"
            )

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            generator=torch.Generator().manual_seed(self.args.seed),  # a new iterator must not draw from the global RNG
            **loader_options(self.args.num_workers, pin_memory=self.accelerator.device.type == "cuda"),
        )

    def set_learning_rate(self, step: int) -> None:
        """Warm-up + cosine per step (``learning_rate_at``), times each group's layer-decay ``lr_scale``."""
        lr = learning_rate_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.args.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def evaluate(self) -> dict:
        """``classification_report`` of the current model on the validation split (gathered from all processes)."""
        logits, labels = [], []
        self.model.eval()
        with torch.no_grad():
            for images, targets in self.val_loader:
                batch = self.accelerator.gather_for_metrics((self.model(images).logits, targets))
                logits.append(batch[0].float().cpu())
                labels.append(batch[1].cpu())
        self.model.train()
        self.report = (self.state.step, classification_report(torch.cat(logits), torch.cat(labels), self.classes))
        return self.report[1]

    def record_evaluation(self, bar: tqdm) -> None:
        top1 = self.evaluate()["top1"]
        self.state.history.append((self.state.step, top1))
        bar.write(
            f"step {self.state.step} (epoch {self.state.step / self.steps_per_epoch:.2f}): validation top-1 {top1:.4f}"
        )
        self.log({"val/top1": top1})

    def log(self, values: dict) -> None:
        if self.args.log_with:
            self.accelerator.log(values, step=self.state.step)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: schedule, mixup / cutmix, loss, backward, and the optimizer step when gradients sync."""
        self.set_learning_rate(self.state.step)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        loss = self.criterion(self.model(images).logits, targets)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and self.args.clip_grad:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def train_epoch(self, bar: tqdm) -> None:
        """Optimizer steps until the end of the current epoch (or ``last_step``), skipping batches already seen."""
        accelerator, state = self.accelerator, self.state
        epoch, batches = remaining_batches_of_epoch(self, self.train_data)
        micro_losses = []
        for images, labels in loader_batches(batches):
            with accelerator.accumulate(self.model):
                micro_losses.append(self.train_step(images, labels))
            if not accelerator.sync_gradients:
                continue
            self.losses.append(self.guard.check(state.step + 1, torch.stack(micro_losses).mean()))
            micro_losses = []
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}", epoch=epoch)
            if state.step % self.args.log_every == 0:
                self.log({"train/loss": self.losses[-1], "train/lr": self.optimizer.param_groups[-1]["lr"]})
            end_of_epoch = state.step % self.steps_per_epoch == 0
            if end_of_epoch or state.step == self.last_step:
                self.record_evaluation(bar)
            if state.step % self.args.checkpoint_every == 0 or state.step == self.last_step:
                checkpoint = {"trainer": state.state_dict(), "run": run_identity(self.args, accelerator.num_processes)}
                save_checkpoint(accelerator, self.args.output_dir, state.step, self.args.keep_checkpoints, checkpoint)
            if end_of_epoch or state.step >= self.last_step:
                return

    def save(self, report: dict) -> None:
        """The classifier (with its model card) in ``output_dir``, ``metrics.json`` + ``confusion_matrix.png`` of
        ``report``, and the validation top-1 in the card's ``model-index``; all written into a staging directory
        and moved into place only once complete, so a failure leaves the previous files."""
        output = Path(self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output, prefix=".partial_") as tmp:
            staging = Path(tmp) / output.resolve().name  # the card's model name is its directory's
            staging.mkdir()
            self._write(report, staging)
            move_into(staging, output)

    def _write(self, report: dict, output: Path) -> None:
        """The files of ``save`` into ``output``."""
        args, model = self.args, self.accelerator.unwrap_model(self.model)
        recipe = {"data": args.data, "steps": self.state.step, "peak lr": self.peak_lr, "layer_decay": self.layer_decay}
        recipe |= {key: value for key, value in _settings(args).items() if key not in ("data", "lr", "layer_decay")}
        save_model_card(model.model_card(recipe), output)
        model.save_pretrained(output)
        data_name, dataset_id = describe_data(args.data)
        details = {
            "class_names": self.classes,
            "model": args.model,
            "data": args.data,
            "split": "validation",
            "steps": self.state.step,
            "history": self.state.history,
            "settings": {**_settings(args), "lr": self.peak_lr, "layer_decay": self.layer_decay},
        }
        save_report({**report, **details}, output, title=f"{Path(args.model).name}\nfine-tuned on {data_name}")
        add_results_to_model_card(output, {RESULT_NAME: report["top1"]}, data_name, dataset_id)

    def run(self) -> FinetuneResult:
        args, accelerator, state = self.args, self.accelerator, self.state
        check_new_output(args.output_dir, args.resume)
        restore_checkpoint(
            accelerator, args.resume, args.output_dir, run_identity(args, accelerator.num_processes), state
        )
        if args.log_with:
            init_trackers(accelerator, "sslhub-finetune", _settings(args))
        show = args.progress and accelerator.is_main_process
        with tqdm(total=self.last_step, initial=state.step, disable=not show, desc="finetune") as bar:
            self.model.train()
            while state.step < self.last_step:
                self.train_epoch(bar)
        report = self.report[1] if self.report and self.report[0] == state.step else self.evaluate()
        if ended_at_chance(report, len(self.classes)):
            warnings.warn(
                f"fine-tuning ended at chance: validation top-1 {report['top1']:.4f} is within two standard "
                f"deviations of guessing one of {len(self.classes)} classes ({report['num_samples']} images); try a "
                "higher --lr, more --epochs or less regularisation "
                "(--mixup 0 --cutmix 0 --auto-augment none --reprob 0)",
                stacklevel=2,
            )
        if accelerator.is_main_process:
            self.save(report)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        model = accelerator.unwrap_model(self.model)
        return FinetuneResult(args.output_dir, state.step, self.losses, list(state.history), report, model)


def finetune(args: FinetuneArguments) -> FinetuneResult:
    """Fine-tune ``args.model`` on ``args.data`` and save it with its validation report; see ``FinetuneArguments``."""
    return Finetuner(args).run()
