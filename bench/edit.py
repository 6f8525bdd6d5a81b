"""Editing on the shapes world, judged by the detector: prompt-to-prompt, inversion-based editing of
real images, and CLIP guidance, side by side with the plain ways to get an edit.

    python bench/edit.py [--n 64] [--out outputs/bench-edit]

An edit succeeds when the detector reads the asked attribute changed to the target's value, every other
attribute as in the source, and the shape's box overlaps the source's box with IoU >= 0.8 (the source's
reading is the truth: the generated source image's, or the rendered scene's for real sources).

Sources: generated (the source prompt at seed i) and real (rendered scenes, not generated), n per edit
kind (shape swap, colour swap, background swap); real scenes are the same n for every kind, so their
inversion is made once (and cached in --out). Methods:
  (a) regenerate: the target prompt at the source's seed
  (b) ddim-inversion: the source image inverted at guidance 1, the target sampled from it at the model's guidance
  (c) img2img-0.6: SDEdit of the source image to the target prompt at strength 0.6
  (d) p2p: prompt-to-prompt from the same noise (generated sources only)
  (e) null-text + p2p, (f) npi + p2p, (g) direct + p2p (Ju et al. 2023): the source image inverted, then edited
Ceiling: what a perfect editor would score through this model's VAE: the target scene drawn with the
source scene's geometry (only the asked attribute changed), round-tripped through the VAE and judged
as the edits are, against the rendered source (as for real sources) and against the source's own round
trip (as a generated source is a decoded image).
Reconstruction (no edit): PSNR to the image of the VAE round trip, null-text inversion at the model's
guidance, and plain DDIM inversion at that guidance. CLIP guidance: ldm eval's held-out and seen pairs
with and without it at equal steps, and the cost per image.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from ldm.images import to_tensor
from ldm.locate import EMBEDDED_MODEL
from pipelines.edit import Edit, edit
from pipelines.pipeline import Pipeline
from pipelines.request import Request
from shapes import world
from shapes.evaluate import evaluate

KINDS = ("shape", "color", "background")
METHODS = ("regenerate", "ddim-inversion", "img2img-0.6", "p2p", "null-text+p2p", "npi+p2p", "direct+p2p")
ATTRS = ("size", "color", "shape", "background")


def target_of(scene: tuple, kind: str, rng: np.random.Generator) -> tuple:
    """A seen (size, colour, shape, background) that differs from ``scene`` in ``kind`` only."""
    size, color, shape, bg = scene
    seen = set(world.combinations("seen"))
    if kind == "shape":
        options = [(size, color, s, bg) for s in world.SHAPES if s != shape]
    elif kind == "color":
        options = [(size, c, shape, bg) for c in world.SHAPE_COLORS if c != color]
    else:
        options = [(size, color, shape, b) for b in world.BACKGROUNDS if b != bg]
    options = [o for o in options if o in seen]
    return options[int(rng.integers(len(options)))]


def cases(n: int, seed: int = 0) -> dict:
    """Per kind, n (source, target) attribute tuples, both seen combinations; the sources are the same
    for every kind, so that the real scenes are inverted once."""
    rng = np.random.default_rng(seed)
    seen = world.combinations("seen")
    sources = [seen[int(i)] for i in rng.choice(len(seen), n, replace=False)]
    return {k: [(s, target_of(s, k, rng)) for s in sources] for k in KINDS}


def success(src_read, out_read, target: tuple, kind: str) -> bool:
    return all(parts(src_read, out_read, target, kind))


def parts(src_read, out_read, target: tuple, kind: str) -> tuple[bool, bool, bool]:
    """The three parts of ``success``: the asked attribute read as the target's, every other attribute
    as the source's, the box kept (IoU >= 0.8)."""
    asked = getattr(out_read, kind) == target[ATTRS.index(kind)]
    others = all(getattr(out_read, a) == getattr(src_read, a) for a in ATTRS if a != kind)
    return asked, others, world.box_iou(src_read.box, out_read.box) >= 0.8


def blend_words(src: tuple, tgt: tuple, kind: str) -> list[str]:
    """The words whose region the edit may change: the shape's words for shape and colour, the
    background's for a background swap."""
    return [src[2], tgt[2]] if kind != "background" else ["background"]


