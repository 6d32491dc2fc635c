"""Key mappings between Hugging Face transformers ViT-family checkpoints and timm ViTs, in both directions, and from
timm ResNets to transformers' ``ResNetModel`` (export only).

The transformers side is the *checkpoint* layout: what Hub files hold and what ``save_pretrained`` writes
(``encoder.layer.{i}.attention.attention.query``, see ``official-checkpoints.md`` §0.2). transformers >= 5 renames
these keys when loading (``layers.{i}.attention.q_proj``, ``transformers/conversion_mapping.py``), so an in-memory
``model.state_dict()`` has to be saved (or passed through ``transformers.core_model_loading.revert_weight_conversion``)
before it is mapped here.

One table per layout lists ``(timm name, transformers name(s))`` for the embeddings and for one block; both directions
read it. Several transformers names on one row are concatenated along dim 0 (q, k, v -> timm's fused ``qkv``).
Every source key is mapped, dropped by a named rule (returned in ``ignored``) or reported in a ``ConversionError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import timm
import torch
from timm.layers import DropBlock2d, DropPath
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import _convert_dinov2
from torch import nn
from transformers import AutoConfig, BeitConfig, PretrainedConfig, ResNetConfig, ViTConfig, ViTMAEConfig

from sslhub.conversion.keys import Converted
from sslhub.conversion.loading import CheckpointError
from sslhub.heads import MAEDecoder

Row = tuple[str, tuple[str, ...]]
"""(timm name, transformers names); a name is a parameter or a module whose ``.weight`` / ``.bias`` follow it."""

_SUFFIXES = ("", ".weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked")  # BatchNorm buffers too
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")

# timm ``VisionTransformer`` / ``Block`` (timm/models/vision_transformer.py) vs transformers ``ViTEmbeddings`` /
# ``ViTLayer`` checkpoint names (official-checkpoints.md §0.2; the same rows serve ViTMAE, §13).
VIT_EMBEDDINGS: tuple[Row, ...] = (
    ("cls_token", ("embeddings.cls_token",)),
    ("pos_embed", ("embeddings.position_embeddings",)),
    ("patch_embed.proj", ("embeddings.patch_embeddings.projection",)),
    ("norm", ("layernorm",)),
)
VIT_BLOCK: tuple[Row, ...] = (
    ("norm1", ("layernorm_before",)),
    ("attn.qkv", _QKV),
    ("attn.proj", ("attention.output.dense",)),
    ("norm2", ("layernorm_after",)),
    ("mlp.fc1", ("intermediate.dense",)),
    ("mlp.fc2", ("output.dense",)),
)
# transformers ``ViTMAEDecoder`` (vit_mae/modeling_vit_mae.py) vs sslhub ``MAEDecoder`` / MAE's ``models_mae.py`` (§13).
MAE_DECODER_TOP: tuple[Row, ...] = tuple(
    (name, (f"decoder.{name}",))
    for name in ("mask_token", "decoder_pos_embed", "decoder_embed", "decoder_norm", "decoder_pred")
)
# Original DINOv2 names (dinov2/models/vision_transformer.py) vs transformers ``Dinov2Embeddings`` / ``Dinov2Layer``
# (§17, ``convert_dinov2_to_hf.py``); timm's ``_convert_dinov2`` then turns the original names into timm's.
DINOV2_EMBEDDINGS: tuple[Row, ...] = (*VIT_EMBEDDINGS, ("register_tokens", ("embeddings.register_tokens",)))
DINOV2_BLOCK: tuple[Row, ...] = (
    ("norm1", ("norm1",)),
    ("attn.qkv", _QKV),
    ("attn.proj", ("attention.output.dense",)),
    ("ls1.gamma", ("layer_scale1.lambda1",)),
    ("norm2", ("norm2",)),
    ("mlp.fc1", ("mlp.fc1",)),
    ("mlp.fc2", ("mlp.fc2",)),
    ("mlp.w12", ("mlp.weights_in",)),
    ("mlp.w3", ("mlp.weights_out",)),
    ("ls2.gamma", ("layer_scale2.lambda1",)),
)


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: embedding rows, per-block rows, the block prefixes, and the transformers keys it drops on
    purpose (regex on the full key -> the rule's name). ``hf_blocks`` lists the transformers spellings of a block
    prefix that are read; the first is the one written."""

    top: tuple[Row, ...]
    block: tuple[Row, ...]
    timm_block: str
    hf_blocks: tuple[str, ...]
    ignored: Mapping[str, str]
    top_unprefixed: tuple[Row, ...] = ()  # rows outside the base model of a task class (BEiT's final ``layernorm``)

    def rows(self, depth: int, hf_prefix: str = "", hf_block: str | None = None) -> list[Row]:
        """Concrete rows for ``depth`` blocks, transformers names under ``hf_prefix`` (e.g. ``"vit."``)."""
        rows = list(self.top)
        for i in range(depth):
            timm_block, block = self.timm_block.format(i=i), (hf_block or self.hf_blocks[0]).format(i=i)
            rows += [(timm_block + t, tuple(block + h for h in hs)) for t, hs in self.block]
        return [(t, tuple(hf_prefix + h for h in hs)) for t, hs in rows] + list(self.top_unprefixed)

    def hf_block_in(self, state_dict: Mapping[str, torch.Tensor], hf_prefix: str) -> str:
        """The block spelling ``state_dict`` uses (the written one when it has no blocks)."""
        for spelling in self.hf_blocks:
            if any(key.startswith(hf_prefix + spelling.format(i=0)) for key in state_dict):
                return spelling
        return self.hf_blocks[0]


