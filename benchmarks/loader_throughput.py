"""Training-loader throughput: the PNG path against prepared copies, per worker and with DataLoader workers.

Writes synthetic frames in the real layouts and sizes to a temporary data root (GTA5 1914x1052 RGB PNGs with
GTA-style label PNGs, SYNTHIA 1280x760 with 16-bit labels, Cityscapes 2048x1024 train and val; smooth regions
plus noise, so that the images compress like photographs rather than like flat colour), makes the prepared
copies each recipe reads (common/prepare.py), then times every recipe both ways:

- per worker: `SegDataset.__getitem__` (decode or read, label map, resize, crop, flip) in this process with
  one thread, the work of one DataLoader worker per image;
- with --num-workers (default 2): `train_loader` batches arriving in this process (adds collation and the
  transfer from the workers), steady state after a few warm-up batches.

The copies are read from the page cache here (a few frames, read over and over); a real copy larger than
the RAM also needs the disk to deliver the bytes per frame in the table. `--profile` adds a per-stage
breakdown of one worker and the read cost of other storage formats.

Usage: python benchmarks/loader_throughput.py [--images 12] [--num-workers 2] [--seconds 2] [--profile]
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
import zlib

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data import (CITYSCAPES_LUT, SegDataset, TrainTransform, domain_split, random_crop,  # noqa: E402
                         read_image, read_label, resize_image, resize_label, resize_pair, resized_shape,
                         train_loader)
from common.metrics import update_confusion  # noqa: E402
from common.png16 import write_png16  # noqa: E402
from common.prepare import prepare  # noqa: E402

GTA_IDS, SYNTHIA_IDS = [7, 8, 11, 21, 23, 26], [1, 2, 3, 6, 8, 10]


def synthetic_frame(h, w, i, rng):
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / (40 + 7 * i)) * 60 + np.cos(yy / 55) * 50 + 120)[..., None] * np.array([1.0, 0.8, 0.6])
    image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    regions = (yy // 150 + xx // 300 + i) % 6
    return image, regions


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_gta(root, n, rng):
    for i in range(n):
        image, regions = synthetic_frame(1052, 1914, i, rng)
        save_png(os.path.join(root, "gta", "images", f"{i + 1:05d}.png"), image)
        save_png(os.path.join(root, "gta", "labels", f"{i + 1:05d}.png"), np.choose(regions, GTA_IDS).astype(np.uint8))


def make_synthia(root, n, rng):
    os.makedirs(os.path.join(root, "synthia", "GT", "LABELS"))
    for i in range(n):
        image, regions = synthetic_frame(760, 1280, i, rng)
        save_png(os.path.join(root, "synthia", "RGB", f"{i:07d}.png"), image)
        label16 = np.zeros((760, 1280, 3), np.uint16)
        label16[..., 0] = np.choose(regions, SYNTHIA_IDS)  # class id in R, as the real files
        write_png16(os.path.join(root, "synthia", "GT", "LABELS", f"{i:07d}.png"), label16)


def make_cityscapes(root, n, rng):
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for i in range(n):
            image, regions = synthetic_frame(1024, 2048, i, rng)
            name = f"{city}_{i:06d}_000019"
            save_png(os.path.join(root, "cityscapes", "leftImg8bit", split, city, f"{name}_leftImg8bit.png"), image)
            save_png(os.path.join(root, "cityscapes", "gtFine", split, city, f"{name}_gtFine_labelIds.png"),
                     np.choose(regions, GTA_IDS).astype(np.uint8))


def recipes():
    """(name, domain, split, with_label, transform, eval_size, batch size per domain)."""
    crop = dict(crop=(512, 512), flip=True, interpolation="cv2-bilinear", keep_ratio=True)
    return [
        ("DeepLab-v2 GTA5: 720x1280 bicubic", "gta", "train", True, TrainTransform(size=(720, 1280)), None, 1),
        ("DeepLab-v2 SYNTHIA: 760x1280 (native)", "synthia", "train", True, TrainTransform(size=(760, 1280)), None, 1),
        ("DeepLab-v2 Cityscapes train (target): 512x1024 bicubic", "cityscapes", "train", False,
         TrainTransform(size=(512, 1024)), None, 1),
        ("DAFormer GTA5: keep-ratio 720x1280 cv2-bilinear, 512x512 crop (cat_max_ratio 0.75), flip", "gta", "train",
         True, TrainTransform(size=(720, 1280), cat_max_ratio=0.75, **crop), None, 2),
        ("DAFormer SYNTHIA: keep-ratio 760x1280 (native), 512x512 crop (cat_max_ratio 0.75), flip", "synthia", "train",
         True, TrainTransform(size=(760, 1280), cat_max_ratio=0.75, **crop), None, 2),
        ("DAFormer Cityscapes train (target): keep-ratio 512x1024 cv2-bilinear, 512x512 crop, flip", "cityscapes",
         "train", False, TrainTransform(size=(512, 1024), **crop), None, 2),
        ("evaluation Cityscapes val: 512x1024 bicubic, full-resolution labels", "cityscapes", "val", True, None,
         (512, 1024), 1),
        ("ProDA GTA5: 1052x1914 bilinear, rescale 0.5-1.5, 512x896 crop, flip", "gta", "train", True,
         TrainTransform(size=(1052, 1914), scale=(0.5, 1.5), crop=(512, 896), flip=True, interpolation="bilinear"),
         None, 2),
        ("LSD-seg GTA5: keep-ratio 720x1280 Lanczos, 320x640 crop", "gta", "train", True,
         TrainTransform(size=(720, 1280), keep_ratio=True, crop=(320, 640), interpolation="lanczos"), None, 1),
    ]


def dataset(split, with_label, transform, eval_size, prepared):
    if eval_size is not None:
        return SegDataset(split, eval_size=eval_size, use_prepared=prepared)
    return SegDataset(split, transform, with_label=with_label, use_prepared=prepared)


def per_worker(ds, n, seconds):
    """Images/s of __getitem__ in this process, over sample positions 0, 1, ... for at least `seconds`."""
    for i in range(min(2, n)):  # page cache and first-use costs
        ds[(i, i)]
    start, done = time.perf_counter(), 0
    while done < 4 or time.perf_counter() - start < seconds:
        ds[(done % n, done)]
        done += 1
    return done / (time.perf_counter() - start)


def with_workers(ds, batch, workers, seconds, warmup=4):
    """Images/s of train_loader batches arriving here, after `warmup` batches (worker start-up)."""
    batches = train_loader(ds, batch, seed=0, num_workers=workers)
    for _ in range(warmup):
        next(batches)
    start, done = time.perf_counter(), 0
    while done < 4 or time.perf_counter() - start < seconds:
        next(batches)
        done += 1
    rate = done * batch / (time.perf_counter() - start)
    del batches  # shuts the workers down
    return rate


def frame_bytes(split, transform, eval_size, with_label):
    """Bytes a prepared copy reads per sample: the whole stored frame (image + label), or its crop."""
    h, w = (1052, 1914) if split.name == "gta" else (760, 1280) if split.name == "synthia" else (1024, 2048)
    if eval_size is not None:
        return eval_size[0] * eval_size[1] * 3 + (h * w if with_label else 0)
    sh, sw = resized_shape(h, w, transform.size, transform.keep_ratio)
    if transform.crop is not None and transform.scale is None:
        sh, sw = transform.crop
    return sh * sw * (3 + with_label)


class Timer:
    def __init__(self):
        self.total = {}

    @contextlib.contextmanager
    def __call__(self, stage):
        start = time.perf_counter()
        yield
        self.total[stage] = self.total.get(stage, 0.0) + time.perf_counter() - start


def profile(split, transform, ds_png, ds_prepared, n, rounds=3):
    """Per-stage milliseconds per image of one worker, both paths; asserts the staged pipeline reproduces
    SegDataset's items, so the profile times the real work."""
    png, fast = Timer(), Timer()
    batch_png, batch_fast = [], []
    count = 0
    for r in range(rounds):
        for i in range(n):
            seed = r * n + i
            with png("decode image (PNG)"):
                image = read_image(split.images[i])
            with png("decode label (PNG)"):
                raw = read_label(split.labels[i])
            with png("label ids (table + check)"):
                label = split.fit_label(split.train_ids(raw, i), image.shape[:2], i)
            shape = resized_shape(*image.shape[:2], transform.size, transform.keep_ratio)
            with png("resize image"):
                image = resize_image(image, shape, transform.interpolation) if shape != image.shape[:2] else image
            with png("resize label"):
                label = resize_label(label, shape, transform.interpolation) if shape != label.shape else label
            out_png = staged_augment(png, transform, image, label, seed)
            with fast("read label + ids (memmap)"):
                label = split.train_ids(ds_prepared.frames.labels.frame(i), i)
            with fast("read image (memmap view)"):
                image = ds_prepared.frames.images.frame(i)
            out_fast = staged_augment(fast, transform, image, label, seed, "to tensor (reads the pages)")
            for out, ds in ((out_png, ds_png), (out_fast, ds_prepared)):
                item = ds[(i, seed)]
                assert torch.equal(out[0], item[0]) and torch.equal(out[1], item[1]), "profile differs from SegDataset"
            batch_png.append(out_png)
            batch_fast.append(out_fast)
            count += 1
            if len(batch_png) == 2:
                for timer, batch in ((png, batch_png), (fast, batch_fast)):
                    with timer("collate (batch of 2)"):
                        torch.utils.data.default_collate(batch)
                    batch.clear()
    return {k: v / count * 1000 for k, v in png.total.items()}, {k: v / count * 1000 for k, v in fast.total.items()}


