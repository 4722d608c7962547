"""Skip, pre-gate, offload and transcode a trained two-domain MoE LM (MoDES, Pre-gated MoE,
transcoders).

On the MoE LM of :mod:`gatelab.experiments._trained_lm` (4 MoE layers, 8 experts, top-2,
trained on domain-balanced prose/code batches), through the calls that also work on HF models:

1. **Skip** (MoDES, arXiv 2511.15690): layer importance alpha from the KL when a layer's
   routed experts are all skipped, on calibration windows (train split, half prose, half
   code); the skip-ratio vs KL curve over one threshold; for target skip ratios, the
   threshold found on the calibration set (one threshold, and two thresholds with the
   window's domain as the token kind, by the frontier search), evaluated on held-out
   windows; against the same search with alpha uniform (router probability alone, the
   "local" score MoDES improves on).
2. **Pre-gate** (Pre-gated MoE, arXiv 2308.12066): pre-gates distilled from the next layer's
   router on the calibration windows; top-2 hit rate on held-out windows, against chance
   (2/8) and against the untrained start (the next router applied one layer early).
3. **Offload**: held-out windows of ``chunk`` tokens run one at a time with all experts
   resident, with experts in safetensors behind an LRU cache loaded on demand, and with the
   pre-gates prefetching; tokens/s, peak resident expert bytes, misses, and the check that
   offloaded logits equal resident ones exactly.
4. **Transcoder** (arXiv 2406.11944) for the last MoE layer at a few L1 coefficients: L0,
   fraction of variance explained and loss recovered on held-out windows; and the read-out
   of that layer's output through the unembedding (top-1/top-5 next-token accuracy against
   a frequency floor) plus the top tokens of its experts' largest neurons.

The full scale reuses the LM trained by ``moe-edits`` when it is cached beside this
experiment's directory (same recipe, seed and steps), otherwise trains it (~15 min).
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..dispatch.cpu_threads import forced_strategy
from ..edit.offload import OffloadedExperts, resident_expert_bytes
from ..edit.pregate import PreGates, collect_pairs, hit_rate, train_pregates
from ..edit.skip import (
    SkipEvaluator,
    layer_importance,
    search_thresholds,
    threshold_grid,
)
from ..inspect.access import find_moe_blocks
from ..inspect.readout import module_io, read_neurons, readout_accuracy
from ..inspect.transcoder import evaluate_transcoder, train_transcoder
from ._trained_lm import domain_windows, trained_moe_lm

NAME = "moe-runtime"
DESCRIPTION = (
    "MoDES skip frontier (skip ratio vs KL/loss), pre-gate hit rate and offloaded throughput "
    "(resident vs on-demand vs prefetch), transcoder L0/FVE/loss recovered, unembedding read-out"
)

SCALES = {
    "smoke": {
        "calib": 2,
        "eval": 2,
        "grid": 6,
        "targets": [0.5],
        "pregate_steps": 5,
        "chunk": 8,
        "chunks": 2,
        "capacities": [4],
        "repeats": 1,
        "tc_windows": 2,
        "tc_hidden": 64,
        "tc_l1": [1e-3],
        "tc_steps": 5,
    },
    "full": {
        "calib": 16,
        "eval": 32,
        "grid": 100,  # ModelTC/MoDES grid_search_tau_ddp.py: --grid_num 100
        "targets": [0.25, 0.5, 0.75],
        "pregate_steps": 300,
        "chunk": 16,
        "chunks": 24,
        "capacities": [32, 16, 8],
        "repeats": 3,
        "tc_windows": 64,
        "tc_hidden": 1024,
        "tc_l1": [1e-3, 1e-2, 3e-2],
        "tc_steps": 1500,
    },
}

DOMAINS = ("prose", "code")


def _reuse_cached_lm(out: Path, scale: str, seed: int) -> None:
    """Copy the moe-edits experiment's trained LM (same settings) instead of retraining."""
    name = f"lm-{scale}-seed{seed}"
    mine, theirs = out / name / "checkpoints", out.parent / "moe-edits" / name / "checkpoints"
    if scale == "full" and not mine.exists() and theirs.is_dir():
        shutil.copytree(theirs, mine)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = "runs/experiments/moe-runtime"):
    cfg = SCALES[scale]
    out = Path(out_dir)
    _reuse_cached_lm(out, scale, seed)
    lm = trained_moe_lm(scale, seed, out)
    model, seq = lm.model, lm.seq_len - 1
    calib = {d: domain_windows(d, seq, cfg["calib"], "train", seed)[:, :-1] for d in DOMAINS}
    evals = {d: domain_windows(d, seq, cfg["eval"], "val", seed + 1)[:, :-1] for d in DOMAINS}
    result = {"model": str(lm.run_dir), "train_seconds": lm.train_seconds}
    result["skip"] = _skip(model, calib, evals, cfg, out)
    result["pregate"], gates = _pregate(model, calib, evals, cfg)
    result["offload"] = _offload(model, gates, evals, cfg, out)
    result["transcoder"] = _transcoder(model, calib, evals, cfg, seed)
    result["table"] = _table(result)
    return result


