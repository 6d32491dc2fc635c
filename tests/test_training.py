"""The Accelerate pretraining loop: outputs, exact resume, checkpoints, the CLI and the built-in demo."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_one_tensorboard_run, pretrain_silently, tiny_args
from PIL import Image
from sklearn.datasets import load_digits

import sslhub
from sslhub.arguments import dataclass_values
from sslhub.checkpointing import checkpoint_dirs
from sslhub.cli import PRETRAIN_EXCLUDED, build_parser
from sslhub.cli import main as cli_main
from sslhub.methods import TrainingProgress
from sslhub.methods.colorization import colorize
from sslhub.methods.counting import CountingHparams
from sslhub.methods.dinov2 import DINOv2Hparams
from sslhub.methods.moco import MoCoV2Hparams
from sslhub.training import (
    DEFAULT_MODEL,
    MAX_WARMUP_FRACTION,
    PretrainArguments,
    Pretrainer,
    learning_rate_at,
    pretrain,
    scaled_learning_rate,
    warmup_steps,
)
from sslhub.transforms import lab_to_rgb, rgb_to_lab

SHALLOW = {"backbone_kwargs": {"depth": 2}}  # 2-block ViTs keep the tests fast


def test_learning_rate_schedule_is_warmup_then_cosine():
    peak, minimum = 0.5, 0.01
    assert learning_rate_at(0, 100, 10, peak, minimum) == 0.0
    assert learning_rate_at(5, 100, 10, peak, minimum) == pytest.approx(0.25)
    assert learning_rate_at(10, 100, 10, peak, minimum) == pytest.approx(peak)
    assert learning_rate_at(55, 100, 10, peak, minimum) == pytest.approx(minimum + (peak - minimum) / 2)
    assert learning_rate_at(100, 100, 10, peak, minimum) == pytest.approx(minimum)


def test_warmup_start_and_final_lr_ratio_and_fixed_lr_groups(image_folder, tmp_path):
    """SwAV / Barlow Twins: warm-up from ``warmup_start_ratio`` x peak, cosine down to ``min_lr_ratio`` x peak (the
    absolute ``min_lr`` when larger); SimSiam: a ``fixed_lr`` group stays at the peak all along."""
    assert learning_rate_at(0, 100, 10, 0.5, 0.01, start=0.1) == pytest.approx(0.1)
    assert learning_rate_at(5, 100, 10, 0.5, 0.01, start=0.1) == pytest.approx(0.3)
    overrides = {"queue_size": 64, "warmup_epochs": 1, "warmup_start_ratio": 0.25, "min_lr_ratio": 0.001}
    trainer = Pretrainer(tiny_args(image_folder, tmp_path, epochs=4, knn_every=0, overrides=overrides))
    peak, total = trainer.peak_lr, trainer.total_steps
    assert trainer.learning_rate(TrainingProgress(0, total, 3)) == pytest.approx(0.25 * peak)
    assert trainer.learning_rate(TrainingProgress(total, total, 3)) == pytest.approx(0.001 * peak)
    trainer.hparams.min_lr = 0.01 * peak
    assert trainer.learning_rate(TrainingProgress(total, total, 3)) == pytest.approx(0.01 * peak)
    trainer.optimizer.param_groups[0]["fixed_lr"] = True
    trainer.set_schedules(TrainingProgress(total - 1, total, 3))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak, rel=1e-12)


def test_warmup_never_exceeds_a_quarter_of_the_run(image_folder, tmp_path):
    """A warm-up longer than the run would keep the learning rate below its peak for the whole run: it is capped at
    ``MAX_WARMUP_FRACTION`` (25 %) of the optimizer steps."""
    assert MAX_WARMUP_FRACTION == 0.25
    assert warmup_steps(10, 4, 8) == 2  # 10 warm-up epochs on a 2-epoch run of 4 steps an epoch
    assert warmup_steps(10, 3, 6) == 1
    assert warmup_steps(1, 4, 40) == 4 and warmup_steps(2.5, 4, 100) == 10  # within the cap: the epochs asked for
    assert warmup_steps(0, 4, 40) == 0
    for warmup_epochs in (0, 0.5, 1, 2, 5, 10, 40):
        for steps_per_epoch in (1, 3, 4, 100):
            for epochs in (1, 2, 3, 10, 100):
                total = epochs * steps_per_epoch
                steps = warmup_steps(warmup_epochs, steps_per_epoch, total)
                assert 0 <= steps <= MAX_WARMUP_FRACTION * total and steps <= round(warmup_epochs * steps_per_epoch)
    trainer = Pretrainer(tiny_args(image_folder, tmp_path, warmup_epochs=10, knn_every=0))
    assert trainer.hparams.warmup_epochs == 10
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.warmup_steps) == (3, 6, 1)
    lrs = [trainer.learning_rate(TrainingProgress(step, 6, 3)) for step in range(6)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(trainer.peak_lr) and trainer.peak_lr == pytest.approx(0.03 / 16)


def test_step_schedule_divides_lr_by_10_at_each_milestone_epoch(image_folder, tmp_path):
    """MoCo v1 (``main_moco.py`` without ``--cos``): lr = base x 0.1^(milestones reached), set per epoch; with a
    warm-up, the per-step linear ramp comes first."""
    overrides = {"queue_size": 64, "image_size": 32, "lr_milestones": [1, 3]}
    args = tiny_args(image_folder, tmp_path, model="moco_v1_resnet18", epochs=4, knn_every=0, overrides=overrides)
    trainer = Pretrainer(args)
    peak = 0.03 * 16 / 256
    for step, expected in ((0, peak), (2, peak), (3, peak / 10), (8, peak / 10), (9, peak / 100), (11, peak / 100)):
        trainer.set_schedules(TrainingProgress(step, trainer.total_steps, trainer.steps_per_epoch))  # 3 steps/epoch
        assert [group["lr"] for group in trainer.optimizer.param_groups] == [pytest.approx(expected, rel=1e-12)]
    # SimMIM's MultiStepLRScheduler: a per-step linear warm-up from warmup_start_ratio x peak first
    warm = Pretrainer(tiny_args(image_folder, tmp_path / "warm", model="moco_v1_resnet18", epochs=4, knn_every=0,
                                overrides={**overrides, "warmup_epochs": 1, "warmup_start_ratio": 0.1}))  # fmt: skip
    assert warm.warmup_steps == 3
    for step, expected in ((0, 0.1 * peak), (1, 0.4 * peak), (2, 0.7 * peak), (3, peak / 10), (9, peak / 100)):
        warm.set_schedules(TrainingProgress(step, warm.total_steps, warm.steps_per_epoch))
        assert [group["lr"] for group in warm.optimizer.param_groups] == [pytest.approx(expected, rel=1e-12)]
    with pytest.raises(ValueError, match="no warm-up"):
        sslhub.create_model("simsiam_resnet18_32px", warmup_epochs=1)


def test_exponential_schedule_decays_lr_every_lr_decay_images_images(image_folder, tmp_path):
    """Counting's "drop it by a factor of 0.9 every 10K iterations", counted in images: lr = peak x factor^floor(step
    x images per step / lr_decay_images)."""
    overrides = {"queue_size": 64, "lr_schedule": "exponential", "lr_decay_factor": 0.5, "lr_decay_images": 40}
    trainer = Pretrainer(tiny_args(image_folder, tmp_path, epochs=4, knn_every=0, overrides=overrides))
    peak = trainer.peak_lr
    for step, expected in ((0, peak), (2, peak), (3, peak / 2), (4, peak / 2), (5, peak / 4), (10, peak / 16)):
        trainer.set_schedules(TrainingProgress(step, trainer.total_steps, trainer.steps_per_epoch))  # 16 per step
        assert [group["lr"] for group in trainer.optimizer.param_groups] == [pytest.approx(expected, rel=1e-12)]
    counting = CountingHparams()
    assert (counting.lr_schedule, counting.lr_decay_factor, counting.lr_decay_images) == ("exponential", 0.9, 10240000)
    with pytest.raises(ValueError, match="lr_decay_images > 0"):
        sslhub.create_model("moco_v2_resnet18_32px", lr_schedule="exponential")


def test_lr_scaling_rules_and_group_lr_scale(image_folder, tmp_path):
    """Linear scaling (Goyal et al.) for MoCo / DINO / MAE, square root for DINOv2 (lr 4e-3 x sqrt(batch / 1024));
    a group's ``lr_scale`` (layer-wise decay) multiplies the scheduled lr."""
    moco = sslhub.create_model("moco_v2_resnet18_32px").config.method_kwargs
    assert scaled_learning_rate(MoCoV2Hparams(**moco), 512) == pytest.approx(0.03 * 2)
    assert scaled_learning_rate(DINOv2Hparams(), 256) == pytest.approx(4e-3 * 0.5)
    args = tiny_args(image_folder, tmp_path, model="dinov2_vit_tiny_patch4_32px", knn_every=0, overrides=SHALLOW)
    trainer = Pretrainer(args)
    assert trainer.peak_lr == pytest.approx(4e-3 * (16 / 1024) ** 0.5)
    progress = TrainingProgress(trainer.warmup_steps, trainer.total_steps, trainer.steps_per_epoch)
    trainer.set_schedules(progress)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(trainer.peak_lr * group["lr_scale"], rel=1e-12)
    assert len({group["lr"] for group in trainer.optimizer.param_groups}) > 1


