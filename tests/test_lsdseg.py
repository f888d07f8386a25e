"""lsdseg.py: the paper preset against the official recipe, the official loaders (resize, crop margins,
source lists, epoch length) and evaluation protocol, the FCN-8s, G and D shapes, each loss on hand-made
tensors, which network each of the three updates may change; then the script end to end (run folder, exact
resume, eval-only, dry run, torchrun, the learning-rate step)."""
import dataclasses
import importlib
import inspect
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import load_checkpoint
from common.cli import UserError, field_docs, parse_args
from common.data import CITYSCAPES_CLASSES, DomainSplit
from conftest import ROOT, run_script

lsd = importlib.import_module("lsdseg")
SMALL = ["--preset", "quick", "--source-size", "32", "64", "--target-size", "32", "64", "--eval-limit", "2",
         "--num-workers", "0", "--log-every", "2", "--checkpoint-every", "2"]


def run(*extra, cmd=None):
    argv = [*(cmd or ["lsdseg.py"]), *SMALL, *map(str, extra)]
    if cmd is None:
        return run_script(*argv, check=True, env={"OMP_NUM_THREADS": "1"})
    import subprocess
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------------------------------- interface
def test_every_field_has_help_and_quick_mirrors_source_only():
    docs = field_docs(lsd.Args)
    for f in dataclasses.fields(lsd.Args):
        if not f.metadata.get("runtime"):
            assert docs.get(f.name), f"{f.name} has no docstring"
    so = importlib.import_module("source_only")
    for key in ("source", "target", "init", "iters", "batch_size", "eval_every", "checkpoint_every", "num_workers",
                "log_every", "poly_horizon", "seed", "source_size", "target_size"):
        assert lsd.PRESETS["quick"][key] == so.PRESETS["quick"][key], key
    # the quick preset scales F's adaptation weights 10x (header), the paper's stay the published 0.1
    assert (lsd.PRESETS["quick"]["adv_weight"], lsd.PRESETS["quick"]["c_weight"]) == (1.0, 1.0)
    assert (lsd.Args().adv_weight, lsd.Args().c_weight, lsd.Args().g_adv_weight) == (0.1, 0.1, 0.1)


# the paper preset, field by field, against the official code (swamiviv/LSD-seg e373e89, paths under code/)
OFFICIAL = {
    "source": "gta", "target": "cityscapes",  # the GTA5 -> Cityscapes row (train.py:46-53 swaps the loader)
    "backbone": "vgg16",  # torchfcn/models/fcn8s_LSD.py FCN8s_LSD: VGG-16 FCN-8s
    "iters": 100000,  # train.py:15 --num_iters
    "batch_size": 1,  # train.py:14 --batchSize; the target loader has batch 1 (train.py:51-53)
    "crop_size": [320, 640],  # train.py:43 image_size [640, 320] (W, H), random crops (segmentation_datasets.py)
    "lr": 1e-5,  # train.py:17
    "seed": 1337,  # train.py:37-39
    "weight_decay": 0.0,  # train.py:97-104: Adam without weight decay (0.0005 is the SGD option's)
    "bias_lr_mult": 2.0,  # train.py:101
    "poly_power": 0.0,  # constant between the steps (trainer_LSD.py:354-359)
    "lr_step_epochs": 8,  # trainer_LSD.py:358-359 with utils.py:70-80 (x0.1)
    "lr_gan": 1e-4,  # train.py:109-110 (the paper says 2e-4; header)
    "beta1_gan": 0.7,  # train.py:109-110
    "gan_width": 64,  # fcn8s_LSD.py:206 ngf, :284 ndf
    "adv_weight": 0.1, "c_weight": 0.1, "l1_weight": 1.0,  # train.py:25-27
    "g_adv_weight": 0.1,  # trainer_LSD.py:273 (hard-coded)
    "source_size": None,  # the official loader's: GTA5 1280 wide, aspect kept (segmentation_datasets.py:327-334)
    "target_size": [1024, 2048],  # Cityscapes native (segmentation_datasets.py:420-427)
    "eval_size": [320, 640],  # eval_cityscapes.py:90 image_size [640, 320]
    "eval_upsample": "nearest",  # eval_cityscapes.py:134-137 argmax, then NEAREST to 2048x1024
    "source_val_holdout": True,  # data/filelist/GTA5_imagelist_train.txt (23,937), SYNTHIA_..._train.txt (9,300)
    "synthia_classes": 19,  # train.py:62 FCN8s_LSD(n_class=19) with the SYNTHIA loader
    "num_workers": 4,  # train.py:44
}
DELIBERATE = {  # header, "Deviations"
    "init": "imagenet",  # torchvision VGG-16; official: Caffe VGG-16 (train.py:76-77)
    "normalization": "auto",  # ImageNet mean/std for it; official: Caffe BGR means
    "amp": True,  # bf16 autocast on CUDA; official: fp32
}
RUN_CONTROL = {"data_root", "preset", "device", "eval_every", "checkpoint_every", "out", "resume", "eval_only",
               "weights", "dry_run", "log_every", "torch_deterministic", "eval_limit", "num_predictions",
               "poly_horizon"}  # poly_horizon: unused at poly power 0


