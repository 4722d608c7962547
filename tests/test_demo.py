"""``gatelab demo``: the tiny pipeline end to end, the fixed step plan, the profile counting,
run-dir errors.

The full 10-minute demo is the ``slow`` test at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pytest
import torch

from gatelab.commands import demo, demo_report
from gatelab.data.text import DOMAINS
from gatelab.inspect.profile import (
    LabelProfile,
    divergence,
    profile_labels,
    slot_counts,
    slot_shares,
)

pytest.importorskip("matplotlib")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


@pytest.fixture
def one_thread():
    """The tiny models on one thread (two threads stall on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_outputs(run_dir: Path, plots: bool = True) -> dict:
    """The report, the plots and a summary with finite numbers for both models and domains."""
    report = (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "gatelab demo" in summary["command"] and summary["command"] in report
    assert "$" not in report  # every template field was filled
    for name in demo.PLOTS.values():
        assert (run_dir / name).exists() == plots
        if plots:
            assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in report
    models = summary["models"]
    assert set(models) == {"moe", "dense"}
    for name, run in models.items():
        for domain in DOMAINS:
            assert _finite(run["val"][domain]["bits_per_byte"])
            assert run["val"][domain]["bits_per_byte"] > 0
            assert run["val"][domain]["tokens"] > 0
        for key in ("parameters", "active_parameters", "tokens", "tokens_per_s", "train_s"):
            assert _finite(run[key]) and run[key] > 0, key
        assert (run_dir / name / "metrics.jsonl").exists()
        assert run["recipe"] == demo.RECIPES[name]
    moe, dense = models["moe"], models["dense"]
    assert moe["steps"] == dense["steps"] == summary["plan"]["steps"]
    assert moe["tokens"] == dense["tokens"] and summary["same_tokens"]
    assert moe["parameters"] > dense["parameters"]
    # Same active parameters up to the routers (E * D per MoE layer for the topk router).
    shape = moe["shape"]
    router_params = shape["num_layers"] * shape["num_experts"] * shape["dim"]
    assert moe["active_parameters"] - dense["active_parameters"] == router_params
    assert len(summary["profile"]) == shape["num_layers"]
    for layer in summary["profile"]:
        for domain in DOMAINS:
            assert sum(layer["shares"][domain]) == pytest.approx(1.0)
            assert sum(layer["counts"][domain]) > 0
            assert len(layer["shares"][domain]) == shape["num_experts"]
            assert sum(layer["at_init"]["shares"][domain]) == pytest.approx(1.0)
        assert 0.0 <= layer["jsd_bits"] <= 1.0 and 0.0 <= layer["total_variation"] <= 1.0
        # the prose-leaning cell shows the expert's real shares (not 0.00 vs 0.00)
        lean = layer["leaning"]
        assert lean["prose"] == layer["shares"]["prose"][lean["expert"]] > 0
        assert lean["code"] == layer["shares"]["code"][lean["expert"]]
        assert demo_report.leaning_text(layer) in report
    assert "0.000 of prose vs 0.000 of code" not in report
    assert (run_dir / "moe" / "routing.jsonl").exists()
    assert not (run_dir / "dense" / "routing.jsonl").exists()
    return summary


def numbers(summary: dict) -> dict:
    """Every number of a summary that does not depend on the clock."""
    keep = ("steps", "tokens", "val", "final_train_loss", "parameters")
    models = {n: {k: m[k] for k in keep} for n, m in summary["models"].items()}
    return {"plan": summary["plan"], "models": models, "profile": summary["profile"]}


# -- the whole pipeline -------------------------------------------------------------------


def test_tiny_demo_end_to_end(tmp_path, one_thread, capsys):
    run_dir = tmp_path / "demo"
    args = parse("--tiny", "--minutes", "0.1", "--run-dir", str(run_dir))
    assert demo.run(args) == 0
    summary = check_outputs(run_dir)
    assert summary["plan"] == {**summary["plan"], "steps": 6, "eval_batches": 1}
    assert summary["eval_batches"] == {"prose": 1, "code": 1}
    # the validation batches are tiny-model batches: 1 x 4 x 32 targets per domain
    assert all(summary["models"]["moe"]["val"][d]["tokens"] == 128 for d in DOMAINS)
    out = capsys.readouterr().out
    assert "bits per byte" in out and "MoE - dense" in out and "| 1 |" in out
    assert str(run_dir / "report.md") in out

    # The same command again: refused without --force, nothing touched; --force redoes it.
    stamp = (run_dir / "report.md").stat().st_mtime_ns
    with pytest.raises(ValueError, match="--force"):
        demo.run(args)
    assert (run_dir / "report.md").stat().st_mtime_ns == stamp
    (run_dir / "notes.txt").write_text("mine")
    assert demo.run(parse("--tiny", "--minutes", "0.1", "--run-dir", str(run_dir), "--force")) == 0
    again = check_outputs(run_dir)
    assert (run_dir / "notes.txt").read_text() == "mine"  # --force removes only demo outputs
    # Two runs of the same command: the same numbers.
    assert numbers(again) == numbers(summary)


def test_a_slow_clock_trains_the_same_steps_and_gives_the_same_numbers(
    tmp_path, one_thread, monkeypatch
):
    """The work is fixed by --minutes, not measured: a machine 100x slower (a clock that runs
    100x faster) trains the same steps and prints the same numbers, only later."""
    argv = ["--tiny", "--minutes", "0.2", "--no-plots", "--run-dir"]
    assert demo.run(parse(*argv, str(tmp_path / "normal"))) == 0
    normal = check_outputs(tmp_path / "normal", plots=False)
    start_perf, start_wall = time.perf_counter(), time.time()
    real_perf, real_wall = time.perf_counter, time.time
    monkeypatch.setattr(time, "perf_counter", lambda: start_perf + 100 * (real_perf() - start_perf))
    monkeypatch.setattr(time, "time", lambda: start_wall + 100 * (real_wall() - start_wall))
    assert demo.run(parse(*argv, str(tmp_path / "slow"))) == 0
    monkeypatch.undo()
    slow = check_outputs(tmp_path / "slow", plots=False)
    assert slow["timing"]["total_s"] > 10 * normal["timing"]["total_s"]  # the clock did slow
    assert slow["plan"]["steps"] == normal["plan"]["steps"] == 12
    assert numbers(slow) == numbers(normal)


def test_the_step_plan_is_a_pure_function_of_minutes():
    table = {m: demo.plan_for(m) for m in (0.1, 1, 5, 10, 20)}
    assert [(p.steps, p.eval_batches) for p in table.values()] == [
        (6, 1),
        (62, 5),
        (310, 26),
        (621, 52),
        (1243, 105),
    ]
    assert demo.plan_for(10) == table[10]  # nothing measured: the same plan every time
    pair_s = sum(demo.REFERENCE_STEP_S.values())
    for minutes, plan in table.items():
        if minutes < 1:
            continue
        train_s = plan.steps * pair_s
        eval_s = plan.eval_batches * len(DOMAINS) * (3 * 0.44 + 0.38) / 3
        assert eval_s <= 0.1 * plan.reference_s  # evaluation: at most a tenth of the run
        assert train_s >= 0.8 * plan.reference_s
        assert plan.reference_s <= 60 * minutes * 1.001
        assert plan.from_table
    given = demo.plan_for(10, steps=7, eval_batches=2)
    assert (given.steps, given.eval_batches, given.from_table) == (7, 2, False)


def test_the_demo_is_the_recipes_with_few_overrides(tmp_path):
    args = parse("--minutes", "1", "--seed", "3", "--run-dir", str(tmp_path))
    plan = demo.plan_for(1)
    for name in demo.RECIPES:
        keys = [o.partition("=")[0] for o in demo.overrides(name, args, plan, tmp_path / name)]
        assert all(k.startswith(("train.", "data.eval_batches")) for k in keys), keys
        assert "train.seed" in keys and "train.steps" in keys
    settings = demo.overrides("moe", args, plan, tmp_path / "moe")
    assert "train.warmup_steps=6" in settings  # the recipe's 100 of 1000 steps, scaled


def test_build_run_takes_a_name_a_path_or_a_dict_and_overrides():
    from gatelab.recipes import build_run, load_recipe, recipe_path

    tiny = [*demo.TINY, "train.steps=3", "data.eval_batches=1"]
    recipe = load_recipe("moe-lm")
    before = json.dumps(recipe, sort_keys=True)
    runs = []
    for source in ("moe-lm", recipe_path("moe-lm"), recipe):
        torch.manual_seed(0)
        runs.append(build_run(source, tiny))
    assert json.dumps(recipe, sort_keys=True) == before  # a dict is not changed in place
    assert {r.train_config.steps for r in runs} == {3}
    assert {r.model.config.dim for r in runs} == {32}
    states = [r.model.state_dict() for r in runs]
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    assert [len(b) for b in runs[0].eval_sets.values()] == [1, 1]


def test_unwritable_run_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args = parse("--tiny", "--steps", "2", "--run-dir", str(blocker / "demo"))
    with pytest.raises(ValueError, match="not writable") as error:
        demo.run(args)
    assert str(blocker / "demo") in str(error.value)


def test_options_are_checked():
    for bad in (["--minutes", "0"], ["--minutes", "nan"], ["--steps", "-1"], ["--steps", "x"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    args = parse()
    assert (args.minutes, args.run_dir, args.seed, args.force) == (10.0, "runs/demo", 0, False)
    assert args.steps is None and args.eval_batches is None and not args.tiny
    assert args.func is demo.run


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ValueError, match=r"pip install 'gatelab\[plots\]'"):
        demo.run(parse("--tiny", "--run-dir", str(tmp_path / "d")))
    assert not (tmp_path / "d").exists()  # checked before anything is written


# -- profile counting (gatelab.inspect.profile) --------------------------------------------


def test_slot_counts_on_a_hand_made_routing():
    # 5 tokens, top-2 of 3 experts; -1 marks an empty slot; the last token is padding.
    experts = torch.tensor([[0, 1], [1, -1], [2, 0], [0, 2], [1, 2]])
    domains = torch.tensor([0, 0, 1, 1, -1])  # prose, prose, code, code, padding
    counts = slot_counts(experts, domains, num_labels=2, num_experts=3)
    assert counts.tolist() == [[1, 2, 0], [2, 0, 2]]
    shares = slot_shares(counts)
    assert shares[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0])
    assert shares[1].tolist() == pytest.approx([0.5, 0, 0.5])
    assert shares.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_slot_counts_from_a_routing_object():
    from gatelab import Routing

    logits = torch.zeros(4, 4)
    experts = torch.tensor([[3, 2], [3, -1], [0, 1], [0, 3]])
    weights = (experts >= 0).float() / 2
    routing = Routing(logits, logits.softmax(-1), experts, weights)
    counts = slot_counts(routing.experts, torch.tensor([0, 0, 1, 1]), 2, routing.num_experts)
    assert counts.tolist() == [[0, 0, 1, 2], [2, 1, 0, 1]]
    assert counts.sum() == routing.valid.sum()
    with pytest.raises(ValueError, match="experts"):
        slot_counts(experts, torch.tensor([0, 1]), 2, 4)


def test_slot_shares_of_an_empty_label_are_zero():
    shares = slot_shares(torch.tensor([[0, 0], [3, 1]]))
    assert shares.tolist() == [[0.0, 0.0], [0.75, 0.25]]


def test_divergence_scores():
    same = divergence(torch.tensor([0.25, 0.75]), torch.tensor([0.25, 0.75]))
    assert same["jsd_bits"] == pytest.approx(0.0, abs=1e-12)
    assert same["total_variation"] == pytest.approx(0.0)
    disjoint = divergence(torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert disjoint["jsd_bits"] == pytest.approx(1.0)
    assert disjoint["total_variation"] == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4),
    # JSD = (log2(4/3) + (1/2)log2(2/3) + (1/2)log2(2)) / 2
    half = divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    expected = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2)) / 2
    assert half["jsd_bits"] == pytest.approx(expected)
    assert half["total_variation"] == pytest.approx(0.5)


