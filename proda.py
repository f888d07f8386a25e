"""ProDA: prototypical pseudo-label denoising and target structure learning, all stages from one script.

Zhang et al., "Prototypical Pseudo Label Denoising and Target Structure Learning for Domain Adaptive
Semantic Segmentation", CVPR 2021, https://arxiv.org/abs/2101.10979, official code
https://github.com/microsoft/ProDA (9ba80c7: `models/adaptation_modelv2.py`, `models/deeplabv2.py`, `data/`).
Pipeline (`--stage warmup|stage1|stage2|stage3|all`; each stage writes <out>/<stage>/, all resumable):
  warm-up (skipped with `--warmup-checkpoint PATH`): source CE + 0.01 LS-GAN on the target softmax with ProDA's
    3x3 discriminator (D loss: both halves summed), BN frozen (its --freeze_bn, ProDA #42), SGD 2.5e-4 (head
    x10), D Adam 1e-4 betas (0.9, 0.99), the stages' schedule (ProDA #21).
  prep a+b: warm-up softmax of every target train frame at stride 8 (float16 memmap, <out>/stage1/pseudo/) and
    the prototypes: image-weighted mean 256-d warm-up features per warm-up argmax class.
  stage 1 (trainable BN, SGD 1e-4 for all): an EMA model (0.999, train mode, buffers copied) sees the full
    target frame; its features (at 1/4) are warped to the weak view, omega_k = softmax(-||f - eta_k|| / tau),
    pseudo-label = argmax_k(omega_k p0_k). Loss = source CE + SCE(weak, 0.1 CE + 1.0 RCE) + 10 KL(z_T || z_S)
    (prototype assignments: the EMA's warped to the strong view vs the student's strong view; padding and
    cut-out masked) + 0.1 mean(-log p). Then eta <- 0.9999 eta + 0.0001 mean feature per (image, EMA-argmax
    class with >= 10 px), and the EMA update.
  prep c: the previous stage's hard labels with flip TTA (uint8 + float16 confidence at 1/4 of the frame,
    <out>/stage2|3/pseudo/); confidence <= 0.95 -> ignore.
  stages 2/3: source CE + CE(strong view, warped hard labels) + 1.0 KD(frozen eval-mode teacher, same strong
    image), SGD 6e-4 (head x10); stage 2 starts from `--student-init`, stage 3 from stage 2's weights.
Frames: GTA5 resized to 1914x1052, SYNTHIA 1280x760, Cityscapes 2048x1024, then to width U(0.5, 1.5) x 2200,
crop 896x512, flip, 4+4 per step (`data/*_dataset.py`, `augmentations.py`); strong view = weak + flip + 2
RandAugment ops (p 0.5, magnitude 1-9) + Cutout min(H, W)/3 gray 127. Maps reach the views as ProDA's
full2weak (floored sizes, align_corners=True). Target losses at 1/4 of the crop. Network: the shared DeepLab-v2
backbone with layer2's stride on the 1x1 conv (`--stride-on 1x1`: ProDA loads torchvision's ImageNet weights into
that Caffe layout; source_only.py's `auto` would put it on the 3x3, where torchvision trained it) + ProDA's
SE/GroupNorm head; input RGB/255 without mean or std (`--normalization unit`, paper preset); eval on full
2048x1024 frames. `--source synthia`: ProDA's 16-way head and regulariser weight 0.
Reported (paper, GTA5->Cityscapes, mIoU): warm-up 41.6 (released model 43.3), stage 1 53.7, stage 2 56.9, stage 3
57.5; SYNTHIA->Cityscapes (16 classes): warm-up 41.4 (released), stage 1 51.9, stage 2 54.6, stage 3 55.5 (62.0 on
13). They come from the official code's buggy KD (`--kd-legacy`); the default here is the correct
KL(p_teacher || p_student).
Released models (`from_{gta5,synthia}_to_cityscapes_on_deeplabv2_best_model.pkl` of every stage, recognised by
their content, read with weights_only=True): `--eval-only --weights FILE` evaluates one with ProDA's test.py
protocol (strict load, eval mode, RGB/255 at 2048x1024, stride-8 logits upsampled with align_corners=True) and
the flags it implies (resnet101, stride on the 1x1, RGB/255, `--bn-clr` for the stage-2/3 files' bn_pretrain);
a SYNTHIA file needs `--source synthia` (16-way), and ProDA's 16-class mIoU, which ignores terrain/truck/train
ground truth, is results.json's `miou16_true`. As starting points: `--warmup-checkpoint` (the warm-up file: stage
1 computes its soft labels and prototypes from it, as generate_pseudo_label.py and calc_prototype.py do; the
file's objective_vectors are zeros, ProDA never reads them), `--teacher-checkpoint` (a stage-1/2 file: teacher and
hard labels of stage 2/3; stage 3's student starts from it), `--student-init r101_1x_sk0.pth --bn-clr` (ProDA's
converted SimCLRv2 file, read through its 'state_dict' key: the paper's stage-2 student).

Deviations from the official code:
- Hand-over: each stage starts from (and takes pseudo-labels from) the previous stage's final weights, so
  nothing is selected on target labels; ProDA's README hands over `*_best_model.pkl`, the best of its 1k-
  iteration Cityscapes-val evaluations (`--handover best` does that).
- Stage 2 starts from `--student-init init` (the --init weights, the paper's ImageNet ablation) by default; the
  paper's SimCLRv2 student is `--student-init PATH --bn-clr` (the file is not downloaded here).
- Trainable BN is SyncBN only on CUDA under torchrun; on CPU/gloo each rank keeps its own batch statistics.
  Under torchrun the target losses of stages 1-3 divide by the pixel count of the whole batch (all-reduced), as
  ProDA's one-process batch of 4; the source CE is each process's mean (as every script here); every rank draws
  the same dropout masks (one seed).
- Prototypes: the n image means of a step (summed over ranks) update in closed form (1-m)^n eta +
  (1-(1-m)^n) mean (ProDA: one after another; exact for n = 1). Init: one pass of image-weighted means
  (ProDA: a running mean with count cap 3000 over 4 passes, equal while a class has < 3000 images).
- Hard labels are stored at 1/4 of the frame (ProDA: full size, downsampled when used); both label sets are
  memory-mapped .npy files.
- RandAugment: ProDA's photometric ops and magnitudes only (no shear/rotate/translate, whose label warps are
  not implemented), so only flip and Cutout are warped.
- Crops larger than the rescaled frame are zero-padded and the padding ignored (never at ProDA's sizes).
- Mixed precision: on CUDA the forward and backward passes run under bf16 autocast (fp16 with a GradScaler
  where bf16 is missing) with TF32 matmuls by default; the paper trained in fp32 (`--no-amp` gives fp32).
  Losses, softmax, soft labels, pseudo-label argmax and confidences, the 0.95 threshold, prototype distances
  and updates, the EMA update and the evaluation upsampling and argmax are computed in fp32.
- Resizing: images bilinear (PIL), as the official loaders; labels nearest.
- `--preset quick` (CPU, toy pair): `--student-init teacher` and stage-2/3 lr 5e-4 (a random-init student
  learns nothing in 80 CPU iterations; 2.5e-3 wrecked it), BN frozen in stages 2/3 and trained in the
  warm-up (`--freeze-bn-stages stage2 stage3`: a random init has no statistics worth freezing, and the
  strong views' BN statistics cost 12-14 mIoU on the toy pair; benchmarks/proda.md).
- `--iters` is the length of each stage, the warm-up's too unless `--warmup-iters` is given; `--batch-size`
  is the global batch, split over torchrun processes.
Docs: README.md, section "Methods"; benchmarks/proda.md.
"""
import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

from common.checkpoint import (load_checkpoint, load_matching, read_weights_file, resume_path, rng_state,
                               save_checkpoint, set_rng_state)
from common.cli import UserError, guard, imply, parse_args
from common.data import (ResizedFrames, SegDataset, TrainTransform, class_setup, domain_split, eval_loader, normalize,
                         resize_pair, train_loader)
from common.metrics import evaluate_target
from common.runlog import RunLog, param_counts, save_json
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir, unwrap

