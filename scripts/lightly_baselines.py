"""The self-supervised methods built from lightly's own modules, as training steps for the benchmark scripts.

Each ``lightly_<method>`` wires lightly's pieces (heads of ``lightly.models.modules``, losses of ``lightly.loss``,
``lightly.models.utils.update_momentum``) the way lightly's ``examples/pytorch`` and its CIFAR-10 benchmark
(``docs/source/getting_started/benchmarks/cifar10_benchmark.py``) do, around the backbone, heads and
hyperparameters the caller chooses: ``bench_pretrain_step.py`` sizes them as the sslhub preset,
``bench_learning.py`` as lightly's CIFAR-10 benchmark. ``Step`` is one optimizer step of any of them, and of
sslhub's own trainer step.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models import utils as lightly_utils
from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
from lightly.models.modules.heads import ProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from sslhub.methods.base import TrainingProgress

Views = list[torch.Tensor]
Momentum = Callable[[TrainingProgress], float]


def no_update(progress: TrainingProgress) -> None:
    """A hook that does nothing."""


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

    forward: Callable[[Views, TrainingProgress], torch.Tensor]
    optimizer: torch.optim.Optimizer
    before_optimizer_step: Callable[[TrainingProgress], None] = no_update
    after_optimizer_step: Callable[[TrainingProgress], None] = no_update

    def __call__(self, views: Views, progress: TrainingProgress, options: Options) -> torch.Tensor:
        with options.autocast():
            loss = self.forward(views, progress)
        loss.backward()
        self.before_optimizer_step(progress)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_optimizer_step(progress)
        return loss.detach()


@dataclass
class Setup:
    """Where a lightly method runs (``options``) and how its optimizer is made from its networks."""

    options: Options
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]

    def step(
        self,
        networks: dict[str, nn.Module],
        forward: Callable[[Views, TrainingProgress], torch.Tensor],
        before_optimizer_step: Callable[[TrainingProgress], None] = no_update,
        after_optimizer_step: Callable[[TrainingProgress], None] = no_update,
    ) -> Step:
        """The step of ``networks`` (every module the forward uses: trained, momentum copies, losses with buffers),
        placed on the device; the optimizer sees the parameters that require gradients."""
        placed = self.options.place(nn.ModuleDict(networks))
        return Step(forward, self.optimizer(placed), before_optimizer_step, after_optimizer_step)


def timm_backbone(name: str, **kwargs) -> nn.Module:
    """The backbone as a lightly user builds it: plain ``timm.create_model`` with timm's own pooling."""
    return timm.create_model(name, num_classes=0, **kwargs)


def constant(value: float) -> Momentum:
    """A momentum that stays at ``value`` (lightly's CIFAR-10 benchmark: 0.99)."""
    return lambda progress: value


def cosine(start: float, end: float = 1.0) -> Momentum:
    """lightly's ``cosine_schedule`` from ``start`` to ``end`` over the run's optimizer steps."""
    return lambda progress: cosine_schedule(progress.step, progress.total_steps, start, end)


def projection_head(
    dims: tuple[int, ...], last_norm: nn.Module | None = None, activation: type[nn.Module] = nn.ReLU
) -> ProjectionHead:
    """lightly's ``ProjectionHead`` over ``dims``: [Linear, BatchNorm, ``activation``] between them, the last Linear
    followed by ``last_norm`` (the blocks of lightly's SimSiam, Barlow Twins and BYOL heads, for any depth)."""
    blocks = [
        (d_in, d_out, nn.BatchNorm1d(d_out), activation()) for d_in, d_out in zip(dims[:-2], dims[1:-1], strict=True)
    ]
    return ProjectionHead([*blocks, (dims[-2], dims[-1], last_norm, None)])


def momentum_copy(network: nn.Module) -> nn.Module:
    """A frozen copy of ``network`` (the momentum / target / teacher side)."""
    copied = copy.deepcopy(network)
    lightly_utils.deactivate_requires_grad(copied)
    return copied


