"""Training on a device mesh through the recipes, with DCP checkpoints (Gloo, CPU, fp32).

One run of 4 steps on 2 ranks (``ep=2``: experts over both, the rest FSDP-sharded) is the
reference; runs resumed from its step-2 checkpoint on other meshes and world sizes
(EP 2 -> EP 1, 2 -> 4, 4 -> 2) must log the same losses, and a run whose rank 1 is
SIGKILLed resumes to the reference's exact numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import traceback
from pathlib import Path

import pytest
import torch.distributed as dist
from test_distributed import SMALL, _fork, _free_port, _init  # noqa: E402

from gatelab.train.dcp import latest_dcp_checkpoint
from gatelab.train.metrics import read_jsonl

STEPS = [
    *(s for s in SMALL if not s.startswith(("train.steps", "train.save_every"))),
    "train.steps=4",
    "train.save_every=2",
    "train.keep_checkpoints=4",
]


def _args(run_dir: Path) -> list[str]:
    return [*STEPS, f'train.run_dir="{run_dir}"']


def _train(rank, port, world, jobs) -> None:
    """Run each (run_dir, mesh, resume, kill_after) job on every rank."""
    from gatelab.recipes.run import run_recipe

    _init(rank, port, world)
    try:
        for run_dir, mesh, resume, kill_after in jobs:
            if kill_after and rank == 1:
                _kill_when_saved(Path(run_dir), kill_after)
            run_recipe("moe-lm", _args(Path(run_dir)), resume=resume, mesh=mesh)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _kill_when_saved(run_dir: Path, step: int) -> None:
    """SIGKILL this process as soon as the step's checkpoint is complete (a crash: no
    cleanup, the other rank left waiting in a collective)."""
    from gatelab.train import trainer

    save = trainer.save_dcp

    def save_then_die(*args, **kwargs):
        path = save(*args, **kwargs)
        if args[1] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    trainer.save_dcp = save_then_die


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"
    }


def _from_step_2(source: Path, target: Path) -> Path:
    (target / "checkpoints").mkdir(parents=True)
    name = "step_00000002.dcp"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mesh_runs")
    ref, ep1, four, back = base / "ref", base / "ep1", base / "four", base / "back"
    # W=2: the reference, then EP 2 -> EP 1 from its step 2.
    _fork(_train, (_free_port(), 2, [(str(ref), "ep=2", False, 0)]), 2)
    _from_step_2(ref, ep1)
    _from_step_2(ref, four)
    # W=4: 2 -> 4 from the reference's step 2; and a 4-rank run to step 2 for 4 -> 2.
    fresh = base / "fresh4"
    jobs = [(str(four), "dp_shard=2,ep=2", True, 0), (str(fresh), "dp_shard=4", False, 0)]
    _fork(_train, (_free_port(), 4, jobs), 4)
    _from_step_2(fresh, back)
    jobs = [(str(ep1), "dp_shard=2", True, 0), (str(back), "ep=2", True, 0)]
    _fork(_train, (_free_port(), 2, jobs), 2)
    return {"ref": ref, "ep1": ep1, "four": four, "back": back, "fresh": fresh}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same recipe in one process (the reference of the reference)."""
    from gatelab.recipes.run import run_recipe

    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_recipe("moe-lm", _args(run_dir))
    return run_dir


def test_mesh_run_equals_one_process(runs, single):
    single, ours = _losses(single), _losses(runs["ref"])
    assert list(ours) == [1, 2, 3, 4]
    assert ours == pytest.approx(single, rel=1e-6)


