"""The evaluation pre-processing outside sslhub: ``SSLImageProcessor`` (saved with every checkpoint, found by
``AutoImageProcessor`` and the pipelines), timm's ``pretrained_cfg`` of ``to_timm`` / ``export_timm`` against timm's
own transform, and the stock ``BitImageProcessor`` of a transformers export against transformers itself."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoImageProcessor, BitImageProcessorPil, pipeline

import sslhub
from sslhub import export
from sslhub.image_processing import SSLImageProcessor, stock_image_processor
from sslhub.registry import get_method

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = [(32, 32), (40, 52), (77, 61)]  # (height, width): as is, and resized + centre-cropped on either side


def random_images(sizes=SIZES, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in sizes]


def tiny(preset, task="features", seed=0, **overrides):
    torch.manual_seed(seed)
    overrides = {"backbone_kwargs": {"depth": 1}, **overrides} if "vit" in preset else overrides
    return sslhub.create_model(preset, task=task, **overrides).eval()


def stacked(transform, images) -> torch.Tensor:
    return torch.stack([transform(image) for image in images])


@pytest.mark.parametrize("image_size", [32, 96], ids=["no_crop", "crop_0.875"])
def test_the_processor_of_every_method_is_its_eval_transform_and_survives_a_save(image_size, tmp_path):
    images = random_images([*SIZES, (120, 97)])
    grey = Image.fromarray(np.full((20, 30), 128, dtype=np.uint8))  # converted to RGB like the data loaders do
    for method in sslhub.list_methods():
        config = sslhub.SSLConfig.from_preset(get_method(method).tiny_preset, image_size=image_size)
        processor = SSLImageProcessor.from_config(config)
        expected = stacked(get_method(method).eval_transform(config), images)
        torch.testing.assert_close(processor(images, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)
        processor.save_pretrained(tmp_path / method)
        reloaded = AutoImageProcessor.from_pretrained(tmp_path / method)
        assert type(reloaded) is SSLImageProcessor and reloaded.fields() == processor.fields()
        torch.testing.assert_close(reloaded(images[1:2])["pixel_values"], expected[1:2], rtol=0, atol=0)
        rgb = get_method(method).eval_transform(config)(grey.convert("RGB"))
        torch.testing.assert_close(processor(grey)["pixel_values"][0], rgb, rtol=0, atol=0)


def test_the_processor_refuses_fields_it_cannot_use():
    config = sslhub.SSLConfig.from_preset("moco_v2_resnet18_32px")
    with pytest.raises(ValueError, match="preprocessor_config.json: interpolation must be one of .*got 'cubic'"):
        SSLImageProcessor.from_config(config, interpolation="cubic")
    with pytest.raises(ValueError, match=r"crop_pct must be a number in \(0, 1\], got 1.5"):
        SSLImageProcessor.from_config(config, crop_pct=1.5)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        SSLImageProcessor.from_config(config, image_size=0)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['size'\]"):
        SSLImageProcessor.from_config(config)(random_images()[0], size=64)


@pytest.mark.parametrize("preset", ["moco_v2_resnet18_32px", "cmc_resnet18_32px", "dino_vit_tiny_patch4_32px"])
def test_feature_extraction_pipeline_on_a_saved_encoder_gives_the_models_features(preset, tmp_path):
    model = tiny(preset)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    images = random_images()
    with torch.no_grad():
        expected = model(stacked(sslhub.create_transform(model), images))
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    assert type(extractor.image_processor) is SSLImageProcessor
    for i, image in enumerate(images):
        features = extractor(image, return_tensors=True)
        torch.testing.assert_close(features[0], expected.last_hidden_state[i], rtol=0, atol=1e-5)
        pooled = extractor(image, return_tensors=True, pool=True)
        torch.testing.assert_close(pooled[0], expected.pooler_output[i], rtol=0, atol=1e-5)


def test_classification_pipeline_labels_and_scores_and_a_checkpoint_without_a_processor(tmp_path):
    labels = {0: "cat", 1: "dog", 2: "bird"}
    model = sslhub.create_model("moco_v2_resnet18_32px", task="classification", num_labels=3, id2label=labels)
    torch.nn.init.normal_(model.classifier.weight)  # scores far from uniform
    model.eval().save_pretrained(tmp_path / "clf")
    image = random_images()[1]
    with torch.no_grad():
        scores = model(sslhub.create_transform(model)(image)[None]).logits.softmax(-1)[0]
    expected = sorted(
        ({"label": labels[i], "score": p.item()} for i, p in enumerate(scores)), key=lambda r: -r["score"]
    )
    classifier = pipeline("image-classification", model=str(tmp_path / "clf"))
    result = classifier(image)
    assert [r["label"] for r in result] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in result], [r["score"] for r in expected], rtol=0, atol=1e-5)
    # A checkpoint of an older sslhub, without preprocessor_config.json: SSLImageProcessor falls back to config.json
    # (AutoImageProcessor reads only that file, so the pipeline is given the processor).
    (tmp_path / "clf" / "preprocessor_config.json").unlink()
    processor = SSLImageProcessor.from_pretrained(tmp_path / "clf")
    assert processor.fields() == SSLImageProcessor.from_config(model.config).fields()
    assert SSLImageProcessor.from_pretrained(tmp_path / "clf", crop_pct=0.5).crop_pct == 0.5
    classifier = pipeline("image-classification", model=str(tmp_path / "clf"), image_processor=processor)
    assert classifier(image) == result
    ssl = tiny("moco_v2_resnet18_32px", task="pretraining")
    ssl.save_pretrained(tmp_path / "pretraining")
    assert AutoImageProcessor.from_pretrained(tmp_path / "pretraining").fields() == processor.fields()


def test_feature_extraction_pipeline_on_a_hub_id(hub, tmp_path):
    model = tiny("dino_vit_tiny_patch4_32px")
    model.push_to_hub("me/dino")
    assert "preprocessor_config.json" in hub.files("me/dino")
    image = random_images()[2]
    with torch.no_grad():
        expected = model(sslhub.create_transform(model)(image)[None]).last_hidden_state
    features = pipeline("image-feature-extraction", model="me/dino")(image, return_tensors=True)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "preset, image_size",
    [("moco_v2_resnet18_32px", 32), ("swav_resnet18_32px", 96), ("dino_vit_tiny_patch4_32px", 32)],
    ids=["bicubic", "bilinear_crop", "vit"],
)
def test_timm_data_config_of_to_timm_and_export_timm_reproduces_sslhub_transform(preset, image_size, tmp_path):
    model = sslhub.create_model(preset, image_size=image_size)
    backbone = sslhub.to_timm(model)
    cfg = backbone.pretrained_cfg
    assert backbone.default_cfg is cfg
    assert cfg["input_size"] == (3, image_size, image_size) and cfg["num_classes"] == 0
    assert (list(cfg["mean"]), list(cfg["std"])) == (model.config.image_mean, model.config.image_std)
    assert cfg["tag"] == model.config.method and not {"url", "hf_hub_id", "license", "test_input_size"} & set(cfg)
    images = random_images([*SIZES, (130, 101)])
    expected = stacked(sslhub.create_transform(model), images)
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=backbone))
    torch.testing.assert_close(stacked(timm_transform, images), expected, rtol=0, atol=1e-5)
    if preset.startswith("swav"):  # timm's ResNet export needs an input size its stem can take: the 32 px ones do
        return
    directory = export.export_timm(model, tmp_path / "timm")
    saved = json.loads((directory / "config.json").read_text())["pretrained_cfg"]
    assert saved == json.loads(json.dumps({k: v for k, v in cfg.items() if k != "architecture"}))
    reloaded = timm.create_model(f"local-dir:{directory}", pretrained=True)
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=reloaded))
    torch.testing.assert_close(stacked(timm_transform, images), expected, rtol=0, atol=1e-5)


def test_transformers_export_has_a_stock_processor_and_works_in_a_pipeline(tmp_path):
    model = tiny("dino_vit_tiny_patch4_32px")
    directory = export.export_transformers(model, tmp_path / "hf")
    transform = sslhub.create_transform(model)
    # Sizes whose centre-crop offset transformers (floor) and torchvision (round half to even) agree on.
    images = random_images([*SIZES, (32, 41)])
    pil = AutoImageProcessor.from_pretrained(directory, backend="pil")
    assert type(pil) is BitImageProcessorPil
    torch.testing.assert_close(pil(images, return_tensors="pt")["pixel_values"], stacked(transform, images),
                               rtol=0, atol=1e-5)  # fmt: skip
    odd = random_images([(32, 39)])  # offset 3.5: transformers crops at 3, torchvision at 4
    shifted = pil(odd, return_tensors="pt")["pixel_values"][0, :, :, 1:]
    torch.testing.assert_close(shifted, transform(odd[0])[:, :, :-1], rtol=0, atol=1e-5)
    image = images[0]  # 32 px: no resize, where the torchvision backend's antialiasing would differ
    with torch.no_grad():
        expected = model(transform(image)[None]).last_hidden_state
    features = pipeline("image-feature-extraction", model=str(directory))(image, return_tensors=True)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="the cmc encoder takes L\\*a\\*b\\* input"):
        stock_image_processor(sslhub.SSLConfig.from_preset("cmc_resnet18_32px"))
