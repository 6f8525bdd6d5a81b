"""Our text-to-image against diffusers' StableDiffusionPipeline on the same weights, prompt and seeds."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from ldm.samplers import diffusers_scheduler
from pipelines.pipeline import Pipeline

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


@pytest.fixture(scope="module")
def pipes(sd1_dir, sd2_dir):
    out = {}
    for kind, path in (("sd1", sd1_dir), ("sd2", sd2_dir)):
        ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        out[kind] = (ref, Pipeline.from_pretrained(path))
    return out


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_text_to_image_matches_diffusers(pipes, kind, sampler, rescale):
    ref, ours = pipes[kind]
    assert ours.model.schedule.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    gens = [torch.Generator().manual_seed(11 + i) for i in range(2)]
    expect = ref("a large red circle on a blue background", negative_prompt="a small square", num_inference_steps=8,
                 guidance_scale=6.0, guidance_rescale=rescale, generator=gens, num_images_per_prompt=2,
                 output_type="np").images
    got = ours.text_to_image("a large red circle on a blue background", negative_prompt="a small square", steps=8,
                             guidance_scale=6.0, guidance_rescale=rescale, seed=11, batch_size=2, sampler=sampler)
    got = got.pixels.permute(0, 2, 3, 1).numpy()
    assert expect.std() > 0.05  # the images are not flat, so agreement means something
    assert np.abs(got - expect).max() < 1e-3


@pytest.mark.parametrize("kind", ["sd1", "inpaint"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_matches_diffusers(sd1_dir, inpaint_dir, kind, strength, monkeypatch):
    """An ordinary checkpoint (the kept region blended back at every step) and a 9-channel one, against
    diffusers' StableDiffusionInpaintPipeline with the original laid back over the result by diffusers'
    own apply_overlay (as A1111 does; ours at mask_blur 0); a mask on the 8-pixel latent cells. Its VAE
    encodes to the posterior mean, as ours does for editing (diffusers would sample)."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)

    path = sd1_dir if kind == "sd1" else inpaint_dir
    ours = Pipeline.from_pretrained(path)
    ref = StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 16:56] = 255
    expect = ref("a red circle", image=image, mask_image=Image.fromarray(mask), strength=strength,
                 negative_prompt="a square", num_inference_steps=8, guidance_scale=6.0, height=64, width=64,
                 generator=[torch.Generator().manual_seed(3)], output_type="pil").images[0]
    expect = np.asarray(ref.image_processor.apply_overlay(Image.fromarray(mask), image, expect), np.float32) / 255
    got = ours.inpaint("a red circle", image, Image.fromarray(mask), strength=strength, negative_prompt="a square",
                       steps=8, guidance_scale=6.0, seed=3, mask_blur=0).pixels[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expect).max() <= 2 / 255
    assert np.array_equal(np.round(got * 255)[mask == 0], np.asarray(image)[mask == 0])  # the input's, exactly


@pytest.mark.parametrize("kind,sampler,schedule", [
    ("sd1", "heun", "default"), ("sd1", "dpm2", "default"), ("sd1", "lms", "default"), ("sd1", "unipc", "default"),
    ("sd1", "dpmpp-2m-sde", "default"), ("sd1", "lcm", "default"), ("sd2", "heun", "default"),
    ("sd2", "unipc", "default"), ("sd1", "euler", "karras"), ("sd1", "dpmpp-2m", "karras"),
    ("sd1", "dpm2", "karras"), ("sd1", "lms", "exponential"), ("sd1", "dpmpp-2m", "exponential"),
    ("sd1", "euler", "sgm-uniform"), ("sd2", "dpmpp-2m-sde", "karras"), ("sd1", "unipc", "sgm-uniform"),
    ("sd1", "plms", "default"),  # (v-prediction: diffusers' PNDM combines v outputs, A1111's PLMS noise estimates)
])
def test_samplers_and_schedules_match_diffusers(pipes, kind, sampler, schedule):
    """Every sampler and schedule against diffusers' StableDiffusionPipeline with the matching scheduler,
    on the same weights, prompts and seeds (the stochastic ones draw the same noise): <= 2/255."""
    ref, ours = pipes[kind]
    config = ref.scheduler.config
    try:
        ref.scheduler = diffusers_scheduler(sampler, schedule, config)
        gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
        expect = ref("a red circle", negative_prompt="a square", num_inference_steps=6, guidance_scale=5.0,
                     generator=gens, num_images_per_prompt=2, output_type="np").images
    finally:
        ref.scheduler = SCHEDULERS["ddim"].from_config(config)
    got = ours.text_to_image("a red circle", negative_prompt="a square", steps=6, guidance_scale=5.0, seed=5,
                             batch_size=2, sampler=sampler, schedule=schedule).pixels.permute(0, 2, 3, 1).numpy()
    assert expect.std() > 0.05
    assert np.abs(got - expect).max() <= 2 / 255
