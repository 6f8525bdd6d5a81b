"""``ldm eval``: generate a fixed, seeded set of full-caption prompts and judge every image with the
shapes-world detector (shapes.world.detect): all-correct rate and each attribute's rate, separately
for seen pairs and held-out pairs, plus CLIP score with the shapes CLIP. Writes a JSON report and a
grid image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm.images import to_tensor
from pipelines.outputs import write_report

from . import world as shapes

ATTRS = ("size", "color", "shape", "background")


def eval_prompts(split: str, n: int | None, seed: int = 0) -> list[dict]:
    """A fixed list of full-caption cases of ``split`` (seen / heldout): n combinations drawn without
    replacement by ``seed`` (all of them when n is None or larger than the split)."""
    combos = shapes.combinations(split)
    order = np.random.default_rng([seed, 0 if split == "seen" else 1]).permutation(len(combos))
    if n is not None:
        order = order[:n]
    return [dict(zip(ATTRS, combos[i]), prompt=shapes.caption(*combos[i]), split=split) for i in order]


def judge(images, cases: list[dict]) -> list[dict]:
    """Per image: what the detector read and, for each attribute the case names, whether it matches."""
    rows = []
    for img, case in zip(images, cases):
        r = shapes.detect(img)
        ok = r.matches(**{a: case.get(a) for a in ATTRS})
        rows.append({**case, "read": {a: getattr(r, a) for a in ATTRS}, "correct": ok, "all": all(ok.values())})
    return rows


def summarize(rows: list[dict]) -> dict:
    """All-correct rate and per-attribute rates (and mean CLIP score when present) of judged rows."""
    if not rows:
        return {"n": 0}
    out = {"n": len(rows), "all_correct": float(np.mean([r["all"] for r in rows]))}
    for a in ATTRS:
        vals = [r["correct"][a] for r in rows if a in r["correct"]]
        if vals:
            out[a] = float(np.mean(vals))
    if "clip_score" in rows[0]:
        out["clip_score"] = float(np.mean([r["clip_score"] for r in rows]))
    return out


def generate(pipe, cases: list[dict], *, seed: int, batch_size: int, progress: bool = True, **sampling):
    """One image per case (seed ``seed + i`` for case i), in batches."""
    from tqdm.auto import tqdm

    images = []
    for start in tqdm(range(0, len(cases), batch_size), desc="eval", disable=not progress):
        chunk = cases[start:start + batch_size]
        res = pipe.text_to_image([c["prompt"] for c in chunk], seeds=[seed + start + i for i in range(len(chunk))],
                                 **sampling)
        images += res.images
    return images


def clip_scores(images, prompts, clip_dir, text_dir) -> list[float]:
    from .clip import ShapesCLIP

    clip = ShapesCLIP(clip_dir, text_dir)
    return clip.score(torch.cat([to_tensor(i) for i in images]), prompts).tolist()


def evaluate(pipe, *, seen: int | None = 64, heldout: int | None = 48, seed: int = 0, batch_size: int = 16,
             steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None, clip_dir=None, clip_text_dir=None,
             output_dir=None, progress: bool = True, schedule: str | None = None, **options) -> dict:
    """Generate and judge; returns the report (and writes report.json and grid.png into ``output_dir``).
    Sampling settings left None are the model's defaults (``Pipeline.sampling_settings``); ``options``
    are further Request fields (cache_interval, clip_skip, ...)."""
    from ldm.images import make_grid
    from ldm.models import default_model_path

    from .clip import EMBEDDED_CLIP

    sampler, steps, guidance_scale = pipe.sampling_settings(sampler, steps, guidance_scale)
    cases = eval_prompts("seen", seen, seed) + eval_prompts("heldout", heldout, seed)
    images = generate(pipe, cases, seed=seed, batch_size=batch_size, progress=progress, steps=steps,
                      guidance_scale=guidance_scale, sampler=sampler, schedule=schedule, **options)
    rows = judge(images, cases)
    clip_dir = Path(clip_dir) if clip_dir else EMBEDDED_CLIP
    clip_text_dir = Path(clip_text_dir) if clip_text_dir else default_model_path()
    if clip_text_dir is not None and (clip_dir / "visual.safetensors").is_file():
        for r, s in zip(rows, clip_scores(images, [c["prompt"] for c in cases], clip_dir, clip_text_dir)):
            r["clip_score"] = s
    report = {
        "model": str(pipe.model.path), "sampler": sampler, "schedule": schedule or "default", "steps": steps, "guidance": guidance_scale, "seed": seed,
        "seen": summarize([r for r in rows if r["split"] == "seen"]),
        "heldout": summarize([r for r in rows if r["split"] == "heldout"]),
        "images": rows,
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_report(out, report)
        make_grid(images, cols=16).save(out / "grid.png")
    return report
