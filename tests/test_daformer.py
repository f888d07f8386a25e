"""daformer.py: the network and checkpoint loading, every DAFormer rule on hand-made tensors, then smoke runs
(run folder, eval-only, resume, dry run, ablation switches, torchrun, one-line errors)."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import daformer
from common.cli import UserError, field_docs
from common.data import CITYSCAPES_CLASSES, DomainSplit
from common.runtime import Runtime
from conftest import ROOT, run_script

TOY_CLASSES = ["road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car"]


# ----------------------------------------------------------------------------------------------------
# network and init
def test_every_field_has_help_text_with_its_default():
    docs = field_docs(daformer.Args)
    fields = [f.name for f in dataclasses.fields(daformer.Args) if not f.metadata.get("runtime")]
    assert [f for f in fields if not docs.get(f)] == []
    assert "0.999" in docs["ema_alpha"] and "0.968" in docs["pseudo_threshold"] and "0.005" in docs["fd_lambda"]


def test_decoder_parameter_count_and_shapes():
    head = daformer.DecodeHead([64, 128, 320, 512], 19, 256, decoder="daformer")
    assert sum(p.numel() for p in head.parameters()) == 3_712_275  # DAFormer's decoder (methods.md 9b)
    segformer = daformer.DecodeHead([64, 128, 320, 512], 19, 256, decoder="segformer")
    assert sum(p.numel() for p in segformer.parameters()) == 263_168 + 262_144 + 512 + 4_883  # embed, 1x1 fuse, BN, cls
    # depthwise-separable dilated branches 6/12/18 after a 1x1 branch, 3x3 bottleneck, no conv bias before BN
    dilations = [branch[0][0].dilation[0] for branch in head.branches[1:]]
    assert dilations == [6, 12, 18] and head.branches[1][0][0].groups == 1024 and head.fuse[0].kernel_size == (3, 3)
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Conv2d) and m is not head.classifier)
    model = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32).eval()
    feats, logits = model(torch.zeros(2, 3, 64, 96))
    assert [f.shape[1:] for f in feats] == [(32, 16, 24), (64, 8, 12), (160, 4, 6), (256, 2, 3)]
    assert logits.shape == (2, 8, 16, 24)  # H/4
    assert isinstance(model.encoder.stages[0].blocks[0].drop_path1, nn.Identity)  # linear rate, 0 first
    assert daformer.DAFormerNet("pvt_v2_b0", 8).encoder.stages[3].blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(UserError, match="unknown backbone"):
        daformer.DAFormerNet("resnet50", 8)


def segformer_names(timm_state):
    """The reverse of timm's checkpoint_filter_fn: timm PVT-v2 names -> SegFormer MiT (mit_b5.pth) names."""
    out = {}
    for k, v in timm_state.items():
        k = k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        k = re.sub(r"^patch_embed\.", "patch_embed1.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}.", k)
        k = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", k)
        out[k] = v.clone()
    return out


