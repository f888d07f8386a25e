"""bdl.py: losses on hand-made tensors, the pseudo-label rule against SSL.py's direct computation, the CycleGAN
schedule and the global image pool, which parameters each update may change, the paper preset against the official
recipe, and runs of the whole stage loop (toy domains at 32x64, 1-3 iterations per stage, 4 source/target train
images, 2 eval images): straight, interrupted at every kind of stage and resumed, and under torchrun."""
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
bdl = importlib.import_module("bdl")
from common.cli import UserError, field_docs  # noqa: E402
from common.data import SegDataset, domain_split  # noqa: E402
from common.runtime import Runtime  # noqa: E402

# 5 CycleGAN iterations (lr factors 1, 1, 1, 1, 0), a pool of 2 that starts swapping at the second iteration
TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "32", "64", "--target-size", "32", "64", "--eval-size", "32", "64", "--num-predictions", "1",
        "--source-limit", "4", "--target-limit", "4", "--cyclegan-crop", "32", "32", "--cyclegan-epochs", "5",
        "--cyclegan-decay-epochs", "0", "--cyclegan-epoch-iters", "1", "--pool-size", "2", "--iters", "1",
        "--ssl-rounds", "1", "--ngf", "4", "--ndf", "4", "--gen-blocks", "1", "--checkpoint-every", "1"]


