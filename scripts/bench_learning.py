"""Learning-quality benchmark: each method pretrained on Fashion-MNIST for a fixed CPU budget.

For every method the script (1) times a few real training steps to fit the number of epochs into ``--budget``
seconds, (2) pretrains the method's 32 px preset with ``sslhub.training.pretrain`` on the Fashion-MNIST train split,
(3) reports weighted-kNN top-1 (k=20, T=0.07) on the full test split with the full train split as memory bank,
next to the same backbone at random initialisation and to kNN on raw pixels.

    python scripts/bench_learning.py --budget 600 --methods moco_v2 dino mae

Needs ``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import sslhub
from sslhub.data import load_image_dataset
from sslhub.evaluation import extract_features, knn_accuracy, knn_evaluate
from sslhub.training import PretrainArguments, pretrain
from sslhub.transforms import eval_transform

PRESETS = {
    "moco_v2": ("moco_v2_resnet18_32px", {}),
    "dino": ("dino_vit_tiny_patch4_32px", {}),
    "mae": ("mae_vit_tiny_patch4_32px", {}),
}


def run_args(method: str, output_dir: Path, batch_size: int, **extra) -> PretrainArguments:
    preset, overrides = PRESETS[method]
    return PretrainArguments(
        model=preset,
        data="fashion-mnist",
        output_dir=str(output_dir),
        batch_size=batch_size,
        overrides=overrides,
        knn_every=0,
        log_with=None,
        progress=False,
        checkpoint_every=10**9,
        **extra,
    )


def seconds_per_step(method: str, workdir: Path, batch_size: int) -> float:
    """Wall time of one step with data loading, from runs of 2 and 7 steps (start-up cost cancels)."""
    times = []
    for steps in (2, 7):
        start = time.perf_counter()
        pretrain(run_args(method, workdir / f"calibrate_{steps}", batch_size, epochs=1, max_steps=steps))
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / 5


def raw_pixel_knn(train, test, k: int) -> float:
    flat = torch.nn.Flatten()
    train_x, train_y = extract_features(flat, train, progress=False)
    test_x, test_y = extract_features(flat, test, progress=False)
    return knn_accuracy(train_x, train_y, test_x, test_y, k=k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per method")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--workdir", default="runs/bench_learning")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    workdir = Path(ns.workdir)

    train = load_image_dataset("fashion-mnist", "train")
    test = load_image_dataset("fashion-mnist", "test")
    rows = []
    for method in ns.methods:
        preset, overrides = PRESETS[method]
        encoder = sslhub.create_model(preset, **overrides)
        train.transform = test.transform = eval_transform(
            encoder.config.image_size, encoder.config.image_mean, encoder.config.image_std
        )
        random_init = knn_evaluate(encoder, train, test, k=ns.k, progress=False)
        pixels = raw_pixel_knn(train, test, ns.k)
        step_time = seconds_per_step(method, workdir, ns.batch_size)
        steps_per_epoch = len(train) // ns.batch_size
        epochs = max(1, math.floor(ns.budget / (step_time * steps_per_epoch)))
        start = time.perf_counter()
        result = pretrain(run_args(method, workdir / method, ns.batch_size, epochs=epochs))
        train_seconds = time.perf_counter() - start
        learned = knn_evaluate(sslhub.from_pretrained(result.output_dir), train, test, k=ns.k, progress=False)
        rows.append(
            dict(
                method=method,
                preset=preset,
                epochs=epochs,
                steps=result.steps,
                seconds=round(train_seconds),
                knn_learned=learned,
                knn_random_init=random_init,
                knn_raw_pixels=pixels,
            )
        )
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {ns.threads} threads, torch {torch.__version__}")
    print(f"Fashion-MNIST, train 60k / test 10k, batch {ns.batch_size}, weighted kNN k={ns.k} T=0.07\n")
    print("| method | preset | epochs | steps | train s | kNN learned | kNN random init | kNN raw pixels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['preset']} | {r['epochs']} | {r['steps']} | {r['seconds']} | "
            f"{r['knn_learned']:.4f} | {r['knn_random_init']:.4f} | {r['knn_raw_pixels']:.4f} |"
        )


if __name__ == "__main__":
    main()
