"""fcn_wild.py: the front-end, the class-size statistics, the constrained projection and its loss, the
domain-confusion objectives and which parameters each optimiser may move; then the script end to end."""
import copy
import json
import math
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fcn_wild as fw
import released
from common.cli import UserError, field_docs
from common.data import TOY_CLASSES
from common.runtime import Runtime
from conftest import ROOT, run_script

QUICK = ["fcn_wild.py", "--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--log-every", "2",
         "--adapt-start", "0"]
CA = ["--stats-images", "16"]  # a flag of the category alignment: refused with --no-category-alignment
# the paper's two phases in small: 3 source-phase iterations by SGD (momentum), then GA + CA
PHASES = ["--adapt-start", "3", "--source-optimizer", "sgd", "--source-lr", "1e-3"]
ACCUM = ["--grad-accum", "2"]  # the quick preset's batch 4 as 2 micro-batches of 2 (the paper preset accumulates)


def small_args(**overrides):
    """The quick preset's resolved Args, as the script's helpers see them (main() resolves the poly horizon)."""
    args = fw.Args(**{**fw.PRESETS["quick"], **overrides})
    args.poly_horizon = args.poly_horizon or args.iters
    return args


def test_every_field_has_help_and_quick_mirrors_source_only():
    docs = field_docs(fw.Args)
    missing = [f.name for f in fw.dataclasses.fields(fw.Args) if not f.metadata.get("runtime") and f.name not in docs]
    assert not missing
    import source_only
    for key in ("source", "target", "init", "iters", "batch_size", "seed", "poly_horizon", "checkpoint_every",
                "source_size", "target_size"):
        assert fw.PRESETS["quick"][key] == source_only.PRESETS["quick"][key], key


# ----------------------------------------------------------------------------------------------------
# the network
def test_front_end_topology_and_output_stride():
    model = fw.VGG16FrontEnd("vgg16_small", num_classes=5).eval()
    fc7, logits = model(torch.zeros(2, 3, 64, 128))
    assert logits.shape == (2, 5, 8, 16) and fc7.shape == (2, 512, 8, 16)  # stride 8
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and [c.dilation for c in convs[-3:]] == [(2, 2)] * 3 and convs[9].dilation == (1, 1)
    pools = [type(model.features[i]).__name__ for i in (4, 9, 16, 23, 30)]  # torchvision's pool indices
    assert pools == ["MaxPool2d", "MaxPool2d", "MaxPool2d", "Identity", "Identity"]
    assert model.fc6.kernel_size == (7, 7) and model.fc6.dilation == (4, 4) and model.fc6.padding == (12, 12)
    assert model.fc7.kernel_size == (1, 1) and model.fc8.out_channels == 5
    assert {id(p) for p in model.feature_params()} == {id(p) for n, p in model.named_parameters() if "fc8" not in n}
    with pytest.raises(UserError, match="unknown backbone 'vgg19'"):
        fw.VGG16FrontEnd("vgg19")


def small_front_end_state(num_classes, seed=0):
    """A vgg16_small front-end state dict with every tensor random, so that a swap would show."""
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in fw.VGG16FrontEnd("vgg16_small", num_classes).state_dict().items()}


def torchvision_layout(state):
    """Our front-end tensors under torchvision VGG-16 names (fc6/fc7 flattened into Linear layers) plus an ImageNet
    classifier.6, as torchvision.models.vgg16().state_dict() holds them (here at vgg16_small's widths)."""
    out = {k: v for k, v in state.items() if k.startswith("features.")}
    out["classifier.0.weight"], out["classifier.0.bias"] = state["fc6.weight"].flatten(1), state["fc6.bias"]
    out["classifier.3.weight"], out["classifier.3.bias"] = state["fc7.weight"].flatten(1), state["fc7.bias"]
    out["classifier.6.weight"], out["classifier.6.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return out


def test_torchvision_vgg16_lands_every_tensor_in_the_right_module(tmp_path, capsys):
    reference = small_front_end_state(5)
    path = tmp_path / "vgg16.pth"
    torch.save(torchvision_layout(reference), path)
    found = fw.read_frontend_weights(str(path))
    assert found["kind"] == "torchvision VGG-16" and found["num_classes"] is None
    assert found["implied"] == {"normalization": "imagenet", "backbone": "vgg16_small"}  # backbone from the widths
    model = fw.VGG16FrontEnd("vgg16_small", 5)
    fc8 = model.fc8.weight.clone()
    assert fw.load_init(model, str(path), "vgg16_small", found) == "imagenet"
    ours = model.state_dict()
    assert all(torch.equal(ours[k], reference[k]) for k in ours if not k.startswith("fc8."))
    assert torch.equal(model.fc8.weight, fc8)  # ImageNet has no fc8 of ours: it stays at its init, and says so
    listed = capsys.readouterr().err
    assert "kept as initialised: fc8.weight, fc8.bias" in listed and "not in this network: classifier.6.*" in listed
    torch.save({"state_dict": {f"module.{k}": v for k, v in torchvision_layout(reference).items()}}, path)
    assert fw.read_frontend_weights(str(path))["kind"] == "torchvision VGG-16"  # wrapped, DataParallel names
    found = fw.read_frontend_weights(str(path))
    del found["state"]["features.28.bias"]  # a front-end tensor the file lacks: refused, not left at random
    with pytest.raises(UserError, match="does not fit this network: 1 tensors missing.*features.28"):
        fw.load_init(model, str(path), "vgg16_small", found)
    with pytest.raises(UserError, match="needs --backbone vgg16"):
        fw.load_init(model, "imagenet", "vgg16_small")


def source_phase_file(path, num_classes=8, backbone="vgg16_small", normalization="caffe", **extra):
    """A checkpoints/source_phase.pt as main() writes it (no optimiser state); extra entries make it a last.pt."""
    state = small_front_end_state(num_classes) if backbone == "vgg16_small" else \
        fw.VGG16FrontEnd(backbone, num_classes).state_dict()
    torch.save({"script": "fcn_wild", "num_classes": num_classes, "iter": 7, "normalization": normalization,
                "args": {"backbone": backbone}, "model": state, **extra}, path)
    return state


def test_own_checkpoints_are_recognised_and_imply_their_flags(tmp_path, monkeypatch, capsys):
    reference = source_phase_file(tmp_path / "source_phase.pt")
    found = fw.read_frontend_weights(str(tmp_path / "source_phase.pt"))
    assert (found["kind"], found["iter"], found["num_classes"], found["resumable"]) == \
        ("fcn_wild source-phase front-end", 7, 8, False)
    assert found["implied"] == {"backbone": "vgg16_small", "normalization": "caffe"}
    model = fw.VGG16FrontEnd("vgg16_small", 8)
    assert fw.load_init(model, str(tmp_path / "source_phase.pt"), "vgg16_small", found) == "caffe"
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())  # fc8 included
    source_phase_file(tmp_path / "last.pt", optimizer={})
    assert fw.read_frontend_weights(str(tmp_path / "last.pt"))["kind"] == "fcn_wild checkpoint"

    def prepare(*flags):  # what main() does with the flags before it builds the network
        monkeypatch.setattr(sys, "argv", ["fcn_wild.py", *flags])
        args = fw.parse_args(fw.Args, fw.PRESETS)
        return args, fw.prepare_frontend_weights(args, None, 8)

    args, found = prepare("--init", str(tmp_path / "source_phase.pt"), "--adapt-start", "0")
    assert (args.backbone, args.normalization) == ("vgg16_small", "caffe")  # not typed: the file's
    assert "recognised fcn_wild source-phase front-end: backbone vgg16_small, caffe input" in capsys.readouterr().out
    args, found = prepare("--init", str(tmp_path / "source_phase.pt"), "--adapt-start", "0", "--normalization",
                          "imagenet")
    assert args.normalization == "imagenet" and found["applied"] == {"backbone": "vgg16_small"}  # typed: it wins
    assert "--normalization imagenet contradicts" in capsys.readouterr().err
    with pytest.raises(UserError, match="has 8 classes, this run has 19"):
        fw.prepare_frontend_weights(fw.Args(init=str(tmp_path / "source_phase.pt")), None, 19)
    with pytest.raises(UserError, match="no optimiser state.*--init"):
        fw.prepare_frontend_weights(fw.Args(), str(tmp_path / "source_phase.pt"), 8)


