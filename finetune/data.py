"""Training images from a folder (textual inversion, DreamBooth): read through ``datasets``, every
file checked once, an unreadable one skipped with a warning that names it, captions from
``NAME.txt`` beside ``NAME.png`` when present; and the resize / crop / flip of a training image."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from ldm.images import load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_folder(directory: str | Path, what: str = "--data-dir"):
    """A ``datasets.Dataset`` with columns ``image`` (decoded to RGB PIL images), ``path`` and
    ``caption`` (the text of NAME.txt, or None) for every readable image in ``directory``."""
    import datasets

    directory = Path(directory) if directory else None
    if directory is None or not directory.is_dir():
        raise FileNotFoundError(f"{what} {str(directory)!r} is not a folder; point it at a folder of images "
                                f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{what} {str(directory)!r} holds no images "
                                f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    images, paths, captions = [], [], []
    for path in files:
        try:
            img = load_image(path)  # RGBA over white, greyscale and palette images to RGB
        except ValueError as exc:
            log.warning("skipped %s: %s", path, exc)
            continue
        cap = path.with_suffix(".txt")
        images.append(img)
        paths.append(str(path))
        captions.append(cap.read_text(encoding="utf-8").strip() if cap.is_file() else None)
    if not images:
        raise FileNotFoundError(f"{what} {str(directory)!r}: none of its {len(files)} image files could be read "
                                "(see the warnings above)")
    if len(images) < len(files):
        log.warning("%s: using %d of %d images", directory, len(images), len(files))
    features = datasets.Features({"image": datasets.Image(), "path": datasets.Value("string"),
                                  "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "path": paths, "caption": captions}, features=features)


def square(image: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """``resolution`` x ``resolution``: the centre square scaled (``center_crop``), or the whole
    image scaled to the square (aspect not kept, as diffusers' textual-inversion example does)."""
    if center_crop:
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return image
