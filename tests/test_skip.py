"""MoDES expert skipping (gatelab.edit.skip) on gatelab and HF MoE models."""

from __future__ import annotations

import pytest
import torch
from lm_tiny import tiny_moe_lm

from gatelab.edit import find_moe_blocks
from gatelab.edit.skip import (
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
    seen = {}

    def manual(layer):
        def edit(r):
            pi = r.scores.gather(1, r.experts.clamp_min(0))
            out = r.keep_slots(~(alpha[layer] * pi < tau))
            seen[layer] = out
            return out

        return edit

    with edit_routing(model, {layer: manual(layer) for layer in alpha}):
        expected = _logits(model, prompts[0])
    with skip_experts(model, alpha, tau):
        torch.testing.assert_close(_logits(model, prompts[0]), expected, rtol=0, atol=0)


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
    assert len(evaluate.points) <= 2 * 5 + 1  # the staircase, not the whole grid
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


def test_moe_runtime_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("moe-runtime").run("smoke", 0, tmp_path)
    assert "Skip (MoDES)" in result["table"]
    assert all(row["exact"] for row in result["offload"]["rows"])
    json_clean = __import__("json").dumps(result, allow_nan=False)
    assert json_clean
