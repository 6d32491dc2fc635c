"""Convert, verify and publish the whole official zoo registered in sslhub (``sslhub list --pretrained``).

    python conversion/convert_official.py --cards-only                      # model_cards/ from the registry
    python conversion/convert_official.py --input DOWNLOADS --output OUT    # convert + verify every file found
    python conversion/convert_official.py --input DOWNLOADS --output OUT --push-org ORG

``DOWNLOADS`` holds the authors' files under their published names (``dino_deitsmall16_pretrain.pth``,
``moco_v2_800ep_pretrain.pth.tar``, ...). For each release found the script converts the encoder, reloads the
written checkpoint and checks that its features equal those of the in-memory conversion and, where the
architecture exists outside sslhub, those of an independent model holding the authors' weights (timm's own
loader for ViT / XCiT files, torchvision's ResNet-50 for ResNet files): the largest relative error is printed
per release. The card of each release goes to ``model_cards/<preset>.<tag>.md``; ``--push-org`` uploads the
checkpoint with its card to ``ORG/<preset>.<tag>`` in one commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
import torchvision
from timm.layers import pad_same
from timm.layers.pool2d_same import MaxPool2dSame

import sslhub
from sslhub.configuration import SSLConfig
from sslhub.conversion.convert import build_converted_model, read_checkpoint, save_atomically
from sslhub.conversion.pretrained import release_card_fields
from sslhub.files import check_output_directory
from sslhub.modeling import SSLModel
from sslhub.registry import PretrainedTag, get_pretrained

CARDS = Path(__file__).resolve().parent.parent / "model_cards"


def release_config(tag: PretrainedTag, converted=None) -> SSLConfig:
    config = SSLConfig.from_preset(tag.preset, **tag.overrides)
    if converted is None:
        return config
    recorded = {k: v for k, v in converted.method_overrides.items() if k in config.method_kwargs}
    return config.with_overrides(**recorded)


def write_card(tag: PretrainedTag, org: str | None) -> Path:
    """The release's card, from the registry alone (the architecture is built on the meta device)."""
    with torch.device("meta"):
        model = SSLModel(release_config(tag))
    fields = release_card_fields(tag)
    if org:
        fields["model_id"] = f"{org}/{tag.name}"
    path = CARDS / f"{tag.name}.md"
    model.model_card(**fields).save(path)
    return path


TORCHVISION_RESNETS = ("resnet18", "resnet50", "resnet101", "resnet152")


def tf_padded(net: torch.nn.Module, tf_padding: str) -> torch.nn.Module:
    """A torchvision ResNet padding as the TensorFlow / JAX model of a release (``tf_padding``), with timm's
    ``pad_same`` before the stem max-pool (``"max_pool"``, SimCLR) and every strided convolution too (``"same"``,
    BYOL): outside sslhub's own conversion code."""
    net.maxpool = MaxPool2dSame(3, 2)
    if tf_padding == "same":
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and module.stride[0] > 1:
                module.padding = (0, 0)
                module.register_forward_pre_hook(lambda conv, args: (pad_same(args[0], conv.kernel_size, conv.stride),))
    return net


def independent_features(tag: PretrainedTag, path: Path, images: torch.Tensor) -> torch.Tensor | None:
    """Features of the authors' encoder from outside sslhub: timm's loader (ViT / XCiT files of the released
    architecture) or torchvision's ResNet (padding as the authors' TensorFlow / JAX model where the release says
    so); ``None`` for layouts neither reads directly (an encoder that is not one of these models: CMC's pair of
    ResNets, verified against the authors' model in ``tests/test_cmc.py``)."""
    config = release_config(tag)
    converted = read_checkpoint(path)
    if config.backbone.startswith(("vit_", "xcit_")):
        net = timm.create_model(config.backbone, num_classes=0, global_pool="token", **config.backbone_kwargs)
        module = sys.modules[type(net).__module__]
        net.load_state_dict(module.checkpoint_filter_fn(converted.backbone, net))
        return net.eval()(images)
    if config.backbone in TORCHVISION_RESNETS:
        net = getattr(torchvision.models, config.backbone)()
        net.fc = torch.nn.Identity()
        if net.state_dict().keys() != converted.backbone.keys():  # not one ResNet (CMC's two branches)
            return None
        net.load_state_dict(converted.backbone)
        tf_padding = config.method_kwargs.get("tf_padding")
        return (tf_padded(net, tf_padding) if tf_padding else net).eval()(images)
    return None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def convert_release(tag: PretrainedTag, path: Path, output: Path, overwrite: bool = False) -> dict:
    """Convert ``path``, write ``output/<name>`` (an existing one only with ``overwrite``), reload it and compare
    features; returns the measurements."""
    check_output_directory(output / tag.name, overwrite, "--overwrite")  # before the conversion
    converted = read_checkpoint(path)
    model = build_converted_model(release_config(tag, converted), converted, "features", str(path))
    card = model.model_card(**release_card_fields(tag))
    target = save_atomically(model, output / tag.name, card, overwrite=overwrite)
    size = model.config.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = model(images).pooler_output
        reloaded = sslhub.from_pretrained(target)(images).pooler_output
        reference = independent_features(tag, path, images)
    return {
        "release": tag.name,
        "file": path.name,
        "output": str(target),
        "reload_max_abs_diff": (features - reloaded).abs().max().item(),
        "independent_rel_error": None if reference is None else relative_error(features, reference),
    }


def publish(directory: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=f"sslhub conversion of {directory.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="folder with the authors' files under their published names")
    parser.add_argument("--output", type=Path, default=Path("converted"), help="where the sslhub checkpoints go")
    parser.add_argument("--pattern", default="*", help="releases to handle, e.g. 'dino_*'")
    parser.add_argument("--cards-only", action="store_true", help="only write model_cards/ from the registry")
    parser.add_argument("--push-org", help="upload each converted release to ORG/<preset>.<tag>")
    parser.add_argument("--overwrite", action="store_true", help="replace the releases converted by an earlier run")
    ns = parser.parse_args()
    names = sslhub.list_pretrained(ns.pattern)
    for name in names:
        print(f"card: {write_card(get_pretrained(name), ns.push_org)}")
    if ns.cards_only:
        return
    if ns.input is None:
        parser.error("--input is required unless --cards-only")
    for name in names:
        tag = get_pretrained(name)
        path = ns.input / tag.file_name
        if not path.is_file():
            print(f"skip {name}: {path} not found (download {tag.url})")
            continue
        result = convert_release(tag, path, ns.output, ns.overwrite)
        print(json.dumps(result))
        if ns.push_org:
            publish(Path(result["output"]), f"{ns.push_org}/{name}")


if __name__ == "__main__":
    main()