# ---- the methods ---------------------------------------------------------------------------------------------------
def lightly_two_views(backbone: nn.Module, head: nn.Module, criterion: nn.Module, setup: Setup) -> Step:
    """lightly's SimCLR and Barlow Twins: one network, each of the two views its own forward,
    ``criterion(z0, z1)`` (``NTXentLoss`` / ``BarlowTwinsLoss``)."""

    def forward(views, progress):
        z0, z1 = (head(backbone(view)) for view in views)
        return criterion(z0, z1)

    return setup.step({"backbone": backbone, "head": head, "criterion": criterion}, forward)


def lightly_simsiam(backbone: nn.Module, projector: nn.Module, predictor: nn.Module, setup: Setup) -> Step:
    """lightly's SimSiam: ``NegativeCosineSimilarity`` of each view's prediction against the other view's detached
    projection, averaged over the two directions."""
    criterion = NegativeCosineSimilarity()

    def forward(views, progress):
        z0, z1 = (projector(backbone(view)) for view in views)
        p0, p1 = predictor(z0), predictor(z1)
        return 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))

    return setup.step({"backbone": backbone, "projector": projector, "predictor": predictor}, forward)


def lightly_byol(
    backbone: nn.Module, projector: nn.Module, predictor: nn.Module, momentum: Momentum, setup: Setup
) -> Step:
    """lightly's BYOL: online = backbone + projection + prediction head, target = frozen copy of backbone +
    projection head; ``NegativeCosineSimilarity`` of each view's prediction against the other view's target
    projection, averaged over the two directions; ``update_momentum`` of the target after every step."""
    online = nn.Sequential(backbone, projector)
    target = momentum_copy(online)
    criterion = NegativeCosineSimilarity()

    def forward(views, progress):
        predictions = [predictor(online(view)) for view in views]
        with torch.no_grad():
            targets = [target(view) for view in views]
        return 0.5 * (criterion(predictions[0], targets[1]) + criterion(predictions[1], targets[0]))

    def after_optimizer_step(progress):
        lightly_utils.update_momentum(online, target, m=momentum(progress))

    networks = {"online": online, "predictor": predictor, "target": target}
    return setup.step(networks, forward, after_optimizer_step=after_optimizer_step)


def lightly_moco(
    backbone: nn.Module,
    projector: nn.Module,
    criterion: nn.Module,
    momentum: Momentum,
    setup: Setup,
    symmetric: bool = False,
    shuffle_keys: bool = False,
) -> Step:
    """lightly's MoCo: query = backbone + ``MoCoProjectionHead``, key = its frozen copy, ``NTXentLoss`` with a
    memory bank as the queue, ``update_momentum`` of the key encoder after every step. ``symmetric``: the loss of
    both view orders, averaged (the CIFAR-10 benchmark); ``shuffle_keys``: ``batch_shuffle`` of the key view
    (shuffled BatchNorm, the CIFAR-10 benchmark)."""
    query = nn.Sequential(backbone, projector)
    key = momentum_copy(query)

    @torch.no_grad()
    def keys_of(images):
        if not shuffle_keys:
            return key(images)
        images, order = lightly_utils.batch_shuffle(images)
        return lightly_utils.batch_unshuffle(key(images), order)

    def forward(views, progress):
        loss = criterion(query(views[0]), keys_of(views[1]))
        return 0.5 * (loss + criterion(query(views[1]), keys_of(views[0]))) if symmetric else loss

    def after_optimizer_step(progress):
        lightly_utils.update_momentum(query, key, m=momentum(progress))

    networks = {"query": query, "key": key, "criterion": criterion}
    return setup.step(networks, forward, after_optimizer_step=after_optimizer_step)


