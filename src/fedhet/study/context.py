"""The context study (CLLoRA): context length and context quality as non-IID dimensions.

``fedhet study context CONFIG`` sweeps axis × α × model and, for every cell, partitions the
clients' data along the axis (:mod:`fedhet.data.context`), trains with the experiment's
strategy (FedIT in the S-ctx configs) and reports

* local performance, each client on its own test split: before training (the base model),
  after local-only training (the client alone, from the same initial adapter), after
  federated training (the final global model); mean and spread (std) over the clients;
* global performance: the global test set (never transformed) before and after federated
  training;
* α̂, the α estimated back from the clients' group counts
  (:func:`fedhet.data.context.estimate_alpha`), and the share of training examples cut to
  ``data.max_length`` (contexts that do not fit lose the start of their prompt).

CONFIG is an experiment file (:mod:`fedhet.config`) with a ``study:`` section
(:class:`StudyConfig`). Per cell the study sets ``model.name``, ``data.partition.method``,
``alpha`` and ``params``, and evaluates every client locally (``eval.local_clients``); the
rest of the experiment file applies as written. Axes: ``length`` (``context-length``),
``quality`` (``context-quality``, quality levels) and ``quantity`` (``context-quality``
with :data:`~fedhet.data.context.QUANTITY_LEVELS`, the number of sentences kept). The
clients' data of an (axis, α) pair is built once and shared by the models (lengths are
counted with one tokenizer), so models are compared on identical partitions.

Local-only training runs ``local_steps`` steps (default: ``federation.rounds ×
train.steps``, the sequential steps behind the global model) of the experiment's training
plan from the initial adapter, one client at a time on the simulator's shared model.

Outputs in ``<output_dir>/<name>/``: ``study.md`` (tables), ``study.json`` (every figure,
per client), ``perf_vs_alpha.png``, ``clients_scatter.png`` and one run folder per cell
under ``runs/``. With ``out``, the report also replaces its section (between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->``) in that markdown file, the plots copied to
``figures/`` beside it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedhet.client.evaluate import result_key
from fedhet.client.train import local_update
from fedhet.config import ExperimentConfig, apply_overrides, resolve_paths, validate_config
from fedhet.data.context import QUANTITY_LEVELS, estimate_alpha
from fedhet.data.federated import FederatedData, build_federated_data
from fedhet.errors import FedhetError
from fedhet.model.lora import AdapterState
from fedhet.reports.results import run_header, write_section
from fedhet.reports.study_plots import plot_scatter, plot_vs_alpha
from fedhet.reports.summary import fmt
from fedhet.runtime.evaluation import evaluate_adapter
from fedhet.runtime.sim import Simulation
from fedhet.study.cells import Cell, cells_of, client_gains, improvement, mean_se, pairs

Axis = Literal["length", "quality", "quantity"]
METHODS: dict[str, str] = {
    "length": "context-length",
    "quality": "context-quality",
    "quantity": "context-quality",
}
"""Partition method of each axis."""


class StudyConfig(BaseModel):
    """The ``study:`` section of a context-study file.

    ``models``: base models (built-in names, local folders or hub ids; None: the
    experiment's ``model.name``). ``local_steps``: steps of local-only training per client
    (None: ``federation.rounds × train.steps``). ``length``, ``quality``, ``quantity``: the
    ``partition.params`` of each axis (see :mod:`fedhet.data.context`); ``quantity``'s
    ``levels`` default to :data:`~fedhet.data.context.QUANTITY_LEVELS`.
    """

    model_config = ConfigDict(extra="forbid")

    axes: list[Axis] = Field(default_factory=lambda: ["length", "quality"], min_length=1)
    alphas: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0, 100.0], min_length=1)
    models: list[str] | None = Field(None, min_length=1)
    local_steps: int | None = Field(None, ge=1)
    length: dict[str, Any] = Field(default_factory=dict)
    quality: dict[str, Any] = Field(default_factory=dict)
    quantity: dict[str, Any] = Field(default_factory=dict)

    @field_validator("axes", "alphas", "models")
    @classmethod
    def _distinct(cls, values: list | None) -> list | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError(f"values must be distinct, got {values}")
        return values

    @field_validator("alphas")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if min(values) <= 0:
            raise ValueError(f"every alpha must be > 0, got {values}")
        return values


@dataclass
class StudyResult:
    cells: list[Cell]
    metric: str
    out_dir: Path
    report: str
    plots: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------ config


def load_study(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[ExperimentConfig, StudyConfig]:
    """Read a study file: the experiment config and its ``study:`` section.

    ``overrides`` are ``--set`` items (``study.alphas=[0.1,100]`` reaches the study section).
    Errors name the file and the dotted field.
    """
    path = Path(path)
    if not path.is_file():
        raise FedhetError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise FedhetError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise FedhetError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        study = StudyConfig.model_validate(raw.pop("study", None) or {})
    except ValidationError as err:
        raise FedhetError(
            "\n".join(
                f"{path}: field study.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                for e in err.errors()
            )
        ) from None
    cfg = resolve_paths(validate_config(raw, source=str(path)), Path(path).parent)
    if cfg.eval.unseen_clients:
        raise FedhetError(f"{path}: field eval.unseen_clients must be 0 in a context study")
    return cfg, study


# ------------------------------------------------------------------------------ runner


def run_context_study(
    cfg: ExperimentConfig,
    study: StudyConfig,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    command: str = "",
    show_progress: bool = False,
) -> StudyResult:
    """Run every cell, write the outputs (module docstring) and return them."""
    started = time.perf_counter()
    out_dir = cfg.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    models = study.models or [cfg.model.name]
    local_steps = study.local_steps or cfg.federation.rounds * cfg.train.steps
    cells: list[Cell] = []
    for axis in study.axes:
        for alpha in study.alphas:
            data = cfg.data.model_copy(deep=True)
            data.partition.method = METHODS[axis]
            data.partition.alpha = alpha
            data.partition.params = _axis_params(study, axis)
            fed = build_federated_data(data, data_dir=data_dir)
            alpha_hat = estimate_alpha(_group_counts(fed))
            for model in models:
                cell_cfg = cfg.model_copy(deep=True)
                cell_cfg.name = f"{_slug(model)}-{axis}-a{alpha:g}"
                cell_cfg.output_dir = str(out_dir / "runs")
                cell_cfg.model.name = model
                cell_cfg.data = data
                cell_cfg.eval.local_clients = len(fed.clients)
                cells.append(_run_cell(cell_cfg, fed, axis, alpha_hat, local_steps, show_progress))
    metric = result_key(cfg.eval.metric)
    plots = [
        plot_vs_alpha(cells, metric, out_dir / "perf_vs_alpha.png"),
        plot_scatter(cells, metric, out_dir / "clients_scatter.png"),
    ]
    wall = time.perf_counter() - started
    study_lines = _study_lines(cfg, study, models, local_steps, wall)
    header = f"{run_header(command or None)}\n{study_lines}"
    tables = study_table(cells, metric) + "\n" + contrast_table(cells, metric)
    (out_dir / "study.md").write_text(
        f"# {cfg.name}\n\n{header}\n{tables}" + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    )
    (out_dir / "study.json").write_text(
        json.dumps({"metric": metric, "cells": [asdict(c) for c in cells]}, indent=1)
    )
    report = f"{header}\n{tables}"
    if out is not None:
        write_section(
            cfg.name,
            f"{cfg.name}: context length and quality as non-IID dimensions (CLLoRA)",
            f"{study_lines}\n{tables}",
            out,
            figures=plots,
            command=command or None,
        )
    return StudyResult(cells, metric, out_dir, report, plots)


def _axis_params(study: StudyConfig, axis: str) -> dict[str, Any]:
    """``partition.params`` of an axis; quantity defaults to the sentences-kept levels."""
    if axis == "quantity":
        return {"levels": list(QUANTITY_LEVELS), **study.quantity}
    return dict(getattr(study, axis))


def _run_cell(
    cfg: ExperimentConfig,
    fed: FederatedData,
    axis: str,
    alpha_hat: float,
    local_steps: int,
    show_progress: bool,
) -> Cell:
    started = time.perf_counter()
    sim = Simulation(cfg, fed=fed, show_progress=show_progress)
    key = result_key(cfg.eval.metric)
    local_only: dict[str, float] = {}
    for client in fed.clients:
        if not client.test:
            continue
        plan = sim.base_plan.with_overrides(
            {"steps": local_steps, "seed": _seed(cfg.seed, client.client_id)}
        )
        state = local_update(
            sim.lm, sim.examples[client.client_id], sim.init_state, plan, pad_id=sim.pad_id
        ).state
        local_only[str(client.client_id)] = _score(sim, state, client.test, key)
    metrics = sim.run().metrics
    evaluated = [m for m in metrics if f"global_{key}" in m]
    before, after = evaluated[0], evaluated[-1]
    max_length = cfg.data.max_length
    examples = [e for client in sim.examples for e in client]
    return Cell(
        model=cfg.model.name,
        axis=axis,
        alpha=cfg.data.partition.alpha,
        alpha_hat=alpha_hat,
        local_before=before.get("local_per_client", {}),
        local_only=local_only,
        local_federated=after.get("local_per_client", {}),
        global_before=before[f"global_{key}"],
        global_federated=after[f"global_{key}"],
        global_loss_federated=after["global_loss"],
        cut_fraction=float(np.mean([len(e.input_ids) >= max_length for e in examples])),
        wall_s=time.perf_counter() - started,
    )


def _score(sim: Simulation, state: AdapterState, records: list, key: str) -> float:
    """``state`` on ``records`` exactly as the simulator evaluates a client's test split."""
    ev = sim.cfg.eval
    records = records[: ev.local_size]
    max_length = sim.cfg.data.max_length
    return evaluate_adapter(sim.lm, sim.tokenizer, state, records, ev, max_length=max_length)[key]


def _group_counts(fed: FederatedData) -> np.ndarray:
    """Clients × groups record counts (the groups any client holds)."""
    hist = np.array([list(fed.category_histogram(c.client_id).values()) for c in fed.clients])
    return hist[:, hist.sum(axis=0) > 0]


def _seed(seed: int, client_id: int) -> int:
    return int(np.random.default_rng([seed, 41, client_id]).integers(2**31 - 1))


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(model).name or model).strip("-").lower()


