"""Reconstruction targets computed from the input image by fixed operations (no learned parameters)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The Sobel kernel of LocalMIM's ``HOGLayer``; its transpose gives the second gradient channel.
SOBEL = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


@torch.no_grad()
def hog_features(images: torch.Tensor, cell_size: int, nbins: int = 9) -> torch.Tensor:
    """Histograms of oriented gradients as LocalMIM's ``HOGLayer`` (Wang et al., arXiv 2303.05251,
    ``models_mim.py``; the HOG target of MaskFeat, arXiv 2112.09133, without its Gaussian window), for every image
    channel separately.

    Gradients ``g = (S * I, Sᵀ * I)`` with the Sobel kernel ``S`` (cross-correlation, reflect padding); the pixel's
    orientation ``θ = atan2(g_0, g_1)`` falls in bin ``floor(θ nbins / π) mod nbins`` (θ and θ ± π share a bin) and
    the pixel votes its magnitude ``|g|`` there; the votes are averaged over ``cell_size`` x ``cell_size`` cells and
    each cell's histogram is L2-normalised. (B, C, H, W) -> (B, C * nbins, H / cell_size, W / cell_size), channel-major
    (the bins of channel 0 first).
    """
    batch, channels, height, width = images.shape
    if height % cell_size or width % cell_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the HOG cell size {cell_size}")
    kernel = torch.stack([SOBEL, SOBEL.t()]).unsqueeze(1).to(images)
    planes = F.pad(images.reshape(batch * channels, 1, height, width), (1, 1, 1, 1), mode="reflect")
    gradients = F.conv2d(planes, kernel)
    magnitude = gradients.norm(dim=1, keepdim=True)
    orientation = torch.atan2(gradients[:, 0], gradients[:, 1])
    bins = torch.floor(orientation / math.pi * nbins).long().remainder(nbins)
    votes = torch.zeros(batch * channels, nbins, height, width, dtype=images.dtype, device=images.device)
    votes.scatter_(1, bins.unsqueeze(1), magnitude)
    histograms = F.normalize(F.avg_pool2d(votes, cell_size), dim=1)
    return histograms.reshape(batch, channels * nbins, height // cell_size, width // cell_size)