SCRIPT = "proda"


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
    backbone: str = "resnet101"
    """DeepLab-v2 backbone: resnet18, resnet34, resnet50 or resnet101 (paper: resnet101)"""
    init: str = "imagenet"
    """imagenet (torchvision weights), none (random) or a local file (DeepLab init .pth or our checkpoint)"""
    iters: int = 62412
    """training iterations of each stage, the warm-up's too unless --warmup-iters is given (ProDA: 84 x 743)"""
    batch_size: int = 4
    """global source batch (and target batch), split over torchrun processes (ProDA: 4)"""
    crop_size: Optional[list[int]] = field(default_factory=lambda: [512, 896])
    """random crop H [W] after the rescale; none trains on whole rescaled frames (ProDA: 512 896)"""
    lr: float = 2.5e-4
    """warm-up learning rate of the backbone; its head gets head_lr_mult times it (ProDA: 2.5e-4)"""
    seed: int = 1337
    """seed of every random choice (ProDA: 1337)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: cuda if available"""
    amp: bool = True
    """mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler)"""
    num_workers: int = 4
    """data-loading processes per training process"""
    eval_every: int = 1000
    """evaluate on the target val split every N iterations (0: only at the end)"""
    checkpoint_every: int = 1000
    """write checkpoints/last.pt every N iterations (ProDA saves at every 1k-iteration evaluation)"""
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
    """resize source frames to H W first (default: GTA5 1052 1914, SYNTHIA 760 1280, Cityscapes 1024 2048)"""
    target_size: Optional[list[int]] = None
    """resize target frames to H W first: the EMA's and the pseudo-labels' full frame (default: Cityscapes 1024 2048)"""
    eval_size: Optional[list[int]] = None
    """evaluation input H W; logits are upsampled to the full label size (default: as target_size)"""
    eval_limit: Optional[int] = None
    """score only the first N target val images (default: all)"""
    num_predictions: int = 4
    """colour-coded target-val predictions saved to predictions/ at the end"""
    synthia_classes: int = 19
    """classes of the head when the source is SYNTHIA: 19 (evaluated on 16/13) or 16 (ProDA: 16)"""
    normalization: Literal["auto", "imagenet", "caffe", "unit"] = "auto"
    """input normalisation of the networks started from --init / --student-init (a stage started from a trained model
    keeps that model's unless typed); auto: what the weights imply (caffe, BGR mean only, for the DeepLab-v2 Caffe
    files, imagenet for torchvision weights); unit: RGB/255, also ProDA's releases (ProDA: unit for everything)"""
    stride_on: Literal["auto", "1x1", "3x3"] = "1x1"
    """conv holding layer2.0's stride: 1x1 (Caffe DeepLab-v2 layout, where ProDA loads torchvision's weights too), 3x3
    (torchvision); auto: where the loaded weights expect it (3x3 for torchvision weights, else 1x1) (ProDA: 1x1)"""
    momentum: float = 0.9
    """SGD momentum (ProDA: 0.9)"""
    weight_decay: float = 2e-4
    """SGD weight decay (ProDA: 2e-4)"""
    head_lr_mult: float = 10.0
    """learning-rate multiplier of the head in the warm-up and stages 2/3 (stage 1: 1) (ProDA: 10)"""
    poly_horizon: Optional[int] = 90000
    """poly horizon T in lr*(1-t/T)^power of every stage; none: each stage's length. Paper: 90k, a separate number
    from the iterations (it stays when --iters changes)"""
    poly_power: float = 0.9
    """poly schedule power (paper: 0.9)"""

    # Algorithm specific arguments
    stage: Literal["warmup", "stage1", "stage2", "stage3", "all"] = "all"
    """pipeline step to run; all: warm-up, stage 1, 2, 3 in order, each starting from the previous one's output"""
    warmup_iters: Optional[int] = None
    """iterations of the adversarial warm-up; none: --iters (ProDA #21: the stages' schedule)"""
    warmup_checkpoint: Optional[str] = None
    """a finished warm-up: this script's warm-up checkpoint or ProDA's released warm-up model; stage 1 starts from it
    (its soft labels and prototypes too) and --stage all skips the warm-up"""
    teacher_checkpoint: Optional[str] = None
    """with --stage stage2 / stage3: the teacher (and hard-label source) instead of this run's previous stage: a stage-1
    / stage-2 model, this script's checkpoint or ProDA's release; stage 3's student starts from it too"""
    handover: Literal["last", "best"] = "last"
    """what a stage hands to the next (weights, teacher, pseudo-labels): last (its final weights) or best (its best
    target-val mIoU of the --eval-every and final evaluations: selects on target labels, as ProDA's README)"""
    lambda_adv: float = 0.01
    """warm-up: weight of the output-space adversarial loss on the target softmax (ProDA: 0.01)"""
    lr_d: float = 1e-4
    """warm-up: Adam learning rate of the discriminator, same poly decay (ProDA: 1e-4)"""
    gan: Literal["vanilla", "ls"] = "ls"
    """warm-up adversarial objective: vanilla (BCE with logits) or ls (least squares) (ProDA: ls)"""
    stage1_lr: float = 1e-4
    """stage 1 learning rate, the same for backbone and head (ProDA: 1e-4)"""
    distill_lr: float = 6e-4
    """stages 2/3 learning rate; the head gets head_lr_mult times it (ProDA: 6e-4)"""
    resize_width: int = 2200
    """source and target frames are rescaled to width U(scale_range) x this before the crop (ProDA: 2200)"""
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    """random factor of --resize-width (ProDA: 0.5 1.5)"""
    randaugment_ops: int = 2
    """RandAugment ops of the strong view, each applied with p 0.5 (ProDA: 2)"""
    target_limit: Optional[int] = None
    """adapt on and pseudo-label only the first N target train frames (default: all)"""
    proto_momentum: float = 1e-4
    """prototype EMA: eta <- (1 - m) eta + m mean feature (ProDA: 1e-4, i.e. lambda 0.9999)"""
    proto_temperature: float = 1.0
    """temperature tau of the prototype assignments softmax(-distance / tau) (ProDA: 1)"""
    proto_min_pixels: int = 10
    """a (frame, class) pair updates a prototype only with at least this many pixels (ProDA: 10)"""
    ema_momentum: float = 0.999
    """momentum of the stage-1 EMA model (ProDA: 0.999)"""
    sce_alpha: float = 0.1
    """stage 1: weight of CE in the symmetric CE (ProDA: 0.1)"""
    sce_beta: float = 1.0
    """stage 1: weight of reverse CE in the symmetric CE (ProDA: 1.0)"""
    lambda_consistency: float = 10.0
    """stage 1: weight of the weak/strong prototype-assignment KL (ProDA README: 10; its parser default 1)"""
    lambda_regular: float = 0.1
    """stage 1: weight of the mean(-log p) regulariser (ProDA: 0.1 for GTA5, 0 for SYNTHIA)"""
    label_threshold: float = 0.95
    """stages 2/3: hard labels with confidence <= this are ignored (ProDA: 0.95)"""
    lambda_kd: float = 1.0
    """stages 2/3: weight of the distillation loss (ProDA: 1)"""
    kd_legacy: bool = False
    """reproduce the official KD bug: KL on the student's softmax instead of its log-softmax (paper numbers: on)"""
    student_init: str = "init"
    """stage-2 student start: init (the --init weights), teacher (stage-1 weights) or a file: a ResNet state dict,
    bare or under 'state_dict' (paper: ProDA's converted SimCLRv2 r101_1x_sk0.pth, with --bn-clr)"""
    bn_clr: bool = False
    """the stage-2 student gets ProDA's bn_pretrain, a BN on layer4's output trained at the head's rate (ProDA's
    --bn_clr with its SimCLRv2 student); networks loaded from a model follow the model (ProDA: with SimCLRv2)"""
    head_dropout: float = 0.1
    """dropout rate of ProDA's head before its classifier (ProDA: 0.1)"""
    freeze_bn_stages: list[str] = field(default_factory=lambda: ["warmup"])
    """stages whose BN stays in eval mode with frozen affine (ProDA's --freeze_bn); the others train BN; none: no
    stage (ProDA: warmup, #42)"""

    # to be filled in runtime
    world_size: int = field(default=0, metadata={"runtime": True})
    rank: int = field(default=0, metadata={"runtime": True})
    warmup_poly_horizon: int = field(default=0, metadata={"runtime": True})  # poly_horizon, else warmup_iters


PRESETS = {
    "paper": dict(normalization="unit"),
    "quick": dict(source="toy-synth", target="toy-real", backbone="resnet18", init="none", iters=80, batch_size=4,
                  lr=0.0025, eval_every=0, checkpoint_every=100, num_workers=1, log_every=10, poly_horizon=None,
                  seed=0, source_size=[96, 192], target_size=[96, 192],
                  # method-specific: 160 warm-up + 3 x 80 stage iterations = source_only's 400
                  warmup_iters=160, crop_size=[64, 128], resize_width=206, target_limit=400,
                  stage1_lr=0.001, distill_lr=0.0005, student_init="teacher", freeze_bn_stages=["stage2", "stage3"]),
}
SYNTHIA_RECIPE = dict(synthia_classes=16, lambda_regular=0.0)  # README stage-1 command: --n_class 16, no --regular_w
FRAME_SIZES = {"gta": [1052, 1914], "synthia": [760, 1280], "cityscapes": [1024, 2048]}  # (H, W) data/*_dataset.py


# ----------------------------------------------------------------------------------------------------
# DeepLab-v2 (AdaptSegNet model/deeplab_multi.py topology; torchvision parameter names)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, stride_on="1x1"):
        super().__init__()
        # Caffe-style: the stride sits on the first 1x1 conv; torchvision's on the 3x3 (same shapes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride if stride_on == "1x1" else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride if stride_on == "3x3" else 1, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
           "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3])}


class ASPP(nn.Module):
    """DeepLab-v2 classifier: parallel 3x3 convs with dilation 6/12/18/24 to C channels, summed."""

    def __init__(self, in_channels, num_classes, branches=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d)
                                   for d in (6, 12, 18, 24)[:branches])
        for conv in self.convs:  # weights N(0, 0.01); biases keep PyTorch's default init, as the official code
            nn.init.normal_(conv.weight, 0, 0.01)

    def forward(self, x):
        return sum(conv(x) for conv in self.convs)


