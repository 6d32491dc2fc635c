"""Context prediction (relative patch location): classify where a patch lies relative to the patch at the centre.

Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context Prediction", arXiv 1505.05192 (ICCV
2015). A patch X_2 is sampled at one of the 8 positions around a patch X_1 on a 3 x 3 grid with gaps between the
patches and a random jitter of each patch; both go through the same network ("late fusion": a shared tower per
patch, the two features concatenated, then fully connected layers) and the loss is the 8-way cross-entropy
``loss = -1/N Σ_i log softmax(W h(f(X_2^i), f(X_1^i)))[y_i]`` over the pairs, y_i the position of X_2 around X_1.

Followed (read, not recalled): MMSelfSup's ResNet-50 implementation, whose file is released (open-mmlab/mmselfsup
1.x ``configs/selfsup/relative_loc/relative-loc_resnet50_8xb64-steplr-70e_in1k.py``, ``_base_/models/relative-loc.py``,
``_base_/datasets/imagenet_relative-loc.py``, ``models/algorithms/relative_loc.py``, ``models/necks/
relative_loc_neck.py``, ``models/heads/cls_head.py``, ``datasets/transforms/processing.py RandomPatchWithLabels``,
``models/utils/data_preprocessor.py RelativeLocDataPreprocessor``; the 0.x branch's ``datasets/relative_loc.py``), and
the authors' cdoersch/deepcontext ``train.py`` for the paper's anti-shortcut pre-processing:

- views (MMSelfSup): the image resized to 292 x 292 (1.x ``Resize(scale=292)``, aspect not kept), a random 255 px
  crop, grayscale with p = 0.66 (the whole crop: MMSelfSup's colour handling against chromatic aberration), then a
  3 x 3 grid of cells of 85 px, in each a random 64 px patch (offsets 0..21 px: patches are 64 px with gaps of
  21 ± 21 px). sslhub's ``PatchGrid`` says it as the paper does: patch size P, gap G, jitter J, patch (r, c) at
  ``(r (P + G) + U{0..J}, c (P + G) + U{0..J})`` in a crop of ``3P + 2G + J`` px (64, 21, 21 -> 255);
- pairs: every image gives the centre patch and its 8 neighbours, i.e. all 8 pairs (MMSelfSup), not the paper's one
  pair per image: the release was trained so (its head's input is [neighbour, centre]), and each centre's features
  serve 8 pairs. ``views = [centre, neighbour 0, ..., neighbour 7]``, ``extras["position"]`` the 8 position ids,
  ``extras["corners"]`` the 9 patches' (top, left) in the crop (centre first). Position ids are row-major around the
  centre (0 1 2 / 3 _ 4 / 5 6 7), the paper's ``pos2lbl`` and MMSelfSup 0.x;
- network: the timm backbone on the 8B neighbours and on the B centres (two calls, as MMSelfSup's two backbone calls:
  the same BatchNorm statistics, its second call holds each centre 8 times), the pooled features concatenated
  [neighbour, centre] (2 x 2048), ``RelativeLocNeck`` fc 4096 -> BatchNorm1d (momentum 0.003) -> ReLU -> Dropout 0.5,
  then ``ClsHead`` fc 4096 -> 8; init N(0, 0.01) for the neck's fc, N(0, 0.005) for the head's, biases 0;
- optimisation: SGD lr 0.2 per 512 images (8 x 64, i.e. 4096 pairs), momentum 0.9, weight decay 1e-4 and 5e-4 on the
  neck and head (``decay_mult`` 5: groups with ``weight_decay_scale``), 5 linear warm-up epochs from 0.1 x lr (per
  step), lr x0.1 at epochs 30 and 50 of 70;
- the paper's shortcuts, off in MMSelfSup's presets and available as hyperparameters: ``color_dropping`` (deepcontext
  ``prep_image``: all channels but one random one dropped, per patch; here set to 0 in the normalised patch, as
  ``sslhub.methods.cpc_v2.augment_patches``, where the authors put uniform noise of ±0.5 / 255 after subtracting the
  kept channel's mean), ``projection`` (the paper's §3.1: every pixel multiplied by B = I - aᵀa / (a aᵀ), a = [-1, 2,
  -1], which removes the green-magenta colour axis; recalled from the paper, whose text could not be opened here),
  ``downsample_p`` (deepcontext: with p 0.33 a patch is resized to s x s px, s² uniform in [10², 95²] for 96 px
  patches (scaled here to the patch size), and back, against pixelation cues). The authors' per-patch
  mean / variance normalisation is not implemented.

Deviations: the 3 x 3 cells are 85 px with offsets 0..21 in every cell, MMSelfSup 0.x's geometry (1.x's inclusive
``mmcv.imcrop`` boxes make cells 0 and 1 86 px, offsets 0..22); grayscale is torchvision's (ITU-R 601 weights, as 0.x;
1.x averages the channels); the ImageNet mean / std of the preset's config (MMSelfSup's pretraining normalisation is
its rounding, mean (124, 117, 104), std (59, 58, 58)).

Release (``convert_mmselfsup``): the encoder is the backbone; MMSelfSup evaluates the global-average-pooled res5
feature (``pooler_output``) with a linear classifier (40.4). Its 1.x data pipeline crops ``imcrop(img, [i g, j g,
...])`` whose boxes are (x1, y1, x2, y2): its grid index i runs along the columns, so its label k is the neighbour at
column k' // 3, row k' % 3 (k' = k-th of 0..8 without 4), the transpose of sslhub's; the converter reorders the
head's rows (``MMSELFSUP_1X_ROWS``) for 1.x files (mmengine ``meta['mmengine_version']``, or no meta) and keeps them
for 0.x files (mmcv ``meta['mmcv_version']``: torchvision ``TF.crop(img, top=i g, left=j g)``, row-major).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, preview
from sslhub.conversion.loading import CheckpointError
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.methods.cpc_v2 import augment_patches
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, ViewRecipe, Views

NUM_POSITIONS = 8
CENTRE = 4  # the centre cell of the 3 x 3 grid, row-major
NEIGHBOURS = [cell for cell in range(9) if cell != CENTRE]  # position id k = the k-th of them: 0 1 2 / 3 _ 4 / 5 6 7
# sslhub head row k <- MMSelfSup 1.x row MMSELFSUP_1X_ROWS[k]: 1.x's label m is the neighbour at cell 3 (m' % 3) +
# m' // 3 (m' = NEIGHBOURS[m]: its grid index runs along the columns), the transpose of sslhub's row-major cells.
MMSELFSUP_1X_ROWS = [0, 3, 5, 1, 6, 2, 4, 7]
GREEN_MAGENTA = torch.tensor([-1.0, 2.0, -1.0])


@dataclass
class ContextPredictionHparams(MethodHparams):
    """MMSelfSup's ``relative-loc_resnet50_8xb64-steplr-70e_in1k`` (module docstring)."""

    optimizer: str = "sgd"
    lr: float = 0.2
    lr_batch_size: int = 512
    weight_decay: float = 1e-4
    epochs: int = 70
    warmup_epochs: float = 5
    warmup_start_ratio: float = 0.1
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (30, 50)
    head_weight_decay_scale: float = hparam(5.0, "weight decay of the neck and head / weight_decay (decay_mult)")
    patch_size: int = hparam(64, "side of each patch in pixels (MMSelfSup 64, the paper 96)")
    gap: int = hparam(21, "pixels between neighbouring patches before the jitter (MMSelfSup 21, the paper 48)")
    jitter: int = hparam(21, "each patch moves by 0..jitter px down and right in its cell (MMSelfSup 21, paper ±7: 14)")
    resize: int = hparam(292, "the image is resized to resize x resize before the random crop of the grid")
    grayscale_p: float = hparam(0.66, "probability that the whole crop is made grayscale (MMSelfSup's colour handling)")
    color_dropping: bool = hparam(False, "the authors' colour dropping: each patch keeps one random colour channel")
    projection: bool = hparam(False, "the paper's projection of every pixel off the green-magenta colour axis")
    downsample_p: float = hparam(0.0, "probability that a patch is down- and up-sampled (the authors' 0.33)")
    hidden_dim: int = hparam(4096, "width of the neck's fc / BatchNorm layer (RelativeLocNeck out_channels)")
    dropout: float = hparam(0.5, "dropout after the neck's ReLU")
    bn_momentum: float = hparam(0.003, "momentum of the neck's BatchNorm1d (PyTorch's convention)")

    def __post_init__(self):
        super().__post_init__()
        if min(self.patch_size, self.gap + 1, self.jitter + 1, self.hidden_dim) < 1:
            raise ValueError(
                f"patch_size ({self.patch_size}) and hidden_dim ({self.hidden_dim}) must be >= 1, gap ({self.gap}) "
                f"and jitter ({self.jitter}) >= 0"
            )
        if self.jitter > self.gap:
            raise ValueError(
                f"jitter ({self.jitter}) larger than the gap ({self.gap}) lets neighbouring patches overlap, a "
                "shortcut the gap is there to remove"
            )
        grid = PatchGrid(self.patch_size, self.gap, self.jitter).side
        if self.resize < grid:
            raise ValueError(f"resize ({self.resize}) is smaller than the patch grid's crop ({grid} = 3P + 2G + J)")
        if not all(0 <= p <= 1 for p in (self.grayscale_p, self.downsample_p, self.dropout)):
            raise ValueError("grayscale_p, downsample_p and dropout must be in [0, 1]")


