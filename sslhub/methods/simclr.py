"""SimCLR v1 and v2: two augmented views of each image, a projection head and the NT-Xent loss over the global batch.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations", arXiv
2002.05709 (ICML 2020); Chen, Kornblith, Swersky, Norouzi, Hinton, "Big Self-Supervised Models are Strong
Semi-Supervised Learners", arXiv 2006.10029 (NeurIPS 2020). Follows google-research/simclr (TensorFlow 1): v1 at its
first commit be133b3 (``run.py`` flags, ``model.py``, ``model_util.py``, ``objective.py``, ``data_util.py``,
``resnet.py``), v2 at HEAD. The authors publish TensorFlow checkpoints only; sslhub reads their PyTorch conversions
by tonylins/simclr-converter (v1) and Separius/SimCLRv2-Pytorch (v2), and computes what the TensorFlow model computes
(its stem max-pool pads 'SAME', ``tf_padding="max_pool"``), not what the converters' PyTorch models compute.

Deviations from the official code, all in the data pipeline or the initialisation, none in the objective:

- colour distortion: torchvision's contrast (about the grayscale mean; TF: per-channel means), saturation (blend with
  grayscale; TF: HSV scaling) and hue; the four in random order and clipped to [0, 1] after each, as TF;
- blur: σ ~ U[0.1, 2] drawn per image (TF ``batch_random_blur``: one σ per view and batch, applied to a random half of
  the images), reflect padding (TF: zero 'SAME' padding); same kernel (10 % of the side, odd);
- crop: torchvision's ``RandomResizedCrop`` (10 tries, then a centre crop; TF: ``sample_distorted_bounding_box`` with
  100 tries and ``min_object_covered=0.1``, then the whole image), bicubic resize as TF;
- initialisation: timm's convolutions (Kaiming normal, fan-out; TF: variance scaling, fan-in) with the last BN of each
  block at γ = 0 in both; head layers N(0, 0.01) as ``linear_layer``;
- LARS: ``sslhub.optim.LARS`` keeps lr outside the momentum buffer (TF ``classic_momentum`` puts it inside): the same
  update at constant lr, slightly different while warm-up and cosine change it;
- 32 px presets: timm's ImageNet stem (TF uses a 3x3 stride-1 stem without max-pool at 32 px, ``cifar_stem``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.transforms import v2

from sslhub.backbones import (
    TF_PADDINGS,
    Encoder,
    TimmEncoder,
    create_backbone,
    pool_features,
    tf_padding_note,
    tf_same_padding_,
)
from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import gather_with_grad, rank
from sslhub.heads import MLPHead
from sslhub.losses import (
    alignment_loss,
    debiased_nt_xent,
    flat_nce,
    hard_negative_nt_xent,
    nt_xent,
    uniformity_loss,
)
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import (
    BICUBIC,
    MultiView,
    blur,
    color_distortion,
    crop,
    flip,
    grayscale,
    simclr_blur_kernel,
    view,
)

BRIGHTNESS = ("additive", "multiplicative")
LOSSES = ("nt_xent", "debiased", "hard_negative", "flat_nce", "alignment_uniformity")


@dataclass
class SimCLRHparams(MethodHparams):
    """Defaults of SimCLR v1 (arXiv 2002.05709 §2.3 "Default setting"; ``run.py`` flags at be133b3): LARS, lr 0.3 per
    256 images (linear scaling, 4.8 at batch 4096), weight decay 1e-6, 10 warm-up epochs then cosine, 100 epochs,
    τ = 0.1, colour distortion of strength 1 with blur, global BatchNorm (``--global_bn``), the 2-layer projection
    head ``nl_0`` / ``nl_1`` to 128-d. The paper's square-root alternative, 0.075·√bs, is ``lr=0.075,
    lr_batch_size=1, lr_scaling="sqrt"``.

    ``loss`` other than ``"nt_xent"`` is SimCLR-style training with another objective, not SimCLR's recipe:
    ``"debiased"`` (DCL, arXiv 2007.00224 eq. 6, ``tau_plus``), ``"hard_negative"`` (HCL, arXiv 2010.04592,
    ``tau_plus`` and ``beta``), ``"flat_nce"`` (arXiv 2107.01152) over the same gathered negatives, and
    ``"alignment_uniformity"`` (arXiv 2005.10242: alignment + the mean uniformity of the two views, on this process's
    batch only); see ``sslhub.losses``. Hyperparameters tuned for NT-Xent are kept."""

    optimizer: str = "lars"
    lr: float = 0.3
    lr_batch_size: int = 256
    lr_scaling: str = "linear"
    weight_decay: float = 1e-6
    warmup_epochs: float = 10
    epochs: int = 100
    sync_batch_norm: bool = True  # --global_bn: BatchNorm statistics over all TPU cores
    temperature: float = hparam(0.1, "temperature τ of NT-Xent, eq. 1 (--temperature)")
    embed_dim: int = hparam(128, "output dimension of the projection head (--head_proj_dim / --proj_out_dim)")
    proj_hidden_dim: int | None = hparam(None, "hidden width of the projection head (None: the backbone's width)")
    num_proj_layers: int = hparam(2, "Linear-BN layers of the projection head (v1: nl_0, nl_1; --num_proj_layers)")
    crop_scale_min: float = hparam(0.08, "smallest area fraction of the random resized crop")
    color_strength: float = hparam(1.0, "strength s of the colour distortion (--color_jitter_strength)")
    brightness: str = hparam("additive", "brightness jitter: 'additive' (v1, tf.image.random_brightness) or "
                                         "'multiplicative' (v2, x · U[1 - 0.8s, 1 + 0.8s])")  # fmt: skip
    blur: bool = hparam(True, "Gaussian blur with probability 0.5 (--use_blur)")
    tf_padding: str | None = hparam(None, "'max_pool': the stem max-pool pads as TF 'SAME' (the released TF ResNets)")
    loss: str = hparam("nt_xent", f"objective, one of {LOSSES} (not SimCLR's recipe unless 'nt_xent')")
    tau_plus: float = hparam(0.1, "class prior τ+ of the debiased / hard-negative losses (DCL's default)")
    beta: float = hparam(1.0, "hardness β of the hard-negative loss (HCL's default)")

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: expected one of {LOSSES}")
        if self.brightness not in BRIGHTNESS:
            raise ValueError(f"brightness {self.brightness!r}: expected one of {BRIGHTNESS}")
        if self.tf_padding is not None and self.tf_padding not in TF_PADDINGS:
            raise ValueError(f"tf_padding {self.tf_padding!r}: expected one of {TF_PADDINGS} or None")
        if self.num_proj_layers < 1:
            raise ValueError(f"num_proj_layers must be at least 1, got {self.num_proj_layers}")


@dataclass
class SimCLRV2Hparams(SimCLRHparams):
    """Defaults of SimCLR v2 (arXiv 2006.10029 §4, "Settings and implementation details"; ``run.py`` at HEAD): LARS
    with lr 0.1·√bs (6.4 at batch 4096), warm-up over the first 5 % of the 800 epochs, weight decay 1e-4, τ = 0.1, a
    3-layer projection head (``--num_proj_layers 3``), multiplicative brightness (``impl='simclrv2'``).
    ``ft_proj_selector`` picks how much of the head the released encoder's pooled output goes through."""

    lr: float = 0.1
    lr_batch_size: int = 1
    lr_scaling: str = "sqrt"
    weight_decay: float = 1e-4
    warmup_epochs: float = 40
    epochs: int = 800
    num_proj_layers: int = 3
    brightness: str = "multiplicative"
    ft_proj_selector: int = hparam(
        0,
        "pooled output after this many head layers (--ft_proj_selector): 0 = the ResNet feature (linear eval), "
        "1 = the paper's fine-tuning layer, -1 = the whole head",
    )

    def __post_init__(self):
        super().__post_init__()
        if not -(self.num_proj_layers + 1) <= self.ft_proj_selector <= self.num_proj_layers:
            raise ValueError(f"ft_proj_selector {self.ft_proj_selector} outside the {self.num_proj_layers}-layer head")


