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