class DeepLabV2(nn.Module):
    """ResNet with output stride 8; returns (aux logits on layer3 or None, main logits on layer4)."""

    def __init__(self, backbone="resnet101", num_classes=19, multi_level=False, aspp_branches=4, bn_mode="train",
                 stride_on="1x1"):
        super().__init__()
        if backbone not in RESNETS:
            raise UserError(f"unknown backbone '{backbone}': use one of {', '.join(RESNETS)}")
        block, layers = RESNETS[backbone]
        self.bn_mode, self.inplanes, self.stride_on = bn_mode, 64, stride_on
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.layer1 = self._layer(block, 64, layers[0])
        self.layer2 = self._layer(block, 128, layers[1], stride=2)
        self.layer3 = self._layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._layer(block, 512, layers[3], dilation=4)
        self.aux_head = ASPP(256 * block.expansion, num_classes, aspp_branches) if multi_level else None
        self.head = ASPP(512 * block.expansion, num_classes, aspp_branches)
        for m in self.modules():  # frozen BN affine (official code); statistics still update in train mode
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
        self.train()  # --bn-mode eval holds from the first iteration on, not only after an evaluation

    def _layer(self, block, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion or dilation > 1:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        extra = {"stride_on": self.stride_on} if block is Bottleneck else {}  # BasicBlock: only 3x3 convs
        layers = [block(self.inplanes, planes, stride, dilation, downsample, **extra)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def train(self, mode=True):
        super().train(mode)
        if self.bn_mode == "eval":
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        aux = self.aux_head(x3) if self.aux_head is not None else None
        return aux, self.head(self.layer4(x3))

    def param_groups(self, lr, head_lr_mult):
        heads = [p for n, p in self.named_parameters() if "head" in n and p.requires_grad]
        backbone = [p for n, p in self.named_parameters() if "head" not in n and p.requires_grad]
        return [{"params": backbone, "lr": lr, "lr_mult": 1.0},
                {"params": heads, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult}]


def read_weights(path, flag="--init", script=None) -> dict:
    """Recognise a DeepLab-v2 weights file by its content (never its name) and map it to DeepLabV2's names.

    Returns {"kind": what it is, "state": tensors under our names, "implied": the flags it implies, "iter"}.
    Layouts (../shared/reference/released-models.md):
    - a checkpoint of this repository (a "script" key; `script` given: must be that script's): its model and
      the network flags it was trained with;
    - a torchvision ResNet state dict (fc.*): ImageNet input, stride on the 3x3;
    - a DeepLab-v2 Caffe init file, every key under one prefix (AdaptSegNet's `Scale.` ImageNet+COCO file,
      ADVENT's ImageNet file): the backbone (the official loaders drop the prefix and layer5), Caffe input;
    - an authors' release, raw ResNet keys plus `layer5`/`layer6` ASPP heads (a head on 1024 channels sits on
      layer3: the aux head): AdaptSegNet (aux + layer6, saved by torch < 0.4.1, i.e. without BN
      num_batches_tracked: its code sums 2 ASPP branches), ADVENT (the same keys from torch >= 0.4.1: 4
      branches), BDL (one layer5 head on layer4, torch 0.4.0: 2 branches); Caffe input, stride on the 1x1.
    A flag typed on the command line beats what the file implies (common.cli.imply warns).
    """
    state = read_weights_file(path, flag)
    if isinstance(state, dict) and "script" in state:  # ours
        if script is not None and state["script"] != script:
            raise UserError(f"{path} was written by {state['script']}, not {script}")
        saved = state.get("args", {})
        implied = {k: saved[k] for k in ("backbone", "multi_level", "aspp_branches", "stride_on") if k in saved}
        implied.setdefault("stride_on", "1x1")  # checkpoints from before --stride-on used the Caffe layout
        implied["normalization"] = state.get("normalization", "imagenet")
        return {"kind": f"{state['script']} checkpoint", "state": state["model"], "implied": implied,
                "iter": state.get("iter", 0), "num_classes": state.get("num_classes")}
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers of a plain state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path} is not a DeepLab-v2 weights file: accepted are our checkpoints, torchvision "
                        f"ResNet state dicts, the DeepLab-v2 Caffe init files and the AdaptSegNet/ADVENT/BDL releases")
    prefixes = {k.split(".", 1)[0] for k in state}
    if len(prefixes) == 1 and f"{next(iter(prefixes))}.conv1.weight" in state:  # Caffe init: `Scale.conv1.weight`
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("layer5.", "layer6."))}
        return {"kind": "DeepLab-v2 Caffe init file (backbone)", "state": state, "iter": 0,
                "implied": {"normalization": "caffe", "stride_on": "1x1", **resnet_of(state)}}
    if "fc.weight" in state:
        return {"kind": "torchvision ResNet", "iter": 0, "state": {k: v for k, v in state.items()
                                                                    if not k.startswith("fc.")},
                "implied": {"normalization": "imagenet", "stride_on": "3x3", **resnet_of(state)}}
    heads = {name: state[f"{name}.conv2d_list.0.weight"] for name in ("layer5", "layer6")
             if f"{name}.conv2d_list.0.weight" in state}
    if not heads:
        raise UserError(f"{flag} {path}: unrecognised layout (keys such as {', '.join(list(state)[:3])}); accepted "
                        f"are our checkpoints, torchvision ResNets, the DeepLab-v2 Caffe init files and the "
                        f"AdaptSegNet/ADVENT/BDL releases")
    old_torch = not any(k.endswith("num_batches_tracked") for k in state)
    aux = [name for name, w in heads.items() if w.shape[1] < max(h.shape[1] for h in heads.values())]
    mapped = {}
    for key, value in state.items():
        name = key.split(".", 1)[0]
        if name in heads:  # layer5/layer6.conv2d_list.i.* -> (aux_)head.convs.i.*
            key = ("aux_head" if name in aux else "head") + ".convs." + key.split("conv2d_list.", 1)[1]
        mapped[key] = value
    multi = bool(aux)
    kind = {(True, True): "AdaptSegNet release", (True, False): "ADVENT release"}.get(
        (multi, old_torch), "single-head release (BDL, AdaptSegNet single-level)" if old_torch else "DeepLab-v2 model")
    implied = {"normalization": "caffe", "stride_on": "1x1", "multi_level": multi,
               "aspp_branches": 2 if old_torch else 4, **resnet_of(state)}
    return {"kind": kind, "state": mapped, "implied": implied, "iter": 0}


def resnet_of(state) -> dict:
    """{"backbone": name} when the blocks per layer and the block type of a ResNet state dict match one of
    RESNETS (a file says which depth it is), else {}."""
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4)]
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    names = [n for n, (block, layers) in RESNETS.items() if layers == blocks and (block is Bottleneck) == bottleneck]
    return {"backbone": names[0]} if names else {}


def load_init(model, init, backbone, found=None) -> str:
    """Load --init into the model (found: read_weights' result for a file); return the input normalisation the
    weights expect. The backbone must load completely; heads the file lacks stay at random init (listed)."""
    if init == "none":
        return "imagenet"
    if init == "imagenet":
        state = torchvision.models.get_model(backbone, weights="IMAGENET1K_V1").state_dict()
        found = {"kind": "torchvision ImageNet weights", "state": state, "implied": {"normalization": "imagenet"}}
    load_matching(model, found["state"], f"--init {init} ({found['kind']})", required=lambda k: "head" not in k)
    return found["implied"]["normalization"]


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


# ALGO LOGIC: adversarial losses (adaptsegnet.py's)
SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # domain labels of every discriminator in this repository


def gan_loss(d_logits, domain_label, gan="vanilla"):
    """Discriminator logits against a constant domain label, in fp32: BCE with logits (vanilla) or MSE on the
    raw logits (least squares, the official --gan LS)."""
    d_logits = d_logits.float()
    target = torch.full_like(d_logits, domain_label)
    if gan == "ls":
        return F.mse_loss(d_logits, target)
    return F.binary_cross_entropy_with_logits(d_logits, target)


def discriminator_loss(disc, source_map, target_map, gan="vanilla"):
    """D's loss: 1/2 loss(D(source), 0) + 1/2 loss(D(target), 1) on detached maps (trains D only)."""
    return 0.5 * (gan_loss(disc(source_map.detach()), SOURCE_LABEL, gan)
                  + gan_loss(disc(target_map.detach()), TARGET_LABEL, gan))


def generator_loss(disc, target_map, gan="vanilla"):
    """The segmenter's adversarial term loss(D(target), 0): make target outputs look like source outputs.
    Call it with the unwrapped D and its parameters frozen (set_requires_grad), so D gets no gradient."""
    return gan_loss(disc(target_map), SOURCE_LABEL, gan)


def set_requires_grad(nets, flag):
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def softmax_at(logits, size):
    """Softmax in fp32 of the logits upsampled bilinearly to `size` (the official interp, align_corners=True)."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True).softmax(1)


# ALGO LOGIC: ProDA's warm-up discriminator and head (models/discriminator.py, models/deeplabv2.py)
class ProDADiscriminator(nn.Module):
    """Output-space discriminator of ProDA's warm-up: four 3x3 stride-2 convs num_classes -> 64 -> 128 -> 256 -> 512
    with ReLU, ReLU, ReLU, LeakyReLU(0.2), then a 1x1 conv to one domain logit per position (1/16 of the input);
    no normalisation, no sigmoid, PyTorch's default init. Parameter names follow the official file."""

    def __init__(self, num_classes, ndf=64):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, ndf, 3, 2, 1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 3, 2, 1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 3, 2, 1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 3, 2, 1)
        self.classifier = nn.Conv2d(ndf * 8, 1, 1)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.classifier(F.leaky_relu(self.conv4(x), 0.2))


class SEBlock(nn.Module):
    """Squeeze-and-excitation: channel gates from a global average, two linear layers (reduction r)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.float().mean((2, 3))).to(x.dtype)[:, :, None, None]


class ProDAHead(nn.Module):
    """Five branches (1x1, 3x3 dilated 6/12/18/24) to 256 channels with GroupNorm(32) + ReLU, concatenated, SE,
    3x3 conv to 256 + GroupNorm, Dropout2d(0.1): the 256-d feature of the prototypes; a bias-free 1x1 conv
    gives the logits. Init as ProDA's: every conv weight N(0, 0.01) (its ResNet constructor re-initialises all
    convs), the bottleneck conv's bias 0; the branches' biases and the SE layers keep PyTorch's default init
    (Classifier_Module2's init loops iterate over Sequentials and the SE block, never reaching them)."""

    def __init__(self, in_channels, num_classes, feat_dim=256, dropout=0.1):
        super().__init__()

        def branch(kernel, dilation):
            return nn.Sequential(nn.Conv2d(in_channels, feat_dim, kernel, padding=dilation if kernel == 3 else 0,
                                           dilation=dilation), nn.GroupNorm(32, feat_dim), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, d) for d in (6, 12, 18, 24)])
        self.bottleneck = nn.Sequential(SEBlock(5 * feat_dim), nn.Conv2d(5 * feat_dim, feat_dim, 3, padding=1),
                                        nn.GroupNorm(32, feat_dim))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(self.bottleneck[1].bias)

    def forward(self, x):
        feat = self.dropout(self.bottleneck(torch.cat([b(x) for b in self.branches], 1)))
        return feat, self.classifier(feat)


class ProDANet(DeepLabV2):
    """The shared DeepLab-v2 backbone with ProDA's head; forward returns (256-d features, logits), both at
    stride 8. BN trains (affine and statistics, ProDA's SyncBN), or with frozen_bn (ProDA's --freeze_bn)
    normalises with running statistics that never change and keeps its affine fixed. bn_clr: ProDA's
    `bn_pretrain` BatchNorm on layer4's output before the head (--bn_clr, its SimCLRv2 student of stages 2/3);
    named head_bn here, so that it trains at the head's learning rate as in ProDA (get_10x_lr_params)."""

    def __init__(self, backbone="resnet101", num_classes=19, frozen_bn=False, bn_clr=False, stride_on="1x1",
                 dropout=0.1):
        # aspp_branches=0: the shared constructor builds no ASPP conv; ProDA's head takes its place
        super().__init__(backbone, num_classes, aspp_branches=0, bn_mode="eval" if frozen_bn else "train",
                         stride_on=stride_on)
        channels = 512 * RESNETS[backbone][0].expansion
        self.head_bn = nn.BatchNorm2d(channels) if bn_clr else None
        self.head = ProDAHead(channels, num_classes, dropout=dropout)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(not frozen_bn)
        self.train()  # frozen_bn holds for head_bn too

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.head_bn(x) if self.head_bn is not None else x)


def has_head_bn(state) -> bool:
    """Whether a ProDANet state dict holds ProDA's bn_pretrain (--bn_clr): a network built for it needs one."""
    return "head_bn.weight" in state


