"""Cold start of the ``ldm`` command: wall time of fresh processes, and where it goes.

    python bench/coldstart.py [--rounds 5] [--repo DIR ...]

For each checkout (this one, and any ``--repo DIR``, e.g. a ``git worktree`` of an older commit) and
each case, a fresh interpreter runs the command as the ``ldm`` console script does; cases and checkouts
are interleaved round by round, so that a busy spell of a shared machine lands on all of them. Cases:
``python -c "import torch"`` (the floor the issue names), ``ldm --help``, ``ldm generate --help`` and
``ldm generate "a red circle" --output X.png`` on the embedded model (30 steps). Then, for this checkout,
one ``python -X importtime`` run of the generate command, its import seconds summed by top-level
package (each module's own time, so the sum is the whole import time), and the stages of the same
command timed in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# what the console script `ldm` does, for a checkout given by path (older ones have no `entry`)
RUN = ("import sys; sys.path.insert(0, {repo!r}); sys.argv = ['ldm'] + {argv!r}\n"
       "from pipelines import cli\n"
       "entry = getattr(cli, 'entry', None)\n"
       "entry() if entry else sys.exit(cli.main())\n")

STAGES = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
from transformers import CLIPTextModel, CLIPTokenizer
t.append(time.perf_counter())
from diffusers import AutoencoderKL, UNet2DConditionModel
t.append(time.perf_counter())
from ldm.locate import default_model_path
from pipelines.pipeline import Pipeline
from pipelines.request import Request
from pipelines.pngmeta import save_png
t.append(time.perf_counter())
pipe = Pipeline.from_pretrained(default_model_path())
t.append(time.perf_counter())
images = pipe.generate(Request(prompt="a red circle", seed=0)).images
t.append(time.perf_counter())
save_png(images[0], {out!r}, "a red circle")
t.append(time.perf_counter())
print(" ".join(f"{{b - a:.3f}}" for a, b in zip(t, t[1:])))
"""
STAGE_NAMES = ["import torch", "import transformers' CLIP", "import diffusers' UNet and VAE", "import this project",
               "load the model", "sample 30 steps and decode", "write the PNG"]


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    return time.perf_counter() - t


def import_table(repo: Path, out: str, top: int = 8) -> list[tuple[str, float]]:
    code = RUN.format(repo=str(repo), argv=["generate", "a red circle", "--output", out, "--quiet"])
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, capture_output=True,
                         text=True, cwd=tempfile.gettempdir()).stderr
    by_package: dict[str, float] = {}
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:"):].split("|")  # own time, cumulative, module
        pkg = name.strip().split(".")[0]
        by_package[pkg] = by_package.get(pkg, 0.0) + int(self_us) / 1e6
    rows = sorted(by_package.items(), key=lambda kv: -kv[1])
    shown = rows[:top]
    shown.append(("everything else", sum(v for _, v in rows[top:])))
    shown.append(("all imports", sum(v for _, v in rows)))
    return shown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repo", type=Path, action="append", default=[], help="another checkout to time beside this one")
    args = ap.parse_args(argv)
    out = str(Path(tempfile.mkdtemp()) / "x.png")
    repos = [HERE] + [r.resolve() for r in args.repo]
    cases = {
        'python -c "import torch"': lambda repo: [sys.executable, "-c", "import torch"],
        "ldm --help": lambda repo: [sys.executable, "-c", RUN.format(repo=str(repo), argv=["--help"])],
        "ldm generate --help": lambda repo: [sys.executable, "-c", RUN.format(repo=str(repo), argv=["generate", "--help"])],
        'ldm generate "a red circle"': lambda repo: [sys.executable, "-c", RUN.format(
            repo=str(repo), argv=["generate", "a red circle", "--output", out, "--quiet"])],
    }
    for repo in repos:  # once each first: caches (tokenizer files, .pyc) written, not timed
        wall(cases['ldm generate "a red circle"'](repo))
    times = {(r, c): [] for r in repos for c in cases}
    for _ in range(args.rounds):
        for c, make in cases.items():
            for r in repos:
                if c.startswith("python") and r != HERE:
                    continue
                times[(r, c)].append(wall(make(r)))
    print(f"## cold start, {os.cpu_count()} cores, median of {args.rounds} fresh processes (min-max)\n")
    print("| command | " + " | ".join(str(r) for r in repos) + " |")
    print("|---|" + "---|" * len(repos))
    for c in cases:
        cells = []
        for r in repos:
            v = times[(r, c)]
            cells.append(f"{statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})" if v else "")
        print(f"| {c} | " + " | ".join(cells) + " |")

    print(f"\n## python -X importtime of `ldm generate` ({HERE}): own import time by top-level package\n")
    print("| package | s |\n|---|---|")
    for pkg, s in import_table(HERE, out):
        print(f"| {pkg} | {s:.2f} |")

    print("\n## the stages of one generate, in one fresh process (median of the rounds)\n")
    runs = []
    for _ in range(args.rounds):
        res = subprocess.run([sys.executable, "-c", STAGES.format(repo=str(HERE), out=out)], check=True,
                             capture_output=True, text=True, cwd=tempfile.gettempdir())
        runs.append([float(x) for x in res.stdout.split()])
    print("| stage | s |\n|---|---|")
    for i, name in enumerate(STAGE_NAMES):
        print(f"| {name} | {statistics.median(r[i] for r in runs):.2f} |")
    print(f"| sum | {statistics.median(sum(r) for r in runs):.2f} |")


if __name__ == "__main__":
    main()