# ---- networks ------------------------------------------------------------------------------------------------------
def projection_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> MLPHead:
    """``model_util.projection_head`` ('nonlinear'): ``num_layers`` x [Linear without bias, BatchNorm], ReLU after all
    but the last; the hidden BatchNorms are centred, the last one is not (``center=False``: learned γ, β = 0).
    v1 (be133b3, ``num_nlh_layers=1``): 2 layers, ``nl_0`` / ``nl_1``; v2: 3 layers (Separius' ``ContrastiveHead``,
    ``layers.0`` ... ``layers.7``). Linear weights ~ N(0, 0.01) as ``linear_layer``."""
    head = MLPHead((in_dim, *[hidden_dim] * (num_layers - 1), out_dim), batch_norm=True, bias=False, last_bn=True,
                   last_bn_scale=True)  # fmt: skip
    for module in head:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
    return head


class SimCLRv2Encoder(Encoder):
    """SimCLR v2's released encoder: the ResNet (``backbone``, a timm model) and the projection head (``head``), as the
    authors release them (Separius' ``{'resnet', 'head'}``). ``forward_features`` is the ResNet's last feature map;
    ``pool`` is its average followed by the first ``pooled_layers`` head layers (``--ft_proj_selector``: 0 = the ResNet
    feature of the paper's linear evaluation, 1 = after the first Linear-BN-ReLU, where the paper fine-tunes from).
    ``project`` is the whole head, the pretraining projection."""

    def __init__(self, name: str, num_proj_layers: int, hidden_dim: int | None, embed_dim: int, ft_proj_selector: int,
                 tf_padding: str | None = None, **kwargs):  # fmt: skip
        super().__init__()
        self.backbone = create_backbone(name, **kwargs)
        self.tf_padding = tf_padding
        if tf_padding is not None:
            tf_same_padding_(self.backbone, tf_padding)
        width = self.backbone.num_features
        hidden = hidden_dim or width
        self.head = projection_head(width, hidden, embed_dim, num_proj_layers)
        self.pooling = "avg"
        self.pooled_layers = ft_proj_selector % (num_proj_layers + 1)
        self.num_features = (width, *[hidden] * (num_proj_layers - 1), embed_dim)[self.pooled_layers]
        # MLPHead: 3 modules (Linear, BN, ReLU) per hidden layer, 2 (Linear, BN) for the last one
        self._pooled_modules = len(self.head) if self.pooled_layers == num_proj_layers else 3 * self.pooled_layers

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        x = pool_features(hidden, "avg")
        for module in list(self.head)[: self._pooled_modules]:
            x = module(x)
        return x

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(pool_features(self.forward_features(images), "avg"))

    @property
    def timm_model(self) -> nn.Module:
        return self.backbone

    @property
    def exports_to_timm(self) -> bool:
        """A timm export reproduces ``pool`` when no head layer is in the pooled output and the padding is timm's."""
        return self.pooled_layers == 0 and self.tf_padding is None

    @property
    def architecture_note(self) -> str:
        head = f"Pooled output: after {self.pooled_layers} projection-head layer(s) (`ft_proj_selector`). "
        return (head if self.pooled_layers else "") + tf_padding_note(self.tf_padding)


