"""The Accelerate pretraining loop (DESIGN.md §2): one code path for one CPU, many GPUs and ``accelerate launch``.

The trainer knows methods only through their contract (``sslhub.methods.base``): it feeds the method the ``Batch``es
its view recipe collates, takes the optimizer from the table of ``sslhub.optim`` and the schedules from the method's
hyperparameters (lr scaled with the batch size, warm-up then cosine or MoCo v1's step schedule, the method's own
temperature / weight-decay schedules), updates the method's momentum pairs once per optimizer step, and keeps its
per-process buffers out of DDP's broadcast and in per-process checkpoint files. Checkpoints are Accelerate states
written atomically, and ``resume`` continues exactly: data order and augmentations are functions of (seed, epoch,
sample index), and the RNG, model, optimizer and step are restored. The progress bar and the trackers show the
images per second and the share of step time spent waiting for data (``Throughput``). A step whose loss or weights
are not finite stops the run before it is checkpointed or saved (``DivergenceGuard``).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import load_file, save_file
from sklearn.model_selection import train_test_split
from torch.nn.utils import get_total_norm
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from sslhub.arguments import RunArguments, option
from sslhub.checkpointing import (
    check_new_output,
    checkpoint_dirs,
    restore_checkpoint,
    run_identity,
    save_checkpoint,
)
from sslhub.configuration import SSLConfig
from sslhub.data import ImageDataset, ViewDataset, load_image_dataset, loader_options
from sslhub.device_views import DeferredViews
from sslhub.distributed import global_batch_norm
from sslhub.factory import create_model, from_pretrained
from sslhub.files import check_writable, move_into
from sslhub.hub.cards import save_model_card
from sslhub.methods.base import SSLMethod, TrainingProgress, update_momentum_pairs
from sslhub.modeling import SSLForPreTraining
from sslhub.optim import create_optimizer
from sslhub.probes import knn_evaluate

DEFAULT_MODEL = "moco_v2_resnet18_32px"
MAX_WARMUP_FRACTION = 0.25  # the linear warm-up never takes more than this share of a run's optimizer steps


class TrainingError(ValueError):
    """A run that cannot go on: its loss or weights stopped being finite, or a data-loading worker died."""


@dataclass(kw_only=True)
class PretrainArguments(RunArguments):
    """Everything ``sslhub pretrain`` takes (its flags are generated from these fields); ``None`` means "the method's
    default"."""

    model: str = option(
        DEFAULT_MODEL, "preset name (`sslhub list`) or an sslhub pretraining checkpoint directory to continue from"
    )
    data: str = option("builtin", "'builtin' (scikit-learn digits), 'fashion-mnist', an image folder or HF dataset dir")
    output_dir: str = option("sslhub-output", "where the models, checkpoints and logs go")
    epochs: int | None = option(None, "number of epochs (default: the method's)", {">=": 1})
    batch_size: int = option(256, "images per process and step", {">=": 1})
    lr: float | None = option(
        None,
        "absolute learning rate (default: the method's base lr scaled to the batch; 0 keeps the weights)",
        {">=": 0},
    )
    warmup_epochs: float | None = option(
        None, f"linear warm-up epochs (default: the method's; at most {MAX_WARMUP_FRACTION:.0%} of the run)", {">=": 0}
    )
    weight_decay: float | None = option(None, "weight decay (default: the method's)", {">=": 0})
    image_size: int | None = option(None, "training image size (default: the preset's)", {">=": 1})
    overrides: dict = option({}, "config fields or method hyperparameters, as create_model takes them")
    seed: int = option(0, "random seed: data order and augmentations are functions of it")
    knn_every: int = option(1, "weighted-kNN monitor every N epochs when the data has labels (0: off)", {">=": 0})
    knn_k: int = option(20, "neighbours of the kNN monitor", {">=": 1})
    knn_max_train: int = option(10000, "at most this many training images in the kNN monitor's memory bank", {">=": 1})
    knn_max_test: int = option(2000, "at most this many kNN monitor queries", {">=": 1})
    augment_on: str | None = option(
        None,
        "finish the views batched on 'cuda' (this process's GPU) or 'cpu' after loading, with the parameters the "
        "workers drew (crops stay in the workers): methods whose recipe is not made of fused views refuse it",
        choices=["cpu", "cuda"],
    )


