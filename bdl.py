"""BDL: bidirectional learning of an image translator and a segmenter (source_only.py + CycleGAN, output-space
adversarial loss and self-supervised pseudo labels, in alternating stages).

Li, Yuan, Vasconcelos, "Bidirectional Learning for Domain Adaptation of Semantic Segmentation", CVPR 2019,
https://arxiv.org/abs/1904.10620, official code https://github.com/liyunsheng13/BDL (`BDL.py`, `SSL.py`,
`cyclegan/cycle_gan_model.py`, `cyclegan/networks.py`).
Recipe: K outer rounds (paper K=2), each one
  T^k   CycleGAN source->target translator (ResNet generators with 9 blocks, 70x70 PatchGAN discriminators,
        instance norm, LSGAN with 50-image pools, cycle L1 10, identity L1 5; Adam 2e-4, betas (0.5, 0.999),
        constant for half the schedule then linear to 0; 20 epochs at batch 4 on 1024-wide 452x452 crops).
        From round 2 on, the frozen segmenter of the previous round adds the perceptual loss: MSE between
        instance-normalised stride-8 logits, 0.1 for image vs translation and 10 for image vs cycle
        reconstruction, in both directions (cycle_gan_model.py).
  S^k_0 DeepLab-v2 (single level) on translated source + output-space adversarial loss 0.001 (FCDisc on the
        target softmax, Adam 1e-4; adaptsegnet.py's discriminator and step), 80k iterations;
  S^k_i i = 1..N (paper N=2): pseudo labels from S^k_{i-1} on the target train split, per class
        threshold min(median confidence of the pixels predicted as that class, 0.9), lower pixels ignored;
        retrain with CE(translated source) + CE(target, pseudo) + 0.001 adversarial, 120k iterations each.
Stages run in sequence from one command and are skipped when their output is cached in the run folder
(translated/r<k>/, pseudo/r<k>_s<i>/, checkpoints/<stage>.pt, stages.json); `--stage NAME --round k
--ssl-round i` runs one stage; `--resume` continues the stage in progress (checkpoints/last.pt).
Reported (paper): GTA5->Cityscapes 48.5 mIoU (R101), 41.3 (VGG); SYNTHIA->Cityscapes 51.4 mIoU13 (R101);
source only 33.6; M_0^(1) 42.7, M_2^(1) 47.2, M_0^(2) 44.3 (maintainer, issues #17, #18, #30).

Deviations from the official code:
- Pseudo-label thresholds are computed in constant memory: confidences are quantised to 1/65535 and counted
  in per-class histograms (two passes over the target images: histogram, then labelling); the official
  SSL.py keeps every probability in RAM (~23 GiB). Threshold = the official order statistic
  sorted[round(n/2)] of the quantised values (error < 1/65535 = 1.6e-5), capped at 0.9.
- Translation happens at the segmenter's source training size (`--source-size`, GTA5 1280x720); the
  official code does not fix it (maintainer #11, #47). Round 1 has no perceptual loss (no segmenter yet).
- ASPP sums 4 branches and init is torchvision ImageNet (source_only.py defaults; BDL.py after 37af0e7).
- `--iters` is the length of each round's first segmentation stage (paper 80k) and `--ssl-iters` of the
  others (120k); every segmentation stage restarts from `--init` and its own poly schedule (paper, README
  `--init-weights`) unless `--seg-init previous`.
- Stage order and defaults K=2, N=2 follow paper Table 2 / README releases (not the code, which runs one stage
  per command).
- `--preset quick` (toy pair, CPU, random init): 400 segmentation iterations in all (60 + 70 + 70 per round)
  chained with `--seg-init previous` on one poly schedule of horizon 400, the same budget as
  source_only.py's quick run (restarting 6 times from random init would leave each model 60-70 iterations);
  lambda_adv 0.1 (100x the paper, as adaptsegnet.py's quick preset: the paper's weight has no measurable
  effect in a few hundred iterations); a tiny CycleGAN (ngf 16, 3 blocks, 300 iterations at lr 1e-3 on
  64x64 crops: at 2e-4 and 200 iterations its translations were blurred grey shapes); the first 200 target
  train images (each pseudo-label pass labels all of them).
Docs: README.md, section "Methods"; benchmarks/bdl.md.
"""
import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

from common.checkpoint import load_checkpoint, load_weights, resume_path, rng_state, save_checkpoint, set_rng_state
from common.cli import UserError, guard, parse_args
from common.data import (NORMALIZATION, SegDataset, TrainTransform, class_setup, domain_split, eval_loader, normalize,
                         read_image, read_label, train_loader)
