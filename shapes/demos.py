"""``ldm demo``: the personalisation methods shown end to end on the embedded shapes model, measured
with the shapes-world detector.

``ldm demo textual-inversion``: render a few images of the held-out pair *orange star* (which the
base model never saw together), learn ``<concept>`` from them with the embedded model's recipes/textual-inversion.yaml,
then judge images of ``a {size} <concept> on a {background} background`` against the base model
prompted with the words ``orange star``, same seeds, every size and every background.

``ldm demo dreambooth``: render 5 images of a teal ring (a colour and a shape the base model never
saw; the VAE, the model's general codec, draws them), then DreamBooth with and without prior
preservation (the embedded model's recipes/dreambooth.yaml), and judge, before and after training, subject
fidelity (``a sks circle on a {background} background``: a teal ring on that background) and prior
preservation (``a {color} circle on a {background} background``: still a correct plain
circle, no ring, no teal).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldm.models import model_recipe

from . import world as shapes

log = logging.getLogger(__name__)

TI_COLOR, TI_SHAPE = "orange", "star"
TI_TRAIN = (("small", "red"), ("large", "blue"), ("small", "yellow"), ("large", "black"), ("small", "white"))
DB_COLOR, DB_SHAPE = "teal", "ring"
DB_TRAIN = (("small", "red"), ("large", "blue"), ("small", "yellow"), ("large", "black"), ("small", "white"))
DB_PRIOR_COLORS = ("red", "blue", "yellow", "purple", "orange")  # circle colours the base model saw (not green)


def render_instances(directory: Path, color: str, shape: str, views, caption: str | None = "a {size} {{}} on a {bg} "
                     "background", seed: int = 0, masks: bool = False) -> list[Path]:
    """One PNG per (size, background) of ``views``, with a caption file (``caption`` formatted with
    the size and background; ``{}`` stays for the placeholder) unless ``caption`` is None, and with
    ``masks`` the shape's mask beside it (NAME.mask.png, the masked loss's input)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 101])
    out = []
    for i, (size, bg) in enumerate(views):
        path = directory / f"{i:02d}-{size}-{color}-{shape}-{bg}.png"
        scene = shapes.place(rng, size, color, shape, bg)
        shapes.render(scene).save(path)
        if masks:
            shapes.render_mask(scene).save(path.with_name(path.stem + ".mask.png"))
        if caption is not None:
            path.with_suffix(".txt").write_text(caption.format(size=size, bg=bg) + "\n")
        out.append(path)
    return out


def judge_prompts(pipe, prompts: list[str], cases: list[dict], seeds: list[int], batch_size: int = 16) -> list[dict]:
    from .evaluate import judge

    images = []
    for i in range(0, len(prompts), batch_size):
        images += pipe.text_to_image(prompts[i:i + batch_size], seeds=seeds[i:i + batch_size]).images
    rows = judge(images, cases)
    for r, p, s in zip(rows, prompts, seeds):
        r["prompt"], r["seed"] = p, s
    return rows, images


def _rates(rows: list[dict]) -> dict:
    from .evaluate import summarize

    out = summarize(rows)
    for size in shapes.SIZES:
        sub = [r for r in rows if r.get("size") == size]
        if sub:
            out[f"all_correct_{size}"] = float(np.mean([r["all"] for r in sub]))
    return out


def paired(a_rows: list[dict], b_rows: list[dict]) -> dict:
    """Two prompts judged on the same seeds: how many images only ``a`` got right, only ``b``, both,
    neither, and the exact two-sided sign test (binomial, p = 1/2) on the images where they differ."""
    from scipy.stats import binomtest

    a = np.array([r["all"] for r in a_rows], bool)
    b = np.array([r["all"] for r in b_rows], bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"first_only": a_only, "second_only": b_only, "both": int((a & b).sum()), "neither": int((~a & ~b).sum()),
            "sign_test_p": float(p)}