# ---- views -----------------------------------------------------------------------------------------------------------
class TFColorJitter:
    """``data_util.color_jitter_rand`` on a float image in [0, 1], with probability ``p``: brightness, contrast,
    saturation and hue (0.8 s, 0.8 s, 0.8 s, 0.2 s) in random order, clipped to [0, 1] after each. Brightness is
    SimCLR v1's ``tf.image.random_brightness``, additive: ``x + δ``, δ ~ U[-0.8 s, 0.8 s] (v2 and torchvision
    multiply instead). Contrast, saturation and hue are torchvision's."""

    def __init__(self, strength: float, p: float = 0.8):
        self.brightness, self.contrast, self.saturation = 0.8 * strength, 0.8 * strength, 0.8 * strength
        self.hue, self.p = 0.2 * strength, p

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return torch.empty(()).uniform_(low, high).item()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() >= self.p:
            return image
        for op in torch.randperm(4).tolist():
            if op == 0 and self.brightness:
                image = (image + self._uniform(-self.brightness, self.brightness)).clamp(0, 1)
            elif op == 1 and self.contrast:
                image = TF.adjust_contrast(image, self._uniform(1 - self.contrast, 1 + self.contrast))
            elif op == 2 and self.saturation:
                image = TF.adjust_saturation(image, self._uniform(1 - self.saturation, 1 + self.saturation))
            elif op == 3 and self.hue:
                image = TF.adjust_hue(image, self._uniform(-self.hue, self.hue))
        return image

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(additive brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue}, p={self.p})")  # fmt: skip


