"""Side-by-side comparison: run every method script (plus source-only and a target-trained oracle) for
several seeds, then write one table, one bar chart and one prediction grid.

    python benchmarks/compare.py                                  # --preset quick on the toy pair, seed 0
    python benchmarks/compare.py --seeds 0 1 2 --jobs 2           # 3 seeds, two runs at a time
    python benchmarks/compare.py --source gta --target cityscapes --preset paper --methods source_only,advent
    python benchmarks/compare.py --report-only --update-benchmarks   # aggregate what exists, run nothing

Runs land in the standard run folder of interface.md at
`<runs-root>/<source>_<target>[-iters<N>]/<method>/seed<k>/` (runs at another `--iters` budget get another
root, so they never mix). A run is *finished* when it has results.json and its config.json agrees with what
this tool would run: the resolved arguments of the script's own `--dry-run` for the same command (minus
out, resume, num_workers, which do not change results). Finished runs are never rerun; a run with
checkpoints/last.pt but no results.json is resumed (`--resume auto`); a folder whose files changed in the
last `--busy-minutes` is assumed to be training in another process and left alone; a finished run whose
config disagrees is reported and left alone unless `--overwrite`.

Report (`--out`, default benchmarks/compare/): table.md (mIoU mean ± std over seeds, gain over
source-only, wall time, training step time relative to source_only.py, per-class IoU), miou.png (bars
with ± std error bars), grid.png (the same target-val images: image | ground truth | each method's
prediction), summary.json (every number). Pictures are drawn with Pillow only.
- Step time: per run, the median over logging intervals of seconds per iteration from metrics.jsonl,
  leaving out the first interval (start-up, data loader warm-up) and any interval with an evaluation in it.
- Wall time: results.json `seconds` (of the last process: a resumed run counts only its last part).
- Grid: every script saves its first `--num-predictions` target-val images (same indices, same names) as
  image | ground truth | prediction at label resolution; the grid crops those panels, so no model is
  reloaded. The ground-truth panels are checked to be identical across methods (noted in the report if not).
`--update-benchmarks` rewrites the part of BENCHMARKS.md (and README.md) between the lines
`<!-- compare:begin -->` and `<!-- compare:end -->`; files without both markers are left untouched.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Method:
    name: str  # the run folder name and the table row
    script: str  # file in the repository root
    args: list = field(default_factory=list)  # added after the shared flags; {target}, {dep[name]} are filled in
    depends_on: tuple = ()  # methods whose run (same seed) must have finished first


# ----------------------------------------------------------------------------------------------------
# The methods, in table order. Edit this table to add a method.
METHODS = [
    Method("source_only", "source_only.py"),
    Method("oracle", "source_only.py", ["--source", "{target}"]),  # trained on the target's labels
    Method("fcn_wild", "fcn_wild.py"),
    Method("adaptsegnet", "adaptsegnet.py"),
    Method("advent", "advent.py", ["--mode", "advent"]),
    Method("advent_minent", "advent.py", ["--mode", "minent"]),
    Method("advent_ensemble", "advent.py",  # test-time ensemble of the two runs above: evaluation only
           ["--mode", "advent", "--eval-only", "--weights", "{dep[advent]}/checkpoints/last.pt",
            "--weights", "{dep[advent_minent]}/checkpoints/last.pt"], ("advent", "advent_minent")),
    Method("lsdseg", "lsdseg.py"),
    Method("bdl", "bdl.py"),
    Method("proda", "proda.py"),
    Method("self_regulation", "self_regulation.py"),
    Method("daformer", "daformer.py"),
]
BASELINE = "source_only"
# arguments that do not change a run's result: a run made with other values still counts as finished
NOT_COMPARED = {"out", "resume", "num_workers", "dry_run", "eval_only", "weights", "world_size", "rank"}
GRID_HEADER, GRID_GAP = 18, 2  # grid.png: title row height and the gap between panels (pixels)
MARK_BEGIN, MARK_END = "<!-- compare:begin -->", "<!-- compare:end -->"


def short(name):
    """A dataset name for folder names: built-in names as they are, folder datasets by their basename."""
    return os.path.basename(os.path.normpath(name))


def run_root(args):
    suffix = f"-iters{args.iters}" if args.iters else ""
    return os.path.join(args.runs_root, f"{short(args.source)}_{short(args.target)}{suffix}")


def run_dir(args, name, seed):
    return os.path.join(run_root(args), name, f"seed{seed}")


def command(args, method, seed):
    """The argument list (after `python`) of one run."""
    deps = {dep: run_dir(args, dep, seed) for dep in method.depends_on}
    argv = [os.path.join(REPO, method.script), "--preset", args.preset, "--source", args.source,
            "--target", args.target, "--seed", str(seed)]
    if args.iters:
        argv += ["--iters", str(args.iters)]
    argv += [a.format(target=args.target, source=args.source, dep=deps) for a in method.args]
    return argv + shlex.split(args.extra) + ["--out", run_dir(args, method.name, seed)]


def child_env(jobs):
    """One process per job, each with an equal share of the cores (an OMP_NUM_THREADS already set wins)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    return dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")


