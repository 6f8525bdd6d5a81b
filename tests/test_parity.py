"""Our text-to-image against diffusers' StableDiffusionPipeline on the same weights, prompt and seeds."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

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
