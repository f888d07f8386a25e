"""proda.py: the paper preset against the official recipe; prototypes, losses, warps and augmentations on hand-made
tensors; ProDA's released files (built in tests/released_proda.py with the official names) recognised, loaded and
evaluated; each stage's iteration against an independent reference; runs of every stage (quick preset, 32x64 toy
frames, 1-2 iterations per stage, 2 eval images): the run folder, released models as starting points, resume within
and between stages, the best-on-val hand-over, 2 processes against 1 under the collective guard."""
import copy
import dataclasses
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

import proda
import released
import released_proda
import source_only
from common.cli import UserError, field_docs
from common.runtime import Runtime
from conftest import ROOT

TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "32", "64", "--target-size", "32", "64", "--crop-size", "32", "64", "--eval-size", "32",
        "64", "--resize-width", "69", "--num-predictions", "1", "--target-limit", "4", "--poly-horizon", "10",
        "--warmup-iters", "2", "--iters", "2", "--checkpoint-every", "1"]
# the runs the resume and torchrun tests compare: BN frozen except in stage 3 (trained, each torchrun process would
# normalise with its own image's statistics: SyncBN exists only on CUDA), head dropout 0 (every rank draws the
# same masks), crops inside the frame (scale >= 1: the source CE is each process's mean over its labelled pixels);
# a low hard-label threshold, so that stages 2/3 have hard labels after 2 iterations, as many as the images allow
EQUAL = ["--freeze-bn-stages", "warmup", "stage1", "stage2", "--head-dropout", "0", "--scale-range", "1", "1.2",
         "--label-threshold", "0.3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py"), "proda.py"]


