"""Where the embedded model is, and the error a model path that cannot be used raises: no torch
import, so that the command line can name both before PyTorch loads."""

from __future__ import annotations

from pathlib import Path


class ModelError(ValueError):
    """A model path that cannot be used, with what is wrong and how to fix it."""


EMBEDDED_MODEL = Path(__file__).parent / "assets" / "shapes-model"


def default_model_path() -> Path | None:
    """The embedded default model shipped inside the package, when it is installed."""
    return EMBEDDED_MODEL if (EMBEDDED_MODEL / "model_index.json").is_file() else None


EMBEDDED_CONTROLNETS = {"shapes": Path(__file__).parent / "assets" / "shapes-controlnet"}  # name -> directory


def embedded_controlnet(name: str) -> str | None:
    """The directory of the embedded ControlNet called ``name``, when it is installed."""
    d = EMBEDDED_CONTROLNETS.get(str(name))
    return str(d) if d is not None and (d / "config.json").is_file() else None


def controlnet_named(path: str) -> str:
    """``path`` itself when it holds a ControlNet (a file, or a folder with config.json), else the embedded
    ControlNet of that name (``shapes``: the embedded model's, silhouette and canny conditions; a folder
    ``shapes/`` without a ControlNet in it, such as this repository's package, does not hide it), else
    ``path`` as given."""
    p = Path(path).expanduser()
    if p.is_file() or (p / "config.json").is_file():
        return str(p)
    return embedded_controlnet(path) or (str(p) if p.exists() else path)


def locate_controlnet(path: str) -> str:
    """controlnet_named(path) when it exists; ModelError naming the path and the embedded ones otherwise."""
    if Path(found := controlnet_named(path)).exists():
        return found
    names = ", ".join(n for n, d in EMBEDDED_CONTROLNETS.items() if (d / "config.json").is_file())
    raise ModelError(f"ControlNet {str(path)!r}: no such file or folder"
                     + (f", and not an embedded one ({names})" if names else ""))
