"""Samplers on Gaussian data, where the exact denoiser is known in closed form.

Data x0 ~ N(mu, s^2) per coordinate. At level ab, x_t = a x0 + b eps (a = sqrt(ab), b = sqrt(1-ab)),
so E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu). Started from the exact marginal at the
first level, an exact sampler lands on N(mu, s^2); discretisation error shrinks with the steps.
"""

import inspect
import math

import pytest
import torch

from ldm.samplers import (SAMPLERS, SCHEDULE_SAMPLERS, invert_ddim, sample_ddim, sample_ddpm, sample_plms, sample_dpm2, sample_dpmpp_2m,
                          sample_dpmpp_2m_sde, sample_dpmpp_sde, sample_euler, sample_euler_ancestral, sample_heun,
                          sample_lcm, sample_lms, sample_unipc)
from ldm.schedule import NoiseSchedule, Steps

MU, S = 1.5, 0.5
N = 200_000


def exact_denoiser(x, t, ab):
    a, b2 = math.sqrt(ab), 1 - ab
    return MU + a * S**2 / (a * a * S**2 + b2) * (x - a * MU)


def start(steps, seed=0):
    ab = steps.alpha_bars[0]
    g = torch.Generator().manual_seed(seed)
    return math.sqrt(ab) * MU + math.sqrt(ab * S**2 + 1 - ab) * torch.randn(N, generator=g, dtype=torch.float64)


SCHED = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")


# First-order samplers miss the std by about 6/n here (measured: DDIM 0.031 at 50 steps, 0.009 at
# 200, 0.002 at 1000): the step counts and tolerances below leave that discretisation error room.
@pytest.mark.parametrize("name,fn,n,tol", [
    ("ddim", sample_ddim, 500, 0.01),
    ("plms", sample_plms, 100, 0.01),
    ("euler", sample_euler, 500, 0.01),
    ("dpmpp-2m", sample_dpmpp_2m, 200, 0.01),
    ("ddpm", sample_ddpm, 500, 0.01),
    ("euler-a", sample_euler_ancestral, 500, 0.01),
    ("heun", sample_heun, 100, 0.01),
    ("dpm2", sample_dpm2, 100, 0.01),
    ("lms", sample_lms, 100, 0.01),
    ("unipc", sample_unipc, 100, 0.01),
    ("dpmpp-2m-sde", sample_dpmpp_2m_sde, 200, 0.01),
    ("dpmpp-sde", sample_dpmpp_sde, 200, 0.01),
])
def test_sampler_lands_on_the_data_distribution(name, fn, n, tol):
    steps = SCHED.steps(n, midpoints=True)
    kwargs = {"generator": torch.Generator().manual_seed(1)} if SAMPLERS[name].stochastic else {}
    x = fn(exact_denoiser, start(steps), steps, **kwargs)
    assert abs(float(x.mean()) - MU) < tol + 4 * S / math.sqrt(N)
    assert abs(float(x.std()) - S) < tol + 4 * S / math.sqrt(2 * N)


def test_ddim_with_eta_lands_on_the_data_distribution():
    steps = SCHED.steps(500)
    x = sample_ddim(exact_denoiser, start(steps), steps, eta=0.5, generator=torch.Generator().manual_seed(2))
    assert abs(float(x.mean()) - MU) < 0.01
    assert abs(float(x.std()) - S) < 0.01


def exact_flow(x, ab_t, ab_s):
    """The probability-flow ODE of Gaussian data keeps the standardised sample fixed: the exact map
    from level ab_t to ab_s."""
    sd = lambda a: math.sqrt(a * S * S + 1 - a)  # noqa: E731
    return math.sqrt(ab_s) * MU + sd(ab_s) / sd(ab_t) * (x - math.sqrt(ab_t) * MU)


def lambda_grid(n, lo=-3.0, hi=3.0):
    """n steps uniform in half-log-SNR lambda (Lu et al. 2022); the timesteps are unused here."""
    from ldm.schedule import Steps
    lams = [lo + (hi - lo) * i / n for i in range(n + 1)]
    return Steps([0.0] * n, [1 / (1 + math.exp(-2 * lam)) for lam in lams])


