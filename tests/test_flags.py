"""Every flag a script accepts is read somewhere: a flag that is accepted and ignored is a silent lie.

Static: each non-runtime field of a script's `Args` must be read as `args.<field>` (or `getattr(args, ...)`
with its name) somewhere in the script outside the Args class, or in common/ (the shared helpers that take
the whole `args`). Whether a flag acts in every mode is each script's own tests' business (e.g. a
refused value); this test catches the flag nobody reads.
"""
import ast
import dataclasses
import glob
import importlib
import os

import pytest

from conftest import ROOT

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def reads(path, skip_class=None) -> set:
    """Names X read as `<name>.X` where <name> is args-like (args, a, cfg, run_args) or via getattr(args, "X")."""
    tree = ast.parse(open(path).read())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == skip_class:
            skipped |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            out.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            out.add(node.args[1].value)
    return out


# read by common/ (the helpers that take the whole args); `preset` is consumed by common.cli.parse_args itself
COMMON_READS = set().union(*(reads(p) for p in glob.glob(os.path.join(ROOT, "common", "*.py")))) | {"preset"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_read(script):
    module = importlib.import_module(script)
    if not hasattr(module, "Args"):
        pytest.skip("no Args")
    used = reads(os.path.join(ROOT, f"{script}.py"), skip_class="Args") | COMMON_READS
    fields = [f.name for f in dataclasses.fields(module.Args) if not f.metadata.get("runtime")]
    unread = [f for f in fields if f not in used]
    assert unread == [], f"{script}.py accepts flags it never reads: {', '.join('--' + f.replace('_', '-') for f in unread)}"
