"""FCNs in the Wild: global domain confusion on fc7 cells plus category-specific size constraints.

Hoffman, Wang, Yu, Darrell, "FCNs in the Wild: Pixel-level Adversarial and Constraint-based Adaptation",
arXiv 2016, https://arxiv.org/abs/1612.02649. There is NO official code and the paper states no
hyperparameters. The method adapts a dilated VGG-16 front-end already trained on the source, so one run has
two phases (`--adapt-start` splits them; `--preset paper`: 40,000 + 1,000 iterations):
1. Source phase (iterations 0 .. 39,999): Yu & Koltun's front-end training, "Multi-Scale Context Aggregation
   by Dilated Convolutions", ICLR 2016, Appendix A ("This procedure applies to all datasets"): SGD, mini-batches
   of 8 (crops), learning rate 1e-4, momentum 0.99; A.3: the Cityscapes front-end for 40K iterations. The
   solver and layer settings are fyu/dilation's: train.py make_solver (weight_decay 0.0005, L2; lr policy
   "step" x0.1 every 100,000 iterations, i.e. constant over 40K), network.py build_frontend_vgg (weights lr x1
   and decay x1, biases lr x2 and no decay, fc8 "final" N(0, 0.001)). Neither paper nor third-party code says
   how long the GTA5/SYNTHIA front-ends were trained (the TF code restores a front-end it downloads,
   scripts/train_syn2city.sh:3, scripts/download_src.sh:2-5): 40K is Yu & Koltun's Cityscapes count
   (project choice). Its result is the paper's "source only" row: evaluated at iteration 40,000
   (`--eval-every 1000`) and saved as checkpoints/source_phase.pt (`--init` or `--eval-only --weights`).
2. Adaptation phase (1,000 updates): the unofficial TF1 code stu92054/Domain-adaptation-on-segmentation,
   FCNs_Wild/ (THIRD-PARTY values; file:line below are of that folder).
Recipe (source_only.py plus the method; the network is not DeepLab-v2 but the dilated VGG-16 front-end):
- Network: Yu & Koltun's VGG-16 front-end (models/model.py:81-108): pool4/pool5 removed, conv5 dilation 2,
  fc6 7x7 conv 512->4096 dilation 4 pad 12, fc7 1x1 4096->4096 (ReLU + Dropout 0.5 each), fc8 1x1 -> C,
  output stride 8. ImageNet init: torchvision VGG-16 (classifier.0/classifier.3 reshaped into fc6/fc7).
- GA (global alignment): a fully convolutional domain classifier D on the fc7 cells (1x1 convs
  4096->1024->1024->1 logit, ReLU + Dropout 0.5, N(0, 0.001) init; model.py:161-185, 283-284), every cell
  one instance. Domain labels source 0, target 1, as the TF code (src/data_reader.py:88, 96) and methods.md 0.2.
  D minimises its BCE on detached features; the features minimise the confusion loss 1/2 (L_D + L_Dinv)
  (= BCE toward 1/2 per cell; src/train_adv.py:125) with D fixed. Alternating objectives, no gradient
  reversal. `d_acc` in metrics.jsonl is D's cell accuracy (the TF code's GA_domain_accur, model.py:176).
- CA (category-specific adaptation, on target images; src/custom_grad.py): per-class pixel-fraction
  statistics of the source labels over the images containing the class (alpha = 10th percentile, delta =
  mean, gamma = 90th percentile; cached as JSON, printed in the log; the TF code hard-codes its own,
  custom_grad.py:25-58). Class c is present in a target image if its argmax fraction exceeds 0.1 alpha_c
  (:85; absent: P(c) = 0, :87). P = argmin KL(P||Q) subject to mean P(c) >= delta_c (slack, weight 2; :16,
  :95) and mean P(c) <= gamma_c (hard, :96), i.e. P prop. to Q exp(lambda_c - mu_c), solved by projected
  gradient ascent on the dual. Loss KL(P||Q)/N with P fixed (logit gradient (Q - P)/N, :104, :109),
  gradient x0.1 for road, building and vegetation (:126-128, fixed by name; `--ca-large-classes`). Q:
  softmax of the x8-upsampled prediction, subsampled x4 (:20, :64).
- Optimisation (third-party): one Adam per objective, each with its own moments (train_adv.py:185-188), so
  the learning-rate multipliers act as in the TF code (with Adam a multiplier on a loss would be
  normalised away): task (F + fc8, lr 1e-6, :292), D (lr x10, :296), confusion (F = conv1..fc7, lr x
  2/(1+exp(-10 t/T)) - 1, :297), CA (F + fc8, lr x0.1, :299). Weight decay 5e-4 (model.py:35) on the
  weights of conv1_1..conv5_3 and fc6 only, through the task objective: the TF code adds their L2 to the
  task loss (get_conv_filter, model.py:381-383; fc6 is built by _dilated_conv_layer, :102), while fc7 and
  fc8 (get_fc_weight_reshape, :507-515; their L2 goes to the unused "fc_wlosses" collection, :247), biases
  and D ("dec_losses", :484-489) are not decayed. All gradients are taken at the same parameters from one
  source and one target forward (one autograd.grad per objective), then every optimiser steps.
  Constant lr (poly power 0). 512x256 inputs (no crop; train_adv.py:22-23), evaluation at 512x256
  (src/infer.py:27-28, 178).
- Resizing: images with OpenCV INTER_LINEAR (`cv2-bilinear`: cv2.resize's default, no antialiasing;
  data_reader.py:71, 79 for training, infer.py:178 for evaluation); labels nearest (OpenCV INTER_NEAREST,
  data_reader.py:73).
- Mixed precision: on CUDA the forward and backward passes run under bf16 autocast (fp16 with a GradScaler
  where bf16 is missing) with TF32 matmuls by default; the paper trained in fp32 (`--no-amp` gives fp32).
  Losses, softmax, the domain BCE, the CA presence test and constraint solve (dual ascent on the softmax)
  and the evaluation upsampling and argmax are computed in fp32.
Reported (paper, mIoU): GTA5->Cityscapes source only 21.1, GA 25.5, GA+CA 27.1;
SYNTHIA->Cityscapes 14.7 / 16.6 / 17.0 (mean over 19 columns; 20.2 over 16 classes).
`--no-global-alignment` / `--no-category-alignment` give the ablation rows.

Deviations:
- Units: one iteration here is one optimiser update of `--batch-size` source + as many target images,
  split into `--grad-accum` micro-batches. The TF code counts micro-steps (batch 8 = 4+4, iter_size 2,
  max_step 2000 = 1000 updates of 8+8, scripts/train_syn2city.sh:8-10; its ramp scale 1200 micro-steps =
  600 updates), hence batch 8, grad accumulation 2, 1000 adaptation iterations and ramp 600 here. It
  applies its CA update every micro-step without accumulation (train_adv.py:248); here CA is accumulated
  like the other objectives.
- The TF code runs task, D and confusion in three sess.run calls (three forwards, sequential updates)
  and averages D over 2 softmax logits; here one forward per domain, gradients at the same point, and a
  1-logit BCE domain classifier (equivalent). It keeps an EMA of the weights that nothing reads: not kept.
  Its task loss is the masked cross-entropy averaged over all pixels, ignored ones included
  (model.py:144-150); here over the valid pixels (seg_loss, as source_only.py).
- Upsampling: bilinear interpolation of the stride-8 logits (align_corners=True, as source_only.py)
  instead of a learned 16x16/8 deconvolution (model.py:301-336, restored from the front-end file), so
  there is no upsampling filter to decay (the TF code decays it, model.py:366-368).
- CA: the CCNN C++ solver is replaced by projected gradient ascent on the dual (`--ca-solver-steps`);
  the CA gradient is averaged over the batch's target images (the TF code sums them; Adam removes the scale);
  the most frequent predicted class always counts as present (so P is defined).
- Source phase: whole frames resized to 512x256 (the adaptation's input) instead of Yu & Koltun's 628x628
  crops of reflection-padded images (their network pads no layer; this one pads every layer), and the loss
  on the upsampled logits at label resolution instead of on labels sliced at stride 8 (network.py
  make_image_label_data). Between the phases the task Adam starts with empty moments (the TF code builds
  fresh Adams around the restored front-end, train_adv.py:185-188, 266-270).
- Normalisation follows the init (ImageNet mean/std for torchvision weights) instead of per-dataset BGR
  means (model.py:14-20, 63-69).
- No DDP wrapper: several backward passes over one forward are not supported by DDP, so each objective's
  gradients are averaged over the ranks with one all_reduce per step.
- D is initialised from seed + 1 in a forked RNG, and the class statistics leave the RNG alone too, so a
  run's source phase equals the same run with --no-global-alignment --no-category-alignment.
- `--preset quick` (toy domains, CPU): source_only.py's shared values (400 iterations, batch 4, seed 0,
  poly 0.9 over the run, 96x192 frames) with `vgg16_small` trained from scratch (`--init none`) by Adam 3e-4
  in both phases (`--source-optimizer adam`: the task Adam; 1e-6 is meant for fine-tuning a trained
  front-end), no grad accumulation, `--adapt-start 200` source-phase iterations, then 200 GA+CA iterations
  with the third-party lr ratios unchanged (D x10, confusion x ramp, CA x0.1 of the task lr) and the
  confusion ramp over 0.6 x 200 = 120 iterations (as 1200 of 2000 micro-steps). `--adapt-lr-mult`
  (project addition, default 1 = the third-party ratios) scales the D, confusion and CA lrs against the task
  lr. Toy results (benchmarks/fcn_wild.md): on toy2 (no label shift, 1,000 iterations, seed 0) CA alone
  adapts (22.0 vs 16.1 for the same network trained source-only) and GA cancels it (GA+CA 16.7, GA 16.0):
  the fc7 domain classifier keeps winning and the confusion gradient opposes the segmentation gradient.
Docs: README.md, section "Methods"; benchmarks/fcn_wild.md.
"""
import dataclasses
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from common.checkpoint import (load_checkpoint, load_matching, read_weights_file, resume_path, rng_state,
                               save_checkpoint, set_rng_state)
