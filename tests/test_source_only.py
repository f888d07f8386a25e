"""source_only.py end to end: run folder, bad input, kill-and-resume, torchrun, the model itself."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import source_only
from common.cli import UserError
from conftest import ROOT, run_script
from test_data import make_folder

QUICK = ["source_only.py", "--preset", "quick", "--eval-limit", "2", "--num-workers", "0", "--log-every", "2"]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_quick_run_writes_every_run_folder_file(tmp_path):
    out = tmp_path / "run"
    run_script(*QUICK, "--iters", "4", "--checkpoint-every", "2", "--eval-every", "2", "--out", str(out), check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "source_only" and config["args"]["iters"] == 4
    assert config["params"]["model"]["total"] > config["params"]["model"]["trainable"] > 0  # BN affine frozen
    assert {"git_commit", "torch", "timm"} <= set(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "seg_src" in r]
    assert [r["iter"] for r in train_rows] == [2, 4] and all({"lr", "seconds"} <= set(r) for r in train_rows)
    assert any("val_miou" in r for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["miou"] <= 100 and results["num_classes"] == 8 and results["iters"] == 4
    assert set(results["per_class_iou"]) == {"road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car"}
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iter"] == 4 and ckpt["script"] == "source_only"
    preds = sorted(os.listdir(out / "predictions"))
    assert len(preds) == 2
    assert Image.open(out / "predictions" / preds[0]).size == (3 * 256, 128)  # image | label | prediction

    # --eval-only on that checkpoint reproduces the final mIoU
    eval_out = tmp_path / "eval"
    run_script(*QUICK, "--eval-only", "--weights", str(out / "checkpoints" / "last.pt"), "--out", str(eval_out),
               check=True)
    assert json.loads((eval_out / "results.json").read_text())["miou"] == pytest.approx(results["miou"])


def test_dry_run_reads_no_data(tmp_path):
    out = tmp_path / "dry"
    result = run_script("source_only.py", "--dry-run", "--init", "none", "--data-root", str(tmp_path / "nothing"),
                        "--out", str(out), "--device", "cpu", check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["params"]["model"]["trainable"] > 40_000_000  # DeepLab-v2 ResNet-101, 19 classes
    assert not (out / "results.json").exists() and "dry run" in result.stdout


def test_bad_input_gives_one_line_errors(tmp_path):
    base = ["source_only.py", "--preset", "quick", "--iters", "2", "--num-workers", "0", "--eval-limit", "1"]
    assert_one_line_error(run_script(*base, "--source", "gta", "--target", "cityscapes", "--data-root",
                                     str(tmp_path), "--out", str(tmp_path / "r0")), "cityscapes/leftImg8bit/val", "README")
    assert_one_line_error(run_script(*base, "--backbone", "resnet7", "--out", str(tmp_path / "r1")),
                          "unknown backbone 'resnet7'")
    src = make_folder(str(tmp_path / "src"))
    tgt = make_folder(str(tmp_path / "tgt"), classes=("a", "b"))
    assert_one_line_error(run_script(*base, "--source", src, "--target", tgt, "--out", str(tmp_path / "r2")),
                          "class lists differ")
    os.remove(os.path.join(src, "labels", "train", "im1.png"))
    assert_one_line_error(run_script(*base, "--source", src, "--target", src, "--out", str(tmp_path / "r3")),
                          "im1.png has no label")
    bad = make_folder(str(tmp_path / "badlabel"), label_value=9)
    assert_one_line_error(run_script(*base, "--source", bad, "--target", bad, "--out", str(tmp_path / "r4")),
                          "value 9")
    trunc = make_folder(str(tmp_path / "trunc"))
    for split in ("train", "val"):
        for i in range(2):
            path = os.path.join(trunc, "images", split, f"im{i}.png")
            data = open(path, "rb").read()
            open(path, "wb").write(data[:40])
    # raised inside a DataLoader worker process: still one line naming the file
    assert_one_line_error(run_script(*base[:-4], "--num-workers", "1", "--source", trunc, "--target", src,
                                     "--out", str(tmp_path / "r5")), "cannot read image", "im")
    assert_one_line_error(run_script(*base, "--eval-only", "--weights", str(tmp_path / "nope.pt"),
                                     "--out", str(tmp_path / "r6")), "does not exist")


def test_foreign_checkpoints_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"script": "daformer", "num_classes": 8, "model": {}}, other)
    result = run_script(*QUICK, "--eval-only", "--weights", str(other), "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "written by daformer, not source_only")
    classes = tmp_path / "classes.pt"
    torch.save({"script": "source_only", "num_classes": 19, "model": {}}, classes)
    assert_one_line_error(run_script(*QUICK, "--eval-only", "--weights", str(classes), "--out", str(tmp_path / "b")),
                          "19 classes, this run has 8")
    multi = tmp_path / "multi.pt"  # trained with --multi-level, evaluated without it
    torch.save({"script": "source_only", "num_classes": 8, "iter": 1, "normalization": "imagenet",
                "model": source_only.DeepLabV2("resnet18", 8, multi_level=True).state_dict()}, multi)
    assert_one_line_error(run_script(*QUICK, "--eval-only", "--weights", str(multi), "--out", str(tmp_path / "m")),
                          "do not fit the network these flags build", "aux_head")
    pickled = tmp_path / "pickled.pt"
    torch.save({"script": "source_only", "obj": UserError("x")}, pickled)  # needs unpickling of an object
    assert_one_line_error(run_script(*QUICK, "--eval-only", "--weights", str(pickled), "--out", str(tmp_path / "c")),
                          "cannot load checkpoint")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    result = run_script(*QUICK, "--iters", "6", "--lr", "1e12", "--checkpoint-every", "1", "--out", str(out))
    assert_one_line_error(result, "non-finite", "left intact")
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 1 <= ckpt["iter"] < 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def final_weights(out):
    return torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)["model"]


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    args = [*QUICK, "--iters", "8", "--checkpoint-every", "3", "--num-workers", "1"]
    straight = tmp_path / "straight"
    run_script(*args, "--out", str(straight), check=True)

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, *args, "--out", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_file = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ckpt_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the data-loader worker too
    proc.wait()
    assert ckpt_file.exists()
    assert torch.load(ckpt_file, weights_only=True)["iter"] < 8, "the run finished before it could be killed"
    run_script(*args, "--out", str(killed), "--resume", "auto", check=True)
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "results.json").read_text())["miou"] == \
        json.loads((killed / "results.json").read_text())["miou"]


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, *QUICK, "--iters", "2", "--batch-size", "2", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["iters"] == 2
    assert json.loads((out / "config.json").read_text())["args"]["world_size"] == 2
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if "seg_src" in l]) == 1  # rank 0 only


# ----------------------------------------------------------------------------------------------------
# the model
def test_deeplabv2_shapes_and_output_stride():
    model = source_only.DeepLabV2("resnet18", num_classes=5, multi_level=True).eval()
    aux, main = model(torch.zeros(1, 3, 65, 97))
    assert main.shape == (1, 5, 9, 13) and aux.shape == (1, 5, 9, 13)  # stride 8 with ceil-mode pooling
    model101 = source_only.DeepLabV2("resnet101", num_classes=19)
    _, main = model101.eval()(torch.zeros(1, 3, 64, 128))
    assert main.shape == (1, 19, 9, 17)
    # every block of layer3/layer4 is dilated (2/4), padding = dilation, the stride sits on the 1x1 conv
    assert {b.conv2.dilation for b in model101.layer3} == {(2, 2)} and {b.conv2.dilation for b in model101.layer4} == {(4, 4)}
    assert model101.layer2[0].conv1.stride == (2, 2) and model101.layer2[0].conv2.stride == (1, 1)
    assert model101.maxpool.ceil_mode


def test_bn_affine_is_frozen_and_heads_get_ten_times_the_lr():
    model = source_only.DeepLabV2("resnet18", num_classes=5)
    assert not model.bn1.weight.requires_grad and not model.layer1[0].bn1.bias.requires_grad
    groups = model.param_groups(1e-3, 10)
    head_params = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head_params and groups[1]["lr"] == pytest.approx(1e-2)
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_aspp_sums_branches_and_two_branch_quirk():
    aspp4, aspp2 = source_only.ASPP(8, 3, 4), source_only.ASPP(8, 3, 2)
    assert [c.dilation for c in aspp4.convs] == [(6, 6), (12, 12), (18, 18), (24, 24)] and len(aspp2.convs) == 2
    x = torch.randn(1, 8, 30, 30)
    assert torch.allclose(aspp4(x), sum(c(x) for c in aspp4.convs))


def test_init_from_deeplab_caffe_file_and_torchvision_layout(tmp_path):
    reference = source_only.DeepLabV2("resnet18", num_classes=5)
    state = {"Scale." + k: v + 1 for k, v in reference.state_dict().items() if "head" not in k}
    state["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(3)  # the original init's classifier: dropped
    path = tmp_path / "DeepLab_init.pth"
    torch.save(state, path)
    model = source_only.DeepLabV2("resnet18", num_classes=5)
    assert source_only.load_init(model, str(path), "resnet18") == "caffe"
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight + 1)
    torch.save({k.removeprefix("Scale."): v for k, v in state.items() if "layer5" not in k}, path)
    assert source_only.load_init(source_only.DeepLabV2("resnet18", num_classes=5), str(path), "resnet18") == "imagenet"
    with pytest.raises(UserError, match="does not fit"):
        source_only.load_init(source_only.DeepLabV2("resnet50", num_classes=5), str(path), "resnet50")


def test_seg_loss_ignores_255_and_is_zero_without_valid_pixels():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    assert source_only.seg_loss(logits, labels).item() == pytest.approx(np.log(3))
    empty = source_only.seg_loss(logits, torch.full((1, 2, 2), 255))
    assert empty.item() == 0.0 and torch.isfinite(empty)


def test_poly_schedule():
    assert source_only.poly_lr(2.5e-4, 0, 250000, 0.9) == 2.5e-4
    assert source_only.poly_lr(2.5e-4, 125000, 250000, 0.9) == pytest.approx(2.5e-4 * 0.5 ** 0.9)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101"])
def test_imagenet_init_maps_every_torchvision_tensor(backbone, monkeypatch):
    """--init imagenet: torchvision's ResNet names and shapes fit the Caffe-style DeepLab-v2 (no download here)."""
    import torchvision
    reference = torchvision.models.get_model(backbone, weights=None)
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None: reference)
    model = source_only.DeepLabV2(backbone, num_classes=3)
    assert source_only.load_init(model, "imagenet", backbone) == "imagenet"
    ref = reference.state_dict()
    own = model.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in own if "head" not in k)
    assert {k for k in ref if not k.startswith("fc.")} == {k for k in own if "head" not in k}
