"""Self-Regulation: a multi-exit DeepLab-v2 whose exits regulate each other (training only).

Paper: Dong Zhang, Hanwang Zhang, Jinhui Tang, Xian-Sheng Hua, Qianru Sun, "Self-Regulation for Semantic
Segmentation", ICCV 2021, https://arxiv.org/abs/2108.09702. Official demo: https://github.com/dongzhang89/SR-SS
(`trainval.py`, `lib/models/deeplab.py`, `lib/models/losses.py`). This file is source_only.py plus the method.

Recipe. Four side exits on the stem (conv1+BN+ReLU, 64 ch), layer1, layer2 and layer3 of the DeepLab-v2
backbone, each [3x3 conv->256, BN, ReLU] x2 then a 1x1 conv to C segmentation logits; every exit and the
main output also classify the image: GAP of its C-channel logits -> Linear(C, C) -> sigmoid (multi-label).
All five maps are upsampled bilinearly (align_corners=True) to the input size; index 0 is the main output,
1-4 run from shallow to deep. Loss per iteration (official weights 0.2 / 0.8 / 1.0 / 1.0; train_step):
  MEA-cls = sum over the 5 exits of BCE(sigmoid(cls_k), v), v = multi-hot classes present in the label
  MEA-seg = sum over the 5 exits of pixel CE(seg_k, y)                   (255 ignored)
  SR-L    = sum over k=1..4 of BCE(sigmoid(cls_k), sigmoid(cls_0).detach())   deep teaches shallow (image level)
  SR-F    = sum over k in {0,2,3,4} of CE(seg_k, argmax seg_1)           the shallowest exit teaches the deeper
SR-L and SR-F join after an MEA-only warm-up of `--sr-start-iter` iterations (README: 10k). The quick
preset sets it to -1, meaning a third of --iters, and makes the exits 64 wide instead of 256 (256-wide exits
would more than double the cost of its CPU-sized resnet18 run; with ResNet-101 they are a small share).
The exits exist only during training: evaluation, results.json and the checkpoint's `model` entry are the
plain DeepLabV2 of source_only.py (same keys); the exits and the main classifier are stored separately
under `exits`, for resuming. Optimiser as source_only (SGD, backbone 1x, ASPP 10x) with the exits at 1x.
BN: the backbone's affine is frozen (as the demo's set_bn_fix), the exits' BN weights and biases train (as in
the demo); statistics follow `--bn-mode` everywhere (train: batch statistics; eval: running statistics).
Two uses from one script: fully supervised (`--source cityscapes --target cityscapes`, the paper's setting)
and source-supervised, a stronger source-only baseline for UDA (`--source gta --target cityscapes`).
Method flags typed for a training run in which they cannot act are refused with one error line
(check_method_flags: e.g. --sr-temperature with the official variant, --lambda-seg-aux without --multi-level).

`--preset paper` is not a published recipe: the paper has no UDA experiments. It is source_only.py's GTA5
recipe (AdaptSegNet's schedule: 150k iterations of one 1280x720 frame, SGD 2.5e-4, poly horizon 250k) plus
SR-SS's own defaults: loss weights 0.2 / 0.8 / 1.0 / 1.0 (trainval.py Lambda1-3), 256-wide exits
(deeplab.py ClassLayer), exits at 1x the lr (trainval.py: only the ASPP `conv2d_list` gets 10x), all pixels
in SR-F, hard targets, and the README's 10k MEA-only warm-up.

Init files: nothing is released (../shared/reference/released-models.md). SR-SS trains from
`data/DeepLab_resnet_pretrained.pth` (not linked), a DeepLab-v2 Caffe file with every key under `Scale.`,
loaded non-strictly into its backbone (trainval.py:73-76). Such a file loads with `--init FILE`, recognised
by its content (read_weights): the prefix is dropped, the backbone loads completely, its 21-class COCO
classifier `Scale.layer5` is dropped (the demo's 21 VOC classes take it; 19 or 8 classes cannot), Caffe
BGR input and the stride on the 1x1 conv follow; the exits start at random init, as in the demo.

`--sr-variant softened` is OUR READING OF THE PAPER, not in the official code (uncertain): the hard targets
are replaced by tau^2 * KL(teacher/tau || student/tau) of temperature-softened distributions; SR-F: softmax
over classes per pixel, teacher exit 1; SR-L: per-class Bernoulli (sigmoid) distributions, teacher the main
classifier (at tau=1 its gradient equals the official SR-L's). Teachers are detached.

Deliberate deviations from the official code:
- backbone: our DeepLab-v2 (output stride 8, ImageNet init) shared with source_only.py; the demo's ResNet
  puts stride 2 on layer3 (output stride 16, lib/models/resnet.py) and starts from a COCO DeepLab file.
- BN statistics: the demo runs `net.eval()` throughout, so every BN normalises with running statistics that
  never update: the backbone's from the init file, the exits' at their initial mean 0 / variance 1 (each
  exit BN is then a trainable per-channel scale and shift). Here training uses batch statistics (train mode,
  the UDA scripts' recipe); `--bn-mode eval` gives the demo's behaviour, exits included.
- labels: 255 is ignored in MEA-seg and left out of the class vector v; the VOC demo maps 255 to background.
- SR-F covers all pixels as in the official code (its targets come from the prediction, not the label);
  `--sr-f-skip-ignored` drops the pixels labelled 255.
- warm-up: `trainval.py` adds SR from the first iteration (`--sr-start-iter 0` reproduces it).
- optimiser and data as source_only.py (lr 2.5e-4, wd 5e-4 on every trainable tensor); the demo
  (cfgs/res101.yml) trains VOC at lr 0.01 for 40k iterations, wd 1e-4 with none on biases, 321x321 inputs
  at random scales 0.5-1.5 with flips.
- BCE on logits (BCEWithLogits) instead of BCELoss on sigmoid outputs: same value, numerically stable.
- `--sr-resolution half` (project choice, for memory) computes SR-F on maps upsampled to half the input size.
- Mixed precision: on CUDA the forward and backward passes run under bf16 autocast (fp16 with a GradScaler
  where bf16 is missing) with TF32 matmuls by default; the demo trains in fp32 (`--no-amp` gives fp32).
  Every loss, the GAP feeding each image classifier, the upsampled maps, and the evaluation upsampling and
  argmax are computed in fp32.
- Resizing: images bicubic (PIL), as source_only.py (AdaptSegNet's loaders); labels nearest. The demo
  resizes VOC with cv2 (bilinear).
- as in source_only.py: `--batch-size` is the global batch (split over torchrun processes: 2 processes x
  batch 1 = 1 x batch 2); the ASPP sums all 4 branches, as SR-SS's does (`--aspp-branches 2`: AdaptSegNet's
  quirk); torchvision weights get layer2's stride on the 3x3 conv (`--stride-on auto`).
Reported numbers: none for UDA. The paper's fully and weakly supervised tables use other hosts (e.g. SPGNet,
OCRNet) and are not reproduced here.
Logged losses: seg_src (CE of the main output, part of mea_seg), mea_seg, mea_cls, sr_l, sr_f (sr_l and sr_f
are logged during the warm-up too, but only optimised after it).
Docs: README.md, section "Methods".
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

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
from common.runlog import RunLog, param_counts
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir, unwrap

SCRIPT = "self_regulation"


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
    """paper: source_only.py's GTA5 recipe (AdaptSegNet's schedule) plus SR-SS's loss weights and exits; no UDA
    recipe is published; quick: CPU-sized run on the toy domains (explicit flags override it)"""
    backbone: str = "resnet101"
    """DeepLab-v2 backbone: resnet18, resnet34, resnet50 or resnet101 (paper: resnet101)"""
    init: str = "imagenet"
    """imagenet (torchvision weights), none (random) or a local file (DeepLab init .pth or our checkpoint)"""
    iters: int = 150000
    """training iterations (paper: 150k)"""
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
    """file to evaluate with --eval-only: one of our checkpoints (its plain DeepLab-v2) or a DeepLab-v2 release"""
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
    """input normalisation; auto: what the weights imply (caffe, BGR mean only, for the DeepLab-v2 Caffe files such
    as SR-SS's init; imagenet for torchvision weights)"""
    multi_level: bool = False
    """add the auxiliary classifier on layer3 (weight lambda_seg_aux), as the multi-level methods do"""
    lambda_seg_aux: float = 0.1
    """weight of the auxiliary segmentation loss, with --multi-level (AdaptSegNet: 0.1)"""
    aspp_branches: int = 4
    """ASPP branches summed: 4 (ADVENT, BDL, SR-SS) or 2 (AdaptSegNet's released code)"""
    stride_on: Literal["auto", "1x1", "3x3"] = "auto"
    """conv holding layer2.0's stride: 1x1 (Caffe DeepLab-v2 layout), 3x3 (torchvision); auto: where the loaded
    weights expect it (3x3 for torchvision weights, else 1x1)"""
    bn_mode: Literal["train", "eval"] = "train"
    """BN statistics: batch statistics (train, the UDA scripts' recipe) or running statistics (eval; the exits'
    BNs too, which then stay at mean 0 / variance 1 as in the SR-SS demo's net.eval()); backbone BN affine is
    frozen, the exits' trains"""
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
    lambda_mea_cls: float = 0.2
    """weight of MEA-cls, the image-level BCE summed over the 5 exits (official: 0.2)"""
    lambda_mea_seg: float = 0.8
    """weight of MEA-seg, the pixel CE summed over the 5 exits (official: 0.8)"""
    lambda_sr_l: float = 1.0
    """weight of SR-L, the main classifier teaching exits 1-4 (official: 1.0)"""
    lambda_sr_f: float = 1.0
    """weight of SR-F, the stem exit's prediction teaching the main output and exits 2-4 (official: 1.0)"""
    sr_start_iter: int = 10000
    """MEA-only warm-up: SR-L/SR-F join at this iteration; -1: a third of --iters (README: 10000; trainval.py: 0)"""
    sr_variant: Literal["official", "softened"] = "official"
    """official: hard argmax / sigmoid targets (SR-SS code); softened: tau^2*KL, our reading of the paper"""
    sr_temperature: float = 1.0
    """temperature tau of --sr-variant softened (not in the paper's code; project default 1.0)"""
    sr_resolution: Literal["full", "half"] = "full"
    """compute SR-F on maps at the input size (official) or half of it (saves memory)"""
    sr_f_skip_ignored: bool = False
    """leave pixels labelled 255 out of SR-F (official: all pixels count)"""
    exit_channels: int = 256
    """width of the two 3x3 convs of each side exit (official: 256)"""
    exit_lr_mult: float = 1.0
    """learning-rate multiplier of the side exits and the classifiers (official: 1)"""

    # to be filled in runtime
    world_size: int = field(default=0, metadata={"runtime": True})
    rank: int = field(default=0, metadata={"runtime": True})


PRESETS = {
    "paper": {},
    "quick": dict(source="toy-synth", target="toy-real", backbone="resnet18", init="none", iters=400, batch_size=4,
                  lr=0.0025, eval_every=0, checkpoint_every=100, num_workers=1, log_every=10, poly_horizon=None,
                  seed=0, source_size=[96, 192], target_size=[96, 192], sr_start_iter=-1, exit_channels=64),
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


def prepare_weights(args, ckpt_path, script, num_classes) -> Optional[dict]:
    """Read the file of --eval-only --weights or --init (not when resuming), apply the flags it implies
    (typed flags win), resolve --stride-on auto, print one line on what was recognised."""
    found = None
    if args.normalization == "auto":  # typed or not, auto means: what the file implies
        args.given = args.given - {"normalization"}
    if args.weights and not args.eval_only:
        raise UserError("--weights is read by --eval-only; to start training from a file use --init PATH")
    if args.eval_only:
        if len(args.weights) != 1:
            raise UserError("--eval-only needs exactly one --weights PATH")
        found = read_weights(args.weights[0], "--weights", script)
    elif ckpt_path:  # the network flags it was trained with; its normalisation comes back with the rest of its state
        found = read_weights(ckpt_path, "--resume", script)
        found["implied"].pop("normalization")
    elif args.init not in ("imagenet", "none"):
        found = read_weights(args.init)
    if found is not None and found.get("num_classes") not in (None, num_classes):
        raise UserError(f"{args.weights[0] if args.eval_only else ckpt_path or args.init} has "
                        f"{found['num_classes']} classes, this run has {num_classes}")
    if found is not None:
        found["applied"] = imply(args, found["implied"], found["kind"])
        quirks = {"aspp_branches": "{} ASPP branches", "multi_level": "multi-level: {}", "stride_on": "stride on {}",
                  "normalization": "{} input"}
        said = ", ".join(quirks[k].format(v) for k, v in found["applied"].items() if k in quirks)
        print(f"recognised {found['kind']}" + (f": {said}" if said else ""), flush=True)
    if args.stride_on == "auto":
        args.stride_on = "3x3" if args.init == "imagenet" else "1x1"
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
# ALGO LOGIC: side exits around the unchanged DeepLabV2 (SR-SS lib/models/deeplab.py ClassLayer)
class SideExit(nn.Module):
    """[3x3 conv -> width, BN, ReLU] x2, 1x1 conv -> C segmentation logits; GAP of them -> Linear(C, C)."""

    def __init__(self, in_channels, num_classes, width=256):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, num_classes, 1))
        self.classify = nn.Linear(num_classes, num_classes)

    def forward(self, features):
        seg = self.body(features)
        return seg, self.classify(seg.float().mean((2, 3)))  # GAP in fp32 under AMP


