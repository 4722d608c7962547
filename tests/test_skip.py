"""MoDES expert skipping (gatelab.edit.skip) on gatelab and HF MoE models."""

from __future__ import annotations

import pytest
import torch
from lm_tiny import tiny_moe_lm

from gatelab.edit import find_moe_blocks
from gatelab.edit.skip import (
    SCORES,
    SkipEvaluator,
    layer_importance,
    search_thresholds,
    skip_all,
    skip_experts,
    slot_scores,
    threshold_grid,
)
from gatelab.inspect.access import edit_routing


def _gatelab_lm():
    model = tiny_moe_lm(router_std=None)
    with torch.no_grad():
        for block in find_moe_blocks(model):
            block.router.weight.normal_(0.0, 0.5)
            block.experts.down_proj.normal_(0.0, 0.3)  # experts that matter to the output
    return model


def _prompts(vocab=50, n=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, seq), generator=g) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_threshold_zero_changes_nothing_gatelab():
    model, prompts = _gatelab_lm(), _prompts()
    alpha = layer_importance(model, prompts)
    assert set(alpha) == {0, 2} and abs(sum(alpha.values()) - 1) < 1e-9
    assert all(a > 0 for a in alpha.values())
    before = _logits(model, prompts[0])
    with skip_experts(model, alpha, 0.0) as handle:
        after = _logits(model, prompts[0])
    assert torch.equal(before, after)
    assert handle.skipped == 0 and handle.chosen == 2 * 12 * 2 * 2  # tokens x k x layers


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_threshold_zero_changes_nothing_hf(family):
    pytest.importorskip("transformers")
    import hf_tiny

    model = hf_tiny.build(family, implementation="gatelab")
    ids = hf_tiny.ids()
    alpha = {b.layer: 0.5 for b in find_moe_blocks(model)}
    before = _logits(model, ids)
    with skip_experts(model, alpha, 0.0):
        after = _logits(model, ids)
    assert torch.equal(before, after)
    with skip_experts(model, alpha, 10.0) as handle:  # every slot under the threshold
        everything = _logits(model, ids)
    assert handle.ratio == 1.0
    with edit_routing(model, skip_all):
        torch.testing.assert_close(everything, _logits(model, ids))


def test_skip_ratio_grows_with_threshold_and_matches_manual_mask():
    model, prompts = _gatelab_lm(), _prompts()
    alpha = layer_importance(model, prompts)
    scores = slot_scores(model, prompts, alpha)[0]
    grid = threshold_grid(scores, 6)
    evaluate = SkipEvaluator(model, prompts, alpha)
    points = [evaluate([t]) for t in grid]
    ratios = [p.ratio for p in points]
    assert ratios[0] == 0.0 and points[0].kl < 1e-6 and ratios[-1] == 1.0
    assert all(a <= b + 1e-9 for a, b in zip(ratios, ratios[1:], strict=False))
    # the edit is the documented rule: slots with alpha * pi < tau emptied, weights kept
    tau = grid[3]
    for score in ("topk", "router"):
        expected = _manual_skip(model, prompts[0], alpha, tau, score)
        with skip_experts(model, alpha, tau, score=score):
            torch.testing.assert_close(_logits(model, prompts[0]), expected, rtol=0, atol=0)


def _manual_skip(model, ids, alpha, tau, score):
    """Logits with the skip rule written out: pi is the router's score of each chosen
    expert, renormalised over the token's chosen experts for "topk" (ModelTC/MoDES)."""

    def manual(layer):
        def edit(r):
            pi = r.scores.gather(1, r.experts.clamp_min(0))
            if score == "topk":
                pi = pi / pi.sum(1, keepdim=True)
            return r.keep_slots(~(alpha[layer] * pi < tau))

        return edit

    with edit_routing(model, {layer: manual(layer) for layer in alpha}):
        return _logits(model, ids)


def test_default_score_is_the_renormalised_top_k_weight():
    """MoDES weighs the layer importance by the renormalised top-k weight, not the full
    softmax: at a threshold between the two, the default skips like the former."""
    model, prompts = _gatelab_lm(), _prompts()
    alpha = layer_importance(model, prompts)
    topk, router = (torch.cat(slot_scores(model, prompts, alpha, score=s)) for s in SCORES)
    assert (topk >= router - 1e-7).all() and (topk > router + 1e-3).any()
    tau = float(torch.quantile(topk, 0.5))
    with skip_experts(model, alpha, tau) as default:
        got = _logits(model, prompts[0])
    torch.testing.assert_close(got, _manual_skip(model, prompts[0], alpha, tau, "topk"))
    with skip_experts(model, alpha, tau, score="router") as old:
        _logits(model, prompts[0])
    assert default.ratio < old.ratio  # the full softmax is smaller: it skips more
    with pytest.raises(ValueError, match="score must be one of"):
        skip_experts(model, alpha, tau, score="softmax")


