"""Generation from a loaded model: text-to-image, image-to-image, inpainting and DDIM inversion.

All four share one path: encode the prompts, build the guided denoiser, pick the sampler's steps,
run the sampler from a starting latent, decode. They differ only in where the latent starts and
what the denoiser is wrapped with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm import autoencoder
from ldm.denoiser import blend_known, make_denoiser, unet_net
from ldm.embeddings import add_concept, read_embeddings
from ldm.guidance import guidance_embedding, guidance_input_dim, guided
from ldm.images import to_pil, to_tensor
from ldm.models import Model, ModelError, load_model
from ldm.process import q_sample
from ldm.samplers import STOCHASTIC, get_sampler, invert_ddim, randn_like
from ldm.schedule import Steps
from ldm.text import encode_prompts

from .pngmeta import format_parameters

log = logging.getLogger(__name__)

MAX_SIDE = 4096


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


def _check_sampling(steps: int, guidance_scale: float):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if guidance_scale < 0:
        raise ValueError(f"guidance scale must be >= 0 (1 turns guidance off), got {guidance_scale}")


def _check_size(width: int, height: int, factor: int):
    for name, v in (("width", width), ("height", height)):
        if v % factor or v <= 0:
            raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling factor), "
                             f"got {v}; try {max(factor, round(v / factor) * factor)}")
        if v > MAX_SIDE:
            raise ValueError(f"{name}={v} is larger than {MAX_SIDE}")


class Pipeline:
    """The generation front of a Stable-Diffusion-layout model."""

    def __init__(self, model: Model, vae_slice_size: int | None = None):
        self.model = model
        self.vae_slice_size = vae_slice_size

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "Pipeline":
        slice_size = kwargs.pop("vae_slice_size", None)
        return cls(load_model(name_or_path, **kwargs), vae_slice_size=slice_size)

    # --- shared pieces --------------------------------------------------------------------------
    def sampling(self, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> tuple[str, int, float]:
        """The given sampling settings, each None replaced by the model's default (its sampling.json,
        else ddim, 30 steps, guidance 7.5), checked."""
        d = self.model.sampling
        sampler = d["sampler"] if sampler is None else sampler
        steps = d["steps"] if steps is None else steps
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        _check_sampling(steps, guidance_scale)
        get_sampler(sampler)
        return sampler, steps, guidance_scale

    def default_size(self) -> tuple[int, int]:
        side = self.model.unet.config.sample_size * self.model.vae_factor
        return side, side

    def _prompts(self, prompt, negative_prompt, batch_size):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        negs = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(
            negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ValueError(f"got {len(negs)} negative prompts for {len(prompts)} prompts")
        prompts = [p for p in prompts for _ in range(batch_size)]
        negs = [n for n in negs for _ in range(batch_size)]
        return prompts, negs

    def _generators(self, seed: int | None, n: int, seeds: Sequence[int] | None = None):
        if seeds is None:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
            seeds = [seed + i for i in range(n)]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images")
        return list(seeds), [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def load_embedding(self, path, token: str | None = None) -> list[str]:
        """Add the textual-inversion concept(s) of an embedding file (diffusers' or A1111's format,
        ldm.embeddings) to this model's tokenizer and text encoder; ``token`` renames a file's one
        concept. Returns the tokens now usable in prompts."""
        m = self.model
        embeds = read_embeddings(path, token)
        for name, vectors in embeds.items():
            add_concept(m.tokenizer, m.text_encoder, name, vectors)
        return list(embeds)

    def load_lora(self, path) -> None:
        """Add LoRA weights in diffusers' format (a ``pytorch_lora_weights.safetensors`` file, or a
        directory holding one, as ``ldm dreambooth --lora-rank`` writes) to the U-Net and, when the
        file has them, the text encoder; read from safetensors only."""
        from diffusers import StableDiffusionPipeline

        path = Path(path)
        kwargs = {}
        if path.is_file():
            kwargs["weight_name"], path = path.name, path.parent
        elif not path.is_dir():
            raise ModelError(f"LoRA file {str(path)!r} does not exist")
        try:
            state, alphas = StableDiffusionPipeline.lora_state_dict(str(path), use_safetensors=True, **kwargs)
            StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=self.model.unet)
            if any(k.startswith("text_encoder.") for k in state):
                StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=self.model.text_encoder,
                                                                    prefix="text_encoder")
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"could not load LoRA weights from {str(path)!r}: {exc}") from exc

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        m = self.model
        return encode_prompts(m.tokenizer, m.text_encoder, prompts, device=m.device)

    def _denoiser(self, prompts, negs, guidance_scale, guidance_rescale, concat=None) -> Callable:
        m = self.model
        cond = {"encoder_hidden_states": self.encode_text(prompts)}
        uncond = None
        w_dim = guidance_input_dim(m.unet)
        if w_dim is not None:
            # a guidance-distilled U-Net (Meng et al. 2023) takes w as an input: one pass, no unconditional branch
            if any(negs):
                log.warning("this model takes the guidance scale as an input and has no unconditional branch; "
                            "the negative prompt is ignored")
            if guidance_rescale:
                log.warning("guidance rescale needs the unconditional branch, which this model does not run; ignored")
            cond["timestep_cond"] = guidance_embedding(guidance_scale, w_dim, len(prompts))
            guidance_scale, guidance_rescale = 1.0, 0.0
        elif guidance_scale != 1.0:
            uncond = {"encoder_hidden_states": self.encode_text(negs)}
        if concat is not None:
            cond["concat"] = concat
            if uncond is not None:
                uncond["concat"] = concat
        model_fn = guided(unet_net(m.unet), cond, uncond, guidance_scale, guidance_rescale)
        return make_denoiser(model_fn, m.schedule.prediction_type)

    def _steps(self, sampler: str, steps: int) -> Steps:
        _, opts = get_sampler(sampler)
        return self.model.schedule.steps(steps, **opts)

    @torch.no_grad()
    def _sample(self, denoise, x, steps: Steps, sampler: str, eta: float, generators, callback):
        fn, _ = get_sampler(sampler)
        kwargs = {}
        if sampler in STOCHASTIC or eta:
            kwargs["generator"] = generators
        if eta:
            if sampler not in ("ddim", "euler-a"):
                raise ValueError(f"eta applies to the ddim and euler-a samplers, not {sampler}")
            kwargs["eta"] = eta
        return fn(denoise, x, steps, callback=callback, **kwargs)

    def _finish(self, latents, seeds, prompts, negs, settings) -> Result:
        pixels = autoencoder.decode(self.model.vae, latents, self._slice(latents.shape[0]))
        return Result(pixels, latents, seeds, prompts, negs, settings)

    def parameters(self, res: Result) -> list[str]:
        """The A1111 ``parameters`` text of each image of ``res`` (what its PNG carries)."""
        st = res.settings
        return [format_parameters(p, n, steps=st["steps"], sampler=st["sampler"], guidance=st["guidance"], seed=s,
                                  width=st["width"], height=st["height"], model=self.model.name,
                                  strength=st.get("strength"))
                for p, n, s in zip(res.prompts, res.negative_prompts, res.seeds)]

    def _slice(self, batch: int) -> int | None:
        if self.vae_slice_size:
            return self.vae_slice_size
        return 1 if batch > 4 else None  # large batches decode one image at a time

    def _latent_shape(self, n, width, height):
        f = self.model.vae_factor
        return (n, self.model.unet.config.out_channels, height // f, width // f)

    def encode_image(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """An image (PIL, or a tensor in [-1, 1]) -> scaled latents (1, 4, h, w); its sides must be
        multiples of the VAE's factor."""
        x = to_tensor(image) if isinstance(image, Image.Image) else image
        _check_size(x.shape[-1], x.shape[-2], self.model.vae_factor)
        return autoencoder.encode(self.model.vae, x.to(self.model.device))

    # --- the four tasks -------------------------------------------------------------------------
    def text_to_image(self, prompt, *, negative_prompt=None, steps: int | None = None, guidance_scale: float | None = None,
                      guidance_rescale: float = 0.0, seed: int | None = None, seeds=None, batch_size: int = 1,
                      width: int | None = None, height: int | None = None, sampler: str | None = None,
                      eta: float = 0.0, latents: torch.Tensor | None = None, callback=None) -> Result:
        """Generate images for a prompt (or a list of prompts, ``batch_size`` images each).

        Image i of a batch draws its noise from a generator seeded ``seed + i`` alone, so it equals a
        lone image made with that seed. ``latents`` starts from given noise (e.g. from ``invert``)."""
        dw, dh = self.default_size()
        width = dw if width is None else width
        height = dh if height is None else height
        sampler, steps, guidance_scale = self.sampling(sampler, steps, guidance_scale)
        _check_size(width, height, self.model.vae_factor)
        prompts, negs = self._prompts(prompt, negative_prompt, batch_size)
        seeds, gens = self._generators(seed, len(prompts), seeds)
        sched_steps = self._steps(sampler, steps)
        denoise = self._denoiser(prompts, negs, guidance_scale, guidance_rescale, self._empty_concat(
            len(prompts), width, height))
        if latents is None:
            # (B, 4, H/8, W/8): unit-variance noise is x_T at the first level (alpha_bar ~ 0)
            latents = randn_like(torch.empty(self._latent_shape(len(prompts), width, height)), gens)
        x = latents.to(self.model.device, torch.float32)
        x = self._sample(denoise, x, sched_steps, sampler, eta, gens, callback)
        return self._finish(x, seeds, prompts, negs, dict(steps=steps, sampler=sampler, guidance=guidance_scale,
                                                          width=width, height=height))

    def _empty_concat(self, n, width, height):
        """A 9-channel inpainting U-Net asked for plain text-to-image gets an all-masked image."""
        if not self.model.is_inpainting:
            return None
        shape = self._latent_shape(n, width, height)
        mask = torch.ones(shape[0], 1, *shape[2:])
        masked = autoencoder.encode(self.model.vae, torch.zeros(1, 3, height, width, device=self.model.device))
        return torch.cat([mask.to(masked), masked.expand(n, -1, -1, -1)], dim=1)

    def image_to_image(self, prompt, image, *, strength: float = 0.8, negative_prompt=None, steps: int | None = None,
                       guidance_scale: float | None = None, guidance_rescale: float = 0.0, seed=None, seeds=None,
                       batch_size: int = 1, sampler: str | None = None, eta: float = 0.0, callback=None) -> Result:
        """SDEdit (Meng et al. 2022): noise the image's latents to the level ``strength`` of the way up
        the schedule and denoise from there; about ``strength * steps`` steps run."""
        sampler, steps, guidance_scale = self.sampling(sampler, steps, guidance_scale)
        sched_steps = self._strength_steps(sampler, steps, strength)
        z0 = self.encode_image(image)
        width, height = z0.shape[-1] * self.model.vae_factor, z0.shape[-2] * self.model.vae_factor
        prompts, negs = self._prompts(prompt, negative_prompt, batch_size)
        seeds, gens = self._generators(seed, len(prompts), seeds)
        z0 = z0.expand(len(prompts), -1, -1, -1)
        settings = dict(steps=steps, sampler=sampler, guidance=guidance_scale, width=width, height=height,
                        strength=strength)
        if len(sched_steps) == 0:
            return self._finish(z0.clone(), seeds, prompts, negs, settings)
        denoise = self._denoiser(prompts, negs, guidance_scale, guidance_rescale,
                                 self._empty_concat(len(prompts), width, height))
        x = q_sample(z0, randn_like(z0, gens), sched_steps.alpha_bars[0])
        x = self._sample(denoise, x, sched_steps, sampler, eta, gens, callback)
        return self._finish(x, seeds, prompts, negs, settings)

    def _strength_steps(self, sampler, steps, strength) -> Steps:
        """diffusers' convention: the last int(steps * strength) of the ``steps`` steps run."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return self._steps(sampler, steps).tail(steps - min(int(steps * strength), steps))

    def inpaint(self, prompt, image, mask, *, strength: float = 1.0, negative_prompt=None, steps: int | None = None,
                guidance_scale: float | None = None, guidance_rescale: float = 0.0, seed=None, seeds=None,
                batch_size: int = 1, sampler: str | None = None, eta: float = 0.0, callback=None) -> Result:
        """Repaint the white part of ``mask`` (an image the size of ``image``; white = repaint).

        On a 9-channel inpainting U-Net the mask and the masked image's latents are extra input
        channels; on an ordinary checkpoint the kept region is blended back at every step."""
        sampler, steps, guidance_scale = self.sampling(sampler, steps, guidance_scale)
        sched_steps = self._strength_steps(sampler, steps, strength)
        if len(sched_steps) == 0:
            raise ValueError(f"strength {strength} with {steps} steps runs no step; raise either")
        img_t = to_tensor(image) if isinstance(image, Image.Image) else image
        mask_t = self._mask_tensor(mask)
        if mask_t.shape[-2:] != img_t.shape[-2:]:
            raise ValueError(f"the mask is {mask_t.shape[-1]}x{mask_t.shape[-2]} but the image is "
                             f"{img_t.shape[-1]}x{img_t.shape[-2]}; they must be the same size")
        z0 = self.encode_image(img_t)
        height, width = img_t.shape[-2:]
        prompts, negs = self._prompts(prompt, negative_prompt, batch_size)
        n = len(prompts)
        seeds, gens = self._generators(seed, n, seeds)
        z0 = z0.expand(n, -1, -1, -1)
        lat_hw = z0.shape[-2:]
        noise = randn_like(z0, gens)
        concat = None
        if self.model.is_inpainting:
            binary = (mask_t >= 0.5).float()
            masked = autoencoder.encode(self.model.vae, (img_t * (1 - binary)).to(self.model.device))
            m_lat = F.interpolate(binary, size=lat_hw)  # nearest, as the inpainting models were trained
            concat = torch.cat([m_lat.to(masked), masked], dim=1).expand(n, -1, -1, -1)
        denoise = self._denoiser(prompts, negs, guidance_scale, guidance_rescale, concat)
        x = q_sample(z0, noise, sched_steps.alpha_bars[0])
        if not self.model.is_inpainting:
            keep = 1 - F.interpolate(mask_t, size=lat_hw, mode="area").to(z0)  # (1, 1, h, w), 1 = keep
            denoise = blend_known(denoise, z0, keep, noise)
        x = self._sample(denoise, x, sched_steps, sampler, eta, gens, callback)
        if not self.model.is_inpainting:
            x = keep * q_sample(z0, noise, sched_steps.alpha_bars[-1]) + (1 - keep) * x
        return self._finish(x, seeds, prompts, negs, dict(steps=steps, sampler=sampler, guidance=guidance_scale,
                                                          width=width, height=height, strength=strength))

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
        _check_sampling(steps, guidance_scale)
        z0 = self.encode_image(image)
        f = self.model.vae_factor
        width, height = z0.shape[-1] * f, z0.shape[-2] * f
        denoise = self._denoiser([prompt], [""], guidance_scale, 0.0, self._empty_concat(1, width, height))
        inv = self.model.schedule.inversion_steps(self._steps("ddim", steps))
        return invert_ddim(denoise, z0, inv, callback=callback)
