"""``ldm build-shapes-model``: the whole embedded model from scratch, with the recipes in configs/:
the VAE (nine stages, each from the one before: four recipes, the last two again, then the decoder
recipe three more times on noised latents), then the
CLIP, then the U-Net on their latents and text states, then the ControlNet on that model (the recipe
the model carries for ``ldm train-controlnet``); ``--install`` copies the result (fp32 weights, the
CLIP's image tower in fp16) into the package as the default model and its ControlNet."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from finetune.config import build as build_config
from finetune.config import read_yaml
from finetune.recipes import recipe_path

log = logging.getLogger(__name__)

STAGES = (("vae", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae.yaml"),
          ("vae-refine", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-refine.yaml"),
          ("vae-stars", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-stars.yaml"),
          ("vae-decoder", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-decoder.yaml"),
          ("vae-stars-2", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-stars.yaml"),
          ("vae-decoder-2", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-decoder.yaml"),
          ("vae-noisy-1", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-decoder.yaml"),
          ("vae-noisy-2", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-decoder.yaml"),
          ("vae-noisy-3", "finetune.vae", "VAEConfig", "VAEObjective", "shapes-vae-decoder.yaml"),
          ("clip", "finetune.clip", "CLIPConfig", "CLIPObjective", "shapes-clip.yaml"),
          ("model", "finetune.unet", "UNetConfig", "UNetObjective", "shapes-unet.yaml"),
          ("controlnet", "finetune.controlnet", "ControlNetConfig", "ControlNetObjective", "model:train-controlnet"))
# "model:NAME": the recipe the embedded model carries for command NAME (ldm/assets/shapes-model/recipes), the one
# `ldm train-controlnet` runs on it with no --config
# a stage's own values over its recipe (``--set`` overrides go over these): the last three decoder
# passes decode the posterior mean plus 3 x its std x noise, so that latents a little off the
# encoder's, as a U-Net's are, decode as the shapes they were meant to be (docs/shapes-model.md)
STAGE_VALUES = {f"vae-noisy-{i}": {"latent_noise": 3.0} for i in (1, 2, 3)}


def stage_recipe(recipe: str) -> Path:
    """A stage's recipe file: a name in configs/, or ``model:COMMAND``, the embedded model's own."""
    from ldm.models import model_recipe

    if recipe.startswith("model:"):
        path = model_recipe(None, recipe.removeprefix("model:"))
        if path is None:
            raise FileNotFoundError(f"the embedded model carries no recipe {recipe.removeprefix('model:')}.yaml")
        return path
    return recipe_path(recipe)


def build_stage_config(cls, recipe: str, out: Path, stage: str, resume: bool, overrides: dict | None = None):
    values = read_yaml(stage_recipe(recipe))
    values.update(STAGE_VALUES.get(stage, {}))
    values.update((overrides or {}).get(stage, {}))
    values.update(output_dir=str(out / stage), resume=resume, overwrite=not resume)
    vae_stages = [s[0] for s in STAGES if s[1] == "finetune.vae"]
    if stage in vae_stages[1:]:  # each VAE stage starts from the one before
        values.update(init_vae=str(out / vae_stages[vae_stages.index(stage) - 1]))
    if stage == "model":
        values.update(vae_dir=str(out / vae_stages[-1]), clip_dir=str(out / "clip"))
    if stage == "controlnet":  # on the build's own model
        values.update(model=str(out / "model"))
    return build_config(cls, values, recipe)


def parse_stage_overrides(items: list[str]) -> dict[str, dict]:
    """``--set STAGE.KEY=VALUE`` items (``vae-decoder-2.latent_noise=3``) as ``build``'s overrides: a
    stage name to recipe values (strings, typed by the stage's config)."""
    from finetune.config import ConfigError

    out: dict[str, dict] = {}
    for item in items:
        target, eq, value = item.partition("=")
        stage, dot, key = target.rpartition(".")
        if not eq or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. vae-decoder-2.latent_noise=3")
        check_stage_names([stage], f"--set {item!r}: ")
        out.setdefault(stage, {})[key] = value
    return out


def check_stage_names(names, where: str = "") -> None:
    """A ConfigError naming any of ``names`` that is not a stage of the build, and the stages."""
    from finetune.config import ConfigError

    stages = [s[0] for s in STAGES]
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise ConfigError(f"{where}no stage {', '.join(map(repr, unknown))}; the stages are {', '.join(stages)}")


def stage_configs(out: Path, resume: bool = False, overrides: dict[str, dict] | None = None) -> dict:
    """Every stage's config (recipe, then ``overrides``), built before any stage runs, so that a bad
    key or value in a late stage is an error at the start, not an hour in."""
    import importlib

    check_stage_names(sorted(overrides or {}))
    return {stage: build_stage_config(getattr(importlib.import_module(module), cfg_name), recipe, out, stage,
                                      resume, overrides)
            for stage, module, cfg_name, _, recipe in STAGES}


def build(out: Path, *, install: bool = False, resume: bool = False, progress: bool = True,
          overrides: dict[str, dict] | None = None) -> dict:
    """Run every stage into ``out/<stage>``; ``overrides`` maps a stage name to recipe values
    (``--set STAGE.KEY=VALUE``; the tests build a tiny model this way)."""
    from pipelines.outputs import OwnFolder

    out = Path(out)
    configs = stage_configs(out, resume, overrides)
    out.mkdir(parents=True, exist_ok=True)
    with OwnFolder(out, "build"):
        return _build(out, configs, install=install, resume=resume, progress=progress)


def _build(out: Path, configs: dict, *, install: bool, resume: bool, progress: bool) -> dict:
    import importlib

    from finetune.loop import train

    summary_file = out / "build_summary.json"
    summary = json.loads(summary_file.read_text()) if resume and summary_file.is_file() else {}
    for stage, module, _, obj_name, _ in STAGES:
        if resume and stage in summary:
            log.info("%s: done in an earlier run (%.0f s), skipped", stage, summary[stage]["seconds"])
            continue
        cfg = configs[stage]
        t0 = time.perf_counter()
        result = train(getattr(importlib.import_module(module), obj_name)(cfg), cfg, progress=progress)
        summary[stage] = {**result, "seconds": time.perf_counter() - t0}
        summary_file.write_text(json.dumps(summary, indent=2))
        log.info("%s: %.0f s", stage, summary[stage]["seconds"])
    if install:
        install_model(out / "model", out / "clip" / "clip")
        install_controlnet(out / "controlnet")
    return summary


def install_controlnet(directory: Path, target: Path | None = None) -> Path:
    """Copy a trained ControlNet (config.json and its weights) into the package as the embedded one."""
    from ldm.locate import EMBEDDED_CONTROLNETS

    target = Path(target or EMBEDDED_CONTROLNETS["shapes"])
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(Path(directory) / name, tmp / name)
    values = json.loads((tmp / "config.json").read_text())
    values["_name_or_path"] = target.name
    (tmp / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log.info("installed %s", target)
    return target


def install_model(model_dir: Path, clip_dir: Path, target: Path | None = None, clip_target: Path | None = None):
    """Copy a trained model and the CLIP's visual tower into the package. The model's weights stay fp32,
    as diffusers expects of a main weight file: ``StableDiffusionPipeline.from_pretrained(DIR)`` keeps
    its parts in the dtype their files and configs say, and a plain call on fp16 parts mixes Half
    and Float on the CPU."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from ldm.models import EMBEDDED_MODEL, RECIPES_DIR, SAMPLING_FILE
    from ldm.tokenizer import write_clip_tokenizer

    from .clip import CONFIG_FILE, EMBEDDED_CLIP, VISUAL_FILE

    target, clip_target = Path(target or EMBEDDED_MODEL), Path(clip_target or EMBEDDED_CLIP)
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.to(torch.float32).save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer")  # the same BPE as vocab.json + merges.txt, read 5x faster than tokenizer.json
    write_clip_tokenizer(tmp / "tokenizer", model_max_length=pipe.tokenizer.model_max_length)
    # the model's own name, not the build folder it was loaded from (the parts' configs say it too)
    index = json.loads((tmp / "model_index.json").read_text())
    index["_name_or_path"] = target.name
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for config in tmp.glob("*/config.json"):
        values = json.loads(config.read_text())
        if "_name_or_path" in values:  # diffusers' parts, written with sorted keys
            values["_name_or_path"] = f"{target.name}/{config.parent.name}"
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    if (model_dir / SAMPLING_FILE).is_file():
        shutil.copy(model_dir / SAMPLING_FILE, tmp / SAMPLING_FILE)
    if (target / RECIPES_DIR).is_dir():  # the recipes the model carries are the package's, not the build's
        shutil.copytree(target / RECIPES_DIR, tmp / RECIPES_DIR)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    clip_target.mkdir(parents=True, exist_ok=True)
    sd = {k: v.half().contiguous() for k, v in load_file(str(clip_dir / VISUAL_FILE)).items()}
    save_file(sd, str(clip_target / VISUAL_FILE))
    shutil.copy(clip_dir / CONFIG_FILE, clip_target / CONFIG_FILE)
    log.info("installed %s and %s", target, clip_target)