def run(*args, cmd=None, check=True, tiny=True):
    cmd = cmd or [sys.executable, "proda.py"]
    proc = subprocess.run([*cmd, *(TINY if tiny else []), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def same_tensors(a, b, rtol=0.0, atol=0.0):
    """Names that differ between two state dicts (exactly, or beyond the tolerance)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return [k for k in a if not (torch.equal(a[k], b[k]) if rtol == atol == 0 else
                                 torch.allclose(a[k].double(), b[k].double(), rtol=rtol, atol=atol))]


# ---------------------------------------------------------------------------------------------- recipe
def test_paper_preset_is_the_official_recipe():
    """Every recipe field of `--preset paper` (GTA5 -> Cityscapes) against microsoft/ProDA 9ba80c7. Deliberate
    differences (header): handover last (official: best on val), student_init init (official: SimCLRv2),
    kd_legacy off (official: the buggy KD)."""
    args = dataclasses.asdict(proda.parse_proda_args([]))
    official = {
        "backbone": "resnet101", "init": "imagenet",  # models/deeplabv2.py:356,360 (torchvision resnet101)
        "normalization": "unit",  # RGB/255, mean 0: data/gta5_dataset.py:60,166-167, cityscapes_dataset.py:69,160
        "iters": 84 * (2975 // 4),  # parser_train.py:14 epochs 84; train.py:46-47 over the target loader, bs 4,
        # drop_last (data/__init__.py:89-95): 743 steps an epoch
        "warmup_iters": 84 * (2975 // 4),  # ProDA #21: the warm-up trains as long as the stages
        "poly_horizon": 90000, "warmup_poly_horizon": 90000, "poly_power": 0.9,  # parser_train.py:15, utils.py:11
        "batch_size": 4, "seed": 1337,  # parser_train.py:12,20
        "crop_size": [512, 896], "resize_width": 2200, "scale_range": [0.5, 1.5],  # parser_train.py:41-42,
        # augmentations.py:433 (width U(0.5, 1.5) x 2200, height from the frame's aspect)
        "source_size": [1052, 1914], "target_size": [1024, 2048],  # gta5_dataset.py:58, cityscapes_dataset.py:87
        "eval_size": None,  # = target_size: the val frames at 2048x1024 (cityscapes_dataset.py:87,152)
        "lr": 2.5e-4, "head_lr_mult": 10.0, "gan": "ls", "lambda_adv": 0.01,  # warm-up command (#42); model
        # adaptation_modelv2.py:80-82 (x10 head), parser_train.py:48-49
        "lr_d": 1e-4, "momentum": 0.9, "weight_decay": 2e-4,  # adaptation_modelv2.py:67,75
        "freeze_bn_stages": ["warmup"],  # #42: --freeze_bn in the warm-up only (train.py:68-69, utils.py:87-92)
        "stage1_lr": 1e-4,  # parser_train.py:11, README:72 passes no --lr; one rate for all (modelv2.py:84)
        "proto_momentum": 1e-4, "proto_temperature": 1.0,  # parser_train.py:28,69
        "proto_min_pixels": 10, "ema_momentum": 0.999,  # adaptation_modelv2.py:133,263
        "sce_alpha": 0.1, "sce_beta": 1.0, "lambda_consistency": 10.0, "lambda_regular": 0.1,  # README:72 --rce
        # --proto_consistW 10 --regular_w 0.1; parser_train.py:52-53
        "randaugment_ops": 2,  # RandAugmentMC(2, 10): cityscapes_dataset.py:85
        "distill_lr": 6e-4, "label_threshold": 0.95, "lambda_kd": 1.0,  # README:82 --lr 6e-4 --threshold 0.95
        # --distillation 1 --finetune
        "eval_every": 1000, "checkpoint_every": 1000,  # parser_train.py:63 val_interval; train.py:143-145
        "synthia_classes": 19, "target_limit": None, "stage": "all",
        "stride_on": "1x1",  # deeplabv2.py's Bottleneck: stride on conv1, also for the torchvision weights it loads
        "head_dropout": 0.1,  # Classifier_Module2(droprate=0.1)
        "handover": "last", "student_init": "init", "kd_legacy": False,  # deliberate differences (docstring)
        "bn_clr": False,  # ProDA's --bn_clr goes with its SimCLRv2 student (README:82), not the ImageNet one
    }
    assert {k: args[k] for k in official} == official
    # SYNTHIA (README:114): --n_class 16, no --regular_w (parser default 0); frames 1280x760 (synthia_dataset.py:27)
    synthia = dataclasses.asdict(proda.parse_proda_args(["--source", "synthia"]))
    assert (synthia["synthia_classes"], synthia["lambda_regular"], synthia["source_size"]) == (16, 0.0, [760, 1280])
    explicit = proda.parse_proda_args(["--source", "synthia", "--lambda-regular", "0.1"])
    assert (explicit.synthia_classes, explicit.lambda_regular) == (16, 0.1)


def test_quick_preset_budget_and_schedules():
    args = proda.parse_proda_args(["--preset", "quick"])
    assert (args.warmup_iters, args.iters, args.warmup_poly_horizon, args.poly_horizon) == (160, 80, 160, None)
    assert args.freeze_bn_stages == ["stage2", "stage3"]
    assert proda.parse_proda_args(["--preset", "quick", "--poly-horizon", "500"]).warmup_poly_horizon == 500



def test_stage_plan_refuses_flags_that_cannot_act():
    def plan(*argv):
        return proda.stage_plan(proda.parse_proda_args(list(argv)))

    assert plan() == proda.STAGES and plan("--stage", "stage2") == ("stage2",)
    assert plan("--warmup-checkpoint", "w.pkl") == proda.STAGES[1:]
    for argv, message in ((["--freeze-bn-stages", "stage4"], "--freeze-bn-stages stage4"),
                          (["--stage", "stage2", "--warmup-checkpoint", "w.pkl"], "--stage stage1 or all"),
                          (["--teacher-checkpoint", "t.pkl"], "--stage stage2 or stage3")):
        with pytest.raises(UserError, match=message):
            plan(*argv)


# ---------------------------------------------------------------------------------------------- units
def test_prototype_ema_update():
    protos = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    m = 0.1
    sums = torch.tensor([[2.0, 4.0], [0.0, 0.0], [6.0, 6.0]])  # class 2: two image means, both (3, 3)
    counts = torch.tensor([1.0, 0.0, 2.0])
    new = proda.update_prototypes(protos, sums, counts, m)
    assert torch.allclose(new[0], torch.tensor([0.2, 0.4]))  # (1 - m) * 0 + m * (2, 4)
    assert torch.equal(new[1], protos[1])  # no image of class 1: unchanged
    sequential = protos[2]
    for _ in range(2):  # the official one-after-another update with the same vector twice
        sequential = (1 - m) * sequential + m * torch.tensor([3.0, 3.0])
    assert torch.allclose(new[2], sequential)


def test_class_feature_sums_image_weighted_and_min_pixels():
    feat = torch.zeros(2, 2, 2, 3)
    feat[0, 0] = torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    feat[1, 0] = 10.0
    labels = torch.tensor([[[0, 0, 0], [0, 0, 1]], [[0, 0, 0], [255, 255, 255]]])
    sums, counts = proda.class_feature_sums(feat, labels, num_classes=2, min_pixels=3)
    # image 0 class 0: 5 px, mean of channel 0 = (1+1+1+3+3)/5 = 1.8; image 1 class 0: 3 px, mean 10 (255 ignored)
    assert counts.tolist() == [2.0, 0.0]  # class 1 has a single pixel < 3
    assert sums[0, 0].item() == pytest.approx(11.8)
    assert sums[1].abs().sum() == 0


def test_prototype_weights_and_denoising():
    protos = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    feat = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)  # distances 0 and 5
    w = proda.prototype_weights(feat, protos, temperature=1.0)
    want = torch.tensor([1.0, math.exp(-5.0)]) / (1 + math.exp(-5.0))
    assert torch.allclose(w.flatten(), want, atol=1e-5)
    w2 = proda.prototype_weights(feat, protos, temperature=5.0)
    assert w2[0, 1].item() == pytest.approx(math.exp(-1) / (1 + math.exp(-1)), abs=1e-5)
    soft = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1)  # the soft label prefers class 1, the prototypes class 0
    assert proda.denoise_labels(soft, w, torch.ones(1, 1, 1, dtype=torch.bool)).item() == 0
    assert proda.denoise_labels(soft, w, torch.zeros(1, 1, 1, dtype=torch.bool)).item() == 255


def test_sce_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).t().reshape(1, 2, 2, 1)  # pixel 0: (2, 0), pixel 1: (0, 0)
    labels = torch.tensor([[[0], [255]]])
    p = math.exp(2) / (1 + math.exp(2))
    ce = -math.log(p)
    rce = -math.log(1e-4) * (1 - p)  # = 9.21 * (1 - p_y)
    assert proda.sce_loss(logits, labels, 0.1, 1.0).item() == pytest.approx(0.1 * ce + rce, rel=1e-5)
    assert proda.sce_loss(logits, labels, 1.0, 0.0).item() == pytest.approx(ce, rel=1e-5)


def test_regular_loss_uniform_is_log_c():
    assert proda.regular_loss(torch.zeros(2, 4, 3, 3)).item() == pytest.approx(math.log(4))


def test_consistency_kl():
    protos = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    feat = torch.zeros(1, 2, 1, 2)
    z_s = proda.prototype_weights(feat, protos, 1.0)
    keep = torch.tensor([[[True, False]]])
    assert proda.consistency_loss(feat, z_s, protos, 1.0, keep).item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    zs = z_s[0, :, 0, 0]
    want = sum(0.5 * (math.log(0.5) - math.log(zs[k].item())) for k in range(2)) / 2  # mean over C (official)
    assert proda.consistency_loss(feat, teacher, protos, 1.0, keep).item() == pytest.approx(want, rel=1e-4)


def test_kd_loss_correct_and_legacy():
    student = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    teacher = torch.tensor([0.0, 2.0, 0.0]).view(1, 3, 1, 1)
    ps, pt = student.softmax(1).flatten(), teacher.softmax(1).flatten()
    correct = sum(pt[k] * (pt[k].log() - ps[k].log()) for k in range(3)).item()
    legacy = sum(pt[k] * (pt[k].log() - ps[k]) for k in range(3)).item() / 3  # softmax where log-softmax belongs
    assert proda.kd_loss(student, teacher).item() == pytest.approx(correct, rel=1e-5)
    assert proda.kd_loss(student, teacher, legacy=True).item() == pytest.approx(legacy, rel=1e-5)
    assert proda.kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def geometry(sh=4, sw=8, y0=0, x0=0, ch=4, cw=8, flip=0, strong_flip=0, cut=(0, 0, 0, 0)):
    return torch.tensor([[sh, sw, y0, x0, ch, cw, flip, strong_flip, *cut]], dtype=torch.float32)


def test_full_to_view_identity_flip_crop_and_padding():
    maps = torch.arange(32.0).view(1, 1, 4, 8)
    out, valid = proda.full_to_view(maps, geometry(), (4, 8), mode="nearest")
    assert torch.equal(out, maps) and valid.all()
    out, _ = proda.full_to_view(maps, geometry(flip=1), (4, 8), mode="nearest")
    assert torch.equal(out, maps.flip(-1))
    # rescaled x2 (8x16), crop 4x8 at (2, 4), view at 1/2 (2x4): rows 1-2, columns 2-5 of the 4x8 map
    out, valid = proda.full_to_view(maps, geometry(8, 16, 2, 4), (2, 4), mode="nearest")
    assert torch.equal(out[0, 0], maps[0, 0, 1:3, 2:6]) and valid.all()
    # rescaled x0.5 (2x4) into a 4x8 crop: only the top-left quarter lies on the frame
    out, valid = proda.full_to_view(maps, geometry(2, 4), (4, 8), mode="nearest")
    assert valid[0, :2, :4].all() and not valid[0, 2:].any() and not valid[0, :, 4:].any()


def test_full_to_view_is_prodas_full2weak():
    """ProDA's full2weak (adaptation_modelv2.py:325-338): F.interpolate to (int(h/4), int(w/4)) of the rescaled
    frame with align_corners=True, crop at int(offset/4), flip."""
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 16, 32)  # a full-frame map at 1/4 of a 64x128 frame
    rows = [(97, 195, 33, 61, 1), (150, 301, 7, 170, 0)]  # rescaled h, w, crop y0, x0 (crop 64x128), flip
    geom = torch.tensor([[h, w, y0, x0, 64, 128, flip, 0, 0, 0, 0, 0] for h, w, y0, x0, flip in rows],
                        dtype=torch.float32)
    out, valid = proda.full_to_view(maps, geom, (16, 32))
    for k, (h, w, y0, x0, flip) in enumerate(rows):
        want = F.interpolate(maps[k:k + 1], size=(h // 4, w // 4), mode="bilinear", align_corners=True)
        want = want[..., y0 // 4:y0 // 4 + 16, x0 // 4:x0 // 4 + 32]
        want = want.flip(-1) if flip else want
        assert torch.allclose(out[k:k + 1], want, atol=1e-5) and valid[k].all()


def test_weak_to_strong_flip_and_cutout():
    maps = torch.arange(8.0).view(1, 1, 2, 4)
    keep = torch.ones(1, 2, 4, dtype=torch.bool)
    out, kept = proda.weak_to_strong(maps, keep, geometry(ch=2, cw=4, strong_flip=1, cut=(0, 0, 1, 2)))
    assert torch.equal(out, maps.flip(-1))
    assert kept.tolist() == [[[False, False, True, True], [True, True, True, True]]]
    # columns 1-3 of the crop on a half-size map: label_strong_T's 1 // 2 = 0 to 3 // 2 = 1, i.e. column 0
    _, kept = proda.weak_to_strong(maps[..., :1, :2], keep[:, :1, :2], geometry(ch=2, cw=4, cut=(0, 1, 2, 3)))
    assert kept.tolist() == [[[False, True]]]


def test_randaugment_magnitudes():
    """ProDA's FixMatch pool (randaugment.py:22-34,73-75,130-132,171-187, v = randint(1, 10)): enhancement
    factors 0.09 v + 0.05 in [0.14, 0.86], posterize to 4-7 bits, solarize above 256 - int(25.6 v)."""
    gray = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    brightness, posterize, solarize = proda.RANDAUGMENT_OPS[3], proda.RANDAUGMENT_OPS[7], proda.RANDAUGMENT_OPS[8]
    assert [int(np.asarray(brightness(gray, v))[0, 0, 0]) for v in (1, 9)] == [28, 172]  # 200 x 0.14, 200 x 0.86
    white = Image.fromarray(np.full((1, 1, 3), 255, np.uint8))
    assert [int(np.asarray(posterize(white, v))[0, 0, 0]) for v in (1, 9)] == [240, 254]  # 4 and 7 bits kept
    assert [int(np.asarray(solarize(gray, v))[0, 0, 0]) for v in (1, 9)] == [200, 55]  # thresholds 231 and 26


def test_target_views_shapes_geometry_and_cutout():
    from common.data import domain_split
    split = domain_split("toy-real", "train", labelled=False)
    views = proda.TargetViews(split, (32, 64), (16, 32), (0.5, 1.5), ("full", "weak", "strong"), limit=3)
    item = views[(1, 123)]
    assert len(views) == 3 and item["index"] == 1
    assert item["full"].shape == (3, 32, 64) and item["weak"].shape == item["strong"].shape == (3, 16, 32)
    assert item["full"].dtype == torch.uint8 and item["geom"][4:6].tolist() == [16, 32]
    for seed in range(20):
        cy0, cx0, cy1, cx1 = views[(0, seed)]["geom"][8:].long().tolist()
        assert (views[(0, seed)]["strong"][:, cy0:cy1 + 1, cx0:cx1 + 1] == 127).all()  # PIL fills the far corner
        assert cy1 - cy0 == min(5, 16 - cy0) and cx1 - cx0 == min(5, 32 - cx0)  # shrinks only at the far edge
    only = proda.TargetViews(split, (32, 64), (16, 32), (0.5, 1.5), ("strong",), limit=3)[(1, 123)]
    assert set(only) == {"strong", "geom", "index"}


def test_ema_update_rule():
    model, ema = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    with torch.no_grad():
        model.weight.fill_(1.0), ema.weight.fill_(0.0), model.running_mean.fill_(5.0)
    proda.ema_update(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((2,), 0.1))  # 0.9 * 0 + 0.1 * 1
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers copied


# ---------------------------------------------------------------------------------------------- the networks
def test_network_and_discriminator_shapes():
    net = proda.ProDANet("resnet18", 8)
    feat, logits = net(torch.rand(2, 3, 64, 128))
    assert feat.shape == (2, 256, 9, 17) and logits.shape == (2, 8, 9, 17)  # output stride 8, ceil-mode pool
    assert net.head.classifier.bias is None and net.head_bn is None
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)  # ProDA's 1x1 placement
    assert all(m.weight.requires_grad for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any("aspp" in type(m).__name__.lower() for m in net.modules() if list(m.parameters()))
    heads = {id(p) for p in net.param_groups(1.0, 10.0)[1]["params"]}
    assert {id(p) for p in net.head.parameters()} == heads
    disc = proda.ProDADiscriminator(8)
    assert disc(torch.rand(2, 8, 64, 128)).shape == (2, 1, 4, 8)  # four stride-2 3x3 convs, then 1x1
    assert [m.kernel_size for m in disc.modules() if isinstance(m, torch.nn.Conv2d)] == [(3, 3)] * 4 + [(1, 1)]


def test_bn_pretrain_sits_between_layer4_and_the_head_at_the_head_rate():
    """ProDA's --bn_clr (deeplabv2.py:231-232, 277-278): a BN(2048) on layer4's output, in get_10x_lr_params."""
    net = proda.ProDANet("resnet50", 5, bn_clr=True).eval()
    with torch.no_grad():
        net.head_bn.running_mean.fill_(3.0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stem = net.maxpool(F.relu(net.bn1(net.conv1(x))))
        layer4 = net.layer4(net.layer3(net.layer2(net.layer1(stem))))
        assert torch.allclose(net(x)[1], net.head(net.head_bn(layer4))[1])
    assert net.head_bn.num_features == 2048
    heads = {id(p) for p in net.param_groups(1.0, 10.0)[1]["params"]}
    assert {id(net.head_bn.weight), id(net.head_bn.bias)} <= heads
    frozen = proda.ProDANet("resnet18", 5, frozen_bn=True, bn_clr=True).train()
    assert not frozen.head_bn.training and not frozen.head_bn.weight.requires_grad


def test_head_init_is_prodas():
    """models/deeplabv2.py: every conv weight N(0, 0.01) (ResNet101's loop), the bottleneck conv's bias 0;
    Classifier_Module2's own loops never reach the branch biases or the SE layers: PyTorch's default init."""
    torch.manual_seed(0)
    head = proda.ProDAHead(2048, 19)
    for conv in [b[0] for b in head.branches] + [head.bottleneck[1], head.classifier]:
        assert abs(conv.weight.std().item() - 0.01) < 1e-3
    assert torch.equal(head.bottleneck[1].bias, torch.zeros(256))
    for k, branch in enumerate(head.branches):
        bound = 1 / math.sqrt(branch[0].weight[0].numel())  # PyTorch's default bias: U(-1/sqrt(fan_in), ...)
        assert branch[0].bias.abs().max() <= bound and branch[0].bias.abs().mean() > bound / 4, k
    se = head.bottleneck[0].fc[0]
    assert abs(se.weight.std().item() - 1 / math.sqrt(3 * 1280)) < 2e-3  # kaiming_uniform(a=sqrt(5)): 1/sqrt(3 fan_in)


def test_frozen_bn_keeps_running_statistics():
    """ProDA's --freeze_bn: in train mode the network normalises with its running statistics and never updates
    them, and its BN affine is not trainable; the default network updates both."""
    frozen = proda.ProDANet("resnet18", 8, frozen_bn=True).train()
    free = proda.ProDANet("resnet18", 8).train()
    free.load_state_dict(frozen.state_dict())
    before = {k: v.clone() for k, v in frozen.state_dict().items() if "running" in k}
    x = torch.rand(2, 3, 32, 64) * 5 + 3  # far from the init statistics (mean 0, var 1)
    frozen(x), free(x)
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(free.bn1.running_mean, before["bn1.running_mean"])
    assert not any(m.weight.requires_grad for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for m in frozen.modules():  # only BN may differ between the modes: switch the head's dropout off
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
            m.eval()
    with torch.no_grad():  # train-mode output equals eval-mode output: no batch statistics are used
        assert torch.allclose(frozen(x)[1], frozen.eval()(x)[1])


def test_help_lines_follow_source_only():
    """The shared definitions are compared by tests/test_shared_blocks.py; the help lines equal source_only.py's
    except where ProDA's recipe or meaning differs."""
    docs, base_docs = field_docs(proda.Args), field_docs(source_only.Args)
    own = {"iters", "batch_size", "crop_size", "lr", "seed", "checkpoint_every", "source_size", "target_size",
           "synthia_classes", "normalization", "stride_on", "momentum", "weight_decay", "head_lr_mult", "poly_horizon"}
    assert {k for k in base_docs if k in docs and docs[k] != base_docs[k]} == own
    assert not {"multi_level", "lambda_seg_aux", "aspp_branches", "bn_mode"} & set(docs)  # ProDA has no use
    for f in proda.Args.__dataclass_fields__.values():
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f.name


# ---------------------------------------------------------------------------------------------- released files
@pytest.mark.parametrize("kind", ["warmup", "stage1", "stage23", "synthia16"])
def test_released_models_land_in_the_right_modules(kind, tmp_path):
    """ProDA's files (train.py's wrapper, numpy best_iou, deeplabv2.py's names): every tensor into the right module
    (the forward of the loaded network equals the reference's), the flags the file implies, its own mIoU."""
    classes, bn_clr = (16 if kind == "synthia16" else 19), kind in ("stage23", "synthia16")
    reference = released_proda.randomize(proda.ProDANet("resnet18", classes, frozen_bn=True, bn_clr=bn_clr))
    disc = proda.ProDADiscriminator(classes).state_dict() if kind == "warmup" else None
    path = tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl"
    torch.save(released_proda.proda_release(reference.state_dict(), best_iou=0.433, disc_state=disc), path)
    found = proda.read_proda_weights(str(path), "--weights")
    assert found["kind"] == {"warmup": "ProDA warm-up release", "stage1": "ProDA stage-1 release"}.get(
        kind, "ProDA stage-2/3 release (bn_pretrain)")
    assert found["implied"] == {"normalization": "unit", "stride_on": "1x1", "bn_clr": bn_clr, "backbone": "resnet18"}
    assert (found["num_classes"], found["file_miou"], found["iter"]) == (classes, 43.3, 62001)
    model = proda.ProDANet("resnet18", classes, frozen_bn=True, bn_clr=bn_clr)
    report = proda.load_matching(model, found["state"], kind, required=lambda k: True, unused_ok=lambda k: False)
    assert report["missing"] == [] and report["unused"] == []
    assert same_tensors(model.state_dict(), reference.state_dict()) == []
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[1], reference.eval()(x)[1])


def test_simclr_student_init_fills_the_backbone_and_leaves_bn_pretrain_fresh(tmp_path):
    """ProDA reads r101_1x_sk0.pth's 'state_dict' (models/deeplabv2.py:362) into its Caffe-layout network, RGB/255:
    the backbone loads completely, bn_pretrain and the head keep their init; the file sets no stride or input."""
    source = released_proda.randomize(proda.ProDANet("resnet18", 8))
    path = tmp_path / "r101_1x_sk0.pth"
    for with_fc in (False, True):
        torch.save(released_proda.simclr_init(source.state_dict(), with_fc), path)
        found = proda.read_proda_weights(str(path), "--student-init", segmenter_only=False)
        assert found["kind"] == ("torchvision ResNet" if with_fc else "ResNet backbone (torchvision names)")
        assert set(found["keeps"]) == {"normalization", "stride_on"} and found["implied"]["backbone"] == "resnet18"
        student = proda.ProDANet("resnet18", 8, bn_clr=True)
        fresh = copy.deepcopy(student.state_dict())
        proda.load_init(student, str(path), "resnet18", found)
        ours = student.state_dict()
        assert all(torch.equal(ours[k], source.state_dict()[k]) for k in ours if not k.startswith("head"))
        assert all(torch.equal(ours[k], fresh[k]) for k in ours if k.startswith("head"))
    with pytest.raises(UserError, match="not a ProDA model"):  # a backbone is no trained segmenter
        proda.read_proda_weights(str(path), "--teacher-checkpoint")


def test_prepare_files_applies_what_each_file_implies(tmp_path, capsys):
    """--eval-only: the file's flags applied and printed in one line; a typed flag wins with a warning; a 16-way
    file in a 19-class run, another script's checkpoint and an unknown layout are one-line errors."""
    net = released_proda.randomize(proda.ProDANet("resnet18", 19, bn_clr=True))
    release = tmp_path / "stage3.pkl"
    torch.save(released_proda.proda_release(net.state_dict()), release)

    def prepare(*argv, num_classes=19):
        args = proda.parse_proda_args(["--eval-only", *map(str, argv)])
        return args, proda.prepare_files(args, None, num_classes, proda.stage_plan(args))

    args, files = prepare("--weights", release)
    assert (args.backbone, args.stride_on, args.bn_clr, args.normalization) == ("resnet18", "1x1", True, "unit")
    assert files["--weights"]["applied"] == {"normalization": "unit", "stride_on": "1x1", "bn_clr": True,
                                             "backbone": "resnet18"}
    out = capsys.readouterr().out
    assert "recognised ProDA stage-2/3 release (bn_pretrain) (--weights): unit input, stride on 1x1, bn_pretrain: " \
           "True, resnet18 (its own evaluation: 57.5 mIoU)" in out
    args, _ = prepare("--weights", release, "--normalization", "imagenet", "--stride-on", "auto")
    assert args.normalization == "imagenet" and args.stride_on == "1x1"  # auto: where the file expects it
    assert "--normalization imagenet contradicts ProDA stage-2/3 release" in capsys.readouterr().err
    with pytest.raises(UserError, match="has 19 classes, this run has 16 .*--source synthia"):
        prepare("--weights", release, num_classes=16)
    other = tmp_path / "source_only.pt"
    torch.save({"script": "source_only", "num_classes": 19, "model": {}}, other)
    with pytest.raises(UserError, match="written by source_only, not a ProDA model; accepted are this script's"):
        prepare("--weights", other)
    garbage = tmp_path / "garbage.pkl"
    torch.save({"ResNet101": {"model_state": {"layer5.x": torch.zeros(1)}}}, garbage)
    with pytest.raises(UserError, match="without its head"):
        prepare("--weights", garbage)
    # two files implying different backbones: an error unless the flag is typed
    deep = tmp_path / "resnet50_teacher.pkl"
    torch.save(released_proda.proda_release(proda.ProDANet("resnet50", 19).state_dict()), deep)
    student = tmp_path / "student.pth"
    torch.save(released_proda.simclr_init(net.state_dict()), student)
    args = proda.parse_proda_args(["--stage", "stage2", "--teacher-checkpoint", str(deep), "--student-init",
                                   str(student)])
    with pytest.raises(UserError, match=r"implies --backbone resnet\d+, --\S+ \S+ implies resnet\d+: type the flag"):
        proda.prepare_files(args, None, 19, proda.stage_plan(args))


# ---------------------------------------------------------------------------------------------- one iteration
# Each stage's step against a hand-written one: ProDA's losses written out (adaptation_modelv2.py), torch's SGD and
# Adam updates by hand, two iterations from the same weights. Tiny ProDANets at 32x64, dropout 0 (no random draws);
# the geometry is the identity (the frame is the crop) plus the strong view's flip of image 0 and its cut-outs.
def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def ce_mean(logits, labels):
    """CE over the pixels labelled != 255 (the logits at the labels' size)."""
    logp = logits.log_softmax(1)
    valid = labels != 255
    return -logp.gather(1, labels.clamp(max=logits.shape[1] - 1)[:, None])[:, 0][valid].mean()


def distance(feat, prototypes):  # N x C x H x W Euclidean distances, written directly
    return (feat[:, None] - prototypes[None, :, :, None, None]).norm(dim=2)


def to_strong(maps, flip):  # the strong view's extra flip, per image
    return torch.stack([m.flip(-1) if f else m for m, f in zip(maps, flip)])


def sgd_by_hand(named, grads, buffers, lr, head_mult, momentum, wd):
    with torch.no_grad():
        for (name, p), g in zip(named, grads):
            d = g + wd * p
            buffers[name] = d if name not in buffers else momentum * buffers[name] + d
            p -= lr * (head_mult if name.startswith("head") else 1.0) * buffers[name]


def trainable(net):
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


FLIP, CUTS = (1, 0), ((4, 8, 14, 30), (20, 40, 32, 64))  # strong flip of image 0; cut-out boxes (far edge: shrunk)
GEOM = torch.tensor([[32, 64, 0, 0, 32, 64, 0, f, *c] for f, c in zip(FLIP, CUTS)], dtype=torch.float32)


def cut_keep(h=8, w=16):
    keep = torch.ones(2, h, w, dtype=torch.bool)
    for n, (y0, x0, y1, x1) in enumerate(CUTS):  # label_strong_T: the box floored to the 1/4 grid
        keep[n, y0 // 4:y1 // 4, x0 // 4:x1 // 4] = False
    return keep


def step_inputs(seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    images, target = torch.randn(2, 3, 32, 64, generator=g), torch.randn(2, 3, 32, 64, generator=g)
    labels = torch.randint(0, classes, (2, 32, 64), generator=g)
    labels[0, :4] = 255
    return images, labels, target


def test_warmup_step_matches_an_independent_reference():
    """Source CE + lambda_adv LS-GAN(D(softmax target), source) -> SGD on the segmenter (head x10, momentum, weight
    decay) with D frozen (no gradient reaches D); then D: LS-GAN(D(source), 0) + LS-GAN(D(target), 1), both halves
    summed, on the detached maps -> Adam (0.9, 0.99). BN frozen as ProDA's warm-up."""
    torch.manual_seed(0)
    model, disc = proda.ProDANet("resnet18", 4, frozen_bn=True, dropout=0.0), proda.ProDADiscriminator(4)
    ref_model, ref_disc = copy.deepcopy(model), copy.deepcopy(disc)
    initial = copy.deepcopy(model.state_dict())
    lr, lr_d, wd, momentum, lam = 0.01, 1e-4, 2e-4, 0.9, 0.5  # lambda_adv: large enough to show
    optimizer = torch.optim.SGD(model.param_groups(lr, 10), lr=lr, momentum=momentum, weight_decay=wd)
    d_grads_at_zero_grad = []

    class Adam(torch.optim.Adam):  # records D's gradients when its step begins: the generator term left none
        def zero_grad(self, set_to_none=True):
            d_grads_at_zero_grad.append([None if p.grad is None else p.grad.clone() for p in disc.parameters()])
            super().zero_grad(set_to_none)

    d_optimizer = Adam([{"params": disc.parameters(), "lr_mult": 1.0}], lr=lr_d, betas=(0.9, 0.99))
    images, labels, target = step_inputs()
    rt = Runtime("cpu", amp=False)
    d_grads_after = []
    for _ in range(2):
        proda.warmup_step(model, disc, disc, optimizer, d_optimizer, rt, images, labels, target, lam, "ls")
        d_grads_after.append([p.grad.clone() for p in disc.parameters()])
    assert all(g is None for g in d_grads_at_zero_grad[0])  # the generator's backward gave D no gradient
    assert all(torch.equal(a, b) for a, b in zip(d_grads_at_zero_grad[1], d_grads_after[0]))
    assert all(p.requires_grad for p in disc.parameters())

    seg_params, d_params = trainable(ref_model), list(ref_disc.named_parameters())
    buffers, adam = {}, {}
    for step in (1, 2):
        source_logits, target_logits = ref_model(images)[1], ref_model(target)[1]
        target_map = up(target_logits, (32, 64)).softmax(1)
        loss = ce_mean(up(source_logits, (32, 64)), labels) + lam * (ref_disc(target_map) ** 2).mean()
        sgd_by_hand(seg_params, torch.autograd.grad(loss, [p for _, p in seg_params]), buffers, lr, 10, momentum, wd)
        source_map = up(source_logits.detach(), (32, 64)).softmax(1)
        d_loss = (ref_disc(source_map) ** 2).mean() + ((ref_disc(target_map.detach()) - 1) ** 2).mean()
        with torch.no_grad():
            for (name, p), g in zip(d_params, torch.autograd.grad(d_loss, [p for _, p in d_params])):
                m, v = adam.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
                m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
                adam[name] = m, v
                p -= lr_d * (m / (1 - 0.9 ** step)) / ((v / (1 - 0.99 ** step)).sqrt() + 1e-8)
    assert same_tensors(model.state_dict(), ref_model.state_dict(), rtol=1e-4, atol=1e-6) == []
    # Adam divides by sqrt(v): where D's gradient is tiny, float rounding moves a weight by up to ~1% of a step
    assert same_tensors(disc.state_dict(), ref_disc.state_dict(), rtol=1e-4, atol=2e-6) == []
    assert not torch.equal(model.head.classifier.weight, initial["head.classifier.weight"])


def stage1_args(**kw):
    return proda.Args(**{"proto_momentum": 0.3, "ema_momentum": 0.5, "proto_min_pixels": 5, **kw})


def test_stage1_step_matches_an_independent_reference():
    """EMA (train mode, no gradient) on the full frames -> features at 1/4; omega = softmax(-||f - eta||); pseudo =
    argmax(omega * soft label); loss = source CE + 0.1 CE + 1.0 RCE (weak view) + 10 KL(omega warped to the strong
    view || student's strong-view assignment; cut-out masked, mean over kept entries and classes) + 0.1 mean(-log p)
    (weak view); SGD for all parameters at one rate; then each prototype moves toward the mean EMA feature of each
    image whose EMA argmax has >= min_pixels of it, (1-m)^n eta + (1-(1-m)^n) mean (header), from the features the
    loss saw (the prototypes the loss used are the old ones); then EMA <- m EMA + (1-m) student, BN buffers copied.
    Trainable BN as ProDA's stage 1; larger momenta than ProDA's so that both updates show within two steps."""
    torch.manual_seed(0)
    model = proda.ProDANet("resnet18", 4, dropout=0.0)
    ema = copy.deepcopy(model).requires_grad_(False)
    ref_model, ref_ema = copy.deepcopy(model), copy.deepcopy(ema)
    args = stage1_args()
    lr, wd, momentum = 0.05, 2e-4, 0.9
    optimizer = torch.optim.SGD(model.param_groups(lr, 1.0), lr=lr, momentum=momentum, weight_decay=wd)
    images, labels, full = step_inputs()
    g = torch.Generator().manual_seed(1)
    weak, strong = torch.randn(2, 3, 32, 64, generator=g), torch.randn(2, 3, 32, 64, generator=g)
    soft = torch.randn(2, 4, 5, 9, generator=g).softmax(1)  # the warm-up softmax at stride 8 of the 32x64 frame
    prototypes = torch.randn(4, 256, generator=g)
    ref_prototypes, initial_prototypes = prototypes.clone(), prototypes.clone()
    rt = Runtime("cpu", amp=False)
    target = {"full": full, "weak": weak, "strong": strong, "geom": GEOM}
    for _ in range(2):
        proda.stage1_step(model, ema, prototypes, optimizer, rt, images, labels, target, soft, args)

    named, buffers, keep = trainable(ref_model), {}, cut_keep()
    for _ in range(2):
        with torch.no_grad():
            ema_feat, ema_logits = (up(t, (8, 16)) for t in ref_ema(full))
            omega = F.softmax(-distance(ema_feat, ref_prototypes), 1)
            pseudo = (omega * up(soft, (8, 16))).argmax(1)
            teacher = to_strong(omega, FLIP)
        source_logits = ref_model(images)[1]
        weak_logits = up(ref_model(weak)[1], (8, 16))
        strong_feat = up(ref_model(strong)[0], (8, 16))
        p = weak_logits.softmax(1).clamp(1e-7, 1)
        rce = -(p * F.one_hot(pseudo, 4).permute(0, 3, 1, 2).float().clamp(1e-4, 1).log()).sum(1).mean()
        log_student = F.log_softmax(-distance(strong_feat, ref_prototypes), 1)
        kl = (teacher * (teacher.log() - log_student)) * keep[:, None]
        loss = (ce_mean(up(source_logits, (32, 64)), labels) + 0.1 * ce_mean(weak_logits, pseudo) + 1.0 * rce
                + 10 * kl.sum() / (keep.sum() * 4) - 0.1 * F.log_softmax(weak_logits, 1).mean())
        sgd_by_hand(named, torch.autograd.grad(loss, [q for _, q in named]), buffers, lr, 1.0, momentum, wd)
        with torch.no_grad():
            winner, m = ema_logits.argmax(1), args.proto_momentum
            for k in range(4):
                means = [ema_feat[n][:, winner[n] == k].mean(1) for n in range(2)
                         if (winner[n] == k).sum() >= args.proto_min_pixels]
                if means:
                    keep_k = (1 - m) ** len(means)
                    ref_prototypes[k] = keep_k * ref_prototypes[k] + (1 - keep_k) * torch.stack(means).mean(0)
            for q_ema, q in zip(ref_ema.parameters(), ref_model.parameters()):
                q_ema.copy_(args.ema_momentum * q_ema + (1 - args.ema_momentum) * q)
            for b_ema, b in zip(ref_ema.buffers(), ref_model.buffers()):
                b_ema.copy_(b)
    assert same_tensors(model.state_dict(), ref_model.state_dict(), rtol=1e-4, atol=1e-5) == []
    assert same_tensors(ema.state_dict(), ref_ema.state_dict(), rtol=1e-4, atol=1e-5) == []
    assert torch.allclose(prototypes, ref_prototypes, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ema.layer1[0].bn1.running_mean, torch.zeros(64))  # BN statistics moved and were copied
    assert (prototypes - initial_prototypes).abs().amax(1).gt(1e-3).sum() >= 2  # several prototypes moved


def test_distill_step_matches_an_independent_reference():
    """Hard labels (confidence <= 0.95 ignored) flipped to the strong view, cut-out ignored; loss = source CE +
    CE(student's strong-view logits at 1/4, hard labels) + KL(p_teacher || p_student) summed over classes, mean over
    pixels (the frozen eval-mode teacher on the same strong image); SGD, head and bn_pretrain x10. The student has
    ProDA's bn_pretrain (its SimCLRv2 stage 2); the teacher stays untouched."""
    torch.manual_seed(0)
    student = proda.ProDANet("resnet18", 4, bn_clr=True, dropout=0.0)
    teacher = proda.ProDANet("resnet18", 4, frozen_bn=True, dropout=0.0).eval().requires_grad_(False)
    with torch.no_grad():  # confident, input-dependent teacher predictions, so that the KD term shows
        teacher.head.classifier.weight.mul_(100)
    ref_student, teacher_before = copy.deepcopy(student), copy.deepcopy(teacher.state_dict())
    args = proda.Args()
    lr, wd, momentum = 0.01, 2e-4, 0.9
    optimizer = torch.optim.SGD(student.param_groups(lr, 10), lr=lr, momentum=momentum, weight_decay=wd)
    images, labels, strong = step_inputs()
    g = torch.Generator().manual_seed(2)
    hard = torch.randint(0, 4, (2, 8, 16), generator=g).to(torch.uint8)  # 1/4 of the 32x64 frame
    conf = (0.9 + 0.1 * torch.rand(2, 8, 16, generator=g)).half()
    teacher_strong = strong * 0.5 + 0.1  # the teacher's own input normalisation
    rt = Runtime("cpu", amp=False)
    for _ in range(2):
        proda.distill_step(student, teacher, optimizer, rt, images, labels, strong, teacher_strong, hard, conf, GEOM,
                           args)

    with torch.no_grad():
        assert (teacher(teacher_strong)[1].softmax(1) - teacher(strong)[1].softmax(1)).abs().max() > 0.1
    target = hard.long().masked_fill(conf.float() <= 0.95, 255)
    target = to_strong(target, FLIP).masked_fill(~cut_keep(), 255)
    named, buffers = trainable(ref_student), {}
    for _ in range(2):
        with torch.no_grad():
            p_teacher = up(teacher(teacher_strong)[1], (8, 16)).softmax(1)
        source_logits = ref_student(images)[1]  # source first: BN statistics see the batches in ProDA's order
        strong_logits = up(ref_student(strong)[1], (8, 16))
        kd = (p_teacher * (p_teacher.log() - strong_logits.log_softmax(1))).sum(1).mean()
        loss = ce_mean(up(source_logits, (32, 64)), labels) + ce_mean(strong_logits, target) + 1.0 * kd
        sgd_by_hand(named, torch.autograd.grad(loss, [q for _, q in named]), buffers, lr, 10, momentum, wd)
    assert same_tensors(student.state_dict(), ref_student.state_dict(), rtol=1e-4, atol=1e-6) == []
    assert same_tensors(teacher.state_dict(), teacher_before) == []
    assert (target == 255).float().mean() > 0.2  # the threshold and the cut-out both removed labels


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of every stage (2 warm-up + 3 x 2 stage iterations), the flags of EQUAL."""
    out = str(tmp_path_factory.mktemp("proda") / "all")
    run("--out", out, *EQUAL)
    return out


def train_rows(out, stage):
    with open(os.path.join(out, stage, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "seg_src" in row]


def test_run_folder(full_run):
    for name in ("config.json", "results.json", "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(full_run, name)), name
    assert os.listdir(os.path.join(full_run, "predictions"))
    keys = {"warmup": {"seg_src", "adv_main", "d_main"}, "stage1": {"seg_src", "sce", "proto_kl", "reg"},
            "stage2": {"seg_src", "seg_tgt", "kd"}, "stage3": {"seg_src", "seg_tgt", "kd"}}
    for stage, want in keys.items():
        rows = train_rows(full_run, stage)
        assert want <= set(rows[0]) and all(math.isfinite(rows[0][k]) for k in want), stage
        with open(os.path.join(full_run, stage, "results.json")) as f:
            assert json.load(f)["stage"] == stage
        assert load(os.path.join(full_run, stage, "checkpoints", "last.pt"))["iter"] == 2
    with open(os.path.join(full_run, "results.json")) as f:
        top = json.load(f)
    assert top["stage"] == "stage3" and top["total_iters"] == 8 and 0 <= top["miou"] <= 100
    last = load(os.path.join(full_run, "checkpoints", "last.pt"))
    assert last["stage"] == "stage3" and "optimizer0" in last
    assert not os.path.exists(os.path.join(full_run, "stage1", "checkpoints", "best.pt"))  # --handover last


def test_stored_pseudo_labels(full_run):
    soft = np.load(os.path.join(full_run, "stage1", "pseudo", "soft.npy"), mmap_mode="r")
    assert soft.dtype == np.float16 and soft.shape == (4, 8, 5, 9)  # stride 8 of 32x64 (ceil-mode pool)
    assert np.allclose(np.asarray(soft, np.float32).sum(1), 1.0, atol=1e-2)
    labels = np.load(os.path.join(full_run, "stage2", "pseudo", "labels.npy"), mmap_mode="r")
    conf = np.load(os.path.join(full_run, "stage2", "pseudo", "conf.npy"), mmap_mode="r")
    assert labels.dtype == np.uint8 and conf.dtype == np.float16 and labels.shape == conf.shape == (4, 8, 16)
    assert labels.max() < 8 and (np.asarray(conf) > 0).all()


def test_update_rules_in_checkpoints(full_run):
    warm, stage1, stage2, stage3 = (load(os.path.join(full_run, s, "checkpoints", "last.pt"))
                                    for s in ("warmup", "stage1", "stage2", "stage3"))
    init = proda.ProDANet("resnet18", 8).state_dict()
    # EQUAL: BN frozen (statistics and affine) up to stage 2, trained in stage 3
    assert "disc_main" in warm and not torch.equal(warm["model"]["conv1.weight"], init["conv1.weight"])
    for k in ("bn1.weight", "bn1.running_mean", "layer4.1.bn2.running_var"):
        assert torch.equal(warm["model"][k], init[k]) and torch.equal(stage2["model"][k], init[k]), k
        assert not torch.equal(stage3["model"][k], stage2["model"][k]), k
    assert not torch.equal(stage1["model"]["conv1.weight"], warm["model"]["conv1.weight"])
    # EMA between warm-up and student, prototypes moved away from their warm-up init
    ema, student, start = (stage1["ema"]["conv1.weight"], stage1["model"]["conv1.weight"],
                           warm["model"]["conv1.weight"])
    assert not torch.equal(ema, student) and not torch.equal(ema, start)
    protos = load(os.path.join(full_run, "stage1", "pseudo", "prototypes.pt"))
    assert stage1["prototypes"].shape == (8, 256) and not torch.equal(stage1["prototypes"], protos)
    # stage 2 (quick: the student starts from the teacher) trains the student, on some hard labels (threshold 0.3)
    assert not torch.equal(stage2["model"]["conv1.weight"], stage1["model"]["conv1.weight"])
    assert all(row["pseudo_weight"] > 0 for row in train_rows(full_run, "stage2"))


def test_resume_within_and_between_stages(full_run, tmp_path):
    """Stopped after 1 of 2 warm-up iterations, then after 1 of 2 stage-1 iterations: each resumed process says
    where it starts and logs only later iterations (a silent restart from 0 fails both), and the run ends with the
    uninterrupted run's networks (D, EMA and prototypes too) and pseudo-labels."""
    out = str(tmp_path / "split")
    run("--out", out, *EQUAL, "--stage", "warmup", "--warmup-iters", "1")
    proc = run("--out", out, *EQUAL, "--stage", "warmup", "--resume", "auto")
    assert "resumed warmup from" in proc.stdout and "at iteration 1" in proc.stdout
    assert [r["iter"] for r in train_rows(out, "warmup")] == [1, 2]
    run("--out", out, *EQUAL, "--stage", "stage1", "--iters", "1")
    proc = run("--out", out, *EQUAL, "--resume", "auto")  # stage 1 from 1, then stages 2 and 3 from the run folder
    assert "resumed stage1 from" in proc.stdout and "at iteration 1" in proc.stdout
    assert [r["iter"] for r in train_rows(out, "stage1")] == [1, 2]
    for stage, parts in (("warmup", ("model", "disc_main")), ("stage1", ("model", "ema")), ("stage3", ("model",))):
        a = load(os.path.join(full_run, stage, "checkpoints", "last.pt"))
        b = load(os.path.join(out, stage, "checkpoints", "last.pt"))
        for part in parts:
            assert same_tensors(a[part], b[part]) == [], (stage, part)
        if stage == "stage1":
            assert torch.equal(a["prototypes"], b["prototypes"])
    for name in ("labels.npy", "conf.npy"):  # stage 2's inputs come from the (resumed) stage 1
        assert np.array_equal(np.load(os.path.join(full_run, "stage2", "pseudo", name)),
                              np.load(os.path.join(out, "stage2", "pseudo", name)))
    bad = run("--out", out, "--resume", os.path.join(out, "stage3", "checkpoints", "last.pt"), check=False)
    assert_one_line_error(bad, "weights only")


def test_handover_best_and_a_frozen_warmup(tmp_path):
    """--handover best: best.pt is the best of the stage's evaluations (the newest of equals), and the next stage
    reads it (without it: one error line). --freeze-bn-stages warmup (the paper's): the warm-up keeps its initial
    BN statistics and affine (stage 1 trains them: test_released_models_as_starting_points)."""
    out = str(tmp_path / "best")
    flags = ("--out", out, "--handover", "best", "--freeze-bn-stages", "warmup")
    run(*flags, "--stage", "warmup", "--eval-every", "1")
    with open(os.path.join(out, "warmup", "metrics.jsonl")) as f:
        evals = [row for row in map(json.loads, f) if "val_miou" in row]
    best = load(os.path.join(out, "warmup", "checkpoints", "best.pt"))
    top = max(row["val_miou"] for row in evals)
    assert best["miou"] == pytest.approx(top) and best["iter"] == max(r["iter"] for r in evals if r["val_miou"] == top)
    init = proda.ProDANet("resnet18", 8).state_dict()
    for k in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "layer3.1.bn2.running_var"):
        assert torch.equal(best["model"][k], init[k]), k
    assert not torch.equal(best["model"]["conv1.weight"], init["conv1.weight"])
    os.remove(os.path.join(out, "warmup", "checkpoints", "best.pt"))
    assert_one_line_error(run(*flags, "--stage", "stage1", "--iters", "1", check=False), "best.pt")


def official_eval(net, data_root, size):
    """ProDA's test.py on our tiny Cityscapes folder, written out: image resized bilinearly, RGB/255, the stride-8
    logits upsampled to the label size with align_corners=True, argmax, IoU per class over the whole set."""
    from common.data import domain_split
    split = domain_split("cityscapes", "val", data_root)
    confusion = torch.zeros(19, 19, dtype=torch.int64)
    net.eval()
    for i in range(len(split)):
        image, label = split.load(i)
        small = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR), np.float32) / 255
        with torch.no_grad():
            logits = net(torch.from_numpy(small).permute(2, 0, 1)[None])[1]
        pred = up(logits, label.shape).argmax(1)[0]
        label = torch.from_numpy(label.astype(np.int64))
        valid = label != 255
        confusion += torch.bincount(label[valid] * 19 + pred[valid], minlength=361).view(19, 19)
    tp = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    return {name: (100 * tp[k] / union[k]).item() for k, name in enumerate(split.classes) if union[k] > 0}


def test_released_model_evaluates_through_eval_only(tmp_path):
    """--eval-only --weights <ProDA's stage-3 file> on a tiny Cityscapes folder, no other flag: resnet18 (from the
    file here), bn_pretrain and RGB/255 applied and recorded, every tensor loaded, ProDA's test protocol (the
    per-class IoU of official_eval), predictions in the benchmark format; another script's file: one error line."""
    names = released.cityscapes_tree(str(tmp_path / "data"))
    net = released_proda.randomize(proda.ProDANet("resnet18", 19, bn_clr=True))
    path = tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl"
    torch.save(released_proda.proda_release(net.state_dict()), path)
    out, preds = tmp_path / "eval", tmp_path / "preds"
    base = ["--data-root", tmp_path / "data", "--eval-size", "32", "64", "--num-workers", "0", "--device", "cpu"]
    proc = run("--eval-only", "--weights", path, *base, "--out", out, "--save-predictions", preds, tiny=False)
    assert "recognised ProDA stage-2/3 release (bn_pretrain) (--weights): unit input, stride on 1x1, bn_pretrain: " \
           "True, resnet18 (its own evaluation: 57.5 mIoU)" in proc.stdout
    assert "loaded 154 of 154 tensors from --weights" in proc.stdout
    config, results = (json.loads((out / f).read_text()) for f in ("config.json", "results.json"))
    assert (config["args"]["bn_clr"], config["args"]["normalization"], config["args"]["backbone"]) == \
        (True, "unit", "resnet18")
    assert results["loaded"]["kind"] == "ProDA stage-2/3 release (bn_pretrain)" and results["iters"] == 62001
    assert results["loaded"]["file_miou"] == 57.5 and results["loaded"]["implied"]["bn_clr"] is True
    want = official_eval(net, str(tmp_path / "data"), (32, 64))
    assert {k: v for k, v in results["per_class_iou"].items() if not math.isnan(v)} == pytest.approx(want, abs=1e-6)
    files = sorted(os.listdir(preds))
    assert files == [f"{n}_leftImg8bit.png" for n in names]
    saved = np.asarray(Image.open(preds / files[0]))
    assert saved.shape == (64, 128) and set(np.unique(saved)) <= set(released.CITYSCAPES_LABEL_IDS)
    other = tmp_path / "source_only.pt"
    torch.save({"script": "source_only", "num_classes": 19, "model": {}}, other)
    assert_one_line_error(run("--eval-only", "--weights", other, *base, "--out", tmp_path / "bad", tiny=False,
                              check=False), "written by source_only, not a ProDA model", "ProDA's released models")


def unit_input(split, index, size=(32, 64)):
    from common.data import resize_pair
    image = resize_pair(split.load(index, False)[0], None, size, interpolation="bilinear")[0]
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None] / 255