def flow_error(fn, n):
    steps = lambda_grid(n)
    x = start(steps)[:2000]
    return float((fn(exact_denoiser, x, steps) - exact_flow(x, steps.alpha_bars[0], steps.alpha_bars[-1])).abs().max())


def test_euler_is_first_order_and_dpmpp_2m_second_order():
    """Pathwise error against the exact flow: halving the step halves Euler's (=DDIM's) error and
    quarters DPM-Solver++(2M)'s (measured: Euler 0.127 -> 0.065, DPM++ 0.0087 -> 0.0023)."""
    e20, e40 = flow_error(sample_euler, 20), flow_error(sample_euler, 40)
    d20, d40 = flow_error(sample_dpmpp_2m, 20), flow_error(sample_dpmpp_2m, 40)
    assert 1.7 < e20 / e40 < 2.3
    assert d20 / d40 > 3.0
    assert d20 < e20 / 5


def with_mids(steps: Steps) -> Steps:
    """The geometric-mean sigma of each step (what NoiseSchedule.steps(midpoints=True) adds)."""
    mids = []
    for a, b in zip(steps.alpha_bars[:-1], steps.alpha_bars[1:]):
        s = math.sqrt(math.sqrt((1 - a) / a * (1 - b) / b))
        mids.append((0.0, 1 / (1 + s * s)))
    return Steps(steps.timesteps, steps.alpha_bars, steps.next_t, mids)


@pytest.mark.parametrize("fn", [sample_heun, sample_dpm2, sample_lms, sample_unipc])
def test_higher_order_samplers_converge_faster_than_first_order(fn):
    """Against the exact probability-flow answer, on a grid that ends short of sigma = 0 (so no last
    Euler step): halving the step cuts the error at least 3x, second order or better (measured: Heun
    and DPM2 ~4x, UniPC ~4x, LMS ~10x), where Euler's is 2x."""
    def error(n):
        steps = with_mids(lambda_grid(n))
        x = start(steps)[:2000]
        return float((fn(exact_denoiser, x, steps) - exact_flow(x, steps.alpha_bars[0], steps.alpha_bars[-1])).abs().max())

    e20, e40 = error(20), error(40)
    assert e20 / e40 > 3.0
    assert e20 < flow_error(sample_euler, 20) / 5


