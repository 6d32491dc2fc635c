"""Exemplar-CNN: every training image is its own surrogate class; a network learns to classify transformed copies.

Dosovitskiy, Springenberg, Riedmiller & Brox, "Discriminative Unsupervised Feature Learning with Convolutional Neural
Networks", arXiv 1406.6909 (NIPS 2014; the TPAMI 2016 version, "... with Exemplar Convolutional Neural Networks",
adds Fischer and is arXiv 1406.6909v2). Each of N seed patches x_i is a class; with T_i the random transformations
sampled for x_i, the network's softmax output f is trained with (§2.2)

    L(X) = Σ_i Σ_{T ∈ T_i} l(i, T x_i),    l(i, T x_i) = -<e_i, log f(T x_i)>   (multinomial negative log-likelihood)

The paper: 32 x 32 seed patches sampled from STL-10's unlabeled images (at varying positions and scales, where the
gradients are large), N = 8000 surrogate classes for its main networks, K transformed samples of each patch drawn ONCE
(the surrogate set), the mean of each pixel subtracted. Its networks (5 x 5 convolutions, 2 x 2 max-pooling, ReLU,
dropout on the fully connected layers, then an N-way softmax): 64c5-64c5-128f, 64c5-128c5-256c5-512f and
92c5-256c5-512c5-1024f. Each transformation composes (§2.1, each with its magnitude drawn for the sample):
translation (vertical and horizontal, within 0.2 of the patch size), scaling (0.7 - 1.4), rotation (within ± 20°),
contrast 1 (the projection of every pixel on each principal component of all pixels multiplied by its own factor in
0.5 - 2, ``sslhub.transforms.PCAContrast``), contrast 2 (saturation and value raised to a power in 0.25 - 4,
multiplied by 0.7 - 1.4, plus -0.1 - 0.1, ``sslhub.transforms.HSVPowerContrast``) and colour (hue + -0.1 - 0.1,
torchvision's ``ColorJitter(hue=0.1)``, which adds exactly that to H). Translation, scaling and rotation are one
``v2.RandomAffine(20, (0.2, 0.2), (0.7, 1.4))``.

sslhub's version, and its deviations:

- a surrogate class is a training IMAGE (``Batch.index``), resized and centre-cropped to ``image_size`` as its fixed
  seed patch; the classifier has one output per training image, sized by the trainer (``bind_dataset``), and a saved
  model keeps its size (``num_samples``);
- online transformations: every epoch draws fresh transformations of every image instead of a surrogate set of K
  samples drawn once (``epochs`` = 100 sees as many samples per class as a set of K = 100); ``views_per_image`` > 1
  puts several transformed copies of each image in a step (the paper's batches are random samples of its set);
- the head on the ResNet's pooled feature is the paper's top, fc ``hidden_dim`` (512, the 512f of its
  64c5-128c5-256c5-512f network) - ReLU - dropout - fc N: the N-way layer keeps the paper's width (hidden x N, not
  2048 x N) and the dropout its place before the softmax layer (``hidden_dim=0``: dropout, then one fc N);
- the principal components of contrast 1 are ImageNet's RGB pixel components (AlexNet's PCA lighting), not those
  of the training set; the affine transformation fills the border with black (the paper transforms a patch in its
  source image); the input is normalised with the preset's mean and std (the paper subtracts the mean pixel);
- the paper states ranges, not distributions: the multiplicative factors and powers are drawn log-uniformly (a factor
  and its inverse equally likely), the shifts, angle, translation and scale uniformly (``RandomAffine``'s draw); S and
  V get their own draws; the pieces are applied in the paper's order (geometric, contrast 1, contrast 2, colour);
- optimisation: SGD, momentum 0.9, lr 0.01 per 128 samples, dropout 0.5, weight decay 5e-4 with a cosine schedule:
  the paper lowers the lr when the validation error of its surrogate task stops decreasing (no plateau schedule in
  sslhub).

Not verified (the paper's PDF and supplementary material were not opened; the values come from the paper's text as
remembered and summaries of it): the lr, its decay, the batch size, the weight decay, the dropout rate, the number of
epochs and K of the reported networks. No implementation with a ResNet is released by the authors (their Caffe
networks only; neither VISSL nor MMSelfSup has Exemplar-CNN); google-research/revisiting-self-supervised's exemplar
ResNet-50 (TF-Hub) is the triplet-loss variant of Doersch & Zisserman 2017, another objective: no tag.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from sslhub.batch import Batch
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, register_method, register_preset
from sslhub.transforms import CIFAR10_MEAN, CIFAR10_STD, HSVPowerContrast, MultiView, PCAContrast, color_jitter, view


@dataclass
class ExemplarHparams(MethodHparams):
    """The paper's SGD (module docstring; values not verified): lr 0.01 per 128 samples, momentum 0.9, weight decay
    5e-4, dropout 0.5, 100 epochs (as many samples per class as its K = 100), cosine decay."""

    optimizer: str = "sgd"
    lr: float = 0.01
    lr_batch_size: int = 128
    weight_decay: float = 5e-4
    epochs: int = 100
    num_samples: int = hparam(0, "surrogate classes = training images (0: set by the trainer, bind_dataset)")
    hidden_dim: int = hparam(512, "width of the fully connected layer before the N-way softmax (0: none)")
    dropout: float = hparam(0.5, "dropout before the N-way softmax layer")
    views_per_image: int = hparam(1, "transformed copies of each image in a batch")
    translate: float = hparam(0.2, "largest vertical and horizontal translation, as a fraction of the image side")
    scale: tuple[float, float] = hparam((0.7, 1.4), "range of the scaling factor")
    degrees: float = hparam(20.0, "largest rotation angle in degrees")
    pca_factors: tuple[float, float] = hparam((0.5, 2.0), "contrast 1: range of the factor on each principal component")
    hsv_powers: tuple[float, float] = hparam((0.25, 4.0), "contrast 2: range of the power of saturation and value")
    hsv_factors: tuple[float, float] = hparam((0.7, 1.4), "contrast 2: range of the factor of saturation and value")
    hsv_shifts: tuple[float, float] = hparam((-0.1, 0.1), "contrast 2: range of the value added to saturation, value")
    hue_shift: float = hparam(0.1, "colour: largest shift of the hue (H in [0, 1))")

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples < 0 or self.hidden_dim < 0 or self.views_per_image < 1 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"num_samples {self.num_samples} and hidden_dim {self.hidden_dim} must be >= 0, views_per_image "
                f"{self.views_per_image} >= 1 and dropout {self.dropout} in [0, 1)"
            )


def surrogate_classifier(width: int, num_classes: int) -> nn.Linear:
    """The N-way softmax layer; empty (N = 0) until the trainer sizes it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return nn.Linear(width, num_classes)


