"""BDL: bidirectional learning of an image translator and a segmenter (source_only.py + CycleGAN, output-space
adversarial loss and self-supervised pseudo labels, in alternating stages).

Li, Yuan, Vasconcelos, "Bidirectional Learning for Domain Adaptation of Semantic Segmentation", CVPR 2019,
https://arxiv.org/abs/1904.10620, official code https://github.com/liyunsheng13/BDL (`BDL.py`, `SSL.py`,
`evaluation.py`, `cyclegan/`: the files it changed in junyanz/pytorch-CycleGAN-and-pix2pix).
Recipe: K outer rounds (paper K=2), each one
  T^k   CycleGAN source->target translator (ResNet generators with 9 blocks, 70x70 PatchGAN discriminators,
        instance norm, LSGAN with 50-image pools, cycle L1 10, identity L1 5; Adam 2e-4, betas (0.5, 0.999),
        10 epochs at constant lr then 10 of linear decay, stepped per epoch; batch 4 of 452x452 crops of frames
        resized to width 1024, flips; cyclegan/readme.md). From round 2 on, the frozen segmenter of the previous
        round adds the perceptual loss: MSE between instance-normalised stride-8 logits, 0.1 for image vs
        translation and 10 for image vs cycle reconstruction, both directions (cycle_gan_model.py:153-160).
  S^k_0 DeepLab-v2 R101 (single level) on translated source + output-space adversarial loss 0.001 (FCDisc on the
        target softmax, Adam 1e-4; adaptsegnet.py's discriminator and step); SGD 2.5e-4, poly 0.9 with horizon
        250k stopped at 80k (BDL.py, options/train_options.py, README);
  S^k_i i = 1..N (paper N=2): pseudo labels of the target train split from S^k_{i-1}: softmax of the stride-8
        logits upsampled to 1024x512, per class threshold min(median confidence of the pixels predicted as that
        class, 0.9), lower pixels ignored (SSL.py:35-62); retrain from the init on CE(translated source) +
        CE(target, pseudo) + 0.001 adversarial, 120k iterations.
Evaluation (evaluation.py:103-105): 1024x512 input, softmax upsampled bilinearly to 2048x1024 (`--eval-upsample`).
One command runs every stage in order. A stage is done when the file it writes last exists in the run folder
(checkpoints/<stage>.pt, translated/r<k>/done.json, pseudo/r<k>_s<i>/thresholds.json) and is then skipped;
running a stage deletes those of the later stages. `--stage NAME --round k --ssl-round i` runs one stage, once the
outputs it reads exist (stage_inputs); `--resume` continues the stage in progress from checkpoints/last.pt and says
so (translation and pseudo labels restart).
Released files (README; ../shared/reference/released-models.md), recognised by their content (read_weights):
GTA5_deeplab (gta_2_city_deeplab.pth) and SYNTHIA_deeplab (19-way) evaluate with `--eval-only --weights FILE`, no
other flag: raw state dicts with one `layer5` head, saved by torch 0.4.0 (no BN num_batches_tracked), i.e. by the
code before 37af0e7, whose forward sums 2 of the 4 ASPP convs; Caffe input, stride on the 1x1; the evaluation
upsamples the softmax (the default). SSL_step1 / SSL_step2 (M_0 / M_1 of round 2) and the "DeepLab-V2" init
(prefixed keys; its layer5 is dropped, as model/deeplab.py:246-254 does for 19 classes) load with `--init FILE`,
which every segmentation stage that starts afresh loads (each S^k_0, and each S^k_i with --seg-init init: the
official --init-weights). A released model labels the target instead of the stage before with `--stage pseudo
--round k --ssl-round i --weights FILE` (README: SSL.py --restore-from SSL_step1), and `--stage seg --round k
--ssl-round i --init FILE` then trains on those labels (it needs this run's translation of round k).
Reported (paper): GTA5->Cityscapes 48.5 mIoU (R101); SYNTHIA->Cityscapes 51.4 mIoU13 (R101); source only 33.6;
M_0^(1) 42.7, M_2^(1) 47.2, M_0^(2) 44.3 (maintainer, #17, #18, #30). The VGG-16 rows (41.3, 39.0) need a
network this script does not offer.

Deviations from the official code:
- Pseudo-label thresholds in constant memory: confidences quantised to 1/65535 and counted in per-class
  histograms (two passes: histogram, then labelling) instead of SSL.py's arrays of every probability (~23 GiB);
  threshold = the official order statistic sorted[round(n/2)] of the quantised values (error < 1.6e-5).
- Translation at the segmenter's source size (`--source-size`, GTA5 1280x720; the official code does not fix
  it, maintainer #11, #47). Round 1 has no perceptual loss (no segmenter yet; "similar", #37). Every round's
  CycleGAN starts from random init (cyclegan/readme.md has no --continue_train; the paper does not say).
- ASPP sums 4 branches (BDL.py since 37af0e7; `--aspp-branches 2` is the code that made the releases, and the
  releases imply it) and init is torchvision ImageNet (source_only.py defaults) instead of the DeepLab-V2 file
  (`--init FILE`); with torchvision weights layer2's stride sits on the 3x3 conv, where those weights learnt it
  (`--stride-on auto`; Caffe files, the releases and random init keep the official 1x1).
- `--iters` is each round's first segmentation stage (80k), `--ssl-iters` each later one (120k); every
  segmentation stage restarts from `--init` and its own poly schedule (README `--init-weights`) unless
  `--seg-init previous`. BDL.py:108-113 tests its stop every 100 iterations, so runs 100 past the snapshot it
  keeps; we stop at the snapshot. K=2, N=2 and the stage order follow paper Table 2 (the code runs one stage per
  command).
- CycleGAN: an epoch is one pass over the larger domain at `--cyclegan-batch`, rounded up (6,242 iterations for
  GTA5); the schedule keeps the official off-by-one (networks.py get_scheduler stepped at each epoch's end:
  the decay starts in epoch 10, the last epoch runs at lr 0); target crops come from a shuffled stream
  (official: drawn with replacement); after the width-1024 resize the height is rounded (official: truncated).
  Under torchrun the image pools stay global (all ranks' fakes, gathered in the single-process order).
- Mixed precision: on CUDA the forward and backward passes run under bf16 autocast (fp16 with a GradScaler
  where bf16 is missing) with TF32 matmuls by default; the paper trained in fp32 (`--no-amp` gives fp32).
  Losses, softmax, the perceptual loss's instance norm, pseudo-label confidences, argmax and per-class
  histograms and thresholds, and the evaluation upsampling and argmax are computed in fp32.
- Resizing: images bicubic (PIL), as the official loaders (gta5_dataset.py:37, cityscapes_dataset.py:32,
  CycleGAN's __scale_width); labels nearest.
- `--batch-size` is the global batch; under torchrun it is split over the processes (one seeded sample
  stream, rank r takes every world-th sample: 2 processes x batch 1 see what 1 process x batch 2 sees).
- `--preset quick` (toy pair, CPU, random init): 400 segmentation iterations in all (60 + 70 + 70 per round)
  chained with `--seg-init previous` on one poly schedule (`--poly-horizon none` = the chained total, so it
  follows `--iters`/`--ssl-iters`), source_only.py's quick budget; lambda_adv 0.1 (100x the paper, as
  adaptsegnet.py's quick preset: the paper's weight does not act in a few hundred iterations); a tiny CycleGAN
  (ngf 16, 3 blocks, 5 + 5 epochs of 30 iterations at lr 1e-3 on 64x64 crops: at 2e-4 and 200 iterations its
  translations were blurred grey shapes); the first 200 target train images; evaluation upsamples logits, as
  every other toy row.
Docs: README.md, section "Methods"; benchmarks/bdl.md.
"""
import contextlib
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
from PIL import Image
from tqdm import tqdm

