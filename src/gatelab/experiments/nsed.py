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
- Two conditions: ``clean`` (the digits splits as they are) and ``rotated`` (validation
  and test images rotated by ``ROTATION`` degrees, the members trained on upright digits):
  clean digits are nearly solved by the best member (one test error is 0.0028), the
  rotation leaves room for the ensemble to matter. In each condition the broker's values
  and the learned gate come from that condition's validation split.
- Compared on the test split, per budget: the council's member of the best validation
  accuracy, its best member by test accuracy (an oracle), the council's majority
  (plurality) vote, the mean of the council's distributions (a plain linear pool), NSED with a fixed gate (f = 0.5,
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

from ..data import rotate
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
        "seeds": 3,
        "rounds": 5,
        "budgets": [0.1, 0.3, 0.6, 1.0],
        "mlp_steps": 600,
        "sweep": 40,
    },
}
CONDITIONS = ("clean", "rotated")
ROTATION = 30.0  # degrees, counter-clockwise, of the val and test images in "rotated"
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
    """The digits-dense recipe with hidden layers [width, width], trained by the Trainer
    (on the upright train split); the model, its parameters and its measured latency."""
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
    params = sum(p.numel() for p in model.parameters())
    return {"width": width, "params": params, "model": model,
            "latency_s": measure_latency(model, data["val"][0][:1])}  # fmt: skip


def run_budget(pool, broker, data, fraction: float, cfg: dict, single_mlp) -> dict:
    """Bind a council under ``fraction`` of the pool's latency and compare everything on
    ``data`` (one condition); ``single_mlp(params)`` gives the same-params MLP (trained once
    per width and seed, shared by the conditions)."""
    roles = broker.bind(fraction * sum(broker.latency_s))
    council = list(roles.council)
    x_val, y_val = data["val"]
    x_test, y_test = data["test"]
    lp = pool.log_probs(x_test)[council]  # [M_council, N, C]
    member_acc = {pool.members[i].name: accuracy(lp[k], y_test) for k, i in enumerate(council)}
    val_acc = {pool.members[i].name: broker.values[i] for i in council}
    result = {
        "council": list(roles.names),
        "latency_s": roles.latency_s,
        "params": sum(pool.members[i].params for i in council),
        "best_member": max(member_acc.values()),
        "best_member_name": max(member_acc, key=member_acc.get),
        "val_best_member": member_acc[max(val_acc, key=val_acc.get)],
        "members": member_acc,
    }
    if len(council) < 2:  # no deliberation with one member: it is its own answer
        only = result["best_member"]
        result.update(majority=only, mean_probs=only, fixed=[only] * cfg["rounds"])
        result.update(learned=result["fixed"])
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
    single = single_mlp(result["params"])
    with torch.no_grad():
        single_acc = accuracy(single["model"](x_test), y_test)
    result["single"] = {k: v for k, v in single.items() if k != "model"}
    result["single"]["accuracy"] = single_acc
    return result


def conditions(data: dict) -> dict[str, dict]:
    """``clean``: the splits as they are; ``rotated``: val and test rotated by ROTATION."""
    turned = {k: (rotate(x, ROTATION), y) for k, (x, y) in data.items() if k != "train"}
    return {"clean": data, "rotated": {"train": data["train"], **turned}}


def run_seed(scale: str, cfg: dict, seed: int, out_dir: Path) -> dict:
    pool, data = digits_pool(scale, seed)
    trained: dict[int, dict] = {}

    def single_mlp(params: int) -> dict:
        width = mlp_width(params)
        if width not in trained:
            run_dir = out_dir / f"single-mlp-s{seed}-w{width}"
            trained[width] = train_single_mlp(width, cfg["mlp_steps"], seed, run_dir, data)
        return trained[width]

    out = {}
    for name, cond in conditions(data).items():
        broker = ExpertiseBroker.from_validation(pool, *cond["val"])
        lp = pool.log_probs(cond["test"][0])
        out[name] = {
            "pool": {
                m.name: {
                    "params": m.params,
                    "latency_s": m.latency_s,
                    "value": v,
                    "test_accuracy": accuracy(lp[i], cond["test"][1]),
                }  # fmt: skip
                for i, (m, v) in enumerate(zip(pool.members, broker.values, strict=True))
            },
            "knapsack": knapsack_check(broker, cfg["sweep"]),
            "budgets": {
                str(f): run_budget(pool, broker, cond, f, cfg, single_mlp) for f in cfg["budgets"]
            },
        }
    return out


