"""Plots of the context study (:mod:`fedhet.study.context`): scores and gains vs α,
and per-client gains of the local-only vs the global model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhet.reports.plots import plt, save_figure
from fedhet.study.cells import Cell, cells_of, client_gains, improvement, mean_se, pairs


def _errorbar(ax, alphas, series, **kwargs) -> None:
    means, errors = zip(*(mean_se(values) for values in series), strict=True)
    ax.errorbar(alphas, means, yerr=np.nan_to_num(errors), capsize=3, **kwargs)


def plot_vs_alpha(cells: list[Cell], metric: str, path: Path) -> Path:
    """Per (model, axis) column: the scores vs α (top) and the gains over the base model vs α
    (bottom); error bars: standard error over clients."""
    columns = pairs(cells)
    fig, grid = plt.subplots(2, len(columns), figsize=(5 * len(columns), 7.5), squeeze=False)
    for j, (model, axis) in enumerate(columns):
        row = cells_of(cells, model, axis)
        alphas = [c.alpha for c in row]
        top, bottom = grid[0][j], grid[1][j]
        for name, attr, marker in (
            ("local before", "local_before", "x"),
            ("local-only", "local_only", "o"),
            ("local federated", "local_federated", "s"),
        ):
            _errorbar(
                top, alphas, [getattr(c, attr).values() for c in row], marker=marker, label=name
            )
        top.plot(alphas, [c.global_federated for c in row], "k-^", label="global federated")
        top.plot(alphas, [c.global_before for c in row], "k:", label="global before")
        top.set_ylabel(metric)
        top.set_title(f"{model}: {axis}")
        for name, attr, marker in (
            ("local-only (own test)", "local_only", "o"),
            ("federated (own test)", "local_federated", "s"),
        ):
            gains = [client_gains(c, attr, metric).values() for c in row]
            _errorbar(bottom, alphas, gains, marker=marker, label=name)
        bottom.plot(
            alphas,
            [improvement(c.global_before, c.global_federated, metric) for c in row],
            "k-^",
            label="federated (global test)",
        )
        bottom.axhline(0, color="grey", linewidth=0.8)
        bottom.set_ylabel(f"gain in {metric} over the base model")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xlabel("α (Dirichlet)")
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_scatter(cells: list[Cell], metric: str, path: Path) -> Path:
    """Per client: gain of its local-only model vs gain of the global (federated) model,
    both on the client's own test split, one colour per α."""
    columns = pairs(cells)
    fig, grid = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4.2), squeeze=False)
    for ax, (model, axis) in zip(grid[0], columns, strict=True):
        points: list[float] = []
        for c in cells_of(cells, model, axis):
            local = client_gains(c, "local_only", metric)
            glob = client_gains(c, "local_federated", metric)
            ids = [k for k in local if k in glob]
            ax.scatter(
                [local[k] for k in ids], [glob[k] for k in ids], s=14, label=f"α={c.alpha:g}"
            )
            points += [local[k] for k in ids] + [glob[k] for k in ids]
        if points:
            ax.plot([min(points), max(points)], [min(points), max(points)], "k:", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.axvline(0, color="grey", linewidth=0.6)
        ax.set_xlabel(f"local-only model: gain in {metric}")
        ax.set_ylabel(f"global model: gain in {metric}")
        ax.set_title(f"{model}: {axis} (a point per client, own test split)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)
