"""Run outputs: ``metrics.csv``, ``summary.md`` and the summary dict.

``metrics.jsonl`` (one JSON object per round or arrival) is the source of
truth; the CSV flattens it (per-client dicts omitted) and the summary reads the
last evaluated row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedhet.client.evaluate import result_key
from fedhet.config import ExperimentConfig
from fedhet.runtime.checkpoint import write_atomic


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(
    metrics: list[dict[str, Any]],
    metric: str,
    time_to_target: float | None,
    primary: str | None = None,
) -> dict[str, Any]:
    """Final and initial global/local figures (the metric's and the ``primary``
    figure's, ``eval.primary``), bytes, updates, times, and why the run stopped
    (``stopped``: ``budget``, ``time`` or ``target``)."""
    key = result_key(metric)
    primary = primary or key
    with_primary = [m for m in metrics if f"global_{primary}" in m]
    evaluated = [m for m in metrics if f"global_{key}" in m]
    first, last = (evaluated[0], evaluated[-1]) if evaluated else ({}, {})
    final = metrics[-1] if metrics else {}
    return {
        "metric": key,
        "initial_global": first.get(f"global_{key}"),
        "final_global": last.get(f"global_{key}"),
        "final_global_loss": last.get("global_loss"),
        "primary": primary,
        "initial_primary": with_primary[0][f"global_{primary}"] if with_primary else None,
        "final_primary": with_primary[-1][f"global_{primary}"] if with_primary else None,
        "initial_local_mean": first.get(f"local_{key}_mean"),
        "final_local_mean": last.get(f"local_{key}_mean"),
        "final_local_std": last.get(f"local_{key}_std"),
        "virtual_time": final.get("virtual_time"),
        "time_to_target": time_to_target,
        "wall_time": final.get("wall_time"),
        "bytes_up": final.get("bytes_up"),
        "bytes_down": final.get("bytes_down"),
        "updates_applied": final.get("updates_applied"),
        "dropped": final.get("dropped"),
        "rejected": final.get("rejected"),
        "idle_fraction": final.get("idle_fraction"),
        "stopped": final.get("stopped", "budget"),
    }


def write_outputs(
    run_dir: Path,
    cfg: ExperimentConfig,
    metrics: list[dict[str, Any]],
    time_to_target: float | None,
) -> dict[str, Any]:
    """Write metrics.csv and summary.md; return the summary dict."""
    columns: list[str] = []
    for row in metrics:
        columns += [k for k, v in row.items() if not isinstance(v, dict) and k not in columns]
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(metrics)
    write_atomic(run_dir / "metrics.csv", table.getvalue())
    summary = summarize(metrics, cfg.eval.metric, time_to_target, cfg.eval.primary)
    scoring = (
        f"; accuracy by {cfg.eval.option_scoring} log-likelihood of the options"
        if cfg.eval.metric == "accuracy"
        else ""
    )
    lines = [
        f"# {cfg.name}: {cfg.strategy.name}",
        "",
        f"model `{cfg.model.name}`, data `{cfg.data.source}` "
        f"({cfg.data.partition.method}, {cfg.data.partition.num_clients} clients), "
        f"fleet `{cfg.fleet.name}`, seed {cfg.seed}{scoring}",
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {fmt(v)} |" for k, v in summary.items()]
    write_atomic(run_dir / "summary.md", "\n".join(lines) + "\n")
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def fmt(value: Any) -> str:
    """A table cell: floats to 6 significant digits (methods that differ in the
    fourth digit stay apart), None as a dash."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)
