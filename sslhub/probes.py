"""Frozen-feature evaluation: feature extraction, the weighted k-nearest-neighbour classifier and linear probes.

The kNN classifier is the one of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", arXiv 1805.01978, eq. 7) as implemented in DINO's ``eval_knn.py`` (Caron et al. 2021,
arXiv 2104.14294): cosine similarity between L2-normalised features, the k most similar training samples vote
for their class with weight ``exp(sim / T)``, T = 0.07, k = 20.

Linear probes train a linear classifier on frozen features, with the recipe of the official linear-classification
script of the model's method (a ``LinearRecipe`` each method declares), or fit an L2-regularised logistic regression
with L-BFGS (scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sslhub.data import loader_options
from sslhub.optim import create_optimizer


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eval mode, then restore every submodule's own train/eval flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _pooled(output) -> torch.Tensor:
    features = getattr(output, "pooler_output", output)
    if not torch.is_tensor(features) or features.ndim != 2:
        raise TypeError(
            "extract_features needs a model returning a (batch, dim) tensor or an object with a (batch, dim) "
            f"`.pooler_output`; got {type(output).__name__}"
            + (f" with shape {tuple(features.shape)}" if torch.is_tensor(features) else "")
        )
    return features


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int | str = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every sample of ``dataset`` (items ``(image tensor, label)``), in dataset order.

    ``model`` is an ``SSLModel`` (``model(pixel_values).pooler_output``) or any module returning a (B, D) tensor
    or an object with ``.pooler_output``. It runs in eval mode under ``torch.inference_mode`` on ``device``
    (default: where its parameters are); its train/eval flags are restored afterwards.
    Returns ``(features (N, D) float32, labels (N,) long)`` on the CPU.
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    pin_memory = torch.device(device).type == "cuda"
    options = loader_options(num_workers, pin_memory, persistent=False)  # one pass: no workers to keep
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **options)
    features, labels = [], []
    with _eval_mode(model), torch.inference_mode():
        for images, targets in tqdm(loader, desc="Extracting features", disable=not progress):
            output = model(images.to(device, non_blocking=True))
            features.append(_pooled(output).float().cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.long))
    if not features:
        raise ValueError("extract_features got an empty dataset")
    # Concatenating outside inference mode gives ordinary tensors that callers may modify in place.
    return torch.cat(features), torch.cat(labels)


def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, C) of the weighted kNN classifier (InstDisc eq. 7, DINO ``knn_classifier``).

    ``score[i, c] = sum over the k training samples j most cosine-similar to test sample i with label c of
    exp(cos(x_i, x_j) / temperature)``. ``k`` is clamped to the number of training samples; ``num_classes``
    defaults to ``max(train_labels) + 1``. Test rows are processed ``chunk_size`` at a time so that only a
    (chunk_size, N_train) similarity matrix is held in memory. Computed on ``train_features.device``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if train_features.shape[0] != train_labels.shape[0] or train_features.shape[0] == 0:
        raise ValueError(
            f"need one label per training sample and at least one sample; got {train_features.shape[0]} "
            f"features and {train_labels.shape[0]} labels"
        )
    train_labels = train_labels.to(train_features.device, torch.long)
    if train_labels.min() < 0:
        raise ValueError("weighted kNN needs labelled training samples (labels >= 0); got a negative label")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(train.device, torch.float32), dim=1)
        similarity, neighbours = (test @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        chunk_scores = torch.zeros(test.shape[0], num_classes, device=train.device)
        scores.append(chunk_scores.scatter_add_(1, train_labels[neighbours], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=train.device)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`weighted_knn_predict` (ties go to the lowest class index)."""
    if test_labels.numel() == 0 or test_labels.min() < 0:
        raise ValueError("knn_accuracy needs at least one test sample, all labelled (labels >= 0)")
    scores = weighted_knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature)
    predictions = scores.argmax(dim=1).cpu()
    return (predictions == test_labels.cpu()).float().mean().item()


def knn_evaluate(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    progress: bool = True,
    num_workers: int | str = 0,
) -> float:
    """kNN top-1 accuracy of ``model``'s frozen features: train set as memory bank, test set as queries.

    Both datasets should already use the evaluation transform (e.g. ``sslhub.transforms.eval_transform``).
    """
    options = dict(batch_size=batch_size, num_workers=num_workers, progress=progress)
    train_features, train_labels = extract_features(model, train_dataset, **options)
    test_features, test_labels = extract_features(model, test_dataset, **options)
    return knn_accuracy(train_features, train_labels, test_features, test_labels, k=k, temperature=temperature)


