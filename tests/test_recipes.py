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


def _model_config(recipe):
    from gatelab.models import MODELS

    table = dict(recipe["model"])
    config_cls, _ = MODELS.get(table.pop("kind", "lm"))
    return config_cls.from_dict(table)


def _flatten_moe(model_table):
    """A [model] table as recipes wrote it before [model.moe]: the MoE keys flat."""
    from gatelab.models import FLAT_MOE_KEYS

    new_to_old = {v.split(".")[1]: k for k, v in FLAT_MOE_KEYS.items()}
    flat = {k: v for k, v in model_table.items() if k != "moe"}
    flat.update({new_to_old[k]: v for k, v in model_table.get("moe", {}).items()})
    return flat


@pytest.mark.parametrize("name", ["moe-lm", "digits-moe"])
def test_shipped_moe_recipes_are_nested_and_match_their_flat_form(name, capsys):
    recipe = load_recipe(name)
    assert "moe" in recipe["model"] and "num_experts" not in recipe["model"]
    nested = _model_config(recipe)
    assert capsys.readouterr().err == ""
    with pytest.warns(DeprecationWarning, match="model.moe.num_experts"):
        flat = _model_config({"model": _flatten_moe(recipe["model"])})
    assert flat == nested


def test_set_nested_and_flat_moe_keys(capsys):
    nested = _model_config(load_recipe("moe-lm", ["model.moe.num_experts=4"]))
    assert nested.moe.num_experts == 4 and capsys.readouterr().err == ""
    with pytest.warns(DeprecationWarning):
        flat = _model_config(load_recipe("moe-lm", ["model.num_experts=4"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.num_experts is now model.moe.num_experts" in err[0]
    assert flat == nested


@pytest.mark.parametrize("name", ["moe-lm", "digits-moe", "dense-lm"])
def test_upgrade_model_table_turns_an_old_flat_table_into_the_shipped_one(name, recwarn, capsys):
    from gatelab.models import upgrade_model_table

    table = load_recipe(name)["model"]
    assert upgrade_model_table(_flatten_moe(table)) == table
    assert upgrade_model_table(table) == table
    assert not recwarn.list and capsys.readouterr().err == ""


def test_a_run_started_with_flat_moe_keys_resumes_under_the_nested_recipe(tmp_path, capsys):
    """A run directory written by an earlier version (flat MoE keys in its stored recipe)
    resumes with today's nested recipe: the stored config is upgraded before the
    fingerprints are compared, and the resumed run ends where an uninterrupted one does."""
    from gatelab.recipes.run import run_recipe

    nested = recipe_path("digits-moe").read_text()
    flat = nested.replace("[model.moe]\n", "").replace("hidden_dim = 64", "expert_hidden_dim = 64")
    for folder, text in (
        ("old", flat),
        ("new", nested),
        ("changed", nested.replace("top_k = 2", "top_k = 1")),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "digits.toml").write_text(text)
    run_dir = tmp_path / "run"
    common = [
        f"train.run_dir='{run_dir}'",
        "train.save_every=2",
        "train.eval_every=0",
        "train.steps=4",
    ]
    with pytest.warns(DeprecationWarning):
        whole = run_recipe(str(tmp_path / "old" / "digits.toml"), common)
    for file in (run_dir / "checkpoints").glob("step_00000004*"):
        file.unlink()  # as if the old run had stopped after its step-2 checkpoint
    with pytest.raises(Exception, match="top_k"):
        run_recipe(str(tmp_path / "changed" / "digits.toml"), common, resume=True)
    resumed = run_recipe(str(tmp_path / "new" / "digits.toml"), common, resume=True)
    assert resumed.step == 4 and resumed.loss == whole.loss
