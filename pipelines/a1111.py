"""AUTOMATIC1111's HTTP API on ``ldm serve``, so that its clients (editor plug-ins, bots, ``webuiapi``)
work unchanged: the same routes under ``/sdapi/v1``, payload names and answers.

    POST /sdapi/v1/txt2img     A1111's payload -> {"images": [base64 PNG], "parameters": {...}, "info": "<json>"}
    POST /sdapi/v1/img2img     the same plus init_images, denoising_strength and (inpainting) mask
    GET  /sdapi/v1/samplers    [{"name", "aliases", "options"}] in A1111's names
    GET  /sdapi/v1/schedulers  [{"name", "label", "aliases", ...}]
    GET  /sdapi/v1/sd-models   the models of --models-dir (and the one given at start)
    GET  /sdapi/v1/options     the settings; POST sets them (sd_model_checkpoint switches the model, sd_vae the VAE)
    GET  /sdapi/v1/progress    the running job's progress
    POST /sdapi/v1/png-info    the parameters an image carries
    POST /sdapi/v1/interrupt   stop the running job (its request answers with what it had: no images)
    POST /sdapi/v1/skip        drop the running batch of the job; its next batch (n_iter) runs
    GET  /sdapi/v1/scripts     no scripts (clients ask before they send)
    GET  /sdapi/v1/sd-vae      the VAEs of --vae-dir
    POST /sdapi/v1/extra-single-image, /extra-batch-images   the extras tab's upscaling (filters, model upscalers)
    GET  /sdapi/v1/loras, /embeddings, /upscalers, /latent-upscale-modes, /memory, /cmd-flags, and empty
         /prompt-styles, /face-restorers, /hypernetworks; POST /sdapi/v1/refresh-loras, -checkpoints, -embeddings

Requests go through the same :class:`pipelines.request.Request`, limits and queue as ``/api``. Fields
A1111 accepts that do not apply here (styles, restore_faces, scripts, ...) are ignored with a warning
in the log; bad values get a 422 that names the field as A1111 names it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
import logging
import time

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ldm.names import A1111_CONTROL_MODES, A1111_RESIZE_MODES, A1111_SAMPLERS, A1111_SCHEDULES, ALIASES, SCHEDULE_SAMPLERS
from ldm.samplers import SAMPLERS

from . import request as rq
from .options import OPTIONS, canny_thresholds
from .pngmeta import exif_parameters, image_parameters, parse_parameters, png_bytes

log = logging.getLogger("ldm.serve.a1111")

# our Request's field -> A1111's payload name (for error messages), as pipelines/options.py declares them
FIELD_NAMES = {"prompt": "prompt", "image": "init_images",
               **{name: o.a1111 for name, o in OPTIONS.items() if o.a1111 is not None}}

# A1111's payload fields that have no effect here, with the value that means "off"; another value is
# ignored with a warning
INERT = {"styles": [], "restore_faces": False, "tiling": False, "do_not_save_samples": False,
         "do_not_save_grid": False, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "script_name": None,
         "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
         "seed_resize_from_h": 0, "seed_resize_from_w": 0, "firstphase_width": 0, "firstphase_height": 0,
         "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
         "hr_negative_prompt": "", "sampler_index": None, "refiner_checkpoint": None, "refiner_switch_at": None,
         "image_cfg_scale": None, "resize_mode": 0, "include_init_images": False, "infotext": None,
         "disable_extra_networks": False, "comments": None, "force_task_id": None, "latent_mask": None,
         "override_settings_restore_afterwards": True}
# A1111's settings (/sdapi/v1/options, override_settings) that mean something here: type, A1111's default,
# the values allowed, and what they do. Any other setting is kept and listed as meaning nothing here.
SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")
SETTINGS = {
    "sd_model_checkpoint": (str, None, None, "the model (a name of /sdapi/v1/sd-models): switches it"),
    "sd_vae": (str, "Automatic", None, "the VAE (a name of /sdapi/v1/sd-vae; Automatic or None: the model's own): "
                                       "switches it"),
    "CLIP_stop_at_last_layers": (int, 1, (1, 12), "clip skip of requests that give none"),
    "eta_ddim": (float, 0.0, (0, 1), "DDIM's eta when a request gives none"),
    "eta_ancestral": (float, 1.0, (0, 1), "the ancestral and SDE samplers' eta when a request gives none"),
    "s_noise": (float, OPTIONS["s_noise"].default, (OPTIONS["s_noise"].low, OPTIONS["s_noise"].high),
                "the fresh noise's scale for Euler a, DPM++ SDE and DPM++ 2M SDE (A1111 takes it from the settings, "
                "not the payload)"),
    "samples_format": (str, "png", SAMPLES_FORMATS, "the format of the images answered (and their parameters: "
                                                    "a PNG chunk, or EXIF for jpg / webp)"),
}
SETTINGS_USED = set(SETTINGS)
SWITCHES = ("sd_model_checkpoint", "sd_vae")  # settings that load weights (on the worker), not kept values
# A1111's UI settings that clients read before they write them back (its defaults): kept, no effect here
UI_SETTINGS = {"send_seed": True, "send_size": True}
# the extras tab's image upscalers (A1111's names) here: PIL's resampling filters; "None" leaves the image
EXTRAS_UPSCALERS = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


def setting_problem(name: str, value) -> str | None:
    """Why ``value`` cannot be A1111's setting ``name`` (None when it can, or when the setting means nothing
    here)."""
    if name not in SETTINGS:
        return None
    tp, _, allowed, _ = SETTINGS[name]
    ok = isinstance(value, str) if tp is str else (not isinstance(value, bool) and isinstance(
        value, int if tp is int else (int, float)))
    if not ok:
        return f"must be {'a string' if tp is str else 'an integer' if tp is int else 'a number'}, got {value!r}"
    if isinstance(allowed, tuple) and tp is str and value.lower() not in allowed:
        return f"must be one of {', '.join(allowed)}, got {value!r}"
    if isinstance(allowed, tuple) and tp is not str and not allowed[0] <= value <= allowed[1]:
        return f"must be from {allowed[0]} to {allowed[1]}, got {value!r}"
    return None


class Txt2ImgPayload(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img fields that this project runs; any other is accepted
    and ignored with a warning (A1111's clients send many). Types are A1111's (lax: ``"20"`` is 20 steps,
    as its clients may send), but a boolean is never a number: ``"steps": true`` is refused."""
    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value, info):
        flag = info.field_name == "inpainting_mask_invert"  # an int that A1111 uses as a flag: true is 1
        if isinstance(value, bool) and not flag and cls.model_fields[info.field_name].annotation in (
                int, float, int | None, float | None):
            raise ValueError("a number is expected, not true or false")
        return value
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    cfg_scale: float = 7.0
    sampler_name: str | None = None
    scheduler: str | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    denoising_strength: float | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    override_settings: dict = {}


