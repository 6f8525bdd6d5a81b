"""Generation parameters in a PNG text chunk ``parameters``, in the layout AUTOMATIC1111's web UI
writes and the tools around it (image browsers, civitai, ComfyUI importers) read:

    a large red circle on a blue background
    Negative prompt: blurry
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: shapes
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldm.names import A1111_SAMPLERS, A1111_SCHEDULES, SCHEDULE_SAMPLERS

log = logging.getLogger(__name__)


def format_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, guidance: float, seed: int,
                      width: int, height: int, model: str, strength: float | None = None,
                      schedule: str | None = None, **extra) -> str:
    """A1111's infotext; sampler and schedule in A1111's names ("Sampler: DPM++ 2M, Schedule type:
    Karras"), so that its PNG Info reads them back as the settings that made the image."""
    fields = [("Steps", steps), ("Sampler", A1111_SAMPLERS.get(sampler, sampler))]
    if sampler in SCHEDULE_SAMPLERS:
        fields.append(("Schedule type", A1111_SCHEDULES.get(schedule or "default", schedule)))
    fields += [("CFG scale", guidance), ("Seed", seed), ("Size", f"{width}x{height}"), ("Model", model)]
    if strength is not None:
        fields.append(("Denoising strength", strength))
    fields += [(k, v) for k, v in extra.items() if v is not None]
    lines = [prompt.replace("\n", " ")]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields))
    return "\n".join(lines)


def _value(v) -> str:
    s = str(v)
    return f'"{s}"' if ("," in s or ":" in s) else s


def parse_parameters(text: str) -> dict:
    """Read A1111 ``parameters`` text back into a dict with ``prompt``, ``negative_prompt`` and
    each ``Key: value`` field of the last line."""
    lines = text.split("\n")
    last = lines[-1]
    out = {"prompt": "", "negative_prompt": ""}
    body = lines[:-1]
    neg = [i for i, ln in enumerate(body) if ln.startswith("Negative prompt: ")]
    if neg:
        out["prompt"] = "\n".join(body[:neg[0]])
        out["negative_prompt"] = "\n".join(body[neg[0]:])[len("Negative prompt: "):]
    else:
        out["prompt"] = "\n".join(body)
    for m in re.finditer(r'\s*([\w ]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', last):
        v = m.group(2).strip()
        out[m.group(1).strip()] = v[1:-1] if v.startswith('"') and v.endswith('"') else v
    return out


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """``image`` encoded as PNG with its ``parameters`` chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None, *, data: bytes | None = None,
             exclusive: bool = False) -> Path:
    """Write ``image`` with its ``parameters`` chunk (or already-encoded PNG ``data``), atomically (a
    temporary file of this process, then a rename), so an interrupted run never leaves a truncated image
    behind; returns where it went. With ``exclusive`` an existing file is never replaced (two servers on
    one folder): the image takes the next free name. A name that cannot be written (a folder of that
    name, a file that may not be replaced) gets another, ``NAME-1.png``, ..., with a warning, so a
    computed image is never lost to its name; a folder that cannot be written at all raises OSError."""
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # this writer's own
    try:
        with open(tmp, "xb") as f:
            f.write(png_bytes(image, parameters or "") if data is None else data)
        for k in range(1000):
            target = path if k == 0 else path.with_name(f"{path.stem}-{k}{path.suffix}")
            try:
                if exclusive:
                    os.link(tmp, target)  # fails if the name exists: nothing is replaced
                else:
                    if target.is_dir():
                        raise IsADirectoryError(str(target))
                    os.replace(tmp, target)
            except (FileExistsError, IsADirectoryError, PermissionError) as exc:
                if not exclusive or not isinstance(exc, FileExistsError):
                    log.warning("cannot write %s (%s); writing %s-N%s instead", target, type(exc).__name__,
                                path.stem, path.suffix)
                continue
            return target
        raise OSError(f"no free name for {path} (tried {path.stem}-1 .. -999)")
    finally:
        if tmp.exists():
            tmp.unlink()


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # where A1111 writes a JPEG's or WebP's parameters


def image_parameters(im: Image.Image) -> str | None:
    """An open image's A1111 parameters: the PNG chunk, or a JPEG's / WebP's EXIF UserComment (UNICODE:
    UTF-16 big-endian, or ASCII)."""
    text = im.info.get("parameters") or getattr(im, "text", {}).get("parameters")
    if text:
        return text
    raw = im.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(raw, bytes) and len(raw) > 8:
        head, body = raw[:8], raw[8:]
        return body.decode("utf-16-be" if head.startswith(b"UNICODE") else "latin-1", errors="replace")
    return raw if isinstance(raw, str) and raw else None


def exif_parameters(parameters: str) -> bytes:
    """EXIF bytes holding ``parameters`` as image_parameters reads them (and A1111 writes them)."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    return exif.tobytes()


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as im:
        return image_parameters(im)