# ---- the view recipe -----------------------------------------------------------------------------------------------
class PatchGrid:
    """The 3 x 3 grid of ``patch_size`` px patches with ``gap`` px between them, each shifted by U{0..jitter} px
    down and right: patch (r, c) has its top-left corner at ``(r (P + G) + dy, c (P + G) + dx)`` of a crop of
    ``side = 3P + 2G + J`` px (MMSelfSup's cells of ``side // 3`` px, in which a random P px patch)."""

    def __init__(self, patch_size: int, gap: int, jitter: int):
        self.patch_size, self.gap, self.jitter = patch_size, gap, jitter

    @property
    def side(self) -> int:
        return 3 * self.patch_size + 2 * self.gap + self.jitter

    def corners(self) -> torch.Tensor:
        """(9, 2) (top, left) of the cells row-major, jittered with torch's global generator."""
        cells = torch.arange(3) * (self.patch_size + self.gap)
        origin = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), dim=-1).reshape(9, 2)
        return origin + torch.randint(0, self.jitter + 1, (9, 2))

    def cut(self, image: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """(C, side, side) -> (9, C, P, P): the patch at each corner."""
        if tuple(image.shape[-2:]) != (self.side, self.side):
            raise ValueError(f"the patch grid takes a {self.side} px crop, got shape {tuple(image.shape)}")
        p = self.patch_size
        return torch.stack([image[:, top : top + p, left : left + p] for top, left in corners.tolist()])


def position_id(row: int, col: int) -> int:
    """The position id of the cell (row, col) of the 3 x 3 grid around the centre (1, 1): row-major, the centre
    skipped (the paper's ``pos2lbl``)."""
    return NEIGHBOURS.index(3 * row + col)


class GreenMagentaProjection:
    """The paper's projection against chromatic aberration: every RGB pixel multiplied by B = I - aᵀa / (a aᵀ) with
    a = [-1, 2, -1], the green-magenta axis removed (a float image in [0, 1], channels first)."""

    def __init__(self):
        self.matrix = torch.eye(3) - torch.outer(GREEN_MAGENTA, GREEN_MAGENTA) / GREEN_MAGENTA.dot(GREEN_MAGENTA)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,jhw->ihw", self.matrix, image.as_subclass(torch.Tensor))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def downsample_patches(patches: torch.Tensor, p: float) -> torch.Tensor:
    """deepcontext ``prep_image``: each (C, P, P) patch, with probability ``p``, resized to s x s px and back
    (bilinear), s² uniform between (10 P / 96)² and (95 P / 96)² (10 to 95 px for the authors' 96 px patches)."""
    size = patches.shape[-1]
    low, high = max(1.0, 10 * size / 96), 95 * size / 96
    out = []
    for patch in patches:
        if torch.rand(()) < p:
            side = max(1, int(math.sqrt(float(torch.rand(())) * (high**2 - low**2) + low**2)))
            small = v2.functional.resize(patch, [side, side], interpolation=BILINEAR, antialias=True)
            patch = v2.functional.resize(small, [size, size], interpolation=BILINEAR, antialias=False)
        out.append(patch)
    return torch.stack(out)


class ContextPatchViews(ViewRecipe):
    """Per image: ``image`` (resize, random crop of the grid, colour handling, normalisation) cut by ``grid``, then
    the per-patch anti-shortcut steps; the views are [centre, neighbour 0..7], ``extras`` their ``position`` ids
    (8,) and the 9 ``corners`` (centre first)."""

    def __init__(self, image, grid: PatchGrid, color_dropping: bool, downsample_p: float):
        self.image, self.grid = image, grid
        self.color_dropping, self.downsample_p = color_dropping, downsample_p

    def make_views(self, image) -> Views:
        corners = self.grid.corners()
        patches = self.grid.cut(self.image(image), corners)
        if self.downsample_p > 0:
            patches = downsample_patches(patches, self.downsample_p)
        if self.color_dropping:
            patches = augment_patches(patches[None], color_drop_p=1.0, flip_p=0.0)[0]
        order = [CENTRE, *NEIGHBOURS]
        extras = {"position": torch.arange(NUM_POSITIONS), "corners": corners[order]}
        return Views(list(patches[order]), extras)

    def __repr__(self) -> str:
        g = self.grid
        return (
            f"{type(self).__name__}({self.image}, patch_size={g.patch_size}, gap={g.gap}, jitter={g.jitter}, "
            f"color_dropping={self.color_dropping}, downsample_p={self.downsample_p})"
        )


# ---- the network ---------------------------------------------------------------------------------------------------
class RelativeLocNeck(nn.Module):
    """MMSelfSup's ``RelativeLocNeck`` on pooled features: fc (2 D -> hidden) -> BatchNorm1d -> ReLU -> Dropout."""

    def __init__(self, in_features: int, hidden_dim: int, bn_momentum: float, dropout: float):
        super().__init__()
        self.fc = nn.Linear(in_features, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim, momentum=bn_momentum)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.bn(self.fc(pairs))))


