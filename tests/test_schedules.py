"""Schedules over training steps, and the trainer stepping them (exact resume included)."""

from __future__ import annotations

import math

import pytest
import tomllib
import torch
from torch import nn

from gatelab import MoE
from gatelab.routing import DenseToSparseRouter, attach_schedule, build_schedule, step_schedules
from gatelab.routing.schedules import (
    SCHEDULES,
    Constant,
    Exponential,
    Linear,
    Step,
    attached_schedules,
)
from gatelab.train import TrainConfig, Trainer, read_jsonl


def test_registry():
    assert set(SCHEDULES.names()) == {"constant", "linear", "exponential", "step"}


def test_linear_is_evomoe_linear_decay():
    tau_max, tau_min, d = 2.0, 0.5, 40
    s = Linear(tau_max, tau_min, d)
    for t in range(0, 60):
        assert s(t) == pytest.approx(max(tau_max - t * (tau_max - tau_min) / d, tau_min))
    assert s(0) == tau_max and s(d) == tau_min and s(10**9) == tau_min


def test_exponential_is_evomoe_exp_decay():
    tau_max, tau_min, d = 2.0, 0.1, 30
    s = Exponential(tau_max, tau_min, d)
    for t in range(0, 50):
        want = max(tau_max * math.exp(t * math.log(tau_min / tau_max) / d), tau_min)
        assert s(t) == pytest.approx(want)


def test_begin_holds_the_start_and_increase_works():
    s = Linear(1.0, 3.0, 4, begin=10)
    assert [s(t) for t in (0, 10, 12, 14, 100)] == [1.0, 1.0, 2.0, 3.0, 3.0]