from common.cli import UserError, guard, imply, parse_args
from common.data import SegDataset, TrainTransform, class_setup, domain_split, normalize, train_loader
from common.metrics import evaluate_target
from common.runlog import RunLog, param_counts, save_json
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir, unwrap

SCRIPT = "fcn_wild"


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
    backbone: str = "vgg16"
    """dilated VGG-16 front-end: vgg16 (paper) or vgg16_small (channels /8, fc6/fc7 512 wide, for CPU runs)"""
    init: str = "imagenet"
    """imagenet (torchvision VGG-16), none (random) or a local file, recognised by its content: a torchvision-layout
    VGG-16 state dict or a checkpoint of this script (e.g. checkpoints/source_phase.pt of an earlier run, with
    --adapt-start 0); the third-party TF code's .npy weights are refused (NumPy pickles: header, "Weights files")"""
    iters: int = 41000
    """training iterations = optimiser updates, both phases (paper: 40,000 source-phase iterations (Yu & Koltun's
    Cityscapes front-end) + 1,000 adaptation updates (third-party: 2000 micro-steps of 4+4 = 1000 updates of 8+8))"""
    batch_size: int = 8
    """global source batch per update (as many target images while adapting), split over torchrun processes and
    --grad-accum micro-batches (Yu & Koltun: 8 crops; third-party: 8 = 2 micro-batches of 4)"""
    crop_size: Optional[list[int]] = None
    """random crop H [W] after resizing; none trains on whole resized frames (paper: none)"""
    lr: float = 1e-6
    """Adam learning rate of the task objective; the other objectives use multiples (third-party: 1e-6)"""
    seed: int = 1234
    """seed of every random choice (AdaptSegNet: 1234)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: cuda if available"""
    amp: bool = True
    """mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler)"""
    num_workers: int = 4
    """data-loading processes per training process"""
    eval_every: int = 1000
    """evaluate on the target val split every N iterations (0: only at the end); paper: 1000, so iteration 40,000
    (the end of the source phase) is evaluated: the paper's source-only row"""
    checkpoint_every: int = 1000
    """write checkpoints/last.pt every N iterations"""
    out: Optional[str] = None
    """run folder (default runs/<script>-<source>2<target>-s<seed>-<timestamp>)"""
    resume: Optional[str] = None
    """auto (the newest matching run folder's last.pt) or a checkpoint path"""
    eval_only: bool = False
    """evaluate --weights on the target val split, write results.json, exit"""
    weights: list[str] = field(default_factory=list)
    """file to evaluate with --eval-only: one of our checkpoints (last.pt or source_phase.pt); no FCNs-in-the-Wild
    model is released (header, "Weights files")"""
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
    """resize source frames to H W (default: 256 512 for GTA5, SYNTHIA and Cityscapes (third-party), else native)"""
    target_size: Optional[list[int]] = None
    """resize target frames to H W for training (default: 256 512 for Cityscapes (third-party), else native)"""
    eval_size: Optional[list[int]] = None
    """evaluation input H W; logits are upsampled to the full label size (default: as target_size)"""
    eval_limit: Optional[int] = None
    """score only the first N target val images (default: all)"""
    num_predictions: int = 4
    """colour-coded target-val predictions saved to predictions/ at the end"""
    synthia_classes: int = 19
    """classes of the head when the source is SYNTHIA: 19 (evaluated on 16/13) or 16"""
    normalization: Literal["auto", "imagenet", "caffe"] = "auto"
    """input normalisation; auto: what the weights imply (imagenet for torchvision weights, a checkpoint's own)"""
    weight_decay: float = 5e-4
    """L2 weight decay: source phase (SGD) every weight, no bias (Yu & Koltun: 5e-4); adaptation phase the
    weights of conv1_1..conv5_3 and fc6 in the task Adam (third-party: 5e-4; fc7, fc8, biases and D undecayed)"""
    head_lr_mult: float = 1.0
    """learning-rate multiplier of fc8 in the task and CA optimisers (third-party: 1)"""
    poly_horizon: Optional[int] = None
    """poly schedule horizon T in lr*(1-t/T)^power; none: the run length (--iters); unused with power 0"""
    poly_power: float = 0.0
    """poly schedule power; 0 keeps the lr constant (third-party: constant)"""

    # Algorithm specific arguments
    global_alignment: bool = True
    """GA: fc7 domain classifier + domain confusion; --no-global drops it (paper ablation; third-party: on)"""
    category_alignment: bool = True
    """CA: size-constrained loss on target predictions; --no-category drops it (both off = source only)"""
    grad_accum: int = 2
    """micro-batches per update; gradients are averaged over them (third-party iter_size: 2)"""
    d_lr_mult: float = 10.0
    """learning-rate multiplier of the domain classifier's Adam (third-party: 10)"""
    confusion_ramp_iters: int = 600
    """T of the confusion lr multiplier 2/(1+exp(-10 t/T)) - 1 (third-party: 1200 micro-steps = 600 updates)"""
    ca_lr_mult: float = 0.1
    """learning-rate multiplier of the CA Adam (third-party: 0.1)"""
    adapt_start: int = 40000
    """source-phase iterations (source-only training of the front-end) before GA and CA start; the confusion ramp
    counts from here; 0 adapts the --init weights at once (paper: 40,000, Yu & Koltun's Cityscapes front-end)"""
    source_optimizer: Literal["sgd", "adam"] = "sgd"
    """optimiser of the source phase: sgd (Yu & Koltun: --source-lr, --source-momentum, biases at 2x the lr and
    undecayed) or adam (the task Adam at --lr, which continues into the adaptation phase; quick preset)"""
    source_lr: float = 1e-4
    """SGD learning rate of the source phase (Yu & Koltun, Appendix A: 1e-4)"""
    source_momentum: float = 0.99
    """SGD momentum of the source phase (Yu & Koltun, Appendix A: 0.99)"""
    adapt_lr_mult: float = 1.0
    """multiplier of the D, confusion and CA learning rates relative to the task lr, on top of d_lr_mult, the ramp
    and ca_lr_mult (third-party: 1, all multiples of the one lr 1e-6)"""
    ca_subsample: int = 4
    """CA works on every k-th pixel of the upsampled prediction (third-party: 4)"""
    ca_presence: float = 0.1
    """class c is present in a target image if its argmax fraction > ca_presence * alpha_c (third-party: 0.1)"""
    ca_slack: float = 2.0
    """slack weight of the lower bound delta_c, i.e. the cap of its dual variable (third-party: 2)"""
    ca_large_classes: list[str] = field(default_factory=lambda: ["road", "building", "vegetation"])
    """class names whose CA gradient is scaled by --ca-large-weight; names the class list lacks are listed in the
    log (third-party: road, building, vegetation)"""
    ca_large_weight: float = 0.1
    """CA gradient factor of the --ca-large-classes (third-party: 0.1)"""
    ca_solver_steps: int = 100
    """projected gradient ascent steps on the dual of the constrained projection (project choice)"""
    ca_solver_step_size: float = 2.0
    """step size of that ascent (project choice)"""
    stats_images: int = 0
    """source images used for the class-size statistics (0: all; datasets.md section 8)"""

    # to be filled in runtime
    world_size: int = field(default=0, metadata={"runtime": True})
    rank: int = field(default=0, metadata={"runtime": True})


