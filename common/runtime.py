"""Seeding, device, torchrun/DDP and AMP helpers.

Single-process runs need no flags. Under `torchrun` (RANK set in the environment) every process joins
the group (NCCL on GPU, gloo on CPU); rank 0 logs and checkpoints; the shared seed builds identical
weights on every rank and `seed + rank` drives the data.
"""
import contextlib
import glob
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from common.cli import UserError
from common.runlog import default_run_dir


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


class Runtime:
    """Where this process runs: device, rank, world size, AMP."""

    def __init__(self, device="auto", amp=True):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but no CUDA device is available")
        self.distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", 0)) if self.distributed else 0
        self.world = int(os.environ.get("WORLD_SIZE", 1)) if self.distributed else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.distributed else 0
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            # TF32 matmuls and convolutions belong to the mixed-precision deviation: --no-amp is plain fp32
            torch.backends.cuda.matmul.allow_tf32 = bool(amp)
            torch.backends.cudnn.allow_tf32 = bool(amp)
        else:
            self.device = torch.device("cpu")
        if self.distributed:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        self.is_main = self.rank == 0
        # AMP on CUDA only: bf16 where supported (no scaler needed), else fp16 with a GradScaler
        self.amp = bool(amp) and self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if self.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.channels_last = self.device.type == "cuda"

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def wrap(self, module, broadcast_buffers=False, find_unused_parameters=False):
        """DDP-wrap a module in distributed runs (broadcast_buffers=False: several forwards per backward
        would otherwise rewrite BN buffers in place; style.md section 8)."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=broadcast_buffers,
                                                         find_unused_parameters=find_unused_parameters)

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if self.distributed:
            dist.all_reduce(tensor, op=op)
        return tensor

    def share_buffers(self, *modules):
        """Every rank takes rank 0's buffers (BN running statistics): each rank's statistics come from its own
        share of the batches, and evaluation (sharded over ranks) must score the network rank 0 checkpoints
        (mmcv's DistEvalHook does the same). The buffers live on the run's device."""
        if self.distributed:
            for module in modules:
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def resolve_out_dir(args, script) -> str:
    """--out, else the folder of --resume PATH, else (--resume auto) the newest matching run with a
    checkpoint, else a new runs/<script>-<source>2<target>-s<seed>-<timestamp>."""
    if args.out:
        return args.out
    if args.resume and args.resume != "auto":
        return os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    fresh = default_run_dir(script, args.source, args.target, args.seed)
    if args.resume == "auto":
        pattern = fresh.rsplit("-", 2)[0] + "-*"
        runs = sorted(p for p in glob.glob(pattern) if os.path.isfile(os.path.join(p, "checkpoints", "last.pt")))
        if runs:
            return runs[-1]
    return fresh


def share_run_dir(runtime: Runtime, out_dir: str) -> str:
    """All ranks must agree on the run folder (the timestamp may differ by a second)."""
    if not runtime.distributed:
        return out_dir
    box = [out_dir]
    dist.broadcast_object_list(box, src=0)
    return box[0]