def test_released_models_as_starting_points(tmp_path):
    """Stage 1 from ProDA's warm-up file (its soft labels computed from it, RGB/255); stage 2 with a released
    stage-1 teacher (its flip-TTA hard labels) and the SimCLRv2 student with bn_pretrain; stage 3 from a released
    stage-2 model with bn_pretrain (the student starts from it: its frozen BN statistics are the file's)."""
    from common.data import domain_split
    frames = domain_split("toy-real", "train", labelled=False)
    warm = released_proda.randomize(proda.ProDANet("resnet18", 8), seed=1)
    warm_file = tmp_path / "warmup.pkl"
    torch.save(released_proda.proda_release(warm.state_dict(), disc_state=proda.ProDADiscriminator(8).state_dict()),
               warm_file)
    out = tmp_path / "s1"
    proc = run("--out", out, "--stage", "stage1", "--iters", "1", "--warmup-checkpoint", warm_file)
    assert "recognised ProDA warm-up release (--warmup-checkpoint)" in proc.stdout
    assert "loaded 149 of 149 tensors from --warmup-checkpoint" in proc.stdout
    soft = np.load(out / "stage1" / "pseudo" / "soft.npy")
    with torch.no_grad():
        want = warm.eval()(unit_input(frames, 2))[1].softmax(1)[0].numpy()
    assert np.allclose(soft[2].astype(np.float32), want, atol=2e-3)
    stage1 = load(out / "stage1" / "checkpoints" / "last.pt")
    assert stage1["normalization"] == "unit"
    assert not torch.equal(stage1["model"]["bn1.running_mean"], warm.state_dict()["bn1.running_mean"])  # BN trains
    assert json.loads((out / "config.json").read_text())["loaded"][0]["flag"] == "--warmup-checkpoint"

    teacher = released_proda.randomize(proda.ProDANet("resnet18", 8), seed=2)
    teacher_file, student_file = tmp_path / "stage1.pkl", tmp_path / "r101_1x_sk0.pth"
    torch.save(released_proda.proda_release(teacher.state_dict()), teacher_file)
    torch.save(released_proda.simclr_init(released_proda.randomize(proda.ProDANet("resnet18", 8), 3).state_dict()),
               student_file)
    out = tmp_path / "s2"
    proc = run("--out", out, "--stage", "stage2", "--iters", "1", "--teacher-checkpoint", teacher_file,
               "--student-init", student_file, "--bn-clr", "--normalization", "unit", "--freeze-bn-stages", "stage3")
    assert "recognised ResNet backbone (torchvision names) (--student-init): resnet18" in proc.stdout
    labels = np.load(out / "stage2" / "pseudo" / "labels.npy")
    with torch.no_grad():
        x = unit_input(frames, 1)
        prob = (teacher.eval()(x)[1].softmax(1) + teacher(x.flip(-1))[1].softmax(1).flip(-1)) / 2
    assert (labels[1] == up(prob, (8, 16)).argmax(1)[0].numpy()).mean() > 0.99
    student = load(out / "stage2" / "checkpoints" / "last.pt")["model"]
    assert "head_bn.weight" in student and not torch.equal(student["head_bn.weight"], torch.ones(512))

    stage2 = released_proda.randomize(proda.ProDANet("resnet18", 8, bn_clr=True), seed=4)
    stage2_file = tmp_path / "stage2.pkl"
    torch.save(released_proda.proda_release(stage2.state_dict()), stage2_file)
    out = tmp_path / "s3"
    run("--out", out, "--stage", "stage3", "--iters", "1", "--teacher-checkpoint", stage2_file)
    student = load(out / "stage3" / "checkpoints" / "last.pt")["model"]
    for k in ("head_bn.running_mean", "bn1.running_var", "layer4.1.bn2.running_mean"):  # quick: stage-3 BN frozen
        assert torch.equal(student[k], stage2.state_dict()[k]), k
    assert not torch.equal(student["conv1.weight"], stage2.state_dict()["conv1.weight"])


