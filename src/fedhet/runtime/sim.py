"""The in-process simulator: the virtual-clock executor of the federation driver.

One frozen base model, many clients, a virtual clock. A client is its data
(encoded once), its device profile, for strategies that keep local tensors its
last adapter state, and its cache (a dict its local update keeps between
participations, e.g. Fisher scores; checkpointed). Running a client loads its
start state into the one shared :class:`~fedhet.model.lora.LoraModel` (tensor
copies, never a model copy), trains (:func:`fedhet.client.train.local_update`, or
several clients of a round in one pass: :mod:`fedhet.client.batched`, see
``execution.lockstep``), and reads the adapter back.

:class:`Simulation` is an :class:`~fedhet.runtime.executor.Executor`: the loops
(selection, arrivals, validation, evaluation schedule, metrics, checkpoints) are
the :class:`~fedhet.runtime.driver.Driver`'s; this module only executes and
evaluates, and keeps the time:

* a client's update lasts the cost model's duration (:mod:`fedhet.runtime.cost`):
  its tokens, the FLOPs per token of its plan's depth, its bytes and links, and
  the fleet's straggler draw for the event;
* availability is the fleet's seeded draw per decision point;
* asynchronous work runs when it is dispatched (its start state is fixed then)
  and is delivered at its virtual finish time from an event heap (ties by
  dispatch order);
* the config's ``faults`` make chosen clients misbehave
  (:mod:`fedhet.runtime.faults`); the driver's validation catches them.

Evaluation: the global adapter on the global test set, each of the first
``eval.local_clients`` clients on its own test split (its own tensors merged in
for strategies that keep local state), and the unseen clients
(``eval.unseen_clients``, never trained) on their data.
"""

from __future__ import annotations

import heapq
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhet.client.batched import ClientJob, compatible, lockstep_updates, split_for_memory
from fedhet.client.evaluate import result_key
from fedhet.client.train import TrainPlan, build_update, instruction_plan, local_update
from fedhet.config import ExperimentConfig
from fedhet.data.check import check_data
from fedhet.data.encode import encode
from fedhet.data.federated import FederatedData, build_federated_data
from fedhet.devices.profiles import load_fleet
from fedhet.errors import FedhetError
from fedhet.model.base import load_base_model, model_info
from fedhet.model.lora import AdapterState, LoraModel, base_deltas, state_bytes
from fedhet.protocol import ClientInfo, CostModel, Instruction
from fedhet.runtime.cost import ClientCosts, client_training_bytes, planner_costs
from fedhet.runtime.driver import Driver, RunResult
from fedhet.runtime.evaluation import evaluate_adapter, spread_fields
from fedhet.runtime.executor import Arrival, ClientRun, Executor, client_seed, seed_of
from fedhet.runtime.faults import FaultInjector
from fedhet.runtime.validation import expected_update
from fedhet.strategies import build_strategy
from fedhet.strategies.base import Strategy

log = logging.getLogger(__name__)


