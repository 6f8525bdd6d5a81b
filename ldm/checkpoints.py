"""Single-file checkpoints in the original (LDM / AUTOMATIC1111 / ComfyUI) key layout, both ways.

One ``.safetensors`` holds every part under the original model's prefixes: the U-Net under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoders under
``cond_stage_model.`` (SD 1.x: CLIP ViT-L as transformers names it; SD 2.x: OpenCLIP ViT-H in its
own names) or ``conditioner.embedders.N.`` (SDXL: ViT-L, then OpenCLIP bigG; the refiner has bigG
alone). The architecture is read from the keys (:func:`detect`).

Export (:func:`to_single_file`) renames diffusers' parameters into that layout: the U-Net's blocks by
their position in the original ``input_blocks`` / ``output_blocks`` lists, the VAE's reversed
decoder and 1x1-convolution attention, OpenCLIP's fused q/k/v projection. Import converts back with
diffusers' own converters and loads the weights into models built from a diffusers config (the
checkpoint's own, or one shipped in ``ldm/assets/configs`` for the real architectures).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .layouts import (REFINER_TEXT, SD1_TEXT, SD2_TEXT, SDXL_TEXT_1, SDXL_TEXT_2, UNET, VAE,  # noqa: F401
                      CheckpointError)

# resnet parameter names: diffusers -> original
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}


# --- which architecture ---------------------------------------------------------------------------
def detect(keys, shapes: dict | None = None) -> str:
    """The architecture of a single-file checkpoint from its key names (and the U-Net's input width):
    sd1, sd1-inpaint, sd2, sd2-inpaint, sdxl, sdxl-inpaint or sdxl-refiner. An unknown layout is a
    CheckpointError naming the key prefixes found."""
    keys = set(keys)
    shapes = shapes or {}
    inpaint = shapes.get(UNET + "input_blocks.0.0.weight", (0, 4))[1] == 9
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET):
        raise CheckpointError(_unknown(keys, "no U-Net under 'model.diffusion_model.'"))
    if has(SDXL_TEXT_2):
        return "sdxl-inpaint" if inpaint else "sdxl"
    if has(REFINER_TEXT):
        return "sdxl-refiner"
    if has(SD2_TEXT):
        return "sd2-inpaint" if inpaint else "sd2"
    if has(SD1_TEXT):
        return "sd1-inpaint" if inpaint else "sd1"
    raise CheckpointError(_unknown(keys, "a U-Net but no text encoder this project knows"))


def _unknown(keys, what: str) -> str:
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(prefixes[:12]) + (f", ... ({len(prefixes)} in all)" if len(prefixes) > 12 else "")
    return (f"not a Stable Diffusion checkpoint this project reads ({what}); key prefixes found: {shown or 'none'}. "
            "Known layouts: SD 1.x, SD 2.x, SDXL base and refiner in the original (LDM / AUTOMATIC1111) keys")


# --- diffusers -> original ------------------------------------------------------------------------
def unet_to_ldm(sd: dict, config: dict) -> dict:
    """A diffusers U-Net state dict as the original ``model.diffusion_model.`` keys."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise CheckpointError("a U-Net with a different number of layers per block has no original layout")
    up_has_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        out[UNET + _unet_key(key, layers, up_has_attn)] = value
    return out


def _unet_key(key: str, L: int, up_has_attn: list[bool]) -> str:
    for d, o in _UNET_TOP.items():
        if key.startswith(d + "."):
            return o + key[len(d):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        idx = 1 + i * (L + 1) + j if kind == "down" else i * (L + 1) + j
        blocks = "input_blocks" if kind == "down" else "output_blocks"
        return f"{blocks}.{idx}.{0 if part == 'resnets' else 1}.{_resnet(rest) if part == 'resnets' else rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (L + 1)}.0.op.{m.group(2)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m.group(1))
        return f"output_blocks.{i * (L + 1) + L}.{2 if up_has_attn[i] else 1}.conv.{m.group(2)}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        part, j, rest = m.groups()
        return f"middle_block.{1 if part == 'attentions' else 2 * int(j)}.{_resnet(rest) if part == 'resnets' else rest}"
    raise CheckpointError(f"U-Net parameter {key!r} has no place in the original layout")


def _resnet(rest: str) -> str:
    name, _, tail = rest.rpartition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict as the original ``first_stage_model.`` keys."""
    n = len(config["block_out_channels"])
    out = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out")
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            part, kind, i, what, j, rest = m.groups()
            i = int(i) if kind == "down" else n - 1 - int(i)  # the original decoder counts from the bottom
            if what == "resnets":
                k = f"{part}.{kind}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                k = f"{part}.{kind}.{i}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            part, what, j, rest = m.groups()
            if what == "resnets":
                k = f"{part}.mid.block_{int(j) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                name, _, tail = rest.rpartition(".")
                k = f"{part}.mid.attn_1.{_VAE_ATTN[name]}.{tail}"
                if name != "group_norm" and value.ndim == 2:
                    value = value[:, :, None, None]  # the original attention's 1x1 convolutions
        out[VAE + k] = value
    return out


def canonical_clip(sd: dict) -> dict:
    """A transformers CLIP text model's state dict under its classic names (``text_model.``...):
    transformers 5 names the parameters of CLIPTextModel without that prefix, the checkpoints do not."""
    return {(k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers' CLIPTextModel as the original keeps it: the classic names under ``prefix``."""
    return {prefix + k: v for k, v in canonical_clip(sd).items()}


def open_clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers' CLIP text model as OpenCLIP names it (SD 2.x's ViT-H, SDXL's bigG): q, k and v
    fused into ``in_proj``, the projection as a matrix applied on the right."""
    out, fused = {}, {}
    for key, value in canonical_clip(sd).items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        k = key.replace("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
        k = k.replace("text_model.embeddings.position_embedding.weight", "positional_embedding")
        k = k.replace("text_model.final_layer_norm.", "ln_final.")
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", k)
        if m:
            i, name, tail = m.groups()
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((i, tail), {})[name[10]] = value
                continue
            k = f"transformer.resblocks.{i}.{_CLIP_LAYER[name]}.{tail}"
        out[prefix + k] = value
    for (i, tail), qkv in fused.items():
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{tail}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def ldm_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict:
    """The networks' tensors under the original (A1111 / ComfyUI) keys: SDXL with text_encoder_2 (the
    refiner without text_encoder), SD 1.x's OpenAI CLIP (quick_gelu) or SD 2.x's OpenCLIP otherwise."""
    out = unet_to_ldm(unet.state_dict(), dict(unet.config))
    out.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    if text_encoder_2 is not None and text_encoder is None:
        out.update(open_clip_to_ldm(text_encoder_2.state_dict(), REFINER_TEXT))
    elif text_encoder_2 is not None:
        out.update(clip_to_ldm(text_encoder.state_dict(), SDXL_TEXT_1))
        out.update(open_clip_to_ldm(text_encoder_2.state_dict(), SDXL_TEXT_2))
    elif text_encoder.config.hidden_act == "quick_gelu":  # OpenAI's CLIP (SD 1.x)
        out.update(clip_to_ldm(text_encoder.state_dict(), SD1_TEXT))
    else:  # OpenCLIP (SD 2.x)
        out.update(open_clip_to_ldm(text_encoder.state_dict(), SD2_TEXT))
    return out


def to_single_file(model, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (an ldm.models.Model) as one original-layout ``.safetensors`` file, loadable by
    AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file``."""
    from safetensors.torch import save_file

    out = ldm_state_dict(model.unet, model.vae, model.text_encoder, model.text_encoder_2)
    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in out.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(out, str(tmp), metadata={"format": "pt", "ldm_arch": model.arch})
    tmp.replace(path)
    return path


# --- original -> diffusers ------------------------------------------------------------------------
CONFIGS = Path(__file__).parent / "assets" / "configs"


def read_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a single file: safetensors, or with ``allow_pickle`` a pickle .ckpt/.pt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{str(path)!r} is not a readable .safetensors file ({exc}); it may be "
                                  "truncated: download it again") from None
    if not allow_pickle:
        raise CheckpointError(f"{str(path)!r} is a pickle checkpoint; loading pickle can run arbitrary code, so it "
                              "is refused by default. Use a .safetensors file, or pass --allow-pickle "
                              "(allow_pickle=True) if you trust where the file came from")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign pickle
        raise CheckpointError(f"could not read {str(path)!r}: {exc}") from None
    return sd.get("state_dict", sd)


