"""CPC v2: contrastive predictive coding on a grid of image patches, each patch encoded on its own by a ResNet.

Hénaff, Srinivas, De Fauw, Razavi, Doersch, Eslami & van den Oord, "Data-Efficient Image Recognition with
Contrastive Predictive Coding", arXiv 1905.09272 (ICML 2020). DeepMind released neither code nor weights: this is
the trainable method (no conversion, no release).

What the method is, and where each fact was read:

- the image is cut into a grid of overlapping patches x_ij, each encoded on its own into one vector z_ij = f(x_ij); a
  masked convolutional context network gives c_ij, whose receptive field holds only the z above; the prediction of
  z_{i+k,j} is linear in c_ij; InfoNCE against the true latent and negatives from the other locations of the same image
  and the other images of the batch (the paper's §2, as restated by Tsang's review, sh-tsang.medium.com);
- the exact computation is the paper's Appendix A.2 pseudo-code (read as two independent transcriptions: a TensorFlow
  one with the pseudo-code's signature ``CPC(latents, target_dim=64, emb_scale=0.1, steps_to_ignore=2,
  steps_to_predict=3)``, and pl_bolts' ``CPCTask``, the same layers and loss summed over every offset): the context
  network (``ContextNetwork``) is 5 residual layers of [1x1 conv to 256, ReLU, 1x3 conv, pad one row on top, 2x1 'VALID'
  conv, ReLU, 1x1 conv back], then a ReLU; the targets are a 1x1 conv of the latents to 64 dims, the predictions one 1x1
  conv of the context per offset, times ``emb_scale`` 0.1; offsets k = steps_to_ignore + 1 .. steps_to_predict (the
  defaults predict 3 rows ahead only; sslhub's reading: with patches overlapping by half, rows 1 and 2 below share
  pixels or an edge with the context); every target of the batch is a candidate, the positive among them
  (``DirectionalCPC``); the loss sums over the offsets;
- v2's changes over CPC v1 (paperswithcode.com/method/cpc-v2, quoting the paper): a bigger ResNet (ResNet-161); layer
  normalisation instead of batch normalisation (batch statistics let the model read other patches and bypass the
  receptive field); contexts "from both directions rather than just spatially underneath"; per-patch "colour dropping"
  (two of the three colour channels dropped) and random horizontal flips.

sslhub's choices, each a deviation or a value that could not be read here (the paper's Appendix A text was not
reachable from this environment, only its pseudo-code and summaries):

- normalisation: the patch ResNet uses timm's ``norm_layer="groupnorm1"`` (GroupNorm with one group: each patch's map
  normalised over channels and space, per-channel affine), the layer norm of a conv map; no statistic crosses patches or
  images. The paper's ResNet-161 is not built: the presets use timm's ResNet-18 / ResNet-50 and z_ij is the mean of the
  last feature map of patch ij;
- grid: the full-size presets cut a 256 px crop into CPC v1's 7 x 7 grid of 64 px patches at stride 32 (recalled from
  arXiv 1807.03748 §3.3, not re-read) and keep A.2's offsets (3 rows ahead) and two directions. The 32 px preset cuts 16
  px patches at stride 8 (3 x 3, the same 50 % overlap), so only offset 1 fits; it predicts in all four directions with
  lr 4e-3 per 512. Measured on the built-in digits (5 epochs of batch 64, kNN 0.750 at random init): 0.864 with these
  settings, 0.828 with two directions, 0.806 predicting 2 rows ahead only, 0.789 / 0.839 at lr 1.6e-2 / 8e-3; the 7 x 7
  grid of 8 px patches at stride 4 (pl_bolts' CIFAR-10 grid) with A.2's offset 3 gave 0.722 -> 0.764 (those patches hold
  2 x 2 pixels of the 8 x 8 digits);
- directions: ``directions`` = 1 predicts downwards (CPC v1), 2 adds bottom-up (the default, the quoted "both
  directions"), 3 and 4 add left-to-right and right-to-left; each direction is the latent grid turned by ``torch.rot90``
  with its own context network and projections (the pseudo-code called once per direction), the encoder shared; the loss
  sums over directions;
- augmentation: resize of the short side to ``image_size * resize_ratio`` (300 / 260, recalled), a random ``image_size``
  crop, then per patch a flip (p 0.5) and colour dropping (``color_drop_p``; the dropped channels set to 0 in the
  normalised image); the final v2 pipeline's further per-patch augmentations are not implemented;
- optimisation: Adam (AdamW with weight decay 0), lr 4e-4 per 512 images, cosine, 200 epochs (not read: pl_bolts notes
  4e-4 for ImageNet);
- the released encoder applies the patch encoder as the linear evaluation does, on the patch grid of the whole image:
  ``last_hidden_state`` is the (B, D, rows, cols) grid of patch features, ``pooler_output`` their mean. A stock timm
  ResNet on the image computes something else, so there is no timm export."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from sslhub.backbones import Encoder, create_backbone
from sslhub.batch import Batch
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, register_method, register_preset
from sslhub.transforms import BILINEAR, ViewRecipe, Views, normalize

# timm's GroupNorm(1, C): normalises each patch's map over channels and space, the layer norm of a conv map
LAYER_NORM = {"norm_layer": "groupnorm1"}


@dataclass
class CPCv2Hparams(MethodHparams):
    """CPC v2 (arXiv 1905.09272): Appendix A.2's context network and loss; the grid, directions and optimiser are
    sslhub's choices where the paper could not be read (module docstring)."""

    optimizer: str = "adamw"
    lr: float = 4e-4
    lr_batch_size: int = 512
    weight_decay: float = 0.0
    epochs: int = 200
    patch_size: int = hparam(64, "side of each square patch in pixels (CPC v1: 64)")
    patch_stride: int = hparam(32, "pixels between neighbouring patches (CPC v1: 32, i.e. 50 % overlap)")
    target_dim: int = hparam(64, "dimension of the targets and predictions (A.2: 64)")
    emb_scale: float = hparam(0.1, "scale of the predictions before the dot products (A.2: 0.1)")
    steps_to_ignore: int = hparam(2, "offsets 1..steps_to_ignore are not predicted (A.2: 2)")
    steps_to_predict: int = hparam(3, "the farthest offset predicted, in rows (A.2: 3)")
    context_layers: int = hparam(5, "residual layers of the context network (A.2: 5)")
    context_dim: int = hparam(256, "hidden width of the context network's layers (A.2: 256)")
    directions: int = hparam(2, "1 top-down (CPC v1), 2 adds bottom-up, 3 and 4 add left-right and right-left")
    color_drop_p: float = hparam(1.0, "probability that a patch keeps one random colour channel of three (drops 2)")
    flip_p: float = hparam(0.5, "probability of a horizontal flip of each patch")
    resize_ratio: float = hparam(300 / 260, "short side resized to image_size x this before the random crop")

    def __post_init__(self):
        super().__post_init__()
        if self.patch_size < 1 or self.patch_stride < 1:
            raise ValueError(f"patch_size {self.patch_size} and patch_stride {self.patch_stride} must be >= 1")
        if not 0 <= self.steps_to_ignore < self.steps_to_predict:
            raise ValueError(
                f"steps_to_ignore ({self.steps_to_ignore}) must be >= 0 and below steps_to_predict "
                f"({self.steps_to_predict}): the offsets predicted are steps_to_ignore + 1 .. steps_to_predict"
            )
        if not 1 <= self.directions <= 4:
            raise ValueError(f"directions must be 1 to 4, got {self.directions}")
        if min(self.context_layers, self.context_dim, self.target_dim) < 1:
            raise ValueError("context_layers, context_dim and target_dim must be >= 1")
        if not (0 <= self.color_drop_p <= 1 and 0 <= self.flip_p <= 1) or self.resize_ratio < 1:
            raise ValueError("color_drop_p and flip_p must be probabilities and resize_ratio >= 1")