def staged_augment(timer, transform, image, label, seed, tensor_stage="to tensor (CHW copy)"):
    rng = np.random.default_rng(seed)
    if transform.scale is not None:
        with timer("random rescale"):
            s = rng.uniform(*transform.scale)
            shape = (int(image.shape[0] * s + 0.5), int(image.shape[1] * s + 0.5))
            image, label = resize_pair(image, label, shape, interpolation=transform.interpolation)
    if transform.crop is not None:
        with timer("crop (cat_max_ratio)" if transform.cat_max_ratio < 1 else "crop"):
            image, label = random_crop(image, label, transform.crop, rng, transform.cat_max_ratio)
    if transform.flip:
        with timer("flip"):
            if rng.random() < 0.5:
                image, label = image[:, ::-1], label[:, ::-1]
    with timer(tensor_stage):
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label = torch.from_numpy(np.array(label))
    return image, label, 0


def storage_alternatives(split, size, repeats=5):
    """ms to get one frame at the recipe size (image + label) back from other storage formats."""
    image = resize_image(read_image(split.images[0]), size)
    label = resize_label(CITYSCAPES_LUT[read_label(split.labels[0])], size)
    rows = []
    for level in (1, 6):
        blobs = []
        for a in (image, label):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "PNG", compress_level=level)
            blobs.append(buf.getvalue())
        start = time.perf_counter()
        for _ in range(repeats):
            for b in blobs:
                np.asarray(Image.open(io.BytesIO(b)))
        rows.append((f"PNG, zlib level {level}", sum(map(len, blobs)), (time.perf_counter() - start) / repeats))
    blobs = [zlib.compress(a.tobytes(), 1) for a in (image, label)]
    start = time.perf_counter()
    for _ in range(repeats):
        for b, a in zip(blobs, (image, label)):
            np.frombuffer(zlib.decompress(b), np.uint8).reshape(a.shape).copy()
    rows.append(("raw pixels, zlib level 1", sum(map(len, blobs)), (time.perf_counter() - start) / repeats))
    with tempfile.NamedTemporaryFile() as f:
        f.write(image.tobytes() + label.tobytes())
        f.flush()
        start = time.perf_counter()
        for _ in range(repeats):
            data = np.memmap(f.name, np.uint8, mode="r")
            np.array(data[:image.size]).reshape(image.shape)
            np.array(data[image.size:]).reshape(label.shape)
            del data
        rows.append(("raw pixels, memory-mapped (prepared copy)", image.size + label.size,
                     (time.perf_counter() - start) / repeats))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12, help="synthetic frames per dataset and split")
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for the second measurement")
    ap.add_argument("--seconds", type=float, default=2.0, help="time each measurement at least this long")
    ap.add_argument("--profile", action="store_true", help="per-stage breakdown of one worker (GTA5 recipes)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # partial-dataset counts
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        make_gta(root, a.images, rng)
        make_synthia(root, a.images, rng)
        make_cityscapes(root, a.images, rng)
        mb = os.path.getsize(os.path.join(root, "gta", "images", "00001.png")) / 2**20
        print(f"{a.images} synthetic frames per dataset and split (GTA5 1914x1052 PNG {mb:.1f} MB each), made in "
              f"{time.perf_counter() - start:.0f} s; torch threads 1, {os.cpu_count()} CPUs")
        splits, table = {}, []
        start, frames = time.perf_counter(), 0
        for name, domain, split_name, with_label, transform, eval_size, batch in recipes():
            key = (domain, split_name, with_label)
            if key not in splits:
                with contextlib.redirect_stderr(io.StringIO()):  # the one-time SYNTHIA label conversion
                    splits[key] = domain_split(domain, split_name, root, labelled=with_label)
            split = splits[key]
            labels = "none" if not with_label else "native" if eval_size is not None else "resized"
            spec = (eval_size, False, "bicubic") if eval_size is not None else \
                (transform.size, transform.keep_ratio, transform.interpolation)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                frames += len(split) if prepare(split, *spec, labels, workers=2, progress=False) else 0
            table.append((name, split, with_label, transform, eval_size, batch))
        print(f"prepared copies: {frames} frames in {time.perf_counter() - start:.1f} s with 2 processes "
              f"(decode + resize + write)")
        print()
        print(f"| recipe | bytes read per image (prepared) | PNG, per worker | prepared, per worker | ratio | "
              f"PNG, {a.num_workers} workers | prepared, {a.num_workers} workers | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for name, split, with_label, transform, eval_size, batch in table:
            rates = []
            for workers in (0, a.num_workers):
                for prepared in (False, True):
                    with contextlib.redirect_stdout(io.StringIO()):
                        ds = dataset(split, with_label, transform, eval_size, prepared)
                    assert ds.frames.prepared == prepared, name
                    rates.append(per_worker(ds, len(split), a.seconds) if workers == 0
                                 else with_workers(ds, batch, workers, a.seconds))
            mb_read = frame_bytes(split, transform, eval_size, with_label) / 1e6
            print(f"| {name} | {mb_read:.2f} MB | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.1f}x | "
                  f"{rates[2]:.1f} | {rates[3]:.1f} | {rates[3] / rates[2]:.1f}x |", flush=True)
        print("images/s; per worker: one process, one thread; workers: batches of the recipe's per-domain batch size "
              "(DeepLab-v2 1, DAFormer 2) arriving in the main process")

        if a.profile:
            gta = splits[("gta", "train", True)]
            for name, _, _, _, transform, _, _ in [r for r in recipes() if r[1] == "gta"][:2]:
                with contextlib.redirect_stdout(io.StringIO()):
                    ds_png, ds_fast = (SegDataset(gta, transform, use_prepared=p) for p in (False, True))
                png, fast = profile(gta, transform, ds_png, ds_fast, len(gta))
                print(f"\nprofile, one worker, {name} (ms per image)")
                print("| stage | PNG path | prepared copy |\n|---|---|---|")
                for stage in list(png) + [s for s in fast if s not in png]:
                    print(f"| {stage} | " + " | ".join(f"{t[stage]:.2f}" if stage in t else "–" for t in (png, fast))
                          + " |")
                print(f"| total | {sum(png.values()):.2f} | {sum(fast.values()):.2f} |")
            print("\none 720x1280 GTA5 frame + label back from storage (the synthetic frames' noise compresses "
                  "worse than real frames)")
            print("| format | bytes | ms |\n|---|---|---|")
            for fmt, nbytes, seconds in storage_alternatives(gta, (720, 1280)):
                print(f"| {fmt} | {nbytes / 1e6:.2f} MB | {seconds * 1000:.1f} |")

    pred = torch.randint(0, 19, (1, 1024, 2048))
    label = torch.randint(0, 19, (1, 1024, 2048))
    confusion = torch.zeros(19, 19, dtype=torch.int64)
    start = time.perf_counter()
    for _ in range(5):
        update_confusion(confusion, pred, label)
    print(f"\nconfusion matrix update, one 2048x1024 image, CPU: {(time.perf_counter() - start) / 5 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
