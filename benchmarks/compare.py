"""Side-by-side comparison: run every method script, its controls (source-only, AdaBN, the method's own
network trained on source only) and a target-trained oracle for several seeds on one or more domain pairs,
then write tables, a bar chart and a prediction grid per pair.

    python benchmarks/compare.py                                  # --preset quick on the toy pair, seed 0
    python benchmarks/compare.py --seeds 0 1 2 --jobs 2           # 3 seeds, two runs at a time
    python benchmarks/compare.py --pairs toy-synth:toy-real toy2-synth:toy2-real --seeds 0 1 2 --jobs 2
    python benchmarks/compare.py --source gta --target cityscapes --preset paper --methods source_only,advent
    python benchmarks/compare.py --report-only --update-benchmarks   # aggregate what exists, run nothing

Runs land in the standard run folder of interface.md at
`<runs-root>/<source>_<target>[-iters<N>]/<method>/seed<k>/` (runs at another `--iters` budget get another
root, so they never mix). A run is *finished* when it has results.json and its config.json agrees with what
this tool would run: the resolved arguments of the script's own `--dry-run` for the same command (minus
out, resume, num_workers, which do not change results). Finished runs are never rerun; a run with
checkpoints/last.pt but no results.json is resumed (`--resume auto`); a folder whose files changed in the
last `--busy-minutes` is assumed to be training in another process and left alone; a finished run whose
config disagrees is reported and left alone unless `--overwrite`. A run whose dependency is (re)run is
rerun after it.

Controls. Every method is compared with the strongest of the controls that apply to it: source_only.py
(the same seeds, its quick budget), source_only+adabn (that model with its BatchNorm statistics
re-estimated on target train frames by benchmarks/adabn.py, the AdaBN baseline: what target frames through
train-mode BN give for free) and, for the scripts whose network is not source_only.py's DeepLab-v2, the same
script with its adaptation switched off at the method's own budget and seeds (fcn_wild_source_only:
`--no-global-alignment --no-category-alignment`; lsdseg_source_only: `--adv-weight 0 --c-weight 0`;
daformer_source_only: `--source-only`, also with AdaBN, as its decode head has BN). Selecting a method
selects its controls.
- Strongest control: the highest mean mIoU over the seeds it shares with the method.
- Gain: the mean over those seeds of (method - control) at the same seed; ± the standard deviation of
  that per-seed difference (n-1).
- Beats: gain > that standard deviation (undecided with fewer than 2 shared seeds). With several pairs, a
  combined table says whether each method beats its strongest control on at least one pair.

Report (`--out`, default benchmarks/compare/; with several pairs one sub-folder per pair plus a combined
table.md and summary.json): table.md (mIoU mean ± std over seeds, gain over source-only and over the
strongest control, wall time, training step time relative to source_only.py, per-class IoU), miou.png (bars
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
    script: str  # file in the repository root (or ADABN)
    args: list = field(default_factory=list)  # added after the shared flags; {target}, {dep[name]} are filled in
    depends_on: tuple = ()  # methods whose run (same seed) must have finished first
    role: str = "method"  # method: judged against its controls; control: a baseline; reference: the oracle
    same_network: tuple = ()  # controls with this method's own network, beside SHARED_CONTROLS


ADABN = "benchmarks/adabn.py"  # a control made from another run's checkpoint: no training, no shared flags
# ----------------------------------------------------------------------------------------------------
# The methods, in table order. Edit this table to add a method.
METHODS = [
    Method("source_only", "source_only.py", role="control"),
    Method("source_only+adabn", ADABN, ["{dep[source_only]}"], ("source_only",), role="control"),
    Method("oracle", "source_only.py", ["--source", "{target}"], role="reference"),  # trained on the target's labels
    Method("fcn_wild_source_only", "fcn_wild.py", ["--no-global-alignment", "--no-category-alignment"],
           role="control"),
    Method("fcn_wild", "fcn_wild.py", same_network=("fcn_wild_source_only",)),
    Method("adaptsegnet", "adaptsegnet.py"),
    Method("advent", "advent.py", ["--mode", "advent"]),
    Method("advent_minent", "advent.py", ["--mode", "minent"]),
    Method("advent_minent_er", "advent.py", ["--mode", "minent", "--entropy-top-fraction", "0.3"]),
    Method("advent_ensemble", "advent.py",  # test-time ensemble AdvEnt + MinEnt+ER (the official 45.5, ADVENT #7)
           ["--mode", "advent", "--eval-only", "--weights", "{dep[advent]}/checkpoints/last.pt",
            "--weights", "{dep[advent_minent_er]}/checkpoints/last.pt"], ("advent", "advent_minent_er")),
    Method("lsdseg_source_only", "lsdseg.py", ["--adv-weight", "0", "--c-weight", "0"], role="control"),
    Method("lsdseg", "lsdseg.py", same_network=("lsdseg_source_only",)),
    Method("bdl", "bdl.py"),
    Method("proda", "proda.py"),
    Method("self_regulation", "self_regulation.py"),
    Method("daformer_source_only", "daformer.py", ["--source-only"], role="control"),
    Method("daformer_source_only+adabn", ADABN, ["{dep[daformer_source_only]}"], ("daformer_source_only",),
           role="control"),
    Method("daformer", "daformer.py", same_network=("daformer_source_only", "daformer_source_only+adabn")),
]
BASELINE = "source_only"
SHARED_CONTROLS = ("source_only", "source_only+adabn")  # controls of every method
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


def controls_of(method):
    """The controls a method is judged against (none for controls and the reference)."""
    return SHARED_CONTROLS + method.same_network if method.role == "method" else ()


def command(args, method, seed):
    """The argument list (after `python`) of one run."""
    deps = {dep: run_dir(args, dep, seed) for dep in method.depends_on}
    if method.script == ADABN:
        return [os.path.join(REPO, ADABN), *(a.format(dep=deps) for a in method.args),
                "--batches", str(args.adabn_batches), "--out", run_dir(args, method.name, seed)]
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


def adabn_disagrees(args, method, seed, results):
    """Why a finished AdaBN folder does not belong to its source run's checkpoint or to --adabn-batches
    (None if it does)."""
    from adabn import sha256_of  # imports torch: only when there is an AdaBN folder to check
    record = (results or {}).get("adabn") or {}
    source = os.path.join(run_dir(args, method.depends_on[0], seed), "checkpoints", "last.pt")
    if not os.path.isfile(source):
        return f"its source run {method.depends_on[0]} has no checkpoints/last.pt"
    if record.get("source_sha256") != sha256_of(source):
        return f"made from another checkpoint than {method.depends_on[0]}'s current one"
    if record.get("batches") != args.adabn_batches:
        return f"batches={record.get('batches')!r} (expected {args.adabn_batches})"
    return None


def classify(args, method, seed, expected):
    """(state, detail) of one run folder: fresh, busy, mismatch, finished, resume or stale."""
    folder = run_dir(args, method.name, seed)
    if not os.path.isdir(folder) or not os.listdir(folder):
        return "fresh", ""
    finished = os.path.isfile(os.path.join(folder, "results.json"))
    age = time.time() - newest_change(folder)
    if not finished and age < args.busy_minutes * 60:  # checked first: never touch a run in progress
        return "busy", f"files changed {age:.0f} s ago: another process seems to be training it"
    if method.script == ADABN:  # evaluation only: checked against its source checkpoint, never resumed
        if not finished:
            return "stale", "no results.json"
        bad = adabn_disagrees(args, method, seed, read_json(os.path.join(folder, "results.json")))
        return ("mismatch", bad) if bad else ("finished", "")
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
    existing = [m for m in methods if m.script != ADABN and any(
        os.path.isfile(os.path.join(run_dir(args, m.name, seed), "config.json")) for seed in args.seeds)]
    expected.prefetch(existing)  # dry runs in parallel, only for methods with run folders to check
    return {(m.name, seed): classify(args, m, seed, expected) for seed in args.seeds for m in methods}


def run_all(args, plans):
    """Start every unfinished run of every pair, at most args.jobs at a time, dependencies first.
    plans: [(pair_args, methods, states)]; each `states` is updated. Returns each pair's failures, one line each."""
    env = child_env(args.jobs)
    todo = []  # (pair index, method, seed, resume)
    for p, (pa, methods, states) in enumerate(plans):
        for seed in pa.seeds:
            rerun = set()  # runs of this seed that start afresh or resume: their dependents are stale
            for m in methods:
                state, detail = states[m.name, seed]
                folder = run_dir(pa, m.name, seed)
                stale_deps = [d for d in m.depends_on if d in rerun]
                if stale_deps and state in ("finished", "mismatch", "stale"):
                    print(f"rerunning {m.name} seed{seed}: {', '.join(stale_deps)} is run again")
                    state = "stale"
                if state == "finished":
                    print(f"skipped {m.name} seed{seed}: finished run in {folder} {detail}".rstrip())
                elif state == "busy" or (state == "mismatch" and not args.overwrite):
                    print(f"skipped {m.name} seed{seed}: {detail} ({folder}"
                          f"{'; --overwrite replaces it' if state == 'mismatch' else ''})")
                else:
                    if state in ("mismatch", "stale") and os.path.isdir(folder):  # nothing to resume from
                        shutil.rmtree(folder)
                    todo.append((p, m, seed, state == "resume"))
                    states[m.name, seed] = ("pending", "")
                    rerun.add(m.name)
    failed, running = [[] for _ in plans], []
    while todo or running:
        for item in list(todo):
            p, m, seed, resume = item
            pa, _, states = plans[p]
            deps = [states.get((d, seed), ("missing", ""))[0] for d in m.depends_on]
            if any(s not in ("finished", "ran", "pending", "running") for s in deps):
                todo.remove(item)
                states[m.name, seed] = ("failed", "")
                failed[p].append(f"{m.name} seed{seed}: not run, a run it depends on ({', '.join(m.depends_on)}) "
                                 f"is missing or failed")
                print("failed", failed[p][-1], flush=True)
                continue
            if any(s in ("pending", "running") for s in deps):
                continue  # wait for the dependency
            if len(running) >= args.jobs:
                break
            todo.remove(item)
            argv = command(pa, m, seed) + (["--resume", "auto"] if resume else [])
            log_dir = os.path.join(run_root(pa), "logs")
            os.makedirs(log_dir, exist_ok=True)
            log_path = os.path.join(log_dir, f"{m.name}_seed{seed}.log")
            shown = " ".join(shlex.quote(os.path.relpath(a) if a.startswith(REPO) else a) for a in argv)
            print(f"{'resuming' if resume else 'running'} {m.name} seed{seed}: python {shown}", flush=True)
            log_file = open(log_path, "a")
            proc = subprocess.Popen([sys.executable, *argv], stdout=log_file, stderr=subprocess.STDOUT, env=env)
            states[m.name, seed] = ("running", "")
            running.append((p, m, seed, proc, log_file, log_path, time.time()))
        for entry in list(running):
            p, m, seed, proc, log_file, log_path, start = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            log_file.close()
            pa, _, states = plans[p]
            if proc.returncode == 0 and os.path.isfile(os.path.join(run_dir(pa, m.name, seed), "results.json")):
                states[m.name, seed] = ("ran", "")
                print(f"finished {m.name} seed{seed} in {time.time() - start:.0f} s", flush=True)
            else:
                states[m.name, seed] = ("failed", "")
                with open(log_path) as f:
                    text = f.read().replace("\r", "\n")  # tqdm redraws its bar with carriage returns
                    tail = [line.strip() for line in text.splitlines() if line.strip()][-1:] or [""]
                failed[p].append(f"{m.name} seed{seed}: exit {proc.returncode}: {tail[0][:200]} (log {log_path})")
                print("failed", failed[p][-1], flush=True)
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


