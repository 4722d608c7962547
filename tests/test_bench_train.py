"""`gatelab bench train`: schema of the results, times and ratios, round-robin, bad options."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch

from gatelab.bench import train
from gatelab.bench.train import (
    MODELS,
    SCHEMA,
    TARGET_RATIO,
    TrainBenchSettings,
    format_table,
    measure_round_robin,
    moe_config,
    run_train_bench,
)
from gatelab.commands.bench import add_train_arguments as add_arguments
from gatelab.commands.bench import run_train as run
from gatelab.io import write_json
from gatelab.models.config import ConfigError
from gatelab.models.lm import LMConfig

TINY = LMConfig(
    vocab_size=257,
    dim=32,
    num_layers=2,
    num_heads=2,
    max_seq_len=16,
    ffn_hidden_dim=32,
    num_experts=4,
    top_k=2,
    expert_hidden_dim=16,
)
SIZES = {"batch_size": 2, "seq_len": 16, "warmup": 1, "repeats": 2}
MODEL_KEYS = {
    "config",
    "parameters",
    "active_parameters",
    "active_parameters_no_embedding",
    "moe_layers",
    "step_s",
    "step_min_s",
    "step_times_s",
    "tokens_per_s",
    "losses",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on one thread: two threads stall when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result():
    settings = TrainBenchSettings(device="cpu", data="random", **SIZES)
    return run_train_bench(settings, TINY, command="test", log=None)


def test_result_schema(result):
    assert result["schema"] == SCHEMA
    assert result["command"] == "test"
    for key in ("started_at", "finished_at", "environment", "settings", "data", "models"):
        assert result[key]
    env = result["environment"]
    for key in ("torch", "device", "device_name", "threads", "load_average_1m_at_end"):
        assert key in env
    assert env["device"] == "cpu" and env["threads"] >= 1
    settings = result["settings"]
    assert {k: settings[k] for k in SIZES} == SIZES
    assert settings["tokens_per_step"] == 2 * 16
    assert (settings["device"], settings["dtype"], settings["data"]) == ("cpu", "float32", "random")
    assert result["data"]["source"] == "random"
    assert result["data"]["distinct_batches"] == SIZES["warmup"] + SIZES["repeats"]
    assert set(result["models"]) == set(MODELS)
    for entry in result["models"].values():
        assert set(entry) == MODEL_KEYS
    target = result["target"]
    assert target["ratio"] == TARGET_RATIO == 0.8
    assert target["met"] == (result["ratio_tokens_per_s"] >= TARGET_RATIO)


def test_times_positive_finite_and_ratio_consistent(result):
    tokens = result["settings"]["tokens_per_step"]
    for entry in result["models"].values():
        times = entry["step_times_s"]
        assert len(times) == SIZES["repeats"]
        assert all(_positive(t) for t in times)
        assert _positive(entry["step_s"]) and entry["step_min_s"] <= entry["step_s"]
        assert entry["tokens_per_s"] == pytest.approx(tokens / entry["step_s"])
        # Every step, warm-up included, trained and recorded a finite loss.
        assert len(entry["losses"]) == SIZES["warmup"] + SIZES["repeats"]
        assert all(_positive(loss) for loss in entry["losses"])
    moe, dense = result["models"]["moe"], result["models"]["dense"]
    ratio = result["ratio_tokens_per_s"]
    assert ratio == pytest.approx(moe["tokens_per_s"] / dense["tokens_per_s"])
    assert ratio == pytest.approx(dense["step_s"] / moe["step_s"])


def test_models_have_equal_active_parameters_up_to_routers(result):
    moe, dense = result["models"]["moe"], result["models"]["dense"]
    assert moe["moe_layers"] == TINY.num_layers and dense["moe_layers"] == 0
    assert moe["config"]["moe_layers"] == "all" and dense["config"]["moe_layers"] == "none"
    assert dense["config"]["ffn_hidden_dim"] == TINY.top_k * TINY.expert_hidden_dim
    routers = TINY.num_layers * TINY.num_experts * TINY.dim  # topk: one [E, D] weight per layer
    assert moe["active_parameters"] - dense["active_parameters"] == routers
    assert dense["parameters"] == dense["active_parameters"]
    assert moe["parameters"] > moe["active_parameters"]


def test_json_round_trip_and_table(result, tmp_path):
    path = write_json(tmp_path / "deep" / "train-cpu.json", result)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert os.listdir(path.parent) == ["train-cpu.json"]
    table = format_table(result)
    for text in ("step ms", "tokens/s", "active params", "total params", "ratio moe/dense"):
        assert text in table
    assert f"{result['ratio_tokens_per_s']:.2f}" in table
    assert ("met" if result["target"]["met"] else "NOT met") in table
    assert "random data" in table


def test_corpus_batches_router_and_dispatcher():
    settings = TrainBenchSettings(
        device="cpu", data="corpus", router="topk_softmax", dispatcher="loop", **SIZES
    )
    out = run_train_bench(settings, TINY, log=None)
    assert out["data"]["source"] == "corpus" and out["data"]["train_tokens"] > 10**6
    moe = out["models"]["moe"]["config"]
    assert (moe["moe"]["router"], moe["moe"]["dispatcher"]) == ("topk_softmax", "loop")
    assert _positive(out["ratio_tokens_per_s"])


def test_round_robin_alternates_order_and_warms_up_untimed():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = measure_round_robin(steps, warmup=2, repeats=3, sync=None)
    assert calls == ["a", "b", "b", "a"] + ["a", "b", "b", "a", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}


def test_defaults_are_the_reference_model_and_sizes():
    settings = TrainBenchSettings(device="cpu").resolved()
    assert (settings.batch_size, settings.seq_len) == (8, 256)
    assert settings.warmup >= 1 and settings.repeats >= 5
    config = moe_config(settings)
    assert (config.num_layers, config.dim, config.num_heads) == (4, 256, 4)
    assert (config.num_experts, config.top_k, config.expert_hidden_dim) == (8, 2, 512)
    assert config.vocab_size == 257
    quick = TrainBenchSettings(device="cpu", quick=True).resolved()
    assert quick.batch_size * quick.seq_len < settings.batch_size * settings.seq_len
    assert quick.repeats < settings.repeats
    long = TrainBenchSettings(device="cpu", seq_len=512).resolved()
    assert moe_config(long).max_seq_len == 512


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"seq_len": -3}, "seq_len must be an integer >= 1"),
        ({"repeats": 0}, "repeats must be an integer >= 1"),
        ({"warmup": -1}, "warmup must be an integer >= 0"),
        ({"data": "wikipedia"}, "unknown data source 'wikipedia'; valid: corpus, random"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"contended": -1}, "contended must be an integer >= 0"),
    ],
)
def test_bad_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError) as error:
        TrainBenchSettings(**changes).resolved()
    assert message in str(error.value)


def test_bad_router_dispatcher_or_config_name_the_problem():
    with pytest.raises(ConfigError, match="router.*'nope'.*topk"):
        moe_config(TrainBenchSettings(router="nope").resolved())
    with pytest.raises(ConfigError, match="dispatcher.*'fast'.*grouped"):
        moe_config(TrainBenchSettings(dispatcher="fast").resolved())
    with pytest.raises(ConfigError, match="no MoE layer"):
        moe_config(TrainBenchSettings().resolved(), TINY.replace(moe_layers="none"))
    with pytest.raises(ConfigError, match="vocab_size >= 257"):
        moe_config(TrainBenchSettings().resolved(), TINY.replace(vocab_size=100))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="--device cuda.*use --device cpu"):
        TrainBenchSettings(device="cuda").resolved()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatelab bench train")
    add_arguments(parser)
    return parser


@pytest.mark.parametrize(
    "args",
    [
        ["--batch-size", "0"],
        ["--seq-len", "x"],
        ["--repeats", "0"],
        ["--warmup", "-1"],
        ["--router", "nope"],
        ["--dispatcher", "fast"],
        ["--data", "wikipedia"],
        ["--device", "tpu"],
        ["--contended", "0"],
    ],
)
def test_cli_rejects_bad_options(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(args)
    assert exit_.value.code == 2
    assert f"argument {args[0]}" in capsys.readouterr().err


def test_cli_seq_len_longer_than_corpus_is_a_usage_error(capsys):
    args = _parser().parse_args(["--device", "cpu", "--seq-len", str(10**8)])
    with pytest.raises(SystemExit) as exit_:
        run(args)
    assert exit_.value.code == 2
    assert "too long" in capsys.readouterr().err


def test_cli_run_prints_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "reference_config", lambda: TINY)
    path = tmp_path / "out" / "train.json"
    args = _parser().parse_args(
        ["--device", "cpu", "--batch-size", "2", "--seq-len", "16", "--warmup", "1"]
        + ["--repeats", "2", "--data", "random", "--json", str(path)]
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "ratio moe/dense tokens/s" in out and f"wrote {path}" in out
    saved = json.loads(path.read_text())
    assert saved["schema"] == SCHEMA
    assert saved["settings"]["batch_size"] == 2 and saved["settings"]["seq_len"] == 16


def test_gatelab_cli_wires_bench_train(capsys):
    """Once cli.py registers `gatelab bench train`, its help lists this module's options."""
    from gatelab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    if "train" not in capsys.readouterr().out:
        pytest.skip("`gatelab bench train` is not wired into gatelab.cli yet")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "train", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--quick", "--batch-size", "--seq-len", "--router", "--dispatcher", "--json"):
        assert option in help_text


def test_contended_run_records_the_busy_processes():
    """--contended N: the steps are timed beside N busy processes; the JSON and the table say
    so (an idle run says contended: 0)."""
    assert _parser().parse_args(["--contended"]).contended == 1
    assert _parser().parse_args(["--contended", "2"]).contended == 2
    assert _parser().parse_args([]).contended == 0
    settings = TrainBenchSettings(device="cpu", data="random", contended=1, **SIZES)
    out = run_train_bench(settings, TINY, log=None)
    assert out["contended"] == out["settings"]["contended"] == 1
    assert "busy processes" in out["settings"]["contention"]
    assert _positive(out["ratio_tokens_per_s"])
    assert "contended: 1 busy process" in format_table(out)


def test_idle_run_records_no_contention(result):
    assert result["contended"] == result["settings"]["contended"] == 0
    assert result["settings"]["contention"] is None
    assert "contended: 0" in format_table(result)
