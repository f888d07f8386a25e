"""Datasets, label mappings, transforms and loaders shared by every script.

A *domain split* is a list of (image, label) files plus the lookup table that maps raw label values to
train ids. Built-in domains: `gta`, `synthia`, `cityscapes` (layouts in README "Datasets" and
datasets.md), the procedural toy pairs `toy-synth`/`toy-real` and `toy2-synth`/`toy2-real`, and any folder
dataset (interface.md).
Loaders yield uint8 tensors; scripts normalise on the device (4x less host-to-device traffic).
Randomness: every training sample gets its own seed from the sampler, so augmentation does not depend
on worker count, and a resumed run sees exactly the samples an uninterrupted run would.
Frames come from a prepared copy (common/prepare.py: stored at the recipe's resize, memory-mapped) when a
valid one matches the dataset and resize, else from the PNG files; both give the same tensors.
"""
import json
import os
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.cli import UserError
from common.png16 import read_label_channel
from common.toy import TOY_CLASSES, TOY_DOMAINS, TOY_PALETTE, ToyDomain

README_HINT = "see README.md, section 'Datasets'"

# ----------------------------------------------------------------------------------------------------
# Classes and label maps (datasets.md sections 3-5)
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                      (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                      (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                      (0, 80, 100), (0, 0, 230), (119, 11, 32)]
# Cityscapes labelId (also GTA5's label values) of train ids 0..18
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
# SYNTHIA-RAND-CITYSCAPES class id of train ids 0..18 (terrain 16, truck 18, train 20 never occur)
SYNTHIA_LABEL_IDS = [3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11]
# the 16- and 13-class protocols as indices into the 19 train ids
TRAINIDS_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
TRAINIDS_13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]


def make_lut(ids_of_train_ids) -> np.ndarray:
    """A 256-entry uint8 table: raw id -> train id, everything else -> 255 (ignore)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for train_id, raw in enumerate(ids_of_train_ids):
        lut[raw] = train_id
    return lut


CITYSCAPES_LUT = make_lut(CITYSCAPES_LABEL_IDS)
SYNTHIA_LUT = make_lut(SYNTHIA_LABEL_IDS)
TRAINID19_TO_16_LUT = make_lut(TRAINIDS_16)  # 19 train ids -> 16-class ids (terrain, truck, train -> 255)


def palette_for(classes) -> list:
    """Cityscapes colours for Cityscapes class names, stable generated colours for any other name."""
    known = dict(zip(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)) | dict(zip(TOY_CLASSES, TOY_PALETTE))
    out = []
    for name in classes:
        if name in known:
            out.append(known[name])
        else:
            h = zlib.crc32(name.encode())
            out.append(((h >> 16) & 255, (h >> 8) & 255, h & 255))
    return out


# ----------------------------------------------------------------------------------------------------
# Domain splits
@dataclass
class DomainSplit:
    """One split of one domain: file lists, class names and the raw-label -> train-id table."""
    name: str
    split: str
    classes: list
    images: list  # file paths (for the toy domains: item names)
    labels: list  # file paths or None (unlabelled)
    lut: np.ndarray = None  # raw label value -> train id; None: labels already hold train ids
    paper_size: tuple = None  # (H, W) the DLv2 papers resize this domain to for training; None: native
    toy: ToyDomain = None
    resize_label_to_image: bool = False  # GTA5: a few labels differ in size from their image
    meta: dict = field(default_factory=dict)
    root: str = None  # the data root (folder datasets: their folder); prepared copies live in root/prepared

    def __len__(self):
        return len(self.images)

    @property
    def labelled(self) -> bool:
        return len(self.labels) > 0 and all(p is not None for p in self.labels)

    def item_name(self, i) -> str:
        return os.path.splitext(os.path.basename(self.images[i]))[0]

    def load(self, i, with_label=True):
        """(uint8 HxWx3 RGB image, uint8 HxW train-id label or None)."""
        if self.toy is not None:
            image, label = self.toy[i]
            return image, (label if with_label else None)
        image = read_image(self.images[i])
        if not with_label or self.labels[i] is None:
            return image, None
        return image, self.fit_label(self.load_label(i), image.shape[:2], i)

    def load_label(self, i) -> np.ndarray:
        if self.toy is not None:
            return self.toy[i][1]
        return self.train_ids(read_label(self.labels[i]), i)

    def train_ids(self, raw, i) -> np.ndarray:
        """Raw label values of item i -> train ids, checking that each is a class or 255."""
        label = self.lut[raw] if self.lut is not None else raw
        bad = (label >= len(self.classes)) & (label != 255)
        if bad.any():
            value = int(label[bad][0])
            raise UserError(f"label {self.labels[i]} holds value {value}, which is neither a class "
                            f"(0-{len(self.classes) - 1}) nor 255")
        return label

    def fit_label(self, label, image_shape, i) -> np.ndarray:
        """The label of item i at its image's size (nearest; GTA5 only, elsewhere a size mismatch is an error)."""
        if label.shape == tuple(image_shape):
            return label
        if not self.resize_label_to_image:
            raise UserError(f"label {self.labels[i]} is {label.shape[1]}x{label.shape[0]} but its image is "
                            f"{image_shape[1]}x{image_shape[0]}")
        return resize_label(label, image_shape)


