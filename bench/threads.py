"""Sampling speed under PyTorch's thread settings, on an idle machine and beside a competing load.

    python bench/threads.py [--rounds 3] [--steps 30] [--batch-size 1]

For each setting (torch's default threads; OMP_WAIT_POLICY=PASSIVE; OMP_NUM_THREADS=1; the command line's
default, --threads auto: pipelines.processes.choose_threads) a fresh
process loads the embedded model and times the sampling of one batch, once on an idle machine and
once while busy-looping processes (one per core) compete for the CPU; settings and conditions are
interleaved over the rounds. Prints the median seconds of each cell and each setting's ratio to
the default in the same condition. Loading is not timed (it is I/O and imports).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import os, time, sys
if os.environ.get("LDM_THREADS"):
    from pipelines.processes import apply_threads
    apply_threads(os.environ["LDM_THREADS"])
from pipelines.pipeline import Pipeline
from ldm.models import default_model_path
p = Pipeline.from_pretrained(default_model_path())
p.text_to_image("a red circle", steps=int(sys.argv[1]), seed=0, batch_size=int(sys.argv[2]))  # warm-up
t = time.perf_counter()
p.text_to_image("a red circle", steps=int(sys.argv[1]), seed=1, batch_size=int(sys.argv[2]))
print(time.perf_counter() - t)
"""
SETTINGS = {"default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}, "--threads auto": {"LDM_THREADS": "auto"}}
BUSY = "import time\nt = time.time()\nwhile time.time() - t < 600: pass\n"


def run(env_extra: dict, steps: int, batch: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LDM_THREADS")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(batch)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args()
    times = {(s, c): [] for s in SETTINGS for c in ("idle", "loaded")}
    for _ in range(args.rounds):
        for cond in ("idle", "loaded"):
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 1)] \
                if cond == "loaded" else []
            try:
                for name, env in SETTINGS.items():
                    times[(name, cond)].append(run(env, args.steps, args.batch_size))
            finally:
                for b in busy:
                    b.kill()
                    b.wait()
    print(f"sampling {args.steps} steps, batch {args.batch_size}, {os.cpu_count()} cores, median of {args.rounds}")
    print("| setting | idle s | vs default | beside a load on every core, s | vs default |\n|---|---|---|---|---|")
    for name in SETTINGS:
        cells = []
        for cond in ("idle", "loaded"):
            med = statistics.median(times[(name, cond)])
            cells += [f"{med:.2f}", f"{med / statistics.median(times[('default', cond)]):.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
