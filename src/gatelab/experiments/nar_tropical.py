"""NAR with tropical aggregation: does a max / min-plus processor generalise to larger graphs
better than sum / mean, and does learning max-flow together with min-cut help either?

Claims tested (the NAR thesis, abstracts.txt: "connections between neural networks and
tropical algebra, deriving powerful architectures that are aligned with algorithm execution"
and "the principle of strong duality"; Dudzik & Veličković, arXiv 2203.15544; Numeroso et
al., "Dual algorithmic reasoning", arXiv 2302.04496):

1. processors whose aggregation matches the algorithm's (min-plus for Bellman–Ford, max as its
   hard-gate cousin) extrapolate to graphs 2x and 4x larger than the training graphs, where
   sum / mean processors do not;
2. training max-flow together with min-cut, sharing the processor, helps the flow value and /
   or the cut (DAR reports better max-flow when the min-cut is learned alongside).

Setup (:mod:`gatelab.data.algorithms`, :class:`gatelab.models.nar.NARModel`): train on
fresh directed Erdős–Rényi graphs of 16 nodes (expected out-degree 1.2 plus a source -> sink
path, weights / capacities uniform in [0.1, 1]), Adam with warm-up + cosine, grad clip 1;
the processor runs ``N`` steps on an ``N``-node graph. Test on fixed held-out graphs: ER with
16 (in distribution), 32 and 64 nodes, and 8x8 directed grids (64 nodes, another family).
Shortest paths (metric: MAE of distances on reachable nodes / their mean distance) and
reachability (node accuracy; the majority-class rate is listed as the floor) are trained
separately for each aggregation (``softminplus`` at temperature 0.1 too). Max-flow /
min-cut use the ``max`` processor (DAR's PGN is a max-aggregator) in three arms: flow alone,
cut alone, both (joint). Metrics: flow value |error| / mean value, cut node accuracy, and the
capacity of the predicted cut over the true min cut (1 is optimal). Trivial predictors on the
same graphs (training mean, a capacity bound, the cut {source}) are listed as floors.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch

from ..data.algorithms import random_batch
from ..models.nar import NARConfig, NARModel, nar_loss, nar_metrics
from ._loop import train_loop, warmup_then_cosine

NAME = "nar-tropical"
DESCRIPTION = (
    "NAR processors (sum/mean/max/min-plus/soft min-plus) on shortest paths and reachability, 16 -> 32/64 "
    "nodes; max-flow and min-cut single vs joint"
)

SETTINGS = {
    "smoke": dict(
        train_n=8,
        test=(("er", 8), ("er", 12)),
        steps=3,
        hidden=8,
        batch=4,
        eval_graphs=4,
        seeds=1,
        lr=3e-3,
    ),
    "full": dict(
        train_n=16,
        test=(("er", 16), ("er", 32), ("er", 64), ("grid", 64)),
        steps=300,
        hidden=16,
        batch=16,
        eval_graphs=24,
        seeds=2,
        lr=3e-3,
    ),
}
PROCESSORS = ("sum", "mean", "max", "minplus", "softminplus")
FLOW_ARMS = {"flow alone": ("flow",), "cut alone": ("cut",), "joint flow + cut": ("flow", "cut")}
FLOW_PROCESSOR = "max"


def _test_sets(s: dict, seed: int, flow: bool) -> dict[str, dict]:
    """Fixed held-out batches (seeded apart from training); flow tasks on ER only."""
    rng = np.random.default_rng(10_000 + seed)
    return {
        f"{fam}-{n}": random_batch(fam, n, s["eval_graphs"], rng, flow=flow)
        for fam, n in s["test"]
        if fam == "er" or not flow
    }


def _train_and_test(s: dict, cfg: NARConfig, seed: int, tests: dict) -> dict[str, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    flow = "flow" in cfg.tasks or "cut" in cfg.tasks
    model = NARModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    sched = warmup_then_cosine(opt, max(1, s["steps"] // 10), s["steps"])
    batches = (random_batch("er", s["train_n"], s["batch"], rng, flow=flow) for _ in iter(int, 1))
    train_loop(
        model,
        lambda m, b: nar_loss(m(b), b),
        batches,
        opt,
        steps=s["steps"],
        schedule=sched,
        clip=1.0,
    )
    model.eval()
    with torch.no_grad():
        return {name: nar_metrics(model(b), b) for name, b in tests.items()}


def _baselines(s: dict, seed: int, tests: dict, flow_tests: dict) -> dict[str, dict]:
    """Trivial predictors on the same test graphs, as floors for the learned arms: the training
    mean distance / flow value (from 256 training-distribution graphs), the flow bound
    min(source out-capacity, sink in-capacity), and the cut {source} (every other node on the
    sink side)."""
    train = random_batch("er", s["train_n"], 256, np.random.default_rng(20_000 + seed), flow=True)
    mean_dist = float(train["dist"].sum() / train["reach"].sum())
    mean_flow = float(train["flow_value"].mean())
    out: dict[str, dict] = {"dist: train mean": {}, "flow: train mean": {}, "flow: bound": {}}
    out["cut: {source} only"] = {}
    for name, b in tests.items():
        out["dist: train mean"][name] = nar_metrics(
            {"dist": torch.full_like(b["dist"], mean_dist)}, b
        )
    for name, b in flow_tests.items():
        rows = torch.arange(len(b["source"]))
        cap = b["weight"] * b["adj"]
        bound = torch.minimum(cap[rows, b["source"]].sum(-1), cap[rows, :, b["sink"]].sum(-1))
        out["flow: train mean"][name] = nar_metrics({"flow": torch.full_like(bound, mean_flow)}, b)
        out["flow: bound"][name] = nar_metrics({"flow": bound}, b)
        logits = torch.full_like(b["cut"], -1.0)
        logits[rows, b["source"]] = 1.0
        out["cut: {source} only"][name] = nar_metrics({"cut": logits}, b)
    return out


def _cell(vals: list[float]) -> str:
    mean = statistics.fmean(vals)
    return f"{mean:.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def _collect(runs: list[dict], metric: str, test: str) -> list[float]:
    return [r[test][metric] for r in runs if test in r and metric in r[test]]


def _processor_table(results: dict, tests: list[str], floors: dict) -> list[str]:
    lines = [
        "| task (metric) | processor | " + " | ".join(tests) + " |",
        "|---|---|" + "---:|" * len(tests),
    ]
    for task, metric in (("dist", "dist_rel_mae"), ("reach", "reach_acc")):
        label = (
            "shortest paths (rel. MAE, lower better)"
            if task == "dist"
            else ("reachability (accuracy)")
        )
        for agg in PROCESSORS:
            runs = results[task][agg]
            lines.append(
                f"| {label} | {agg} | "
                + " | ".join(_cell(_collect(runs, metric, t)) for t in tests)
                + " |"
            )
    lines.insert(
        2 + len(PROCESSORS),
        "| shortest paths (rel. MAE, lower better) | baseline: train mean distance | "
        + " | ".join(_cell(_collect(results["baselines"], "dist_rel_mae", t)) for t in tests)
        + " |",
    )
    lines.append(
        "| reachability (accuracy) | majority class | "
        + " | ".join(_cell(floors[t]) for t in tests)
        + " |"
    )
    return lines


def _flow_table(results: dict, tests: list[str]) -> list[str]:
    cols = [("flow_rel_err", "flow rel. err"), ("cut_acc", "cut acc"), ("cut_ratio", "cut/min-cut")]
    head = [f"{label} {t}" for key, label in cols for t in tests]
    lines = ["| arm | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for arm, runs in results.items():
        if arm == "baselines":
            continue
        cells = []
        for key, _ in cols:
            for t in tests:
                vals = _collect(runs, key, t)
                cells.append(_cell(vals) if vals else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for name in ("flow: train mean", "flow: bound", "cut: {source} only"):
        cells = []
        for key, _ in cols:
            for t in tests:
                vals = [b[name][t][key] for b in results["baselines"] if key in b[name][t]]
                cells.append(_cell(vals) if vals else "—")
        lines.append(f"| baseline {name} | " + " | ".join(cells) + " |")
    return lines


def _plot(results: dict, tests: list[str], out_dir: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional extra
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (task, metric) in zip(
        axes, (("dist", "dist_rel_mae"), ("reach", "reach_acc")), strict=True
    ):
        for agg in PROCESSORS:
            ys = [statistics.fmean(_collect(results[task][agg], metric, t)) for t in tests]
            ax.plot(tests, ys, marker="o", label=agg)
        ax.set_title(metric)
        ax.set_xlabel("test set (train: er-16)")
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    path = out_dir / "nar_tropical.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    s = SETTINGS[scale]
    seeds = [seed + k for k in range(s["seeds"])]
    proc: dict = {"dist": {a: [] for a in PROCESSORS}, "reach": {a: [] for a in PROCESSORS}}
    flow: dict = {arm: [] for arm in FLOW_ARMS}
    floors: dict[str, list[float]] = {}
    proc["baselines"], flow["baselines"] = [], []
    for sd in seeds:
        tests = _test_sets(s, sd, flow=False)
        for name, b in tests.items():
            frac = float(b["reach"].mean())
            floors.setdefault(name, []).append(max(frac, 1 - frac))
        for task in ("dist", "reach"):
            for agg in PROCESSORS:
                cfg = NARConfig(hidden=s["hidden"], aggregation=agg, tasks=(task,))
                proc[task][agg].append(_train_and_test(s, cfg, sd, tests))
        flow_tests = _test_sets(s, sd, flow=True)
        for arm, tasks in FLOW_ARMS.items():
            cfg = NARConfig(hidden=s["hidden"], aggregation=FLOW_PROCESSOR, tasks=tasks)
            flow[arm].append(_train_and_test(s, cfg, sd, flow_tests))
        base = _baselines(s, sd, tests, flow_tests)
        proc["baselines"].append(base["dist: train mean"])
        flow["baselines"].append(base)
    names = list(tests)
    flow_names = list(flow_tests)
    table = "\n".join(
        _processor_table(proc, names, floors)
        + ["", f"Max-flow / min-cut ({FLOW_PROCESSOR} processor):", ""]
        + _flow_table(flow, flow_names)
    )
    result = {"table": table, "processors": proc, "flow": flow, "floors": floors, "seeds": seeds}
    if out_dir is not None:
        out = Path(out_dir)
        Path(out, "metrics.json").write_text(json.dumps(result, indent=1))
        plot = _plot(proc, names, out)
        if plot:
            result["plot"] = plot
    return result
