"""The configuration of a single-file checkpoint's networks, read from its tensors' shapes and counts
(as ComfyUI's model detection reads them), so that files whose widths or depths are not the released
SD 1.x / 2.x / SDXL ones (distilled SDXL variants such as SSD-1B and Vega, BK-SDM, small fine-tuned
layouts) load without a ``--model-config`` directory.

Each reader starts from the shipped config of the detected family and overrides what the tensors
say: the U-Net's widths per level, resnets per level, which levels attend and with how many
transformer blocks (down, up and middle), the cross-attention width, linear or convolutional
projections, the time-embedding and SDXL's added-condition widths; the VAE's widths, depth and latent
channels; each text encoder's width, depth, MLP width, context length and projection. What no
tensor holds follows the family's convention, as ComfyUI assumes it: SD 1.x attends with 8 heads,
SD 2.x and SDXL with heads of 64 channels, CLIP text encoders with heads of 64 channels; group norms
take 32 groups (fewer where a width is not a multiple of 32). A tensor layout that these readings do
not explain is a CheckpointError that says what was found.
"""
from __future__ import annotations

import re

# the key prefixes of the original (LDM / A1111 / ComfyUI) single-file layout
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_1 = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
REFINER_TEXT = "conditioner.embedders.0.model."

GROUPS = (32, 16, 8, 4, 2, 1)


class CheckpointError(ValueError):
    """A single file that cannot be read as a Stable Diffusion checkpoint, with what was found."""


