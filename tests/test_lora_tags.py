"""A1111's ``<lora:NAME:WEIGHT>`` prompt tags: read as A1111's LoRA code reads them, removed from the
text the encoder sees, applied at their weights as diffusers' ``set_adapters`` applies them (the
truth: diffusers' pipeline on the same tiny weights and LoRA files), switched off exactly, and every
bad tag a clear error before any sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.prompts import lora_tags, prompt_schedule, strip_extra_networks
from ldm.tiny import random_lora
from pipelines.pipeline import Pipeline
from pipelines.request import Limits, Request, RequestError

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def loras(tmp_path_factory, sd1_dir):
    folder = tmp_path_factory.mktemp("Lora")
    (folder / "styles").mkdir()
    random_lora(sd1_dir, folder, sdxl=False, seed=1, name="ink.safetensors")
    random_lora(sd1_dir, folder / "styles", sdxl=False, seed=2, name="glow.safetensors")  # A1111 reads subfolders
    return folder


def test_tags_read_as_a1111_reads_them():
    assert lora_tags("a <lora:ink:0.7> cat, <lora:glow> <lyco:x:0.2:0.9> <lora:y:te=0.3:unet=1.5> "
                     "<lora:z:0.5:dyn=8>") == [
        ("ink", 0.7, 0.7), ("glow", 1.0, 1.0), ("x", 0.2, 0.9), ("y", 0.3, 1.5), ("z", 0.5, 0.5)]
    assert strip_extra_networks("a <lora:ink:0.7> cat<lora:glow>") == "a  cat"
    # removed before prompt editing is parsed (its colons are not a [from:to:when])
    assert prompt_schedule("a [dog:cat <lora:ink:0.5>:0.5]", 10) == [(5, "a dog"), (10, "a cat ")]
    for bad, said in (("<hypernet:x:1>", "type 'hypernet' are not supported"), ("<lora:ink:lots>", "is a number"),
                      ("<lora::1>", "write <lora:NAME:WEIGHT>"), ("<lora:ink:inf>", "must be finite"),
                      ("<lora:ink:scale=2>", "scale= is not a LoRA argument")):
        with pytest.raises(ValueError, match=said):
            lora_tags(bad)


def _ours(pipe, prompt, folder, seed=3):
    r = Request(prompt, steps=3, guidance=5.0, seed=seed).resolve(pipe.model, Limits(lora_dir=folder))
    return pipe.generate(r).pixels


def _diffusers(d, folder, weights: dict, prompt=PROMPT, seed=3):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    for name, (file, w) in weights.items():
        ref.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    ref.set_adapters(list(weights), adapter_weights=[w for _, w in weights.values()])
    out = ref(prompt, num_inference_steps=3, guidance_scale=5.0, output_type="np",
              generator=torch.Generator().manual_seed(seed)).images
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def test_tags_at_their_weights_give_diffusers_set_adapters_image(sd1_dir, loras):
    pipe = Pipeline.from_pretrained(sd1_dir)
    tagged = f"{PROMPT} <lora:ink:0.7>, <lora:glow.safetensors:-0.4>"
    ours = _ours(pipe, tagged, loras)
    expect = _diffusers(sd1_dir, loras, {"ink": (loras / "ink.safetensors", 0.7),
                                         "glow": (loras / "styles" / "glow.safetensors", -0.4)},
                        prompt=strip_extra_networks(tagged))  # what the encoder reads: "a red circle , "
    assert (ours - expect).abs().max() <= 2 / 255
    # the text encoder's and the U-Net's weights apart (A1111's <lora:NAME:TE:UNET>)
    split = _ours(pipe, f"{PROMPT} <lora:ink:0:1.2>", loras)
    expect = _diffusers(sd1_dir, loras, {"ink": (loras / "ink.safetensors", {"unet": 1.2, "text_encoder": 0.0})})
    assert (split - expect).abs().max() <= 2 / 255
    assert (split - ours).abs().max() > 1e-2


def test_weight_zero_and_no_tag_are_exactly_the_model_without_the_lora(sd1_dir, loras):
    pipe = Pipeline.from_pretrained(sd1_dir)
    base = _ours(pipe, PROMPT, loras)
    with_tag = _ours(pipe, f"{PROMPT} <lora:ink:1>", loras)
    assert (with_tag - base).abs().max() > 1e-2  # the LoRA changes the image
    assert torch.equal(_ours(pipe, f"{PROMPT} <lora:ink:0>", loras), base)  # off: exactly the image without
    assert torch.equal(_ours(pipe, PROMPT, loras), base)  # the next request without a tag: nothing left on
    assert torch.equal(_ours(pipe, f"{PROMPT} <lora:ink:1>", loras), with_tag)  # and on again alike
    fresh = Pipeline.from_pretrained(sd1_dir)
    assert torch.equal(_ours(fresh, PROMPT, loras), base)


def test_png_parameters_keep_the_tag_and_record_the_hash(sd1_dir, loras):
    import hashlib

    from pipelines.pngmeta import parse_parameters

    pipe = Pipeline.from_pretrained(sd1_dir)
    pipe.lora_dir = loras
    res = pipe.text_to_image(f"{PROMPT} <lora:ink:0.5>", steps=2, seed=1)
    params = parse_parameters(pipe.infotexts(res)[0])
    assert params["prompt"] == f"{PROMPT} <lora:ink:0.5>"  # as A1111 writes it: sent back, it applies again
    assert params["Lora hashes"] == f"ink: {hashlib.sha256((loras / 'ink.safetensors').read_bytes()).hexdigest()[:12]}"
    assert "Lora hashes" not in parse_parameters(pipe.infotexts(pipe.text_to_image(PROMPT, steps=2, seed=1))[0])


@pytest.mark.parametrize("prompt, limits, said", [
    (f"{PROMPT} <lora:nope:1>", "folder", "no LoRA file 'nope' in the LoRA folder; available: glow, ink"),
    (f"{PROMPT} <lora:ink:1>", None, "names a file of a LoRA folder: give --lora-dir"),
    (f"{PROMPT} <lora:ink:1> <lora:ink:0.5>", "folder", "asked at two weights"),
    (f"{PROMPT} <lora:ink:much>", "folder", "a LoRA's weight is a number"),
    (f"{PROMPT} <hypernet:ink:1>", "folder", "not supported"),
])
def test_bad_tags_are_named_before_anything_runs(sd1_dir, loras, prompt, limits, said):
    lim = Limits(lora_dir=loras) if limits else Limits()
    with pytest.raises(RequestError, match=said) as info:
        Request(prompt).check(lim)
    assert info.value.problems[0][0] == "prompt"


def test_generate_from_file_applies_each_lines_tags(sd1_dir, loras, tmp_path):
    from PIL import Image

    from pipelines.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} <lora:ink:0.8>\n{PROMPT}\n")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(sd1_dir), "--from-file", str(prompts), "--lora-dir", str(loras),
                 "--steps", "3", "--guidance", "5", "--seed", "3", "--output-dir", str(out), "--quiet"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    pipe = Pipeline.from_pretrained(sd1_dir)
    read = {f: np.asarray(Image.open(f)) for f in files}
    tagged = [f for f in files if "ink" in Image.open(f).info["parameters"].split("\n")[0]]
    assert len(tagged) == 1
    plain = next(f for f in files if f not in tagged)
    # each line's seed: the first line seed 3, the second 4 (seed + k, as A1111 numbers a batch)
    seeds = {f: int(Image.open(f).info["parameters"].split("Seed: ")[1].split(",")[0]) for f in files}
    for f, prompt in ((tagged[0], f"{PROMPT} <lora:ink:0.8>"), (plain, PROMPT)):
        img = (_ours(pipe, prompt, loras, seed=seeds[f]).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(read[f].astype(float) - img).max() <= 1


def test_sdxl_tag_on_a_kohya_file_gives_diffusers_image(sdxl_dir, tmp_path):
    """SDXL (both text encoders) with the LoRA in kohya's layout (lora_unet_..., lora_te1_/te2_), by tag."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from ldm.checkpoints import lora_to_kohya
    from ldm.models import load_model

    made = random_lora(sdxl_dir, tmp_path, sdxl=True, seed=4)
    folder = tmp_path / "Lora"
    folder.mkdir()
    save_file(lora_to_kohya(load_file(str(made)), dict(load_model(sdxl_dir).unet.config), sdxl=True),
              str(folder / "xl_style.safetensors"))
    pipe = Pipeline.from_pretrained(sdxl_dir)
    base = _ours(pipe, PROMPT, folder)
    ours = _ours(pipe, f"{PROMPT}<lora:xl_style:0.6>", folder)
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(folder), weight_name="xl_style.safetensors", adapter_name="xl_style")
    ref.set_adapters(["xl_style"], adapter_weights=[0.6])
    expect = ref(PROMPT, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(3)).images
    assert (ours - base).abs().max() > 1e-2
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - expect).max() <= 2 / 255
    assert torch.equal(_ours(pipe, PROMPT, folder), base)
