"""Textual-inversion step cost, and where it goes, against its floor: one forward and backward of
the frozen U-Net on the same batch (gradients flowing to its input only, as in textual inversion).

Runs the real objective (finetune.textual_inversion) on a folder of images, times each part of a
training step (batch assembly, text encoder forward, U-Net forward, backward, optimiser step, the
restoring of frozen rows), and prints steps/s for the full step and for the floor, in one run.

    python bench/textual_inversion.py                       # the embedded model, 5 orange-star renders
    python bench/textual_inversion.py --model DIR --data-dir IMAGES --batch-size 4 --initializer cat
    python bench/textual_inversion.py --for-each-adamw     # the optimiser before fused AdamW
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import timed_modules  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the embedded shapes model)")
    ap.add_argument("--data-dir", help="training images (default: 5 renders of an orange star)")
    ap.add_argument("--initializer", default="star")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--for-each-adamw", action="store_true", help="AdamW's for-each kernel instead of the loop's fused one")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from finetune.common import denoising_loss
    from finetune.config import build
    from finetune.loop import step_generator, use_fused_adamw
    from finetune.textual_inversion import TextualInversionConfig, TextualInversionObjective
    from shapes.demos import TI_COLOR, TI_SHAPE, TI_TRAIN, render_instances

    tmp = tempfile.TemporaryDirectory()
    data = args.data_dir
    if data is None:
        data = Path(tmp.name) / "data"
        render_instances(data, TI_COLOR, TI_SHAPE, TI_TRAIN)
    cfg = build(TextualInversionConfig, dict(model=args.model, data_dir=str(data), initializer_token=args.initializer,
                                             batch_size=args.batch_size, output_dir=tmp.name,
                                             adam_fused=not args.for_each_adamw))
    obj = TextualInversionObjective(cfg)
    te, unet = obj.setup(Accelerator(cpu=not torch.cuda.is_available()))["text_encoder"], obj.model.unet
    params = obj.optimized({})
    fused = use_fused_adamw(cfg, torch.optim.AdamW, params, obj.device)  # the loop's choice
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, **({"fused": True} if fused else {}))
    parts = defaultdict(float)

    def step(i, timed=True):
        gen = step_generator(0, i, 0)
        t0 = time.perf_counter()
        batch = obj.batch(i, gen, 0, 1)
        t1 = time.perf_counter()
        loss, _ = obj.loss(batch, {"text_encoder": te}, gen)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        obj.after_step(i + 1, {"text_encoder": te})
        t5 = time.perf_counter()
        if timed:
            for k, v in (("batch", t1 - t0), ("forward (text + U-Net + loss)", t2 - t1), ("backward", t3 - t2),
                         ("optimiser", t4 - t3), ("restore frozen rows", t5 - t4)):
                parts[k] += v
        return t5 - t0

    def floor(i):
        """The U-Net forward and backward alone, on the same batch shape, gradient to its input."""
        gen = step_generator(0, i, 0)
        batch = obj.batch(i, gen, 0, 1)
        with torch.no_grad():
            from ldm.text import encode_prompts
            hidden = encode_prompts(obj.model.tokenizer, te, batch["prompts"])
        hidden.requires_grad_(True)
        t0 = time.perf_counter()
        loss = denoising_loss(unet, batch["latents"], hidden, obj.model.schedule, gen)
        loss.backward()
        return time.perf_counter() - t0

    for i in range(5):  # warm-up
        step(i, timed=False)
        floor(i)
    full, bare = [], []
    vae = obj.model.vae
    handles = timed_modules({"text encoder": te, "U-Net": unet, "VAE encoder": vae.encoder,
                             "VAE decoder": vae.decoder}, parts)
    vae_calls = [0]
    handles += [m.register_forward_hook(lambda *a: vae_calls.__setitem__(0, vae_calls[0] + 1))
                for m in (vae.encoder, vae.decoder)]
    for i in range(args.steps):
        full.append(step(100 + i))
    for h in handles:
        h.remove()
    for i in range(args.steps):
        bare.append(floor(100 + i))
    total = sum(full)
    m_full, m_bare = statistics.median(full), statistics.median(bare)
    print(f"model: {obj.model.path}, {obj.latents.shape[0]} images, latents {tuple(obj.latents.shape[2:])}, "
          f"batch {args.batch_size}, threads {torch.get_num_threads()}, AdamW {'fused' if fused else 'for-each'}")
    print(f"textual-inversion step: {1 / m_full:.1f} steps/s (median {m_full * 1000:.1f} ms over {args.steps})")
    print(f"U-Net forward + backward alone: {1 / m_bare:.1f} steps/s (median {m_bare * 1000:.1f} ms)")
    print(f"ratio: {m_full / m_bare:.2f} (step time / U-Net forward+backward time)")
    print(f"where a step's time goes ({args.steps} steps, {total:.2f} s):")
    for k in ("batch", "text encoder", "U-Net", "forward (text + U-Net + loss)", "backward", "optimiser",
              "restore frozen rows"):
        note = " (inside the forward)" if k in ("text encoder", "U-Net") else ""
        print(f"  {k:>30}: {parts[k]:.3f} s ({100 * parts[k] / total:.1f} %){note}")
    print(f"VAE encoder/decoder calls during the {args.steps} timed steps: {vae_calls[0]} "
          f"({parts['VAE encoder'] + parts['VAE decoder']:.3f} s)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
