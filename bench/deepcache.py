"""DeepCache on the embedded model: speed and quality at cache intervals 1 (off), 2, 3, 5, for each
cache depth (1: the outermost resolution level recomputed between full steps; 0: only the last layer
of the last up block).

    python bench/deepcache.py [--model DIR] [--intervals 1 2 3 5] [--depths 1 0] [--seeds 0 1 2]
                              [--seen 64] [--heldout 48] [--rounds 3]

Quality: the shapes detector's all-correct rate on the seen and held-out pairs (``ldm eval``'s cases,
at the model's default sampler, steps and guidance) at each eval seed, pooled over the seeds, and,
against interval 1 on the same prompts and noise, how many seen images only one of the two got right
with the exact sign test on them. Speed: a batch of 16 images timed end to end (text encoding,
sampling, VAE decoding), median of --rounds, every case alternated within each round; the ratio is
against interval 1 in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm.models import default_model_path
from pipelines.pipeline import Pipeline
from shapes.demos import paired
from shapes.evaluate import evaluate

PROMPTS = ["a large red circle on a blue background", "a small green star on a white background"] * 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seen", type=int, default=64, help="seen-pair prompts per seed (ldm eval's: 64; up to 336)")
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(args.model or default_model_path())
    sampler, steps, guidance = pipe.sampling_settings(None, None, None)
    print(f"model {pipe.model.name}: {sampler}, {steps} steps, guidance {guidance}; {torch.get_num_threads()} threads; "
          f"{args.seen} seen + {args.heldout} held-out prompts at each of seeds {args.seeds}")
    cases = [(1, 1)] + [(n, d) for d in args.depths for n in args.intervals if n > 1]
    times = {c: [] for c in cases}
    pipe.text_to_image(PROMPTS, seed=0, cache_interval=1)  # warm-up
    for _ in range(args.rounds):
        for n, d in cases:
            t0 = time.perf_counter()
            pipe.text_to_image(PROMPTS, seed=0, cache_interval=n, cache_depth=d)
            times[(n, d)].append(time.perf_counter() - t0)
    base = statistics.median(times[(1, 1)])
    print("| interval | depth | s / batch of 16 (median) | speed-up | seen all-correct (per seed) | seen vs interval 1 "
          "| right only off / only cached (sign test p) | held-out all-correct (per seed) |")
    print("|---|---|---|---|---|---|---|---|")
    ref = pooled_ref = None
    for n, d in cases:
        seen, held, rows = [], [], []
        for s in args.seeds:
            rep = evaluate(pipe, seed=s, seen=args.seen, heldout=args.heldout, progress=False,
                           cache_interval=n, cache_depth=d)
            seen.append(rep["seen"]["all_correct"])
            held.append(rep["heldout"]["all_correct"])
            rows += [r for r in rep["images"] if r["split"] == "seen"]
        pooled = statistics.mean(r["all"] for r in rows)
        if ref is None:  # the first case, interval 1: what the others are compared with
            ref, pooled_ref = rows, pooled
        pair = paired(ref, rows)
        med = statistics.median(times[(n, d)])
        vs = "" if rows is ref else f"{100 * (pooled - pooled_ref):+.1f} points"
        pairs = "" if rows is ref else f"{pair['first_only']} / {pair['second_only']} (p = {pair['sign_test_p']:.2f})"
        print(f"| {n} | {'-' if n == 1 else d} | {med:.3f} | {base / med:.2f}x | {pooled:.3f} "
              f"({' / '.join(f'{v:.3f}' for v in seen)}) | {vs} | {pairs} | {statistics.mean(held):.3f} "
              f"({' / '.join(f'{v:.3f}' for v in held)}) |", flush=True)


if __name__ == "__main__":
    main()
