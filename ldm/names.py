"""The names of samplers and noise schedules, ours and AUTOMATIC1111's, and the parsing of either.

Plain data with no torch import, so that the command line can list and check them (and answer
``--help``) without loading PyTorch. ``ldm.samplers.SAMPLERS`` holds the functions under these names.
"""

from __future__ import annotations

# our sampler names, in the order they are listed; A1111's names ("label" in its /sdapi/v1/samplers)
A1111_SAMPLERS = {"ddim": "DDIM", "plms": "PLMS", "ddpm": "DDPM", "euler": "Euler", "euler-a": "Euler a", "heun": "Heun",
                  "dpm2": "DPM2", "lms": "LMS", "dpmpp-2m": "DPM++ 2M", "dpmpp-2m-sde": "DPM++ 2M SDE",
                  "dpmpp-sde": "DPM++ SDE", "unipc": "UniPC", "lcm": "LCM"}
SAMPLER_NAMES = tuple(A1111_SAMPLERS)
# the samplers that take a sigma schedule (all but those with a grid of their own)
SCHEDULE_SAMPLERS = tuple(n for n in SAMPLER_NAMES if n not in ("ddim", "plms", "ddpm", "lcm"))
# noise schedules over sigma (A1111's "Schedule type"); "default" is the spacing of the model's config
SCHEDULES = ("default", "karras", "exponential", "sgm-uniform")
# ControlNet units (ldm.control): each control mode and resize mode with its name in A1111's ControlNet
# extension (in its order: the API's numbers 0, 1, 2), and the preprocessors that need no downloaded weights
A1111_CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                       "control": "ControlNet is more important"}
A1111_RESIZE_MODES = {"just-resize": "Just Resize", "crop-and-resize": "Crop and Resize",
                      "resize-and-fill": "Resize and Fill"}
PREPROCESSORS = ("none", "canny", "threshold", "invert")
CANNY_THRESHOLDS = (100.0, 200.0)  # canny's low / high hysteresis thresholds by default (A1111's too)
A1111_SCHEDULES = {"default": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "sgm-uniform": "SGM Uniform"}
# A1111's aliases (its samplers' ``aliases``: the k-diffusion function names) and API scheduler names
ALIASES = {"k_euler": "euler", "k_euler_a": "euler-a", "k_heun": "heun", "k_dpm_2": "dpm2", "k_lms": "lms",
           "k_dpmpp_2m": "dpmpp-2m", "k_dpmpp_2m_sde": "dpmpp-2m-sde", "k_dpmpp_sde": "dpmpp-sde",
           "automatic": None, "uniform": "default", "sgm_uniform": "sgm-uniform"}


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


_SAMPLER_KEYS = {**{_key(k): k for k in SAMPLER_NAMES}, **{_key(v): k for k, v in A1111_SAMPLERS.items()},
                 **{_key(k): v for k, v in ALIASES.items() if v in SAMPLER_NAMES}}
_SCHEDULE_KEYS = {**{_key(k): k for k in A1111_SCHEDULES}, **{_key(v): k for k, v in A1111_SCHEDULES.items()},
                  **{_key(k): v for k, v in ALIASES.items() if v is None or v in A1111_SCHEDULES}}


def parse_schedule(name: str | None) -> str | None:
    """Our schedule name for ours or A1111's ("Karras", "sgm_uniform", ...); None for A1111's
    "Automatic" (the sampler's default). Raises ValueError naming the choices."""
    if name is None:
        return None
    key = _key(name)
    if key not in _SCHEDULE_KEYS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(A1111_SCHEDULES)} "
                         f"(or A1111's {', '.join(A1111_SCHEDULES.values())}, Automatic)")
    return _SCHEDULE_KEYS[key]


def parse_sampler(name: str, schedule: str | None = None) -> tuple[str, str | None]:
    """(sampler, schedule) for a sampler named as we name it or as A1111 does, the schedule given
    apart or, in A1111's older style, as a suffix ("DPM++ 2M Karras"). Raises ValueError naming the
    choices; a schedule given both ways must agree."""
    key = _key(name)
    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], parse_schedule(schedule)
    for label, ours in sorted(_SCHEDULE_KEYS.items(), key=lambda kv: -len(kv[0])):
        if ours and key.endswith(" " + label) and key[:-len(label) - 1] in _SAMPLER_KEYS:
            given = parse_schedule(schedule)
            if given not in (None, ours):
                raise ValueError(f"sampler {name!r} names the {ours} schedule but the schedule {schedule!r} was given")
            return _SAMPLER_KEYS[key[:-len(label) - 1]], ours
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)} "
                     f"(or A1111's {', '.join(A1111_SAMPLERS.values())}, with a schedule suffix such as Karras)")

# how ``ldm edit`` inverts a real image (pipelines.edit): direct inversion (Ju et al. 2023; the default:
# no optimisation, and the best edits measured, docs/edit.md), null-text inversion (Mokady et al. 2022),
# negative-prompt inversion (Miyake et al. 2023), or plain DDIM inversion
INVERSIONS = ("direct", "null-text", "npi", "ddim")
DEFAULT_INVERSION = "direct"
