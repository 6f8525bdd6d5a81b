"""What the training objectives share: the denoising loss, the text-state cache, the validation grid,
saving a model directory that diffusers loads, and the recipes' oversampling keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.models import write_sampling_defaults
from ldm.process import from_x0, q_sample
from ldm.schedule import NoiseSchedule
from ldm.text import text_context

from .config import TIMESTEP_SAMPLINGS


@dataclass
class Oversampling:
    """Recipe keys shared by the VAE and U-Net recipes: a fraction of each batch drawn from the shapes
    world's hardest scenes (a shape and/or a size class)."""
    oversample_fraction: float = 0.0            # this fraction of each batch is drawn from the scenes ...
    oversample_shape: list[str] | None = None   # ... of these shapes (one, or a list: `star,ring`) ...
    oversample_size: list[str] | None = None    # ... and size classes, uniformly over the combinations

    def oversample_names(self) -> tuple[list[str] | None, list[str] | None]:
        """The shape and size keys as lists (a recipe read from YAML or flags gives lists; code may give
        one name as a string)."""
        return tuple([v] if isinstance(v, str) else v for v in (self.oversample_shape, self.oversample_size))

    def hard_combos(self, split: str) -> list[tuple[str, str, str, str]]:
        """The combinations of ``split`` that the keys name, checked: an error names the keys when a
        fraction is asked of no scene. Combinations of the split only, so oversampling never draws a
        held-out pair in ``train``."""
        from shapes import world as shapes

        fraction, (shape, size) = self.oversample_fraction, self.oversample_names()
        unknown = sorted(set(shape or ()) - set(shapes.ALL_SHAPES)) + sorted(set(size or ()) - set(shapes.SIZES))
        combos = shapes.combinations(split, shapes=shape or None, sizes=size or None)
        if fraction and (unknown or not combos):
            raise ValueError(f"oversample_shape={shape!r} / oversample_size={size!r} match no scene of split "
                             f"{split!r}{f' ({unknown} unknown)' if unknown else ''}; use some of "
                             f"{shapes.ALL_SHAPES} / {tuple(shapes.SIZES)}")
        return combos


def coverage_weights(coverage: torch.Tensor, weight: float) -> torch.Tensor:
    """denoising_loss's ``weight`` from (..., h, w) maps of how much of each latent pixel a region
    covers (0 to 1): 1 + ``weight`` x the coverage, each map divided by its mean (so every image's
    loss keeps its scale; a small region's pixels gain the most). The U-Net stage's foreground box and
    the masked loss of textual inversion and DreamBooth."""
    w = 1 + weight * coverage
    return w / w.mean(dim=(-2, -1), keepdim=True)


def denoising_loss(unet, latents, hidden, schedule: NoiseSchedule, generator: torch.Generator,
                   snr_gamma: float = 0.0, reduce: bool = True, weight: torch.Tensor | None = None,
                   noise_offset: float = 0.0, timestep_sampling: str = "uniform"):
    """Noise ``latents`` (B, 4, h, w) at uniform random timesteps and score the U-Net's prediction
    against the true target of its parameterisation; per-sample losses when ``reduce`` is False.
    ``hidden``: the text states (B, L, D), or a whole conditioning dict (ldm.text.text_context).
    ``weight``: a per-latent-pixel weight of the squared error (broadcast to (B, 4, h, w)), e.g. a
    region of each image weighted more; None is uniform. ``noise_offset``: kohya's offset noise, a
    per-sample, per-channel constant (``noise_offset`` x a standard normal) added to the noise, so
    the model learns to move an image's mean too (0: none, and no extra random numbers drawn).
    ``timestep_sampling``: ``uniform``, or ``cubic``, t = (1 - u^3) T for uniform u (Mou et al. 2023,
    T2I-Adapter, sec. 3.4): most steps at high noise, where an image's layout is decided, which is what a
    control image steers."""
    b = latents.shape[0]
    n_t = schedule.num_train_timesteps
    if timestep_sampling == "uniform":
        t = torch.randint(0, n_t, (b,), generator=generator)
    elif timestep_sampling == "cubic":
        u = torch.rand((b,), generator=generator)
        t = ((1 - u ** 3) * n_t).long().clamp(0, n_t - 1)
    else:
        raise ValueError(f"timestep_sampling {timestep_sampling!r} is unknown; use {' or '.join(TIMESTEP_SAMPLINGS)}")
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    ab = schedule.alphas_cumprod[t].view(b, 1, 1, 1).to(latents.device)
    noise = noise.to(latents.device)
    xt = q_sample(latents, noise, ab)
    target = from_x0(latents, xt, ab, schedule.prediction_type)
    if isinstance(hidden, dict):  # a full context (ldm.text.text_context): SDXL's added conditions too
        extra = {}
        if "text_embeds" in hidden:
            extra["added_cond_kwargs"] = {k: hidden[k].to(latents.device) for k in ("text_embeds", "time_ids")}
        pred = unet(xt, t.to(latents.device), hidden["encoder_hidden_states"].to(latents.device), **extra).sample
    else:
        pred = unet(xt, t.to(latents.device), hidden).sample
    err = (pred.float() - target.float()).pow(2)
    if weight is not None:
        err = err * weight.to(err.device, err.dtype)
    per = err.mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        snr = (ab / (1 - ab)).view(b)
        # min-SNR-gamma (Hang et al. 2023), min(snr, gamma) on the x0 error: the epsilon error is the x0
        # error x snr, v's x snr / (snr + 1), x0's itself
        denom = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[schedule.prediction_type]
        per = per * torch.minimum(snr, torch.full_like(snr, snr_gamma)) / denom
    return per.mean() if reduce else per