def test_two_processes_equal_one_process(full_run, tmp_path):
    """2 gloo processes x batch 1 under the collective guard end every stage with the networks of 1 process x
    batch 2 (the full run): warm-up segmenter and D, stage-1 student, EMA and prototypes (identical on both ranks,
    the run checks), stage-2 student; EQUAL says what makes them equal. Stage 3 trains BN: its final, sharded
    evaluation must score the network rank 0 checkpoints (= --eval-only of it in one process)."""
    ddp = tmp_path / "ddp"
    proc = run("--out", ddp, *EQUAL, cmd=TORCHRUN)
    assert "prototypes and EMA weights: identical on all 2 ranks" in proc.stdout + proc.stderr
    # measured: segmenters and EMA within 1e-7, D (Adam) and prototypes within 1e-6; per-process loss means (each
    # process dividing by its own pixel count) move stage 1 by 5e-6 and stage 2 by 4e-5
    for stage, parts in (("warmup", ("model", "disc_main")), ("stage1", ("model", "ema")), ("stage2", ("model",))):
        a, b = (load(os.path.join(out, stage, "checkpoints", "last.pt")) for out in (full_run, ddp))
        for part in parts:
            atol = 1e-5 if part == "disc_main" else 1e-6
            assert same_tensors(a[part], b[part], rtol=1e-5, atol=atol) == [], (stage, part)
        if stage == "stage1":
            assert torch.allclose(a["prototypes"], b["prototypes"], rtol=1e-5, atol=1e-5)
    assert json.loads((ddp / "config.json").read_text())["args"]["world_size"] == 2
    assert [r["iter"] for r in train_rows(ddp, "stage2")] == [1, 2]  # rank 0 alone logs
    again = tmp_path / "again"
    run("--eval-only", "--weights", ddp / "stage3" / "checkpoints" / "last.pt", "--out", again)
    assert json.loads((ddp / "results.json").read_text())["per_class_iou"] == \
        json.loads((again / "results.json").read_text())["per_class_iou"]


def test_dry_run(tmp_path):
    """Reads no data; the files it starts from are recognised first, their flags applied and recorded."""
    warm = tmp_path / "model.pkl"
    torch.save(released_proda.proda_release(proda.ProDANet("resnet18", 8).state_dict()), warm)
    out = str(tmp_path / "dry")
    run("--out", out, "--dry-run", "--warmup-checkpoint", warm, "--backbone", "resnet50")
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["script"] == "proda" and {"model", "disc_main"} <= set(config["params"])
    assert config["stages"] == ["stage1", "stage2", "stage3"] and config["args"]["warmup_poly_horizon"] == 10
    assert config["loaded"] == [{"flag": "--warmup-checkpoint", "file": str(warm), "kind": "ProDA stage-1 release",
                                 "implied": {"stride_on": "1x1"}, "file_miou": 57.5}]
    assert config["args"]["backbone"] == "resnet50"  # typed: beats the file (which would then not load)