class Img2ImgPayload(Txt2ImgPayload):
    init_images: list[str] = []
    mask: str | None = None
    mask_blur: int = 4
    inpainting_mask_invert: int = 0
    inpainting_fill: int = 0             # A1111's API default: fill (its UI's: original)
    inpaint_full_res: bool = True        # A1111's API default: only the masked region
    inpaint_full_res_padding: int = 0
    initial_noise_multiplier: float | None = None


# A1111's control and resize modes, by its numbers (the order of the tables) and by its names
CONTROL_MODES = {**dict(enumerate(A1111_CONTROL_MODES)), **{v: k for k, v in A1111_CONTROL_MODES.items()}}
RESIZE_MODES = {**dict(enumerate(A1111_RESIZE_MODES)), **{v: k for k, v in A1111_RESIZE_MODES.items()}}
# A1111's ControlNet modules that mean one of ours (its preprocessor names; "invert (from white bg & black line)")
MODULES = {"none": "none", "canny": "canny", "threshold": "threshold", "invert": "invert",
           "invert (from white bg & black line)": "invert"}
UNIT_IGNORED = ("mask", "low_vram", "processor_res", "pixel_perfect", "hr_option")


def controlnet_args(payload: BaseModel) -> list | None:
    """The units of A1111's ControlNet extension in a payload (``alwayson_scripts: {"ControlNet": {"args":
    [unit, ...]}}``, the script name in any case), or None."""
    scripts = (payload.model_extra or {}).get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        return None
    for name, value in scripts.items():
        if name.lower() == "controlnet":
            return (value or {}).get("args", []) if isinstance(value, dict) else []
    return None


def canny_options(threshold_a, threshold_b) -> dict:
    """The extension's threshold_a / _b as canny's unit options (pipelines.options): each one given, -1 or
    absent leaving the default."""
    return {ours: v for ours, v in (("canny_low", threshold_a), ("canny_high", threshold_b)) if v not in (None, -1)}


