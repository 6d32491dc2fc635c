"""Hugging Face models: ``SSLModel`` (released encoder), ``SSLForPreTraining`` (objective) and
``SSLForImageClassification`` (encoder + linear classifier), registered with the Auto* classes."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput

from sslhub.backbones import create_backbone, default_pooling, pool_features
from sslhub.configuration import SSLConfig
from sslhub.hub import push_checkpoint, render_model_card, save_model_card
from sslhub.registry import get_method

CARD_TASK = {"SSLForPreTraining": "pretraining", "SSLForImageClassification": "classification"}


class SSLPreTrainedModel(PreTrainedModel):
    config_class = SSLConfig
    base_model_prefix = "ssl"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        """Weights are initialised by timm and by each method when the modules are built."""

    def model_card(self, training: dict | None = None, results: dict | None = None, **card_fields):
        """The Hub model card (``huggingface_hub.ModelCard``) of this model; ``training`` and ``results`` add the
        pretraining recipe and accuracies, ``card_fields`` the other arguments of ``sslhub.hub.render_model_card``
        (``license``, ``model_id``, ``source``)."""
        return render_model_card(
            method=self.config.method,
            backbone=self.config.backbone,
            task=CARD_TASK.get(type(self).__name__, "features"),
            num_parameters=self.num_parameters(),
            method_info=get_method(self.config.method).card_info(),
            training=training,
            results=results,
            **card_fields,
        )

    def push_to_hub(self, repo_id: str, *, commit_message=None, private=None, token=None, revision=None):
        """Upload ``config.json``, ``model.safetensors`` and this model's sslhub card in one commit
        (``sslhub.hub.push_checkpoint``; returns its ``CommitInfo``). Overrides transformers' ``push_to_hub``, which
        would replace the sslhub card with a generic transformers one (``create_and_tag_model_card``)."""
        with tempfile.TemporaryDirectory() as tmp:
            save_model_card(self.model_card(model_id=repo_id), tmp)
            self.save_pretrained(tmp)
            return push_checkpoint(
                tmp, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
            )

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """``config.json`` + ``model.safetensors`` (transformers), and a ``README.md`` model card if there is none."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not (Path(save_directory) / "README.md").exists():
            save_model_card(self.model_card(), save_directory)


class SSLModel(SSLPreTrainedModel):
    """The released encoder: a timm backbone and its pooling.

    ``last_hidden_state`` is the backbone's ``forward_features`` (feature map, or all tokens after the final norm);
    ``pooler_output`` (B, D) is its global average (CNN) or final-norm class token (ViT) unless the config's
    ``pooling`` says otherwise.
    """

    def __init__(self, config: SSLConfig):
        super().__init__(config)
        self.backbone = create_backbone(config.backbone, **config.backbone_kwargs)
        self.pooling = config.pooling or get_method(config.method).default_pooling or default_pooling(self.backbone)
        self.post_init()

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs):
        hidden = self.backbone.forward_features(pixel_values)
        pooled = pool_features(hidden, self.pooling, getattr(self.backbone, "num_prefix_tokens", 0))
        output = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
        return output if return_dict is not False else output.to_tuple()


@dataclass
class SSLPreTrainingOutput(ModelOutput):
    """``loss``: the method's objective on the given views; ``metrics``: scalars worth logging."""

    loss: torch.Tensor | None = None
    metrics: dict | None = None


class SSLForPreTraining(SSLPreTrainedModel):
    """The full pretraining state: backbone(s), heads, teacher / queue / center buffers of ``config.method``.

    ``model(views).loss`` is the method's objective; ``model.released_model()`` is the ``SSLModel`` the authors
    would release (MoCo: query encoder, DINO: teacher, MAE: encoder).
    """

    def __init__(self, config: SSLConfig):
        super().__init__(config)
        self.method = get_method(config.method)(config)
        self.post_init()

    def forward(self, pixel_values: list[torch.Tensor] | torch.Tensor, **kwargs) -> SSLPreTrainingOutput:
        views = [pixel_values] if torch.is_tensor(pixel_values) else list(pixel_values)
        out = self.method(views, **kwargs)
        return SSLPreTrainingOutput(loss=out.loss, metrics=out.metrics)

    def released_model(self) -> SSLModel:
        """An ``SSLModel`` holding a copy of the released encoder's weights."""
        model = SSLModel(self.config)
        model.backbone.load_state_dict(self.method.released_backbone.state_dict())
        return model.to(next(self.parameters()).device)


class SSLForImageClassification(SSLPreTrainedModel):
    """Encoder + linear classifier on the pooled features; cross-entropy loss when ``labels`` are given."""

    # The loss is a per-batch mean: ``transformers.Trainer`` must divide it by the gradient accumulation steps itself
    # rather than pass ``num_items_in_batch`` (which ``**kwargs`` in ``forward`` would otherwise announce).
    accepts_loss_kwargs = False

    def __init__(self, config: SSLConfig):
        super().__init__(config)
        self.ssl = SSLModel(config)
        self.num_labels = config.num_labels
        self.classifier = nn.Linear(self.ssl.num_features, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The classifier: trunc-normal (std 0.01) weights, zero bias. Done here rather than in ``__init__`` so that
        ``from_pretrained`` of an encoder (``SSLModel``) checkpoint, or with another ``num_labels``, initialises the
        classifier it creates (transformers builds it empty; its ``init`` functions skip tensors that were loaded)."""
        if module is self.classifier:
            init.trunc_normal_(module.weight, std=0.01)
            init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        features = self.ssl(pixel_values).pooler_output
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register("sslhub", SSLConfig)
AutoModel.register(SSLConfig, SSLModel)
AutoModelForImageClassification.register(SSLConfig, SSLForImageClassification)
