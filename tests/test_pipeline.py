"""Pipelines: seeds, image-to-image, inpainting, inversion, and bad input."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ldm.models import ModelError, load_model
from pipelines.pipeline import Pipeline


def test_image_i_of_a_batch_equals_a_lone_image_with_seed_plus_i(sd1_pipe):
    for sampler in ("ddim", "euler-a"):
        batch = sd1_pipe.text_to_image("a red circle", steps=4, seed=40, batch_size=3, sampler=sampler)
        lone = sd1_pipe.text_to_image("a red circle", steps=4, seed=42, sampler=sampler)
        assert batch.seeds == [40, 41, 42]
        # equal up to the float noise of batched kernels (a seeding error would be of order 1)
        torch.testing.assert_close(batch.latents[2:3], lone.latents, rtol=0, atol=1e-4)
        assert not torch.allclose(batch.latents[0], batch.latents[1])


def test_same_seed_same_image_different_seed_different_image(sd1_pipe):
    a = sd1_pipe.text_to_image("a red circle", steps=3, seed=5).pixels
    b = sd1_pipe.text_to_image("a red circle", steps=3, seed=5).pixels
    c = sd1_pipe.text_to_image("a red circle", steps=3, seed=6).pixels
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler-a", "dpmpp-2m"])
def test_every_sampler_generates_finite_images_of_the_asked_size(sd1_pipe, sampler):
    res = sd1_pipe.text_to_image("a star", steps=3, seed=1, sampler=sampler, width=48, height=32)
    assert res.pixels.shape == (1, 3, 32, 48) and torch.isfinite(res.pixels).all()
    assert res.images[0].size == (48, 32)


def test_img2img_with_strength_near_zero_returns_the_input(sd1_pipe):
    img = sd1_pipe.text_to_image("a red circle", steps=3, seed=0).images[0]
    z0 = sd1_pipe.encode_image(img)
    res = sd1_pipe.image_to_image("a blue square", img, strength=0.01, steps=30, seed=3)
    torch.testing.assert_close(res.latents, z0)  # no step runs at this strength
    # a small strength moves the image a little, a large one a lot
    small = sd1_pipe.image_to_image("a blue square", img, strength=0.1, steps=30, seed=3).latents
    large = sd1_pipe.image_to_image("a blue square", img, strength=1.0, steps=30, seed=3).latents
    assert (small - z0).abs().mean() < (large - z0).abs().mean() / 3


class GaussianEpsUNet(torch.nn.Module):
    """A stand-in U-Net predicting the exact noise for latents ~ N(0, s^2), reading its level from the
    timestep it is given; a random U-Net's ODE is too stiff for inversion to be checked on it."""

    def __init__(self, alphas_cumprod, s=0.5):
        super().__init__()
        self.ab, self.s = alphas_cumprod, s
        self.config = SimpleNamespace(in_channels=4, out_channels=4, sample_size=8)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states):
        ab = float(self.ab[int(round(float(timestep)))])
        a, b2 = math.sqrt(ab), 1 - ab
        x0 = a * self.s**2 / (a * a * self.s**2 + b2) * sample
        return SimpleNamespace(sample=(sample - a * x0) / math.sqrt(b2))


def test_inversion_then_ddim_sampling_reconstructs_the_input_latent(sd1_pipe):
    model = dataclasses.replace(sd1_pipe.model)
    model.unet = GaussianEpsUNet(model.schedule.alphas_cumprod)
    pipe = Pipeline(model)
    img = sd1_pipe.text_to_image("a red circle", steps=3, seed=0).images[0]
    z0 = pipe.encode_image(img)
    noise = pipe.invert(img, prompt="a red circle", steps=500)
    assert noise.shape == z0.shape
    back = pipe.text_to_image("a red circle", steps=500, guidance_scale=1.0, latents=noise, sampler="ddim").latents
    # first-order error both ways (measured 2.4 % of the largest latent at 200 steps)
    assert (back - z0).abs().max() < 0.015 * z0.abs().max()
    # the noise is not the input: inversion really climbed the levels
    assert (noise - z0).abs().max() > 0.5 * z0.abs().max()


def _square_mask(size=64, lo=16, hi=48):
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (lo, lo, hi, hi))
    return mask


def test_inpaint_on_an_ordinary_checkpoint_keeps_the_unmasked_region(sd1_pipe):
    img = sd1_pipe.text_to_image("a red circle", steps=3, seed=0).images[0]
    z0 = sd1_pipe.encode_image(img)
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:6, 2:6] = 0
    res = sd1_pipe.inpaint("a blue square", img, _square_mask(), steps=6, seed=1, sampler="euler")
    torch.testing.assert_close(res.latents * keep, z0 * keep, rtol=0, atol=1e-6)  # euler lands on sigma = 0
    assert ((res.latents - z0) * (1 - keep)).abs().max() > 0.1