@dataclass
class PretrainResult:
    output_dir: str
    steps: int
    losses: list[float]
    knn_random_init: float | None
    knn_history: list[tuple[int, float]]  # (optimizer step, accuracy)
    num_processes: int = 1
    model: SSLForPreTraining | None = None

    @property
    def knn_final(self) -> float | None:
        return self.knn_history[-1][1] if self.knn_history else None


@dataclass
class TrainingState:
    """What a checkpoint adds to the Accelerate state (``sslhub.checkpointing``): the optimizer step and the
    monitor's history."""

    step: int = 0
    knn_random_init: float | None = None
    knn_history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, values: dict) -> None:
        self.step, self.knn_random_init = values["step"], values["knn_random_init"]
        self.knn_history = [tuple(item) for item in values["knn_history"]]


def build_model(args: PretrainArguments) -> SSLForPreTraining:
    """A preset name starts from random init; a directory continues from a saved ``SSLForPreTraining``."""
    overrides = dict(args.overrides)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    for name in ("warmup_epochs", "weight_decay"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if Path(args.model).is_dir():
        config = SSLConfig.from_pretrained(args.model).with_overrides(**overrides)
        return from_pretrained(args.model, task="pretraining", config=config)
    return create_model(args.model, task="pretraining", **overrides)


def build_optimizer(method: SSLMethod, lr: float) -> torch.optim.Optimizer:
    """The method's ``optimizer`` (``sslhub.optim.OPTIMIZERS``) over its ``param_groups``."""
    hp = method.hparams
    return create_optimizer(hp.optimizer, method.param_groups(), lr, momentum=hp.sgd_momentum, betas=hp.betas)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Optimizer steps of the linear warm-up: ``warmup_epochs`` epochs, at most ``MAX_WARMUP_FRACTION`` of the run
    (a short run still spends most of its steps at a useful learning rate)."""
    return min(round(warmup_epochs * steps_per_epoch), int(MAX_WARMUP_FRACTION * total_steps))


def scaled_learning_rate(hparams, images_per_step: int) -> float:
    """The method's base ``lr`` (per ``lr_batch_size`` images) for ``images_per_step``: linear scaling (Goyal et al.
    2017; MoCo, DINO, MAE) or square-root scaling (DINOv2 ``apply_scaling_rules_to_cfg``)."""
    ratio = images_per_step / hparams.lr_batch_size
    return hparams.lr * (math.sqrt(ratio) if hparams.lr_scaling == "sqrt" else ratio)


def learning_rate_at(
    step: int, total_steps: int, warmup_steps: int, peak: float, minimum: float, start: float = 0.0
) -> float:
    """Linear warm-up from ``start`` to ``peak``, then half-cosine to ``minimum`` (DINO / MAE / SwAV
    ``cosine_scheduler``)."""
    if step < warmup_steps:
        return warmup_learning_rate(step, warmup_steps, peak, start)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))


def warmup_learning_rate(step: int, warmup_steps: int, peak: float, start: float = 0.0) -> float:
    """The linear warm-up from ``start`` at step 0 towards ``peak`` at ``warmup_steps``."""
    return start + (peak - start) * step / warmup_steps


def step_learning_rate_at(epoch: int, peak: float, milestones: Sequence[int], factor: float = 0.1) -> float:
    """``peak`` times ``factor`` for every milestone epoch reached (MoCo v1 ``main_moco.py`` without ``--cos``)."""
    return peak * factor ** sum(epoch >= milestone for milestone in milestones)


def monitor_datasets(args: PretrainArguments, train: ImageDataset, transform) -> tuple | None:
    """(memory bank, queries) for the kNN monitor: the training images (a copy of ``train`` with the evaluation
    ``transform``) against the data's test split when it has one, else a seeded stratified 20 % of the training
    images; ``None`` when the data has no labels."""
    if train.labels is None or args.knn_every <= 0:
        return None
    bank = copy.copy(train)
    bank.transform = transform
    try:
        queries = load_image_dataset(args.data, "test", image_column=args.image_column, label_column=args.label_column)
        queries.transform = transform
        bank_index, query_index = list(range(len(bank))), list(range(len(queries)))
    except (ValueError, KeyError, FileNotFoundError):
        queries = bank
        bank_index, query_index = train_test_split(
            list(range(len(bank))), test_size=0.2, random_state=args.seed, stratify=bank.labels
        )
    bank_index = _stratified_subset(bank_index, bank.labels, args.knn_max_train, args.seed)
    query_index = _stratified_subset(query_index, queries.labels, args.knn_max_test, args.seed)
    return Subset(bank, bank_index), Subset(queries, query_index)


def _stratified_subset(indices: list[int], labels, size: int, seed: int) -> list[int]:
    if len(indices) <= size:
        return list(indices)
    subset, _ = train_test_split(
        list(indices), train_size=size, random_state=seed, stratify=[labels[i] for i in indices]
    )
    return sorted(subset)


def save_final_models(
    model: SSLForPreTraining,
    output_dir: str,
    training: dict,
    results: dict[str, float] | None = None,
    baselines: dict[str, float] | None = None,
) -> None:
    """The released encoder (``SSLModel``) in ``output_dir`` and the full ``SSLForPreTraining`` in
    ``output_dir/pretraining``, each with its model card (``training``: the run's facts, ``results``: its metrics,
    ``baselines``: the references shown beside them),
    written into one staging directory and moved into place only once all are written: a failure leaves the previous
    files."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    targets = {output: model.released_model(), output / "pretraining": model}
    with tempfile.TemporaryDirectory(dir=output, prefix=".partial_") as tmp:
        staged = []
        for index, (target, net) in enumerate(targets.items()):
            staging = Path(tmp) / str(index)
            staging.mkdir()
            save_model_card(net.model_card(training, results, baselines=baselines), staging)
            net.save_pretrained(staging)
            staged.append((staging, target))
        for staging, target in staged:
            move_into(staging, target)


