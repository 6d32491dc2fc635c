"""Speed of the view recipes: sslhub's ``view_recipe()`` vs. lightly's transform for the same method, on one thread.

For each method (``METHODS``: MoCo v2, SimCLR v2, BYOL, DINO, SwAV, SimSiam, MAE, iBOT) and preset size (224 px
presets on 256 px images, the 32 px presets on 32 px images) the script reports images per second: one image = the
full set of views a recipe makes of it (2 views, or DINO's / SwAV's / iBOT's multi-crop). Both sides get the same
RGB PIL images (random colours, lightly blurred, so neighbouring pixels correlate as in photographs), already
decoded; lightly's transform is built with the preset's sizes, crop counts and blur (``lightly_transform``). The two
sides take turns, ``--repeats`` times, and the median of each is reported, so a load change on a shared machine
hits them alike. iBOT's recipe also draws the masks of its global crops; lightly's ``IBOTTransform`` leaves them to
the training step.

    python scripts/bench_views.py                       # 1 thread, 224 px and 32 px presets
    python scripts/bench_views.py --sizes 224 --repeats 9 --methods moco_v2 dino
    python scripts/bench_views.py --device cuda         # + the --augment-on path: deferred views, batched finish

With ``--device`` two columns more: the workers' share of ``--augment-on`` (``DeferredViews``: crops and parameter
draws, one thread) and the batched finish of a collated batch of ``--batch-size`` images on the device
(``DeferredViews.apply``, uint8 crops already there, synchronised), both in images/s; "-" for recipes that refuse it.

Time on an idle machine only: a busy one gives outliers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import lightly
import numpy as np
import torch
import torchvision
from lightly import transforms as lt
from PIL import Image, ImageFilter

import sslhub
from sslhub.batch import Sample
from sslhub.device_views import DeferredViews, deferrable

METHODS = ("moco_v2", "simclr_v2", "byol", "dino", "swav", "simsiam", "mae", "ibot")
PRESETS = {  # method -> (224 px preset, 32 px preset)
    "moco_v2": ("moco_v2_resnet50", "moco_v2_resnet18_32px"),
    "simclr_v2": ("simclr_v2_resnet50", "simclr_v2_resnet18_32px"),
    "byol": ("byol_resnet50", "byol_resnet18_32px"),
    "dino": ("dino_vit_small_patch16_224", "dino_vit_tiny_patch4_32px"),
    "swav": ("swav_resnet50", "swav_resnet18_32px"),
    "simsiam": ("simsiam_resnet50", "simsiam_resnet18_32px"),
    "mae": ("mae_vit_base_patch16_224", "mae_vit_tiny_patch4_32px"),
    "ibot": ("ibot_vit_small_patch16_224", "ibot_vit_tiny_patch4_32px"),
}


def lightly_transform(method: str, model) -> Callable:
    """lightly's transform of ``method`` with the preset's view sizes, crop counts and whether it blurs."""
    hp, size = model.method.hparams, model.config.image_size
    if method == "moco_v2":
        return lt.MoCoV2Transform(input_size=size, gaussian_blur=0.5 if hp.aug_plus else 0.0)
    if method == "simclr_v2":
        return lt.SimCLRTransform(input_size=size, cj_strength=hp.color_strength, gaussian_blur=0.5 if hp.blur else 0.0)
    if method == "byol":
        blur_1, blur_2 = hp.blur_prob
        return lt.BYOLTransform(
            lt.BYOLView1Transform(input_size=size, gaussian_blur=blur_1),
            lt.BYOLView2Transform(input_size=size, gaussian_blur=blur_2),
        )
    if method in ("dino", "ibot"):
        cls = lt.DINOTransform if method == "dino" else lt.IBOTTransform
        return cls(
            global_crop_size=size,
            local_crop_size=model.method.local_crop_size(),
            n_local_views=hp.local_crops_number,
            global_crop_scale=tuple(hp.global_crops_scale),
            local_crop_scale=tuple(hp.local_crops_scale),
        )
    if method == "swav":
        sizes = tuple(view.transforms[0].size[0] for view in model.method.view_recipe().transforms)
        return lt.SwaVTransform(
            crop_sizes=tuple(dict.fromkeys(sizes)),
            crop_counts=tuple(hp.nmb_crops),
            crop_min_scales=tuple(hp.min_scale_crops),
            crop_max_scales=tuple(hp.max_scale_crops),
            gaussian_blur=hp.blur_p,
        )
    if method == "simsiam":
        return lt.SimSiamTransform(input_size=size, gaussian_blur=hp.blur_p)
    if method == "mae":
        return lt.MAETransform(input_size=size)
    raise ValueError(f"no lightly transform for {method!r}")


def images(size: int, count: int = 8) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
        for _ in range(count)
    ]


def rate(transform: Callable, pictures: list[Image.Image], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        transform(pictures[i % len(pictures)])
    return count / (time.perf_counter() - start)


def batched_rate(deferred: DeferredViews, pictures: list[Image.Image], batch_size: int, device, repeats: int) -> float:
    """Images/s of ``deferred.apply`` on one collated batch of ``batch_size`` images already on ``device``."""
    made = [deferred(pictures[i % len(pictures)]) for i in range(batch_size)]
    batch = deferred.collate([Sample(i, views.views, None, views.extras) for i, views in enumerate(made)]).to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    deferred.apply(batch)  # warm-up
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        deferred.apply(batch)
        sync()
        seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds)


def bench(method: str, small: bool, repeats: int, device: str | None = None, batch_size: int = 256) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sslhub.create_model(PRESETS[method][small], task="pretraining")
    ours, theirs = model.method.view_recipe(), lightly_transform(method, model)
    size = model.config.image_size
    pictures = images(32 if small else 256)
    count = 200 if small else 20
    sides = {"sslhub": ours, "lightly": theirs}
    if device is not None and deferrable(ours):
        sides["deferred"] = DeferredViews(ours, method)
    for transform in sides.values():  # warm-up
        rate(transform, pictures, 2)
    rates = {side: [] for side in sides}
    for _ in range(repeats):
        for side, transform in sides.items():
            rates[side].append(rate(transform, pictures, count))
    row = {"method": method, "size": size, **{side: statistics.median(rates[side]) for side in sides}}
    if "deferred" in sides:
        row["batched"] = batched_rate(sides["deferred"], pictures, batch_size, device, repeats)
    return row


def markdown_table(rows: list[dict], device: str | None = None) -> str:
    extra = "" if device is None else f" deferred images/s | batched on {device} images/s |"
    lines = [f"| method | size | sslhub images/s | lightly images/s | ratio |{extra}", "| --- " + "| ---: " * 4 + "|"]
    if device is not None:
        lines[1] += " ---: | ---: |"
    for row in rows:
        ratio = row["sslhub"] / row["lightly"]
        line = f"| {row['method']} | {row['size']} | {row['sslhub']:.1f} | {row['lightly']:.1f} | {ratio:.2f} |"
        if device is not None:
            line += "".join(f" {row[key]:.1f} |" if key in row else " - |" for key in ("deferred", "batched"))
        lines.append(line)
    return "\n".join(lines)


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    parts = [f"CPU {cpu} ({os.cpu_count()} cores)", f"{torch.get_num_threads()} thread", f"torch {torch.__version__}"]
    parts += [f"torchvision {torchvision.__version__}", f"Pillow {Image.__version__}", f"lightly {lightly.__version__}"]
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 32], choices=[224, 32])
    parser.add_argument("--repeats", type=int, default=5, help="turns per side; the median is reported")
    parser.add_argument("--device", help="also time the --augment-on path, finishing the views on this device")
    parser.add_argument("--batch-size", type=int, default=256, help="images of the batch finished on --device")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        bench(method, size == 32, ns.repeats, ns.device, ns.batch_size) for size in ns.sizes for method in ns.methods
    ]
    print(markdown_table(rows, ns.device))
    print(f"\nMachine: {machine_description()}. Median of {ns.repeats} interleaved turns; images/s = images whose")
    print("full set of views was made (PIL RGB images of 256 px for the 224 px presets, 32 px for the 32 px ones).")


if __name__ == "__main__":
    main()