def test_segformer_mit_checkpoint_lands_completely(tmp_path):
    source = timm.create_model("pvt_v2_b0", num_classes=0)
    mit = segformer_names(source.state_dict())
    assert {"patch_embed1.proj.weight", "patch_embed4.norm.weight", "block1.0.mlp.dwconv.dwconv.weight",
            "block4.1.attn.q.weight", "block1.0.attn.sr.weight", "norm4.weight"} <= set(mit)
    assert not any(k.startswith("stages") for k in mit)
    mit["head.weight"], mit["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)  # ImageNet classifier
    path = tmp_path / "mit_b0_like.pth"
    torch.save(mit, path)
    model = daformer.DAFormerNet("pvt_v2_b0", 8)
    assert daformer.load_init(model, str(path), "pvt_v2_b0") == ("imagenet", "imagenet")  # strict: raises on any
    # missing or unexpected key
    loaded = model.encoder.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    # an mmseg-style file (state_dict with backbone./decode_head. prefixes) loads the same way
    torch.save({"state_dict": {**{"backbone." + k: v for k, v in mit.items()}, "decode_head.x": torch.zeros(1)}},
               tmp_path / "mmseg.pth")
    model2 = daformer.DAFormerNet("pvt_v2_b0", 8)
    assert daformer.load_init(model2, str(tmp_path / "mmseg.pth"), "pvt_v2_b0")[1] == "trained"  # a segmentor
    assert all(torch.equal(model2.encoder.state_dict()[k], v) for k, v in loaded.items())
    del mit["norm4.weight"]
    torch.save(mit, path)
    with pytest.raises(UserError, match="1 missing"):
        daformer.load_init(daformer.DAFormerNet("pvt_v2_b0", 8), str(path), "pvt_v2_b0")
    with pytest.raises(UserError, match="does not fit"):
        daformer.load_init(daformer.DAFormerNet("pvt_v2_b1", 8), str(tmp_path / "mmseg.pth"), "pvt_v2_b1")
    with pytest.raises(UserError, match="--init .*missing.pth: no such file"):
        daformer.load_init(model2, str(tmp_path / "missing.pth"), "pvt_v2_b0")


def test_fd_encoder_holds_imagenet_weights_whatever_init_loaded(tmp_path, monkeypatch):
    """The official imnet_model is built from the ImageNet file, never from load_from (dacs.py:82-83)."""
    imagenet = timm.create_model("pvt_v2_b0", num_classes=0).state_dict()  # stands in for timm's ImageNet file
    monkeypatch.setattr(daformer, "imagenet_weights", lambda backbone, flag: imagenet)
    trained = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32)  # one of our checkpoints
    torch.save({"model": trained.state_dict()}, tmp_path / "ours.pt")
    mit_file = tmp_path / "mit_b0_like.pth"  # an ImageNet encoder file in SegFormer's names
    torch.save(segformer_names(imagenet), mit_file)

    def fd_weights(init, fd_init="auto"):
        model = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32)
        _, student_init = daformer.load_init(model, init, "pvt_v2_b0")
        encoder = daformer.fd_encoder(model, fd_init, student_init, "pvt_v2_b0")
        assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
        return model.encoder.state_dict(), encoder.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in b)

    student, fd = fd_weights(str(tmp_path / "ours.pt"))  # --init a trained checkpoint: FD still ImageNet
    assert same(student, trained.encoder.state_dict()) and same(fd, imagenet) and not same(fd, student)
    student, fd = fd_weights(str(tmp_path / "ours.pt"), str(mit_file))  # --fd-init PATH
    assert same(fd, imagenet)
    for init in ("imagenet", str(mit_file)):  # the student starts from ImageNet weights: FD is their copy
        student, fd = fd_weights(init)
        assert same(student, imagenet) and same(fd, imagenet)
    student, fd = fd_weights("none")  # quick preset: the random initial encoder (header deviation)
    assert same(fd, student) and not same(fd, imagenet)
    student, fd = fd_weights("none", "imagenet")
    assert same(fd, imagenet)
    with pytest.raises(UserError, match="trained segmentation model"):
        fd_weights("none", str(tmp_path / "ours.pt"))


def test_fd_classes_list_flag_and_errors_say_what_to_pass():
    args = daformer.parse_args(daformer.Args, daformer.PRESETS, ["--fd-classes", "car", "person"])
    assert args.fd_classes == ["car", "person"]
    assert daformer.fd_class_ids(args.fd_classes, TOY_CLASSES) == [7, 6]
    cityscapes = list(CITYSCAPES_CLASSES)
    assert daformer.fd_class_ids([], cityscapes) == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]  # gta2cs config :27
    assert daformer.fd_class_ids([], TOY_CLASSES) == [6, 7]
    with pytest.raises(UserError, match=r"has none of the paper's .*--fd-classes NAME \[NAME ...\] or pass --no-fd"):
        daformer.fd_class_ids([], ["ground", "wall"])  # a folder dataset without thing classes
    with pytest.raises(UserError, match="--fd-classes: unicorn not in the class list"):
        daformer.fd_class_ids(["car", "unicorn"], TOY_CLASSES)


def test_flags_of_a_switched_off_part_are_refused():
    def check(*argv):
        daformer.check_switched_flags(daformer.parse_args(daformer.Args, daformer.PRESETS, list(argv)))

    check("--no-fd", "--no-rcs", "--no-warmup", "--source-only")  # switches alone
    check("--preset", "quick", "--source-only")  # the quick preset's EMA alpha is not typed
    check("--fd-lambda", "0.01", "--rcs-temperature", "0.1", "--warmup-iters", "10", "--ema-alpha", "0.9")
    for argv, fragment in ((["--no-fd", "--fd-classes", "car"], "--no-fd turns off what --fd-classes set"),
                           (["--no-rcs", "--rcs-min-pixels", "10"], "--no-rcs turns off"),
                           (["--no-warmup", "--warmup-iters", "10"], "--no-warmup turns off"),
                           (["--source-only", "--pseudo-threshold", "0.9", "--no-mix"],
                            "--pseudo-threshold, --mix would do nothing")):
        with pytest.raises(UserError, match=fragment):
            check(*argv)