def run(*args, cmd=None):
    """bdl.py in a subprocess (CLI, torchrun)."""
    cmd = cmd or [sys.executable, "bdl.py"]
    proc = subprocess.run([*cmd, *TINY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def main(*args, tiny=True):
    """bdl.main() in this process (no interpreter start-up; crashes can be injected with monkeypatch)."""
    argv = sys.argv
    sys.argv = ["bdl.py", *(TINY if tiny else []), *map(str, args)]
    try:
        bdl.main()
    finally:
        sys.argv = argv


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(out, name):
    return torch.load(os.path.join(out, "checkpoints", name), weights_only=True)


def tensors(obj):
    """Every tensor in a (nested) state dict, in a fixed order."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in tensors(obj[k])]
    return [t for v in obj for t in tensors(v)] if isinstance(obj, (list, tuple)) else []


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


def test_cyclegan_schedule_is_per_epoch_as_the_official_one():
    # networks.py get_scheduler 'lambda' with --niter 10 --niter_decay 10, stepped at the end of each epoch
    got = [bdl.cyclegan_lr_factor(e, 10, 10) for e in range(20)]
    assert got == pytest.approx([1.0] * 9 + [1 - k / 11 for k in range(1, 12)])
    assert [bdl.cyclegan_lr_factor(e, 5, 0) for e in range(5)] == [1.0] * 4 + [0.0]  # the tests' TINY schedule


def test_image_pool():
    torch.manual_seed(0)
    pool = bdl.ImagePool(2, "cpu")
    a, b = torch.zeros(2, 1, 1, 1), torch.ones(3, 1, 1, 1)
    assert torch.equal(pool.query(a), a) and len(pool.images) == 2  # filling: returned as given
    out = pool.query(b)
    assert out.shape == b.shape and len(pool.images) == 2
    assert int((out == 0).sum()) == int(sum(float(x) == 1.0 for x in pool.images))  # swapped in and out
    copy = bdl.ImagePool(2, "cpu")
    copy.load_state_dict(pool.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(copy.images, pool.images))


def test_pool_is_global_under_torchrun(monkeypatch):
    """Two ranks with batch 2 each see what one process with batch 4 sees: every rank queries its copy of the
    pool with all fakes in the single-process order (rank r holds samples r, r + 2) and keeps its share."""
    batch = torch.arange(8 * 3, dtype=torch.float32).view(8, 3, 1, 1)  # two iterations of a global batch of 4
    torch.manual_seed(0)
    single = bdl.ImagePool(3, "cpu")
    want = [single.query(batch[:4]), single.query(batch[4:])]
    shares = {r: [batch[:4][r::2], batch[4:][r::2]] for r in (0, 1)}  # the sampler's split of each batch
    got = {}
    for rank in (0, 1):
        rt = SimpleNamespace(distributed=True, world=2, rank=rank)
        torch.manual_seed(0)  # every rank draws the same numbers
        pool, got[rank] = bdl.ImagePool(3, "cpu"), []
        for step in (0, 1):
            monkeypatch.setattr(bdl.dist, "all_gather", lambda parts, x, step=step: [
                p.copy_(shares[r][step]) for r, p in enumerate(parts)])
            got[rank].append(bdl.pooled(pool, shares[rank][step], rt))
    for step in (0, 1):
        merged = torch.stack([got[0][step], got[1][step]], 1).flatten(0, 1)
        assert torch.equal(merged, want[step]), step


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


def test_generate_pseudo_labels_follows_ssl_py(tmp_path):
    """SSL.py:36-37: softmax at the network's stride, then the probabilities upsampled (not the logits)."""
    split = domain_split("toy-real", "train", labelled=False)
    split = dataclasses.replace(split, images=split.images[:3], labels=split.labels[:3])
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)  # logits at 1/4 of the input, as DeepLab's at 1/8
    predict = lambda x: conv(x.float() / 255) * 4  # noqa: E731
    rt = Runtime("cpu")
    with torch.no_grad():
        thresholds = bdl.generate_pseudo_labels(predict, split, (16, 32), str(tmp_path), rt, 8)
        logits = torch.cat([predict(SegDataset(split, eval_size=(16, 32))[i][0][None]) for i in range(3)])
        probs = torch.nn.functional.interpolate(logits.softmax(1), size=(16, 32), mode="bilinear",
                                                align_corners=True)
    want = official_thresholds(probs)
    assert (torch.tensor(thresholds, dtype=torch.float64) - want).abs().max() <= 1 / bdl.CONF_LEVELS
    assert (official_thresholds(bdl.softmax_at(logits, (16, 32))) - want).abs().max() > 1e-3  # the order matters
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


# ---------------------------------------------------------------------------------------------- recipe
# The official recipe, field by field (liyunsheng13/BDL a0e5821; its CycleGAN runs on junyanz/pytorch-CycleGAN-
# and-pix2pix, whose option defaults are cited as "CycleGAN").
OFFICIAL = dict(
    source="gta", target="cityscapes",  # train_options.py:7-8
    backbone="resnet101",  # model/deeplab.py:245 ResNet101(Bottleneck, [3, 4, 23, 3])
    aspp_branches=4,  # model/deeplab.py:115-119 sums every branch (since 37af0e7)
    bn_mode="train",  # BN affine frozen (deeplab.py:129-158), model.train() throughout (BDL.py:44)
    iters=80000, ssl_iters=120000,  # README:31 --num-steps-stop 80000 (S_0), README:51 120000 (with pseudo labels)
    poly_horizon=250000, poly_power=0.9,  # train_options.py:21 --num-steps, :23 --power; deeplab.py:220-224
    batch_size=1,  # train_options.py:9
    crop_size=None, source_size=None, target_size=None, eval_size=None,  # data/__init__.py:9: GTA5 1280x720,
    # SYNTHIA 1280x760, Cityscapes 1024x512, whole frames, no crop: the domains' paper sizes in common/data.py
    lr=2.5e-4, momentum=0.9, weight_decay=5e-4,  # train_options.py:16, :19, :29
    head_lr_mult=10.0,  # deeplab.py:216-224: layer5 at 10x
    lr_d=1e-4, lambda_adv=0.001,  # train_options.py:17-18; D Adam betas (0.9, 0.99) model/__init__.py:36 (fixed)
    synthia_classes=19,  # train_options.py:20 --num-classes 19 for both sources (BDL #39)
    pseudo_max_threshold=0.9,  # SSL.py:55
    eval_upsample="softmax",  # evaluation.py:104-105: softmax, then bilinear to 2048x1024
    outer_rounds=2, ssl_rounds=2,  # paper Table 2 (K=2, N=2; methods.md 6b), README releases SSL_step1/2
    seg_init="init",  # README:30,50 --init-weights for every segmentation run
    cyclegan_epochs=10, cyclegan_decay_epochs=10,  # cyclegan/readme.md:13-14 --niter 10 --niter_decay 10
    cyclegan_epoch_iters=None,  # CycleGAN unaligned_dataset: len = max(A, B), one pass per epoch
    cyclegan_batch=4,  # cyclegan/readme.md:21
    cyclegan_load_width=1024, cyclegan_crop=[452, 452],  # cyclegan/readme.md:6,15-16 scale_width_and_crop
    cyclegan_lr=2e-4,  # CycleGAN train_options --lr 0.0002 (beta1 0.5 is fixed here)
    ngf=64, ndf=64, gen_blocks=9,  # CycleGAN base_options --ngf, --ndf 64, --netG resnet_9blocks
    pool_size=50,  # CycleGAN train_options --pool_size 50
    lambda_cycle=10.0,  # cycle_gan_model.py:19-21 lambda_A = lambda_B = 10
    lambda_identity=5.0,  # cyclegan/readme.md:22 --lambda_identity 0.5, times lambda 10 (cycle_gan_model.py:136)
    lambda_perceptual=0.1,  # cycle_gan_model.py:159-160
    lambda_perceptual_rec=10.0,  # cycle_gan_model.py:156-157 lambda_A x lambda_semantic 1 (cyclegan/readme.md:18)
)
# Deliberately different (header): init (torchvision ImageNet, not the authors' DeepLab init file) and with it the
# normalization (auto: ImageNet mean/std; Caffe BGR with --init PATH); seed (the official code sets none).


def test_paper_preset_is_the_official_recipe(tmp_path):
    main("--preset", "paper", "--dry-run", "--num-workers", "0", "--out", tmp_path / "paper", tiny=False)  # R101
    resolved = json.load(open(tmp_path / "paper" / "config.json"))["args"]
    assert {k: resolved[k] for k in OFFICIAL} == OFFICIAL
    assert (resolved["init"], resolved["normalization"]) == ("imagenet", "auto")


def test_quick_preset_is_source_only_plus_the_method():
    so = importlib.import_module("source_only")
    quick = bdl.PRESETS["quick"]
    assert {k: v for k, v in quick.items() if k in so.PRESETS["quick"]} == dict(so.PRESETS["quick"], iters=60)
    args = bdl.parse_args(bdl.Args, bdl.PRESETS, ["--preset", "quick"])
    plan = bdl.stage_plan(args)
    assert [st.name for st in plan[:7]] == ["cyclegan_r1", "translate_r1", "seg_r1_s0", "pseudo_r1_s1", "seg_r1_s1",
                                            "pseudo_r1_s2", "seg_r1_s2"]
    assert [st.output for st in plan[:4]] == ["checkpoints/cyclegan_r1.pt", "translated/r1/done.json",
                                              "checkpoints/seg_r1_s0.pt", "pseudo/r1_s1/thresholds.json"]
    assert len(plan) == 14 and sum(st.length for st in plan if st.kind == "seg") == 400  # source_only's budget
    assert (args.cyclegan_epochs + args.cyclegan_decay_epochs) * args.cyclegan_epoch_iters == 300


def test_every_field_has_help_and_acts(tmp_path):
    docs = field_docs(bdl.Args)
    for f in dataclasses.fields(bdl.Args):
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f"{f.name} has no docstring"
    names = {f.name for f in dataclasses.fields(bdl.Args)}
    assert not {"multi_level", "lambda_seg_aux"} & names  # BDL's segmenter is single-level: no aux head
    with pytest.raises(UserError, match="--stage all runs every stage"):
        main("--round", 2, "--out", "unused")
    with pytest.raises(UserError, match="is not in the plan"):
        main("--stage", "cyclegan", "--ssl-round", 1, "--out", "unused")
    with pytest.raises(UserError, match="--weights is read by --eval-only"):
        main("--weights", "x.pt", "--out", tmp_path / "w")
    with pytest.raises(UserError, match="^--lambda-perceptual: no effect with --outer-rounds 1"):
        main("--outer-rounds", 1, "--lambda-perceptual", 1, "--out", "unused")
    with pytest.raises(UserError, match="^--pseudo-max-threshold --ssl-iters: no effect with .* --ssl-rounds 0"):
        main("--ssl-rounds", 0, "--ssl-iters", 5, "--pseudo-max-threshold", 0.5, "--out", "unused")


def test_dry_run_resolves_the_chained_schedule(tmp_path):
    main("--dry-run", "--ssl-iters", 2, "--out", tmp_path / "a")
    config = json.load(open(tmp_path / "a" / "config.json"))
    assert config["params"]["to_target"]["trainable"] == sum(p.numel() for p in bdl.ResnetGenerator(4, 1).parameters())
    assert config["args"]["poly_horizon"] == 2 * (1 + 2 * 1)  # none: the chained stages' total (--ssl-iters 2)
    assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")
    main("--dry-run", "--seg-init", "init", "--out", tmp_path / "b")  # none: each stage's own length
    assert json.load(open(tmp_path / "b" / "config.json"))["args"]["poly_horizon"] is None


# ---------------------------------------------------------------------------------------------- whole runs
STRAIGHT = ["--outer-rounds", 1, "--ssl-iters", 2]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("bdl") / "straight"
    main(*STRAIGHT, "--out", out)
    return str(out)


def test_run_folder(straight):
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoints/last.pt", "checkpoints/cyclegan_r1.pt",
                 "checkpoints/seg_r1_s0.pt", "checkpoints/seg_r1_s1.pt", "translated/r1/done.json",
                 "translated/r1/00000.png", "pseudo/r1_s1/thresholds.json", "pseudo/r1_s1/00003.png"):
        assert os.path.isfile(os.path.join(straight, name)), name
    assert os.listdir(os.path.join(straight, "predictions"))
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["script"] == "bdl" and set(config["params"]) == {"model", "disc_main", "to_target", "to_source",
                                                                   "disc_target", "disc_source"}
    keys = set().union(*metrics(straight))
    assert {"gan_g", "cycle", "idt", "d_cyc", "seg_src", "adv_main", "d_main", "seg_pseudo", "lr", "val_miou"} <= keys
    results = json.load(open(os.path.join(straight, "results.json")))
    assert 0 <= results["miou"] <= 100 and results["iters"] == 3 and results["stage"] == "seg_r1_s1"


