"""The experiment runner: arms × seeds → runs, reused when finished, with
PROTOCOL v2's reference points and budgets.

An :class:`Experiment` is a scenario config, a list of :class:`Arm` (a method:
a label and the ``--set`` overrides that turn the scenario into it) and seeds.
Each (arm, seed) is one ordinary run of the simulator in
``output_dir/<experiment>/<arm>/seed<k>``, its config saved there as always. A
seed k sets both ``seed`` (fleet, availability, training randomness) and
``data.seed`` (the pool's shuffle, the partition and the global test subset), as
PROTOCOL v2 asks; within a seed every arm sees the same data and devices, so
the paired comparisons hold the partition fixed.

**Budgets** (``Experiment.budget``):

* ``protocol`` (PROTOCOL v2): the baseline arm runs the scenario's budget as
  written; from its run come the seed's loss target
  ``target = base − 0.9 · (base − L_base)`` of the primary figure (base: the
  step-0 evaluation; L_base: the mean of the baseline's last 3 evaluations) and
  its virtual time T. Every other arm then runs until it reaches the target
  (``eval.stop_at_target``), or its clock reaches T
  (``federation.max_virtual_time``), or it has used 4× the baseline's client
  updates, whichever comes first: an asynchronous arm gets ``max_arrivals`` =
  4 × rounds × clients_per_round and is evaluated every ``clients_per_round ·
  eval.every`` arrivals (as many updates between evaluations as the baseline);
  a synchronous or hierarchical arm gets 4 × the rounds (a hierarchical round
  holds τ_g intra-group rounds per group, so its cap in client updates is looser;
  the time limit T binds it as every arm).
* ``time``: as ``protocol`` but an arm does not stop at the target: every arm runs
  to the baseline's virtual time T (or the 4× cap), so final figures compare at
  equal virtual time (an accuracy claim, which ``protocol`` decides at the
  target by construction); "time to target" is still read from its evaluations.
* ``equal``: every arm runs the scenario's budget as written (ablations at equal
  rounds); the target is still derived from the baseline, for "time to target".

**Reuse**: a run whose folder holds a ``summary.json`` and a saved config equal
to the one it would run is not run again, and an unfinished one of the same
config continues from its newest checkpoint, so a stopped experiment resumes
where it stopped and seeds may be run by separate invocations. Equal means equal
but for ``federation.checkpoint_every``, which changes only how much work a kill
loses, never a result (a resumed run equals the uninterrupted one), and but for
``output_dir``, which says only where the run is written.

**Records**: with ``Experiment.records`` set (the ``exp_*`` scripts set
``benchmarks/records``, a folder kept in git), each finished run's record — its
``config.yaml``, ``metrics.jsonl`` and ``summary.json``, a few kB, no weights —
is copied to ``records/<experiment>/<arm>/seed<k>`` and counts as finished from
there as from its run folder. A record of another experiment whose config is the
same but for its name counts too (e.g. two experiments sharing a FedIT baseline:
the run is the same computation, so it is not repeated; the table reads it from
the other experiment's record). A comparison that takes longer than one machine's
session thus resumes on a fresh clone from the runs already committed, and its
table can be rebuilt from the records alone (``--table-only``).

**Processes**: with ``jobs`` > 1 the runs go to that many worker processes
(``spawn``), each single-threaded (``torch.set_num_threads(1)``), seeds side by
side; an arm waits for its seed's baseline only. ``jobs`` = 1 runs everything in
this process.

The optional ``central`` reference (one adapter on the union of the clients'
data, as many samples as the baseline, :meth:`Simulation.run_central`) gives
PROTOCOL's second line, the v1 target ``base + 0.9 · (central − base)``; it
costs one more run per seed, so it is asked for explicitly.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedhet.client.evaluate import reaches
from fedhet.config import ExperimentConfig, apply_overrides, load_config, validate_config
from fedhet.reports.summary import read_metrics, summarize
from fedhet.runtime.sim import Simulation
from fedhet.strategies import STRATEGIES

CENTRAL = "central"
COMPUTE_CAP = 4
"""PROTOCOL v2: a non-baseline arm uses at most this many times the baseline's updates."""
TARGET_SHARE = 0.9
LAST_EVALUATIONS = 3
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
"""A finished run's record (module docstring, Records)."""


@dataclass(frozen=True)
class Arm:
    """One method of an experiment: its table label and the overrides that make it.

    ``simulation`` is the simulator class to run it with (a subclass may count
    something extra, e.g. FibecFed's scoring tokens); it must be importable by the
    worker processes (a module-level class, or one defined in the running script).
    """

    name: str
    overrides: tuple[str, ...] = ()
    simulation: type[Simulation] = Simulation


