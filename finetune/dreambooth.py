"""DreamBooth (Ruiz et al. 2022): fine-tune the model on a few images of one subject bound to a rare
identifier ("a sks circle"); with prior preservation, images the base model makes for the subject's
class ("a circle") are trained on alongside, so the model keeps what the class looks like:

    loss = mean_instance(l) + prior_loss_weight * mean_class(l)

where l is the base denoising loss (finetune.common.denoising_loss) of each sample. Full fine-tuning
of the U-Net (and with ``train_text_encoder`` the text encoder), or LoRA adapters through peft
(``lora_rank`` > 0). Instance and class latents are encoded once; the two prompts' text states are
computed once when the text encoder is frozen. Missing class images are generated with the base
model in batches and kept in ``class_data_dir``, so later runs reuse them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from ldm.text import size_ids, text_context

from .common import TextCache, denoising_loss, sample_grid, save_model
from .config import ConfigError, DreamBoothConfig
from .data import (IMAGE_SUFFIXES, crop_ids, encode_views, load_base_model, mask_weights, read_image_folder,
                   training_resolution)
from .loop import Objective, sample_offset

log = logging.getLogger(__name__)

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def generate_class_images(model, prompt: str, class_dir: Path, count: int, batch_size: int = 16,
                          rank: int = 0, world: int = 1, barrier=None) -> int:
    """Generate the images ``class_dir`` lacks (up to ``count``) for ``prompt`` with ``model`` (an
    ldm.models.Model), in batches, through the sharded path of ``ldm generate --from-file``
    (pipelines.batch): each process ``rank`` of ``world`` makes its share of the batches, each image
    written atomically as soon as it is made. Existing images are kept and counted, so later runs
    reuse them; the new ones are ``class-<seed>.png`` with seeds from 1,000,000 up, skipping names that
    exist. ``barrier()`` (the processes' wait_for_everyone) is called once every process has listed
    the folder, before any writes. Returns how many this process generated."""
    from tqdm.auto import tqdm

    from pipelines.batch import Task, write_tasks
    from pipelines.pipeline import Pipeline
    from pipelines.processes import my_share

    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = [p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    missing = count - len(have)
    if barrier is not None:
        barrier()  # every process has its listing before any process writes
    if missing <= 0:
        log.info("class images: %d in %s, none to generate", len(have), class_dir)
        return 0
    names = {p.name for p in have}
    seeds, s = [], 1_000_000
    while len(seeds) < missing:
        if f"class-{s}.png" not in names:
            seeds.append(s)
        s += 1
    tasks = [Task(prompt, seeds[i:i + batch_size], [class_dir / f"class-{x}.png" for x in seeds[i:i + batch_size]])
             for i in range(0, missing, batch_size)]
    pipe = Pipeline(model)
    mine = sum(len(t.seeds) for t in my_share(tasks, rank, world))
    bar = tqdm(total=mine, desc="class images", unit="image", disable=rank != 0)

    def make(task, callback):
        res = pipe.text_to_image(task.prompt, seeds=task.seeds, batch_size=len(task.seeds))
        bar.update(len(task.seeds))  # batch by batch, as each is made
        return res

    written = write_tasks(pipe, tasks, make, rank=rank, world=world, on_skip=lambda t: bar.update(len(t.seeds)))
    bar.close()
    log.info("class images: generated %d into %s", len(written), class_dir)
    return len(written)


class DreamBoothObjective(Objective):
    name = "dreambooth"
    export_checkpoints = True  # every checkpoint is a model (or LoRA file) that ldm generate runs

    def __init__(self, cfg: DreamBoothConfig):
        self.cfg = cfg

    def _check(self):
        cfg = self.cfg
        if not cfg.instance_prompt.strip():
            raise ConfigError("instance_prompt is required: the prompt naming the subject, e.g. 'a sks dog'")
        if cfg.with_prior_preservation and not cfg.class_prompt.strip():
            raise ConfigError("with_prior_preservation needs class_prompt: the prompt of the subject's class, "
                              "e.g. 'a dog' (class images are generated from it)")
        if cfg.with_prior_preservation and cfg.num_class_images < 1:
            raise ConfigError(f"num_class_images must be >= 1 with prior preservation, got {cfg.num_class_images}")
        if cfg.text_encoder_lr is not None and not cfg.train_text_encoder:
            raise ConfigError(f"text_encoder_lr={cfg.text_encoder_lr:g} is set but train_text_encoder is off: "
                              "turn train_text_encoder on, or drop text_encoder_lr")
        # the ranges of every key: finetune.config.BOUNDS

    def param_groups(self, modules, lr):
        """The U-Net at ``lr``, the text encoders at ``text_encoder_lr`` (scaled as ``lr`` was, with
        scale_lr) when it is set."""
        if self.cfg.text_encoder_lr is None:
            return super().param_groups(modules, lr)
        text = [n for n in modules if n.startswith("text_encoder")]
        own = [p for n in text for p in modules[n].parameters() if p.requires_grad]
        rest = [p for n, m in modules.items() if n not in text for p in m.parameters() if p.requires_grad]
        scale = lr / self.cfg.learning_rate if self.cfg.learning_rate else 1.0  # scale_lr's factor
        return [{"params": rest}, {"params": own, "lr": self.cfg.text_encoder_lr * scale}]

    # --- setup ----------------------------------------------------------------------------------
    def setup(self, accelerator):
        cfg = self.cfg
        self._check()
        self.device = accelerator.device
        self.model = m = load_base_model(cfg.model, self.device)
        self.resolution = training_resolution(m, cfg.resolution)
        data = read_image_folder(cfg.instance_data_dir, "instance_data_dir")
        self.instance = self._latents(data)
        self.instance_weights = mask_weights(data, self.resolution, cfg.center_crop, cfg.random_flip,
                                             self.instance.shape[-1], cfg.mask_weight)  # class images: uniform
        self.ids = {"instance": crop_ids(data, self.resolution, cfg.center_crop)}
        self.klass = None
        if cfg.with_prior_preservation:
            class_dir = Path(cfg.class_data_dir or Path(cfg.output_dir) / "class_images")
            self.ensure_class_images(class_dir, accelerator)  # each process makes its share
            accelerator.wait_for_everyone()
            class_data = read_image_folder(class_dir, "class_data_dir")
            self.klass = self._latents(class_data, limit=cfg.num_class_images)
            self.ids["class"] = crop_ids(class_data, self.resolution, cfg.center_crop, limit=cfg.num_class_images)
        self.prompts = {"instance": cfg.instance_prompt, "class": cfg.class_prompt}
        self.cached = None
        if not cfg.train_text_encoder:  # frozen encoders: each prompt's states once, here (outside autocast)
            self.cached = TextCache(m)
            self.cached([p for p in self.prompts.values() if p])
        trainable = {"unet": m.unet}
        if cfg.train_text_encoder:
            trainable.update({name: getattr(m, name) for name in ("text_encoder", "text_encoder_2")
                              if getattr(m, name) is not None})
        if cfg.lora_rank:
            self._add_lora()
        else:
            for mod in trainable.values():
                mod.requires_grad_(True)
        for mod in trainable.values():
            mod.train()
            if cfg.gradient_checkpointing:
                (mod.enable_gradient_checkpointing if hasattr(mod, "enable_gradient_checkpointing")
                 else mod.gradient_checkpointing_enable)()
        return trainable

    def _add_lora(self):
        from peft import LoraConfig

        cfg = self.cfg
        alpha = cfg.lora_alpha or cfg.lora_rank
        self.model.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                               target_modules=UNET_LORA_TARGETS))
        if cfg.train_text_encoder:
            for encoder in (self.model.text_encoder, self.model.text_encoder_2):
                if encoder is not None:
                    encoder.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                   target_modules=TEXT_LORA_TARGETS))

    def ensure_class_images(self, class_dir: Path, acc) -> int:
        cfg = self.cfg
        return generate_class_images(self.model, cfg.class_prompt, class_dir, cfg.num_class_images,
                                     cfg.sample_batch_size, rank=acc.process_index, world=acc.num_processes,
                                     barrier=acc.wait_for_everyone)

    def _latents(self, data, limit: int | None = None) -> torch.Tensor:
        return encode_views(self.model, data, self.resolution, self.cfg.center_crop, self.cfg.random_flip, limit)

    # --- batches and the loss ------------------------------------------------------------------
    def _pick(self, latents: torch.Tensor, k: int, salt: int) -> tuple[int, int]:
        """(image, view) of sample ``k``."""
        rng = np.random.default_rng([self.cfg.seed, k, salt])
        i = rng.integers(latents.shape[0])
        return int(i), int(rng.integers(latents.shape[1]))

    def batch(self, index, generator, rank, world):
        first = sample_offset(index, rank, world, self.cfg.batch_size)
        ks = range(first, first + self.cfg.batch_size)
        picks = [("instance", *self._pick(self.instance, k, 41)) for k in ks]
        if self.klass is not None:
            picks += [("class", *self._pick(self.klass, k, 43)) for k in ks]
        sizes = [size_ids(self.model, self.resolution, self.resolution, original=self.ids[kind][i][:2],
                          crop=self.ids[kind][i][2:]) for kind, i, _ in picks]
        latents = torch.stack([(self.instance if kind == "instance" else self.klass)[i, v] for kind, i, v in picks])
        weight = None
        if self.instance_weights is not None:  # the masked loss on instance images; class images uniform
            ones = torch.ones_like(self.instance_weights[0, 0])
            weight = torch.stack([self.instance_weights[i, v] if kind == "instance" else ones
                                  for kind, i, v in picks])
        return {"latents": latents, "kinds": [kind for kind, _, _ in picks], "sizes": sizes, "weight": weight}

    def context(self, kinds: list[str], sizes: list[list[float]], modules) -> dict:
        """The U-Net's conditioning for the batch: the cached prompt states when the text encoders are
        frozen, else through the (training) encoders, as generation builds it (ldm.text.text_context);
        SDXL's size ids from each image's own original size and crop."""
        if self.cached is not None:
            ctx = {n: v.to(self.device) for n, v in self.cached([self.prompts[k] for k in kinds]).items()}
            if self.model.is_sdxl:
                ctx["time_ids"] = torch.tensor(sizes, dtype=torch.float32)
            return ctx
        m = dataclasses.replace(self.model, **{n: modules[n] for n in ("text_encoder", "text_encoder_2")
                                               if n in modules})
        return text_context(m, [self.prompts[k] for k in kinds], sizes=sizes, grad=True)

    def loss(self, batch, modules, generator):
        hidden = self.context(batch["kinds"], batch["sizes"], modules)
        per = denoising_loss(modules["unet"], batch["latents"].to(self.device), hidden, self.model.schedule,
                             generator, reduce=False, weight=batch["weight"], **self.cfg.loss_keys())
        n = self.cfg.batch_size
        instance = per[:n].mean()
        if self.klass is None:
            return instance, {}
        prior = per[n:].mean()
        return instance + self.cfg.prior_loss_weight * prior, {"instance": instance.detach(), "prior": prior.detach()}

    # --- results --------------------------------------------------------------------------------
    def _as_model(self, modules):
        return dataclasses.replace(self.model, unet=modules["unet"],
                                   text_encoder=modules.get("text_encoder", self.model.text_encoder),
                                   text_encoder_2=modules.get("text_encoder_2", self.model.text_encoder_2))

    def validate(self, step, modules):
        if not self.cfg.validation_prompts:
            return {}
        return sample_grid(self._as_model(modules), self.cfg.validation_prompts, seed=self.cfg.seed, batch_size=2,
                           trained=list(modules.values()))

    def save(self, directory: Path, modules):
        m = self.model
        if self.cfg.lora_rank:
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(mod))
                      for name, mod in modules.items()}
            saver = StableDiffusionXLPipeline if m.is_sdxl else StableDiffusionPipeline
            saver.save_lora_weights(str(directory), weight_name=LORA_FILE, safe_serialization=True, **layers)
            return
        save_model(directory, self._as_model(modules), sampling_defaults=m.sampling_defaults)