from common.checkpoint import (load_checkpoint, load_matching, load_weights, read_weights_file, resume_path, rng_state,
                               save_checkpoint, set_rng_state)
from common.cli import UserError, guard, imply, parse_args
from common.data import (NORMALIZATION, ResizedFrames, SegDataset, TrainTransform, class_setup, domain_split,
                         eval_loader, normalize, read_image, read_label, resize_label, train_loader)
from common.metrics import evaluate_target
from common.runlog import RunLog, param_counts, save_json
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir

SCRIPT = "bdl"


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
    """init of every segmentation stage that starts afresh (each S^k_0, and each S^k_i with --seg-init init; the
    official --init-weights): imagenet (torchvision weights), none (random) or a local file, recognised by its
    content (the DeepLab-v2 init files such as BDL's "DeepLab-V2", the BDL releases, torchvision ResNets, our
    checkpoints)"""
    iters: int = 80000
    """training iterations of each round's first segmentation stage (paper: 80k)"""
    batch_size: int = 1
    """global source batch, split over torchrun processes (paper: 1)"""
    crop_size: Optional[list[int]] = None
    """random crop H [W] after resizing; none trains on whole resized frames (paper: none)"""
    lr: float = 2.5e-4
    """backbone learning rate; the heads use head_lr_mult times it (paper: 2.5e-4)"""
    seed: int = 1234
    """seed of every random choice (AdaptSegNet: 1234)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: cuda if available"""
    amp: bool = True
    """mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler)"""
    num_workers: int = 4
    """data-loading processes per training process"""
    eval_every: int = 5000
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
    """the segmenter that --eval-only evaluates, or that --stage pseudo labels the target with instead of the
    previous stage's (the stage then runs even if its labels exist): one of our checkpoints or an authors' release
    (README, released models)"""
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
    """resize source frames to H W (default: GTA5 720 1280, SYNTHIA 760 1280, Cityscapes 512 1024, else native)"""
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
    """input normalisation; auto: what the weights imply (caffe, BGR mean only, for the DeepLab-v2 Caffe files and
    the releases; imagenet for torchvision weights)"""
    aspp_branches: int = 4
    """ASPP branches summed: 4 (ADVENT, BDL since 37af0e7) or 2 (AdaptSegNet's released code and BDL's before
    37af0e7, which made its releases)"""
    stride_on: Literal["auto", "1x1", "3x3"] = "auto"
    """conv holding layer2.0's stride: 1x1 (Caffe DeepLab-v2 layout), 3x3 (torchvision); auto: where the loaded
    weights expect it (3x3 for torchvision weights, else 1x1)"""
    bn_mode: Literal["train", "eval"] = "train"
    """frozen-affine BN with batch statistics (train, official) or running statistics (eval)"""
    momentum: float = 0.9
    """SGD momentum (paper: 0.9)"""
    weight_decay: float = 5e-4
    """SGD weight decay (paper: 5e-4)"""
    head_lr_mult: float = 10.0
    """learning-rate multiplier of the classifiers (paper: 10)"""
    poly_horizon: Optional[int] = 250000
    """poly schedule horizon T in lr*(1-t/T)^power. Paper: 250k, a separate number from the iterations (it stays
    when --iters changes); none: each schedule ends with its stage, or with --seg-init previous with the last of
    the chained stages"""
    poly_power: float = 0.9
    """poly schedule power (paper: 0.9)"""

    # Algorithm specific arguments
    eval_upsample: Literal["logits", "softmax"] = "softmax"
    """what the evaluation upsamples to the label size before the argmax: softmax (official evaluation.py) or
    logits (every other script)"""
    stage: Literal["all", "cyclegan", "translate", "seg", "pseudo"] = "all"
    """all: run every stage whose output is not in the run folder yet; else only this stage of --round/--ssl-round"""
    round: int = 1
    """outer round k of --stage (1-based)"""
    ssl_round: int = 0
    """self-supervised round i of --stage seg/pseudo (0: the first segmentation stage of the round)"""
    outer_rounds: int = 2
    """K, the translator/segmenter rounds (paper: 2)"""
    ssl_rounds: int = 2
    """N, the pseudo-label rounds after each round's first segmentation stage (paper: 2)"""
    ssl_iters: int = 120000
    """training iterations of each self-supervised segmentation stage (paper: 120k)"""
    seg_init: Literal["init", "previous"] = "init"
    """init: every segmentation stage restarts from --init (paper); previous: continue the preceding stage
    on one poly schedule"""
    lambda_adv: float = 0.001
    """weight of the output-space adversarial loss on the target (paper: 0.001)"""
    lr_d: float = 1e-4
    """Adam learning rate of the output-space discriminator, same poly decay as the segmenter (paper: 1e-4)"""
    pseudo_max_threshold: float = 0.9
    """cap of the per-class median confidence threshold of the pseudo labels (paper: 0.9)"""
    source_limit: Optional[int] = None
    """use only the first N source train images (paper: all)"""
    target_limit: Optional[int] = None
    """use only the first N target train images, adversarial and pseudo-label stages (paper: all 2,975)"""
    cyclegan_epochs: int = 10
    """CycleGAN epochs at the initial learning rate (paper: --niter 10)"""
    cyclegan_decay_epochs: int = 10
    """CycleGAN epochs of linear decay, stepped once per epoch (paper: --niter_decay 10)"""
    cyclegan_epoch_iters: Optional[int] = None
    """iterations per CycleGAN epoch; none: one pass over the larger domain's train split at --cyclegan-batch,
    rounded up (official; GTA5: 6,242)"""
    cyclegan_batch: int = 4
    """CycleGAN global batch of source and of target crops (paper: 4)"""
    cyclegan_lr: float = 2e-4
    """CycleGAN Adam learning rate, betas (0.5, 0.999) (CycleGAN default: 2e-4)"""
    cyclegan_load_width: int = 1024
    """CycleGAN training frames are resized to this width, aspect kept (paper: 1024)"""
    cyclegan_crop: list[int] = field(default_factory=lambda: [452, 452])
    """CycleGAN random crop H W after resizing, plus random flips (paper: 452 452)"""
    ngf: int = 64
    """generator width (CycleGAN default: 64)"""
    ndf: int = 64
    """PatchGAN discriminator width (CycleGAN default: 64)"""
    gen_blocks: int = 9
    """residual blocks of the ResNet generator (paper: 9)"""
    pool_size: int = 50
    """fake-image pool of each CycleGAN discriminator (CycleGAN default: 50)"""
    lambda_cycle: float = 10.0
    """cycle-consistency L1 weight (paper: 10)"""
    lambda_identity: float = 5.0
    """identity L1 weight (paper: 5 = 0.5 x cycle 10; maintainer #17: "very important")"""
    lambda_perceptual: float = 0.1
    """perceptual loss weight between an image and its translation, from round 2 (paper: 0.1)"""
    lambda_perceptual_rec: float = 10.0
    """perceptual loss weight between an image and its cycle reconstruction, from round 2 (paper: 10)"""

    # to be filled in runtime
    world_size: int = field(default=0, metadata={"runtime": True})
    rank: int = field(default=0, metadata={"runtime": True})


