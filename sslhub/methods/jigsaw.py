"""Jigsaw puzzles: classify which permutation, of a fixed set, shuffled the 3 x 3 tiles of an image.

Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles", arXiv 1603.09246
(ECCV 2016). An image's 9 tiles x_1..x_9 are put in the order of a permutation P_y of a set {P_1, ..., P_N} (tile
P_y(t) at input position t); a shared tower f per tile, fc layers per tile, the 9 outputs concatenated in input order
and a final fc give N logits (the "context-free network"); the loss is the N-way cross-entropy
``loss = -1/B Σ_i log softmax(W [g(f(x_{P_y(1)})), ..., g(f(x_{P_y(9)}))] + b)[y_i]``. The set is chosen greedily
for maximal Hamming distance (the paper's Algorithm 1): a first permutation drawn uniformly from the 9! ones, then
each next one the permutation with the largest summed (average) Hamming distance to those already chosen.

Followed (read, not recalled): facebookresearch/vissl, whose ResNet-50 files are released:
``configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml`` and ``permutations/perm{100,2000,10K}.yaml``,
``vissl/data/ssl_transforms/img_patches_tensor.py`` (``ImgPatchesFromTensor``), ``shuffle_img_patches.py``
(``ShuffleImgPatches``), ``vissl/data/collators/siamese_collator.py``, ``vissl/models/heads/mlp.py``,
``siamese_concat_view.py``, ``extra_scripts/generate_jigsaw_permutations.py`` (Algorithm 1, ``max_avg``), and the
authors' MehdiNoroozi/JigsawPuzzleSolver (Caffe ``data_transformer.cpp`` of ``caffe-master-jps++``) for the paper's
anti-shortcut steps. MMSelfSup has no Jigsaw.

- views (VISSL): ``Resize(256)`` (short side, bilinear), horizontal flip, ``RandomCrop(255)``, grayscale with p 0.66,
  ImageNet normalisation, then ``ImgPatchesFromTensor(9, patch_jitter=21)``: cells of 255 // 3 = 85 px, in each a
  64 px tile at offsets ``randint(0, 21)`` = 0..20 px. sslhub's ``PatchGrid(64, 21, 20)`` (tile, gap, jitter, from
  ``context_prediction``) cuts the same tiles from the top-left 254 px of the 255 px crop (VISSL never reads its last
  row / column); ``ShuffleImgPatches``: a permutation index y uniform over the set, input position t holds tile
  P_y[t]; ``views`` = the 9 shuffled tiles, ``extras["permutation"]`` = y;
- network (VISSL heads ``mlp [2048, 1000] use_bn use_relu`` -> ``siamese_concat_view (9 towers)`` -> ``mlp [9000,
  N]``): the timm backbone on all 9 B tiles in one call (one BatchNorm batch, as VISSL's ``siamese_collator``), the
  pooled feature -> ``tile_fc`` Linear(D, 1000) -> BatchNorm1d -> ReLU per tile, concatenated per image in input
  order (9000), ``head`` Linear(9000, N); PyTorch's default init (VISSL ``PARAMS_MULTIPLIER 1``);
- optimisation (``jigsaw_8gpu_resnet``): SGD lr 0.1 per 256 images (8 x 32), momentum 0.9, weight decay 1e-4 except
  BatchNorm (``regularize_bn: False``, ``regularize_bias: True``), 105 epochs, linear warm-up from 0.025 over the
  first 0.047619 of training (5 epochs), then lr x0.1 at epochs 30, 60, 90 and 100;
- the permutation set: ``maximal_hamming_permutations(num_permutations, permutation_seed)``, VISSL's ``max_avg``
  selection, the first permutation drawn with a seeded generator. The method keeps its set as the persistent buffer
  ``permutations`` (N, 9): a saved model carries it in ``model.safetensors`` and a reloaded one uses the saved set.
- the paper's shortcuts, off in VISSL's recipe and available as hyperparameters: ``tile_normalization`` (the paper
  and bbrattoli/JigsawPuzzlePytorch: each tile minus its mean, divided by its standard deviation, over its pixels and
  channels; sslhub floors the standard deviation at 1e-6 for flat tiles), ``projection_p`` (the authors' jps++: half
  of the colour puzzles projected off the green-magenta axis, ``context_prediction.GreenMagentaProjection``, the same
  matrix ``[[5/6, 1/3, -1/6], [1/3, 1/3, 1/3], [-1/6, 1/3, 5/6]]``; their grayscale p 0.5 is ``grayscale_p``).

Deviations: the warm-up is linear per step (VISSL sets it once per epoch: 0.025, 0.04, ... 0.085); the authors'
per-channel jitter of 0..2 px (against chromatic aberration) is not implemented; VISSL's tiles are cut column-major
(its ``i`` runs along x) and sslhub's row-major, so a permutation means a different shuffle in the two codes.

Release (``convert_vissl``): the encoder is the trunk. VISSL's ImageNet-1k number is the best of its linear probes on
conv1, res2-res5 and res5avg; ``pooler_output`` is the final pooled feature (res5avg). The heads are not converted:
the classifier's N classes are the rows of VISSL's permutation file (``hamming_perms_2000_patches_9_max_avg.npy``,
``naroozi_perms_100_patches_9_max.npy``, ``hamming_perms_10000_patches_9_max_avg.npy`` on dl.fbaipublicfiles.com),
which the checkpoint does not hold and which cannot be read here, over VISSL's column-major tiles; without that set
the classifier, and the per-tile fc trained only for it, reproduce nothing. The file's N is kept as
``num_permutations``. Not verified (no file opened): the released containers (taken from the code that saves and
the benchmark configs that load them) and the Goyal'19 files' permutation count.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, preview
from sslhub.conversion.loading import CheckpointError
from sslhub.conversion.vissl import VISSL_LINEAR, VISSL_ZOO, read_vissl, vissl_heads
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, batch_norm_exempt_groups, hparam
from sslhub.methods.context_prediction import GreenMagentaProjection, PatchGrid
from sslhub.methods.rotnet import RotNet
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, ViewRecipe, Views, flip, grayscale

NUM_TILES = 9
# VISSL heads [mlp [2048, 1000] + BN + ReLU, siamese_concat_view (no parameters), mlp [9000, N]]
VISSL_TILE_FC = ("0.clf.0.weight", "0.clf.0.bias") + tuple(
    f"0.clf.1.{name}" for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
)
VISSL_CLASSIFIER = ("2.clf.0.weight", "2.clf.0.bias")
TILE_STD_FLOOR = 1e-6


@dataclass
class JigsawHparams(MethodHparams):
    """VISSL's ``jigsaw_8gpu_resnet.yaml`` (module docstring)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    lr_batch_size: int = 256
    weight_decay: float = 1e-4
    epochs: int = 105
    warmup_epochs: float = 5
    warmup_start_ratio: float = 0.25
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (30, 60, 90, 100)
    decay_batch_norm: bool = hparam(False, "weight decay on BatchNorm weights and biases too (VISSL: regularize_bn "
                                           "False)")  # fmt: skip
    num_permutations: int = hparam(
        2000, "size of the permutation set, the classes (VISSL's config and releases: 100 / 2000 / 10000; paper 1000)"
    )
    permutation_seed: int = hparam(0, "seed of the first permutation of the maximal-Hamming set (Algorithm 1)")
    tile_size: int = hparam(64, "side of each tile in pixels")
    gap: int = hparam(21, "cell minus tile: pixels between neighbouring tiles before the jitter (VISSL patch_jitter)")
    jitter: int = hparam(20, "each tile moves by 0..jitter px down and right in its cell (VISSL randint(0, 21))")
    resize: int = hparam(256, "the short side is resized to this before the random crop of 3 (tile + gap) px")
    grayscale_p: float = hparam(0.66, "probability that the whole crop is made grayscale (VISSL 0.66, authors 0.5)")
    projection_p: float = hparam(0.0, "probability of the green-magenta projection of the crop (authors' jps++ 0.5)")
    tile_normalization: bool = hparam(False, "each tile normalised by its own mean and std (the paper; VISSL: no)")
    tile_dim: int = hparam(1000, "width of the per-tile fc + BatchNorm layer (VISSL mlp [2048, 1000])")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_permutations <= math.factorial(NUM_TILES):
            raise ValueError(f"num_permutations must be in [1, 9!], got {self.num_permutations}")
        if min(self.tile_size, self.tile_dim) < 1 or min(self.gap, self.jitter) < 0:
            raise ValueError(
                f"tile_size ({self.tile_size}) and tile_dim ({self.tile_dim}) must be >= 1, gap ({self.gap}) and "
                f"jitter ({self.jitter}) >= 0"
            )
        if self.jitter > self.gap:
            raise ValueError(f"jitter ({self.jitter}) larger than the gap ({self.gap}) lets neighbouring tiles overlap")
        if self.resize < self.crop_size:
            raise ValueError(f"resize ({self.resize}) is smaller than the crop of the tiles' grid ({self.crop_size})")
        if not all(0 <= p <= 1 for p in (self.grayscale_p, self.projection_p)):
            raise ValueError("grayscale_p and projection_p must be in [0, 1]")

    @property
    def crop_size(self) -> int:
        """VISSL's ``RandomCrop(255)``: three cells of tile + gap px."""
        return 3 * (self.tile_size + self.gap)


