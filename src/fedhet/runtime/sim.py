"""The in-process simulator: one frozen base model, many clients, a virtual clock.

A client is its data (encoded once), its device profile, for strategies
that keep local tensors its last adapter state, and its cache (a dict its local
update keeps between participations, e.g. Fisher scores; checkpointed). Running a client loads its
start state into the one shared :class:`~fedhet.model.lora.LoraModel` (tensor
copies, never a model copy), trains, and reads the adapter back.

Time is virtual. A client's update lasts (see :mod:`fedhet.devices.profiles`)

    t_k = tokens_k · F_train / speed_k · u_k + bytes_down / down_k + bytes_up / up_k

with ``F_train = F_fwd · (1 + 2·f)``, ``f`` the fraction of blocks that are
backpropagated (all blocks from the lowest trainable one to the output).

* Synchronous: a round lasts as long as its slowest kept client (or the
  deadline when someone missed it); the others idle meanwhile.
* Asynchronous: ``concurrency`` clients are in flight; arrivals are delivered
  in virtual-time order with staleness τ = version now − version at dispatch.
  A client's training runs when it is dispatched (its start state is fixed
  then), and its update is delivered at its virtual finish time. After each
  arrival one client is dispatched: the arriving one when the restart policy
  says so and it is online, else a random idle online client.

Idle time is a client's wait between delivering an update and starting the
next one the server has kept it for: until the round ends (sync), until its
re-dispatch (async). A client the server releases (not re-dispatched when it
arrives, or not selected next round) is not idle, it is free.

Reproducibility: every random choice draws from a generator seeded by
``(seed, purpose, event)``, never from a running stream, so a resumed run makes
exactly the choices of an uninterrupted one. Checkpoints are written after every
``checkpoint_every`` rounds (arrivals) and ``resume=True`` continues from the
newest valid one.

Reliability: every arriving update is validated against what its client was
asked for (:mod:`fedhet.strategies.validation`) before the strategy sees it; a
rejected one is counted (``rejected``) with its reason in the row's
``rejections``. The config's ``faults`` make chosen clients misbehave
(:mod:`fedhet.runtime.faults`); each row lists them under ``faults``.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedhet.client.evaluate import evaluate, result_key
from fedhet.client.train import TrainPlan, local_update, make_upload
from fedhet.config import ExperimentConfig, dump_config
from fedhet.data.encode import Example, encode
from fedhet.data.federated import FederatedData, build_federated_data
from fedhet.devices.profiles import load_fleet
from fedhet.errors import FedhetError
from fedhet.model.base import load_base_model, model_info
from fedhet.model.lora import AdapterState, LoraModel, save_adapter, state_bytes
from fedhet.runtime.checkpoint import load_latest, save_checkpoint
from fedhet.runtime.faults import FaultInjector
from fedhet.runtime.hierarchy import run_hier
from fedhet.strategies import build_strategy
from fedhet.strategies.base import ClientInfo, ClientUpdate, Instruction, Strategy
from fedhet.strategies.validation import UpdateSpec, expected_update, validate_update

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ClientRun:
    """One executed local update, as the runtime sees it: ``expected`` is what the
    server asked for (validated at arrival), ``fault`` the injected fault, if any."""

    update: ClientUpdate
    duration: float
    bytes_down: int
    bytes_up: int
    expected: UpdateSpec
    fault: str | None = None


@dataclass
class RunResult:
    state: AdapterState
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path


@dataclass
class _Progress:
    """Everything that changes during a run (checkpointed as a whole)."""

    step: int = 0  # rounds done (sync) or arrivals delivered (async)
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
    in_flight: list[tuple] = field(default_factory=list)


class Simulation:
    """Runs one experiment config in-process (see the module docstring)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        data_dir: str | Path | None = None,
        base: tuple[torch.nn.Module, Any] | None = None,
        fed: FederatedData | None = None,
        show_progress: bool = False,
    ) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.show_progress = show_progress
        model, self.tokenizer = base or load_base_model(
            cfg.model.name, dtype=_DTYPES[cfg.model.dtype], device=cfg.model.device
        )
        self.fed = fed or build_federated_data(cfg.data, data_dir=data_dir)
        self.num_clients = len(self.fed.clients)
        self.num_training = self.num_clients - cfg.eval.unseen_clients
        if self.num_training < 1:
            raise FedhetError(
                f"eval.unseen_clients={cfg.eval.unseen_clients} leaves no client to train "
                f"({self.num_clients} clients)"
            )
        self.pad_id = self.tokenizer.pad_token_id
        self.examples = [
            encode(c.train, self.tokenizer, cfg.data.max_length) for c in self.fed.clients
        ]
        self.fleet = load_fleet(cfg.fleet.name, self.num_clients, cfg.seed)
        self.flops_per_token = model_info(model)["flops_per_token"]
        self.lm = LoraModel(model, cfg.lora, seed=cfg.seed)
        self.init_state = self.lm.init_state(cfg.seed, rank=cfg.lora.rank)
        self.strategy = build_strategy(cfg.strategy.name, cfg.strategy.params)
        self.infos = [  # the training clients only: unseen ones are never configured
            ClientInfo(
                client_id=c.client_id,
                num_samples=len(c.train),
                flops=self.fleet[c.client_id].speed,
                memory_bytes=self.fleet[c.client_id].memory_bytes,
                histogram=self.fed.category_histogram(c.client_id),
            )
            for c in self.fed.clients[: self.num_training]
        ]
        self.base_plan = TrainPlan(**cfg.train.model_dump())
        self.faults = FaultInjector(cfg.faults, self.num_training, cfg.seed)
        self.client_states: dict[int, AdapterState] = {}
        # Client-side caches (e.g. FibecFed's Fisher scores): one dict per client,
        # owned by the client's local update, kept here and checkpointed.
        self.client_cache: dict[int, dict[str, Any]] = {}
        self.global_state: AdapterState = {}
        self.progress = _Progress()
        self.metrics: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ run
    def run(self, *, resume: bool = False) -> RunResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run_dir / "config.yaml")
        metrics_path = self.run_dir / "metrics.jsonl"
        restored = resume and self._restore()
        if not restored:
            metrics_path.write_text("")
            self.global_state = self.strategy.initialize(dict(self.init_state), self.infos)
            self._log(self._evaluate({"step": 0}))
        started = time.perf_counter() - self.progress.wall_offset
        self._wall_start = started
        total = (
            self.cfg.federation.rounds
            if self.strategy.mode != "async"
            else self.cfg.federation.max_arrivals
        )
        with self._progress_bar(total) as (bar, task):
            bar.update(task, completed=self.progress.step)
            if self.strategy.mode == "sync":
                self._run_sync(total, bar, task)
            elif self.strategy.mode == "hier":
                run_hier(self, total, bar, task)
            else:
                self._run_async(total, bar, task)
        return self._finish()

    def run_central(self, *, every_chunk: bool = True) -> RunResult:
        """The centralised upper bound: one adapter trained on the union of the
        clients' training data, seeing as many samples as the federated run
        (rounds × clients per round × local steps × batch, or arrivals × local
        steps × batch for asynchronous strategies). Training is cut into as many
        chunks as the federated run has evaluation points, each with a fresh
        AdamW (as a client's update has), and evaluated after each chunk
        (``every_chunk``) or only before the first and after the last (a reference
        point needs only the final figure; training is the same either way).
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run_dir / "config.yaml")
        (self.run_dir / "metrics.jsonl").write_text("")
        fed, ev = self.cfg.federation, self.cfg.eval
        if self.strategy.mode == "sync":
            updates, chunks = fed.rounds * fed.clients_per_round, fed.rounds
        else:
            updates, chunks = fed.max_arrivals, math.ceil(fed.max_arrivals / ev.every)
        steps = max(1, round(updates * self.cfg.train.steps / chunks))
        union = [e for client in self.examples for e in client]
        self.global_state = dict(self.init_state)
        self._wall_start = time.perf_counter()
        self._log(self._evaluate({"step": 0}))
        for chunk in range(1, chunks + 1):
            plan = self.base_plan.with_overrides(
                {"steps": steps, "seed": _seed(self.cfg.seed, 5, chunk)}
            )
            result = local_update(self.lm, union, self.global_state, plan, pad_id=self.pad_id)
            self.global_state = result.state
            self.progress.step = chunk
            row = {"step": chunk, "train_loss": result.metrics["train_loss"]}
            self._log(self._evaluate(row) if every_chunk or chunk == chunks else row)
        return self._finish()

    # ------------------------------------------------------------- one client
    def run_client(self, inst: Instruction, event: int) -> ClientRun:
        """Execute one instruction on the shared model; event seeds its draws."""
        cid = inst.client_id
        update, trained, plan = run_instruction(
            self.lm,
            self.examples[cid],
            inst,
            self.client_states.get(cid, self.init_state),
            self.base_plan,
            seed=_seed(self.cfg.seed, 3, event, cid),
            pad_id=self.pad_id,
            cache=self.client_cache.setdefault(cid, {}),
        )
        expected = expected_update(
            cid,
            {**self.client_states.get(cid, self.init_state), **inst.state},
            upload_keys=plan.upload_keys,
            kind=plan.send,
            num_samples=len(self.examples[cid]),
        )
        if self.strategy.keeps_local_state or self.cfg.federation.keep_client_states:
            self.client_states[cid] = trained
        bytes_down, bytes_up = state_bytes(inst.state), state_bytes(update.state)
        update, fault = self.faults.apply(update, expected, event)
        duration = self.fleet[cid].duration(
            update.metrics["tokens"] * self._train_flops_per_token(plan),
            bytes_down,
            bytes_up,
            self.fleet.slowdown(cid, event),
        )
        return ClientRun(update, duration, bytes_down, bytes_up, expected, fault)

    def _train_flops_per_token(self, plan: TrainPlan) -> float:
        layers = plan.trainable_layers
        lowest = 0 if layers is None or not len(layers) else min(layers)
        depth_fraction = (self.lm.num_layers - lowest) / self.lm.num_layers
        return self.flops_per_token * (1 + 2 * depth_fraction)

    def _accept(self, run: ClientRun, rejections: dict[str, str]) -> bool:
        """Validate an arriving update (:mod:`fedhet.strategies.validation`); a
        rejected one is counted and its reason recorded under its client id."""
        fed = self.cfg.federation
        reason = validate_update(
            run.update,
            run.expected,
            version=self.progress.version,
            max_staleness=fed.max_staleness,
            max_norm=fed.max_update_norm,
        )
        if reason is not None:
            self.progress.rejected += 1
            rejections[str(run.expected.client_id)] = reason
        return reason is None

    # --------------------------------------------------------------- sync
    def _run_sync(self, rounds: int, bar, task) -> None:
        fed = self.cfg.federation
        p = self.progress
        for rnd in range(p.step + 1, rounds + 1):
            t0 = time.perf_counter()
            online = np.flatnonzero(self.fleet.online(rnd)[: self.num_training])
            rng = np.random.default_rng([self.cfg.seed, 17, rnd])
            k = min(fed.clients_per_round, len(online))
            n_sel = min(len(online), math.ceil(k * (1 + fed.over_selection)))
            selected = sorted(rng.choice(online, n_sel, replace=False).tolist()) if k else []
            crashed = {c for c in selected if rng.random() < fed.dropout}
            instructions = self.strategy.configure(rnd, self.global_state, selected)
            runs: list[ClientRun] = []
            faults: dict[str, str] = {}
            rejections: dict[str, str] = {}
            train_wall = 0.0
            for inst in instructions:
                if inst.client_id in crashed:
                    continue
                inst.version = p.version
                t_train = time.perf_counter()
                run = self.run_client(inst, _event(rnd, inst.client_id))
                train_wall += time.perf_counter() - t_train
                if run.fault:
                    faults[str(inst.client_id)] = run.fault
                if run.fault != "crash":
                    runs.append(run)
            runs.sort(key=lambda r: (r.duration, r.update.client_id))
            kept = list(islice((r for r in runs if self._accept(r, rejections)), k))
            round_time = kept[-1].duration if kept else 0.0
            if fed.deadline_s is not None:
                on_time = [r for r in kept if r.duration <= fed.deadline_s]
                if len(on_time) < len(kept):
                    round_time = fed.deadline_s
                kept = on_time
            p.dropped += len(selected) - len(kept) - len(rejections)
            if kept:
                self.global_state = self.strategy.aggregate(
                    rnd, self.global_state, [r.update for r in kept]
                )
                p.version += 1
                p.updates_applied += len(kept)
            for r in runs:
                p.bytes_down += r.bytes_down
                p.bytes_up += r.bytes_up
                p.busy_time += min(r.duration, round_time)
                p.idle_time += max(0.0, round_time - r.duration)
            p.clock += round_time
            p.step = rnd
            overhead = time.perf_counter() - t0 - train_wall
            row = {
                "step": rnd,
                "round": rnd,
                "clients": len(kept),
                "train_loss": _mean_loss([r.update for r in kept]),
                "round_time": round_time,
                "overhead_s": overhead,
                "train_s": train_wall,
                "faults": faults,
                "rejections": rejections,
            }
            self._end_step(row, rnd == rounds, bar, task)

    # -------------------------------------------------------------- async
    def _run_async(self, max_arrivals: int, bar, task) -> None:
        fed = self.cfg.federation
        p = self.progress
        if not p.in_flight and p.step == 0:
            online = np.flatnonzero(self.fleet.online(0)[: self.num_training])
            rng = np.random.default_rng([self.cfg.seed, 19, 0])
            first = rng.choice(online, min(fed.concurrency, len(online)), replace=False)
            for cid in sorted(first.tolist()):
                self._dispatch(int(cid))
        while p.step < max_arrivals and p.in_flight:
            finish, _, cid, crashed, run = heapq.heappop(p.in_flight)
            p.clock = finish
            p.last_finish[cid] = finish
            p.step += 1
            row: dict[str, Any] = {"step": p.step, "arrival": p.step, "client": cid}
            row["faults"] = {str(cid): run.fault} if run.fault else {}
            row["rejections"] = {}
            if crashed:
                p.dropped += 1
            elif self._accept(run, row["rejections"]):
                self.global_state, arrived = apply_arrival(
                    self.strategy, self.global_state, run.update, p
                )
                row |= arrived
            row["version"] = p.version
            row["dispatched"], row["idle"] = self._redispatch(cid)
            self._end_step(row, p.step == max_arrivals, bar, task)

    def _end_step(self, row: dict[str, Any], last: bool, bar, task) -> None:
        """Close a round or arrival (every loop): evaluate when due, log the row,
        checkpoint when due, advance the progress bar."""
        step = self.progress.step
        if step % self.cfg.eval.every == 0 or last:
            row = self._evaluate(row)
        self._log(row)
        if step % self.cfg.federation.checkpoint_every == 0 or last:
            self._checkpoint()
        bar.update(task, completed=step)

    def _dispatch(self, cid: int) -> float:
        """Start ``cid`` now; returns its idle time since its last arrival."""
        p = self.progress
        p.dispatches += 1
        event = p.dispatches
        idle = p.clock - p.last_finish.pop(cid, p.clock)
        p.idle_time += idle
        inst = self.strategy.configure(p.version, self.global_state, [cid])[0]
        inst.version = p.version
        crashed = bool(
            np.random.default_rng([self.cfg.seed, 23, event]).random() < self.cfg.federation.dropout
        )
        run = self.run_client(inst, event)
        crashed = crashed or run.fault == "crash"
        p.bytes_down += run.bytes_down
        p.bytes_up += 0 if crashed else run.bytes_up
        p.busy_time += run.duration
        heapq.heappush(p.in_flight, (p.clock + run.duration, event, cid, crashed, run))
        return idle

    def _redispatch(self, arrived: int) -> tuple[int, float]:
        """Keep ``concurrency`` clients in flight (see FederationConfig.restart);
        returns the client dispatched and its idle time."""
        p = self.progress
        online = self.fleet.online(p.dispatches + 1)
        restart = self.cfg.federation.restart == "same" or self.strategy.restart_same_client
        if restart and online[arrived]:
            return arrived, self._dispatch(arrived)
        p.last_finish.pop(arrived, None)  # released: free, not idle
        busy = {entry[2] for entry in p.in_flight}
        idle = [c for c in range(self.num_training) if c not in busy and online[c]]
        if not idle:
            idle = [arrived]
        rng = np.random.default_rng([self.cfg.seed, 29, p.dispatches])
        chosen = int(rng.choice(idle))
        return chosen, self._dispatch(chosen)

    # ---------------------------------------------------------- evaluation
    def _evaluate(self, row: dict[str, Any]) -> dict[str, Any]:
        ev = self.cfg.eval
        t0 = time.perf_counter()
        model = self.lm.model
        self.lm.load_state(self.strategy.evaluation_state(self.global_state))
        glob = evaluate(
            model,
            self.tokenizer,
            self.fed.global_test[: ev.global_size],
            ev.metric,
            max_length=self.cfg.data.max_length,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
        )
        row |= {f"global_{k}": v for k, v in glob.items()}
        per_client: dict[str, float] = {}
        local_loss: list[float] = []
        key = result_key(ev.metric)
        for c in self.fed.clients[: ev.local_clients]:
            if not c.test:
                continue
            self.lm.load_state(
                self.strategy.evaluation_state(
                    self.global_state, self.client_states.get(c.client_id)
                )
            )
            res = evaluate(
                model,
                self.tokenizer,
                c.test[: ev.local_size],
                ev.metric,
                max_length=self.cfg.data.max_length,
                batch_size=ev.batch_size,
                max_new_tokens=ev.max_new_tokens,
            )
            per_client[str(c.client_id)] = res[key]
            local_loss.append(res["loss"])
        if per_client:
            values = np.array(list(per_client.values()))
            row |= {
                f"local_{key}_mean": float(values.mean()),
                f"local_{key}_std": float(values.std()),
                "local_loss_mean": float(np.mean(local_loss)),
                "local_loss_std": float(np.std(local_loss)),
                "local_per_client": per_client,
            }
        unseen = self.fed.clients[self.num_training :]
        if unseen:
            self.lm.load_state(self.strategy.evaluation_state(self.global_state))
            results = [
                evaluate(
                    model,
                    self.tokenizer,
                    (c.train + c.test)[: ev.local_size],
                    ev.metric,
                    max_length=self.cfg.data.max_length,
                    batch_size=ev.batch_size,
                    max_new_tokens=ev.max_new_tokens,
                )
                for c in unseen
            ]
            for name in dict.fromkeys((key, "loss")):
                scores = [res[name] for res in results]
                row |= {
                    f"unseen_{name}_mean": float(np.mean(scores)),
                    f"unseen_{name}_std": float(np.std(scores)),
                }
        row["eval_s"] = time.perf_counter() - t0
        target = ev.target
        if target is not None and self.progress.time_to_target is None and key in glob:
            reached = glob[key] <= target if key == "loss" else glob[key] >= target
            if reached:
                self.progress.time_to_target = self.progress.clock
        return row

    # ------------------------------------------------------------- logging
    def _log(self, row: dict[str, Any]) -> None:
        p = self.progress
        row |= {
            "virtual_time": p.clock,
            "wall_time": time.perf_counter() - getattr(self, "_wall_start", time.perf_counter()),
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

    def _progress_bar(self, total: int):
        bar = Progress(
            TextColumn(f"[bold]{self.cfg.name}[/] {self.cfg.strategy.name}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not self.show_progress,
        )

        class _Ctx:
            def __enter__(self_inner):
                bar.start()
                return bar, bar.add_task("run", total=total)

            def __exit__(self_inner, *exc):
                bar.stop()

        return _Ctx()

    # ---------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        p = self.progress
        p.wall_offset = time.perf_counter() - self._wall_start
        save_checkpoint(
            self.run_dir / "checkpoints",
            p.step,
            {
                "progress": p,
                "global_state": self.global_state,
                "client_states": self.client_states,
                "client_cache": self.client_cache,
                "strategy": self.strategy.state_dict(),
            },
        )

    def _restore(self) -> bool:
        payload = load_latest(self.run_dir / "checkpoints")
        if payload is None:
            return False
        self.progress = payload["progress"]
        self.global_state = payload["global_state"]
        self.client_states = payload["client_states"]
        self.client_cache = payload["client_cache"]
        self.strategy.initialize(dict(self.init_state), self.infos)
        self.strategy.load_state_dict(payload["strategy"])
        path = self.run_dir / "metrics.jsonl"
        lines = (
            path.read_text().splitlines()[: self.progress.metrics_lines] if path.exists() else []
        )
        path.write_text("".join(line + "\n" for line in lines))
        self.metrics = [json.loads(line) for line in lines]
        return True

    # -------------------------------------------------------------- outputs
    def _finish(self) -> RunResult:
        from fedhet.reports.summary import write_outputs

        final = self.strategy.evaluation_state(self.global_state)
        save_adapter(final, self.run_dir / "final_adapter", self.cfg.lora, self.cfg.model.name)
        summary = write_outputs(self.run_dir, self.cfg, self.metrics, self.progress.time_to_target)
        return RunResult(final, self.metrics, summary, self.run_dir)


def run_instruction(
    lm: LoraModel,
    examples: Sequence[Example],
    inst: Instruction,
    base: AdapterState,
    base_plan: TrainPlan,
    *,
    seed: int,
    pad_id: int,
    cache: dict[str, Any] | None = None,
) -> tuple[ClientUpdate, AdapterState, TrainPlan]:
    """One client's local update, as every runtime runs it (simulator and Flower
    ClientApp): start from the instruction's tensors over ``base`` (the client's
    own last state, or the initial adapter), apply the plan overrides and ``seed``,
    train (``cache``: the client's own cache, kept between its updates), and build
    the upload. Returns (update, full trained state, plan)."""
    start = {**base, **inst.state}
    plan = base_plan.with_overrides({**inst.plan, "seed": seed})
    result = local_update(lm, examples, start, plan, pad_id=pad_id, cache=cache)
    update = ClientUpdate(
        client_id=inst.client_id,
        state=make_upload(result.state, start, plan),
        num_samples=len(examples),
        version=inst.version,
        kind=plan.send,
        metrics=result.metrics,
        extras=result.extras,
    )
    return update, result.state, plan


def apply_arrival(
    strategy: Strategy, state: AdapterState, update: ClientUpdate, counters: Any
) -> tuple[AdapterState, dict[str, Any]]:
    """One validated asynchronous arrival, as every runtime applies it: stamp its
    staleness τ = version − start version, hand it to ``strategy.on_arrival`` and
    keep the books on ``counters`` (``version``, ``held``, ``updates_applied``: a
    held update counts as applied when the strategy next moves the model).
    Returns the new global state and the metrics-row fields."""
    update.staleness = counters.version - update.version
    new_state = strategy.on_arrival(state, update)
    if new_state is None:
        counters.held += 1
    else:
        state = new_state
        counters.version += 1
        counters.updates_applied += 1 + counters.held
        counters.held = 0
    return state, {
        "staleness": update.staleness,
        "train_loss": update.metrics["train_loss"],
        "applied": new_state is not None,
    }


def _seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (stable across runs and platforms)."""
    return int(np.random.default_rng(list(parts)).integers(2**31 - 1))


def _event(rnd: int, cid: int) -> int:
    return rnd * 1_000_003 + cid


def _mean_loss(updates: list[ClientUpdate]) -> float | None:
    if not updates:
        return None
    return float(np.mean([u.metrics["train_loss"] for u in updates]))
