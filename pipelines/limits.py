"""The limits of ``ldm serve``, declared once: the server's flags, its checks and ``GET /api/models``
all read them from here (no torch imported, so ``ldm serve --help`` stays quick)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Limits:
    """What one request may ask for, and how many may wait. Each field is a flag of ``ldm serve``
    (``--max-side``, ...), derived from here with its help, and is listed by ``GET /api/models``."""
    max_side: int = field(default=1024, metadata={"help": "largest width or height a request may ask, and of an "
                                                          "image it sends (read from the image's header first)"})
    max_batch: int = field(default=8, metadata={"help": "most images per batch"})
    max_images: int = field(default=32, metadata={"help": "most images per request (prompts x batch size x "
                                                            "n_iter)"})
    max_steps: int = field(default=150, metadata={"help": "most sampling steps per request"})
    max_prompt_chars: int = field(default=8000, metadata={"help": "longest prompt or negative prompt, in "
                                                                   "characters (refused before tokenising)"})
    max_body_mb: float = field(default=32.0, metadata={"help": "largest request body, in MB (base64 images "
                                                                "included); a larger one is refused unread"})
    queue_size: int = field(default=8, metadata={"help": "requests that may wait; more are answered 503 with "
                                                           "Retry-After"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
                raise ValueError(f"--{f.name.replace('_', '-')} must be a number >= 1, got {v!r}")

    def for_requests(self, lora_dir: Path | None, upscalers_dir: Path | None = None, allow_pickle: bool = False):
        """The request-level limits (pipelines.request.Limits) of a request to this server."""
        from . import request as rq

        return rq.Limits(self.max_side, self.max_batch, self.max_steps, lora_dir, lora_paths=False,
                         upscalers_dir=upscalers_dir, allow_pickle=allow_pickle,
                         max_images=self.max_images, max_prompt_chars=self.max_prompt_chars)
