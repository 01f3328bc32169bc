"""Recipes: known-good setups shipped as YAML files in this folder, used with `--recipe NAME`.

A recipe file holds `description` (one line), `source` (where its settings come from: a paper or a
published configuration, cited in the file's comments) and the option values of `train` and,
optionally, `eval`, written as in a --config file. Precedence: defaults < recipe < --config file < flags.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..core.errors import UserError

RECIPES_DIR = Path(__file__).parent
COMMANDS = ("train", "eval")


def recipe_paths() -> dict[str, Path]:
    """Every shipped recipe by name (its file name without .yaml), sorted."""
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def read_recipe(name: str) -> dict:
    """A recipe's whole file; an unknown name is a one-line error listing the names."""
    paths = recipe_paths()
    if name not in paths:
        raise UserError(f"unknown recipe {name!r}: use one of {', '.join(paths)} (`grpo-mlx recipes` describes them); "
                        "a file of your own goes through --config")
    return yaml.safe_load(paths[name].read_text())


def list_recipes() -> list[tuple[str, str, str]]:
    """(name, description, source) of every recipe."""
    return [(name, recipe["description"], recipe["source"]) for name, recipe in ((n, read_recipe(n)) for n in recipe_paths())]


def recipe_values(name: str, command: str) -> dict:
    """The option values a recipe gives `command` (train or eval), keyed as config fields."""
    recipe = read_recipe(name)
    if command not in recipe:
        raise UserError(f"recipe {name!r} has no {command} settings; it has {', '.join(c for c in COMMANDS if c in recipe)}")
    return {key.replace("-", "_"): value for key, value in recipe[command].items()}