PRESETS = {
    "paper": {},
    "quick": dict(source="toy-synth", target="toy-real", backbone="vgg16_small", init="none", iters=400, batch_size=4,
                  lr=3e-4, eval_every=0, checkpoint_every=100, num_workers=1, log_every=10, poly_horizon=None,
                  seed=0, source_size=[96, 192], target_size=[96, 192],
                  poly_power=0.9, grad_accum=1, adapt_start=200, source_optimizer="adam", confusion_ramp_iters=120),
}
FCN_INPUT_SIZE = [256, 512]  # H W of every real dataset (third-party: 512x256, resize only)
RESIZE = "cv2-bilinear"  # cv2.resize's default INTER_LINEAR for images, INTER_NEAREST labels (data_reader.py:71-79)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the dilated VGG-16 front-end (Yu & Koltun) and the fc7 domain classifier
VGG_WIDTHS = {"vgg16": ((64, 128, 256, 512, 512), 4096, 1024),  # conv stages, fc6/fc7, domain classifier
              "vgg16_small": ((8, 16, 32, 64, 64), 512, 128)}


class VGG16FrontEnd(nn.Module):
    """Output stride 8; forward returns (fc7 features after dropout, fc8 logits at stride 8).

    `features` keeps torchvision's vgg16 indices (pool4 and pool5 are Identity), so ImageNet weights load
    by name; conv5 has dilation 2, fc6 is a 7x7 conv with dilation 4 (pad 12)."""

    def __init__(self, backbone="vgg16", num_classes=19):
        super().__init__()
        if backbone not in VGG_WIDTHS:
            raise UserError(f"unknown backbone '{backbone}': use one of {', '.join(VGG_WIDTHS)}")
        widths, fc_width, _ = VGG_WIDTHS[backbone]
        layers, channels = [], 3
        for stage, (width, convs) in enumerate(zip(widths, (2, 2, 3, 3, 3))):
            dilation = 2 if stage == 4 else 1
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True) if stage < 3 else nn.Identity())
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(channels, fc_width, 7, padding=12, dilation=4)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.fc8 = nn.Conv2d(fc_width, num_classes, 1)
        self.dropout = nn.Dropout(0.5)
        for m in self.modules():  # He init (fan_in keeps the activation scale of this BN-free net from scratch)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, 0, 0.001)  # fyu/dilation network.py: "final" gaussian std 0.001

    def forward(self, x):
        x = self.dropout(F.relu(self.fc6(self.features(x))))
        fc7 = self.dropout(F.relu(self.fc7(x)))
        return fc7, self.fc8(fc7)

    def feature_params(self):
        """F of the paper: conv1_1 .. fc7 (everything but fc8)."""
        return [p for n, p in self.named_parameters() if not n.startswith("fc8.")]

    def param_groups(self, lr, head_lr_mult, weight_decay=0.0):
        """Adaptation phase (third-party): the weights of conv1_1..conv5_3 and fc6 (decay), the rest of F: biases
        and fc7 (no decay), fc8 (no decay, head_lr_mult). The TF code's L2 terms, models/model.py:381-383, 247."""
        named = list(self.named_parameters())
        decayed = [p for n, p in named if n.endswith(".weight") and n.startswith(("features.", "fc6."))]
        rest = [p for n, p in named if not n.startswith("fc8.") and not any(p is q for q in decayed)]
        head = [p for n, p in named if n.startswith("fc8.")]
        return [{"params": decayed, "lr": lr, "lr_mult": 1.0, "weight_decay": weight_decay},
                {"params": rest, "lr": lr, "lr_mult": 1.0, "weight_decay": 0.0},
                {"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult, "weight_decay": 0.0}]

    def caffe_sgd_groups(self, lr, head_lr_mult, weight_decay):
        """Source phase (Yu & Koltun, fyu/dilation network.py): every weight at lr x1 with decay, every bias at
        lr x2 without; fc8 additionally at head_lr_mult."""
        groups, named = [], list(self.named_parameters())
        for is_head in (False, True):
            mult = head_lr_mult if is_head else 1.0
            for suffix, lr_mult, decay in ((".weight", mult, weight_decay), (".bias", 2 * mult, 0.0)):
                params = [p for n, p in named if n.endswith(suffix) and n.startswith("fc8.") == is_head]
                groups.append({"params": params, "lr": lr * lr_mult, "lr_mult": lr_mult, "weight_decay": decay})
        return groups


class DomainClassifier(nn.Module):
    """Fully convolutional domain classifier on the fc7 cells: one logit per cell (source 0, target 1).
    1x1 convs fc_width -> width -> width -> 1, ReLU + Dropout 0.5 (third-party: N(0, 0.001) init)."""

    def __init__(self, in_channels, width):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                 nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                 nn.Conv2d(width, 1, 1))
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.001)
                nn.init.zeros_(m.bias)

    def forward(self, fc7):
        return self.net(fc7)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: weights files (header, "Weights files"): recognised by content, mapped to VGG16FrontEnd's names
