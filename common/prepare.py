"""Prepared copies: a dataset's frames after a recipe's fixed resize, stored uncompressed and memory-mapped.

Decoding a 1914x1052 GTA5 PNG and resizing it is most of a DataLoader worker's time. A prepared copy holds
what that work produces (images and raw label values at the recipe's size), so a worker reads a frame or
just its crop from the page cache instead. SegDataset (common/data.py) uses a copy automatically when a
valid one matches its dataset and resize; the random part of the transform runs on it exactly as on the
decoded PNGs, so batches are bit for bit the same. Copies are made only by this command:

  python -m common.prepare gta --size 720 1280                     # DeepLab-v2 GTA5 (bicubic)
  python -m common.prepare --recipe daformer gta synthia cityscapes # everything a recipe reads
  python -m common.prepare --list                                   # the copies, their sizes and state

A copy that no longer matches its PNG files (added or changed files, another format version) or is
damaged stops the training script with one error line naming this command; it is never used silently.
"""
import argparse
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.cli import UserError, guard
from common.data import (INTERPOLATIONS, PREPARED_FORMAT, PREPARED_VERSION, _validate_store, domain_split,
                         file_stamp, open_store, prepare_command, prepared_dirs, read_image, read_label,
                         resize_image, resize_label, resized_shape, source_keys, store_name)

# What each recipe reads: domain -> [(split, resize size, keep_ratio, interpolation, labels)].
# labels: "resized" (training), "native" (evaluation: full-resolution labels), "none" (an adaptation target).
# These must follow the scripts; a script that finds no copy prints the exact command for what it reads.
RECIPES = {
    "deeplabv2": {  # source_only, adaptsegnet, advent, bdl, self_regulation
        "gta": [("train", (720, 1280), False, "bicubic", "resized")],
        "synthia": [("train", (760, 1280), False, "bicubic", "resized")],
        "cityscapes": [("train", (512, 1024), False, "bicubic", "none"),
                       ("val", (512, 1024), False, "bicubic", "native")],
    },
    "daformer": {
        "gta": [("train", (720, 1280), True, "cv2-bilinear", "resized")],
        "synthia": [("train", (760, 1280), True, "cv2-bilinear", "resized")],
        "cityscapes": [("train", (512, 1024), True, "cv2-bilinear", "none"),
                       ("val", (512, 1024), False, "bicubic", "native")],
    },
}

_SPLIT = None  # the split being prepared, set in each pool worker


def _init_worker(split):
    global _SPLIT
    _SPLIT = split


def _probe(i):
    """(i, image height, width, source stamps) without decoding the pixels."""
    split = _SPLIT
    try:
        with Image.open(split.images[i]) as img:
            w, h = img.size
    except (OSError, ValueError, SyntaxError) as e:
        return i, f"cannot read image {split.images[i]}: {e}"
    stamps = file_stamp(split.images[i])
    label_stamps = file_stamp(split.labels[i]) if split.labels[i] is not None else []
    return i, (h, w, stamps, label_stamps)


def _pwrite_all(path, array, offset):
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        while len(data):
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    finally:
        os.close(fd)


def _write_frame(job):
    """Decode frame i, apply the fixed resize exactly as TrainTransform.resize does, write it at its offset."""
    i, targets = job  # targets: [(kind, data path, offset, (H, W), interpolation)]
    split = _SPLIT
    try:
        image = read_image(split.images[i])
        for kind, path, offset, shape, interpolation in targets:
            if kind == "images":
                out = image if image.shape[:2] == shape else resize_image(image, shape, interpolation)
            else:
                raw = read_label(split.labels[i])
                split.train_ids(raw, i)  # the value check of the PNG path, with today's classes
                raw = split.fit_label(raw, image.shape[:2], i)  # nearest, so raw ids = train ids resized
                out = raw if raw.shape == shape else resize_label(raw, shape, interpolation)
            _pwrite_all(path, out, offset)
    except UserError as e:
        return str(e)
    return None


def _run(function, jobs, workers, split, desc=None):
    """function over jobs (inline for workers <= 1), results in job order, with a progress bar when desc."""
    bar = dict(total=len(jobs), desc=desc, file=sys.stderr, disable=desc is None, unit="frame", dynamic_ncols=True)
    if workers <= 1:
        _init_worker(split)
        return [function(job) for job in tqdm(jobs, **bar)]
    with Pool(workers, initializer=_init_worker, initargs=(split,)) as pool:
        return list(tqdm(pool.imap(function, jobs, chunksize=4), **bar))