def textual_inversion_demo(output_dir: Path, *, model: str | None = None, per_case: int = 16, seed: int = 0,
                           max_steps: int | None = None, overrides: dict | None = None, progress: bool = True) -> dict:
    from finetune.config import build, read_yaml
    from finetune.data import base_model_path
    from finetune.loop import train
    from finetune.textual_inversion import TextualInversionConfig, TextualInversionObjective
    from ldm.images import make_grid
    from pipelines.pipeline import Pipeline

    output_dir = Path(output_dir)
    recipe = model_recipe(model, "textual-inversion") or model_recipe(None, "textual-inversion")  # the model's own
    values = {**read_yaml(recipe), **(overrides or {})}
    token = values.get("placeholder_token", "<concept>")
    data = output_dir / "data"
    render_instances(data, TI_COLOR, TI_SHAPE, TI_TRAIN, seed=seed, masks=True)  # masks: --set mask_weight=W
    values.update(data_dir=str(data), output_dir=str(output_dir / "embedding"), seed=seed, model=model,
                  overwrite=True)  # a rerun of the demo starts its training over
    if max_steps is not None:
        values["max_steps"] = max_steps
    cfg = build(TextualInversionConfig, values, str(recipe))
    summary = train(TextualInversionObjective(cfg), cfg, progress=progress)

    cases = [dict(size=s, color=TI_COLOR, shape=TI_SHAPE, background=b)
             for s in shapes.SIZES for b in shapes.BACKGROUNDS if b != TI_COLOR for _ in range(per_case)]
    seeds = [10_000 + i for i in range(len(cases))]
    words = [shapes.caption(**c) for c in cases]
    concept = [f"a {c['size']} {token} on a {c['background']} background" for c in cases]
    base = Pipeline.from_pretrained(base_model_path(model), dtype="fp32")  # measured: fp32 on every machine
    base_rows, base_images = judge_prompts(base, words, cases, seeds)
    base.load_embedding(output_dir / "embedding" / "learned_embeds.safetensors")
    ti_rows, ti_images = judge_prompts(base, concept, cases, seeds)
    trained_bgs = sorted({bg for _, bg in TI_TRAIN})
    report = {
        "concept": f"{TI_COLOR} {TI_SHAPE}", "token": token, "training_images": len(TI_TRAIN),
        "training_backgrounds": trained_bgs, "steps": cfg.max_steps,
        "train_seconds": summary["seconds"], "steps_per_s": summary["steps_per_s"],
        "sampling": dict(zip(("sampler", "steps", "guidance"), base.sampling_settings())), "images": len(cases),
        "words": _rates(base_rows), "embedding": _rates(ti_rows),
        "words_other_backgrounds": _rates([r for r in base_rows if r["background"] not in trained_bgs]),
        "embedding_other_backgrounds": _rates([r for r in ti_rows if r["background"] not in trained_bgs]),
        "embedding_vs_words": paired(ti_rows, base_rows),
        "rows": {"words": base_rows, "embedding": ti_rows},
    }
    from pipelines.outputs import write_report

    write_report(output_dir, report)
    make_grid(base_images, cols=16).save(output_dir / "words.png")
    make_grid(ti_images, cols=16).save(output_dir / "embedding.png")
    return report


def dreambooth_cases(per_case: int, prior_per_case: int):
    """(subject cases and prompts, prior cases and prompts): ``per_case`` images of ``a sks circle
    on a {background} background`` per background; ``prior_per_case`` of ``a {color} circle on a
    {background} background`` per seen circle colour and background."""
    subject = [dict(color=DB_COLOR, shape=DB_SHAPE, background=b) for b in shapes.BACKGROUNDS for _ in range(per_case)]
    prior = [dict(color=c, shape="circle", background=b) for c in DB_PRIOR_COLORS for b in shapes.BACKGROUNDS
             if b != c for _ in range(prior_per_case)]
    return ((subject, [f"a sks circle on a {c['background']} background" for c in subject]),
            (prior, [f"a {c['color']} circle on a {c['background']} background" for c in prior]))


