"""Training-loader throughput on GTA5-sized frames, per worker, and the cost of the device confusion matrix.

Writes N synthetic 1914x1052 RGB PNGs with GTA-like label PNGs (smooth regions plus noise, so they
compress like photographs rather than like flat colour) in a temporary GTA5 layout, then times
`SegDataset.__getitem__` (decode, label map, resize, crop, flip) in one process: that is the work one
DataLoader worker does per image. Usage: python benchmarks/loader_throughput.py [--images 24]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data import SegDataset, TrainTransform, domain_split  # noqa: E402
from common.metrics import update_confusion  # noqa: E402


def make_gta(root, n, rng):
    os.makedirs(os.path.join(root, "gta", "images"))
    os.makedirs(os.path.join(root, "gta", "labels"))
    h, w = 1052, 1914
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = (np.sin(xx / (40 + 7 * i)) * 60 + np.cos(yy / 55) * 50 + 120)[..., None] * np.array([1.0, 0.8, 0.6])
        image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        label = np.choose((yy // 150 + xx // 300 + i) % 6, [7, 8, 11, 21, 23, 26]).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, "gta", "images", f"{i + 1:05d}.png"))
        Image.fromarray(label).save(os.path.join(root, "gta", "labels", f"{i + 1:05d}.png"))


def time_transform(dataset, n, rounds=2):
    for i in range(min(2, n)):  # warm the page cache
        dataset[(i, i)]
    start = time.perf_counter()
    for r in range(rounds):
        for i in range(n):
            dataset[(i, r * n + i)]
    return rounds * n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        make_gta(root, a.images, rng)
        size_mb = os.path.getsize(os.path.join(root, "gta", "images", "00001.png")) / 2**20
        import warnings
        warnings.simplefilter("ignore")
        split = domain_split("gta", "train", root)
        recipes = {
            "DeepLab-v2 recipe: resize to 1280x720 (bicubic/nearest)": TrainTransform(size=(720, 1280)),
            "DAFormer recipe: keep-ratio 1280x720, 512x512 crop, flip": TrainTransform(size=(720, 1280), keep_ratio=True,
                                                                                       crop=(512, 512), flip=True),
            "decode + label map only (no resize)": TrainTransform(),
        }
        print(f"{a.images} synthetic GTA5-sized frames (1914x1052 PNG, {size_mb:.1f} MB each), one process, 1 thread")
        for name, transform in recipes.items():
            print(f"  {name}: {time_transform(SegDataset(split, transform), a.images):.1f} images/s per worker")

    pred = torch.randint(0, 19, (1, 1024, 2048))
    label = torch.randint(0, 19, (1, 1024, 2048))
    confusion = torch.zeros(19, 19, dtype=torch.int64)
    start = time.perf_counter()
    for _ in range(5):
        update_confusion(confusion, pred, label)
    print(f"confusion matrix update, one 2048x1024 image, CPU: {(time.perf_counter() - start) / 5 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
