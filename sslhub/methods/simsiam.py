"""SimSiam: a Siamese network with a predictor and a stop-gradient, without negatives or a momentum encoder.

Chen & He, "Exploring Simple Siamese Representation Learning", arXiv 2011.10566 (CVPR 2021).
Follows facebookresearch/simsiam (``simsiam/builder.py``, ``main_simsiam.py`` with ``--fix-pred-lr``,
``main_lincls.py --lars``, ``simsiam/loader.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.heads import MLPHead
from sslhub.losses import negative_cosine
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import BILINEAR, MultiView, blur, color_distortion, crop, flip, view


@dataclass
class SimSiamHparams(MethodHparams):
    """Defaults of ``main_simsiam.py`` as the README runs it (``--fix-pred-lr``; the recipe of the released
    ResNet-50s, the last row of Table 1 of arXiv 2011.10566): SGD lr 0.05 per 256 images (batch 512 in the paper),
    momentum 0.9, weight decay 1e-4 on every parameter, no warm-up, cosine decay over 100 epochs, the predictor kept at
    the initial lr; projector 3 x (Linear-BN), the last BN without affine, output d = 2048 (§3 "Baseline settings");
    predictor d -> 512 -> d with BN on the hidden layer (§3, §4.4); views of MoCo v2 (``main_simsiam.py``);
    SyncBN (``main_simsiam.py`` converts the model with ``convert_sync_batchnorm``).

    The cosine is set once per epoch as ``adjust_learning_rate`` (``lr_schedule="cosine_epoch"``).
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 1e-4
    epochs: int = 100
    lr_schedule: str = "cosine_epoch"  # main_simsiam.py adjust_learning_rate: once per epoch
    sync_batch_norm: bool = True  # main_simsiam.py: torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dim: int = hparam(2048, "output dimension d of the projector and of the predictor (--dim)")
    pred_dim: int = hparam(512, "hidden width of the predictor's bottleneck (--pred-dim)")
    proj_hidden_dim: int | None = hparam(
        None, "hidden width of the projector (None: the backbone's feature width, as builder.py)"
    )
    proj_layers: int = hparam(3, "Linear layers of the projector (3 on ImageNet, 2 in the paper's CIFAR recipe)")
    fix_pred_lr: bool = hparam(True, "keep the predictor at the initial learning rate (--fix-pred-lr, §4.2)")
    crop_scale_min: float = hparam(0.2, "smallest area fraction of the random resized crop (MoCo v2's 0.2)")
    blur_p: float = hparam(0.5, "probability of the Gaussian blur (0: none, as the paper's CIFAR recipe)")

    def __post_init__(self):
        super().__post_init__()
        if self.proj_layers < 1:
            raise ValueError(f"proj_layers {self.proj_layers}: the projector has at least one Linear layer")


def simsiam_views(image_size: int, mean, std, scale: tuple[float, float], blur_p: float) -> MultiView:
    """``main_simsiam.py``'s two views (``TwoCropsTransform``, MoCo v2's augmentation), drawn independently: random
    resized crop, colour jitter 0.4/0.4/0.4/0.1 with p = 0.8, grayscale p = 0.2, Gaussian blur σ ~ U[0.1, 2] with
    p = ``blur_p``, horizontal flip."""
    pieces = [crop(image_size, scale), *color_distortion(strength=0.5)]
    if blur_p > 0:
        pieces.append(blur(p=blur_p))
    one = view(*pieces, flip(), mean=mean, std=std)
    return MultiView([one, one])


def simsiam_projector(in_dim: int, hidden_dim: int, dim: int, layers: int) -> MLPHead:
    """``builder.py``'s projector (``encoder.fc``): (Linear without bias, BN, ReLU) x (layers - 1), then Linear with a
    bias and BN without affine parameters. The official code freezes that bias ("not use bias as it is followed by
    BN"): it keeps its initial value and is saved in the file. Here it is a buffer of the Linear layer under the same
    key (``fc.6.bias`` -> ``projector.6.bias``): a constant that no optimizer sees and that a reloaded checkpoint
    cannot turn trainable (a frozen parameter comes back from ``from_pretrained`` with ``requires_grad=True``)."""
    head = MLPHead((in_dim, *[hidden_dim] * (layers - 1), dim), batch_norm=True, bias=True, hidden_bias=False,
                   last_bn=True)  # fmt: skip
    last_linear = [module for module in head if isinstance(module, nn.Linear)][-1]
    bias = last_linear.bias.detach()
    del last_linear.bias
    last_linear.register_buffer("bias", bias)
    return head


