"""Single-file checkpoints in the original (A1111 / ComfyUI) layout, both ways, on tiny random models
of every layout; the shipped configs of the real architectures against their published sizes."""

import re
import json

import numpy as np
import pytest
import torch

from ldm.checkpoints import detect, load_single_file, to_single_file
from ldm.models import ModelError, load_model
from ldm.tiny import build_checkpoint, random_lora
from pipelines.cli import main
from pipelines.pipeline import Pipeline

KINDS = {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1-inpaint", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner",
         "sdxl-inpaint": "sdxl-inpaint"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (directory, the single file exported from it)."""
    out = {}
    for kind in KINDS:
        d = build_checkpoint(tmp_path_factory.mktemp(kind), kind, seed=5)
        out[kind] = (d, to_single_file(load_model(d), d.parent / f"{kind}.safetensors"))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_then_import_gives_back_every_weight(tiny, kind):
    """Our export (diffusers -> original keys) read back by diffusers' own converters (original ->
    diffusers) is the identity, for every layout."""
    from safetensors import safe_open

    d, f = tiny[kind]
    with safe_open(str(f), "pt") as s:
        keys = list(s.keys())
        shapes = {k: tuple(s.get_slice(k).get_shape()) for k in keys if k.endswith("input_blocks.0.0.weight")}
    assert detect(keys, shapes) == KINDS[kind]
    parts, arch, _ = load_single_file(f, config=d)
    ref = load_model(d)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine = getattr(ref, name)
        if mine is None:
            assert name not in parts
            continue
        theirs = parts[name].state_dict()
        for k, v in mine.state_dict().items():
            if not k.endswith("position_ids"):
                assert torch.equal(v, theirs[k]), (name, k)


def test_original_key_names(tiny):
    """A few keys as A1111 and ComfyUI name them."""
    from safetensors import safe_open

    with safe_open(str(tiny["sd1"][1]), "pt") as s:
        keys = set(s.keys())
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.out.2.weight",
            "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= keys
    with safe_open(str(tiny["sdxl"][1]), "pt") as s:
        keys = set(s.keys())
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"} <= keys


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_diffusers_from_single_file_and_ours_give_the_directorys_image(tiny, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    d, f = tiny[kind]
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    theirs = cls.from_single_file(str(f), config=str(d), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    expect = theirs("a red circle", num_inference_steps=4, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(2)).images
    from_dir = Pipeline.from_pretrained(d).text_to_image("a red circle", steps=4, guidance_scale=5.0, seed=2)
    from_file = Pipeline.from_pretrained(f, config=d).text_to_image("a red circle", steps=4, guidance_scale=5.0,
                                                                    seed=2)
    assert np.abs(from_dir.pixels.permute(0, 2, 3, 1).numpy() - expect).max() <= 1e-3
    assert (from_file.pixels - from_dir.pixels).abs().max() <= 1e-3


def test_generate_and_convert_commands(tiny, tmp_path, capsys):
    d, f = tiny["sdxl"]
    a, b = tmp_path / "dir.png", tmp_path / "file.png"
    assert main(["generate", "a red circle", "--model", str(d), "--steps", "3", "--seed", "1", "--output", str(a),
                 "--quiet"]) == 0
    assert main(["generate", "a red circle", "--model", str(f), "--model-config", str(d), "--steps", "3", "--seed",
                 "1", "--output", str(b), "--quiet"]) == 0
    from PIL import Image

    pa, pb = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    assert np.abs(pa - pb).max() <= 1
    # directory -> file -> directory, and the result loads in diffusers as the original did
    one = tmp_path / "one.safetensors"
    assert main(["convert", str(d), str(one)]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(one), str(back), "--model-config", str(d)]) == 0
    assert "(sdxl)" in capsys.readouterr().out
    assert main(["convert", str(d), str(one)]) == 2 and "--overwrite" in capsys.readouterr().err
    ref = load_model(d).unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in load_model(back).unet.state_dict().items())
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_bad_single_files_are_errors_naming_what_was_found(tiny, tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"foo.bar.weight": torch.zeros(2), "model.diffusion_model.x": torch.zeros(1)}, str(odd))
    with pytest.raises(ModelError, match=r"no text encoder this project knows\); key prefixes found: foo.bar, "
                                         "model.diffusion_model"):
        load_model(odd)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny["sd1"][1].read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated.safetensors' is not a readable .safetensors file.*truncated"):
        load_model(truncated)
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny["sd1"][1]))}, ckpt)
    with pytest.raises(ModelError, match="pickle checkpoint.*--allow-pickle"):
        load_model(ckpt, config=tiny["sd1"][0])
    assert load_model(ckpt, config=tiny["sd1"][0], allow_pickle=True).arch == "sd1"
    with pytest.raises(ModelError, match="does not fit the config"):
        load_model(tiny["sd1"][1], config=tiny["sd2"][0])  # an sd1 file read with another layout's config


# published parameter counts of the real models (diffusers' and OpenCLIP's model cards)
PUBLISHED = {"sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
             "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
             "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}}


@pytest.mark.parametrize("arch", list(PUBLISHED))
def test_the_shipped_configs_build_the_real_architectures(arch):
    """Built on the meta device (no memory), each part has the published parameter count."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.checkpoints import config_dir_for

    d = config_dir_for(arch)
    with init_empty_weights():
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(d / "unet"))),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(str(d / "vae")))}
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (d / name).is_dir():
                parts[name] = cls(CLIPTextConfig.from_pretrained(str(d / name)))
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()} == PUBLISHED[arch]