def grid_size(image_size: int, patch_size: int, stride: int) -> int:
    """Patches along one side: ``(image_size - patch_size) // stride + 1`` (224, 64, 32 -> 6; 32, 16, 8 -> 3)."""
    if image_size < patch_size:
        raise ValueError(f"an image of {image_size} px is smaller than one {patch_size} px patch")
    return (image_size - patch_size) // stride + 1


def patch_grid(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B, rows, cols, C, patch_size, patch_size) overlapping patches: patch (i, j) is
    ``images[:, :, i*stride : i*stride + patch_size, j*stride : j*stride + patch_size]`` (pixels past the last
    whole patch are left out)."""
    if images.ndim != 4:
        raise ValueError(f"patch_grid takes (B, C, H, W) images, got shape {tuple(images.shape)}")
    grid_size(min(images.shape[-2:]), patch_size, stride)
    patches = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # (B, C, rows, cols, p, p)
    return patches.permute(0, 2, 3, 1, 4, 5).contiguous()


def augment_patches(patches: torch.Tensor, color_drop_p: float, flip_p: float) -> torch.Tensor:
    """CPC v2's per-patch augmentation of one image's (rows, cols, C, p, p) patches: each patch flipped horizontally
    with probability ``flip_p``, and with probability ``color_drop_p`` all its colour channels but one (drawn
    uniformly) set to 0 ("colour dropping", in the normalised image). Draws from torch's global generator (seeded
    per image by sslhub's datasets)."""
    rows, cols, channels = patches.shape[:3]
    flat = patches.reshape(rows * cols, *patches.shape[2:])
    flip = torch.rand(len(flat)) < flip_p
    flat = torch.where(flip[:, None, None, None], flat.flip(-1), flat)
    drop = torch.rand(len(flat)) < color_drop_p
    kept = F.one_hot(torch.randint(0, channels, (len(flat),)), channels).to(flat.dtype)
    mask = torch.where(drop[:, None], kept, torch.ones_like(kept))
    return (flat * mask[:, :, None, None]).reshape(patches.shape)


