"""Heatmaps of routing profiles (matplotlib, written to PNG without a display)."""

from __future__ import annotations

from pathlib import Path

from .profile import RoutingProfile


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


__all__ = ["plot_profile"]
