"""`gatelab train / eval / info` on every shipped recipe, and their bad-input errors."""

from __future__ import annotations

import json
import re

import pytest

from gatelab.cli import main
from gatelab.recipes import shipped_recipes

pytest.importorskip("sklearn")  # the digits recipes

SMALL = {
    "lm": [
        "model.num_layers=1",
        "model.dim=32",
        "model.num_heads=2",
        "model.max_seq_len=32",
        "data.seq_len=32",
        "data.batch_size=2",
        "data.eval_batches=1",
    ],
    "mlp": ["data.batch_size=16"],
}


def small(recipe: str, run_dir) -> list[str]:
    kind = "lm" if recipe.endswith("-lm") else "mlp"
    extra = SMALL[kind] + (["model.expert_hidden_dim=16"] if recipe == "moe-lm" else [])
    extra += ["model.ffn_hidden_dim=32"] if recipe == "dense-lm" else []
    sets = [
        *extra,
        "train.steps=2",
        "train.warmup_steps=0",
        "train.eval_every=0",
        f'train.run_dir="{run_dir}"',
    ]
    return [arg for s in sets for arg in ("--set", s)]


def test_shipped_recipes():
    assert shipped_recipes() == ["dense-lm", "digits-dense", "digits-moe", "moe-lm"]


