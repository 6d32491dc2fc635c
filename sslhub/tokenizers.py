"""Frozen visual tokenizers of masked-image-modelling methods: the encoder of DALL-E's discrete VAE, which BEiT
(arXiv 2106.08254, §2.1) uses to turn an image into a grid of visual tokens, and reading its released weights.

The architecture follows openai/DALL-E ``dall_e/encoder.py`` and ``dall_e/utils.py`` (Ramesh et al., "Zero-Shot
Text-to-Image Generation", arXiv 2102.12092):

- ``Conv2d``: a convolution with odd kernel ``kw`` and padding ``(kw - 1) / 2``, weight ~ N(0, 1 / (n_in kw²)), zero
  bias (parameters ``w`` and ``b`` there, ``weight`` and ``bias`` here);
- ``EncoderBlock(n_in, n_out)``: ``id_path(x) + post_gain · res_path(x)``, ``id_path`` a 1x1 convolution when the
  widths differ (else the identity), ``res_path`` = ReLU, 3x3 conv to n_out / 4, ReLU, 3x3, ReLU, 3x3, ReLU, 1x1 conv
  to n_out, ``post_gain = 1 / n_layers²`` with ``n_layers = groups x blocks_per_group``;
- ``Encoder``: 7x7 input convolution to ``n_hid``, four groups of ``n_blk_per_group`` blocks of widths n_hid, 2 n_hid,
  4 n_hid, 8 n_hid with a 2x2 max-pool after each of the first three, then ReLU and a 1x1 convolution to the
  ``vocab_size`` logits (8192 by default): an (H / 8, W / 8) grid of logits, whose argmax is the token
  (BEiT ``modeling_discrete_vae.py`` ``Dalle_VAE.get_codebook_indices``).
- Input: pixels in [0, 1] mapped by ``map_pixels``, x (1 - 2ε) + ε with ε = 0.1 (``dall_e/utils.py``).

Deviations: ``groups`` is a parameter (DALL-E has four, i.e. 8x downsampling), so that a small preset can tokenize a
small image onto its patch grid (2 groups: 2x); the widths and pools follow the same rule. DALL-E computes its
convolutions in float16 on CUDA (``use_float16``, all but the output one); here they run in the caller's precision.
DALL-E's size checks (n_hid >= 64, vocab >= 512) are not applied, so tests can build small tokenizers.

Weights: a safetensors file of this module (the sslhub format, e.g. a saved random tokenizer), or DALL-E's released
``encoder.pkl`` (https://cdn.openai.com/dall-e/encoder.pkl), which pickles whole ``dall_e.encoder.Encoder`` module
objects. It is read without importing or running the ``dall_e`` package: the DALL-E classes and the torch containers
it pickles become inert stand-ins (``sslhub.conversion.loading``), any other global is refused, and the tensors are
collected by module path (``blocks.group_1.block_1.res_path.conv_1.w`` -> ``...conv_1.weight``).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from sslhub.conversion.loading import (
    CheckpointError,
    StandIn,
    allowed_globals,
    checkpoint_globals,
    load_file_state,
    load_with_stand_ins,
)

LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py logit_laplace_eps
DALLE_ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"
# The classes DALL-E's encoder.pkl pickles: its own (read as stand-ins, never imported) and the torch modules inside.
DALLE_CLASSES = ("dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.utils.Conv2d")
DALLE_PARAMETER_NAMES = {"w": "weight", "b": "bias"}
TORCH_MODULE_CLASSES = (
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's ``map_pixels``: [0, 1] pixels -> [ε, 1 - ε], ε = 0.1 (the tokenizer's input)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class MapPixels:
    """``map_pixels`` as a pipeline step on a float image tensor in [0, 1]."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return map_pixels(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={LOGIT_LAPLACE_EPS})"


