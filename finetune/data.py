"""Training images from a folder (textual inversion, DreamBooth): read through ``datasets``, every
file checked once, an unreadable one skipped with a warning that names it, captions from
``NAME.txt`` beside ``NAME.png`` when present, subject masks from ``NAME.mask.png`` (white: the
subject; the masked loss, ``mask_weights``); and the resize / crop / flip of a training image."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from ldm.images import load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_TAG = ".mask"  # NAME.mask.png beside NAME.png: that image's subject mask, not a training image


def _read_mask(mask_path: Path, image: Image.Image) -> Image.Image:
    """The mask as a greyscale image of its image's size; a mask of another aspect ratio is an error."""
    try:
        mask = load_image(mask_path, "L")
    except ValueError as exc:
        raise ValueError(f"mask {str(mask_path)!r}: {exc}") from exc
    (mw, mh), (w, h) = mask.size, image.size
    if abs(mw * h - mh * w) > max(w, h):  # the same shape up to a pixel of rounding
        raise ValueError(f"mask {str(mask_path)!r} is {mw}x{mh} but its image is {w}x{h}: give a mask of the "
                         "image's size (white where the subject is)")
    return mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.BILINEAR)


def read_image_folder(directory: str | Path, what: str = "--data-dir", companion: tuple[str, str] = ("mask", MASK_TAG)):
    """A ``datasets.Dataset`` with columns ``image`` (decoded to RGB PIL images), ``path``,
    ``caption`` (the text of NAME.txt, or None) and ``mask`` (NAME.mask.png as a greyscale image of
    the image's size, or None) for every readable image in ``directory``. An image with an unreadable
    or misshapen mask is skipped with a warning, like an unreadable image. ``companion`` (column, file
    tag) names the file beside an image instead (default the mask; ControlNet training reads
    ``("conditioning_image", ".control")``, NAME.control.png as an RGB image of any size)."""
    import datasets

    directory = Path(directory) if directory else None
    if directory is None or not directory.is_dir():
        raise FileNotFoundError(f"{what} {str(directory)!r} is not a folder; point it at a folder of images "
                                f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    column, tag = companion
    listed = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in listed if not p.stem.endswith(tag)]
    side_files = {p.stem[:-len(tag)]: p for p in listed if p.stem.endswith(tag)}
    for stem in sorted(set(side_files) - {p.stem for p in files}):
        log.warning("%s %s has no image %s.* beside it: unused", column.replace("_", " "), side_files[stem], stem)
    if not files:
        raise FileNotFoundError(f"{what} {str(directory)!r} holds no images "
                                f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    images, paths, captions, masks = [], [], [], []
    for path in files:
        try:
            img = load_image(path)  # RGBA over white, greyscale and palette images to RGB
            side = side_files.get(path.stem)
            mask = None if side is None else _read_mask(side, img) if column == "mask" else load_image(side)
        except ValueError as exc:
            log.warning("skipped %s: %s", path, exc)
            continue
        cap = path.with_suffix(".txt")
        images.append(img)
        masks.append(mask)
        paths.append(str(path))
        captions.append(cap.read_text(encoding="utf-8").strip() if cap.is_file() else None)
    if not images:
        raise FileNotFoundError(f"{what} {str(directory)!r}: none of its {len(files)} image files could be read "
                                "(see the warnings above)")
    if len(images) < len(files):
        log.warning("%s: using %d of %d images", directory, len(images), len(files))
    features = datasets.Features({"image": datasets.Image(), "path": datasets.Value("string"),
                                  "caption": datasets.Value("string"), column: datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "path": paths, "caption": captions, column: masks},
                                      features=features)


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


def mask_weights(data, resolution: int, center_crop: bool, random_flip: bool, latent_size: int, weight: float):
    """The masked loss: (N, views, 1, latent_size, latent_size) per-latent-pixel weights of the
    squared error, in the views ``encode_views`` makes (the same square, the mirror with
    ``random_flip``), 1 + ``weight`` x the mask's mean over the pixels a latent pixel covers, each
    view divided by its mean (so every image's loss keeps its scale; where the subject is small its
    pixels gain the most). Images without a mask are weighted uniformly. None when ``weight`` is 0 or
    no image has a mask (a warning then: the loss is the plain one)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .common import coverage_weights

    if not weight:
        return None
    masks = [data[i]["mask"] for i in range(len(data))]
    if all(m is None for m in masks):
        log.warning("mask_weight=%s but no image has a mask (NAME%s.png beside NAME.png): the loss is uniform",
                    weight, MASK_TAG)
        return None
    out = []
    for i, mask in enumerate(masks):
        if mask is None:
            out.append(torch.ones(2 if random_flip else 1, 1, latent_size, latent_size))
            continue
        m = torch.from_numpy(np.asarray(square(mask.convert("L"), resolution, center_crop), np.float32) / 255.0)
        cov = F.adaptive_avg_pool2d(m[None, None], latent_size)[0]  # (1, h, w) in [0, 1]
        views = [cov] + ([cov.flip(-1)] if random_flip else [])
        out.append(coverage_weights(torch.stack(views).clamp(0, 1), weight))
    return torch.stack(out)


def base_model_path(path: str | None):
    """``path``, or the embedded model when None (an error naming --model when none is installed)."""
    from ldm.models import ModelError, default_model_path

    path = path or default_model_path()
    if path is None:
        raise ModelError("no model given and no embedded model is installed; pass --model DIR")
    return path


def load_base_model(path: str | None, device):
    """The model a fine-tuning starts from (default: the embedded one), fp32 (the master weights)."""
    from ldm.models import load_model

    return load_model(base_model_path(path), device=device, dtype="fp32")


def training_resolution(model, resolution: int | None) -> int:
    """``resolution``, or the model's native size; a multiple of the VAE's factor."""
    from .config import ConfigError

    f = model.vae_factor
    res = resolution or model.native_size
    if res % f:
        raise ConfigError(f"resolution {res} is not a multiple of {f} (the VAE's factor); "
                          f"try {max(f, round(res / f) * f)}")
    return res


def crop_ids(data, resolution: int, center_crop: bool, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """Per image of ``data``: its original size and the top-left corner of the square cut from it, in
    the coordinates of the image scaled to ``resolution`` (SDXL's micro-conditioning, as diffusers'
    SDXL training scripts compute it): (height, width, top, left)."""
    out = []
    n = len(data) if limit is None else min(limit, len(data))
    for i in range(n):
        w, h = data[i]["image"].size
        top = left = 0
        if center_crop:
            s = min(w, h)
            top, left = round((h - s) / 2 * resolution / s), round((w - s) / 2 * resolution / s)
        out.append((h, w, top, left))
    return out


def encode_views(model, data, resolution: int, center_crop: bool, random_flip: bool, limit: int | None = None,
                 progress: bool = False):
    """(N, views, 4, h, w): the scaled posterior-mean latents of each image of ``data`` (a
    read_image_folder dataset) made square, and of its mirror image too with ``random_flip``."""
    import torch
    from tqdm.auto import tqdm

    from ldm import autoencoder
    from ldm.images import to_tensor

    out = []
    n = len(data) if limit is None else min(limit, len(data))
    for i in tqdm(range(n), desc="caching latents", disable=not progress):
        img = square(data[i]["image"], resolution, center_crop)  # other sizes are resized
        views = [img] + ([img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if random_flip else [])
        x = torch.cat([to_tensor(v) for v in views])
        out.append(autoencoder.encode(model.vae, x.to(model.device)).cpu())
    return torch.stack(out)
