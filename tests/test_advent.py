"""advent.py: self-information, entropy and ER's top-entropy selection on hand-made tensors; each mode's training
step against an independently written reference; the released files and the ImageNet init file (fixtures in the
official layouts) and the test-time ensemble against a hand computation; the paper preset against the official
configs, the SYNTHIA recipe and the refusal of flags that cannot act; smoke, resume and torchrun runs of the
script (quick preset on the toy domains at 64x128, 1-2 iterations, 2 eval images)."""
import copy
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import released
from conftest import ROOT

adv = importlib.import_module("advent")
from common.cli import UserError, field_docs  # noqa: E402
from common.data import CITYSCAPES_LABEL_IDS  # noqa: E402
from common.runtime import Runtime  # noqa: E402

TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "64", "128", "--target-size", "64", "128", "--eval-size", "64", "128",
        "--num-predictions", "1"]
# The smoke runs use running-statistics BN: their weights are then comparable with 2 torchrun processes x batch 1
# (train-mode BN takes per-process batch statistics, different by construction); train-mode BN is covered by the
# step tests and by test_sharded_evaluation_scores_the_checkpointed_network.
RUN = ["--iters", "2", "--bn-mode", "eval"]


def run(*args, cmd=None, check=True, tiny=True):
    cmd = cmd or [sys.executable, "advent.py"]
    proc = subprocess.run([*cmd, *(TINY if tiny else []), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py"), "advent.py"]


def torchrun(*args, tiny=True):
    """2 gloo processes under the collective guard (a host tensor in any collective fails the run)."""
    return run(*args, cmd=TORCHRUN, tiny=tiny)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final(out):
    return torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), proc.stderr[-3000:]


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
    batch = torch.cat([confident, unsure])
    assert adv.entropy_loss(batch, 0.5).item() == pytest.approx(want)
    # hence the same whatever the process split: 2 processes x 1 image average to 1 process x 2 images
    per_image = [adv.entropy_loss(image[None], 0.5).item() for image in batch]
    assert sum(per_image) / 2 == pytest.approx(want)


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


# ---------------------------------------------------------------------------------------------- the steps
# Hand-written references (official update order, advent/domain_adaptation/train_UDA.py): nothing below calls
# advent.py's losses; only the networks are shared.
C = 4  # classes of the step tests


def step_setup(seed=0):
    """A multi-level resnet18 DeepLab-v2 whose heads give confident, varied predictions (so that ER's selection
    and the entropy's gradient are far from the uniform plateau), a source batch with some 255 pixels and a
    target batch whose two images differ in contrast (so that their entropy rankings differ)."""
    torch.manual_seed(seed)
    model = adv.DeepLabV2("resnet18", C, multi_level=True)
    with torch.no_grad():
        for head in (model.head, model.aux_head):
            for conv in head.convs:
                conv.weight.normal_(0, 0.05)
    images, labels = torch.randn(2, 3, 32, 64), torch.randint(0, C, (2, 32, 64))
    labels[0, :5] = 255
    target = torch.randn(2, 3, 32, 64) * torch.tensor([3.0, 0.3]).view(2, 1, 1, 1)
    return model, images, labels, target


def ref_ce(logits, labels):
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True).log_softmax(1)
    valid = labels != 255
    return -up.gather(1, labels.clamp(max=C - 1)[:, None])[:, 0][valid].mean()


def ref_info(logits, size):
    """-P log2(P + 1e-30) / log2(C), P the softmax of the logits upsampled to the input size."""
    p = F.interpolate(logits, size=size, mode="bilinear", align_corners=True).softmax(1)
    return -p * torch.log2(p + 1e-30) / math.log2(C)


def ref_entropy(logits, size, fraction):
    per_pixel = ref_info(logits, size).sum(1).flatten(1)  # images x pixels
    if fraction is None:
        return per_pixel.mean()
    kept = round(fraction * per_pixel.shape[1])
    return torch.stack([row.sort(descending=True).values[:kept].mean() for row in per_pixel]).mean()


def ref_bce(d_logits, label):
    return (F.softplus(d_logits) - label * d_logits).mean()


