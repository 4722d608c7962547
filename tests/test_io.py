"""gatelab.io: atomic writes and the one JSON writer."""

import json
import math

import pytest

from gatelab.io import write_json


def test_write_json_creates_parents_and_round_trips(tmp_path):
    path = write_json(tmp_path / "a" / "b" / "out.json", {"x": [1, 2.5], "y": None})
    assert json.loads(path.read_text()) == {"x": [1, 2.5], "y": None}
    assert not list(path.parent.glob("*.tmp"))


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "out.json", {"ok": 1})
    with pytest.raises(ValueError):
        write_json(path, {"bad": math.nan})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert not list(tmp_path.glob("*.tmp"))