PRESETS = {
    "paper": {},
    "quick": dict(source="toy-synth", target="toy-real", backbone="resnet18", init="none", iters=60, batch_size=4,
                  lr=0.0025, eval_every=0, checkpoint_every=100, num_workers=1, log_every=10, poly_horizon=None,
                  seed=0, source_size=[96, 192], target_size=[96, 192],
                  # method-specific: 60 + 70 + 70 seg iterations per round x 2 rounds = source_only's 400, chained
                  ssl_iters=70, seg_init="previous", lambda_adv=0.1, target_limit=200, eval_upsample="logits",
                  cyclegan_epochs=5, cyclegan_decay_epochs=5, cyclegan_epoch_iters=30, cyclegan_batch=2,
                  cyclegan_lr=1e-3, cyclegan_load_width=192, cyclegan_crop=[64, 64], ngf=16, ndf=8, gen_blocks=3),
}


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


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: output-space discriminator and adversarial losses
class FCDiscriminator(nn.Module):
    """Fully convolutional discriminator on a C-channel map (AdaptSegNet model/discriminator.py).

    Five 4x4 convs with stride 2 and padding 1, channels num_classes -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1,
    LeakyReLU(0.2) after the first four, no normalisation and no sigmoid: domain logits at 1/32 of the input
    size. Parameter names follow the official file, so its snapshots load.
    """

    def __init__(self, num_classes, ndf=64):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, ndf, 4, 2, 1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, 2, 1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1)
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, 2, 1)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.leaky_relu(conv(x), 0.2)
        return self.classifier(x)


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


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: CycleGAN translator (junyanz/pytorch-CycleGAN-and-pix2pix networks.py, as used by BDL)
class ResnetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
                                   nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, two stride-2 downsamplings, `blocks` residual blocks at 4ngf, two transposed-conv upsamplings,
    c7s1-3 + tanh; instance norm without affine, reflection padding, no dropout. Images in [-1, 1]."""

    def __init__(self, ngf=64, blocks=9):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 1), nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, 2, 1, output_padding=1),
                       nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        gan_init(self)

    def forward(self, x):
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (3 layers): 4x4 convs ndf..8ndf, instance norm, LeakyReLU 0.2, one logit per patch."""

    def __init__(self, ndf=64):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for n, stride in ((1, 2), (2, 2), (3, 1)):
            cin, cout = ndf * min(2 ** (n - 1), 8), ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(cin, cout, 4, stride, 1), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * 8, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        gan_init(self)

    def forward(self, x):
        return self.net(x)


def gan_init(module):
    for m in module.modules():  # CycleGAN's init_type normal, gain 0.02
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


class Translators(nn.Module):
    """Both generators behind one forward, so DDP sees a single module per step: to_target (the paper's G,
    source -> target) and to_source (F, target -> source)."""

    def __init__(self, ngf=64, blocks=9):
        super().__init__()
        self.to_target, self.to_source = ResnetGenerator(ngf, blocks), ResnetGenerator(ngf, blocks)

    def forward(self, real_s, real_t):
        fake_t, fake_s = self.to_target(real_s), self.to_source(real_t)
        return {"fake_t": fake_t, "rec_s": self.to_source(fake_t), "fake_s": fake_s, "rec_t": self.to_target(fake_s),
                "idt_t": self.to_target(real_t), "idt_s": self.to_source(real_s)}


class ImagePool:
    """CycleGAN's history of generated images: until full, store and return each new image; then with
    probability 1/2 return a stored one and store the new one in its place. Draws from the global torch RNG."""

    def __init__(self, size, device):
        self.size, self.device, self.images = size, device, []

    def query(self, images):
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(1).item() < 0.5:
                k = int(torch.randint(len(self.images), (1,)))
                out.append(self.images[k].clone())
                self.images[k] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self):
        return {"images": torch.stack(self.images).cpu() if self.images else torch.empty(0)}

    def load_state_dict(self, state):
        self.images = [t.to(self.device) for t in state["images"]]


def pooled(pool, fakes, rt):
    """The pool's answer for this rank's fakes. Under torchrun the pool stays global, as in CycleGAN's single
    process: every rank queries its copy with all ranks' fakes in the single-process batch order (rank r holds
    samples r, r + world, ...) and keeps its own share; the copies stay identical because every rank draws the
    same random numbers (same seed, same calls)."""
    if not rt.distributed:
        return pool.query(fakes)
    parts = [torch.empty_like(fakes) for _ in range(rt.world)]
    dist.all_gather(parts, fakes.detach().contiguous())  # on rt.device: NCCL needs device tensors
    return pool.query(torch.stack(parts, 1).flatten(0, 1))[rt.rank::rt.world]


def lsgan_loss(logits, real: bool):
    """LSGAN: mean squared distance of the patch logits to 1 (real) or 0 (fake), in fp32."""
    logits = logits.float()
    return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))


def gan_to_seg_input(images, norm):
    """[-1, 1] RGB generator images -> the segmenter's input normalisation (differentiable)."""
    mean, std, bgr = NORMALIZATION[norm]
    x = (images.float() + 1) / 2
    x = x.flip(1) if bgr else x
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def perceptual_loss(logits_a, logits_b):
    """BDL's semantic loss: MSE between instance-normalised (no affine) segmenter logits of two images."""
    return F.mse_loss(F.instance_norm(logits_a.float()), F.instance_norm(logits_b.float()))


