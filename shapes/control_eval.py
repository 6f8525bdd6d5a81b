"""``ldm eval-controlnet``: judge a ControlNet of the shapes model with the detector.

Placement: scenes drawn at any position with box sides anywhere in [14, 40] px (the world's two size
classes and the sizes between, which the base model never draws), each prompted with its full caption
and controlled by its condition (silhouette or canny); the generated shape's box (the detector's) is
compared with the condition's box (the bounding box of the silhouette) by IoU, and the attributes the
prompt asks (colour, background, shape) are read as ``ldm eval`` reads them. The same prompts and
seeds without the control give the chance level.

Control against prompt: a star's condition with a prompt asking for a circle, over a range of
weights and the three control modes: how often the star (the control) or the circle (the prompt) wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import world as shapes

EVAL_SIZES = (14, 40)  # box sides drawn uniformly from this range (inclusive)
IOU_GOAL = 0.8


def condition_box(scene: shapes.Scene) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive: the bounding box of the scene's silhouette."""
    m = np.asarray(shapes.render_mask(scene)) > 127
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def eval_scenes(n: int, seed: int = 0) -> list[shapes.Scene]:
    """``n`` scenes of seen pairs at free positions and sizes (a stream apart from training's)."""
    return [shapes.free_scene(10_000 + seed, i, *EVAL_SIZES) for i in range(n)]


def conditions(scenes, kind: str) -> torch.Tensor:
    """(N, 3, 64, 64) in [0, 1]: each scene's condition image, one per generated image."""
    from ldm.control import to_tensor01

    return torch.cat([to_tensor01(shapes.render_condition(sc, kind)) for sc in scenes])


def _generate(pipe, prompts, seeds, control, batch_size, progress, desc, **sampling):
    """Images for ``prompts`` (seed per image), each with its own row of ``control`` (a unit dict whose image is
    (N, 3, H, W)), or without control when None."""
    from tqdm.auto import tqdm

    images = []
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        sl = slice(s, s + batch_size)
        extra = {} if control is None else {"controls": [{**control, "image": control["image"][sl]}]}
        images += pipe.text_to_image(prompts[sl], seeds=seeds[sl], **extra, **sampling).images
    return images


def placement(pipe, controlnet, *, n: int = 128, seed: int = 0, kind: str = "silhouette", weight: float = 1.0,
              mode: str = "balanced", batch_size: int = 16, with_baseline: bool = True, progress: bool = True,
              **sampling) -> dict:
    """Placement and attributes of ``n`` controlled images (and of the same prompts and seeds without
    the control when ``with_baseline``): rates and per-image rows."""
    scenes = eval_scenes(n, seed)
    prompts = [sc.caption for sc in scenes]
    seeds = [seed * 100_000 + i for i in range(n)]
    unit = {"model": controlnet, "image": conditions(scenes, kind), "weight": weight, "mode": mode}
    arms = {"controlled": unit} | ({"uncontrolled": None} if with_baseline else {})
    out, images = {}, {}
    for arm, control in arms.items():
        imgs = _generate(pipe, prompts, seeds, control, batch_size, progress, f"{arm} ({kind})", **sampling)
        rows = []
        for sc, img in zip(scenes, imgs):
            r = shapes.detect(img)
            iou = shapes.box_iou(r.box, condition_box(sc))
            rows.append({"prompt": sc.caption, "box": condition_box(sc), "read_box": r.box, "iou": round(iou, 4),
                         "color": r.color == sc.color, "background": r.background == sc.background,
                         "shape": r.shape == sc.shape})
        out[arm] = {
            "placed": float(np.mean([r["iou"] >= IOU_GOAL for r in rows])),
            "mean_iou": float(np.mean([r["iou"] for r in rows])),
            "color_and_background": float(np.mean([r["color"] and r["background"] for r in rows])),
            "shape": float(np.mean([r["shape"] for r in rows])),
            "rows": rows}
        images[arm] = imgs
    return {"condition": kind, "weight": weight, "mode": mode, "n": n, "seed": seed, **out,
            "_images": images, "_conditions": [shapes.render_condition(sc, kind) for sc in scenes]}


def control_vs_prompt(pipe, controlnet, *, n: int = 32, seed: int = 0, kind: str = "silhouette",
                      weights=(0.0, 0.3, 0.5, 0.7, 1.0), modes=("balanced", "prompt", "control"), batch_size: int = 16,
                      progress: bool = True, **sampling) -> list[dict]:
    """Star conditions prompted as circles: per (mode, weight), the fractions read as a star and as a circle."""
    scenes = [shapes.Scene(sc.size, sc.color, "star", sc.background, sc.s, sc.x0, sc.y0)
              for sc in eval_scenes(n, seed + 1)]
    prompts = [shapes.caption(sc.size, sc.color, "circle", sc.background) for sc in scenes]
    seeds = [seed * 100_000 + 50_000 + i for i in range(n)]
    image = conditions(scenes, kind)
    rows = []
    for mode in modes:
        for w in weights:
            imgs = _generate(pipe, prompts, seeds, {"model": controlnet, "image": image, "weight": w, "mode": mode},
                             batch_size, progress, f"{mode} {w:g}", **sampling)
            read = [shapes.detect(i).shape for i in imgs]
            rows.append({"mode": mode, "weight": w, "star": read.count("star") / n, "circle": read.count("circle") / n})
    return rows


def write(report: dict, output_dir: Path) -> None:
    """report.json (without the images) and, per arm, a grid of conditions beside results."""
    from ldm.images import make_grid
    from pipelines.outputs import write_report

    output_dir.mkdir(parents=True, exist_ok=True)
    for p in report.get("placement", []):
        conds, imgs = p.pop("_conditions"), p.pop("_images")
        tiles = []
        for k in range(min(16, len(conds))):
            tiles += [conds[k]] + [imgs[arm][k] for arm in imgs]
        make_grid(tiles, cols=(1 + len(imgs)) * 4).save(output_dir / f"placement-{p['condition']}.png")
    write_report(output_dir, report)
