"""How hard do LSD-seg's objectives pull? Gradient norms at a checkpoint of lsdseg.py.

    python benchmarks/lsdseg_grad_ratio.py runs/compare/toy-synth_toy-real/lsdseg/seed0/checkpoints/last.pt

Loads F + C, G and D from the checkpoint, takes the first N source and N target training frames through the
run's own training transform (lsdseg.train_transform: its resize and crop, one fixed seed per frame), runs F
once in train mode (dropout on, as in training), and prints the norm of the gradient
  - on F's trainable parameters (conv1_1 .. fc7 and the score layers) of the segmentation CE (what step 3
    of an iteration always has) and of F's adaptation terms (lsdseg.f_adversarial) at unit weights; at
    weights (a, c) the gradient is a * g_adv + c * g_cls, so the script prints the combined norm at the
    paper's weights and at 10x and 100x. This ratio is what the quick preset's 10x adaptation weights are
    chosen by (lsdseg.py header, benchmarks/lsdseg.md);
  - on G's parameters of G's objective (lsdseg.g_objective, step 2) split into its D terms (class head and
    real/fake) and its L1 reconstruction term, both at the run's weights: how much the L1 term steers G.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lsdseg as lsd  # noqa: E402
from common.data import domain_split, normalize  # noqa: E402


def frames(name, data_root, size, crop, n, labelled):
    """The first n frames of a training split through lsdseg's training transform (frame i drawn with seed i)."""
    split = domain_split(name, "train", data_root, labelled=labelled)
    transform = lsd.train_transform(name, size, crop)
    pairs = [transform(*split.load(i, labelled), np.random.default_rng(i)) for i in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])).long() if labelled else None
    return images, labels


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--frames", type=int, default=4, help="source and target frames (4, the quick batch)")
    p.add_argument("--seed", type=int, default=0, help="dropout seed (0)")
    a = p.parse_args()
    ckpt = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    args = ckpt["args"]
    num_classes = ckpt["num_classes"]
    model = lsd.FCN8s(args["backbone"], num_classes)
    gen = lsd.Generator(model.embedding_channels, args["gan_width"])
    disc = lsd.Discriminator(num_classes, args["gan_width"])
    model.load_state_dict(ckpt["model"]), gen.load_state_dict(ckpt["gen"]), disc.load_state_dict(ckpt["disc"])
    model.train(), gen.train(), disc.train()
    gen.requires_grad_(False), disc.requires_grad_(False)
    crop = args["crop_size"]
    images, labels = frames(args["source"], args["data_root"], args["source_size"], crop, a.frames, True)
    target_images, _ = frames(args["target"], args["data_root"], args["target_size"], crop, a.frames, False)
    params = [q for q in model.parameters() if q.requires_grad]
    torch.manual_seed(a.seed)
    (emb_s, scores_s), (emb_t, _) = model(normalize(images, ckpt["normalization"])), model(
        normalize(target_images, ckpt["normalization"]))
    labels_d = lsd.labels_for_d(labels, lsd.Discriminator.output_size(images.shape[-2:]))

    def grad(loss, wrt=params):
        grads = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)  # C: no adaptation grad
        return torch.cat([(torch.zeros_like(q) if g is None else g).flatten() for q, g in zip(wrt, grads)])

    g_seg = grad(lsd.seg_loss(scores_s, labels))
    fake_s, fake_t = gen(emb_s, images.shape[-2:]), gen(emb_t, target_images.shape[-2:])
    g_adv = grad(lsd.f_adversarial(disc, fake_s, fake_t, labels_d, 1.0, 0.0)[0])
    g_cls = grad(lsd.f_adversarial(disc, fake_s, fake_t, labels_d, 0.0, 1.0)[0])
    print(f"checkpoint {a.checkpoint} (iteration {ckpt['iter']}, adv_weight {args['adv_weight']}, "
          f"c_weight {args['c_weight']}), {a.frames} + {a.frames} frames of {tuple(images.shape[-2:])}")
    print(f"segmentation CE gradient norm: {g_seg.norm():.4g}")
    for label, (wa, wc) in (("paper weights (0.1, 0.1)", (0.1, 0.1)), ("10x (1.0, 1.0)", (1.0, 1.0)),
                            ("100x (10, 10)", (10.0, 10.0))):
        norm = (wa * g_adv + wc * g_cls).norm()
        print(f"adaptation gradient norm at {label}: {norm:.4g} ({100 * norm / g_seg.norm():.1f} % of the CE's)")

    # G's objective on the same reconstructions, gradients on G: its D terms against its L1 term
    gen_params = list(gen.parameters())
    gen.requires_grad_(True)
    real_s, real_t = images.float() / 255, target_images.float() / 255
    fake_s, fake_t = gen([e.detach() for e in emb_s], images.shape[-2:]), gen([e.detach() for e in emb_t],
                                                                              target_images.shape[-2:])
    pixels = images.shape[-2] * images.shape[-1]
    _, parts = lsd.g_objective(disc, real_s, fake_s, labels_d, real_t, fake_t, args["g_adv_weight"], args["l1_weight"])
    cells = lsd.Discriminator.output_size(images.shape[-2:])
    ratio = cells[0] * cells[1] / pixels  # lsdseg.cell_ratio: the factors g_objective applies
    g_d = grad(ratio * (parts["g_cls"] + args["g_adv_weight"] * parts["g_adv"]), gen_params)
    g_l1 = grad(args["l1_weight"] / pixels * parts["recon"], gen_params)
    print(f"G's D-term gradient norm (class head + {args['g_adv_weight']} real/fake): {g_d.norm():.4g}")
    print(f"G's L1-term gradient norm (l1_weight {args['l1_weight']}): {g_l1.norm():.4g} "
          f"({g_l1.norm() / (g_d + g_l1).norm():.3g} of G's total)")


if __name__ == "__main__":
    main()