# ALGO LOGIC: the files ProDA's code writes and reads, recognised by their content (released-models.md)
# train.py:131-164 saves {'ResNet101': {'model_state', 'objective_vectors'}, 'iter', 'best_iou' (numpy)}, the warm-up
# adds 'FCDiscriminator'; model_state is models/deeplabv2.py's ResNet101: torchvision backbone names, the head as
# layer5 (Classifier_Module2) and, with --bn_clr, bn_pretrain. Its names -> ProDANet's, first matching prefix:
RELEASE_NAMES = (("layer5.conv2d_list.", "head.branches."), ("layer5.bottleneck.0.se.", "head.bottleneck.0.fc."),
                 ("layer5.bottleneck.", "head.bottleneck."), ("layer5.head.1.", "head.classifier."),
                 ("bn_pretrain.", "head_bn."))
ACCEPTED = "this script's checkpoints and ProDA's released models (from_*_on_deeplabv2_best_model.pkl)"
# flags a torchvision-layout ResNet file implies elsewhere that ProDA decides itself: it feeds RGB/255 to the
# torchvision weights it loads into the Caffe layout (--normalization and --stride-on of the run apply; auto: as
# source_only.py)
TORCHVISION_KEEPS = ("normalization", "stride_on")


def release_to_ours(model_state) -> dict:
    out = {}
    for key, value in model_state.items():
        for theirs, ours in RELEASE_NAMES:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        out[key] = value
    return out


def read_proda_weights(path, flag, segmenter_only=True) -> dict:
    """Recognise a weights file by its content (never its name) and map it to ProDANet's names.

    Returns read_weights' dict ({"kind", "state", "implied", "iter", "num_classes"}) plus "normalization" (the
    input the weights expect) and, where the file says, "stage" and "file_miou" (its own evaluation, percent).
    ProDA layouts:
    - a checkpoint of this script: its model, stage and normalization; implies the network flags it was made with;
    - ProDA's released models: implies resnet101 (from the keys), RGB/255 input, stride on the 1x1, bn_clr where
      bn_pretrain is present (stage-2/3 files); the warm-up's FCDiscriminator and every file's objective_vectors
      are not part of the segmenter (ProDA's stage 1 computes its prototypes from the warm-up model: the warm-up
      file's are zeros, never updated);
    - a ResNet backbone state dict with torchvision names, no classifier (bare or under 'state_dict', as ProDA's
      converted SimCLRv2 file r101_1x_sk0.pth, models/deeplabv2.py:362): its depth only.
    Every other file: segmenter_only (the flags that take a trained ProDA model) refuses it in one line naming the
    accepted layouts; else (--init, --student-init) the shared read_weights reads it as a DeepLab-v2 init file, and
    for torchvision files this script keeps its own input normalisation and stride placement (ProDA feeds RGB/255
    to the torchvision weights it loads into the Caffe layout).
    """
    state = read_weights_file(path, flag)
    if isinstance(state, dict) and state.get("script") == SCRIPT:
        saved, model = state.get("args", {}), state["model"]
        implied = {k: saved[k] for k in ("backbone", "stride_on", "head_dropout") if k in saved}
        # the network in the file has bn_pretrain or not; a run resumed gets the stage-2 student flag it had
        implied["bn_clr"] = saved.get("bn_clr", False) if flag == "--resume" else has_head_bn(model)
        return {"kind": f"proda {state.get('stage', '')} checkpoint".replace("  ", " "), "state": model,
                "implied": implied, "iter": state.get("iter", 0), "num_classes": state.get("num_classes"),
                "normalization": state.get("normalization", "imagenet"), "stage": state.get("stage")}
    if isinstance(state, dict) and isinstance(state.get("ResNet101"), dict) and "model_state" in state["ResNet101"]:
        model = release_to_ours(state["ResNet101"]["model_state"])
        if "head.classifier.weight" not in model:
            raise UserError(f"{flag} {path}: a ProDA file without its head (layer5.head.1.weight); accepted are "
                            f"{ACCEPTED}")
        bn_clr = has_head_bn(model)
        kind = ("ProDA warm-up release" if "FCDiscriminator" in state else
                "ProDA stage-2/3 release (bn_pretrain)" if bn_clr else "ProDA stage-1 release")
        best = state.get("best_iou")
        return {"kind": kind, "state": model, "iter": int(state.get("iter", 0)),
                "num_classes": model["head.classifier.weight"].shape[0], "normalization": "unit",
                "implied": {"normalization": "unit", "stride_on": "1x1", "bn_clr": bn_clr, **resnet_of(model)},
                "stage": "warmup" if "FCDiscriminator" in state else None,
                "file_miou": round(100 * float(best), 2) if best is not None else None}
    plain = state.get("state_dict", state) if isinstance(state, dict) else state
    if isinstance(plain, dict) and plain and all(torch.is_tensor(v) for v in plain.values()) \
            and "conv1.weight" in plain and not any(k.startswith(("fc.", "layer5.", "layer6.", "head")) for k in plain):
        return {"kind": "ResNet backbone (torchvision names)", "state": plain, "iter": 0, "num_classes": None,
                "normalization": "imagenet", "keeps": TORCHVISION_KEEPS,
                "implied": {"normalization": "imagenet", "stride_on": "3x3", **resnet_of(plain)}}
    if segmenter_only:
        what = f"written by {state['script']}, " if isinstance(state, dict) and "script" in state else ""
        raise UserError(f"{flag} {path}: {what}not a ProDA model; accepted are {ACCEPTED}")
    found = read_weights(path, flag)
    found["normalization"] = found["implied"]["normalization"]
    if found["kind"] == "torchvision ResNet":
        found["keeps"] = TORCHVISION_KEEPS
    return found


# ALGO LOGIC: prototypes, losses (all in fp32; never call them under autocast)
def prototype_distance(feat, prototypes):
    """Euclidean distance of each feature vector (N x D x H x W) to each prototype (C x D): N x C x H x W."""
    feat = feat.float()
    sq = ((feat ** 2).sum(1, keepdim=True) - 2 * torch.einsum("ndhw,cd->nchw", feat, prototypes)
          + (prototypes ** 2).sum(1).view(1, -1, 1, 1))
    return sq.clamp_min(1e-12).sqrt()


def prototype_weights(feat, prototypes, temperature):
    """omega_k = softmax_k(-||f - eta_k|| / tau) (the official code multiplies by tau; equal at tau = 1)."""
    return F.softmax(-prototype_distance(feat, prototypes) / temperature, 1)


def denoise_labels(soft, weights, valid):
    """Rectified pseudo-labels argmax_k(omega_k p0_k); 255 where the view has no frame pixel (no cut-off)."""
    labels = (weights * soft.float()).argmax(1)
    return labels.masked_fill(~valid, 255)


def batch_count(count, rt=None):
    """What a loss divides its sum by to be a mean over the whole batch (ProDA's batch of 4 in one process): under
    torchrun the count of every process, divided by their number, as DDP averages the processes' gradients
    (per-process means would weigh a pixel by 1/its own process's count). At least 1."""
    if rt is None or not rt.distributed:
        return count.clamp(min=1)
    return rt.all_reduce(count.detach().clone()).clamp(min=1) / rt.world


def sce_loss(logits, labels, alpha, beta, rt=None):
    """Symmetric CE: alpha CE(p, y) + beta RCE, RCE = -sum_k p_k log clamp(onehot_k, 1e-4, 1) = 9.21 sum_{k!=y} p_k,
    p clamped to [1e-7, 1] (official rce()); both means over the batch's pixels with y != 255 (batch_count)."""
    logits = logits.float()
    valid = labels != 255
    count = batch_count(valid.sum(), rt)
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="sum") / count
    prob = logits.softmax(1).clamp(1e-7, 1.0)
    p_label = prob.gather(1, labels.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
    rce = -math.log(1e-4) * (prob.sum(1) - p_label)
    return alpha * ce + beta * (rce * valid).sum() / count


def regular_loss(logits):
    """ProDA's regulariser (MRKLD): mean of -log p over all N*C*H*W entries (pushes away from overconfidence)."""
    return -F.log_softmax(logits.float(), 1).mean()


def consistency_loss(student_feat, teacher_assign, prototypes, temperature, keep, rt=None):
    """KL(z_T || z_S) between the teacher's prototype assignment (warped to the strong view) and the student's on
    the strong view, averaged over the batch's kept N*C*H*W entries (official normalisation: also over classes)."""
    log_student = F.log_softmax(-prototype_distance(student_feat, prototypes) / temperature, 1)
    kl = F.kl_div(log_student, teacher_assign.float(), reduction="none")
    mask = keep.unsqueeze(1).expand_as(kl).float()
    return (kl * mask).sum() / batch_count(mask.sum(), rt)


def hard_label_loss(logits, labels, rt=None):
    """Stages 2/3: CE on the hard labels, logits upsampled to them as seg_loss, mean over the batch's labelled
    pixels (batch_count)."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=True)
    total = F.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
    return total / batch_count((labels != 255).sum(), rt)


def kd_loss(student_logits, teacher_logits, legacy=False):
    """Stages 2/3 distillation. Correct: KL(p_teacher || p_student) summed over classes, mean over pixels.
    legacy: the official code's F.kl_div(softmax(student), p_teacher) averaged over N*C*H*W (it passes
    probabilities where log-probabilities belong; its `teacher != 250` mask is all ones)."""
    p_teacher = teacher_logits.float().softmax(1)
    if legacy:
        return F.kl_div(student_logits.float().softmax(1), p_teacher, reduction="none").mean()
    return F.kl_div(F.log_softmax(student_logits.float(), 1), p_teacher, reduction="none").sum(1).mean()


def class_feature_sums(feat, labels, num_classes, min_pixels=10):
    """Mean feature of each (image, class) with >= min_pixels pixels labelled that class; returns the sum of
    those means over images (C x D) and how many images contributed to each class (C)."""
    valid = labels < num_classes
    onehot = F.one_hot(labels.masked_fill(~valid, 0), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid.unsqueeze(1)
    pixels = onehot.sum((2, 3))
    means = torch.einsum("nchw,ndhw->ncd", onehot, feat.float()) / pixels.clamp(min=1).unsqueeze(-1)
    used = (pixels >= min_pixels).float()
    return (means * used.unsqueeze(-1)).sum(0), used.sum(0)


def update_prototypes(prototypes, mean_sums, counts, momentum):
    """ProDA updates eta_k <- (1 - m) eta_k + m v once per (image, class) mean v, one after another. Here the
    n_k means of a step (summed over ranks) update in closed form: (1 - m)^n eta + (1 - (1 - m)^n) mean(v),
    exact for n = 1 and for equal v, independent of order (so every rank gets the same result)."""
    keep = ((1 - momentum) ** counts).unsqueeze(1)
    mean = mean_sums / counts.clamp(min=1).unsqueeze(1)
    return torch.where(counts.unsqueeze(1) > 0, keep * prototypes + (1 - keep) * mean, prototypes)


@torch.no_grad()
def ema_update(ema, model, momentum):
    """theta_ema <- m theta_ema + (1 - m) theta; buffers (BN statistics) copied, as the official code."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.mul_(momentum).add_(p.detach(), alpha=1 - momentum)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ALGO LOGIC: views. A geometry row (N x 12): [sh, sw, y0, x0, ch, cw, flip, strong_flip, cut_y0, cut_x0, cut_y1,
