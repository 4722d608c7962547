"""Recipe files: TOML errors with line and column, overrides, nearest-key messages."""

import pytest

from gatelab.recipes import RecipeError, check_keys, load_recipe, parse_value, recipe_path


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_load_and_override(tmp_path):
    path = write(tmp_path, "[model]\ndim = 64\n[train]\nlr = 1e-3\nsteps = 10\n")
    recipe = load_recipe(path, ["train.lr=3e-4", "model.router=sigmoid", "train.steps = 20"])
    assert recipe["model"] == {"dim": 64, "router": "sigmoid"}
    assert recipe["train"] == {"lr": 3e-4, "steps": 20}
    assert recipe["name"] == "r"


def test_malformed_toml_names_line_and_column(tmp_path):
    path = write(tmp_path, "[model]\ndim = 64\nlr 3\n")
    with pytest.raises(RecipeError, match=r"r\.toml: malformed TOML: .*line 3, column"):
        load_recipe(path)


def test_override_errors(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1e-3\n")
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(path, ["train.lr"])
    with pytest.raises(RecipeError, match="no table 'trian' \\(did you mean 'train'\\?\\)"):
        load_recipe(path, ["trian.lr=1"])


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"a b"') == "a b"
    assert parse_value("topk") == "topk"  # a bare word is a string


def test_check_keys_suggests_nearest():
    with pytest.raises(
        RecipeError,
        match="unknown key 'lerning_rate' in \\[train\\] \\(did you mean 'learning_rate'",
    ):
        check_keys({"lerning_rate": 1}, ["learning_rate", "steps"], "[train]")
    check_keys({"steps": 1}, ["learning_rate", "steps"], "[train]")


def test_missing_recipe(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        recipe_path(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="no recipe named"):
        recipe_path("no-such-recipe")
