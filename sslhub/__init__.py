"""sslhub: self-supervised vision models as Hugging Face models, pretrained with Accelerate."""

from sslhub import evaluation, methods  # noqa: F401  (importing the methods registers them)
from sslhub.configuration import SSLConfig
from sslhub.export import export_timm, export_transformers
from sslhub.factory import create_model, create_transform, from_pretrained, to_timm
from sslhub.image_processing import SSLImageProcessor
from sslhub.modeling import SSLForImageClassification, SSLForPreTraining, SSLModel, SSLPreTrainedModel
from sslhub.registry import list_methods, list_models, list_pretrained

__version__ = "0.2.0"

__all__ = [
    "SSLConfig",
    "SSLForImageClassification",
    "SSLForPreTraining",
    "SSLImageProcessor",
    "SSLModel",
    "SSLPreTrainedModel",
    "create_model",
    "create_transform",
    "evaluation",
    "export_timm",
    "export_transformers",
    "from_pretrained",
    "list_methods",
    "list_models",
    "list_pretrained",
    "to_timm",
]
