"""DreamBooth training cost: steps/s and peak memory of full fine-tuning against LoRA (and, on CUDA,
8-bit AdamW and gradient checkpointing), and where a step's time goes.

Each variant runs the real loop (finetune.loop.train with the DreamBooth objective, prior
preservation on, the same cached class images) in a process of its own, so that peak memory is
that variant's alone. Peak memory is torch.cuda.max_memory_allocated on CUDA (from the end of setup,
so it is training's own), and the process's peak resident set size on the CPU (which includes the
loaded model; the resident size after setup is printed beside it).

    python bench/dreambooth.py                           # the embedded model, 5 teal-ring renders
    python bench/dreambooth.py --model DIR --instance-data-dir IMAGES --steps 100 --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import timed_modules  # noqa: E402

VARIANTS = {
    "full": {},
    "full+for-each-adamw": {"adam_fused": False},
    "full+checkpointing": {"gradient_checkpointing": True},
    "full+adamw8bit": {"optimizer": "adamw8bit"},
    "lora-4": {"lora_rank": 4},
    "lora-16": {"lora_rank": 16},
    "full+text-encoder": {"train_text_encoder": True},
    "lora-4+text-encoder": {"lora_rank": 4, "train_text_encoder": True},
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(args) -> dict:
    """One variant in this process: train, and report speed, memory and the time split."""
    from finetune.config import build
    from finetune.dreambooth import DreamBoothConfig, DreamBoothObjective
    from finetune.loop import train

    cuda = torch.cuda.is_available()
    parts, marks = defaultdict(float), {}

    class Measured(DreamBoothObjective):
        def setup(self, accelerator):
            trainable = super().setup(accelerator)
            marks["rss_after_setup"] = rss_mib()
            params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
            marks["trainable_params"] = sum(p.numel() for p in params)
            if not cuda:  # (on CUDA a forward hook would time kernel launches, not the work)
                timed_modules({"U-Net forward": self.model.unet}, parts)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                marks["cuda_after_setup"] = torch.cuda.memory_allocated() / 2**20
            return trainable

        def loss(self, batch, modules, generator):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = super().loss(batch, modules, generator)
            if cuda:
                torch.cuda.synchronize()
            parts["forward (loss)"] += time.perf_counter() - t
            return out

    def pre(opt, a, k):
        if cuda:
            torch.cuda.synchronize()
        marks["opt_t"] = time.perf_counter()

    def post(opt, a, k):
        if cuda:
            torch.cuda.synchronize()
        parts["optimiser step"] += time.perf_counter() - marks.pop("opt_t")
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)

    values = dict(model=args.model, instance_data_dir=args.instance_data_dir, class_data_dir=args.class_data_dir,
                  instance_prompt="a sks circle", class_prompt="a circle", with_prior_preservation=True,
                  num_class_images=args.num_class_images, batch_size=args.batch_size, max_steps=args.steps,
                  learning_rate=1e-5, checkpoint_every=0, report_to="none", output_dir=args.output_dir,
                  overwrite=True, mixed_precision=args.mixed_precision, **VARIANTS[args.one])
    cfg = build(DreamBoothConfig, values)
    summary = train(Measured(cfg), cfg, progress=False)
    out = {"variant": args.one, "steps_per_s": summary["steps_per_s"], "seconds": summary["seconds"],
           "trainable_params": marks["trainable_params"], "rss_after_setup_mib": marks["rss_after_setup"],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "parts": {k: v for k, v in parts.items() if not k.startswith("_")}}
    if cuda:
        out["cuda_peak_training_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_after_setup_mib"] = marks["cuda_after_setup"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the embedded shapes model)")
    ap.add_argument("--instance-data-dir", help="subject images (default: 5 renders of a teal ring)")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="default: all (8-bit AdamW only where bitsandbytes and CUDA are there)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4, help="instance images per step (as many class images)")
    ap.add_argument("--num-class-images", type=int, default=32)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--class-data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return

    from finetune.data import base_model_path, load_base_model
    from finetune.dreambooth import generate_class_images
    from shapes.demos import DB_TRAIN, render_instances

    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    if args.instance_data_dir is None:
        args.instance_data_dir = str(root / "instance")
        render_instances(root / "instance", "teal", "ring", DB_TRAIN, caption=None)
    class_dir = root / "class"
    model = str(base_model_path(args.model))
    # the class images once, for every variant
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generate_class_images(load_base_model(model, device), "a circle", class_dir, args.num_class_images)

    variants = args.variants or [v for v in VARIANTS if "adamw8bit" not in v or _has_8bit()]
    rows = []
    for v in variants:
        cmd = [sys.executable, __file__, "--one", v, "--model", model, "--instance-data-dir", args.instance_data_dir,
               "--class-data-dir", str(class_dir), "--output-dir", str(root / v), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--num-class-images", str(args.num_class_images),
               "--mixed-precision", args.mixed_precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{v}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[0][len("RESULT "):]))

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"DreamBooth on {model}: {args.steps} steps of {args.batch_size} instance + {args.batch_size} class latents, "
          f"prior preservation, {dev}, mixed precision {args.mixed_precision}")
    base = rows[0]["steps_per_s"] if rows else None
    head = f"{'variant':>22} {'params trained':>15} {'steps/s':>8} {'vs first':>8}"
    head += f" {'CUDA peak MiB':>14} {'after setup':>11}" if torch.cuda.is_available() else \
        f" {'peak RSS MiB':>13} {'after setup':>11}"
    print(head)
    for r in rows:
        s = f"{r['variant']:>22} {r['trainable_params']:>15,} {r['steps_per_s']:>8.2f} {r['steps_per_s'] / base:>8.2f}"
        if "cuda_peak_training_mib" in r:
            s += f" {r['cuda_peak_training_mib']:>14.1f} {r['cuda_after_setup_mib']:>11.1f}"
        else:
            s += f" {r['peak_rss_mib']:>13.0f} {r['rss_after_setup_mib']:>11.0f}"
        print(s)
    print("where a step's time goes (share of the timed loop):")
    for r in rows:
        total = r["seconds"]
        fwd = r["parts"].get("forward (loss)", 0.0)
        opt = r["parts"].get("optimiser step", 0.0)
        unet = r["parts"].get("U-Net forward")
        rest = total - fwd - opt
        inner = f" (U-Net {100 * unet / total:.0f} %)" if unet is not None else ""
        print(f"  {r['variant']:>22}: forward {100 * fwd / total:.0f} %{inner}, "
              f"backward and the loop's own work {100 * rest / total:.0f} %, optimiser {100 * opt / total:.0f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    tmp.cleanup()


def _has_8bit() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
