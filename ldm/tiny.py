"""Small random models with the real Stable Diffusion layouts, for tests and benchmarks.

They are saved by diffusers' own ``StableDiffusionPipeline.save_pretrained``, so the directory is
exactly what diffusers writes, and they use CLIP's real tokenizer (from open_clip's vocabulary).
Nothing is downloaded. ``kind``:
  - ``sd1``: epsilon prediction, quick-GELU text encoder, the SD 1.x scheduler config;
  - ``sd2``: v-prediction, GELU text encoder, linear attention projections, per-block head
    dimensions and a wider text encoder than sd1 (as SD 2.x's 1024 against SD 1.x's 768);
  - ``inpaint``: sd1 with a 9-channel U-Net (latents + mask + masked-image latents).
``size``: ``tiny`` (thousands of parameters in the U-Net blocks, for tests) or ``bench`` (a few
million, 256 x 256 images, for timing on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .schedule import SD1_SCHEDULER
from .tokenizer import write_clip_tokenizer

SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers=1, text_width=32, text_layers=2, text_heads=4,
                 vae_channels=(8, 16, 16, 16), vae_groups=8, resolution=64),
    "bench": dict(unet_channels=(64, 128, 256), layers=2, text_width=256, text_layers=4, text_heads=4,
                  vae_channels=(32, 64, 64, 64), vae_groups=32, resolution=256),
}


def build_checkpoint(directory: str | Path, kind: str = "sd1", size: str = "tiny", seed: int = 0,
                     context_length: int = 77) -> Path:
    """Write a random model of the given kind and size to ``directory`` and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in ("sd1", "sd2", "inpaint"):
        raise ValueError(f"unknown kind {kind!r}; expected sd1, sd2 or inpaint")
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
        attention_head_dim=tuple(c // 16 for c in s["unet_channels"]) if v else 8,
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


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m ldm.tiny",
                                 description="Write a small random model with a real Stable Diffusion layout "
                                             "(its images are noise: it is for trying the tools offline and for tests)")
    ap.add_argument("directory")
    ap.add_argument("--kind", default="sd1", choices=["sd1", "sd2", "inpaint"])
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build_checkpoint(a.directory, a.kind, a.size, a.seed))


if __name__ == "__main__":
    main()
