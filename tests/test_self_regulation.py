"""self_regulation.py: the losses on hand-made tensors, the exits vanishing at inference, the training step
against an independent reference (warm-up, MEA, SR-L, SR-F), the paper preset (source_only's recipe plus SR-SS's
defaults), flags that cannot act, the DeepLab Caffe init file (SR-SS's `Scale.` layout), and runs (run folder,
resume, eval-only, dry run, torchrun under the collective guard)."""
import copy
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sr = importlib.import_module("self_regulation")
import released  # noqa: E402
from common.cli import UserError, field_docs, parse_args  # noqa: E402
from common.runtime import Runtime  # noqa: E402

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
# smallest useful runs: 64x128 crops of the toy frames, batch 2, 2 val images
SMALL = ["--preset", "quick", "--crop-size", "64", "128", "--batch-size", "2", "--eval-limit", "2",
         "--num-workers", "0", "--num-predictions", "1", "--checkpoint-every", "2", "--log-every", "2"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py")]


def run_script(*extra, check=True, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "self_regulation.py"), *SMALL, *map(str, extra)]
    # one thread per process: on the shared 2-core machine, 2 threads per process oversubscribe the cores
    # and ran about 5x slower; an OMP_NUM_THREADS set by the caller wins
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# losses on hand-made tensors
def test_present_classes():
    labels = torch.tensor([[[0, 2], [255, 2]], [[1, 1], [1, 255]]])
    assert torch.equal(sr.present_classes(labels, 3), torch.tensor([[1., 0., 1.], [0., 1., 0.]]))


def test_mea_seg_losses_mean_over_valid_pixels():
    # 3 pixels, 2 classes: logits (0, 0) label 1 -> ln 2; (ln 3, 0) label 0 -> ln 4/3; third pixel ignored
    logits = torch.tensor([[[[0.0, LN3, 5.0]], [[0.0, 0.0, -5.0]]]])
    labels = torch.tensor([[[1, 0, 255]]])
    main, other = sr.mea_seg_losses([logits, torch.zeros_like(logits)], labels)
    assert main.item() == pytest.approx((LN2 + math.log(4 / 3)) / 2, abs=1e-6)
    assert other.item() == pytest.approx(LN2, abs=1e-6)


def test_mea_cls_loss():
    # classes present {0}; logits (0, ln 3): -log sigmoid(0) = ln 2, -log(1 - sigmoid(ln 3)) = ln 4
    labels = torch.tensor([[[0, 0], [255, 0]]])
    cls = [torch.tensor([[0.0, LN3]]), torch.zeros(1, 2)]
    expected = (LN2 + LN4) / 2 + LN2
    assert sr.mea_cls_loss(cls, labels, 2).item() == pytest.approx(expected, abs=1e-6)


def test_sr_l_official_targets_the_detached_main_probabilities():
    teacher = torch.tensor([[LN3]], requires_grad=True)  # p = 0.75
    students = [torch.tensor([[0.0]], requires_grad=True), torch.tensor([[LN3]], requires_grad=True)]
    loss = sr.sr_l_loss([teacher, *students])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert loss.item() == pytest.approx(LN2 + entropy, abs=1e-6)  # BCE(0.5; 0.75) = ln 2, BCE(0.75; 0.75) = H
    loss.backward()
    assert teacher.grad is None  # the main exit is the teacher, not taught
    assert students[0].grad.item() == pytest.approx(0.5 - 0.75)  # d BCE / d logit = sigmoid(s) - p
    assert students[1].grad.item() == pytest.approx(0.0, abs=1e-7)


def test_sr_l_softened():
    teacher, student = torch.tensor([[LN3]]), torch.tensor([[0.0]], requires_grad=True)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(Bern(0.75) || Bern(0.5))
    loss = sr.sr_l_loss([teacher, student], "softened", 1.0)
    assert loss.item() == pytest.approx(kl, abs=1e-6)
    loss.backward()
    assert student.grad.item() == pytest.approx(0.5 - 0.75)  # tau = 1: the official SR-L's gradient
    p, q = 1 / (1 + 3 ** -0.5), 0.5  # tau = 2: sigmoid(ln 3 / 2)
    kl2 = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert sr.sr_l_loss([teacher, student.detach()], "softened", 2.0).item() == pytest.approx(4 * kl2, abs=1e-6)


