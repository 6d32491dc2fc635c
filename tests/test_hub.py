from __future__ import annotations

import os
from importlib import resources

import huggingface_hub.constants
import pytest
from huggingface_hub import EvalResult, ModelCard, metadata_eval_result, metadata_load

from sslhub.hub import render_model_card, save_model_card

CITATION = """@inproceedings{caron2021emerging,
  title={Emerging Properties in Self-Supervised Vision Transformers},
  author={Caron, Mathilde and Touvron, Hugo and others},
  booktitle={ICCV},
  year={2021}
}"""
DINO = {
    "paper": "Emerging Properties in Self-Supervised Vision Transformers",
    "arxiv": "2104.14294",
    "citation": CITATION + "\n",
    "released_encoder": "the teacher backbone",
}
TRAINING = {"data": "fashion-mnist", "epochs": 100, "lr": 0.0005, "note": "a|b"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def dino_card(**overrides):
    kwargs = dict(
        method="dino",
        backbone="vit_small_patch16_224",
        task="features",
        num_parameters=21_665_664,
        method_info=DINO,
        training=TRAINING,
        results={"kNN top-1 (k=20)": 0.8712},
        model_id="someorg/dino-fmnist",
    )
    return render_model_card(**{**kwargs, **overrides})


def test_template_is_package_data():
    assert resources.files("sslhub").joinpath("templates/modelcard.md").is_file()


def test_card_metadata():
    data = dino_card().data.to_dict()
    assert data["library_name"] == "sslhub"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert data["tags"] == ["self-supervised", "dino", "vit_small_patch16_224"]
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["zalando-datasets/fashion_mnist"]


def test_card_body_has_usage_method_architecture_training_and_results():
    text = dino_card().text
    assert "# someorg/dino-fmnist" in text
    assert 'sslhub.from_pretrained("someorg/dino-fmnist")' in text
    assert DINO["paper"] in text and "https://arxiv.org/abs/2104.14294" in text
    assert f"```bibtex\n{CITATION}\n```" in text
    assert "the teacher backbone" in text
    assert "`vit_small_patch16_224`" in text and "21.7M (21,665,664)" in text
    assert "Data: Fashion-MNIST" in text
    assert "| Hyperparameter | Value |\n| --- | --- |\n| epochs | 100 |\n| lr | 0.0005 |\n| note | a\\|b |\n" in text
    assert "| kNN top-1 (k=20) | 87.12% |" in text


def test_metadata_and_eval_results_round_trip_through_the_text():
    card = dino_card(results={"kNN top-1 (k=20)": 0.8712, "linear top-1": 0.9, "not measured": None})
    reparsed = ModelCard(str(card))
    assert reparsed.data.to_dict() == card.data.to_dict()
    assert reparsed.data.model_name == "someorg/dino-fmnist"
    common = dict(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type="zalando-datasets/fashion_mnist",
        dataset_name="Fashion-MNIST",
        metric_type="accuracy",
    )
    assert reparsed.data.eval_results == [
        EvalResult(**common, metric_name="kNN top-1 (k=20)", metric_value=0.8712),
        EvalResult(**common, metric_name="linear top-1", metric_value=0.9),
    ]


def test_model_index_matches_huggingface_hub_metadata_eval_result(tmp_path):
    path = save_model_card(dino_card(), tmp_path)
    expected = metadata_eval_result(
        model_pretty_name="someorg/dino-fmnist",
        task_pretty_name="Image Classification",
        task_id="image-classification",
        metrics_pretty_name="kNN top-1 (k=20)",
        metrics_id="accuracy",
        metrics_value=0.8712,
        dataset_pretty_name="Fashion-MNIST",
        dataset_id="zalando-datasets/fashion_mnist",
    )["model-index"]
    del expected[0]["results"][0]["metrics"][0]["verified"]  # set by the Hub's evaluation service only
    assert metadata_load(path)["model-index"] == expected


def test_no_results_no_model_index_and_local_paths_stay_private(tmp_path):
    card = render_model_card(
        method="moco_v2",
        backbone="resnet18",
        task="pretraining",
        num_parameters=11_000_000,
        method_info={},
        training={"data": str(tmp_path / "my_images"), "epochs": 2},
    )
    assert "model-index" not in card.data.to_dict() and card.data.datasets is None
    assert str(tmp_path) not in str(card)
    assert "my_images (local data)" in card.text
    assert "model.released_model()" in card.text and "# moco_v2_resnet18" in card.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "segmentation"}, "task must be"),
        ({"results": {"kNN top-1": 87.12}}, "not an accuracy"),
        ({"training": {"epochs": 1}}, "name the dataset"),
    ],
)
def test_invalid_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        dino_card(**overrides)


def test_save_writes_readme_without_leftovers(tmp_path):
    card = dino_card()
    path = save_model_card(card, tmp_path / "out")
    assert path == tmp_path / "out" / "README.md"
    assert path.read_text(encoding="utf-8") == str(card)
    assert os.listdir(tmp_path / "out") == ["README.md"]
    assert metadata_load(path) == card.data.to_dict()


def test_failed_save_keeps_old_readme_and_removes_temp_file(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("old", encoding="utf-8")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model_card(dino_card(), tmp_path)
    assert os.listdir(tmp_path) == ["README.md"]
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "old"


def test_classifier_card_says_fine_tuned_and_shows_logits():
    card = dino_card(task="classification", model_id="me/dino-pets", results={"fine-tuned top-1": 0.9})
    assert card.data.pipeline_tag == "image-classification"
    assert "logits = model(pixel_values).logits" in card.text and "pooler_output" not in card.text
    assert "## Fine-tuning" in card.text and "## Pretraining" not in card.text
    assert "AutoModelForImageClassification.from_pretrained" in card.text
    assert 'pipeline("image-classification", model="me/dino-pets")' in card.text
    assert 'pipeline("image-feature-extraction", model="me/dino")' in dino_card(model_id="me/dino").text


def test_results_can_name_another_dataset_than_the_training_data():
    """DINOv2: pretrained on LVD-142M (not on the Hub), evaluated on ImageNet."""
    card = dino_card(training={"data": "lvd-142m"}, eval_data="imagenet-1k", results={"linear top-1": 0.811})
    assert "Data: LVD-142M" in card.text and "Top-1 accuracy on imagenet-1k." in card.text
    assert card.data.datasets == ["imagenet-1k"]
    assert card.data.eval_results[0].dataset_name == "imagenet-1k"