# cut_x1]: the frame rescaled to sh x sw, cropped to ch x cw at (y0, x0) (zero padding past the rescaled frame)
# and flipped is the weak view; flipped again and cut out (box in strong-view pixels) it is the strong view.
def full_to_view(maps, geom, out_hw, mode="bilinear"):
    """Warp maps covering the full frame onto the weak view at out_hw = crop / r, as ProDA's full2weak: resize to
    floor(1/r of the rescaled frame), crop at floor(offset / r), flip, positions as F.interpolate with
    align_corners=True. Also the mask of view pixels that lie on the rescaled frame (not padding)."""
    n, (h, w) = maps.shape[0], out_hw
    sh, sw, y0, x0, ch, cw, flip = geom.t()[:7].reshape(7, n, 1, 1)
    rows = torch.floor(y0 * h / ch) + torch.arange(h, device=maps.device).view(1, h, 1)  # in the rescaled map
    cols = torch.arange(w, device=maps.device).view(1, 1, w)
    cols = torch.floor(x0 * w / cw) + torch.where(flip > 0, w - 1 - cols, cols)
    frame_h, frame_w = torch.floor(sh * h / ch), torch.floor(sw * w / cw)  # the rescaled map's size
    grid = torch.stack([(2 * cols / (frame_w - 1).clamp(min=1) - 1).expand(n, h, w),
                        (2 * rows / (frame_h - 1).clamp(min=1) - 1).expand(n, h, w)], -1)
    out = F.grid_sample(maps.float(), grid, mode=mode, padding_mode="border", align_corners=True)
    return out, (rows < frame_h) & (cols < frame_w)


def weak_to_strong(maps, keep, geom):
    """Apply the strong view's extra flip to weak-view maps (N x C x h x w) and drop its cut-out box (floored to
    the map's grid, as ProDA's label_strong_T) from keep."""
    n, h, w = keep.shape
    ch, cw, _, strong_flip, cut_y0, cut_x0, cut_y1, cut_x1 = geom.t()[4:].reshape(8, n, 1, 1)
    maps = torch.where(strong_flip.unsqueeze(1) > 0, maps.flip(-1), maps)
    keep = torch.where(strong_flip > 0, keep.flip(-1), keep)
    rows = torch.arange(h, device=keep.device).view(1, h, 1)
    cols = torch.arange(w, device=keep.device).view(1, 1, w)
    cut = ((rows >= torch.floor(cut_y0 * h / ch)) & (rows < torch.floor(cut_y1 * h / ch))
           & (cols >= torch.floor(cut_x0 * w / cw)) & (cols < torch.floor(cut_x1 * w / cw)))
    return maps, keep & ~cut


def _enhance(kind):  # factor 0.09 v + 0.05 in [0.14, 0.86] (randaugment.py: max 0.9, bias 0.05; never above 1)
    return lambda img, v: kind(img).enhance(v * 0.9 / 10 + 0.05)