def control_units(args: list, known: dict, bad_request) -> list[dict]:
    """A1111's ControlNet units as this project's (pipelines.options.CONTROL_OPTIONS), images still base64:
    a model named as A1111 lists them ("name [hash]", with or without its extension) from the server's
    --controlnet-dir; modes and resize modes by A1111's numbers or names; fields with no effect here are
    ignored with a warning; a bad value is ``bad_request`` naming the unit's field."""
    units = []
    stems = {Path(n).stem: n for n in known}
    for i, raw in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(raw, dict):
            raise bad_request(where, "a unit is a JSON object")
        if not raw.get("enabled", True):
            continue
        image = raw.get("image") or raw.get("input_image")
        if isinstance(image, dict):  # {"image": ..., "mask": ...}, as the extension also takes it
            image = image.get("image")
        if not image:
            raise bad_request(f"{where}.image", "required: the unit's control image as base64")
        model = str(raw.get("model", "None")).split(" [")[0]
        name = model if model in known else stems.get(Path(model).stem)
        if name is None:
            raise bad_request(f"{where}.model", f"no ControlNet {model!r} in the server's --controlnet-dir; "
                                                f"available: {', '.join(known) or 'none'}")
        module = raw.get("module", "none")
        if module not in MODULES:
            raise bad_request(f"{where}.module", f"{module!r} is not a preprocessor here; use one of "
                                                 f"{', '.join(MODULES)}")
        mode = CONTROL_MODES.get(raw.get("control_mode", 0))
        resize = RESIZE_MODES.get(raw.get("resize_mode", "Crop and Resize"))
        if mode is None or resize is None:
            field = "control_mode" if mode is None else "resize_mode"
            raise bad_request(f"{where}.{field}", f"{raw.get(field)!r} is not one of A1111's values")
        ignored = [k for k in UNIT_IGNORED if raw.get(k) not in (None, False, "", 512, 64, -1, "Both")]
        if ignored:
            log.warning("ControlNet unit %d: %s ignored (no effect here)", i, ", ".join(ignored))
        unit = {"model": name, "image": image, "weight": raw.get("weight", 1.0),
                "start": raw.get("guidance_start", 0.0), "end": raw.get("guidance_end", 1.0),
                "mode": mode, "preprocessor": MODULES[module], "resize": resize}
        if MODULES[module] == "canny":
            unit.update(canny_options(raw.get("threshold_a"), raw.get("threshold_b")))
        units.append(unit)
    return units


def _warn_ignored(payload: BaseModel):
    fields = dict(payload.model_extra or {})
    scripts = fields.get("alwayson_scripts")
    if isinstance(scripts, dict):  # the ControlNet script runs here; any other is ignored
        rest = {k: v for k, v in scripts.items() if k.lower() != "controlnet"}
        fields["alwayson_scripts"] = rest if rest else {}
    if payload.sampler_name is None or fields.get("sampler_index") in (None, payload.sampler_name):
        fields.pop("sampler_index", None)  # the old name of sampler_name: used when sampler_name is not given
    for k in ("seed_resize_from_h", "seed_resize_from_w"):  # A1111 resizes seeds only from a side > 0
        if isinstance(fields.get(k), (int, float)) and fields[k] <= 0:
            fields.pop(k)
    ignored = [k for k, v in fields.items() if k not in INERT or v != INERT[k] and v not in (None, [], {}, "")]
    for k, v in (payload.override_settings or {}).items():
        if k not in SETTINGS_USED:
            ignored.append(f"override_settings.{k}")
    if ignored:
        log.warning("A1111 fields ignored (no effect here): %s", ", ".join(sorted(ignored)))


def _image(data: str, field: str, studio, mode: str = "RGB") -> Image.Image:
    """A base64 image of the payload, the errors naming A1111's field."""
    return studio.read_image(data, field).convert(mode)


def _images(payload: "Img2ImgPayload", studio, bad_request):
    """The payload's init image and mask, decoded, the mask blurred and inverted as asked, both resized
    to the payload's size when it gives one (A1111's resize_mode 0, "just resize")."""
    image = _image(payload.init_images[0], "init_images", studio)
    mask = _image(payload.mask, "mask", studio, "L") if payload.mask else None  # inverted and blurred by the pipeline
    size = (payload.width, payload.height)
    only_masked = mask is not None and payload.inpaint_full_res  # the box is worked at the size; the image keeps its
    if ("width" in payload.model_fields_set or "height" in payload.model_fields_set) and not only_masked:
        limit = studio.limits.max_side
        if max(size) > limit or min(size) < 1:
            raise bad_request("width", f"{size[0]}x{size[1]}: sides must be from 1 to {limit}")
        if image.size != size:
            image = image.resize(size, Image.LANCZOS)
        if mask is not None and mask.size != size:
            mask = mask.resize(size, Image.LANCZOS)
    return image, mask


def _upscaler(name: str | None) -> str:
    """A1111's hr_upscaler in this project's terms: its Latent variants the bilinear latent upscale, its
    image filters Lanczos; any other name a model upscaler of --upscalers-dir (checked with the request)."""
    if name is None or name.lower().startswith("latent"):
        if name not in (None, "Latent"):
            log.warning("hr_upscaler %r: upscaling the latents bilinearly (Latent)", name)
        return "latent"
    if name in EXTRAS_UPSCALERS:
        if name != "Lanczos":
            log.warning("hr_upscaler %r: upscaling the image with Lanczos", name)
        return "lanczos"
    return name