def test_paper_preset_is_the_official_recipe():
    args = parse_args(lsd.Args, lsd.PRESETS, ["--preset", "paper"])
    names = {f.name for f in dataclasses.fields(lsd.Args) if not f.metadata.get("runtime")}
    assert names == OFFICIAL.keys() | DELIBERATE.keys() | RUN_CONTROL, "classify every new field above"
    for name, value in {**OFFICIAL, **DELIBERATE}.items():
        assert getattr(args, name) == value, name
    # what the fields resolve to: GTA5 frames at 1280x703, then a 640x320 crop; Cityscapes native
    gta = lsd.train_transform("gta", args.source_size, None)(np.zeros((1052, 1914, 3), np.uint8), None,
                                                              np.random.default_rng(0))[0]
    assert gta.shape == (703, 1280, 3)  # int(1280 / (1914 / 1052)), segmentation_datasets.py:327-329
    crop = lsd.train_transform("cityscapes", args.target_size, args.crop_size)(
        np.zeros((1024, 2048, 3), np.uint8), None, np.random.default_rng(0))[0]
    assert crop.shape == (320, 640, 3)
    # F's lr steps every 8 epochs of the 2,975 Cityscapes frames at batch 1: 23,800 iterations
    assert args.lr_step_epochs * lsd.epoch_iterations(23937, 2975, args.batch_size) == 23800
    assert args.lr_step_epochs * lsd.epoch_iterations(9300, 2975, args.batch_size) == 23800


def test_shared_blocks_identical_to_source_only():
    so = importlib.import_module("source_only")
    for name in ("seg_loss", "poly_lr", "set_lr"):
        assert inspect.getsource(getattr(so, name)) == inspect.getsource(getattr(lsd, name)), name


# ------------------------------------------------------------------------------------- official data and evaluation
def test_official_source_lists():
    gta = [i for i in range(1, 24967) if lsd.in_official_train_list("gta", i)]
    assert len(gta) == 23937 and gta[0] == 1 and gta[-1] == 23999  # GTA5_imagelist_train.txt
    assert {15188, 17705, *range(20801, 20861)}.isdisjoint(gta) and {15187, 20800, 20861} <= set(gta)
    synthia = [i for i in range(9400) if lsd.in_official_train_list("synthia", i)]
    assert synthia == list(range(9300))  # SYNTHIA_imagelist_train.txt
    names = [f"/d/gta/images/{i:05d}.png" for i in range(1, 24967)]
    split = DomainSplit("gta", "train", CITYSCAPES_CLASSES, names, [n.replace("images", "labels") for n in names])
    kept = lsd.official_source_list(split, holdout=True)
    assert len(kept) == 23937 and kept.labels[0] == "/d/gta/labels/00001.png" and kept.item_name(23936) == "23999"
    assert len(lsd.official_source_list(split, holdout=False)) == 24966
    synthia_split = DomainSplit("synthia", "train", CITYSCAPES_CLASSES, [f"{i:07d}.png" for i in range(9400)],
                                [f"{i:07d}.png" for i in range(9400)])
    assert len(lsd.official_source_list(synthia_split, holdout=True)) == 9300
    toy = DomainSplit("toy-synth", "train", ["a"], ["x"], ["x"])
    assert lsd.official_source_list(toy, holdout=True) is toy
    with pytest.raises(UserError, match="none of the 2 gta frames"):
        lsd.official_source_list(dataclasses.replace(split, images=names[-2:], labels=names[-2:]), holdout=True)


