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
    remove_stale_temporaries(path)
    return path


STALE_SECONDS = 600


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files (``.NAME.png.<pid>-<token>.tmp``) that a writer killed mid-write left in
    ``folder``: those older than STALE_SECONDS (a live write lasts milliseconds); how many were removed."""
    import time

    removed = 0
    for f in Path(folder).glob(".*.png*.tmp"):
        try:
            if f.is_file() and time.time() - f.stat().st_mtime > STALE_SECONDS:
                f.unlink()
                removed += 1
        except OSError:
            pass
    return removed


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


class FolderBusy(OutputError):
    """Another running process owns the folder."""


LOCK_FILE = ".lock"
_held: dict[Path, list] = {}  # folders this process has locked: [open file, depth]


class OwnFolder:
    """``with OwnFolder(path):`` this process owns ``path`` for the block: a second run into it (another
    process) is refused at once with :class:`FolderBusy` naming the owner's pid, instead of both
    writing and one result being lost. The lock is the kernel's (``flock`` on ``path/.lock``), so a
    run that dies, even by kill -9, leaves no stale lock: the file stays, the lock goes with the
    process. Nested blocks on one folder in one process (a command whose stages train into it) nest."""

    def __init__(self, path: str | os.PathLike, what: str = "run"):
        self.path, self.what = Path(path).resolve(), what

    def __enter__(self):
        held = _held.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_FILE, "a+")
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the folder is not guarded
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                owner = f.read().strip() or "unknown"
                f.close()
                raise FolderBusy(f"{self.path} is in use by another {self.what} (pid {owner}); wait for it to "
                                 f"finish, or give another --output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        _held[self.path] = [f, 1]
        return self

    def __exit__(self, *exc):
        held = _held[self.path]
        held[1] -= 1
        if held[1] == 0:
            del _held[self.path]
            held[0].close()  # releases the lock; the file stays (removing it would race a waiting run)
        return False