@pytest.mark.parametrize("recipe", ["moe-lm", "dense-lm", "digits-moe", "digits-dense"])
def test_two_steps_of_each_recipe_then_eval_and_info(recipe, tmp_path, capsys):
    run_dir = tmp_path / recipe
    assert main(["train", recipe, *small(recipe, run_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and result["stopped"] == "completed"
    assert result["eval"] and all(v == v for v in result["eval"].values())  # finite, not NaN
    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["step"] == 2
    for key, value in result["eval"].items():
        assert evaluated[key] == pytest.approx(value)  # the checkpoint reproduces the run's eval
    assert main(["info", str(run_dir)]) == 0
    info = capsys.readouterr().out
    assert "active per token" in info and recipe in info
    if "moe" in recipe:
        assert "load share" in info
    if recipe.startswith("digits"):  # the editing commands read token prompts: LMs only
        (tmp_path / "ids.json").write_text("[[1, 2, 3]]")
        prompts = ["--set", f"p={tmp_path / 'ids.json'}", "--out", str(tmp_path / "p")]
        assert main(["profile", str(run_dir), *prompts]) == 2
        assert "needs a language model" in capsys.readouterr().err


def test_resume_continues(tmp_path, capsys):
    args = ["train", "digits-moe", *small("digits-moe", tmp_path / "r")]
    assert main(args) == 0
    capsys.readouterr()
    more = [a.replace("train.steps=2", "train.steps=4") for a in args]
    assert main(more + ["--resume"]) == 2  # steps is part of the run's config: named, refused
    assert "steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "moe-lmm"], "did you mean 'moe-lm'"),
        (["train", "moe-lm", "--set", "model.num_layer=2"], "did you mean 'num_layers'"),
        (["train", "moe-lm", "--set", "model.dim=wide"], "expected an int"),
        (["train", "moe-lm", "--set", "train.stpes=2"], "did you mean 'steps'"),
        (["train", "moe-lm", "--set", "data.seq_length=2"], "did you mean 'seq_len'"),
        (["train", "moe-lm", "--set", "train.lr=-1"], "lr must be > 0"),
        (["eval", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_input_is_named(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_malformed_recipe_file(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nkind = "lm"\ndim = \n')
    assert main(["train", str(path)]) == 2
    assert "line 3, column" in capsys.readouterr().err


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "digits-dense", *small("digits-dense", blocker / "run")]) == 2
    assert "run" in capsys.readouterr().err


# -- checkpoints read by eval / info: checked before anything is built (issue 15, 8 and 9) --


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    args = [
        a.replace("model.expert_hidden_dim", "model.moe.hidden_dim")
        for a in small("moe-lm", run_dir)
    ]
    assert main(["train", "moe-lm", *args]) == 0
    return run_dir


def _edited(tiny_run, tmp_path, edit):
    import shutil

    run_dir = tmp_path / "edited"
    shutil.copytree(tiny_run, run_dir)
    path = sorted((run_dir / "checkpoints").glob("step_*.json"))[-1]
    text = path.read_text()
    path.write_text(edit(text) if isinstance(edit(text), str) else json.dumps(edit(text)))
    return run_dir


def _meta_edit(change):
    def edit(text):
        meta = json.loads(text)
        change(meta)
        return json.dumps(meta)

    return edit


@pytest.mark.parametrize("command", ["info", "eval"])
@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # 2**20 wide: building it would need terabytes; the header check fails first.
        (
            _meta_edit(lambda m: m["config"]["run"]["model"].update(dim=2**20)),
            r"does not fit the model: shape mismatch: embed.weight: checkpoint \(257, 32\), "
            r"model \(257, 1048576\)",
        ),
        (
            _meta_edit(lambda m: m["config"]["run"]["model"]["moe"].update(num_experts=4)),
            r"shape mismatch: blocks.0.ffn.router.weight: checkpoint \(8, 32\), model \(4, 32\)",
        ),
        (_meta_edit(lambda m: m.update(step="2")), "field 'step' should be an int >= 0"),
        (_meta_edit(lambda m: m.update(step=True)), "field 'step' should be an int >= 0"),
        (_meta_edit(lambda m: m.pop("tensors_sha256")), r"missing fields \['tensors_sha256'\]"),
        (_meta_edit(lambda m: m.update(tensors_sha256=[1])), "field 'tensors_sha256' should be"),
        (_meta_edit(lambda m: m.update(config=[1])), "field 'config' should be a table"),
        (_meta_edit(lambda m: m["config"].update(run="x")), "field 'config.run' should be a table"),
        (
            _meta_edit(lambda m: m["config"]["run"]["model"].update(dim="32")),
            r"the recipe stored in it \(config.run\) is not valid: LMConfig.dim: expected an int",
        ),
        (_meta_edit(lambda m: m.update(version=2)), "format version 2; this gatelab reads"),
        (lambda text: '{"a": ' * 100_000 + "1" + "}" * 100_000, "JSON nested too deeply"),
    ],
)
def test_checkpoint_metadata_is_checked_before_building(
    tiny_run, tmp_path, capsys, command, edit, expected
):
    run_dir = _edited(tiny_run, tmp_path, edit)
    assert main([command, str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(expected, err) and len(err.splitlines()) == 1, err


def test_info_counts_come_from_the_tensors_header(tiny_run, capsys):
    assert main(["info", str(tiny_run)]) == 0
    assert "24,960 total, 15,744 active per token" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["info", "eval", "profile"])
def test_a_file_of_another_kind_is_named_not_called_corrupt(tiny_run, tmp_path, capsys, command):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "mixtral"}')
    tensors = next((tiny_run / "checkpoints").glob("*.safetensors"))
    (hf / "model.safetensors").write_bytes(tensors.read_bytes())
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "empty").mkdir()
    cases = {
        hf / "model.safetensors": "is an HF model folder's weights.*give the folder",
        tiny_run / "metrics.jsonl": "is a JSONL log.*give the run directory",
        tensors: "is the tensors file of a gatelab checkpoint.*give its step_",
        tmp_path / "other.json": "is a JSON file but not a gatelab training checkpoint",
        tmp_path / "empty": "holds no gatelab checkpoint",
    }
    if command != "profile":  # profile opens an HF folder itself
        cases[hf] = "is an HF model folder.*not a gatelab run"
    extra = ["--out", str(tmp_path / "out"), "--set", f"a={tmp_path / 'other.json'}"]
    for path, expected in cases.items():
        args = [command, str(path), *(extra if command == "profile" else [])]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert re.search(expected, err) and "corrupt" not in err and "delete" not in err, err
