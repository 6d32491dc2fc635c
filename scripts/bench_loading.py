"""Data-loading throughput (images/s) of ``sslhub pretrain``'s loader alone: a method's views of an image folder,
collated into batches, as the pretraining ``DataLoader`` makes them (``sslhub.data.loader_options``), no model.

For each ``--num-workers`` value, the folder read from the files (``cache_bytes=0``) and decoded once into memory
(``image_folder``'s cache): one epoch to start the workers, then the median over ``--repeats`` epochs of ``--batches``
batches. Without ``--data``, a folder of ``--num-images`` random PNG images of ``--source-size`` px is written to a
temporary directory. Example:

    python scripts/bench_loading.py --num-workers 0 1 --num-images 512 --source-size 96
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import sslhub
from sslhub.data import ViewDataset, available_cpus, image_folder, loader_options


def write_folder(root: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def epoch_seconds(loader: DataLoader, views: ViewDataset, epoch: int, batches: int) -> float:
    views.set_epoch(epoch)
    start = time.perf_counter()
    for _ in itertools.islice(loader, batches):
        pass
    return time.perf_counter() - start


def bench(folder: Path, workers: int, cache_bytes: int, args: argparse.Namespace) -> float:
    recipe = sslhub.create_model(args.model, task="pretraining").method.view_recipe()
    views = ViewDataset(image_folder(folder, cache_bytes=cache_bytes), recipe)
    loader = DataLoader(
        views,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=recipe.collate,
        generator=torch.Generator().manual_seed(0),
        **loader_options(workers, pin_memory=False),
    )
    if len(loader) < args.batches:
        raise ValueError(f"{len(loader)} batches in the folder, fewer than --batches {args.batches}")
    epoch_seconds(loader, views, 0, args.batches)  # starts the (persistent) workers
    seconds = statistics.median(epoch_seconds(loader, views, 1 + i, args.batches) for i in range(args.repeats))
    return args.batches * args.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="an image folder (default: random PNG images)")
    parser.add_argument("--model", default="moco_v2_resnet18_32px", help="preset whose view recipe is used")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or write_folder(Path(tmp), args.num_images, args.source_size)
        print(f"{platform.processor() or platform.machine()}, {available_cpus()} CPUs, torch {torch.__version__}")
        print(f"{args.model} views of {folder}, batches of {args.batch_size}, median of {args.repeats} epochs")
        for workers in args.num_workers:
            for name, cache_bytes in (("files", 0), ("decoded in memory", 1 << 30)):
                print(f"  {workers} workers, {name:17s}: {bench(folder, workers, cache_bytes, args):8.1f} images/s")


if __name__ == "__main__":
    main()
