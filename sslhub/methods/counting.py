"""Learning to count: the counting vector of an image equals the sum of the counting vectors of its four tiles.

Noroozi, Pirsiavash & Favaro, "Representation Learning by Learning to Count", arXiv 1708.06734 (ICCV 2017). With
φ the counting vector (non-negative, k = 1000 entries), D the downsampling of an image by a factor 2 and T_j, j = 1..4,
its tiles on a 2 x 2 grid (both give images of the same size), the relation is (eq. 2) ``φ(D∘x) = Σ_j φ(T_j∘x)``.
Its l2 loss (eq. 3) is minimised by φ = 0, so the paper trains with the contrastive loss (eq. 4), for x ≠ y,

    ℓ(x, y) = |φ(D∘x) − Σ_j φ(T_j∘x)|² + max{0, M − |φ(D∘y) − Σ_j φ(T_j∘x)|²},    M = 10,

where | · |² is the squared Euclidean norm of the whole vector (the per-entry hinge of clvrai's re-implementation is
its bug, ahmdtaha/tf_learning_to_count ``docs/clvr_bug.md``); φ = 0 costs M, the hinge is what keeps the counts
apart.

Followed (the paper's text, read in a paper-reading note quoting it, and the two public re-implementations:
ahmdtaha/tf_learning_to_count ``nets/model.py``, which reproduces the paper's AlexNet probes, and clvrai's VGG
``model.py``; the authors released a Caffe AlexNet only, VISSL and MMSelfSup have no counting configuration):

- network (§3.1): AlexNet's five conv layers, then fc (3·3·256 -> 4096), fc (4096 -> 4096), fc (4096 -> 1000), ReLU
  units, and a ReLU at the end "since we want the counting vector to be all positive"; the 1000 outputs are the
  counted primitives. sslhub: the timm backbone's pooled feature replaces AlexNet's pool5, then the paper's three fc
  layers with ReLU (``hidden_dims`` (4096, 4096), ``counting_dim`` 1000, ``MLPHead``) and the final ReLU: the
  paper's evaluation reads the conv trunk, so its fully connected layers stay the head and the released encoder is
  the trunk, as in RotNet / context prediction. No dropout or BatchNorm in the head (the paper names none);
- views: "we randomly crop a 224 x 224 region from a 256 x 256 image" taken at the image's centre (against chromatic
  aberration), and the network's input is 114 x 114; the two agree only for a 228 px crop, whose tiles and
  downsampled copy are 114 px (the re-implementation's reading too): ``resize`` 256 (short side, then the central
  256 x 256), a random crop of ``2 tile_size`` = 228 px, its four tiles (row-major) and the crop downsampled to
  ``tile_size``. ``views = [D∘x, T_1∘x, ..., T_4∘x]``;
- downsampling (§3.2, Table 5): the network can learn the downsampling style, so the method is drawn at random among
  bicubic, bilinear, Lanczos and area (OpenCV's); sslhub draws it per image (the paper: per SGD iteration), with
  PIL's resampling filters (BICUBIC, BILINEAR, LANCZOS and BOX, which is OpenCV's INTER_AREA for a factor 2; PIL's
  bilinear / bicubic widen their support when downsampling, OpenCV's do not); ``extras["interpolation"]`` its index;
- colour (§3.2): grayscale (the average colour replicated on the 3 channels) 67 % of the time and colour 33 %, "the
  same for all the terms of the loss": one draw per batch (``collate``, from ``batch_generator``), since y is another
  image of the batch; ``extras["grayscale"]`` (B,);
- y: the paper pairs x with "a randomly chosen different image"; sslhub takes the next image of the batch (a roll by
  one, ``y_i = x_{i+1 mod B}``; the re-implementation pairs the two halves of its batch both ways): no extra image is
  loaded and every image is once x and once y;
- optimisation (§4): lr 10^-4, "drop it by a factor of 0.9 every 10K iterations". The paper names no optimiser
  (only "each stochastic gradient descent iteration"); sslhub takes the re-implementation's, which reproduces the
  paper's AlexNet probes (conv1-conv5 within 0.3-2.4 points, README): Adam (``adamw`` with weight decay 0) at the
  paper's lr 10^-4 for 1024 images (``counter_trn.py``: 256 per GPU on 4 GPUs, 1251 steps per ImageNet epoch), 250
  epochs, no weight decay. Other batch sizes get the lr scaled by the square root of the batch ratio
  (``lr_scaling`` "sqrt", the square-root rule of adaptive optimisers, Malladi et al. 2022): identical at 1024;
  at batch 64 the linear rule's 6.25e-6 learns a third as much in the 32 px preset's one-epoch check on the
  built-in digits (kNN +0.11 vs +0.42), and SGD (momentum 0.9) at 10^-4 per 256 +0.18.

Deviations: the paper's x0.9 per 10K iterations is counted in images (``lr_schedule`` "exponential",
``lr_decay_images`` = 10K x 1024), so other batch sizes decay at the same point of training (the re-implementation
keeps the lr constant for 150 epochs, then decays it linearly to 10^-7 over the last 100); the per-image downsampling
method (above); the input is normalised with the preset's mean and std (the paper subtracts each image's mean
intensity and divides by its standard deviation); one forward pass of the encoder over the 5B views together (shared
BatchNorm statistics: the paper's AlexNet has no BatchNorm).

Not verified (not in the text read): the paper's optimiser, batch size, weight decay and number of iterations (the
defaults are the re-implementation's: Adam, 1024, none, 250 epochs), the weight initialisation (PyTorch's defaults
here), whether the 67 % grayscale draw is per batch or per image, and the 224 / 228 px crop. The paper's linear
probes are on AlexNet conv1-conv5 (ImageNet top-1 best at conv3, 34.3); no ResNet counting network is released by
anyone: no release tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from sslhub.batch import Batch, Sample, batch_generator, collate_samples
from sslhub.heads import MLPHead
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, register_method, register_preset
from sslhub.transforms import BILINEAR, ViewRecipe, Views

NUM_TILES = 4
# The paper's four downsampling methods (OpenCV bicubic, bilinear, Lanczos, area), as PIL resampling filters.
DOWNSAMPLING = (
    v2.InterpolationMode.BICUBIC,
    v2.InterpolationMode.BILINEAR,
    v2.InterpolationMode.LANCZOS,
    v2.InterpolationMode.BOX,
)


@dataclass
class CountingHparams(MethodHparams):
    """The paper's lr 10^-4, x0.9 every 10K iterations (of the re-implementation's 1024 images); optimiser (Adam),
    batch and epochs of ahmdtaha/tf_learning_to_count (module docstring)."""

    optimizer: str = "adamw"
    lr: float = 1e-4
    lr_batch_size: int = 1024
    lr_scaling: str = "sqrt"
    weight_decay: float = 0.0
    epochs: int = 250
    lr_schedule: str = "exponential"
    lr_decay_factor: float = 0.9
    lr_decay_images: int = 10_000 * 1024
    margin: float = hparam(10.0, "M of eq. 4: the smallest squared distance to another image's counting vector")
    counting_dim: int = hparam(1000, "entries of the counting vector (the number of counted primitives)")
    hidden_dims: tuple[int, ...] = hparam((4096, 4096), "widths of the fc-ReLU layers before the counting layer")
    tile_size: int = hparam(114, "side of each tile and of the downsampled crop (the crop is 2 tile_size px)")
    resize: int = hparam(256, "the short side is resized to this and the central square kept before the crop")
    grayscale_p: float = hparam(0.67, "probability that a batch is grayscale (the average colour on every channel)")

    def __post_init__(self):
        super().__post_init__()
        if min(self.counting_dim, self.tile_size, *self.hidden_dims) < 1 or self.margin <= 0:
            raise ValueError(
                f"counting_dim ({self.counting_dim}), tile_size ({self.tile_size}) and hidden_dims "
                f"({self.hidden_dims}) must be >= 1 and margin ({self.margin}) > 0"
            )
        if self.resize < 2 * self.tile_size:
            raise ValueError(f"resize ({self.resize}) is smaller than the crop of 2 x tile_size ({2 * self.tile_size})")
        if not 0 <= self.grayscale_p <= 1:
            raise ValueError(f"grayscale_p must be in [0, 1], got {self.grayscale_p}")


# ---- the view recipe -----------------------------------------------------------------------------------------------
def tiles(image: torch.Tensor) -> list[torch.Tensor]:
    """T_1..T_4: the (C, H, W) image cut in a 2 x 2 grid, row-major (top-left, top-right, bottom-left, bottom-right)."""
    height, width = image.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"the 2 x 2 tiles need an even image size, got {height} x {width}")
    rows = image.split(height // 2, dim=-2)
    return [tile for row in rows for tile in row.split(width // 2, dim=-1)]


def average_colour(views: torch.Tensor) -> torch.Tensor:
    """The paper's grayscale: the average of the 3 colour channels replicated on every channel ((..., 3, H, W))."""
    return views.mean(dim=-3, keepdim=True).expand_as(views)


