"""MoE² on a pool of digits classifiers: subset choice under energy and latency budgets.

Claim tested: "MoE²: Optimizing Collaborative Inference for Edge Large Language Models"
(Jin et al., arXiv 2501.09410): a gate trained once on the full expert set stays optimal on
any subset (optimality preservation), the loss is then monotone in the subset, and discrete
monotonic optimisation finds the best subset under energy and per-category latency budgets;
the resulting trade-off curves beat the baselines.

Protocol (ours; the paper's edge LLMs and MMLU are out of reach here):

- Pool (``gatelab.ensemble.digits_pool``): eight classifiers trained through the recipes on
  scikit-learn digits: MLPs of widths 8 to 256 and depth 1 to 3, an MoE MLP, LeNet-5 and two
  specialists trained on classes 0-4 or 5-9 only. Costs measured here: multiply-adds per
  query (energy proxy), CPU latency of a single query and per query in batches of 32 (the
  two query categories, each with its own latency budget).
- Gate (``SubsetGate``, top-2, trained on the validation split on the members' fixed
  outputs): "paper" trained on the full set only; "dropout" trained once with half of the
  rows seeing random subsets (ours). L(S) = the mixture's validation cross-entropy; test
  numbers are held out from members, gate and selection.
- Budgets: fractions of the full set's total cost per resource. The branch-and-bound is
  compared with the exhaustive search on a grid of (energy, single latency, batched latency)
  budgets; the trade-off curve uses one fraction for all three.
- Optimality preservation: for several S, the gate trained on the full set and restricted
  to S against a gate retrained from scratch on S alone (same settings).
- Synthetic: random monotone (coverage) instances of 12 and 16 members, where the search
  must be exact, for the evaluations and seconds at a size where 2^M matters.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..ensemble import digits_pool
from ..ensemble.moe2 import MixtureLoss, SubsetGate, moe2_problem, subset_mask, train_gate
from ..ensemble.subsets import (
    coverage_instance,
    exhaustive_search,
    greedy_by_value_per_cost,
    monotone_search,
    monotonicity_violations,
    random_feasible,
)
from ..io import write_json

NAME = "moe2"
DESCRIPTION = "MoE²: gate over whole models, subset under energy/latency budgets by monotone B&B"

SCALES = {
    "smoke": {
        "pool": "smoke",
        "gate_steps": 20,
        "fractions": [0.05, 0.3, 1.0],
        "grid": [0.1, 0.5],
        "preserve": 3,
        "draws": 5,
        "synthetic": [8],
        "instances": 1,
    },
    "full": {
        "pool": "full",
        "gate_steps": 1000,
        "fractions": [0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0],
        "grid": [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0],
        "preserve": 10,
        "draws": 50,
        "synthetic": [12, 16],
        "instances": 3,
    },
}
GATES = {"paper": 0.0, "dropout": 0.5}  # gate variant -> subset_dropout
TOP_K = 2


def run(scale: str, seed: int, out_dir: Path) -> dict[str, Any]:
    cfg = SCALES[scale]
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    pool, data = digits_pool(cfg["pool"], seed)
    lps = {split: pool.log_probs(x) for split, (x, _) in data.items()}
    gates = {
        name: _fit_gate(pool, data, lps, None, drop, cfg, seed) for name, drop in GATES.items()
    }
    losses = {
        name: {s: MixtureLoss(g, data[s][0], lps[s], data[s][1]) for s in ("val", "test")}
        for name, g in gates.items()
    }
    totals = {k: float(v.sum()) for k, v in pool.costs().items()}
    members = _members(pool, data, lps, gates["paper"])
    monotone = {
        name: dict(
            zip(
                ("violations", "pairs", "max_increase"),
                monotonicity_violations(ls["val"], len(pool), 1e-9, include_empty=False),
                strict=True,
            )
        )
        for name, ls in losses.items()
    }
    sweep = _sweep(pool, losses, totals, cfg["grid"])
    curve = _tradeoff(pool, losses, totals, cfg, seed, lps, data)
    preserve = _preservation(pool, data, lps, gates, losses, curve, cfg, seed)
    synthetic = _synthetic(cfg, seed)
    plot = _plot(curve, out_dir / "tradeoff.png")
    result = {
        "members": members,
        "monotonicity": monotone,
        "sweep": sweep,
        "tradeoff": curve,
        "preservation": preserve,
        "synthetic": synthetic,
        "plot": str(plot),
    }
    result["table"] = _table(result, pool)
    write_json(out_dir / "result.json", result)
    return result


def _fit_gate(pool, data, lps, subset, dropout, cfg, seed) -> SubsetGate:
    torch.manual_seed(seed)
    gate = SubsetGate(64, len(pool), top_k=TOP_K)
    mask = None if subset is None else subset_mask(subset, len(pool))
    x, y = data["val"]
    train_gate(
        gate, x, lps["val"], y, mask, steps=cfg["gate_steps"], subset_dropout=dropout, seed=seed
    )
    return gate


def _members(pool, data, lps, gate) -> list[dict[str, Any]]:
    rows = []
    for i, m in enumerate(pool.members):
        acc = {
            s: float((lps[s][i].argmax(-1) == data[s][1]).float().mean()) for s in ("val", "test")
        }
        rows.append(
            {
                "name": m.name,
                "params": m.params,
                "flops": m.flops,
                "latency_us": m.latency_s * 1e6,
                "batch_latency_us": m.batch_latency_s * 1e6,
                "val_accuracy": acc["val"],
                "test_accuracy": acc["test"],
                "val_loss": float(F.nll_loss(lps["val"][i], data["val"][1])),
                "classes": "all" if m.classes is None else f"{m.classes[0]}-{m.classes[-1]}",
            }
        )
    # The gate runs for every query of a non-empty S: its cost, for comparison.
    from ..ensemble.pool import count_flops, measure_latency

    one = data["val"][0][:1]
    rows.append(
        {
            "name": "(gate)",
            "params": sum(p.numel() for p in gate.parameters()),
            "flops": count_flops(gate, one),
            "latency_us": measure_latency(gate, one) * 1e6,
            "batch_latency_us": measure_latency(gate, data["val"][0][:32]) / 32 * 1e6,
        }
    )
    return rows


def _problem(pool, loss, totals, fractions):
    fe, fs, fb = fractions
    return moe2_problem(
        pool, loss, totals["flops"] * fe, totals["latency_s"] * fs, totals["batch_latency_s"] * fb
    )


def _sweep(pool, losses, totals, grid) -> list[dict[str, Any]]:
    """B&B vs exhaustive on every (energy, single, batched) budget of the grid, per gate."""
    rows = []
    for name, ls in losses.items():
        for fractions in itertools.product(grid, repeat=3):
            problem = _problem(pool, ls["val"], totals, fractions)
            exact, found = exhaustive_search(problem), monotone_search(problem)
            rows.append(
                {
                    "gate": name,
                    "fractions": list(fractions),
                    "exhaustive_loss": exact.loss,
                    "bnb_loss": found.loss,
                    "same_subset": exact.subset == found.subset,
                    "exhaustive_evaluated": exact.evaluated,
                    "bnb_evaluated": found.evaluated,
                    "exhaustive_s": exact.seconds,
                    "bnb_s": found.seconds,
                }
            )
    return rows


def _names(pool, subset) -> str:
    return "+".join(pool.names[i] for i in sorted(subset)) or "(none)"


def _tradeoff(pool, losses, totals, cfg, seed, lps, data) -> list[dict[str, Any]]:
    """Per budget fraction: the MoE² optimum (per gate) and the baselines (dropout gate's L)."""
    gen = torch.Generator().manual_seed(seed)
    val_acc = torch.stack(
        [(lps["val"][i].argmax(-1) == data["val"][1]).float().mean() for i in range(len(pool))]
    )
    rows = []
    for f in cfg["fractions"]:
        row: dict[str, Any] = {"fraction": f}
        for name, ls in losses.items():
            found = monotone_search(_problem(pool, ls["val"], totals, (f, f, f)))
            row[name] = _scored(pool, ls, found.subset)
        ls = losses["dropout"]
        problem = _problem(pool, ls["val"], totals, (f, f, f))
        singles = [frozenset([i]) for i in range(len(pool)) if problem.feasible(frozenset([i]))]
        best_single = min(singles, key=ls["val"], default=frozenset())
        row["single"] = _scored(pool, ls, best_single)
        row["greedy"] = _scored(pool, ls, greedy_by_value_per_cost(problem, val_acc))
        draws = random_feasible(problem, gen, cfg["draws"]) or [frozenset()]
        scored = [_scored(pool, ls, s) for s in draws]
        row["random"] = {
            k: statistics.fmean(s[k] for s in scored) for k in scored[0] if k != "subset"
        }
        rows.append(row)
    return rows


def _scored(pool, ls, subset) -> dict[str, Any]:
    return {
        "subset": _names(pool, subset),
        "val_loss": ls["val"](subset),
        "test_loss": ls["test"](subset),
        "test_accuracy": ls["test"].accuracy(subset),
    }


def _preservation(pool, data, lps, gates, losses, curve, cfg, seed) -> list[dict[str, Any]]:
    """Gate trained on the full set, restricted to S, vs a gate retrained on S alone."""
    index = {n: i for i, n in enumerate(pool.names)}
    chosen = {row["dropout"]["subset"] for row in curve} | {row["paper"]["subset"] for row in curve}
    subsets = [frozenset(index[n] for n in s.split("+")) for s in sorted(chosen) if s != "(none)"]
    gen = torch.Generator().manual_seed(seed + 1)
    while len(subsets) < cfg["preserve"]:
        pick = frozenset(torch.randperm(len(pool), generator=gen)[: 2 + len(subsets) % 4].tolist())
        if pick not in subsets:
            subsets.append(pick)
    rows = []
    for subset in [s for s in subsets if len(s) >= 2][: cfg["preserve"]]:
        for name, drop in GATES.items():
            retrained = _fit_gate(pool, data, lps, subset, drop, cfg, seed)
            again = {
                s: MixtureLoss(retrained, data[s][0], lps[s], data[s][1]) for s in ("val", "test")
            }
            rows.append(
                {
                    "gate": name,
                    "subset": _names(pool, subset),
                    "restricted_val": losses[name]["val"](subset),
                    "retrained_val": again["val"](subset),
                    "restricted_test": losses[name]["test"](subset),
                    "retrained_test": again["test"](subset),
                }
            )
    return rows


def _synthetic(cfg, seed) -> list[dict[str, Any]]:
    rows = []
    for size in cfg["synthetic"]:
        for k in range(cfg["instances"]):
            gen = torch.Generator().manual_seed(seed * 1000 + size * 10 + k)
            problem = coverage_instance(size, gen, resources=3, budget_fraction=0.3)
            exact, found = exhaustive_search(problem), monotone_search(problem)
            rows.append(
                {
                    "members": size,
                    "instance": k,
                    "same": abs(exact.loss - found.loss) < 1e-12,
                    "exhaustive_evaluated": exact.evaluated,
                    "bnb_evaluated": found.evaluated,
                    "exhaustive_s": exact.seconds,
                    "bnb_s": found.seconds,
                }
            )
    return rows


METHODS = {
    "dropout": "MoE² (dropout gate)",
    "paper": "MoE² (paper gate)",
    "single": "best single",
    "greedy": "greedy acc/cost",
    "random": "random feasible",
}


def _plot(curve, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [row["fraction"] for row in curve]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in METHODS.items():
        axes[0].plot(fractions, [row[key]["val_loss"] for row in curve], marker="o", label=label)
        axes[1].plot(
            fractions, [row[key]["test_accuracy"] for row in curve], marker="o", label=label
        )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="budget (fraction of the full pool's cost)",
        ylabel="validation cross-entropy L(S)",
    )
    axes[1].set(
        xscale="log", xlabel="budget (fraction of the full pool's cost)", ylabel="test accuracy"
    )
    axes[0].legend(fontsize=8)
    fig.suptitle("MoE² on digits: loss-budget trade-off (energy and both latency budgets)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _table(result: dict[str, Any], pool) -> str:
    return "\n\n".join(
        [
            _members_table(result["members"]),
            _monotone_table(result["monotonicity"]),
            _sweep_table(result["sweep"]),
            _synthetic_table(result["synthetic"]),
            _tradeoff_table(result["tradeoff"]),
            _preservation_table(result["preservation"]),
        ]
    )


def _markdown(header: list[str], align: str, rows: list[list[Any]]) -> str:
    """A markdown table; ``align`` one character per column, "l" or "r"."""
    rule = "|".join("---" if a == "l" else "---:" for a in align)
    lines = ["| " + " | ".join(header) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _members_table(rows) -> str:
    header = [
        "member",
        "classes",
        "params",
        "multiply-adds",
        "latency single (µs)",
        "per query in batches of 32 (µs)",
        "val acc",
        "test acc",
    ]
    cells = [
        [
            r["name"],
            r.get("classes", "-"),
            r["params"],
            r["flops"],
            f"{r['latency_us']:.0f}",
            f"{r['batch_latency_us']:.1f}",
            f"{r.get('val_accuracy', float('nan')):.3f}",
            f"{r.get('test_accuracy', float('nan')):.3f}",
        ]
        for r in rows
    ]
    return _markdown(header, "llrrrrrr", cells).replace("nan", "-")


def _monotone_table(monotone) -> str:
    header = ["gate", "pairs (S ≠ ∅, i) with L(S ∪ {i}) > L(S)", "of", "largest increase"]
    cells = [
        [n, m["violations"], m["pairs"], f"{m['max_increase']:.4f}"] for n, m in monotone.items()
    ]
    return _markdown(header, "lrrr", cells)


def _sweep_table(rows) -> str:
    header = [
        "gate",
        "budgets",
        "B&B = exhaustive (loss)",
        "within 0.001",
        "same subset",
        "largest gap",
        "subsets evaluated: exhaustive / B&B (mean)",
        "seconds: exhaustive / B&B (total)",
    ]
    cells = []
    for gate in GATES:
        rs = [r for r in rows if r["gate"] == gate]
        same = sum(abs(r["bnb_loss"] - r["exhaustive_loss"]) < 1e-12 for r in rs)
        near = sum(r["bnb_loss"] - r["exhaustive_loss"] < 1e-3 for r in rs)
        gap = max(r["bnb_loss"] - r["exhaustive_loss"] for r in rs)
        ev = [statistics.fmean(r[k] for r in rs) for k in ("exhaustive_evaluated", "bnb_evaluated")]
        sec = [sum(r[k] for r in rs) for k in ("exhaustive_s", "bnb_s")]
        cells.append(
            [
                gate,
                len(rs),
                same,
                near,
                sum(r["same_subset"] for r in rs),
                f"{gap:.4f}",
                f"{ev[0]:.1f} / {ev[1]:.1f}",
                f"{sec[0]:.2f} / {sec[1]:.2f}",
            ]
        )
    return _markdown(header, "lrrrrrrr", cells)


def _synthetic_table(rows) -> str:
    header = [
        "random monotone instance, members",
        "instances",
        "B&B = exhaustive",
        "subsets evaluated: exhaustive / B&B (mean)",
        "seconds: exhaustive / B&B (mean)",
    ]
    cells = []
    for size in sorted({r["members"] for r in rows}):
        rs = [r for r in rows if r["members"] == size]
        mean = {
            k: statistics.fmean(r[k] for r in rs)
            for k in ("exhaustive_evaluated", "bnb_evaluated", "exhaustive_s", "bnb_s")
        }
        cells.append(
            [
                size,
                len(rs),
                sum(r["same"] for r in rs),
                f"{mean['exhaustive_evaluated']:.0f} / {mean['bnb_evaluated']:.0f}",
                f"{mean['exhaustive_s']:.3f} / {mean['bnb_s']:.3f}",
            ]
        )
    return _markdown(header, "rrrrr", cells)


def _tradeoff_table(rows) -> str:
    header = [
        "budget",
        *(f"{label}: val loss, test loss, test acc" for label in METHODS.values()),
        "MoE² (dropout gate) subset",
        "best single",
    ]
    cells = [
        [
            f"{r['fraction']:g}",
            *(
                f"{r[k]['val_loss']:.4f}, {r[k]['test_loss']:.4f}, {r[k]['test_accuracy']:.3f}"
                for k in METHODS
            ),
            r["dropout"]["subset"],
            r["single"]["subset"],
        ]
        for r in rows
    ]
    return _markdown(header, "r" * (1 + len(METHODS)) + "ll", cells)


def _preservation_table(rows) -> str:
    header = [
        "gate",
        "S",
        "val loss: full-set gate restricted to S",
        "retrained on S",
        "test loss: restricted",
        "retrained",
    ]
    keys = ("restricted_val", "retrained_val", "restricted_test", "retrained_test")
    cells = [[r["gate"], r["subset"], *(f"{r[k]:.4f}" for k in keys)] for r in rows]
    return _markdown(header, "llrrrr", cells)
