"""Which share of the target pixels does a model give each class, against the truth and the source labels?

    python benchmarks/class_fractions.py [NAME=]RUN [[NAME=]RUN ...] [--limit N]

RUN: a finished run folder (or a checkpoint) of source_only.py, adaptsegnet.py, advent.py, fcn_wild.py or
daformer.py, or an AdaBN folder of benchmarks/adabn.py; NAME labels its row. For each, the script's own network is rebuilt from the checkpoint's args and scored on
the target val split as the script's evaluation does; the columns are the predicted pixel share per class (the confusion matrix's column sums), beside the true target val share (row sums) and the share
of the source train labels. Output-space alignment pushes the predicted shares toward the source's; where
the domains' label distributions differ (toy-real has more building and less vegetation than toy-synth),
that is the wrong direction (benchmarks/adaptsegnet.md).
"""
import argparse
import importlib
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data import SegDataset, class_setup, domain_split, eval_loader, normalize  # noqa: E402
from common.metrics import evaluate  # noqa: E402


def checkpoint_of(run):
    path = run if os.path.isfile(run) else os.path.join(run, "checkpoints", "last.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def predicted_and_true(ckpt, limit):
    args = ckpt["args"]
    script = importlib.import_module(ckpt["script"])
    align_corners = True
    if hasattr(script, "VGG16FrontEnd"):  # fcn_wild.py
        net = script.VGG16FrontEnd(args["backbone"], ckpt["num_classes"])
    elif hasattr(script, "DAFormerNet"):  # daformer.py: logits to the input size, then to the label size
        net = script.DAFormerNet(args["backbone"], ckpt["num_classes"], args["decoder"], args["decoder_dim"],
                                 args["drop_path"], args["dropout"])
        align_corners = False
    else:
        net = script.DeepLabV2(args["backbone"], ckpt["num_classes"], args.get("multi_level", False),
                               args.get("aspp_branches", 4))
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise SystemExit(f"error: {ckpt['script']}.py checkpoints are not supported (its network is not the "
                         "plain DeepLab-v2, the FCN front-end or DAFormer's)") from None
    net.eval()
    _, _, pred_map = class_setup(args["source"], args["target"], args.get("synthia_classes", 19))
    val = domain_split(args["target"], "val", args["data_root"])
    size = args.get("eval_size") or args.get("target_size") or val.paper_size
    loader = eval_loader(SegDataset(val, eval_size=size, eval_interpolation=getattr(script, "RESIZE", "bicubic")),
                         num_workers=0, limit=limit)

    def predict(x):
        logits = net(normalize(x, ckpt["normalization"]))[1]
        return logits if align_corners else F.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                                          align_corners=False)

    with torch.no_grad():
        confusion = evaluate(predict, loader, len(val.classes), torch.device("cpu"), align_corners, pred_map)
    confusion = confusion.double()
    return (confusion.sum(0) / confusion.sum()).numpy(), (confusion.sum(1) / confusion.sum()).numpy(), val, args


def source_share(args, num_classes, limit=400):
    split = domain_split(args["source"], "train", args["data_root"], synthia_classes=args.get("synthia_classes", 19))
    counts = np.zeros(num_classes)
    for i in range(min(limit, len(split))):
        label = split.load_label(i)
        counts += np.bincount(label[label != 255].ravel(), minlength=256)[:num_classes]
    return counts / counts.sum()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or checkpoints; NAME=PATH names a row")
    p.add_argument("--limit", type=int, default=None, help="target val images (default: all)")
    a = p.parse_args()
    rows, truth, source, classes = [], None, None, None
    for item in a.runs:
        name, _, path = item.rpartition("=")
        ckpt = checkpoint_of(path)
        predicted, true, val, args = predicted_and_true(ckpt, a.limit)
        rows.append((name or os.path.basename(path.rstrip("/")), predicted))
        if truth is None:
            truth, classes = true, val.classes
            source = source_share(args, len(classes))
    print("| pixels (%) | " + " | ".join(classes) + " |")
    print("|---|" + "---|" * len(classes))
    for name, share in [("source train labels", source), ("target val labels", truth)] + rows:
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in share) + " |")


if __name__ == "__main__":
    main()
