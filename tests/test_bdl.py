"""bdl.py: losses on hand-made tensors, the pseudo-label rule against SSL.py's direct computation, the CycleGAN
schedule and the global image pool, which parameters each update may change, the paper preset against the official
recipe, and runs of the whole stage loop (toy domains at 32x64, 1-3 iterations per stage, 4 source/target train
images, 2 eval images): straight, interrupted at every kind of stage and resumed, and under torchrun."""
import copy
import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
bdl = importlib.import_module("bdl")
from common.cli import UserError, field_docs  # noqa: E402
from common.data import SegDataset, domain_split, normalize  # noqa: E402
from common.runtime import Runtime  # noqa: E402
import released  # noqa: E402

# 5 CycleGAN iterations (lr factors 1, 1, 1, 1, 0), a pool of 2 that starts swapping at the second iteration
TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "32", "64", "--target-size", "32", "64", "--eval-size", "32", "64", "--num-predictions", "1",
        "--source-limit", "4", "--target-limit", "4", "--cyclegan-crop", "32", "32", "--cyclegan-epochs", "5",
        "--cyclegan-decay-epochs", "0", "--cyclegan-epoch-iters", "1", "--pool-size", "2", "--iters", "1",
        "--ssl-rounds", "1", "--ngf", "4", "--ndf", "4", "--gen-blocks", "1", "--checkpoint-every", "1"]


def run(*args, cmd=None):
    """bdl.py with TINY in a subprocess (torchrun)."""
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
# The tests' Adams take eps 100 (CycleGAN, BDL: 1e-8): with eps 1e-8 a step is about +-lr whatever the gradient's
# size (so a wrong loss weight would hardly show), and the rounding noise of a gradient that is 0 in exact
# arithmetic (a conv bias right before an instance norm) becomes a full step of +-lr. With eps 100 a step is
# lr/100 x the bias-corrected first moment (over the second's root plus 100): it follows the gradient's size.
ADAM_EPS = 100.0


def adam_update(params, grads, state, lr, betas, eps):
    """torch.optim.Adam without weight decay, written out: bias-corrected first and second moments."""
    with torch.no_grad():
        for (name, p), g in zip(params, grads):
            m, v, t = state.get(name, (torch.zeros_like(p), torch.zeros_like(p), 0))
            m, v, t = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g, t + 1
            state[name] = (m, v, t)
            p -= lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def assert_same_state(module, reference, grads=None):
    """Every parameter and buffer of `module` equals the reference's; grads: {name: the reference's last gradient}
    for the parameters that must hold one (the others must hold none). Gradients are compared to 1e-4 of the
    network's largest one: a conv bias right before an instance norm has no effect (the norm subtracts it), so its
    gradient is rounding noise, and an L1 loss or a ReLU turns rounding differences into sign flips."""
    ours, theirs = module.state_dict(), reference.state_dict()
    for k in ours:
        assert torch.allclose(ours[k].float(), theirs[k].float(), rtol=1e-5, atol=1e-6), k
    scale = max((float(g.abs().max()) for g in (grads or {}).values()), default=0.0)
    for name, p in module.named_parameters():
        if grads is None or name not in grads:
            assert p.grad is None, f"{name} got a gradient"
        else:
            assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-4 * scale), f"gradient of {name}"