def exact_consistency(x, t, ab):
    """The exact consistency function of Gaussian data: the probability-flow ODE solved to ab = 1."""
    return exact_flow(x, ab, 1.0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_lcm_with_the_exact_consistency_function_lands_on_the_data(n):
    """Given the exact consistency function (Song et al. 2023), multistep consistency sampling is exact
    at any number of steps; the boundary-condition scalings at t > 0 change it by < 1e-6."""
    steps = SCHED.steps(n, **SAMPLERS["lcm"].grid)
    x = sample_lcm(exact_consistency, start(steps), steps, generator=torch.Generator().manual_seed(2))
    assert abs(float(x.mean()) - MU) < 4 * S / math.sqrt(N)
    assert abs(float(x.std()) - S) < 4 * S / math.sqrt(2 * N)


SPACINGS = dict(leading=1, linspace=0, trailing=0)  # spacing -> steps_offset


def run_diffusers(cls, cfg, n, x, extra, generator):
    """Drive a diffusers scheduler with the exact denoiser (as epsilon), from the same start x (in the
    variance-preserving form); returns its final sample."""
    ref = cls(**cfg, prediction_type="epsilon", **extra)
    ref.set_timesteps(n)
    karras_form = ref.init_noise_sigma > 1.5  # Euler-like schedulers work on x / sqrt(alpha_bar)
    y = x * math.sqrt(1 + float(ref.sigmas[0]) ** 2) if karras_form else x.clone()
    for i, t in enumerate(ref.timesteps):
        if karras_form:
            ab = float(ref.scale_model_input(torch.ones(1, dtype=torch.float64), t)) ** 2
        elif hasattr(ref, "sigmas"):
            ab = 1 / (1 + float(ref.sigmas[i]) ** 2)
        else:
            ab = float(ref.alphas_cumprod[int(t)])
        inp = ref.scale_model_input(y, t)
        eps = (inp - math.sqrt(ab) * exact_denoiser(inp, float(t), ab)) / math.sqrt(1 - ab)
        y = ref.step(eps, t, y, **({"generator": generator} if generator else {})).prev_sample
    return y


def diffusers_cases():
    import diffusers as d
    classes = {"euler": d.EulerDiscreteScheduler, "euler-a": d.EulerAncestralDiscreteScheduler,
               "heun": d.HeunDiscreteScheduler, "dpm2": d.KDPM2DiscreteScheduler, "lms": d.LMSDiscreteScheduler,
               "dpmpp-2m": d.DPMSolverMultistepScheduler, "dpmpp-2m-sde": d.DPMSolverMultistepScheduler,
               "unipc": d.UniPCMultistepScheduler, "lcm": d.LCMScheduler}
    flags = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
    for name, cls in classes.items():
        extra = {"algorithm_type": "sde-dpmsolver++"} if name == "dpmpp-2m-sde" else {}
        for spacing in SPACINGS:
            yield name, cls, "default", spacing, extra
        # the sigma schedules span the model's whole sigma range, as diffusers' spaced range does at
        # linspace spacing; sgm-uniform is diffusers' trailing spacing
        if name in SCHEDULE_SAMPLERS:
            for sched, flag in flags.items():
                if set(flag) <= set(inspect.signature(cls.__init__).parameters):  # not euler-a's
                    yield name, cls, sched, "linspace", {**extra, **flag}
            yield name, cls, "sgm-uniform", "trailing", extra


@pytest.mark.parametrize("name,cls,schedule,spacing,extra", list(diffusers_cases()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_sampler_matches_its_diffusers_scheduler(name, cls, schedule, spacing, extra):
    """Each sampler x schedule against the diffusers scheduler of the same name on the same start, the
    exact denoiser and (for the stochastic ones) the same generator: the same trajectory to float32
    precision (measured max difference <= 2e-6)."""
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
               steps_offset=SPACINGS[spacing])
    spec = SAMPLERS[name]
    steps = NoiseSchedule(**cfg).steps(10, schedule=schedule, **spec.grid)
    x = start(steps)[:2000].reshape(20, 100).float()
    gen = (lambda: torch.Generator().manual_seed(0)) if spec.stochastic else (lambda: None)
    ours = spec.fn(exact_denoiser, x, steps, **({"generator": gen()} if spec.stochastic else {}))
    torch.testing.assert_close(ours, run_diffusers(cls, cfg, 10, x, extra, gen()), rtol=0, atol=1e-5)


def test_ddim_inversion_reconstructs():
    sched = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          set_alpha_to_one=False, steps_offset=1)
    steps = sched.steps(500, final="config")
    x0 = MU + S * torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise = invert_ddim(exact_denoiser, x0, sched.inversion_steps(steps))
    back = sample_ddim(exact_denoiser, noise, steps)
    # first-order error in both directions (measured mean 0.018 at 100 steps, 0.004 at 500)
    assert float((back - x0).abs().mean()) < 0.008
    assert float((back - x0).abs().max()) < 0.03
    # the inverted noise is (close to) the marginal at the first level
    assert abs(float(noise.std()) - math.sqrt(steps.alpha_bars[0] * S**2 + 1 - steps.alpha_bars[0])) < 0.1


@pytest.mark.parametrize("fn", [sample_ddpm, sample_euler_ancestral])
def test_per_image_generators_make_batches_equal_lone_images(fn):
    steps = SCHED.steps(10)

    def run(seeds):
        x = torch.zeros(len(seeds), 4, 3, 3)
        for i, s in enumerate(seeds):
            x[i] = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(s))
        return fn(exact_denoiser, x, steps, generator=[torch.Generator().manual_seed(100 + s) for s in seeds])

    batch = run([7, 8, 9])
    torch.testing.assert_close(batch[1:2], run([8]))
    torch.testing.assert_close(batch[2:3], run([9]))


