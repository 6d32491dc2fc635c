"""Frozen teacher networks whose output tokens are masked-image-modelling targets: the image tower of OpenAI's CLIP,
which DeepMIM-CLIP (arXiv 2303.08817, OliverRensu/DeepMIM ``clip.py``, ``main_pretrain.py``) distils, and reading its
released weights.

The architecture is CLIP's ``VisionTransformer`` (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", arXiv 2103.00020; openai/CLIP ``clip/model.py``) as timm builds it
(``vit_base_patch16_clip_quickgelu_224``): a bias-free patch convolution, class token and learned positions, LayerNorm
before the blocks (``ln_pre``), pre-norm blocks with QuickGELU, LayerNorm eps 1e-5, the final ``ln_post`` and the
bias-free projection ``proj`` to ``output_dim``. DeepMIM applies ``ln_post`` and ``proj`` to every token, not only
the class token, so the teacher returns (B, 1 + L, output_dim). The authors' ``main_pretrain.py`` derives the heads
as width / 64.

Input: the student's images are normalised with the preset's mean and std; the teacher sees them re-normalised with
CLIP's (``engine_pretrain.py``: ``(x * std + mean - clip_mean) / clip_std``).

Weights: a state dict in CLIP's names under ``visual.`` (``torch.save(model.state_dict())`` of ``clip.load``'s model,
as the authors' ``--clip_path``, or OpenCLIP's ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` of
the OpenAI ViT-B/16), mapped to timm's names by timm's ``checkpoint_filter_fn`` (a file of another patch size or
number of positions is refused rather than resampled); or timm's names of the image tower
(timm's ``vit_base_patch16_clip_224.openai`` file, a saved sslhub teacher). OpenAI's own ``ViT-B-16.pt`` is a
TorchScript archive, which sslhub does not run: re-save its state dict.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from sslhub.conversion.loading import CheckpointError, load_file_state

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # clip/clip.py _transform
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENCLIP_VIT_B16_URL = "https://huggingface.co/timm/vit_base_patch16_clip_224.openai"
RANDOM_WEIGHTS = "random"  # a path meaning "keep the random initialisation" (tests, baselines)


class CLIPVisionTeacher(nn.Module):
    """CLIP's image tower returning the projected output of every token (module docstring)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        output_dim: int,
        input_mean: tuple[float, ...],
        input_std: tuple[float, ...],
    ):
        super().__init__()
        if width % 64:
            raise ValueError(f"CLIP's image tower has width / 64 heads: its width {width} is not a multiple of 64")
        self.vit = timm.create_model(
            "vit_base_patch16_clip_quickgelu_224",
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=layers,
            num_heads=width // 64,
            num_classes=output_dim,
        )
        mean, std = torch.tensor(input_mean), torch.tensor(input_std)
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self.register_buffer("input_scale", (std / clip_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean - clip_mean) / clip_std).view(1, 3, 1, 1), persistent=False)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.vit.patch_embed.grid_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` normalised with ``input_mean`` / ``input_std`` -> (B, 1 + L, output_dim), class token first."""
        tokens = self.vit.forward_features(images * self.input_scale + self.input_shift)
        return self.vit.head(tokens)


def load_teacher_state(path: str | os.PathLike, teacher: CLIPVisionTeacher) -> dict[str, torch.Tensor]:
    """The weights of ``teacher.vit`` from ``path`` in timm's names (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"teacher file {str(path)!r} does not exist: DeepMIM-CLIP's teacher is OpenAI's CLIP ViT-B/16, e.g. "
            f"open_clip_model.safetensors from {OPENCLIP_VIT_B16_URL}"
        )
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (as OpenAI's ViT-B-16.pt), whose code sslhub does not run: save its "
            "state dict (torch.save(clip.load('ViT-B/16', jit=False)[0].state_dict(), ...)) or use "
            f"open_clip_model.safetensors from {OPENCLIP_VIT_B16_URL}"
        )
    state = load_file_state(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    if any(key.startswith("visual.") for key in state):
        state = {key: value for key, value in state.items() if key.startswith("visual.")}  # not the text tower
        if "visual.class_embedding" not in state or "visual.conv1.weight" not in state:
            raise CheckpointError(f"{path}: a CLIP file without visual.class_embedding / conv1: not CLIP's image tower")
        _check_grid(path, state, teacher)
        return checkpoint_filter_fn(state, teacher.vit)
    return state


def _check_grid(path: Path, state: dict[str, torch.Tensor], teacher: CLIPVisionTeacher) -> None:
    """The file's patch size and positions must be the teacher's: timm would resample them, a different teacher."""
    patch = tuple(state["visual.conv1.weight"].shape[-2:])
    positions = state["visual.positional_embedding"].shape[0] - 1 if "visual.positional_embedding" in state else None
    grid = teacher.grid_size
    if patch != tuple(teacher.vit.patch_embed.patch_size) or positions != grid[0] * grid[1]:
        raise CheckpointError(
            f"{path}: a CLIP image tower of {patch[0]} px patches and {positions} positions, but the teacher needs the "
            f"student's {teacher.vit.patch_embed.patch_size[0]} px patches on a {grid[0]}x{grid[1]} grid: train at "
            "the teacher's resolution (ViT-B/16: 224 px, 16 px patches)"
        )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
