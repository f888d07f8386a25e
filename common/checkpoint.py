"""Checkpoints: one dict, written atomically, loaded with weights_only=True, resumed exactly.

A checkpoint holds everything a script needs to continue as if never stopped: networks, optimisers,
the GradScaler, the iteration, the RNG states (python, numpy, torch, CUDA), plus `script` and
`num_classes` so a checkpoint from another script or class count is refused with a clear message.
RNG states and arguments are stored as tensors, lists and plain dicts (weights_only forbids pickles).
"""
import os
import random

import numpy as np
import torch

from common.cli import UserError


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                               has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict):
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


def save_checkpoint(path, state: dict):
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file.
    Weights that went non-finite are never written: the previous checkpoint stays the last good one."""
    if not _all_finite({k: v for k, v in state.items() if k != "rng"}):
        raise UserError(f"non-finite weights at iteration {state.get('iter')}; stopped, the last good checkpoint "
                        f"{path} is left intact")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, script=None, num_classes=None) -> dict:
    """Load one of our checkpoints; refuse another script's or another class count's."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with objects, not a torch file at all
        raise UserError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by one of this repository's scripts")
    if script is not None and ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}, not {script}")
    if num_classes is not None and ckpt.get("num_classes") != num_classes:
        raise UserError(f"{path} has {ckpt.get('num_classes')} classes, this run has {num_classes}")
    return ckpt


def load_weights(module, state: dict):
    """load_state_dict, with a one-line error when the checkpoint was trained with other network flags."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise UserError(f"the checkpoint's weights do not fit the network these flags build ({detail}); "
                        f"pass the flags it was trained with") from None


def resume_path(resume, out_dir):
    """`--resume auto`: the run folder's last.pt if it exists (else start fresh); a path: that file."""
    if resume is None:
        return None
    if resume == "auto":
        path = os.path.join(out_dir, "checkpoints", "last.pt")
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume}: no such checkpoint file")
    return resume