class ExitHeads(nn.Module):
    """The training-only parameters: exits on stem, layer1, layer2, layer3 and the main output's classifier.
    Their BNs train their affine parameters; bn_mode "eval" normalises with running statistics that never
    update (the demo's `net.eval()`: the exits' stay at mean 0, variance 1), "train" with batch statistics."""

    def __init__(self, backbone, num_classes, width=256, bn_mode="train"):
        super().__init__()
        block, _ = RESNETS[backbone]
        channels = (64, 64 * block.expansion, 128 * block.expansion, 256 * block.expansion)
        self.exits = nn.ModuleList(SideExit(c, num_classes, width) for c in channels)
        self.main_classify = nn.Linear(num_classes, num_classes)
        self.bn_mode = bn_mode
        self.train()

    def train(self, mode=True):
        super().train(mode)
        if self.bn_mode == "eval":
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


class MultiExit(nn.Module):
    """Runs the DeepLabV2's own submodules in the order of DeepLabV2.forward and taps the exits on the way.

    Returns (aux logits or None, [main, exit1..exit4] segmentation logits at their own resolution,
    [main, exit1..exit4] class logits). The main logits are exactly those of `model(x)[1]`."""

    def __init__(self, model, heads):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, x):
        m = self.model
        stem = F.relu(m.bn1(m.conv1(x)))
        f1 = m.layer1(m.maxpool(stem))
        f2 = m.layer2(f1)
        f3 = m.layer3(f2)
        aux = m.aux_head(f3) if m.aux_head is not None else None
        main = m.head(m.layer4(f3))
        segs, cls = [main], [self.heads.main_classify(main.float().mean((2, 3)))]
        for side_exit, features in zip(self.heads.exits, (stem, f1, f2, f3)):
            seg, logits = side_exit(features)
            segs.append(seg)
            cls.append(logits)
        return aux, segs, cls