ACCEPTED = ("accepted are checkpoints of this script (checkpoints/last.pt, checkpoints/source_phase.pt) and "
            "torchvision-layout VGG-16 state dicts")
TF_TABLE_MAGIC = bytes.fromhex("57fb808b247547db")  # the last 8 bytes of a TensorFlow checkpoint's .index file


def vgg_of(state) -> dict:
    """{"backbone": name} when the widths of a front-end state dict (our names) match one of VGG_WIDTHS, else {}."""
    keys = [f"features.{i}.weight" for i in (0, 5, 10, 17, 24)] + ["fc6.weight"]
    if not all(k in state for k in keys):
        return {}
    widths = tuple(state[k].shape[0] for k in keys)
    names = [n for n, (convs, fc, _) in VGG_WIDTHS.items() if (*convs, fc) == widths]
    return {"backbone": names[0]} if names else {}


def from_torchvision_vgg(state) -> dict:
    """A torchvision VGG-16 state dict under VGG16FrontEnd's names: `features.*` as they are, the fully connected
    classifier.0 and classifier.3 reshaped into the fc6 (7x7) and fc7 (1x1) convolutions; the ImageNet classifier.6
    keeps its name (listed as not in this network: fc8 starts at random)."""
    out = {k: v for k, v in state.items() if not k.startswith(("classifier.0.", "classifier.3."))}
    for fc, key, kernel in (("fc6", "classifier.0", 7), ("fc7", "classifier.3", 1)):
        weight = state.get(f"{key}.weight")
        if weight is not None and weight.dim() == 2 and weight.shape[1] % (kernel * kernel) == 0:
            out[f"{fc}.weight"] = weight.reshape(weight.shape[0], -1, kernel, kernel)  # else listed as missing
        if f"{key}.bias" in state:
            out[f"{fc}.bias"] = state[f"{key}.bias"]
    return out


def refuse_unsafe_formats(path, flag):
    """One-line errors for the third-party TF code's weights, recognised from their bytes without reading them as
    weights: its .npy files are NumPy pickles of a {layer: [weight, bias]} dict (models/model.py:34,
    np.load(...).item()), and unpickling runs whatever code the file names; its trained models are TensorFlow
    checkpoints (train_adv.py saver.save; train_synthia_frontend.zip)."""
    with open(path, "rb") as f:
        head = f.read(1024)
        f.seek(max(os.path.getsize(path) - 8, 0))
        tail = f.read(8)
    advice = ("start from --init imagenet (--preset paper trains the front-end itself), a torchvision-layout VGG-16 "
              "state dict or one of this script's checkpoints")
    if head.startswith(b"\x93NUMPY"):  # the .npy format: magic, version, then a header naming the dtype
        if b"'|O" not in head:
            raise UserError(f"{flag} {path} is a NumPy array, not a weights dict; {advice}")
        raise UserError(f"{flag} {path} is a NumPy pickle (an object-array .npy, as the third-party FCNs_Wild code's "
                        f"pretrained_vgg.npy and train_cscape_frontend.npy): reading it would run any code it carries "
                        f"(np.load allow_pickle), so it is not read; {advice}")
    tensorflow = tail == TF_TABLE_MAGIC
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        tensorflow = not any(n.endswith("data.pkl") for n in names) and any(
            n.endswith((".index", ".meta")) or ".data-" in n for n in names)
    if tensorflow:
        raise UserError(f"{flag} {path} is a TensorFlow checkpoint (the third-party FCNs_Wild code's format): it "
                        f"cannot be read without TensorFlow; {advice}")


def read_frontend_weights(path, flag="--init") -> dict:
    """Recognise a front-end weights file by its content (never its name) and map it to VGG16FrontEnd's names.

    Returns {"kind": what it is, "state": tensors under our names, "implied": the flags it implies, "iter",
    "num_classes", "resumable"}. Layouts:
    - a checkpoint of this script (a "script" key): checkpoints/last.pt (resumable) or checkpoints/source_phase.pt
      (the source-phase front-end, no optimiser state); its backbone and input normalisation;
    - a torchvision VGG-16 state dict (features.*, classifier.*; bare or under state_dict/model, `module.` prefixes
      dropped): classifier.0/3 reshaped into fc6/fc7, ImageNet input, the backbone from the widths.
    The third-party TF code's .npy and TensorFlow files are refused (refuse_unsafe_formats).
    """
    if os.path.isfile(path):
        refuse_unsafe_formats(path, flag)
    state = read_weights_file(path, flag)
    if isinstance(state, dict) and "script" in state:  # ours
        if state["script"] != SCRIPT:
            raise UserError(f"{path} was written by {state['script']}, not {SCRIPT}")
        saved = state.get("args", {})
        implied = {k: saved[k] for k in ("backbone",) if k in saved}
        implied["normalization"] = state.get("normalization", "imagenet")
        resumable = "optimizer" in state
        return {"kind": f"{SCRIPT} checkpoint" if resumable else f"{SCRIPT} source-phase front-end",
                "state": state.get("model", {}), "implied": implied, "iter": state.get("iter", 0),
                "num_classes": state.get("num_classes"), "resumable": resumable}
    for key in ("state_dict", "model"):  # common wrappers of a plain state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path} is not a VGG-16 front-end weights file: {ACCEPTED}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "features.0.weight" in state and "classifier.0.weight" in state:
        mapped = from_torchvision_vgg(state)
        return {"kind": "torchvision VGG-16", "state": mapped, "iter": 0, "num_classes": None, "resumable": False,
                "implied": {"normalization": "imagenet", **vgg_of(mapped)}}
    raise UserError(f"{flag} {path}: unrecognised layout (keys such as {', '.join(list(state)[:3])}); {ACCEPTED}")


