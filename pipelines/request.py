"""One generation request, checked and resolved in one place.

The command line, ``Pipeline``'s Python calls and the web studio all build a :class:`Request`, ask it
for its problems (:meth:`Request.validate`, with the :class:`Limits` of whoever runs it) and turn it
into a :class:`Resolved` request for one model (:meth:`Request.resolve`): the model's defaults filled
in from its sampling.json, the seed drawn once, the steps a strength runs counted once. A new option
is added here, once, and every front end has it.

Problems are ``(field, message)`` pairs; ``field`` is the request's field name, which is also the
HTTP API's JSON key and, as ``--field-name``, the command line's flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.guidance import scale_problem
from ldm.locate import controlnet_named
from ldm.names import A1111_CONTROL_MODES
from ldm.prompts import lora_tags
from ldm.samplers import SAMPLERS, SCHEDULE_SAMPLERS, get_sampler, parse_sampler, parse_schedule

from .options import DEFAULT_STRENGTH, HIRES_UPSCALERS, KIND_WORDS, KINDS, OPTIONS, UNIT_GROUPS, canny_thresholds

# options checked here by rules of their own (the server's limits, the model's factor, one bound of
# guidance); every other option's plain check comes from its line in pipelines.options
SPECIAL = frozenset({"steps", "guidance", "batch_size", "width", "height", "clip_skip", "seed", "subseed"})
MAX_SEED = 2**63


@dataclass
class Limits:
    """What one request may ask for. The command line's are the pipeline's own bounds; ``ldm serve``
    sets tighter ones from its flags."""
    max_side: int = 4096          # width and height, pixels
    max_batch: int | None = 256   # images per prompt at once (more: n_iter batches one after another)
    max_steps: int | None = None  # sampling steps
    lora_dir: Path | None = None  # LoRA entries are names of files in this folder (else paths) ...
    lora_paths: bool = True       # ... and without one, whether they may be paths (not over HTTP)
    upscalers_dir: Path | None = None  # hires_upscaler may name a model upscaler file of this folder (else a path
    #                                    where lora_paths allows paths)
    allow_pickle: bool = False    # ... and that file may be a pickle
    max_images: int | None = None  # images per request: prompts x batch_size x n_iter
    max_prompt_chars: int | None = None  # characters of each prompt and negative prompt


class RequestError(ValueError):
    """A request with problems; ``problems`` lists them as (field, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in self.problems))

    def for_cli(self) -> str:
        """The problems with each field named as its command-line flag."""
        return "; ".join(f"--{f.replace('_', '-')} {m}" if f else m for f, m in self.problems)


def strength_steps(steps: int, strength: float | None) -> int:
    """How many of ``steps`` run at ``strength`` (diffusers' convention: the last int(steps x strength));
    all of them without a strength. The progress bars and the sampler both count with this."""
    return steps if strength is None else min(int(steps * strength), steps)


def random_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def sampling_defaults(model, sampler: str | None = None, steps: int | None = None,
                      guidance: float | None = None) -> tuple[str, int, float]:
    """Each None replaced by the model's default (its sampling.json, else ddim, 30 steps, 7.5)."""
    d = model.sampling_defaults
    return (d["sampler"] if sampler is None else sampler, d["steps"] if steps is None else steps,
            d["guidance_scale"] if guidance is None else guidance)


def _size_problem(name: str, v, factor: int, max_side: int) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % factor:
        hint = f"; try {max(factor, round(v / factor) * factor)}" if isinstance(v, (int, float)) else ""
        return f"must be a positive multiple of {factor}, got {v!r}{hint}"
    if v > max_side:
        return f"must be at most {max_side}, got {v}"
    return None


