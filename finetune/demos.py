"""``ldm demo``: the personalisation methods shown end to end on the embedded shapes model, measured
with the shapes-world detector.

``ldm demo textual-inversion``: render a few images of the held-out pair *orange star* (which the
base model never saw together), learn ``<concept>`` from them with configs/textual-inversion-shapes.yaml,
then judge images of ``a {size} <concept> on a {background} background`` against the base model
prompted with the words ``orange star``, same seeds, every size and every background.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from ldm import shapes

log = logging.getLogger(__name__)

TI_COLOR, TI_SHAPE = "orange", "star"
TI_TRAIN = (("small", "red"), ("large", "blue"), ("small", "yellow"), ("large", "black"), ("small", "white"))


def render_instances(directory: Path, color: str, shape: str, views, placeholder: str, seed: int = 0) -> list[Path]:
    """One PNG per (size, background) of ``views`` with a caption file naming the placeholder in
    place of the colour and the shape: ``a {size} {} on a {background} background``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 101])
    out = []
    for i, (size, bg) in enumerate(views):
        path = directory / f"{i:02d}-{size}-{color}-{shape}-{bg}.png"
        shapes.render(shapes.place(rng, size, color, shape, bg)).save(path)
        path.with_suffix(".txt").write_text(f"a {size} {{}} on a {bg} background\n")
        out.append(path)
    return out


def judge_prompts(pipe, prompts: list[str], cases: list[dict], seeds: list[int], batch_size: int = 16) -> list[dict]:
    from pipelines.evaluate import judge

    images = []
    for i in range(0, len(prompts), batch_size):
        images += pipe.text_to_image(prompts[i:i + batch_size], seeds=seeds[i:i + batch_size]).images
    rows = judge(images, cases)
    for r, p, s in zip(rows, prompts, seeds):
        r["prompt"], r["seed"] = p, s
    return rows, images


def _rates(rows: list[dict]) -> dict:
    from pipelines.evaluate import summarize

    out = summarize(rows)
    for size in shapes.SIZES:
        sub = [r for r in rows if r["size"] == size]
        out[f"all_correct_{size}"] = float(np.mean([r["all"] for r in sub])) if sub else None
    return out


def textual_inversion_demo(output_dir: Path, *, model: str | None = None, per_case: int = 8, seed: int = 0,
                           max_steps: int | None = None, overrides: dict | None = None, progress: bool = True) -> dict:
    from ldm.images import make_grid
    from pipelines.pipeline import Pipeline

    from .cli import default_recipe
    from .config import build, read_yaml
    from .data import base_model_path
    from .loop import train
    from .textual_inversion import TextualInversionConfig, TextualInversionObjective

    output_dir = Path(output_dir)
    values = {**read_yaml(default_recipe("textual-inversion-shapes.yaml")), **(overrides or {})}
    token = values.get("placeholder_token", "<concept>")
    data = output_dir / "data"
    render_instances(data, TI_COLOR, TI_SHAPE, TI_TRAIN, token, seed)
    values.update(data_dir=str(data), output_dir=str(output_dir / "embedding"), seed=seed, model=model,
                  overwrite=True)  # a rerun of the demo starts its training over
    if max_steps is not None:
        values["max_steps"] = max_steps
    cfg = build(TextualInversionConfig, values, "textual-inversion-shapes.yaml")
    summary = train(TextualInversionObjective(cfg), cfg, progress=progress)

    cases = [dict(size=s, color=TI_COLOR, shape=TI_SHAPE, background=b)
             for s in shapes.SIZES for b in shapes.BACKGROUNDS if b != TI_COLOR for _ in range(per_case)]
    seeds = [10_000 + i for i in range(len(cases))]
    words = [shapes.caption(**c) for c in cases]
    concept = [f"a {c['size']} {token} on a {c['background']} background" for c in cases]
    base = Pipeline.from_pretrained(base_model_path(model))
    base_rows, base_images = judge_prompts(base, words, cases, seeds)
    base.load_embedding(output_dir / "embedding" / "learned_embeds.safetensors")
    ti_rows, ti_images = judge_prompts(base, concept, cases, seeds)
    trained_bgs = sorted({bg for _, bg in TI_TRAIN})
    report = {
        "concept": f"{TI_COLOR} {TI_SHAPE}", "token": token, "training_images": len(TI_TRAIN),
        "training_backgrounds": trained_bgs, "steps": cfg.max_steps,
        "train_seconds": summary["seconds"], "steps_per_s": summary["steps_per_s"],
        "sampling": dict(zip(("sampler", "steps", "guidance"), base.sampling())), "images": len(cases),
        "words": _rates(base_rows), "embedding": _rates(ti_rows),
        "words_other_backgrounds": _rates([r for r in base_rows if r["background"] not in trained_bgs]),
        "embedding_other_backgrounds": _rates([r for r in ti_rows if r["background"] not in trained_bgs]),
        "rows": {"words": base_rows, "embedding": ti_rows},
    }
    tmp = output_dir / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, output_dir / "report.json")
    make_grid(base_images, cols=16).save(output_dir / "words.png")
    make_grid(ti_images, cols=16).save(output_dir / "embedding.png")
    return report


def _print_ti(report: dict, output_dir: Path):
    def line(name, r):
        return (f"{name:>24}: orange star with the asked size and background {r['all_correct']:.3f} "
                f"(small {r['all_correct_small']:.3f}, large {r['all_correct_large']:.3f}; "
                f"colour {r['color']:.3f}, shape {r['shape']:.3f})")
    print(f"textual inversion of '{report['concept']}' from {report['training_images']} images: "
          f"{report['steps']} steps, {report['train_seconds']:.0f} s ({report['steps_per_s']:.1f} steps/s)")
    print(f"{report['images']} images each ({report['sampling']}):")
    print(line("words 'orange star'", report["words"]))
    print(line(report["token"], report["embedding"]))
    print(line("words, unseen bgs", report["words_other_backgrounds"]))
    print(line(report["token"] + ", unseen bgs", report["embedding_other_backgrounds"]))
    print(f"report: {output_dir / 'report.json'}; grids: words.png, embedding.png")


def register(sub) -> None:
    d = sub.add_parser("demo", help="personalisation demonstrations on the embedded shapes model")
    dsub = d.add_subparsers(dest="demo", required=True)
    t = dsub.add_parser("textual-inversion", help="learn <concept> = orange star (a held-out pair) from 5 images")
    t.add_argument("--output-dir", type=Path, default=Path("runs/demo-textual-inversion"))
    t.add_argument("--model", default=None, help="base model (default: the embedded shapes model)")
    t.add_argument("--per-case", type=int, default=8, help="images per (size, background) (default 8)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of configs/textual-inversion-shapes.yaml (repeatable)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_run_ti)


def _run_ti(args) -> int:
    from ldm.models import ModelError

    from .config import ConfigError
    from .loop import TrainingError

    try:
        bad = [item for item in args.set if "=" not in item]
        if bad:
            raise ConfigError(f"--set {bad[0]!r}: expected KEY=VALUE")
        overrides = dict(item.split("=", 1) for item in args.set)
        report = textual_inversion_demo(args.output_dir, model=args.model, per_case=args.per_case, seed=args.seed,
                                        max_steps=args.max_steps, overrides=overrides, progress=not args.quiet)
    except (ConfigError, TrainingError, ModelError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_ti(report, args.output_dir)
    return 0
