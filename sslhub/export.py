"""Export sslhub models back to plain timm and transformers checkpoint directories.

Every export is written into a temporary directory next to the target, reloaded with timm / transformers and compared
with sslhub's own output on probe images, and only then renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from timm.models.beit import Beit
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import (
    BeitForMaskedImageModeling,
    BeitModel,
    PretrainedConfig,
    PreTrainedModel,
    ResNetModel,
    ViTMAEForPreTraining,
    ViTMAEModel,
    ViTModel,
    ViTMSNConfig,
    ViTMSNModel,
)

from sslhub.conversion.hf_transformers import (
    beit_config,
    beit_mim_to_transformers,
    beit_to_transformers,
    mae_to_transformers,
    resnet_config,
    resnet_to_transformers,
    vit_config,
    vit_mae_config,
    vit_to_transformers,
)
from sslhub.files import atomic_directory
from sslhub.heads import MAEDecoder
from sslhub.image_processing import stock_image_processor, timm_pretrained_cfg
from sslhub.modeling import SSLForImageClassification, SSLForPreTraining, SSLModel, quiet_transformers
from sslhub.registry import get_method

TOLERANCE = 1e-4  # max relative error between sslhub's output and the reloaded export
# sslhub pooling (sslhub/backbones.py pool_features) -> timm global_pool giving the same pooled features: the class
# token after the final norm is "token"; "avg" on a ViT averages the normed patch tokens (timm keeps ``norm`` on the
# tokens as the exported fc_norm=False says); CNN maps are averaged.
TIMM_POOLING = {"cls": "token", "mean": "avg", "avg": "avg"}


def _released_encoder(model: nn.Module) -> SSLModel:
    """The ``SSLModel`` (backbone + pooling) an sslhub model releases: itself, a classifier's encoder, or the
    pretraining model's released encoder (``released_model``)."""
    if isinstance(model, SSLModel):
        return model
    if isinstance(model, SSLForImageClassification):
        return model.ssl
    if isinstance(model, SSLForPreTraining):
        return model.released_model()
    raise TypeError(f"expected an sslhub model, got {type(model).__name__}")