# ----------------------------------------------------------------------------------------------------
# Is a run folder finished, and with the arguments we would use?
def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _normal(value):
    """Command-line text and JSON values in one comparable form (numbers as floats, 'none' as None)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str) and value.lower() == "none":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def explicit_flags(argv):
    """{dest: value} of the flags in an argument list (the last occurrence wins, as in argparse)."""
    flags, i = {}, 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            i += 1
            continue
        name = argv[i][2:].replace("-", "_")
        values = []
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if not values:  # a --flag/--no-flag boolean
            flags[name[3:] if name.startswith("no_") else name] = not name.startswith("no_")
        else:
            flags[name] = values
    return flags


def args_disagree(config_args, expected):
    """One "name=value (expected ...)" per differing argument; arguments one side lacks are not compared."""
    bad = []
    for key, want in expected.items():
        if key in NOT_COMPARED or key not in config_args:
            continue
        have = _normal(config_args[key])
        want = _normal(want)
        if isinstance(want, list) and not isinstance(have, list) and len(want) == 1:
            want = want[0]  # a one-value flag against a scalar field
        if have != want:
            bad.append(f"{key}={config_args[key]!r} (expected {want!r})")
    return bad


class Expected:
    """The resolved arguments each method's script would run with: its own --dry-run, once per method
    (prefetch() runs several at once). Falls back to the explicit flags of the command when the dry run
    fails (say, a script in the middle of an edit)."""

    def __init__(self, args):
        self.args, self.cache = args, {}

    def __call__(self, method, seed):
        argv = command(self.args, method, seed)
        if method.name not in self.cache:
            self.prefetch([method])
        resolved = self.cache[method.name]
        if resolved is None:
            return explicit_flags(argv[1:]), "checked against the explicit flags only (its --dry-run failed)"
        return {**resolved, "seed": seed}, None

    def prefetch(self, methods):
        """Dry-run the given methods' scripts in parallel, one process per core."""
        todo = [m for m in methods if m.name not in self.cache]
        with tempfile.TemporaryDirectory() as tmp:
            while todo:
                batch, todo = todo[:os.cpu_count() or 1], todo[os.cpu_count() or 1:]
                started = []
                for m in batch:
                    out = os.path.join(tmp, m.name)
                    argv = command(self.args, m, self.args.seeds[0])[:-1] + [out, "--dry-run"]  # last: --out DIR
                    started.append((m, out, subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL,
                                                             stderr=subprocess.PIPE, text=True,
                                                             env=child_env(len(batch)))))
                for m, out, proc in started:
                    _, err = proc.communicate(timeout=600)
                    config = read_json(os.path.join(out, "config.json"))
                    if proc.returncode != 0 or config is None:
                        print(f"note: {m.script} --dry-run failed: {err.strip()[-300:]}")
                    self.cache[m.name] = config["args"] if config and proc.returncode == 0 else None


def newest_change(folder):
    times = [os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files]
    return max(times, default=0.0)