def test_samplers_draw_only_from_their_generators():
    steps = SCHED.steps(10)
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    a = sample_euler_ancestral(exact_denoiser, x, steps, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # a different global seed must not matter
    b = sample_euler_ancestral(exact_denoiser, x, steps, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_zero_terminal_snr_start_is_handled():
    """With a zero-SNR schedule the first level is pure noise (ab = 0); samplers must not divide by it."""
    sched = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          rescale_betas_zero_snr=True, timestep_spacing="trailing")
    steps = sched.steps(500)
    assert steps.alpha_bars[0] == 0.0
    x = torch.randn(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for fn in (sample_ddim, sample_dpmpp_2m):
        out = fn(exact_denoiser, x, steps)
        assert torch.isfinite(out).all()
        assert abs(float(out.mean()) - MU) < 0.01 and abs(float(out.std()) - S) < 0.01


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_dpmpp_2m_matches_diffusers_dpm_solver(spacing):
    """Same exact denoiser through diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2)."""
    from diffusers import DPMSolverMultistepScheduler

    from ldm.samplers import SAMPLERS

    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
               steps_offset=1 if spacing == "leading" else 0)
    ref = DPMSolverMultistepScheduler(**cfg, prediction_type="sample", algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(10)
    steps = NoiseSchedule(**cfg).steps(10, **SAMPLERS["dpmpp-2m"].grid)
    assert steps.timesteps == [float(t) for t in ref.timesteps]
    x = start(steps)[:2000]
    y = x.clone()
    for t in ref.timesteps:
        y = ref.step(exact_denoiser(y, float(t), float(ref.alphas_cumprod[int(t)])), t, y).prev_sample
    torch.testing.assert_close(sample_dpmpp_2m(exact_denoiser, x, steps), y, rtol=0, atol=1e-5)


def test_the_sampler_table_and_the_names_agree():
    """ldm.names (torch-free, for the command line) lists exactly the samplers ldm.samplers runs."""
    from ldm.names import A1111_SAMPLERS, SAMPLER_NAMES
    assert tuple(SAMPLERS) == SAMPLER_NAMES == tuple(A1111_SAMPLERS)
    assert set(SCHEDULE_SAMPLERS) == set(SAMPLERS) - {"ddim", "plms", "ddpm", "lcm"}


@pytest.mark.parametrize("name", ["euler-a", "dpmpp-2m-sde", "dpmpp-sde"])
def test_s_noise_scales_the_fresh_noise(name):
    """k-diffusion's s_noise: the noise a step adds, scaled. With the exact (affine) denoiser each step is
    affine in s_noise, so the first step at 0.5 is the mean of those at 0 and 1; at 1 it is the sampler
    itself; and below 1 the samples come out narrower than the data."""
    fn = SAMPLERS[name].fn
    assert SAMPLERS[name].takes_s_noise
    steps = SCHED.steps(20, midpoints=True)
    x = start(steps)[:5000]

    def first_step(**kw):
        seen = []
        fn(exact_denoiser, x, steps, generator=torch.Generator().manual_seed(3),
           callback=lambda i, xi, x0: seen.append(xi) if i == 0 else None, **kw)
        return seen[0]

    at0, half, at1 = first_step(s_noise=0.0), first_step(s_noise=0.5), first_step(s_noise=1.0)
    torch.testing.assert_close(half, (at0 + at1) / 2, rtol=0, atol=1e-9)
    torch.testing.assert_close(at1, first_step(), rtol=0, atol=0)
    assert (at1 - at0).abs().max() > 0.05  # the noise is there to scale
    out = fn(exact_denoiser, start(steps), steps, generator=torch.Generator().manual_seed(1), s_noise=0.5)
    assert float(out.std()) < S - 0.05
    assert [n for n, s in SAMPLERS.items() if s.takes_s_noise] == ["euler-a", "dpmpp-2m-sde", "dpmpp-sde"]
