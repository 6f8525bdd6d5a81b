"""Editing: prompt-to-prompt attention control, null-text / negative-prompt inversion, CLIP guidance.

Truths used: plain sampling of the source and of the target (PyTorch's fused attention, untouched by
the control), closed-form token alignments, reconstruction error against the image inverted, the CLIP
loss itself, and a second run from the cache."""

import json

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from ldm.attention_control import EditError, align_prompts, parse_reweight, prompt_tokens
from ldm.clip_guidance import ClipGuide, build_open_clip, clip_guided, spherical_distance
from ldm.models import ModelError
from pipelines.edit import Edit, edit
from pipelines.pipeline import Pipeline
from pipelines.request import Request, RequestError

SRC, TGT = "a red circle on a blue background", "a red square on a blue background"
FAST = dict(steps=6, guidance=4.0, seed=5)


@pytest.fixture(scope="module")
def tok(sd1_dir):
    return CLIPTokenizer.from_pretrained(sd1_dir / "tokenizer")


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    return Pipeline.from_pretrained(sdxl_dir)


# --- token alignment ---------------------------------------------------------------------------------

def test_swap_alignment_maps_word_to_word_and_shifts_the_end(tok):
    s, t = prompt_tokens(tok, "a red circle"), prompt_tokens(tok, "a red xylophone")  # xylophone: 3 tokens
    mapper, has, kind = align_prompts(s, t)
    assert kind == "swap"
    assert [w for w, _, _ in t.words] == ["a", "red", "xylophone"] and t.positions("xylophone") == [3, 4, 5]
    assert mapper[0, 0] == 1 and mapper[1, 1] == 1 and mapper[2, 2] == 1
    assert torch.equal(mapper[3, 3:6], torch.ones(3))  # circle's one map to each of xylophone's three tokens
    assert mapper[4, 6] == 1 and mapper[5, 7] == 1  # end token and padding shifted by the two extra tokens
    assert bool(has.all()) and torch.allclose(mapper.sum(0), torch.ones(77))
    # the other way: three tokens swapped for one -> their mean
    mapper, _, _ = align_prompts(t, s)
    assert torch.allclose(mapper[3:6, 3], torch.full((3,), 1 / 3))


def test_refine_alignment_keeps_new_words_own_maps(tok):
    s, t = prompt_tokens(tok, "a red circle"), prompt_tokens(tok, "a big red circle")
    mapper, has, kind = align_prompts(s, t)
    assert kind == "refine"
    assert has.tolist()[:6] == [True, True, False, True, True, True]  # "big" keeps its own map
    assert mapper[2, 3] == 1 and mapper[3, 4] == 1 and mapper[4, 5] == 1  # red, circle, end token follow


def test_prompt_errors(tok):
    with pytest.raises(EditError, match="must fit one chunk"):
        prompt_tokens(tok, " ".join(["word"] * 80))
    with pytest.raises(EditError, match="BREAK"):
        prompt_tokens(tok, "a BREAK b")
    assert parse_reweight(["square=2", "red=-1.5"]) == {"square": 2.0, "red": -1.5}
    with pytest.raises(EditError, match="WORD=FACTOR"):
        parse_reweight(["square"])


# --- attention control against plain sampling --------------------------------------------------------

def _plain(pipe, prompt, **kw):
    return pipe.generate(Request(prompt, **{**FAST, **kw})).pixels


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_replacing_every_map_of_the_same_prompt_equals_plain_sampling(arch, sd1_pipe, sdxl_pipe):
    """Source = target, every cross and self map replaced at every step: the explicit-probability path
    must give what PyTorch's fused attention gives (and it must have run)."""
    pipe = sd1_pipe if arch == "sd1" else sdxl_pipe
    res = edit(pipe, Edit(SRC, SRC, cross_replace=1.0, self_replace=1.0), Request(**FAST))
    plain = _plain(pipe, SRC)
    assert (res.source.pixels - plain).abs().max() < 1e-4
    assert (res.target.pixels - plain).abs().max() < 1e-4


def test_no_replacement_equals_plain_sampling_of_the_target(sd1_pipe):
    res = edit(sd1_pipe, Edit(SRC, TGT, cross_replace=0.0, self_replace=0.0), Request(**FAST))
    assert (res.source.pixels - _plain(sd1_pipe, SRC)).abs().max() < 1e-4
    assert (res.target.pixels - _plain(sd1_pipe, TGT)).abs().max() < 1e-4