class RefSGD:
    """SGD with momentum 0.9, weight decay 5e-4, heads at 10x the lr (torch.optim.SGD's update, by hand)."""

    def __init__(self, params, lr):
        self.params, self.lr, self.buf = params, lr, {}

    def step(self, grads):
        with torch.no_grad():
            for (name, p), g in zip(self.params, grads):
                d = g + 5e-4 * p
                self.buf[name] = d if name not in self.buf else 0.9 * self.buf[name] + d
                p -= self.lr * (10 if "head" in name else 1) * self.buf[name]


class RefAdam:
    """Adam, betas (0.9, 0.99), bias-corrected (torch.optim.Adam's update, by hand)."""

    def __init__(self, params, lr, eps):
        self.params, self.lr, self.eps, self.m, self.v, self.t = list(params), lr, eps, {}, {}, 0

    def step(self, grads):
        self.t += 1
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(self.params, grads)):
                self.m[i] = 0.9 * self.m.get(i, 0) + 0.1 * g
                self.v[i] = 0.99 * self.v.get(i, 0) + 0.01 * g * g
                m_hat, v_hat = self.m[i] / (1 - 0.9 ** self.t), self.v[i] / (1 - 0.99 ** self.t)
                p -= self.lr * m_hat / (v_hat.sqrt() + self.eps)


def assert_same_state(ours, theirs):
    for net_ours, net_theirs in zip(ours, theirs):
        a, b = net_ours.state_dict(), net_theirs.state_dict()
        bad = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5)]
        assert not bad, f"{len(bad)} tensors differ from the reference, e.g. {bad[:4]}"


@pytest.mark.parametrize("fraction", [None, 0.3], ids=["minent", "minent_er"])
def test_minent_step_matches_an_independent_reference(fraction):
    """Two real iterations of main()'s MinEnt step against a hand-written one: CE(main) + 0.1 CE(aux) on the source
    batch, 1.0 Ent(main_t) + 0.4 Ent(aux_t) on the target batch (with ER: the mean over each image's 30%
    highest-entropy pixels, ranked per image and per output), one SGD step; frozen BN affine, batch statistics."""
    model, images, labels, target = step_setup()
    reference = copy.deepcopy(model)
    # lr 1e-3: at 1e-2 (heads 1e-1) the first update on these random batches lifts the loss from 4 to 23, and the
    # second iteration then amplifies 1e-8 rounding differences to 8e-5 in the weights (measured): ill-conditioned
    lr = 1e-3
    optimizer = torch.optim.SGD(model.param_groups(lr, 10), lr=lr, momentum=0.9, weight_decay=5e-4)
    rt = Runtime("cpu", amp=False)
    for _ in range(2):
        losses = adv.minent_step(model, optimizer, rt, images, labels, target, 0.1, {"main": 1.0, "aux": 0.4},
                                 fraction)
    assert set(losses) == {"seg_src", "seg_aux", "ent", "ent_aux"}

    params = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    sgd = RefSGD(params, lr)
    size = target.shape[-2:]
    for _ in range(2):
        aux_s, main_s = reference(images)
        aux_t, main_t = reference(target)
        loss = ref_ce(main_s, labels) + 0.1 * ref_ce(aux_s, labels) \
            + 1.0 * ref_entropy(main_t, size, fraction) + 0.4 * ref_entropy(aux_t, size, fraction)
        sgd.step(torch.autograd.grad(loss, [p for _, p in params]))
    assert_same_state([model], [reference])