def load_init(model, init, backbone, found=None) -> str:
    """Load --init into the front-end (found: read_frontend_weights' result for a file); return the input
    normalisation the weights expect. conv1_1..fc7 must load completely; fc8 comes along from a checkpoint of the
    same classes, else it stays at its N(0, 0.001) init (listed)."""
    if init == "none":
        return "imagenet"
    if init == "imagenet":
        if backbone != "vgg16":
            raise UserError(f"--init imagenet needs --backbone vgg16 (there are no ImageNet weights for {backbone})")
        state = from_torchvision_vgg(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict())
        found = {"kind": "torchvision ImageNet VGG-16", "state": state, "implied": {"normalization": "imagenet"}}
    load_matching(model, found["state"], f"--init {init} ({found['kind']})",
                  required=lambda k: not k.startswith("fc8."))
    return found["implied"]["normalization"]


def prepare_frontend_weights(args, ckpt_path, num_classes) -> Optional[dict]:
    """Read the file of --eval-only --weights, --resume or --init (read_frontend_weights), apply the flags it implies
    (typed flags win), print one line on what was recognised."""
    found = None
    if args.normalization == "auto":  # typed or not, auto is what the file implies (else --eval-only has none)
        args.given = getattr(args, "given", frozenset()) - {"normalization"}
    if args.weights and not args.eval_only:
        raise UserError("--weights is read by --eval-only; to start training from a file use --init PATH")
    if args.eval_only:
        if len(args.weights) != 1:
            raise UserError("--eval-only needs exactly one --weights PATH")
        found = read_frontend_weights(args.weights[0], "--weights")
    elif ckpt_path:  # the network flags it was trained with; its normalisation comes back with the rest of its state
        found = read_frontend_weights(ckpt_path, "--resume")
        if not found["resumable"]:
            raise UserError(f"--resume {ckpt_path} is a {found['kind']} (no optimiser state): start from it with "
                            f"--init {ckpt_path}")
        found["implied"].pop("normalization")
    elif args.init not in ("imagenet", "none"):
        found = read_frontend_weights(args.init)
    if found is not None and found.get("num_classes") not in (None, num_classes):
        raise UserError(f"{args.weights[0] if args.eval_only else ckpt_path or args.init} has "
                        f"{found['num_classes']} classes, this run has {num_classes}")
    if found is not None:
        found["applied"] = imply(args, found["implied"], found["kind"])
        quirks = {"normalization": "{} input", "backbone": "backbone {}"}
        said = ", ".join(quirks[k].format(v) for k, v in found["applied"].items() if k in quirks)
        print(f"recognised {found['kind']}" + (f": {said}" if said else ""), flush=True)
    return found


def seg_loss(logits, labels, align_corners=True):
    """Cross-entropy at label resolution, mean over valid pixels (255 ignored; 0 if none are valid)."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    total = F.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
    return total / (labels != 255).sum().clamp(min=1)


def poly_lr(base_lr, it, horizon, power):
    return base_lr * (1 - min(it, horizon - 1) / horizon) ** power


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: global alignment (domain confusion)
SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # repo convention (methods.md 0.2); FCNs-wild's code uses source 1


def domain_bce(d_logits, domain_label):
    """BCE with logits of every cell against a constant domain label (fp32, mean over cells)."""
    d_logits = d_logits.float()
    return F.binary_cross_entropy_with_logits(d_logits, torch.full_like(d_logits, domain_label))


def confusion_loss(d_logits):
    """1/2 (L_D + L_Dinv): the BCE with the true and with the swapped label, averaged = BCE toward 1/2."""
    return 0.5 * (domain_bce(d_logits, SOURCE_LABEL) + domain_bce(d_logits, TARGET_LABEL))


def confusion_ramp(it, ramp_iters):
    """lr multiplier of the confusion objective: 2/(1+exp(-10 t/T)) - 1 (DANN's schedule; third-party T=1200)."""
    return 2.0 / (1.0 + math.exp(-10.0 * it / max(ramp_iters, 1))) - 1.0


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: category-specific adaptation (class-size constraints, CCNN-style)
def class_size_stats(fractions: np.ndarray) -> dict:
    """fractions: (images, C) pixel fraction of each class per image. Over the images containing class c:
    alpha = 10th percentile, delta = mean, gamma = 90th percentile (0 for a class that never occurs)."""
    stats = {"alpha": [], "delta": [], "gamma": [], "images_with_class": []}
    for c in range(fractions.shape[1]):
        f = fractions[fractions[:, c] > 0, c]
        stats["images_with_class"].append(int(len(f)))
        for key, value in (("alpha", np.percentile(f, 10) if len(f) else 0.0), ("delta", f.mean() if len(f) else 0.0),
                           ("gamma", np.percentile(f, 90) if len(f) else 0.0)):
            stats[key].append(float(value))
    return stats


class _ClassFractions(torch.utils.data.Dataset):
    def __init__(self, split, num_classes):
        self.split, self.num_classes = split, num_classes

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        label = self.split.load_label(i)
        return torch.from_numpy(np.bincount(label.ravel(), minlength=256)[:self.num_classes] / label.size)


def source_class_stats(split, num_classes, cache_path, num_images=0, num_workers=0) -> dict:
    """Class-size statistics of the source train labels (native resolution), computed once and cached as JSON."""
    n = len(split) if num_images <= 0 else min(num_images, len(split))
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            stats = json.load(f)
        if stats.get("classes") == list(split.classes) and stats.get("images") == n:
            return stats
    dataset = torch.utils.data.Subset(_ClassFractions(split, num_classes), range(n))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=num_workers)
    fractions = torch.cat([b for b in tqdm(loader, desc="class-size statistics", leave=False)]).numpy()
    stats = {"classes": list(split.classes), "images": n, **class_size_stats(fractions)}
    if not any(stats["images_with_class"]):
        raise UserError(f"no labelled pixel in the {n} source images used for the class-size statistics")
    save_json(cache_path, stats)
    return stats


def stats_table(stats) -> str:
    rows = [f"| {c} | {a:.4f} | {d:.4f} | {g:.4f} | {k} |" for c, a, d, g, k in
            zip(stats["classes"], stats["alpha"], stats["delta"], stats["gamma"], stats["images_with_class"])]
    return "\n".join(["| class | alpha (p10) | delta (mean) | gamma (p90) | images |", "|---|---|---|---|---|", *rows])


def presence(logits_sub, alpha, factor=0.1):
    """(B, C) bool: class c is present if its argmax fraction > factor * alpha_c; the most frequent class of
    the prediction always counts as present (so P is defined even when every fraction is below its bar)."""
    num_classes = logits_sub.shape[1]
    classes = torch.arange(num_classes, device=logits_sub.device).view(1, -1, 1)
    fraction = (logits_sub.argmax(1).flatten(1)[:, None] == classes).float().mean(2)  # (one_hot syncs on CUDA)
    return (fraction > factor * alpha) | (fraction == fraction.max(1, keepdim=True).values)


