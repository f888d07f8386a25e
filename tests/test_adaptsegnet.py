"""adaptsegnet.py: adversarial losses on hand-made tensors, the training step against an independent reference
(official update order), the paper preset against the official script, the released model and init file
(fixtures in the official layouts), single- vs multi-level against a weights file, resume, torchrun (2 gloo
processes under the collective guard), and smoke runs (quick preset on the toy domains at 64x128)."""
import copy
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
asn = importlib.import_module("adaptsegnet")
import released  # noqa: E402
from common.cli import UserError, field_docs, parse_args  # noqa: E402
from common.runtime import Runtime  # noqa: E402

TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "64", "128", "--target-size", "64", "128", "--eval-size", "64", "128",
        "--num-predictions", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py")]


def run(*args, cmd=None, check=True, tiny=True):
    cmd = cmd or [sys.executable, "adaptsegnet.py"]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.run([*cmd, *(TINY if tiny else []), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def torchrun(*args):
    """2 gloo processes under the collective guard (a host tensor in any collective fails the run)."""
    return run(*args, cmd=[*TORCHRUN, "adaptsegnet.py"])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint(out):
    return torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)


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
    # the D loss never sends gradient into the segmenter's maps
    src = torch.zeros(1, 1, 2, 2, requires_grad=True)
    assert not asn.discriminator_loss(identity, src, src * 2).requires_grad


def test_softmax_at():
    logits = torch.randn(2, 5, 4, 8, dtype=torch.bfloat16)
    prob = asn.softmax_at(logits, (16, 32))
    assert prob.shape == (2, 5, 16, 32) and prob.dtype == torch.float32
    want = F.interpolate(logits.float(), size=(16, 32), mode="bilinear", align_corners=True).softmax(1)
    assert torch.equal(prob, want)


# ---------------------------------------------------------------------------------------------- the update rule
def reference_step(model, discs, state, images, labels, target_images, lr, lr_d, lambda_seg_aux, lambda_adv, gan):
    """AdaptSegNet's iteration written out by hand, in the order of train_gta2cityscapes_multi.py: source
    CE(main) + lambda_seg_aux CE(aux) on logits upsampled to the labels; target forward; generator term
    sum lambda_adv[l] * loss(D_l(softmax(up(target_l))), 0), differentiated for the segmenter only; per D
    1/2 loss(D(softmax(up(source)) detached), 0) + 1/2 loss(D(softmax(up(target)) detached), 1), differentiated
    for D only; SGD (momentum 0.9, wd 5e-4, heads 10x) on the segmenter, Adam (0.9, 0.99) on each D."""
    wd, momentum, (beta1, beta2), eps = 5e-4, 0.9, (0.9, 0.99), 1e-8

    def up(logits, size):
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def ce(logits):
        logp = up(logits, labels.shape[-2:]).log_softmax(1)
        valid = labels != 255
        return -logp.gather(1, labels.clamp(max=logits.shape[1] - 1)[:, None])[:, 0][valid].mean()

    def adversarial(d_logits, label):  # BCE with logits by hand; least squares for --gan ls
        if gan == "ls":
            return ((d_logits - label) ** 2).mean()
        return (F.softplus(d_logits) if label == 0 else F.softplus(-d_logits)).mean()

    aux_s, main_s = model(images)
    aux_t, main_t = model(target_images)
    source = {"aux": aux_s, "main": main_s}
    target = {"aux": aux_t, "main": main_t}
    seg = ce(main_s) + (lambda_seg_aux * ce(aux_s) if aux_s is not None else 0)
    maps_t = {lv: up(target[lv], target_images.shape[-2:]).softmax(1) for lv in discs}
    generator = sum(lambda_adv[lv] * adversarial(discs[lv](maps_t[lv]), 0) for lv in discs)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(seg + generator, [p for _, p in params])
    d_grads = {}
    for lv, disc in discs.items():
        maps_s = up(source[lv], images.shape[-2:]).softmax(1).detach()
        loss_d = 0.5 * adversarial(disc(maps_s), 0) + 0.5 * adversarial(disc(maps_t[lv].detach()), 1)
        d_grads[lv] = torch.autograd.grad(loss_d, list(disc.parameters()))
    with torch.no_grad():
        for (name, p), g in zip(params, grads):
            d = g + wd * p
            state[name] = d if name not in state else momentum * state[name] + d
            p -= lr * (10 if "head" in name else 1) * state[name]
        for lv, disc in discs.items():
            for i, (p, g) in enumerate(zip(disc.parameters(), d_grads[lv])):
                m, v, t = state.get((lv, i), (torch.zeros_like(p), torch.zeros_like(p), 0))
                m, v, t = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g, t + 1
                state[(lv, i)] = (m, v, t)
                p -= lr_d * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)


