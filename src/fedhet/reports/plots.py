"""PNG plots of a run or of a comparison (matplotlib, headless Agg backend).

Every figure has a title naming the run and its strategy, integer ticks on
round/arrival axes, and lines told apart by marker and dash as well as colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedhet.errors import FedhetError  # noqa: E402
from fedhet.reports.summary import read_metrics  # noqa: E402

_KEYS = ("accuracy", "rouge_l", "exact_match", "loss")


def metric_key(metrics: list[dict[str, Any]]) -> str:
    """The task metric present in the rows (loss when nothing else is)."""
    for key in _KEYS:
        if any(f"global_{key}" in m for m in metrics):
            return key
    raise FedhetError("no evaluated rows (global_* metrics) in metrics.jsonl")


STYLES = [
    {"marker": m, "linestyle": ls}
    for ls, m in zip(("-", "--", "-.", ":") * 3, "osD^v<>xP*h+", strict=True)
]
"""Marker and dash per line: overlapping lines stay distinguishable."""


def _title(run_dir: Path) -> str:
    """``<name>: <strategy>`` from the run's saved config (the folder name without one)."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        cfg = yaml.safe_load(saved.read_text()) or {}
        return f"{cfg.get('name', run_dir.name)}: {cfg.get('strategy', {}).get('name', '?')}"
    return run_dir.name


def _integer_ticks(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_report(folder: str | Path) -> list[Path]:
    """:func:`plot_run` for a run folder; for a ``fedhet compare`` folder (one run
    folder per strategy), each run's plots and the comparison plot."""
    folder = Path(folder)
    if (folder / "metrics.jsonl").is_file():
        return plot_run(folder)
    runs = sorted(folder.glob("*/metrics.jsonl"))
    if not runs:
        raise FedhetError(f"{folder}: no metrics.jsonl in it or in its subfolders (not a run)")
    runs = [path.parent for path in runs]
    out = [path for run in runs for path in plot_run(run)]
    compared = {run.name: read_metrics(run) for run in runs}
    out.append(plot_compare(compared, folder / "compare.png", title=folder.name))
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """metric vs step, metric vs virtual time, bytes, and the per-client spread."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FedhetError(f"{run_dir}: no metrics.jsonl (not a run folder)")
    metrics = read_metrics(run_dir)
    key = metric_key(metrics)
    rows = [m for m in metrics if f"global_{key}" in m]
    title = _title(run_dir)
    out: list[Path] = []
    for x, name in (("step", "round / arrival"), ("virtual_time", "virtual time [s]")):
        if not all(x in m for m in rows):
            continue  # no virtual clock (a Flower run on the wall clock)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [m[x] for m in rows], [m[f"global_{key}"] for m in rows], label="global", **STYLES[0]
        )
        local = [m for m in rows if f"local_{key}_mean" in m]
        if local:
            ax.plot(
                [m[x] for m in local],
                [m[f"local_{key}_mean"] for m in local],
                label="local (mean)",
                **STYLES[1],
            )
        if x == "step":
            _integer_ticks(ax)
        ax.set_xlabel(name)
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.legend()
        out.append(save_figure(fig, run_dir / f"{key}_vs_{x}.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["bytes_up"] / 1e6 for m in metrics], label="up", **STYLES[0])
    ax.plot(steps, [m["bytes_down"] / 1e6 for m in metrics], label="down", **STYLES[1])
    _integer_ticks(ax)
    ax.set_xlabel("round / arrival")
    ax.set_ylabel("cumulative MB")
    ax.set_title(title)
    ax.legend()
    out.append(save_figure(fig, run_dir / "bytes.png"))
    spread = [m for m in rows if "local_per_client" in m]
    if spread:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot(
            [list(m["local_per_client"].values()) for m in spread],
            positions=[m["step"] for m in spread],
        )
        ax.set_xlabel("round / arrival")
        ax.set_ylabel(f"local {key} per client")
        ax.set_title(title)
        out.append(save_figure(fig, run_dir / "local_spread.png"))
    return out


def plot_compare(
    runs: dict[str, list[dict[str, Any]]], path: Path, *, title: str | None = None
) -> Path:
    """Global metric vs round and vs virtual time, one line (own marker and dash) per
    strategy."""
    key = metric_key(next(iter(runs.values())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, metrics), style in zip(runs.items(), STYLES * 4, strict=False):
        rows = [m for m in metrics if f"global_{key}" in m]
        for ax, x in zip(axes, ("step", "virtual_time"), strict=True):
            xs = [m.get(x) for m in rows]
            ax.plot(xs, [m[f"global_{key}"] for m in rows], label=name, alpha=0.85, **style)
    _integer_ticks(axes[0])
    axes[0].set_xlabel("round / arrival")
    axes[1].set_xlabel("virtual time [s]")
    for ax in axes:
        ax.set_ylabel(f"global {key}")
        ax.legend()
    fig.suptitle(title or path.parent.name)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