def test_replacement_changes_the_target_and_leaves_the_source(sd1_pipe):
    plain_src, plain_tgt = _plain(sd1_pipe, SRC), _plain(sd1_pipe, TGT)
    res = edit(sd1_pipe, Edit(SRC, TGT, cross_replace=1.0, self_replace=1.0), Request(**FAST))
    assert (res.source.pixels - plain_src).abs().max() < 1e-4
    assert (res.target.pixels - plain_tgt).abs().max() > 1e-4  # the maps changed
    assert (res.target.pixels - plain_src).abs().max() > 1e-4  # the values are the target's


def test_processors_come_back_and_only_edited_calls_are_explicit(sd1_pipe):
    from ldm.attention_control import AttentionEdit, control_attention

    unet = sd1_pipe.model.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    ctl = AttentionEdit(clock={"step": 10}, n_steps=10, mappers=torch.eye(77)[None], has_source=torch.ones(1, 77,
                                                                                                          dtype=bool))
    with control_attention(unet, ctl):
        assert all(type(p).__name__ == "ControlledAttention" for k, p in unet.attn_processors.items())
        _plain(sd1_pipe, SRC, batch_size=2)  # past every edited step: all fused
    assert ctl.explicit_calls == 0
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_reweight(sd1_pipe):
    base = edit(sd1_pipe, Edit(SRC, TGT), Request(**FAST)).target.pixels
    same = edit(sd1_pipe, Edit(SRC, TGT, reweight={"square": 1.0}), Request(**FAST)).target.pixels
    more = edit(sd1_pipe, Edit(SRC, TGT, reweight={"square": 4.0}), Request(**FAST)).target.pixels
    neg = edit(sd1_pipe, Edit(SRC, TGT, reweight={"square": -2.0}), Request(**FAST)).target.pixels
    assert torch.equal(base, same)
    assert (more - base).abs().max() > 1e-3 and (neg - base).abs().max() > 1e-3
    with pytest.raises(EditError, match="'squar' is not a word"):
        edit(sd1_pipe, Edit(SRC, TGT, reweight={"squar": 2.0}), Request(**FAST))
    with pytest.raises(EditError, match="cross-replace"):
        edit(sd1_pipe, Edit(SRC, TGT, reweight={"square": 2.0}, cross_replace=0.0), Request(**FAST))


def test_local_blend_keeps_the_source_outside_the_mask(sd1_pipe, monkeypatch):
    """With a mask (here fixed: a random model's word maps are flat), the target's latents outside it
    are the source's, inside they are the edit's."""
    from ldm.attention_control import AttentionEdit

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    calls = []

    def fixed(self):
        calls.append(self.step)
        return mask if self.step >= self.blend_steps else None

    monkeypatch.setattr(AttentionEdit, "blend_mask", fixed)
    res = edit(sd1_pipe, Edit(SRC, TGT, blend_words=["circle", "square"]), Request(**{**FAST, "steps": 10}))
    outside = (1 - mask).bool().expand_as(res.target.latents)
    assert torch.allclose(res.target.latents[outside], res.source.latents[outside], atol=1e-5)
    assert (res.target.latents - res.source.latents)[~outside].abs().max() > 1e-3  # inside, the edit
    assert min(calls) == 0 and max(calls) == 10  # asked at every step, and once more at the end
    with pytest.raises(EditError, match="'dog' is in neither"):
        edit(sd1_pipe, Edit(SRC, TGT, blend_words=["dog"]), Request(**FAST))


