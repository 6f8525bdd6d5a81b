"""Turning a diffusers U-Net into the denoiser callable the samplers take."""

from __future__ import annotations

from typing import Callable

import torch

from .process import q_sample, to_x0


def unet_net(unet) -> Callable:
    """``net(x, t, context) -> output`` for a ``UNet2DConditionModel``.

    ``context`` holds ``encoder_hidden_states`` (B, L, D) and, for a 9-channel inpainting U-Net,
    ``concat`` (B, 5, h, w): the mask and the masked image's latents, appended to the input
    channels, for SDXL ``text_embeds`` and ``time_ids`` (its added conditions), and for a
    guidance-distilled U-Net ``timestep_cond`` (B, D), its guidance-scale input
    (ldm.guidance.guidance_embedding). ``t`` is one timestep, or a (B,) tensor of one per sample (training).
    The network runs in its own dtype; the output comes back as float32.
    """
    dtype = unet.dtype

    def net(x: torch.Tensor, t: float | torch.Tensor, context: dict) -> torch.Tensor:
        inp = x
        if "concat" in context:
            inp = torch.cat([x, context["concat"].to(x.dtype)], dim=1)  # (B, 4 + 5, h, w)
        expected = unet.config.in_channels
        if inp.shape[1] != expected:
            raise ValueError(f"the U-Net takes {expected} input channels but got {inp.shape[1]}"
                             + ("; a 9-channel inpainting U-Net needs a mask and an image (use inpaint)"
                                if expected == 9 else ""))
        extra = {}
        if "text_embeds" in context:  # SDXL's added conditions: pooled text (B, P) and sizes (B, 5 or 6)
            extra["added_cond_kwargs"] = {"text_embeds": context["text_embeds"].to(x.device, dtype),
                                          "time_ids": context["time_ids"].to(x.device, dtype)}
        if "timestep_cond" in context:  # (B, D): the guidance-scale input of a guidance-distilled U-Net
            extra["timestep_cond"] = context["timestep_cond"].to(x.device, dtype)
        if "adapter_features" in context:  # T2I-Adapter (ldm.control): added inside the down blocks (a new list
            extra["down_intrablock_additional_residuals"] = [f.to(dtype) for f in context["adapter_features"]]  # a call)
        if "down_residuals" in context:  # ControlNet (ldm.control): added to the skip connections and middle block
            extra["down_block_additional_residuals"] = [r.to(dtype) for r in context["down_residuals"]]
            extra["mid_block_additional_residual"] = context["mid_residual"].to(dtype)
        t = t.to(x.device) if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float32, device=x.device)
        out = unet(inp.to(dtype), t, encoder_hidden_states=context["encoder_hidden_states"].to(dtype), **extra).sample
        return out.float()

    return net


def make_denoiser(model_fn: Callable, prediction_type: str) -> Callable:
    """``denoise(x, t, alpha_bar) -> x0`` from ``model_fn(x, t) -> output`` of ``prediction_type``."""
    def denoise(x: torch.Tensor, t: float, alpha_bar: float) -> torch.Tensor:
        return to_x0(model_fn(x, t), x, alpha_bar, prediction_type)
    return denoise


def blend_known(denoise: Callable, known: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor) -> Callable:
    """Inpainting on an ordinary checkpoint by latent blending (Avrahami et al. 2023, "Blended
    latent diffusion"): at every step the region to keep (``keep`` = 1) is replaced by the known
    latents noised to the current level with a fixed noise, before and after the network's estimate.
    """
    def denoise_blended(x, t, alpha_bar):
        x = keep * q_sample(known, noise, alpha_bar) + (1 - keep) * x
        x0 = denoise(x, t, alpha_bar)
        return keep * known + (1 - keep) * x0
    return denoise_blended
