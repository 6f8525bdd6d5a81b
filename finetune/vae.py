"""Training the autoencoder of the shapes model: diffusers' ``AutoencoderKL`` in the Stable Diffusion
layout (4 levels, downsampling factor 8, 4 latent channels), so 64x64 images become 4x8x8 latents.

Loss: L1 reconstruction of the posterior sample plus a small KL term (Rombach et al. 2022 use
1e-6 with perceptual and adversarial terms; flat-coloured shapes need neither, as measured:
``adversarial_weight`` adds the adversarial one, which left the shapes world's round trips where they
were, docs/shapes-model.md). Its ``scaling_factor`` is measured from the data after training: 1 / std
of the latents.

A plain L1 is dominated by flat areas, so a small VAE learns blobs first and the thin tips of
stars last. Two options focus it, used by the refinement recipe (configs/shapes-vae-refine.yaml,
which starts from the first stage through ``init_vae``): ``edge_weight`` multiplies the loss of
pixels next to an edge (read from the target image itself, so it works on any data), and
``oversample_*`` draws a fraction of each batch from the hardest scenes (small stars).
``configs/shapes-vae-stars.yaml`` continues with half of each batch small stars, and
``configs/shapes-vae-decoder.yaml`` trains the decoder alone (``decoder_only``: the encoder, hence the
latents and ``scaling_factor``, are kept) on posterior means (``latent_noise: 0``), the latents a
U-Net is trained on and generates; the build then runs that recipe three more times at
``latent_noise: 3`` (the mean plus 3 x the posterior's std x noise), so that it draws latents a little
off the encoder's (a U-Net's) as the shapes they were meant to be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.images import pixels_to_tensor
from shapes import world as shapes

from .common import Oversampling
from .config import TrainConfig, trained_part
from .loop import Objective, sample_offset


@dataclass
class VAEConfig(TrainConfig, Oversampling):
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    kl_weight: float = 1e-6
    split: str = "train"                 # the scenes drawn: train (the U-Net's), or codec (every colour and
                                         # shape: teal, rings and the held-out pairs too; ../shared/SHAPES.md)
    random_color_fraction: float = 0.1   # images drawn in random RGB colours (train: off the palette)
    crop_size: int = 32                  # train on random crops of this side (convolutions do not care) ...
    full_size_steps: int = 200           # ... except for the last N steps, on whole 64x64 images
    scale_images: int = 2048             # images used to measure scaling_factor
    init_vae: str | None = None          # start from this trained VAE (a directory holding vae/)
    edge_weight: float = 0.0             # extra L1 weight of pixels within 1 px of an edge
    edge_contrast: bool = False          # that weight divided by the edge's contrast (its 3x3 spread, 2 =
                                         # black on white, floored at 0.25): a faint edge (orange on red)
                                         # counts as much, relative to its contrast, as a sharp one
    latent_noise: float = 1.0            # decode mean + latent_noise * std * eps (0: the posterior mean,
                                         # which is what the U-Net is trained on)
    decoder_only: bool = False           # freeze the encoder (needs init_vae): latents and scaling_factor
                                         # stay exactly the init's, so a U-Net trained on them stays valid
    data_dirs: list[str] = field(default_factory=list)  # train on these image folders instead of the
                                         # shapes world; each folder is drawn equally often
    resolution: int = 64                 # (data_dirs) images are made square at this size
    shift: int = 0                       # (data_dirs) random circular shift of up to this many pixels
    random_flip: bool = False            # (data_dirs) random horizontal and vertical flips
    adversarial_weight: float = 0.0      # a patch discriminator's hinge loss (Esser et al. 2021, as Stable
                                         # Diffusion's VAE): its term in the reconstruction's loss, scaled by
                                         # the ratio of the two losses' gradients at the decoder's last layer
                                         # times this weight (0: off, no discriminator)
    adversarial_start: int = 0           # steps before the decoder sees that term (the discriminator trains
                                         # from the start)
    discriminator_channels: int = 32     # the discriminator's first width (doubled twice)
    widen: float = 1.0                   # (init_vae) every level's channels and the norm groups times this,
                                         # the init's function kept (widen_vae): with decoder_only the
                                         # encoder's latents stay the init's and the wider decoder trains


def edge_mask(x: torch.Tensor, threshold: float = 0.1, contrast: bool = False) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel's 3x3 neighbourhood spans more than ``threshold`` in any channel;
    with ``contrast``, 1 / that span (floored at 0.25) there instead: a blurred edge moves the
    detector's midpoint by the blur relative to the edge's contrast, so a faint edge's errors count
    more."""
    import torch.nn.functional as F

    spread = (F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)).amax(1, keepdim=True)
    mask = (spread > threshold).to(x.dtype)
    return mask / spread.clamp(min=0.25) if contrast else mask