class CPCPatchViews(ViewRecipe):
    """One view per image: the grid of augmented patches (rows, cols, C, p, p) of a random crop (resize the short
    side to ``resize``, random ``image_size`` crop, normalise, cut into patches, ``augment_patches``)."""

    def __init__(self, image_size, resize, patch_size, stride, mean, std, color_drop_p, flip_p):
        self.image = v2.Compose([v2.Resize(resize, interpolation=BILINEAR), v2.RandomCrop(image_size),
                                 *normalize(mean, std)])  # fmt: skip
        self.patch_size, self.stride = patch_size, stride
        self.color_drop_p, self.flip_p = color_drop_p, flip_p

    def make_views(self, image) -> Views:
        patches = patch_grid(self.image(image)[None], self.patch_size, self.stride)[0]
        return Views([augment_patches(patches, self.color_drop_p, self.flip_p)])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.image}, patch_size={self.patch_size}, stride={self.stride}, "
            f"color_drop_p={self.color_drop_p}, flip_p={self.flip_p})"
        )


class PatchGridEncoder(Encoder):
    """CPC v2's encoder as its linear evaluation applies it: the image cut into overlapping patches
    (``patch_grid``), each patch through the timm backbone on its own and its last feature map mean-pooled
    (``encode_patches``). ``forward_features``: the (B, D, rows, cols) grid of patch features; ``pool``: their
    mean over the grid."""

    def __init__(self, name: str, patch_size: int, stride: int, **kwargs):
        super().__init__()
        self.backbone = create_backbone(name, **kwargs)
        self.patch_size, self.stride = patch_size, stride
        self.num_features = self.backbone.num_features

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols, C, p, p) patches -> (B, D, rows, cols): z_ij = mean of the backbone's map of patch ij."""
        batch, rows, cols = patches.shape[:3]
        features = self.backbone.forward_features(patches.flatten(0, 2)).mean(dim=(2, 3))
        return features.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images, cut into the grid here, or (B, rows, cols, C, p, p) patch grids (the training views)
        -> the (B, D, rows, cols) grid of patch features."""
        if images.ndim == 6:
            return self.encode_patches(images)
        if images.ndim != 4:
            raise ValueError(
                f"the CPC patch encoder takes (B, C, H, W) images or (B, rows, cols, C, p, p) patches, got shape "
                f"{tuple(images.shape)}"
            )
        return self.encode_patches(patch_grid(images, self.patch_size, self.stride))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.mean(dim=(2, 3))

    @property
    def timm_model(self) -> nn.Module:
        return self.backbone

    @property
    def exports_to_timm(self) -> bool:
        return False

    @property
    def architecture_note(self) -> str:
        return (
            f"CPC v2 patch encoder: the backbone runs on each {self.patch_size} px patch of an overlapping grid "
            f"(stride {self.stride}) and pooler_output is the mean of the patch features, not the backbone on the "
            "whole image"
        )


class PixelCNNBlock(nn.Module):
    """One residual layer of the context network of the paper's Appendix A.2 pseudo-code (``pixelCNN``): 1x1 conv to
    ``hidden`` + ReLU, a 1x3 conv ('SAME' along the row), one row of zeros padded on top, a 2x1 'VALID' conv + ReLU
    (so an output row sees its own row and the one above), a 1x1 conv back to ``dim``, added to the input. Row i of
    the output depends on rows <= i of the input only."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.along_row = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.from_above = nn.Conv2d(hidden, hidden, (2, 1))
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.along_row(F.relu(self.reduce(x)))
        h = F.relu(self.from_above(F.pad(h, (0, 0, 1, 0))))  # one row of zeros on top, nothing below
        return x + self.expand(h)


