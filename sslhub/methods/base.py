"""The method contract (DESIGN.md §5): what one file in ``sslhub/methods/`` declares so that the model, the trainer,
conversion, export, evaluation and the model card work for it without naming it.

A method is an ``SSLMethod`` subclass registered with ``@register_method("id")``. It owns:

- ``Hparams``: a ``MethodHparams`` dataclass with the paper's defaults, one ``hparam(default, help)`` per field;
- its encoder: ``build_encoder(config)`` (default: a timm backbone + pooling, ``TimmEncoder``) and which of its modules
  is released (``released_encoder``); ``SSLModel`` holds exactly what ``build_encoder`` builds;
- its data: ``view_recipe()`` (a ``ViewRecipe`` making the views and extras, and collating them into a ``Batch``),
  ``eval_transform(config)`` (the evaluation pre-processing of its encoder) and ``input_transform(config)`` (the
  final steps every pre-processing of its encoder's input ends with: normalised RGB, or CMC's Lab);
- its objective: ``forward(batch) -> MethodOutput``; per-step schedules (``on_step_start``), gradient edits
  (``on_before_optimizer_step``), momentum pairs that the trainer updates once per optimizer step
  (``momentum_pairs`` / ``momentum_at``), buffers that stay per process (``per_process_buffers``), buffers the
  method itself keeps identical on every process (``replicated_buffers``, e.g. a memory bank), frozen auxiliary
  networks (``auxiliary_networks`` / ``load_auxiliary_weights``);
- its dataset-size hook: ``bind_dataset(num_samples)``, which the trainer calls with the training set's size before
  training (a memory bank of one row per image allocates itself there);
- its declarations: ``checkpoint_layouts`` (the authors' files), ``linear_recipe``, ``export_targets``, a tiny
  configuration for the contract tests (``tiny_preset`` / ``tiny_overrides``), and its presets and releases
  (``register_preset`` / ``register_pretrained`` in its module).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torchvision.transforms import v2

from sslhub.arguments import option
from sslhub.backbones import Encoder, TimmEncoder
from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout
from sslhub.probes import LinearRecipe
from sslhub.transforms import BICUBIC, ViewRecipe, eval_transform, normalize

if TYPE_CHECKING:
    from sslhub.configuration import SSLConfig

LR_SCHEDULES = ("cosine", "cosine_epoch", "step", "exponential")
LR_SCALINGS = ("linear", "sqrt")


hparam = option  # a hyperparameter field: its default and one line of help (``sslhub hparams MODEL`` shows them)

SCALAR_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the field annotation ``annotation``: bool, int (not a bool; numpy's too), float (any
    finite real number), str, ``X | None``, ``tuple[X, Y]`` / ``tuple[X, ...]`` (a tuple or a JSON list). Other
    annotations are not checked."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(value) == len(args) and all(_matches(item, arg) for item, arg in zip(value, args, strict=True))
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    """``annotation`` in words, for an error message: "a finite number or None", "a list of 2 items (...)"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if annotation is type(None):
        return "None"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of items that are each {_describe(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(arg) for arg in args)})"
    return SCALAR_KINDS.get(annotation, str(annotation))


def lower_bound(name: str, annotation: Any) -> tuple[int, bool] | None:
    """(bound, inclusive) that every method's hyperparameter ``name`` keeps, ``None`` when it has none here: the
    learning rate and temperatures (each divides logits) are > 0; weight decay, the final learning rate and the
    warm-up >= 0; the epochs and integer sizes (``*_size``: queue, tiles, patches, vocabulary) >= 1."""
    if name == "lr" or "temperature" in name or name.endswith("_temp"):
        return 0, False
    if name in ("weight_decay", "min_lr", "warmup_epochs"):
        return 0, True
    if name == "epochs" or (name.endswith("_size") and annotation in (int, int | None)):
        return 1, True
    return None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass
