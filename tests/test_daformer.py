"""daformer.py: the network, weights files in the official layouts (released models, init files), every DAFormer rule
on hand-made tensors, the training step against an independent reference and under 2 processes, then smoke runs
(run folder, eval-only of a release, resume, starting from a release, dry run, ablation switches, torchrun)."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import daformer
import released
import released_daformer
from common.checkpoint import load_matching
from common.cli import UserError, field_docs
from common.data import CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS, DomainSplit, SegDataset, normalize
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




# ----------------------------------------------------------------------------------------------------
# weights files: fixtures in the official layouts (tests/released_daformer.py), random values
def random_net(num_classes=8, decoder="daformer", seed=0):
    """A pvt_v2_b0 DAFormerNet of width 32 with every tensor random (BN statistics too): a swap or a missed tensor
    would show."""
    torch.manual_seed(seed)
    net = daformer.DAFormerNet("pvt_v2_b0", num_classes, decoder, 32)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t))
    return net


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_release(path, num_classes=19):
    """A DAFormer release of three different random networks; returns (student, teacher, FD model)."""
    nets = [random_net(num_classes, seed=s) for s in (1, 2, 3)]
    torch.save(released_daformer.daformer_release(*(n.state_dict() for n in nets)), path)
    return nets


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_segformer_mit_file_loads_every_encoder_tensor(wrapper, tmp_path, capsys):
    """SegFormer's ImageNet mit_b5.pth layout (raw, or under 'state_dict'/'model' as mix_transformer.py:349-357 reads
    it): MiT names land on timm's modules, the backbone is read from the shapes, the ImageNet classifier is set aside
    and the decoder, which the file lacks, is listed and stays as built."""
    source = random_net()
    path = tmp_path / "mit_like.pth"
    torch.save(released_daformer.segformer_mit_file(source.encoder.state_dict(), wrapper), path)
    found = daformer.read_daformer_weights(str(path), "--init", "daformer")
    assert (found["kind"], found["num_classes"], found["trained"], found["fd_state"]) == (
        "SegFormer MiT encoder", None, False, None)
    assert found["implied"] == {"backbone": "pvt_v2_b0", "normalization": "imagenet"}
    assert found["set_aside"] == ["head.* (ImageNet classifier, 2 tensors)"]
    model = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32)
    head = copy.deepcopy(model.head.state_dict())
    assert daformer.load_init(model, str(path), "pvt_v2_b0", found) == ("imagenet", "imagenet")
    assert same(model.encoder.state_dict(), source.encoder.state_dict()) and same(model.head.state_dict(), head)
    assert "not in the file, kept as initialised: head.embed.*" in capsys.readouterr().err


def test_timm_state_dict_and_an_encoder_that_fits_no_pvt_v2(tmp_path):
    source = random_net()
    torch.save({**source.encoder.state_dict(), "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)},
               tmp_path / "timm.pth")
    found = daformer.read_daformer_weights(str(tmp_path / "timm.pth"), "--init", "daformer")
    assert found["kind"] == "timm pvt_v2 encoder" and found["implied"]["backbone"] == "pvt_v2_b0"
    assert same({k.removeprefix("encoder."): v for k, v in found["state"].items()}, source.encoder.state_dict())
    mit = released_daformer.mit_names(source.encoder.state_dict())
    mit["block1.0.mlp.fc1.weight"] = torch.zeros(128, 32)  # MiT-B0's MLP ratio 4 (timm's pvt_v2_b0: 8)
    torch.save(mit, tmp_path / "mit_b0.pth")
    with pytest.raises(UserError, match="fits none of timm's pvt_v2 encoders"):
        daformer.read_daformer_weights(str(tmp_path / "mit_b0.pth"), "--init", "daformer")


def test_daformer_release_student_teacher_and_fd_encoder(tmp_path):
    """latest.pth (mmcv; model./ema_model./imnet_model.): the student is what --weights evaluates and what --init
    starts from; the FD encoder is the file's imnet_model backbone (as the official load_from); the teacher is set
    aside (main() copies the student into the teacher, as _init_ema_weights at iteration 0). A 19-class release
    starting an 8-class run: the encoder loads, the classifier is listed and stays as built."""
    path = tmp_path / "latest.pth"
    student, teacher, imnet = save_release(path)
    found = daformer.read_daformer_weights(str(path), "--weights", "daformer")
    assert (found["kind"], found["iter"], found["num_classes"], found["trained"]) == (
        "DAFormer release (mmcv UDA checkpoint)", 40000, 19, True)
    assert found["implied"] == {"backbone": "pvt_v2_b0", "decoder": "daformer", "decoder_dim": 32,
                                "normalization": "imagenet"}
    heads = len(student.head.state_dict())
    assert found["set_aside"] == [f"ema_model.* (EMA teacher, {len(teacher.state_dict())} tensors)",
                                  f"imnet_model.decode_head.* (FD model's unused head, {heads} tensors)"]
    evaluated = daformer.DAFormerNet("pvt_v2_b0", 19, decoder_dim=32)
    load_matching(evaluated, found["state"], "release", required=lambda k: True, unused_ok=lambda k: False)
    assert same(evaluated.state_dict(), student.state_dict())
    model = daformer.DAFormerNet("pvt_v2_b0", 19, decoder_dim=32)
    assert daformer.load_init(model, str(path), "pvt_v2_b0", found) == ("imagenet", "trained")
    assert same(model.state_dict(), student.state_dict())
    assert same(daformer.fd_encoder(model, "auto", "trained", "pvt_v2_b0", found).state_dict(),
                imnet.encoder.state_dict())
    small = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32)
    classifier = small.head.classifier.weight.clone()
    daformer.load_init(small, str(path), "pvt_v2_b0", found)
    assert torch.equal(small.head.classifier.weight, classifier)
    assert same(small.encoder.state_dict(), student.encoder.state_dict())


def test_mmseg_segmentor_loads_encoder_and_head(tmp_path):
    """An mmseg model without the UDA wrapper (backbone./decode_head.; here the conv1 'segformer' fusion): all of it."""
    source = random_net(decoder="segformer")
    path = tmp_path / "segmentor.pth"
    torch.save({"meta": released_daformer.mmcv_meta(iters=160000),
                "state_dict": released_daformer.segmentor_names(source.state_dict())}, path)
    found = daformer.read_daformer_weights(str(path), "--init", "daformer")
    assert (found["kind"], found["trained"], found["fd_state"], found["set_aside"]) == (
        "mmseg MiT segmentor", True, None, [])
    assert found["implied"] == {"backbone": "pvt_v2_b0", "decoder": "segformer", "decoder_dim": 32,
                                "normalization": "imagenet"}
    model = daformer.DAFormerNet("pvt_v2_b0", 8, "segformer", 32)
    assert daformer.load_init(model, str(path), "pvt_v2_b0", found) == ("imagenet", "trained")
    assert same(model.state_dict(), source.state_dict())


def test_fd_encoder_is_imagenet_or_the_one_the_init_file_holds(tmp_path, monkeypatch):
    """Official: imnet_model is built from the ImageNet file (dacs.py:82-83) and load_from of a UDA checkpoint
    replaces it by the file's; so --fd-init auto takes the FD encoder an --init file holds, else timm's ImageNet
    weights for a trained segmentation model, else the student's initial encoder."""
    imagenet = random_net(seed=5).encoder.state_dict()  # stands in for timm's ImageNet file
    monkeypatch.setattr(daformer, "imagenet_weights", lambda backbone, flag: imagenet)
    trained, fd_of_run = random_net(seed=6), random_net(seed=7)
    checkpoint = {"script": "daformer", "num_classes": 8, "model": trained.state_dict()}
    torch.save({**checkpoint, "imnet_encoder": fd_of_run.encoder.state_dict()}, tmp_path / "ours.pt")
    torch.save(checkpoint, tmp_path / "ours_no_fd.pt")  # a --no-fd run
    torch.save(released_daformer.segformer_mit_file(imagenet), tmp_path / "mit.pth")
    torch.save({"state_dict": released_daformer.segmentor_names(trained.state_dict())}, tmp_path / "segmentor.pth")

    def fd_weights(init, fd_init="auto"):
        model = daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32)
        found = daformer.read_daformer_weights(init, "--init", "daformer") if init not in ("imagenet", "none") else None
        _, student_init = daformer.load_init(model, init, "pvt_v2_b0", found)
        encoder = daformer.fd_encoder(model, fd_init, student_init, "pvt_v2_b0", found)
        assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
        return model.encoder.state_dict(), encoder.state_dict()

    student, fd = fd_weights(str(tmp_path / "ours.pt"))  # the FD encoder of the run the checkpoint comes from
    assert same(student, trained.encoder.state_dict()) and same(fd, fd_of_run.encoder.state_dict())
    for init in ("ours_no_fd.pt", "segmentor.pth"):  # trained, no FD encoder in the file: ImageNet
        assert same(fd_weights(str(tmp_path / init))[1], imagenet)
    assert same(fd_weights(str(tmp_path / "segmentor.pth"), str(tmp_path / "mit.pth"))[1], imagenet)  # --fd-init PATH
    assert same(fd_weights("none", str(tmp_path / "ours.pt"))[1], fd_of_run.encoder.state_dict())
    for init in ("imagenet", str(tmp_path / "mit.pth")):  # the student starts from ImageNet weights: FD is their copy
        student, fd = fd_weights(init)
        assert same(student, imagenet) and same(fd, imagenet)
    student, fd = fd_weights("none")  # quick preset: the random initial encoder (header deviation)
    assert same(fd, student) and not same(fd, imagenet)
    assert same(fd_weights("none", "imagenet")[1], imagenet)
    with pytest.raises(UserError, match="trained segmentation model without an FD encoder"):
        fd_weights("none", str(tmp_path / "ours_no_fd.pt"))


