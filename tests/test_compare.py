"""benchmarks/compare.py end to end on two cheap runs, plus its step-time and config-matching helpers."""
import json
import os
import re
import sys

import numpy as np
from PIL import Image

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare  # noqa: E402

TINY = "--eval-limit 2 --num-workers 0 --source-size 32 64 --target-size 32 64 --log-every 1"


def compare_cmd(tmp_path, *more):
    return ["benchmarks/compare.py", "--methods", "source_only,oracle", "--seeds", "0", "--iters", "2",
            "--extra", TINY, "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), *more]


def table_rows(table_md):
    """{method: cells} of the main table (the first table in the file)."""
    rows = {}
    for line in table_md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8 and cells[0] not in ("method",):
            rows[cells[0]] = cells
    return rows


def test_compare_two_methods_writes_report_and_does_not_rerun(tmp_path):
    first = run_script(*compare_cmd(tmp_path, "--jobs", "2"), timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    root = tmp_path / "runs" / "toy-synth_toy-real-iters2"
    results = {name: json.loads((root / name / "seed0" / "results.json").read_text())
               for name in ("source_only", "oracle")}
    oracle_config = json.loads((root / "oracle" / "seed0" / "config.json").read_text())
    assert oracle_config["args"]["source"] == "toy-real" and oracle_config["args"]["iters"] == 2

    report = tmp_path / "report"
    for name in ("table.md", "miou.png", "grid.png", "summary.json"):
        assert (report / name).is_file(), name
    rows = table_rows((report / "table.md").read_text())
    assert set(rows) == {"source_only", "oracle"}
    for name, res in results.items():
        assert float(rows[name][3].split("±")[0]) == round(res["miou"], 2)
        assert float(rows[name][5]) == round(res["seconds"])
    gain = results["oracle"]["miou"] - results["source_only"]["miou"]
    assert float(rows["oracle"][4]) == round(gain, 2)
    per_class = [line for line in (report / "table.md").read_text().splitlines() if line.startswith("| oracle |")][1]
    first_class = next(iter(results["oracle"]["per_class_iou"]))
    assert float(per_class.split("|")[2]) == round(results["oracle"]["per_class_iou"][first_class], 1)

    summary = json.loads((report / "summary.json").read_text())
    assert summary["methods"]["oracle"]["runs"]["0"]["miou"] == results["oracle"]["miou"]
    assert summary["methods"]["source_only"]["step_relative"] == 1.0

    # the chart: one grey bar per method (both are baselines), lengths in proportion to the two mIoUs
    chart = np.asarray(Image.open(report / "miou.png").convert("RGB"))
    grey_per_row = (chart == (150, 150, 150)).all(-1).sum(1)
    bars, group = [], []
    for count in list(grey_per_row) + [0]:  # groups of consecutive rows holding grey pixels, top to bottom
        if count:
            group.append(count)
        elif group:
            bars += [max(group)] if len(group) >= 10 else []  # a bar is 18 rows tall; text has a few grey pixels
            group = []
    assert len(bars) == 2, bars
    so, orc = results["source_only"]["miou"], results["oracle"]["miou"]
    assert abs(bars[0] * orc - bars[1] * so) <= 2 * max(so, orc)  # within 2 pixels

    # the grid: image | ground truth | source_only | oracle, two shared val images (eval limit 2), each
    # panel cropped from the runs' predictions/ sheets (image | ground truth | prediction)
    grid = np.asarray(Image.open(report / "grid.png").convert("RGB"))
    for row, name in enumerate(["00000.png", "00001.png"]):
        for column, method in ((2, "source_only"), (3, "oracle")):
            sheet = np.asarray(Image.open(root / method / "seed0" / "predictions" / name).convert("RGB"))
            h, w = sheet.shape[0], sheet.shape[1] // 3
            y, x = compare.GRID_HEADER + row * (h + compare.GRID_GAP), column * (w + compare.GRID_GAP)
            assert np.array_equal(grid[y:y + h, x:x + w], sheet[:, 2 * w:]), (name, method)
            assert np.array_equal(grid[y:y + h, w + compare.GRID_GAP:2 * w + compare.GRID_GAP], sheet[:, w:2 * w])

    mtimes = {n: os.path.getmtime(root / n / "seed0" / "results.json") for n in results}
    third = run_script(*compare_cmd(tmp_path), timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert third.returncode == 0, third.stderr[-3000:]
    assert re.search(r"skipped source_only seed0: finished run", third.stdout), third.stdout
    assert re.search(r"skipped oracle seed0: finished run", third.stdout), third.stdout
    assert "running" not in third.stdout
    assert mtimes == {n: os.path.getmtime(root / n / "seed0" / "results.json") for n in results}
    assert table_rows((report / "table.md").read_text()) == rows

    # benchmarks/class_fractions.py on the same two runs: the truth row is the label share of the scored
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
    assert [m.name for m in args.method_list] == ["advent", "advent_minent", "advent_ensemble"]
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
