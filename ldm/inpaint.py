"""Inpainting's image side, as AUTOMATIC1111 prepares and finishes it (no model here).

- ``blur_mask``: the mask blurred with a Gaussian of sigma ``radius`` px, horizontally then vertically
  (OpenCV's GaussianBlur with a kernel of 2 * int(2.5 * sigma + 0.5) + 1 taps, A1111's ``mask_blur``).
- ``fill_masked``: the masked region painted with the colours around it (a normalised blur from wide to
  narrow radii, each pass drawn over the last), A1111's "fill" start for the masked area.
- ``crop_region``: "only masked" (A1111's ``inpaint_full_res``): the mask's bounding box grown by
  ``padding`` px, then grown to the working size's aspect ratio, inside the image.
- ``overlay``: the finished image: the generation (pasted into its region when only the masked part
  was worked) over the original, by the overlay mask; where that mask is 0 the original's pixels come
  back exactly.
- ``latent_mask``: the mask at the latents' size, rounded to 0 / 1 (A1111's ``mask_round``): 1 = repaint.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FILL_RADII = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (blur sigma px, passes), wide to narrow


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """The ``L`` mask blurred by a Gaussian of sigma ``radius`` px (0: unchanged)."""
    if radius <= 0:
        return mask
    import cv2

    taps = 2 * int(2.5 * radius + 0.5) + 1
    m = np.asarray(mask.convert("L"))
    m = cv2.GaussianBlur(m, (taps, 1), radius)
    m = cv2.GaussianBlur(m, (1, taps), radius)
    return Image.fromarray(m)


def _gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    if sigma <= 0:
        return a
    return cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with the region where ``mask`` is white painted from the colours around it: at each
    radius the kept pixels blurred and divided by the blurred keep-weight (a normalised convolution),
    drawn over the running result with that weight as its opacity; the kept region is the image's own."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep = 1.0 - np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    out = np.zeros_like(rgb)
    for sigma, passes in FILL_RADII:
        w = _gauss(keep, sigma)
        colour = _gauss(rgb * keep[..., None], sigma) / np.maximum(w, 1e-6)[..., None]
        alpha = np.clip(w / max(float(w.max()), 1e-6), 0, 1)[..., None] if sigma else keep[..., None]
        for _ in range(passes):
            out = colour * alpha + out * (1 - alpha)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2), x2 / y2 exclusive: the box of the mask's non-zero pixels grown by ``padding`` px
    on each side, then grown (centred, kept inside the image) to the aspect ratio width : height of the
    size it will be worked at; None for an empty mask."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    W, H = mask.size
    x1, y1, x2, y2 = max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, W), \
        min(box[3] + padding, H)
    w, h = x2 - x1, y2 - y1
    if w / h < width / height:  # too narrow: widen
        want = min(round(h * width / height), W)
        x1 = min(max(x1 - (want - w) // 2, 0), W - want)
        x2 = x1 + want
    else:  # too flat: heighten
        want = min(round(w * height / width), H)
        y1 = min(max(y1 - (want - h) // 2, 0), H - want)
        y2 = y1 + want
    return x1, y1, x2, y2


def overlay(original: Image.Image, generated: Image.Image, mask: Image.Image,
            region: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The generation over the original: ``generated`` (resized into ``region`` of the original when
    given) where ``mask`` (``L``, the original's size) is white, the original where it is black, mixed
    in between."""
    original = original.convert("RGB")
    if region is not None:
        x1, y1, x2, y2 = region
        canvas = original.copy()
        canvas.paste(generated.convert("RGB").resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        generated = canvas
    return Image.composite(generated.convert("RGB"), original, mask.convert("L"))


def latent_mask(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, 1, height, width): the mask resized (bicubic) to the latents' size and rounded, 1 = repaint."""
    small = mask.convert("L").resize((width, height), Image.BICUBIC)
    m = np.round(np.asarray(small, dtype=np.float32) / 255.0)
    return torch.from_numpy(m)[None, None]
