"""mIoU: one confusion matrix over the whole evaluation set, accumulated on the device.

Protocol (datasets.md section 10): logits are upsampled bilinearly to the full label resolution, then
argmax; pixels whose label is 255 are ignored; IoU_c = diag / (row + col - diag); mIoU = nanmean.
Predictions never leave the device: the matrix is filled with index_add_ (no bincount size sync) and
moved to the host once, at the end. SYNTHIA protocols (datasets.md section 11): `miou16`/`miou13` are means
over the 16/13 entries of the 19-class IoU vector (protocol b); `miou16_true`/`miou13_true` drop the
ground-truth rows of terrain, truck and train first (protocol a).
"""
import os

import torch
import torch.nn.functional as F

from common.data import CITYSCAPES_LABEL_IDS, TRAINIDS_13, TRAINIDS_16


def update_confusion(confusion: torch.Tensor, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Add one batch to a (C, C) int64 matrix: rows = ground truth, columns = prediction."""
    c = confusion.shape[0]
    label = label.long()
    valid = label < c  # 255 and anything out of range is ignored
    index = torch.where(valid, label * c + pred.long(), torch.full_like(label, c * c))
    flat = torch.zeros(c * c + 1, dtype=torch.int64, device=confusion.device)
    flat.index_add_(0, index.flatten(), torch.ones_like(index.flatten()))
    confusion += flat[:-1].view(c, c)
    return confusion


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    m = confusion.double()
    tp = m.diag()
    denominator = m.sum(0) + m.sum(1) - tp
    return torch.where(denominator > 0, tp / denominator.clamp(min=1), torch.full_like(tp, float("nan")))


def _nanmean(x):
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def summarize(confusion: torch.Tensor, classes, synthia_protocols=False) -> dict:
    """The results.json fields (percent, 0-100) from a confusion matrix."""
    confusion = confusion.cpu()
    iou = iou_per_class(confusion) * 100
    out = {"miou": _nanmean(iou), "per_class_iou": {name: float(v) for name, v in zip(classes, iou)},
           "num_classes": len(classes)}
    if synthia_protocols:
        if len(classes) != 19:
            raise ValueError("SYNTHIA protocols are defined on the 19 Cityscapes train ids")
        out["miou16"] = _nanmean(iou[TRAINIDS_16])
        out["miou13"] = _nanmean(iou[TRAINIDS_13])
        kept = torch.tensor(TRAINIDS_16)
        m = confusion[kept][:, kept].double()  # drop GT rows (and prediction columns) of terrain/truck/train
        rows = confusion[kept].double().sum(1)  # predictions into dropped classes still miss their GT class
        tp = m.diag()
        true16 = 100 * tp / (rows + m.sum(0) - tp).clamp(min=1)
        true16 = torch.where(rows + m.sum(0) - tp > 0, true16, torch.full_like(true16, float("nan")))
        out["miou16_true"] = _nanmean(true16)
        out["miou13_true"] = _nanmean(true16[[TRAINIDS_16.index(i) for i in TRAINIDS_13]])
    return out


@torch.no_grad()
def evaluate(predict, loader, num_classes, device, align_corners, pred_map=None, on_image=None, world=1):
    """Score `predict(images_uint8) -> logits` over `loader`; returns the (all-reduced) confusion matrix.

    pred_map: a tensor mapping model class -> evaluated class (a 16-way SYNTHIA head into 19 train ids).
    on_image(index, image, label, pred): called for each image (rank 0 saves a few PNGs with it).
    """
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    if pred_map is not None:
        pred_map = pred_map.to(device)
    for image, label, index in loader:
        image = image.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        logits = predict(image)
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=align_corners)
        pred = logits.argmax(1)
        if pred_map is not None:
            pred = pred_map[pred]
        update_confusion(confusion, pred, label)
        if on_image is not None:
            on_image(int(index[0]), image[0], label[0], pred[0])
    if world > 1:
        torch.distributed.all_reduce(confusion)
    return confusion


def evaluate_target(predict, val_split, runtime, align_corners, log=None, num_predictions=0, limit=None,
                    num_workers=2, eval_size=None, pred_map=None, synthia_protocols=False, interpolation="bicubic",
                    save_dir=None):
    """Score `predict` on the target val split; rank 0 saves `num_predictions` PNGs. Returns the summary.

    save_dir: every rank writes its shard's predictions there, one PNG per image at label resolution,
    named after the image; Cityscapes predictions hold Cityscapes label ids (the format the official
    cityscapesScripts evaluation and the benchmark server read: it matches `<city>_<seq>_<frame>*.png`),
    other domains their train ids.
    """
    from common.data import SegDataset, eval_loader
    from common.runlog import save_label_png, save_prediction
    dataset = SegDataset(val_split, eval_size=eval_size, eval_interpolation=interpolation)
    loader = eval_loader(dataset, runtime.rank, runtime.world, num_workers, limit)
    to_ids = torch.tensor(CITYSCAPES_LABEL_IDS, dtype=torch.uint8) if val_split.name == "cityscapes" else None

    def on_image(index, image, label, pred):
        if log is not None and runtime.is_main and index < num_predictions:
            save_prediction(log.path("predictions", f"{val_split.item_name(index)}.png"), image, label, pred,
                            val_split.classes)
        if save_dir is not None:
            ids = pred.to("cpu", torch.uint8)
            save_label_png(os.path.join(save_dir, f"{val_split.item_name(index)}.png"),
                           to_ids[ids.long()] if to_ids is not None else ids)

    confusion = evaluate(predict, loader, len(val_split.classes), runtime.device, align_corners, pred_map,
                         on_image if num_predictions or save_dir else None, runtime.world)
    return summarize(confusion, val_split.classes, synthia_protocols)
