"""The shapes world's commands of ``ldm`` (plugged in through the ``ldm.commands`` entry point):
``ldm eval``, ``ldm demo textual-inversion|dreambooth`` and ``ldm build-shapes-model``."""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.locate import ModelError
from shapes import world as shapes_world
from pipelines.cli import device_for, model_path, sampling_args
from pipelines.outputs import check_output_dir


def _judging_args(p) -> None:
    """What ldm eval and ldm eval-controlnet both take: the sampling settings, seed, batch, device, dtype."""
    sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "auto", "bf16", "fp16"],
                   help="the model's dtype (default fp32 on every machine, so that the figures compare; auto as "
                        "ldm generate chooses it)")
    p.add_argument("--quiet", action="store_true")


def register(sub, command: str | None = None) -> None:
    """Add the shapes-world commands to ``ldm``'s subparsers."""
    e = sub.add_parser("eval", help="judge a model on the shapes world (JSON report and grid)")
    e.add_argument("--model", default=None, help="model directory (default: the embedded shapes model)")
    e.add_argument("--output-dir", type=Path, default=Path("eval"), help="where report.json and grid.png go")
    e.add_argument("--seen", type=int, default=64, help="seen-pair prompts (default 64)")
    e.add_argument("--heldout", type=int, default=48, help="held-out-pair prompts (default 48: all of them)")
    _judging_args(e)
    e.set_defaults(func=_eval)
    c = sub.add_parser("eval-controlnet", help="judge a ControlNet of the shapes model: placement, attributes, "
                                               "control against prompt (JSON report and grids)")
    c.add_argument("--controlnet", default="shapes", help="ControlNet directory or file (default: the embedded one)")
    c.add_argument("--model", default=None, help="base model directory (default: the embedded shapes model)")
    c.add_argument("--output-dir", type=Path, default=Path("eval-controlnet"), help="where report.json and grids go")
    c.add_argument("--n", type=int, default=128, help="scenes judged per condition (default 128)")
    c.add_argument("--conditions", nargs="+", default=list(shapes_world.CONDITIONS),
                   choices=shapes_world.CONDITIONS, help="conditions to judge (default: all)")
    c.add_argument("--curve", type=int, default=32, help="star-as-circle cases per point of the control-against-"
                   "prompt curve (default 32; 0: skip it)")
    c.add_argument("--no-baseline", action="store_true", help="skip the uncontrolled arm (chance placement)")
    _judging_args(c)
    c.set_defaults(func=_eval_controlnet)
    _register_demos(sub)
    b = sub.add_parser("build-shapes-model", help="train the embedded shapes model from scratch (VAE, CLIP, U-Net)")
    b.add_argument("--output-dir", type=Path, default=Path("runs/shapes"), help="work directory (default runs/shapes)")
    b.add_argument("--install", action="store_true",
                   help="copy the result into the package as the embedded default model")
    b.add_argument("--resume", action="store_true", help="continue an interrupted build")
    b.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one stage's recipe key (repeatable), e.g. --set vae-decoder-2.latent_noise=3 "
                        "or --set model.max_steps=3000; stages: vae, vae-refine, vae-stars, vae-decoder, "
                        "vae-stars-2, vae-decoder-2, vae-noisy-1, vae-noisy-2, vae-noisy-3, clip, model, controlnet")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)


