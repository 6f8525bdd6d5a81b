"""Typed training recipes: dataclasses read from small YAML files and overridable from the command
line. An unknown key is an error that names it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    pass


MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")  # auto: finetune.loop.resolve_mixed_precision


@dataclass(frozen=True)
class Bound:
    """A recipe key's range: ``low <= v`` (``low < v`` when ``open_low``), ``v <= high`` (``v < high``
    when ``open_high``); a list key's every element. Non-finite numbers are always refused."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    why: str = ""

    def problem(self, v) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            pass
        elif self.high is not None and (v >= self.high if self.open_high else v > self.high):
            pass
        else:
            return None
        lo = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"must be {' and '.join(x for x in (lo, hi) if x)}" + (f" ({self.why})" if self.why else "")


AT_LEAST_1, AT_LEAST_0, POSITIVE = Bound(1), Bound(0), Bound(0, open_low=True)
FRACTION, BETA = Bound(0, 1), Bound(0, 1, open_high=True)

# Every numeric recipe key of every training command, with its range: checked once, when a recipe is
# built (TrainConfig.__post_init__), so a bad value is named before any model loads.
# tests/test_loop.py checks that no numeric key of any recipe class is missing here.
BOUNDS: dict[str, Bound] = {
    # the loop
    "max_steps": AT_LEAST_1, "seed": Bound(0, 2**63 - 1), "batch_size": AT_LEAST_1, "learning_rate": POSITIVE,
    "lr_warmup_steps": AT_LEAST_0, "min_lr_ratio": FRACTION, "adam_beta1": BETA, "adam_beta2": BETA,
    "adam_weight_decay": AT_LEAST_0, "adam_epsilon": POSITIVE, "gradient_accumulation_steps": AT_LEAST_1,
    "max_grad_norm": Bound(0, why="0 turns clipping off"), "ema_decay": Bound(0, 1, open_high=True, why="0 turns EMA off"),
    "ema_warmup_steps": AT_LEAST_0, "checkpoint_every": Bound(0, why="0: only the final checkpoint"),
    "checkpoints_total_limit": AT_LEAST_1, "validation_every": Bound(0, why="0: only at the end"),
    "log_every": AT_LEAST_1,
    # the denoising loss and the folder trainers
    "snr_gamma": Bound(0, why="0: plain MSE"), "noise_offset": Bound(0, why="0: none"),
    "mask_weight": Bound(0, why="the subject's extra weight, 0 (off) or more"),
    "num_vectors": AT_LEAST_1, "repeats": AT_LEAST_1, "resolution": Bound(8, 8192),
    "prior_loss_weight": Bound(0, why="the prior term's weight; 0 turns it off"), "num_class_images": AT_LEAST_0,
    "sample_batch_size": AT_LEAST_1, "text_encoder_lr": AT_LEAST_0, "lora_rank": Bound(0, why="0: full fine-tuning"),
    "lora_alpha": POSITIVE,
    # distillation
    "from_steps": Bound(2), "to_steps": AT_LEAST_1, "guidance_scale": AT_LEAST_0, "guidance_range": AT_LEAST_0,
    "guidance_embedding_dim": AT_LEAST_1, "guidance_steps": AT_LEAST_1, "stage_steps": AT_LEAST_1,
    "first_halving_substeps": Bound(2, why="teacher steps per student step"), "num_images": AT_LEAST_1,
    "attribute_dropout": FRACTION,
    # the embedded model's stages
    "oversample_fraction": Bound(0, 1, why="a fraction of each batch"), "block_out_channels": AT_LEAST_1, "layers_per_block": AT_LEAST_1,
    "norm_num_groups": AT_LEAST_1, "kl_weight": AT_LEAST_0, "random_color_fraction": FRACTION, "crop_size": Bound(0, why="0: whole images"),
    "full_size_steps": AT_LEAST_0, "scale_images": AT_LEAST_1, "edge_weight": AT_LEAST_0, "latent_noise": AT_LEAST_0,
    "shift": AT_LEAST_0, "adversarial_weight": AT_LEAST_0, "adversarial_start": AT_LEAST_0,
    "discriminator_channels": AT_LEAST_1, "widen": AT_LEAST_1, "embed_dim": AT_LEAST_1, "vision_width": AT_LEAST_1,
    "vision_layers": AT_LEAST_1, "vision_resnet_layers": AT_LEAST_1, "vision_head_width": AT_LEAST_1,
    "patch_size": AT_LEAST_1, "text_width": AT_LEAST_1, "text_layers": AT_LEAST_1, "text_heads": AT_LEAST_1,
    "context_length": AT_LEAST_1, "text_encoder_layers": Bound(0, why="0: the embeddings and final norm only"), "attention_head_dim": AT_LEAST_1,
    "uncond_prob": FRACTION, "shape_swap_prob": FRACTION, "foreground_weight": AT_LEAST_0, "conditioning_channels": AT_LEAST_1,
    "size_range": Bound(4, 60, why="a shape's box side in px on the 64 px canvas"), "foreground_margin": Bound(0, why="px to grow the box by"),
}


