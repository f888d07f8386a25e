"""Checkpoints: one dict, written atomically, loaded with weights_only=True, resumed exactly.

A checkpoint holds everything a script needs to continue as if never stopped: networks, optimisers,
the GradScaler, the iteration, the RNG states (python, numpy, torch, CUDA), plus `script` and
`num_classes` so a checkpoint from another script or class count is refused with a clear message.
RNG states and arguments are stored as tensors, lists and plain dicts (weights_only forbids pickles).

The authors' own files (released models, init files) are read here too, always with weights_only=True:
`read_weights_file` admits numpy scalars (ProDA pickles its best mIoU as numpy.float64) through torch's
safe-globals allow-list and nothing else; each script maps the keys to its own modules and
`load_matching` copies them, so that every tensor of a network is either loaded or listed.
"""
import os
import random
import sys
import warnings

import numpy as np
import torch
from numpy._core import multiarray as _np_multiarray

from common.cli import UserError

# numpy scalar types that released files carry in their pickles (old numpy names them numpy.core.*)
NUMPY_SAFE_GLOBALS = [_np_multiarray.scalar, (_np_multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype,
                      *{type(np.dtype(code)) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")}]


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


def read_weights_file(path, flag="--init"):
    """torch.load(path, weights_only=True), numpy scalars admitted; a missing or unreadable file is one line."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except UnicodeDecodeError:  # a Python 2 pickle (LSD-seg's checkpoints): its byte strings are latin1
                with warnings.catch_warnings():  # torch warns that encoding is ignored; legacy files honour it
                    warnings.filterwarnings("ignore", "pickle_load_args only works")
                    return torch.load(path, map_location="cpu", weights_only=True, encoding="latin1")
    except Exception as e:  # truncated, not a torch file, or a pickle with objects beyond tensors and numbers
        message = " ".join(str(e).split())
        if "Unsupported global" in message:
            message = message[message.index("Unsupported global"):].split(" was not")[0]
        raise UserError(f"cannot load {flag} {path}: {message[:200]}") from None


def _groups(names, depth=2) -> str:
    """'head.convs.0.weight', 'head.convs.0.bias', ... -> 'head.convs.*' (a short list for one line)."""
    seen = []
    for name in names:
        parts = name.split(".")
        stem = ".".join(parts[:depth]) + ".*" if len(parts) > depth else name
        if stem not in seen:
            seen.append(stem)
    return ", ".join(seen[:8]) + (f" and {len(seen) - 8} more" if len(seen) > 8 else "")


def load_matching(module, state: dict, source: str, required=None, unused_ok=None, quiet=False) -> dict:
    """Copy every tensor of `state` whose name and shape fit `module` (names already mapped to the module's).

    A file saved by torch < 0.4.1 has no BN `num_batches_tracked`: those counters start at 0, as torch's own
    loader does. Every other tensor of the module is either loaded or listed: `required(name)` true for a
    module tensor that did not load is a UserError; the rest is printed in one line (kept at its current
    value, e.g. a head at random init). File tensors that fit nothing are listed too, or refused where
    `unused_ok(name)` is false (a file evaluated as it is must not hold a bigger network). Returns the counts.
    """
    own = module.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    misshapen = [k for k in state if k in own and k not in fits]
    missing = [k for k in own if k not in fits and not k.endswith("num_batches_tracked")]
    unused = [k for k in state if k not in own]
    fatal = [k for k in missing if required is not None and required(k)]
    fatal += [k for k in unused if unused_ok is not None and not unused_ok(k)]
    if fatal:
        detail = f"; misshapen: {_groups(misshapen)}" if misshapen else ""
        raise UserError(f"{source} does not fit this network: {len(fatal)} tensors missing, misshapen or left over "
                        f"({_groups(fatal)}{detail}); pass the flags the file was made with")
    module.load_state_dict(fits, strict=False)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in fits:
            module.state_dict()[k].zero_()
    if not quiet:
        parts = [f"loaded {len(fits)} of {len(own)} tensors from {source}"]
        if missing:
            parts.append(f"not in the file, kept as initialised: {_groups(missing)}")
        if unused:
            parts.append(f"in the file but not in this network: {_groups(unused)}")
        print("; ".join(parts), file=sys.stderr if missing or unused else sys.stdout, flush=True)
    return {"loaded": len(fits), "missing": missing, "unused": unused}
