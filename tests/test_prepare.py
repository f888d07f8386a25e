"""Prepared copies (common/prepare.py): same tensors as the PNG path, exact resume, stale and broken copies."""
import dataclasses
import json
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import UserError
from common.data import InfiniteSampler, SegDataset, TrainTransform, domain_split, eval_loader, train_loader
from common.png16 import write_png16
from common.prepare import main, prepare

GTA_IDS = np.array([7, 8, 11, 0, 26, 24], np.uint8)  # road, sidewalk, building, unlabelled, car, person


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def random_frame(rng, h, w):
    """A smooth image with noise and blocky labels, so crops see several classes."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.clip((np.sin(xx / 5) * 60 + yy * 2)[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return image, (yy // 9 + xx // 13) % 6


@pytest.fixture
def gta(tmp_path):
    """4 GTA5-like frames: one of another size, one whose label is half the image size (as a few real ones)."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(52, 96), (50, 96), (52, 96), (60, 80)]):
        image, regions = random_frame(rng, h, w)
        label = GTA_IDS[regions]
        save(tmp_path / f"gta/images/{i + 1:05d}.png", image)
        save(tmp_path / f"gta/labels/{i + 1:05d}.png", label[::2, ::2] if i == 2 else label)
    with pytest.warns(UserWarning):
        return domain_split("gta", "train", str(tmp_path))


def items(dataset, n=12, seed=3):
    keys = [k for _, k in zip(range(n), iter(InfiniteSampler(len(dataset), seed)))]
    return [dataset[k] for k in keys]


def assert_same_items(a, b):
    assert len(a) == len(b)
    for (img_a, lab_a, i_a), (img_b, lab_b, i_b) in zip(a, b):
        assert i_a == i_b and img_a.dtype == img_b.dtype == torch.uint8
        assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)


RECIPES = {
    "deeplabv2-bicubic": TrainTransform(size=(36, 64)),
    "daformer-keep-ratio-cv2-crop": TrainTransform(size=(36, 64), keep_ratio=True, crop=(16, 16), cat_max_ratio=0.75,
                                                   flip=True, interpolation="cv2-bilinear"),
    "proda-rescale-crop": TrainTransform(size=(40, 70), scale=(0.5, 1.5), crop=(16, 24), flip=True,
                                         interpolation="bilinear"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_prepared_copy_gives_the_png_paths_tensors(gta, recipe, capsys):
    transform = RECIPES[recipe]
    png = SegDataset(gta, transform, use_prepared=False)
    prepare(gta, transform.size, transform.keep_ratio, transform.interpolation, workers=0)
    fast = SegDataset(gta, transform)
    assert fast.frames.prepared and not png.frames.prepared
    assert_same_items(items(png), items(fast))
    SegDataset(gta, transform)
    out = capsys.readouterr().out
    assert out.count("from the prepared copy") == 1  # one line, once per process


def test_prepared_path_resumes_exactly_and_ignores_worker_count(gta):
    transform = RECIPES["daformer-keep-ratio-cv2-crop"]
    prepare(gta, transform.size, transform.keep_ratio, transform.interpolation, workers=0)
    fast = SegDataset(gta, transform)
    reference = train_loader(SegDataset(gta, transform, use_prepared=False), 2, seed=7, num_workers=0)
    expected = [next(reference) for _ in range(5)]
    in_process = train_loader(fast, 2, seed=7, num_workers=0)
    two_workers = train_loader(fast, 2, seed=7, num_workers=2)
    resumed = train_loader(fast, 2, seed=7, start_iter=3, num_workers=2)
    for loader, first in ((in_process, 0), (two_workers, 0), (resumed, 3)):
        for want in expected[first:]:
            got = next(loader)
            assert all(torch.equal(g, w) for g, w in zip(got, want))


def make_cityscapes_val(root, n=2):
    rng = np.random.default_rng(1)
    for i in range(n):
        image, regions = random_frame(rng, 32, 64)
        name = f"frankfurt_000000_{i:06d}"
        save(root / f"cityscapes/leftImg8bit/val/frankfurt/{name}_leftImg8bit.png", image)
        save(root / f"cityscapes/gtFine/val/frankfurt/{name}_gtFine_labelIds.png", GTA_IDS[regions])
    with pytest.warns(UserWarning):
        return domain_split("cityscapes", "val", str(root))


def test_eval_dataset_reads_resized_images_and_full_resolution_labels(tmp_path):
    val = make_cityscapes_val(tmp_path)
    png = SegDataset(val, eval_size=(16, 32), use_prepared=False)
    paths = prepare(val, (16, 32), labels="native", workers=0)
    assert [os.path.basename(p) for p in paths] == ["images-16x32-bicubic.u8", "labels-native.u8"]
    fast = SegDataset(val, eval_size=(16, 32))
    assert fast.frames.prepared
    got, want = list(eval_loader(fast, num_workers=0)), list(eval_loader(png, num_workers=0))
    assert got[0][0].shape == (1, 3, 16, 32) and got[0][1].shape == (1, 32, 64)
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))
    # another eval interpolation is another copy: not found, so the PNG files are read
    assert not SegDataset(val, eval_size=(16, 32), eval_interpolation="bilinear").frames.prepared