def test_epoch_iterations():
    # trainer_LSD.py: an epoch zips both loaders, so it is the shorter one, partial last batch included
    assert lsd.epoch_iterations(23937, 2975, 1) == lsd.epoch_iterations(9300, 2975, 1) == 2975
    assert lsd.epoch_iterations(23937, 2975, 4) == 744 and lsd.epoch_iterations(3, 10, 2) == 2


def position_image(h, w):
    """An image whose red and green channels hold each pixel's row and column."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0], image[..., 1] = np.arange(h)[:, None], np.arange(w)[None, :]
    return image


def test_loader_crops_keep_the_official_margins():
    corners = {}
    for domain in ("cityscapes", "synthia", "toy-real"):
        transform = lsd.train_transform(domain, None, [20, 40])
        draws = [transform(position_image(100, 200), None, np.random.default_rng(s))[0] for s in range(2000)]
        assert all(d.shape == (20, 40, 3) for d in draws)
        corners[domain] = (max(int(d[0, 0, 0]) for d in draws), max(int(d[0, 0, 1]) for d in draws))
    # np.random.randint(0, H - crop - 50) excludes its bound: corners 0 .. H - crop - 51 (segmentation_datasets.py:424)
    assert corners["cityscapes"] == (100 - 20 - 51, 200 - 40 - 51)
    assert corners["synthia"] == (100 - 20 - 1, 200 - 40 - 1)  # randint(0, H - crop): 0 .. H - crop - 1 (:258)
    assert corners["toy-real"] == (100 - 20, 200 - 40)  # no official loader: every position
    # a frame barely larger than the crop keeps at least one position
    assert lsd.train_transform("cityscapes", None, [20, 40])(position_image(21, 41), None,
                                                            np.random.default_rng(0))[0].shape == (20, 40, 3)


def test_gta_loader_redraws_unlabelled_crops_and_resizes_with_lanczos():
    label = np.full((100, 200), 255, np.uint8)
    label[:30, :60] = 3  # only the top-left corner is labelled
    image = position_image(100, 200)
    gta = lsd.train_transform("gta", [100, 200], [20, 40])  # explicit size = the frame's: no resize
    synthia = lsd.train_transform("synthia", None, [20, 40])
    assert all((gta(image, label, np.random.default_rng(s))[1] != 255).any() for s in range(200))
    assert not all((synthia(image, label, np.random.default_rng(s))[1] != 255).any() for s in range(200))
    # images Lanczos (PIL), labels nearest
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (40, 80), dtype=np.uint8)
    small_image, small_label = lsd.train_transform("toy-synth", [20, 30], None)(image, label, rng)
    assert np.array_equal(small_image, np.asarray(Image.fromarray(image).resize((30, 20), Image.LANCZOS)))
    assert np.array_equal(small_label, np.asarray(Image.fromarray(label).resize((30, 20), Image.NEAREST)))


def test_predict_nearest_is_the_official_evaluation():
    torch.manual_seed(0)
    score = torch.nn.Conv2d(3, 5, 3, padding=1)
    model = lambda x: (None, score(x))  # noqa: E731  (F's interface: (embedding, scores))
    to_input = lambda x: x.float() / 255  # noqa: E731
    images = torch.randint(0, 256, (2, 3, 40, 80), dtype=torch.uint8)
    with torch.no_grad():
        out = lsd.predict_nearest(model, to_input, images, (16, 32))
        expected, bilinear = [], []
        for im in images:  # eval_cityscapes.py: Lanczos to 640x320, argmax, PIL NEAREST to the label size
            small = torch.from_numpy(np.array(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((32, 16),
                                                                                                  Image.LANCZOS)))
            scores = score(to_input(small.permute(2, 0, 1)[None]))
            pred = Image.fromarray(scores.argmax(1)[0].byte().numpy()).resize((80, 40), Image.NEAREST)
            expected.append(torch.from_numpy(np.array(pred)).long())
            bilinear.append(torch.nn.functional.interpolate(scores, size=(40, 80), mode="bilinear",
                                                            align_corners=True).argmax(1)[0])
    expected = torch.stack(expected)
    assert out.shape == (2, 5, 40, 80) and torch.equal(out.sum(1), torch.ones(2, 40, 80))
    assert torch.equal(out.argmax(1), expected)
    # common/metrics.py's evaluate resizes the scores bilinearly to the label size: a no-op on this map
    resized = torch.nn.functional.interpolate(out, size=(40, 80), mode="bilinear", align_corners=True)
    assert torch.equal(resized.argmax(1), expected)
    assert not torch.equal(torch.stack(bilinear), expected)  # the protocol changes the prediction


def test_inert_flags_are_refused():
    def check(*argv):
        lsd.refuse_inert_flags(parse_args(lsd.Args, lsd.PRESETS, list(argv)))

    check("--preset", "quick", "--poly-horizon", "5")  # quick has poly power 0.9: acts
    check("--adv-weight", "0", "--c-weight", "0")
    check("--source", "synthia", "--no-source-val-holdout")
    with pytest.raises(UserError, match="--poly-horizon has no effect here: --poly-power 0"):
        check("--poly-horizon", "5")
    with pytest.raises(UserError, match="--l1-weight has no effect here: --adv-weight 0 --c-weight 0 skip G and D"):
        check("--adv-weight", "0", "--c-weight", "0", "--l1-weight", "2")
    with pytest.raises(UserError, match="--source-val-holdout has no effect here: only GTA5 and SYNTHIA"):
        check("--preset", "quick", "--no-source-val-holdout")
    with pytest.raises(UserError, match="--lr-step-epochs must be 0"):
        check("--lr-step-epochs", "-1")


# ------------------------------------------------------------------------------------------------------ networks
def test_fcn8s_shapes_fixed_deconvolutions_and_param_groups():
    model = lsd.FCN8s("vgg16_small", num_classes=5)
    (fc7, pool4, pool3), scores = model(torch.zeros(2, 3, 96, 192))
    assert scores.shape == (2, 5, 96, 192)  # the Caffe crops give the input size back
    assert (fc7.shape[1], pool4.shape[1], pool3.shape[1]) == model.embedding_channels == (512, 64, 32)
    assert model.features[0].padding == (100, 100) and model.fc6.kernel_size == (7, 7) and model.fc6.padding == (0, 0)
    assert all(score.weight.abs().sum() == 0 for score in (model.score_fr, model.score_pool4, model.score_pool3))
    deconvs = [m.weight for m in (model.upscore2, model.upscore_pool4, model.upscore8)]
    assert not any(w.requires_grad for w in deconvs)
    groups = model.param_groups(1e-5, 2.0)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not grouped & {id(w) for w in deconvs}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups[1]["lr_mult"] == 2.0 and all(p.dim() == 1 for p in groups[1]["params"])
    with pytest.raises(UserError, match="unknown backbone 'resnet18'"):
        lsd.FCN8s("resnet18")


def test_bilinear_kernel_values():
    k = lsd.bilinear_kernel(2, 4)
    filt = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(k[0, 0], filt[:, None] * filt[None, :]) and k[0, 1].abs().sum() == 0


def test_generator_and_discriminator_shapes():
    model = lsd.FCN8s("vgg16_small", num_classes=5)
    gen, disc = lsd.Generator(model.embedding_channels, 8), lsd.Discriminator(5, 8)
    for size in ((96, 192), (32, 64), (40, 72)):  # the last one needs G's crop/pad
        embedding, _ = model(torch.rand(1, 3, *size))
        fake = gen(embedding, size)
        assert fake.shape == (1, 3, *size) and 0 <= fake.min() and fake.max() <= 1
        out_s, out_c = disc(fake)
        assert out_s.shape == (1, 4, *lsd.Discriminator.output_size(size)) and out_c.shape[1] == 5
    assert lsd.Discriminator.output_size((320, 640)) == (40, 80)


# -------------------------------------------------------------------------------------------------------- losses
def test_map_ce_cell_ratio_l1_and_labels_for_d():
    assert math.isclose(float(lsd.map_ce(torch.zeros(2, 4, 3, 5), lsd.TGT_REAL)), math.log(4), rel_tol=1e-6)
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # 1 image, 2 classes, 1x2 cells
    # cell 0 is class 0 (CE log(1+e^-2)); cell 1 is ignored but still counts in the denominator (official sum)
    value = lsd.map_ce(logits, torch.tensor([[[0, 255]]]))
    assert math.isclose(float(value), math.log(1 + math.exp(-2)) / 2, rel_tol=1e-6)
    assert lsd.cell_ratio(torch.zeros(1, 4, 12, 24), torch.zeros(1, 3, 96, 192)) == 1 / 64
    assert math.isclose(float(lsd.l1(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.0]))), 0.75)
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]])
    assert lsd.labels_for_d(labels, (2, 2)).tolist() == [[[0, 1], [2, 255]]]


class TagDisc(torch.nn.Module):
    """A stand-in D: the image's constant value v encodes a kind k = round(10 v); out_s is 10 on class k, 0
    elsewhere; out_c is all zeros (uniform over C classes). Maps are 2x2 cells."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, image):
        kind = torch.round(image[:, 0, 0, 0] * 10).long()
        out_s = 10.0 * torch.nn.functional.one_hot(kind, 4).float()[:, :, None, None].expand(-1, -1, 2, 2)
        return out_s, torch.zeros(image.shape[0], self.num_classes, 2, 2)