def strongest_control(entry, controls):
    """Which of `controls` ({name: summary entry}) a method's `entry` is judged against, and by how much it
    beats it: the control with the highest mean mIoU over the seeds it shares with the method; the gain is
    the mean over those seeds of (method - control) at the same seed, its std the std of that per-seed
    difference (n-1); beats = gain > std (None, undecided, with fewer than 2 shared seeds)."""
    best = None
    for name, control in controls.items():
        seeds = sorted(set(entry["runs"]) & set(control["runs"]), key=int)
        if seeds:
            mean = statistics.fmean(control["runs"][s]["miou"] for s in seeds)
            if best is None or mean > best[1]:
                best = (name, mean, seeds)
    if best is None:
        return {"strongest_control": None, "control_miou": None, "gain_vs_control": None, "gain_std": None,
                "gain_seeds": [], "beats": None}
    name, mean, seeds = best
    gain, std = mean_std([entry["runs"][s]["miou"] - controls[name]["runs"][s]["miou"] for s in seeds])
    return {"strongest_control": name, "control_miou": mean, "gain_vs_control": gain, "gain_std": std,
            "gain_seeds": [int(s) for s in seeds], "beats": None if std is None else gain > std}


def collect(args, states, failures):
    """summary.json's content: every finished run's numbers, each method's aggregate and its verdict
    against the strongest control."""
    summary = {"source": args.source, "target": args.target, "preset": args.preset, "iters": args.iters,
               "extra": args.extra, "seeds": args.seeds, "root": run_root(args), "methods": {}, "notes": []}
    for m in args.method_list:
        if not os.path.isfile(os.path.join(REPO, m.script)):
            summary["notes"].append(f"{m.name}: {m.script} is not in the repository yet")
            continue
        entry = {"script": m.script, "role": m.role, "runs": {}}
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
    for m in args.method_list:
        if m.role == "method" and m.name in summary["methods"]:
            controls = {c: summary["methods"][c] for c in controls_of(m) if c in summary["methods"]}
            summary["methods"][m.name].update(strongest_control(summary["methods"][m.name], controls))
    summary["notes"] += failures
    return summary


