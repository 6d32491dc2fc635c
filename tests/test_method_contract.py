"""The method contract (sslhub/methods/base.py), checked for every registered method: a new method is tested by adding
its file. Each method is built tiny (its ``tiny_preset`` with ``tiny_overrides``: 32 px, shallow, small heads)."""

import copy
import dataclasses

import pytest
import timm
import torch
import transformers
from helpers import noise_images, recipe_batch

import sslhub
from sslhub.batch import Batch
from sslhub.export import export_timm, export_transformers
from sslhub.methods.base import update_momentum_pairs
from sslhub.probes import LinearRecipe
from sslhub.registry import get_method, get_preset, list_models
from sslhub.training import build_optimizer

METHODS = sslhub.list_methods()
BATCH = 4

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(method: str, task: str = "pretraining", seed: int = 0):
    cls = get_method(method)
    torch.manual_seed(seed)
    return sslhub.create_model(cls.tiny_preset, task=task, **cls.tiny_overrides)


def contract_batch(model) -> Batch:
    """A batch of four noise images made by the method's own view recipe and collation, as the trainer makes it."""
    return recipe_batch(model, noise_images(BATCH, seed=0), [0, 1, 0, 1])


def seeded_loss(method, batch: Batch, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return method(batch).loss


@pytest.fixture(scope="module", params=METHODS)
def method_name(request):
    return request.param


def test_every_method_has_a_32px_preset_and_a_tiny_configuration(method_name):
    cls = get_method(method_name)
    assert cls.tiny_preset in list_models("*_32px") and get_preset(cls.tiny_preset).method == method_name
    assert cls.paper and cls.arxiv and cls.citation and cls.released


def test_every_hyperparameter_has_help_and_the_defaults_validate(method_name):
    cls = get_method(method_name)
    assert [name for name, text in cls.hparam_help().items() if not text] == []
    defaults = cls.validate_hparams({})
    assert set(defaults) == {field.name for field in dataclasses.fields(cls.Hparams)}


def test_linear_recipe_and_evaluation_preprocessing_are_declared(method_name):
    cls = get_method(method_name)
    assert isinstance(cls.get_linear_recipe(), LinearRecipe)
    config = tiny(method_name, "features").config
    pixels = cls.eval_transform(config)(noise_images(1, 50, seed=0)[0])
    assert pixels.shape == (3, config.image_size, config.image_size) and pixels.dtype == torch.float32


def test_view_recipe_batch_runs_forward_and_backward(method_name):
    model = tiny(method_name).train()
    batch = contract_batch(model)
    assert len(batch) == BATCH and batch.index.tolist() == list(range(BATCH)) and batch.labels.tolist() == [0, 1, 0, 1]
    loss = model(batch).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = [p for group in model.method.param_groups() for p in group["params"]]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    frozen = [p for network in model.method.auxiliary_networks().values() for p in network.parameters()]
    assert all(p.grad is None for p in frozen)


def test_one_optimisation_step_lowers_the_loss_on_a_fixed_batch(method_name):
    """One step of the method's own optimizer on a fixed batch lowers the loss measured with the state the step
    started from (queue, center, teacher, masks and random draws fixed): the gradient points the right way."""
    model = tiny(method_name)
    method = model.method.train()
    batch = contract_batch(model)
    start = copy.deepcopy(method)
    # Adam's first step moves every weight by about lr whatever its gradient: 1e-4 overshoots on 4 images (MoCo v3)
    lr = 0.05 if method.hparams.optimizer in ("lars", "larc") else 1e-3 if method.hparams.optimizer == "sgd" else 1e-5
    optimizer = build_optimizer(method, lr)

    def measure() -> float:
        probe = copy.deepcopy(start)
        trained = {name: p for name, p in method.named_parameters() if p.requires_grad}
        probe.load_state_dict({**probe.state_dict(), **{name: p.detach() for name, p in trained.items()}})
        with torch.no_grad():
            return seeded_loss(probe, batch).item()

    before = measure()
    seeded_loss(method, batch).backward()
    optimizer.step()
    assert measure() < before


def test_pretraining_save_and_load_is_exact(method_name, tmp_path):
    model = tiny(method_name)
    model.save_pretrained(tmp_path)
    loaded = sslhub.from_pretrained(tmp_path)
    assert type(loaded) is sslhub.SSLForPreTraining
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # key encoders, teachers ...
    assert {name for name, p in loaded.named_parameters() if not p.requires_grad} == frozen
    batch = contract_batch(model)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(seeded_loss(loaded.method, batch), seeded_loss(model.method, batch))


def test_released_encoder_round_trips_through_automodel_and_the_pretraining_checkpoint(method_name, tmp_path):
    """``AutoModel`` loads the released encoder from its own checkpoint and from the pretraining checkpoint, with the
    trained weights (never a fresh initialisation)."""
    model = tiny(method_name)
    with torch.no_grad():  # weights a fresh initialisation could not have
        for tensor in model.method.released_encoder.parameters():
            tensor.add_(0.01 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
    released = model.released_model().eval()
    model.save_pretrained(tmp_path / "pretraining")
    released.save_pretrained(tmp_path / "encoder")
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        expected = released(pixels)
        for directory in ("encoder", "pretraining"):
            loaded = transformers.AutoModel.from_pretrained(tmp_path / directory).eval()
            assert type(loaded) is sslhub.SSLModel, directory
            output = loaded(pixels)
            torch.testing.assert_close(output.pooler_output, expected.pooler_output, msg=directory)
            torch.testing.assert_close(output.last_hidden_state, expected.last_hidden_state, msg=directory)
    assert expected.pooler_output.shape == (2, released.num_features)


def test_momentum_pairs_match_in_shape_and_follow_the_ema(method_name):
    method = tiny(method_name).method
    pairs = method.momentum_pairs()
    if not pairs:
        pytest.skip(f"{method_name} has no momentum encoder")
    with torch.no_grad():
        for online, _ in pairs:
            for p in online.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    before = [
        [(p.detach().clone(), q.detach().clone()) for p, q in zip(o.parameters(), t.parameters(), strict=True)]
        for o, t in pairs
    ]
    update_momentum_pairs(pairs, 0.75)
    for (_, target), pair_before in zip(pairs, before, strict=True):
        for q, (p0, q0) in zip(target.parameters(), pair_before, strict=True):
            torch.testing.assert_close(q, 0.75 * q0 + 0.25 * p0)
        assert all(not p.requires_grad for p in target.parameters())


def test_to_timm_and_exports_work_or_refuse_in_one_sentence(method_name, tmp_path):
    encoder = tiny(method_name, "features").eval()
    config = encoder.config
    if encoder.encoder.timm_model is not None:
        timm_model = sslhub.to_timm(encoder)
        rebuilt = timm.create_model(config.backbone, num_classes=0, global_pool="", **config.backbone_kwargs)
        rebuilt.load_state_dict(timm_model.state_dict())
    else:  # several timm models (CMC's two branches): no single one to hand out
        with pytest.raises(TypeError, match="not a single timm model") as refusal:
            sslhub.to_timm(encoder)
        assert "\n" not in str(refusal.value) and not encoder.encoder.exports_to_timm
    if encoder.encoder.exports_to_timm:
        export_timm(encoder, tmp_path / "timm")
        assert (tmp_path / "timm" / "model.safetensors").is_file()
    else:  # an encoder that computes more than its timm backbone (patch grids, extra layers) refuses plainly
        with pytest.raises(ValueError, match="no timm export") as refusal:
            export_timm(encoder, tmp_path / "timm")
        assert "\n" not in str(refusal.value) and not (tmp_path / "timm").exists()
    for model, name in ((encoder, "encoder"), (tiny(method_name), "pretraining")):
        try:
            export_transformers(model, tmp_path / name)
        except ValueError as error:  # naming the timm export where there is one
            assert ("--format timm" in str(error)) == encoder.encoder.exports_to_timm and "\n" not in str(error)
        else:
            assert (tmp_path / name / "config.json").is_file()
