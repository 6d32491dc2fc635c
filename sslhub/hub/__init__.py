"""The Hugging Face Hub side of sslhub, one module per job: ``cards`` (model cards), ``push`` (publish a checkpoint in
one commit), ``download`` (resolve a Hub repo to a local checkpoint), ``checkpoints`` (what a checkpoint directory
is), ``curves`` (training-curve plots) and ``errors`` (``HubError``: one sentence instead of a traceback)."""

from sslhub.hub.cards import render_model_card, save_model_card
from sslhub.hub.checkpoints import check_checkpoint
from sslhub.hub.download import resolve_checkpoint
from sslhub.hub.errors import HubError
from sslhub.hub.push import push_checkpoint

__all__ = [
    "HubError",
    "check_checkpoint",
    "push_checkpoint",
    "render_model_card",
    "resolve_checkpoint",
    "save_model_card",
]
