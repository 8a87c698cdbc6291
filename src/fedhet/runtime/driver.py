"""The federation driver: the sync, async and hierarchical loops, written once.

The driver owns everything a federation decides — selection and its random
streams, dispatch, arrivals, validation, staleness, evaluation schedule, metrics
rows, logging, progress bar, checkpoints — and nothing of how clients run: that is
the :class:`~fedhet.runtime.executor.Executor`'s (the in-process simulator or a
Flower grid). Strategies are pure (:mod:`fedhet.strategies.base`).

Synchronous round r: the online training clients (``executor.online(r)``) are sampled,
``clients_per_round · (1 + over_selection)`` of them, with the stream ``(seed, 17, r)``;
each selected client then crashes with probability ``executor.dropout`` (same stream;
``federation.dropout`` in simulation, 0 on real nodes). The others' instructions run at
once; in arrival order (duration, then client id) the first ``clients_per_round`` valid
updates are kept, then those later than ``deadline_s`` are dropped (the round then lasts
the deadline). The round lasts as long as its slowest kept client; the others idle.

Asynchronous, in the regime ``federation.regime`` (else ``strategy.regime``):
every online client (``full``) or ``concurrency`` of them (``bounded``, drawn
with ``(seed, 19, 0)``) start in flight; arrivals come in the executor's time
order with staleness τ = version now − version at dispatch, each validated and
handed to ``strategy.on_arrival`` (:meth:`Driver.apply_arrival`). A dispatch is
lost with probability ``dropout`` (stream ``(seed, 23, dispatch)``). After every
arrival but the last, one client is dispatched: in ``full`` the arriving one when
online, else a random idle online client (stream ``(seed, 29, dispatch)``).
Every loop ends at its budget (rounds or arrivals), at the first step whose clock
reaches ``federation.max_virtual_time`` or, with ``eval.stop_at_target``, at the
first evaluation reaching ``eval.target`` (last row: ``stopped``).

Hierarchical round r (mode ``"hier"``): ``strategy.plan_round`` (online clients,
``executor.planner_costs()``) gives each group's members, K_g stages (τ_g intra-group
rounds) and blocks; a group downloads the global adapter over its group ↔ server link,
then K_g times: ``strategy.configure_group`` → the members run (each crashes with
probability ``dropout``, stream ``(seed, 37, r, g, stage)``) → validation →
``strategy.aggregate_group``; a stage lasts as long as its slowest member; last
the group uploads its trained blocks; ``strategy.aggregate_groups`` merges the
groups. Group g's time:

    t_g = 8·|x| / down_G + Σ_{s=1..K_g} max_k t_{k,s} + 8·|x_g| / up_G

and the round lasts as long as its slowest group; group ↔ server bytes count in
``group_bytes_*``; each row's ``groups`` logs τ, d, K, the planned and actual
time and per stage the members, their steps and time (the config refuses
``over_selection`` and ``deadline_s``). Counters: :class:`~fedhet.runtime.progress.RunProgress`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from itertools import islice
from typing import Any

import numpy as np

from fedhet.client.evaluate import reaches, result_key
from fedhet.config import ExperimentConfig, dump_config
from fedhet.model.base import base_model_reference
from fedhet.model.lora import AdapterState, save_adapter, select_layers, state_bytes
from fedhet.protocol import ClientInfo, ClientUpdate, GroupResult
from fedhet.reports.summary import write_outputs
from fedhet.runtime.checkpoint import load_latest, save_checkpoint, truncate_rows
from fedhet.runtime.executor import ClientRun, Executor, round_event, stage_event
from fedhet.runtime.progress import RunProgress, RunResult, brief, pace, progress_bar
from fedhet.runtime.validation import validate_update
from fedhet.strategies.base import Strategy

_log = logging.getLogger(__name__)


class Driver:
    """Runs one experiment's federation over an executor (module docstring)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        strategy: Strategy,
        executor: Executor,
        *,
        show_progress: bool = False,
        log: logging.Logger = _log,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.executor = executor
        self.show_progress = show_progress
        self.log = log
        self.run_dir = cfg.run_dir
        self.progress = RunProgress()
        self.metrics: list[dict[str, Any]] = []
        self.global_state: AdapterState = {}
        self.infos: dict[int, ClientInfo] = {}
        self.total: int | None = None  # rounds or arrivals of the run (the log's ETA)
        self.regime = cfg.federation.regime or strategy.regime  # async (module docstring)
        strategy.horizon = None if strategy.mode == "async" else cfg.federation.rounds
        self._wall_start = time.perf_counter()

    # ------------------------------------------------------------------ run
    def run(self, init_state: AdapterState, *, resume: bool = False) -> RunResult:
        """The whole run from ``init_state`` (or from the newest checkpoint)."""
        infos = self.start()
        restored = resume and self._restore(init_state, infos)
        if not restored:
            (self.run_dir / "metrics.jsonl").write_text("")
            self.global_state = self.strategy.initialize(dict(init_state), infos)
            self.log_row(self.evaluate_row({"step": 0}))
        self._wall_start = time.perf_counter() - self.progress.wall_offset
        mode = self.strategy.mode
        fed = self.cfg.federation
        total = self.total = fed.max_arrivals if mode == "async" else fed.rounds
        at_target = self.cfg.eval.stop_at_target and self.progress.time_to_target is not None
        ended = restored and (self._budget_stop() is not None or at_target)
        loop = {"sync": self._run_sync, "async": self._run_async, "hier": self._run_hier}[mode]
        try:
            with progress_bar(self.cfg, total, show=self.show_progress) as advance:
                advance(self.progress.step)
                if not ended:  # a resumed run may have met its stop already
                    loop(total, advance)
        finally:
            self.executor.close()
        return self.finish()

    def start(self) -> list[ClientInfo]:
        """Connect the executor and write the run's config."""
        infos = self.executor.connect()
        self.infos = {info.client_id: info for info in infos}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run_dir / "config.yaml")
        self._wall_start = time.perf_counter()
        return infos

    # --------------------------------------------------------------- sync
    def _run_sync(self, rounds: int, advance) -> None:
        fed = self.cfg.federation
        p = self.progress
        for rnd in range(p.step + 1, rounds + 1):
            t0 = time.perf_counter()
            online = np.array(self.executor.online(rnd), dtype=int)
            rng = np.random.default_rng([self.cfg.seed, 17, rnd])
            k = min(fed.clients_per_round, len(online))
            n_sel = min(len(online), math.ceil(k * (1 + fed.over_selection)))
            selected = sorted(rng.choice(online, n_sel, replace=False).tolist()) if k else []
            crashed = {c for c in selected if rng.random() < self.executor.dropout}
            instructions = self.strategy.configure(rnd, self.global_state, selected)
            jobs = [(inst, round_event(rnd, inst.client_id)) for inst in instructions]
            jobs = [job for job in jobs if job[0].client_id not in crashed]
            all_runs, train_s = self._execute(jobs, deadline=fed.deadline_s)
            faults = {str(r.client_id): r.fault for r in all_runs if r.fault}
            rejections: dict[str, str] = {}
            arrived = (r for r in all_runs if r.arrived)
            runs = sorted(arrived, key=lambda r: (r.duration, r.client_id))
            kept = list(islice((r for r in runs if self._accept(r, rejections)), k))
            round_time = kept[-1].duration if kept else 0.0
            if any(r.fault == "timeout" for r in all_runs):  # the server waited the deadline
                round_time = max(round_time, fed.deadline_s or 0.0)
            if fed.deadline_s is not None:
                on_time = [r for r in kept if r.duration <= fed.deadline_s]
                if len(on_time) < len(kept):
                    round_time = fed.deadline_s
                kept = on_time
            p.dropped += len(selected) - len(kept) - len(rejections)
            updates = [r.update for r in kept if r.update is not None]
            if updates:
                self.global_state = self.strategy.aggregate(rnd, self.global_state, updates)
                p.version += 1
                p.updates_applied += len(updates)
            for r in runs:
                p.bytes_up += r.bytes_up
            self._account(runs, round_time)
            p.clock += round_time
            p.step = rnd
            losses = [u.metrics["train_loss"] for u in updates]
            row = self._round_row(len(updates), losses, round_time, t0, train_s)
            row |= {"faults": faults, "rejections": rejections}
            row["update_span"] = [runs[0].duration, runs[-1].duration] if runs else None
            if self._end_step(row, advance):
                break

    def _execute(
        self, jobs: list[tuple[Any, int]], *, deadline: float | None = None
    ) -> tuple[list[ClientRun], float]:
        """Run jobs on the executor (bytes down counted); returns the runs and the
        wall seconds the executor took."""
        for inst, _ in jobs:
            inst.version = self.progress.version
            self.progress.bytes_down += state_bytes(inst.state)
        started = time.perf_counter()
        runs = self.executor.execute(jobs, deadline=deadline) if jobs else []
        return runs, time.perf_counter() - started

    # -------------------------------------------------------------- async
    def _run_async(self, max_arrivals: int, advance) -> None:
        fed = self.cfg.federation
        p = self.progress
        if p.step == 0 and not self.executor.in_flight():
            online = np.array(self.executor.online(0), dtype=int)
            rng = np.random.default_rng([self.cfg.seed, 19, 0])
            n = len(online) if self.regime == "full" else min(fed.concurrency, len(online))
            first = rng.choice(online, n, replace=False)
            self._dispatch(sorted(int(c) for c in first))  # together: one lockstep group
        while p.step < max_arrivals and self.executor.in_flight():
            t0 = time.perf_counter()
            arrival = self.executor.next_arrival()
            waited = time.perf_counter() - t0
            run, cid = arrival.run, arrival.run.client_id
            p.clock = arrival.time
            p.last_finish[cid] = arrival.time
            p.step += 1
            p.busy_time += run.duration
            row: dict[str, Any] = {"step": p.step, "arrival": p.step, "client": cid}
            row["update_span"] = [run.duration, run.duration]
            row["faults"] = {str(cid): run.fault} if run.fault else {}
            row["rejections"] = {}
            if arrival.lost or not run.arrived:
                p.dropped += 1
            else:
                p.bytes_up += run.bytes_up
                if self._accept(run, row["rejections"]) and run.update is not None:
                    self.global_state, arrived = self.apply_arrival(self.global_state, run.update)
                    row |= arrived
            row["version"] = p.version
            row["train_s"] = waited
            row["overhead_s"] = time.perf_counter() - t0 - waited
            if self._end_step(row, advance, redispatch=cid):
                break

    def apply_arrival(
        self, state: AdapterState, update: ClientUpdate
    ) -> tuple[AdapterState, dict[str, Any]]:
        """One validated asynchronous arrival: stamp its staleness τ = version − start
        version, hand it to ``strategy.on_arrival``, keep the books (a held update
        counts as applied when the strategy next moves the model); returns the new
        global state and the row's fields."""
        p = self.progress
        update.staleness = p.version - update.version
        new_state = self.strategy.on_arrival(state, update)
        if new_state is None:
            p.held += 1
        else:
            state = new_state
            p.version += 1
            p.updates_applied += 1 + p.held
            p.held = 0
        return state, {
            "staleness": update.staleness,
            "train_loss": update.metrics["train_loss"],
            "applied": new_state is not None,
        }

    def _dispatch(self, cids: list[int]) -> float:
        """Start ``cids`` now (one submission); returns the idle time of the last
        since its last arrival."""
        p = self.progress
        jobs = []
        for cid in cids:
            p.dispatches += 1
            event = p.dispatches
            idle = p.clock - p.last_finish.pop(cid, p.clock)
            p.idle_time += idle
            inst = self.strategy.configure(p.version, self.global_state, [cid])[0]
            inst.version = p.version
            p.bytes_down += state_bytes(inst.state)
            dropout = self.executor.dropout
            lost = bool(np.random.default_rng([self.cfg.seed, 23, event]).random() < dropout)
            jobs.append((inst, event, lost))
        self.executor.submit(jobs, p.clock)
        return idle

    def _redispatch(self, arrived: int) -> tuple[int, float]:
        """Keep ``concurrency`` clients in flight (module docstring); returns the
        client dispatched and its idle time."""
        p = self.progress
        online = self.executor.online(p.dispatches + 1)
        if self.regime == "full" and arrived in online:
            return arrived, self._dispatch([arrived])
        p.last_finish.pop(arrived, None)  # released: free, not idle
        busy = self.executor.in_flight()
        idle = [c for c in online if c not in busy] or [arrived]
        rng = np.random.default_rng([self.cfg.seed, 29, p.dispatches])
        chosen = int(rng.choice(idle))
        return chosen, self._dispatch([chosen])

    # -------------------------------------------------------- hierarchical
    def _run_hier(self, rounds: int, advance) -> None:
        p, strategy = self.progress, self.strategy
        cost = self.executor.planner_costs()
        for rnd in range(p.step + 1, rounds + 1):
            t0 = time.perf_counter()
            train_s = 0.0
            results: list[GroupResult] = []
            groups: dict[str, dict[str, Any]] = {}
            times: dict[int, float] = {}
            losses: list[float] = []
            faults: dict[str, str] = {}
            rejections: dict[str, str] = {}
            applied = 0
            for plan in strategy.plan_round(rnd, self.executor.online(rnd), cost):
                group_state = dict(self.global_state)
                down = state_bytes(group_state)
                p.group_bytes_down += down
                elapsed = 8 * down / cost.group_down_bps
                contributors: set[int] = set()
                stages = []
                for stage in range(plan.stages):
                    crash = np.random.default_rng([self.cfg.seed, 37, rnd, plan.group, stage])
                    jobs = []
                    for inst in strategy.configure_group(rnd, plan, stage, group_state):
                        if crash.random() < self.executor.dropout:
                            p.dropped += 1
                        else:
                            jobs.append((inst, stage_event(rnd, stage, inst.client_id)))
                    runs, seconds = self._execute(jobs)
                    train_s += seconds
                    faults |= {str(r.client_id): r.fault for r in runs if r.fault}
                    p.dropped += sum(not r.arrived for r in runs)
                    runs = [r for r in runs if r.arrived]
                    accepted = []
                    for r in runs:
                        p.bytes_up += r.bytes_up
                        if self._accept(r, rejections) and r.update is not None:
                            r.update.metrics["duration"] = r.duration
                            accepted.append(r.update)
                    stage_time = max((r.duration for r in runs), default=0.0)
                    self._account(runs, stage_time)
                    group_state = strategy.aggregate_group(plan, stage, group_state, accepted)
                    contributors |= {u.client_id for u in accepted}
                    losses += [u.metrics["train_loss"] for u in accepted]
                    applied += len(accepted)
                    elapsed += stage_time
                    steps = [int(r.update.metrics["steps"]) for r in runs if r.update]
                    members = [r.client_id for r in runs]
                    stages.append({"members": members, "steps": steps, "time": stage_time})
                if contributors:
                    upload = select_layers(group_state, plan.layers)
                    p.group_bytes_up += state_bytes(upload)
                    elapsed += 8 * state_bytes(upload) / cost.group_up_bps
                    size = sum(self.infos[c].num_samples for c in contributors)
                    results.append(GroupResult(plan.group, upload, size, list(plan.layers)))
                times[plan.group] = elapsed
                groups[str(plan.group)] = {
                    **{"tau": plan.tau, "depth": plan.depth, "stages": plan.stages},
                    **{"members": list(plan.members), "planned_time": plan.planned_time},
                    **{"time": elapsed, "stage_log": stages},
                }
            round_time = max(times.values(), default=0.0)
            for g, elapsed in times.items():
                p.idle_time += (round_time - elapsed) * len(groups[str(g)]["members"])
            if results:
                self.global_state = strategy.aggregate_groups(rnd, self.global_state, results)
                p.version += 1
                p.updates_applied += applied
            p.clock += round_time
            p.step = rnd
            ran = {c for g in groups.values() for s in g["stage_log"] for c in s["members"]}
            row = self._round_row(len(ran), losses, round_time, t0, train_s)
            row |= {"group_bytes_up": p.group_bytes_up, "group_bytes_down": p.group_bytes_down}
            row |= {"groups": groups, "faults": faults, "rejections": rejections}
            if self._end_step(row, advance):
                break

    # ----------------------------------------------------------- each step
    def _account(self, runs: list[ClientRun], span: float) -> None:
        """Busy and idle time of clients that ran within a span of ``span`` seconds."""
        for r in runs:
            self.progress.busy_time += min(r.duration, span)
            self.progress.idle_time += max(0.0, span - r.duration)

    def _round_row(
        self, clients: int, losses: list[float], round_time: float, t0: float, train_s: float
    ) -> dict[str, Any]:
        """The common fields of a sync or hierarchical round's row."""
        return {
            "step": self.progress.step,
            "round": self.progress.step,
            "clients": clients,
            "train_loss": float(np.mean(losses)) if losses else None,
            "round_time": round_time,
            "overhead_s": time.perf_counter() - t0 - train_s,
            "train_s": train_s,
        }

    def _accept(self, run: ClientRun, rejections: dict[str, str]) -> bool:
        """Validate an arrived update (:mod:`fedhet.runtime.validation`); a
        rejected one is counted and its reason recorded under its client id."""
        fed = self.cfg.federation
        reason = run.rejection or validate_update(
            run.update,
            run.expected,
            version=self.progress.version,
            max_staleness=fed.max_staleness,
            max_norm=fed.max_update_norm,
        )
        if reason is not None:
            self.progress.rejected += 1
            rejections[str(run.client_id)] = reason
            self.log.warning("rejected the update of client %d: %s", run.client_id, reason)
        return reason is None

    def _budget_stop(self) -> str | None:
        """``budget`` when the run's rounds or arrivals are spent, ``time`` when the
        clock reached ``federation.max_virtual_time``, else None."""
        limit, p = self.cfg.federation.max_virtual_time, self.progress
        timed_out = limit is not None and p.clock >= limit
        return "budget" if p.step >= (self.total or 0) else ("time" if timed_out else None)

    def _end_step(self, row: dict[str, Any], advance, redispatch: int | None = None) -> bool:
        """Close a round or arrival: evaluate when due, dispatch the next client
        (async: ``redispatch`` is the arrived one) unless the run ends here, log the
        row, checkpoint when due, advance the progress bar; returns whether it ends."""
        step, stop = self.progress.step, self._budget_stop()
        if evaluated := step % self.cfg.eval.every == 0 or stop is not None:
            row = self.evaluate_row(row, final=stop is not None)
        reached = self.progress.time_to_target is not None
        if stop is None and evaluated and self.cfg.eval.stop_at_target and reached:
            stop = "target"
        if stop is None and redispatch is not None:
            started = time.perf_counter()
            row["dispatched"], row["idle"] = self._redispatch(redispatch)
            row["train_s"] += time.perf_counter() - started
        if stop:
            row["stopped"] = stop
        self.log_row(row)
        if self.executor.resumable and (step % self.cfg.federation.checkpoint_every == 0 or stop):
            self.checkpoint()
        advance(step)
        return stop is not None

    def evaluate_row(self, row: dict[str, Any], *, final: bool = False) -> dict[str, Any]:
        """``row`` with the executor's evaluation of the global state (``final``:
        the run's last); records the first time the global metric reaches
        ``eval.target``."""
        t0 = time.perf_counter()
        row |= self.executor.evaluate(self.strategy, self.global_state, final=final)
        row["eval_s"] = time.perf_counter() - t0
        key = self.cfg.eval.primary or result_key(self.cfg.eval.metric)
        reached = reaches(key, row.get(f"global_{key}"), self.cfg.eval.target)
        if reached and self.progress.time_to_target is None:
            self.progress.time_to_target = self.progress.clock
        return row

    def log_row(self, row: dict[str, Any]) -> None:
        """Complete ``row`` with the run's counters and append it to metrics.jsonl."""
        p = self.progress
        if self.executor.virtual:
            row["virtual_time"] = p.clock
        row |= {
            "wall_time": time.perf_counter() - self._wall_start,
            "version": p.version,
            "bytes_up": p.bytes_up,
            "bytes_down": p.bytes_down,
            "updates_applied": p.updates_applied,
            "dropped": p.dropped,
            "rejected": p.rejected,
            "idle_fraction": p.idle_time / max(1e-12, p.idle_time + p.busy_time),
            **self.strategy.metrics(),
        }
        self.metrics.append(row)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        p.metrics_lines += 1
        self.log.info("%s: %s", pace(p.step, self.total, row["wall_time"]), brief(row))

    # ---------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        """Write the run's state atomically (driver, strategy and executor)."""
        p = self.progress
        p.wall_offset = time.perf_counter() - self._wall_start
        save_checkpoint(
            self.run_dir / "checkpoints",
            p.step,
            {
                "progress": p,
                "global_state": self.global_state,
                "strategy": self.strategy.state_dict(),
                "executor": self.executor.state_dict(),
            },
        )

    def _restore(self, init_state: AdapterState, infos: list[ClientInfo]) -> bool:
        payload = load_latest(self.run_dir / "checkpoints")
        if payload is None:
            return False
        self.progress = payload["progress"]
        self.global_state = payload["global_state"]
        self.strategy.initialize(dict(init_state), infos)
        self.strategy.load_state_dict(payload["strategy"])
        self.executor.load_state_dict(payload["executor"])
        self.metrics = truncate_rows(self.run_dir / "metrics.jsonl", self.progress.metrics_lines)
        return True

    # -------------------------------------------------------------- outputs
    def finish(self) -> RunResult:
        """Write the final adapter (a PEFT folder), metrics.csv and summary.md."""
        final = self.strategy.evaluation_state(self.global_state)
        base = base_model_reference(self.cfg.model.name)
        save_adapter(final, self.run_dir / "final_adapter", self.cfg.lora, base)
        summary = write_outputs(self.run_dir, self.cfg, self.metrics, self.progress.time_to_target)
        return RunResult(final, self.metrics, summary, self.run_dir)