def export_timm(model: nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write the released encoder of ``model`` as a timm checkpoint directory with timm's ``save_for_hf``
    (``config.json`` + ``model.safetensors``); a classifier head is not exported.

    The config rebuilds the backbone with ``num_classes=0`` and sslhub's pooling as timm's ``global_pool``
    (``TIMM_POOLING``), so ``timm.create_model("local-dir:DIR", pretrained=True)(images)`` is sslhub's
    ``pooler_output``; its pretrained cfg is ``to_timm``'s (``sslhub.image_processing.timm_pretrained_cfg``: the
    sslhub config's input size, mean and std, the evaluation crop_pct and interpolation, tag = the method).
    """
    encoder = _released_encoder(model)
    config = encoder.config
    if not encoder.encoder.exports_to_timm:
        note = encoder.encoder.architecture_note
        raise ValueError(
            f"the {config.method} encoder ({type(encoder.encoder).__name__}) computes what no stock timm model of its "
            f"backbone does{f' ({note})' if note else ''}, so it has no timm export; use the sslhub checkpoint itself"
        )
    backbone = copy.deepcopy(encoder.encoder.timm_model).eval()
    backbone.reset_classifier(0, global_pool=TIMM_POOLING[encoder.encoder.pooling])
    backbone.pretrained_cfg = backbone.default_cfg = timm_pretrained_cfg(config, backbone)
    pixels = _probe_images(config)
    with _inference(encoder):
        expected = encoder(pixels).pooler_output
    with atomic_directory(directory, overwrite) as staging:
        save_for_hf(backbone, staging, safe_serialization=True)
        reloaded = timm.create_model(f"local-dir:{staging}", pretrained=True).eval()
        with torch.no_grad():
            _check_same("timm export, pooled features", reloaded(pixels), expected)
    return Path(directory)


def export_transformers(model: nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a transformers checkpoint directory (``config.json`` + ``model.safetensors`` in the Hub
    key layout, see ``sslhub.conversion.hf_transformers``), as the class its method declares
    (``SSLMethod.export_targets``; ``ENCODER_EXPORTS`` / ``PRETRAINING_EXPORTS`` write them).

    An ``SSLForPreTraining`` whose method declares a pretraining class becomes that class (MAE:
    ``ViTMAEForPreTraining``); otherwise the released encoder (a classifier's, without its head) becomes the
    method's encoder class (MAE: ``ViTMAEModel``; by default the stock class of the timm backbone,
    ``_timm_backbone_export``). Every tensor of the class is written: the directory loads with
    ``AutoModel.from_pretrained`` / the class itself with nothing missing or initialised anew, and its
    ``last_hidden_state`` (and ``pooler_output`` where the class has one, except BEiT's, see ``_beit_model_export``)
    is sslhub's. Encoders no stock class computes raise one ``ValueError`` naming the timm export where there is one.
    """
    targets = get_method(model.config.method).export_targets
    try:
        if isinstance(model, SSLForPreTraining) and targets.pretraining in PRETRAINING_EXPORTS:
            export = PRETRAINING_EXPORTS[targets.pretraining](model)
        elif targets.encoder in ENCODER_EXPORTS:
            export = ENCODER_EXPORTS[targets.encoder](_released_encoder(model))
        else:
            raise ValueError("sslhub's export has no transformers class for this method")
    except ValueError as err:
        raise ValueError(f"{model.config.method} {model.config.backbone} has no transformers export ({err}); "
                         f"{_instead_of_transformers(model)}") from err  # fmt: skip
    name = export.model_class.__name__
    export.config.architectures = [name]
    with atomic_directory(directory, overwrite) as staging:
        export.config.save_pretrained(staging)
        stock_image_processor(model.config).save_pretrained(staging)  # for AutoImageProcessor and pipelines
        save_file(export.state_dict, staging / "model.safetensors", metadata={"format": "pt"})
        with quiet_transformers():
            loaded, info = export.model_class.from_pretrained(staging, output_loading_info=True, **export.load_kwargs)
        if any(info.values()):
            raise ValueError(f"transformers does not load the exported {name} cleanly: {info}")
        with torch.no_grad():
            export.check(loaded.eval())
    return Path(directory)


class _TransformersExport(NamedTuple):
    """What ``export_transformers`` writes (class, config, checkpoint-layout weights) and how it checks the reloaded
    model: ``load_kwargs`` for ``from_pretrained`` and ``check(loaded)`` against sslhub's outputs."""

    model_class: type[PreTrainedModel]
    config: PretrainedConfig
    state_dict: dict[str, torch.Tensor]
    load_kwargs: dict
    check: Callable[[PreTrainedModel], None]


# A ViTMAE masks at random; mask ratio 0 and the identity noise of _identity_noise keep every patch, in order.
_KEEP_ALL = {"mask_ratio": 0.0}


def _encoder_export(encoder: SSLModel, model_class, hf_config, state_dict: dict, load_kwargs: dict, inputs: dict,
                    pooled: bool = True) -> _TransformersExport:  # fmt: skip
    """A timm encoder as a transformers encoder class (``state_dict``: its weights in the class's checkpoint keys),
    checked on ``last_hidden_state`` and, with ``pooled``, on ``pooler_output`` (flattened: a ``ResNetModel``'s is
    (B, C, 1, 1)) against the ``SSLModel``'s."""
    pixels = _probe_images(encoder.config)
    with _inference(encoder):
        expected = encoder(pixels)

    def check(loaded: PreTrainedModel) -> None:
        output = loaded(pixels, **inputs)
        _check_same("transformers export, last_hidden_state", output.last_hidden_state, expected.last_hidden_state)
        if pooled:
            _check_same("transformers export, pooler_output", output.pooler_output.flatten(1), expected.pooler_output)

    return _TransformersExport(model_class, hf_config, state_dict, load_kwargs, check)


def _timm_vit(encoder: SSLModel) -> VisionTransformer:
    backbone = encoder.encoder.timm_model
    if not isinstance(backbone, VisionTransformer):
        raise ValueError(f"transformers' ViT classes hold a timm VisionTransformer, not a {type(backbone).__name__}")
    return backbone


def _timm_backbone_export(encoder: SSLModel) -> _TransformersExport:
    """The stock transformers class of the encoder's timm backbone (``ExportTargets``' default): a ViT as ``ViTModel``
    or ``ViTMSNModel`` (``_vit_model_export``), a ResNet as ``ResNetModel`` (``_resnet_model_export``)."""
    if not encoder.encoder.exports_to_timm:
        raise ValueError(f"{type(encoder.encoder).__name__} computes what no stock model of its backbone does")
    if isinstance(encoder.encoder.timm_model, ResNet):
        return _resnet_model_export(encoder)
    if isinstance(encoder.encoder.timm_model, VisionTransformer):
        return _vit_model_export(encoder)
    raise ValueError(f"sslhub writes timm ViTs and ResNets as transformers classes, not a {encoder.config.backbone}")


def _vit_model_export(encoder: SSLModel) -> _TransformersExport:
    """A timm ViT encoder pooling its class token as ``ViTModel`` whose pooler is the identity (dense = I, bias 0,
    ``pooler_act="linear"``), so ``pooler_output`` is sslhub's: the final-norm class token. ``ViTPooler`` cannot
    average tokens, so a mean-pooling encoder becomes ``ViTMSNModel`` (the same ViT and checkpoint keys, no pooler:
    reloaded as it is, ``AutoModel`` included, it creates none); its pooled feature is
    ``last_hidden_state[:, 1:].mean(1)``."""
    vit = _timm_vit(encoder)
    weights = vit_to_transformers(vit.state_dict())
    if encoder.encoder.pooling != "cls":
        return _encoder_export(encoder, ViTMSNModel, vit_config(vit, ViTMSNConfig), weights, {}, {}, pooled=False)
    dim = vit.embed_dim
    weights |= {"pooler.dense.weight": torch.eye(dim), "pooler.dense.bias": torch.zeros(dim)}
    hf_config = vit_config(vit, pooler_act="linear", pooler_output_size=dim)
    return _encoder_export(encoder, ViTModel, hf_config, weights, {}, {})


def _resnet_model_export(encoder: SSLModel) -> _TransformersExport:
    """A timm ResNet encoder (average pooling) as ``ResNetModel``: ``last_hidden_state`` is sslhub's final feature
    map and ``pooler_output`` (B, C, 1, 1) its average, sslhub's ``pooler_output`` (B, C) as ``.flatten(1)``."""
    resnet = encoder.encoder.timm_model
    hf_config = resnet_config(resnet)  # first: its refusal names what transformers' ResNet lacks
    return _encoder_export(encoder, ResNetModel, hf_config, resnet_to_transformers(resnet.state_dict()), {}, {})


def _vit_mae_model_export(encoder: SSLModel) -> _TransformersExport:
    """A timm ViT encoder as ``ViTMAEModel``, masking nothing (mask ratio 0, identity noise)."""
    backbone = _timm_vit(encoder)
    hf_config = vit_mae_config(backbone, **_mae_fields(encoder.config))
    inputs = {"noise": _identity_noise(backbone, _probe_images(encoder.config))}
    weights = vit_to_transformers(backbone.state_dict())
    return _encoder_export(encoder, ViTMAEModel, hf_config, weights, _KEEP_ALL, inputs, pooled=False)


def _vit_mae_for_pretraining_export(model: SSLForPreTraining) -> _TransformersExport:
    """An MAE objective (a timm ViT encoder and an ``MAEDecoder``) as ``ViTMAEForPreTraining``, checked on the encoder
    tokens and the decoder predictions."""
    encoder = model.method.released_encoder.timm_model
    decoder = next(module for module in model.method.modules() if isinstance(module, MAEDecoder))
    pixels = _probe_images(model.config)
    noise = _identity_noise(encoder, pixels)
    with _inference(model):
        tokens = encoder.forward_features(pixels)
        prediction = decoder(tokens, ids_restore=noise.long())  # identity order

    def check(loaded: PreTrainedModel) -> None:
        _check_same("transformers export, encoder", loaded.vit(pixels, noise=noise).last_hidden_state, tokens)
        _check_same("transformers export, decoder", loaded(pixels, noise=noise).logits, prediction)

    return _TransformersExport(
        ViTMAEForPreTraining,
        vit_mae_config(encoder, decoder, **_mae_fields(model.config)),
        mae_to_transformers(encoder.state_dict(), decoder.state_dict()),
        _KEEP_ALL,
        check,
    )


def _timm_beit(encoder: nn.Module) -> Beit:
    if not isinstance(encoder.timm_model, Beit):
        raise ValueError(f"transformers' Beit classes hold a timm Beit, not a {type(encoder.timm_model).__name__}")
    return encoder.timm_model


def _beit_model_export(encoder: SSLModel) -> _TransformersExport:
    """A timm ``Beit`` encoder as ``BeitModel`` with the final norm on every token (``use_mean_pooling=False``): its
    ``last_hidden_state`` is sslhub's. Its pooler has no weights and gives the final-norm class token: sslhub's
    ``pooler_output`` with class-token pooling; with BEiT's mean pooling sslhub's is
    ``last_hidden_state[:, 1:].mean(1)``, which no ``BeitModel`` computes next to a normed ``last_hidden_state``
    (``use_mean_pooling=True`` normalises the mean instead)."""
    vit = _timm_beit(encoder.encoder)
    hf_config = beit_config(vit, use_mean_pooling=False)
    weights = beit_to_transformers(vit.state_dict())
    return _encoder_export(encoder, BeitModel, hf_config, weights, {}, {}, pooled=encoder.encoder.pooling == "cls")


def _beit_for_mim_export(model: SSLForPreTraining) -> _TransformersExport:
    """A BEiT objective (timm ``Beit``, ``mask_token``, ``lm_head``) as ``BeitForMaskedImageModeling``, checked on the
    token logits of probe images with every other patch masked. The frozen tokenizer is not part of it."""
    method = model.method
    vit = _timm_beit(method.released_encoder)
    pixels = _probe_images(model.config)
    mask = (torch.arange(vit.patch_embed.num_patches) % 2).bool().expand(pixels.shape[0], -1)
    with _inference(model):
        expected = method.mim_logits(pixels, mask.reshape(pixels.shape[0], *vit.patch_embed.grid_size), all_tokens=True)

    def check(loaded: PreTrainedModel) -> None:
        _check_same("transformers export, MIM logits", loaded(pixels, bool_masked_pos=mask).logits, expected)

    head = {
        "mask_token": method.mask_token.detach(),
        **{f"lm_head.{k}": v for k, v in method.lm_head.state_dict().items()},
    }
    hf_config = beit_config(vit, use_mean_pooling=True, use_mask_token=True, vocab_size=method.lm_head.out_features)
    return _TransformersExport(BeitForMaskedImageModeling, hf_config, beit_mim_to_transformers(vit.state_dict(), head),
                               {}, check)  # fmt: skip


ENCODER_EXPORTS: dict[str, Callable[[SSLModel], _TransformersExport]] = {
    "timm": _timm_backbone_export,
    "ViTMAEModel": _vit_mae_model_export,
    "BeitModel": _beit_model_export,
}
PRETRAINING_EXPORTS: dict[str, Callable[[SSLForPreTraining], _TransformersExport]] = {
    "ViTMAEForPreTraining": _vit_mae_for_pretraining_export,
    "BeitForMaskedImageModeling": _beit_for_mim_export,
}


def _instead_of_transformers(model: nn.Module) -> str:
    """What to export instead of a transformers class: the timm export where the encoder has one."""
    if model._released_encoder_module().exports_to_timm:
        return "use `sslhub export --format timm` (sslhub.export_timm in Python)"
    return "it has no timm export either: use the sslhub checkpoint itself"


def _mae_fields(config) -> dict:
    """The ``ViTMAEConfig`` fields that come from the method's hyperparameters of the same names."""
    return {key: config.method_kwargs[key] for key in ("mask_ratio", "norm_pix_loss")}


def _identity_noise(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """MAE masking noise whose argsort keeps the patches in order."""
    num_patches = vit.patch_embed.num_patches
    return torch.arange(num_patches, dtype=pixels.dtype).expand(pixels.shape[0], num_patches)


def _probe_images(config) -> torch.Tensor:
    """Two fixed random images of the model's input size."""
    channels = config.backbone_kwargs.get("in_chans", 3)
    shape = (2, channels, config.image_size, config.image_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _check_same(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    if not error <= TOLERANCE:
        raise ValueError(f"{what}: the export does not reproduce sslhub's output (max relative error {error:.1e})")


@contextmanager
def _inference(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside the block; every submodule's train/eval mode is restored after it."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for sub, training in modes.items():
            sub.training = training
