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

import numpy as np
import torch

from .names import SAMPLER_NAMES, SCHEDULE_SAMPLERS, parse_sampler, parse_schedule  # noqa: F401 (names live there)
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


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a to b by fraction t, per batch item (Shoemake 1985): the angle
    between the flattened tensors is walked at constant speed; nearly parallel ones interpolate
    linearly."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    omega = torch.arccos(cos.clamp(-1, 1))[:, None]
    so = torch.sin(omega)
    near = so.abs() < 1e-6
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / torch.where(near, 1.0, so))
    wb = torch.where(near, t, torch.sin(t * omega) / torch.where(near, 1.0, so))
    return (wa * fa + wb * fb).reshape(a.shape).to(a.dtype)


def first_order_step(x, x0, ab_t: float, ab_s: float, eta: float = 0.0, generator: Generators = None,
                     s_noise: float = 1.0):
    """One DDIM step (Song et al. 2021, eq. 12) from level ab_t to ab_s with stochasticity eta.

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - var) eps + s_noise sqrt(var) z,
    var = eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s)   (DDIM eq. 16)
    (s_noise: k-diffusion's and A1111's scale of the fresh noise; 1 is the sampler itself)
    """
    var = 0.0
    if eta > 0 and ab_s < 1.0:
        var = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    if var == 0.0:
        return ddim_step(x, x0, ab_t, ab_s)
    eps = eps_from_x0(x, x0, ab_t)  # at ab_t = 0 (zero terminal SNR) this is x itself
    x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - var, 0.0)) * eps
    return x_s + s_noise * math.sqrt(var) * randn_like(x, generator)


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


def sample_plms(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, callback: Callback = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, pseudo linear multi-step), as diffusers' PNDMScheduler runs it with
    skip_prk_steps (Stable Diffusion's): every step is a DDIM (eta 0) step taken with a combined noise
    estimate. The first combines the estimate at the start with the one at the end of a trial step
    (their mean: one extra network evaluation); later ones the last 2, 3, then 4 estimates of the steps'
    starts with the Adams-Bashforth weights (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24. The
    estimates combined are noise estimates, as A1111's (CompVis's) PLMS combines them; on a
    v-prediction model diffusers' PNDM combines the v outputs instead, so the two differ there."""
    weights = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    history: list[torch.Tensor] = []  # the noise estimates at each step's start, newest last
    n = len(steps)
    for i, t in enumerate(steps.timesteps):
        ab_t, ab_s = steps.alpha_bars[i], steps.alpha_bars[i + 1]
        x0 = denoise(x, t, ab_t)
        history = (history + [eps_from_x0(x, x0, ab_t)])[-4:]
        if i == 0 and n > 1:  # the trial step to the next level, and the estimate there
            trial = ddim_step(x, x0, ab_t, ab_s)
            eps = (history[0] + eps_from_x0(trial, denoise(trial, steps.timesteps[1], ab_s), ab_s)) / 2
        else:
            eps = sum(w * e for w, e in zip(weights[len(history)], reversed(history)))
        x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        x = ddim_step(x, x0, ab_t, ab_s)
        if callback is not None:
            callback(i, x, x0)
    return x


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
                           generator: Generators = None, callback: Callback = None,
                           s_noise: float = 1.0) -> torch.Tensor:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std s_noise x sigma_up."""
    return _loop(denoise, x, steps, lambda i, x, x0, a, b: first_order_step(x, x0, a, b, eta, generator, s_noise),
                 callback)


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


def sample_dpmpp_2m_sde(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, eta: float = 1.0,
                        generator: Generators = None, callback: Callback = None,
                        s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, the SDE variant of Alg. 2; diffusers' ``sde-dpmsolver++``
    with the midpoint correction, k-diffusion's ``sample_dpmpp_2m_sde``). With h = lambda_s - lambda_t,
    x_s = (sigma_s / sigma_t) e^(-eta h) x + alpha_s (1 - e^(-(1 + eta) h)) (D0 + D1 / 2)
          + s_noise sigma_s sqrt(1 - e^(-2 eta h)) z,   D1 = (x0_i - x0_{i-1}) / r,  r = h_{i-1} / h;
    first order (D1 = 0) at the first step and at a last step that lands on sigma = 0. A fresh z is
    drawn at every step (as diffusers draws it), so the same generators give the same images."""
    state = {"x0": None, "h": None}

    def update(i, x, x0, ab_t, ab_s):
        z = randn_like(x, generator)
        lam_t, lam_s = _lambda(ab_t), _lambda(ab_s)
        h = lam_s - lam_t
        if h == 0:
            return x
        d = x0
        if state["x0"] is not None and ab_s < 1.0 and math.isfinite(state["h"]) and math.isfinite(h):
            d = x0 + 0.5 * (x0 - state["x0"]) / (state["h"] / h)
        state["x0"], state["h"] = x0, h
        alpha_s, sigma_s, sigma_t = math.sqrt(ab_s), math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
        if sigma_s == 0.0:
            return d
        return (sigma_s / sigma_t * math.exp(-eta * h)) * x - alpha_s * math.expm1(-(1 + eta) * h) * d \
            + s_noise * sigma_s * math.sqrt(-math.expm1(-2 * eta * h)) * z

    return _loop(denoise, x, steps, update, callback)


