"""The training commands of ``ldm`` (plugged in through the ``ldm.commands`` entry point).

Every training command shares --config, --model, --output-dir, --max-steps, --seed, --resume,
--overwrite, --checkpoint-every, --mixed-precision and --set KEY=VALUE (any recipe key).
"""

from __future__ import annotations

import argparse
import sys

from .recipes import DISTILL, METHODS, Method, recipe_path


def _run_method(command: str, args: argparse.Namespace) -> int:
    from .config import ConfigError, from_args
    from .loop import TrainingError, train

    method = METHODS[command]
    extra = {k: getattr(args, k, None) for k in method.flags}
    try:
        if args.config is None:
            args.config, why = default_recipe(command, method, args)
            print(f"{command}: recipe {args.config} ({why}; --config to use another)")
        cfg = from_args(method.config_class(), args, extra)
        summary = train(method.objective_class()(cfg), cfg, progress=not args.quiet)
    except (ConfigError, TrainingError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    print(f"{command}: {summary['steps']} steps in {summary['seconds']:.0f} s "
          f"({summary['steps_per_s']:.2f} steps/s), result in {cfg.output_dir}")
    return 0


def default_recipe(command: str, method: Method, args: argparse.Namespace) -> tuple[str, str]:
    """The recipe a run without --config uses, and why: the one the base model carries for this command
    (the embedded model's are tuned for it: ldm/assets/shapes-model/recipes/), else the command's
    general one, tuned for Stable Diffusion at 512 px."""
    from ldm.models import model_recipe

    model = getattr(args, "model", None)
    for item in getattr(args, "set", None) or []:  # --set model=DIR names the base model too
        key, _, value = item.partition("=")
        if key.strip().replace("-", "_") == "model":
            model = value
    own = model_recipe(model, command)
    if own is not None:
        return str(own), f"the one {'the embedded model' if model is None else 'the model'} carries"
    general = recipe_path(method.recipe)
    for_sd = model_recipe(None, command) is not None  # the embedded model carries its own: this one is for SD
    return str(general), "the command's default" + (", tuned for Stable Diffusion models" if for_sd else "")


def register(sub, command: str | None = None) -> None:
    """Add the training commands to ``ldm``'s subparsers: every command by name, and the flags of
    ``command`` alone (the one being run or asked for help), since a command's flags are typed from
    its config class, whose module imports PyTorch: ``ldm --help`` lists the commands without it."""
    from .config import add_common_flags

    for name, method in [*METHODS.items(), ("distill", DISTILL)]:
        p = sub.add_parser(name, help=method.help)
        if name == command:
            add_common_flags(p)
            add_recipe_flags(p, method)
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=_distill if name == "distill" else lambda a, c=name: _run_method(c, a))


def add_recipe_flags(p: argparse.ArgumentParser, method: Method) -> None:
    """A flag per recipe key the method names (data_dir -> --data-dir), typed from its config
    dataclass; each defaults to None so that the recipe's value stands unless the flag is given."""
    import dataclasses
    import typing

    if not method.flags:  # nothing to type: the config's module (and torch) need not load
        return
    cls = method.config_class()
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    for key in method.flags:
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
    try:
        if args.config is None:
            args.config = str(recipe_path(DISTILL.recipe))
        cfg = from_args(DistillConfig, args, {k: getattr(args, k, None) for k in DISTILL.flags})
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
