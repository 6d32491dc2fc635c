"""Helpers shared by the test modules (``tests/`` is on ``sys.path`` under pytest's default import mode)."""

import torch

import sslhub


def build(preset, **overrides):
    """A seeded ``SSLForPreTraining`` of ``preset``."""
    torch.manual_seed(0)
    return sslhub.create_model(preset, task="pretraining", **overrides)
