"""A tiny objective on the shared loop, runnable as a script (for kill -9 and multi-process tests).

python tests/loop_worker.py OUTPUT_DIR MAX_STEPS [--resume] [--kill-at N] [--nan-at N] [--accum N] [--mixed-precision no|bf16|auto] [--no-fused] [--sigint-at N] [--sleep S]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.config import TrainConfig  # noqa: E402
from finetune.loop import Objective, train  # noqa: E402

W_TRUE = torch.tensor([[1.0, -2.0, 0.5, 3.0]])


class Regression(Objective):
    name = "regression"

    def __init__(self, kill_at=0, nan_at=0, stop_at=0, sigint_at=0, sleep=0.0):
        self.kill_at, self.nan_at, self.stop_at = kill_at, nan_at, stop_at
        self.sigint_at, self.sleep = sigint_at, sleep

    def setup(self, accelerator):
        self.device = accelerator.device
        return {"net": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))}

    def batch(self, index, generator, rank, world):
        x = torch.randn(8, 4, generator=generator)
        return {"x": x, "y": x @ W_TRUE.T}

    def loss(self, batch, modules, generator):
        pred = modules["net"](batch["x"])
        loss = (pred - batch["y"]).pow(2).mean()
        if self.nan_at and self._step + 1 >= self.nan_at:
            loss = loss * float("nan")
        return loss, {}

    _step = 0

    def after_step(self, step, modules):
        self._step = step
        if self.kill_at and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # an abrupt end: no cleanup, no final save
        if self.stop_at and step == self.stop_at:
            raise KeyboardInterrupt
        if self.sigint_at and step == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the loop ends this step and saves
        if self.sleep:
            time.sleep(self.sleep)

    def save(self, directory, modules):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in modules["net"].state_dict().items()}, str(Path(directory) / "net.safetensors"))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("max_steps", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--no-fused", action="store_true")
    p.add_argument("--sigint-at", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    cfg = TrainConfig(output_dir=a.output_dir, max_steps=a.max_steps, resume=a.resume, overwrite=a.overwrite, learning_rate=0.05,
                      lr_warmup_steps=2, lr_scheduler="cosine", checkpoint_every=2, checkpoints_total_limit=2,
                      gradient_accumulation_steps=a.accum, ema_decay=a.ema, report_to="none", log_every=1,
                      mixed_precision=a.mixed_precision, adam_fused=not a.no_fused)
    return train(Regression(a.kill_at, a.nan_at, a.stop_at, a.sigint_at, a.sleep), cfg, progress=False)


if __name__ == "__main__":
    main()