# ---- the permutation set -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _maximal_hamming(count: int, seed: int) -> np.ndarray:
    candidates = np.array(list(itertools.permutations(range(NUM_TILES))), dtype=np.int8)  # lexicographic, as VISSL
    # holders[t, v]: the candidates with tile v at position t; a candidate's summed Hamming distance to the chosen
    # set is 9 k minus its matches with them, so the largest distance is the fewest matches.
    holders = np.stack([np.stack([np.flatnonzero(candidates[:, t] == v) for v in range(NUM_TILES)])
                        for t in range(NUM_TILES)])  # fmt: skip
    matches = np.zeros(len(candidates), dtype=np.int64)
    chosen = [int(torch.randint(len(candidates), (), generator=torch.Generator().manual_seed(seed)))]
    taken = NUM_TILES * count + 1  # more than any count of matches: a chosen permutation is never chosen again
    while len(chosen) < count:
        for t, v in enumerate(candidates[chosen[-1]]):
            matches[holders[t, v]] += 1
        matches[chosen[-1]] = taken
        chosen.append(int(np.argmin(matches)))  # the first of the ties, as VISSL's argmax after np.delete
    return candidates[chosen].astype(np.int64)


def maximal_hamming_permutations(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 9): the paper's Algorithm 1 (VISSL ``generate_jigsaw_permutations.py --method max_avg``): a first
    permutation of the 9! (lexicographic order) drawn with ``seed``, then repeatedly the remaining permutation whose
    average Hamming distance to the chosen ones is largest (the first such)."""
    return torch.from_numpy(_maximal_hamming(count, seed).copy())


# ---- the view recipe -----------------------------------------------------------------------------------------------
def normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """(9, C, T, T): each tile minus its mean, divided by its standard deviation (over its pixels and channels,
    floored at ``TILE_STD_FLOOR``), the paper's per-tile normalisation against low-level shortcuts."""
    mean = tiles.mean(dim=(1, 2, 3), keepdim=True)
    std = tiles.std(dim=(1, 2, 3), keepdim=True).clamp_min(TILE_STD_FLOOR)
    return (tiles - mean) / std


