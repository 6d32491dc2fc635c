"""What every self-supervised method provides to the model, the trainer and the model card."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from sslhub.backbones import create_backbone

if TYPE_CHECKING:
    from sslhub.configuration import SSLConfig

LR_SCHEDULES = ("cosine", "step")
LR_SCALINGS = ("linear", "sqrt")


@dataclass
class MethodHparams:
    """Optimisation recipe shared by all methods; each method subclasses it with the paper's defaults.

    ``lr`` is the base learning rate for a batch of ``lr_batch_size`` images; the trainer scales it with the real
    batch size, linearly (Goyal et al. 2017, as the official MoCo, DINO and MAE code do) or by its square root
    (``lr_scaling="sqrt"``, DINOv2). Parameter groups may carry an ``lr_scale`` (layer-wise decay). ``lr_schedule``:
    ``"cosine"`` (linear warm-up, then half-cosine to ``min_lr``) or ``"step"`` (MoCo v1: ``lr`` times 0.1 at each
    epoch of ``lr_milestones``, no warm-up). ``optimizer``: ``"sgd"``, ``"adamw"`` or ``"lars"``.
    """

    optimizer: str = "sgd"
    lr: float = 0.03
    lr_batch_size: int = 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None
    sgd_momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    epochs: int = 200
    lr_schedule: str = "cosine"
    lr_milestones: tuple[int, ...] = ()
    lr_scaling: str = "linear"

    def __post_init__(self):
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling {self.lr_scaling!r}: expected one of {LR_SCALINGS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: expected one of {LR_SCHEDULES}")
        if self.lr_schedule == "step" and self.warmup_epochs:
            raise ValueError("lr_schedule 'step' has no warm-up: set warmup_epochs=0")


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


@dataclass
class MethodOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def cosine_schedule(start: float, end: float, progress: TrainingProgress) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (last step), as DINO's ``cosine_scheduler``."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress.fraction))


class SSLMethod(nn.Module):
    """A self-supervised objective: its networks, its loss on a list of views and its per-step updates.

    Subclasses set ``Hparams`` (a ``MethodHparams`` dataclass with the paper's defaults), ``paper``,
    ``arxiv`` and ``citation``; implement ``forward(views) -> MethodOutput``, ``released_backbone`` and
    ``view_transform``; and override the step hooks they need.
    """

    name: ClassVar[str]
    Hparams: ClassVar[type[MethodHparams]] = MethodHparams
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    released: ClassVar[str] = ""
    default_pooling: ClassVar[str | None] = None
    decay_norms_and_biases: ClassVar[bool] = False

    def __init__(self, config: SSLConfig):
        super().__init__()
        self.config = config
        self.hparams = self.Hparams(**config.method_kwargs)

    # ---- hyperparameters -------------------------------------------------------------------------
    @classmethod
    def hparam_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls.Hparams)}

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

    # ---- networks --------------------------------------------------------------------------------
    def create_backbone(self, **extra) -> nn.Module:
        return create_backbone(self.config.backbone, **{**self.config.backbone_kwargs, **extra})

    @property
    def released_backbone(self) -> nn.Module:
        """The encoder the authors release (MoCo: query, DINO: teacher, MAE: encoder)."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        raise NotImplementedError

    def view_transform(self) -> Callable:
        """The paper's augmentation recipe: ``PIL image -> list of view tensors``."""
        raise NotImplementedError

    # ---- optimisation ----------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters; norms and biases get no weight decay when the recipe is AdamW (DINO, MAE) unless
        ``decay_norms_and_biases`` (MoCo v3). LARS leaves them out of weight decay itself."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.hparams.optimizer != "adamw" or self.decay_norms_and_biases:
            return [{"params": [p for _, p in params], "weight_decay": self.hparams.weight_decay}]
        decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in params if p.ndim <= 1 or n.endswith(".bias")]
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def weight_decay_at(self, progress: TrainingProgress) -> float:
        """Weight decay for the decayed group: constant, or cosine to ``weight_decay_end`` (DINO)."""
        end = self.hparams.weight_decay_end
        return self.hparams.weight_decay if end is None else cosine_schedule(self.hparams.weight_decay, end, progress)

    def on_step_start(self, progress: TrainingProgress) -> None:
        """Set per-step schedules (temperatures, momenta) before the forward pass."""

    def on_before_optimizer_step(self, progress: TrainingProgress) -> None:
        """Edit the (unscaled, all-reduced) gradients before the update: global-norm clipping by default."""
        if self.hparams.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.parameters(), self.hparams.clip_grad)

    def on_step_end(self, progress: TrainingProgress) -> None:
        """Updates after the optimizer step (e.g. teacher EMA)."""
