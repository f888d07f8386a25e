"""LSD-seg: align the domains in image space with a generator on the segmentation embedding (FCN-8s + G + D).

Sankaranarayanan, Balaji, Jain, Lim, Chellappa, "Learning from Synthetic Data: Addressing Domain Shift for
Semantic Segmentation", CVPR 2018, https://arxiv.org/abs/1711.06969, official code
https://github.com/swamiviv/LSD-seg (PyTorch 0.2, commit e373e89: code/torchfcn/models/fcn8s_LSD.py,
model_utils.py, trainer_LSD.py, datasets/segmentation_datasets.py, code/train.py, eval_cityscapes.py).
Recipe (source_only.py plus the method; the network is not DeepLab-v2 but VGG-16 FCN-8s):
- F + C: VGG-16 FCN-8s (conv1_1 padding 100, fc6 7x7 512->4096 and fc7 1x1 4096->4096 with ReLU and
  Dropout2d 0.5, score layers on fc7/pool4/pool3, crops at 5/9/31, bilinear deconvolutions without bias that
  are never trained, no pool3/pool4 scaling). F returns the embedding (fc7, pool4, pool3) and C's scores.
- G (ngf 64, no noise input): ConvT(fc7 -> 4ngf, k7), ConvT(-> 8ngf, k3 s2 p1); concat pool4, ConvT(-> 4ngf,
  k3 s2 p1); concat pool3, ConvT(-> 2ngf, k5 s2 p2), ConvT(-> ngf, k5 s2 p2); each followed by InstanceNorm,
  ReLU and 2 residual blocks x + Dropout(0.5)(act(IN(conv3x3 x))) (the dropout replaces noise); output
  ConvT(ngf -> 3, k8 s2 p100) + Sigmoid, an image in [0, 1].
- D: Conv(3 -> 2ndf, k4 s2 p2), IN, LeakyReLU 0.2, [3 residual blocks, MaxPool 2] x 2, 3 residual blocks (about
  1/8 of the input); head out_s: 3x3 conv to 4 classes per cell (0 source-real, 1 source-fake, 2 target-real,
  3 target-fake), head out_c: 3x3 conv to the segmentation classes, trained with nearest-downsampled source
  labels. D sees images in [0, 1]. G and D: conv weights N(0, 0.02), biases U(-0.01, 0.01).
- One iteration (1 source + 1 target frame), x_hat = G(F(x)):
  1. D: CE(D_s(x_s), src-real) + CE(D_s(x_hat_s), src-fake) + CE(D_c(x_s), y_s) + CE(D_s(x_t), tgt-real)
        + CE(D_s(x_hat_t), tgt-fake), on detached fakes;
  2. G: CE(D_c(x_hat_s), y_s) + 0.1 [CE(D_s(x_hat_s), src-real) + CE(D_s(x_hat_t), tgt-real)]
        + 1.0 [L1(x_hat_s, x_s) + L1(x_hat_t, x_t)]   (the 0.1 is hard-coded in the official code);
  3. F and C: CE_seg + 0.1 [CE(D_s(x_hat_s), tgt-real) + CE(D_s(x_hat_t), src-real)] + 0.1 CE(D_c(x_hat_s), y_s)
     (the cross-domain term: source embeddings must look target-real, target ones source-real).
- Optimisers: F and C Adam 1e-5, betas (0.9, 0.999), biases 2x lr, no weight decay, x0.1 every 8 epochs
  (`--lr-step-epochs`, poly power 0; trainer_LSD.py:354-359); an epoch is the shorter of the two loaders in
  batches (trainer_LSD.py:181-195): the 2,975 Cityscapes frames, so at batch 1 the steps fall at 23,800,
  47,600, 71,400 and 95,200 iterations (at batch B: every 8 x ceil(2,975 / B)). G and D Adam 1e-4, betas
  (0.7, 0.999), constant (train.py:109-110; the paper says 2e-4, the code's `lrd = 0.0002` is never used).
  100k iterations, batch 1, seed 1337.
- Data (segmentation_datasets.py, training branches): random 640x320 crops. GTA5 resized to width 1280 with
  its aspect kept (1914x1052 -> 1280x703, height truncated, :327-334), crops re-drawn until they hold a
  labelled pixel (:338-351); SYNTHIA at native 1280x760 (:254-262); Cityscapes at native 2048x1024 with a
  50-px buffer (:420-427). The official crop corner is np.random.randint(0, H - crop [- 50]), upper bound
  excluded, so the last row and column (GTA5, SYNTHIA) or the last 51 (Cityscapes) never enter a crop; here
  those are trimmed before a uniform crop: the same set of crop positions. Source frames: the official
  train lists (data/filelist/*_train.txt), which hold out LSD-seg's source-val frames: GTA5 23,937 of
  24,966 (ids 1-23999 except 15188, 17705 and 20801-20860; errata.txt logs size errors in 20801-20860), SYNTHIA
  9,300 of 9,400 (ids 0-9299). We report the final checkpoint and never use the held-out frames; they are
  left out only so that the training set is the official one (`--no-source-val-holdout` trains on all).
- Evaluation (eval_cityscapes.py:90-137): the val image Lanczos-resized to 640x320 (segmentation_datasets.py
  :429), the argmax taken there, and the label map nearest-resized (PIL) to 2048x1024
  (`--eval-upsample nearest`; the other scripts upsample logits bilinearly: `--eval-upsample bilinear`).
  SYNTHIA: a 19-way head, reported over 16 classes (protocol b, `miou16`).
Reported (paper, VGG-16 FCN-8s): GTA5->Cityscapes 37.1 mIoU; SYNTHIA->Cityscapes 36.1 (16 classes).

Loss reduction (issue 4): the official code SUMS every cross-entropy over pixels / D cells
(size_average=False), takes the L1 terms as MEANS over elements, and divides each objective by the batch
size. Summing over the 204,800 pixels of a 640x320 crop makes the segmentation term dominate, so the
published weights only mean something together with that reduction. Here every objective is the official
one divided by the constant number of input pixels H*W (Adam is invariant to such a constant): the
segmentation CE is the shared seg_loss (mean over valid pixels = official sum / valid pixels; equal up to
the fraction of ignored pixels), a CE on a D map of h*w cells enters as its mean over cells (ignored cells
count 0) times h*w/(H*W) (1/64 at D's stride 8), and an L1 term as its mean times 1/(H*W). With these
factors the published weights (adv 0.1, c 0.1, G-internal 0.1, l1 1.0) are used unchanged and keep their
official relative scale. metrics.jsonl logs the per-cell means (ignored cells count 0) and the plain mean
L1, before these factors and before the weights.
The L1 reconstruction term is in effect off, in the official reduction as here (both reductions divide
every term by constants, so the ratio is the same): a mean over 3HW elements beside CE sums over D's cells,
its gradient norm on G is 2.7e-5 of G's total at 640x320 (paper widths, at initialisation) and 1.5e-3 at
96x192 (quick preset, iteration 100) (benchmarks/lsdseg_grad_ratio.py, benchmarks/lsdseg.md), so G is driven
by D's class head and real/fake terms; `--l1-weight` keeps the published 1.0 and reproduces that.

Update order on current PyTorch (train_step; tests/test_lsdseg.py checks it against a hand-written step): the
official code backpropagates L_G and L_F through graphs whose D (and G) had already been stepped, which current
PyTorch refuses (in-place modification of saved weights).
Here F runs once per domain; G runs on the detached embedding for the D and G steps; D is re-run after its own
step for L_G; after the G step, G and D are re-run (frozen, requires_grad off) on the kept embedding to build
L_F; each step changes only its own network and each backward reaches only the network it steps.

Weights files (no LSD-seg model was released; released-models.md). `--init PATH`, `--eval-only --weights PATH`
and `--resume` files are recognised by their content (read_fcn_weights), the flags they imply are applied unless
typed (a typed flag wins, with a warning), one line says what was recognised, and every tensor of F is loaded
or listed:
- LSD-seg's init `vgg16_from_caffe.pth` (md5 aa75b158..., fetched by the official code through the `fcn`
  package) is a torchvision VGG-16 state dict (torchfcn/models/vgg.py:9-24) converted from Caffe: it expects
  Caffe input (BGR 0-255 minus the means, segmentation_datasets.py:35,50-51). Its keys and shapes are those of
  torchvision's own ImageNet VGG-16 (`vgg16-397923af.pth`, ImageNet input), so the two published files are told
  apart by their digests; any other file of this layout is taken as Caffe-trained (it is what `--init PATH` is
  for; torchvision's weights are `--init imagenet`) and `--normalization imagenet` says otherwise.
- an official LSD-seg training checkpoint (trainer_LSD.py:160-167: F's torchfcn names conv1_1 ... fc7, score_*,
  upscore* under 'model_state_dict', with a numpy `best_mean_iu`), or F's bare state dict: eval_cityscapes.py
  :111-115 accepts both, and so do `--eval-only --weights` and `--init`; Caffe input, 19 classes. G and D are
  not in it (nor needed to evaluate). The paper preset's evaluation is already eval_cityscapes.py's.
- our checkpoints: F, its normalisation and the network flags it was trained with (backbone; G/D width for
  --resume and --eval-only).
Python 2 pickles (the official code is Python 2) need common.checkpoint.read_weights_file to decode their byte
strings as latin1 (requested of its owner; until then such a file gives one `error:` line naming the codec).

Deviations from the official code:
- init: torchvision ImageNet VGG-16 (`--init imagenet`, classifier.0/classifier.3 reshaped into fc6/fc7)
  with ImageNet normalisation, instead of the Caffe VGG-16 with BGR means (`--init vgg16_from_caffe.pth` loads
  the official one with Caffe input, above); D sees RGB in [0, 1] (official: BGR).
- Mixed precision: on CUDA the forward and backward passes run under bf16 autocast (fp16 with a GradScaler
  where bf16 is missing) with TF32 matmuls by default; the paper trained in fp32 (`--no-amp` gives fp32).
  Losses (every CE and L1 term, their scale factors and sums) and the evaluation argmax and upsampling are
  computed in fp32.
- Resizing: images Lanczos (PIL), as the official loaders, for training and evaluation; labels nearest. The
  official GTA5 loader resizes labels with LANCZOS too (:334, a bug that blends class ids); here they are
  resized with nearest. D's class-head labels: nearest-exact sampling (PIL NEAREST, as the official code).
- Sampling: one seeded permutation of all source frames after another (official: both loaders restart at
  every target epoch, so each epoch draws a fresh 2,975 of the source frames); the official loop also runs
  one extra iteration (it stops after iteration 100,000, counted from 0).
- The L1 terms are not divided by the batch size (official: mean over the batch, then / batch size again).
- Model selection: the final checkpoint is evaluated (official: best source-val mIoU every 500 iterations).
- G crops or zero-pads its upsampled maps to the skip and input sizes; with H and W multiples of 32 (640x320,
  96x192) the sizes already agree, as in the official code, and nothing is cropped or padded.
- No DDP wrapper (three networks, several forwards and backwards each): every step's gradients are averaged
  over the torchrun processes with one all_reduce. `--batch-size` is the global batch (source; as many target;
  the official target loader has batch 1 and its code runs only at batch 1).
- `--preset quick` (toy domains, CPU): source_only.py's shared values (400 iterations, batch 4, seed 0, poly
  0.9 over 400, 96x192 frames) with `vgg16_small` (all VGG channels / 8, fc6/fc7 512 wide) and G/D at
  width 8 (`--gan-width`, official 64) from random init (`--init none`), Adam 3e-4 for F and C (1e-5 is meant
  for fine-tuning ImageNet weights), no crop, no step decay, evaluation at the training size with bilinear
  logits like the other scripts (`--eval-upsample bilinear`, so the toy comparison shares one protocol)
  (benchmarks/lsdseg.md), and 10x the published weights of F's adaptation terms (`--adv-weight 1 --c-weight
  1`): with the official reduction the published 0.1 gives F an adaptation gradient of 0.6-2 % of its
  segmentation gradient, too small to act within 400 iterations; 10x gives 6-20 % at iteration 400, the band
  adaptsegnet.py's quick preset uses (0.2 % at iteration 100, while the CE gradient is still large;
  benchmarks/lsdseg_grad_ratio.py, benchmarks/lsdseg.md). G's weights stay the published ones. `--preset
  paper` keeps 0.1 / 0.1.
`--adv-weight 0 --c-weight 0` trains the same F + C on source only (G and D are skipped).
Docs: README.md, section "Methods"; benchmarks/lsdseg.md.
"""
import dataclasses
import hashlib
import math
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
from common.data import (SegDataset, class_setup, domain_split, normalize, random_crop, resize_image, resize_label,
                         resize_pair, train_loader)