def test_inpaint_on_a_nine_channel_unet_sees_the_masked_image(inpaint_dir):
    pipe = Pipeline.from_pretrained(inpaint_dir)
    assert pipe.model.is_inpainting
    seen = []
    pipe.model.unet.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    a = Image.new("RGB", (64, 64), (200, 30, 30))
    b = Image.new("RGB", (64, 64), (30, 30, 200))
    ra = pipe.inpaint("a star", a, _square_mask(), steps=3, seed=1).latents
    rb = pipe.inpaint("a star", b, _square_mask(), steps=3, seed=1).latents
    assert set(seen) == {9}
    assert (ra - rb).abs().max() > 1e-3  # the kept image reaches the network through its channels
    assert pipe.text_to_image("a star", steps=2, seed=0).pixels.shape == (1, 3, 64, 64)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(width=60), "width: must be a positive multiple of 8"),
    (dict(height=0), "height: must be a positive multiple of 8"),
    (dict(steps=0), "steps: must be an integer >= 1"),
    (dict(guidance_scale=-1.0), "guidance: must be a finite number from 0 to 100"),
    (dict(guidance_scale=float("inf")), "guidance: must be a finite number from 0 to 100"),
    (dict(batch_size=0), "batch_size: must be between 1 and 256, got 0"),
    (dict(batch_size=100_000), "batch_size: must be between 1 and 256, got 100000; for more images run several batches"),
    (dict(sampler="pndm-prk"), "unknown sampler 'pndm-prk'"),
    (dict(sampler="ddim", schedule="karras"), "the karras schedule applies to"),
    (dict(sampler="euler", schedule="cosine"), "unknown schedule 'cosine'"),
    (dict(sampler="euler", eta=0.5), "eta: applies to the ddim, euler-a"),
])
def test_text_to_image_rejects_bad_values(sd1_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sd1_pipe.text_to_image("x", **kwargs)


def test_image_tasks_reject_bad_values(sd1_pipe):
    img = Image.new("RGB", (64, 64))
    for s in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"strength: must be in \(0, 1\]"):
            sd1_pipe.image_to_image("x", img, strength=s)
    with pytest.raises(ValueError, match="mask: is 32x32 but the image is 64x64"):
        sd1_pipe.inpaint("x", img, Image.new("L", (32, 32)))
    with pytest.raises(ValueError, match="image: is 60x64; both sides must be multiples of 8"):
        sd1_pipe.image_to_image("x", Image.new("RGB", (60, 64)))


def test_missing_and_incomplete_model_directories(tmp_path, sd1_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ModelError, match="incomplete: missing vae, text_encoder, tokenizer, scheduler"):
        load_model(tmp_path / "half")


def test_pickle_weights_are_refused_unless_allowed(tmp_path, sd1_dir):
    import shutil

    from safetensors.torch import load_file
    model = tmp_path / "pickled"
    shutil.copytree(sd1_dir, model)
    st = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), model / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(ModelError, match="only pickle weights.*--allow-pickle"):
        load_model(model)
    loaded = load_model(model, allow_pickle=True)
    ref = load_model(sd1_dir)
    for (n, a), (_, b) in zip(loaded.unet.state_dict().items(), ref.unet.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_model_without_weights_is_incomplete(tmp_path, sd1_dir):
    import shutil
    model = tmp_path / "noweights"
    shutil.copytree(sd1_dir, model)
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="vae/ has no weights"):
        load_model(model)


def test_vae_slicing_changes_nothing(sd1_dir):
    whole = Pipeline.from_pretrained(sd1_dir).text_to_image("a", steps=2, seed=0, batch_size=3).pixels
    sliced = Pipeline.from_pretrained(sd1_dir, vae_slice_size=1).text_to_image("a", steps=2, seed=0,
                                                                              batch_size=3).pixels
    torch.testing.assert_close(whole, sliced, rtol=0, atol=1e-5)


def _with_sampling(tmp_path, sd1_dir, text):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sd1_dir, model)
    (model / "sampling.json").write_text(text)
    return model


def test_a_models_sampling_json_sets_the_defaults_and_explicit_values_win(tmp_path, sd1_dir, sd1_pipe):
    model = _with_sampling(tmp_path, sd1_dir, '{"sampler": "euler", "steps": 2, "guidance_scale": 3.0}')
    pipe = Pipeline.from_pretrained(model)
    res = pipe.text_to_image("a star", seed=4)
    assert (res.settings["sampler"], res.settings["steps"], res.settings["guidance"]) == ("euler", 2, 3.0)
    expect = sd1_pipe.text_to_image("a star", seed=4, sampler="euler", steps=2, guidance_scale=3.0)
    assert torch.equal(res.pixels, expect.pixels)
    over = pipe.text_to_image("a star", seed=4, steps=3, guidance_scale=7.5, sampler="ddim")
    assert (over.settings["sampler"], over.settings["steps"], over.settings["guidance"]) == ("ddim", 3, 7.5)
    assert torch.equal(over.pixels, sd1_pipe.text_to_image("a star", seed=4, steps=3).pixels)
    # without the file: ddim, 30 steps, guidance 7.5
    assert sd1_pipe.sampling_settings() == ("ddim", 30, 7.5)


@pytest.mark.parametrize("text, match", [('{"guidance": 5}', "unknown key.*guidance"), ("{5", "not valid JSON")])
def test_a_bad_sampling_json_is_a_clear_error(tmp_path, sd1_dir, text, match):
    with pytest.raises(ModelError, match=match):
        load_model(_with_sampling(tmp_path, sd1_dir, text))
