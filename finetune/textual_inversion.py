"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learn the embedding of a new
token from a handful of images; every weight of the model stays frozen except the new rows of the
text encoder's token-embedding matrix.

The loss is the base denoising loss (finetune.common.denoising_loss) of the frozen U-Net on the
images' latents, conditioned on prompts that name the placeholder. Latents are encoded once; a step
is one text-encoder and one U-Net forward and backward, and no VAE work. After every optimiser step
the rows of every other token are restored (weight decay or numerical drift cannot touch them).
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

from ldm.embeddings import add_concept, write_a1111, write_embeddings
from ldm.text import size_ids, text_context

from .common import denoising_loss, sample_grid
from .config import ConfigError, TextualInversionConfig
from .data import crop_ids, encode_views, load_base_model, mask_weights, read_image_folder, training_resolution
from .loop import Objective, sample_offset

log = logging.getLogger(__name__)

# the prompt templates of Gal et al.'s code, for objects and for styles; {} is the placeholder
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


class TextualInversionObjective(Objective):
    name = "textual-inversion"

    def __init__(self, cfg: TextualInversionConfig):
        self.cfg = cfg
        self._perm = (None, None)

    # --- setup ----------------------------------------------------------------------------------
    def _check(self):
        cfg = self.cfg
        if not cfg.placeholder_token.strip() or any(c.isspace() for c in cfg.placeholder_token):
            raise ConfigError(f"placeholder_token {cfg.placeholder_token!r}: give one word without spaces, "
                              "e.g. <my-cat>")
        if not cfg.initializer_token:
            raise ConfigError("initializer_token is required: a single-token word close to the concept "
                              "(e.g. cat, star, painting); its embedding is where training starts")
        if cfg.num_vectors < 1:
            raise ConfigError(f"num_vectors must be >= 1, got {cfg.num_vectors}")
        if not cfg.templates and cfg.learnable_property not in TEMPLATES:
            raise ConfigError(f"learnable_property {cfg.learnable_property!r}: use object or style "
                              "(or give templates)")
        bad = [t for t in cfg.templates if "{}" not in t]
        if bad:
            raise ConfigError(f"template {bad[0]!r} has no {{}} where the placeholder goes")

    def setup(self, accelerator):
        cfg = self.cfg
        self._check()
        self.device = accelerator.device
        # fp32 master weights; the frozen U-Net in the mixed-precision dtype (it only runs forward)
        m = load_base_model(cfg.model, self.device)
        # one table per text encoder (SDXL has two): the new rows learn, the rest is restored after each step
        self.tables = []
        for name, (tok, te) in zip(("text_encoder", "text_encoder_2") if m.text_encoder is not None
                                   else ("text_encoder_2",), m.text_encoders()):
            init_ids = tok.encode(cfg.initializer_token, add_special_tokens=False)
            if len(init_ids) == 1:
                init_ids = init_ids * cfg.num_vectors
            elif len(init_ids) != cfg.num_vectors:
                pieces = tok.convert_ids_to_tokens(init_ids)
                raise ConfigError(
                    f"initializer_token {cfg.initializer_token!r} is {len(init_ids)} tokens ({' + '.join(pieces)}), "
                    "not one; choose a word the tokenizer keeps whole"
                    + (f" (or exactly {cfg.num_vectors} tokens, one per vector)" if cfg.num_vectors > 1 else ""))
            init = te.get_input_embeddings().weight[init_ids].detach().clone()  # (num_vectors, dim)
            ids = add_concept(tok, te, cfg.placeholder_token, init)
            emb = te.get_input_embeddings().weight
            emb.requires_grad_(True)
            frozen = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
            frozen[ids] = False
            self.tables.append(SimpleNamespace(name=name, encoder=te, embedding=emb, ids=ids, frozen=frozen,
                                               original=emb.detach().clone()))
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        if weight_dtype != torch.float32:
            m.unet.to(dtype=weight_dtype)
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            m.unet.train()  # diffusers checkpoints only in training mode; the U-Net has no dropout
        for t in self.tables:
            if cfg.gradient_checkpointing:
                t.encoder.gradient_checkpointing_enable()
            t.encoder.train()
        self.model = m
        self._cache_latents(accelerator)
        return {t.name: t.encoder for t in self.tables}

    def _cache_latents(self, accelerator):
        cfg, m = self.cfg, self.model
        data = read_image_folder(cfg.data_dir)
        self.resolution = training_resolution(m, cfg.resolution)
        self.latents = encode_views(m, data, self.resolution, cfg.center_crop,
                                    cfg.random_flip, progress=self.progress)  # (N, views, 4, h, w)
        self.weights = mask_weights(data, self.resolution, cfg.center_crop, cfg.random_flip,
                                    self.latents.shape[-1], cfg.mask_weight)  # None: the plain loss
        self.crops = crop_ids(data, self.resolution, cfg.center_crop)  # SDXL's size conditioning
        templates = cfg.templates or TEMPLATES[cfg.learnable_property]
        self.captions = []
        for path, cap in zip(data["path"], data["caption"]):
            if cap is None:
                self.captions.append([t.format(cfg.placeholder_token) for t in templates])
                continue
            if "{}" not in cap and cfg.placeholder_token not in cap:
                raise ConfigError(f"caption of {path} names neither {{}} nor {cfg.placeholder_token}: {cap!r}")
            self.captions.append([cap.replace("{}", cfg.placeholder_token)])
        self.paths = data["path"]
        log.info("textual inversion: %d images, %d view(s) each, latents %s", len(self.paths),
                 self.latents.shape[1], tuple(self.latents.shape[2:]))

    def optimized(self, modules):
        return [t.embedding for t in self.tables]  # the embedding matrices only; frozen rows restored each step

    # --- the data stream: epochs of (images x repeats), shuffled per epoch ------------------------
    def _item(self, k: int) -> int:
        n = self.latents.shape[0]
        length = n * max(self.cfg.repeats, 1)
        epoch, pos = divmod(k, length)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.cfg.seed, epoch, 17]).permutation(length))
        return int(self._perm[1][pos]) % n

    def batch(self, index, generator, rank, world):
        first = sample_offset(index, rank, world, self.cfg.batch_size)
        latents, weights, prompts, sizes = [], [], [], []
        for k in range(first, first + self.cfg.batch_size):
            i = self._item(k)
            rng = np.random.default_rng([self.cfg.seed, k, 23])
            view = rng.integers(self.latents.shape[1])
            latents.append(self.latents[i, view])
            if self.weights is not None:
                weights.append(self.weights[i, view])
            options = self.captions[i]
            prompts.append(options[rng.integers(len(options))])
            h, w, top, left = self.crops[i]
            sizes.append(size_ids(self.model, self.resolution, self.resolution, original=(h, w), crop=(top, left)))
        return {"latents": torch.stack(latents), "prompts": prompts, "sizes": sizes,
                "weight": torch.stack(weights) if weights else None}

    def loss(self, batch, modules, generator):
        # through the training encoders, as generation conditions (ldm.text.text_context)
        m = dataclasses.replace(self.model, **modules)
        hidden = text_context(m, batch["prompts"], sizes=batch["sizes"], grad=True)
        loss = denoising_loss(self.model.unet, batch["latents"].to(self.device), hidden, self.model.schedule,
                              generator, weight=batch["weight"], **self.cfg.loss_keys())
        return loss, {}

    @torch.no_grad()
    def after_step(self, step, modules):
        # only the placeholder rows learn: every other row goes back to its original value
        for t in self.tables:
            t.embedding[t.frozen] = t.original[t.frozen]

    # --- results --------------------------------------------------------------------------------
    def vectors(self, table: int = 0) -> torch.Tensor:
        t = self.tables[table]
        return t.embedding.detach()[t.ids].float().cpu().clone()  # (num_vectors, dim)

    def validate(self, step, modules):
        if not self.cfg.validation_prompts:
            return {}
        prompts = [p.replace("{}", self.cfg.placeholder_token) for p in self.cfg.validation_prompts]
        return sample_grid(dataclasses.replace(self.model, **modules), prompts, seed=self.cfg.seed,
                           batch_size=2, trained=list(modules.values()))

    def save(self, directory: Path, modules):
        token = self.cfg.placeholder_token
        if self.model.is_sdxl:  # one file, a set of rows per encoder, named after the token (A1111, ComfyUI)
            from safetensors.torch import save_file

            name = "".join(c for c in token if c.isalnum() or c in "-_") or "embedding"
            rows = {{"text_encoder": "clip_l", "text_encoder_2": "clip_g"}[t.name]: self.vectors(i).contiguous()
                    for i, t in enumerate(self.tables)}
            tmp = Path(directory) / f".{name}.safetensors.tmp"
            save_file(rows, str(tmp), metadata={"token": token})
            tmp.replace(Path(directory) / f"{name}.safetensors")
            return
        write_embeddings(Path(directory) / "learned_embeds.safetensors", {token: self.vectors()})
        if self.cfg.save_a1111:
            name = "".join(c for c in token if c.isalnum() or c in "-_") or "embedding"
            write_a1111(Path(directory) / f"{name}.pt", token, self.vectors(), step=self.cfg.max_steps,
                        checkpoint=str(self.model.path))