def simclr_views(image_size: int, mean, std, hp: SimCLRHparams) -> MultiView:
    """``data_util.preprocess_for_train`` and ``model.py``'s batched blur, drawn twice: bicubic random resized crop
    (area ``crop_scale_min``-1, aspect 3/4-4/3), flip, colour jitter of strength s (p 0.8), grayscale (p 0.2), then
    Gaussian blur (p 0.5, σ ~ U[0.1, 2], kernel 10 % of the side) when ``blur``. With additive brightness (v1) the
    colour operations run on the float image, as TF."""
    pieces = [crop(image_size, (hp.crop_scale_min, 1.0), BICUBIC), flip()]
    if hp.brightness == "additive":
        pieces += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), TFColorJitter(hp.color_strength),
                   grayscale(0.2)]  # fmt: skip
    else:
        pieces += color_distortion(hp.color_strength)
    if hp.blur:
        pieces.append(blur(p=0.5, kernel_size=simclr_blur_kernel(image_size)))
    one = view(*pieces, mean=mean, std=std)
    return MultiView([one, one])


# ---- the methods -----------------------------------------------------------------------------------------------------
class SimCLR(SSLMethod):
    """SimCLR's objective (shared by v1 and v2): one encoder f and projection head g; both views of the batch go
    through f and g in one forward pass (``model.py`` concatenates them: BatchNorm sees the 2N images together),
    ``z = g(f(x))``, and the NT-Xent loss of eq. 1 with τ contrasts each of the 2N local projections against the
    projections of the whole batch of every process, gathered with gradients (``objective.add_contrastive_loss`` with
    ``tpu_cross_replica_concat``; ``sslhub.distributed.gather_with_grad``).

    The loss returned is the official one, ``loss_a + loss_b`` (each view's anchors against all 2N), i.e. 2 x the
    paper's L = 1/2N Σ l(i, j) (``sslhub.losses.nt_xent``): LARS's trust ratio makes the update of the weights almost
    independent of that factor, but its balance with weight decay and the (unadapted) BatchNorm updates are the
    official ones only with it. BatchNorm statistics are those of the global batch on several processes
    (``--global_bn``). No momentum encoder, queue or per-process buffer."""

    # google-research/simclr README, linear eval on ImageNet: momentum optimizer (Nesterov) lr 0.1 per 256 images at
    # batch 4096, weight decay 1e-6, 90 epochs, no warm-up; BatchNorm frozen (fine_tune_after_block=4)
    linear_recipe = LinearRecipe("google-research/simclr README (linear eval)", 0.1, 90, 4096, weight_decay=1e-6)

    @classmethod
    def _hparams_of(cls, config) -> SimCLRHparams:
        return cls.Hparams(**(config.method_kwargs or {}))

    def project(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def view_recipe(self):
        cfg = self.config
        return simclr_views(cfg.image_size, cfg.image_mean, cfg.image_std, self.hparams)

    def forward(self, batch: Batch) -> MethodOutput:
        views = batch.views
        if len(views) != 2:
            raise ValueError(f"SimCLR takes 2 views, got {len(views)}")
        z1, z2 = self.project(torch.cat(list(views))).chunk(2)
        return MethodOutput(2 * self.objective(z1, z2))

    def objective(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The ``loss`` hyperparameter's objective of this process's projections, with negatives from every process."""
        hp = self.hparams
        if hp.loss == "alignment_uniformity":
            return alignment_loss(z1, z2) + (uniformity_loss(z1) + uniformity_loss(z2)) / 2
        gathered = (gather_with_grad(z1), gather_with_grad(z2), rank() * z1.shape[0])
        if hp.loss == "debiased":
            return debiased_nt_xent(z1, z2, hp.temperature, hp.tau_plus, *gathered)
        if hp.loss == "hard_negative":
            return hard_negative_nt_xent(z1, z2, hp.temperature, hp.tau_plus, hp.beta, *gathered)
        if hp.loss == "flat_nce":
            return flat_nce(z1, z2, hp.temperature, *gathered)
        return nt_xent(z1, z2, hp.temperature, *gathered)


# ---- SimCLR v1 release: tonylins/simclr-converter --------------------------------------------------------------------
RESNET_KEY = re.compile(
    r"(conv1|bn1|fc|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))"
    r"\.(weight|bias|running_mean|running_var|num_batches_tracked)"
)
WIDE_STEM = "timm's ResNet has no wide 7x7 stem (its stem_width applies to deep stems only)"


def _is_simclr_v1(container) -> bool:
    """``{'state_dict': ...}`` and nothing else, torchvision ResNet names without a ``module.`` prefix, with the
    1000-class supervised head ``fc`` of the TF checkpoint."""
    state = container.get("state_dict")
    return (
        set(container) == {"state_dict"}
        and isinstance(state, dict)
        and "layer1.0.downsample.0.weight" in state
        and "fc.bias" in state
        and torch.is_tensor(state.get("fc.weight"))
        and state["fc.weight"].shape[0] == 1000
        and all(isinstance(key, str) and RESNET_KEY.fullmatch(key) for key in state)
    )


def convert_simclr_v1(container, source: str) -> Converted:
    """tonylins/simclr-converter ``convert.py``: ``{'state_dict': resnet_wider.resnet50x1().state_dict()}`` with the
    TF ``base_model`` convolutions (HWIO -> OIHW) and BatchNorms in torchvision names and ``fc`` from
    ``head_supervised``. ``fc`` is left out: it is the supervised linear head, and its bias is the random
    initialisation (the converter assigns ``model.fc.weight.bias``, not ``model.fc.bias``). The TF ResNet pads its
    stem max-pool 'SAME', so the file records ``tf_padding='max_pool'``."""
    reader = KeyReader(entry(container, "state_dict", source), source)
    reader.leave_out("fc.")
    backbone = reader.take("")
    reader.finish()
    width = backbone["conv1.weight"].shape[0] // 64
    if width != 1:
        raise CheckpointError(f"{source}: a ResNet-50 ({width}x) (stem {64 * width} channels): {WIDE_STEM}")
    left_out = [
        "state_dict.fc.weight (the supervised linear head of the TF checkpoint)",
        "state_dict.fc.bias (random: the converter sets model.fc.weight.bias instead)",
    ]
    return Converted("simclr_v1", backbone, method_overrides={"tf_padding": "max_pool"}, left_out=left_out)


@register_method("simclr_v1")
class SimCLRV1(SimCLR):
    """SimCLR v1 (arXiv 2002.05709): ``SimCLR``'s objective with the 2-layer projection head g (``nl_0``: Linear-BN-
    ReLU, ``nl_1``: Linear-BN without β, to 128-d), additive brightness jitter, blur; the released encoder is f, the
    timm ResNet (``tf_padding='max_pool'`` for the TF checkpoints)."""

    Hparams = SimCLRHparams
    paper = "A Simple Framework for Contrastive Learning of Visual Representations (SimCLR)"
    arxiv = "2002.05709"
    citation = (
        "@inproceedings{chen2020simple,\n  title={A Simple Framework for Contrastive Learning of Visual "
        "Representations},\n  author={Chen, Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, Geoffrey},\n"
        "  booktitle={ICML},\n  year={2020}\n}"
    )
    released = "base encoder f (ResNet without the projection head)"
    checkpoint_layouts = (CheckpointLayout("simclr_v1", _is_simclr_v1, convert_simclr_v1),)
    tiny_preset = "simclr_v1_resnet18_32px"
    tiny_overrides = {"proj_hidden_dim": 64, "embed_dim": 32}

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        dim = self.encoder.num_features
        self.head = projection_head(dim, hp.proj_hidden_dim or dim, hp.embed_dim, hp.num_proj_layers)

    @classmethod
    def build_encoder(cls, config, **backbone_overrides) -> TimmEncoder:
        """The timm backbone with average pooling, its stem max-pool padded as TF when ``tf_padding``."""
        kwargs = {**config.backbone_kwargs, **backbone_overrides}
        padding = cls._hparams_of(config).tf_padding
        return TimmEncoder(config.backbone, config.pooling or cls.default_pooling, tf_padding=padding, **kwargs)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


# ---- SimCLR v2 release: Separius/SimCLRv2-Pytorch --------------------------------------------------------------------
SEPARIUS_STAGE = re.compile(r"net\.([1-4])\.blocks\.(\d+)\.(.+)")
SEPARIUS_BLOCK = {  # BottleneckBlock: projection (shortcut conv + BatchNormRelu), net = conv, BNR, conv, BNR, conv, BN
    "projection.shortcut.": "downsample.0.",
    "projection.bn.0.": "downsample.1.",
    "net.0.": "conv1.",
    "net.1.0.": "bn1.",
    "net.2.": "conv2.",
    "net.3.0.": "bn2.",
    "net.4.": "conv3.",
    "net.5.0.": "bn3.",
}
SEPARIUS_STEM = {"net.0.0.": "conv1.", "net.0.1.0.": "bn1."}


def separius_to_timm(key: str) -> str:
    """Separius' ``resnet.ResNet`` key -> timm ResNet key (non-SK): ``net.0`` is the stem (conv, BatchNormRelu,
    max-pool), ``net.1``-``net.4`` the stages of ``BottleneckBlock``s."""
    for prefix, name in SEPARIUS_STEM.items():
        if key.startswith(prefix):
            return name + key[len(prefix) :]
    match = SEPARIUS_STAGE.fullmatch(key)
    if match:
        stage, block, rest = match.groups()
        for prefix, name in SEPARIUS_BLOCK.items():
            if rest.startswith(prefix) and "." not in rest[len(prefix) :]:
                return f"layer{stage}.{block}.{name}{rest[len(prefix) :]}"
    raise CheckpointError(f"unexpected key {key!r} for a (non-SK) SimCLR v2 ResNet")


def _is_simclr_v2(container) -> bool:
    return set(container) == {"resnet", "head"} and all(isinstance(container[k], dict) for k in ("resnet", "head"))


def convert_simclr_v2(container, source: str) -> Converted:
    """Separius/SimCLRv2-Pytorch ``convert.py`` (``r{depth}_{width}x_sk{0,1}.pth``): ``{'resnet':
    resnet.ResNet.state_dict(), 'head': ContrastiveHead.state_dict()}``, the TF ``base_model`` and
    ``head_contrastive/nl_{0,1,2}`` in creation order. The ResNet becomes the timm ResNet (``separius_to_timm``), the
    head keeps its indices (``layers.i`` -> ``head.i``, last BatchNorm β = 0 as TF's ``center=False``); ``fc`` (the
    supervised linear head of the TF checkpoint) is left out. Selective-kernel (sk1) and wide (2x, 3x) ResNets have
    no timm equivalent and are refused. The TF ResNet pads its stem max-pool 'SAME' (``tf_padding='max_pool'``)."""
    resnet = entry(container, "resnet", source)
    if any("mixing_conv" in key or key.startswith("net.0.2.") for key in resnet):
        raise CheckpointError(f"{source}: a selective-kernel (sk1) SimCLR v2 ResNet, which has no timm equivalent")
    reader = KeyReader(resnet, source)
    classifier = reader.leave_out("fc.")
    try:
        backbone = reader.take("", separius_to_timm)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    reader.finish()
    width = backbone["conv1.weight"].shape[0] // 64
    if width != 1:
        raise CheckpointError(f"{source}: a {width}x SimCLR v2 ResNet (stem {64 * width} channels): {WIDE_STEM}")
    head_reader = KeyReader(entry(container, "head", source), source)
    head = head_reader.take("layers.")
    head_reader.finish()
    linear = sorted(int(key.split(".")[0]) for key, value in head.items() if key.endswith("weight") and value.ndim == 2)
    overrides = {
        "tf_padding": "max_pool",
        "num_proj_layers": len(linear),
        "embed_dim": head[f"{linear[-1]}.weight"].shape[0],
        "proj_hidden_dim": head[f"{linear[0]}.weight"].shape[0] if len(linear) > 1 else None,
    }
    left_out = [f"resnet.{key} (the supervised linear head of the TF checkpoint)" for key in classifier]
    left_out += leftover_entries(container, {"resnet", "head"})
    return Converted(
        "simclr_v2",
        backbone,
        method=prefixed("encoder.head.", head),
        method_encoders={"encoder.backbone.": backbone},
        method_overrides=overrides,
        left_out=left_out,
        encoder_extras=prefixed("head.", head),
    )


@register_method("simclr_v2")
class SimCLRV2(SimCLR):
    """SimCLR v2 (arXiv 2006.10029): ``SimCLR``'s objective with a 3-layer projection head and multiplicative
    brightness. The released encoder is the ResNet and the head together (``SimCLRv2Encoder``): the paper fine-tunes
    from the head's first layer (``ft_proj_selector=1``); by default the pooled output is the ResNet feature of its
    linear evaluation. The MoCo-style memory buffer (and EMA "memory network") of the paper's §3 is left out, as in the
    released code, which has neither; the paper reports about 1 % from it."""

    Hparams = SimCLRV2Hparams
    paper = "Big Self-Supervised Models are Strong Semi-Supervised Learners (SimCLR v2)"
    arxiv = "2006.10029"
    citation = (
        "@inproceedings{chen2020big,\n  title={Big Self-Supervised Models are Strong Semi-Supervised Learners},\n"
        "  author={Chen, Ting and Kornblith, Simon and Swersky, Kevin and Norouzi, Mohammad and Hinton, Geoffrey},\n"
        "  booktitle={NeurIPS},\n  year={2020}\n}"
    )
    released = "ResNet and projection head (pooled output after ft_proj_selector head layers, default the ResNet's)"
    checkpoint_layouts = (CheckpointLayout("simclr_v2", _is_simclr_v2, convert_simclr_v2),)
    tiny_preset = "simclr_v2_resnet18_32px"
    tiny_overrides = {"proj_hidden_dim": 64, "embed_dim": 32}

    def __init__(self, config):
        super().__init__(config)
        self.encoder = self.build_encoder(config)

    @classmethod
    def build_encoder(cls, config, **backbone_overrides) -> SimCLRv2Encoder:
        hp = cls._hparams_of(config)
        kwargs = {**config.backbone_kwargs, **backbone_overrides}
        return SimCLRv2Encoder(config.backbone, hp.num_proj_layers, hp.proj_hidden_dim, hp.embed_dim,
                               hp.ft_proj_selector, tf_padding=hp.tf_padding, **kwargs)  # fmt: skip

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.project(images)


# ---- presets -------------------------------------------------------------------------------------------------------
UNNORMALISED = {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}  # data_util: [0, 1], no mean / std
# README CIFAR-10 command (single GPU): batch 512, 1000 epochs, lr 1.0 (linear), τ 0.5, ResNet-18, no blur, s = 0.5;
# weight decay 1e-6 at be133b3 (v1), 1e-4 at HEAD (v2)
CIFAR_RECIPE = {"lr": 1.0, "lr_batch_size": 256, "lr_scaling": "linear", "warmup_epochs": 10, "epochs": 1000,
                "temperature": 0.5, "blur": False, "color_strength": 0.5}  # fmt: skip

for _method, _version, _cifar_wd in (("simclr_v1", "v1", 1e-6), ("simclr_v2", "v2", 1e-4)):
    _backbones = ("resnet18", "resnet50") + (("resnet101", "resnet152") if _version == "v2" else ())
    for _backbone in _backbones:
        register_preset(
            Preset(
                f"{_method}_{_backbone}",
                _method,
                _backbone,
                description=f"SimCLR {_version} on a timm {_backbone}, 224 px, unnormalised [0, 1] input",
                **UNNORMALISED,
            )
        )
    register_preset(
        Preset(
            f"{_method}_resnet18_32px",
            _method,
            "resnet18",
            image_size=32,
            method_kwargs={**CIFAR_RECIPE, "weight_decay": _cifar_wd},
            description=f"SimCLR {_version}, ResNet-18 for 32 px images: the README's CIFAR-10 recipe (batch 512, "
            "lr 1.0, τ 0.5, s 0.5, no blur, 1000 epochs)",
            **UNNORMALISED,
        )
    )

# ---- releases ------------------------------------------------------------------------------------------------------
register_pretrained(  # google-research/simclr README, "Pre-trained models for SimCLRv1" (linear eval top-1)
    PretrainedTag(
        "simclr_v1_resnet50",
        "in1k",
        url="https://storage.cloud.google.com/simclr-gcs/checkpoints/ResNet50_1x.zip",
        layout="simclr_v1",
        license="apache-2.0",
        epochs=None,  # not stated in the README (the checkpoint is model.ckpt-225206)
        metrics={"linear": 69.1},
        source="google-research/simclr README, SimCLRv1 pre-trained models",
        overrides={"tf_padding": "max_pool"},
        converted_file="resnet50-1x.pth",
        conversion="tonylins/simclr-converter: unzip ResNet50_1x.zip && "
        "python convert.py ResNet50_1x/model.ckpt-225206 resnet50-1x.pth",
    )
)

SIMCLR_V2_RELEASES = "gs://simclr-checkpoints/simclrv2/pretrained"
# google-research/simclr README, SimCLRv2 table (linear eval, fine-tuned on 100 % of the labels); 800 epochs
# (model.ckpt-250228 = 1281167 x 800 // 4096 + 1 steps). SK and 2x / 3x ResNets have no timm equivalent.
for _preset, _name, _linear, _finetune in (
    ("simclr_v2_resnet50", "r50_1x_sk0", 71.7, 76.3),
    ("simclr_v2_resnet101", "r101_1x_sk0", 73.6, 78.2),
    ("simclr_v2_resnet152", "r152_1x_sk0", 74.5, 79.3),
):
    register_pretrained(
        PretrainedTag(
            _preset,
            "in1k",
            url=f"{SIMCLR_V2_RELEASES}/{_name}",
            layout="simclr_v2",
            license="apache-2.0",
            epochs=800,
            metrics={"linear": _linear, "finetune": _finetune},
            source="google-research/simclr README, SimCLRv2 pre-trained models",
            overrides={"tf_padding": "max_pool", "epochs": 800},
            converted_file=f"{_name}.pth",
            conversion=f"Separius/SimCLRv2-Pytorch: python download.py {_name} && "
            f"python convert.py {_name}/model.ckpt-250228",
        )
    )