def read_image(path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def read_label(path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise UserError(f"label {path} has mode {img.mode}; expected an 8-bit single-channel PNG")
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read label {path}: {e}") from None


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise UserError(f"{what} not found: expected the folder {path} ({README_HINT})")


def _list(folder, suffixes=(".png", ".jpg", ".jpeg")):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(suffixes))


def _warn_count(name, split, n, expected):
    if n != expected:
        warnings.warn(f"{name} {split}: found {n} image/label pairs, the full set has {expected}")


def gta_split(root, split) -> DomainSplit:
    if split != "train":
        raise UserError("gta has only a train split (all 24,966 frames); evaluate on a target domain instead")
    img_dir, lab_dir = os.path.join(root, "gta", "images"), os.path.join(root, "gta", "labels")
    _require_dir(img_dir, "GTA5 images")
    _require_dir(lab_dir, "GTA5 labels")
    images, labels = set(_list(img_dir, (".png",))), set(_list(lab_dir, (".png",)))
    missing = sorted(images - labels)
    if missing:
        warnings.warn(f"gta: {len(missing)} images have no label and are skipped, e.g. {missing[0]}")
    names = sorted(images & labels)
    if not names:
        raise UserError(f"no GTA5 image/label pairs in {img_dir} and {lab_dir} ({README_HINT})")
    _warn_count("gta", split, len(names), 24966)
    return DomainSplit("gta", split, CITYSCAPES_CLASSES, [os.path.join(img_dir, n) for n in names],
                       [os.path.join(lab_dir, n) for n in names], CITYSCAPES_LUT, (720, 1280),
                       resize_label_to_image=True, root=root)


def cityscapes_split(root, split, labelled=True) -> DomainSplit:
    img_root = os.path.join(root, "cityscapes", "leftImg8bit", split)
    lab_root = os.path.join(root, "cityscapes", "gtFine", split)
    _require_dir(img_root, f"Cityscapes {split} images")
    if labelled:
        _require_dir(lab_root, f"Cityscapes {split} labels")
    images, labels = [], []
    for city in sorted(os.listdir(img_root)):
        for f in _list(os.path.join(img_root, city), ("_leftimg8bit.png",)):
            label = os.path.join(lab_root, city, f.replace("leftImg8bit", "gtFine_labelIds"))
            if labelled and not os.path.isfile(label):
                raise UserError(f"image {os.path.join(img_root, city, f)} has no label {label}")
            images.append(os.path.join(img_root, city, f))
            labels.append(label if labelled else None)
    if not images:
        raise UserError(f"no Cityscapes images in {img_root} ({README_HINT})")
    _warn_count("cityscapes", split, len(images), {"train": 2975, "val": 500}.get(split, len(images)))
    return DomainSplit("cityscapes", split, CITYSCAPES_CLASSES, images, labels, CITYSCAPES_LUT, (512, 1024),
                       root=root)


def _convert_synthia_label(job):
    src, dst = job
    try:
        ids = read_label_channel(src)
    except ValueError as e:
        return f"cannot read SYNTHIA label {src}: {e}"
    if ids.max() > 22:
        return f"{src}: class id {int(ids.max())} > 22, not a SYNTHIA-RAND-CITYSCAPES label"
    train_ids = SYNTHIA_LUT[np.minimum(ids, 255)]
    tmp = dst + ".tmp.png"
    Image.fromarray(train_ids).save(tmp)
    os.replace(tmp, dst)
    return None


def prepare_synthia(root, num_workers=None) -> str:
    """Convert SYNTHIA's 16-bit RGB labels to 8-bit train-id PNGs once; return the folder.

    Pillow keeps only the high byte of 16-bit RGB samples (every id would read 0), so the labels are
    decoded with common.png16 (numpy + zlib). Slow in Python, hence done once, in parallel, and cached
    next to the dataset (or under ~/.cache/uda-seg when the dataset folder is read-only).
    """
    src_dir = os.path.join(root, "synthia", "GT", "LABELS")
    dst_dir = os.path.join(root, "synthia", "GT", "LABELS_trainids")
    try:
        os.makedirs(dst_dir, exist_ok=True)
    except OSError:
        dst_dir = os.path.join(os.path.expanduser("~/.cache/uda-seg"), "synthia_LABELS_trainids")
        os.makedirs(dst_dir, exist_ok=True)
    names = _list(src_dir, (".png",))
    todo = [(os.path.join(src_dir, n), os.path.join(dst_dir, n)) for n in names
            if not os.path.isfile(os.path.join(dst_dir, n))]
    if todo:
        workers = num_workers or max(1, min(8, os.cpu_count() or 1))
        print(f"converting {len(todo)} SYNTHIA labels to train ids in {dst_dir} (once)", file=sys.stderr)
        with Pool(workers) as pool:
            for problem in tqdm(pool.imap_unordered(_convert_synthia_label, todo, chunksize=8),
                                total=len(todo), desc="synthia labels", file=sys.stderr):
                if problem:
                    raise UserError(problem)
    return dst_dir


def synthia_split(root, split, classes=19) -> DomainSplit:
    if split != "train":
        raise UserError("synthia has only a train split (all 9,400 frames); evaluate on a target domain instead")
    img_dir, lab_dir = os.path.join(root, "synthia", "RGB"), os.path.join(root, "synthia", "GT", "LABELS")
    _require_dir(img_dir, "SYNTHIA images")
    _require_dir(lab_dir, "SYNTHIA labels")
    names = sorted(set(_list(img_dir, (".png",))) & set(_list(lab_dir, (".png",))))
    if not names:
        raise UserError(f"no SYNTHIA image/label pairs in {img_dir} and {lab_dir} ({README_HINT})")
    _warn_count("synthia", split, len(names), 9400)
    label_dir = prepare_synthia(root)
    lut = TRAINID19_TO_16_LUT if classes == 16 else None
    class_names = [CITYSCAPES_CLASSES[i] for i in TRAINIDS_16] if classes == 16 else CITYSCAPES_CLASSES
    return DomainSplit("synthia", split, class_names, [os.path.join(img_dir, n) for n in names],
                       [os.path.join(label_dir, n) for n in names], lut, (760, 1280), root=root)


def folder_split(root, split, labelled=True) -> DomainSplit:
    classes_file = os.path.join(root, "classes.txt")
    if not os.path.isfile(classes_file):
        raise UserError(f"folder dataset {root} has no classes.txt (one class name per line; {README_HINT})")
    with open(classes_file) as f:
        classes = [line.strip() for line in f if line.strip()]
    img_dir, lab_dir = os.path.join(root, "images", split), os.path.join(root, "labels", split)
    _require_dir(img_dir, f"folder dataset {split} images")
    files = _list(img_dir)
    if not files:
        raise UserError(f"no .png/.jpg images in {img_dir}")
    labels = []
    if labelled:
        _require_dir(lab_dir, f"folder dataset {split} labels")
        for f in files:
            label = os.path.join(lab_dir, os.path.splitext(f)[0] + ".png")
            if not os.path.isfile(label):
                raise UserError(f"image {os.path.join(img_dir, f)} has no label {label}")
            labels.append(label)
    else:
        labels = [None] * len(files)
    return DomainSplit(os.path.basename(os.path.normpath(root)), split, classes,
                       [os.path.join(img_dir, f) for f in files], labels, root=root)


BUILTIN = ("gta", "synthia", "cityscapes", *TOY_DOMAINS)


def domain_split(name, split, data_root="data", labelled=True, synthia_classes=19, toy_size=None) -> DomainSplit:
    """Resolve `--source/--target` (a built-in name or a folder) to a DomainSplit.

    `labelled=False` (an adaptation target's train split) does not require labels.
    `synthia_classes=16` gives the 16-way SYNTHIA head of ADVENT/ProDA.
    """
    if name == "gta":
        return gta_split(data_root, split)
    if name == "synthia":
        return synthia_split(data_root, split, synthia_classes)
    if name == "cityscapes":
        return cityscapes_split(data_root, split, labelled)
    if name in TOY_DOMAINS:
        toy = ToyDomain(name, split, **({"height": toy_size[0], "width": toy_size[1]} if toy_size else {}))
        return DomainSplit(name, split, list(TOY_CLASSES), list(toy.names), [None] * len(toy) if not labelled
                           else list(toy.names), toy=toy)
    if os.path.isdir(name):
        return folder_split(name, split, labelled)
    raise UserError(f"unknown dataset '{name}': use one of {', '.join(BUILTIN)} or a folder dataset path "
                    f"({README_HINT})")


def class_setup(source, target, synthia_classes=19):
    """(head classes, evaluated classes, pred_map): the head's classes must be the target's, except a
    16-way SYNTHIA head evaluated on Cityscapes, whose predictions pred_map sends into the 19 train ids."""
    if synthia_classes not in (16, 19):
        raise UserError("--synthia-classes must be 19 or 16")
    if synthia_classes == 16 and source != "synthia":
        raise UserError(f"--synthia-classes 16 is the 16-way head of a SYNTHIA source; the source is '{source}'")
    classes, eval_classes = classes_of(source, synthia_classes), classes_of(target)
    if classes == eval_classes:
        return classes, eval_classes, None
    if source == "synthia" and synthia_classes == 16 and eval_classes == CITYSCAPES_CLASSES:
        return classes, eval_classes, torch.tensor(TRAINIDS_16)
    raise UserError(f"class lists differ between source '{source}' ({len(classes)} classes: "
                    f"{', '.join(classes[:3])}, ...) and target '{target}' ({len(eval_classes)} classes: "
                    f"{', '.join(eval_classes[:3])}, ...)")


# ----------------------------------------------------------------------------------------------------
# Transforms (numpy/PIL on the host; all randomness from a per-sample generator)
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "cv2-bilinear")


