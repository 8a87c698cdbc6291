"""Run several strategies on the identical scenario and tabulate them.

Identical means: the same config (data, partition, fleet, seed, training
plan, evaluation), so the same clients hold the same data on the same devices
and draw the same availability; only ``strategy.name`` changes. Parameters in
``strategy.params`` apply to the strategy they were written for; the others
use their defaults. The federated data is built once and shared.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhet.config import load_config, validate_config
from fedhet.data.check import check_data
from fedhet.data.federated import build_federated_data
from fedhet.errors import FedhetError
from fedhet.reports.plots import plot_compare
from fedhet.reports.summary import fmt
from fedhet.runtime.run_dir import check_run_dir, clear_run_dir
from fedhet.runtime.sim import Simulation

_COLUMNS = (
    "initial_global",
    "final_global",
    "final_local_mean",
    "final_local_std",
    "time_to_target",
    "virtual_time",
    "bytes_up",
    "bytes_down",
    "updates_applied",
    "idle_fraction",
    "wall_time",
)


@dataclass
class Comparison:
    summaries: dict[str, dict[str, Any]]
    out_dir: Path


def compare_strategies(
    config: str | Path,
    names: list[str],
    overrides: list[str],
    data_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> Comparison:
    """Run every strategy of ``names`` on ``config``'s scenario (same data, same
    seed) into ``output_dir/name/<strategy>``; one table (``compare.md``) and one
    plot. Every strategy's config is checked before the first run starts."""
    base = load_config(config, overrides)
    if not names:
        raise FedhetError("--strategies: name at least one strategy")
    out_dir = base.run_dir
    configs = {}
    for name in names:
        params = base.strategy.params if name == base.strategy.name else {}
        raw = base.model_dump(mode="json") | {"output_dir": str(out_dir), "name": name}
        raw["strategy"] = {"name": name, "params": params}
        configs[name] = validate_config(raw, source=f"--strategies {name}")
    check_run_dir(base, overwrite=overwrite)
    fed = build_federated_data(base.data, data_dir=data_dir)
    check_data(fed, base.eval.metric)
    if overwrite:
        clear_run_dir(base)
    summaries: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, cfg in configs.items():
        result = Simulation(cfg, fed=fed, show_progress=sys.stdout.isatty()).run()
        summaries[name] = result.summary
        runs[name] = result.metrics
    plot_compare(runs, out_dir / "compare.png")
    lines = ["| strategy | " + " | ".join(_COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(fmt(s.get(c)) for c in _COLUMNS) + " |")
    (out_dir / "compare.md").write_text("\n".join(lines) + "\n")
    return Comparison(summaries, out_dir)
