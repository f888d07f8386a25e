"""source_only.py end to end: run folder, bad input, kill-and-resume, torchrun, the model itself."""
import copy
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
import torch.nn.functional as F
from PIL import Image

import released
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
                                     "--out", str(tmp_path / "r6")), "no such file")


def test_foreign_checkpoints_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"script": "daformer", "num_classes": 8, "model": {}}, other)
    result = run_script(*QUICK, "--eval-only", "--weights", str(other), "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "written by daformer, not source_only")
    classes = tmp_path / "classes.pt"
    torch.save({"script": "source_only", "num_classes": 19, "model": {}}, classes)
    assert_one_line_error(run_script(*QUICK, "--eval-only", "--weights", str(classes), "--out", str(tmp_path / "b")),
                          "19 classes, this run has 8")
    wide = tmp_path / "wide.pt"  # a resnet34 checkpoint evaluated as resnet18 (typed): shapes cannot fit
    torch.save({"script": "source_only", "num_classes": 8, "iter": 1, "normalization": "imagenet", "args": {},
                "model": source_only.DeepLabV2("resnet34", 8).state_dict()}, wide)
    assert_one_line_error(run_script(*QUICK, "--eval-only", "--weights", str(wide), "--backbone", "resnet18",
                                     "--out", str(tmp_path / "m")), "does not fit this network", "pass the flags")
    pickled = tmp_path / "pickled.pt"
    torch.save({"script": "source_only", "obj": UserError("x")}, pickled)  # needs unpickling of an object
    assert_one_line_error(run_script(*QUICK, "--eval-only", "--weights", str(pickled), "--out", str(tmp_path / "c")),
                          "cannot load --weights", "Unsupported global")
    garbage = tmp_path / "garbage.pt"
    torch.save({"a.weight": torch.zeros(2)}, garbage)
    assert_one_line_error(run_script(*QUICK, "--eval-only", "--weights", str(garbage), "--out", str(tmp_path / "g")),
                          "unrecognised layout", "AdaptSegNet/ADVENT/BDL releases")


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
    """The resumed process starts at the checkpoint's iteration (it says so, and logs only later iterations) and
    ends with the uninterrupted run's weights: a silent restart from 0 would fail the first two checks."""
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
    start = torch.load(ckpt_file, weights_only=True)["iter"]
    assert 0 < start < 8, "the run finished before it could be killed"
    rows_before = len((killed / "metrics.jsonl").read_text().splitlines())
    resumed = run_script(*args, "--out", str(killed), "--resume", "auto", check=True)
    assert f"at iteration {start}" in resumed.stdout
    new_rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()[rows_before:]]
    assert new_rows and min(r["iter"] for r in new_rows if "seg_src" in r) > start
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "results.json").read_text())["miou"] == \
        json.loads((killed / "results.json").read_text())["miou"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py")]


def torchrun(*argv):
    """2 gloo processes under the collective guard (a host tensor in any collective fails the run)."""
    result = subprocess.run([*TORCHRUN, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 processes x batch 1 end with the weights of 1 process x batch 2 (BN in eval mode: per-process batch
    statistics differ by construction); rank 0 alone logs; evaluation sharded over 2 ranks scores like 1 rank."""
    args = [*QUICK, "--iters", "2", "--batch-size", "2", "--bn-mode", "eval", "--log-every", "1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_script(*args, "--out", str(single), check=True)
    torchrun(*args, "--out", ddp)
    a, b = final_weights(single), final_weights(ddp)
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in a)
    assert json.loads((ddp / "config.json").read_text())["args"]["world_size"] == 2
    assert len([l for l in (ddp / "metrics.jsonl").read_text().splitlines() if "seg_src" in l]) == 2  # rank 0 only
    sharded = tmp_path / "sharded"
    torchrun(*QUICK, "--eval-only", "--weights", single / "checkpoints" / "last.pt", "--out", sharded)
    assert json.loads((sharded / "results.json").read_text())["per_class_iou"] == \
        json.loads((single / "results.json").read_text())["per_class_iou"]


def test_sharded_evaluation_scores_the_checkpointed_network(tmp_path):
    """Train-mode BN: each rank's running statistics come from its own images; the final (sharded) evaluation of a
    torchrun run must score what rank 0 checkpoints, i.e. equal --eval-only of that checkpoint in one process."""
    out = tmp_path / "ddp"
    torchrun(*QUICK, "--iters", "2", "--batch-size", "2", "--out", out)
    again = tmp_path / "again"
    run_script(*QUICK, "--eval-only", "--weights", str(out / "checkpoints" / "last.pt"), "--out", str(again), check=True)
    assert json.loads((out / "results.json").read_text())["per_class_iou"] == \
        json.loads((again / "results.json").read_text())["per_class_iou"]


def test_train_step_matches_an_independent_reference():
    """Two real iterations of main()'s step against a hand-written one: CE(main) + 0.1 CE(aux) on logits
    upsampled to the labels (align_corners=True, mean over non-255 pixels), SGD with momentum 0.9, weight decay
    and the heads at 10x the lr; frozen BN affine; BN statistics from the batch (train mode)."""
    from common.runtime import Runtime
    torch.manual_seed(0)
    model = source_only.DeepLabV2("resnet18", 4, multi_level=True)
    reference = copy.deepcopy(model)
    lr, wd, momentum = 0.01, 5e-4, 0.9
    optimizer = torch.optim.SGD(model.param_groups(lr, 10), lr=lr, momentum=momentum, weight_decay=wd)
    images, labels = torch.randn(2, 3, 33, 49), torch.randint(0, 4, (2, 33, 49))
    labels[0, :5] = 255
    rt = Runtime("cpu", amp=False)
    for _ in range(2):
        source_only.train_step(model, optimizer, rt, images, labels, 0.1)

    def ce(logits):
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True).log_softmax(1)
        valid = labels != 255
        return -up.gather(1, labels.clamp(max=3)[:, None])[:, 0][valid].mean()

    params = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    buffers = {}
    for _ in range(2):
        aux, main = reference(images)
        grads = torch.autograd.grad(ce(main) + 0.1 * ce(aux), [p for _, p in params])
        with torch.no_grad():
            for (name, p), g in zip(params, grads):
                d = g + wd * p
                buffers[name] = d if name not in buffers else momentum * buffers[name] + d
                p -= lr * (10 if "head" in name else 1) * buffers[name]
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6, rtol=1e-5) for k in ours)
    assert not torch.equal(ours["head.convs.0.weight"], source_only.DeepLabV2("resnet18", 4).state_dict()[
        "head.convs.0.weight"])


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
    torchvision_layout = source_only.DeepLabV2("resnet50", num_classes=19, stride_on="3x3")  # where its weights learnt
    assert torchvision_layout.layer2[0].conv1.stride == (1, 1) and torchvision_layout.layer2[0].conv2.stride == (2, 2)
    assert torchvision_layout.eval()(torch.zeros(1, 3, 64, 128))[1].shape == (1, 19, 9, 17)


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
    reference = source_only.DeepLabV2("resnet50", num_classes=5)
    path = tmp_path / "DeepLab_init.pth"
    torch.save(released.caffe_init({k: v + 1 for k, v in reference.state_dict().items()}), path)
    found = source_only.read_weights(str(path))
    assert found["implied"] == {"normalization": "caffe", "stride_on": "1x1", "backbone": "resnet50"}
    model = source_only.DeepLabV2("resnet50", num_classes=5)
    head = model.head.convs[0].weight.clone()
    assert source_only.load_init(model, str(path), "resnet50", found) == "caffe"
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight + 1)
    assert torch.equal(model.bn1.running_var, reference.bn1.running_var + 1)
    assert torch.equal(model.head.convs[0].weight, head)  # the COCO classifier is dropped, the head stays random
    torch.save({**{k: v for k, v in reference.state_dict().items() if "head" not in k},
                "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, path)  # torchvision layout
    found = source_only.read_weights(str(path))
    assert found["kind"] == "torchvision ResNet" and found["implied"]["stride_on"] == "3x3"
    assert source_only.load_init(source_only.DeepLabV2("resnet50", num_classes=5), str(path), "resnet50", found) == \
        "imagenet"
    with pytest.raises(UserError, match="does not fit"):
        source_only.load_init(source_only.DeepLabV2("resnet101", num_classes=5), str(path), "resnet101", found)


@pytest.mark.parametrize("kind", ["adaptsegnet", "advent", "bdl"])
def test_released_deeplab_models_are_recognised_and_land_in_the_right_modules(kind, tmp_path):
    """AdaptSegNet (aux layer5 + layer6, torch < 0.4.1: 2 ASPP branches), ADVENT (the same keys saved by 0.4.1: 4
    branches), BDL (one layer5 head on layer4, torch 0.4.0: 2 branches); all Caffe input, stride on the 1x1."""
    multi = kind != "bdl"
    reference = source_only.DeepLabV2("resnet50", 19, multi_level=multi)
    for p in reference.parameters():  # random heads and BN statistics, so that a swap would show
        torch.nn.init.normal_(p)
    reference.bn1.running_mean.normal_()
    path = tmp_path / f"{kind}.pth"
    torch.save(released.deeplab_release(reference.state_dict(), kind), path)
    found = source_only.read_weights(str(path))
    assert found["kind"] == {"adaptsegnet": "AdaptSegNet release", "advent": "ADVENT release",
                             "bdl": "single-head release (BDL, AdaptSegNet single-level)"}[kind]
    assert found["implied"] == {"normalization": "caffe", "stride_on": "1x1", "multi_level": multi,
                                "aspp_branches": 4 if kind == "advent" else 2, "backbone": "resnet50"}
    model = source_only.DeepLabV2("resnet50", 19, multi_level=multi, aspp_branches=found["implied"]["aspp_branches"])
    report = source_only.load_matching(model, found["state"], kind, required=lambda k: True)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items() if k in ours)
    expect_unused = set() if kind == "advent" else {f"{h}.convs.{i}.{p}" for h in ("head", "aux_head")[:1 + multi]
                                                     for i in (2, 3) for p in ("weight", "bias")}
    assert set(report["unused"]) == expect_unused  # the two convs the official forward never sums: listed


def test_released_model_evaluates_through_eval_only(tmp_path):
    """--eval-only --weights <an AdaptSegNet release> on a tiny Cityscapes folder: no flags needed (resnet50
    read from the file here), the quirks applied and recorded, predictions in the benchmark format."""
    names = released.cityscapes_tree(str(tmp_path / "data"))
    model = source_only.DeepLabV2("resnet50", 19, multi_level=True)  # the file holds all 4 convs of each head
    path = tmp_path / "GTA2Cityscapes_multi-ed35151c.pth"
    torch.save(released.deeplab_release(model.state_dict(), "adaptsegnet"), path)
    out, preds = tmp_path / "eval", tmp_path / "preds"
    result = run_script("source_only.py", "--eval-only", "--weights", str(path), "--data-root", str(tmp_path / "data"),
                        "--eval-size", "32", "64", "--num-workers", "0", "--out", str(out), "--device", "cpu",
                        "--save-predictions", str(preds), check=True)
    assert "recognised AdaptSegNet release: caffe input, stride on 1x1, multi-level: True, 2 ASPP branches" \
        in result.stdout.replace("normalization", "")
    config, results = (json.loads((out / f).read_text()) for f in ("config.json", "results.json"))
    assert config["args"]["aspp_branches"] == 2 and config["normalization"] == "caffe"
    assert results["loaded"]["kind"] == "AdaptSegNet release" and results["loaded"]["implied"]["aspp_branches"] == 2
    files = sorted(os.listdir(preds))
    assert files == [f"{n}_leftImg8bit.png" for n in names]  # the name cityscapesScripts matches
    saved = np.asarray(Image.open(preds / files[0]))
    assert saved.shape == (64, 128) and set(np.unique(saved)) <= set(released.CITYSCAPES_LABEL_IDS)
    # a typed flag beats the file, with a warning
    typed = run_script("source_only.py", "--eval-only", "--weights", str(path), "--data-root", str(tmp_path / "data"),
                       "--eval-size", "32", "64", "--num-workers", "0", "--out", str(tmp_path / "typed"),
                       "--device", "cpu", "--aspp-branches", "4", check=True)
    assert "--aspp-branches 4 contradicts AdaptSegNet release, which implies 2" in typed.stderr
    assert json.loads((tmp_path / "typed" / "config.json").read_text())["args"]["aspp_branches"] == 4


def test_numpy_scalars_load_and_other_objects_do_not(tmp_path):
    from common.checkpoint import read_weights_file
    path = tmp_path / "proda_like.pkl"
    torch.save({"ResNet101": {"model_state": {"w": torch.ones(1)}}, "iter": 3, "best_iou": np.float64(0.5)}, path)
    assert read_weights_file(str(path))["best_iou"] == 0.5
    torch.save({"w": torch.ones(1), "opt": source_only.Args()}, path)
    with pytest.raises(UserError, match="Unsupported global"):
        read_weights_file(str(path))


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


def test_init_file_with_another_class_count_names_the_file(tmp_path):
    """--init one of our checkpoints with 8 classes into a 19-class run: the one-line error names that file."""
    path = tmp_path / "eight.pt"
    torch.save({"script": "source_only", "args": {"backbone": "resnet18"}, "model": {}, "num_classes": 8}, path)
    args = source_only.Args(init=str(path), weights=[])
    args.given = frozenset()
    with pytest.raises(UserError, match=f"^{path} has 8 classes, this run has 19$"):
        source_only.prepare_weights(args, None, "source_only", 19)
