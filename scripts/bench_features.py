"""Feature-extraction throughput (images/s) of ``sslhub eval``: what ``sslhub.probes.extract_features`` does
for each preset, on synthetic images.

Two numbers per preset, median over ``--repeats`` runs after one warm-up batch:

- **end to end**: ``extract_features`` over an ``ImageDataset`` of ``--num-images`` RGB PIL images of
  ``--source-size`` px, with the checkpoint's evaluation transform (bicubic resize, centre crop, normalise),
  ``--num-workers`` loader processes, batches of ``--batch-size``: decoding-free data path + forward.
- **forward only**: the model on a pre-made (batch, 3, size, size) tensor, ``torch.inference_mode``.

Weights are random (speed does not depend on them). Examples:

    python scripts/bench_features.py --threads 2 --num-images 256                               # CPU, 32 px presets
    python scripts/bench_features.py --presets moco_v2_resnet50 dino_vit_small_patch16_224 mae_vit_base_patch16_224 \\
        --num-images 2048 --num-workers 8 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

import sslhub
from sslhub.data import ImageDataset
from sslhub.probes import extract_features
from sslhub.transforms import eval_transform

SMALL_PRESETS = ["moco_v2_resnet18_32px", "dino_vit_tiny_patch4_32px", "mae_vit_tiny_patch4_32px"]


def synthetic_images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_preset(name: str, images: list[Image.Image], args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = sslhub.create_model(name).to(device).eval()
    config = model.config
    dataset = ImageDataset(
        images, [0] * len(images), transform=eval_transform(config.image_size, config.image_mean, config.image_std)
    )
    batch = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(batch)

    def end_to_end() -> None:
        extract_features(model, dataset, args.batch_size, args.num_workers, device, progress=False)

    forward()  # warm-up
    forward_s = median_seconds(forward, args.repeats, device)
    end_to_end_s = median_seconds(end_to_end, args.repeats, device)
    return {
        "preset": name,
        "size": config.image_size,
        "dim": model.num_features,
        "end_to_end": len(images) / end_to_end_s,
        "forward": args.batch_size / forward_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=SMALL_PRESETS)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=64, help="side of the synthetic images before resizing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = synthetic_images(args.num_images, args.source_size)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {args.device}, "
        f"torch {torch.__version__}; {args.num_images} images of {args.source_size} px, batch {args.batch_size}, "
        f"{args.num_workers} workers, median of {args.repeats}"
    )
    print("| preset | input px | feature dim | end to end (images/s) | forward only (images/s) |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.presets:
        row = bench_preset(name, images, args)
        print(
            f"| {row['preset']} | {row['size']} | {row['dim']} | {row['end_to_end']:.1f} | {row['forward']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
