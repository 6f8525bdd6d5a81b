"""The embedded shapes model: diffusers' own pipeline loads and runs it; ours defaults to it and
agrees with diffusers on it; the judge of ``ldm eval`` reads known renders right."""

import numpy as np
import pytest
import torch

from ldm.models import default_model_path
from shapes import world as shapes
from shapes.clip import EMBEDDED_CLIP
from shapes.evaluate import eval_prompts, judge, summarize

needs_model = pytest.mark.skipif(default_model_path() is None, reason="embedded model not installed")


def test_judge_on_known_renders():
    cases = eval_prompts("seen", 10) + eval_prompts("heldout", 6)
    images = [shapes.render(shapes.place(np.random.default_rng(i), c["size"], c["color"], c["shape"], c["background"]))
              for i, c in enumerate(cases)]
    rows = judge(images, cases)
    assert summarize(rows)["all_correct"] == 1.0
    wrong = judge(images[:1], [{**cases[0], "background": "red" if cases[0]["background"] != "red" else "blue"}])
    assert not wrong[0]["all"] and wrong[0]["correct"]["background"] is False and wrong[0]["correct"]["shape"]


def test_eval_prompts_fixed_and_split():
    a, b = eval_prompts("seen", 64), eval_prompts("seen", 64)
    assert a == b and len({c["prompt"] for c in a}) == 64
    held = eval_prompts("heldout", None)
    assert len(held) == 48 and all((c["color"], c["shape"]) in shapes.HELD_OUT for c in held)
    assert not any((c["color"], c["shape"]) in shapes.HELD_OUT for c in a)


@needs_model
def test_diffusers_loads_and_runs_the_embedded_model():
    from diffusers import StableDiffusionPipeline

    from pipelines.pipeline import Pipeline

    path = default_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red circle on a blue background"
    theirs = pipe(prompt, num_inference_steps=10, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images[0]
    ours = Pipeline.from_pretrained(path).text_to_image(prompt, steps=10, guidance_scale=7.5, seed=3).pixels[0]
    assert theirs.shape == (64, 64, 3)
    assert np.abs(ours.permute(1, 2, 0).numpy() - theirs).max() < 2e-3


@needs_model
def test_diffusers_plain_call_on_the_embedded_model():
    """Exactly what a new user types: no dtype, no options. fp16 parts beside fp32 ones crashed it
    ('mat1 and mat2 must have the same dtype')."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_path()))
    image = pipe("a red circle").images[0]
    assert image.size == (64, 64)
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}


@needs_model
def test_embedded_model_names_itself():
    from pipelines.pipeline import Pipeline

    assert Pipeline.from_pretrained(default_model_path()).model.name == "shapes-model"


@needs_model
def test_embedded_model_draws_what_it_is_asked():
    from pipelines.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(default_model_path())
    cases = [{"size": "large", "color": "red", "shape": "circle", "background": "blue"},
             {"size": "small", "color": "yellow", "shape": "square", "background": "black"}]
    res = pipe.text_to_image([shapes.caption(**c) for c in cases], steps=20, seed=0)
    rows = judge(res.images, cases)
    assert sum(r["all"] for r in rows) >= 1, [r["read"] for r in rows]
    assert (EMBEDDED_CLIP / "visual.safetensors").is_file()