def sr_f_maps():
    """5 maps of 1x2x1x2: exit 1 (the teacher) predicts class 0 then class 1; the main output is (ln 3, 0)
    at both pixels; exits 2-4 are uniform."""
    teacher = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]], requires_grad=True)
    main = torch.tensor([[[[LN3, LN3]], [[0.0, 0.0]]]], requires_grad=True)
    return [main, teacher] + [torch.zeros(1, 2, 1, 2) for _ in range(3)]


def test_sr_f_official_hard_labels_from_the_shallowest_exit():
    maps = sr_f_maps()
    loss = sr.sr_f_loss(maps)
    # main: CE at pixel 0 (target 0) = ln 4/3, at pixel 1 (target 1) = ln 4; uniform exits: ln 2 each
    assert loss.item() == pytest.approx((math.log(4 / 3) + LN4) / 2 + 3 * LN2, abs=1e-6)
    loss.backward()
    assert maps[1].grad is None and maps[0].grad is not None
    masked = sr.sr_f_loss(sr_f_maps(), valid=torch.tensor([[[True, False]]]))
    assert masked.item() == pytest.approx(math.log(4 / 3) + 3 * LN2, abs=1e-6)


def test_sr_f_softened():
    maps = sr_f_maps()
    p = torch.softmax(maps[1].detach(), 1)  # teacher distributions per pixel
    q_main = torch.tensor([0.75, 0.25])
    expected = 0.0
    for pixel in range(2):
        t = p[0, :, 0, pixel]
        expected += float((t * (t / q_main).log()).sum()) + 3 * float((t * (t / 0.5).log()).sum())
    assert sr.sr_f_loss(maps, "softened", 1.0).item() == pytest.approx(expected / 2, abs=1e-5)
    same = [maps[1].detach()] * 5  # a student equal to the teacher has zero KL at any tau
    assert sr.sr_f_loss(same, "softened", 3.0).item() == pytest.approx(0.0, abs=1e-6)
    # tau = 2, main output equal to the teacher (KL 0), exits 2-4 uniform: tau^2 * 3 * mean KL(p_tau || uniform)
    p2 = torch.softmax(maps[1].detach() / 2, 1)[0, :, 0, :]
    kl_uniform = float((p2 * (p2 / 0.5).log()).sum(0).mean())
    students = [maps[1].detach(), maps[1].detach()] + [torch.zeros(1, 2, 1, 2)] * 3
    assert sr.sr_f_loss(students, "softened", 2.0).item() == pytest.approx(4 * 3 * kl_uniform, abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# architecture: exits only at training time
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_multi_exit_shapes_and_plain_main_output(backbone):
    torch.manual_seed(0)
    model, heads = sr.DeepLabV2(backbone, 5), sr.ExitHeads(backbone, 5, width=16)
    net = sr.MultiExit(model, heads)
    x = torch.randn(2, 3, 32, 48)
    for train in (True, False):
        net.train(train)
        aux, segs, cls = net(x)
        with torch.no_grad():
            plain = model(x)[1]
        assert aux is None and len(segs) == 5 and len(cls) == 5
        assert torch.equal(segs[0].detach(), plain)  # the main output is the plain DeepLabV2's
    assert [s.shape[-2:] for s in segs] == [(5, 7), (16, 24), (9, 13), (5, 7), (5, 7)]  # ceil-mode max-pool
    assert all(s.shape[:2] == (2, 5) for s in segs) and all(c.shape == (2, 5) for c in cls)
    # the plain DeepLabV2 built from the model's state dict alone gives the same output
    fresh = sr.DeepLabV2(backbone, 5)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x)[1], net(x)[1][0])
    assert not any(k.startswith("heads") for k in model.state_dict())


def test_every_field_has_help():
    docs = field_docs(sr.Args)
    missing = [f.name for f in dataclasses.fields(sr.Args) if not f.metadata.get("runtime") and f.name not in docs]
    assert not missing


