"""PixPro: pixel-to-propagation consistency between two views, with a momentum encoder.

Xie, Lin, Zhang, Cao, Lin & Hu, "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual
Representation Learning", arXiv 2011.10043 (CVPR 2021). Follows zdaxie/PixPro (``contrast/models/PixPro.py``,
``contrast/resnet.py`` with ``head_type='early_return'``, ``contrast/data/transform.py`` (``aug='BYOL'``),
``contrast/data/transform_coord.py``, ``contrast/data/dataset.py`` (two crops and their coordinates),
``contrast/lars.py``, ``contrast/lr_scheduler.py``, ``main_pretrain.py``, ``tools/pixpro_base_r50_400ep.sh``).

Equations (§3): the C5 feature map of each view goes through a projector (1x1-conv MLP 2048-4096-256 with BatchNorm,
``MLP2d``). Two pixels i (view 1) and j (view 2) are a positive pair when the distance of their bin centres in the
image, divided by the larger of the two views' bin diagonals, is below T = 0.7 (``regression_loss``'s ``pos_mask``).
The pixel propagation module: ``y_i = Σ_j s(x_i, x_j) g(x_j)`` with ``s(x_i, x_j) = max(cos(x_i, x_j), 0)^γ``, γ = 2,
and g a 1x1 conv (``--pixpro-transform-layer 1``), its output L2-normalised (``featprop``). The loss (eq. 3, 4):
``L = -2 mean_b Σ_ij m_ij cos(y_i, x'_j) / (Σ_ij m_ij + 1e-6)`` for the propagated online pixels y of one view and the
momentum pixels x' of the other, summed over both directions. The momentum encoder and projector follow
``θ' ← m θ' + (1 - m) θ`` with m = 1 - (1 - 0.99)(cos(π k / K) + 1) / 2. The optional instance branch (§3.4, off in
the released runs: ``--pixpro-ins-loss-weight 0``) is BYOL's: an instance projector (MLP2d) and predictor on the
map, average pooled, against the momentum instance projector, ``-2 cos`` symmetrised, times its weight.

Deviations: crops draw with torch's random generator (the authors': Python's ``random``); the momentum copies update
after each optimizer step (the official code at the start of the next forward pass, the same sequence) and K is the
trainer's step count (theirs: ``int(N / world / batch x epochs)``, which can differ by a fraction of an epoch with
``drop_last``); the instance branch averages the whole map (theirs: ``AvgPool2d(7)``, the same on a 7x7 map); LARS has
no ε = 1e-8 in its trust ratio; mixed precision (apex O1) is the trainer's option, not a hyperparameter.
``pixpro_resnet18_32px`` keeps a 4x4 map with timm's ``output_stride=8`` (dilated layer3 / layer4, as the authors'
``resnet50_16s`` dilates layer4; at stride 32 a 32 px image gives one pixel, no pairs). Not verified: the released
files' exact top-level entries (the Drive files are not read here; ``publish_model.py`` keeps ``{'model': ...}``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import ConvMlp
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.losses import negative_cosine
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress, cosine_schedule, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import (
    BILINEAR,
    BoxedViews,
    CropWithBox,
    blur,
    color_distortion,
    solarize,
    view,
)

TRANSFORM_LAYERS = (0, 1, 2)


@dataclass
class PixProHparams(MethodHparams):
    """Defaults of ``tools/pixpro_base_r50_400ep.sh`` on ``contrast/option.py``: LARS (``contrast/lars.py``: trust
    coefficient 1e-3, biases and BatchNorm parameters neither decayed nor adapted) with SGD momentum 0.9 at base lr
    1.0 per 256 images (linear scaling, 128 per GPU x 8), weight decay 1e-5, 5 warm-up epochs from lr / 100
    (``GradualWarmupScheduler``, multiplier 100) then cosine to 1e-6 per step, 400 epochs, SyncBN in encoder and heads;
    γ 2, momentum 0.99, positive threshold 0.7, similarity clamp 0, one value-transform layer, no instance branch."""

    optimizer: str = "lars"
    lr: float = 1.0
    weight_decay: float = 1e-5
    warmup_epochs: float = 5
    warmup_start_ratio: float = 0.01
    min_lr: float = 1e-6
    epochs: int = 400
    sync_batch_norm: bool = True
    momentum: float = hparam(0.99, "base momentum of the momentum encoder, raised to 1 on a cosine (--pixpro-momentum)")
    gamma: float = hparam(2.0, "sharpness exponent γ of the propagation similarity (--pixpro-p)")
    pos_ratio: float = hparam(0.7, "positive pairs: bin-centre distance / larger bin diagonal below this T")
    clamp_value: float = hparam(0.0, "similarities below this are raised to it before ^γ (--pixpro-clamp-value)")
    transform_layers: int = hparam(1, "value transform g: 0 identity, 1 a 1x1 conv, 2 an MLP2d 256-256-256")
    instance_loss_weight: float = hparam(0.0, "weight of the BYOL-style instance branch; 0: no branch (the release)")
    projector_hidden_dim: int = hparam(4096, "hidden width of the 1x1-conv projector (MLP2d inner_dim)")
    embed_dim: int = hparam(256, "pixel embedding size, output of the projector (MLP2d out_dim)")
    crop_scale_min: float = hparam(0.08, "smallest area fraction of the random resized crop (--crop)")
    blur_prob: tuple[float, float] = hparam((1.0, 0.1), "Gaussian-blur probability of view 1 and view 2 (aug BYOL)")
    solarize_prob: tuple[float, float] = hparam((0.0, 0.2), "solarisation probability of view 1 and view 2")

    def __post_init__(self):
        super().__post_init__()
        if self.transform_layers not in TRANSFORM_LAYERS:
            raise ValueError(f"transform_layers {self.transform_layers!r}: expected one of {TRANSFORM_LAYERS}")
        if self.gamma <= 0 or self.pos_ratio <= 0 or self.instance_loss_weight < 0:
            raise ValueError(f"gamma {self.gamma} and pos_ratio {self.pos_ratio} must be > 0, "
                             f"instance_loss_weight {self.instance_loss_weight} >= 0")  # fmt: skip


def mlp2d(in_dim: int, hidden_dim: int, out_dim: int) -> ConvMlp:
    """``MLP2d``: 1x1 conv (bias) -> BatchNorm2d -> ReLU -> 1x1 conv (bias), applied at every pixel."""
    return ConvMlp(in_dim, hidden_dim, out_dim, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d)


def value_transform(layers: int, dim: int) -> nn.Module:
    """g of the propagation module: identity, a 1x1 conv with bias, or ``MLP2d(dim, dim, dim)``."""
    if layers == 0:
        return nn.Identity()
    return nn.Conv2d(dim, dim, kernel_size=1) if layers == 1 else mlp2d(dim, dim, dim)


# ---- the equations ---------------------------------------------------------------------------------------------------
def bin_centres(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (B, H*W, 2) of the H x W feature bins of views whose boxes are ``boxes`` (B, 4) = (x0, y0, x1, y1) in
    normalised image coordinates, and each view's bin diagonal (B,)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    bin_width, bin_height = (x1 - x0) / width, (y1 - y0) / height
    xs = torch.arange(width, dtype=boxes.dtype, device=boxes.device) + 0.5
    ys = torch.arange(height, dtype=boxes.dtype, device=boxes.device) + 0.5
    centre_x = (xs[None, None, :] * bin_width[:, None, None] + x0[:, None, None]).expand(-1, height, width)
    centre_y = (ys[None, :, None] * bin_height[:, None, None] + y0[:, None, None]).expand(-1, height, width)
    centres = torch.stack([centre_x, centre_y], dim=-1).reshape(len(boxes), height * width, 2)
    return centres, torch.sqrt(bin_width**2 + bin_height**2)


def positive_mask(boxes_q: torch.Tensor, boxes_k: torch.Tensor, height: int, width: int, threshold: float):
    """(B, HW, HW) float mask: 1 where pixel i of view q and pixel j of view k lie closer in the image than
    ``threshold`` x the larger bin diagonal of the two views (§3.1, ``regression_loss``'s ``pos_mask``)."""
    centres_q, diagonal_q = bin_centres(boxes_q, height, width)
    centres_k, diagonal_k = bin_centres(boxes_k, height, width)
    distance = torch.linalg.vector_norm(centres_q[:, :, None] - centres_k[:, None], dim=-1)
    return (distance / torch.maximum(diagonal_q, diagonal_k)[:, None, None] < threshold).float()


def propagate(features: torch.Tensor, values: torch.Tensor, gamma: float, clamp_value: float = 0.0) -> torch.Tensor:
    """The pixel propagation module (eq. 1, 2, ``featprop``): ``y_i = Σ_j max(cos(x_i, x_j), clamp)^γ ĝ_j`` over the
    pixels j of the same map, ĝ = the L2-normalised value transform ``values`` (B, C, H, W)."""
    x = F.normalize(features.flatten(2), dim=1)
    similarity = torch.einsum("bci,bcj->bij", x, x).clamp(min=clamp_value)
    if gamma < 1:
        similarity = similarity + 1e-6
    g = F.normalize(values.flatten(2), dim=1)
    return torch.einsum("bcj,bij->bci", g, similarity**gamma).reshape(values.shape)


def pixel_consistency(propagated: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """eq. 3 as ``regression_loss``: ``-2 mean_b Σ_ij m_ij cos(y_i, x'_j) / (Σ_ij m_ij + 1e-6)`` for the (B, C, H, W)
    propagated online map and the momentum map of the other view (no gradient into ``targets``)."""
    y = F.normalize(propagated.flatten(2), dim=1)
    x = F.normalize(targets.detach().flatten(2), dim=1)
    cosine = torch.einsum("bci,bcj->bij", y, x)
    return -2 * ((cosine * mask).sum((1, 2)) / (mask.sum((1, 2)) + 1e-6)).mean()


# ---- the authors' release ------------------------------------------------------------------------------------------
MLP2D_NAMES = {"linear1.": "fc1.", "bn1.": "norm.", "linear2.": "fc2."}


def _mlp2d(reader: KeyReader, prefix: str) -> dict[str, torch.Tensor]:
    """An ``MLP2d`` under ``prefix`` in timm ``ConvMlp`` names."""
    state = reader.take(prefix)
    for key in state:
        if not any(key.startswith(name) for name in MLP2D_NAMES):
            raise CheckpointError(
                f"{reader.source}: {prefix}{key} is not a key of PixPro's MLP2d ({list(MLP2D_NAMES)})"
            )
    return {next(new + key[len(old) :] for old, new in MLP2D_NAMES.items() if key.startswith(old)): v
            for key, v in state.items()}  # fmt: skip


def convert_pixpro(container, source: str) -> Converted:
    """zdaxie/PixPro ``main_pretrain.py`` ``save_checkpoint`` (``publish_model.py`` keeps only ``model``): ``model`` =
    DDP(PixPro): ``module.encoder.*`` / ``module.encoder_k.*`` (``contrast/resnet.py`` with ``early_return``:
    torchvision ResNet names, no ``fc``), ``module.projector(_k).{linear1,bn1,linear2}.*`` (``MLP2d``: 1x1 convs with
    bias, BatchNorm2d) and ``module.value_transform.*`` (1x1 conv for transform layer 1, an MLP2d for 2, absent for
    0). The released encoder is the online ``encoder``; head sizes and the transform layer are read from the file."""
    reader = KeyReader(entry(container, "model", source), source)
    encoders = {name: reader.take(f"module.{name}.") for name in ("encoder", "encoder_k")}
    for name, state in encoders.items():
        if not state:
            raise CheckpointError(f"{source}: no 'module.{name}.' keys: not a PixPro checkpoint")
    projectors = {name: _mlp2d(reader, f"module.{name}.") for name in ("projector", "projector_k")}
    transform = reader.take("module.value_transform.")
    reader.finish()
    if "fc1.weight" not in projectors["projector"]:
        raise CheckpointError(f"{source}: key 'module.projector.linear1.weight' is missing")
    hidden, in_dim = projectors["projector"]["fc1.weight"].shape[:2]
    layers = 0 if not transform else 1 if set(transform) == {"weight", "bias"} else 2
    method = {**prefixed("projector.", projectors["projector"]), **prefixed("projector_k.", projectors["projector_k"])}
    if layers == 1:
        method |= prefixed("value_transform.", transform)
    elif layers == 2:
        method |= prefixed("value_transform.", _mlp2d(KeyReader(transform, source), ""))
    overrides = {
        "projector_hidden_dim": hidden,
        "embed_dim": projectors["projector"]["fc2.weight"].shape[0],
        "transform_layers": layers,
        "instance_loss_weight": 0.0,
    }
    copies = {"encoder.backbone.": encoders["encoder"], "encoder_k.backbone.": encoders["encoder_k"]}
    return Converted("pixpro", encoders["encoder"], method, copies, overrides, leftover_entries(container, {"model"}))


def _is_pixpro(container) -> bool:
    model = container.get("model") if isinstance(container, dict) else None
    return (
        isinstance(model, dict)
        and "module.projector_k.linear1.weight" in model
        and any(key.startswith("module.encoder_k.") for key in model)
    )


PIXPRO_LAYOUT = CheckpointLayout("pixpro", _is_pixpro, convert_pixpro)


@register_method("pixpro")
class PixPro(SSLMethod):
    """Online encoder + projector + pixel propagation module, momentum encoder + projector (module docstring). Each
    view is its own forward pass (BatchNorm per view), the momentum networks in training mode without gradient, as
    ``PixPro.forward``; the view recipe records each view's box in the image (``extras["boxes"]``), from which the
    positive pixel pairs follow. Released: the online encoder (the ResNet without projector, as ``main_linear.py``
    and ``convert_pretrain_to_d2.py`` read ``module.encoder.*``); the paper evaluates it by detection / segmentation
    transfer of the whole ResNet (C4 / FPN); ``pooler_output`` is the average-pooled C5 map."""

    Hparams = PixProHparams
    paper = "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual Representation Learning"
    arxiv = "2011.10043"
    citation = (
        "@inproceedings{xie2021propagate,\n  title={Propagate Yourself: Exploring Pixel-Level Consistency for "
        "Unsupervised Visual Representation Learning},\n  author={Xie, Zhenda and Lin, Yutong and Zhang, Zheng and "
        "Cao, Yue and Lin, Stephen and Hu, Han},\n  booktitle={CVPR},\n  year={2021}\n}"
    )
    released = (
        "online encoder (ResNet without projector; the paper transfers the whole ResNet to detection / segmentation; "
        "pooler_output is the average-pooled last feature map)"
    )
    # main_linear.py with contrast/option.py's linear defaults: SGD lr 30 at batch 256, no weight decay, 100 epochs,
    # 5 warm-up epochs then cosine (the README states no linear result)
    linear_recipe = LinearRecipe("zdaxie/PixPro main_linear.py (contrast/option.py)", 30.0, 100, 256, warmup_epochs=5)
    checkpoint_layouts = (PIXPRO_LAYOUT,)
    tiny_preset = "pixpro_resnet18_32px"
    tiny_overrides = {"projector_hidden_dim": 64, "embed_dim": 32}

    # Evaluation: ``get_transform('val')``: bilinear resize of the short side to size + 32 (256), centre crop 224,
    # ImageNet normalisation (images of 64 px or less are not cropped, as sslhub's default).
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        self.projector = mlp2d(self.encoder.num_features, hp.projector_hidden_dim, hp.embed_dim)
        self.encoder_k = copy.deepcopy(self.encoder).requires_grad_(False)
        self.projector_k = copy.deepcopy(self.projector).requires_grad_(False)
        self.value_transform = value_transform(hp.transform_layers, hp.embed_dim)
        if hp.instance_loss_weight > 0:
            self.projector_instance = mlp2d(self.encoder.num_features, hp.projector_hidden_dim, hp.embed_dim)
            self.projector_instance_k = copy.deepcopy(self.projector_instance).requires_grad_(False)
            self.predictor = mlp2d(hp.embed_dim, hp.projector_hidden_dim, hp.embed_dim)

    def view_recipe(self):
        """``get_transform('BYOL')``: per view a random resized crop (area ``crop_scale_min``-1, bilinear) and flip
        recording the view's box (``CropWithBox``), colour jitter 0.4 / 0.4 / 0.2 / 0.1 with p 0.8, grayscale p 0.2,
        blur p 1.0 / 0.1, solarisation p 0 / 0.2, ImageNet mean / std."""
        cfg, hp = self.config, self.hparams
        geometric = CropWithBox(cfg.image_size, (hp.crop_scale_min, 1.0), BILINEAR)
        pairs = []
        for blur_p, solarize_p in zip(hp.blur_prob, hp.solarize_prob, strict=True):
            pieces = [color_distortion(saturation=0.2), blur(blur_p)]
            pieces += [solarize(solarize_p)] if solarize_p > 0 else []
            pairs.append((geometric, view(*pieces, mean=cfg.image_mean, std=cfg.image_std)))
        return BoxedViews(pairs)

    def momentum_schedule(self, k: int, total: int) -> float:
        """``_momentum_update_key_encoder``: m_k = 1 - (1 - m)(cos(π k / K) + 1) / 2."""
        return cosine_schedule(self.hparams.momentum, 1.0, TrainingProgress(k, total, 1))

    def momentum_pairs(self):
        pairs = [(self.encoder, self.encoder_k), (self.projector, self.projector_k)]
        if self.hparams.instance_loss_weight > 0:
            pairs.append((self.projector_instance, self.projector_instance_k))
        return pairs

    def momentum_at(self, progress: TrainingProgress) -> float:
        """The official update at the start of forward k + 1 (k counted from 0, then incremented) moves the copies
        towards the online weights after optimizer step k with m_{k+1}."""
        return self.momentum_schedule(progress.step + 1, progress.total_steps)

    def propagated(self, projection: torch.Tensor) -> torch.Tensor:
        return propagate(projection, self.value_transform(projection), self.hparams.gamma, self.hparams.clamp_value)

    def instance_loss(self, features, target_features) -> torch.Tensor:
        """The instance branch (§3.4): ``-2 cos`` of the pooled prediction of one view and the pooled momentum
        instance projection of the other, symmetrised."""
        predictions = [self.predictor(self.projector_instance(f)).mean((2, 3)) for f in features]
        with torch.no_grad():
            targets = [self.projector_instance_k(f).mean((2, 3)) for f in target_features]
        return 2 * (negative_cosine(predictions[0], targets[1]) + negative_cosine(predictions[1], targets[0]))

    def forward(self, batch: Batch) -> MethodOutput:
        hp, views = self.hparams, batch.views
        if len(views) != 2:
            raise ValueError(f"PixPro takes 2 views, got {len(views)}")
        boxes = batch.extras.get("boxes")
        if boxes is None or tuple(boxes.shape) != (len(views[0]), 2, 4):
            found = None if boxes is None else tuple(boxes.shape)
            raise ValueError(f"PixPro needs the views' boxes in the image, batch.extras['boxes'] of shape "
                             f"({len(views[0])}, 2, 4) as its view recipe makes them; got {found}")  # fmt: skip
        features = [self.encoder.forward_features(x) for x in views]
        propagated = [self.propagated(self.projector(f)) for f in features]
        with torch.no_grad():
            target_features = [self.encoder_k.forward_features(x) for x in views]
            targets = [self.projector_k(f) for f in target_features]
        boxes = boxes.to(device=features[0].device, dtype=torch.float32)
        mask = positive_mask(boxes[:, 0], boxes[:, 1], *features[0].shape[-2:], hp.pos_ratio)
        pixel = pixel_consistency(propagated[0], targets[1], mask)
        pixel = pixel + pixel_consistency(propagated[1], targets[0], mask.transpose(1, 2))
        if hp.instance_loss_weight == 0:
            return MethodOutput(pixel, {"positive_pairs": float(mask.sum((1, 2)).mean())})
        instance = self.instance_loss(features, target_features)
        return MethodOutput(pixel + hp.instance_loss_weight * instance, {"instance_loss": float(instance)})


# ---- presets -------------------------------------------------------------------------------------------------------
register_preset(
    Preset(
        "pixpro_resnet18",
        "pixpro",
        "resnet18",
        description="PixPro on a timm resnet18, 224 px (a 7x7 map), the 400-epoch recipe of the ResNet-50",
    )
)
register_preset(
    Preset(
        "pixpro_resnet50",
        "pixpro",
        "resnet50",
        description="PixPro ResNet-50, tools/pixpro_base_r50_400ep.sh: LARS lr 1.0 per 256, wd 1e-5, 5 warm-up "
        "epochs, γ 2, T 0.7, momentum 0.99, 1x1-conv value transform, no instance branch, 400 epochs",
    )
)
# A ResNet-18 on 32 px images ends in a 1x1 map: one pixel, no pixel pairs to contrast. timm's output_stride=8
# dilates layer3 and layer4 instead of striding them (as the authors' own resnet50_16s dilates layer4,
# contrast/resnet.py layer4_dilation), so the map stays 4x4: the same weights, a grid close to the 7x7 of 224 px. The
# authors publish no small-image recipe: the ImageNet one, without blur (solo-learn's CIFAR BYOL views, the
# augmentation PixPro uses).
register_preset(
    Preset(
        "pixpro_resnet18_32px",
        "pixpro",
        "resnet18",
        image_size=32,
        backbone_kwargs={"output_stride": 8},
        method_kwargs={"blur_prob": (0.0, 0.0)},
        description="PixPro, ResNet-18 for 32 px images with output stride 8 (a 4x4 map): the 400-epoch recipe "
        "without blur",
    )
)

# zdaxie/PixPro README, "PixPro pre-trained models": 400 epochs, ResNet-50, no instance branch, Google Drive only.
# The README gives transfer results only, no ImageNet accuracy: Pascal VOC Faster R-CNN C4 AP 60.2 / AP50 83.8 / AP75
# 67.7, COCO Mask R-CNN C4 1x bbox AP 40.5 / mask AP 35.3.
register_pretrained(
    PretrainedTag(
        "pixpro_resnet50",
        "in1k_400ep",
        url="https://drive.google.com/file/d/1Ox2RoFbTrrllbwvITdZvwkNnKUQSUPmV/view?usp=sharing",
        full_url="https://drive.google.com/file/d/1Ox2RoFbTrrllbwvITdZvwkNnKUQSUPmV/view?usp=sharing",
        layout="pixpro",
        license="mit",
        epochs=400,
        download_name="pixpro_base_r50_400ep.pth",
        source="zdaxie/PixPro README (pixpro_base_r50_400ep; no ImageNet accuracy published; transfer: Pascal VOC "
        "Faster R-CNN C4 AP 60.2 / AP50 83.8 / AP75 67.7, COCO Mask R-CNN C4 1x bbox AP 40.5 / mask AP 35.3)",
    )
)
