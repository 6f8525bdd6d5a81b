"""Noise schedules and timestep spacing, with the values diffusers' schedulers use.

A ``NoiseSchedule`` is built from a diffusers ``scheduler_config.json`` (any scheduler class: the
keys that define the schedule are read, the rest ignored) and hands samplers a ``Steps``: the
timesteps at which the network is evaluated and the alpha_bar level before and after each step.
Samplers never see the schedule itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .names import SCHEDULES
from .process import PREDICTION_TYPES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
LCM_ORIGINAL_STEPS = 50  # the distillation grid of latent consistency models (LCMScheduler's default)

# Stable Diffusion 1.x's training schedule (scheduler_config.json of SD 1.5), the one this project's
# own models train with
SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
                     prediction_type="epsilon", timestep_spacing="leading")


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Per-step betas, float32, computed the way diffusers computes them."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # the latent-diffusion schedule (Rombach et al. 2022)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        n = num_train_timesteps
        betas = [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def spaced_timesteps(num_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0,
                     integer: bool = True) -> np.ndarray:
    """Descending timesteps for ``num_steps`` sampling steps, as diffusers defines each spacing.

    Lin et al. 2023, table 2: ``leading`` (the Stable Diffusion default, offset by ``steps_offset``),
    ``trailing`` (starts at the last training timestep), ``linspace`` (both ends). ``integer=False``
    keeps linspace's fractional values, as diffusers' Euler schedulers do; DDIM rounds them.
    """
    if num_steps < 1:
        raise ValueError(f"the number of steps must be at least 1, got {num_steps}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"steps={num_steps} exceeds the schedule's {num_train_timesteps} training timesteps")
    T = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps, dtype=np.float64)[::-1]
        if integer:
            ts = ts.round()
    elif spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ratio = T / num_steps
        ts = np.round(np.arange(T, 0, -ratio)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {SPACINGS}")
    if ts.max() > T - 1:  # leading spacing with a steps_offset, at nearly T steps
        most = max(n for n in range(1, num_steps) if (n - 1) * (T // n) + steps_offset <= T - 1)
        raise ValueError(f"steps={num_steps} with {spacing} spacing and steps_offset={steps_offset} would reach "
                         f"timestep {int(ts.max())}, past the schedule's last ({T - 1}); use at most {most} steps")
    return np.ascontiguousarray(ts, dtype=np.float64)


class Steps(NamedTuple):
    """What a sampler needs: the network is evaluated at ``timesteps[i]`` on a sample at level
    ``alpha_bars[i]``, and step i moves it to level ``alpha_bars[i + 1]``.

    Samplers that also evaluate the network between or at the end of steps read ``next_t`` (the
    timestep of the last level, where a step lands on a level that is not noise-free: Heun at the
    end of a refiner's base run) and ``mids`` (per step, the timestep and level of the geometric
    mean of its two sigmas: DPM2 and DPM++ SDE)."""

    timesteps: list[float]   # n values
    alpha_bars: list[float]  # n + 1 values
    next_t: float | None = None
    mids: list[tuple[float, float]] | None = None  # n values (t, alpha_bar); None where a step ends at 0

    def __len__(self) -> int:  # the number of steps (so NamedTuple's _replace does not apply)
        return len(self.timesteps)

    def t_at(self, i: int) -> float:
        """The timestep of level i (i = n: ``next_t``)."""
        return self.timesteps[i] if i < len(self.timesteps) else self.next_t

    def tail(self, start: int) -> "Steps":
        """The steps from index ``start`` on (image-to-image skips the first ones)."""
        return Steps(self.timesteps[start:], self.alpha_bars[start:], self.next_t,
                     None if self.mids is None else self.mids[start:])

    def head(self, stop: int) -> "Steps":
        """The first ``stop`` steps, ending at the level the next one would start from."""
        return Steps(self.timesteps[:stop], self.alpha_bars[:stop + 1], self.t_at(stop),
                     None if self.mids is None else self.mids[:stop])

    def split_at(self, fraction: float, num_train_timesteps: int) -> int:
        """How many steps come before ``fraction`` of the way through the training timesteps
        (diffusers' denoising_end / denoising_start: those at t >= round(T - fraction T))."""
        cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))
        return sum(1 for t in self.timesteps if t >= cutoff)


