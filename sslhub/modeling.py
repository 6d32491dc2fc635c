"""Hugging Face models: ``SSLModel`` (released encoder), ``SSLForPreTraining`` (objective) and
``SSLForImageClassification`` (encoder + linear classifier), registered with the Auto* classes."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
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
from transformers.utils import logging as hf_logging

from sslhub.batch import Batch
from sslhub.configuration import SSLConfig
from sslhub.conversion.keys import preview
from sslhub.conversion.loading import CheckpointError, non_finite
from sslhub.hub.cards import render_model_card, save_model_card
from sslhub.hub.download import HUB_KWARGS
from sslhub.hub.push import push_checkpoint
from sslhub.image_processing import SSLImageProcessor
from sslhub.registry import get_method

CARD_TASK = {"SSLForPreTraining": "pretraining", "SSLForImageClassification": "classification"}


def _restore_unsaved_buffers(model: nn.Module, meta_model: nn.Module, config: SSLConfig) -> None:
    """transformers builds a loaded model on the meta device and fills in what the file holds, so the buffers timm
    computes when it builds a module and does not save (BEiT's relative position index and zero key bias) would be
    left uninitialised: they are copied from a model built the ordinary way, only when the model has any."""
    names = {
        f"{prefix}.{buffer}" if prefix else buffer
        for prefix, module in meta_model.named_modules()
        for buffer in module._non_persistent_buffers_set
    }
    if not names:
        return
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's random state alone
        built = dict(type(model)(config).named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in names:
                buffer.copy_(built[name])


# What a directory saved from each class holds, for the refusal of a task it cannot give.
SAVED_CONTENTS = {"SSLModel": "encoder only", "SSLForImageClassification": "encoder and classifier"}


def _weights_file(path) -> str:
    """The ``model.safetensors`` of a checkpoint directory (or Hub id), for messages."""
    return str(Path(path) / "model.safetensors")


def _unreadable_weights_file(path) -> str:
    """The first ``*.safetensors`` file of a local checkpoint directory that safetensors cannot open (a shard of a
    sharded checkpoint too), for messages; ``_weights_file`` when none is found (a Hub id)."""
    directory = Path(path)
    for file in sorted(directory.glob("*.safetensors")) if directory.is_dir() else ():
        try:
            with safe_open(file, framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    weights.get_slice(key)
        except (SafetensorError, OSError):
            return str(file)
    return _weights_file(path)


def _pretraining_refusal(path, saved: str) -> str:
    """Why ``path`` (saved from ``saved``) gives no ``SSLForPreTraining``, and where one usually is."""
    inner = Path(path) / "pretraining"
    where = (
        str(inner)
        if (inner / "config.json").is_file()
        else "OUT/pretraining of a `sslhub pretrain --output-dir OUT` run"
    )
    return (
        f"{path} holds an {saved} ({SAVED_CONTENTS[saved]}); pretraining needs an SSLForPreTraining directory: {where}"
    )


VERBOSE_ENV = "SSLHUB_VERBOSE"  # "1" (``sslhub --verbose``): transformers' output on sslhub's loads and saves shown


def _no_bar(factory, args: tuple, kwargs: dict):
    """A transformers progress bar that draws nothing (a ``transformers.utils.logging.set_tqdm_hook`` hook)."""
    return factory(*args, **{**kwargs, "disable": True})


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' output hidden for one sslhub load or save, unless ``SSLHUB_VERBOSE=1`` (``sslhub --verbose``):
    its "Loading weights" / "Writing model shards" progress bars (a tqdm hook; the previous hook is restored after)
    and its LOAD REPORT (a warning of up to hundreds of lines with terminal escape codes: ``_check_loaded`` raises one
    sentence for every problem it lists). A log filter, not a higher logger level, which would make transformers warn
    about tensor-parallel plans instead (``verify_tp_plan``). transformers calls outside the block are untouched."""
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return

    def drop_load_report(record: logging.LogRecord) -> bool:  # one filter per block: nested blocks stay filtered
        return "LOAD REPORT" not in str(record.msg)

    report = hf_logging.get_logger("transformers.modeling_utils")
    report.addFilter(drop_load_report)
    previous_hook = hf_logging.set_tqdm_hook(_no_bar)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous_hook)
        report.removeFilter(drop_load_report)


