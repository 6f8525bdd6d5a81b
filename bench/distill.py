"""Distilled students against their teacher, in one run: for the teacher at 64, 32, 16, 8 and 4 DDIM
steps (with classifier-free guidance) and for each stage of an ``ldm distill`` chain at its own step
count, the shapes judge's all-correct rate on seen pairs, seconds per image, U-Net evaluations per
image (counted by a hook on the U-Net: a guided step is two) and the mean pixel distance to the
64-step teacher's image from the same initial noise (the same seed).

    python bench/distill.py --chain runs/distill [--teacher DIR] [--seen 336] [--seeds 0 1 2] [--json out.json]

The teacher runs on the students' grid (trailing spacing, last step to the clean sample), which is
what the chain distils, and, unless --no-config-spacing, also on its own scheduler config's grid.
With several --seeds every row is measured at each eval seed (its own prompts and noise) and the
all-correct rates are also pooled over them, with each row's distance to the first teacher row.
Nothing here is a target: the script prints what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.models import default_model_path  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from shapes.evaluate import eval_prompts, generate, judge, summarize  # noqa: E402


def run(pipe: Pipeline, cases, *, steps: int, guidance: float, seed: int, batch_size: int):
    """Images, all-correct rate, seconds per image and U-Net rows per image of one setting."""
    rows = [0]
    hook = pipe.model.unet.register_forward_hook(lambda m, args, kwargs_out: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    try:
        t0 = time.perf_counter()
        images = generate(pipe, cases, seed=seed, batch_size=batch_size, progress=False, steps=steps,
                          guidance_scale=guidance, sampler="ddim")
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    summary = summarize(judge(images, cases))
    return images, {"all_correct": summary["all_correct"], "shape": summary.get("shape"),
                    "s_per_image": seconds / len(cases), "unet_evals": rows[0] / len(cases)}


def pixel_distance(a, b) -> float:
    """Mean absolute difference of two image lists, in 0-255 units."""
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", type=Path, required=True, help="an ldm distill output directory")
    p.add_argument("--teacher", type=Path, default=None, help="default: the chain's teacher (chain.json)")
    p.add_argument("--teacher-steps", default="64,32,16,8,4")
    p.add_argument("--guidance", type=float, default=None, help="w for every row (default: the teacher's)")
    p.add_argument("--seen", type=int, default=None, help="seen-pair prompts (default: all 336)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="eval seeds (default 0); rates pooled over them")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--no-config-spacing", action="store_true", help="skip the teacher on its own config's grid")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    chain = json.loads((args.chain / "chain.json").read_text())
    teacher_dir = args.teacher or Path(chain["teacher"]) or default_model_path()
    teacher = Pipeline.from_pretrained(teacher_dir)
    w = teacher.model.sampling_defaults["guidance_scale"] if args.guidance is None else args.guidance
    own = teacher.model.schedule
    grids = [("trailing", dataclasses.replace(own, timestep_spacing="trailing", set_alpha_to_one=True))]
    if not args.no_config_spacing:
        grids.append((f"config ({own.timestep_spacing})", own))
    students = [(stage, Pipeline.from_pretrained(args.chain / stage["stage"])) for stage in chain["stages"]]

    results = []
    for seed in args.seeds:
        cases = eval_prompts("seen", args.seen, seed)
        reference = None
        for grid, schedule in grids:
            teacher.model.schedule = schedule
            for n in [int(s) for s in args.teacher_steps.split(",")]:
                images, r = run(teacher, cases, steps=n, guidance=w, seed=seed, batch_size=args.batch_size)
                if reference is None:
                    reference = images  # the first row (64 steps on the trailing grid) is the reference
                results.append({"model": f"teacher, {grid}", "steps": n, "seed": seed, **r,
                                "pixel_distance": pixel_distance(images, reference)})
                print(results[-1], flush=True)
        for stage, student in students:
            n = student.model.sampling_defaults["steps"]
            images, r = run(student, cases, steps=n, guidance=w, seed=seed, batch_size=args.batch_size)
            results.append({"model": f"student {stage['stage']}", "steps": n, "seed": seed, **r,
                            "pixel_distance": pixel_distance(images, reference), "train_seconds": stage.get("seconds")})
            print(results[-1], flush=True)

    print(f"\n{len(cases)} seen-pair prompts per seed, guidance {w}, seeds {args.seeds}; pixel distance to the "
          f"teacher at {args.teacher_steps.split(',')[0]} steps (trailing) from the same noise, 0-255\n")
    print("| model | steps | seed | all-correct (seen) | shape | s / image | U-Net evals / image | pixel distance |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['steps']} | {r['seed']} | {r['all_correct']:.3f} | {r['shape']:.3f} | "
              f"{r['s_per_image']:.4f} | {r['unet_evals']:.0f} | {r['pixel_distance']:.2f} |")
    if len(args.seeds) > 1:
        pooled = {}
        for r in results:
            pooled.setdefault((r["model"], r["steps"]), []).append(r["all_correct"])
        first = np.mean(next(iter(pooled.values())))
        print(f"\npooled over seeds {args.seeds} ({len(cases) * len(args.seeds)} prompts, as many per seed)\n")
        print("| model | steps | all-correct per seed | pooled | points under the first teacher row |")
        print("|---|---|---|---|---|")
        for (model, n), rates in pooled.items():
            print(f"| {model} | {n} | {' / '.join(f'{x:.3f}' for x in rates)} | {np.mean(rates):.3f} | "
                  f"{100 * (first - np.mean(rates)):.1f} |")
    total = sum(s.get("wall_seconds", 0.0) for s in chain["stages"])
    print("\nchain training, wall time per stage: " +
          ", ".join(f"{s['stage']} " + (f"{s['wall_seconds']:.0f} s" if "wall_seconds" in s else
                                        "(kept from an earlier run that recorded no time)") + f" ({s['steps']} steps)"
                    for s in chain["stages"]) + f"; sum {total:.0f} s (the last ldm distill call: "
          f"{chain['wall_seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"cases": len(cases), "seeds": args.seeds, "guidance": w, "rows": results, "chain": chain}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