# ----------------------------------------------------------------------------------------------------
# Markdown
def fmt(value, digits=2, signed=False):
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


VERDICT_WORDS = {True: "yes", False: "no", None: "undecided"}


def verdict(entry):
    """yes / no / undecided (fewer than 2 seeds shared with the control) / no control run."""
    if entry.get("strongest_control") is None:
        return "no control run"
    return VERDICT_WORDS[entry["beats"]] + (" (1 seed)" if entry["beats"] is None else "")


def gain_text(entry):
    text = fmt(entry["gain_vs_control"], signed=True)
    if entry["gain_std"] is not None:
        text += f" ± {fmt(entry['gain_std'])}"
    if len(entry["gain_seeds"]) < len(entry["runs"]):  # the control lacks some of the method's seeds
        text += f" (seeds {', '.join(map(str, entry['gain_seeds']))})"
    return text


CONTROL_FOOTNOTE = (
    "Controls: source_only (`source_only.py`); source_only+adabn: that model with every BatchNorm's statistics "
    "re-estimated on target train frames (AdaBN, `benchmarks/adabn.py`), what target frames through train-mode BN "
    "give without any adaptation loss; `<script>_source_only`: the method's own network with its adaptation "
    "switched off, at its budget and seeds (fcn_wild `--no-global-alignment --no-category-alignment`, lsdseg "
    "`--adv-weight 0 --c-weight 0`, daformer `--source-only`, also with AdaBN). Strongest control: the control with "
    "the highest "
    "mean mIoU over the seeds it shares with the method (the mIoU in brackets). Gain: the mean over those seeds "
    "of method − control at the same seed, ± the standard deviation of that per-seed difference (n−1). Beats: "
    "gain > that standard deviation; undecided with one shared seed.")