def config_dir_for(arch: str) -> Path:
    """The shipped diffusers config of a real architecture (no weights; tokenizers are written on demand)."""
    d = CONFIGS / arch
    if not (d / "model_index.json").is_file():
        raise CheckpointError(f"no shipped config for {arch}; pass config= a diffusers directory of the same layout")
    return d


def load_single_file(path: str | Path, *, config: str | Path | None = None, allow_pickle: bool = False,
                     dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None):
    """The parts of a single-file checkpoint as diffusers / transformers models, keyed as in a diffusers
    directory (unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2), plus its architecture
    and the config directory used (``config``: a diffusers directory of the same layout; default the
    configuration read from the tensors over the shipped one of the detected family). ``vae_dtype``: the
    VAE's, where it differs from ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    sd = read_checkpoint(path, allow_pickle)
    arch = detect(sd.keys(), {k: tuple(v.shape) for k, v in sd.items() if k.endswith("input_blocks.0.0.weight")})
    cfg_dir = Path(config) if config is not None else config_dir_for(arch)
    family = arch.replace("-inpaint", "")
    encoders = {"sd1": [("text_encoder", CLIPTextModel, SD1_TEXT, False)],
                "sd2": [("text_encoder", CLIPTextModel, SD2_TEXT, True)],
                "sdxl": [("text_encoder", CLIPTextModel, SDXL_TEXT_1, False),
                         ("text_encoder_2", CLIPTextModelWithProjection, SDXL_TEXT_2, True)],
                "sdxl-refiner": [("text_encoder_2", CLIPTextModelWithProjection, REFINER_TEXT, True)]}[family]
    parts = {}
    try:
        unet_cfg = dict(UNet2DConditionModel.load_config(str(cfg_dir / "unet")))
        vae_cfg = dict(AutoencoderKL.load_config(str(cfg_dir / "vae")))
        text_cfgs = {name: CLIPTextConfig.from_pretrained(str(cfg_dir / name)).to_dict() for name, *_ in encoders}
        if config is None:  # the shipped config where the tensors agree with it, what they say where not
            from . import layouts

            text_cfgs = {name: layouts.text_config(sd, prefix, text_cfgs[name], open_clip)
                         for name, _, prefix, open_clip in encoders}
            pooled = text_cfgs.get("text_encoder_2", {}).get("projection_dim")
            unet_cfg = layouts.unet_config(sd, unet_cfg, family, pooled)
            vae_cfg = layouts.vae_config(sd, vae_cfg)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        _load(unet, convert_ldm_unet_checkpoint(sd, unet_cfg), "U-Net", path)
        vae = AutoencoderKL.from_config(vae_cfg)
        _load(vae, convert_ldm_vae_checkpoint(sd, vae_cfg), "VAE", path)
        parts.update(unet=unet.to(dtype), vae=vae.to(vae_dtype or dtype))
        for name, cls, prefix, open_clip in encoders:
            text_cfg = CLIPTextConfig(**text_cfgs[name])
            model = cls(text_cfg)
            if open_clip:
                weights = convert_open_clip_checkpoint(model, sd, prefix=prefix)
            else:
                weights = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(prefix)},
                                                      remove_prefix=prefix)
            _load(model, weights, name, path)
            parts[name] = model.to(dtype)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"could not read {str(path)!r} as {arch} with the config in {cfg_dir}: {exc}") from None
    return parts, arch, cfg_dir


def _load(module, weights: dict, what: str, path: Path):
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    own = set(module.state_dict())
    if not any(k.startswith("text_model.") for k in own):  # transformers 5's CLIP names
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes that differ
        first = str(exc).split("\n\t")[1:2]
        raise CheckpointError(f"{str(path)!r}: its {what} does not fit the config (a different layout): "
                              f"{first[0] if first else exc}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r}: its {what} does not fit the config: "
                              f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:3]})")


def to_directory(model, path: str | Path, atomic: bool = True) -> Path:
    """Write ``model`` (an ldm.models.Model, e.g. loaded from a single file) as a diffusers directory that
    ``from_pretrained`` loads; written beside and renamed into place (``atomic``), or into ``path`` as
    it is (a training run's output folder, which holds its checkpoints too)."""
    import shutil

    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)

    path = Path(path)
    cfg = {k: v for k, v in model.schedule.to_config().items() if k != "rescale_betas_zero_snr" or v}
    scheduler = DDIMScheduler(**{**dict(clip_sample=False, set_alpha_to_one=False), **cfg})
    parts = dict(unet=model.unet, vae=model.vae, scheduler=scheduler)
    if model.arch == "sdxl-refiner":
        pipe = StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, text_encoder_2=model.text_encoder_2,
                                                tokenizer_2=model.tokenizer_2, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt,
                                                add_watermarker=False, **parts)
    elif model.is_sdxl:
        pipe = StableDiffusionXLPipeline(text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                         text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                                         force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt,
                                         add_watermarker=False, **parts)
    else:
        pipe = StableDiffusionPipeline(text_encoder=model.text_encoder, tokenizer=model.tokenizer, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)
    if not atomic:
        pipe.save_pretrained(str(path), safe_serialization=True)
        return path
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_vae(source: str | Path, like, *, allow_pickle: bool = False, dtype: torch.dtype = torch.float32):
    """A replacement VAE (``--vae``): a diffusers VAE directory, a model directory holding ``vae/``, or a
    single VAE file as A1111 and ComfyUI keep them (original keys, with or without ``first_stage_model.``;
    or diffusers keys), read with ``like``'s config (the model's own VAE)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    source = Path(source)
    if source.is_dir():
        d = source / "vae" if (source / "vae" / "config.json").is_file() else source
        if not (d / "config.json").is_file():
            raise CheckpointError(f"--vae {str(source)!r} holds no VAE (no config.json, no vae/ folder)")
        return AutoencoderKL.from_pretrained(str(d), torch_dtype=dtype)
    if not source.is_file():
        raise CheckpointError(f"--vae {str(source)!r} does not exist")
    sd = read_checkpoint(source, allow_pickle)
    config = dict(like.config)
    vae = AutoencoderKL.from_config(config)
    diffusers_named = any(k.startswith("encoder.down_blocks.") for k in sd)
    _load(vae, sd if diffusers_named else convert_ldm_vae_checkpoint(sd, config), "VAE", source)
    return vae.to(dtype)


def vae_file(vae, path: str | Path) -> Path:
    """Write a VAE alone in the original keys (no prefix), as VAE files for A1111 and ComfyUI come."""
    from safetensors.torch import save_file

    sd = {k[len(VAE):]: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}
    save_file(sd, str(path), metadata={"format": "pt"})
    return Path(path)


@torch.no_grad()
def predicts_v(unet, context_width: int, timestep: int) -> bool:
    """Whether a U-Net predicts v rather than epsilon, from one evaluation: at the noisiest level the
    sample is almost all noise, so an epsilon model returns (nearly) its input, while a v model returns
    about -x0, which is unrelated to the noise (v = sqrt(ab) eps - sqrt(1 - ab) x0). SD 2.x single files
    come both ways (512-base epsilon, 768-v) with the same keys, so the weights have to say."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    context = torch.zeros(1, 77, context_width)
    p = next(unet.parameters())
    out = unet(x.to(p), torch.tensor([timestep], device=p.device), encoder_hidden_states=context.to(p)).sample.float()
    noise = x[:, :out.shape[1]].to(out)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), noise.flatten(), dim=0).item()
    # An epsilon model returns its input within a few percent (the embedded model: 6 %). A v model whose
    # x0 estimate is near zero there (centred latents) returns about sqrt(ab) eps, still along the
    # input but far from it: the exact v form of the embedded model has cosine 0.84 and distance 55 %.
    rel = ((out - noise).norm() / noise.norm()).item()
    return cos < 0.5 or rel > 0.3