def lightly_dino(
    backbones: tuple[nn.Module, nn.Module],
    heads: tuple[nn.Module, nn.Module],
    criterion: nn.Module,
    momentum: Momentum,
    setup: Setup,
    clip_grad: float | None = None,
) -> Step:
    """lightly's DINO: student and teacher (``backbones``, ``heads``: student first; the teacher's weights as the
    caller initialised them, frozen here), ``DINOLoss`` of the teacher's 2 global crops against the student's
    crops, one forward per crop; global-norm clipping when ``clip_grad``, ``cancel_last_layer_gradients``, and
    ``update_momentum`` of the teacher after every step."""
    student, teacher = nn.Sequential(backbones[0], heads[0]), nn.Sequential(backbones[1], heads[1])
    lightly_utils.deactivate_requires_grad(teacher)

    def forward(views, progress):
        with torch.no_grad():
            teacher_out = [teacher(view) for view in views[:2]]
        student_out = [student(view) for view in views]
        return criterion(teacher_out, student_out, epoch=progress.epoch)

    def before_optimizer_step(progress):
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(student.parameters(), clip_grad)
        heads[0].cancel_last_layer_gradients(progress.epoch)

    def after_optimizer_step(progress):
        lightly_utils.update_momentum(student, teacher, m=momentum(progress))

    networks = {"student": student, "teacher": teacher, "criterion": criterion}
    return setup.step(networks, forward, before_optimizer_step, after_optimizer_step)


def lightly_ibot(
    vits: tuple[nn.Module, nn.Module],
    heads: tuple[nn.Module, nn.Module],
    losses: tuple[nn.Module, nn.Module],
    momentum: Momentum,
    setup: Setup,
    clip_grad: float | None = None,
) -> Step:
    """lightly's iBOT (``examples/pytorch/ibot.py``): ``MaskedVisionTransformerTIMM`` student (with a mask token) and
    teacher (``vits``, student first), one ``DINOProjectionHead`` per network for class and patch tokens (``heads``),
    ``DINOLoss`` on the class tokens and ``IBOTPatchLoss`` on the masked patches of the global crops (``losses``);
    ``random_block_mask`` masks half of the global crops (ratio 0.1 - 0.5), one forward per crop."""
    student = MaskedVisionTransformerTIMM(vit=vits[0], mask_token=nn.Parameter(torch.zeros(1, 1, vits[0].embed_dim)))
    teacher = MaskedVisionTransformerTIMM(vit=vits[1])
    lightly_utils.deactivate_requires_grad(teacher)
    lightly_utils.deactivate_requires_grad(heads[1])
    cls_loss, patch_loss = losses
    grid = vits[0].patch_embed.grid_size

    def forward(views, progress):
        global_crops = torch.cat(views[:2])
        mask = lightly_utils.random_block_mask((global_crops.shape[0], *grid), device=global_crops.device)
        with torch.no_grad():
            tokens = teacher.encode(global_crops)
            teacher_cls = heads[1](tokens[:, 0]).chunk(2)
            teacher_patches = heads[1](tokens[:, 1:][mask.flatten(1)])
        with_class_token = F.pad(mask.flatten(1), (1, 0))  # lightly's mask covers the class token too
        tokens = student.encode(global_crops, mask=with_class_token)
        student_cls = [*heads[0](tokens[:, 0]).chunk(2), *(heads[0](student.encode(v)[:, 0]) for v in views[2:])]
        student_patches = heads[0](tokens[:, 1:][mask.flatten(1)])
        return cls_loss(list(teacher_cls), student_cls, epoch=progress.epoch) + patch_loss(
            teacher_patches, student_patches, mask
        )

    def before_optimizer_step(progress):
        if clip_grad is not None:
            nn.utils.clip_grad_norm_([*student.parameters(), *heads[0].parameters()], clip_grad)
        heads[0].cancel_last_layer_gradients(progress.epoch)

    def after_optimizer_step(progress):
        lightly_utils.update_momentum(student, teacher, m=momentum(progress))
        lightly_utils.update_momentum(heads[0], heads[1], m=momentum(progress))

    networks = {"student": student, "teacher": teacher, "heads": nn.ModuleList(heads), "losses": nn.ModuleList(losses)}
    return setup.step(networks, forward, before_optimizer_step, after_optimizer_step)


