"""The shapes world (../shared/SHAPES.md): a deterministic renderer, captions, a seeded
``datasets.Dataset``, and the detector that judges an image by the world's rules.

Every sample is a function of ``(seed, index)`` alone, so a dataset of any size is reproducible and
item ``i`` does not depend on how many items were asked for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 64
PALETTE = {
    "red": (215, 25, 35),
    "green": (30, 165, 60),
    "blue": (35, 75, 230),
    "yellow": (245, 230, 50),
    "purple": (145, 40, 200),
    "orange": (245, 125, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "teal": (0, 170, 190),
}
SHAPE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": (14, 22), "large": (30, 40)}
SMALL_MAX = 26  # a detected box whose longer side is at most this is `small`
HELD_OUT = (("purple", "triangle"), ("green", "circle"), ("orange", "star"))
RESERVED_COLORS = ("teal",)
RESERVED_SHAPES = ("ring",)
ALL_SHAPES = SHAPES + RESERVED_SHAPES
MARGIN = 2


@dataclass(frozen=True)
class Scene:
    """One image of the world: what it shows and where."""
    size: str
    color: str
    shape: str
    background: str
    s: int = 0   # side of the shape's box, px
    x0: int = 0  # top-left corner of the box
    y0: int = 0

    @property
    def caption(self) -> str:
        return caption(self.size, self.color, self.shape, self.background)


def caption(size: str | None, color: str | None, shape: str, background: str | None) -> str:
    """``a {size} {color} {shape} on a {background} background``; any attribute but the shape may be
    None, which leaves it out (``a red circle``, ``a star on a black background``)."""
    words = ["a"] + [w for w in (size, color) if w] + [shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def partial_caption(scene: Scene, rng: np.random.Generator, drop: float) -> str:
    """The scene's caption with size, colour and background each left out with probability ``drop``
    (so that short prompts work); the shape is always named."""
    keep = rng.random(3) >= drop
    return caption(scene.size if keep[0] else None, scene.color if keep[1] else None, scene.shape,
                   scene.background if keep[2] else None)


# ----------------------------------------------------------------------------------------------
# rendering

def _star_points(x0: float, y0: float, w: float, h: float) -> list[tuple[float, float]]:
    """Five-pointed star, one point up, in a box of w x h (w == h for the world's stars): outer radius
    R = w/2, inner 0.4 R, centred horizontally, and vertically so that its height R(1 + cos 36)
    is centred; for w != h it is stretched vertically to fill the box (used by the detector)."""
    R = w / 2
    height = R * (1 + math.cos(math.radians(36)))
    sy = h / w
    cx = x0 + (w - 1) / 2
    top = y0 + ((w - 1) - height) / 2 * sy
    pts = []
    for k in range(10):
        r = R if k % 2 == 0 else 0.4 * R
        a = math.radians(90 + 36 * k)
        pts.append((cx + r * math.cos(a), top + (R - r * math.sin(a)) * sy))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, w: int, h: int, fill, hole_fill=None):
    """Draw ``shape`` into the box [x0, x0+w-1] x [y0, y0+h-1] (no anti-aliasing)."""
    x1, y1 = x0 + w - 1, y0 + h - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + (w - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(x0, y0, w, h), fill=fill)
    elif shape == "ring":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = (w - 1) / 4, (h - 1) / 4  # a hole of half the radius
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=hole_fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(ALL_SHAPES)}")


def render(scene: Scene) -> Image.Image:
    """The 64x64 RGB image of ``scene``."""
    img = Image.new("RGB", (CANVAS, CANVAS), PALETTE[scene.background])
    draw_shape(ImageDraw.Draw(img), scene.shape, scene.x0, scene.y0, scene.s, scene.s,
               PALETTE[scene.color], PALETTE[scene.background])
    return img


def render_mask(scene: Scene) -> Image.Image:
    """The 64x64 greyscale mask of ``scene``'s shape (255 on the shape, 0 elsewhere, a ring's hole 0)."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw_shape(ImageDraw.Draw(img), scene.shape, scene.x0, scene.y0, scene.s, scene.s, 255, 0)
    return img


CONDITIONS = ("silhouette", "canny")  # the control images of a scene (ControlNet training and judging)


