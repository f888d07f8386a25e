"""The run folder of interface.md: config.json, metrics.jsonl, results.json, predictions/, TensorBoard.

Only rank 0 writes (a RunLog on other ranks is inert). TensorBoard is used when the `tensorboard`
package happens to be installed; it is not a dependency.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from common.cli import UserError
from common.data import palette_for


def default_run_dir(script, source, target, seed) -> str:
    def short(name):
        return os.path.basename(os.path.normpath(name))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{script}-{short(source)}2{short(target)}-s{seed}-{stamp}")


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def param_counts(**nets) -> dict:
    """{name: {"trainable": n, "total": n}} for each network."""
    return {name: {"trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
                   "total": sum(p.numel() for p in net.parameters())} for name, net in nets.items()}


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class RunLog:
    def __init__(self, out_dir, is_main=True):
        self.out, self.is_main, self.tb, self.start = out_dir, is_main, None, time.time()
        self._last_iter, self._last_time = 0, time.time()
        if not is_main:
            return
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(out_dir)
        except ImportError:
            self.tb = None

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def write_config(self, script, args, params: dict, **extra):
        if not self.is_main:
            return
        import timm
        config = {"script": script, "args": dataclasses.asdict(args), "git_commit": git_commit(),
                  "torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0],
                  "params": params, **extra}
        save_json(self.path("config.json"), config)
        print(hyperparameter_table(args), flush=True)

    def log(self, iteration, scalars: dict):
        """One line of metrics.jsonl: iter, each loss by name, lr, seconds."""
        if not self.is_main:
            return
        row = {"iter": iteration, **{k: float(v) for k, v in scalars.items()},
               "seconds": round(time.time() - self.start, 3)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # peak GPU memory so far (throughput.py)
            row["mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(("charts/" if k in ("lr", "lr_d", "images_per_sec") else "losses/") + k, v, iteration)

    def check_and_log(self, iteration, running: dict, lr, batch_size, progress=None, write=True, **extra):
        """Average the losses accumulated on the device since the last write (the loop's one host sync),
        stop on a non-finite loss before any checkpoint is written, and log. Returns the averages if
        written (the caller then resets its accumulators), else None."""
        n = iteration - self._last_iter
        scalars = {k: float(v) / n for k, v in running.items()}
        bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
        if bad:
            raise UserError(f"non-finite loss at iteration {iteration} ({bad}); stopped, the last good checkpoint "
                            f"in {self.path('checkpoints')} is left intact")
        if not write:
            return None
        seconds = time.time() - self._last_time
        self.log(iteration, {**scalars, "lr": lr, **extra, "images_per_sec": n * batch_size / max(seconds, 1e-9)})
        if progress is not None:
            progress.set_postfix({k: f"{v:.3g}" for k, v in scalars.items()})
        self._last_iter, self._last_time = iteration, time.time()
        return scalars

    def start_loop(self, start_iter):
        self._last_iter, self._last_time = start_iter, time.time()

    def log_eval(self, iteration, summary: dict):
        if not self.is_main:
            return
        from tqdm import tqdm
        tqdm.write(f"iter {iteration}: target val mIoU {summary['miou']:.2f}")
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps({"iter": iteration, "val_miou": summary["miou"],
                                "seconds": round(time.time() - self.start, 3)}) + "\n")
        if self.tb is not None:
            self.tb.add_scalar("eval/miou", summary["miou"], iteration)

    def write_results(self, summary: dict, iters: int, **extra):
        if not self.is_main:
            return
        save_json(self.path("results.json"), {**summary, "iters": iters,
                                              "seconds": round(time.time() - self.start, 3), **extra})

    def close(self):
        if self.tb is not None:
            self.tb.close()


def hyperparameter_table(args) -> str:
    rows = [f"| {k} | {v} |" for k, v in dataclasses.asdict(args).items()]
    return "\n".join(["| parameter | value |", "|---|---|", *rows])


def colorize(label: np.ndarray, palette) -> np.ndarray:
    """HxW class ids -> HxWx3 RGB; 255 (ignore) is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:len(palette)] = np.array(palette, dtype=np.uint8)
    return lut[label]


def save_prediction(path, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, classes):
    """image | ground truth | prediction side by side, at the label's resolution."""
    palette = palette_for(classes)
    pred = pred.to("cpu", torch.uint8).numpy()
    h, w = pred.shape
    img = Image.fromarray(image.cpu().permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
    panels = [np.asarray(img)]
    if label.numel():
        panels.append(colorize(label.cpu().numpy(), palette))
    panels.append(colorize(pred, palette))
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


def save_label_png(path, ids: torch.Tensor):
    """An 8-bit single-channel PNG of class/label ids (an HxW uint8 tensor), written atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(ids.cpu().numpy().astype(np.uint8), mode="L").save(tmp)
    os.replace(tmp, path)