class Simulation(Executor):
    """Runs one experiment config in-process (see the module docstring)."""

    virtual = True
    resumable = True

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
        self.fed = fed or build_federated_data(cfg.data, data_dir=data_dir)
        check_data(self.fed, cfg.eval.metric)  # before the model loads: fail in seconds
        model, self.tokenizer = base or load_base_model(
            cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device
        )
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
        if cfg.execution.activation_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        self.lm = LoraModel(model, cfg.lora, seed=cfg.seed)
        flops = model_info(model)["flops_per_token"]
        self.costs = ClientCosts(self.fleet, flops, self.lm.num_layers)
        self.init_state = self.lm.init_state(cfg.seed, rank=cfg.lora.rank)
        self.strategy: Strategy = build_strategy(cfg.strategy.name, cfg.strategy.params)
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
        self.dropout = cfg.federation.dropout
        self.faults = FaultInjector(cfg.faults, self.num_training, cfg.seed)
        self.client_states: dict[int, AdapterState] = {}
        # Client-side caches (e.g. FibecFed's Fisher scores): one dict per client,
        # owned by the client's local update, kept here and checkpointed.
        self.client_cache: dict[int, dict[str, Any]] = {}
        self._heap: list[tuple[float, int, int, bool, ClientRun]] = []
        lockstep, on_cuda = cfg.execution.lockstep, model.device.type == "cuda"
        self._lockstep = lockstep is True or (lockstep == "auto" and on_cuda)
        self._sequential_reasons: set[str] = set()
        self._client_bytes: float | None = None  # one client's share of a lockstep pass

    # ------------------------------------------------------------------ run
    def run(self, *, resume: bool = False) -> RunResult:
        """The federated run (:class:`~fedhet.runtime.driver.Driver`); ``resume``
        continues from the newest checkpoint."""
        driver = Driver(self.cfg, self.strategy, self, show_progress=self.show_progress)
        return driver.run(self.init_state, resume=resume)

    def run_central(self, *, every_chunk: bool = True) -> RunResult:
        """The centralised upper bound: one adapter trained on the union of the
        clients' training data, seeing as many samples as the federated run.

        The federated run's budget in client updates: rounds × clients per round
        (sync), arrivals (async), rounds × training clients (hier: every member of
        every group takes part, in one intra-group round of ``train.steps``; more
        when groups plan τ_g > 1, fewer when some are offline); each update is
        ``train.steps`` × batch. Training is cut
        into as many chunks as the federated run has evaluation points (rounds,
        or arrivals / ``eval.every``), each with a fresh AdamW (as a client's
        update has), and evaluated after each chunk (``every_chunk``) or only
        before the first and after the last (a reference point needs only the
        final figure; training is the same either way).
        """
        fed, ev = self.cfg.federation, self.cfg.eval
        mode = self.strategy.mode
        if mode == "async":
            updates, chunks = fed.max_arrivals, math.ceil(fed.max_arrivals / ev.every)
        else:
            per_round = fed.clients_per_round if mode == "sync" else self.num_training
            updates, chunks = fed.rounds * per_round, fed.rounds
        steps = max(1, round(updates * self.cfg.train.steps / chunks))
        union = [e for client in self.examples for e in client]
        driver = Driver(self.cfg, self.strategy, self)
        driver.start()
        (self.run_dir / "metrics.jsonl").write_text("")
        driver.global_state = dict(self.init_state)
        driver.log_row(driver.evaluate_row({"step": 0}))
        for chunk in range(1, chunks + 1):
            plan = self.base_plan.with_overrides(
                {"steps": steps, "seed": seed_of(self.cfg.seed, 5, chunk)}
            )
            result = local_update(self.lm, union, driver.global_state, plan, pad_id=self.pad_id)
            driver.global_state = result.state
            driver.progress.step = chunk
            row = {"step": chunk, **{k: result.metrics[k] for k in ("train_loss", "steps")}}
            driver.log_row(driver.evaluate_row(row) if every_chunk or chunk == chunks else row)
        return driver.finish()

    # ------------------------------------------------------------- one client
    def run_client(self, inst: Instruction, event: int) -> ClientRun:
        """Execute one instruction on the shared model; ``event`` seeds its draws."""
        cid = inst.client_id
        start, plan = self._plan(inst, event)
        cache = self.client_cache.setdefault(cid, {})
        result = local_update(
            self.lm, self.examples[cid], start, plan, pad_id=self.pad_id, cache=cache
        )
        return self._delivered(inst, event, start, plan, result)

    def _plan(self, inst: Instruction, event: int) -> tuple[AdapterState, TrainPlan]:
        own = self.client_states.get(inst.client_id, self.init_state)
        seed = client_seed(self.cfg.seed, event, inst.client_id)
        return instruction_plan(inst, own, self.base_plan, seed)

    def _delivered(
        self, inst: Instruction, event: int, start: AdapterState, plan: TrainPlan, result
    ) -> ClientRun:
        """The run of a trained instruction: its upload (with any injected fault),
        what the server expects, its virtual duration; keeps the client's state."""
        cid = inst.client_id
        update = build_update(inst, len(self.examples[cid]), start, plan, result)
        expected = expected_update(
            cid,
            start,
            upload_keys=plan.upload_keys,
            kind=plan.send,
            num_samples=len(self.examples[cid]),
        )
        if self.strategy.keeps_local_state or self.cfg.federation.keep_client_states:
            self.client_states[cid] = result.state
        bytes_down, bytes_up = state_bytes(inst.state), state_bytes(update.state)
        update, fault = self.faults.apply(update, expected, event)
        lan = self.cfg.federation.lan_mbps if inst.link == "lan" else None
        duration = self.costs.duration(
            cid, plan, update.metrics, bytes_down, bytes_up, event, lan
        )
        return ClientRun(cid, expected, update, duration, bytes_up, fault)

    def _lockstep_groups(self, plans: list[TrainPlan]) -> list[list[int]] | None:
        """Job indices in lockstep groups (each within ``execution.memory_gb``), or
        None for one-by-one training when the plans are not compatible (the reason
        is logged once)."""
        reason = compatible(self.lm, plans)
        if reason is not None:
            if reason not in self._sequential_reasons:
                self._sequential_reasons.add(reason)
                log.info("clients train one by one: %s", reason)
            return None
        ex = self.cfg.execution
        budget = None if ex.memory_gb is None else ex.memory_gb * 2**30
        if self._client_bytes is None:
            self._client_bytes = client_training_bytes(self.cfg, self.lm)
        size = min(ex.max_group, split_for_memory(len(plans), self._client_bytes, budget))
        return [list(range(i, min(i + size, len(plans)))) for i in range(0, len(plans), size)]

    # -------------------------------------------------------- the executor
    def connect(self) -> list[ClientInfo]:
        return self.infos

    def close(self) -> None:
        """The shared model's base weights back to W0 (base deltas, if any)."""
        self.lm.restore_base()

    def online(self, event: int) -> list[int]:
        return np.flatnonzero(self.fleet.online(event)[: self.num_training]).tolist()

    def execute(
        self, jobs: list[tuple[Instruction, int]], *, deadline: float | None = None
    ) -> list[ClientRun]:
        """Run the jobs on the shared model, in lockstep groups where
        ``execution.lockstep`` allows (the deadline is the driver's to apply)."""
        with_delta = any(base_deltas(inst.state) for inst, _ in jobs)  # not in lockstep
        if not self._lockstep or len(jobs) < 2 or with_delta:
            return [self.run_client(inst, event) for inst, event in jobs]
        prepared = [self._plan(inst, event) for inst, event in jobs]
        groups = self._lockstep_groups([plan for _, plan in prepared])
        if groups is None:
            return [self.run_client(inst, event) for inst, event in jobs]
        runs: list[ClientRun] = []
        for group in groups:
            batch = [
                ClientJob(self.examples[jobs[i][0].client_id], *prepared[i]) for i in group
            ]
            results = lockstep_updates(self.lm, batch, pad_id=self.pad_id)
            for i, result in zip(group, results, strict=True):
                inst, event = jobs[i]
                runs.append(self._delivered(inst, event, *prepared[i], result))
        return runs

    def submit(self, jobs: list[tuple[Instruction, int, bool]], now: float) -> None:
        """Train the dispatched clients now (together where lockstep allows); each
        is delivered at ``now`` + its duration."""
        runs = self.execute([(inst, event) for inst, event, _ in jobs])
        for (inst, event, lost), run in zip(jobs, runs, strict=True):
            heapq.heappush(self._heap, (now + run.duration, event, inst.client_id, lost, run))

    def next_arrival(self) -> Arrival:
        finish, _, _, lost, run = heapq.heappop(self._heap)
        return Arrival(finish, run, lost)

    def in_flight(self) -> set[int]:
        return {entry[2] for entry in self._heap}

    def planner_costs(self) -> CostModel:
        lengths = {
            c: [len(e.input_ids) for e in self.examples[c]] for c in range(self.num_training)
        }
        return planner_costs(self.cfg, self.lm, self.costs, self.init_state, lengths)

    def state_dict(self) -> dict[str, Any]:
        return {
            "client_states": self.client_states,
            "client_cache": self.client_cache,
            "in_flight": self._heap,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.client_states = sd["client_states"]
        self.client_cache = sd["client_cache"]
        self._heap = sd["in_flight"]

    # ---------------------------------------------------------- evaluation
    def evaluate(
        self, strategy: Strategy, state: AdapterState, *, final: bool = False
    ) -> dict[str, Any]:
        ev, max_length = self.cfg.eval, self.cfg.data.max_length
        key = result_key(ev.metric)
        global_state = strategy.evaluation_state(state)

        def score(adapter: AdapterState, records: list) -> dict[str, float]:
            return evaluate_adapter(
                self.lm, self.tokenizer, adapter, records, ev, max_length=max_length
            )

        glob = score(global_state, self.fed.global_test[: ev.global_size])
        row: dict[str, Any] = {f"global_{k}": v for k, v in glob.items()}
        local = {
            c.client_id: score(
                strategy.evaluation_state(state, self.client_states.get(c.client_id)),
                c.test[: ev.local_size],
            )
            for c in self.fed.clients[: ev.local_clients]
            if c.test
        }
        row |= spread_fields("local", local, key)
        unseen = {
            c.client_id: score(global_state, (c.train + c.test)[: ev.local_size])
            for c in self.fed.clients[self.num_training :]
        }
        row |= spread_fields("unseen", unseen, key, per_client=False)
        return row