# ----------------------------------------------------------------------------------------------------
# the update rule
def reference_step(net, state, images, labels, it, args, lr):
    """trainval.py's loss written out by hand on a MultiExit copy, then SGD (momentum 0.9, wd 5e-4; ASPP heads 10x,
    exits args.exit_lr_mult): w_cls * sum_k BCE(cls_k, classes present) + w_seg * sum_k CE(up(seg_k), y) (255
    ignored) + w_aux * CE(up(aux), y), and from iteration args.sr_start_iter on w_l * SR-L + w_f * SR-F with
    detached teachers: official, SR-L = sum_{k>=1} BCE(cls_k, sigmoid(cls_0)), SR-F = sum_{k in 0,2,3,4} CE(up(seg_k),
    argmax up(seg_1)) over all pixels; softened, tau^2 * KL of tau-softened Bernoulli / per-pixel softmax
    distributions (at half resolution and over the non-255 pixels, as the flags of that case ask)."""
    wd, momentum, tau = 5e-4, 0.9, args.sr_temperature
    aux, segs, cls = net(images)
    batch, num_classes = segs[0].shape[:2]

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def ce(logits, target, mask):  # mean over the pixels of mask
        nll = -logits.log_softmax(1).gather(1, target.clamp(max=num_classes - 1)[:, None])[:, 0]
        return nll[mask].mean()

    def bce(logits, target):  # BCE of sigmoid(logits) against target, by hand
        return (F.softplus(logits) - logits * target).mean()

    valid = labels != 255
    present = torch.zeros(batch, num_classes)
    for b in range(batch):
        for c in labels[b].unique().tolist():
            if c != 255:
                present[b, c] = 1.0
    maps = [up(s, labels.shape[-2:]) for s in segs]
    loss = (args.lambda_mea_cls * sum(bce(c, present) for c in cls)
            + args.lambda_mea_seg * sum(ce(m, labels, valid) for m in maps)
            + args.lambda_seg_aux * ce(up(aux, labels.shape[-2:]), labels, valid))
    if it >= args.sr_start_iter:
        if args.sr_variant == "official":
            sr_l = sum(bce(c, torch.sigmoid(cls[0]).detach()) for c in cls[1:])
            teacher = maps[1].detach().argmax(1)
            sr_f = sum(ce(maps[k], teacher, torch.ones_like(valid)) for k in (0, 2, 3, 4))
        else:
            def bern_kl(t, s):
                p, q = torch.sigmoid(t / tau), torch.sigmoid(s / tau)
                return (p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())).mean()
            sr_l = tau ** 2 * sum(bern_kl(cls[0].detach(), c) for c in cls[1:])
            half = (labels.shape[-2] // 2, labels.shape[-1] // 2)
            small = [up(s, half) for s in segs]
            mask = up(valid[:, None].float(), half)[:, 0] > 0.5
            p = (small[1].detach() / tau).softmax(1)
            sr_f = tau ** 2 * sum((p * (p.log() - (small[k] / tau).log_softmax(1))).sum(1)[mask].mean()
                                  for k in (0, 2, 3, 4))
        loss = loss + args.lambda_sr_l * sr_l + args.lambda_sr_f * sr_f
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params])
    with torch.no_grad():
        for (name, p), g in zip(params, grads):
            mult = args.exit_lr_mult if name.startswith("heads.") else 10 if "head" in name else 1
            d = g + wd * p
            state[name] = d if name not in state else momentum * state[name] + d
            p -= lr * mult * state[name]


@pytest.mark.parametrize("variant", ["official", "softened"])
def test_train_step_matches_an_independent_reference(variant):
    """main()'s step on a tiny multi-level resnet18 with 8-wide exits, against reference_step: one iteration in the
    MEA-only warm-up (it 0) and one with SR (it 1, --sr-start-iter 1), each from the same weights (one step each: a
    second one would amplify float rounding through ReLU and argmax flips); every tensor of the DeepLab-v2 and of
    the exits, BN statistics included. Distinct weights, so that swapping two moves the result; the softened case
    runs the half-resolution, non-255 SR-F path with a teacher whose gradient would not vanish under argmax."""
    torch.manual_seed(0)
    model, heads = sr.DeepLabV2("resnet18", 4, multi_level=True), sr.ExitHeads("resnet18", 4, width=8)
    extra = dict(sr_variant="softened", sr_temperature=2.0, sr_resolution="half", sr_f_skip_ignored=True) \
        if variant == "softened" else {}
    args = sr.Args(lambda_mea_cls=0.2, lambda_mea_seg=0.8, lambda_sr_l=1.0, lambda_sr_f=0.5, lambda_seg_aux=0.3,
                   sr_start_iter=1, exit_lr_mult=2.0, **extra)
    images, labels = torch.randn(2, 3, 32, 64), torch.randint(0, 4, (2, 32, 64))
    labels[0] = torch.randint(1, 4, (32, 64))  # class 0 absent from image 0: 255 must not count as it
    labels[0, :6] = 255
    lr, rt = 0.01, Runtime("cpu", amp=False)
    for it in (0, 1):
        net = sr.MultiExit(copy.deepcopy(model), copy.deepcopy(heads))
        reference = copy.deepcopy(net)
        exit_group = {"params": list(net.heads.parameters()), "lr": lr * 2.0, "lr_mult": 2.0}  # as main() builds it
        optimizer = torch.optim.SGD(net.model.param_groups(lr, 10) + [exit_group], lr=lr, momentum=0.9,
                                    weight_decay=5e-4)
        losses = sr.train_step(net, optimizer, rt, images, labels, it, args)
        reference_step(reference, {}, images, labels, it, args, lr)
        assert set(losses) == {"seg_src", "mea_seg", "mea_cls", "seg_aux", "sr_l", "sr_f"}
        ours, theirs = net.state_dict(), reference.state_dict()
        assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-7, rtol=1e-6) for k in ours), it
    assert not torch.equal(ours["heads.exits.0.body.1.weight"], torch.ones(8))  # exit BN affine trains