# Recipe keys that take one of a few names, checked with the ranges (before any model loads)
TIMESTEP_SAMPLINGS = ("uniform", "cubic")  # finetune.common.denoising_loss
ADAPTER_TYPES = ("full_adapter", "light_adapter", "full_adapter_xl")  # diffusers' T2IAdapter
CHOICES: dict[str, tuple[str, ...]] = {"timestep_sampling": TIMESTEP_SAMPLINGS, "adapter_type": ADAPTER_TYPES}


def check_ranges(cfg) -> None:
    """Every key of ``cfg`` that BOUNDS names, in range, and every key CHOICES names, one of its names;
    ConfigError naming the first one that is not."""
    for f in fields(cfg):
        if f.name in CHOICES and getattr(cfg, f.name) not in CHOICES[f.name]:
            raise ConfigError(f"{f.name} {getattr(cfg, f.name)!r} is unknown; use {' or '.join(CHOICES[f.name])}")
        bound = BOUNDS.get(f.name)
        value = getattr(cfg, f.name)
        if bound is None or value is None or isinstance(value, (bool, str)):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (msg := bound.problem(v)):
                raise ConfigError(f"{f.name}={value!r}: {msg}")


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
    adam_fused: bool = True         # PyTorch's fused AdamW kernel on CPU and CUDA (same update, one kernel)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0      # 0 turns clipping off
    mixed_precision: str = "no"     # no | fp16 | bf16 | auto (bf16 where the device computes it natively)
    ema_decay: float = 0.0          # 0 turns EMA off; the final weights are the EMA ones when on
    ema_warmup_steps: int = 0       # EMA starts as a copy after this many steps
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 2
    validation_every: int = 0       # 0: validation images only at the end
    log_every: int = 10
    report_to: str = "auto"         # auto (tensorboard when installed) | none | an Accelerate tracker name
    resume: bool = False
    overwrite: bool = False
    allow_pickle: bool = False      # resume a checkpoint of the older, pickled layout (it can run code)

    def __post_init__(self):  # every key's range, once, when the recipe is built (before any work)
        check_ranges(self)


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def _coerce(name: str, tp, value):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = origin is typing.Union or type(None) in typing.get_args(tp)
    if optional and isinstance(value, str) and value.strip().lower() in ("null", "none", "~"):
        value = None  # `--set key=null` (a flag's value is a string) as YAML's null
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: null is not allowed; give a {getattr(tp, '__name__', tp)}")
    if origin in (typing.Union, getattr(types, "UnionType", None)) and args:
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        if isinstance(value, str):  # `--set key=a,b` or YAML's flow style `--set key=[a, b]`
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [_unquote(v.strip()) for v in text.split(",") if v.strip()]
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
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
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="resume a checkpoint written by an older version as pickle files (they can run code: "
                        "only for checkpoints you trust)")
    p.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS)
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
    for k in ("model", "output_dir", "max_steps", "seed", "resume", "overwrite", "allow_pickle", "checkpoint_every",
              "mixed_precision"):
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


