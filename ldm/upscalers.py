"""Model upscalers: the image super-resolution networks people keep beside their checkpoints (ESRGAN,
Real-ESRGAN and its compact models, SwinIR, 4x-UltraSharp and the other community ESRGANs, ...) as
``.safetensors`` or ``.pth`` files, loaded through spandrel (the library ComfyUI and chaiNNer use to
recognise these architectures from their tensors), and run tiled so that large images fit.

Loading is safe by default: a ``.safetensors`` file, or a pickle (``.pth`` / ``.pt`` / ``.ckpt``)
only with ``allow_pickle`` (``--allow-pickle``), as for every other file this project reads.

Tiling: the image is cut into tiles of ``tile`` px that overlap by at least ``overlap`` px; each
output pixel is taken from the tile whose edge is farthest from it (the cuts run through the middle
of each overlap), so the result equals one untiled pass wherever a network's reach is under half
the overlap (the tests' small networks); a full ESRGAN's reach on paper is far larger (23 blocks of 15
convolutions), so along the cuts its output differs a little from an untiled pass, as with A1111's and
ComfyUI's tiling. Tiles start at multiples of 16 px, so that windowed-attention networks (SwinIR,
HAT) see the windows of the untiled image.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
TILE, OVERLAP = 512, 32  # input pixels
MAX_SIDE = 16384  # `ldm upscale`'s largest output side, px
MAX_PASSES = 3  # A1111's: a 4x network run at most three times to reach a scale


class UpscalerError(ValueError):
    pass


def upscaler_files(folder: str | Path) -> dict[str, Path]:
    """The upscaler files of a folder and its subfolders, by name (the file's stem, as A1111 and
    ComfyUI list them)."""
    folder = Path(folder)
    return dict(sorted((p.stem, p) for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()))


def load_upscaler(path: str | Path, *, allow_pickle: bool = False, device: str | torch.device = "cpu"):
    """The spandrel ImageModelDescriptor of an upscaler file, in eval mode on ``device``."""
    import spandrel

    from .checkpoints import CheckpointError, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"upscaler file {str(path)!r} does not exist")
    try:
        sd = read_checkpoint(path, allow_pickle)
    except CheckpointError as exc:
        raise UpscalerError(str(exc)) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UpscalerError(f"{str(path)!r} holds no state dict of tensors: not an upscaler file")
    try:
        desc = spandrel.ModelLoader(device).load_from_state_dict(sd)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(f"{str(path)!r}: no architecture spandrel knows has these tensors ({len(sd)} of them, "
                            f"e.g. {', '.join(list(sd)[:3])}); use an ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT or other "
                            "architecture spandrel supports") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.input_channels != 3 or desc.output_channels != 3:
        raise UpscalerError(f"{str(path)!r} is a {desc.architecture.name} network for "
                            f"{getattr(desc, 'purpose', 'another task')}, not an RGB image upscaler")
    return desc.eval()


ALIGN = 16  # tile starts at multiples of this, so that windowed attention (SwinIR's 8, HAT's 16) sees the
#            windows of the untiled image


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one side, at multiples of ALIGN where the tile allows it, consecutive tiles
    overlapping by >= ``overlap``; the last tile runs to the end (up to ALIGN - 1 px longer than ``tile``)."""
    if length <= tile:
        return [0]
    step = (tile - overlap) // ALIGN * ALIGN or tile - overlap
    last = (length - tile) // ALIGN * ALIGN if step % ALIGN == 0 else length - tile
    starts = list(range(0, last, step))
    while len(starts) > 1 and last - starts[-2] <= step:  # a tile the last one makes needless
        starts.pop()
    return starts + [last]


def _cuts(starts: list[int], tile: int, length: int) -> list[int]:
    """Where each tile's share begins and ends: the middles of the overlaps."""
    middles = [(starts[i + 1] + starts[i] + tile) // 2 for i in range(len(starts) - 1)]
    return [0, *middles, length]


def _run(desc, x: torch.Tensor) -> torch.Tensor:
    """One pass of the network on (B, 3, h, w) in [0, 1], padded (reflect, or replicate where the side
    is too short) to its size requirements and cropped back."""
    req = desc.size_requirements
    h, w = x.shape[-2:]
    m = max(req.multiple_of, 1)
    th, tw = max(math.ceil(h / m) * m, req.minimum), max(math.ceil(w / m) * m, req.minimum)
    if req.square:
        th = tw = max(th, tw)
    if (th, tw) != (h, w):
        mode = "reflect" if th - h < h and tw - w < w else "replicate"
        x = torch.nn.functional.pad(x, (0, tw - w, 0, th - h), mode=mode)
    out = desc(x)
    return out[..., : h * desc.scale, : w * desc.scale]


@torch.no_grad()
def run_tiled(desc, x: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """The network on images (B, 3, H, W) in [0, 1], in tiles of ``tile`` px overlapping by at least
    ``overlap``; (B, 3, H x scale, W x scale)."""
    if overlap < 0 or tile <= overlap:
        raise UpscalerError(f"tile {tile} must be larger than overlap {overlap} (and overlap >= 0)")
    param = next(desc.model.parameters(), None)
    device = param.device if param is not None else x.device
    dtype = param.dtype if param is not None else torch.float32
    h, w = x.shape[-2:]
    s = desc.scale
    out = torch.empty(x.shape[0], 3, h * s, w * s, dtype=torch.float32, device=device)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    cy, cx = _cuts(ys, tile, h), _cuts(xs, tile, w)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            y1 = h if i == len(ys) - 1 else y0 + tile  # the last tiles run to the end
            x1 = w if j == len(xs) - 1 else x0 + tile
            part = x[..., y0:y1, x0:x1].to(device, dtype)
            res = _run(desc, part).float()
            a, b, c, d = cy[i], cy[i + 1], cx[j], cx[j + 1]  # this tile's share, in input pixels
            out[..., a * s:b * s, c * s:d * s] = res[..., (a - y0) * s:(b - y0) * s, (c - x0) * s:(d - x0) * s]
    return out.clamp(0, 1)


def upscale(desc, image: Image.Image, size: tuple[int, int], tile: int = TILE, overlap: int = OVERLAP) -> Image.Image:
    """``image`` at ``size`` (width, height) as A1111 does it with a model: the network run (at most
    three times) until the image is at least that large, then resized to it with Lanczos."""
    import numpy as np

    image = image.convert("RGB")
    passes = 0
    while (image.width < size[0] or image.height < size[1]) and passes < MAX_PASSES:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        y = run_tiled(desc, x, tile, overlap)[0].permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray((y * 255.0).round().astype("uint8"))
        passes += 1
        if desc.scale == 1:
            break
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.LANCZOS)
