"""sslhub.evaluation and ``sslhub eval``: exact kNN answers, linear probes, the feature cache, model resolution, CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from torch import nn
from torchvision.transforms import v2

import sslhub
from sslhub import evaluation, registry
from sslhub.cli import main as cli_main
from sslhub.configuration import SSLConfig
from sslhub.data import ImageDataset
from sslhub.methods.moco import MoCoV2
from sslhub.probes import LinearRecipe
from sslhub.transforms import eval_transform

TO_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path / "cache"))


class MeanColour(nn.Module):
    """Feature of an image = its mean colour minus 0.5 (pixels in [0, 1]): uniform images are hand-made features.
    With ``method``, an sslhub config naming that method (whose linear recipe the SGD probe follows)."""

    def __init__(self, method: str | None = None):
        super().__init__()
        if method is not None:
            self.config = SSLConfig(method=method)

    def forward(self, pixel_values):
        return pixel_values.mean(dim=(2, 3)) - 0.5


def colour_dataset(colours, labels, classes):
    images = [np.full((4, 4, 3), colour, dtype=np.uint8) for colour in colours]
    return ImageDataset(images, labels, classes)


def reference_predictions(train_colours, train_labels, test_colours, k, temperature, num_classes):
    """InstDisc eq. 7 by hand: cosine similarity of the features c / 255 - 0.5, the k most similar training images
    vote for their class with exp(sim / T); the class with the largest sum wins."""

    def feature(colour):
        return [c / 255 - 0.5 for c in colour]

    predictions = []
    for test in map(feature, test_colours):
        similarities = []
        for train, label in zip(map(feature, train_colours), train_labels, strict=True):
            dot = sum(a * b for a, b in zip(test, train, strict=True))
            norms = math.sqrt(sum(a * a for a in test)) * math.sqrt(sum(b * b for b in train))
            similarities.append((dot / norms, label))
        votes = [0.0] * num_classes
        for similarity, label in sorted(similarities, reverse=True)[:k]:
            votes[label] += math.exp(similarity / temperature)
        predictions.append(votes.index(max(votes)))
    return predictions


TRAIN_COLOURS = [(230, 182, 128), (220, 190, 128), (215, 186, 128), (20, 10, 128), (40, 20, 128)]
TRAIN_LABELS = [1, 0, 0, 2, 2]
# Test 0 sits 1.6 degrees from the class-1 sample and 4.2-4.5 degrees from the two class-0 samples: k=1 says 1,
# k=3 says 0 (two votes of exp(0.9973 / 0.07) outweigh one of exp(0.9996 / 0.07)).
TEST_COLOURS = [(220, 180, 128), (20, 30, 128), (235, 180, 128), (30, 40, 128)]
TEST_LABELS = [0, 2, 1, 0]


def test_knn_gives_the_exact_answer_on_hand_made_features():
    classes = ["a", "b", "c"]
    data = (colour_dataset(TRAIN_COLOURS, TRAIN_LABELS, classes), colour_dataset(TEST_COLOURS, TEST_LABELS, classes))
    result = evaluation.knn(MeanColour(), data, k=(1, 3), transform=TO_FLOAT, progress=False)
    for k in (1, 3):
        predicted = reference_predictions(TRAIN_COLOURS, TRAIN_LABELS, TEST_COLOURS, k, 0.07, 3)
        expected = np.zeros((3, 3), dtype=int)
        for label, prediction in zip(TEST_LABELS, predicted, strict=True):
            expected[label, prediction] += 1
        report = result["by_k"][str(k)]
        assert report["confusion_matrix"] == expected.tolist()
        assert report["top1"] == pytest.approx(np.trace(expected) / 4)
    assert reference_predictions(TRAIN_COLOURS, TRAIN_LABELS, TEST_COLOURS[:1], 1, 0.07, 3) == [1]
    # Class a: test 0 goes to b with k=1 and to a with k=3; test 3 (dark, labelled a) goes to c either way.
    assert result["by_k"]["1"]["confusion_matrix"][0] == [0, 1, 1]
    assert result["by_k"]["3"]["confusion_matrix"][0] == [1, 0, 1]
    assert result["top1"] == result["by_k"]["1"]["top1"] and result["settings"] == {"k": [1, 3], "temperature": 0.07}
    assert (result["num_train"], result["num_eval"], result["feature_dim"]) == (5, 4, 3)


def blobs(per_class: int, seed: int):
    """Three colour clusters (red, green, blue) with +-25 of noise: linearly separable mean colours."""
    rng = np.random.default_rng(seed)
    centres = np.array([(220, 60, 60), (60, 220, 60), (60, 60, 220)])
    labels = np.repeat(np.arange(3), per_class)
    colours = centres[labels] + rng.integers(-25, 26, (len(labels), 3))
    return colour_dataset(colours, labels, ["red", "green", "blue"])


@pytest.mark.parametrize("method", ["sgd", "lbfgs"])
def test_linear_probe_separates_separable_features(method):
    result = evaluation.linear(
        MeanColour("moco_v2"), (blobs(20, 0), blobs(10, 1)), method=method, transform=TO_FLOAT, progress=False
    )
    assert result["top1"] == 1.0 and result["per_class_accuracy"] == {"red": 1.0, "green": 1.0, "blue": 1.0}
    assert result["settings"]["method"] == method
    if method == "sgd":  # MoCo v2's recipe, stretched to 1000 steps of one batch
        assert result["settings"]["lr"] == 30.0 and result["settings"]["epochs"] == 1000


def test_lbfgs_probe_needs_no_method_and_the_sgd_probe_needs_its_recipe():
    """L-BFGS works on any features; the SGD probe follows the recipe of the model's method, so a model without an
    sslhub config is an error, never a silent default recipe."""
    data = (blobs(20, 0), blobs(10, 1))
    result = evaluation.linear(MeanColour(), data, method="lbfgs", transform=TO_FLOAT, progress=False)
    assert result["top1"] == 1.0
    with pytest.raises(ValueError, match="no sslhub config naming its method; use method='lbfgs'"):
        evaluation.linear(MeanColour(), data, transform=TO_FLOAT, progress=False)


class NoLinearRecipe(MoCoV2):
    """A method that declares no linear-probe recipe."""

    linear_recipe = None


def test_a_method_without_a_linear_recipe_is_an_error(monkeypatch):
    monkeypatch.setitem(registry._METHODS, "no_linear_recipe", NoLinearRecipe)
    monkeypatch.setattr(NoLinearRecipe, "name", "no_linear_recipe")
    with pytest.raises(ValueError, match="'no_linear_recipe' declares no linear-probe recipe"):
        NoLinearRecipe.get_linear_recipe()
    model = MeanColour("no_linear_recipe")
    with pytest.raises(ValueError, match="declares no linear-probe recipe"):
        evaluation.linear_recipe(model, num_samples=100)
    with pytest.raises(ValueError, match="declares no linear-probe recipe.*--method lbfgs"):
        evaluation.linear(model, (blobs(20, 0), blobs(10, 1)), transform=TO_FLOAT, progress=False)
    lbfgs = evaluation.linear(model, (blobs(20, 0), blobs(10, 1)), method="lbfgs", transform=TO_FLOAT, progress=False)
    assert lbfgs["top1"] == 1.0


def test_each_method_declares_the_official_linear_recipe():
    """The recipes of the official linear-classification scripts, as each method declares them."""
    moco = LinearRecipe("facebookresearch/moco main_lincls.py", 30.0, 100, 256)
    dino = ("sgd", 0.001, 100, 1024, 0.0, 0, False)
    expected = {  # (optimizer, base lr, epochs, batch size, weight decay, warm-up epochs, batchnorm)
        "moco_v1": ("sgd", 30.0, 100, 256, 0.0, 0, False),
        "moco_v2": ("sgd", 30.0, 100, 256, 0.0, 0, False),
        "moco_v3": ("sgd", 0.1, 90, 1024, 0.0, 0, False),
        "dino": dino,
        "dinov2": dino,
        "mae": ("lars", 0.1, 90, 16384, 0.0, 10, True),
    }
    for method, values in expected.items():
        recipe = registry.get_method(method).get_linear_recipe()
        fields = (recipe.optimizer, recipe.base_lr, recipe.epochs, recipe.batch_size, recipe.weight_decay)
        assert (*fields, recipe.warmup_epochs, recipe.batchnorm) == values, method
    assert registry.get_method("moco_v2").get_linear_recipe() == moco
    assert registry.get_method("moco_v1").get_linear_recipe() == moco


def test_linear_recipe_follows_the_method_and_mae_gets_batchnorm_without_affine():
    mae = sslhub.create_model("mae_vit_tiny_patch4_32px")
    recipe = evaluation.linear_recipe(mae, num_samples=1_000_000)  # 62 steps an epoch
    assert (recipe.optimizer, recipe.batchnorm, recipe.base_lr, recipe.epochs) == ("lars", True, 0.1, 90)
    assert recipe.lr == pytest.approx(0.1 * 16384 / 256) and recipe.warmup_epochs == 10
    moco = evaluation.linear_recipe(sslhub.create_model("moco_v2_resnet18_32px"), num_samples=100_000)
    assert (moco.optimizer, moco.batchnorm, moco.lr, moco.epochs) == ("sgd", False, 30.0, 100)
    overridden = evaluation.linear_recipe(mae, num_samples=10, batchnorm=False, lr=0.5, epochs=3)
    assert (overridden.batchnorm, overridden.lr, overridden.epochs) == (False, pytest.approx(0.5), 3)


def test_cli_end_to_end_on_an_image_folder(image_folder, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    model = sslhub.create_model("moco_v2_resnet18_32px")
    model.save_pretrained(checkpoint)
    card_before = ModelCard.load(checkpoint / "README.md")
    out = tmp_path / "out"
    args = ["eval", "knn", "--model", str(checkpoint), "--data", str(image_folder), "--output-dir", str(out)]
    assert cli_main([*args, "--k", "5", "20", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "38 training / 10 evaluation images, 2 classes, 512-d features" in printed
    assert "kNN (k=5): top-1 " in printed and "kNN (k=20): top-1 " in printed and "per class: squares" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "knn" and sorted(metrics["by_k"]) == ["20", "5"]
    assert metrics["class_names"] == ["squares", "stripes"] and metrics["num_samples"] == 10
    assert f"top-1 {100 * metrics['top1']:.2f}%" in printed
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG"
    card = ModelCard.load(checkpoint / "README.md")
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results == {"kNN top-1 (k=5)": metrics["by_k"]["5"]["top1"], "kNN top-1 (k=20)": metrics["top1"]}
    assert card.data.eval_results[0].dataset_name == f"{image_folder.name} (local data)"
    assert card.data.tags == card_before.data.tags and card.data.license == card_before.data.license
    linear = ["eval", "linear", "--model", str(checkpoint), "--data", str(image_folder), "--output-dir", str(out)]
    assert cli_main([*linear, "--method", "lbfgs", "--no-progress"]) == 0
    assert "linear probe (lbfgs): top-1" in capsys.readouterr().out
    names = {result.metric_name for result in ModelCard.load(checkpoint / "README.md").data.eval_results}
    assert names == {"kNN top-1 (k=5)", "kNN top-1 (k=20)", "linear probe top-1 (L-BFGS logistic regression)"}


def test_cli_reports_bad_data_as_an_error(image_folder, tmp_path, capsys):
    one_class = tmp_path / "one"
    shutil.copytree(image_folder / "squares", one_class / "squares")
    args = ["eval", "knn", "--model", "moco_v2_resnet18_32px", "--data", str(one_class), "--no-progress"]
    assert cli_main(args) == 2  # before the model is built
    assert "sslhub eval: error: " in (err := capsys.readouterr().err) and "needs at least two classes" in err


def test_preprocessing_comes_from_the_checkpoint_config(image_folder):
    model = sslhub.create_model("moco_v2_resnet18_32px", image_size=16, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    result = evaluation.knn(model, str(image_folder), k=(3,), progress=False)
    assert result["transform"] == repr(eval_transform(16, [0.5] * 3, [0.25] * 3))
    assert "CenterCrop(size=(16, 16))" in result["transform"] and "std=[0.25, 0.25, 0.25]" in result["transform"]


def fail_extraction(*args, **kwargs):
    raise AssertionError("features were extracted again")


def test_feature_cache_hits_and_misses_when_weights_or_data_change(image_folder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    model = sslhub.create_model("moco_v2_resnet18_32px")
    first = evaluation.knn(model, str(data), k=(5,), progress=False)
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 2  # train + evaluation

    monkeypatch.setattr(evaluation, "extract_features", fail_extraction)
    assert evaluation.knn(model, str(data), k=(5,), progress=False)["confusion_matrix"] == first["confusion_matrix"]
    weight = model.encoder.backbone.conv1.weight
    original = weight[0, 0, 0, 0].item()
    with torch.no_grad():
        weight[0, 0, 0, 0] = original + 1.0
    with pytest.raises(AssertionError, match="extracted again"):
        evaluation.knn(model, str(data), k=(5,), progress=False)
    with torch.no_grad():
        weight[0, 0, 0, 0] = original
    evaluation.knn(model, str(data), k=(5,), progress=False)  # the original weights hit again
    Image.new("RGB", (32, 32), (9, 9, 9)).save(data / "squares" / "0.png")  # same file, new pixels and mtime
    with pytest.raises(AssertionError, match="extracted again"):
        evaluation.knn(model, str(data), k=(5,), progress=False)


def test_in_memory_data_saves_the_report_but_leaves_the_card(tmp_path):
    checkpoint = tmp_path / "ckpt"
    sslhub.create_model("moco_v2_resnet18_32px", image_size=8).save_pretrained(checkpoint)
    card = (checkpoint / "README.md").read_text()
    result = evaluation.knn(
        str(checkpoint), (blobs(4, 0), blobs(2, 1)), k=(3,), output_dir=tmp_path / "out", progress=False
    )
    assert sorted(result["files"]) == ["confusion_matrix", "metrics"] and result["data"] == "in-memory data"
    assert (checkpoint / "README.md").read_text() == card


def test_no_cache_writes_nothing(image_folder, tmp_path):
    evaluation.knn(MeanColour(), str(image_folder), k=(5,), transform=TO_FLOAT, cache=False, progress=False)
    assert not (tmp_path / "cache").exists()


def test_model_names_resolve_like_the_rest_of_sslhub(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        evaluation, "create_model", lambda name, **kw: calls.append(("create", name, kw)) or nn.Flatten()
    )
    monkeypatch.setattr(evaluation, "from_pretrained", lambda name: calls.append(("load", str(name))) or nn.Flatten())
    assert evaluation.load_model(tmp_path)[1] == tmp_path
    assert evaluation.load_model("dino_vit_small_patch16_224.in1k")[1] is None
    with pytest.warns(UserWarning, match="random initialisation"):
        evaluation.load_model("moco_v2_resnet18")
    evaluation.load_model("someorg/my-moco")
    assert calls == [
        ("load", str(tmp_path)),
        ("create", "dino_vit_small_patch16_224.in1k", {"pretrained": True, "pretrained_path": None}),
        ("create", "moco_v2_resnet18", {}),
        ("load", "someorg/my-moco"),
    ]


def test_pretraining_checkpoints_are_evaluated_through_their_released_encoder():
    pretraining = sslhub.create_model("moco_v2_resnet18_32px", task="pretraining")
    encoder = evaluation.feature_model(pretraining)
    assert isinstance(encoder, sslhub.SSLModel)
    expected = pretraining.method.released_encoder.state_dict()
    assert encoder.encoder.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in encoder.encoder.state_dict().items())


def test_pair_of_datasets_needs_labels_and_bad_arguments_are_errors():
    unlabelled = ImageDataset([np.zeros((4, 4, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="needs labels"):
        evaluation.knn(MeanColour(), (unlabelled, unlabelled), transform=TO_FLOAT)
    with pytest.raises(ValueError, match="no sslhub config"):
        evaluation.knn(MeanColour(), (blobs(2, 0), blobs(2, 1)))
    with pytest.raises(ValueError, match="'sgd' or 'lbfgs'"):
        evaluation.linear(MeanColour(), (blobs(2, 0), blobs(2, 1)), method="adam", transform=TO_FLOAT)
    with pytest.raises(ValueError, match=r"values >= 1, got \[20, 0\]"):
        evaluation.knn(MeanColour(), (blobs(2, 0), blobs(2, 1)), k=(20, 0), transform=TO_FLOAT)
    with pytest.raises(TypeError, match="batch_sise"):
        evaluation.knn(MeanColour(), (blobs(2, 0), blobs(2, 1)), transform=TO_FLOAT, batch_sise=4)