def perfect_edit_ceiling(vae, scenes: list, rendered: list, all_cases: dict) -> dict:
    """Per kind, the success rate of the exact target scene (the source scene with the asked attribute
    changed, same box) after a VAE round trip: against the rendered source (``rendered``, "real") and
    against the source's round trip ("generated-like"); for the latter also the box criterion alone."""
    import dataclasses

    from ldm import autoencoder
    from ldm.images import to_pil

    def roundtrip(scs):
        x = world.render_tensor(scs)
        return to_pil(autoencoder.decode(vae, autoencoder.encode(vae, x)))

    src_reads = [world.detect(im) for im in rendered]
    src_rt_reads = [world.detect(im) for im in roundtrip(scenes)]
    out = {}
    for kind in KINDS:
        targets = [dataclasses.replace(sc, **dict(zip(ATTRS, t))) for sc, (_, t) in zip(scenes, all_cases[kind])]
        reads = [world.detect(im) for im in roundtrip(targets)]
        tgts = [t for _, t in all_cases[kind]]
        out[kind] = {
            "real": float(np.mean([success(a, b, t, kind) for a, b, t in zip(src_reads, reads, tgts)])),
            "generated-like": float(np.mean([success(a, b, t, kind) for a, b, t in zip(src_rt_reads, reads, tgts)])),
            "generated-like box IoU >= 0.8": float(np.mean([world.box_iou(a.box, b.box) >= 0.8
                                                            for a, b in zip(src_rt_reads, reads)])),
        }
    for key in ("real", "generated-like"):
        out.setdefault("mean", {})[key] = float(np.mean([out[k][key] for k in KINDS]))
    return out