# -- skip -----------------------------------------------------------------------------------------


def _bpb(nats: float) -> float:
    return nats / math.log(2)


def _skip(model, calib, evals, cfg, out: Path) -> dict:
    prompts = [calib["prose"], calib["code"]]
    kinds = [0, 1]  # the window's domain is the token kind (MoDES: text / vision)
    alpha = layer_importance(model, prompts)
    uniform = {layer: 1.0 / len(alpha) for layer in alpha}
    eval_prompts = [evals["prose"], evals["code"]]
    report = {"alpha": alpha, "curve": {}, "targets": []}
    for label, importance in (("modes", alpha), ("uniform", uniform)):
        # the reference's grid (exp map of linspace(0, 1, D)), the same for every kind
        one_grid = threshold_grid(size=cfg["grid"])
        two_grids = [one_grid, one_grid]
        one = SkipEvaluator(model, prompts, importance)
        two = SkipEvaluator(model, prompts, importance, kinds)
        held_one = SkipEvaluator(model, eval_prompts, importance)
        held_two = SkipEvaluator(model, eval_prompts, importance, kinds)
        curve = [held_one([t]) for t in one_grid]
        report["curve"][label] = [p.__dict__ for p in curve]
        for target in cfg["targets"]:
            for kind_label, evaluator, held, grids in (
                ("1 threshold", one, held_one, [one_grid]),
                ("2 thresholds", two, held_two, two_grids),
            ):
                best, frontier = search_thresholds(evaluator, grids, target)
                row = {
                    "score": label,
                    "search": kind_label,
                    "target": target,
                    "evaluations": len(evaluator.points),
                    "frontier": len(frontier),
                }
                if best is not None:
                    h = held(best.thresholds)
                    row.update(
                        thresholds=best.thresholds,
                        calib_ratio=best.ratio,
                        ratio=h.ratio,
                        kl=h.kl,
                        bpb=_bpb(h.loss),
                    )
                    row["per_domain_bpb"] = _domain_bpb(model, evals, importance, best.thresholds)
                report["targets"].append(row)
    report["matched"] = {
        label: {t: _kl_at(report["curve"][label], t) for t in cfg["targets"]}
        for label in report["curve"]
    }
    report["full_bpb"] = {
        d: _bpb(SkipEvaluator(model, [evals[d]], alpha)([0.0]).loss) for d in DOMAINS
    }
    report["plot"] = str(_plot_curves(report["curve"], out / "skip_frontier.png"))
    return report


def _kl_at(curve: list[dict], ratio: float) -> float | None:
    """KL at skip ratio ``ratio`` by linear interpolation on a held-out curve (the searched
    thresholds land on grid points whose ratios differ; this compares scores at equal ratio)."""
    points = sorted((p["ratio"], p["kl"]) for p in curve)
    for (r0, k0), (r1, k1) in zip(points, points[1:], strict=False):
        if r0 <= ratio <= r1:
            return k0 if r1 == r0 else k0 + (k1 - k0) * (ratio - r0) / (r1 - r0)
    return None


def _domain_bpb(model, evals, importance, thresholds) -> dict[str, float]:
    out = {}
    for kind, d in enumerate(DOMAINS):
        tau = thresholds if len(thresholds) == 1 else [thresholds[kind]]
        out[d] = _bpb(SkipEvaluator(model, [evals[d]], importance)(tau).loss)
    return out