def translator_losses(out, real_s, real_t, discs, segmenter, norm):
    """Generator-side CycleGAN terms (unweighted) from the Translators output. `discs` are the frozen, unwrapped
    discriminators; `segmenter` the frozen segmenter of the previous round or None (no perceptual terms)."""
    gan = lsgan_loss(discs["target"](out["fake_t"]), True) + lsgan_loss(discs["source"](out["fake_s"]), True)
    losses = {"gan_g": gan,
              "cycle": F.l1_loss(out["rec_s"].float(), real_s) + F.l1_loss(out["rec_t"].float(), real_t),
              "idt": F.l1_loss(out["idt_t"].float(), real_t) + F.l1_loss(out["idt_s"].float(), real_s)}
    if segmenter is not None:
        images = {"real_s": real_s, "real_t": real_t, **{k: out[k] for k in ("fake_t", "fake_s", "rec_s", "rec_t")}}
        f = {k: segmenter(gan_to_seg_input(v, norm))[1] for k, v in images.items()}
        losses["sem"] = perceptual_loss(f["fake_t"], f["real_s"]) + perceptual_loss(f["fake_s"], f["real_t"])
        losses["sem_rec"] = perceptual_loss(f["rec_s"], f["real_s"]) + perceptual_loss(f["rec_t"], f["real_t"])
    return losses


def translator_discriminator_loss(disc, real, fake_pooled):
    """1/2 (LSGAN(D(real), 1) + LSGAN(D(fake), 0)) on a detached fake from the pool (trains D only)."""
    return 0.5 * (lsgan_loss(disc(real), True) + lsgan_loss(disc(fake_pooled.detach()), False))


def cyclegan_lr_factor(epoch, constant_epochs, decay_epochs):
    """CycleGAN's 'lambda' policy (networks.py get_scheduler) stepped at the end of each epoch, so epoch e
    (0-based) trains at 1 - max(0, e + 2 - niter) / (niter_decay + 1): niter 10, niter_decay 10 give 9 epochs
    at 1, then 10/11 ... 1/11, and the last epoch at 0 (the official off-by-one, kept)."""
    return 1.0 - max(0, epoch + 2 - constant_epochs) / (decay_epochs + 1)


@torch.no_grad()
def translate(generator, images):
    """Translate [-1, 1] images of any size (reflect-padded to a multiple of 4 for the generator's strides)."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (0, (-w) % 4, 0, (-h) % 4), mode="reflect") if (h % 4 or w % 4) else images
    return generator(padded)[..., :h, :w]


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: pseudo labels with per-class thresholds min(median, 0.9), in constant memory (SSL.py)
CONF_LEVELS = 65535  # confidences quantised to k/65535 for the histograms: median error < 1/65535


def confidence_map(probs):
    """(argmax class, confidence quantised to 0..CONF_LEVELS) per pixel of fp32 probabilities (B, C, H, W)."""
    conf, label = probs.max(1)
    return label, (conf * CONF_LEVELS).floor().long().clamp_(0, CONF_LEVELS)


def add_histograms(hist, label, conf_q):
    """hist (C, CONF_LEVELS + 1) int64 += per-class counts of each quantised confidence (no host sync)."""
    index = (label.long() * (CONF_LEVELS + 1) + conf_q).flatten()
    hist.view(-1).index_add_(0, index, torch.ones_like(index))
    return hist


def median_thresholds(hist, cap=0.9):
    """Per class the official order statistic sorted(conf)[round(n/2)] (numpy round: half to even), read off
    the cumulative histogram, capped at `cap`; 0 for a class never predicted. Quantised (int64, (C,))."""
    counts = hist.sum(1)
    rank = torch.minimum(torch.round(counts.double() * 0.5).long(), (counts - 1).clamp(min=0))
    first_above = (hist.cumsum(1) <= rank[:, None]).sum(1)  # first level whose cumulative count exceeds rank
    return torch.where(counts > 0, first_above.clamp(max=round(cap * CONF_LEVELS)), torch.zeros_like(counts))


def apply_thresholds(label, conf_q, thresholds_q):
    """Pixels less confident than their class threshold become 255 (ignored); uint8 labels."""
    return torch.where(conf_q >= thresholds_q.to(label.device)[label], label, 255).to(torch.uint8)


@torch.no_grad()
def generate_pseudo_labels(predict, split, size, out_dir, rt, num_classes, cap=0.9, num_workers=0):
    """Two passes over the target train split, each holding one image's probabilities at a time: per-class
    confidence histograms (all-reduced over ranks) give the thresholds, then each rank writes the PNGs of its
    share. `predict(uint8 images) -> logits` (it may run under autocast; everything after it is fp32).
    Returns the thresholds (floats)."""
    dataset = SegDataset(split, eval_size=size, with_label=False)
    hist = torch.zeros(num_classes, CONF_LEVELS + 1, dtype=torch.int64, device=rt.device)
    thresholds_q = None
    for labelling in (False, True):
        loader = eval_loader(dataset, rt.rank, rt.world, num_workers)
        for image, _, index in tqdm(loader, desc="pseudo labels" + (" (write)" if labelling else ""),
                                    disable=not rt.is_main, dynamic_ncols=True):
            # SSL.py:36-37: softmax of the stride-8 logits, then the probabilities upsampled (fp32)
            probs = F.interpolate(predict(image.to(rt.device)).float().softmax(1), size=image.shape[-2:],
                                  mode="bilinear", align_corners=True)
            label, conf_q = confidence_map(probs)
            if not labelling:
                add_histograms(hist, label, conf_q)
                continue
            pseudo = apply_thresholds(label[0], conf_q[0], thresholds_q).cpu().numpy()
            Image.fromarray(pseudo).save(os.path.join(out_dir, split.item_name(int(index[0])) + ".png"))
        if not labelling:
            thresholds_q = median_thresholds(rt.all_reduce(hist), cap)  # hist lives on rt.device (NCCL)
    rt.barrier()
    return (thresholds_q.double() / CONF_LEVELS).tolist()


class CachedDataset(torch.utils.data.Dataset):
    """Training items (image uint8 3xHxW, label uint8 HxW or empty, index) of `split`: the image from a folder of
    translated PNGs (already at the training size) or else the split's frames (ResizedFrames: a prepared copy when
    one matches, README "Fast data loading"), the label from a folder of pseudo-label PNGs (item name + .png) or
    the split's own labels (split_labels)."""

    def __init__(self, split, transform, image_dir=None, label_dir=None, split_labels=False):
        self.split, self.transform, self.image_dir, self.label_dir = split, transform, image_dir, label_dir
        self.split_labels = split_labels
        self.frames = None if image_dir else ResizedFrames(split, transform.size, transform.keep_ratio,
                                                           transform.interpolation, with_label=False)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        index, seed = key
        name = self.split.item_name(index) + ".png"
        image = read_image(os.path.join(self.image_dir, name)) if self.image_dir else self.frames(index)[0]
        label = (read_label(os.path.join(self.label_dir, name)) if self.label_dir
                 else self.split.load_label(index) if self.split_labels else None)
        if label is not None and label.shape != image.shape[:2]:  # the image is already at the training size
            label = resize_label(label, image.shape[:2])
        image, label = self.transform(image, label, np.random.default_rng(seed))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label = torch.from_numpy(np.array(label)) if label is not None else torch.empty(0, dtype=torch.uint8)
        return image, label, index


