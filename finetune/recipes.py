"""Where the training recipes are and which command trains with which.

The recipes are the YAML files of the top-level ``configs`` folder, installed with the package
(``configs/__init__.py`` makes it one), so a default recipe is found after ``pip install .`` as
after ``pip install -e .``. ``METHODS`` names, per training command, the module, config class,
objective and default recipe; the command line, the shapes-model build and the demos all read it
here, so none of them imports another.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module, resources
from pathlib import Path


@dataclass(frozen=True)
class Method:
    help: str
    module: str
    config: str           # the config dataclass's name in ``module``
    objective: str | None  # the Objective's name in ``module`` (None: the command drives the loop itself)
    recipe: str           # the default recipe, a file name in configs/
    flags: tuple[str, ...] = ()  # recipe keys the command also takes as --flags

    def config_class(self):
        """The recipe's dataclass: in finetune.config where it lives there (no torch: the command's
        --help), else in the method's module."""
        from . import config
        return getattr(config, self.config, None) or getattr(import_module(self.module), self.config)

    def objective_class(self):
        return getattr(import_module(self.module), self.objective)


# recipe keys that a method also takes as its own flags (--data-dir for data_dir, ...)
LOOP_FLAGS = ("batch_size", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
              "gradient_accumulation_steps", "validation_every", "optimizer")

METHODS = {
    "train-vae": Method("train the autoencoder (AutoencoderKL, SD layout)", "finetune.vae", "VAEConfig",
                        "VAEObjective", "shapes-vae.yaml"),
    "train-clip": Method("train the CLIP (open_clip, contrastive) and save its text tower", "finetune.clip",
                         "CLIPConfig", "CLIPObjective", "shapes-clip.yaml"),
    "train-unet": Method("train the text-to-image U-Net on cached latents", "finetune.unet", "UNetConfig",
                         "UNetObjective", "shapes-unet.yaml"),
    "textual-inversion": Method(
        "learn a new token's embedding from a few images (Gal et al. 2022)", "finetune.textual_inversion",
        "TextualInversionConfig", "TextualInversionObjective", "textual-inversion.yaml",
        ("data_dir", "placeholder_token", "initializer_token", "num_vectors", "learnable_property", "repeats",
         "resolution", "center_crop", "random_flip", "mask_weight", "gradient_checkpointing",
         "validation_prompts") + LOOP_FLAGS),
    "dreambooth": Method(
        "fine-tune on a few images of one subject, with prior preservation (Ruiz et al. 2022)",
        "finetune.dreambooth", "DreamBoothConfig", "DreamBoothObjective", "dreambooth.yaml",
        ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir", "with_prior_preservation",
         "prior_loss_weight", "num_class_images", "sample_batch_size", "train_text_encoder", "text_encoder_lr",
         "lora_rank", "lora_alpha", "resolution", "center_crop", "random_flip", "mask_weight",
         "gradient_checkpointing", "validation_prompts") + LOOP_FLAGS),
    "train-controlnet": Method(
        "train a ControlNet (Zhang et al. 2023) or, with --adapter, a T2I-Adapter on a frozen base model",
        "finetune.controlnet", "ControlNetConfig", "ControlNetObjective", "controlnet.yaml",
        ("data_dir", "dataset", "image_column", "conditioning_image_column", "caption_column", "adapter",
         "adapter_type", "controlnet_init", "resolution", "center_crop", "uncond_prob", "gradient_checkpointing",
         "validation_prompts", "validation_images") + LOOP_FLAGS),
}

DISTILL = Method("guidance and progressive distillation into a few-step student (Meng et al. 2023; "
                 "Salimans & Ho 2022)", "finetune.distill", "DistillConfig", None, "distill-shapes.yaml",
                 ("teacher", "from_steps", "to_steps", "guidance_distillation", "guidance_scale", "guidance_range",
                  "guidance_steps", "stage_steps", "first_halving_teacher", "first_halving_substeps", "prediction_type",
                  "data_dir", "num_images") + LOOP_FLAGS)


def recipes_dir() -> Path:
    """The installed configs/ folder."""
    return Path(str(resources.files("configs")))


def recipe_path(name: str) -> Path:
    """The path of recipe ``name`` (a file name in configs/); FileNotFoundError naming it otherwise."""
    path = recipes_dir() / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in recipes_dir().glob("*.yaml")))
        raise FileNotFoundError(f"no recipe {name!r} in {recipes_dir()}; the installed ones: {known or 'none'} "
                                "(reinstall the package if configs/ is missing)")
    return path