class JigsawViews(ViewRecipe):
    """Per image: ``image`` (resize, flip, crop, colour, normalisation) cut by ``grid`` into 9 row-major tiles,
    optionally ``normalize_tiles``, shuffled by a permutation y drawn uniformly from ``permutations``: view t is
    tile ``permutations[y, t]``, ``extras["permutation"]`` = y."""

    def __init__(self, image, grid: PatchGrid, permutations: torch.Tensor, tile_normalization: bool):
        self.image, self.grid, self.permutations = image, grid, permutations
        self.tile_normalization = tile_normalization

    def make_views(self, image) -> Views:
        side = self.grid.side
        tiles = self.grid.cut(self.image(image)[:, :side, :side], self.grid.corners())
        if self.tile_normalization:
            tiles = normalize_tiles(tiles)
        label = torch.randint(len(self.permutations), ())
        return Views(list(tiles[self.permutations[label]]), {"permutation": label})

    def __repr__(self) -> str:
        g = self.grid
        return (
            f"{type(self).__name__}({self.image}, tile_size={g.patch_size}, gap={g.gap}, jitter={g.jitter}, "
            f"permutations={len(self.permutations)}, tile_normalization={self.tile_normalization})"
        )


# ---- the authors' file ---------------------------------------------------------------------------------------------
def _jigsaw_heads(heads: dict) -> bool:
    """VISSL Jigsaw heads: the per-tile fc + BN and a classifier on the 9 concatenated tile outputs."""
    if set(heads) != set(VISSL_TILE_FC + VISSL_CLASSIFIER):
        return False
    tile_fc, classifier = heads[VISSL_TILE_FC[0]], heads[VISSL_CLASSIFIER[0]]
    return tile_fc.ndim == 2 and classifier.ndim == 2 and classifier.shape[1] == NUM_TILES * tile_fc.shape[0]