def resize_image(image, size, interpolation="bicubic"):
    """uint8 HxWx3 -> size=(H, W). bicubic/bilinear/lanczos: PIL's filters (antialiased when shrinking), as
    the AdaptSegNet/ADVENT/BDL (bicubic), ProDA (bilinear) and LSD-seg (Lanczos) loaders; cv2-bilinear: what
    mmcv's imresize/imrescale does (OpenCV INTER_LINEAR: half-pixel centres, no antialiasing, a 2x2 mean for
    an exact 2x shrink), computed in float32 and rounded, so within 1 grey level of OpenCV's 11-bit
    fixed-point result (DAFormer)."""
    h, w = image.shape[:2]
    if interpolation == "cv2-bilinear":
        if (h, w) == (size[0] * 2, size[1] * 2):  # OpenCV switches to INTER_AREA here
            x = image.astype(np.uint16)
            x = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
            return ((x + 2) >> 2).astype(np.uint8)
        y0, y1, wy = _linear_taps(h, size[0])
        x0, x1, wx = _linear_taps(w, size[1])
        img = image.astype(np.float32)
        rows = img[y0] * (1 - wy)[:, None, None] + img[y1] * wy[:, None, None]
        out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}
    if interpolation not in filters:
        raise ValueError(f"unknown interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), filters[interpolation]))


def _linear_taps(n_in, n_out):
    """Source indices and weights of a half-pixel-centred linear resize from n_in to n_out samples."""
    pos = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)