from common.metrics import evaluate_target
from common.runlog import RunLog, param_counts
from common.runtime import Runtime, resolve_out_dir, seed_everything, share_run_dir, unwrap

SCRIPT = "lsdseg"


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
    """FCN-8s backbone: vgg16 (paper) or vgg16_small (channels /8, fc6/fc7 512 wide, for CPU runs)"""
    init: str = "imagenet"
    """imagenet (torchvision VGG-16, ImageNet input), none (random) or a file recognised by its content: a torchvision-
    layout VGG-16 such as LSD-seg's vgg16_from_caffe.pth (Caffe input; torchvision's own vgg16 file, known by its
    digest, ImageNet input), an official LSD-seg checkpoint, or one of our checkpoints (header, "Weights files")"""
    iters: int = 100000
    """training iterations (official: 100k)"""
    batch_size: int = 1
    """global source batch, split over torchrun processes (paper: 1)"""
    crop_size: Optional[list[int]] = field(default_factory=lambda: [320, 640])
    """random crop H [W] after resizing; none trains on whole resized frames (official: 320 640)"""
    lr: float = 1e-5
    """Adam learning rate of F and C; biases use bias_lr_mult times it (official: 1e-5)"""
    seed: int = 1337
    """seed of every random choice (official: 1337)"""
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
    """file to evaluate with --eval-only: one of our checkpoints or an official LSD-seg training checkpoint
    (model_state_dict of checkpoint.pth.tar / model_best.pth.tar, or the bare state dict); no model was released"""
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
    """resize source frames to H W; none: the official loader's size (GTA5 1280 wide with its aspect kept, 1280x703;
    SYNTHIA, Cityscapes and other domains native)"""
    target_size: Optional[list[int]] = field(default_factory=lambda: [1024, 2048])
    """resize target frames to H W for training (official: Cityscapes at full resolution, 1024 2048)"""
    eval_size: Optional[list[int]] = field(default_factory=lambda: [320, 640])
    """evaluation input H W, Lanczos-resized (official: 320 640); none: the training size"""
    eval_limit: Optional[int] = None
    """score only the first N target val images (default: all)"""
    num_predictions: int = 4
    """colour-coded target-val predictions saved to predictions/ at the end"""
    synthia_classes: int = 19
    """classes of the head when the source is SYNTHIA: 19 (evaluated on 16/13) or 16"""
    normalization: Literal["auto", "imagenet", "caffe"] = "auto"
    """input normalisation of F; auto: what the weights imply (caffe, BGR mean only, for official LSD-seg checkpoints and
    torchvision-layout VGG-16 files such as vgg16_from_caffe.pth, except torchvision's own, known by its digest;
    imagenet for --init imagenet and none; our checkpoints their own). The keys cannot tell a Caffe-converted VGG-16
    from an ImageNet-normalised one: type imagenet for such a file"""
    weight_decay: float = 0.0
    """Adam weight decay of F and C (official: 0; its SGD option uses 5e-4)"""
    poly_horizon: Optional[int] = None
    """poly schedule horizon T in lr*(1-t/T)^power; none: the run length (--iters); unused with power 0"""
    poly_power: float = 0.0
    """poly schedule power; 0 keeps the lr constant (official: constant, with the step decay of lr_step_every)"""

    # Algorithm specific arguments
    bias_lr_mult: float = 2.0
    """learning-rate multiplier of F's and C's biases (official: 2)"""
    lr_step_epochs: int = 8
    """multiply F's and C's lr by 0.1 every N epochs of the shorter loader (2,975 Cityscapes frames / batch), 0: never
    (official: 8)"""
    lr_gan: float = 1e-4
    """constant Adam learning rate of G and D (official code: 1e-4; the paper says 2e-4)"""
    beta1_gan: float = 0.7
    """Adam beta1 of G and D (official: 0.7; beta2 0.999)"""
    gan_width: int = 64
    """ngf of G and ndf of D (D's trunk has 2 ndf channels) (official: 64)"""
    adv_weight: float = 0.1
    """weight of F's cross-domain adversarial term (official: 0.1; quick: 10x, header)"""
    c_weight: float = 0.1
    """weight of F's auxiliary class term CE(D_c(G(F(x_s))), y_s) (official: 0.1; quick: 10x, header)"""
    g_adv_weight: float = 0.1
    """weight of G's real/fake term (official: 0.1, hard-coded)"""
    l1_weight: float = 1.0
    """weight of G's L1 reconstruction terms, in official units (mean L1 / input pixels; official: 1.0)"""
    eval_upsample: Literal["nearest", "bilinear"] = "nearest"
    """nearest: argmax at --eval-size, label map nearest-resized to the label size (official eval_cityscapes.py);
    bilinear: logits upsampled bilinearly, then argmax (the other scripts)"""
    source_val_holdout: bool = True
    """train on the official source train lists only (GTA5 23,937, SYNTHIA 9,300 frames; header); --no-...: all"""

    # to be filled in runtime
    world_size: int = field(default=0, metadata={"runtime": True})
    rank: int = field(default=0, metadata={"runtime": True})


