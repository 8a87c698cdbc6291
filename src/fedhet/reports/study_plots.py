"""The context study's figure (:mod:`fedhet.study.context`): gain vs α per axis, with
confidence bands over seeds."""

from __future__ import annotations

from pathlib import Path

from fedhet.reports.plots import plt, save_figure
from fedhet.study.cells import QUANTITIES, Cell, alphas, over_seeds, select


def plot_gains(cells: list[Cell], model: str, path: Path) -> Path:
    """One model: a row per metric, a column per axis; per gain of
    :data:`~fedhet.study.cells.QUANTITIES`, the mean over seeds vs α (log scale) with its
    95 % t interval shaded (no band with one seed)."""
    mine = [c for c in cells if c.model == model]
    metrics = list(dict.fromkeys(m for c in mine for m in c.metrics))
    axes = list(dict.fromkeys(c.axis for c in mine))
    fig, grid = plt.subplots(
        len(metrics), len(axes), figsize=(4.6 * len(axes), 3.6 * len(metrics)), squeeze=False
    )
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(axes):
            ax, row = grid[i][j], select(mine, model, axis)
            xs = alphas(row)
            for name, fn in QUANTITIES.items():
                ests = [over_seeds(select(row, model, axis, a), fn, metric) for a in xs]
                points = [(a, e) for a, e in zip(xs, ests, strict=True) if e is not None]
                if not points:
                    continue
                line = ax.plot([a for a, _ in points], [e.mean for _, e in points],
                               marker="o", label=name)[0]
                band = [(a, e) for a, e in points if e.low is not None]
                if band:
                    ax.fill_between([a for a, _ in band], [e.low for _, e in band],
                                    [e.high for _, e in band], color=line.get_color(), alpha=0.2)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("α (Dirichlet over the axis's groups)")
            ax.set_ylabel(f"gain in {metric} over the base model")
            ax.set_title(f"{model}: {axis}")
            ax.legend(fontsize=7)
    fig.suptitle("positive = better than the base model; bands: 95 % t interval over seeds",
                 fontsize=9)
    return save_figure(fig, path)
