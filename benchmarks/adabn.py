"""AdaBN control: a finished run's network with every BatchNorm's statistics re-estimated on target frames.

    python benchmarks/adabn.py RUN [--out DIR] [--batches N] [--batch-size B] [--data-root DIR]

AdaBN (Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical Domain Adaptation",
arXiv 1603.04779, 2016) replaces the source statistics of each BN layer by the target's and changes nothing
else. It is the control for "a method gains because target frames pass through train-mode BN": a method
that only beats source-only by what AdaBN gets for free has not shown that its own objective adapts.

RUN: a finished run folder (its checkpoints/last.pt) or a checkpoint of source_only.py (DeepLab-v2),
adaptsegnet.py or advent.py (the same DeepLab-v2: a method's model with AdaBN tells whether the method adds
anything beyond target BN statistics) or daformer.py (its decode head has BN; a `--source-only` run is its
same-network control). The network is
rebuilt from the checkpoint's args as the script builds it, then:
1. every BN layer's running mean/var is reset and re-estimated as a cumulative average (momentum None, so
   each batch counts the same) over N batches of target *train* frames: a seeded shuffle (the run's seed)
   of the split, each frame resized as the script's training target frames are (its --target-size, else
   the dataset's training size; DAFormer keeps the aspect ratio), whole frames without crop or flip. The
   forward pass runs without gradients, the BN layers in train mode and everything else in eval mode
   (no dropout or drop-path), so only the BN buffers change (running_mean, running_var,
   num_batches_tracked); every parameter and every other buffer stays bit-identical;
2. the adapted weights go to OUT/checkpoints/last.pt and the script itself evaluates them
   (`--eval-only --weights`, with the run's arguments), so the evaluation settings are the script's own
   (evaluation size, upsampling, align_corners); it writes OUT/config.json, OUT/results.json and
   OUT/predictions/. The tool checks that the evaluation ran with the run's arguments and adds an `adabn`
   record to results.json (source checkpoint and its sha256, frames, batch size, time); `seconds` is the
   whole tool's time.
OUT defaults to RUN-adabn beside the run folder.
"""
import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
import typing

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from common.checkpoint import load_checkpoint, load_weights, save_checkpoint  # noqa: E402
from common.cli import UserError, guard, parse_args  # noqa: E402
from common.data import SegDataset, TrainTransform, domain_split, normalize, train_loader  # noqa: E402
from common.runlog import save_json  # noqa: E402


def deeplab_v2(module, a, n):
    """The shared DeepLab-v2 of source_only.py, adaptsegnet.py and advent.py, as the run resolved it (a checkpoint
    from before --stride-on has the Caffe layout)."""
    stride_on = a.get("stride_on", "1x1")
    return module.DeepLabV2(a["backbone"], n, a["multi_level"], a["aspp_branches"], a["bn_mode"],
                            "1x1" if stride_on == "auto" else stride_on)


# script -> (network from (module, args, num_classes), keep_ratio of its target-frame resize)
NETWORKS = {
    "source_only": (deeplab_v2, False),
    "adaptsegnet": (deeplab_v2, False),  # a method's model + AdaBN: does the method add anything beyond the
    "advent": (deeplab_v2, False),  # target BN statistics that AdaBN gives a source-only model for free?
    "daformer": (lambda module, a, n: module.DAFormerNet(a["backbone"], n, a["decoder"], a["decoder_dim"],
                                                         a["drop_path"], a["dropout"]), True),
}
# arguments that the evaluation run sets itself, or that never change a result
NOT_PASSED = {"out", "resume", "eval_only", "weights", "dry_run", "world_size", "rank"}
# ... and the ones this tool may change; normalization is passed as the run resolved it ("auto" is not) and
# checked against config.json's top-level "normalization"
NOT_CHECKED = NOT_PASSED | {"device", "num_workers", "data_root", "eval_limit", "normalization"}


