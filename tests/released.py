"""Fixtures in the layouts of the authors' released files (../shared/reference/released-models.md), built
from our own networks with random values: the official key names, wrappers and quirks, never their weights.

- `deeplab_release(model, kind)`: a DeepLabV2 state dict renamed as AdaptSegNet / ADVENT / BDL saved theirs
  (`model.state_dict()` of their Res_Deeplab: torchvision-style backbone names, ASPP heads as
  `layer5/layer6.conv2d_list.i`, all four convs kept even where the forward sums two; files from torch
  < 0.4.1 carry no BN `num_batches_tracked`);
- `caffe_init(model)`: the DeepLab-v2 Caffe init files (`Scale.` prefix, a 21-class `layer5` to be dropped);
- `cityscapes_tree(root)`: a tiny Cityscapes layout (val with labels, train without) for --eval-only runs.
"""
import os

import numpy as np
from PIL import Image

from common.data import CITYSCAPES_LABEL_IDS


def deeplab_release(state: dict, kind: str) -> dict:
    """Our DeepLabV2 state dict -> the official file's keys. kind: adaptsegnet (aux + main heads, torch 0.3/0.4.0
    save), advent (aux + main, torch 0.4.1 save), bdl (main head as layer5, torch 0.4.0 save)."""
    out = {}
    for key, value in state.items():
        if kind in ("adaptsegnet", "bdl") and key.endswith("num_batches_tracked"):
            continue  # torch < 0.4.1 had no such buffer
        if key.startswith("aux_head."):
            key = "layer5.conv2d_list." + key.split("convs.", 1)[1]
        elif key.startswith("head."):
            key = ("layer5" if kind == "bdl" else "layer6") + ".conv2d_list." + key.split("convs.", 1)[1]
        out[key] = value.clone()
    return out


def caffe_init(state: dict, prefix="Scale") -> dict:
    """A DeepLab-v2 Caffe init file: every backbone key under one prefix (no num_batches_tracked: an old torch
    save), plus its 21-class COCO classifier `layer5`, which the official loaders drop."""
    import torch
    out = {f"{prefix}.{k}": v.clone() for k, v in state.items()
           if "head" not in k and not k.endswith("num_batches_tracked")}
    for i in range(4):
        out[f"{prefix}.layer5.conv2d_list.{i}.weight"] = torch.zeros(21, 2048, 3, 3)
        out[f"{prefix}.layer5.conv2d_list.{i}.bias"] = torch.zeros(21)
    return out


def cityscapes_tree(root, n_val=2, n_train=2, h=64, w=128, seed=0):
    """leftImg8bit/{train,val}/<city>/..._leftImg8bit.png and gtFine/val/<city>/..._gtFine_labelIds.png."""
    rng = np.random.default_rng(seed)
    names = []
    for split, n, city in (("val", n_val, "frankfurt"), ("train", n_train, "aachen")):
        for i in range(n):
            name = f"{city}_{i:06d}_000019"
            img_dir = os.path.join(root, "cityscapes", "leftImg8bit", split, city)
            os.makedirs(img_dir, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(img_dir, f"{name}_leftImg8bit.png"))
            if split == "val":
                lab_dir = os.path.join(root, "cityscapes", "gtFine", split, city)
                os.makedirs(lab_dir, exist_ok=True)
                ids = rng.choice(CITYSCAPES_LABEL_IDS + [0, 1], size=(h, w)).astype(np.uint8)
                Image.fromarray(ids).save(os.path.join(lab_dir, f"{name}_gtFine_labelIds.png"))
                names.append(name)
    return names
