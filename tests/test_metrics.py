"""mIoU against hand-computed confusion matrices; SYNTHIA protocols; predictions stay on the device."""
import math

import pytest
import torch

from common.metrics import iou_per_class, summarize, update_confusion


def test_confusion_matrix_by_hand():
    label = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = update_confusion(torch.zeros(3, 3, dtype=torch.int64), pred, label)
    # rows = ground truth, columns = prediction; the 255 pixel is ignored
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou = iou_per_class(cm)
    # road: TP 1 / (row 2 + col 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 0 / (1 + 0 - 0) = 0
    assert torch.allclose(iou, torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    s = summarize(cm, ["a", "b", "c"])
    assert s["miou"] == pytest.approx(100 / 3) and s["per_class_iou"]["b"] == pytest.approx(200 / 3)
    assert s["num_classes"] == 3


def test_confusion_accumulates_over_batches_and_absent_classes_are_nan():
    cm = torch.zeros(3, 3, dtype=torch.int64)
    update_confusion(cm, torch.tensor([0, 0]), torch.tensor([0, 0]))
    update_confusion(cm, torch.tensor([1]), torch.tensor([1]))
    iou = iou_per_class(cm)
    assert iou[0] == 1 and iou[1] == 1 and math.isnan(iou[2])
    assert summarize(cm, ["a", "b", "c"])["miou"] == pytest.approx(100.0)  # nanmean skips the absent class


def test_synthia_protocols():
    cm = torch.zeros(19, 19, dtype=torch.int64)
    for c in range(19):
        cm[c, c] = 10
    cm[9, 8] = 10  # terrain pixels predicted as vegetation: a false positive of vegetation in protocol (b) only
    cm[9, 9] = 0
    cm[0, 14] = 10  # road pixels predicted as truck: a miss of road in both protocols
    s = summarize(cm, [str(i) for i in range(19)], synthia_protocols=True)
    iou = iou_per_class(cm) * 100
    assert iou[8] == pytest.approx(50.0) and iou[0] == pytest.approx(50.0)
    idx16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    idx13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert s["miou16"] == pytest.approx(float(iou[idx16].mean()))
    assert s["miou13"] == pytest.approx(float(iou[idx13].mean()))
    # protocol (a): terrain's GT row is dropped, so vegetation is perfect again; road still misses 10 pixels
    true16 = [50.0] + [100.0] * 15
    assert s["miou16_true"] == pytest.approx(sum(true16) / 16)
    assert s["miou13_true"] == pytest.approx((50.0 + 12 * 100.0) / 13)
    assert s["miou16_true"] > s["miou16"]


def test_update_confusion_never_moves_predictions_to_the_host(monkeypatch):
    calls = []
    for name in ("cpu", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: calls.append(_n) or _o(self, *a, **k))
    pred, label = torch.randint(0, 5, (2, 8, 8)), torch.randint(0, 5, (2, 8, 8))
    update_confusion(torch.zeros(5, 5, dtype=torch.int64), pred, label)
    assert calls == []


def test_evaluate_upsamples_argmaxes_maps_and_accumulates_by_hand():
    """common.metrics.evaluate: logits bilinearly upsampled (align_corners as asked) to the label size, argmax,
    a 16-way head's predictions sent into the 19 train ids, one matrix over every image, 255 ignored."""
    from common.data import TRAINIDS_16
    from common.metrics import evaluate
    # 1x2 logits -> 1x3 labels with align_corners=True: the middle pixel is the mean of the two sides
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.5]]]])  # classes 0, 1, 2 at two positions
    label = torch.tensor([[[0, 2, 255]]], dtype=torch.uint8)
    loader = [(torch.zeros(1, 3, 1, 2, dtype=torch.uint8), label, torch.tensor([0]))] * 2
    cm = evaluate(lambda x: logits, loader, 3, "cpu", align_corners=True)
    # left pixel: argmax(2, 0, 1) = 0; middle: mean = (1, 0.5, 1.25) -> 2; right: (0, 1, 1.5) -> 2, ignored
    assert cm.tolist() == [[2, 0, 0], [0, 0, 0], [0, 0, 2]]
    # align_corners decides the sampling grid: 1x2 -> 1x5 puts pixel 1 at t = 0.25 (True) or t = 0.1 (False)
    ramp = torch.tensor([[[[1.0, 0.0]], [[0.8, 0.8]]]])  # class 0 falls from 1 to 0, class 1 stays at 0.8
    one = [(torch.zeros(1, 3, 1, 2, dtype=torch.uint8), torch.tensor([[[255, 0, 255, 255, 255]]]), torch.tensor([0]))]
    assert evaluate(lambda x: ramp, one, 2, "cpu", align_corners=True).tolist() == [[0, 1], [0, 0]]  # 0.75 < 0.8
    assert evaluate(lambda x: ramp, one, 2, "cpu", align_corners=False).tolist() == [[1, 0], [0, 0]]  # 0.9 > 0.8
    # a 16-way SYNTHIA head: class k of the head is train id TRAINIDS_16[k]
    head16 = torch.zeros(1, 16, 1, 2)
    head16[0, 9] = 5.0  # 16-class id 9 = sky = train id 10
    label19 = torch.tensor([[[10, 9]]], dtype=torch.uint8)  # sky, terrain
    cm19 = evaluate(lambda x: head16, [(torch.zeros(1, 3, 1, 2, dtype=torch.uint8), label19, torch.tensor([0]))],
                    19, "cpu", align_corners=True, pred_map=torch.tensor(TRAINIDS_16))
    assert cm19[10, 10] == 1 and cm19[9, 10] == 1 and cm19.sum() == 2
    s = summarize(cm19, [str(i) for i in range(19)], synthia_protocols=True)
    # protocol b: the 16 entries of the 19-class vector (sky 1/2, the rest absent or 0); protocol a drops the
    # terrain row, so sky is 1/1
    assert s["per_class_iou"]["10"] == pytest.approx(50.0) and s["miou16_true"] == pytest.approx(100.0)