def classify(args, method, seed, expected):
    """(state, detail) of one run folder: fresh, busy, mismatch, finished, resume or stale."""
    folder = run_dir(args, method.name, seed)
    if not os.path.isdir(folder) or not os.listdir(folder):
        return "fresh", ""
    finished = os.path.isfile(os.path.join(folder, "results.json"))
    age = time.time() - newest_change(folder)
    if not finished and age < args.busy_minutes * 60:  # checked first: never touch a run in progress
        return "busy", f"files changed {age:.0f} s ago: another process seems to be training it"
    config, note = read_json(os.path.join(folder, "config.json")), None
    if config is not None:
        want, note = expected(method, seed)
        bad = args_disagree(config.get("args", {}), want)
        if config.get("script") != os.path.splitext(method.script)[0]:
            bad.insert(0, f"script={config.get('script')!r}")
        if bad:
            return "mismatch", "config differs: " + ", ".join(bad[:4])
    if finished:
        return ("finished", note or "") if config is not None else ("mismatch", "results.json without config.json")
    if os.path.isfile(os.path.join(folder, "checkpoints", "last.pt")):
        return "resume", ""
    return "stale", "no results.json and no checkpoint"


# ----------------------------------------------------------------------------------------------------
# Running
def plan(args, methods, expected):
    """{(name, seed): (state, detail)} for every selected run whose script exists."""
    existing = [m for m in methods
                if any(os.path.isfile(os.path.join(run_dir(args, m.name, seed), "config.json")) for seed in args.seeds)]
    expected.prefetch(existing)  # dry runs in parallel, only for methods with run folders to check
    return {(m.name, seed): classify(args, m, seed, expected) for seed in args.seeds for m in methods}


def run_all(args, methods, states):
    """Start every unfinished run, at most args.jobs at a time, dependencies first; update `states`.
    Returns the failures, one line each."""
    env = child_env(args.jobs)
    todo = []
    for seed in args.seeds:
        for m in methods:
            state, detail = states[m.name, seed]
            folder = run_dir(args, m.name, seed)
            if state == "finished":
                print(f"skipped {m.name} seed{seed}: finished run in {folder} {detail}".rstrip())
            elif state == "busy" or (state == "mismatch" and not args.overwrite):
                print(f"skipped {m.name} seed{seed}: {detail} ({folder}"
                      f"{'; --overwrite replaces it' if state == 'mismatch' else ''})")
            else:
                if state in ("mismatch", "stale"):  # nothing to resume from: start afresh in an empty folder
                    shutil.rmtree(folder)
                todo.append((m, seed, state == "resume"))
                states[m.name, seed] = ("pending", "")
    failed, running = [], []
    log_dir = os.path.join(run_root(args), "logs")
    while todo or running:
        for item in list(todo):
            m, seed, resume = item
            deps = [states.get((d, seed), ("missing", ""))[0] for d in m.depends_on]
            if any(s not in ("finished", "ran", "pending", "running") for s in deps):
                todo.remove(item)
                states[m.name, seed] = ("failed", "")
                failed.append(f"{m.name} seed{seed}: not run, a run it depends on ({', '.join(m.depends_on)}) "
                              f"is missing or failed")
                print("failed", failed[-1], flush=True)
                continue
            if any(s in ("pending", "running") for s in deps):
                continue  # wait for the dependency
            if len(running) >= args.jobs:
                break
            todo.remove(item)
            argv = command(args, m, seed) + (["--resume", "auto"] if resume else [])
            os.makedirs(log_dir, exist_ok=True)
            log_path = os.path.join(log_dir, f"{m.name}_seed{seed}.log")
            shown = " ".join(shlex.quote(os.path.relpath(a) if a.startswith(REPO) else a) for a in argv)
            print(f"{'resuming' if resume else 'running'} {m.name} seed{seed}: python {shown}", flush=True)
            log_file = open(log_path, "a")
            proc = subprocess.Popen([sys.executable, *argv], stdout=log_file, stderr=subprocess.STDOUT, env=env)
            states[m.name, seed] = ("running", "")
            running.append((m, seed, proc, log_file, log_path, time.time()))
        for entry in list(running):
            m, seed, proc, log_file, log_path, start = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            log_file.close()
            if proc.returncode == 0 and os.path.isfile(os.path.join(run_dir(args, m.name, seed), "results.json")):
                states[m.name, seed] = ("ran", "")
                print(f"finished {m.name} seed{seed} in {time.time() - start:.0f} s", flush=True)
            else:
                states[m.name, seed] = ("failed", "")
                with open(log_path) as f:
                    text = f.read().replace("\r", "\n")  # tqdm redraws its bar with carriage returns
                    tail = [line.strip() for line in text.splitlines() if line.strip()][-1:] or [""]
                failed.append(f"{m.name} seed{seed}: exit {proc.returncode}: {tail[0][:200]} (log {log_path})")
                print("failed", failed[-1], flush=True)
        if running or todo:
            time.sleep(0.5)
    return failed