class WritesAFile:
    """Unpickling this calls open(path, "w"): what any code in a pickle could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_third_party_files_and_wrong_files_are_one_line_errors(tmp_path):
    """The third-party TF code's weights (models/model.py:34: np.load(path).item() of {layer: [weight, bias]}) are
    NumPy pickles: refused from their header, never unpickled (the marker file shows that nothing ran); its trained
    models are TensorFlow checkpoints."""
    marker = tmp_path / "ran"
    layers = {"conv1_1": [np.zeros((3, 3, 3, 64), np.float32), np.zeros(64, np.float32)], "hook": WritesAFile(marker)}
    np.save(tmp_path / "train_cscape_frontend.npy", np.array(layers, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="NumPy pickle .* would run any code it carries") as error:
        fw.read_frontend_weights(str(tmp_path / "train_cscape_frontend.npy"))
    assert "--init imagenet" in str(error.value) and "\n" not in str(error.value) and not marker.exists()
    np.save(tmp_path / "plain.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(UserError, match="a NumPy array, not a weights dict"):
        fw.read_frontend_weights(str(tmp_path / "plain.npy"))
    with zipfile.ZipFile(tmp_path / "train_synthia_frontend.zip", "w") as archive:  # download_src.sh's zip
        for suffix in (".index", ".data-00000-of-00001", ".meta"):
            archive.writestr(f"train_synthia_frontend/model.ckpt{suffix}", b"\0" * 16)
    with pytest.raises(UserError, match="TensorFlow checkpoint"):
        fw.read_frontend_weights(str(tmp_path / "train_synthia_frontend.zip"), "--weights")
    (tmp_path / "model-800.index").write_bytes(b"\0" * 40 + fw.TF_TABLE_MAGIC)  # an unzipped index file
    with pytest.raises(UserError, match="TensorFlow checkpoint"):
        fw.read_frontend_weights(str(tmp_path / "model-800.index"))
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "garbage.pt")
    with pytest.raises(UserError, match="unrecognised layout.*torchvision-layout VGG-16"):
        fw.read_frontend_weights(str(tmp_path / "garbage.pt"))
    torch.save({"script": "adaptsegnet", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="written by adaptsegnet, not fcn_wild"):
        fw.read_frontend_weights(str(tmp_path / "other.pt"))
    torch.save({"model": {"w": torch.zeros(1)}, "opt": fw.Args()}, tmp_path / "objects.pt")  # a pickled object
    with pytest.raises(UserError, match="Unsupported global"):
        fw.read_frontend_weights(str(tmp_path / "objects.pt"))


# ----------------------------------------------------------------------------------------------------
# category-specific adaptation
def test_class_size_statistics_on_hand_made_labels():
    # 4 label maps of 10 pixels: class 0 covers 1, 2, 3, 4 pixels; class 1 covers 5 pixels in two images;
    # class 2 never occurs; 255 pixels count in the image size
    maps = []
    for k in range(4):
        label = np.full(10, 3, np.uint8)
        label[:k + 1] = 0
        if k < 2:
            label[5:10] = 1
        if k == 3:
            label[9] = 255
        maps.append(label.reshape(2, 5))
    fractions = torch.stack([fw._ClassFractions(types.SimpleNamespace(load_label=lambda i: maps[i]), 4)[i]
                             for i in range(4)]).numpy()
    assert np.allclose(fractions[:, 0], [0.1, 0.2, 0.3, 0.4]) and np.allclose(fractions[3], [0.4, 0, 0, 0.5])
    stats = fw.class_size_stats(fractions)
    # class 0 over [.1 .2 .3 .4]: p10 = .1 + .3 * .1 = .13, mean .25, p90 = .1 + 2.7 * .1 = .37
    assert stats["alpha"][0] == pytest.approx(0.13) and stats["delta"][0] == pytest.approx(0.25)
    assert stats["gamma"][0] == pytest.approx(0.37)
    assert stats["alpha"][1] == stats["delta"][1] == stats["gamma"][1] == pytest.approx(0.5)  # two images, .5 each
    assert stats["images_with_class"] == [4, 2, 0, 4] and stats["delta"][2] == 0.0
    assert stats["delta"][3] == pytest.approx((0.4 + 0.3 + 0.7 + 0.5) / 4)  # 255 pixels are not class 3


def test_presence_from_the_argmax_fraction():
    logits = torch.zeros(1, 3, 1, 10)
    logits[0, 0, 0, :7] = 5  # class 0: 70 % of the pixels
    logits[0, 1, 0, 7:9] = 5  # class 1: 20 %
    logits[0, 2, 0, 9] = 5  # class 2: 10 %
    alpha = torch.tensor([0.5, 2.0, 0.9])
    present = fw.presence(logits, alpha, factor=0.1)  # bars .05, .2, .09
    assert present.tolist() == [[True, False, True]]  # 0.2 is not > 0.2
    # nothing above its bar: the most frequent predicted class still counts as present
    assert fw.presence(logits, torch.tensor([100.0, 100.0, 100.0])).tolist() == [[True, False, False]]


def test_constrained_projection_meets_the_constraints():
    torch.manual_seed(0)
    n = 400
    logits = torch.randn(1, 4, n)
    logits[:, 0] += 2.0  # class 0 dominates Q (mean prob ~.6), class 1 is rare
    q = logits.softmax(1)
    present = torch.tensor([[True, True, True, False]])
    lower = torch.tensor([0.1, 0.3, 0.05, 0.0])
    upper = torch.tensor([0.4, 0.6, 0.9, 1.0])
    p = fw.constrained_projection(q, present, lower, upper, slack=2.0, steps=300, step_size=2.0)
    mean = p.mean(2)[0]
    assert torch.allclose(p.sum(1), torch.ones(1, n), atol=1e-5)
    assert mean[3] == 0 and (p[0, 3] == 0).all()  # absent class
    assert q.mean(2)[0, 0] > 0.45 and mean[0] <= 0.4 + 1e-3  # hard upper bound pulls class 0 down
    assert q.mean(2)[0, 1] < 0.2 and mean[1] >= 0.3 - 1e-3  # lower bound (reachable within the slack) pushes up
    # the solution is Q tilted per class: P_i(c) / Q_i(c) = exp(lambda_c - mu_c) / Z_i
    ratio = (p[0, :3] / q[0, :3]) / (p[0, 0] / q[0, 0])
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    # a lower bound beyond the slack is not met: lambda stops at the slack weight
    p_capped = fw.constrained_projection(q, present, torch.tensor([0.0, 0.95, 0.0, 0.0]), torch.ones(4), slack=0.5)
    assert p_capped.mean(2)[0, 1] < 0.9


def test_ca_loss_value_and_logit_gradient():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 5, requires_grad=True)
    q = logits.detach().softmax(1)
    present = torch.tensor([[True, True, False]])
    lower, upper = torch.tensor([0.0, 0.6, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    assert q.mean((2, 3))[0, 1] < 0.6  # present class 1 is below its lower bound
    p = fw.constrained_projection(q.flatten(2), present, lower, upper).view_as(q)
    weight = torch.tensor([0.1, 1.0, 1.0])  # class 0 is "large"
    loss = fw.ca_loss(logits, p, weight)
    n = 20
    kl = (p * (p.clamp_min(1e-30).log() - q.log())).sum() / n
    assert loss.item() == pytest.approx(kl.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(grad, weight.view(1, 3, 1, 1) * (q - p) / n, atol=1e-7)
    assert (grad[0, 1] < 0).all()  # descent pushes the under-represented present class's logit up
    assert (grad[0, 2] > 0).all()  # the absent class (P = 0) is pushed down
    # without down-weighting the gradient is exactly (Q - P)/N
    (plain,) = torch.autograd.grad(fw.ca_loss(logits, p, torch.ones(3)), logits)
    assert torch.allclose(plain, (q - p) / n, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# global alignment
def test_domain_losses_and_confusion_is_bce_toward_one_half():
    logits = torch.tensor([[-3.0, -0.5, 0.0, 0.7, 4.0]])
    assert fw.domain_bce(logits, fw.SOURCE_LABEL).item() == pytest.approx(F.softplus(logits).mean().item())
    assert fw.domain_bce(logits, fw.TARGET_LABEL).item() == pytest.approx(F.softplus(-logits).mean().item())
    half = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))
    assert fw.confusion_loss(logits).item() == pytest.approx(half.item())
    z = torch.zeros(3, requires_grad=True)
    (g,) = torch.autograd.grad(fw.confusion_loss(z), z)
    assert torch.allclose(g, torch.zeros(3)) and fw.confusion_loss(z).item() == pytest.approx(math.log(2))
    assert (fw.SOURCE_LABEL, fw.TARGET_LABEL) == (0.0, 1.0)
    assert fw.confusion_ramp(0, 1200) == 0.0
    assert fw.confusion_ramp(1200, 1200) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert fw.confusion_ramp(120, 1200) == pytest.approx(2 / (1 + math.exp(-1)) - 1)


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def changed(before, net):
    return {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}


def test_each_optimiser_moves_only_its_parameters():
    torch.manual_seed(0)
    args = small_args(lr=1e-3)
    model, disc = fw.VGG16FrontEnd("vgg16_small", 4), fw.build_disc("vgg16_small", "cpu")
    params, optimizers = fw.build_optimizers(model, disc, args)
    assert set(optimizers) == {"task", "d", "conf", "ca"}
    assert [g["lr_mult"] for g in optimizers["ca"].param_groups] == [0.1, 0.1, 0.1]
    assert optimizers["d"].param_groups[0]["lr_mult"] == 10.0
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    src, tgt = torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64)
    labels = torch.randint(0, 4, (2, 32, 64))

    def objectives():
        fc7_s, logits_s = model(src)
        fc7_t, logits_t = model(tgt)
        d_s, d_t = disc(fc7_s), disc(fc7_t)
        stats = {"alpha": torch.full((4,), 0.05), "delta": torch.full((4,), 0.25), "gamma": torch.full((4,), 0.5),
                 "weight": torch.ones(4)}
        return {"task": fw.seg_loss(logits_s, labels),
                "d": 0.5 * (fw.domain_bce(d_s, 0.0) + fw.domain_bce(d_t, 1.0)),
                "conf": 0.5 * (fw.confusion_loss(d_s) + fw.confusion_loss(d_t)),
                "ca": fw.ca_objective(logits_t, (32, 64), stats, args)}

    grads = fw.objective_grads(objectives(), params, scaler)
    m0, d0 = snapshot(model), snapshot(disc)
    fw.step_objectives(optimizers, params, {"d": grads["d"]}, scaler)  # the domain classifier step
    assert not changed(m0, model) and changed(d0, disc) == set(disc.state_dict())
    m0, d0 = snapshot(model), snapshot(disc)
    fw.step_objectives(optimizers, params, {"conf": grads["conf"]}, scaler)  # the feature (confusion) step
    assert not changed(d0, disc)
    assert changed(m0, model) == {k for k in model.state_dict() if not k.startswith("fc8.")}
    for name in ("task", "ca"):  # the segmentation objectives move F and fc8, never D
        m0, d0 = snapshot(model), snapshot(disc)
        fw.step_objectives(optimizers, params, {name: grads[name]}, scaler)
        assert not changed(d0, disc) and "fc8.weight" in changed(m0, model) and "fc6.weight" in changed(m0, model)
    # the confusion gradient reaches F only through D, which it leaves as it is
    assert all(p.grad is None for p in disc.parameters())


def test_weight_decay_and_lr_multipliers_of_each_phase():
    model = fw.VGG16FrontEnd("vgg16_small", 4)
    names = {id(p): n for n, p in model.named_parameters()}

    def group_names(groups):
        return [sorted(names[id(p)] for p in g["params"]) for g in groups]

    # adaptation (third-party L2 terms): conv1_1..conv5_3 and fc6 weights decay; biases, fc7, fc8 do not
    decayed, rest, head = fw.VGG16FrontEnd.param_groups(model, 1e-6, 1.0, 5e-4)
    assert [g["weight_decay"] for g in (decayed, rest, head)] == [5e-4, 0.0, 0.0]
    convs = [n for n, _ in model.named_parameters() if n.startswith("features.") and n.endswith(".weight")]
    assert group_names([decayed]) == [sorted(convs + ["fc6.weight"])] and len(convs) == 13
    assert "fc7.weight" in group_names([rest])[0] and group_names([head]) == [["fc8.bias", "fc8.weight"]]
    # source phase (Caffe solver of Yu & Koltun): weights lr x1 with decay, biases lr x2 without; fc8 x head
    groups = model.caffe_sgd_groups(1e-4, 10.0, 5e-4)
    assert [(g["lr_mult"], g["weight_decay"]) for g in groups] == [(1.0, 5e-4), (2.0, 0.0), (10.0, 5e-4), (20.0, 0.0)]
    assert group_names(groups)[2:] == [["fc8.weight"], ["fc8.bias"]]
    assert sum(len(g["params"]) for g in groups) == len(names)
    args = fw.Args(adapt_start=10)
    _, optimizers = fw.build_optimizers(model, None, args)
    assert isinstance(optimizers["source"], torch.optim.SGD) and optimizers["source"].defaults["momentum"] == 0.99
    assert "source" not in fw.build_optimizers(model, None, fw.Args(adapt_start=0))[1]
    assert "source" not in fw.build_optimizers(model, None, small_args())[1]  # quick: the task Adam throughout
    assert fw.VGG16FrontEnd("vgg16_small", 4).fc8.weight.std().item() == pytest.approx(0.001, rel=0.2)


def test_large_classes_are_fixed_by_name_as_the_tf_code():
    from common.data import CITYSCAPES_CLASSES
    weight, unknown = fw.large_class_weight(CITYSCAPES_CLASSES, fw.Args().ca_large_classes, 0.1)
    assert torch.nonzero(weight != 1).flatten().tolist() == [0, 2, 8] and not unknown  # custom_grad.py:127
    assert weight[0].item() == pytest.approx(0.1)
    weight, unknown = fw.large_class_weight(["road", "car"], ["road", "building"], 0.1)
    assert weight.tolist() == pytest.approx([0.1, 1.0]) and unknown == ["building"]


def test_ca_objective_is_fp32_under_autocast():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 8).bfloat16()  # what a forward under autocast returns
    stats = {"alpha": torch.full((4,), 0.05), "delta": torch.full((4,), 0.25), "gamma": torch.full((4,), 0.5),
             "weight": torch.ones(4)}
    args = small_args()
    plain = fw.ca_objective(logits.float(), (24, 32), stats, args)  # the same values, all in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fw.ca_objective(logits, (24, 32), stats, args)
    assert under.dtype == torch.float32 and under.item() == pytest.approx(plain.item(), rel=1e-6)


def test_objective_lrs_source_phase_then_adaptation_at_its_own_rate():
    args = small_args(adapt_start=10, adapt_lr_mult=0.1, confusion_ramp_iters=100, poly_horizon=400)
    before = fw.objective_lrs(1e-3, 9, args)  # source-only phase: only the task objective has a step size
    assert before["task"] == 1e-3 and before["conf"] == 0.0
    at_start = fw.objective_lrs(1e-3, 10, args)  # the ramp counts from adapt_start, so it starts at 0
    assert at_start["d"] == pytest.approx(1e-4) and at_start["ca"] == pytest.approx(1e-4) and at_start["conf"] == 0.0
    later = fw.objective_lrs(1e-3, 20, args)
    assert later["conf"] == pytest.approx(1e-4 * (2 / (1 + math.exp(-1)) - 1)) and later["task"] == 1e-3
    paper = fw.Args(poly_horizon=41000)  # third-party: all at 1e-6, ramp over 600 updates after the source phase
    assert fw.objective_lrs(1e-6, 39999, paper)["conf"] == 0.0 and fw.objective_lrs(1e-6, 0, paper)["source"] == 1e-4
    lrs = fw.objective_lrs(1e-6, 40000 + 1200, paper)
    assert lrs["d"] == lrs["ca"] == 1e-6 and lrs["conf"] == pytest.approx(1e-6 * (2 / (1 + math.exp(-20)) - 1))


def test_average_over_ranks_is_identity_single_process():
    rt = types.SimpleNamespace(distributed=False)
    grads = {"a": [torch.ones(2)]}
    assert fw.average_over_ranks(grads, rt) is grads


# ----------------------------------------------------------------------------------------------------
# each phase's step against a hand-written reference (the header's update rule, written out objective by objective)
def reference_ce(logits, labels):
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True).log_softmax(1)
    return -up.gather(1, labels.clamp(max=logits.shape[1] - 1)[:, None])[:, 0][labels != 255].mean()


def reference_adam(p, g, state, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """The step of torch.optim.Adam (L2 weight decay added to the gradient), by hand; p - step is the new value."""
    g = g + weight_decay * p
    state["t"] = t = state.get("t", 0) + 1
    state["m"] = betas[0] * state.get("m", 0) + (1 - betas[0]) * g
    state["v"] = betas[1] * state.get("v", 0) + (1 - betas[1]) * g * g
    return lr * (state["m"] / (1 - betas[0] ** t)) / ((state["v"] / (1 - betas[1] ** t)).sqrt() + eps)


def reference_sgd(p, g, state, lr, weight_decay, momentum):
    state["buf"] = g + weight_decay * p + (momentum * state["buf"] if "buf" in state else 0)
    return lr * state["buf"]


def reference_projection(q, present, lower, upper, slack=2.0, steps=100, step_size=2.0):
    """One image, q (C, N): P_i(c) = Q_i(c) e^(lambda_c - mu_c) / Z_i over the present classes, lambda in [0, slack]
    and mu >= 0 by projected gradient ascent on the dual (gradient lower - mean P and mean P - upper)."""
    lam, mu = torch.zeros(q.shape[0]), torch.zeros(q.shape[0])

    def p_of(lam, mu):
        w = q * torch.exp(lam - mu)[:, None] * present[:, None]
        return w / w.sum(0, keepdim=True)

    for _ in range(steps):
        mean = p_of(lam, mu).mean(1)
        lam = (lam + step_size * (lower - mean)).clamp(0, slack) * present
        mu = (mu + step_size * (mean - upper)).clamp(min=0) * present
    return p_of(lam, mu)


def reference_ca(logits_t, size, stats, large):
    """(Q's logits, their gradient): the target logits x8-upsampled, every 4th pixel; gradient weight_c (Q - P) /
    (N B), weight 0.1 on the large classes (custom_grad.py:104-128)."""
    sub = F.interpolate(logits_t, size=size, mode="bilinear", align_corners=True)[:, :, ::4, ::4]
    q = sub.detach().softmax(1).flatten(2)
    b, c, n = q.shape
    weight = torch.tensor([0.1 if i in large else 1.0 for i in range(c)])
    grad = torch.zeros_like(q)
    for i in range(b):
        share = torch.bincount(q[i].argmax(0), minlength=c) / n
        present = ((share > 0.1 * stats["alpha"]) | (share == share.max())).to(q.dtype)
        grad[i] = weight[:, None] * (q[i] - reference_projection(q[i], present, stats["delta"], stats["gamma"])) / (n * b)
    return sub, grad.view_as(sub)


def softplus_bce(d, label):
    return F.softplus(d).mean() if label == 0 else F.softplus(-d).mean()  # BCE with logits, label 0 or 1


def reference_adapt_iteration(model, disc, state, micro_batches, lr, t, hp):
    """One adaptation update: every objective from a fresh forward at the same parameters (D's from features taken
    as constants, the confusion's with D's parameters left out), each gradient averaged over the micro-batches,
    then one Adam step per objective at its lr: task lr (fc8 x head), D 10 x adapt, confusion ramp(t) x adapt, CA
    0.1 x adapt (fc8 x head); L2 5e-4 on the conv and fc6 weights in the task Adam only. Returns the gradients."""
    named = {**{f"model.{n}": p for n, p in model.named_parameters()},
             **{f"disc.{n}": p for n, p in disc.named_parameters()}}
    every = [n for n in named if n.startswith("model.")]
    features = [n for n in every if not n.startswith("model.fc8.")]
    grads = {name: {} for name in ("task", "d", "conf", "ca")}

    def add(objective, names, outputs, grad_outputs=None):
        for n, g in zip(names, torch.autograd.grad(outputs, [named[n] for n in names], grad_outputs)):
            grads[objective][n] = grads[objective].get(n, 0) + g / len(micro_batches)

    for images, labels, target in micro_batches:
        add("task", every, reference_ce(model(images)[1], labels))
        d_s, d_t = disc(model(images)[0].detach()), disc(model(target)[0].detach())
        add("d", [n for n in named if n.startswith("disc.")], 0.5 * (softplus_bce(d_s, 0) + softplus_bce(d_t, 1)))
        d_s, d_t = disc(model(images)[0]), disc(model(target)[0])
        half = [0.5 * (softplus_bce(d, 0) + softplus_bce(d, 1)) for d in (d_s, d_t)]
        add("conf", features, 0.5 * (half[0] + half[1]))
        sub, grad = reference_ca(model(target)[1], target.shape[-2:], hp["stats"], hp["large"])
        add("ca", every, sub, grad)
    ramp = 2 / (1 + math.exp(-10 * t / hp["ramp"])) - 1
    lrs = {"task": lr, "d": 10 * lr * hp["adapt"], "conf": ramp * lr * hp["adapt"], "ca": 0.1 * lr * hp["adapt"]}
    steps = []
    for objective, objective_grads in grads.items():
        for n, g in objective_grads.items():
            decayed = objective == "task" and n.endswith(".weight") and n.startswith(("model.features.", "model.fc6."))
            head = hp["head"] if n.startswith("model.fc8.") else 1.0
            steps.append((named[n], reference_adam(named[n].detach(), g, state.setdefault((objective, n), {}),
                                                   lrs[objective] * head, 5e-4 if decayed else 0.0)))
    with torch.no_grad():  # every step from the same parameters: the task Adam's decay sees them before any step
        for p, step in steps:
            p -= step
    return grads


def record_steps(optimizers, names):
    """Patch every optimiser's step to record (its key, {parameter name: gradient it steps with})."""
    held = []
    for key, optimizer in optimizers.items():
        def step(*a, _key=key, _step=optimizer.step, _opt=optimizer, **k):
            held.append((_key, {names[id(p)]: p.grad.clone() for g in _opt.param_groups for p in g["params"]
                                if p.grad is not None}))
            return _step(*a, **k)
        optimizer.step = step
    return held


def close(ours, theirs):
    """Same parameter names, every gradient within 1e-5 of the reference's norm: the script's losses are fp32 (1e-6 at
    the first step), and after one Adam step the two networks differ by that rounding, amplified (4e-6 measured)."""
    return ours.keys() == theirs.keys() and all(
        float((ours[n] - theirs[n]).norm()) <= 1e-5 * float(theirs[n].norm()) + 1e-12 for n in theirs)


def micro_batches(num, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        labels = torch.randint(0, num_classes, (2, 32, 64), generator=g)
        labels[0, :5] = 255
        out.append((torch.randn(2, 3, 32, 64, generator=g), labels, torch.randn(2, 3, 32, 64, generator=g)))
    return out


def test_adapt_step_matches_an_independent_reference():
    """Two adaptation updates (GA + CA, 2 micro-batches each, the confusion ramp at t = 0 and 1) of adapt_step with
    build_optimizers' Adams against reference_adapt_iteration: the gradients each optimiser steps with (names and
    values: which parameters each objective moves, the accumulation mean, the detach of D's input, the CA targets and
    the x0.1 classes), then every weight of F, fc8 and D. float64 and eval mode: dropout masks depend on the order of
    random draws, not on the update rule (eval mode turns dropout off and changes nothing else: no BN); in float64
    only the script's fp32 losses round. D starts at N(0, 0.1) instead of N(0, 0.001): at D ~ 0 the confusion
    gradient is ~0 and Adam would turn its rounding into whole steps."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        args = small_args(lr=1e-3, grad_accum=2, batch_size=4, adapt_start=5, confusion_ramp_iters=4,
                          head_lr_mult=2.0, adapt_lr_mult=0.5)
        model, disc = fw.VGG16FrontEnd("vgg16_small", 8).eval(), fw.build_disc("vgg16_small", "cpu").eval()
        with torch.no_grad():
            for p in [*disc.parameters(), model.fc8.weight]:
                p.normal_(0, 0.1)
        reference, reference_disc = copy.deepcopy(model), copy.deepcopy(disc)
        params, optimizers = fw.build_optimizers(model, disc, args)
        names = {id(p): f"{net}.{n}" for net, m in (("model", model), ("disc", disc)) for n, p in m.named_parameters()}
        held = record_steps(optimizers, names)
        stats = {"alpha": torch.tensor([0.05, 0.05, 4.0, 0.05, 0.05, 4.0, 0.05, 0.05]),  # 2 and 5: absent unless
                 "delta": torch.full((8,), 0.2), "gamma": torch.full((8,), 0.3)}           # the most frequent
        ca_stats = {**stats, "weight": fw.large_class_weight(TOY_CLASSES, args.ca_large_classes,
                                                             args.ca_large_weight)[0]}
        hp = {"stats": stats, "large": (0, 2, 3), "ramp": 4, "adapt": 0.5, "head": 2.0}  # road, building, vegetation
        rt = Runtime("cpu", amp=False)
        state, expected = {}, []
        for t in range(2):
            lr = 1e-3 * (1 - 0.1 * t)
            batches = micro_batches(2, 8, seed=t)
            fw.set_lr(optimizers["task"], lr)  # main()'s loop sets the task lr
            losses = fw.adapt_step(model, disc, optimizers, params, batches, lr, args.adapt_start + t, args, rt,
                                   ca_stats)
            expected += reference_adapt_iteration(reference, reference_disc, state, batches, lr, t, hp).items()
    finally:
        torch.set_default_dtype(torch.float32)
    assert set(losses) == {"seg_src", "d_main", "adv_main", "d_acc", "ca"}
    assert [key for key, _ in held] == [key for key, _ in expected] == ["task", "d", "conf", "ca"] * 2
    for (key, ours), (_, theirs) in zip(held, expected):
        assert close(ours, theirs), key
    # weights: the fp32 losses' rounding, turned by Adam's per-element normalisation into update errors where a
    # gradient is near 0, measured up to 2.6e-6; the smallest step is the CA Adam's 5e-5 (D's 5e-3)
    for ours, theirs in ((model, reference), (disc, reference_disc)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)


@pytest.mark.parametrize("source_optimizer", ["sgd", "adam"])
def test_source_step_matches_an_independent_reference(source_optimizer):
    """Two source-phase updates (2 micro-batches each) of source_step against a hand-written one: CE on the
    upsampled logits, gradients averaged over the micro-batches; Yu & Koltun's SGD (momentum, weights lr x1 with
    L2, biases lr x2 without, fc8 x head) or, with --source-optimizer adam, the task Adam (quick preset)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        args = small_args(adapt_start=10, source_optimizer=source_optimizer, grad_accum=2, batch_size=4,
                          head_lr_mult=3.0, source_momentum=0.9)
        model = fw.VGG16FrontEnd("vgg16_small", 8).eval()
        reference = copy.deepcopy(model)
        _, optimizers = fw.build_optimizers(model, None, args)
        optimizer = optimizers.get("source", optimizers["task"])  # as main() picks it
        names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
        held = record_steps({"source": optimizer}, names)
        rt = Runtime("cpu", amp=False)
        state, expected = {}, []
        for t in range(2):
            lr = 1e-2 * (1 - 0.1 * t)
            fw.set_lr(optimizer, lr)
            batches = micro_batches(2, 8, seed=t)
            losses = fw.source_step(model, optimizer, batches, rt)
            grads = {}
            for images, labels, _ in batches:
                named = list(reference.named_parameters())
                for (n, _), g in zip(named, torch.autograd.grad(reference_ce(reference(images)[1], labels),
                                                                 [p for _, p in named])):
                    grads[f"model.{n}"] = grads.get(f"model.{n}", 0) + g / 2
            expected.append(grads)
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    head = 3.0 if n.startswith("fc8.") else 1.0
                    if source_optimizer == "sgd":
                        bias = n.endswith(".bias")
                        p -= reference_sgd(p, grads[f"model.{n}"], state.setdefault(n, {}), lr * head * (2 if bias else 1),
                                           0.0 if bias else 5e-4, 0.9)
                    else:
                        decayed = n.endswith(".weight") and n.startswith(("features.", "fc6."))
                        p -= reference_adam(p, grads[f"model.{n}"], state.setdefault(n, {}), lr * head,
                                            5e-4 if decayed else 0.0)
    finally:
        torch.set_default_dtype(torch.float32)
    assert set(losses) == {"seg_src"} and len(held) == 2
    for (_, ours), theirs in zip(held, expected):
        assert close(ours, theirs)
    # Adam turns the fp32 losses' rounding into update errors where a gradient is near 0 (measured 3.9e-5 of steps of
    # 1e-2 to 3e-2); SGD does not (measured 1.4e-10)
    a, b = model.state_dict(), reference.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-8 if source_optimizer == "sgd" else 2e-4) for k in a)


