"""What editing costs on the embedded model, each case in a fresh process (so its peak memory is its own):

    python bench/edit_cost.py [--batch 16]

prompt-to-prompt of B pairs against plain generation of the same 2B images, with local blending;
null-text and direct inversion of B rendered scenes (not cached) plus their edit; CLIP guidance (scale 10) against
none for B images. Each case runs once to warm up, then is timed; peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = ("plain-2B", "p2p-B", "p2p-B-blend", "nti-B", "direct-B", "plain-B", "clip-B")


def run_case(case: str, batch: int) -> dict:
    import numpy as np
    import torch

    from ldm.locate import EMBEDDED_MODEL
    from pipelines.edit import Edit, edit
    from pipelines.pipeline import Pipeline
    from pipelines.request import Request
    from shapes import world

    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained(EMBEDDED_MODEL)
    src = ["a large red circle on a blue background"] * batch
    tgt = ["a large red square on a blue background"] * batch
    seeds = list(range(batch))
    rng = np.random.default_rng(0)
    scenes = [world.render(world.place(rng, "large", "red", "circle", "blue")) for _ in range(batch)]
    work = {
        "plain-2B": lambda: pipe.text_to_image(src + tgt, seeds=list(range(2 * batch))),
        "p2p-B": lambda: edit(pipe, Edit(src, tgt), Request(seeds=seeds)),
        "p2p-B-blend": lambda: edit(pipe, Edit(src, tgt, blend_words=["circle", "square"]), Request(seeds=seeds)),
        "nti-B": lambda: edit(pipe, Edit(src, tgt, images=scenes, inversion="null-text"), Request()),
        "direct-B": lambda: edit(pipe, Edit(src, tgt, images=scenes, inversion="direct"), Request()),
        "plain-B": lambda: pipe.text_to_image(src, seeds=seeds),
        "clip-B": lambda: pipe.text_to_image(src, seeds=seeds, clip_guidance_scale=10.0),
    }[case]
    work()
    t = time.perf_counter()
    work()
    return {"case": case, "seconds": time.perf_counter() - t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.batch)))
        return 0
    rows = {}
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[case]
        print(f"{case:12s} {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    b = args.batch
    print(f"p2p of {b} pairs / plain {2 * b} images: {rows['p2p-B']['seconds'] / rows['plain-2B']['seconds']:.2f}x; "
          f"with blending {rows['p2p-B-blend']['seconds'] / rows['plain-2B']['seconds']:.2f}x")
    for name, case in (("null-text", "nti-B"), ("direct", "direct-B")):
        print(f"{name} inversion: {(rows[case]['seconds'] - rows['p2p-B']['seconds']) / b:.2f} s per image")
    print(f"CLIP guidance: {rows['clip-B']['seconds'] / rows['plain-B']['seconds']:.2f}x the time, "
          f"{rows['clip-B']['peak_rss_mb'] - rows['plain-B']['peak_rss_mb']:+.0f} MB peak RSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