class MethodHparams:
    """Optimisation recipe shared by all methods; each method subclasses it with the paper's defaults.

    ``lr`` is the base learning rate for a batch of ``lr_batch_size`` images; the trainer scales it with the real
    batch size, linearly (Goyal et al. 2017, as the official MoCo, DINO and MAE code do) or by its square root
    (``lr_scaling="sqrt"``, DINOv2, SimCLR). Parameter groups may carry an ``lr_scale`` (layer-wise decay, Barlow
    Twins' biases) and ``fixed_lr`` (the group stays at the peak learning rate, SimSiam's predictor).
    """

    optimizer: str = hparam("sgd", "optimizer: 'sgd', 'adamw', 'lars' or 'larc' (sslhub.optim.OPTIMIZERS)")
    lr: float = hparam(0.03, "base learning rate per lr_batch_size images")
    lr_batch_size: int = hparam(256, "batch size that lr is given for")
    min_lr: float = hparam(0.0, "final learning rate of the cosine schedule")
    min_lr_ratio: float = hparam(0.0, "final learning rate as a fraction of the peak, when larger than min_lr")
    warmup_epochs: float = hparam(0.0, "linear warm-up epochs (at most a quarter of the run, see MAX_WARMUP_FRACTION)")
    warmup_start_ratio: float = hparam(0.0, "learning rate at the start of the warm-up, as a fraction of the peak")
    weight_decay: float = hparam(1e-4, "weight decay (the decayed groups)")
    weight_decay_end: float | None = hparam(None, "final weight decay of a cosine schedule (None: constant)")
    sgd_momentum: float = hparam(0.9, "momentum of SGD / LARS")
    betas: tuple[float, float] = hparam((0.9, 0.999), "AdamW betas")
    clip_grad: float | None = hparam(None, "gradient clipping threshold (None: no clipping)")
    epochs: int = hparam(200, "pretraining epochs of the paper's recipe")
    lr_schedule: str = hparam(
        "cosine",
        "'cosine' (warm-up then half-cosine, per step), 'cosine_epoch' (half-cosine set once per epoch), 'step' "
        "(x lr_decay_factor at each of lr_milestones, after the warm-up) or 'exponential' (x lr_decay_factor every "
        "lr_decay_images training images, after the warm-up)",
    )
    lr_milestones: tuple[int, ...] = hparam((), "epochs at which the 'step' schedule multiplies lr by lr_decay_factor")
    lr_decay_factor: float = hparam(0.1, "factor of each decay of the 'step' and 'exponential' schedules")
    lr_decay_images: int = hparam(0, "the 'exponential' schedule decays lr once every this many training images")
    lr_scaling: str = hparam("linear", "'linear' or 'sqrt' scaling of lr with the batch size")
    sync_batch_norm: bool = hparam(
        False, "BatchNorm statistics of the global batch when training on several processes (SyncBN / global BN)"
    )

    def __post_init__(self):
        """Every field against its annotation, then the bounds shared by all methods: ``lower_bound``.
        Method-specific bounds live in each method's ``__post_init__``, after ``super().__post_init__()``."""
        types_ = _field_types(type(self))
        for f in dataclasses.fields(self):
            value, bound = getattr(self, f.name), lower_bound(f.name, types_[f.name])
            if not _matches(value, types_[f.name]):
                raise ValueError(f"expected {_describe(types_[f.name])} for {f.name}, got {value!r}")
            if bound is not None and value is not None and (value < bound[0] or (value == bound[0] and not bound[1])):
                raise ValueError(f"{f.name} must be {'>=' if bound[1] else '>'} {bound[0]}, got {value}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling {self.lr_scaling!r}: expected one of {LR_SCALINGS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: expected one of {LR_SCHEDULES}")
        if self.lr_schedule == "cosine_epoch" and self.warmup_epochs:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} has no warm-up: set warmup_epochs=0")
        if self.lr_schedule == "exponential" and self.lr_decay_images <= 0:
            raise ValueError(f"lr_schedule 'exponential' needs lr_decay_images > 0, got {self.lr_decay_images}")


