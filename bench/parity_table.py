"""The parity table: our pipelines against diffusers' on the same tiny random weights, prompts and seeds.

    python bench/parity_table.py

Builds tiny random SD1, SD2, SDXL, SDXL-refiner and SDXL-inpainting checkpoints (ldm.tiny), runs each
pipeline x sampler here and in diffusers, and prints the largest pixel difference (0-1 scale; the
tests' bar is 2/255 = 0.0078). Image-to-image and inpainting hand diffusers our image latents (the
VAE posterior mean, which we use for editing where diffusers samples).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)
from PIL import Image

from ldm.tiny import build_checkpoint
from pipelines.pipeline import Pipeline
from pipelines.request import Request

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}
P, N = "a large red circle on a blue background", "a small square"


def ref(cls, path, sampler):
    r = cls.from_pretrained(path)
    r.set_progress_bar_config(disable=True)
    r.scheduler = SCHEDULERS[sampler].from_config(r.scheduler.config)
    return r


def diff(ours, theirs) -> float:
    return float(np.abs(ours.pixels.permute(0, 2, 3, 1).numpy() - theirs).max())


def main():
    tmp = Path(tempfile.mkdtemp())
    paths = {k: build_checkpoint(tmp / k, k, seed=i) for i, k in enumerate(["sd1", "sd2", "sdxl", "sdxl-refiner",
                                                                            "sdxl-inpaint"])}
    pipes = {k: Pipeline.from_pretrained(v) for k, v in paths.items()}
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask)
    rows = []
    for sampler in SCHEDULERS:
        g = lambda: [torch.Generator().manual_seed(7)]  # noqa: E731
        kw = dict(negative_prompt=N, num_inference_steps=8, guidance_scale=5.0, output_type="np")
        ours_kw = dict(negative_prompt=N, steps=8, guidance_scale=5.0, seed=7, sampler=sampler)
        for k in ("sd1", "sd2"):
            rows.append((k, "text-to-image", sampler, diff(pipes[k].text_to_image(P, **ours_kw),
                                                            ref(StableDiffusionPipeline, paths[k], sampler)(
                                                                P, generator=g(), **kw).images)))
        xl = pipes["sdxl"]
        rows.append(("sdxl", "text-to-image", sampler, diff(xl.text_to_image(P, **ours_kw), ref(
            StableDiffusionXLPipeline, paths["sdxl"], sampler)(P, generator=g(), **kw).images)))
        init = xl.text_to_image("a small green square on a white background", steps=3, seed=1).images[0]
        z0 = xl.encode_image(init)
        rows.append(("sdxl", "image-to-image 0.6", sampler, diff(
            xl.image_to_image(P, init, strength=0.6, **ours_kw),
            ref(StableDiffusionXLImg2ImgPipeline, paths["sdxl"], sampler)(P, image=z0, strength=0.6, generator=g(),
                                                                            **kw).images)))
        rows.append(("sdxl", "inpainting (4 channels)", sampler, diff(
            xl.inpaint(P, init, mask, **ours_kw),
            ref(StableDiffusionXLInpaintPipeline, paths["sdxl"], sampler)(
                P, image=z0, mask_image=mask, strength=1.0, height=64, width=64, generator=g(), **kw).images)))
        xi = pipes["sdxl-inpaint"]
        binary = torch.from_numpy(np.asarray(mask) >= 128).float()[None, None]
        from ldm.images import to_tensor

        masked = xi.encode_image(to_tensor(init) * (1 - binary))
        rows.append(("sdxl-inpaint", "inpainting (9 channels)", sampler, diff(
            xi.inpaint(P, init, mask, **ours_kw),
            ref(StableDiffusionXLInpaintPipeline, paths["sdxl-inpaint"], sampler)(
                P, image=xi.encode_image(init), mask_image=mask, masked_image_latents=masked, strength=1.0, height=64,
                width=64, generator=g(), **kw).images)))
        gens = g()
        lat = ref(StableDiffusionXLPipeline, paths["sdxl"], sampler)(P, denoising_end=0.8, generator=gens,
                                                                      **{**kw, "output_type": "latent"}).images
        expect = ref(StableDiffusionXLImg2ImgPipeline, paths["sdxl-refiner"], sampler)(
            P, image=lat, denoising_start=0.8, generator=gens, **kw).images
        xl.refiner = pipes["sdxl-refiner"]
        got = xl.generate(Request(P, negative=N, steps=8, guidance=5.0, seed=7, sampler=sampler, refiner_start=0.8))
        xl.refiner = None
        rows.append(("sdxl + refiner", "base 80 % then refiner", sampler, diff(got, expect)))
    print("| model | pipeline | sampler | max pixel difference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e} |")


if __name__ == "__main__":
    main()