# ----------------------------------------------------------------------------------------------------
# recipe, flags, init file
def parsed(*argv):
    args = parse_args(sr.Args, sr.PRESETS, list(argv))
    sr.check_method_flags(args)
    return args


# --preset paper is no published UDA recipe: source_only.py's GTA5 recipe (every field it shares with source_only's
# Args, checked against it) plus SR-SS's defaults (dongzhang89/SR-SS 90a8e86):
SR_SS = dict(
    lambda_mea_cls=0.2, lambda_mea_seg=0.8,  # trainval.py Lambda1, Lambda2 (:21-22)
    lambda_sr_l=1.0, lambda_sr_f=1.0,  # trainval.py Lambda3 for both SR terms (:23, :159)
    sr_start_iter=10000,  # README, Train: "first train ... 10000 iterations using only MEA loss"
    sr_variant="official",  # hard argmax / sigmoid targets (trainval.py:153-157)
    sr_f_skip_ignored=False, sr_resolution="full",  # SR-F over every pixel of the upsampled maps (:155-157)
    exit_channels=256,  # lib/models/deeplab.py ClassLayer: 3x3 convs to 256 (:15-18)
    exit_lr_mult=1.0,  # trainval.py: only the ASPP `conv2d_list` at 10x lr (:84-93)
    aspp_branches=4,  # lib/models/resnet.py Classifier_Module sums every branch (no early return)
    multi_level=False,  # one ASPP head on the last layer (resnet.py layer5)
)


def test_paper_preset_is_source_only_plus_the_sr_ss_defaults():
    so = importlib.import_module("source_only")
    paper, baseline = parsed(), parse_args(so.Args, so.PRESETS, [])
    shared = [f.name for f in dataclasses.fields(so.Args) if not f.metadata.get("runtime")]
    assert {k: getattr(paper, k) for k in shared} == {k: getattr(baseline, k) for k in shared}
    assert {k: getattr(paper, k) for k in SR_SS} == SR_SS
    assert "no UDA" in field_docs(sr.Args)["preset"]  # the help says so
    quick = dict(sr.PRESETS["quick"])
    assert {k: quick.pop(k) for k in ("sr_start_iter", "exit_channels")} == {"sr_start_iter": -1, "exit_channels": 64}
    assert quick == so.PRESETS["quick"]


def test_flags_that_cannot_act_are_refused():
    def refusal(*argv):
        with pytest.raises(UserError) as e:
            parsed(*argv)
        return str(e.value)
    assert "--sr-temperature: no effect with --sr-variant official" in refusal("--sr-temperature", "2")
    assert "--sr-start-iter 10000 >= --iters 5000" in refusal("--iters", "5000")
    assert "--sr-temperature > 0" in refusal("--sr-variant", "softened", "--sr-temperature", "0")
    assert "--lambda-seg-aux: no effect without --multi-level" in refusal("--lambda-seg-aux", "0.2")
    assert "--sr-resolution: no effect with --lambda-sr-f 0" in refusal("--lambda-sr-f", "0", "--sr-resolution", "half")
    assert "--sr-variant: no effect with --lambda-sr-l 0 --lambda-sr-f 0" in refusal(
        "--lambda-sr-l", "0", "--lambda-sr-f", "0", "--sr-variant", "softened")
    # what acts is accepted: the softened temperature, MEA only by its weights, anything with --eval-only
    assert parsed("--sr-variant", "softened", "--sr-temperature", "2").sr_temperature == 2.0
    assert parsed("--iters", "5000", "--lambda-sr-l", "0", "--lambda-sr-f", "0").iters == 5000
    assert parsed("--multi-level", "--lambda-seg-aux", "0.2").lambda_seg_aux == 0.2
    assert parsed("--eval-only", "--sr-temperature", "2", "--iters", "1").eval_only
    assert parsed("--preset", "quick").sr_start_iter == 400 // 3
    proc = run_script("--lambda-seg-aux", "0.2", "--out", "unused", check=False)  # one line, before any data
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --lambda-seg-aux")