def resize_label(label, size, interpolation="bicubic"):
    """Nearest-neighbour label resize: PIL's (pixel centres) or, with cv2-bilinear, OpenCV's INTER_NEAREST
    (source index floor(i * in / out)), so that labels stay aligned with their images as in each official code."""
    h, w = label.shape[:2]
    if interpolation == "cv2-bilinear":
        ys = np.minimum(np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int64), h - 1)
        xs = np.minimum(np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int64), w - 1)
        return label[ys][:, xs]
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


def resized_shape(h, w, size, keep_ratio=False) -> tuple:
    """The (H, W) that resize_pair gives an h x w frame (size None: unchanged)."""
    if size is None:
        return h, w
    if keep_ratio:  # mmseg-style: scale so the image fits into the (H, W) box
        scale = min(size[0] / h, size[1] / w, max(size) / max(h, w))
        return int(h * scale + 0.5), int(w * scale + 0.5)
    return int(size[0]), int(size[1])


def resize_pair(image, label, size, keep_ratio=False, interpolation="bicubic"):
    """Resize to size=(H, W) (image with `interpolation`, label nearest); keep_ratio: largest size fitting in
    the box."""
    h, w = image.shape[:2]
    size = resized_shape(h, w, size, keep_ratio)
    if (h, w) == size:
        return image, label
    image = resize_image(image, size, interpolation)
    if label is not None:
        label = resize_label(label, size, interpolation)
    return image, label