from common.metrics import evaluate_target
from common.runlog import RunLog, param_counts, save_json
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir, unwrap

SCRIPT = "bdl"


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
    backbone: str = "resnet101"
    """DeepLab-v2 backbone: resnet18, resnet34, resnet50 or resnet101 (paper: resnet101)"""
    init: str = "imagenet"
    """imagenet (torchvision weights), none (random) or a local file (DeepLab init .pth or our checkpoint)"""
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
    """checkpoint(s) to evaluate with --eval-only"""
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
    """input normalisation; auto: caffe (BGR, mean only) for Caffe DeepLab init files, else imagenet"""
    multi_level: bool = False
    """add the auxiliary classifier on layer3 (weight lambda_seg_aux), as the multi-level methods do"""
    lambda_seg_aux: float = 0.1
    """weight of the auxiliary segmentation loss (AdaptSegNet: 0.1)"""
    aspp_branches: int = 4
    """ASPP branches summed: 4 (ADVENT, BDL) or 2 (AdaptSegNet's released code)"""
    bn_mode: Literal["train", "eval"] = "train"
    """frozen-affine BN with batch statistics (train, official) or running statistics (eval)"""
    momentum: float = 0.9
    """SGD momentum (paper: 0.9)"""
    weight_decay: float = 5e-4
    """SGD weight decay (paper: 5e-4)"""
    head_lr_mult: float = 10.0
    """learning-rate multiplier of the classifiers (paper: 10)"""
    poly_horizon: Optional[int] = 250000
    """poly schedule horizon T in lr*(1-t/T)^power; none: the run length (--iters). Paper: 250k, a separate number
    from the iterations (it stays when --iters changes)"""
    poly_power: float = 0.9
    """poly schedule power (paper: 0.9)"""

    # Algorithm specific arguments
    stage: Literal["all", "cyclegan", "translate", "seg", "pseudo"] = "all"
    """all: run every stage not yet cached in the run folder; else only this stage of --round/--ssl-round"""
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
    cyclegan_iters: int = 124830
    """CycleGAN iterations, constant lr for the first half, linear decay to 0 after (paper: 20 epochs of GTA5
    at batch 4 = 124,830)"""
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
                  lr=0.0025, eval_every=0, checkpoint_every=100, num_workers=1, log_every=10, poly_horizon=400,
                  seed=0, source_size=[96, 192], target_size=[96, 192],
                  # method-specific: 60 + 70 + 70 seg iterations per round x 2 rounds = source_only's 400, chained
                  ssl_iters=70, seg_init="previous", lambda_adv=0.1, target_limit=200,
                  cyclegan_iters=300, cyclegan_batch=2, cyclegan_lr=1e-3, cyclegan_load_width=192,
                  cyclegan_crop=[64, 64], ngf=16, ndf=8, gen_blocks=3),
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

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        # Caffe-style: the stride sits on the first 1x1 conv (torchvision: on the 3x3; same shapes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
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
        for conv in self.convs:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        return sum(conv(x) for conv in self.convs)


class DeepLabV2(nn.Module):
    """ResNet with output stride 8; returns (aux logits on layer3 or None, main logits on layer4)."""

    def __init__(self, backbone="resnet101", num_classes=19, multi_level=False, aspp_branches=4, bn_mode="train"):
        super().__init__()
        if backbone not in RESNETS:
            raise UserError(f"unknown backbone '{backbone}': use one of {', '.join(RESNETS)}")
        block, layers = RESNETS[backbone]
        self.bn_mode, self.inplanes = bn_mode, 64
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
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
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


