"""The build's training steps on the CPU: eager against channels-last memory, torch.compile, bf16
autocast (the recipes' ``mixed_precision: bf16``; fast only where the CPU has bf16 units, e.g. AMX) and
PyTorch's fused AdamW kernel (``fused_adamw``; the eager step uses its default, the for-each one).

    python bench/train_step.py [--parts vae unet] [--modes eager channels_last compile bf16 fused_adamw]
        [--steps 20]

Where ``ldm build-shapes-model`` spends its time: the VAE stages (a step of the recipe's VAE on a batch
of 16 whole 64x64 images, as in the codec stages) and the U-Net stage (a step of the recipe's U-Net on
64 cached 4x8x8 latents and text states). A step is forward, backward and AdamW on the
recipes' own losses (``VAEObjective.loss`` with the codec stages' recipe: edge-weighted L1 + KL;
``UNetObjective.loss``: the min-SNR epsilon MSE). Each (part, mode) runs in a
fresh process with an empty inductor cache; "first" is the first 3 steps (the compile, for compile),
"step" the mean of --steps steps after them. Also the data: the VAE recipe's batch (rendering 16 scenes)
per step. The weights are random (the speed of a step does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import json, sys, time, torch
from finetune.config import build, read_yaml
from finetune.recipes import recipe_path
part, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
if part == "vae":  # the codec stages' recipe (edge-weighted L1 + KL) on a fresh VAE of the recipe's shape
    from finetune.vae import VAEConfig, VAEObjective, build_vae
    cfg = build(VAEConfig, {**read_yaml(recipe_path("shapes-vae-stars.yaml")), "output_dir": "unused", "init_vae": None})
    obj, model = VAEObjective(cfg), build_vae(cfg)
    batch, key = {"pixels": torch.rand(16, 3, 64, 64) * 2 - 1}, "vae"
else:  # the U-Net recipe's min-SNR epsilon loss on cached latents and text states
    from finetune.unet import UNetConfig, UNetObjective, build_unet
    from ldm.schedule import SD1_SCHEDULER, NoiseSchedule
    cfg = build(UNetConfig, {**read_yaml(recipe_path("shapes-unet.yaml")), "output_dir": "unused"})
    obj, model = UNetObjective(cfg), build_unet(cfg, 64, 8)
    obj.schedule = NoiseSchedule.from_config(dict(SD1_SCHEDULER, prediction_type=cfg.prediction_type))
    batch, key = {"latents": torch.randn(64, 4, 8, 8), "hidden": torch.randn(64, 20, 64)}, "unet"
obj.device = torch.device("cpu")
if mode == "channels_last":
    model = model.to(memory_format=torch.channels_last)
    batch = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}
model.train()
opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=True if mode == "fused_adamw" else None)
loss_fn = torch.compile(obj.loss) if mode == "compile" else obj.loss
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        loss, _ = loss_fn(batch, {key: model}, gen)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
t = time.perf_counter()
for _ in range(3):
    step()
first = time.perf_counter() - t
t = time.perf_counter()
for _ in range(steps):
    step()
out = {"first": first, "step": (time.perf_counter() - t) / steps, "threads": torch.get_num_threads()}
if part == "vae" and mode == "eager":  # the recipe's own batches: 16 scenes rendered
    t = time.perf_counter()
    for i in range(50):
        obj.batch(i, torch.Generator().manual_seed(i), 0, 1)
    out["data"] = (time.perf_counter() - t) / 50
print(json.dumps(out))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["vae", "unet"], choices=["vae", "unet"])
    ap.add_argument("--modes", nargs="+", default=["eager", "channels_last", "compile"],
                    choices=["eager", "channels_last", "compile", "bf16", "fused_adamw"])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print("| part | mode | s / step | vs eager | first 3 steps, s |")
    print("|---|---|---|---|---|")
    for part in args.parts:
        eager, data = None, None
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                r = subprocess.run([sys.executable, "-c", CHILD, part, mode, str(args.steps)], env=env,
                                   capture_output=True, text=True)
            if r.returncode:
                print(f"| {part} | {mode} | failed: {r.stderr.strip().splitlines()[-1]} | | |")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            eager = m["step"] if mode == "eager" else eager
            data = m.get("data", data)
            ratio = f"{eager / m['step']:.2f}x" if eager else "-"
            print(f"| {part} | {mode} | {m['step']:.3f} | {ratio} | {m['first']:.1f} |", flush=True)
        if data is not None:
            print(f"| {part} | data: one recipe batch (16 scenes rendered) | {data:.4f} | | |")
    print(f"({os.cpu_count()} CPUs; steps timed: {args.steps} after 3)")


if __name__ == "__main__":
    main()
