"""`gatelab bench generate`: schema of the results, tokens/s and ratios, the token check,
round-robin, skipped implementations and bad options, on tiny models (hidden 64, 2 layers)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from gatelab.bench import generate  # noqa: E402
from gatelab.bench.generate import (  # noqa: E402
    IMPLEMENTATIONS,
    MODELS,
    SCHEMA,
    GenerateBenchSettings,
    format_table,
    measure_round_robin,
    model_config,
    run_generate_bench,
)
from gatelab.cli import main  # noqa: E402
from gatelab.commands.bench import add_generate_arguments  # noqa: E402
from gatelab.io import write_json  # noqa: E402

SIZES = {"max_new_tokens": 3, "prompt_len": 4, "batch_size": 2, "warmup": 1, "repeats": 2}
TIMED_KEYS = {
    "skipped",
    "generate_s",
    "generate_min_s",
    "times_s",
    "tokens_per_s",
    "same_tokens",
    "first_mismatch",
}


def _tiny_configs(names=MODELS) -> dict:
    return {name: model_config(name, hidden_size=64, num_layers=2) for name in names}


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
    settings = GenerateBenchSettings(device="cpu", **SIZES)
    return run_generate_bench(settings, _tiny_configs(), command="test", log=None)


def test_result_schema(result):
    assert result["schema"] == SCHEMA == "gatelab.bench.generate/1"
    assert result["command"] == "test"
    for key in ("started_at", "finished_at", "environment", "settings", "models"):
        assert result[key]
    assert result["contended"] == 0
    env = result["environment"]
    for key in ("torch", "transformers", "device", "threads", "load_average_1m_at_end"):
        assert key in env
    settings = result["settings"]
    assert {k: settings[k] for k in SIZES} == SIZES
    assert (settings["device"], settings["dtype"]) == ("cpu", "float32")
    assert (
        settings["implementations"] == list(IMPLEMENTATIONS) == ["eager", "grouped_mm", "gatelab"]
    )
    assert settings["models"] == list(MODELS)
    assert list(result["models"]) == list(MODELS)
    for entry in result["models"].values():
        assert set(entry["implementations"]) == set(IMPLEMENTATIONS)
        assert entry["new_tokens_per_call"] == 2 * 3
        assert entry["config"]["hidden_size"] == 64 and entry["config"]["num_hidden_layers"] == 2
        assert entry["parameters"] > 0 and entry["reference"] == "eager"


def test_model_sizes_follow_the_issue(result):
    models = result["models"]
    mixtral, qwen = models["mixtral"]["config"], models["qwen3_moe"]["config"]
    assert {"num_experts": 8, "top_k": 2, "moe_layers": 2}.items() <= mixtral.items()
    assert {"num_experts": 64, "top_k": 8, "moe_layers": 2}.items() <= qwen.items()
    deepseek = models["deepseek_v3"]["config"]
    assert (deepseek["num_experts"], deepseek["top_k"], deepseek["shared_experts"]) == (64, 8, 1)
    assert deepseek["moe_layers"] == 1  # first_k_dense_replace=1: the first layer is dense


def test_times_positive_and_ratios_consistent(result):
    for entry in result["models"].values():
        impls = entry["implementations"]
        for timed in impls.values():
            assert timed["skipped"] is None
            assert TIMED_KEYS == set(timed)
            assert len(timed["times_s"]) == SIZES["repeats"]
            assert all(_positive(t) for t in timed["times_s"])
            assert timed["generate_min_s"] <= timed["generate_s"]
            assert timed["tokens_per_s"] == pytest.approx(2 * 3 / timed["generate_s"])
        for other in ("grouped_mm", "eager"):
            ratio = entry["ratios"][f"gatelab_vs_{other}"]
            assert _positive(ratio)
            assert ratio == pytest.approx(
                impls["gatelab"]["tokens_per_s"] / impls[other]["tokens_per_s"]
            )


def test_token_check_is_recorded(result):
    for entry in result["models"].values():
        impls = entry["implementations"]
        assert isinstance(entry["same_tokens"], bool)
        assert entry["same_tokens"] == all(t["same_tokens"] for t in impls.values())
        assert impls["eager"]["same_tokens"] and impls["eager"]["first_mismatch"] is None
        for timed in impls.values():
            assert (timed["first_mismatch"] is None) == timed["same_tokens"]


def test_json_round_trip_and_table(result, tmp_path):
    path = write_json(tmp_path / "generate.json", result)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    table = format_table(result)
    for text in ("eager tok/s", "grouped_mm tok/s", "gatelab tok/s", "gatelab/grouped_mm"):
        assert text in table
    for name in MODELS:
        assert name in table
    assert "contended: 0" in table
    ratio = result["models"]["mixtral"]["ratios"]["gatelab_vs_eager"]
    assert f"{ratio:.2f}" in table


def test_round_robin_alternates_and_switches_outside_the_clock():
    events = []

    class Model:
        def set_experts_implementation(self, name):
            events.append(("set", name))

    times = measure_round_robin(
        Model(), ["a", "b"], lambda: events.append(("call",)), warmup=1, repeats=3, sync=None
    )
    sets = [e[1] for e in events if e[0] == "set"]
    assert sets == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert [e[0] for e in events] == ["set", "call"] * 8
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}


def test_rejected_implementation_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(generate, "IMPLEMENTATIONS", ("eager", "no_such_experts", "gatelab"))
    settings = GenerateBenchSettings(
        device="cpu", max_new_tokens=2, prompt_len=3, warmup=1, repeats=1, models=("mixtral",)
    )
    out = run_generate_bench(settings, _tiny_configs(["mixtral"]), log=None)
    impls = out["models"]["mixtral"]["implementations"]
    assert "no_such_experts" in impls["no_such_experts"]["skipped"]
    assert _positive(impls["gatelab"]["tokens_per_s"])
    assert out["models"]["mixtral"]["ratios"]["gatelab_vs_eager"] is not None
    assert "skipped" in format_table(out)


def test_contended_run_records_the_busy_process():
    settings = GenerateBenchSettings(
        device="cpu", max_new_tokens=2, prompt_len=3, warmup=1, repeats=1, contended=1
    )
    out = run_generate_bench(settings, _tiny_configs(["qwen3_moe"]), log=None)
    assert out["contended"] == out["settings"]["contended"] == 1
    assert "busy" in out["settings"]["contention"]
    assert "contended: 1 busy process" in format_table(out)


def test_default_settings_and_configs():
    settings = GenerateBenchSettings(device="cpu").resolved()
    assert (settings.max_new_tokens, settings.prompt_len, settings.batch_size) == (48, 16, 1)
    assert settings.models == MODELS and settings.contended == 0
    quick = GenerateBenchSettings(device="cpu", quick=True).resolved()
    assert quick.max_new_tokens < settings.max_new_tokens and quick.repeats <= settings.repeats
    mixtral = model_config("mixtral")
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_hidden_layers) == (
        512,
        1024,
        4,
    )
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (8, 2)
    assert (mixtral.num_attention_heads, mixtral.num_key_value_heads) == (8, 2)
    qwen = model_config("qwen3_moe")
    assert (qwen.moe_intermediate_size, qwen.num_experts, qwen.num_experts_per_tok) == (128, 64, 8)
    assert qwen.decoder_sparse_step == 1 and qwen.mlp_only_layers == []
    deepseek = model_config("deepseek_v3")
    assert (deepseek.moe_intermediate_size, deepseek.n_routed_experts) == (256, 64)
    assert (deepseek.num_experts_per_tok, deepseek.n_shared_experts) == (8, 1)
    assert deepseek.n_routed_experts % deepseek.n_group == 0
    assert deepseek.topk_group <= deepseek.n_group
    assert all(c.vocab_size == 1024 for c in (mixtral, qwen, deepseek))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"models": ("gpt2",)}, "unknown model(s) 'gpt2'; valid: mixtral, qwen3_moe"),
        ({"models": ("mixtral", "mixtral")}, "models must not repeat"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"prompt_len": 0}, "prompt_len must be an integer >= 1"),
        ({"batch_size": -1}, "batch_size must be an integer >= 1"),
        ({"warmup": 0}, "warmup must be an integer >= 1 (the first untimed call"),
        ({"repeats": 0}, "repeats must be an integer >= 1"),
        ({"contended": -1}, "contended must be an integer >= 0"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_bad_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError) as error:
        GenerateBenchSettings(**changes).resolved()
    assert message in str(error.value)


def test_bad_model_config_arguments():
    with pytest.raises(ValueError, match="unknown model 'llama'; valid: mixtral"):
        model_config("llama")
    with pytest.raises(ValueError, match="multiple of 16"):
        model_config("mixtral", hidden_size=40)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatelab bench generate")
    add_generate_arguments(parser)
    return parser


@pytest.mark.parametrize(
    "args",
    [
        ["--models", "gpt2"],
        ["--max-new-tokens", "0"],
        ["--prompt-len", "x"],
        ["--batch-size", "0"],
        ["--warmup", "0"],
        ["--repeats", "0"],
        ["--contended", "0"],
        ["--device", "tpu"],
    ],
)
def test_cli_rejects_bad_options(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(args)
    assert exit_.value.code == 2
    assert f"argument {args[0]}" in capsys.readouterr().err


def test_cli_options():
    args = _parser().parse_args(["--contended", "--quick", "--models", "mixtral", "deepseek_v3"])
    assert args.contended == 1 and args.quick and args.models == ["mixtral", "deepseek_v3"]
    assert _parser().parse_args(["--contended", "2"]).contended == 2
    assert _parser().parse_args([]).contended == 0


def test_cli_main_prints_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        generate, "default_configs", lambda settings: _tiny_configs(settings.models)
    )
    path = tmp_path / "out" / "generate.json"
    argv = ["bench", "generate", "--device", "cpu", "--models", "mixtral", "qwen3_moe"]
    argv += ["--max-new-tokens", "2", "--prompt-len", "3", "--repeats", "1"]
    argv += ["--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gatelab bench generate" in out and f"wrote {path}" in out
    saved = json.loads(path.read_text())
    assert saved["schema"] == SCHEMA
    assert list(saved["models"]) == ["mixtral", "qwen3_moe"]
    assert saved["command"].startswith("gatelab bench generate")
    assert saved["settings"]["max_new_tokens"] == 2