def to_request(p: Txt2ImgPayload, kind: str = "txt2img", image=None, mask=None) -> rq.Request:
    """A1111's payload as this project's request."""
    _warn_ignored(p)
    o = p.override_settings or {}
    hires = {}
    if kind == "txt2img" and p.enable_hr:
        scale = p.hr_scale
        if p.hr_resize_x or p.hr_resize_y:  # a target size instead of a scale (0: from the other side)
            bad = [(n, f"must be 0 (from the other side) or a size from the first pass's {side} px up, got {v}")
                   for n, v, side in (("hr_resize_x", p.hr_resize_x, p.width), ("hr_resize_y", p.hr_resize_y, p.height))
                   if v < 0 or 0 < v < side]
            if bad:
                raise rq.RequestError(bad)
            scale = max(p.hr_resize_x / max(p.width, 1), p.hr_resize_y / max(p.height, 1))
        hires = dict(hires_scale=scale, hires_upscaler=_upscaler(p.hr_upscaler),
                     hires_strength=0.7 if p.denoising_strength is None else p.denoising_strength,
                     hires_steps=p.hr_second_pass_steps or None)
    strength = None
    inpainting = {}
    if kind != "txt2img":
        strength = 0.75 if p.denoising_strength is None else p.denoising_strength
        if p.initial_noise_multiplier is not None:
            inpainting["noise_multiplier"] = p.initial_noise_multiplier
    if kind == "inpaint":
        fills = OPTIONS["inpaint_fill"].choices
        if isinstance(p.inpainting_fill, int) and 0 <= p.inpainting_fill < len(fills):
            fill = fills[p.inpainting_fill]
        else:
            fill = p.inpainting_fill  # refused by the request's check, named
        inpainting.update(mask_blur=p.mask_blur, mask_invert=bool(p.inpainting_mask_invert), inpaint_fill=fill,
                          only_masked=bool(p.inpaint_full_res), only_masked_padding=p.inpaint_full_res_padding)

    sampler = p.sampler_name or (p.model_extra or {}).get("sampler_index")  # A1111's older name for it
    sized = kind == "txt2img" or inpainting.get("only_masked", False)
    return rq.Request(prompt=p.prompt, kind=kind, negative=p.negative_prompt, sampler=sampler,
                      schedule=p.scheduler, steps=p.steps, guidance=p.cfg_scale, seed=None if p.seed == -1 else p.seed,
                      # the size made, or with only the masked region worked, the size it is worked at
                      width=p.width if sized else None, height=p.height if sized else None,
                      batch_size=p.batch_size, n_iter=p.n_iter, subseed=None if p.subseed == -1 else p.subseed,
                      subseed_strength=p.subseed_strength, eta=0.0 if p.eta is None else p.eta,
                      s_noise=float(o.get("s_noise", 1.0)),
                      clip_skip=int(o.get("CLIP_stop_at_last_layers", 1)), strength=strength, image=image, mask=mask,
                      **hires, **inpainting)


def _eta_for(sampler: str | None, eta: float | None) -> float:
    """A1111 sends eta with every request (webuiapi: 1.0); it only means something to the samplers
    that take it, so it is dropped for the others instead of refused."""
    if eta is None or sampler is None:
        return 0.0
    ours, _ = rq.Request(sampler=sampler).sampler_schedule()  # None for an unknown name (refused later)
    return eta if ours is not None and not any(f == "eta" for f, _ in rq.sampler_fit(ours, None, eta)) else 0.0


def _s_noise_for(sampler: str | None, s_noise: float) -> float:
    """The settings' s_noise where the sampler takes it (A1111 passes it to those alone), else 1."""
    ours, _ = rq.Request(sampler=sampler).sampler_schedule() if sampler else (None, None)
    return s_noise if ours is not None and not rq.sampler_fit(ours, None, 0.0, s_noise) else 1.0


def _problems_as_a1111(response):
    """Our field names in a 422 rewritten as A1111's payload names."""
    if not isinstance(response, JSONResponse) or response.status_code != 422:
        return response
    body = json.loads(response.body)
    for d in body.get("detail", []):
        d["field"] = FIELD_NAMES.get(d["field"], d["field"])
    body["error"] = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"]
                              for d in body.get("detail", []))
    return JSONResponse(body, status_code=422)


