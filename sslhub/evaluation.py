"""Evaluating a checkpoint's frozen features on a labelled dataset: the Python side of ``sslhub eval knn | linear``
(the algorithms are in ``sslhub.probes``).

``sslhub.evaluation.knn(model, data)`` and ``sslhub.evaluation.linear(model, data)`` take any sslhub checkpoint (model
object, preset name, ``"preset.tag"`` with the authors' weights, local directory or Hub id) and labelled data (a spec
of :func:`sslhub.data.labelled_splits` or a ``(train, evaluation)`` pair of ``ImageDataset``), preprocess images as
the checkpoint's method declares (``SSLMethod.eval_transform(config)``), extract features once (cached
on disk under ``cache_root() / "features"``, keyed by model weights, data and transform) and return top-1 / top-5,
per-class accuracy and the confusion matrix. With ``output_dir`` they write ``metrics.json`` and
``confusion_matrix.png``, and add the accuracies to a local checkpoint's model card (``model-index``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from sslhub.configuration import SSLConfig
from sslhub.conversion.loading import CheckpointError, non_finite
from sslhub.conversion.pretrained import is_release_name, refuse_pretrained_path
from sslhub.data import ImageDataset, dataset_fingerprint, labelled_splits
from sslhub.factory import create_model, create_transform, from_pretrained
from sslhub.files import cache_root, write_atomically
from sslhub.hub.cards import describe_data
from sslhub.modeling import SSLForImageClassification, SSLForPreTraining
from sslhub.probes import (
    extract_features,
    linear_epochs,
    logistic_regression_logits,
    train_linear_classifier,
    weighted_knn_predict,
)
from sslhub.registry import get_method, list_models
from sslhub.reporting import add_results_to_model_card, classification_report, save_report

CACHE_FORMAT = 1  # bump when the cached features of the same inputs would differ


@dataclass
class FeatureOptions:
    """How the model is loaded, data split and features extracted; every ``knn`` / ``linear`` keyword beyond their
    own. ``pretrained_path``: the authors' file of a ``"preset.tag"`` model already on disk."""

    val_fraction: float = 0.2
    seed: int = 0
    image_column: str | None = None
    label_column: str | None = None
    batch_size: int = 256
    num_workers: int | str = "auto"
    device: str | None = None
    cache: bool = True
    progress: bool = True
    transform: Callable | None = None
    pretrained_path: str | os.PathLike | None = None


@dataclass
class _Run:
    """A resolved evaluation: model, where it came from, class names and the cached features of both splits."""

    model: nn.Module
    options: FeatureOptions
    model_name: str
    checkpoint_dir: Path | None
    data_name: str | None  # None: in-memory datasets, which a model card cannot name
    classes: list[str]
    transform: Callable
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_model(name: str | os.PathLike, pretrained_path=None) -> tuple[nn.Module, Path | None]:
    """``(model, checkpoint directory or None)``: a local sslhub directory or Hub id (``from_pretrained``), a
    ``"preset.tag"`` with the authors' weights (``create_model(pretrained=True)``, from ``pretrained_path`` when
    given) or a bare preset (random init)."""
    path = Path(name)
    if is_release_name(name):
        return create_model(str(name), pretrained=True, pretrained_path=pretrained_path), None
    refuse_pretrained_path(name, pretrained_path)
    if path.is_dir():
        return from_pretrained(path), path
    name = str(name)
    if name in list_models():
        warnings.warn(f"{name} is a preset without weights: evaluating a random initialisation", stacklevel=3)
        return create_model(name), None
    return from_pretrained(name), None


def feature_model(model: nn.Module) -> nn.Module:
    """The encoder whose pooled features are evaluated: the released encoder of a pretraining model, the encoder of
    a classifier, else ``model`` itself."""
    if isinstance(model, SSLForPreTraining):
        return model.released_model()
    if isinstance(model, SSLForImageClassification):
        return model.ssl
    return model