# ----------------------------------------------------------------------------------------------------
# Aggregation
def step_seconds(metrics_path):
    """Median seconds per iteration over logging intervals, without the first (start-up) interval and
    without intervals that contain an evaluation. Returns (seconds or None, includes_startup)."""
    intervals, startup, prev = [], None, (0, 0.0)
    try:
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None, False
    for row in rows:
        if "val_miou" in row:
            prev = None  # evaluation time lands in the next interval: skip that one
            continue
        if "iter" not in row or "seconds" not in row:
            continue
        if prev is not None and row["iter"] > prev[0] and row["seconds"] > prev[1]:
            per_iter = (row["seconds"] - prev[1]) / (row["iter"] - prev[0])
            if prev == (0, 0.0):
                startup = per_iter
            else:
                intervals.append(per_iter)
        prev = (row["iter"], row["seconds"])  # a resumed run restarts `seconds`: its first interval is dropped
    if intervals:
        return statistics.median(intervals), False
    return startup, startup is not None


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]  # a class absent from val is NaN
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def collect(args, states, failures):
    """summary.json's content: every finished run's numbers and each method's aggregate."""
    summary = {"source": args.source, "target": args.target, "preset": args.preset, "iters": args.iters,
               "extra": args.extra, "seeds": args.seeds, "root": run_root(args), "methods": {}, "notes": []}
    for m in args.method_list:
        if not os.path.isfile(os.path.join(REPO, m.script)):
            summary["notes"].append(f"{m.name}: {m.script} is not in the repository yet")
            continue
        entry = {"script": m.script, "runs": {}}
        for seed in args.seeds:
            folder = run_dir(args, m.name, seed)
            state, detail = states.get((m.name, seed), ("fresh", ""))  # a script may appear mid-run
            if state not in ("finished", "ran"):
                if state != "failed":  # failures are listed below with their log
                    summary["notes"].append(f"{m.name} seed{seed}: {'not run' if state == 'fresh' else state}"
                                            f"{': ' + detail if detail else ''}")
                continue
            results = read_json(os.path.join(folder, "results.json"))
            step, with_startup = step_seconds(os.path.join(folder, "metrics.jsonl"))
            entry["runs"][str(seed)] = {"dir": folder, "miou": results["miou"],
                                        "per_class_iou": results.get("per_class_iou", {}),
                                        "seconds": results.get("seconds"), "step_seconds": step,
                                        "step_includes_startup": with_startup}
            if detail:
                summary["notes"].append(f"{m.name} seed{seed}: {detail}")
        runs = list(entry["runs"].values())
        if not runs:
            continue
        entry["miou_mean"], entry["miou_std"] = mean_std([r["miou"] for r in runs])
        classes = list(runs[0]["per_class_iou"])
        entry["per_class_mean"] = {c: mean_std([r["per_class_iou"].get(c) for r in runs])[0] for c in classes}
        entry["wall_mean"] = mean_std([r["seconds"] for r in runs if r["seconds"] is not None])[0]
        entry["step_mean"] = mean_std([r["step_seconds"] for r in runs if r["step_seconds"] is not None])[0]
        summary["methods"][m.name] = entry
    base = summary["methods"].get(BASELINE)
    for entry in summary["methods"].values():
        entry["gain"] = entry["miou_mean"] - base["miou_mean"] if base else None
        entry["step_relative"] = (entry["step_mean"] / base["step_mean"]
                                  if base and entry["step_mean"] and base.get("step_mean") else None)
    summary["notes"] += failures
    return summary


