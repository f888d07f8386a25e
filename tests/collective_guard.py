"""Run a script with every torch.distributed collective checked for host tensors, on CPU and gloo.

NCCL refuses a CPU tensor in a collective, gloo takes it: a tensor made with `torch.zeros(n)` (no device)
and all-reduced passes every CPU test and crashes the first multi-GPU run. On a CPU machine the run's device
*is* the CPU, so the device alone cannot tell. This guard tracks where tensors come from instead:

- a tensor made by a factory (`torch.zeros`, `torch.tensor`, `torch.from_numpy`, ...) without a `device=`
  argument, or by `.cpu()`/`.numpy()`-style round trips, is a *host* tensor;
- whatever is computed from a host tensor is a host tensor; `.to(device)`/`.cuda()` makes a device tensor;
- parameters are never host tensors (modules are moved with `.to(device)` as a whole);
- a host tensor handed to a collective (all_reduce, broadcast, all_gather, reduce_scatter, ...) stops the
  run with an error naming the collective: on NCCL that call would have failed.

Usage (what the tests do): `python -m torch.distributed.run --nproc_per_node 2 tests/collective_guard.py
<script>.py <flags...>`. The script runs as `__main__`, unchanged.
"""
import os
import runpy
import sys
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FACTORIES = {"tensor", "as_tensor", "asarray", "zeros", "ones", "full", "empty", "arange", "linspace", "logspace",
             "from_numpy", "randn", "rand", "randint", "randperm", "eye", "scalar_tensor", "empty_strided"}
COLLECTIVES = ["all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single", "all_to_all"]


class HostTensors(TorchFunctionMode):
    """Marks host tensors (see the module docstring) by object identity, without keeping them alive."""

    def __init__(self):
        super().__init__()
        self.host = {}  # id(tensor) -> weak reference (a WeakSet would compare tensors with ==)

    def is_host(self, tensor):
        if not isinstance(tensor, torch.Tensor) or isinstance(tensor, torch.nn.Parameter):
            return False
        ref = self.host.get(id(tensor))
        return ref is not None and ref() is tensor

    def mark(self, tensor, host):
        key = id(tensor)
        if host:
            self.host[key] = weakref.ref(tensor, lambda _, key=key, table=self.host: table.pop(key, None))
        else:
            self.host.pop(key, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in FACTORIES and not name.endswith("_like"):
            host = kwargs.get("device") is None
        elif name in ("to", "cuda"):
            moved = name == "cuda" or kwargs.get("device") is not None or any(
                isinstance(a, (torch.device, str, int)) for a in args[1:2])
            host = not moved and any(self.is_host(a) for a in tree_flatten((args, kwargs))[0])
        elif name == "cpu":
            host = True
        else:
            host = any(self.is_host(a) for a in tree_flatten((args, kwargs))[0])
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not isinstance(tensor, torch.nn.Parameter):
                self.mark(tensor, host)
        return out


def guard_collectives(mode):
    """Wrap the torch.distributed collectives so that a host tensor in any of them raises."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def checked(*args, _original=original, _name=name, **kwargs):
            for tensor in tree_flatten((args, kwargs))[0]:
                if mode.is_host(tensor):
                    raise RuntimeError(f"collective_guard: torch.distributed.{_name} got a tensor made on the host "
                                       f"(shape {tuple(tensor.shape)}, {tensor.dtype}); NCCL refuses CPU tensors: "
                                       f"create it with device= the run's device or move it with .to(device)")
            return _original(*args, **kwargs)

        setattr(dist, name, checked)


def main():
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, ROOT)
    mode = HostTensors()
    guard_collectives(mode)
    with mode:
        runpy.run_path(os.path.join(ROOT, script) if not os.path.isabs(script) else script, run_name="__main__")


if __name__ == "__main__":
    main()
