"""The context study (CLLoRA): context length, quality and quantity as non-IID dimensions.

``fedhet study context CONFIG`` sweeps model × axis × α × seed. For every cell it
partitions the clients' data along the axis (:mod:`fedhet.data.context`), trains each
client alone from the initial adapter (*local-only*) and the federation with the
experiment's strategy (FedIT in the S-ctx configs), and scores the final models.

**Paired design** (why: between partitions the clients' base-model loss varied more than
any training gain, so the partition draw decided every comparison). The study requires
``data.local_test_size``: every client's test records are drawn from the pool before it
is partitioned (:mod:`fedhet.data.federated`), so for one seed every cell — every axis and
α — scores the same clients on the same records, from the same initial adapter. The base
model is scored once per (model, seed) and every figure is a gain over it, per client
(:mod:`fedhet.study.cells`). Seeds (``study.seeds``) redraw the pool split, the partition
and the training randomness; the tables give the mean and 95 % t interval over them.

Work units, each a process of its own with ``jobs`` > 1 (one thread each): one *base* unit
per (model, seed) and one *cell* unit per (model, axis, α, seed). A unit writes
``units/<model>/seed<k>/<name>.json`` with the settings it ran; a later study with the same
settings reuses it (a stopped study resumes where it stopped). Units are ordered model by
model, axis by axis, α by α, seed by seed, so a study stopped early holds whole rows.

Scores: ``loss`` (mean NLL per response token) on each evaluated client's test records and
on the global test set (capped at ``eval.global_size``); ``rouge_l`` (greedy, at most
``eval.max_new_tokens`` new tokens) on the first ``study.rouge_local`` test records of each
client and the first ``study.rouge_global`` global records (0: no ROUGE-L), for the base
and the federated model: one adapter for every client, so their records are generated in
one batched pass. The local-only models (one per client) are scored by loss alone: the
claims rest on loss (:mod:`fedhet.study.report`), and a generation pass per client model
was a fifth of a cpu-size cell's time. ``study.local_clients`` limits local-only training
and local scores to the first clients (None: all). The federated run's own evaluations
are reduced to one global record (no local ones): the study scores the final adapter
itself.

Local-only training runs ``local_steps`` steps (default: ``federation.rounds ×
train.steps``, the sequential steps behind the global model) of the experiment's training
plan, one client at a time on the simulator's shared model.

Outputs in ``<output_dir>/<name>/``: ``study.md``, ``study.json`` (every cell, per
client), one ``gains-<model>.png`` per model and the runs under ``runs/``. With ``out``,
the report also replaces its section in that markdown file (:func:`write_section`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedhet.client.evaluate import evaluate, generate, rouge_l
from fedhet.client.train import local_update
from fedhet.config import ExperimentConfig, apply_overrides, resolve_paths, validate_config
from fedhet.data.context import QUANTITY_LEVELS, estimate_alpha
from fedhet.data.federated import ClientData, FederatedData, build_federated_data
from fedhet.data.records import Record
from fedhet.errors import FedhetError
from fedhet.model.lora import AdapterState
from fedhet.reports.results import run_header, write_section
from fedhet.reports.study_plots import plot_gains
from fedhet.runtime.executor import seed_of
from fedhet.runtime.run_dir import clear_run_dir
from fedhet.runtime.sim import Simulation
from fedhet.study.cells import Cell, Scores
from fedhet.study.report import study_report

Axis = Literal["length", "quality", "quantity"]
METHODS: dict[str, str] = {
    "length": "context-length",
    "quality": "context-quality",
    "quantity": "context-quality",
}
"""Partition method of each axis."""


class StudyConfig(BaseModel):
    """The ``study:`` section of a context-study file (module docstring).

    ``models``: base models (built-in names, local folders or hub ids; None: the
    experiment's ``model.name``). ``seeds``: the seeds of every cell. ``local_steps``:
    steps of local-only training per client (None: ``federation.rounds × train.steps``).
    ``local_clients``: clients trained alone and scored locally (the first ones; None:
    all). ``rouge_local`` / ``rouge_global``: records scored by ROUGE-L per client / on
    the global test set (0: none). ``margin``: the bound of a "minimal" effect, as a share
    of the local-only gain at the largest α (:mod:`fedhet.study.report`). ``length``,
    ``quality``, ``quantity``: the ``partition.params`` of each axis (see
    :mod:`fedhet.data.context`); ``quantity``'s ``levels`` default to
    :data:`~fedhet.data.context.QUANTITY_LEVELS`.
    """

    model_config = ConfigDict(extra="forbid")

    axes: list[Axis] = Field(
        default_factory=lambda: ["length", "quality", "quantity"], min_length=1
    )
    alphas: list[float] = Field(default_factory=lambda: [0.1, 1.0, 100.0], min_length=1)
    models: list[str] | None = Field(None, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    local_steps: int | None = Field(None, ge=1)
    local_clients: int | None = Field(None, ge=1)
    rouge_local: int = Field(4, ge=0)
    rouge_global: int = Field(32, ge=0)
    margin: float = Field(0.25, gt=0)
    length: dict[str, Any] = Field(default_factory=dict)
    quality: dict[str, Any] = Field(default_factory=dict)
    quantity: dict[str, Any] = Field(default_factory=dict)

    @field_validator("axes", "alphas", "models", "seeds")
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
    if cfg.data.local_test_size is None:
        raise FedhetError(
            f"{path}: field data.local_test_size is required by the context study's paired "
            "design (the same test records for every client in every cell)"
        )
    return cfg, study


# ------------------------------------------------------------------------------ units


@dataclass(frozen=True)
class Unit:
    """One piece of work: the base scores of (model, seed) when ``axis`` is None, else
    the cell (model, axis, α, seed)."""

    model: str
    seed: int
    axis: str | None = None
    alpha: float | None = None

    @property
    def name(self) -> str:
        return "base" if self.axis is None else f"{self.axis}-a{self.alpha:g}"

    @property
    def label(self) -> str:
        return f"{_slug(self.model)} seed {self.seed} {self.name}"

    def path(self, out_dir: Path) -> Path:
        return out_dir / "units" / _slug(self.model) / f"seed{self.seed}" / f"{self.name}.json"


def units(study: StudyConfig, models: list[str]) -> list[Unit]:
    """Every unit in run order (module docstring)."""
    out = []
    for model in models:
        out += [Unit(model, seed) for seed in study.seeds]
        out += [
            Unit(model, seed, axis, alpha)
            for axis in study.axes
            for alpha in study.alphas
            for seed in study.seeds
        ]
    return out


def unit_config(cfg: ExperimentConfig, study: StudyConfig, unit: Unit) -> ExperimentConfig:
    """The experiment config a unit runs (a base unit: its seed's first cell's data,
    whose test records every cell of the seed shares)."""
    axis, alpha = unit.axis or study.axes[0], unit.alpha or study.alphas[0]
    out = cfg.model_copy(deep=True)
    out.name = f"{_slug(unit.model)}-s{unit.seed}-{axis}-a{alpha:g}"
    out.output_dir = str(cfg.run_dir / "runs")
    out.seed = out.data.seed = unit.seed
    out.model.name = unit.model
    out.data.partition.method = METHODS[axis]
    out.data.partition.alpha = alpha
    out.data.partition.params = _axis_params(study, axis)
    out.eval.local_clients, out.eval.global_size = 0, 1  # the study scores the models
    return out


def _unit_key(cfg: ExperimentConfig, study: StudyConfig, unit: Unit) -> dict[str, Any]:
    """What a unit's result depends on (a saved unit with another key is re-run). A base
    unit depends on the model, the seed's test records and the scoring settings only."""
    keep = ["local_clients", "rouge_local", "rouge_global"]
    run = unit_config(cfg, study, unit).model_dump(mode="json")
    run.pop("output_dir")
    if unit.axis is None:
        data = run["data"]
        data.pop("partition")
        run = {"model": run["model"], "lora": run["lora"], "seed": run["seed"], "data": data,
               "num_clients": cfg.data.partition.num_clients}
    else:
        keep.append("local_steps")
    return {"unit": asdict(unit), "config": run, "study": {k: getattr(study, k) for k in keep},
            "eval": cfg.eval.model_dump(mode="json")}


def run_unit(
    cfg_raw: dict[str, Any],
    study_raw: dict[str, Any],
    unit: Unit,
    path: str,
    data_dir: str | None,
    threads: int | None,
) -> None:
    """Run one unit (in a worker process or here) and write its JSON file."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    cfg, study = ExperimentConfig.model_validate(cfg_raw), StudyConfig.model_validate(study_raw)
    started = time.perf_counter()
    run_cfg = unit_config(cfg, study, unit)
    fed = build_federated_data(run_cfg.data, data_dir=data_dir)
    sim = Simulation(run_cfg, fed=fed)
    clients = fed.clients[: study.local_clients]
    scorer = _Scorer(sim, cfg, study)
    if unit.axis is None:
        result: dict[str, Any] = {"base": asdict(scorer.scores(sim.init_state, clients, fed))}
    else:
        local_steps = study.local_steps or cfg.federation.rounds * cfg.train.steps
        local_only = Scores()
        for client in clients:
            plan = sim.base_plan.with_overrides(
                {"steps": local_steps, "seed": seed_of(unit.seed, 41, client.client_id)}
            )
            state = local_update(
                sim.lm, sim.examples[client.client_id], sim.init_state, plan, pad_id=sim.pad_id
            ).state
            local_only.local.setdefault("loss", {})[str(client.client_id)] = scorer.loss(
                state, client.test
            )
        clear_run_dir(run_cfg)  # a unit stopped half-way starts again
        federated = scorer.scores(sim.run().state, clients, fed)
        examples = [e for client in sim.examples for e in client]
        result = {
            "local_only": asdict(local_only),
            "federated": asdict(federated),
            "alpha_hat": estimate_alpha(_group_counts(fed)),
            "cut_fraction": float(
                np.mean([len(e.input_ids) >= run_cfg.data.max_length for e in examples])
            ),
        }
    result["wall_s"] = time.perf_counter() - started
    result["key"] = _unit_key(cfg, study, unit)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
    out.with_suffix(".tmp").replace(out)  # a unit stopped while writing leaves no half file


class _Scorer:
    """Loss and ROUGE-L of adapter states on records (module docstring)."""

    def __init__(self, sim: Simulation, cfg: ExperimentConfig, study: StudyConfig) -> None:
        self.sim, self.ev, self.study = sim, cfg.eval, study
        self.kw = {"max_length": cfg.data.max_length, "batch_size": cfg.eval.batch_size}

    def loss(self, state: AdapterState, records: list[Record]) -> float:
        self.sim.lm.load_state(state)
        return evaluate(self.sim.lm.model, self.sim.tokenizer, records, "loss", **self.kw)["loss"]

    def rouge(self, state: AdapterState, parts: list[list[Record]]) -> list[float]:
        """ROUGE-L of each part, its records generated in one batched pass."""
        self.sim.lm.load_state(state)
        flat = [r for part in parts for r in part]
        preds = generate(self.sim.lm.model, self.sim.tokenizer, flat,
                         max_new_tokens=self.ev.max_new_tokens, **self.kw)
        out, start = [], 0
        for part in parts:
            out.append(rouge_l(preds[start : start + len(part)], [r.response for r in part]))
            start += len(part)
        return out

    def scores(
        self, state: AdapterState, clients: list[ClientData], fed: FederatedData
    ) -> Scores:
        """One adapter on every scored client's test records and on the global test set."""
        ids = [str(c.client_id) for c in clients]
        out = Scores({"loss": {k: self.loss(state, c.test) for k, c in zip(ids, clients,
                                                                           strict=True)}})
        if self.study.rouge_local:
            parts = [c.test[: self.study.rouge_local] for c in clients]
            out.local["rouge_l"] = dict(zip(ids, self.rouge(state, parts), strict=True))
        global_test = fed.global_test[: self.ev.global_size]
        out.global_ = {"loss": self.loss(state, global_test)}
        if self.study.rouge_global:
            out.global_["rouge_l"] = self.rouge(state, [global_test[: self.study.rouge_global]])[0]
        return out


# ------------------------------------------------------------------------------ runner


def run_context_study(
    cfg: ExperimentConfig,
    study: StudyConfig,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    command: str = "",
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Run (or reuse) every unit, write the outputs (module docstring) and return them."""
    started = time.perf_counter()
    out_dir = cfg.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    models = study.models or [cfg.model.name]
    every = units(study, models)
    todo = [u for u in every if _saved(cfg, study, u) is None]
    log(f"context study: {len(todo)} units to run, {len(every) - len(todo)} reused")
    args = (cfg.model_dump(mode="json"), study.model_dump(mode="json"))
    data = None if data_dir is None else str(data_dir)
    if jobs <= 1:
        for unit in todo:
            log(f"start: {unit.label}")
            run_unit(*args, unit, str(unit.path(out_dir)), data, None)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            pending: dict[Future, Unit] = {}
            while todo or pending:
                while todo and len(pending) < jobs:
                    unit = todo.pop(0)
                    log(f"start: {unit.label}")
                    path = str(unit.path(out_dir))
                    pending[pool.submit(run_unit, *args, unit, path, data, 1)] = unit
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    fut.result()  # a failed unit stops the study with its error
                    log(f"done: {pending.pop(fut).label}")
    saved = {u: result for u in every if (result := _saved(cfg, study, u))}
    cells = _cells_of(saved)
    wall = time.perf_counter() - started
    compute = sum(result["wall_s"] for result in saved.values())
    plots = [
        plot_gains(cells, model, out_dir / f"gains-{_slug(model)}.png")
        for model in models
        if any(c.model == model for c in cells)
    ]
    lines = _study_lines(cfg, study, models, wall, compute, max(jobs, 1))
    body = study_report(cells, study.margin)
    (out_dir / "study.md").write_text(
        f"# {cfg.name}\n\n{run_header(command or None)}\n{lines}\n{body}"
        + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    )
    (out_dir / "study.json").write_text(json.dumps([asdict(c) for c in cells], indent=1))
    if out is not None:
        title = f"{cfg.name}: context length, quality and quantity as non-IID dimensions (CLLoRA)"
        write_section(cfg.name, title, f"{lines}\n{body}", out, figures=plots,
                      command=command or None)
    return StudyResult(cells, out_dir, f"{run_header(command or None)}\n{lines}\n{body}", plots)


def _saved(cfg: ExperimentConfig, study: StudyConfig, unit: Unit) -> dict[str, Any] | None:
    """The unit's saved result when it ran with the study's current settings, else None."""
    path = unit.path(cfg.run_dir)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    same = json.dumps(saved.get("key"), sort_keys=True) == json.dumps(
        _unit_key(cfg, study, unit), sort_keys=True
    )
    return saved if same else None


def _cells_of(saved: dict[Unit, dict[str, Any]]) -> list[Cell]:
    """The cells among the saved unit results (:func:`_saved`, in unit order) whose seed's
    base unit is saved too, each with that base's scores."""
    cells: list[Cell] = []
    for unit, result in saved.items():
        base = saved.get(Unit(unit.model, unit.seed))
        if unit.axis is None or base is None:
            continue
        cells.append(Cell.from_dict({
            "model": unit.model, "axis": unit.axis, "alpha": unit.alpha, "seed": unit.seed,
            "alpha_hat": result["alpha_hat"], "cut_fraction": result["cut_fraction"],
            "wall_s": result["wall_s"], "base": base["base"], "local_only": result["local_only"],
            "federated": result["federated"],
        }))
    return cells


def _axis_params(study: StudyConfig, axis: str) -> dict[str, Any]:
    """``partition.params`` of an axis; quantity defaults to the sentences-kept levels."""
    if axis == "quantity":
        return {"levels": list(QUANTITY_LEVELS), **study.quantity}
    return dict(getattr(study, axis))


def _group_counts(fed: FederatedData) -> np.ndarray:
    """Clients × groups training-record counts (the paired test records, drawn before
    the partition, carry no group)."""
    groups = sorted({r.category for c in fed.clients for r in c.train})
    return np.array([[sum(r.category == g for r in c.train) for g in groups] for c in fed.clients])


def _slug(model: str) -> str:
    """A folder name for a model: its last path part, plus a short hash of the whole string
    when that is a local path (two folders of the same name stay apart)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", Path(model).name or model).strip("-").lower()
    if Path(model).expanduser().exists():
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return slug


def _study_lines(
    cfg: ExperimentConfig,
    study: StudyConfig,
    models: list[str],
    wall: float,
    compute: float,
    jobs: int,
) -> str:
    """The settings lines; ``compute`` is the sum of every finished unit's own wall time
    (single-thread processes), so ``compute / jobs`` is the study's wall time from
    scratch when ``jobs`` units run side by side on as many cores."""
    d, f, t = cfg.data, cfg.federation, cfg.train
    local_steps = study.local_steps or f.rounds * t.steps
    return (
        f"- wall time of this call {wall / 60:.1f} min (units reused from earlier runs count "
        f"as 0); the units' own wall times sum to {compute / 60:.1f} core-min, "
        f"{compute / 60 / jobs:.1f} min from scratch at --jobs {jobs}\n"
        f"- models {', '.join(models)}; axes {', '.join(study.axes)}; "
        f"α ∈ {{{', '.join(f'{a:g}' for a in study.alphas)}}}; seeds "
        f"{', '.join(map(str, study.seeds))}; strategy {cfg.strategy.name}\n"
        f"- data {d.source} {d.tasks or ''} (limit {d.limit}), "
        f"{d.partition.num_clients} clients, max_length {d.max_length}; paired local test "
        f"records: {d.local_test_size} per client, scored for "
        f"{study.local_clients or d.partition.num_clients} clients; global test "
        f"{min(d.global_test_size, cfg.eval.global_size)}; ROUGE-L on {study.rouge_local} "
        f"local records per client and {study.rouge_global} global ones (greedy, "
        f"≤ {cfg.eval.max_new_tokens} new tokens); axis params: "
        + "; ".join(f"{a} {_axis_params(study, a) or 'defaults'}" for a in study.axes)
        + "\n"
        f"- federated: {f.rounds} rounds × {f.clients_per_round} clients × {t.steps} steps "
        f"(batch {t.batch_size}, lr {t.lr:g}); local-only: {local_steps} steps per client; "
        f"LoRA r={cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}\n"
    )
