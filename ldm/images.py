"""Image files and tensors: reading with clear errors, conversions, grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open an image file and convert it (RGBA, palette and greyscale included) to ``mode``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image file {str(path)!r} is a folder; give an image file (PNG, JPEG, WebP, ...)")
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
    return _open(path, mode, repr(str(path)))


def decode_image(data: bytes, mode: str = "RGB", what: str = "the image", max_side: int | None = None) -> Image.Image:
    """An image file's bytes (PNG, JPEG, WebP, ...) -> a PIL image in ``mode``, converted as
    ``load_image`` converts; ``what`` names the source in the error. With ``max_side``, an image whose
    header says it is larger is refused before its pixels are decoded (a small file can hold a huge
    image)."""
    return _open(io.BytesIO(data), mode, what, max_side)


def _open(source, mode: str, what: str, max_side: int | None = None) -> Image.Image:
    import warnings

    try:
        with warnings.catch_warnings():  # Pillow's warning of a large image: max_side decides here
            if max_side is not None:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)  # reads the header only
        with im:
            if max_side is not None and max(im.size) > max_side:
                raise ValueError(f"is {im.size[0]}x{im.size[1]}; sides must be at most {max_side}")
            im.load()
            if im.mode in ("RGBA", "LA", "P") and mode == "RGB":
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)  # transparent parts become white, not black
            return im.convert(mode)
    except UnidentifiedImageError as exc:
        raise ValueError(f"cannot read image {what}: not an image format Pillow reads (PNG, JPEG, WebP, ...)") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own bound, checked on opening
        raise ValueError(f"cannot read image {what}: it is too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {what}: {exc}") from exc


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 RGB pixels (N, H, W, 3) -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1]."""
    return pixels_to_tensor(np.asarray(image.convert("RGB"))[None])


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    arr = (pixels.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all of the first one's size) into a grid, row by row."""
    if not images:
        raise ValueError("no images for a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