def test_every_shipped_config_is_complete_and_its_tokenizer_is_clips(tmp_path, monkeypatch):
    from ldm.checkpoints import CONFIGS
    from ldm.models import load_tokenizer, model_parts

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    archs = sorted(p.name for p in CONFIGS.iterdir())
    assert archs == ["sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint", "sdxl-refiner"]
    for arch in archs:
        for part in model_parts(CONFIGS / arch):
            assert (CONFIGS / arch / part).is_dir(), (arch, part)
    tok = load_tokenizer(CONFIGS / "sdxl" / "tokenizer_2")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token == "!" and tok.model_max_length == 77


def test_cached_tokenizer_without_tokenizer_json_tokenizes_as_clip_does(tmp_path, monkeypatch):
    """The cache keeps vocab.json and merges.txt only (a fast load); what it tokenizes equals the full
    save_pretrained directory's and open_clip's own CLIP tokenizer, padded and truncated alike."""
    import random

    from open_clip.tokenizer import SimpleTokenizer

    from ldm.checkpoints import CONFIGS
    from ldm.models import load_tokenizer
    from ldm.tokenizer import write_clip_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = load_tokenizer(CONFIGS / "sd1" / "tokenizer")
    (cache_dir,) = (tmp_path / "cache" / "ldm-toolkit" / "tokenizers").iterdir()
    assert not (cache_dir / "tokenizer.json").exists() and (cache_dir / "merges.txt").is_file()
    full = write_clip_tokenizer(tmp_path / "full")
    reference = SimpleTokenizer()
    words = ["a", "red", "circle", "Teal", "ring!!", "naïve", "café", "don't", "(word:1.2)", "x" * 30, "1234", "a,b.c"]
    rng = random.Random(0)
    for _ in range(200):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        ids = cached(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == full(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        want = reference.encode(prompt)[:75]
        assert ids[:len(want) + 2] == [49406, *want, 49407], prompt
    assert (cached.pad_token_id, cached.model_max_length) == (full.pad_token_id, 77)


def test_vae_replaces_the_models_vae_from_a_directory_or_a_single_file(tiny, tmp_path):
    """Another model's VAE, as its directory and as an A1111-style VAE file, gives the image of the
    model with that VAE swapped in by hand."""
    import dataclasses

    from ldm.checkpoints import vae_file

    d = tiny["sd1"][0]
    other = build_checkpoint(tmp_path / "other", "sd1", seed=9)
    base = load_model(d)
    swapped = Pipeline(dataclasses.replace(base, vae=load_model(other).vae))
    expect = swapped.text_to_image("a red circle", steps=3, seed=4).pixels
    plain = Pipeline(base).text_to_image("a red circle", steps=3, seed=4).pixels
    assert (expect - plain).abs().max() > 1e-2  # the VAE matters to the image
    f = vae_file(load_model(other).vae, tmp_path / "other-vae.safetensors")
    for source in (other, other / "vae", f):
        got = Pipeline.from_pretrained(d, vae=source).text_to_image("a red circle", steps=3, seed=4).pixels
        assert (got - expect).abs().max() <= 1e-5, source
    with pytest.raises(ModelError, match="holds no VAE"):
        load_model(d, vae=tmp_path)


def test_v_prediction_is_read_from_the_weights():
    """The embedded model predicts epsilon; the same network turned into an exact v predictor
    (v = sqrt(ab) eps - sqrt(1 - ab) x0) is told apart by one evaluation."""
    from types import SimpleNamespace

    from ldm.checkpoints import predicts_v
    from ldm.models import default_model_path

    m = load_model(default_model_path())
    ab = m.schedule.alphas_cumprod

    class AsV(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.config = unet, unet.config

        def forward(self, sample, timestep, encoder_hidden_states):
            eps = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
            a = ab[int(timestep)]
            x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
            return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)

    width = m.text_encoder.config.hidden_size
    top = m.schedule.num_train_timesteps - 1
    assert not predicts_v(m.unet, width, top)
    assert predicts_v(AsV(m.unet), width, top)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_lora_exported_to_kohyas_layout_reads_back_to_the_same_image(tiny, tmp_path, kind):
    """Ours -> kohya (lora_unet_..., lora_te[12]_..., alpha): read back here through diffusers' kohya
    reader it gives the image the original file gives, here and in diffusers' load_lora_weights."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from ldm.checkpoints import is_kohya_lora, lora_to_kohya

    d = tiny[kind][0]
    ours_file = random_lora(d, tmp_path, sdxl=kind == "sdxl")
    kohya = lora_to_kohya(load_file(str(ours_file)), dict(load_model(d).unet.config), sdxl=kind == "sdxl")
    assert is_kohya_lora(kohya) and all(k.startswith(("lora_unet_", "lora_te")) for k in kohya)
    if kind == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in kohya) and any("lora_te2_" in k for k in kohya)
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(kohya, str(kohya_file))
    images = {}
    base = Pipeline.from_pretrained(d).text_to_image("a red circle", steps=3, guidance_scale=5.0, seed=1).pixels
    for name, f in (("ours", ours_file), ("kohya", kohya_file)):
        p = Pipeline.from_pretrained(d)
        p.load_lora(f)
        images[name] = p.text_to_image("a red circle", steps=3, guidance_scale=5.0, seed=1).pixels
    assert (images["ours"] - base).abs().max() > 1e-2  # the LoRA changes the image
    assert (images["kohya"] - images["ours"]).abs().max() <= 1e-4
    ref = (StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline).from_pretrained(d)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    expect = ref("a red circle", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(1)).images
    assert np.abs(images["kohya"].permute(0, 2, 3, 1).numpy() - expect).max() <= 2 / 255


def test_convert_takes_a_lora_both_ways(tiny, tmp_path, capsys):
    d = tiny["sd1"][0]
    ours = random_lora(d, tmp_path, sdxl=False)
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", str(ours), str(kohya), "--model", str(d)]) == 0
    assert "kohya layout, for sd1" in capsys.readouterr().out
    assert main(["convert", str(kohya), str(back), "--model", str(d)]) == 0
    assert "diffusers layout" in capsys.readouterr().out
    images = []
    for f in (ours, kohya, back):
        p = Pipeline.from_pretrained(d)
        p.load_lora(f)
        images.append(p.text_to_image("a red circle", steps=3, seed=1).pixels)
    assert (images[1] - images[0]).abs().max() <= 1e-4 and (images[2] - images[0]).abs().max() <= 1e-4


def test_a_lora_for_another_architecture_is_refused_naming_both(tiny, tmp_path):
    xl = random_lora(tiny["sdxl"][0], tmp_path / "xl", sdxl=True)
    with pytest.raises(ModelError, match="was made for SDXL, but this model is sd1"):
        Pipeline.from_pretrained(tiny["sd1"][0]).load_lora(xl)


def test_an_sd1_lora_on_sdxl_is_one_error_naming_both_and_convert_refuses_it(tiny, tmp_path, capsys):
    sd1 = random_lora(tiny["sd1"][0], tmp_path / "sd1", sdxl=False)
    with pytest.raises(ModelError, match=r"does not fit this sdxl model: \d+ of its \d+ layers"):
        Pipeline.from_pretrained(tiny["sdxl"][0]).load_lora(sd1)
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(sd1), str(out), "--model", str(tiny["sdxl"][0])]) == 2
    err = capsys.readouterr().err
    assert "does not fit this sdxl model" in err and len(err.strip().splitlines()) == 1 and not out.exists(), err


def test_files_of_the_wrong_kind_are_named(tiny, tmp_path):
    """Issue 52 (15, 18): a textual-inversion checkpoint as an embedding hung for 10 minutes (its text
    encoder's token table read as 49,408 words); a text file or a U-Net as a LoRA were tracebacks; an
    embedding as a LoRA did nothing."""
    from safetensors.torch import save_file

    from ldm.embeddings import read_embeddings, write_embeddings

    d = tiny["sd1"][0]
    m = load_model(d)
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text")
    unet = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.unet.state_dict().items()}, str(unet))
    encoder = tmp_path / "te.safetensors"
    save_file({k: v.contiguous() for k, v in m.text_encoder.state_dict().items()}, str(encoder))
    state = tmp_path / "modules.safetensors"
    save_file({f"text_encoder/{k}": v.contiguous() for k, v in m.text_encoder.state_dict().items()}, str(state))
    emb = write_embeddings(tmp_path / "learned_embeds.safetensors",
                           {"<x>": torch.zeros(2, m.text_encoder.config.hidden_size)})
    pipe = Pipeline.from_pretrained(d)
    for f, what in ((text, "not a readable .safetensors file"), (unet, "a U-Net's weights"),
                    (emb, "a textual-inversion embedding")):
        with pytest.raises(ModelError, match=f"is {re.escape(what)}.*, not a LoRA"):
            pipe.load_lora(f)
    for f, what in ((encoder, "a text encoder's weights"), (state, "a training run's state"),
                    (unet, "a U-Net's weights")):
        with pytest.raises(ModelError, match=f"is {re.escape(what)}.*not a textual-inversion embedding"):
            read_embeddings(f)
    assert list(read_embeddings(emb)) == ["<x>"]


def test_png_parameters_record_the_lora_vae_and_embeddings_used(tiny, tmp_path):
    import hashlib

    from ldm.embeddings import write_embeddings
    from pipelines.pngmeta import parse_parameters

    d = tiny["sd1"][0]
    lora = random_lora(d, tmp_path, sdxl=False)
    pipe = Pipeline.from_pretrained(d, vae=d / "vae")
    emb = write_embeddings(tmp_path / "star.safetensors", {"<star>": torch.zeros(1, pipe.model.text_encoder.config.hidden_size)})
    pipe.load_embedding(emb)
    pipe.load_lora(lora)
    res = pipe.text_to_image(["a <star> circle", "a red circle"], steps=2, seed=1)
    with_ti, without = (parse_parameters(t) for t in pipe.infotexts(res))
    sha = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()[:12]  # noqa: E731
    assert with_ti["Lora hashes"] == without["Lora hashes"] == f"pytorch_lora_weights: {sha(lora)}"
    assert with_ti["TI hashes"] == f"star: {sha(emb)}" and "TI hashes" not in without
    assert with_ti["VAE"] == "vae"
