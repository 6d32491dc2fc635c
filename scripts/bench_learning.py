"""Learning-quality benchmark: each method pretrained on Fashion-MNIST for a fixed CPU budget.

For every method the script
1. times real training steps (runs of 2 and 7 steps; start-up cost cancels),
2. pretrains the method's 32 px preset for ``--epochs`` epochs on a stratified subset of the Fashion-MNIST train
   split sized so that training fits into ``--budget`` seconds (the whole split when it fits),
3. reports weighted-kNN top-1 (k=20, T=0.07) of the released encoder on the full 10k test split, with a fixed
   stratified ``--bank`` images of the train split as memory bank, next to the same backbone at random
   initialisation and kNN on raw pixels (32 px, centred) with the same bank.

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
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from sklearn.model_selection import train_test_split
from torch.utils.data import Subset

import sslhub
from sslhub.data import ImageDataset, load_image_dataset
from sslhub.probes import extract_features, knn_accuracy, knn_evaluate
from sslhub.training import PretrainArguments, pretrain
from sslhub.transforms import eval_transform

PRESETS = {"moco_v2": "moco_v2_resnet18_32px", "dino": "dino_vit_tiny_patch4_32px", "mae": "mae_vit_tiny_patch4_32px"}


def stratified(dataset: ImageDataset, size: int, seed: int = 0) -> list[int]:
    if size >= len(dataset):
        return list(range(len(dataset)))
    chosen, _ = train_test_split(list(range(len(dataset))), train_size=size, random_state=seed, stratify=dataset.labels)
    return sorted(chosen)


def save_training_subset(train: ImageDataset, indices: list[int], directory: Path) -> str:
    """The chosen training images as an HF ``save_to_disk`` directory, the format ``--data DIR`` reads."""
    if not directory.is_dir():
        features = Features(image=Image(), label=ClassLabel(names=list(train.classes)))
        rows = {
            "image": [PILImage.fromarray(train.images[i]) for i in indices],
            "label": [int(train.labels[i]) for i in indices],
        }
        DatasetDict(train=Dataset.from_dict(rows, features=features)).save_to_disk(str(directory))
    return str(directory)


def run_args(preset: str, data: str, output_dir: Path, batch_size: int, **extra) -> PretrainArguments:
    return PretrainArguments(
        model=preset,
        data=data,
        output_dir=str(output_dir),
        batch_size=batch_size,
        knn_every=0,
        log_with=None,
        progress=False,
        checkpoint_every=10**9,
        **extra,
    )


def seconds_per_step(preset: str, data: str, workdir: Path, batch_size: int) -> float:
    times = []
    for steps in (2, 7):
        start = time.perf_counter()
        pretrain(run_args(preset, data, workdir / f"calibrate_{steps}", batch_size, epochs=1, max_steps=steps))
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per method")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bank", type=int, default=10000, help="memory-bank images from the train split")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--workdir", default="runs/bench_learning")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    workdir = Path(ns.workdir)

    train = load_image_dataset("fashion-mnist", "train")
    test = load_image_dataset("fashion-mnist", "test")
    bank = Subset(train, stratified(train, ns.bank))
    train.transform = test.transform = eval_transform(32, (0.5,) * 3, (0.5,) * 3)  # raw pixels, centred
    bank_x, bank_y = extract_features(torch.nn.Flatten(), bank, progress=False)
    test_x, test_y = extract_features(torch.nn.Flatten(), test, progress=False)
    pixels = knn_accuracy(bank_x, bank_y, test_x, test_y, k=ns.k)
    calibration_data = save_training_subset(train, stratified(train, 10 * ns.batch_size), workdir / "data_calibration")
    step_times = {  # all calibrations first, so they run back to back on the same machine state
        method: seconds_per_step(PRESETS[method], calibration_data, workdir / method, ns.batch_size)
        for method in ns.methods
    }
    rows = []
    for method in ns.methods:
        preset, step_time = PRESETS[method], step_times[method]
        encoder = sslhub.create_model(preset)
        train.transform = test.transform = eval_transform(
            encoder.config.image_size, encoder.config.image_mean, encoder.config.image_std
        )
        random_init = knn_evaluate(encoder, bank, test, k=ns.k, progress=False)
        steps_per_epoch = max(1, math.floor(ns.budget / (step_time * ns.epochs)))
        images = min(len(train), steps_per_epoch * ns.batch_size)
        data = save_training_subset(train, stratified(train, images), workdir / f"data_{images}")
        start = time.perf_counter()
        result = pretrain(run_args(preset, data, workdir / method / "run", ns.batch_size, epochs=ns.epochs))
        train_seconds = time.perf_counter() - start
        learned = knn_evaluate(sslhub.from_pretrained(result.output_dir), bank, test, k=ns.k, progress=False)
        rows.append(
            dict(
                method=method,
                preset=preset,
                train_images=images,
                epochs=ns.epochs,
                steps=result.steps,
                seconds_per_step=round(step_time, 3),
                train_seconds=round(train_seconds),
                knn_learned=learned,
                knn_random_init=random_init,
                knn_raw_pixels=pixels,
            )
        )
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {ns.threads} threads, torch {torch.__version__}")
    print(
        f"Fashion-MNIST: memory bank {len(bank)} train images (stratified), queries the 10k test split; "
        f"batch {ns.batch_size}, {ns.epochs} epochs, budget {ns.budget:.0f} s; weighted kNN k={ns.k} T=0.07\n"
    )
    print("| method | preset | train images | steps | train s | kNN learned | kNN random init | kNN raw pixels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['preset']} | {r['train_images']} | {r['steps']} | {r['train_seconds']} | "
            f"{r['knn_learned']:.4f} | {r['knn_random_init']:.4f} | {r['knn_raw_pixels']:.4f} |"
        )


if __name__ == "__main__":
    main()
