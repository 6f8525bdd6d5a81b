"""The VAE between images and latents: scaling, and sliced decoding for large batches."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def _upcast(vae):
    """SDXL's VAE overflows in fp16 (its config says ``force_upcast``): run it in fp32, then return
    it to its dtype."""
    dtype = vae.dtype
    up = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if up:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if up:
            vae.to(dtype)


def latent_scale(vae) -> float:
    return float(vae.config.scaling_factor)


@torch.no_grad()
def encode(vae, images: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, 4, H/8, W/8), taking the posterior mean
    (deterministic; the sampling noise of the VAE posterior is not wanted for editing)."""
    out = []
    with _upcast(vae):
        for chunk in _chunks(images, slice_size):
            dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
            out.append(dist.mean.float())
    return torch.cat(out) * latent_scale(vae)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> images in [0, 1] (B, 3, 8h, 8w), float32.

    ``slice_size`` decodes that many latents at a time, bounding the VAE's activation memory
    (the decoder at 512x512 is the largest allocation of a generation)."""
    out = []
    with _upcast(vae):
        for chunk in _chunks(latents / latent_scale(vae), slice_size):
            img = vae.decode(chunk.to(vae.device, vae.dtype)).sample.float()
            out.append((img / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def decode_with_grad(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], with autograd (CLIP guidance differentiates through it)."""
    return vae.decode((latents / latent_scale(vae)).to(vae.dtype)).sample.float()


def _chunks(x: torch.Tensor, size: int | None):
    if not size or size >= x.shape[0]:
        return [x]
    return list(x.split(size))
