"""Several processes under ``accelerate launch``: which one this is, how work is dealt out, and a
clean end. Generation (pipelines.batch) and the training loop (finetune.loop) both use these."""

from __future__ import annotations

import functools
import os


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy torch.distributed's process group while the interpreter is still whole. A process that
    exits with a gloo group alive can abort in interpreter teardown ("terminate called without an
    active exception", seen about one run in ten of two CPU processes on a loaded machine), since gloo's
    threads still hold tensors then. Registered once; a no-op if the group is gone by then."""
    import atexit

    def destroy():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(destroy)


def process_state():
    """(rank, world size, accelerate's PartialState) of this process under ``accelerate launch`` with
    several processes; (0, 1, None) otherwise, leaving accelerate's process-wide state untouched. The
    state's ``wait_for_everyone`` is the barrier between processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # without an accelerator accelerate must be told it is on CPUs, or it sees one process (as the loop does)
    state = PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    destroy_process_group_at_exit()
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"accelerate sees {state.num_processes} processes but WORLD_SIZE is "
                           f"{os.environ['WORLD_SIZE']}")
    return state.process_index, state.num_processes, state


def my_share(tasks: list, rank: int, world: int) -> list:
    """The tasks process ``rank`` of ``world`` makes: every world-th one from its rank."""
    return tasks[rank::world]


def runnable_others(samples: int = 5, gap_s: float = 0.005) -> int | None:
    """Processes other than this one ready to run (the run queue of /proc/loadavg, less this process):
    the least of a few samples 5 ms apart (25 ms in all), so that a process passing through does not
    count and a lasting load does. None where that is not known (not Linux)."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(gap_s)
    return max(min(counts) - 1, 0)


def choose_threads(requested: str | int | None = "auto") -> int | None:
    """PyTorch's intra-op threads for this process. ``auto``: PyTorch's own setting (None: a thread per
    core) when no other process is ready to run, else one core fewer per such process, at least one;
    PyTorch's default (a thread per core,
    spin-waiting in OpenMP) collapsed to 3-5x slower beside a load on every core here (docs/generate.md
    has the table). An explicit number is used as given; None leaves PyTorch's default."""
    if requested is None or requested == "default":
        return None
    cores = os.cpu_count() or 1
    if requested != "auto":
        n = int(requested)
        if n < 1:
            raise ValueError(f"--threads must be >= 1 or auto, got {requested}")
        return n
    others = runnable_others()
    return None if not others else max(1, cores - others)


def apply_threads(requested: str | int | None = "auto", device: str = "cpu") -> int | None:
    """Set torch's intra-op threads by ``choose_threads`` for a run on ``device`` (a GPU run is left as
    it is); returns the number set (None: untouched)."""
    if str(device).startswith("cuda"):
        return None
    n = choose_threads(requested)
    if n is not None:
        import torch
        torch.set_num_threads(n)
    return n