# ----------------------------------------------------------------------------------------------------
# end to end
def weights(out):
    return torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)


def train_rows(out, after=0):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows[after:] if "seg_src" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """5 iterations of 2 micro-batches: 3 of the source phase (SGD with momentum), then 2 with GA + CA; reused."""
    out = tmp_path_factory.mktemp("fcn_wild") / "straight"
    run_script(*QUICK, *CA, *PHASES, *ACCUM, "--iters", "5", "--out", str(out), check=True)
    return out


def test_quick_run_writes_every_run_folder_file(straight):
    config = json.loads((straight / "config.json").read_text())
    assert config["script"] == "fcn_wild" and set(config["params"]) == {"model", "disc"} and config["loaded"] is None
    train = train_rows(straight)
    assert [r["iter"] for r in train] == [2, 4, 5] and {"d_main", "adv_main", "d_acc", "ca", "lr"} <= set(train[2])
    assert "d_main" not in train[0] and "ca" not in train[0]  # iterations 1-2: the source phase
    assert train[0]["lr"] == pytest.approx(1e-3 * (1 - 1 / 5) ** 0.9)  # the SGD's lr is logged there
    assert train[2]["lr"] == pytest.approx(3e-4 * (1 - 4 / 5) ** 0.9)  # then the task Adam's
    assert 0 <= train[2]["d_acc"] <= 1
    stats = json.loads((straight / "class_stats.json").read_text())
    assert stats["images"] == 16 and len(stats["alpha"]) == 8
    results = json.loads((straight / "results.json").read_text())
    assert 0 <= results["miou"] <= 100 and results["iters"] == 5 and results["num_classes"] == 8
    assert len(os.listdir(straight / "predictions")) == 2
    ckpt = weights(straight)
    assert ckpt["script"] == "fcn_wild" and ckpt["iter"] == 5
    assert {"disc", "optimizer_d", "optimizer_conf", "optimizer_ca", "optimizer_source", "optimizer"} <= set(ckpt)
    assert all("momentum_buffer" in s for s in ckpt["optimizer_source"]["state"].values())
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # the task Adam took over after the source phase


