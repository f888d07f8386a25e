"""adaptsegnet.py: adversarial losses on hand-made tensors, which parameters each step may change, and smoke
runs of the script (quick preset on the toy domains at 64x128, 2-4 iterations, 2 eval images)."""
import dataclasses
import importlib
import inspect
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
asn = importlib.import_module("adaptsegnet")
from common.cli import field_docs  # noqa: E402
TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "64", "128", "--target-size", "64", "128", "--eval-size", "64", "128",
        "--num-predictions", "1"]


def run(*args, cmd=None, check=True):
    cmd = cmd or [sys.executable, "adaptsegnet.py"]
    proc = subprocess.run([*cmd, *TINY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- units
def test_discriminator_shape_and_names():
    disc = asn.FCDiscriminator(8, ndf=4)
    out = disc(torch.rand(2, 8, 64, 128))
    assert out.shape == (2, 1, 2, 4)  # 1/32 of the input, one logit per cell
    assert [n for n, _ in disc.named_parameters()] == [f"{m}.{p}" for m in ("conv1", "conv2", "conv3", "conv4",
                                                                             "classifier") for p in ("weight", "bias")]
    assert disc.conv4.out_channels == 32 and disc.classifier.kernel_size == (4, 4)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Sigmoid)) for m in disc.modules())


def test_gan_loss_values():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    # BCE with logits: label 0 -> log(1 + e^x), label 1 -> log(1 + e^-x)
    want0 = sum(math.log1p(math.exp(x)) for x in (0.0, 2.0, -1.0, 3.0)) / 4
    want1 = sum(math.log1p(math.exp(-x)) for x in (0.0, 2.0, -1.0, 3.0)) / 4
    assert asn.gan_loss(logits, 0.0).item() == pytest.approx(want0, rel=1e-6)
    assert asn.gan_loss(logits, 1.0).item() == pytest.approx(want1, rel=1e-6)
    # least squares: mean (x - label)^2
    assert asn.gan_loss(logits, 1.0, "ls").item() == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert asn.gan_loss(logits.half(), 0.0).dtype == torch.float32


def test_domain_labels_in_d_loss_and_generator_term():
    assert (asn.SOURCE_LABEL, asn.TARGET_LABEL) == (0.0, 1.0)
    identity = torch.nn.Identity()  # "D" whose logits are its input: the labels are read off the values
    source, target = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)
    want_d = 0.5 * (math.log1p(math.exp(2.0)) + math.log1p(math.exp(1.0)))  # BCE(2, 0) and BCE(-1, 1)
    assert asn.discriminator_loss(identity, source, target).item() == pytest.approx(want_d, rel=1e-6)
    assert asn.generator_loss(identity, target).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    # a D that is right (source very negative, target very positive) has ~0 loss and fools no one
    assert asn.discriminator_loss(identity, -20 * torch.ones(1, 1, 2, 2), 20 * torch.ones(1, 1, 2, 2)) < 1e-6
    assert asn.generator_loss(identity, 20 * torch.ones(1, 1, 2, 2)) > 19
    # the D loss never sends gradient into the segmenter's maps
    src = torch.zeros(1, 1, 2, 2, requires_grad=True)
    assert not asn.discriminator_loss(identity, src, src * 2).requires_grad


def test_softmax_at():
    logits = torch.randn(2, 5, 4, 8, dtype=torch.bfloat16)
    prob = asn.softmax_at(logits, (16, 32))
    assert prob.shape == (2, 5, 16, 32) and prob.dtype == torch.float32
    assert torch.allclose(prob.sum(1), torch.ones(2, 16, 32))
    want = F.interpolate(logits.float(), size=(16, 32), mode="bilinear", align_corners=True).softmax(1)
    assert torch.equal(prob, want)


def small_setup(multi_level=True):
    torch.manual_seed(0)
    model = asn.DeepLabV2("resnet18", 8, multi_level)
    discs = {level: asn.FCDiscriminator(8, ndf=8) for level in (("aux", "main") if multi_level else ("main",))}
    opt = torch.optim.SGD(model.param_groups(0.1, 10.0), lr=0.1, momentum=0.9, weight_decay=5e-4)
    d_opts = {k: torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.9, 0.99)) for k, d in discs.items()}
    return model, discs, opt, d_opts


def snapshot(*nets):
    return [p.detach().clone() for net in nets for p in net.parameters()]


def changed(before, nets):
    after = [p for net in nets for p in net.parameters()]
    return [not torch.equal(a, b) for a, b in zip(before, after)]


def maps(model, x):
    return dict(zip(("aux", "main"), (asn.softmax_at(o, x.shape[-2:]) for o in model(x))))