def test_advent_step_matches_an_independent_reference():
    """Two real iterations of main()'s AdvEnt step against a hand-written one in the official order: source CE;
    the segmenter's adversarial term 0.3 BCE(D_main(I_t), 0) + 0.1 BCE(D_aux(I_t,aux), 0) with the discriminators
    frozen; each D on detached maps, 1/2 BCE(D(I_s), 0) + 1/2 BCE(D(I_t), 1), both with the weights from before
    this iteration's updates; then SGD for the segmenter and Adam for each D."""
    model, images, labels, target = step_setup()
    discs = {level: adv.FCDiscriminator(C, ndf=8) for level in ("aux", "main")}
    reference, ref_discs = copy.deepcopy(model), copy.deepcopy(discs)
    # Adam's eps at 1e-3 instead of main()'s 1e-8: some D gradients are ~1e-10, where Adam's g / (|g| + eps) turns
    # float rounding (1e-10 here) into a 1% change of the update; the update rule under test stays the same
    lr, lr_d, eps = 1e-3, 1e-3, 1e-3  # lr 1e-3: see the MinEnt test
    optimizer = torch.optim.SGD(model.param_groups(lr, 10), lr=lr, momentum=0.9, weight_decay=5e-4)
    d_optimizers = {level: torch.optim.Adam(d.parameters(), lr=lr_d, betas=(0.9, 0.99), eps=eps)
                    for level, d in discs.items()}
    rt = Runtime("cpu", amp=False)
    for _ in range(2):
        losses = adv.advent_step(model, discs, discs, optimizer, d_optimizers, rt, images, labels, target, 0.1,
                                 {"main": 0.3, "aux": 0.1})
    assert set(losses) == {"seg_src", "seg_aux", "adv_aux", "adv_main", "d_aux", "d_main"}

    params = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    sgd = RefSGD(params, lr)
    adams = {level: RefAdam(d.parameters(), lr_d, eps) for level, d in ref_discs.items()}
    weights = {"main": 0.3, "aux": 0.1}
    for _ in range(2):
        aux_s, main_s = reference(images)
        aux_t, main_t = reference(target)
        source_info = {"aux": ref_info(aux_s, images.shape[-2:]), "main": ref_info(main_s, images.shape[-2:])}
        target_info = {"aux": ref_info(aux_t, target.shape[-2:]), "main": ref_info(main_t, target.shape[-2:])}
        seg = ref_ce(main_s, labels) + 0.1 * ref_ce(aux_s, labels) + sum(
            weights[level] * ref_bce(ref_discs[level](target_info[level]), 0.0) for level in ("aux", "main"))
        seg_grads = torch.autograd.grad(seg, [p for _, p in params])
        d_grads = {level: torch.autograd.grad(
            0.5 * ref_bce(d(source_info[level].detach()), 0.0) + 0.5 * ref_bce(d(target_info[level].detach()), 1.0),
            list(d.parameters())) for level, d in ref_discs.items()}
        sgd.step(seg_grads)
        for level, adam in adams.items():
            adam.step(d_grads[level])
    assert_same_state([model, discs["aux"], discs["main"]], [reference, ref_discs["aux"], ref_discs["main"]])


# ---------------------------------------------------------------------------------------------- released files
ADVENT_RELEASES = ["gta2cityscapes_advent.pth", "gta2cityscapes_minent_ER.pth", "gta2cityscapes_advent_cyclegan.pth"]


def random_network(seed, backbone="resnet18", classes=19):
    """A multi-level DeepLab-v2 with every tensor random (so that a tensor in the wrong module would show)."""
    torch.manual_seed(seed)
    net = adv.DeepLabV2(backbone, classes, multi_level=True)
    with torch.no_grad():
        for head in (net.head, net.aux_head):
            for conv in head.convs:
                conv.weight.normal_(0, 0.05)
                conv.bias.normal_(0, 0.1)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def ours_checkpoint(path, net, classes=19, normalization="imagenet"):
    """A checkpoint as advent.py writes it (the fields read_weights and --eval-only read)."""
    torch.save({"script": "advent", "num_classes": classes, "iter": 7, "normalization": normalization,
                "args": {"backbone": "resnet18", "multi_level": True, "aspp_branches": 4, "stride_on": "1x1",
                         "mode": "advent"},
                "model": net.state_dict()}, path)


def parsed(*argv):
    return adv.parse_advent_args(list(map(str, argv)))


def loaded_network(args, found):
    """What main() builds and loads for --eval-only --weights."""
    net = adv.DeepLabV2(args.backbone, 19, args.multi_level, args.aspp_branches, args.bn_mode, args.stride_on)
    report = adv.load_matching(net, found["state"], "test", required=lambda k: True,
                               unused_ok=lambda k: ".convs.2." in k or ".convs.3." in k)
    return net, report


