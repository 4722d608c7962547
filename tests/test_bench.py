"""`gatelab bench moe`: schema of the results, ratios, shape parsing and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from gatelab.bench import BenchSettings, Shape, format_table, parse_shape, run_moe_bench
from gatelab.bench.common import timeit
from gatelab.bench.moe import COMPILED_VARIANTS, MOE_VARIANTS, VARIANTS, hf_available, skip_reason
from gatelab.cli import build_parser, main
from gatelab.io import write_json

TINY = Shape("tiny", 96, 16, 32, 4, 2)
DECODE = Shape("dec", 8, 16, 32, 4, 2)
SHAPE_KEYS = {
    "name",
    "spec",
    "tokens",
    "dim",
    "hidden_dim",
    "num_experts",
    "top_k",
    "decode",
    "active_flops_fwd",
    "hf_check",
    "roofline",
    "variants",
}
TIMED_KEYS = {
    "skipped",
    "fwd_s",
    "fwd_bwd_s",
    "fwd_min_s",
    "fwd_bwd_min_s",
    "fwd_times_s",
    "fwd_bwd_times_s",
}


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result():
    settings = BenchSettings(device="cpu", warmup=1, repeats=1, copy_bytes=2**20)
    return run_moe_bench([TINY, DECODE], settings, command="test", log=None)


def test_result_schema(result):
    assert result["schema"] == "gatelab.bench.moe/1"
    assert result["command"] == "test"
    for key in ("started_at", "finished_at", "environment", "settings", "copy_bandwidth"):
        assert result[key]
    env = result["environment"]
    for key in ("torch", "transformers", "device", "device_name", "threads"):
        assert key in env
    assert env["device"] == "cpu" and env["threads"] >= 1
    settings = result["settings"]
    assert (settings["dtype"], settings["warmup"], settings["repeats"]) == ("float32", 1, 1)
    assert _positive(result["copy_bandwidth"]["bytes_per_s"])
    assert [s["name"] for s in result["shapes"]] == ["tiny", "dec"]
    for shape in result["shapes"]:
        assert set(shape) == SHAPE_KEYS
        assert set(shape["variants"]) == set(VARIANTS)


def test_times_finite_and_ratios_consistent(result):
    for shape in result["shapes"]:
        variants = shape["variants"]
        dense = variants["dense"]
        assert dense["skipped"] is None
        for name, entry in variants.items():
            if entry["skipped"] is not None:
                cpu_only = name == "gatelab_triton"  # CUDA-only variant
                assert cpu_only or (name.startswith("hf_") and not hf_available())
                continue
            assert TIMED_KEYS <= set(entry)
            assert _positive(entry["fwd_s"]) and _positive(entry["fwd_bwd_s"])
            assert len(entry["fwd_times_s"]) == len(entry["fwd_bwd_times_s"]) == 1
            assert entry["fwd_min_s"] <= entry["fwd_s"]
            assert entry["ratio_fwd"] == pytest.approx(dense["fwd_s"] / entry["fwd_s"])
            assert entry["ratio_fwd_bwd"] == pytest.approx(dense["fwd_bwd_s"] / entry["fwd_bwd_s"])
        assert dense["ratio_fwd"] == dense["ratio_fwd_bwd"] == 1.0


def test_roofline_only_for_decode_shapes(result):
    tiny, dec = result["shapes"]
    assert not tiny["decode"] and tiny["roofline"] is None
    assert "roofline_fwd" not in tiny["variants"]["gatelab_grouped"]
    assert dec["decode"]
    roof = dec["roofline"]
    assert 1 <= roof["distinct_experts"] <= DECODE.num_experts
    assert roof["bytes"] == roof["distinct_experts"] * 3 * DECODE.dim * DECODE.hidden_dim * 4
    bandwidth = result["copy_bandwidth"]["bytes_per_s"]
    assert roof["seconds"] == pytest.approx(roof["bytes"] / bandwidth)
    for name in MOE_VARIANTS:
        entry = dec["variants"][name]
        if entry["skipped"] is None:
            assert entry["roofline_fwd"] == pytest.approx(roof["seconds"] / entry["fwd_s"])


@pytest.mark.skipif(not hf_available(), reason="transformers not installed")
def test_gatelab_matches_hf_eager(result):
    for shape in result["shapes"]:
        check = shape["hf_check"]
        assert check["ok"], check
        assert 0 <= check["max_abs_diff"] <= check["tolerance"]


def test_json_round_trip_and_table(result, tmp_path):
    path = write_json(tmp_path / "deep" / "moe-cpu.json", result)
    assert json.loads(path.read_text()) == result
    assert os.listdir(path.parent) == ["moe-cpu.json"]  # no temp file left behind
    table = format_table(result)
    for text in ("tiny", "dec", "gatelab grouped", "dense", "ratio f+b", "roofline"):
        assert text in table


def test_write_json_keeps_old_file_on_failure(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(ValueError):
        write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_timeit_runs_setup_outside_each_call():
    calls = []
    times = timeit(lambda: calls.append("fn"), 2, 3, setup=lambda: calls.append("setup"))
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls == ["setup", "fn"] * 5


@pytest.mark.parametrize(
    "text, shape",
    [
        ("4096,512,1024,8,2", Shape("T4096-E8", 4096, 512, 1024, 8, 2)),
        ("fine=4096, 512, 256, 64, 8", Shape("fine", 4096, 512, 256, 64, 8)),
    ],
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize(
    "text, message",
    [
        ("4096,512,1024,8", "got 4 field"),
        ("4096x512x1024x8x2", "got 1 field"),
        ("4096,512,1024,8,two", "non-integer"),
        ("4096,512,1.5,8,2", "non-integer"),
        ("0,512,1024,8,2", ">= 1"),
        ("4096,512,1024,8,-2", ">= 1"),
        ("4096,512,1024,2,4", "k=4 exceeds E=2"),
        ("", "got 1 field"),
    ],
)
def test_parse_shape_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match="T,D,F,E,k|>= 1|exceeds") as error:
        parse_shape(text)
    assert message in str(error.value)


def test_cli_rejects_bad_shapes_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "moe", "--shapes", "16,32,64,4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shapes" in err and "T,D,F,E,k" in err


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--warmup", "-1"], ["--dtype", "int8"]])
def test_cli_rejects_bad_numbers(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench", "moe", *args])
    assert exit_.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "bench" in capsys.readouterr().out


def test_quick_skips_per_expert_loops_on_many_experts():
    many = Shape("many", 64, 16, 32, 64, 8)
    loops = ("gatelab_loop", "hf_eager") if hf_available() else ("gatelab_loop",)
    for name in loops:
        assert "--quick" in skip_reason(name, many, BenchSettings(quick=True))
        assert skip_reason(name, many, BenchSettings(quick=False)) is None
        assert skip_reason(name, TINY, BenchSettings(quick=True)) is None
    assert skip_reason("gatelab_grouped", many, BenchSettings(quick=True)) is None
    assert skip_reason("hf_eager", TINY, BenchSettings(hf=False)) == "--no-hf"


def test_compiled_variants_time_beside_eager_ones():
    """--compile adds the compiled variants (here through aot_eager: inductor's C++ build
    takes ~25 s a graph), with their compile time, sharing the eager ones' parameters."""
    settings = BenchSettings(
        device="cpu", warmup=0, repeats=1, hf=False, compile=True, compile_backend="aot_eager"
    )
    result = run_moe_bench([TINY], settings, log=None)
    variants = result["shapes"][0]["variants"]
    assert set(variants) == set(VARIANTS) | set(COMPILED_VARIANTS)
    for name in ("dense_compiled", "gatelab_grouped_compiled"):
        assert _positive(variants[name]["fwd_bwd_s"]) and _positive(variants[name]["compile_s"])
    assert variants["hf_grouped_mm_compiled"]["skipped"] == "--no-hf"
    assert "grouped compiled" in format_table(result)
    assert build_parser().parse_args(["bench", "moe", "--compile"]).compile is True
    assert skip_reason("gatelab_grouped_compiled", TINY, BenchSettings()) == "needs --compile"


def test_cli_main_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    argv = ["bench", "moe", "--device", "cpu", "--shapes", "t=32,16,32,4,2", "--no-hf"]
    argv += ["--repeats", "1", "--warmup", "0", "--json", str(path)]
    assert main(argv) == 0
    data = json.loads(path.read_text())
    assert data["command"].startswith("gatelab bench moe --device cpu")
    assert data["shapes"][0]["variants"]["hf_eager"]["skipped"] == "--no-hf"
    assert "gatelab grouped" in capsys.readouterr().out


@pytest.mark.slow
def test_python_m_gatelab_bench_quick(tmp_path):
    path = tmp_path / "quick.json"
    cmd = [sys.executable, "-m", "gatelab", "bench", "moe", "--quick", "--json", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(path.read_text())
    assert [s["name"] for s in data["shapes"]] == ["coarse", "fine", "decode"]
    assert data["settings"]["quick"] is True
    assert "ratio fwd" in done.stdout


def test_write_json_atomic_is_a_deprecated_spelling_of_io_write_json(tmp_path):
    import gatelab.bench.common as common

    with pytest.warns(DeprecationWarning, match="gatelab.io.write_json"):
        write_json_atomic = common.write_json_atomic
    path = write_json_atomic({"a": 1}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": 1}