def _ms(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}"


def summary_rows(runs: list[dict], cfg: dict, cond: str) -> list[str]:
    rows = []
    for f in map(str, cfg["budgets"]):
        per = [r[cond]["budgets"][f] for r in runs]
        single = [p["single"] for p in per if "single" in p]
        single_cell = (
            f"{_ms([s['accuracy'] for s in single])} "
            f"({single[0]['params']}, {1e6 * single[0]['latency_s']:.0f})"
            if single
            else "n/a"
        )
        rows.append(
            f"| {cond} | {f} | {', '.join(per[0]['council'])} "
            f"| {1e6 * statistics.fmean(p['latency_s'] for p in per):.0f} "
            f"| {per[0]['params']} | {_ms([p['val_best_member'] for p in per])} "
            f"| {_ms([p['best_member'] for p in per])} "
            f"| {_ms([p['majority'] for p in per])} | {_ms([p['mean_probs'] for p in per])} "
            f"| {_ms([p['fixed'][0] for p in per])} | {_ms([p['fixed'][-1] for p in per])} "
            f"| {_ms([p['learned'][-1] for p in per])} | {single_cell} |"
        )
    return rows


def tables(runs: list[dict], cfg: dict) -> str:
    rows = [
        "| condition | budget (of pool latency) | council (seed 0) | latency µs/query | params "
        "| member best on val | best member (oracle) | majority | mean probs "
        "| NSED fixed, R=1 | NSED fixed, R=max | NSED learned, R=max "
        "| single MLP (params, µs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cond in CONDITIONS:
        rows += summary_rows(runs, cfg, cond)
    rounds = [
        "",
        "| condition | rounds R | "
        + " | ".join(f"fixed @ {f} | learned @ {f}" for f in cfg["budgets"])
        + " |",
        "|---|---|" + "---|---|" * len(cfg["budgets"]),
    ]
    for cond in CONDITIONS:
        for r in range(cfg["rounds"]):
            cells = []
            for f in map(str, cfg["budgets"]):
                per = [run[cond]["budgets"][f] for run in runs]
                cells += [_ms([p["fixed"][r] for p in per]), _ms([p["learned"][r] for p in per])]
            rounds.append(f"| {cond} | {r + 1} | " + " | ".join(cells) + " |")
    checks = [
        "",
        "| seed | condition | knapsack DP = exhaustive | DP s | exhaustive s |",
        "|---|---|---|---|---|",
    ]
    for i, run in enumerate(runs):
        for cond in CONDITIONS:
            k = run[cond]["knapsack"]
            checks.append(
                f"| {i} | {cond} | {k['agree']}/{k['budgets']} | {k['dp_s']:.4f} "
                f"| {k['exhaustive_s']:.4f} |"
            )
    return "\n".join(rows + rounds + checks)


def plot(runs: list[dict], cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [str(f) for f in cfg["budgets"]]
    fig, axes = plt.subplots(
        len(CONDITIONS), len(budgets), figsize=(4.5 * len(budgets), 3.6 * len(CONDITIONS))
    )
    rounds = list(range(1, cfg["rounds"] + 1))
    for row, cond in zip(axes, CONDITIONS, strict=True):
        for ax, f in zip(row, budgets, strict=True):
            per = [run[cond]["budgets"][f] for run in runs]
            for key, style in (("fixed", "o-"), ("learned", "s-")):
                mean = [statistics.fmean(p[key][r] for p in per) for r in range(cfg["rounds"])]
                ax.plot(rounds, mean, style, label=f"NSED {key} gate")
            for key, ls in (("val_best_member", "--"), ("majority", ":"), ("mean_probs", "-.")):
                ax.axhline(statistics.fmean(p[key] for p in per), ls=ls, color="gray", label=key)
            single = [p["single"]["accuracy"] for p in per if "single" in p]
            if single:
                ax.axhline(statistics.fmean(single), color="k", lw=0.8, label="same-params MLP")
            ax.set_title(f"{cond}, budget {f}: {len(per[0]['council'])} members", fontsize=9)
            ax.set_xticks(rounds)
        row[0].set_ylabel("test accuracy")
    for ax in axes[-1]:
        ax.set_xlabel("rounds R")
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
        "config": {
            **cfg,
            "rotation": ROTATION,
            "fixed_forget": FIXED.forget,
            "fixed_prior_weight": FIXED.prior_weight,
        },
        "runs": runs,
        "plot": str(png),
    }