def random_crop(image, label, crop, rng, cat_max_ratio=1.0, ignore=255):
    """Random crop (pads with 0 / ignore when smaller). cat_max_ratio < 1: re-draw up to 10 times until no
    class covers more than that share of the crop (mmseg's RandomCrop, used by DAFormer's source crops)."""
    ch, cw = (crop[0], crop[0]) if len(crop) == 1 else crop  # `--crop-size 512` means 512x512
    h, w = image.shape[:2]
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        if label is not None:
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore)
        h, w = image.shape[:2]
    for _ in range(10 if cat_max_ratio < 1.0 and label is not None else 1):
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        if cat_max_ratio >= 1.0 or label is None:
            break
        counts = np.bincount(label[y:y + ch, x:x + cw].ravel(), minlength=256)[:255]
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    image = image[y:y + ch, x:x + cw]
    label = label[y:y + ch, x:x + cw] if label is not None else None
    return image, label


@dataclass
class TrainTransform:
    size: tuple = None  # (H, W) resize; None keeps the native size
    keep_ratio: bool = False
    scale: tuple = None  # (lo, hi) random rescale factor after `size`
    crop: tuple = None  # (H, W) random crop
    cat_max_ratio: float = 1.0
    flip: bool = False
    interpolation: str = "bicubic"  # image resize filter (resize_image); each script sets its official code's

    def __call__(self, image, label, rng):
        return self.augment(*self.resize(image, label), rng)

    def resize(self, image, label):
        """The fixed part (no randomness): what a prepared copy stores (common/prepare.py)."""
        if self.size is None:
            return image, label
        return resize_pair(image, label, self.size, self.keep_ratio, self.interpolation)

    def augment(self, image, label, rng):
        """The random part, drawing from the sample's generator: rescale, crop, flip."""
        if self.scale is not None:
            s = rng.uniform(*self.scale)
            image, label = resize_pair(image, label, (int(image.shape[0] * s + 0.5), int(image.shape[1] * s + 0.5)),
                                       interpolation=self.interpolation)
        if self.crop is not None:
            image, label = random_crop(image, label, self.crop, rng, self.cat_max_ratio)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            label = label[:, ::-1] if label is not None else None
        return image, label


# ----------------------------------------------------------------------------------------------------
# Prepared copies, read side (common/prepare.py writes them; README "Fast data loading: prepared copies").
# A copy is one *store* per kind: `<kind>-<spec>.u8`, every frame's uint8 pixels after the fixed resize, back
# to back (images HxWx3, labels HxW raw label values: the train-id table is applied on reading, so one copy
# serves 19- and 16-class SYNTHIA), and `<kind>-<spec>.json`, the manifest: spec, per-frame shapes and the
# size and mtime of each source file. Frames are memory-mapped, so a crop reads only its rows.
PREPARED_FORMAT, PREPARED_VERSION = "uda-seg prepared copy", 1
BUILTIN_FILES = ("gta", "synthia", "cityscapes")  # built-in domains read from files


def store_name(kind, size=None, keep_ratio=False, interpolation="bicubic") -> str:
    """`images-720x1280-bicubic`, `labels-704x1280-keep-cv2-nearest`, `labels-native` (no resize)."""
    if size is None:
        return f"{kind}-native"
    if kind == "labels":  # labels are always resized nearest; only the nearest rule differs (resize_label)
        interpolation = "cv2-nearest" if interpolation == "cv2-bilinear" else "nearest"
    return f"{kind}-{size[0]}x{size[1]}{'-keep' if keep_ratio else ''}-{interpolation}"


def prepared_dirs(split) -> list:
    """Where the copies of `split` may live: <root>/prepared/<name>-<split>, else (a read-only data root)
    ~/.cache/uda-seg/prepared/<name>-<split>-<hash of the root>."""
    root = os.path.abspath(split.root)
    tag = f"{split.name}-{split.split}"
    return [os.path.join(root, "prepared", tag),
            os.path.join(os.path.expanduser("~/.cache/uda-seg"), "prepared", f"{tag}-{zlib.crc32(root.encode()):08x}")]


def prepare_command(split, size=None, keep_ratio=False, interpolation="bicubic", labels="resized") -> str:
    """The command that makes (or rebuilds) the copy a dataset asks for."""
    builtin = split.name in BUILTIN_FILES
    parts = ["python -m common.prepare", split.name if builtin else split.root]
    if builtin and os.path.normpath(split.root) != "data":
        parts.append(f"--data-root {split.root}")
    if split.split != "train":
        parts.append(f"--split {split.split}")
    if size is not None:
        parts.append(f"--size {size[0]} {size[1]}" + (" --keep-ratio" if keep_ratio else ""))
        if interpolation != "bicubic":
            parts.append(f"--interpolation {interpolation}")
    if labels != "resized":
        parts.append(f"--labels {labels}")
    return " ".join(parts)