def test_param_groups_head_lr_and_no_decay_on_norms():
    model = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32)
    groups = model.param_groups(6e-5, 10.0, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter exactly once
    decay, no_decay, head = ([names[id(p)] for p in g["params"]] for g in groups)
    assert all("norm" in n for n in no_decay) and not any("norm" in n for n in decay)
    assert "encoder.stages.0.blocks.0.attn.norm.weight" in no_decay and "encoder.patch_embed.norm.bias" in no_decay
    assert all(n.startswith("head.") for n in head) and not any(n.startswith("head.") for n in decay + no_decay)
    assert [g["lr"] for g in groups] == [6e-5, 6e-5, pytest.approx(6e-4)]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01]


def scheduled_lrs(args, it, optimizer):
    """The loop's schedule (training-loop block): poly over the resolved horizon times the warm-up, per group."""
    horizon = args.poly_horizon or args.iters  # main()'s setup block
    lr = daformer.poly_lr(args.lr, it, horizon, args.poly_power) * daformer.warmup_factor(
        it, args.warmup_iters if args.warmup else 0, args.warmup_ratio)
    daformer.set_lr(optimizer, lr)
    return [g["lr"] for g in optimizer.param_groups]


def test_lr_schedule_follows_the_run_length_with_warmup_and_head_x10():
    model = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32)
    optimizer = torch.optim.AdamW(model.param_groups(6e-5, 10.0, 0.01), lr=6e-5)
    a = daformer.Args()  # paper: poly_horizon none = max_iters (mmcv PolyLrUpdaterHook), 40k
    assert a.poly_horizon is None
    assert scheduled_lrs(a, 0, optimizer) == pytest.approx([6e-11, 6e-11, 6e-10])  # warmup_ratio 1e-6, head x10
    expected = 6e-5 * (1 - 750 / 40000) * (1 - 0.5 * (1 - 1e-6))
    assert scheduled_lrs(a, 750, optimizer) == pytest.approx([expected, expected, 10 * expected])
    assert scheduled_lrs(a, 1500, optimizer)[0] == pytest.approx(6e-5 * (1 - 1500 / 40000))
    assert scheduled_lrs(a, 39999, optimizer)[2] == pytest.approx(10 * 6e-5 / 40000)  # poly reaches 0 at 40k
    short = dataclasses.replace(a, iters=20000)  # --iters 20000: the whole schedule in 20k, not half of it
    assert scheduled_lrs(short, 10000, optimizer) == pytest.approx([3e-5, 3e-5, 3e-4])
    assert scheduled_lrs(short, 19999, optimizer)[0] == pytest.approx(6e-5 / 20000)
    assert scheduled_lrs(short, 750, optimizer)[0] == pytest.approx(6e-5 * (1 - 750 / 20000) * (1 - 0.5 * (1 - 1e-6)))
    assert daformer.warmup_factor(5, 0, 1e-6) == 1.0  # --no-warmup


# ----------------------------------------------------------------------------------------------------
# self-training
def test_ema_formula_warmup_and_parameters_only():
    assert [daformer.ema_alpha_at(t, 0.999) for t in (0, 1, 9, 999, 5000)] == [0, 0.5, 0.9, 0.999, 0.999]
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout2d(0.5))
    teacher = daformer.teacher_mode(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout2d(0.5)))
    student[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    daformer.ema_update(teacher, student, 0.9)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * before[name] + 0.1 * s, atol=1e-7)
    assert torch.equal(teacher[1].running_mean, before["1.running_mean"])  # buffers are not averaged
    assert teacher.training and teacher[1].training and not teacher[2].training  # BN train, dropout off
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(teacher(x), teacher(x))  # no dropout noise


def test_pseudo_label_weight_is_one_scalar_with_row_crop():
    logits = torch.zeros(2, 3, 8, 4)
    logits[:, 1] = 10.0  # confidence ~0.9999 everywhere ...
    logits[0, :, :4] = 0.0  # ... except the top half of image 0 (confidence 1/3)
    labels, weight, q = daformer.pseudo_labels(logits, (8, 4), 0.968, (1, 2))
    assert q.item() == pytest.approx(0.75)  # 48 of 64 pixels are confident
    assert torch.all(weight[:, 1:6] == 0.75) and torch.all(weight[:, :1] == 0) and torch.all(weight[:, 6:] == 0)
    assert labels[1].eq(1).all() and labels.min() >= 0  # no ignore label: every pixel is weighted
    _, weight, _ = daformer.pseudo_labels(logits, (8, 4), 0.968, (0, 0))
    assert torch.all(weight == 0.75)


