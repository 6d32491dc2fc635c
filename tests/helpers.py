"""Helpers shared by the test modules (``tests/`` is on ``sys.path`` under pytest's default import mode)."""

import torch

import sslhub


def build(preset, **overrides):
    """A seeded ``SSLForPreTraining`` of ``preset``."""
    torch.manual_seed(0)
    return sslhub.create_model(preset, task="pretraining", **overrides)


def params(module, prefixes):
    """Copies of ``module``'s parameters whose names start with ``prefixes``."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith(prefixes)}


@torch.no_grad()
def perturb_(module, prefixes, scale=0.05, seed=1):
    """Add seeded noise to the parameters whose names start with ``prefixes`` (so copies no longer coincide)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.startswith(prefixes):
            p.add_(scale * torch.randn(p.shape, generator=gen))
