"""Inverting real images for editing: the DDIM trajectory, null-text inversion, and its cache.

DDIM inversion (ldm.samplers.invert_ddim) at guidance 1 carries an image's latents z_0 up to noise
z_T. Sampling back from z_T at a guidance w > 1 drifts away from the image, because guidance changes
the updates the inversion assumed. Null-text inversion (Mokady et al. 2022, "Null-text Inversion for
Editing Real Images using Guided Diffusion Models", Alg. 1) keeps the conditional prompt and, step by
step from the top, optimises the unconditional embedding (the "null text") so that the guided DDIM
step from the current sample lands on the inversion's own sample one level lower. The per-step
embeddings then make guided sampling retrace the image, and an edit (ldm.attention_control) changes
only what the target prompt changes. Negative-prompt inversion (Miyake et al. 2023) is the closed-form
shortcut: the source prompt's own embedding as the unconditional one, so that guidance cancels.
Direct inversion (Ju et al. 2023, "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of
Code") optimises nothing either: the source branch is put back on the inversion's trajectory after
every step (``retrace``), so the attention it hands the target is the image's own, and the target is
sampled with the usual unconditional prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from .process import ddim_step, to_x0
from .samplers import invert_ddim
from .schedule import Steps


def ddim_trajectory(denoise: Callable, z0: torch.Tensor, inversion_steps: Steps) -> list[torch.Tensor]:
    """[z_0, z_1, ..., z_T]: the latents at each level of a DDIM inversion (the last is the noise)."""
    path = [z0]
    invert_ddim(denoise, z0, inversion_steps, callback=lambda i, x, x0: path.append(x))
    return path


def null_text_inversion(net: Callable, prediction_type: str, trajectory: list[torch.Tensor], steps: Steps,
                        cond: dict, uncond: dict, guidance: float, *, inner_steps: int = 10, lr: float = 1e-2,
                        tolerance: float = 1e-5, callback: Callable | None = None) -> list[torch.Tensor]:
    """The unconditional ``encoder_hidden_states`` (B, L, D) for each sampling step of ``steps`` such that
    guided DDIM sampling from ``trajectory[-1]`` retraces ``trajectory`` (Mokady et al. 2022, Alg. 1).

    ``net(x, t, context)``: the network (ldm.denoiser.unet_net); ``cond``/``uncond``: the source
    prompt's and the negative prompt's contexts (B rows each; only the unconditional hidden states are
    optimised, SDXL's pooled embedding and sizes stay). Per step: Adam at ``lr x (1 - i/100)``, at most
    ``inner_steps`` updates, stopping once every image's loss (the mean squared distance to the
    inversion's sample one level lower) is under ``tolerance + i x 2e-5``; the paper's settings. The
    images of a batch are optimised together (their losses are summed, so each gets its own gradient)."""
    x = trajectory[-1]
    embeddings = uncond["encoder_hidden_states"].detach().clone()
    out = []
    for i, t in enumerate(steps.timesteps):
        ab_t, ab_s = steps.alpha_bars[i], steps.alpha_bars[i + 1]
        target = trajectory[-2 - i]
        with torch.no_grad():
            out_c = net(x, t, cond)
        u = embeddings.clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
        for _ in range(inner_steps):
            with torch.enable_grad():
                out_u = net(x, t, {**uncond, "encoder_hidden_states": u})
                guided = out_u + guidance * (out_c - out_u)
                prev = ddim_step(x, to_x0(guided, x, ab_t, prediction_type), ab_t, ab_s)
                loss = ((prev - target) ** 2).flatten(1).mean(1)  # (B,)
                (grad,) = torch.autograd.grad(loss.sum(), [u])
            u.grad = grad
            opt.step()
            if bool((loss < tolerance + i * 2e-5).all()):
                break
        embeddings = u.detach()
        out.append(embeddings)
        with torch.no_grad():
            out_u = net(x, t, {**uncond, "encoder_hidden_states": embeddings})
            x = ddim_step(x, to_x0(out_u + guidance * (out_c - out_u), x, ab_t, prediction_type), ab_t, ab_s)
        if callback is not None:
            callback(i, x, None)
    return out


def retrace(denoise: Callable, trajectory: list[torch.Tensor], steps: Steps, clock: dict, n: int) -> Callable:
    """A denoiser whose first ``n`` rows' clean estimates are the ones that make the DDIM step from the
    inversion's level i land on its level i + 1 below (``trajectory`` is [z_0, ..., z_T] of those rows;
    ``clock["step"]`` is the step being taken). Direct inversion's source branch, in the samplers'
    terms: a DDIM step at eta 0 is x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t),
    solved for x0; the rows from n on keep the network's estimate."""
    def denoise_retraced(x, t, alpha_bar):
        x0 = denoise(x, t, alpha_bar)
        i = clock["step"]
        ab_t, ab_s = float(steps.alpha_bars[i]), float(steps.alpha_bars[i + 1])
        z_t = trajectory[-1 - i].to(x0)
        z_s = trajectory[-2 - i].to(x0)
        c = ((1 - ab_s) / (1 - ab_t)) ** 0.5 if ab_t < 1 else 0.0
        src = (z_s - c * z_t) / (ab_s ** 0.5 - c * ab_t ** 0.5)
        return torch.cat([src, x0[n:]])
    return denoise_retraced


# --- the cache: an inversion written once per image, settings and model -----------------------------

def inversion_key(latents: torch.Tensor, **settings) -> str:
    """A key for one image's inversion: its latents' bytes and every setting the inversion depends on."""
    h = hashlib.sha256(latents.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def save_inversion(path: Path, noise: torch.Tensor, embeddings: list[torch.Tensor] | None, key: str,
                   trajectory: list[torch.Tensor] | None = None) -> None:
    """Write one image's inversion (safetensors, atomically): ``noise`` (1, 4, h, w) and, for
    null-text inversion, the per-step unconditional states stacked (T, 1, L, D); for direct inversion
    its ``trajectory`` [z_0, ..., z_T] stacked (T + 1, 1, 4, h, w)."""
    from safetensors.torch import save_file

    tensors = {"noise": noise.detach().float().cpu().contiguous()}
    for name, seq in (("uncond", embeddings), ("trajectory", trajectory)):
        if seq is not None:
            tensors[name] = torch.stack([e.detach().float().cpu() for e in seq]).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"key": key})
    tmp.replace(path)


def load_inversion(path: Path, key: str) -> tuple | None:
    """The cached inversion at ``path`` if it was made with ``key``: (noise, per-step unconditional states
    or None, trajectory or None); None otherwise."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            noise = f.get_tensor("noise")
            seqs = [list(f.get_tensor(k).unbind(0)) if k in f.keys() else None for k in ("uncond", "trajectory")]
    except Exception:  # unreadable (truncated, not safetensors): made again
        return None
    return noise, *seqs
