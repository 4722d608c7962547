"""Commands that write: nothing lost (issue 15, items 2-4) and nothing silently wrong.

One rule for every writing command: the output is checked before any work (an existing
output needs --force, an input is never written over, a file in the way or an unwritable
folder fails in one line, exit 2) and output folders are written whole (io.atomic_dir)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gatelab import io
from gatelab.cli import build_parser, main

TEXT = "The quick brown fox jumps over the lazy dog. def f(x): return x * 2\n" * 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from gatelab.experiments._trained_lm import trained_moe_lm

    return trained_moe_lm("smoke", 0, tmp_path_factory.mktemp("safety")).run_dir


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def profile(model, text, out, *extra) -> int:
    return main(
        ["profile", str(model), "--set", f"t={text}", "--seq-len", "16", "--out", str(out), *extra]
    )


def no_model(monkeypatch, module: str) -> None:
    """Fail the test if the command loads a model: its output check must come first."""

    def forbidden(*_):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(f"gatelab.commands.{module}.open_model", forbidden)


# -- item 2: never over an existing output without --force, never over an input -------------


def test_existing_output_needs_force_and_force_replaces_it(run_dir, text, tmp_path, capsys):
    out = tmp_path / "out"
    assert profile(run_dir, text, out) == 0
    first = (out / "profile.json").read_bytes()
    (out / "profile.json").write_text("{}")  # mark the old output
    assert profile(run_dir, text, out) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier `gatelab profile` output" in err and "--force" in err
    assert (out / "profile.json").read_text() == "{}"
    assert profile(run_dir, text, out, "--force") == 0
    assert (out / "profile.json").read_bytes() == first
    assert leftovers(tmp_path) == []


def test_force_replaces_only_an_earlier_output_of_the_same_command(run_dir, text, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert profile(run_dir, text, out, "--force") == 2
    assert "not an earlier `gatelab profile` output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "neurons.json").write_text("{}")  # another command's output
    assert profile(run_dir, text, out, "--force") == 2
    assert (out / "neurons.json").read_text() == "{}"


def test_prune_never_writes_over_its_source(run_dir, text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out / "model")  # `prune OUT/model --out OUT` replaced its source
    before = snapshot(out)
    no_model(monkeypatch, "prune")
    for force in ([], ["--force"]):
        argv = ["prune", str(out / "model"), "--demos", f"d={text}", "--keep", "4"]
        assert main([*argv, "--out", str(out), *force]) == 2
        assert "is or holds the input" in capsys.readouterr().err
    # the same through a symlink and a relative path
    (tmp_path / "link").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    argv = ["prune", "out/model", "--demos", f"d={text}", "--keep", "4", "--out", "link"]
    assert main([*argv, "--force"]) == 2
    assert snapshot(out) == before


def test_output_inside_the_input_needs_force(run_dir, text, capsys, monkeypatch):
    no_model(monkeypatch, "profile")
    assert profile(run_dir, text, run_dir / "profile") == 2
    assert "inside the input" in capsys.readouterr().err
    assert not (run_dir / "profile").exists()


def test_a_prompt_file_in_the_output_is_an_input_too(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "profile.json").write_text(TEXT)  # the earlier output, read as a prompt set
    no_model(monkeypatch, "profile")
    assert profile(run_dir, out / "profile.json", out, "--force") == 2
    assert "is or holds the input" in capsys.readouterr().err


# -- item 3: output folders are written whole -------------------------------------------------


def test_a_failed_save_leaves_the_old_output_whole(run_dir, text, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert profile(run_dir, text, out) == 0
    before = snapshot(out)

    def disk_full(*_, **__):  # profile.json is written; the plot fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gatelab.inspect.plots.plot_profile", disk_full)
    with pytest.raises(OSError, match="No space"):
        profile(run_dir, text, out, "--force")
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_failed_prune_leaves_the_old_output_whole(run_dir, text, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["prune", str(run_dir), "--demos", f"d={text}", "--keep", "4", "--seq-len", "16"]
    assert main([*argv, "--out", str(out)]) == 0
    before = snapshot(out)

    def disk_full(path, *_, **__):  # the pruned model is written; prune.json fails
        assert (Path(path).parent / "model").is_dir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gatelab.commands.prune.write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        main([*argv, "--keep", "5", "--out", str(out), "--force"])
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_atomic_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "a").write_text("1")
    assert snapshot(out) == {"a": b"1"}
    with pytest.raises(FileExistsError):  # a folder that appeared meanwhile is not replaced
        with io.atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
    real_replace = os.replace

    def fail_the_swap(src, dst):  # moving the old output aside works, the new one fails
        if Path(src).name != "out":
            raise OSError(5, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_the_swap)
    with pytest.raises(OSError, match="I/O"):
        with io.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("3")
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot(out) == {"a": b"1"} and leftovers(tmp_path) == []
    with io.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("4")
    assert snapshot(out) == {"b": b"4"} and leftovers(tmp_path) == []


# -- item 4: output paths checked before the compute ------------------------------------------


@pytest.mark.parametrize("command", ["profile", "prune", "steer", "skip", "pregate", "transcoder"])
def test_a_file_in_the_way_fails_before_the_model_loads(
    command, text, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file").write_text("x")
    no_model(monkeypatch, command)
    extra = {"prune": ["--demos", f"d={text}", "--keep", "2"], "transcoder": ["--layer", "0"]}
    argv = [command, str(tmp_path), "--set", f"t={text}", *extra.get(command, [])]
    assert main([*argv, "--out", str(tmp_path / "file" / "out")]) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert "is a file; gatelab" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_output_fails_before_the_model_loads(text, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    no_model(monkeypatch, "profile")
    try:
        assert profile(tmp_path, text, locked / "out") == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot be written" in err and len(err.strip().splitlines()) == 1


def test_bench_json_is_checked_before_timing(tmp_path, capsys, monkeypatch):
    def forbidden(*_, **__):
        raise AssertionError("timed before the output was checked")

    monkeypatch.setattr("gatelab.bench.moe.run_moe_bench", forbidden)
    path = tmp_path / "moe.json"
    path.write_text("{}")
    argv = ["bench", "moe", "--device", "cpu", "--no-hf", "--json"]
    assert main([*argv, str(path)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*argv, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert path.read_text() == "{}"


def test_experiment_output_is_checked_first_and_written_whole(tmp_path, capsys, monkeypatch):
    import types

    from gatelab import experiments
    from gatelab.commands.experiment import default_out, relocated

    def run(scale, seed, out_dir):
        (out_dir / "plot.png").write_bytes(b"png")
        return {"table": "| a |", "plot": str(out_dir / "plot.png")}

    fake = experiments.Experiment("fake", "a fake", types.SimpleNamespace(run=run))
    monkeypatch.setattr(experiments, "get", lambda name: fake)
    out = tmp_path / "exp"
    assert main(["experiment", "fake", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["plot"] == str(out.resolve() / "plot.png") and Path(result["plot"]).is_file()
    assert main(["experiment", "fake", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["experiment", "fake", "--out", str(out), "--force"]) == 0
    assert leftovers(tmp_path) == []
    assert default_out("x", "full", 0) == "runs/experiments/x"  # seeds and scales apart
    assert default_out("x", "smoke", 1) == "runs/experiments/x-seed1-smoke"
    assert relocated({"a": [Path("/t/x")], "b": "/t2"}, Path("/t"), Path("/o")) == {
        "a": ["/o/x"],
        "b": "/t2",
    }


# -- the smaller items ------------------------------------------------------------------------

BAD_FLAGS = [
    ("transcoder", "--hidden-dim", "0"),
    ("transcoder", "--steps", "0"),
    ("transcoder", "--l1", "nan"),
    ("transcoder", "--l1", "-1"),
    ("transcoder", "--layer", "-1"),
    ("prune", "--keep", "0"),
    ("pregate", "--steps", "-3"),
    ("pregate", "--capacity", "0"),
    ("skip", "--grid", "1"),
    ("skip", "--target", "1.5"),
    ("skip", "--target", "inf"),
    ("localize", "--top", "0"),
    ("localize", "--threshold", "nan"),
    ("profile", "--top", "0"),
    ("profile", "--seq-len", "0"),
    ("steer", "--max-prompts", "0"),
    ("experiment", "--seed", "-1"),
    ("demo", "--seed", "-1"),
]
REQUIRED = {
    "prune": ["M", "--out", "o", "--demos", "d=f", "--keep", "2"],
    "transcoder": ["M", "--out", "o", "--layer", "0"],
    "localize": ["M", "--out", "o", "--target", "a=f", "--other", "b=g"],
    "experiment": ["x"],
    "demo": [],
}


@pytest.mark.parametrize(("command", "flag", "value"), BAD_FLAGS)
def test_numeric_flags_are_bounded(command, flag, value, capsys):
    argv = [command, *REQUIRED.get(command, ["M", "--out", "o"]), flag, value]
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"experts": []}', "has no 'neurons' key"),
        ('{"neurons": {"a": 1}}', "must be a list"),
        ('{"neurons": [{"layer": 0, "expert": 1}]}', "neuron 0 is"),
        ("[[0, 1, 2], [0, 1.5, 2]]", "neuron 1 is"),
        ("[[0, 1, -2]]", "neuron 0 is"),
    ],
)
def test_steer_clamp_says_what_is_malformed(content, message, text, tmp_path, capsys, monkeypatch):
    clamp = tmp_path / "neurons.json"
    clamp.write_text(content)
    (tmp_path / "model").mkdir()
    no_model(monkeypatch, "steer")
    argv = ["steer", str(tmp_path / "model"), "--set", f"t={text}", "--clamp", str(clamp)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(clamp) in err and "expected neurons.json of" in err


def test_a_recipe_directory_is_not_called_missing(tmp_path):
    from gatelab.recipes import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="is a directory; give a recipe .toml file"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([[1, 2, 50]], r"token ids must lie in \[0, 50\).*from 1 to 50"),
        ([[-1, 2]], r"token ids must lie in \[0, 50\)"),
    ],
)
def test_prompt_ids_outside_the_vocabulary(ids, message):
    from lm_tiny import tiny_moe_lm

    from gatelab.inspect.prompts import prompt_batches

    with pytest.raises(ValueError, match=message):
        prompt_batches(tiny_moe_lm(), [torch.tensor(i) for i in ids], "demos")


def test_prompt_ids_outside_an_hf_vocabulary(tmp_path, capsys):
    pytest.importorskip("transformers")
    import hf_tiny

    hf_tiny.build("qwen3_moe").save_pretrained(tmp_path / "hf")
    (tmp_path / "ids.json").write_text(json.dumps([[1, 2, 10**6]]))
    argv = ["profile", str(tmp_path / "hf"), "--set", f"i={tmp_path / 'ids.json'}"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "model's vocabulary; got ids from 1 to 1000000" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.json", b"[[1, 2.5]]", "a list of integer token ids"),
        ("p.json", b"[[1, true]]", "a list of integer token ids"),
        ("p.json", b"[[1, 2", "is not JSON"),
        ("p.txt", b"\xff\xfe\x00bad", "is not UTF-8 text"),
    ],
)
def test_malformed_prompt_files_are_named(name, content, message, run_dir, tmp_path, capsys):
    (tmp_path / name).write_bytes(content)
    assert profile(run_dir, tmp_path / name, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and name in err


# -- the rest of the class: careless arguments, each refused in one line --------------------


def careless_cases(model: Path, text: Path, tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "hf").mkdir()
    (tmp / "loop").symlink_to(tmp / "loop")
    (tmp / "hf" / "config.json").write_text('{"model_type": "qwen3_moe"}')  # no weights
    profile = ["profile", str(model), "--out", str(tmp / "out")]
    return [
        ([*profile, "--set", f"a={text}", "--set", f"a={text}"], "'a' is repeated"),
        ([*profile, "--set", f"a={text}", "--seq-len", "4096"], "exceeds the model's context"),
        ([*profile, "--set", f"a={tmp}"], "is a folder, not a file"),
        ([*profile, "--set", "a="], "a prompt set is NAME=FILE"),
        ([*profile[:-1], str(tmp / ("x" * 250)), "--set", f"a={text}"], "File name too long"),
        ([*profile[:-1], str(tmp / "loop"), "--set", f"a={text}"], "cannot be resolved"),
        (["eval", str(tmp / "hf")], "is an HF model folder"),
        (
            [
                "localize",
                str(model),
                "--target",
                f"a={text}",
                "--other",
                f"a={text}",
                "--out",
                str(tmp / "o"),
            ],
            "need different names",
        ),
        (["profile", str(text), "--set", f"a={text}", "--out", str(tmp / "o")], "is a .txt file"),
        (["profile", str(tmp / "hf"), "--set", f"a={text}", "--out", str(tmp / "o")], "cannot"),
        (["profile", str(model), "--set", f"a={text}", "--out", ""], "--out is empty"),
        (
            [
                "transcoder",
                str(model),
                "--set",
                f"a={text}",
                "--module",
                "",
                "--out",
                str(tmp / "o"),
            ],
            "is not a module",
        ),
        (
            [
                "transcoder",
                str(model),
                "--set",
                f"a={text}",
                "--module",
                "embed",
                "--out",
                str(tmp / "o"),
                "--steps",
                "1",
            ],
            "does not map activations",
        ),
        (
            [
                "steer",
                str(model),
                "--set",
                f"a={text}",
                "--clamp",
                str(tmp),
                "--out",
                str(tmp / "o"),
            ],
            "--clamp",
        ),
    ]


def test_careless_arguments_end_in_one_line(run_dir, text, tmp_path, capsys):
    for argv, message in careless_cases(run_dir, text, tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_file_in_the_way_of_a_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is not writable: .*file is a file; fix it"):
        io.ensure_writable_dir(tmp_path / "file" / "run", "--run-dir", "fix it")
