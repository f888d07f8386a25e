"""bdl.py: losses on hand-made tensors, the pseudo-label threshold rule against a direct computation, which
parameters each update may change, and smoke runs of the whole stage loop (toy domains at 32x64, 1-2 iterations
per stage, 4 source/target train images, 2 eval images)."""
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
bdl = importlib.import_module("bdl")
from common.cli import field_docs  # noqa: E402
from common.runtime import Runtime  # noqa: E402
from common.data import domain_split  # noqa: E402

TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "32", "64", "--target-size", "32", "64", "--eval-size", "32", "64", "--num-predictions", "1",
        "--source-limit", "4", "--target-limit", "4", "--cyclegan-crop", "32", "32", "--cyclegan-iters", "1",
        "--iters", "1", "--ssl-rounds", "1", "--ngf", "4", "--ndf", "4", "--gen-blocks", "1"]


def run(*args, cmd=None, check=True):
    cmd = cmd or [sys.executable, "bdl.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*cmd, *TINY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- losses
def test_lsgan_and_translator_discriminator_loss():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 0.5]]]])
    assert bdl.lsgan_loss(logits, True).item() == pytest.approx((1 + 1 + 4 + 0.25) / 4)
    assert bdl.lsgan_loss(logits, False).item() == pytest.approx((0 + 4 + 1 + 0.25) / 4)
    identity = torch.nn.Identity()  # "D" whose logits are its input
    real, fake = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 2.0, requires_grad=True)
    loss = bdl.translator_discriminator_loss(identity, real, fake)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 4.0)) and not loss.requires_grad  # fake detached


def test_perceptual_loss_is_mse_of_instance_normalised_logits():
    a = torch.tensor([[[[1.0, 3.0], [1.0, 3.0]]]])  # instance-normalised: -1, 1, -1, 1 (biased variance)
    b = torch.tensor([[[[5.0, 5.0], [7.0, 7.0]]]])  # -1, -1, 1, 1
    eps_scale = 1 / math.sqrt(1 + 1e-5)
    assert bdl.perceptual_loss(a, b).item() == pytest.approx(2.0 * eps_scale ** 2, rel=1e-5)  # (0+4+4+0)/4
    assert bdl.perceptual_loss(a, a * 10 + 3).item() == pytest.approx(0.0, abs=1e-8)  # affine-invariant


def test_translator_losses_weights_and_terms():
    real_s, real_t = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8) * 0.5
    out = {"fake_t": real_t.clone(), "fake_s": real_s.clone(), "rec_s": real_s + 0.2, "rec_t": real_t - 0.1,
           "idt_t": real_t + 0.3, "idt_s": real_s}
    const = lambda v: (lambda x: torch.full((x.shape[0], 1, 2, 2), v))  # noqa: E731
    losses = bdl.translator_losses(out, real_s, real_t, {"target": const(0.0), "source": const(1.0)}, None, "imagenet")
    assert losses["gan_g"].item() == pytest.approx(1.0)  # (0-1)^2 + (1-1)^2
    assert losses["cycle"].item() == pytest.approx(0.3) and losses["idt"].item() == pytest.approx(0.3)
    assert "sem" not in losses  # round 1: no segmenter, no perceptual terms


def test_gan_to_seg_input_matches_uint8_normalisation():
    from common.data import normalize
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    for norm in ("imagenet", "caffe"):
        want = normalize(images, norm)
        got = bdl.gan_to_seg_input(normalize(images, "gan"), norm)
        assert torch.allclose(got, want, atol=1e-5), norm


def test_cyclegan_schedule_and_pool():
    assert [bdl.cyclegan_lr_factor(i, 10) for i in (0, 4)] == [1.0, 1.0]
    assert 0 < bdl.cyclegan_lr_factor(9, 10) < bdl.cyclegan_lr_factor(5, 10) < 1.0
    torch.manual_seed(0)
    pool = bdl.ImagePool(2)
    a, b = torch.zeros(2, 1, 1, 1), torch.ones(3, 1, 1, 1)
    assert torch.equal(pool.query(a), a) and len(pool.images) == 2  # filling: returned as given
    out = pool.query(b)
    assert out.shape == b.shape and len(pool.images) == 2
    assert int((out == 0).sum()) == int(sum(float(x) == 1.0 for x in pool.images))  # swapped in and out