@dataclass
class Run:
    """One finished (arm, seed): its config, summary and metrics rows."""

    arm: str
    seed: int
    cfg: ExperimentConfig
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def primary(self) -> str:
        return self.summary.get("primary") or self.summary["metric"]

    def evaluated(self, key: str | None = None) -> list[dict[str, Any]]:
        """The rows holding ``global_<key>`` (default: the primary figure)."""
        key = f"global_{key or self.primary}"
        return [r for r in self.rows if key in r]

    def time_to(self, target: float) -> float | None:
        """Virtual time of the first evaluation whose primary figure reaches ``target``."""
        key = self.primary
        for row in self.evaluated():
            if reaches(key, row[f"global_{key}"], target):
                return row.get("virtual_time")
        return None


@dataclass
class References:
    """PROTOCOL v2's reference points of one seed (primary figure)."""

    base: float
    baseline_final: float
    target: float
    baseline_time: float
    central: float | None = None

    @property
    def v1_target(self) -> float | None:
        if self.central is None:
            return None
        return self.base + TARGET_SHARE * (self.central - self.base)


@dataclass
class Experiment:
    """A scenario, its arms (the first is the baseline unless ``baseline`` names one)
    and seeds (module docstring)."""

    key: str
    config: Path
    arms: list[Arm]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    baseline: str | None = None
    budget: Literal["protocol", "time", "equal"] = "protocol"
    central: bool = False
    data_dir: str | None = None
    records: Path | None = None

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.key}: arm names repeat: {names}")
        self.baseline = self.baseline or names[0]
        if self.baseline not in names:
            raise ValueError(f"experiment {self.key}: baseline {self.baseline!r} is not an arm")

    @property
    def baseline_arm(self) -> Arm:
        return next(a for a in self.arms if a.name == self.baseline)


@dataclass
class Results:
    """Every finished run of an experiment, by arm and seed, and each seed's references."""

    experiment: Experiment
    runs: dict[str, dict[int, Run]]
    references: dict[int, References]
    wall_time: float

    def values(self, arm: str, fn: Callable[[Run], float | None]) -> list[float | None]:
        """``fn`` of the arm's run on every seed (None where the run is missing)."""
        runs = self.runs.get(arm, {})
        return [fn(runs[s]) if s in runs else None for s in self.experiment.seeds]


# ------------------------------------------------------------------ configs
def scenario(exp: Experiment) -> ExperimentConfig:
    """The scenario config with the experiment's overrides (checked once, up front)."""
    return load_config(exp.config, exp.overrides)


def arm_config(
    exp: Experiment, arm: Arm, seed: int, refs: References | None = None
) -> ExperimentConfig:
    """The config of one (arm, seed): the scenario, the arm's overrides, the seed, the
    run folder, and under the ``protocol`` and ``time`` budgets the chase budget from
    ``refs``."""
    base = scenario(exp)
    raw = apply_overrides(base.model_dump(mode="json"), list(arm.overrides))
    raw |= {"seed": seed, "name": f"{exp.key}/{arm.name}/seed{seed}"}
    raw["data"]["seed"] = seed  # PROTOCOL v2: a seed also draws the partition
    cfg = validate_config(raw, source=f"{exp.config} (arm {arm.name})")
    if refs is not None:
        cfg.eval.target = refs.target
        if exp.budget in ("protocol", "time") and arm.name != exp.baseline:
            chase(cfg, base)
            cfg.eval.stop_at_target = exp.budget == "protocol"
            cfg.federation.max_virtual_time = max(refs.baseline_time, 1e-9)
    return validate_config(cfg.model_dump(mode="json"), source=f"arm {arm.name}")


def chase(cfg: ExperimentConfig, base: ExperimentConfig) -> None:
    """The compute cap and evaluation spacing of a non-baseline arm (module docstring)."""
    fed, per_round = cfg.federation, base.federation.clients_per_round
    updates = base.federation.rounds * per_round
    if STRATEGIES[cfg.strategy.name].mode == "async":
        fed.max_arrivals = COMPUTE_CAP * updates
        cfg.eval.every = base.eval.every * per_round
    else:
        fed.rounds = COMPUTE_CAP * base.federation.rounds


def central_config(exp: Experiment, seed: int) -> ExperimentConfig:
    cfg = arm_config(exp, exp.baseline_arm, seed)
    cfg.name = f"{exp.key}/{CENTRAL}/seed{seed}"
    return cfg


