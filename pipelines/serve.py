"""``ldm serve``: a local web studio and HTTP API over one loaded model.

One process loads the model once. Requests go into a bounded queue and one worker runs them one
batch at a time on the model: under ``ldm serve`` the worker is the process's main thread and the
HTTP server runs in a second thread, because PyTorch's OpenMP kernels run several times slower when
started from a thread that is not the main one (docs/serve.md has the figures); a full queue answers
503 with ``Retry-After`` instead of piling up memory. Each image is written to the output folder as
soon as its batch is made (so a crash loses nothing already generated) and comes back as a base64 PNG
carrying its A1111 ``parameters`` chunk.
A client that goes away has its job cancelled: skipped if still queued, stopped at the next sampler
step if running.

    GET  /                 the studio page (pipelines/static/studio.html)
    GET  /api/openapi.json the API's schema
    GET  /api/health       liveness, queue length, counters
    GET  /api/models       the loaded model and its defaults, samplers, embeddings, LoRA files, limits
    GET  /api/progress     the running job's step and the queue length (the page's progress bar)
    POST /api/txt2img      JSON with the command line's parameters -> {"images": [base64 PNG], ...}
    POST /api/img2img      the same plus "image" (base64) and "strength"
    POST /api/edit         ``ldm edit``'s parameters (source_prompt, target_prompt, image, cross_replace, ...)
                           -> the edited image under "images", the source under "source"
    /sdapi/v1/...          AUTOMATIC1111's API (pipelines/a1111.py), for its existing clients

Embeddings (``--embeddings-dir``) are all loaded at start, as A1111 does: a prompt uses one by its
token. LoRA files (``--lora-dir``) are chosen per request, by name in ``lora`` or by ``<lora:NAME:WEIGHT>``
tags in the prompt (A1111's syntax): each is loaded once as a peft adapter and switched on at its
weight for the requests that ask for it, off for the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import queue
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from ldm.locate import EMBEDDED_CONTROLNETS, EMBEDDED_MODEL, embedded_controlnet
from ldm.images import decode_image
from ldm.names import DEFAULT_INVERSION, SCHEDULES
from ldm.samplers import SAMPLERS

from . import request as rq
from .a1111 import add_routes
from .limits import Limits
from .options import ADAPTER_OPTIONS, CONTROL_OPTIONS, EDIT_OPTIONS, OPTIONS, options_for
from .outputs import check_output_dir
from .pngmeta import png_bytes, save_png

AUTOMATIC_VAE = "Automatic"  # A1111's sd_vae for the model's own VAE ("None" means the same here)
AUTOMATIC_VAES = (AUTOMATIC_VAE, "None")

log = logging.getLogger("ldm.serve")

STATIC = Path(__file__).parent / "static"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_credentials(text: str | None, flag: str) -> list[tuple[str, str]]:
    """``user:pass[,user2:pass2]`` (A1111's --api-auth) as pairs; ValueError naming ``flag`` otherwise."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{flag}: expected user:password[,user2:password2], got an entry without both parts")
        pairs.append((user, password))
    return pairs


@dataclass
class Security:
    """Who may use the server. ``api_auth``: HTTP basic credentials for the API (``/api``, ``/sdapi``);
    ``auth``: for the studio page, which also opens the API to them. ``host`` is the bound address;
    ``allowed_hosts`` the extra names clients may reach it by. A request's Host header must name this
    server (a loopback name, an IP address, ``host`` or one of ``allowed_hosts``), so a web page cannot
    reach it through DNS rebinding; a state-changing request from another site's page (its Origin) is
    refused."""
    api_auth: list[tuple[str, str]] = field(default_factory=list)
    auth: list[tuple[str, str]] = field(default_factory=list)
    host: str = "127.0.0.1"
    allowed_hosts: list[str] = field(default_factory=list)

    def host_allowed(self, header: str) -> bool:
        import ipaddress

        name = header.strip().lower()
        if name.startswith("["):  # [::1]:7860
            name = name[1:name.index("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        if not name:
            return False
        if is_loopback(name) or name in (self.host.lower(), *(h.lower() for h in self.allowed_hosts)):
            return True
        try:  # an address, not a name: DNS rebinding needs a name
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        from urllib.parse import urlsplit

        if origin == "null":
            return False
        netloc = urlsplit(origin).netloc.lower()
        return netloc == host_header.strip().lower() or self.host_allowed(netloc)

    def credentials_for(self, path: str) -> list[tuple[str, str]]:
        """The credentials that open ``path`` (none: open)."""
        if path.startswith(("/api", "/sdapi")):
            return self.api_auth + self.auth if (self.api_auth or self.auth) else []
        return self.auth or self.api_auth


STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


class Guard:
    """ASGI middleware in front of the app: the Host and Origin checks, HTTP basic authentication and
    the body-size cap (``--max-body-mb``: by Content-Length before a byte is read, and by counting a
    body sent without one), each refused with a JSON answer that says why."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, studio: "Studio", security: Security):
        self.app, self.studio, self.security = app, studio, security

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        sec = self.security
        if not sec.host_allowed(host):
            return await _refuse(send, 400, f"Host {short_repr(host)} does not name this server; reach it by "
                                            f"localhost or an address, or start it with --allowed-hosts NAME")
        origin = headers.get("origin")
        if scope["method"] in STATE_CHANGING and origin is not None and not sec.origin_allowed(origin, host):
            return await _refuse(send, 403, f"a request from another site's page (Origin {short_repr(origin)}) "
                                            f"may not change anything here")
        wanted = sec.credentials_for(scope["path"])
        if wanted and not _authorized(headers.get("authorization", ""), wanted):
            return await _refuse(send, 401, "authentication required (HTTP basic: --api-auth / --auth)",
                                 {"WWW-Authenticate": 'Basic realm="ldm serve"'})
        limit = int(self.studio.limits.max_body_mb * 2**20)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _refuse(send, 413, f"the body is {length} bytes; this server reads at most "
                                            f"{self.studio.limits.max_body_mb:g} MB (--max-body-mb)")
        received, too_large, started = 0, False, False

        async def counted():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    return {"type": "http.disconnect"}  # the app stops reading; the answer is ours
            return message

        async def sending(message):
            nonlocal started
            if too_large:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await _refuse(send, 413, f"the body is over {self.studio.limits.max_body_mb:g} MB (--max-body-mb)")


def _authorized(header: str, wanted: list[tuple[str, str]]) -> bool:
    import secrets

    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return False
    ok = False
    for u, p in wanted:  # every pair compared, in constant time
        ok |= secrets.compare_digest(u.encode(), user.encode()) & secrets.compare_digest(p.encode(), password.encode())
    return ok


async def _refuse(send, status: int, message: str, headers: dict | None = None):
    import json as _json

    body = _json.dumps({"error": message, "detail": [{"field": "", "message": message}]}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# --- requests ---------------------------------------------------------------------------------------
def _body_fields(names) -> dict:
    """pydantic fields of the declared options ``names`` (pipelines.options): type, default, help."""
    fields = {}
    for name in names:
        o = OPTIONS[name]
        tp = str if o.type is Path else o.type
        fields[name] = (tp | None if o.default is None else tp, Field(o.default, description=o.help))
    return fields


_STRICT = ConfigDict(extra="forbid", strict=True)  # strict: `true` is not a number of steps, "7" not a seed
_LORA = (list[str], Field(default_factory=list, description="LoRA files of the server's --lora-dir, by name"))

ControlUnitBody = create_model(
    "ControlUnit", __config__=_STRICT, __doc__="One ControlNet unit: a ControlNet (or T2I-Adapter) of the server's "
    "--controlnet-dir by name, its control image as base64, and the unit's options (pipelines.options.CONTROL_OPTIONS).",
    model=(str, ...), image=(str, ...),
    **{name: (o.type, Field(o.default, description=o.help)) for name, o in CONTROL_OPTIONS.items()})
_CONTROLS = (list[ControlUnitBody], Field(default_factory=list, description="ControlNet units (ldm.control)"))

# The bodies of /api/txt2img, /api/img2img and /api/edit: the request's options as pipelines/options.py
# declares them (under the command line's names), and what each route adds
Txt2Img = create_model("Txt2Img", __config__=_STRICT, __doc__="The parameters of ``ldm generate``, under the same "
                       "names; unset ones take the model's defaults (its sampling.json and native size).",
                       prompt=(str, ...), **_body_fields(options_for("txt2img", "http")), lora=_LORA,
                       controls=_CONTROLS)
Img2Img = create_model("Img2Img", __config__=_STRICT, __doc__="``ldm img2img``: the image as base64 (a "
                       "``data:image/...;base64,`` prefix is accepted); with a ``mask`` (white = repaint), ``ldm "
                       "inpaint`` and its options.",
                       prompt=(str, ...), image=(str, ...), mask=(str | None, None),
                       **_body_fields(dict.fromkeys(options_for("img2img", "http") + options_for("inpaint", "http"))),
                       lora=_LORA, controls=_CONTROLS)
EditBody = create_model(
    "EditBody", __config__=_STRICT, __doc__="``ldm edit``'s parameters under the same names: a source and a target "
    "prompt sampled together, or with ``image`` (base64) a real image inverted then edited.",
    source_prompt=(str, ...), target_prompt=(str | None, None), image=(str | None, None),
    inversion=(str, DEFAULT_INVERSION), inner_steps=(int, Field(10, ge=1, le=100)),
    inner_lr=(float, Field(1e-2, gt=0, le=1)),
    cross_replace=(float, Field(0.8, ge=0, le=1)), self_replace=(float, Field(0.4, ge=0, le=1)),
    reweight=(dict[str, float], Field(default_factory=dict)), blend_words=(list[str], Field(default_factory=list)),
    **_body_fields(n for n in EDIT_OPTIONS if OPTIONS[n].http), lora=_LORA)

# EditBody's fields that configure the edit itself (pipelines.edit.Edit); the rest are the Request's
EDIT_FIELDS = frozenset({"inversion", "inner_steps", "inner_lr", "cross_replace", "self_replace", "reweight",
                         "blend_words"})


class BadRequest(ValueError):
    """A request's field has a value the server will not run; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class Skipped(Exception):
    """The running batch was skipped (A1111's /sdapi/v1/skip); the job goes on with its next batch."""


class Cancelled(Exception):
    """The client went away; the job stopped."""


def _error(status: int, problems: list[tuple[str, str]], headers: dict | None = None) -> JSONResponse:
    body = {"error": "; ".join(f"{f}: {m}" if f else m for f, m in problems),
            "detail": [{"field": f, "message": m} for f, m in problems]}
    return JSONResponse(body, status_code=status, headers=headers)


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said: an error never echoes a
    huge value back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _validation_problems(exc: RequestValidationError, known: list[str]) -> tuple[int, list[tuple[str, str]]]:
    """pydantic's errors as (field, message), and 400 when the body is not JSON at all, else 422."""
    problems, status = [], 422
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        if e.get("type") == "json_invalid":
            status = 400
            problems.append(("", f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"))
        elif e.get("type") == "extra_forbidden":
            problems.append((field, f"unknown field; the known ones are {', '.join(known)}"))
        elif e.get("type") == "missing":
            problems.append((field, "required"))
        elif not loc:
            problems.append(("", f"the body must be a JSON object: {e.get('msg')}"))
        else:
            problems.append((field, f"{e.get('msg')}, got {short_repr(e.get('input'))}"))
    return status, problems


# --- the worker ----------------------------------------------------------------------------------
def is_adapter(path: Path) -> bool:
    """Whether a model of --controlnet-dir is a T2I-Adapter (its config.json's class), not a ControlNet."""
    import json

    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == "T2IAdapter"
    except (OSError, ValueError):
        return False


def to_request(kind: str, body: BaseModel, image=None, units: tuple | None = None, mask=None) -> rq.Request:
    """The API's JSON body as the one generation request every front end builds: its fields are the
    request's, under the same names (``units``: read_controls' ControlNet and T2I-Adapter units, their files
    and images resolved)."""
    controls, adapters = units or ([], [])
    return rq.Request(kind=kind, image=image, mask=mask, controls=controls, adapters=adapters,
                      **body.model_dump(exclude={"image", "mask", "controls"}))


class Job:
    def __init__(self, resolved: rq.Resolved | None, action=None, edit=None, model: str | None = None,
                 restore_model: bool = True, vae: str | None = None):
        self.id = uuid.uuid4().hex[:12]
        self.resolved = resolved
        self.action = action  # instead of a request: a function the worker runs between jobs
        self.edit = edit  # a pipelines.edit.Edit: the request's settings run as that edit
        self.model = model  # run on this model (models()' name; A1111's override_settings) ...
        self.restore_model = restore_model  # ... and load the one before again afterwards
        self.vae = vae  # with this VAE (vae_files()' name, or Automatic; A1111's override_settings sd_vae)
        self.interrupted = False  # stopped by /sdapi/v1/interrupt rather than by its client leaving
        self.shutdown = False  # stopped because the server is shutting down
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancel = threading.Event()
        self.skip = threading.Event()  # A1111's skip: drop the running batch, go on with the next
        self.step, self.steps = 0, 0


class Studio:
    """The loaded model, the queue and the one worker that runs jobs on the model: a thread of its
    own, or with ``worker_thread=False`` whichever thread calls :meth:`work` (``serve`` gives it the
    main thread)."""

    def __init__(self, model_path, *, output_dir, limits: Limits | None = None, device: str = "cpu",
                 embeddings_dir=None, lora_dir=None, load_kwargs: dict | None = None, worker_thread: bool = True,
                 controlnet_dir=None, upscalers_dir=None, vae_dir=None,
                 models_dir=None, compile: str | None = None):
        self.model_path = self._start_model = str(model_path)
        self.models_dir = Path(models_dir) if models_dir else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ValueError(f"--models-dir {str(self.models_dir)!r} is not a folder")
        self.output_dir = check_output_dir(output_dir)
        self.limits = limits or Limits()
        self.device = device
        self.load_kwargs = load_kwargs or {}
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir else None
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.controlnet_dir = Path(controlnet_dir) if controlnet_dir else None
        self.upscalers_dir = Path(upscalers_dir) if upscalers_dir else None
        self.vae_dir = Path(vae_dir) if vae_dir else None
        self.vae_name = AUTOMATIC_VAE  # the VAE in use: the model's own, or a name of vae_files()
        self._upscaler_scales: dict[tuple, int | None] = {}  # (file, mtime) -> its network's scale
        for name, d in (("--embeddings-dir", self.embeddings_dir), ("--lora-dir", self.lora_dir),
                        ("--controlnet-dir", self.controlnet_dir), ("--upscalers-dir", self.upscalers_dir),
                        ("--vae-dir", self.vae_dir)):
            if d is not None and not d.is_dir():
                raise ValueError(f"{name} {str(d)!r} is not a folder")
        self.queue: queue.Queue = queue.Queue(maxsize=self.limits.queue_size)
        self._stopping = threading.Event()
        self.current: Job | None = None
        self.counts = {"done": 0, "failed": 0, "cancelled": 0, "rejected": 0, "images": 0}
        self._step_seconds = []     # recent jobs' seconds per sampler step, for Retry-After
        self.write_error: str | None = None  # the last failure to write an image (read-only, full folder)
        self._started = 0.0         # when the running job started (perf_counter)
        self._seq = itertools.count(1)
        self._stamp = time.strftime("%Y%m%d-%H%M%S")
        self.embeddings: dict[str, list[str]] = {}   # file name -> tokens
        self.skipped_embeddings: dict[str, str] = {}  # file name -> why it was not loaded
        self.compile_mode = compile  # full | blocks | None: torch.compile each loaded model once
        self.pipe = self._load()
        self._thread, self.worker = None, None
        if worker_thread:
            self._thread = threading.Thread(target=self.work, name="ldm-serve-worker", daemon=True)
            self._thread.start()

    # model --------------------------------------------------------------------------------------
    def controlnets(self) -> dict[str, Path]:
        """The ControlNets and T2I-Adapters of --controlnet-dir by name (diffusers directories, ControlNet
        files), as A1111's ControlNet extension lists both in one folder."""
        own = {}
        if Path(self._start_model).resolve() == EMBEDDED_MODEL.resolve():  # the embedded model's own ControlNet
            own = {name: Path(d) for name in EMBEDDED_CONTROLNETS if (d := embedded_controlnet(name))}
        if self.controlnet_dir is None:
            return own
        return own | {p.name: p for p in sorted(self.controlnet_dir.iterdir())
                      if (p / "config.json").is_file() or p.suffix == ".safetensors"}

    def read_controls(self, units: list) -> tuple[list[dict], list[dict]]:
        """A body's units with their models named in --controlnet-dir (never paths: without the folder any
        unit is refused with the same answer) and their images decoded (size from the header first), as
        (ControlNet units, T2I-Adapter units): a unit whose model is a T2I-Adapter (its config names
        T2IAdapter) is an adapter unit with the options adapters take (pipelines.options.ADAPTER_OPTIONS); a
        schedule or a mode set for one is an error. BadRequest naming the field otherwise. Run off the event loop (it
        decodes)."""
        controls, adapters = [], []
        known = self.controlnets()
        for i, unit in enumerate(units):
            which = f" (unit {i})" if i else ""
            if not known:
                raise BadRequest("controls", "this server takes ControlNets by name from its --controlnet-dir, "
                                             "and was started without one")
            if unit.model not in known:
                raise BadRequest("controls", f"no ControlNet {short_repr(unit.model)} in the server's "
                                             f"--controlnet-dir{which}; available: {', '.join(known) or 'none'}")
            image = self.read_image(unit.image, "controls")
            options = unit.model_dump(exclude={"model", "image"})
            if not is_adapter(known[unit.model]):
                controls.append({**options, "model": known[unit.model], "image": image})
                continue
            # (resize too is a ControlNet's only, but A1111's units always send one: an adapter's image is resized
            # as diffusers resizes it, whatever the unit says)
            foreign = [k for k in ("start", "end", "mode") if options[k] != CONTROL_OPTIONS[k].default]
            if foreign:
                raise BadRequest("controls", f"{short_repr(unit.model)} is a T2I-Adapter: it acts at every step "
                                             f"with its weight; {', '.join(foreign)} apply to ControlNets only{which}")
            adapters.append({**{k: options[k] for k in ADAPTER_OPTIONS}, "model": known[unit.model], "image": image})
        return controls, adapters

    def lora_files(self) -> dict[str, Path]:
        return {} if self.lora_dir is None else rq.lora_files(self.lora_dir)

    def upscaler_files(self) -> dict[str, Path]:
        from ldm.upscalers import upscaler_files

        return {} if self.upscalers_dir is None else upscaler_files(self.upscalers_dir)

    def upscaler_scale(self, path: Path) -> int | None:
        """The scale of an upscaler file's network (read once per file and change; None for a file the
        server may not or cannot read)."""
        from ldm.upscalers import UpscalerError, load_upscaler

        key = (Path(path).resolve(), Path(path).stat().st_mtime_ns)
        if key not in self._upscaler_scales:
            try:
                net = load_upscaler(path, allow_pickle=self.request_limits().allow_pickle)
                self._upscaler_scales[key] = int(net.scale)
            except UpscalerError as exc:
                log.warning("upscaler %s: %s", Path(path).name, exc)
                self._upscaler_scales[key] = None
        return self._upscaler_scales[key]

    def vae_files(self) -> dict[str, Path]:
        """The VAEs of --vae-dir by name (A1111's models/VAE): single files (.safetensors; .pt / .ckpt
        pickles, used with --allow-pickle) and diffusers VAE directories."""
        if self.vae_dir is None:
            return {}
        return {p.name: p for p in sorted(self.vae_dir.iterdir())
                if p.suffix in (".safetensors", ".pt", ".ckpt") or (p / "config.json").is_file()}

    def vae_problem(self, name) -> str | None:
        """Why ``name`` is no VAE of this server (vae_files(), Automatic, None); None when it is one."""
        files = self.vae_files()
        if name in AUTOMATIC_VAES or name in files:
            return None
        return (f"no VAE {name!r}; available: {', '.join([*AUTOMATIC_VAES, *files])}"
                + ("" if self.vae_dir else " (the server has no --vae-dir)"))

    def switch_vae(self, name: str) -> str:
        """Use the VAE called ``name`` (vae_files(), or Automatic / None: the model's own) from now on, with
        this model and those switched to later; run on the worker. Raises BadRequest naming the value."""
        import torch

        from ldm.checkpoints import CheckpointError, load_vae

        if (problem := self.vae_problem(name)) is not None:
            raise BadRequest("sd_vae", problem)
        files = self.vae_files()
        own = self._own_vae
        if name in AUTOMATIC_VAES:
            vae = own
        elif name == self.vae_name:
            return name
        else:
            allow = self.request_limits().allow_pickle
            if files[name].suffix in (".pt", ".ckpt") and not allow:
                raise BadRequest("sd_vae", f"VAE {name!r} is a pickle file, refused: give the server its "
                                           ".safetensors, or start it with --allow-pickle")
            try:
                vae = load_vae(files[name], own, allow_pickle=allow, dtype=own.dtype)
            except (CheckpointError, ValueError, RuntimeError) as exc:
                raise BadRequest("sd_vae", f"VAE {name!r} does not fit this model: {exc}") from None
            vae = vae.to(own.device).eval().requires_grad_(False)
        self.pipe.model.vae = vae
        self.vae_name = AUTOMATIC_VAE if name in AUTOMATIC_VAES else name
        if vae is not own:
            log.info("VAE %s in use", name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self.vae_name

    def request_limits(self) -> rq.Limits:
        """A request's limits on this server: its flags' bounds, its LoRA and upscaler folders, no paths."""
        return self.limits.for_requests(self.lora_dir, self.upscalers_dir,
                                        bool(self.load_kwargs.get("allow_pickle", False)))

    def _load(self):
        """The model with every embedding of the folder (LoRA files are switched per request)."""
        from .pipeline import Pipeline

        pipe = Pipeline.from_pretrained(self.model_path, device=self.device, **self.load_kwargs)
        pipe.upscalers_dir = self.upscalers_dir
        self._own_vae = pipe.model.vae  # the model's own VAE, which "Automatic" puts back
        self.embeddings, self.skipped_embeddings = {}, {}
        self.load_embeddings(pipe)
        if self.compile_mode:  # compiled once here and warmed up, so no request pays the compile time
            t0 = time.perf_counter()
            pipe.compile(regional=self.compile_mode == "blocks")
            pipe.text_to_image("warm-up", steps=2, seed=0)
            log.info("compiled (%s) in %.1f s", self.compile_mode, time.perf_counter() - t0)
        return pipe

    def load_embeddings(self, pipe=None) -> None:
        """Load the embedding files of --embeddings-dir that are not loaded yet (at start, and on A1111's
        refresh-embeddings; run on the worker): ``embeddings`` file name -> tokens, ``skipped_embeddings``
        file name -> why not (one bad file must not take the server down)."""
        pipe = pipe or self.pipe
        if self.embeddings_dir is None:
            return
        for f in sorted(self.embeddings_dir.iterdir()):
            if f.suffix not in EMBEDDING_SUFFIXES or f.name in self.embeddings:
                continue
            try:
                self.embeddings[f.name] = pipe.load_embedding(f)
                self.skipped_embeddings.pop(f.name, None)
            except Exception as exc:
                log.warning("embedding %s skipped: %s", f, exc)
                self.skipped_embeddings[f.name] = str(exc)

    def models(self) -> dict[str, str]:
        """The models a client may switch among, by name: the one given at start and those of
        ``--models-dir`` (diffusers directories and single .safetensors files)."""
        out = {Path(self._start_model).name: self._start_model}
        if self.models_dir is not None:
            for p in sorted(self.models_dir.iterdir()):
                if (p / "model_index.json").is_file() or p.suffix == ".safetensors":
                    out[p.name] = str(p)
        return out

    def output_writable(self) -> bool:
        """Whether a file can be created in the output folder now (the health check's probe)."""
        import tempfile

        try:
            with tempfile.NamedTemporaryFile(dir=self.output_dir, prefix=".write-check-"):
                return True
        except OSError:
            return False

    def current_model(self) -> str:
        """The name (``models()``) of the model loaded now: every model is named by its path's last part."""
        return Path(self.model_path).name

    def switch_model(self, name: str) -> str:
        """Load the model called ``name`` (``models()``) in place of the current one; run on the
        worker (``call_on_worker``). Raises BadRequest for an unknown name."""
        models = self.models()
        if name not in models:
            raise BadRequest("sd_model_checkpoint", f"no model {name!r}; available: {', '.join(models)}")
        if models[name] != self.model_path:
            log.info("switching to model %s", name)
            previous = self.model_path
            self.model_path = models[name]
            try:
                self.pipe = self._load()
            except Exception:
                self.model_path = previous
                raise
            keep, self.vae_name = self.vae_name, AUTOMATIC_VAE  # the chosen VAE on this model too (A1111's)
            if keep != AUTOMATIC_VAE:
                try:
                    self.switch_vae(keep)
                except BadRequest as exc:
                    log.warning("model %s keeps its own VAE: %s", name, exc.message)
        return name

    def info(self) -> dict:
        pipe = self.pipe
        sampler, steps, guidance = rq.sampling_defaults(pipe.model)
        width, height = pipe.default_size()
        return {"models": [{"name": pipe.model.name, "path": self.model_path, "loaded": True, "arch": pipe.model.arch,
                            "defaults": {"sampler": sampler, "steps": steps, "guidance": guidance,
                                         "width": width, "height": height},
                            "guidance_input": pipe.model.unet.config.get("time_cond_proj_dim") is not None}],
                "samplers": list(SAMPLERS),
                "schedules": list(SCHEDULES),
                "embeddings": [{"file": f, "tokens": t} for f, t in self.embeddings.items()],
                "lora": list(self.lora_files()),
                "upscalers": [*rq.HIRES_UPSCALERS, *self.upscaler_files()],  # hires_upscaler's values
                "hires": {"strength": OPTIONS["hires_strength"].default},
                "controlnets": list(self.controlnets()),
                "inpaint": {n: {"default": OPTIONS[n].default, "choices": OPTIONS[n].choices}  # the studio's fields
                            for n in options_for("inpaint", "http") if "inpaint" in OPTIONS[n].kinds
                            and "img2img" not in OPTIONS[n].kinds and n not in ("width", "height")},
                "limits": asdict(self.limits)}

    # checks -------------------------------------------------------------------------------------
    def resolve(self, req: rq.Request) -> rq.Resolved:
        """The request checked against this server's limits and the model, defaults filled in and the
        seed drawn; RequestError lists every problem as (field, message)."""
        return req.resolve(self.pipe.model, self.request_limits())

    def read_image(self, data: str, field: str = "image"):
        """A request's base64 image -> RGB PIL image, or BadRequest naming ``field``; an image larger
        than --max-side is refused from its header, before its pixels are decoded."""
        if not isinstance(data, str):
            raise BadRequest(field, f"must be a base64 image, got {type(data).__name__}")
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(field, f"not valid base64 ({exc})") from exc
        try:
            return decode_image(raw, what=f"in field '{field}'", max_side=self.limits.max_side)
        except ValueError as exc:
            raise BadRequest(field, str(exc)) from exc

    # queue --------------------------------------------------------------------------------------
    def submit(self, job: Job):
        """Queue ``job``; ``queue.Full`` when the queue is at its bound (jobs whose clients went away
        hold no slot: they are dropped first). Refused with Cancelled once the server is stopping."""
        if self._stopping.is_set():
            job.shutdown = True
            raise Cancelled()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            if not self._drop_cancelled():
                self.counts["rejected"] += 1
                raise
            self.queue.put_nowait(job)

    def _drop_cancelled(self) -> int:
        """Remove the queued jobs whose clients went away; how many were removed."""
        with self.queue.mutex:
            gone = [j for j in self.queue.queue if j is not None and j.cancel.is_set()]
            for j in gone:
                self.queue.queue.remove(j)
            if gone:
                self.queue.not_full.notify(len(gone))
        for j in gone:
            self.counts["cancelled"] += 1
            j.future.set_exception(Cancelled())
        return len(gone)

    def waiting(self) -> int:
        """Queued jobs whose clients still wait."""
        with self.queue.mutex:
            return sum(1 for j in self.queue.queue if j is not None and not j.cancel.is_set())

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free. A slot frees when the worker takes the next job,
        that is when the running one ends: its steps left times the time a step takes, measured on the
        running job itself once it has made a step, else on recent jobs (not the time to drain the
        whole queue, nor a flat second)."""
        job = self.current
        if job is None:
            return 1
        elapsed = time.perf_counter() - self._started
        if job.step > 0:
            per_step = elapsed / job.step
        else:
            recent = self._step_seconds[-5:]
            per_step = sum(recent) / len(recent) if recent else 1.0 / max(job.steps, 1)
        left = per_step * max(job.steps - job.step, 0) - (elapsed if job.step == 0 else 0.0)
        return max(1, math.ceil(left))

    def progress(self) -> dict:
        job = self.current
        return {"busy": job is not None, "job": job.id if job else None, "step": job.step if job else 0,
                "steps": job.steps if job else 0, "queue": self.waiting()}

    def close(self):
        """Cancel the running and queued jobs and stop the worker."""
        self._stopping.set()  # before the drain, so the worker takes no job from it
        if self.current is not None:
            self.current.cancel.set()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.set_exception(Cancelled())
        self.stop()  # the queue is empty now: this wakes a worker waiting on it
        if self._thread is not None:
            self._thread.join(30)

    def shutdown(self):
        """Stop now (SIGTERM, Ctrl-C): take no more work, stop the running job at its next step and
        answer it and every queued one 503; :meth:`work` returns once the running job has stopped.
        Safe from a signal handler (it only sets flags and answers futures)."""
        self._stopping.set()
        job = self.current
        if job is not None:
            job.shutdown = True
            job.cancel.set()
        while True:
            try:
                queued = self.queue.get_nowait()
            except queue.Empty:
                break
            if queued is not None and not queued.future.done():
                queued.shutdown = True
                queued.future.set_exception(Cancelled())
        self.stop()

    def stop(self):
        """Let :meth:`work` return once the job it is running (if any) is done; queued jobs stay queued
        (``close`` cancels them). Never blocks, whatever the queue holds."""
        self._stopping.set()
        try:
            self.queue.put_nowait(None)  # wakes a worker waiting on an empty queue
        except queue.Full:  # a worker busy with a full queue sees the flag after its job
            pass

    def work(self):
        """Run queued jobs until ``stop`` or ``close``."""
        self.worker = threading.current_thread().name
        while not self._stopping.is_set():
            job = self.queue.get()
            if job is None:
                continue
            if job.cancel.is_set():
                self.counts["cancelled"] += 1
                job.future.set_exception(Cancelled())
                continue
            if job.action is not None:
                try:
                    job.future.set_result(job.action())
                except Exception as exc:
                    job.future.set_exception(exc)
                continue
            self.current = job
            if self._stopping.is_set():  # shutdown() came between the queue and here
                job.shutdown = True
                job.cancel.set()
            t0 = self._started = time.perf_counter()
            try:
                result = self._run(job)
            except Cancelled as exc:
                self.counts["cancelled"] += 1
                log.info("job %s cancelled at step %d of %d: the client went away", job.id, job.step, job.steps)
                job.future.set_exception(exc)
            except ValueError as exc:  # a request the model cannot run (the pipeline's own checks)
                self.counts["failed"] += 1
                job.future.set_exception(exc)
            except Exception as exc:  # the server keeps serving
                self.counts["failed"] += 1
                log.exception("job %s failed", job.id)
                job.future.set_exception(exc)
            else:
                self.counts["done"] += 1
                if job.steps:
                    self._step_seconds = (self._step_seconds + [(time.perf_counter() - t0) / job.steps])[-20:]
                job.future.set_result(result)
            finally:
                self.current = None

    def _run(self, job: Job) -> dict:
        """The job on its model: a job that names another model (A1111's override_settings) loads it
        here, in queue order, and the one before is loaded again after it, so no other job sees it."""
        if job.vae is not None and job.vae != self.vae_name:  # a VAE for this job alone (A1111's override)
            before, vae = self.vae_name, job.vae
            self.switch_vae(vae)
            job.vae = None
            try:
                return self._run(job)
            finally:
                if job.restore_model:
                    self.switch_vae(before)
        if job.model is None or job.model == self.current_model():
            return self._run_on_model(job)
        previous = self.current_model()
        self.switch_model(job.model)
        try:
            job.resolved = job.resolved.request.resolve(self.pipe.model, self.request_limits())
            return self._run_on_model(job)
        finally:
            if job.restore_model:
                self.switch_model(previous)

    def _run_on_model(self, job: Job) -> dict:
        import torch

        r = job.resolved
        pipe = self.pipe
        job.steps = r.steps if job.edit is not None else r.progress_steps() * len(r.iterations())

        def step(i, x, x0):
            job.step += 1  # counted over the whole job (its batches and hires passes)
            if job.cancel.is_set():
                raise Cancelled()
            if job.skip.is_set():
                job.skip.clear()
                raise Skipped()

        # the request's LoRA names as files (an edit resolves its request itself); r.loras has them already
        files_by_name = self.lora_files()
        runnable = dataclasses.replace(r, request=dataclasses.replace(r.request, lora=[
            files_by_name.get(str(name)) or files_by_name[f"{name}.safetensors"] for name in r.request.lora]))
        t0 = time.perf_counter()
        extra = {}
        images, files, parameters, seeds = [], [], [], []

        warnings = []

        def keep(res, texts):
            """One batch's images: on disk at once (an interrupted or failed job keeps them), and encoded;
            a folder that cannot be written (read-only, full) costs the files, not the images."""
            for img, params, s in zip(res.images, texts, res.seeds):
                data = png_bytes(img, params)
                path = self.output_dir / f"{self._stamp}-{next(self._seq):05d}-{s}.png"
                try:  # exclusive: another server on this folder never overwrites, nor is overwritten
                    files.append(str(save_png(img, path, data=data, exclusive=True)))
                except OSError as exc:
                    self.write_error = f"{type(exc).__name__}: {exc.strerror or exc}"
                    log.warning("could not write %s (%s); the image is in the answer only", path, self.write_error)
                    files.append(None)
                    if not warnings:
                        warnings.append(f"the output folder {self.output_dir} could not be written "
                                        f"({self.write_error}); the images are in this answer only")
                images.append(base64.b64encode(data).decode("ascii"))
                parameters.append(params)
                seeds.append(s)
            self.counts["images"] += len(res.images)

        if job.edit is not None:  # autograd is needed by null-text inversion and CLIP guidance
            from .edit import edit, infotexts

            with torch.no_grad():
                out = edit(pipe, job.edit, runnable.request, step)
            keep(out.target, infotexts(pipe, out))
            source_parameters = pipe.infotexts(out.source)[0]
            extra = {"source": base64.b64encode(png_bytes(out.source.images[0], source_parameters)).decode("ascii"),
                     "source_parameters": source_parameters,
                     "inversion": {"inverted": out.inverted, "cached": out.cached}}
        else:
            try:
                with torch.inference_mode():
                    for part in runnable.iterations():  # batch by batch, so that a skipped one is only that
                        done = job.step
                        try:
                            pipe.generate(part, step, on_batch=lambda res: keep(res, pipe.infotexts(res)))
                        except Skipped:
                            log.info("batch of seeds %s skipped", part.seeds)
                            job.step = done + part.progress_steps()
            except Cancelled as exc:
                exc.partial = {"images": images, "parameters": parameters, "seeds": seeds, "files": files,
                               "model": pipe.model.name, "model_name": self.current_model(),
                               "job": job.id}  # the batches that finished
                raise
        seconds = time.perf_counter() - t0
        return {"images": images, "parameters": parameters, "seeds": seeds, "files": files,
                "model": pipe.model.name, "model_name": self.current_model(), "job": job.id,
                "seconds": round(seconds, 3), **({"warnings": warnings} if warnings else {}), **extra}


async def _client_gone(request: Request):
    """Returns when the client disconnects (the body is already read, so the next ASGI message is
    the disconnect); no polling."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def execute(studio: "Studio", req: rq.Request, request: Request, *, interrupted=None, edit=None,
                  model: str | None = None, restore_model: bool = True, vae: str | None = None):
    """Resolve, queue and await one request: the job's result dict, or an error response (422 naming
    the field, 503 with Retry-After when the queue is full, 499 when the client went away). A job
    stopped by ``/sdapi/v1/interrupt`` answers ``interrupted()`` when given (A1111's clients expect a
    normal answer), else 499."""
    if model is not None and model not in studio.models():
        return _error(422, [("sd_model_checkpoint", f"no model {model!r}; available: {', '.join(studio.models())}")])
    if vae is not None and (problem := studio.vae_problem(vae)) is not None:
        return _error(422, [("sd_vae", problem)])
    try:
        job = Job(studio.resolve(req), edit=edit, model=model, restore_model=restore_model, vae=vae)
    except rq.RequestError as exc:
        return _error(422, exc.problems)
    try:
        studio.submit(job)
    except Cancelled:
        return _shutting_down()
    except queue.Full:
        return _error(503, [("", f"the queue is full ({studio.limits.queue_size} requests waiting); "
                                 "retry later")], headers={"Retry-After": str(studio.retry_after())})
    fut = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_client_gone(request))
    await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not fut.done():
        job.cancel.set()  # the client went away: skipped if still queued, stopped at its next step if running
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # the outcome nobody waits for
        return Response(status_code=499)
    gone.cancel()
    try:
        return fut.result()
    except Cancelled as exc:
        if job.shutdown:
            return _shutting_down()
        if interrupted is not None and job.interrupted:  # what had finished (whole batches), as A1111 answers
            partial = getattr(exc, "partial", None)
            return partial if partial is not None and partial["images"] else interrupted()
        return Response(status_code=499)
    except ValueError as exc:
        field = exc.field if isinstance(exc, BadRequest) else ""
        return _error(422, [(field, getattr(exc, "message", str(exc)))])
    except Exception as exc:
        return _error(500, [("", f"generation failed: {type(exc).__name__}: {exc}")])


def _shutting_down() -> JSONResponse:
    return _error(503, [("", "the server is shutting down; the job was stopped (nothing past its last whole "
                             "batch was kept)")])


async def call_on_worker(studio: "Studio", fn):
    """Run ``fn()`` on the worker, between jobs (loading another model), and await its result."""
    job = Job(None, action=fn)
    try:
        studio.submit(job)
    except Cancelled:
        return _shutting_down()
    except queue.Full:
        return _error(503, [("", "the queue is full; retry later")],
                      headers={"Retry-After": str(studio.retry_after())})
    try:
        return await asyncio.wrap_future(job.future)
    except Cancelled:
        return _shutting_down()
    except BadRequest:
        raise
    except Exception as exc:  # a model that fails to load: JSON with the reason, not a bare 500
        log.exception("%s failed on the worker", getattr(fn, "__name__", "a call"))
        return _error(500, [("", f"{type(exc).__name__}: {exc}")])


# --- the app ---------------------------------------------------------------------------------------
def create_app(studio: Studio, security: Security | None = None) -> FastAPI:
    # no /api/docs: FastAPI's docs page loads its scripts from a CDN, so offline it was a blank page;
    # the schema itself is served, for any OpenAPI viewer or client generator
    app = FastAPI(title="ldm studio", version="1", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.studio = studio
    app.add_middleware(Guard, studio=studio, security=security or Security())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        body = {"img2img": Img2Img, "edit": EditBody}.get(request.url.path.rsplit("/", 1)[-1], Txt2Img)
        known = list(body.model_fields)
        status, problems = _validation_problems(exc, known)
        return _error(status, problems)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "studio.html", media_type="text/html")

    @app.get("/api/health")
    async def health():
        return {"status": "ok", "model": studio.pipe.model.name, "queue": studio.waiting(),
                "output_dir_writable": studio.output_writable(), "output_error": studio.write_error,
                "queue_size": studio.limits.queue_size, "busy": studio.current is not None, "worker": studio.worker, **studio.counts}

    @app.get("/api/models")
    async def models():
        return studio.info()

    @app.get("/api/progress")
    async def progress():
        return studio.progress()

    add_routes(app, studio, execute=execute, call_on_worker=call_on_worker, error=_error, bad_request=BadRequest,
               control_unit=ControlUnitBody)

    @app.post("/api/txt2img")
    async def txt2img(req: Txt2Img, request: Request):
        try:
            units = await run_in_threadpool(studio.read_controls, req.controls) if req.controls else None
        except BadRequest as exc:
            return _error(422, [(exc.field, exc.message)])
        return await execute(studio, to_request("txt2img", req, units=units), request)

    @app.post("/api/edit")
    async def edit(body: EditBody, request: Request):
        from ldm.attention_control import EditError

        from .edit import Edit, check_edit

        try:
            image = await run_in_threadpool(studio.read_image, body.image) if body.image else None
        except BadRequest as exc:
            return _error(422, [(exc.field, exc.message)])
        ed = Edit(body.source_prompt, body.target_prompt, images=None if image is None else [image],
                  cache_dir=studio.output_dir / "inversions", **body.model_dump(include=EDIT_FIELDS))
        req = rq.Request(prompt=body.source_prompt,
                         **body.model_dump(exclude={"source_prompt", "target_prompt", "image", *EDIT_FIELDS}))
        try:
            check_edit(studio.pipe, ed, req)  # words, prompt lengths, sizes: before the queue
        except rq.RequestError as exc:
            return _error(422, exc.problems)
        except EditError as exc:
            return _error(422, [("", str(exc))])
        return await execute(studio, req, request, edit=ed)

    @app.post("/api/img2img")
    async def img2img(req: Img2Img, request: Request):
        try:
            image = await run_in_threadpool(studio.read_image, req.image)  # decoding never blocks the server
            mask = None if req.mask is None else (await run_in_threadpool(studio.read_image, req.mask, "mask")).convert("L")
            units = await run_in_threadpool(studio.read_controls, req.controls) if req.controls else None
        except BadRequest as exc:
            return _error(422, [(exc.field, exc.message)])
        return await execute(studio, to_request("inpaint" if mask is not None else "img2img", req, image, units,
                                                mask), request)

    return app


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860, *, sock=None, log_level: str = "info",
          access_log: bool = False, security: Security | None = None):
    """Serve until interrupted (or, with ``sock``, on that bound socket). A studio made with
    ``worker_thread=False`` runs its jobs here, in the calling (main) thread, while uvicorn serves
    from a second thread; Ctrl-C or the HTTP server's end stops both. Raises ``OSError`` when the
    server cannot start (the port taken, say)."""
    import uvicorn

    config = uvicorn.Config(create_app(studio, security or Security(host=host)), host=host, port=port,
                            log_level=log_level, access_log=access_log)
    server = uvicorn.Server(config)
    kwargs = {"sockets": [sock]} if sock is not None else {}
    if studio._thread is not None:  # the studio has its own worker thread: uvicorn takes this one
        server.run(**kwargs)
        return server

    def http():
        try:
            server.run(**kwargs)
        except BaseException:  # uvicorn ends a failed start with sys.exit(1)
            pass
        finally:
            studio.stop()

    def terminate(signum, frame):  # SIGTERM and Ctrl-C: the running job stops at its next step and is
        log.info("stopping: no new work; the running job is stopped and answered")  # answered, then both end
        studio.shutdown()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=http, name="ldm-serve-http", daemon=True)
    thread.start()
    try:
        studio.work()
    except KeyboardInterrupt:
        log.info("interrupted: stopping")
    finally:
        server.should_exit = True
        thread.join(15)
        studio.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise OSError(f"the HTTP server did not start on {host}:{port} (is the port in use? see the log above)")
    return server