def upsample(logits, size):
    """fp32 logits bilinearly resized to `size` (align_corners=True, as every DLv2 output here)."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=True)


def present_classes(labels, num_classes):
    """(B, C) multi-hot vector of the classes present in each label map; 255 is left out."""
    index = torch.where(labels == 255, num_classes, labels).flatten(1)
    hot = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    return hot.scatter_(1, index, 1.0)[:, :num_classes]


def mea_seg_losses(maps, labels):
    """Pixel CE of each exit (maps at label size), mean over valid pixels; MEA-seg is their sum."""
    valid = (labels != 255).sum().clamp(min=1)
    return [F.cross_entropy(m, labels, ignore_index=255, reduction="sum") / valid for m in maps]


def mea_cls_loss(cls_logits, labels, num_classes):
    """MEA-cls: sum over exits of BCE(sigmoid(cls_k), classes present in the label), mean over B x C."""
    target = present_classes(labels, num_classes)
    return sum(F.binary_cross_entropy_with_logits(c.float(), target) for c in cls_logits)


def bernoulli_kl(teacher_logits, student_logits):
    """Mean over entries of KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s)))."""
    p = torch.sigmoid(teacher_logits)
    return (p * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
            + (1 - p) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits))).mean()


def sr_l_loss(cls_logits, variant="official", tau=1.0):
    """SR-L, deep to shallow at image level: the main classifier's detached probabilities teach exits 1-4."""
    teacher = cls_logits[0].detach().float()
    if variant == "official":
        return sum(F.binary_cross_entropy_with_logits(c.float(), torch.sigmoid(teacher)) for c in cls_logits[1:])
    return sum(tau ** 2 * bernoulli_kl(teacher / tau, c.float() / tau) for c in cls_logits[1:])