# ------------------------------------------------------------------------------ tables


def _mean_std(scores: dict[str, float]) -> str:
    if not scores:
        return "—"
    values = np.array(list(scores.values()))
    return f"{values.mean():.4g} ± {values.std():.2g}"


def study_table(cells: list[Cell], metric: str) -> str:
    """One row per cell: α̂, local (mean ± std over clients) and global scores."""
    head = (
        "| model | axis | α | α̂ | local before | local-only | local federated | "
        "global before | global federated | global loss | cut | wall s |\n" + "|---" * 12 + "|\n"
    )
    rows = [
        f"| {c.model} | {c.axis} | {c.alpha:g} | {fmt(c.alpha_hat)} | {_mean_std(c.local_before)} "
        f"| {_mean_std(c.local_only)} | {_mean_std(c.local_federated)} | {fmt(c.global_before)} "
        f"| {fmt(c.global_federated)} | {fmt(c.global_loss_federated)} "
        f"| {c.cut_fraction:.0%} | {c.wall_s:.0f} |\n"
        for c in cells
    ]
    note = (
        f"\nScores: {metric} ({'lower' if metric == 'loss' else 'higher'} is better); local = "
        "each client's own test split, mean ± std over clients; cut = training examples "
        "filling max_length.\n"
    )
    return head + "".join(rows) + note


