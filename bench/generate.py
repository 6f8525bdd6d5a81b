"""Text-to-image speed: this project's pipeline against diffusers' StableDiffusionPipeline.

Both run on the same checkpoint, prompt, seeds, steps, batch and sampler, in one process,
interleaved, after a warm-up of each. Prints images/s for both, the ratio (ours / diffusers; > 1
means ours is faster) and where our time goes (text encoder, U-Net, VAE, the rest).

    python bench/generate.py                      # a random 'bench'-size SD1-layout model (256 px)
    python bench/generate.py --model DIR --steps 30 --batch-size 2 --sampler euler
    python bench/generate.py --model DIR --dtype auto   # ours at auto vs ours / diffusers fp32, diffusers bf16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch


def timed_modules(modules: dict, totals: dict):
    """Add each module's forward time to ``totals[name]``."""
    handles = []
    for name, mod in modules.items():
        def pre(m, a, name=name):
            totals[f"_start_{name}"] = time.perf_counter()

        def post(m, a, o, name=name):
            totals[name] += time.perf_counter() - totals.pop(f"_start_{name}")
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a diffusers-format model directory (default: a random bench-size model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "euler"])
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both pipelines)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                    help="both pipelines' weights; auto: ours at auto (bf16 on a CPU with native bf16 units) against "
                         "ours and diffusers at fp32 and diffusers at bf16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from ldm.tiny import build_checkpoint
    from pipelines.pipeline import Pipeline

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        model = str(build_checkpoint(tmp.name, "sd1", size="bench", seed=0))
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    prompt = "a large red circle on a blue background"
    n = args.batch_size

    def diffusers_runner(dtype):
        # (the embedded model stores fp16, which diffusers would otherwise keep: its dtype is given)
        ref = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, torch_dtype=dtype).to(args.device)
        ref.scheduler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[args.sampler].from_config(
            ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)

        def run():
            gens = [torch.Generator().manual_seed(i) for i in range(n)]
            return ref(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                       num_images_per_prompt=n, output_type="pt").images
        return run

    def ours_runner(pipe):
        def run():
            return pipe.text_to_image(prompt, steps=args.steps, guidance_scale=args.guidance, seed=0, batch_size=n,
                                      sampler=args.sampler).pixels
        return run

    if args.dtype == "auto":  # ours at auto against ours and diffusers at fp32, and diffusers at bf16
        ours = Pipeline.from_pretrained(model, device=args.device, dtype="auto")
        label = f"ours auto ({ours.dtype_name() or 'fp32'})"
        runners = {label: ours_runner(ours),
                   "ours fp32": ours_runner(Pipeline.from_pretrained(model, device=args.device, dtype="fp32")),
                   "diffusers fp32": diffusers_runner(torch.float32),
                   "diffusers bf16": diffusers_runner(torch.bfloat16)}
        ratios = [(label, "ours fp32"), (label, "diffusers fp32"), (label, "diffusers bf16"),
                  ("ours fp32", "diffusers fp32")]
        same = ("ours fp32", "diffusers fp32")
    else:  # the same dtype for both
        ours = Pipeline.from_pretrained(model, device=args.device, dtype=args.dtype)
        runners = {"ours": ours_runner(ours), "diffusers": diffusers_runner(dtypes[args.dtype])}
        ratios = [("ours", "diffusers")]
        same = ("ours", "diffusers")

    with torch.inference_mode():
        made = {k: fn() for k, fn in runners.items()}  # warm-up, and a check that they made the same images
        max_diff = float((made[same[0]].float().cpu() - made[same[1]].float().cpu()).abs().max())
        times = defaultdict(list)
        for _ in range(args.repeats):
            for name, fn in runners.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        parts = defaultdict(float)
        m = ours.model
        handles = timed_modules({"text encoder": m.text_encoder, "U-Net": m.unet, "VAE decode": m.vae.decoder}, parts)
        t0 = time.perf_counter()
        runners[next(iter(runners))]()
        total = time.perf_counter() - t0
        for h in handles:
            h.remove()

    ips = {k: n / statistics.median(v) for k, v in times.items()}
    unet_params = sum(p.numel() for p in m.unet.parameters()) / 1e6
    w, h = ours.default_size()
    print(f"model: {model} (U-Net {unet_params:.1f} M parameters), {w}x{h}, sampler {args.sampler}, "
          f"{args.steps} steps, batch {n}, guidance {args.guidance}, {args.device} {args.dtype}, "
          f"threads {torch.get_num_threads()}")
    print(f"max pixel difference {same[0]} vs {same[1]}: {max_diff:.2e}")
    if args.dtype == "auto":
        first = next(iter(runners))
        print(f"max pixel difference {first} vs ours fp32: "
              f"{float((made[first].float() - made['ours fp32'].float()).abs().max()):.2e}")
    for k in runners:
        print(f"{k:>24}: {ips[k]:.3f} images/s (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in times[k])} s)")
    for a, b in ratios:
        print(f"ratio {a} / {b}: {ips[a] / ips[b]:.3f} (images/s)")
    if args.device != "cpu":
        print("(where the time goes is timed on the CPU only: forward hooks would time kernel launches here)")
        parts.clear()
        return
    print(f"where our time goes (one run, {total:.2f} s):")
    for k in ("text encoder", "U-Net", "VAE decode"):
        print(f"  {k:>12}: {parts[k]:.3f} s ({100 * parts[k] / total:.1f} %)")
    rest = total - sum(parts[k] for k in ("text encoder", "U-Net", "VAE decode"))
    print(f"  {'the rest':>12}: {rest:.3f} s ({100 * rest / total:.1f} %)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