def constrained_projection(q, present, lower, upper, slack=2.0, steps=100, step_size=2.0):
    """P = argmin_P KL(P||Q) per image, s.t. for present c: mean_i P_i(c) >= lower_c (slack, hinge weight
    `slack`) and mean_i P_i(c) <= upper_c (hard); absent c: P_i(c) = 0.

    q: (B, C, N) probabilities; present: (B, C) bool; lower, upper: (C,). The Lagrangian gives
    P_i(c) prop. to Q_i(c) exp(lambda_c - mu_c) with 0 <= lambda <= slack and mu >= 0; the concave dual
    g = -mean_i log sum_c Q_i(c) e^(lambda_c - mu_c) + sum_c (lambda_c lower_c - mu_c upper_c) has gradient
    (lower - mean P, mean P - upper), followed here by projected gradient ascent."""
    log_q = q.clamp_min(1e-30).log().masked_fill(~present[:, :, None], float("-inf"))
    lam = torch.zeros(present.shape, dtype=q.dtype, device=q.device)
    mu = torch.zeros_like(lam)
    mask = present.to(q.dtype)
    for _ in range(steps):
        mean_p = (log_q + (lam - mu)[:, :, None]).softmax(1).mean(2)
        lam = ((lam + step_size * (lower - mean_p)).clamp(0, slack)) * mask
        mu = ((mu + step_size * (mean_p - upper)).clamp_min(0)) * mask
    return (log_q + (lam - mu)[:, :, None]).softmax(1)


def ca_loss(logits_sub, p, class_weight):
    """Mean over images of KL(P||Q)/N, Q = softmax(logits_sub), P fixed; its logit gradient is
    class_weight_c (Q - P)/N per image (the third-party code scales the gradient, not the loss, hence the
    value is the plain KL and the gradient is injected)."""
    logits_sub = logits_sub.float()
    b, c, h, w = logits_sub.shape
    log_q = logits_sub.log_softmax(1)
    n = h * w
    kl = (p * (p.clamp_min(1e-30).log() - log_q)).sum() / (n * b)
    grad = class_weight.view(1, c, 1, 1) * (log_q.exp() - p) / (n * b)
    injected = (logits_sub * grad.detach()).sum()
    return kl.detach() + injected - injected.detach()


def ca_objective(logits_t, size, stats, args):
    """Upsample the target logits to the input size, keep every k-th pixel, build P, return the CA loss.
    fp32 throughout, also when called under autocast: the presence test and the dual ascent are thresholded."""
    with torch.autocast(logits_t.device.type, enabled=False):
        up = F.interpolate(logits_t.float(), size=size, mode="bilinear", align_corners=True)
        sub = up[:, :, ::args.ca_subsample, ::args.ca_subsample]
        with torch.no_grad():
            present = presence(sub, stats["alpha"], args.ca_presence)
            p = constrained_projection(sub.softmax(1).flatten(2), present, stats["delta"], stats["gamma"],
                                       args.ca_slack, args.ca_solver_steps, args.ca_solver_step_size).view_as(sub)
        return ca_loss(sub, p, stats["weight"])


def large_class_weight(classes, large_names, factor):
    """(C,) CA gradient factor: `factor` for the named classes, 1 elsewhere (the TF code fixes road, building and
    vegetation of the 19 Cityscapes classes, custom_grad.py:126-128); also the names not in `classes`."""
    weight = torch.tensor([factor if c in large_names else 1.0 for c in classes])
    return weight, [name for name in large_names if name not in classes]


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: one Adam per objective, gradients from one shared forward
def build_disc(backbone, device):
    _, fc_width, d_width = VGG_WIDTHS[backbone]
    return DomainClassifier(fc_width, d_width).to(device)


def build_optimizers(model, disc, args):
    """One Adam per objective -> (params, optimizers), both keyed task / d / conf / ca (+ source: the source
    phase's SGD). The lr multipliers sit in each group's lr_mult (set_lr), so each objective moves its
    parameters at its own rate."""
    params = {"task": [p for p in model.parameters()]}
    task_groups = model.param_groups(args.lr, args.head_lr_mult, args.weight_decay)
    optimizers = {"task": torch.optim.Adam(task_groups, lr=args.lr)}
    if args.adapt_start > 0 and args.source_optimizer == "sgd":  # the front-end's own training (Yu & Koltun)
        params["source"] = params["task"]
        optimizers["source"] = torch.optim.SGD(model.caffe_sgd_groups(args.source_lr, args.head_lr_mult,
                                                                      args.weight_decay),
                                               lr=args.source_lr, momentum=args.source_momentum)
    if disc is not None:  # D on its loss (lr x10); the features F on the confusion loss (lr x ramp, set per step)
        params["d"], params["conf"] = list(disc.parameters()), model.feature_params()
        optimizers["d"] = torch.optim.Adam([{"params": params["d"], "lr_mult": args.d_lr_mult}], lr=args.lr)
        optimizers["conf"] = torch.optim.Adam([{"params": params["conf"], "lr_mult": 1.0}], lr=args.lr)
    if args.category_alignment:  # F + fc8 on the CA loss (lr x0.1)
        params["ca"] = params["task"]
        optimizers["ca"] = torch.optim.Adam([{"params": g["params"], "lr_mult": g["lr_mult"] * args.ca_lr_mult}
                                             for g in model.param_groups(args.lr, args.head_lr_mult)], lr=args.lr)
    return params, optimizers


def objective_lrs(task_lr, it, args):
    """Base lr of each objective's optimiser at iteration `it` (each group's lr_mult applies on top: D x10, CA
    x0.1). The adaptation objectives run at adapt_lr_mult times the task lr; the confusion ramp starts at
    adapt_start; the source phase's SGD follows the same schedule from --source-lr."""
    adapt_lr = task_lr * args.adapt_lr_mult
    ramp = confusion_ramp(it - args.adapt_start, args.confusion_ramp_iters) if it >= args.adapt_start else 0.0
    source_lr = poly_lr(args.source_lr, it, args.poly_horizon, args.poly_power)
    return {"task": task_lr, "d": adapt_lr, "conf": adapt_lr * ramp, "ca": adapt_lr, "source": source_lr}


# flags that only a part of the method reads: typing one while that part is off is a mistake, not a no-op
PART_FLAGS = {"global_alignment": ("d_lr_mult", "confusion_ramp_iters"),
              "category_alignment": ("ca_lr_mult", "ca_subsample", "ca_presence", "ca_slack", "ca_large_classes",
                                     "ca_large_weight", "ca_solver_steps", "ca_solver_step_size", "stats_images")}


