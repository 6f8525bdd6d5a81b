"""Typed training recipes: dataclasses read from small YAML files and overridable from the command
line. An unknown key is an error that names it."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    """What every training method shares (the loop's settings)."""
    output_dir: str = "runs/out"
    model: str | None = None        # base model directory (None: the embedded model)
    max_steps: int = 1000
    seed: int = 0
    batch_size: int = 16
    learning_rate: float = 1e-4
    scale_lr: bool = False          # use learning_rate x batch_size x accumulation steps x processes
    lr_scheduler: str = "constant"  # constant | linear | cosine (after the warm-up)
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.0       # linear/cosine decay ends at learning_rate * min_lr_ratio
    optimizer: str = "adamw"        # adamw | adamw8bit (bitsandbytes' 8-bit AdamW; CUDA)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0      # 0 turns clipping off
    mixed_precision: str = "no"     # no | fp16 | bf16
    ema_decay: float = 0.0          # 0 turns EMA off; the final weights are the EMA ones when on
    ema_warmup_steps: int = 0       # EMA starts as a copy after this many steps
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 2
    validation_every: int = 0       # 0: validation images only at the end
    log_every: int = 10
    report_to: str = "auto"         # auto (tensorboard when installed) | none | an Accelerate tracker name
    resume: bool = False
    overwrite: bool = False


def _coerce(name: str, tp, value):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
        if origin is typing.Union or type(None) in typing.get_args(tp):
            return None
        raise ConfigError(f"{name}: null is not allowed; give a {getattr(tp, '__name__', tp)}")
    if origin in (typing.Union, getattr(types, "UnionType", None)) and args:
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if "," in value or value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, inner, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    try:
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None


def build(cls, values: dict, source: str = "config"):
    """``cls(**values)`` with types checked; an unknown key is an error naming it and the known ones."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"known keys are: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def trained_part(directory: str | Path, part: str, key: str, command: str, what: str | None = None) -> Path:
    """``directory/part`` of an earlier training stage, or a FileNotFoundError naming the recipe
    ``key`` that points at it and the ``command`` that makes it."""
    path = Path(directory) / part
    if not any(path.glob("*.json")):  # config.json, or tokenizer_config.json for a tokenizer
        raise FileNotFoundError(f"{key}: no {what or part} at {path}; train it first ({command}) "
                                f"or point {key} at a directory holding {part}/")
    return path


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of key: value, got {type(data).__name__}")
    return data


def add_common_flags(p: argparse.ArgumentParser):
    """The flags every training command shares."""
    p.add_argument("--config", help="YAML recipe (flags given here override it)")
    p.add_argument("--model", help="base model directory (default: the embedded shapes model)")
    p.add_argument("--output-dir", help="where the result and its checkpoints go")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the last checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start over in an --output-dir that holds another run's checkpoints")
    p.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key (repeatable), e.g. --set learning_rate=1e-4")


def from_args(cls, args: argparse.Namespace, extra: dict | None = None):
    """The recipe: ``cls`` defaults, then --config's YAML, then ``extra`` (method flags), then the
    common flags, then ``--set`` overrides."""
    values = dict(read_yaml(args.config)) if getattr(args, "config", None) else {}
    source = args.config if getattr(args, "config", None) else "config"
    for k, v in (extra or {}).items():
        if v is not None:
            values[k] = v
    for k in ("model", "output_dir", "max_steps", "seed", "resume", "overwrite", "checkpoint_every", "mixed_precision"):
        v = getattr(args, k, None)
        if v is not None:
            values[k] = v
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        values[k.strip().replace("-", "_")] = v
    return build(cls, values, source)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


__all__ = ["TrainConfig", "ConfigError", "build", "read_yaml", "add_common_flags", "from_args", "to_dict"]