# ------------------------------------------------------------------ reuse
def same_run(a: ExperimentConfig, b: ExperimentConfig, *, any_name: bool = False) -> bool:
    """Whether two configs give the same run: equal but for the checkpoint cadence
    and the output folder (module docstring, Reuse), and with ``any_name`` the name
    (which says only where the run is kept)."""

    def key(cfg: ExperimentConfig) -> dict[str, Any]:
        dump = cfg.model_dump()
        dump["federation"].pop("checkpoint_every")
        dump.pop("output_dir")
        if any_name:
            dump.pop("name")
        return dump

    return key(a) == key(b)


def finished(
    cfg: ExperimentConfig, *, unfinished: bool = False, records: Path | None = None
) -> Run | None:
    """The finished run of exactly ``cfg`` in its folder or, failing that, in
    ``records`` (module docstring), or None. With ``unfinished``, a run still going
    (or stopped before its end) of exactly ``cfg`` too: its summary is built from
    the rows it has logged so far and says ``stopped: unfinished``."""
    run = read_run(cfg.run_dir, cfg, unfinished=unfinished)
    if run is None and records is not None:
        run = read_run(records / cfg.name, cfg) or twin(cfg, records)
    return run


def twin(cfg: ExperimentConfig, records: Path) -> Run | None:
    """A finished record of another experiment (or arm) whose config equals ``cfg``
    but for its name (module docstring, Records), as ``cfg``'s run, or None."""
    for saved in sorted(records.rglob("config.yaml")):
        run = read_run(saved.parent, cfg, any_name=True)
        if run is not None:
            return run
    return None


_SAVED: dict[Path, tuple[int, ExperimentConfig]] = {}


def saved_config(path: Path) -> ExperimentConfig:
    """``load_config(path)``, parsed once per version of the file (:func:`twin`
    compares against every record, several times per experiment)."""
    stamp = path.stat().st_mtime_ns
    if path not in _SAVED or _SAVED[path][0] != stamp:
        _SAVED[path] = (stamp, load_config(path))
    return _SAVED[path][1]


def read_run(
    folder: Path, cfg: ExperimentConfig, *, unfinished: bool = False, any_name: bool = False
) -> Run | None:
    """The run of exactly ``cfg`` saved in ``folder`` (see :func:`finished`; with
    ``any_name`` under any name), or None."""
    done = (folder / "summary.json").is_file()
    if not (done or unfinished) or not (folder / "config.yaml").is_file():
        return None
    if not same_run(saved_config(folder / "config.yaml"), cfg, any_name=any_name):
        return None
    arm = cfg.name.split("/")[-2] if "/" in cfg.name else cfg.name
    rows = read_metrics(folder) if (folder / "metrics.jsonl").is_file() else []
    if done:
        summary = json.loads((folder / "summary.json").read_text())
    elif len(rows) > 1:
        summary = summarize(rows, cfg.eval.metric, None, cfg.eval.primary)
        summary["stopped"] = "unfinished"
    else:
        return None
    return Run(arm, cfg.seed, cfg, summary, rows)


def keep_record(cfg: ExperimentConfig, records: Path) -> None:
    """Copy the finished run's record to ``records`` (module docstring), once. A
    record of a different config under the same name (the scenario changed since it
    was kept, e.g. its learning rate) is replaced, as it can never be reused."""
    target = records / cfg.name
    if not (cfg.run_dir / "summary.json").is_file() or read_run(target, cfg) is not None:
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        shutil.copyfile(cfg.run_dir / name, target / name)


def references(baseline: Run, central: Run | None = None) -> References:
    """The seed's reference points from its baseline (and central) run."""
    key = f"global_{baseline.primary}"
    evaluated = baseline.evaluated()
    base = evaluated[0][key]
    tail = [r[key] for r in evaluated[1:][-LAST_EVALUATIONS:]] or [base]
    final = sum(tail) / len(tail)
    return References(
        base=base,
        baseline_final=final,
        target=base - TARGET_SHARE * (base - final),
        baseline_time=baseline.rows[-1].get("virtual_time") or 0.0,
        central=central.evaluated()[-1][key] if central else None,
    )


# ------------------------------------------------------------------ running
_FED_CACHE: dict[str, Any] = {}


def execute(cfg_raw: dict[str, Any], simulation: type[Simulation], central: bool,
            data_dir: str | None, threads: int | None) -> dict[str, Any]:
    """Run one config (in a worker process or here); returns its summary. The
    federated data is built once per process and data config."""
    import torch

    from fedhet.data.federated import build_federated_data

    if threads:
        torch.set_num_threads(threads)
    cfg = ExperimentConfig.model_validate(cfg_raw)
    key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    if key not in _FED_CACHE:
        _FED_CACHE.clear()
        _FED_CACHE[key] = build_federated_data(cfg.data, data_dir=data_dir)
    sim = simulation(cfg, fed=_FED_CACHE[key])
    if central:
        return sim.run_central(every_chunk=False).summary
    return sim.run(resume=interrupted(cfg)).summary