def render_condition(scene: Scene, kind: str) -> Image.Image:
    """The RGB control image of ``scene``: ``silhouette`` (the shape white on black, render_mask) or
    ``canny`` (OpenCV's Canny edges of its render at the default thresholds, what ``--control-preprocessor
    canny`` makes of it)."""
    if kind == "silhouette":
        return render_mask(scene).convert("RGB")
    if kind == "canny":
        from ldm.control import preprocess

        return preprocess(render(scene), "canny")
    raise ValueError(f"unknown condition {kind!r}; expected one of {', '.join(CONDITIONS)}")


def size_class(side: int) -> str:
    """The size word of a box side: small up to SMALL_MAX (the detector's rule), else large."""
    return "small" if side <= SMALL_MAX else "large"


def free_scene(seed: int, index: int, lo: int = 14, hi: int = 40, split: str = "train",
               sizes: str = "uniform") -> Scene:
    """Scene ``index`` of a seeded stream whose box side is drawn in [lo, hi] (sizes between the
    world's two classes too, named by size_class) anywhere on the canvas (MARGIN from the edges): the
    placements a control image asks for. ``sizes``: uniform, or log-uniform (as many sides from 10 to
    20 px as from 20 to 40: more of the small ones, where a pixel is a larger part of the box)."""
    if not MARGIN * 2 < lo <= hi <= CANVAS - 2 * MARGIN:
        raise ValueError(f"box sides {lo}..{hi}: give {2 * MARGIN} < lo <= hi <= {CANVAS - 2 * MARGIN}")
    rng = np.random.default_rng([seed, index, 97])
    combos = combinations(split)
    _, color, shape, bg = combos[int(rng.integers(len(combos)))]
    if sizes == "uniform":
        s = int(rng.integers(lo, hi + 1))
    elif sizes == "log-uniform":  # a continuous log-uniform draw over [lo - 0.5, hi + 0.5], rounded
        s = min(hi, max(lo, int(np.rint(np.exp(rng.uniform(np.log(lo - 0.5), np.log(hi + 0.5)))))))
    else:
        raise ValueError(f"sizes must be uniform or log-uniform, got {sizes!r}")
    return Scene(size_class(s), color, shape, bg, s, *_corner(rng, s))


OFF_PALETTE_DISTANCE = 60.0  # an off-palette colour is at least this RGB distance from every palette colour