def test_native_copy_serves_every_resize_that_changes_nothing(tmp_path):
    """SYNTHIA at 760x1280 is its native size: one copy serves DeepLab-v2, DAFormer and the 16-class head."""
    rng = np.random.default_rng(2)
    os.makedirs(tmp_path / "synthia/GT/LABELS")
    for i in range(2):
        image, regions = random_frame(rng, 38, 64)
        save(tmp_path / f"synthia/RGB/{i:07d}.png", image)
        label16 = np.zeros((38, 64, 3), np.uint16)
        label16[..., 0] = np.array([3, 4, 2, 8, 10, 13])[regions]  # SYNTHIA ids (16 terrain never occurs)
        write_png16(str(tmp_path / f"synthia/GT/LABELS/{i:07d}.png"), label16)
    with pytest.warns(UserWarning):
        split19 = domain_split("synthia", "train", str(tmp_path))
    paths = prepare(split19, (38, 64), workers=0)
    assert [os.path.basename(p) for p in paths] == ["images-native.u8", "labels-native.u8"]
    with pytest.warns(UserWarning):
        split16 = domain_split("synthia", "train", str(tmp_path), synthia_classes=16)
    daformer = TrainTransform(size=(38, 64), keep_ratio=True, crop=(16, 16), cat_max_ratio=0.75, flip=True,
                              interpolation="cv2-bilinear")
    for split in (split19, split16):
        for transform in (TrainTransform(size=(38, 64)), daformer, TrainTransform(crop=(20, 20))):
            fast = SegDataset(split, transform)
            assert fast.frames.prepared
            assert_same_items(items(SegDataset(split, transform, use_prepared=False), 6), items(fast, 6))
    assert not SegDataset(split19, TrainTransform(size=(19, 32))).frames.prepared  # a real resize: not native


def test_subset_and_partial_copies(gta, capsys):
    transform = RECIPES["deeplabv2-bicubic"]
    prepare(gta, transform.size, labels="none", workers=0)
    assert not SegDataset(gta, transform).frames.prepared  # labels missing: the PNG files, with a note
    assert "lacks the labels" in capsys.readouterr().out
    assert SegDataset(gta, transform, with_label=False).frames.prepared
    prepare(gta, transform.size, workers=0)
    first_two = dataclasses.replace(gta, images=gta.images[:2], labels=gta.labels[:2])  # bdl's --source-limit
    assert_same_items(items(SegDataset(first_two, transform, use_prepared=False), 4),
                      items(SegDataset(first_two, transform), 4))
    data = os.path.join(str(gta.root), "prepared", "gta-train", "images-36x64-bicubic.u8")
    mtime = os.stat(data).st_mtime_ns
    prepare(gta, transform.size, workers=0)  # up to date: nothing rewritten
    assert os.stat(data).st_mtime_ns == mtime


