"""Procedural toy domain pairs for unsupervised domain adaptation (UDA) in segmentation.

Every domain is rendered from the same street-scene grammar: sky on top, a row of
buildings standing on the horizon, a road converging to a vanishing point with
sidewalks on both sides, and trees, poles, people and cars placed in perspective
(farther objects are smaller and sit closer to the horizon). A style is a look and a
layout: the look sets the appearance and never changes a label, the layout sets the
object counts and sizes and so the class frequencies.

Looks:
* synthetic: flat, saturated colours. Every class has one base colour, each object only
  varies it slightly. No texture, no noise, no blur.
* real: the same classes in a partially shifted palette (greyer road and sidewalk, hazy
  sky, darker green, grey poles, cars and clothes in arbitrary colours), plus texture
  (windows and bricks, lane marks, paving, leafy blotches), per-image tint and brightness,
  a lighting gradient and vignette, blur and sensor noise.

Pairs:
* "toy-synth" -> "toy-real": synthetic look and layout -> real look and layout. The real
  layout is busier (more, smaller cars, more people, taller buildings, fewer trees), so
  the pair has label shift on top of the appearance shift (toy-real: 1.8x the building
  pixel share, 3.0x person, 0.4x vegetation over the train split).
* "toy2-synth" -> "toy2-real": the same two looks on one shared "matched" layout, so the
  class frequencies agree (up to sampling noise) and only the appearance shifts.

Colour alone is thus unreliable in the target, but shape, position and the scene
structure are shared, so a source model transfers partially and UDA methods
(entropy minimisation, adversarial output alignment, self-training with mixing)
have a measurable gap to close. Everything is drawn with numpy from
``np.random.default_rng(seed)``; label masks use integer arithmetic only, so the
same (seed, style, size) gives identical arrays on any machine.
"""
import zlib

import numpy as np

TOY_CLASSES = ["road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car"]
TOY_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35),
               (70, 130, 180), (153, 153, 153), (220, 20, 60), (0, 0, 142)]
# domain name -> rendering style. toy-synth/toy-real differ in appearance AND class frequencies (label shift);
# toy2-synth/toy2-real share one layout distribution (matched class frequencies) and differ in appearance only.
TOY_DOMAINS = {"toy-synth": "synthetic", "toy-real": "real",
               "toy2-synth": "synthetic-matched", "toy2-real": "real-matched"}
# 2000 train images is plenty for the ~1-5k iterations a CPU run affords; renders are
# on the fly, so size costs nothing but seeds. 100 val images give a stable mIoU.
TOY_SPLIT_SIZES = {"train": 2000, "val": 100}
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, POLE, PERSON, CAR = range(8)

_SYNTH_RGB = np.array([(110, 100, 130), (220, 160, 200), (175, 140, 100), (50, 180, 40),
                       (80, 170, 250), (240, 220, 40), (235, 45, 45), (30, 50, 210)], np.float32)
_REAL_RGB = np.array([(92, 90, 96), (160, 148, 150), (140, 118, 100), (72, 105, 52),
                      (175, 192, 212), (95, 95, 92), (60, 60, 70), (120, 120, 125)], np.float32)
_REAL_CAR_PAINT = np.array([(225, 225, 230), (25, 25, 30), (150, 152, 158), (170, 30, 30),
                            (30, 45, 110), (95, 95, 100), (190, 175, 140), (40, 90, 60)], np.float32)
_REAL_CLOTHES = np.array([(30, 30, 40), (60, 40, 30), (180, 180, 170), (140, 30, 40),
                          (40, 60, 120), (90, 100, 70), (200, 150, 60)], np.float32)
_SKIN = np.array((200, 150, 120), np.float32)
# Layouts: (min, max) object counts (max exclusive), size factors relative to the distance
# below the horizon, building tops, the synthetic look's per-object colour jitter, and whether
# the hedge has gaps of sky/building in its label. Real scenes are busier, with smaller cars;
# "matched" lies between the two and is shared by both toy2 domains.
_LAYOUT = {
    "synthetic": dict(cars=(1, 4), car_size=1.25, people=(0, 3), person_size=1.5,
                      trees=(2, 6), poles=(1, 4), top=(0.05, 0.30), jitter=0.06, hedge_gaps=False),
    "real": dict(cars=(3, 9), car_size=0.85, people=(2, 7), person_size=1.3,
                 trees=(0, 3), poles=(2, 5), top=(0.0, 0.18), jitter=0.0, hedge_gaps=True),
    "matched": dict(cars=(2, 7), car_size=1.05, people=(1, 5), person_size=1.4,
                    trees=(1, 5), poles=(1, 5), top=(0.02, 0.24), jitter=0.06, hedge_gaps=False),
}
# style -> (look, layout). The look (palette, textures, lighting, blur, noise) never changes a
# label; the layout alone decides the label map's distribution. The look's extra random draws
# only shift the generator's stream, so two styles with one layout have the same class
# frequencies in expectation, not the same frames.
_STYLES = {"synthetic": ("synthetic", "synthetic"), "real": ("real", "real"),
           "synthetic-matched": ("synthetic", "matched"), "real-matched": ("real", "matched")}


