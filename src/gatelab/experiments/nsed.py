"""NSED on digits: does deliberation beat the best member, majority voting and one model
of the same cost, and does it improve with rounds?

Claim tested (small-scale analogue): "Mixture-of-Models: Unifying Heterogeneous Agents via
N-Way Self-Evaluating Deliberation" (NSED) finds that ensembles of small models deliberating
by peer review, quadratic voting and a recurrent, forget-gated consensus match or beat much
larger single models. Its agents are LLMs critiquing each other's texts on AIME and
LiveCodeBench; here the members are small digit classifiers and a review is a likelihood
(:mod:`gatelab.ensemble.nsed`). Nothing here speaks to LLM deliberation itself.

Protocol (ours):

- Pool: ``gatelab.ensemble.pool.digits_pool(scale, seed)``: MLPs of different widths and
  depths, an MoE MLP, LeNet-5 and two specialists trained on half of the classes each, all
  trained through gatelab's digits recipes, each with its measured latency per query.
- Broker: values = validation accuracy above chance (floored at 0), costs = measured batch-1
  latencies; the council is the exact knapsack optimum under a latency budget given as a
  fraction of the whole pool's summed latency. The DP is checked against the exhaustive
  search on a sweep of budgets (same subset every time) and both are timed.
- Compared on the test split, per budget: the council's best member (by test accuracy:
  an optimistic oracle baseline), the council's majority (plurality) vote, the mean of the
  council's distributions (a plain linear pool), NSED with a fixed gate (f = 0.5,
  β = 0.5) after 1..R rounds, NSED with (f, β) learned on the validation split for each
  round count, and one dense MLP 64-h-h-10 whose parameter count matches the council's
  total, trained through the ``digits-dense`` recipe (same steps as the pool's members).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from ..ensemble.nsed import NSED, NSEDConfig, consensus_nll, deliberate, plurality
from ..ensemble.nsed_broker import ExpertiseBroker, knapsack, knapsack_exhaustive
from ..ensemble.pool import LogitsOnly, digits_pool, measure_latency
from ..recipes import build_run, load_recipe
from . import mean_std

NAME = "nsed"
DESCRIPTION = (
    "NSED deliberation (knapsack broker, likelihood peer review, quadratic voting, "
    "forget-gated rounds) vs best member, majority and a same-cost MLP on digits"
)

SCALES = {
    "smoke": {"seeds": 1, "rounds": 3, "budgets": [0.5, 1.0], "mlp_steps": 4, "sweep": 6},
    "full": {
        "seeds": 2,
        "rounds": 5,
        "budgets": [0.1, 0.3, 0.6, 1.0],
        "mlp_steps": 600,
        "sweep": 40,
    },
}
FIXED = NSEDConfig(rounds=1, forget=0.5, prior_weight=0.5)


def accuracy(probs_or_log_probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs_or_log_probs.argmax(-1) == y).float().mean())


def knapsack_check(broker: ExpertiseBroker, points: int) -> dict:
    """DP vs exhaustive search on ``points`` budgets from 0 to the whole pool's latency:
    how many agree exactly, and the seconds each took in all."""
    total = sum(broker.latency_s)
    budgets = [total * i / (points - 1) for i in range(points)]
    start = time.perf_counter()
    dp = [knapsack(broker.values, broker.latency_s, b) for b in budgets]
    dp_s = time.perf_counter() - start
    start = time.perf_counter()
    ex = [knapsack_exhaustive(broker.values, broker.latency_s, b) for b in budgets]
    ex_s = time.perf_counter() - start
    return {
        "budgets": len(budgets),
        "agree": sum(a == b for a, b in zip(dp, ex, strict=True)),
        "dp_s": dp_s,
        "exhaustive_s": ex_s,
    }


def mlp_width(params: int) -> int:
    """The h of a dense MLP 64-h-h-10 (h^2 + 76h + 10 parameters) closest to ``params``."""
    h = (-76 + math.sqrt(76**2 - 4 * (10 - params))) / 2
    return max(1, round(h))


def train_single_mlp(width: int, steps: int, seed: int, run_dir: Path, data: dict) -> dict:
    """The digits-dense recipe with hidden layers [width, width], trained by the Trainer."""
    recipe = load_recipe("digits-dense")
    recipe["name"] = f"nsed-single-{width}"
    recipe["model"]["hidden_dims"] = [width, width]
    recipe["data"]["seed"] = seed
    recipe["train"].update(
        steps=steps,
        seed=seed,
        run_dir=str(run_dir),
        warmup_steps=min(30, steps // 10),
        eval_every=0,
        save_every=0,
        routing_every=0,
        progress=False,
        verbose=False,
        tensorboard=False,
    )
    torch.manual_seed(seed)
    run = build_run(recipe)
    run.trainer(evaluate=False).fit()
    model = LogitsOnly(run.model).eval()
    x, y = data["test"]
    with torch.no_grad():
        acc = accuracy(model(x), y)
    params = sum(p.numel() for p in model.parameters())
    return {"width": width, "params": params, "accuracy": acc,
            "latency_s": measure_latency(model, data["val"][0][:1])}  # fmt: skip


def run_budget(pool, broker, data, fraction: float, cfg: dict, seed: int, out_dir: Path) -> dict:
    """Bind a council under ``fraction`` of the pool's latency and compare everything."""
    roles = broker.bind(fraction * sum(broker.latency_s))
    council = list(roles.council)
    x_val, y_val = data["val"]
    x_test, y_test = data["test"]
    lp = pool.log_probs(x_test)[council]  # [M_council, N, C]
    member_acc = {pool.members[i].name: accuracy(lp[k], y_test) for k, i in enumerate(council)}
    result = {
        "council": list(roles.names),
        "latency_s": roles.latency_s,
        "params": sum(pool.members[i].params for i in council),
        "best_member": max(member_acc.values()),
        "best_member_name": max(member_acc, key=member_acc.get),
        "members": member_acc,
    }
    if len(council) < 2:  # no deliberation with one member: it is its own answer
        result.update(majority=result["best_member"], mean_probs=result["best_member"])
        result.update(fixed=[result["best_member"]] * cfg["rounds"], learned=result["fixed"])
        return result
    result["majority"] = float((plurality(lp) == y_test).float().mean())
    result["mean_probs"] = accuracy(lp.exp().mean(0), y_test)
    trace = deliberate(lp, NSEDConfig(cfg["rounds"], FIXED.forget, FIXED.prior_weight))
    result["fixed"] = [accuracy(s, y_test) for s in trace.states]
    result["fixed_nll"] = [consensus_nll(s, y_test) for s in trace.states]
    start = time.perf_counter()
    deliberate(lp, NSEDConfig(cfg["rounds"]))
    result["protocol_s_per_query"] = (time.perf_counter() - start) / len(y_test)
    result["learned"], result["gates"] = [], []
    for rounds in range(1, cfg["rounds"] + 1):
        nsed = NSED(pool, council, NSEDConfig(rounds=rounds))
        result["gates"].append(nsed.fit(x_val, y_val))
        result["learned"].append(accuracy(nsed(x_test).final, y_test))
    width = mlp_width(result["params"])
    run_dir = out_dir / f"single-mlp-s{seed}-w{width}"
    result["single"] = train_single_mlp(width, cfg["mlp_steps"], seed, run_dir, data)
    return result