@pytest.mark.parametrize("with_segmenter", [False, True], ids=["round1", "round2-perceptual"])
def test_cyclegan_step_matches_an_independent_reference(with_segmenter):
    """Two iterations of cyclegan_step against cycle_gan_model.py's update written out by hand: G's loss (LSGAN
    through D frozen, cycle L1 x10, identity L1 x5 (0.5 x 10), from round 2 the perceptual MSE of instance-normalised
    stride-8 logits of the frozen, eval-mode segmenter on Caffe input: x0.1 image vs translation, x10 image vs
    reconstruction) and its Adam step; then each D on real vs a pooled, detached fake, 1/2 (LSGAN(real, 1) +
    LSGAN(fake, 0)), and D's Adam step. The pool (size 1, batch 2) swaps in both iterations here, so a bypassed pool
    changes D; the segmenter comes in trainable and in train mode: the step must freeze it."""
    torch.manual_seed(0)
    translators = bdl.Translators(4, 1)
    discs = torch.nn.ModuleDict({"target": bdl.PatchDiscriminator(4), "source": bdl.PatchDiscriminator(4)})
    segmenter = bdl.DeepLabV2("resnet18", 5) if with_segmenter else None
    reference = copy.deepcopy((translators, discs, segmenter))
    batches = [(torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1) for _ in range(2)]
    lr, betas, eps, pool_size = 0.01, (0.5, 0.999), ADAM_EPS, 1
    weights = {"cycle": 10.0, "idt": 5.0, "sem": 0.1, "sem_rec": 10.0}
    opt_g = torch.optim.Adam([{"params": translators.parameters(), "lr_mult": 1.0}], lr=lr, betas=betas, eps=eps)
    opt_d = torch.optim.Adam([{"params": discs.parameters(), "lr_mult": 1.0}], lr=lr, betas=betas, eps=eps)
    pools = {"target": bdl.ImagePool(pool_size, "cpu"), "source": bdl.ImagePool(pool_size, "cpu")}
    rt = Runtime("cpu", amp=False)
    for step, (real_s, real_t) in enumerate(batches):
        torch.manual_seed(100 + step)  # the pools' draws
        bdl.cyclegan_step(translators, discs, discs, opt_g, opt_d, pools, rt, real_s, real_t, segmenter, "caffe",
                          weights)

    gens, ds, seg = reference
    G, F_, D_Y, D_X = gens.to_target, gens.to_source, ds["target"], ds["source"]  # the paper's names
    if seg is not None:
        seg.eval()
    caffe_mean = torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1)

    def features(x):  # img_preprocess (RGB [-1, 1] -> BGR 0..255 minus the Caffe mean), then the stride-8 logits
        return seg((x.flip(1) + 1) * 127.5 - caffe_mean)[1]

    def perceptual(a, b):
        return ((F.instance_norm(features(a)) - F.instance_norm(features(b))) ** 2).mean()

    def lsgan(logits, target):
        return ((logits - target) ** 2).mean()

    stored = {"target": [], "source": []}
    swaps = []

    def pool(name, images):  # util/image_pool.py, drawing from torch's RNG
        out = []
        for image in images:
            if len(stored[name]) < pool_size:
                stored[name].append(image.clone())
                out.append(image)
            elif torch.rand(1).item() < 0.5:
                k = int(torch.randint(len(stored[name]), (1,)))
                out.append(stored[name][k].clone())
                stored[name][k] = image.clone()
                swaps.append(step)
            else:
                out.append(image)
        return torch.stack(out)

    g_params = [(n, p) for n, p in gens.named_parameters()]
    d_params = [(n, p) for n, p in ds.named_parameters()]
    g_state, d_state = {}, {}
    for step, (real_s, real_t) in enumerate(batches):
        torch.manual_seed(100 + step)
        fake_t, fake_s = G(real_s), F_(real_t)
        rec_s, rec_t = F_(fake_t), G(fake_s)
        loss_g = (lsgan(D_Y(fake_t), 1.0) + lsgan(D_X(fake_s), 1.0)
                  + 10 * ((rec_s - real_s).abs().mean() + (rec_t - real_t).abs().mean())
                  + 5 * ((G(real_t) - real_t).abs().mean() + (F_(real_s) - real_s).abs().mean()))
        if seg is not None:
            loss_g = (loss_g + 0.1 * (perceptual(fake_t, real_s) + perceptual(fake_s, real_t))
                      + 10 * (perceptual(rec_s, real_s) + perceptual(rec_t, real_t)))
        g_grads = torch.autograd.grad(loss_g, [p for _, p in g_params])
        adam_update(g_params, g_grads, g_state, lr, betas, eps)
        pooled_t, pooled_s = pool("target", fake_t.detach()), pool("source", fake_s.detach())
        loss_d = (0.5 * (lsgan(D_Y(real_t), 1.0) + lsgan(D_Y(pooled_t), 0.0))
                  + 0.5 * (lsgan(D_X(real_s), 1.0) + lsgan(D_X(pooled_s), 0.0)))
        d_grads = torch.autograd.grad(loss_d, [p for _, p in d_params])
        adam_update(d_params, d_grads, d_state, lr, betas, eps)
    assert set(swaps) == {0, 1}  # the pool handed D a stored fake in each iteration
    assert_same_state(translators, gens, dict(zip([n for n, _ in g_params], g_grads)))
    assert_same_state(discs, ds, dict(zip([n for n, _ in d_params], d_grads)))
    if seg is not None:  # frozen: no gradient, eval mode, running statistics untouched
        assert not segmenter.training
        assert_same_state(segmenter, seg)