def test_thresholded_and_distance_values_are_fp32_under_bf16():
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 8, 8) * 4).bfloat16()  # what the teacher returns under bf16 autocast
    labels, weight, q = daformer.pseudo_labels(logits, (16, 16), 0.968, (0, 0))
    reference = torch.softmax(torch.nn.functional.interpolate(logits.float(), size=(16, 16), mode="bilinear"), 1)
    assert q.dtype == weight.dtype == torch.float32
    assert q.item() == (reference.max(1).values >= 0.968).float().mean().item()
    assert torch.equal(labels, reference.argmax(1))
    student, imnet = torch.randn(1, 4, 2, 2).bfloat16(), torch.randn(1, 4, 2, 2).bfloat16()
    things = torch.ones(256, dtype=torch.bool)
    fd = daformer.feature_distance(student, imnet, torch.zeros(1, 64, 64, dtype=torch.long), things, 0.75, 8)
    assert fd.dtype == torch.float32
    assert fd.item() == pytest.approx((student.float() - imnet.float()).norm(dim=1).mean().item(), rel=1e-6)


def test_weighted_ce_averages_over_all_pixels():
    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.tensor([[[0, 255], [1, 255]]])
    assert daformer.weighted_ce(logits, labels).item() == pytest.approx(math.log(2) / 2)  # 2 of 4 pixels count
    weight = torch.tensor([[[0.5, 1.0], [0.0, 1.0]]])
    assert daformer.weighted_ce(logits, labels, weight).item() == pytest.approx(math.log(2) * 0.5 / 4)


def test_class_mix_picks_half_of_the_batch_classes_255_included():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 255]).repeat(2, 6, 1)  # every image holds the 5 batch classes
    chosen_255 = 0
    for _ in range(200):
        masks = daformer.class_mix_masks(labels)
        for img, mask in zip(labels, masks):
            picked = {int(c) for c in img[mask].unique()}
            assert len(picked) == 3  # ceil(5 / 2)
            assert torch.equal(mask, torch.isin(img, torch.tensor(sorted(picked))))  # whole classes only
            chosen_255 += 255 in picked
    assert 0.45 < chosen_255 / 400 < 0.75  # 255 is a candidate like any class (expected 3/5)
    # classes come from the whole batch: image 0 has only class 0, the batch has {0, 5}; n = 2 -> pick 1
    labels = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 5)])
    picks = [daformer.class_mix_masks(labels)[0].all().item() for _ in range(200)]
    assert 0.3 < np.mean(picks) < 0.7


def test_color_jitter_kornia_semantics():
    torch.manual_seed(0)
    x = torch.rand(3, 16, 16) * 0.6 + 0.2
    identity = [1.0, 1.0, 1.0, 0.0]
    bright = daformer.color_jitter(x, 1.1, *identity[1:], order=[0])
    assert torch.allclose(bright, x + 0.1)  # additive (torchvision would multiply)
    contrast = daformer.color_jitter(x, 1.0, 0.8, 1.0, 0.0, order=[1])
    assert torch.allclose(contrast, x * 0.8)  # multiplicative, no blend towards the mean
    assert contrast.mean().item() == pytest.approx(0.8 * x.mean().item(), rel=1e-5)
    assert torch.allclose(daformer.color_jitter(x, *identity, order=[0, 1, 2, 3]), x, atol=1e-5)  # HSV round trip
    grey = daformer.color_jitter(x, 1.0, 1.0, 0.0, 0.0, order=[2])
    assert torch.allclose(grey, x.max(0).values.expand(3, -1, -1), atol=1e-6)  # saturation 0: V in every channel
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    green = daformer.color_jitter(red, 1.0, 1.0, 1.0, 1 / 3, order=[3])  # hue + 2 pi / 3
    assert torch.allclose(green, torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2)]), atol=1e-5)
    assert torch.all(daformer.color_jitter(x, 1.2, 1.2, 1.0, 0.0, order=[0, 1]) <= 1.0)  # clamped


