"""Generation from a loaded model: text-to-image, image-to-image, inpainting and DDIM inversion.

All four share one path: encode the prompts, build the guided denoiser, pick the sampler's steps,
run the sampler from a starting latent, decode. They differ only in where the latent starts and
what the denoiser is wrapped with. What to generate arrives as one request (pipelines.request),
checked and resolved there.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ldm import autoencoder
from ldm.clip_guidance import clip_guided
from ldm.deepcache import DeepCache
from ldm.control import adapted, controlled
from ldm.denoiser import blend_known, make_denoiser, unet_net
from ldm.embeddings import add_concept, read_embeddings
from ldm.guidance import guidance_embedding, guidance_input_dim, guided
from ldm.images import to_pil, to_tensor
from ldm.locate import locate_controlnet
from ldm.models import Model, ModelError, load_model
from ldm.process import q_sample
from ldm.samplers import get_sampler, invert_ddim, randn_like, slerp
from ldm.schedule import Steps
from ldm.prompts import prompt_schedule, strip_extra_networks, text_at
from ldm.text import pad_contexts, prompt_context, size_ids

from .options import canny_thresholds
from .pngmeta import format_parameters
from .request import Limits, Request, Resolved, hires_size, sampling_defaults, strength_steps

log = logging.getLogger(__name__)


@dataclass
class Result:
    pixels: torch.Tensor                      # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor                     # (B, 4, h, w), the final latents before decoding
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        return to_pil(self.pixels)


def _generators(seeds) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed alone (so image i of a batch is the lone image)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


_HASHES: dict[tuple[str, float, int], str] = {}


def short_hash(path: Path) -> str:
    """A file's SHA-256, first 12 hex digits (A1111's short hash of LoRA and embedding files); each file
    read once per change."""
    import hashlib

    path = Path(path)
    if path.is_dir():  # a LoRA directory: its weights file
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return "unknown"
        path = files[0]
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()[:12]
    return _HASHES[key]


def _check_lora_arch(path: Path, model: Model) -> None:
    """A LoRA made for SDXL (a second text encoder, or the U-Net's added-condition layers) on an SD 1.x/2.x
    model, or the reverse, is an error naming both, before any weight is touched."""
    from ldm.checkpoints import file_keys
    from ldm.identify import identify, lora_mismatches, tensor_shapes

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:  # nothing to read: diffusers' reader says why
        return
    kind = identify(files[0])
    if kind.kind != "lora":
        raise ModelError(f"{str(files[0])!r} is {kind.description}, not a LoRA")
    keys = file_keys(files[0])
    second = any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)
    xl_unet = any("add_embedding" in k or "lora_unet_input_blocks" in k or "lora_unet_label_emb" in k for k in keys)
    sd_text = any(k.startswith("lora_te_") for k in keys)
    made_for_xl = second or xl_unet
    if made_for_xl and not model.is_sdxl or (model.is_sdxl and sd_text and not second):
        made = "SDXL" if made_for_xl else "SD 1.x / 2.x (one text encoder)"
        raise ModelError(f"LoRA {str(files[0])!r} was made for {made}, but this model is {model.arch}; use a LoRA "
                         "made for this model")
    bad, total, example = lora_mismatches(tensor_shapes(files[0]), model)
    if bad:
        raise ModelError(f"LoRA {str(files[0])!r} does not fit this {model.arch} model: {bad} of its {total} layers "
                         f"have other sizes (e.g. {example}); it was made for another model family")


class Pipeline:
    """The generation front of a Stable-Diffusion-layout model: :meth:`generate` runs a
    :class:`~pipelines.request.Request`; ``text_to_image``, ``image_to_image`` and ``inpaint`` are
    keyword shorthands that build one.

    Its steps are public, for what builds on them (editing, control) as diffusers' pipelines read:
      1. ``encode_prompt(r, n_steps)``: the text conditioning at each sampler step, and the negative's;
      2. ``timesteps(sampler, steps, schedule)``: the sampler's grid of the model's schedule;
      3. ``latent_shape(n, w, h)`` and ``prepare_noise(like, r, generators)``: the starting latents, one
         generator per image (with A1111's variation seeds); ``extra_inputs`` for inpainting U-Nets;
      4. ``denoiser(r, ...)``: one guided denoising evaluation ``denoise(x, t) -> x0``, with its hooks
         (``clock`` for attention control, ``uncond_at`` for inverted unconditional contexts, caching);
      5. ``sample(denoise, x, steps, r, generators, callback)``: the sampler over those steps;
      6. ``decode_latents(latents, r)``: the VAE's images and the Result that carries them."""

    def __init__(self, model: Model, vae_slice_size: int | None = None):
        self.model = model
        self.vae_slice_size = vae_slice_size
        self.refiner: Pipeline | None = None  # SDXL: a refiner that takes over at a request's refiner_start
        self._adapters: set[str] = set()  # embedding files applied, by resolved path and token
        self._embedding_files: dict[str, Path] = {}  # token -> the embedding file that added it
        self._clip: tuple = (None, None)  # (resolved directory, ldm.clip_guidance.ClipTower) for CLIP guidance
        self._controlnets: dict[str, torch.nn.Module] = {}  # ControlNets loaded, by resolved path
        self.lora_dir: Path | None = None  # the folder that <lora:NAME:WEIGHT> tags in prompts name files of
        self._lora_names: dict[Path, str] = {}  # LoRA files loaded as peft adapters: resolved path -> name
        self._pinned_loras: dict[Path, tuple[float, float]] = {}  # load_lora's: active in every generation
        self._active_loras: dict[Path, tuple[float, float]] = {}  # the set in force (set_loras)
        self.upscalers_dir: Path | None = None  # the folder a hires_upscaler names model upscalers of
        self.allow_pickle = False  # whether those (and LoRA, embedding files) may be pickles
        self._upscaler: tuple = (None, None)  # (resolved path, spandrel descriptor): the last one used

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "Pipeline":
        slice_size = kwargs.pop("vae_slice_size", None)
        pipe = cls(load_model(name_or_path, **kwargs), vae_slice_size=slice_size)
        pipe.allow_pickle = bool(kwargs.get("allow_pickle", False))
        return pipe

    def compile(self, *, regional: bool = False, backend: str = "inductor") -> "Pipeline":
        """torch.compile the U-Net and the VAE's decoder (in place; the first generation after it pays
        the compile time). ``regional``: compile only the U-Net's repeated transformer blocks, once each
        (diffusers' compile_repeated_blocks: shorter compile, less gain). ``backend``: torch.compile's
        (the tests trace the whole U-Net with ``aot_eager``, which skips inductor's code generation).
        Measured on the embedded model, CPU, batch 16: docs/benchmarks.md."""
        import torch

        m = self.model
        if regional and hasattr(m.unet, "compile_repeated_blocks"):
            m.unet.compile_repeated_blocks(fullgraph=True, backend=backend)
        else:
            m.unet = torch.compile(m.unet, backend=backend)
        m.vae.decoder = torch.compile(m.vae.decoder, backend=backend)
        return self

    # --- shared pieces --------------------------------------------------------------------------
    def sampling_settings(self, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> tuple[str, int, float]:
        """The given sampling settings, each None replaced by the model's default (its sampling.json,
        else ddim, 30 steps, guidance 7.5), checked."""
        Request(sampler=sampler, steps=steps, guidance=guidance_scale).check(factor=self.model.vae_factor)
        return sampling_defaults(self.model, sampler, steps, guidance_scale)

    def default_size(self) -> tuple[int, int]:
        return self.model.native_size, self.model.native_size

    def resolve(self, req: Request, limits=None) -> Resolved:
        """The request for this model, under ``limits`` (default: this pipeline's ``lora_dir`` for the
        prompts' ``<lora:NAME:WEIGHT>`` tags)."""
        return req.resolve(self.model, limits if limits is not None else self.limits())

    def limits(self) -> Limits:
        """A command line's limits: this pipeline's folders (LoRA, upscalers), and paths allowed."""
        return Limits(lora_dir=self.lora_dir, upscalers_dir=self.upscalers_dir, allow_pickle=self.allow_pickle)

    def upscaler(self, path: Path):
        """The model upscaler of a file (spandrel's descriptor on this pipeline's device), kept while the
        next request asks for the same one."""
        from ldm.upscalers import load_upscaler

        key = Path(path).resolve()
        if self._upscaler[0] != key:
            self._upscaler = (None, None)  # the previous one's memory first
            self._upscaler = (key, load_upscaler(key, allow_pickle=self.allow_pickle, device=self.model.device))
        return self._upscaler[1]

    def apply_adapters(self, r: Resolved | Request) -> None:
        """Load the request's embeddings and LoRA files that this model does not have yet, and make its
        LoRA set (``Resolved.loras``: files at their weights; a Request's ``lora`` files at weight 1) the
        active one, with the LoRA files loaded by ``load_lora`` itself."""
        req = r.request if isinstance(r, Resolved) else r
        for file, token in req.embeddings:
            key = f"embedding:{Path(file).resolve()}:{token}"
            if key not in self._adapters:
                tokens = self.load_embedding(file, token)
                log.info("embedding %s: %s", file, ", ".join(tokens))
                self._adapters.add(key)
        loras = r.loras if isinstance(r, Resolved) else [(Path(f), 1.0, 1.0) for f in req.lora]
        self.set_loras({**self._pinned_loras, **{Path(f).resolve(): (te, unet) for f, te, unet in loras}})

    def _lora_name(self, path: Path) -> str:
        """The adapter name of a LoRA file, loading it (on the U-Net and text encoders) the first time."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        key = Path(path).resolve()
        if key in self._lora_names:
            return self._lora_names[key]
        path = Path(path)
        kwargs = {}
        if path.is_file():
            kwargs["weight_name"], path = path.name, path.parent
        elif not path.is_dir():
            raise ModelError(f"LoRA file {str(path)!r} does not exist")
        m = self.model
        _check_lora_arch(key, m)
        name = f"lora{len(self._lora_names)}"
        loader = StableDiffusionXLPipeline if m.is_sdxl else StableDiffusionPipeline
        try:  # diffusers' reader converts kohya's layout (lora_unet_..., lora_te_...) to its own
            state, alphas = loader.lora_state_dict(str(path), use_safetensors=True, unet_config=m.unet.config,
                                                   **kwargs)
            if not any(k.startswith("unet.") for k in state) and any(k.startswith(("down_blocks", "up_blocks",
                                                                                     "mid_block")) for k in state):
                state = {f"unet.{k}": v for k, v in state.items()}
            loader.load_lora_into_unet(state, alphas, unet=m.unet, adapter_name=name)
            for prefix, encoder in (("text_encoder", m.text_encoder), ("text_encoder_2", m.text_encoder_2)):
                if encoder is not None and any(k.startswith(prefix + ".") for k in state):
                    loader.load_lora_into_text_encoder(state, alphas, text_encoder=encoder, prefix=prefix,
                                                       adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"could not load LoRA weights from {str(path)!r}: {exc}") from exc
        self._lora_names[key] = name
        return name

    def set_loras(self, weights: dict[Path, tuple[float, float]]) -> None:
        """Make these LoRA files (loaded here the first time) the active ones at (text-encoder, U-Net)
        weights, every other LoRA off: peft's adapters, switched, never merged, so weight 0 (or no
        LoRA) is exactly the model without it."""
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        names = {self._lora_name(f): w for f, w in weights.items()}
        m = self.model
        for net, part in ((m.unet, 1), (m.text_encoder, 0), (m.text_encoder_2, 0)):
            if net is None or not self._lora_names:
                continue
            set_adapter_layers(net, enabled=bool(names))
            if names:
                set_weights_and_activate_adapters(net, list(names), [w[part] for w in names.values()])
                for n, p in net.named_parameters():  # peft marks active adapters trainable: not here
                    if "lora_" in n:
                        p.requires_grad_(False)
        self._active_loras = {f: w for f, w in weights.items()}

    def load_embedding(self, path, token: str | None = None) -> list[str]:
        """Add the textual-inversion concept(s) of an embedding file (diffusers' or A1111's format,
        ldm.embeddings) to this model's tokenizer and text encoder; ``token`` renames a file's one
        concept. Returns the tokens now usable in prompts."""
        m = self.model
        embeds = read_embeddings(path, token)
        for name, vectors in embeds.items():
            if isinstance(vectors, dict) != m.is_sdxl:
                made = "SDXL (clip_l and clip_g)" if isinstance(vectors, dict) else "one text encoder (SD 1.x / 2.x)"
                raise ModelError(f"embedding {str(path)!r} was made for {made}, but this model is {m.arch}; use an "
                                 "embedding made for this model")
            if isinstance(vectors, dict):  # SDXL: the same token in both encoders, each with its own rows
                if m.text_encoder is not None:
                    add_concept(m.tokenizer, m.text_encoder, name, vectors["clip_l"])
                add_concept(m.tokenizer_2, m.text_encoder_2, name, vectors["clip_g"])
            else:
                add_concept(m.tokenizer, m.text_encoder, name, vectors)
            self._embedding_files[name] = Path(path).resolve()
        return list(embeds)

    def load_lora(self, path, weight: float = 1.0) -> None:
        """Apply LoRA weights (diffusers' format, as ``ldm dreambooth --lora-rank`` writes them, or
        kohya's; a file or a directory holding ``pytorch_lora_weights.safetensors``) to the U-Net and,
        when the file has them, the text encoders, for every generation from now on; read from
        safetensors only. A request's own LoRA files and ``<lora:...>`` tags come on top."""
        self._lora_name(path)  # loaded (or refused) before it joins the LoRA set of every generation
        self._pinned_loras[Path(path).resolve()] = (weight, weight)
        self.set_loras(self._pinned_loras)

    def encode_prompt(self, r: Resolved, n_steps: int, negative: bool = True):
        """The U-Net's text conditioning for a request: ``cond_at(step) -> context`` (the batch's context
        at sampler step ``step``, which changes with prompt editing and alternation) and the negative
        prompts' context (None without ``negative``).

        Prompts are read as A1111 reads them (ldm.prompts, ldm.text.prompt_context: emphasis, chunks
        of 75 tokens, BREAK, ``[from:to:when]``, ``[a|b]``), each distinct text encoded once, every
        context padded to the same number of chunks. SDXL (Podell et al. 2023): both encoders'
        penultimate states and the pooled embedding (the second prompt goes to the second encoder),
        plus ``time_ids``, the size conditioning: original size, crop top-left, target size, or for
        the refiner original size, crop and an aesthetic score (6 for the prompt, 2.5 for the
        negative, diffusers' defaults). An empty negative prompt is zeros where the model says
        force_zeros_for_empty_prompt."""
        m = self.model
        plans = []  # per image: [(end_at_step, (text, text_2))]
        for p1, p2 in zip(r.prompts, r.prompts_2):
            s1, s2 = prompt_schedule(p1, n_steps, r.hires_base), prompt_schedule(p2, n_steps, r.hires_base)
            bounds = sorted({e for e, _ in s1} | {e for e, _ in s2})
            plans.append([(b, (s1[text_at(s1, b)][1], s2[text_at(s2, b)][1])) for b in bounds])
        keys = list(dict.fromkeys(k for plan in plans for _, k in plan))
        zero_negative = m.is_sdxl and m.force_zeros_for_empty_prompt and not any(r.negatives + r.negatives_2)
        neg_keys = list(dict.fromkeys(zip(r.negatives, r.negatives_2))) if negative and not zero_negative else []
        all_keys = keys + neg_keys
        encoded = prompt_context(m, [k[0] for k in all_keys], [k[1] for k in all_keys], clip_skip=r.clip_skip)
        if len({c["encoder_hidden_states"].shape[1] for c in encoded}) > 1:
            encoded = pad_contexts(encoded, prompt_context(m, [""], [""], clip_skip=r.clip_skip)[0])
        by_key = dict(zip(all_keys, encoded))

        def time_ids(neg: bool) -> torch.Tensor:  # SDXL's size conditioning, (B, 5 or 6)
            return torch.tensor([size_ids(m, r.height, r.width, negative=neg)] * len(plans), dtype=torch.float32)

        def batch(contexts: list[dict], neg: bool) -> dict:
            ctx = {k: torch.cat([c[k] for c in contexts]) for k in contexts[0]}
            if m.is_sdxl:
                ctx["time_ids"] = time_ids(neg)
            return ctx

        cache: dict = {}

        def cond_at(step: int) -> dict:
            picks = tuple(text_at(plan, step) for plan in plans)
            if picks not in cache:
                cache[picks] = batch([by_key[plan[i][1]] for plan, i in zip(plans, picks)], neg=False)
            return cache[picks]

        uncond = None
        if negative:
            if zero_negative:
                like = cond_at(0)
                uncond = {k: torch.zeros_like(like[k]) for k in ("encoder_hidden_states", "text_embeds")}
                uncond["time_ids"] = time_ids(neg=True)
            else:
                uncond = batch([by_key[k] for k in zip(r.negatives, r.negatives_2)], neg=True)
        return cond_at, uncond

    def denoiser(self, r: Resolved, concat=None, clock: dict | None = None, n_steps: int | None = None,
                  uncond_at: Callable[[int], dict] | None = None) -> Callable:
        """The guided denoiser of a request; with a ``clock`` ({"step": i}, advanced by ``_sample``) the
        conditioning follows the prompts' editing schedule over ``n_steps`` steps. ``uncond_at(step)``
        replaces the unconditional context step by step (null-text inversion's embeddings). With the
        request's clip_guidance_scale the clean estimate follows a CLIP loss (ldm.clip_guidance)."""
        m = self.model
        prompts, negs, guidance_scale, guidance_rescale = r.prompts, r.negatives, r.guidance, r.guidance_rescale
        w_dim = guidance_input_dim(m.unet)
        extra = {}
        if w_dim is not None:
            # a guidance-distilled U-Net (Meng et al. 2023) takes w as an input: one pass, no unconditional branch
            if any(negs):
                log.warning("this model takes the guidance scale as an input and has no unconditional branch; "
                            "the negative prompt is ignored")
            if guidance_rescale:
                log.warning("guidance rescale needs the unconditional branch, which this model does not run; ignored")
            extra["timestep_cond"] = guidance_embedding(guidance_scale, w_dim, len(prompts))
            guidance_scale, guidance_rescale = 1.0, 0.0
            uncond_at = None
        if concat is not None:
            extra["concat"] = concat
        cond_at, uncond = self.encode_prompt(r, n_steps or r.steps, negative=guidance_scale != 1.0)
        with_concat = (lambda u: u) if concat is None else (lambda u: {**u, "concat": concat})
        if uncond is not None:
            uncond = with_concat(uncond)
        net = unet_net(m.unet)
        q = r.request
        if q.cache_interval > 1:  # DeepCache (ldm.deepcache): the deep blocks every cache_interval-th evaluation
            net = DeepCache(m.unet, q.cache_interval, q.cache_depth).wrap(net)
        if q.adapters:  # T2I-Adapter (ldm.control): its features, computed once, added at every evaluation
            net = adapted(net, self.adapter_features(r))
        if q.controls:  # ControlNet (ldm.control): each unit's residuals added at every evaluation
            units = self.control_units(r)
            if clock is None:
                clock = {"step": 0}
            net = controlled(net, units, clock, n_steps or r.steps)
            if any(u.mode == "control" for u in units):  # which rows are conditional (guess mode's half)
                n = len(prompts)
                extra["control_rows"] = torch.ones(n)
                plain_concat = with_concat
                with_concat = lambda u: {**plain_concat(u), "control_rows": torch.zeros(n)}  # noqa: E731
                if uncond is not None:
                    uncond = {**uncond, "control_rows": torch.zeros(n)}
        fns = {}  # one guided function (its batched context built once) per distinct conditioning

        def model_fn(x, t):
            step = clock["step"] if clock else 0
            cond = cond_at(step)
            if uncond_at is not None and guidance_scale != 1.0:  # a new unconditional context every step
                return guided(net, {**cond, **extra}, with_concat(uncond_at(step)), guidance_scale,
                              guidance_rescale)(x, t)
            if id(cond) not in fns:
                fns[id(cond)] = guided(net, {**cond, **extra}, uncond, guidance_scale, guidance_rescale)
            return fns[id(cond)](x, t)

        denoise = make_denoiser(model_fn, m.schedule.prediction_type)
        if q.clip_guidance_scale > 0:
            guide = self.clip_tower(q.clip_model).guide([strip_extra_networks(p) for p in r.prompts], q.clip_cutouts)
            denoise = clip_guided(denoise, lambda z: autoencoder.decode_with_grad(m.vae, z), guide,
                                  q.clip_guidance_scale, _generators(r.seeds))
        return denoise

    def _conditioner(self, path, what: str, load: Callable):
        """A ControlNet or T2I-Adapter (``load(path, unet) -> module``, which raises ValueError or OSError for
        a file that does not fit) in the U-Net's dtype on its device, loaded once per path."""
        if isinstance(path, torch.nn.Module):
            return path
        key = str(Path(path).resolve())
        if key not in self._controlnets:
            m = self.model
            try:
                net = load(key, m.unet)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"could not use the {what} in {str(path)!r}: {exc}") from None
            net = net.to(m.device) if net.dtype == m.unet.dtype else net.to(m.device, m.unet.dtype)  # (no
            self._controlnets[key] = net.eval().requires_grad_(False)  # cast when none is needed: diffusers warns)
        return self._controlnets[key]

    def load_controlnet(self, path):
        """A ControlNet: a diffusers directory or one .safetensors file (diffusers' or the original layout);
        one made for another architecture is a ModelError naming both."""
        from diffusers import ControlNetModel

        from ldm.control import check_fits, controlnet_from_single_file

        def load(key, unet):
            net = controlnet_from_single_file(key, unet) if Path(key).is_file() else \
                ControlNetModel.from_pretrained(key, use_safetensors=True)
            check_fits(net, unet, repr(key), self.model.arch)
            return net

        if not isinstance(path, torch.nn.Module):
            path = locate_controlnet(path)  # a path, or an embedded ControlNet's name (shapes)
        return self._conditioner(path, "ControlNet", load)

    def control_units(self, r: Resolved) -> list:
        """The request's ControlNet units (ldm.control.Unit): each model loaded, each control image
        preprocessed and fitted to the request's size."""
        from ldm.control import Unit, fit, preprocess, to_tensor01
        from ldm.images import load_image

        units = []
        for u in r.request.controls:
            image = u["image"]
            if isinstance(image, torch.Tensor):
                tensor = image
            else:
                image = load_image(image) if isinstance(image, (str, Path)) else image
                mapped = preprocess(image, u.get("preprocessor", "none"), canny_thresholds(u))
                tensor = to_tensor01(fit(mapped, r.width, r.height, u.get("resize", "just-resize")))
            units.append(Unit(self.load_controlnet(u["model"]), tensor, weight=float(u.get("weight", 1.0)),
                              start=float(u.get("start", 0.0)), end=float(u.get("end", 1.0)),
                              mode=u.get("mode", "balanced")))
        return units

    def load_adapter(self, path):
        """A T2I-Adapter (diffusers' directory, safetensors); one for another architecture is a ModelError
        naming both."""
        from diffusers import T2IAdapter

        from ldm.control import check_adapter_fits

        def load(key, unet):
            net = T2IAdapter.from_pretrained(key, use_safetensors=True)
            check_adapter_fits(net, unet, repr(key), self.model.arch)
            return net

        return self._conditioner(path, "T2I-Adapter", load)

    @torch.no_grad()
    def adapter_features(self, r: Resolved) -> list:
        """The request's T2I-Adapter features (ldm.control.adapter_features): each image preprocessed as a
        ControlNet's, resized to the request's size (Lanczos, as diffusers does), grey for a one-channel
        adapter."""
        from ldm.control import adapter_features, preprocess, to_tensor01
        from ldm.images import load_image

        units = []
        for u in r.request.adapters:
            adapter = self.load_adapter(u["model"])
            image = u["image"]
            if not isinstance(image, torch.Tensor):
                image = load_image(image) if isinstance(image, (str, Path)) else image
                image = preprocess(image, u.get("preprocessor", "none"), canny_thresholds(u))
                image = image.resize((r.width, r.height), Image.LANCZOS)
                if adapter.config.get("in_channels", 3) == 1:  # a one-channel adapter (sketch): the grey image
                    image = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None, None]
                else:
                    image = to_tensor01(image)
            units.append((adapter, image, float(u.get("weight", 1.0))))
        return adapter_features(units)

    def clip_tower(self, clip_dir=None):
        """The CLIP used for CLIP guidance (``clip_dir``, default the embedded model's own), loaded once."""
        from ldm.clip_guidance import default_clip_dir, load_clip

        path = Path(clip_dir) if clip_dir else default_clip_dir(self.model)
        key = str(path.resolve())
        if self._clip[0] != key:
            self._clip = (key, load_clip(path, self.model))
        return self._clip[1]

    def timesteps(self, sampler: str, steps: int, schedule: str = "default") -> Steps:
        return self.model.schedule.steps(steps, schedule=schedule, **get_sampler(sampler).grid)

    @torch.no_grad()
    def sample(self, denoise, x, steps: Steps, r: Resolved, generators, callback, clock: dict | None = None,
                first: int = 0):
        """Run the request's sampler; ``clock["step"]`` follows the steps (from ``first``), for prompt
        editing."""
        spec = get_sampler(r.sampler)
        if clock is not None:
            clock["step"] = first
            user = callback

            def callback(i, xi, x0):
                clock["step"] = first + i + 1
                if user is not None:
                    user(i, xi, x0)
        kwargs = {}
        if spec.needs_generator(r.eta):
            kwargs["generator"] = generators
        if r.eta:
            kwargs["eta"] = r.eta
        if r.request.s_noise != 1.0:  # (the request's check allows it only for samplers that take it)
            kwargs["s_noise"] = r.request.s_noise
        return spec.fn(denoise, x, steps, callback=callback, **kwargs)

    def decode_latents(self, latents, r: Resolved) -> Result:
        pixels = autoencoder.decode(self.model.vae, latents, self._slice(latents.shape[0]))
        return Result(pixels, latents, list(r.seeds), list(r.prompts), list(r.negatives), r.settings())

    def infotexts(self, res: Result) -> list[str]:
        """The A1111 ``parameters`` text (A1111's "infotext") of each image of ``res``: what its PNG carries."""
        st = res.settings
        sub = st.get("subseed")
        upscaler = st.get("hires_upscaler")  # a model upscaler by its name (a file's stem), as A1111 writes it
        upscaler = {"latent": "Latent", "lanczos": "Lanczos"}.get(upscaler, upscaler and Path(upscaler).stem)
        return [format_parameters(p, n, steps=st["steps"], sampler=st["sampler"], guidance=st["guidance"], seed=s,
                                  schedule=st.get("schedule"),
                                  width=st["width"], height=st["height"], model=self.model.name,
                                  strength=st.get("strength"), **{
                                      "Variation seed": None if sub is None else sub + k,
                                      "Variation seed strength": st.get("subseed_strength"),
                                      "Clip skip": st.get("clip_skip"), "Hires upscale": st.get("hires_scale"),
                                      "CLIP guidance scale": st.get("clip_guidance_scale"),
                                      "Cache interval": st.get("cache_interval"), "Cache depth": st.get("cache_depth"),
                                      "Hires steps": st.get("hires_steps"), "Hires upscaler": upscaler,
                                      "Refiner": st.get("refiner"), "Refiner switch at": st.get("refiner_start"),
                                      **{k: v for k, v in st.items() if k.startswith("ControlNet ")},
                                      **st.get("a1111", {}),
                                      **self.adapter_parameters(f"{p} {n}"), "Dtype": self.dtype_name()})
                for k, (p, n, s) in enumerate(zip(res.prompts, res.negative_prompts, res.seeds))]

    def dtype_name(self) -> str | None:
        """The U-Net's dtype where it is not fp32 (the PNG records it then: bf16 on a CPU, fp16 on CUDA),
        with the VAE's where that differs."""
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        unet, vae = (names.get(m.dtype, str(m.dtype)) for m in (self.model.unet, self.model.vae))
        if unet == "fp32":
            return None
        return unet if vae == unet else f"{unet} (VAE {vae})"

    def adapter_parameters(self, text: str = "") -> dict:
        """What A1111 records of the files applied: ``VAE`` (a replaced VAE's file name), ``Lora hashes``
        (every LoRA applied) and ``TI hashes`` (the embeddings whose tokens ``text``, the prompt and
        negative prompt, uses), each "name: hash, ..." with A1111's short hash (the first 12 hex
        digits of the file's SHA-256)."""
        import re

        out = {}
        if self.model.vae_file is not None:
            out["VAE"] = self.model.vae_file.name
        loras = [f"{f.stem}: {short_hash(f)}" for f in sorted(self._active_loras)]
        used = {f for token, f in self._embedding_files.items()
                if re.search(rf"(?<![\w<]){re.escape(token)}(?![\w>])", text)}
        tis = [f"{f.stem}: {short_hash(f)}" for f in sorted(used)]
        if loras:
            out["Lora hashes"] = ", ".join(loras)
        if tis:
            out["TI hashes"] = ", ".join(tis)
        return out

    def _slice(self, batch: int) -> int | None:
        if self.vae_slice_size:
            return self.vae_slice_size
        return 1 if batch > 4 else None  # large batches decode one image at a time

    def latent_shape(self, n, width, height):
        f = self.model.vae_factor
        return (n, self.model.unet.config.out_channels, height // f, width // f)

    def encode_image(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """An image (PIL, or a tensor in [-1, 1]) -> scaled latents (1, 4, h, w); its sides must be
        multiples of the VAE's factor."""
        x = to_tensor(image) if isinstance(image, Image.Image) else image
        f = self.model.vae_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image: is {x.shape[-1]}x{x.shape[-2]}; both sides must be multiples of {f}")
        return autoencoder.encode(self.model.vae, x.to(self.model.device))

    # --- the tasks ------------------------------------------------------------------------------
    def generate(self, req: Request | Resolved, callback=None, on_batch=None) -> Result:
        """Run a request (resolved here if it is not yet): its embeddings and LoRA files are loaded
        first. Image i draws its noise from a generator seeded with its own seed alone, so it equals
        a lone image made with that seed. ``on_batch(result)`` is called as each batch of an n_iter run
        is made (the server writes it then, so an interrupted or failed run keeps the batches before)."""
        r = req if isinstance(req, Resolved) else self.resolve(req)
        self.apply_adapters(r)
        run = {"txt2img": self._text_to_image, "img2img": self._image_to_image, "inpaint": self._inpaint}[r.kind]
        results = []
        for part in r.iterations():  # n_iter batches one after another
            results.append(run(part, _generators(part.seeds), callback))
            if on_batch is not None:
                on_batch(results[-1])
        if len(results) == 1:
            return results[0]
        first = results[0]
        return Result(torch.cat([x.pixels for x in results]), torch.cat([x.latents for x in results]),
                      [s for x in results for s in x.seeds], [p for x in results for p in x.prompts],
                      [n for x in results for n in x.negative_prompts], first.settings)

    def prepare_noise(self, like: torch.Tensor, r: Resolved, gens) -> torch.Tensor:
        """The starting noise of each image from its seed; with variation seeds (A1111's subseed) the
        spherical interpolation (Shoemake 1985) of that noise towards the subseed's by subseed_strength,
        which keeps a Gaussian's norm where the two are near-orthogonal, as independent noises are."""
        noise = randn_like(like, gens)
        if not r.subseeds:
            return noise
        sub = randn_like(like, _generators(r.subseeds))
        return slerp(noise, sub, r.request.subseed_strength)

    def text_to_image(self, prompt, *, negative_prompt=None, steps: int | None = None, guidance_scale: float | None = None,
                      guidance_rescale: float = 0.0, seed: int | None = None, seeds=None, batch_size: int = 1,
                      width: int | None = None, height: int | None = None, sampler: str | None = None,
                      eta: float = 0.0, latents: torch.Tensor | None = None, callback=None, **options) -> Result:
        """Generate images for a prompt (or a list of prompts, ``batch_size`` images each);
        ``latents`` starts from given noise (e.g. from ``invert``). ``options``: any other field of
        ``Request`` (schedule, clip_skip, subseed, ...)."""
        return self.generate(Request(
            prompt, "txt2img", negative_prompt, sampler, steps, guidance_scale, guidance_rescale, eta, seed, seeds,
            width, height, batch_size, latents=latents, **options), callback)

    def image_to_image(self, prompt, image, *, strength: float = 0.8, negative_prompt=None, steps: int | None = None,
                       guidance_scale: float | None = None, guidance_rescale: float = 0.0, seed=None, seeds=None,
                       batch_size: int = 1, sampler: str | None = None, eta: float = 0.0, callback=None,
                       **options) -> Result:
        """SDEdit (Meng et al. 2022): noise the image's latents to the level ``strength`` of the way up
        the schedule and denoise from there; int(strength x steps) steps run."""
        return self.generate(Request(
            prompt, "img2img", negative_prompt, sampler, steps, guidance_scale, guidance_rescale, eta, seed, seeds,
            batch_size=batch_size, strength=strength, image=image, **options), callback)

    def inpaint(self, prompt, image, mask, *, strength: float = 1.0, negative_prompt=None, steps: int | None = None,
                guidance_scale: float | None = None, guidance_rescale: float = 0.0, seed=None, seeds=None,
                batch_size: int = 1, sampler: str | None = None, eta: float = 0.0, callback=None,
                **options) -> Result:
        """Repaint the white part of ``mask`` (an image the size of ``image``; white = repaint).

        On a 9-channel inpainting U-Net the mask and the masked image's latents are extra input
        channels; on an ordinary checkpoint the kept region is blended back at every step."""
        return self.generate(Request(
            prompt, "inpaint", negative_prompt, sampler, steps, guidance_scale, guidance_rescale, eta, seed, seeds,
            batch_size=batch_size, strength=strength, image=image, mask=mask, **options), callback)

    def _text_to_image(self, r: Resolved, gens, callback) -> Result:
        n = len(r.prompts)
        clock = {"step": 0}
        denoise = self.denoiser(r, self.extra_inputs(n, r.width, r.height), clock)
        latents = r.request.latents
        if latents is None:
            # (B, 4, H/8, W/8): unit-variance noise is x_T at the first level (alpha_bar ~ 0)
            latents = self.prepare_noise(torch.empty(self.latent_shape(n, r.width, r.height)), r, gens)
        x = latents.to(self.model.device, torch.float32)
        steps = self.timesteps(r.sampler, r.steps, r.schedule)
        if r.request.hires_scale is not None:
            return self._hires(self.sample(denoise, x, steps, r, gens, callback, clock), r, callback)
        if r.request.refiner_start is None:
            return self.decode_latents(self.sample(denoise, x, steps, r, gens, callback, clock), r)
        if self.refiner is None:
            raise ValueError("refiner_start: no refiner is loaded (Pipeline.refiner; --refiner on the command line)")
        k = steps.split_at(r.request.refiner_start, self.model.schedule.num_train_timesteps)
        x = self.sample(denoise, x, steps.head(k), r, gens, callback, clock)
        return self.refiner._refine(x, r, gens, callback, first=k)

    def _refine(self, x, r: Resolved, gens, callback, first: int) -> Result:
        """The refiner's part of a base + refiner run (diffusers' denoising_start): the steps of its own
        grid below the base's cutoff, from the base's latents as they are (no noise added)."""
        steps = self.timesteps(r.sampler, r.steps, r.schedule)
        mine = steps.tail(steps.split_at(r.request.refiner_start, self.model.schedule.num_train_timesteps))
        units = {k: v for k, v in r.settings().items() if k.startswith("ControlNet ")}  # the base's, recorded
        if r.request.controls:  # ControlNets are the base's: the refiner runs without them (as in A1111)
            r = dataclasses.replace(r, request=dataclasses.replace(r.request, controls=[]))
        clock = {"step": first}
        denoise = self.denoiser(r, clock=clock)

        def offset(i, xi, x0):  # the progress callback counts on from the base's steps
            if callback is not None:
                callback(first + i, xi, x0)

        res = self.decode_latents(self.sample(denoise, x, mine, r, gens, offset, clock, first), r)
        res.settings.update(refiner=self.model.name, refiner_start=r.request.refiner_start, **units)
        return res

    def extra_inputs(self, n, width, height):
        """A 9-channel inpainting U-Net asked for plain text-to-image gets an all-masked image."""
        if not self.model.is_inpainting:
            return None
        shape = self.latent_shape(n, width, height)
        mask = torch.ones(shape[0], 1, *shape[2:])
        masked = autoencoder.encode(self.model.vae, torch.zeros(1, 3, height, width, device=self.model.device))
        return torch.cat([mask.to(masked), masked.expand(n, -1, -1, -1)], dim=1)

    def _strength_steps(self, r: Resolved) -> Steps:
        """The last ``run_steps`` of the request's ``steps`` (pipelines.request.strength_steps)."""
        return self.timesteps(r.sampler, r.steps, r.schedule).tail(r.steps - r.run_steps)

    def _image_to_image(self, r: Resolved, gens, callback) -> Result:
        z0 = self.encode_image(r.request.image).expand(len(r.prompts), -1, -1, -1)
        return self.decode_latents(self._sdedit(z0, r, gens, callback), r)

    def _sdedit(self, z0: torch.Tensor, r: Resolved, gens, callback) -> torch.Tensor:
        """SDEdit from latents z0 (B, 4, h, w): noised to the first of the last ``run_steps`` levels,
        then denoised."""
        sched_steps = self._strength_steps(r)
        if len(sched_steps) == 0:
            return z0.clone()
        clock = {"step": 0}
        # prompt editing over the steps that run; a hires pass's over its steps, after the first pass's (A1111's)
        n_steps = r.steps if r.hires_base is not None else r.run_steps
        denoise = self.denoiser(r, self.extra_inputs(len(r.prompts), r.width, r.height), clock, n_steps)
        noise = self.prepare_noise(z0, r, gens) * (r.request.noise_multiplier if r.kind != "txt2img" else 1.0)
        x = q_sample(z0, noise, sched_steps.alpha_bars[0])
        return self.sample(denoise, x, sched_steps, r, gens, callback, clock)

    def _hires(self, z: torch.Tensor, r: Resolved, callback) -> Result:
        """A1111's hires fix: the first pass's latents upscaled (bilinear on the latents, or Lanczos on
        the decoded image, encoded again), then image-to-image at the larger size with hires_strength
        over hires_steps, noise drawn again from each image's seed. The progress callback counts on."""
        q, f = r.request, self.model.vae_factor
        width, height = hires_size(r.width, q.hires_scale, f), hires_size(r.height, q.hires_scale, f)
        steps = q.hires_steps or r.steps
        second = dataclasses.replace(r, width=width, height=height, steps=steps, strength=q.hires_strength,
                                     run_steps=strength_steps(steps, q.hires_strength), subseeds=None,
                                     hires_base=r.steps)
        res = None
        if q.hires_upscaler == "latent":
            z = F.interpolate(z, size=(height // f, width // f), mode="bilinear", align_corners=False)
        else:
            pixels = autoencoder.decode(self.model.vae, z, self._slice(z.shape[0]))
            if r.upscaler is not None:  # a model upscaler (A1111: run until large enough, then Lanczos to size)
                from ldm.upscalers import upscale

                net = self.upscaler(r.upscaler)
                big = [upscale(net, im, (width, height)) for im in to_pil(pixels)]
            else:
                big = [im.resize((width, height), Image.LANCZOS) for im in to_pil(pixels)]
            if q.hires_strength == 0:  # the upscaled images themselves: no second pass, no second VAE trip
                res = Result(torch.stack([to_tensor(im)[0] / 2 + 0.5 for im in big]), z, list(r.seeds),
                             list(r.prompts), list(r.negatives), second.settings())
            else:
                z = torch.cat([self.encode_image(im) for im in big])

        def later(i, xi, x0):
            if callback is not None:
                callback(r.steps + i, xi, x0)

        if res is None:  # (at strength 0 no step runs: the upscaled latents decoded)
            res = self.decode_latents(self._sdedit(z, second, _generators(r.seeds), later), second)
        res.settings.update(r.settings(), width=r.width, height=r.height)
        return res

    def _inpaint(self, r: Resolved, gens, callback) -> Result:
        """Inpainting as A1111 does it (ldm.inpaint): the mask inverted and blurred as asked; with
        only_masked the mask's box (plus padding, at the working size's aspect ratio) cut out and worked
        at r.width x r.height; the masked region started from the original, its surroundings' colours,
        noise or nothing; the latents' mask rounded; the known region's latents kept clean at every step
        (an ordinary checkpoint) or given as the 9-channel input (an inpainting one); and the result
        laid over the original by the blurred mask (doubled where the whole image was worked), so
        that pixels outside it are the input's exactly."""
        from ldm import inpaint

        q = r.request
        n = len(r.prompts)
        sched_steps = self._strength_steps(r)
        original = q.image if isinstance(q.image, Image.Image) else to_pil(q.image.clamp(-1, 1) / 2 + 0.5)[0]
        mask = q.mask if isinstance(q.mask, Image.Image) else to_pil(self._mask_tensor(q.mask).expand(-1, 3, -1, -1))[0]
        mask = mask.convert("L")
        if q.mask_invert:
            mask = ImageOps.invert(mask)
        mask = inpaint.blur_mask(mask, q.mask_blur)
        region = inpaint.crop_region(mask, q.only_masked_padding, r.width, r.height) if q.only_masked else None
        if region is not None:  # the box, worked at the working size
            work = original.convert("RGB").crop(region).resize((r.width, r.height), Image.LANCZOS)
            work_mask = mask.crop(region).resize((r.width, r.height), Image.LANCZOS)
            over = mask
        else:
            if q.only_masked:  # an empty mask: nothing to repaint, worked whole at its own size
                log.info("only_masked: the mask is empty; the whole image is worked")
            work, work_mask = original.convert("RGB"), mask
            over = mask.point(lambda v: min(255, 2 * v))  # A1111's overlay when the whole image is worked
        if q.inpaint_fill != "original":
            work = inpaint.fill_masked(work, work_mask)
        img_t = to_tensor(work)
        z0 = self.encode_image(img_t).expand(n, -1, -1, -1)
        lat_hw = z0.shape[-2:]
        repaint = inpaint.latent_mask(work_mask, *lat_hw).to(z0)  # (1, 1, h, w), 1 = repaint
        keep = 1 - repaint
        noise = self.prepare_noise(z0, r, gens)
        if q.inpaint_fill == "latent-noise":
            z0 = z0 * keep + noise * repaint
        elif q.inpaint_fill == "latent-nothing":
            z0 = z0 * keep
        noise = noise * q.noise_multiplier
        concat = None
        if self.model.is_inpainting:
            binary = (self._mask_tensor(work_mask) >= 0.5).float()  # white = repaint
            masked = autoencoder.encode(self.model.vae, (img_t * (1 - binary)).to(self.model.device))
            m_lat = F.interpolate(binary, size=lat_hw)  # nearest, as the inpainting models were trained
            concat = torch.cat([m_lat.to(masked), masked], dim=1).expand(n, -1, -1, -1)
        clock = {"step": 0}
        denoise = self.denoiser(r, concat, clock, r.run_steps)
        # at full strength the start is pure noise, as in text-to-image (and diffusers' inpainting);
        # below it the image noised to the first level
        x = noise.clone() if r.run_steps == r.steps else q_sample(z0, noise, sched_steps.alpha_bars[0])
        if not self.model.is_inpainting:
            denoise = blend_known(denoise, z0, keep, noise)
        x = self.sample(denoise, x, sched_steps, r, gens, callback, clock)
        if not self.model.is_inpainting:
            x = keep * z0 + repaint * x  # the kept region is the image's own latents, clean
        res = self.decode_latents(x, r)
        return dataclasses.replace(res, pixels=self._overlay(res.pixels, original, over, region))

    @staticmethod
    def _overlay(pixels: torch.Tensor, original: Image.Image, mask: Image.Image, region) -> torch.Tensor:
        """The generated ``pixels`` (N, 3, h, w) in [0, 1], resized into ``region`` of the original when
        given, laid over the original by ``mask`` (L, the original's size): the original where it is 0."""
        base = (to_tensor(original.convert("RGB")) / 2 + 0.5).to(pixels)
        m = Pipeline._mask_tensor(mask).to(pixels)
        gen = pixels
        if region is not None:
            x1, y1, x2, y2 = region
            inner = F.interpolate(pixels, size=(y2 - y1, x2 - x1), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
            gen = base.expand(pixels.shape[0], -1, -1, -1).clone()
            gen[:, :, y1:y2, x1:x2] = inner
        return gen * m + base * (1 - m)

    @staticmethod
    def _mask_tensor(mask) -> torch.Tensor:
        if isinstance(mask, Image.Image):
            arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
            mask = torch.from_numpy(arr)
        mask = mask.float()
        while mask.ndim < 4:
            mask = mask[None]
        return mask  # (1, 1, H, W) in [0, 1]

    @torch.no_grad()
    def invert(self, image, *, prompt: str = "", steps: int = 50, guidance_scale: float = 1.0,
               callback=None) -> torch.Tensor:
        """DDIM inversion: the noise latents (1, 4, h, w) that DDIM sampling with the same prompt,
        steps and guidance maps back to ``image`` (exactly in the limit of many steps)."""
        r = Request(prompt, "img2img", "", "ddim", steps, guidance_scale, image=image, strength=1.0).resolve(self.model)
        z0 = self.encode_image(image)
        denoise = self.denoiser(r, self.extra_inputs(1, r.width, r.height))
        inv = self.model.schedule.inversion_steps(self.timesteps("ddim", steps))
        return invert_ddim(denoise, z0, inv, callback=callback)