class ContextNetwork(nn.Module):
    """The masked context network g of A.2: ``layers`` ``PixelCNNBlock``s then a ReLU; (B, D, rows, cols) -> c of
    the same shape, c_ij seeing z_{i'j'} for i' <= i only."""

    def __init__(self, dim: int, hidden: int, layers: int):
        super().__init__()
        self.blocks = nn.Sequential(*[PixelCNNBlock(dim, hidden) for _ in range(layers)])

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(latents))


class DirectionalCPC(nn.Module):
    """A.2's ``CPC`` for one prediction direction: the context network, the target projection (1x1 conv of the
    latents to ``target_dim``) and one prediction projection per offset k (1x1 conv of the context, times
    ``emb_scale``). Its loss: the sum over the offsets of InfoNCE, each prediction of row i scored by dot product
    against every target of the batch (the other locations of the same and the other images are the negatives), its
    positive the target of row i + k, same column."""

    def __init__(self, dim: int, hp: CPCv2Hparams):
        super().__init__()
        self.offsets = tuple(range(hp.steps_to_ignore + 1, hp.steps_to_predict + 1))
        self.emb_scale = hp.emb_scale
        self.context = ContextNetwork(dim, hp.context_dim, hp.context_layers)
        self.target = nn.Conv2d(dim, hp.target_dim, 1)
        self.predictors = nn.ModuleList(nn.Conv2d(dim, hp.target_dim, 1) for _ in self.offsets)

    def forward(self, latents: torch.Tensor):
        """(loss, correct top-1 predictions (a tensor), predictions) of a (B, D, rows, cols) latent grid."""
        batch, _, rows, cols = latents.shape
        context = self.context(latents)
        targets = self.target(latents).permute(0, 2, 3, 1).flatten(0, 2)  # (B * rows * cols, d), (b, i, j) order
        loss, correct, total = latents.new_zeros(()), latents.new_zeros((), dtype=torch.long), 0
        for k, predictor in zip(self.offsets, self.predictors, strict=True):
            predicted = predictor(context[:, :, : rows - k]) * self.emb_scale
            predicted = predicted.permute(0, 2, 3, 1).flatten(0, 2)  # (B * (rows - k) * cols, d)
            image = torch.arange(batch, device=latents.device)[:, None] * (rows * cols)
            below = torch.arange(k * cols, rows * cols, device=latents.device)[None, :]  # rows k.. in (i, j) order
            positives = (image + below).flatten()
            logits = predicted @ targets.t()
            loss = loss + F.cross_entropy(logits, positives)
            with torch.no_grad():
                correct += (logits.argmax(dim=1) == positives).sum()  # one host sync per step, in CPCv2.forward
                total += len(positives)
        return loss, correct, total


# the prediction directions: (name, quarter turns of torch.rot90 over (rows, cols) that make it "downwards")
DIRECTIONS = (("top_down", 0), ("bottom_up", 2), ("left_right", 3), ("right_left", 1))


