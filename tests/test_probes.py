"""The evaluation algorithms of ``sslhub.probes``: weighted kNN, feature extraction, linear probes (the recipes the
methods declare) and the L-BFGS logistic regression."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from sslhub.probes import (
    extract_features,
    knn_accuracy,
    knn_evaluate,
    linear_classifier,
    linear_epochs,
    logistic_regression_logits,
    train_linear_classifier,
    weighted_knn_predict,
)
from sslhub.registry import get_method

# Train set for the hand-derived examples: after L2 normalisation the samples are e1, e2, -e1, e1.
TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1, 0])


def reference_knn_scores(train, train_labels, test, k, temperature, num_classes):
    """InstDisc eq. 7, written out: cosine similarities, k largest, per-class sums of exp(sim / T)."""
    train, test, train_labels = train.tolist(), test.tolist(), train_labels.tolist()
    scores = []
    for x in test:
        sims = []
        for j, y in enumerate(train):
            dot = sum(a * b for a, b in zip(x, y, strict=True))
            sims.append((dot / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y)), j))
        row = [0.0] * num_classes
        for sim, j in sorted(sims, reverse=True)[:k]:
            row[train_labels[j]] += math.exp(sim / temperature)
        scores.append(row)
    return torch.tensor(scores, dtype=torch.float64)


def test_weighted_knn_hand_computed_scores():
    test = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    scores = weighted_knn_predict(TRAIN, TRAIN_LABELS, test, k=3, temperature=0.5, num_classes=3)
    # Row 0: cos = 1/sqrt2 with samples 0, 1, 3 (labels 0, 1, 0), -1/sqrt2 with sample 2 (left out, k=3).
    # Row 1: cos = 1, 0, -1, 1 -> neighbours 0, 3 (label 0, sim 1) and 1 (label 1, sim 0).
    w = math.exp(1 / math.sqrt(2) / 0.5)
    expected = torch.tensor([[2 * w, w, 0.0], [2 * math.exp(2.0), 1.0, 0.0]])
    torch.testing.assert_close(scores, expected)


def test_weighted_knn_k_larger_than_train_set_uses_every_sample():
    scores = weighted_knn_predict(TRAIN, TRAIN_LABELS, torch.tensor([[3.0, 0.0]]), k=20, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[2 * math.exp(2.0), 1.0 + math.exp(-2.0)]]))


def test_weighted_knn_matches_brute_force_reference_across_chunks():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(30, 8, generator=generator)
    labels = torch.randint(0, 5, (30,), generator=generator)
    test = torch.randn(7, 8, generator=generator)
    expected = reference_knn_scores(train, labels, test, k=6, temperature=0.07, num_classes=5)
    scores = weighted_knn_predict(train, labels, test, k=6, num_classes=5, chunk_size=3)  # T = 0.07 default
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=0.0)


def test_knn_accuracy_counts_top1_hits():
    test = torch.tensor([[1.0, 1.0], [3.0, 0.0], [-1.0, 2.0]])
    # predictions: 0 (2w > w), 0 (2e^2 > 1), 1 (the two nearest samples, cos 2/sqrt5 and 1/sqrt5, are label 1)
    assert knn_accuracy(TRAIN, TRAIN_LABELS, test, torch.tensor([0, 1, 1]), k=3, temperature=0.07) == pytest.approx(
        2 / 3
    )


def test_knn_accuracy_is_one_on_separable_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 10

    def sample(n):
        labels = torch.arange(n) % 4
        return centers[labels] + torch.randn(n, 16, generator=generator), labels

    (train, train_labels), (test, test_labels) = sample(40), sample(12)
    assert knn_accuracy(train, train_labels, test, test_labels) == 1.0
    assert knn_accuracy(train, train_labels, test, (test_labels + 1) % 4) == 0.0


def test_weighted_knn_rejects_unlabelled_train_samples_and_bad_k():
    with pytest.raises(ValueError, match="labels >= 0"):
        weighted_knn_predict(TRAIN, torch.tensor([0, 1, -1, 0]), TRAIN)
    with pytest.raises(ValueError, match="k must be"):
        weighted_knn_predict(TRAIN, TRAIN_LABELS, TRAIN, k=0)


class PoolerModel(nn.Module):
    """Returns a transformers output with ``.pooler_output``; records the state it was called in."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 4)
        self.seen = []

    def forward(self, pixel_values):
        self.seen.append((self.training, self.proj.training, torch.is_inference_mode_enabled()))
        return BaseModelOutputWithPooling(pooler_output=self.proj(pixel_values.flatten(1)))