def check_finite_weights(model: nn.Module, name: str) -> None:
    """Weights that are not finite (a run that diverged, a damaged file) give chance-level features that would be
    reported as an accuracy: a ``CheckpointError`` naming them."""
    state = model.state_dict()
    bad = non_finite(state)
    if bad:
        raise CheckpointError(
            f"{name}: {len(bad)} of its {len(state)} weight tensors hold NaN or inf ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}), as after a diverged run, so sslhub does not evaluate it"
        )


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class, config (JSON) and every state-dict tensor (name, dtype, shape and bytes)."""
    config = getattr(model, "config", None)
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update((config.to_json_string(use_diff=False) if config is not None else "").encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_features(
    model: nn.Module, dataset: ImageDataset, options: FeatureOptions, model_hash: str, description: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features`` of ``dataset`` (its transform set), read from or written to a safetensors file under
    ``cache_root() / "features"`` named by a hash of the model (``model_hash``), the data, the transform and
    ``description["split"]``. ``description`` is stored as the file's metadata."""
    key = json.dumps(
        [CACHE_FORMAT, model_hash, dataset_fingerprint(dataset), repr(dataset.transform), description["split"]]
    )
    path = cache_root() / "features" / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
    if options.cache and path.is_file():
        cached = load_file(path)
        return cached["features"], cached["labels"]
    features, labels = extract_features(
        model,
        dataset,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        device=options.device,
        progress=options.progress,
    )
    if options.cache:
        tensors = {"features": features.contiguous(), "labels": labels.contiguous()}
        write_atomically(path, save_safetensors(tensors, metadata={k: str(v) for k, v in description.items()}))
    return features, labels


def _model_transform(model: nn.Module, transform: Callable | None) -> Callable:
    if transform is not None:
        return transform
    if not isinstance(getattr(model, "config", None), SSLConfig):
        raise ValueError(f"{type(model).__name__} has no sslhub config to take the preprocessing from; pass transform")
    return create_transform(model)


def _datasets(data, options: FeatureOptions) -> tuple[ImageDataset, ImageDataset, str | None]:
    """(train, evaluation, spec) from a spec or a pair of datasets (spec ``None``); copies, so the caller's stay
    untouched."""
    if isinstance(data, (str, os.PathLike)):
        train, test = labelled_splits(
            str(data),
            val_fraction=options.val_fraction,
            seed=options.seed,
            image_column=options.image_column,
            label_column=options.label_column,
        )
        return train, test, str(data)
    train, test = (copy.copy(dataset) for dataset in data)
    if train.classes is None or train.labels is None or test.labels is None:
        raise ValueError("a (train, evaluation) pair of datasets needs labels on both and class names on the train set")
    return train, test, None


def _prepare(model, data, options: dict) -> _Run:
    options = FeatureOptions(**options)
    train, test, data_name = _datasets(data, options)  # bad data fails before a model is downloaded
    if isinstance(model, nn.Module):
        refuse_pretrained_path(type(model).__name__, options.pretrained_path)
        source, checkpoint_dir = model, None
    else:
        source, checkpoint_dir = load_model(model, options.pretrained_path)
    encoder = feature_model(source)
    config = getattr(encoder, "config", None)
    model_name = str(model) if not isinstance(model, nn.Module) else getattr(config, "preset", None) or "model"
    check_finite_weights(encoder, model_name)
    if options.device is None and not isinstance(model, nn.Module):  # a model we loaded: the best device there is
        options.device = "cuda" if torch.cuda.is_available() else "cpu"
    if options.device is not None:
        encoder.to(options.device)
    transform = _model_transform(encoder, options.transform)
    train.transform = test.transform = transform
    model_hash = model_fingerprint(encoder)
    described = {"model": model_name, "data": data_name or "in-memory data"}
    return _Run(
        model=encoder,
        options=options,
        model_name=model_name,
        checkpoint_dir=checkpoint_dir,
        data_name=data_name,
        classes=list(train.classes),
        transform=transform,
        train=cached_features(encoder, train, options, model_hash, {**described, "split": "train"}),
        test=cached_features(encoder, test, options, model_hash, {**described, "split": "evaluation"}),
    )


def _finish(run: _Run, result: dict, card_metrics: dict[str, float], output_dir, update_card: bool) -> dict:
    """Add the common fields; with ``output_dir`` save the report and update a local checkpoint's card."""
    result.update(
        model=run.model_name,
        data=run.data_name or "in-memory data",
        class_names=run.classes,
        num_train=int(run.train[1].shape[0]),
        num_eval=int(run.test[1].shape[0]),
        feature_dim=int(run.train[0].shape[1]),
        transform=repr(run.transform),
        card_metrics=card_metrics,
    )
    if output_dir is None:
        return result
    model = Path(run.model_name).name if run.checkpoint_dir is not None else run.model_name
    title = f"{result['protocol']}: {model} on {describe_data(result['data'])[0]}"
    files = save_report(result, output_dir, title)
    if update_card and run.checkpoint_dir is not None and run.data_name is not None:
        name, dataset_id = describe_data(run.data_name)
        files["model_card"] = add_results_to_model_card(run.checkpoint_dir, card_metrics, name, dataset_id)
    result["files"] = {kind: str(path) for kind, path in files.items()}
    return result


