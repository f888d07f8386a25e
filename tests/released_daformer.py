"""Fixtures in the layouts of DAFormer's released files and init files (../shared/reference/released-models.md),
built from our own networks with random values: the official key names and wrappers, never their weights.

The names follow the official modules, written out here by hand (not with daformer.py's mapping tables):
- MiT encoder (mmseg/models/backbones/mix_transformer.py, SegFormer's alike): patch_embed1..4.{proj,norm},
  block1..4.<j>.{norm1, attn.{q,kv,proj,sr,norm}, norm2, mlp.{fc1, dwconv.dwconv, fc2}}, norm1..4;
- DAFormerHead (daformer_head.py with the sepaspp fusion, sep_aspp_head.py, mmcv ConvModule = conv + bn):
  embed_layers.<i>.proj, fuse_layer.aspp_modules.0.{conv,bn}, fuse_layer.aspp_modules.<k>.{depthwise_conv,
  pointwise_conv}.{conv,bn}, fuse_layer.bottleneck.{conv,bn} (conv1 fusion: fuse_layer.{conv,bn}), conv_seg;
- a DAFormer release: mmcv {'meta', 'state_dict', 'optimizer'} of the DACS wrapper: model.* (student), ema_model.*
  (teacher), imnet_model.* (a whole segmentor, of which FD uses the backbone) (uda_decorator.py:34, dacs.py:79-83).
"""
import re

import torch


def mit_names(encoder: dict) -> dict:
    """A timm pvt_v2 encoder state (DAFormerNet.encoder) under MiT names."""
    out = {}
    for key, value in encoder.items():
        parts = key.split(".")
        if parts[0] == "patch_embed":
            name = "patch_embed1." + ".".join(parts[1:])
        elif parts[2] == "downsample":
            name = f"patch_embed{int(parts[1]) + 1}." + ".".join(parts[3:])
        elif parts[2] == "norm":
            name = f"norm{int(parts[1]) + 1}." + ".".join(parts[3:])
        else:  # stages.<s>.blocks.<j>.<module>
            module = ".".join(parts[4:])
            module = "mlp.dwconv.dwconv." + module.split("mlp.dwconv.", 1)[1] if module.startswith("mlp.dwconv.") \
                else module
            name = f"block{int(parts[1]) + 1}.{parts[3]}.{module}"
        out[name] = value.clone()
    return out


def daformer_head_names(head: dict) -> dict:
    """A DecodeHead state (daformer or segformer decoder) under mmseg DAFormerHead names."""
    conv_bn = {"0": "conv", "1": "bn"}
    out = {}
    for key, value in head.items():
        parts = key.split(".")
        tail = ".".join(parts[-1:])
        if parts[0] == "embed":
            name = f"embed_layers.{parts[1]}.proj.{tail}"
        elif parts[0] == "classifier":
            name = f"conv_seg.{tail}"
        elif parts[0] == "fuse":
            bottleneck = "bottleneck." if "branches.0.0.weight" in head else ""  # sepaspp vs conv1 fusion
            name = f"fuse_layer.{bottleneck}{conv_bn[parts[1]]}.{'.'.join(parts[2:])}"
        elif parts[1] == "0":  # branches.0.<conv|bn>: the 1x1 branch (dilation 1 stays a ConvModule)
            name = f"fuse_layer.aspp_modules.0.{conv_bn[parts[2]]}.{'.'.join(parts[3:])}"
        else:  # branches.<k>.<0: depthwise | 1: pointwise>.<conv|bn>
            which = ("depthwise_conv", "pointwise_conv")[int(parts[2])]
            name = f"fuse_layer.aspp_modules.{parts[1]}.{which}.{conv_bn[parts[3]]}.{'.'.join(parts[4:])}"
        out[name] = value.clone()
    return out


def segmentor_names(model: dict) -> dict:
    """A DAFormerNet state under mmseg EncoderDecoder names (backbone.*, decode_head.*)."""
    encoder = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v for k, v in model.items() if k.startswith("head.")}
    return {**{"backbone." + k: v for k, v in mit_names(encoder).items()},
            **{"decode_head." + k: v for k, v in daformer_head_names(head).items()}}


def segformer_mit_file(encoder: dict, wrapper=None) -> dict:
    """SegFormer's ImageNet MiT file (mit_b5.pth): MiT names plus the ImageNet classifier `head`; raw, or under
    'state_dict' or 'model' (the wrappers mix_transformer.py:349-357 accepts)."""
    state = mit_names(encoder)
    width = state["norm4.weight"].shape[0]
    state["head.weight"], state["head.bias"] = torch.randn(1000, width), torch.randn(1000)
    return state if wrapper is None else {wrapper: state}


def mmcv_meta(config_text="", iters=40000) -> dict:
    """What mmcv 1.3's IterBasedRunner and DAFormer's tools/train.py put into a checkpoint's meta."""
    return {"mmseg_version": "0.16.0+e6f6e04", "config": config_text, "CLASSES": ("road", "sidewalk"),
            "PALETTE": [[128, 64, 128], [244, 35, 232]], "env_info": "sys.platform: linux", "seed": 0,
            "exp_name": "gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0", "mmcv_version": "1.3.7",
            "time": "Mon Nov  8 22:18:24 2021", "epoch": 1, "iter": iters}


def daformer_release(student: dict, teacher: dict, imnet: dict, iters=40000) -> dict:
    """latest.pth of a DAFormer run: student, EMA teacher and the FD model (DAFormerNet states) under the DACS
    wrapper's names, with mmcv's meta and an AdamW state as mmcv saves them."""
    state = {}
    for prefix, model in (("model.", student), ("ema_model.", teacher), ("imnet_model.", imnet)):
        state.update({prefix + k: v for k, v in segmentor_names(model).items()})
    params = [k for k in state if k.startswith("model.") and not re.search(r"running_|num_batches", k)]
    optimizer = {"state": {0: {"step": 40000, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}},
                 "param_groups": [{"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01,
                                   "amsgrad": False, "initial_lr": 6e-05, "params": list(range(len(params)))}]}
    return {"meta": mmcv_meta("uda = dict(type='DACS', alpha=0.999)", iters), "state_dict": state,
            "optimizer": optimizer}
