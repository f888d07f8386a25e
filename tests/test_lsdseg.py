"""lsdseg.py: the paper preset against the official recipe, the official loaders (resize, crop margins,
source lists, epoch length) and evaluation protocol, the FCN-8s, G and D shapes, each loss on hand-made
tensors, the training step against a hand-written one in the official update order, the weights files (LSD-seg's
VGG-16 init, official checkpoints, ours); then the script end to end (run folder, resume, eval-only of an official
checkpoint, dry run, torchrun equivalence and sharded evaluation, the learning-rate step)."""
import copy
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import released
import released_lsdseg
from common.checkpoint import load_matching
from common.cli import UserError, field_docs, parse_args
from common.data import CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS, DomainSplit
from common.runtime import Runtime
from conftest import ROOT, run_script

lsd = importlib.import_module("lsdseg")
SMALL = ["--preset", "quick", "--source-size", "32", "64", "--target-size", "32", "64", "--eval-limit", "2",
         "--num-workers", "0", "--log-every", "2", "--checkpoint-every", "2"]


def run(*extra, cmd=None):
    """lsdseg.py (or `cmd`, e.g. torchrun) with the tiny quick settings plus `extra`; must succeed."""
    argv = [*(cmd or ["lsdseg.py"]), *SMALL, *map(str, extra)]
    if cmd is None:
        return run_script(*argv, check=True, env={"OMP_NUM_THREADS": "1"})
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
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
               "weights", "save_predictions", "dry_run", "log_every", "torch_deterministic", "eval_limit",
               "num_predictions", "poly_horizon"}  # poly_horizon: unused at poly power 0


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
def hand_adam(state, named, grads, lr, beta1, bias_lr_mult=1.0):
    """torch.optim.Adam written out (beta2 0.999, eps 1e-8, no weight decay), biases at bias_lr_mult x lr."""
    with torch.no_grad():
        for (name, p), g in zip(named, grads):
            m, v, t = state.get(id(p), (torch.zeros_like(p), torch.zeros_like(p), 0))
            m, v, t = beta1 * m + (1 - beta1) * g, 0.999 * v + 0.001 * g * g, t + 1
            state[id(p)] = m, v, t
            lr_p = lr * (bias_lr_mult if name.endswith("bias") else 1.0)
            p -= lr_p * (m / (1 - beta1 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)


def ce_sum(logits, target):
    """The official cross_entropy2d(size_average=False): -log softmax at the target, summed over cells; 255: no term."""
    if isinstance(target, int):
        target = torch.full((logits.shape[0], *logits.shape[2:]), target)
    valid = target != 255
    picked = logits.log_softmax(1).gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    return -(picked * valid).sum()


def nearest_cells(labels, size):
    """PIL NEAREST downsampling of a label map (the official transform_label_forD): cell i takes row floor((i + 0.5)
    * H / h)."""
    rows = ((torch.arange(size[0]) + 0.5) * labels.shape[-2] / size[0]).floor().long()
    cols = ((torch.arange(size[1]) + 0.5) * labels.shape[-1] / size[1]).floor().long()
    return labels[:, rows][:, :, cols]


def reference_iteration(nets, adam_state, images, labels, targets, to_input, args):
    """One LSD-seg iteration in the official order (trainer_LSD.py:232-286), written out independently of lsdseg's
    loss helpers: 1. D on the real images and on G's fakes (no gradient into G or F); 2. G through the stepped D;
    3. F and C through the stepped G and D. Every CE is the official sum over D's cells (or pixels), / batch
    (trainer_LSD.py) and / input pixels (lsdseg header, "Loss reduction"); the L1 terms are means / input pixels;
    the segmentation CE a mean over the valid pixels (the shared seg_loss). Returns the gradients of each step."""
    model, gen, disc = nets["model"], nets["gen"], nets["disc"]
    f_named = [(n, p) for n, p in model.named_parameters() if not n.startswith("upscore")]  # deconvolutions fixed
    g_named, d_named = list(gen.named_parameters()), list(disc.named_parameters())
    (batch, _, h, w), size = images.shape, images.shape[-2:]
    per_pixel = 1 / (batch * h * w)
    real_s, real_t = images / 255, targets / 255
    emb_s, scores_s = model(to_input(images))
    emb_t, _ = model(to_input(targets))
    steps = []
    # 1. D
    with torch.no_grad():
        fake_s, fake_t = gen(emb_s, size), gen(emb_t, size)
    s_real_s, c_real_s = disc(real_s)
    labels_d = nearest_cells(labels, s_real_s.shape[-2:])
    loss_d = per_pixel * (ce_sum(s_real_s, 0) + ce_sum(disc(fake_s)[0], 1) + ce_sum(c_real_s, labels_d)
                          + ce_sum(disc(real_t)[0], 2) + ce_sum(disc(fake_t)[0], 3))
    steps.append(("disc", torch.autograd.grad(loss_d, [p for _, p in d_named])))
    hand_adam(adam_state, d_named, steps[-1][1], args.lr_gan, args.beta1_gan)
    # 2. G: its fakes through the stepped D; source fakes -> source-real, target fakes -> target-real, classes kept
    fake_s, fake_t = gen([e.detach() for e in emb_s], size), gen([e.detach() for e in emb_t], size)
    (s_fake_s, c_fake_s), (s_fake_t, _) = disc(fake_s), disc(fake_t)
    loss_g = per_pixel * (ce_sum(c_fake_s, labels_d) + 0.1 * (ce_sum(s_fake_s, 0) + ce_sum(s_fake_t, 2))) \
        + args.l1_weight / (h * w) * ((fake_s - real_s).abs().mean() + (fake_t - real_t).abs().mean())
    steps.append(("gen", torch.autograd.grad(loss_g, [p for _, p in g_named])))
    hand_adam(adam_state, g_named, steps[-1][1], args.lr_gan, args.beta1_gan)
    # 3. F and C: segmentation + source fakes -> target-real, target fakes -> source-real, classes kept
    fake_s, fake_t = gen(emb_s, size), gen(emb_t, size)
    (s_fake_s, c_fake_s), (s_fake_t, _) = disc(fake_s), disc(fake_t)
    loss_f = ce_sum(scores_s, labels) / (labels != 255).sum() + per_pixel * (
        args.adv_weight * (ce_sum(s_fake_s, 2) + ce_sum(s_fake_t, 0)) + args.c_weight * ce_sum(c_fake_s, labels_d))
    steps.append(("model", torch.autograd.grad(loss_f, [p for _, p in f_named])))
    hand_adam(adam_state, f_named, steps[-1][1], args.lr, 0.9, args.bias_lr_mult)
    return steps


def test_train_step_matches_an_independent_reference():
    """Two real iterations of train_step with make_optimizers' Adams against reference_iteration. At each optimiser
    step the gradients all three networks hold are compared: the stepping network's with the reference's, every other
    network's with what its own last step left (so no backward reached another network: a missing detach or freeze
    shows here even where it would not move a weight). Then every weight after the two iterations.
    float64 and eval mode: dropout masks depend on the order of random draws, not on the update rule (eval mode
    turns dropout off and changes nothing else: no BN, InstanceNorm keeps no statistics); in float64 the rounding
    noise of D's pre-InstanceNorm biases (gradient 0 in exact arithmetic) stays far below Adam's eps."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        args = lsd.Args(**{**lsd.PRESETS["quick"], "gan_width": 4, "lr": 1e-3, "lr_gan": 2e-3, "adv_weight": 0.3,
                           "c_weight": 0.7})
        model = lsd.FCN8s("vgg16_small", 4)
        with torch.no_grad():  # the score layers start at 0 (official); random ones let C's path carry gradient too
            for score in (model.score_fr, model.score_pool4, model.score_pool3):
                score.weight.normal_(0, 0.05)
        gen, disc = lsd.Generator(model.embedding_channels, 4), lsd.Discriminator(4, 4)
        nets = {"model": model.eval(), "gen": gen.eval(), "disc": disc.eval()}
        reference, initial = copy.deepcopy(nets), copy.deepcopy(nets)
        optimizers, trainable = lsd.make_optimizers(model, gen, disc, args)
        held = []  # (network stepped, the gradients every network holds at that moment)
        for name, optimizer in optimizers.items():
            def step(*a, _name=name, _step=optimizer.step, **k):
                held.append((_name, {net: [None if p.grad is None else p.grad.clone() for p in params]
                                     for net, params in trainable.items()}))
                return _step(*a, **k)
            optimizer.step = step
        images, targets = (torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8) for _ in range(2))
        labels = torch.randint(0, 4, (2, 32, 64))
        labels[0, :6] = 255

        def to_input(x):
            return x / 255 - 0.5

        rt = Runtime("cpu", amp=False)
        adam_state, expected = {}, []
        for _ in range(2):
            lsd.train_step(nets, optimizers, trainable, images, labels, targets, args, rt, to_input)
            expected += reference_iteration(reference, adam_state, images, labels, targets, to_input, args)
    finally:
        torch.set_default_dtype(torch.float32)

    def close(grads, want):
        return all(g is not None and float((g - w).norm()) <= 1e-6 * float(w.norm()) + 1e-12 for g, w in zip(grads, want))

    assert [name for name, _ in held] == [name for name, _ in expected] == ["disc", "gen", "model"] * 2
    last = {}  # the reference gradients of each network's latest step
    for (name, holding), (_, want) in zip(held, expected):
        last[name] = want
        for net, grads in holding.items():
            if net not in last:
                assert all(g is None for g in grads), f"{name}'s step: {net} got a gradient before its own step"
            else:
                assert close(grads, last[net]), f"{name}'s step: {net}'s gradients differ from " + (
                    "the reference" if net == name else "those of its own last step")
    for name, net in nets.items():  # the losses are fp32 (as under AMP): Adam's per-element normalisation turns their
        # rounding into update errors of up to ~1e-3 of a step (lr 1e-3 here); a wrong lr, bias multiplier or beta is 1x
        ours, theirs, before = net.state_dict(), reference[name].state_dict(), initial[name].state_dict()
        assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=5e-6) for k in ours), name
        assert not all(torch.equal(ours[k], before[k]) for k in ours), f"{name} did not move"


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


def test_resume_starts_at_the_checkpoint_and_ends_with_the_uninterrupted_weights(straight, tmp_path):
    """A run stopped after iteration 1 (of a 2-iteration schedule) and resumed ends with the straight run's F, G, D
    and Adam states. A silent restart from iteration 0 would too (same seed, same data), so the resumed process must
    also say it starts at iteration 1 and log only iteration 2."""
    out = str(tmp_path / "resumed")
    run("--iters", 1, "--poly-horizon", 2, "--log-every", 1, "--out", out)
    rows_before = len(metrics(out))
    resumed = run("--iters", 2, "--log-every", 1, "--out", out, "--resume", "auto")
    assert "at iteration 1" in resumed.stdout and "recognised lsdseg checkpoint" in resumed.stdout
    assert [r["iter"] for r in metrics(out)[rows_before:] if "seg_src" in r] == [2]
    loaded = json.load(open(os.path.join(out, "config.json")))["loaded"]
    assert loaded["kind"] == "lsdseg checkpoint" and loaded["file"] == os.path.join(out, "checkpoints", "last.pt")
    a = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert b["iter"] == 2
    for key in ("model", "gen", "disc"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for key in ("optimizer", "optimizer_g", "optimizer_d"):
        assert torch.equal(a[key]["state"][0]["exp_avg"], b[key]["state"][0]["exp_avg"]), key


def test_dry_run_records_the_init_file(tmp_path, monkeypatch):
    """In process (a dry run reads no data): parameter counts, and the --init file recognised and recorded."""
    init = tmp_path / "vgg16.pth"
    torch.save(released_lsdseg.torchvision_vgg(small_fcn_state(8)), init)
    out = str(tmp_path / "dry")
    monkeypatch.setattr(sys, "argv", ["lsdseg.py", *SMALL, "--dry-run", "--init", str(init), "--out", out])
    lsd.main()
    config = json.load(open(os.path.join(out, "config.json")))
    gen = lsd.Generator(lsd.FCN8s("vgg16_small", 8).embedding_channels, 8)
    assert config["params"]["gen"]["trainable"] == sum(p.numel() for p in gen.parameters())
    assert config["params"]["model"]["trainable"] < config["params"]["model"]["total"]  # fixed deconvolutions
    assert config["normalization"] == "caffe" and config["loaded"]["file"] == str(init)
    assert config["loaded"]["kind"].startswith("torchvision-layout VGG-16")
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
        "--poly-power", 0, "--lr", 1e-3, "--log-every", 1, "--crop-size", 24, 48, "--adv-weight", 0, "--c-weight", 0,
        "--out", out)  # F's schedule only: G and D skipped
    lrs = [r["lr"] for r in metrics(out) if "seg_src" in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "tests", "collective_guard.py")]
EXACT = """import sys
sys.path.insert(0, {root!r})
import torch
import torch.nn.functional as F
F.dropout = F.dropout2d = lambda x, *args, **kwargs: x  # see test_two_processes_equal_one_process_with_the_whole_batch
torch.set_default_dtype(torch.float64)
import lsdseg
normalize = lsdseg.normalize
lsdseg.normalize = lambda images, mode: normalize(images, mode).double()
from common.cli import guard
guard(lsdseg.main)
"""


def final_state(out):
    return torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 gloo processes x batch 1 (under the collective guard: a host tensor in a collective fails the run) end with
    the F, G and D of 1 process x batch 2; rank 0 alone logs; the run's final evaluation (the official protocol,
    sharded over the 2 ranks) equals --eval-only of its checkpoint in one process.
    Every run goes through a wrapper script that replaces dropout by the identity and computes in float64. Dropout:
    each process draws the masks of its own half-batch from the same seed, so the masks differ from one process's by
    construction. float64: in float32 the batched and unbatched convolutions round differently, and Adam, which
    normalises each element, turns that rounding into steps of up to its lr wherever a gradient is near 0 (C starts at
    0, so F's first gradient is G's tiny adaptation signal; D's pre-InstanceNorm biases have gradient 0): measured up
    to a whole step in float32, 1e-12 in float64. Nothing else depends on the per-process batch: no BN
    (InstanceNorm is per image), every loss is a mean over equal-sized halves, each step's gradients are averaged."""
    wrapper = tmp_path / "exact.py"
    wrapper.write_text(EXACT.format(root=ROOT))
    args = ["--iters", 2, "--batch-size", 2, "--log-every", 1, "--eval-upsample", "nearest"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    run(*args, "--out", single, cmd=[sys.executable, str(wrapper)])
    run(*args, "--out", ddp, cmd=[*TORCHRUN, str(wrapper)])
    a, b = final_state(single), final_state(ddp)
    for key in ("model", "gen", "disc"):
        for name, tensor in a[key].items():
            assert tensor.dtype == torch.float64 and torch.allclose(tensor, b[key][name], rtol=1e-9, atol=1e-11), \
                f"{key}.{name}"
    assert json.load(open(os.path.join(ddp, "config.json")))["args"]["world_size"] == 2
    assert [r["iter"] for r in metrics(ddp) if "seg_src" in r] == [1, 2]  # rank 0 only
    again = str(tmp_path / "again")
    evaluated = run("--eval-only", "--weights", os.path.join(ddp, "checkpoints", "last.pt"), "--eval-upsample",
                    "nearest", "--out", again, cmd=[sys.executable, str(wrapper)])
    assert "recognised lsdseg checkpoint" in evaluated.stdout
    results = json.load(open(os.path.join(again, "results.json")))
    assert results["iters"] == 2 and results["loaded"]["kind"] == "lsdseg checkpoint"
    assert json.load(open(os.path.join(ddp, "results.json")))["per_class_iou"] == results["per_class_iou"]


# ------------------------------------------------------------------------------------------------- weights files
def small_fcn_state(num_classes, seed=0):
    """A vgg16_small FCN-8s state dict with every tensor random (score layers included), so that a swap would show."""
    torch.manual_seed(seed)
    model = lsd.FCN8s("vgg16_small", num_classes)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("wrapped", [True, False])
def test_official_checkpoint_lands_every_tensor_in_the_right_module(wrapped, tmp_path):
    """trainer_LSD.py's checkpoint (model_state_dict, numpy best_mean_iu, an Adam state) or F's bare torchfcn state
    dict: recognised, Caffe input, backbone from the widths, every tensor of F loaded into the module it belongs to."""
    reference = small_fcn_state(19)
    path = tmp_path / "model_best.pth.tar"
    checkpoint = released_lsdseg.lsd_checkpoint(reference)
    torch.save(checkpoint if wrapped else checkpoint["model_state_dict"], path)
    found = lsd.read_fcn_weights(str(path), "--weights")
    assert found["kind"] == ("official LSD-seg checkpoint (FCN8s_LSD)" if wrapped else "official LSD-seg checkpoint")
    assert found["implied"] == {"normalization": "caffe", "backbone": "vgg16_small"}
    assert (found["iter"], found["num_classes"]) == ((9000 if wrapped else 0), 19)
    model = lsd.FCN8s("vgg16_small", 19)
    report = load_matching(model, found["state"], "official", required=lambda k: True, unused_ok=lambda k: False)
    assert report["unused"] == [] and report["missing"] == []
    ours = model.state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)
    # as a starting point: the same tensors through --init
    args = parse_args(lsd.Args, lsd.PRESETS, ["--preset", "quick", "--init", str(path)])
    found = lsd.prepare_fcn_weights(args, None, 8)  # the toy run has 8 classes: C's layers stay as initialised
    assert args.normalization == "caffe" and args.backbone == "vgg16_small"
    model = lsd.FCN8s("vgg16_small", 8)
    assert lsd.load_init(model, str(path), "vgg16_small", found) == "caffe"
    assert torch.equal(model.fc6.weight, reference["fc6.weight"]) and model.score_fr.weight.abs().sum() == 0


def test_vgg16_init_files_normalisation_by_digest_and_typed_flags(tmp_path, monkeypatch, capsys):
    """A torchvision-layout VGG-16 (the layout of LSD-seg's vgg16_from_caffe.pth): features as they are, classifier.0/3
    reshaped into fc6/fc7, classifier.6 dropped, C at 0. Its keys cannot say Caffe or ImageNet input: the published
    files are known by their digests, any other file is taken as Caffe-trained; a typed --normalization wins."""
    reference = small_fcn_state(8)
    path = tmp_path / "vgg16.pth"
    torch.save(released_lsdseg.torchvision_vgg(reference), path)
    found = lsd.read_fcn_weights(str(path))
    assert found["implied"] == {"normalization": "caffe", "backbone": "vgg16_small"}
    assert found["kind"].startswith("torchvision-layout VGG-16 (no published file's digest")
    model = lsd.FCN8s("vgg16_small", 8)
    assert lsd.load_init(model, str(path), "vgg16_small", found) == "caffe"
    own = model.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in reference if k.startswith(("features.", "fc6.", "fc7.")))
    assert all(own[f"{s}.weight"].abs().sum() == 0 for s in ("score_fr", "score_pool4", "score_pool3"))
    md5, sha256 = (hashlib.new(a, path.read_bytes()).hexdigest() for a in ("md5", "sha256"))
    monkeypatch.setattr(lsd, "VGG16_FILES", {("md5", md5): ("LSD-seg's vgg16_from_caffe.pth", "caffe")})
    assert lsd.read_fcn_weights(str(path))["kind"] == "LSD-seg's vgg16_from_caffe.pth"
    monkeypatch.setattr(lsd, "VGG16_FILES", {("sha256", sha256[:8]): ("torchvision's vgg16-397923af.pth", "imagenet")})
    assert lsd.read_fcn_weights(str(path))["implied"]["normalization"] == "imagenet"
    # the unknown-digest default, overridden by a typed flag (with a warning), recorded as applied
    monkeypatch.setattr(lsd, "VGG16_FILES", {})
    args = parse_args(lsd.Args, lsd.PRESETS, ["--init", str(path), "--normalization", "imagenet"])
    found = lsd.prepare_fcn_weights(args, None, 8)
    captured = capsys.readouterr()
    assert "--normalization imagenet contradicts torchvision-layout VGG-16" in captured.err
    assert args.normalization == "imagenet" and found["applied"] == {"backbone": "vgg16_small"}
    assert "recognised torchvision-layout VGG-16" in captured.out and "backbone vgg16_small" in captured.out


