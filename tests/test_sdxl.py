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


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
def test_base_then_refiner_matches_diffusers_denoising_end_and_start(sdxl_dir, refiner_dir, ours, sampler):
    """The base denoises the first 80 % of the schedule and hands its latents to the refiner, as
    diffusers' denoising_end=0.8 then denoising_start=0.8 do."""
    from pipelines.request import Request

    base_ref = _ref(StableDiffusionXLPipeline, sdxl_dir, sampler)
    refiner_ref = _ref(StableDiffusionXLImg2ImgPipeline, refiner_dir, sampler)
    gens = [torch.Generator().manual_seed(31)]
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, generator=gens)
    latents = base_ref(PROMPT, denoising_end=0.8, output_type="latent", **kw).images
    expect = refiner_ref(PROMPT, image=latents, denoising_start=0.8, output_type="np", **kw).images
    ours.refiner = Pipeline.from_pretrained(refiner_dir)
    try:
        seen = []
        got = ours.generate(Request(PROMPT, negative=NEGATIVE, steps=10, guidance=5.0, seed=31, sampler=sampler,
                                    refiner_start=0.8), callback=lambda i, x, x0: seen.append(i))
    finally:
        ours.refiner = None
    assert np.abs(got.pixels.permute(0, 2, 3, 1).numpy() - expect).max() <= TOLERANCE
    assert seen == list(range(10))  # one progress count over both models' steps


def test_refiner_start_without_a_refiner_or_out_of_range_is_an_error(ours):
    from pipelines.request import Request

    with pytest.raises(ValueError, match="no refiner is loaded"):
        ours.generate(Request(PROMPT, steps=4, seed=0, refiner_start=0.8))
    with pytest.raises(RequestError, match=r"refiner_start: must be in \(0, 1\), got 1.5"):
        ours.generate(Request(PROMPT, steps=4, seed=0, refiner_start=1.5))


@pytest.fixture(scope="module")
def inpaint_case(ours):
    """An image and a mask whose edges fall on the 8-pixel latent cells (white = repaint)."""
    image = ours.text_to_image("a small green square on a white background", steps=3, seed=1).images[0]
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    from PIL import Image

    return image, Image.fromarray(mask)


def _overlaid(ref, mask, image, result):
    """diffusers' result with the original laid back over it by diffusers' own apply_overlay (as A1111 does,
    and ours at mask_blur 0), as (1, H, W, 3) in [0, 1]."""
    return np.asarray(ref.image_processor.apply_overlay(mask, image, result), np.float32)[None] / 255


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_an_ordinary_sdxl_model_matches_diffusers(sdxl_dir, ours, inpaint_case, sampler, strength):
    from diffusers import StableDiffusionXLInpaintPipeline

    image, mask = inpaint_case
    ref = _ref(StableDiffusionXLInpaintPipeline, sdxl_dir, sampler)
    expect = ref(PROMPT, image=ours.encode_image(image), mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                 num_inference_steps=8, guidance_scale=5.0, generator=[torch.Generator().manual_seed(4)],
                 height=64, width=64, output_type="pil").images[0]
    expect = _overlaid(ref, mask, image, expect)
    got = ours.inpaint(PROMPT, image, mask, strength=strength, negative_prompt=NEGATIVE, steps=8, guidance_scale=5.0,
                       seed=4, sampler=sampler, mask_blur=0).pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expect).max() <= TOLERANCE


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
def test_a_9_channel_sdxl_inpainting_model_matches_diffusers(tmp_path_factory, inpaint_case, sampler):
    from diffusers import StableDiffusionXLInpaintPipeline

    from ldm.tiny import build_checkpoint

    path = build_checkpoint(tmp_path_factory.mktemp("sdxl-inpaint"), "sdxl-inpaint", seed=6)
    ours = Pipeline.from_pretrained(path)
    assert ours.model.is_inpainting and ours.model.is_sdxl
    image, mask = inpaint_case
    binary = torch.from_numpy(np.asarray(mask) >= 128).float()[None, None]
    from ldm.images import to_tensor

    masked = ours.encode_image(to_tensor(image) * (1 - binary))
    ref = _ref(StableDiffusionXLInpaintPipeline, path, sampler)
    expect = ref(PROMPT, image=ours.encode_image(image), mask_image=mask, masked_image_latents=masked, strength=1.0,
                 negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0, height=64, width=64,
                 generator=[torch.Generator().manual_seed(4)], output_type="pil").images[0]
    expect = _overlaid(ref, mask, image, expect)
    got = ours.inpaint(PROMPT, image, mask, strength=1.0, negative_prompt=NEGATIVE, steps=8, guidance_scale=5.0,
                       seed=4, sampler=sampler, mask_blur=0).pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expect).max() <= TOLERANCE


def test_ddim_inversion_on_sdxl_reconstructs_the_input_latent(ours):
    """The exact-noise stand-in of test_pipeline, given SDXL's added conditions (which it checks arrive)."""
    import dataclasses
    from types import SimpleNamespace

    from test_pipeline import GaussianEpsUNet

    seen = []

    class SDXLStandIn(GaussianEpsUNet):
        def __init__(self, ab):
            super().__init__(ab)
            self.config = SimpleNamespace(in_channels=4, out_channels=4, sample_size=8,
                                          addition_embed_type="text_time")

        def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
            seen.append({k: tuple(v.shape) for k, v in added_cond_kwargs.items()})
            return super().forward(sample, timestep, encoder_hidden_states)

    model = dataclasses.replace(ours.model)
    model.unet = SDXLStandIn(model.schedule.alphas_cumprod)
    pipe = Pipeline(model)
    img = ours.text_to_image(PROMPT, steps=3, seed=0).images[0]
    z0 = pipe.encode_image(img)
    noise = pipe.invert(img, prompt=PROMPT, steps=500)
    back = pipe.text_to_image(PROMPT, steps=500, guidance_scale=1.0, latents=noise, sampler="ddim").latents
    assert (back - z0).abs().max() < 0.015 * z0.abs().max()
    assert (noise - z0).abs().max() > 0.5 * z0.abs().max()
    assert seen[0] == {"text_embeds": (1, ours.model.text_encoder_2.config.projection_dim), "time_ids": (1, 6)}


