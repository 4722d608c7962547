"""Recipes: one TOML file per experiment, shipped with the package or given as a path.

A recipe has a table per part of the run (``[model]``, ``[data]``, ``[train]``, ...); each
table is checked by the config class that consumes it, so a misspelled key fails with the
nearest valid one. ``load_recipe`` reads the file (malformed TOML is reported with its line
and column), applies ``--set section.key=value`` overrides, and returns plain dicts;
``build_run(recipe, overrides)`` (from :mod:`.run`) turns one into a model, data and Trainer.
"""

from __future__ import annotations

import difflib
import sys
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class RecipeError(ValueError):
    """A recipe that cannot be used, with the file and the fix in the message."""


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with gatelab (``gatelab train NAME`` finds them)."""
    return sorted(
        p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml")
    )


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe's file by name (``moe-lm``), or the given path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if path.is_dir():
            raise RecipeError(
                f"recipe {str(path)!r} is a directory; give a recipe .toml file or a shipped name"
            )
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return path
    shipped = shipped_recipes()
    if str(name_or_path) not in shipped:
        raise RecipeError(
            f"no recipe named {str(name_or_path)!r}{nearest(str(name_or_path), shipped)}; "
            f"shipped recipes: {', '.join(shipped)} (or give a path to a .toml file)"
        )
    return Path(str(resources.files(__name__) / f"{name_or_path}.toml"))


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe and apply ``section.key=value`` overrides (values in TOML syntax;
    a bare word is taken as a string)."""
    path = recipe_path(name_or_path)
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: malformed TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text ({error.reason})") from None
    for override in overrides or []:
        apply_override(recipe, override)
    recipe.setdefault("name", path.stem)
    return recipe


def apply_override(recipe: dict[str, Any], override: str) -> None:
    """Set ``section.key=value`` in place; the section must exist already."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set expects section.key=value, got {override!r}")
    *sections, name = [part.strip() for part in key.split(".")]
    table = recipe
    for section in sections:
        if not isinstance(table.get(section), dict):
            tables = [k for k, v in table.items() if isinstance(v, dict)]
            raise RecipeError(f"--set {key}: no table {section!r}{nearest(section, tables)}")
        table = table[section]
    table[name] = parse_value(text.strip())


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"x"``), else the text itself."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def nearest(word: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(table: dict[str, Any], valid: list[str], where: str) -> None:
    """Raise RecipeError naming each unknown key of ``table`` and its nearest valid key."""
    for key in table:
        if key not in valid:
            raise RecipeError(
                f"unknown key {key!r} in {where}{nearest(key, valid)}; valid keys: {', '.join(valid)}"
            )


# Last: run.py imports the helpers above from this package.
from .run import Run, build_run, run_recipe  # noqa: E402

__all__ = [
    "RecipeError",
    "Run",
    "apply_override",
    "build_run",
    "check_keys",
    "load_recipe",
    "nearest",
    "parse_value",
    "recipe_path",
    "run_recipe",
    "shipped_recipes",
]