@dataclass
class DenoisingLossKeys:
    """Recipe keys of the denoising loss (finetune.common.denoising_loss), shared by textual inversion,
    DreamBooth and the shapes U-Net stage."""
    snr_gamma: float = 0.0              # min-SNR-gamma weighting (Hang et al. 2023; 0: plain MSE, as the papers)
    noise_offset: float = 0.0           # offset noise, as kohya's --noise_offset (0: none; 0.05-0.1 usual)
    timestep_sampling: str = "uniform"  # uniform | cubic (most steps at high noise: T2I-Adapter's, for control)

    def loss_keys(self) -> dict:
        """The keys as denoising_loss's keyword arguments."""
        return {"snr_gamma": self.snr_gamma, "noise_offset": self.noise_offset,
                "timestep_sampling": self.timestep_sampling}


@dataclass
class MaskedLossKeys(DenoisingLossKeys):
    """The denoising loss's keys plus the masked loss of the trainers that read a folder of images
    (textual inversion, DreamBooth): ``mask_weight`` W weights a latent pixel's error 1 + W x the
    subject mask's coverage of it, for images with a mask file NAME.mask.png (finetune.data)."""
    mask_weight: float = 0.0            # 0: every pixel alike (masks, if any, unused)


# --- the recipes of the commands that take flags, here so that their --help needs no torch -------------

@dataclass
class TextualInversionConfig(TrainConfig, MaskedLossKeys):
    data_dir: str = ""
    placeholder_token: str = "<concept>"
    initializer_token: str = ""         # a one-token word whose embedding starts every vector, or
    #                                     num_vectors tokens, one per vector (as kohya's sd-scripts allow)
    num_vectors: int = 1                # vectors of the placeholder (T, T_1, ..., expanded in prompts)
    learnable_property: str = "object"  # object | style: which prompt templates
    templates: list[str] = field(default_factory=list)  # own templates ({} = the placeholder) instead
    repeats: int = 100                  # an epoch is every image this many times, shuffled
    resolution: int | None = None       # default: the model's native size
    center_crop: bool = False           # centre square crop before resizing (else the whole image is scaled)
    random_flip: bool = False           # horizontal flips (both orientations are encoded once)
    gradient_checkpointing: bool = False
    validation_prompts: list[str] = field(default_factory=list)  # {} or the placeholder names the concept
    save_a1111: bool = True             # also write <name>.pt in AUTOMATIC1111's layout
    # the loop's defaults for this method
    max_steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 5.0e-4
    checkpoint_every: int = 250


@dataclass
class DreamBoothConfig(TrainConfig, MaskedLossKeys):
    instance_data_dir: str = ""
    instance_prompt: str = ""           # e.g. "a sks circle"
    class_prompt: str = ""              # e.g. "a circle"
    class_data_dir: str = ""            # default: <output_dir>/class_images
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100         # missing ones are generated with the base model and kept
    sample_batch_size: int = 16         # class images generated per batch
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # the text encoders' learning rate (None: learning_rate), as kohya's
    lora_rank: int = 0                  # 0: full fine-tuning; > 0: LoRA adapters of this rank (peft)
    lora_alpha: float | None = None     # default: lora_rank
    resolution: int | None = None       # default: the model's native size
    center_crop: bool = False
    random_flip: bool = False
    gradient_checkpointing: bool = False
    validation_prompts: list[str] = field(default_factory=list)
    max_steps: int = 400
    batch_size: int = 4                 # instance images per step (as many class images again with prior)
    learning_rate: float = 5.0e-6
    checkpoint_every: int = 100