def test_typed_flags_beat_the_file_with_a_warning(tmp_path, capsys):
    path = tmp_path / "latest.pth"
    save_release(path)
    args = daformer.parse_args(daformer.Args, daformer.PRESETS, ["--eval-only", "--weights", str(path),
                                                                 "--normalization", "caffe"])
    found = daformer.prepare_daformer_weights(args, None, "daformer", 19)
    assert (args.backbone, args.decoder, args.decoder_dim, args.normalization) == ("pvt_v2_b0", "daformer", 32, "caffe")
    assert found["applied"] == {"backbone": "pvt_v2_b0", "decoder": "daformer", "decoder_dim": 32}
    out = capsys.readouterr()
    assert "--normalization caffe contradicts DAFormer release (mmcv UDA checkpoint), which implies imagenet" in out.err
    assert out.out.startswith("recognised DAFormer release (mmcv UDA checkpoint): pvt_v2_b0, daformer decoder, width "
                              "32, set aside ema_model.* (EMA teacher")


def test_files_that_fit_no_layout_are_refused_in_one_line(tmp_path):
    def prepare(*argv, num_classes=19):
        args = daformer.parse_args(daformer.Args, daformer.PRESETS, list(map(str, argv)))
        return daformer.prepare_daformer_weights(args, None, "daformer", num_classes)

    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "garbage.pt")
    with pytest.raises(UserError, match="unrecognised layout .*accepted are our checkpoints, DAFormer releases"):
        prepare("--init", tmp_path / "garbage.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="is not a DAFormer/MiT weights file"):
        prepare("--init", tmp_path / "list.pt")
    torch.save({"script": "source_only", "num_classes": 19, "model": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="written by source_only, not daformer"):
        prepare("--eval-only", "--weights", tmp_path / "other.pt")
    torch.save(released_daformer.segformer_mit_file(random_net().encoder.state_dict()), tmp_path / "mit.pth")
    with pytest.raises(UserError, match="an encoder without a decoder .*--init"):
        prepare("--eval-only", "--weights", tmp_path / "mit.pth")
    segformer_head = {"state_dict": {**released_daformer.segmentor_names(random_net().state_dict()),
                                     "decode_head.linear_c.0.proj.weight": torch.zeros(768, 32)}}
    torch.save(segformer_head, tmp_path / "segformer_head.pth")  # mmseg's SegFormerHead (or HRDA's) names
    with pytest.raises(UserError, match="decode head other than DAFormer's .*decode_head.linear_c.0.proj.weight"):
        prepare("--eval-only", "--weights", tmp_path / "segformer_head.pth")
    save_release(tmp_path / "latest.pth")
    with pytest.raises(UserError, match="has 19 classes, this run has 8"):
        prepare("--eval-only", "--weights", tmp_path / "latest.pth", num_classes=8)
    with pytest.raises(UserError, match="--weights is read by --eval-only"):
        prepare("--weights", tmp_path / "latest.pth")
    with pytest.raises(UserError, match="--init .*missing.pth: no such file"):
        prepare("--init", tmp_path / "missing.pth")


def test_released_model_evaluates_through_eval_only(tmp_path):
    """--eval-only --weights latest.pth of a SYNTHIA run (19-way): no network flag typed (pvt_v2_b0 and width 32 come
    from the file), the student evaluated with mmseg's whole-image protocol (input resized as mmcv, H/4 logits to
    the input, then to the labels, bilinear, align_corners False), SYNTHIA's 16/13-class means, the predictions in
    the Cityscapes benchmark format."""
    names = released.cityscapes_tree(str(tmp_path / "data"))
    path = tmp_path / "latest.pth"
    student, _, _ = save_release(path)
    out, preds = tmp_path / "eval", tmp_path / "preds"
    result = run_script("daformer.py", "--eval-only", "--weights", str(path), "--source", "synthia", "--data-root",
                        str(tmp_path / "data"), "--eval-size", "32", "64", "--num-workers", "0", "--out", str(out),
                        "--device", "cpu", "--save-predictions", str(preds), check=True)
    assert "recognised DAFormer release (mmcv UDA checkpoint): pvt_v2_b0, daformer decoder, width 32, imagenet " \
           "input, set aside ema_model.*" in result.stdout
    config, results = (json.loads((out / f).read_text()) for f in ("config.json", "results.json"))
    assert (config["args"]["backbone"], config["args"]["decoder_dim"], config["normalization"]) == (
        "pvt_v2_b0", 32, "imagenet")
    assert results["loaded"]["kind"] == "DAFormer release (mmcv UDA checkpoint)" and results["iters"] == 40000
    assert {"miou16", "miou13"} <= set(results)
    assert sorted(os.listdir(preds)) == [f"{n}_leftImg8bit.png" for n in names]
    dataset = SegDataset(daformer.domain_split("cityscapes", "val", str(tmp_path / "data")), eval_size=(32, 64),
                         eval_interpolation="cv2-bilinear")
    student.eval()
    for i, name in enumerate(names):
        image, label, _ = dataset[i]
        with torch.no_grad():
            logits = student(normalize(image[None], "imagenet"))[1]
        logits = F.interpolate(logits, size=(32, 64), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        expected = np.array(CITYSCAPES_LABEL_IDS)[logits.argmax(1)[0].numpy()]
        assert np.array_equal(np.asarray(Image.open(preds / f"{name}_leftImg8bit.png")), expected)


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
# the training step against an independent reference, and under 2 processes
STEP_CLASSES, THING = 4, 3  # class 3 is the feature distance's thing class


def step_case(threshold=None):
    """Fixed tiny networks (no dropout or drop-path: no random draws), two 32x64 source/target pairs, the step's
    hyper-parameters. Source labels: image 0 has a pure thing cell (stage-4 cell (0, 0)), image 1 an 80% thing cell
    (0, 1) (>= purity 0.75) and a 70% one (0, 0) (below it): the FD mask is [[1, 0], [0, 1]] by construction.
    threshold None: between two confidences of the initial teacher, so that q is near 0.5 (0 < q < 1)."""
    torch.manual_seed(0)
    model = daformer.DAFormerNet("pvt_v2_b0", STEP_CLASSES, "daformer", 16, drop_path=0.0, dropout=0.0)
    teacher = daformer.teacher_mode(copy.deepcopy(model).requires_grad_(False))
    imnet = copy.deepcopy(model.encoder).requires_grad_(False).eval()
    with torch.no_grad():
        for p in imnet.parameters():  # another encoder, so that FD pulls from the first step on
            p.add_(0.05 * torch.randn_like(p))
        model.head.classifier.weight.normal_(0, 0.3)  # a teacher with a spread of confidences
        teacher.load_state_dict(model.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    target_images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    labels = torch.randint(0, 3, (2, 32, 64))
    labels[:, 20:, 40:] = 255
    labels[0, :, :32] = THING
    labels[1, :, 32:58] = THING  # 26 of 32 columns: 81%
    labels[1, :, :22] = THING  # 22 of 32 columns: 69%
    args = SimpleNamespace(ema_alpha=0.999, fd_lambda=0.5, fd_purity=0.75, pseudo_threshold=threshold, mix=True,
                           jitter_p=0.8, jitter_strength=0.2, blur_p=0.5)
    if threshold is None:  # a copy: the probe's train-mode BN would move the teacher's running statistics
        with torch.no_grad():
            logits = F.interpolate(copy.deepcopy(teacher)(normalize(target_images))[1], size=(32, 64),
                                   mode="bilinear")
        confidence = logits.softmax(1).max(1).values.flatten().sort().values
        args.pseudo_threshold = ((confidence[2048] + confidence[2049]) / 2).item()
    thing_lut = torch.zeros(256, dtype=torch.bool)
    thing_lut[THING] = True
    return (model, teacher, imnet), (images, labels, target_images), args, thing_lut


def fixed_class_mix(labels):
    """Stand-in for ClassMix's random class draw (tested on its own): source pixels of classes 1 and THING."""
    return torch.isin(labels, torch.tensor([1, THING]))


def fixed_augment(args):
    """Stand-in for the random jitter/blur (tested on their own): a fixed colour map, and the step's probabilities."""
    def augment(images, jitter_p, strength, blur_p):
        assert (jitter_p, strength, blur_p) == (args.jitter_p, args.jitter_strength, args.blur_p)
        return (images * 0.7 + 0.2) ** 1.1
    return augment


def run_steps(nets, batch, args, thing_lut, rt, iterations=2, lr=0.05):
    """main()'s use of train_step, the lr set before each step; SGD with momentum rather than AdamW, whose division
    by the root of a first step's squared gradient turns float noise in near-zero gradients into lr-sized
    differences (AdamW's param groups are tested above). Returns the losses and each iteration's gradients."""
    model, teacher, imnet = (net.to(rt.device) for net in nets)
    optimizer = torch.optim.SGD(model.param_groups(lr, 10.0, 0.01), lr=lr, momentum=0.9)
    train_model, grads = rt.wrap(model), []
    for it in range(iterations):
        daformer.set_lr(optimizer, lr * (1 - it / 10))
        losses = daformer.train_step(train_model, teacher, imnet, optimizer, rt, it, *batch,
                                     lambda x: normalize(x, "imagenet"), args, thing_lut, (2, 3))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return losses, grads


def reference_steps(nets, batch, args, iterations=2, lr=0.05):
    """DAFormer's iteration written out by hand (dacs.py forward_train): EMA first (t >= 1, a = min(1 - 1/(t+1),
    alpha), parameters only); source CE (bilinear to the labels, align_corners False, mean over ALL pixels) + lambda
    x mean L2 distance of stage-4 features to the ImageNet encoder over the thing cells; teacher (no grad) on the
    plain target: softmax at the image size, argmax, q = share of confidences >= tau, weight q with 2 top / 3 bottom
    rows at 0; mixed image, labels and weights from the source where the mask is set; weighted CE on the jittered mix;
    the two gradients summed; SGD with momentum 0.9 (head lr x10, weight decay 0.01 except on encoder norms)."""
    model, teacher, imnet = nets
    images, labels, target_images = batch
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

    def normalised(x):
        return (x.float() - mean) / std

    def ce_map(logits, target):
        logp = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False).log_softmax(1)
        return -logp.gather(1, target.clamp(max=STEP_CLASSES - 1)[:, None])[:, 0] * (target != 255)

    named = list(model.named_parameters())
    params = [p for _, p in named]
    momentum, grads = {}, []
    fd_mask = torch.tensor([[[True, False]], [[False, True]]])
    for it in range(iterations):
        step_lr = lr * (1 - it / 10)
        if it > 0:
            a = min(1 - 1 / (it + 1), args.ema_alpha)
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), model.parameters()):
                    t.copy_(a * t + (1 - a) * s)
        feats, logits = model(normalised(images))
        with torch.no_grad():
            imnet_feat = imnet.forward_intermediates(normalised(images), intermediates_only=True)[3]
        distance = (feats[3] - imnet_feat).pow(2).sum(1).sqrt()
        source_loss = ce_map(logits, labels).mean() + args.fd_lambda * distance[fd_mask].mean()
        source_grads = torch.autograd.grad(source_loss, params)
        with torch.no_grad():
            teacher_logits = F.interpolate(teacher(normalised(target_images))[1], size=(32, 64), mode="bilinear",
                                           align_corners=False)
            confidence, pseudo = teacher_logits.softmax(1).max(1)
            weight = torch.full_like(confidence, (confidence >= args.pseudo_threshold).float().mean().item())
            weight[:, :2], weight[:, -3:] = 0, 0
            mask = fixed_class_mix(labels)
            mixed = torch.where(mask[:, None], images.float() / 255, target_images.float() / 255)
            mixed = fixed_augment(args)(mixed, args.jitter_p, args.jitter_strength, args.blur_p)
            mixed_labels = torch.where(mask, labels, pseudo)
            mixed_weight = torch.where(mask, 1.0, weight)
        _, mixed_logits = model(normalised(mixed * 255))
        mix_grads = torch.autograd.grad((ce_map(mixed_logits, mixed_labels) * mixed_weight).mean(), params)
        grads.append({})
        with torch.no_grad():
            for (name, p), g1, g2 in zip(named, source_grads, mix_grads):
                grads[-1][name] = g = g1 + g2
                head = name.startswith("head.")
                d = g + (0.0 if "norm" in name and not head else 0.01) * p
                momentum[name] = d if it == 0 else 0.9 * momentum[name] + d
                p.sub_(step_lr * (10 if head else 1) * momentum[name])
    return grads


def assert_close(ours, theirs, what, rtol=1e-4):
    """Every tensor within rtol of its largest entry (float noise in tiny entries stays far below that)."""
    bad = [k for k in theirs if not torch.allclose(ours[k].float(), theirs[k].float(), rtol=rtol,
                                                   atol=rtol * theirs[k].float().abs().max().item() + 1e-12)]
    assert not bad, f"{what}: {bad[:5]}"


def test_train_step_matches_an_independent_reference(monkeypatch):
    """Two real iterations of main()'s step against the hand-written reference: each iteration's gradients, then the
    student, the teacher (EMA order, BN statistics) and the FD encoder (untouched); the teacher runs without
    autograd."""
    nets, batch, args, thing_lut = step_case()
    reference = copy.deepcopy(nets)
    monkeypatch.setattr(daformer, "class_mix_masks", fixed_class_mix)
    monkeypatch.setattr(daformer, "strong_augment", fixed_augment(args))
    grad_modes = []
    nets[1].register_forward_hook(lambda module, inputs, output: grad_modes.append(torch.is_grad_enabled()))
    losses, grads = run_steps(nets, batch, args, thing_lut, Runtime("cpu", amp=False))
    reference_grads = reference_steps(reference, batch, args)
    assert 0 < losses["pseudo_weight"].item() < 1 and losses["fd"].item() > 0
    assert grad_modes == [False, False] and not any(p.requires_grad for p in nets[1].parameters())
    for it, (ours, theirs) in enumerate(zip(grads, reference_grads)):
        assert_close(ours, theirs, f"gradients of iteration {it}")
    for ours, theirs, name in zip(nets, reference, ("student", "teacher", "FD encoder")):
        assert_close(ours.state_dict(), theirs.state_dict(), name)
    initial = step_case()[0]
    assert not torch.equal(nets[0].head.classifier.weight, initial[0].head.classifier.weight)
    assert not torch.equal(nets[1].encoder.patch_embed.proj.weight, initial[1].encoder.patch_embed.proj.weight)
    assert same(nets[2].state_dict(), initial[2].state_dict())


def ddp_step_case():
    """What 2 processes x batch 1 can share with 1 process x batch 2 (the method itself depends on the per-process
    batch elsewhere): decoder BN in eval mode in student and teacher (train-mode BN normalises over each process's
    images), tau 0 so that q is 1 on every process (q is the share of the local target pixels), a ClassMix mask
    and an augmentation per image (the real ones draw the class set from the local source batch and the jitter from
    the process's generator). What is left: the EMA teacher update, the source CE + FD gradients (one thing cell per
    image, so the per-process FD means average to the global one) and the mixed CE, averaged once by DDP."""
    nets, batch, args, thing_lut = step_case(threshold=0.0)
    for net in nets[:2]:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    return nets, batch, args, thing_lut


def ddp_step_worker(out):
    """Rank r of a torchrun group steps on pair r of ddp_step_case; rank 0 saves the networks."""
    rt = Runtime("cpu", amp=False)
    nets, batch, args, thing_lut = ddp_step_case()
    daformer.class_mix_masks, daformer.strong_augment = fixed_class_mix, fixed_augment(args)
    mine = [x[rt.rank:rt.rank + 1] for x in batch]
    run_steps(nets, mine, args, thing_lut.to(rt.device), rt)
    if rt.is_main:
        torch.save([n.state_dict() for n in nets], out)
    rt.close()


def torchrun(*argv):
    """2 gloo processes under tests/collective_guard.py (a host tensor in any collective fails the run)."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "tests", "collective_guard.py"), *map(str, argv)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_step_like_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    """train_step under DDP (2 gloo processes x 1 pair) ends two iterations with the weights of 1 process x 2
    pairs, student and EMA teacher, in what the per-process batch leaves equal (ddp_step_case says what and why)."""
    torchrun(os.path.join("tests", "test_daformer.py"), tmp_path / "ddp.pt")
    nets, batch, args, thing_lut = ddp_step_case()
    monkeypatch.setattr(daformer, "class_mix_masks", fixed_class_mix)
    monkeypatch.setattr(daformer, "strong_augment", fixed_augment(args))
    run_steps(nets, batch, args, thing_lut, Runtime("cpu", amp=False))
    for ours, theirs, name in zip(torch.load(tmp_path / "ddp.pt", weights_only=True), nets,
                                  ("student", "teacher", "FD encoder")):
        assert_close(ours, theirs.state_dict(), name)


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


@pytest.fixture(scope="module")
def straight_run(rcs_stats, tmp_path_factory):
    """4 uninterrupted iterations, checkpoints every 2 (the run folder test and the resume test's reference)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_script(*tiny(rcs_stats), "--iters", "4", "--checkpoint-every", "2", "--out", str(out), check=True)
    return out


def test_quick_run_writes_every_run_folder_file(tmp_path, rcs_stats, straight_run):
    out = straight_run
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "daformer" and set(config["params"]) == {"model", "teacher", "imnet_encoder"}
    assert config["params"]["teacher"]["trainable"] == 0 and config["loaded"] is None
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
    result = run_script(*tiny(rcs_stats), "--eval-only", "--weights", str(out / "checkpoints" / "last.pt"), "--out",
                        str(eval_out), check=True)
    assert "recognised daformer checkpoint: pvt_v2_b0, daformer decoder, imagenet input, set aside its EMA teacher" \
        in result.stdout  # --decoder-dim 32 was typed: not "applied"
    assert json.loads((eval_out / "results.json").read_text())["miou"] == pytest.approx(results["miou"])


def test_resume_continues_exactly(tmp_path, rcs_stats, straight_run):
    """The resumed process starts at the checkpoint's iteration (it says so, and logs only later iterations) and
    ends with the uninterrupted run's networks and optimiser state: a silent restart from 0 would fail all three."""
    split = tmp_path / "split"
    run_script(*tiny(rcs_stats), "--iters", "2", "--poly-horizon", "4", "--out", str(split), check=True)
    rows_before = len((split / "metrics.jsonl").read_text().splitlines())
    result = run_script(*tiny(rcs_stats), "--iters", "4", "--resume", "auto", "--out", str(split), check=True)
    assert "at iteration 2" in result.stdout
    new_rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()[rows_before:]]
    assert [r["iter"] for r in new_rows if "seg_src" in r] == [4]
    assert json.loads((split / "config.json").read_text())["loaded"]["file"] == str(split / "checkpoints" / "last.pt")
    a = torch.load(straight_run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for net in ("model", "teacher", "imnet_encoder"):
        assert same(a[net], b[net]), net
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])