@pytest.mark.parametrize("name", ["ep1", "four", "back"])
def test_resume_on_another_mesh_keeps_the_loss_curve(runs, name):
    """EP 2 -> EP 1 (ep1), 2 -> 4 ranks (four), 4 -> 2 ranks (back), from step 2."""
    ref, resumed = _losses(runs["ref"]), _losses(runs[name])
    assert list(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([ref[s] for s in (3, 4)], rel=1e-6)


def test_resume_after_sigkill_of_one_rank_is_bitwise(runs, tmp_path):
    """Rank 1 is SIGKILLed once the step-2 checkpoint is complete; the run resumed on the
    same mesh logs exactly the reference's numbers."""
    import torch.multiprocessing as mp

    run_dir = tmp_path / "killed"
    with pytest.raises(mp.ProcessExitedException):
        _fork(_train, (_free_port(), 2, [(str(run_dir), "ep=2", False, 2)]), 2)
    assert latest_dcp_checkpoint(run_dir / "checkpoints").name == "step_00000002.dcp"
    _fork(_train, (_free_port(), 2, [(str(run_dir), "ep=2", True, 0)]), 2)
    ref, resumed = read_jsonl(runs["ref"] / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    drop = ("elapsed_s", "time", "tokens_per_s", "step_s")
    strip = [[{k: v for k, v in r.items() if k not in drop} for r in log] for log in (ref, resumed)]
    assert strip[1] == strip[0]


def test_convert_dcp_to_a_single_file_and_back(runs, single, tmp_path, capsys):
    """``gatelab convert RUN_DIR OUT``: the mesh run's step-4 DCP checkpoint becomes a
    single-file checkpoint holding the single-process run's weights, which ``gatelab info``
    reads; converted back to DCP it holds the same tensors bit for bit."""
    import torch

    from gatelab.cli import main
    from gatelab.train.checkpoint import read_checkpoint
    from gatelab.train.dcp import read_dcp_tensors

    out = tmp_path / "file"
    assert main(["convert", str(runs["ref"]), str(out)]) == 0
    written = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"])
    meta, tensors = read_checkpoint(written)
    assert meta["step"] == 4
    _, reference = read_checkpoint(single / "checkpoints" / "step_00000004.json")
    for key, value in reference.items():
        if key.startswith("model/"):
            torch.testing.assert_close(tensors[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert main(["info", str(written)]) == 0
    assert "parameters" in capsys.readouterr().out

    back = tmp_path / "dcp"
    assert main(["convert", str(written), str(back)]) == 0
    _, original = read_dcp_tensors(runs["ref"] / "checkpoints" / "step_00000004.dcp")
    _, again = read_dcp_tensors(back / "step_00000004.dcp")
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key


def test_convert_errors_name_the_fix(tmp_path):
    from gatelab.cli import main

    assert main(["convert", str(tmp_path)]) == 2


@pytest.mark.slow
def test_torchrun_cli_with_a_mesh(single, tmp_path):
    """``torchrun --nproc_per_node=2 -m gatelab train moe-lm --mesh ep=2`` logs the
    single-process run's losses and writes DCP checkpoints."""
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    run_dir = tmp_path / "run"
    sets = [arg for o in _args(run_dir) for arg in ("--set", o)]
    command = [torchrun, "--nproc_per_node=2", "--master_port", str(_free_port())]
    command += ["-m", "gatelab", "train", "moe-lm", "--mesh", "ep=2", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["checkpoint"].endswith(".dcp")
    assert _losses(run_dir) == pytest.approx(_losses(single), rel=1e-6)


def test_dcp_directories_are_checked(tmp_path):
    """An interrupted save (no gatelab.json) is not a checkpoint; a foreign JSON is refused;
    a fresh run refuses a run dir that holds DCP checkpoints."""
    from gatelab.train.config import TrainError
    from gatelab.train.dcp import CheckpointError, latest_dcp_checkpoint, read_dcp_meta
    from gatelab.train.rundir import prepare_run_dir

    step = tmp_path / "checkpoints" / "step_00000003.dcp"
    step.mkdir(parents=True)
    assert latest_dcp_checkpoint(tmp_path / "checkpoints") is None
    with pytest.raises(CheckpointError, match="no gatelab.json"):
        read_dcp_meta(step)
    (step / "gatelab.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a gatelab DCP"):
        read_dcp_meta(step)
    assert latest_dcp_checkpoint(tmp_path / "checkpoints") == step
    with pytest.raises(TrainError, match="already holds a run"):
        prepare_run_dir(tmp_path, resume=False)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mesh", "dp_shard=2"], "torchrun --nproc_per_node=N"),
        (["--mesh", "ep=2", "--ep", "2"], "--mesh and --ep together"),
        (["--mixed-precision", "bf16"], "--mixed-precision needs --mesh"),
    ],
)
def test_mesh_flags_without_torchrun_are_clear_errors(
    flags, message, tmp_path, monkeypatch, capsys
):
    from gatelab.cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["train", "moe-lm", *flags, "--set", f'train.run_dir="{tmp_path}"']
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_dcp_in_one_process_round_trip_and_refusals(tmp_path, capsys):
    """save_dcp / load_dcp without a process group: the model and AdamW state come back
    bit for bit; another config, or a model with other parameters, is refused before
    anything changes; ``gatelab eval`` on a run dir with only DCP checkpoints says to
    convert."""
    import torch
    from test_mesh import CONFIG, batches, tiny_lm  # noqa: E402

    from gatelab.cli import main
    from gatelab.train.dcp import CheckpointError, load_dcp, save_dcp

    model = tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, targets = batches()[0]
    model(ids, targets).loss.backward()
    opt.step()
    config = {"run": {"model": "tiny"}, "train": {}}
    path = save_dcp(tmp_path / "run" / "checkpoints", 1, model, opt, config=config)
    fresh = tiny_lm()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_dcp(path, fresh, fresh_opt, config=config)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    with pytest.raises(CheckpointError, match="another config"):
        load_dcp(path, tiny_lm(), config={"run": {"model": "other"}, "train": {}})
    from gatelab.models import LM

    wider = LM(dataclasses.replace(CONFIG, num_layers=3))
    with pytest.raises(CheckpointError, match="lacks"):
        load_dcp(path, wider)
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "gatelab convert" in capsys.readouterr().err


def test_resume_in_the_other_format_is_refused(single, tmp_path, capsys):
    """Resuming a --mesh run without --mesh (or a single-file run under --mesh) would
    start over at step 0 in silence; it stops with the fix instead."""
    from gatelab.cli import main
    from gatelab.train.dcp import CheckpointError, resume_point

    with pytest.raises(CheckpointError, match="only single-file checkpoints; convert it"):
        resume_point(single / "checkpoints", sharded=True)
    step = tmp_path / "checkpoints" / "step_00000002.dcp"
    step.mkdir(parents=True)
    (step / "gatelab.json").write_text('{"format": "gatelab-dcp"}')
    args = ["train", "moe-lm", "--resume", *(a for o in _args(tmp_path) for a in ("--set", o))]
    assert main(args) == 2
    assert "resume under --mesh, or convert it first" in capsys.readouterr().err