def test_d_g_and_f_objectives_on_hand_made_maps():
    kind = {k: torch.full((1, 3, 8, 8), k / 10) for k in range(4)}  # 0 src-real, 1 src-fake, 2 tgt-real, 3 tgt-fake
    labels = torch.tensor([[[0, 1], [255, 3]]])
    right = math.log(1 + 3 * math.exp(-10))  # CE when D's confident class is the asked one
    wrong = 10 + right  # CE when it is another one
    ratio = 4 / 64  # 2x2 cells per 8x8 image
    disc = TagDisc(5)
    loss_d, parts = lsd.d_objective(disc, kind[0], kind[1], labels, kind[2], kind[3])
    for key in ("d_src_real", "d_src_fake", "d_tgt_real", "d_tgt_fake"):
        assert math.isclose(float(parts[key]), right, rel_tol=1e-5, abs_tol=1e-6), key
    assert math.isclose(float(parts["d_cls"]), 3 * math.log(5) / 4, rel_tol=1e-6)  # one of 4 cells ignored
    assert math.isclose(float(loss_d), ratio * (4 * right + 3 * math.log(5) / 4), rel_tol=1e-5, abs_tol=1e-6)
    # G's fakes are recognised as fakes: its "look real in your own domain" terms are wrong twice
    loss_g, parts = lsd.g_objective(disc, kind[0], kind[1], labels, kind[2], kind[3], g_adv_weight=0.1, l1_weight=1.0)
    assert math.isclose(float(parts["g_adv"]), 2 * wrong, rel_tol=1e-6)
    assert math.isclose(float(parts["recon"]), 0.2, rel_tol=1e-5, abs_tol=1e-6)  # |0.1 - 0| + |0.3 - 0.2|
    expected = ratio * (3 * math.log(5) / 4 + 0.1 * 2 * wrong) + 1.0 / 64 * 0.2
    assert math.isclose(float(loss_g), expected, rel_tol=1e-5, abs_tol=1e-6)
    # F: source fakes must look target-real, target fakes source-real (cross-domain)
    loss_f, parts = lsd.f_adversarial(disc, kind[2], kind[0], labels, adv_weight=0.1, c_weight=0.1)
    assert math.isclose(float(parts["adv_main"]), 2 * right, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(float(loss_f), ratio * (0.1 * 2 * right + 0.1 * 3 * math.log(5) / 4), rel_tol=1e-5, abs_tol=1e-6)
    _, parts = lsd.f_adversarial(disc, kind[0], kind[2], labels, adv_weight=0.1, c_weight=0.1)
    assert math.isclose(float(parts["adv_main"]), 2 * wrong, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------ update rules
def test_each_update_changes_only_its_network():
    torch.manual_seed(0)
    args = lsd.Args(**{**lsd.PRESETS["quick"], "gan_width": 4})
    model = lsd.FCN8s("vgg16_small", 5)
    gen, disc = lsd.Generator(model.embedding_channels, 4), lsd.Discriminator(5, 4)
    nets = {"model": model, "gen": gen, "disc": disc}
    optimizers = {"model": torch.optim.Adam(model.param_groups(1e-3, 2.0), lr=1e-3),
                  "gen": torch.optim.Adam(gen.parameters(), lr=1e-3), "disc": torch.optim.Adam(disc.parameters(), lr=1e-3)}
    trainable = {"model": [p for p in model.parameters() if p.requires_grad], "gen": list(gen.parameters()),
                 "disc": list(disc.parameters())}
    rt = types.SimpleNamespace(device=torch.device("cpu"), world=1, scaler=torch.amp.GradScaler("cpu", enabled=False),
                               autocast=lambda: torch.autocast("cpu", enabled=False))
    snapshots, order = [], []

    def snapshot():
        return {name: [p.detach().clone() for p in net.state_dict().values()] for name, net in nets.items()}

    for name, opt in optimizers.items():
        def step(*a, _name=name, _step=opt.step, **k):
            before = snapshot()
            result = _step(*a, **k)
            snapshots.append((_name, before, snapshot()))
            order.append(_name)
            return result
        opt.step = step
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    labels = torch.randint(0, 5, (2, 32, 64))
    targets = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    losses = lsd.train_step(nets, optimizers, trainable, images, labels, targets, args, rt, lambda x: x.float() / 255)
    assert order == ["disc", "gen", "model"]  # D, then G, then F and C
    for stepped, before, after in snapshots:
        for name in nets:
            same = all(torch.equal(a, b) for a, b in zip(before[name], after[name]))
            assert same == (name != stepped), f"{stepped}'s step {'left' if same else 'changed'} {name}"
    assert {"seg_src", "adv_main", "adv_cls", "d_main", "g_adv", "g_cls", "recon"} == set(losses)
    fixed = [model.upscore2.weight, model.upscore8.weight]
    assert all(torch.equal(w, lsd.bilinear_kernel(5, w.shape[-1])) for w in fixed)  # never trained


def test_zero_adaptation_weights_train_f_on_source_only():
    torch.manual_seed(0)
    args = lsd.Args(**{**lsd.PRESETS["quick"], "adv_weight": 0.0, "c_weight": 0.0})
    model = lsd.FCN8s("vgg16_small", 5)
    gen, disc = lsd.Generator(model.embedding_channels, 4), lsd.Discriminator(5, 4)
    nets = {"model": model, "gen": gen, "disc": disc}
    optimizers = {name: torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
                  for name, net in nets.items()}
    trainable = {name: [p for p in net.parameters() if p.requires_grad] for name, net in nets.items()}
    before = {name: [p.detach().clone() for p in params] for name, params in trainable.items()}
    rt = types.SimpleNamespace(device=torch.device("cpu"), world=1, scaler=torch.amp.GradScaler("cpu", enabled=False),
                               autocast=lambda: torch.autocast("cpu", enabled=False))
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    losses = lsd.train_step(nets, optimizers, trainable, images, torch.randint(0, 5, (2, 32, 64)), images, args, rt,
                            lambda x: x.float() / 255)
    assert set(losses) == {"seg_src"}
    for name, params in trainable.items():
        same = all(torch.equal(a, b) for a, b in zip(before[name], params))
        assert same == (name != "model"), name


def test_adversarial_terms_reach_f_through_frozen_g_and_d():
    torch.manual_seed(0)
    model = lsd.FCN8s("vgg16_small", 5)
    gen, disc = lsd.Generator(model.embedding_channels, 4), lsd.Discriminator(5, 4)
    trainable = {"model": [p for p in model.parameters() if p.requires_grad], "gen": list(gen.parameters()),
                 "disc": list(disc.parameters())}
    lsd.train_only(trainable, "model")
    (emb_s, _), (emb_t, _) = model(torch.rand(1, 3, 32, 64)), model(torch.rand(1, 3, 32, 64))
    loss, _ = lsd.f_adversarial(disc, gen(emb_s, (32, 64)), gen(emb_t, (32, 64)), torch.zeros(1, 4, 8, dtype=torch.long),
                                0.1, 0.1)
    loss.backward()
    assert model.fc7.weight.grad.abs().sum() > 0 and model.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainable["gen"] + trainable["disc"])


# ---------------------------------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lsd") / "straight")
    run("--iters", 2, "--out", out)
    return out


def test_smoke_run_folder(straight):
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(straight, name)), name
    assert os.listdir(os.path.join(straight, "predictions"))
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["script"] == "lsdseg" and set(config["params"]) == {"model", "gen", "disc"}
    rows = [r for r in metrics(straight) if "seg_src" in r]
    assert {"seg_src", "adv_main", "adv_cls", "d_main", "g_adv", "g_cls", "recon", "lr"} <= set(rows[-1])
    results = json.load(open(os.path.join(straight, "results.json")))
    assert 0 <= results["miou"] <= 100 and results["iters"] == 2
    ckpt = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    assert {"model", "gen", "disc", "optimizer", "optimizer_g", "optimizer_d", "scaler", "rng"} <= set(ckpt)