def convert_simsiam(container, source: str) -> Converted:
    """facebookresearch/simsiam ``main_simsiam.py``: ``{'epoch', 'arch', 'state_dict', 'optimizer'}``; ``state_dict``
    of DDP(SimSiam): ``module.encoder.<torchvision ResNet>`` whose ``fc`` is the projector (``fc.0`` Linear, ``fc.1``
    BN, ``fc.3`` Linear, ``fc.4`` BN, ``fc.6`` Linear with its frozen bias, ``fc.7`` BN without affine) and
    ``module.predictor.{0,1,3}`` (Linear, BN, Linear). The released encoder is ``module.encoder`` without ``fc``
    (``main_lincls.py``); head sizes are read off the file."""
    reader = KeyReader(entry(container, "state_dict", source), source)
    encoder = reader.take("module.encoder.")
    predictor = reader.take("module.predictor.")
    if not encoder or not predictor:
        raise CheckpointError(f"{source}: no 'module.encoder.' / 'module.predictor.' keys: not a SimSiam checkpoint")
    reader.finish()
    projector = {key[len("fc.") :]: value for key, value in encoder.items() if key.startswith("fc.")}
    backbone = {key: value for key, value in encoder.items() if not key.startswith("fc.")}
    linear = {
        int(key.split(".")[0]): value for key, value in projector.items() if key.endswith(".weight") and value.ndim == 2
    }
    if not linear or "0.weight" not in predictor:
        raise CheckpointError(f"{source}: no Linear layer in 'module.encoder.fc' (projector) or 'module.predictor.0'")
    weights = [linear[index] for index in sorted(linear)]
    hidden = weights[0].shape[0] if len(weights) > 1 else None
    overrides = {
        "dim": weights[-1].shape[0],
        "pred_dim": predictor["0.weight"].shape[0],
        "proj_layers": len(weights),
        "proj_hidden_dim": None if hidden == weights[0].shape[1] else hidden,  # None: the backbone's width
    }
    method = prefixed("projector.", projector) | prefixed("predictor.", predictor)
    left_out = leftover_entries(container, {"state_dict"})
    return Converted("simsiam", backbone, method, {"encoder.backbone.": backbone}, overrides, left_out)


def _is_simsiam(container) -> bool:
    state = container.get("state_dict")
    if not isinstance(state, dict):
        return False
    return any(key.startswith("module.encoder.fc.") for key in state) and any(
        key.startswith("module.predictor.") for key in state
    )


SIMSIAM_LAYOUT = CheckpointLayout("simsiam", _is_simsiam, convert_simsiam)