def check_flags(args):
    """One-line errors for flags that would not act with the other flags given."""
    given = getattr(args, "given", frozenset())
    if args.adapt_start < 0 or args.adapt_lr_mult < 0:
        raise UserError(f"--adapt-start {args.adapt_start} and --adapt-lr-mult {args.adapt_lr_mult} must be >= 0")
    for part, names in PART_FLAGS.items():
        typed = [n for n in names if n in given]
        if typed and not getattr(args, part):
            raise UserError(f"--{typed[0].replace('_', '-')} has no effect with --no-{part.replace('_', '-')}")
    if not (args.global_alignment or args.category_alignment) and "adapt_lr_mult" in given:
        raise UserError("--adapt-lr-mult has no effect without global or category alignment")
    if ({"source_optimizer", "source_lr", "source_momentum"} & given) and args.adapt_start == 0:
        raise UserError("--source-optimizer, --source-lr and --source-momentum set the source phase: they need "
                        "--adapt-start > 0")
    if ({"source_lr", "source_momentum"} & given) and args.source_optimizer != "sgd":
        raise UserError("--source-lr and --source-momentum set the source phase's SGD: they need "
                        "--source-optimizer sgd")


def objective_grads(objectives, params, scaler):
    """{name: loss} -> {name: grads w.r.t. params[name]}, one autograd.grad each over the shared graph."""
    names = list(objectives)
    return {name: torch.autograd.grad(scaler.scale(objectives[name]), params[name], retain_graph=i < len(names) - 1)
            for i, name in enumerate(names)}


def step_objectives(optimizers, params, grads, scaler):
    """Give each optimiser its objective's gradients and step it (all gradients were taken at one point)."""
    for name, grad in grads.items():
        for p, g in zip(params[name], grad):
            p.grad = g
        scaler.step(optimizers[name])
        optimizers[name].zero_grad(set_to_none=True)


def average_over_ranks(grads, rt):
    """All-reduce (mean) every objective's gradients in one flat buffer (replaces DDP)."""
    if not rt.distributed:
        return grads
    flat = torch.cat([g.flatten() for name in grads for g in grads[name]])
    rt.all_reduce(flat).div_(rt.world)
    out, offset = {}, 0
    for name, gs in grads.items():
        out[name] = []
        for g in gs:
            out[name].append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return out


