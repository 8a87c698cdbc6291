"""The context study's results and the arithmetic its tables and plots share.

A cell is one (model, axis, α, seed) run of the study (:mod:`fedhet.study.context`). It
holds three sets of scores, each in every study metric (``loss``; ``rouge_l`` when the
study generates):

* ``base``: the base model (the initial adapter, B = 0), the same for every cell of a
  (model, seed): the paired design gives every client the same test records in every cell;
* ``local_only``: each client's own model, trained alone from the initial adapter;
* ``federated``: the final global model of the federated run.

Local scores are per client (on its own test records), global ones on the global test set.

Gains are paired against the base model, positive = better: base − score for loss-like
metrics, score − base otherwise. A cell's *local gain* of a model is the mean over clients
of the per-client gains (the base-model loss of each client cancels, which is the point of
the paired design); its *global gain* is the federated model's gain on the global test set.
An *effect* of skew on an axis is, per seed, gain(most even α) − gain(most skewed α):
positive = skew hurts. Both α cells of a seed share test records, base scores and initial
adapter, so the difference is paired; its mean and 95 % t interval over seeds come from
:func:`fedhet.experiments.stats.interval`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedhet.client.evaluate import LOWER_IS_BETTER
from fedhet.experiments.stats import Interval, interval


@dataclass
class Scores:
    """One model's scores: ``local[metric][client id]`` and ``global_[metric]``."""

    local: dict[str, dict[str, float]] = field(default_factory=dict)
    global_: dict[str, float] = field(default_factory=dict)


@dataclass
class Cell:
    """One (model, axis, α, seed) cell (module docstring)."""

    model: str
    axis: str
    alpha: float
    seed: int
    alpha_hat: float
    cut_fraction: float
    wall_s: float
    base: Scores
    local_only: Scores
    federated: Scores

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        """The inverse of :func:`dataclasses.asdict`."""
        states = {k: Scores(**data[k]) for k in ("base", "local_only", "federated")}
        return cls(**{**data, **states})

    @property
    def metrics(self) -> list[str]:
        """The metrics scored locally or globally, loss first."""
        return list(dict.fromkeys([*self.base.local, *self.base.global_]))


def gain(before: float, after: float, metric: str) -> float:
    """after's improvement over before, positive = better."""
    return before - after if metric in LOWER_IS_BETTER else after - before


def client_gains(cell: Cell, state: str, metric: str) -> dict[str, float]:
    """Per client, the gain of ``state`` (``local_only`` or ``federated``) over the base
    model on the client's own test records."""
    base, scores = cell.base.local.get(metric, {}), getattr(cell, state).local.get(metric, {})
    return {k: gain(base[k], v, metric) for k, v in scores.items() if k in base}


def local_gain(cell: Cell, state: str, metric: str) -> float | None:
    """The mean over clients of :func:`client_gains` (None without clients)."""
    gains = list(client_gains(cell, state, metric).values())
    return float(np.mean(gains)) if gains else None


def global_gain(cell: Cell, metric: str) -> float | None:
    """The federated model's gain over the base model on the global test set."""
    if metric not in cell.federated.global_ or metric not in cell.base.global_:
        return None
    return gain(cell.base.global_[metric], cell.federated.global_[metric], metric)


Quantity = Callable[[Cell, str], float | None]
QUANTITIES: dict[str, Quantity] = {
    "local-only gain": lambda c, m: local_gain(c, "local_only", m),
    "federated local gain": lambda c, m: local_gain(c, "federated", m),
    "global gain": global_gain,
}
"""The gains the study reports, by name: (cell, metric) → a seed's value."""


def select(cells: list[Cell], model: str, axis: str, alpha: float | None = None) -> list[Cell]:
    """The cells of one (model, axis[, α]), by α then seed."""
    out = [c for c in cells if (c.model, c.axis) == (model, axis)]
    if alpha is not None:
        out = [c for c in out if c.alpha == alpha]
    return sorted(out, key=lambda c: (c.alpha, c.seed))


def alphas(cells: list[Cell]) -> list[float]:
    return sorted({c.alpha for c in cells})


def pairs(cells: list[Cell]) -> list[tuple[str, str]]:
    """Every (model, axis) of the cells, in order of appearance."""
    models = dict.fromkeys(c.model for c in cells)
    axes = dict.fromkeys(c.axis for c in cells)
    return [(m, a) for m in models for a in axes]


def over_seeds(cells: list[Cell], fn: Quantity, metric: str) -> Interval | None:
    """Mean and 95 % t interval over the cells' seeds of ``fn``."""
    return interval([fn(c, metric) for c in cells])


def effect(
    cells: list[Cell], model: str, axis: str, fn: Quantity, metric: str
) -> Interval | None:
    """Per seed, ``fn`` at the largest α minus ``fn`` at the smallest α (positive: skew
    hurts), then their mean and interval over the seeds that ran both cells."""
    row = select(cells, model, axis)
    if len(alphas(row)) < 2:
        return None
    lo, hi = alphas(row)[0], alphas(row)[-1]
    low = {c.seed: fn(c, metric) for c in row if c.alpha == lo}
    high = {c.seed: fn(c, metric) for c in row if c.alpha == hi}
    return interval([
        None if high[s] is None or low[s] is None else high[s] - low[s]
        for s in sorted(set(low) & set(high))
    ])
