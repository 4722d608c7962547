"""Plots of routing profiles and training runs (matplotlib, written to PNG without a display).

- :func:`plot_profile`: a :class:`RoutingProfile` as layer x expert heatmaps;
- :func:`plot_label_shares`: a :class:`LabelProfile` as per-layer label x expert heatmaps;
- :func:`plot_loss_curves`: training loss of runs side by side, their difference, and
  validation bits per byte per domain;
- :func:`plot_expert_load`: each expert's share of the routed slots over training.

The last three draw on a bare Agg canvas (no pyplot state) and take records already read
(``metrics.jsonl`` / ``routing.jsonl`` lines as dicts), so this module needs no trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .profile import LabelProfile, RoutingProfile

COLORS = ("tab:orange", "tab:blue", "tab:green", "tab:red")


def plot_profile(profile: RoutingProfile, path: str | Path, metric: str = "frequency") -> Path:
    """One layer x expert heatmap per prompt set, then each set's contrast with the others.

    Rows are MoE layers (``profile.layers``), columns experts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = profile.names
    panels = [(f"{n}: {metric}", profile.maps[n][metric], "viridis", None) for n in names]
    if len(names) > 1:
        for n in names:
            c = profile.contrast(n, metric)
            bound = float(c.abs().max()) or 1.0
            panels.append((f"{n} - others", c, "RdBu_r", bound))
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    width = max(3.0, 0.35 * profile.num_experts + 1.5)
    height = max(2.0, 0.35 * len(profile.layers) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, values, cmap, bound) in zip(axes.flat, panels, strict=False):
        limits = {"vmin": -bound, "vmax": bound} if bound is not None else {}
        image = ax.imshow(values.numpy(), aspect="auto", cmap=cmap, **limits)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(profile.layers)), [str(layer) for layer in profile.layers])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def smooth(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with the given span (bias-corrected at the start)."""
    alpha = 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    val: Mapping[str, Mapping[str, float]],
    path: str | Path,
) -> Path:
    """Training loss (bits per byte, raw and smoothed) vs tokens of each run, the smoothed
    difference first run - second run at equal steps, and validation bits per byte per
    domain as points.

    runs: {label: train records (step, tokens, loss in nats)}; val: {label: {domain: bpb}}.
    """
    fig = _figure(14, 4.2)
    curve, diff_ax, val_ax = fig.subplots(1, 3, width_ratios=[2, 1.4, 1])
    colors = dict(zip(runs, COLORS, strict=False))
    bits_at: dict[str, dict[int, tuple[float, float]]] = {}
    for label, records in runs.items():
        bits_at[label] = {r["step"]: (r["tokens"] / 1e6, r["loss"] / math.log(2)) for r in records}
        tokens, bits = zip(*bits_at[label].values(), strict=True) if records else ((), ())
        curve.plot(tokens, bits, color=colors[label], alpha=0.25, linewidth=0.8)
        span = max(1, len(bits) // 25)
        curve.plot(tokens, smooth(bits, span), color=colors[label], label=label)
    curve.set(
        xlabel="training tokens (millions)",
        ylabel="training loss (bits per byte)",
        yscale="log",
        title="Training loss (thin: per step, thick: smoothed)",
    )
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    curve.yaxis.set_major_formatter(plain)
    curve.yaxis.set_minor_formatter(plain)
    curve.grid(alpha=0.3, which="both")
    curve.legend()
    _plot_gap(diff_ax, bits_at)
    _plot_val_points(val_ax, val, colors)
    return _save(fig, path)


def _plot_gap(ax, bits_at: dict[str, dict[int, tuple[float, float]]]) -> None:
    first, second = list(bits_at)[:2]
    steps = sorted(set(bits_at[first]) & set(bits_at[second]))
    if steps:
        gap = [bits_at[first][s][1] - bits_at[second][s][1] for s in steps]
        xs = [bits_at[first][s][0] for s in steps]
        ax.plot(xs, smooth(gap, max(1, len(gap) // 10)), color="tab:purple")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(
        xlabel="training tokens (millions)",
        ylabel="bits per byte",
        title=f"{first} - {second} training loss (smoothed; < 0: {first} lower)",
    )
    ax.grid(alpha=0.3)


def _plot_val_points(ax, val: Mapping[str, Mapping[str, float]], colors: dict[str, str]) -> None:
    # Points, not bars: the differences are small next to the values, and bars must start at 0.
    domains = list(next(iter(val.values())))
    for n, (label, values) in enumerate(val.items()):
        offset = -0.08 if n == 0 else 0.08
        ys = [values[d] for d in domains]
        xs = [i + offset for i in range(len(domains))]
        ax.plot(xs, ys, "o", color=colors[label], markersize=9, label=label)
        for x, v in zip(xs, ys, strict=True):
            side, nudge = ("right", -0.07) if n == 0 else ("left", 0.07)
            ax.annotate(f"{v:.3f}", (x + nudge, v), ha=side, va="center", fontsize=8)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_xlim(-0.6, len(domains) - 0.4)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.set(ylabel="bits per byte", title="Validation loss by domain")
    ax.legend()


def plot_label_shares(
    profile: LabelProfile, path: str | Path, notes: Sequence[str] | None = None
) -> Path:
    """Per layer: the share of each label's routed slots that each expert receives (rows
    sum to 1); ``notes`` adds a text to each layer's title."""
    shares = profile.shares()
    num_layers, _, num_experts = shares.shape
    fig = _figure(max(6.0, 0.75 * num_experts + 2.5), 1.15 * num_layers + 1.0)
    axes = fig.subplots(num_layers, 1, squeeze=False)[:, 0]
    vmax = float(shares.max()) or 1.0
    image = None
    for i, ax in enumerate(axes):
        image = ax.imshow(shares[i].numpy(), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        for g, row in enumerate(shares[i].tolist()):
            for e, value in enumerate(row):
                color = "black" if value > 0.6 * vmax else "white"
                ax.text(e, g, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_yticks(range(len(profile.labels)), profile.labels)
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
        note = f": {notes[i]}" if notes else ""
        ax.set_title(f"layer {profile.layers[i]}{note}", fontsize=9)
    axes[-1].set_xlabel("expert")
    fig.suptitle("Share of each domain's routed slots per expert (rows sum to 1)")
    fig.colorbar(image, ax=list(axes), label="share", shrink=0.8)
    return _save(fig, path)


def plot_expert_load(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Per layer: each expert's share of the routed slots over training (``routing.jsonl``
    records: step and ``layers[name]["load_share"]``)."""
    names = list(records[0]["layers"]) if records else []
    cols = 2 if len(names) > 1 else 1
    rows = max(1, math.ceil(len(names) / cols))
    fig = _figure(11, 2.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, name in zip(axes, names, strict=False):
        steps = [r["step"] for r in records if name in r["layers"]]
        loads = [r["layers"][name]["load_share"] for r in records if name in r["layers"]]
        num_experts = len(loads[0])
        span = max(1, len(loads) // 20)
        for e in range(num_experts):
            ax.plot(
                steps, smooth([load[e] for load in loads], span), linewidth=1.2, label=f"expert {e}"
            )
        ax.axhline(1 / num_experts, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols :]:
        ax.set_xlabel("step")
    for ax in axes[::cols]:
        ax.set_ylabel("load share")
    if names:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(
        "Expert load over training: share of routed slots, smoothed over ~5% of the run "
        "(dashed: even, 1/E)"
    )
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


__all__ = ["plot_expert_load", "plot_label_shares", "plot_loss_curves", "plot_profile", "smooth"]
