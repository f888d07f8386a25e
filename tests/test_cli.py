"""Args dataclass -> argparse: help text for every field of every script, presets, flag kinds."""
import dataclasses
import glob
import importlib
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from common.cli import field_docs, parse_args
from conftest import ROOT


@dataclass
class Demo:
    preset: Literal["paper", "quick"] = "paper"
    """which recipe"""
    iters: int = 100
    """iterations"""
    amp: bool = True
    """mixed precision"""
    crop_size: Optional[list[int]] = None
    """crop H [W]"""
    weights: list[str] = field(default_factory=list)
    """checkpoints"""
    lr: float = 0.1
    """learning rate"""


PRESETS = {"paper": {}, "quick": {"iters": 5, "lr": 0.5}}


def test_presets_fill_only_unset_flags():
    args = parse_args(Demo, PRESETS, ["--preset", "quick", "--lr", "0.25"])
    assert args.iters == 5 and args.lr == 0.25  # preset value, explicit flag wins
    assert parse_args(Demo, PRESETS, []).iters == 100


def test_flag_kinds():
    args = parse_args(Demo, PRESETS, ["--no-amp", "--crop-size", "512", "256", "--weights", "a.pt", "--weights", "b.pt"])
    assert args.amp is False and args.crop_size == [512, 256] and args.weights == ["a.pt", "b.pt"]
    assert parse_args(Demo, PRESETS, ["--crop-size", "none"]).crop_size is None
    # one rule for every list flag: several values after one flag, or the flag repeated, or both
    assert parse_args(Demo, PRESETS, ["--weights", "a.pt", "b.pt"]).weights == ["a.pt", "b.pt"]
    assert parse_args(Demo, PRESETS, ["--crop-size", "512", "--crop-size", "256"]).crop_size == [512, 256]
    assert parse_args(Demo, PRESETS, ["--weights", "a", "b", "--weights", "c"]).weights == ["a", "b", "c"]
    assert parse_args(Demo, PRESETS, []).weights == [] and parse_args(Demo, PRESETS, []).crop_size is None


def test_explicit_flags_are_recorded():
    args = parse_args(Demo, PRESETS, ["--preset", "quick", "--lr", "0.25", "--weights", "a.pt"])
    assert args.given == {"preset", "lr", "weights"}  # iters came from the preset: not given
    assert "given" not in dataclasses.asdict(args)
    with pytest.raises(SystemExit):
        parse_args(Demo, PRESETS, ["--preset", "fast"])


SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_field_of_every_script_has_help(script):
    module = importlib.import_module(script)
    if not hasattr(module, "Args"):
        pytest.skip("no Args")
    docs = field_docs(module.Args)
    missing = [f.name for f in dataclasses.fields(module.Args) if not f.metadata.get("runtime") and not docs.get(f.name)]
    assert missing == []
    assert set(module.PRESETS) >= {"paper", "quick"}
    for values in module.PRESETS.values():
        assert set(values) <= {f.name for f in dataclasses.fields(module.Args)}
