"""Label mappings on fixture files in the real layouts, transforms, sampler, normalisation."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import UserError
from common.data import (CITYSCAPES_CLASSES, SegDataset, TrainTransform, InfiniteSampler, class_setup, domain_split,
                         normalize, random_crop)
from common.png16 import write_png16


def save_rgb(path, h, w, value=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def save_label(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


# raw Cityscapes/GTA label id -> expected train id (datasets.md section 3)
CITYSCAPES_CASES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18, 0: 255, 1: 255, 6: 255, 9: 255, 10: 255,
                    14: 255, 15: 255, 16: 255, 18: 255, 29: 255, 30: 255, 34: 255, 255: 255}
# SYNTHIA id -> expected 19-class train id (datasets.md section 4)
SYNTHIA_CASES = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                 18: 14, 19: 15, 20: 16, 12: 17, 11: 18, 0: 255, 13: 255, 14: 255, 22: 255}


def row_of(values):
    return np.array([list(values)], dtype=np.int64)


def test_gta_labels_map_to_train_ids(tmp_path):
    raw = row_of(CITYSCAPES_CASES)
    save_rgb(tmp_path / "gta/images/00001.png", 1, raw.shape[1])
    save_label(tmp_path / "gta/labels/00001.png", raw)
    save_rgb(tmp_path / "gta/images/00002.png", 1, raw.shape[1])  # no label: skipped with a warning
    with pytest.warns(UserWarning):
        split = domain_split("gta", "train", str(tmp_path))
    assert len(split) == 1 and split.classes == CITYSCAPES_CLASSES and split.paper_size == (720, 1280)
    _, label = split.load(0)
    assert label.tolist()[0] == list(CITYSCAPES_CASES.values())


def test_gta_label_size_mismatch_is_resized(tmp_path):
    save_rgb(tmp_path / "gta/images/00001.png", 4, 8)
    save_label(tmp_path / "gta/labels/00001.png", np.full((2, 4), 26))
    with pytest.warns(UserWarning):
        image, label = domain_split("gta", "train", str(tmp_path)).load(0)
    assert label.shape == image.shape[:2] and (label == 13).all()


def test_cityscapes_layout_and_mapping(tmp_path):
    raw = row_of(CITYSCAPES_CASES)
    name = "frankfurt_000000_000294"
    save_rgb(tmp_path / f"cityscapes/leftImg8bit/val/frankfurt/{name}_leftImg8bit.png", 1, raw.shape[1])
    save_label(tmp_path / f"cityscapes/gtFine/val/frankfurt/{name}_gtFine_labelIds.png", raw)
    save_label(tmp_path / f"cityscapes/gtFine/val/frankfurt/{name}_gtFine_color.png", raw)  # distractor
    with pytest.warns(UserWarning):  # 1 of 500 val images
        split = domain_split("cityscapes", "val", str(tmp_path))
    assert len(split) == 1 and split.item_name(0) == f"{name}_leftImg8bit"
    assert split.load(0)[1].tolist()[0] == list(CITYSCAPES_CASES.values())
    # an unlabelled target train split needs no gtFine folder
    save_rgb(tmp_path / f"cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", 2, 2)
    with pytest.warns(UserWarning):
        train = domain_split("cityscapes", "train", str(tmp_path), labelled=False)
    assert not train.labelled and train.load(0)[1] is None


def test_synthia_16bit_labels_are_decoded_and_cached(tmp_path):
    ids = row_of(SYNTHIA_CASES)
    h, w = 2, ids.shape[1]
    label16 = np.zeros((h, w, 3), np.uint16)
    label16[..., 0] = ids  # class id in R
    label16[..., 1] = 1000 + np.arange(w)  # instance ids in G: must not leak into the class
    label16[..., 2] = 65535
    os.makedirs(tmp_path / "synthia/GT/LABELS")
    write_png16(str(tmp_path / "synthia/GT/LABELS/0000000.png"), label16, filters=(1, 4))
    save_rgb(tmp_path / "synthia/RGB/0000000.png", h, w)
    # Pillow alone would read every id as 0 (only the high byte of each 16-bit sample survives)
    assert np.asarray(Image.open(tmp_path / "synthia/GT/LABELS/0000000.png").convert("RGB"))[..., 0].max() == 0
    with pytest.warns(UserWarning):
        split = domain_split("synthia", "train", str(tmp_path))
    assert split.load(0)[1][0].tolist() == list(SYNTHIA_CASES.values())
    cached = tmp_path / "synthia/GT/LABELS_trainids/0000000.png"
    assert cached.is_file()
    mtime = cached.stat().st_mtime_ns
    with pytest.warns(UserWarning):
        split16 = domain_split("synthia", "train", str(tmp_path), synthia_classes=16)
    assert cached.stat().st_mtime_ns == mtime  # converted once, reused after
    expected16 = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 255, 10: 9, 11: 10, 12: 11, 13: 12,
                  14: 255, 15: 13, 16: 255, 17: 14, 18: 15, 255: 255}
    assert split16.load(0)[1][0].tolist() == [expected16[v] for v in SYNTHIA_CASES.values()]
    assert len(split16.classes) == 16 and "terrain" not in split16.classes


def test_synthia_rejects_ids_beyond_22(tmp_path):
    label16 = np.full((2, 2, 3), 40, np.uint16)
    os.makedirs(tmp_path / "synthia/GT/LABELS")
    write_png16(str(tmp_path / "synthia/GT/LABELS/0000001.png"), label16)
    save_rgb(tmp_path / "synthia/RGB/0000001.png", 2, 2)
    with pytest.warns(UserWarning), pytest.raises(UserError, match="0000001.png"):
        domain_split("synthia", "train", str(tmp_path))


def test_class_setup_16_way_synthia_maps_into_19():
    classes, eval_classes, pred_map = class_setup("synthia", "cityscapes", 16)
    assert len(classes) == 16 and len(eval_classes) == 19
    assert [eval_classes[i] for i in pred_map.tolist()] == classes
    assert class_setup("gta", "cityscapes")[2] is None
    with pytest.raises(UserError, match="class lists differ"):
        class_setup("toy-synth", "cityscapes")


def make_folder(root, classes=("a", "b", "c"), n=2, h=16, w=24, label_value=1):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    for split in ("train", "val"):
        for i in range(n):
            save_rgb(os.path.join(root, "images", split, f"im{i}.png"), h, w, 40 * i)
            lab = np.full((h, w), label_value, np.uint8)
            lab[0] = 255
            save_label(os.path.join(root, "labels", split, f"im{i}.png"), lab)
    return root


def test_folder_dataset(tmp_path):
    root = make_folder(str(tmp_path / "mine"))
    split = domain_split(root, "val")
    assert split.classes == ["a", "b", "c"] and len(split) == 2
    image, label = split.load(1)
    assert image.shape == (16, 24, 3) and set(np.unique(label)) == {1, 255}
    os.remove(os.path.join(root, "labels", "val", "im1.png"))
    with pytest.raises(UserError, match="im1.png has no label"):
        domain_split(root, "val")
    assert len(domain_split(root, "val", labelled=False)) == 2  # labels are optional for a target


def test_folder_dataset_bad_label_value(tmp_path):
    root = make_folder(str(tmp_path / "bad"), label_value=7)
    with pytest.raises(UserError, match=r"im0.png holds value 7, which is neither a class \(0-2\) nor 255"):
        domain_split(root, "train").load(0)


def test_truncated_image_names_the_file(tmp_path):
    root = make_folder(str(tmp_path / "trunc"))
    path = os.path.join(root, "images", "train", "im0.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="im0.png"):
        domain_split(root, "train").load(0)


def test_missing_dataset_folder_message(tmp_path):
    with pytest.raises(UserError, match=r"gta/images.*README"):
        domain_split("gta", "train", str(tmp_path))
    with pytest.raises(UserError, match="unknown dataset"):
        domain_split("no-such-thing", "train", str(tmp_path))


def test_train_transform_resize_crop_flip_keep_labels_aligned():
    image = np.zeros((40, 80, 3), np.uint8)
    label = np.zeros((40, 80), np.uint8)
    image[:, :40, 0], label[:, :40] = 200, 1  # left half class 1 and red
    t = TrainTransform(size=(20, 40), crop=(10, 10), flip=True)
    for seed in range(20):
        img, lab = t(image, label, np.random.default_rng(seed))
        assert img.shape == (10, 10, 3) and lab.shape == (10, 10)
        assert ((img[..., 0] > 100) == (lab == 1)).all()
    # the resize keeps the label nearest (no invented values)
    _, lab = TrainTransform(size=(7, 13))(image, label, np.random.default_rng(0))
    assert set(np.unique(lab)) <= {0, 1}


def test_random_crop_pads_with_ignore_and_cat_max_ratio():
    image, label = np.ones((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)
    assert random_crop(np.ones((9, 9, 3), np.uint8), None, [5], np.random.default_rng(0))[0].shape == (5, 5, 3)
    img, lab = random_crop(image, label, (6, 6), np.random.default_rng(0))
    assert img.shape == (6, 6, 3) and (lab == 255).sum() == 36 - 16
    label = np.zeros((20, 20), np.uint8)
    label[:, 15:] = 1  # a crop of 10 columns can have both classes only at x in 6..14
    hits = sum(np.bincount(random_crop(np.zeros((20, 20, 3), np.uint8), label, (10, 10),
                                       np.random.default_rng(s), 0.75)[1].ravel(), minlength=2).min() > 25
               for s in range(30))
    assert hits >= 25  # without the rule only ~1/11 of crops would qualify


def test_sampler_is_a_pure_function_of_seed_and_position():
    full = InfiniteSampler(7, seed=3)
    stream = [x for _, x in zip(range(30), iter(full))]
    assert sorted(i for i, _ in stream[:7]) == list(range(7))  # each epoch is a permutation
    resumed = InfiniteSampler(7, seed=3, start=11)
    assert [x for _, x in zip(range(19), iter(resumed))] == stream[11:]
    ranks = [InfiniteSampler(7, seed=3, rank=r, world=2) for r in range(2)]
    r0, r1 = ([x for _, x in zip(range(5), iter(s))] for s in ranks)
    assert [v for pair in zip(r0, r1) for v in pair] == stream[:10]  # ranks interleave one stream


def test_dataset_items_and_eval_mode(tmp_path):
    root = make_folder(str(tmp_path / "ds"), h=16, w=24)
    split = domain_split(root, "val")
    image, label, index = SegDataset(split, TrainTransform(crop=(8, 8)))[(1, 123)]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label.shape == (8, 8) and index == 1
    again = SegDataset(split, TrainTransform(crop=(8, 8)))[(1, 123)]
    assert torch.equal(image, again[0])  # the same sample seed gives the same augmentation
    image, label, _ = SegDataset(split, eval_size=(4, 6))[0]
    assert image.shape == (3, 4, 6) and label.shape == (16, 24)  # label stays at full resolution


def test_normalize_modes():
    x = torch.tensor([[[[255]], [[0]], [[128]]]], dtype=torch.uint8)  # R=255, G=0, B=128
    imagenet = normalize(x, "imagenet")
    assert torch.allclose(imagenet[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224,
                                                                (128 / 255 - 0.406) / 0.225]), atol=1e-5)
    caffe = normalize(x, "caffe")  # BGR order, 0-255 minus the BGR means, no std
    assert torch.allclose(caffe[0, :, 0, 0], torch.tensor([128 - 104.00698793, 0 - 116.66876762,
                                                           255 - 122.67891434]), atol=1e-3)
    assert torch.allclose(normalize(x, "unit")[0, :, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))


def test_loaders_leave_the_global_rng_alone(tmp_path):
    """Creating loaders (at start, after resume, at each evaluation) must not shift dropout randomness."""
    from common.data import eval_loader, train_loader
    split = domain_split(make_folder(str(tmp_path / "rng")), "val")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(train_loader(SegDataset(split, TrainTransform()), 1, seed=5, num_workers=0))
    list(eval_loader(SegDataset(split, eval_size=(8, 8)), num_workers=0))
    assert torch.equal(torch.rand(3), expected)