def test_blur_and_strong_augment_statistics():
    assert [daformer.blur_kernel_size(s) for s in (512, 1024, 128, 100)] == [51, 103, 13, 9]
    torch.manual_seed(0)
    x = torch.rand(3, 64, 64)
    blurred = daformer.gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape
    assert blurred.mean().item() == pytest.approx(x.mean().item(), abs=2e-3) and blurred.var() < 0.5 * x.var()
    batch = torch.rand(64, 3, 8, 8) * 0.5 + 0.25
    assert torch.equal(daformer.strong_augment(batch, 0.0, 0.2, 0.0), batch)  # both draws fail
    out = daformer.strong_augment(batch, 1.0, 0.2, 0.0)
    shift = (out - batch).mean((1, 2, 3))
    assert shift.abs().max() < 0.35 and shift.std() > 0.01  # factors drawn per image
    large = torch.rand(4, 3, 40, 40)  # blur kernel 3 (the odd size nearest 10% of 40)
    assert daformer.strong_augment(large, 0.0, 0.2, 1.0).var((2, 3)).mean() < large.var((2, 3)).mean()
    one = batch[:1]
    rates = [daformer.strong_augment(one, 0.8, 0.2, 0.0) is not one for _ in range(400)]
    assert 0.72 < np.mean(rates) < 0.88  # jitter with p 0.8


# ----------------------------------------------------------------------------------------------------
# Rare Class Sampling and Feature Distance
def test_rcs_probabilities_and_sampler():
    counts = np.array([[900, 50, 0, 0], [800, 0, 30, 0], [700, 100, 20, 0]])  # class 3 never occurs
    classes, probs = daformer.rcs_probabilities(counts, 0.01)
    totals = np.array([2400, 150, 50], dtype=np.float64)
    expected = torch.softmax(torch.tensor((1 - totals / totals.sum()) / 0.01), 0).numpy()
    assert classes.tolist() == [0, 1, 2] and np.allclose(probs, expected)
    sampler = daformer.RareClassSampler(counts, 0.01, min_pixels=25, seed=3)
    assert sampler.samples[1].tolist() == [0, 2] and sampler.samples[2].tolist() == [1]  # > 25 px only
    stream = iter(sampler)
    draws = [next(stream) for _ in range(2000)]
    freq = np.bincount([c for _, _, c in draws], minlength=3) / len(draws)
    assert np.allclose(freq, expected, atol=0.03)
    assert all(counts[i, c] > 25 for i, _, c in draws)
    resumed = iter(daformer.RareClassSampler(counts, 0.01, min_pixels=25, seed=3, start=1500))
    assert [next(resumed) for _ in range(10)] == draws[1500:1510]  # a pure function of (seed, position)
    with pytest.warns(UserWarning, match="not sampled"):
        daformer.RareClassSampler(counts, 0.01, min_pixels=60, seed=3)  # no image has > 60 px of class 2


def test_rcs_stream_split_over_ranks_and_resumed():
    """main() passes start = iterations done x per-rank batch, rank, world (as common.data.train_loader)."""
    counts = np.array([[900, 50, 0], [800, 0, 30], [700, 100, 20]])

    def batches(start_iter, per_rank_batch, rank, world, n):
        stream = iter(daformer.RareClassSampler(counts, 0.01, 25, 7, start_iter * per_rank_batch, rank, world))
        return [[next(stream) for _ in range(per_rank_batch)] for _ in range(n)]

    one = batches(0, 2, 0, 1, 6)  # 1 process x batch 2
    ranks = [batches(0, 1, r, 2, 6) for r in (0, 1)]  # 2 processes x batch 1
    assert [b[0] for b in one] == [b[0] for b in ranks[0]] and [b[1] for b in one] == [b[0] for b in ranks[1]]
    assert batches(4, 2, 0, 1, 2) == one[4:]  # resumed at iteration 4
    assert batches(4, 1, 1, 2, 2) == ranks[1][4:]


def test_rcs_recrops_the_same_image_until_the_class_shows():
    split = daformer.domain_split("toy-synth", "train")
    person = TOY_CLASSES.index("person")
    resize = daformer.TrainTransform()
    crop = daformer.TrainTransform(crop=(32, 32), flip=True)
    dataset = daformer.RareClassDataset(split, resize, crop, min_crop_pixels=20)
    index = next(i for i in range(50) if (split.load_label(i) == person).sum() > 300)
    hits = [(dataset[(index, seed, person)][1] == person).sum().item() > 20 for seed in range(20)]
    plain = [(crop(*split.load(index), np.random.default_rng(seed))[1] == person).sum() > 20 for seed in range(20)]
    assert sum(hits) >= 10 and sum(plain) <= 5  # 11 vs 2 with these seeds