VIT = Layout(
    VIT_EMBEDDINGS,
    VIT_BLOCK,
    "blocks.{i}.",
    ("encoder.layer.{i}.",),
    {
        r"(vit\.)?pooler\.": "pooler (ViTModel's dense + tanh on the class token; not part of the encoder)",
        r"classifier\.": "classifier (ViTForImageClassification head; sslhub encoders have none)",
        r"decoder\.(mask_token|decoder_)": "mae_decoder (mapped by mae_decoder_from_transformers)",
    },
)
MAE_DECODER = Layout(
    MAE_DECODER_TOP,
    VIT_BLOCK,
    "decoder_blocks.{i}.",
    # Hub files (convert_vit_mae_to_pytorch.py) and transformers < 5 say ``decoder_layers.{i}``; transformers 5.23's
    # save_pretrained reverts its ``encoder.layer -> layers`` rename inside that name: ``decoder_encoder.layer.{i}``.
    ("decoder.decoder_layers.{i}.", "decoder.decoder_encoder.layer.{i}."),
    {r"vit\.": "encoder (mapped by vit_from_transformers)"},
)
DINOV2 = Layout(
    DINOV2_EMBEDDINGS,
    DINOV2_BLOCK,
    "blocks.{i}.",
    ("encoder.layer.{i}.",),
    {
        r"(dinov2\.)?embeddings\.mask_token": "mask_token (used in DINOv2 training only; timm drops it too)",
        r"classifier\.": "classifier (Dinov2ForImageClassification linear head)",
    },
)


class KeyMapping(NamedTuple):
    """``state_dict``: the mapped tensors; ``ignored``: source keys dropped on purpose -> the rule that dropped them."""

    state_dict: dict[str, torch.Tensor]
    ignored: dict[str, str]