def contrast_table(cells: list[Cell], metric: str) -> str:
    """Per model and axis: gains at the most skewed α and at the most even α, and their
    difference (negative: skew hurts). Local gain: mean over clients of the paired
    improvement of local-only training over the base model on the client's test split
    (± its standard error); global gain: the global model over the base model."""
    lines = [
        "| model | axis | local gain, α min | local gain, α max | Δ local | "
        "global gain, α min | global gain, α max | Δ global |\n" + "|---" * 8 + "|\n"
    ]
    for model, axis in pairs(cells):
        row = cells_of(cells, model, axis)
        if len(row) < 2:
            continue
        lo, hi = row[0], row[-1]
        local = [mean_se(client_gains(c, "local_only", metric).values()) for c in (lo, hi)]
        glob = [improvement(c.global_before, c.global_federated, metric) for c in (lo, hi)]
        lines.append(
            f"| {model} | {axis} | {local[0][0]:.4g} ± {local[0][1]:.2g} (α={lo.alpha:g}) "
            f"| {local[1][0]:.4g} ± {local[1][1]:.2g} (α={hi.alpha:g}) "
            f"| {local[0][0] - local[1][0]:+.4g} | {glob[0]:.4g} | {glob[1]:.4g} "
            f"| {glob[0] - glob[1]:+.4g} |\n"
        )
    return "".join(lines) + (
        "\nGains are improvements in the metric (positive = better than the base model); "
        "Δ = gain at the smallest α − gain at the largest α.\n"
    )


# ------------------------------------------------------------------------------ report


def _study_lines(
    cfg: ExperimentConfig,
    study: StudyConfig,
    models: list[str],
    local_steps: int,
    wall: float,
) -> str:
    d, f, t = cfg.data, cfg.federation, cfg.train
    return (
        f"- wall time {wall / 60:.1f} min\n"
        f"- models {', '.join(models)}; axes {', '.join(study.axes)}; "
        f"α ∈ {{{', '.join(f'{a:g}' for a in study.alphas)}}}; strategy {cfg.strategy.name}\n"
        f"- data {d.source} {d.tasks or ''} (limit {d.limit}), "
        f"{d.partition.num_clients} clients, max_length {d.max_length}, global test "
        f"{min(d.global_test_size, cfg.eval.global_size)}, local test ≤ {cfg.eval.local_size} "
        f"per client; axis params: "
        + "; ".join(f"{a} {_axis_params(study, a) or 'defaults'}" for a in study.axes)
        + "\n"
        f"- federated: {f.rounds} rounds × {f.clients_per_round} clients × {t.steps} steps "
        f"(batch {t.batch_size}, lr {t.lr:g}); local-only: {local_steps} steps per client; "
        f"LoRA r={cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}; seed {cfg.seed}\n"
    )
