"""Schedule values and timestep spacing against diffusers' own schedulers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from ldm.schedule import SD1_SCHEDULER, NoiseSchedule, spaced_timesteps

CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_alphas_cumprod_match_diffusers(cfg):
    ref = DDPMScheduler(**cfg)  # clip_sample defaults to True here: we do not clip, and say so
    with pytest.warns(UserWarning, match="do not clip x_0"):
        ours = NoiseSchedule.from_config(ref.config)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-7)


def test_zero_terminal_snr_reaches_zero():
    s = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 4, 10, 50, 333])
def test_ddim_timesteps_and_final_level_match(spacing, offset, n):
    ref = DDIMScheduler(**dict(SD1_SCHEDULER, timestep_spacing=spacing, steps_offset=offset))
    ref.set_timesteps(n)
    ours = NoiseSchedule.from_config(ref.config)
    steps = ours.steps(n, integer=True, final="config")
    assert steps.timesteps == [float(t) for t in ref.timesteps]
    expect = [float(ref.alphas_cumprod[int(t)]) for t in ref.timesteps] + [float(ref.final_alpha_cumprod)]
    np.testing.assert_allclose(steps.alpha_bars, expect, rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [3, 25])
def test_euler_timesteps_and_sigmas_match(spacing, n):
    cfg = {k: v for k, v in SD1_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}
    ref = EulerDiscreteScheduler(**dict(cfg, timestep_spacing=spacing))
    ref.set_timesteps(n)
    ours = NoiseSchedule.from_config(ref.config)
    steps = ours.steps(n, integer=False, final="zero")
    np.testing.assert_allclose(steps.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-3)
    sigmas = [((1 - a) / a) ** 0.5 for a in steps.alpha_bars]
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-5, atol=1e-6)


def test_spacing_rejects_bad_counts():
    with pytest.raises(ValueError, match="at least 1"):
        spaced_timesteps(0, 1000, "leading")
    with pytest.raises(ValueError, match="exceeds"):
        spaced_timesteps(1001, 1000, "leading")
    with pytest.raises(ValueError, match="timestep_spacing"):
        NoiseSchedule(timestep_spacing="middle")


def test_unknown_config_keys_are_ignored_and_prediction_type_checked():
    s = NoiseSchedule.from_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True,
                                   "prediction_type": "v_prediction"})
    assert s.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(prediction_type="noise")


def test_inversion_steps_mirror_sampling_steps():
    s = NoiseSchedule(**{k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"})
    st = s.steps(5, final="config")
    inv = s.inversion_steps(st)
    assert len(inv) == len(st)
    # it climbs from the clean level to the first sampling level, through the same levels
    assert inv.alpha_bars[-1] == st.alpha_bars[0]
    assert inv.alpha_bars[1:] == list(reversed(st.alpha_bars[:-1]))
    assert inv.timesteps[1:] == list(reversed(st.timesteps[1:]))


def test_leading_spacing_past_the_last_timestep_is_a_clear_error():
    # SD's leading spacing with steps_offset=1 at 1000 steps would index timestep 1000 of 0..999
    with pytest.raises(ValueError, match="use at most 999 steps"):
        spaced_timesteps(1000, 1000, "leading", steps_offset=1)
    ts = spaced_timesteps(999, 1000, "leading", steps_offset=1)
    assert ts[0] == 999 and ts[-1] == 1
