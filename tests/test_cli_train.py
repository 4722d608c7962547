"""`gatelab train / eval / info` on every shipped recipe, and their bad-input errors."""

from __future__ import annotations

import json

import pytest

from gatelab.cli import main
from gatelab.recipes import shipped_recipes

pytest.importorskip("sklearn")  # the digits recipes

SMALL = {
    "lm": [
        "model.num_layers=1",
        "model.dim=32",
        "model.num_heads=2",
        "model.max_seq_len=32",
        "data.seq_len=32",
        "data.batch_size=2",
        "data.eval_batches=1",
    ],
    "mlp": ["data.batch_size=16"],
}


def small(recipe: str, run_dir) -> list[str]:
    kind = "lm" if recipe.endswith("-lm") else "mlp"
    extra = SMALL[kind] + (["model.expert_hidden_dim=16"] if recipe == "moe-lm" else [])
    extra += ["model.ffn_hidden_dim=32"] if recipe == "dense-lm" else []
    sets = [
        *extra,
        "train.steps=2",
        "train.warmup_steps=0",
        "train.eval_every=0",
        f'train.run_dir="{run_dir}"',
    ]
    return [arg for s in sets for arg in ("--set", s)]


def test_shipped_recipes():
    assert shipped_recipes() == ["dense-lm", "digits-dense", "digits-moe", "moe-lm"]


@pytest.mark.parametrize("recipe", ["moe-lm", "dense-lm", "digits-moe", "digits-dense"])
def test_two_steps_of_each_recipe_then_eval_and_info(recipe, tmp_path, capsys):
    run_dir = tmp_path / recipe
    assert main(["train", recipe, *small(recipe, run_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and result["stopped"] == "completed"
    assert result["eval"] and all(v == v for v in result["eval"].values())  # finite, not NaN
    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["step"] == 2
    for key, value in result["eval"].items():
        assert evaluated[key] == pytest.approx(value)  # the checkpoint reproduces the run's eval
    assert main(["info", str(run_dir)]) == 0
    info = capsys.readouterr().out
    assert "active per token" in info and recipe in info
    if "moe" in recipe:
        assert "load share" in info
    if recipe.startswith("digits"):  # the editing commands read token prompts: LMs only
        (tmp_path / "ids.json").write_text("[[1, 2, 3]]")
        prompts = ["--set", f"p={tmp_path / 'ids.json'}", "--out", str(tmp_path / "p")]
        assert main(["profile", str(run_dir), *prompts]) == 2
        assert "needs a language model" in capsys.readouterr().err


def test_resume_continues(tmp_path, capsys):
    args = ["train", "digits-moe", *small("digits-moe", tmp_path / "r")]
    assert main(args) == 0
    capsys.readouterr()
    more = [a.replace("train.steps=2", "train.steps=4") for a in args]
    assert main(more + ["--resume"]) == 2  # steps is part of the run's config: named, refused
    assert "steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "moe-lmm"], "did you mean 'moe-lm'"),
        (["train", "moe-lm", "--set", "model.num_layer=2"], "did you mean 'num_layers'"),
        (["train", "moe-lm", "--set", "model.dim=wide"], "expected an int"),
        (["train", "moe-lm", "--set", "train.stpes=2"], "did you mean 'steps'"),
        (["train", "moe-lm", "--set", "data.seq_length=2"], "did you mean 'seq_len'"),
        (["train", "moe-lm", "--set", "train.lr=-1"], "lr must be > 0"),
        (["eval", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_input_is_named(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_malformed_recipe_file(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nkind = "lm"\ndim = \n')
    assert main(["train", str(path)]) == 2
    assert "line 3, column" in capsys.readouterr().err


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "digits-dense", *small("digits-dense", blocker / "run")]) == 2
    assert "run" in capsys.readouterr().err