class DalleConv2d(nn.Conv2d):
    """``dall_e.utils.Conv2d``: odd kernel, 'same' padding, weight ~ N(0, 1 / (n_in kw²)), zero bias."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        if kw % 2 != 1:
            raise ValueError(f"DALL-E's convolutions have odd kernels, got {kw}")
        super().__init__(n_in, n_out, kw, padding=(kw - 1) // 2)
        nn.init.normal_(self.weight, std=1 / math.sqrt(n_in * kw**2))
        nn.init.zeros_(self.bias)


class DalleEncoderBlock(nn.Module):
    """``dall_e.encoder.EncoderBlock``: ``id_path(x) + res_path(x) / n_layers²``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"an encoder block's width must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", DalleConv2d(n_in, n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", DalleConv2d(n_hid, n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", DalleConv2d(n_hid, n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", DalleConv2d(n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """``dall_e.encoder.Encoder``: images mapped by ``map_pixels`` (B, 3, H, W) -> token logits (B, vocab, H / 2^(g-1),
    W / 2^(g-1)), g = ``groups`` (4: the released tokenizer, 8x downsampling). Module names as DALL-E's."""

    def __init__(
        self,
        hidden: int = 256,
        blocks_per_group: int = 2,
        vocab_size: int = 8192,
        groups: int = 4,
        input_channels: int = 3,
    ):
        super().__init__()
        if groups < 1 or blocks_per_group < 1:
            raise ValueError(
                f"a DALL-E encoder needs at least one group and block, got {groups} and {blocks_per_group}"
            )
        self.vocab_size, self.groups = vocab_size, groups
        n_layers = groups * blocks_per_group
        stages: list[tuple[str, nn.Module]] = [("input", DalleConv2d(input_channels, hidden, 7))]
        width = hidden
        for group in range(groups):
            out = hidden * 2**group
            blocks = [
                (f"block_{i + 1}", DalleEncoderBlock(width if i == 0 else out, out, n_layers))
                for i in range(blocks_per_group)
            ]
            pool = [("pool", nn.MaxPool2d(kernel_size=2))] if group < groups - 1 else []
            stages.append((f"group_{group + 1}", nn.Sequential(OrderedDict(blocks + pool))))
            width = out
        output = nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", DalleConv2d(width, vocab_size, 1))]))
        self.blocks = nn.Sequential(OrderedDict([*stages, ("output", output)]))

    @property
    def downsampling(self) -> int:
        """How many pixels per token along each side."""
        return 2 ** (self.groups - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The visual tokens (B, h w) in row-major order: the argmax of the logits (``get_codebook_indices``)."""
        return self(x).argmax(dim=1).flatten(1)


def _module_tensors(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a pickled module tree (stand-ins keep ``_parameters``, ``_buffers``, ``_modules``)
    by module path."""
    state = {}
    for kind in ("_parameters", "_buffers"):
        state.update({prefix + name: t.detach() for name, t in vars(module).get(kind, {}).items() if t is not None})
    for name, child in vars(module).get("_modules", {}).items():
        if child is not None:
            state.update(_module_tensors(child, f"{prefix}{name}."))
    return state


def _dalle_name(key: str) -> str:
    """DALL-E's ``Conv2d`` parameters ``w`` / ``b`` -> ``weight`` / ``bias``."""
    head, _, leaf = key.rpartition(".")
    return f"{head}.{DALLE_PARAMETER_NAMES.get(leaf, leaf)}"


def read_dalle_encoder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of DALL-E's pickled ``encoder.pkl`` in ``DalleEncoder`` names, read without running code: the
    file may name only torch's weights-only allow-list, the DALL-E encoder classes and the torch modules they hold
    (all read as inert stand-ins); anything else is refused."""
    path = Path(path)
    names = {f"{module}.{name}" for module, name in checkpoint_globals(path)}
    stand_ins = sorted(names - allowed_globals().keys())
    refused = [name for name in stand_ins if name not in DALLE_CLASSES + TORCH_MODULE_CLASSES]
    if refused:
        raise CheckpointError(
            f"{path}: refused to load: the pickle names {', '.join(refused[:10])}, which is neither a tensor type nor "
            "a class of DALL-E's encoder; sslhub never runs code from a tokenizer file"
        )
    encoder = load_with_stand_ins(path, stand_ins)
    if not isinstance(encoder, StandIn) or encoder.stands_for != DALLE_CLASSES[0]:
        found = encoder.stands_for if isinstance(encoder, StandIn) else type(encoder).__name__
        raise CheckpointError(f"{path}: expected a pickled {DALLE_CLASSES[0]} (DALL-E's encoder.pkl), got {found}")
    return {_dalle_name(key): value for key, value in _module_tensors(encoder).items()}


def load_tokenizer_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a ``DalleEncoder`` from ``path``: a state dict in its names (``.safetensors``, sslhub's format,
    or a ``torch.save``d dict), or DALL-E's pickled ``encoder.pkl``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"tokenizer file {str(path)!r} does not exist: download DALL-E's dVAE encoder from {DALLE_ENCODER_URL} "
            "(encoder.pkl) or give a safetensors file of sslhub's DalleEncoder"
        )
    if path.suffix == ".safetensors":
        return load_file_state(path)
    modules = {module for module, _ in checkpoint_globals(path)}
    return read_dalle_encoder(path) if any(m.split(".")[0] == "dall_e" for m in modules) else load_file_state(path)