@dataclass
class Request:
    """What to generate. None means "the model's default" (sampler, steps, guidance, size) or "draw
    one" (seed). ``seeds`` gives every image's seed explicitly (one per prompt x batch_size)."""
    prompt: str | list[str] = ""
    kind: str = "txt2img"                 # txt2img | img2img | inpaint
    negative: str | list[str] | None = OPTIONS["negative"].default
    sampler: str | None = OPTIONS["sampler"].default      # ours or A1111's name ("DPM++ 2M", "DPM++ 2M Karras")
    steps: int | None = OPTIONS["steps"].default
    guidance: float | None = OPTIONS["guidance"].default  # classifier-free guidance scale; 1 turns it off
    guidance_rescale: float = OPTIONS["guidance_rescale"].default  # phi of Lin et al. 2023, 0 to 1
    eta: float = OPTIONS["eta"].default   # stochasticity of ddim / euler-a, 0 to 1
    seed: int | None = OPTIONS["seed"].default
    seeds: list[int] | None = None
    width: int | None = OPTIONS["width"].default
    height: int | None = OPTIONS["height"].default
    batch_size: int = OPTIONS["batch_size"].default
    strength: float | None = OPTIONS["strength"].default  # img2img / inpaint; None: 0.8 / 1.0
    image: Any = None                     # PIL image or (1, 3, H, W) tensor in [-1, 1]
    mask: Any = None                      # PIL image or tensor in [0, 1], white = repaint
    latents: torch.Tensor | None = None   # txt2img: start from these instead of fresh noise
    embeddings: list[tuple[Path, str | None]] = field(default_factory=list)  # (file, token or None)
    lora: list[str | Path] = field(default_factory=list)
    prompt_2: str | list[str] | None = OPTIONS["prompt_2"].default      # SDXL: the second text encoder's prompt
    negative_2: str | list[str] | None = OPTIONS["negative_2"].default  # SDXL: the second encoder's negative prompt
    n_iter: int = OPTIONS["n_iter"].default                 # batches run one after another (A1111's batch count)
    subseed: int | None = OPTIONS["subseed"].default        # variation seed (A1111): the noise is slerped towards
    subseed_strength: float = OPTIONS["subseed_strength"].default  # ... this seed's by this fraction, 0 to 1
    s_noise: float = OPTIONS["s_noise"].default  # the scale of euler-a's and the SDE samplers' fresh noise
    noise_multiplier: float = OPTIONS["noise_multiplier"].default  # img2img / inpaint: the starting noise's scale
    mask_blur: int = OPTIONS["mask_blur"].default            # inpaint (A1111's way, ldm.inpaint): the mask's blur, px
    mask_invert: bool = OPTIONS["mask_invert"].default       # ... repaint where the mask is black
    inpaint_fill: str = OPTIONS["inpaint_fill"].default      # ... what the masked region starts from
    only_masked: bool = OPTIONS["only_masked"].default       # ... work on the mask's box only, at width x height
    only_masked_padding: int = OPTIONS["only_masked_padding"].default  # ... grown by this many px
    hires_scale: float | None = OPTIONS["hires_scale"].default  # hires fix: generate, upscale by this factor, img2img
    hires_strength: float = OPTIONS["hires_strength"].default   # ... at this strength (A1111's default)
    hires_steps: int | None = OPTIONS["hires_steps"].default    # ... with this many steps (default: steps)
    hires_upscaler: str = OPTIONS["hires_upscaler"].default     # latent (bilinear on the latents) | lanczos
    cache_interval: int = OPTIONS["cache_interval"].default  # DeepCache: the whole U-Net every N-th evaluation
    cache_depth: int = OPTIONS["cache_depth"].default        # ... the resolution levels recomputed in between
    clip_skip: int = OPTIONS["clip_skip"].default            # A1111's numbering: 1 = the model's usual text layer
    schedule: str | None = OPTIONS["schedule"].default       # noise schedule (ldm.schedule.SCHEDULES or A1111's)
    clip_guidance_scale: float = OPTIONS["clip_guidance_scale"].default  # CLIP guidance's scale; 0 turns it off
    clip_model: str | Path | None = OPTIONS["clip_model"].default  # ... an open_clip directory (default: embedded)
    clip_cutouts: int = OPTIONS["clip_cutouts"].default       # ... random crops per image per step
    refiner_start: float | None = OPTIONS["refiner_start"].default  # with a refiner (Pipeline.refiner): the
                                        # fraction of the schedule the base denoises before the refiner (SDXL's 0.8)
    controls: list[dict] = field(default_factory=list)  # ControlNet units: {"model", "image", and the options of
                                                         # pipelines.options.CONTROL_OPTIONS} (ldm.control)
    adapters: list[dict] = field(default_factory=list)  # T2I-Adapter units: {"model", "image", "weight"}

    # --- checks that need no model ---------------------------------------------------------------
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def validate(self, limits: Limits | None = None, factor: int = 8) -> list[tuple[str, str]]:
        """Every problem of this request's values, as (field, message); [] when it can run."""
        lim = limits or Limits()
        problems = []
        add = problems.append
        if self.kind not in KINDS:
            add(("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}"))
        prompts = self.prompts()
        if not prompts or not all(isinstance(p, str) for p in prompts):
            add(("prompt", "no prompt given"))
        if lim.max_prompt_chars is not None:  # before anything tokenises them
            for name in ("prompt", "negative", "prompt_2", "negative_2"):
                value = getattr(self, name)
                texts = [value] if isinstance(value, str) else list(value or [])
                longest = max((len(t) for t in texts if isinstance(t, str)), default=0)
                if longest > lim.max_prompt_chars:
                    add((name, f"is {longest} characters; this server takes at most {lim.max_prompt_chars} "
                               f"(--max-prompt-chars)"))
        if self.negative is not None and not isinstance(self.negative, str) and len(self.negative) != len(prompts):
            add(("negative", f"got {len(self.negative)} negative prompts for {len(prompts)} prompts"))
        sampler, schedule = self.sampler_schedule(problems)
        if self.steps is not None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                add(("steps", f"must be an integer >= 1, got {self.steps!r}"))
            elif lim.max_steps is not None and self.steps > lim.max_steps:
                add(("steps", f"must be between 1 and {lim.max_steps}, got {self.steps}"))
        if self.guidance is not None and (msg := scale_problem(self.guidance)):
            add(("guidance", f"{msg}, got {self.guidance!r}"))
        for name, option in OPTIONS.items():  # the plain type, range and choice checks, from the table
            if name not in SPECIAL and (self.kind in option.kinds or getattr(self, name) != option.default):
                if (msg := option.problem(getattr(self, name))) is not None:
                    add((name, msg))
        if sampler in SAMPLERS:  # named here; else checked in resolve, against the model's default sampler
            problems += sampler_fit(sampler, schedule, self.eta, self.s_noise)
        if self.subseed is not None and not (isinstance(self.subseed, int) and 0 <= self.subseed < MAX_SEED):
            add(("subseed", f"must be an integer from 0 to 2**63 - 1, got {self.subseed!r}"))
        for name, option in OPTIONS.items():  # an option given to a kind it does not apply to
            if self.kind not in option.kinds and name not in ("width", "height", "strength") and \
                    getattr(self, name) != option.default:
                add((name, f"applies to {' and '.join(KIND_WORDS[k] for k in option.kinds)}"))
        if self.kind == "inpaint" and not self.only_masked:
            for name in ("width", "height"):
                if getattr(self, name) is not None:
                    add((name, "inpainting keeps the image's size; a working size applies with only_masked"))
        if self.hires_scale is not None or self.hires_upscaler != OPTIONS["hires_upscaler"].default:
            if (msg := upscaler_problem(self.hires_upscaler, lim)) is not None:
                add(("hires_upscaler", msg))
        if self.hires_scale is not None:
            if self.hires_steps is not None and lim.max_steps is not None and isinstance(self.hires_steps, int) \
                    and self.hires_steps > lim.max_steps:
                add(("hires_steps", f"must be an integer from 1 to {lim.max_steps}, got {self.hires_steps!r}"))
            if self.refiner_start is not None:
                add(("hires_scale", "does not combine with a refiner"))
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= 12:
            add(("clip_skip", f"must be an integer from 1 (the usual layer) to 12, got {self.clip_skip!r}"))
        if self.clip_model is not None and not Path(self.clip_model).is_dir():
            add(("clip_model", f"{str(self.clip_model)!r} is not a directory (an open_clip model directory)"))
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < MAX_SEED):
            add(("seed", f"must be an integer from 0 to 2**63 - 1, got {self.seed!r}"))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1 or (
                lim.max_batch is not None and self.batch_size > lim.max_batch):
            top = f"between 1 and {lim.max_batch}" if lim.max_batch is not None else ">= 1"
            more = "; for more images run several batches one after another (n_iter)" if (
                isinstance(self.batch_size, int) and lim.max_batch is not None and self.batch_size > lim.max_batch) else ""
            add(("batch_size", f"must be {top}, got {self.batch_size!r}{more}"))
        n_images = len(prompts) * (self.batch_size if isinstance(self.batch_size, int) else 1) * (
            self.n_iter if isinstance(self.n_iter, int) else 1)
        if lim.max_images is not None and n_images > lim.max_images:
            add(("n_iter", f"asks {n_images} images (prompts x batch_size x n_iter); this server makes at most "
                           f"{lim.max_images} per request (--max-images)"))
        if self.seeds is not None and len(self.seeds) != n_images:
            add(("seeds", f"got {len(self.seeds)} seeds for {n_images} images"))
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (msg := _size_problem(name, v, factor, lim.max_side)):
                add((name, msg))
        if self.kind in ("img2img", "inpaint"):
            if self.image is None:
                add(("image", "required for " + self.kind))
            else:
                w, h = _image_size(self.image)
                worked_whole = not (self.kind == "inpaint" and self.only_masked)  # else its box is resized
                if worked_whole and (w % factor or h % factor):
                    add(("image", f"is {w}x{h}; both sides must be multiples of {factor}"))
                elif max(w, h) > lim.max_side:
                    add(("image", f"is {w}x{h}; sides must be at most {lim.max_side}"))
                if self.kind == "inpaint" and self.mask is not None and _image_size(self.mask) != (w, h):
                    mw, mh = _image_size(self.mask)
                    add(("mask", f"is {mw}x{mh} but the image is {w}x{h}; they must be the same size"))
            if self.kind == "inpaint" and self.mask is None:
                add(("mask", "required for inpaint"))
        for group, (name, _, _, options, _) in UNIT_GROUPS.items():
            for i, unit in enumerate(getattr(self, name)):
                problems += unit_problems(unit, i, group, options)
        problems += self.lora_set(lim)[1]
        for file, _ in self.embeddings:
            if not Path(file).is_file():
                add(("embedding", f"embedding file {str(file)!r} does not exist"))
        return problems

    def lora_set(self, limits: Limits | None = None) -> tuple[list[tuple[Path, float, float]], list[tuple[str, str]]]:
        """The LoRA files this request applies, as (file, text-encoder weight, U-Net weight): its ``lora``
        entries at weight 1, then the ``<lora:NAME:WEIGHT>`` tags of its prompts (A1111's syntax; NAME
        a file of ``limits.lora_dir``, with or without .safetensors), one weight per file; and the
        problems found (an unknown name, a bad tag, one file at two weights)."""
        lim = limits or Limits()
        problems, chosen = [], {}
        folder = lora_files(lim.lora_dir) if lim.lora_dir is not None and (
            self.lora or any("<" in p for p in self.prompts() if isinstance(p, str))) else {}

        def pick(field_name, entry, te, unet):
            if field_name == "lora" and lim.lora_paths:  # the command line's --lora: a file
                if not Path(entry).exists():
                    problems.append(("lora", f"LoRA file {str(entry)!r} does not exist"))
                    return
                path = Path(entry)
            elif lim.lora_dir is not None:
                path = folder.get(str(entry)) or folder.get(f"{entry}.safetensors")
                if path is None:
                    names = sorted({p.stem for p in folder.values()})
                    problems.append((field_name, f"no LoRA file {str(entry)!r} in the LoRA folder; available: "
                                                 f"{', '.join(names) or 'none'}"))
                    return
            elif not lim.lora_paths:  # the same answer whatever the name: nothing said about the server's files
                problems.append((field_name, "this server takes LoRA files by name from its --lora-dir, and was "
                                             "started without one"))
                return
            else:
                problems.append(("prompt", f"<lora:{entry}:...> names a file of a LoRA folder: give --lora-dir"))
                return
            key = Path(path).resolve()
            if key in chosen and chosen[key][1:] != (te, unet):
                problems.append((field_name, f"LoRA {str(entry)!r} is asked at two weights ({chosen[key][1]:g} and "
                                             f"{te:g}); give one"))
                return
            chosen[key] = (Path(path), te, unet)

        for entry in self.lora:
            pick("lora", entry, 1.0, 1.0)
        for text in dict.fromkeys(p for p in self.prompts() if isinstance(p, str)):
            try:
                tags = lora_tags(text)
            except ValueError as exc:
                problems.append(("prompt", str(exc)))
                continue
            for name, te, unet in tags:
                pick("prompt", name, te, unet)
        return list(chosen.values()), list(dict.fromkeys(problems))

    def sampler_schedule(self, problems: list | None = None) -> tuple[str | None, str | None]:
        """The sampler and schedule in our names (A1111's accepted, "DPM++ 2M Karras" split); a name
        that is neither is added to ``problems`` and comes back as None."""
        sampler, schedule = self.sampler, None
        try:
            if sampler is not None:
                sampler, schedule = parse_sampler(sampler, self.schedule)
            else:
                schedule = parse_schedule(self.schedule)
        except ValueError as exc:
            if problems is not None:
                problems.append(("schedule" if str(exc).startswith("unknown schedule") else "sampler", str(exc)))
            return None, None
        return sampler, schedule

    def check(self, limits: Limits | None = None, factor: int = 8) -> "Request":
        problems = self.validate(limits, factor)
        if problems:
            raise RequestError(problems)
        return self

    def _each(self, value, n: int) -> list[str]:
        """One text per image: a string (or None: empty) for every prompt, or one per prompt."""
        texts = [value or ""] * n if value is None or isinstance(value, str) else list(value)
        return [t for t in texts for _ in range(self.batch_size)]

    # --- resolution against a model --------------------------------------------------------------
    def resolve(self, model, limits: Limits | None = None) -> "Resolved":
        """This request for ``model``: checked (with the model's VAE factor and schedule), defaults
        filled in, the seed drawn once. Raises RequestError listing every problem."""
        factor = model.vae_factor
        problems = self.validate(limits, factor)
        if problems:
            raise RequestError(problems)
        sampler, schedule = self.sampler_schedule()
        sampler, steps, guidance = sampling_defaults(model, sampler, self.steps, self.guidance)
        sampler, implied = parse_sampler(sampler)  # sampling.json may name it as A1111 does ("DPM++ 2M Karras")
        spec = get_sampler(sampler)
        schedule = schedule or implied or "default"
        problems += sampler_fit(sampler, schedule, self.eta, self.s_noise)
        try:  # the schedule's own bound (the model's training timesteps)
            model.schedule.steps(steps, schedule=schedule, **spec.grid)
        except ValueError as exc:
            problems.append(("steps", str(exc)))
        strength = self.strength if self.strength is not None else DEFAULT_STRENGTH.get(self.kind)
        run_steps = strength_steps(steps, strength)
        if self.kind == "inpaint" and run_steps == 0:
            problems.append(("strength", f"{strength} with {steps} steps runs no step; raise either"))
        if self.kind == "txt2img":
            width, height = self.width or model.native_size, self.height or model.native_size
            if self.hires_scale is not None:
                hw, hh = hires_size(width, self.hires_scale, factor), hires_size(height, self.hires_scale, factor)
                if max(hw, hh) > (limits or Limits()).max_side:
                    problems.append(("hires_scale", f"makes {hw}x{hh}, past the {(limits or Limits()).max_side} "
                                                    "pixel limit"))
        elif self.kind == "inpaint" and self.only_masked:  # the mask's box is worked at this size
            width, height = self.width or model.native_size, self.height or model.native_size
        else:
            width, height = _image_size(self.image)
        levels = len(model.unet.config.block_out_channels) if self.cache_interval > 1 else 0
        if self.cache_interval > 1 and not 0 <= self.cache_depth < levels:
            problems.append(("cache_depth", f"must be between 0 and {levels - 1} for this U-Net ({levels} "
                                            f"resolution levels), got {self.cache_depth}"))
        if not model.is_sdxl:
            for name in ("prompt_2", "negative_2"):
                if getattr(self, name) is not None:
                    problems.append((name, f"applies to SDXL models (two text encoders); {model.name} is "
                                           f"{model.arch}"))
        if problems:
            raise RequestError(problems)
        per_prompt = len(self.prompts())
        prompts = self._each(self.prompt, per_prompt)
        negatives = self._each(self.negative, per_prompt)
        prompts_2 = self._each(self.prompt_2, per_prompt) if self.prompt_2 is not None else prompts
        negatives_2 = self._each(self.negative_2, per_prompt) if self.negative_2 is not None else negatives
        if self.seeds is not None:
            seeds = [int(s) for s in self.seeds]
        else:  # image i of iteration k: seed + k x batch + i, as A1111 numbers them
            seed = random_seed() if self.seed is None else self.seed
            seeds = [seed + i for i in range(len(prompts) * self.n_iter)]
        subseeds = None
        if self.subseed_strength > 0:
            sub = random_seed() if self.subseed is None else self.subseed
            subseeds = [sub + i for i in range(len(seeds))]
        return Resolved(request=self, kind=self.kind, prompts=prompts, negatives=negatives, seeds=seeds,
                        loras=tuple(self.lora_set(limits)[0]), lora_limits=limits,
                        upscaler=upscaler_path(self.hires_upscaler, limits or Limits()) if self.hires_scale else None,
                        prompts_2=prompts_2, negatives_2=negatives_2,
                        sampler=sampler, schedule=schedule, steps=steps, guidance=guidance,
                        guidance_rescale=self.guidance_rescale, clip_skip=self.clip_skip,
                        eta=self.eta, width=width, height=height, strength=strength, run_steps=run_steps,
                        subseeds=subseeds)


