"""proda.py: the paper preset against the official recipe; prototypes, losses, warps and augmentations on
hand-made tensors; shared blocks identical to source_only.py and adaptsegnet.py; smoke runs of every stage
(quick preset, 32x64 toy frames, 1-2 iterations per stage, 2 eval images), BN freezing, the best-on-val
hand-over, resume within and between stages, and a 2-process torchrun run."""
import dataclasses
import importlib
import inspect
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
proda = importlib.import_module("proda")
source_only = importlib.import_module("source_only")
adaptsegnet = importlib.import_module("adaptsegnet")
from common.cli import field_docs  # noqa: E402

TINY = ["--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--batch-size", "2", "--log-every", "1",
        "--source-size", "32", "64", "--target-size", "32", "64", "--crop-size", "32", "64", "--eval-size", "32",
        "64", "--resize-width", "69", "--num-predictions", "1", "--target-limit", "4", "--poly-horizon", "10",
        "--warmup-iters", "2", "--iters", "2", "--checkpoint-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(*args, cmd=None, check=True):
    cmd = cmd or [sys.executable, "proda.py"]
    proc = subprocess.run([*cmd, *TINY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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
        "handover": "last", "student_init": "init", "kd_legacy": False,  # deliberate differences (docstring)
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


def test_network_and_discriminator_shapes():
    net = proda.ProDANet("resnet18", 8)
    feat, logits = net(torch.rand(2, 3, 64, 128))
    assert feat.shape == (2, 256, 9, 17) and logits.shape == (2, 8, 9, 17)  # output stride 8, ceil-mode pool
    assert net.head.classifier.bias is None
    assert all(m.weight.requires_grad for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any("aspp" in type(m).__name__.lower() for m in net.modules() if list(m.parameters()))
    heads = {id(p) for p in net.param_groups(1.0, 10.0)[1]["params"]}
    assert {id(p) for p in net.head.parameters()} == heads
    disc = proda.ProDADiscriminator(8)
    assert disc(torch.rand(2, 8, 64, 128)).shape == (2, 1, 4, 8)  # four stride-2 3x3 convs, then 1x1
    assert [m.kernel_size for m in disc.modules() if isinstance(m, torch.nn.Conv2d)] == [(3, 3)] * 4 + [(1, 1)]


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


def test_every_field_has_help():
    docs = field_docs(proda.Args)
    for f in proda.Args.__dataclass_fields__.values():
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f.name


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of every stage (2 warm-up + 3 x 2 stage iterations)."""
    out = str(tmp_path_factory.mktemp("proda") / "all")
    run("--out", out)
    return out


def test_run_folder(full_run):
    for name in ("config.json", "results.json", "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(full_run, name)), name
    assert os.listdir(os.path.join(full_run, "predictions"))
    keys = {"warmup": {"seg_src", "adv_main", "d_main"}, "stage1": {"seg_src", "sce", "proto_kl", "reg"},
            "stage2": {"seg_src", "seg_tgt", "kd"}, "stage3": {"seg_src", "seg_tgt", "kd"}}
    for stage, want in keys.items():
        with open(os.path.join(full_run, stage, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
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
    warm, stage1, stage2 = (load(os.path.join(full_run, s, "checkpoints", "last.pt"))
                            for s in ("warmup", "stage1", "stage2"))
    init = proda.ProDANet("resnet18", 8).state_dict()
    # quick preset: BN trains in the warm-up and stage 1, frozen in stages 2/3
    assert not torch.equal(warm["model"]["bn1.weight"], init["bn1.weight"]) and "disc_main" in warm
    assert not torch.equal(stage1["model"]["bn1.weight"], warm["model"]["bn1.weight"])
    assert not torch.equal(stage1["model"]["conv1.weight"], warm["model"]["conv1.weight"])
    # EMA between warm-up and student, prototypes moved away from their warm-up init
    ema, student, start = (stage1["ema"]["conv1.weight"], stage1["model"]["conv1.weight"],
                           warm["model"]["conv1.weight"])
    assert not torch.equal(ema, student) and not torch.equal(ema, start)
    protos = load(os.path.join(full_run, "stage1", "pseudo", "prototypes.pt"))
    assert stage1["prototypes"].shape == (8, 256) and not torch.equal(stage1["prototypes"], protos)
    # stage 2 (quick: student starts from the teacher, BN frozen) trains the student's convolutions only
    assert not torch.equal(stage2["model"]["conv1.weight"], stage1["model"]["conv1.weight"])
    for k in ("bn1.weight", "bn1.running_mean", "bn1.running_var", "layer4.1.bn2.running_mean"):
        assert torch.equal(stage2["model"][k], stage1["model"][k]), k


def test_freeze_bn_stages(tmp_path):
    """`--freeze-bn-stages warmup` (the paper's): the warm-up keeps its initial BN statistics and affine, and
    stage 2's student (not listed) trains both."""
    out = str(tmp_path / "freeze")
    flags = ("--out", out, "--warmup-iters", "1", "--iters", "1", "--freeze-bn-stages", "warmup")
    run(*flags, "--stage", "warmup")
    run(*flags, "--stage", "stage1")
    run(*flags, "--stage", "stage2")
    warm, stage1, stage2 = (load(os.path.join(out, s, "checkpoints", "last.pt"))["model"]
                            for s in ("warmup", "stage1", "stage2"))
    init = proda.ProDANet("resnet18", 8).state_dict()
    for k in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert torch.equal(warm[k], init[k]), k
    assert not torch.equal(stage2["bn1.running_mean"], stage1["bn1.running_mean"])
    assert not torch.equal(stage2["bn1.weight"], stage1["bn1.weight"])
    bad = run("--out", out, "--freeze-bn-stages", "stage4", check=False)
    assert bad.returncode == 2 and "error:" in bad.stderr + bad.stdout


def test_handover_best(tmp_path):
    """--handover best: best.pt is the best of the stage's evaluations (the newest of equals), and the next
    stage starts from it; without best.pt the next stage stops with one error line."""
    out = str(tmp_path / "best")
    run("--out", out, "--stage", "warmup", "--handover", "best", "--eval-every", "1")
    with open(os.path.join(out, "warmup", "metrics.jsonl")) as f:
        evals = [row for row in map(json.loads, f) if "val_miou" in row]
    best = load(os.path.join(out, "warmup", "checkpoints", "best.pt"))
    top = max(row["val_miou"] for row in evals)
    assert best["miou"] == pytest.approx(top) and best["iter"] == max(r["iter"] for r in evals if r["val_miou"] == top)
    proc = run("--out", out, "--stage", "stage1", "--handover", "best", "--iters", "1")
    assert proc.returncode == 0
    os.remove(os.path.join(out, "warmup", "checkpoints", "best.pt"))
    bad = run("--out", out, "--stage", "stage1", "--handover", "best", "--iters", "1", check=False)
    assert bad.returncode == 2 and "best.pt" in bad.stderr


def test_resume_within_and_between_stages(full_run, tmp_path):
    out = str(tmp_path / "split")
    run("--out", out, "--stage", "warmup")
    run("--out", out, "--stage", "stage1", "--iters", "1")  # stage 1 stops after 1 of 2 iterations
    proc = run("--out", out, "--resume", "auto")  # resumes stage 1 at 1, then stages 2 and 3 read their inputs
    assert "resumed stage1" in proc.stdout + proc.stderr
    for stage in ("stage1", "stage3"):
        a = load(os.path.join(full_run, stage, "checkpoints", "last.pt"))
        b = load(os.path.join(out, stage, "checkpoints", "last.pt"))
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (stage, k)
    for name in ("labels.npy", "conf.npy"):  # stage 2's inputs come from the (resumed) stage 1
        assert np.array_equal(np.load(os.path.join(full_run, "stage2", "pseudo", name)),
                              np.load(os.path.join(out, "stage2", "pseudo", name)))
    bad = run("--out", out, "--resume", os.path.join(out, "stage3", "checkpoints", "last.pt"), check=False)
    assert bad.returncode == 2 and "weights only" in bad.stderr


def test_dry_run(tmp_path):
    out = str(tmp_path / "dry")
    run("--out", out, "--dry-run")
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["script"] == "proda" and {"model", "disc_main"} <= set(config["params"])
    assert config["stages"] == ["warmup", "stage1", "stage2", "stage3"]
    assert config["args"]["warmup_poly_horizon"] == 10


def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "proda.py"]
    proc = run("--out", out, "--warmup-iters", "1", "--iters", "1", cmd=cmd)
    assert "prototypes and EMA weights: identical on all 2 ranks" in proc.stdout + proc.stderr
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["stage"] == "stage3"