@pytest.mark.parametrize("multi_level, gan", [(True, "vanilla"), (False, "ls")])
def test_train_step_matches_an_independent_reference(multi_level, gan):
    """Two real iterations of main()'s step (tiny resnet18, 32x64 frames) against reference_step: every tensor of
    the segmenter (BN statistics included: train mode, source then target forward) and of every D. The loss weights
    are distinct and large enough that swapping two of them, dropping the freeze of D during the generator term,
    a detach, or D's domain labels moves the result beyond the tolerance (mutations listed in the report)."""
    torch.manual_seed(0)
    levels = ("aux", "main") if multi_level else ("main",)
    model = asn.DeepLabV2("resnet18", 4, multi_level=multi_level)
    discs = {lv: asn.FCDiscriminator(4, ndf=8) for lv in levels}
    ref_model, ref_discs = copy.deepcopy(model), copy.deepcopy(discs)
    # lr 1e-3 (heads 1e-2): larger steps make the second iteration chaotic enough to amplify float rounding
    lr, lr_d, lambda_seg_aux, lambda_adv = 1e-3, 1e-3, 0.3, {"aux": 0.2, "main": 0.5}
    optimizer = torch.optim.SGD(model.param_groups(lr, 10), lr=lr, momentum=0.9, weight_decay=5e-4)
    d_optimizers = {lv: torch.optim.Adam(d.parameters(), lr=lr_d, betas=(0.9, 0.99)) for lv, d in discs.items()}
    images, target_images = torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64)
    labels = torch.randint(0, 4, (2, 32, 64))
    labels[0, :5] = 255
    rt = Runtime("cpu", amp=False)
    args = asn.Args(lambda_seg_aux=lambda_seg_aux, lambda_adv_aux=lambda_adv["aux"], lambda_adv_main=lambda_adv["main"],
                    gan=gan)
    state = {}
    for _ in range(2):
        losses = asn.train_step(model, discs, discs, optimizer, d_optimizers, rt, images, labels, target_images, args)
        reference_step(ref_model, ref_discs, state, images, labels, target_images, lr, lr_d, lambda_seg_aux,
                       lambda_adv, gan)
    assert set(losses) == {"seg_src", *(f"{kind}_{lv}" for kind in ("adv", "d") for lv in levels)} | (
        {"seg_aux"} if multi_level else set())
    ours, theirs = model.state_dict(), ref_model.state_dict()
    assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-7, rtol=1e-6) for k in ours)
    for lv in levels:  # Adam's early steps are about lr_d * sign(gradient): a near-zero gradient's rounding can move
        ours, theirs = discs[lv].state_dict(), ref_discs[lv].state_dict()  # an element by ~1e-6 (1e-3 of lr_d)
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-2 * lr_d, rtol=1e-6) for k in ours), lv
        assert not torch.equal(ours["conv1.weight"], asn.FCDiscriminator(4, ndf=8).state_dict()["conv1.weight"])
    assert all(p.requires_grad for d in discs.values() for p in d.parameters())  # D unfrozen again


