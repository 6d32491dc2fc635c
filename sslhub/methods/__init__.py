"""Self-supervised methods; importing this package registers them and their presets."""

from sslhub.methods import dino, dinov2, mae, moco, moco_v3  # noqa: F401
from sslhub.methods.base import MethodHparams, MethodOutput, SSLMethod, TrainingProgress

__all__ = ["MethodHparams", "MethodOutput", "SSLMethod", "TrainingProgress"]