def test_grad_ratio_probe(straight):
    """benchmarks/lsdseg_grad_ratio.py: finite norms, and the adaptation gradient is linear in the weights."""
    result = run_script("benchmarks/lsdseg_grad_ratio.py", os.path.join(straight, "checkpoints", "last.pt"),
                        "--frames", "2", check=True, env={"OMP_NUM_THREADS": "1"})
    seg = float(result.stdout.split("segmentation CE gradient norm: ")[1].split()[0])
    norms = [float(line.split(": ")[1].split()[0]) for line in result.stdout.splitlines()
             if line.startswith("adaptation gradient norm")]
    assert seg > 0 and math.isfinite(seg) and len(norms) == 3 and norms[0] > 0
    assert norms[1] == pytest.approx(10 * norms[0], rel=2e-3) and norms[2] == pytest.approx(100 * norms[0], rel=2e-3)
    g_d = float(result.stdout.split("G's D-term gradient norm (class head + 0.1 real/fake): ")[1].split()[0])
    g_l1, share = result.stdout.split("G's L1-term gradient norm (l1_weight 1.0): ")[1].split()[:2]
    assert g_d > 0 and float(g_l1) > 0 and 0 < float(share.strip("(")) < 1


def test_resume_is_exact(straight, tmp_path):
    out = str(tmp_path / "resumed")
    run("--iters", 1, "--poly-horizon", 2, "--out", out)  # interrupted at 1 of a 2-iteration schedule
    run("--iters", 2, "--out", out, "--resume", "auto")
    a = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert b["iter"] == 2
    for key in ("model", "gen", "disc"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for key in ("optimizer", "optimizer_g", "optimizer_d"):
        assert torch.equal(a[key]["state"][0]["exp_avg"], b[key]["state"][0]["exp_avg"]), key


def test_eval_only_and_foreign_checkpoint(straight, tmp_path):
    out = str(tmp_path / "eval")  # the official protocol (the quick preset evaluates bilinearly)
    run("--eval-only", "--weights", os.path.join(straight, "checkpoints", "last.pt"), "--eval-upsample", "nearest",
        "--out", out)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["iters"] == 2 and 0 <= results["miou"] <= 100
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"script": "source_only", "num_classes": 8}, foreign)
    with pytest.raises(UserError, match="written by source_only, not lsdseg"):  # what --resume/--eval-only call
        load_checkpoint(foreign, lsd.SCRIPT, 8)