# ---------------------------------------------------------------------------------------------- recipe and flags
# The official recipe, field by field (wasidennis/AdaptSegNet fca9ff0, train_gta2cityscapes_multi.py):
OFFICIAL = dict(
    source="gta", target="cityscapes",  # GTA5DataSet -> cityscapesDataSet (:197-214)
    backbone="resnet101",  # model/deeplab_multi.py DeeplabMulti: Bottleneck [3, 4, 23, 3]
    iters=150000,  # NUM_STEPS_STOP (:38, early stop, :374)
    poly_horizon=250000, poly_power=0.9,  # NUM_STEPS (:37), POWER (:39); lr_poly (:152)
    batch_size=1,  # BATCH_SIZE (:27), ITER_SIZE 1 (:28)
    crop_size=None, source_size=None, target_size=None, eval_size=None,  # INPUT_SIZE '1280,720',
    # INPUT_SIZE_TARGET '1024,512' (:33, :36), resized whole (gta5_dataset.py:54; mirror/scale flags off); eval
    # crop_size (1024, 512) (evaluate_cityscapes.py:118): the domains' paper sizes (common/data.py)
    lr=2.5e-4, momentum=0.9, weight_decay=5e-4,  # LEARNING_RATE (:34), MOMENTUM (:35), WEIGHT_DECAY (:47)
    head_lr_mult=10.0,  # adjust_learning_rate: param_groups[1] lr * 10 (:159); optim_parameters layer5/6
    seed=1234,  # RANDOM_SEED (:40)
    checkpoint_every=5000,  # SAVE_PRED_EVERY (:43)
    multi_level=True, single_level=False, lambda_seg_aux=0.1,  # DeeplabMulti, LAMBDA_SEG (:50)
    lambda_adv_aux=0.0002, lambda_adv_main=0.001,  # LAMBDA_ADV_TARGET1/2 (:51-52)
    lr_d=1e-4,  # LEARNING_RATE_D (:49); Adam betas (0.9, 0.99) fixed in the script (:236, :239) and here
    gan="vanilla",  # GAN 'Vanilla' (:53): BCEWithLogitsLoss
    bn_mode="train",  # BN affine frozen (deeplab_multi.py), model.train() throughout (:204)
    synthia_classes=19,  # NUM_CLASSES 19 (:36)
)
# Deliberately different (header): aspp_branches 4 (official forward sums 2: --aspp-branches 2), init torchvision
# ImageNet (official: the ImageNet+COCO Caffe file, --init FILE) and with it normalization/stride_on auto.


def test_paper_preset_is_the_official_recipe():
    paper = parse_args(asn.Args, asn.PRESETS, [])
    assert {k: getattr(paper, k) for k in OFFICIAL} == OFFICIAL
    assert (paper.aspp_branches, paper.init, paper.normalization, paper.stride_on) == (4, "imagenet", "auto", "auto")
    quick = dict(asn.PRESETS["quick"])
    method = {k: quick.pop(k) for k in ("lambda_adv_main", "lambda_adv_aux")}
    assert quick == importlib.import_module("source_only").PRESETS["quick"]  # the baseline's toy budget
    assert method == {"lambda_adv_main": 0.01, "lambda_adv_aux": 0.002}  # 10x the paper's (header)


def test_every_field_has_help():
    docs = field_docs(asn.Args)
    missing = [f for f in asn.Args.__dataclass_fields__ if f not in docs and f not in ("world_size", "rank")]
    assert not missing


