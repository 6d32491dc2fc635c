"""Classification reports, their JSON + PNG files, and model-index entries in model cards."""

from __future__ import annotations

import json
import os

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard
from PIL import Image

import sslhub
from sslhub.reporting import add_results_to_model_card, classification_report, save_report

# Five samples, three classes. Predictions (argmax): 0, 2, 1, 1, 0; the second-best of sample 1 is its label 0.
LOGITS = torch.tensor([[3.0, 1, 0], [2.0, 0, 5], [0.0, 4, 1], [1.0, 2, 0], [6.0, 0, 1]])
LABELS = torch.tensor([0, 0, 1, 2, 2])


def test_report_numbers_match_hand_counts():
    report = classification_report(LOGITS, LABELS, ["cat", "dog", "emu"])
    assert report["top1"] == pytest.approx(2 / 5)  # samples 0 and 2
    assert report["top5"] == 1.0  # top-3 with three classes: every label is in it
    assert report["per_class_accuracy"] == {"cat": 0.5, "dog": 1.0, "emu": 0.0}
    assert report["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [1, 1, 0]]  # rows: true class
    assert report["num_samples"] == 5


def test_top5_with_more_than_five_classes_and_absent_classes():
    logits = torch.arange(7.0).repeat(2, 1)  # ranking 6 > 5 > 4 > 3 > 2 > 1 > 0 for both samples
    report = classification_report(logits, torch.tensor([2, 1]), [str(c) for c in range(7)])
    assert report["top1"] == 0.0 and report["top5"] == 0.5  # label 2 is 5th best, label 1 is 6th
    assert report["per_class_accuracy"] == {"1": 0.0, "2": 0.0}  # classes without samples are left out
    assert report["confusion_matrix"][2][6] == 1 and sum(map(sum, report["confusion_matrix"])) == 2


def test_report_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"\(N, 2\) for 2 classes"):
        classification_report(LOGITS, LABELS, ["a", "b"])
    with pytest.raises(ValueError, match="one label per row"):
        classification_report(LOGITS, LABELS[:4], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        classification_report(LOGITS, torch.tensor([0, 0, 1, 2, 3]), ["a", "b", "c"])


@pytest.mark.parametrize("num_classes", [3, 40])
def test_save_report_writes_json_and_a_png_that_grows_with_the_classes(tmp_path, num_classes):
    names = [f"class {i}" for i in range(num_classes)]
    logits = torch.eye(num_classes)
    report = {**classification_report(logits, torch.arange(num_classes), names), "class_names": names}
    files = save_report(report, tmp_path / "out", "kNN on test data")
    assert json.loads(files["metrics"].read_text()) == report
    with Image.open(files["confusion_matrix"]) as png:
        png.load()
        assert png.format == "PNG"
        width, height = png.size
    assert (width, height) == ((400, 400) if num_classes == 3 else (1650, 1650))
    assert sorted(os.listdir(tmp_path / "out")) == ["confusion_matrix.png", "metrics.json"]  # no temp files left


def saved_checkpoint(tmp_path):
    model = sslhub.create_model("moco_v2_resnet18_32px")
    card = model.model_card(training={"data": "fashion-mnist", "epochs": 3}, results={"kNN top-1 (k=20)": 0.5})
    card.data.license = "mit"
    card.save(tmp_path / "README.md")
    return card


def test_model_card_update_adds_and_replaces_entries_and_keeps_the_rest(tmp_path):
    before = saved_checkpoint(tmp_path)
    add_results_to_model_card(tmp_path, {"kNN top-1 (k=20)": 0.75, "linear probe top-1": 0.8}, "my pets (local data)")
    add_results_to_model_card(tmp_path, {"linear probe top-1": 0.9}, "my pets (local data)")
    card = ModelCard.load(tmp_path / "README.md")

    def entry(metric, value, dataset, dataset_type):
        return EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_type,
            dataset_name=dataset,
            metric_type="accuracy",
            metric_name=metric,
            metric_value=value,
        )

    assert card.data.eval_results == [
        entry("kNN top-1 (k=20)", 0.5, "Fashion-MNIST", "zalando-datasets/fashion_mnist"),  # other dataset: kept
        entry("kNN top-1 (k=20)", 0.75, "my pets (local data)", "my pets (local data)"),
        entry("linear probe top-1", 0.9, "my pets (local data)", "my pets (local data)"),  # replaced, not repeated
    ]
    for key in ("license", "tags", "pipeline_tag", "library_name", "datasets", "model_name"):
        assert getattr(card.data, key) == getattr(before.data, key), key
    assert before.text.strip() in card.text  # the body stays, the results table follows it
    assert card.text.count("## Downstream evaluation") == 1
    assert "| linear probe top-1 | my pets (local data) | 90.00% |" in card.text and "80.00%" not in card.text


def test_model_card_is_created_when_missing_and_percentages_are_refused(tmp_path):
    path = add_results_to_model_card(tmp_path / "ckpt", {"kNN top-1 (k=20)": 0.25}, "builtin", "builtin")
    card = ModelCard.load(path)
    assert card.data.library_name == "sslhub" and card.data.model_name == "ckpt"
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("kNN top-1 (k=20)", 0.25)]
    with pytest.raises(ValueError, match="not an accuracy in"):
        add_results_to_model_card(tmp_path / "ckpt", {"kNN top-1 (k=20)": 25.0}, "builtin")
    assert ModelCard.load(path).data.eval_results[0].metric_value == 0.25