def test_dry_run(tmp_path):
    out = str(tmp_path / "dry")
    run("--dry-run", "--out", out)
    config = json.load(open(os.path.join(out, "config.json")))
    gen = lsd.Generator(lsd.FCN8s("vgg16_small", 8).embedding_channels, 8)
    assert config["params"]["gen"]["trainable"] == sum(p.numel() for p in gen.parameters())
    assert config["params"]["model"]["trainable"] < config["params"]["model"]["total"]  # fixed deconvolutions
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def make_folder_dataset(root, n, h=40, w=80):
    """A folder dataset (README layout) of n random train frames and one val frame, 3 classes."""
    rng = np.random.default_rng(0)
    os.makedirs(root)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("a\nb\nc\n")
    for split, count in (("train", n), ("val", 1)):
        for kind in ("images", "labels"):
            os.makedirs(os.path.join(root, kind, split))
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(root, "images", split, f"{i}.png"))
            Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(
                os.path.join(root, "labels", split, f"{i}.png"))
    return root


def test_lr_steps_every_epochs_of_the_shorter_loader(tmp_path):
    source = make_folder_dataset(str(tmp_path / "source"), 5)
    target = make_folder_dataset(str(tmp_path / "target"), 3)
    out = str(tmp_path / "steps")  # batch 2: an epoch is min(ceil(5 / 2), ceil(3 / 2)) = 2 iterations
    run("--source", source, "--target", target, "--iters", 5, "--batch-size", 2, "--lr-step-epochs", 1,
        "--poly-power", 0, "--lr", 1e-3, "--log-every", 1, "--crop-size", 24, 48, "--out", out)
    lrs = [r["lr"] for r in metrics(out) if "seg_src" in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "lsdseg.py"]
    run("--iters", 2, "--batch-size", 2, "--out", out, cmd=cmd)
    assert json.load(open(os.path.join(out, "config.json")))["args"]["world_size"] == 2
    assert os.path.isfile(os.path.join(out, "results.json"))