def test_threshold_grid_follows_the_reference():
    """grid_search_tau_ddp.py: linspace(tau_min, tau_max, D), exp map 2/(1+e^(-(x-1)c)),
    D = 100 and c = 10 by default; quantiles only on request."""
    import math

    grid = threshold_grid()
    assert len(grid) == 100
    assert grid[0] == pytest.approx(2 / (1 + math.exp(10))) and grid[-1] == pytest.approx(1.0)
    x = 50 / 99
    assert grid[50] == pytest.approx(2 / (1 + math.exp(-(x - 1) * 10)))
    assert all(a < b for a, b in zip(grid, grid[1:], strict=False))
    ref = threshold_grid(None, 100, 0.0, 0.71)
    assert ref[-1] == pytest.approx(2 / (1 + math.exp(0.29 * 10)))  # the reference's text max
    linear = threshold_grid(size=5, tau_min=0.1, tau_max=0.5, mapping="linear")
    assert linear == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    quantile = threshold_grid(scores, 4, mapping="quantile")
    assert quantile[0] == 0.0 and quantile[-1] > 0.4
    for bad, match in (
        (dict(size=1), "grid size"),
        (dict(size=True), "grid size"),
        (dict(mapping="log"), "mapping must be"),
        (dict(mapping="quantile"), "needs the calibration scores"),
        (dict(tau_min=0.5, tau_max=0.5), "tau_min < tau_max"),
        (dict(tau_max=float("nan")), "finite"),
        (dict(exp_coeff=0.0), "exp_coeff"),
    ):
        with pytest.raises(ValueError, match=match):
            threshold_grid(**bad)


def test_frontier_search_one_and_two_kinds():
    model, prompts = _gatelab_lm(), _prompts(n=2)
    alpha = layer_importance(model, prompts)
    kinds = [0, 1]  # first batch kind 0, second kind 1
    scores = slot_scores(model, prompts, alpha, kinds)
    assert len(scores) == 2
    grids = [threshold_grid(s, 5) for s in scores]
    evaluate = SkipEvaluator(model, prompts, alpha, kinds)
    best, frontier = search_thresholds(evaluate, grids, target=0.5)
    assert best is not None and best.ratio >= 0.5 and frontier
    assert best.kl == min(p.kl for p in frontier)
    # the staircase, not the whole 5 x 5 grid: per column at most one failing step and one
    # frontier point, plus at most one step down per row
    assert len(evaluate.points) <= 2 * 5 + 5 < 5 * 5
    one = SkipEvaluator(model, prompts, alpha)
    best1, _ = search_thresholds(one, [threshold_grid(torch.cat(scores), 8)], target=0.5)
    assert best1 is not None and best1.ratio >= 0.5
    none, _ = search_thresholds(one, [[0.0]], target=0.5)
    assert none is None


def test_bad_input():
    model, prompts = _gatelab_lm(), _prompts()
    alpha = {0: 0.5, 2: 0.5}
    with pytest.raises(ValueError, match="thresholds"):
        skip_experts(model, alpha, -0.1)
    with pytest.raises(ValueError, match="no value for MoE layers"):
        skip_experts(model, {0: 1.0}, 0.1)
    with pytest.raises(ValueError, match="empty"):
        layer_importance(model, [])
    with pytest.raises(ValueError, match="kinds must lie"):
        skip_experts(model, alpha, [0.1, 0.2]).set_kinds(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="kinds must be integer labels"):
        skip_experts(model, alpha, [0.1, 0.2]).set_kinds(torch.tensor([0.5, 0.9]))
    for bad in (float("nan"), -0.1, float("inf")):  # NaN never skips, < 0 always: silently
        with pytest.raises(ValueError, match="finite and >= 0"):
            skip_experts(model, {0: bad, 2: 0.5}, 0.1)
    with pytest.raises(ValueError, match="must be finite"):
        threshold_grid(torch.tensor([float("nan"), 0.1]), 4, mapping="quantile")
    with pytest.raises(ValueError, match="target"):
        search_thresholds(SkipEvaluator(model, prompts, alpha), [[0.0, 1.0]], 1.5)
    with pytest.raises(ValueError, match="no MoE blocks"):
        layer_importance(torch.nn.Linear(2, 2), prompts)