def source_keys(split) -> list:
    """How a manifest names each frame: its image path relative to the data root."""
    prefix = os.path.join(split.root, "")  # the split's paths are built from it: a prefix, no relpath needed
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, split.root) for p in split.images]


def file_stamp(path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


class PreparedStore:
    """One validated store; `frame(i)` is a read-only memory-mapped view of item i of the split."""

    def __init__(self, data_path, shapes, channels, rows):
        self.data_path, self.channels = data_path, channels
        shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1] * max(channels, 1)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.shapes, self.rows = shapes, np.asarray(rows, np.int64)  # rows: split index -> store row
        self._data, self._pid = None, None

    def __getstate__(self):  # DataLoader workers map the file themselves; never pickle the mapping
        return {**self.__dict__, "_data": None, "_pid": None}

    def frame(self, i) -> np.ndarray:
        if self._pid != os.getpid():
            self._data, self._pid = np.memmap(self.data_path, np.uint8, mode="r"), os.getpid()
        row = self.rows[i]
        h, w = self.shapes[row]
        shape = (h, w, self.channels) if self.channels else (h, w)
        return self._data[self.offsets[row]:self.offsets[row] + h * w * max(self.channels, 1)].reshape(shape)


def open_store(split, kind, size, keep_ratio, interpolation, labels_arg="resized"):
    """The valid store of `split` for this spec, or None when there is none; UserError when one exists but is
    stale or broken. A `-native` store also serves a spec that leaves every frame as it is."""
    for name in dict.fromkeys([store_name(kind, size, keep_ratio, interpolation), store_name(kind)]):
        for folder in prepared_dirs(split):
            manifest_path = os.path.join(folder, name + ".json")
            if os.path.isfile(manifest_path):
                store = _validate_store(split, kind, manifest_path, size, keep_ratio,
                                        prepare_command(split, size, keep_ratio, interpolation, labels_arg))
                if store is not None:
                    return store
                break  # a native store that this spec would resize: look no further for it
    return None


def _validate_store(split, kind, manifest_path, size, keep_ratio, command):
    """The store at manifest_path for split's frames; None when it is native and `size` would resize a frame."""
    data_path = manifest_path[:-len(".json")] + ".u8"

    def fail(state, why):
        return UserError(f"prepared copy {data_path} is {state} ({why}): rebuild it with `{command}` or delete "
                         f"{os.path.splitext(data_path)[0]}.{{u8,json}}")

    try:
        with open(manifest_path) as f:
            m = json.load(f)
        version = (m.get("format"), m.get("version"))
        spec, items, channels = m["spec"], m["items"], int(m["channels"])
        stored_size = tuple(spec["size"]) if spec["size"] is not None else None
        stored_name = store_name(m["kind"], stored_size, spec["keep_ratio"], spec["interpolation"])
        # item: [source key, source H, W, stored H, W, then size and mtime of the image (and label) file]
        shapes = [(int(it[3]), int(it[4])) for it in items]
        expected = [resized_shape(int(it[1]), int(it[2]), stored_size, spec["keep_ratio"]) for it in items]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise fail("broken", f"unreadable manifest {manifest_path}: {e!r}") from None
    if version != (PREPARED_FORMAT, PREPARED_VERSION):
        raise fail("stale", f"format version {m.get('version')}, this code reads version {PREPARED_VERSION}")
    if stored_name != os.path.basename(manifest_path)[:-len(".json")] or (m.get("domain"), m.get("split")) != \
            (split.name, split.split) or channels != (3 if kind == "images" else 0):
        raise fail("broken", f"its manifest describes {stored_name} of {m.get('domain')} {m.get('split')}")
    if stored_size is None and size is not None and \
            any(resized_shape(h, w, size, keep_ratio) != (h, w) for h, w in shapes):
        return None
    bad = next((it[0] for it, shape, want in zip(items, shapes, expected) if shape != want), None)
    if bad is not None:
        raise fail("broken", f"frame {bad} has the wrong shape")
    want_bytes = sum(h * w for h, w in shapes) * max(channels, 1)
    have_bytes = os.path.getsize(data_path) if os.path.isfile(data_path) else -1
    if have_bytes != want_bytes:
        raise fail("broken", f"{have_bytes if have_bytes >= 0 else 'no'} data bytes, the manifest needs {want_bytes}")
    row_of = {it[0]: row for row, it in enumerate(items)}
    rows, missing, changed = [], [], []
    for i, key in enumerate(source_keys(split)):
        row = row_of.get(key)
        if row is None:
            missing.append(key)
            continue
        rows.append(row)
        sources = [split.images[i]] + ([split.labels[i]] if kind == "labels" else [])
        try:
            stamps = sum((file_stamp(p) for p in sources), [])
        except OSError:
            stamps = None
        if stamps != items[row][5:]:
            changed.append(key)
    if missing:
        raise fail("stale", f"{len(missing)} of the {len(split)} frames are not in it, e.g. {missing[0]}")
    if changed:
        raise fail("stale", f"{len(changed)} source files changed since it was made, e.g. {changed[0]}")
    return PreparedStore(data_path, shapes, channels, rows)


