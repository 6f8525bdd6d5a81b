"""The recipes travel with the package and every command's default recipe builds its config."""

import pytest

from finetune.config import build, read_yaml
from finetune.recipes import DISTILL, METHODS, recipe_path


@pytest.mark.parametrize("command", [*METHODS, "distill"])
def test_every_default_recipe_is_installed_and_builds(command):
    method = DISTILL if command == "distill" else METHODS[command]
    path = recipe_path(method.recipe)
    cfg = build(method.config_class(), read_yaml(path), str(path))
    assert cfg.max_steps >= 1


def test_a_missing_recipe_names_itself_and_the_installed_ones():
    with pytest.raises(FileNotFoundError, match="no recipe 'nope.yaml'.*shapes-unet.yaml"):
        recipe_path("nope.yaml")


def test_the_wheel_lists_the_recipes_as_package_data():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "configs" in project["packages"]["find"]["include"]
    assert project["package-data"]["configs"] == ["*.yaml"]


def test_the_build_chains_its_vae_stages_on_the_codec_split():
    """The build's VAE (issue 27, docs/shapes-model.md): every stage draws the whole world (teal,
    rings, held-out pairs), each starts from the one before, the decoder-only stages keep the
    encoder; the CLIP's saved text encoder keeps no layers and the U-Net reads the last VAE stage."""
    from pathlib import Path

    from finetune.clip import CLIPConfig
    from finetune.config import ControlNetConfig
    from finetune.unet import UNetConfig
    from finetune.vae import VAEConfig
    from shapes.build import STAGES, build_stage_config

    out = Path("/build")
    classes = {"VAEConfig": VAEConfig, "CLIPConfig": CLIPConfig, "UNetConfig": UNetConfig,
               "ControlNetConfig": ControlNetConfig}
    cfgs = {stage: build_stage_config(classes[cls],
                                      recipe, out, stage, resume=False)
            for stage, _, cls, _, recipe in STAGES}
    vae = [s for s in cfgs if s.startswith("vae")]
    assert vae == ["vae", "vae-refine", "vae-stars", "vae-decoder", "vae-stars-2", "vae-decoder-2",
                   "vae-noisy-1", "vae-noisy-2", "vae-noisy-3"]
    assert all(cfgs[s].split == "codec" for s in vae)
    assert all(cfgs[b].init_vae == str(out / a) for a, b in zip(vae, vae[1:]))
    assert [cfgs[s].decoder_only for s in vae] == [False, False, False, True, False, True, True, True, True]
    # the decoder passes decode the posterior mean, then three more its neighbourhood
    assert [cfgs[s].latent_noise for s in vae if cfgs[s].decoder_only] == [0.0, 0.0, 3.0, 3.0, 3.0]
    assert cfgs["clip"].text_encoder_layers == 0
    assert cfgs["model"].vae_dir == str(out / "vae-noisy-3") and cfgs["model"].clip_dir == str(out / "clip")
    # the ControlNet trains on the build's model with the recipe `ldm train-controlnet` runs on the embedded one
    assert cfgs["controlnet"].model == str(out / "model") and cfgs["controlnet"].shapes_conditions == ["silhouette", "canny"]


def test_build_help_names_every_stage_of_the_build():
    """`ldm build-shapes-model --help` lists the stages as text (importing shapes.build imports torch,
    which the --help budget cannot pay): the list must be the build's own, in its order."""
    import argparse

    from shapes.build import STAGES
    from shapes.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    build_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "build-shapes-model"]
    help_text = next(a.help for a in build_parser._actions if "--set" in a.option_strings)
    listed = help_text.split("stages: ", 1)[1].replace(",", " ").split()
    assert listed == [s[0] for s in STAGES]


def test_set_takes_lists_comma_separated_or_in_yamls_flow_style():
    """`--set block_out_channels=[96,192]` (as a YAML recipe writes it) and `=96,192` give the same list;
    strings lose the spaces and quotes around them; an empty list is `[]`."""
    from finetune.config import build
    from finetune.vae import VAEConfig

    for text in ("[96,192]", "96,192", "[96, 192]", " 96 , 192 "):
        assert build(VAEConfig, {"block_out_channels": text}).block_out_channels == [96, 192], text
    assert build(VAEConfig, {"data_dirs": "[/data/a, '/data/b c']"}).data_dirs == ["/data/a", "/data/b c"]
    assert build(VAEConfig, {"data_dirs": "/data/a"}).data_dirs == ["/data/a"]
    assert build(VAEConfig, {"data_dirs": "[]"}).data_dirs == []
    assert build(VAEConfig, {"data_dirs": ["/x"]}).data_dirs == ["/x"]  # a YAML list as it is


@pytest.mark.parametrize("command", ["dreambooth", "textual-inversion"])
def test_a_run_without_config_uses_the_recipe_its_model_carries(command, sd1_dir, tmp_path):
    """Issue 52 (14): the SD recipes (DreamBooth at lr 5e-6 for 400 steps at batch 1) gave the embedded
    model subject 0.00; the embedded model carries its own recipes and an SD model gets the SD ones."""
    import argparse

    from finetune.cli import default_recipe
    from finetune.config import build, read_yaml
    from ldm.models import EMBEDDED_MODEL

    method = METHODS[command]
    own, why = default_recipe(command, method, argparse.Namespace(model=None, set=[]))
    assert own == str(EMBEDDED_MODEL / "recipes" / f"{command}.yaml") and "embedded model" in why
    cfg = build(method.config_class(), read_yaml(own), own)
    general, why = default_recipe(command, method, argparse.Namespace(model=str(sd1_dir), set=[]))
    assert general == str(recipe_path(method.recipe)) and "Stable Diffusion" in why
    sd = build(method.config_class(), read_yaml(general), general)
    assert cfg.learning_rate != sd.learning_rate  # tuned for the shapes model, not SD at 512 px
    # --set model=... names the base model as --model does; a model directory's own recipe wins
    mine = tmp_path / "mine"
    (mine / "recipes").mkdir(parents=True)
    (mine / "recipes" / f"{command}.yaml").write_text("max_steps: 7\n")
    assert default_recipe(command, method, argparse.Namespace(model=None, set=[f"model={mine}"]))[0] == \
        str(mine / "recipes" / f"{command}.yaml")


def test_the_command_says_which_recipe_it_used(tmp_path, capsys):
    from pipelines.cli import main

    code = main(["textual-inversion", "--data-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")])
    said = capsys.readouterr()
    assert "recipes/textual-inversion.yaml (the one the embedded model carries" in said.out, said
    assert code == 2 and "--data-dir" in said.err  # and the missing data folder is still a clear error