def test_the_prose_leaning_expert_has_real_shares():
    """The old report took the largest prose/code ratio, so an expert no token reaches
    (0 / 0, counted as infinite) won and printed "0.00 of prose vs 0.00 of code"."""
    counts = torch.tensor([[[0, 60, 30, 10], [0, 20, 30, 50]]])  # expert 0: unused
    profile = LabelProfile([0], ["blocks.0.ffn"], ["prose", "code"], counts)
    assert profile.leaning("prose", "code") == [(1, 0.6, 0.2)]
    assert profile.leaning("code", "prose") == [(3, 0.5, 0.1)]
    row = {"leaning": {"expert": 1, "prose": 0.6, "code": 0.2}}
    assert demo_report.leaning_text(row) == "1 (0.600 of prose vs 0.200 of code)"


def test_profile_labels_counts_every_real_token(one_thread):
    """profile_labels over batches with padding: K slots per real token, padding skipped."""
    from gatelab.inspect.access import find_moe_blocks
    from gatelab.recipes import build_run

    torch.manual_seed(0)
    model = build_run("moe-lm", demo.TINY).model
    ids = torch.randint(0, 256, (2, 8))
    doms = torch.zeros(2, 8, dtype=torch.long)
    doms[1, 5:] = -1
    code = doms + 1
    code[1, 5:] = -1
    model.train()
    profile = profile_labels(model, [(ids, doms), (ids, code)], list(DOMAINS))
    assert model.training  # the mode is restored
    top_k = find_moe_blocks(model)[0].top_k
    for row in profile.to_rows():
        assert sum(row["counts"]["prose"]) == 13 * top_k
        # the same tokens under both labels: identical rows
        assert row["counts"]["prose"] == row["counts"]["code"]
    for scores in profile.divergence("prose", "code"):
        assert scores["jsd_bits"] == pytest.approx(0.0, abs=1e-12)


# -- the real demo ---------------------------------------------------------------------------


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The default demo (about 10 minutes on an idle 2-core machine) into a temporary dir."""
    run_dir = tmp_path / "demo"
    assert demo.run(parse("--run-dir", str(run_dir))) == 0
    summary = check_outputs(run_dir)
    moe, dense = summary["models"]["moe"], summary["models"]["dense"]
    assert moe["steps"] == demo.plan_for(10).steps
    for domain in DOMAINS:  # both models learned far below 8 bits per byte
        assert moe["val"][domain]["bits_per_byte"] < 4.0
        assert dense["val"][domain]["bits_per_byte"] < 4.0