def off_palette_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniformly random RGB colour at least ``OFF_PALETTE_DISTANCE`` from every palette colour."""
    while True:
        c = rng.integers(0, 256, size=3)
        if np.sqrt(((_RGB - c) ** 2).sum(-1)).min() >= OFF_PALETTE_DISTANCE:
            return tuple(int(v) for v in c)


def place(rng: np.random.Generator, size: str, color: str, shape: str, background: str) -> Scene:
    """Draw the box side and position for a scene with these attributes."""
    lo, hi = SIZES[size]
    s = int(rng.integers(lo, hi + 1))
    return Scene(size, color, shape, background, s, *_corner(rng, s))


def _corner(rng: np.random.Generator, s: int) -> tuple[int, int]:
    """The top-left corner of an s-px box, uniform with MARGIN px to every edge."""
    x0, y0 = (int(v) for v in rng.integers(MARGIN, CANVAS - MARGIN - s + 1, size=2))
    return x0, y0


def combinations(split: str = "train", *, sizes=None, colors=None, shapes=None,
                 backgrounds=None) -> list[tuple[str, str, str, str]]:
    """All (size, colour, shape, background) of a split:
    ``train`` (base training: no held-out pair, nothing reserved), ``heldout`` (only the held-out
    pairs), ``seen`` (= train), ``all`` (train + heldout), ``codec`` (all, and the reserved teal and
    ring too: what the VAE, the model's general image codec, may see); each keyword, when given, keeps
    only the combinations whose attribute is among its values."""
    if split not in ("train", "seen", "heldout", "all", "codec"):
        raise ValueError(f"unknown split {split!r}; expected train, seen, heldout, all or codec")
    codec = split == "codec"
    out = []
    for size in SIZES:
        for color in SHAPE_COLORS + (RESERVED_COLORS if codec else ()):
            for shape in ALL_SHAPES if codec else SHAPES:
                held = (color, shape) in HELD_OUT
                if split in ("train", "seen") and held or split == "heldout" and not held:
                    continue
                for bg in BACKGROUNDS:
                    if bg != color:
                        out.append((size, color, shape, bg))
    for k, allowed in enumerate((sizes, colors, shapes, backgrounds)):
        if allowed is not None:
            out = [c for c in out if c[k] in allowed]
    return out


def sample_scene(seed: int, index: int, split: str = "train", *, color: str | None = None,
                 shape: str | None = None, backgrounds=None, sizes=None) -> Scene:
    """Scene ``index`` of the seeded stream for ``split``. ``color``/``shape`` fix those attributes
    (reserved ones included: ``color="teal", shape="ring"`` renders the personalisation subject).
    With one of them fixed to a regular value, the other is drawn within ``split`` (``color="orange"``
    gives no star in ``train`` and only stars in ``heldout``)."""
    rng = np.random.default_rng([seed, index])
    if color is None and shape is None:
        combos = combinations(split)
        size, color_, shape_, bg = combos[int(rng.integers(len(combos)))]
        if sizes is not None or backgrounds is not None:
            raise ValueError("sizes/backgrounds restrict a fixed colour or shape only")
        return place(rng, size, color_, shape_, bg)
    if (color is None) != (shape is None) and (color or shape) not in RESERVED_COLORS + RESERVED_SHAPES:
        pool = combinations(split, sizes=sizes, backgrounds=backgrounds, colors=color and [color],
                            shapes=shape and [shape])
        if not pool:
            what = f"colour {color!r}" if color else f"shape {shape!r}"
            raise ValueError(f"no scene of split {split!r} has {what} with sizes={sizes} backgrounds={backgrounds}")
        return place(rng, *pool[int(rng.integers(len(pool)))])
    color = color or SHAPE_COLORS[int(rng.integers(len(SHAPE_COLORS)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    sizes = tuple(sizes or SIZES)
    bgs = [b for b in (backgrounds or BACKGROUNDS) if b != color]
    size = sizes[int(rng.integers(len(sizes)))]
    bg = bgs[int(rng.integers(len(bgs)))]
    return place(rng, size, color, shape, bg)


def dataset(n: int, seed: int = 0, split: str = "train", **fixed):
    """A ``datasets.Dataset`` of ``n`` rendered scenes: columns image (PIL), caption, size, color,
    shape, background, s, x0, y0. Same (n, seed, split) gives the same rows."""
    import datasets

    scenes = [sample_scene(seed, i, split, **fixed) for i in range(n)]
    cols = {k: [getattr(sc, k) for sc in scenes] for k in asdict(scenes[0])} if scenes else {}
    cols["caption"] = [sc.caption for sc in scenes]
    cols["image"] = [render(sc) for sc in scenes]
    features = datasets.Features({
        "image": datasets.Image(), "caption": datasets.Value("string"),
        **{k: datasets.Value("string") for k in ("size", "color", "shape", "background")},
        **{k: datasets.Value("int32") for k in ("s", "x0", "y0")},
    })
    return datasets.Dataset.from_dict(cols, features=features)


def render_batch(scenes) -> np.ndarray:
    """Scenes as a uint8 array (N, 64, 64, 3)."""
    return np.stack([np.asarray(render(sc)) for sc in scenes])


def render_tensor(scenes):
    """Scenes as a float tensor (N, 3, 64, 64) in [-1, 1], as the VAE and the CLIP read images."""
    from ldm.images import pixels_to_tensor

    return pixels_to_tensor(render_batch(scenes))


# ----------------------------------------------------------------------------------------------
# judging

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[c] for c in _NAMES], dtype=np.float32)
_BG_IDX = [_NAMES.index(c) for c in BACKGROUNDS]
DIFF_THRESHOLD = 60.0  # RGB distance from the background that counts as "clearly different"


def _nearest(rgb: np.ndarray, candidates: list[int]) -> str:
    d = ((_RGB[candidates] - rgb) ** 2).sum(-1)
    return _NAMES[candidates[int(d.argmin())]]


def _template(shape: str, w: int, h: int) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw_shape(ImageDraw.Draw(img), shape, 0, 0, w, h, 255, 0)
    return np.asarray(img) > 0


def _largest(ndimage, mask: np.ndarray) -> np.ndarray | None:
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


@dataclass(frozen=True)
class Reading:
    """What the detector reads in an image (None where there is no shape)."""
    background: str
    color: str | None
    shape: str | None
    size: str | None
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 inclusive

    def matches(self, **want) -> dict[str, bool]:
        """Per attribute: does the reading match what was asked (attributes given as None are skipped)."""
        return {k: getattr(self, k) == v for k, v in want.items() if v is not None}


def detect(image) -> Reading:
    """Read background, shape colour, shape and size class of an image, by SHAPES.md's rules."""
    from scipy import ndimage

    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, _BG_IDX)
    diff = np.sqrt(((a - _RGB[_NAMES.index(background)]) ** 2).sum(-1)) > DIFF_THRESHOLD
    region = _largest(ndimage, diff)
    if region is None:
        return Reading(background, None, None, None)
    interior = ndimage.binary_erosion(region)
    pix = a[interior] if interior.sum() >= 4 else a[region]
    color = _nearest(np.median(pix, axis=0), list(range(len(_NAMES))))
    # Second pass: a pixel belongs to the shape when it lies past the midpoint between the background
    # and shape colours. Blur is linear, so a blurred edge still crosses the midpoint where it was.
    bg_c, fg_c = _RGB[_NAMES.index(background)], _RGB[_NAMES.index(color)]
    axis = fg_c - bg_c
    t = ((a - bg_c) @ axis) / max(float(axis @ axis), 1e-6)
    region = _largest(ndimage, t > 0.5)
    if region is None:
        return Reading(background, None, None, None)
    ys, xs = np.nonzero(region)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = x1 - x0 + 1, y1 - y0 + 1
    crop = region[y0:y1 + 1, x0:x1 + 1]
    best, shape = -1.0, None
    for kind in ALL_SHAPES:
        t = _template(kind, w, h)
        iou = (t & crop).sum() / max((t | crop).sum(), 1)
        if iou > best:
            best, shape = iou, kind
    size = size_class(max(w, h))
    return Reading(background, color, shape, size, (int(x0), int(y0), int(x1), int(y1)))