STEP_FOOTNOTE = (
    "Step time: median seconds per training iteration from metrics.jsonl (first logging interval and evaluations "
    "left out; * = only the first interval was logged, start-up included). Batch sizes differ between scripts. "
    "Wall: results.json `seconds` (AdaBN: re-estimation and evaluation). Std: over seeds (n−1).")


def markdown(summary, image_dir, footnotes=True):
    """The report as Markdown; pictures are linked from image_dir (relative to the file it lands in);
    footnotes=False leaves out the definitions (a combined report states them once)."""
    budget = f"--iters {summary['iters']}" if summary["iters"] else f"the {summary['preset']} preset's iterations"
    lines = [f"`{summary['source']}` → `{summary['target']}`, `--preset {summary['preset']}`, {budget}"
             + (f", extra flags `{summary['extra']}`" if summary["extra"] else "")
             + f"; seeds {', '.join(map(str, summary['seeds']))}. Generated by `benchmarks/compare.py`.", "",
             "| method | script | seeds | mIoU (mean ± std) | vs source-only | strongest control (mIoU) | gain vs it "
             "(± std) | beats it? | wall (s) | s/iter | step time vs source-only |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary["methods"].items():
        miou = fmt(e["miou_mean"]) + (f" ± {fmt(e['miou_std'])}" if e["miou_std"] is not None else "")
        startup = any(r["step_includes_startup"] for r in e["runs"].values())
        step = fmt(e["step_mean"], 3) + ("*" if startup else "")
        relative = f"{fmt(e['step_relative'])}x" if e["step_relative"] is not None else "–"
        if e.get("role", "method") != "method":
            control, gain, beats = e.get("role", "–"), "–", "–"
        elif e.get("strongest_control") is None:
            control, gain, beats = "–", "–", verdict(e)
        else:
            control, gain, beats = f"{e['strongest_control']} ({fmt(e['control_miou'])})", gain_text(e), verdict(e)
        lines.append(f"| {name} | `{e['script']}` | {len(e['runs'])} | {miou} | {fmt(e['gain'], signed=True)} | "
                     f"{control} | {gain} | {beats} | {fmt(e['wall_mean'], 0)} | {step} | {relative} |")
    if footnotes:
        lines += ["", CONTROL_FOOTNOTE, "", STEP_FOOTNOTE]
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


def pair_verdicts(summaries):
    """{method: {"pairs": [verdict entry or None per pair], "beats_any": True/False/None}} for every method
    row: True if it beats its strongest control on at least one pair, False if it is decided and beats it on
    none, None (undecided) otherwise."""
    names = []
    for summary in summaries:
        names += [n for n, e in summary["methods"].items() if e.get("role") == "method" and n not in names]
    verdicts = {}
    for name in names:
        entries = [summary["methods"].get(name) for summary in summaries]
        decided = [e["beats"] for e in entries if e is not None and e.get("beats") is not None]
        beats_any = True if any(decided) else (False if len(decided) == len(entries) else None)
        verdicts[name] = {"pairs": [None if e is None else {k: e[k] for k in (
            "strongest_control", "control_miou", "gain_vs_control", "gain_std", "gain_seeds", "beats")}
            for e in entries], "beats_any": beats_any}
    return verdicts


def combined_markdown(summaries, image_dirs):
    """Several pairs: the verdict table across pairs, then each pair's report."""
    verdicts = pair_verdicts(summaries)
    heads = [f"`{s['source']}` → `{s['target']}`" for s in summaries]
    lines = ["Does each method beat its strongest control by more than one standard deviation of its per-seed "
             "gain, on at least one pair? Each cell: gain ± std vs that control, and the verdict (definitions "
             "below). Generated by `benchmarks/compare.py`.", "",
             "| method | " + " | ".join(heads) + " | beats the strongest control on at least one pair |",
             "|---|" + "---|" * (len(heads) + 1)]
    if not verdicts:
        lines += ["| (no method rows: only controls and the reference were run) |" + " |" * (len(heads) + 1)]
    for name, v in verdicts.items():
        cells = []
        for summary in summaries:
            e = summary["methods"].get(name)
            if e is None:
                cells.append("not run")
            elif e.get("strongest_control") is None:
                cells.append("no control run")
            else:
                cells.append(f"{gain_text(e)} vs {e['strongest_control']}: {verdict(e)}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {VERDICT_WORDS[v['beats_any']]} |")
    lines += ["", CONTROL_FOOTNOTE, "", STEP_FOOTNOTE]
    for head, summary, image_dir in zip(heads, summaries, image_dirs):
        lines += ["", f"### {head}", "", markdown(summary, image_dir, footnotes=False).rstrip("\n")]
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
    label_w, bar_w, row_h, top = 180, 480, 26, 40  # label_w: the longest row name, 26 characters
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
        colour = (150, 150, 150) if e.get("role") in ("control", "reference") else (60, 110, 180)
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
                   help=f"comma-separated names, or all (default): {', '.join(m.name for m in METHODS)}; a "
                        f"method's controls and dependencies are selected with it")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0; papers: 0 1 2)")
    p.add_argument("--source", default=None, help="source domain or folder dataset (default toy-synth)")
    p.add_argument("--target", default=None, help="target domain or folder dataset (default toy-real)")
    p.add_argument("--pairs", nargs="+", default=None, metavar="SOURCE:TARGET",
                   help="several domain pairs in one invocation (instead of --source/--target), e.g. "
                        "toy-synth:toy-real toy2-synth:toy2-real: one report per pair plus a combined verdict")
    p.add_argument("--preset", default="quick", choices=["quick", "paper"], help="the scripts' --preset (quick)")
    p.add_argument("--iters", type=int, default=None,
                   help="override every script's --iters (the budget becomes part of the run root)")
    p.add_argument("--extra", default="", help="more flags for every training script, one string "
                                               "(e.g. \"--eval-limit 2\")")
    p.add_argument("--adabn-batches", type=int, default=100,
                   help="target train batches (of the source run's batch size) for the AdaBN controls (100)")
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
    if args.pairs and (args.source or args.target):
        p.error("give either --pairs or --source/--target")
    args.pair_list = []
    for pair in args.pairs or [f"{args.source or 'toy-synth'}:{args.target or 'toy-real'}"]:
        source, sep, target = pair.partition(":")
        if not (sep and source and target) or ":" in target:
            p.error(f"--pairs takes SOURCE:TARGET, got {pair!r}")
        if (source, target) in args.pair_list:
            p.error(f"--pairs names {pair} twice")
        args.pair_list.append((source, target))
    args.source, args.target = args.pair_list[0]
    if args.adabn_batches < 1:
        p.error("--adabn-batches must be at least 1")
    known = {m.name: m for m in METHODS}
    names = list(known) if args.methods == "all" else [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = set()
    while names:  # each method's dependencies and controls (and theirs) run too
        name = names.pop()
        if name not in wanted:
            wanted.add(name)
            names += [*known[name].depends_on, *controls_of(known[name])]
    args.method_list = [m for m in METHODS if m.name in wanted]  # table order: dependencies come first
    return args


def pair_args(args, source, target):
    """args for one domain pair (run folders, commands and the report use args.source/args.target)."""
    return argparse.Namespace(**{**vars(args), "source": source, "target": target})


def write_report(summary, out, grid_images):
    """table.md, miou.png, grid.png and summary.json of one pair in `out`."""
    os.makedirs(out, exist_ok=True)
    bar_chart(summary, os.path.join(out, "miou.png"))
    summary["notes"] += prediction_grid(summary, os.path.join(out, "grid.png"), grid_images)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown(summary, "."))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def main(argv=None):
    args = parse(argv)
    methods = []
    for m in args.method_list:
        if os.path.isfile(os.path.join(REPO, m.script)):
            methods.append(m)
        else:
            print(f"note: {m.name} skipped, {m.script} is not in the repository yet")
    pairs = [pair_args(args, source, target) for source, target in args.pair_list]
    plans = [(pa, methods, plan(pa, methods, Expected(pa))) for pa in pairs]
    failures = [[] for _ in pairs] if args.report_only else run_all(args, plans)
    summaries = [collect(pa, states, failed) for (pa, _, states), failed in zip(plans, failures)]
    if len(pairs) == 1:
        outs = [args.out]
    else:  # one folder per pair, the combined verdict on top
        outs = [os.path.join(args.out, f"{short(pa.source)}_{short(pa.target)}") for pa in pairs]
    for summary, out in zip(summaries, outs):
        write_report(summary, out, args.grid_images)
    if len(pairs) > 1:
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(combined_markdown(summaries, [os.path.relpath(out, args.out) for out in outs]))
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"pairs": summaries, "verdicts": pair_verdicts(summaries)}, f, indent=1)
    print(f"report: {os.path.join(args.out, 'table.md')}" + (", miou.png, grid.png, summary.json" if len(pairs) == 1
                                                              else f" and one folder per pair in {args.out}"))
    if args.update_benchmarks:
        for doc in ("BENCHMARKS.md", "README.md"):
            path = os.path.join(REPO, doc)
            rels = [os.path.relpath(out, os.path.dirname(path)) for out in outs]
            text = markdown(summaries[0], rels[0]) if len(pairs) == 1 else combined_markdown(summaries, rels)
            if update_marked(path, text):
                print(f"updated the compare section of {doc}")
            else:
                print(f"note: {doc} has no {MARK_BEGIN} ... {MARK_END} markers; left untouched")
    return 1 if any(failures) else 0


if __name__ == "__main__":
    sys.exit(main())
