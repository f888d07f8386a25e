"""DAFormer: a MiT-B5 Transformer with a context-aware fusion decoder, self-trained on the target.

Hoyer, Dai, Van Gool, "DAFormer: Improving Network Architectures and Training Strategies for Domain-Adaptive
Semantic Segmentation", CVPR 2022, https://arxiv.org/abs/2111.14887, official code lhoyer/DAFormer
(`mmseg/models/uda/dacs.py`, `mmseg/models/utils/dacs_transforms.py`, `mmseg/datasets/uda_dataset.py`, config
`configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py`).
Recipe: timm `pvt_v2_b5` (= MiT-B5, drop-path 0.1) + DAFormer decoder (Linear 256 embeddings of the four stages,
fusion by a 1x1 branch and depthwise-separable dilated 6/12/18 branches, 3x3 bottleneck, dropout 0.1,
classifier); AdamW 6e-5 (decoder x10, no weight decay on encoder norms, wd 0.01), linear warm-up 1,500
iterations then poly 1.0 to 0 at the end of the run (official max_iters, 40k), 2 source + 2 target 512x512 crops
(keep-ratio resize, bilinear as mmcv: GTA5 into 1280x720, Cityscapes into 1024x512; source cat_max_ratio 0.75;
flip). Each iteration: EMA teacher a = min(1 - 1/(t+1), 0.999) on parameters
only; source CE (mean over all pixels) + thing-class ImageNet feature distance (lambda 0.005, purity 0.75,
stage 4, frozen ImageNet encoder); teacher pseudo labels (BN in train mode, dropout/drop-path off) weighted by
the share q of pixels with confidence >= 0.968, rows 15 top / 120 bottom weight 0; ClassMix (ceil(n/2) of the
source batch's classes, 255 included), colour jitter (p 0.8, kornia-0.5 semantics) and Gaussian blur (p 0.5)
on the mix; pixel-weighted mixed CE (mean over all pixels). Rare Class Sampling: P(c) = softmax((1-f_c)/0.01),
an image with > 3,000 px of c, re-cropped up to 10 times until the crop holds > 1,500 px of c.
Evaluation: the student, whole 1024x512 images (bilinear as mmcv), H/4 logits to 512x1024, then to the full
1024x2048 labels (both bilinear, align_corners=False; mmseg encoder_decoder.py:77-81,228-233).
Reported (paper): GTA5->Cityscapes 68.3 mIoU, SYNTHIA->Cityscapes 60.9 mIoU16 (mean of seeds 0, 1, 2).

Deviations from the official code (all deliberate):
- init: timm's ImageNet `pvt_v2_b5` (a different pretraining than SegFormer's `mit_b5.pth`, which loads with
  `--init PATH` through timm's key remapping, 0 missing / 0 unexpected keys). The frozen FD encoder holds the
  same ImageNet weights (`--fd-init`); with `--init` a trained segmentation checkpoint it still loads ImageNet
  weights, as the official imnet_model, which is built from the pretrained file and never from load_from.
- Mixed precision: on CUDA the forward and backward passes run under bf16 autocast (fp16 with a GradScaler
  where bf16 is missing) with TF32 matmuls by default; the paper trained in fp32 (`--no-amp` gives fp32).
  Losses, the teacher's softmax, the 0.968 confidence threshold and the pseudo-label weight q, the FD distances,
  the mixing and its jitter/blur, and the evaluation upsampling and argmax are computed in fp32.
- Resizing: images bilinear as mmcv's imrescale (OpenCV INTER_LINEAR, no antialiasing; common.data
  "cv2-bilinear") for source, target and evaluation frames; labels nearest (OpenCV INTER_NEAREST).
- FD with an empty thing-class mask is 0 (the official mean over an empty selection is NaN).
- The pseudo-label weight q stays on the device (the official `.item()` is a host sync).
- Each source sample's crop and RCS draw come from a seed that is a function of (seed, position), so a resumed
  run continues the exact stream; target images come from a shuffled endless stream (official: uniform with
  replacement). RCS classes with no qualifying image are dropped with a warning (official: assertion error).
- Small images: RCS min-pixels (3,000, and 1,500 for the re-crop) scale with the source frame area relative
  to GTA5's 1914x1052 for non-built-in sources (maintainer, #60); the pseudo-label row crop (15/120 rows at a
  512-row crop) scales with the crop height. Statistics are cached as rcs_class_stats_<C>.json next to the
  dataset (~/.cache/uda-seg for the toy domains or a read-only dataset folder).
- Toy/other class lists: FD thing classes are chosen by name (Cityscapes things; person and car in the toy
  domains; pole excluded as in the paper).
- `--crop-size none` trains on whole resized frames (the official pipeline always crops); ClassMix then needs
  source and target frames of one size, else the run stops with an error.
- Multi-GPU (the paper: 1 GPU x 2 source + 2 target images). `--batch-size` is the global batch (as many target
  as source images), split over torchrun processes; the source (RCS draws, crops, flips) and target streams are
  split by position, so N processes together see the images one process sees. Computed per process from its
  share of the batch, not from the global batch: the decoder's BN batch statistics in the student and in the
  train-mode teacher (no SyncBN; the encoder has only LayerNorms), so 2 GPUs x 1 image normalise over one crop;
  the ClassMix class set (the local source images' classes); the pseudo-label weight q (the local target
  pixels); the FD mean (the local thing cells, then DDP averages the gradients). The CE losses are means over
  equal pixel counts per rank, so DDP's average equals the global mean. Random draws (jitter factors, blur sigma,
  ClassMix picks, dropout and drop-path masks) come from the same seeded generator on every rank, so rank r's
  k-th image gets the draws of rank 0's k-th image. Logged losses and q are rank 0's. Before each evaluation
  every rank takes rank 0's BN running statistics (mmcv DistEvalHook's broadcast_bn_buffer,
  mmseg/core/evaluation/eval_hooks.py:73-79), so the sharded score is that of the saved checkpoint.
- `--preset quick` (CPU, toy pair): timm pvt_v2_b0 (MLP ratios 8/8/4/4, so not MiT-B0), random init (the FD
  "ImageNet" encoder is then the initial encoder), decoder width 64, 128x128 crops, 150 iterations of 2+2,
  AdamW 1e-3, warm-up 6, EMA alpha 0.99 (DACS's value; 0.999 averages over more iterations than the run has).
- `--source-only` trains the same network on the source alone (the fair baseline); RCS, FD, warm-up stay as set.
Docs: README.md, section "Methods"; toy benchmark: benchmarks/daformer.md.
"""
import copy
import dataclasses
import json
import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.pvt_v2 import checkpoint_filter_fn
from tqdm import tqdm

