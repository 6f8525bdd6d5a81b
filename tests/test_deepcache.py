"""DeepCache (ldm/deepcache.py): the cache is exact where it must be, the U-Net is left untouched, and
every generation path runs with it."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.deepcache import DeepCache
from ldm.denoiser import unet_net


def _context(model, n):
    from ldm.text import size_ids, text_context
    ctx = text_context(model, ["a red circle"] * n, sizes=[size_ids(model, 64, 64)] * n)
    if "time_ids" not in ctx:
        ctx.pop("time_ids", None)
    return ctx


@pytest.mark.parametrize("kind,depth", [("sd1", 1), ("sdxl", 1), ("sd1", 0), ("sdxl", 0)])
def test_a_partial_evaluation_on_the_full_ones_inputs_is_the_full_output(kind, depth, sd1_dir, sdxl_dir):
    """Between full evaluations only the shallow branch runs on the cached deep features: on the same
    input as the last full evaluation it must give exactly the full output; on another input it must
    differ from the full U-Net there (the shallow branch does run) but only in what the deep features
    would have changed. Afterwards the U-Net is the class's own again."""
    from pipelines.pipeline import Pipeline
    m = Pipeline.from_pretrained(sd1_dir if kind == "sd1" else sdxl_dir).model
    net = unet_net(m.unet)
    ctx = _context(m, 2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cache = DeepCache(m.unet, interval=3, depth=depth)
    cached = cache.wrap(net)
    with torch.no_grad():
        full = cached(x, 500.0, ctx)            # call 0: full
        again = cached(x, 500.0, ctx)           # call 1: partial, same input
        other = cached(y, 400.0, ctx)           # call 2: partial, new input
        plain_other = net(y, 400.0, ctx)
        third = cached(y, 400.0, ctx)           # call 3: full again
    assert torch.equal(full, again)
    assert not torch.equal(other, full) and not torch.equal(other, plain_other)
    assert torch.equal(third, plain_other)
    assert (cache.calls, cache.full_calls) == (4, 2)
    assert all("forward" not in vars(b) for b in cache.deep)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_partial_evaluation_runs_only_the_shallow_branch(kind, sd1_dir, sdxl_dir):
    """Which layers run between full evaluations: at depth 1 the outermost level's (the first down block
    and the last up block), at depth 0 only the last up block's last layer; on a full evaluation all.
    A layer computes when its first convolution runs (a cached module is still called, and returns
    its cached output)."""
    from diffusers.models.resnet import ResnetBlock2D

    from pipelines.pipeline import Pipeline
    m = Pipeline.from_pretrained(sd1_dir if kind == "sd1" else sdxl_dir).model
    unet, net, ctx = m.unet, unet_net(m.unet), _context(m, 1)
    resnets = [mod for mod in unet.modules() if isinstance(mod, ResnetBlock2D)]
    ran = []
    hooks = [r.conv1.register_forward_hook(lambda mod, a, o, r=r: ran.append(r)) for r in resnets]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outer = [*unet.down_blocks[0].resnets, *unet.up_blocks[-1].resnets]
    try:
        for depth, expected in ((1, outer), (0, [unet.up_blocks[-1].resnets[-1]])):
            cached = DeepCache(unet, interval=2, depth=depth).wrap(net)
            with torch.no_grad():
                ran.clear()
                cached(x, 500.0, ctx)
                assert len(ran) == len(resnets)
                ran.clear()
                cached(x, 400.0, ctx)
            assert sorted(map(id, ran)) == sorted(map(id, expected)), depth
    finally:
        for h in hooks:
            h.remove()


def test_bad_depth_is_refused_with_the_levels_named(sd1_pipe):
    levels = len(sd1_pipe.model.unet.config.block_out_channels)
    with pytest.raises(ValueError, match=f"cache_depth: must be between 0 and {levels - 1}"):
        sd1_pipe.text_to_image("x", steps=2, cache_interval=2, cache_depth=levels)
    with pytest.raises(ValueError, match="cache_depth: must be an integer >= 0"):
        sd1_pipe.text_to_image("x", steps=2, cache_interval=2, cache_depth=-1)
    with pytest.raises(ValueError, match="cache_interval: must be an integer >= 1"):
        sd1_pipe.text_to_image("x", steps=2, cache_interval=0)


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp-2m-sde", "unipc"])
def test_every_sampler_runs_with_the_cache(sd1_pipe, sampler):
    kw = dict(steps=6, seed=1, sampler=sampler, negative_prompt="a square")
    plain = sd1_pipe.text_to_image("a red circle", **kw)
    cached = sd1_pipe.text_to_image("a red circle", cache_interval=2, **kw)
    assert torch.isfinite(cached.pixels).all()
    assert 0 < float((cached.pixels - plain.pixels).abs().max()) < 0.5
    assert "Cache interval: 2" in sd1_pipe.infotexts(cached)[0]


def test_image_to_image_inpainting_and_sdxl_run_with_the_cache(sd1_pipe, inpaint_dir, sdxl_dir):
    from pipelines.pipeline import Pipeline
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inp, xl = Pipeline.from_pretrained(inpaint_dir), Pipeline.from_pretrained(sdxl_dir)
    for depth in (1, 0):
        out = sd1_pipe.image_to_image("a star", img, steps=6, seed=1, cache_interval=3, cache_depth=depth)
        assert out.pixels.shape == (1, 3, 64, 64)
        out = inp.inpaint("a star", img, mask, steps=6, seed=1, cache_interval=2, cache_depth=depth)
        assert torch.isfinite(out.pixels).all()
        assert torch.isfinite(xl.text_to_image("a star", steps=4, seed=1, cache_interval=2,
                                               cache_depth=depth).pixels).all()


@pytest.mark.parametrize("depth", [1, 0])
def test_a_controlnet_feeds_the_shallow_branch_between_full_evaluations(depth, sd1_dir, tmp_path):
    """With a ControlNet the residuals are computed at every evaluation and added where the U-Net reads
    them: a partial evaluation on the full one's input and unit is exactly the full output, and with the
    unit's weight changed it changes (the shallow skip connections take the fresh residuals), though the
    deep features are the cached ones."""
    from test_control import random_controlnet

    from ldm.control import Unit, controlled
    from pipelines.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(sd1_dir)
    m = pipe.model
    net = pipe.load_controlnet(random_controlnet(sd1_dir, tmp_path / "cn", 0))
    ctx = _context(m, 2)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    unit = Unit(net, image, weight=1.0)
    cache = DeepCache(m.unet, interval=3, depth=depth)
    f = controlled(cache.wrap(unet_net(m.unet)), [unit], {"step": 0}, 10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = f(x, 500.0, ctx)
        again = f(x, 500.0, ctx)
        unit.weight = 0.3
        weaker = f(x, 500.0, ctx)
        plain = controlled(unet_net(m.unet), [unit], {"step": 0}, 10)(x, 500.0, ctx)
    assert torch.equal(full, again)
    assert not torch.equal(weaker, full) and not torch.equal(weaker, plain)
    assert all("forward" not in vars(b) for b in cache.deep)
    res = pipe.text_to_image("a red circle", steps=4, seed=0, cache_interval=2,
                             controls=[{"model": net, "image": Image.new("RGB", (64, 64), "white")}])
    assert torch.isfinite(res.pixels).all()
