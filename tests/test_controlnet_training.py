"""``ldm train-controlnet`` on tiny random SD-layout models: at step 0 the controlled model is the base
model (zero convolutions: the loss equals the plain denoising loss on the same batch), the result loads
in diffusers and in ``ldm generate``, folder and ``datasets`` data give the same run, resume equals an
uninterrupted run, a T2I-Adapter trains the same way, SDXL trains, and bad data is a clear error."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.common import denoising_loss
from finetune.config import ConfigError, ControlNetConfig, build
from finetune.controlnet import ControlNetObjective
from finetune.loop import step_generator, train
from pipelines.pipeline import Pipeline
from shapes import world as shapes


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """Four scenes: NAME.png, NAME.control.png (the silhouette), NAME.txt (the caption)."""
    d = tmp_path_factory.mktemp("pairs")
    for i in range(4):
        sc = shapes.free_scene(3, i)
        shapes.render(sc).save(d / f"{i}.png")
        shapes.render_condition(sc, "silhouette").save(d / f"{i}.control.png")
        (d / f"{i}.txt").write_text(sc.caption)
    return d


def _cfg(model_dir, out, **kw):
    values = dict(model=str(model_dir), output_dir=str(out), max_steps=2, batch_size=2, learning_rate=1e-3,
                  checkpoint_every=1, report_to="none", overwrite=True, conditioning_channels=[4, 8, 8, 16])
    values.update(kw)
    return build(ControlNetConfig, values)


def _run(cfg):
    obj = ControlNetObjective(cfg)
    return obj, train(obj, cfg, progress=False)


def test_at_step_zero_the_controlled_loss_is_the_base_models(sd1_dir, pairs_dir, tmp_path):
    """The ControlNet starts from the U-Net's encoder with zero convolutions: its residuals are zero, so
    the loss on a batch is the plain denoising loss of the base U-Net with the same noise and steps."""
    from accelerate import Accelerator

    obj = ControlNetObjective(_cfg(sd1_dir, tmp_path, data_dir=str(pairs_dir)))
    modules = obj.setup(Accelerator(cpu=True))
    batch = obj.batch(0, step_generator(0, 0, 0), 0, 1)
    ours, _ = obj.loss(batch, modules, step_generator(0, 0, 0))
    ctx = obj.context(batch["prompts"], batch["sizes"])
    plain = denoising_loss(obj.model.unet, batch["latents"], ctx, obj.model.schedule, step_generator(0, 0, 0))
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)
    assert batch["cond"].shape == (2, 3, 64, 64) and batch["cond"].dtype == torch.uint8
    ours.backward()  # the zero convolutions get a gradient (their inputs are not zero), so they move
    zero = modules["controlnet"].controlnet_mid_block.weight
    assert zero.abs().max() == 0 and zero.grad.abs().max() > 0


def test_a_trained_controlnet_loads_in_diffusers_and_in_ldm_generate(sd1_dir, pairs_dir, tmp_path, capsys):
    from diffusers import ControlNetModel

    from pipelines.cli import main

    out = tmp_path / "cn"
    _, summary = _run(_cfg(sd1_dir, out, data_dir=str(pairs_dir), validation_prompts=["a red circle"],
                             validation_images=[str(pairs_dir / "0.control.png")]))
    assert summary["steps"] == 2
    theirs = ControlNetModel.from_pretrained(out)
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in theirs.state_dict().items())
    assert theirs.controlnet_mid_block.weight.abs().max() > 0  # trained: the zero convolution moved
    assert (out / "checkpoint-1" / "config.json").is_file()  # every checkpoint is a ControlNet too
    grid = Image.open(next((out / "validation").rglob("samples-0.png")))
    assert grid.size == (128, 64)  # the condition beside the result
    assert main(["generate", "a red circle", "--model", str(sd1_dir), "--steps", "2", "--controlnet", str(out),
                 "--control-image", str(pairs_dir / "1.control.png"), "--output", str(tmp_path / "x.png")]) == 0
    assert Image.open(tmp_path / "x.png").size == (64, 64)


def test_a_datasets_dataset_trains_as_the_same_folder(sd1_dir, pairs_dir, tmp_path):
    """The same pairs as a ``datasets`` dataset (diffusers' column names renamed by the recipe keys) give
    the same batches, so the same weights."""
    import datasets

    rows = {"target": [], "hint": [], "prompt": []}
    for i in range(4):
        rows["target"].append(Image.open(pairs_dir / f"{i}.png").convert("RGB"))
        rows["hint"].append(Image.open(pairs_dir / f"{i}.control.png").convert("RGB"))
        rows["prompt"].append((pairs_dir / f"{i}.txt").read_text())
    features = datasets.Features({"target": datasets.Image(), "hint": datasets.Image(), "prompt": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    _run(_cfg(sd1_dir, tmp_path / "a", data_dir=str(pairs_dir)))
    _run(_cfg(sd1_dir, tmp_path / "b", dataset=str(tmp_path / "ds"), image_column="target",
              conditioning_image_column="hint", caption_column="prompt"))
    a = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="no column.*'conditioning_image'.*conditioning_image_column"):
        _run(_cfg(sd1_dir, tmp_path / "c", dataset=str(tmp_path / "ds"), image_column="target", caption_column="prompt"))


def test_resume_equals_an_uninterrupted_run(sd1_dir, pairs_dir, tmp_path):
    _run(_cfg(sd1_dir, tmp_path / "s", data_dir=str(pairs_dir), max_steps=4, checkpoint_every=2))
    _run(_cfg(sd1_dir, tmp_path / "r", data_dir=str(pairs_dir), max_steps=2, checkpoint_every=2))
    _, summary = _run(_cfg(sd1_dir, tmp_path / "r", data_dir=str(pairs_dir), max_steps=4, checkpoint_every=2,
                           resume=True, overwrite=False))
    assert summary["steps"] == 2
    a = load_file(str(tmp_path / "s" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "r" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_adapter_trains_and_runs(sd1_dir, pairs_dir, tmp_path):
    from diffusers import T2IAdapter

    out = tmp_path / "ad"
    _run(_cfg(sd1_dir, out, data_dir=str(pairs_dir), adapter=True))
    adapter = T2IAdapter.from_pretrained(out)
    pipe = Pipeline.from_pretrained(sd1_dir)
    cond = Image.open(pairs_dir / "0.control.png")
    base = pipe.text_to_image("a red circle", steps=2, seed=0).pixels
    res = pipe.text_to_image("a red circle", steps=2, seed=0, adapters=[{"model": str(out), "image": cond}]).pixels
    assert adapter.config.channels == list(pipe.model.unet.config.block_out_channels)
    assert not torch.equal(base, res)
    for adapter in (True, False):  # gradient checkpointing: the U-Net's (and the ControlNet's; an adapter has none)
        _run(_cfg(sd1_dir, tmp_path / f"gc-{adapter}", data_dir=str(pairs_dir), adapter=adapter, max_steps=1,
                  gradient_checkpointing=True))
        assert (tmp_path / f"gc-{adapter}" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="adapter_type 'huge' is unknown"):
        build(ControlNetConfig, {"adapter_type": "huge"})
    with pytest.raises(ConfigError, match="full_adapter_xl.*SD 1"):
        _run(_cfg(sd1_dir, tmp_path / "bad", data_dir=str(pairs_dir), adapter=True, adapter_type="full_adapter_xl"))


def test_sdxl_trains_a_controlnet(sdxl_dir, pairs_dir, tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "xl"
    _run(_cfg(sdxl_dir, out, data_dir=str(pairs_dir), max_steps=1))
    net = ControlNetModel.from_pretrained(out)
    assert net.config.addition_embed_type == "text_time"
    pipe = Pipeline.from_pretrained(sdxl_dir)
    res = pipe.text_to_image("a red circle", steps=2, seed=0,
                             controls=[{"model": str(out), "image": Image.open(pairs_dir / "0.control.png")}])
    assert np.isfinite(res.pixels.numpy()).all()


def test_bad_data_is_named_before_training(sd1_dir, pairs_dir, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    Image.open(pairs_dir / "0.png").save(lone / "a.png")
    with pytest.raises(ConfigError, match="no condition beside.*NAME.control.png"):
        _run(_cfg(sd1_dir, tmp_path / "o1", data_dir=str(lone)))
    with pytest.raises(ConfigError, match="give the training data once"):
        _run(_cfg(sd1_dir, tmp_path / "o2", data_dir=str(pairs_dir), dataset=str(pairs_dir)))
    with pytest.raises(ConfigError, match="give the training data once"):
        _run(_cfg(sd1_dir, tmp_path / "o3"))
    with pytest.raises(ConfigError, match="shapes_conditions: depth unknown"):
        _run(_cfg(sd1_dir, tmp_path / "o4", shapes_conditions=["depth"]))


def test_cubic_timestep_sampling_draws_mostly_high_noise():
    """t = (1 - u^3) T: P(t >= T/2) = P(u^3 <= 1/2) = 0.5^(1/3) = 0.794 (uniform: 0.5)."""
    from types import SimpleNamespace

    seen = []

    def unet(xt, t, hidden):
        seen.append(t)
        return SimpleNamespace(sample=torch.zeros_like(xt))

    from ldm.schedule import SD1_SCHEDULER, NoiseSchedule

    schedule = NoiseSchedule.from_config(SD1_SCHEDULER)
    x, h = torch.zeros(20000, 1, 1, 1), torch.zeros(20000, 1, 1)
    for how, want in (("cubic", 0.5 ** (1 / 3)), ("uniform", 0.5)):
        seen.clear()
        denoising_loss(unet, x, h, schedule, torch.Generator().manual_seed(0), timestep_sampling=how)
        assert (seen[0] >= 500).float().mean().item() == pytest.approx(want, abs=0.01)
    with pytest.raises(ConfigError, match="timestep_sampling 'cosine' is unknown"):
        build(ControlNetConfig, {"timestep_sampling": "cosine"})


@pytest.mark.parametrize("swap", [0.0, 0.5])
def test_shape_swap_names_another_shape_and_keeps_the_condition(tmp_path, swap):
    """shape_swap_prob: that often the caption names another shape than the scene's, while the condition
    (and the target) stay the scene's and the other words stay true; 0 never."""
    from accelerate import Accelerator

    from ldm.models import default_model_path

    cfg = _cfg(default_model_path(), tmp_path, shapes_conditions=["silhouette"], num_images=64, batch_size=64,
               shape_swap_prob=swap, uncond_prob=0.0, conditioning_channels=[4, 8, 8, 16])
    obj = ControlNetObjective(cfg)
    obj.setup(Accelerator(cpu=True))
    batch = obj.batch(0, step_generator(0, 0, 0), 0, 1)
    swapped = 0
    for k, (i, prompt) in enumerate(zip(batch["index"], batch["prompts"])):
        sc = obj.scenes[i]
        assert torch.equal(batch["cond"][k], torch.from_numpy(
            np.asarray(shapes.render_condition(sc, "silhouette")).copy()).permute(2, 0, 1))
        named = [s for s in shapes.SHAPES if s in prompt.split()]
        assert len(named) == 1 and all(w in shapes.SHAPES or w in sc.caption.split() for w in prompt.split())
        swapped += named[0] != sc.shape
    assert (swapped == 0) if swap == 0 else (0.3 <= swapped / 64 <= 0.7)


def test_log_uniform_sizes_follow_the_closed_form():
    """size_sampling log-uniform: P(side <= s) = ln((s + 0.5) / (lo - 0.5)) / ln((hi + 0.5) / (lo - 0.5)); the
    uniform draw's is (s - lo + 1) / (hi - lo + 1). 4,000 draws each, within 3 standard errors."""
    import math

    n, lo, hi = 4000, 10, 48
    for sizes, cdf in (("log-uniform", lambda s: math.log((s + 0.5) / (lo - 0.5)) / math.log((hi + 0.5) / (lo - 0.5))),
                       ("uniform", lambda s: (s - lo + 1) / (hi - lo + 1))):
        sides = np.array([shapes.free_scene(0, i, lo, hi, sizes=sizes).s for i in range(n)])
        assert sides.min() >= lo and sides.max() <= hi
        for s in (14, 18, 26, 40):
            p = cdf(s)
            assert abs((sides <= s).mean() - p) < 3 * math.sqrt(p * (1 - p) / n), (sizes, s)
    with pytest.raises(ValueError, match="sizes must be uniform or log-uniform"):
        shapes.free_scene(0, 0, sizes="normal")