def _check_loaded(model: nn.Module, info: dict, path, dropped: tuple[str, ...] = ()) -> None:
    """``CheckpointError`` for the missing, unexpected (other than ``dropped``, such as the classifier of a
    classification checkpoint loaded as an encoder), wrong-shape and non-finite tensors of a transformers load."""
    missing = [key for key in info["missing_keys"] if not key.startswith(model._new_keys)]
    unexpected = sorted(key for key in info["unexpected_keys"] if not key.startswith(dropped))
    wrong = [
        f"{key}: file {tuple(file)} vs model {tuple(expected)}"
        for key, file, expected in sorted(info["mismatched_keys"])
        if not key.startswith(model._new_keys)
    ]
    if missing or unexpected or wrong:
        problems = "; ".join(
            f"{label} ({len(keys)}): {preview(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(f"{path}: the weights do not match a {type(model).__name__} of this config: {problems}")
    loaded = {key: value for key, value in model.state_dict().items() if key not in info["missing_keys"]}
    bad = non_finite(loaded)
    if bad:
        raise CheckpointError(f"{_weights_file(path)}: {len(bad)} tensor(s) hold NaN or inf values: {preview(bad)}")


class SSLPreTrainedModel(PreTrainedModel):
    config_class = SSLConfig
    base_model_prefix = "ssl"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        """Weights are initialised by timm and by each method when the modules are built."""

    def model_card(self, training: dict | None = None, results: dict | None = None, **card_fields):
        """The Hub model card (``huggingface_hub.ModelCard``) of this model; ``training`` and ``results`` add the
        pretraining recipe and accuracies, ``card_fields`` the other arguments of ``sslhub.hub.render_model_card``
        (``license``, ``model_id``, ``source``, ``baselines``)."""
        return render_model_card(
            method=self.config.method,
            backbone=self.config.backbone,
            task=CARD_TASK.get(type(self).__name__, "features"),
            num_parameters=self.num_parameters(),
            method_info=get_method(self.config.method).card_info(),
            architecture_note=self._released_encoder_module().architecture_note,
            single_timm_model=self._released_encoder_module().timm_model is not None,
            backbone_kwargs=self.config.backbone_kwargs,
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

    def _released_encoder_module(self):
        """The ``Encoder`` module this model holds or releases."""
        raise NotImplementedError

    # Keys a checkpoint of another task may lack because this class creates them (a classifier on an encoder).
    _new_keys: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: a checkpoint missing a tensor of this model (other than the ones
        this class creates, such as a new classifier), holding one this model and the class it was saved from lack,
        one of another shape, or one with NaN / inf values raises ``CheckpointError`` naming them, never loads
        uninitialised weights; so does an unreadable (truncated) ``model.safetensors``, and a pretraining model asked
        of a directory that holds only an encoder. An ``SSLForPreTraining`` checkpoint loads into ``SSLModel`` (and
        ``SSLForImageClassification``) as its released encoder with the trained weights."""
        path = pretrained_model_name_or_path
        config = kwargs.get("config")
        if not isinstance(config, SSLConfig):
            hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
            config = SSLConfig.from_pretrained(path, **hub)
        overrides = {key: kwargs.pop(key) for key in SSLConfig.load_overrides if key in kwargs}
        if overrides:  # ``num_labels=3``: transformers' config attributes given to from_pretrained
            config = config.with_overrides(**overrides)
        saved = (config.architectures or [None])[0]
        if saved == SSLForPreTraining.__name__ and cls is not SSLForPreTraining:
            pretraining = SSLForPreTraining.from_pretrained(path, *args, **{**kwargs, "config": config})
            return cls.from_released_encoder(pretraining.released_model(), config)
        if cls is SSLForPreTraining and saved in SAVED_CONTENTS:
            raise CheckpointError(_pretraining_refusal(path, saved))
        want_info = kwargs.pop("output_loading_info", False)
        # transformers raises a bare RuntimeError on a shape mismatch unless told to ignore it; its loading info then
        # lists the mismatches as (key, file shape, model shape), checked here like the missing keys.
        loading = {**kwargs, "config": config, "ignore_mismatched_sizes": True}
        try:
            with quiet_transformers():
                model, info = super().from_pretrained(path, *args, output_loading_info=True, **loading)
        except SafetensorError as err:
            raise CheckpointError(
                f"{_unreadable_weights_file(path)} is not a readable safetensors file (truncated or corrupt: {err})"
            ) from err
        with torch.device("meta"):  # the requires_grad flags the modules set when built (frozen key encoders,
            fresh = cls(config)  # MoCo v3's patch projection, DINO's weight_g): transformers 5 loads them all True
        trainable = {name: p.requires_grad for name, p in fresh.named_parameters()}
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable.get(name, parameter.requires_grad))
        _restore_unsaved_buffers(model, fresh, config)
        _check_loaded(model, info, path, dropped=getattr(TASK_CLASSES.get(saved), "_new_keys", ()))
        return (model, info) if want_info else model

    @classmethod
    def from_released_encoder(cls, encoder: SSLModel, config: SSLConfig):
        """This class around a released encoder (``SSLModel``); only ``SSLModel`` and ``SSLForImageClassification``
        are built this way."""
        raise TypeError(f"{cls.__name__} cannot be made from an encoder")

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """``config.json`` + ``model.safetensors`` (transformers), the ``preprocessor_config.json`` of the evaluation
        pre-processing (``SSLImageProcessor``), and a ``README.md`` model card if there is none; transformers' progress
        bar hidden (``quiet_transformers``)."""
        with quiet_transformers():
            super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        SSLImageProcessor.from_config(self.config).save_pretrained(save_directory)
        if not (Path(save_directory) / "README.md").exists():
            save_model_card(self.model_card(), save_directory)


class SSLModel(SSLPreTrainedModel):
    """The released encoder of ``config.method``, as the method builds it (``SSLMethod.build_encoder``; by default a
    timm backbone and its pooling).

    ``last_hidden_state`` is the encoder's ``forward_features`` (feature map, or all tokens after the final norm);
    ``pooler_output`` (B, D) its pooled feature, the same pooling the method trains with.
    """

    def __init__(self, config: SSLConfig):
        super().__init__(config)
        self.encoder = get_method(config.method).build_encoder(config)
        self.post_init()

    @classmethod
    def from_released_encoder(cls, encoder: SSLModel, config: SSLConfig) -> SSLModel:
        return encoder

    @property
    def num_features(self) -> int:
        return self.encoder.num_features

    def _released_encoder_module(self):
        return self.encoder

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs):
        hidden = self.encoder.forward_features(pixel_values)
        output = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=self.encoder.pool(hidden))
        return output if return_dict is not False else output.to_tuple()


@dataclass
class SSLPreTrainingOutput(ModelOutput):
    """``loss``: the method's objective on the given batch; ``metrics``: scalars worth logging."""

    loss: torch.Tensor | None = None
    metrics: dict | None = None


class SSLForPreTraining(SSLPreTrainedModel):
    """The full pretraining state: encoder copies, heads, teacher / queue / center buffers and auxiliary networks of
    ``config.method``.

    ``model(batch).loss`` is the method's objective on a ``Batch`` (or a list of views, or one tensor);
    ``model.released_model()`` is the ``SSLModel`` the authors would release (MoCo: query encoder, DINO: teacher,
    MAE: encoder).
    """

    def __init__(self, config: SSLConfig):
        super().__init__(config)
        self.method = get_method(config.method)(config)
        self.post_init()

    def forward(self, pixel_values: Batch | list[torch.Tensor] | torch.Tensor, **extras) -> SSLPreTrainingOutput:
        """``pixel_values``: a ``Batch`` from the method's view recipe, or its views alone; ``extras`` are added to
        the batch's extras (e.g. ``noise=`` for MAE's masking)."""
        out = self.method(Batch.of(pixel_values, **extras))
        return SSLPreTrainingOutput(loss=out.loss, metrics=out.metrics)

    def _released_encoder_module(self):
        return self.method.released_encoder

    def released_model(self) -> SSLModel:
        """An ``SSLModel`` holding a copy of the released encoder's weights."""
        model = SSLModel(self.config)
        model.encoder.load_state_dict(self.method.released_encoder.state_dict())
        return model.to(next(self.parameters()).device)


class SSLForImageClassification(SSLPreTrainedModel):
    """Encoder + linear classifier on the pooled features; cross-entropy loss when ``labels`` are given."""

    # The loss is a per-batch mean: ``transformers.Trainer`` must divide it by the gradient accumulation steps itself
    # rather than pass ``num_items_in_batch`` (which ``**kwargs`` in ``forward`` would otherwise announce).
    accepts_loss_kwargs = False
    _new_keys = ("classifier.",)

    def __init__(self, config: SSLConfig):
        super().__init__(config)
        self.ssl = SSLModel(config)
        self.num_labels = config.num_labels
        self.classifier = nn.Linear(self.ssl.num_features, config.num_labels)
        self.post_init()

    def _released_encoder_module(self):
        return self.ssl.encoder

    @classmethod
    def from_released_encoder(cls, encoder: SSLModel, config: SSLConfig) -> SSLForImageClassification:
        """A classifier for ``config`` (its ``num_labels`` / ``id2label``) on the weights of ``encoder``."""
        model = cls(config)
        model.ssl.load_state_dict(encoder.state_dict())
        return model

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


TASKS: dict[str, type[SSLPreTrainedModel]] = {
    "features": SSLModel,
    "pretraining": SSLForPreTraining,
    "classification": SSLForImageClassification,
}


TASK_CLASSES = {cls.__name__: cls for cls in TASKS.values()}


def model_class(task: str) -> type[SSLPreTrainedModel]:
    """The model class of ``task``: ``"features"``, ``"pretraining"`` or ``"classification"``."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task]


AutoConfig.register("sslhub", SSLConfig)
AutoModel.register(SSLConfig, SSLModel)
AutoModelForImageClassification.register(SSLConfig, SSLForImageClassification)