@pytest.mark.parametrize("name", [*ADVENT_RELEASES, "renamed.bin"])
def test_advent_releases_are_recognised_by_content_and_load_every_tensor(name, tmp_path):
    """The three released files: raw state dicts of ResNetMulti (layer5 aux on layer3, layer6 main), saved by
    torch 0.4.1 (BN num_batches_tracked present): 4 ASPP branches, Caffe input, stride on the 1x1; whatever the
    file is called."""
    reference = random_network(1)
    path = tmp_path / name
    torch.save(released.deeplab_release(reference.state_dict(), "advent"), path)
    args = parsed("--eval-only", "--weights", path)
    found, partner = adv.prepare_ensemble(args, None, 19)
    assert partner is None and found["kind"] == "ADVENT release"
    assert (args.normalization, args.stride_on, args.multi_level, args.aspp_branches, args.backbone) == (
        "caffe", "1x1", True, 4, "resnet18")
    net, report = loaded_network(args, found)
    assert report["unused"] == [] and report["missing"] == []
    theirs = reference.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("prefix", ["Scale", "backbone"])
def test_imagenet_init_file_loads_the_backbone(prefix, tmp_path):
    """DeepLab_resnet_pretrained_imagenet.pth (scripts/train.py:95-104): every key under one first component, which
    the official loader drops whatever it is, plus a `layer5` classifier it drops too; Caffe input."""
    reference = random_network(2)
    path = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(released.caffe_init(reference.state_dict(), prefix), path)
    args = parsed("--init", path)
    found, _ = adv.prepare_ensemble(args, None, 19)
    assert found["kind"] == "DeepLab-v2 Caffe init file (backbone)"
    assert (args.normalization, args.stride_on, args.backbone) == ("caffe", "1x1", "resnet18")
    net = adv.DeepLabV2(args.backbone, 19, args.multi_level, args.aspp_branches, args.bn_mode, args.stride_on)
    heads = {k: v.clone() for k, v in net.state_dict().items() if "head" in k}
    assert adv.load_init(net, args.init, args.backbone, found) == "caffe"
    ours, theirs = net.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if "head" not in k and "num_batches" not in k)
    assert all(torch.equal(ours[k], v) for k, v in heads.items())  # both heads stay at their random init


def test_ensemble_members_follow_their_own_files_and_typed_flags_apply_to_both(tmp_path, capsys):
    ours_checkpoint(tmp_path / "ours.pt", random_network(3))
    torch.save(released.deeplab_release(random_network(4).state_dict(), "advent"), tmp_path / "release.pth")
    args = parsed("--eval-only", "--weights", tmp_path / "ours.pt", "--weights", tmp_path / "release.pth")
    found, partner = adv.prepare_ensemble(args, None, 19)
    assert args.weights == [str(tmp_path / "ours.pt"), str(tmp_path / "release.pth")]
    assert (found["kind"], args.normalization) == ("advent checkpoint", "imagenet")
    assert (partner["found"]["kind"], partner["args"].normalization) == ("ADVENT release", "caffe")
    assert partner["loaded"]["normalization"] == "caffe" and partner["loaded"]["file"] == args.weights[1]
    capsys.readouterr()
    # a typed flag applies to both files; it warns for the one it contradicts
    args = parsed("--eval-only", "--weights", tmp_path / "ours.pt", "--weights", tmp_path / "release.pth",
                  "--normalization", "caffe")
    found, partner = adv.prepare_ensemble(args, None, 19)
    assert args.normalization == partner["args"].normalization == "caffe"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "contradicts advent checkpoint, which implies imagenet" in warnings[0]
    # `--normalization auto` typed is what each file implies
    args = parsed("--eval-only", "--weights", tmp_path / "ours.pt", "--weights", tmp_path / "release.pth",
                  "--normalization", "auto")
    found, partner = adv.prepare_ensemble(args, None, 19)
    assert (args.normalization, partner["args"].normalization) == ("imagenet", "caffe")


def test_wrong_files_are_refused_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.pth"
    torch.save({"a.weight": torch.zeros(2)}, garbage)
    other = tmp_path / "adaptsegnet.pt"
    torch.save({"script": "adaptsegnet", "num_classes": 19, "model": {}}, other)
    small = tmp_path / "eight_classes.pt"
    ours_checkpoint(small, random_network(5, classes=8), classes=8)
    good = tmp_path / "release.pth"
    torch.save(released.deeplab_release(random_network(6).state_dict(), "advent"), good)
    for files, message in (([garbage], "unrecognised layout"), ([good, garbage], "unrecognised layout"),
                           ([good, other], "written by adaptsegnet, not advent"),
                           ([small, good], "has 8 classes, this run has 19")):
        with pytest.raises(UserError, match=message):
            adv.prepare_ensemble(parsed("--eval-only", *[a for f in files for a in ("--weights", f)]), None, 19)
    with pytest.raises(UserError, match="3 --weights"):
        parsed("--eval-only", "--weights", good, "--weights", good, "--weights", good)


