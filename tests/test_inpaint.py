"""Inpainting as AUTOMATIC1111 does it (ldm.inpaint, Pipeline._inpaint): outside the blurred mask the
output is the input exactly, whatever the masked content, inverted or not; "only masked" works the
mask's box at the model's size inside a larger image and pastes it back; the helpers against closed
forms; the PNG records the settings under A1111's names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.inpaint import blur_mask, crop_region, fill_masked, latent_mask
from ldm.models import default_model_path
from pipelines.pipeline import Pipeline

PROMPT = "a large red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(default_model_path())


def _image(size=64, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def _pixels(res) -> np.ndarray:
    return np.asarray(res.images[0].convert("RGB")).astype(int)


@pytest.mark.parametrize("fill", ["original", "fill", "latent-noise", "latent-nothing"])
@pytest.mark.parametrize("invert", [False, True])
def test_outside_the_blurred_mask_the_output_is_the_input(pipe, fill, invert):
    image = _image()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 20, 44, 48))
    res = pipe.inpaint("a green star", image, mask, steps=6, seed=2, mask_blur=4, inpaint_fill=fill,
                       mask_invert=invert)
    out, src = _pixels(res), np.asarray(image).astype(int)
    m = np.asarray(mask) if not invert else 255 - np.asarray(mask)
    blurred = np.asarray(blur_mask(Image.fromarray(m.astype(np.uint8)), 4))
    outside = blurred == 0
    assert outside.sum() > 50 and (~outside).sum() > 500
    assert np.array_equal(out[outside], src[outside])
    assert np.abs(out[m == 255] - src[m == 255]).mean() > 20  # repainted where asked


def test_masked_content_changes_where_the_masked_region_starts(pipe):
    image, mask = _image(seed=1), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    outs = {f: _pixels(pipe.inpaint(PROMPT, image, mask, steps=6, seed=3, strength=0.6, inpaint_fill=f))
            for f in ("original", "fill", "latent-noise", "latent-nothing")}
    inside = np.asarray(mask) == 255
    for a in outs:
        for b in outs:
            if a < b:
                assert np.abs(outs[a][inside] - outs[b][inside]).mean() > 2, (a, b)


def test_only_masked_works_the_box_at_the_models_size_and_pastes_it_back(pipe):
    image = _image(256, seed=2)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (150, 40, 170, 60))
    res = pipe.inpaint(PROMPT, image, mask, steps=6, seed=4, only_masked=True, only_masked_padding=8, mask_blur=2)
    assert res.latents.shape[-2:] == (8, 8)  # the 64 px the model makes, not 256
    out, src = _pixels(res), np.asarray(image).astype(int)
    assert out.shape == (256, 256, 3)
    blurred = np.asarray(blur_mask(mask, 2))
    assert np.array_equal(out[blurred == 0], src[blurred == 0])
    assert np.abs(out[40:60, 150:170] - src[40:60, 150:170]).mean() > 20
    from pipelines.pngmeta import parse_parameters

    params = parse_parameters(pipe.infotexts(res)[0])
    assert (params["Mask blur"], params["Masked content"], params["Inpaint area"], params["Masked area padding"],
            params["Size"]) == ("2", "original", "Only masked", "8", "64x64")


def test_crop_region_grows_the_box_by_the_padding_then_to_the_aspect_ratio():
    mask = Image.new("L", (256, 128), 0)
    mask.paste(255, (100, 50, 120, 60))  # 20 x 10 px
    assert crop_region(mask, 5, 64, 64) == (95, 40, 125, 70)  # 30 x 20 grown to 30 x 30, centred
    assert crop_region(mask, 0, 128, 64) == (100, 50, 120, 60)  # already 2:1
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 4, 60))  # tall, at the edge: widened inside the image
    assert crop_region(mask, 2, 64, 64) == (0, 0, 62, 62)
    assert crop_region(Image.new("L", (64, 64), 0), 8, 64, 64) is None


def test_fill_paints_the_masked_region_from_its_surroundings_and_keeps_the_rest():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, :32] = (200, 30, 30)
    a[:, 32:] = (30, 30, 200)
    holed = a.copy()
    holed[20:44, 4:20] = (0, 255, 0)  # garbage inside the red half
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 4:20] = 255
    filled = np.asarray(fill_masked(Image.fromarray(holed), Image.fromarray(mask))).astype(int)
    assert np.array_equal(filled[mask == 0], holed[mask == 0].astype(int))
    inside = filled[mask == 255]
    red, blue = np.abs(inside - (200, 30, 30)).sum(1), np.abs(inside - (30, 30, 200)).sum(1)
    assert (red < blue).all() and inside[:, 1].max() < 60  # red, from around it; the green gone


def test_latent_mask_is_the_mask_rounded_at_the_latents_size():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    m = latent_mask(mask, 8, 8)[0, 0].numpy()
    expect = np.zeros((8, 8))
    expect[2:6, 2:6] = 1
    assert np.array_equal(m, expect)


def test_bad_inpaint_options_are_named(pipe):
    from pipelines.request import Request, RequestError

    image, mask = _image(), Image.new("L", (64, 64), 255)
    for kwargs, said in (({"inpaint_fill": "noise"}, "inpaint_fill: must be one of fill, original"),
                         ({"mask_blur": -1}, "mask_blur: must be between 0 and 64"),
                         ({"only_masked_padding": -2}, "only_masked_padding: must be between 0 and 4096"),
                         ({"width": 128}, "a working size applies with only_masked"),
                         ({"mask_invert": 1}, "mask_invert: must be true or false")):
        with pytest.raises(RequestError, match=said):
            Request(PROMPT, "inpaint", image=image, mask=mask, **kwargs).check()
    with pytest.raises(RequestError, match="applies to inpainting"):
        Request(PROMPT, "img2img", image=image, mask_blur=8).check()