class CountingViews(ViewRecipe):
    """Per image: ``crop`` (PIL -> a 2t x 2t PIL crop), then the views [D∘x, T_1∘x .. T_4∘x] as float images in
    [0, 1], D by a random one of ``DOWNSAMPLING`` (``extras["interpolation"]``). ``collate`` makes the whole batch
    grayscale with probability ``grayscale_p`` (``extras["grayscale"]``) and only then normalises every view."""

    def __init__(self, crop, tile_size: int, grayscale_p: float, mean: Sequence[float], std: Sequence[float]):
        self.crop, self.tile_size, self.grayscale_p = crop, tile_size, grayscale_p
        self.mean, self.std = list(mean), list(std)
        self.to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])

    def make_views(self, image) -> Views:
        region = self.crop(image)
        method = int(torch.randint(len(DOWNSAMPLING), ()))
        size = [self.tile_size, self.tile_size]
        downsampled = v2.functional.resize(region, size, interpolation=DOWNSAMPLING[method], antialias=True)
        return Views([self.to_float(downsampled), *tiles(self.to_float(region))], {"interpolation": method})

    def collate(self, samples: Sequence[Sample]) -> Batch:
        batch = collate_samples(samples)
        grayscale = bool(torch.rand((), generator=batch_generator(samples)) < self.grayscale_p)
        views = [average_colour(view) if grayscale else view for view in batch.views]
        batch.views = [v2.functional.normalize(view, self.mean, self.std) for view in views]
        batch.extras["grayscale"] = torch.full((len(samples),), grayscale)
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop}, tile_size={self.tile_size}, grayscale_p={self.grayscale_p})"