class Crash(Exception):
    pass


def crash_on_call(monkeypatch, name, n, when=lambda *a: True):
    """Make bdl.<name> raise on its n-th call that satisfies `when` (a kill at that point of the run)."""
    real, calls = getattr(bdl, name), []

    def fake(*args):
        if when(*args):
            calls.append(1)
            if len(calls) == n:
                raise Crash(name)
        return real(*args)
    monkeypatch.setattr(bdl, name, fake)


def test_killed_in_every_kind_of_stage_and_resumed_is_exact(straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed"
    args = [*STRAIGHT, "--out", out, "--resume", "auto"]
    with monkeypatch.context() as m:  # CycleGAN, in its third iteration (after the pools' first random draws)
        crash_on_call(m, "cyclegan_lr_factor", 3)
        with pytest.raises(Crash):
            main(*args, "--stage", "cyclegan")
    main(*args, "--stage", "cyclegan")  # alone, resumed at 2
    with monkeypatch.context() as m:  # translation, after one image
        crash_on_call(m, "translate", 2)
        with pytest.raises(Crash):
            main(*args, "--stage", "translate")
    main(*args, "--stage", "translate")  # alone, from its start
    capsys.readouterr()
    with monkeypatch.context() as m:  # pseudo labels, while writing
        crash_on_call(m, "apply_thresholds", 2)
        with pytest.raises(Crash):
            main(*args)
    log = capsys.readouterr().out
    assert "stage cyclegan_r1: done" in log and "stage translate_r1: done" in log  # cached: skipped
    with monkeypatch.context() as m:  # seg_r1_s1 (segmentation iterations 1 and 2), in its second iteration
        crash_on_call(m, "poly_lr", 1, when=lambda base, it, *rest: it == 2)
        with pytest.raises(Crash):
            main(*args)
    main(*args)
    log = capsys.readouterr().out
    assert "stage seg_r1_s0: done" in log and "stage seg_r1_s1 (resumed at 1)" in log
    for name, keys in (("cyclegan_r1.pt", ("to_target", "to_source")), ("seg_r1_s0.pt", ("model",)),
                       ("last.pt", ("model", "disc_main", "optimizer"))):
        a, b = load(straight, name), load(out, name)
        assert (a["stage"], a["iter"]) == (b["stage"], b["iter"])
        for key in keys:
            assert all(torch.equal(x, y) for x, y in zip(tensors(a[key]), tensors(b[key]), strict=True)), key
    assert json.load(open(out / "pseudo/r1_s1/thresholds.json")) == json.load(
        open(os.path.join(straight, "pseudo/r1_s1/thresholds.json")))
    # a stage alone, with its output there: nothing to do; without its inputs: one error line
    main(*args, "--stage", "seg", "--ssl-round", 1)
    assert "stage seg_r1_s1: done" in capsys.readouterr().out
    with pytest.raises(UserError, match="needs stage cyclegan_r1 first"):
        main("--stage", "seg", "--ssl-round", 1, "--out", tmp_path / "empty")
    # --eval-only on the final weights of the last stage
    main("--eval-only", "--weights", out / "checkpoints" / "seg_r1_s1.pt", "--out", tmp_path / "ev")
    assert os.path.isfile(tmp_path / "ev" / "results.json")


def test_torchrun_two_processes_whole_loop(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "collective_guard.py"), "bdl.py"]  # a host tensor in a collective fails
    run("--outer-rounds", 2, "--ssl-iters", 1, "--out", out, cmd=cmd)
    assert json.load(open(os.path.join(out, "config.json")))["args"]["world_size"] == 2
    assert json.load(open(os.path.join(out, "results.json")))["stage"] == "seg_r2_s1"
    assert {"sem", "sem_rec"} <= set().union(*metrics(out))  # round 2: perceptual loss from round 1's segmenter
    assert len([f for f in os.listdir(os.path.join(out, "pseudo", "r2_s1")) if f.endswith(".png")]) == 4