def run_methods(pipe, sources, pairs, kind, real: bool, g: float, args, batch: int = 16) -> dict:
    """Every method's edited images for these sources (PIL) and pairs ((src, tgt) tuples)."""
    out = {m: [] for m in METHODS if m in args.methods and not (real and m == "p2p")}
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        imgs = sources[start:start + batch]
        seeds = [start + i for i in range(len(chunk))]
        src_p = [world.caption(*s) for s, _ in chunk]
        tgt_p = [world.caption(*t) for _, t in chunk]
        if "regenerate" in out:
            out["regenerate"] += pipe.text_to_image(tgt_p, seeds=seeds, guidance_scale=g).images
        if "ddim-inversion" in out:
            ddim = edit(pipe, Edit(src_p, tgt_p, images=imgs, inversion="ddim", cross_replace=0.0, self_replace=0.0,
                                   cache_dir=args.out / "inversions"), Request(seeds=seeds, guidance=g))
            out["ddim-inversion"] += ddim.target.images
        if "img2img-0.6" in out:
            out["img2img-0.6"] += [pipe.image_to_image(p, im, strength=0.6, seed=s, guidance_scale=g).images[0]
                                   for p, im, s in zip(tgt_p, imgs, seeds)]
        ctl = dict(cross_replace=args.cross_replace, self_replace=args.self_replace, inner_lr=args.inner_lr)
        for method, inv in (("p2p", None), ("null-text+p2p", "null-text"), ("npi+p2p", "npi"),
                            ("direct+p2p", "direct")):
            if method not in out:
                continue
            words = [blend_words(s, t, kind) for s, t in chunk] if args.blend else []
            ed = edit(pipe, Edit(src_p, tgt_p, images=None if inv is None else imgs, inversion=inv or "null-text",
                                 blend_words=words, cache_dir=args.out / "inversions", **ctl),
                      Request(seeds=seeds, guidance=g))
            out[method] += ed.target.images
        print(f"  {kind} {'real' if real else 'generated'} {start + len(chunk)}/{len(pairs)}", flush=True)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="sources per edit kind (default 64)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench-edit"))
    ap.add_argument("--cross-replace", type=float, default=0.8)
    ap.add_argument("--self-replace", type=float, default=0.4)
    ap.add_argument("--inner-lr", type=float, default=1e-2, help="null-text inversion's learning rate (default 0.01)")
    ap.add_argument("--blend", action="store_true", help="local blending on the edited words")
    ap.add_argument("--guidance", type=float, default=None, help="guidance of every method (default: the model's)")
    ap.add_argument("--clip-scales", type=float, nargs="+", default=[2.0, 5.0, 10.0],
                    help="CLIP guidance scales measured beside scale 0 (default 2 5 10)")
    ap.add_argument("--clip-steps", type=int, nargs="+", default=[None],
                    help="sampling steps of the CLIP-guidance rows (default: the model's); fewer steps leave the "
                         "unguided model room to miss")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="the edit methods to run (default: all)")
    ap.add_argument("--model", default=str(EMBEDDED_MODEL), help="the model (default: the embedded one)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ceiling", "generated", "real", "reconstruction", "clip"])
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained(args.model)
    g = args.guidance or pipe.model.sampling_defaults["guidance_scale"]
    report = {"n": args.n, "controls": dict(cross_replace=args.cross_replace, self_replace=args.self_replace,
                                            blend=args.blend, inner_lr=args.inner_lr), "guidance": g}
    all_cases = cases(args.n)
    rng = np.random.default_rng(1)
    scenes = [world.place(rng, *s) for s, _ in all_cases["shape"]]
    real_images = [world.render(sc) for sc in scenes]
    if "ceiling" not in args.skip:
        report["perfect_edit_ceiling"] = perfect_edit_ceiling(pipe.model.vae, scenes, real_images, all_cases)
        print("a perfect edit through the VAE:", json.dumps(report["perfect_edit_ceiling"]), flush=True)
    table = {}
    t0 = time.perf_counter()
    for origin in ("generated", "real"):
        if origin in args.skip:
            continue
        for kind in KINDS:
            pairs = all_cases[kind]
            if origin == "generated":
                src_images = []
                for start in range(0, len(pairs), 16):
                    chunk = pairs[start:start + 16]
                    src_images += pipe.text_to_image([world.caption(*s) for s, _ in chunk], guidance_scale=g,
                                                     seeds=[start + i for i in range(len(chunk))]).images
            else:
                src_images = real_images
            reads = [world.detect(im) for im in src_images]
            outs = run_methods(pipe, src_images, pairs, kind, origin == "real", g, args)
            for method, images in outs.items():
                each = [parts(r, world.detect(im), t, kind) for r, im, (_, t) in zip(reads, images, pairs)]
                table.setdefault(method, {})[f"{origin}/{kind}"] = float(np.mean([all(p) for p in each]))
                split = np.mean(each, axis=0)
                report.setdefault("parts", {}).setdefault(method, {})[f"{origin}/{kind}"] = dict(
                    zip(("asked", "others", "box"), map(float, split)))
            print(f"{origin} {kind}: " + ", ".join(f"{m} {table[m][f'{origin}/{kind}']:.2f}" for m in outs), flush=True)
            print("  (asked attribute / other attributes / box kept) " + ", ".join(
                f"{m} " + " / ".join(f"{v:.2f}" for v in report["parts"][m][f"{origin}/{kind}"].values())
                for m in outs), flush=True)
        for method in table:
            vals = [table[method][f"{origin}/{k}"] for k in KINDS if f"{origin}/{k}" in table[method]]
            if vals:
                table[method][f"{origin}/mean"] = float(np.mean(vals))
    report["success"] = table
    report["edit_seconds"] = time.perf_counter() - t0

    if "reconstruction" not in args.skip:
        x = torch.cat([to_tensor(im) for im in real_images])  # [-1, 1]
        from ldm import autoencoder
        rt = autoencoder.decode(pipe.model.vae, autoencoder.encode(pipe.model.vae, x))
        src_p = [world.caption(*s) for s, _ in all_cases["shape"]]
        rec = {"vae_roundtrip": psnr(rt, (x + 1) / 2)}
        for inv in ("null-text", "npi", "direct", "ddim"):
            pix = []
            for start in range(0, len(src_p), 16):
                e = edit(pipe, Edit(src_p[start:start + 16], images=real_images[start:start + 16], inversion=inv,
                                    inner_lr=args.inner_lr,
                                    cache_dir=args.out / "inversions"), Request(guidance=g))
                pix.append(e.source.pixels)
            rec[f"{inv}_inversion_g{g:g}"] = psnr(torch.cat(pix), (x + 1) / 2)
        report["reconstruction_psnr_db"] = rec
        print("reconstruction PSNR (dB):", json.dumps(rec), flush=True)

    if "clip" not in args.skip:
        res = {}
        for steps in args.clip_steps:
            for scale in [0.0] + args.clip_scales:
                r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                t = time.perf_counter()
                rep = evaluate(pipe, seen=48, heldout=48, seed=0, batch_size=16, progress=False, steps=steps,
                               clip_guidance_scale=scale)
                dt = time.perf_counter() - t
                key = f"scale {scale:g}" + (f", {steps} steps" if steps else "")
                res[key] = {"steps": rep["steps"], "seen_all_correct": rep["seen"]["all_correct"],
                            "heldout_all_correct": rep["heldout"]["all_correct"], "seconds_per_image": dt / 96,
                            "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024}
                print("CLIP guidance", key, json.dumps(res[key]), flush=True)
        report["clip_guidance"] = res
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