@register_method("exemplar")
class Exemplar(SSLMethod):
    """logits = classifier(head(encoder(T x_i))), cross-entropy with the surrogate class i = ``batch.index`` over
    the N training images (§2.2). ``head``: fc ``hidden_dim`` - ReLU - dropout (the paper's fully connected layer);
    ``classifier``: fc N (its softmax layer), sized by ``bind_dataset``. The released encoder is the backbone;
    ``pooler_output`` is its final pooled feature (the paper evaluates its own networks' pooled feature maps of all
    layers but the softmax, with an SVM)."""

    Hparams = ExemplarHparams
    paper = "Discriminative Unsupervised Feature Learning with Convolutional Neural Networks (Exemplar-CNN)"
    arxiv = "1406.6909"
    citation = (
        "@InProceedings{dosovitskiy2014discriminative,\n  author    = {Alexey Dosovitskiy and Jost Tobias Springenberg "
        "and Martin Riedmiller and Thomas Brox},\n  title     = {Discriminative Unsupervised Feature Learning with "
        "Convolutional Neural Networks},\n  booktitle = {NIPS},\n  year      = {2014},\n}"
    )
    released = (
        "encoder backbone (pooler_output: the final pooled feature; the paper's SVMs read the max-pooled feature maps "
        "of all its layers but the softmax)"
    )
    # The paper trains SVMs on pooled multi-layer features: no linear-probe recipe of its own.
    linear_recipe = LinearRecipe("sslhub linear protocol (the paper trains SVMs)", 0.1, 100, 256)
    tiny_preset = "exemplar_resnet18_32px"
    tiny_overrides = {"num_samples": 16, "hidden_dim": 16}

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config)
        width = hp.hidden_dim or self.encoder.num_features
        hidden = [nn.Linear(self.encoder.num_features, width), nn.ReLU(inplace=True)] if hp.hidden_dim else []
        self.head = nn.Sequential(*hidden, nn.Dropout(hp.dropout))
        self.classifier = surrogate_classifier(width, hp.num_samples)

    def bind_dataset(self, num_samples: int) -> None:
        """One output per training image: a new model (``num_samples`` 0) gets its N-way layer here and records N
        in its configuration, so a saved model rebuilds it; a model trained on another number of images is an
        error."""
        if self.record_num_samples(num_samples, "classifier", "surrogate classes"):
            device = self.classifier.weight.device
            self.classifier = surrogate_classifier(self.classifier.in_features, num_samples).to(device)

    def transformations(self) -> v2.Compose:
        """§2.1: the seed patch (resize, centre crop), translation + scaling + rotation, contrast 1, contrast 2,
        colour; normalised."""
        cfg, hp = self.config, self.hparams
        return view(
            v2.Resize(cfg.image_size),
            v2.CenterCrop(cfg.image_size),
            v2.RandomAffine(hp.degrees, (hp.translate, hp.translate), tuple(hp.scale)),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            PCAContrast(factors=tuple(hp.pca_factors)),
            HSVPowerContrast(tuple(hp.hsv_powers), tuple(hp.hsv_factors), tuple(hp.hsv_shifts)),
            color_jitter(0, 0, 0, hp.hue_shift, p=1),
            mean=cfg.image_mean,
            std=cfg.image_std,
        )

    def view_recipe(self):
        """``views_per_image`` independent transformations of each image."""
        return MultiView([self.transformations()] * self.hparams.views_per_image)

    def forward(self, batch: Batch) -> MethodOutput:
        """Every view of image i is a sample of surrogate class i = ``batch.index[i]``."""
        num_classes = self.classifier.out_features
        if num_classes == 0:
            raise ValueError("the exemplar classifier has no classes: set num_samples or train with the Pretrainer")
        images = torch.cat(batch.views)
        labels = batch.index.to(images.device).repeat(len(batch.views))
        if labels.min() < 0 or labels.max() >= num_classes:
            raise IndexError(f"sample index {int(labels.max())} outside the {num_classes} surrogate classes")
        logits = self.classifier(self.head(self.encoder(images)))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return MethodOutput(loss, {"surrogate_accuracy": float(accuracy)})


register_preset(
    Preset(
        "exemplar_resnet50",
        "exemplar",
        "resnet50",
        description="Exemplar-CNN on a timm resnet50, 224 px: one surrogate class per training image, the paper's "
        "transformations, fc 512 - dropout - fc N head, SGD lr 0.01 per 128, 100 epochs",
    )
)

# The paper's own patch size: 32 x 32 (its STL-10 seed patches), on a timm ResNet-18, with CIFAR-10's mean / std as
# the other *_resnet18_32px presets.
register_preset(
    Preset(
        "exemplar_resnet18_32px",
        "exemplar",
        "resnet18",
        image_size=32,
        image_mean=CIFAR10_MEAN,
        image_std=CIFAR10_STD,
        description="Exemplar-CNN, ResNet-18 for 32 px images (the paper's patch size): the paper's transformations "
        "and recipe",
    )
)
