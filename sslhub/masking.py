"""Patch utilities for masked image modelling: patchify, random and block masking, sin-cos position embeddings."""

from __future__ import annotations

import math

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels ordered (p, p, C) as MAE's ``patchify``."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch_size}")
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, h * w, patch_size**2 * channels)


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise (MAE, arXiv 2111.06377, §3 "Masking").

    Returns ``(visible (B, L_keep, D), mask (B, L) with 1 = masked, ids_restore (B, L))``; the visible tokens keep
    the order of ``argsort(noise)``, and ``ids_restore`` undoes that shuffle.
    """
    batch, length, dim = tokens.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :len_keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.reshape(-1, 1).double() * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_position_embedding(dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (L, dim) as MAE's ``get_2d_sincos_pos_embed``.

    The first half of the channels encodes the column index, the second half the row index; with ``cls_token`` a
    zero row is prepended.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in [low, high], both included (``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class BlockMaskingGenerator:
    """BEiT's block-wise masking (arXiv 2106.08254, Algorithm 1) as DINOv2's ``data/masking.py`` ``MaskingGenerator``.

    ``generator(k)`` -> (H, W) bool mask with at most ``k`` patches set: rectangles of area ~U[min_num_patches,
    min(k - masked, max_num_patches)] and aspect ratio log-uniform in [min_aspect, 1/min_aspect], each placed
    uniformly at random and kept only if it adds between 1 and that many new patches (10 tries per rectangle);
    stops at ``k`` or when a rectangle cannot be placed.
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.height, self.width = grid_size
        self.max_num_patches = self.height * self.width if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def _add_block(self, mask: torch.Tensor, max_mask_patches: float, generator: torch.Generator | None) -> int:
        for _ in range(10):
            target_area = _uniform(self.min_num_patches, max_mask_patches, generator)
            aspect_ratio = math.exp(_uniform(*self.log_aspect_ratio, generator))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top, left = _randint(0, self.height - h, generator), _randint(0, self.width - w, generator)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), generator)
            if added == 0:
                break
            count += added
        return mask


def sample_ibot_masks(
    num_images: int,
    mask_generator: BlockMaskingGenerator,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masks of a batch of global crops, as DINOv2's ``collate_data_and_cast``: ``int(num_images * probability)``
    images are masked, the i-th of them with a ratio drawn uniformly in the i-th of as many equal slices of
    ``ratio_min_max`` (``int(L * ratio)`` patches, block-wise), the others not at all; the masks are then shuffled
    over the images. Returns (num_images, L) bool, L = H * W patches in row-major order.
    """
    num_masked = int(num_images * probability)
    bounds = torch.linspace(*ratio_min_max, num_masked + 1).tolist()
    num_patches = mask_generator.height * mask_generator.width
    masks = [
        mask_generator(int(num_patches * _uniform(bounds[i], bounds[i + 1], generator)), generator)
        for i in range(num_masked)
    ]
    masks += [mask_generator(0)] * (num_images - num_masked)
    order = torch.randperm(num_images, generator=generator)
    return torch.stack(masks).flatten(1)[order]
