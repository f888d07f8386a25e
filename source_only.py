"""Source-only DeepLab-v2: train on labelled source frames, evaluate on the target's val split.

The lower bound every UDA method is measured against, and the file every method script is a diff of.
Recipe (AdaptSegNet's schedule; there is no official source-only script): DeepLab-v2 ResNet-101
(Caffe-style strides, layer3/layer4 dilated 2/4, output stride 8, ASPP 6/12/18/24 summed), frozen BN
affine with batch statistics, SGD 2.5e-4 (heads x10), momentum 0.9, wd 5e-4, poly 0.9 with horizon
250k stopped at 150k, batch 1, GTA5 resized to 1280x720 (SYNTHIA 1280x760), evaluation at 1024x512
with logits upsampled to the full 2048x1024 labels (align_corners=True). `--source cityscapes` is the
oracle. Reported: 36.6 mIoU GTA5->Cityscapes (AdaptSegNet paper), 33.6 (BDL paper).

Deviations from the official DeepLab-v2 code (AdaptSegNet `model/deeplab_multi.py`):
- init: torchvision ImageNet ResNet weights (`--init imagenet`, torchvision's IMAGENET1K_V1) instead of
  the ImageNet+COCO Caffe file; that file, ADVENT's ImageNet file and the authors' released models load
  with `--init PATH` / `--eval-only --weights PATH`, recognised by their content (read_weights), with the
  input normalisation and ASPP quirk they imply.
- stride placement: torchvision's weights were trained with layer2.0's stride on its 3x3 conv, the Caffe
  layout (and every official DeepLab-v2 file) puts it on the 1x1; `--stride-on auto` puts it where the
  loaded weights expect it (3x3 for torchvision weights, 1x1 for Caffe files, releases and random init).
- ASPP sums all 4 branches (`--aspp-branches 2` reproduces AdaptSegNet's return-inside-loop quirk).
- Mixed precision: on CUDA the forward and backward passes run under bf16 autocast (fp16 with a
  GradScaler where bf16 is missing) with TF32 matmuls by default; the paper trained in fp32 (`--no-amp`
  gives fp32). Losses, softmax and the evaluation upsampling and argmax are computed in fp32.
- Resizing: images bicubic (PIL), as the official loader; labels nearest.
- `--batch-size` is the global batch; under torchrun it is split over the processes (one seeded sample
  stream, rank r takes every world-th sample: 2 processes x batch 1 see what 1 process x batch 2 sees).
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

SCRIPT = "source_only"


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
    multi_level: bool = False
    """add the auxiliary classifier on layer3 (weight lambda_seg_aux), as the multi-level methods do"""
    lambda_seg_aux: float = 0.1
    """weight of the auxiliary segmentation loss, with --multi-level (AdaptSegNet: 0.1)"""
    aspp_branches: int = 4
    """ASPP branches summed: 4 (ADVENT, BDL) or 2 (AdaptSegNet's released code)"""
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
    """poly schedule horizon T in lr*(1-t/T)^power; none: the run length (--iters). Paper: 250k, a separate number
    from the iterations (it stays when --iters changes)"""
    poly_power: float = 0.9
    """poly schedule power (paper: 0.9)"""

    # Algorithm specific arguments (none: the baseline)

    # to be filled in runtime
    world_size: int = field(default=0, metadata={"runtime": True})
    rank: int = field(default=0, metadata={"runtime": True})


PRESETS = {
    "paper": {},
    "quick": dict(source="toy-synth", target="toy-real", backbone="resnet18", init="none", iters=400, batch_size=4,
                  lr=0.0025, eval_every=0, checkpoint_every=100, num_workers=1, log_every=10, poly_horizon=None,
                  seed=0, source_size=[96, 192], target_size=[96, 192]),
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
# ALGO LOGIC: one training iteration (main() calls it; tests/test_source_only.py checks it against a reference)
def train_step(model, optimizer, rt, images, labels, lambda_seg_aux):
    """One SGD step on a normalised source batch: CE(main) + lambda_seg_aux * CE(aux) (aux: --multi-level)."""
    with rt.autocast():
        aux, main = model(images)
    losses = {"seg_src": seg_loss(main, labels)}
    if aux is not None:
        losses["seg_aux"] = seg_loss(aux, labels)
    loss = losses["seg_src"] + lambda_seg_aux * losses.get("seg_aux", 0.0)
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
    model = DeepLabV2(args.backbone, num_classes, args.multi_level, args.aspp_branches, args.bn_mode, args.stride_on)
    norm = load_init(model, args.init, args.backbone, found) if not (ckpt_path or args.eval_only or args.dry_run) \
        else None
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    optimizer = torch.optim.SGD(model.param_groups(args.lr, args.head_lr_mult), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    networks = {"model": model}

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
                "optimizer": optimizer.state_dict(), "scaler": rt.scaler.state_dict(), "rng": rng_state()})

    # ALGO LOGIC: data
    source_train = domain_split(args.source, "train", args.data_root, synthia_classes=args.synthia_classes)
    source_transform = TrainTransform(size=args.source_size or source_train.paper_size, crop=args.crop_size)
    per_rank_batch = args.batch_size // rt.world
    source_batches = train_loader(SegDataset(source_train, source_transform), per_rank_batch, args.seed, start_iter,
                                  rt.rank, rt.world, num_workers=args.num_workers, pin_memory=rt.device.type == "cuda")
    train_model = rt.wrap(model)

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
        losses = train_step(train_model, optimizer, rt, to_input(images), labels, args.lambda_seg_aux)

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