class PatchDiscriminator(torch.nn.Module):
    """A PatchGAN (Isola et al. 2017) for 64 x 64 images: one real/fake logit per patch of about 34 px,
    a 14 x 14 map at 64 px. GroupNorm, not batch norm, so that a call keeps no running state."""

    def __init__(self, channels: int = 32):
        super().__init__()
        nn = torch.nn
        c = channels
        groups = min(8, c)
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(groups, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 4, 1, 1), nn.GroupNorm(groups, 4 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def adversarial_terms(disc: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor):
    """(discriminator's hinge loss, generator's loss) in one graph: the discriminator's loss sees the
    fake detached (it trains the discriminator only); the generator's loss sees the discriminator's
    parameters detached (it trains the decoder only), so that one backward pass trains both."""
    from torch.func import functional_call

    d_loss = torch.relu(1 - disc(real)).mean() + torch.relu(1 + disc(fake.detach())).mean()
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    g_loss = -functional_call(disc, frozen, (fake,)).mean()
    return d_loss, g_loss


def adaptive_weight(rec: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight`` x |grad rec| / |grad g_loss| at the decoder's last layer ``last`` (Esser et al. 2021),
    clamped to [0, 1e4] and detached: the adversarial term pulls as hard as the reconstruction."""
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (weight * g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()


def random_color_scene_pixels(rng: np.random.Generator, scene: shapes.Scene, any_color: bool = False) -> np.ndarray:
    """``scene`` drawn with a random background and a random shape colour (a generic-image prior for the
    VAE). Unless ``any_color``, the shape colour keeps clear of the palette, so no such image is a
    held-out pair (an orange-ish star) or a reserved colour (teal)."""
    from PIL import Image, ImageDraw

    fg = tuple(int(v) for v in rng.integers(0, 256, 3)) if any_color else shapes.off_palette_color(rng)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (shapes.CANVAS, shapes.CANVAS), bg)
    shapes.draw_shape(ImageDraw.Draw(img), scene.shape, scene.x0, scene.y0, scene.s, scene.s, fg, bg)
    return np.asarray(img)


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(cfg.block_out_channels),
                         layers_per_block=cfg.layers_per_block, latent_channels=4,
                         norm_num_groups=cfg.norm_num_groups, sample_size=shapes.CANVAS)


def widen_vae(vae, factor: float, seed: int = 0):
    """A copy of the ``AutoencoderKL`` ``vae`` with every level's channels and the number of norm groups
    times ``factor``, computing the same function (to rounding): the old channels keep their weights
    (each group of the group norms keeps its channels) and read nothing from the new ones, which
    start random (drawn from ``seed``) and reach the latents or the image once training gives the old
    channels weights to read them (a frozen encoder's latents stay the old ones). The mid-block
    attention's query is scaled by sqrt(factor) for its wider head, and the new key dimensions start
    at zero so that the scores are the old ones."""
    from diffusers import AutoencoderKL

    old_c, old_g = list(vae.config.block_out_channels), vae.config.norm_num_groups
    new_c, new_g = [c * factor for c in old_c], old_g * factor
    if any(c != int(c) for c in new_c + [new_g]):  # (then each level keeps its channels per group)
        raise ValueError(f"widen={factor}: {old_c} channels in {old_g} norm groups times {factor} are not whole "
                         "numbers of channels and groups; 2 always works")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wide = AutoencoderKL.from_config({**vae.config, "block_out_channels": [int(c) for c in new_c],
                                          "norm_num_groups": int(new_g)})
    old_sd, sd = vae.state_dict(), wide.state_dict()
    for key, w in sd.items():
        w_old = old_sd[key].to(w.dtype)
        if w.shape == w_old.shape:
            sd[key] = w_old.clone()
            continue
        head = tuple(slice(0, n) for n in w_old.shape)
        out = w.clone()
        if w.dim() >= 2 and w.shape[1] > w_old.shape[1]:
            out[: w_old.shape[0], w_old.shape[1]:] = 0  # old channels read nothing from new ones
        if key.endswith("to_k.weight") or key.endswith("to_k.bias"):
            out[w_old.shape[0]:] = 0  # new key dimensions add nothing to the scores
        out[head] = w_old
        if ".to_q." in key:
            out[head] *= factor ** 0.5  # the score's 1/sqrt(head width) grew by sqrt(factor)
        sd[key] = out
    wide.load_state_dict(sd)
    return wide


class VAEObjective(Objective):
    name = "vae"

    def __init__(self, cfg: VAEConfig):
        self.cfg = cfg
        self.folders: list[torch.Tensor] = []  # the data_dirs' images, read in setup
        if cfg.split not in ("train", "codec"):
            raise ValueError(f"split={cfg.split!r}: a VAE trains on 'train' (the U-Net's scenes) or 'codec' "
                             "(every colour and shape)")
        self.hard_combos = cfg.hard_combos(cfg.split)

    def setup(self, accelerator):
        self.device = accelerator.device
        if self.cfg.init_vae:
            from diffusers import AutoencoderKL

            path = trained_part(self.cfg.init_vae, "vae", "init_vae", "ldm train-vae", what="VAE")
            vae = AutoencoderKL.from_pretrained(str(path))
            if self.cfg.widen != 1:
                vae = widen_vae(vae, self.cfg.widen, seed=self.cfg.seed + 7)
            vae.train()
            if self.cfg.decoder_only:
                for part in (vae.encoder, vae.quant_conv):
                    part.requires_grad_(False)
        elif self.cfg.decoder_only:
            raise ValueError("decoder_only: set init_vae to the VAE whose encoder is kept")
        elif self.cfg.widen != 1:
            raise ValueError("widen: set init_vae to the VAE to widen (a new VAE takes block_out_channels)")
        else:
            vae = build_vae(self.cfg)
        self.folders = [self._read_folder(d) for d in self.cfg.data_dirs]
        if self.cfg.adversarial_weight:
            with torch.random.fork_rng(devices=[]):  # its initial weights from the run's seed, the global
                torch.manual_seed(self.cfg.seed + 5)  # generator left as it was
                disc = PatchDiscriminator(self.cfg.discriminator_channels)
            return {"vae": vae, "discriminator": disc}
        return {"vae": vae}

    def _read_folder(self, directory: str) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1]: every readable image of ``directory`` made square."""
        from ldm.images import to_tensor

        from .data import read_image_folder, square

        data = read_image_folder(directory, "data_dirs")
        return torch.cat([to_tensor(square(data[i]["image"], self.cfg.resolution, False)) for i in range(len(data))])

    def _folder_batch(self, rng: np.random.Generator) -> torch.Tensor:
        """A batch from the image folders: a folder uniformly, then an image of it, flipped and
        shifted at random (a circular shift keeps a flat background flat)."""
        out = []
        for _ in range(self.cfg.batch_size):
            imgs = self.folders[int(rng.integers(len(self.folders)))]
            x = imgs[int(rng.integers(len(imgs)))]
            if self.cfg.random_flip:
                x = x.flip(-1) if rng.random() < 0.5 else x
                x = x.flip(-2) if rng.random() < 0.5 else x
            if self.cfg.shift:
                dy, dx = (int(v) for v in rng.integers(-self.cfg.shift, self.cfg.shift + 1, size=2))
                x = torch.roll(x, (dy, dx), (-2, -1))
            out.append(x)
        return torch.stack(out)

    def batch(self, index, generator, rank, world):
        rng = np.random.default_rng([self.cfg.seed, index, rank, 17])
        step = index // self.cfg.gradient_accumulation_steps
        if self.folders:
            return {"pixels": self._folder_batch(rng), "step": step}
        base = sample_offset(index, rank, world, self.cfg.batch_size)
        n_hard = int(round(self.cfg.oversample_fraction * self.cfg.batch_size))
        scenes = [shapes.sample_scene(self.cfg.seed, base + j, self.cfg.split) for j in range(n_hard, self.cfg.batch_size)]
        scenes += [shapes.place(rng, *self.hard_combos[int(rng.integers(len(self.hard_combos)))])
                   for _ in range(n_hard)]
        pix = []
        for sc in scenes:
            if rng.random() < self.cfg.random_color_fraction:
                pix.append(random_color_scene_pixels(rng, sc, any_color=self.cfg.split == "codec"))
            else:
                pix.append(np.asarray(shapes.render(sc)))
        x = pixels_to_tensor(np.stack(pix))  # (B, 3, 64, 64)
        c = self.cfg.crop_size
        if c and c < shapes.CANVAS and step < self.cfg.max_steps - self.cfg.full_size_steps:
            if c % 8:
                raise ValueError(f"crop_size {c} is not a multiple of 8")
            ox, oy = (int(v) for v in rng.integers(0, shapes.CANVAS - c + 1, size=2))
            x = x[:, :, oy:oy + c, ox:ox + c]
        return {"pixels": x, "step": step}

    def loss(self, batch, modules, generator):
        vae = modules["vae"]
        x = batch["pixels"].to(self.device)
        with torch.set_grad_enabled(not self.cfg.decoder_only):
            posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
        z = posterior.mean + self.cfg.latent_noise * posterior.std * eps
        recon = vae.decode(z).sample
        err = (recon.float() - x).abs()
        if self.cfg.edge_weight:
            w = 1.0 + self.cfg.edge_weight * edge_mask(x, contrast=self.cfg.edge_contrast)
            rec = (err * w).sum() / (w.sum() * err.shape[1])
        else:
            rec = err.mean()
        kl = posterior.kl().mean()  # summed over the latent, averaged over the batch
        # logs stay tensors: the loop reads them when it logs, not every micro-step
        loss, logs = rec + self.cfg.kl_weight * kl, {"l1": err.mean().detach(), "kl": kl.detach()}
        if self.cfg.adversarial_weight:
            d_loss, g_loss = adversarial_terms(modules["discriminator"], x, recon.float())
            loss = loss + d_loss
            logs.update(d_loss=d_loss.detach(), g_loss=g_loss.detach())
            if batch.get("step", 0) >= self.cfg.adversarial_start:
                lam = adaptive_weight(rec, g_loss, vae.decoder.conv_out.weight, self.cfg.adversarial_weight)
                loss = loss + lam * g_loss
                logs["adv_weight"] = lam
        return loss, logs

    @torch.no_grad()
    def measure_scale(self, vae) -> float:
        """1 / std of posterior samples over ``scale_images`` training images (as Stable Diffusion did)."""
        zs = []
        for start in range(0, self.cfg.scale_images, 256):
            scenes = [shapes.sample_scene(self.cfg.seed + 1, i) for i in range(start, min(start + 256, self.cfg.scale_images))]
            x = shapes.render_tensor(scenes).to(self.device)
            zs.append(vae.encode(x).latent_dist.sample().float().cpu())
        return float(1.0 / torch.cat(zs).std())

    def validate(self, step, modules):
        from ldm.images import make_grid, to_pil

        vae = modules["vae"]
        vae.eval()
        scenes = [shapes.sample_scene(self.cfg.seed + 2, i) for i in range(8)]
        x = shapes.render_tensor(scenes).to(self.device)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        vae.train()
        imgs = to_pil(((torch.cat([x, y]) + 1) / 2).clamp(0, 1))
        return {"reconstruction": [make_grid(imgs, cols=8)]}

    def save(self, directory: Path, modules):
        vae = modules["vae"]
        vae.eval()
        if not self.cfg.decoder_only:  # a frozen encoder keeps the init's latents and scale
            vae.register_to_config(scaling_factor=self.measure_scale(vae))
        vae.save_pretrained(str(Path(directory) / "vae"), safe_serialization=True)
