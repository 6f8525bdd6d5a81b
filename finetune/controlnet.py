"""Training a ControlNet (Zhang et al. 2023) or a T2I-Adapter (Mou et al. 2023) on a frozen base model.

A ControlNet starts as a copy of the base U-Net's encoder and middle block (diffusers'
``ControlNetModel.from_unet``) whose outputs pass through zero-initialised 1x1 convolutions, so at step
0 the controlled model is exactly the base model; it learns, through the frozen U-Net, to turn a
condition image (edges, a silhouette) into residuals for the U-Net's skip connections. The loss is
the base model's own denoising loss (finetune.common.denoising_loss) with the residuals added, as in
diffusers' train_controlnet.py. A T2I-Adapter (``adapter``) is a small separate network whose
features are added inside the U-Net's down blocks, trained the same way.

Data: a folder (``NAME.png`` the target, ``NAME.control.png`` its condition, ``NAME.txt`` its
caption), a ``datasets`` dataset with image / conditioning image / text columns (the layout
train_controlnet.py reads), or, with neither, the shapes world at any position and size with the
recipe's ``shapes_conditions`` (the embedded model's ControlNet).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ldm.text import size_ids
from shapes import world as shapes

from .common import TextCache, denoising_loss
from .config import ConfigError, ControlNetConfig
from .data import crop_ids, encode_views, load_base_model, read_image_folder, square, training_resolution
from .loop import Objective, sample_offset

log = logging.getLogger(__name__)

CONTROL_TAG = ".control"  # NAME.control.png beside NAME.png: that image's condition


def read_dataset(cfg: ControlNetConfig):
    """The training data as a ``datasets.Dataset`` with columns image, conditioning_image, caption:
    ``cfg.data_dir`` (a folder) or ``cfg.dataset`` (a ``save_to_disk`` folder, a folder of data files
    or a dataset name, read with its columns renamed)."""
    import datasets

    if cfg.data_dir:
        data = read_image_folder(cfg.data_dir, "data_dir", companion=("conditioning_image", CONTROL_TAG))
        missing = [p for p, c in zip(data["path"], data["conditioning_image"]) if c is None]
        if missing:
            raise ConfigError(f"data_dir: {len(missing)} image(s) have no condition beside them, e.g. "
                              f"{missing[0]!r}: put NAME{CONTROL_TAG}.png beside each NAME.png")
        return data
    path = Path(cfg.dataset)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(cfg.dataset)
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ConfigError(f"dataset {cfg.dataset!r} has no train split (it has {', '.join(data)})")
        data = data["train"]
    cols = {"image": cfg.image_column, "conditioning_image": cfg.conditioning_image_column,
            "caption": cfg.caption_column}
    absent = {k: v for k, v in cols.items() if v not in data.column_names}
    if absent:
        raise ConfigError(f"dataset {cfg.dataset!r} has no column(s) {', '.join(map(repr, absent.values()))} "
                          f"(it has {', '.join(data.column_names)}); name its columns with "
                          + ", ".join(f"{k}_column" for k in absent))
    return data.select_columns(list(cols.values())).rename_columns(
        {v: k for k, v in cols.items() if k != v})


def condition_tensor(image, resolution: int, center_crop: bool) -> torch.Tensor:
    """(3, R, R) uint8: a condition image made square as its target was (data.square)."""
    a = np.asarray(square(image.convert("RGB"), resolution, center_crop), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def build_adapter(cfg: ControlNetConfig, unet):
    """A T2I-Adapter whose features fit ``unet``'s down blocks (their widths, the VAE's factor 8)."""
    from diffusers import T2IAdapter

    is_xl = unet.config.get("addition_embed_type") == "text_time"
    if is_xl != (cfg.adapter_type == "full_adapter_xl"):
        raise ConfigError(f"adapter_type {cfg.adapter_type!r} does not fit this {'SDXL' if is_xl else 'SD 1.x/2.x'} "
                          f"U-Net; use {'full_adapter_xl' if is_xl else 'full_adapter or light_adapter'}")
    return T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=2,
                      downscale_factor=16 if is_xl else 8, adapter_type=cfg.adapter_type)


class ControlNetObjective(Objective):
    name = "controlnet"
    export_checkpoints = True  # every checkpoint holds a ControlNet that ldm generate --controlnet runs

    def __init__(self, cfg: ControlNetConfig):
        self.cfg = cfg
        self.kind = "adapter" if cfg.adapter else "controlnet"

    # --- setup ----------------------------------------------------------------------------------
    def setup(self, accelerator):
        from diffusers import ControlNetModel

        cfg = self.cfg
        sources = [k for k in ("data_dir", "dataset") if getattr(cfg, k)] + (["shapes_conditions"]
                                                                            if cfg.shapes_conditions else [])
        if len(sources) != 1:
            raise ConfigError("give the training data once: data_dir (NAME.png, NAME.control.png, NAME.txt), "
                              "dataset (a datasets dataset) or shapes_conditions (the shapes world)"
                              + (f"; got {', '.join(sources)}" if sources else ""))
        self.device = accelerator.device
        self.model = m = load_base_model(cfg.model, self.device)
        m.unet.requires_grad_(False).eval()
        self.resolution = training_resolution(m, cfg.resolution)
        if cfg.shapes_conditions:
            self._setup_shapes()
        else:
            self._setup_data()
        self.text = TextCache(m)
        if cfg.adapter:
            net = build_adapter(cfg, m.unet)
        elif cfg.controlnet_init:
            net = ControlNetModel.from_pretrained(cfg.controlnet_init, use_safetensors=True)
        else:
            net = ControlNetModel.from_unet(m.unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_channels))
        net.requires_grad_(True).train()
        if cfg.gradient_checkpointing:  # diffusers' T2IAdapter has none (enabling it would raise): the U-Net's
            if net._supports_gradient_checkpointing:
                net.enable_gradient_checkpointing()
            m.unet.enable_gradient_checkpointing()
        return {self.kind: net}

    def _setup_shapes(self):
        cfg = self.cfg
        unknown = sorted(set(cfg.shapes_conditions) - set(shapes.CONDITIONS))
        if unknown:
            raise ConfigError(f"shapes_conditions: {', '.join(unknown)} unknown; use some of "
                              f"{', '.join(shapes.CONDITIONS)}")
        if len(cfg.size_range) != 2:
            raise ConfigError(f"size_range must be [low, high], got {cfg.size_range}")
        if self.resolution != shapes.CANVAS:
            raise ConfigError(f"the shapes world is {shapes.CANVAS} px; resolution {self.resolution} does not fit it")
        if cfg.size_sampling not in ("uniform", "log-uniform"):
            raise ConfigError(f"size_sampling must be uniform or log-uniform, got {cfg.size_sampling!r}")
        lo, hi = cfg.size_range
        self.scenes = [shapes.free_scene(cfg.seed, i, lo, hi, sizes=cfg.size_sampling) for i in range(cfg.num_images)]
        self.latents = shapes.encode_scenes(self.model.vae, self.scenes, self.device, progress=self.progress)
        self.data = None

    def _setup_data(self):
        cfg = self.cfg
        self.data = read_dataset(cfg)
        view = self.data.select_columns(["image"])
        self.latents = encode_views(self.model, view, self.resolution, cfg.center_crop, False,
                                    progress=self.progress)[:, 0]
        self.ids = crop_ids(view, self.resolution, cfg.center_crop)

    # --- batches and the loss ------------------------------------------------------------------
    def batch(self, index, generator, rank, world):
        cfg = self.cfg
        first = sample_offset(index, rank, world, cfg.batch_size)
        idx, prompts, conds, sizes = [], [], [], []
        for k in range(first, first + cfg.batch_size):
            rng = np.random.default_rng([cfg.seed, k, 47])
            i = int(rng.integers(len(self.latents)))
            idx.append(i)
            if self.data is None:
                sc = self.scenes[i]
                kind = cfg.shapes_conditions[int(rng.integers(len(cfg.shapes_conditions)))]
                conds.append(torch.from_numpy(np.asarray(shapes.render_condition(sc, kind)).copy()).permute(2, 0, 1))
                if cfg.shape_swap_prob and rng.random() < cfg.shape_swap_prob:  # the condition's shape, another's name
                    sc = replace(sc, shape=str(rng.choice([s for s in shapes.SHAPES if s != sc.shape])))
                cap = shapes.partial_caption(sc, rng, 0.15)
                sizes.append(None)
            else:
                row = self.data[i]
                cap = row["caption"] or ""
                conds.append(condition_tensor(row["conditioning_image"], self.resolution, cfg.center_crop))
                sizes.append(self.ids[i])
            prompts.append("" if rng.random() < cfg.uncond_prob else cap)
        return {"latents": self.latents[torch.tensor(idx)], "prompts": prompts, "cond": torch.stack(conds),
                "sizes": sizes, "index": idx}

    def context(self, prompts: list[str], sizes) -> dict:
        ctx = {n: v.to(self.device) for n, v in self.text(prompts).items()}
        if self.model.is_sdxl:
            r = self.resolution
            ctx["time_ids"] = torch.tensor([size_ids(self.model, r, r, original=s[:2] if s else None,
                                                     crop=s[2:] if s else None) for s in sizes], dtype=torch.float32)
        return ctx

    def loss(self, batch, modules, generator):
        net = modules[self.kind]
        cond = batch["cond"].to(self.device, torch.float32) / 255.0  # (B, 3, H, W) in [0, 1]
        ctx = self.context(batch["prompts"], batch["sizes"])
        unet = self.model.unet
        if self.cfg.adapter:
            feats = net(cond)

            def controlled(xt, t, hidden, **extra):
                # a new list per call: the U-Net pops the features it adds
                return unet(xt, t, hidden, down_intrablock_additional_residuals=list(feats), **extra)
        else:
            def controlled(xt, t, hidden, **extra):
                down, mid = net(xt, t, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False, **extra)
                return unet(xt, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                            **extra)
        loss = denoising_loss(controlled, batch["latents"].to(self.device), ctx, self.model.schedule, generator,
                              **self.cfg.loss_keys())
        return loss, {}

    # --- results --------------------------------------------------------------------------------
    def validation_pairs(self):
        """(prompt, condition image) pairs: the recipe's, else the first training items'."""
        from PIL import Image

        cfg = self.cfg
        if cfg.validation_prompts:
            images = cfg.validation_images
            if len(images) not in (1, len(cfg.validation_prompts)):
                raise ConfigError(f"validation_images: give one condition image, or one per validation prompt "
                                  f"({len(cfg.validation_prompts)}); got {len(images)}")
            from ldm.images import load_image

            return [(p, load_image(images[0] if len(images) == 1 else images[i]))
                    for i, p in enumerate(cfg.validation_prompts)]
        if self.data is None:
            out = []
            for i in range(4):
                sc = shapes.free_scene(cfg.seed + 1, i, *cfg.size_range)
                out.append((sc.caption, shapes.render_condition(sc, cfg.shapes_conditions[i % len(cfg.shapes_conditions)])))
            return out
        return [(self.data[i]["caption"] or "", self.data[i]["conditioning_image"].convert("RGB").resize(
            (self.resolution, self.resolution), Image.BICUBIC)) for i in range(min(4, len(self.data)))]

    def validate(self, step, modules):
        from ldm.images import make_grid
        from pipelines.pipeline import Pipeline

        net = modules[self.kind]
        was = net.training
        net.eval()
        pipe = Pipeline(self.model)
        tiles = []
        try:
            key = "adapters" if self.cfg.adapter else "controls"
            with torch.no_grad():
                for prompt, cond in self.validation_pairs():
                    cond = cond.convert("RGB")
                    res = pipe.text_to_image(prompt, seed=self.cfg.seed, batch_size=1, width=self.resolution,
                                             height=self.resolution, **{key: [{"model": net, "image": cond}]})
                    tiles += [cond.resize(res.images[0].size), res.images[0]]
        finally:
            net.train(was)
        return {"samples": [make_grid(tiles, cols=2)]}  # each row: the condition, then the result

    def save(self, directory: Path, modules):
        net = modules[self.kind]
        net.save_pretrained(str(directory), safe_serialization=True)