def test_blend_mask_from_word_maps():
    """The mask: the summed maps dilated by h/16 latent pixels, scaled to [0, 1], over 0.3, source OR target."""
    from ldm.attention_control import AttentionEdit

    ctl = AttentionEdit(clock={"step": 5}, n_steps=10, mappers=torch.eye(4)[None], has_source=torch.ones(1, 4,
                        dtype=bool), blend_source=torch.ones(1, 4), blend_target=torch.ones(1, 4), latent_size=(16, 16))
    maps = torch.full((2, 1, 16, 16), 0.5)  # a floor, as a small model's maps have
    maps[0, 0, 1, 1] = 1.5   # the source's word at (1, 1)
    maps[1, 0, 14, 14] = 2.5  # the target's word at (14, 14)
    maps[1, 0, 0, 15] = 0.9  # a weak response (0.2 of the target's range): under the threshold
    ctl.maps = maps
    want = torch.zeros(16, 16)  # dilated by 16 / 16 = 1 latent pixel
    want[0:3, 0:3] = 1
    want[13:16, 13:16] = 1
    assert torch.equal(ctl.blend_mask()[0, 0], want)
    ctl.latent_size = (8, 8)  # 8 / 16 rounds to no dilation
    ctl.maps = maps[:, :, :8, :8].clone()
    ctl.maps[1, 0, 6, 6] = 2.5
    want = torch.zeros(8, 8)
    want[1, 1] = want[6, 6] = 1
    assert torch.equal(ctl.blend_mask()[0, 0], want)
    ctl.clock["step"] = 1  # before the paper's start (0.2 of the steps): no blending yet
    assert ctl.blend_mask() is None


def test_batched_pairs_equal_lone_pairs(sd1_pipe):
    pairs = Edit([SRC, "a green star"], [TGT, "a green square"])
    both = edit(sd1_pipe, pairs, Request(**{**FAST, "seed": 7}))
    lone = edit(sd1_pipe, Edit("a green star", "a green square"), Request(**{**FAST, "seed": 8}))
    assert (both.target.pixels[1] - lone.target.pixels[0]).abs().max() < 1e-4


# --- real images: inversion --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_image(sd1_pipe):
    """A real image for the tiny model: one of its own generations (so its latents are in reach)."""
    return sd1_pipe.text_to_image(SRC, steps=10, guidance_scale=4.0, seed=1).images[0]


def _mse(a, b):
    return float(((a - b) ** 2).mean())


def test_null_text_inversion_reconstructs_better_than_plain_inversion(sd1_pipe, real_image, tmp_path):
    z = sd1_pipe.encode_image(real_image)
    req = Request(steps=10, guidance=4.0)
    plain = edit(sd1_pipe, Edit(SRC, SRC, images=[real_image], inversion="ddim"), req)
    nti = edit(sd1_pipe, Edit(SRC, SRC, images=[real_image], inversion="null-text", inner_steps=50), req)
    npi = edit(sd1_pipe, Edit(SRC, SRC, images=[real_image], inversion="npi"), req)
    e_plain, e_nti, e_npi = (_mse(r.source.latents, z) for r in (plain, nti, npi))
    assert e_nti < 0.5 * e_plain and e_npi < e_plain, (e_plain, e_nti, e_npi)


def test_direct_inversion_puts_the_source_back_on_the_image_and_caches_the_trajectory(sd1_pipe, real_image,
                                                                                     tmp_path):
    """Direct inversion (Ju et al. 2023): the source branch lands on the inversion's levels step by step,
    so the source comes back as the image's own latents (to float rounding; plain inversion at the same
    guidance drifts), the target is sampled beside it; the trajectory is cached and read back."""
    z = sd1_pipe.encode_image(real_image)
    req = Request(steps=10, guidance=4.0)
    ed = Edit(SRC, TGT, images=[real_image], inversion="direct", cache_dir=tmp_path)
    first = edit(sd1_pipe, ed, req)
    plain = edit(sd1_pipe, Edit(SRC, TGT, images=[real_image], inversion="ddim"), req)
    assert _mse(first.source.latents, z) < 1e-9 < 1e-4 < _mse(plain.source.latents, z)
    assert _mse(first.target.latents, z) > 1e-4  # the target is its own sample, not the image
    again = edit(sd1_pipe, ed, req)
    assert (first.inverted, again.inverted, again.cached) == (1, 0, 1)
    assert torch.allclose(again.target.latents, first.target.latents, atol=1e-3)  # as for null-text, above
    (cached,) = tmp_path.glob("inversion-*.safetensors")
    from safetensors import safe_open
    with safe_open(str(cached), "pt") as f:
        assert f.get_tensor("trajectory").shape == (11, 1, *z.shape[1:])  # 10 steps: 11 levels
    # a batch of the cached image and a new one: one inverted, one read, both sources exact
    other = sd1_pipe.text_to_image(SRC, steps=10, guidance_scale=4.0, seed=2).images[0]
    both = edit(sd1_pipe, Edit([SRC, SRC], [TGT, TGT], images=[other, real_image], inversion="direct",
                               cache_dir=tmp_path), req)
    assert (both.inverted, both.cached) == (1, 1)
    assert _mse(both.source.latents, torch.cat([sd1_pipe.encode_image(other), z])) < 1e-9