@dataclass
class Stage:
    kind: str  # cyclegan, translate, seg, pseudo
    round: int
    ssl_round: int = 0
    length: int = 0  # training iterations of a seg stage
    index: int = 0  # position in the plan (seeds the stage)

    @property
    def name(self):
        return f"{self.kind}_r{self.round}" + (f"_s{self.ssl_round}" if self.kind in ("seg", "pseudo") else "")

    @property
    def output(self):
        """The file the finished stage writes last, in the run folder: the stage is done when it exists."""
        folder = self.name.split("_", 1)[1]
        return {"translate": f"translated/{folder}/done.json",
                "pseudo": f"pseudo/{folder}/thresholds.json"}.get(self.kind, f"checkpoints/{self.name}.pt")


def stage_plan(args):
    """The bidirectional loop: per round T (cyclegan), translate, S_0, then N x (pseudo labels, S_i)."""
    plan = []
    for k in range(1, args.outer_rounds + 1):
        plan += [Stage("cyclegan", k), Stage("translate", k), Stage("seg", k, 0, args.iters)]
        for i in range(1, args.ssl_rounds + 1):
            plan += [Stage("pseudo", k, i), Stage("seg", k, i, args.ssl_iters)]
    for n, st in enumerate(plan):
        st.index = n
    return plan


def stage_inputs(st, args) -> list:
    """The stages whose outputs `st` reads: T^k the previous round's last segmenter (perceptual loss), the
    translation T^k, S^k_0 the translated source, S^k_i also the pseudo labels of round i, a pseudo-label stage
    the segmenter before it (none with --weights); with --seg-init previous a segmentation stage also the one before."""
    k, i, last = st.round, st.ssl_round, args.ssl_rounds
    if st.kind == "cyclegan":
        return [f"seg_r{k - 1}_s{last}"] if k > 1 else []
    if st.kind == "translate":
        return [f"cyclegan_r{k}"]
    if st.kind == "pseudo":
        return [] if args.weights else [f"seg_r{k}_s{i - 1}"]
    before = f"seg_r{k}_s{i - 1}" if i else f"seg_r{k - 1}_s{last}" if k > 1 else None
    chained = [before] if args.seg_init == "previous" and before else []
    return [f"translate_r{k}"] + ([f"pseudo_r{k}_s{i}"] if i else []) + chained


def read_segmenter(path, flag) -> dict:
    """read_weights for a file a segmenter is taken from as it is (--weights): a bdl checkpoint holds one only when
    a segmentation stage wrote it. The file is read twice (read_weights takes a path), the first time for this
    one-line error."""
    state = read_weights_file(path, flag)
    if isinstance(state, dict) and state.get("script") == SCRIPT and "model" not in state:
        raise UserError(f"{flag} {path} holds no segmenter (bdl checkpoint of stage {state.get('stage')}): pass a "
                        f"segmentation stage's checkpoints/seg_r<k>_s<i>.pt or a released model")
    return read_weights(path, flag, SCRIPT)


