"""The Gaussian diffusion process in the variance-preserving form (Ho et al. 2020, "DDPM").

Every function here takes the cumulative product of the alphas, written ``alpha_bar`` (DDPM's
bar-alpha_t), rather than a timestep, so that it works for any schedule and any spacing.
``alpha_bar`` may be a Python float or a tensor that broadcasts against the latents.

    x_t = sqrt(alpha_bar) * x_0 + sqrt(1 - alpha_bar) * eps            (DDPM eq. 4)

Three parameterisations of what a network predicts are in use: the noise ``eps`` (DDPM), the clean
sample ``x0``, and the velocity ``v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0``
(Salimans & Ho 2022, "Progressive distillation", section 4).
"""

from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _sqrt(a):
    return a.sqrt() if isinstance(a, torch.Tensor) else math.sqrt(a)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Draw from q(x_t | x_0) with the given noise (DDPM eq. 4)."""
    return _sqrt(alpha_bar) * x0 + _sqrt(1 - alpha_bar) * noise


def posterior(x0: torch.Tensor, xt: torch.Tensor, alpha_bar_t, alpha_bar_s):
    """Mean and variance of q(x_s | x_t, x_0) for s < t (DDPM eq. 6-7, for any pair of levels).

    With alpha_ts = alpha_bar_t / alpha_bar_s and beta_ts = 1 - alpha_ts (for consecutive steps these
    are DDPM's alpha_t and beta_t):
        mean = sqrt(alpha_bar_s) beta_ts / (1 - alpha_bar_t) * x0
             + sqrt(alpha_ts) (1 - alpha_bar_s) / (1 - alpha_bar_t) * x_t
        var  = (1 - alpha_bar_s) / (1 - alpha_bar_t) * beta_ts
    """
    alpha_ts = alpha_bar_t / alpha_bar_s
    beta_ts = 1 - alpha_ts
    coef_x0 = _sqrt(alpha_bar_s) * beta_ts / (1 - alpha_bar_t)
    coef_xt = _sqrt(alpha_ts) * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    var = (1 - alpha_bar_s) / (1 - alpha_bar_t) * beta_ts
    return coef_x0 * x0 + coef_xt * xt, var


def snr(alpha_bar):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021)."""
    return alpha_bar / (1 - alpha_bar)


# --- Conversions between parameterisations, all at a given x_t and alpha_bar -------------------

def x0_from_eps(xt, eps, alpha_bar):
    return (xt - _sqrt(1 - alpha_bar) * eps) / _sqrt(alpha_bar)


def eps_from_x0(xt, x0, alpha_bar):
    return (xt - _sqrt(alpha_bar) * x0) / _sqrt(1 - alpha_bar)


def v_from_eps_x0(eps, x0, alpha_bar):
    return _sqrt(alpha_bar) * eps - _sqrt(1 - alpha_bar) * x0


def x0_from_v(xt, v, alpha_bar):
    return _sqrt(alpha_bar) * xt - _sqrt(1 - alpha_bar) * v


def to_x0(prediction: torch.Tensor, xt: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """Turn a network output of the given parameterisation into the x_0 estimate."""
    if prediction_type == "epsilon":
        return x0_from_eps(xt, prediction, alpha_bar)
    if prediction_type == "v_prediction":
        return x0_from_v(xt, prediction, alpha_bar)
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def from_x0(x0: torch.Tensor, xt: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """Express an x_0 estimate in the given parameterisation (the inverse of ``to_x0``)."""
    if prediction_type == "sample":
        return x0
    eps = eps_from_x0(xt, x0, alpha_bar)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_from_eps_x0(eps, x0, alpha_bar)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def truncated_snr_weight(alpha_bar):
    """max(SNR, 1): the "truncated SNR" weighting of an x-space loss (Salimans & Ho 2022, sec. 4),
    which keeps weight on the noisiest levels, where SNR -> 0 would give none."""
    s = snr(alpha_bar)
    return s.clamp(min=1.0) if isinstance(s, torch.Tensor) else max(s, 1.0)


# --- The deterministic DDIM step and its inverse ------------------------------------------------

def ddim_step(xt: torch.Tensor, x0: torch.Tensor, alpha_bar_t, alpha_bar_s) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0) from level alpha_bar_t to
    alpha_bar_s given the estimate x0:  x_s = alpha_s x0 + (sigma_s / sigma_t)(x_t - alpha_t x0).
    Levels may be floats or per-sample tensors (at alpha_bar_t = 0, zero SNR, eps is x_t itself)."""
    return q_sample(x0, eps_from_x0(xt, x0, alpha_bar_t), alpha_bar_s)


def ddim_x0_for(xt: torch.Tensor, xs: torch.Tensor, alpha_bar_t, alpha_bar_s) -> torch.Tensor:
    """The x0 that one DDIM step from x_t at alpha_bar_t must be given to land on x_s at alpha_bar_s
    (the inverse of ``ddim_step`` in x0; the progressive-distillation target, Salimans & Ho 2022,
    Alg. 2):  x0 = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
    ratio = _sqrt(1 - alpha_bar_s) / _sqrt(1 - alpha_bar_t)
    return (xs - ratio * xt) / (_sqrt(alpha_bar_s) - ratio * _sqrt(alpha_bar_t))