_ANNOUNCED = set()


def _announce(message):
    """One line per message and process, on the main rank only (torchrun sets RANK)."""
    if message not in _ANNOUNCED and os.environ.get("RANK", "0") == "0":
        _ANNOUNCED.add(message)
        print(message, flush=True)


class ResizedFrames:
    """The frames of `split` after a fixed resize (size, keep_ratio, interpolation): read from a prepared copy
    when a valid one exists, else decoded from the PNG files and resized. `native_label`: labels at full
    resolution (evaluation). Calling it with an index returns (uint8 HxWx3 image, uint8 HxW train ids or None)."""

    def __init__(self, split, size=None, keep_ratio=False, interpolation="bicubic", with_label=True,
                 native_label=False, use_prepared=True):
        self.split, self.keep_ratio, self.interpolation = split, keep_ratio, interpolation
        self.size = tuple(int(v) for v in size) if size is not None else None
        self.with_label, self.native_label = with_label, native_label
        self.images = self.labels = None
        if not use_prepared or split.toy is not None or split.root is None:
            return
        labels_arg = "none" if not with_label else "native" if native_label else "resized"
        command = prepare_command(split, self.size, keep_ratio, interpolation, labels_arg)
        images = open_store(split, "images", self.size, keep_ratio, interpolation, labels_arg)
        labels = None
        if with_label:
            labels = open_store(split, "labels", None if native_label else self.size, keep_ratio, interpolation,
                                labels_arg)
        what = f"{split.name} {split.split} at {self.describe()}"
        if images is not None and (labels is not None or not with_label):
            self.images, self.labels = images, labels
            folder = os.path.dirname(images.data_path)
            _announce(f"data: {what} from the prepared copy in {folder} ({len(split)} frames, no PNG decoding)")
        elif images is not None or labels is not None:
            _announce(f"data: {what} from the PNG files: the prepared copy lacks the "
                      f"{'labels' if images is not None else 'images'} (`{command}` adds them)")
        elif split.name in BUILTIN_FILES:
            _announce(f"data: {what} from the PNG files; `{command}` makes a prepared copy that skips the PNG "
                      f"decoding and the resize (README 'Fast data loading: prepared copies')")

    def describe(self) -> str:
        if self.size is None:
            return "native size"
        return (f"{'keep-ratio ' if self.keep_ratio else ''}{self.size[0]}x{self.size[1]} {self.interpolation}"
                + (", full-resolution labels" if self.native_label and self.with_label else ""))

    @property
    def prepared(self) -> bool:
        return self.images is not None

    def __call__(self, index):
        if self.images is not None:
            label = self.split.train_ids(self.labels.frame(index), index) if self.with_label else None
            return self.images.frame(index), label
        image, label = self.split.load(index, self.with_label)
        if self.native_label:
            return resize_pair(image, None, self.size, interpolation=self.interpolation)[0], label
        if self.size is None:
            return image, label
        return resize_pair(image, label, self.size, self.keep_ratio, self.interpolation)


