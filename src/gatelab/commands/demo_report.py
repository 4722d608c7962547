"""The report of ``gatelab demo``: one template (:data:`TEMPLATE`, ``string.Template``) filled
from the demo's summary, and the terminal summary (the report's main tables)."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

from ..data.text import DOMAINS
from ..io import atomic_write

LABELS = {"moe": "MoE", "dense": "dense"}
IMAGES = {
    "loss": "Training loss and validation loss by domain",
    "heatmap": "Expert shares by domain, per layer",
    "load": "Expert load over training",
}

TEMPLATE = string.Template(
    """\
# gatelab demo: an MoE language model against its dense equivalent

A byte-level MoE LM (the `$moe_recipe` recipe: $num_layers layers, width $dim, $num_experts
experts of width $expert_hidden_dim, top-$top_k) and the dense LM with the same active
parameters (the `$dense_recipe` recipe: a SwiGLU FFN of width $ffn_hidden_dim), trained on
the same $tokens tokens (same seed, same batches in the same order, same optimizer and
schedule) of a two-domain corpus: English prose (Python's documentation topics, $prose_train) and Python
source (the standard library's modules, $code_train).

## Validation loss (bits per byte)

$val_table

Cross entropy in nats / ln 2 per target byte over the first $eval_batches validation batches
($val_tokens targets; each document's closing EOS counts as a byte of its domain). The
validation documents are held out by document; the same batches score both models.

## Training

$train_table

Batches of $batch_size x $seq_len bytes; AdamW, lr $lr, weight decay $weight_decay,
$warmup_steps warm-up steps then cosine decay to $min_lr_ratio x lr, gradient clipping at
$grad_clip; the MoE also optimises its weighted auxiliary losses ($loss_weights). $plan_text
$threads torch threads.

$loss_plot

## Where each domain's tokens go

For each MoE layer, the routed slots (each token fills top-k slots) of the prose and of the
code validation tokens are counted per expert and divided by the domain's total, so each
domain's row sums to 1. The specialisation of a layer is the Jensen-Shannon divergence
between the two rows, in bits: 0 when prose and code use the experts alike, 1 when they use
disjoint experts. The same model at its initialisation (same seed, untrained) is the
reference; the total variation (sum |p - q| / 2) is the share of slots that would have to
move for the rows to match. The most prose-leaning expert is the one whose share of the
prose slots exceeds its share of the code slots the most.

$profile_table

$heatmap_plot

Shares per layer (rows: domain; columns: expert):

$share_tables

## Expert load over training

Each expert's share of the routed training slots per logging interval
(`moe/routing.jsonl`, smoothed with a moving average); the dashed line is an even load.

$load_plot

## Reproduce

```
$command
```

The step count and the validation batches come from `--minutes` through a table fixed in
the code (calibrated on a reference 2-core machine), so the same command gives the same
numbers on any machine; a slower machine takes longer. Wall time $wall_s s (about $reference_s s
on the reference machine); gatelab $gatelab_version, torch $torch_version, Python $python.

Files: `moe/` and `dense/` (metrics.jsonl, routing.jsonl, checkpoints/), `summary.json`
(every number above), the PNGs.
"""
)


def _gaps(moe: dict, dense: dict, fmt: str) -> list[str]:
    return [
        format(moe["val"][d]["bits_per_byte"] - dense["val"][d]["bits_per_byte"], fmt)
        for d in DOMAINS
    ]


def format_summary(summary: dict[str, Any]) -> str:
    """The terminal summary: the report's validation and specialisation tables."""
    tables, timing = {**_model_tables(summary), **_profile_tables(summary)}, summary["timing"]
    moe = summary["models"]["moe"]
    return "\n".join(
        [
            "",
            f"trained {moe['steps']} steps, {moe['tokens']:,} tokens each",
            "",
            "validation bits per byte:",
            tables["val_table"],
            "",
            "specialisation: JSD(prose, code) of the expert shares, bits (0 = same, 1 = disjoint)",
            tables["profile_table"],
            "",
            f"wall time {timing['total_s']:.0f} s (about {timing['reference_s']:.0f} s on the "
            "reference machine)",
            f"report: {Path(summary['run_dir']) / 'report.md'}",
        ]
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def leaning_text(layer: dict[str, Any]) -> str:
    """The report's "most prose-leaning expert" cell."""
    lean = layer["leaning"]
    return f"{lean['expert']} ({lean['prose']:.3f} of prose vs {lean['code']:.3f} of code)"


def _bits(nats: float | None) -> str:
    return "" if nats is None else f"{nats / math.log(2):.4f}"


def _model_tables(summary: dict[str, Any]) -> dict[str, str]:
    moe, dense = summary["models"]["moe"], summary["models"]["dense"]
    pairs = [(LABELS[n], m) for n, m in summary["models"].items()]
    val_rows = [
        [label, f"{m['parameters']:,}", f"{m['active_parameters']:,}"]
        + [f"{m['val'][d]['bits_per_byte']:.4f}" for d in DOMAINS]
        for label, m in pairs
    ]
    val_rows.append(["MoE - dense", "", "", *_gaps(moe, dense, "+.4f")])
    train_rows = [
        [label, m["steps"], f"{m['tokens']:,}", f"{m['train_s']:.1f}"]
        + [f"{m['tokens_per_s'] or 0:,.0f}", _bits(m["final_train_loss"]), m["stopped"]]
        for label, m in pairs
    ]
    train_header = "model|steps|tokens|train time (s)|tokens/s|last train loss (bits/byte)|ended"
    return {
        "val_table": _table(["model", "parameters", "active parameters", *DOMAINS], val_rows),
        "train_table": _table(train_header.split("|"), train_rows),
    }


def _profile_tables(summary: dict[str, Any]) -> dict[str, str]:
    rows = [
        [row["layer"], f"{row['jsd_bits']:.3f}", f"{row['at_init']['jsd_bits']:.3f}"]
        + [f"{row['total_variation']:.3f}", leaning_text(row)]
        for row in summary["profile"]
    ]
    header = "layer|JSD (bits)|JSD at init|total variation|most prose-leaning expert"
    shares = []
    for row in summary["profile"]:
        num_experts = len(row["shares"][DOMAINS[0]])
        body = [
            [d, *(f"{v:.3f}" for v in row["shares"][d]), f"{sum(row['counts'][d]):,}"]
            for d in DOMAINS
        ]
        columns = ["domain", *(str(e) for e in range(num_experts)), "routed slots"]
        shares.append(f"Layer {row['layer']} (`{row['name']}`):\n\n{_table(columns, body)}")
    return {
        "profile_table": _table(header.split("|"), rows),
        "share_tables": "\n\n".join(shares),
    }


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """``run_dir/report.md`` from :data:`TEMPLATE`."""
    moe, dense, s = summary["models"]["moe"], summary["models"]["dense"], summary["settings"]
    corpus = summary["corpus"]["train"]
    plan = summary["plan"]
    how = "from the --minutes table" if plan["from_table"] else "given with --steps/--eval-batches"
    fields = {
        **_model_tables(summary),
        **_profile_tables(summary),
        **{
            f"{kind}_plot": f"![{alt}]({summary['plots'][kind]})" if "plots" in summary else ""
            for kind, alt in IMAGES.items()
        },
        "moe_recipe": moe["recipe"],
        "dense_recipe": dense["recipe"],
        **moe["shape"],
        "ffn_hidden_dim": dense["shape"]["ffn_hidden_dim"],
        "tokens": f"{moe['tokens']:,}",
        **{
            f"{d}_train": f"{c['bytes'] / 1e6:.2f} MB in {c['documents']} documents"
            for d, c in corpus.items()
        },
        "eval_batches": ", ".join(f"{n} {d}" for d, n in summary["eval_batches"].items()),
        "val_tokens": ", ".join(f"{moe['val'][d]['tokens']:,} {d}" for d in DOMAINS),
        **{k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in s.items()},
        "loss_weights": ", ".join(
            f"{k} {v:g}" for k, v in (moe["shape"]["loss_weights"] or {}).items()
        ),
        "plan_text": f"{plan['steps']} steps and {plan['eval_batches']} validation batches per "
        f"domain, {how}.",
        "threads": summary["threads"],
        "command": summary["command"],
        "wall_s": f"{summary['timing']['total_s']:.0f}",
        "reference_s": f"{summary['timing']['reference_s']:.0f}",
        **{k: summary[k] for k in ("gatelab_version", "torch_version", "python")},
    }
    text = TEMPLATE.substitute(fields)
    path = run_dir / "report.md"
    atomic_write(path, text.encode())
    return path