def batch_norms(model):
    """The BN layers that keep running statistics (a BN without them always normalises by the batch)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reestimate_bn(model, batches):
    """Reset every BN layer's running statistics and re-estimate them as the plain average over `batches`
    (input tensors) of each batch's mean and unbiased variance, with BN in train mode, everything else in
    eval mode and no gradients. Leaves the model in eval mode; returns the number of batches seen."""
    layers = batch_norms(model)
    momenta = [bn.momentum for bn in layers]
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: running = mean over the batches so far
        bn.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            model(x)
            seen += 1
    for bn, momentum in zip(layers, momenta):
        bn.momentum = momentum
    model.eval()
    return seen


def checkpoint_path(run):
    path = run if os.path.isfile(run) else os.path.join(run, "checkpoints", "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"{run}: neither a checkpoint nor a run folder with checkpoints/last.pt")
    return path


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def eval_flags(module, run_args, overrides):
    """The script's command-line flags that rebuild `run_args` (a checkpoint's args) with `overrides`: --preset
    and every argument whose value differs from what that preset resolves to. Only those: a script may refuse
    a typed flag that would do nothing in its mode (daformer.py --source-only with --ema-alpha, say)."""
    wanted = {**run_args, **overrides}
    preset = ["--preset", wanted["preset"]] if "preset" in wanted else []
    resolved = parse_args(module.Args, module.PRESETS, preset)
    hints = typing.get_type_hints(module.Args)
    argv = []
    for f in dataclasses.fields(module.Args):
        if not f.init or f.metadata.get("runtime") or f.name in NOT_PASSED or f.name not in wanted:
            continue
        value = wanted[f.name]
        if f.name != "preset" and as_json(value) == as_json(getattr(resolved, f.name)):
            continue
        flag = "--" + f.name.replace("_", "-")
        optional = type(None) in typing.get_args(hints[f.name])
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            argv += [flag, "none"] if optional else []  # a non-optional field cannot be None on the command line
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def as_json(value):
    """A value as JSON would give it back: tuples and lists compare equal."""
    return json.loads(json.dumps(value))


def arguments_differ(run_args, eval_args):
    """One "name=value (run: value)" per argument the evaluation resolved differently from the run."""
    return [f"{k}={eval_args[k]!r} (run: {run_args[k]!r})" for k in run_args
            if k not in NOT_CHECKED and k in eval_args and as_json(eval_args[k]) != as_json(run_args[k])]


def read_json(path, missing_ok=False):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        if missing_ok:
            return {}
        raise UserError(f"{path} is missing or unreadable") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="finished run folder (its checkpoints/last.pt) or a checkpoint file")
    p.add_argument("--out", default=None, help="output run folder (default: RUN-adabn beside the run)")
    p.add_argument("--batches", type=int, default=100, help="target train batches for the statistics (100)")
    p.add_argument("--batch-size", type=int, default=None, help="frames per batch (default: the run's --batch-size)")
    p.add_argument("--data-root", default=None, help="dataset root (default: the run's --data-root)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only N target val images (default: the run's)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes (default: the run's)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if available")
    a = p.parse_args(argv)
    if a.batches < 1 or (a.batch_size is not None and a.batch_size < 1):
        raise UserError("--batches and --batch-size must be at least 1")
    start = time.time()
    source_ckpt = checkpoint_path(a.run)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(source_ckpt)))  # <run>/checkpoints/last.pt
    ckpt = load_checkpoint(source_ckpt)
    script = ckpt["script"]
    if script not in NETWORKS:
        raise UserError(f"{source_ckpt} was written by {script}.py; AdaBN supports {', '.join(NETWORKS)} "
                        f"(the other scripts' networks are not rebuilt here)")
    module = importlib.import_module(script)
    run_args, num_classes = ckpt["args"], ckpt["num_classes"]
    build, keep_ratio = NETWORKS[script]
    model = build(module, run_args, num_classes)
    load_weights(model, ckpt["model"])
    layers = batch_norms(model)
    if not layers:
        raise UserError(f"the {script}.py network of {source_ckpt} has no BatchNorm layer: AdaBN does not apply")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available")
    model.to(device)

    data_root = a.data_root or run_args["data_root"]
    batch_size = a.batch_size or run_args["batch_size"]
    num_workers = run_args.get("num_workers", 0) if a.num_workers is None else a.num_workers
    target_train = domain_split(run_args["target"], "train", data_root, labelled=False)
    size = run_args.get("target_size") or target_train.paper_size
    transform = TrainTransform(size=size, keep_ratio=keep_ratio, interpolation=run_args.get("interpolation", "bicubic"))
    if a.batches * batch_size > len(target_train):
        print(f"note: {a.batches} x {batch_size} frames is more than the {len(target_train)} of "
              f"{run_args['target']} train: some frames are seen twice")
    loader = train_loader(SegDataset(target_train, transform, with_label=False), batch_size, run_args["seed"],
                          num_workers=num_workers, pin_memory=device.type == "cuda")
    norm = ckpt["normalization"]
    batches = (normalize(next(loader)[0].to(device), norm) for _ in range(a.batches))
    estimate_start = time.time()
    reestimate_bn(model, batches)
    estimate_seconds = time.time() - estimate_start
    del loader  # its worker processes

    out = a.out or run_dir + "-adabn"
    weights = os.path.join(out, "checkpoints", "last.pt")
    save_checkpoint(weights, {"script": script, "num_classes": num_classes, "iter": ckpt["iter"],
                              "normalization": norm, "args": run_args,
                              "model": {k: v.cpu() for k, v in model.state_dict().items()}})
    # the run's input normalisation as resolved at training time ("auto" would be re-derived from the weights)
    overrides = {"data_root": data_root, "device": a.device, "num_workers": num_workers, "normalization": norm}
    if a.eval_limit is not None:
        overrides["eval_limit"] = a.eval_limit
    cmd = [sys.executable, os.path.join(REPO, f"{script}.py"), *eval_flags(module, run_args, overrides),
           "--eval-only", "--weights", weights, "--out", out]
    print(f"AdaBN: {len(layers)} BN layers re-estimated on {a.batches} x {batch_size} {run_args['target']} train "
          f"frames ({estimate_seconds:.0f} s); evaluating with {script}.py --eval-only", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise UserError(f"the evaluation failed: {' '.join(cmd)}")
    config = read_json(os.path.join(out, "config.json"))
    results = read_json(os.path.join(out, "results.json"))
    differ = arguments_differ(run_args, config["args"])
    if config.get("normalization") != norm:
        differ.insert(0, f"normalization={config.get('normalization')!r} (run: {norm!r})")
    if differ:
        raise UserError(f"{script}.py evaluated with other arguments than the run's: {', '.join(differ[:4])}")
    source_results = read_json(os.path.join(run_dir, "results.json"), missing_ok=True)
    results["adabn"] = {"source_checkpoint": os.path.abspath(source_ckpt), "source_sha256": sha256_of(source_ckpt),
                        "source_miou": source_results.get("miou"), "batches": a.batches, "batch_size": batch_size,
                        "frames": a.batches * batch_size, "frame_size": size, "bn_layers": len(layers),
                        "estimate_seconds": round(estimate_seconds, 3), "eval_seconds": results.get("seconds")}
    results["seconds"] = round(time.time() - start, 3)
    save_json(os.path.join(out, "results.json"), results)
    before = f"{source_results['miou']:.2f} -> " if "miou" in source_results else ""
    print(f"AdaBN target val mIoU {before}{results['miou']:.2f} ({os.path.join(out, 'results.json')})")


if __name__ == "__main__":
    guard(main)