def _plot_curves(curves: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in curves.items():
        ax.plot(
            [p["ratio"] for p in points],
            [p["kl"] for p in points],
            "o-",
            label="alpha x pi (MoDES)" if label == "modes" else "pi alone",
        )
    ax.set_xlabel("skip ratio (held-out)")
    ax.set_ylabel("KL to the full model (nats/token)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- pre-gate and offload ----------------------------------------------------------------------


def _pregate(model, calib, evals, cfg) -> tuple[dict, PreGates]:
    prompts = [calib["prose"], calib["code"]]
    held = [evals["prose"], evals["code"]]
    start_gates = PreGates.for_model(model)
    data = collect_pairs(model, held, start_gates)
    before = hit_rate(start_gates, data)
    gates = train_pregates(model, prompts, steps=cfg["pregate_steps"])
    after = hit_rate(gates, data)
    train_after = hit_rate(gates, collect_pairs(model, prompts, gates))
    return {"untrained": before, "trained": after, "trained_on_calibration": train_after}, gates


def _chunks(evals, cfg) -> list[torch.Tensor]:
    n, chunk = cfg["chunks"], cfg["chunk"]
    out = []
    for i in range(n):
        w = evals[DOMAINS[i % 2]][(i // 2) % evals[DOMAINS[i % 2]].shape[0]]
        out.append(w[:chunk].unsqueeze(0))
    return out


def _timed(model, chunks) -> tuple[float, list[torch.Tensor]]:
    logits = []
    start = time.perf_counter()
    # One CPU strategy in every mode: "exact" compares logits bit for bit, and the
    # load-dependent choice between phase-wise and split can change the last bit.
    with torch.no_grad(), forced_strategy("phases"):
        for ids in chunks:
            logits.append(model(ids).logits)
    return time.perf_counter() - start, logits


def _offload(model, gates, evals, cfg, out: Path) -> dict:
    """Every mode runs once per round, rounds repeated: the load of the shared machine drifts,
    and interleaving keeps that drift out of the comparison (medians over rounds)."""
    chunks = _chunks(evals, cfg)
    tokens = sum(c.numel() for c in chunks)
    _timed(model, chunks[:2])  # warm-up
    _, reference = _timed(model, chunks)
    modes = [("all resident", None, None)] + [
        (mode, capacity, pregates)
        for capacity in cfg["capacities"]
        for mode, pregates in (("on demand", None), ("pre-gate prefetch", gates))
    ]
    times = {i: [] for i in range(len(modes))}
    rows = [None] * len(modes)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for _ in range(cfg["repeats"]):
            for i, (mode, capacity, pregates) in enumerate(modes):
                if capacity is None:
                    seconds, _ = _timed(model, chunks)
                    times[i].append(seconds)
                    rows[i] = {
                        "mode": mode,
                        "exact": True,
                        "capacity": sum(b.num_experts for b in find_moe_blocks(model)),
                        "peak_resident_bytes": resident_expert_bytes(model),
                    }
                    continue
                with OffloadedExperts(model, tmp, capacity, pregates=pregates) as off:
                    seconds, logits = _timed(model, chunks)
                    off.wait()
                times[i].append(seconds)
                same = all(torch.equal(a, b) for a, b in zip(logits, reference, strict=True))
                exact = same and (rows[i] is None or rows[i]["exact"])
                rows[i] = {
                    "mode": mode,
                    "capacity": capacity,
                    "exact": exact,
                    **off.stats.as_dict(),
                }
    for i, row in enumerate(rows):
        row["tokens_per_s"] = tokens / statistics.median(times[i])
    return {"tokens": tokens, "chunk": cfg["chunk"], "rounds": cfg["repeats"], "rows": rows}


# -- transcoder and read-out -----------------------------------------------------------------


def _transcoder(model, calib, evals, cfg, seed) -> dict:
    block = find_moe_blocks(model)[-1]
    n = cfg["tc_windows"]
    train = [
        domain_windows(d, calib["prose"].shape[1], n, "train", seed + 2)[:, :-1] for d in DOMAINS
    ]
    held = [evals["prose"], evals["code"]]
    x, y = module_io(model, block.module, train)
    rows = []
    for l1 in cfg["tc_l1"]:
        start = time.perf_counter()
        tc, history = train_transcoder(
            x,
            y,
            cfg["tc_hidden"],
            l1=l1,
            steps=cfg["tc_steps"],
            lr=1e-3,
            batch_size=1024,
            seed=seed,
        )
        report = evaluate_transcoder(model, block.module, tc, held)
        rows.append({"l1": l1, "train_seconds": round(time.perf_counter() - start, 1), **report})
    readout = {
        d: {f"top{k}": readout_accuracy(model, block.module, [evals[d]], k=k) for k in (1, 5)}
        for d in DOMAINS
    }
    neurons = []
    w_out = block.expert_weights().w_out.detach()
    for e in range(block.num_experts):
        n_idx = int(w_out[e].norm(dim=0).argmax())
        tokens = read_neurons(model, block.layer, e, [n_idx], k=5).decoded()[0]
        neurons.append({"expert": e, "neuron": n_idx, "top_tokens": tokens})
    return {
        "layer": block.layer,
        "hidden_dim": cfg["tc_hidden"],
        "train_tokens": x.shape[0],
        "rows": rows,
        "readout": readout,
        "neurons": neurons,
    }


# -- report --------------------------------------------------------------------------------------


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _table(r: dict) -> str:
    sections = (
        _skip_lines(r["skip"]),
        _pregate_lines(r["pregate"]),
        _offload_lines(r["offload"]),
        _transcoder_lines(r["transcoder"]),
    )
    return "\n".join(line for lines in sections for line in lines)


def _skip_lines(s: dict) -> list[str]:
    lines = [
        "**Skip (MoDES).** Layer importance alpha (normalised): "
        + ", ".join(f"layer {k}: {v:.3f}" for k, v in s["alpha"].items())
        + f". Full model bits/byte: prose {s['full_bpb']['prose']:.4f}, "
        f"code {s['full_bpb']['code']:.4f}.",
        "",
        "| score | search | target | thresholds | evals | held-out skip ratio | KL (nats/token) "
        "| bits/byte | prose bpb | code bpb |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in s["targets"]:
        tau = ", ".join(f"{t:.4f}" for t in row.get("thresholds", [])) or "none reaches it"
        per = row.get("per_domain_bpb", {})
        lines.append(
            f"| {'alpha x pi' if row['score'] == 'modes' else 'pi alone'} | {row['search']} | "
            f"{row['target']:.2f} | {tau} | {row['evaluations']} | {_fmt(row.get('ratio'), '.3f')} "
            f"| {_fmt(row.get('kl'))} | {_fmt(row.get('bpb'))} | {_fmt(per.get('prose'))} | "
            f"{_fmt(per.get('code'))} |"
        )
    m = s["matched"]
    lines += [
        "",
        "KL at equal held-out skip ratio (interpolated on each score's one-threshold "
        "curve): "
        + "; ".join(
            f"ratio {t:.2f}: alpha x pi {_fmt(m['modes'][t])}, pi alone {_fmt(m['uniform'][t])}"
            for t in m["modes"]
        )
        + ".",
    ]
    return lines


def _pregate_lines(p: dict) -> list[str]:
    lines = [
        "",
        "**Pre-gate hit rate** (top-2 guesses vs the next layer's top-2, held-out; chance 0.25):",
        "",
        "| predicts layer | untrained (next router early) | "
        "distilled | distilled, on its calibration set |",
        "|---|---:|---:|---:|",
    ]
    for layer in p["trained"]:
        lines.append(
            f"| {layer} -> next | {p['untrained'][layer]['hit_rate']:.3f} | "
            f"{p['trained'][layer]['hit_rate']:.3f} | "
            f"{p['trained_on_calibration'][layer]['hit_rate']:.3f} |"
        )
    return lines


def _offload_lines(o: dict) -> list[str]:
    lines = [
        "",
        f"**Offload** ({o['tokens']} held-out tokens in windows of {o['chunk']}, one "
        "window per forward):",
        "",
        "| mode | cache (experts) | tokens/s | peak resident "
        "expert MB | misses / requests | prefetch hits | requested experts the pre-gates queued | equals "
        "resident |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in o["rows"]:
        req = row.get("requests")
        lines.append(
            f"| {row['mode']} | {row['capacity']} | {row['tokens_per_s']:.0f} | "
            f"{row['peak_resident_bytes'] / 2**20:.2f} | "
            f"{'-' if req is None else str(row['misses']) + ' / ' + str(req)} | "
            f"{row.get('prefetch_hits', '-')} | {_fmt(row.get('pregate_hit_rate'), '.3f')} | "
            f"{'yes' if row['exact'] else 'NO'} |"
        )
    return lines


def _transcoder_lines(t: dict) -> list[str]:
    lines = [
        "",
        f"**Transcoder** for MoE layer {t['layer']} ({t['hidden_dim']} features, "
        f"{t['train_tokens']} training tokens; held-out):",
        "",
        "| L1 | L0 | dead features | FVE | loss clean | zero-ablated | transcoder "
        "| loss recovered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in t["rows"]:
        lines.append(
            f"| {row['l1']:g} | {row['l0']:.1f} | {row['dead_features']} | {row['fve']:.3f} | "
            f"{row['loss_clean']:.4f} | {row['loss_zero_ablated']:.4f} | "
            f"{row['loss_transcoder']:.4f} | {row['loss_recovered']:.3f} |"
        )
    ro = t["readout"]
    lines += [
        "",
        f"**Read-out** of layer {t['layer']}'s output through the unembedding: "
        + "; ".join(
            f"{d}: top-1 {ro[d]['top1']['accuracy']:.3f} (frequency floor "
            f"{ro[d]['top1']['frequency_floor']:.3f}), top-5 "
            f"{ro[d]['top5']['accuracy']:.3f} (floor "
            f"{ro[d]['top5']['frequency_floor']:.3f})"
            for d in DOMAINS
        )
        + ". Largest neuron per expert, top tokens: "
        + "; ".join(
            f"e{n['expert']}/n{n['neuron']}: {' '.join(n['top_tokens'])}" for n in t["neurons"]
        )
        + ".",
    ]
    return lines