def test_caffe_init_file_loads_into_the_backbone(tmp_path):
    """SR-SS's init (`data/DeepLab_resnet_pretrained.pth`: every key under `Scale.`, with a 21-class COCO layer5)
    through --init: the backbone loads completely, the COCO classifier is dropped, Caffe input and the stride on the
    1x1 follow; the ASPP head and the exits stay at their random init. A file of another layout is one error."""
    reference = sr.DeepLabV2("resnet50", 19)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "DeepLab_resnet_pretrained.pth"
    torch.save(released.caffe_init(reference.state_dict()), path)
    args = parsed("--init", str(path))
    found = sr.prepare_weights(args, None, sr.SCRIPT, 19)
    assert found["kind"] == "DeepLab-v2 Caffe init file (backbone)"
    assert (args.normalization, args.stride_on, args.backbone) == ("caffe", "1x1", "resnet50")
    model = sr.DeepLabV2(args.backbone, 19, stride_on=args.stride_on)
    head = model.head.convs[0].weight.clone()
    assert sr.load_init(model, args.init, args.backbone, found) == "caffe"
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if "head" not in k and "batches" not in k)
    assert torch.equal(model.head.convs[0].weight, head)
    torch.save({"model": {"Scale.conv1.weight": torch.zeros(1), "classlayer1.fc.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match="unrecognised layout"):  # an SR-SS training checkpoint: not a DeepLab-v2 file
        sr.prepare_weights(parsed("--init", str(path)), None, sr.SCRIPT, 19)
    torch.save({"script": "source_only", "num_classes": 8, "model": {}}, path)
    with pytest.raises(UserError, match="written by source_only, not self_regulation"):
        sr.prepare_weights(parsed("--eval-only", "--weights", str(path)), None, sr.SCRIPT, 8)


# ----------------------------------------------------------------------------------------------------
# runs
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "straight"
    run_script("--iters", "4", "--sr-start-iter", "1", "--out", str(out))
    return out


def test_run_folder(straight_run):
    out = straight_run
    assert os.listdir(out / "predictions")
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "self_regulation" and set(config["params"]) == {"model", "exits"}
    assert config["args"]["sr_start_iter"] == 1 and config["args"]["exit_channels"] == 64
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "seg_src" in r]
    assert losses and {"seg_src", "mea_seg", "mea_cls", "sr_l", "sr_f", "lr"} <= set(losses[-1])
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["miou"] <= 100 and results["iters"] == 4 and results["num_classes"] == 8


def test_checkpoint_holds_a_plain_deeplab_and_the_exits(straight_run):
    ckpt = load(straight_run / "checkpoints" / "last.pt")
    plain = sr.DeepLabV2("resnet18", 8).state_dict()
    assert ckpt["script"] == "self_regulation" and list(ckpt["model"]) == list(plain)
    assert list(ckpt["exits"]) == list(sr.ExitHeads("resnet18", 8, 64).state_dict())
    # --init none: the frozen backbone BN affine stays at (1, 0); the exit BNs are trained
    assert torch.equal(ckpt["model"]["bn1.weight"], torch.ones(64))
    assert torch.equal(ckpt["model"]["layer3.0.bn2.bias"], torch.zeros(256))
    assert not torch.equal(ckpt["exits"]["exits.0.body.1.weight"], torch.ones(64))
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0, 1.0]  # backbone, ASPP head, exits
    assert len(groups[2]["params"]) == len(list(sr.ExitHeads("resnet18", 8, 64).parameters()))


def test_resume_continues_where_it_stopped(straight_run, tmp_path):
    """Interrupted at 2 of a 4-iteration schedule, resumed: it says where it starts, logs only later iterations and
    ends with the uninterrupted weights (DeepLab-v2 and exits); a silent restart would fail the first two checks."""
    out = tmp_path / "resumed"
    run_script("--iters", "2", "--poly-horizon", "4", "--sr-start-iter", "1", "--out", str(out))
    rows_before = len((out / "metrics.jsonl").read_text().splitlines())
    resumed = run_script("--iters", "4", "--sr-start-iter", "1", "--out", str(out), "--resume", "auto")
    assert "at iteration 2" in resumed.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[rows_before:]]
    assert rows and min(r["iter"] for r in rows if "seg_src" in r) > 2
    a, b = load(straight_run / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt")
    assert b["iter"] == 4
    for part in ("model", "exits"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_eval_only_reads_the_plain_model(straight_run, tmp_path):
    out, preds = tmp_path / "eval", tmp_path / "preds"
    run_script("--eval-only", "--weights", straight_run / "checkpoints" / "last.pt", "--out", out,
               "--save-predictions", preds)
    a = json.loads((straight_run / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["miou"] == pytest.approx(a["miou"]) and b["loaded"]["kind"] == "self_regulation checkpoint"
    assert len(os.listdir(preds)) == 2  # one PNG per scored val image


def test_dry_run_from_the_init_file(tmp_path):
    """--init FILE recorded (config.json `loaded`), its normalisation and backbone applied; no data read."""
    path = tmp_path / "init.pth"
    torch.save(released.caffe_init(sr.DeepLabV2("resnet50", 8).state_dict()), path)
    out = tmp_path / "dry"
    proc = run_script("--dry-run", "--sr-variant", "softened", "--init", path, "--out", out)
    assert "recognised DeepLab-v2 Caffe init file (backbone): caffe input, stride on 1x1" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["params"]["exits"]["trainable"] > 0 and config["args"]["backbone"] == "resnet50"
    assert config["loaded"]["kind"] == "DeepLab-v2 Caffe init file (backbone)" and config["normalization"] == "caffe"
    assert config["args"]["sr_start_iter"] == sr.PRESETS["quick"]["iters"] // 3  # quick: -1 = a third of --iters
    assert not (out / "metrics.jsonl").exists()


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 gloo processes x batch 1 end with the weights of 1 process x batch 2, DeepLab-v2 and exits (--bn-mode eval:
    running statistics in the backbone and the exits, since per-process batch statistics differ by construction);
    SR active in the second iteration; rank 0 alone logs."""
    args = ["--iters", "2", "--sr-start-iter", "1", "--bn-mode", "eval", "--num-predictions", "0", "--log-every", "1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_script(*args, "--out", single)
    run_script(*args, "--out", ddp, launcher=TORCHRUN)
    a, b = load(single / "checkpoints" / "last.pt"), load(ddp / "checkpoints" / "last.pt")
    for part in ("model", "exits"):
        assert all(torch.allclose(a[part][k].float(), b[part][k].float(), rtol=1e-4, atol=1e-6) for k in a[part]), part
    assert json.loads((ddp / "config.json").read_text())["args"]["world_size"] == 2
    assert len([line for line in (ddp / "metrics.jsonl").read_text().splitlines() if "seg_src" in line]) == 2


def test_sharded_evaluation_scores_the_checkpointed_network(tmp_path):
    """Train-mode BN, SR-F at half resolution over non-255 pixels: the final evaluation of a torchrun run, sharded
    over 2 ranks, scores what rank 0 checkpoints: equal --eval-only of it in one process. lr 0.02 moves the network
    off its first, constant prediction within 2 iterations (at the preset's lr it predicts one class everywhere,
    and ranks with different BN statistics would still score alike)."""
    ddp, again = tmp_path / "ddp", tmp_path / "again"
    run_script("--iters", "2", "--lr", "0.02", "--sr-start-iter", "1", "--sr-resolution", "half",
               "--sr-f-skip-ignored", "--num-predictions", "0", "--out", ddp, launcher=TORCHRUN)
    run_script("--eval-only", "--weights", ddp / "checkpoints" / "last.pt", "--out", again)
    assert json.loads((ddp / "results.json").read_text())["per_class_iou"] == \
        json.loads((again / "results.json").read_text())["per_class_iou"]