# -- the commands and the experiment ----------------------------------------------------------

PROSE = "The quick brown fox jumps over the lazy dog. " * 12
CODE = "def f(x):\n    return [i * 2 for i in range(x)]\n\n" * 12


def test_skip_pregate_transcoder_commands(tmp_path, capsys):
    import json

    from gatelab.cli import main
    from gatelab.experiments._trained_lm import trained_moe_lm

    run_dir = trained_moe_lm("smoke", 0, tmp_path).run_dir
    (tmp_path / "prose.txt").write_text(PROSE)
    (tmp_path / "code.txt").write_text(CODE)
    sets = ["--set", f"prose={tmp_path / 'prose.txt'}", "--set", f"code={tmp_path / 'code.txt'}"]
    common = [str(run_dir), *sets, "--seq-len", "24", "--max-prompts", "3"]
    out = tmp_path / "out"
    assert main(["skip", *common, "--target", "0.5", "--grid", "4", "--out", str(out / "s")]) == 0
    skip = json.loads((out / "s" / "skip.json").read_text())
    assert skip["curve"][0]["ratio"] == 0.0 and (out / "s" / "skip.png").is_file()
    assert {s["search"] for s in skip["searches"]} == {"1 threshold", "per set"}
    assert skip["grid"] == {"size": 4, "tau_max": 1.0, "mapping": "exp"}
    linear = ["--grid", "4", "--mapping", "linear", "--tau-max", "0.6", "--out", str(out / "l")]
    assert main(["skip", *common, *linear]) == 0
    curve = json.loads((out / "l" / "skip.json").read_text())["curve"]
    thresholds = [p["thresholds"][0] for p in curve]
    assert thresholds == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert (
        main(["pregate", *common, "--steps", "3", "--capacity", "4", "--out", str(out / "p")]) == 0
    )
    pregate = json.loads((out / "p" / "pregate.json").read_text())
    assert [m["exact"] for m in pregate["modes"]] == [True, True, True]
    assert (out / "p" / "pregates.safetensors").is_file()
    assert (
        main(
            [
                "transcoder",
                *common,
                "--layer",
                "1",
                "--hidden-dim",
                "32",
                "--steps",
                "5",
                "--out",
                str(out / "t"),
            ]
        )
        == 0
    )
    report = json.loads((out / "t" / "transcoder.json").read_text())
    assert report["hidden_dim"] == 32 and 0 <= report["l0"] <= 32
    capsys.readouterr()
    assert main(["skip", str(run_dir), "--out", str(out / "bad")]) == 2  # no calibration set
    assert "--set" in capsys.readouterr().err
    assert main(["transcoder", *common, "--layer", "9", "--out", str(out / "bad")]) == 2
    assert "no MoE block" in capsys.readouterr().err


def test_pregate_modes_stay_exact_when_the_load_reading_flips(tmp_path, monkeypatch):
    """The strategy rule reads the machine's load; a reading that flips between pregate's
    timed modes must not make them differ in the last bit (it pins one strategy)."""
    import itertools
    import json

    from gatelab.cli import main
    from gatelab.dispatch import cpu_threads
    from gatelab.experiments._trained_lm import trained_moe_lm

    run_dir = trained_moe_lm("smoke", 0, tmp_path).run_dir
    (tmp_path / "prose.txt").write_text(PROSE)
    flips = itertools.cycle([False, True, True, False, False, False, True])
    monkeypatch.setattr(cpu_threads, "machine_busy", lambda threads=None: next(flips))
    args = [str(run_dir), "--set", f"prose={tmp_path / 'prose.txt'}", "--seq-len", "24"]
    out = tmp_path / "p"
    assert main(["pregate", *args, "--max-prompts", "3", "--steps", "3", "--out", str(out)]) == 0
    modes = json.loads((out / "pregate.json").read_text())["modes"]
    assert [m["exact"] for m in modes] == [True, True, True]


def test_moe_runtime_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("moe-runtime").run("smoke", 0, tmp_path)
    assert "Skip (MoDES)" in result["table"]
    assert all(row["exact"] for row in result["offload"]["rows"])
    json_clean = __import__("json").dumps(result, allow_nan=False)
    assert json_clean
