"""Classifier-free guidance against two separate forwards and the hand formula."""

import pytest
import torch

from ldm.guidance import guided, rescale_guidance


def make_net(calls):
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def net(x, t, ctx):
        calls.append(x.shape[0])
        return x @ w + ctx["encoder_hidden_states"].mean(dim=1, keepdim=True) * t
    return net


def test_one_batched_forward_equals_two_separate_ones():
    calls = []
    net = make_net(calls)
    x = torch.randn(2, 5, 3)
    cond = {"encoder_hidden_states": torch.randn(2, 4, 3)}
    uncond = {"encoder_hidden_states": torch.randn(2, 4, 3)}
    out = guided(net, cond, uncond, 7.5)(x, 0.3)
    assert calls == [4]  # one forward of the doubled batch
    c, u = net(x, 0.3, cond), net(x, 0.3, uncond)
    torch.testing.assert_close(out, u + 7.5 * (c - u))


def test_scale_one_is_the_conditional_model_alone():
    calls = []
    net = make_net(calls)
    x = torch.randn(2, 5, 3)
    cond = {"encoder_hidden_states": torch.randn(2, 4, 3)}
    out = guided(net, cond, {"encoder_hidden_states": torch.randn(2, 4, 3)}, 1.0)(x, 0.5)
    assert calls == [2]
    torch.testing.assert_close(out, net(x, 0.5, cond))


def test_guidance_rescale_matches_formula():
    g = torch.Generator().manual_seed(1)
    cond, guided_out = torch.randn(2, 4, 8, 8, generator=g), 3 * torch.randn(2, 4, 8, 8, generator=g)
    out = rescale_guidance(guided_out, cond, 0.7)
    for i in range(2):
        ratio = cond[i].std() / guided_out[i].std()
        torch.testing.assert_close(out[i], 0.7 * guided_out[i] * ratio + 0.3 * guided_out[i])
    # phi = 1: the result has the conditional branch's std
    full = rescale_guidance(guided_out, cond, 1.0)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))


def test_negative_scale_is_refused():
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        guided(lambda x, t, c: x, {}, {}, -1.0)
