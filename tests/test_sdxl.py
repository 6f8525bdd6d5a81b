"""SDXL against diffusers' own SDXL pipelines on the same tiny random weights, prompts and seeds."""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

from pipelines.pipeline import Pipeline
from pipelines.request import RequestError

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}
PROMPT, NEGATIVE = "a large red circle on a blue background", "a small square"
TOLERANCE = 2 / 255


def _ref(cls, path, sampler):
    ref = cls.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    return ref


@pytest.fixture(scope="module")
def ours(sdxl_dir):
    return Pipeline.from_pretrained(sdxl_dir)


def test_the_tiny_checkpoint_has_sdxls_layout(ours):
    m = ours.model
    assert m.arch == "sdxl" and m.force_zeros_for_empty_prompt and m.text_encoder_2 is not None
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size + m.text_encoder_2.config.hidden_size
    assert ours.default_size() == (64, 64)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_text_to_image_matches_diffusers(sdxl_dir, ours, sampler, negative):
    """An empty negative prompt is zeros (force_zeros_for_empty_prompt), as diffusers' None."""
    ref = _ref(StableDiffusionXLPipeline, sdxl_dir, sampler)
    gens = [torch.Generator().manual_seed(21 + i) for i in range(2)]
    expect = ref(PROMPT, negative_prompt=negative or None, num_inference_steps=6, guidance_scale=5.0,
                 generator=gens, num_images_per_prompt=2, output_type="np").images
    got = ours.text_to_image(PROMPT, negative_prompt=negative, steps=6, guidance_scale=5.0, seed=21, batch_size=2,
                             sampler=sampler).pixels.permute(0, 2, 3, 1).numpy()
    assert expect.std() > 0.05
    assert np.abs(got - expect).max() <= TOLERANCE


def test_the_second_prompt_goes_to_the_second_encoder(sdxl_dir, ours):
    ref = _ref(StableDiffusionXLPipeline, sdxl_dir, "euler")
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    expect = ref(PROMPT, prompt_2="a yellow star", negative_prompt=NEGATIVE, negative_prompt_2="green",
                 generator=torch.Generator().manual_seed(5), **kw).images
    from pipelines.request import Request

    got = ours.generate(Request(PROMPT, prompt_2="a yellow star", negative=NEGATIVE, negative_2="green", steps=4,
                                guidance=5.0, seed=5, sampler="euler")).pixels.permute(0, 2, 3, 1).numpy()
    plain = ours.text_to_image(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=5.0, seed=5,
                               sampler="euler").pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expect).max() <= TOLERANCE
    assert np.abs(got - plain).max() > 1e-3  # the second prompt reached the model


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
def test_image_to_image_matches_diffusers(sdxl_dir, ours, sampler):
    """diffusers is handed our image latents (the VAE posterior mean), so both start from the same z0."""
    ref = _ref(StableDiffusionXLImg2ImgPipeline, sdxl_dir, sampler)
    init = ours.text_to_image("a small green square on a white background", steps=3, seed=1).images[0]
    z0 = ours.encode_image(init)
    expect = ref(PROMPT, image=z0, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10,
                 guidance_scale=5.0, generator=[torch.Generator().manual_seed(8)], output_type="np").images
    got = ours.image_to_image(PROMPT, init, strength=0.6, negative_prompt=NEGATIVE, steps=10, guidance_scale=5.0,
                              seed=8, sampler=sampler).pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expect).max() <= TOLERANCE


def test_the_refiner_matches_diffusers(refiner_dir):
    """The refiner: one encoder, an aesthetic score in its added conditions (6 and 2.5)."""
    ours = Pipeline.from_pretrained(refiner_dir)
    assert ours.model.arch == "sdxl-refiner" and ours.model.text_encoder is None
    ref = _ref(StableDiffusionXLImg2ImgPipeline, refiner_dir, "euler")
    init = torch.rand(1, 3, 64, 64) * 2 - 1
    z0 = ours.encode_image(init)
    expect = ref(PROMPT, image=z0, strength=0.5, negative_prompt=NEGATIVE, num_inference_steps=8,
                 guidance_scale=5.0, generator=[torch.Generator().manual_seed(2)], output_type="np").images
    got = ours.image_to_image(PROMPT, init, strength=0.5, negative_prompt=NEGATIVE, steps=8, guidance_scale=5.0,
                              seed=2, sampler="euler").pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expect).max() <= TOLERANCE


def test_sdxl_only_fields_on_an_sd1_model_name_both(sd1_pipe):
    from pipelines.request import Request

    with pytest.raises(RequestError, match="prompt_2: applies to SDXL models .* is sd1"):
        sd1_pipe.generate(Request("a star", prompt_2="a circle", steps=2))
