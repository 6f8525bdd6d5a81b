"""Samplers: plain functions over a denoiser callable (the style of k-diffusion's ``sampling.py``).

A denoiser is any callable ``denoise(x, t, alpha_bar) -> x0``: given a sample ``x`` in the
variance-preserving form at level ``alpha_bar`` and the network timestep ``t``, it returns the
estimate of the clean sample. A sampler holds no state between calls, reads no attribute of any
model, names no device, and draws its randomness only from the generators it is handed: one
``torch.Generator`` per image (image i of a batch draws from ``generator[i]`` alone, so a batch with
seeds s, s+1, ... equals the lone images), or a single generator for the whole tensor.

The first-order samplers share one update. Written with sigma = sqrt((1 - ab) / ab) for the
sample rescaled to x / sqrt(ab) (Karras et al. 2022, sec. 4), a step from sigma_t to sigma_s goes
to x0 + sigma_down * eps and adds noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_s^2.
DDIM's eta (Song et al. 2021, eq. 16) and Euler-ancestral's eta give the same sigma_up, so
DDIM(eta=0) is Euler's method on the probability-flow ODE, DDIM(eta=1) is DDPM's ancestral step
(DDPM eq. 6-7) and Euler ancestral is DDIM(eta) on a sigma grid; the named samplers differ in the
grid and final level the pipeline gives them (``SAMPLERS``), not in their arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .process import ddim_step, eps_from_x0, posterior
from .schedule import Steps

Denoiser = Callable[[torch.Tensor, float, float], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; a list of generators gives one per batch item."""
    if generator is None or isinstance(generator, torch.Generator):
        device = "cpu" if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32, device=g.device)
                        for g in generator]).to(x.device, x.dtype)


def first_order_step(x, x0, ab_t: float, ab_s: float, eta: float = 0.0, generator: Generators = None):
    """One DDIM step (Song et al. 2021, eq. 12) from level ab_t to ab_s with stochasticity eta.

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - var) eps + sqrt(var) z,
    var = eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s)   (DDIM eq. 16)
    """
    var = 0.0
    if eta > 0 and ab_s < 1.0:
        var = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    if var == 0.0:
        return ddim_step(x, x0, ab_t, ab_s)
    eps = eps_from_x0(x, x0, ab_t)  # at ab_t = 0 (zero terminal SNR) this is x itself
    x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - var, 0.0)) * eps
    return x_s + math.sqrt(var) * randn_like(x, generator)


def _loop(denoise: Denoiser, x, steps: Steps, update, callback: Callback):
    for i, t in enumerate(steps.timesteps):
        ab_t, ab_s = steps.alpha_bars[i], steps.alpha_bars[i + 1]
        x0 = denoise(x, t, ab_t)
        x = update(i, x, x0, ab_t, ab_s)
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_ddim(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, eta: float = 0.0,
                generator: Generators = None, callback: Callback = None) -> torch.Tensor:
    """DDIM (Song et al. 2021); eta=0 is deterministic, eta=1 is DDPM's ancestral sampler."""
    return _loop(denoise, x, steps, lambda i, x, x0, a, b: first_order_step(x, x0, a, b, eta, generator),
                 callback)


def sample_ddpm(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, generator: Generators = None,
                callback: Callback = None) -> torch.Tensor:
    """DDPM ancestral sampling: draw x_s from the posterior q(x_s | x_t, x0_hat) (DDPM eq. 6-7),
    with its variance (the "fixed_small" choice of Ho et al.)."""
    def update(i, x, x0, ab_t, ab_s):
        mean, var = posterior(x0, x, ab_t, ab_s)
        return mean + math.sqrt(var) * randn_like(x, generator) if var > 0 else mean
    return _loop(denoise, x, steps, update, callback)


def sample_euler(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, callback: Callback = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 1 without churn)."""
    return sample_ddim(denoise, x, steps, eta=0.0, callback=callback)


def sample_euler_ancestral(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, eta: float = 1.0,
                           generator: Generators = None, callback: Callback = None) -> torch.Tensor:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std sigma_up."""
    return sample_ddim(denoise, x, steps, eta=eta, generator=generator, callback=callback)


def _lambda(ab: float) -> float:
    """Half log-SNR, lambda = log(alpha / sigma) (Lu et al. 2022)."""
    if ab <= 0.0:
        return -math.inf
    if ab >= 1.0:
        return math.inf
    return 0.5 * (math.log(ab) - math.log1p(-ab))


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022, Alg. 2).

    x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D, h = lambda_s - lambda_t, with
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i; the first step, and a last step
    that lands on sigma = 0, are first order.
    """
    state = {"x0": None, "h": None}

    def update(i, x, x0, ab_t, ab_s):
        lam_t, lam_s = _lambda(ab_t), _lambda(ab_s)
        h = lam_s - lam_t
        if h == 0:  # a step that stays at its level
            return x
        d = x0
        if state["x0"] is not None and ab_s < 1.0 and math.isfinite(state["h"]) and math.isfinite(h):
            r = state["h"] / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * state["x0"]
        state["x0"], state["h"] = x0, h
        alpha_s, sigma_s, sigma_t = math.sqrt(ab_s), math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
        if sigma_s == 0.0:
            return d
        return (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d

    return _loop(denoise, x, steps, update, callback)


def invert_ddim(denoise: Denoiser, x0: torch.Tensor, steps: Steps, *, callback: Callback = None) -> torch.Tensor:
    """DDIM inversion: run the deterministic DDIM update up the levels of ``steps`` (built by
    ``NoiseSchedule.inversion_steps``), taking a clean sample to the noise that DDIM maps back to it."""
    return sample_ddim(denoise, x0, steps, eta=0.0, callback=callback)


@dataclass(frozen=True)
class Sampler:
    """A sampler and its properties, kept together so that no caller keeps its own list."""
    fn: Callable
    grid: dict              # NoiseSchedule.steps options: the grid of the diffusers scheduler of the same name
    takes_eta: bool = False  # accepts eta (stochasticity)
    stochastic: bool = False  # draws noise at eta = 0 too (needs the generators)

    def needs_generator(self, eta: float) -> bool:
        return self.stochastic or (self.takes_eta and eta > 0)


# name -> Sampler; the same name, grid and final level as diffusers' scheduler, so that the same
# settings give the same images
SAMPLERS = {
    "ddim": Sampler(sample_ddim, dict(integer=True, final="config"), takes_eta=True),
    "ddpm": Sampler(sample_ddpm, dict(integer=True, final="zero"), stochastic=True),
    "euler": Sampler(sample_euler, dict(integer=False, final="zero")),
    "euler-a": Sampler(sample_euler_ancestral, dict(integer=False, final="zero"), takes_eta=True, stochastic=True),
    "dpmpp-2m": Sampler(sample_dpmpp_2m, dict(integer=True, final="zero", drop_lowest=True)),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
