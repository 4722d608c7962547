"""The trainer, its schedule and its checkpoints: exact resume, atomic saves, bad input.

The model and data are tiny and defined here (not gatelab.models/data) so these tests pin the
trainer's protocols only. They draw from every global RNG the checkpoint restores: dropout
(torch), label noise from ``random`` and an input jitter from numpy's global generator.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from gatelab import MoE
from gatelab import io as gatelab_io
from gatelab.train import (
    CheckpointError,
    Progress,
    TrainConfig,
    Trainer,
    TrainError,
    WarmupCosine,
    config_fingerprint,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    param_groups,
    read_checkpoint,
    read_jsonl,
    save_checkpoint,
    truncate_jsonl,
    warmup_cosine,
)

DIM = 8
STEPS = 12


# -- a tiny model and a tiny resumable iterator --------------------------------------------------


class TinyNet(nn.Module):
    """Linear -> dropout -> MoE (sigmoid router with the aux-free bias, balance loss) -> head."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1, moe: bool = True):
        super().__init__()
        self.inp = nn.Linear(DIM, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.moe = (
            MoE(
                hidden,
                hidden,
                num_experts=4,
                top_k=2,
                router="sigmoid",
                router_kwargs={"bias_update_rate": 0.01},
                loss_weights={"balance": 0.01},
            )
            if moe
            else nn.Identity()
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, y):
        h = self.drop(torch.relu(self.norm(self.inp(x))))
        pred = self.head(h + self.moe(h)).squeeze(-1)
        aux = self.moe.aux_loss if isinstance(self.moe, MoE) else None
        return {"loss": nn.functional.mse_loss(pred, y), "aux_loss": aux}


class Batches:
    """Regression batches; batch i depends only on i (and the global RNGs, for noise)."""

    def __init__(self, batch_size=8, delay=0.0, limit=None, on_index=None, noise=True):
        self.batch_size, self.delay, self.limit = batch_size, delay, limit
        self.on_index, self.noise = on_index or {}, noise
        self.index = 0
        self.w = torch.linspace(-1, 1, DIM)

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit is not None and self.index >= self.limit:
            raise StopIteration
        action = self.on_index.pop(self.index, None)
        if action is not None:
            action()
        if self.delay:
            time.sleep(self.delay)
        g = torch.Generator().manual_seed(self.index)
        x = torch.randn(self.batch_size, DIM, generator=g)
        y = torch.sin(x @ self.w)
        if self.noise:
            x = x + float(np.random.uniform(-0.01, 0.01))
            y = y + 0.01 * random.gauss(0.0, 1.0)
        self.index += 1
        return x, y

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def tiny_cfg(run_dir, **kw) -> TrainConfig:
    base = dict(
        steps=STEPS,
        lr=1e-2,
        warmup_steps=3,
        grad_accum=2,
        weight_decay=0.01,
        run_dir=str(run_dir),
        routing_every=4,
        verbose=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_tiny(run_dir, resume=False, data=None, model_seed=0, config=None, **kw):
    """Build the tiny model under a fixed seed and train it; what the subprocess runs too."""
    torch.manual_seed(model_seed)
    random.seed(model_seed)  # so a resume that forgot an RNG state would show
    np.random.seed(model_seed)
    model = TinyNet()
    trainer = Trainer(model, data or Batches(), tiny_cfg(run_dir, **kw), config=config)
    return trainer, trainer.fit(resume=resume)


def train_losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(Path(run_dir) / "metrics.jsonl", "train")]


def file_bytes(directory) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops on 2 threads stall badly when the cores are busy (OpenMP waits); 1 is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, _one_thread):
    """The uninterrupted run every resume test compares against."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_tiny(run_dir)
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return losses


# -- schedule ------------------------------------------------------------------------------


def test_warmup_cosine_values():
    f = [warmup_cosine(s, 4, 12, 0.1) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0
    assert f[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f[12] == pytest.approx(0.1) and f[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    assert warmup_cosine(5, 0, 0, 0.0) == 1.0
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine(0, 1, 10, 1.5)


def test_scheduler_applies_rates_and_round_trips():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.5)
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.2)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.5 * warmup_cosine(s, 2, 6, 0.2) for s in range(7)])
    other = WarmupCosine(torch.optim.AdamW([p], lr=0.5), 0, 1, 0.0)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert other.state_dict() == sched.state_dict()
    assert other.get_last_lr() == pytest.approx(sched.get_last_lr())


# -- training --------------------------------------------------------------------------------


def test_loss_decreases_and_logs(tmp_path):
    _, result = run_tiny(tmp_path, steps=60, lr=2e-2, warmup_steps=5)
    assert result.stopped == "completed" and result.step == 60
    records = read_jsonl(tmp_path / "metrics.jsonl", "train")
    losses = [r["loss"] for r in records]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    first = records[0]
    for key in ("step", "loss", "aux", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"):
        assert key in first
    assert first["aux"] > 0 and first["tokens"] == 2 * 8  # two micro-batches of 8 samples
    routing = read_jsonl(tmp_path / "routing.jsonl")
    assert [r["step"] for r in routing] == list(range(4, 61, 4))
    layer = routing[0]["layers"]["moe"]
    assert len(layer["tokens_per_expert"]) == 4 and sum(layer["tokens_per_expert"]) > 0
    assert latest_checkpoint(tmp_path).name == "step_00000060.json"


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    class Pairs(Batches):
        """Batch i of this iterator = batches 2i and 2i+1 of Batches, concatenated."""

        def __next__(self):
            a, b = Batches.__next__(self), Batches.__next__(self)
            return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])

    params = []
    for accum, data in ((2, Batches(batch_size=4, noise=False)), (1, Pairs(4, noise=False))):
        torch.manual_seed(0)
        model = TinyNet(dropout=0.0, moe=False)
        cfg = tiny_cfg(tmp_path / f"accum{accum}", steps=4, grad_accum=accum, grad_clip=0.5)
        Trainer(model, data, cfg).fit()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)
    a = train_losses(tmp_path / "accum2")
    b = train_losses(tmp_path / "accum1")
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)


def test_aux_free_bias_update_is_attached(tmp_path):
    trainer, _ = run_tiny(tmp_path / "on", steps=3)
    assert trainer.model.moe.router.expert_bias.abs().sum() > 0
    trainer, _ = run_tiny(tmp_path / "off", steps=3, aux_free_bias=False)
    assert trainer.model.moe.router.expert_bias.abs().sum() == 0


def test_named_tuple_batches_and_a_custom_forward(tmp_path):
    class Pair(NamedTuple):
        x: torch.Tensor
        y: torch.Tensor

    class PairBatches(Batches):
        def __next__(self):
            return Pair(*Batches.__next__(self))

    seen = []

    def forward(model, batch):
        seen.append(type(batch))
        return model(batch.x, batch.y)

    torch.manual_seed(0)
    Trainer(TinyNet(), PairBatches(), tiny_cfg(tmp_path, steps=2), forward=forward).fit()
    assert seen == [Pair] * 4


def test_weight_decay_groups():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    moe = MoE(4, 8, 2, 1, bias=True)
    decay, no_decay = param_groups(nn.ModuleList([model, moe]), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    assert ids == {
        id(model[1].weight),
        id(moe.router.weight),
        id(moe.experts.gate_up_proj),
        id(moe.experts.down_proj),
    }


def test_eval_runs_and_leaves_the_trajectory_alone(tmp_path, reference):
    calls = []

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        calls.append(torch.rand(3))  # draws from the training RNG; must not change training
        return {"val_loss": 1.5}

    torch.manual_seed(0)
    trainer = Trainer(TinyNet(), Batches(), tiny_cfg(tmp_path, eval_every=5), eval_fn=eval_fn)
    result = trainer.fit()
    assert train_losses(tmp_path) == reference
    evals = read_jsonl(tmp_path / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [5, 10, 12] and evals[0]["val_loss"] == 1.5
    assert result.eval == {"val_loss": 1.5}


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events


def test_tensorboard_gets_the_logged_scalars(tmp_path):
    """The same records as metrics.jsonl, as scalars beside it; a resumed run adds the
    steps after its checkpoint; ``tensorboard=False`` writes no events file."""
    pytest.importorskip("tensorboard")

    def interrupt():
        raise KeyboardInterrupt

    trainer, _ = run_tiny(tmp_path, data=Batches(on_index={9: interrupt}))  # stops at step 4
    trainer.eval_fn = lambda model: {"val_loss": 1.5}
    trainer.fit(resume=True)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    events = _events(tmp_path)
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(scalars) == list(range(1, STEPS + 1))
    for step, loss in train_losses(tmp_path):
        assert scalars[step] == pytest.approx(loss, rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("eval/val_loss")] == [(STEPS, 1.5)]
    tags = events.Tags()["scalars"]
    assert "train/lr" in tags and "routing/moe/load_entropy" in tags

    run_tiny(tmp_path / "off", steps=2, tensorboard=False)
    assert (tmp_path / "off" / "metrics.jsonl").exists()
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))


def test_tensorboard_is_silently_off_when_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run_tiny(tmp_path, steps=2)
    assert len(train_losses(tmp_path)) == 2
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_progress_bar_renders_when_forced():
    stream = io.StringIO()
    bar = Progress(10, enabled=True, stream=stream, min_interval=0)
    bar.update(5, loss=1.25, tokens_per_s=2500)
    bar.write("hello")
    bar.close()
    text = stream.getvalue()
    assert "5/10" in text and "loss 1.2500" in text and "2.5k tok/s" in text and "ETA" in text
    assert "hello\n" in text
    quiet = io.StringIO()
    Progress(10, stream=quiet).update(3, 1.0)  # StringIO is no terminal: off by default
    assert quiet.getvalue() == ""


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_everything(tmp_path):
    trainer, _ = run_tiny(tmp_path, steps=5)
    path = latest_checkpoint(tmp_path)
    meta, tensors = read_checkpoint(path)
    assert meta["step"] == 5 and meta["data_state"] == {"index": 10}
    assert any(k.startswith("rng/torch") for k in tensors)
    rng_saved = get_rng_state()  # the run saved at its end, so these are the saved states
    python_saved = random.getstate()

    torch.manual_seed(123)  # a different model, different RNG states
    random.seed(5)
    np.random.seed(5)
    fresh = Trainer(TinyNet(), Batches(), tiny_cfg(tmp_path / "other", steps=5))
    ckpt = load_checkpoint(
        path, fresh.model, fresh.optimizer, fresh.scheduler, config=trainer.config, data=fresh.data
    )
    assert ckpt.step == 5 and ckpt.data_state == {"index": 10} and fresh.data.index == 10
    assert ckpt.extra["tokens"] == 5 * 16
    for (name, a), (_, b) in zip(
        trainer.model.state_dict().items(), fresh.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    sa, sb = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, state in sa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)
    assert fresh.scheduler.state_dict() == trainer.scheduler.state_dict()
    assert fresh.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"]
    rng_now = get_rng_state()
    assert torch.equal(rng_now["torch"], rng_saved["torch"])
    assert random.getstate() == python_saved
    assert torch.equal(rng_now["numpy"]["keys"], rng_saved["numpy"]["keys"])
    assert rng_now["numpy"]["pos"] == rng_saved["numpy"]["pos"]


def test_checkpoint_is_plain_safetensors_and_json(tmp_path):
    run_tiny(tmp_path, steps=2)
    files = sorted((p.name for p in (tmp_path / "checkpoints").iterdir()), key=lambda n: n[-5:])
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    meta = json.loads((tmp_path / "checkpoints" / files[0]).read_text())
    assert meta["tensors_file"] == files[1] and len(meta["tensors_sha256"]) == 64
    assert meta["optimizer"]["param_names"][0][0] == "inp.weight"
    assert meta["config"]["train"]["lr"] == 1e-2


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path, 0, model)
    other = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    other[1].weight = other[0].weight
    load_checkpoint(tmp_path, other)
    assert torch.equal(other[0].weight, model[0].weight)


# -- resume equality ----------------------------------------------------------------------------


def test_resume_after_keyboard_interrupt_mid_step_is_exact(tmp_path, reference):
    def interrupt():
        raise KeyboardInterrupt

    # Batch 9 is the second micro-batch of step 5: step 5 is rolled back, step 4 saved.
    trainer, result = run_tiny(tmp_path, data=Batches(on_index={9: interrupt}))
    assert result.stopped == "interrupted" and result.step == 4
    assert read_checkpoint(result.checkpoint)[0]["step"] == 4
    assert trainer.data.index == 8  # rolled back to the start of step 5
    assert trainer.model.moe.router.tokens_seen.sum() == 0  # step 5's partial counts dropped
    result = trainer.fit(resume=True)  # the same objects, as after Ctrl-C in a notebook
    assert result.stopped == "completed" and result.step == STEPS
    assert train_losses(tmp_path) == reference


def test_sigint_finishes_the_step_saves_and_resumes_exactly(tmp_path, reference):
    def sigint():
        os.kill(os.getpid(), signal.SIGINT)

    # The handler in force before training (SIG_IGN when pytest runs as a background job).
    before = signal.getsignal(signal.SIGINT)
    _, result = run_tiny(tmp_path, data=Batches(on_index={6: sigint}))
    assert result.stopped == "interrupted" and result.step == 4  # batch 6 is in step 4
    _, result = run_tiny(tmp_path, resume=True, model_seed=99)
    assert train_losses(tmp_path) == reference
    assert signal.getsignal(signal.SIGINT) is before


def test_time_budget_stops_saves_and_resumes_exactly(tmp_path, reference):
    _, result = run_tiny(tmp_path, data=Batches(delay=0.05), time_budget_s=0.3)
    assert result.stopped == "time_budget" and 0 < result.step < STEPS
    assert read_checkpoint(latest_checkpoint(tmp_path))[0]["step"] == result.step
    _, result = run_tiny(tmp_path, resume=True, model_seed=99)
    assert result.stopped == "completed"
    assert train_losses(tmp_path) == reference


def test_resume_after_completion_does_nothing(tmp_path):
    run_tiny(tmp_path, steps=3)
    before = file_bytes(tmp_path / "checkpoints")
    _, result = run_tiny(tmp_path, resume=True, steps=3)
    assert result.stopped == "completed" and result.step == 3
    assert file_bytes(tmp_path / "checkpoints") == before


SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_train import Batches, run_tiny
run_dir, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
run_tiny(run_dir, resume=resume, data=Batches(delay=delay), steps=30, save_every=1, verbose=True)
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))

    def start(run_dir, resume, delay):
        cmd = [sys.executable, str(script), str(run_dir), "1" if resume else "0", str(delay)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = start(tmp_path / "ref", False, 0.0)
    killed = start(tmp_path / "run", False, 0.04)
    deadline = time.monotonic() + 60
    while len(train_losses(tmp_path / "run")) < 6:
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline, "the training subprocess made no progress"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert len(train_losses(tmp_path / "run")) < 30
    _, err = start(tmp_path / "run", True, 0.0).communicate(timeout=120)
    assert "resumed from" in err, err
    _, ref_err = reference.communicate(timeout=120)
    expected = train_losses(tmp_path / "ref")
    assert [s for s, _ in expected] == list(range(1, 31)), ref_err
    assert train_losses(tmp_path / "run") == expected


def test_truncate_jsonl_drops_later_and_partial_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    truncate_jsonl(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failing_write", [1, 2], ids=["tensors", "json"])
def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing_write):
    real = gatelab_io._write_all
    calls = []

    def write_all(file, data):
        calls.append(len(data))
        if len(calls) == 2 + failing_write:  # the save at step 4; step 2 saved fine
            file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(file, data)

    monkeypatch.setattr(gatelab_io, "_write_all", write_all)
    with pytest.raises(CheckpointError, match="No space left on device"):
        run_tiny(tmp_path, save_every=2)
    monkeypatch.setattr(gatelab_io, "_write_all", real)
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert not [n for n in names if n.endswith(".tmp")], names
    assert latest_checkpoint(tmp_path).name == "step_00000002.json"
    _, result = run_tiny(tmp_path, resume=True)  # the previous checkpoint loads and resumes
    assert result.step == STEPS


def test_corrupt_checkpoints_fail_clearly_and_nothing_is_overwritten(tmp_path):
    run_tiny(tmp_path, steps=3)
    meta_path = latest_checkpoint(tmp_path)
    tensors_path = meta_path.parent / json.loads(meta_path.read_text())["tensors_file"]
    good = tensors_path.read_bytes()

    tensors_path.write_bytes(good[: len(good) // 2])
    before = file_bytes(tmp_path)
    with pytest.raises(CheckpointError, match=f"{tensors_path.name}.*SHA-256"):
        run_tiny(tmp_path, resume=True)
    assert file_bytes(tmp_path) == before

    tensors_path.unlink()
    with pytest.raises(CheckpointError, match=f"needs .*{tensors_path.name}.*missing"):
        run_tiny(tmp_path, resume=True)

    tensors_path.write_bytes(good)
    meta_path.write_text(meta_path.read_text()[:50])
    before = file_bytes(tmp_path)
    with pytest.raises(CheckpointError, match=f"{meta_path.name} is corrupt: not valid JSON"):
        run_tiny(tmp_path, resume=True)
    assert file_bytes(tmp_path) == before

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000099.json", TinyNet())


def test_checkpoint_from_another_config_names_the_keys(tmp_path):
    run_tiny(tmp_path, steps=3, config={"model": {"dim": 8, "act": "silu"}})
    before = file_bytes(tmp_path)
    with pytest.raises(CheckpointError, match="another config") as info:
        run_tiny(
            tmp_path, resume=True, steps=3, lr=0.5, config={"model": {"dim": 16, "act": "silu"}}
        )
    message = str(info.value)
    assert "train.lr: checkpoint 0.01, now 0.5" in message
    assert "run.model.dim: checkpoint 8, now 16" in message and "act" not in message
    assert file_bytes(tmp_path) == before
    # Run-only options may change on resume.
    _, result = run_tiny(
        tmp_path, resume=True, steps=3, config={"model": {"dim": 8, "act": "silu"}}, log_every=7
    )
    assert result.step == 3


def test_mismatched_parameters_are_named(tmp_path):
    trainer, _ = run_tiny(tmp_path, steps=1)
    other = TinyNet(hidden=12)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: inp\.weight: checkpoint \(16, 8\), model \(12, 8\)"
    ):
        load_checkpoint(tmp_path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(CheckpointError, match="missing in the checkpoint: extra.weight"):
        model = TinyNet()
        model.extra = nn.Linear(2, 2)
        load_checkpoint(tmp_path, model)
    assert config_fingerprint({"a": (1, 2)}) == config_fingerprint({"a": [1, 2]})


def test_unwritable_run_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    torch.manual_seed(0)
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    data = Batches()
    with pytest.raises(TrainError, match="is not writable"):
        Trainer(model, data, tiny_cfg(blocker / "run")).fit()
    assert data.index == 0 and all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )


def test_a_fresh_run_refuses_to_overwrite_an_existing_one(tmp_path):
    run_tiny(tmp_path, steps=1)
    with pytest.raises(TrainError, match="already holds a run.*resume=True"):
        run_tiny(tmp_path, steps=1)


def test_resume_without_checkpoint_json_refuses_and_deletes_nothing(tmp_path):
    run_tiny(tmp_path, steps=2, save_every=1, routing_every=1)
    for path in (tmp_path / "checkpoints").glob("*.json"):
        path.unlink()
    before = file_bytes(tmp_path)
    assert sum(name.endswith(".safetensors") for name in before) == 2
    expected = "2 .safetensors files and metrics.jsonl and routing.jsonl but no checkpoint JSON"
    for resume in (True, False):
        with pytest.raises(TrainError, match=expected + ".*move these files away"):
            run_tiny(tmp_path, resume=resume, steps=2, save_every=1)
        assert file_bytes(tmp_path) == before


def test_prune_deletes_only_what_a_checkpoint_json_accounts_for(tmp_path):
    from gatelab.train import prune_checkpoints

    run_tiny(tmp_path, steps=3, save_every=1, keep_checkpoints=3)
    directory = tmp_path / "checkpoints"
    orphan = directory / "step_00000007-0123456789ab.safetensors"  # no JSON names step 7
    orphan.write_bytes(b"someone's tensors")
    superseded = directory / "step_00000003-0123456789ab.safetensors"  # step 3's JSON names another
    superseded.write_bytes(b"an earlier save of step 3")
    step1 = json.loads((directory / "step_00000001.json").read_text())["tensors_file"]
    prune_checkpoints(directory, keep=2)
    names = {p.name for p in directory.iterdir()}
    assert orphan.name in names and superseded.name not in names
    assert "step_00000001.json" not in names and step1 not in names
    assert {"step_00000002.json", "step_00000003.json"} <= names


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(TypeError, match="state_dict"):
        Trainer(TinyNet(), iter([1, 2]), tiny_cfg(tmp_path))
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)

    class NoLoss(TinyNet):
        def forward(self, x, y):
            return {"pred": x}

    trainer = Trainer(NoLoss(), Batches(), tiny_cfg(tmp_path, steps=1))
    with pytest.raises(TypeError, match="must return the loss"):
        trainer.fit()


def test_non_finite_loss_stops_with_advice(tmp_path):
    class NaNNet(TinyNet):
        def forward(self, x, y):
            out = super().forward(x, y)
            return {"loss": out["loss"] * math.nan}

    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match="Lower lr"):
        Trainer(NaNNet(), Batches(), tiny_cfg(tmp_path)).fit()


def test_data_running_out_saves_and_stops(tmp_path):
    _, result = run_tiny(tmp_path, data=Batches(limit=7))
    assert result.stopped == "data_exhausted" and result.step == 3
    assert read_checkpoint(latest_checkpoint(tmp_path))[0]["data_state"] == {"index": 6}


def test_biased_routers_finds_the_aux_free_routers():
    from gatelab.routing.aux_free import biased_routers

    model = TinyNet()
    assert biased_routers(model) == [model.moe.router]
    assert biased_routers(TinyNet(moe=False)) == []