def convert_vissl(container, source: str) -> Converted:
    """A VISSL Jigsaw file (``sslhub.conversion.vissl``, family A): the trunk is the encoder; the heads are left out
    (module docstring: their classes are VISSL's permutation file), the file's N becomes ``num_permutations``."""
    model = read_vissl(container, source)
    if not _jigsaw_heads(model.heads):
        raise CheckpointError(
            f"{source}: VISSL Jigsaw's heads are {list(VISSL_TILE_FC + VISSL_CLASSIFIER)} with 2.clf.0.weight of "
            f"shape (N, 9 x tile fc width) (mlp [2048, 1000] + BN, siamese_concat_view, mlp [9000, N]); the file's "
            f"heads are {preview({key: tuple(value.shape) for key, value in model.heads.items()}.items())}"
        )
    count = int(model.heads[VISSL_CLASSIFIER[0]].shape[0])
    reason = (
        f"classy_state_dict.base_model.model.heads (not converted: the {count}-way classifier's classes are the "
        "rows of VISSL's permutation file over its column-major tiles, which the checkpoint does not hold)"
    )
    return Converted("jigsaw_vissl", model.trunk, method_overrides={"num_permutations": count},
                     left_out=sorted([*model.left_out, reason]))  # fmt: skip


def _is_vissl_jigsaw(container) -> bool:
    return _jigsaw_heads(vissl_heads(container) or {})


VISSL_LAYOUT = CheckpointLayout("jigsaw_vissl", _is_vissl_jigsaw, convert_vissl)