def test_the_command_runs_sdxl_with_a_second_prompt_and_a_refiner(sdxl_dir, refiner_dir, tmp_path, ours):
    from pipelines.cli import main
    from pipelines.pngmeta import parse_parameters, read_parameters
    from pipelines.request import Request

    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "--model", str(sdxl_dir), "--prompt-2", "a yellow star", "--refiner",
                 str(refiner_dir), "--steps", "6", "--seed", "3", "--sampler", "euler", "--output", str(out),
                 "--quiet"]) == 0
    p = parse_parameters(read_parameters(out))
    assert p["Refiner"] == refiner_dir.name and p["Refiner switch at"] == "0.8" and p["Size"] == "64x64"
    ours.refiner = Pipeline.from_pretrained(refiner_dir)
    try:
        ref = ours.generate(Request(PROMPT, prompt_2="a yellow star", steps=6, seed=3, sampler="euler",
                                    refiner_start=0.8)).images[0]
    finally:
        ours.refiner = None
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ref))


def test_sdxl_flags_on_an_sd1_model_are_refused_naming_both(sd1_dir, tmp_path, capsys):
    from pipelines.cli import main

    assert main(["generate", "x", "--model", str(sd1_dir), "--prompt-2", "y", "--output", str(tmp_path / "a.png"),
                 "--quiet"]) == 2
    assert f"--prompt-2 applies to SDXL models (two text encoders); {sd1_dir.name} is sd1" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(sd1_dir), "--refiner-start", "0.5", "--quiet"]) == 2
    assert "--refiner-start needs --refiner" in capsys.readouterr().err


def test_the_studio_serves_sdxl_with_a_second_prompt(sdxl_dir, tmp_path, ours):
    import base64
    import io

    from PIL import Image

    from pipelines.serve import Job, Studio, Txt2Img, to_request

    studio = Studio(sdxl_dir, output_dir=tmp_path, worker_thread=False)
    try:
        info = studio.info()["models"][0]
        assert info["arch"] == "sdxl" and (info["defaults"]["width"], info["defaults"]["height"]) == (64, 64)
        job = Job(studio.resolve(to_request("txt2img", Txt2Img(prompt=PROMPT, prompt_2="a yellow star", steps=4,
                                                                 seed=9))))
        out = studio._run(job)
    finally:
        studio.close()
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB"))
    from pipelines.request import Request

    ref = ours.generate(Request(PROMPT, prompt_2="a yellow star", steps=4, seed=9)).images[0]
    assert np.array_equal(got, np.asarray(ref))


def test_an_sdxl_embedding_gives_diffusers_image(sdxl_dir, tmp_path):
    """An A1111/ComfyUI SDXL embedding ({clip_l, clip_g}, two vectors each): ours against diffusers'
    load_textual_inversion once per encoder."""
    from safetensors.torch import save_file

    ours = Pipeline.from_pretrained(sdxl_dir)
    te1, te2 = ours.model.text_encoder, ours.model.text_encoder_2
    g = torch.Generator().manual_seed(0)
    rows = {"clip_l": torch.randn(2, te1.config.hidden_size, generator=g) * 0.02,
            "clip_g": torch.randn(2, te2.config.hidden_size, generator=g) * 0.02}
    f = tmp_path / "shiny.safetensors"
    save_file(rows, str(f))
    assert ours.load_embedding(f) == ["shiny"]
    prompt = "a shiny circle on a blue background"
    got = ours.text_to_image(prompt, negative_prompt=NEGATIVE, steps=4, guidance_scale=5.0, seed=3,
                             sampler="euler").pixels.permute(0, 2, 3, 1).numpy()
    ref = _ref(StableDiffusionXLPipeline, sdxl_dir, "euler")
    ref.load_textual_inversion(rows["clip_l"], token=["shiny", "shiny_1"], text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(rows["clip_g"], token=["shiny", "shiny_1"], text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    expect = ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=4,
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert np.abs(got - expect).max() <= TOLERANCE
    plain = ours.text_to_image("a circle on a blue background", negative_prompt=NEGATIVE, steps=4,
                               guidance_scale=5.0, seed=3, sampler="euler").pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - plain).max() > 1e-3


def test_embeddings_for_another_architecture_are_refused_naming_both(sdxl_dir, sd1_dir, tmp_path):
    from safetensors.torch import save_file

    from ldm.models import ModelError

    xl, sd = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8)}, str(xl))
    save_file({"<c>": torch.zeros(1, 8)}, str(sd))
    with pytest.raises(ModelError, match=r"made for SDXL \(clip_l and clip_g\), but this model is sd1"):
        Pipeline.from_pretrained(sd1_dir).load_embedding(xl)
    with pytest.raises(ModelError, match=r"made for one text encoder \(SD 1.x / 2.x\), but this model is sdxl"):
        Pipeline.from_pretrained(sdxl_dir).load_embedding(sd)
