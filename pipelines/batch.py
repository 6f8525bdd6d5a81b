"""Generation into files, spread over the processes ``accelerate launch`` starts.

A list of tasks (a prompt, its seeds, the files its images go to) is dealt round-robin over the
processes: process r of w takes tasks r, r + w, r + 2w, ... Each image is written atomically with its
``parameters`` chunk as soon as its batch is made, and a task whose files all exist already is
skipped, so a rerun after an interruption (or with more or fewer processes) makes only what is
missing. File names carry the task's index and seed, never the process, so the set of files does not
depend on how many processes made it. ``ldm generate --from-file`` and DreamBooth's class images both
come through here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .pngmeta import save_png
from .processes import my_share

log = logging.getLogger(__name__)


@dataclass
class Task:
    prompt: str
    seeds: list[int]
    paths: list[Path]          # one per seed

    def done(self) -> bool:
        return all(Path(p).is_file() for p in self.paths)  # a folder of that name is not an image


def write_tasks(pipe, tasks: list[Task], make: Callable, *, rank: int = 0, world: int = 1, skip_done: bool = True,
                on_step: Callable | None = None, on_skip: Callable | None = None) -> list[Path]:
    """Make this process's share of ``tasks`` with ``make(task, callback) -> Result`` (a Pipeline call
    with ``seeds=task.seeds``) and write each image to its path; returns the paths this process wrote.
    With ``skip_done`` a task whose files all exist is skipped and ``on_skip(task)`` hears of it.
    ``on_step`` is handed to ``make`` as the sampler callback."""
    written = []
    for task in my_share(tasks, rank, world):
        if skip_done and task.done():
            if on_skip is not None:
                on_skip(task)
            continue
        res = make(task, on_step)
        for img, params, path in zip(res.images, pipe.infotexts(res), task.paths):
            written.append(save_png(img, path, params))
    return written