def test_network_shapes():
    gen, disc = bdl.ResnetGenerator(4, 1), bdl.PatchDiscriminator(4)
    x = torch.rand(2, 3, 32, 64) * 2 - 1
    y = gen(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert bdl.translate(gen, x[..., :30, :62]).shape == (2, 3, 30, 62)  # padded to a multiple of 4 and back
    assert disc(x).shape == (2, 1, 2, 6)  # 70x70 PatchGAN: three stride-2 convs, two stride-1
    assert not any(m.affine for m in gen.modules() if isinstance(m, torch.nn.InstanceNorm2d))


# ---------------------------------------------------------------------------------------------- pseudo labels
def official_thresholds(probs, cap=0.9):
    """SSL.py on the full arrays: per class sorted(conf)[round(n/2)] of its argmax pixels, capped, 0 if absent."""
    conf, label = probs.max(1)
    out = []
    for c in range(probs.shape[1]):
        x = conf[label == c].double().sort().values
        out.append(0.0 if len(x) == 0 else min(float(x[int(round(len(x) * 0.5))]), cap))
    return torch.tensor(out, dtype=torch.float64)


def test_thresholds_match_direct_computation():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 17, 23) * 3, 1)
    probs[:, 4] = 0  # class 4 never predicted -> threshold 0
    probs = probs / probs.sum(1, keepdim=True)
    hist = torch.zeros(5, bdl.CONF_LEVELS + 1, dtype=torch.int64)
    for image in probs:  # one image at a time, as the script does
        label, conf_q = bdl.confidence_map(image[None])
        bdl.add_histograms(hist, label, conf_q)
    assert int(hist.sum()) == 3 * 17 * 23
    got = bdl.median_thresholds(hist).double() / bdl.CONF_LEVELS
    want = official_thresholds(probs)
    assert (got - want).abs().max() <= 1 / bdl.CONF_LEVELS  # bin resolution 1/65535 = 1.5e-5
    assert got[4] == 0 and (got <= 0.9 + 1e-12).all()


def test_threshold_is_torch_median_on_odd_count_and_capped():
    x = torch.tensor([0.41, 0.52, 0.47, 0.88, 0.35, 0.66, 0.73, 0.45, 0.59])  # n = 9: round(4.5) = 4 = median
    probs = torch.stack([x, (1 - x) / 2, (1 - x) / 2], 0).view(1, 3, 1, 9)  # class 0 wins every pixel
    hist = bdl.add_histograms(torch.zeros(3, bdl.CONF_LEVELS + 1, dtype=torch.int64), *bdl.confidence_map(probs))
    label, _ = bdl.confidence_map(probs)
    median = torch.median(probs.max(1).values[label == 0]).item()
    assert abs(bdl.median_thresholds(hist)[0].item() / bdl.CONF_LEVELS - median) <= 1 / bdl.CONF_LEVELS
    # a class whose median is above the cap keeps every pixel >= 0.9
    sure = torch.tensor([0.95, 0.97, 0.99]).view(1, 1, 1, 3)
    sure = torch.cat([sure, 1 - sure], 1)
    hist = bdl.add_histograms(torch.zeros(2, bdl.CONF_LEVELS + 1, dtype=torch.int64), *bdl.confidence_map(sure))
    thr = bdl.median_thresholds(hist, cap=0.9)
    assert thr[0].item() / bdl.CONF_LEVELS == pytest.approx(0.9, abs=1e-5)


def test_apply_thresholds():
    label = torch.tensor([[0, 0, 1, 1]])
    conf_q = torch.tensor([[10, 30, 50, 5]])
    out = bdl.apply_thresholds(label, conf_q, torch.tensor([20, 5]))
    assert out.tolist() == [[255, 0, 1, 1]] and out.dtype == torch.uint8


def test_generate_pseudo_labels_writes_thresholded_pngs(tmp_path):
    split = domain_split("toy-real", "train", labelled=False)
    split = dataclasses.replace(split, images=split.images[:3], labels=split.labels[:3])
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 1)
    predict = lambda x: conv(x.float() / 255)  # noqa: E731
    rt = Runtime("cpu")
    with torch.no_grad():
        thresholds = bdl.generate_pseudo_labels(predict, split, (16, 32), str(tmp_path), rt, 8)
        probs = torch.cat([bdl.softmax_at(predict(torch.from_numpy(bdl.SegDataset(split, eval_size=(16, 32))[i][0]
                                                                   .numpy())[None]), (16, 32)) for i in range(3)])
    want = official_thresholds(probs)
    assert (torch.tensor(thresholds, dtype=torch.float64) - want).abs().max() <= 1 / bdl.CONF_LEVELS
    from PIL import Image
    import numpy as np
    written = np.asarray(Image.open(tmp_path / "00000.png"))
    conf, label = probs[0].max(0)
    keep = conf >= want[label].float() + 1 / bdl.CONF_LEVELS  # clear of the quantisation boundary
    assert written.shape == (16, 32) and (written[keep.numpy()] == label[keep].numpy()).all()
    assert (written[(conf < want[label].float() - 1 / bdl.CONF_LEVELS).numpy()] == 255).all()


