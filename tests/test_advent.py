"""advent.py: self-information, entropy and ER's top-entropy selection on hand-made tensors, domain labels,
which parameters each step may change, the paper preset against the official configs, the SYNTHIA recipe, the
refusal of flags that cannot act, the two-checkpoint ensemble, and smoke runs of the script (quick preset on
the toy domains at 64x128, 1-4 iterations, 2 eval images)."""
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
adv = importlib.import_module("advent")
from common.cli import field_docs  # noqa: E402

TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "64", "128", "--target-size", "64", "128", "--eval-size", "64", "128",
        "--num-predictions", "1"]


def run(*args, cmd=None, check=True, tiny=True):
    cmd = cmd or [sys.executable, "advent.py"]
    proc = subprocess.run([*cmd, *(TINY if tiny else []), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- units
def test_entropy_normalisation():
    for c in (2, 8, 19):
        uniform = torch.full((2, c, 3, 5), 1.0 / c)
        assert adv.entropy_loss(uniform).item() == pytest.approx(1.0, abs=1e-6)
        one_hot = torch.zeros(2, c, 3, 5)
        one_hot[:, 1] = 1.0
        assert adv.entropy_loss(one_hot).item() == 0.0  # the 1e-30 keeps 0 * log 0 finite


def test_self_information_values():
    # one pixel, C = 4: P = (1/2, 1/4, 1/4, 0); -p log2 p = (1/2, 1/2, 1/2, 0); / log2(4) = 2
    prob = torch.tensor([0.5, 0.25, 0.25, 0.0]).view(1, 4, 1, 1)
    info = adv.self_information(prob)
    assert info.shape == prob.shape  # per channel, not summed
    assert torch.allclose(info.flatten(), torch.tensor([0.25, 0.25, 0.25, 0.0]))
    # two pixels: the entropy is their mean of sum_c I_c: (0.75 + 1.0) / 2 with the second pixel uniform
    two = torch.cat([prob, torch.full((1, 4, 1, 1), 0.25)], dim=3)
    assert adv.entropy_loss(two).item() == pytest.approx(0.875)
    assert torch.isfinite(adv.self_information(torch.zeros(1, 3, 2, 2))).all()


def test_entropy_gradient_sharpens():
    logits = torch.tensor([[[[1.0]], [[0.5]], [[0.0]]]], requires_grad=True)
    adv.entropy_loss(adv.softmax_at(logits, (1, 1))).backward()
    # descending the entropy raises the winning logit and lowers the losing one
    assert logits.grad[0, 0].item() < 0 < logits.grad[0, 2].item()


def binary_entropy(p):
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0


def two_class_row(ps):
    """One image, C = 2, a 1 x len(ps) row whose pixel i has P(class 0) = ps[i]."""
    p = torch.tensor(ps, dtype=torch.float64)
    return torch.stack([p, 1 - p]).view(1, 2, 1, len(ps))


def test_entropy_top_fraction_by_hand():
    ps = [0.5, 1.0, 0.2, 0.9, 0.6]  # entropies 1, 0, 0.7219, 0.4690, 0.9710 (log2 C = 1 for C = 2)
    h = [binary_entropy(p) for p in ps]
    prob = two_class_row(ps)
    assert adv.entropy_loss(prob).item() == pytest.approx(sum(h) / 5)  # MinEnt: every pixel
    assert adv.entropy_loss(prob, 1.0).item() == pytest.approx(sum(h) / 5)
    assert adv.entropy_loss(prob, 0.4).item() == pytest.approx((h[0] + h[4]) / 2)  # the 2 highest of 5
    assert adv.entropy_loss(prob, 0.01).item() == pytest.approx(1.0)  # at least one pixel is kept


def test_entropy_top_fraction_ranks_each_image_separately():
    confident = two_class_row([0.99, 0.95, 0.9, 0.97])  # low entropies
    unsure = two_class_row([0.5, 0.6, 0.45, 0.7])  # high entropies
    h_conf = sorted(binary_entropy(p) for p in [0.99, 0.95, 0.9, 0.97])
    h_unsure = sorted(binary_entropy(p) for p in [0.5, 0.6, 0.45, 0.7])
    # half of each image's pixels: the confident image's two least confident ones count too (a ranking over
    # the whole batch would take all four from the unsure image)
    want = (sum(h_conf[2:]) + sum(h_unsure[2:])) / 4
    assert adv.entropy_loss(torch.cat([confident, unsure]), 0.5).item() == pytest.approx(want)


def test_entropy_top_fraction_gradient_reaches_only_kept_pixels():
    # 2 classes, 10 pixels, all margins different and none 0 (where the entropy's gradient vanishes)
    logits = torch.tensor([[[[0.05, 3.0, 0.3, 5.0, 0.1, 2.0, 4.0, 0.2, 1.0, 6.0]],
                            [[0.0] * 10]]], requires_grad=True)
    adv.entropy_loss(adv.softmax_at(logits, (1, 10)), 0.3).backward()
    touched = (logits.grad.abs().sum(1) > 0).flatten().tolist()
    # 0.3 * 10 pixels = 3 (not 4 from 3.0000000000000004): the three smallest margins 0.05, 0.1, 0.2
    assert touched == [True, False, False, False, True, False, False, True, False, False]


def test_entropy_maps_are_fp32_under_autocast():
    conv = torch.nn.Conv2d(3, 5, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(torch.randn(1, 3, 4, 4))
        assert logits.dtype == torch.bfloat16
        prob = adv.softmax_at(logits, (8, 8))
        loss = adv.entropy_loss(prob, 0.3)
    assert prob.dtype == adv.self_information(prob).dtype == loss.dtype == torch.float32


def test_domain_labels():
    identity = torch.nn.Identity()  # a "D" whose logits are its input
    source, target = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)
    want_d = 0.5 * (math.log1p(math.exp(2.0)) + math.log1p(math.exp(1.0)))  # BCE(2, source 0), BCE(-1, target 1)
    assert adv.discriminator_loss(identity, source, target).item() == pytest.approx(want_d, rel=1e-6)
    assert adv.generator_loss(identity, target).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_discriminator_copied_from_adaptsegnet():
    asn = importlib.import_module("adaptsegnet")
    for name in ("FCDiscriminator", "gan_loss", "discriminator_loss", "generator_loss", "set_requires_grad",
                 "softmax_at"):
        assert inspect.getsource(getattr(asn, name)) == inspect.getsource(getattr(adv, name)), name
    so = importlib.import_module("source_only")
    for name in ("BasicBlock", "Bottleneck", "ASPP", "DeepLabV2", "load_init", "seg_loss", "poly_lr", "set_lr"):
        assert inspect.getsource(getattr(so, name)) == inspect.getsource(getattr(adv, name)), name


def snapshot(*nets):
    return [p.detach().clone() for net in nets for p in net.parameters()]


def changed(before, nets):
    return [not torch.equal(a, p) for a, p in zip(before, [p for net in nets for p in net.parameters()])]


def info_maps(model, x):
    return {k: adv.self_information(adv.softmax_at(o, x.shape[-2:]))
            for k, o in zip(("aux", "main"), model(x))}


def test_update_rules():
    torch.manual_seed(0)
    model = adv.DeepLabV2("resnet18", 8, multi_level=True)
    discs = {k: adv.FCDiscriminator(8, ndf=8) for k in ("aux", "main")}
    opts = [torch.optim.SGD(model.param_groups(0.1, 10.0), lr=0.1, momentum=0.9, weight_decay=5e-4)]
    opts += [torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.9, 0.99)) for d in discs.values()]
    # segmenter's adversarial step: D frozen, so D gets no gradient and stepping every optimiser keeps it
    d_before, m_before = snapshot(*discs.values()), snapshot(model)
    target = info_maps(model, torch.randn(1, 3, 64, 64))
    adv.set_requires_grad(discs.values(), False)
    sum(w * adv.generator_loss(discs[k], target[k]) for k, w in (("aux", 2e-4), ("main", 1e-3))).backward()
    adv.set_requires_grad(discs.values(), True)
    assert all(p.grad is None for d in discs.values() for p in d.parameters())
    for o in opts:
        o.step()
    assert not any(changed(d_before, discs.values())) and any(changed(m_before, [model]))
    # discriminator step on detached maps: the segmenter gets no gradient
    for o in opts:
        o.zero_grad(set_to_none=True)
    source, target = info_maps(model, torch.randn(1, 3, 64, 64)), info_maps(model, torch.randn(1, 3, 64, 64))
    d_before, m_before = snapshot(*discs.values()), snapshot(model)
    sum(adv.discriminator_loss(discs[k], source[k], target[k]) for k in discs).backward()
    assert all(p.grad is None for p in model.parameters())
    for o in opts:
        o.step()
    assert not any(changed(m_before, [model])) and all(changed(d_before, discs.values()))


