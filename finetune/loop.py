"""The one training loop of the project (minGPT's ``Trainer`` in spirit, on Accelerate).

The loop owns the Accelerator, mixed precision, gradient accumulation, clipping, the learning-rate
schedule, EMA, atomic checkpoints and resume, retention, logging, validation images and the progress
bar. A training method is an :class:`Objective`: it says what trains, what a batch is, what the loss
on a batch is, what happens after a step, and how its result is saved.

Batches are a function of (seed, micro-step, process), not of a data loader's position, so a resumed
run sees exactly the batches an uninterrupted one would, and ends with the same weights.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from pipelines.outputs import check_output_dir

from . import state
from .config import MIXED_PRECISIONS, TrainConfig, to_dict

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


class TrainingError(RuntimeError):
    pass


class Objective:
    """A training method. ``setup`` returns what trains (name -> module); ``batch`` and ``loss``
    say what one step sees and optimises; the rest has defaults."""

    name = "train"
    export_checkpoints = False  # True: every checkpoint also holds the result (save()), usable for inference
    progress = True  # set by train(): False (--quiet) hides the setup's own bars (caching latents) too

    def setup(self, accelerator) -> dict[str, torch.nn.Module]:
        """Load models, move frozen parts to ``accelerator.device``, cache data; return the modules
        that train, by name (the names ``loss``, ``after_step``, ``validate`` and ``save`` get them by)."""
        raise NotImplementedError

    def optimized(self, modules: dict[str, torch.nn.Module]):
        """The tensors the optimiser updates (default: every parameter of ``modules`` that requires grad)."""
        return [p for m in modules.values() for p in m.parameters() if p.requires_grad]

    def param_groups(self, modules: dict[str, torch.nn.Module], lr: float) -> list[dict]:
        """The optimiser's parameter groups (default: ``optimized`` as one group at the run's rate ``lr``);
        a group may set its own ``lr``, which the schedule then scales alike."""
        return [{"params": self.optimized(modules)}]

    def batch(self, index: int, generator: torch.Generator, rank: int, world: int) -> dict:
        """Micro-batch number ``index`` for process ``rank`` of ``world``; all randomness from ``generator``."""
        raise NotImplementedError

    def loss(self, batch: dict, modules: dict[str, torch.nn.Module], generator: torch.Generator):
        """(scalar loss, dict of floats to log)."""
        raise NotImplementedError

    def after_step(self, step: int, modules: dict[str, torch.nn.Module]) -> None:
        """Called after every optimiser step (textual inversion restores frozen rows here)."""

    def validate(self, step: int, modules: dict[str, torch.nn.Module]) -> dict[str, list]:
        """Validation images, name -> list of PIL images (default: none)."""
        return {}

    def save(self, directory: Path, modules: dict[str, torch.nn.Module]) -> None:
        """Write the result (in the format users load) into ``directory``."""
        raise NotImplementedError


class EMA:
    """Exponential moving average of parameters: ``shadow = d * shadow + (1 - d) * param``."""

    def __init__(self, params, decay: float, warmup_steps: int = 0):
        self.params = list(params)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        d = 0.0 if self.updates <= self.warmup_steps else self.decay
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextmanager
    def swapped(self):
        """Parameters hold the EMA weights inside the block, their own weights after it."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(saved, self.params):
                    p.copy_(v)

    def state_dict(self):
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state):
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        self.updates = int(state["updates"])


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the learning rate at optimiser step ``k``: linear warm-up, then constant,
    linear or cosine decay to ``min_lr_ratio``."""
    warm, total, floor = cfg.lr_warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    if cfg.lr_scheduler not in ("constant", "linear", "cosine"):
        raise TrainingError(f"lr_scheduler {cfg.lr_scheduler!r} is unknown; use constant, linear or cosine")

    def f(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        if cfg.lr_scheduler == "constant":
            return 1.0
        frac = min((k - warm) / max(total - warm, 1), 1.0)
        if cfg.lr_scheduler == "linear":
            return floor + (1 - floor) * (1 - frac)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


OPTIMIZERS = ("adamw", "adamw8bit")


def optimizer_class(cfg: TrainConfig, device: torch.device):
    """The optimiser class the recipe names: AdamW, or bitsandbytes' 8-bit AdamW (optimiser state in
    8 bits, about a quarter of AdamW's state memory). Checked before any model is loaded."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW
    if cfg.optimizer != "adamw8bit":
        raise TrainingError(f"optimizer {cfg.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingError("optimizer adamw8bit needs bitsandbytes, which is not installed: "
                            "pip install bitsandbytes (on a CUDA machine), or use optimizer adamw") from None
    if device.type != "cuda":
        raise TrainingError(f"optimizer adamw8bit runs on CUDA; this run is on {device.type}. "
                            f"Use optimizer adamw here")
    return bnb.optim.AdamW8bit