@dataclass
class DistillConfig(TrainConfig):
    teacher: str | None = None                 # the teacher's model directory (None: the embedded model)
    from_steps: int = 64                       # the teacher's DDIM step count the chain starts from
    to_steps: int = 4                          # the final student's step count (from_steps / 2^k)
    guidance_distillation: bool | None = None  # None: when the teacher is guided (its guidance scale != 1)
    guidance_scale: float | None = None        # the teacher's w (None: its sampling.json); the students' default
    guidance_range: list[float] = field(default_factory=lambda: [2.0, 8.0])  # w drawn uniformly from this
    guidance_embedding_dim: int = 256          # width of the student's w input (time_cond_proj_dim)
    guidance_steps: int = 600                  # optimiser steps of the guidance stage
    stage_steps: list[int] = field(default_factory=lambda: [300])  # steps of each halving (the last repeats)
    first_halving_teacher: str = "chain"       # chain: the stage before (the guidance student); base: the
                                               # base teacher's own classifier-free guidance at the student's w
    first_halving_substeps: int = 2            # the first halving's teacher DDIM steps per student step (2:
                                               # Salimans & Ho; 4: the teacher at twice from_steps)
    prediction_type: str = "v_prediction"      # what the students predict: v_prediction | sample
    data_dir: str | None = None                # training images with NAME.txt captions (None: the shapes world)
    num_images: int = 8000                     # shapes-world scenes rendered and encoded once
    attribute_dropout: float = 0.15            # shapes world: size/colour/background each left out of a caption
    resolution: int | None = None              # data_dir images are made this square (default: native)
    validation_prompts: list[str] = field(default_factory=lambda: [
        "a large red circle on a blue background", "a small yellow star on a black background",
        "a large green square on a white background", "a small purple triangle on a gray background"])
    batch_size: int = 32
    learning_rate: float = 1e-4
    checkpoint_every: int = 200


@dataclass
class ControlNetConfig(TrainConfig, DenoisingLossKeys):
    """``ldm train-controlnet``: a ControlNet (Zhang et al. 2023) or, with ``adapter``, a T2I-Adapter (Mou et
    al. 2023) trained on a frozen base model."""
    data_dir: str = ""                  # NAME.png (target), NAME.control.png (condition), NAME.txt (caption)
    dataset: str = ""                   # or a `datasets` dataset: a save_to_disk folder, a data folder or a name
    image_column: str = "image"         # the dataset's columns (diffusers' train_controlnet.py names)
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    shapes_conditions: list[str] = field(default_factory=list)  # no data: the shapes world, these conditions
    #                                     (silhouette, canny), shapes at any position and size_range side
    size_range: list[int] = field(default_factory=lambda: [14, 40])  # shapes world: box side, px (inclusive)
    size_sampling: str = "uniform"      # shapes world: sides drawn uniform or log-uniform (more small ones)
    num_images: int = 20000             # shapes world: scenes rendered and encoded once
    shape_swap_prob: float = 0.0        # shapes world: the caption names another shape this often, so that the
    #                                     condition, not the prompt, decides the shape (control against prompt)
    adapter: bool = False               # train a T2I-Adapter instead of a ControlNet
    adapter_type: str = "full_adapter"  # full_adapter | light_adapter | full_adapter_xl (diffusers' T2IAdapter)
    conditioning_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])  # the ControlNet's
    #                                     condition embedding (diffusers' conditioning_embedding_out_channels)
    controlnet_init: str | None = None  # start from this ControlNet (a directory) instead of the U-Net's encoder
    resolution: int | None = None       # default: the model's native size
    center_crop: bool = False
    uncond_prob: float = 0.0            # an empty caption this often (diffusers' proportion_empty_prompts)
    gradient_checkpointing: bool = False
    validation_prompts: list[str] = field(default_factory=list)
    validation_images: list[str] = field(default_factory=list)  # one condition image per prompt (or one for all)
    max_steps: int = 5000
    batch_size: int = 4
    learning_rate: float = 1e-5
    checkpoint_every: int = 500