class SegDataset(torch.utils.data.Dataset):
    """Items: (image uint8 3xHxW, label uint8 HxW (empty when unlabelled), index).

    Training: indexed by (index, sample_seed) from InfiniteSampler; the transform draws from that seed.
    Evaluation (`eval_size` set): the image is resized to eval_size, the label stays at full resolution.
    With a TrainTransform (or in evaluation) the frames come from a prepared copy when a valid one exists
    (`frames`, ResizedFrames; use_prepared=False: always the PNG files); the random part of the transform then
    runs on them exactly as on decoded PNGs.
    """

    def __init__(self, split: DomainSplit, transform=None, eval_size=None, with_label=True,
                 eval_interpolation="bicubic", use_prepared=True):
        self.split, self.transform, self.eval_size = split, transform, eval_size
        self.eval_interpolation = eval_interpolation
        self.with_label = with_label and split.labelled
        self.frames = None  # None: a custom transform (or none) gets the decoded frames as they are
        if eval_size is not None:
            self.frames = ResizedFrames(split, eval_size, False, eval_interpolation, self.with_label,
                                        native_label=True, use_prepared=use_prepared)
        elif isinstance(transform, TrainTransform):
            self.frames = ResizedFrames(split, transform.size, transform.keep_ratio, transform.interpolation,
                                        self.with_label, use_prepared=use_prepared)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        if self.frames is not None:
            image, label = self.frames(index)
            if self.eval_size is None:
                image, label = self.transform.augment(image, label, np.random.default_rng(seed))
        else:
            image, label = self.split.load(index, self.with_label)
            if self.transform is not None:
                image, label = self.transform(image, label, np.random.default_rng(seed))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label = torch.from_numpy(np.array(label)) if label is not None else torch.empty(0, dtype=torch.uint8)
        return image, label, index


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless shuffled stream of (index, sample_seed), a pure function of (seed, position).

    Rank r of `world` takes positions r, r+world, ...; `start` skips the positions already consumed, so
    a resumed run continues the exact stream. Each epoch is a fresh permutation.
    """

    def __init__(self, n, seed, start=0, rank=0, world=1, shuffle=True):
        self.n, self.seed, self.start, self.rank, self.world, self.shuffle = n, seed, start, rank, world, shuffle

    def __iter__(self):
        pos = self.start * self.world + self.rank
        epoch, perm = -1, None
        while True:
            e, k = divmod(pos, self.n)
            if e != epoch:
                epoch = e
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                perm = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
            yield perm[k], (self.seed * 1_000_003 + pos) % 2**63
            pos += self.world


def _worker_init(worker_id):
    torch.set_num_threads(1)  # decoding is the workers' job; do not oversubscribe the cores


def train_loader(dataset, batch_size, seed, start_iter=0, rank=0, world=1, num_workers=4, pin_memory=False):
    """An endless iterator of batches, starting at iteration `start_iter` of the sampler's stream."""
    sampler = InfiniteSampler(len(dataset), seed, start_iter * batch_size, rank, world)
    # an own generator: creating the iterator must not draw from the global RNG (exact resume with dropout)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, drop_last=True, worker_init_fn=_worker_init,
                                         generator=torch.Generator().manual_seed(seed),
                                         persistent_workers=num_workers > 0,
                                         prefetch_factor=4 if num_workers > 0 else None)
    return iter(loader)


def eval_loader(dataset, rank=0, world=1, num_workers=2, limit=None):
    """Batch 1 (images may differ in size); rank r scores images r, r+world, ... (no padding, no duplicates)."""
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))[rank::world]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                       num_workers=num_workers, worker_init_fn=_worker_init,
                                       generator=torch.Generator().manual_seed(0))  # leave the global RNG alone


# ----------------------------------------------------------------------------------------------------
# Normalisation (on the device, after the uint8 batch arrives)
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),  # torchvision/timm weights: RGB/255
    "caffe": ((104.00698793 / 255, 116.66876762 / 255, 122.67891434 / 255), (1 / 255,) * 3, True),  # BGR 0-255
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False),  # ProDA: RGB/255
    "gan": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),  # CycleGAN: [-1, 1]
}


def normalize(images_uint8: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """uint8 Bx3xHxW (RGB) on any device -> float32 normalised as the init expects."""
    mean, std, bgr = NORMALIZATION[mode]
    x = images_uint8.float().div_(255)
    if bgr:  # Caffe weights: BGR channel order; the means above are already listed B, G, R
        x = x.flip(1)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std



def classes_of(name, synthia_classes=19) -> list:
    """The class list of a domain without listing or reading its files (for --dry-run)."""
    if name in ("gta", "cityscapes") or (name == "synthia" and synthia_classes == 19):
        return list(CITYSCAPES_CLASSES)
    if name == "synthia":
        return [CITYSCAPES_CLASSES[i] for i in TRAINIDS_16]
    if name in TOY_DOMAINS:
        return list(TOY_CLASSES)
    path = os.path.join(name, "classes.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    return domain_split(name, "val").classes  # raises the right error for a bad name