def _count(keys, prefix: str) -> int:
    """How many numbered children ``prefix`` has (``prefix.N.``)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _groups(channels) -> int:
    return next(g for g in GROUPS if all(c % g == 0 for c in channels))


def unet_config(sd: dict, base: dict, family: str, pooled_width: int | None = None) -> dict:
    """The U-Net's diffusers config from the original (LDM) keys under ``model.diffusion_model.``;
    ``base`` the family's shipped config; ``pooled_width`` SDXL's pooled text width (the second
    encoder's projection), which with the added-condition input width gives the time ids' width."""
    keys = [k for k in sd if k.startswith(UNET)]
    P = UNET
    shape = lambda k: tuple(sd[P + k].shape)  # noqa: E731
    if P + "input_blocks.0.0.weight" not in sd:
        raise CheckpointError("no U-Net input convolution (model.diffusion_model.input_blocks.0.0.weight)")
    c0, in_ch = shape("input_blocks.0.0.weight")[:2]

    def attention(block: str) -> int:  # transformer blocks of a U-Net block's attention (0: none)
        if P + f"{block}.1.proj_in.weight" not in sd:
            return 0
        return _count(keys, P + f"{block}.1.transformer_blocks.")

    levels, level = [], []
    for i in range(1, _count(keys, P + "input_blocks.")):
        if P + f"input_blocks.{i}.0.op.weight" in sd:  # a downsampler ends the level
            levels.append(level)
            level = []
            continue
        level.append((shape(f"input_blocks.{i}.0.out_layers.3.weight")[0], attention(f"input_blocks.{i}")))
    levels.append(level)
    if not all(levels):
        raise CheckpointError(f"a U-Net level without resnets (input blocks per level: {[len(v) for v in levels]})")
    channels = [lv[0][0] for lv in levels]
    found = (f"U-Net read from its tensors: widths {channels}, resnets per level {[len(lv) for lv in levels]}, "
             f"transformer blocks per resnet {[[a for _, a in lv] for lv in levels]}")
    if any(c != lv[0][0] or a != lv[0][1] for lv in levels for c, a in lv):
        raise CheckpointError(f"a U-Net level whose resnets differ in width or attention ({found}); no diffusers "
                              "layout holds that")
    layers = [len(lv) for lv in levels]
    if len(set(layers)) > 1:  # (diffusers' U-Net takes them, but not its converter from the original keys)
        raise CheckpointError(f"{found}: levels of different resnet counts are not read here; give --model-config "
                              "a diffusers directory of this layout")
    down_tf = [lv[0][1] for lv in levels]

    up, j = [], 0  # output blocks: layers + 1 per level, deepest level first
    for n in reversed(layers):
        up.append([attention(f"output_blocks.{j + k}") for k in range(n + 1)])
        j += n + 1
    if _count(keys, P + "output_blocks.") != j:
        raise CheckpointError(f"{found}; expected {j} output blocks for that, found "
                              f"{_count(keys, P + 'output_blocks.')}")
    has_mid = any(k.startswith(P + "middle_block.") for k in keys)
    mid_tf = attention("middle_block") if has_mid else 0
    attn_key = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)

    cfg = dict(base)
    n = len(levels)
    cfg.update(
        in_channels=in_ch, out_channels=shape("out.2.weight")[0], block_out_channels=channels,
        layers_per_block=layers[0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_tf],
        up_block_types=["CrossAttnUpBlock2D" if any(u) else "UpBlock2D" for u in up],
        norm_num_groups=_groups(channels))
    if any(down_tf) or any(any(u) for u in up) or mid_tf:
        # a level that does not attend keeps a count all the same (unused): the middle block's, which diffusers
        # reads from the deepest level
        fill = mid_tf or max(down_tf) or 1
        cfg["transformer_layers_per_block"] = [a or fill for a in down_tf]
        expected_up = [[a] * (layers[n - 1 - i] + 1) for i, a in enumerate(reversed(cfg["transformer_layers_per_block"]))]
        actual_up = [[a or e for a, e in zip(u, ex)] for u, ex in zip(up, expected_up)]
        cfg["reverse_transformer_layers_per_block"] = None if actual_up == expected_up else actual_up
        if attn_key is not None:
            cfg["cross_attention_dim"] = tuple(sd[attn_key].shape)[1]
        proj = next(k for k in keys if k.endswith(".1.proj_in.weight"))
        cfg["use_linear_projection"] = sd[proj].ndim == 2
    if not has_mid:
        cfg["mid_block_type"] = None
    elif mid_tf:
        cfg["mid_block_type"] = "UNetMidBlock2DCrossAttn"
        if mid_tf != cfg["transformer_layers_per_block"][-1]:
            raise CheckpointError(f"{found}, middle block {mid_tf}: diffusers' middle block takes the deepest "
                                  "level's transformer count, and these differ")
    else:
        cfg["mid_block_type"] = "UNetMidBlock2D"
    cfg["attention_head_dim"] = 8 if family == "sd1" else [max(c // 64, 1) for c in channels]
    cfg.pop("num_attention_heads", None)
    time_dim = shape("time_embed.0.weight")[0]
    cfg["time_embedding_dim"] = None if time_dim == 4 * c0 else time_dim
    if P + "label_emb.0.0.weight" in sd:  # SDXL's added conditions: pooled text + time ids
        width = shape("label_emb.0.0.weight")[1]
        cfg["projection_class_embeddings_input_dim"] = width
        n_ids = 5 if family == "sdxl-refiner" else 6
        if pooled_width is not None and (width - pooled_width) % n_ids == 0 and width > pooled_width:
            cfg["addition_time_embed_dim"] = (width - pooled_width) // n_ids
    return cfg


def vae_config(sd: dict, base: dict) -> dict:
    """The VAE's diffusers config from the original keys under ``first_stage_model.``."""
    keys = [k for k in sd if k.startswith(VAE)]
    E = VAE + "encoder."
    n = _count(keys, E + "down.")
    if n == 0:
        raise CheckpointError("no VAE encoder (first_stage_model.encoder.down.*)")
    channels = [tuple(sd[E + f"down.{i}.block.0.conv2.weight"].shape)[0] for i in range(n)]
    cfg = dict(base)
    cfg.update(block_out_channels=channels, layers_per_block=_count(keys, E + "down.0.block."),
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
               in_channels=tuple(sd[E + "conv_in.weight"].shape)[1],
               out_channels=tuple(sd[VAE + "decoder.conv_out.weight"].shape)[0],
               latent_channels=tuple(sd[VAE + "decoder.conv_in.weight"].shape)[1], norm_num_groups=_groups(channels))
    return cfg


def text_config(sd: dict, prefix: str, base: dict, open_clip: bool) -> dict:
    """A CLIP text encoder's config (transformers' CLIPTextConfig fields) from its keys under ``prefix``:
    Hugging Face names (``text_model.*``, SD 1.x and SDXL's first) or open_clip's (SD 2.x, SDXL's
    second). A layer count one above the shipped one is the released file's unused last block (SD 2.x
    reads the penultimate layer), which the shipped config leaves out."""
    keys = [k for k in sd if k.startswith(prefix)]
    if open_clip:
        vocab, width = sd[prefix + "token_embedding.weight"].shape
        context = sd[prefix + "positional_embedding"].shape[0]
        layers = _count(keys, prefix + "transformer.resblocks.")
        mlp = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        proj = sd[prefix + "text_projection"].shape[-1] if prefix + "text_projection" in sd else None
    else:
        t = prefix + "text_model."
        vocab, width = sd[t + "embeddings.token_embedding.weight"].shape
        context = sd[t + "embeddings.position_embedding.weight"].shape[0]
        layers = _count(keys, t + "encoder.layers.")
        mlp = sd[t + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        proj = None
    cfg = dict(base)
    if layers == base.get("num_hidden_layers", -1) + 1:
        layers = base["num_hidden_layers"]
    if width != base.get("hidden_size"):
        cfg["num_attention_heads"] = max(width // 64, 1)
    cfg.update(vocab_size=int(vocab), hidden_size=int(width), max_position_embeddings=int(context),
               num_hidden_layers=layers, intermediate_size=int(mlp))
    if proj is not None:
        cfg["projection_dim"] = int(proj)
    return cfg