def use_fused_adamw(cfg: TrainConfig, optimizer_cls, params, device: torch.device) -> bool:
    """PyTorch's fused AdamW (one kernel for every parameter's update instead of a for-each chain of
    them: 26 -> 5 ms a step for the shapes U-Net's 3.1 M parameters on 2 CPU cores) where it applies:
    ``adam_fused`` on, torch's AdamW, a CPU or CUDA device, floating-point parameters."""
    return (cfg.adam_fused and optimizer_cls is torch.optim.AdamW and device.type in ("cpu", "cuda")
            and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in params))


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = []
    if output_dir.is_dir():
        for d in output_dir.iterdir():
            if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and (d / STATE_FILE).is_file():
                try:
                    out.append((int(d.name[len(CHECKPOINT_PREFIX):]), d))
                except ValueError:
                    pass
    return sorted(out)


def sample_offset(index: int, rank: int, world: int, batch_size: int) -> int:
    """Number of the first sample of micro-batch ``index`` on process ``rank``: the processes take
    disjoint consecutive blocks, so a stream of samples is split without overlap."""
    return (index * world + rank) * batch_size


def step_generator(seed: int, index: int, rank: int, salt: int = 0) -> torch.Generator:
    """The generator of micro-step ``index`` on process ``rank``: independent of history."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + index * 7919 + rank * 104_729 + salt * 15_485_863) % (2**63 - 1))
    return g


class _Stop:
    requested = False


@contextmanager
def stop_at_step_end(enabled: bool):
    """Inside the block a first Ctrl-C (SIGINT) asks the loop to stop at the end of the running step,
    where the state is whole and a checkpoint can hold it; a second one interrupts at once. Only in
    the main thread of a single-process run (several processes would each stop at their own step)."""
    import signal
    import threading

    stop = _Stop()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        log.warning("interrupted: stopping at the end of this step and saving a checkpoint (Ctrl-C again to "
                    "stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _default_tracker(report_to: str):
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
            return "tensorboard"
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
                return "tensorboard"
            except ImportError:
                return None
    return report_to


def _save_images(images: dict[str, list], directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    for name, imgs in images.items():
        for i, img in enumerate(imgs):
            tmp = directory / f".{name}-{i}.png.tmp"
            img.save(tmp, format="PNG")
            os.replace(tmp, directory / f"{name}-{i}.png")


def prepare_output_dir(output_dir: Path, cfg: TrainConfig) -> int:
    """The step to resume from in the output directory (0 for a fresh run; train() has checked that the
    folder can be written)."""
    found = checkpoints(output_dir)
    if cfg.resume:
        return found[-1][0] if found else 0
    if found and not cfg.overwrite:
        raise TrainingError(
            f"{output_dir} holds another run's checkpoints ({found[-1][1].name}); pass --resume to continue "
            f"that run or --overwrite to start over (its checkpoints are then deleted)")
    return 0


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16
    or AMX units (elsewhere bf16 autocast on a CPU is emulated and slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        from ldm.models import cpu_bf16

        return cpu_bf16()[0]  # the one rule, which generation's dtype auto follows too
    return False


def resolve_mixed_precision(value: str) -> str:
    """The recipe's ``mixed_precision`` for this machine: ``auto`` is bf16 where the training device
    computes bf16 natively (native_bf16), otherwise no (fp32)."""
    if value not in MIXED_PRECISIONS:
        raise TrainingError(f"mixed_precision {value!r} is unknown; use one of {', '.join(MIXED_PRECISIONS)}")
    if value != "auto":
        return value
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if native_bf16(device_type) else "no"


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator of another
    mixed precision ("AcceleratorState has already been initialized and cannot be changed"), so runs in
    one process (``ldm build-shapes-model``'s stages, a script training twice) could not differ in it.
    Drop the accelerator part of that state when the precision changes; the process part
    (PartialState: ranks, process group) stays."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def train(objective: Objective, cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Run ``objective`` for ``cfg.max_steps`` optimiser steps; returns a summary dict. The run owns
    its output folder while it lasts: a second run into it is refused (pipelines.outputs.OwnFolder)."""
    from pipelines.outputs import OwnFolder

    output_dir = check_output_dir(cfg.output_dir)  # writable: found before any work
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch the main process owns the folder
        return _train(objective, cfg, progress=progress)
    with OwnFolder(output_dir, "training run"):
        return _train(objective, cfg, progress=progress)