def load_init(model, init, backbone) -> str:
    """Load --init into the model; return the input normalisation the weights expect."""
    if init == "none":
        return "imagenet"
    if init == "imagenet":
        state = torchvision.models.get_model(backbone, weights="IMAGENET1K_V1").state_dict()
        caffe = False
    else:
        if not os.path.isfile(init):
            raise UserError(f"--init {init}: no such file (use imagenet, none or a path)")
        try:
            state = torch.load(init, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot load --init {init}: {str(e).splitlines()[0][:200]}") from None
        state = state.get("model", state.get("state_dict", state))
        caffe = any(k.startswith("Scale.") for k in state)  # the DeepLab-v2 Caffe init files
        state = {k.removeprefix("Scale.").removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("layer5.", "layer6.", "fc."))}
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    backbone_keys = [k for k in own if "head" not in k]
    missing = [k for k in backbone_keys if k not in matched]
    if missing:
        raise UserError(f"--init {init} does not fit a {backbone} DeepLab-v2: {len(missing)} of "
                        f"{len(backbone_keys)} backbone tensors missing or misshapen (e.g. {missing[0]})")
    model.load_state_dict(matched, strict=False)
    return "caffe" if caffe else "imagenet"


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

    def __init__(self, size):
        self.size, self.images = size, []

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

    def state(self):
        return torch.stack(self.images).cpu() if self.images else torch.empty(0)

    def load(self, tensor, device):
        self.images = [t.to(device) for t in tensor]


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
    losses = {"gan_g": lsgan_loss(discs["target"](out["fake_t"]), True) + lsgan_loss(discs["source"](out["fake_s"]), True),
              "cycle": F.l1_loss(out["rec_s"].float(), real_s) + F.l1_loss(out["rec_t"].float(), real_t),
              "idt": F.l1_loss(out["idt_t"].float(), real_t) + F.l1_loss(out["idt_s"].float(), real_s)}
    if segmenter is not None:
        feats = {k: segmenter(gan_to_seg_input(v, norm))[1] for k, v in
                 (("real_s", real_s), ("real_t", real_t), *((k, out[k]) for k in ("fake_t", "fake_s", "rec_s", "rec_t")))}
        losses["sem"] = perceptual_loss(feats["fake_t"], feats["real_s"]) + perceptual_loss(feats["fake_s"], feats["real_t"])
        losses["sem_rec"] = perceptual_loss(feats["rec_s"], feats["real_s"]) + perceptual_loss(feats["rec_t"], feats["real_t"])
    return losses


def translator_discriminator_loss(disc, real, fake_pooled):
    """1/2 (LSGAN(D(real), 1) + LSGAN(D(fake), 0)) on a detached fake from the pool (trains D only)."""
    return 0.5 * (lsgan_loss(disc(real), True) + lsgan_loss(disc(fake_pooled.detach()), False))


