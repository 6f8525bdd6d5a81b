"""--compile on the embedded model: speed-up and compile time, eager against compiled in one run.

    python bench/compile.py [--model DIR] [--batch-size 16] [--modes full blocks] [--device cpu]

Each mode runs in a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a new
temporary folder), so the compile time is a cold one: the first compiled generation less a steady
one. Speed: the median of 3 generations (default sampler and steps) after it, against the median of
3 eager ones in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import json, statistics, sys, time, torch
from ldm.models import default_model_path
from pipelines.pipeline import Pipeline
model, batch, mode, device = sys.argv[1] or default_model_path(), int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = Pipeline.from_pretrained(model, device=device)
prompts = ["a large red circle on a blue background"] * batch
def run():
    t = time.perf_counter(); r = p.text_to_image(prompts, seed=0)
    if device.startswith("cuda"): torch.cuda.synchronize()
    return time.perf_counter() - t, r
run()
eager = statistics.median(run()[0] for _ in range(3))
ref = run()[1].pixels
p.compile(regional=mode == "blocks")
first, res = run()
steady = statistics.median(run()[0] for _ in range(3))
print(json.dumps({"mode": mode, "eager_s": eager, "compiled_s": steady, "compile_s": first - steady,
                  "max_diff": float((res.pixels - ref).abs().max())}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["full", "blocks"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print("| mode | eager s / batch | compiled s / batch | speed-up | cold compile s | max pixel diff |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as cache:
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.batch_size), mode, args.device],
                                 capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if out.returncode:
            print(f"| {mode} | failed: {out.stderr.strip().splitlines()[-1]} | | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['eager_s'] / r['compiled_s']:.2f}x | "
              f"{r['compile_s']:.1f} | {r['max_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