from common.checkpoint import load_checkpoint, load_weights, resume_path, rng_state, save_checkpoint, set_rng_state
from common.cli import UserError, guard, parse_args
from common.data import SegDataset, TrainTransform, _worker_init, class_setup, domain_split, normalize, train_loader
from common.metrics import evaluate_target
from common.runlog import RunLog, param_counts
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir, unwrap

SCRIPT = "daformer"


@dataclass
class Args:
    source: str = "gta"
    """source domain: gta, synthia, cityscapes (the oracle), toy-synth, toy-real or a folder dataset path"""
    target: str = "cityscapes"
    """target domain, evaluated on its val split (built-in name or folder dataset path)"""
    data_root: str = "data"
    """folder holding gta/, synthia/, cityscapes/"""
    preset: Literal["paper", "quick"] = "paper"
    """paper: the published recipe; quick: CPU-sized run on the toy domains (explicit flags override it)"""
    backbone: str = "pvt_v2_b5"
    """timm encoder: pvt_v2_b5 (= MiT-B5, paper) or pvt_v2_b0..b4 (MLP ratios 8/8/4/4, not MiT-B0..B4)"""
    init: str = "imagenet"
    """imagenet (timm weights), none (random) or a local file (SegFormer mit_b5.pth or our checkpoint)"""
    iters: int = 40000
    """training iterations (paper: 40k)"""
    batch_size: int = 2
    """global source batch, split over torchrun processes, with as many target images (paper: 2)"""
    crop_size: Optional[list[int]] = field(default_factory=lambda: [512, 512])
    """random crop H [W] after resizing; none: whole resized frames, which needs source and target frames of one size (paper: 512 512)"""
    lr: float = 6e-5
    """backbone learning rate; the heads use head_lr_mult times it (paper: 6e-5)"""
    seed: int = 0
    """seed of every random choice (DAFormer: 0, 1, 2)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: cuda if available"""
    amp: bool = True
    """mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler)"""
    num_workers: int = 4
    """data-loading processes per training process"""
    eval_every: int = 4000
    """evaluate on the target val split every N iterations (0: only at the end)"""
    checkpoint_every: int = 5000
    """write checkpoints/last.pt every N iterations (AdaptSegNet snapshots every 5k)"""
    out: Optional[str] = None
    """run folder (default runs/<script>-<source>2<target>-s<seed>-<timestamp>)"""
    resume: Optional[str] = None
    """auto (the newest matching run folder's last.pt) or a checkpoint path"""
    eval_only: bool = False
    """evaluate --weights on the target val split, write results.json, exit"""
    weights: list[str] = field(default_factory=list)
    """checkpoint(s) to evaluate with --eval-only"""
    dry_run: bool = False
    """build networks and optimisers, write config.json with parameter counts, exit without reading data"""
    log_every: int = 50
    """write metrics.jsonl every N iterations (the only host syncs of the loop)"""
    torch_deterministic: bool = False
    """force deterministic cuDNN/cuBLAS kernels (slower)"""
    source_size: Optional[list[int]] = None
    """resize source frames into H W keeping the aspect ratio (default: GTA5 720 1280, SYNTHIA 760 1280, Cityscapes 512 1024, else native)"""
    target_size: Optional[list[int]] = None
    """resize target frames to H W for training (default: Cityscapes 512 1024, else native)"""
    eval_size: Optional[list[int]] = None
    """evaluation input H W; logits are upsampled to the full label size (default: as target_size)"""
    eval_limit: Optional[int] = None
    """score only the first N target val images (default: all)"""
    num_predictions: int = 4
    """colour-coded target-val predictions saved to predictions/ at the end"""
    synthia_classes: int = 19
    """classes of the head when the source is SYNTHIA: 19 (evaluated on 16/13) or 16"""
    normalization: Literal["auto", "imagenet", "caffe"] = "auto"
    """input normalisation; auto: imagenet (RGB mean/std, what MiT/pvt_v2 weights expect); caffe: BGR, mean only"""
    weight_decay: float = 0.01
    """AdamW weight decay; encoder parameters named *norm* get none (paper: 0.01)"""
    head_lr_mult: float = 10.0
    """learning-rate multiplier of the classifiers (paper: 10)"""
    poly_horizon: Optional[int] = None
    """poly schedule horizon T in lr*(1-t/T)^power; none: the run length (--iters), as the official max_iters"""
    poly_power: float = 1.0
    """poly schedule power (paper: 1.0)"""

    # Algorithm specific arguments
    decoder: Literal["daformer", "segformer"] = "daformer"
    """daformer (context-aware fusion) or segformer (all-MLP head with a 1x1 fusion; paper Tab. 7)"""
    decoder_dim: int = 256
    """decoder embedding and channel width (paper: 256; SegFormer's own B5 head uses 768)"""
    drop_path: float = 0.1
    """stochastic depth rate of the encoder (paper: 0.1; timm's default is 0)"""
    dropout: float = 0.1
    """Dropout2d before the classifier (paper: 0.1)"""
    warmup: bool = True
    """linear learning-rate warm-up (paper: on; --no-warmup for the ablation)"""
    warmup_iters: int = 1500
    """warm-up length in iterations (paper: 1500)"""
    warmup_ratio: float = 1e-6
    """learning rate at iteration 0 as a fraction of the scheduled one (paper: 1e-6)"""
    source_only: bool = False
    """ablation: no target losses (no teacher, pseudo labels or mixing); warm-up, RCS and FD stay as set"""
    ema_alpha: float = 0.999
    """EMA teacher momentum, used as min(1 - 1/(t+1), alpha) (paper: 0.999; DACS: 0.99)"""
    pseudo_threshold: float = 0.968
    """confidence threshold tau of the pseudo-label weight q (paper: 0.968)"""
    pseudo_crop: list[int] = field(default_factory=lambda: [15, 120])
    """pseudo-label weight 0 on the top and bottom rows, given for a 512-row crop and scaled (paper: 15 120)"""
    mix: bool = True
    """ClassMix source pixels into the target image (paper: on; --no-mix self-trains on the target image)"""
    jitter_p: float = 0.8
    """probability of colour jitter on the mixed image (paper: 0.8, the config's 0.2 is the threshold)"""
    jitter_strength: float = 0.2
    """brightness/contrast/saturation/hue strength s of the jitter (paper: 0.2)"""
    blur_p: float = 0.5
    """probability of Gaussian blur on the mixed image (paper: 0.5)"""
    rcs: bool = True
    """Rare Class Sampling of source images (paper: on)"""
    rcs_temperature: float = 0.01
    """RCS temperature T in softmax((1 - f_c) / T) (paper: 0.01)"""
    rcs_min_pixels: Optional[int] = None
    """pixels of a class an image needs to qualify for it (paper: 3000; default 3000 for gta/synthia/cityscapes, else 3000 x frame area / 1914x1052)"""
    rcs_min_crop_ratio: float = 0.5
    """re-crop (up to 10 times) until the crop holds ratio x min-pixels of the class (paper: 0.5)"""
    rcs_stats: Optional[str] = None
    """class-statistics cache file (default: rcs_class_stats_<C>.json next to the source dataset)"""
    fd: bool = True
    """thing-class ImageNet feature distance (paper: on)"""
    fd_lambda: float = 0.005
    """weight of the feature distance (paper: 0.005)"""
    fd_purity: float = 0.75
    """a stage-4 cell counts only if its majority class covers this share of its pixels (paper: 0.75)"""
    fd_classes: list[str] = field(default_factory=list)
    """class names the feature distance uses, e.g. --fd-classes car person (default: the paper's thing classes in the class list)"""
    fd_init: str = "auto"
    """frozen FD encoder weights: imagenet (timm), a local ImageNet file (mit_b5.pth), or auto: the student's initial encoder, but imagenet when --init is a trained segmentation checkpoint (official: always ImageNet)"""
    compile: bool = False
    """torch.compile the student and teacher forward passes"""

    # to be filled in runtime
    world_size: int = field(default=0, metadata={"runtime": True})
    rank: int = field(default=0, metadata={"runtime": True})