# ImageNet and Caffe normalisation written out by hand (datasets.md; base_dataset.py preprocess for Caffe)
IMAGENET_MEAN, IMAGENET_STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434])


def test_ensemble_equals_the_average_of_its_networks_logits(tmp_path):
    """The issue-18 check: --eval-only with one of our checkpoints (ImageNet input) and an ADVENT release (Caffe
    input), in one process and sharded over 2 torchrun processes, against a hand computation: each network's main
    logits on its own normalisation, upsampled to the label size (bilinear, align_corners=True), averaged
    0.5/0.5, argmax (eval_UDA.py eval_single); the saved predictions and the IoUs must match."""
    names = released.cityscapes_tree(str(tmp_path / "data"), n_val=2, n_train=1)
    net_a, net_b = random_network(11), random_network(12)
    ours_checkpoint(tmp_path / "advent_run.pt", net_a)
    torch.save(released.deeplab_release(net_b.state_dict(), "advent"), tmp_path / "gta2cityscapes_minent_ER.pth")
    common = ["--eval-only", "--weights", tmp_path / "advent_run.pt", "--weights",
              tmp_path / "gta2cityscapes_minent_ER.pth", "--data-root", tmp_path / "data", "--eval-size", 64, 128,
              "--num-workers", 0, "--device", "cpu", "--num-predictions", 0, "--batch-size", 2]  # 2: torchrun
    single = run(*common, "--out", tmp_path / "single", "--save-predictions", tmp_path / "preds1", tiny=False)
    torchrun(*common, "--out", tmp_path / "sharded", "--save-predictions", tmp_path / "preds2", tiny=False)
    assert "recognised advent checkpoint" in single.stdout
    assert "recognised ADVENT release: caffe input, stride on 1x1, multi-level: True, 4 ASPP branches" in single.stdout

    to_train_id = np.full(256, 255, np.int64)
    to_train_id[CITYSCAPES_LABEL_IDS] = np.arange(19)
    confusion = np.zeros((19, 19), np.int64)
    for name in names:
        image = Image.open(tmp_path / "data" / "cityscapes" / "leftImg8bit" / "val" / "frankfurt" /
                           f"{name}_leftImg8bit.png").convert("RGB").resize((128, 64), Image.BICUBIC)
        rgb = np.asarray(image, np.float64)
        label = torch.from_numpy(to_train_id[np.asarray(Image.open(
            tmp_path / "data" / "cityscapes" / "gtFine" / "val" / "frankfurt" / f"{name}_gtFine_labelIds.png"))])

        def logits(net, x):
            with torch.no_grad():
                main = net(torch.from_numpy(x.transpose(2, 0, 1).copy()).float()[None])[1]
            return F.interpolate(main, size=label.shape, mode="bilinear", align_corners=True)[0]

        imagenet, caffe = (rgb - IMAGENET_MEAN) / IMAGENET_STD, rgb[:, :, ::-1] - CAFFE_MEAN_BGR
        a, b = logits(net_a, imagenet), logits(net_b, caffe)
        mean = 0.5 * a + 0.5 * b
        pred = mean.argmax(0)
        top2 = mean.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-4  # pixels where float rounding cannot flip the argmax
        assert clear.float().mean() > 0.99
        # the check can fail: either network alone, or B on the wrong normalisation, predicts otherwise
        assert (a.argmax(0) != pred).any() and (b.argmax(0) != pred).any()
        assert (logits(net_b, imagenet).mul(0.5).add(0.5 * a).argmax(0) != pred).any()
        for folder in ("preds1", "preds2"):
            saved = torch.from_numpy(np.asarray(Image.open(tmp_path / folder / f"{name}_leftImg8bit.png")).astype(
                np.int64))
            assert torch.equal(saved[clear], torch.tensor(CITYSCAPES_LABEL_IDS)[pred][clear]), folder
        valid = label != 255
        np.add.at(confusion, (label[valid].numpy(), pred[valid].numpy()), 1)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.where(union > 0, 100 * np.diag(confusion) / np.maximum(union, 1), np.nan)
    for folder in ("single", "sharded"):
        results = json.loads((tmp_path / folder / "results.json").read_text())
        assert list(results["per_class_iou"].values()) == pytest.approx(list(iou), nan_ok=True, abs=1e-9), folder
        assert results["miou"] == pytest.approx(np.nanmean(iou))
        assert [(e["kind"], e["normalization"]) for e in results["loaded"]] == [
            ("advent checkpoint", "imagenet"), ("ADVENT release", "caffe")]
        assert results["weights"] == [str(tmp_path / "advent_run.pt"), str(tmp_path / "gta2cityscapes_minent_ER.pth")]
    config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert config["loaded"][1]["implied"]["aspp_branches"] == 4 and config["normalization"] == "imagenet"
    assert set(config["params"]) == {"model", "ensemble_member"}


