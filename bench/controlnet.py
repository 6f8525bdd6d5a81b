"""ControlNet text-to-image speed: ours against diffusers' StableDiffusionControlNetPipeline.

Both on the same model, ControlNet (a random one built from the model's U-Net, as the tests build
them: the cost does not depend on the weights), control image, prompt, seeds, steps and batch, DDIM,
in one process, interleaved, after a warm-up of each. Prints images/s of both, their ratio (> 1: ours
faster), the max pixel difference, and what one ControlNet costs over plain generation in ours.

    python bench/controlnet.py [--model DIR] [--steps 30] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=5.0)
    args = ap.parse_args()

    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from ldm.models import default_model_path, load_model
    from pipelines.pipeline import Pipeline
    from pipelines.request import Request

    model = args.model or str(default_model_path())
    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(load_model(model).unet)
    with torch.no_grad():
        for p in cn.parameters():
            p.normal_(0, 0.02)
    cn_dir = Path(tmp.name) / "cn"
    cn.save_pretrained(cn_dir)
    ours = Pipeline.from_pretrained(model, dtype="fp32")
    w, h = ours.default_size()
    image = Image.fromarray(((np.random.default_rng(0).random((h, w, 3)) > 0.5) * 255).astype(np.uint8))
    ref = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=ControlNetModel.from_pretrained(cn_dir),
                                                            safety_checker=None, torch_dtype=torch.float32)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    prompt, n = "a large red star on a blue background", args.batch_size
    unit = {"model": str(cn_dir), "image": image, "weight": 1.0}

    def run_ours():
        return ours.generate(Request(prompt, steps=args.steps, guidance=args.guidance, seed=0, batch_size=n,
                                     sampler="ddim", controls=[unit])).pixels

    def run_plain():
        return ours.generate(Request(prompt, steps=args.steps, guidance=args.guidance, seed=0, batch_size=n,
                                     sampler="ddim")).pixels

    def run_ref():
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        return ref(prompt, image=image, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                   num_images_per_prompt=n, controlnet_conditioning_scale=1.0, output_type="pt", height=h,
                   width=w).images

    with torch.inference_mode():
        a, b = run_ours(), run_ref()
        run_plain()
        diff = float((a.float() - b.float()).abs().max())
        times = {"ours": [], "diffusers": [], "ours without ControlNet": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("diffusers", run_ref), ("ours without ControlNet", run_plain)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"model {model}, {w}x{h}, ddim {args.steps} steps, batch {n}, guidance {args.guidance}, "
          f"threads {torch.get_num_threads()}; max pixel difference ours vs diffusers {diff:.2e}")
    for k, v in times.items():
        print(f"{k:>24}: {ips[k]:.3f} images/s (median of {args.repeats}: {', '.join(f'{t:.2f}' for t in v)} s)")
    print(f"ratio ours / diffusers: {ips['ours'] / ips['diffusers']:.3f}; one ControlNet costs "
          f"{ips['ours without ControlNet'] / ips['ours']:.2f}x the time of plain generation")
    tmp.cleanup()


if __name__ == "__main__":
    main()