def accumulated_update(objectives_of, micro_batches, params, optimizers, rt):
    """The update rule of both phases: per micro-batch, each objective's gradients w.r.t. its own parameters (one
    autograd.grad each over the micro-batch's forward); summed over the micro-batches and divided by their number
    (--grad-accum), averaged over the ranks; then every objective's optimiser steps (all gradients taken at the same
    parameters). objectives_of(*micro_batch) -> ({objective: loss}, {logged name: value}). Returns the logged means."""
    grads, losses = {}, {}
    for batch in micro_batches:
        objectives, parts = objectives_of(*batch)
        micro = objective_grads(objectives, {name: params[name] for name in objectives}, rt.scaler)
        for name, gs in micro.items():
            grads[name] = [a + b for a, b in zip(grads[name], gs)] if name in grads else list(gs)
        for key, value in parts.items():
            losses[key] = losses.get(key, 0.0) + value.detach() / len(micro_batches)
    grads = average_over_ranks({name: [g / len(micro_batches) for g in gs] for name, gs in grads.items()}, rt)
    step_objectives(optimizers, params, grads, rt.scaler)
    rt.scaler.update()
    return losses


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: one training iteration of each phase (main() calls them; tests/test_fcn_wild.py checks them against a
# hand-written reference)
def source_step(model, optimizer, micro_batches, rt):
    """One source-phase update (the front-end the paper adapts): CE on the source labels, by `optimizer` (Yu &
    Koltun's SGD, or the task Adam with --source-optimizer adam) over every parameter of the front-end.
    micro_batches: [(normalised source images, labels, unused)] * --grad-accum."""
    def objectives_of(images, labels, _):
        with rt.autocast():
            _, logits = model(images)
        loss = seg_loss(logits, labels)
        return {"task": loss}, {"seg_src": loss}

    return accumulated_update(objectives_of, micro_batches, {"task": list(model.parameters())}, {"task": optimizer},
                              rt)


def adapt_step(model, disc, optimizers, params, micro_batches, lr, it, args, rt, ca_stats=None):
    """One adaptation update, one Adam per objective (build_optimizers), at the lrs of objective_lrs(lr, it):
    task: source CE -> F + fc8; d (GA): D's BCE on the fc7 cells (source 0, target 1) -> D only (F's features enter
    D's gradient as constants); conf (GA): the confusion loss, BCE toward 1/2 -> F only (D fixed), lr x ramp;
    ca (CA, ca_stats given): KL(P||Q) on the target prediction, P from the dual ascent, gradient x --ca-large-weight
    on the --ca-large-classes -> F + fc8, lr x0.1. disc None: no GA. One forward per domain serves every objective.
    micro_batches: [(normalised source images, labels, normalised target images)] * --grad-accum."""
    lrs = objective_lrs(lr, it, args)
    for name in ("d", "conf", "ca"):
        if name in optimizers:
            set_lr(optimizers[name], lrs[name])

    def objectives_of(images, labels, target_images):
        with rt.autocast():
            fc7_s, logits_s = model(images)
        objectives = {"task": seg_loss(logits_s, labels)}
        parts = {"seg_src": objectives["task"]}
        if disc is not None or ca_stats is not None:
            with rt.autocast():
                fc7_t, logits_t = model(target_images)
        if disc is not None:
            with rt.autocast():  # one D forward serves both: D's loss is differentiated w.r.t. D only,
                d_s, d_t = disc(fc7_s), disc(fc7_t)  # the confusion w.r.t. F only (D stays fixed there)
            objectives["d"] = parts["d_main"] = 0.5 * (domain_bce(d_s, SOURCE_LABEL) + domain_bce(d_t, TARGET_LABEL))
            objectives["conf"] = parts["adv_main"] = 0.5 * (confusion_loss(d_s) + confusion_loss(d_t))
            parts["d_acc"] = 0.5 * ((d_s < 0).float().mean() + (d_t > 0).float().mean())  # cells D gets right
        if ca_stats is not None:
            objectives["ca"] = parts["ca"] = ca_objective(logits_t, target_images.shape[-2:], ca_stats, args)
        return objectives, parts

    return accumulated_update(objectives_of, micro_batches, params, optimizers, rt)


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
    check_flags(args)
    if args.batch_size % (rt.world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} must divide by {rt.world} processes x --grad-accum "
                        f"{args.grad_accum}")
    for key, domain in (("source_size", args.source), ("target_size", args.target)):
        if getattr(args, key) is None and domain in ("gta", "synthia", "cityscapes"):
            setattr(args, key, list(FCN_INPUT_SIZE))  # the third-party 512x256 (eval_size follows target_size)
    found = prepare_frontend_weights(args, ckpt_path, num_classes)  # the --init/--weights/--resume file, its flags
    model = VGG16FrontEnd(args.backbone, num_classes)
    norm = load_init(model, args.init, args.backbone, found) if not (ckpt_path or args.eval_only or args.dry_run) \
        else None
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    with torch.random.fork_rng(devices=[]):  # D's init leaves the global RNG (dropout) as a source-only run has it
        torch.manual_seed(args.seed + 1)
        disc = build_disc(args.backbone, rt.device) if args.global_alignment else None
    params, optimizers = build_optimizers(model, disc, args)
    optimizer = optimizers["task"]
    networks = {"model": model, **({"disc": disc} if disc is not None else {})}

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
    if args.eval_only:  # every tensor of the network from the file; nothing left over but unsummed ASPP convs
        load_matching(model, found["state"], f"--weights {args.weights[0]} ({found['kind']})", required=lambda k: True,
                      unused_ok=lambda k: ".convs.2." in k or ".convs.3." in k)
        start_iter = found["iter"]
    elif ckpt_path:
        ckpt = load_checkpoint(ckpt_path, SCRIPT, num_classes)
        load_matching(model, ckpt["model"], f"--resume {ckpt_path}", required=lambda k: True, unused_ok=lambda k: False,
                      quiet=True)
        norm, start_iter = ckpt["normalization"], ckpt["iter"]
        optimizer.load_state_dict(ckpt["optimizer"])
        rt.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        extra = {**{name: net for name, net in networks.items() if name != "model"},
                 **{f"optimizer_{name}": opt for name, opt in optimizers.items() if name != "task"}}
        for key, state_holder in extra.items():  # the domain classifier and the other objectives' optimisers
            if key not in ckpt:
                raise UserError(f"{ckpt_path} has no '{key}': it was written with other --global/--category/"
                                f"--adapt-start/--source-optimizer flags")
            if key in networks:
                load_matching(state_holder, ckpt[key], f"--resume {ckpt_path} ({key})", required=lambda k: True,
                              unused_ok=lambda k: False, quiet=True)
            else:
                state_holder.load_state_dict(ckpt[key])
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
            summary = evaluate_target(lambda x: model(to_input(x))[1], target_val, rt, align_corners=True, log=log,
                                      num_predictions=args.num_predictions if final else 0, limit=args.eval_limit,
                                      eval_size=eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19,
                                      save_dir=args.save_predictions if final else None, num_workers=args.num_workers,
                                      interpolation=RESIZE)
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
                "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict(), "rng": rng_state(),
                **{name: net.state_dict() for name, net in networks.items() if name != "model"},
                **{f"optimizer_{name}": opt.state_dict() for name, opt in optimizers.items() if name != "task"}})

    # ALGO LOGIC: data
    source_train = domain_split(args.source, "train", args.data_root, synthia_classes=args.synthia_classes)
    source_transform = TrainTransform(size=args.source_size or source_train.paper_size, crop=args.crop_size,
                                      interpolation=RESIZE)
    per_rank_batch = args.batch_size // rt.world // args.grad_accum
    source_batches = train_loader(SegDataset(source_train, source_transform), per_rank_batch, args.seed,
                                  start_iter * args.grad_accum, rt.rank, rt.world, num_workers=args.num_workers,
                                  pin_memory=rt.device.type == "cuda")
    use_target = args.global_alignment or args.category_alignment
    if use_target:  # its own sample stream (seed offset), distinct from every rank's source stream
        target_train = domain_split(args.target, "train", args.data_root, labelled=False)
        target_transform = TrainTransform(size=args.target_size or target_train.paper_size, crop=args.crop_size,
                                          interpolation=RESIZE)
        target_start = max(start_iter - args.adapt_start, 0) * args.grad_accum  # read only while adapting
        target_batches = train_loader(SegDataset(target_train, target_transform, with_label=False), per_rank_batch,
                                      args.seed + 100_003, target_start, rt.rank, rt.world,
                                      num_workers=args.num_workers, pin_memory=rt.device.type == "cuda")
    ca_stats = None
    if args.category_alignment:
        # cached next to a real dataset (if writable), in the run folder for the toy domains; always copied there
        cache = log.path("class_stats.json")
        if source_train.toy is None:
            builtin = args.source in ("gta", "synthia", "cityscapes")
            root = os.path.join(args.data_root, args.source) if builtin else args.source
            if os.path.isdir(root) and os.access(root, os.W_OK):
                cache = os.path.join(root, f"fcn_wild_class_stats-{num_classes}.json")
        if rt.is_main:
            with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed from the global RNG
                stats = source_class_stats(source_train, num_classes, cache, args.stats_images, args.num_workers)
            save_json(log.path("class_stats.json"), stats)
            print(f"class-size statistics of {stats['images']} source images (cache {cache}):\n{stats_table(stats)}")
        rt.barrier()
        with open(log.path("class_stats.json")) as f:
            stats = json.load(f)
        large_weight, unknown = large_class_weight(classes, args.ca_large_classes, args.ca_large_weight)
        print(f"CA gradient x{args.ca_large_weight} for {', '.join(c for c in args.ca_large_classes if c in classes)}"
              + (f" (not in this class list: {', '.join(unknown)})" if unknown else ""))
        ca_stats = {key: torch.tensor(stats[key], device=rt.device) for key in ("alpha", "delta", "gamma")}
        ca_stats["weight"] = large_weight.to(rt.device)
    train_model = model  # no DDP wrapper: gradients are averaged by average_over_ranks

    # TRY NOT TO MODIFY: training loop
    running = {}
    log.start_loop(start_iter)
    progress = tqdm(range(start_iter, args.iters), initial=start_iter, total=args.iters, disable=not rt.is_main,
                    desc=SCRIPT, dynamic_ncols=True)
    for it in progress:
        lr = poly_lr(args.lr, it, args.poly_horizon, args.poly_power)
        set_lr(optimizer, lr)

        # ALGO LOGIC: one iteration = --grad-accum micro-batches of source (+ target while adapting) images
        adapting = it >= args.adapt_start  # before: the source phase, the front-end the paper adapts
        micro_batches = []
        for _ in range(args.grad_accum):
            images, labels, _ = next(source_batches)
            target_images = to_input(next(target_batches)[0]) if adapting and use_target else None
            micro_batches.append((to_input(images), labels.to(rt.device, non_blocking=True).long(), target_images))
        if not adapting:
            if "source" in optimizers:  # Yu & Koltun's SGD; the logged lr is that of the optimiser fitting the source
                lr = objective_lrs(lr, it, args)["source"]
                set_lr(optimizers["source"], lr)
            losses = source_step(train_model, optimizers.get("source", optimizer), micro_batches, rt)
        else:
            if it == args.adapt_start > 0 and rt.is_main:  # keep the source-phase front-end (the source-only row)
                save_checkpoint(log.path("checkpoints", "source_phase.pt"), {
                    "script": SCRIPT, "num_classes": num_classes, "iter": it, "normalization": norm,
                    "args": dataclasses.asdict(args), "model": unwrap(model).state_dict()})
            losses = adapt_step(train_model, disc, optimizers, params, micro_batches, lr, it, args, rt, ca_stats)

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
