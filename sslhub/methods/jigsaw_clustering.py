"""Jigsaw Clustering (JigClu): one batch of montages of shuffled tiles; cluster the tiles by image, locate each tile.

Chen, Liu & Jia, "Jigsaw Clustering for Unsupervised Visual Representation Learning", arXiv 2104.00323 (CVPR 2021).
Follows dvlab-research/JigsawClustering (``JigClu/loader.py JigCluTransform``, ``JigClu/jigclu.py``,
``JigClu/resnet_jigclu.py``, ``JigClu/losses.py SupCluLoss``, ``main.py``, ``main_lincls.py``, the README's commands):

- tiles (``JigCluTransform``): each image is split into m x m regions (m = 2) that overlap by the cross ratio c = 0.3
  of the image side on each inner edge (2 x 2: [0, W/2 + cW] and [W/2 - cW, W], so each region is 0.8 of the side);
  each region is augmented on its own as MoCo v2 does (random resized crop to the tile size 112 px with scale
  (0.2, 1), colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, blur p 0.5, flip). The regions are listed
  column by column (the loader reads PIL's ``(width, height)`` as ``h, w``): a tile's location label is ``col m + row``
  (2 x 2: 0 top-left, 1 bottom-left, 2 top-right, 3 bottom-right), its place in its own image;
- montages (``JigClu._batch_gather_ddp``): the n m² tiles of a batch of n images (ordered location-major: tile
  ``k = location n + image``) are permuted by one uniform permutation and stitched row-major into n montages of the
  original size (montage i, cell q gets tile ``perm[q n + i]``): one batch of montages, no second view;
- network: the backbone on the montages, its last feature map resized bilinearly to 4m x 4m (8 x 8,
  ``F.interpolate(..., align_corners=False)``) and average-pooled to m x m (``AdaptiveAvgPool2d((2, 2))``), one
  vector per cell; ``fc_clu`` = Linear(D, D)-ReLU-Linear(D, 128) (``cluster_head``), L2-normalised, and ``fc_loc`` =
  Linear(D, m²) (``location_head``);
- loss (paper §3, eq. of the two branches): ``L = L_clu + L_loc`` (``--loss_clu`` / ``--loss_loc`` 1.0).
  ``L_clu`` is the supervised contrastive loss over all n m² tiles with the tiles of the same image as positives
  (``sslhub.losses.supervised_contrastive``), τ = 0.3 (the README's ``--loss-t 0.3``; ``main.py``'s default is
  0.07), multiplied by τ / 0.07 as ``SupCluLoss`` (its ``base_temperature`` stays 0.07); ``L_loc`` is the m²-way
  cross-entropy of each tile's location in its image;
- recipe (README, ``main.py``): SGD lr 0.03 for a batch of 256, momentum 0.9, weight decay 1e-4, 200 epochs, cosine set
  once per epoch (``adjust_learning_rate`` with ``--min-lr 0``), no warm-up, SyncBN (apex).

Distributed training: the authors gather the images of every GPU, permute the global batch's tiles and gather the
features with gradient (``diffdist``). Here a process's montages are built in the view recipe's ``collate`` from its
own batch (the permutation drawn from ``sslhub.batch.batch_generator``: the same batch gets the same montages on any
worker, process or resume), so tiles are mixed within a process's batch, not across processes; the clustering
embeddings are gathered with gradient (``sslhub.distributed.gather_with_grad``), so each tile is still contrasted with
the tiles of the global batch (image ids offset by rank x the per-process batch, which the trainer keeps equal).
``grid`` generalises the code's fixed 2 x 2 (other m are not in the official code): regions
[c W/m - cW, (c + 1) W/m + cW] clipped to the image, and a 4m x 4m resize before the pooling.

Evaluation: the released encoder is the backbone; ``main_lincls.py`` trains a linear classifier (SGD lr 10 for 256
images, the README's command, no weight decay, 100 epochs, steps at 60 / 80) on the global-average-pooled res5
feature of whole 224 px images (``pooler_output``), after a bilinear resize to 256 and a centre crop.

Deviations: region boxes use integer pixel edges (PIL's ``crop`` rounds the authors' float boxes the same way).
Not verified: the exact container of the released ``JigClu_200e.pth`` (not downloadable here): ``main.py`` saves
``{'epoch', 'arch', 'state_dict', 'optimizer'}`` with the DDP ``module.encoder.*`` keys, and a bare state dict of the
same keys is read too. The paper's text could not be opened here: its equations are written as the code computes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from sslhub.batch import Batch, Sample, batch_generator, collate_samples
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed, preview
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import gather_all, gather_with_grad, rank
from sslhub.heads import MLPHead
from sslhub.losses import supervised_contrastive
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, ViewRecipe, Views, blur, color_distortion, crop, flip, view

RESIZE_PER_CELL = 4  # resnet_jigclu.py: the last map resized to 8 x 8 before the 2 x 2 average pooling


@dataclass
class JigsawClusteringHparams(MethodHparams):
    """The README's pretraining command over ``main.py``'s defaults (module docstring)."""

    optimizer: str = "sgd"
    lr: float = 0.03
    lr_batch_size: int = 256
    weight_decay: float = 1e-4
    epochs: int = 200
    lr_schedule: str = "cosine_epoch"
    sync_batch_norm: bool = True
    grid: int = hparam(2, "tiles per side m: each image gives m x m tiles (the code's fixed 2 x 2)")
    cross_ratio: float = hparam(0.3, "overlap of neighbouring regions, a fraction of the image side (--cross-ratio)")
    crop_scale_min: float = hparam(0.2, "smallest area fraction of each tile's random resized crop")
    embed_dim: int = hparam(128, "output dimension of the clustering MLP (--proj-dim)")
    temperature: float = hparam(0.3, "temperature τ of the clustering loss (README --loss-t 0.3)")
    base_temperature: float = hparam(0.07, "SupCluLoss base_temperature: the clustering loss is scaled by τ / it")
    cluster_weight: float = hparam(1.0, "weight of the clustering loss (--loss_clu)")
    location_weight: float = hparam(1.0, "weight of the location loss (--loss_loc)")

    def __post_init__(self):
        super().__post_init__()
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2 (m x m tiles per image), got {self.grid}")
        if not 0 <= self.cross_ratio < 1 / self.grid:
            raise ValueError(f"cross_ratio must be in [0, 1 / grid) = [0, {1 / self.grid:.3f}), got {self.cross_ratio}")


# ---- the view recipe -----------------------------------------------------------------------------------------------
def region_boxes(width: int, height: int, grid: int, cross_ratio: float) -> list[tuple[int, int, int, int]]:
    """``JigCluTransform``'s m x m overlapping regions as (left, top, right, bottom), column by column: cell (row r,
    col c) spans [c W // m - cW, (c + 1) W // m + cW] x [r H // m - cH, ...], outer edges at the image border."""

    def edges(size: int, k: int) -> tuple[int, int]:
        low = 0 if k == 0 else round(k * size // grid - cross_ratio * size)
        high = size if k == grid - 1 else round((k + 1) * size // grid + cross_ratio * size)
        return low, high

    boxes = []
    for col in range(grid):
        left, right = edges(width, col)
        for row in range(grid):
            top, bottom = edges(height, row)
            boxes.append((left, top, right, bottom))
    return boxes


def stitch_montages(tiles: torch.Tensor, permutation: torch.Tensor, grid: int) -> torch.Tensor:
    """``_batch_gather_ddp``: ``tiles`` (m², n, C, t, t) location-major are flattened to tile k = location n + image,
    permuted, and cell q (row-major) of montage i gets tile ``permutation[q n + i]``: (n, C, m t, m t)."""
    cells, n, channels, side, _ = tiles.shape
    shuffled = tiles.reshape(cells * n, channels, side, side)[permutation]
    montages = shuffled.reshape(grid, grid, n, channels, side, side).permute(2, 3, 0, 4, 1, 5)
    return montages.reshape(n, channels, grid * side, grid * side)


def montage_labels(permutation: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For montage i, cell q (``[i, q]``, (n, m²)): the image its tile came from (``perm % n``, the code's
    ``label_clu``) and the tile's location in that image (``perm // n``, ``label_loc``)."""
    source = permutation.reshape(-1, n).t()
    return source % n, source // n


class JigsawTiles(ViewRecipe):
    """Per image: its m² regions (``region_boxes``), each through ``tile`` (the views, in column-major location
    order); ``collate`` stitches a batch's tiles into montages (``Batch.views = [montages]``) with the extras
    ``source_image`` and ``location`` (n, m²) of every montage cell."""

    def __init__(self, tile: Callable, grid: int, cross_ratio: float):
        self.tile, self.grid, self.cross_ratio = tile, grid, cross_ratio

    def make_views(self, image) -> Views:
        height, width = v2.functional.get_size(image)
        regions = [
            v2.functional.crop(image, top, left, bottom - top, right - left)
            for left, top, right, bottom in region_boxes(width, height, self.grid, self.cross_ratio)
        ]
        return Views([self.tile(region) for region in regions])

    def collate(self, samples: Sequence[Sample]) -> Batch:
        batch = collate_samples(samples)
        tiles = torch.stack(batch.views)
        permutation = torch.randperm(tiles.shape[0] * tiles.shape[1], generator=batch_generator(samples))
        source, location = montage_labels(permutation, len(samples))
        batch.views = [stitch_montages(tiles, permutation, self.grid)]
        batch.extras = {**batch.extras, "source_image": source, "location": location}
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tile}, grid={self.grid}, cross_ratio={self.cross_ratio})"


def cell_features(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """``ResNet.forward`` + the split in ``JigClu.forward``: (n, D, h, w) resized bilinearly to 4m x 4m, average-pooled
    to m x m -> (n, m², D), cells row-major."""
    if min(feature_map.shape[-2:]) < grid:
        raise ValueError(
            f"the encoder's feature map is {tuple(feature_map.shape[-2:])}, smaller than the {grid} x {grid} grid of "
            "montage cells: each cell needs its own features (use a larger image or a smaller output_stride)"
        )
    side = RESIZE_PER_CELL * grid
    resized = F.interpolate(feature_map, size=(side, side), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(resized, grid).flatten(2).transpose(1, 2)


# ---- the authors' file ---------------------------------------------------------------------------------------------
def _jigclu_state(container) -> dict | None:
    if not isinstance(container, dict):
        return None
    state = container.get("state_dict", container)
    return state if isinstance(state, dict) else None


def convert_jigclu(container, source: str) -> Converted:
    """dvlab-research/JigsawClustering ``main.py save_checkpoint``: ``{'epoch', 'arch', 'state_dict', 'optimizer'}``
    (or the bare state dict); ``state_dict`` of DDP(``JigClu``): ``module.encoder.`` + torchvision ResNet names (the
    names of timm's ResNet), ``fc_clu.0`` / ``fc_clu.2`` (the clustering MLP, ``cluster_head`` keeps the indices) and
    ``fc_loc`` (m² locations, in the loader's column-major order as here)."""
    state = entry(container, "state_dict", source) if "state_dict" in container else container
    reader = KeyReader(state, source)
    encoder = reader.take("module.encoder.")
    reader.finish()
    cluster = {key[len("fc_clu.") :]: value for key, value in encoder.items() if key.startswith("fc_clu.")}
    location = {key[len("fc_loc.") :]: value for key, value in encoder.items() if key.startswith("fc_loc.")}
    backbone = {key: value for key, value in encoder.items() if not key.startswith(("fc_clu.", "fc_loc."))}
    if set(cluster) != {"0.weight", "0.bias", "2.weight", "2.bias"} or set(location) != {"weight", "bias"}:
        raise CheckpointError(
            f"{source}: a JigClu state_dict has module.encoder.fc_clu.{{0,2}}.{{weight,bias}} and "
            f"module.encoder.fc_loc.{{weight,bias}}; found fc_clu {preview(cluster)}, fc_loc {preview(location)}"
        )
    cells = location["weight"].shape[0]
    grid = math.isqrt(cells)
    if grid < 2 or grid * grid != cells:
        raise CheckpointError(
            f"{source}: module.encoder.fc_loc.weight has shape {tuple(location['weight'].shape)}: expected m² rows "
            "(m >= 2 tiles per side, 4 for the authors' 2 x 2)"
        )
    method = prefixed("cluster_head.", cluster) | prefixed("location_head.", location)
    overrides = {"embed_dim": cluster["2.weight"].shape[0], "grid": grid}
    left_out = leftover_entries(container, {"state_dict"}) if "state_dict" in container else []
    return Converted("jigsaw_clustering", backbone, method, {"encoder.backbone.": backbone}, overrides, left_out)


def _is_jigclu(container) -> bool:
    """The clustering MLP and the location fc under ``module.encoder.`` (MoCo's files have ``module.encoder_q.``,
    SimSiam's ``module.encoder.fc.`` and ``module.predictor.``)."""
    state = _jigclu_state(container)
    return (
        state is not None
        and "module.encoder.fc_loc.weight" in state
        and any(str(key).startswith("module.encoder.fc_clu.") for key in state)
    )


JIGCLU_LAYOUT = CheckpointLayout("jigsaw_clustering", _is_jigclu, convert_jigclu)


# ---- the method ----------------------------------------------------------------------------------------------------
@register_method("jigsaw_clustering")
class JigsawClustering(SSLMethod):
    """The encoder on a batch of montages; per cell, ``cluster_head`` (MLP, L2-normalised) for the supervised
    contrastive loss with the tiles of one image as positives, and ``location_head`` (fc) for the m²-way location
    of the tile in its image. Released: the encoder."""

    Hparams = JigsawClusteringHparams
    paper = "Jigsaw Clustering for Unsupervised Visual Representation Learning (JigClu)"
    arxiv = "2104.00323"
    citation = (
        "@inproceedings{chen2021jigclu,\n  title={Jigsaw Clustering for Unsupervised Visual Representation "
        "Learning},\n  author={Chen, Pengguang and Liu, Shu and Jia, Jiaya},\n  booktitle={CVPR},\n  year={2021}\n}"
    )
    released = (
        "encoder backbone (pooler_output: the global-average-pooled res5 feature of the whole image, which "
        "main_lincls.py evaluates; trained on montages of 4 tiles)"
    )
    # main_lincls.py with the README's --lr 10.0 (batch 256), no weight decay, 100 epochs, lr x0.1 at 60 and 80
    linear_recipe = LinearRecipe("dvlab-research/JigsawClustering main_lincls.py (README: --lr 10.0)", 10.0, 100, 256)
    eval_interpolation = BILINEAR  # main_lincls.py: Resize(256) (bilinear), CenterCrop(224)
    checkpoint_layouts = (JIGCLU_LAYOUT,)
    tiny_preset = "jigsaw_clustering_resnet18_32px"
    tiny_overrides = {"backbone": "test_resnet", "embed_dim": 16}

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        if config.image_size % hp.grid:
            raise ValueError(f"image_size {config.image_size} is not a multiple of grid {hp.grid} (the tile size)")
        self.encoder = self.build_encoder(config)
        dim = self.encoder.num_features
        self.cluster_head = MLPHead((dim, dim, hp.embed_dim))  # fc_clu: Linear-ReLU-Linear
        self.location_head = nn.Linear(dim, hp.grid**2)  # fc_loc

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        size = cfg.image_size // hp.grid
        tile = view(crop(size, (hp.crop_scale_min, 1.0)), color_distortion(strength=0.5), blur(p=0.5), flip(),
                    mean=cfg.image_mean, std=cfg.image_std)  # fmt: skip
        return JigsawTiles(tile, hp.grid, hp.cross_ratio)

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views[0]``: the montages (n, C, H, W); ``extras["source_image"]`` / ``extras["location"]``
        (n, m²): the image index in the batch and the location of each cell's tile (``JigsawTiles.collate``)."""
        hp = self.hparams
        if len(batch.views) != 1 or not {"source_image", "location"} <= set(batch.extras):
            raise ValueError(
                "Jigsaw Clustering takes one view of montages with extras 'source_image' and 'location' (made by "
                f"its view recipe's collate); got {len(batch.views)} views, extras {sorted(batch.extras)}"
            )
        montages = batch.views[0]
        features = cell_features(self.encoder.forward_features(montages), hp.grid).flatten(0, 1)
        source = batch.extras["source_image"].to(montages.device).flatten() + rank() * len(montages)
        location = batch.extras["location"].to(montages.device).flatten()
        embeddings = F.normalize(self.cluster_head(features), dim=1)
        cluster = supervised_contrastive(
            embeddings, source, hp.temperature, hp.base_temperature,
            gather_with_grad(embeddings), gather_all(source), rank() * len(embeddings),
        )  # fmt: skip
        logits = self.location_head(features)
        location_loss = F.cross_entropy(logits, location)
        loss = hp.cluster_weight * cluster + hp.location_weight * location_loss
        accuracy = (logits.argmax(dim=1) == location).float().mean()
        metrics = {"loss_cluster": cluster.item(), "loss_location": location_loss.item()}
        return MethodOutput(loss, {**metrics, "location_acc": accuracy.item()})


register_preset(
    Preset(
        "jigsaw_clustering_resnet50",
        "jigsaw_clustering",
        "resnet50",
        description="Jigsaw Clustering on a timm resnet50: montages of 2 x 2 tiles of 112 px (cross ratio 0.3), "
        "supervised-contrastive clustering (τ 0.3) + 4-way location, SGD lr 0.03 per 256, cosine, 200 epochs",
    )
)

# 32 px images: 16 px tiles. A stride-32 ResNet-18 gives a 1 x 1 map of a 32 px montage, one vector for all four
# cells. Output stride 8 (timm's dilated layer3 / layer4) gives a 4 x 4 map, 2 x 2 positions per tile: its 8 x 8 resize
# and 2 x 2 pooling mix a cell with its neighbours about as little as the 7 x 7 map of a 224 px montage does (output
# stride 16, a 2 x 2 map, puts a quarter of each cell's weight on the neighbouring tiles). Everything else is the
# ImageNet recipe (the authors publish no small-image one).
register_preset(
    Preset(
        "jigsaw_clustering_resnet18_32px",
        "jigsaw_clustering",
        "resnet18",
        image_size=32,
        backbone_kwargs={"output_stride": 8},
        description="Jigsaw Clustering, ResNet-18 with output stride 8 for 32 px images (montages of 2 x 2 tiles "
        "of 16 px, a 4 x 4 map): the ImageNet recipe",
    )
)

# dvlab-research/JigsawClustering README, "Results and pretrained model": ResNet-50, 200 epochs (the README's command,
# --epoch 200; the file name JigClu_200e.pth), ImageNet linear evaluation 66.4 (also semi-supervised 1 % / 10 %: 40.7
# / 63.0, COCO detection 39.3). The file is main.py's checkpoint of the whole model (encoder, both heads).
register_pretrained(
    PretrainedTag(
        "jigsaw_clustering_resnet50",
        "in1k",
        url="https://github.com/Jia-Research-Lab/JigsawClustering/releases/download/1.0/JigClu_200e.pth",
        layout="jigsaw_clustering",
        license="unknown",
        epochs=200,
        metrics={"linear": 66.4},
        source="dvlab-research/JigsawClustering README, Results and pretrained model (linear = main_lincls.py, lr 10, "
        "on the global-average-pooled res5 feature, pooler_output; semi-supervised 1 % 40.7, 10 % 63.0, COCO 39.3); "
        "the repository has no licence file",
    )
)
