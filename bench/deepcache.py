"""DeepCache on the embedded model: speed and quality at cache intervals 1 (off), 2, 3, 5.

    python bench/deepcache.py [--model DIR] [--intervals 1 2 3 5] [--depth 1] [--seeds 0 1 2] [--rounds 3]

Quality: the shapes detector's all-correct rate on the seen and held-out pairs (``ldm eval``'s cases,
at the model's default sampler, steps and guidance) at each eval seed. Speed: a batch of 16 images
timed end to end (text encoding, sampling, VAE decoding), median of --rounds, the intervals alternated
within each round; the ratio is against interval 1 in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm.models import default_model_path
from pipelines.pipeline import Pipeline
from shapes.evaluate import evaluate

PROMPTS = ["a large red circle on a blue background", "a small green star on a white background"] * 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(args.model or default_model_path())
    sampler, steps, guidance = pipe.sampling_settings(None, None, None)
    print(f"model {pipe.model.name}: {sampler}, {steps} steps, guidance {guidance}; depth {args.depth}; "
          f"{torch.get_num_threads()} threads")
    times = {n: [] for n in args.intervals}
    pipe.text_to_image(PROMPTS, seed=0, cache_interval=1)  # warm-up
    for _ in range(args.rounds):
        for n in args.intervals:
            t0 = time.perf_counter()
            pipe.text_to_image(PROMPTS, seed=0, cache_interval=n, cache_depth=args.depth)
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times[args.intervals[0]])
    print("| interval | s / batch of 16 (median) | speed-up | seen all-correct (per seed) | held-out all-correct (per seed) |")
    print("|---|---|---|---|---|")
    for n in args.intervals:
        seen, held = [], []
        for s in args.seeds:
            rep = evaluate(pipe, seed=s, progress=False, cache_interval=n, cache_depth=args.depth)
            seen.append(rep["seen"]["all_correct"])
            held.append(rep["heldout"]["all_correct"])
        med = statistics.median(times[n])
        print(f"| {n} | {med:.3f} | {base / med:.2f}x | {statistics.mean(seen):.3f} "
              f"({' / '.join(f'{v:.3f}' for v in seen)}) | {statistics.mean(held):.3f} "
              f"({' / '.join(f'{v:.3f}' for v in held)}) |", flush=True)


if __name__ == "__main__":
    main()
