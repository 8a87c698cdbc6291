"""A run's counters, its result, and how its progress is shown.

:class:`RunProgress` is everything the driver changes during a run (it is
checkpointed as a whole, so a resumed run continues exactly); :class:`RunResult`
what a run returns; :func:`progress_bar` the terminal bar (rich) and
:func:`brief` the one-line summary of a metrics row for the log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedhet.config import ExperimentConfig
from fedhet.model.lora import AdapterState


@dataclass
class RunResult:
    """What a run returns: the final adapter, the metrics rows, the summary, the run folder."""

    state: AdapterState
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path


@dataclass
class RunProgress:
    """Everything the driver changes during a run (checkpointed as a whole).

    Accounting (every mode): bytes down are counted for every instruction run,
    bytes up for every reply that arrived (rejected ones too); busy time is each
    run's duration, idle time a client's wait for the round's slowest (sync, hier)
    or for its re-dispatch (async). ``overhead_s`` is the driver's own time in a
    step (selection, validation, aggregation), outside the executor's ``train_s``.
    """

    step: int = 0  # rounds done (sync, hier) or arrivals delivered (async)
    version: int = 0
    clock: float = 0.0
    dispatches: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    group_bytes_up: int = 0  # group ↔ server traffic (hier mode)
    group_bytes_down: int = 0
    updates_applied: int = 0
    held: int = 0  # arrivals the strategy holds (e.g. buffered), applied with the next version
    rejected: int = 0
    dropped: int = 0
    busy_time: float = 0.0
    idle_time: float = 0.0
    wall_offset: float = 0.0
    metrics_lines: int = 0
    time_to_target: float | None = None
    last_finish: dict[int, float] = field(default_factory=dict)


@contextmanager
def progress_bar(
    cfg: ExperimentConfig, total: int, *, show: bool
) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps (hidden unless ``show``); yields ``advance(done)``."""
    bar = Progress(
        TextColumn(f"[bold]{cfg.name}[/] {cfg.strategy.name}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show,
    )
    with bar:
        task = bar.add_task("run", total=total)
        yield lambda done: bar.update(task, completed=done)


def brief(row: dict[str, Any]) -> str:
    """The global figures and training loss of a metrics row, for a log line."""
    shown = {k: v for k, v in row.items() if k.startswith(("global_", "train_loss"))}
    return ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if isinstance(v, float)) or "-"


def pace(step: int, total: int | None, elapsed: float) -> str:
    """``step 3/24, 1.2 min, ETA 8.4 min`` (the ETA from the pace since the start)."""
    if not total:
        return f"step {step}"
    eta = f", ETA {elapsed / step * (total - step) / 60:.1f} min" if step else ""
    return f"step {step}/{total}, {elapsed / 60:.1f} min{eta}"