class ConversionError(CheckpointError):
    """A state dict that does not fit the target layout: keys no rule knows, keys missing, or wrong shapes."""

    def __init__(self, what: str, unknown=(), missing=(), mismatched=()):
        self.unknown, self.missing, self.mismatched = sorted(unknown), sorted(missing), sorted(mismatched)
        problems = [
            f"{label} ({len(items)}): {_listing(items)}"
            for label, items in (
                ("unknown keys", self.unknown),
                ("missing keys", self.missing),
                ("shape mismatches", self.mismatched),
            )
            if items
        ]
        super().__init__(f"Cannot map {what}: " + "; ".join(problems))


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _apply(
    state_dict: Mapping[str, torch.Tensor], rows: list[tuple[tuple[str, ...], tuple[str, ...]]]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Rename ``(sources, targets)`` rows: sources are concatenated along dim 0 and split into len(targets) parts.

    Returns (mapped, source keys left over).
    """
    mapped, used = {}, set()
    for sources, targets in rows:
        for suffix in _SUFFIXES:
            keys = [source + suffix for source in sources]
            if not all(key in state_dict for key in keys):
                continue
            tensor = torch.cat([state_dict[key] for key in keys]) if len(keys) > 1 else state_dict[keys[0]]
            parts = [part.clone() for part in tensor.chunk(len(targets))] if len(targets) > 1 else [tensor]
            mapped.update({target + suffix: part for target, part in zip(targets, parts, strict=True)})
            used.update(keys)
    return mapped, set(state_dict) - used


def _from_transformers(state_dict, layout: Layout, depth: int, hf_prefix: str):
    """transformers -> timm names; returns (mapped, ignored, unknown)."""
    rows = layout.rows(depth, hf_prefix, layout.hf_block_in(state_dict, hf_prefix))
    mapped, left = _apply(state_dict, [(hs, (t,)) for t, hs in rows])
    ignored = {key: rule for key in left for pattern, rule in layout.ignored.items() if re.match(pattern, key)}
    return mapped, ignored, left - set(ignored)


def _to_transformers(state_dict, layout: Layout, what: str, hf_prefix: str = "") -> dict[str, torch.Tensor]:
    """timm -> transformers names; timm keys without a row raise ``ConversionError``."""
    depth = _num_blocks(state_dict, layout.timm_block)
    mapped, unknown = _apply(state_dict, [((t,), hs) for t, hs in layout.rows(depth, hf_prefix)])
    if unknown:
        raise ConversionError(what, unknown=unknown)
    return mapped


def _num_blocks(state_dict: Mapping[str, torch.Tensor], block_prefix: str) -> int:
    pattern = re.compile(re.escape(block_prefix).replace(r"\{i\}", r"(\d+)"))
    indices = [int(m.group(1)) for key in state_dict if (m := pattern.match(key))]
    return max(indices, default=-1) + 1


def _hf_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> str:
    """The base-model prefix of a task checkpoint (``vit.``, ``dinov2.``), found by its class token."""
    for prefix in prefixes:
        if f"{prefix}embeddings.cls_token" in state_dict:
            return prefix
    raise ConversionError("transformers checkpoint", missing=[f"{prefix}embeddings.cls_token" for prefix in prefixes])


def _check(what: str, mapped: dict, unknown, expected: dict[str, torch.Size]) -> None:
    """Raise ``ConversionError`` unless ``mapped`` has exactly the ``expected`` keys and shapes."""
    mismatched = [
        f"{key}: got {tuple(mapped[key].shape)}, expected {tuple(shape)}"
        for key, shape in expected.items()
        if key in mapped and mapped[key].shape != shape
    ]
    missing = set(expected) - set(mapped)
    unknown = set(unknown) | (set(mapped) - set(expected))
    if unknown or missing or mismatched:
        raise ConversionError(what, unknown, missing, mismatched)


def _meta_shapes(build: Callable[[], nn.Module]) -> dict[str, torch.Size]:
    """Parameter shapes of the module ``build()`` makes, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {key: value.shape for key, value in build().state_dict().items()}


def _timm_shapes(name: str, kwargs: dict) -> dict[str, torch.Size]:
    return _meta_shapes(lambda: timm.create_model(name, num_classes=0, global_pool="", **kwargs))


def _as_config(config: PretrainedConfig | Mapping, model_types: tuple[str, ...]) -> PretrainedConfig:
    """A transformers config from a config object or a parsed ``config.json`` (defaults filled in)."""
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.for_model(**config)
    if config.model_type not in model_types:
        raise ValueError(f"expected a transformers config of type {model_types}, got {config.model_type!r}")
    return config


def _mlp_ratio(hidden_features: int, dim: int) -> float:
    """The ``mlp_ratio`` for which timm's ``int(dim * mlp_ratio)`` gives ``hidden_features``."""
    ratio = hidden_features / dim
    return ratio if int(dim * ratio) == hidden_features else math.nextafter(ratio, math.inf)


# ---- ViT (DINO ports, ViT-MAE encoder) -------------------------------------------------------------------------

_VIT_ENTRYPOINT = "vit_base_patch16_224"  # any plain timm ViT entrypoint: vit_timm_kwargs sets every size
_VIT_TYPES = ("vit", "vit_mae", "vit_msn")  # ViTMSN: transformers' ViT without pooler, sslhub's mean-pooled ViT export


def vit_timm_kwargs(config: PretrainedConfig | Mapping) -> dict:
    """Keyword arguments for a timm ViT entrypoint (``VisionTransformer``) that build the encoder of a transformers
    ``ViTConfig`` / ``ViTMAEConfig`` / ``ViTMSNConfig``.

    timm's LayerNorm has eps 1e-6 (the DINO / MAE value); the Hub ports of DINO and MAE say 1e-12 in their configs
    (official-checkpoints.md §21.5), a difference of ~1e-6 relative in the outputs.
    """
    config = _as_config(config, _VIT_TYPES)
    if config.hidden_act != "gelu":
        raise ValueError(f"timm's ViT uses exact GELU; this config has hidden_act={config.hidden_act!r}")
    return {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": _mlp_ratio(config.intermediate_size, config.hidden_size),
        "qkv_bias": config.qkv_bias,
    }


def vit_from_transformers(state_dict: Mapping[str, torch.Tensor], config: PretrainedConfig | Mapping) -> KeyMapping:
    """``ViTModel`` / ``ViTForImageClassification`` / ``ViTMAEModel`` / ``ViTMAEForPreTraining`` / ``ViTMSNModel``
    checkpoint -> timm ViT encoder keys (``vit.`` prefix optional). Pooler, classifier and MAE decoder keys are
    returned as ignored; the result is checked against the timm ViT that ``vit_timm_kwargs(config)`` builds."""
    config = _as_config(config, _VIT_TYPES)
    prefix = _hf_prefix(state_dict, ("", "vit."))
    mapped, ignored, unknown = _from_transformers(state_dict, VIT, config.num_hidden_layers, prefix)
    expected = _timm_shapes(_VIT_ENTRYPOINT, vit_timm_kwargs(config))
    _check(f"{config.model_type} checkpoint to a timm ViT", mapped, unknown, expected)
    return KeyMapping(mapped, ignored)


def vit_to_transformers(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """timm ViT encoder state dict -> ``ViTModel`` checkpoint keys (``prefix="vit."`` for task models such as
    ``ViTMAEForPreTraining``); ``qkv`` is split into query, key and value."""
    return _to_transformers(state_dict, VIT, "timm ViT to transformers", prefix)


def _check_vit_is_portable(vit: nn.Module) -> None:
    """transformers' ViT has one class token sharing the position embedding, square patches and exact GELU."""
    act = vit.blocks[0].mlp.act
    needs = {
        "one class token with a position embedding and no register tokens": vit.num_prefix_tokens == 1
        and vit.cls_token is not None
        and not getattr(vit, "no_embed_class", False),
        "square patches": len(set(vit.patch_embed.patch_size)) == 1,
        "exact GELU": isinstance(act, nn.GELU) and act.approximate == "none",
    }
    unmet = [need for need, met in needs.items() if not met]
    if unmet:
        raise ValueError(f"transformers' ViT needs {'; '.join(unmet)}")


def _vit_config_kwargs(vit: nn.Module) -> dict:
    """Encoder fields shared by ``ViTConfig`` and ``ViTMAEConfig``, read off a timm ViT."""
    _check_vit_is_portable(vit)
    block = vit.blocks[0]
    return {
        "hidden_size": vit.embed_dim,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "qkv_bias": block.attn.qkv.bias is not None,
        "layer_norm_eps": vit.norm.eps,
        "image_size": vit.patch_embed.img_size[0],
        "patch_size": vit.patch_embed.patch_size[0],
        "num_channels": vit.patch_embed.proj.in_channels,
    }


def vit_config(vit: nn.Module, config_class: type[PretrainedConfig] = ViTConfig, **overrides) -> PretrainedConfig:
    """The ``ViTConfig`` (or ``config_class``, e.g. ``ViTMSNConfig``) of a timm ViT (sizes, ``qkv_bias``,
    ``layer_norm_eps`` of its final norm, exact GELU)."""
    return config_class(**{**_vit_config_kwargs(vit), **overrides})


# ---- MAE decoder -----------------------------------------------------------------------------------------------


def mae_decoder_kwargs(config: PretrainedConfig | Mapping) -> dict:
    """``MAEDecoder`` arguments (sslhub/heads.py) for the decoder of a ``ViTMAEConfig``."""
    config = _as_config(config, ("vit_mae",))
    grid = config.image_size // config.patch_size
    return {
        "grid_size": (grid, grid),
        "patch_size": config.patch_size,
        "encoder_dim": config.hidden_size,
        "embed_dim": config.decoder_hidden_size,
        "depth": config.decoder_num_hidden_layers,
        "num_heads": config.decoder_num_attention_heads,
        "mlp_ratio": _mlp_ratio(config.decoder_intermediate_size, config.decoder_hidden_size),
        "in_chans": config.num_channels,
    }


def mae_decoder_from_transformers(
    state_dict: Mapping[str, torch.Tensor], config: PretrainedConfig | Mapping
) -> KeyMapping:
    """``ViTMAEForPreTraining`` checkpoint -> sslhub ``MAEDecoder`` keys; encoder keys are returned as ignored."""
    config = _as_config(config, ("vit_mae",))
    mapped, ignored, unknown = _from_transformers(state_dict, MAE_DECODER, config.decoder_num_hidden_layers, "")
    expected = _meta_shapes(lambda: MAEDecoder(**mae_decoder_kwargs(config)))
    _check("ViTMAEForPreTraining decoder to sslhub's MAEDecoder", mapped, unknown, expected)
    return KeyMapping(mapped, ignored)


def mae_to_transformers(
    encoder_state: Mapping[str, torch.Tensor], decoder_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """timm ViT encoder + sslhub ``MAEDecoder`` state dicts -> ``ViTMAEForPreTraining`` checkpoint keys."""
    return {
        **vit_to_transformers(encoder_state, prefix="vit."),
        **_to_transformers(decoder_state, MAE_DECODER, "sslhub MAEDecoder to transformers"),
    }


def vit_mae_config(encoder: nn.Module, decoder: MAEDecoder | None = None, **overrides) -> ViTMAEConfig:
    """The ``ViTMAEConfig`` of a timm ViT encoder and, if given, an sslhub ``MAEDecoder`` (without one the
    ``decoder_*`` fields keep transformers' defaults, as a ``ViTMAEModel`` has no decoder)."""
    fields = _vit_config_kwargs(encoder)
    if decoder is not None:
        if decoder.decoder_norm.eps != fields["layer_norm_eps"]:
            raise ValueError(
                f"transformers' ViTMAE has one layer_norm_eps; encoder {fields['layer_norm_eps']} != "
                f"decoder {decoder.decoder_norm.eps}"
            )
        block = decoder.decoder_blocks[0]
        fields |= {
            "decoder_hidden_size": decoder.decoder_embed.out_features,
            "decoder_num_hidden_layers": len(decoder.decoder_blocks),
            "decoder_num_attention_heads": block.attn.num_heads,
            "decoder_intermediate_size": block.mlp.fc1.out_features,
        }
    return ViTMAEConfig(**{**fields, **overrides})


# ---- DINOv2 ----------------------------------------------------------------------------------------------------

_DINOV2_SIZES = {384: "small", 768: "base", 1024: "large"}


def dinov2_timm_model(config: PretrainedConfig | Mapping) -> tuple[str, dict]:
    """timm model name and kwargs for a ``Dinov2Config`` / ``Dinov2WithRegistersConfig``.

    The name is timm's ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2`` (giant = SwiGLU, reg4 = registers with
    ``no_embed_class``); the kwargs restate every size, so other widths and depths build too.
    """
    config = _as_config(config, ("dinov2", "dinov2_with_registers"))
    registers = getattr(config, "num_register_tokens", 0)
    dim = config.hidden_size
    hidden = int(dim * config.mlp_ratio)
    if config.use_swiglu_ffn:
        size = "giant"
        # transformers' Dinov2SwiGLUFFN keeps 2/3 of the width, rounded up to a multiple of 8; timm's SwiGLUPacked
        # fc1 holds gate and value, twice that (modeling_dinov2.py; timm vit_giant_patch14_dinov2).
        hidden = 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)
    elif config.hidden_act == "gelu":
        size = _DINOV2_SIZES.get(dim, "base")
    else:
        raise ValueError(f"timm's DINOv2 ViT uses exact GELU; this config has hidden_act={config.hidden_act!r}")
    kwargs = {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "embed_dim": dim,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": _mlp_ratio(hidden, dim),
        "qkv_bias": config.qkv_bias,
    }
    if registers:
        kwargs["reg_tokens"] = registers
    return f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2", kwargs


def dinov2_from_transformers(state_dict: Mapping[str, torch.Tensor], config: PretrainedConfig | Mapping) -> KeyMapping:
    """``Dinov2Model`` / ``Dinov2WithRegistersModel`` / ``Dinov2ForImageClassification`` checkpoint -> keys of the
    timm model ``dinov2_timm_model(config)`` names.

    Renames to the original DINOv2 names, then applies timm's own ``_convert_dinov2`` (registers -> ``reg_token``
    with the class position folded into ``cls_token``; SwiGLU ``w12`` / ``w3`` -> ``mlp.fc1`` / ``mlp.fc2``).
    ``mask_token`` and classifier keys are returned as ignored.
    """
    config = _as_config(config, ("dinov2", "dinov2_with_registers"))
    prefix = _hf_prefix(state_dict, ("", "dinov2."))
    original, ignored, unknown = _from_transformers(state_dict, DINOV2, config.num_hidden_layers, prefix)
    mapped = _convert_dinov2(original, None)
    _check(f"{config.model_type} checkpoint to timm", mapped, unknown, _timm_shapes(*dinov2_timm_model(config)))
    return KeyMapping(mapped, ignored)


# ---- BEiT ------------------------------------------------------------------------------------------------------

# timm ``Beit`` (timm/models/beit.py) vs transformers ``BeitModel`` / ``BeitForMaskedImageModeling`` checkpoint names
# (``convert_beit_unilm_to_pytorch.py``, official-checkpoints.md §14): BEiT has no key bias, so its q and v biases are
# rows of their own; layer scale ``gamma_1`` / ``gamma_2`` is ``lambda_1`` / ``lambda_2``; one relative position bias
# table shared by the blocks; the final norm is the top-level ``layernorm`` of both classes (a ``BeitModel`` with
# ``use_mean_pooling=False``, and the masked-image-modelling head's own norm).
BEIT_EMBEDDINGS: tuple[Row, ...] = (
    *(row for row in VIT_EMBEDDINGS if row[0] != "norm"),
    ("rel_pos_bias.relative_position_bias_table", ("encoder.relative_position_bias.relative_position_bias_table",)),
)
BEIT_BLOCK: tuple[Row, ...] = (
    *VIT_BLOCK,
    ("attn.q_bias", ("attention.attention.query.bias",)),
    ("attn.v_bias", ("attention.attention.value.bias",)),
    ("gamma_1", ("lambda_1",)),
    ("gamma_2", ("lambda_2",)),
)
BEIT = Layout(
    BEIT_EMBEDDINGS,
    BEIT_BLOCK,
    "blocks.{i}.",
    ("encoder.layer.{i}.",),
    {
        r"(beit\.)?encoder\.relative_position_bias\.relative_position_index": "relative_position_index (a buffer timm "
        "computes; Hub files of older transformers hold it)",
        r"(beit\.)?embeddings\.mask_token": "mask_token (BEiT's pretraining part, beit_mim_head_from_transformers)",
        r"lm_head\.": "lm_head (BEiT's pretraining part, beit_mim_head_from_transformers)",
    },
    top_unprefixed=(("norm", ("layernorm",)),),
)
# The masked-image-modelling part of ``BeitForMaskedImageModeling`` in sslhub's BEiT names (``sslhub.methods.beit``).
BEIT_MIM_HEAD: tuple[Row, ...] = (("mask_token", ("beit.embeddings.mask_token",)), ("lm_head", ("lm_head",)))
_BEIT_ENTRYPOINT = "beit_base_patch16_224"  # beit_timm_kwargs sets every size and option


def beit_timm_kwargs(config: PretrainedConfig | Mapping) -> dict:
    """Keyword arguments for timm's ``beit_base_patch16_224`` entrypoint that build the encoder of a ``BeitConfig``
    (sizes, absolute / per-block / shared position biases, layer scale).

    timm's LayerNorm has eps 1e-6 (BEiT's value); the Hub ports say transformers' default 1e-12, a difference of
    ~1e-6 relative in the outputs.
    """
    config = _as_config(config, ("beit",))
    if config.hidden_act != "gelu":
        raise ValueError(f"timm's Beit uses exact GELU; this config has hidden_act={config.hidden_act!r}")
    return {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": _mlp_ratio(config.intermediate_size, config.hidden_size),
        "use_abs_pos_emb": config.use_absolute_position_embeddings,
        "use_rel_pos_bias": config.use_relative_position_bias,
        "use_shared_rel_pos_bias": config.use_shared_relative_position_bias,
        "init_values": config.layer_scale_init_value if config.layer_scale_init_value > 0 else None,
    }


def beit_from_transformers(state_dict: Mapping[str, torch.Tensor], config: PretrainedConfig | Mapping) -> KeyMapping:
    """``BeitModel`` (``use_mean_pooling=False``) / ``BeitForMaskedImageModeling`` checkpoint -> timm ``Beit`` keys
    (``beit.`` prefix optional). The mask token, ``lm_head`` and a stored relative position index are returned as
    ignored; the result is checked against the timm Beit that ``beit_timm_kwargs(config)`` builds."""
    config = _as_config(config, ("beit",))
    if config.use_relative_position_bias:
        raise CheckpointError("a beit checkpoint with one relative position bias per block (a fine-tuned BEiT): "
                              "sslhub reads BEiT's pretraining encoder, with one shared bias")  # fmt: skip
    prefix = _hf_prefix(state_dict, ("", "beit."))
    mapped, ignored, unknown = _from_transformers(state_dict, BEIT, config.num_hidden_layers, prefix)
    _check("beit checkpoint to a timm Beit", mapped, unknown, _timm_shapes(_BEIT_ENTRYPOINT, beit_timm_kwargs(config)))
    return KeyMapping(mapped, ignored)


def beit_mim_head_from_transformers(state_dict: Mapping[str, torch.Tensor], config: PretrainedConfig | Mapping):
    """The masked-image-modelling part of a ``BeitForMaskedImageModeling`` checkpoint: ``mask_token`` (1, 1, D) and
    ``lm_head`` (vocab, D) in sslhub's BEiT names."""
    config = _as_config(config, ("beit",))
    dim, vocab = config.hidden_size, config.vocab_size
    mapped, _ = _apply(state_dict, [(hs, (t,)) for t, hs in BEIT_MIM_HEAD])
    expected = {"mask_token": (1, 1, dim), "lm_head.weight": (vocab, dim), "lm_head.bias": (vocab,)}
    _check("BeitForMaskedImageModeling head", mapped, (), {key: torch.Size(shape) for key, shape in expected.items()})
    return mapped


def beit_to_transformers(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """timm ``Beit`` encoder state dict -> ``BeitModel`` checkpoint keys (``prefix="beit."`` for
    ``BeitForMaskedImageModeling``, whose final norm stays the top-level ``layernorm``)."""
    return _to_transformers(state_dict, BEIT, "timm Beit to transformers", prefix)


def beit_mim_to_transformers(
    encoder_state: Mapping[str, torch.Tensor], head_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """timm ``Beit`` encoder + sslhub BEiT's ``mask_token`` / ``lm_head`` -> ``BeitForMaskedImageModeling`` keys."""
    head, unknown = _apply(head_state, [((t,), hs) for t, hs in BEIT_MIM_HEAD])
    if unknown:
        raise ConversionError("BEiT head to transformers", unknown=unknown)
    return {**beit_to_transformers(encoder_state, prefix="beit."), **head}


def beit_config(vit: nn.Module, **overrides) -> BeitConfig:
    """The ``BeitConfig`` of a timm ``Beit`` with a shared relative position bias (BEiT's pretraining encoder):
    sizes, ``layer_norm_eps`` of its final norm, exact GELU, layer scale when its blocks have one."""
    block = vit.blocks[0]
    act = block.mlp.act
    if not (isinstance(act, nn.GELU) and act.approximate == "none") or len(set(vit.patch_embed.patch_size)) != 1:
        raise ValueError("transformers' Beit needs exact GELU and square patches")
    if block.attn.relative_position_bias_table is not None:
        raise ValueError("sslhub exports a Beit with one shared relative position bias, not one per block")
    fields = {
        "hidden_size": vit.embed_dim,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "layer_norm_eps": vit.norm.eps,
        "image_size": vit.patch_embed.img_size[0],
        "patch_size": vit.patch_embed.patch_size[0],
        "num_channels": vit.patch_embed.proj.in_channels,
        "use_absolute_position_embeddings": vit.pos_embed is not None,
        "use_relative_position_bias": False,
        "use_shared_relative_position_bias": vit.rel_pos_bias is not None,
        "layer_scale_init_value": 0.1 if block.gamma_1 is not None else 0.0,  # only decides that lambda_1/2 exist
    }
    return BeitConfig(**{**fields, **overrides})


# ---- ResNet (export only) ---------------------------------------------------------------------------------------

# timm ``ResNet`` (timm/models/resnet.py) vs transformers ``ResNetModel`` (resnet/modeling_resnet.py): the stem's conv
# and BatchNorm, and per block its k-th conv / bn as ``layer.{k-1}`` and its ``downsample`` as ``shortcut``; timm's
# ``layer{s}.{i}`` is ``encoder.stages.{s-1}.layers.{i}``.
RESNET_STEM: tuple[Row, ...] = (
    ("conv1", ("embedder.embedder.convolution",)),
    ("bn1", ("embedder.embedder.normalization",)),
)
RESNET_BLOCK: tuple[Row, ...] = (
    ("conv1", ("layer.0.convolution",)),
    ("bn1", ("layer.0.normalization",)),
    ("conv2", ("layer.1.convolution",)),
    ("bn2", ("layer.1.normalization",)),
    ("conv3", ("layer.2.convolution",)),  # bottleneck blocks only
    ("bn3", ("layer.2.normalization",)),
    ("downsample.0", ("shortcut.convolution",)),
    ("downsample.1", ("shortcut.normalization",)),
)
_RESNET_STAGES = 4
# The modules of a timm ResNet that transformers' ResNet has too (drop path and DropBlock act in training only).
_RESNET_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Identity, DropPath, DropBlock2d)


def resnet_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``ResNet`` state dict (no classifier) -> ``ResNetModel`` checkpoint keys, BatchNorm statistics included;
    timm keys without a row (squeeze-excitation, a classifier) raise ``ConversionError``."""
    rows = list(RESNET_STEM)
    for stage in range(_RESNET_STAGES):
        timm_stage, hf_stage = f"layer{stage + 1}.", f"encoder.stages.{stage}.layers."
        for i in range(_num_blocks(state_dict, timm_stage + "{i}.")):
            rows += [(f"{timm_stage}{i}.{t}", tuple(f"{hf_stage}{i}.{h}" for h in hs)) for t, hs in RESNET_BLOCK]
    mapped, unknown = _apply(state_dict, [((t,), hs) for t, hs in rows])
    if unknown:
        raise ConversionError("timm ResNet to transformers", unknown=unknown)
    return mapped


def _conv_strides(block: nn.Module) -> list[int]:
    """The strides of a timm ResNet block's convolutions, in order."""
    return [conv.stride[0] for conv in (block.conv1, block.conv2, getattr(block, "conv3", None)) if conv is not None]


def _check_resnet_is_portable(resnet: nn.Module) -> None:
    """transformers' ``ResNetModel``: a 7x7 / 2 stem and 3x3 / 2 max-pool, basic or bottleneck blocks (inner width =
    the output's, or a quarter of it; no groups) striding 1, 2, 2, 2 in the first block of the stages, on the 3x3 conv
    (torchvision's ResNet v1.5), 1x1 conv + BatchNorm shortcuts, PyTorch padding, BatchNorm eps 1e-5 and ReLU."""
    stages = [getattr(resnet, f"layer{stage + 1}") for stage in range(_RESNET_STAGES)]
    blocks = [block for stage in stages for block in stage]
    trunk = [resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool, *stages]
    modules = [m for module in trunk for m in module.modules()]
    kind = type(blocks[0])
    basic = kind is BasicBlock
    ratio = 1 if basic else 4  # output width / inner width
    stem, pool = resnet.conv1, resnet.maxpool
    strides = [_conv_strides(b) for b in blocks]
    expected_strides = [
        (([s, 1] if basic else [1, s, 1]) if i == 0 else [1] * (2 if basic else 3))
        for stage, s in zip(stages, (1, 2, 2, 2), strict=True)
        for i in range(len(stage))
    ]
    needs = {
        "only convolutions, BatchNorm, ReLU and max-pooling (no squeeze-excitation, anti-aliasing, other activations "
        "or TensorFlow padding)": {type(m) for m in modules if not list(m.children())} <= set(_RESNET_LEAVES)
        and all(getattr(b, "se", None) is None for b in blocks),
        "a 7x7 stride-2 stem convolution and a 3x3 stride-2 max-pool (no deep stem)": isinstance(stem, nn.Conv2d)
        and (stem.kernel_size, stem.stride) == ((7, 7), (2, 2))
        and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1),
        "basic or bottleneck blocks of one kind whose inner width is the output's (basic) or a quarter of it": kind
        in (BasicBlock, Bottleneck)
        and all(type(b) is kind for b in blocks)
        and all(
            b.conv1.out_channels == b.conv2.out_channels == (b.conv2 if basic else b.conv3).out_channels // ratio
            for b in blocks
        ),
        "convolutions without groups, dilation or bias, padded k // 2": all(
            c.groups == 1 and c.dilation == (1, 1) and c.bias is None and c.padding == (c.kernel_size[0] // 2,) * 2
            for c in modules
            if isinstance(c, nn.Conv2d)
        ),
        "strides 1, 2, 2, 2 in the first block of the stages, on its 3x3 convolution": strides == expected_strides,
        "shortcuts of a 1x1 convolution and BatchNorm": all(
            b.downsample is None or [type(m) for m in b.downsample] == [nn.Conv2d, nn.BatchNorm2d] for b in blocks
        ),
        "BatchNorm with eps 1e-5": all(
            m.eps == 1e-5 and m.affine and m.track_running_stats for m in modules if isinstance(m, nn.BatchNorm2d)
        ),
    }
    unmet = [need for need, met in needs.items() if not met]
    if unmet:
        raise ValueError(f"transformers' ResNet needs {'; '.join(unmet)}")


def resnet_config(resnet: nn.Module) -> ResNetConfig:
    """The ``ResNetConfig`` of a timm ``ResNet`` that transformers' ``ResNetModel`` computes exactly (see
    ``_check_resnet_is_portable``): channels, stem width, stage widths and depths, basic or bottleneck layers."""
    _check_resnet_is_portable(resnet)
    stages = [getattr(resnet, f"layer{stage + 1}") for stage in range(_RESNET_STAGES)]
    basic = isinstance(stages[0][0], BasicBlock)
    return ResNetConfig(
        num_channels=resnet.conv1.in_channels,
        embedding_size=resnet.conv1.out_channels,
        hidden_sizes=[(stage[-1].conv2 if basic else stage[-1].conv3).out_channels for stage in stages],
        depths=[len(stage) for stage in stages],
        layer_type="basic" if basic else "bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
    )


# ---- a Hugging Face model directory as an sslhub conversion ------------------------------------------------------


def hf_encoder_state(state_dict: Mapping[str, torch.Tensor], config: Mapping, source: str) -> KeyMapping:
    """The encoder of a transformers ViT / ViTMAE / ViTMSN / DINOv2 directory's ``(state_dict, config.json)`` in timm
    names, and the keys it leaves out with their rules (a ViTMAE decoder among them)."""
    model_type = config.get("model_type")
    try:
        if model_type in ("dinov2", "dinov2_with_registers"):
            return dinov2_from_transformers(state_dict, config)
        if model_type in _VIT_TYPES:
            return vit_from_transformers(state_dict, config)
        raise CheckpointError(f"sslhub reads transformers vit, vit_mae, vit_msn and dinov2 models, not {model_type!r}")
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err


def convert_hf_encoder(state_dict: Mapping[str, torch.Tensor], config: Mapping, source: str) -> Converted:
    """A transformers ViT / ViTMAE / ViTMSN / DINOv2 directory as ``Converted``: its encoder alone."""
    backbone, ignored = hf_encoder_state(state_dict, config, source)
    return Converted(f"transformers {config.get('model_type')}", backbone, left_out=left_out_entries(ignored))


def left_out_entries(ignored: dict[str, str]) -> list[str]:
    """``Converted.left_out`` entries: each dropped key with the rule that dropped it."""
    return [f"{key} ({rule})" for key, rule in sorted(ignored.items())]
