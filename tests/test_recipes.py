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


def test_vae_codec_experiment_recipes_are_valid_vae_recipes():
    """configs/vae-codec (issue 27's measured chain, docs/shapes-model.md): every key known, the codec
    split, each stage starting from the one before."""
    from pathlib import Path

    from finetune.vae import VAEConfig

    root = Path(__file__).resolve().parents[1]
    cfgs = {p.stem: build(VAEConfig, read_yaml(p), str(p)) for p in sorted((root / "configs" / "vae-codec").glob("*.yaml"))}
    assert sorted(cfgs) == ["b", "c", "e"] and all(c.split == "codec" for c in cfgs.values())
    assert cfgs["c"].init_vae == cfgs["b"].output_dir and cfgs["e"].init_vae == cfgs["c"].output_dir
    assert cfgs["e"].decoder_only and not cfgs["c"].decoder_only