@dataclass(frozen=True)
class Resolved:
    """A request with nothing left to choose: one prompt, negative prompt and seed per image."""
    request: Request
    kind: str
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    sampler: str
    schedule: str           # "default" or a sigma schedule (ldm.schedule.SCHEDULES)
    clip_skip: int
    steps: int
    guidance: float
    guidance_rescale: float
    eta: float
    width: int
    height: int
    strength: float | None
    run_steps: int          # sampler steps that run (fewer than ``steps`` at a strength below 1)
    subseeds: list[int] | None = None  # variation seeds, one per image (with subseed_strength > 0)
    prompts_2: list[str] = field(default_factory=list)    # SDXL's second encoder (the prompts by default)
    negatives_2: list[str] = field(default_factory=list)
    loras: tuple = ()       # (file, text-encoder weight, U-Net weight) per LoRA applied (Request.lora_set)
    lora_limits: Limits | None = None  # ... under these limits (their LoRA folder names the tags' files)
    hires_base: int | None = None  # a hires pass: the first pass's steps (prompt editing counts them first)
    upscaler: Path | None = None   # the hires fix's model upscaler file (hires_upscaler names one)

    def settings(self) -> dict:
        """What the PNG metadata records."""
        s = dict(steps=self.steps, sampler=self.sampler, guidance=self.guidance, width=self.width,
                 height=self.height, schedule=self.schedule)
        q = self.request
        if self.clip_skip != 1:
            s["clip_skip"] = self.clip_skip
        if q.cache_interval > 1:
            s.update(cache_interval=q.cache_interval, cache_depth=q.cache_depth)
        if q.clip_guidance_scale:
            s.update(clip_guidance_scale=q.clip_guidance_scale)
        if self.subseeds:
            s.update(subseed=self.subseeds[0], subseed_strength=q.subseed_strength)
        if q.hires_scale is not None:
            s.update(hires_scale=q.hires_scale, hires_strength=q.hires_strength, hires_upscaler=q.hires_upscaler,
                     hires_steps=q.hires_steps)
        if self.strength is not None:
            s["strength"] = self.strength
        extra = {}  # recorded under A1111's own names
        if q.kind == "inpaint":
            extra = {"Mask blur": q.mask_blur, "Masked content": q.inpaint_fill.replace("-", " "),
                     "Mask mode": "Inpaint not masked" if q.mask_invert else None,
                     "Inpaint area": "Only masked" if q.only_masked else None,
                     "Masked area padding": q.only_masked_padding if q.only_masked else None}
        if q.kind != "txt2img" and q.noise_multiplier != 1:
            extra["Noise multiplier"] = q.noise_multiplier
        if q.s_noise != OPTIONS["s_noise"].default:
            extra["Sigma noise"] = q.s_noise
        if any(v is not None for v in extra.values()):
            s["a1111"] = {k: v for k, v in extra.items() if v is not None}
        for i, u in enumerate(q.controls):  # as A1111's ControlNet extension writes its units
            model = u.get("model")
            name = Path(model).name if isinstance(model, (str, Path)) else type(model).__name__
            mode = A1111_CONTROL_MODES[u.get("mode", "balanced")]
            s[f"ControlNet {i}"] = (f"Module: {u.get('preprocessor', 'none')}, Model: {name}, "
                                    f"Weight: {u.get('weight', 1.0):g}, Resize Mode: {u.get('resize', 'just-resize')}, "
                                    f"Guidance Start: {u.get('start', 0.0):g}, Guidance End: {u.get('end', 1.0):g}, "
                                    f"Control Mode: {mode}"
                                    + (", Threshold A: {:g}, Threshold B: {:g}".format(*canny_thresholds(u))
                                       if u.get("preprocessor") == "canny" else ""))
        return s

    def with_task(self, prompt: str, seeds: list[int]) -> "Resolved":
        """The same settings for another prompt and seeds (one batch of a prompt file)."""
        n = len(seeds)
        neg = self.negatives[0] if self.negatives else ""
        neg_2 = self.negatives_2[0] if self.negatives_2 else neg
        prompt_2 = prompt if self.request.prompt_2 is None else self.prompts_2[0]
        subseeds = None if self.subseeds is None else [self.subseeds[0] + s - self.seeds[0] for s in seeds]
        loras, problems = dataclasses.replace(self.request, prompt=prompt).lora_set(self.lora_limits)
        if problems:  # this prompt's own <lora:...> tags
            raise RequestError(problems)
        return dataclasses.replace(self, prompts=[prompt] * n, loras=tuple(loras), negatives=[neg] * n, seeds=list(seeds),
                                   prompts_2=[prompt_2] * n, negatives_2=[neg_2] * n, subseeds=subseeds)

    def progress_steps(self) -> int:
        """Sampler steps one batch runs: the run's, plus the hires pass's."""
        q = self.request
        if q.hires_scale is None:
            return self.run_steps
        return self.run_steps + strength_steps(q.hires_steps or self.steps, q.hires_strength)

    def iterations(self) -> list["Resolved"]:
        """One request per batch of an n_iter run (A1111's batch count), each with its own seeds."""
        n = len(self.prompts)
        if len(self.seeds) == n:
            return [self]
        return [dataclasses.replace(self, seeds=self.seeds[k:k + n],
                                    subseeds=None if self.subseeds is None else self.subseeds[k:k + n])
                for k in range(0, len(self.seeds), n)]


