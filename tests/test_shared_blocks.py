"""The blocks every script shares by design are textually identical wherever they appear.

`diff source_only.py <method>.py` (docs/diffs.md) should show the method and nothing else, so the shared
blocks must not drift. Compared, by source text:
- definitions that source_only.py owns (the DeepLab-v2 model, its init loader, the loss and schedule
  helpers), in every script that defines a top-level name of that name (ast.get_source_segment);
- the output-space discriminator and its losses, owned by adaptsegnet.py;
- the `# TRY NOT TO MODIFY: <title>` blocks of main() (setup, run folder/resume, evaluation and checkpoint,
  training loop, logging, final evaluation), matched by title, owned by source_only.py.
A script that does not define a block (fcn_wild.py has a VGG, not DeepLabV2) is fine. A script whose block
differs fails, unless EXCEPTIONS lists it with a reason:
- "extends": the script adds lines to the block (say, saving its discriminators in the checkpoint); every
  line of the owner's block must still be there, in order (a line may continue where the owner's closes
  its brackets, as when a checkpoint dict gets more entries);
- "differs": the block is deliberately different; only its presence is checked.
An exception for a block that has become identical fails too, so the table stays true.
"""
import ast
import difflib
import functools
import os
import re

import pytest

from conftest import ROOT

SCRIPTS = ["source_only", "fcn_wild", "adaptsegnet", "advent", "lsdseg", "bdl", "proda", "self_regulation",
           "daformer"]
# top-level definitions compared against their owner script
SHARED_DEFINITIONS = {
    "source_only": ["BasicBlock", "Bottleneck", "RESNETS", "ASPP", "DeepLabV2", "read_weights", "resnet_of",
                    "load_init", "prepare_weights", "seg_loss", "poly_lr", "set_lr"],
    "adaptsegnet": ["FCDiscriminator", "SOURCE_LABEL", "gan_loss", "discriminator_loss", "generator_loss",
                    "set_requires_grad", "softmax_at"],
}
# the marked blocks of main(), by title, owned by source_only.py
SHARED_MARKED_BLOCKS = ["setup", "run folder, dry run, resume", "evaluation", "training loop",
                        "logging, evaluation, checkpoints", "final evaluation"]