@dataclass
class TrainingProgress:
    """Where training stands; schedules are functions of it."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)

    def next(self) -> TrainingProgress:
        return dataclasses.replace(self, step=self.step + 1)


@dataclass
class MethodOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class ExportTargets:
    """The transformers classes ``sslhub export --format transformers`` writes: ``encoder`` for the released encoder
    (by default ``"timm"``: the stock class of the timm backbone, ``ViTModel`` / ``ViTMSNModel`` / ``ResNetModel``),
    ``pretraining`` for the whole objective (``None``: not exported). ``sslhub.export`` knows how to write each class
    it names."""

    encoder: str | None = "timm"
    pretraining: str | None = None


def cosine_schedule(start: float, end: float, progress: TrainingProgress) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (last step), as DINO's ``cosine_scheduler``."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress.fraction))


@torch.no_grad()
def update_momentum_pairs(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """θ_target ← m θ_target + (1 - m) θ_online for every (online, target) pair of modules (parameters only, as MoCo's
    key encoder and DINO's teacher): MoCo eq. 2, BYOL eq. 1, DINO §3.1."""
    online = [p for source, _ in pairs for p in source.parameters()]
    target = [p for _, copy in pairs for p in copy.parameters()]
    if len(online) != len(target):
        raise ValueError(f"momentum pairs differ in size: {len(online)} online vs {len(target)} target parameters")
    if target:
        torch._foreach_lerp_(target, online, 1 - momentum)


def batch_norm_exempt_groups(method: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """VISSL's ``regularize_bn: False`` with ``regularize_bias: True`` (RotNet, Jigsaw): BatchNorm weights and biases
    without weight decay, every other trainable parameter (other biases included) with ``weight_decay``."""
    norms = {id(p) for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    params = [p for p in method.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in norms], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in norms], "weight_decay": 0.0},
    ]


