"""Every config value is type-checked where it is read, with the key named (issue 15, item 7
and its class): ints are ints (not bools or floats), floats are finite, tuples have their
length, and settings that would make a run report NaN are refused before anything runs."""

from __future__ import annotations

import math

import pytest

from gatelab.cli import main
from gatelab.layers.moe import MoE
from gatelab.models.config import ConfigError
from gatelab.recipes import RecipeError, load_recipe
from gatelab.recipes.run import check_recipe, run_recipe
from gatelab.train import TrainConfig


def check(name: str, *overrides: str):
    return check_recipe(load_recipe(name, list(overrides)))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=2.5", "train.steps: expected an int, got float 2.5"),
        ("train.steps=true", "train.steps: expected an int, got bool True"),
        ("train.keep_checkpoints=1.5", "train.keep_checkpoints: expected an int, got float 1.5"),
        ("train.lr=inf", "train.lr: expected a finite number, got float inf"),
        ("train.lr=nan", "train.lr: expected a finite number, got float nan"),
        ("train.betas=[0.9]", "train.betas: expected a list of 2"),
        ("train.betas=[0.9, true]", "train.betas: expected a list of 2"),
        ("train.progress=1", "train.progress: expected true or false"),
        ("train.run_dir=3", "train.run_dir: expected a string"),
        ("train.time_budget_s=0", "train.time_budget_s must be > 0"),
        ("train.eps=0", "train.eps must be > 0"),
        ("model.moe.capacity_factor=inf", "LMConfig.moe.capacity_factor: expected a finite"),
        ("model.moe.loss_weights={balance=nan}", "LMConfig.moe.loss_weights: expected a table"),
        ("model.moe.router_kwargs={normalize=inf}", "LMConfig.moe.router_kwargs"),
        ('model.moe.router_kwargs={normalize="x"}', "router_kwargs.normalize: expected true or"),
        ("description=3", "description: expected a string, got 3"),
        ("data.eval_batches=0", "data.eval_batches must be > 0, got 0"),
        ("data.eval_batches=-1", "data.eval_batches must be > 0, got -1"),
        ("data.eval_batches=2.0", "data.eval_batches: expected an int, got float 2.0"),
        ("data.seq_len=true", "data.seq_len: expected an int, got bool True"),
        ("data.val_fraction=0", "data.val_fraction must be > 0"),
        ("data.val_fraction=1.0", "data.val_fraction must be < 1"),
        ("data.kind=[1]", "data.kind: unknown kind [1]"),
        ("model.kind=3", "model.kind: unknown kind 3"),
    ],
)
def test_wrong_values_are_refused_naming_the_key(override, expected):
    with pytest.raises(ValueError) as info:
        check("moe-lm", override)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_digits_data_is_checked_too():
    with pytest.raises(ValueError, match=r"data.rotation: expected a finite number, got float inf"):
        check("digits-moe", "data.rotation=inf")
    with pytest.raises(ValueError, match=r"data.batch_size must be > 0, got 0"):
        check("digits-moe", "data.batch_size=0")


def test_shipped_recipes_pass_and_ints_become_floats_where_floats_are_read():
    spec = check("moe-lm", "train.lr=1", "train.betas=[0, 0.5]")
    assert spec.train.lr == 1.0 and isinstance(spec.train.lr, float)
    assert spec.train.betas == (0.0, 0.5)


def test_train_config_checks_types_when_built_directly():
    for kwargs, key in [
        ({"steps": 2.5}, "train.steps"),
        ({"steps": True}, "train.steps"),
        ({"grad_clip": math.inf}, "train.grad_clip"),
        ({"betas": (0.9, 0.95, 0.99)}, "train.betas"),
    ]:
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**kwargs)


def test_nan_loss_weight_is_refused_not_dropped():
    with pytest.raises(ValueError, match="loss weight balance=nan must be a finite number >= 0"):
        MoE(8, 16, 4, 2, loss_weights={"balance": math.nan})
    with pytest.raises(ValueError, match="capacity_factor must be > 0 and a finite number"):
        MoE(8, 16, 4, 2, capacity_factor=math.inf)
    assert MoE(8, 16, 4, 2, loss_weights={"balance": 0.0}).loss_weights == {}


def test_eval_batches_zero_is_refused_where_the_batches_are_made():
    from gatelab.data import EvalBatches, load_corpus

    with pytest.raises(ValueError, match="max_batches must be >= 1"):
        EvalBatches(load_corpus(), "val", max_batches=0)


def test_batch_size_not_divisible_by_the_ranks_is_one_line_once(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    for rank in ("0", "1", "2"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(RecipeError, match=r"data.batch_size=16 cannot be split .* 3 proc"):
            run_recipe("moe-lm", [run_dir])
        assert main(["train", "moe-lm", "--set", run_dir]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == (1 if rank == "0" else 0), err
        assert "multiple of 3 (e.g. 18)" in err or rank != "0"
    assert not (tmp_path / "run").exists()