def tracker_config(values: dict) -> dict:
    """``values`` as trackers take them: numbers, strings and booleans kept, anything else as its string."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in values.items()}


def init_trackers(accelerator: Accelerator, project: str, hparams: dict) -> None:
    """Start the run's trackers (``--log-with``) and record its ``hparams``, TensorBoard's in the run's own event
    file: Accelerate's ``store_init_configuration`` would add an empty second run (``SummaryWriter.add_hparams``
    writes into a new time-stamped subdirectory) and another folder holding only ``hparams.yml``."""
    accelerator.init_trackers(project)
    values = tracker_config(hparams)
    for tracker in accelerator.trackers:
        if isinstance(tracker, TensorBoardTracker):
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            for summary in hparams_summaries(values, metric_dict={}):
                tracker.writer.file_writer.add_summary(summary)
            tracker.writer.flush()
        else:
            tracker.store_init_configuration(values)


def _flat_hparams(args: PretrainArguments, model: SSLForPreTraining) -> dict:
    return {**asdict(args), **model.config.method_kwargs, "method": model.config.method}


def _per_process_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"per_process_{rank}.safetensors"


def save_per_process_buffers(method: SSLMethod, directory: Path, rank: int, world_size: int) -> None:
    """This process's values of the method's ``per_process_buffers`` (e.g. SwAV's queue) into its own file."""
    tensors = {name: method.get_buffer(name).detach().cpu().contiguous() for name in method.per_process_buffers}
    save_file(tensors, _per_process_file(directory, rank), metadata={"world_size": str(world_size)})


def load_per_process_buffers(method: SSLMethod, directory: Path, rank: int, world_size: int) -> None:
    """Restore this process's ``per_process_buffers`` from a checkpoint written by as many processes."""
    path = _per_process_file(directory, rank)
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {path.name}: it was written by fewer than {world_size} processes; resume with the "
            "number of processes that wrote it"
        )
    for name, value in load_file(path).items():
        method.get_buffer(name).copy_(value)


def remaining_batches_of_epoch(run, dataset) -> tuple[int, object]:
    """``(epoch, batches)`` of the epoch holding ``run.state.step``: the dataset's views and the loader's order set
    for that epoch, and the micro-batches already consumed before a resume skipped. ``run`` has ``state.step``,
    ``steps_per_epoch``, ``loader``, ``accelerator`` and ``args.gradient_accumulation_steps``."""
    epoch = run.state.step // run.steps_per_epoch
    dataset.set_epoch(epoch)
    run.loader.set_epoch(epoch)
    seen = (run.state.step - epoch * run.steps_per_epoch) * run.args.gradient_accumulation_steps
    return epoch, run.accelerator.skip_first_batches(run.loader, seen) if seen else run.loader


