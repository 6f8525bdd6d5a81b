"""The ``ldm`` command: generate, img2img, inpaint and serve; finetune and shapes add theirs (training, eval,
demos, the model build) through the ``ldm.commands`` entry point."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from ldm.locate import ModelError, default_model_path
from ldm.names import DEFAULT_INVERSION, INVERSIONS

from .options import (CONTROL_OPTIONS, DEFAULT_STRENGTH, EDIT_OPTIONS, PREPROCESSORS, RESIZE_MODES, SAMPLING,
                      add_flags, add_unit_flags, options_for, unit_lists)
from .outputs import check_output_dir, check_output_file

# nothing here imports torch at module level: `ldm --help` and every core command's --help answer
# before PyTorch (about 1.3 s) loads; the commands import what they need when they run

log = logging.getLogger("ldm")


def _common(p: argparse.ArgumentParser):
    p.add_argument("prompt", nargs="?", help="the prompt (or use --from-file)")
    model_args(p)
    output_args(p)
    p.add_argument("--grid", action="store_true", help="also write grid.png of all images into --output-dir")
    add_unit_flags(p)
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="folder of LoRA .safetensors files that <lora:NAME:WEIGHT> tags in a prompt name (as A1111's "
                        "models/Lora)")
    upscalers_dir_arg(p)
    p.add_argument("--from-file", type=Path, help="a text file with one prompt a line (blank and #-lines skipped); "
                                                  "each image is written as soon as it is made, a rerun skips images already "
                                                  "written, and under `accelerate launch` the prompts are spread over "
                                                  "the processes")
    speed_args(p)
    p.add_argument("--vae-slicing", type=int, default=None, metavar="N",
                   help="decode N images at a time (default: 1 at a time for batches over 4)")


def upscalers_dir_arg(p: argparse.ArgumentParser):
    p.add_argument("--upscalers-dir", type=Path, default=None, metavar="DIR",
                   help="folder of model upscalers (ESRGAN, Real-ESRGAN, SwinIR, 4x-UltraSharp, ... as .safetensors, "
                        "or .pth with --allow-pickle; A1111's models/ESRGAN) that --hires-upscaler and `ldm upscale` "
                        "name by file name")


def model_args(p: argparse.ArgumentParser):
    """The model to load and how (every generating command)."""
    p.add_argument("--model", help="a diffusers-format model directory, a single-file checkpoint (.safetensors in "
                                   "the A1111 / ComfyUI layout) or a hub id (default: the embedded model)")
    p.add_argument("--model-config", type=Path, default=None, metavar="DIR",
                   help="for a single file: a diffusers directory of its layout (default: the configuration read "
                        "from the file's tensors, on the shipped one of the detected SD 1.x / 2.x / SDXL family)")
    p.add_argument("--vae", type=Path, default=None, metavar="DIR_OR_FILE",
                   help="replace the model's VAE: a diffusers VAE or model directory, or a VAE .safetensors file "
                        "(e.g. SDXL's fp16-fix VAE)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights' dtype (default auto: fp16 on CUDA; on a CPU bf16 where it has native bf16 units, AMX or "
                        "AVX512-BF16, with the VAE in fp32, else fp32; LDM_CPU_BF16=0/1 overrides)")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"],
                   help="attention kernel (default auto: xformers when installed on CUDA, else SDPA)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading .bin/.ckpt pickle weights (can run arbitrary code; only for trusted files)")
    p.add_argument("--embedding", action="append", default=[], type=Path, metavar="FILE",
                   help="a textual-inversion embedding (.safetensors, or A1111 .pt) whose token(s) prompts may "
                        "use; repeat for several")
    p.add_argument("--token", action="append", default=[], metavar="NAME",
                   help="the token of the matching --embedding (default: the name stored in the file)")
    p.add_argument("--lora", action="append", default=[], type=Path, metavar="FILE",
                   help="LoRA weights (diffusers' or kohya's layout) applied at weight 1; repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def output_args(p: argparse.ArgumentParser):
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", type=Path, help="write the one image to this PNG file")
    out.add_argument("--output-dir", type=Path, help="write each image into this folder (default: outputs/)")


def speed_args(p: argparse.ArgumentParser, compile_note: str = "; pays off over many images"):
    p.add_argument("--compile", nargs="?", const="full", default=None, choices=["full", "blocks"],
                   help="torch.compile the U-Net and VAE decoder (full), or only the U-Net's repeated blocks "
                        "(blocks: shorter compile)" + compile_note)
    threads_arg(p)


def threads_arg(p: argparse.ArgumentParser):
    p.add_argument("--threads", default="auto", metavar="N|auto|default",
                   help="CPU threads (default auto: PyTorch's own when the machine is idle, a core fewer per other "
                        "process ready to run, so a busy machine does not slow this one down several-fold)")


def sampling_args(p: argparse.ArgumentParser):
    add_flags(p, SAMPLING)


CORE_COMMANDS = ("generate", "img2img", "inpaint", "edit", "convert", "serve", "control-preview", "upscale")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ldm`` parser; for a ``command`` of this module's own the plug-ins (training, the shapes
    world) are not loaded, so running or asking help for it imports none of them."""
    parser = argparse.ArgumentParser(prog="ldm", description="Latent-diffusion text-to-image toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    _common(g)
    add_flags(g, options_for("txt2img"))  # every request option, from pipelines/options.py
    g.add_argument("--refiner", default=None, metavar="DIR",
                   help="SDXL: a refiner model that finishes the schedule from --refiner-start on")
    i = sub.add_parser("img2img", help="image to image (SDEdit)")
    _common(i)
    i.add_argument("--image", type=Path, required=True, help="the input image")
    add_flags(i, options_for("img2img"), defaults={"strength": DEFAULT_STRENGTH["img2img"]},
              helps={"strength": "how far to noise the image, in (0, 1] (default 0.8)"})
    n = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _common(n)
    n.add_argument("--image", type=Path, required=True, help="the input image")
    n.add_argument("--mask", type=Path, required=True, help="a mask the image's size: white = repaint, black = keep")
    add_flags(n, options_for("inpaint"), defaults={"strength": DEFAULT_STRENGTH["inpaint"]},
              helps={"strength": "how far to noise the image, in (0, 1] (default 1)"})
    e = sub.add_parser("edit", help="edit by prompt-to-prompt: a source and a target prompt sampled together, or "
                                    "a real image (--image) inverted first")
    _edit_args(e)
    e.set_defaults(job=_run_edit)
    v = sub.add_parser("control-preview", help="write the control map a ControlNet would read from an image "
                                               "(check a preprocessor before generating)")
    v.add_argument("image", type=Path, help="the control image")
    v.add_argument("--output", type=Path, required=True, help="the map, a .png file")
    v.add_argument("--control-preprocessor", default=CONTROL_OPTIONS["preprocessor"].default,
                   choices=list(PREPROCESSORS), help=CONTROL_OPTIONS["preprocessor"].help)
    for key in ("canny_low", "canny_high"):
        o = CONTROL_OPTIONS[key]
        v.add_argument("--control-" + key.replace("_", "-"), dest="control_" + key, type=o.type, default=o.default,
                       help=o.help)
    v.add_argument("--width", type=int, default=None, help="fit the map to this width (with --height)")
    v.add_argument("--height", type=int, default=None, help="fit the map to this height (with --width)")
    v.add_argument("--control-resize", default=CONTROL_OPTIONS["resize"].default, choices=list(RESIZE_MODES),
                   help=CONTROL_OPTIONS["resize"].help)
    v.set_defaults(func=_control_preview)
    u = sub.add_parser("upscale", help="upscale an image with a model upscaler (ESRGAN, SwinIR, ...), tiled")
    u.add_argument("image", type=Path, help="the image to upscale")
    u.add_argument("--upscaler", required=True, metavar="NAME_OR_FILE",
                   help="a name of --upscalers-dir, an upscaler file, or lanczos")
    upscalers_dir_arg(u)
    u.add_argument("--scale", type=float, default=None, help="the factor (default: the network's own, e.g. 4)")
    u.add_argument("--width", type=int, default=None, help="or the output's width and --height (both)")
    u.add_argument("--height", type=int, default=None)
    u.add_argument("--output", type=Path, required=True, help="the upscaled image, a .png file")
    u.add_argument("--tile", type=int, default=None, help="tile side in input px (default 512; smaller fits less memory)")
    u.add_argument("--tile-overlap", type=int, default=None, help="px tiles overlap by (default 32)")
    u.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    u.add_argument("--allow-pickle", action="store_true", help="allow a .pth/.pt/.ckpt pickle upscaler (trusted "
                                                               "files only)")
    u.set_defaults(func=_upscale)
    c = sub.add_parser("convert", help="a single-file checkpoint (A1111 / ComfyUI layout) to a diffusers directory, "
                                       "a diffusers directory to a single file, or a LoRA between diffusers' "
                                       "and kohya's layouts")
    c.add_argument("input", type=Path, help="a .safetensors single file, a diffusers model directory, or a LoRA file")
    c.add_argument("output", type=Path, help="the directory to write, or the .safetensors file to write")
    c.add_argument("--model", default=None, help="for a LoRA: the model it was made for (default: the embedded model)")
    c.add_argument("--model-config", type=Path, default=None, metavar="DIR",
                   help="for a single file: a diffusers directory of its layout (default: the one shipped for the "
                        "detected SD 1.x / 2.x / SDXL architecture)")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights' dtype in the file written (default fp32)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt pickle input (trusted files only)")
    c.set_defaults(func=_convert)
    s = sub.add_parser("serve", help="local web studio and HTTP API (one model, one queue)")
    s.add_argument("--model", default=None, help="model directory or single-file checkpoint (default: the embedded "
                                                 "shapes model)")
    s.add_argument("--model-config", type=Path, default=None, metavar="DIR",
                   help="for a single file of another layout: a diffusers directory of its layout")
    s.add_argument("--vae", type=Path, default=None, metavar="DIR_OR_FILE", help="replace the model's VAE")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    s.add_argument("--output-dir", type=Path, default=Path("outputs/serve"),
                   help="every image made is written here (default outputs/serve)")
    s.add_argument("--models-dir", type=Path, default=None,
                   help="folder of models (diffusers directories, .safetensors files) that A1111 clients may switch "
                        "among (/sdapi/v1/options sd_model_checkpoint)")
    s.add_argument("--embeddings-dir", type=Path, help="folder of textual-inversion embeddings, all loaded at start")
    s.add_argument("--lora-dir", type=Path, help="folder of LoRA .safetensors files a request may pick by name")
    upscalers_dir_arg(s)
    s.add_argument("--vae-dir", type=Path, help="folder of VAEs (.safetensors files, diffusers VAE directories; A1111's "
                                                "models/VAE) that A1111 clients may switch to (sd_vae)")
    s.add_argument("--controlnet-dir", type=Path, help="folder of ControlNets (diffusers directories) a request's "
                                                       "controls may pick by name")
    from .limits import Limits  # the limits' flags, from their one declaration

    for f in dataclasses.fields(Limits):
        s.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default:g})")
    s.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="HTTP basic authentication for the API (/api, /sdapi), as A1111's --api-auth")
    s.add_argument("--auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="HTTP basic authentication for the studio page (its users may use the API too)")
    s.add_argument("--allowed-hosts", default="", metavar="NAME[,NAME2]",
                   help="host names clients may reach the server by, besides loopback names and addresses "
                        "(requests naming another host are refused: DNS rebinding)")
    s.add_argument("--insecure", action="store_true",
                   help="allow --host beyond loopback without --api-auth/--auth (anyone who reaches it may use it)")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    s.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"])
    s.add_argument("--allow-pickle", action="store_true", help="allow .bin/.ckpt pickle weights (trusted files only)")
    speed_args(s, "; the server compiles once at start, warms up, and keeps it")
    s.set_defaults(func=_serve)
    if command not in CORE_COMMANDS:
        for register in _plugins():
            register(sub, command)
    return parser


def _edit_args(e: argparse.ArgumentParser):
    e.add_argument("--source-prompt", required=True, metavar="TEXT",
                   help="what the image shows (with --image: the real image's description)")
    e.add_argument("--target-prompt", default=None, metavar="TEXT",
                   help="what it should show: a word swapped (a red circle -> a red square) or words added; default: "
                        "the source prompt (for --reweight alone)")
    e.add_argument("--image", type=Path, default=None, help="a real image to edit (sides multiples of 8)")
    e.add_argument("--inversion", default=DEFAULT_INVERSION, choices=INVERSIONS,
                   help="with --image: direct (Ju et al. 2023, default: the source kept on the inversion's trajectory, "
                        "no optimisation), null-text inversion (Mokady et al. 2022), npi (negative-prompt inversion, "
                        "Miyake et al. 2023: no optimisation) or ddim (plain inversion at guidance 1)")
    e.add_argument("--inner-steps", type=int, default=10, metavar="N",
                   help="null-text inversion: optimisation steps per sampling step (default 10)")
    e.add_argument("--inner-lr", type=float, default=1e-2, metavar="LR",
                   help="null-text inversion: Adam's learning rate (default 0.01, the paper's; raise it when 10 steps "
                        "do not reach the early stop: the embedded model reconstructs 0.3 dB under its VAE at "
                        "0.01, 0.1 dB at 0.03)")
    e.add_argument("--no-cache", action="store_true",
                   help="do not read or write the inversion cache (inversion-*.safetensors beside the output)")
    e.add_argument("--cross-replace", type=float, default=0.8, metavar="F",
                   help="fraction of the steps whose cross-attention maps come from the source (default 0.8)")
    e.add_argument("--self-replace", type=float, default=0.4, metavar="F",
                   help="fraction of the steps with the source's self-attention in the low-resolution layers "
                        "(default 0.4)")
    e.add_argument("--reweight", nargs="+", default=[], metavar="WORD=F",
                   help="scale the target's attention to WORD by F (e.g. square=2.0, red=-1)")
    e.add_argument("--blend-words", nargs="+", default=[], metavar="WORD",
                   help="local blending: outside the region these words (of either prompt) attend to, the target "
                        "keeps the source's latent")
    e.add_argument("--save-source", type=Path, default=None, metavar="FILE",
                   help="also write the source image (with --image: its reconstruction)")
    model_args(e)
    output_args(e)
    add_flags(e, EDIT_OPTIONS, helps={
        "seed": "seed of the shared noise (without --image; default: random)",
        "width": "without --image: multiple of 8 (default: the model's native size)",
        "height": "without --image: multiple of 8 (default: the model's native size)"})
    threads_arg(e)


def _run_edit(args) -> list[Path]:
    """``ldm edit``: the edited (target) image to --output, or into --output-dir."""
    from tqdm import tqdm

    from ldm.attention_control import parse_reweight
    from ldm.images import load_image

    from .edit import Edit, check_edit, check_sizes, edit, infotexts
    from .pipeline import Pipeline
    from .pngmeta import save_png
    from .processes import apply_threads
    from .request import Request

    if args.output:
        check_output_file(args.output)
        out_dir = args.output.parent
    else:
        out_dir = check_output_dir(args.output_dir or Path("outputs"), "--output-dir" if args.output_dir else
                                   "the default --output-dir")
    if args.save_source:
        check_output_file(args.save_source, "--save-source")
    if args.token and len(args.token) != len(args.embedding):
        raise ValueError(f"got {len(args.token)} --token for {len(args.embedding)} --embedding")
    image = load_image(args.image) if args.image is not None else None
    req = Request(prompt=args.source_prompt, **{name: getattr(args, name) for name in EDIT_OPTIONS},
                  embeddings=list(zip(args.embedding, args.token or [None] * len(args.embedding))),
                  lora=list(args.lora)).check()
    ed = Edit(args.source_prompt, args.target_prompt, cross_replace=args.cross_replace,
              self_replace=args.self_replace, reweight=parse_reweight(args.reweight), blend_words=args.blend_words,
              images=None if image is None else [image], inversion=args.inversion, inner_steps=args.inner_steps,
              inner_lr=args.inner_lr,
              cache_dir=None if args.no_cache else out_dir)
    check_sizes(ed, req)  # before the model loads
    device = device_for(args)
    apply_threads(args.threads, device)
    pipe = Pipeline.from_pretrained(model_path(args), device=device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                    config=args.model_config, vae=args.vae, attention=args.attention)
    check_edit(pipe, ed, req)  # words, prompt lengths, image size: before any sampling
    steps = pipe.resolve(req).steps
    bar = tqdm(total=steps, desc="edit", unit="step", disable=args.quiet)
    res = edit(pipe, ed, req, callback=lambda i, x, x0: bar.update(1))
    bar.close()
    if image is not None:
        how = "from the cache" if res.cached else f"in {res.seconds.get('inversion_s', 0):.1f} s"
        log.info("%s inversion %s", args.inversion, how)
    seed = res.target.seeds[0]
    path = args.output or out_dir / f"edit-{seed}.png"
    written = [save_png(res.target.images[0], path, infotexts(pipe, res)[0])]
    if args.save_source:
        written.append(save_png(res.source.images[0], args.save_source, pipe.infotexts(res.source)[0]))
    for p in written:
        print(p)
    return written


def model_path(args):
    path = args.model or default_model_path()
    if path is None:
        raise ModelError("no --model given and no embedded model is installed; pass --model DIR "
                         "(a diffusers-format Stable Diffusion directory)")
    return path


def device_for(args) -> str:
    """``--device``, checked (ValueError naming it: a name PyTorch does not know, or a device this machine
    does not have), or the default: cuda when available, else cpu."""
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name PyTorch knows; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return name
    module = {"mps": getattr(torch.backends, "mps", None)}.get(dev.type) or getattr(torch, dev.type, None)
    available = getattr(module, "is_available", lambda: False)()
    if not available:
        raise ValueError(f"--device {name}: this machine has no {dev.type} device PyTorch can use; use --device cpu "
                         f"(or leave --device out: cuda when there is one, else cpu)")
    count = getattr(module, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {dev.type} device(s), numbered from 0")
    return name


def _serve(args) -> int:
    from .serve import Limits, Security, Studio, is_loopback, parse_credentials, serve

    try:
        limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
        security = Security(api_auth=parse_credentials(args.api_auth, "--api-auth"),
                            auth=parse_credentials(args.auth, "--auth"), host=args.host,
                            allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        if not (security.api_auth or security.auth) and not args.insecure:
            print(f"error: --host {args.host} lets other machines reach the server; give --api-auth USER:PASS (and "
                  f"--auth for the page), or --insecure to serve anyone who can reach it", file=sys.stderr)
            return 2
        log.warning("binding to %s: anyone who can reach this address%s can generate images and write files "
                    "into %s", args.host, "" if args.insecure and not security.api_auth else " and authenticates",
                    args.output_dir)
    try:
        check_output_dir(args.output_dir)
        from .processes import apply_threads
        apply_threads(args.threads, args.device or "cpu")
        studio = Studio(model_path(args), output_dir=args.output_dir, device=device_for(args),
                        limits=limits,
                        embeddings_dir=args.embeddings_dir, lora_dir=args.lora_dir, models_dir=args.models_dir,
                        upscalers_dir=args.upscalers_dir, vae_dir=args.vae_dir,
                        controlnet_dir=args.controlnet_dir,
                        load_kwargs=dict(dtype=args.dtype, attention=args.attention, allow_pickle=args.allow_pickle,
                                         config=args.model_config, vae=args.vae),
                        worker_thread=False, compile=args.compile)  # serve() runs the jobs in this (main) thread
    except (ValueError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("studio on http://%s:%d/ (API under /api, schema at /api/openapi.json); images go to %s",
             args.host, args.port, args.output_dir)
    try:
        serve(studio, args.host, args.port, security=security)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _control_preview(args) -> int:
    from ldm.control import fit, preprocess
    from ldm.images import load_image

    from .pngmeta import save_png

    try:
        check_output_file(args.output)
        if (args.width is None) != (args.height is None):
            raise ValueError("give --width and --height together (or neither: the image's own size)")
        out = preprocess(load_image(args.image), args.control_preprocessor,
                         (args.control_canny_low, args.control_canny_high))
        if args.width is not None:
            out = fit(out, args.width, args.height, args.control_resize)
        written = save_png(out, args.output, f"control map: {args.control_preprocessor} of {args.image.name}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written)
    return 0


def _upscale(args) -> int:
    from PIL import Image

    from ldm.upscalers import MAX_SIDE, OVERLAP, TILE, UpscalerError, upscale

    from .pngmeta import save_png
    from .request import Limits, upscaler_path, upscaler_problem

    try:
        check_output_file(args.output)
        if (args.width is None) != (args.height is None) or (args.width is not None and args.scale is not None):
            raise ValueError("give --scale, or --width and --height together (not both ways)")
        if args.scale is not None and not 0 < args.scale <= 16:
            raise ValueError(f"--scale must be in (0, 16], got {args.scale:g}")
        limits = Limits(upscalers_dir=args.upscalers_dir, allow_pickle=args.allow_pickle)
        if args.upscalers_dir is not None and not args.upscalers_dir.is_dir():
            raise ValueError(f"--upscalers-dir {str(args.upscalers_dir)!r} is not a directory")
        if (msg := upscaler_problem(args.upscaler, limits)) is not None:
            raise ValueError(f"--upscaler: {msg}")
        if not args.image.is_file():
            raise ValueError(f"{str(args.image)!r} does not exist")
        with Image.open(args.image) as probe:  # the header only: the size is checked before the pixels are read
            w, h = probe.size
        net = None
        if args.upscaler != "lanczos":
            from ldm.upscalers import load_upscaler

            net = load_upscaler(upscaler_path(args.upscaler, limits), allow_pickle=args.allow_pickle,
                                device=device_for(args))
        scale = args.scale if args.scale is not None else (net.scale if net is not None else 2)
        size = (args.width, args.height) if args.width is not None else (round(w * scale), round(h * scale))
        if not (1 <= min(size) and max(size) <= MAX_SIDE):
            raise ValueError(f"the output would be {size[0]}x{size[1]}; sides must be from 1 to {MAX_SIDE}")
        from ldm.images import load_image

        image = load_image(args.image)
        if net is None:
            out = image.resize(size, Image.LANCZOS)
        else:
            out = upscale(net, image, size, args.tile or TILE, OVERLAP if args.tile_overlap is None else args.tile_overlap)
        written = save_png(out, args.output, f"upscaled {image.width}x{image.height} -> {size[0]}x{size[1]} with "
                                             f"{Path(args.upscaler).stem}")
    except (ValueError, UpscalerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written)
    return 0


def _convert(args) -> int:
    from ldm.checkpoints import to_directory, to_single_file
    from ldm.models import DTYPES, load_model

    try:
        if not args.input.exists():
            raise ValueError(f"{str(args.input)!r} does not exist; give a model directory, a single-file checkpoint "
                             "or a LoRA file to convert")
        if args.input.is_file() and _is_lora(args.input):
            return _convert_lora(args)
        to_file = args.output.suffix == ".safetensors"
        if args.output.exists() and not args.overwrite:
            raise ValueError(f"{str(args.output)!r} exists; pass --overwrite to replace it")
        if to_file and not args.input.is_dir():
            raise ValueError(f"a .safetensors output is written from a diffusers directory; {str(args.input)!r} "
                             "is not one")
        if not to_file and args.input.is_dir():
            raise ValueError("the input is a directory: give an output ending in .safetensors")
        check_output_dir(args.output.parent, "the output's folder")
        model = load_model(args.input, config=args.model_config, allow_pickle=args.allow_pickle,
                           dtype=DTYPES[args.dtype] if not to_file else "fp32")
        written = (to_single_file(model, args.output, dtype=DTYPES[args.dtype]) if to_file
                   else to_directory(model, args.output))
    except (ValueError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{written} ({model.arch})")
    return 0


def _is_lora(path: Path) -> bool:
    from ldm.checkpoints import file_keys, is_kohya_lora

    keys = file_keys(path) if path.suffix == ".safetensors" else None
    if keys is None:  # not readable: the checkpoint path reports it
        return False
    return is_kohya_lora(keys) or any(k.startswith(("unet.", "text_encoder.")) and "lora" in k for k in keys)


def _convert_lora(args) -> int:
    """diffusers' LoRA layout -> kohya's, or kohya's -> diffusers' (read by diffusers' converter)."""
    from safetensors.torch import load_file, save_file

    from ldm.checkpoints import is_kohya_lora, lora_to_kohya
    from ldm.models import load_model

    if args.output.exists() and not args.overwrite:
        raise ValueError(f"{str(args.output)!r} exists; pass --overwrite to replace it")
    if args.output.suffix != ".safetensors":
        raise ValueError("a LoRA is written as one .safetensors file: give an output ending in .safetensors")
    check_output_dir(args.output.parent, "the output's folder")
    model = load_model(model_path(args), config=args.model_config)
    from .pipeline import _check_lora_arch

    _check_lora_arch(args.input, model)  # a LoRA for another family is named, not converted into a useless file
    sd = load_file(str(args.input))
    if is_kohya_lora(sd):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        loader = StableDiffusionXLPipeline if model.is_sdxl else StableDiffusionPipeline
        state, alphas = loader.lora_state_dict(sd, unet_config=model.unet.config)
        if alphas and any(float(a) != float(state[k.replace(".alpha", ".lora.down.weight")].shape[0])
                          for k, a in alphas.items() if k.replace(".alpha", ".lora.down.weight") in state):
            raise ValueError("this kohya LoRA has alphas other than its rank, which diffusers' layout cannot "
                             "carry in one file; use it as it is (--lora reads kohya files)")
        out, layout = state, "diffusers"
    else:
        out, layout = lora_to_kohya(sd, dict(model.unet.config), sdxl=model.is_sdxl), "kohya"
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(args.output)
    print(f"{args.output} (LoRA, {layout} layout, for {model.arch})")
    return 0


def _plugins():
    """Commands other packages add to ``ldm`` (the training commands of ``finetune``) through the
    ``ldm.commands`` entry-point group: each is a function ``register(sub, command)`` that adds its
    subparsers and sets ``func`` on them (the flags of ``command``, the one being run, at least).
    pipelines never imports finetune; finetune plugs in."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group="ldm.commands"), key=lambda e: e.name)]


def read_prompt_file(path: Path, flag: str = "--from-file") -> list[str]:
    """One prompt a line; blank lines and #-lines skipped. A missing, binary or empty file is an
    error naming the file and the flag."""
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a text file with one prompt a line")
    if not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {str(path)!r} is not UTF-8 text (byte {exc.start}); give a text file with one "
                         "prompt a line") from None
    if "\x00" in text:
        raise ValueError(f"{flag} {str(path)!r} is a binary file; give a text file with one prompt a line")
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{flag} {str(path)!r} holds no prompt")
    return prompts


def _prompts(args) -> list[str]:
    if args.from_file:
        if args.prompt:
            raise ValueError("give either a prompt or --from-file, not both")
        return read_prompt_file(args.from_file)
    if args.prompt is None:  # "" is a prompt (unconditional, as over HTTP and in A1111); none given is not
        raise ValueError("no prompt: give one as an argument or use --from-file")
    return [args.prompt]


def refiner_start(args) -> float | None:
    start = getattr(args, "refiner_start", None)
    if start is not None and not getattr(args, "refiner", None):
        raise ValueError("--refiner-start needs --refiner DIR (the SDXL refiner model)")
    return start if start is not None or not getattr(args, "refiner", None) else 0.8


def build_request(args, prompts: list[str]):
    """The command line's request (for the first prompt; each prompt of a file reuses its settings)."""
    if args.token and len(args.token) != len(args.embedding):
        raise ValueError(f"got {len(args.token)} --token for {len(args.embedding)} --embedding; give one per "
                         "embedding, or none to use the names stored in the files")
    from ldm.images import load_image

    from .request import Request

    image = mask = None
    if args.command in ("img2img", "inpaint"):
        image = load_image(args.image)
    if args.command == "inpaint":
        mask = load_image(args.mask, mode="L")
    kind = {"generate": "txt2img"}.get(args.command, args.command)
    tokens = args.token or [None] * len(args.embedding)
    seed = args.seed
    if seed is None and args.from_file:
        seed = 0  # a fixed default, so that a rerun names the same files and skips those already written
    options = {name: getattr(args, name) for name in options_for(kind)}  # the flags add_flags made
    options.update(seed=seed, refiner_start=refiner_start(args) if kind == "txt2img" else None)
    return Request(prompt=prompts[0], kind=kind, image=image, mask=mask, embeddings=list(zip(args.embedding, tokens)),
                   lora=list(args.lora), **unit_lists(args), **options)


def run(args) -> list[Path]:
    """``ldm generate`` / ``img2img`` / ``inpaint``. Under ``accelerate launch`` the prompts of
    ``--from-file`` are dealt over the processes (pipelines.batch); each writes its own images."""
    from tqdm import tqdm

    from .batch import Task, write_tasks
    from .pipeline import Pipeline
    from .processes import apply_threads, my_share, process_state
    from .request import Limits

    # everything that can be checked without the model, before it loads
    prompts = _prompts(args)
    n_images = len(prompts) * args.batch_size * max(args.n_iter, 1)
    if args.output and n_images > 1:
        raise ValueError(f"--output names one file but this run makes {n_images} images; use --output-dir")
    if args.output:
        check_output_file(args.output)
    out_dir = args.output_dir or (None if args.output else Path("outputs"))
    if out_dir is not None:
        check_output_dir(out_dir, "--output-dir" if args.output_dir else "the default --output-dir")
    limits = Limits(lora_dir=args.lora_dir, upscalers_dir=args.upscalers_dir, allow_pickle=args.allow_pickle)
    req = build_request(args, prompts).check(limits)

    rank, world, state = process_state()
    device = device_for(args) if args.device or world == 1 else str(state.device)
    if world == 1:  # under accelerate launch each process keeps the threads it was given
        log.debug("%s CPU threads", apply_threads(args.threads, device))
    pipe = Pipeline.from_pretrained(model_path(args), device=device, dtype=args.dtype,
                                    allow_pickle=args.allow_pickle, config=args.model_config, vae=args.vae,
                                    attention=args.attention, vae_slice_size=args.vae_slicing)
    pipe.lora_dir, pipe.upscalers_dir = args.lora_dir, args.upscalers_dir
    if args.compile:
        pipe.compile(regional=args.compile == "blocks")
    if getattr(args, "refiner", None):
        pipe.refiner = Pipeline.from_pretrained(args.refiner, device=device, dtype=args.dtype,
                                                allow_pickle=args.allow_pickle, attention=args.attention,
                                                vae_slice_size=args.vae_slicing)
    resolved = pipe.resolve(req, limits)
    if args.seed is None and not args.from_file:
        log.info("seed %d", resolved.seeds[0])
    tasks = []
    for k, prompt in enumerate(prompts):
        for j in range(args.n_iter):  # A1111's batch count: batches of the same prompt in sequence
            first = resolved.seeds[0] + (k * args.n_iter + j) * args.batch_size
            seeds = [first + i for i in range(args.batch_size)]
            paths = [args.output] if args.output else [out_dir / f"{k:05d}-{s}.png" for s in seeds]
            tasks.append(Task(prompt, seeds, paths))
    mine = len(my_share(tasks, rank, world))
    bar = tqdm(total=mine * resolved.progress_steps(),
               desc=args.command if world == 1 else f"{args.command} [{rank}/{world}]",
               unit="step", disable=args.quiet, position=rank)

    def make(task, callback):
        return pipe.generate(resolved.with_task(task.prompt, task.seeds), callback)

    written = write_tasks(pipe, tasks, make, rank=rank, world=world, skip_done=bool(args.from_file),
                          on_step=lambda i, x, x0: bar.update(1), on_skip=lambda t: bar.update(resolved.progress_steps()))
    bar.close()
    if world > 1:
        state.wait_for_everyone()  # the grid below needs every process's images
    if args.grid and out_dir and n_images > 1 and rank == 0:
        from ldm.images import load_image, make_grid

        from .pngmeta import save_png
        images = [load_image(p) for t in tasks for p in t.paths]
        written.append(save_png(make_grid(images), out_dir / "grid.png", f"grid of {len(images)} images"))
    for p in written:
        print(p)
    return written


def _command(argv: list[str]) -> str | None:
    """The sub-command a command line names (its first word that is not a flag)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for noisy in ("diffusers", "transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # accelerate's five INFO lines per checkpoint name its temporary directory; the loop says where
    # each checkpoint landed instead (its warnings still show)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)  # --help ends here, before anything heavy loads
    from transformers.utils import logging as hf_logging

    from .request import RequestError
    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar; ours shows the work
    if getattr(args, "func", None) is not None:
        return args.func(args)
    try:
        getattr(args, "job", run)(args)  # run: generate / img2img / inpaint; _run_edit: edit
    except RequestError as exc:
        print(f"error: {exc.for_cli()}", file=sys.stderr)
        return 2
    except (ValueError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the images written so far are kept", file=sys.stderr)
        return 130
    return 0


# commands that only read a model and write image files: once they have returned, every file is written
# (atomically) and closed, and nothing is left for the interpreter's own shutdown to do but to free the
# module graph of torch, transformers and diffusers, which took 1.5 s of a 7.6 s `ldm generate`
# (python bench/coldstart.py); they leave with os._exit instead
ONE_SHOT = frozenset({"generate", "img2img", "inpaint", "edit"})


def entry() -> None:
    """The console script ``ldm``."""
    rc = main(sys.argv[1:])
    if _command(sys.argv[1:]) in ONE_SHOT and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
