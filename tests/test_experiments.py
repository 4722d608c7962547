"""The experiment registry and the `gatelab experiment` command."""

from __future__ import annotations

import pytest

from gatelab import experiments
from gatelab.cli import main


def test_every_module_is_a_valid_experiment():
    for name in experiments.names():
        experiment = experiments.get(name)
        assert experiment.name == name
        assert experiment.description and callable(experiment.module.run)


def test_unknown_experiment_names_the_valid_ones(capsys):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        experiments.get("nope")
    with pytest.raises(SystemExit):
        main(["experiment", "nope"])
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_list_runs(capsys):
    assert main(["experiment", "list"]) == 0


# -- the shared training loop ---------------------------------------------------------------


def _tiny(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def test_train_loop_matches_the_hand_written_loop_bit_for_bit():
    import torch

    from gatelab.experiments._loop import random_batches, train_loop, warmup_times_cosine

    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1)

    def loss_of(model, idx):
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx])

    ref = _tiny()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    sched = warmup_times_cosine(opt, warmup=3, steps=12)
    gen, ref_losses = torch.Generator().manual_seed(0), []
    for _ in range(12):
        loss = loss_of(ref, torch.randint(32, (8,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        sched.step()
        ref_losses.append(float(loss.detach()))

    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batches = random_batches(32, 8, torch.Generator().manual_seed(0))
    sched = warmup_times_cosine(opt, warmup=3, steps=12)
    losses = train_loop(model, loss_of, batches, opt, steps=12, schedule=sched, clip=0.5)
    assert losses == ref_losses
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_loop_hooks_and_exhaustible_batches():
    import torch

    from gatelab.experiments._loop import shuffled_batches, train_loop

    model = _tiny()
    x = torch.randn(10, 4)
    seen, evals = [], []
    losses = train_loop(
        model,
        lambda m, idx: m(x[idx]).square().mean(),
        shuffled_batches(10, 4, 2, torch.Generator().manual_seed(0)),  # 3 batches an epoch
        torch.optim.SGD(model.parameters(), lr=0.1),
        before_step=seen.append,
        evaluate=evals.append,
        eval_every=2,
    )
    assert len(losses) == 6 and seen == list(range(6)) and evals == [2, 4, 6]
    assert model.training


def test_schedules_keep_the_rates_the_experiments_were_made_with():
    import math

    import torch

    from gatelab.experiments._loop import warmup_then_cosine, warmup_times_cosine

    def rates(make, steps, lr=3e-3):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched, out = make(opt), []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    steps, w = 250, 12
    then = [
        3e-3 * ((s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (steps - w))))
        for s in range(steps)
    ]
    times = [
        3e-3 * (min(1.0, (s + 1) / w) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        for s in range(steps)
    ]
    assert rates(lambda o: warmup_then_cosine(o, w, steps), steps) == then
    assert rates(lambda o: warmup_times_cosine(o, w, steps), steps) == times