# ---- the authors' file ---------------------------------------------------------------------------------------------
def _head_rows(container) -> tuple[list[int], str]:
    """The head's row order for sslhub's position ids, and why: MMSelfSup 0.x (mmcv meta) is row-major as sslhub;
    1.x (mmengine meta) and files without meta get ``MMSELFSUP_1X_ROWS``."""
    meta = container.get("meta") if isinstance(container.get("meta"), dict) else {}
    if "mmcv_version" in meta and "mmengine_version" not in meta:
        return list(range(NUM_POSITIONS)), "MMSelfSup 0.x (meta mmcv_version): row-major labels kept"
    why = "MMSelfSup 1.x (meta mmengine_version)" if "mmengine_version" in meta else "no meta: MMSelfSup 1.x assumed"
    return MMSELFSUP_1X_ROWS, f"{why}: head rows reordered from column-major labels"


def convert_mmselfsup(container, source: str) -> Converted:
    """MMSelfSup ``RelativeLoc`` (1.x mmengine ``{'meta', 'state_dict', 'message_hub', ...}``, 0.x mmcv ``{'meta',
    'state_dict'}``, the optimizer removed by ``publish_model.py``): ``state_dict`` = ``backbone.*`` (mmcls ResNet:
    torchvision's names), ``neck.fc.*`` (hidden, 2 D), ``neck.bn.*`` (BatchNorm1d), ``head.fc_cls.*`` (8, hidden),
    whose rows are put in sslhub's position order (``_head_rows``)."""
    reader = KeyReader(entry(container, "state_dict", source), source)
    left_out = reader.leave_out("data_preprocessor.")
    backbone, neck, fc = reader.take("backbone."), reader.take("neck."), reader.take("head.fc_cls.")
    reader.finish()
    expected = {"fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    if not backbone or not expected <= set(neck) or set(fc) != {"weight", "bias"}:
        raise CheckpointError(
            f"{source}: an MMSelfSup RelativeLoc state_dict has backbone.*, neck.fc / neck.bn and head.fc_cls "
            f"weight / bias; found {len(backbone)} backbone keys, neck keys {preview(neck)}, head keys {preview(fc)}"
        )
    hidden, pair_features = neck["fc.weight"].shape
    if tuple(fc["weight"].shape) != (NUM_POSITIONS, hidden):
        raise CheckpointError(
            f"{source}: head.fc_cls.weight has shape {tuple(fc['weight'].shape)}, expected ({NUM_POSITIONS}, "
            f"{hidden}) after neck.fc.weight {(hidden, pair_features)}: not an 8-way relative-location head"
        )
    rows, order = _head_rows(container)
    method = {f"neck.{key}": value for key, value in neck.items()}
    method |= {"head.weight": fc["weight"][rows], "head.bias": fc["bias"][rows]}
    left_out += [*leftover_entries(container, {"state_dict"}), f"head.fc_cls ({order})"]
    return Converted("context_prediction_mmselfsup", backbone, method, {"encoder.backbone.": backbone},
                     {"hidden_dim": hidden}, sorted(left_out))  # fmt: skip


def _is_mmselfsup_relative_loc(container) -> bool:
    state = container.get("state_dict") if isinstance(container, dict) else None
    if not isinstance(state, dict) or "backbone.conv1.weight" not in state:
        return False
    neck, head = state.get("neck.fc.weight"), state.get("head.fc_cls.weight")
    if not (torch.is_tensor(neck) and torch.is_tensor(head) and neck.ndim == 2 and head.ndim == 2):
        return False
    return "neck.bn.weight" in state and tuple(head.shape) == (NUM_POSITIONS, neck.shape[0])


MMSELFSUP_LAYOUT = CheckpointLayout("context_prediction_mmselfsup", _is_mmselfsup_relative_loc, convert_mmselfsup)


# ---- the method ----------------------------------------------------------------------------------------------------
@register_method("context_prediction")
class ContextPrediction(SSLMethod):
    """The shared encoder on every patch, ``neck`` on [neighbour, centre] pooled features, ``head`` (8-way fc),
    cross-entropy over the 8 positions. Released: the encoder."""

    Hparams = ContextPredictionHparams
    paper = "Unsupervised Visual Representation Learning by Context Prediction (relative patch location)"
    arxiv = "1505.05192"
    citation = (
        "@InProceedings{doersch2015unsupervised,\n  author    = {Carl Doersch and Abhinav Gupta and Alexei A. "
        "Efros},\n  title     = {Unsupervised Visual Representation Learning by Context Prediction},\n  booktitle = "
        "{ICCV},\n  year      = {2015},\n}"
    )
    released = (
        "encoder backbone (pooler_output: the global-average-pooled res5 feature, which MMSelfSup's linear "
        "evaluation reads; trained on 64 px patches, evaluated on whole images)"
    )
    # MMSelfSup configs/benchmarks/classification/imagenet/resnet50_linear-8xb32-steplr-100e_in1k.py (MoCo's setting):
    # SGD lr 30 for 256 images, momentum 0.9, no weight decay, 100 epochs (steps at 60 / 80).
    linear_recipe = LinearRecipe("open-mmlab/mmselfsup resnet50_linear-8xb32-steplr-100e_in1k", 30.0, 100, 256)
    checkpoint_layouts = (MMSELFSUP_LAYOUT,)
    tiny_preset = "context_prediction_resnet18_32px"
    tiny_overrides = {"backbone": "test_resnet", "hidden_dim": 16}

    # Evaluation: MMSelfSup's linear-evaluation test pipeline: bilinear ``ResizeEdge(256)`` (PIL),
    # ``CenterCrop(224)``.
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        self.neck = RelativeLocNeck(2 * self.encoder.num_features, hp.hidden_dim, hp.bn_momentum, hp.dropout)
        self.head = nn.Linear(hp.hidden_dim, NUM_POSITIONS)  # ClsHead.fc_cls, init N(0, 0.005)
        nn.init.normal_(self.head.weight, std=0.005)
        nn.init.zeros_(self.head.bias)

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        grid = PatchGrid(hp.patch_size, hp.gap, hp.jitter)
        steps = [
            v2.Resize((hp.resize, hp.resize), interpolation=BILINEAR),
            v2.RandomCrop(grid.side),
            v2.RandomGrayscale(hp.grayscale_p),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            *([GreenMagentaProjection()] if hp.projection else []),
            v2.Normalize(mean=list(cfg.image_mean), std=list(cfg.image_std)),
            v2.ToPureTensor(),
        ]
        return ContextPatchViews(v2.Compose(steps), grid, hp.color_dropping, hp.downsample_p)

    def param_groups(self):
        """MMSelfSup's ``paramwise_cfg``: the neck and head decay ``head_weight_decay_scale`` times more (the trainer
        scales a group's weight decay by its ``weight_decay_scale``)."""
        hp = self.hparams
        heads = {id(p) for module in (self.neck, self.head) for p in module.parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if id(p) not in heads], "weight_decay": hp.weight_decay},
            {
                "params": [p for p in params if id(p) in heads],
                "weight_decay": hp.weight_decay * hp.head_weight_decay_scale,
                "weight_decay_scale": hp.head_weight_decay_scale,
            },
        ]

    def position_logits(self, neighbours: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """(8B, C, P, P) neighbours and their (B, C, P, P) centres (each repeated for its 8 neighbours, image-major)
        -> (8B, 8) logits: ``RelativeLoc.loss``'s two backbone calls, [neighbour, centre] features, neck, head."""
        neighbour_features = self.encoder(neighbours)
        centre_features = self.encoder(centres).repeat_interleave(len(neighbours) // len(centres), dim=0)
        return self.head(self.neck(torch.cat([neighbour_features, centre_features], dim=1)))

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views``: [centres, neighbours 0..7] (B, C, P, P) each, ``extras["position"]`` (B, 8) the
        neighbours' position ids (``ContextPatchViews``)."""
        position = batch.extras.get("position")
        if len(batch.views) != 1 + NUM_POSITIONS or position is None or tuple(position.shape) != (len(batch), 8):
            raise ValueError(
                f"context prediction takes {1 + NUM_POSITIONS} views (the centre patch, then its 8 neighbours) and "
                f"extras['position'] (B, 8) (ContextPatchViews); got {len(batch.views)} views, position "
                f"{None if position is None else tuple(position.shape)}"
            )
        centres = batch.views[0]
        neighbours = torch.stack(batch.views[1:], dim=1).flatten(0, 1)  # image-major: image i's 8 neighbours
        labels = position.reshape(-1).to(centres.device)
        logits = self.position_logits(neighbours, centres)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return MethodOutput(loss, {"position_accuracy": float(accuracy)})


register_preset(
    Preset(
        "context_prediction_resnet50",
        "context_prediction",
        "resnet50",
        description="Context prediction on a timm resnet50 as MMSelfSup's relative-loc_resnet50_8xb64-steplr-70e: "
        "292 px resize, 255 px crop, grayscale p 0.66, 3 x 3 grid of 64 px patches (gap 21, jitter 21), all 8 "
        "pairs per image, fc 4096-BN-ReLU-dropout-fc 8, SGD lr 0.2 per 512, steps at 30/50 of 70 epochs",
    )
)

# MMSelfSup's grid scaled by 32 / 255 for 32 px images: patches of 8 px, gap 3 and jitter 2 (64 : 21 : 21 ~ 3 : 1 : 1)
# in the whole 32 px image (3 x 8 + 2 x 3 + 2 = 32), resized to 36 px first (292 / 255 x 32); the rest as MMSelfSup.
register_preset(
    Preset(
        "context_prediction_resnet18_32px",
        "context_prediction",
        "resnet18",
        image_size=32,
        method_kwargs={"patch_size": 8, "gap": 3, "jitter": 2, "resize": 36},
        description="Context prediction, ResNet-18 for 32 px images: MMSelfSup's recipe on a grid scaled by 32 / 255 "
        "(36 px resize, 32 px crop, 8 px patches, gap 3, jitter 2), grayscale p 0.66, all 8 pairs per image",
    )
)

MMSELFSUP_RUN = "https://download.openmmlab.com/mmselfsup/1.x/relative_loc/relative-loc_resnet50_8xb64-steplr-70e_in1k/"
register_pretrained(
    PretrainedTag(
        "context_prediction_resnet50",
        "in1k_mmselfsup",
        url=MMSELFSUP_RUN + "relative-loc_resnet50_8xb64-steplr-70e_in1k_20220825-daae1b41.pth",
        layout="context_prediction_mmselfsup",
        license="apache-2.0",
        epochs=70,
        metrics={"linear": 40.4},
        source="open-mmlab/mmselfsup configs/selfsup/relative_loc/metafile.yml and README "
        "(relative-loc_resnet50_8xb64-steplr-70e_in1k, 70 epochs, batch 512); linear = "
        "resnet50_linear-8xb32-steplr-100e_in1k (SGD lr 30, 100 epochs, batch 256) on the global-average-pooled res5 "
        "feature (pooler_output); MMSelfSup is Apache-2.0",
    )
)