def _measure_dreambooth(model_dir: Path, per_case: int, prior_per_case: int) -> tuple[dict, list]:
    from pipelines.pipeline import Pipeline

    (sub, sub_prompts), (pri, pri_prompts) = dreambooth_cases(per_case, prior_per_case)
    pipe = Pipeline.from_pretrained(model_dir, dtype="fp32")
    sub_rows, sub_images = judge_prompts(pipe, sub_prompts, sub, [20_000 + i for i in range(len(sub))])
    pri_rows, pri_images = judge_prompts(pipe, pri_prompts, pri, [30_000 + i for i in range(len(pri))])
    out = {"subject": _rates(sub_rows), "prior": _rates(pri_rows),
           "prior_reads_teal": float(np.mean([r["read"]["color"] == DB_COLOR for r in pri_rows])),
           "prior_reads_ring": float(np.mean([r["read"]["shape"] == DB_SHAPE for r in pri_rows])),
           "rows": {"subject": sub_rows, "prior": pri_rows}}
    return out, sub_images[::per_case] + pri_images[::max(1, 4 * prior_per_case)]


def dreambooth_demo(output_dir: Path, *, model: str | None = None, per_case: int = 24, prior_per_case: int = 4,
                    seed: int = 0, max_steps: int | None = None,
                    overrides: dict | None = None, progress: bool = True) -> dict:
    from finetune.config import build, read_yaml
    from finetune.data import base_model_path, load_base_model
    from finetune.dreambooth import DreamBoothConfig, DreamBoothObjective, generate_class_images
    from finetune.loop import train
    from ldm.images import make_grid

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = base_model_path(model)
    recipe = model_recipe(model, "dreambooth") or model_recipe(None, "dreambooth")  # the model's own
    values = {**read_yaml(recipe), **(overrides or {})}
    if max_steps is not None:
        values["max_steps"] = max_steps
    instance = output_dir / "instance"
    render_instances(instance, DB_COLOR, DB_SHAPE, DB_TRAIN, caption=None, seed=seed, masks=True)
    class_dir = output_dir / "class_images"  # made once; reruns reuse them
    probe = build(DreamBoothConfig, {**values, "model": str(base), "instance_data_dir": str(instance)},
                  str(recipe))
    generate_class_images(load_base_model(str(base), torch_device()), probe.class_prompt, class_dir,
                          probe.num_class_images, probe.sample_batch_size)

    # 1. DreamBooth from the base model as it is (its VAE draws teal rings), with and without prior
    # preservation
    runs = {}
    for arm, prior in (("with_prior", True), ("without_prior", False)):
        v = {**values, "model": str(base), "instance_data_dir": str(instance), "class_data_dir": str(class_dir),
             "with_prior_preservation": prior, "output_dir": str(output_dir / arm),
             "seed": values.get("seed", seed),  # --set seed=N: another training seed, the same images
             "overwrite": True, "report_to": "none"}
        cfg = build(DreamBoothConfig, v, str(recipe))
        runs[arm] = {"summary": train(DreamBoothObjective(cfg), cfg, progress=progress), "cfg": cfg}

    # 2. the judge, same seeds everywhere
    measured, grids = {}, []
    for name, d in (("base", base), ("with_prior", output_dir / "with_prior"),
                    ("without_prior", output_dir / "without_prior")):
        measured[name], images = _measure_dreambooth(d, per_case, prior_per_case)
        grids.append(make_grid(images, cols=len(images)))
    cfg = runs["with_prior"]["cfg"]
    report = {
        "subject": f"{DB_COLOR} {DB_SHAPE}", "instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt,
        "instance_images": len(DB_TRAIN), "class_images": cfg.num_class_images, "steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate, "train_text_encoder": cfg.train_text_encoder,
        "train_seconds": {k: r["summary"]["seconds"] for k, r in runs.items()},
        "steps_per_s": {k: r["summary"]["steps_per_s"] for k, r in runs.items()},
        "subject_images": len(measured["base"]["rows"]["subject"]),
        "prior_images": len(measured["base"]["rows"]["prior"]), **measured,
    }
    from pipelines.outputs import write_report

    write_report(output_dir, report)
    make_grid(grids, cols=1).save(output_dir / "samples.png")
    return report


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