@pytest.mark.parametrize("ssl", [False, True], ids=["round0", "pseudo-labels"])
def test_segmenter_step_matches_an_independent_reference(ssl):
    """Two iterations of segmenter_step against BDL.py's update written out by hand: CE on the source; on the target
    lambda_adv x BCE(D(softmax of the upsampled logits), source = 0) with D frozen, plus CE on the pseudo labels in
    the self-supervised rounds only; D: 1/2 BCE(D(source map), 0) + 1/2 BCE(D(target map), 1) on detached maps;
    SGD (momentum 0.9, weight decay, heads x10, frozen BN affine, batch statistics) and D's Adam (0.9, 0.99)."""
    torch.manual_seed(0)
    model, disc = bdl.DeepLabV2("resnet18", 4), bdl.FCDiscriminator(4, ndf=8)
    ref_model, ref_disc = copy.deepcopy(model), copy.deepcopy(disc)
    # lr 1e-3: at 1e-2 (heads 1e-1) the first update on these random batches lifts the loss from 1.4 to 7, and the
    # second iteration's gradient then amplifies 1e-8 rounding differences to 5e-3 (measured): ill-conditioned, not wrong
    lr, lr_d, wd, momentum, lambda_adv = 1e-3, 10.0, 5e-4, 0.9, 0.2
    optimizer = torch.optim.SGD(model.param_groups(lr, 10), lr=lr, momentum=momentum, weight_decay=wd)
    d_optimizer = torch.optim.Adam([{"params": disc.parameters(), "lr_mult": 1.0}], lr=lr_d, betas=(0.9, 0.99),
                                   eps=ADAM_EPS)
    images, target_images = torch.randn(2, 3, 33, 49), torch.randn(2, 3, 33, 49)
    labels, pseudo = torch.randint(0, 4, (2, 33, 49)), torch.randint(0, 4, (2, 33, 49))
    labels[0, :5], pseudo[1, 10:] = 255, 255
    rt = Runtime("cpu", amp=False)
    for _ in range(2):
        bdl.segmenter_step(model, disc, disc, optimizer, d_optimizer, rt, images, labels, target_images,
                           pseudo if ssl else None, lambda_adv)

    def up(logits):
        return F.interpolate(logits, size=(33, 49), mode="bilinear", align_corners=True)

    def ce(logits, target):
        valid = target != 255
        return -up(logits).log_softmax(1).gather(1, target.clamp(max=3)[:, None])[:, 0][valid].mean()

    def bce(logits, label):
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    params = [(n, p) for n, p in ref_model.named_parameters() if p.requires_grad]
    d_params = list(ref_disc.named_parameters())
    momentum_buffers, d_state = {}, {}
    for _ in range(2):
        source_main = ref_model(images)[1]
        target_main = ref_model(target_images)[1]
        target_map = up(target_main).softmax(1)
        loss = ce(source_main, labels) + lambda_adv * bce(ref_disc(target_map), 0.0)
        if ssl:
            loss = loss + ce(target_main, pseudo)
        grads = torch.autograd.grad(loss, [p for _, p in params])  # D's parameters are not among the inputs
        loss_d = 0.5 * (bce(ref_disc(up(source_main.detach()).softmax(1)), 0.0)
                        + bce(ref_disc(target_map.detach()), 1.0))
        d_grads = torch.autograd.grad(loss_d, [p for _, p in d_params])
        with torch.no_grad():
            for (name, p), g in zip(params, grads):
                d = g + wd * p
                momentum_buffers[name] = d if name not in momentum_buffers else momentum * momentum_buffers[name] + d
                p -= lr * (10 if "head" in name else 1) * momentum_buffers[name]
        adam_update(d_params, d_grads, d_state, lr_d, (0.9, 0.99), ADAM_EPS)
    assert_same_state(model, ref_model, dict(zip([n for n, _ in params], grads)))
    assert_same_state(disc, ref_disc, dict(zip([n for n, _ in d_params], d_grads)))


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


