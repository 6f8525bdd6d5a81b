"""The training commands of ``ldm`` (plugged in through the ``ldm.commands`` entry point).

Every training command shares --config, --model, --output-dir, --max-steps, --seed, --resume,
--overwrite, --checkpoint-every, --mixed-precision and --set KEY=VALUE (any recipe key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# command -> (help, module, config class, objective class, default recipe)
METHODS = {
    "train-vae": ("train the autoencoder (AutoencoderKL, SD layout)", "finetune.vae", "VAEConfig", "VAEObjective",
                  "shapes-vae.yaml"),
    "train-clip": ("train the CLIP (open_clip, contrastive) and save its text tower", "finetune.clip", "CLIPConfig",
                   "CLIPObjective", "shapes-clip.yaml"),
    "train-unet": ("train the text-to-image U-Net on cached latents", "finetune.unet", "UNetConfig",
                   "UNetObjective", "shapes-unet.yaml"),
    "textual-inversion": ("learn a new token's embedding from a few images (Gal et al. 2022)",
                          "finetune.textual_inversion", "TextualInversionConfig", "TextualInversionObjective",
                          "textual-inversion.yaml"),
    "dreambooth": ("fine-tune on a few images of one subject, with prior preservation (Ruiz et al. 2022)",
                   "finetune.dreambooth", "DreamBoothConfig", "DreamBoothObjective", "dreambooth.yaml"),
}

# recipe keys that a method also takes as its own flags (--data-dir for data_dir, ...)
LOOP_FLAGS = ("batch_size", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
              "gradient_accumulation_steps", "validation_every", "optimizer")
METHOD_FLAGS = {
    "textual-inversion": ("data_dir", "placeholder_token", "initializer_token", "num_vectors", "learnable_property",
                          "repeats", "resolution", "center_crop", "random_flip", "gradient_checkpointing",
                          "validation_prompts") + LOOP_FLAGS,
    "dreambooth": ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir", "with_prior_preservation",
                   "prior_loss_weight", "num_class_images", "sample_batch_size", "train_text_encoder", "lora_rank",
                   "lora_alpha", "resolution", "center_crop", "random_flip", "gradient_checkpointing",
                   "validation_prompts") + LOOP_FLAGS,
}


DISTILL = ("distill", "finetune.distill", "DistillConfig", None, "distill-shapes.yaml")
DISTILL_FLAGS = ("teacher", "from_steps", "to_steps", "guidance_distillation", "guidance_scale", "guidance_range",
                 "guidance_steps", "stage_steps", "prediction_type", "data_dir", "num_images") + LOOP_FLAGS


def default_recipe(name: str) -> str | None:
    path = CONFIGS / name
    return str(path) if path.is_file() else None


def _run_method(command: str, args: argparse.Namespace) -> int:
    import importlib

    from .config import ConfigError, from_args
    from .loop import TrainingError, train

    _, module, cfg_name, obj_name, recipe = METHODS[command]
    mod = importlib.import_module(module)
    if args.config is None:
        args.config = default_recipe(recipe)
    extra = {k: getattr(args, k, None) for k in METHOD_FLAGS.get(command, ())}
    try:
        cfg = from_args(getattr(mod, cfg_name), args, extra)
        summary = train(getattr(mod, obj_name)(cfg), cfg, progress=not args.quiet)
    except (ConfigError, TrainingError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    print(f"{command}: {summary['steps']} steps in {summary['seconds']:.0f} s "
          f"({summary['steps_per_s']:.2f} steps/s), result in {cfg.output_dir}")
    return 0


def register(sub) -> None:
    """Add the training commands to ``ldm``'s subparsers."""
    from .config import add_common_flags

    for command, (help_, *_rest) in METHODS.items():
        p = sub.add_parser(command, help=help_)
        add_common_flags(p)
        if command in METHOD_FLAGS:
            add_recipe_flags(p, METHODS[command], METHOD_FLAGS[command])
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=lambda a, c=command: _run_method(c, a))
    d = sub.add_parser("distill", help="guidance and progressive distillation into a few-step student "
                                       "(Meng et al. 2023; Salimans & Ho 2022)")
    add_common_flags(d)
    add_recipe_flags(d, DISTILL, DISTILL_FLAGS)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_distill)
    from .demos import register as register_demos

    register_demos(sub)
    b = sub.add_parser("build-shapes-model", help="train the embedded shapes model from scratch (VAE, CLIP, U-Net)")
    b.add_argument("--output-dir", type=Path, default=Path("runs/shapes"), help="work directory (default runs/shapes)")
    b.add_argument("--install", action="store_true",
                   help="copy the result (fp16) into the package as the embedded default model")
    b.add_argument("--resume", action="store_true", help="continue an interrupted build")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)


def add_recipe_flags(p: argparse.ArgumentParser, method: tuple, keys) -> None:
    """A flag per recipe key (data_dir -> --data-dir), typed from the method's config dataclass; each
    defaults to None so that the recipe's value stands unless the flag is given."""
    import dataclasses
    import importlib
    import typing

    cls = getattr(importlib.import_module(method[1]), method[2])
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    for key in keys:
        flag = "--" + key.replace("_", "-")
        tp = hints[key]
        optional = type(None) in typing.get_args(tp)  # X | None: the flag takes an X
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        help_ = f"recipe key {key} (default in the recipe, else {defaults[key]!r})"
        if base is bool:
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(base) is list:
            p.add_argument(flag, dest=key, nargs="+", default=None, help=help_)
        else:
            p.add_argument(flag, dest=key, type=base, default=None, help=help_)


def _distill(args) -> int:
    from ldm.models import ModelError

    from .config import ConfigError, from_args
    from .distill import DistillConfig, distill
    from .loop import TrainingError

    if args.model and not args.teacher:  # --model names the teacher here too
        args.teacher = args.model
    if args.config is None:
        args.config = default_recipe(DISTILL[4])
    try:
        cfg = from_args(DistillConfig, args, {k: getattr(args, k, None) for k in DISTILL_FLAGS})
        result = distill(cfg, progress=not args.quiet)
    except (ConfigError, TrainingError, ModelError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue the chain from the last checkpoint", file=sys.stderr)
        return 130
    for st in result["stages"]:
        how = "kept" if st.get("kept") else f"{st['steps']} steps in {st['wall_seconds']:.0f} s"
        print(f"{st['stage']}: {how}")
    print(f"chain: {result['wall_seconds']:.0f} s; final student {result['final']}")
    return 0


def _build(args) -> int:
    from .shapes_model import build

    try:
        build(args.output_dir, install=args.install, resume=args.resume, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