def cyclegan_lr_factor(it, total):
    """CycleGAN's lambda_rule per iteration: constant for the first half, then linear decay towards 0."""
    half = total // 2
    return 1.0 - max(0, it + 1 - half) / (total - half + 1)


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
    share. `predict(uint8 images) -> logits`. Returns the thresholds (floats)."""
    dataset = SegDataset(split, eval_size=size, with_label=False)
    hist = torch.zeros(num_classes, CONF_LEVELS + 1, dtype=torch.int64, device=rt.device)
    thresholds_q = None
    for labelling in (False, True):
        loader = eval_loader(dataset, rt.rank, rt.world, num_workers)
        for image, _, index in tqdm(loader, desc="pseudo labels" + (" (write)" if labelling else ""),
                                    disable=not rt.is_main, dynamic_ncols=True):
            label, conf_q = confidence_map(softmax_at(predict(image.to(rt.device)), image.shape[-2:]))
            if not labelling:
                add_histograms(hist, label, conf_q)
                continue
            pseudo = apply_thresholds(label[0], conf_q[0], thresholds_q).cpu().numpy()
            Image.fromarray(pseudo).save(os.path.join(out_dir, split.item_name(int(index[0])) + ".png"))
        if not labelling:
            thresholds_q = median_thresholds(rt.all_reduce(hist), cap)
    rt.barrier()
    return (thresholds_q.double() / CONF_LEVELS).tolist()


class CachedDataset(torch.utils.data.Dataset):
    """Training items (image uint8 3xHxW, label uint8 HxW or empty, index) of `split`, with the image read from
    a folder of translated PNGs and/or the label from a folder of pseudo-label PNGs (item name + .png)."""

    def __init__(self, split, transform, image_dir=None, label_dir=None, split_labels=False):
        self.split, self.transform, self.image_dir, self.label_dir = split, transform, image_dir, label_dir
        self.split_labels = split_labels

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        index, seed = key
        name = self.split.item_name(index) + ".png"
        image = (read_image(os.path.join(self.image_dir, name)) if self.image_dir
                 else self.split.load(index, with_label=False)[0])
        label = (read_label(os.path.join(self.label_dir, name)) if self.label_dir
                 else self.split.load_label(index) if self.split_labels else None)
        if label is not None and label.shape != image.shape[:2]:  # a translated image is already resized
            label = np.asarray(Image.fromarray(label).resize(image.shape[1::-1], Image.NEAREST))
        image, label = self.transform(image, label, np.random.default_rng(seed))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label = torch.from_numpy(np.array(label)) if label is not None else torch.empty(0, dtype=torch.uint8)
        return image, label, index


@dataclass
class Stage:
    kind: str  # cyclegan, translate, seg, pseudo
    round: int
    ssl_round: int = 0
    index: int = 0  # position in the plan (seeds the stage)
    length: int = 0  # training iterations (cyclegan, seg)
    seg_offset: int = 0  # segmentation iterations of the earlier seg stages

    @property
    def name(self):
        return f"{self.kind}_r{self.round}" + (f"_s{self.ssl_round}" if self.kind in ("seg", "pseudo") else "")


def stage_plan(args):
    """The bidirectional loop: per round T (cyclegan), translate, S_0, then N x (pseudo labels, S_i)."""
    plan, seg_done = [], 0
    for k in range(1, args.outer_rounds + 1):
        plan += [Stage("cyclegan", k, length=args.cyclegan_iters), Stage("translate", k)]
        for i in range(args.ssl_rounds + 1):
            if i:
                plan.append(Stage("pseudo", k, i))
            length = args.iters if i == 0 else args.ssl_iters
            plan.append(Stage("seg", k, i, length=length, seg_offset=seg_done))
            seg_done += length
    for n, st in enumerate(plan):
        st.index = n
    return plan


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

    # ALGO LOGIC: the stage plan
    if args.cyclegan_batch % rt.world:
        raise UserError(f"--cyclegan-batch {args.cyclegan_batch} must divide by {rt.world} processes")
    if args.outer_rounds < 1 or args.ssl_rounds < 0 or min(args.iters, args.ssl_iters, args.cyclegan_iters) < 1:
        raise UserError("--outer-rounds and every stage's iterations must be >= 1, --ssl-rounds >= 0")
    plan = stage_plan(args)
    selected = None
    if args.stage != "all":
        matches = [st for st in plan if (st.kind, st.round) == (args.stage, args.round)
                   and (st.kind not in ("seg", "pseudo") or st.ssl_round == args.ssl_round)]
        if not matches:
            raise UserError(f"--stage {args.stage} --round {args.round} --ssl-round {args.ssl_round} is not in the "
                            f"plan of {args.outer_rounds} rounds x {args.ssl_rounds} pseudo-label rounds")
        selected = matches[0]

    # ALGO LOGIC: networks and optimisers (each stage builds its own; these give --dry-run's parameter counts)
    model = DeepLabV2(args.backbone, num_classes, args.multi_level, args.aspp_branches, args.bn_mode)
    norm = load_init(model, args.init, args.backbone) if not (ckpt_path or args.eval_only or args.dry_run) else None
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    translators = Translators(args.ngf, args.gen_blocks)
    networks = {"model": model, "disc_main": FCDiscriminator(num_classes), "to_target": translators.to_target,
                "to_source": translators.to_source, "disc_target": PatchDiscriminator(args.ndf),
                "disc_source": PatchDiscriminator(args.ndf)}

    # TRY NOT TO MODIFY: run folder, dry run, resume
    norm = args.normalization if args.normalization != "auto" else norm
    log = RunLog(out_dir, rt.is_main)
    log.write_config(SCRIPT, args, param_counts(**networks), normalization=norm, num_classes=num_classes)
    if args.dry_run:
        print(f"dry run: config written to {log.path('config.json')}")
        return
    start_iter, resume_ckpt = 0, None
    if ckpt_path or args.eval_only:
        if args.eval_only and len(args.weights) != 1:
            raise UserError("--eval-only needs exactly one --weights PATH")
        ckpt = load_checkpoint(args.weights[0] if args.eval_only else ckpt_path, SCRIPT, num_classes)
        norm, start_iter = ckpt["normalization"], ckpt["iter"]
        if args.eval_only:
            if "model" not in ckpt:
                raise UserError(f"{args.weights[0]} holds no segmenter (written by stage {ckpt.get('stage')})")
            load_weights(model, ckpt["model"])
        else:
            resume_ckpt = ckpt
            print(f"resuming stage {ckpt['stage']} of {ckpt_path} at iteration {start_iter}")
    channels_last = torch.channels_last if rt.channels_last else torch.preserve_format

    def to_input(images):
        x = normalize(images.to(rt.device, non_blocking=True), norm)
        return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x

    # TRY NOT TO MODIFY: evaluation
    target_val = domain_split(args.target, "val", args.data_root)
    eval_size = args.eval_size or args.target_size or target_val.paper_size

    def evaluate_model(net, final=False):
        net.eval()
        with torch.no_grad(), rt.autocast():
            summary = evaluate_target(lambda x: net(to_input(x))[1], target_val, rt, align_corners=True, log=log,
                                      num_predictions=args.num_predictions if final else 0, limit=args.eval_limit,
                                      eval_size=eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19)
        net.train()
        return summary

    if args.eval_only:
        summary = evaluate_model(model, final=True)
        log.write_results(summary, start_iter, weights=args.weights)
        print(f"target val mIoU {summary['miou']:.2f} ({log.path('results.json')})")
        return

    # ALGO LOGIC: data, stage records and cached outputs
    def first(split, n):
        return split if n is None else dataclasses.replace(split, images=split.images[:n], labels=split.labels[:n])

    source_train = first(domain_split(args.source, "train", args.data_root, synthia_classes=args.synthia_classes),
                         args.source_limit)
    target_train = first(domain_split(args.target, "train", args.data_root, labelled=False), args.target_limit)
    source_size = args.source_size or source_train.paper_size
    target_size = args.target_size or target_train.paper_size
    per_rank_batch = args.batch_size // rt.world
    pin = rt.device.type == "cuda"

    def translated_dir(k):
        return log.path("translated", f"r{k}")

    def pseudo_dir(k, i):
        return log.path("pseudo", f"r{k}_s{i}")

    def stage_file(name):
        return log.path("checkpoints", f"{name}.pt")

    records_path = log.path("stages.json")
    records = json.load(open(records_path)) if os.path.isfile(records_path) else {}

    def is_done(st):
        rec = records.get(st.name, {})
        if st.kind in ("cyclegan", "seg"):
            return rec.get("iters") == st.length and os.path.isfile(stage_file(st.name))
        return rec.get("images") == len(source_train if st.kind == "translate" else target_train)

    def set_records(drop_from=None, stage=None, **info):
        """Mark `stage` done (info), or forget `drop_from` and every later stage (they depend on it)."""
        if drop_from is not None:
            for st in plan[drop_from.index:]:
                records.pop(st.name, None)
        if stage is not None:
            records[stage.name] = info
        if rt.is_main:
            save_json(records_path, records)
        rt.barrier()

    def stage_state(st, it, **state):
        return {"script": SCRIPT, "num_classes": num_classes, "normalization": norm, "stage": st.name, "iter": it,
                "args": dataclasses.asdict(args), **state}

    def resumes(st):
        return resume_ckpt is not None and resume_ckpt["stage"] == st.name and resume_ckpt["iter"] < st.length

    def segmenter_from(name):
        net = DeepLabV2(args.backbone, num_classes, args.multi_level, args.aspp_branches, args.bn_mode)
        load_weights(net, load_checkpoint(stage_file(name), SCRIPT, num_classes)["model"])
        return net.to(rt.device, memory_format=channels_last)

    # ALGO LOGIC: T^k, the CycleGAN translator (perceptual loss from the previous round's last segmenter)
    def run_cyclegan(st):
        seed_everything(args.seed + 1000 * st.index, args.torch_deterministic)
        translators = Translators(args.ngf, args.gen_blocks).to(rt.device)
        discs = nn.ModuleDict({"target": PatchDiscriminator(args.ndf), "source": PatchDiscriminator(args.ndf)})
        discs.to(rt.device)
        optimizer_g = torch.optim.Adam([{"params": translators.parameters(), "lr_mult": 1.0}], lr=args.cyclegan_lr,
                                       betas=(0.5, 0.999))
        optimizer_d = torch.optim.Adam([{"params": discs.parameters(), "lr_mult": 1.0}], lr=args.cyclegan_lr,
                                       betas=(0.5, 0.999))
        pools = {"target": ImagePool(args.pool_size), "source": ImagePool(args.pool_size)}
        segmenter = None
        if st.round > 1:  # frozen, eval mode; gradients flow through it into the generators only
            segmenter = segmenter_from(f"seg_r{st.round - 1}_s{args.ssl_rounds}").eval()
            set_requires_grad([segmenter], False)
        start = 0
        if resumes(st):
            translators.load_state_dict(resume_ckpt["translators"])
            discs.load_state_dict(resume_ckpt["discs"])
            optimizer_g.load_state_dict(resume_ckpt["optimizer_g"])
            optimizer_d.load_state_dict(resume_ckpt["optimizer_d"])
            for k, pool in pools.items():
                pool.load(resume_ckpt[f"pool_{k}"], rt.device)
            rt.scaler.load_state_dict(resume_ckpt["scaler"])
            set_rng_state(resume_ckpt["rng"])
            start = resume_ckpt["iter"]
        transform = TrainTransform(size=(args.cyclegan_load_width,) * 2, keep_ratio=True, crop=args.cyclegan_crop,
                                   flip=True)
        batch, seed = args.cyclegan_batch // rt.world, args.seed + 1000 * st.index + rt.rank
        source_batches = train_loader(SegDataset(source_train, transform, with_label=False), batch, seed, start,
                                      num_workers=args.num_workers, pin_memory=pin)
        target_batches = train_loader(SegDataset(target_train, transform, with_label=False), batch, seed + 500, start,
                                      num_workers=args.num_workers, pin_memory=pin)
        train_translators = rt.wrap(translators)
        train_discs = {k: rt.wrap(d) for k, d in discs.items()}

        def checkpoint(it):
            if rt.is_main:
                save_checkpoint(log.path("checkpoints", "last.pt"), stage_state(
                    st, it, translators=translators.state_dict(), discs=discs.state_dict(),
                    optimizer_g=optimizer_g.state_dict(), optimizer_d=optimizer_d.state_dict(),
                    scaler=rt.scaler.state_dict(), rng=rng_state(), **{f"pool_{k}": p.state() for k, p in pools.items()}))

        running = {}
        log.start_loop(start)
        progress = tqdm(range(start, st.length), initial=start, total=st.length, disable=not rt.is_main,
                        desc=f"{SCRIPT} {st.name}", dynamic_ncols=True)
        for it in progress:
            lr = args.cyclegan_lr * cyclegan_lr_factor(it, st.length)
            set_lr(optimizer_g, lr)
            set_lr(optimizer_d, lr)
            optimizer_g.zero_grad(set_to_none=True)
            optimizer_d.zero_grad(set_to_none=True)
            real_s = normalize(next(source_batches)[0].to(rt.device, non_blocking=True), "gan")
            real_t = normalize(next(target_batches)[0].to(rt.device, non_blocking=True), "gan")
            # generators: frozen, unwrapped discriminators (no gradient, no DDP hook), official weights
            with rt.autocast():
                out = train_translators(real_s, real_t)
            set_requires_grad(discs.values(), False)
            with rt.autocast():
                losses = translator_losses(out, real_s, real_t, discs, segmenter, norm)
            loss = (losses["gan_g"] + args.lambda_cycle * losses["cycle"] + args.lambda_identity * losses["idt"]
                    + args.lambda_perceptual * losses.get("sem", 0.0)
                    + args.lambda_perceptual_rec * losses.get("sem_rec", 0.0))
            rt.scaler.scale(loss).backward()
            set_requires_grad(discs.values(), True)
            # discriminators: real vs a detached fake drawn from the pool
            with rt.autocast():
                losses["d_cyc"] = (translator_discriminator_loss(train_discs["target"], real_t,
                                                                 pools["target"].query(out["fake_t"]))
                                   + translator_discriminator_loss(train_discs["source"], real_s,
                                                                   pools["source"].query(out["fake_s"])))
            rt.scaler.scale(losses["d_cyc"]).backward()
            rt.scaler.step(optimizer_g)
            rt.scaler.step(optimizer_d)
            rt.scaler.update()

            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach()
            done = it + 1
            if done % args.log_every == 0 or done % args.checkpoint_every == 0 or done == st.length:
                scalars = log.check_and_log(done, running, lr, args.cyclegan_batch, progress, round=st.round,
                                            write=done % args.log_every == 0 or done == st.length)
                running = {} if scalars is not None else running
            if done % args.checkpoint_every == 0 or done == st.length:
                checkpoint(done)
        if rt.is_main:
            save_checkpoint(stage_file(st.name), stage_state(st, st.length, to_target=translators.to_target.state_dict(),
                                                             to_source=translators.to_source.state_dict()))
        set_records(stage=st, iters=st.length)

    # ALGO LOGIC: translate every source train image with T^k, at the segmenter's source size
    def run_translate(st):
        to_target = ResnetGenerator(args.ngf, args.gen_blocks)
        load_weights(to_target, load_checkpoint(stage_file(f"cyclegan_r{st.round}"), SCRIPT, num_classes)["to_target"])
        to_target.to(rt.device).eval()
        os.makedirs(translated_dir(st.round), exist_ok=True)
        dataset = SegDataset(source_train, eval_size=source_size, with_label=False)
        for image, _, index in tqdm(eval_loader(dataset, rt.rank, rt.world, args.num_workers), disable=not rt.is_main,
                                    desc=f"{SCRIPT} {st.name}", dynamic_ncols=True):
            with rt.autocast():
                fake = translate(to_target, normalize(image.to(rt.device), "gan"))
            pixels = ((fake[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
            Image.fromarray(pixels.cpu().numpy()).save(
                os.path.join(translated_dir(st.round), source_train.item_name(int(index[0])) + ".png"))
        rt.barrier()
        set_records(stage=st, images=len(source_train))

    # ALGO LOGIC: pseudo labels of the target train split from the previous segmentation stage
    def run_pseudo(st):
        net = segmenter_from(f"seg_r{st.round}_s{st.ssl_round - 1}").eval()
        os.makedirs(pseudo_dir(st.round, st.ssl_round), exist_ok=True)
        with rt.autocast():
            thresholds = generate_pseudo_labels(lambda x: net(to_input(x))[1], target_train, target_size,
                                                pseudo_dir(st.round, st.ssl_round), rt, num_classes,
                                                args.pseudo_max_threshold, args.num_workers)
        if rt.is_main:
            save_json(os.path.join(pseudo_dir(st.round, st.ssl_round), "thresholds.json"), dict(zip(classes, thresholds)))
        set_records(stage=st, images=len(target_train), thresholds=thresholds)

    # ALGO LOGIC: S^k_i, the segmenter on translated source + adversarial (+ pseudo-labelled target if i > 0)
    def run_seg(st, evaluate_at_end=True):
        seed_everything(args.seed + 1000 * st.index, args.torch_deterministic)
        previous = [p for p in plan[:st.index] if p.kind == "seg"]
        if args.seg_init == "previous" and previous:
            net = segmenter_from(previous[-1].name)
        else:
            net = DeepLabV2(args.backbone, num_classes, args.multi_level, args.aspp_branches, args.bn_mode)
            load_init(net, args.init, args.backbone)
            net.to(rt.device, memory_format=channels_last)
        optimizer = torch.optim.SGD(net.param_groups(args.lr, args.head_lr_mult), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        disc = FCDiscriminator(num_classes).to(rt.device, memory_format=channels_last)
        d_optimizer = torch.optim.Adam([{"params": disc.parameters(), "lr_mult": 1.0}], lr=args.lr_d, betas=(0.9, 0.99))
        start = 0
        if resumes(st):
            load_weights(net, resume_ckpt["model"])
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            disc.load_state_dict(resume_ckpt["disc_main"])
            d_optimizer.load_state_dict(resume_ckpt["optimizer_d_main"])
            rt.scaler.load_state_dict(resume_ckpt["scaler"])
            set_rng_state(resume_ckpt["rng"])
            start = resume_ckpt["iter"]
        # chained stages continue one sample stream and (seg_init previous) one poly schedule
        offset = st.seg_offset if args.seg_init == "previous" else 0
        source_set = CachedDataset(source_train, TrainTransform(size=source_size, crop=args.crop_size),
                                   image_dir=translated_dir(st.round), split_labels=True)
        target_set = CachedDataset(target_train, TrainTransform(size=target_size, crop=args.crop_size),
                                   label_dir=pseudo_dir(st.round, st.ssl_round) if st.ssl_round else None)
        source_batches = train_loader(source_set, per_rank_batch, args.seed + rt.rank, st.seg_offset + start,
                                      num_workers=args.num_workers, pin_memory=pin)
        target_batches = train_loader(target_set, per_rank_batch, args.seed + 100_003 + rt.rank, st.seg_offset + start,
                                      num_workers=args.num_workers, pin_memory=pin)
        train_model, train_disc = rt.wrap(net), rt.wrap(disc)
        # DDP: the source backward accumulates locally, the target backward all-reduces the sum (style.md 8.1)
        source_no_sync = getattr(train_model, "no_sync", contextlib.nullcontext)

        def checkpoint(it):
            if rt.is_main:
                save_checkpoint(log.path("checkpoints", "last.pt"), stage_state(
                    st, it, model=net.state_dict(), optimizer=optimizer.state_dict(), disc_main=disc.state_dict(),
                    optimizer_d_main=d_optimizer.state_dict(), scaler=rt.scaler.state_dict(), rng=rng_state()))

        running = {}
        log.start_loop(st.seg_offset + start)
        progress = tqdm(range(start, st.length), initial=start, total=st.length, disable=not rt.is_main,
                        desc=f"{SCRIPT} {st.name}", dynamic_ncols=True)
        for it in progress:
            lr = poly_lr(args.lr, offset + it, args.poly_horizon, args.poly_power)
            set_lr(optimizer, lr)
            set_lr(d_optimizer, poly_lr(args.lr_d, offset + it, args.poly_horizon, args.poly_power))
            optimizer.zero_grad(set_to_none=True)
            d_optimizer.zero_grad(set_to_none=True)
            images, labels, _ = next(source_batches)
            target_images, pseudo_labels, _ = next(target_batches)
            labels = labels.to(rt.device, non_blocking=True).long()
            # 1. translated source: CE
            with source_no_sync():
                with rt.autocast():
                    _, main = train_model(to_input(images))
                losses = {"seg_src": seg_loss(main, labels)}
                rt.scaler.scale(losses["seg_src"]).backward()
            source_map = softmax_at(main.detach(), images.shape[-2:])
            # 2. target: fool the frozen, unwrapped D (label source); CE on the pseudo labels in SSL rounds
            with rt.autocast():
                _, target_main = train_model(to_input(target_images))
            target_map = softmax_at(target_main, target_images.shape[-2:])
            set_requires_grad([disc], False)
            with rt.autocast():
                losses["adv_main"] = generator_loss(disc, target_map)
            loss = args.lambda_adv * losses["adv_main"]
            if st.ssl_round:
                losses["seg_pseudo"] = seg_loss(target_main, pseudo_labels.to(rt.device, non_blocking=True).long())
                loss = loss + losses["seg_pseudo"]
            rt.scaler.scale(loss).backward()
            set_requires_grad([disc], True)
            # 3. D on the detached maps: source 0, target 1; then step both
            with rt.autocast():
                losses["d_main"] = discriminator_loss(train_disc, source_map, target_map)
            rt.scaler.scale(losses["d_main"]).backward()
            rt.scaler.step(optimizer)
            rt.scaler.step(d_optimizer)
            rt.scaler.update()

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach()
            done = it + 1
            if done % args.log_every == 0 or done % args.checkpoint_every == 0 or done == st.length:
                scalars = log.check_and_log(st.seg_offset + done, running, lr, args.batch_size, progress,
                                            write=done % args.log_every == 0 or done == st.length,
                                            round=st.round, ssl_round=st.ssl_round)
                running = {} if scalars is not None else running
            if args.eval_every and done % args.eval_every == 0 and done != st.length:
                log.log_eval(st.seg_offset + done, evaluate_model(net))
            if done % args.checkpoint_every == 0 or done == st.length:
                checkpoint(done)
        if evaluate_at_end:
            log.log_eval(st.seg_offset + st.length, evaluate_model(net))
        if rt.is_main:
            save_checkpoint(stage_file(st.name), stage_state(st, st.length, model=net.state_dict()))
        set_records(stage=st, iters=st.length)
        return net

    # ALGO LOGIC: run the plan (or the one --stage), skipping stages whose outputs are cached
    if selected is None:
        todo = next((plan[n:] for n, st in enumerate(plan) if not is_done(st)), [])
        final_stage = plan[-1]
    else:
        missing = next((st for st in plan[:selected.index] if not is_done(st)), None)
        if missing is not None:
            raise UserError(f"--stage {args.stage} --round {args.round} --ssl-round {args.ssl_round} needs stage "
                            f"{missing.name} first (run --stage all, or that stage)")
        todo, final_stage = [selected], selected
    if todo:
        set_records(drop_from=todo[0])
    final_net = None
    for st in todo:
        if rt.is_main:
            tqdm.write(f"stage {st.name}" + (f" (resumed at {resume_ckpt['iter']})" if resumes(st) else ""))
        if st.kind == "seg":
            final_net = run_seg(st, evaluate_at_end=st is not final_stage)
        else:
            {"cyclegan": run_cyclegan, "translate": run_translate, "pseudo": run_pseudo}[st.kind](st)

    # TRY NOT TO MODIFY: final evaluation
    if final_stage.kind == "seg":
        final_net = final_net or segmenter_from(final_stage.name)
        total_iters = final_stage.seg_offset + final_stage.length
        summary = evaluate_model(final_net, final=True)
        log.log_eval(total_iters, summary)
        log.write_results(summary, total_iters, stage=final_stage.name)
    log.close()
    rt.close()


if __name__ == "__main__":
    guard(main)