def test_a_second_edit_of_the_same_image_reads_the_cached_inversion(sd1_pipe, real_image, tmp_path):
    """The same noise and embeddings, no inversion; another learning rate inverts again."""
    req, cheap = Request(steps=10, guidance=4.0), dict(inversion="null-text", cache_dir=tmp_path, inner_steps=4)
    first = edit(sd1_pipe, Edit(SRC, SRC, images=[real_image], **cheap), req)
    again = edit(sd1_pipe, Edit(SRC, TGT, images=[real_image], **cheap), req)
    assert (again.inverted, again.cached) == (0, 1) and first.inverted == 1
    gap = float((again.source.latents - first.source.latents).abs().max())
    assert gap < 1e-3, gap  # the same inversion; only the batch beside the source differs
    assert len(list(tmp_path.glob("inversion-*.safetensors"))) == 1
    # the learning rate is a setting of the inversion: another one inverts again (and is passed on)
    other = edit(sd1_pipe, Edit(SRC, SRC, images=[real_image], inner_lr=0.03, **cheap), req)
    assert (other.inverted, other.cached) == (1, 0) and len(list(tmp_path.glob("inversion-*.safetensors"))) == 2
    assert not torch.equal(other.source.latents, first.source.latents)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_null_text_inversion_on_v_prediction_and_sdxl(arch, sd2_dir, sdxl_pipe):
    """The same ordering on SD 2.x (v-prediction) and SDXL (two encoders, pooled text, sizes), direct
    inversion exact on both; 20 inner steps (null-text / plain error 0.28 on SD 2.x, 0.40 on SDXL; 0.15 and 0.22 at 50)."""
    pipe = sdxl_pipe if arch == "sdxl" else Pipeline.from_pretrained(sd2_dir)
    image = pipe.text_to_image(SRC, steps=10, guidance_scale=4.0, seed=1).images[0]
    z = pipe.encode_image(image)
    req = Request(steps=10, guidance=4.0)
    e = {inv: _mse(edit(pipe, Edit(SRC, SRC, images=[image], inversion=inv, inner_steps=20), req).source.latents, z)
         for inv in ("ddim", "null-text", "npi", "direct")}
    assert e["null-text"] < 0.5 * e["ddim"] and e["npi"] < e["ddim"] and e["direct"] < 1e-9, e


def test_real_image_errors(sd1_pipe, real_image):
    with pytest.raises(EditError, match="60x64; both sides must be multiples of 8"):
        edit(sd1_pipe, Edit(SRC, TGT, images=[real_image.crop((0, 0, 60, 64))]))
    with pytest.raises(RequestError, match="ddim"):
        edit(sd1_pipe, Edit(SRC, TGT, images=[real_image]), Request(sampler="euler", steps=4))
    with pytest.raises(RequestError, match="width: applies without an image"):
        edit(sd1_pipe, Edit(SRC, TGT, images=[real_image]), Request(width=64))
    with pytest.raises(RequestError, match="inversion: must be one of") as bad:
        edit(sd1_pipe, Edit(SRC, TGT, images=[real_image], inversion="nti"))
    assert bad.value.problems[0][0] == "inversion" and bad.value.for_cli().startswith("--inversion must be")
    for lr in (0, -0.01, "0.01"):
        with pytest.raises(RequestError, match="inner_lr: must be a number"):
            edit(sd1_pipe, Edit(SRC, TGT, images=[real_image], inner_lr=lr))


# --- CLIP guidance ----------------------------------------------------------------------------------

