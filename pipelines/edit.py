"""Editing: prompt-to-prompt on generated images, and on real images through inversion.

``edit(pipe, Edit(...), Request(...))`` samples each source prompt and its target together from the
same noise, with the target's attention controlled (ldm.attention_control). With ``images`` the
sources are real images: DDIM-inverted at guidance 1, then (ldm.inversion) the source branch kept on
that trajectory (direct inversion, the default), or null-text or negative-prompt inversion so that
guided DDIM sampling with the source prompt retraces each image, and the target is sampled beside it.
Inversions are cached (safetensors) under ``cache_dir``, so a second edit of the same image costs
sampling only.

The request carries what ``ldm generate`` takes (negative prompt, sampler, steps, guidance, seed,
size, CLIP guidance, ...); its prompt is ignored (the edit's prompts are used).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.attention_control import (AttentionEdit, EditError, align_prompts, control_attention, local_blend,
                                   prompt_tokens, word_weights)
from ldm.denoiser import unet_net
from ldm.images import to_tensor
from ldm.names import DEFAULT_INVERSION, INVERSIONS
from ldm.prompts import strip_extra_networks
from ldm.inversion import (ddim_trajectory, inversion_key, load_inversion, null_text_inversion, retrace,
                           save_inversion)

from .pipeline import Pipeline, Result, _generators
from .pngmeta import _value
from .request import Request, RequestError, Resolved, _image_size

log = logging.getLogger(__name__)



@dataclass
class Edit:
    """One edit of ``n`` sources: ``source``/``target`` prompts (one each, or n each; target None = the
    source, for re-weighting alone) and the controls of ldm.attention_control."""
    source: str | list[str]
    target: str | list[str] | None = None
    cross_replace: float = 0.8             # fraction of the steps whose cross-attention maps come from the source
    self_replace: float = 0.4              # fraction of the steps with the source's self-attention (low-res layers)
    reweight: dict[str, float] = field(default_factory=dict)  # target word -> factor on its attention
    blend_words: list = field(default_factory=list)  # local blending: words of the source or target (or a list per pair)
    images: list[Any] | None = None        # real sources (PIL or (1, 3, H, W) in [-1, 1]), one per source prompt
    inversion: str = DEFAULT_INVERSION     # real sources: direct | null-text | npi (negative-prompt inversion) | ddim
    inner_steps: int = 10                  # null-text inversion: optimisation steps per sampling step ...
    inner_lr: float = 1e-2                 # ... and Adam's learning rate (the paper's 1e-2; decays 1% a step)
    cache_dir: Path | None = None          # where inversions are cached (None: not cached)

    def pair_blend_words(self) -> list[list[str]]:
        """The blend words of each pair (one list for all, or one list per pair)."""
        n = len(self.pairs())
        words = list(self.blend_words)
        if words and all(isinstance(w, (list, tuple)) for w in words):
            if len(words) != n:
                raise EditError(f"got {len(words)} lists of blend words for {n} pairs")
            return [list(w) for w in words]
        return [words] * n

    def pairs(self) -> list[tuple[str, str]]:
        src = [self.source] if isinstance(self.source, str) else list(self.source)
        tgt = self.target if self.target is not None else src
        tgt = [tgt] * len(src) if isinstance(tgt, str) else list(tgt)
        if len(tgt) != len(src):
            raise EditError(f"got {len(tgt)} target prompts for {len(src)} source prompts")
        return list(zip(src, tgt))


@dataclass
class EditResult:
    source: Result      # the source images (for real images: their reconstruction)
    target: Result      # the edited images
    inverted: int = 0   # real images inverted in this call
    cached: int = 0     # real images whose inversion came from the cache
    seconds: dict = field(default_factory=dict)  # inversion / sampling wall time


def check_sizes(ed: Edit, req: Request | None) -> None:
    """A real image keeps its size: a request's width or height beside one is a RequestError naming it
    (needs no model, so the command line asks before loading one)."""
    if ed.images is not None and req is not None:
        given = [name for name in ("width", "height") if getattr(req, name)]
        if given:
            raise RequestError([(given[0], "applies without an image (a real image keeps its size)")])


def check_edit(pipe: Pipeline, ed: Edit, req: Request | None = None) -> list[tuple]:
    """Every problem an edit can be checked for before any sampling (EditError naming the value, or
    RequestError for the request's sizes); returns the token layouts of its pairs."""
    check_sizes(ed, req)
    problems = []  # by field name: the HTTP body's key, and --field-name on the command line
    if ed.inversion not in INVERSIONS:
        problems.append(("inversion", f"must be one of {', '.join(INVERSIONS)}, got {ed.inversion!r}"))
    if isinstance(ed.inner_steps, bool) or not isinstance(ed.inner_steps, int) or ed.inner_steps < 1:
        problems.append(("inner_steps", f"must be an integer >= 1, got {ed.inner_steps!r}"))
    if isinstance(ed.inner_lr, bool) or not isinstance(ed.inner_lr, (int, float)) or not 0 < ed.inner_lr <= 1:
        problems.append(("inner_lr", f"must be a number in (0, 1], got {ed.inner_lr!r}"))
    tagged = [name for pair in ed.pairs() for name, text in zip(("source_prompt", "target_prompt"), pair)
              if isinstance(text, str) and strip_extra_networks(text) != text]
    for name in dict.fromkeys(tagged):
        problems.append((name, "has a <lora:...> tag: an edit aligns the two prompts' words and reads no tags; "
                               "apply a LoRA with --lora FILE (or the lora field)"))
    if problems:
        raise RequestError(problems)
    m = pipe.model
    tokenizer = m.tokenizer if m.tokenizer is not None else m.tokenizer_2
    layouts = []
    blend_words = ed.pair_blend_words()
    for s, t in ed.pairs():
        ts, tt = prompt_tokens(tokenizer, s), prompt_tokens(tokenizer, t)
        word_weights(tt, ed.reweight, t)
        for w in blend_words[len(layouts)]:
            if not ts.positions(w) and not tt.positions(w):
                raise EditError(f"--blend-words: {w!r} is in neither the source prompt {s!r} nor the target {t!r}")
        layouts.append((ts, tt))
    if ed.images is not None:
        if len(ed.images) != len(layouts):
            raise EditError(f"got {len(ed.images)} images for {len(layouts)} source prompts")
        f = m.vae_factor
        for im in ed.images:
            w, h = _image_size(im)
            if w % f or h % f:
                raise EditError(f"--image is {w}x{h}; both sides must be multiples of {f} (the VAE's factor): "
                                f"crop or resize it, e.g. to {w // f * f}x{h // f * f}")
    return layouts


def edit(pipe: Pipeline, ed: Edit, req: Request | None = None, callback=None) -> EditResult:
    """Run an edit (see the module's note). Real images need the ddim sampler at eta 0 (the inversion
    retraces it)."""
    m = pipe.model
    req = req or Request()
    layouts = check_edit(pipe, ed, req)
    n = len(layouts)
    pairs = ed.pairs()
    real = ed.images is not None
    size = dict(zip(("width", "height"), _image_size(ed.images[0]))) if real else {}
    seed_req = dataclasses.replace(req, prompt=[s for s, _ in pairs], kind="txt2img", batch_size=1, n_iter=1,
                                   image=None, mask=None, latents=None, **size)
    seeds = seed_req.resolve(m).seeds
    both = dataclasses.replace(seed_req, prompt=[s for s, _ in pairs] + [t for _, t in pairs], seeds=seeds + seeds,
                               seed=None)
    r = both.resolve(m)
    pipe.apply_adapters(r)
    if real and (r.sampler != "ddim" or r.eta):
        raise RequestError([("sampler", f"editing a real image retraces its DDIM inversion: use ddim at eta 0, "
                                        f"not {r.sampler} at eta {r.eta}")])
    tokens = [align_prompts(ts, tt) for ts, tt in layouts]
    mappers = torch.stack([a for a, _, _ in tokens])
    has_source = torch.stack([b for _, b, _ in tokens])
    reweight = torch.stack([word_weights(tt, ed.reweight, t) for (_, tt), (_, t) in zip(layouts, pairs)]) \
        if ed.reweight else None
    blend = None
    per_pair = ed.pair_blend_words()
    if any(per_pair):
        def marks(layout, words):
            w = torch.zeros(len(layout.ids))
            for word in words:
                w[layout.positions(word)] = 1.0
            return w
        blend = (torch.stack([marks(ts, w) for (ts, _), w in zip(layouts, per_pair)]),
                 torch.stack([marks(tt, w) for (_, tt), w in zip(layouts, per_pair)]))
    f = m.vae_factor
    latent_size = (r.height // f, r.width // f)
    steps = pipe.timesteps(r.sampler, r.steps, r.schedule)
    timing = {}
    uncond_at, inverted, cached, trajectory = None, 0, 0, None
    if real:
        t0 = time.perf_counter()
        noise, uncond_at, trajectory, inverted, cached = _invert(pipe, ed, r, n, steps)
        timing["inversion_s"] = time.perf_counter() - t0
        x = torch.cat([noise, noise])
    else:
        gens = _generators(r.seeds)
        x = pipe.prepare_noise(torch.empty(pipe.latent_shape(2 * n, r.width, r.height)), r, gens)
    clock = {"step": 0}
    control = AttentionEdit(clock=clock, n_steps=r.steps, mappers=mappers, has_source=has_source,
                            cross_replace=ed.cross_replace, self_replace=ed.self_replace, reweight=reweight,
                            blend_source=None if blend is None else blend[0],
                            blend_target=None if blend is None else blend[1], latent_size=latent_size)
    denoise = pipe.denoiser(r, pipe.extra_inputs(2 * n, r.width, r.height), clock, uncond_at=uncond_at)
    if trajectory is not None:  # direct inversion: the source rows kept on the image's trajectory
        denoise = retrace(denoise, trajectory, steps, clock, n)
    if blend is not None:
        denoise = local_blend(denoise, control)
    t0 = time.perf_counter()
    with control_attention(m.unet, control):
        x = pipe.sample(denoise, x.to(m.device), steps, r, _generators(r.seeds), callback, clock)
    if blend is not None:
        x = denoise.finish(x)
    res = pipe.decode_latents(x, r)
    timing["sampling_s"] = time.perf_counter() - t0
    settings = dict(res.settings, cross_replace=ed.cross_replace, self_replace=ed.self_replace)
    if real:
        settings["inversion"] = ed.inversion
    src = Result(res.pixels[:n], res.latents[:n], res.seeds[:n], res.prompts[:n], res.negative_prompts[:n], settings)
    tgt = Result(res.pixels[n:], res.latents[n:], res.seeds[n:], res.prompts[n:], res.negative_prompts[n:], settings)
    return EditResult(src, tgt, inverted, cached, timing)


def infotexts(pipe: Pipeline, res: EditResult) -> list[str]:
    """The PNG ``parameters`` of each edited image: the target's infotext, with the source prompt and the
    edit's controls."""
    st = res.target.settings
    extra = [("Cross replace", st.get("cross_replace")), ("Self replace", st.get("self_replace")),
             ("Inversion", st.get("inversion"))]
    return [text + "".join(f", {k}: {_value(v)}" for k, v in [("Edit source", src)] + extra if v is not None)
            for text, src in zip(pipe.infotexts(res.target), res.source.prompts)]


def _invert(pipe: Pipeline, ed: Edit, r: Resolved, n: int, steps):
    """Each real image's noise; for null-text / negative-prompt inversion ``uncond_at(step)``, the
    unconditional context of the source + target batch at each step; for direct inversion the DDIM
    trajectory [z_0, ..., z_T] of the images (else None). Cached inversions are reused."""
    m = pipe.model
    z0 = torch.cat([pipe.encode_image(to_tensor(im) if not isinstance(im, torch.Tensor) else im) for im in ed.images])
    src = dataclasses.replace(r, prompts=r.prompts[:n], negatives=r.negatives[:n], seeds=r.seeds[:n],
                              prompts_2=r.prompts_2[:n], negatives_2=r.negatives_2[:n])
    settings = dict(model=str(m.path), name=m.name, steps=r.steps, guidance=r.guidance, method=ed.inversion,
                    inner=ed.inner_steps if ed.inversion == "null-text" else None, clip_skip=r.clip_skip,
                    schedule=r.schedule, inner_lr=float(ed.inner_lr) if ed.inversion == "null-text" else None)
    keys = [inversion_key(z0[i:i + 1], prompt=src.prompts[i], negative=src.negatives[i], **settings) for i in range(n)]
    paths = [ed.cache_dir / f"inversion-{k}.safetensors" if ed.cache_dir else None for k in keys]
    found = [load_inversion(p, k) if p else None for p, k in zip(paths, keys)]
    todo = [i for i in range(n) if found[i] is None]
    noise = [None if f is None else f[0] for f in found]
    embeds = [None if f is None else f[1] for f in found]
    levels = [None if f is None else f[2] for f in found]
    if todo:
        sub = dataclasses.replace(src, prompts=[src.prompts[i] for i in todo], negatives=[src.negatives[i] for i in todo],
                                  seeds=[src.seeds[i] for i in todo], prompts_2=[src.prompts_2[i] for i in todo],
                                  negatives_2=[src.negatives_2[i] for i in todo])
        z = z0[todo]
        inv = m.schedule.inversion_steps(steps)
        with torch.no_grad():
            plain = dataclasses.replace(sub, guidance=1.0, request=dataclasses.replace(r.request, clip_guidance_scale=0.0))
            path = ddim_trajectory(pipe.denoiser(plain), z, inv)
        got = None
        if ed.inversion == "null-text" and r.guidance != 1.0:
            cond_at, uncond = pipe.encode_prompt(sub, r.steps)
            got = null_text_inversion(unet_net(m.unet), m.schedule.prediction_type, path, steps, cond_at(0), uncond,
                                      r.guidance, inner_steps=ed.inner_steps, lr=float(ed.inner_lr))
        for j, i in enumerate(todo):
            noise[i] = path[-1][j:j + 1]
            embeds[i] = None if got is None else [e[j:j + 1] for e in got]
            levels[i] = [z[j:j + 1] for z in path] if ed.inversion == "direct" else None
            if paths[i] is not None:
                save_inversion(paths[i], noise[i], embeds[i], keys[i], levels[i])
    noise = torch.cat(noise)
    trajectory = None
    if ed.inversion == "direct":
        trajectory = [torch.cat([levels[i][k] for i in range(n)]) for k in range(len(levels[0]))]
    uncond_at = None
    if ed.inversion == "npi":  # the source prompt as the unconditional prompt of source and target alike
        cond_at, _ = pipe.encode_prompt(r, r.steps, negative=False)
        c = cond_at(0)
        npi = {k: torch.cat([v[:n], v[:n]]) for k, v in c.items()}
        uncond_at = lambda step: npi  # noqa: E731
    elif ed.inversion == "null-text" and r.guidance != 1.0:
        _, uncond = pipe.encode_prompt(r, r.steps)
        per_step = [torch.cat([torch.cat([embeds[i][s] for i in range(n)])] * 2) for s in range(r.steps)]
        uncond_at = lambda step: {**uncond, "encoder_hidden_states": per_step[min(step, r.steps - 1)]}  # noqa: E731
    return noise, uncond_at, trajectory, len(todo), n - len(todo)
