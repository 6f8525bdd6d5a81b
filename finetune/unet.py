"""Base text-to-image training of the U-Net (Rombach et al. 2022): diffusers' ``UNet2DConditionModel``
on cached VAE latents, conditioned on the frozen CLIP text encoder's hidden states, with caption
dropout (an empty prompt some of the time) so that classifier-free guidance works (Ho & Salimans 2022).

The loss is DDPM's simple loss (Ho et al. 2020, eq. 14) on the model's parameterisation, optionally
weighted by min-SNR-gamma (Hang et al. 2023), which speeds up convergence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

from ldm.models import SAMPLING_DEFAULTS
from ldm.schedule import SD1_SCHEDULER, NoiseSchedule
from shapes import world as shapes

from .common import Oversampling, TextCache, coverage_weights, denoising_loss, sample_grid, save_pipeline
from .config import DenoisingLossKeys, TrainConfig, trained_part
from .loop import Objective


@dataclass
class UNetConfig(TrainConfig, Oversampling, DenoisingLossKeys):
    vae_dir: str = "runs/shapes/vae-noisy-3"  # a directory holding vae/
    clip_dir: str = "runs/shapes/clip"  # a directory holding text_encoder/ and tokenizer/ (and clip/)
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    attention_head_dim: int = 4
    norm_num_groups: int = 16
    prediction_type: str = "epsilon"
    # Lin et al. 2023: betas rescaled so that the last level is pure noise (SNR 0) and trailing timestep
    # spacing, so that sampling starts there; needs prediction_type v_prediction or sample (epsilon at
    # SNR 0 says nothing about the image). Written into the saved scheduler config.
    zero_terminal_snr: bool = False
    num_images: int = 40000             # training images rendered and encoded once
    attribute_dropout: float = 0.15     # size/colour/background each left out of a caption
    uncond_prob: float = 0.1            # empty caption (for classifier-free guidance)
    snr_gamma: float = 5.0              # min-SNR-gamma (DenoisingLossKeys; 0: plain MSE)
    # Extra loss weight on the latent pixels under the shape's box: each pixel's squared error weighted
    # 1 + w x (the fraction of its 8 x 8 cell the box covers), normalised to mean 1 per image, so that a
    # small shape (4-9 of 64 latent pixels) is not a few per cent of its image's loss. 0: uniform.
    foreground_weight: float = 0.0
    foreground_margin: int = 0          # px the weighted box is grown by on each side (its edges' surround)
    guidance_scale: float = 7.5         # the saved model's default, written into its sampling.json
    validation_prompts: list[str] = field(default_factory=lambda: [
        "a large red circle on a blue background", "a small yellow star on a black background",
        "a large green circle on a white background", "a small purple triangle on a gray background"])


def build_unet(cfg: UNetConfig, cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups)


def unet_schedule(cfg: UNetConfig) -> NoiseSchedule:
    """SD 1's schedule with the config's parameterisation (and, asked, zero terminal SNR with trailing steps)."""
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if cfg.zero_terminal_snr else {}
    return NoiseSchedule.from_config(dict(SD1_SCHEDULER, prediction_type=cfg.prediction_type, **extra))


def foreground_weights(scenes, size: int, weight: float, margin: int = 0) -> torch.Tensor | None:
    """(N, 1, size, size): 1 + ``weight`` x the coverage of each latent pixel by the box (grown by
    ``margin`` px), divided by its image's mean (so every image's loss keeps its scale); None when
    ``weight`` is 0."""
    if not weight:
        return None
    return coverage_weights(torch.from_numpy(shapes.box_coverage(scenes, shapes.CANVAS // size, margin)),
                            weight).unsqueeze(1)


class UNetObjective(Objective):
    name = "unet"

    def __init__(self, cfg: UNetConfig):
        self.cfg = cfg
        self.hard_combos = set(cfg.hard_combos("train"))
        if cfg.zero_terminal_snr and cfg.prediction_type == "epsilon":
            raise ValueError(f"zero_terminal_snr with prediction_type {cfg.prediction_type!r}: at SNR 0 only "
                             "v_prediction (or sample) has a target that depends on the image; set "
                             "prediction_type: v_prediction")
        self.weights = None  # per-latent-pixel loss weights of the cached scenes (setup)

    def setup(self, accelerator):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        cfg = self.cfg
        self.device = accelerator.device
        vae_path = trained_part(cfg.vae_dir, "vae", "vae_dir", "ldm train-vae")
        text_path = trained_part(cfg.clip_dir, "text_encoder", "clip_dir", "ldm train-clip")
        tok_path = trained_part(cfg.clip_dir, "tokenizer", "clip_dir", "ldm train-clip")
        self.vae = AutoencoderKL.from_pretrained(str(vae_path)).eval().requires_grad_(False)
        self.text_encoder = CLIPTextModel.from_pretrained(str(text_path)).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_path))
        self.vae.to(self.device)
        self.text_encoder.to(self.device)
        self.schedule = unet_schedule(cfg)
        self.text = TextCache(SimpleNamespace(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                                              device=self.device))
        # the training set, rendered and encoded once: (N, 4, 8, 8) scaled latents
        self.scenes = [shapes.sample_scene(cfg.seed, i) for i in range(cfg.num_images)]
        self.latents = shapes.encode_scenes(self.vae, self.scenes, self.device, progress=self.progress)
        self.weights = foreground_weights(self.scenes, self.latents.shape[-1], cfg.foreground_weight,
                                          cfg.foreground_margin)
        hard = [i for i, sc in enumerate(self.scenes)
                if (sc.size, sc.color, sc.shape, sc.background) in self.hard_combos] if cfg.oversample_fraction else []
        self.hard = torch.tensor(hard, dtype=torch.long)
        if cfg.oversample_fraction and not len(self.hard):
            shape, size = cfg.oversample_names()
            raise ValueError(f"none of the {len(self.scenes)} training scenes is a {'/'.join(size or [])} "
                             f"{'/'.join(shape or [])} to oversample; raise num_images")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return {"unet": build_unet(cfg, self.text_encoder.config.hidden_size, shapes.CANVAS // factor)}

    def batch(self, index, generator, rank, world):
        rng = np.random.default_rng([self.cfg.seed, index, rank, 31])
        n_hard = int(round(self.cfg.oversample_fraction * self.cfg.batch_size))
        idx = torch.randint(0, len(self.scenes), (self.cfg.batch_size - n_hard,), generator=generator)
        if n_hard:  # drawn after the rest, so that without oversampling the stream is the one it was
            idx = torch.cat([idx, self.hard[torch.randint(0, len(self.hard), (n_hard,), generator=generator)]])
        prompts = []
        for i in idx.tolist():
            if rng.random() < self.cfg.uncond_prob:
                prompts.append("")
            else:
                prompts.append(shapes.partial_caption(self.scenes[i], rng, self.cfg.attribute_dropout))
        out = {"latents": self.latents[idx], "hidden": self.text(prompts)["encoder_hidden_states"]}
        if self.weights is not None:
            out["weight"] = self.weights[idx]
        return out

    def loss(self, batch, modules, generator):
        loss = denoising_loss(modules["unet"], batch["latents"].to(self.device), batch["hidden"].to(self.device),
                              self.schedule, generator, weight=batch.get("weight"), **self.cfg.loss_keys())
        return loss, {}

    def as_model(self, unet):
        from ldm.models import Model

        return Model(unet=unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                     schedule=self.schedule, name="shapes", path=Path(self.cfg.output_dir),
                     sampling_defaults={**SAMPLING_DEFAULTS, "guidance_scale": self.cfg.guidance_scale})

    def validate(self, step, modules):
        return sample_grid(self.as_model(modules["unet"]), self.cfg.validation_prompts, seed=self.cfg.seed,
                           batch_size=4, trained=[modules["unet"]], cols=4, steps=25)

    def save(self, directory: Path, modules):
        save_pipeline(directory, modules["unet"], self.vae, self.text_encoder, self.tokenizer, self.schedule,
                      sampling_defaults={"guidance_scale": self.cfg.guidance_scale})