def sr_f_loss(maps, variant="official", tau=1.0, valid=None):
    """SR-F, shallow to deep at pixel level: exit 1 (the stem) teaches the main output and exits 2-4.

    maps: the 5 fp32 maps at one resolution; valid: optional (B, H, W) bool mask of the pixels that count."""
    teacher = maps[1].detach()
    students = [maps[0], *maps[2:]]
    count = valid.sum().clamp(min=1) if valid is not None else teacher[:, 0].numel()
    if variant == "official":
        target = teacher.argmax(1)
        if valid is not None:
            target = target.masked_fill(~valid, 255)
        return sum(F.cross_entropy(s, target, ignore_index=255, reduction="sum") for s in students) / count
    log_p = F.log_softmax(teacher / tau, 1)
    kl = sum((log_p.exp() * (log_p - F.log_softmax(s / tau, 1))).sum(1) for s in students)
    if valid is not None:
        kl = kl * valid
    return tau ** 2 * kl.sum() / count


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the method's flags, checked before anything is built
def check_method_flags(args):
    """Resolve --sr-start-iter -1 (a third of --iters); refuse invalid values, and method flags typed for a training
    run that could not act there. Called after the weights file is read: it may imply --multi-level."""
    if args.sr_start_iter == -1:  # the quick preset: the MEA-only warm-up scales with the schedule
        args.sr_start_iter = args.iters // 3
    if args.sr_start_iter < 0 or args.sr_temperature <= 0 or args.exit_channels < 1:
        raise UserError("--sr-start-iter must be >= 0 (or -1), --sr-temperature > 0 and --exit-channels >= 1")
    if args.eval_only:  # evaluation trains nothing: the method's flags do not matter
        return
    sr_weighted = bool(args.lambda_sr_l or args.lambda_sr_f)
    if sr_weighted and args.sr_start_iter >= args.iters:
        raise UserError(f"--sr-start-iter {args.sr_start_iter} >= --iters {args.iters}: SR-L and SR-F would never be "
                        f"optimised; lower --sr-start-iter (or pass --lambda-sr-l 0 --lambda-sr-f 0 for MEA only)")
    idle = {"lambda_seg_aux": "without --multi-level (no aux head)",
            "sr_temperature": "with --sr-variant official (hard targets; --sr-variant softened uses it)"
            if args.sr_variant == "official" else None,
            "sr_resolution": "with --lambda-sr-f 0" if not args.lambda_sr_f else None,
            "sr_f_skip_ignored": "with --lambda-sr-f 0" if not args.lambda_sr_f else None}
    if args.multi_level:
        idle["lambda_seg_aux"] = None
    if not sr_weighted:
        idle.update({name: "with --lambda-sr-l 0 --lambda-sr-f 0 (no SR term is optimised)"
                     for name in ("sr_variant", "sr_temperature", "sr_start_iter", "sr_resolution",
                                  "sr_f_skip_ignored")})
    typed = [(name, why) for name, why in idle.items() if why and name in getattr(args, "given", ())]
    if typed:
        raise UserError(f"--{typed[0][0].replace('_', '-')}: no effect {typed[0][1]}")


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: one training iteration (main() calls it; tests/test_self_regulation.py checks it against a reference)
def train_step(model, optimizer, rt, images, labels, it, args):
    """One SGD step on a normalised source batch (trainval.py's loss; model: the (DDP-wrapped) MultiExit):
    lambda_mea_cls * MEA-cls + lambda_mea_seg * MEA-seg (+ lambda_seg_aux * CE(aux) with --multi-level), plus
    lambda_sr_l * SR-L + lambda_sr_f * SR-F from iteration args.sr_start_iter on (before it they are computed
    without gradient, for the log). The five maps are upsampled to the label size (SR-F: half of it with
    --sr-resolution half); the SR teachers are detached."""
    with rt.autocast():
        aux, segs, cls_logits = model(images)
    num_classes = segs[0].shape[1]
    maps = [upsample(s, labels.shape[-2:]) for s in segs]  # fp32 at input size
    seg_losses = mea_seg_losses(maps, labels)
    losses = {"seg_src": seg_losses[0], "mea_seg": sum(seg_losses),
              "mea_cls": mea_cls_loss(cls_logits, labels, num_classes)}
    if aux is not None:
        losses["seg_aux"] = seg_loss(aux, labels)
    sr_active = it >= args.sr_start_iter
    with torch.set_grad_enabled(sr_active):  # during the warm-up SR is only logged
        valid = labels != 255 if args.sr_f_skip_ignored else None
        if args.sr_resolution == "half":
            half = (labels.shape[-2] // 2, labels.shape[-1] // 2)
            sr_maps = [upsample(s, half) for s in segs]
            valid = upsample(valid[:, None].float(), half)[:, 0] > 0.5 if valid is not None else None
        else:
            sr_maps = maps
        losses["sr_l"] = sr_l_loss(cls_logits, args.sr_variant, args.sr_temperature)
        losses["sr_f"] = sr_f_loss(sr_maps, args.sr_variant, args.sr_temperature, valid)
    loss = (args.lambda_mea_cls * losses["mea_cls"] + args.lambda_mea_seg * losses["mea_seg"]
            + args.lambda_seg_aux * losses.get("seg_aux", 0.0))
    if sr_active:
        loss = loss + args.lambda_sr_l * losses["sr_l"] + args.lambda_sr_f * losses["sr_f"]
    optimizer.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
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
    found = prepare_weights(args, ckpt_path, SCRIPT, num_classes)  # the --init/--weights file and what it implies
    check_method_flags(args)  # after the file, which may imply --multi-level
    model = DeepLabV2(args.backbone, num_classes, args.multi_level, args.aspp_branches, args.bn_mode, args.stride_on)
    norm = load_init(model, args.init, args.backbone, found) if not (ckpt_path or args.eval_only or args.dry_run) \
        else None
    exits = ExitHeads(args.backbone, num_classes, args.exit_channels, args.bn_mode)
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    exits.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    exit_group = {"params": list(exits.parameters()), "lr": args.lr * args.exit_lr_mult, "lr_mult": args.exit_lr_mult}
    optimizer = torch.optim.SGD(model.param_groups(args.lr, args.head_lr_mult) + [exit_group], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    networks = {"model": model, "exits": exits}

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
        load_matching(exits, ckpt["exits"], f"--resume {ckpt_path} (exits)", required=lambda k: True,
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
            summary = evaluate_target(lambda x: model(to_input(x))[1], target_val, rt, align_corners=True, log=log,
                                      num_predictions=args.num_predictions if final else 0, limit=args.eval_limit,
                                      eval_size=eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19,
                                      save_dir=args.save_predictions if final else None, num_workers=args.num_workers)
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
                "exits": exits.state_dict()})

    # ALGO LOGIC: data
    source_train = domain_split(args.source, "train", args.data_root, synthia_classes=args.synthia_classes)
    source_transform = TrainTransform(size=args.source_size or source_train.paper_size, crop=args.crop_size)
    per_rank_batch = args.batch_size // rt.world
    source_batches = train_loader(SegDataset(source_train, source_transform), per_rank_batch, args.seed, start_iter,
                                  rt.rank, rt.world, num_workers=args.num_workers, pin_memory=rt.device.type == "cuda")
    train_model = rt.wrap(MultiExit(model, exits))  # the exits exist only in training

    # TRY NOT TO MODIFY: training loop
    running = {}
    log.start_loop(start_iter)
    progress = tqdm(range(start_iter, args.iters), initial=start_iter, total=args.iters, disable=not rt.is_main,
                    desc=SCRIPT, dynamic_ncols=True)
    for it in progress:
        lr = poly_lr(args.lr, it, args.poly_horizon, args.poly_power)
        set_lr(optimizer, lr)

        # ALGO LOGIC: one iteration
        images, labels, _ = next(source_batches)
        labels = labels.to(rt.device, non_blocking=True).long()
        losses = train_step(train_model, optimizer, rt, to_input(images), labels, it, args)

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