def parsed(*argv):
    return adv.parse_advent_args(list(argv))


def test_synthia_recipe():
    gta = parsed()
    assert (gta.iters, gta.poly_horizon, gta.synthia_classes, gta.mode) == (120000, 250000, 19, "advent")
    syn = parsed("--source", "synthia")
    assert (syn.iters, syn.poly_horizon, syn.synthia_classes) == (90000, None, 16)  # None: the run length
    assert parsed("--source", "synthia", "--iters", "5", "--synthia-classes", "19").iters == 5
    assert parsed("--source", "synthia", "--synthia-classes", "19").synthia_classes == 19
    quick = parsed("--source", "synthia", "--preset", "quick")  # the preset's schedule wins
    assert (quick.iters, quick.poly_horizon, quick.synthia_classes) == (400, None, 16)


def test_quick_preset_is_source_only_plus_lambdas():
    so = importlib.import_module("source_only")
    quick = dict(adv.PRESETS["quick"])
    method = {k: quick.pop(k) for k in ("lambda_adv_main", "lambda_adv_aux", "lambda_ent_main", "lambda_ent_aux")}
    assert quick == so.PRESETS["quick"]  # same toy benchmark budget as the baseline it is compared with
    assert method == {"lambda_adv_main": 0.01, "lambda_adv_aux": 0.002, "lambda_ent_main": 0.1, "lambda_ent_aux": 0.02}
    paper = parsed()  # the paper preset keeps the paper's weights
    assert (paper.lambda_adv_main, paper.lambda_adv_aux, paper.lambda_ent_main, paper.lambda_ent_aux) == (
        0.001, 0.0002, 0.001, 0.0002)