def lightly_swav(
    backbone: nn.Module,
    projector: nn.Module,
    prototypes: nn.Module,
    criterion: nn.Module,
    setup: Setup,
    assigned_crops: int = 2,
    queue: tuple[int, int] = (0, 0),
) -> Step:
    """lightly's SwAV (``examples/pytorch/swav.py``, ``swav_queue.py``): prototypes normalised before every forward,
    each crop its own forward through backbone, ``SwaVProjectionHead``, L2 normalisation and ``SwaVPrototypes``
    (given the step, for its ``n_steps_frozen_prototypes``); ``SwaVLoss`` with the first ``assigned_crops`` crops as
    the high-resolution ones whose Sinkhorn codes the others predict. ``queue`` = (length, first epoch): with a
    length, one ``MemoryBankModule`` per assigned crop, filled every step, its prototype scores put before the
    batch's from that epoch on."""
    length, start_epoch = queue
    banks = nn.ModuleList(
        MemoryBankModule(size=(length, prototypes.heads[0].in_features), feature_dim_first=False)
        for _ in range(assigned_crops if length else 0)
    )

    @torch.no_grad()
    def queue_scores(embeddings, progress):
        if not banks:
            return None
        stored = [bank(embedding, update=True)[1] for bank, embedding in zip(banks, embeddings, strict=True)]
        if progress.epoch < start_epoch:
            return None
        return [prototypes(features, progress.step) for features in stored]

    def forward(views, progress):
        prototypes.normalize()
        embeddings = [F.normalize(projector(backbone(view)), dim=1) for view in views]
        scores = [prototypes(embedding, progress.step) for embedding in embeddings]
        queued = queue_scores([embedding.detach() for embedding in embeddings[:assigned_crops]], progress)
        return criterion(scores[:assigned_crops], scores[assigned_crops:], queued)

    networks = {"backbone": backbone, "projector": projector, "prototypes": prototypes, "banks": banks}
    return setup.step(networks, forward)


def mae_decoder(vit: nn.Module, embed_dim: int, depth: int, num_heads: int) -> nn.Module:
    """lightly's ``MAEDecoderTIMM`` for ``vit``'s patches (deprecated in lightly 1.6, removal in 1.7)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            patch_size=vit.patch_embed.patch_size[0],
            embed_dim=vit.embed_dim,
            decoder_embed_dim=embed_dim,
            decoder_depth=depth,
            decoder_num_heads=num_heads,
        )


def lightly_mae(vit: nn.Module, decoder: nn.Module, mask_ratio: float, norm_pix_loss: bool, setup: Setup) -> Step:
    """lightly's MAE: ``MaskedVisionTransformerTIMM`` encodes the kept tokens, the decoder predicts the masked
    patches; MSE against the pixels of the masked patches, normalised per patch when ``norm_pix_loss``."""
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    patch_size = vit.patch_embed.patch_size[0]

    def forward(views, progress):
        images = views[0]
        batch, length = images.shape[0], encoder.sequence_length
        idx_keep, idx_mask = lightly_utils.random_token_mask((batch, length), mask_ratio, device=images.device)
        encoded = decoder.embed(encoder.encode(images, idx_keep=idx_keep))
        tokens = lightly_utils.repeat_token(decoder.mask_token, (batch, length))
        tokens = lightly_utils.set_at_index(tokens, idx_keep, encoded.type_as(tokens))
        prediction = decoder.predict(lightly_utils.get_at_index(decoder.decode(tokens), idx_mask))
        target = lightly_utils.get_at_index(lightly_utils.patchify(images, patch_size), idx_mask - 1)
        if norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return F.mse_loss(prediction, target)

    return setup.step({"encoder": encoder, "decoder": decoder}, forward)