# ----------------------------------------------------------------------------------------------------
# Markdown
def fmt(value, digits=2, signed=False):
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(summary, image_dir):
    """The report as Markdown; pictures are linked from image_dir (relative to the file it lands in)."""
    budget = f"--iters {summary['iters']}" if summary["iters"] else f"the {summary['preset']} preset's iterations"
    lines = [f"`{summary['source']}` → `{summary['target']}`, `--preset {summary['preset']}`, {budget}"
             + (f", extra flags `{summary['extra']}`" if summary["extra"] else "")
             + f"; seeds {', '.join(map(str, summary['seeds']))}. Generated by `benchmarks/compare.py`.", "",
             "| method | script | seeds | mIoU (mean ± std) | vs source-only | wall (s) | s/iter | step time vs "
             "source-only |", "|---|---|---|---|---|---|---|---|"]
    for name, e in summary["methods"].items():
        miou = fmt(e["miou_mean"]) + (f" ± {fmt(e['miou_std'])}" if e["miou_std"] is not None else "")
        startup = any(r["step_includes_startup"] for r in e["runs"].values())
        step = fmt(e["step_mean"], 3) + ("*" if startup else "")
        lines.append(f"| {name} | `{e['script']}` | {len(e['runs'])} | {miou} | {fmt(e['gain'], signed=True)} | "
                     f"{fmt(e['wall_mean'], 0)} | {step} | {fmt(e['step_relative'])}x |"
                     if e["step_relative"] is not None else
                     f"| {name} | `{e['script']}` | {len(e['runs'])} | {miou} | {fmt(e['gain'], signed=True)} | "
                     f"{fmt(e['wall_mean'], 0)} | {step} | – |")
    lines += ["", "Step time: median seconds per training iteration from metrics.jsonl (first logging interval "
              "and evaluations left out; * = only the first interval was logged, start-up included). "
              "Batch sizes differ between scripts. Wall: results.json `seconds`. Std: over seeds (n−1)."]
    classes = []
    for e in summary["methods"].values():
        classes += [c for c in e["per_class_mean"] if c not in classes]
    if classes:
        lines += ["", "Per-class IoU (mean over seeds):", "",
                  "| method | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for name, e in summary["methods"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(e["per_class_mean"].get(c), 1) for c in classes) + " |")
    lines += ["", f"![mIoU per method]({image_dir}/miou.png)", "",
              f"![image, ground truth and each method's prediction]({image_dir}/grid.png)"]
    if summary["notes"]:
        lines += ["", "Not in the table or worth knowing:", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def update_marked(path, text):
    """Replace the text between the compare markers of `path`; False (untouched) without both markers."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        content = f.read()
    begin, end = content.find(MARK_BEGIN), content.find(MARK_END)
    if begin < 0 or end < begin:
        return False
    content = content[:begin + len(MARK_BEGIN)] + "\n" + text + content[end:]
    with open(path, "w") as f:
        f.write(content)
    return True


# ----------------------------------------------------------------------------------------------------
# Pictures (Pillow only)
def bar_chart(summary, path):
    """Horizontal bars of mIoU per method with ± std whiskers and a line at source-only."""
    entries = [(n, e) for n, e in summary["methods"].items()]
    font = ImageFont.load_default()
    label_w, bar_w, row_h, top = 130, 480, 26, 40
    width, height = label_w + bar_w + 110, top + row_h * max(1, len(entries)) + 40
    top_value = max([e["miou_mean"] + (e["miou_std"] or 0) for _, e in entries] + [10])
    scale_max = min(100, 10 * int(top_value / 10 + 1))
    x_of = lambda v: label_w + bar_w * v / scale_max  # noqa: E731
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), f"target mIoU (%), {short(summary['source'])} -> {short(summary['target'])}; whiskers: "
                        f"± std over seeds; red dashes: {BASELINE}", fill="black", font=font)
    bottom = top + row_h * len(entries)
    for tick in range(0, scale_max + 1, 10):
        draw.line([(x_of(tick), top - 4), (x_of(tick), bottom)], fill=(225, 225, 225))
        draw.text((x_of(tick) - 6, bottom + 4), str(tick), fill="black", font=font)
    for i, (name, e) in enumerate(entries):
        y = top + i * row_h
        colour = (150, 150, 150) if name in (BASELINE, "oracle") else (60, 110, 180)
        draw.text((10, y + 7), name, fill="black", font=font)
        draw.rectangle([x_of(0), y + 4, x_of(e["miou_mean"]), y + row_h - 4], fill=colour)
        if e["miou_std"]:
            lo, hi = x_of(max(0, e["miou_mean"] - e["miou_std"])), x_of(e["miou_mean"] + e["miou_std"])
            mid = y + row_h / 2
            draw.line([(lo, mid), (hi, mid)], fill="black", width=2)
            draw.line([(lo, mid - 5), (lo, mid + 5)], fill="black", width=2)
            draw.line([(hi, mid - 5), (hi, mid + 5)], fill="black", width=2)
        text = fmt(e["miou_mean"]) + (f" ± {fmt(e['miou_std'])}" if e["miou_std"] else "")
        draw.text((x_of(e["miou_mean"] + (e["miou_std"] or 0)) + 6, y + 7), text, fill="black", font=font)
    base = summary["methods"].get(BASELINE)
    if base:
        x = x_of(base["miou_mean"])
        for y in range(top - 4, bottom, 6):  # dashed
            draw.line([(x, y), (x, y + 3)], fill=(200, 40, 40))
    draw.line([(x_of(0), top - 4), (x_of(0), bottom)], fill="black")
    img.save(path)


def prediction_files(folder):
    """(folder, PNG names) of a run's predictions: <run>/predictions, else (multi-stage scripts that keep
    them per stage) the most recently written <run>/*/predictions."""
    candidates = [os.path.join(folder, "predictions")] + sorted(
        (os.path.join(folder, d, "predictions") for d in os.listdir(folder)),
        key=lambda p: os.path.getmtime(p) if os.path.isdir(p) else 0, reverse=True)
    for candidate in candidates:
        if os.path.isdir(candidate):
            files = sorted(f for f in os.listdir(candidate) if f.endswith(".png"))
            if files:
                return candidate, files
    return None, []


def prediction_grid(summary, path, num_images=4, panel_width=256):
    """Rows: the first shared target-val images; columns: image | ground truth | one prediction per method
    (its first seed with predictions). Returns notes on anything that did not line up."""
    notes, sources = [], {}
    for name, e in summary["methods"].items():
        for seed, run in sorted(e["runs"].items()):
            folder, files = prediction_files(run["dir"])
            if files:
                sources[name] = (folder, set(files))
                break
    shared = sorted(set.intersection(*(files for _, files in sources.values()))) if sources else []
    if sources and len(shared) < num_images:
        notes.append(f"grid: {len(shared)} prediction images are shared by every method")
    shared = shared[:num_images]
    font = ImageFont.load_default()
    if not shared:
        img = Image.new("RGB", (400, 40), "white")
        ImageDraw.Draw(img).text((10, 12), "no shared predictions to show", fill="black", font=font)
        img.save(path)
        return notes + ["grid: no prediction images shared by every method"]
    names = list(sources)
    rows = []
    for file in shared:
        panels, reference_gt = [], None
        for name in names:
            sheet = np.asarray(Image.open(os.path.join(sources[name][0], file)).convert("RGB"))
            w = sheet.shape[1] // 3  # image | ground truth | prediction (save_prediction)
            image, gt, pred = sheet[:, :w], sheet[:, w:2 * w], sheet[:, 2 * w:3 * w]
            if reference_gt is None:
                reference_gt = gt
                panels += [image, gt]
            elif gt.shape != reference_gt.shape or not np.array_equal(gt, reference_gt):
                notes.append(f"grid: {name}'s ground truth for {file} differs from {names[0]}'s")
                pred = np.asarray(Image.fromarray(pred).resize(reference_gt.shape[1::-1], Image.NEAREST))
            panels.append(pred)
        rows.append(panels)
    h, w = rows[0][0].shape[:2]
    pw = min(panel_width, w)
    ph = max(1, round(h * pw / w))
    header, gap = GRID_HEADER, GRID_GAP
    columns = ["image", "ground truth"] + names
    grid = Image.new("RGB", (len(columns) * (pw + gap), header + len(rows) * (ph + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(columns):
        draw.text((j * (pw + gap) + 3, 3), title, fill="black", font=font)
    for i, panels in enumerate(rows):
        for j, panel in enumerate(panels):
            tile = Image.fromarray(panel).resize((pw, ph), Image.NEAREST if j else Image.BILINEAR)
            grid.paste(tile, (j * (pw + gap), header + i * (ph + gap)))
    grid.save(path)
    return notes


# ----------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all",
                   help=f"comma-separated names, or all (default): {', '.join(m.name for m in METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0; papers: 0 1 2)")
    p.add_argument("--source", default="toy-synth", help="source domain or folder dataset (default toy-synth)")
    p.add_argument("--target", default="toy-real", help="target domain or folder dataset (default toy-real)")
    p.add_argument("--preset", default="quick", choices=["quick", "paper"], help="the scripts' --preset (quick)")
    p.add_argument("--iters", type=int, default=None,
                   help="override every script's --iters (the budget becomes part of the run root)")
    p.add_argument("--extra", default="", help="more flags for every script, one string (e.g. \"--eval-limit 2\")")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time; each gets cores/jobs OMP threads (1)")
    p.add_argument("--runs-root", default=os.path.join(REPO, "runs", "compare"), help="default runs/compare")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "compare"), help="report folder")
    p.add_argument("--report-only", action="store_true", help="aggregate the finished runs, start none")
    p.add_argument("--update-benchmarks", action="store_true",
                   help="rewrite the marked section of BENCHMARKS.md and README.md")
    p.add_argument("--overwrite", action="store_true",
                   help="delete and rerun folders whose config disagrees or that hold an abandoned run")
    p.add_argument("--busy-minutes", type=float, default=10.0,
                   help="an unfinished folder changed this recently belongs to a running process (10)")
    p.add_argument("--grid-images", type=int, default=4, help="target-val images in grid.png (4)")
    args = p.parse_args(argv)
    known = {m.name: m for m in METHODS}
    names = list(known) if args.methods == "all" else [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for n in list(names):  # dependencies run too, before their dependents
        names[:0] = [d for d in known[n].depends_on if d not in names]
    args.method_list = [m for m in METHODS if m.name in names]
    return args


def main(argv=None):
    args = parse(argv)
    methods = []
    for m in args.method_list:
        if os.path.isfile(os.path.join(REPO, m.script)):
            methods.append(m)
        else:
            print(f"note: {m.name} skipped, {m.script} is not in the repository yet")
    states = plan(args, methods, Expected(args))
    failures = [] if args.report_only else run_all(args, methods, states)
    summary = collect(args, states, failures)
    os.makedirs(args.out, exist_ok=True)
    bar_chart(summary, os.path.join(args.out, "miou.png"))
    summary["notes"] += prediction_grid(summary, os.path.join(args.out, "grid.png"), args.grid_images)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown(summary, "."))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"report: {os.path.join(args.out, 'table.md')}, miou.png, grid.png, summary.json")
    if args.update_benchmarks:
        for doc in ("BENCHMARKS.md", "README.md"):
            path = os.path.join(REPO, doc)
            rel = os.path.relpath(args.out, os.path.dirname(path))
            if update_marked(path, markdown(summary, rel)):
                print(f"updated the compare section of {doc}")
            else:
                print(f"note: {doc} has no {MARK_BEGIN} ... {MARK_END} markers; left untouched")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
