"""Single files whose networks are not the released sizes, read with configs from their tensors
(ldm.layouts): the released layouts read back as the shipped configs (full size, on the meta device);
small SD 1.x, 2.x and SDXL files, and ones cut as BK-SDM and SSD-1B cut theirs, give the image of the
models they were written from, with no --model-config."""

import pytest
import torch

from ldm.checkpoints import CONFIGS, CheckpointError, ldm_state_dict, load_single_file, to_single_file
from ldm.models import Model, load_model
from ldm.tiny import build_checkpoint
from pipelines.pipeline import Pipeline


def _shipped(arch):
    """The shipped config's networks for ``arch``, on the meta device (no memory, full size)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = CONFIGS / arch
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(d / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(d / "vae")))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(d / "text_encoder"))) \
            if (d / "text_encoder").is_dir() else None
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(d / "text_encoder_2"))) \
            if (d / "text_encoder_2").is_dir() else None
    return unet, vae, te, te2


@pytest.mark.parametrize("arch", ["sd1", "sd1-inpaint", "sd2", "sdxl", "sdxl-refiner"])
def test_released_layouts_read_back_as_the_shipped_configs(arch):
    """The tensors of a released-size file (written from the shipped config's networks) give every network
    the same parameters, name by name and shape by shape, as the shipped config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from ldm import layouts
    from ldm.checkpoints import REFINER_TEXT, SD1_TEXT, SD2_TEXT, SDXL_TEXT_1, SDXL_TEXT_2

    unet, vae, te, te2 = _shipped(arch)
    sd = ldm_state_dict(unet, vae, te, te2)
    family = arch.replace("-inpaint", "")
    texts = {"sd1": [(te, SD1_TEXT, False)], "sd2": [(te, SD2_TEXT, True)],
             "sdxl": [(te, SDXL_TEXT_1, False), (te2, SDXL_TEXT_2, True)],
             "sdxl-refiner": [(te2, REFINER_TEXT, True)]}[family]
    pooled = None
    for enc, prefix, open_clip in texts:
        cfg = layouts.text_config(sd, prefix, enc.config.to_dict(), open_clip)
        assert all(cfg[k] == getattr(enc.config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
            "vocab_size", "projection_dim")), prefix
        pooled = cfg["projection_dim"] if open_clip and family.startswith("sdxl") else pooled
        assert CLIPTextConfig(**cfg).hidden_act == enc.config.hidden_act
    for net, cfg in ((unet, layouts.unet_config(sd, dict(unet.config), family, pooled)),
                     (vae, layouts.vae_config(sd, dict(vae.config)))):
        cls = UNet2DConditionModel if net is unet else AutoencoderKL
        with torch.device("meta"):
            again = cls.from_config(cfg)
        assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in net.state_dict().items()}
        if net is unet:  # and the same attention split: heads of the released models
            heads = lambda m: [a.heads for n, a in m.named_modules() if n.endswith("attn1")]  # noqa: E731
            assert heads(again) == heads(net)


def _cut(model: Model, **changes) -> Model:
    """``model`` with a U-Net of its config plus ``changes``, random weights (every one drawn, so each block
    acts), the way distilled variants cut theirs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(11)
    unet = UNet2DConditionModel.from_config({**dict(model.unet.config), **changes})
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05 if p.ndim > 1 else 0.02)
    import dataclasses

    return dataclasses.replace(model, unet=unet)


CASES = {
    "sd1": ("sd1", {}),
    "sd2": ("sd2", {}),
    "sdxl": ("sdxl", {}),
    # BK-SDM: one resnet per level, no middle block
    "bk-sdm": ("sd1", dict(layers_per_block=1, mid_block_type=None)),
    # SSD-1B / Vega: fewer transformer blocks, and up blocks that keep fewer than the down ones
    "ssd-1b": ("sdxl", dict(transformer_layers_per_block=[1, 3],
                            reverse_transformer_layers_per_block=[[3, 1], [1, 1]])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_small_and_cut_files_load_without_a_config(tmp_path, case):
    kind, changes = CASES[case]
    d = build_checkpoint(tmp_path / "m", kind, size="small", seed=3)
    model = load_model(d)
    if changes:
        model = _cut(model, **changes)
    f = to_single_file(model, tmp_path / "m.safetensors")
    parts, arch, _ = load_single_file(f)
    assert arch == kind
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the same networks, tensor by tensor
        mine = getattr(model, name)
        if mine is not None:
            theirs = parts[name].state_dict()
            assert all(torch.equal(v, theirs[k]) for k, v in mine.state_dict().items() if not k.endswith("position_ids"))
            assert len(theirs) == len(mine.state_dict())
    kw = dict(steps=3, seed=2, guidance_scale=5.0, width=64, height=64)  # (no tensor holds the native size)
    ref = Pipeline(model).text_to_image("a red circle", **kw)
    got = Pipeline.from_pretrained(f).text_to_image("a red circle", **kw)
    assert (got.pixels - ref.pixels).abs().max() <= 1e-4


def test_a_file_no_reading_explains_says_what_was_found(tmp_path):
    from safetensors.torch import load_file, save_file

    d = build_checkpoint(tmp_path / "m", "sd1", size="small", seed=3)
    sd = load_file(str(to_single_file(load_model(d), tmp_path / "m.safetensors")))
    # a second resnet in the first level only (the blocks after it shifted on): levels of different depth
    import re

    def shift(k):
        m = re.match(r"(model\.diffusion_model\.input_blocks\.)(\d+)(\..*)", k)
        return k if m is None or int(m.group(2)) < 2 else f"{m.group(1)}{int(m.group(2)) + 1}{m.group(3)}"

    bad = {shift(k): v for k, v in sd.items()}
    bad.update({k.replace("input_blocks.1.", "input_blocks.2."): v.clone() for k, v in sd.items()
                if ".input_blocks.1." in k})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"U-Net read from its tensors: widths \[64, 128\], resnets per level \[2, 1\].*give --model-config"):
        load_single_file(tmp_path / "bad.safetensors")