@dataclass(frozen=True)
class LinearRecipe:
    """A linear-classification protocol on frozen features: optimizer (``"sgd"`` with momentum 0.9 or ``"lars"``),
    ``base_lr`` per 256 images, weight decay, epochs, batch size, linear warm-up epochs then cosine decay to 0, and
    ``batchnorm``: a ``BatchNorm1d(affine=False, eps=1e-6)`` before the linear layer (MAE). ``source`` names the
    official script it follows."""

    source: str
    base_lr: float
    epochs: int
    batch_size: int
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    batchnorm: bool = False

    @property
    def lr(self) -> float:
        """The absolute learning rate of the official run: ``base_lr x batch_size / 256``."""
        return self.base_lr * self.batch_size / 256


# Deviations on cached features, for every recipe: no augmentation (the official scripts train on random resized
# crops + flips; here the centre-crop features are computed once); cosine decay (MoCo v1/v2 decays in steps at
# epochs 60 and 80 unless ``--cos``); data smaller than one batch is one batch, trained with the official absolute
# lr; and at least MIN_LINEAR_STEPS optimizer steps (more epochs on small data, where the official epoch count would
# give a handful of steps).
MIN_LINEAR_STEPS = 1000


def linear_classifier(
    dim: int, num_classes: int, batchnorm: bool = False, generator: torch.Generator | None = None
) -> nn.Sequential:
    """``Linear(dim, num_classes)`` with weights ~ N(0, 0.01²) and zero bias (MoCo / DINO / MAE linear heads),
    after a ``BatchNorm1d(dim, affine=False, eps=1e-6)`` when ``batchnorm`` (MAE ``main_linprobe.py``). The norm
    keeps a cumulative average of the batch statistics (``momentum=None``) rather than MAE's running average, so
    that the short runs of small data end with the statistics of the whole training set."""
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    norm = [nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)] if batchnorm else []
    return nn.Sequential(*norm, linear)


def _warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Per-step lr: linear warm-up to the optimizer's lr, then cosine decay to 0 at ``total_steps``."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def linear_epochs(recipe: LinearRecipe, num_samples: int) -> int:
    """The recipe's epochs, or more so that ``num_samples`` images give at least ``MIN_LINEAR_STEPS`` steps."""
    steps_per_epoch = math.ceil(num_samples / min(recipe.batch_size, num_samples))
    return max(recipe.epochs, math.ceil(MIN_LINEAR_STEPS / steps_per_epoch))


def train_linear_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    recipe: LinearRecipe,
    seed: int = 0,
    progress: bool = True,
) -> nn.Sequential:
    """A :func:`linear_classifier` trained with cross-entropy on fixed ``features`` (N, D), on their device:
    ``recipe.epochs`` passes over shuffled batches of ``min(recipe.batch_size, N)`` (order from a generator seeded
    with ``seed``, which also draws the initial weights), lr ``recipe.lr`` with warm-up + cosine per step. Returned
    in eval mode."""
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need one label per feature row and at least one row; got {features.shape}, {labels.shape}")
    batch_size = min(recipe.batch_size, features.shape[0])
    generator = torch.Generator().manual_seed(seed)
    classifier = linear_classifier(features.shape[1], num_classes, recipe.batchnorm, generator).to(features.device)
    groups = [{"params": list(classifier.parameters()), "weight_decay": recipe.weight_decay}]
    optimizer = create_optimizer(recipe.optimizer, groups, recipe.lr)
    steps_per_epoch = math.ceil(features.shape[0] / batch_size)
    schedule = _warmup_cosine(optimizer, recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch)
    labels = labels.to(features.device)
    classifier.train()
    for _ in tqdm(range(recipe.epochs), desc="Linear probe", disable=not progress):
        for batch in torch.randperm(features.shape[0], generator=generator).to(features.device).split(batch_size):
            loss = F.cross_entropy(classifier(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifier.eval()


def logistic_regression_logits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    C: float = 1.0,
    max_iter: int = 1000,
) -> torch.Tensor:
    """Log-probabilities (N_test, num_classes) of an L2-regularised multinomial logistic regression fitted with
    L-BFGS on standardised features (scikit-learn ``StandardScaler`` + ``LogisticRegression``; ``C`` = inverse
    regularisation strength). Classes absent from the training labels get -inf."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    model.fit(train_features.cpu().double().numpy(), train_labels.cpu().numpy())
    log_proba = torch.from_numpy(model.predict_log_proba(test_features.cpu().double().numpy()))
    logits = torch.full((test_features.shape[0], num_classes), -math.inf, dtype=torch.float64)
    logits[:, torch.from_numpy(model.classes_)] = log_proba
    return logits