PRESETS = {
    "paper": {},
    "quick": dict(source="toy-synth", target="toy-real", backbone="vgg16_small", init="none", iters=400, batch_size=4,
                  lr=3e-4, eval_every=0, checkpoint_every=100, num_workers=1, log_every=10, poly_horizon=None,
                  seed=0, source_size=[96, 192], target_size=[96, 192],
                  # method-specific (header): source_only's poly schedule, no crop, small G and D
                  poly_power=0.9, lr_step_epochs=0, crop_size=None, eval_size=None, gan_width=8,
                  adv_weight=1.0, c_weight=1.0, eval_upsample="bilinear"),
}


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: VGG-16 FCN-8s (F + C), generator G and discriminator D (official fcn8s_LSD.py, model_utils.py)
VGG_WIDTHS = {"vgg16": ((64, 128, 256, 512, 512), 4096),  # conv stages, fc6/fc7
              "vgg16_small": ((8, 16, 32, 64, 64), 512)}
SCORE_CROPS = (5, 9, 31)  # Caffe FCN-8s offsets of score_pool4, score_pool3 and the output (conv1_1 padding 100)


def bilinear_kernel(channels, kernel_size):
    """ConvTranspose2d weight that upsamples each channel bilinearly on its own (FCN's get_upsampling_weight)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt[:, None] * filt[None, :]
    return weight.float()


def crop_to(x, offset, reference):
    return x[:, :, offset:offset + reference.shape[2], offset:offset + reference.shape[3]]


class FCN8s(nn.Module):
    """forward returns ((fc7, pool4, pool3), scores at the input size), like DeepLabV2's (aux, main).

    `features` keeps torchvision's vgg16 indices (pool3 = index 16, pool4 = 23, pool5 = 30), so ImageNet weights
    load by name; conv1_1 pads by 100 (Caffe FCN), fc6 is a 7x7 conv without padding."""

    def __init__(self, backbone="vgg16", num_classes=19):
        super().__init__()
        if backbone not in VGG_WIDTHS:
            raise UserError(f"unknown backbone '{backbone}': use one of {', '.join(VGG_WIDTHS)}")
        widths, fc_width = VGG_WIDTHS[backbone]
        layers, channels = [], 3
        for stage, (width, convs) in enumerate(zip(widths, (2, 2, 3, 3, 3))):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=100 if not layers else 1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.embedding_channels = (fc_width, widths[3], widths[2])  # fc7, pool4, pool3
        self.fc6 = nn.Conv2d(channels, fc_width, 7)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.dropout = nn.Dropout2d(0.5)
        self.score_fr = nn.Conv2d(fc_width, num_classes, 1)
        self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, 8, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init for a random start (the official zeros are overwritten by VGG)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):  # fixed bilinear upsampling, never trained (official)
                m.weight.data.copy_(bilinear_kernel(num_classes, m.kernel_size[0]))
                m.weight.requires_grad_(False)
        for score in (self.score_fr, self.score_pool4, self.score_pool3):  # the score layers start at 0 (official)
            nn.init.zeros_(score.weight)

    def forward(self, x):
        pool3 = self.features[:17](x)
        pool4 = self.features[17:24](pool3)
        h = self.dropout(F.relu(self.fc6(self.features[24:](pool4))))
        fc7 = self.dropout(F.relu(self.fc7(h)))
        upscore2 = self.upscore2(self.score_fr(fc7))
        upscore_pool4 = self.upscore_pool4(upscore2 + crop_to(self.score_pool4(pool4), SCORE_CROPS[0], upscore2))
        h = upscore_pool4 + crop_to(self.score_pool3(pool3), SCORE_CROPS[1], upscore_pool4)
        return (fc7, pool4, pool3), crop_to(self.upscore8(h), SCORE_CROPS[2], x).contiguous()

    def param_groups(self, lr, bias_lr_mult):
        """Weights at lr, biases at bias_lr_mult x lr (official get_parameters); the deconvolutions stay out."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if not n.endswith("bias")], "lr": lr, "lr_mult": 1.0},
                {"params": [p for n, p in named if n.endswith("bias")], "lr": lr * bias_lr_mult,
                 "lr_mult": bias_lr_mult}]