class SSLMethod(nn.Module):
    """A self-supervised objective: its networks, its loss on a ``Batch`` and its per-step updates (module docstring).

    Subclasses set ``Hparams``, ``paper``, ``arxiv``, ``citation``, ``released``, ``linear_recipe``,
    ``tiny_preset``; implement ``forward``, ``released_encoder`` and ``view_recipe``; and override the hooks they
    need.
    """

    name: ClassVar[str]
    Hparams: ClassVar[type[MethodHparams]] = MethodHparams
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    released: ClassVar[str] = ""
    default_pooling: ClassVar[str | None] = None
    # The resize of ``eval_transform``: timm's / DINO's bicubic, or torchvision's ``Resize(256)`` default (bilinear) of
    # the authors' linear evaluation.
    eval_interpolation: ClassVar[v2.InterpolationMode] = BICUBIC
    no_weight_decay: ClassVar[tuple[str, ...]] = ()  # parameter names AdamW does not decay (the authors' skip list)
    decay_norms_and_biases: ClassVar[bool] = False
    linear_recipe: ClassVar[LinearRecipe | None] = None
    checkpoint_layouts: ClassVar[tuple[CheckpointLayout, ...]] = ()
    export_targets: ClassVar[ExportTargets] = ExportTargets()
    per_process_buffers: ClassVar[tuple[str, ...]] = ()
    # Buffers the method keeps equal on every process itself (it applies the same update everywhere): DDP must not
    # broadcast rank 0's copy over them every step; unlike per_process_buffers they are saved once, in the model.
    replicated_buffers: ClassVar[tuple[str, ...]] = ()
    tiny_preset: ClassVar[str] = ""
    tiny_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: SSLConfig):
        super().__init__()
        self.config = config
        self.hparams = self.Hparams(**config.method_kwargs)

    # ---- declarations ------------------------------------------------------------------------------------------
    @classmethod
    def hparam_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls.Hparams)}

    @classmethod
    def hparam_help(cls) -> dict[str, str]:
        """Each hyperparameter's help line: the field's own, else that of the field it overrides in a parent
        dataclass (a subclass that only changes a default keeps the help); empty where none has one."""
        help_text: dict[str, str] = {}
        for klass in reversed(cls.Hparams.__mro__):
            if dataclasses.is_dataclass(klass):
                for f in dataclasses.fields(klass):
                    help_text[f.name] = f.metadata.get("help") or help_text.get(f.name, "")
        return {f.name: help_text[f.name] for f in dataclasses.fields(cls.Hparams)}

    @classmethod
    def validate_hparams(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """All hyperparameters with defaults filled in; unknown names raise a ``ValueError`` listing the valid ones."""
        unknown = set(kwargs) - cls.hparam_names()
        if unknown:
            raise ValueError(
                f"Unknown hyperparameter(s) {sorted(unknown)} for method {cls.name!r}; "
                f"valid: {sorted(cls.hparam_names())}"
            )
        hparams = cls.Hparams(**kwargs)
        values = dataclasses.asdict(hparams)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def card_info(cls) -> dict[str, str]:
        """What the model card says about the method."""
        return {"paper": cls.paper, "arxiv": cls.arxiv, "citation": cls.citation, "released_encoder": cls.released}

    @classmethod
    def get_linear_recipe(cls) -> LinearRecipe:
        """The official linear-probe recipe of the method; a method without one is an error, never a default."""
        if cls.linear_recipe is None:
            raise ValueError(
                f"method {cls.name!r} declares no linear-probe recipe; give the recipe's values (epochs, lr, batch "
                "size) explicitly or use the L-BFGS probe (`sslhub eval linear --method lbfgs`)"
            )
        return cls.linear_recipe

    # ---- encoder -----------------------------------------------------------------------------------------------
    @classmethod
    def build_encoder(cls, config: SSLConfig, **backbone_overrides) -> Encoder:
        """The encoder this method trains and releases, as ``SSLModel`` holds it: by default the config's timm
        backbone (``backbone_kwargs`` + ``backbone_overrides``, e.g. a drop-path rate for a student) pooled as
        ``config.pooling``, else the method's ``default_pooling``, else the backbone's."""
        kwargs = {**config.backbone_kwargs, **backbone_overrides}
        return TimmEncoder(config.backbone, config.pooling or cls.default_pooling, **kwargs)

    @classmethod
    def input_transform(cls, config: SSLConfig) -> list[Callable]:
        """The steps that end every pre-processing of the released encoder's input (evaluation, fine-tuning): an RGB
        image after its crops and colour changes -> the input tensor. Default: to a float tensor, normalised with the
        config's mean and std; CMC: to normalised L*a*b* (``sslhub.transforms.lab_input``)."""
        return normalize(config.image_mean, config.image_std)

    @classmethod
    def eval_transform(cls, config: SSLConfig) -> Callable:
        """The evaluation pre-processing of the released encoder: RGB PIL image -> input tensor (default: resize,
        centre crop, then ``input_transform``)."""
        return eval_transform(
            config.image_size, config.image_mean, config.image_std, None, cls.eval_interpolation,
            cls.input_transform(config),
        )  # fmt: skip

    @property
    def released_encoder(self) -> Encoder:
        """The encoder the authors release (MoCo: query, DINO: teacher, MAE: encoder); same class and keys as
        ``build_encoder(config)``. Default: the method's ``encoder``."""
        encoder = getattr(self, "encoder", None)
        if not isinstance(encoder, Encoder):
            raise NotImplementedError(f"{type(self).__name__} has no `encoder`: it must say which encoder it releases")
        return encoder

    # ---- data and objective ------------------------------------------------------------------------------------
    def view_recipe(self) -> ViewRecipe:
        """The paper's augmentation recipe: ``PIL image -> Views``, and the collation of its samples."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> MethodOutput:
        raise NotImplementedError

    def bind_dataset(self, num_samples: int) -> None:
        """Called by the trainer with the number of training images, after the dataset is loaded and before the
        model is wrapped for distributed training or a checkpoint is resumed (default: nothing)."""

    def record_num_samples(self, num_samples: int, holder: str, units: str) -> bool:
        """``bind_dataset`` of a method with one ``holder`` entry per training image (InstDisc's bank rows, Exemplar's
        surrogate classes) and the hparam ``num_samples`` (0: not sized yet): records ``num_samples`` in the hparams
        and the config, so a saved model rebuilds at that size, and returns True when the per-image state must be
        built; a model sized for another dataset is an error."""
        current = self.hparams.num_samples
        if current not in (0, num_samples):
            raise ValueError(
                f"the {self.name} {holder} has {current} {units} but the training set has {num_samples} images "
                f"({units} are one per training image); start from a model with num_samples=0 (a new {holder})"
            )
        if current == num_samples:
            return False
        self.config.method_kwargs["num_samples"] = num_samples
        self.hparams = self.Hparams(**self.config.method_kwargs)
        return True

    # ---- networks updated outside the optimizer ------------------------------------------------------------------
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs that the trainer updates as ``target ← m target + (1 - m) online`` once
        per optimizer step, after the step, with ``m = momentum_at(progress)``."""
        return []

    def momentum_at(self, progress: TrainingProgress) -> float:
        """The momentum of the update after optimizer step ``progress.step``."""
        raise NotImplementedError(f"{type(self).__name__} declares momentum pairs but no momentum_at")

    def auxiliary_networks(self) -> dict[str, nn.Module]:
        """Frozen networks the objective uses but does not train (a tokenizer, a fixed teacher): never optimised,
        always in eval mode, saved in the pretraining checkpoint, never part of the released encoder."""
        return {}

    def load_auxiliary_weights(self) -> None:
        """Load the auxiliary networks' weights from the files the hyperparameters name; called for a new model
        (``create_model(..., task="pretraining")``), not when a pretraining checkpoint is loaded."""

    def train(self, mode: bool = True):
        super().train(mode)
        for network in self.auxiliary_networks().values():
            network.eval()
        return self

    # ---- optimisation ------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters (never those of the auxiliary networks). Norms and biases get no weight decay with
        AdamW (DINO, MAE), nor do the parameters named in ``no_weight_decay`` (SimMIM's class token), unless
        ``decay_norms_and_biases`` (MoCo v3); LARS leaves them out of decay and adaptation itself
        (``sslhub.optim.LARS``)."""
        frozen = {id(p) for network in self.auxiliary_networks().values() for p in network.parameters()}
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in frozen]
        if self.hparams.optimizer != "adamw" or self.decay_norms_and_biases:
            return [{"params": [p for _, p in params], "weight_decay": self.hparams.weight_decay}]
        exempt = set(self.no_weight_decay)
        decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias") and n not in exempt]
        no_decay = [p for n, p in params if p.ndim <= 1 or n.endswith(".bias") or n in exempt]
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def weight_decay_at(self, progress: TrainingProgress) -> float:
        """Weight decay for the decayed group: constant, or cosine to ``weight_decay_end`` (DINO)."""
        end = self.hparams.weight_decay_end
        return self.hparams.weight_decay if end is None else cosine_schedule(self.hparams.weight_decay, end, progress)

    def on_step_start(self, progress: TrainingProgress) -> None:
        """Set per-step schedules (temperatures) before the forward pass."""

    def on_before_optimizer_step(self, progress: TrainingProgress) -> None:
        """Edit the (unscaled, all-reduced) gradients before the update: global-norm clipping by default."""
        if self.hparams.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.parameters(), self.hparams.clip_grad)

    def on_step_end(self, progress: TrainingProgress) -> None:
        """Updates after the optimizer step and the momentum update."""
