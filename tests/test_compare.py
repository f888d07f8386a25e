"""benchmarks/compare.py end to end on cheap runs (with the AdaBN tool), its control/verdict logic on synthetic
run folders, and its step-time and config-matching helpers."""
import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare  # noqa: E402

TINY = "--eval-limit 2 --num-workers 0 --source-size 32 64 --target-size 32 64 --log-every 1"


def compare_cmd(tmp_path, *more):
    return ["benchmarks/compare.py", "--methods", "source_only,source_only+adabn,oracle", "--seeds", "0", "--iters",
            "2", "--extra", TINY, "--adabn-batches", "2", "--runs-root", str(tmp_path / "runs"),
            "--out", str(tmp_path / "report"), *more]


def first_table(markdown):
    """{first cell: cells} of the body rows of the first table in a Markdown text."""
    rows, started = {}, False
    for line in markdown.splitlines():
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] != "method" and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


def table_rows(table_md):
    """{method: cells} of the main table (the first table in the file, 11 columns)."""
    rows = first_table(table_md)
    assert all(len(cells) == 11 for cells in rows.values()), rows
    return rows


def test_compare_runs_controls_writes_report_and_does_not_rerun(tmp_path):
    first = run_script(*compare_cmd(tmp_path, "--jobs", "2"), timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    root = tmp_path / "runs" / "toy-synth_toy-real-iters2"
    names = ("source_only", "source_only+adabn", "oracle")
    results = {name: json.loads((root / name / "seed0" / "results.json").read_text()) for name in names}
    oracle_config = json.loads((root / "oracle" / "seed0" / "config.json").read_text())
    assert oracle_config["args"]["source"] == "toy-real" and oracle_config["args"]["iters"] == 2

    # AdaBN: the source run's network, evaluated by source_only.py itself with the run's arguments, where
    # only the BN running statistics differ from the source checkpoint
    import torch
    source_ckpt = root / "source_only" / "seed0" / "checkpoints" / "last.pt"
    adabn_ckpt = root / "source_only+adabn" / "seed0" / "checkpoints" / "last.pt"
    record = results["source_only+adabn"]["adabn"]
    assert record["source_sha256"] == hashlib.sha256(source_ckpt.read_bytes()).hexdigest()
    assert record["frames"] == 2 * 4 and record["source_miou"] == results["source_only"]["miou"]
    assert record["frame_size"] == [32, 64] and record["bn_layers"] > 0
    source_state = torch.load(source_ckpt, weights_only=True)["model"]
    adabn_state = torch.load(adabn_ckpt, weights_only=True)["model"]
    assert source_state.keys() == adabn_state.keys()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    changed = {k for k in source_state if not torch.equal(source_state[k], adabn_state[k])}
    assert changed and all(k.endswith(stats) for k in changed)
    assert all(adabn_state[k].item() == 2 for k in adabn_state if k.endswith("num_batches_tracked"))
    adabn_config = json.loads((root / "source_only+adabn" / "seed0" / "config.json").read_text())
    source_config = json.loads((root / "source_only" / "seed0" / "config.json").read_text())
    assert adabn_config["script"] == "source_only" and adabn_config["args"]["eval_only"]
    own = ("eval_only", "weights", "out", "normalization")  # normalisation: passed as the run resolved it
    assert {k: v for k, v in adabn_config["args"].items() if k not in own} == \
        {k: v for k, v in source_config["args"].items() if k not in own}
    assert adabn_config["normalization"] == source_config["normalization"] == "imagenet"

    report = tmp_path / "report"
    for name in ("table.md", "miou.png", "grid.png", "summary.json"):
        assert (report / name).is_file(), name
    rows = table_rows((report / "table.md").read_text())
    assert set(rows) == set(names)
    for name, res in results.items():
        assert float(rows[name][3].split("±")[0]) == round(res["miou"], 2)
        assert float(rows[name][8]) == round(res["seconds"])
    assert rows["source_only+adabn"][1] == "`benchmarks/adabn.py`" and rows["source_only+adabn"][5] == "control"
    assert rows["oracle"][5] == "reference" and rows["oracle"][7] == "–"
    gain = results["oracle"]["miou"] - results["source_only"]["miou"]
    assert float(rows["oracle"][4]) == round(gain, 2)
    per_class = [line for line in (report / "table.md").read_text().splitlines() if line.startswith("| oracle |")][1]
    first_class = next(iter(results["oracle"]["per_class_iou"]))
    assert float(per_class.split("|")[2]) == round(results["oracle"]["per_class_iou"][first_class], 1)

    summary = json.loads((report / "summary.json").read_text())
    assert summary["methods"]["oracle"]["runs"]["0"]["miou"] == results["oracle"]["miou"]
    assert summary["methods"]["source_only"]["step_relative"] == 1.0

    # the chart: one grey bar per row (all three are controls or the reference), lengths in proportion
    chart = np.asarray(Image.open(report / "miou.png").convert("RGB"))
    grey_per_row = (chart == (150, 150, 150)).all(-1).sum(1)
    bars, group = [], []
    for count in list(grey_per_row) + [0]:  # groups of consecutive rows holding grey pixels, top to bottom
        if count:
            group.append(count)
        elif group:
            bars += [max(group)] if len(group) >= 10 else []  # a bar is 18 rows tall; text has a few grey pixels
            group = []
    assert len(bars) == 3, bars
    so, orc = results["source_only"]["miou"], results["oracle"]["miou"]
    assert abs(bars[0] * orc - bars[2] * so) <= 2 * max(so, orc)  # within 2 pixels

    # the grid: image | ground truth | one column per row of the table, two shared val images (eval limit 2),
    # each panel cropped from the runs' predictions/ sheets (image | ground truth | prediction)
    grid = np.asarray(Image.open(report / "grid.png").convert("RGB"))
    for row, name in enumerate(["00000.png", "00001.png"]):
        for column, method in enumerate(names, start=2):
            sheet = np.asarray(Image.open(root / method / "seed0" / "predictions" / name).convert("RGB"))
            h, w = sheet.shape[0], sheet.shape[1] // 3
            y, x = compare.GRID_HEADER + row * (h + compare.GRID_GAP), column * (w + compare.GRID_GAP)
            assert np.array_equal(grid[y:y + h, x:x + w], sheet[:, 2 * w:]), (name, method)
            assert np.array_equal(grid[y:y + h, w + compare.GRID_GAP:2 * w + compare.GRID_GAP], sheet[:, w:2 * w])

    mtimes = {n: os.path.getmtime(root / n / "seed0" / "results.json") for n in results}
    third = run_script(*compare_cmd(tmp_path), timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert third.returncode == 0, third.stderr[-3000:]
    for name in names:
        assert re.search(rf"skipped {re.escape(name)} seed0: finished run", third.stdout), third.stdout
    assert "running" not in third.stdout
    assert mtimes == {n: os.path.getmtime(root / n / "seed0" / "results.json") for n in results}
    assert table_rows((report / "table.md").read_text()) == rows

    # benchmarks/class_fractions.py on two of the runs: the truth row is the label share of the scored
    # val images, and each row's shares sum to 100
    shares = run_script("benchmarks/class_fractions.py", f"so={root / 'source_only' / 'seed0'}",
                        f"or={root / 'oracle' / 'seed0'}", "--limit", "2", timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert shares.returncode == 0, shares.stderr[-3000:]
    table = {line.split("|")[1].strip(): [float(v) for v in line.strip().strip("|").split("|")[1:]]
             for line in shares.stdout.splitlines() if line.startswith("| ") and "pixels" not in line}
    assert set(table) == {"source train labels", "target val labels", "so", "or"}
    from common.data import domain_split
    val = domain_split("toy-real", "val")
    counts = sum(np.bincount(val.load_label(i).ravel(), minlength=256)[:8] for i in range(2))
    assert np.allclose(table["target val labels"], 100 * counts / counts.sum(), atol=0.051)
    assert all(abs(sum(row) - 100) < 0.5 for row in table.values())


def test_step_time_leaves_out_startup_and_evaluations(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iter": 10, "seg_src": 1, "seconds": 50.0},  # start-up interval: left out
            {"iter": 20, "seg_src": 1, "seconds": 60.0},  # 1.0 s/iter
            {"iter": 20, "val_miou": 3.0, "seconds": 90.0},
            {"iter": 30, "seg_src": 1, "seconds": 100.0},  # holds the evaluation: left out
            {"iter": 40, "seg_src": 1, "seconds": 112.0},  # 1.2
            {"iter": 50, "seg_src": 1, "seconds": 126.0}]  # 1.4
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert compare.step_seconds(path) == (1.2, False)
    path.write_text(json.dumps(rows[0]) + "\n")
    assert compare.step_seconds(path) == (5.0, True)


def test_config_matching_and_commands():
    args = compare.parse(["--methods", "advent_ensemble", "--iters", "20", "--extra", "--no-amp --crop-size 64 64"])
    assert [m.name for m in args.method_list] == ["source_only", "source_only+adabn", "advent", "advent_minent_er",
                                                  "advent_ensemble"]  # its dependencies and controls
    ensemble = args.method_list[-1]
    argv = compare.command(args, ensemble, 1)
    root = os.path.join(args.runs_root, "toy-synth_toy-real-iters20")
    assert os.path.join(root, "advent", "seed1", "checkpoints", "last.pt") in argv
    assert argv[-1] == os.path.join(root, "advent_ensemble", "seed1")
    flags = compare.explicit_flags(argv[1:])
    assert flags["amp"] is False and flags["crop_size"] == ["64", "64"] and flags["seed"] == ["1"]
    config = {"seed": 1, "iters": 20, "amp": False, "crop_size": [64, 64], "out": "elsewhere", "lr": 0.01}
    assert compare.args_disagree(config, flags) == []
    assert compare.args_disagree({**config, "iters": 300}, flags) == ["iters=300 (expected 20.0)"]
    oracle = next(m for m in compare.METHODS if m.name == "oracle")
    assert compare.explicit_flags(compare.command(args, oracle, 0)[1:])["source"] == ["toy-real"]


def test_missing_scripts_are_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "METHODS", compare.METHODS + [compare.Method("future", "future_method.py")])
    code = compare.main(["--methods", "future", "--report-only", "--runs-root", str(tmp_path / "runs"),
                         "--out", str(tmp_path / "report")])
    assert code == 0
    assert "future skipped, future_method.py is not in the repository yet" in capsys.readouterr().out
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["methods"] == {} and any("future_method.py" in n for n in summary["notes"])
    assert (tmp_path / "report" / "grid.png").is_file() and (tmp_path / "report" / "miou.png").is_file()


def test_update_marked_replaces_only_the_marked_section(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Hand-written\nkeep\n{compare.MARK_BEGIN}\nold table\n{compare.MARK_END}\nkeep too\n")
    assert compare.update_marked(str(doc), "new table\n")
    assert doc.read_text() == f"# Hand-written\nkeep\n{compare.MARK_BEGIN}\nnew table\n{compare.MARK_END}\nkeep too\n"
    unmarked = tmp_path / "README.md"
    unmarked.write_text("no markers\n")
    assert not compare.update_marked(str(unmarked), "new table\n") and unmarked.read_text() == "no markers\n"


def test_controls_and_their_commands():
    args = compare.parse(["--methods", "fcn_wild,lsdseg,daformer", "--adabn-batches", "7"])
    assert [m.name for m in args.method_list] == [
        "source_only", "source_only+adabn", "fcn_wild_source_only", "fcn_wild", "lsdseg_source_only", "lsdseg",
        "daformer_source_only", "daformer_source_only+adabn", "daformer"]
    by_name = {m.name: m for m in args.method_list}
    assert compare.controls_of(by_name["daformer"]) == ("source_only", "source_only+adabn", "daformer_source_only",
                                                        "daformer_source_only+adabn")
    assert compare.controls_of(by_name["source_only+adabn"]) == ()
    flags = {name: compare.explicit_flags(compare.command(args, by_name[name], 1)[1:])
             for name in ("fcn_wild_source_only", "lsdseg_source_only", "daformer_source_only")}
    assert flags["fcn_wild_source_only"]["global_alignment"] is False
    assert flags["fcn_wild_source_only"]["category_alignment"] is False
    import fcn_wild  # the flags name real fields of the script
    assert {"global_alignment", "category_alignment"} <= set(fcn_wild.Args.__dataclass_fields__)
    assert flags["lsdseg_source_only"]["adv_weight"] == ["0"] and flags["lsdseg_source_only"]["c_weight"] == ["0"]
    assert flags["daformer_source_only"]["source_only"] is True
    for flag in flags.values():  # the method's own budget: the same preset, seed and iterations
        assert flag["preset"] == ["quick"] and flag["seed"] == ["1"] and "iters" not in flag
    root = os.path.join(args.runs_root, "toy-synth_toy-real")
    assert compare.command(args, by_name["daformer_source_only+adabn"], 1) == [
        os.path.join(ROOT, "benchmarks", "adabn.py"), os.path.join(root, "daformer_source_only", "seed1"),
        "--batches", "7", "--out", os.path.join(root, "daformer_source_only+adabn", "seed1")]


def test_pairs_option():
    args = compare.parse(["--pairs", "toy-synth:toy-real", "toy2-synth:toy2-real"])
    assert args.pair_list == [("toy-synth", "toy-real"), ("toy2-synth", "toy2-real")]
    assert compare.parse(["--target", "toy2-real"]).pair_list == [("toy-synth", "toy2-real")]
    assert compare.parse([]).pair_list == [("toy-synth", "toy-real")]
    for bad in (["--pairs", "toy-synth"], ["--pairs", "a:b", "--source", "a"], ["--pairs", "a:b", "a:b"],
                ["--adabn-batches", "0"]):
        with pytest.raises(SystemExit):
            compare.parse(bad)


def entry(mious):
    """A summary entry with one run per seed ({seed: mIoU})."""
    return {"runs": {str(seed): {"miou": m} for seed, m in mious.items()}}


def test_strongest_control_and_the_beat_rule():
    method = entry({0: 24, 1: 22, 2: 26})
    controls = {"source_only": entry({0: 15, 1: 16, 2: 17}), "source_only+adabn": entry({0: 20, 1: 21, 2: 22})}
    v = compare.strongest_control(method, controls)
    assert v["strongest_control"] == "source_only+adabn" and v["control_miou"] == 21
    assert v["gain_vs_control"] == 3 and v["gain_std"] == pytest.approx(3 ** 0.5)  # per-seed gains 4, 1, 4
    assert v["gain_seeds"] == [0, 1, 2] and v["beats"] is True
    v = compare.strongest_control(entry({0: 33, 1: 30, 2: 36}), {"a": entry({0: 30, 1: 31, 2: 35})})
    assert v["gain_vs_control"] == 1 and v["gain_std"] == 2 and v["beats"] is False  # gains 3, -1, 1
    # a control is judged on the seeds it shares with the method: here b is stronger on seed 0 only
    v = compare.strongest_control(entry({0: 30}), {"a": entry({0: 20, 1: 40}), "b": entry({0: 25, 1: 10})})
    assert v["strongest_control"] == "b" and v["gain_vs_control"] == 5 and v["beats"] is None
    assert compare.strongest_control(entry({0: 30}), {"a": entry({1: 20})})["strongest_control"] is None
    # a constant gain has std 0: any positive gain beats it, a zero gain does not
    assert compare.strongest_control(entry({0: 21, 1: 22}), {"a": entry({0: 20, 1: 21})})["beats"] is True
    assert compare.strongest_control(entry({0: 20, 1: 21}), {"a": entry({0: 20, 1: 21})})["beats"] is False


# synthetic finished runs: {pair: {method: {seed: mIoU}}}
SYNTHETIC = {
    ("toy-synth", "toy-real"): {
        "source_only": {0: 15, 1: 16, 2: 17}, "source_only+adabn": {0: 20, 1: 21, 2: 22},
        "advent": {0: 24, 1: 22, 2: 26},  # beats source_only+adabn: gains 4, 1, 4 (3 ± 1.73)
        "adaptsegnet": {0: 18, 1: 19, 2: 20},  # below it: -2 ± 0
        "daformer_source_only": {0: 10, 1: 12, 2: 14}, "daformer_source_only+adabn": {0: 30, 1: 31, 2: 35},
        "daformer": {0: 33, 1: 30, 2: 36}},  # vs its own network with AdaBN: 1 ± 2, does not beat it
    ("toy2-synth", "toy2-real"): {
        "source_only": {0: 20, 1: 20, 2: 20}, "source_only+adabn": {0: 25, 1: 26, 2: 27},
        "advent": {0: 25, 1: 27, 2: 26},  # 0 ± 1
        "adaptsegnet": {0: 30},  # one seed: undecided
        "daformer_source_only": {0: 28, 1: 28, 2: 28}, "daformer_source_only+adabn": {0: 27, 1: 27, 2: 27},
        "daformer": {0: 38, 1: 40, 2: 42}},  # vs daformer_source_only: 12 ± 2
}
SCRIPTS = {"source_only": "source_only", "advent": "advent", "adaptsegnet": "adaptsegnet",
           "daformer_source_only": "daformer", "daformer": "daformer"}


def write_synthetic_runs(runs_root):
    for (source, target), methods in SYNTHETIC.items():
        for name, mious in methods.items():
            for seed, miou in mious.items():
                folder = runs_root / f"{source}_{target}" / name / f"seed{seed}"
                (folder / "checkpoints").mkdir(parents=True)
                results = {"miou": miou, "per_class_iou": {"road": miou, "car": miou / 2}, "seconds": 10.0}
                if name.endswith("+adabn"):  # made from the current checkpoint of its source run
                    source_ckpt = folder.parent.parent / name.split("+")[0] / f"seed{seed}" / "checkpoints" / "last.pt"
                    results["adabn"] = {"source_sha256": hashlib.sha256(source_ckpt.read_bytes()).hexdigest(),
                                        "batches": 100}
                else:
                    (folder / "checkpoints" / "last.pt").write_bytes(f"{name} {seed} {target}".encode())
                (folder / "results.json").write_text(json.dumps(results))
                (folder / "config.json").write_text(json.dumps({"script": SCRIPTS.get(name, "source_only"),
                                                                "args": {}}))


def test_report_judges_each_method_against_its_strongest_control_on_each_pair(tmp_path, monkeypatch):
    write_synthetic_runs(tmp_path / "runs")
    monkeypatch.setattr(compare.Expected, "prefetch", lambda self, methods: None)  # no dry runs: args {} agree
    monkeypatch.setattr(compare.Expected, "__call__", lambda self, method, seed: ({}, None))
    argv = ["--pairs", "toy-synth:toy-real", "toy2-synth:toy2-real", "--seeds", "0", "1", "2", "--methods",
            "advent,adaptsegnet,daformer", "--report-only", "--runs-root", str(tmp_path / "runs"),
            "--out", str(tmp_path / "report")]
    assert compare.main(argv) == 0
    report = tmp_path / "report"
    verdicts = json.loads((report / "summary.json").read_text())["verdicts"]
    assert {n: v["beats_any"] for n, v in verdicts.items()} == {"adaptsegnet": None, "advent": True, "daformer": True}
    assert [p["strongest_control"] for p in verdicts["daformer"]["pairs"]] == ["daformer_source_only+adabn",
                                                                                "daformer_source_only"]
    combined = first_table((report / "table.md").read_text())
    assert combined["advent"][1:] == ["+3.00 ± 1.73 vs source_only+adabn: yes",
                                      "+0.00 ± 1.00 vs source_only+adabn: no", "yes"]
    assert combined["adaptsegnet"][1:] == ["-2.00 ± 0.00 vs source_only+adabn: no",
                                           "+5.00 vs source_only+adabn: undecided (1 seed)", "undecided"]
    assert combined["daformer"][1:] == ["+1.00 ± 2.00 vs daformer_source_only+adabn: no",
                                        "+12.00 ± 2.00 vs daformer_source_only: yes", "yes"]
    first = table_rows((report / "toy-synth_toy-real" / "table.md").read_text())
    assert first["daformer"][3:8] == ["33.00 ± 3.00", "+17.00", "daformer_source_only+adabn (32.00)", "+1.00 ± 2.00",
                                      "no"]
    assert first["source_only+adabn"][5:8] == ["control", "–", "–"]
    for pair in ("toy-synth_toy-real", "toy2-synth_toy2-real"):
        for name in ("table.md", "miou.png", "grid.png", "summary.json"):
            assert (report / pair / name).is_file(), (pair, name)
    assert "### `toy2-synth` → `toy2-real`" in (report / "table.md").read_text()
    assert "](toy2-synth_toy2-real/miou.png)" in (report / "table.md").read_text()

    # an AdaBN run made from another checkpoint of its source run is not counted
    (tmp_path / "runs" / "toy2-synth_toy2-real" / "source_only" / "seed2" / "checkpoints" / "last.pt").write_bytes(b"x")
    assert compare.main(argv) == 0
    second = json.loads((report / "toy2-synth_toy2-real" / "summary.json").read_text())
    assert set(second["methods"]["source_only+adabn"]["runs"]) == {"0", "1"}
    assert any(n.startswith("source_only+adabn seed2: mismatch: made from another checkpoint") for n in second["notes"])