def _gb(n):
    return f"{n / 1e9:.2f} GB"


def prepare(split, size=None, keep_ratio=False, interpolation="bicubic", labels="resized", workers=None,
            progress=True):
    """Make the copy of `split` that SegDataset looks for (images, and labels unless labels == "none");
    valid stores are kept, stale or broken ones rebuilt. Returns the paths of the data files."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    if split.toy is not None or split.root is None:
        raise UserError(f"{split.name} is generated on the fly; there is nothing to prepare")
    size = tuple(int(v) for v in size) if size is not None else None
    if labels != "none" and not split.labelled:
        raise UserError(f"{split.name} {split.split} has no labels: use --labels none")
    kinds = {"images": size} if labels == "none" else {"images": size, "labels": None if labels == "native" else size}
    todo = {}
    for kind, kind_size in kinds.items():
        try:
            if open_store(split, kind, kind_size, keep_ratio, interpolation, labels) is not None:
                continue
        except UserError:
            pass  # stale or broken: rebuilt below
        todo[kind] = kind_size
    command = prepare_command(split, size, keep_ratio, interpolation, labels)
    if not todo:
        print(f"{split.name} {split.split}: the prepared copy is up to date ({command})")
        return []
    workers = workers if workers is not None else max(1, min(8, os.cpu_count() or 1))

    probes = _run(_probe, list(range(len(split))), workers, split)
    problem = next((p for _, p in probes if isinstance(p, str)), None)
    if problem:
        raise UserError(problem)
    folder = _writable_folder(split)
    plans = []
    for kind, kind_size in todo.items():
        shapes = [resized_shape(h, w, kind_size, keep_ratio) for _, (h, w, _, _) in probes]
        native = all(shape == (h, w) for shape, (_, (h, w, _, _)) in zip(shapes, probes))
        stored_size = None if native else kind_size  # a resize that changes nothing is stored (and found) as native
        name = store_name(kind, stored_size, keep_ratio, interpolation)
        channels = 3 if kind == "images" else 0
        sizes = [h * w * max(channels, 1) for h, w in shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()
        items = [[key, h, w, *shape, *stamps, *(label_stamps if kind == "labels" else [])]
                 for key, (_, (h, w, stamps, label_stamps)), shape in zip(source_keys(split), probes, shapes)]
        manifest = {"format": PREPARED_FORMAT, "version": PREPARED_VERSION, "kind": kind, "domain": split.name,
                    "split": split.split, "name": name, "channels": channels,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "spec": {"size": list(stored_size) if stored_size else None, "keep_ratio": keep_ratio,
                             "interpolation": interpolation},
                    "items": items}
        plans.append((kind, os.path.join(folder, name), shapes, offsets, sum(sizes), manifest))

    total = sum(p[4] for p in plans)
    reclaimed = sum(os.path.getsize(p[1] + ".u8") for p in plans if os.path.isfile(p[1] + ".u8"))
    free = shutil.disk_usage(folder).free
    if total > free + reclaimed:
        raise UserError(f"the prepared copy of {split.name} {split.split} needs {_gb(total)}, {folder} has "
                        f"{_gb(free + reclaimed)} free")
    for _, stem, _, _, nbytes, _ in plans:
        for old in (stem + ".json", stem + ".u8", stem + ".u8.partial"):  # a stale copy goes, manifest first
            if os.path.exists(old):
                os.remove(old)
        with open(stem + ".u8.partial", "wb") as f:
            f.truncate(nbytes)
    jobs = [(i, [(kind, stem + ".u8.partial", offsets[i], shapes[i], interpolation)
                 for kind, stem, shapes, offsets, _, _ in plans]) for i in range(len(split))]
    print(f"preparing {split.name} {split.split} ({len(split)} frames, {_gb(total)}) in {folder}", file=sys.stderr)
    desc = f"{split.name} {split.split} " + " + ".join(os.path.basename(p[1]) for p in plans)
    problem = next((p for p in _run(_write_frame, jobs, workers, split, desc if progress else None) if p), None)
    if problem:
        raise UserError(problem)
    paths = []
    for _, stem, _, _, _, manifest in plans:
        with open(stem + ".u8.partial", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(stem + ".u8.partial", stem + ".u8")
        with open(stem + ".json.partial", "w") as f:
            json.dump(manifest, f, separators=(",", ":"))
        os.replace(stem + ".json.partial", stem + ".json")
        paths.append(stem + ".u8")
    print(f"{split.name} {split.split}: wrote {', '.join(paths)} ({_gb(total)})")
    return paths


def _writable_folder(split):
    for folder in prepared_dirs(split):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise UserError(f"cannot write a prepared copy to any of {', '.join(prepared_dirs(split))}")


def list_copies(data_root):
    """One line per store under data_root/prepared (and the ~/.cache fallback): size, frames, state."""
    rows = []
    for domain in ("gta", "synthia", "cityscapes"):
        for split_name in ("train", "val"):
            if not os.path.isdir(os.path.join(data_root, domain)) or (domain != "cityscapes" and split_name == "val"):
                continue
            folders = [f for f in prepared_dirs(_stub(domain, split_name, data_root)) if os.path.isdir(f)]
            manifests = sorted(os.path.join(f, n) for f in folders for n in os.listdir(f) if n.endswith(".json"))
            for path in manifests:
                rows.append(_describe(path, domain, split_name, data_root))
    print("\n".join(rows) if rows else f"no prepared copies for {data_root}")


def _stub(domain, split_name, data_root):
    from common.data import DomainSplit
    return DomainSplit(domain, split_name, [], [], [], root=data_root)


def _describe(manifest_path, domain, split_name, data_root):
    data_path = manifest_path[:-len(".json")] + ".u8"
    nbytes = os.path.getsize(data_path) if os.path.isfile(data_path) else 0
    try:
        with open(manifest_path) as f:
            m = json.load(f)
        kind, spec = m["kind"], m["spec"]
        split = domain_split(domain, split_name, data_root, labelled=kind == "labels")
        size = tuple(spec["size"]) if spec["size"] else None
        _validate_store(split, kind, manifest_path, size, spec["keep_ratio"],
                        prepare_command(split, size, spec["keep_ratio"], spec["interpolation"]))
        state = f"valid, {len(m['items'])} frames"
    except UserError as e:
        state = str(e)
    except (OSError, ValueError, KeyError, TypeError) as e:
        state = f"broken: {e}"
    return f"{data_path}  {_gb(nbytes)}  {state}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("domains", nargs="*", help="gta, synthia, cityscapes or a folder dataset path")
    ap.add_argument("--data-root", default="data", help="where gta/, synthia/, cityscapes/ live (default: data)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), help="prepare what this recipe reads from each domain")
    ap.add_argument("--split", default="train", choices=["train", "val"])
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="the resize; omitted: native size")
    ap.add_argument("--keep-ratio", action="store_true", help="fit into H x W keeping the aspect ratio (DAFormer)")
    ap.add_argument("--interpolation", default="bicubic", choices=INTERPOLATIONS, help="image filter (default bicubic)")
    ap.add_argument("--labels", choices=["resized", "native", "none"],
                    help="resized with the image (default for train), full resolution (default for val), or none")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    ap.add_argument("--list", action="store_true", help="list the copies under --data-root with size and state")
    a = ap.parse_args(argv)
    if a.list:
        return list_copies(a.data_root)
    if not a.domains:
        raise UserError("name a domain (gta, synthia, cityscapes or a folder dataset), or pass --list")
    if a.recipe:
        if a.size or a.keep_ratio or a.labels or a.split != "train" or a.interpolation != "bicubic":
            raise UserError("--recipe sets the split, size, interpolation and labels itself; pass either --recipe "
                            "or those flags")
        unknown = [d for d in a.domains if d not in RECIPES[a.recipe]]
        if unknown:
            raise UserError(f"recipe {a.recipe} knows {', '.join(RECIPES[a.recipe])}, not {', '.join(unknown)}")
        jobs = [(d, *entry) for d in a.domains for entry in RECIPES[a.recipe][d]]
    else:
        if len(a.domains) != 1:
            raise UserError("without --recipe, prepare one domain at a time")
        jobs = [(a.domains[0], a.split, a.size, a.keep_ratio, a.interpolation,
                 a.labels or ("native" if a.split == "val" else "resized"))]
    for domain, split_name, size, keep_ratio, interpolation, labels in jobs:
        split = domain_split(domain, split_name, a.data_root, labelled=labels != "none")
        prepare(split, size, keep_ratio, interpolation, labels, a.workers)


if __name__ == "__main__":
    guard(main)
