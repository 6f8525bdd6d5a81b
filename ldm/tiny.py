"""Small random models with the real Stable Diffusion layouts, for tests and benchmarks.

They are saved by diffusers' own ``StableDiffusionPipeline.save_pretrained``, so the directory is
exactly what diffusers writes, and they use CLIP's real tokenizer (from open_clip's vocabulary).
Nothing is downloaded. ``kind``:
  - ``sd1``: epsilon prediction, quick-GELU text encoder, the SD 1.x scheduler config;
  - ``sd2``: v-prediction, GELU text encoder, linear attention projections, per-block head
    dimensions and a wider text encoder than sd1 (as SD 2.x's 1024 against SD 1.x's 768);
  - ``inpaint``: sd1 with a 9-channel U-Net (latents + mask + masked-image latents);
  - ``sdxl``: SDXL base: two text encoders (CLIPTextModel and CLIPTextModelWithProjection, penultimate
    states concatenated), the pooled text embedding and six size/crop numbers as added conditions;
  - ``sdxl-refiner``: the second encoder only, five numbers (sizes, crop, aesthetic score);
  - ``sdxl-inpaint``: sdxl with a 9-channel U-Net.
``size``: ``tiny`` (thousands of parameters in the U-Net blocks, for tests) or ``bench`` (a few
million, 256 x 256 images, for timing on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .schedule import SD1_SCHEDULER
from .tokenizer import write_clip_tokenizer

KINDS = ("sd1", "sd2", "inpaint", "sdxl", "sdxl-refiner", "sdxl-inpaint")
SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers=1, text_width=32, text_layers=2, text_heads=4,
                 vae_channels=(8, 16, 16, 16), vae_groups=8, resolution=64),
    # the families' head conventions hold at this size (heads of 64 channels for SD 2.x / SDXL's U-Net and every
    # text encoder; SD 1.x's 8 heads), so single files of it load with the configs read from their tensors
    "small": dict(unet_channels=(64, 128), layers=1, text_width=64, text_layers=2, text_heads=1, head_channels=64,
                  vae_channels=(32, 64, 64, 64), vae_groups=32, resolution=64),
    "bench": dict(unet_channels=(64, 128, 256), layers=2, text_width=256, text_layers=4, text_heads=4,
                  vae_channels=(32, 64, 64, 64), vae_groups=32, resolution=256),
}


def build_checkpoint(directory: str | Path, kind: str = "sd1", size: str = "tiny", seed: int = 0,
                     context_length: int = 77) -> Path:
    """Write a random model of the given kind and size to ``directory`` and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind.startswith("sdxl"):
        return _build_sdxl(Path(directory), kind, SIZES[size], seed, context_length)
    s = SIZES[size]
    directory = Path(directory)
    v = kind == "sd2"
    text_width = s["text_width"] * 3 // 2 if v else s["text_width"]  # SD2's text encoder is the wider one
    n_blocks = len(s["unet_channels"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=s["resolution"] // 8,
        in_channels=9 if kind == "inpaint" else 4,
        out_channels=4,
        block_out_channels=s["unet_channels"],
        layers_per_block=s["layers"],
        down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
        cross_attention_dim=text_width,
        attention_head_dim=tuple(c // s.get("head_channels", 16) for c in s["unet_channels"]) if v else 8,
        use_linear_projection=v,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=s["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * len(s["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(s["vae_channels"]),
        layers_per_block=1, norm_num_groups=s["vae_groups"], sample_size=s["resolution"],
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_width, intermediate_size=text_width * 4,
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        max_position_embeddings=context_length, hidden_act="gelu" if v else "quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if v else 49407,
        projection_dim=text_width,
    ))
    tok_dir = directory / "_tokenizer_src"
    tokenizer = write_clip_tokenizer(tok_dir, model_max_length=context_length,
                                     pad_token="!" if v else "<|endoftext|>")
    sched = dict(SD1_SCHEDULER, prediction_type="v_prediction" if v else "epsilon")
    scheduler = DDIMScheduler(**sched)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return directory


def random_lora(model_dir: str | Path, out_dir: str | Path, sdxl: bool, seed: int = 0, std: float = 0.2,
                name: str = "pytorch_lora_weights.safetensors") -> Path:
    """A LoRA of rank 4 for the model of ``model_dir`` on the U-Net's attention and every text encoder's
    that has attention layers (the embedded model's has none),
    with random non-zero up weights (std ``std``), saved by diffusers' ``save_lora_weights`` as
    ``out_dir/name``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from .models import load_model

    m = load_model(model_dir)
    torch.manual_seed(seed)
    m.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": m.unet}
    for part in ("text_encoder", "text_encoder_2"):
        enc = getattr(m, part)
        if enc is not None and any(n.endswith("q_proj") for n, _ in enc.named_modules()):
            enc.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
            layers[f"{part}_lora_layers"] = enc
    for mod in layers.values():
        for n, p in mod.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=std)
    layers = {k: convert_state_dict_to_diffusers(get_peft_model_state_dict(v)) for k, v in layers.items()}
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        str(out_dir), weight_name=name, safe_serialization=True, **layers)
    return Path(out_dir) / name


def random_upscaler(path: str | Path, arch: str = "compact", scale: int = 2, seed: int = 0) -> Path:
    """A small random upscaler network of a real architecture (spandrel's: ``compact``, Real-ESRGAN's
    SRVGGNetCompact; ``esrgan``, ESRGAN's RRDBNet; ``swinir``), saved at ``path`` (.safetensors, or
    .pth as a pickle) with the key names of the released files."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    nets = {"compact": lambda: Compact(num_feat=8, num_conv=4, upscale=scale),
            "esrgan": lambda: ESRGAN(num_filters=8, num_blocks=1, scale=scale),
            "swinir": lambda: SwinIR(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                                     upscale=scale, upsampler="pixelshuffledirect")}
    sd = {k: v.contiguous() for k, v in nets[arch]().state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def _text_encoder(cls, width: int, s: dict, context_length: int, act: str, pad_token_id: int):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=width * 4, num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"], max_position_embeddings=context_length, hidden_act=act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id, projection_dim=width))


def _build_sdxl(directory: Path, kind: str, s: dict, seed: int, context_length: int) -> Path:
    """SDXL's layout at a small size: base (two encoders), refiner (the second only) or inpainting."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    refiner = kind == "sdxl-refiner"
    width1, width2 = s["text_width"], s["text_width"] * 3 // 2   # (ViT-L 768 and bigG 1280 in the real model)
    time_dim = 8                                                 # (256 in the real model)
    n_ids = 5 if refiner else 6                                  # the refiner's aesthetic score replaces target size
    torch.manual_seed(seed)
    channels = s["unet_channels"]
    unet = UNet2DConditionModel(
        sample_size=s["resolution"] // 8, in_channels=9 if kind == "sdxl-inpaint" else 4, out_channels=4,
        block_out_channels=channels, layers_per_block=s["layers"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(max(c // s.get("head_channels", 16), 1) for c in channels), use_linear_projection=True,
        transformer_layers_per_block=tuple(range(1, len(channels) + 1)),
        cross_attention_dim=width2 if refiner else width1 + width2,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width2 + n_ids * time_dim, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * len(s["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(s["vae_channels"]), layers_per_block=1,
        norm_num_groups=s["vae_groups"], sample_size=s["resolution"], scaling_factor=0.13025, force_upcast=True)
    te1 = None if refiner else _text_encoder(CLIPTextModel, width1, s, context_length, "quick_gelu", 49407)
    te2 = _text_encoder(CLIPTextModelWithProjection, width2, s, context_length, "gelu", 0)
    tok_dir = directory / "_tokenizer_src"
    tok1 = None if refiner else write_clip_tokenizer(tok_dir / "1", model_max_length=context_length)
    tok2 = write_clip_tokenizer(tok_dir / "2", model_max_length=context_length, pad_token="!")
    scheduler = DDIMScheduler(**SD1_SCHEDULER)  # its config names clip_sample and set_alpha_to_one (False)
    parts = dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
                 scheduler=scheduler)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False, add_watermarker=False)
    elif kind == "sdxl-inpaint":
        pipe = StableDiffusionXLInpaintPipeline(**parts, add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return directory


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m ldm.tiny",
                                 description="Write a small random model with a real Stable Diffusion layout "
                                             "(its images are noise: it is for trying the tools offline and for tests)")
    ap.add_argument("directory")
    ap.add_argument("--kind", "--arch", dest="kind", default="sd1", choices=list(KINDS))
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build_checkpoint(a.directory, a.kind, a.size, a.seed))


if __name__ == "__main__":
    main()