def test_resume_within_and_across_the_phases_ends_with_the_uninterrupted_weights(straight, tmp_path):
    """2 iterations, then --resume auto to 4 (from inside the source phase: the SGD's momentum and the source stream,
    then across the switch: source_phase.pt written by the resumed process), then to 5 (inside the adaptation: D, the
    Adams, the target stream). Each resumed process says where it starts and logs only later iterations (a silent
    restart from 0 would end with the same weights and fail here); the end is the straight run's, bit for bit."""
    resumed = tmp_path / "resumed"
    start, rows = None, 0
    for iters in (2, 4, 5):
        result = run_script(*QUICK, *CA, *PHASES, *ACCUM, "--iters", str(iters), "--poly-horizon", "5", "--resume",
                            "auto", "--out", str(resumed), check=True)
        if start is not None:
            assert f"resumed from {resumed / 'checkpoints' / 'last.pt'} at iteration {start}" in result.stdout
            assert train_rows(resumed, rows) and min(r["iter"] for r in train_rows(resumed, rows)) > start
        start, rows = iters, len((resumed / "metrics.jsonl").read_text().splitlines())
    a, b = weights(straight), weights(resumed)
    assert b["iter"] == 5
    for key in ("model", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    phase_a, phase_b = (torch.load(out / "checkpoints" / "source_phase.pt", weights_only=True)["model"]
                        for out in (straight, resumed))
    assert all(torch.equal(phase_a[k], phase_b[k]) for k in phase_a)


def test_source_phase_is_the_source_only_run_and_adaptation_starts_from_it(straight, tmp_path, monkeypatch):
    source = tmp_path / "source"
    run_script(*QUICK, *PHASES, *ACCUM, "--iters", "3", "--poly-horizon", "5", "--no-global", "--no-category",
               "--out", str(source), check=True)
    ckpt = weights(source)
    assert "disc" not in ckpt and "optimizer_ca" not in ckpt
    rows = train_rows(source)
    assert "d_main" not in rows[0] and "ca" not in rows[0]
    # the method's source phase is exactly this run (building D and the statistics leaves the RNG alone), and
    # the run keeps its front-end as checkpoints/source_phase.pt
    assert rows[0]["iter"] == 2 and rows[0]["seg_src"] == train_rows(straight)[0]["seg_src"]
    front_end = torch.load(straight / "checkpoints" / "source_phase.pt", weights_only=True)
    assert front_end["iter"] == 3 and set(front_end) >= {"script", "num_classes", "normalization", "model"}
    assert all(torch.equal(front_end["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    adapted = tmp_path / "adapted"
    result = run_script(*QUICK, "--iters", "1", "--no-category", "--init", str(straight / "checkpoints" /
                        "source_phase.pt"), "--out", str(adapted), check=True)
    assert "recognised fcn_wild source-phase front-end" in result.stdout and "loaded 32 of 32 tensors" in result.stdout
    loaded = json.loads((adapted / "config.json").read_text())["loaded"]
    assert loaded["kind"] == "fcn_wild source-phase front-end" and loaded["file"].endswith("source_phase.pt")
    assert "adv_main" in train_rows(adapted)[0] and "ca" not in train_rows(adapted)[0]
    # resuming a run with another method configuration is refused (before any data is read: in-process)
    monkeypatch.setattr(sys, "argv", [*QUICK, "--iters", "4", "--resume", str(source / "checkpoints" / "last.pt"),
                                      "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="has no 'disc'"):
        fw.main()


def test_eval_only_of_a_front_end_on_a_cityscapes_folder(tmp_path):
    """--eval-only --weights <a 19-class source_phase.pt> on a tiny Cityscapes tree: no flags needed (the backbone
    and the input normalisation come from the file), recorded in config/results.json, predictions in the benchmark
    format (Cityscapes label ids at the label size, the names cityscapesScripts matches)."""
    names = released.cityscapes_tree(str(tmp_path / "data"))
    reference = source_phase_file(tmp_path / "source_phase.pt", num_classes=19)
    out, preds = tmp_path / "eval", tmp_path / "preds"
    result = run_script("fcn_wild.py", "--eval-only", "--weights", str(tmp_path / "source_phase.pt"), "--data-root",
                        str(tmp_path / "data"), "--eval-size", "32", "64", "--num-workers", "0", "--out", str(out),
                        "--device", "cpu", "--save-predictions", str(preds), check=True)
    assert "recognised fcn_wild source-phase front-end: backbone vgg16_small, caffe input" in result.stdout
    assert "loaded 32 of 32 tensors" in result.stdout
    config, results = (json.loads((out / f).read_text()) for f in ("config.json", "results.json"))
    assert config["args"]["backbone"] == "vgg16_small" and config["normalization"] == "caffe"
    assert results["loaded"]["kind"] == "fcn_wild source-phase front-end" and results["iters"] == 7
    files = sorted(os.listdir(preds))
    assert files == [f"{n}_leftImg8bit.png" for n in names]
    saved = np.asarray(Image.open(preds / files[0]))
    assert saved.shape == (64, 128) and set(np.unique(saved)) <= set(released.CITYSCAPES_LABEL_IDS)
    assert reference["fc8.weight"].shape[0] == 19


# Every recipe field of `--preset paper` (the defaults) and where its value comes from. "Y&K": Yu & Koltun, ICLR
# 2016, Appendix A (front-end training for urban scenes; A.3 Cityscapes) and fyu/dilation train.py/network.py;
# "TF": stu92054/Domain-adaptation-on-segmentation FCNs_Wild/ (methods.md section 2, third-party).
PAPER_RECIPE = {
    "backbone": "vgg16",  # the dilated VGG-16 front-end (paper; TF models/model.py:81-108)
    "init": "imagenet",  # Y&K start the front-end from ImageNet VGG-16 (fyu/dilation pretrained/download_vgg_conv.sh)
    "adapt_start": 40000,  # Y&K A.3: the Cityscapes front-end is trained for 40K iterations
    "source_optimizer": "sgd", "source_lr": 1e-4, "source_momentum": 0.99,  # Y&K Appendix A
    "weight_decay": 5e-4,  # Y&K train.py make_solver; TF model.py:35
    "batch_size": 8,  # Y&K: mini-batches of 8 crops; TF scripts/train_syn2city.sh:8 (4+4 per micro-step, x2)
    "grad_accum": 2,  # TF train_syn2city.sh:9 iter_size 2
    "iters": 41000,  # 40,000 source-phase + 1,000 adaptation updates (TF max_step 2000 micro-steps, :10)
    "lr": 1e-6, "poly_power": 0.0,  # TF src/train_adv.py:292, constant (Y&K: step x0.1 at 100K, after 40K)
    "d_lr_mult": 10.0, "confusion_ramp_iters": 600, "ca_lr_mult": 0.1,  # TF train_adv.py:296, :297 (1200/2), :299
    "adapt_lr_mult": 1.0, "head_lr_mult": 1.0,  # TF: every lr a multiple of the one 1e-6, fc8 at the same
    "global_alignment": True, "category_alignment": True,  # TF train_syn2city.sh:7 --method GACA
    "ca_subsample": 4, "ca_presence": 0.1, "ca_slack": 2.0,  # TF src/custom_grad.py:20, :85, :16
    "ca_large_classes": ["road", "building", "vegetation"], "ca_large_weight": 0.1,  # custom_grad.py:126-128
    "crop_size": None, "source_size": [256, 512], "target_size": [256, 512],  # TF 512x256 resize, no crop
    "eval_size": None,  # = target_size: TF src/infer.py:178 predicts at 512x256
}


def test_paper_preset_is_the_stated_recipe_and_dry_run(tmp_path):
    out = tmp_path / "dry"
    result = run_script("fcn_wild.py", "--dry-run", "--data-root", str(tmp_path / "none"), "--out", str(out),
                        "--device", "cpu", check=True)  # a dry run never loads the ImageNet weights
    config = json.loads((out / "config.json").read_text())
    resolved = {key: config["args"][key] for key in PAPER_RECIPE}
    assert resolved == PAPER_RECIPE
    assert (config["args"]["source"], config["args"]["target"]) == ("gta", "cityscapes")
    assert config["args"]["adapt_start"] % config["args"]["eval_every"] == 0  # the source-only row is evaluated
    assert fw.RESIZE == "cv2-bilinear"  # TF src/data_reader.py:71, 79 and infer.py:178: cv2.resize's default
    assert 134_000_000 < config["params"]["model"]["trainable"] < 135_000_000  # VGG-16 front-end, fc8 19 classes
    assert 5_000_000 < config["params"]["disc"]["trainable"] < 5_300_000  # 4096 -> 1024 -> 1024 -> 1
    assert "dry run" in result.stdout and not (out / "results.json").exists()


def test_folder_dataset_statistics_cached_next_to_it(tmp_path):
    # a folder dataset: the class-size statistics are cached next to it and copied into the run folder
    from test_data import make_folder
    folder = make_folder(str(tmp_path / "mine"), n=2, h=32, w=48)
    result = run_script(*QUICK, "--source", folder, "--target", folder, "--iters", "1", "--batch-size", "2",
                        "--out", str(tmp_path / "f"), check=True)
    cached = json.loads((tmp_path / "mine" / "fcn_wild_class_stats-3.json").read_text())
    assert cached == json.loads((tmp_path / "f" / "class_stats.json").read_text())
    assert cached["images"] == 2 and cached["delta"][1] == pytest.approx(31 / 32)  # row 0 is 255
    assert cached["images_with_class"] == [0, 2, 0]
    assert "not in this class list: road, building, vegetation" in result.stdout  # the x0.1 classes, reported


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "3", "--grad-accum", "2"], "--grad-accum"),
    (["--adapt-start", "-1"], "--adapt-start -1"),
    (["--backbone", "vgg11"], "unknown backbone 'vgg11'"),
    (["--no-global-alignment", "--d-lr-mult", "5"], "--d-lr-mult has no effect with --no-global-alignment"),
    (["--no-category-alignment", "--stats-images", "4"], "--stats-images has no effect with --no-category"),
    (["--no-global", "--no-category", "--adapt-lr-mult", "2"], "--adapt-lr-mult has no effect"),
    (["--source-lr", "1e-3"], "need --adapt-start > 0"),  # QUICK adapts from the start
    (["--adapt-start", "2", "--source-momentum", "0.9"], "need --source-optimizer sgd"),  # quick: adam
    (["--weights", "x.pt"], "--weights is read by --eval-only")])
def test_bad_method_flags_are_user_errors(flags, message, tmp_path, monkeypatch):
    # raised before any data is read, so in-process (guard turns a UserError into one line, tested in common)
    monkeypatch.setattr(sys, "argv", [*QUICK, *flags, "--iters", "1", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(UserError, match=message):
        fw.main()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py")]
EXACT = """import sys
sys.path.insert(0, {root!r})
import torch
import torch.nn.functional as F
F.dropout = lambda x, *args, **kwargs: x  # see test_two_processes_equal_one_process_with_the_whole_batch
torch.set_default_dtype(torch.float64)
import fcn_wild
normalize = fcn_wild.normalize
fcn_wild.normalize = lambda images, mode: normalize(images, mode).double()
from common.cli import guard
guard(fcn_wild.main)
"""


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 gloo processes x batch 1 (under the collective guard: a host tensor in a collective fails the run) end with
    the front-end and D of 1 process x batch 2, through a source-phase SGD step and two GA + CA steps (the confusion
    ramp past 0); rank 0 alone logs; the run's final evaluation, sharded over the 2 ranks, scores as the one-process
    run's (the front-end has no BN statistics, so rank 0's network is every rank's).
    Every run goes through a wrapper script that replaces dropout by the identity and computes in float64. Dropout:
    each process draws the masks of its own half-batch, so the masks differ from one process's by construction.
    float64: in float32 the batched and unbatched convolutions round differently, and Adam turns that rounding into
    steps of up to its lr wherever a gradient is near 0. Nothing else depends on the per-process batch: no BN, every
    loss is a mean over equal-sized halves (the toy labels have no ignored pixels), the CA presence and projection
    are per image, each objective's gradients are averaged over the ranks (average_over_ranks)."""
    wrapper = tmp_path / "exact.py"
    wrapper.write_text(EXACT.format(root=ROOT))
    args = [*QUICK[1:], *CA, "--adapt-start", "1", "--source-optimizer", "sgd", "--source-lr", "1e-3", "--iters", "3",
            "--batch-size", "2", "--log-every", "1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_script(str(wrapper), *args, "--out", str(single), check=True)
    result = subprocess.run([*TORCHRUN, str(wrapper), *args, "--out", str(ddp)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(single), weights(ddp)
    # measured: 4.8e-16 (front-end), 7.1e-15 (D)
    for key in ("model", "disc"):
        for name, tensor in a[key].items():
            assert tensor.dtype == torch.float64 and torch.allclose(tensor, b[key][name], rtol=1e-9, atol=1e-11), \
                f"{key}.{name}"
    assert json.loads((ddp / "config.json").read_text())["args"]["world_size"] == 2
    assert [r["iter"] for r in train_rows(ddp)] == [1, 2, 3]  # rank 0 only
    assert json.loads((ddp / "results.json").read_text())["per_class_iou"] == \
        json.loads((single / "results.json").read_text())["per_class_iou"]