# The official recipe, field by field (valeoai/ADVENT 3e58d45; valeoai/DADA d657af6 for SYNTHIA).
# ADVENT advent/domain_adaptation/config.py (cfg.TRAIN unless noted) and scripts/configs/advent.yml, minent.yml:
OFFICIAL_GTA = dict(
    source="gta", target="cityscapes",  # SOURCE 'GTA', TARGET 'Cityscapes' (:22,24)
    backbone="resnet101",  # model/deeplabv2.py get_deeplab_v2: Bottleneck [3, 4, 23, 3]
    iters=120000,  # EARLY_STOP (:77)
    poly_horizon=250000, poly_power=0.9,  # MAX_ITERS (:76), POWER (:63); utils/func.py lr_poly
    batch_size=1,  # BATCH_SIZE_SOURCE = BATCH_SIZE_TARGET = 1 (:47-48)
    crop_size=None, source_size=None, target_size=None, eval_size=None,  # INPUT_SIZE_SOURCE (1280, 720),
    # INPUT_SIZE_TARGET and TEST.INPUT_SIZE_TARGET (1024, 512) (:50-51, :99), resized whole, no crop: the domains'
    # paper sizes (common/data.py: GTA5 (720, 1280), Cityscapes (512, 1024), SYNTHIA (760, 1280))
    lr=2.5e-4, momentum=0.9, weight_decay=5e-4,  # LEARNING_RATE, MOMENTUM, WEIGHT_DECAY (:60-62)
    head_lr_mult=10.0,  # utils/func.py _adjust_learning_rate: param_groups[1] lr * 10
    seed=1234,  # RANDOM_SEED (:80)
    multi_level=True, lambda_seg_aux=0.1,  # MULTI_LEVEL (:57; advent.yml/minent.yml :8), LAMBDA_SEG_AUX (:65)
    aspp_branches=4,  # model/deeplabv2.py ClassifierModule sums all of [6, 12, 18, 24] (:61-65, :85-86)
    bn_mode="train",  # BN affine frozen (deeplabv2.py:14-15), model.train() throughout (train_UDA.py:43)
    mode="advent",  # DA_METHOD 'AdvEnt' (:67; advent.yml :5; minent.yml: MinEnt)
    lambda_adv_main=0.001, lambda_adv_aux=0.0002,  # LAMBDA_ADV_MAIN/AUX (:70-71; advent.yml :9-10)
    lambda_ent_main=0.001, lambda_ent_aux=0.0002,  # LAMBDA_ENT_MAIN/AUX (:73-74; minent.yml :9-10)
    lr_d=1e-4,  # LEARNING_RATE_D (:69); Adam betas (0.9, 0.99) are fixed in train_UDA.py:67-70 and here
    entropy_top_fraction=None,  # MinEnt; the paper's MinEnt+ER (0.3) is not in the official code
    eval_every=2000,  # SAVE_PRED_EVERY (:78), TEST.SNAPSHOT_STEP (:94): the snapshots TEST.MODE 'best' scores
    synthia_classes=19,  # NUM_CLASSES 19 (:34); SYNTHIA below
)
# DADA dada/domain_adaptation/config.py: what changes with --source synthia (ADVENT #12: only MAX_ITERS)
OFFICIAL_SYNTHIA = dict(OFFICIAL_GTA, source="synthia",
                        iters=90000, poly_horizon=90000,  # EARLY_STOP, MAX_ITERS (:79-80)
                        synthia_classes=16)  # NUM_CLASSES (:35); INPUT_SIZE_SOURCE (1280, 760) (:52)
