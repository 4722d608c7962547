"""The recipe parser fuzzed (issue 15): for every key of every shipped recipe, and every
key the configs it builds accept, random values of the wrong type (bools, floats where ints
go, strings, inf/nan, negative numbers, lists, tables) given as ``--set`` overrides. Each
case either builds (every config validated, the model built on the meta device) or ends in
a one-line ValueError (RecipeError, ConfigError) that names the key; never another
exception, never a silent NaN or inf in a config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatelab.models import MODELS
from gatelab.recipes import load_recipe, shipped_recipes
from gatelab.recipes.run import DATA_KEYS, check_recipe
from gatelab.train import TrainConfig

OUTCOMES: Counter[str] = Counter()


def _flat(table: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in table.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _flat(value, f"{prefix}{key}.")
    return keys


def _config_keys(recipe: dict[str, Any]) -> list[str]:
    """The keys the recipe's configs accept, written in the recipe or not."""
    model_cls = MODELS.get(recipe["model"].get("kind", "lm"))[0]
    keys = [f"model.{k}" for k in model_cls.keys()]
    if "moe" in model_cls.keys():
        keys += [f"model.moe.{f.name}" for f in dataclasses.fields(model_cls().moe)]
    keys += [f"data.{k}" for k in DATA_KEYS[recipe["data"].get("kind", "corpus")]]
    keys += [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)]
    return keys


CASES = sorted(
    {
        (name, key)
        for name in shipped_recipes()
        for key in _flat(load_recipe(name)) + _config_keys(load_recipe(name))
    }
)


def _toml(value: Any) -> str:
    """``value`` in TOML syntax (what ``--set`` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, -1, 1, 2]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, 2.5, -0.5, 0.0, 1e300]),
    st.text(alphabet="abcxyz_-. 0", max_size=8),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["a", "balance", "z", "normalize"]), SCALARS, max_size=2),
)


def _named(message: str, key: str, value: Any) -> bool:
    """The message names the key: a part of its path below the section, or the section;
    for a table given whole, one of the table's keys; for a value that contradicts another
    key (``hidden_dims=[]`` against ``moe_layers=[1]``), that other key of the section."""
    parts = key.split(".")
    names = parts[1:] or parts
    if isinstance(value, dict):
        names += [repr(k) for k in value]
    names += [f".{k.rsplit('.', 1)[-1]}" for _, k in CASES if k.split(".")[0] == parts[0]]
    return any(p in message for p in names)


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
)
@given(case=st.sampled_from(CASES), value=VALUES)
def test_wrong_values_build_or_fail_in_one_line_naming_the_key(case, value):
    name, key = case
    override = f"{key}={_toml(value)}"
    try:
        spec = check_recipe(load_recipe(name, [override]))
        with torch.device("meta"):  # every check a model's constructor makes, no memory
            MODELS.get(spec.model_kind)[1](spec.model)
    except ValueError as error:
        message = str(error)
        assert "\n" not in message, (override, message)
        assert _named(message, key, value), (override, message)
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["built"] += 1
    for config in (spec.model, spec.data, spec.train):  # what built holds no NaN or inf
        text = json.dumps(dataclasses.asdict(config), allow_nan=True)
        assert "NaN" not in text and "Infinity" not in text, (override, text)


def test_every_shipped_recipe_key_was_fuzzed():
    keys = {key for _, key in CASES}
    assert {"train.steps", "data.eval_batches", "model.moe.capacity_factor"} <= keys
    assert len(CASES) > 100


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if OUTCOMES:
        print(f"\nconfig fuzz: {sum(OUTCOMES.values())} cases, {dict(OUTCOMES)}")
