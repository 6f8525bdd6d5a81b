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
