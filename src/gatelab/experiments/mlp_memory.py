"""MLP Memory: does an all-MLP memory trained to imitate a kNN-LM keep its gains, faster?

Claim tested ("MLP Memory: A Retriever-Pretrained Memory for Large Language Models", Wei et
al., arXiv 2508.01832): a memory network pretrained to imitate the kNN-LM's next-token
distribution (KL to p_kNN + CE to the next token), interpolated with the LM, lowers
perplexity like (or more than) the kNN-LM it imitates, and answers far faster than the
search (v1 reports 80x faster than kNN-LM).

Setup: a small dense byte LM (``gatelab.models.LM``, SwiGLU FFNs, no MoE) trained here on
domain-balanced batches of the two-domain corpus (half prose, half code). Datastore: the
LM's final normed hidden states over evenly spaced train windows of each domain, keyed to
the next byte. kNN-LM: exact search (:class:`gatelab.adapt.mlp_memory.KNNDatastore`), k
neighbours, softmax over -distance / T with T the median nearest-neighbour distance among
the datastore's own entries (a data-driven scale, our choice: the paper tunes it). Memory:
:class:`~gatelab.adapt.mlp_memory.MLPMemory` trained on every datastore entry with its
kNN distribution (own entry excluded), alpha = 0.4. Evaluation: bits per byte on evenly
spaced held-out (val) windows per domain, for the LM, the kNN-LM and LM + memory at several
lambda (lambda = 1: the kNN or memory alone). The lambdas are not tuned on a separate split:
the table shows them all. Speed: the kNN distribution and the memory's softmax for all
evaluation queries, timed in one process, best of three.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapt.mlp_memory import KNNDatastore, MLPMemory, final_hidden, interpolate, train_memory
from ..data.text import DOMAINS, ByteTokenizer, load_corpus
from ..models import LM, LMConfig
from ._loop import train_loop, warmup_times_cosine
from ._trained_lm import BalancedBatches, domain_windows

NAME = "mlp-memory"
DESCRIPTION = "byte LM vs kNN-LM vs LM + MLP memory (bits per byte per domain, memory speed)"

SETTINGS = {
    "smoke": dict(
        dim=32,
        layers=1,
        heads=2,
        ffn=64,
        seq_len=32,
        batch=4,
        lm_steps=3,
        store_windows=8,
        eval_windows=4,
        k=8,
        mem_hidden=64,
        mem_layers=1,
        mem_steps=5,
        mem_batch=64,
    ),
    "full": dict(
        dim=128,
        layers=3,
        heads=4,
        ffn=384,
        seq_len=128,
        batch=16,
        lm_steps=300,
        store_windows=128,
        eval_windows=24,
        k=64,
        mem_hidden=512,
        mem_layers=4,
        mem_steps=1200,
        mem_batch=512,
    ),
}
LAMBDAS = (0.1, 0.25, 0.5, 1.0)
ALPHA = 0.4
LN2 = math.log(2)


def _train_lm(s: dict, seed: int) -> tuple[LM, float]:
    torch.manual_seed(seed)
    cfg = LMConfig(
        dim=s["dim"],
        num_layers=s["layers"],
        num_heads=s["heads"],
        ffn_hidden_dim=s["ffn"],
        max_seq_len=s["seq_len"],
        moe_layers="none",
        vocab_size=ByteTokenizer.vocab_size,
    )
    model = LM(cfg)
    data = BalancedBatches(load_corpus(seed=seed), s["seq_len"], s["batch"], seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    steps = s["lm_steps"]
    sched = warmup_times_cosine(opt, warmup=20, steps=steps)
    start = time.perf_counter()
    loss_fn = lambda m, b: m(b.inputs, b.targets).loss  # noqa: E731
    train_loop(model, loss_fn, data, opt, steps=steps, schedule=sched, clip=1.0)
    return model.eval().requires_grad_(False), time.perf_counter() - start


def _states(model: LM, windows: torch.Tensor):
    """Flattened (hidden [N, D], LM log-probs [N, V], next byte [N]) of windows [W, S+1]."""
    hidden, log_p = [], []
    for chunk in windows.split(32):
        h, lp = final_hidden(model, chunk[:, :-1])
        hidden.append(h.flatten(0, 1))
        log_p.append(lp.flatten(0, 1))
    return torch.cat(hidden), torch.cat(log_p), windows[:, 1:].flatten()


def _bpb(log_p: torch.Tensor, targets: torch.Tensor) -> float:
    return F.nll_loss(log_p, targets).item() / LN2


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = ".") -> dict:
    s = SETTINGS[scale]
    model, lm_seconds = _train_lm(s, seed)
    k = s["k"]
    ds, keys, values, temperature, targets_knn = _datastore(model, s, seed)

    torch.manual_seed(seed)
    memory = MLPMemory(model.config.dim, model.config.vocab_size, s["mem_hidden"], s["mem_layers"])
    start = time.perf_counter()
    losses = train_memory(
        memory,
        keys,
        targets_knn,
        values,
        steps=s["mem_steps"],
        batch_size=s["mem_batch"],
        lr=1e-3,
        alpha=ALPHA,
        seed=seed,
    )
    mem_seconds = time.perf_counter() - start

    bpb, zero_mass, queries = _evaluate(model, ds, memory, s, seed, temperature)
    with torch.no_grad():
        knn_time = _best_of(lambda: ds.distribution(queries, k, temperature))
        mem_time = _best_of(lambda: torch.softmax(memory(queries), dim=-1))
    params = sum(p.numel() for p in memory.parameters())
    return {
        "table": _table(bpb, zero_mass, len(ds), k, params, knn_time, mem_time),
        # inf (the kNN alone, where it gives a byte p = 0) is stored as None: JSON has no inf
        "bpb": {
            d: {m: v if math.isfinite(v) else None for m, v in r.items()} for d, r in bpb.items()
        },
        "knn_zero_mass": zero_mass,
        "datastore_size": len(ds),
        "k": k,
        "temperature": temperature,
        "alpha": ALPHA,
        "eval_queries": queries.shape[0],
        "memory_params": params,
        "lm_params": sum(p.numel() for p in model.parameters()),
        "memory_loss_first_last": [losses[0], losses[-1]] if losses else [],
        "knn_seconds": knn_time,
        "memory_seconds": mem_time,
        "speedup": knn_time / mem_time,
        "lm_train_seconds": lm_seconds,
        "memory_train_seconds": mem_seconds,
    }


def _datastore(model: LM, s: dict, seed: int):
    """Datastore of train windows of both domains (equal counts); its temperature (median
    nearest-neighbour distance) and the kNN targets of its own keys (self excluded)."""
    store = [domain_windows(d, s["seq_len"], s["store_windows"], "train", seed) for d in DOMAINS]
    keys, _, values = _states(model, torch.cat(store))
    ds = KNNDatastore(keys, values, model.config.vocab_size)
    self_idx = torch.arange(len(ds))
    first, _ = ds.search(keys, 1, exclude=self_idx)
    temperature = max(first.median().item(), 1e-6)
    targets_knn = ds.distribution(keys, s["k"], temperature, exclude=self_idx)
    return ds, keys, values, temperature, targets_knn


def _evaluate(model: LM, ds, memory, s: dict, seed: int, temperature: float):
    """Bits per byte per domain and method, kNN zero-mass share, all eval queries [N, D]."""
    bpb: dict[str, dict[str, float]] = {}
    zero_mass: dict[str, float] = {}  # share of bytes the kNN alone gives probability 0
    queries_all = []
    for domain in DOMAINS:
        win = domain_windows(domain, s["seq_len"], s["eval_windows"], "val", seed)
        h, log_p_lm, tgt = _states(model, win)
        queries_all.append(h)
        p_knn = ds.distribution(h, s["k"], temperature)
        with torch.no_grad():
            log_p_mem = F.log_softmax(memory(h), dim=-1)
        row = {"LM": _bpb(log_p_lm, tgt)}
        for lam in LAMBDAS:
            row[f"kNN-LM l={lam}"] = _bpb(interpolate(log_p_lm, p_knn, lam), tgt)
            row[f"LM+memory l={lam}"] = _bpb(interpolate(log_p_lm, log_p_mem, lam, log=True), tgt)
        bpb[domain] = row
        zero_mass[domain] = (p_knn.gather(1, tgt[:, None]) == 0).float().mean().item()
    return bpb, zero_mass, torch.cat(queries_all)


def _table(bpb, zero_mass, store_size, k, params, knn_time, mem_time) -> str:
    lines = [
        "| method | " + " | ".join(f"{d} bpb" for d in DOMAINS) + " |",
        "|---|" + "---|" * len(DOMAINS),
    ]
    for method in bpb[DOMAINS[0]]:
        cells = " | ".join(f"{bpb[d][method]:.4f}" for d in DOMAINS)
        lines.append(f"| {method} | {cells} |")
    cells = " | ".join(f"{zero_mass[d]:.1%}" for d in DOMAINS)
    lines.append(f"| (bytes the kNN alone gives p = 0) | {cells} |")
    lines += [
        "",
        "| speed (all eval queries) | seconds | ratio |",
        "|---|---|---|",
        f"| exact kNN, {store_size} keys, k={k} | {knn_time:.4f} | 1.00 |",
        f"| MLP memory, {params} params | {mem_time:.4f} | {knn_time / mem_time:.2f}x faster |",
    ]
    return "\n".join(lines)