# ---------------------------------------------------------------------------------------------- configuration
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
# with it normalization (auto: ImageNet mean/std; the official Caffe BGR mean with --init PATH) and stride_on (auto:
# the 3x3 where torchvision's weights learnt it; the official 1x1 with --init PATH); multi-level on SYNTHIA (DADA
# config.py:59 turns it off for the DADA paper; ADVENT #12 keeps the GTA5 setting).


def test_paper_preset_is_the_official_recipe(tmp_path):
    out = tmp_path / "paper"
    run("--preset", "paper", "--dry-run", "--num-workers", "0", "--out", out, tiny=False)  # builds the R101
    config = json.load(open(out / "config.json"))
    resolved = config["args"]
    assert {k: resolved[k] for k in OFFICIAL_GTA} == OFFICIAL_GTA
    assert (resolved["init"], resolved["normalization"], resolved["stride_on"]) == ("imagenet", "auto", "3x3")
    assert set(config["params"]) == {"model", "disc_aux", "disc_main"}
    assert config["params"]["model"]["trainable"] > 40_000_000
    syn = dataclasses.asdict(parsed("--source", "synthia"))
    syn["poly_horizon"] = syn["poly_horizon"] or syn["iters"]  # main()'s setup: none is the run length
    assert {k: syn[k] for k in OFFICIAL_SYNTHIA} == OFFICIAL_SYNTHIA


def refusal(*argv):
    with pytest.raises(UserError) as e:
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
    # (guard() turns these into one `error:` line: test_resume_continues_where_the_checkpoint_stopped runs one)


def test_every_field_has_help():
    docs = field_docs(adv.Args)
    for f in dataclasses.fields(adv.Args):
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f"{f.name} has no docstring"


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """AdvEnt, 2 iterations, started from an ADVENT release fixture through --init (a released model as a starting
    point: Caffe input, both heads loaded). Its confident heads keep the discriminators' gradients away from the
    near-cancellation of source and target terms that near-uniform maps of random heads give, where Adam's
    normalised step turns float rounding into visible weight differences between 1 and 2 processes."""
    folder = tmp_path_factory.mktemp("advent")
    init = folder / "gta2cityscapes_advent.pth"
    torch.save(released.deeplab_release(random_network(8, classes=8).state_dict(), "advent"), init)
    out = str(folder / "straight")
    args = ["--init", init]
    proc = run(*RUN, *args, "--out", out)
    return out, args, proc


@pytest.fixture(scope="module")
def minent(tmp_path_factory):
    """MinEnt+ER (the ensemble's MinEnt member, ADVENT #7), started from a DeepLab_resnet_pretrained_imagenet.pth
    fixture through --init: Caffe input from then on."""
    folder = tmp_path_factory.mktemp("minent")
    init = folder / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(released.caffe_init(random_network(9, classes=8).state_dict()), init)
    out = str(folder / "run")
    args = ["--mode", "minent", "--entropy-top-fraction", 0.3, "--init", init]
    proc = run(*RUN, *args, "--out", out)
    return out, args, proc