def seeded_accelerator(args) -> Accelerator:
    """The Accelerator of a run (``args``: ``mixed_precision``, ``gradient_accumulation_steps``, ``log_with``,
    ``output_dir``, ``seed``) with a seedable sampler, so the data order is a function of the seed and the epoch
    (exact resume); the global RNGs are seeded too. CPU when no GPU is visible."""
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.log_with,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    return accelerator


class Throughput:
    """Images per second and the share of step time spent waiting for data, over the steps since the last ``reset``.

    ``timed(batches)`` iterates ``batches`` and adds the time blocked in each ``next`` (the loader's workers behind,
    the host-to-device copy) to ``waiting``; ``step(images)`` ends a step that began with the first such wait after
    the previous one and counts its images (the Pretrainer counts those of all processes, which step together). Step
    time is this process's wall-clock time, so it includes the GPU's work where the step waits for it (the loss's
    ``item()``); kNN monitoring and checkpoints between steps are not part of it."""

    def __init__(self):
        self.reset()
        self.started: float | None = None

    def reset(self) -> None:
        self.images, self.seconds, self.waiting = 0, 0.0, 0.0

    def timed(self, batches: Iterable) -> Iterator:
        start = time.perf_counter()
        iterator = iter(batches)  # starting the workers counts as waiting too
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - start
            if self.started is None:
                self.started = start
            yield batch
            start = time.perf_counter()

    def step(self, images: int) -> None:
        self.seconds += time.perf_counter() - self.started
        self.images += images
        self.started = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def data_wait_fraction(self) -> float:
        return min(1.0, self.waiting / self.seconds)

    def metrics(self) -> dict[str, float]:
        """``perf/images_per_s`` and ``perf/data_wait_fraction`` for the trackers."""
        return {"perf/images_per_s": self.images_per_second, "perf/data_wait_fraction": self.data_wait_fraction}


def loader_batches(batches: Iterable) -> Iterator:
    """``batches``, with the loader's error for a worker process that died (killed by a signal, most often the
    kernel's out-of-memory killer) raised as one sentence naming what to do."""
    try:
        yield from batches
    except RuntimeError as err:
        if not str(err).startswith("DataLoader worker (pid"):
            raise
        raise TrainingError(
            f"a data-loading worker process died ({str(err).strip().rstrip('.')}), most often because the machine ran "
            "out of memory: lower --num-workers or --batch-size and continue with --resume latest"
        ) from None