def answer(result: dict, payload: BaseModel, req: rq.Request, studio) -> dict:
    """A1111's answer: images, the payload echoed, and ``info`` as a JSON string."""
    seeds, params = result["seeds"], result["parameters"]
    settings = parse_parameters(params[0]) if params else {}
    info = {"prompt": req.prompt, "all_prompts": [req.prompt] * len(seeds), "negative_prompt": req.negative or "",
            "all_negative_prompts": [req.negative or ""] * len(seeds), "seed": seeds[0] if seeds else -1,
            "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
            "subseed_strength": req.subseed_strength, "width": int(settings.get("Size", "0x0").split("x")[0]),
            "height": int(settings.get("Size", "0x0").split("x")[1]), "sampler_name": settings.get("Sampler"),
            "scheduler": settings.get("Schedule type"), "cfg_scale": float(settings.get("CFG scale", 0)),
            "steps": int(settings.get("Steps", 0)), "batch_size": req.batch_size, "restore_faces": False,
            "sd_model_name": result.get("model_name") or studio.current_model(), "sd_model_hash": None, "denoising_strength":
                float(settings["Denoising strength"]) if "Denoising strength" in settings else 0,
            "clip_skip": req.clip_skip, "extra_generation_params": {}, "index_of_first_image": 0,
            "infotexts": params, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "is_using_inpainting_conditioning": req.kind == "inpaint" and studio.pipe.model.is_inpainting}
    if "Variation seed" in settings:
        subs = [int(parse_parameters(t)["Variation seed"]) for t in params]
        info.update(subseed=subs[0], all_subseeds=subs)
    images = result["images"]
    fmt = studio.a1111_settings.get("samples_format", "png")
    if fmt != "png":
        images = [encode_as(b64, text, fmt) for b64, text in zip(images, params)]
    return {"images": images, "parameters": payload.model_dump(), "info": json.dumps(info)}



def encode_as(b64_png: str, parameters: str, fmt: str) -> str:
    """A base64 PNG re-encoded as JPEG or WebP (A1111's samples_format), its parameters in the EXIF
    UserComment (UNICODE, UTF-16 big-endian: where A1111 writes them and its PNG Info reads them)."""
    import io

    with Image.open(io.BytesIO(base64.b64decode(b64_png))) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else "WEBP", quality=95, exif=exif_parameters(parameters))
    return base64.b64encode(buf.getvalue()).decode()