def test_wrong_weights_files_are_one_line_errors(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"script": "source_only", "num_classes": 8}, foreign)
    with pytest.raises(UserError, match="written by source_only, not lsdseg"):  # --resume/--eval-only/--init read it
        lsd.read_fcn_weights(str(foreign), "--weights")
    garbage = tmp_path / "garbage.pt"
    torch.save({"a.weight": torch.zeros(2)}, garbage)
    with pytest.raises(UserError, match="unrecognised layout.*accepted are our checkpoints, official LSD-seg"):
        lsd.read_fcn_weights(str(garbage), "--weights")
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2], not_weights)
    with pytest.raises(UserError, match="is not an FCN-8s or VGG-16 weights file"):
        lsd.read_fcn_weights(str(not_weights))
    official = tmp_path / "checkpoint.pth.tar"
    torch.save(released_lsdseg.lsd_checkpoint(small_fcn_state(19)), official)
    args = parse_args(lsd.Args, lsd.PRESETS, ["--preset", "quick", "--eval-only", "--weights", str(official)])
    with pytest.raises(UserError, match="has 19 classes, this run has 8"):
        lsd.prepare_fcn_weights(args, None, 8)
    with pytest.raises(UserError, match="--weights is read by --eval-only"):
        lsd.prepare_fcn_weights(parse_args(lsd.Args, lsd.PRESETS, ["--weights", str(official)]), None, 8)
    typed = parse_args(lsd.Args, lsd.PRESETS, ["--eval-only", "--weights", str(official), "--backbone", "vgg16"])
    found = lsd.prepare_fcn_weights(typed, None, 19)  # a typed backbone the file does not fit: refused when loading
    with pytest.raises(UserError, match="does not fit this network"):
        load_matching(lsd.FCN8s("vgg16", 19), found["state"], "x", required=lambda k: True, unused_ok=lambda k: False)


