"""``gatelab demo``: the whole pipeline on a tiny model, the profile counting, run-dir errors.

The full 10-minute demo is the ``slow`` test at the end.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from gatelab import demo
from gatelab.data.text import DOMAINS

pytest.importorskip("matplotlib")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    return parser.parse_args(list(argv))


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
    for name in demo.PLOTS.values():
        assert (run_dir / name).exists() == plots
        if plots:
            assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in report
    models = summary["models"]
    assert set(models) == {"moe", "dense"}
    for run in models.values():
        for domain in DOMAINS:
            assert _finite(run["val"][domain]["bits_per_byte"])
            assert run["val"][domain]["bits_per_byte"] > 0
            assert run["val"][domain]["tokens"] > 0
        for key in ("parameters", "active_parameters", "tokens", "tokens_per_s", "train_s"):
            assert _finite(run[key]) and run[key] > 0, key
        assert (run_dir / ("moe" if run is models["moe"] else "dense") / "metrics.jsonl").exists()
    moe, dense = models["moe"], models["dense"]
    assert moe["steps"] == dense["steps"] and moe["tokens"] == dense["tokens"]
    assert summary["same_tokens"]
    assert moe["parameters"] > dense["parameters"]
    # Same active parameters up to the routers (E * D per MoE layer for the topk router).
    cfg = moe["config"]
    router_params = cfg["num_layers"] * cfg["moe"]["num_experts"] * cfg["dim"]
    assert moe["active_parameters"] - dense["active_parameters"] == router_params
    assert len(summary["profile"]) == cfg["num_layers"]
    for layer in summary["profile"]:
        for domain in DOMAINS:
            assert sum(layer["shares"][domain]) == pytest.approx(1.0)
            assert sum(layer["counts"][domain]) > 0
            assert len(layer["shares"][domain]) == cfg["moe"]["num_experts"]
            assert sum(layer["at_init"]["shares"][domain]) == pytest.approx(1.0)
        assert 0.0 <= layer["jsd_bits"] <= 1.0 and 0.0 <= layer["total_variation"] <= 1.0
    assert (run_dir / "moe" / "routing.jsonl").exists()
    assert not (run_dir / "dense" / "routing.jsonl").exists()
    return summary


# -- the whole pipeline -------------------------------------------------------------------


def test_tiny_demo_end_to_end(tmp_path, one_thread, capsys):
    run_dir = tmp_path / "demo"
    args = parse("--tiny", "--steps", "6", "--eval-batches", "2", "--run-dir", str(run_dir))
    assert demo.run_demo(args) == 0
    summary = check_outputs(run_dir)
    assert summary["models"]["moe"]["steps"] == 6
    assert summary["eval_batches"] == {"prose": 2, "code": 2}
    # the validation batches are tiny-model batches: 2 x 4 x 32 targets per domain
    assert all(summary["models"]["moe"]["val"][d]["tokens"] == 256 for d in DOMAINS)
    out = capsys.readouterr().out
    assert "bits per byte" in out and "MoE - dense" in out and "layer 1" in out
    assert str(run_dir / "report.md") in out

    # The same command again: refused without --force, nothing touched; --force redoes it.
    stamp = (run_dir / "report.md").stat().st_mtime_ns
    assert demo.run_demo(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (run_dir / "report.md").stat().st_mtime_ns == stamp
    (run_dir / "notes.txt").write_text("mine")
    forced = parse(
        "--tiny", "--steps", "6", "--eval-batches", "2", "--run-dir", str(run_dir), "--force"
    )
    assert demo.run_demo(forced) == 0
    again = check_outputs(run_dir)
    assert (run_dir / "notes.txt").read_text() == "mine"  # --force removes only demo outputs
    # Same seed, same steps: the same numbers.
    for name in ("moe", "dense"):
        assert again["models"][name]["val"] == summary["models"][name]["val"]


def test_tiny_demo_timed_plan_without_plots(tmp_path, one_thread):
    """No --steps: a few timed steps fit the step count to --minutes; --no-plots writes none."""
    run_dir = tmp_path / "timed"
    args = parse("--tiny", "--minutes", "0.15", "--no-plots", "--run-dir", str(run_dir))
    assert demo.run_demo(args) == 0
    summary = check_outputs(run_dir, plots=False)
    plan = summary["plan"]
    assert plan["timed"] and plan["steps"] >= 1
    assert plan["moe_step_s"] > 0 and plan["dense_step_s"] > 0
    assert summary["models"]["moe"]["steps"] == plan["steps"]
    assert f"--steps {plan['steps']}" in summary["command"]
    assert summary["timing"]["total_s"] < 60


def test_unwritable_run_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args = parse("--tiny", "--steps", "2", "--run-dir", str(blocker / "demo"))
    assert demo.run_demo(args) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and str(blocker / "demo") in err


def test_options_are_checked():
    for bad in (["--minutes", "0"], ["--minutes", "nan"], ["--steps", "-1"], ["--steps", "x"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    args = parse()
    assert (args.minutes, args.run_dir, args.seed, args.force) == (10.0, "runs/demo", 0, False)
    assert args.steps is None and args.eval_batches is None and not args.tiny


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert demo.run_demo(parse("--tiny", "--run-dir", str(tmp_path / "d"))) == 2
    assert "pip install 'gatelab[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # checked before anything is written


def test_a_run_stopped_early_follows_the_full_runs_schedule(tmp_path, one_thread):
    """The dense run stops at the MoE's step (when a time cap cut the MoE short) with the
    schedule of the planned steps: its losses are the first ones of the full run."""
    from gatelab.data.text import load_corpus
    from gatelab.train import read_jsonl

    settings = demo.demo_settings(tiny=True)
    corpus = load_corpus(seed=demo.CORPUS_SEED)
    plan = {"steps": 6}
    config = settings.model
    _, full = demo.train_one("full", config, settings, plan, 0, tmp_path, corpus)
    _, cut = demo.train_one("cut", config, settings, plan, 0, tmp_path, corpus, max_steps=4)
    assert (full.step, full.stopped) == (6, "completed")
    assert (cut.step, cut.stopped) == (4, "data_exhausted")
    losses = {
        name: [(r["loss"], r["lr"]) for r in read_jsonl(tmp_path / name / "metrics.jsonl", "train")]
        for name in ("full", "cut")
    }
    assert losses["cut"] == losses["full"][:4]


# -- profile counting -------------------------------------------------------------------


def test_count_routing_on_a_hand_made_routing():
    # 5 tokens, top-2 of 3 experts; -1 marks an empty slot; the last token is padding.
    experts = torch.tensor([[0, 1], [1, -1], [2, 0], [0, 2], [1, 2]])
    domains = torch.tensor([0, 0, 1, 1, -1])  # prose, prose, code, code, padding
    counts = demo.count_routing(experts, domains, num_experts=3)
    assert counts.tolist() == [[1, 2, 0], [2, 0, 2]]
    shares = demo.routing_shares(counts)
    assert shares[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0])
    assert shares[1].tolist() == pytest.approx([0.5, 0, 0.5])
    assert shares.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_count_routing_from_a_routing_object():
    from gatelab import Routing

    logits = torch.zeros(4, 4)
    experts = torch.tensor([[3, 2], [3, -1], [0, 1], [0, 3]])
    weights = (experts >= 0).float() / 2
    routing = Routing(logits, logits.softmax(-1), experts, weights)
    counts = demo.count_routing(routing.experts, torch.tensor([0, 0, 1, 1]), routing.num_experts)
    assert counts.tolist() == [[0, 0, 1, 2], [2, 1, 0, 1]]
    assert counts.sum() == routing.valid.sum()
    with pytest.raises(ValueError, match="experts"):
        demo.count_routing(experts, torch.tensor([0, 1]), 4)


def test_routing_shares_of_an_empty_domain_are_zero():
    shares = demo.routing_shares(torch.tensor([[0, 0], [3, 1]]))
    assert shares.tolist() == [[0.0, 0.0], [0.75, 0.25]]


def test_specialisation_scores():
    same = demo.specialisation(torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    assert same["jsd_bits"] == pytest.approx(0.0, abs=1e-12)
    assert same["total_variation"] == pytest.approx(0.0)
    disjoint = demo.specialisation(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))
    assert disjoint["jsd_bits"] == pytest.approx(1.0)
    assert disjoint["total_variation"] == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4), JSD = (log2(4/3) + (1/2)log2(2/3) + (1/2)log2(2)) / 2
    half = demo.specialisation(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    expected = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2)) / 2
    assert half["jsd_bits"] == pytest.approx(expected)
    assert half["total_variation"] == pytest.approx(0.5)


def test_profile_moe_counts_every_real_token(one_thread):
    """profile_moe over batches with padding: K slots per real token, padding skipped."""
    from gatelab.data.text import IGNORE_INDEX, LMBatch
    from gatelab.models.lm import LM

    settings = demo.demo_settings(tiny=True)
    torch.manual_seed(0)
    model = LM(settings.model)
    ids = torch.randint(0, 256, (2, 8))
    targets = ids.clone()
    doms = torch.zeros(2, 8, dtype=torch.long)
    targets[1, 5:], doms[1, 5:] = IGNORE_INDEX, -1
    sets = {"prose": [LMBatch(ids, targets, doms)], "code": [LMBatch(ids, targets, doms + 1)]}
    sets["code"][0].domains[1, 5:] = -1
    profile = demo.profile_moe(model, sets)
    top_k = settings.model.top_k
    for layer in profile:
        assert sum(layer["counts"]["prose"]) == 13 * top_k
        assert sum(layer["counts"]["code"]) == 13 * top_k
        # the same tokens under both labels: identical rows
        assert layer["counts"]["prose"] == layer["counts"]["code"]
        assert layer["jsd_bits"] == pytest.approx(0.0, abs=1e-12)
    val = demo.evaluate(model, sets)
    assert val["prose"]["tokens"] == val["code"]["tokens"] == 13
    assert val["prose"]["bits_per_byte"] == pytest.approx(val["code"]["bits_per_byte"])


# -- the real demo ---------------------------------------------------------------------------


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The default demo (10 minutes on 2 CPU cores) into a temporary directory."""
    run_dir = tmp_path / "demo"
    assert demo.run_demo(parse("--run-dir", str(run_dir))) == 0
    summary = check_outputs(run_dir)
    assert summary["timing"]["total_s"] < 1.15 * 600
    moe, dense = summary["models"]["moe"], summary["models"]["dense"]
    assert moe["steps"] >= 50
    for domain in DOMAINS:  # both models learned far below 8 bits per byte
        assert moe["val"][domain]["bits_per_byte"] < 4.0
        assert dense["val"][domain]["bits_per_byte"] < 4.0
