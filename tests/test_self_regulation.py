"""self_regulation.py: the losses on hand-made tensors, the exits vanishing at inference, the update rule,
and smoke runs (run folder, resume, dry run, torchrun, one-line errors)."""
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sr = importlib.import_module("self_regulation")
from common.cli import field_docs  # noqa: E402

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
# smallest useful runs: 64x128 crops of the toy frames, batch 2, 2 val images
SMALL = ["--preset", "quick", "--crop-size", "64", "128", "--batch-size", "2", "--eval-limit", "2",
         "--num-workers", "0", "--num-predictions", "1", "--checkpoint-every", "2", "--log-every", "2"]


def run_script(*extra, check=True, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "self_regulation.py"), *SMALL, *extra]
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
    import dataclasses
    missing = [f.name for f in dataclasses.fields(sr.Args) if not f.metadata.get("runtime") and f.name not in docs]
    assert not missing


# ----------------------------------------------------------------------------------------------------
# smoke runs
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "straight"
    run_script("--iters", "4", "--sr-start-iter", "1", "--out", str(out))
    return out


def test_run_folder(straight_run):
    out = straight_run
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert os.listdir(out / "predictions")
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "self_regulation" and set(config["params"]) == {"model", "exits"}
    assert config["args"]["sr_start_iter"] == 1 and config["args"]["exit_channels"] == 64
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "seg_src" in r]
    assert losses and {"seg_src", "mea_seg", "mea_cls", "sr_l", "sr_f", "lr"} <= set(losses[-1])
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["miou"] <= 100 and results["iters"] == 4 and results["num_classes"] == 8


def test_checkpoint_holds_a_plain_deeplab_and_the_update_rule(straight_run):
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


def test_resume_is_exact(straight_run, tmp_path):
    out = tmp_path / "resumed"
    run_script("--iters", "2", "--poly-horizon", "4", "--sr-start-iter", "1", "--out", str(out))
    run_script("--iters", "4", "--sr-start-iter", "1", "--out", str(out), "--resume", "auto")
    a, b = load(straight_run / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt")
    assert b["iter"] == 4
    for part in ("model", "exits"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_eval_only_reads_the_plain_model(straight_run, tmp_path):
    out = tmp_path / "eval"
    run_script("--eval-only", "--weights", str(straight_run / "checkpoints" / "last.pt"), "--out", str(out))
    a = json.loads((straight_run / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["miou"] == pytest.approx(a["miou"])


def test_dry_run(tmp_path):
    out = tmp_path / "dry"
    run_script("--dry-run", "--sr-variant", "softened", "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["params"]["exits"]["trainable"] > 0
    assert config["args"]["sr_start_iter"] == sr.PRESETS["quick"]["iters"] // 3  # quick: -1 = a third of --iters
    assert not (out / "metrics.jsonl").exists()


def test_user_errors(tmp_path):
    bad = run_script("--sr-temperature", "0", "--dry-run", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    foreign = tmp_path / "foreign.pt"
    torch.save({"script": "source_only", "num_classes": 8, "model": {}}, foreign)
    refused = run_script("--eval-only", "--weights", str(foreign), "--out", str(tmp_path / "e"), check=False)
    assert refused.returncode == 2 and "source_only" in refused.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    run_script("--iters", "2", "--sr-start-iter", "1", "--sr-resolution", "half", "--sr-f-skip-ignored",
               "--out", str(out), launcher=["torchrun", "--standalone", "--nproc_per_node", "2"])
    assert json.loads((out / "results.json").read_text())["iters"] == 2
    assert load(out / "checkpoints" / "last.pt")["iter"] == 2