# ---------------------------------------------------------------------------------------------- released files
@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """The AdaptSegNet multi-level release (ResNet-50 instead of 101 to stay small; the official keys: layer5 aux,
    layer6 main, all four ASPP convs, no num_batches_tracked), a BDL-style single-head release, the DeepLab Caffe
    init file (`Scale.` prefix + 21-class layer5), and a tiny Cityscapes tree."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    multi = asn.DeepLabV2("resnet50", 19, multi_level=True)
    for p in multi.parameters():  # random heads and biases, so that a swap would show
        torch.nn.init.normal_(p, std=0.05)
    single = asn.DeepLabV2("resnet50", 19)
    single.load_state_dict({k: v for k, v in multi.state_dict().items() if not k.startswith("aux_head.")})
    files = {"multi": root / "GTA2Cityscapes_multi-ed35151c.pth", "bdl": root / "gta_2_city_deeplab.pth",
             "init": root / "DeepLab_resnet_pretrained_init-f81d91e8.pth"}
    torch.save(released.deeplab_release(multi.state_dict(), "adaptsegnet"), files["multi"])
    torch.save(released.deeplab_release(single.state_dict(), "bdl"), files["bdl"])
    torch.save(released.caffe_init(multi.state_dict()), files["init"])
    released.cityscapes_tree(str(root / "data"))
    return {**files, "root": root, "reference": multi.state_dict()}


def parsed(*argv):
    return parse_args(asn.Args, asn.PRESETS, list(argv))


def test_release_and_init_file_are_recognised_and_fill_every_module(release_files):
    args = parsed("--eval-only", "--weights", str(release_files["multi"]))
    found = asn.prepare_levels(args, None, 19)
    assert found["kind"] == "AdaptSegNet release" and (args.multi_level, args.single_level) == (True, False)
    assert found["applied"] == {"normalization": "caffe", "stride_on": "1x1", "multi_level": True,
                                "aspp_branches": 2, "backbone": "resnet50"}
    model = asn.DeepLabV2(args.backbone, 19, args.multi_level, args.aspp_branches, stride_on=args.stride_on)
    report = asn.load_matching(model, found["state"], "release", required=lambda k: True)
    assert set(report["unused"]) == {f"{h}.convs.{i}.{p}" for h in ("head", "aux_head") for i in (2, 3)
                                     for p in ("weight", "bias")}  # the convs the official forward never sums
    reference = release_files["reference"]
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items() if "num_batches" not in k)
    # the Caffe init file: backbone only, Caffe input, stride on the 1x1; the heads stay at random init
    args = parsed("--init", str(release_files["init"]))
    found = asn.prepare_levels(args, None, 19)
    assert found["kind"] == "DeepLab-v2 Caffe init file (backbone)" and args.normalization == "caffe"
    model = asn.DeepLabV2(args.backbone, 19, args.multi_level, args.aspp_branches, stride_on=args.stride_on)
    head = model.head.convs[0].weight.clone()
    assert asn.load_init(model, args.init, args.backbone, found) == "caffe"
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items()
               if "head" not in k and "num_batches" not in k)
    assert torch.equal(model.head.convs[0].weight, head) and model.layer2[0].conv1.stride == (2, 2)


def test_single_and_multi_level_settled_against_the_file(release_files, capsys):
    # a single-head (BDL-style) file implies single-level
    args = parsed("--eval-only", "--weights", str(release_files["bdl"]))
    found = asn.prepare_levels(args, None, 19)
    assert (args.multi_level, args.single_level) == (False, True) and found["kind"] == "single-head release (BDL, AdaptSegNet single-level)"
    # --single-level typed beats a multi-level file: warned, its aux head left out (said), main head complete
    args = parsed("--eval-only", "--weights", str(release_files["multi"]), "--single-level")
    found = asn.prepare_levels(args, None, 19)
    said = capsys.readouterr()
    assert "--multi-level False contradicts AdaptSegNet release, which implies True" in said.err
    assert "single-level: the aux head of the AdaptSegNet release (8 tensors) is not built" in said.out
    assert not args.multi_level and "multi_level" not in found["applied"]
    assert not any(k.startswith("aux_head.") for k in found["state"])
    # --init from a multi-level file with --single-level: the same; training reads no aux weight
    args = parsed("--init", str(release_files["multi"]), "--single-level")
    assert not any(k.startswith("aux_head.") for k in asn.prepare_levels(args, None, 19)["state"])
    # contradictions and weights that could not act: one error each
    with pytest.raises(UserError, match="--single-level and --multi-level contradict"):
        asn.prepare_levels(parsed("--single-level", "--multi-level"), None, 19)
    with pytest.raises(UserError, match="--no-single-level and --no-multi-level contradict"):
        asn.prepare_levels(parsed("--no-single-level", "--no-multi-level"), None, 19)
    args = parsed("--init", str(release_files["bdl"]), "--no-single-level")  # typed: multi-level over a 1-head file
    asn.prepare_levels(args, None, 19)
    assert (args.multi_level, args.single_level) == (True, False)
    assert "--multi-level True contradicts single-head release (BDL, AdaptSegNet single-level), which implies False" in capsys.readouterr().err
    with pytest.raises(UserError, match="--lambda-adv-aux --lambda-seg-aux|--lambda-seg-aux --lambda-adv-aux"):
        asn.prepare_levels(parsed("--no-multi-level", "--lambda-adv-aux", "0.1", "--lambda-seg-aux", "0.2"), None, 19)
    with pytest.raises(UserError, match=r"single-head release \(BDL, AdaptSegNet single-level\), which has one head"):
        asn.prepare_levels(parsed("--init", str(release_files["bdl"]), "--lambda-adv-aux", "0.1"), None, 19)
    with pytest.raises(UserError, match="--gan --lr-d: no effect with every adversarial weight at 0"):
        asn.prepare_levels(parsed("--lambda-adv-main", "0", "--lambda-adv-aux", "0", "--gan", "ls", "--lr-d", "1"),
                           None, 19)
    assert asn.prepare_levels(parsed("--single-level", "--lambda-adv-main", "0.01", "--gan", "ls"), None, 19) is None
    args = parsed("--eval-only", "--weights", str(release_files["bdl"]), "--lambda-adv-aux", "0.1")
    assert asn.prepare_levels(args, None, 19)["kind"] == "single-head release (BDL, AdaptSegNet single-level)"  # --eval-only trains nothing


def test_release_evaluates_through_eval_only(release_files):
    """--eval-only --weights <the multi-level release> on a tiny Cityscapes folder with no other flag: quirks applied
    and recorded, predictions in the benchmark format; with --single-level typed the same main output scores the
    same."""
    root = release_files["root"]
    base = ["--eval-only", "--weights", release_files["multi"], "--data-root", root / "data", "--eval-size", 32, 64,
            "--num-workers", 0, "--device", "cpu"]
    proc = run(*base, "--out", root / "eval", "--save-predictions", root / "preds", tiny=False)
    assert "recognised AdaptSegNet release: caffe input, stride on 1x1, multi-level: True, 2 ASPP branches" \
        in proc.stdout
    config, results = (json.loads((root / "eval" / f).read_text()) for f in ("config.json", "results.json"))
    assert config["normalization"] == "caffe" and config["args"]["aspp_branches"] == 2
    assert results["loaded"]["kind"] == "AdaptSegNet release" and results["loaded"]["implied"]["multi_level"]
    assert sorted(os.listdir(root / "preds")) == [f"frankfurt_{i:06d}_000019_leftImg8bit.png" for i in range(2)]
    single = run(*base, "--single-level", "--out", root / "single", tiny=False)
    assert "not built" in single.stdout and "contradicts" in single.stderr
    assert json.loads((root / "single" / "results.json").read_text())["per_class_iou"] == results["per_class_iou"]
    with pytest.raises(UserError, match="cannot load --weights"):  # a file that is no weights file: one error line
        asn.prepare_levels(parsed("--eval-only", "--weights", str(root / "preds" / os.listdir(root / "preds")[0])),
                           None, 19)
    garbage = root / "garbage.pth"
    torch.save({"a.weight": torch.zeros(2)}, garbage)
    with pytest.raises(UserError, match="unrecognised layout.*AdaptSegNet/ADVENT/BDL releases"):
        asn.prepare_levels(parsed("--eval-only", "--weights", str(garbage)), None, 19)


def test_dry_run_single_level_from_the_init_file(release_files, tmp_path):
    out = tmp_path / "dry"
    proc = run("--dry-run", "--single-level", "--init", release_files["init"], "--out", out)
    assert "recognised DeepLab-v2 Caffe init file (backbone): caffe input, stride on 1x1" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert set(config["params"]) == {"model", "disc_main"} and config["args"]["multi_level"] is False
    assert config["params"]["disc_main"]["trainable"] == sum(p.numel() for p in asn.FCDiscriminator(8).parameters())
    assert config["loaded"]["kind"] == "DeepLab-v2 Caffe init file (backbone)" and config["normalization"] == "caffe"
    assert config["args"]["backbone"] == "resnet50"  # read from the file over the quick preset's resnet18
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("asn") / "straight")
    run("--iters", 4, "--out", out)
    return out


def test_smoke_run_folder(straight):
    assert os.listdir(os.path.join(straight, "predictions"))
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["script"] == "adaptsegnet" and set(config["params"]) == {"model", "disc_aux", "disc_main"}
    rows = [r for r in metrics(straight) if "seg_src" in r]
    assert {"seg_src", "seg_aux", "adv_aux", "adv_main", "d_aux", "d_main", "lr"} <= set(rows[-1])
    results = json.load(open(os.path.join(straight, "results.json")))
    assert 0 <= results["miou"] <= 100 and results["iters"] == 4
    assert {"disc_aux", "disc_main", "optimizer_d_aux", "optimizer_d_main"} <= set(checkpoint(straight))


def test_resume_continues_where_it_stopped(straight, tmp_path):
    """An interrupted run (2 of a 4-iteration schedule) resumed to 4: it says where it starts, logs only later
    iterations, and ends with the uninterrupted weights of the segmenter, both D and D's Adam state; a silent
    restart from 0 would fail the first two checks."""
    out = str(tmp_path / "resumed")
    run("--iters", 2, "--poly-horizon", 4, "--out", out)
    rows_before = len(metrics(out))
    resumed = run("--iters", 4, "--out", out, "--resume", "auto")
    assert "resumed from" in resumed.stdout and "at iteration 2" in resumed.stdout
    assert min(r["iter"] for r in metrics(out)[rows_before:] if "seg_src" in r) > 2
    a, b = checkpoint(straight), checkpoint(out)
    assert b["iter"] == 4
    for key in ("model", "disc_aux", "disc_main"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    assert torch.equal(a["optimizer_d_main"]["state"][0]["exp_avg"], b["optimizer_d_main"]["state"][0]["exp_avg"])


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 gloo processes x batch 1 end with the weights of 1 process x batch 2: segmenter and both discriminators
    (BN in eval mode: per-process batch statistics differ by construction; the discriminators have no BN). The
    source backward accumulates locally (no_sync), the target and D backwards all-reduce; rank 0 alone logs."""
    args = ["--iters", 2, "--bn-mode", "eval", "--num-predictions", 0]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run(*args, "--out", single)
    torchrun(*args, "--out", ddp)
    a, b = checkpoint(single), checkpoint(ddp)
    for key in ("model", "disc_aux", "disc_main"):
        assert all(torch.allclose(a[key][k].float(), b[key][k].float(), rtol=1e-4, atol=1e-6) for k in a[key]), key
    assert json.loads((ddp / "config.json").read_text())["args"]["world_size"] == 2
    assert len([r for r in metrics(ddp) if "seg_src" in r]) == 2


def test_sharded_evaluation_scores_the_checkpointed_network(tmp_path):
    """Train-mode BN: each rank's running statistics come from its own frames; the final evaluation of a torchrun
    run, sharded over 2 ranks, must score what rank 0 checkpoints: equal --eval-only of it in one process."""
    ddp, again = tmp_path / "ddp", tmp_path / "again"
    torchrun("--iters", 2, "--num-predictions", 0, "--out", ddp)
    run("--eval-only", "--weights", ddp / "checkpoints" / "last.pt", "--out", again)
    assert json.loads((ddp / "results.json").read_text())["per_class_iou"] == \
        json.loads((again / "results.json").read_text())["per_class_iou"]