# ---------------------------------------------------------------------------------------------- released files
# Layouts (../shared/reference/released-models.md, BDL a0e5821): GTA5_deeplab (gta_2_city_deeplab.pth),
# SYNTHIA_deeplab (19-way), SSL_step1/SSL_step2 (M_0/M_1 of round 2): raw state dicts of model/deeplab.py's ResNet101
# (torchvision-style names, one `layer5` head holding 4 convs of which the pre-37af0e7 forward sums 2), saved by
# torch 0.4.0 (no BN num_batches_tracked); "DeepLab-V2" (the init): the same keys under one prefix, which
# model/deeplab.py:246-254 drops together with the 19-class layer5. Caffe input. Random values, our own networks.
def bdl_release(backbone="resnet50", num_classes=19):
    """(a DeepLabV2 with random weights and BN statistics, that network saved in BDL's release layout)."""
    torch.manual_seed(0)
    model = bdl.DeepLabV2(backbone, num_classes)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, released.deeplab_release(model.state_dict(), "bdl")


def two_branch_copy(model, backbone="resnet50", num_classes=19):
    """The network the official pre-37af0e7 forward computes from the same weights: the first 2 ASPP convs summed."""
    out = bdl.DeepLabV2(backbone, num_classes, aspp_branches=2)
    out.load_state_dict(model.state_dict(), strict=False)
    return out.eval()


def test_bdl_files_are_recognised_and_land_in_the_right_modules(tmp_path):
    reference, release = bdl_release()
    path = tmp_path / "gta_2_city_deeplab.pth"
    torch.save(release, path)
    found = bdl.read_weights(str(path))
    assert found["kind"] == "single-head release (BDL, AdaptSegNet single-level)"
    assert found["implied"] == {"normalization": "caffe", "stride_on": "1x1", "multi_level": False, "aspp_branches": 2,
                                "backbone": "resnet50"}
    model = bdl.DeepLabV2("resnet50", 19, aspp_branches=2)
    report = bdl.load_matching(model, found["state"], "release", required=lambda k: True)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items() if k in ours)
    assert set(report["unused"]) == {f"head.convs.{i}.{p}" for i in (2, 3) for p in ("weight", "bias")}
    # "DeepLab-V2", the init: prefixed; the backbone loads, the 19-class layer5 is dropped (the head stays random)
    init = tmp_path / "DeepLab_init.pth"
    torch.save({f"Scale.{k}": v for k, v in release.items()}, init)
    found = bdl.read_weights(str(init))
    assert found["kind"] == "DeepLab-v2 Caffe init file (backbone)" and found["implied"]["normalization"] == "caffe"
    model = bdl.DeepLabV2("resnet50", 19, aspp_branches=2)
    head = model.head.convs[0].weight.clone()
    assert bdl.load_init(model, str(init), "resnet50", found) == "caffe"
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items() if "head" not in k)
    assert torch.equal(model.head.convs[0].weight, head)


def expected_cityscapes_prediction(model, data_root, name):
    """The official evaluation.py of one val image, written out: bicubic 1024x512 (here 64x32), Caffe BGR minus the
    mean, softmax of the stride-8 logits upsampled bilinearly (align_corners) to the label size, argmax, label ids."""
    from common.data import CITYSCAPES_LABEL_IDS, read_image, resize_image
    image = resize_image(read_image(os.path.join(data_root, "cityscapes", "leftImg8bit", "val", "frankfurt",
                                                 f"{name}_leftImg8bit.png")), (32, 64))
    bgr = torch.from_numpy(image[..., ::-1].astype(np.float32).copy()).permute(2, 0, 1)[None]
    x = bgr - torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = F.interpolate(model(x)[1].softmax(1), size=(64, 128), mode="bilinear", align_corners=True)
    return np.asarray(CITYSCAPES_LABEL_IDS)[probs.argmax(1)[0].numpy()]