PRESETS = {
    "paper": {},
    "quick": dict(source="toy-synth", target="toy-real", backbone="pvt_v2_b0", init="none", iters=150, batch_size=2,
                  lr=1e-3, eval_every=0, checkpoint_every=50, num_workers=1, log_every=10, poly_horizon=None,
                  seed=0, crop_size=[128, 128], warmup_iters=6, ema_alpha=0.99, decoder_dim=64),
}
# the paper's thing classes (Cityscapes train ids 6, 7, 11-18; pole is excluded) by name
THING_CLASSES = ("traffic light", "traffic sign", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                 "bicycle")
GTA5_FRAME_AREA = 1914 * 1052  # the resolution RCS's 3,000 px were chosen for
BUILTIN_SOURCES = ("gta", "synthia", "cityscapes")
INTERPOLATION = "cv2-bilinear"  # mmseg Resize = mmcv imrescale: OpenCV INTER_LINEAR images, INTER_NEAREST labels
# flags that act only while their switch is on: typing one with the switch off is refused (every flag acts)
SWITCHED_FLAGS = {
    "fd": ("fd_lambda", "fd_purity", "fd_classes", "fd_init"),
    "rcs": ("rcs_temperature", "rcs_min_pixels", "rcs_min_crop_ratio", "rcs_stats"),
    "warmup": ("warmup_iters", "warmup_ratio"),
}
TARGET_FLAGS = ("ema_alpha", "pseudo_threshold", "pseudo_crop", "mix", "jitter_p", "jitter_strength", "blur_p")


def check_switched_flags(args):
    """One error line for a flag typed together with the switch that turns its part off."""
    given = getattr(args, "given", frozenset())
    for switch, flags in SWITCHED_FLAGS.items():
        typed = [f for f in flags if f in given]
        if typed and not getattr(args, switch):
            raise UserError(f"--no-{switch.replace('_', '-')} turns off what {flag_names(typed)} set; drop one or "
                            f"the other")
    typed = [f for f in TARGET_FLAGS if f in given]
    if typed and args.source_only:
        raise UserError(f"--source-only trains without the target, so {flag_names(typed)} would do nothing; drop them")


def flag_names(fields):
    return ", ".join("--" + f.replace("_", "-") for f in fields)


def fd_class_ids(names, classes):
    """Class indices of the FD thing classes: `names`, or by default the paper's thing classes in `classes`."""
    if not names:
        names = [c for c in classes if c in THING_CLASSES]
        if not names:
            raise UserError(f"the feature distance needs thing classes, and the class list ({', '.join(classes)}) "
                            f"has none of the paper's ({', '.join(THING_CLASSES)}); name yours with --fd-classes "
                            f"NAME [NAME ...] or pass --no-fd")
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise UserError(f"--fd-classes: {', '.join(unknown)} not in the class list ({', '.join(classes)}); "
                        f"name classes from it or pass --no-fd")
    return [classes.index(n) for n in names]


# ----------------------------------------------------------------------------------------------------
# Network: timm PVT-v2 (= MiT) encoder + DAFormer decoder (daformer_head.py, sep_aspp_head.py)
class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size=1, dilation=1, groups=1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                                   dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule init


