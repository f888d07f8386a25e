"""Fixtures in the layouts of LSD-seg's weights files (../shared/reference/released-models.md), built from our own
FCN8s state dicts with random values: the official key names, wrappers and tensor layouts, never their weights.
The widths are those of the network they come from (the tests use vgg16_small: every VGG width / 8); the names,
the 4-D fc6/fc7 convolutions of torchfcn, the 2-D classifier matrices of torchvision and the wrappers are the
official ones.

- `torchfcn_state(state)`: F's state dict under torchfcn's FCN8s names (code/torchfcn/models/model_utils.py:
  conv1_1 ... conv5_3, fc6, fc7, score_fr, score_pool3, score_pool4, upscore2, upscore8, upscore_pool4);
- `lsd_checkpoint(state)`: what trainer_LSD.py:160-167 saves (checkpoint.pth.tar / model_best.pth.tar): epoch,
  iteration, arch, optim_state_dict, model_state_dict and a numpy best_mean_iu;
- `torchvision_vgg(state)`: a torchvision VGG-16 state dict (the layout of vgg16_from_caffe.pth, torchfcn/models/
  vgg.py:9-24): features.*, classifier.0/3 as Linear matrices, a 1000-way classifier.6.
"""
import numpy as np
import torch

# torchvision's VGG-16 `features` index of each torchfcn conv (conv, ReLU pairs; a max-pool after each stage)
TORCHFCN_CONVS = {0: "conv1_1", 2: "conv1_2", 5: "conv2_1", 7: "conv2_2", 10: "conv3_1", 12: "conv3_2",
                  14: "conv3_3", 17: "conv4_1", 19: "conv4_2", 21: "conv4_3", 24: "conv5_1", 26: "conv5_2",
                  28: "conv5_3"}


def torchfcn_state(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("features."):
            _, index, param = key.split(".")
            key = f"{TORCHFCN_CONVS[int(index)]}.{param}"
        out[key] = value.clone()
    return out


def lsd_checkpoint(state: dict, iteration=9000) -> dict:
    """trainer_LSD.py's checkpoint dict around F's torchfcn state dict (an Adam state of the right structure)."""
    model_state = torchfcn_state(state)
    params = [torch.nn.Parameter(v.clone()) for k, v in model_state.items() if not k.startswith("upscore")]
    optim = torch.optim.Adam(params, lr=1e-5)
    sum(p.sum() for p in params).backward()
    optim.step()
    return {"epoch": iteration // 2975, "iteration": iteration, "arch": "FCN8s_LSD",
            "optim_state_dict": optim.state_dict(), "model_state_dict": model_state,
            "best_mean_iu": np.float64(0.3512)}


def torchvision_vgg(state: dict, seed=0) -> dict:
    """F's backbone as a torchvision VGG-16 state dict (fc6/fc7 flattened into Linear weights) with a random
    1000-way classifier.6; F's score layers and deconvolutions are not in such a file."""
    out = {k: v.clone() for k, v in state.items() if k.startswith("features.")}
    for fc, index in (("fc6", 0), ("fc7", 3)):
        out[f"classifier.{index}.weight"] = state[f"{fc}.weight"].reshape(state[f"{fc}.weight"].shape[0], -1).clone()
        out[f"classifier.{index}.bias"] = state[f"{fc}.bias"].clone()
    generator = torch.Generator().manual_seed(seed)
    out["classifier.6.weight"] = torch.randn(1000, state["fc7.weight"].shape[0], generator=generator)
    out["classifier.6.bias"] = torch.randn(1000, generator=generator)
    return out