# ---- the objective -------------------------------------------------------------------------------------------------
def counting_loss(downsampled: torch.Tensor, tile_sum: torch.Tensor, margin: float) -> dict[str, torch.Tensor]:
    """Eq. 4 averaged over the batch, y_i = x_{i+1 mod B}: ``downsampled`` (B, k) φ(D∘x_i), ``tile_sum`` (B, k)
    Σ_j φ(T_j∘x_i). Returns the loss and its two terms (each averaged)."""
    other = downsampled.roll(-1, dims=0)  # φ(D∘y_i) = φ(D∘x_{i+1})
    equivariance = (downsampled - tile_sum).pow(2).sum(dim=1)
    contrastive = F.relu(margin - (other - tile_sum).pow(2).sum(dim=1))
    return {
        "loss": (equivariance + contrastive).mean(),
        "equivariance": equivariance.mean(),
        "contrastive": contrastive.mean(),
    }


@register_method("counting")
class Counting(SSLMethod):
    """φ = ReLU(head(encoder(·))) on the 5B views at once, eq. 4 on φ(D∘x), Σ_j φ(T_j∘x) and the next image's
    φ(D∘y). Released: the encoder."""

    Hparams = CountingHparams
    paper = "Representation Learning by Learning to Count (counting visual primitives)"
    arxiv = "1708.06734"
    citation = (
        "@InProceedings{noroozi2017representation,\n  author    = {Mehdi Noroozi and Hamed Pirsiavash and Paolo "
        "Favaro},\n  title     = {Representation Learning by Learning to Count},\n  booktitle = {ICCV},\n"
        "  year      = {2017},\n}"
    )
    released = (
        "encoder backbone (pooler_output: the final pooled feature; trained on 114 px tiles, evaluated on whole "
        "images; the paper probes AlexNet's conv1-conv5, best at the intermediate conv3, and retrieves neighbours "
        "with the counting vector, the head's output, which is not part of the released encoder)"
    )
    linear_recipe = LinearRecipe("sslhub linear protocol (the paper probes AlexNet conv layers only)", 0.1, 100, 256)
    tiny_preset = "counting_resnet18_32px"
    tiny_overrides = {"backbone": "test_resnet", "hidden_dims": (16,), "counting_dim": 8}

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        self.head = MLPHead((self.encoder.num_features, *hp.hidden_dims, hp.counting_dim))

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        crop = v2.Compose(
            [
                v2.Resize(hp.resize, interpolation=BILINEAR),
                v2.CenterCrop(hp.resize),
                v2.RandomCrop(2 * hp.tile_size),
            ]
        )
        return CountingViews(crop, hp.tile_size, hp.grayscale_p, cfg.image_mean, cfg.image_std)

    def counting_vector(self, images: torch.Tensor) -> torch.Tensor:
        """φ: (N, C, H, W) -> (N, counting_dim), non-negative (the paper's final ReLU)."""
        return F.relu(self.head(self.encoder(images)))

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views``: [D∘x, T_1∘x, .., T_4∘x], (B, C, t, t) each (``CountingViews``), B >= 2."""
        shapes = {tuple(view.shape) for view in batch.views}
        if len(batch.views) != 1 + NUM_TILES or len(shapes) != 1 or len(batch) < 2:
            raise ValueError(
                f"counting takes {1 + NUM_TILES} views of one shape (the downsampled crop, then its 4 tiles; "
                f"CountingViews) and at least 2 images (y is the next image of the batch); got {len(batch.views)} "
                f"views of shapes {sorted(shapes)}"
            )
        counts = self.counting_vector(torch.cat(batch.views)).unflatten(0, (1 + NUM_TILES, len(batch)))
        downsampled, tile_sum = counts[0], counts[1:].sum(dim=0)
        terms = counting_loss(downsampled, tile_sum, self.hparams.margin)
        metrics = {
            "equivariance_term": float(terms["equivariance"].detach()),
            "contrastive_term": float(terms["contrastive"].detach()),
            "counting_norm": float(downsampled.detach().norm(dim=1).mean()),
            "active_units": float((counts.detach() > 0).any(dim=(0, 1)).float().mean()),
        }
        return MethodOutput(terms["loss"], metrics)


register_preset(
    Preset(
        "counting_resnet50",
        "counting",
        "resnet50",
        description="Learning to count on a timm resnet50: 256 px central square, 228 px random crop, its four 114 px "
        "tiles and its 114 px downsampled copy (random bicubic / bilinear / Lanczos / area), grayscale batches with p "
        "0.67, fc 4096-4096-1000 + ReLU, M = 10, Adam lr 1e-4 per 1024 (sqrt scaling) x0.9 per 10K x 1024 images, "
        "250 epochs",
    )
)

# The paper's geometry scaled by 32 / 228 for 32 px images: the whole 32 px crop (from a 36 px central square,
# 256 / 228 x 32), 16 px tiles and downsampled copy; the rest as the paper.
register_preset(
    Preset(
        "counting_resnet18_32px",
        "counting",
        "resnet18",
        image_size=32,
        method_kwargs={"tile_size": 16, "resize": 36},
        description="Learning to count, ResNet-18 for 32 px images: the paper's recipe on a geometry scaled by "
        "32 / 228 (36 px central square, 32 px crop, 16 px tiles and downsampled copy)",
    )
)