def hires_size(side: int, scale: float, factor: int = 8) -> int:
    """A side after the hires fix's upscale, down to a multiple of the VAE factor (as A1111 rounds)."""
    return int(side * scale) // factor * factor


def upscaler_path(name: str, limits: Limits) -> Path | None:
    """The model upscaler file a hires_upscaler names (None for latent and lanczos, or no such file)."""
    from ldm.upscalers import upscaler_files

    if name in HIRES_UPSCALERS or not isinstance(name, str):
        return None
    if limits.upscalers_dir is not None:
        files = upscaler_files(limits.upscalers_dir)
        if name in files:
            return files[name]
    return Path(name) if limits.lora_paths and Path(name).is_file() else None


def upscaler_problem(name, limits: Limits) -> str | None:
    """Why ``name`` is no upscaler this request may use; None when it is one."""
    from ldm.upscalers import SUFFIXES, upscaler_files

    if name in HIRES_UPSCALERS:
        return None
    if not isinstance(name, str) or not name:
        return f"must be latent, lanczos or a model upscaler's name, got {name!r}"
    path = upscaler_path(name, limits)
    if path is None:
        names = [*HIRES_UPSCALERS, *(upscaler_files(limits.upscalers_dir) if limits.upscalers_dir else ())]
        where = "" if limits.upscalers_dir else (" (model upscalers are named from --upscalers-dir" +
                                                 (", or given as a file's path)" if limits.lora_paths else ")"))
        return f"no upscaler {name!r}; available: {', '.join(names)}{where}"
    if path.suffix not in SUFFIXES:
        return f"{str(path)!r} is not an upscaler file ({', '.join(SUFFIXES)})"
    if path.suffix != ".safetensors" and not limits.allow_pickle:
        return (f"upscaler {name!r} is a pickle file ({path.suffix}), refused by default: use its .safetensors, "
                "or --allow-pickle if you trust where it came from")
    return None