class DecodeHead(nn.Module):
    """Linear embedding of each stage to `dim`, upsampled to H/4 and concatenated, then
    daformer: 1x1 branch + depthwise-separable 3x3 branches (dilation 6/12/18), 3x3 bottleneck;
    segformer: one 1x1 fusion; both followed by Dropout2d and a 1x1 classifier."""

    def __init__(self, in_channels, num_classes, dim=256, dropout=0.1, decoder="daformer"):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, dim) for c in in_channels)
        cat = dim * len(in_channels)
        if decoder == "daformer":
            self.branches = nn.ModuleList(
                [ConvBNReLU(cat, dim)] + [nn.Sequential(ConvBNReLU(cat, cat, 3, d, groups=cat), ConvBNReLU(cat, dim))
                                          for d in (6, 12, 18)])
            self.fuse = ConvBNReLU(4 * dim, dim, 3)
        else:
            self.branches = None
            self.fuse = ConvBNReLU(cat, dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats):
        size = feats[0].shape[-2:]
        embedded = []
        for embed, f in zip(self.embed, feats):
            e = embed(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # Linear on tokens (B, h, w, C)
            if e.shape[-2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        x = torch.cat(embedded, 1)
        if self.branches is not None:
            x = torch.cat([branch(x) for branch in self.branches], 1)
        return self.classifier(self.dropout(self.fuse(x)))


class DAFormerNet(nn.Module):
    """Returns (the four stage features, logits at H/4)."""

    def __init__(self, backbone="pvt_v2_b5", num_classes=19, decoder="daformer", decoder_dim=256, drop_path=0.1,
                 dropout=0.1):
        super().__init__()
        if not backbone.startswith("pvt_v2_b") or backbone not in timm.list_models("pvt_v2_*"):
            raise UserError(f"unknown backbone '{backbone}': use pvt_v2_b5 (= MiT-B5) or pvt_v2_b0..b4")
        # the plain model (num_classes=0), never features_only: its flattened names would not match checkpoints
        self.encoder = timm.create_model(backbone, pretrained=False, num_classes=0, drop_path_rate=drop_path)
        channels = [info["num_chs"] for info in self.encoder.feature_info]
        self.head = DecodeHead(channels, num_classes, decoder_dim, dropout, decoder)

    def forward(self, x):
        feats = self.encoder.forward_intermediates(x, intermediates_only=True)
        return feats, self.head(feats)

    def param_groups(self, lr, head_lr_mult, weight_decay):
        """mmcv custom_keys of the official config: 'head' -> lr x10, 'norm' (encoder) -> no weight decay."""
        decay = [p for n, p in self.encoder.named_parameters() if "norm" not in n]
        no_decay = [p for n, p in self.encoder.named_parameters() if "norm" in n]
        return [{"params": decay, "lr": lr, "lr_mult": 1.0, "weight_decay": weight_decay},
                {"params": no_decay, "lr": lr, "lr_mult": 1.0, "weight_decay": 0.0},
                {"params": list(self.head.parameters()), "lr": lr * head_lr_mult, "lr_mult": head_lr_mult,
                 "weight_decay": weight_decay}]


def load_init(model, init, backbone):
    """Load --init into the encoder (and the decoder, from one of our checkpoints). Returns (normalisation,
    what the encoder now holds: "imagenet", "random" or "trained", the last for a segmentation checkpoint)."""
    if init == "none":
        return "imagenet", "random"
    if init == "imagenet":
        load_encoder(model.encoder, imagenet_weights(backbone, "--init"), init, backbone, "--init")
        return "imagenet", "imagenet"
    state, head, trained = read_weights(init, model.encoder, "--init")
    if head is not None:
        own = model.head.state_dict()
        if head.keys() == own.keys() and all(own[k].shape == v.shape for k, v in head.items()):
            model.head.load_state_dict(head)
    load_encoder(model.encoder, state, init, backbone, "--init")
    return "imagenet", "trained" if trained else "imagenet"


def imagenet_weights(backbone, flag):
    """timm's ImageNet weights of the encoder (downloaded once into the Hugging Face cache)."""
    try:
        return timm.create_model(backbone, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # offline, no cached weights
        raise UserError(f"{flag} imagenet: cannot get timm's ImageNet {backbone} weights ({type(e).__name__}); pass "
                        f"{flag} PATH (SegFormer's mit_b5.pth) or {'--init none' if flag == '--init' else '--no-fd'}"
                        ) from None


def read_weights(path, encoder, flag):
    """A weights file as (encoder state in timm names, our decoder state or None, trained): trained is True for a
    segmentation model (one of our checkpoints, an mmseg checkpoint), False for encoder weights (SegFormer's
    ImageNet mit_b5.pth, a timm state dict)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file (use imagenet, none or a path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {flag} {path}: {str(e).splitlines()[0][:200]}") from None
    state = state.get("model", state.get("state_dict", state))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):  # one of our checkpoints
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}, head, True
    trained = any(k.startswith("backbone.") for k in state)  # an mmseg (DAFormer/SegFormer) segmentor
    if trained:
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the ImageNet classifier
    return checkpoint_filter_fn(state, encoder), None, trained  # SegFormer MiT names -> timm names


def load_encoder(encoder, state, source, backbone, flag):
    """Strict load with a one-line error: every tensor of the encoder, nothing else."""
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"{flag} {source} does not fit a {backbone}: {str(e).splitlines()[-1].strip()[:200]}") from None
    if missing or unexpected:
        raise UserError(f"{flag} {source} does not fit a {backbone}: {len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors (e.g. {(missing or unexpected)[0]})")


def fd_encoder(model, fd_init, student_init, backbone):
    """The frozen encoder of the feature distance. The official imnet_model is built from the ImageNet file,
    never from load_from or a resume (dacs.py:82-83): auto copies the student's initial encoder unless that
    holds a trained segmentation model (student_init "trained"), then loads timm's ImageNet weights; imagenet
    or a path load those weights. student_init None (resume, eval-only, dry run): a copy, loaded later."""
    encoder = copy.deepcopy(model.encoder).requires_grad_(False).eval()
    if student_init is None or (fd_init == "auto" and student_init != "trained"):
        return encoder
    source = "imagenet" if fd_init == "auto" else fd_init
    if source == "imagenet":
        state = imagenet_weights(backbone, "--fd-init")
    else:
        state, _, trained = read_weights(source, encoder, "--fd-init")
        if trained:
            raise UserError(f"--fd-init {source} is a trained segmentation model; the feature distance compares "
                            f"with ImageNet weights (imagenet or a file such as mit_b5.pth)")
    load_encoder(encoder, state, source, backbone, "--fd-init")
    return encoder


def poly_lr(base_lr, it, horizon, power):
    return base_lr * (1 - min(it, horizon - 1) / horizon) ** power


def warmup_factor(it, warmup_iters, warmup_ratio):
    """mmcv's linear warm-up: multiplies the poly lr, from warmup_ratio at 0 to 1 at warmup_iters."""
    if it >= warmup_iters:
        return 1.0
    return 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


# ----------------------------------------------------------------------------------------------------
# Losses, teacher, pseudo labels
def weighted_ce(logits, labels, weight=None):
    """CE at label resolution (bilinear, align_corners=False), 255 ignored, times a pixel weight, averaged
    over ALL pixels (mmseg's reduction: ignored pixels count as zeros in the mean)."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    return (loss if weight is None else loss * weight).mean()


@torch.no_grad()
def ema_update(teacher, student, alpha):
    """theta_T <- alpha theta_T + (1 - alpha) theta_S over parameters only (BN buffers stay the teacher's)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1 - alpha)


def ema_alpha_at(it, alpha):
    return min(1 - 1 / (it + 1), alpha)


def teacher_mode(net):
    """Train mode (BN uses batch statistics, as in the official code) with dropout and drop-path off."""
    net.train()
    for m in net.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, DropPath)):
            m.eval()
    return net


def pseudo_labels(logits, size, threshold, crop_rows):
    """(argmax labels, weight map, q): the weight is the share q of the batch's pixels with confidence >= tau,
    one scalar for all pixels, 0 on the top/bottom crop_rows = (top, bottom) rows."""
    probs = torch.softmax(F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False), 1)
    confidence, labels = probs.max(1)
    q = (confidence >= threshold).float().mean()
    weight = q * torch.ones_like(confidence)
    top, bottom = crop_rows
    if top > 0:
        weight[:, :top] = 0
    if bottom > 0:
        weight[:, -bottom:] = 0
    return labels, weight, q


def downscale_labels(labels, scale, purity, num_classes):
    """Majority class of each scale x scale cell (255 counts as a class); 255 where its share < purity."""
    one_hot = F.one_hot(torch.where(labels == 255, num_classes, labels), num_classes + 1).permute(0, 3, 1, 2)
    share, cls = F.avg_pool2d(one_hot.float(), scale).max(1)
    cls = torch.where(cls == num_classes, 255, cls)
    return torch.where(share < purity, 255, cls)


def feature_distance(student_feat, imnet_feat, labels, thing_lut, purity, num_classes):
    """Mean L2 distance between stage-4 features over cells whose (pure) label is a thing class; 0 if none."""
    cells = downscale_labels(labels, labels.shape[-1] // student_feat.shape[-1], purity, num_classes)
    h, w = min(cells.shape[-2], student_feat.shape[-2]), min(cells.shape[-1], student_feat.shape[-1])
    mask = thing_lut[cells[:, :h, :w]].float()
    dist = (student_feat[..., :h, :w].float() - imnet_feat[..., :h, :w].float()).norm(dim=1)
    return (dist * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# ClassMix and the strong augmentation (dacs_transforms.py; kornia-0.5 semantics, written in torch)
def class_mix_masks(labels):
    """Per image, a random ceil(n/2) of the n classes present in the WHOLE source batch (255 included);
    mask = pixel's label is chosen. On the device, no host sync."""
    present = torch.zeros(256, dtype=torch.bool, device=labels.device)
    present[labels.flatten()] = True
    keys = torch.rand(labels.shape[0], 256, device=labels.device).masked_fill(~present, 2.0)
    rank = keys.argsort(1).argsort(1)  # absent classes rank last
    chosen = rank < (present.sum() + 1) // 2
    return chosen.gather(1, labels.flatten(1)).view_as(labels)


def rgb_to_hsv(img, eps=1e-8):
    """3xHxW RGB in [0, 1] -> (h in [0, 2 pi), s, v)."""
    maxc, argmax = img.max(0)
    delta = maxc - img.min(0).values
    s = delta / (maxc + eps)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - img[0]) / d, (maxc - img[1]) / d, (maxc - img[2]) / d
    h = torch.where(argmax == 0, bc - gc, torch.where(argmax == 1, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    return torch.remainder(h / 6, 1) * 2 * math.pi, s, maxc


def hsv_to_rgb(h, s, v):
    h6 = h / (2 * math.pi) * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return choices.gather(1, i.expand(3, 1, *i.shape)).squeeze(1)


def color_jitter(img, brightness, contrast, saturation, hue, order):
    """kornia 0.5 ColorJitter on one 3xHxW image in [0, 1]: additive brightness (x + b - 1), multiplicative
    contrast (x * c), saturation scale, hue shift 2 pi h; each clamped to [0, 1]; ops in `order`."""
    for op in order:
        if op == 0:
            img = (img + (brightness - 1)).clamp(0, 1)
        elif op == 1:
            img = (img * contrast).clamp(0, 1)
        else:
            h, s, v = rgb_to_hsv(img)
            if op == 2:
                s = (s * saturation).clamp(0, 1)
            else:
                h = torch.remainder(h + hue * 2 * math.pi, 2 * math.pi)
            img = hsv_to_rgb(h, s, v)
    return img


def blur_kernel_size(side):
    """The odd size nearest 10% of the side (51 for 512)."""
    n = math.ceil(0.1 * side)
    return n if n % 2 else n - 1


def gaussian_blur(img, sigma):
    """Separable Gaussian blur of one 3xHxW image, kernel sizes from blur_kernel_size, reflect border."""
    out = img[None]
    for dim, side in ((2, img.shape[1]), (3, img.shape[2])):
        k = blur_kernel_size(side)
        x = torch.arange(k, device=img.device, dtype=img.dtype) - k // 2
        kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).expand(3, 1, k)
        kernel = kernel.view(3, 1, k, 1) if dim == 2 else kernel.view(3, 1, 1, k)
        pad = (0, 0, k // 2, k // 2) if dim == 2 else (k // 2, k // 2, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="reflect"), kernel, groups=3)
    return out[0]


def strong_augment(images, jitter_p, strength, blur_p):
    """Jitter and blur of a Bx3xHxW batch in [0, 1]: one draw per batch decides each (as the official
    strong_transform), factors and sigma per image. Parameters are drawn on the host: no device sync."""
    do_jitter, do_blur = (torch.rand(2) < torch.tensor([jitter_p, blur_p])).tolist()
    if not (do_jitter or do_blur):
        return images
    out = []
    for img in images:
        if do_jitter:
            b, c, s = (1 + strength * (2 * torch.rand(3) - 1)).tolist()
            hue = strength * (2 * torch.rand(1).item() - 1)
            img = color_jitter(img, b, c, s, hue, torch.randperm(4).tolist())
        if do_blur:
            img = gaussian_blur(img, 0.15 + torch.rand(1).item())
        out.append(img)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------
# Rare Class Sampling (uda_dataset.py; statistics as the official convert_datasets/*.py)
_STATS_SPLIT = None  # the split being counted (set before the worker pool forks, never pickled per job)


def _count_classes(index):
    label = _STATS_SPLIT.load_label(index)
    return np.bincount(label.ravel(), minlength=256), label.size


def class_statistics(split, num_classes, path, rt, num_workers=0):
    """Per-image pixel counts of each class at original resolution, computed once (ranks share the work)
    and cached as JSON at `path`; returns (counts N x C int64, mean frame area)."""
    global _STATS_SPLIT
    names = [split.item_name(i) for i in range(len(split))]
    if os.path.isfile(path):
        with open(path) as f:
            stats = json.load(f)
        if stats.get("names") == names and stats.get("classes") == split.classes:
            return np.array(stats["counts"], dtype=np.int64), float(stats["mean_area"])
        warnings.warn(f"{path} describes another file list or class list; recomputing it")
    _STATS_SPLIT = split
    counts = torch.zeros(len(names), num_classes + 1, dtype=torch.int64)
    mine = range(rt.rank, len(names), rt.world)
    pool = torch.multiprocessing.get_context("fork").Pool(num_workers) if num_workers > 1 else None
    results = pool.imap(_count_classes, mine, chunksize=16) if pool else map(_count_classes, mine)
    for i, (c, area) in zip(mine, tqdm(results, total=len(mine), desc="RCS class statistics (once)",
                                        disable=not rt.is_main, dynamic_ncols=True)):
        counts[i, :num_classes], counts[i, num_classes] = torch.from_numpy(c[:num_classes]), area
    if pool:
        pool.close()
    counts = rt.all_reduce(counts.to(rt.device)).cpu()  # on the run's device: NCCL refuses CPU tensors
    counts, areas = counts[:, :num_classes].numpy(), counts[:, num_classes].numpy()
    if counts.sum() == 0:
        raise UserError(f"source '{split.name}' has no labelled pixel of any class; check its labels")
    mean_area = float(areas.mean())
    if rt.is_main:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"names": names, "classes": split.classes, "mean_area": mean_area,
                       "counts": counts.tolist()}, f)
        os.replace(tmp, path)
    rt.barrier()
    return counts, mean_area


def stats_path(args, split, num_classes):
    """Next to the dataset (datasets.md section 9); ~/.cache/uda-seg for the toy domains or read-only folders."""
    if args.rcs_stats:
        return args.rcs_stats
    name = f"rcs_class_stats_{num_classes}.json"
    folder = (os.path.join(args.data_root, args.source) if args.source in ("gta", "synthia", "cityscapes")
              else args.source if os.path.isdir(args.source) else None)
    if folder is not None and os.access(folder, os.W_OK):
        return os.path.join(folder, name)
    return os.path.join(os.path.expanduser("~/.cache/uda-seg"), f"{os.path.basename(split.name)}-{name}")


def rcs_probabilities(counts, temperature):
    """(classes present, P(c) = softmax_c((1 - f_c) / T)) with f_c the class's share of all source pixels."""
    totals = counts.sum(0).astype(np.float64)
    classes = np.flatnonzero(totals > 0)
    freq = totals[classes] / totals[classes].sum()
    return classes, torch.softmax(torch.from_numpy((1 - freq) / temperature), 0).numpy()


class RareClassSampler(torch.utils.data.Sampler):
    """Endless stream of (source index, crop seed, class): draw c ~ P(c), then an image uniformly among
    those with > min_pixels of c. A pure function of (seed, position), like common.data.InfiniteSampler:
    rank r of `world` takes positions r, r + world, ...; `start` skips the samples each rank has consumed,
    so a resumed run continues the exact stream."""

    def __init__(self, counts, temperature, min_pixels, seed, start=0, rank=0, world=1):
        classes, probs = rcs_probabilities(counts, temperature)
        self.samples = {int(c): np.flatnonzero(counts[:, c] > min_pixels) for c in classes}
        keep = [k for k, c in enumerate(classes) if len(self.samples[int(c)])]
        if len(keep) < len(classes):
            dropped = [int(c) for c in classes if not len(self.samples[int(c)])]
            warnings.warn(f"RCS: no source image has > {min_pixels} px of classes {dropped}; they are not sampled")
        if not keep:
            raise UserError(f"RCS: no source image has > {min_pixels} px of any class; lower --rcs-min-pixels")
        self.classes, self.probs = classes[keep], probs[keep] / probs[keep].sum()
        self.seed, self.start, self.rank, self.world = seed, start, rank, world

    def __iter__(self):
        pos = self.start * self.world + self.rank
        while True:
            rng = np.random.default_rng((self.seed, pos))
            c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
            yield int(rng.choice(self.samples[c])), int(rng.integers(2**63)), c
            pos += self.world


class RareClassDataset(SegDataset):
    """Source items for RCS: resize once, then crop (and flip) the same image again, up to 10 times, until the
    crop holds more than min_crop_pixels of the sampled class (maintainer, DAFormer PR #8); min_crop_pixels 0
    (ratio 0, or no crop): no re-crop (uda_dataset.py:95-105)."""

    def __init__(self, split, resize, crop, min_crop_pixels):
        super().__init__(split, None)
        self.resize, self.crop, self.min_crop_pixels = resize, crop, min_crop_pixels

    def __getitem__(self, key):
        index, seed, cls = key
        rng = np.random.default_rng(seed)
        image, label = self.resize(*self.split.load(index), rng)
        crop_image, crop_label = self.crop(image, label, rng)
        for _ in range(10 if self.min_crop_pixels > 0 else 0):
            if (crop_label == cls).sum() > self.min_crop_pixels:
                break
            crop_image, crop_label = self.crop(image, label, rng)
        return (torch.from_numpy(np.ascontiguousarray(crop_image.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(crop_label)), index)


def train_transforms(args, source_train, target_train, crop):
    """(source, target) transforms of mmseg's pipeline (uda_gta_to_cityscapes_512x512.py:12-35): keep-ratio
    Resize (mmcv bilinear), RandomCrop (source: cat_max_ratio 0.75), RandomFlip 0.5."""
    source = TrainTransform(size=args.source_size or source_train.paper_size, keep_ratio=True, crop=crop,
                            cat_max_ratio=0.75, flip=True, interpolation=INTERPOLATION)
    target = TrainTransform(size=args.target_size or target_train.paper_size, keep_ratio=True, crop=crop, flip=True,
                            interpolation=INTERPOLATION)
    return source, target


def frame_size(split, transform):
    """(H, W) of the split's first frame after `transform` (for --crop-size none)."""
    return transform(split.load(0, False)[0], None, np.random.default_rng(0))[0].shape[:2]


def broadcast_bn_statistics(model, rt):
    """Rank 0's BN running statistics to every rank before an evaluation (mmcv DistEvalHook broadcast_bn_buffer,
    mmseg/core/evaluation/eval_hooks.py:73-79): ranks train on different images, and each scores its own val
    shard, which should be scored by the model the checkpoint saves."""
    if not rt.distributed:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            torch.distributed.broadcast(m.running_mean, 0)  # on the run's device (NCCL)
            torch.distributed.broadcast(m.running_var, 0)


def rcs_loader(dataset, sampler, batch_size, num_workers, pin_memory):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, drop_last=True, worker_init_fn=_worker_init,
                                         persistent_workers=num_workers > 0,
                                         prefetch_factor=4 if num_workers > 0 else None)
    return iter(loader)


# ----------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args, PRESETS, description=__doc__)
    # TRY NOT TO MODIFY: setup
    rt = Runtime(args.device, args.amp)
    args.world_size, args.rank = rt.world, rt.rank
    args.poly_horizon = args.poly_horizon or args.iters  # none: the schedule ends with the run
    if args.batch_size % rt.world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch; it must divide by {rt.world} processes")
    args.out = out_dir = share_run_dir(rt, resolve_out_dir(args, SCRIPT))
    seed_everything(args.seed, args.torch_deterministic)
    classes, eval_classes, pred_map = class_setup(args.source, args.target, args.synthia_classes)
    num_classes = len(classes)
    ckpt_path = resume_path(args.resume, out_dir)

    # ALGO LOGIC: networks and optimisers
    if args.crop_size is not None and len(args.crop_size) not in (1, 2) or len(args.pseudo_crop) != 2:
        raise UserError("--crop-size takes H [W] and --pseudo-crop takes TOP BOTTOM")
    check_switched_flags(args)
    crop = tuple(args.crop_size * 2)[:2] if args.crop_size else None
    model = DAFormerNet(args.backbone, num_classes, args.decoder, args.decoder_dim, args.drop_path, args.dropout)
    norm, student_init = (load_init(model, args.init, args.backbone) if not (ckpt_path or args.eval_only or
                                                                            args.dry_run) else (None, None))
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    optimizer = torch.optim.AdamW(model.param_groups(args.lr, args.head_lr_mult, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.999), weight_decay=args.weight_decay, fused=rt.device.type == "cuda")
    networks = {"model": model}
    if not args.source_only:  # the EMA teacher starts as a copy of the student (official _init_ema_weights)
        networks["teacher"] = teacher = teacher_mode(copy.deepcopy(model).requires_grad_(False))
    if args.fd:  # the frozen ImageNet encoder, and the thing classes it compares on
        networks["imnet_encoder"] = imnet_encoder = fd_encoder(model, args.fd_init, student_init, args.backbone)
        thing_ids = fd_class_ids(args.fd_classes, classes)
        args.fd_classes = [classes[c] for c in thing_ids]  # resolved, so that config.json names them
        thing_lut = torch.zeros(256, dtype=torch.bool, device=rt.device)
        thing_lut[thing_ids] = True
    if args.rcs and args.rcs_min_pixels is None and args.source in BUILTIN_SOURCES:
        args.rcs_min_pixels = 3000  # the paper's (gta2cs_..._s0.py:36); other sources: scaled once counted

    # TRY NOT TO MODIFY: run folder, dry run, resume
    norm = args.normalization if args.normalization != "auto" else norm
    log = RunLog(out_dir, rt.is_main)
    log.write_config(SCRIPT, args, param_counts(**networks), normalization=norm, num_classes=num_classes)
    if args.dry_run:
        print(f"dry run: config written to {log.path('config.json')}")
        return
    start_iter = 0
    if ckpt_path or args.eval_only:
        if args.eval_only and len(args.weights) != 1:
            raise UserError("--eval-only needs exactly one --weights PATH")
        ckpt = load_checkpoint(args.weights[0] if args.eval_only else ckpt_path, SCRIPT, num_classes)
        load_weights(model, ckpt["model"])
        norm, start_iter = ckpt["normalization"], ckpt["iter"]
        if not args.eval_only:
            for name in networks.keys() - {"model"}:
                if name not in ckpt:
                    raise UserError(f"{ckpt_path} has no {name}: resume with the flags of the original run")
                networks[name].load_state_dict(ckpt[name])
            optimizer.load_state_dict(ckpt["optimizer"])
            rt.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            print(f"resumed from {ckpt_path} at iteration {start_iter}")

    def to_input(images):
        x = normalize(images.to(rt.device, non_blocking=True), norm)
        return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x

    # TRY NOT TO MODIFY: evaluation
    target_val = domain_split(args.target, "val", args.data_root)
    eval_size = args.eval_size or args.target_size or target_val.paper_size

    def upsample(logits, images):  # mmseg: logits to the input size first, then to the label size
        return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def evaluate_model(final=False):
        model.eval()
        broadcast_bn_statistics(model, rt)  # every rank scores its shard with the statistics the checkpoint saves
        with torch.no_grad(), rt.autocast():
            summary = evaluate_target(lambda x: upsample(model(to_input(x))[1], x), target_val, rt,
                                      align_corners=False, log=log,
                                      num_predictions=args.num_predictions if final else 0, limit=args.eval_limit,
                                      eval_size=eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19,
                                      interpolation=INTERPOLATION)
        model.train()
        return summary

    if args.eval_only:
        summary = evaluate_model(final=True)
        log.write_results(summary, start_iter, weights=args.weights)
        print(f"target val mIoU {summary['miou']:.2f} ({log.path('results.json')})")
        return

    def checkpoint(it):
        if rt.is_main:
            save_checkpoint(log.path("checkpoints", "last.pt"), {
                "script": SCRIPT, "num_classes": num_classes, "iter": it, "normalization": norm,
                "args": dataclasses.asdict(args), "model": unwrap(model).state_dict(),
                **{name: networks[name].state_dict() for name in networks.keys() - {"model"}},
                "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict(), "rng": rng_state()})

    # ALGO LOGIC: data
    loop_rng = torch.get_rng_state()  # iter(DataLoader) draws from the global RNG; keep the loop's stream exact
    source_train = domain_split(args.source, "train", args.data_root, synthia_classes=args.synthia_classes)
    target_train = domain_split(args.target, "train", args.data_root, labelled=False)
    source_transform, target_transform = train_transforms(args, source_train, target_train, crop)
    if crop is None and not args.source_only:  # ClassMix pastes source pixels into the target frames
        source_hw, target_hw = frame_size(source_train, source_transform), frame_size(target_train, target_transform)
        if source_hw != target_hw:
            raise UserError(f"--crop-size none: ClassMix needs source and target frames of one size, but source "
                            f"frames resize to {source_hw[0]}x{source_hw[1]} and target frames to "
                            f"{target_hw[0]}x{target_hw[1]}; pass --crop-size H W (paper: 512 512) or "
                            f"--source-size/--target-size that match")
    per_rank_batch = args.batch_size // rt.world
    pin = rt.device.type == "cuda"
    if args.rcs:
        counts, mean_area = class_statistics(source_train, num_classes, stats_path(args, source_train, num_classes),
                                             rt, args.num_workers)
        min_pixels = args.rcs_min_pixels if args.rcs_min_pixels is not None else (
            max(1, round(3000 * mean_area / GTA5_FRAME_AREA)))  # maintainer, #60: fewer pixels on small frames
        # rank r takes positions r, r + world, ... of one stream: N processes draw what one process draws
        sampler = RareClassSampler(counts, args.rcs_temperature, min_pixels, args.seed,
                                   start_iter * per_rank_batch, rt.rank, rt.world)
        if rt.is_main:
            print("RCS P(c): " + ", ".join(f"{classes[c]} {p:.3f}" for c, p in zip(sampler.classes, sampler.probs))
                  + f"; min pixels {min_pixels}")
        resize = dataclasses.replace(source_transform, crop=None, flip=False)
        crop_flip = dataclasses.replace(source_transform, size=None)
        source_batches = rcs_loader(RareClassDataset(source_train, resize, crop_flip,
                                                     args.rcs_min_crop_ratio * min_pixels if crop else 0),
                                    sampler, per_rank_batch, args.num_workers, pin)
    else:
        source_batches = train_loader(SegDataset(source_train, source_transform), per_rank_batch, args.seed,
                                      start_iter, rt.rank, rt.world, num_workers=args.num_workers, pin_memory=pin)
    target_batches = None if args.source_only else train_loader(
        SegDataset(target_train, target_transform, with_label=False), per_rank_batch, args.seed + 10_000,
        start_iter, rt.rank, rt.world, num_workers=args.num_workers, pin_memory=pin)
    torch.set_rng_state(loop_rng)
    train_model = rt.wrap(model)
    teacher_forward = networks.get("teacher")
    if args.compile:
        train_model = torch.compile(train_model)
        teacher_forward = torch.compile(teacher_forward) if teacher_forward is not None else None
    crop_h = crop[0] if crop else frame_size(target_train, target_transform)[0]
    pseudo_crop = [round(r * crop_h / 512) for r in args.pseudo_crop]  # the paper's rows are for 512-row crops

    # TRY NOT TO MODIFY: training loop
    running = {}
    log.start_loop(start_iter)
    progress = tqdm(range(start_iter, args.iters), initial=start_iter, total=args.iters, disable=not rt.is_main,
                    desc=SCRIPT, dynamic_ncols=True)
    for it in progress:
        lr = poly_lr(args.lr, it, args.poly_horizon, args.poly_power)
        lr *= warmup_factor(it, args.warmup_iters if args.warmup else 0, args.warmup_ratio)
        set_lr(optimizer, lr)

        # ALGO LOGIC: one iteration
        if not args.source_only and it > 0:
            ema_update(teacher, unwrap(model), ema_alpha_at(it, args.ema_alpha))
        images, labels, _ = next(source_batches)
        labels = labels.to(rt.device, non_blocking=True).long()
        source_x = to_input(images)
        optimizer.zero_grad(set_to_none=True)
        # source CE + FD backward first, which frees its graph (official dacs.py); DDP syncs once, after the mix
        with train_model.no_sync() if hasattr(train_model, "no_sync") and not args.source_only else nullcontext():
            with rt.autocast():
                feats, logits = train_model(source_x)
            losses = {"seg_src": weighted_ce(logits, labels)}
            if args.fd:
                with torch.no_grad(), rt.autocast():
                    imnet_feat = imnet_encoder.forward_intermediates(source_x, indices=[3], intermediates_only=True)
                losses["fd"] = args.fd_lambda * feature_distance(feats[-1], imnet_feat[0], labels, thing_lut,
                                                                 args.fd_purity, num_classes)
            rt.scaler.scale(sum(losses.values())).backward()
        if not args.source_only:
            target_images, _, _ = next(target_batches)
            target_x = to_input(target_images)
            with torch.no_grad():
                with rt.autocast():
                    teacher_logits = teacher_forward(target_x)[1]
                pseudo, pseudo_weight, q = pseudo_labels(teacher_logits, target_x.shape[-2:], args.pseudo_threshold,
                                                         pseudo_crop)
                mix = class_mix_masks(labels) if args.mix else torch.zeros_like(labels, dtype=torch.bool)
                m = mix[:, None].float()
                source_unit = images.to(rt.device, non_blocking=True).float() / 255
                target_unit = target_images.to(rt.device, non_blocking=True).float() / 255
                mixed = strong_augment(m * source_unit + (1 - m) * target_unit, args.jitter_p,
                                       args.jitter_strength, args.blur_p)
                mixed_labels = torch.where(mix, labels, pseudo)
                mixed_weight = torch.where(mix, torch.ones_like(pseudo_weight), pseudo_weight)
            with rt.autocast():
                _, mixed_logits = train_model(to_input(mixed * 255))  # [0, 1] -> normalised
            losses["mix"] = weighted_ce(mixed_logits, mixed_labels, mixed_weight)
            rt.scaler.scale(losses["mix"]).backward()
            losses["pseudo_weight"] = q
        rt.scaler.step(optimizer)
        rt.scaler.update()

        # TRY NOT TO MODIFY: logging, evaluation, checkpoints
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + v.detach()
        done = it + 1
        if done % args.log_every == 0 or done % args.checkpoint_every == 0 or done == args.iters:
            scalars = log.check_and_log(done, running, lr, args.batch_size, progress,
                                        write=done % args.log_every == 0 or done == args.iters)
            running = {} if scalars is not None else running
        if args.eval_every and done % args.eval_every == 0 and done != args.iters:
            log.log_eval(done, evaluate_model())
        if done % args.checkpoint_every == 0 or done == args.iters:
            checkpoint(done)

    # TRY NOT TO MODIFY: final evaluation
    summary = evaluate_model(final=True)
    log.log_eval(args.iters, summary)
    log.write_results(summary, args.iters)
    log.close()
    rt.close()


if __name__ == "__main__":
    guard(main)
