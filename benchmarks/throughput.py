"""Training step time and peak memory of every script at the paper's batch and resolution, no dataset needed.

    python benchmarks/throughput.py                          # GPU: paper sizes, 20 iterations, AMP on and off
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --scale 0.25 --iters 4 --scripts source_only,advent

The scripts are monolithic main()s, so each one runs as it would for a user, in a subprocess, on a tiny
synthetic folder dataset (interface.md layout: classes.txt with the 19 Cityscapes classes, random images
and labels) with `--init none --preset paper` and the paper's batch size. Sizes come from the script's own
`--preset paper --dry-run` config (its source/target resize and crop; GTA5 1280x720 and Cityscapes 1024x512
where the script leaves them to the dataset) and are passed explicitly, times `--scale` (default 1 on a GPU,
0.25 on a CPU). Evaluation is cut to one image at a small size; checkpoints only at the end.
- Step time: the median seconds per iteration between logging rows of metrics.jsonl, the first (start-up)
  interval left out (compare.py's step_seconds).
- Peak memory: on CUDA, the largest `mem_gib` of metrics.jsonl (torch.cuda.max_memory_allocated, written by
  common/runlog.py); on a CPU, the child process's maximum resident set size (os.wait4), which includes
  Python, torch and the data.
- AMP: `--amp` and `--no-amp` on CUDA; the scripts' AMP is CUDA-only, so a CPU measures `--no-amp` only.
Multi-stage scripts (bdl.py, proda.py) run their default stages with the given --iters.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import REPO, read_json, step_seconds  # noqa: E402

SCRIPTS = ["source_only", "fcn_wild", "adaptsegnet", "advent", "lsdseg", "bdl", "proda", "self_regulation",
           "daformer"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
PAPER_SOURCE, PAPER_TARGET = [720, 1280], [512, 1024]  # GTA5 and Cityscapes training sizes (datasets.md)


def cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def make_dataset(root, rng, size=(64, 128), train=2):
    """A folder dataset with random images and labels; the scripts resize it to the sizes we pass."""
    os.makedirs(root)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CITYSCAPES_CLASSES) + "\n")
    for split, n in (("train", train), ("val", 1)):
        for kind in ("images", "labels"):
            os.makedirs(os.path.join(root, kind, split))
        for i in range(n):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label = rng.integers(0, len(CITYSCAPES_CLASSES), size, dtype=np.uint8)
            Image.fromarray(image).save(os.path.join(root, "images", split, f"{i:03d}.png"))
            Image.fromarray(label).save(os.path.join(root, "labels", split, f"{i:03d}.png"))


def scaled(size, scale):
    return [max(32, int(round(v * scale / 8)) * 8) for v in size]


def paper_config(script, data, tmp):
    """The resolved arguments of `script --preset paper` (its dry run), or None with the error line."""
    out = os.path.join(tmp, f"{script}-dry")
    result = subprocess.run([sys.executable, os.path.join(REPO, f"{script}.py"), "--preset", "paper", "--source",
                             data, "--target", data, "--init", "none", "--dry-run", "--out", out],
                            capture_output=True, text=True)
    config = read_json(os.path.join(out, "config.json"))
    if result.returncode != 0 or config is None:
        return None, (result.stderr.strip().splitlines() or ["dry run failed"])[-1]
    return config["args"], None


def measure(script, data, paper, args, amp, tmp):
    """One training run; returns a result row."""
    source = scaled(paper.get("source_size") or PAPER_SOURCE, args.scale)
    target = scaled(paper.get("target_size") or PAPER_TARGET, args.scale)
    crop = scaled(paper["crop_size"], args.scale) if paper.get("crop_size") else None
    out = os.path.join(tmp, f"{script}-{'amp' if amp else 'fp32'}")
    argv = [os.path.join(REPO, f"{script}.py"), "--preset", "paper", "--source", data, "--target", data,
            "--init", "none", "--iters", str(args.iters), "--log-every", "1", "--checkpoint-every", str(args.iters),
            "--eval-every", "0", "--eval-limit", "1", "--eval-size", "32", "64", "--num-predictions", "0",
            "--num-workers", str(args.num_workers), "--amp" if amp else "--no-amp",
            "--source-size", *map(str, source), "--target-size", *map(str, target), "--out", out]
    if crop:
        argv += ["--crop-size", *map(str, crop)]
    row = {"script": script, "batch": paper.get("batch_size"), "source_size": source, "target_size": target,
           "crop_size": crop, "amp": amp, "device": "cuda" if args.cuda else "cpu",
           "backbone": paper.get("backbone"), "iters": args.iters}
    start, log_path = time.time(), out + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT)
        while True:  # os.wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would mix all children)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - start > args.timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row["wall_seconds"] = round(time.time() - start, 1)
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
        reason = f"timeout after {args.timeout} s" if time.time() - start > args.timeout else (tail or ["?"])[-1]
        row["status"] = "failed: " + reason[:200]
        return row
    seconds, with_startup = step_seconds(os.path.join(out, "metrics.jsonl"))
    row["step_seconds"] = seconds
    row["step_includes_startup"] = with_startup
    if args.cuda:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            mems = [json.loads(line).get("mem_gib") for line in f if line.strip()]
        row["peak_gib"] = max((m for m in mems if m is not None), default=None)
        row["memory"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_gib"] = round(usage.ru_maxrss / 2**20, 2)  # ru_maxrss is in KiB on Linux
        row["memory"] = "max RSS of the process"
    row["status"] = "ok"
    return row


def markdown(rows):
    lines = ["| script | backbone | batch | source HxW | target HxW | crop | AMP | s/iter | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = lambda s: "x".join(map(str, s)) if s else "–"  # noqa: E731
        step = f"{r['step_seconds']:.3f}" + ("*" if r.get("step_includes_startup") else "") \
            if r.get("step_seconds") is not None else "–"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "–"
        lines.append(f"| {r['script']} | {r.get('backbone') or '–'} | {r.get('batch') or '–'} | "
                     f"{size(r.get('source_size'))} | {size(r.get('target_size'))} | {size(r.get('crop_size'))} | "
                     f"{'on' if r.get('amp') else 'off'} | {step} | {peak} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", default="all", help=f"comma-separated, or all: {', '.join(SCRIPTS)}")
    ap.add_argument("--scale", type=float, default=None, help="size factor (default: 1 on a GPU, 0.25 on a CPU)")
    ap.add_argument("--iters", type=int, default=None, help="iterations per run (default: 20 GPU, 4 CPU)")
    ap.add_argument("--amp", choices=["both", "on", "off"], default="both", help="AMP settings to run (CUDA)")
    ap.add_argument("--num-workers", type=int, default=None, help="data workers (default: 2 GPU, 0 CPU)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run before it is stopped (900)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    args.cuda = cuda_available()
    args.scale = args.scale or (1.0 if args.cuda else 0.25)
    args.iters = args.iters or (20 if args.cuda else 4)
    args.num_workers = args.num_workers if args.num_workers is not None else (2 if args.cuda else 0)
    amps = {"both": [True, False], "on": [True], "off": [False]}[args.amp] if args.cuda else [False]
    names = SCRIPTS if args.scripts == "all" else [s.strip() for s in args.scripts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "synthetic")
        make_dataset(data, np.random.default_rng(0))
        for script in names:
            if not os.path.isfile(os.path.join(REPO, f"{script}.py")):
                print(f"note: {script}.py is not in the repository yet, skipped")
                continue
            paper, problem = paper_config(script, data, tmp)
            if paper is None:
                rows.append({"script": script, "status": f"dry run failed: {problem[:200]}"})
                continue
            for amp in amps:
                rows.append(measure(script, data, paper, args, amp, tmp))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    device = "CUDA " + __import__("torch").cuda.get_device_name() if args.cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}, scale {args.scale}, {args.iters} iterations, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; * = only the start-up interval was measured\n")
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "scale": args.scale, "iters": args.iters, "rows": rows}, f, indent=1)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
