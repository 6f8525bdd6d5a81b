"""Classifier-free guidance (Ho & Salimans 2022), a wrapper that samplers never see.

A network function here is ``net(x, t, context) -> output`` where ``context`` is a dict of
per-sample tensors (the text hidden states, and for inpainting U-Nets the extra input channels).
``guided`` runs the unconditional and conditional branch in one batched forward and combines them
in the network's own output space (epsilon or v), where guidance rescale is defined.
"""

from __future__ import annotations

from typing import Callable

import torch

Net = Callable[[torch.Tensor, float, dict], torch.Tensor]

MAX_SCALE = 100.0  # the one bound of a guidance scale everywhere (requests, sampling.json, APIs)


def scale_problem(value) -> str | None:
    """Why ``value`` cannot be a guidance scale, or None: a finite number from 0 to MAX_SCALE (1 turns
    guidance off; past a few tens every image is saturated, and inf or NaN make black images)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number from 0 to {MAX_SCALE:g} (1 turns guidance off)"
    if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
        return f"must be a finite number from 0 to {MAX_SCALE:g} (1 turns guidance off)"
    return None


def guidance_embedding(scale: torch.Tensor | float, dim: int, batch: int | None = None) -> torch.Tensor:
    """(B, dim) sinusoidal embedding of the guidance scale w, the input of a guidance-distilled
    U-Net (Meng et al. 2023) through diffusers' ``time_cond_proj_dim``. The convention of diffusers'
    LatentConsistencyModelPipeline (VDM's embedding of (w - 1) * 1000), so w = 1 (no guidance) is 0:
    sin and cos of (w - 1) * 1000 * 10000^(-k / (dim/2 - 1)), k = 0 .. dim/2 - 1."""
    from diffusers.models.embeddings import get_timestep_embedding

    w = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if batch is not None and w.numel() == 1:
        w = w.expand(batch)
    return get_timestep_embedding((w - 1) * 1000.0, dim, flip_sin_to_cos=False, downscale_freq_shift=1)


def guidance_input_dim(unet) -> int | None:
    """The width of a guidance-distilled U-Net's w input (None: an ordinary U-Net, guided by CFG)."""
    return getattr(unet.config, "time_cond_proj_dim", None)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the per-sample std of the guided output
    to the conditional one, then mix with weight ``phi``."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cat_context(a: dict, b: dict) -> dict:
    """Stack two contexts along the batch: [a, b]."""
    if a.keys() != b.keys():
        raise ValueError(f"contexts differ in their keys: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in a}


def guided(net: Net, cond: dict, uncond: dict | None, scale: float, rescale: float = 0.0) -> Callable:
    """Return ``f(x, t) -> output`` with classifier-free guidance at ``scale``.

    ``scale == 1`` (or no unconditional context) is the plain conditional model, one forward;
    otherwise both branches go through the network as one batch of twice the size. ``scale`` may be a
    (B, 1, 1, 1) tensor of one scale per sample.
    """
    per_sample = isinstance(scale, torch.Tensor)  # (B, 1, 1, 1): one scale per sample (distillation)
    if (scale < 0).any() if per_sample else scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if uncond is None or (not per_sample and scale == 1.0):
        return lambda x, t: net(x, t, cond)
    both = cat_context(uncond, cond)

    def f(x: torch.Tensor, t) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.ndim:  # one timestep per sample
            t = torch.cat([t, t])
        out_u, out_c = net(torch.cat([x, x]), t, both).chunk(2)
        out = cfg_combine(out_u, out_c, scale)
        if rescale > 0:
            out = rescale_guidance(out, out_c, rescale)
        return out

    return f