def run_seed(scale: str, cfg: dict, seed: int, out_dir: Path) -> dict:
    pool, data = digits_pool(scale, seed)
    broker = ExpertiseBroker.from_validation(pool, *data["val"])
    x_test, y_test = data["test"]
    lp = pool.log_probs(x_test)
    return {
        "pool": {
            m.name: {
                "params": m.params,
                "latency_s": m.latency_s,
                "value": v,
                "test_accuracy": accuracy(lp[i], y_test),
            }  # fmt: skip
            for i, (m, v) in enumerate(zip(pool.members, broker.values, strict=True))
        },
        "knapsack": knapsack_check(broker, cfg["sweep"]),
        "budgets": {
            str(f): run_budget(pool, broker, data, f, cfg, seed, out_dir) for f in cfg["budgets"]
        },
    }


def _ms(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}"


def tables(runs: list[dict], cfg: dict) -> str:
    rows = [
        "| budget (of pool latency) | council (seed 0) | latency µs/query | params "
        "| best member | majority | mean probs | NSED fixed, R=1 | NSED fixed, R=max "
        "| NSED learned, R=max | single MLP (params, µs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in map(str, cfg["budgets"]):
        per = [r["budgets"][f] for r in runs]
        single = [p["single"] for p in per if "single" in p]
        single_cell = (
            f"{_ms([s['accuracy'] for s in single])} "
            f"({single[0]['params']}, {1e6 * single[0]['latency_s']:.0f})"
            if single
            else "n/a"
        )
        rows.append(
            f"| {f} | {', '.join(per[0]['council'])} "
            f"| {1e6 * statistics.fmean(p['latency_s'] for p in per):.0f} "
            f"| {per[0]['params']} | {_ms([p['best_member'] for p in per])} "
            f"| {_ms([p['majority'] for p in per])} | {_ms([p['mean_probs'] for p in per])} "
            f"| {_ms([p['fixed'][0] for p in per])} | {_ms([p['fixed'][-1] for p in per])} "
            f"| {_ms([p['learned'][-1] for p in per])} | {single_cell} |"
        )
    rounds = [
        "",
        "| rounds R | " + " | ".join(f"fixed @ {f} | learned @ {f}" for f in cfg["budgets"]) + " |",
        "|---|" + "---|---|" * len(cfg["budgets"]),
    ]
    for r in range(cfg["rounds"]):
        cells = []
        for f in map(str, cfg["budgets"]):
            per = [run["budgets"][f] for run in runs]
            cells += [_ms([p["fixed"][r] for p in per]), _ms([p["learned"][r] for p in per])]
        rounds.append(f"| {r + 1} | " + " | ".join(cells) + " |")
    checks = [
        "",
        "| seed | knapsack DP = exhaustive | DP s | exhaustive s |",
        "|---|---|---|---|",
    ]
    for i, run in enumerate(runs):
        k = run["knapsack"]
        checks.append(
            f"| {i} | {k['agree']}/{k['budgets']} | {k['dp_s']:.4f} | {k['exhaustive_s']:.4f} |"
        )
    return "\n".join(rows + rounds + checks)


def plot(runs: list[dict], cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [str(f) for f in cfg["budgets"]]
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    rounds = list(range(1, cfg["rounds"] + 1))
    for ax, f in zip(axes[0], budgets, strict=True):
        per = [run["budgets"][f] for run in runs]
        for key, style in (("fixed", "o-"), ("learned", "s-")):
            mean = [statistics.fmean(p[key][r] for p in per) for r in range(cfg["rounds"])]
            ax.plot(rounds, mean, style, label=f"NSED {key} gate")
        for key, ls in (("best_member", "--"), ("majority", ":"), ("mean_probs", "-.")):
            ax.axhline(statistics.fmean(p[key] for p in per), ls=ls, color="gray", label=key)
        single = [p["single"]["accuracy"] for p in per if "single" in p]
        if single:
            ax.axhline(statistics.fmean(single), color="k", lw=0.8, label="single MLP, same params")
        ax.set_title(f"budget {f} of pool latency: {len(per[0]['council'])} members", fontsize=10)
        ax.set_xlabel("rounds R")
        ax.set_xticks(rounds)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    out = Path(out_dir if out_dir is not None else "runs/experiments/nsed")
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_seed(scale, cfg, seed + i, out) for i in range(cfg["seeds"])]
    png = out / "nsed.png"
    plot(runs, cfg, png)
    return {
        "table": tables(runs, cfg),
        "seeds": [seed + i for i in range(cfg["seeds"])],
        "config": {**cfg, "fixed_forget": FIXED.forget, "fixed_prior_weight": FIXED.prior_weight},
        "runs": runs,
        "plot": str(png),
    }