def test_ablation_switches_run_and_training_starts_from_a_release(tmp_path, rcs_stats):
    """--no-rcs --no-mix --no-warmup --decoder segformer on whole frames, started with --init from a toy release
    (8 classes, conv1 'segformer' fusion): the student starts from the file's student (iteration 0 skips the EMA,
    so the checkpointed teacher holds exactly that student, not the file's teacher) and FD compares with the file's
    imnet_model; the run records what it loaded. Then --source-only --no-fd."""
    nets = [random_net(8, "segformer", seed=s) for s in (1, 2, 3)]
    torch.save(released_daformer.daformer_release(*(n.state_dict() for n in nets)), tmp_path / "latest.pth")
    out = tmp_path / "ablation"
    result = run_script(*tiny(None, crop="none"), "--iters", "1", "--no-rcs", "--no-mix", "--no-warmup", "--decoder",
                        "segformer", "--ema-alpha", "0.99", "--init", str(tmp_path / "latest.pth"), "--out", str(out),
                        check=True)  # whole 128x256 frames
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"seg_src", "fd", "mix", "pseudo_weight"} <= set(row)
    assert row["lr"] == pytest.approx(daformer.PRESETS["quick"]["lr"])  # iteration 0 without warm-up
    assert "recognised DAFormer release (mmcv UDA checkpoint): pvt_v2_b0, imagenet input, set aside ema_model.*" \
        in result.stdout  # --decoder segformer and --decoder-dim 32 were typed (and agree): not "applied"
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(ckpt["teacher"][k], p) for k, p in nets[0].state_dict().items() if "running" not in k
               and "num_batches" not in k)  # the teacher's BN statistics moved in its train-mode forward
    assert same(ckpt["imnet_encoder"], nets[2].encoder.state_dict())
    assert json.loads((out / "config.json").read_text())["loaded"]["kind"] == "DAFormer release (mmcv UDA checkpoint)"
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
                   dry_run=True, world_size=1, rank=0, rcs_stats=None, save_predictions=None)


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
    """A run reached only after the data is read (the rest: unit tests above)."""
    result = run_script(*tiny(rcs_stats, "none"), "--iters", "1", "--target-size", "64", "128", "--out",
                        str(tmp_path / "bad"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
    assert "source frames resize to 128x256 and target frames to 64x128" in errors[0]


def test_torchrun_run_and_its_sharded_evaluation(tmp_path, rcs_stats):
    """2 gloo processes under the collective guard: rank 0 alone logs and checkpoints; the final evaluation, sharded
    over the 2 ranks with rank 0's BN statistics, equals --eval-only of the checkpoint in one process."""
    out = tmp_path / "ddp"
    torchrun(*tiny(rcs_stats), "--iters", "2", "--out", out)
    assert json.loads((out / "results.json").read_text())["iters"] == 2
    assert json.loads((out / "config.json").read_text())["args"]["world_size"] == 2
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if "seg_src" in l]) == 1
    run_script(*tiny(rcs_stats), "--eval-only", "--weights", str(out / "checkpoints" / "last.pt"), "--out",
               str(tmp_path / "eval"), check=True)
    scores = [json.loads((folder / "results.json").read_text())["per_class_iou"] for folder in (out, tmp_path / "eval")]
    assert scores[0] == pytest.approx(scores[1], nan_ok=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device")
def test_collectives_run_on_the_cuda_device_under_nccl(tmp_path):
    """NCCL refuses CPU tensors: the RCS class counts and the BN statistics must go through the run's device.
    A one-process NCCL group is enough to catch a CPU tensor (it raises the same error as on 2 GPUs)."""
    import torch.distributed as dist
    rt = Runtime("cuda")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    rt.distributed = True
    try:
        split = daformer.domain_split("toy-synth", "train")
        counts, area = daformer.class_statistics(split, 8, str(tmp_path / "stats.json"), rt)
        assert counts.shape == (2000, 8) and area == 128 * 256
        rt.share_buffers(daformer.DAFormerNet("pvt_v2_b0", 8, decoder_dim=32).to(rt.device))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # the worker of test_two_processes_step_like_one_process_with_the_whole_batch
    ddp_step_worker(sys.argv[1])