# (script, block): (kind, reason). Deliberate differences only; anything else is drift to fix.
EXCEPTIONS = {
    ("fcn_wild", "load_init"): ("differs", "VGG-16 front-end, not a DeepLab-v2 ResNet: torchvision VGG weights with "
                                           "fc6/fc7 reshaped into convolutions; files come from read_frontend_weights"),
    ("lsdseg", "load_init"): ("differs", "VGG-16 FCN-8s, not a DeepLab-v2 ResNet: torchvision VGG weights with "
                                         "fc6/fc7 reshaped into convolutions; files come from read_fcn_weights"),
    ("lsdseg", "run folder, dry run, resume"): ("differs", "--eval-only: an FCN-8s file must fit F exactly (no "
                                                           "unsummed ASPP convs may be left over); resumes the "
                                                           "generator, the discriminator and their Adams"),
    ("lsdseg", "evaluation"): ("differs", "the official protocol: predict_nearest (Lanczos input at --eval-size, "
                                          "argmax there, label map nearest-resized to the label size; "
                                          "evaluate_target gets eval_size None and interpolation lanczos); the "
                                          "checkpoint also holds the generator, the discriminator and their Adams"),
    ("daformer", "load_init"): ("differs", "MiT/pvt_v2 encoder from timm (and mmseg checkpoints), not a ResNet"),
    ("fcn_wild", "run folder, dry run, resume"): ("extends", "resumes the domain classifier and one optimiser per "
                                                             "objective (the source phase's SGD included)"),
    ("fcn_wild", "evaluation"): ("extends", "images resized as the third-party loader (interpolation=RESIZE, "
                                            "cv2-bilinear); the checkpoint also holds the domain classifier and the "
                                            "other objectives' optimisers"),
    ("adaptsegnet", "run folder, dry run, resume"): ("extends", "resumes the discriminators (two; one with "
                                                                "--single-level) and their Adams"),
    ("adaptsegnet", "evaluation"): ("extends", "the checkpoint also holds the discriminators and their Adams"),
    ("advent", "run folder, dry run, resume"): ("extends", "records both files of the test-time ensemble, refuses "
                                                           "a checkpoint of the other --mode, resumes the "
                                                           "discriminators and their Adams"),
    ("advent", "evaluation"): ("extends", "the checkpoint also holds the discriminators and their Adams"),
    ("self_regulation", "run folder, dry run, resume"): ("extends", "resumes the side exits"),
    ("self_regulation", "evaluation"): ("extends", "the checkpoint also holds the side exits"),
    ("daformer", "run folder, dry run, resume"): ("differs", "--eval-only loads the student of a DAFormer file "
                                                             "with nothing left over (a release's EMA teacher and "
                                                             "FD copy are set aside when read; no ASPP quirk); "
                                                             "resumes the EMA teacher and the ImageNet feature "
                                                             "encoder"),
    ("daformer", "evaluation"): ("differs", "mmseg's protocol: mmcv-bilinear input resize, logits resized to the "
                                            "input first (logits_at_input), align_corners False; the checkpoint "
                                            "also holds the EMA teacher and the FD encoder"),
    ("daformer", "training loop"): ("extends", "linear learning-rate warm-up on top of the poly schedule"),
    ("bdl", "run folder, dry run, resume"): ("differs", "a multi-stage pipeline: --weights also names the segmenter "
                                                        "that --stage pseudo labels with; --resume's last.pt is "
                                                        "restored by the stage it belongs to (CycleGAN or "
                                                        "segmentation) when the stage loop reaches it"),
    ("bdl", "evaluation"): ("differs", "evaluates the segmenter it is given (each stage's own) with rank 0's BN "
                                      "statistics; --eval-upsample softmax upsamples the softmax as the official "
                                      "evaluation.py; each stage writes its own checkpoints"),
    ("bdl", "logging, evaluation, checkpoints"): ("differs", "inside each segmentation stage's loop: iterations "
                                                             "counted over the chained stages, one checkpoint per "
                                                             "stage with the stage name in it"),
    ("bdl", "final evaluation"): ("differs", "reports the last stage's segmenter and the total segmentation "
                                             "iterations over all stages"),
    ("proda", "setup"): ("extends", "one memory-format name reused by the four stages' networks"),
    ("proda", "run folder, dry run, resume"): ("differs", "a four-stage pipeline: every file it starts from is "
                                                          "recognised up front (prepare_files; `loaded` lists them), "
                                                          "each stage builds its own networks and run sub-folder, the "
                                                          "run-level last.pt names the stage it resumes"),
    ("proda", "evaluation"): ("differs", "evaluates the current stage's network (or the --eval-only file) with its "
                                         "own input normalisation, images resized bilinearly as ProDA's loaders"),
    ("proda", "training loop"): ("differs", "inside train_stage, once per stage: the stage's iterations, poly "
                                            "horizon and optimisers (the warm-up's D Adam too), its own log"),
    ("proda", "logging, evaluation, checkpoints"): ("differs", "per stage: the stage's metrics.jsonl, the --handover "
                                                              "best snapshot, the stage's final weights beside the "
                                                              "run-level resumable last.pt"),
    ("proda", "final evaluation"): ("differs", "per stage: each stage's results.json; the run's results.json is its "
                                               "last stage's, with the iterations of all stages"),
}

MARKER = re.compile(r"^\s*# (TRY NOT TO MODIFY|ALGO LOGIC)\b:?\s*(.*)$")


def script_path(name):
    return os.path.join(ROOT, f"{name}.py")


@functools.lru_cache(maxsize=None)
def definitions(name) -> dict:
    """{top-level class/function/assigned name: its source text}, for the names SHARED_DEFINITIONS lists."""
    with open(script_path(name)) as f:
        text = f.read()
    wanted = {n for names in SHARED_DEFINITIONS.values() for n in names}
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [leaf.id for target in node.targets for leaf in ast.walk(target) if isinstance(leaf, ast.Name)]
        else:
            continue
        for n in set(names) & wanted:
            out[n] = ast.get_source_segment(text, node)
    return out


