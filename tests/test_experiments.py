"""The experiment registry and the `gatelab experiment` command."""

from __future__ import annotations

import pytest

from gatelab import experiments
from gatelab.cli import main


def test_every_module_is_a_valid_experiment():
    for name in experiments.names():
        experiment = experiments.get(name)
        assert experiment.name == name
        assert experiment.description and callable(experiment.module.run)


def test_unknown_experiment_names_the_valid_ones(capsys):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        experiments.get("nope")
    with pytest.raises(SystemExit):
        main(["experiment", "nope"])
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_list_runs(capsys):
    assert main(["experiment", "list"]) == 0