@register_method("simsiam")
class SimSiam(SSLMethod):
    """Encoder f = backbone + projector, predictor h. For two views x1, x2 of an image, z_i = f(x_i), p_i = h(z_i)
    and ``L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2`` with ``D`` the negative cosine similarity (eq. 1-4,
    Algorithm 1; ``sslhub.losses.negative_cosine``). The same encoder processes both views, each view in its own
    forward pass (BatchNorm statistics per view, as ``builder.py``). The backbone is a timm ResNet, whose default
    ``zero_init_last`` zero-initialises the last BN of every residual block as ``zero_init_residual=True``.
    Optimisation (``param_groups``): SGD with weight decay on every trainable parameter, the predictor in its own
    group that stays at the initial lr (``fixed_lr``, ``--fix-pred-lr``). The released encoder is the backbone
    without the projector (``main_lincls.py``).
    """

    Hparams = SimSiamHparams
    paper = "Exploring Simple Siamese Representation Learning (SimSiam)"
    arxiv = "2011.10566"
    citation = (
        "@Article{chen2020simsiam,\n  author  = {Xinlei Chen and Kaiming He},\n"
        "  title   = {Exploring Simple Siamese Representation Learning},\n"
        "  journal = {arXiv preprint arXiv:2011.10566},\n  year    = {2020},\n}"
    )
    released = "encoder backbone (without the projector in fc)"
    # facebookresearch/simsiam main_lincls.py --lars (README): LARS (apex LARC, trust 0.001, clip=False) over SGD
    # momentum 0.9, lr 0.1 per 256 images at batch 4096, no weight decay, 90 epochs, cosine per epoch. sslhub's
    # "lars" adapts the weight as LARC does (no weight decay: the same ratio) but leaves the bias unadapted.
    linear_recipe = LinearRecipe("facebookresearch/simsiam main_lincls.py --lars", 0.1, 90, 4096, optimizer="lars")
    checkpoint_layouts = (SIMSIAM_LAYOUT,)
    tiny_preset = "simsiam_resnet18_32px"
    tiny_overrides = {"dim": 64, "pred_dim": 16, "proj_hidden_dim": 32}

    # Evaluation: ``main_lincls.py``'s validation pre-processing: bilinear resize of the short side to 256 (224 /
    # 0.875), centre crop 224, ImageNet normalisation; images of 64 px or less are not cropped (as sslhub's default).
    eval_interpolation = BILINEAR

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        width = self.encoder.num_features
        self.projector = simsiam_projector(width, hp.proj_hidden_dim or width, hp.dim, hp.proj_layers)
        self.predictor = MLPHead((hp.dim, hp.pred_dim, hp.dim), batch_norm=True, bias=True)

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        return simsiam_views(cfg.image_size, cfg.image_mean, cfg.image_std, (hp.crop_scale_min, 1.0), hp.blur_p)

    def param_groups(self):
        """``main_simsiam.py --fix-pred-lr``: the encoder (backbone + projector) on the cosine schedule, the predictor
        with ``fix_lr`` (sslhub ``fixed_lr``: the peak lr throughout); weight decay on all of them. The projector's
        frozen bias receives no gradient, so the official SGD never moves it; here it is a buffer."""
        hp = self.hparams
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        in_predictor = {id(p) for p in predictor}
        encoder = [p for p in self.parameters() if p.requires_grad and id(p) not in in_predictor]
        return [
            {"params": encoder, "weight_decay": hp.weight_decay},
            {"params": predictor, "weight_decay": hp.weight_decay, "fixed_lr": hp.fix_pred_lr},
        ]

    def forward(self, batch: Batch) -> MethodOutput:
        views = batch.views
        if len(views) != 2:
            raise ValueError(f"SimSiam takes 2 views, got {len(views)}")
        z1, z2 = (self.projector(self.encoder(x)) for x in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2  # eq. 4; negative_cosine detaches z
        return MethodOutput(loss)


for _name, _backbone in (("simsiam_resnet18", "resnet18"), ("simsiam_resnet50", "resnet50")):
    register_preset(
        Preset(
            _name,
            "simsiam",
            _backbone,
            description=f"SimSiam on a timm {_backbone}, 224 px: main_simsiam.py --fix-pred-lr, SGD lr 0.05, wd 1e-4",
        )
    )

# arXiv 2011.10566 Appendix (CIFAR experiments): ResNet-18 backbone, 2-layer projector with 2048-d output, no blur,
# SGD lr 0.03 per 256 images at batch 512, wd 5e-4, momentum 0.9, 800 epochs. The hidden width of the projector is
# not stated there: 2048 as solo-learn's scripts/pretrain/cifar/simsiam.yaml (proj_hidden_dim 2048).
register_preset(
    Preset(
        "simsiam_resnet18_32px",
        "simsiam",
        "resnet18",
        image_size=32,
        method_kwargs={
            "lr": 0.03,
            "weight_decay": 5e-4,
            "epochs": 800,
            "proj_layers": 2,
            "proj_hidden_dim": 2048,
            "blur_p": 0.0,
        },
        description="SimSiam, ResNet-18 for 32 px images: the paper's CIFAR recipe (lr 0.03, wd 5e-4, 2-layer "
        "projector, no blur, 800 epochs, batch 512)",
    )
)

SIMSIAM_RELEASES = "https://dl.fbaipublicfiles.com/simsiam/models"
# facebookresearch/simsiam README ("Models and Logs"): the epoch-100 training checkpoints (encoder with the projector,
# predictor, optimizer) of the 100-epoch runs at batch 512 and 256, ImageNet linear top-1 (main_lincls.py --lars).
# The first tag of the preset is its default.
for _tag, _run, _batch, _linear in (("in1k_100ep", "100ep", 512, 68.1), ("in1k_100ep_bs256", "100ep-256bs", 256, 68.3)):
    register_pretrained(
        PretrainedTag(
            "simsiam_resnet50",
            _tag,
            url=f"{SIMSIAM_RELEASES}/{_run}/pretrain/checkpoint_0099.pth.tar",
            layout="simsiam",
            license="cc-by-nc-4.0",
            epochs=100,
            metrics={"linear": _linear},
            source=f"facebookresearch/simsiam README, Models and Logs (100 epochs, batch {_batch})",
            overrides={"epochs": 100},
            download_name=f"simsiam_{_run}_checkpoint_0099.pth.tar",  # both runs publish checkpoint_0099.pth.tar
        )
    )