def _unipc_rho(hh: float, rks: list[float]) -> list[float]:
    """UniC's coefficients: solve R rho = b, R[k][j] = rks[j]^k, b[k] = phi_{k+1}(hh) (k+1)! / B(hh) with
    B(hh) = expm1(hh) ("bh2"; Zhao et al. 2023, eq. 9 and Thm. 3.1)."""
    h_phi_k, fact, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, len(rks) + 1):
        b.append(h_phi_k * fact / math.expm1(hh))
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R = [[r ** k for r in rks] for k in range(len(rks))]
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def sample_unipc(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, callback: Callback = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) of order 2 on the data prediction with B(h) = e^h - 1 ("bh2"), as
    diffusers' UniPCMultistepScheduler runs it. With m_i the x0 estimates and hh = -(lambda_s - lambda_t),
    a step from level i to s is x_s = (sigma_s / sigma_t) x_i - alpha_s expm1(hh) (m_i + sum rho_k D_k),
    D_k the divided differences of earlier estimates. Each new estimate first corrects the sample it was
    made at (UniC, with the new estimate as one more difference), then predicts the next level (UniP;
    rho = 1/2 at order 2). The first step is order 1 (warm-up), as is the last (diffusers'
    lower_order_final); a last step that lands on sigma = 0 returns the estimate."""
    lam = [_lambda(ab) for ab in steps.alpha_bars]
    n = len(steps)
    ms, orders, start = [], [], x  # estimates; predictor orders; the sample the last predictor started from

    def step(xs, i, j, m0, corr):
        """From level i to level j with estimate m0 and the correction sum ``corr``."""
        ab_s, ab_t = steps.alpha_bars[j], steps.alpha_bars[i]
        if ab_s >= 1.0:
            return m0
        hh = -(lam[j] - lam[i])
        return (math.sqrt(1 - ab_s) / math.sqrt(1 - ab_t)) * xs - math.sqrt(ab_s) * math.expm1(hh) * (m0 + corr)

    def ratio(k, i, j):
        """r_k = (lambda_k - lambda_i) / (lambda_j - lambda_i)."""
        return (lam[k] - lam[i]) / (lam[j] - lam[i])

    for i, t in enumerate(steps.timesteps):
        m = denoise(x, t, steps.alpha_bars[i])
        if i > 0:  # UniC: correct the sample at level i, at the order its predictor ran
            hh = -(lam[i] - lam[i - 1])
            if orders[-1] == 1:
                corr = 0.5 * (m - ms[-1])
            else:
                r = ratio(i - 2, i - 1, i)
                rho = _unipc_rho(hh, [r, 1.0])
                corr = rho[0] * (ms[-2] - ms[-1]) / r + rho[1] * (m - ms[-1])
            x = step(start, i - 1, i, ms[-1], corr)
        ms.append(m)
        orders.append(min(2, n - i, i + 1))
        start = x
        corr = 0.0
        if orders[-1] == 2:  # UniP-2
            r = ratio(i - 1, i, i + 1)
            corr = 0.5 * (ms[-2] - m) / r
        x = step(x, i, i + 1, m, corr)
        if callback is not None:
            callback(i, x, m)
    return x


def sample_lcm(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, generator: Generators = None,
               callback: Callback = None) -> torch.Tensor:
    """Latent consistency sampling (Luo et al. 2023, Alg. 1): the model's clean estimate under the
    consistency boundary condition, f = c_out(t) x0 + c_skip(t) x (Song et al. 2023, eq. 7, with
    sigma_data = 0.5 and the timestep scaled by 10, as diffusers' LCMScheduler), then fresh noise to
    the next level; the last step returns f."""
    n = len(steps)
    for i, t in enumerate(steps.timesteps):
        ab_t, ab_s = steps.alpha_bars[i], steps.alpha_bars[i + 1]
        x0 = denoise(x, t, ab_t)
        c = 10.0 * t
        c_skip, c_out = 0.25 / (c * c + 0.25), c / math.sqrt(c * c + 0.25)
        f = c_out * x0 + c_skip * x
        x = f if i == n - 1 else math.sqrt(ab_s) * f + math.sqrt(1 - ab_s) * randn_like(f, generator)
        if callback is not None:
            callback(i, x, f)
    return x


# --- Samplers in the Karras form: x_k = x / sqrt(alpha_bar), sigma = sqrt((1 - ab) / ab) ----------
# The ODE is dx_k/dsigma = (x_k - D(x_k; sigma)) / sigma (Karras et al. 2022, eq. 3 with s = 1); a
# zero-SNR level (ab = 0) is taken at sigma = 2^24, as diffusers does.

_SIGMA_MAX = 2.0 ** 24


def _sigma(ab: float) -> float:
    return 0.0 if ab >= 1.0 else (_SIGMA_MAX if ab <= 0.0 else min(math.sqrt((1 - ab) / ab), _SIGMA_MAX))


def _karras_loop(denoise: Denoiser, x: torch.Tensor, steps: Steps, update, callback: Callback):
    """Run ``update(i, x_k, x0, s, s_next, D) -> x_k`` over the steps in the Karras form, where
    ``D(x_k, t, sigma)`` is the denoiser on a Karras-form sample; returns the sample in the
    variance-preserving form at the last level."""
    def D(xk, t, sigma):
        return denoise(xk / math.sqrt(1 + sigma * sigma), t, 1.0 / (1.0 + sigma * sigma))

    sig = [_sigma(ab) for ab in steps.alpha_bars]
    xk = x * math.sqrt(1 + sig[0] ** 2)
    for i, t in enumerate(steps.timesteps):
        x0 = D(xk, t, sig[i])
        xk = update(i, xk, x0, sig[i], sig[i + 1], D)
        if callback is not None:
            callback(i, xk / math.sqrt(1 + sig[i + 1] ** 2), x0)
    return xk / math.sqrt(1 + sig[-1] ** 2)


def sample_heun(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, callback: Callback = None) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without
    churn): an Euler step to the next sigma, the slope there, and the step again with the mean slope;
    a last step to sigma = 0 is Euler's. Two network evaluations per step but the last."""
    def update(i, xk, x0, s, s_next, D):
        d = (xk - x0) / s
        x_e = xk + (s_next - s) * d
        if s_next == 0:
            return x_e
        d2 = (x_e - D(x_e, steps.t_at(i + 1), s_next)) / s_next
        return xk + (s_next - s) * (d + d2) / 2
    return _karras_loop(denoise, x, steps, update, callback)


def sample_dpm2(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver-2 in the Karras form (k-diffusion's ``sample_dpm_2``, diffusers' KDPM2): an Euler
    step to the geometric mean of the two sigmas, then the whole step with the slope found there;
    a last step to sigma = 0 is Euler's. ``steps.mids`` gives the midpoints."""
    def update(i, xk, x0, s, s_next, D):
        d = (xk - x0) / s
        if s_next == 0:
            return xk + (s_next - s) * d
        t_mid, ab_mid = steps.mids[i]
        s_mid = _sigma(ab_mid)
        x_mid = xk + (s_mid - s) * d
        d2 = (x_mid - D(x_mid, t_mid, s_mid)) / s_mid
        return xk + (s_next - s) * d2
    return _karras_loop(denoise, x, steps, update, callback)


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """Integral from a to b of the Lagrange basis polynomial of node j (exact, via its coefficients)."""
    poly = np.poly1d([1.0])
    for k, s in enumerate(nodes):
        if k != j:
            poly *= np.poly1d([1.0, -s]) / (nodes[j] - s)
    anti = poly.integ()
    return float(anti(b) - anti(a))


def sample_lms(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, order: int = 4,
               callback: Callback = None) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE in sigma, as k-diffusion's
    ``sample_lms`` and diffusers' LMSDiscreteScheduler: the slope is extrapolated by the polynomial
    through the last ``order`` slopes and integrated exactly over the step."""
    slopes = []

    def update(i, xk, x0, s, s_next, D):
        slopes.append((xk - x0) / s)
        del slopes[:-order]
        k = len(slopes)
        nodes = [sig[i - m] for m in range(k)]  # sigma of each stored slope, newest first
        return xk + sum(_lagrange_integral(nodes, m, s, s_next) * slopes[-1 - m] for m in range(k))

    sig = [_sigma(ab) for ab in steps.alpha_bars]
    return _karras_loop(denoise, x, steps, update, callback)


def _ancestral(s_from: float, s_to: float, eta: float) -> tuple[float, float]:
    """sigma_down, sigma_up of an ancestral step (k-diffusion's ``get_ancestral_step``)."""
    if not eta:
        return s_to, 0.0
    up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    return math.sqrt(s_to**2 - up**2), up


def sample_dpmpp_sde(denoise: Denoiser, x: torch.Tensor, steps: Steps, *, eta: float = 1.0,
                     generator: Generators = None, callback: Callback = None, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, r = 1/2, the sampler A1111 calls
    "DPM++ SDE"): an ancestral DPM-Solver++ step to the midpoint sigma, the estimate there, and an
    ancestral step over the whole interval with it. The two noises are the Brownian increments over
    [sigma_mid, sigma] and [sigma_next, sigma] (so correlated, as k-diffusion's Brownian tree gives
    them), drawn from the generators; a last step to sigma = 0 is Euler's."""
    def update(i, xk, x0, s, s_next, D):
        z1, z2 = randn_like(xk, generator), randn_like(xk, generator)
        if s_next == 0:
            return x0
        t_mid, ab_mid = steps.mids[i]
        s_mid = _sigma(ab_mid)
        down, up = _ancestral(s, s_mid, eta)
        x2 = x0 + (down / s) * (xk - x0) + s_noise * up * z1
        x0_2 = D(x2, t_mid, s_mid)
        down, up = _ancestral(s, s_next, eta)
        d1, d2 = s - s_mid, s_mid - s_next  # the Brownian increment over [s_next, s] = over [s_mid, s] + the rest
        w = (math.sqrt(d1) * z1 + math.sqrt(d2) * z2) / math.sqrt(d1 + d2)
        return x0_2 + (down / s) * (xk - x0_2) + s_noise * up * w
    return _karras_loop(denoise, x, steps, update, callback)


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
    takes_s_noise: bool = False  # accepts s_noise (the scale of its fresh noise: k-diffusion's, A1111's)
    stochastic: bool = False  # draws noise at eta = 0 too (needs the generators)

    def needs_generator(self, eta: float) -> bool:
        return self.stochastic or (self.takes_eta and eta > 0)


# name -> Sampler; the same name, grid and final level as diffusers' scheduler, so that the same
# settings give the same images. Which take a noise schedule (karras, ...): ldm.names.SCHEDULE_SAMPLERS.
_K = dict(integer=False, final="zero")
SAMPLERS = {
    "ddim": Sampler(sample_ddim, dict(integer=True, final="config"), takes_eta=True),
    "plms": Sampler(sample_plms, dict(integer=True, final="config")),
    "ddpm": Sampler(sample_ddpm, dict(integer=True, final="zero"), stochastic=True),
    "euler": Sampler(sample_euler, _K),
    "euler-a": Sampler(sample_euler_ancestral, _K, takes_eta=True, takes_s_noise=True, stochastic=True),
    "heun": Sampler(sample_heun, _K),
    "dpm2": Sampler(sample_dpm2, dict(_K, midpoints=True)),
    "lms": Sampler(sample_lms, _K),
    "dpmpp-2m": Sampler(sample_dpmpp_2m, dict(integer=True, final="zero", drop_lowest=True)),
    "dpmpp-2m-sde": Sampler(sample_dpmpp_2m_sde, dict(integer=True, final="zero", drop_lowest=True),
                            takes_eta=True, takes_s_noise=True, stochastic=True),
    "dpmpp-sde": Sampler(sample_dpmpp_sde, dict(_K, midpoints=True), takes_eta=True, takes_s_noise=True,
                         stochastic=True),
    "unipc": Sampler(sample_unipc, dict(integer=True, final="zero", drop_lowest=True)),
    "lcm": Sampler(sample_lcm, dict(lcm=True, final="zero"), stochastic=True),
}


# the diffusers scheduler each sampler matches (and the config it needs); dpmpp-sde's,
# DPMSolverSDEScheduler, draws its noise from torchsde's Brownian tree, which this project does not use
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}), "ddpm": ("DDPMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp-sde": ("DPMSolverSDEScheduler", {}), "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def diffusers_scheduler(name: str, schedule: str, config: dict):
    """The diffusers scheduler that gives ``name`` x ``schedule``'s images from a model's scheduler
    ``config``. Our sigma schedules span the model's whole sigma range, which diffusers' Euler-type
    schedulers do at linspace spacing (its DPM-Solver and UniPC at any); sgm-uniform is diffusers'
    trailing spacing."""
    import inspect

    import diffusers

    cls_name, extra = DIFFUSERS_SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    extra = dict(extra)
    if schedule in ("karras", "exponential"):
        flag = f"use_{schedule}_sigmas"
        if flag not in inspect.signature(cls.__init__).parameters:
            raise ValueError(f"diffusers' {cls_name} has no {flag}")
        extra.update({flag: True, "timestep_spacing": "linspace"})
    elif schedule == "sgm-uniform":
        extra["timestep_spacing"] = "trailing"
    return cls.from_config(config, **extra)


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
