"""benchmarks/adabn.py: BN re-estimation changes only BN statistics, and they are the frames' batch statistics.
(The tool end to end, on a trained run, is exercised by tests/test_compare.py's comparison run.)"""
import copy
import dataclasses
import os
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import adabn  # noqa: E402
from common.cli import UserError  # noqa: E402


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> dropout -> conv -> BN (frozen affine, as DeepLab-v2), plus a non-BN buffer."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("scale", torch.tensor(2.0))
        self.bn2.weight.requires_grad_(False)
        self.bn2.bias.requires_grad_(False)

    def forward(self, x):
        return self.bn2(self.conv2(self.drop(torch.relu(self.bn1(self.conv1(x)))))) * self.scale


def trained_tiny():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # non-trivial affine and source statistics, as after training
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(400)
    return model


def batch_stats(x):
    """Per-channel mean, unbiased variance (what BN accumulates) and biased variance (what it normalises by)."""
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True), x.var((0, 2, 3), unbiased=False)


def test_statistics_are_the_average_batch_statistics_of_the_frames_seen():
    model = trained_tiny()
    torch.manual_seed(1)
    batches = [torch.randn(2, 3, 5, 6) * 3 + 1, torch.randn(2, 3, 5, 6) - 2, torch.randn(2, 3, 5, 6)]
    expected = {"bn1": [], "bn2": []}
    with torch.no_grad():
        for x in batches:  # the forward by hand: train-mode BN normalises by the batch, no dropout
            h = model.conv1(x)
            mean, unbiased, biased = batch_stats(h)
            expected["bn1"].append((mean, unbiased))
            w, b = model.bn1.weight[None, :, None, None], model.bn1.bias[None, :, None, None]
            h = (h - mean[None, :, None, None]) / torch.sqrt(biased[None, :, None, None] + model.bn1.eps) * w + b
            h = model.conv2(torch.relu(h))
            mean, unbiased, _ = batch_stats(h)
            expected["bn2"].append((mean, unbiased))
    assert adabn.reestimate_bn(model, batches) == 3
    for name in ("bn1", "bn2"):
        bn = getattr(model, name)
        assert torch.allclose(bn.running_mean, torch.stack([m for m, _ in expected[name]]).mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var, torch.stack([v for _, v in expected[name]]).mean(0), atol=1e-5)
        assert bn.num_batches_tracked.item() == 3
        assert bn.momentum == 0.1  # restored
    assert not model.training and not model.bn1.training and not model.drop.training


def test_only_bn_running_statistics_change():
    model = trained_tiny()
    before = copy.deepcopy(model)
    model.train()  # whatever mode it comes in: dropout must not act, BN must use batch statistics
    adabn.reestimate_bn(model, [torch.randn(4, 3, 8, 8) + 5 for _ in range(2)])
    for (name, p), (_, q) in zip(model.named_parameters(), before.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, name
    bn_buffers = {f"{bn}.{stat}" for bn in ("bn1", "bn2") for stat in ("running_mean", "running_var",
                                                                       "num_batches_tracked")}
    new, old = dict(model.named_buffers()), dict(before.named_buffers())
    assert set(new) == set(old) == bn_buffers | {"scale"}
    assert torch.equal(new["scale"], old["scale"])
    for name in bn_buffers:
        assert not torch.equal(new[name], old[name]), name  # re-estimated, not left at the source's


def test_dropout_is_off_during_reestimation():
    # with dropout on, bn2's input would differ between two identical passes; the statistics must not
    model_a, model_b = trained_tiny(), trained_tiny()
    x = torch.randn(2, 3, 5, 6)
    torch.manual_seed(5)
    adabn.reestimate_bn(model_a, [x])
    torch.manual_seed(6)
    adabn.reestimate_bn(model_b, [x])
    assert torch.equal(model_a.bn2.running_var, model_b.bn2.running_var)


def test_eval_flags_rebuild_the_arguments():
    import daformer
    import source_only
    from common.cli import parse_args
    args = {"source": "toy-synth", "target": "toy-real", "preset": "quick", "amp": False, "crop_size": None,
            "target_size": [32, 64], "lr": 0.0025, "weights": ["x.pt"], "out": "somewhere", "eval_limit": None}
    argv = adabn.eval_flags(source_only, args, {"eval_limit": 2})
    # only what differs from the preset: source, target, lr and crop_size are the quick preset's
    assert argv == ["--preset", "quick", "--no-amp", "--target-size", "32", "64", "--eval-limit", "2"]
    rebuilt = parse_args(source_only.Args, source_only.PRESETS, argv)
    assert {k: getattr(rebuilt, k) for k in args if k not in ("weights", "out")} == \
        {**{k: v for k, v in args.items() if k not in ("weights", "out")}, "eval_limit": 2}
    # a whole config: daformer --source-only refuses typed flags that do nothing without the target, so
    # the preset's values must not be typed
    config = dataclasses.asdict(parse_args(daformer.Args, daformer.PRESETS, ["--preset", "quick", "--source-only",
                                                                                "--crop-size", "64"]))
    argv = adabn.eval_flags(daformer, config, {"normalization": "imagenet"})
    assert argv == ["--preset", "quick", "--crop-size", "64", "--normalization", "imagenet", "--source-only"]
    assert {**dataclasses.asdict(parse_args(daformer.Args, daformer.PRESETS, argv)), "normalization": "auto"} == config
    assert adabn.arguments_differ({"lr": 0.1, "target_size": (32, 64), "out": "a"},
                                  {"lr": 0.1, "target_size": [32, 64], "out": "b"}) == []
    assert adabn.arguments_differ({"lr": 0.1}, {"lr": 0.2}) == ["lr=0.2 (run: 0.1)"]


def test_unsupported_checkpoint_is_one_error_line(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"script": "lsdseg", "num_classes": 8, "args": {}, "model": {}}, path)
    result = run_script("benchmarks/adabn.py", str(path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path} was written by lsdseg.py; AdaBN supports source_only, adaptsegnet, advent, daformer (the other scripts' "
        "networks are not rebuilt here)"]


@pytest.mark.parametrize("flags, message", [
    (["--batches", "0"], "--batches and --batch-size must be at least 1"),
    (["--batch-size", "0"], "--batches and --batch-size must be at least 1"),
    ([], "neither a checkpoint nor a run folder with checkpoints/last.pt")])
def test_bad_input_is_refused(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        adabn.main([str(tmp_path / "no_run"), *flags])


@pytest.mark.parametrize("script", ["source_only", "adaptsegnet", "advent"])
def test_deeplab_v2_is_rebuilt_as_the_run_resolved_it(script):
    """The rebuilt network follows the run's --stride-on (a ResNet-50 trained from torchvision weights has layer2's
    stride on the 3x3 conv; the same weights in the Caffe layout would load without error and compute another
    network), and a method's multi-level model keeps its aux head."""
    import importlib
    module = importlib.import_module(script)
    build, keep_ratio = adabn.NETWORKS[script]
    args = {"backbone": "resnet50", "multi_level": True, "aspp_branches": 4, "bn_mode": "train"}
    for stride_on, strides in (("3x3", ((1, 1), (2, 2))), ("1x1", ((2, 2), (1, 1)))):
        model = build(module, {**args, "stride_on": stride_on}, 3)
        assert (model.layer2[0].conv1.stride, model.layer2[0].conv2.stride) == strides
        assert model.aux_head is not None and not keep_ratio
    old = build(module, args, 3)  # a checkpoint from before --stride-on: the Caffe layout
    assert old.layer2[0].conv1.stride == (2, 2)