@dataclass
class NoiseSchedule:
    """The discrete-time noise schedule of a model, with diffusers' config names and defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected one of {SPACINGS}")
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._ab = self.alphas_cumprod.double().numpy()
        # float32, as diffusers computes them (so that the timesteps derived from them agree to the bit)
        self._sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        self._log_sigmas = np.log(self._sigmas)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config; keys that do not define the schedule are ignored."""
        names = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in config.items() if k in names}
        if config.get("clip_sample") or config.get("thresholding"):
            import warnings
            warnings.warn("the scheduler config asks for clip_sample/thresholding; this project's samplers do "
                          "not clip x_0 (Stable Diffusion configs turn both off)", stacklevel=2)
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler configs with explicit trained_betas are not supported; "
                             "give beta_schedule/beta_start/beta_end instead")
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "NoiseSchedule":
        return cls.from_config(json.loads(Path(path).read_text()))

    def to_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    # --- values at timesteps -----------------------------------------------------------------
    def alpha_bar(self, t: float) -> float:
        """alpha_bar at timestep t; fractional t interpolates sigma = sqrt((1 - ab) / ab) linearly,
        as diffusers' Euler schedulers do."""
        if float(t).is_integer():
            return float(self._ab[int(t)])
        sig = np.sqrt((1 - self._ab) / self._ab)
        s = float(np.interp(t, np.arange(len(sig)), sig))
        return 1.0 / (1.0 + s * s)

    def sigmas(self) -> np.ndarray:
        """The training sigmas sqrt((1 - ab) / ab), one per timestep (Karras et al. 2022's sigma), in
        float32 as diffusers computes them (so that the timesteps derived from them agree to the bit)."""
        return self._sigmas

    def sigma_to_t(self, sigma: float) -> float:
        """The (fractional) timestep of a sigma, interpolating log-sigma between training timesteps,
        as k-diffusion and diffusers' ``_sigma_to_t`` do."""
        log_sigmas = self._log_sigmas
        ls = np.log(np.float64(max(sigma, 1e-10)))  # a float64 array scalar: float32 - it stays float64
        low = int(np.clip(np.searchsorted(log_sigmas, ls, side="right") - 1, 0, len(log_sigmas) - 2))
        w = float(np.clip((log_sigmas[low] - ls) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1))
        return (1 - w) * low + w * (low + 1)

    def schedule_sigmas(self, num_steps: int, schedule: str) -> np.ndarray:
        """``num_steps`` descending sigmas of a noise schedule over the model's whole sigma range
        (sigma at timestep 0 to sigma at the last), as k-diffusion builds them for A1111:
        ``karras``: Karras et al. 2022 eq. 5 with rho = 7; ``exponential``: uniform in log sigma."""
        sig = self.sigmas()
        lo, hi = sig[0].item(), sig[-1].item()
        if schedule == "karras":
            rho = 7.0
            ramp = np.linspace(0, 1, num_steps)
            return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        if schedule == "exponential":
            return np.exp(np.linspace(math.log(hi), math.log(lo), num_steps))
        raise ValueError(f"unknown sigma schedule {schedule!r}")

    def steps(self, num_steps: int, *, integer: bool = True, final: str = "zero",
              spacing: str | None = None, drop_lowest: bool = False, schedule: str = "default",
              midpoints: bool = False, lcm: bool = False) -> Steps:
        """The sampling steps for ``num_steps`` network evaluations.

        ``final`` is where the last step lands: ``"zero"`` (noise-free, sigma = 0, as diffusers'
        Euler, DPM-Solver and DDPM schedulers do) or ``"config"`` (DDIM: alpha_bar = 1 when the
        config's ``set_alpha_to_one`` is true, else alpha_bar at timestep 0).

        ``drop_lowest`` spaces ``num_steps + 1`` timesteps and drops the lowest for the leading and
        linspace spacings, as diffusers' multistep DPM-Solver does: a multistep solver becomes
        unstable when its last steps are very uneven in log-SNR, as a step down to t ~ 0 is.

        ``schedule`` (A1111's schedule type): ``default`` spaces timesteps by the config's
        spacing; ``karras`` and ``exponential`` space sigmas (``schedule_sigmas``), each evaluated
        at the timestep of its sigma (made an integer where ``integer``: diffusers' multistep solvers);
        ``sgm-uniform`` is the trailing spacing (SGM's uniform timesteps from the last one down).
        ``midpoints`` adds each step's geometric-mean sigma; ``lcm`` is the latent consistency
        models' grid: ``num_steps`` of the 50 distillation timesteps (Luo et al. 2023).
        """
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        spacing = "trailing" if schedule == "sgm-uniform" else (spacing or self.timestep_spacing)
        if lcm:
            if num_steps < 1 or num_steps > LCM_ORIGINAL_STEPS:
                raise ValueError(f"the lcm sampler takes 1 to {LCM_ORIGINAL_STEPS} steps, got {num_steps}")
            k = self.num_train_timesteps // LCM_ORIGINAL_STEPS
            origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
            ts = origin[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, num_steps, endpoint=False)).astype(np.int64)]
            abs_ = [self.alpha_bar(t) for t in ts]
        elif schedule in ("karras", "exponential"):
            if num_steps < 1:
                raise ValueError(f"the number of steps must be at least 1, got {num_steps}")
            sig = self.schedule_sigmas(num_steps, schedule)
            ts = np.array([self.sigma_to_t(x) for x in sig])
            if integer:  # diffusers' multistep solvers round these under karras but truncate under exponential
                ts = np.floor(ts) if schedule == "exponential" else ts.round()
            abs_ = [1.0 / (1.0 + float(x) ** 2) for x in sig]
        else:
            if drop_lowest and spacing != "trailing":
                ts = spaced_timesteps(num_steps + 1, self.num_train_timesteps, spacing, self.steps_offset,
                                      integer)[:-1]
            else:
                ts = spaced_timesteps(num_steps, self.num_train_timesteps, spacing, self.steps_offset, integer)
            abs_ = [self.alpha_bar(t) for t in ts]
        if final == "zero" or (final == "config" and self.set_alpha_to_one):
            abs_.append(1.0)
        elif final == "config":
            abs_.append(float(self._ab[0]))
        else:
            raise ValueError(f"final must be 'zero' or 'config', got {final!r}")
        mids = None
        if midpoints:
            mids = []
            for a, b in zip(abs_[:-1], abs_[1:]):
                if b >= 1.0:
                    mids.append(None)
                    continue
                s_mid = math.sqrt(math.sqrt((1 - a) / a * (1 - b) / b))
                mids.append((self.sigma_to_t(s_mid), 1.0 / (1.0 + s_mid * s_mid)))
        return Steps([float(t) for t in ts], abs_, None, mids)

    def inversion_steps(self, steps: Steps) -> Steps:
        """The steps that carry a clean sample up the levels of ``steps`` (DDIM inversion): the
        network is evaluated at each level on the way up, from timestep 0 for the clean sample."""
        ts = [0.0] + list(reversed(steps.timesteps[1:]))
        abs_ = [float(self._ab[0])] + list(reversed(steps.alpha_bars[:-1]))
        return Steps(ts, abs_)