def knn(
    model: nn.Module | str | os.PathLike,
    data: str | os.PathLike | tuple[ImageDataset, ImageDataset],
    *,
    k: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    output_dir: str | os.PathLike | None = None,
    update_card: bool = True,
    **options,
) -> dict:
    """Weighted kNN on frozen features (InstDisc eq. 7, DINO ``eval_knn.py``): cosine similarity, the ``k`` nearest
    training images vote with ``exp(sim / temperature)``; one report per ``k`` (``by_k``), the first ``k`` also at
    the top level. ``options``: the fields of :class:`FeatureOptions`."""
    if not k or min(k) < 1:
        raise ValueError(f"k needs one or more values >= 1, got {list(k)}")
    run = _prepare(model, data, options)
    (train_features, train_labels), (test_features, test_labels) = run.train, run.test
    by_k = {}
    for neighbours in k:
        scores = weighted_knn_predict(
            train_features, train_labels, test_features, neighbours, temperature, num_classes=len(run.classes)
        )
        by_k[str(neighbours)] = classification_report(scores, test_labels, run.classes)
    result = {
        "protocol": "knn",
        **by_k[str(k[0])],
        "by_k": by_k,
        "settings": {"k": list(k), "temperature": temperature},
    }
    card_metrics = {f"kNN top-1 (k={neighbours})": by_k[str(neighbours)]["top1"] for neighbours in k}
    return _finish(run, result, card_metrics, output_dir, update_card)


def linear_recipe(model: nn.Module, num_samples: int, **overrides):
    """The linear recipe ``model``'s method declares (``SSLMethod.linear_recipe``; none is an error) with the epochs
    stretched to at least ``MIN_LINEAR_STEPS`` steps, then ``overrides`` (``None`` values ignored): ``epochs``,
    ``batch_size``, ``weight_decay``, ``batchnorm``, and ``lr`` (absolute, replaces the scaled base lr)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "method"):
        raise ValueError(f"{type(model).__name__} has no sslhub config naming its method; use method='lbfgs'")
    recipe = get_method(config.method).get_linear_recipe()
    recipe = dataclasses.replace(recipe, epochs=linear_epochs(recipe, num_samples))
    overrides = {key: value for key, value in overrides.items() if value is not None}
    lr = overrides.pop("lr", None)
    recipe = dataclasses.replace(recipe, **overrides)
    return recipe if lr is None else dataclasses.replace(recipe, base_lr=lr * 256 / recipe.batch_size)


def linear(
    model: nn.Module | str | os.PathLike,
    data: str | os.PathLike | tuple[ImageDataset, ImageDataset],
    *,
    method: str = "sgd",
    epochs: int | None = None,
    lr: float | None = None,
    train_batch_size: int | None = None,
    weight_decay: float | None = None,
    batchnorm: bool | None = None,
    C: float = 1.0,
    max_iter: int = 1000,
    output_dir: str | os.PathLike | None = None,
    update_card: bool = True,
    **options,
) -> dict:
    """Linear probe on frozen features. ``method="sgd"``: a linear layer trained with the official recipe of the
    model's method (:func:`linear_recipe`; MoCo: SGD lr 30, MAE: LARS + ``BatchNorm1d(affine=False)``), the other
    arguments override it. ``method="lbfgs"``: scikit-learn's L-BFGS logistic regression on standardised features
    (``C``, ``max_iter``), fast for small data. ``options``: the fields of :class:`FeatureOptions`."""
    if method not in ("sgd", "lbfgs"):
        raise ValueError(f"method must be 'sgd' or 'lbfgs', got {method!r}")
    run = _prepare(model, data, options)
    (train_features, train_labels), (test_features, test_labels) = run.train, run.test
    seed = run.options.seed
    if method == "lbfgs":
        logits = logistic_regression_logits(train_features, train_labels, test_features, len(run.classes), C, max_iter)
        settings = {"method": "lbfgs", "C": C, "max_iter": max_iter}
        card_metric = "linear probe top-1 (L-BFGS logistic regression)"
    else:
        recipe = linear_recipe(
            run.model,
            len(train_labels),
            epochs=epochs,
            lr=lr,
            batch_size=train_batch_size,
            weight_decay=weight_decay,
            batchnorm=batchnorm,
        )
        device = next(run.model.parameters(), torch.empty(0)).device
        classifier = train_linear_classifier(
            train_features.to(device), train_labels, len(run.classes), recipe, seed=seed, progress=run.options.progress
        )
        with torch.no_grad():
            logits = classifier(test_features.to(device))
        settings = {"method": "sgd", **dataclasses.asdict(recipe), "lr": recipe.lr, "seed": seed}
        card_metric = "linear probe top-1"
    result = {"protocol": "linear", **classification_report(logits, test_labels, run.classes), "settings": settings}
    return _finish(run, result, {card_metric: result["top1"]}, output_dir, update_card)