def image_dataset(n):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 2, 2, generator=generator), i % 3) for i in range(n)]


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_extract_features_pooler_output_in_order_and_restores_modes(mode):
    model = PoolerModel().train(mode != "eval")
    if mode == "mixed":
        model.proj.eval()
    before = [m.training for m in model.modules()]
    dataset = image_dataset(7)
    features, labels = extract_features(model, dataset, batch_size=3, progress=False)

    with torch.no_grad():
        expected = torch.stack([model.proj(image.flatten()) for image, _ in dataset])
    torch.testing.assert_close(features, expected)
    assert features.dtype == torch.float32 and labels.dtype == torch.long
    assert labels.tolist() == [i % 3 for i in range(7)]
    assert len(model.seen) == 3 and all(state == (False, False, True) for state in model.seen)
    assert [m.training for m in model.modules()] == before
    features.mul_(2)  # ordinary tensors, not inference tensors


def test_extract_features_accepts_tensor_output_and_rejects_feature_maps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    features, _ = extract_features(model, image_dataset(4), progress=False)
    assert features.shape == (4, 5)
    with pytest.raises(TypeError, match=r"\(batch, dim\)"):
        extract_features(nn.Identity(), image_dataset(2), progress=False)


def test_knn_evaluate_end_to_end_on_separable_images():
    generator = torch.Generator().manual_seed(0)

    def dataset(n):
        return [
            (torch.full((1, 2, 2), 5.0 * (i % 2) - 2.5) + 0.1 * torch.randn(1, 2, 2, generator=generator), i % 2)
            for i in range(n)
        ]

    # A parameter-free model (nn.Flatten) runs on the CPU; k=20 exceeds the 10 training samples.
    assert knn_evaluate(nn.Flatten(), dataset(10), dataset(6), batch_size=4) == 1.0


def separable_clusters(n: int, seed: int, scale: float = 1.0):
    """Four Gaussian clusters around 10 x the first four unit vectors of R^16, times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    return scale * (torch.eye(4, 16)[labels] * 10 + torch.randn(n, 16, generator=generator)), labels


@pytest.mark.parametrize("recipe", ["moco_v2", "dino", "mae"])
def test_linear_probe_recipes_fit_separable_features(recipe):
    train, train_labels = separable_clusters(200, 0)
    test, test_labels = separable_clusters(40, 1)
    probe = get_method(recipe).get_linear_recipe()
    probe = dataclasses.replace(probe, epochs=linear_epochs(probe, len(train)))
    classifier = train_linear_classifier(train, train_labels, 4, probe, progress=False)
    assert not classifier.training
    with torch.no_grad():
        accuracy = (classifier(test).argmax(1) == test_labels).float().mean().item()
    assert accuracy == 1.0


def test_mae_head_is_batchnorm_without_affine_holding_the_training_statistics():
    features, labels = separable_clusters(64, 0, scale=50.0)
    recipe = dataclasses.replace(get_method("mae").get_linear_recipe(), epochs=30)  # 30 one-batch epochs
    norm, linear = train_linear_classifier(features, labels, 4, recipe, progress=False)
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert not list(norm.parameters()) and linear.in_features == 16
    torch.testing.assert_close(norm.running_mean, features.mean(0))
    torch.testing.assert_close(norm.running_var, features.var(0))  # unbiased, as BatchNorm keeps it
    plain = linear_classifier(16, 4)
    assert len(plain) == 1 and plain[0].bias.abs().sum() == 0 and 0.005 < plain[0].weight.std() < 0.015


MOCO_V2 = get_method("moco_v2").get_linear_recipe()


def test_linear_training_is_seeded_and_epochs_stretch_to_the_minimum_steps():
    features, labels = separable_clusters(50, 0)
    recipe = dataclasses.replace(MOCO_V2, epochs=3)
    first, again, other = (
        train_linear_classifier(features, labels, 4, recipe, seed=seed, progress=False) for seed in (1, 1, 2)
    )
    assert torch.equal(first[0].weight, again[0].weight) and not torch.equal(first[0].weight, other[0].weight)
    assert linear_epochs(MOCO_V2, 50) == 1000  # one batch an epoch
    assert linear_epochs(MOCO_V2, 2560) == 100  # 10 steps x 100 epochs = 1000 already
    assert linear_epochs(MOCO_V2, 512) == 500


def test_logistic_regression_gives_log_probabilities_and_minus_inf_for_unseen_classes():
    train, train_labels = separable_clusters(40, 0)
    test, test_labels = separable_clusters(12, 1)
    keep = train_labels != 3  # class 3 never seen in training
    logits = logistic_regression_logits(train[keep], train_labels[keep], test, num_classes=5)
    assert logits.shape == (12, 5) and torch.isinf(logits[:, 3:]).all()
    torch.testing.assert_close(logits[:, :3].exp().sum(1), torch.ones(12, dtype=torch.float64))
    seen = test_labels != 3
    assert (logits.argmax(1)[seen] == test_labels[seen]).all()