def interrupted(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg``'s folder holds an unfinished run of exactly ``cfg`` (resumed
    from its newest checkpoint); a folder holding another config's run is cleared."""
    saved = cfg.run_dir / "config.yaml"
    if saved.is_file() and same_run(load_config(saved), cfg):
        return True
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    return False


def run_experiment(
    exp: Experiment, *, jobs: int = 1, log: Callable[[str], None] = print
) -> Results:
    """Every (arm, seed) of ``exp``, reusing finished runs (module docstring)."""
    started = time.perf_counter()
    scenario(exp)  # a bad config fails before anything runs
    for seed in exp.seeds:
        for arm in exp.arms:
            arm_config(exp, arm, seed)
    runs: dict[str, dict[int, Run]] = {a.name: {} for a in exp.arms}
    centrals: dict[int, Run] = {}
    refs: dict[int, References] = {}
    pool = (
        ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        if jobs > 1
        else None
    )
    rank = {a.name: i + 1 for i, a in enumerate(exp.arms)} | {exp.baseline: 0, CENTRAL: 0}
    pending: dict[Future | None, tuple[str, int, ExperimentConfig]] = {}
    queue: list[tuple[Arm | None, int, ExperimentConfig]] = []

    def enqueue(arm: Arm | None, seed: int, cfg: ExperimentConfig) -> None:
        queue.append((arm, seed, cfg))

    def settle(label: str, seed: int, cfg: ExperimentConfig) -> None:
        run = finished(cfg, records=exp.records)
        if run is None:
            raise RuntimeError(f"{cfg.run_dir}: the run ended without a summary")
        if exp.records is not None:
            keep_record(cfg, exp.records)
        if label == CENTRAL:
            centrals[seed] = run
        else:
            runs[label][seed] = run
        log(f"done: {label} seed {seed} ({run.summary.get('stopped', 'budget')})")
        if label == exp.baseline:
            refs[seed] = references(run)
            for arm in exp.arms:
                if arm.name != exp.baseline:
                    enqueue(arm, seed, arm_config(exp, arm, seed, refs[seed]))

    for seed in exp.seeds:
        enqueue(exp.baseline_arm, seed, arm_config(exp, exp.baseline_arm, seed))
        if exp.central:
            enqueue(None, seed, central_config(exp, seed))
    try:
        while queue or pending:
            while queue and len(pending) < jobs:  # the pool holds no queue of its own
                # arm by arm (the first arms get every seed first), seed by seed
                queue.sort(key=lambda item: (rank[item[0].name if item[0] else CENTRAL], item[1]))
                arm, seed, cfg = queue.pop(0)
                label = arm.name if arm else CENTRAL
                if finished(cfg, records=exp.records) is not None:
                    settle(label, seed, cfg)
                    continue
                args = (
                    cfg.model_dump(mode="json"),
                    arm.simulation if arm else Simulation,
                    arm is None,
                    exp.data_dir,
                    1 if pool else None,
                )
                log(f"start: {label} seed {seed}")
                if pool is None:
                    execute(*args)
                    settle(label, seed, cfg)
                else:
                    pending[pool.submit(execute, *args)] = (label, seed, cfg)
            if pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    fut.result()  # a failed run stops the experiment with its error
                    settle(*pending.pop(fut))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for seed, run in centrals.items():
        refs[seed].central = references(runs[exp.baseline][seed], run).central
    return Results(exp, runs, refs, time.perf_counter() - started)


def load_results(exp: Experiment, *, unfinished: bool = False) -> Results:
    """The finished runs of ``exp`` from disk, nothing run (a partial table); with
    ``unfinished`` also the runs still going, as far as they got (the baseline must
    have finished: it sets the targets). Finished runs found in their folders are
    kept in ``exp.records`` as when run."""
    runs: dict[str, dict[int, Run]] = {a.name: {} for a in exp.arms}
    refs: dict[int, References] = {}

    def load(cfg: ExperimentConfig, unfinished: bool = False) -> Run | None:
        if exp.records is not None:
            keep_record(cfg, exp.records)
        return finished(cfg, unfinished=unfinished, records=exp.records)

    for seed in exp.seeds:
        base = load(arm_config(exp, exp.baseline_arm, seed))
        if base is None:
            continue
        runs[exp.baseline][seed] = base
        central = load(central_config(exp, seed)) if exp.central else None
        refs[seed] = references(base, central)
        for arm in exp.arms:
            run = load(arm_config(exp, arm, seed, refs[seed]), unfinished)
            if arm.name != exp.baseline and run is not None:
                runs[arm.name][seed] = run
    return Results(exp, runs, refs, 0.0)