@pytest.mark.parametrize("source", ["gta", "synthia"])
def test_released_model_evaluates_through_eval_only(source, tmp_path, capsys):
    """--eval-only --weights <GTA5_deeplab | SYNTHIA_deeplab> with no network flag on a tiny Cityscapes folder: the
    file is recognised, its quirks applied, printed and recorded, the evaluation upsamples the softmax (the paper
    preset's default, as evaluation.py), and every saved prediction is what the official evaluation computes from
    the file's weights; SYNTHIA's 19-way model is also scored on the 16/13 classes."""
    names = released.cityscapes_tree(str(tmp_path / "data"))
    reference, release = bdl_release()
    path = tmp_path / f"{source}_2_city_deeplab.pth"
    torch.save(release, path)
    out, preds = tmp_path / "eval", tmp_path / "preds"
    main("--source", source, "--eval-only", "--weights", path, "--data-root", tmp_path / "data", "--eval-size", 32, 64,
         "--num-workers", 0, "--device", "cpu", "--out", out, "--save-predictions", preds, tiny=False)
    assert "recognised single-head release (BDL, AdaptSegNet single-level): caffe input, stride on 1x1, 2 ASPP branches" in capsys.readouterr().out
    config, results = (json.load(open(out / f)) for f in ("config.json", "results.json"))
    assert (config["args"]["aspp_branches"], config["args"]["eval_upsample"], config["normalization"]) == \
        (2, "softmax", "caffe")
    assert results["loaded"]["kind"] == "single-head release (BDL, AdaptSegNet single-level)" and results["loaded"]["implied"]["backbone"] == "resnet50"
    assert ("miou13" in results) == (source == "synthia")
    expected = two_branch_copy(reference)
    for name in names:
        saved = np.asarray(Image.open(preds / f"{name}_leftImg8bit.png"))
        assert (saved == expected_cityscapes_prediction(expected, str(tmp_path / "data"), name)).all(), name


def test_wrong_files_are_one_line_errors(tmp_path):
    args = ["--eval-only", "--num-workers", 0, "--device", "cpu", "--out", tmp_path / "e"]
    garbage = tmp_path / "garbage.pth"
    torch.save({"a.weight": torch.zeros(2)}, garbage)
    with pytest.raises(UserError, match="unrecognised layout.*AdaptSegNet/ADVENT/BDL releases"):
        main(*args, "--weights", garbage, tiny=False)
    translator = tmp_path / "cyclegan_r1.pt"
    torch.save({"script": "bdl", "num_classes": 19, "stage": "cyclegan_r1", "to_target": {}}, translator)
    with pytest.raises(UserError, match="holds no segmenter .*stage cyclegan_r1"):
        main(*args, "--weights", translator, tiny=False)
    multi = tmp_path / "GTA2Cityscapes_multi.pth"  # AdaptSegNet's: an aux head BDL's segmenter does not have
    torch.save(released.deeplab_release(bdl.DeepLabV2("resnet18", 19, multi_level=True).state_dict(), "adaptsegnet"),
               multi)
    with pytest.raises(UserError, match="does not fit this network.*aux_head"):
        main(*args, "--weights", multi, tiny=False)


