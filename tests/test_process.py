"""The diffusion process against closed forms."""

import math

import pytest
import torch

from ldm import process as P

AB = [0.999, 0.7, 0.3, 0.01]


@pytest.mark.parametrize("ab", AB)
def test_parameterisations_round_trip(ab):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    xt = P.q_sample(x0, eps, ab)
    v = P.v_from_eps_x0(eps, x0, ab)
    # Salimans & Ho 2022: v = alpha eps - sigma x0, x0 = alpha x_t - sigma v, eps = alpha v + sigma x_t
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    torch.testing.assert_close(v, a * eps - s * x0)
    for kind, pred in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        torch.testing.assert_close(P.to_x0(pred, xt, ab, kind), x0)
        torch.testing.assert_close(P.from_x0(x0, xt, ab, kind), pred)
    with pytest.raises(ValueError, match="prediction_type"):
        P.to_x0(eps, xt, ab, "noise")


@pytest.mark.parametrize("ab_t,ab_s", [(0.3, 0.7), (0.01, 0.999), (0.5, 0.51)])
def test_posterior_equals_gaussian_conditioning(ab_t, ab_s):
    """q(x_s | x_t, x0) from the generic Gaussian conditioning formula on the joint of (x_s, x_t)."""
    x0, xt = 0.8, -1.3
    # x_s = a_s x0 + b_s e1 ; x_t = r x_s + c e2 with r^2 = ab_t / ab_s
    a_s, b_s = math.sqrt(ab_s), math.sqrt(1 - ab_s)
    r, c = math.sqrt(ab_t / ab_s), math.sqrt(1 - ab_t / ab_s)
    var_s, cov, var_t = b_s**2, r * b_s**2, r**2 * b_s**2 + c**2
    mean_t = r * a_s * x0
    want_mean = a_s * x0 + cov / var_t * (xt - mean_t)
    want_var = var_s - cov**2 / var_t
    mean, var = P.posterior(torch.tensor(x0, dtype=torch.float64), torch.tensor(xt, dtype=torch.float64), ab_t, ab_s)
    assert float(mean) == pytest.approx(want_mean, rel=1e-10)
    assert var == pytest.approx(want_var, rel=1e-10)


def test_snr():
    assert P.snr(0.5) == 1.0
    assert P.snr(0.8) == pytest.approx(4.0)