CLIP_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "width": 8, "layers": [1, 1, 1, 1]},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """A whole open_clip model as the hub stores one (config with model_cfg, open_clip_model.safetensors)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("open_clip")
    torch.manual_seed(0)
    net = build_open_clip(CLIP_CFG)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG, "preprocess_cfg": {}}))
    return d


def test_clip_guidance_at_scale_zero_is_plain_and_otherwise_lowers_the_loss(sd1_pipe, open_clip_dir):
    plain = _plain(sd1_pipe, SRC)
    zero = _plain(sd1_pipe, SRC, clip_guidance_scale=0.0, clip_model=open_clip_dir)
    assert torch.equal(plain, zero)
    guided = _plain(sd1_pipe, SRC, clip_guidance_scale=2000.0, clip_model=open_clip_dir)
    guide = sd1_pipe.clip_tower(open_clip_dir).guide([SRC], cutouts=8)
    gens = [torch.Generator().manual_seed(0)]
    loss = lambda px: float(guide.loss(px * 2 - 1, gens))  # noqa: E731
    assert (guided - plain).abs().max() > 1e-3
    assert loss(guided) < loss(plain)


def test_clip_guided_step_follows_the_loss_gradient():
    """One guided call moves x0 by -(1 - ab)/sqrt(ab) * dLoss/dx; checked against a finite difference."""
    torch.manual_seed(0)
    net = build_open_clip(CLIP_CFG).eval()
    guide = ClipGuide(net.visual, torch.randn(1, 16), 32, cutouts=1, cut_min=1.0)
    decode = lambda z: torch.nn.functional.interpolate(z[:, :3], size=32)  # noqa: E731
    denoise = lambda x, t, ab: x * 0.5  # noqa: E731
    x = torch.randn(1, 4, 8, 8)
    ab = 0.5
    out = clip_guided(denoise, decode, guide, 10.0)(x, 500, ab)
    step = (denoise(x, 500, ab) - out)  # = (1 - ab)/sqrt(ab) * grad
    d = torch.randn_like(x) * 1e-3
    f = lambda y: 10.0 * float(guide.loss(decode(denoise(y, 500, ab))).detach())  # noqa: E731
    fd = (f(x + d) - f(x - d)) / 2
    assert abs(float((step / ((1 - ab) / ab ** 0.5) * d).sum()) - fd) < 1e-3 * max(1.0, abs(fd)) + 1e-6
    assert clip_guided(denoise, decode, guide, 0.0) is denoise
    assert float(spherical_distance(torch.tensor([1.0, 0]), torch.tensor([0.0, 1]))) == pytest.approx(
        2 * (torch.pi / 4) ** 2, rel=1e-5)


def test_clip_model_width_mismatch_is_an_error(sd1_pipe, tmp_path):
    from safetensors.torch import save_file

    cfg = {**CLIP_CFG, "text_cfg": {**CLIP_CFG["text_cfg"], "width": 24}}  # the tiny text encoder is 32 wide
    net = build_open_clip(cfg)
    sd = {k: v.contiguous() for k, v in net.state_dict().items() if k.startswith("visual.") or k == "text_projection"}
    save_file(sd, str(tmp_path / "visual.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="takes width 24, but this model's text encoder gives 32"):
        _plain(sd1_pipe, SRC, clip_guidance_scale=10.0, clip_model=tmp_path)
    with pytest.raises(ModelError, match="only the embedded model has a default"):
        _plain(sd1_pipe, SRC, clip_guidance_scale=10.0)
    with pytest.raises(RequestError, match="clip_guidance_scale"):
        _plain(sd1_pipe, SRC, clip_guidance_scale=-1.0)


# --- the command line --------------------------------------------------------------------------------

def test_ldm_edit_command(sd1_dir, tmp_path, real_image):
    from pipelines.cli import main
    from pipelines.pngmeta import read_parameters

    out = tmp_path / "t.png"
    common = ["--model", str(sd1_dir), "--steps", "4", "--guidance", "4", "--quiet"]
    assert main(["edit", "--source-prompt", SRC, "--target-prompt", TGT, "--seed", "3", "--output", str(out),
                 "--save-source", str(tmp_path / "s.png"), *common]) == 0
    assert Image.open(out).size == (64, 64) and (tmp_path / "s.png").is_file()
    assert "Edit source: a red circle on a blue background" in read_parameters(out)
    real_image.save(tmp_path / "in.png")
    assert main(["edit", "--image", str(tmp_path / "in.png"), "--source-prompt", SRC, "--target-prompt", TGT,
                 "--inner-steps", "2", "--output", str(tmp_path / "e.png"), *common]) == 0
    assert len(list(tmp_path.glob("inversion-*.safetensors"))) == 1
    assert main(["edit", "--source-prompt", SRC, "--reweight", "dog=2", "--output", str(tmp_path / "x.png"),
                 *common]) == 2
    assert not (tmp_path / "x.png").exists()
