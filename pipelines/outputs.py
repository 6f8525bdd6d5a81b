"""Where results go, checked before any work: a destination that cannot be written is found before
a model loads or a step runs, not after the images are made (and lost behind a traceback)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

IMAGE_SUFFIX = ".png"  # images carry their parameters in a PNG text chunk


class OutputError(ValueError):
    """A destination that cannot be written, with the flag that named it."""


def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a file, not a folder; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{flag} {str(path)!r} cannot be written: {reason}; choose another folder") from None
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """An image file name that ends in .png and whose folder can be written."""
    path = Path(path)
    if path.suffix.lower() != IMAGE_SUFFIX:
        raise OutputError(f"{flag} {str(path)!r}: images are written as PNG (the generation parameters travel in "
                          f"a PNG text chunk); give a name ending in .png")
    if path.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a folder; give a file name, or use --output-dir")
    check_output_dir(path.parent, f"{flag}'s folder")
    return path


def write_report(output_dir: Path, report: dict, name: str = "report.json") -> Path:
    """``output_dir/name`` as JSON, written whole and then renamed into place."""
    tmp = Path(output_dir) / f".{name}.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, Path(output_dir) / name)
    return Path(output_dir) / name