def _train(objective: Objective, cfg: TrainConfig, *, progress: bool) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    output_dir = Path(cfg.output_dir)
    start_step = prepare_output_dir(output_dir, cfg)
    ckpt = output_dir / f"{CHECKPOINT_PREFIX}{start_step}"
    legacy = bool(start_step) and state.is_legacy(ckpt)
    if legacy and not cfg.allow_pickle:
        raise TrainingError(
            f"{ckpt} was written by an older version as pickle files (optimizer.bin, *.pkl), which can run code "
            f"when read; resume it with --allow-pickle only if you trust where it came from")
    tracker = _default_tracker(cfg.report_to)
    asked = cfg.mixed_precision
    cfg.mixed_precision = resolve_mixed_precision(asked)  # what the objective reads too (its frozen dtypes)
    if asked == "auto":
        log.info("mixed_precision auto: %s on this machine", cfg.mixed_precision)
    _forget_other_precision(cfg.mixed_precision)
    accelerator = Accelerator(
        # without an accelerator, several processes (accelerate launch / torchrun) are multi-CPU with gloo
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if accelerator.num_processes > 1:
        from pipelines.processes import destroy_process_group_at_exit

        destroy_process_group_at_exit()
    main = accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not cfg.resume:
            for _, d in checkpoints(output_dir):
                shutil.rmtree(d)
    accelerator.wait_for_everyone()
    optimizer_cls = optimizer_class(cfg, accelerator.device)
    torch.manual_seed(cfg.seed)  # model initialisation in setup is seeded alike on every process

    objective.progress = progress and main
    trainable = objective.setup(accelerator)
    names = list(trainable)
    params = objective.optimized(trainable)
    if not params:
        raise TrainingError(f"{objective.name}: nothing to train (no parameter requires grad)")
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
        accelerator.print(f"scale_lr: learning rate {cfg.learning_rate:g} x {cfg.batch_size} x "
                          f"{cfg.gradient_accumulation_steps} x {accelerator.num_processes} = {lr:g}")
    fused = {"fused": True} if use_fused_adamw(cfg, optimizer_cls, params, accelerator.device) else {}
    optimizer = optimizer_cls(objective.param_groups(trainable, lr), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    prepared = accelerator.prepare(*[trainable[n] for n in names], optimizer, scheduler)
    modules = dict(zip(names, prepared[:len(names)]))
    optimizer, scheduler = prepared[len(names):]
    ema = EMA(params, cfg.ema_decay, cfg.ema_warmup_steps) if cfg.ema_decay > 0 else None
    rank = accelerator.process_index

    def unwrapped():
        return {n: accelerator.unwrap_model(m) for n, m in modules.items()}

    if start_step and legacy:  # --allow-pickle: the older layout, through accelerate's pickle loader
        log.warning("%s: reading the pickled state of an older version (--allow-pickle)", ckpt)
        if ema is not None:
            accelerator.register_for_checkpointing(ema)
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} (pickled state, --allow-pickle)")
    elif start_step:
        try:
            state.load_state(ckpt, rank=rank, modules=unwrapped(), optimizer=optimizer, scheduler=scheduler,
                             ema=ema, scaler=accelerator.scaler)
        except (state.StateError, FileNotFoundError, OSError) as exc:
            raise TrainingError(f"cannot resume from {ckpt}: {exc}") from None
        accelerator.print(f"resumed from {ckpt}")
    if tracker:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}
        accelerator.init_trackers(objective.name, config=flat)

    def save_checkpoint(step: int):
        final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        try:
            state.save_state(tmp, rank=rank, modules=unwrapped(), optimizer=optimizer, scheduler=scheduler,
                             ema=ema, scaler=accelerator.scaler)
            accelerator.wait_for_everyone()  # each process writes its own random states: all done before the rename
            if main and objective.export_checkpoints:  # the last one too: every checkpoint is a usable model
                with (ema.swapped() if ema is not None else nullcontext()):
                    objective.save(tmp, unwrapped())
        except Exception as exc:
            raise checkpoint_failed(exc, tmp, step) from exc
        if main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "seed": cfg.seed, "objective": objective.name}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # a checkpoint either exists whole or not at all
            log.info("step %d: checkpoint saved to %s", step, final)
            if cfg.checkpoints_total_limit:
                for _, old in checkpoints(output_dir)[:-cfg.checkpoints_total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def run_validation(step: int):
        if not main:
            return
        mods = unwrapped()
        with (ema.swapped() if ema is not None else nullcontext()):
            images = objective.validate(step, mods)
        if images:
            _save_images(images, output_dir / "validation" / f"step-{step}")
            for t in accelerator.trackers:
                if t.name == "tensorboard":
                    import numpy as np
                    for name, imgs in images.items():
                        t.writer.add_images(name, np.stack([np.asarray(i) for i in imgs]), step, dataformats="NHWC")

    def checkpoint_failed(exc: Exception, tmp: Path, step: int) -> TrainingError:
        """The error of a checkpoint that could not be written: the partial folder removed (the earlier
        checkpoints stay as they were), and a full disk said as such, with the room it needed."""
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(output_dir).free
        need = sum(p.numel() * p.element_size() for m in modules.values() for p in m.parameters()) * (
            3 if cfg.optimizer == "adamw" else 2) + (sum(s.numel() * 4 for s in ema.shadow) if ema else 0)
        last = checkpoints(output_dir)
        kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written before"
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "enforce fail" in str(exc) or \
            "No space left" in str(exc) or free < need
        if full:
            return TrainingError(
                f"the disk is full: checkpoint-{step} in {output_dir} needs about {need / 2**20:.1f} MB "
                f"({written / 2**20:.1f} MB were written before it failed), {free / 2**20:.1f} MB are free; the "
                f"partial checkpoint was removed and {kept}. Free some space, then --resume")
        return TrainingError(f"writing checkpoint-{step} in {output_dir} failed ({type(exc).__name__}: {exc}); "
                             f"the partial checkpoint was removed and {kept}")

    world = accelerator.num_processes
    accum = cfg.gradient_accumulation_steps
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (main and progress),
               desc=objective.name, dynamic_ncols=True)
    t0, last_logs, last_loss = time.perf_counter(), {}, None
    # No CPU-GPU synchronisation per micro-step: the losses and the finite-loss check stay on the device
    # and are read when logging, before a checkpoint or validation, and at the end, so a NaN still stops
    # the run before a bad checkpoint is written (with the step it first appeared at).
    bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # first non-finite loss
    bad_loss = torch.zeros((), device=accelerator.device)

    def check_finite():
        bad = accelerator.reduce((bad_step >= 0).float().reshape(1), reduction="sum").item()
        if bad:
            last = checkpoints(output_dir)
            where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
            first = int(bad_step.item())
            value = float(bad_loss.item()) if first >= 0 else float("nan")
            bar.close()
            accelerator.end_training()
            raise TrainingError(
                f"{objective.name}: the loss became {value} at step {first if first >= 0 else '?'}; training "
                f"stopped and {where}. Lower learning_rate, or use mixed_precision=no/bf16, then --resume.")

    def as_floats(logs: dict) -> dict:
        return {k: float(v) for k, v in logs.items()}  # the one read of the device values

    def run_steps(first: int, stop) -> int:
        """Optimiser steps from ``first`` to the end, or to the end of the step a Ctrl-C came in; returns
        how many ran."""
        nonlocal bad_step, bad_loss, last_logs, last_loss
        for step in range(first, cfg.max_steps):
            logs_acc: dict = {}
            for micro in range(accum):
                index = step * accum + micro
                gen = step_generator(cfg.seed, index, rank)
                batch = objective.batch(index, gen, rank, world)
                with accelerator.accumulate(*modules.values()):
                    with accelerator.autocast():
                        loss, logs = objective.loss(batch, modules, gen)
                    detached = loss.detach().float().reshape(())
                    first_bad = (bad_step < 0) & ~torch.isfinite(detached)
                    bad_step = torch.where(first_bad, step, bad_step)
                    bad_loss = torch.where(first_bad, detached, bad_loss)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": detached, **logs}.items():
                    v = v.detach() if isinstance(v, torch.Tensor) else v
                    logs_acc[k] = logs_acc.get(k, 0.0) + v / accum
            if ema is not None:
                ema.update()
            objective.after_step(step + 1, modules)
            last_loss = logs_acc["loss"]
            done = step + 1
            bar.update(1)
            if done % max(cfg.log_every, 1) == 0 or done == cfg.max_steps:
                check_finite()
                last_logs = {**as_floats(logs_acc), "lr": scheduler.get_last_lr()[0]}
                bar.set_postfix({k: f"{v:.4g}" for k, v in last_logs.items()})
                accelerator.log(last_logs, step=done)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                check_finite()
                save_checkpoint(done)
            if cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.max_steps:
                check_finite()
                run_validation(done)
            if stop.requested:
                return done - first
        return cfg.max_steps - first

    for m in modules.values():
        m.train()
    with stop_at_step_end(main and world == 1) as stop:
        steps_run = run_steps(start_step, stop)
    bar.close()
    elapsed = time.perf_counter() - t0
    if stop.requested:  # Ctrl-C: the steps since the last checkpoint are kept in one more
        done = start_step + steps_run
        found = checkpoints(output_dir)
        if done > start_step and not (found and found[-1][0] == done):
            check_finite()
            save_checkpoint(done)
        accelerator.end_training()
        raise KeyboardInterrupt(f"interrupted at step {done}; checkpoint-{done} holds it, --resume continues there")

    check_finite()
    save_checkpoint(cfg.max_steps)
    accelerator.wait_for_everyone()
    if main:
        mods = unwrapped()
        with (ema.swapped() if ema is not None else nullcontext()):
            objective.save(output_dir, mods)
    run_validation(cfg.max_steps)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary = {"steps": steps_run, "seconds": elapsed, "steps_per_s": steps_run / elapsed if elapsed else 0.0,
               "last_loss": float(last_loss) if last_loss is not None else None, "processes": world,
               "mixed_precision": cfg.mixed_precision, "fused_adamw": bool(fused), **{k: v for k, v in last_logs.items()}}
    if main:
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary

