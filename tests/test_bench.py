"""`gatelab bench moe`: schema of the results, ratios, shape parsing and the CLI."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from gatelab.bench import BenchSettings, Shape, format_table, parse_shape, run_moe_bench
from gatelab.bench.common import busy_processes, timeit
from gatelab.bench.moe import (
    COMPILED_VARIANTS,
    CONTENDED_TARGET,
    MOE_VARIANTS,
    VARIANTS,
    check_baseline,
    geomean,
    hf_available,
    load_baseline,
    skip_reason,
    summarize,
)
from gatelab.bench.shapes import default_shapes, shape_set
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
SUMMARY_KEYS = {"ratio", "training", "decode", "gatelab_vs_hf_grouped_mm", "contended_vs_idle"}
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
                training_only = name == "gemm_bound" and shape["decode"]
                assert cpu_only or training_only or (name.startswith("hf_") and not hf_available())
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


# -- issue 17: shape sets, the summary, --contended and --baseline -------------------------------


SWEEP_TRAINING_SPECS = [
    "4096,512,1024,8,2",
    "4096,512,256,64,8",
    "2048,512,64,128,8",
    "2048,768,384,32,4",
    "1024,1024,4096,8,2",
    "512,512,256,64,8",
    "4096,256,128,16,1",
]
SWEEP_DECODE_SPECS = ["1,512,1024,8,2", "1,1024,256,128,8", "8,512,1024,8,2", "16,2048,512,64,8"]


def test_sweep_set_is_issue_17s_shapes():
    sweep = shape_set("sweep", "cpu", quick=False)
    assert [s.spec for s in sweep] == SWEEP_TRAINING_SPECS + SWEEP_DECODE_SPECS
    assert [s.decode for s in sweep] == [False] * 7 + [True] * 4
    assert len({s.name for s in sweep}) == len(sweep)
    quick = shape_set("sweep", "cpu", quick=True)
    assert [s.tokens for s in quick[:7]] == [512, 512, 256, 256, 256, 256, 512]  # T/8, >= 256
    assert [s.spec for s in quick[7:]] == SWEEP_DECODE_SPECS
    assert shape_set("default", "cpu", quick=True) == default_shapes("cpu", True)
    with pytest.raises(ValueError, match="unknown shape set 'big'; valid: default, sweep"):
        shape_set("big", "cpu", quick=False)
    with pytest.raises(ValueError, match="unknown shape set 'big'"):
        BenchSettings(shape_set="big").resolved()


def test_set_and_shapes_together_are_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "moe", "--set", "sweep", "--shapes", "32,16,32,4,2"])
    assert exit_.value.code == 2
    assert "either --shapes or --set, not both" in capsys.readouterr().err
    with pytest.raises(ValueError, match="drop --set sweep or --shapes"):
        run_moe_bench([TINY], BenchSettings(shape_set="sweep"), log=None)


def test_cli_parses_set_contended_and_baseline():
    args = build_parser().parse_args(["bench", "moe", "--set", "sweep", "--contended"])
    assert (args.shape_set, args.contended, args.baseline) == ("sweep", 1, None)
    args = build_parser().parse_args(["bench", "moe", "--contended", "2", "--baseline", "b.json"])
    assert (args.shape_set, args.contended, args.baseline) == (None, 2, "b.json")
    assert build_parser().parse_args(["bench", "moe"]).contended == 0


def test_summary_geomean_min_and_hf_comparison(result):
    summary = result["summary"]
    assert set(summary) == SUMMARY_KEYS
    training, decode = summary["training"], summary["decode"]
    assert (training["shapes"], decode["shapes"]) == (["tiny"], ["dec"])
    assert (training["ratio"], decode["ratio"]) == ("ratio_fwd_bwd", "ratio_fwd")
    assert "dense" not in training["variants"] and "gatelab_triton" not in training["variants"]
    grouped = training["variants"]["gatelab_grouped"]
    ratio = result["shapes"][0]["variants"]["gatelab_grouped"]["ratio_fwd_bwd"]
    assert grouped["values"] == [ratio]
    assert grouped["geomean"] == pytest.approx(ratio) and grouped["min"] == ratio
    assert (grouped["min_shape"], grouped["timed_shapes"]) == ("tiny", 1)
    dec = result["shapes"][1]["variants"]["gatelab_grouped"]
    stats = decode["variants"]["gatelab_grouped"]
    assert stats["values"] == [dec["ratio_fwd"]]
    assert stats["roofline"]["values"] == [dec["roofline_fwd"]]
    assert all(_positive(v) for v in (stats["geomean"], stats["roofline"]["geomean"]))
    rows = summary["gatelab_vs_hf_grouped_mm"]
    assert [(r["shape"], r["mode"]) for r in rows] == [("tiny", "fwd_bwd"), ("dec", "fwd")]
    for row, shape in zip(rows, result["shapes"], strict=True):
        if not hf_available():
            assert row["skipped"] and row["beats"] is None
            continue
        key = f"{row['mode']}_s"
        assert row["speedup"] == pytest.approx(
            shape["variants"]["hf_grouped_mm"][key] / shape["variants"]["gatelab_grouped"][key]
        )
        assert row["beats"] == (row["speedup"] > 1)
    bound = result["shapes"][0]["variants"]["gemm_bound"]["fwd_bwd_s"]
    share = bound / result["shapes"][0]["variants"]["gatelab_grouped"]["fwd_bwd_s"]
    assert training["share_of_bound"]["values"] == [pytest.approx(share)]
    assert "gemm_bound" not in decode["variants"]  # a decode shape's bound is the roofline
    assert summary["contended_vs_idle"] is None
    assert result["contended"] == 0 and result["shape_set"] is None
    table = format_table(result)
    for text in ("summary", "geomean", "training shapes", "decode shapes", "beats HF"):
        assert text in table
    assert "GEMM bound time / gatelab grouped time" in table
    assert "contended: 0" in table


@pytest.mark.parametrize("in_cpp", [True, False])
def test_gemm_bound_runs_the_layers_products(in_cpp):
    """The GEMM bound runs, on the batch's routing, each expert's two forward and four
    backward products (split's, in C++ or from Python) and the router's three; checked
    against torch.mm on every expert."""
    from gatelab.bench.variants import _ExpertGemms, build_gatelab_moe, gemm_bound
    from gatelab.dispatch import native

    shape = Shape("t", 40, 16, 8, 5, 2)
    moe = build_gatelab_moe(shape, "cpu", torch.float32)
    x = torch.randn(40, 16, requires_grad=True)
    context = native.disabled("split") if not in_cpp else contextlib.nullcontext()
    with context:
        gemms = _ExpertGemms(moe, x)
    assert gemms.in_cpp == (in_cpp and native.available())
    with torch.no_grad():
        routed = moe.router(x).experts.reshape(-1)
    assert gemms.counts == torch.bincount(routed, minlength=5).tolist()
    gemms.forward(x.detach())
    g_x = gemms.backward(x.detach())
    torch.testing.assert_close(g_x, gemms.g_logits @ moe.router.weight.detach())
    start = 0
    for e, count in enumerate(gemms.counts):
        rows = slice(start, start + count)
        start += count
        xs, act, gy, g_h = gemms.xs[rows], gemms.act[rows], gemms.gy[rows], gemms.g_hidden[rows]
        w_in, w_out = gemms.w_in[e], gemms.w_out[e]
        torch.testing.assert_close(gemms.hidden[rows], xs @ w_in.t())
        torch.testing.assert_close(gemms.y[rows], act @ w_out.t())
        torch.testing.assert_close(gemms.g_act[rows], gy @ w_out)
        torch.testing.assert_close(gemms.g_xs[rows], g_h @ w_in)
        if count:
            torch.testing.assert_close(gemms.g_w_out[e], gy.t() @ act)
            torch.testing.assert_close(gemms.g_w_in[e], g_h.t() @ xs)
    out = gemm_bound(moe, x).forward(x)
    out.backward(torch.randn(40, 16))
    assert out.shape == x.shape and x.grad.shape == x.shape


def test_gemm_bound_takes_bf16_and_few_row_experts():
    """bfloat16 experts of a few rows each: the C++ loop keeps MKL's GEMMs there (the
    few-row kernel is float32 and float64 only), as split's forward does."""
    from gatelab.bench.variants import _ExpertGemms, build_gatelab_moe

    moe = build_gatelab_moe(Shape("t", 8, 16, 8, 5, 2), "cpu", torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    gemms = _ExpertGemms(moe, x)
    assert gemms.few == 0 and max(gemms.counts) <= 6
    gemms.forward(x)
    gemms.backward(x)
    start = 0
    for e, count in enumerate(gemms.counts):
        rows = slice(start, start + count)
        start += count
        want = gemms.xs[rows].float() @ gemms.w_in[e].float().t()
        torch.testing.assert_close(gemms.hidden[rows].float(), want, atol=0.05, rtol=0.02)


def test_geomean():
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert geomean([0.5]) == 0.5


def _as_contended(result: dict, count: int = 1) -> dict:
    """The idle result as if it had been run with ``count`` busy processes."""
    other = json.loads(json.dumps(result))
    other["contended"] = other["settings"]["contended"] = count
    return other


def test_contended_vs_idle_against_itself_is_one(result):
    record = summarize(result["shapes"], json.loads(json.dumps(result)), contended=1)[
        "contended_vs_idle"
    ]
    assert record["target"] == CONTENDED_TARGET == 1.25 and record["contended"] == 1
    assert [row["spec"] for row in record["shapes"]] == [TINY.spec, DECODE.spec]
    assert [row["mode"] for row in record["shapes"]] == ["fwd_bwd", "fwd"]
    for row in record["shapes"]:
        assert row["slowdown"] == pytest.approx(1.0) and row["within_target"]
    assert record["met"] is True and record["max_slowdown"] == pytest.approx(1.0)


def test_check_baseline_names_the_problem(result):
    contended = BenchSettings(device="cpu", contended=1).resolved()
    shapes = [TINY, DECODE]
    check_baseline(json.loads(json.dumps(result)), shapes, contended)  # fits: no error
    cases = [
        ({**result, "schema": "gatelab.bench.train/1"}, contended, "not a `gatelab bench moe`"),
        (result, BenchSettings(device="cpu").resolved(), "add --contended"),
        (_as_contended(result, 2), contended, "was run with --contended 2"),
        ({**result, "settings": {**result["settings"], "dtype": "bfloat16"}}, contended, "dtype"),
        ({**result, "shapes": result["shapes"][:1]}, contended, "no result for shape(s) dec"),
        ({k: v for k, v in result.items() if k != "shapes"}, contended, "malformed"),
        ([1, 2], contended, "not a `gatelab bench moe`"),
    ]
    for baseline, settings, message in cases:
        with pytest.raises(ValueError) as error:
            check_baseline(baseline, shapes, settings)
        assert message in str(error.value) and "--baseline" in str(error.value)


def test_load_baseline_errors(tmp_path):
    with pytest.raises(ValueError, match="--baseline .*no such file"):
        load_baseline(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="--baseline .* is not JSON"):
        load_baseline(bad)
    with pytest.raises(ValueError, match="is a directory"):
        load_baseline(tmp_path)


def test_baseline_without_contended_is_a_usage_error(tmp_path, capsys, result):
    path = write_json(tmp_path / "idle.json", result)
    argv = ["bench", "moe", "--device", "cpu", "--shapes", "tiny=96,16,32,4,2"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--baseline", str(path)])
    assert exit_.value.code == 2
    assert "add --contended" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a shape the baseline lacks
        main(["bench", "moe", "--shapes", "t=32,16,32,4,2", "--contended", "--baseline", str(path)])
    assert exit_.value.code == 2
    assert "no result for shape(s) t (32,16,32,4,2)" in capsys.readouterr().err


@pytest.fixture
def one_thread():
    """One torch thread: with a busy process beside it, a second thread stalls on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_contended_run_against_an_idle_baseline(tmp_path, capsys, one_thread):
    idle, contended = tmp_path / "idle.json", tmp_path / "contended.json"
    argv = ["bench", "moe", "--device", "cpu", "--shapes", "t=32,16,32,4,2", "dec=4,16,32,4,2"]
    argv += ["--no-hf", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--json", str(idle)]) == 0
    capsys.readouterr()
    assert main([*argv, "--contended", "--baseline", str(idle), "--json", str(contended)]) == 0
    out = capsys.readouterr().out
    assert "contended: 1 busy process" in out and "slowdown" in out and "issue 17" in out
    data = json.loads(contended.read_text())
    assert data["contended"] == data["settings"]["contended"] == 1
    record = data["summary"]["contended_vs_idle"]
    assert [row["shape"] for row in record["shapes"]] == ["t", "dec"]
    for row in record["shapes"]:
        assert _positive(row["slowdown"])
        assert row["slowdown"] == pytest.approx(row["idle_ratio"] / row["contended_ratio"])
    assert isinstance(record["met"], bool)
    assert data["summary"]["gatelab_vs_hf_grouped_mm"][0]["skipped"] == "--no-hf"


def test_busy_processes_start_and_stop():
    with busy_processes(0) as pids:
        assert pids == []
    with busy_processes(2) as pids:
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # running
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(KeyboardInterrupt):
        with busy_processes(1) as pids:
            raise KeyboardInterrupt
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
    with pytest.raises(ValueError, match="busy process count must be an integer >= 0"):
        with busy_processes(-1):
            pass


def test_bad_contended_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="contended must be an integer >= 0"):
        BenchSettings(contended=-1).resolved()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "moe", "--contended", "0"])
