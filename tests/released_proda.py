"""ProDA's files (../shared/reference/released-models.md, ProDA section), built from our networks with random values:
the official key names and wrappers, never the authors' weights.

- `proda_release(state, ...)`: a ProDANet state dict saved as ProDA's train.py saves a model
  (`{'ResNet101': {'model_state', 'objective_vectors' [C, 256]}, 'iter', 'best_iou' (numpy float64)}`, the warm-up's
  adding `'FCDiscriminator'`), its keys as models/deeplabv2.py names them: torchvision backbone names, the head as
  `layer5` (Classifier_Module2: `conv2d_list.{0-4}.{0,1}`, `bottleneck.{0.se.{0,2},1,2}`, `head.1`, no bias) and,
  with --bn_clr, `bn_pretrain`;
- `simclr_init(state)`: the converted SimCLRv2 file r101_1x_sk0.pth as ProDA reads it (`torch.load(f)['state_dict']`,
  models/deeplabv2.py:362): torchvision ResNet names, no head;
- `randomize(net)`: every parameter and BN statistic of a network random, so that a swapped tensor shows.
"""
import numpy as np
import torch

# ProDANet's module names -> models/deeplabv2.py's (first matching prefix)
OFFICIAL_NAMES = (("head.branches.", "layer5.conv2d_list."), ("head.bottleneck.0.fc.", "layer5.bottleneck.0.se."),
                  ("head.bottleneck.", "layer5.bottleneck."), ("head.classifier.", "layer5.head.1."),
                  ("head_bn.", "bn_pretrain."))


def official_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for ours, theirs in OFFICIAL_NAMES:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        out[key] = value.clone()
    return out


def proda_release(state: dict, iteration=62001, best_iou=0.575, disc_state=None, objective_vectors=None) -> dict:
    """disc_state: the warm-up's discriminator (ProDA's FCDiscriminator keys equal ProDADiscriminator's)."""
    num_classes = state["head.classifier.weight"].shape[0]
    vectors = objective_vectors if objective_vectors is not None else torch.zeros(num_classes, 256)
    out = {"ResNet101": {"model_state": official_names(state), "objective_vectors": vectors},
           "iter": iteration, "best_iou": np.float64(best_iou)}
    if disc_state is not None:
        out["FCDiscriminator"] = {"model_state": {k: v.clone() for k, v in disc_state.items()},
                                  "objective_vectors": torch.zeros(num_classes, 256)}
    return out


def simclr_init(state: dict, with_fc=False) -> dict:
    backbone = {k: v.clone() for k, v in state.items() if not k.startswith(("head", "head_bn"))}
    if with_fc:
        backbone.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    return {"state_dict": backbone}


def randomize(net, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=generator)
                t.copy_(noise + 0.5 if "running_var" in name else (noise - 0.5) * 0.2)
    return net