@register_method("cpc_v2")
class CPCv2(SSLMethod):
    """CPC v2 (module docstring): ``encoder`` (``PatchGridEncoder``, released) and one ``DirectionalCPC`` per
    direction (``heads``). ``forward`` takes the recipe's patch grids (B, rows, cols, C, p, p), or images
    (B, C, H, W), which the encoder cuts into patches without augmentation."""

    Hparams = CPCv2Hparams
    paper = "Data-Efficient Image Recognition with Contrastive Predictive Coding (CPC v2)"
    arxiv = "1905.09272"
    citation = (
        "@InProceedings{henaff2020data,\n  author    = {H{\\'e}naff, Olivier J. and Srinivas, Aravind and De Fauw, "
        "Jeffrey and Razavi, Ali and Doersch, Carl and Eslami, S. M. Ali and van den Oord, Aaron},\n  title     = "
        "{Data-Efficient Image Recognition with Contrastive Predictive Coding},\n  booktitle = {ICML},\n  year      "
        "= {2020},\n}"
    )
    released = (
        "patch encoder (timm ResNet with layer norm on each patch of the overlapping grid; pooler_output: the mean "
        "of the patch features, last_hidden_state: their grid)"
    )
    # The paper trains linear classifiers on the mean-pooled patch features; its recipe was not verified here.
    linear_recipe = LinearRecipe("sslhub linear protocol (the paper's linear recipe not verified)", 0.1, 100, 256)
    tiny_preset = "cpc_v2_resnet18_32px"
    tiny_overrides = {"backbone": "test_resnet", "context_layers": 1, "context_dim": 8, "target_dim": 8}

    # Evaluation: Bilinear resize of the short side, centre crop to ``image_size``, normalisation; the encoder cuts
    # the patch grid itself.
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        rows = grid_size(config.image_size, hp.patch_size, hp.patch_stride)
        if hp.steps_to_predict >= rows:
            raise ValueError(
                f"steps_to_predict {hp.steps_to_predict} needs a grid of more than {hp.steps_to_predict} rows; "
                f"{config.image_size} px with {hp.patch_size} px patches at stride {hp.patch_stride} gives {rows}"
            )
        self.encoder = self.build_encoder(config)
        self.heads = nn.ModuleDict(
            (name, DirectionalCPC(self.encoder.num_features, hp)) for name, _ in DIRECTIONS[: hp.directions]
        )

    @classmethod
    def build_encoder(cls, config, **backbone_overrides) -> PatchGridEncoder:
        hp = cls.Hparams(**config.method_kwargs)
        kwargs = {**config.backbone_kwargs, **backbone_overrides}
        return PatchGridEncoder(config.backbone, hp.patch_size, hp.patch_stride, **kwargs)

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        return CPCPatchViews(cfg.image_size, round(cfg.image_size * hp.resize_ratio), hp.patch_size, hp.patch_stride,
                             cfg.image_mean, cfg.image_std, hp.color_drop_p, hp.flip_p)  # fmt: skip

    def forward(self, batch: Batch) -> MethodOutput:
        if len(batch.views) != 1:
            raise ValueError(f"CPC v2 takes 1 view (the patch grid), got {len(batch.views)}")
        latents = self.encoder.forward_features(batch.views[0])
        loss, correct, total = latents.new_zeros(()), 0, 0
        for name, quarter_turns in DIRECTIONS[: len(self.heads)]:
            head_loss, head_correct, head_total = self.heads[name](torch.rot90(latents, quarter_turns, dims=(2, 3)))
            loss, correct, total = loss + head_loss, correct + head_correct, total + head_total
        return MethodOutput(loss, {"cpc_accuracy": float(correct) / max(1, total)})


for _name, _backbone in (("cpc_v2_resnet18", "resnet18"), ("cpc_v2_resnet50", "resnet50")):
    register_preset(
        Preset(
            _name,
            "cpc_v2",
            _backbone,
            image_size=256,
            backbone_kwargs=dict(LAYER_NORM),
            description=f"CPC v2 on a timm {_backbone} with layer norm (GroupNorm(1)) as the patch encoder, 256 px: "
            "7 x 7 grid of 64 px patches at stride 32, A.2's context network and loss (3 rows ahead), top-down and "
            "bottom-up, colour dropping and flips per patch, Adam lr 4e-4 per 512",
        )
    )

register_preset(
    Preset(
        "cpc_v2_resnet18_32px",
        "cpc_v2",
        "resnet18",
        image_size=32,
        backbone_kwargs=dict(LAYER_NORM),
        method_kwargs={
            "patch_size": 16,
            "patch_stride": 8,
            "steps_to_ignore": 0,
            "steps_to_predict": 1,
            "directions": 4,
            "lr": 4e-3,
        },
        description="CPC v2, ResNet-18 with layer norm for 32 px images: 3 x 3 grid of 16 px patches at stride 8 "
        "(the 50 % overlap of the full grid), A.2's context network and loss 1 row ahead in four directions, Adam lr "
        "4e-3 per 512",
    )
)
