"""`gatelab profile / localize / steer / prune` on a gatelab run dir and an HF directory,
and the moe-edits experiment at smoke scale."""

from __future__ import annotations

import json

import pytest
import torch

from gatelab import experiments
from gatelab.cli import main
from gatelab.commands._common import open_model, parse_experts
from gatelab.edit import find_moe_blocks
from gatelab.experiments._trained_lm import trained_moe_lm

PROSE = "The quick brown fox jumps over the lazy dog. " * 12
CODE = "def f(x):\n    return [i * 2 for i in range(x)]\n\n" * 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_cli")
    return trained_moe_lm("smoke", 0, root).run_dir


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "prose.txt").write_text(PROSE)
    (tmp_path / "code.txt").write_text(CODE)
    return tmp_path


def test_commands_on_a_gatelab_run(run_dir, texts, tmp_path, capsys):
    sets = ["--set", f"prose={texts / 'prose.txt'}", "--set", f"code={texts / 'code.txt'}"]
    common = ["--seq-len", "24", "--max-prompts", "4"]
    out = tmp_path / "profile"
    assert main(["profile", str(run_dir), *sets, *common, "--out", str(out)]) == 0
    profile = json.loads((out / "profile.json").read_text())
    assert profile["sets"]["prose"]["prompts"] == 4 and (out / "profile.png").is_file()
    out = tmp_path / "localize"

    assert (
        main(
            [
                "localize",
                str(run_dir),
                "--target",
                f"code={texts / 'code.txt'}",
                "--other",
                f"prose={texts / 'prose.txt'}",
                *common,
                "--threshold",
                "1.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    neurons = json.loads((out / "neurons.json").read_text())
    assert neurons["threshold"] == 1.5 and neurons["experts"]
    clamp, out = out / "neurons.json", tmp_path / "steer"

    assert (
        main(
            [
                "steer",
                str(run_dir),
                *sets,
                *common,
                "--off",
                "0:1",
                "--on",
                "1:2",
                "--clamp",
                str(clamp),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    steer = json.loads((out / "steer.json").read_text())
    assert set(steer["loss"]) == {"prose", "code"}
    out = tmp_path / "prune"

    assert (
        main(
            [
                "prune",
                str(run_dir),
                "--demos",
                f"code={texts / 'code.txt'}",
                "--keep",
                "4",
                *sets,
                *common,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "prune.json").read_text())
    assert result["parameters"]["pruned"] < result["parameters"]["full"]
    for losses in result["loss"].values():  # pruned == masked original
        assert losses["pruned"] == pytest.approx(losses["masked"], rel=1e-5)
    reopened = open_model(out / "model")
    assert reopened.kind == "gatelab"
    assert [b.num_experts for b in find_moe_blocks(reopened.model)] == [4] * 4
    assert main(["eval", str(out / "model")]) == 0  # `gatelab eval` reads the pruned checkpoint
    capsys.readouterr()


def test_prune_an_hf_directory(tmp_path):
    pytest.importorskip("transformers")
    import hf_tiny
    from transformers import AutoModelForCausalLM

    hf_tiny.build("qwen3_moe").save_pretrained(tmp_path / "hf")
    ids = [hf_tiny.ids(1, 9, seed).squeeze(0).tolist() for seed in range(3)]
    (tmp_path / "demos.json").write_text(json.dumps(ids))
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                str(tmp_path / "hf"),
                "--demos",
                f"d={tmp_path / 'demos.json'}",
                "--keep",
                "4",
                "--set",
                f"d={tmp_path / 'demos.json'}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert loaded.config.num_experts == 4
    result = json.loads((out / "prune.json").read_text())
    assert result["loss"]["d"]["pruned"] == pytest.approx(result["loss"]["d"]["masked"], rel=1e-5)


def test_bad_input_gives_clear_errors(run_dir, texts, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "prune",
                str(run_dir),
                "--demos",
                f"c={texts / 'code.txt'}",
                "--keep",
                "9",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "keep=9 exceeds the 8 experts" in capsys.readouterr().err
    assert (
        main(
            [
                "prune",
                str(run_dir),
                "--demos",
                f"c={texts / 'code.txt'}",
                "--keep",
                "1",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "below top_k=2" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("[]")
    assert (
        main(["profile", str(run_dir), "--set", f"e={tmp_path / 'empty.json'}", "--out", out]) == 2
    )
    assert "prompt set 'e' is empty" in capsys.readouterr().err
    assert (
        main(
            [
                "profile",
                str(run_dir),
                "--set",
                f"p={texts / 'prose.txt'}",
                "--seq-len",
                "24",
                "--out",
                out + "-ok",
            ]
        )
        == 0
    )
    long = json.dumps([list(range(40))])
    (tmp_path / "long.json").write_text(long)
    assert (
        main(["profile", str(run_dir), "--set", f"l={tmp_path / 'long.json'}", "--out", out]) == 2
    )
    assert "longer than the model's context of 32" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "nowhere"), "--set", "a=b", "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="LAYER:E,E"):
        parse_experts("0-1")
    assert parse_experts("0:1,3; 2:5") == {0: [1, 3], 2: [5]}


def test_experiment_smoke(tmp_path):
    result = experiments.get("moe-edits").run(scale="smoke", seed=0, out_dir=tmp_path)
    assert "top-2 code experts off" in result["table"]
    assert max(result["pruned_vs_masked_max_abs"].values()) < 1e-4
    assert torch.tensor(result["separation"]).ge(0).all()