def render_scene(seed: int, style: str, height: int = 128, width: int = 256):
    """Render one scene; returns (image uint8 HxWx3 RGB, label uint8 HxW in 0..7)."""
    if style not in _STYLES:
        raise ValueError(f"style must be one of {', '.join(_STYLES)}, got {style!r}")
    look, layout = _STYLES[style]
    real, cfg, H, W = look == "real", _LAYOUT[layout], height, width
    rng = np.random.default_rng(seed)
    img = np.empty((H, W, 3), np.float32)
    lab = np.empty((H, W), np.uint8)

    def colour(cls, rgb=None):
        """Class colour with per-object variation (small in synthetic)."""
        rgb = (_REAL_RGB if real else _SYNTH_RGB)[cls] if rgb is None else rgb
        j = 0.15 if real else cfg["jitter"]
        return rgb * np.float32(1 + rng.uniform(-j, j)) + rng.uniform(-8, 8, 3).astype(np.float32)

    def paint(y0, y1, x0, x1, cls, rgb, shape=None):
        """Fill a box (or the integer mask ``shape(ys, xs)`` inside it) with one class."""
        y0, y1, x0, x1 = max(int(y0), 0), min(int(y1), H), max(int(x0), 0), min(int(x1), W)
        if y0 >= y1 or x0 >= x1:
            return
        if shape is None:
            lab[y0:y1, x0:x1], img[y0:y1, x0:x1] = cls, rgb
        else:
            m = shape(np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :])
            lab[y0:y1, x0:x1][m], img[y0:y1, x0:x1][m] = cls, rgb

    def ellipse(cy, cx, ry, rx):
        return lambda ys, xs: ((xs - cx) * ry) ** 2 + ((ys - cy) * rx) ** 2 <= (rx * ry) ** 2

    # Ground geometry: horizon row hy, vanishing point vx, road half-widths at the
    # bottom row (a left, b right); the road is the triangle between those edges.
    hy = int(rng.integers(int(0.36 * H), int(0.52 * H)))
    vx = W // 2 + int(rng.integers(-W // 8, W // 8 + 1))
    D = H - 1 - hy
    a, b = (int(v) for v in rng.integers(int(0.3 * W), int(0.55 * W), 2))
    edge_l = lambda y: vx - a * (y - hy) // D
    edge_r = lambda y: vx + b * (y - hy) // D

    paint(0, H, 0, W, SKY, colour(SKY))
    x = -int(rng.integers(0, 20))
    while x < W:  # a row of buildings with occasional gaps of sky
        bw = int(rng.integers(W // 12, W // 4))
        if rng.random() < 0.2:
            x += bw // 2
            continue
        top = int(rng.integers(int(cfg["top"][0] * H), int(cfg["top"][1] * H) + 2))
        top = min(top + int(rng.integers(0, max(1, hy // 3))), hy - 6)
        paint(top, hy + 1, x, x + bw, BUILDING, colour(BUILDING))
        if real:  # windows: a per-building grid of dark glass
            py, px, x_ = int(rng.integers(6, 11)), int(rng.integers(6, 12)), x
            paint(top + 3, hy - 3, x + 2, x + bw - 2, BUILDING, colour(BUILDING, np.float32((55, 65, 85))),
                  lambda ys, xs: ((ys - top) % py < py // 2) & ((xs - x_) % px < px // 2))
        x += bw
    if rng.random() < 0.5:  # a hedge along the horizon
        paint(hy - int(rng.integers(2, 8)), hy + 1, 0, W, VEGETATION, colour(VEGETATION),
              (lambda ys, xs: (xs // 4 + ys) % 9 < 7) if cfg["hedge_gaps"] else None)
    paint(hy + 1, H, 0, W, SIDEWALK, colour(SIDEWALK))
    paint(hy + 1, H, 0, W, ROAD, colour(ROAD),
          lambda ys, xs: ((xs - vx) * D >= -a * (ys - hy)) & ((xs - vx) * D <= b * (ys - hy)))
    if real:  # dashed centre line: road label, paint only
        paint(hy + 1, H, 0, W, ROAD, colour(ROAD, np.float32((210, 205, 180))),
              lambda ys, xs: (np.abs((xs - vx) * D * 3 - (b - a) * (ys - hy)) <= 2 * (ys - hy))
              & ((ys - hy) * 16 // D % 2 == 0))

    def on_sidewalk(yb):  # an x on either sidewalk at row yb (None if no room)
        left, right = edge_l(yb) - 3, edge_r(yb) + 3
        opts = ([(0, left)] if left > 0 else []) + ([(right, W)] if right < W - 1 else [])
        if not opts:
            return None
        lo, hi = opts[int(rng.integers(len(opts)))]
        return int(rng.integers(lo, hi))

    objects = []  # (bottom row, kind, x) sorted by depth so nearer objects paint on top
    for kind, key in (("tree", "trees"), ("pole", "poles"), ("person", "people"), ("car", "cars")):
        for _ in range(int(rng.integers(*cfg[key]))):
            yb = int(rng.integers(hy + 2, H + 4 if kind == "car" else H))
            if kind == "car":
                l_, r_ = max(edge_l(yb), 0), min(edge_r(yb), W)
                xc = int(rng.integers(l_, r_)) if r_ > l_ else None
            else:
                xc = on_sidewalk(min(yb, H - 1) if kind != "tree" else yb)
            if xc is not None:
                objects.append((yb, kind, xc))
    for yb, kind, xc in sorted(objects):
        d = yb - hy  # distance below the horizon sets the object's scale
        if kind == "tree":
            r = 3 + d // 3 + int(rng.integers(0, 6))
            trunk = max(1, r // 5)
            paint(yb - 2 * r, yb, xc - trunk, xc + trunk + 1, VEGETATION, colour(VEGETATION) * 0.6)
            cy, ry = yb - 2 * r - r // 2, r
            paint(cy - ry, cy + ry + 1, xc - r, xc + r + 1, VEGETATION, colour(VEGETATION), ellipse(cy, xc, ry, r))
        elif kind == "pole":
            w = max(1, d // 14)
            paint(yb - int(rng.integers(2 * d + 10, 3 * d + 30)), yb, xc, xc + w, POLE, colour(POLE))
        elif kind == "person":
            h = max(6, int(cfg["person_size"] * d * rng.uniform(0.8, 1.2)))
            w = max(2, h // 3)
            skin, shirt, legs = ((_SKIN, _REAL_CLOTHES[rng.integers(7)], _REAL_CLOTHES[rng.integers(7)])
                                 if real else (None, None, None))
            hip, leg = yb - 9 * h // 20, 9 * h // 20  # legs: gap widening towards the feet
            paint(hip, yb, xc - w // 2, xc + w // 2 + 1, PERSON, colour(PERSON, legs),
                  lambda ys, xs: np.abs(xs - xc) * 4 * leg >= (ys - hip) * w)
            paint(yb - 17 * h // 20, yb - 9 * h // 20, xc - w // 2, xc + w // 2 + 1, PERSON, colour(PERSON, shirt))
            r = max(1, h // 10)
            cy = yb - 17 * h // 20 - r
            paint(cy - r, cy + r + 1, xc - r, xc + r + 1, PERSON, colour(PERSON, skin), ellipse(cy, xc, r, r))
        else:  # car seen from behind: wheels, body, cabin with rear window
            w = max(6, int(cfg["car_size"] * d * rng.uniform(0.8, 1.2)) + 4)
            h, x0 = 3 * w // 4, xc - w // 2
            body = colour(CAR, _REAL_CAR_PAINT[rng.integers(8)] if real else None)
            glass = np.float32((40, 45, 55)) if real else body * 0.85
            tyre = np.float32((20, 20, 20)) if real else body * 0.7
            paint(yb - h // 4, yb, x0, x0 + w // 5, CAR, tyre)
            paint(yb - h // 4, yb, x0 + w - w // 5, x0 + w, CAR, tyre)
            paint(yb - 3 * h // 5, yb - h // 8, x0, x0 + w, CAR, body)
            paint(yb - h, yb - 3 * h // 5, x0 + w // 7, x0 + w - w // 7, CAR, body)
            paint(yb - 9 * h // 10, yb - 3 * h // 5, x0 + w // 5, x0 + w - w // 5, CAR, glass)
            if real:  # tail lights
                paint(yb - h // 2, yb - 2 * h // 5, x0 + 1, x0 + w // 6 + 1, CAR, np.float32((200, 30, 30)))
                paint(yb - h // 2, yb - 2 * h // 5, x0 + w - w // 6 - 1, x0 + w - 1, CAR, np.float32((200, 30, 30)))
    if real:
        img = _realistic_look(img, lab, hy, rng)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lab


def _realistic_look(img, lab, hy, rng):
    """Target-domain appearance: texture, lighting, blur and sensor noise."""
    H, W = lab.shape
    ys, xs = np.arange(H, dtype=np.float32)[:, None], np.arange(W, dtype=np.float32)[None, :]
    tex = np.ones((H, W), np.float32)
    grain = rng.random((H, W), dtype=np.float32)
    blotch = rng.random((H // 4 + 1, W // 4 + 1), dtype=np.float32).repeat(4, 0).repeat(4, 1)[:H, :W]
    tex = np.where(lab == ROAD, 0.85 + 0.3 * grain, tex)  # asphalt grain
    tex = np.where((lab == SIDEWALK) & (((ys.astype(np.int32) % 5) == 0) | ((xs.astype(np.int32) % 9) == 0)), 0.8, tex)
    tex = np.where((lab == BUILDING) & (ys.astype(np.int32) % 3 == 0), 0.88, tex)  # brick courses
    tex = np.where(lab == VEGETATION, 0.6 + 0.5 * blotch + 0.2 * grain, tex)  # leaves
    sky_haze = np.clip((ys - hy) / max(hy, 1) + 1, 0, 1) * 40  # brighter towards the horizon
    img = img * tex[..., None] + np.where(lab == SKY, sky_haze, 0)[..., None]
    tint = rng.uniform(0.85, 1.1, 3).astype(np.float32) * np.float32(rng.uniform(0.55, 1.0))
    slope = np.float32(rng.uniform(-0.35, 0.35))
    r2 = ((ys - H / 2) / H) ** 2 + ((xs - W / 2) / W) ** 2
    light = (1 + slope * (xs / W - 0.5)) * (1 - 1.2 * r2)  # lighting gradient + vignette
    img = img * tint * light[..., None]
    img = (img[:-2] + 2 * img[1:-1] + img[2:]) / 4  # separable [1 2 1] blur, edges kept
    img = np.concatenate([img[:1], img, img[-1:]], 0)
    img = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) / 4
    img = np.concatenate([img[:, :1], img, img[:, -1:]], 1)
    return img + rng.normal(0, 6, img.shape).astype(np.float32)  # sensor noise


def scene_seed(domain: str, split: str, index: int, base_seed: int = 0) -> int:
    """Stable seed per (domain, split, index): base_seed, crc32 tag and index packed in
    separate bit fields, so it is injective; crc32 is not salted like hash()."""
    if not (0 <= index < 2**32 and base_seed >= 0):
        raise ValueError("index must be in [0, 2**32) and base_seed >= 0")
    return (int(base_seed) << 64) | (zlib.crc32(f"{domain}/{split}".encode()) << 32) | int(index)


def class_shares(domain: str, split: str = "train", num_images: int | None = None, base_seed: int = 0):
    """(share of the labelled pixels per class, float64 array of 8; per-image shares, N x 8) over the first
    num_images frames of a split (default: all), at the native 128x256."""
    ds = ToyDomain(domain, split, num_images, base_seed=base_seed)
    per_image = np.stack([np.bincount(ds[i][1].ravel(), minlength=len(TOY_CLASSES))[:len(TOY_CLASSES)]
                          for i in range(len(ds))]).astype(np.float64)
    per_image /= per_image.sum(1, keepdims=True)  # every toy pixel has a class: all frames weigh the same
    return per_image.mean(0), per_image


class ToyDomain:
    """A toy dataset split; images are rendered on the fly, nothing is cached."""

    def __init__(self, domain: str, split: str, num_images: int | None = None,
                 height: int = 128, width: int = 256, base_seed: int = 0):
        if domain not in TOY_DOMAINS:
            raise ValueError(f"unknown toy domain {domain!r}; choose from {list(TOY_DOMAINS)}")
        if split not in TOY_SPLIT_SIZES:
            raise ValueError(f"unknown split {split!r}; choose from {list(TOY_SPLIT_SIZES)}")
        self.domain, self.split, self.style = domain, split, TOY_DOMAINS[domain]
        self.height, self.width, self.base_seed = height, width, base_seed
        n = TOY_SPLIT_SIZES[split] if num_images is None else int(num_images)
        self.classes = list(TOY_CLASSES)
        self.names = [f"{domain}/{split}/{i:05d}" for i in range(n)]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        seed = scene_seed(self.domain, self.split, i % len(self), self.base_seed)
        return render_scene(seed, self.style, self.height, self.width)