def test_feature_distance_thing_cells_only_and_empty_mask():
    labels = torch.zeros(1, 64, 64, dtype=torch.long)  # road
    labels[0, :32, :32] = 7  # a car cell (pure)
    labels[0, 32:, :32] = torch.where(torch.arange(32) < 19, 6, 0)[None, :]  # 59% person: impure
    student, imnet = torch.zeros(1, 4, 2, 2, requires_grad=True), torch.zeros(1, 4, 2, 2)
    imnet[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # distance 5 at the car cell
    imnet[0, :, 1, 0] = 100.0
    things = torch.zeros(256, dtype=torch.bool)
    things[[6, 7]] = True
    fd = daformer.feature_distance(student, imnet, labels, things, 0.75, 8)
    assert fd.item() == pytest.approx(5.0)
    cells = daformer.downscale_labels(labels, 32, 0.75, 8)
    assert cells.tolist() == [[[7, 0], [255, 0]]]
    empty = daformer.feature_distance(student, imnet, torch.zeros(1, 64, 64, dtype=torch.long), things, 0.75, 8)
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(student.grad).all()
    ignore = torch.full((1, 64, 64), 255)
    assert daformer.downscale_labels(ignore, 32, 0.75, 8).eq(255).all()


# ----------------------------------------------------------------------------------------------------
# smoke runs (tiny: 64x64 crops, decoder width 32, batch 2, 2 eval images at 64x128)
@pytest.fixture(scope="module")
def rcs_stats(tmp_path_factory):
    """The toy source's class statistics, computed once for every smoke run of this module."""
    path = str(tmp_path_factory.mktemp("rcs") / "toy-synth-stats.json")
    counts, area = daformer.class_statistics(daformer.domain_split("toy-synth", "train"), 8, path, Runtime("cpu"))
    assert counts.shape == (2000, 8) and area == 128 * 256 and counts.sum() == 2000 * 128 * 256
    assert json.load(open(path))["classes"] == TOY_CLASSES
    return path


def tiny(rcs_stats, crop="64"):
    """rcs_stats None: for --no-rcs runs (the flag is refused there); crop "none": whole frames."""
    return ["daformer.py", "--preset", "quick", "--crop-size", crop, "--decoder-dim", "32", "--batch-size", "2",
            "--eval-limit", "2", "--eval-size", "64", "128", "--num-workers", "0", "--log-every", "2",
            *(["--rcs-stats", rcs_stats] if rcs_stats else [])]


def test_quick_run_writes_every_run_folder_file(tmp_path, rcs_stats):
    out = tmp_path / "run"
    run_script(*tiny(rcs_stats), "--iters", "4", "--checkpoint-every", "2", "--eval-every", "2", "--out", str(out),
               check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "daformer" and set(config["params"]) == {"model", "teacher", "imnet_encoder"}
    assert config["params"]["teacher"]["trainable"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "seg_src" in r]
    assert [r["iter"] for r in train_rows] == [2, 4]
    assert all({"seg_src", "fd", "mix", "pseudo_weight", "lr", "seconds"} <= set(r) for r in train_rows)
    assert any("val_miou" in r for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["miou"] <= 100 and results["num_classes"] == 8 and results["iters"] == 4
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iter"] == 4 and {"model", "teacher", "imnet_encoder", "optimizer", "rng"} <= set(ckpt)
    assert len(os.listdir(out / "predictions")) == 2
    eval_out = tmp_path / "eval"
    run_script(*tiny(rcs_stats), "--eval-only", "--weights", str(out / "checkpoints" / "last.pt"), "--out",
               str(eval_out), check=True)
    assert json.loads((eval_out / "results.json").read_text())["miou"] == pytest.approx(results["miou"])


def test_resume_continues_exactly(tmp_path, rcs_stats):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script(*tiny(rcs_stats), "--iters", "4", "--out", str(straight), check=True)
    run_script(*tiny(rcs_stats), "--iters", "2", "--poly-horizon", "4", "--out", str(split), check=True)
    result = run_script(*tiny(rcs_stats), "--iters", "4", "--resume", "auto", "--out", str(split), check=True)
    assert "resumed from" in result.stdout
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for net in ("model", "teacher", "imnet_encoder"):
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])


def test_ablation_switches_run(tmp_path, rcs_stats):
    out = tmp_path / "ablation"
    run_script(*tiny(None, crop="none"), "--iters", "2", "--no-rcs", "--no-mix", "--no-warmup", "--decoder",
               "segformer", "--ema-alpha", "0.99", "--out", str(out), check=True)  # whole 128x256 frames
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    quick = daformer.PRESETS["quick"]  # iteration 1's lr without warm-up, poly over the run's 2 iterations
    assert {"seg_src", "fd", "mix", "pseudo_weight"} <= set(row)
    assert row["lr"] == pytest.approx(quick["lr"] * (1 - 1 / 2))
    out = tmp_path / "source_only"
    run_script(*tiny(rcs_stats), "--iters", "2", "--source-only", "--no-fd", "--out", str(out), check=True)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "seg_src" in row and not {"fd", "mix", "pseudo_weight"} & set(row)
    assert set(torch.load(out / "checkpoints" / "last.pt", weights_only=True)) >= {"model"}


# The official recipe, field by field. C = configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py,
# D = configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py, M = configs/_base_/models/daformer_conv1_mitb5.py,
# U = configs/_base_/uda/dacs.py, S = configs/_base_/schedules/{adamw,poly10warm}.py (lhoyer/DAFormer e6f6e04);
# methods.md section 9 where noted.
OFFICIAL = dict(
    source="gta", target="cityscapes",  # D:56-69
    backbone="pvt_v2_b5",  # M:15 mit_b5 (= timm pvt_v2_b5, methods.md 9b)
    init="imagenet",  # M:14 mit_b5.pth, ImageNet-1k (deviation: timm's ImageNet pvt_v2_b5, header)
    iters=40000,  # C:47 max_iters
    batch_size=2,  # D:54 samples_per_gpu 2, C:46 n_gpus 1 (and as many target images)
    crop_size=[512, 512],  # D:11
    lr=6e-5,  # C:40
    seed=0,  # C:20 (paper: seeds 0, 1, 2)
    weight_decay=0.01,  # S adamw.py:5; C:45 norm decay_mult 0
    head_lr_mult=10.0,  # C:43
    poly_horizon=40000,  # poly over runner.max_iters (mmcv PolyLrUpdaterHook), resolved from none
    poly_power=1.0,  # S poly10warm.py:12, min_lr 0
    warmup=True, warmup_iters=1500, warmup_ratio=1e-6,  # S poly10warm.py:9-11
    decoder="daformer",  # configs/_base_/models/daformer_sepaspp_mitb5.py:14-20 (aspp, sep, 1/6/12/18, no pool)
    decoder_dim=256, dropout=0.1,  # M:20-21,26
    drop_path=0.1,  # mmseg/models/backbones/mix_transformer.py:203
    ema_alpha=0.999,  # C:24
    pseudo_threshold=0.968,  # U:10
    pseudo_crop=[15, 120],  # C:30-31
    mix=True,  # U:16 mix='class'
    jitter_p=0.8,  # U:19 color_jitter_probability 0.2 is the threshold u > 0.2 (dacs_transforms.py:48)
    jitter_strength=0.2,  # U:18
    blur_p=0.5,  # U:17 blur=True, applied when u > 0.5 (dacs_transforms.py:72)
    rcs=True, rcs_temperature=0.01, rcs_min_pixels=3000, rcs_min_crop_ratio=0.5,  # C:35-36
    fd=True, fd_lambda=0.005, fd_purity=0.75,  # C:26,28
    fd_classes=["traffic light", "traffic sign", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                "bicycle"],  # C:27 ids 6, 7, 11-18
    fd_init="auto",  # = the student's ImageNet encoder (dacs.py:82-83 builds imnet_model from M's pretrained)
    source_size=None, target_size=None, eval_size=None,  # GTA 1280x720, CS 1024x512 (D:15,27,40): test below
    eval_every=4000,  # C:50
    log_every=50,  # configs/_base_/default_runtime.py:5
    num_workers=4,  # D:55 workers_per_gpu
    source_only=False, eval_limit=None, synthia_classes=19, normalization="auto",  # D:9-10 ImageNet mean/std RGB
)
# not recipe values: where and how the run is kept (official: one checkpoint at 40k, C:49; RCS statistics cached
# next to the dataset), mixed precision (header deviation: the paper trained in fp32), and this run's mode
OPERATIONAL = dict(data_root="data", preset="paper", checkpoint_every=5000, amp=True, device="cpu", compile=False,
                   torch_deterministic=False, num_predictions=4, resume=None, eval_only=False, weights=[],
                   dry_run=True, world_size=1, rank=0, rcs_stats=None)


def test_paper_preset_is_the_official_recipe(tmp_path):
    out = tmp_path / "dry"
    result = run_script("daformer.py", "--preset", "paper", "--dry-run", "--data-root", str(tmp_path / "nothing"),
                        "--out", str(out), "--device", "cpu", check=True)
    config = json.loads((out / "config.json").read_text())
    resolved = {k: v for k, v in config["args"].items() if k != "out"}
    assert resolved.keys() == OFFICIAL.keys() | OPERATIONAL.keys()  # a new field must be placed in one of them
    assert {k: resolved[k] for k in OFFICIAL} == OFFICIAL
    assert {k: resolved[k] for k in OPERATIONAL} == {**OPERATIONAL, "data_root": str(tmp_path / "nothing")}
    assert config["normalization"] is None and config["num_classes"] == 19  # auto: imagenet once --init loads
    params = config["params"]
    assert params["model"]["trainable"] == 81_443_008 + 3_712_275  # MiT-B5 + DAFormer decoder, 19 classes
    assert params["imnet_encoder"]["total"] == 81_443_008 and params["teacher"]["trainable"] == 0
    assert "dry run" in result.stdout


def test_paper_frame_sizes_and_mmcv_resizing():
    """mmseg's Resize (keep ratio, mmcv bilinear), RandomCrop 512 (source cat_max_ratio 0.75), RandomFlip 0.5."""
    args = daformer.parse_args(daformer.Args, daformer.PRESETS, ["--preset", "paper"])
    gta = DomainSplit("gta", "train", list(CITYSCAPES_CLASSES), [], [], paper_size=(720, 1280))
    cityscapes = DomainSplit("cityscapes", "train", list(CITYSCAPES_CLASSES), [], [], paper_size=(512, 1024))
    source, target = daformer.train_transforms(args, gta, cityscapes, (512, 512))
    assert source.interpolation == target.interpolation == daformer.INTERPOLATION == "cv2-bilinear"
    assert (source.cat_max_ratio, target.cat_max_ratio, source.flip, target.flip) == (0.75, 1.0, True, True)
    resize_only = [dataclasses.replace(t, crop=None, flip=False) for t in (source, target)]
    rng = np.random.default_rng(0)
    frame = np.zeros((1052, 1914, 3), np.uint8)  # GTA5 -> 1280x704 (methods.md 9c.1)
    assert resize_only[0](frame, None, rng)[0].shape[:2] == (704, 1280)
    assert resize_only[1](np.zeros((1024, 2048, 3), np.uint8), None, rng)[0].shape[:2] == (512, 1024)
    image, label = source(frame, np.zeros((1052, 1914), np.uint8), rng)
    assert image.shape[:2] == label.shape == (512, 512)


def test_bad_input_gives_one_line_errors(tmp_path, rcs_stats):
    # (a missing --init file, unknown --fd-classes and flags of a switched-off part: unit tests above)
    for extra, fragment in ((["--backbone", "resnet50"], "unknown backbone"),
                            (["--target-size", "64", "128"],
                             "source frames resize to 128x256 and target frames to 64x128")):
        crop = "none" if "--target-size" in extra else "64"
        result = run_script(*tiny(rcs_stats, crop), "--iters", "1", *extra, "--out", str(tmp_path / "bad"))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
        assert fragment in errors[0]


def test_torchrun_two_processes_on_cpu(tmp_path, rcs_stats):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, *tiny(rcs_stats), "--iters", "2", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["iters"] == 2
    assert json.loads((out / "config.json").read_text())["args"]["world_size"] == 2
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if "seg_src" in l]) == 1
    # each rank scored its val shard with rank 0's BN statistics, i.e. with the model the checkpoint holds
    run_script(*tiny(rcs_stats), "--eval-only", "--weights", str(out / "checkpoints" / "last.pt"), "--out",
               str(tmp_path / "eval"), check=True)
    scores = [json.loads((folder / "results.json").read_text())["per_class_iou"] for folder in (out, tmp_path / "eval")]
    assert scores[0] == pytest.approx(scores[1], nan_ok=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device")
def test_collectives_run_on_the_cuda_device_under_nccl(tmp_path):
    """NCCL refuses CPU tensors: the RCS class counts and the BN broadcast must go through the run's device.
    A one-process NCCL group is enough to catch a CPU tensor (it raises the same error as on 2 GPUs)."""
    import torch.distributed as dist
    rt = Runtime("cuda")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    rt.distributed = True
    try:
        split = daformer.domain_split("toy-synth", "train")
        counts, area = daformer.class_statistics(split, 8, str(tmp_path / "stats.json"), rt)
        assert counts.shape == (2000, 8) and area == 128 * 256
        model = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32).to(rt.device)
        daformer.broadcast_bn_statistics(model, rt)
    finally:
        dist.destroy_process_group()