class ResBlock(nn.Module):
    """x + Dropout(0.5)(act(InstanceNorm(conv3x3(x)))) (official model_utils.ResnetBlock; in G the dropout stands
    in for the noise input)."""

    def __init__(self, channels, bias=True, leaky=False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.norm = nn.InstanceNorm2d(channels)
        self.leaky = leaky

    def forward(self, x):
        h = self.norm(self.conv(x))
        h = F.leaky_relu(h, 0.2) if self.leaky else F.relu(h)
        return x + F.dropout(h, 0.5, self.training)


def fit(x, size):
    """Crop (bottom/right) or zero-pad x to spatial `size` (a no-op when H, W are multiples of 32)."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh > 0 or dw > 0:
        x = F.pad(x, (0, max(dw, 0), 0, max(dh, 0)))
    return x[..., :size[0], :size[1]]


def gan_init(m):
    """Official weights_init of G and D: conv weights N(0, 0.02), conv biases U(-0.01, 0.01)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.uniform_(m.bias, -0.01, 0.01)


class Generator(nn.Module):
    """G: the image in [0, 1] from F's embedding (fc7, pool4, pool3), with the pool4/pool3 skips."""

    def __init__(self, embedding_channels, ngf=64):
        super().__init__()
        fc7_ch, pool4_ch, pool3_ch = embedding_channels

        def up(cin, cout, kernel, stride, padding):
            return [nn.ConvTranspose2d(cin, cout, kernel, stride, padding, bias=False), nn.InstanceNorm2d(cout),
                    nn.ReLU(inplace=True), ResBlock(cout, bias=False), ResBlock(cout, bias=False)]

        self.stage1 = nn.Sequential(*up(fc7_ch, ngf * 4, 7, 1, 0), *up(ngf * 4, ngf * 8, 3, 2, 1))
        self.stage2 = nn.Sequential(*up(ngf * 8 + pool4_ch, ngf * 4, 3, 2, 1))
        self.stage3 = nn.Sequential(*up(ngf * 4 + pool3_ch, ngf * 2, 5, 2, 2), *up(ngf * 2, ngf, 5, 2, 2))
        self.to_image = nn.ConvTranspose2d(ngf, 3, 8, 2, 100)
        self.apply(gan_init)

    def forward(self, embedding, size):
        fc7, pool4, pool3 = embedding
        h = fit(self.stage1(fc7), pool4.shape[-2:])
        h = fit(self.stage2(torch.cat([h, pool4], 1)), pool3.shape[-2:])
        return torch.sigmoid(fit(self.to_image(self.stage3(torch.cat([h, pool3], 1))), size))


class Discriminator(nn.Module):
    """D: per-cell 4-way domain x real/fake logits (out_s) and per-cell class logits (out_c), about 1/8 size."""

    def __init__(self, num_classes, ndf=64):
        super().__init__()
        ch = ndf * 2
        blocks = [ResBlock(ch, bias=True, leaky=True) for _ in range(9)]
        self.features = nn.Sequential(nn.Conv2d(3, ch, 4, 2, 2), nn.InstanceNorm2d(ch), nn.LeakyReLU(0.2, True),
                                      *blocks[:3], nn.MaxPool2d(2, 2), *blocks[3:6], nn.MaxPool2d(2, 2), *blocks[6:])
        self.out_s = nn.Conv2d(ch, 4, 3, padding=1)
        self.out_c = nn.Conv2d(ch, num_classes, 3, padding=1)
        self.apply(gan_init)

    def forward(self, image):
        h = self.features(image)
        return self.out_s(h), self.out_c(h)

    @staticmethod
    def output_size(size):
        """(h, w) of D's maps for an (H, W) image: the k4 s2 p2 conv gives H//2 + 1, then two floor max-pools."""
        return tuple((n // 2 + 1) // 4 for n in size)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: weights files (header, "Weights files"): recognised by content, mapped to FCN8s' names
def torchfcn_names() -> dict:
    """torchfcn's FCN-8s conv names (conv1_1 ... conv5_3, model_utils.py FCN8s) -> our `features` indices (torchvision
    VGG-16's: each conv is followed by a ReLU, each stage by a max-pool)."""
    names, index = {}, 0
    for stage, convs in enumerate((2, 2, 3, 3, 3), start=1):
        for conv in range(1, convs + 1):
            names[f"conv{stage}_{conv}"] = f"features.{index}"
            index += 2
        index += 1
    return names


def vgg_of(state) -> dict:
    """{"backbone": name} when the conv widths of an FCN-8s state dict (our names) match one of VGG_WIDTHS, else {}."""
    keys = [f"features.{i}.weight" for i in (0, 5, 10, 17, 24)] + ["fc6.weight"]
    if not all(k in state for k in keys):
        return {}
    widths = tuple(state[k].shape[0] for k in keys)
    names = [n for n, (convs, fc) in VGG_WIDTHS.items() if (*convs, fc) == widths]
    return {"backbone": names[0]} if names else {}


def from_torchvision_vgg(state) -> dict:
    """A torchvision VGG-16 state dict under FCN8s' names: `features.*` as they are, the fully connected classifier.0
    and classifier.3 reshaped into the fc6 (7x7) and fc7 (1x1) convolutions (official copy_params_from_vgg16), the
    1000-way ImageNet classifier.6 dropped (the score layers start at 0, as the official init)."""
    out = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    for fc, key, kernel in (("fc6", "classifier.0", 7), ("fc7", "classifier.3", 1)):
        weight = state.get(f"{key}.weight")
        if weight is not None and weight.dim() == 2 and weight.shape[1] % (kernel * kernel) == 0:
            out[f"{fc}.weight"] = weight.reshape(weight.shape[0], -1, kernel, kernel)  # else listed as missing
        if f"{key}.bias" in state:
            out[f"{fc}.bias"] = state[f"{key}.bias"]
    return out


# the two published torchvision-layout VGG-16 files: the same keys and shapes, different input conventions
VGG16_FILES = {
    ("md5", "aa75b158f4181e7f6230029eb96c1b13"): ("LSD-seg's vgg16_from_caffe.pth", "caffe"),  # torchfcn vgg.py:22
    ("sha256", "397923af"): ("torchvision's vgg16-397923af.pth", "imagenet"),  # torch.hub checks this prefix
}


def published_vgg16(path) -> Optional[tuple]:
    """(name, normalisation) of VGG16_FILES whose digest the file has, else None."""
    digests = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            for digest in digests.values():
                digest.update(chunk)
    return next((found for (algorithm, prefix), found in VGG16_FILES.items()
                 if digests[algorithm].hexdigest().startswith(prefix)), None)


def read_fcn_weights(path, flag="--init") -> dict:
    """Recognise an FCN-8s / VGG-16 weights file by its content (never its name) and map it to FCN8s' names.

    Returns {"kind": what it is, "state": tensors under our names, "implied": the flags it implies, "iter",
    "num_classes"}. Layouts (header, "Weights files"):
    - a checkpoint of this script (a "script" key): F, its normalisation, backbone and G/D width;
    - an official LSD-seg checkpoint: torchfcn's FCN8s_LSD (or FCN8s_sourceonly: the same names) state dict, under
      'model_state_dict' as trainer_LSD.py saves it or bare (eval_cityscapes.py:111-115); Caffe input;
    - a torchvision VGG-16 state dict (features.*, classifier.*): the init. Caffe input (LSD-seg's
      vgg16_from_caffe.pth) unless its digest says it is torchvision's own ImageNet file (published_vgg16).
    """
    state = read_weights_file(path, flag)
    if isinstance(state, dict) and "script" in state:  # ours
        if state["script"] != SCRIPT:
            raise UserError(f"{path} was written by {state['script']}, not {SCRIPT}")
        saved = state.get("args", {})
        implied = {k: saved[k] for k in ("backbone", "gan_width") if k in saved}
        implied["normalization"] = state.get("normalization", "imagenet")
        return {"kind": f"{SCRIPT} checkpoint", "state": state.get("model", {}), "implied": implied,
                "iter": state.get("iter", 0), "num_classes": state.get("num_classes")}
    wrapper = state if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict) else {}
    state = wrapper.get("model_state_dict", state)
    accepted = ("accepted are our checkpoints, official LSD-seg checkpoints (torchfcn FCN-8s, bare or under "
                "model_state_dict) and torchvision-layout VGG-16 state dicts such as vgg16_from_caffe.pth")
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path} is not an FCN-8s or VGG-16 weights file: {accepted}")
    if "conv1_1.weight" in state:  # torchfcn names
        names = torchfcn_names()
        mapped = {names.get(k.rsplit(".", 1)[0], k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v
                  for k, v in state.items()}
        score = mapped.get("score_fr.weight")
        return {"kind": "official LSD-seg checkpoint" + (f" ({wrapper['arch']})" if "arch" in wrapper else ""),
                "state": mapped, "iter": int(wrapper.get("iteration", 0)),
                "num_classes": score.shape[0] if score is not None else None,
                "implied": {"normalization": "caffe", **vgg_of(mapped)}}
    if "features.0.weight" in state and "classifier.0.weight" in state:  # torchvision VGG
        mapped = from_torchvision_vgg(state)
        kind, normalization = published_vgg16(path) or (
            "torchvision-layout VGG-16 (no published file's digest: taken as Caffe-trained like vgg16_from_caffe.pth; "
            "--normalization imagenet if it expects ImageNet input)", "caffe")
        return {"kind": kind, "state": mapped, "iter": 0, "num_classes": None,
                "implied": {"normalization": normalization, **vgg_of(mapped)}}
    raise UserError(f"{flag} {path}: unrecognised layout (keys such as {', '.join(list(state)[:3])}); {accepted}")


def load_init(model, init, backbone, found=None) -> str:
    """Load --init into F (found: read_fcn_weights' result for a file); return the input normalisation the weights
    expect. VGG-16's convolutions and fc6/fc7 must load completely; score layers and deconvolutions the file lacks
    (an ImageNet VGG-16 has none) stay as initialised (the score layers at 0, as the official init) and are listed."""
    if init == "none":
        return "imagenet"
    if init == "imagenet":
        if backbone != "vgg16":
            raise UserError(f"--init imagenet needs --backbone vgg16 (there are no ImageNet weights for {backbone})")
        state = from_torchvision_vgg(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict())
        found = {"kind": "torchvision ImageNet VGG-16", "state": state, "implied": {"normalization": "imagenet"}}
    load_matching(model, found["state"], f"--init {init} ({found['kind']})",
                  required=lambda k: k.startswith(("features.", "fc6.", "fc7.")))
    return found["implied"]["normalization"]


def prepare_fcn_weights(args, ckpt_path, num_classes) -> Optional[dict]:
    """Read the file of --eval-only --weights, --resume or --init (read_fcn_weights), apply the flags it implies
    (typed flags win), print one line on what was recognised."""
    found = None
    if args.normalization == "auto":  # typed or not, auto means: what the file implies
        args.given = args.given - {"normalization"}
    if args.weights and not args.eval_only:
        raise UserError("--weights is read by --eval-only; to start training from a file use --init PATH")
    if args.eval_only:
        if len(args.weights) != 1:
            raise UserError("--eval-only needs exactly one --weights PATH")
        found = read_fcn_weights(args.weights[0], "--weights")
    elif ckpt_path:  # the network flags it was trained with; its normalisation comes back with the rest of its state
        found = read_fcn_weights(ckpt_path, "--resume")
        found["implied"].pop("normalization")
    elif args.init not in ("imagenet", "none"):
        found = read_fcn_weights(args.init)
        found["implied"].pop("gan_width", None)  # an init is F only: G and D start fresh at the width asked for
    if found is not None and (args.eval_only or ckpt_path) and found["num_classes"] not in (None, num_classes):
        raise UserError(f"{args.weights[0] if args.eval_only else ckpt_path or args.init} has "
                        f"{found['num_classes']} classes, this run has {num_classes}")
    if found is not None:
        found["applied"] = imply(args, found["implied"], found["kind"])
        quirks = {"normalization": "{} input", "backbone": "backbone {}", "gan_width": "G/D width {}"}
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
# ALGO LOGIC: the official loaders, source lists, epochs and evaluation (header "Data", "Evaluation")
OFFICIAL_LOADERS = {  # segmentation_datasets.py, training branch of each image_label_loader
    "gta": dict(width=1280, margin=1, labelled_crop=True),  # :327-352: 1280 wide, aspect kept; crop re-drawn
    "synthia": dict(margin=1),  # :254-262: native 1280x760; corner randint(0, H - crop)
    "cityscapes": dict(margin=51),  # :420-427: native 2048x1024; corner randint(0, H - 50 - crop)
}
CROP_DRAWS = 100  # the official GTA5 loop re-draws without limit; a frame with no labelled pixel would hang it


@dataclass
class LoaderTransform:
    """One official training loader: resize to `size` (H, W), or to `width` with the aspect kept and the
    height truncated (int(1280 / (w / h)), GTA5), Lanczos images and nearest labels; then a random crop that
    never reaches the last `margin` rows and columns (np.random.randint excludes its upper bound) and, with
    `labelled_crop`, is re-drawn until it holds a labelled pixel."""
    size: Optional[tuple] = None
    width: Optional[int] = None
    crop: Optional[tuple] = None
    margin: int = 0
    labelled_crop: bool = False

    def __call__(self, image, label, rng):
        h, w = image.shape[:2]
        size = self.size or ((int(self.width / (w / h)), self.width) if self.width else None)
        if size is not None:
            image, label = resize_pair(image, label, size, interpolation="lanczos")
        if self.crop is None:
            return image, label
        ch, cw = (self.crop[0], self.crop[0]) if len(self.crop) == 1 else self.crop
        h, w = image.shape[:2]
        h, w = h - min(self.margin, max(h - ch, 0)), w - min(self.margin, max(w - cw, 0))
        image, label = image[:h, :w], (label[:h, :w] if label is not None else None)
        for _ in range(CROP_DRAWS if self.labelled_crop and label is not None else 1):
            crop_image, crop_label = random_crop(image, label, (ch, cw), rng)
            if crop_label is None or (crop_label != 255).any():
                break
        return crop_image, crop_label


def train_transform(domain, size, crop):
    """The official loader of `domain` (OFFICIAL_LOADERS; other domains: native size, plain crop), at an
    explicit `size` (H, W) instead of its own when one is given."""
    loader = OFFICIAL_LOADERS.get(domain, {})
    return LoaderTransform(size=tuple(size) if size else None, width=None if size else loader.get("width"),
                           crop=tuple(crop) if crop else None, margin=loader.get("margin", 0),
                           labelled_crop=loader.get("labelled_crop", False))


def in_official_train_list(domain, frame_id):
    """Whether frame `frame_id` (its file number) is in LSD-seg's source train list (data/filelist/
    GTA5_imagelist_train.txt: 00001-23999 without 15188, 17705, 20801-20860, 23,937 frames; the val list is
    24000-24966. SYNTHIA_imagelist_train.txt: 0000000-0009299, 9,300 frames; val 9300-9399)."""
    if domain == "gta":
        return 1 <= frame_id <= 23999 and frame_id not in (15188, 17705) and not 20801 <= frame_id <= 20860
    if domain == "synthia":
        return 0 <= frame_id <= 9299
    return True


def official_source_list(split, holdout):
    """The source train split restricted to the official train list (GTA5, SYNTHIA) when `holdout`."""
    if not holdout or split.name not in ("gta", "synthia"):
        return split
    keep = [i for i in range(len(split)) if in_official_train_list(split.name, int(split.item_name(i)))]
    if not keep:
        raise UserError(f"none of the {len(split)} {split.name} frames is in LSD-seg's train list "
                        f"(--no-source-val-holdout trains on all)")
    return dataclasses.replace(split, images=[split.images[i] for i in keep], labels=[split.labels[i] for i in keep])


def epoch_iterations(n_source, n_target, batch_size):
    """Iterations of one official epoch: the shorter of the zipped source and target loaders, in batches
    (trainer_LSD.py:181-195, 354; DataLoader keeps a last partial batch)."""
    return min(math.ceil(n_source / batch_size), math.ceil(n_target / batch_size))


def predict_nearest(model, to_input, images, size):
    """The official evaluation (eval_cityscapes.py:90-137): each uint8 image Lanczos-resized to `size`
    (segmentation_datasets.py:429), the argmax taken there (fp32) and the label map nearest-resized with PIL
    back to the image's size, the label size (eval_cityscapes.py:69-77). Returned one-hot: the evaluator's
    bilinear resize to the label size is then the identity, and its argmax this map."""
    small = torch.from_numpy(np.stack([resize_image(im.permute(1, 2, 0).cpu().numpy(), size, "lanczos")
                                       for im in images])).permute(0, 3, 1, 2)
    scores = model(to_input(small))[1].float()
    preds = scores.argmax(1).to("cpu", torch.uint8).numpy()
    full = torch.from_numpy(np.stack([resize_label(p, images.shape[-2:]) for p in preds])).to(images.device)
    one_hot = torch.zeros(len(images), scores.shape[1], *images.shape[-2:], device=images.device)
    return one_hot.scatter_(1, full[:, None].long(), 1.0)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: LSD-seg losses (header: each D-map CE enters the objectives x cells/pixels, each L1 x 1/pixels)
SRC_REAL, SRC_FAKE, TGT_REAL, TGT_FAKE = 0, 1, 2, 3  # D's out_s classes (official order)


def map_ce(logits, target):
    """CE of per-cell logits (fp32) against a class index or a label map (255 ignored), summed over the valid
    cells and divided by all cells: the official sum per cell (a plain mean when nothing is ignored)."""
    logits = logits.float()
    if isinstance(target, int):
        target = torch.full((logits.shape[0], *logits.shape[2:]), target, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, ignore_index=255, reduction="sum") / target.numel()


def cell_ratio(d_logits, images):
    """D cells per input pixel: the factor from a per-cell mean to the official sum divided by input pixels."""
    return d_logits.shape[-2] * d_logits.shape[-1] / (images.shape[-2] * images.shape[-1])


def l1(fake, real):
    return (fake.float() - real).abs().mean()


def labels_for_d(labels, size):
    """Source labels nearest-resized to D's output cells (PIL NEAREST sampling, as the official code)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def d_objective(disc, real_s, fake_s, labels_s, real_t, fake_t):
    """Step 1: D learns the 4 image kinds and the source classes (fakes detached). Returns (objective, parts)."""
    s_real_s, c_real_s = disc(real_s)
    parts = {"d_src_real": map_ce(s_real_s, SRC_REAL), "d_src_fake": map_ce(disc(fake_s.detach())[0], SRC_FAKE),
             "d_cls": map_ce(c_real_s, labels_s), "d_tgt_real": map_ce(disc(real_t)[0], TGT_REAL),
             "d_tgt_fake": map_ce(disc(fake_t.detach())[0], TGT_FAKE)}
    return cell_ratio(s_real_s, real_s) * sum(parts.values()), parts


def g_objective(disc, real_s, fake_s, labels_s, real_t, fake_t, g_adv_weight, l1_weight):
    """Step 2: G's fakes must be classified correctly by D_c and look real to D_s, each in its own domain, and
    reconstruct the input (L1). D must be frozen by the caller."""
    s_fake_s, c_fake_s = disc(fake_s)
    s_fake_t, _ = disc(fake_t)
    parts = {"g_cls": map_ce(c_fake_s, labels_s),
             "g_adv": map_ce(s_fake_s, SRC_REAL) + map_ce(s_fake_t, TGT_REAL),
             "recon": l1(fake_s, real_s) + l1(fake_t, real_t)}
    pixels = real_s.shape[-2] * real_s.shape[-1]
    ratio = cell_ratio(s_fake_s, real_s)
    objective = ratio * (parts["g_cls"] + g_adv_weight * parts["g_adv"]) + l1_weight / pixels * parts["recon"]
    return objective, parts


def f_adversarial(disc, fake_s, fake_t, labels_s, adv_weight, c_weight):
    """Step 3's adaptation terms: source reconstructions must look target-real, target ones source-real, and
    source reconstructions keep their classes. G and D must be frozen by the caller."""
    s_fake_s, c_fake_s = disc(fake_s)
    s_fake_t, _ = disc(fake_t)
    parts = {"adv_main": map_ce(s_fake_s, TGT_REAL) + map_ce(s_fake_t, SRC_REAL), "adv_cls": map_ce(c_fake_s, labels_s)}
    return cell_ratio(s_fake_s, fake_s) * (adv_weight * parts["adv_main"] + c_weight * parts["adv_cls"]), parts


def refuse_inert_flags(args):
    """Every flag acts: a flag the user typed that this configuration ignores is an error."""
    inert = {}
    if args.poly_power == 0:
        inert["poly_horizon"] = "--poly-power 0 keeps F's schedule constant"
    if not (args.adv_weight or args.c_weight):
        inert.update(dict.fromkeys(("gan_width", "lr_gan", "beta1_gan", "g_adv_weight", "l1_weight"),
                                   "--adv-weight 0 --c-weight 0 skip G and D"))
    if args.source not in ("gta", "synthia"):
        inert["source_val_holdout"] = "only GTA5 and SYNTHIA have official source train lists"
    for name in sorted(inert.keys() & getattr(args, "given", frozenset())):
        raise UserError(f"--{name.replace('_', '-')} has no effect here: {inert[name]}")
    if args.lr_step_epochs < 0:
        raise UserError(f"--lr-step-epochs must be 0 (never) or positive, got {args.lr_step_epochs}")


def make_optimizers(model, gen, disc, args):
    """F and C: Adam(lr, betas (0.9, 0.999)), biases at bias_lr_mult x lr, the fixed deconvolutions left out; G and D:
    Adam(lr_gan, betas (beta1_gan, 0.999)), constant (train.py:97-110). Returns (optimizers, trainable parameters),
    each keyed model, gen, disc."""
    trainable = {"model": [p for p in model.parameters() if p.requires_grad], "gen": list(gen.parameters()),
                 "disc": list(disc.parameters())}
    optimizers = {"model": torch.optim.Adam(model.param_groups(args.lr, args.bias_lr_mult), lr=args.lr,
                                            betas=(0.9, 0.999), weight_decay=args.weight_decay)}
    for name in ("gen", "disc"):
        optimizers[name] = torch.optim.Adam([{"params": trainable[name], "lr_mult": 1.0}], lr=args.lr_gan,
                                            betas=(args.beta1_gan, 0.999))
    return optimizers, trainable


def train_only(trainable, name):
    """requires_grad on the parameters of network `name` only, so a backward reaches no other network."""
    for key, params in trainable.items():
        for p in params:
            p.requires_grad_(key == name)


def average_gradients(params, rt):
    """Mean of the gradients over the torchrun processes with one all_reduce (no DDP wrappers here)."""
    grads = [p.grad for p in params if p.grad is not None]
    if rt.world == 1 or not grads:
        return
    flat = rt.all_reduce(torch.cat([g.flatten() for g in grads])) / rt.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(optimizer, loss, params, rt):
    optimizer.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    average_gradients(params, rt)
    rt.scaler.step(optimizer)


def train_step(nets, optimizers, trainable, images, labels, target_images, args, rt, to_input):
    """One LSD-seg iteration: the D step, then the G step, then the F and C step, each changing only its own
    network and each backward going through a graph built after the last step of every network on its path.
    nets/optimizers/trainable: dicts with keys model, gen, disc (make_optimizers). Returns the logged losses (on the
    device)."""
    model, gen, disc = nets["model"], nets["gen"], nets["disc"]
    if not (args.adv_weight or args.c_weight):  # source-only ablation of the same F + C: G and D are skipped
        train_only(trainable, "model")
        with rt.autocast():
            _, scores_s = model(to_input(images))
        losses = {"seg_src": seg_loss(scores_s, labels)}
        optimizer_step(optimizers["model"], losses["seg_src"], trainable["model"], rt)
        rt.scaler.update()
        return losses
    real_s = images.to(rt.device, non_blocking=True) / 255  # D sees images in [0, 1] (uint8 / 255: float32)
    real_t = target_images.to(rt.device, non_blocking=True) / 255
    train_only(trainable, "model")
    with rt.autocast():  # F once per domain; its graph is kept for step 3 (F is stepped last)
        embedding_s, scores_s = model(to_input(images))
        embedding_t, _ = model(to_input(target_images))
    # 1. D on real images and on G's reconstructions of the detached embeddings
    train_only(trainable, "gen")
    with rt.autocast():
        fake_s = gen([e.detach() for e in embedding_s], images.shape[-2:])
        fake_t = gen([e.detach() for e in embedding_t], target_images.shape[-2:])
    train_only(trainable, "disc")
    labels_d = labels_for_d(labels, Discriminator.output_size(images.shape[-2:]))
    with rt.autocast():
        loss_d, losses = d_objective(disc, real_s, fake_s, labels_d, real_t, fake_t)
    optimizer_step(optimizers["disc"], loss_d, trainable["disc"], rt)
    # 2. G through the stepped D (re-run, frozen); G's own graph from above is still current
    train_only(trainable, "gen")
    with rt.autocast():
        loss_g, parts = g_objective(disc, real_s, fake_s, labels_d, real_t, fake_t, args.g_adv_weight, args.l1_weight)
    losses.update(parts)
    optimizer_step(optimizers["gen"], loss_g, trainable["gen"], rt)
    # 3. F and C: segmentation + the adaptation terms through the stepped G and D (re-run, frozen)
    train_only(trainable, "model")
    losses["seg_src"] = seg_loss(scores_s, labels)
    with rt.autocast():
        adversarial, parts = f_adversarial(disc, gen(embedding_s, images.shape[-2:]),
                                           gen(embedding_t, target_images.shape[-2:]), labels_d,
                                           args.adv_weight, args.c_weight)
    losses.update(parts)
    optimizer_step(optimizers["model"], losses["seg_src"] + adversarial, trainable["model"], rt)
    rt.scaler.update()
    losses["d_main"] = sum(losses.pop(k) for k in ("d_src_real", "d_src_fake", "d_cls", "d_tgt_real", "d_tgt_fake"))
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
    refuse_inert_flags(args)
    found = prepare_fcn_weights(args, ckpt_path, num_classes)  # the --init/--weights/--resume file and what it implies
    model = FCN8s(args.backbone, num_classes)
    norm = load_init(model, args.init, args.backbone, found) if not (ckpt_path or args.eval_only or args.dry_run) \
        else None
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    if args.gan_width < 1:
        raise UserError(f"--gan-width must be at least 1, got {args.gan_width}")
    memory_format = torch.channels_last if rt.channels_last else torch.preserve_format
    gen = Generator(model.embedding_channels, args.gan_width).to(rt.device, memory_format=memory_format)
    disc = Discriminator(num_classes, args.gan_width).to(rt.device, memory_format=memory_format)
    optimizers, trainable = make_optimizers(model, gen, disc, args)
    optimizer = optimizers["model"]  # F's: the skeleton's schedule and checkpoint entry
    networks = {"model": model, "gen": gen, "disc": disc}

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
    if args.eval_only:  # every tensor of F from the file, nothing left over (G and D are not evaluated)
        load_matching(model, found["state"], f"--weights {args.weights[0]} ({found['kind']})", required=lambda k: True,
                      unused_ok=lambda k: False)
        start_iter = found["iter"]
    elif ckpt_path:
        ckpt = load_checkpoint(ckpt_path, SCRIPT, num_classes)
        load_matching(model, ckpt["model"], f"--resume {ckpt_path}", required=lambda k: True, unused_ok=lambda k: False,
                      quiet=True)
        norm, start_iter = ckpt["normalization"], ckpt["iter"]
        optimizer.load_state_dict(ckpt["optimizer"])
        rt.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        for name, net in (("gen", gen), ("disc", disc)):
            load_matching(net, ckpt[name], f"--resume {ckpt_path} ({name})", required=lambda k: True,
                          unused_ok=lambda k: False, quiet=True)
        optimizers["gen"].load_state_dict(ckpt["optimizer_g"])
        optimizers["disc"].load_state_dict(ckpt["optimizer_d"])
        print(f"resumed from {ckpt_path} at iteration {start_iter}")

    def to_input(images):
        x = normalize(images.to(rt.device, non_blocking=True), norm)
        return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x

    # TRY NOT TO MODIFY: evaluation
    target_val = domain_split(args.target, "val", args.data_root)
    eval_size = args.eval_size or args.target_size or target_val.paper_size

    nearest = args.eval_upsample == "nearest"  # the official protocol: predict resizes the full image itself

    def predict(images):
        return predict_nearest(model, to_input, images, eval_size) if nearest else model(to_input(images))[1]

    def evaluate_model(final=False):
        rt.share_buffers(model)  # rank 0's BN statistics on every rank: the network its checkpoint holds
        model.eval()
        with torch.no_grad(), rt.autocast():
            summary = evaluate_target(predict, target_val, rt, align_corners=True, log=log,
                                      num_predictions=args.num_predictions if final else 0, limit=args.eval_limit,
                                      eval_size=None if nearest else eval_size, pred_map=pred_map,
                                      synthia_protocols=args.source == "synthia" and len(eval_classes) == 19,
                                      save_dir=args.save_predictions if final else None, num_workers=args.num_workers,
                                      interpolation="lanczos")
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
                "gen": gen.state_dict(), "disc": disc.state_dict(),
                "optimizer_g": optimizers["gen"].state_dict(), "optimizer_d": optimizers["disc"].state_dict()})

    # ALGO LOGIC: data (the official loaders and source train lists, header "Data")
    source_train = official_source_list(domain_split(args.source, "train", args.data_root,
                                                     synthia_classes=args.synthia_classes), args.source_val_holdout)
    source_transform = train_transform(args.source, args.source_size, args.crop_size)
    per_rank_batch = args.batch_size // rt.world
    source_batches = train_loader(SegDataset(source_train, source_transform), per_rank_batch, args.seed, start_iter,
                                  rt.rank, rt.world, num_workers=args.num_workers, pin_memory=rt.device.type == "cuda")
    # the unlabelled target train split; its own sample stream (seed offset), distinct from every rank's source stream
    target_train = domain_split(args.target, "train", args.data_root, labelled=False)
    target_transform = train_transform(args.target, args.target_size, args.crop_size)
    target_batches = train_loader(SegDataset(target_train, target_transform, with_label=False), per_rank_batch,
                                  args.seed + 100_003, start_iter, rt.rank, rt.world, num_workers=args.num_workers,
                                  pin_memory=rt.device.type == "cuda")
    lr_step_every = args.lr_step_epochs * epoch_iterations(len(source_train), len(target_train), args.batch_size)
    train_model = model  # no DDP wrapper: each step's gradients are averaged by average_gradients
    nets = {"model": train_model, "gen": gen.train(), "disc": disc.train()}

    # TRY NOT TO MODIFY: training loop
    running = {}
    log.start_loop(start_iter)
    progress = tqdm(range(start_iter, args.iters), initial=start_iter, total=args.iters, disable=not rt.is_main,
                    desc=SCRIPT, dynamic_ncols=True)
    for it in progress:
        lr = poly_lr(args.lr, it, args.poly_horizon, args.poly_power)
        set_lr(optimizer, lr)

        # ALGO LOGIC: one iteration (D step, then G step, then F and C step; each changes only its own network)
        if lr_step_every:  # official: F's lr x0.1 every 8 epochs (on top of a constant schedule)
            lr = lr * 0.1 ** (it // lr_step_every)
            set_lr(optimizer, lr)
        images, labels, _ = next(source_batches)
        labels = labels.to(rt.device, non_blocking=True).long()
        target_images, _, _ = next(target_batches)
        losses = train_step(nets, optimizers, trainable, images, labels, target_images, args, rt, to_input)

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