def add_routes(app: FastAPI, studio, *, execute, call_on_worker, error, bad_request, control_unit):
    """The routes on ``app``, over the studio's queue: ``execute``, ``call_on_worker``, ``error``, the
    ``bad_request`` exception and the ``control_unit`` body are pipelines.serve's (handed in, so that this
    module imports none of it)."""
    _error, BadRequest, ControlUnit = error, bad_request, control_unit
    # the settings A1111 clients set (POST /sdapi/v1/options), kept on the studio
    studio.a1111_settings = {k: v[1] for k, v in SETTINGS.items() if k not in SWITCHES}
    studio.a1111_inert = dict(UI_SETTINGS)

    async def generate(payload: Txt2ImgPayload, request: Request, kind: str, image=None, mask=None):
        o = payload.override_settings or {}
        bad = [(f"override_settings.{k}", m) for k, v in o.items() if (m := setting_problem(k, v))]
        if bad:
            return _error(422, bad)
        settings = {**studio.a1111_settings, **o}
        eta = payload.eta
        if eta is None:  # the settings' eta of the sampler's kind
            ours, _ = rq.Request(sampler=payload.sampler_name).sampler_schedule() if payload.sampler_name else (None, None)
            eta = settings["eta_ddim"] if ours == "ddim" else settings["eta_ancestral"]
        payload = payload.model_copy(update={"eta": _eta_for(payload.sampler_name, eta), "override_settings": {
            **o, "CLIP_stop_at_last_layers": settings["CLIP_stop_at_last_layers"],
            "s_noise": _s_noise_for(payload.sampler_name, settings["s_noise"])}})
        model = o.get("sd_model_checkpoint")  # the job's own model and VAE, switched and restored on the worker
        vae = o.get("sd_vae")
        restore = (payload.model_extra or {}).get("override_settings_restore_afterwards", True)
        try:
            req = to_request(payload, kind, image, mask)
        except rq.RequestError as exc:
            return _error(422, exc.problems)
        units = controlnet_args(payload)
        if units:
            try:
                controls = control_units(units, studio.controlnets(), BadRequest)
                if controls:  # decoded off the event loop, sizes read from the headers first
                    body = [ControlUnit(**u) for u in controls]
                    controls, adapters = await run_in_threadpool(studio.read_controls, body)
                    req = dataclasses.replace(req, controls=controls, adapters=adapters)
            except BadRequest as exc:
                return _error(422, [(exc.field, exc.message)])
            except ValidationError as exc:
                return _error(422, [("alwayson_scripts.controlnet.args", f"a unit's value has the wrong type: "
                                                                       f"{exc.errors()[0].get('msg')}")])
        result = await execute(studio, req, request, model=None if model is None else str(model), vae=vae,
                               restore_model=restore is not False,
                               interrupted=lambda: {"images": [], "parameters": [], "seeds": [], "model": None})
        if not isinstance(result, dict):
            return _problems_as_a1111(result)
        return answer(result, payload, req, studio)

    async def _switch(name: str):
        try:
            return await call_on_worker(studio, lambda: studio.switch_model(name))
        except BadRequest as exc:
            return _error(422, [(exc.field, exc.message)])

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(payload: Txt2ImgPayload, request: Request):
        return await generate(payload, request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(payload: Img2ImgPayload, request: Request):
        if not payload.init_images:
            return _error(422, [("init_images", "required: a list with one base64 image")])
        if len(payload.init_images) > 1:
            log.warning("init_images: %d images sent; the first is used", len(payload.init_images))
        try:  # decoded (size read from the header first) and resized off the server's event loop
            image, mask = await run_in_threadpool(_images, payload, studio, BadRequest)
        except BadRequest as exc:
            return _error(422, [(exc.field, exc.message)])
        return await generate(payload, request, "inpaint" if mask is not None else "img2img", image, mask)

    @app.get("/controlnet/model_list")
    async def controlnet_models():
        return {"model_list": list(studio.controlnets())}

    @app.get("/controlnet/module_list")
    async def controlnet_modules():
        return {"module_list": list(MODULES)}

    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": 2}

    @app.post("/controlnet/detect")
    async def controlnet_detect(body: dict):
        """The control maps of images by a module (the preview A1111's ControlNet extension gives)."""
        from ldm.control import preprocess

        module = body.get("controlnet_module", "none")
        images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
        if module not in MODULES:
            return _error(422, [("controlnet_module", f"{module!r} is not a preprocessor here; use one of "
                                                      f"{', '.join(MODULES)}")])
        if not isinstance(images, list) or not images:
            return _error(422, [("controlnet_input_images", "required: a list of base64 images")])

        thresholds = canny_thresholds(canny_options(body.get("controlnet_threshold_a"),
                                                    body.get("controlnet_threshold_b")))

        def detect():
            return [base64.b64encode(png_bytes(preprocess(studio.read_image(im, "controlnet_input_images"),
                                                          MODULES[module], thresholds), "")).decode("ascii")
                    for im in images]
        try:
            maps = await run_in_threadpool(detect)
        except BadRequest as exc:
            return _error(422, [(exc.field, exc.message)])
        return {"images": maps, "info": "Success"}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        aliases = {}
        for alias, ours in ALIASES.items():
            if ours in SAMPLERS:
                aliases.setdefault(ours, []).append(alias)
        return [{"name": A1111_SAMPLERS[n], "aliases": [n] + aliases.get(n, []),
                 "options": {"scheduler": "automatic"} if n in SCHEDULE_SAMPLERS else {}} for n in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        api = {"default": "uniform", "sgm-uniform": "sgm_uniform"}
        out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                "need_inner_model": False}]
        out += [{"name": api.get(k, k), "label": label, "aliases": [k], "default_rho": 7.0 if k == "karras" else -1,
                 "need_inner_model": False} for k, label in A1111_SCHEDULES.items()]
        return out

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():  # --vae-dir's VAEs (A1111's filename is a path; names only here)
        return [{"model_name": name, "filename": name} for name in studio.vae_files()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": name, "model_name": name.rsplit(".", 1)[0] if name.endswith(".safetensors") else name,
                 "hash": None, "sha256": None, "filename": path, "config": None}
                for name, path in studio.models().items()]

    def options_now() -> dict:
        pipe = studio.pipe
        sampler, steps, guidance = rq.sampling_defaults(pipe.model)
        return {**studio.a1111_inert, **studio.a1111_settings, "sd_model_checkpoint": studio.current_model(),
                "sd_vae": studio.vae_name,
                "sd_checkpoint_hash": None, "ldm_settings_used": {k: v[3] for k, v in SETTINGS.items()},
                "ldm_settings_ignored": sorted(studio.a1111_inert),
                "ldm_defaults": {"sampler": A1111_SAMPLERS.get(sampler, sampler), "steps": steps,
                                 "cfg_scale": guidance}}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options_now()

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict):
        """Every setting is kept; those that mean something here (SETTINGS) are checked first, all of them,
        and a wrong one changes nothing (422); the others are listed as ignored (ldm_settings_ignored)."""
        bad = [(k, m) for k, v in options.items() if (m := setting_problem(k, v))]
        if bad:
            return _error(422, bad)
        if "sd_model_checkpoint" in options:
            switched = await _switch(str(options["sd_model_checkpoint"]))
            if not isinstance(switched, str):
                return switched
        if "sd_vae" in options:
            try:
                switched = await call_on_worker(studio, lambda: studio.switch_vae(options["sd_vae"]))
            except BadRequest as exc:
                return _error(422, [(exc.field, exc.message)])
            if not isinstance(switched, str):
                return switched
        for k, v in options.items():
            if k in SETTINGS and k not in SWITCHES:
                studio.a1111_settings[k] = v.lower() if k == "samples_format" else v
            elif k not in SETTINGS:
                log.warning("A1111 setting %s kept, but it has no effect here", k)
                studio.a1111_inert[k] = v
        return None

    @app.get("/sdapi/v1/progress")
    async def progress():
        job = studio.current
        steps = job.steps if job else 0
        done = job.step if job else 0
        frac = done / steps if steps else 0.0
        elapsed = time.perf_counter() - studio._started if job else 0.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {"progress": round(frac, 4), "eta_relative": round(eta, 3),
                "state": {"skipped": False, "interrupted": bool(job and job.interrupted), "stopping_generation": False,
                          "job": job.id if job else "", "job_count": studio.waiting() + (1 if job else 0),
                          "job_timestamp": "0", "job_no": 0, "sampling_step": done, "sampling_steps": steps},
                "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        job = studio.current
        if job is not None:
            job.interrupted = True
            job.cancel.set()
        return None

    @app.post("/sdapi/v1/skip")
    async def skip():  # the running batch is dropped; the job's next batch (n_iter) runs
        job = studio.current
        if job is not None:
            job.skip.set()
        return None

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: dict):
        data = body.get("image")
        if not isinstance(data, str) or not data:
            return _error(422, [("image", "required: a base64 PNG")])
        if data.startswith("data:"):
            data = data.partition(",")[2]
        import binascii
        import io

        from PIL import UnidentifiedImageError
        try:
            with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
                text = image_parameters(im) or ""
        except (binascii.Error, ValueError):
            return _error(422, [("image", "not valid base64")])
        except UnidentifiedImageError:
            return _error(422, [("image", "not an image format Pillow reads (PNG, JPEG, WebP, ...)")])
        except Exception as exc:
            return _error(422, [("image", f"not a readable image: {type(exc).__name__}")])
        return {"info": text, "items": {"parameters": text} if text else {},
                "parameters": parse_parameters(text) if text else {}}

    @app.get("/sdapi/v1/loras")
    async def loras():
        folder = studio.lora_dir
        return [{"name": path.stem, "alias": path.stem, "path": str(path.relative_to(folder)), "metadata": {}}
                for path in studio.lora_files().values()]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        from ldm.embeddings import read_embeddings

        loaded = {}
        for file, tokens in studio.embeddings.items():
            try:
                vectors = read_embeddings(studio.embeddings_dir / file)
            except Exception:  # changed on disk since it was loaded: name it without its shape
                vectors = {}
            for token in tokens:
                v = vectors.get(token)
                v = v["clip_g"] if isinstance(v, dict) else v
                loaded[token] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                 "shape": None if v is None else int(v.shape[-1]),
                                 "vectors": None if v is None else int(v.shape[0])}
        skipped = {Path(f).stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                  "vectors": None} for f in studio.skipped_embeddings}
        return {"loaded": loaded, "skipped": skipped}

    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings():
        return await call_on_worker(studio, studio.load_embeddings)  # None, or the error's answer

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return None  # --lora-dir is read at each request: nothing is cached to refresh

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return None  # --models-dir is read at each request: nothing is cached to refresh

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        """The extras tab's upscalers: A1111's filters ("None" first), then --upscalers-dir's models with
        the scale their networks have (None for a pickle the server may not read)."""
        models = await run_in_threadpool(lambda: {n: studio.upscaler_scale(p) for n, p in studio.upscaler_files().items()})
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for n in EXTRAS_UPSCALERS] + [{"name": n, "model_name": n, "model_path": None, "model_url": None,
                                               "scale": scale} for n, scale in models.items()]

    def extras_job(body: dict, images: list):
        """A1111's extras on images (still base64): the problems found, else a job for the worker that
        upscales them by upscaling_resize (resize_mode 0) or to upscaling_resize_w x _h (resize_mode 1,
        cropped to fill with upscaling_crop) with upscaler_1 and, blended in by
        extras_upscaler_2_visibility, upscaler_2 (a filter, or a model of --upscalers-dir). Face restoration
        is not a feature here."""
        models, limits = studio.upscaler_files(), studio.request_limits()
        names = [body.get("upscaler_1", "None"), body.get("upscaler_2", "None")]
        bad = [(f, f"no upscaler {n!r}; available: {', '.join([*EXTRAS_UPSCALERS, *models])}")
               for f, n in zip(("upscaler_1", "upscaler_2"), names) if n not in EXTRAS_UPSCALERS and n not in models]
        bad += [(f, msg) for f, n in zip(("upscaler_1", "upscaler_2"), names)  # a pickle the server may not read
                if n in models and (msg := rq.upscaler_problem(n, limits)) is not None]
        mode, scale = body.get("resize_mode", 0), body.get("upscaling_resize", 2)
        w, h = body.get("upscaling_resize_w", 512), body.get("upscaling_resize_h", 512)
        visibility = body.get("extras_upscaler_2_visibility", 0)
        numbers = {"upscaling_resize": scale, "upscaling_resize_w": w, "upscaling_resize_h": h,
                   "extras_upscaler_2_visibility": visibility}
        bad += [(k, f"must be a number, got {v!r}") for k, v in numbers.items()
                if isinstance(v, bool) or not isinstance(v, (int, float))]
        if mode not in (0, 1):
            bad.append(("resize_mode", f"must be 0 (by upscaling_resize) or 1 (to upscaling_resize_w x _h), got {mode!r}"))
        if not images:
            bad.append(("imageList", "no image given"))
        if bad:
            return bad, None
        decoded = []
        for field, data in images:
            if not isinstance(data, str) or not data:
                return [(field, "required: a base64 image")], None
            try:
                decoded.append(studio.read_image(data, field))
            except BadRequest as exc:
                return [(exc.field, exc.message)], None
        limit = studio.limits.max_side
        sizes = [(round(im.width * scale), round(im.height * scale)) if mode == 0 else (int(w), int(h))
                 for im in decoded]
        for size in sizes:
            if not (1 <= min(size) and max(size) <= limit):
                return [("upscaling_resize" if mode == 0 else "upscaling_resize_w",
                         f"makes {size[0]}x{size[1]}; sides must be from 1 to {limit} (--max-side)")], None
        if any(body.get(k, 0) for k in ("gfpgan_visibility", "codeformer_visibility")):
            log.warning("extras: face restoration is not a feature here; ignored")

        def run():
            from ldm.upscalers import upscale

            def up(image, name, size):
                if name in models:  # a model: run until large enough, then Lanczos (A1111's way)
                    net = studio.pipe.upscaler(models[name])
                    resize = lambda im, sz: upscale(net, im, sz)  # noqa: E731
                elif EXTRAS_UPSCALERS[name] is None:
                    return image
                else:
                    resize = lambda im, sz: im.resize(sz, EXTRAS_UPSCALERS[name])  # noqa: E731
                if mode == 1 and body.get("upscaling_crop", True):  # cover the size, then crop its middle
                    k = max(size[0] / image.width, size[1] / image.height)
                    big = resize(image, (max(size[0], round(image.width * k)), max(size[1], round(image.height * k))))
                    x, y = (big.width - size[0]) // 2, (big.height - size[1]) // 2
                    return big.crop((x, y, x + size[0], y + size[1]))
                return resize(image, size)

            info = ", ".join(f"{k}: {v}" for k, v in (  # A1111's postprocessing parameters
                ("Postprocess upscale by", scale if mode == 0 else None),
                ("Postprocess upscale to", f"{int(w)}x{int(h)}" if mode == 1 else None),
                ("Postprocess upscaler", names[0]),
                ("Postprocess upscaler 2", names[1] if names[1] != "None" and visibility > 0 else None)) if v is not None)
            out = []
            for image, size in zip(decoded, sizes):
                first = up(image, names[0], size)
                if names[1] != "None" and visibility > 0 and first is not image:
                    first = Image.blend(first, up(image, names[1], size).resize(first.size), float(visibility))
                out.append(base64.b64encode(png_bytes(first, info)).decode())
            return out

        return [], run

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(body: dict):
        """A1111's extras tab on one image (extras_job)."""
        bad, job = await run_in_threadpool(extras_job, body, [("image", body.get("image"))])  # (decodes them)
        if bad:
            return _error(422, bad)
        out = await call_on_worker(studio, job)
        return {"html_info": "", "image": out[0]} if isinstance(out, list) else out

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(body: dict):
        """A1111's extras tab on several images: ``imageList`` of {data, name} (extras_job)."""
        items = body.get("imageList")
        if not isinstance(items, list):
            return _error(422, [("imageList", "required: a list of {\"data\": base64 image, \"name\": ...}")])
        bad, job = await run_in_threadpool(extras_job, body, [
            (f"imageList[{i}]", item.get("data") if isinstance(item, dict) else None) for i, item in enumerate(items)])
        if bad:
            return _error(422, bad)
        out = await call_on_worker(studio, job)
        return {"html_info": "", "images": out} if isinstance(out, list) else out

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():  # any "Latent ..." name upscales the latents bilinearly here
        return [{"name": "Latent"}]

    @app.get("/sdapi/v1/memory")
    async def memory():
        import psutil
        import torch

        vm = psutil.virtual_memory()
        out = {"ram": {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            out["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                           "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
                           "reserved": {"current": torch.cuda.memory_reserved(),
                                        "peak": torch.cuda.max_memory_reserved()}}
        else:
            out["cuda"] = {"error": "no CUDA device"}
        return out

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():  # what a client may read of how the server runs (no paths)
        return {"api": True, "nowebui": False, "listen": False, "device": str(studio.device or "auto"),
                "lora_dir": studio.lora_dir is not None, "embeddings_dir": studio.embeddings_dir is not None,
                "max_side": studio.limits.max_side, "max_batch": studio.limits.max_batch}

    # lists of features this project does not have, answered empty so that clients reading them at start go on
    for route in ("prompt-styles", "face-restorers", "hypernetworks", "realesrgan-models"):
        app.add_api_route(f"/sdapi/v1/{route}", lambda: [], methods=["GET"], name=route)

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}