def box_iou(a, b) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1), as Reading.box gives them; 0 when either is None."""
    if a is None or b is None:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / area


def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 1.0, noise: float = 8.0) -> Image.Image:
    """Gaussian blur of ``blur`` px radius and Gaussian pixel noise of std ``noise`` (the detector's
    robustness test)."""
    from PIL import ImageFilter

    a = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    a = a + rng.normal(0, noise, a.shape)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


def box_coverage(scenes, factor: int, margin: int = 0) -> np.ndarray:
    """(N, CANVAS // factor, CANVAS // factor): the fraction of each ``factor`` x ``factor`` cell (a
    latent pixel of a VAE of that factor) that the scene's shape box, grown by ``margin`` px on each
    side, covers."""
    edges = np.arange(0, CANVAS + 1, factor)
    lo, hi = edges[:-1], edges[1:]

    def overlap(start: int, side: int) -> np.ndarray:  # of [start - margin, start + side + margin) with each cell
        return np.clip(np.minimum(hi, start + side + margin) - np.maximum(lo, start - margin), 0, None)

    out = np.zeros((len(scenes), CANVAS // factor, CANVAS // factor), np.float32)
    for k, sc in enumerate(scenes):
        out[k] = np.outer(overlap(sc.y0, sc.s), overlap(sc.x0, sc.s)) / factor ** 2
    return out


def encode_scenes(vae, scenes, device, progress: bool = True, chunk: int = 64):
    """(N, 4, h, w): the scaled posterior-mean latents of the rendered ``scenes`` (what the U-Net and
    the distillation train on). Chunks of 64 keep the encoder's activations in the CPU's caches: on 2
    cores 10,000 scenes took 16.8 s against 27.4 s in chunks of 500 (the same latents bit for bit on
    the shipped VAE; a kernel chosen by batch size may round differently on other weights)."""
    import torch
    from tqdm.auto import tqdm

    lat = []
    with torch.no_grad():
        for i in tqdm(range(0, len(scenes), chunk), desc="caching latents", disable=not progress):
            x = render_tensor(scenes[i:i + chunk])
            lat.append(vae.encode(x.to(device, vae.dtype)).latent_dist.mode().float().cpu())
    return torch.cat(lat) * vae.config.scaling_factor
