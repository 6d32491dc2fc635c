"""Frozen-feature evaluation: feature extraction and the weighted k-nearest-neighbour classifier.

The kNN classifier is the one of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", arXiv 1805.01978, eq. 7) as implemented in DINO's ``eval_knn.py`` (Caron et al. 2021,
arXiv 2104.14294): cosine similarity between L2-normalised features, the k most similar training samples vote
for their class with weight ``exp(sim / T)``, T = 0.07, k = 20.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


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
    num_workers: int = 0,
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
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
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
) -> float:
    """kNN top-1 accuracy of ``model``'s frozen features: train set as memory bank, test set as queries.

    Both datasets should already use the evaluation transform (e.g. ``sslhub.transforms.eval_transform``).
    """
    train_features, train_labels = extract_features(model, train_dataset, batch_size=batch_size, progress=progress)
    test_features, test_labels = extract_features(model, test_dataset, batch_size=batch_size, progress=progress)
    return knn_accuracy(train_features, train_labels, test_features, test_labels, k=k, temperature=temperature)