def _eval(args) -> int:
    from pipelines.pipeline import Pipeline

    from .evaluate import evaluate

    try:
        for flag, value, least in (("--seen", args.seen, 0), ("--heldout", args.heldout, 0),
                                   ("--batch-size", args.batch_size, 1)):
            if value < least:
                raise ValueError(f"{flag} must be {least} or more, got {value}")
        if args.seen == 0 and args.heldout == 0:
            raise ValueError("--seen 0 and --heldout 0 leave nothing to judge; ask for some prompts of either")
        check_output_dir(args.output_dir)
        pipe = Pipeline.from_pretrained(model_path(args), device=device_for(args), dtype=args.dtype)
        report = evaluate(pipe, seen=args.seen, heldout=args.heldout, seed=args.seed, batch_size=args.batch_size,
                          steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, schedule=args.schedule,
                          output_dir=args.output_dir, progress=not args.quiet)
    except (ValueError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split in ("seen", "heldout"):
        r = report[split]
        if not r["n"]:
            continue  # --seen 0 or --heldout 0: nothing asked, nothing to print
        attrs = " ".join(f"{a} {r[a]:.3f}" for a in ("size", "color", "shape", "background") if a in r)
        clip = f" clip_score {r['clip_score']:.1f}" if "clip_score" in r else ""
        print(f"{split}: all-correct {r.get('all_correct', 0):.3f} of {r['n']} ({attrs}){clip}")
    print(f"report: {args.output_dir / 'report.json'}, grid: {args.output_dir / 'grid.png'}")
    return 0


def _eval_controlnet(args) -> int:
    from pipelines.pipeline import Pipeline

    from . import control_eval

    try:
        if args.n < 1 or args.curve < 0 or args.batch_size < 1:
            raise ValueError("--n and --batch-size must be 1 or more, --curve 0 or more")
        check_output_dir(args.output_dir)
        pipe = Pipeline.from_pretrained(model_path(args), device=device_for(args), dtype=args.dtype)
        net = pipe.load_controlnet(args.controlnet)
        sampling = dict(zip(("sampler", "steps", "guidance_scale"),
                            pipe.sampling_settings(args.sampler, args.steps, args.guidance)), schedule=args.schedule)
        report = {"controlnet": str(args.controlnet), **sampling, "placement": []}
        for kind in args.conditions:
            report["placement"].append(control_eval.placement(
                pipe, net, n=args.n, seed=args.seed, kind=kind, batch_size=args.batch_size,
                with_baseline=not args.no_baseline, progress=not args.quiet, **sampling))
        if args.curve:
            report["control_vs_prompt"] = control_eval.control_vs_prompt(
                pipe, net, n=args.curve, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet, **sampling)
        control_eval.write(report, args.output_dir)
    except (ValueError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in report["placement"]:
        for arm in ("controlled", "uncontrolled"):
            if arm in p:
                r = p[arm]
                print(f"{p['condition']:>10} {arm:>12}: IoU >= {control_eval.IOU_GOAL} in {r['placed']:.3f} "
                      f"(mean IoU {r['mean_iou']:.3f}); colour and background {r['color_and_background']:.3f}, "
                      f"shape {r['shape']:.3f} of {p['n']}")
    for row in report.get("control_vs_prompt", []):
        print(f"star silhouette, prompt 'circle', {row['mode']:>8} weight {row['weight']:.1f}: "
              f"star {row['star']:.3f} circle {row['circle']:.3f}")
    print(f"report: {args.output_dir / 'report.json'}")
    return 0


def _build(args) -> int:
    from .build import build, parse_stage_overrides

    try:
        check_output_dir(args.output_dir)
        build(args.output_dir, install=args.install, resume=args.resume, progress=not args.quiet,
              overrides=parse_stage_overrides(args.set))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_db(report: dict, output_dir: Path):
    print(f"DreamBooth of a {report['subject']} from {report['instance_images']} images "
          f"('{report['instance_prompt']}', class '{report['class_prompt']}', {report['class_images']} class images): "
          f"{report['steps']} steps each, with prior {report['train_seconds']['with_prior']:.0f} s, "
          f"without {report['train_seconds']['without_prior']:.0f} s")
    print(f"{'model':>28} {'subject fidelity':>17} {'prior preserved':>16} {'prior reads teal':>17} "
          f"{'prior reads ring':>17}")
    for name, label in (("base", "base"),
                        ("with_prior", "DreamBooth with prior"), ("without_prior", "DreamBooth without prior")):
        m = report[name]
        print(f"{label:>28} {m['subject']['all_correct']:>17.3f} {m['prior']['all_correct']:>16.3f} "
              f"{m['prior_reads_teal']:>17.3f} {m['prior_reads_ring']:>17.3f}")
    print(f"subject: {report['subject_images']} images of 'a sks circle on a {{background}} background' judged a "
          f"teal ring on that background; prior: {report['prior_images']} images of 'a {{color}} circle on a "
          f"{{background}} background' judged exactly that")
    print(f"report: {output_dir / 'report.json'}; samples.png (rows: base, with prior, without)")


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
    pv = report["embedding_vs_words"]
    print(f"same seeds: {pv['first_only']} images right only with {report['token']}, {pv['second_only']} only with the "
          f"words (both {pv['both']}, neither {pv['neither']}); sign test p = {pv['sign_test_p']:.3g}")
    print(f"report: {output_dir / 'report.json'}; grids: words.png, embedding.png")


def _register_demos(sub) -> None:
    d = sub.add_parser("demo", help="personalisation demonstrations on the embedded shapes model")
    dsub = d.add_subparsers(dest="demo", required=True)
    t = dsub.add_parser("textual-inversion", help="learn <concept> = orange star (a held-out pair) from 5 images")
    t.add_argument("--output-dir", type=Path, default=Path("runs/demo-textual-inversion"))
    t.add_argument("--model", default=None, help="base model (default: the embedded shapes model)")
    t.add_argument("--per-case", type=int, default=16, help="images per (size, background) (default 16)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of ldm/assets/shapes-model/recipes/textual-inversion.yaml (repeatable)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_run_ti)
    b = dsub.add_parser("dreambooth", help="DreamBooth a teal ring (never seen) as 'a sks circle', "
                                           "with and without prior preservation")
    b.add_argument("--output-dir", type=Path, default=Path("runs/demo-dreambooth"))
    b.add_argument("--model", default=None, help="base model (default: the embedded shapes model)")
    b.add_argument("--per-case", type=int, default=24, help="subject images per background (default 24: 216 in all)")
    b.add_argument("--prior-per-case", type=int, default=4,
                   help="class images judged per (colour, background) (default 4: 160 in all)")
    b.add_argument("--seed", type=int, default=0, help="the instance renders' and the training's seed (default 0)")
    b.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of ldm/assets/shapes-model/recipes/dreambooth.yaml (repeatable); --set seed=N: "
                        "another training seed on the same images")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_run_db)


def _run_demo(args, demo, printer, **kw) -> int:
    from finetune.config import ConfigError
    from finetune.loop import TrainingError
    from ldm.models import ModelError
    from pipelines.outputs import check_output_dir

    try:
        check_output_dir(args.output_dir)
        bad = [item for item in args.set if "=" not in item]
        if bad:
            raise ConfigError(f"--set {bad[0]!r}: expected KEY=VALUE")
        overrides = dict(item.split("=", 1) for item in args.set)
        report = demo(args.output_dir, model=args.model, per_case=args.per_case, seed=args.seed,
                      max_steps=args.max_steps, overrides=overrides, progress=not args.quiet, **kw)
    except (ConfigError, TrainingError, ModelError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    printer(report, args.output_dir)
    return 0


def _run_ti(args) -> int:
    from .demos import textual_inversion_demo

    return _run_demo(args, textual_inversion_demo, _print_ti)


def _run_db(args) -> int:
    from .demos import dreambooth_demo

    return _run_demo(args, dreambooth_demo, _print_db, prior_per_case=args.prior_per_case)
