"""A1111's everyday controls on the embedded model: hires fix, variation seeds, batch count (n_iter).
Each is checked against the same result composed by hand from the plain calls (a second run)."""

import math

import pytest
import torch
from PIL import Image

from ldm.samplers import slerp
from pipelines.pngmeta import parse_parameters


@pytest.fixture(scope="module")
def pipe():
    from pipelines.pipeline import Pipeline
    return Pipeline.from_pretrained("ldm/assets/shapes-model")


def test_hires_fix_is_generate_upscale_then_image_to_image(pipe):
    kw = dict(steps=6, seed=3, negative_prompt="a square")
    hires = pipe.text_to_image("a red circle", hires_scale=2, hires_strength=0.5, hires_steps=4,
                               hires_upscaler="lanczos", **kw)
    assert hires.pixels.shape == (1, 3, 128, 128)
    small = pipe.text_to_image("a red circle", **kw).images[0].resize((128, 128), Image.LANCZOS)
    by_hand = pipe.image_to_image("a red circle", small, strength=0.5, **{**kw, "steps": 4})
    torch.testing.assert_close(hires.pixels, by_hand.pixels, rtol=0, atol=1e-5)
    info = parse_parameters(pipe.infotexts(hires)[0])
    assert (info["Size"], info["Hires upscale"], info["Hires steps"], info["Hires upscaler"],
            info["Denoising strength"]) == ("64x64", "2", "4", "Lanczos", "0.5")


def test_prompt_editing_in_the_hires_pass_is_a1111s(pipe):
    """[a:b:1.5] switches in the middle of the hires pass (A1111's schedule): the pass equals image-to-image
    of the first pass's image with a prompt that is "a" for the first half of the hires steps, which the
    plain schedule over those steps writes [a:b:0.5]; the first pass ran all its steps on "a"."""
    kw = dict(seed=3, negative_prompt="a square")
    hires = pipe.text_to_image("a large [red:blue:1.5] circle", steps=6, hires_scale=2, hires_strength=1.0,
                               hires_steps=4, hires_upscaler="lanczos", **kw)
    small = pipe.text_to_image("a large red circle", steps=6, **kw).images[0].resize((128, 128), Image.LANCZOS)
    by_hand = pipe.image_to_image("a large [red:blue:0.5] circle", small, strength=1.0, steps=4, **kw)
    torch.testing.assert_close(hires.pixels, by_hand.pixels, rtol=0, atol=1e-5)
    plain = pipe.image_to_image("a large blue circle", small, strength=1.0, steps=4, **kw)
    assert (hires.pixels - plain.pixels).abs().max() > 1e-2  # the editing is seen


def test_latent_hires_fix_upscales_the_latents(pipe):
    steps = []
    res = pipe.text_to_image("a red circle", steps=6, seed=3, hires_scale=1.5, hires_strength=0.5,
                             callback=lambda i, x, x0: steps.append((i, tuple(x.shape))))
    assert res.pixels.shape == (1, 3, 96, 96)
    # 6 first-pass steps at 8x8 latents, then int(6 x 0.5) = 3 at 12x12, counted on
    assert steps == [(i, (1, 4, 8, 8)) for i in range(6)] + [(6 + i, (1, 4, 12, 12)) for i in range(3)]


def test_hires_fix_rejects_bad_values(pipe):
    with pytest.raises(ValueError, match="hires_upscaler: no upscaler 'esrgan'; available: latent, lanczos"):
        pipe.text_to_image("x", hires_scale=2, hires_upscaler="esrgan")
    with pytest.raises(ValueError, match="hires_scale: applies to text-to-image"):
        pipe.image_to_image("x", Image.new("RGB", (64, 64)), hires_scale=2)


def test_n_iter_runs_batches_in_sequence_with_a1111_seeds(pipe):
    res = pipe.text_to_image("a blue star", steps=4, seed=10, batch_size=2, n_iter=2)
    assert res.seeds == [10, 11, 12, 13] and res.pixels.shape[0] == 4
    lone = pipe.text_to_image("a blue star", steps=4, seed=12)
    # a batch of 2 and a batch of 1 take different CPU kernels (fp32 sums in another order): 1.2e-5 on the
    # shipped model; another seed's image would differ by tenths
    torch.testing.assert_close(res.pixels[2:3], lone.pixels, rtol=0, atol=1e-4)


def test_variation_seed_ends_are_the_two_seeds(pipe):
    kw = dict(steps=4, sampler="ddim")
    a = pipe.text_to_image("a red circle", seed=1, **kw).pixels
    b = pipe.text_to_image("a red circle", seed=7, **kw).pixels
    one = pipe.text_to_image("a red circle", seed=1, subseed=7, subseed_strength=1.0, **kw).pixels
    mid = pipe.text_to_image("a red circle", seed=1, subseed=7, subseed_strength=0.2, **kw)
    torch.testing.assert_close(one, b, rtol=0, atol=1e-5)
    assert 0 < (mid.pixels - a).abs().max() and (mid.pixels - b).abs().max() > 1e-3
    info = parse_parameters(pipe.infotexts(mid)[0])
    assert (info["Variation seed"], info["Variation seed strength"]) == ("7", "0.2")


def test_slerp_walks_the_great_circle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    bn = b * (a.norm() / b.norm())  # equal norms: the arc of one sphere
    fa, fb, fm = a.flatten(), bn.flatten(), slerp(a, bn, 0.3).flatten()
    angle = lambda u, v: math.acos(float(u @ v / (u.norm() * v.norm())))  # noqa: E731
    assert angle(fa, fm) == pytest.approx(0.3 * angle(fa, fb), rel=1e-4)
    assert angle(fm, fb) == pytest.approx(0.7 * angle(fa, fb), rel=1e-4)
    assert float(fm.norm()) == pytest.approx(float(fa.norm()), rel=1e-5)