def test_official_checkpoint_evaluates_through_eval_only(tmp_path):
    """--eval-only --weights <trainer_LSD.py's checkpoint> on a tiny Cityscapes folder with the paper preset's official
    evaluation (argmax at --eval-size, label map nearest-resized): no flags needed (Caffe input and vgg16_small read
    from the file), recorded in config.json and results.json, predictions in the benchmark format."""
    names = released.cityscapes_tree(str(tmp_path / "data"))
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(released_lsdseg.lsd_checkpoint(small_fcn_state(19)), path)
    out, preds = tmp_path / "eval", tmp_path / "preds"
    result = run_script("lsdseg.py", "--eval-only", "--weights", str(path), "--data-root", str(tmp_path / "data"),
                        "--eval-size", "32", "64", "--num-workers", "0", "--out", str(out), "--device", "cpu",
                        "--save-predictions", str(preds), check=True, env={"OMP_NUM_THREADS": "1"})
    assert "recognised official LSD-seg checkpoint (FCN8s_LSD): caffe input, backbone vgg16_small" in result.stdout
    config, results = (json.loads((out / f).read_text()) for f in ("config.json", "results.json"))
    assert config["normalization"] == "caffe" and config["args"]["backbone"] == "vgg16_small"
    assert config["args"]["eval_upsample"] == "nearest" and results["iters"] == 9000
    assert results["loaded"] == {"file": str(path), "kind": "official LSD-seg checkpoint (FCN8s_LSD)",
                                 "implied": {"normalization": "caffe", "backbone": "vgg16_small"}}
    files = sorted(os.listdir(preds))
    assert files == [f"{n}_leftImg8bit.png" for n in names]  # the name cityscapesScripts matches
    saved = np.asarray(Image.open(preds / files[0]))
    assert saved.shape == (64, 128) and set(np.unique(saved)) <= set(CITYSCAPES_LABEL_IDS)
