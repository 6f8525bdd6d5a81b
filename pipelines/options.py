"""The generation request's options, declared once.

Each option is one line: its type, default, help, bounds, AUTOMATIC1111's name for it, and which
front ends show it. From this table come the command line's flags (``add_flags``), the HTTP API's
JSON bodies (pipelines.serve builds them), the names in A1111's error answers (pipelines.a1111), the
defaults of :class:`pipelines.request.Request` and the plain range checks of its ``validate`` (the
checks that need the model or the server's limits stay there). No torch here: ``ldm --help`` stays
quick.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.names import A1111_CONTROL_MODES, A1111_RESIZE_MODES, CANNY_THRESHOLDS, PREPROCESSORS, SAMPLER_NAMES, SCHEDULES

KINDS = ("txt2img", "img2img", "inpaint")
KIND_WORDS = {"txt2img": "text-to-image", "img2img": "image-to-image", "inpaint": "inpainting"}
DEFAULT_STRENGTH = {"txt2img": None, "img2img": 0.8, "inpaint": 1.0}  # a request's strength when it gives none
HIRES_UPSCALERS = ("latent", "lanczos")
INPAINT_FILLS = ("fill", "original", "latent-noise", "latent-nothing")  # A1111's inpainting_fill 0-3, in order
MODEL_DEFAULT = "default: the model's sampling.json, else "


@dataclass(frozen=True)
class Option:
    type: type                          # int, float, str or Path
    default: Any
    help: str
    low: float | None = None            # bounds of a number: low <= v (low < v with open_low) ...
    high: float | None = None           # ... v <= high (v < high with open_high)
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    a1111: str | None = None            # A1111's payload name, where it has one
    metavar: str | None = None
    cli: bool = True                    # a flag of ldm generate / img2img / inpaint
    http: bool = True                   # a field of the HTTP API's bodies (/api/txt2img, /api/img2img)
    kinds: tuple[str, ...] = KINDS      # the request kinds it applies to

    def problem(self, value) -> str | None:
        """The plain check of ``value`` against this option's type, bounds and choices; None when it
        passes (None passes where None is the default: "the model's default")."""
        if value is None and self.default is None:
            return None
        if self.type is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.type in (int, float):
            whole = self.type is int
            number = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
            if not number or not math.isfinite(value) or not self._inside(value):
                if self.low is not None and self.high is not None:
                    return f"must be {self._span()}, got {value!r}"
                what = "an integer" if whole else "a number"
                bound = "" if self.low is None else f" {'>' if self.open_low else '>='} {self.low:g}"
                return f"must be {what}{bound}, got {value!r}"
        elif self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        return None

    def _inside(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            return False
        return self.high is None or (v < self.high if self.open_high else v <= self.high)

    def _span(self) -> str:
        """"between 0 and 1" for a closed range, "in (0, 1]" for a half-open one."""
        if not self.open_low and not self.open_high:
            return f"between {self.low:g} and {self.high:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


OPTIONS: dict[str, Option] = {
    "negative": Option(str, "", "negative prompt (what the unconditional branch is given)", a1111="negative_prompt"),
    "prompt_2": Option(str, None, "SDXL: the second text encoder's prompt (default: the prompt)"),
    "negative_2": Option(str, None, "SDXL: the second text encoder's negative prompt (default: --negative)"),
    "sampler": Option(str, None, f"{', '.join(SAMPLER_NAMES)}, or A1111's names (\"DPM++ 2M Karras\"); "
                                 f"{MODEL_DEFAULT}ddim", a1111="sampler_name", metavar="NAME"),
    "schedule": Option(str, None, f"noise schedule: {', '.join(SCHEDULES)} (A1111's schedule type; default: the "
                                  "model's timestep spacing)", a1111="scheduler", metavar="NAME"),
    "steps": Option(int, None, f"sampling steps ({MODEL_DEFAULT}30)", low=1),
    "guidance": Option(float, None, f"classifier-free guidance scale; 1 turns guidance off ({MODEL_DEFAULT}7.5)",
                       a1111="cfg_scale"),
    "guidance_rescale": Option(float, 0.0, "guidance rescale phi of Lin et al. 2023, 0 to 1 (default 0)", low=0, high=1),
    "eta": Option(float, 0.0, "stochasticity of ddim, euler-a and the SDE samplers (default 0 for ddim; the others "
                              "use 1)", low=0, high=1, a1111="eta"),
    "s_noise": Option(float, 1.0, "scale of the fresh noise of euler-a and the SDE samplers (k-diffusion's and A1111's "
                                  "s_noise; default 1)", low=0, high=1.1, a1111="s_noise", metavar="F"),
    "seed": Option(int, None, "seed of the first image; image i gets seed+i (default: random; 0 with --from-file)"),
    "subseed": Option(int, None, "variation seed (A1111): image i gets subseed+i"),
    "subseed_strength": Option(float, 0.0, "how far each image's noise moves towards its variation seed's, 0 to 1 "
                                           "(default 0)", low=0, high=1, metavar="F"),
    "width": Option(int, None, "multiple of 8 (default: the model's native size); inpaint: with --only-masked",
                    kinds=("txt2img", "inpaint")),
    "height": Option(int, None, "multiple of 8 (default: the model's native size); inpaint: with --only-masked",
                     kinds=("txt2img", "inpaint")),
    "batch_size": Option(int, 1, "images per prompt, made in one batch (default 1)"),
    "n_iter": Option(int, 1, "batches per prompt, one after another (A1111's batch count; default 1)", low=1,
                     metavar="N"),
    "strength": Option(float, None, "how far to noise the image, in (0, 1] (default 0.8 for img2img, 1 for "
                                    "inpaint)", low=0, high=1, open_low=True, a1111="denoising_strength",
                       kinds=("img2img", "inpaint")),
    "noise_multiplier": Option(float, 1.0, "scale of the starting noise (A1111's initial_noise_multiplier; default 1)",
                               low=0, high=2, a1111="initial_noise_multiplier", metavar="F", kinds=("img2img", "inpaint")),
    "mask_blur": Option(int, 4, "blur the mask by a Gaussian of N px and paste the original back outside it, so that "
                                "unmasked pixels are the input's (default 4, A1111's)", low=0, high=64,
                        a1111="mask_blur", metavar="N", kinds=("inpaint",)),
    "mask_invert": Option(bool, False, "repaint where the mask is black instead", a1111="inpainting_mask_invert",
                          kinds=("inpaint",)),
    "inpaint_fill": Option(str, "original", "what the masked region starts from: original, fill (the colours around "
                                            "it), latent-noise, latent-nothing (A1111's masked content)",
                           choices=INPAINT_FILLS, a1111="inpainting_fill", kinds=("inpaint",)),
    "only_masked": Option(bool, False, "work on the mask's box (plus --only-masked-padding) at --width x --height "
                                       "(default: the model's native size) and paste it back (A1111's 'Only masked')",
                          a1111="inpaint_full_res", kinds=("inpaint",)),
    "only_masked_padding": Option(int, 32, "px around the mask's box with --only-masked (default 32)", low=0,
                                  high=4096, a1111="inpaint_full_res_padding", metavar="PX", kinds=("inpaint",)),
    "hires_scale": Option(float, None, "hires fix: generate, upscale by S (e.g. 2), then image-to-image at the larger "
                                       "size", low=1, high=8, a1111="hr_scale", metavar="S", kinds=("txt2img",)),
    "hires_strength": Option(float, 0.7, "the hires pass's denoising strength (default 0.7, A1111's; 0: the upscaled "
                                         "image, no second pass)", low=0, high=1, a1111="denoising_strength",
                             metavar="F", kinds=("txt2img",)),
    "hires_steps": Option(int, None, "the hires pass's steps (default: --steps)", low=1, a1111="hr_second_pass_steps",
                          metavar="N", kinds=("txt2img",)),
    "hires_upscaler": Option(str, "latent", "upscale the latents (latent: bilinear), the decoded image (lanczos), or "
                                            "the decoded image with a model upscaler: a name of --upscalers-dir (ESRGAN, "
                                            "SwinIR, ...; a file's path on the command line); default latent",
                             a1111="hr_upscaler", metavar="NAME", kinds=("txt2img",)),
    "refiner_start": Option(float, None, "the fraction of the schedule the base denoises before the refiner "
                                         "(default 0.8 with --refiner)", low=0, high=1, open_low=True, open_high=True,
                            metavar="F", http=False, kinds=("txt2img",)),
    "cache_interval": Option(int, 1, "DeepCache: the whole U-Net every N-th step, only its shallow blocks between "
                                     "(default 1: off)", low=1, metavar="N"),
    "cache_depth": Option(int, 1, "DeepCache: the resolution levels recomputed between full steps (default 1: the "
                                  "outermost; 0: only the last layer of the last up block)", low=0, metavar="K"),
    "clip_skip": Option(int, 1, "text-encoder layer, A1111's numbering: 1 = the model's usual one, 2 = one before, ...",
                        a1111="override_settings.CLIP_stop_at_last_layers", metavar="N"),
    "clip_guidance_scale": Option(float, 0.0, "CLIP guidance: follow the gradient of a CLIP loss of the decoded image "
                                              "against the prompt, at scale S (default 0: off; try 50-200)", low=0,
                                  metavar="S"),
    "clip_model": Option(Path, None, "the open_clip model for CLIP guidance (default: the embedded model's own CLIP)",
                         metavar="DIR", http=False),  # a path on the server: never a client's to give
    "clip_cutouts": Option(int, 4, "CLIP guidance: random crops per image per step (default 4)", low=1, metavar="N"),
}

# the sampling options every generating command and ldm edit take, and the controls they share
SAMPLING = ("sampler", "schedule", "steps", "guidance")
CONTROLS = ("cache_interval", "cache_depth", "clip_skip", "clip_guidance_scale", "clip_model", "clip_cutouts")
EDIT_OPTIONS = ("negative", "seed", "width", "height", *SAMPLING, *CONTROLS)  # ldm edit's (and /api/edit's)


# One ControlNet unit's options (ldm.control); a request holds a list of units, the command line repeats the
# group (--controlnet ... --control-image ... for each, the i-th of every flag belonging to the i-th unit)
CONTROL_MODES = tuple(A1111_CONTROL_MODES)
RESIZE_MODES = tuple(A1111_RESIZE_MODES)
CONTROL_OPTIONS: dict[str, Option] = {
    "weight": Option(float, 1.0, "the ControlNet's weight (its residuals' scale; default 1)", low=0),
    "start": Option(float, 0.0, "the fraction of the schedule the ControlNet starts acting at (default 0)", low=0,
                    high=1),
    "end": Option(float, 1.0, "the fraction of the schedule it stops acting after (default 1)", low=0, high=1),
    "mode": Option(str, "balanced", "balanced; prompt (A1111's 'My prompt is more important'); control ('ControlNet "
                                    "is more important', diffusers' guess mode)", choices=CONTROL_MODES),
    "preprocessor": Option(str, "none", "how the control image becomes the map: none (it is the map), canny "
                                        "(OpenCV's edges), threshold (white where brighter than mid-grey), invert",
                           choices=PREPROCESSORS),
    "canny_low": Option(float, CANNY_THRESHOLDS[0], f"canny: the low hysteresis threshold (default "
                                                    f"{CANNY_THRESHOLDS[0]:g}; A1111's threshold_a)", low=0, high=1000),
    "canny_high": Option(float, CANNY_THRESHOLDS[1], f"canny: the high hysteresis threshold (default "
                                                     f"{CANNY_THRESHOLDS[1]:g}; A1111's threshold_b)", low=0, high=1000),
    "resize": Option(str, "just-resize", "fitting the control image to the request's size: just-resize, "
                                         "crop-and-resize (cover, centre crop), resize-and-fill (fit, black margins)",
                     choices=RESIZE_MODES),
}


def options_for(kind: str, surface: str = "cli") -> list[str]:
    """The options of a request ``kind`` a surface (cli, http) shows, in the table's order."""
    return [name for name, o in OPTIONS.items() if kind in o.kinds and getattr(o, surface)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


ADAPTER_OPTIONS: dict[str, Option] = {
    "weight": Option(float, 1.0, "the T2I-Adapter's weight (its features' scale; default 1)", low=0),
    **{k: CONTROL_OPTIONS[k] for k in ("preprocessor", "canny_low", "canny_high")},  # the map, as a ControlNet's
}


def canny_thresholds(unit: dict) -> tuple[float, float]:
    """A unit's (canny_low, canny_high), the declared defaults where it gives none."""
    return tuple(float(unit.get(k, CONTROL_OPTIONS[k].default)) for k in ("canny_low", "canny_high"))

# the unit groups a request holds: (its Request field, the model flag, the image flag, its options)
UNIT_GROUPS = {
    "control": ("controls", "--controlnet", "--control-image", CONTROL_OPTIONS,
                "a ControlNet (diffusers directory or .safetensors file); repeat the group for several"),
    "adapter": ("adapters", "--adapter", "--adapter-image", ADAPTER_OPTIONS,
                "a T2I-Adapter (diffusers directory); repeat the group for several"),
}


def add_unit_flags(parser: argparse.ArgumentParser) -> None:
    """For each unit group (ControlNet, T2I-Adapter): the model and image flags and a --<group>-<option>
    per unit option, each repeatable: the i-th of each belongs to the i-th unit (one given once applies to
    all)."""
    for group, (_, model_flag, image_flag, options, help_) in UNIT_GROUPS.items():
        parser.add_argument(model_flag, dest=f"{group}_models", action="append", default=[], metavar="DIR",
                            help=help_)
        parser.add_argument(image_flag, dest=f"{group}_images", action="append", default=[], type=Path,
                            metavar="IMG", help=f"the image of the matching {model_flag}")
        for name, o in options.items():
            kwargs = dict(choices=list(o.choices)) if o.choices else dict(type=o.type)
            parser.add_argument(f"--{group}-{name.replace('_', '-')}", dest=f"{group}_{name}", action="append", default=[],
                                help=o.help, **kwargs)


def unit_lists(args) -> dict[str, list[dict]]:
    """The units the command line's unit flags give, by Request field: one dict per model flag with the
    unit's model, image and every option."""
    out = {}
    for group, (field, model_flag, image_flag, options, _) in UNIT_GROUPS.items():
        models, images = getattr(args, f"{group}_models", []), getattr(args, f"{group}_images", [])
        n = len(models)
        if len(images) != n:
            raise ValueError(f"got {len(images)} {image_flag} for {n} {model_flag}; give one each")
        units = [{"model": m, "image": img} for m, img in zip(models, images)]
        for name, o in options.items():
            given = getattr(args, f"{group}_{name}")
            if len(given) not in (0, 1, n) or (given and not n):
                raise ValueError(f"got {len(given)} --{group}-{name.replace('_', '-')} for {n} {model_flag}; "
                                 "give one, or one each")
            for i, u in enumerate(units):
                u[name] = given[i] if len(given) == n else given[0] if given else o.default
        out[field] = units
    return out


def add_flags(parser: argparse.ArgumentParser, names, defaults: dict | None = None, helps: dict | None = None) -> None:
    """A flag per option in ``names``, typed, with its help and default (``defaults`` / ``helps`` for a
    command whose default or wording differs, as img2img's strength)."""
    for name in names:
        o = OPTIONS[name]
        kwargs = dict(default=(defaults or {}).get(name, o.default), help=(helps or {}).get(name, o.help))
        if o.type is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if o.choices is not None:
            kwargs["choices"] = list(o.choices)
        if o.type is not str or o.choices is None:
            kwargs["type"] = o.type
        if o.metavar:
            kwargs["metavar"] = o.metavar
        parser.add_argument(flag(name), dest=name, **kwargs)