class DivergenceGuard:
    """Stops a run at the first optimizer step whose loss, or whose weights after the step (parameters and floating
    buffers of ``model``, after the momentum updates; a non-finite gradient makes them so), are not finite on any
    process, before that step is checkpointed or saved; the message names the step and the last finite loss, and
    ``hint`` says what to change. ``check`` reads the step's values from the device once (the loss the progress bar
    shows needs it anyway); with several processes it also averages them, so that all stop together."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, output_dir: str, hint: str):
        self.accelerator, self.output_dir, self.hint = accelerator, output_dir, hint
        buffers = [buffer for buffer in model.buffers() if buffer.is_floating_point()]
        self.tensors = [*model.parameters(), *buffers]
        self.last_finite: tuple[int, float] | None = None  # (step, loss averaged over the processes)

    def check(self, step: int, loss: torch.Tensor) -> float:
        """This process's ``loss`` of optimizer step ``step``, or ``TrainingError`` when the loss or the weights of
        any process are not finite."""
        largest = get_total_norm(self.tensors, norm_type="inf")  # max |w|: NaN propagates, no overflow
        values = torch.stack([loss.detach().float(), largest.float().to(loss.device)])
        local_loss, largest = values.tolist()
        mean_loss = local_loss
        if self.accelerator.num_processes > 1:
            mean_loss, largest = self.accelerator.reduce(values.clone(), reduction="mean").tolist()
        if math.isfinite(mean_loss) and math.isfinite(largest):
            self.last_finite = (step, mean_loss)
            return local_loss
        what = f"the loss is {mean_loss}" if not math.isfinite(mean_loss) else "the weights are not finite after it"
        last = "no step had a finite loss"
        if self.last_finite is not None:
            last = f"the last finite loss was {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
        found = checkpoint_dirs(self.output_dir)
        kept = f"the last checkpoint, {found[-1]} (finite weights), stays" if found else "there is no checkpoint"
        raise TrainingError(
            f"training diverged at optimizer step {step}: {what} ({last}); no final model was written and {kept}: "
            f"{self.hint}"
        )


class Pretrainer:
    """One pretraining run: ``Pretrainer(args).run()``. Built on Accelerate, so the same object runs on one CPU,
    under ``torchrun`` (gloo) and under ``accelerate launch``."""

    def __init__(self, args: PretrainArguments):
        self.args = args
        check_writable(args.output_dir)
        self.accelerator = seeded_accelerator(args)
        model = build_model(args)
        self.hparams = model.method.hparams
        if self.hparams.sync_batch_norm and self.accelerator.num_processes > 1:
            global_batch_norm(model, cuda=self.accelerator.device.type == "cuda")
        self.epochs = args.epochs if args.epochs is not None else self.hparams.epochs
        self.dataset = load_image_dataset(
            args.data, "train", image_column=args.image_column, label_column=args.label_column
        )
        model.method.bind_dataset(len(self.dataset))  # before prepare() and before any resume (run())
        recipe = model.method.view_recipe()
        self.deferred = None if args.augment_on is None else DeferredViews(recipe, model.config.method)
        if args.augment_on == "cuda" and self.accelerator.device.type != "cuda":
            raise ValueError(f"--augment-on cuda needs a GPU: this run trains on {self.accelerator.device}")
        self.augment_device = self.accelerator.device if args.augment_on == "cuda" else torch.device("cpu")
        self.views = ViewDataset(self.dataset, recipe if self.deferred is None else self.deferred, args.seed)
        global_batch = args.batch_size * self.accelerator.num_processes
        if len(self.dataset) < global_batch:
            raise ValueError(
                f"{args.data!r} has {len(self.dataset)} images, fewer than one batch of {global_batch} "
                f"({args.batch_size} per process x {self.accelerator.num_processes}): lower --batch-size"
            )
        loader = DataLoader(
            self.views,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=recipe.collate,
            generator=torch.Generator().manual_seed(args.seed),  # a new iterator must not draw from the global RNG
            **loader_options(args.num_workers, pin_memory=self.accelerator.device.type == "cuda"),
        )
        self.images_per_step = global_batch * args.gradient_accumulation_steps
        self.peak_lr = args.lr if args.lr is not None else scaled_learning_rate(self.hparams, self.images_per_step)
        optimizer = build_optimizer(model.method, self.peak_lr)
        unbroadcast = (*model.method.per_process_buffers, *model.method.replicated_buffers)
        if unbroadcast:  # DDP must not broadcast rank 0's values over them
            model._ddp_params_and_buffers_to_ignore = [f"method.{name}" for name in unbroadcast]
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.method = self.accelerator.unwrap_model(self.model).method
        self.steps_per_epoch = len(self.loader) // args.gradient_accumulation_steps
        self.total_steps = self.epochs * self.steps_per_epoch
        self.warmup_steps = warmup_steps(self.hparams.warmup_epochs, self.steps_per_epoch, self.total_steps)
        self.last_step = min(self.total_steps, args.max_steps or self.total_steps)
        self.state = TrainingState()
        config = self.accelerator.unwrap_model(self.model).config
        self.monitor = monitor_datasets(args, self.dataset, self.method.eval_transform(config))
        self.losses: list[float] = []
        self.throughput = Throughput()
        self.guard = DivergenceGuard(
            self.accelerator,
            self.accelerator.unwrap_model(self.model),
            args.output_dir,
            "lower --lr, or check the --set values (a temperature near 0 overflows the loss)",
        )

    def training_facts(self, model: SSLForPreTraining) -> dict:
        """What this run trained with, for the model card: data, epochs and optimizer steps done (and the schedule's
        epochs when ``max_steps`` stopped it earlier), images per process and step, processes, accumulation, the peak
        learning rate, the seed, then the method's hyperparameters without its default ``epochs`` and base ``lr``."""
        args, steps = self.args, self.state.step
        epochs = steps / self.steps_per_epoch
        facts = {"data": args.data, "epochs": int(epochs) if epochs.is_integer() else round(epochs, 3), "steps": steps}
        if steps < self.total_steps:
            facts["schedule_epochs"] = self.epochs
        facts |= {
            "batch_size": args.batch_size,
            "processes": self.accelerator.num_processes,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "lr": self.peak_lr,
            "seed": args.seed,
        }
        return facts | {k: v for k, v in model.config.method_kwargs.items() if k not in ("epochs", "lr")}

    def knn_accuracy(self) -> float | None:
        """Weighted-kNN top-1 of the released encoder (computed on the main process); ``None`` without labels."""
        accuracy = None
        if self.monitor is not None and self.accelerator.is_main_process:
            with torch.random.fork_rng(devices=[]):  # the monitor must not change training's random stream
                released = self.accelerator.unwrap_model(self.model).released_model()
                accuracy = knn_evaluate(
                    released, *self.monitor, k=self.args.knn_k, progress=False, num_workers=self.args.num_workers
                )
        self.accelerator.wait_for_everyone()
        return accuracy

    def record_knn(self, bar: tqdm) -> None:
        accuracy = self.knn_accuracy()
        if accuracy is None:
            return
        self.state.knn_history.append((self.state.step, accuracy))
        epoch = self.state.step / self.steps_per_epoch
        bar.write(f"step {self.state.step} (epoch {epoch:.2f}): kNN top-1 (k={self.args.knn_k}) {accuracy:.4f}")
        self.log({"monitor/knn_top1": accuracy})

    def log(self, values: dict) -> None:
        if self.args.log_with:
            self.accelerator.log(values, step=self.state.step)

    def learning_rate(self, progress: TrainingProgress) -> float:
        """The method's ``lr_schedule``: warm-up + cosine per step, the cosine set once per epoch (SimSiam's
        ``adjust_learning_rate``: ``0.5 (1 + cos(π epoch / epochs))`` for the whole epoch), or, after the per-step
        warm-up, the step schedule per epoch or the exponential one per ``lr_decay_images`` images."""
        hp = self.hparams
        start = hp.warmup_start_ratio * self.peak_lr
        if hp.lr_schedule in ("step", "exponential"):
            if progress.step < self.warmup_steps:  # SimMIM's MultiStepLRScheduler warms up per step first
                return warmup_learning_rate(progress.step, self.warmup_steps, self.peak_lr, start)
            if hp.lr_schedule == "exponential":  # Counting: x0.9 every 10K iterations (of 1024 images)
                return self.peak_lr * hp.lr_decay_factor ** (progress.step * self.images_per_step // hp.lr_decay_images)
            return step_learning_rate_at(progress.epoch, self.peak_lr, hp.lr_milestones, hp.lr_decay_factor)
        minimum = max(hp.min_lr, hp.min_lr_ratio * self.peak_lr)
        step = progress.epoch * self.steps_per_epoch if hp.lr_schedule == "cosine_epoch" else progress.step
        return learning_rate_at(step, self.total_steps, self.warmup_steps, self.peak_lr, minimum, start)

    def set_schedules(self, progress: TrainingProgress) -> None:
        """Learning rate (times each group's ``lr_scale``; the peak for ``fixed_lr`` groups), weight decay of the
        decayed groups (times each group's ``weight_decay_scale``), and the method's own schedules."""
        lr = self.learning_rate(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = (self.peak_lr if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)
            if group["weight_decay"] > 0:
                group["weight_decay"] = self.method.weight_decay_at(progress) * group.get("weight_decay_scale", 1.0)
        self.method.on_step_start(progress)

    def train_epoch(self, bar: tqdm) -> None:
        """Optimizer steps until the end of the current epoch (or ``last_step``), skipping batches already seen."""
        accelerator, state = self.accelerator, self.state
        epoch, batches = remaining_batches_of_epoch(self, self.views)
        micro_losses = []
        for batch in self.throughput.timed(loader_batches(batches)):
            progress = TrainingProgress(state.step, self.total_steps, self.steps_per_epoch)
            with accelerator.accumulate(self.model):
                self.set_schedules(progress)
                if self.deferred is not None:
                    batch = self.deferred.apply(batch, self.augment_device)
                loss = self.model(batch).loss
                accelerator.backward(loss)
                micro_losses.append(loss.detach())
                if accelerator.sync_gradients:
                    accelerator.unscale_gradients()
                    self.method.on_before_optimizer_step(progress)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            pairs = self.method.momentum_pairs()
            if pairs:
                update_momentum_pairs(pairs, self.method.momentum_at(progress))
            self.method.on_step_end(progress)
            self.losses.append(self.guard.check(state.step + 1, torch.stack(micro_losses).mean()))
            micro_losses = []
            state.step += 1
            speed = self.throughput
            speed.step(self.images_per_step)
            bar.update(1)
            bar.set_postfix(
                loss=f"{self.losses[-1]:.4f}",
                epoch=epoch,
                img_per_s=f"{speed.images_per_second:.1f}",
                data_wait=f"{speed.data_wait_fraction:.0%}",
            )
            if state.step % self.args.log_every == 0:
                lr = self.optimizer.param_groups[0]["lr"]
                self.log({"train/loss": self.losses[-1], "train/lr": lr, **speed.metrics()})
                speed.reset()
            end_of_epoch = state.step % self.steps_per_epoch == 0
            knn_due = self.args.knn_every > 0 and (state.step // self.steps_per_epoch) % self.args.knn_every == 0
            if (end_of_epoch and knn_due) or state.step == self.last_step:
                self.record_knn(bar)
            if state.step % self.args.checkpoint_every == 0 or state.step == self.last_step:
                checkpoint = {"trainer": state.state_dict(), "run": run_identity(self.args, accelerator.num_processes)}
                save_checkpoint(
                    accelerator, self.args.output_dir, state.step, self.args.keep_checkpoints, checkpoint,
                    self.write_per_process,
                )  # fmt: skip
            if end_of_epoch or state.step >= self.last_step:
                return

    def write_per_process(self, directory: Path) -> None:
        if self.method.per_process_buffers:
            accelerator = self.accelerator
            save_per_process_buffers(self.method, directory, accelerator.process_index, accelerator.num_processes)

    def run(self) -> PretrainResult:
        args, accelerator, state = self.args, self.accelerator, self.state
        check_new_output(args.output_dir, args.resume)
        checkpoint = restore_checkpoint(
            accelerator, args.resume, args.output_dir, run_identity(args, accelerator.num_processes), state
        )
        if checkpoint is not None and self.method.per_process_buffers:
            load_per_process_buffers(self.method, checkpoint, accelerator.process_index, accelerator.num_processes)
        if args.log_with:
            init_trackers(accelerator, "sslhub", _flat_hparams(args, accelerator.unwrap_model(self.model)))
        if state.step == 0:
            state.knn_random_init = self.knn_accuracy()
            if state.knn_random_init is not None:
                accelerator.print(f"kNN top-1 (k={args.knn_k}) at random init: {state.knn_random_init:.4f}")
        show = args.progress and accelerator.is_main_process
        with tqdm(
            total=self.last_step, initial=state.step, disable=not show, desc=f"pretrain {self.method.name}"
        ) as bar:
            self.model.train()
            while state.step < self.last_step:
                self.train_epoch(bar)
        model = accelerator.unwrap_model(self.model)
        if accelerator.is_main_process:
            results = baselines = None
            if state.knn_history:
                results = {f"knn_top1_k{args.knn_k}": state.knn_history[-1][1]}
                baselines = {f"knn_top1_k{args.knn_k}_at_random_init": state.knn_random_init}
            save_final_models(model, args.output_dir, self.training_facts(model), results, baselines)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return PretrainResult(
            args.output_dir,
            state.step,
            self.losses,
            state.knn_random_init,
            state.knn_history,
            accelerator.num_processes,
            model,
        )


def pretrain(args: PretrainArguments) -> PretrainResult:
    """Pretrain ``args.model`` on ``args.data`` and save it; see ``PretrainArguments`` for the options."""
    return Pretrainer(args).run()