# --- LoRA: diffusers / peft layout <-> kohya's (sd-scripts; read by A1111, ComfyUI, Forge) -----------
_LORA_PARTS = {".lora.down.weight": "lora_down", ".lora.up.weight": "lora_up",
               ".lora_linear_layer.down.weight": "lora_down", ".lora_linear_layer.up.weight": "lora_up",
               ".lora_A.weight": "lora_down", ".lora_B.weight": "lora_up"}


def file_keys(path: str | Path) -> list[str] | None:
    """The tensor names of a .safetensors file, read from its header alone; None if it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception:  # not a safetensors file, or truncated: the caller's loader says why
        return None


def is_kohya_lora(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def lora_to_kohya(sd: dict, unet_config: dict, sdxl: bool, alpha: float | None = None) -> dict:
    """A LoRA in diffusers' layout (``unet.<module>.lora.down.weight``, ``text_encoder.``...,
    ``text_encoder_2.``...) in kohya's: ``lora_unet_<module>`` with ``lora_down`` / ``lora_up`` and
    ``alpha`` (default the rank, i.e. scale 1, which is how diffusers reads a file without alphas).
    SD 1.x/2.x modules keep diffusers' names, SDXL's U-Net takes the original ones (input_blocks...),
    as kohya's scripts name them."""
    layers = unet_config["layers_per_block"]
    up_attn = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        suffix = next((s for s in _LORA_PARTS if key.endswith(s)), None)
        if suffix is None:
            raise CheckpointError(f"LoRA key {key!r} is not in diffusers' layout (…lora.down.weight / lora.up.weight)")
        module = key[:-len(suffix)]
        if module.startswith("unet."):
            path = module[len("unet."):]
            if sdxl:
                path = _unet_key(path + ".weight", layers, up_attn)[:-len(".weight")]
            name = "lora_unet_" + path
        else:
            encoder, _, path = module.partition(".")
            path = path if path.startswith("text_model.") else "text_model." + path
            te = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[encoder]
            name = te + path
        name = name.replace(".", "_")
        out[f"{name}.{_LORA_PARTS[suffix]}.weight"] = value.contiguous()
        if _LORA_PARTS[suffix] == "lora_down":
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else value.shape[0]))
    return out
