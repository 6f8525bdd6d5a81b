"""Textual inversion on a tiny random SD-layout model: only the new rows learn, the files load in
diffusers and in ours alike, multi-vector tokens expand, resume equals an uninterrupted run, and
bad input gets a clear error."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import ConfigError, build
from finetune.loop import train
from finetune.textual_inversion import TextualInversionConfig, TextualInversionObjective
from ldm.embeddings import read_embeddings, write_a1111, write_embeddings
from ldm.models import ModelError, load_model
from ldm.text import expand_concepts, tokenize
from pipelines.cli import main
from pipelines.pipeline import Pipeline
from shapes import world as shapes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ti-data")
    rng = np.random.default_rng(0)
    for i, bg in enumerate(["blue", "white", "black"]):
        img = shapes.render(shapes.place(rng, "large", "orange", "star", bg))
        if i == 1:
            img = img.convert("RGBA")  # other modes are converted
        if i == 2:
            img = img.convert("L").resize((80, 48))  # greyscale, another size
        img.save(d / f"{i}.png")
    (d / "0.txt").write_text("a large {} on a blue background")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return d


def _cfg(sd1_dir, data_dir, out, **kw):
    values = dict(model=str(sd1_dir), data_dir=str(data_dir), output_dir=str(out), initializer_token="star",
                  max_steps=4, batch_size=2, learning_rate=5e-2, checkpoint_every=2, report_to="none",
                  overwrite=True)
    values.update(kw)
    return build(TextualInversionConfig, values)


def _run(cfg):
    obj = TextualInversionObjective(cfg)
    summary = train(obj, cfg, progress=False)
    return obj, summary


def test_only_the_placeholder_rows_change_and_every_weight_stays(sd1_dir, data_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        obj, _ = _run(_cfg(sd1_dir, data_dir, tmp_path / "a", num_vectors=2, adam_weight_decay=0.1))
    assert any("broken.png" in r.getMessage() for r in caplog.records)  # skipped, and named
    assert obj.latents.shape[0] == 3
    fresh = load_model(sd1_dir, dtype="fp32")
    trained = obj.model
    n_old = fresh.text_encoder.get_input_embeddings().weight.shape[0]
    emb = trained.text_encoder.get_input_embeddings().weight.detach()
    assert emb.shape[0] == n_old + 2 and obj.tables[0].ids == [n_old, n_old + 1]
    assert torch.equal(emb[:n_old], fresh.text_encoder.get_input_embeddings().weight)
    init = fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer.convert_tokens_to_ids("star</w>")]
    assert not torch.allclose(emb[n_old], init)  # the new rows did learn
    for name in ("unet", "vae", "text_encoder"):
        before = getattr(fresh, name).state_dict()
        for k, v in getattr(trained, name).state_dict().items():
            if k.endswith("token_embedding.weight"):
                continue
            assert torch.equal(v, before[k]), (name, k)
    saved = read_embeddings(tmp_path / "a" / "learned_embeds.safetensors")
    assert list(saved) == ["<concept>"] and torch.equal(saved["<concept>"], emb[n_old:])
    a1111 = read_embeddings(tmp_path / "a" / "concept.pt")
    assert torch.equal(a1111["<concept>"], saved["<concept>"])


def test_a_saved_embedding_gives_the_same_image_in_diffusers_and_in_ours(sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    dim = load_model(sd1_dir).text_encoder.config.hidden_size
    vec = torch.randn(3, dim, generator=torch.Generator().manual_seed(0)) * 0.5
    write_embeddings(tmp_path / "e.safetensors", {"<thing>": vec})
    write_a1111(tmp_path / "thing.pt", "<thing>", vec)
    prompt = "a <thing> on a blue background"
    ref = StableDiffusionPipeline.from_pretrained(str(sd1_dir), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(tmp_path / "e.safetensors"))
    theirs = ref(prompt, num_inference_steps=4, guidance_scale=7.5, output_type="pt",
                 generator=torch.Generator().manual_seed(5)).images
    for file in ("e.safetensors", "thing.pt"):
        pipe = Pipeline.from_pretrained(sd1_dir)
        assert pipe.load_embedding(tmp_path / file) == ["<thing>"]
        ours = pipe.text_to_image(prompt, steps=4, guidance_scale=7.5, seed=5).pixels
        assert (ours - theirs).abs().max() < 1e-3, file
    # and the vectors matter: without them the image differs
    plain = Pipeline.from_pretrained(sd1_dir).text_to_image("a on a blue background", steps=4, seed=5).pixels
    assert (plain - theirs).abs().max() > 1e-2


def test_multi_vector_tokens_expand_in_prompts(sd1_dir, tmp_path):
    pipe = Pipeline.from_pretrained(sd1_dir)
    dim = pipe.model.text_encoder.config.hidden_size
    write_embeddings(tmp_path / "e.safetensors", {"<m>": torch.zeros(3, dim)})
    pipe.load_embedding(tmp_path / "e.safetensors", token="<v>")
    tok = pipe.model.tokenizer
    assert expand_concepts(tok, "a <v> and a <v>") == "a <v> <v>_1 <v>_2 and a <v> <v>_1 <v>_2"
    assert expand_concepts(tok, "no concept here") == "no concept here"
    ids = tokenize(tok, ["a <v>"])[0].tolist()
    new = tok.convert_tokens_to_ids(["<v>", "<v>_1", "<v>_2"])
    assert ids[2:5] == new


def test_resume_equals_an_uninterrupted_run(sd1_dir, data_dir, tmp_path):
    straight, _ = _run(_cfg(sd1_dir, data_dir, tmp_path / "s", max_steps=4))
    _run(_cfg(sd1_dir, data_dir, tmp_path / "r", max_steps=2))
    resumed, summary = _run(_cfg(sd1_dir, data_dir, tmp_path / "r", max_steps=4, resume=True, overwrite=False))
    assert summary["steps"] == 2
    a = read_embeddings(tmp_path / "s" / "learned_embeds.safetensors")["<concept>"]
    b = read_embeddings(tmp_path / "r" / "learned_embeds.safetensors")["<concept>"]
    assert torch.equal(a, b)


def test_scale_lr_multiplies_by_batch_accumulation_and_processes(sd1_dir, data_dir, tmp_path):
    _, summary = _run(_cfg(sd1_dir, data_dir, tmp_path / "l", max_steps=1, batch_size=2,
                           gradient_accumulation_steps=3, learning_rate=1e-3, scale_lr=True, log_every=1))
    assert summary["lr"] == pytest.approx(1e-3 * 2 * 3)


@pytest.mark.parametrize("kw, error, match", [
    (dict(initializer_token="orangey"), ConfigError, r"is 2 tokens \(orange \+ y</w>\), not one"),
    (dict(placeholder_token="star</w>"), ModelError, "already in the tokenizer's vocabulary"),
    (dict(initializer_token=""), ConfigError, "initializer_token is required"),
    (dict(learnable_property="colour"), ConfigError, "use object or style"),
])
def test_bad_settings_are_clear_errors(sd1_dir, data_dir, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        _run(_cfg(sd1_dir, data_dir, tmp_path / "x", **kw))


def test_bad_folders_are_clear_errors(sd1_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        _run(_cfg(sd1_dir, tmp_path / "empty", tmp_path / "x"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"nope")
    (tmp_path / "bad" / "b.webp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="none of its 2 image files could be read"):
        _run(_cfg(sd1_dir, tmp_path / "bad", tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _run(_cfg(sd1_dir, tmp_path / "missing", tmp_path / "x"))


def test_an_embedding_of_another_width_is_refused_on_load(sd1_dir, tmp_path):
    write_embeddings(tmp_path / "wide.safetensors", {"<w>": torch.zeros(1, 1024)})
    with pytest.raises(ModelError, match="1024 wide but this model's text encoder is 32 wide"):
        Pipeline.from_pretrained(sd1_dir).load_embedding(tmp_path / "wide.safetensors")


def test_generate_with_several_embeddings_and_token_names(sd1_dir, tmp_path, capsys):
    dim = load_model(sd1_dir).text_encoder.config.hidden_size
    write_embeddings(tmp_path / "a.safetensors", {"<a>": torch.ones(1, dim)})
    write_a1111(tmp_path / "b.pt", "<b>", torch.ones(2, dim))
    out = tmp_path / "img.png"
    rc = main(["generate", "<x> next to <y>", "--model", str(sd1_dir), "--output", str(out), "--steps", "2",
               "--embedding", str(tmp_path / "a.safetensors"), "--embedding", str(tmp_path / "b.pt"),
               "--token", "<x>", "--token", "<y>", "--quiet"])
    assert rc == 0 and Image.open(out).size == (64, 64)
    rc = main(["generate", "x", "--model", str(sd1_dir), "--output", str(out), "--steps", "2",
               "--embedding", str(tmp_path / "a.safetensors"), "--embedding", str(tmp_path / "b.pt"),
               "--token", "<x>", "--quiet"])
    assert rc == 2 and "got 1 --token for 2 --embedding" in capsys.readouterr().err


def test_paired_counts_and_the_exact_sign_test():
    from shapes.demos import paired

    rows = lambda bits: [{"all": bool(b)} for b in bits]  # noqa: E731
    # 10 images only the first got right, none only the second: p = 2 * (1/2)^10
    got = paired(rows([1] * 10 + [1, 0, 0]), rows([0] * 10 + [1, 0, 1]))
    assert (got["first_only"], got["second_only"], got["both"], got["neither"]) == (10, 1, 1, 1)
    assert got["sign_test_p"] == pytest.approx(2 * (1 + 11) / 2**11)  # P(X <= 1) + P(X >= 10), X ~ B(11, 1/2)
    assert paired(rows([1, 0]), rows([1, 0]))["sign_test_p"] == 1.0  # no image where they differ


def test_the_demo_renders_trains_and_judges_both_prompts(sd1_dir, tmp_path):
    import json

    from shapes.demos import TI_TRAIN, textual_inversion_demo

    report = textual_inversion_demo(tmp_path, model=str(sd1_dir), per_case=1, max_steps=2,
                                    overrides={"batch_size": 2, "ema_decay": 0.0}, progress=False)
    pngs = sorted(p for p in (tmp_path / "data").glob("*.png") if not p.stem.endswith(".mask"))
    assert len(pngs) == len(TI_TRAIN) == 5
    for p, (size, bg) in zip(pngs, TI_TRAIN):
        assert p.with_suffix(".txt").read_text().strip() == f"a {size} {{}} on a {bg} background"
        r = shapes.detect(Image.open(p))
        assert (r.size, r.color, r.shape, r.background) == (size, "orange", "star", bg)
        # the mask beside it (for --set mask_weight=W) is white exactly where the image is not background
        img = np.asarray(Image.open(p).convert("RGB")).astype(int)
        mask = np.asarray(Image.open(p.with_name(p.stem + ".mask.png")))
        assert np.array_equal(mask == 255, np.abs(img - shapes.PALETTE[bg]).sum(-1) > 0)
    rows = report["rows"]
    assert len(rows["words"]) == len(rows["embedding"]) == 16  # 2 sizes x 8 backgrounds
    assert rows["words"][0]["prompt"].startswith("a small orange star on a")
    assert "<concept>" in rows["embedding"][0]["prompt"]
    assert [r["seed"] for r in rows["words"]] == [r["seed"] for r in rows["embedding"]]
    assert report["words"]["all_correct"] == np.mean([r["all"] for r in rows["words"]])
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 2
    pv = report["embedding_vs_words"]
    assert pv["first_only"] + pv["second_only"] + pv["both"] + pv["neither"] == 16
    assert pv["both"] + pv["first_only"] == sum(r["all"] for r in rows["embedding"])
    assert (tmp_path / "embedding" / "learned_embeds.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two processes on one GPU: this test runs them as two "
                                                            "CPU processes (gloo), or on two GPUs")
def test_two_processes_under_accelerate_launch(sd1_dir, data_dir, tmp_path, free_port):
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), "-m", "pipelines.cli", "textual-inversion",
           "--model", str(sd1_dir), "--data-dir", str(data_dir), "--initializer-token", "star",
           "--output-dir", str(tmp_path), "--max-steps", "3", "--batch-size", "2", "--quiet"]
    r = subprocess.run(cmd, env=dict(os.environ), capture_output=True, timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert json.loads((tmp_path / "train_summary.json").read_text())["processes"] == 2
    vec = read_embeddings(tmp_path / "learned_embeds.safetensors")["<concept>"]
    init = load_model(sd1_dir).text_encoder.get_input_embeddings().weight[0:1]
    assert vec.shape == (1, init.shape[1]) and torch.isfinite(vec).all()


def test_the_command_takes_its_flags_list_valued_ones_included(sd1_dir, data_dir, tmp_path):
    rc = main(["textual-inversion", "--model", str(sd1_dir), "--data-dir", str(data_dir), "--initializer-token", "star",
               "--output-dir", str(tmp_path), "--max-steps", "2", "--batch-size", "2", "--num-vectors", "2",
               "--random-flip", "--validation-prompts", "a {}", "a {} on a red background", "--quiet"])
    assert rc == 0
    grid = Image.open(tmp_path / "validation" / "step-2" / "samples-0.png")
    assert grid.size == (2 * 2 * 64, 64)  # two prompts, two images each
    assert read_embeddings(tmp_path / "learned_embeds.safetensors")["<concept>"].shape[0] == 2


def test_on_sdxl_the_token_learns_in_both_encoders_and_its_file_loads_here_and_in_diffusers(sdxl_dir, data_dir,
                                                                                             tmp_path):
    """Textual inversion on a tiny SDXL: the token goes into both tokenizers and both embedding tables,
    only its rows move, and the saved {clip_l, clip_g} file (named after the token, as A1111 and ComfyUI
    name SDXL embeddings) gives the same image through ldm generate --embedding and through diffusers'
    load_textual_inversion once per encoder."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    obj, _ = _run(_cfg(sdxl_dir, data_dir, tmp_path / "ti", placeholder_token="<shiny>", num_vectors=2))
    fresh = load_model(sdxl_dir)
    for name in ("text_encoder", "text_encoder_2"):
        before = getattr(fresh, name).get_input_embeddings().weight
        after = getattr(obj.model, name).get_input_embeddings().weight
        assert torch.equal(after[:before.shape[0]], before), name  # every old row as it was
    f = tmp_path / "ti" / "shiny.safetensors"
    rows = load_file(str(f))
    assert set(rows) == {"clip_l", "clip_g"} and rows["clip_l"].shape[0] == rows["clip_g"].shape[0] == 2
    assert not torch.equal(rows["clip_g"], obj.model.text_encoder_2.get_input_embeddings().weight[:2])
    out = tmp_path / "x.png"
    assert main(["generate", "a large <shiny> on a blue background", "--model", str(sdxl_dir), "--embedding", str(f),
                 "--steps", "3", "--guidance", "5", "--seed", "1", "--sampler", "euler", "--output", str(out),
                 "--quiet"]) == 0
    ref = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    ref.scheduler = __import__("diffusers").EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for key, enc, tok in (("clip_l", ref.text_encoder, ref.tokenizer), ("clip_g", ref.text_encoder_2, ref.tokenizer_2)):
        ref.load_textual_inversion(rows[key], token=["<shiny>", "<shiny>_1"], text_encoder=enc, tokenizer=tok)
    expect = ref("a large <shiny> on a blue background", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(1)).images[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255
    assert np.abs(got - expect).max() <= 2 / 255 + 1 / 255  # the PNG's rounding on top