@functools.lru_cache(maxsize=None)
def marked_blocks(name) -> dict:
    """{title: text} of the `# TRY NOT TO MODIFY: title` blocks: from the marker to the next marker of either
    kind or the end of the top-level function."""
    with open(script_path(name)) as f:
        lines = f.read().splitlines()
    blocks, current = {}, None
    for line in lines:
        marker = MARKER.match(line)
        if marker or re.match(r"^(def|class|if) ", line):
            current = None
        if marker and marker.group(1) == "TRY NOT TO MODIFY":
            current = marker.group(2).strip()
            blocks[current] = []
        elif current is not None:
            blocks[current].append(line)
    return {title: "\n".join(body).rstrip() for title, body in blocks.items()}


def extends(owner_text, text) -> bool:
    """Every line of the owner's block appears in `text`, in order; a line may continue past the point where
    the owner's line closes its brackets (`rng_state()})` -> `rng_state(),` plus more entries)."""
    lines = iter(text.splitlines())
    for want in owner_text.splitlines():
        if not want.strip():
            continue  # blank lines may move
        stem = want.rstrip().rstrip(",)}]")
        if not any(have.rstrip() == want.rstrip() or (stem.strip() and have.startswith(stem)) for have in lines):
            return False
    return True


def compare_block(script, block, owner_text, text):
    """A problem description, or None when the block is as it should be."""
    kind, reason = EXCEPTIONS.get((script, block), (None, None))
    if text == owner_text:
        return f"{block}: identical now, remove its EXCEPTIONS entry" if kind else None
    if kind == "differs":
        return None
    if kind == "extends" and extends(owner_text, text):
        return None
    diff = "\n".join(list(difflib.unified_diff(owner_text.splitlines(), text.splitlines(), "owner", script,
                                               lineterm="", n=0))[2:14])
    expectation = "does not contain the owner's lines in order" if kind == "extends" else "differs"
    return f"{block} {expectation}:\n{diff}"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "source_only"])
def test_shared_blocks_match_their_owner(script):
    if not os.path.isfile(script_path(script)):
        pytest.skip(f"{script}.py is not in the repository yet")
    problems = []
    mine = definitions(script)
    for owner, names in SHARED_DEFINITIONS.items():
        if owner == script:
            continue
        theirs = definitions(owner)
        for name in names:
            if name in mine:
                problems.append(compare_block(script, name, theirs[name], mine[name]))
    owner_blocks, my_blocks = marked_blocks("source_only"), marked_blocks(script)
    for title in SHARED_MARKED_BLOCKS:
        if title in my_blocks:
            problems.append(compare_block(script, title, owner_blocks[title], my_blocks[title]))
    problems = [p for p in problems if p]
    assert not problems, f"{script}.py: shared blocks drifted from their owner:\n\n" + "\n\n".join(problems)


def test_the_lists_name_what_the_owners_define():
    for owner, names in SHARED_DEFINITIONS.items():
        missing = [n for n in names if n not in definitions(owner)]
        assert not missing, f"{owner}.py no longer defines {missing}: update SHARED_DEFINITIONS"
    blocks = marked_blocks("source_only")
    assert [t for t in SHARED_MARKED_BLOCKS if t not in blocks] == []
    assert all(blocks[t].strip() for t in SHARED_MARKED_BLOCKS)
    for (script, block), (kind, reason) in EXCEPTIONS.items():
        assert script in SCRIPTS and kind in ("extends", "differs") and reason
        assert block in SHARED_MARKED_BLOCKS or any(block in names for names in SHARED_DEFINITIONS.values())


def test_the_comparison_catches_drift():
    owner = "        a = f(x)\n        save({'k': 1, 'rng': r()})"
    assert compare_block("adaptsegnet", "training loop", owner, owner) is None
    assert "differs" in compare_block("adaptsegnet", "training loop", owner, owner.replace("f(x)", "g(x)"))
    grown = "        a = f(x)\n        save({'k': 1, 'rng': r(),\n              'disc': d})"
    assert extends(owner, grown) and not extends(owner, grown.replace("'k': 1", "'k': 2"))
    assert "remove its EXCEPTIONS" in compare_block("adaptsegnet", "evaluation", owner, owner)