def prepare_files(args, num_classes) -> Optional[dict]:
    """prepare_weights for the stage pipeline: read the file this command takes a segmenter from (--weights for
    --eval-only or --stage pseudo, else a --init file, which every segmentation stage that starts afresh loads),
    apply the flags it implies (typed flags win), resolve --stride-on auto, print one line on what was
    recognised. --resume reads nothing here: the stage in progress continues from last.pt with the command's
    flags, and the later segmentation stages still start from --init."""
    found = None
    if args.weights and not (args.eval_only or args.stage == "pseudo"):
        raise UserError("--weights is read by --eval-only and --stage pseudo; to start the segmentation stages from "
                        "a file use --init PATH")
    if args.eval_only and len(args.weights) != 1:
        raise UserError("--eval-only needs exactly one --weights PATH")
    if args.weights:
        if len(args.weights) != 1:
            raise UserError("--stage pseudo takes one --weights PATH (the segmenter that labels the target)")
        found = read_segmenter(args.weights[0], "--weights")
    elif args.init not in ("imagenet", "none"):
        found = read_weights(args.init)
    if found is not None and found.get("num_classes") not in (None, num_classes):
        raise UserError(f"{args.weights[0] if args.weights else args.init} has {found['num_classes']} classes, this "
                        f"run has {num_classes}")
    if found is not None:
        found["applied"] = imply(args, found["implied"], found["kind"])
        quirks = {"aspp_branches": "{} ASPP branches", "stride_on": "stride on {}", "normalization": "{} input"}
        said = ", ".join(quirks[k].format(v) for k, v in found["applied"].items() if k in quirks)
        print(f"recognised {found['kind']}" + (f": {said}" if said else ""), flush=True)
    if args.stride_on == "auto":
        args.stride_on = "3x3" if args.init == "imagenet" else "1x1"
    return found


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: one iteration of each training stage (main()'s stages call them; tests/test_bdl.py checks each against
# an independently written reference step)
def cyclegan_step(translators, discs, train_discs, optimizer_g, optimizer_d, pools, rt, real_s, real_t, segmenter,
                  norm, weights):
    """T^k (cycle_gan_model.py optimize_parameters) on [-1, 1] batches. The generators: LSGAN through the frozen,
    unwrapped discriminators + weights["cycle"] cycle L1 + weights["idt"] identity L1, from round 2 + weights["sem"]
    and weights["sem_rec"] perceptual terms through `segmenter` (frozen here: eval-mode BN, no gradient into it;
    None in round 1). Then each discriminator: real vs a detached fake from its image pool, through train_discs
    (DDP-wrapped under torchrun). Both Adams step (D's inputs are detached, so this equals CycleGAN's G step
    followed by D's). `translators` may be DDP-wrapped. Returns the unweighted losses."""
    optimizer_g.zero_grad(set_to_none=True)
    optimizer_d.zero_grad(set_to_none=True)
    if segmenter is not None:  # cyclegan/networks.py semantic(): eval mode, requires_grad False
        set_requires_grad([segmenter], False)
        segmenter.eval()
    with rt.autocast():
        out = translators(real_s, real_t)
    set_requires_grad(discs.values(), False)
    with rt.autocast():
        losses = translator_losses(out, real_s, real_t, discs, segmenter, norm)
    loss = losses["gan_g"]
    for name in ("cycle", "idt", "sem", "sem_rec"):  # sem, sem_rec: only with a segmenter
        if name in losses:
            loss = loss + weights[name] * losses[name]
    rt.scaler.scale(loss).backward()
    set_requires_grad(discs.values(), True)
    with rt.autocast():
        losses["d_cyc"] = (translator_discriminator_loss(train_discs["target"], real_t,
                                                         pooled(pools["target"], out["fake_t"], rt))
                           + translator_discriminator_loss(train_discs["source"], real_s,
                                                           pooled(pools["source"], out["fake_s"], rt)))
    rt.scaler.scale(losses["d_cyc"]).backward()
    rt.scaler.step(optimizer_g)
    rt.scaler.step(optimizer_d)
    rt.scaler.update()
    return losses


def segmenter_step(model, disc, train_disc, optimizer, d_optimizer, rt, images, labels, target_images, pseudo_labels,
                   lambda_adv):
    """S^k_i (BDL.py) on normalised batches: CE on the translated source (under DDP without an all-reduce: the
    target backward all-reduces the accumulated sum, style.md 8.1); on the target lambda_adv * BCE(D(softmax),
    source) through the frozen, unwrapped D, plus CE on the pseudo labels in the self-supervised rounds
    (pseudo_labels None in round 0); D on the detached softmax maps (source 0, target 1) through train_disc
    (DDP-wrapped under torchrun); then both optimisers step. Returns the losses."""
    optimizer.zero_grad(set_to_none=True)
    d_optimizer.zero_grad(set_to_none=True)
    with getattr(model, "no_sync", contextlib.nullcontext)():
        with rt.autocast():
            _, main = model(images)
        losses = {"seg_src": seg_loss(main, labels)}
        rt.scaler.scale(losses["seg_src"]).backward()
    source_map = softmax_at(main.detach(), images.shape[-2:])
    with rt.autocast():
        _, target_main = model(target_images)
    target_map = softmax_at(target_main, target_images.shape[-2:])
    set_requires_grad([disc], False)  # the segmenter's term trains the segmenter only
    with rt.autocast():
        losses["adv_main"] = generator_loss(disc, target_map)
    loss = lambda_adv * losses["adv_main"]
    if pseudo_labels is not None:
        losses["seg_pseudo"] = seg_loss(target_main, pseudo_labels)
        loss = loss + losses["seg_pseudo"]
    rt.scaler.scale(loss).backward()
    set_requires_grad([disc], True)
    with rt.autocast():
        losses["d_main"] = discriminator_loss(train_disc, source_map, target_map)
    rt.scaler.scale(losses["d_main"]).backward()
    rt.scaler.step(optimizer)
    rt.scaler.step(d_optimizer)
    rt.scaler.update()
    return losses


# ----------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args, PRESETS, description=__doc__)
    horizon_to_end = args.poly_horizon is None  # resolved with the stage plan (the setup block would take --iters)
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

    # ALGO LOGIC: the stage plan, or the one --stage
    if args.cyclegan_batch % rt.world:
        raise UserError(f"--cyclegan-batch {args.cyclegan_batch} must divide by {rt.world} processes")
    if (args.outer_rounds < 1 or args.ssl_rounds < 0 or args.cyclegan_epochs + args.cyclegan_decay_epochs < 1
            or min(args.iters, args.ssl_iters, args.cyclegan_epoch_iters or 1) < 1):
        raise UserError("--outer-rounds, every stage's iterations and the CycleGAN epochs must be >= 1, "
                        "--ssl-rounds >= 0")
    idle = ({"lambda_perceptual", "lambda_perceptual_rec"} if args.outer_rounds == 1 else set()) | (
        {"ssl_iters", "pseudo_max_threshold"} if args.ssl_rounds == 0 else set())  # no stage would read them
    if idle & args.given and not args.eval_only:
        raise UserError(f"{' '.join('--' + n.replace('_', '-') for n in sorted(idle & args.given))}: no effect with "
                        f"--outer-rounds {args.outer_rounds} --ssl-rounds {args.ssl_rounds}")
    plan = stage_plan(args)
    if horizon_to_end:  # one schedule over the chained stages, else each stage's own (run_seg)
        args.poly_horizon = sum(st.length for st in plan if st.kind == "seg") if args.seg_init == "previous" else None
    if args.stage == "all":
        if {"round", "ssl_round"} & args.given:
            raise UserError("--round and --ssl-round pick the stage of --stage; --stage all runs every stage")
        todo = plan
    else:
        todo = [st for st in plan if (st.kind, st.round, st.ssl_round) == (args.stage, args.round, args.ssl_round)]
        if not todo:
            raise UserError(f"--stage {args.stage} --round {args.round} --ssl-round {args.ssl_round} is not in the "
                            f"plan of {args.outer_rounds} rounds x {args.ssl_rounds} pseudo-label rounds")

    # ALGO LOGIC: networks (each stage builds its own; these give --dry-run's parameter counts, the --init check
    # before the first stage, and the --weights segmenter)
    found = prepare_files(args, num_classes)  # the --weights or --init file and what it implies
    channels_last = torch.channels_last if rt.channels_last else torch.preserve_format

    def new_segmenter():
        return DeepLabV2(args.backbone, num_classes, False, args.aspp_branches, args.bn_mode, args.stride_on)

    model = new_segmenter()
    norm = load_init(model, args.init, args.backbone, found) if not (ckpt_path or args.weights or args.dry_run) \
        else None
    model.to(rt.device, memory_format=channels_last)
    translators = Translators(args.ngf, args.gen_blocks)
    networks = {"model": model, "disc_main": FCDiscriminator(num_classes), "to_target": translators.to_target,
                "to_source": translators.to_source, "disc_target": PatchDiscriminator(args.ndf),
                "disc_source": PatchDiscriminator(args.ndf)}

    # TRY NOT TO MODIFY: run folder, dry run, resume
    norm = args.normalization if args.normalization != "auto" else norm
    loaded = {"file": args.weights[0] if args.weights else args.init, "kind": found["kind"],
              "implied": found["applied"]} if found is not None else None
    log = RunLog(out_dir, rt.is_main)
    log.write_config(SCRIPT, args, param_counts(**networks), normalization=norm, num_classes=num_classes,
                     loaded=loaded)
    if args.dry_run:
        print(f"dry run: config written to {log.path('config.json')}")
        return
    start_iter, resume_ckpt = 0, None
    if args.weights:  # every tensor of the network from the file; nothing left over but unsummed ASPP convs
        load_matching(model, found["state"], f"--weights {args.weights[0]} ({found['kind']})", required=lambda k: True,
                      unused_ok=lambda k: ".convs.2." in k or ".convs.3." in k)
        start_iter = found["iter"]
    elif ckpt_path:  # the stage in progress continues from it when the stage loop reaches it (restore())
        resume_ckpt = load_checkpoint(ckpt_path, SCRIPT, num_classes)
        norm = resume_ckpt["normalization"]

    def to_input(images):
        x = normalize(images.to(rt.device, non_blocking=True), norm)
        return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x

    # TRY NOT TO MODIFY: evaluation
    target_val = domain_split(args.target, "val", args.data_root)
    eval_size = args.eval_size or args.target_size or target_val.paper_size

    def evaluate_model(net, final=False):
        def predict(x):  # the evaluator upsamples what this returns, then takes the argmax
            logits = net(to_input(x))[1]
            return logits.float().softmax(1) if args.eval_upsample == "softmax" else logits

        rt.share_buffers(net)  # rank 0's BN statistics on every rank: the network its checkpoint holds
        net.eval()
        with torch.no_grad(), rt.autocast():
            summary = evaluate_target(predict, target_val, rt, align_corners=True, log=log,
                                      num_predictions=args.num_predictions if final else 0, limit=args.eval_limit,
                                      eval_size=eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19,
                                      save_dir=args.save_predictions if final else None, num_workers=args.num_workers)
        net.train()
        return summary

    if args.eval_only:
        summary = evaluate_model(model, final=True)
        log.write_results(summary, start_iter, weights=args.weights, loaded=loaded)
        print(f"target val mIoU {summary['miou']:.2f} ({log.path('results.json')})")
        return

    # ALGO LOGIC: data, stage outputs, the stage checkpoint
    def first(split, n):
        return split if n is None else dataclasses.replace(split, images=split.images[:n], labels=split.labels[:n])

    source_train = first(domain_split(args.source, "train", args.data_root, synthia_classes=args.synthia_classes),
                         args.source_limit)
    target_train = first(domain_split(args.target, "train", args.data_root, labelled=False), args.target_limit)
    source_size = args.source_size or source_train.paper_size
    target_size = args.target_size or target_train.paper_size
    per_rank_batch = args.batch_size // rt.world
    pin = rt.device.type == "cuda"
    output = {st.name: log.path(st.output) for st in plan}

    def segmenter_from(name):
        net = new_segmenter()
        load_weights(net, load_checkpoint(output[name], SCRIPT, num_classes)["model"])
        return net.to(rt.device, memory_format=channels_last)

    def save(st, it, path=log.path("checkpoints", "last.pt"), **state):
        """A stage's output (path), or last.pt: everything --resume needs to continue `st` exactly."""
        if rt.is_main:
            save_checkpoint(path, {"script": SCRIPT, "num_classes": num_classes, "normalization": norm,
                                   "stage": st.name, "iter": it, "args": dataclasses.asdict(args), **state})

    def restore(st, parts):
        """The iteration to start `st` at: where --resume's checkpoint left it (states loaded), else 0."""
        if resume_ckpt is None or resume_ckpt["stage"] != st.name:
            return 0
        for k, v in parts.items():
            if isinstance(v, nn.Module):
                load_matching(v, resume_ckpt[k], f"--resume {ckpt_path} ({k})", required=lambda name: True,
                              unused_ok=lambda name: False, quiet=True)
            else:
                v.load_state_dict(resume_ckpt[k])
        set_rng_state(resume_ckpt["rng"])
        return resume_ckpt["iter"]

    def folder_of(name):
        os.makedirs(os.path.dirname(output[name]), exist_ok=True)
        return os.path.dirname(output[name])

    # ALGO LOGIC: T^k, the CycleGAN translator (perceptual loss from the previous round's last segmenter)
    def run_cyclegan(st):
        seed_everything(args.seed + 1000 * st.index, args.torch_deterministic)
        translators = Translators(args.ngf, args.gen_blocks).to(rt.device)
        discs = nn.ModuleDict({"target": PatchDiscriminator(args.ndf), "source": PatchDiscriminator(args.ndf)})
        discs.to(rt.device)
        adam = dict(lr=args.cyclegan_lr, betas=(0.5, 0.999))  # CycleGAN --beta1 0.5
        optimizer_g = torch.optim.Adam([{"params": translators.parameters(), "lr_mult": 1.0}], **adam)
        optimizer_d = torch.optim.Adam([{"params": discs.parameters(), "lr_mult": 1.0}], **adam)
        pools = {"target": ImagePool(args.pool_size, rt.device), "source": ImagePool(args.pool_size, rt.device)}
        # from round 2: the previous round's last segmenter (cyclegan_step freezes it), for the perceptual terms
        segmenter = segmenter_from(f"seg_r{st.round - 1}_s{args.ssl_rounds}") if st.round > 1 else None
        weights = {"cycle": args.lambda_cycle, "idt": args.lambda_identity, "sem": args.lambda_perceptual,
                   "sem_rec": args.lambda_perceptual_rec}
        parts = dict(translators=translators, discs=discs, optimizer_g=optimizer_g, optimizer_d=optimizer_d,
                     scaler=rt.scaler, pool_target=pools["target"], pool_source=pools["source"])
        start = restore(st, parts)
        epoch_iters = args.cyclegan_epoch_iters or math.ceil(max(len(source_train), len(target_train))
                                                             / args.cyclegan_batch)
        length = (args.cyclegan_epochs + args.cyclegan_decay_epochs) * epoch_iters
        transform = TrainTransform(size=(args.cyclegan_load_width,) * 2, keep_ratio=True, crop=args.cyclegan_crop,
                                   flip=True)
        batch, seed = args.cyclegan_batch // rt.world, args.seed + 1000 * st.index
        source_batches = train_loader(SegDataset(source_train, transform, with_label=False), batch, seed, start,
                                      rt.rank, rt.world, num_workers=args.num_workers, pin_memory=pin)
        target_batches = train_loader(SegDataset(target_train, transform, with_label=False), batch, seed + 500, start,
                                      rt.rank, rt.world, num_workers=args.num_workers, pin_memory=pin)
        train_translators = rt.wrap(translators)
        train_discs = {k: rt.wrap(d) for k, d in discs.items()}

        running = {}
        log.start_loop(start)
        progress = tqdm(range(start, length), initial=start, total=length, disable=not rt.is_main,
                        desc=f"{SCRIPT} {st.name}", dynamic_ncols=True)
        for it in progress:
            lr = args.cyclegan_lr * cyclegan_lr_factor(it // epoch_iters, args.cyclegan_epochs,
                                                       args.cyclegan_decay_epochs)
            set_lr(optimizer_g, lr)
            set_lr(optimizer_d, lr)
            real_s = normalize(next(source_batches)[0].to(rt.device, non_blocking=True), "gan")
            real_t = normalize(next(target_batches)[0].to(rt.device, non_blocking=True), "gan")
            losses = cyclegan_step(train_translators, discs, train_discs, optimizer_g, optimizer_d, pools, rt, real_s,
                                   real_t, segmenter, norm, weights)

            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach()
            done = it + 1
            if done % args.log_every == 0 or done % args.checkpoint_every == 0 or done == length:
                scalars = log.check_and_log(done, running, lr, args.cyclegan_batch, progress, round=st.round,
                                            write=done % args.log_every == 0 or done == length)
                running = {} if scalars is not None else running
            if done % args.checkpoint_every == 0 or done == length:
                save(st, done, rng=rng_state(), **{k: v.state_dict() for k, v in parts.items()})
        save(st, length, output[st.name], to_target=translators.to_target.state_dict(),
             to_source=translators.to_source.state_dict())

    # ALGO LOGIC: translate every source train image with T^k, at the segmenter's source size
    def run_translate(st):
        to_target = ResnetGenerator(args.ngf, args.gen_blocks)
        load_weights(to_target, load_checkpoint(output[f"cyclegan_r{st.round}"], SCRIPT, num_classes)["to_target"])
        to_target.to(rt.device).eval()
        folder = folder_of(st.name)
        dataset = SegDataset(source_train, eval_size=source_size, with_label=False)
        for image, _, index in tqdm(eval_loader(dataset, rt.rank, rt.world, args.num_workers), disable=not rt.is_main,
                                    desc=f"{SCRIPT} {st.name}", dynamic_ncols=True):
            with rt.autocast():
                fake = translate(to_target, normalize(image.to(rt.device), "gan"))
            pixels = ((fake[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
            name = source_train.item_name(int(index[0])) + ".png"
            Image.fromarray(pixels.cpu().numpy()).save(os.path.join(folder, name))
        rt.barrier()
        if rt.is_main:
            save_json(output[st.name], {"images": len(source_train)})

    # ALGO LOGIC: pseudo labels of the target train split from the previous segmentation stage
    def run_pseudo(st):  # from --weights' segmenter with --stage pseudo --weights FILE
        net = (model if args.weights else segmenter_from(f"seg_r{st.round}_s{st.ssl_round - 1}")).eval()
        folder = folder_of(st.name)

        def predict(images):
            with rt.autocast():
                return net(to_input(images))[1]

        thresholds = generate_pseudo_labels(predict, target_train, target_size, folder, rt, num_classes,
                                            args.pseudo_max_threshold, args.num_workers)
        if rt.is_main:
            save_json(output[st.name], dict(zip(classes, thresholds)))

    # ALGO LOGIC: S^k_i, the segmenter on translated source + adversarial (+ pseudo-labelled target if i > 0)
    def run_seg(st):
        seed_everything(args.seed + 1000 * st.index, args.torch_deterministic)
        earlier = [p for p in plan[:st.index] if p.kind == "seg"]
        chained = args.seg_init == "previous"
        if chained and earlier:
            net = segmenter_from(earlier[-1].name)
        else:
            net = new_segmenter()
            load_init(net, args.init, args.backbone, found)
            net.to(rt.device, memory_format=channels_last)
        optimizer = torch.optim.SGD(net.param_groups(args.lr, args.head_lr_mult), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        disc = FCDiscriminator(num_classes).to(rt.device, memory_format=channels_last)
        d_optimizer = torch.optim.Adam([{"params": disc.parameters(), "lr_mult": 1.0}], lr=args.lr_d, betas=(0.9, 0.99))
        parts = dict(model=net, optimizer=optimizer, disc_main=disc, optimizer_d_main=d_optimizer, scaler=rt.scaler)
        start = restore(st, parts)
        # the sample streams continue over the stages; chained stages also continue one poly schedule
        offset = sum(p.length for p in earlier)
        lr_offset, horizon = (offset if chained else 0), args.poly_horizon or st.length
        source_set = CachedDataset(source_train, TrainTransform(size=source_size, crop=args.crop_size),
                                   image_dir=os.path.dirname(output[f"translate_r{st.round}"]), split_labels=True)
        target_set = CachedDataset(target_train, TrainTransform(size=target_size, crop=args.crop_size),
                                   label_dir=os.path.dirname(output[st.name.replace("seg", "pseudo")]) if st.ssl_round
                                   else None)
        source_batches = train_loader(source_set, per_rank_batch, args.seed, offset + start, rt.rank, rt.world,
                                      num_workers=args.num_workers, pin_memory=pin)
        target_batches = train_loader(target_set, per_rank_batch, args.seed + 100_003, offset + start, rt.rank,
                                      rt.world, num_workers=args.num_workers, pin_memory=pin)
        train_model, train_disc = rt.wrap(net), rt.wrap(disc)

        running = {}
        log.start_loop(offset + start)
        progress = tqdm(range(start, st.length), initial=start, total=st.length, disable=not rt.is_main,
                        desc=f"{SCRIPT} {st.name}", dynamic_ncols=True)
        for it in progress:
            lr = poly_lr(args.lr, lr_offset + it, horizon, args.poly_power)
            set_lr(optimizer, lr)
            set_lr(d_optimizer, poly_lr(args.lr_d, lr_offset + it, horizon, args.poly_power))
            images, labels, _ = next(source_batches)
            target_images, pseudo_labels, _ = next(target_batches)
            labels = labels.to(rt.device, non_blocking=True).long()
            pseudo_labels = pseudo_labels.to(rt.device, non_blocking=True).long() if st.ssl_round else None
            losses = segmenter_step(train_model, disc, train_disc, optimizer, d_optimizer, rt, to_input(images), labels,
                                    to_input(target_images), pseudo_labels, args.lambda_adv)

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach()
            done = it + 1
            if done % args.log_every == 0 or done % args.checkpoint_every == 0 or done == st.length:
                scalars = log.check_and_log(offset + done, running, lr, args.batch_size, progress,
                                            write=done % args.log_every == 0 or done == st.length,
                                            round=st.round, ssl_round=st.ssl_round)
                running = {} if scalars is not None else running
            if args.eval_every and done % args.eval_every == 0 and done != st.length:
                log.log_eval(offset + done, evaluate_model(net))
            if done % args.checkpoint_every == 0 or done == st.length:
                save(st, done, rng=rng_state(), **{k: v.state_dict() for k, v in parts.items()})
        if st is not final_stage:  # the final stage's evaluation is the final evaluation
            log.log_eval(offset + st.length, evaluate_model(net))
        save(st, st.length, output[st.name], model=net.state_dict())

    # ALGO LOGIC: run the stages whose output is missing; a stage's run makes the later outputs stale
    final_stage = todo[-1]
    for st in todo:
        if os.path.exists(output[st.name]) and not args.weights:  # --weights: labels from another segmenter
            if rt.is_main:
                tqdm.write(f"stage {st.name}: done ({output[st.name]})")
            continue
        missing = next((name for name in stage_inputs(st, args) if not os.path.exists(output[name])), None)
        if missing:
            raise UserError(f"stage {st.name} needs stage {missing} first (run --stage all, or that stage)")
        if rt.is_main:
            for later in plan[st.index + 1:]:
                if os.path.exists(output[later.name]):
                    os.remove(output[later.name])
            resumed = resume_ckpt is not None and resume_ckpt["stage"] == st.name
            tqdm.write(f"stage {st.name}" + (f": resumed from {ckpt_path} at iteration {resume_ckpt['iter']}"
                                             if resumed else ""))
        rt.barrier()
        {"cyclegan": run_cyclegan, "translate": run_translate, "seg": run_seg, "pseudo": run_pseudo}[st.kind](st)
        resume_ckpt = None  # last.pt can only continue the first stage that runs
        rt.barrier()  # rank 0 wrote the stage's output: every rank sees it before checking the next stage

    # TRY NOT TO MODIFY: final evaluation
    if final_stage.kind == "seg":
        total_iters = sum(st.length for st in plan[:final_stage.index + 1] if st.kind == "seg")
        summary = evaluate_model(segmenter_from(final_stage.name), final=True)
        log.log_eval(total_iters, summary)
        log.write_results(summary, total_iters, stage=final_stage.name)
    log.close()
    rt.close()


if __name__ == "__main__":
    guard(main)