def test_step_and_switch():
    s = Step([4.0, 2.0, 1.0], [5, 8])
    assert [s(t) for t in (0, 4, 5, 7, 8, 99)] == [4.0, 4.0, 2.0, 2.0, 1.0, 1.0]
    switch = Step([0.0, 1.0], [3])
    assert [switch(t) for t in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_built_from_a_toml_table_and_back():
    table = tomllib.loads(
        """
        tau = { kind = "exponential", start = 2.0, end = 0.5, steps = 100, begin = 5 }
        cf = { kind = "step", values = [2.0, 1.0], boundaries = [50] }
        """
    )
    tau, cf = build_schedule(table["tau"]), build_schedule(table["cf"])
    assert tau == Exponential(2.0, 0.5, 100, begin=5) and cf == Step([2.0, 1.0], [50])
    for s in (tau, cf, Constant(3)):
        assert build_schedule(s.to_dict()) == s
    assert build_schedule(1.5) == Constant(1.5)
    assert build_schedule(tau) is tau


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ({"kind": "cosine"}, ValueError, "unknown schedule 'cosine'; valid names are"),
        ({"start": 1.0}, ValueError, "a schedule dict needs 'kind'"),
        ({"kind": "linear", "start": 1.0, "end": 0.0}, ValueError, "linear schedule: .*steps"),
        ({"kind": "linear", "start": 1, "end": 0, "steps": 0}, ValueError, "steps must be an int"),
        ({"kind": "exponential", "start": 1, "end": 0, "steps": 3}, ValueError, "must be > 0"),
        ({"kind": "step", "values": [1, 2], "boundaries": []}, ValueError, "one more value"),
        ({"kind": "step", "values": [1, 2, 3], "boundaries": [5, 2]}, ValueError, "must increase"),
        ({"kind": "constant", "value": float("nan")}, ValueError, "finite number"),
        ("fast", TypeError, "a schedule is a number"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        build_schedule(spec)


def test_bad_step():
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        Constant(1.0)(-1)


def test_attach_and_step_attributes():
    moe = MoE(8, 16, 4, 2, router="topk")
    cf = attach_schedule(
        moe, "capacity_factor", {"kind": "linear", "start": 2.0, "end": 1.0, "steps": 4}
    )
    attach_schedule(moe.router, "top_k", Step([1, 2], [2]), cast=round)
    assert moe.capacity_factor == 2.0 and moe.router.top_k == 1  # step 0 applied at once
    step_schedules(moe, 3)
    assert moe.capacity_factor == cf(3) == 1.25 and moe.router.top_k == 2
    assert isinstance(moe.router.top_k, int)
    moe(torch.randn(5, 8))
    assert moe.last_routing.num_slots == 2
    assert attached_schedules(moe) == {"capacity_factor": cf}
    with pytest.raises(AttributeError, match="MoE has no attribute 'capacity' to schedule"):
        attach_schedule(moe, "capacity", 1.0)


# -- the trainer steps schedules, and resume is exact -------------------------------------------


class Net(nn.Module):
    """A regression net whose MoE uses the DTS gate (tau decay, then hard top-1) and a
    scheduled capacity factor, so every scheduled value changes the losses."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        kwargs = {"tau_max": 2.0, "tau_min": 0.05, "decay_steps": 4, "hard_from": 6}
        self.moe = MoE(
            8,
            8,
            4,
            4,
            router="dense_to_sparse",
            router_kwargs=kwargs,
            loss_weights={"balance": 0.01},
        )
        attach_schedule(self.moe, "capacity_factor", Step([4.0, 1.0], [3]))
        self.head = nn.Linear(8, 1)
        self.taus: list[float] = []

    def forward(self, x, y):
        out = self.head(self.moe(torch.relu(self.inp(x)))).squeeze(-1)
        self.taus.append(float(self.moe.last_routing.aux["tau"]))
        return {"loss": nn.functional.mse_loss(out, y), "aux_loss": self.moe.aux_loss}


class Batches:
    def __init__(self, limit=None):
        self.index, self.limit = 0, limit

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit is not None and self.index >= self.limit:
            raise StopIteration
        g = torch.Generator().manual_seed(self.index)
        x = torch.randn(16, 4, generator=g)
        self.index += 1
        return x, x.sum(1).sin()

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def fit(run_dir, resume=False, limit=None, seed=0):
    torch.manual_seed(seed)  # a different seed on resume: the checkpoint must restore all
    cfg = TrainConfig(steps=9, lr=1e-2, run_dir=str(run_dir), routing_every=0, verbose=False)
    trainer = Trainer(Net(), Batches(limit), cfg)
    result = trainer.fit(resume=resume)
    return trainer, result


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl", "train")]


def test_trainer_steps_schedules_and_resume_is_exact(tmp_path):
    trainer, _ = fit(tmp_path / "ref")
    net = trainer.model
    assert net.taus == pytest.approx([net.moe.router.schedule(t) for t in range(9)])
    assert net.moe.router.step == 8 and net.moe.capacity_factor == 1.0
    reference = losses(tmp_path / "ref")

    _, stopped = fit(tmp_path / "run", limit=4)
    assert stopped.stopped == "data_exhausted" and stopped.step == 4
    resumed, _ = fit(tmp_path / "run", resume=True, seed=1)
    want = [resumed.model.moe.router.schedule(t) for t in range(4, 9)]
    assert resumed.model.taus == pytest.approx(want)
    assert losses(tmp_path / "run") == reference


def test_set_step_restarts_the_noise_per_step():
    router = DenseToSparseRouter(4, 4)
    router.set_step(2)
    x = torch.randn(8, 4)
    first = router(x).experts
    step_schedules(router, 2)
    assert torch.equal(router(x).experts, first)


def test_a_recipe_names_the_gate_and_its_tau_schedule(tmp_path):
    from gatelab.recipes import load_recipe
    from gatelab.recipes.run import build_run

    overrides = [
        'model.router="dense_to_sparse"',
        "model.top_k=4",
        "model.num_experts=4",
        'model.router_kwargs={ tau = { kind = "exponential", start = 2.0, end = 0.1, '
        "steps = 2 }, hard_from = 3 }",
        "model.dim=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.expert_hidden_dim=16",
        "model.max_seq_len=8",
        "data.seq_len=8",
        "data.batch_size=2",
        "data.eval_batches=1",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.save_every=0",
        f'train.run_dir="{tmp_path}"',
        "train.verbose=false",
    ]
    run = build_run(load_recipe("moe-lm", overrides))
    router = run.model.blocks[0].ffn.router
    assert isinstance(router, DenseToSparseRouter)
    assert router.schedule == Exponential(2.0, 0.1, 2) and router.hard_from == 3
    result = run.trainer().fit()
    assert result.step == 4 and router.step == 3 and router.hard


def lm_config(**changes):
    from gatelab.models import LMConfig

    base = dict(
        vocab_size=32,
        dim=16,
        num_layers=2,
        num_heads=2,
        max_seq_len=8,
        num_experts=4,
        top_k=2,
        expert_hidden_dim=16,
    )
    return LMConfig(**{**base, **changes})


def test_lm_config_schedules_capacity_and_k():
    from gatelab.models import LM

    schedules = {
        "capacity_factor": {"kind": "linear", "start": 2.0, "end": 1.0, "steps": 4},
        "top_k": {"kind": "step", "values": [1, 3], "boundaries": [2]},
    }
    model = LM(lm_config(schedules=schedules))
    layers = list(model.moe_layers().values())
    assert [m.capacity_factor for m in layers] == [2.0, 2.0]
    assert [m.router.top_k for m in layers] == [1, 1]
    step_schedules(model, 3)
    assert [m.capacity_factor for m in layers] == [1.25, 1.25]
    assert [m.router.top_k for m in layers] == [3, 3]
    model(torch.randint(0, 32, (2, 8)))
    assert layers[0].last_routing.num_slots == 3 and "capacity" in layers[0].last_routing.aux


@pytest.mark.parametrize(
    "schedules, match",
    [
        ({"tau": 1.0}, "cannot schedule 'tau'; schedulable: capacity_factor, top_k"),
        ({"top_k": {"kind": "step", "values": [1, 5], "boundaries": [3]}}, "1..num_experts=4"),
        ({"top_k": 1.5}, "whole values"),
        ({"capacity_factor": 0.0}, "must stay > 0"),
        ({"capacity_factor": {"kind": "cosine"}}, "unknown schedule 'cosine'"),
    ],
)
def test_lm_config_rejects_bad_schedules(schedules, match):
    from gatelab.models import ConfigError

    with pytest.raises(ConfigError, match=match):
        lm_config(schedules=schedules)
