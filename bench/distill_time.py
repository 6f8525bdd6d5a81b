"""Training cost of the distillation chain against the base U-Net's own training, in one run.

    python bench/distill_time.py [--steps 100] [--rounds 2] [--recipe configs/distill-shapes.yaml]

Wall-clock times of long runs on a shared or pausable machine drift by tens of percent between runs
(the same 2,500-step U-Net recipe has logged 821 s and 1366 s here, with bit-identical weights), so
this compares the two on equal terms: in one invocation it runs --steps steps of the base U-Net
recipe (configs/shapes-unet.yaml) and of each stage of the distillation recipe, each in its own
process through the real commands, in alternating order over --rounds rounds (base, chain, chain,
base, ...), reads each loop's seconds per step, and projects the full recipes: the base's steps x its
s/step against the sum over stages of steps x that stage's s/step. Data preparation (rendering and
encoding scenes: 40,000 for the base, 8,000 for the chain) is outside both loops; the wall times of
the timed runs, setup included, are printed too. Nothing here is a target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.config import build, read_yaml
from finetune.distill import DistillConfig, plan
from finetune.unet import UNetConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "ldm" / "assets" / "shapes-model"


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="steps timed per run")
    p.add_argument("--recipe", type=Path, default=ROOT / "configs" / "distill-shapes.yaml")
    p.add_argument("--base-recipe", type=Path, default=ROOT / "configs" / "shapes-unet.yaml")
    p.add_argument("--rounds", type=int, default=2, help="base/chain pairs, alternating order")
    p.add_argument("--num-images", type=int, default=512, help="scenes encoded for each timed run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    ldm = [sys.executable, "-m", "pipelines.cli"]
    n = args.steps

    def time_base(tmp: Path) -> tuple[float, float]:
        wall = run(ldm + ["train-unet", "--config", str(args.base_recipe), "--output-dir", str(tmp),
                          "--max-steps", str(n), "--quiet", "--checkpoint-every", "0",
                          "--set", f"vae_dir={MODEL}", "--set", f"clip_dir={MODEL}",
                          "--set", f"num_images={args.num_images}", "--set", "validation_every=0"])
        return json.loads((tmp / "train_summary.json").read_text())["seconds"] / n, wall

    def time_chain(tmp: Path) -> tuple[dict, float]:
        wall = run(ldm + ["distill", "--config", str(args.recipe), "--output-dir", str(tmp),
                          "--teacher", str(MODEL), "--quiet", "--checkpoint-every", "0",
                          "--guidance-steps", str(n), "--stage-steps", str(n), "--num-images", str(args.num_images)])
        stages = json.loads((tmp / "chain.json").read_text())["stages"]
        return {s["stage"]: s["seconds"] / n for s in stages}, wall

    # base, chain, chain, base, ...: the machine's speed drifts, and this order cancels a linear drift
    base_s, chain_s, walls = [], [], {"base": 0.0, "chain": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            for what in (("base", "chain") if r % 2 == 0 else ("chain", "base")):
                out = tmp / f"{what}-{r}"
                if what == "base":
                    sps, wall = time_base(out)
                    base_s.append(sps)
                else:
                    sps, wall = time_chain(out)
                    chain_s.append(sps)
                walls[what] += wall
    s_base = sum(base_s) / len(base_s)
    per_stage = {k: sum(c[k] for c in chain_s) / len(chain_s) for k in chain_s[0]}
    cfg = build(DistillConfig, {**read_yaml(args.recipe), "teacher": str(MODEL)}, str(args.recipe))
    planned = {name: steps for name, _, steps in plan(cfg)[0]}  # the recipe's stages, as ldm distill runs them
    base_steps = build(UNetConfig, read_yaml(args.base_recipe), str(args.base_recipe)).max_steps
    rows = [("base U-Net (shapes-unet.yaml)", base_steps, s_base)]
    rows += [(f"distill {name}", planned[name], sps) for name, sps in per_stage.items()]
    print(f"{n} timed steps per run, {args.rounds} rounds (base, chain, chain, base, ...); mean s/step projected "
          f"to each recipe's step count (loop time only)\n")
    print("| run | recipe steps | s / step | projected loop s |")
    print("|---|---|---|---|")
    for name, steps, sps in rows:
        print(f"| {name} | {steps} | {sps:.4f} | {steps * sps:.0f} |")
    total = sum(steps * sps for _, steps, sps in rows[1:])
    ratios = [sum(planned[k] * c[k] for k in c) / (base_steps * b) for b, c in zip(base_s, chain_s)]
    print(f"\nchain {total:.0f} s against base {base_steps * s_base:.0f} s: ratio {total / (base_steps * s_base):.3f} "
          f"(per round: {', '.join(f'{x:.3f}' for x in ratios)})")
    print(f"(wall of the timed runs, setup included: base {walls['base']:.0f} s, chain {walls['chain']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"steps": n, "rounds": args.rounds, "rows": rows, "chain_s": total,
                                         "base_s": base_steps * s_base, "round_ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