def test_pretrain_saves_loadable_encoder_and_pretraining_model(image_folder, tmp_path):
    result = pretrain(tiny_args(image_folder, tmp_path))
    assert result.steps == 2 * (48 // 16)
    assert len(result.losses) == result.steps and all(np.isfinite(result.losses))
    assert result.knn_random_init is not None and result.knn_final is not None
    encoder = sslhub.from_pretrained(tmp_path)
    assert type(encoder) is sslhub.SSLModel
    import transformers

    assert type(transformers.AutoModel.from_pretrained(tmp_path)) is sslhub.SSLModel
    full = sslhub.from_pretrained(tmp_path / "pretraining")
    assert type(full) is sslhub.SSLForPreTraining
    released = full.method.released_encoder.state_dict()
    assert encoder.encoder.state_dict().keys() == released.keys()
    for key, value in encoder.encoder.state_dict().items():
        assert torch.equal(value, released[key]), key
    card = (tmp_path / "README.md").read_text()
    for expected in (
        "moco_v2",
        "resnet18",
        "2003.04297",
        "queue_size",
        "knn_top1_k5",
        f"{100 * result.knn_final:.2f}%",
    ):
        assert expected in card, expected
    assert not list(tmp_path.glob(".partial*")) and not list((tmp_path / "checkpoints").glob(".partial*"))
    assert not list(tmp_path.rglob("*.bin")) or all("checkpoints" in str(p) for p in tmp_path.rglob("*.bin"))


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("moco_v2_resnet18_32px", {"queue_size": 64}),
        (
            "dino_vit_tiny_patch4_32px",
            {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops_number": 2, **SHALLOW},
        ),
        ("mae_vit_tiny_patch4_32px", {"decoder_depth": 1, **SHALLOW}),
    ],
)
def test_resume_continues_exactly(image_folder, tmp_path, model, overrides):
    """A run killed after step 4 and resumed gives the same losses as the uninterrupted run."""
    common = dict(model=model, overrides=overrides, checkpoint_every=2, knn_every=1)
    full = pretrain(tiny_args(image_folder, tmp_path / "full", **common))
    first = pretrain(tiny_args(image_folder, tmp_path / "cut", max_steps=4, **common))
    assert [int(p.name.split("_")[1]) for p in checkpoint_dirs(tmp_path / "cut")] == [2, 4]
    resumed = pretrain(tiny_args(image_folder, tmp_path / "cut", resume="latest", **common))
    assert first.losses == full.losses[:4]
    assert resumed.losses == full.losses[4:]
    final_full = sslhub.from_pretrained(tmp_path / "full" / "pretraining").state_dict()
    final_resumed = sslhub.from_pretrained(tmp_path / "cut" / "pretraining").state_dict()
    for key in final_full:
        assert torch.equal(final_full[key], final_resumed[key]), key


