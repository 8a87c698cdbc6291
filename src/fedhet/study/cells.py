"""The context study's cells and the per-client arithmetic its tables and plots share.

A cell is one (model, axis, α) run of the study (:mod:`fedhet.study.context`);
its scores are in the experiment's metric, per client by id. Gains are paired
client by client against the base model, positive = better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass
class Cell:
    """One (model, axis, α) cell: scores in the experiment's metric, per client by id."""

    model: str
    axis: str
    alpha: float
    alpha_hat: float
    local_before: dict[str, float]
    local_only: dict[str, float]
    local_federated: dict[str, float]
    global_before: float
    global_federated: float
    global_loss_federated: float
    cut_fraction: float
    wall_s: float


def improvement(before: float, after: float, metric: str) -> float:
    """after − before, signed so that positive is better (lower loss, higher score)."""
    return before - after if metric == "loss" else after - before


def client_gains(
    cell: Cell, model: Literal["local_only", "local_federated"], metric: str
) -> dict[str, float]:
    """Per client, the improvement of ``model`` over the base model on the client's own test
    split (positive = better), paired client by client."""
    scores: dict[str, float] = getattr(cell, model)
    return {
        k: improvement(cell.local_before[k], v, metric)
        for k, v in scores.items()
        if k in cell.local_before
    }


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (nan when undefined)."""
    v = np.asarray(list(values), dtype=np.float64)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def cells_of(cells: list[Cell], model: str, axis: str) -> list[Cell]:
    """The cells of one (model, axis), by increasing α."""
    return sorted((c for c in cells if (c.model, c.axis) == (model, axis)), key=lambda c: c.alpha)


def pairs(cells: list[Cell]) -> list[tuple[str, str]]:
    """Every (model, axis) of the cells, in order of appearance."""
    models = dict.fromkeys(c.model for c in cells)
    axes = dict.fromkeys(c.axis for c in cells)
    return [(m, a) for m in models for a in axes]
