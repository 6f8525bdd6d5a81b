"""DreamBooth on a tiny random SD-layout model: the prior-preservation loss against a hand computation,
LoRA training changes only LoRA weights and loads in diffusers and in ours alike, saved directories
and checkpoints load in diffusers, class images are made once and reused, resume equals an
uninterrupted run, and bad settings are clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.config import ConfigError, build
from finetune.dreambooth import DreamBoothConfig, DreamBoothObjective
from finetune.loop import TrainingError, step_generator, train
from ldm.models import load_model
from pipelines.pipeline import Pipeline
from shapes import world as shapes


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(1)
    for i, bg in enumerate(["blue", "white", "black"]):
        shapes.render(shapes.place(rng, "large", "red", "circle", bg)).save(d / f"{i}.png")
    return d


def _cfg(sd1_dir, instance_dir, out, **kw):
    values = dict(model=str(sd1_dir), instance_data_dir=str(instance_dir), output_dir=str(out),
                  instance_prompt="a sks circle", class_prompt="a circle", max_steps=4, batch_size=2,
                  learning_rate=1e-3, checkpoint_every=2, report_to="none", overwrite=True, num_class_images=3,
                  sample_batch_size=2)
    values.update(kw)
    return build(DreamBoothConfig, values)


def _with_lora(ref, model_dir, lora, guidance: float):
    """Images of 'a sks circle' (3 steps, seed 2): ours before and after loading ``lora``, and diffusers'
    ``ref`` pipeline after its own load_lora_weights."""
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(lora.parent), weight_name=lora.name)
    theirs = ref("a sks circle", num_inference_steps=3, guidance_scale=guidance, output_type="pt",
                 generator=torch.Generator().manual_seed(2)).images
    pipe = Pipeline.from_pretrained(model_dir)
    before = pipe.text_to_image("a sks circle", steps=3, guidance_scale=guidance, seed=2).pixels
    pipe.load_lora(lora)
    return before, pipe.text_to_image("a sks circle", steps=3, guidance_scale=guidance, seed=2).pixels, theirs


def _run(cfg):
    obj = DreamBoothObjective(cfg)
    return obj, train(obj, cfg, progress=False)


def test_prior_loss_is_the_class_loss_times_the_weight(sd1_dir, instance_dir, tmp_path):
    from types import SimpleNamespace

    cfg = _cfg(sd1_dir, instance_dir, tmp_path, with_prior_preservation=True, prior_loss_weight=0.3)
    obj = DreamBoothObjective(cfg)
    # a stand-in: a real Accelerator(cpu=True) would pin accelerate's process-wide state to the CPU
    trainable = obj.setup(SimpleNamespace(device=torch.device("cpu"), is_main_process=True, process_index=0, num_processes=1,
                              wait_for_everyone=lambda: None))
    batch = obj.batch(5, step_generator(0, 5, 0), 0, 1)
    assert batch["kinds"] == ["instance"] * 2 + ["class"] * 2
    loss, logs = obj.loss(batch, trainable, torch.Generator().manual_seed(11))
    # by hand: the same draws (timesteps, then noise), DDPM's forward process, the MSE of epsilon
    g = torch.Generator().manual_seed(11)
    x0 = batch["latents"]
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = obj.model.schedule.alphas_cumprod[t].view(4, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    m = obj.model
    hidden = torch.cat([m.text_encoder(m.tokenizer([p], padding="max_length", max_length=m.tokenizer.model_max_length,
                                                   return_tensors="pt").input_ids)[0]
                        for p in ["a sks circle"] * 2 + ["a circle"] * 2])
    with torch.no_grad():
        per = (m.unet(xt, t, hidden).sample - eps).pow(2).mean(dim=(1, 2, 3))
    instance, prior = per[:2].mean(), per[2:].mean()
    assert loss.item() == pytest.approx((instance + 0.3 * prior).item(), rel=1e-5)
    assert float(logs["prior"]) == pytest.approx(prior.item(), rel=1e-5)
    assert float(logs["instance"]) == pytest.approx(instance.item(), rel=1e-5)


def test_full_fine_tune_saves_a_model_that_diffusers_loads_and_every_checkpoint_is_one(sd1_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    _run(_cfg(sd1_dir, instance_dir, tmp_path / "out"))
    for d in (tmp_path / "out", tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-4"):
        pipe = StableDiffusionPipeline.from_pretrained(str(d), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        img = pipe("a sks circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
        assert np.isfinite(img.images).all()
        assert Pipeline.from_pretrained(d).text_to_image("a sks circle", steps=2, seed=0).pixels.isfinite().all()
    trained = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_model(sd1_dir).unet.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in trained.items())  # the U-Net did train


def test_lora_changes_only_lora_weights_and_loads_alike_in_diffusers_and_ours(sd1_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    obj, _ = _run(_cfg(sd1_dir, instance_dir, tmp_path / "lora", lora_rank=4, train_text_encoder=True))
    fresh = load_model(sd1_dir)
    for name in ("unet", "text_encoder"):
        base = getattr(fresh, name).state_dict()
        for k, v in getattr(obj.model, name).state_dict().items():
            if "lora" not in k:
                assert torch.equal(v.cpu(), base[k.replace(".base_layer", "")]), (name, k)
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    saved = load_file(str(lora))
    assert saved and all("lora" in k for k in saved)
    assert any(k.startswith("text_encoder.") for k in saved) and any(k.startswith("unet.") for k in saved)
    assert (tmp_path / "lora" / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    ref = StableDiffusionPipeline.from_pretrained(str(sd1_dir), safety_checker=None, requires_safety_checker=False)
    before, ours, theirs = _with_lora(ref, sd1_dir, lora, guidance=7.5)
    assert (ours - theirs).abs().max() < 1e-3
    assert (before - theirs).abs().max() > (ours - theirs).abs().max() * 10


def test_class_images_are_generated_once_and_reused_and_other_sizes_resized(sd1_dir, instance_dir, tmp_path, caplog):
    from PIL import Image

    cls = tmp_path / "class"
    cls.mkdir()
    Image.new("RGB", (80, 48), (200, 30, 30)).save(cls / "mine.png")  # another size: resized, not rejected
    obj, _ = _run(_cfg(sd1_dir, instance_dir, tmp_path / "a", with_prior_preservation=True, class_data_dir=str(cls),
                       max_steps=1))
    files = sorted(cls.glob("*.png"))
    assert len(files) == 3 and obj.klass.shape[0] == 3 and obj.klass.shape[-1] == 8
    stamps = {p: p.stat().st_mtime_ns for p in files}
    import logging
    with caplog.at_level(logging.INFO):
        _run(_cfg(sd1_dir, instance_dir, tmp_path / "b", with_prior_preservation=True, class_data_dir=str(cls),
                  max_steps=1))
    assert {p: p.stat().st_mtime_ns for p in sorted(cls.glob("*.png"))} == stamps
    assert any("none to generate" in r.getMessage() for r in caplog.records)


def test_class_images_are_shared_out_over_processes_each_made_once(sd1_dir, tmp_path):
    """Under accelerate launch each process makes its share (pipelines.batch, as ldm generate
    --from-file does): ranks 0 and 1 of 2 together make every missing image once, and the images are
    the ones one process alone makes."""
    from finetune.dreambooth import generate_class_images
    from pipelines.pngmeta import read_parameters

    model = load_model(sd1_dir)
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    shared.mkdir()
    (shared / "mine.png").write_bytes(b"")  # an image the user put there counts toward the 6 (not opened here)
    models = [model, load_model(sd1_dir)]  # one per rank, as processes have: a tokenizer is not thread-safe
    made = _two_ranks(lambda r, barrier: generate_class_images(models[r], "a dog", shared, 6, batch_size=2, rank=r,
                                                                 world=2, barrier=barrier))
    assert made == [3, 2]  # batches of seeds 0-1 and 4 on rank 0, 2-3 on rank 1
    names = sorted(p.name for p in shared.glob("class-*.png"))
    assert names == [f"class-{1_000_000 + i}.png" for i in range(5)]
    assert read_parameters(shared / names[0]).startswith("a dog\n")
    assert generate_class_images(model, "a dog", alone, 5, batch_size=2) == 5
    for n in names:
        a = np.asarray(Image.open(shared / n), dtype=np.int16)
        b = np.asarray(Image.open(alone / n), dtype=np.int16)
        assert np.array_equal(a, b)
    assert [generate_class_images(model, "a dog", shared, 6, batch_size=2, rank=r, world=2) for r in (0, 1)] == [0, 0]


def _two_ranks(fn):
    """fn(rank, barrier) for ranks 0 and 1 in two threads, with a barrier between them as
    accelerate's wait_for_everyone is between processes; their results in rank order."""
    import threading

    barrier, out = threading.Barrier(2, timeout=60), [None, None]

    def one(r):
        try:
            out[r] = fn(r, barrier.wait)
        except BaseException as exc:  # reported by the caller's assertion, not lost in the thread
            out[r] = exc
            barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_resume_equals_an_uninterrupted_run(sd1_dir, instance_dir, tmp_path):
    _run(_cfg(sd1_dir, instance_dir, tmp_path / "s", with_prior_preservation=True, class_data_dir=str(tmp_path / "c")))
    _run(_cfg(sd1_dir, instance_dir, tmp_path / "r", with_prior_preservation=True, class_data_dir=str(tmp_path / "c"),
              max_steps=2))
    _, summary = _run(_cfg(sd1_dir, instance_dir, tmp_path / "r", with_prior_preservation=True,
                           class_data_dir=str(tmp_path / "c"), resume=True, overwrite=False))
    assert summary["steps"] == 2
    a = load_file(str(tmp_path / "s" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "r" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _saved(directory, part):
    """The weights a full fine-tune saved for ``part`` (unet or text_encoder)."""
    name = "diffusion_pytorch_model" if part == "unet" else "model"
    return load_file(str(directory / part / f"{name}.safetensors"))


def _max_change(directory, base, part):
    ref = getattr(base, part).state_dict()
    return max((v - ref[k]).abs().max().item() for k, v in _saved(directory, part).items())


def test_text_encoder_lr_is_the_text_encoders_own_rate(sd1_dir, instance_dir, tmp_path):
    """Adam's first step moves each weight by its rate (the gradient over its own magnitude), so after
    one step the largest change of the text encoder is text_encoder_lr and the U-Net's learning_rate;
    a text_encoder_lr equal to learning_rate is the run without it, bit for bit."""
    base = load_model(sd1_dir)
    kw = dict(train_text_encoder=True, max_steps=1, learning_rate=1e-3, adam_weight_decay=0.0)
    _run(_cfg(sd1_dir, instance_dir, tmp_path / "own", text_encoder_lr=3e-3, **kw))
    assert _max_change(tmp_path / "own", base, "text_encoder") == pytest.approx(3e-3, rel=0.02)
    assert _max_change(tmp_path / "own", base, "unet") == pytest.approx(1e-3, rel=0.02)
    kw["max_steps"] = 3
    _run(_cfg(sd1_dir, instance_dir, tmp_path / "same", text_encoder_lr=1e-3, **kw))
    _run(_cfg(sd1_dir, instance_dir, tmp_path / "unset", **kw))
    for part in ("unet", "text_encoder"):
        a, b = _saved(tmp_path / "same", part), _saved(tmp_path / "unset", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("kw, match", [
    (dict(with_prior_preservation=True, class_prompt=""), "with_prior_preservation needs class_prompt"),
    (dict(text_encoder_lr=1e-5), "text_encoder_lr=1e-05 is set but train_text_encoder is off"),
    (dict(text_encoder_lr=-1.0, train_text_encoder=True), "text_encoder_lr=-1.0: must be >= 0"),
    (dict(instance_prompt=""), "instance_prompt is required"),
    (dict(lora_rank=-1), "lora_rank=-1: must be >= 0"),
])
def test_bad_settings_are_clear_errors(sd1_dir, instance_dir, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        _run(_cfg(sd1_dir, instance_dir, tmp_path, **kw))


def test_empty_instance_folder_is_a_clear_error(sd1_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="instance_data_dir .* holds no images"):
        _run(_cfg(sd1_dir, tmp_path / "empty", tmp_path / "out"))


@pytest.mark.parametrize("name, match", [("adamw8bit", "adamw8bit (needs bitsandbytes|runs on CUDA)"),
                                         ("sgd", "optimizer 'sgd' is unknown")])
def test_optimizer_choice_is_checked_before_any_model_is_loaded(sd1_dir, instance_dir, tmp_path, name, match):
    if name == "adamw8bit" and torch.cuda.is_available():
        pytest.skip("this machine can run 8-bit AdamW")
    cfg = _cfg(sd1_dir, instance_dir, tmp_path / "out", optimizer=name, with_prior_preservation=True,
               class_data_dir=str(tmp_path / "class"))
    with pytest.raises(TrainingError, match=match):
        _run(cfg)
    assert not (tmp_path / "class").exists()  # failed before class images were generated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="8-bit AdamW runs on CUDA")
def test_adamw8bit_trains_on_cuda(sd1_dir, instance_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    base = load_model(sd1_dir).unet.state_dict()
    obj, summary = _run(_cfg(sd1_dir, instance_dir, tmp_path / "out", optimizer="adamw8bit", max_steps=3,
                             checkpoint_every=0))
    assert summary["steps"] == 3 and np.isfinite(summary["last_loss"])
    tuned = load_model(tmp_path / "out").unet.state_dict()
    assert any(not torch.equal(base[k], tuned[k].to(base[k].dtype)) for k in base)


def test_the_demo_runs_end_to_end_on_a_tiny_model(sd1_dir, tmp_path):
    """`ldm demo dreambooth` in miniature: every stage runs, the three judged models exist and load,
    and the report holds both arms' figures for the asked number of images. The base model is used
    as it is (no decoder adaptation: the VAE is the model's general codec)."""
    from shapes.demos import DB_PRIOR_COLORS, dreambooth_demo

    from ldm.models import read_sampling_defaults, write_sampling_defaults

    # the base model with its own default of 3 sampling steps (the judged images are about half the
    # demo's time at the usual 30), which DreamBooth's models inherit
    base_dir = tmp_path / "base"
    shutil.copytree(sd1_dir, base_dir)
    write_sampling_defaults(base_dir, steps=3)
    out = tmp_path / "demo"
    report = dreambooth_demo(out, model=str(base_dir), per_case=1, prior_per_case=1, max_steps=2,
                             overrides={"num_class_images": 2, "sample_batch_size": 2, "batch_size": 1, "seed": 5},
                             progress=False)
    assert report["subject_images"] == len(shapes.BACKGROUNDS)
    assert report["prior_images"] == sum(b != c for c in DB_PRIOR_COLORS for b in shapes.BACKGROUNDS)
    for name in ("base", "with_prior", "without_prior"):
        for part in ("subject", "prior"):
            assert 0.0 <= report[name][part]["all_correct"] <= 1.0
    for d in ("with_prior", "without_prior"):
        assert load_model(out / d).unet is not None
        assert read_sampling_defaults(out / d)["steps"] == 3
        state = json.loads((out / d / "checkpoint-2" / "trainer_state.json").read_text())
        assert state["seed"] == 5  # --set seed=N: the training seed (the instance renders keep --seed)
    # DreamBooth trains the U-Net and the text encoder, never the VAE
    base, tuned = load_model(base_dir), load_model(out / "with_prior")
    assert all(torch.equal(a, b.to(a.dtype))
               for a, b in zip(base.vae.state_dict().values(), tuned.vae.state_dict().values()))
    assert (out / "report.json").is_file() and (out / "samples.png").is_file()


# --- SDXL ---------------------------------------------------------------------------------------

def test_crop_ids_are_the_original_size_and_the_scaled_crop_corner(tmp_path):
    from finetune.data import crop_ids

    data = [{"image": Image.new("RGB", (96, 64))}, {"image": Image.new("RGB", (64, 128))}]
    assert crop_ids(data, 64, center_crop=True) == [(64, 96, 0, 16), (128, 64, 32, 0)]
    assert crop_ids(data, 64, center_crop=False) == [(64, 96, 0, 0), (128, 64, 0, 0)]


def test_sdxl_lora_with_both_text_encoders_loads_alike_in_diffusers_and_ours(sdxl_dir, instance_dir, tmp_path):
    """DreamBooth LoRA on a tiny SDXL with prior preservation, both text encoders adapted: the saved file
    is in the layout StableDiffusionXLPipeline.load_lora_weights reads, and gives our image there."""
    from diffusers import StableDiffusionXLPipeline

    obj, _ = _run(_cfg(sdxl_dir, instance_dir, tmp_path / "lora", lora_rank=4, train_text_encoder=True,
                       with_prior_preservation=True))
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    saved = load_file(str(lora))
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}
    before, ours, theirs = _with_lora(StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir)), sdxl_dir, lora,
                                      guidance=5.0)
    assert (ours - theirs).abs().max() <= 2 / 255
    assert (before - ours).abs().max() > 1e-3  # training moved it


def test_sdxl_full_fine_tune_saves_an_sdxl_directory_every_checkpoint_too(sdxl_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    _run(_cfg(sdxl_dir, instance_dir, tmp_path / "full", with_prior_preservation=True))
    for d in (tmp_path / "full", tmp_path / "full" / "checkpoint-2", tmp_path / "full" / "checkpoint-4"):
        ref = StableDiffusionXLPipeline.from_pretrained(str(d))
        ref.set_progress_bar_config(disable=True)
        theirs = ref("a sks circle", num_inference_steps=2, guidance_scale=5.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
        ours = Pipeline.from_pretrained(d).text_to_image("a sks circle", steps=2, guidance_scale=5.0, seed=0).pixels
        assert (ours - theirs).abs().max() <= 2 / 255
    trained = load_model(tmp_path / "full").unet.state_dict()
    base = load_model(sdxl_dir).unet.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in trained.items())


def test_sdxl_training_conditions_on_each_images_size(sdxl_dir, tmp_path):
    """A 96x64 instance image, centre-cropped to 64: its size row is (64, 96, 0, 16, 64, 64)."""
    from types import SimpleNamespace

    d = tmp_path / "wide"
    d.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(d / "a.png")
    obj = DreamBoothObjective(_cfg(sdxl_dir, d, tmp_path / "o", center_crop=True))
    trainable = obj.setup(SimpleNamespace(device=torch.device("cpu"), is_main_process=True, process_index=0,
                                          num_processes=1, wait_for_everyone=lambda: None))
    batch = obj.batch(0, step_generator(0, 0, 0), 0, 1)
    assert batch["sizes"][0] == [64, 96, 0, 16, 64, 64]
    ctx = obj.context(batch["kinds"], batch["sizes"], trainable)
    assert ctx["time_ids"].tolist()[0] == [64.0, 96.0, 0.0, 16.0, 64.0, 64.0] and "text_embeds" in ctx