# Deliberately different (header): init (torchvision ImageNet, not DeepLab_resnet_pretrained_imagenet.pth) and
# with it normalization (auto: ImageNet mean/std; the official Caffe BGR mean with --init PATH); multi-level on
# SYNTHIA (DADA config.py:59 turns it off for the DADA paper; ADVENT #12 keeps the GTA5 setting).


def test_paper_preset_is_the_official_recipe(tmp_path):
    out = tmp_path / "paper"
    run("--preset", "paper", "--dry-run", "--num-workers", "0", "--out", out, tiny=False)  # builds the R101
    resolved = json.load(open(out / "config.json"))["args"]
    assert {k: resolved[k] for k in OFFICIAL_GTA} == OFFICIAL_GTA
    assert (resolved["init"], resolved["normalization"]) == ("imagenet", "auto")
    syn = dataclasses.asdict(parsed("--source", "synthia"))
    syn["poly_horizon"] = syn["poly_horizon"] or syn["iters"]  # main()'s setup: none is the run length
    assert {k: syn[k] for k in OFFICIAL_SYNTHIA} == OFFICIAL_SYNTHIA


def refusal(*argv):
    with pytest.raises(adv.UserError) as e:
        parsed(*argv)
    return str(e.value)


def test_flags_that_cannot_act_are_refused():
    assert "--lambda-adv-main --lr-d: no effect with --mode minent" in refusal(
        "--mode", "minent", "--lambda-adv-main", "0.01", "--lr-d", "1e-3")
    assert "--entropy-top-fraction: no effect with --mode advent" in refusal("--entropy-top-fraction", "0.3")
    assert "--lambda-ent-main" in refusal("--lambda-ent-main", "0.01")
    assert "--lambda-seg-aux --lambda-ent-aux: no effect with --mode minent --no-multi-level" in refusal(
        "--mode", "minent", "--no-multi-level", "--lambda-seg-aux", "0.2", "--lambda-ent-aux", "0.1")
    assert "--lambda-adv-aux" in refusal("--no-multi-level", "--lambda-adv-aux", "0.1")
    for bad in ("0", "1.5", "-0.3"):
        assert "(0, 1]" in refusal("--mode", "minent", "--entropy-top-fraction", bad)
    # what acts is accepted: ER with MinEnt, the presets' own weights, anything with --eval-only
    assert parsed("--mode", "minent", "--entropy-top-fraction", "0.3").entropy_top_fraction == 0.3
    assert parsed("--preset", "quick", "--mode", "minent").lambda_adv_main == 0.01
    assert parsed("--eval-only", "--entropy-top-fraction", "0.3", "--lr-d", "1").eval_only
    proc = run("--mode", "minent", "--lambda-adv-main", "0.01", "--out", "unused", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_every_field_has_help():
    docs = field_docs(adv.Args)
    for f in dataclasses.fields(adv.Args):
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f"{f.name} has no docstring"


# ---------------------------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("advent") / "straight")
    run("--iters", 4, "--out", out)
    return out


def test_smoke_run_folder(straight):
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(straight, name)), name
    assert os.listdir(os.path.join(straight, "predictions"))
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["script"] == "advent" and set(config["params"]) == {"model", "disc_aux", "disc_main"}
    rows = [r for r in metrics(straight) if "seg_src" in r]
    assert {"seg_src", "seg_aux", "adv_aux", "adv_main", "d_aux", "d_main", "lr"} <= set(rows[-1])
    assert json.load(open(os.path.join(straight, "results.json")))["iters"] == 4