# ---- the method ----------------------------------------------------------------------------------------------------
@register_method("jigsaw")
class Jigsaw(SSLMethod):
    """The shared encoder on every tile, ``tile_fc`` per tile, the 9 outputs concatenated in input order, ``head``
    (N-way fc), cross-entropy with the permutation index. Released: the encoder."""

    Hparams = JigsawHparams
    paper = "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles"
    arxiv = "1603.09246"
    citation = (
        "@InProceedings{noroozi2016unsupervised,\n  author    = {Mehdi Noroozi and Paolo Favaro},\n  title     = "
        "{Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles},\n  booktitle = {ECCV},\n"
        "  year      = {2016},\n}"
    )
    released = (
        "encoder backbone (pooler_output: the final pooled feature, res5avg; trained on 64 px tiles, evaluated on "
        "whole images; VISSL reports the best of its linear probes on conv1 / res2-res5 / res5avg, the paper's "
        "AlexNet probes peak at the intermediate conv3 / conv4)"
    )
    linear_recipe = RotNet.linear_recipe  # VISSL eval_resnet_8gpu_transfer_in1k_linear, its benchmark of both
    checkpoint_layouts = (VISSL_LAYOUT,)
    tiny_preset = "jigsaw_resnet18_32px"
    tiny_overrides = {"backbone": "test_resnet", "num_permutations": 10, "tile_dim": 16}
    # Evaluation pre-processing: VISSL's test pre-processing: bilinear ``Resize(256)``, ``CenterCrop(224)``.
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        self.tile_fc = nn.Sequential(
            nn.Linear(self.encoder.num_features, hp.tile_dim), nn.BatchNorm1d(hp.tile_dim), nn.ReLU(inplace=True)
        )
        self.head = nn.Linear(NUM_TILES * hp.tile_dim, hp.num_permutations)
        self.register_buffer("permutations", maximal_hamming_permutations(hp.num_permutations, hp.permutation_seed))

    def view_recipe(self):
        """VISSL's crop and colour steps, normalised, then ``JigsawViews`` with this model's permutation set."""
        cfg, hp = self.config, self.hparams
        projection = [v2.RandomApply([GreenMagentaProjection()], p=hp.projection_p)] if hp.projection_p else []
        image = v2.Compose([
            v2.Resize(hp.resize, interpolation=BILINEAR), flip(), v2.RandomCrop(hp.crop_size),
            grayscale(hp.grayscale_p), v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *projection,
            v2.Normalize(mean=list(cfg.image_mean), std=list(cfg.image_std)), v2.ToPureTensor(),
        ])  # fmt: skip
        grid = PatchGrid(hp.tile_size, hp.gap, hp.jitter)
        return JigsawViews(image, grid, self.permutations.detach().cpu().clone(), hp.tile_normalization)

    def param_groups(self):
        """BatchNorm without weight decay (VISSL ``regularize_bn: False``), unless ``decay_batch_norm``."""
        if self.hparams.decay_batch_norm:
            return super().param_groups()
        return batch_norm_exempt_groups(self, self.hparams.weight_decay)

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views``: the 9 shuffled tiles (view t: tile ``permutations[y, t]`` of each image),
        ``batch.extras["permutation"]`` (B,): y (``JigsawViews``)."""
        label = batch.extras.get("permutation")
        shape = None if label is None else tuple(label.shape)
        if len(batch.views) != NUM_TILES or shape != (len(batch),):
            raise ValueError(
                f"Jigsaw takes the {NUM_TILES} shuffled tiles of every image and extras['permutation'] (B,) "
                f"(JigsawViews); got {len(batch.views)} views, permutation {shape}"
            )
        tiles = self.tile_fc(self.encoder(torch.cat(batch.views)))  # (9 B, tile_dim), view-major
        puzzle = tiles.reshape(NUM_TILES, len(batch), -1).transpose(0, 1).flatten(1)  # siamese_concat_view
        logits = self.head(puzzle)
        label = label.to(logits.device)
        loss = F.cross_entropy(logits, label)
        accuracy = (logits.detach().argmax(1) == label).float().mean()
        return MethodOutput(loss, {"permutation_accuracy": float(accuracy)})


register_preset(
    Preset(
        "jigsaw_resnet50",
        "jigsaw",
        "resnet50",
        description="Jigsaw on a timm resnet50: VISSL jigsaw_8gpu_resnet (2000 permutations, 64 px tiles of a 255 px "
        "crop, SGD lr 0.1 per 256, wd 1e-4 not on BN, 5 warm-up epochs, steps at 30/60/90/100 of 105 epochs)",
    )
)

# VISSL's geometry scaled to 32 px images: cells of 10 px (VISSL 85), tiles of 7 px (64), offsets 0..2 (0..20);
# the crop is 30 px of the 32 px image (VISSL 255 of 256). timm's resnet18 makes a 1 x 1 map of a 7 px tile.
register_preset(
    Preset(
        "jigsaw_resnet18_32px",
        "jigsaw",
        "resnet18",
        image_size=32,
        method_kwargs={"tile_size": 7, "gap": 3, "jitter": 2, "resize": 32},
        description="Jigsaw, ResNet-18 for 32 px images: VISSL's recipe with 7 px tiles in 10 px cells of a 30 px crop",
    )
)

# ---- releases ------------------------------------------------------------------------------------------------------
JIGSAW_SOURCE = (
    "facebookresearch/vissl MODEL_ZOO.md, Jigsaw (benchmark configs/config/model_zoo/benchmark_in1k_linear_jigsaw"
    ".json, STATE_DICT_KEY_NAME classy_state_dict; pretraining config pretrain/jigsaw/jigsaw_8gpu_resnet.yaml with "
)
GOYAL_SOURCE = (
    "facebookresearch/vissl MODEL_ZOO.md, Jigsaw RN50 - Goyal'19 (Goyal et al., arXiv 1905.01235, converted from "
    "fair_self_supervision_benchmark; benchmark_in1k_linear_jigsaw.json loads model_state_dict with APPEND_PREFIX "
    "trunk.base_model.: the trunk alone); "
)
VISSL_RUNS = {  # tag: (permutations, linear, file under VISSL_ZOO, pretraining data)
    "in1k_perm100": (100, 48.57, "jigsaw_rn50_in1k_ep105_perm2k_jigsaw_8gpu_resnet_17_07_20.db174a43/"
                     "model_final_checkpoint_phase104.torch", "imagenet-1k"),
    "in1k_perm2k": (2000, 46.73, "jigsaw_rn50_in1k_ep105_perm2k_jigsaw_8gpu_resnet_17_07_20.cccee144/"
                    "model_final_checkpoint_phase104.torch", "imagenet-1k"),
    "in1k_perm10k": (10000, 48.11, "jigsaw_rn50_in1k_ep105_perm2k_jigsaw_8gpu_resnet_20_07_20.3d706467/"
                     "model_final_checkpoint_phase104.torch", "imagenet-1k"),
    "in22k_perm2k": (2000, 44.84, "converted_vissl_jigsaw_rn50_perm2k_in22k_8gpu_ep105.torch", "imagenet-22k"),
}  # fmt: skip
for tag, (count, linear, path, data) in VISSL_RUNS.items():
    register_pretrained(
        PretrainedTag(
            "jigsaw_resnet50",
            tag,
            url=VISSL_ZOO + path,
            layout="jigsaw_vissl",
            license="mit",
            epochs=105,
            metrics={"linear": linear},
            pretraining_data=None if data == "imagenet-1k" else data,
            overrides={"num_permutations": count} if count != 2000 else {},
            download_name=f"jigsaw_rn50_{tag}_{path.split('/')[0].rsplit('.', 1)[-1]}.torch" if "/" in path else None,
            source=JIGSAW_SOURCE + f"{count} permutations, 105 epochs); " + VISSL_LINEAR,
        )
    )
for tag, linear, data in (("in1k_goyal19", 46.58, "in1k"), ("in22k_goyal19", 53.09, "in22k"),
                          ("yfcc100m_goyal19", 51.37, "yfcc100m")):  # fmt: skip
    register_pretrained(
        PretrainedTag(
            "jigsaw_resnet50",
            tag,
            url=VISSL_ZOO + f"converted_vissl_rn50_jigsaw_{data}_goyal19.torch",
            layout="vissl_trunk",
            license="mit",
            epochs=None,
            metrics={"linear": linear},
            pretraining_data={"in1k": None, "in22k": "imagenet-22k", "yfcc100m": "yfcc100m"}[data],
            source=GOYAL_SOURCE + VISSL_LINEAR,
        )
    )