# ProDA's RandAugmentMC pool (data/randaugment.py fixmatch_augment_pool), photometric ops only (header);
# v in 1..9: posterize keeps 4-7 bits, solarize threshold 256 - 25.6 v
RANDAUGMENT_OPS = [
    lambda img, v: ImageOps.autocontrast(img), lambda img, v: ImageOps.equalize(img), lambda img, v: img,
    _enhance(ImageEnhance.Brightness), _enhance(ImageEnhance.Color), _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Sharpness), lambda img, v: ImageOps.posterize(img, v * 4 // 10 + 4),
    lambda img, v: ImageOps.solarize(img, 256 - v * 256 // 10)]


class TargetViews(torch.utils.data.Dataset):
    """Target train frames as dicts of uint8 images, only the `views` asked for: "full" (the frame at `size`),
    "weak" (rescaled by U(scale), cropped, flipped), "strong" (weak + flip + RandAugment + Cutout); always
    "geom" (the geometry row) and "index"."""

    def __init__(self, split, size, crop, scale, views, randaugment_ops=2, limit=None):
        self.split, self.size, self.crop, self.scale, self.views = split, tuple(size), tuple(crop), scale, views
        self.ops, self.limit = randaugment_ops, min(limit or len(split), len(split))
        # the full frames at `size`, bilinear: from a prepared copy when one matches (README), else the PNG files
        self.frames = ResizedFrames(split, self.size, interpolation="bilinear", with_label=False)

    def __len__(self):
        return self.limit

    def __getitem__(self, key):
        index, seed = key
        rng = np.random.default_rng(seed)
        full, _ = self.frames(index)
        s = rng.uniform(*self.scale)
        scaled, _ = resize_pair(full, None, (int(full.shape[0] * s + 0.5), int(full.shape[1] * s + 0.5)),
                                interpolation="bilinear")
        (sh, sw), (ch, cw) = scaled.shape[:2], self.crop
        y0, x0 = int(rng.integers(0, max(sh - ch, 0) + 1)), int(rng.integers(0, max(sw - cw, 0) + 1))
        weak = np.zeros((ch, cw, 3), np.uint8)
        patch = scaled[y0:y0 + ch, x0:x0 + cw]
        weak[:patch.shape[0], :patch.shape[1]] = patch
        flip, strong_flip = rng.random() < 0.5, rng.random() < 0.5
        images = {"full": full, "weak": weak[:, ::-1] if flip else weak}
        cut = [0, 0, 0, 0]
        if "strong" in self.views:
            strong = Image.fromarray(np.ascontiguousarray(images["weak"][:, ::-1] if strong_flip else images["weak"]))
            for op in rng.integers(0, len(RANDAUGMENT_OPS), self.ops):
                if rng.random() < 0.5:
                    strong = RANDAUGMENT_OPS[op](strong, int(rng.integers(1, 10)))
            images["strong"] = strong = np.array(strong)
            side, cy, cx = min(ch, cw) // 3, rng.uniform(0, ch), rng.uniform(0, cw)  # always-on Cutout, gray 127
            cy0, cx0 = int(max(cy - side / 2, 0)), int(max(cx - side / 2, 0))  # CutoutAbs: shrinks only at the far
            cut = [cy0, cx0, min(cy0 + side, ch), min(cx0 + side, cw)]  # edge; PIL's rectangle fills its far corner
            strong[cut[0]:cut[2] + 1, cut[1]:cut[3] + 1] = 127
        out = {k: torch.from_numpy(np.ascontiguousarray(images[k].transpose(2, 0, 1))) for k in self.views}
        out["geom"] = torch.tensor([sh, sw, y0, x0, ch, cw, flip, strong_flip, *cut], dtype=torch.float32)
        return {**out, "index": index}


# ----------------------------------------------------------------------------------------------------
STAGES = ("warmup", "stage1", "stage2", "stage3")


def parse_proda_args(argv=None):
    """parse_args, plus ProDA's SYNTHIA recipe with --source synthia (below explicit flags and the preset's own
    values) and the warm-up's schedule (the stages' unless given)."""
    args = parse_args(Args, PRESETS, argv, description=__doc__)
    if args.source == "synthia":
        presets = {name: {**SYNTHIA_RECIPE, **values} for name, values in PRESETS.items()}
        args = parse_args(Args, presets, argv, description=__doc__)
    args.warmup_iters = args.warmup_iters or args.iters
    args.warmup_poly_horizon = args.poly_horizon or args.warmup_iters
    args.source_size = args.source_size or FRAME_SIZES.get(args.source)  # else the first frame's size (main)
    args.target_size = args.target_size or FRAME_SIZES.get(args.target)
    return args


def stage_plan(args) -> tuple:
    """The stages this command runs, after checking that every stage flag can act."""
    if not set(args.freeze_bn_stages) <= {*STAGES, "none"}:
        raise UserError(f"--freeze-bn-stages {' '.join(args.freeze_bn_stages)}: use {', '.join(STAGES)} or none")
    if args.warmup_checkpoint and args.stage not in ("stage1", "all"):
        raise UserError("--warmup-checkpoint is where stage 1 starts: use it with --stage stage1 or all")
    if args.teacher_checkpoint and args.stage not in ("stage2", "stage3"):
        raise UserError("--teacher-checkpoint replaces this run's previous stage: use it with --stage stage2 or stage3")
    if args.stage == "all":
        return STAGES[1:] if args.warmup_checkpoint else STAGES
    return (args.stage,)


# the flags each file may set: a trained model given as a stage's start sets only what every stage shares (its own
# network follows the file: bn_pretrain, input normalisation); a file to evaluate or resume sets its network flags
IMPLIES = {"--weights": ("backbone", "stride_on", "bn_clr", "normalization", "head_dropout"),
           "--resume": ("backbone", "stride_on", "bn_clr", "head_dropout"),
           "--init": ("backbone", "stride_on", "normalization"),
           "--student-init": ("backbone", "stride_on", "normalization"),
           "--warmup-checkpoint": ("backbone", "stride_on"), "--teacher-checkpoint": ("backbone", "stride_on")}
QUIRKS = {"backbone": "{}", "stride_on": "stride on {}", "normalization": "{} input", "bn_clr": "bn_pretrain: {}",
          "head_dropout": "head dropout {}"}


def prepare_files(args, ckpt_path, num_classes, stages) -> dict:
    """Read every file this command starts from, before any network is built: --eval-only's --weights, the resume
    checkpoint (its network flags), --init and --student-init where a stage starts from them, --warmup-checkpoint,
    --teacher-checkpoint. Check each file's classes, apply the flags it implies (IMPLIES; a typed flag wins with a
    warning; two files implying different values is an error), print one line on what was recognised, resolve
    --stride-on auto. Returns {flag: read_proda_weights' result plus "path" and "applied"}."""
    if args.weights and not args.eval_only:
        raise UserError("--weights is read by --eval-only; to start training from a file use --init PATH")
    wanted = {}  # flag -> (path, whether only a trained ProDA model fits)
    if args.eval_only:
        if len(args.weights) != 1:
            raise UserError("--eval-only needs exactly one --weights PATH")
        wanted["--weights"] = (args.weights[0], True)
    else:
        if ckpt_path:
            wanted["--resume"] = (ckpt_path, True)
        init_used = "warmup" in stages or ("stage2" in stages and args.student_init == "init")
        if args.init not in ("imagenet", "none") and init_used:
            wanted["--init"] = (args.init, False)
        if "stage2" in stages and args.student_init not in ("init", "teacher"):
            wanted["--student-init"] = (args.student_init, False)
        for flag, path in (("--warmup-checkpoint", args.warmup_checkpoint),
                           ("--teacher-checkpoint", args.teacher_checkpoint)):
            if path:
                wanted[flag] = (path, True)
    files, implied_by = {}, {}
    for flag, (path, segmenter_only) in wanted.items():
        found = read_proda_weights(path, flag, segmenter_only)
        if found.get("num_classes") not in (None, num_classes):
            synthia = 16 in (found["num_classes"], num_classes)
            hint = " (ProDA's SYNTHIA models are 16-way: --source synthia)" if synthia else ""
            raise UserError(f"{flag} {path} has {found['num_classes']} classes, this run has {num_classes}{hint}")
        implied = {k: v for k, v in found["implied"].items() if k in IMPLIES[flag] and k not in found.get("keeps", ())}
        for k, v in implied.items():
            if k not in args.given and implied_by.get(k, (flag, v))[1] != v:
                raise UserError(f"{implied_by[k][0]} implies --{k.replace('_', '-')} {implied_by[k][1]}, {flag} {path} "
                                f"implies {v}: type the flag to choose")
            implied_by.setdefault(k, (flag, v))
        found["path"], found["applied"] = path, imply(args, implied, found["kind"])
        said = ", ".join(QUIRKS[k].format(v) for k, v in found["applied"].items())
        own = f" (its own evaluation: {found['file_miou']} mIoU)" if found.get("file_miou") is not None else ""
        if flag != "--resume":
            print(f"recognised {found['kind']} ({flag})" + (f": {said}" if said else "") + own, flush=True)
        files[flag] = found
    if args.stride_on == "auto":  # typed: where the loaded weights expect it (source_only.py's rule)
        expected = [f["implied"]["stride_on"] for f in files.values() if "stride_on" in f["implied"]]
        args.stride_on = expected[0] if expected else "3x3" if args.init == "imagenet" else "1x1"
    return files


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: one iteration of each stage (main() calls them; tests/test_proda.py checks each against a reference).
# Images arrive normalised on the device; the train_* networks may be DDP wrappers of the ones they update.
def sgd_step(loss, optimizer, rt):
    optimizer.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.step(optimizer)
    rt.scaler.update()


def warmup_step(train_model, disc, train_disc, optimizer, d_optimizer, rt, images, labels, target_images, lambda_adv,
                gan):
    """ProDA's warm-up (adaptation_modelv2.py step_adv): source CE + lambda_adv x the adversarial loss of the target
    softmax through the frozen D, one SGD step of the segmenter; then D's step on both detached softmax maps (source
    0, target 1), the two halves summed. disc: the unwrapped D (its DDP wrapper train_disc gets D's own loss)."""
    with rt.autocast():
        _, source_logits = train_model(images)
        _, target_logits = train_model(target_images)
    source_map = softmax_at(source_logits.detach(), images.shape[-2:])
    target_map = softmax_at(target_logits, target_images.shape[-2:])
    set_requires_grad([disc], False)
    with rt.autocast():
        adv = generator_loss(disc, target_map, gan)
    losses = {"seg_src": seg_loss(source_logits, labels), "adv_main": adv}
    sgd_step(losses["seg_src"] + lambda_adv * losses["adv_main"], optimizer, rt)
    set_requires_grad([disc], True)
    with rt.autocast():  # ProDA's D loss sums the two halves (adaptation_modelv2.py:174-175)
        losses["d_main"] = 2 * discriminator_loss(train_disc, source_map, target_map, gan)
    sgd_step(losses["d_main"], d_optimizer, rt)
    return losses


def stage1_step(train_model, ema, prototypes, optimizer, rt, images, labels, target, soft, args):
    """ProDA's stage-1 iteration (adaptation_modelv2.py step). The EMA model (no gradient, train mode) sees the full
    target frames; its features at 1/4 of the frame, warped to the weak view, give the prototype weights omega that
    denoise the soft labels into pseudo-labels, and, warped on to the strong view, the teacher's prototype
    assignments. Loss = source CE + SCE(weak view, pseudo-labels) + lambda_consistency KL(teacher || student
    assignments on the strong view) + lambda_regular mean(-log p) on the weak view; one SGD step. Then the
    prototypes move toward the EMA's per-(image, class) mean features (summed over ranks), and the EMA follows the
    student (parameters averaged, buffers copied). target: "full", "weak", "strong" images and "geom" rows;
    soft: the warm-up softmax at stride 8 of each full frame. prototypes and ema change in place."""
    full, geom = target["full"], target["geom"]
    full_quarter = (full.shape[-2] // 4, full.shape[-1] // 4)
    quarter = (target["weak"].shape[-2] // 4, target["weak"].shape[-1] // 4)  # every target loss lives at 1/4
    with torch.no_grad():
        with rt.autocast():
            ema_feat, ema_logits = ema(full)
        ema_feat = F.interpolate(ema_feat.float(), size=full_quarter, mode="bilinear", align_corners=True)
        ema_logits = F.interpolate(ema_logits.float(), size=full_quarter, mode="bilinear", align_corners=True)
        weak_feat, valid = full_to_view(ema_feat, geom, quarter)
        weights = prototype_weights(weak_feat, prototypes, args.proto_temperature)
        soft, _ = full_to_view(soft, geom, quarter)
        pseudo = denoise_labels(soft, weights, valid)
        teacher_assign, keep = weak_to_strong(weights, valid, geom)
    with rt.autocast():
        _, source_logits = train_model(images)
        _, weak_logits = train_model(target["weak"])
        strong_feat, _ = train_model(target["strong"])
    weak_logits = F.interpolate(weak_logits.float(), size=quarter, mode="bilinear", align_corners=True)
    strong_feat = F.interpolate(strong_feat.float(), size=quarter, mode="bilinear", align_corners=True)
    losses = {"seg_src": seg_loss(source_logits, labels),
              "sce": sce_loss(weak_logits, pseudo, args.sce_alpha, args.sce_beta, rt),
              "proto_kl": consistency_loss(strong_feat, teacher_assign, prototypes, args.proto_temperature, keep, rt),
              "reg": regular_loss(weak_logits)}
    sgd_step(losses["seg_src"] + losses["sce"] + args.lambda_consistency * losses["proto_kl"]
             + args.lambda_regular * losses["reg"], optimizer, rt)
    # the prototypes the loss used are the ones before this step's update (official order)
    sums, counts = class_feature_sums(ema_feat, ema_logits.argmax(1), prototypes.shape[0], args.proto_min_pixels)
    rt.all_reduce(sums), rt.all_reduce(counts)
    prototypes.copy_(update_prototypes(prototypes, sums, counts, args.proto_momentum))
    ema_update(ema, unwrap(train_model), args.ema_momentum)
    losses["pseudo_weight"] = (pseudo != 255).float().mean()
    return losses


def distill_step(train_model, teacher, optimizer, rt, images, labels, strong, teacher_strong, hard, conf, geom, args):
    """ProDA's stage-2/3 iteration (adaptation_modelv2.py step_distillation): the teacher's hard labels (confidence
    <= label_threshold ignored), warped to the strong view with its cut-out ignored; loss = source CE + CE(student
    on the strong view, hard labels) + lambda_kd KD(frozen eval-mode teacher on the same strong image -> student),
    one SGD step. strong / teacher_strong: the strong view normalised for the student / the teacher; hard, conf:
    the teacher's labels and confidences at 1/4 of each full frame."""
    quarter = (strong.shape[-2] // 4, strong.shape[-1] // 4)
    with torch.no_grad():
        hard = hard.float()
        hard[conf.float() <= args.label_threshold] = 255
        hard, valid = full_to_view(hard.unsqueeze(1), geom, quarter, mode="nearest")
        hard, keep = weak_to_strong(hard, valid, geom)
        hard = hard[:, 0].masked_fill(~keep, 255).long()
        with rt.autocast():
            _, teacher_logits = teacher(teacher_strong)
    with rt.autocast():
        _, source_logits = train_model(images)
        _, strong_logits = train_model(strong)
    size = dict(size=quarter, mode="bilinear", align_corners=True)
    losses = {"seg_src": seg_loss(source_logits, labels), "seg_tgt": hard_label_loss(strong_logits, hard, rt),
              "kd": kd_loss(F.interpolate(strong_logits.float(), **size),
                            F.interpolate(teacher_logits.float(), **size), args.kd_legacy)}
    sgd_step(losses["seg_src"] + losses["seg_tgt"] + args.lambda_kd * losses["kd"], optimizer, rt)
    losses["pseudo_weight"] = (hard != 255).float().mean()
    return losses


# ----------------------------------------------------------------------------------------------------
def main():
    args = parse_proda_args()  # ALGO LOGIC: parse_args plus the SYNTHIA recipe and the warm-up's schedule
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
    channels_last = torch.channels_last if rt.channels_last else torch.preserve_format

    # ALGO LOGIC: the stages, the files they start from, networks and optimisers (each stage builds its own)
    stages = stage_plan(args)
    files = prepare_files(args, ckpt_path, num_classes, stages)  # recognised, their implied flags applied

    def build_net(frozen_bn, bn_clr=False):
        net = ProDANet(args.backbone, num_classes, frozen_bn, bn_clr, args.stride_on, args.head_dropout)
        if rt.distributed and rt.device.type == "cuda" and not frozen_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # ProDA: SyncBN (gloo/CPU: statistics per rank)
        return net.to(rt.device, memory_format=channels_last).train()

    def sgd(net, lr, head_lr_mult):
        return torch.optim.SGD(net.param_groups(lr, head_lr_mult), lr=lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)

    def chosen_norm(init_norm):  # an explicit --normalization beats what the init file implies
        return args.normalization if args.normalization != "auto" else init_norm

    iters_of = {"warmup": args.warmup_iters, **dict.fromkeys(STAGES[1:], args.iters)}
    horizon_of = {"warmup": args.warmup_poly_horizon, **dict.fromkeys(STAGES[1:], args.poly_horizon)}
    networks = {"model": ProDANet(args.backbone, num_classes, bn_clr=args.bn_clr, stride_on=args.stride_on),
                "disc_main": ProDADiscriminator(num_classes)}  # for the parameter counts

    # TRY NOT TO MODIFY: run folder, dry run, resume
    loaded = [{"flag": flag, "file": found["path"], "kind": found["kind"],
               "implied": found["applied"], **({"file_miou": found["file_miou"]} if found.get("file_miou") else {})}
              for flag, found in files.items()]
    if args.eval_only:
        loaded = {k: v for k, v in loaded[0].items() if k != "flag"}
    log = RunLog(out_dir, rt.is_main)
    log.write_config(SCRIPT, args, param_counts(**networks), num_classes=num_classes, stages=list(stages),
                     loaded=loaded or None)
    if args.dry_run:
        print(f"dry run: config written to {log.path('config.json')}")
        return
    if args.eval_only:  # every tensor of the segmenter from the file, nothing left over
        found = files["--weights"]
        eval_model = build_net(frozen_bn=True, bn_clr=args.bn_clr)
        load_matching(eval_model, found["state"], f"--weights {args.weights[0]} ({found['kind']})",
                      required=lambda k: True, unused_ok=lambda k: False)
    resume_ckpt = load_checkpoint(ckpt_path, SCRIPT, num_classes) if ckpt_path else None
    if resume_ckpt is not None and "optimizer0" not in resume_ckpt:
        raise UserError(f"{ckpt_path} holds weights only; resume from the run's checkpoints/last.pt")
    if resume_ckpt is not None and resume_ckpt["stage"] not in stages:
        if STAGES.index(resume_ckpt["stage"]) > STAGES.index(stages[-1]):
            raise UserError(f"{ckpt_path} is from {resume_ckpt['stage']}, past --stage {args.stage}: nothing to do")
        resume_ckpt = None  # an earlier stage's checkpoint: the requested stage starts fresh

    def to_input(images, norm):
        x = normalize(images.to(rt.device, non_blocking=True), norm)
        return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x

    # TRY NOT TO MODIFY: evaluation
    target_val = domain_split(args.target, "val", args.data_root)
    eval_size = args.eval_size or args.target_size or target_val.paper_size

    def evaluate_model(net, norm, final=False):
        rt.share_buffers(net)  # rank 0's BN statistics on every rank: the network its checkpoint holds
        net.eval()
        with torch.no_grad(), rt.autocast():
            summary = evaluate_target(lambda x: net(to_input(x, norm))[1], target_val, rt, align_corners=True,
                                      log=log, num_predictions=args.num_predictions if final else 0,
                                      limit=args.eval_limit, eval_size=eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19,
                                      interpolation="bilinear", save_dir=args.save_predictions if final else None,
                                      num_workers=args.num_workers)
        net.train()
        return summary

    if args.eval_only:
        summary = evaluate_model(eval_model, args.normalization if args.normalization != "auto"
                                 else files["--weights"]["normalization"], final=True)
        log.write_results(summary, files["--weights"]["iter"], weights=args.weights,
                          stage=files["--weights"].get("stage"), loaded=loaded)
        print(f"target val mIoU {summary['miou']:.2f} ({log.path('results.json')})")
        return

    # ALGO LOGIC: what each stage starts from
    given = {"warmup": "--warmup-checkpoint"}  # a finished stage's weights from a file instead of the run folder
    if args.teacher_checkpoint:
        given[STAGES[STAGES.index(args.stage) - 1]] = "--teacher-checkpoint"

    def handover(stage):
        """The finished `stage`'s weights, for the next stage: the file given for it or its final weights in this run
        folder (<stage>/checkpoints/last.pt; with --handover best its best on target val, best.pt).
        Returns {"model", "normalization", "source"}."""
        flag = given.get(stage)
        if flag in files:  # its own input normalisation unless --normalization is typed
            found, typed = files[flag], "normalization" in args.given and args.normalization != "auto"
            return {"model": found["state"], "normalization": args.normalization if typed else found["normalization"],
                    "source": f"{flag} {found['path']} ({found['kind']})"}
        path = log.path(stage, "checkpoints", "last.pt")
        if not os.path.isfile(path) or load_checkpoint(path, SCRIPT, num_classes)["iter"] < iters_of[stage]:
            raise UserError(f"no finished {stage} in {path}: run --stage {stage} first with the same --out"
                            + (" (or pass --warmup-checkpoint)" if stage == "warmup" else
                               " (or pass --teacher-checkpoint)"))
        ckpt = load_checkpoint(log.path(stage, "checkpoints", f"{args.handover}.pt"), SCRIPT, num_classes)
        return {"model": ckpt["model"], "normalization": ckpt["normalization"], "source": None}

    def load_handover(net, handed):  # every tensor, nothing left over; a file's loading is reported
        load_matching(net, handed["model"], handed["source"] or "the previous stage", required=lambda k: True,
                      unused_ok=lambda k: False, quiet=handed["source"] is None)

    # ALGO LOGIC: data (the streams of each stage have their own seeds; ranks split each stream)
    source_train = domain_split(args.source, "train", args.data_root, synthia_classes=args.synthia_classes)
    target_train = domain_split(args.target, "train", args.data_root, labelled=False)
    # every frame of a domain is first resized to one size (ProDA's loaders); other datasets: their first frame's
    source_size = args.source_size or list(source_train.load(0, False)[0].shape[:2])
    target_size = args.target_size or list(target_train.load(0, False)[0].shape[:2])
    crop = args.crop_size or target_size
    crop = (crop[0], crop[0]) if len(crop) == 1 else tuple(crop)
    full_quarter = (target_size[0] // 4, target_size[1] // 4)  # the hard labels' size (1/4 of the frame)
    per_rank_batch = args.batch_size // rt.world

    def width_scale(size):  # the factor range that takes a frame of this size to width U(scale_range) x resize_width
        return tuple(s * args.resize_width / size[1] for s in args.scale_range)

    def loaders(stage, start_iter, views):
        seed = args.seed + 1000 * STAGES.index(stage)
        source = SegDataset(source_train, TrainTransform(size=source_size, scale=width_scale(source_size), crop=crop,
                                                         flip=True, interpolation="bilinear"))
        target = TargetViews(target_train, target_size, crop, width_scale(target_size), views, args.randaugment_ops,
                             args.target_limit)
        kw = dict(num_workers=args.num_workers, pin_memory=rt.device.type == "cuda")
        return (train_loader(source, per_rank_batch, seed, start_iter, rt.rank, rt.world, **kw),
                train_loader(target, per_rank_batch, seed + 100_003, start_iter, rt.rank, rt.world, **kw))

    def target_pass(folder, desc, arrays, per_frame, finish=dict):
        """per_frame(image) -> {name: row} over every target train frame (sharded over ranks, progress on rank 0)
        into memory-mapped .npy files {name: (row shape, dtype)} in folder; then finish() on every rank, whose dict
        goes into done.json. A pass with done.json is reused by --resume. Returns the files, read-only."""
        done, paths = os.path.join(folder, "done.json"), {k: os.path.join(folder, f"{k}.npy") for k in arrays}
        if not (args.resume and os.path.isfile(done)):
            n = min(args.target_limit or len(target_train), len(target_train))
            if rt.is_main:
                os.makedirs(folder, exist_ok=True)
                for k, (shape, dtype) in arrays.items():
                    np.lib.format.open_memmap(paths[k], "w+", dtype, (n, *shape)).flush()
            rt.barrier()
            rows = {k: np.load(p, mmap_mode="r+") for k, p in paths.items()}
            frames = SegDataset(target_train, eval_size=target_size, with_label=False, eval_interpolation="bilinear")
            with torch.no_grad():
                for image, _, index in tqdm(eval_loader(frames, rt.rank, rt.world, args.num_workers, n), desc=desc,
                                            disable=not rt.is_main, dynamic_ncols=True):
                    for k, row in per_frame(image).items():
                        rows[k][int(index[0])] = row[0].cpu().numpy()
            for r in rows.values():
                r.flush()
            rt.barrier()  # every rank's rows are on disk before done.json says so
            extra = finish()
            if rt.is_main:
                save_json(done, {"frames": n, **{k: list(s) for k, (s, _) in arrays.items()}, **extra})
            rt.barrier()
        return {k: np.load(p, mmap_mode="r") for k, p in paths.items()}  # read row by row, never held whole

    def prepare_soft_labels(net, norm, folder):
        """Prep a+b: warm-up softmax of every target frame at stride 8 (float16) and the prototypes, image-weighted
        means of the warm-up features per warm-up argmax class (pairs with >= 10 pixels)."""
        sums, counts = torch.zeros(num_classes, 256, device=rt.device), torch.zeros(num_classes, device=rt.device)

        def per_frame(image):
            with rt.autocast():
                feat, logits = net(to_input(image, norm))
            prob = logits.float().softmax(1)
            s, c = class_feature_sums(feat, prob.argmax(1), num_classes, args.proto_min_pixels)
            sums.add_(s), counts.add_(c)
            return {"soft": prob.half()}

        def finish():
            rt.all_reduce(sums), rt.all_reduce(counts)
            if rt.is_main:
                torch.save((sums / counts.clamp(min=1).unsqueeze(1)).cpu(), os.path.join(folder, "prototypes.pt"))
            return {"class_images": counts.tolist()}

        net.eval()
        with torch.no_grad(), rt.autocast():
            stride8 = net(to_input(torch.zeros(1, 3, *target_size, dtype=torch.uint8), norm))[1].shape[-2:]
        soft = target_pass(folder, "soft labels + prototypes", {"soft": ((num_classes, *stride8), np.float16)},
                           per_frame, finish)["soft"]
        net.train()
        return soft, torch.load(os.path.join(folder, "prototypes.pt"), weights_only=True).to(rt.device)

    def prepare_hard_labels(net, norm, folder):
        """Prep c: hard labels (uint8) and confidences (float16) of the teacher with flip TTA, at 1/4 of the
        target frame; --label-threshold is applied when they are read."""
        def per_frame(image):
            x = to_input(image, norm)
            with rt.autocast():
                logits, flipped = net(x)[1], net(x.flip(-1))[1]
            prob = (logits.float().softmax(1) + flipped.float().softmax(1).flip(-1)) / 2
            conf, label = F.interpolate(prob, size=full_quarter, mode="bilinear", align_corners=True).max(1)
            return {"labels": label.to(torch.uint8), "conf": conf.half()}

        net.eval()
        rows = target_pass(folder, "hard labels (flip TTA)", {"labels": (full_quarter, np.uint8),
                                                                "conf": (full_quarter, np.float16)}, per_frame)
        return rows["labels"], rows["conf"]

    def rows_of(rows, index):
        return torch.from_numpy(np.stack([rows[int(i)] for i in index])).to(rt.device, non_blocking=True)

    def train_stage(stage, net, norm, optimizers, step, views, state=dict, restore=lambda ckpt: None):
        """One stage: step(source batch, target batch) -> losses; optimizers: (optimizer, base lr); state() ->
        extra checkpoint entries, restore(checkpoint) reloads them. <out>/checkpoints/last.pt is the run's
        resumable state (any stage); <stage>/checkpoints/last.pt (and best.pt with --handover best) the stage's
        final (best) weights, which the next stage starts from."""
        seed_everything(args.seed + STAGES.index(stage), args.torch_deterministic)
        stage_log = RunLog(log.path(stage), rt.is_main)
        iters, running, start_iter, best_miou = iters_of[stage], {}, 0, -1.0
        if resume_ckpt is not None and resume_ckpt["stage"] == stage:  # exact continuation
            load_matching(net, resume_ckpt["model"], f"--resume {ckpt_path}", required=lambda k: True,
                          unused_ok=lambda k: False, quiet=True)
            for k, (optimizer, _) in enumerate(optimizers):
                optimizer.load_state_dict(resume_ckpt[f"optimizer{k}"])
            rt.scaler.load_state_dict(resume_ckpt["scaler"])
            set_rng_state(resume_ckpt["rng"])
            restore(resume_ckpt)
            start_iter, best_miou = resume_ckpt["iter"], resume_ckpt.get("best_miou", -1.0)
            print(f"resumed {stage} from {ckpt_path} at iteration {start_iter}")
        source_batches, target_batches = loaders(stage, start_iter, views)

        def weights(it):
            return {"script": SCRIPT, "num_classes": num_classes, "stage": stage, "iter": it, "normalization": norm,
                    "args": dataclasses.asdict(args), "model": net.state_dict()}

        def checkpoint(it):
            extra = state()  # on every rank: it may compare the ranks
            if rt.is_main:
                if it == iters:  # first, so a run whose last.pt says finished has the stage's final weights
                    save_checkpoint(stage_log.path("checkpoints", "last.pt"), {**weights(it), **extra})
                save_checkpoint(log.path("checkpoints", "last.pt"), {
                    **weights(it), **{f"optimizer{k}": o.state_dict() for k, (o, _) in enumerate(optimizers)},
                    "scaler": rt.scaler.state_dict(), "rng": rng_state(), "best_miou": best_miou, **extra})

        def evaluate(it, final=False):
            nonlocal best_miou
            summary = evaluate_model(net, norm, final)
            stage_log.log_eval(it, summary)
            if args.handover == "best" and summary["miou"] >= best_miou:  # ProDA keeps the newest of equals
                best_miou = summary["miou"]
                if rt.is_main:
                    save_checkpoint(stage_log.path("checkpoints", "best.pt"), {**weights(it), "miou": best_miou})
            return summary

        # TRY NOT TO MODIFY: training loop
        stage_log.start_loop(start_iter)
        progress = tqdm(range(start_iter, iters), initial=start_iter, total=iters, disable=not rt.is_main,
                        desc=f"{SCRIPT} {stage}", dynamic_ncols=True)
        for it in progress:
            for optimizer, base_lr in optimizers:
                set_lr(optimizer, poly_lr(base_lr, it, horizon_of[stage], args.poly_power))

            # ALGO LOGIC: one iteration
            losses = step(next(source_batches), next(target_batches))

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach()
            done = it + 1
            if done % args.log_every == 0 or done % args.checkpoint_every == 0 or done == iters:
                lr = poly_lr(optimizers[0][1], it, horizon_of[stage], args.poly_power)  # the segmenter's
                scalars = stage_log.check_and_log(done, running, lr, args.batch_size, progress,
                                                  write=done % args.log_every == 0 or done == iters)
                running = {} if scalars is not None else running
            if args.eval_every and done % args.eval_every == 0 and done != iters:
                evaluate(done)
            if done % args.checkpoint_every == 0 or done == iters:
                checkpoint(done)

        # TRY NOT TO MODIFY: final evaluation
        summary = evaluate(iters, final=True)
        stage_log.write_results(summary, iters, stage=stage)
        if stage == stages[-1]:  # the run's results.json: its last stage's, so a half-done run is not finished
            log.write_results(summary, iters, stage=stage, loaded=loaded or None,
                              total_iters=sum(iters_of[s] for s in STAGES[:STAGES.index(stage) + 1]))
        stage_log.close()
        return summary

    # ALGO LOGIC: warm-up, output-space adversarial (source CE + lambda_adv LS-GAN on the target softmax)
    def run_warmup():
        model = build_net(frozen_bn="warmup" in args.freeze_bn_stages)
        norm = chosen_norm(load_init(model, args.init, args.backbone, files.get("--init")))
        disc = ProDADiscriminator(num_classes).to(rt.device, memory_format=channels_last)
        optimizer = sgd(model, args.lr, args.head_lr_mult)
        d_optimizer = torch.optim.Adam([{"params": disc.parameters(), "lr_mult": 1.0}], lr=args.lr_d,
                                       betas=(0.9, 0.99))
        train_model, train_disc = rt.wrap(model), rt.wrap(disc)

        def step(source, target):
            images, labels, _ = source
            labels = labels.to(rt.device, non_blocking=True).long()
            return warmup_step(train_model, disc, train_disc, optimizer, d_optimizer, rt, to_input(images, norm),
                               labels, to_input(target["weak"], norm), args.lambda_adv, args.gan)

        return train_stage("warmup", model, norm, [(optimizer, args.lr), (d_optimizer, args.lr_d)], step, ("weak",),
                           state=lambda: {"disc_main": disc.state_dict()},
                           restore=lambda ckpt: disc.load_state_dict(ckpt["disc_main"]))

    # ALGO LOGIC: stage 1, prototypical pseudo-label denoising + structure consistency
    def run_stage1():
        warm = handover("warmup")
        model = build_net(frozen_bn="stage1" in args.freeze_bn_stages, bn_clr=has_head_bn(warm["model"]))
        load_handover(model, warm)
        norm = warm["normalization"]
        optimizer = sgd(model, args.stage1_lr, 1.0)  # stage 1: one lr for backbone and head (official)
        soft_rows, prototypes = prepare_soft_labels(model, norm, log.path("stage1", "pseudo"))
        ema = copy.deepcopy(model).requires_grad_(False)  # train mode, as the official EMA
        train_model = rt.wrap(model)

        def step(source, target):
            images, labels, _ = source
            labels = labels.to(rt.device, non_blocking=True).long()
            views = {k: to_input(target[k], norm) for k in ("full", "weak", "strong")}
            views["geom"] = target["geom"].to(rt.device, non_blocking=True)
            return stage1_step(train_model, ema, prototypes, optimizer, rt, to_input(images, norm), labels, views,
                               rows_of(soft_rows, target["index"]), args)

        def state():
            if rt.distributed:  # the closed-form prototype update and the EMA must leave every rank identical
                probe = torch.stack([t.double().sum() for t in (prototypes, *ema.parameters())])
                lo, hi = (rt.all_reduce(probe.clone(), op) for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX))
                if not torch.equal(lo, hi):
                    raise RuntimeError("prototypes or EMA weights differ between ranks")
                if rt.is_main:
                    tqdm.write(f"prototypes and EMA weights: identical on all {rt.world} ranks")
            return {"ema": ema.state_dict(), "prototypes": prototypes}

        def restore(ckpt):
            ema.load_state_dict(ckpt["ema"])
            prototypes.copy_(ckpt["prototypes"])

        return train_stage("stage1", model, norm, [(optimizer, args.stage1_lr)], step, ("full", "weak", "strong"),
                           state, restore)

    # ALGO LOGIC: stages 2 and 3, self-distillation into a student on the teacher's hard labels
    def run_distill(stage):
        prev = handover(STAGES[STAGES.index(stage) - 1])
        teacher_norm = prev["normalization"]
        # the KD teacher: frozen, eval mode; with ProDA's bn_pretrain where its weights have one (--ema_bn)
        teacher = build_net(frozen_bn=True, bn_clr=has_head_bn(prev["model"])).requires_grad_(False)
        load_handover(teacher, prev)
        labels_rows, conf_rows = prepare_hard_labels(teacher, teacher_norm, log.path(stage, "pseudo"))
        teacher.eval()
        if stage == "stage3" or args.student_init == "teacher":  # the teacher's weights
            student = build_net(frozen_bn=stage in args.freeze_bn_stages, bn_clr=has_head_bn(prev["model"]))
            load_handover(student, {**prev, "source": None})
            norm = teacher_norm
        else:  # stage 2: a fresh student (paper: SimCLRv2 R101 + bn_pretrain via a PATH; default the --init weights)
            student = build_net(frozen_bn=stage in args.freeze_bn_stages, bn_clr=args.bn_clr)
            flag = "--init" if args.student_init == "init" else "--student-init"
            init = args.init if args.student_init == "init" else args.student_init
            norm = chosen_norm(load_init(student, init, args.backbone, files.get(flag)))
        optimizer = sgd(student, args.distill_lr, args.head_lr_mult)
        train_model = rt.wrap(student)

        def step(source, target):
            images, labels, _ = source
            labels = labels.to(rt.device, non_blocking=True).long()
            return distill_step(train_model, teacher, optimizer, rt, to_input(images, norm), labels,
                                to_input(target["strong"], norm), to_input(target["strong"], teacher_norm),
                                rows_of(labels_rows, target["index"]), rows_of(conf_rows, target["index"]),
                                target["geom"].to(rt.device, non_blocking=True), args)

        return train_stage(stage, student, norm, [(optimizer, args.distill_lr)], step, ("strong",))

    # ALGO LOGIC: run the stages in order; each writes <out>/<stage>/ and the last one the run's results.json
    runners = {"warmup": run_warmup, "stage1": run_stage1, "stage2": lambda: run_distill("stage2"),
               "stage3": lambda: run_distill("stage3")}
    first = stages.index(resume_ckpt["stage"]) if resume_ckpt is not None else 0
    for stage in stages[first:]:
        summary = runners[stage]()
        if rt.is_main:
            tqdm.write(f"{stage}: target val mIoU {summary['miou']:.2f}")
        resume_ckpt = None  # only the first stage run continues a checkpoint
    log.close()
    rt.close()


if __name__ == "__main__":
    guard(main)
