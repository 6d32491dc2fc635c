"""Helpers shared by the test modules (``tests/`` is on ``sys.path`` under pytest's default import mode)."""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sslhub
from sslhub.data import ImageDataset, ViewDataset

ROOT = Path(__file__).resolve().parent.parent


def zoo_script():
    """``conversion/convert_official.py`` (a script, not a package module) as a module."""
    spec = importlib.util.spec_from_file_location("convert_official", ROOT / "conversion" / "convert_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(preset, **overrides):
    """A seeded ``SSLForPreTraining`` of ``preset``."""
    torch.manual_seed(0)
    return sslhub.create_model(preset, task="pretraining", **overrides)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| (Frobenius norms): the conversions' tolerance is 1e-4 of it."""
    return ((actual - expected).norm() / expected.norm()).item()


def pretrain_silently(model, output_dir, **arguments):
    """``sslhub.training.pretrain`` of ``model`` into ``output_dir`` without logging, progress bars, intermediate
    checkpoints or loader workers (tests/test_loading.py tests those); ``arguments``: the other ``PretrainArguments``
    (epochs, batch_size, data, ...)."""
    from sslhub.training import PretrainArguments, pretrain

    arguments = {"log_with": None, "progress": False, "checkpoint_every": 10**6, "num_workers": 0, **arguments}
    return pretrain(PretrainArguments(model=model, output_dir=str(output_dir), **arguments))


def tiny_args(data, output_dir, **overrides):
    """``PretrainArguments`` of a tiny MoCo v2 run (32 px, batch 16, a 64-key queue, 2 epochs) without logging,
    progress bars or loader workers; ``overrides``: any other arguments."""
    from sslhub.training import PretrainArguments

    values = dict(
        model="moco_v2_resnet18_32px",
        data=str(data),
        output_dir=str(output_dir),
        epochs=2,
        batch_size=16,
        overrides={"queue_size": 64},
        log_with=None,
        progress=False,
        knn_k=5,
        num_workers=0,
    )
    return PretrainArguments(**{**values, **overrides})


def tensorboard_runs(directory):
    """{run directory: its loaded ``EventAccumulator``} for the TensorBoard runs (directories holding event files)
    under ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = directory.rglob("events.out.tfevents.*")
    runs = {run: EventAccumulator(str(run)) for run in {path.parent for path in events}}
    for accumulator in runs.values():
        accumulator.Reload()
    return runs


def assert_one_tensorboard_run(output_dir, name, scalars):
    """The run's logs are one TensorBoard run, ``output_dir / name``, holding ``scalars`` and the hyperparameters,
    with no other folder (Accelerate's time-stamped hparams.yml) in it."""
    run = output_dir / name
    runs = tensorboard_runs(output_dir)
    assert list(runs) == [run]
    assert set(scalars) <= set(runs[run].Tags()["scalars"])
    assert "_hparams_/experiment" in runs[run].PluginTagToContent("hparams")
    assert all(path.name.startswith("events.out.tfevents.") for path in run.iterdir())


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


def random_batch_norm_statistics(model, seed=1):
    """Seeded running means and variances in every BatchNorm of ``model`` (so that a comparison in evaluation mode
    depends on them); returns ``model`` in evaluation mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def assert_params_equal(actual, expected):
    """Two state dicts with the same keys and values."""
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def assert_released_is(model, released, other):
    """``model`` releases the module ``released`` (not ``other``, perturbed to differ from it beforehand)."""
    assert model.method.released_encoder is released
    released_state = model.released_model().encoder.state_dict()
    assert_params_equal(released_state, released.state_dict())
    other_state = other.state_dict()
    assert any(not torch.equal(value, other_state[name]) for name, value in released_state.items())


def noise_images(count, size=40, seed=1):
    """``count`` RGB PIL images of uniform noise, ``size`` px square."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def recipe_batch(model, images, labels=None):
    """A batch of ``images`` made by the model's own view recipe and collation, as the trainer makes it."""
    recipe = model.method.view_recipe()
    dataset = ViewDataset(ImageDataset(images, labels=labels or [0] * len(images)), recipe, seed=0)
    return recipe.collate([dataset[i] for i in range(len(images))])