class TextCache:
    """The frozen text encoders' conditioning, computed once per distinct prompt through the code
    generation uses (ldm.text.text_context: concept expansion, the attention mask where the encoder
    uses one, SDXL's two encoders and pooled embedding). ``model`` is an ldm.models.Model or anything
    with its tokenizer / text_encoder / device. Calls return stacked tensors by name, without SDXL's
    size ids (they depend on the image, not the prompt)."""

    def __init__(self, model):
        self.model = model
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = sorted({p for p in prompts if p not in self.cache})
        for i in range(0, len(missing), 512):
            chunk = missing[i:i + 512]
            ctx = text_context(self.model, chunk)
            for j, p in enumerate(chunk):
                self.cache[p] = {k: v[j].cpu() for k, v in ctx.items()}
        return {k: torch.stack([self.cache[p][k] for p in prompts]) for k in self.cache[prompts[0]]}


def sample_grid(model, prompts: list[str], *, seed: int, batch_size: int, trained=(), cols: int | None = None,
                **sampling) -> dict[str, list]:
    """Validation images of an Objective: ``batch_size`` images per prompt from ``model`` (an
    ldm.models.Model) as it is now, the ``trained`` modules in eval mode meanwhile; one grid."""
    from ldm.images import make_grid
    from pipelines.pipeline import Pipeline

    modes = [(m, m.training) for m in trained]
    for m, _ in modes:
        m.eval()
    try:
        with torch.no_grad():
            res = Pipeline(model).text_to_image(prompts, seed=seed, batch_size=batch_size, **sampling)
    finally:
        for m, was in modes:
            m.train(was)
    return {"samples": [make_grid(res.images, cols=cols or batch_size * len(prompts))]}


def save_pipeline(directory, unet, vae, text_encoder, tokenizer, schedule: NoiseSchedule, dtype=None,
                  sampling_defaults: dict | None = None):
    """Write a Stable Diffusion directory (model_index.json, unet, vae, text_encoder, tokenizer,
    scheduler) that diffusers' ``StableDiffusionPipeline.from_pretrained`` loads; ``sampling_defaults``, when
    given, becomes its sampling.json (the defaults ``ldm generate`` uses for it)."""
    from pathlib import Path

    from ldm.models import Model

    save_model(directory, Model(unet, vae, text_encoder, tokenizer, schedule, "", Path(directory)), dtype=dtype,
               sampling_defaults=sampling_defaults)


def save_model(directory, model, dtype=None, sampling_defaults: dict | None = None):
    """Write ``model`` (an ldm.models.Model: SD 1.x/2.x or SDXL) as a diffusers directory, into
    ``directory`` as it is (a run's output folder also holds its checkpoints); copies of the networks
    are saved, so training goes on with its own."""
    import copy
    import dataclasses

    from ldm.checkpoints import to_directory

    nets = {n: copy.deepcopy(getattr(model, n)) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(model, n) is not None}
    if dtype is not None:
        nets = {n: m.to(dtype) for n, m in nets.items()}
    to_directory(dataclasses.replace(model, **nets), directory, atomic=False)
    if sampling_defaults:
        write_sampling_defaults(directory, **sampling_defaults)