def test_resume_is_exact(straight, tmp_path):
    out = str(tmp_path / "resumed")
    run("--iters", 2, "--poly-horizon", 4, "--out", out)  # interrupted at 2 of a 4-iteration schedule
    run("--iters", 4, "--out", out, "--resume", "auto")
    a = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    for key in ("model", "disc_aux", "disc_main"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


@pytest.fixture(scope="module")
def minent(tmp_path_factory):  # MinEnt+ER, the ensemble's MinEnt member (ADVENT #7)
    out = str(tmp_path_factory.mktemp("minent") / "run")
    run("--iters", 2, "--mode", "minent", "--entropy-top-fraction", 0.3, "--out", out)
    return out


def test_minent_run(minent):
    config = json.load(open(os.path.join(minent, "config.json")))
    assert set(config["params"]) == {"model"}  # no discriminators
    assert config["args"]["entropy_top_fraction"] == 0.3
    keys = set(metrics(minent)[0])
    assert {"seg_src", "seg_aux", "ent", "ent_aux"} <= keys and not keys & {"adv_main", "d_main"}
    ckpt = torch.load(os.path.join(minent, "checkpoints", "last.pt"), weights_only=True)
    assert not [k for k in ckpt if k.startswith("disc")]


def test_ensemble_eval(straight, minent, tmp_path):
    a = os.path.join(straight, "checkpoints", "last.pt")
    b = os.path.join(minent, "checkpoints", "last.pt")
    single = json.load(open(os.path.join(straight, "results.json")))["miou"]
    # a model averaged with itself is the model
    run("--eval-only", "--weights", a, "--weights", a, "--out", str(tmp_path / "same"))
    assert json.load(open(tmp_path / "same" / "results.json"))["miou"] == pytest.approx(single, abs=1e-9)
    run("--eval-only", "--weights", a, "--weights", b, "--out", str(tmp_path / "pair"))
    results = json.load(open(tmp_path / "pair" / "results.json"))
    assert results["weights"] == [a, b] and 0 <= results["miou"] <= 100
    bad = run("--eval-only", "--weights", a, "--weights", a, "--weights", a, "--out", str(tmp_path / "bad"),
              check=False)
    assert bad.returncode == 2 and "one --weights" in bad.stderr and "Traceback" not in bad.stderr


def test_refuses_other_scripts_checkpoint(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"script": "adaptsegnet", "num_classes": 8, "model": {}}, path)
    proc = run("--eval-only", "--weights", path, "--out", str(tmp_path / "refused"), check=False)
    assert proc.returncode == 2 and "adaptsegnet" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run(tmp_path):
    run("--dry-run", "--out", str(tmp_path / "dry"))
    params = json.load(open(tmp_path / "dry" / "config.json"))["params"]
    assert set(params) == {"model", "disc_aux", "disc_main"}


def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "advent.py"]
    run("--iters", 2, "--out", out, cmd=cmd)
    assert json.load(open(os.path.join(out, "config.json")))["args"]["world_size"] == 2
    assert os.path.isfile(os.path.join(out, "results.json"))