def test_released_segmenters_start_the_segmentation_stages_and_label_the_target(straight, tmp_path, capsys):
    """SSL_step1 (a BDL release) as --init: the fresh segmentation stage starts from every tensor of it (lr 0 and
    running BN statistics here, so the stage's output is the file); as --stage pseudo --weights: it labels the target
    instead of the previous stage, with the Caffe input the file implies, and the stage after it trains on them."""
    reference, release = bdl_release("resnet18", 8)  # the toy pair's 8 classes
    path = tmp_path / "SSL_step1.pth"
    torch.save(release, path)
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for name in ("seg_r1_s0.pt", "seg_r1_s1.pt", "last.pt"):
        os.remove(out / "checkpoints" / name)
    main(*STRAIGHT, "--stage", "seg", "--init", path, "--lr", 0, "--lr-d", 0, "--bn-mode", "eval", "--out", out)
    assert "recognised single-head release (BDL, AdaptSegNet single-level): caffe input, stride on 1x1, 2 ASPP branches" in capsys.readouterr().out
    trained = load(out, "seg_r1_s0.pt")["model"]
    assert all(torch.equal(trained[k], v) for k, v in two_branch_copy(reference, "resnet18", 8).state_dict().items())
    assert json.load(open(out / "config.json"))["loaded"]["kind"] == "single-head release (BDL, AdaptSegNet single-level)"

    main(*STRAIGHT, "--stage", "pseudo", "--ssl-round", 1, "--weights", path, "--out", out)
    split = domain_split("toy-real", "train", labelled=False)
    split = dataclasses.replace(split, images=split.images[:4], labels=split.labels[:4])
    expected = two_branch_copy(reference, "resnet18", 8)
    os.makedirs(tmp_path / "want")
    with torch.no_grad():
        want = bdl.generate_pseudo_labels(lambda x: expected(normalize(x, "caffe"))[1], split, (32, 64),
                                          str(tmp_path / "want"), Runtime("cpu"), 8)
    assert list(json.load(open(out / "pseudo" / "r1_s1" / "thresholds.json")).values()) == want
    # the official SSL run: the released model's pseudo labels, the segmenter from the init (README --init-weights)
    main(*STRAIGHT, "--stage", "seg", "--ssl-round", 1, "--seg-init", "init", "--init", path, "--out", out)
    assert load(out, "seg_r1_s1.pt")["stage"] == "seg_r1_s1"
    with pytest.raises(UserError, match="--weights is read by --eval-only and --stage pseudo"):
        main(*STRAIGHT, "--stage", "seg", "--weights", path, "--out", out)


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
    rows = metrics(straight)
    keys = set().union(*rows)
    assert {"gan_g", "cycle", "idt", "d_cyc", "seg_src", "adv_main", "d_main", "seg_pseudo", "lr", "val_miou"} <= keys
    # the pseudo-label term only in the self-supervised stage
    assert {r["ssl_round"] for r in rows if "seg_pseudo" in r} == {1}
    assert {r["ssl_round"] for r in rows if "seg_src" in r} == {0, 1}
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
    """Interrupted in each kind of stage and continued with --resume auto: the stage in progress goes on from
    last.pt (it says so, and logs only the iterations after the checkpoint's), finished stages are skipped, the
    translation and pseudo-label stages start over; the final weights, every stage output and the thresholds equal
    the uninterrupted run's. (The run is deterministic: a silent restart of a stage from 0 would end with the same
    weights too, and fails the message and logged-iteration checks.)"""
    out = tmp_path / "killed"
    args = [*STRAIGHT, "--out", out, "--resume", "auto"]

    def rows(key):
        return [r["iter"] for r in metrics(out) if key in r]

    with monkeypatch.context() as m:  # CycleGAN, in its third iteration (after the pools' first random draws)
        crash_on_call(m, "cyclegan_lr_factor", 3)
        with pytest.raises(Crash):
            main(*args, "--stage", "cyclegan")
    assert rows("gan_g") == [1, 2] and load(out, "last.pt")["iter"] == 2
    capsys.readouterr()
    main(*args, "--stage", "cyclegan")  # alone, resumed at 2
    last = out / "checkpoints" / "last.pt"
    assert f"stage cyclegan_r1: resumed from {last} at iteration 2" in capsys.readouterr().out
    assert rows("gan_g") == [1, 2, 3, 4, 5]  # the resumed process logged 3, 4, 5 only
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
    assert "resumed" not in log  # last.pt holds the finished CycleGAN: nothing to continue
    with monkeypatch.context() as m:  # seg_r1_s1 (segmentation iterations 2 and 3), in its second iteration
        crash_on_call(m, "poly_lr", 1, when=lambda base, it, *rest: it == 2)
        with pytest.raises(Crash):
            main(*args)
    assert rows("seg_pseudo") == [2] and load(out, "last.pt")["iter"] == 1
    main(*args)
    log = capsys.readouterr().out
    assert "stage seg_r1_s0: done" in log
    assert f"stage seg_r1_s1: resumed from {last} at iteration 1" in log
    assert rows("seg_pseudo") == [2, 3]  # the resumed process logged iteration 3 only (seg_r1_s0 has 1)
    for name, keys in (("cyclegan_r1.pt", ("to_target", "to_source")), ("seg_r1_s0.pt", ("model",)),
                       ("last.pt", ("model", "disc_main", "optimizer", "optimizer_d_main"))):
        a, b = load(straight, name), load(out, name)
        assert (a["stage"], a["iter"]) == (b["stage"], b["iter"])
        for key in keys:
            assert all(torch.equal(x, y) for x, y in zip(tensors(a[key]), tensors(b[key]), strict=True)), key
    assert json.load(open(out / "pseudo/r1_s1/thresholds.json")) == json.load(
        open(os.path.join(straight, "pseudo/r1_s1/thresholds.json")))
    assert json.load(open(out / "results.json"))["per_class_iou"] == json.load(
        open(os.path.join(straight, "results.json")))["per_class_iou"]
    # a stage alone, with its output there: nothing to do; without its inputs: one error line
    main(*args, "--stage", "seg", "--ssl-round", 1)
    assert "stage seg_r1_s1: done" in capsys.readouterr().out
    with pytest.raises(UserError, match="needs stage translate_r1 first"):
        main("--stage", "seg", "--ssl-round", 1, "--out", tmp_path / "empty")
    # --eval-only on the final weights of the last stage
    main("--eval-only", "--weights", out / "checkpoints" / "seg_r1_s1.pt", "--out", tmp_path / "ev")
    assert json.load(open(tmp_path / "ev" / "results.json"))["per_class_iou"] == json.load(
        open(out / "results.json"))["per_class_iou"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py"), "bdl.py"]  # a host tensor in a collective fails


def assert_close(a, b, what, atol=1e-6):
    pairs = list(zip(tensors(a), tensors(b), strict=True))
    assert all(torch.allclose(x.float(), y.float(), rtol=1e-4, atol=atol) for x, y in pairs), what


def test_torchrun_whole_loop_scores_its_checkpoint(tmp_path):
    """2 processes, train-mode BN, every kind of stage (translation and pseudo labels sharded over the ranks, the
    pseudo-label histograms all-reduced): rank 0 alone logs, every rank sees every pseudo label, and the
    evaluations, sharded over the ranks with rank 0's BN statistics, equal --eval-only of the checkpoints in one
    process."""
    out = tmp_path / "ddp"
    # S_0 long enough (8 iterations at lr 0.05) for the ranks' BN statistics to change predictions of 4 val images
    run("--outer-rounds", 1, "--ssl-iters", 1, "--iters", 8, "--lr", 0.05, "--eval-limit", 4, "--out", out,
        cmd=TORCHRUN)
    assert json.load(open(out / "config.json"))["args"]["world_size"] == 2
    results = json.load(open(out / "results.json"))
    assert results["stage"] == "seg_r1_s1"
    assert [r["iter"] for r in metrics(out) if "seg_src" in r] == list(range(1, 10))  # rank 0 only
    assert len([f for f in os.listdir(out / "pseudo" / "r1_s1") if f.endswith(".png")]) == 4
    main("--eval-only", "--weights", out / "checkpoints" / "seg_r1_s1.pt", "--eval-limit", 4, "--out",
         tmp_path / "single")
    assert json.load(open(tmp_path / "single" / "results.json"))["per_class_iou"] == results["per_class_iou"]
    # the in-stage evaluation at the end of S_0 too (the ranks' networks in memory: their BN statistics differ)
    main("--eval-only", "--weights", out / "checkpoints" / "seg_r1_s0.pt", "--eval-limit", 4, "--out", tmp_path / "s0")
    assert [r["val_miou"] for r in metrics(out) if "val_miou" in r and r["iter"] == 8] == [
        json.load(open(tmp_path / "s0" / "results.json"))["miou"]]


# Two rounds in one process with BN on running statistics (--bn-mode eval: in train mode each process normalises
# with its own image's statistics, which differ from the 2-image batch's by construction; instance norm, in the
# CycleGAN, is per image anyway). CycleGAN lr factors 1, 1, 1, 0 (the official off-by-one: the last epoch at 0), so
# that the pools' swaps of iteration 2 reach the generators through D in iteration 3.
TWO_ROUNDS = ["--outer-rounds", 2, "--ssl-rounds", 0, "--iters", 2, "--bn-mode", "eval", "--cyclegan-epochs", 4,
              "--cyclegan-epoch-iters", 1]


def instance_normalised_biases(module):
    """Names of the conv biases that an instance norm right after the conv subtracts again: they do not act, so
    their gradients are rounding noise, which Adam turns into steps of +-lr in any order of summation."""
    names = []
    for prefix, child in module.named_modules():
        if isinstance(child, torch.nn.Sequential):
            layers = list(child)
            names += [f"{prefix}.{i}.bias" for i, (a, b) in enumerate(zip(layers, layers[1:]))
                      if isinstance(a, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
                      and isinstance(b, torch.nn.InstanceNorm2d)]
    return set(names)


def test_two_processes_equal_one_process(tmp_path):
    """Round 2 (T^2 with the perceptual loss of S^1_0, its translation, S^2_0) rerun under torchrun, 2 processes x 1
    crop or image, equals the single process's batch of 2: the generators after 3 iterations (which saw the
    discriminators and the image pools, global under torchrun: all ranks' fakes in the single-process order), the
    translated images, the segmenter, the output-space discriminator and its Adam after 2 iterations (the source
    backward under no_sync, the target backward all-reducing the sum), and the final evaluation. Not compared: the
    conv biases an instance norm cancels."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    main(*TWO_ROUNDS, "--out", single)
    shutil.copytree(single, ddp)
    os.remove(ddp / "checkpoints" / "cyclegan_r2.pt")  # without its output the stage runs, and so do the later ones
    result = run(*TWO_ROUNDS, "--out", ddp, cmd=TORCHRUN)
    assert "stage seg_r1_s0: done" in result.stdout and "\nstage cyclegan_r2\n" in result.stdout
    assert {"sem", "sem_rec"} <= set().union(*metrics(ddp))  # round 2: the perceptual terms acted
    a, b = load(single, "cyclegan_r2.pt"), load(ddp, "cyclegan_r2.pt")
    idle = {name.split(".", 1)[1] for name in instance_normalised_biases(bdl.Translators(4, 1))}
    # Adam moves a weight by about +-lr per step (lr 1e-3 for T, 1e-4 for the output-space D), and rounding moves
    # that by a few percent where the gradient is small (measured: up to 2.4e-5 for T, 3.5e-6 for D): 0.1 lr
    for key in ("to_target", "to_source"):
        assert idle <= set(a[key])
        assert_close({k: v for k, v in a[key].items() if k not in idle},
                     {k: v for k, v in b[key].items() if k not in idle}, key, atol=1e-4)
    for name in sorted(os.listdir(single / "translated" / "r2")):
        if name.endswith(".png"):
            x, y = (np.asarray(Image.open(f / "translated" / "r2" / name), dtype=int) for f in (single, ddp))
            assert np.abs(x - y).max() <= 1, name  # uint8 rounding of generators equal within float tolerance
    a, b = load(single, "last.pt"), load(ddp, "last.pt")
    assert a["stage"] == b["stage"] == "seg_r2_s0" and a["iter"] == b["iter"] == 2
    assert_close(a["model"], b["model"], "segmenter (SGD)")
    assert_close(a["disc_main"], b["disc_main"], "output-space D (Adam, lr 1e-4)", atol=1e-5)
    assert_close(a["optimizer_d_main"], b["optimizer_d_main"], "D's Adam moments", atol=1e-8)
    assert json.load(open(ddp / "results.json"))["per_class_iou"] == pytest.approx(
        json.load(open(single / "results.json"))["per_class_iou"], abs=1e-6)
