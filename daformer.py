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
1024x2048 labels (both bilinear, align_corners=False; mmseg encoder_decoder.py:77-81,228-233), the protocol of
the official tools/test.py on a release (`--eval-only --weights latest.pth`). SYNTHIA (19-way head, `--source
synthia`): results.json's miou16 is the mean of the 16 classes' IoUs from the 19-class confusion; the official
number is the logged mIoU19 x 19/16 (#18), the same value when the three classes SYNTHIA lacks score IoU 0.
Reported (paper): GTA5->Cityscapes 68.3 mIoU, SYNTHIA->Cityscapes 60.9 mIoU16 (mean of seeds 0, 1, 2); the
released checkpoints (median seed): 68.85 and 61.3 mIoU16.

Deviations from the official code (all deliberate):
- init: timm's ImageNet `pvt_v2_b5` (a different pretraining than SegFormer's `mit_b5.pth`, which loads with
  `--init PATH`). Weights files are recognised by their content (read_daformer_weights), their MiT/mmseg key names
  mapped to timm's and ours, every tensor loaded or listed, the flags they imply (backbone, decoder, width,
  normalisation) applied unless typed: SegFormer's ImageNet `mit_b5.pth` (raw, 'state_dict' or 'model'; its ImageNet
  classifier set aside; official: a non-strict load that ignores what does not fit), the DAFormer releases
  (`latest.pth`: mmcv `model.`/`ema_model.`/`imnet_model.`), mmseg MiT segmentors (`backbone.`/`decode_head.`: encoder
  and head; official load_from puts such a file into the UDA wrapper, where no key matches and nothing loads),
  timm pvt_v2 state dicts and our checkpoints. `--eval-only --weights` evaluates a file's student, as tools/test.py.
  `--init FILE` loads the student; the EMA teacher starts as its copy (the file's teacher is set aside: the official
  _init_ema_weights re-copies the student at iteration 0 after load_from); the frozen FD encoder (`--fd-init auto`)
  takes the FD encoder the file holds (a release's imnet_model, as load_from does), else timm's ImageNet weights for
  a trained segmentation model, else a copy of the student's initial encoder.
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
  mmseg/core/evaluation/eval_hooks.py:73-79), so the sharded score is that of the saved checkpoint. Tested: 2
  processes x 1 pair end train_step with 1 process x 2 pairs' student and teacher once those per-process parts are
  made equal (decoder BN in eval mode, tau 0 so q = 1, a ClassMix mask and augmentation per image); the rest above
  differs by construction.