# ---------------------------------------------------------------------------------------------- update rules
def snapshot(*nets):
    return [p.detach().clone() for net in nets for p in net.parameters()]


def changed(before, nets):
    return [not torch.equal(a, p) for a, p in zip(before, [p for net in nets for p in net.parameters()])]


def test_translator_steps_change_only_their_networks():
    torch.manual_seed(0)
    gens = bdl.Translators(4, 1)
    discs = torch.nn.ModuleDict({"target": bdl.PatchDiscriminator(4), "source": bdl.PatchDiscriminator(4)})
    segmenter = bdl.DeepLabV2("resnet18", 8).eval()
    bdl.set_requires_grad([segmenter], False)
    opt_g = torch.optim.Adam(gens.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(discs.parameters(), lr=1e-2)
    real_s, real_t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    g0, d0, s0 = snapshot(gens), snapshot(discs), snapshot(segmenter)
    # G's step (the script's order): frozen discriminators, frozen segmenter with the perceptual terms
    out = gens(real_s, real_t)
    bdl.set_requires_grad(discs.values(), False)
    losses = bdl.translator_losses(out, real_s, real_t, discs, segmenter, "imagenet")
    assert {"gan_g", "cycle", "idt", "sem", "sem_rec"} <= set(losses)
    sum(losses.values()).backward()
    bdl.set_requires_grad(discs.values(), True)
    assert all(p.grad is None for p in discs.parameters()) and all(p.grad is None for p in segmenter.parameters())
    opt_g.step()
    opt_d.step()
    assert all(changed(g0, [gens])) and not any(changed(d0, [discs])) and not any(changed(s0, [segmenter]))
    # D's step: pooled, detached fakes
    g1 = snapshot(gens)
    opt_g.zero_grad()
    loss_d = (bdl.translator_discriminator_loss(discs["target"], real_t, out["fake_t"])
              + bdl.translator_discriminator_loss(discs["source"], real_s, out["fake_s"]))
    loss_d.backward()
    assert all(p.grad is None for p in gens.parameters())
    opt_g.step()
    opt_d.step()
    assert not any(changed(g1, [gens])) and all(changed(d0, [discs])) and not any(changed(s0, [segmenter]))


def test_segmenter_steps_change_only_their_networks():
    torch.manual_seed(0)
    model, disc = bdl.DeepLabV2("resnet18", 8), bdl.FCDiscriminator(8, ndf=8)
    opt = torch.optim.SGD(model.param_groups(0.1, 10.0), lr=0.1, momentum=0.9)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-2, betas=(0.9, 0.99))
    m0, d0 = snapshot(model), snapshot(disc)
    _, target_main = model(torch.randn(2, 3, 64, 64))
    target_map = bdl.softmax_at(target_main, (64, 64))
    bdl.set_requires_grad([disc], False)
    pseudo = torch.randint(0, 8, (2, 64, 64))
    (0.001 * bdl.generator_loss(disc, target_map) + bdl.seg_loss(target_main, pseudo)).backward()
    bdl.set_requires_grad([disc], True)
    assert all(p.grad is None for p in disc.parameters())
    opt.step()
    d_opt.step()
    assert any(changed(m0, [model])) and not any(changed(d0, [disc]))
    m1 = snapshot(model)
    opt.zero_grad(set_to_none=True)
    _, source_main = model(torch.randn(2, 3, 64, 64))
    bdl.discriminator_loss(disc, bdl.softmax_at(source_main, (64, 64)), target_map).backward()
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    d_opt.step()
    assert not any(changed(m1, [model])) and all(changed(d0, [disc]))


# ---------------------------------------------------------------------------------------------- structure
def test_stage_plan_and_quick_budget():
    args = bdl.parse_args(bdl.Args, bdl.PRESETS, ["--preset", "quick"])
    plan = bdl.stage_plan(args)
    assert [st.name for st in plan[:7]] == ["cyclegan_r1", "translate_r1", "seg_r1_s0", "pseudo_r1_s1", "seg_r1_s1",
                                            "pseudo_r1_s2", "seg_r1_s2"]
    segs = [st for st in plan if st.kind == "seg"]
    assert len(plan) == 14 and len(segs) == 6 and sum(st.length for st in segs) == 400  # source_only's budget
    assert [st.seg_offset for st in segs] == [0, 60, 130, 200, 260, 330]