def test_adversarial_step_leaves_discriminators_untouched():
    model, discs, opt, d_opts = small_setup()
    d_before, m_before = snapshot(*discs.values()), snapshot(model)
    target_maps = maps(model, torch.randn(1, 3, 64, 64))
    asn.set_requires_grad(discs.values(), False)
    loss = sum(w * asn.generator_loss(discs[k], target_maps[k]) for k, w in (("aux", 2e-4), ("main", 1e-3)))
    loss.backward()
    asn.set_requires_grad(discs.values(), True)
    assert all(p.grad is None for d in discs.values() for p in d.parameters())
    for o in (opt, *d_opts.values()):  # the script steps every optimiser
        o.step()
    assert not any(changed(d_before, discs.values()))
    assert any(changed(m_before, [model]))


def test_discriminator_step_leaves_segmenter_untouched():
    model, discs, opt, d_opts = small_setup()
    source_maps, target_maps = maps(model, torch.randn(1, 3, 64, 64)), maps(model, torch.randn(1, 3, 64, 64))
    d_before, m_before = snapshot(*discs.values()), snapshot(model)
    sum(asn.discriminator_loss(discs[k], source_maps[k], target_maps[k]) for k in discs).backward()
    assert all(p.grad is None for p in model.parameters())
    for o in (opt, *d_opts.values()):
        o.step()
    assert not any(changed(m_before, [model]))
    assert all(changed(d_before, discs.values()))


def test_quick_preset_is_source_only_plus_lambdas():
    so = importlib.import_module("source_only")
    quick = dict(asn.PRESETS["quick"])
    method = {k: quick.pop(k) for k in ("lambda_adv_main", "lambda_adv_aux")}
    assert quick == so.PRESETS["quick"]  # same toy benchmark budget as the baseline it is compared with
    assert method == {"lambda_adv_main": 0.01, "lambda_adv_aux": 0.002}  # 10x the paper's (header)
    paper = asn.parse_args(asn.Args, asn.PRESETS, [])
    assert (paper.lambda_adv_main, paper.lambda_adv_aux, paper.multi_level) == (0.001, 0.0002, True)


def test_every_field_has_help():
    docs = field_docs(asn.Args)
    for f in dataclasses.fields(asn.Args):
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f"{f.name} has no docstring"


def test_shared_blocks_identical_to_source_only():
    so = importlib.import_module("source_only")
    for name in ("BasicBlock", "Bottleneck", "ASPP", "DeepLabV2", "load_init", "seg_loss", "poly_lr", "set_lr"):
        assert inspect.getsource(getattr(so, name)) == inspect.getsource(getattr(asn, name)), name


# ---------------------------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("asn") / "straight")
    run("--iters", 4, "--out", out)
    return out


def test_smoke_run_folder(straight):
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(straight, name)), name
    assert os.listdir(os.path.join(straight, "predictions"))
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["script"] == "adaptsegnet" and set(config["params"]) == {"model", "disc_aux", "disc_main"}
    rows = [r for r in metrics(straight) if "seg_src" in r]
    assert {"seg_src", "seg_aux", "adv_aux", "adv_main", "d_aux", "d_main", "lr"} <= set(rows[-1])
    results = json.load(open(os.path.join(straight, "results.json")))
    assert 0 <= results["miou"] <= 100 and results["iters"] == 4
    ckpt = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    assert {"disc_aux", "disc_main", "optimizer_d_aux", "optimizer_d_main"} <= set(ckpt)


def test_resume_is_exact(straight, tmp_path):
    out = str(tmp_path / "resumed")
    run("--iters", 2, "--poly-horizon", 4, "--out", out)  # interrupted at 2 of a 4-iteration schedule
    run("--iters", 4, "--out", out, "--resume", "auto")
    a = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert b["iter"] == 4
    for key in ("model", "disc_aux", "disc_main"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    assert torch.equal(a["optimizer_d_main"]["state"][0]["exp_avg"], b["optimizer_d_main"]["state"][0]["exp_avg"])


def test_single_level_least_squares(tmp_path):
    out = str(tmp_path / "single")
    run("--iters", 1, "--single-level", "--gan", "ls", "--out", out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["args"]["multi_level"] is False and set(config["params"]) == {"model", "disc_main"}
    keys = set(metrics(out)[0])
    assert {"seg_src", "adv_main", "d_main"} <= keys and not keys & {"seg_aux", "adv_aux", "d_aux"}


def test_dry_run(tmp_path):
    out = str(tmp_path / "dry")
    run("--dry-run", "--out", out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["params"]["disc_main"]["trainable"] == sum(
        p.numel() for p in asn.FCDiscriminator(8).parameters())
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "adaptsegnet.py"]
    run("--iters", 2, "--out", out, cmd=cmd)
    assert json.load(open(os.path.join(out, "config.json")))["args"]["world_size"] == 2
    assert os.path.isfile(os.path.join(out, "results.json"))