- `--preset quick` (CPU, toy pair): timm pvt_v2_b0 (MLP ratios 8/8/4/4, so not MiT-B0), random init (the FD
  "ImageNet" encoder is then the initial encoder), decoder width 64, 128x128 crops, 150 iterations of 2+2,
  AdamW 1e-3, warm-up 6, EMA alpha 0.99 (DACS's value; 0.999 averages over more iterations than the run has).
- `--source-only` trains the same network on the source alone (the fair baseline); RCS, FD, warm-up stay as set.
Docs: README.md, section "Methods"; toy benchmark: benchmarks/daformer.md.
"""
import copy
import dataclasses
import functools
import json
import math
import os
import re
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
from tqdm import tqdm

from common.checkpoint import (load_checkpoint, load_matching, read_weights_file, resume_path, rng_state,
                               save_checkpoint, set_rng_state)
from common.cli import UserError, guard, imply, parse_args
from common.data import SegDataset, TrainTransform, _worker_init, class_setup, domain_split, normalize, train_loader
from common.metrics import evaluate_target
from common.runlog import RunLog, param_counts
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir, unwrap

SCRIPT = "daformer"


@dataclass
class Args:
    source: str = "gta"
    """source domain: gta, synthia, cityscapes (the oracle), a toy domain (toy-synth, toy-real, toy2-synth, toy2-real)
    or a folder dataset path"""
    target: str = "cityscapes"
    """target domain, evaluated on its val split (built-in name or folder dataset path)"""
    data_root: str = "data"
    """folder holding gta/, synthia/, cityscapes/"""
    preset: Literal["paper", "quick"] = "paper"
    """paper: the published recipe; quick: CPU-sized run on the toy domains (explicit flags override it)"""
    backbone: str = "pvt_v2_b5"
    """timm encoder: pvt_v2_b5 (= MiT-B5, paper) or pvt_v2_b0..b4 (MLP ratios 8/8/4/4, not MiT-B0..B4)"""
    init: str = "imagenet"
    """imagenet (timm weights), none (random) or a local file recognised by its content: SegFormer's mit_b5.pth, a
    DAFormer release (its student), an mmseg MiT segmentor, a timm pvt_v2 state dict or one of our checkpoints"""
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
    """file to evaluate with --eval-only: one of our checkpoints or an authors' release (README, released models)"""
    save_predictions: Optional[str] = None
    """write every target-val prediction of the final evaluation as a PNG into this folder (Cityscapes: label
    ids at 2048x1024, named as the official evaluation and benchmark scripts expect)"""
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
    """input normalisation; auto: what the weights imply (imagenet, RGB mean/std, for MiT/pvt_v2 weights and the
    DAFormer releases); caffe: BGR, mean only"""
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
    """frozen FD encoder weights: imagenet (timm), a local file (mit_b5.pth; a DAFormer release or our checkpoint: the
    FD encoder it holds), or auto: the FD encoder the --init file holds (a DAFormer release's imnet_model, our
    checkpoint's), else timm's ImageNet weights when --init is a trained segmentation model, else the student's initial
    encoder (official: the ImageNet file, or load_from's imnet_model)"""
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


# ----------------------------------------------------------------------------------------------------
# Weights files (../shared/reference/released-models.md, DAFormer): recognised by their content, mapped to our names
# SegFormer's and mmseg's MixVisionTransformer names -> timm's pvt_v2 names (mix_transformer.py; applied in order)
MIT_TO_TIMM = [
    (r"^patch_embed1\.", "patch_embed."),
    (r"^patch_embed([234])\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
    (r"^block([1-4])\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^norm([1-4])\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
]
# mmseg's DAFormerHead names -> DecodeHead's (daformer_head.py, sep_aspp_head.py; an mmcv ConvModule is conv + bn, a
# DepthwiseSeparableConvModule depthwise_conv + pointwise_conv). The releases were saved with the legacy UniHead,
# which tools/test.py builds as DAFormerHead and loads non-strictly: its modules carry the same names.
DAFORMER_HEAD_TO_OURS = [
    (r"^embed_layers\.(\d)\.proj\.", r"embed.\1."),
    (r"^fuse_layer\.aspp_modules\.0\.conv\.", "branches.0.0."),
    (r"^fuse_layer\.aspp_modules\.0\.bn\.", "branches.0.1."),
    (r"^fuse_layer\.aspp_modules\.(\d)\.depthwise_conv\.conv\.", r"branches.\1.0.0."),
    (r"^fuse_layer\.aspp_modules\.(\d)\.depthwise_conv\.bn\.", r"branches.\1.0.1."),
    (r"^fuse_layer\.aspp_modules\.(\d)\.pointwise_conv\.conv\.", r"branches.\1.1.0."),
    (r"^fuse_layer\.aspp_modules\.(\d)\.pointwise_conv\.bn\.", r"branches.\1.1.1."),
    (r"^fuse_layer\.(bottleneck\.)?conv\.", "fuse.0."),  # the 3x3 bottleneck (daformer) or the 1x1 fusion (segformer)
    (r"^fuse_layer\.(bottleneck\.)?bn\.", "fuse.1."),
    (r"^conv_seg\.", "classifier."),
]
WEIGHTS_LAYOUTS = ("our checkpoints, DAFormer releases (mmcv model./ema_model./imnet_model.), mmseg MiT segmentors "
                   "(backbone./decode_head.), SegFormer MiT encoders (mit_b5.pth) and timm pvt_v2 state dicts")


def renamed(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


@functools.lru_cache(maxsize=None)
def pvt_v2_shapes(name):
    """{tensor name: shape} of timm's `name` encoder, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        encoder = timm.create_model(name, pretrained=False, num_classes=0)
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def encoder_of(encoder) -> dict:
    """{"backbone": name} of the timm pvt_v2 encoder whose tensors a (timm-named) state fits exactly, else {}."""
    shapes = {k: tuple(v.shape) for k, v in encoder.items()}
    name = next((n for n in timm.list_models("pvt_v2_b*") if pvt_v2_shapes(n) == shapes), None)
    return {"backbone": name} if name else {}


def decoder_of(head) -> dict:
    """The decoder flags a head state (our names) was built with."""
    if "embed.0.weight" not in head:
        return {}
    return {"decoder": "daformer" if "branches.0.0.weight" in head else "segformer",
            "decoder_dim": int(head["embed.0.weight"].shape[0])}


def read_daformer_weights(path, flag, script) -> dict:
    """Recognise a weights file by its content (never its name) and map it to DAFormerNet's names.

    Returns {"kind", "state": tensors under our names (encoder.*, head.*), "implied": the flags it implies, "iter",
    "num_classes" (None without a decoder), "trained" (a segmentation model rather than ImageNet weights),
    "fd_state": the FD encoder it holds (timm names) or None, "set_aside": the parts not used, "foreign_head": a key
    of a decode head other than DAFormerHead, or None}. Layouts:
    - a checkpoint of this repository (a "script" key, which must be `script`): its model, its FD encoder and the
      network flags it was trained with (its EMA teacher is set aside: a run started from it copies the student);
    - a DAFormer release, mmcv {'meta', 'state_dict'} of the DACS wrapper (uda_decorator.py:34, dacs.py:79-83):
      model.* is the student, which the official tools/test.py evaluates (revise_keys 'model.' -> '' and a
      non-strict load, :149-153); imnet_model.backbone.* is the frozen ImageNet encoder of FD; the EMA teacher
      ema_model.* and imnet_model's unused decode head are set aside (a run started from the file copies the
      student into the teacher, as the official _init_ema_weights does at iteration 0 after load_from);
    - an mmseg segmentor without the wrapper (backbone.*, decode_head.*): encoder and head;
    - an ImageNet MiT encoder (SegFormer's mit_b5.pth: patch_embed1.*, block1.*, ...; raw or under 'state_dict' or
      'model', as mix_transformer.py:349-357 reads it; its ImageNet classifier head.* set aside) or a timm pvt_v2
      state dict (patch_embed.*, stages.*).
    MiT names map to timm's pvt_v2 names (MIT_TO_TIMM), DAFormerHead names to DecodeHead's (DAFORMER_HEAD_TO_OURS).
    A flag typed on the command line beats what the file implies (common.cli.imply warns).
    """
    state = read_weights_file(path, flag)
    if isinstance(state, dict) and "script" in state:  # ours
        if state["script"] != script:
            raise UserError(f"{path} was written by {state['script']}, not {script}")
        saved = state.get("args", {})
        implied = {k: saved[k] for k in ("backbone", "decoder", "decoder_dim") if k in saved}
        implied["normalization"] = state.get("normalization", "imagenet")
        return {"kind": f"{script} checkpoint", "state": state["model"], "implied": implied,
                "iter": state.get("iter", 0), "num_classes": state.get("num_classes"), "trained": True,
                "fd_state": state.get("imnet_encoder"), "set_aside": ["its EMA teacher"] if "teacher" in state else [],
                "foreign_head": None}
    meta = state.get("meta") if isinstance(state, dict) else None
    for key in ("state_dict", "model"):  # mmcv's wrapper, or the other one mix_transformer.py accepts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path} is not a DAFormer/MiT weights file: accepted are {WEIGHTS_LAYOUTS}")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # a DataParallel save (tools/test.py :152)

    def part(prefix):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    fd_state, set_aside = None, []
    if "model.backbone.patch_embed1.proj.weight" in state:  # the DACS wrapper of a UDA run
        kind, student = "DAFormer release (mmcv UDA checkpoint)", part("model.")
        fd_state = renamed(part("imnet_model.backbone."), MIT_TO_TIMM) or None
        used = ("model.", "imnet_model.backbone.")
        for prefix, what in (("ema_model.", "EMA teacher"), ("imnet_model.decode_head.", "FD model's unused head")):
            if part(prefix):
                set_aside.append(f"{prefix}* ({what}, {len(part(prefix))} tensors)")
                used += (prefix,)
        left = [k for k in state if not k.startswith(used)]
        if left:
            raise UserError(f"{flag} {path}: a DAFormer release with parts this script does not know ({left[0]}, "
                            f"...); accepted are {WEIGHTS_LAYOUTS}")
    elif "backbone.patch_embed1.proj.weight" in state:
        kind, student = "mmseg MiT segmentor", state
    elif "patch_embed1.proj.weight" in state:
        kind, student = "SegFormer MiT encoder", {"backbone." + k: v for k, v in state.items()
                                                   if not k.startswith("head.")}
        classifier = len(state) - len(student)
        set_aside = [f"head.* (ImageNet classifier, {classifier} tensors)"] if classifier else []
    elif "patch_embed.proj.weight" in state and any(k.startswith("stages.") for k in state):
        kind = "timm pvt_v2 encoder"
        student = {"backbone." + k: v for k, v in state.items() if not k.startswith("head.")}
    else:
        raise UserError(f"{flag} {path}: unrecognised layout (keys such as {', '.join(list(state)[:3])}); accepted "
                        f"are {WEIGHTS_LAYOUTS}")
    encoder = {k[len("backbone."):]: v for k, v in student.items() if k.startswith("backbone.")}
    encoder = encoder if kind == "timm pvt_v2 encoder" else renamed(encoder, MIT_TO_TIMM)
    head = renamed({k[len("decode_head."):]: v for k, v in student.items() if k.startswith("decode_head.")},
                   DAFORMER_HEAD_TO_OURS)
    others = {k: v for k, v in student.items() if not k.startswith(("backbone.", "decode_head."))}  # listed on load
    foreign = [k for k in head if not k.startswith(("embed.", "branches.", "fuse.", "classifier."))]
    fits = encoder_of(encoder)
    if not fits:
        raise UserError(f"{flag} {path} ({kind}): its encoder fits none of timm's pvt_v2 encoders (MiT-B5 is "
                        f"pvt_v2_b5; MiT-B0..B4 differ from pvt_v2_b0..b4 in their MLP ratios)")
    return {"kind": kind, "state": {**{"encoder." + k: v for k, v in encoder.items()},
                                    **{"head." + k: v for k, v in head.items()}, **others},
            "implied": {**fits, **decoder_of(head), "normalization": "imagenet"},
            "iter": int(meta.get("iter", 0)) if isinstance(meta, dict) else 0,
            "num_classes": int(head["classifier.weight"].shape[0]) if "classifier.weight" in head else None,
            "trained": bool(head), "fd_state": fd_state, "set_aside": set_aside,
            "foreign_head": f"decode_head.{foreign[0]}" if foreign else None}


def prepare_daformer_weights(args, ckpt_path, script, num_classes) -> Optional[dict]:
    """Read the file of --eval-only --weights, --resume or --init, apply the flags it implies (typed flags win) and
    print one line on what was recognised: source_only.prepare_weights for DAFormer's layouts."""
    found = None
    if args.normalization == "auto":  # typed or not, auto means: what the file implies
        args.given = args.given - {"normalization"}
    if args.weights and not args.eval_only:
        raise UserError("--weights is read by --eval-only; to start training from a file use --init PATH")
    if args.eval_only:
        if len(args.weights) != 1:
            raise UserError("--eval-only needs exactly one --weights PATH")
        found = read_daformer_weights(args.weights[0], "--weights", script)
        if found["foreign_head"]:  # SegFormerHead, HRDA's head, ...: its encoder alone is no segmentation model
            raise UserError(f"--weights {args.weights[0]} ({found['kind']}) has a decode head other than DAFormer's "
                            f"(keys such as {found['foreign_head']}); start training from its encoder with --init")
        if found["num_classes"] is None:
            raise UserError(f"--weights {args.weights[0]} is an encoder without a decoder ({found['kind']}); "
                            f"start training from it with --init")
    elif ckpt_path:  # the network flags it was trained with; its normalisation comes back with the rest of its state
        found = read_daformer_weights(ckpt_path, "--resume", script)
        found["implied"].pop("normalization")
    elif args.init not in ("imagenet", "none"):
        found = read_daformer_weights(args.init, "--init", script)
    if found is not None and (args.eval_only or ckpt_path) and found["num_classes"] != num_classes:
        raise UserError(f"{args.weights[0] if args.eval_only else ckpt_path or args.init} has "
                        f"{found['num_classes']} classes, this run has {num_classes}")
    if found is not None:
        found["applied"] = imply(args, found["implied"], found["kind"])
        quirks = {"backbone": "{}", "decoder": "{} decoder", "decoder_dim": "width {}", "normalization": "{} input"}
        said = [quirks[k].format(v) for k, v in found["applied"].items()] + [
            f"set aside {what}" for what in found["set_aside"]]
        print(f"recognised {found['kind']}" + (f": {', '.join(said)}" if said else ""), flush=True)
    return found


def load_init(model, init, backbone, found=None):
    """Load --init into the student (found: read_daformer_weights' result for a file). Returns (normalisation, what
    the encoder now holds: "random", "imagenet", or "trained" for a segmentation model). The encoder must load
    completely; head tensors the file lacks or that do not fit (another class count) stay as initialised, listed."""
    if init == "none":
        return "imagenet", "random"
    if init == "imagenet":
        state = {"encoder." + k: v for k, v in imagenet_weights(backbone, "--init").items()}
        found = {"kind": "timm ImageNet weights", "state": state, "implied": {"normalization": "imagenet"},
                 "trained": False}
    load_matching(model, found["state"], f"--init {init} ({found['kind']})",
                  required=lambda k: k.startswith("encoder."))
    return found["implied"]["normalization"], "trained" if found["trained"] else "imagenet"


def imagenet_weights(backbone, flag):
    """timm's ImageNet weights of the encoder (downloaded once into the Hugging Face cache)."""
    try:
        return timm.create_model(backbone, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # offline, no cached weights
        raise UserError(f"{flag} imagenet: cannot get timm's ImageNet {backbone} weights ({type(e).__name__}); pass "
                        f"{flag} PATH (SegFormer's mit_b5.pth) or {'--init none' if flag == '--init' else '--no-fd'}"
                        ) from None


def fd_encoder(model, fd_init, student_init, backbone, found=None):
    """The frozen encoder of the feature distance. Official: imnet_model, built from the ImageNet file (dacs.py:82-83),
    or load_from's imnet_model when a run starts from a UDA checkpoint. auto: the FD encoder the --init file holds
    (found["fd_state"]), else timm's ImageNet weights when the student starts from a trained segmentation model, else
    a copy of the student's initial encoder (its ImageNet weights; with --init none, random ones). student_init None
    (resume, eval-only, dry run): a copy, loaded later or unused."""
    encoder = copy.deepcopy(model.encoder).requires_grad_(False).eval()
    if student_init is None:
        return encoder
    if fd_init == "auto" and found is not None and found["fd_state"] is not None:
        state, source = found["fd_state"], f"auto (the FD encoder of the --init {found['kind']})"
    elif fd_init == "imagenet" or fd_init == "auto" and student_init == "trained":
        state, source = imagenet_weights(backbone, "--fd-init"), f"{fd_init} (timm ImageNet weights)"
    elif fd_init == "auto":
        return encoder
    else:
        file = read_daformer_weights(fd_init, "--fd-init", SCRIPT)
        if file["fd_state"] is None and file["trained"]:
            raise UserError(f"--fd-init {fd_init} is a trained segmentation model without an FD encoder; the feature "
                            f"distance compares with ImageNet weights (imagenet or a file such as mit_b5.pth)")
        state = file["fd_state"] if file["fd_state"] is not None else {
            k.removeprefix("encoder."): v for k, v in file["state"].items()}
        source = f"{fd_init} ({file['kind']})"
    load_matching(encoder, state, f"--fd-init {source}", required=lambda k: True, unused_ok=lambda k: False)
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


def rcs_loader(dataset, sampler, batch_size, num_workers, pin_memory):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, drop_last=True, worker_init_fn=_worker_init,
                                         persistent_workers=num_workers > 0,
                                         prefetch_factor=4 if num_workers > 0 else None)
    return iter(loader)


def logits_at_input(logits, images):
    """mmseg's whole-image inference (encoder_decoder.py:77-81): the H/4 logits resized to the input first, bilinear
    with align_corners False (common.metrics then resizes them to the label size the same way, :228-233)."""
    return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: one training iteration (main() calls it; tests/test_daformer.py checks it against a reference)
def train_step(model, teacher, imnet_encoder, optimizer, rt, it, images, labels, target_images, to_input, args,
               thing_lut, pseudo_crop):
    """One DAFormer iteration in the official order (dacs.py forward_train, then the optimizer step):
    1. t >= 1: EMA teacher update from the student's current weights (parameters only);
    2. source CE + thing-class feature distance to the frozen ImageNet encoder (source images only), one backward;
    3. teacher pseudo labels on the un-augmented target images, under no_grad (BN in train mode): argmax, weight q
       (share of confident pixels) with the top/bottom pseudo_crop rows at 0;
    4. ClassMix of source pixels into the target images (image, labels, and weight 1 on source pixels, the pseudo
       weight elsewhere), jitter and blur on the mixed image only, pixel-weighted CE on the mix, backward;
    5. one optimizer step on the summed gradients.
    images and target_images are uint8 batches, labels train ids on the device. teacher None: --source-only (steps 1,
    3, 4 skipped); imnet_encoder None: --no-fd. Returns the losses by name (and q as pseudo_weight)."""
    if teacher is not None and it > 0:
        ema_update(teacher, unwrap(model), ema_alpha_at(it, args.ema_alpha))
    source_x = to_input(images)
    optimizer.zero_grad(set_to_none=True)
    # source CE + FD backward first, which frees its graph (official dacs.py); DDP syncs once, after the mix
    with model.no_sync() if hasattr(model, "no_sync") and teacher is not None else nullcontext():
        with rt.autocast():
            feats, logits = model(source_x)
        losses = {"seg_src": weighted_ce(logits, labels)}
        if imnet_encoder is not None:
            with torch.no_grad(), rt.autocast():
                imnet_feat = imnet_encoder.forward_intermediates(source_x, indices=[3], intermediates_only=True)
            losses["fd"] = args.fd_lambda * feature_distance(feats[-1], imnet_feat[0], labels, thing_lut,
                                                             args.fd_purity, logits.shape[1])
        rt.scaler.scale(sum(losses.values())).backward()
    if teacher is not None:
        target_x = to_input(target_images)
        with torch.no_grad():
            with rt.autocast():
                teacher_logits = teacher(target_x)[1]
            pseudo, pseudo_weight, q = pseudo_labels(teacher_logits, target_x.shape[-2:], args.pseudo_threshold,
                                                     pseudo_crop)
            mix = class_mix_masks(labels) if args.mix else torch.zeros_like(labels, dtype=torch.bool)
            m = mix[:, None].float()
            source_unit = images.to(labels.device, non_blocking=True).float() / 255
            target_unit = target_images.to(labels.device, non_blocking=True).float() / 255
            mixed = strong_augment(m * source_unit + (1 - m) * target_unit, args.jitter_p, args.jitter_strength,
                                   args.blur_p)
            mixed_labels = torch.where(mix, labels, pseudo)
            mixed_weight = torch.where(mix, torch.ones_like(pseudo_weight), pseudo_weight)
        with rt.autocast():
            _, mixed_logits = model(to_input(mixed * 255))  # [0, 1] -> normalised
        losses["mix"] = weighted_ce(mixed_logits, mixed_labels, mixed_weight)
        rt.scaler.scale(losses["mix"]).backward()
        losses["pseudo_weight"] = q
    rt.scaler.step(optimizer)
    rt.scaler.update()
    return losses


# ----------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args, PRESETS, description=__doc__)
    # TRY NOT TO MODIFY: setup
    rt = Runtime(args.device, args.amp)
    args.world_size, args.rank = rt.world, rt.rank
    args.poly_horizon = args.poly_horizon or args.iters  # none: the schedule ends with the run
    if args.batch_size % rt.world and not args.eval_only:
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
    found = prepare_daformer_weights(args, ckpt_path, SCRIPT, num_classes)  # the --init/--weights file, what it implies
    crop = tuple(args.crop_size * 2)[:2] if args.crop_size else None
    model = DAFormerNet(args.backbone, num_classes, args.decoder, args.decoder_dim, args.drop_path, args.dropout)
    norm, student_init = (load_init(model, args.init, args.backbone, found) if not (ckpt_path or args.eval_only or
                                                                                   args.dry_run) else (None, None))
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    optimizer = torch.optim.AdamW(model.param_groups(args.lr, args.head_lr_mult, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.999), weight_decay=args.weight_decay, fused=rt.device.type == "cuda")
    networks = {"model": model}
    if not args.source_only:  # the EMA teacher starts as a copy of the student (official _init_ema_weights)
        networks["teacher"] = teacher_mode(copy.deepcopy(model).requires_grad_(False))
    if args.fd:  # the frozen ImageNet encoder, and the thing classes it compares on
        networks["imnet_encoder"] = fd_encoder(model, args.fd_init, student_init, args.backbone, found)
        thing_ids = fd_class_ids(args.fd_classes, classes)
        args.fd_classes = [classes[c] for c in thing_ids]  # resolved, so that config.json names them
        thing_lut = torch.zeros(256, dtype=torch.bool, device=rt.device)
        thing_lut[thing_ids] = True
    if args.rcs and args.rcs_min_pixels is None and args.source in BUILTIN_SOURCES:
        args.rcs_min_pixels = 3000  # the paper's (gta2cs_..._s0.py:36); other sources: scaled once counted

    # TRY NOT TO MODIFY: run folder, dry run, resume
    norm = args.normalization if args.normalization != "auto" else norm
    loaded = {"file": args.weights[0] if args.eval_only else ckpt_path or args.init, "kind": found["kind"],
              "implied": found["applied"]} if found is not None else None
    log = RunLog(out_dir, rt.is_main)
    log.write_config(SCRIPT, args, param_counts(**networks), normalization=norm, num_classes=num_classes,
                     loaded=loaded)
    if args.dry_run:
        print(f"dry run: config written to {log.path('config.json')}")
        return
    start_iter = 0
    if args.eval_only:  # every tensor of the student; a release's teacher and FD copy were set aside when read
        load_matching(model, found["state"], f"--weights {args.weights[0]} ({found['kind']})", required=lambda k: True,
                      unused_ok=lambda k: False)
        start_iter = found["iter"]
    elif ckpt_path:
        ckpt = load_checkpoint(ckpt_path, SCRIPT, num_classes)
        load_matching(model, ckpt["model"], f"--resume {ckpt_path}", required=lambda k: True, unused_ok=lambda k: False,
                      quiet=True)
        norm, start_iter = ckpt["normalization"], ckpt["iter"]
        for name in networks.keys() - {"model"}:  # the EMA teacher and the FD encoder
            if name not in ckpt:
                raise UserError(f"{ckpt_path} has no {name}: resume with the flags of the original run")
            load_matching(networks[name], ckpt[name], f"--resume {ckpt_path} ({name})", required=lambda k: True,
                          unused_ok=lambda k: False, quiet=True)
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

    def evaluate_model(final=False):
        rt.share_buffers(model)  # rank 0's BN statistics on every rank: the network its checkpoint holds
        model.eval()
        with torch.no_grad(), rt.autocast():
            summary = evaluate_target(lambda x: logits_at_input(model(to_input(x))[1], x), target_val, rt,
                                      align_corners=False, log=log,
                                      num_predictions=args.num_predictions if final else 0, limit=args.eval_limit,
                                      eval_size=eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19,
                                      save_dir=args.save_predictions if final else None, num_workers=args.num_workers,
                                      interpolation=INTERPOLATION)
        model.train()
        return summary

    if args.eval_only:
        summary = evaluate_model(final=True)
        log.write_results(summary, start_iter, weights=args.weights, loaded=loaded)
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
    train_model, teacher, imnet_encoder = rt.wrap(model), networks.get("teacher"), networks.get("imnet_encoder")
    if args.compile:
        train_model = torch.compile(train_model)
        teacher = torch.compile(teacher) if teacher is not None else None
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
        images, labels, _ = next(source_batches)
        labels = labels.to(rt.device, non_blocking=True).long()
        target_images = None if args.source_only else next(target_batches)[0]
        losses = train_step(train_model, teacher, imnet_encoder, optimizer, rt, it, images, labels, target_images,
                            to_input, args, thing_lut if args.fd else None, pseudo_crop)

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