def test_every_field_has_help():
    docs = field_docs(bdl.Args)
    for f in dataclasses.fields(bdl.Args):
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f"{f.name} has no docstring"


def test_shared_blocks_identical():
    so, asn = importlib.import_module("source_only"), importlib.import_module("adaptsegnet")
    for name in ("BasicBlock", "Bottleneck", "ASPP", "DeepLabV2", "load_init", "seg_loss", "poly_lr", "set_lr"):
        assert inspect.getsource(getattr(so, name)) == inspect.getsource(getattr(bdl, name)), name
    for name in ("FCDiscriminator", "gan_loss", "discriminator_loss", "generator_loss", "set_requires_grad",
                 "softmax_at"):
        assert inspect.getsource(getattr(asn, name)) == inspect.getsource(getattr(bdl, name)), name
    assert dict(so.PRESETS["quick"], iters=None) == {k: v for k, v in bdl.PRESETS["quick"].items()
                                                     if k in so.PRESETS["quick"]} | {"iters": None}


# ---------------------------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bdl") / "straight")
    run("--outer-rounds", 1, "--ssl-iters", 2, "--out", out)
    return out


def test_smoke_run_folder(straight):
    for name in ("config.json", "metrics.jsonl", "results.json", "stages.json", "checkpoints/last.pt",
                 "checkpoints/cyclegan_r1.pt", "checkpoints/seg_r1_s0.pt", "checkpoints/seg_r1_s1.pt",
                 "pseudo/r1_s1/thresholds.json", "translated/r1/00000.png", "pseudo/r1_s1/00003.png"):
        assert os.path.isfile(os.path.join(straight, name)), name
    assert os.listdir(os.path.join(straight, "predictions"))
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["script"] == "bdl" and set(config["params"]) == {"model", "disc_main", "to_target", "to_source",
                                                                   "disc_target", "disc_source"}
    keys = set().union(*metrics(straight))
    assert {"gan_g", "cycle", "idt", "d_cyc", "seg_src", "adv_main", "d_main", "seg_pseudo", "lr", "val_miou"} <= keys
    results = json.load(open(os.path.join(straight, "results.json")))
    assert 0 <= results["miou"] <= 100 and results["iters"] == 3 and results["stage"] == "seg_r1_s1"


def test_resume_is_exact_and_cached_stages_are_skipped(straight, tmp_path):
    out = str(tmp_path / "resumed")
    run("--outer-rounds", 1, "--ssl-iters", 1, "--out", out)
    proc = run("--outer-rounds", 1, "--ssl-iters", 2, "--out", out, "--resume", "auto")
    assert "stage cyclegan_r1" not in proc.stderr + proc.stdout  # cached: skipped
    a = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert (a["stage"], a["iter"]) == (b["stage"], b["iter"]) == ("seg_r1_s1", 2)
    for key in ("model", "disc_main"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    # --eval-only on the final weights of the last stage
    run("--eval-only", "--weights", os.path.join(out, "checkpoints", "seg_r1_s1.pt"), "--out", str(tmp_path / "ev"))
    assert os.path.isfile(tmp_path / "ev" / "results.json")


def test_single_stage_needs_its_inputs(straight, tmp_path):
    bad = run("--stage", "seg", "--round", "1", "--ssl-round", "1", "--out", str(tmp_path / "empty"), check=False)
    assert bad.returncode == 2 and "needs stage cyclegan_r1 first" in bad.stderr


def test_dry_run(tmp_path):
    out = str(tmp_path / "dry")
    run("--dry-run", "--out", out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["params"]["to_target"]["trainable"] == sum(p.numel() for p in bdl.ResnetGenerator(4, 1).parameters())
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_torchrun_two_processes_whole_loop(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "bdl.py"]
    run("--outer-rounds", 2, "--ssl-iters", 1, "--cyclegan-batch", 2, "--out", out, cmd=cmd)
    assert json.load(open(os.path.join(out, "config.json")))["args"]["world_size"] == 2
    assert json.load(open(os.path.join(out, "results.json")))["stage"] == "seg_r2_s1"
    assert {"sem", "sem_rec"} <= set().union(*metrics(out))  # round 2: perceptual loss from round 1's segmenter
    assert len([f for f in os.listdir(os.path.join(out, "pseudo", "r2_s1")) if f.endswith(".png")]) == 4
