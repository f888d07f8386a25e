"""fcn_wild.py: the front-end, the class-size statistics, the constrained projection and its loss, the
domain-confusion objectives and which parameters each optimiser may move; then the script end to end."""
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fcn_wild as fw
from common.cli import UserError, field_docs
from conftest import ROOT, run_script

QUICK = ["fcn_wild.py", "--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--log-every", "2",
         "--adapt-start", "0"]
CA = ["--stats-images", "16"]  # a flag of the category alignment: refused with --no-category-alignment
# the paper's two phases in small: 3 source-phase iterations by SGD (momentum), then GA + CA
PHASES = ["--adapt-start", "3", "--source-optimizer", "sgd", "--source-lr", "1e-3"]


def small_args(**overrides):
    """The quick preset's resolved Args, as the script's helpers see them."""
    return fw.Args(**{**fw.PRESETS["quick"], **overrides})


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


def test_init_from_torchvision_layout_and_own_checkpoint(tmp_path):
    ref = fw.VGG16FrontEnd("vgg16_small", num_classes=5)
    state = {k: v + 1 for k, v in ref.state_dict().items() if k.startswith("features.")}
    state["classifier.0.weight"] = torch.randn(512, 64 * 49)  # torchvision: Linear(512*7*7, 4096), here /8
    state["classifier.0.bias"] = torch.randn(512)
    state["classifier.3.weight"] = torch.randn(512, 512)
    state["classifier.3.bias"] = torch.randn(512)
    state["classifier.6.weight"] = torch.randn(1000, 512)  # ImageNet classes: dropped
    torch.save(state, tmp_path / "vgg.pth")
    model = fw.VGG16FrontEnd("vgg16_small", num_classes=5)
    fc8 = model.fc8.weight.clone()
    assert fw.load_init(model, str(tmp_path / "vgg.pth"), "vgg16_small") == "imagenet"
    assert torch.equal(model.fc6.weight, state["classifier.0.weight"].view(512, 64, 7, 7))
    assert torch.equal(model.fc7.weight[:, :, 0, 0], state["classifier.3.weight"])
    assert torch.equal(model.features[0].weight, state["features.0.weight"]) and torch.equal(model.fc8.weight, fc8)
    # a checkpoint of this script (the source-only front-end the paper adapts from) brings fc8 along
    torch.save({"script": "fcn_wild", "normalization": "caffe", "model": ref.state_dict()}, tmp_path / "own.pt")
    assert fw.load_init(model, str(tmp_path / "own.pt"), "vgg16_small") == "caffe"
    assert torch.equal(model.fc8.weight, ref.fc8.weight)
    torch.save({"script": "adaptsegnet", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="written by adaptsegnet"):
        fw.load_init(model, str(tmp_path / "other.pt"), "vgg16_small")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not fit"):
        fw.load_init(fw.VGG16FrontEnd("vgg16_small", 5), str(tmp_path / "bad.pt"), "vgg16_small")
    with pytest.raises(UserError, match="needs --backbone vgg16"):
        fw.load_init(model, "imagenet", "vgg16_small")


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
# end to end
def weights(out):
    return torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """5 iterations: 3 of the source phase (SGD with momentum), then 2 with GA + CA; reused by several tests."""
    out = tmp_path_factory.mktemp("fcn_wild") / "straight"
    run_script(*QUICK, *CA, *PHASES, "--iters", "5", "--out", str(out), check=True)
    return out


def test_quick_run_resume_and_eval_only(straight, tmp_path):
    config = json.loads((straight / "config.json").read_text())
    assert config["script"] == "fcn_wild" and set(config["params"]) == {"model", "disc"}
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "seg_src" in r]
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

    # 2 iterations, --resume auto to 4 (the SGD's momentum and the data stream resume inside the source phase),
    # then to 5 (the target stream and the Adams resume inside the adaptation): the straight run's weights
    resumed = tmp_path / "resumed"
    for iters in ("2", "4", "5"):
        run_script(*QUICK, *CA, *PHASES, "--iters", iters, "--poly-horizon", "5", "--resume", "auto", "--out",
                   str(resumed), check=True)
    a, b = ckpt, weights(resumed)
    assert b["iter"] == 5
    for key in ("model", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key

    evaluated = tmp_path / "eval"
    run_script(*QUICK, "--eval-only", "--weights", str(straight / "checkpoints" / "last.pt"), "--out",
               str(evaluated), check=True)
    assert json.loads((evaluated / "results.json").read_text())["miou"] == pytest.approx(results["miou"])


def test_source_phase_is_the_source_only_run_and_adaptation_starts_from_it(straight, tmp_path):
    source = tmp_path / "source"
    run_script(*QUICK, *PHASES, "--iters", "3", "--poly-horizon", "5", "--no-global", "--no-category", "--out",
               str(source), check=True)
    ckpt = weights(source)
    assert "disc" not in ckpt and "optimizer_ca" not in ckpt
    rows = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines() if "seg_src" in line]
    assert set(rows[0]) >= {"seg_src"} and "d_main" not in rows[0] and "ca" not in rows[0]
    # the method's source phase is exactly this run (building D and the statistics leaves the RNG alone), and
    # the run keeps its front-end as checkpoints/source_phase.pt
    phase = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()][0]
    assert phase["iter"] == 2 and phase["seg_src"] == rows[0]["seg_src"]
    front_end = torch.load(straight / "checkpoints" / "source_phase.pt", weights_only=True)
    assert front_end["iter"] == 3 and set(front_end) >= {"script", "num_classes", "normalization", "model"}
    assert all(torch.equal(front_end["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    adapted = tmp_path / "adapted"
    result = run_script(*QUICK, "--iters", "1", "--no-category", "--init", str(straight / "checkpoints" /
                        "source_phase.pt"), "--out", str(adapted), check=True)
    assert "loaded fc8" in result.stdout
    rows = [json.loads(line) for line in (adapted / "metrics.jsonl").read_text().splitlines() if "seg_src" in line]
    assert "adv_main" in rows[0] and "ca" not in rows[0]
    # resuming a run with another method configuration is refused in one line
    bad = run_script(*QUICK, "--iters", "4", "--resume", str(source / "checkpoints" / "last.pt"), "--out",
                     str(tmp_path / "x"))
    assert bad.returncode == 2 and "has no 'disc'" in bad.stderr and "Traceback" not in bad.stderr


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


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, *QUICK, "--iters", "2", "--batch-size", "2", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["args"]["world_size"] == 2
    assert json.loads((out / "results.json").read_text())["iters"] == 2
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if "seg_src" in l]) == 1  # rank 0 only
