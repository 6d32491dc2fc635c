"""RotNet: learn features by predicting which of four rotations (0°, 90°, 180°, 270°) was applied to an image.

Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image Rotations", arXiv 1803.07728
(ICLR 2018). With g(X, y) the image X rotated by y · 90° and F the network's 4-way softmax, the loss over N images is
(eq. 1-2) ``loss = 1/N Σ_i  -1/4 Σ_{y=0..3} log F^y(g(X_i, y))``: every image's four rotated copies are in the same
batch (§3, "we found it beneficial to feed the network with all four rotated copies of an image simultaneously").

Followed: the authors' gidariss/FeatureLearningRotNet (``dataloader.py``: one crop + flip per image, then its four
copies ``rotate_img`` 0/90/180/270 counter-clockwise, labels 0-3, the batch of B images is 4B samples;
``config/CIFAR10_RotNet_NIN4blocks.py``) for the view recipe; the ResNet-50 optimisation of VISSL's
``configs/config/pretrain/rotnet/rotnet_8gpu_resnet.yaml``, the recipe of the VISSL model-zoo files (the released
ResNet-50 weights; the authors release AlexNet / NIN only): SGD lr 0.1 per 256, momentum 0.9, weight decay 1e-4 except
on BatchNorm (``regularize_bn: False``), 105 epochs, lr x0.1 at 30, 60, 90, 100; head ``mlp [2048, 4]`` (one Linear),
``cross_entropy_multiple_output_single_target``; crop 224 (scale 0.08-1) + flip, ImageNet mean / std.

Where the recipes differ (the other files released):

- VISSL's ``ImgRotatePil`` rotates each image ONCE, by a random multiple of 90° (before the crop): a batch of 256
  images is 256 samples. sslhub follows the paper, the authors and MMSelfSup (all four rotations of each crop, the
  issue's requirement), so a batch of B images is 4B samples at VISSL's lr for B images;
- MMSelfSup ``configs/selfsup/rotation_pred/rotation-pred_resnet50_8xb16-steplr-70e_in1k.py`` (its file's tag records
  it): 128 images (512 samples), lr 0.2, 5 warm-up epochs from 0.1 x lr, x0.1 at 30 and 50 of 70 epochs, weight decay
  on every parameter; ``RotationWithLabels`` rotates with ``mmcv.imrotate`` (positive angle = CLOCKWISE), so its
  labels 1 and 3 are sslhub's 3 and 1 (``convert_mmselfsup`` permutes the head's rows); ``ClsHead`` = avg-pool + one
  Linear ``fc_cls`` (no dropout);
- the authors' ImageNet AlexNet recipe: SGD Nesterov lr 0.1 for 192 images, weight decay 5e-4, 50 epochs.

Deviations: the rotated copies are ``torch.rot90`` of the normalised view tensor (the authors rotate the uint8 array,
the same pixels); the 32 px preset follows the authors' CIFAR-10 recipe on a timm ResNet-18 (the paper uses a NIN)
with two deviations sslhub's SGD cannot express: no Nesterov momentum, and lr x0.1 (authors: x0.2) at 60/120/160.
Not verified (no file opened): the exact containers of the released files (taken from the code that saves them) and
whether VISSL's IN-22k file holds the rotation head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, preview
from sslhub.conversion.loading import CheckpointError
from sslhub.conversion.vissl import VISSL_LINEAR, VISSL_ZOO, read_vissl, vissl_heads
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, batch_norm_exempt_groups, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, ViewRecipe, Views, crop, flip, padded_crop, view

NUM_ROTATIONS = 4
VISSL_HEAD = ("0.clf.0.weight", "0.clf.0.bias")  # heads: [["mlp", {"dims": [2048, 4]}]]
# mmcv.imrotate(img, 90 · i) turns clockwise: MMSelfSup's label i is sslhub's (counter-clockwise) label (4 - i) % 4.
MMSELFSUP_TO_SSLHUB_ROWS = [0, 3, 2, 1]


@dataclass
class RotNetHparams(MethodHparams):
    """Defaults of VISSL's ``rotnet_8gpu_resnet.yaml`` (module docstring): SGD lr 0.1 per 256 images, momentum 0.9,
    weight decay 1e-4 without decay on BatchNorm, 105 epochs, lr x0.1 at epochs 30, 60, 90 and 100."""

    optimizer: str = "sgd"
    lr: float = 0.1
    lr_batch_size: int = 256
    weight_decay: float = 1e-4
    epochs: int = 105
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (30, 60, 90, 100)
    decay_batch_norm: bool = hparam(
        False, "weight decay on BatchNorm weights and biases too (VISSL: regularize_bn False; the authors: True)"
    )
    crop_scale_min: float = hparam(0.08, "smallest area fraction of the random resized crop (crop_padding 0)")
    crop_padding: int = hparam(
        0, "0: random resized crop (ImageNet recipes); > 0: random crop after zero padding by this many pixels "
        "(the authors' CIFAR-10 recipe: 4)"
    )  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")


def rotations(image: torch.Tensor) -> list[torch.Tensor]:
    """``image`` (..., H, W) rotated by 0°, 90°, 180° and 270° counter-clockwise (the authors' ``rotate_img``)."""
    return [torch.rot90(image, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)]


class RotationViews(ViewRecipe):
    """One augmented view of the image, then its four rotations as four views with their rotation ids
    (``extras["rotation"] = [0, 1, 2, 3]``); collated, view k of the batch holds every image rotated by k · 90°."""

    def __init__(self, transform):
        self.transform = transform

    def make_views(self, image) -> Views:
        return Views(rotations(self.transform(image)), {"rotation": torch.arange(NUM_ROTATIONS)})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


# ---- official files ------------------------------------------------------------------------------------------------
def _rotation_head(weight: torch.Tensor, bias: torch.Tensor, source: str, names: str) -> dict[str, torch.Tensor]:
    if weight.ndim != 2 or weight.shape[0] != NUM_ROTATIONS or tuple(bias.shape) != (NUM_ROTATIONS,):
        raise CheckpointError(
            f"{source}: {names} have shapes {tuple(weight.shape)} / {tuple(bias.shape)}, expected "
            f"({NUM_ROTATIONS}, features) / ({NUM_ROTATIONS},): not a 4-way rotation head"
        )
    return {"head.weight": weight, "head.bias": bias}


def convert_vissl(container, source: str) -> Converted:
    """A VISSL RotNet file (``sslhub.conversion.vissl``, family A or B): the trunk is the encoder, the heads
    ``0.clf.0.{weight,bias}`` (``mlp [2048, 4]``) the rotation classifier; a file without heads gives the encoder
    alone."""
    model = read_vissl(container, source)
    if not model.heads:
        return Converted("rotnet_vissl", model.trunk, left_out=model.left_out)
    if set(model.heads) != set(VISSL_HEAD):
        raise CheckpointError(
            f"{source}: RotNet's VISSL head is {list(VISSL_HEAD)} (mlp [2048, 4]); the file's heads are "
            f"{preview(model.heads)}"
        )
    head = _rotation_head(*(model.heads[key] for key in VISSL_HEAD), source, "heads 0.clf.0.weight / bias")
    return Converted("rotnet_vissl", model.trunk, head, {"encoder.backbone.": model.trunk}, left_out=model.left_out)


def _is_vissl_rotnet(container) -> bool:
    heads = vissl_heads(container)
    weight = (heads or {}).get(VISSL_HEAD[0])
    return set(heads or {}) == set(VISSL_HEAD) and weight.ndim == 2 and weight.shape[0] == NUM_ROTATIONS


def convert_mmselfsup(container, source: str) -> Converted:
    """MMSelfSup 1.x ``RotationPred`` (mmengine ``save_checkpoint`` + ``publish_model.py``: ``{'meta', 'state_dict',
    'message_hub', 'param_schedulers'}``, the optimizer removed): ``state_dict`` = ``backbone.*`` (mmcls ResNet: conv1,
    bn1, layer1-4 with conv/bn 1-3 and downsample.0/1, torchvision's names; the data preprocessor's mean / std are
    not persistent) + ``head.fc_cls.{weight,bias}`` (``ClsHead``), whose rows are reordered from MMSelfSup's
    clockwise labels to sslhub's counter-clockwise ones (``MMSELFSUP_TO_SSLHUB_ROWS``)."""
    reader = KeyReader(entry(container, "state_dict", source), source)
    backbone = reader.take("backbone.")
    fc = reader.take("head.fc_cls.")
    reader.finish()
    if not backbone or set(fc) != {"weight", "bias"}:
        raise CheckpointError(
            f"{source}: an MMSelfSup RotationPred state_dict has backbone.* and head.fc_cls.weight / bias; found "
            f"{len(backbone)} backbone keys and head keys {preview(fc)}"
        )
    head = _rotation_head(fc["weight"], fc["bias"], source, "head.fc_cls.weight / bias")
    head = {key: value[MMSELFSUP_TO_SSLHUB_ROWS] for key, value in head.items()}
    left_out = leftover_entries(container, {"state_dict"})
    return Converted("rotnet_mmselfsup", backbone, head, {"encoder.backbone.": backbone}, left_out=left_out)


def _is_mmselfsup_rotnet(container) -> bool:
    state = container.get("state_dict") if isinstance(container, dict) else None
    if not isinstance(state, dict) or "backbone.conv1.weight" not in state:
        return False
    fc = state.get("head.fc_cls.weight")
    return torch.is_tensor(fc) and fc.ndim == 2 and fc.shape[0] == NUM_ROTATIONS


VISSL_LAYOUT = CheckpointLayout("rotnet_vissl", _is_vissl_rotnet, convert_vissl)
MMSELFSUP_LAYOUT = CheckpointLayout("rotnet_mmselfsup", _is_mmselfsup_rotnet, convert_mmselfsup)


# ---- the method ----------------------------------------------------------------------------------------------------
@register_method("rotnet")
class RotNet(SSLMethod):
    """logits = head(encoder(g(X, y))) for the four rotations y of every image (eq. 1), cross-entropy with the
    rotation ids (eq. 2). ``head``: one Linear(features, 4) on the pooled feature (VISSL ``mlp [2048, 4]``, MMSelfSup
    ``ClsHead``). The released encoder is the backbone; ``pooler_output`` is its final pooled feature (res5avg)."""

    Hparams = RotNetHparams
    paper = "Unsupervised Representation Learning by Predicting Image Rotations (RotNet)"
    arxiv = "1803.07728"
    citation = (
        "@InProceedings{gidaris2018unsupervised,\n  author    = {Spyros Gidaris and Praveer Singh and Nikos "
        "Komodakis},\n  title     = {Unsupervised Representation Learning by Predicting Image Rotations},\n"
        "  booktitle = {ICLR},\n  year      = {2018},\n}"
    )
    released = (
        "encoder backbone (pooler_output: the final pooled feature, res5avg; VISSL reports the best of its linear "
        "probes on conv1 / res2-res5 / res5avg, MMSelfSup's 47.0 reads the pooled res5 feature, pooler_output (its "
        "res4 probe is higher, 54.2); the paper's AlexNet probes peak at the intermediate conv3 / conv4)"
    )
    # VISSL eval_resnet_8gpu_transfer_in1k_linear.yaml: SGD (Nesterov) lr 0.01 per 256, weight decay 5e-4, 28 epochs
    # (x0.1 at 8, 16, 24); the res5avg probe is the plain "mlp [2048, 1000]".
    linear_recipe = LinearRecipe(
        "facebookresearch/vissl eval_resnet_8gpu_transfer_in1k_linear.yaml (res5avg probe)", 0.01, 28, 256,
        weight_decay=5e-4,
    )  # fmt: skip
    checkpoint_layouts = (VISSL_LAYOUT, MMSELFSUP_LAYOUT)
    tiny_preset = "rotnet_resnet18_32px"

    # Evaluation: VISSL's test pre-processing: bilinear ``Resize(256)``, ``CenterCrop(224)``, ImageNet normalisation.
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        self.encoder = self.build_encoder(config)
        self.head = nn.Linear(self.encoder.num_features, NUM_ROTATIONS)

    def view_recipe(self):
        """A random resized crop (or the CIFAR padded crop) and a horizontal flip, normalised, then its four
        rotations (``RotationViews``)."""
        cfg, hp = self.config, self.hparams
        if hp.crop_padding:
            cropping = padded_crop(cfg.image_size, hp.crop_padding)
        else:
            cropping = crop(cfg.image_size, (hp.crop_scale_min, 1.0))
        return RotationViews(view(cropping, flip(), mean=cfg.image_mean, std=cfg.image_std))

    def param_groups(self):
        """BatchNorm without weight decay (VISSL ``regularize_bn: False``), unless ``decay_batch_norm``."""
        if self.hparams.decay_batch_norm:
            return super().param_groups()
        return batch_norm_exempt_groups(self, self.hparams.weight_decay)

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views``: the four rotated copies (view k: every image rotated by k · 90°), ``batch.extras
        ["rotation"]`` (B, 4): the rotation id of each image's view k (``RotationViews``)."""
        rotation = batch.extras.get("rotation")
        if len(batch.views) != NUM_ROTATIONS or rotation is None or tuple(rotation.shape) != (len(batch), 4):
            raise ValueError(
                f"RotNet takes the {NUM_ROTATIONS} rotated views of every image and extras['rotation'] (B, 4) "
                f"(RotationViews); got {len(batch.views)} views, rotation "
                f"{None if rotation is None else tuple(rotation.shape)}"
            )
        images = torch.cat(batch.views)
        labels = rotation.t().reshape(-1).to(images.device)  # view-major, as torch.cat stacks the views
        logits = self.head(self.encoder(images))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return MethodOutput(loss, {"rotation_accuracy": float(accuracy)})


register_preset(
    Preset(
        "rotnet_resnet50",
        "rotnet",
        "resnet50",
        description="RotNet on a timm resnet50, 224 px: VISSL rotnet_8gpu_resnet (SGD lr 0.1 per 256, wd 1e-4 not on "
        "BN, steps at 30/60/90/100 of 105 epochs), all four rotations of each crop",
    )
)

# config/CIFAR10_RotNet_NIN4blocks.py + dataloader.py: 128 images (512 rotated samples) per batch, SGD lr 0.1,
# momentum 0.9, wd 5e-4 (every parameter), 200 epochs, lr steps at 60 / 120 / 160; RandomCrop(32, padding=4) + flip;
# mean / std (125.3, 123.0, 113.9) / 255 and (63.0, 62.1, 66.7) / 255.
register_preset(
    Preset(
        "rotnet_resnet18_32px",
        "rotnet",
        "resnet18",
        image_size=32,
        image_mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
        image_std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
        method_kwargs={
            "lr": 0.1,
            "lr_batch_size": 128,
            "weight_decay": 5e-4,
            "epochs": 200,
            "lr_milestones": (60, 120, 160),
            "decay_batch_norm": True,
            "crop_padding": 4,
        },
        description="RotNet, ResNet-18 for 32 px images: the authors' CIFAR-10 recipe (lr 0.1 per 128 images, wd 5e-4, "
        "steps at 60/120/160 of 200 epochs, padded crop + flip)",
    )
)

# ---- releases ------------------------------------------------------------------------------------------------------
register_pretrained(
    PretrainedTag(
        "rotnet_resnet50",
        "in1k",
        url=VISSL_ZOO
        + "rotnet_rn50_in1k_ep105_rotnet_8gpu_resnet_17_07_20.46bada9f/model_final_checkpoint_phase125.torch",
        layout="rotnet_vissl",
        license="mit",
        epochs=105,
        metrics={"linear": 48.2},
        source="facebookresearch/vissl MODEL_ZOO.md, RotNet, RN50 - 105 epochs, ImageNet-1K (config "
        "pretrain/rotnet/rotnet_8gpu_resnet.yaml: one random rotation per image); " + VISSL_LINEAR,
    )
)
register_pretrained(
    PretrainedTag(
        "rotnet_resnet50",
        "in22k",
        url=VISSL_ZOO + "converted_vissl_rn50_rotnet_in22k_ep105.torch",
        layout="rotnet_vissl",
        license="mit",
        epochs=105,
        metrics={"linear": 54.89},
        pretraining_data="imagenet-22k",
        source="facebookresearch/vissl MODEL_ZOO.md, RotNet, RN50 - 105 epochs, ImageNet-22K (benchmark "
        "benchmark_in1k_linear_rotnet_deepcluster_clusterfit.json, STATE_DICT_KEY_NAME classy_state_dict); "
        + VISSL_LINEAR,
    )
)
MMSELFSUP_RUN = (
    "https://download.openmmlab.com/mmselfsup/1.x/rotation_pred/rotation-pred_resnet50_8xb16-steplr-70e_in1k/"
)
register_pretrained(
    PretrainedTag(
        "rotnet_resnet50",
        "in1k_mmselfsup",
        url=MMSELFSUP_RUN + "rotation-pred_resnet50_8xb16-steplr-70e_in1k_20220825-a8bf5f69.pth",
        layout="rotnet_mmselfsup",
        license="apache-2.0",
        epochs=70,
        metrics={"linear": 47.0},
        overrides={
            "epochs": 70,
            "lr": 0.2,
            "lr_batch_size": 128,
            "warmup_epochs": 5,
            "warmup_start_ratio": 0.1,
            "lr_milestones": (30, 50),
            "decay_batch_norm": True,
        },
        source="open-mmlab/mmselfsup configs/selfsup/rotation_pred/metafile.yml and README "
        "(rotation-pred_resnet50_8xb16-steplr-70e_in1k); linear = resnet50_linear-8xb32-steplr-100e_in1k on the "
        "global-average-pooled res5 feature (pooler_output); MMSelfSup is Apache-2.0",
    )
)