def lora_files(folder: Path) -> dict[str, Path]:
    """The LoRA files of a folder and its subfolders (as A1111 lists them) by file name."""
    return {p.name: p for p in sorted(Path(folder).rglob("*.safetensors")) if p.is_file()}


def unit_problems(unit: dict, index: int, group: str, options: dict) -> list[tuple[str, str]]:
    """The problems of one ControlNet or T2I-Adapter unit (``group`` control or adapter), by its
    command-line names (controlnet / adapter, <group>_image, <group>_<option>); ``index`` says which unit
    when there are several."""
    which = f" (unit {index})" if index else ""
    model_field = "controlnet" if group == "control" else "adapter"
    what = "ControlNet" if group == "control" else "T2I-Adapter"
    problems = []
    unknown = sorted(set(unit) - {"model", "image", *options})
    if unknown:
        problems.append((model_field, f"unknown unit field(s) {', '.join(unknown)}{which}"))
    model = unit.get("model")
    files = group == "control"  # a ControlNet may be one .safetensors file
    if files and isinstance(model, str):
        model = controlnet_named(model)  # a path, or the name of an embedded one (shapes)
    if model is None or not (isinstance(model, torch.nn.Module) or Path(model).is_dir() or
                             files and Path(model).suffix == ".safetensors" and Path(model).is_file()):
        problems.append((model_field, f"{str(model)!r} is neither a {what} directory (diffusers' layout)"
                                      f"{' nor a .safetensors file' if files else ''}{which}"))
    image = unit.get("image")
    if image is None:
        problems.append((f"{group}_image", f"required: the image of each {what}{which}"))
    elif isinstance(image, (str, Path)) and not Path(image).is_file():
        problems.append((f"{group}_image", f"{str(image)!r} is not an image file{which}"))
    for name, option in options.items():
        if (msg := option.problem(unit.get(name, option.default))) is not None:
            problems.append((f"{group}_{name}", msg + which))
    if group == "control":
        start, end = unit.get("start", 0.0), unit.get("end", 1.0)
        if not any(f in ("control_start", "control_end") for f, _ in problems) and not start < end:
            problems.append(("control_start", f"must be below control_end: {start} >= {end}{which}"))
    if not any(f.startswith(f"{group}_canny") for f, _ in problems):  # both in range: in order?
        low, high = canny_thresholds(unit)
        if low > high:
            problems.append((f"{group}_canny_low", f"must not be above {group}_canny_high: {low:g} > {high:g}{which}"))
    return problems


def sampler_fit(sampler: str, schedule: str | None, eta, s_noise=1.0) -> list[tuple[str, str]]:
    """The one rule of what a sampler takes: eta only the stochastic samplers, s_noise other than 1 the
    ancestral and SDE ones, a sigma schedule only the samplers that run on one (a value that is not a
    number is its option's own problem)."""
    problems = []
    for name, value, flag in (("eta", eta, "takes_eta"), ("s_noise", s_noise, "takes_s_noise")):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and value != OPTIONS[name].default and not getattr(SAMPLERS[sampler], flag):
            problems.append((name, f"applies to the {', '.join(n for n, s in SAMPLERS.items() if getattr(s, flag))} "
                                   f"samplers, not {sampler}"))
    if schedule not in (None, "default") and sampler not in SCHEDULE_SAMPLERS:
        problems.append(("schedule", f"the {schedule} schedule applies to the {', '.join(SCHEDULE_SAMPLERS)} "
                                     f"samplers, not {sampler}"))
    return problems


def _image_size(image) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size
