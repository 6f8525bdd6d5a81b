"""dtype auto on a CPU (issue 57): bf16 where the processor has native bf16 units, fp32 elsewhere, one
rule for generation and training; the VAE stays fp32; the PNG says so. The suite itself runs with
LDM_CPU_BF16=0 (tests/conftest.py); these tests set the rule's inputs themselves."""

import torch
from PIL import Image

from ldm import models
from ldm.models import cpu_bf16, load_model, resolve_dtype

MODEL = "ldm/assets/shapes-model"


def test_the_rule_reads_the_cpu_and_the_override(monkeypatch):
    monkeypatch.delenv("LDM_CPU_BF16", raising=False)
    for amx, avx in ((False, False), (False, True), (True, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx, raising=False)
        native, why = cpu_bf16()
        assert native == (amx or avx) and ("units" in why)
        assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
        assert resolve_dtype(None, "cuda") == torch.float16 and resolve_dtype("fp32", "cpu") == torch.float32
        from finetune.loop import resolve_mixed_precision

        assert resolve_mixed_precision("auto") == ("bf16" if native else "no") or torch.cuda.is_available()
    monkeypatch.setenv("LDM_CPU_BF16", "1")
    assert cpu_bf16() == (True, "LDM_CPU_BF16=1")
    monkeypatch.setenv("LDM_CPU_BF16", "0")
    assert cpu_bf16() == (False, "LDM_CPU_BF16=0") and resolve_dtype("auto", "cpu") == torch.float32


def test_auto_on_a_bf16_cpu_keeps_the_vae_fp32_and_draws_what_fp32_draws(monkeypatch):
    """bf16 U-Net and text encoder, fp32 VAE; the detector reads the same shape, colour and background as
    in the fp32 image of the same prompt and seed; the PNG records the dtypes (fp32 records none)."""
    from pipelines.pipeline import Pipeline
    from pipelines.pngmeta import parse_parameters
    from shapes import world

    monkeypatch.setenv("LDM_CPU_BF16", "1")
    fast = Pipeline.from_pretrained(MODEL)
    assert (fast.model.unet.dtype, fast.model.text_encoder.dtype, fast.model.vae.dtype) == (
        torch.bfloat16, torch.bfloat16, torch.float32)
    monkeypatch.setenv("LDM_CPU_BF16", "0")
    plain = Pipeline.from_pretrained(MODEL)
    assert plain.model.unet.dtype == torch.float32
    prompts = ["a large red circle on a blue background", "a small green square on a white background",
               "a large yellow star on a black background", "a small blue triangle on a red background"]
    a = fast.text_to_image(prompts, seed=5, steps=20)
    b = plain.text_to_image(prompts, seed=5, steps=20)
    for x, y in zip(a.images, b.images):
        rx, ry = world.detect(x), world.detect(y)
        assert (rx.shape, rx.color, rx.background) == (ry.shape, ry.color, ry.background)
    assert parse_parameters(fast.infotexts(a)[0])["Dtype"] == "bf16 (VAE fp32)"
    assert "Dtype" not in parse_parameters(plain.infotexts(b)[0])


def test_controlnet_and_lora_follow_the_unets_bf16(monkeypatch, tmp_path):
    from test_control import random_controlnet

    from ldm.tiny import random_lora
    from pipelines.pipeline import Pipeline

    cn = random_controlnet(MODEL, tmp_path / "cn", 3)
    lora = random_lora(MODEL, tmp_path, sdxl=False, seed=2)
    monkeypatch.setenv("LDM_CPU_BF16", "1")
    pipe = Pipeline.from_pretrained(MODEL)
    image = Image.new("RGB", (64, 64))
    res = pipe.text_to_image("a red circle", seed=1, steps=4, lora=[lora],
                             controls=[{"model": cn, "image": image, "weight": 0.8}])
    assert res.pixels.dtype == torch.float32 and torch.isfinite(res.pixels).all()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for out in (pipe.image_to_image("a blue square", res.images[0], strength=0.6, seed=2, steps=4),  # the fp32 VAE's
                pipe.inpaint("a blue square", res.images[0], mask, seed=2, steps=4)):  # latents into the bf16 U-Net
        assert torch.isfinite(out.pixels).all() and out.images[0].size == (64, 64)


def test_bf16_asked_on_a_cpu_without_units_warns(monkeypatch, caplog):
    monkeypatch.setenv("LDM_CPU_BF16", "0")
    with caplog.at_level("WARNING", logger=models.log.name):
        m = load_model(MODEL, dtype="bf16")
    assert m.unet.dtype == torch.bfloat16 and "emulated and slower than fp32" in caplog.text