def test_tensorboard_logs_are_one_run_with_its_scalars_and_hparams(image_folder, tmp_path):
    pretrain(tiny_args(image_folder, tmp_path, epochs=1, max_steps=2, log_every=1, log_with="tensorboard"))
    assert_one_tensorboard_run(tmp_path, "sslhub", ["train/loss", "train/lr"])


def test_gradient_accumulation_and_keep_checkpoints(image_folder, tmp_path):
    result = pretrain(
        tiny_args(
            image_folder,
            tmp_path,
            gradient_accumulation_steps=3,
            checkpoint_every=1,
            keep_checkpoints=1,
            knn_every=0,
            batch_size=8,
        )
    )
    assert result.steps == 2 * (48 // 8 // 3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [f"step_{result.steps:08d}"]
    assert result.knn_history == []


def test_batch_larger_than_data_is_a_clear_error(image_folder, tmp_path):
    with pytest.raises(ValueError, match="48 images, fewer than one batch of 64"):
        pretrain(tiny_args(image_folder, tmp_path, batch_size=64))


def test_cli_list_and_pretrain(image_folder, tmp_path, capsys):
    assert cli_main(["list", "mae_*"]) == 0
    listed = capsys.readouterr().out
    assert "mae_vit_base_patch16_224" in listed and "moco" not in listed
    code = cli_main(
        [
            "pretrain",
            "--model",
            "mae_vit_tiny_patch4_32px",
            "--data",
            str(image_folder),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--output-dir",
            str(tmp_path),
            "--set",
            "decoder_depth=1",
            "--set",
            "mask_ratio=0.5",
            "--set",
            'backbone_kwargs={"depth": 2}',
            "--log-with",
            "none",
            "--no-progress",
            "--knn-k",
            "3",
        ]
    )
    assert code == 0
    assert "kNN top-1 (k=3)" in capsys.readouterr().out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "mae" and config["method_kwargs"]["mask_ratio"] == 0.5
    assert cli_main(["pretrain", "--model", "nope", "--data", str(image_folder), "--output-dir", str(tmp_path)]) == 2
    assert "Unknown model 'nope'" in capsys.readouterr().err


def test_cli_flags_are_the_fields_of_pretrain_arguments(capsys):
    """``sslhub pretrain`` has one flag per ``PretrainArguments`` field with the field's default, except
    ``overrides``, which ``--set KEY=VALUE`` gives."""
    ns = build_parser().parse_args(["pretrain"])
    assert PretrainArguments(**dataclass_values(ns, PretrainArguments, PRETRAIN_EXCLUDED)) == PretrainArguments()
    assert PRETRAIN_EXCLUDED == ("overrides",) and ns.set == []
    ns = build_parser().parse_args(["pretrain", "--epochs", "3", "--log-with", "none", "--no-progress", "--resume"])
    parsed = PretrainArguments(**dataclass_values(ns, PretrainArguments, PRETRAIN_EXCLUDED))
    assert (parsed.epochs, parsed.log_with, parsed.progress, parsed.resume) == (3, None, False, "latest")
    with pytest.raises(SystemExit) as exited:
        cli_main(["pretrain", "--help"])
    help_text = capsys.readouterr().out
    assert exited.value.code == 0
    for field in dataclasses.fields(PretrainArguments):
        flag = "--" + field.name.replace("_", "-")
        assert (flag in help_text) == (field.name not in PRETRAIN_EXCLUDED), field.name
    assert "--set KEY=VALUE" in help_text


def test_builtin_demo_learns(tmp_path):
    """The README's main job, shortened: MoCo v2 on the digits beats the same backbone at random init."""
    result = pretrain(
        PretrainArguments(output_dir=str(tmp_path), epochs=2, batch_size=128, log_with=None, progress=False)
    )
    assert result.knn_final > result.knn_random_init + 0.02


# CMC contrasts the L and ab channels and Colorization predicts ab, and the grey digits have ab = 0: they learn on
# coloured digits (tests/test_cmc.py, below). CPC v2's patch encoder and the dilated ResNet-18s (a 4x4 map) of PixPro
# and Jigsaw Clustering are strong digit features at random init: they have their own bars below.
OWN_LEARNING_TEST = (DEFAULT_MODEL, "cmc_resnet18_32px", "colorization_resnet18_32px", "cpc_v2_resnet18_32px",
                     "jigsaw_clustering_resnet18_32px", "pixpro_resnet18_32px")  # fmt: skip


@pytest.mark.parametrize(
    "preset", [name for name in sslhub.list_models("*_resnet18_32px") if name not in OWN_LEARNING_TEST]
)
def test_every_resnet18_32px_preset_learns_on_the_builtin_digits(preset, tmp_path):
    """Each method's small-image preset, one epoch of 22 steps of 64 images on ``--data builtin``: kNN clearly above
    the same backbone at random initialisation (measured 2026-12-02: +0.40 (SimSiam) to +0.72 (SimCLR v2))."""
    result = pretrain_silently(preset, tmp_path, epochs=1, batch_size=64)
    assert result.knn_final > result.knn_random_init + 0.2


def test_cpc_v2_small_preset_learns_on_the_builtin_digits(tmp_path):
    """Four epochs of ``cpc_v2_resnet18_32px`` on ``--data builtin``. The patch encoder at random init is already a
    good digit feature (kNN 0.750: the mean of 3 x 3 local patch features), far above the other presets' 0.2 - 0.3,
    so the bar is lower than theirs (measured 2026-12-03: 0.750 -> 0.858 after 4 epochs)."""
    result = pretrain_silently("cpc_v2_resnet18_32px", tmp_path, epochs=4, batch_size=64, knn_every=4)
    assert result.knn_final > result.knn_random_init + 0.05


def test_pixpro_small_preset_learns_on_the_builtin_digits(tmp_path):
    """One epoch of ``pixpro_resnet18_32px`` (output stride 8: a 4x4 map) on ``--data builtin``. The dilated ResNet-18
    at random init is already a 0.84 kNN feature, so +0.2 would need more than 1.0; measured 2026-12-04: 0.836 -> 0.939
    (+0.10), pixel loss -0.09 -> -2.09."""
    result = pretrain_silently("pixpro_resnet18_32px", tmp_path, epochs=1, batch_size=64)
    assert result.knn_final > result.knn_random_init + 0.05


def test_jigsaw_clustering_small_preset_learns_on_the_builtin_digits(tmp_path):
    """Three epochs of ``jigsaw_clustering_resnet18_32px`` (output stride 8, as PixPro's: a strong kNN feature at
    random init) on ``--data builtin``, each image seen only as four 16 px tiles in montages of other images' tiles
    (measured 2026-12-04, seeds 0-2: +0.045, +0.072, +0.067)."""
    result = pretrain_silently("jigsaw_clustering_resnet18_32px", tmp_path, epochs=3, batch_size=64, knn_every=3)
    assert result.knn_final > result.knn_random_init + 0.02


def test_beit_small_preset_learns_on_the_builtin_digits(tmp_path):
    """Two epochs of ``beit_vit_tiny_patch4_32px`` with a random frozen tokenizer on ``--data builtin``: predicting
    the tokens of the masked blocks lifts the kNN of the mean patch token clearly (measured 2026-12-03: 0.419 ->
    0.483 after 1 epoch, 0.508 after 2)."""
    tokenizer = {"tokenizer_path": "random"}
    result = pretrain_silently("beit_vit_tiny_patch4_32px", tmp_path, epochs=2, batch_size=64, overrides=tokenizer)
    assert result.knn_final > result.knn_random_init + 0.05


def test_simmim_small_preset_learns_on_the_builtin_digits(tmp_path):
    """SimMIM on a 4-block ViT of width 128 (the small preset's patches and head), 5 epochs of 89 steps of 16 images
    at lr 2e-3: the regression of the masked pixels lifts the kNN of the mean patch token clearly. Few, large steps
    move it little: at the preset's batch 64, 2 epochs give 0.431 -> 0.453 (BENCHMARKS.md). Measured 2026-12-03:
    0.428 -> 0.586 (seed 0), 0.422 -> 0.553 (seed 1), 0.431 -> 0.522 (seed 2)."""
    narrow = {"backbone_kwargs": {"embed_dim": 128, "depth": 4, "num_heads": 4}}
    result = pretrain_silently(
        "simmim_vit_tiny_patch4_32px", tmp_path, epochs=5, batch_size=16, lr=2e-3, knn_every=5, overrides=narrow
    )
    assert result.knn_final > result.knn_random_init + 0.05


def test_convmae_small_preset_learns_on_the_builtin_digits(tmp_path):
    """ConvMAE's small preset, 2 epochs of 44 steps of 32 images at lr 1e-3: reconstructing the masked blocks lifts the
    kNN of the pooled feature (LayerNorm of the mean token) clearly. At the paper's lr (1.5e-4 per 256 images) a few
    steps move it little (BENCHMARKS.md). Measured 2026-12-07: 0.644 -> 0.792 (seed 0); seeds 1 and 2: +0.064,
    +0.031. Larger steps overshoot: batch 16 at lr 2e-3 gives +0.178, +0.061 and -0.100 after one epoch."""
    result = pretrain_silently("convmae_convvit_tiny_32px", tmp_path, epochs=2, batch_size=32, lr=1e-3, knn_every=2)
    assert result.knn_final > result.knn_random_init + 0.05


def test_localmim_small_preset_learns_on_the_builtin_digits(tmp_path):
    """LocalMIM's small preset, 4 epochs of 89 steps of 16 images at lr 5e-5 (the preset's 2e-4 per 256 images is
    1.25e-5 at batch 16): the HOG targets of four blocks lift the kNN of the class token, which at MAE's random
    initialisation is already a 0.75 digit feature. The gain follows the number of steps: batch 64 needs 12 epochs
    (264 steps) for +0.04 - +0.07 (BENCHMARKS.md). Measured 2026-12-07, seeds 0 - 2: 0.753 -> 0.844, 0.756 -> 0.806,
    0.753 -> 0.822."""
    result = pretrain_silently("localmim_vit_tiny_patch4_32px", tmp_path, epochs=4, batch_size=16, lr=5e-5, knn_every=4)
    assert result.knn_final > result.knn_random_init + 0.04


def test_deepmim_small_preset_learns_on_the_builtin_digits(tmp_path):
    """DeepMIM (the small preset's pixel target, patches and decoders) on a 4-block ViT of width 128 with blocks 2 and
    3 supervised besides the final norm, 6 epochs of 89 steps of 16 images at lr 2e-3 (as the SimMIM test): the kNN of
    the class token dips while the lr is high and rises above MAE's random initialisation (already a 0.66 - 0.75 digit
    feature) as it decays. The 12-block preset gains at most +0.06 at any batch or lr tried (BENCHMARKS.md).
    Measured 2026-12-07, seeds 0 - 2: 0.750 -> 0.850, 0.664 -> 0.844, 0.742 -> 0.886."""
    narrow = {"backbone_kwargs": {"embed_dim": 128, "depth": 4, "num_heads": 4}, "deep_supervision_blocks": (1, 2)}
    result = pretrain_silently(
        "deepmim_vit_tiny_patch4_32px", tmp_path, epochs=6, batch_size=16, lr=2e-3, knn_every=6, overrides=narrow
    )
    assert result.knn_final > result.knn_random_init + 0.06


def test_ibot_small_preset_learns_on_the_builtin_digits(tmp_path):
    """iBOT on a 4-block ViT of width 128 with 8 px patches (16 tokens), the preset's 2 global crops and 2 of its
    16 px local crops, head 512 - 128 - 256 prototypes, teacher momentum 0.99 from 0.996, no drop path: 10 epochs of
    89 steps of 16 images at lr 2e-4. Self-distillation of a from-scratch ViT is slow on CPU budgets: the preset's
    12-block ViT with 4 px patches gains +0.04 in 16 epochs (58 min) and the narrow ViT with 4 px patches +0.14 only
    after 50 (BENCHMARKS.md). Measured 2026-12-07, seeds 0 - 2: 0.397 -> 0.514, 0.442 -> 0.578, 0.386 -> 0.561."""
    narrow = {
        "backbone_kwargs": {"embed_dim": 128, "depth": 4, "num_heads": 4, "patch_size": 8},
        "local_crops_number": 2,
        "out_dim": 256,
        "patch_out_dim": 256,
        "hidden_dim": 512,
        "bottleneck_dim": 128,
        "momentum_teacher": 0.99,
        "drop_path_rate": 0.0,
    }
    result = pretrain_silently(
        "ibot_vit_tiny_patch4_32px", tmp_path, epochs=10, batch_size=16, lr=2e-4, knn_every=10, overrides=narrow
    )
    assert result.knn_final > result.knn_random_init + 0.07


def test_python_dash_m_entry_point():
    listed = subprocess.run(
        [sys.executable, "-m", "sslhub", "list", "moco_*"], capture_output=True, text=True, check=True
    )
    assert "moco_v2_resnet50" in listed.stdout and "dino" not in listed.stdout


@pytest.fixture(scope="module")
def class_coloured_digits(tmp_path_factory):
    """The built-in digits in L*a*b*: L* = 75 x intensity (the grey digit, what the encoder sees) and ab of chroma
    30 x intensity at the hue of the digit's class (± 0.02 turn): a colour only the digit's shape predicts."""
    root = tmp_path_factory.mktemp("class-coloured-digits")
    digits, rng = load_digits(), np.random.default_rng(0)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        intensity = torch.tensor(image / 16, dtype=torch.float32)
        hue = 2 * np.pi * (label / 10 + rng.normal(0, 0.02))
        lab = torch.stack([75 * intensity, 30 * intensity * np.cos(hue), 30 * intensity * np.sin(hue)])
        (root / str(label)).mkdir(exist_ok=True)
        pixels = (lab_to_rgb(lab).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / str(label) / f"{i}.png")
    return root


def colour_error(model, images) -> float:
    """Mean ab distance between ``colorize``'s output and the truth on the digits' strokes (L* > 40)."""
    errors = []
    for image, coloured in zip(images, colorize(model, images), strict=True):
        truth, guess = (rgb_to_lab(torch.from_numpy(np.array(x)).permute(2, 0, 1) / 255) for x in (image, coloured))
        strokes = truth[0] > 40
        errors.append((truth[1:, strokes] - guess[1:, strokes]).norm(dim=0).mean())
    return float(torch.stack(errors).mean())


def test_colorization_small_preset_learns_to_colour_class_coloured_digits(class_coloured_digits, tmp_path):
    """Two epochs of ``colorization_resnet18_32px`` on class-coloured digits. The built-in digits are grey (no ab:
    the loss is 0), and its 4 x 4 map is a 0.84 - 0.87 kNN feature at random init that the authors' Adam lr (3e-5 per
    40 images, for 500k iterations) leaves there in a CPU budget (measured 2026-12-04: 0.872 -> 0.872 after 4
    epochs), so the bar is the pretext task's (measured: loss 4.57 -> 3.67, colour error 27.8 -> 25.8)."""
    images = [Image.open(p).convert("RGB") for p in sorted(class_coloured_digits.glob("*/*.png"))[::9][:200]]
    torch.manual_seed(0)
    before = colour_error(sslhub.create_model("colorization_resnet18_32px", task="pretraining"), images)
    result = pretrain_silently(
        "colorization_resnet18_32px", tmp_path, data=str(class_coloured_digits), epochs=2, batch_size=64
    )
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.9 * first and colour_error(result.model, images) < 0.96 * before
