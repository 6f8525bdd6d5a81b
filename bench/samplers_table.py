"""Every sampler x noise schedule against diffusers, on the same tiny random weights and seeds.

    python bench/samplers_table.py [--steps 8]

Builds tiny random SD 1.x, SD 2.x (v-prediction) and SDXL checkpoints (ldm.tiny), runs text-to-image
with each sampler and schedule here and through diffusers' pipeline with the matching scheduler
(ldm.samplers.diffusers_scheduler; the stochastic samplers draw the same noise from the same
generators), and prints the largest pixel difference (0-1 scale; the tests' bar is 2/255 = 0.0078),
beside the difference between that sampler and Euler on the same seed, to show the scale at which
samplers differ. dpmpp-sde has no row: diffusers' DPMSolverSDEScheduler needs torchsde's Brownian
tree, which neither side installs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ldm.samplers import SAMPLERS, SCHEDULE_SAMPLERS, diffusers_scheduler
from ldm.schedule import SCHEDULES
from ldm.tiny import build_checkpoint
from pipelines.pipeline import Pipeline

P, N = "a large red circle on a blue background", "a small square"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    worst = 0.0
    print("| model | sampler | schedule | max diff vs diffusers | max diff vs euler (same seed) |")
    print("|---|---|---|---|---|")
    for i, kind in enumerate(["sd1", "sd2", "sdxl"]):
        path = build_checkpoint(tmp / kind, kind, seed=i)
        ours = Pipeline.from_pretrained(path)
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        ref = cls.from_pretrained(path)
        ref.set_progress_bar_config(disable=True)
        config = dict(ref.scheduler.config)
        kw = dict(negative_prompt=N, steps=args.steps, guidance_scale=5.0, seed=3, batch_size=2)
        euler = ours.text_to_image(P, sampler="euler", **kw).pixels
        for name in SAMPLERS:
            if name == "dpmpp-sde":
                continue
            for schedule in (SCHEDULES if name in SCHEDULE_SAMPLERS else ("default",)):
                try:
                    ref.scheduler = diffusers_scheduler(name, schedule, config)
                    expect = ref(P, negative_prompt=N, num_inference_steps=args.steps, guidance_scale=5.0,
                                 generator=[torch.Generator().manual_seed(3 + k) for k in range(2)],
                                 num_images_per_prompt=2, output_type="np", height=64, width=64).images
                except (TypeError, ValueError) as exc:  # a combination diffusers' scheduler does not offer
                    print(f"| {kind} | {name} | {schedule} | diffusers: {exc} | |")
                    continue
                got = ours.text_to_image(P, sampler=name, schedule=schedule, **kw).pixels
                d = float(np.abs(got.permute(0, 2, 3, 1).numpy() - expect).max())
                print(f"| {kind} | {name} | {schedule} | {d:.5f} | {float((got - euler).abs().max()):.4f} |",
                      flush=True)
                worst = max(worst, d)
    print(f"\nlargest difference from diffusers: {worst:.5f} ({worst * 255:.2f}/255)")


if __name__ == "__main__":
    main()