def one_line_error(split, transform, match):
    with pytest.raises(UserError, match=match) as e:
        SegDataset(split, transform)
    message = str(e.value)
    assert "\n" not in message and "python -m common.prepare gta" in message and "--size 36 64" in message
    return message


def test_stale_copy_is_an_error_never_used(gta, tmp_path):
    transform = RECIPES["deeplabv2-bicubic"]
    prepare(gta, transform.size, workers=0)
    label = gta.labels[1]
    os.utime(label, ns=(os.stat(label).st_atime_ns, os.stat(label).st_mtime_ns + 10**9))  # a label re-extracted
    one_line_error(gta, transform, r"labels-36x64-nearest.u8 is stale \(1 source files changed.*00002.png")
    prepare(gta, transform.size, workers=0)  # the rebuild command fixes it
    assert SegDataset(gta, transform).frames.prepared
    save(tmp_path / "gta/images/00005.png", np.zeros((52, 96, 3), np.uint8))  # one more frame in the dataset
    save(tmp_path / "gta/labels/00005.png", np.zeros((52, 96), np.uint8))
    with pytest.warns(UserWarning):
        grown = domain_split("gta", "train", str(tmp_path))
    one_line_error(grown, transform, r"is stale \(1 of the 5 frames are not in it, e.g. gta/images/00005.png\)")
    prepare(grown, transform.size, workers=0)
    manifest = tmp_path / "prepared/gta-train/images-36x64-bicubic.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "version": m["version"] - 1}))  # made by an older format
    one_line_error(grown, transform, "is stale .format version")


@pytest.mark.parametrize("damage", ["truncated", "manifest", "shape"])
def test_broken_copy_is_an_error_never_used(gta, tmp_path, damage):
    transform = RECIPES["deeplabv2-bicubic"]
    prepare(gta, transform.size, workers=0)
    stem = tmp_path / "prepared/gta-train/images-36x64-bicubic"
    if damage == "truncated":
        with open(f"{stem}.u8", "rb+") as f:
            f.truncate(1000)
        match = r"is broken \(1000 data bytes"
    elif damage == "manifest":
        stem.with_suffix(".json").write_text('{"format": "uda-seg prepared copy", "items": [')
        match = r"is broken \(unreadable manifest"
    else:
        m = json.loads(stem.with_suffix(".json").read_text())
        m["items"][0][3] = 35  # the first frame stored with 35 rows
        stem.with_suffix(".json").write_text(json.dumps(m))
        match = r"is broken \(frame gta/images/00001.png has the wrong shape"
    one_line_error(gta, transform, match)


@pytest.mark.filterwarnings("ignore:gta train. found 4")
def test_prepare_command_line(gta, tmp_path, capsys, script_runner):
    """The command a dataset without a copy prints makes the copy it then uses."""
    root = str(tmp_path)
    assert not SegDataset(gta, RECIPES["daformer-keep-ratio-cv2-crop"]).frames.prepared
    hint = capsys.readouterr().out
    command = shlex.split(hint.split("`")[1])
    assert command[:3] == ["python", "-m", "common.prepare"]
    main(command[3:] + ["--workers", "2"])
    assert "100%" in capsys.readouterr().err  # the progress bar
    assert os.path.isfile(tmp_path / "prepared/gta-train/images-36x64-keep-cv2-bilinear.u8")
    assert SegDataset(gta, RECIPES["daformer-keep-ratio-cv2-crop"]).frames.prepared
    main(["--list", "--data-root", root])
    listed = capsys.readouterr().out
    assert "images-36x64-keep-cv2-bilinear.u8" in listed and "valid, 4 frames" in listed
    bad = script_runner("-m", "common.prepare", "--recipe", "daformer", "gta", "--size", "1", "1", "--data-root", root)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --recipe sets the split, size, interpolation and labels itself; pass either --recipe or those flags"]
