"""Loading a model from a single file against the same model as a diffusers directory, in one run.

    python bench/load.py [--model DIR] [--rounds 5]

Converts the model (default: the embedded one) to one .safetensors file in a temporary folder, then
alternates loading the directory and the file (the file with the directory as its config, so both
build the same networks) and prints the median seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ldm.checkpoints import to_single_file
from ldm.models import default_model_path, load_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        f = to_single_file(load_model(args.model), Path(tmp) / "model.safetensors")
        times = {"directory": [], "single file": []}
        for _ in range(args.rounds):
            for name, kw in (("directory", dict(name_or_path=args.model)),
                             ("single file", dict(name_or_path=f, config=args.model))):
                t0 = time.perf_counter()
                load_model(**kw)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:12s} median {v:.3f} s over {args.rounds} rounds ({', '.join(f'{x:.3f}' for x in times[k])})")
    print(f"single file / directory: {med['single file'] / med['directory']:.2f}x")


if __name__ == "__main__":
    main()