def test_smoke_run_folder(straight):
    straight, _, proc = straight
    assert "recognised ADVENT release: caffe input" in proc.stdout
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(straight, name)), name
    assert os.listdir(os.path.join(straight, "predictions"))
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["script"] == "advent" and set(config["params"]) == {"model", "disc_aux", "disc_main"}
    assert config["loaded"]["kind"] == "ADVENT release" and config["normalization"] == "caffe"
    rows = [r for r in metrics(straight) if "seg_src" in r]
    assert {"seg_src", "seg_aux", "adv_aux", "adv_main", "d_aux", "d_main", "lr"} <= set(rows[-1])
    assert json.load(open(os.path.join(straight, "results.json")))["iters"] == 2


def test_minent_er_run_from_the_imagenet_init_file(minent):
    out, _, proc = minent
    assert "recognised DeepLab-v2 Caffe init file (backbone): caffe input, stride on 1x1" in proc.stdout
    config = json.load(open(os.path.join(out, "config.json")))
    assert set(config["params"]) == {"model"}  # no discriminators
    assert config["args"]["entropy_top_fraction"] == 0.3 and config["normalization"] == "caffe"
    assert config["loaded"]["kind"] == "DeepLab-v2 Caffe init file (backbone)"
    keys = set(metrics(out)[0])
    assert {"seg_src", "seg_aux", "ent", "ent_aux"} <= keys and not keys & {"adv_main", "d_main"}
    ckpt = final(out)
    assert ckpt["normalization"] == "caffe" and not [k for k in ckpt if k.startswith("disc")]


def test_resume_continues_where_the_checkpoint_stopped(straight, tmp_path):
    """The resumed process says it starts at the checkpoint's iteration, logs only later iterations and ends with
    the uninterrupted run's networks (segmenter and discriminators); a silent restart would fail the first two."""
    straight, args, _ = straight
    out = str(tmp_path / "resumed")
    run("--iters", 1, "--poly-horizon", 2, "--bn-mode", "eval", *args, "--out", out)  # stopped after 1 of 2
    rows_before = len(metrics(out))
    assert_one_line_error(run(*RUN, *args, "--mode", "minent", "--out", out, "--resume", "auto", check=False),
                          "trained with --mode advent, not minent")
    resumed = run(*RUN, *args, "--out", out, "--resume", "auto")
    assert "at iteration 1" in resumed.stdout
    new_rows = [r for r in metrics(out)[rows_before:] if "seg_src" in r]
    assert [r["iter"] for r in new_rows] == [2]
    a, b = final(straight), final(out)
    for key in ("model", "disc_aux", "disc_main"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


def assert_close_networks(a, b, keys):
    for key in keys:
        bad = [n for n in a[key] if not torch.allclose(a[key][n].float(), b[key][n].float(), rtol=1e-4, atol=1e-6)]
        assert not bad, f"{key}: {bad[:4]}"


def test_two_processes_equal_one_process_advent(straight, tmp_path):
    """2 processes x batch 1 end with the networks of 1 process x batch 2, discriminators included (each D is
    DDP-wrapped for its own loss; the segmenter's adversarial term goes through the unwrapped, frozen D)."""
    straight, args, _ = straight
    out = tmp_path / "ddp"
    torchrun(*RUN, *args, "--out", out)
    assert_close_networks(final(straight), final(out), ("model", "disc_aux", "disc_main"))
    assert json.loads((out / "config.json").read_text())["args"]["world_size"] == 2
    assert len([r for r in metrics(out) if "seg_src" in r]) == 2  # rank 0 alone logs


def test_two_processes_equal_one_process_minent_er(minent, tmp_path):
    """ER ranks each image's pixels on its own: 2 processes x 1 image give the step of 1 process x 2 images."""
    single, args, _ = minent
    out = tmp_path / "ddp"
    torchrun(*RUN, *args, "--out", out)
    assert_close_networks(final(single), final(out), ("model",))


def test_sharded_evaluation_scores_the_checkpointed_network(tmp_path):
    """Train-mode BN: each rank's running statistics come from its own images; the final (sharded) evaluation of a
    torchrun run must score what rank 0 checkpoints, i.e. equal --eval-only of that checkpoint in one process."""
    out, again = tmp_path / "ddp", tmp_path / "again"
    torchrun("--iters", 1, "--mode", "minent", "--out", out)
    run("--eval-only", "--weights", out / "checkpoints" / "last.pt", "--out", again)
    assert json.loads((out / "results.json").read_text())["per_class_iou"] == \
        json.loads((again / "results.json").read_text())["per_class_iou"]
