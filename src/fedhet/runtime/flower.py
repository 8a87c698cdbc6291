"""The Flower runtime: the federation driver over a Flower ``Grid``.

:func:`make_server_app` and :func:`~fedhet.runtime.flower_client.make_client_app`
build a Flower ``ServerApp`` and ``ClientApp`` (``flwr`` 1.2x+ Message API). They
run under Flower's simulation engine (``flwr run``, one ``ClientApp`` per virtual
SuperNode) and on real machines (SuperLink + SuperNodes, see ``docs/flower.md``).

The loops are the :class:`~fedhet.runtime.driver.Driver`'s, the same as the
simulator's; :class:`FlowerExecutor` only moves messages:

1. ``connect``: waits until ``min-nodes`` SuperNodes are connected (Flower's
   node list is empty at start), then asks each (a ``query`` message) for its
   client id (node config ``partition-id``), its number of training samples, its
   category histogram and its example lengths: the
   :class:`~fedhet.protocol.ClientInfo` the strategy is initialised with (speed
   and memory come from the config's fleet);
2. ``execute`` (sync rounds, hierarchical stages): pushes the train messages
   and polls for replies until all are back or ``deadline_s`` has passed (wall
   seconds); ``submit`` / ``next_arrival`` (async): push one message, pull
   replies one by one;
3. ``evaluate``: the global adapter on the global test set on the server
   (``server-eval``) and, through ``evaluate`` messages, on the test splits of
   the first ``eval.local_clients`` clients whenever no node is training
   (synchronous: every evaluation point; asynchronous: the end).

Clock (``clock`` run config key): ``wall`` (default) — a reply's duration is
the wall seconds from its push to its arrival (download, training, upload; in
Flower's simulation engine also the wait for a free actor, so HierFedLoRA's
speed estimates are skewed there: use ``virtual``) and asynchronous replies are
handled in the order they come; a reply not back by ``deadline_s`` is a
``timeout`` (dropped, and the round lasts the deadline); ``virtual`` — durations are the simulator's
cost model (:mod:`fedhet.runtime.cost`: the reply's tokens, the plan's depth,
the bytes, the config's fleet) and asynchronous replies are released in virtual
finish order (the executor waits for every reply in flight before releasing the
earliest), so a Flower simulation reproduces the in-process simulator's run,
asynchronous ones included, when every client is online (fleet ``uniform``).

A reply that fails (node error, or not back by the deadline) counts as
dropped; one that cannot be decoded is rejected with its reason; the driver
validates the rest (:mod:`fedhet.runtime.validation`); none stops the run.

Differences from the simulator, by design: no simulated availability,
stragglers or crashes (``federation.dropout`` and ``faults`` are ignored with
a warning); unseen clients (``eval.unseen_clients``) are not supported; no
checkpoint/resume.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import get_project_dir
from flwr.serverapp import Grid, ServerApp

from fedhet.client.evaluate import result_key
from fedhet.client.train import TrainPlan
from fedhet.config import ExperimentConfig, load_config
from fedhet.data.federated import build_federated_data
from fedhet.data.records import Record
from fedhet.devices.profiles import load_fleet
from fedhet.errors import FedhetError
from fedhet.model.base import load_base_model, model_info
from fedhet.model.lora import AdapterState, LoraModel, state_bytes
from fedhet.protocol import ClientInfo, CostModel, Instruction
from fedhet.runtime.cost import ClientCosts, planner_costs
from fedhet.runtime.driver import Driver, RunResult
from fedhet.runtime.evaluation import evaluate_adapter, spread_fields
from fedhet.runtime.executor import Arrival, ClientRun, Executor, client_seed
from fedhet.runtime.flower_codec import decode_update, encode_instruction, to_arrays
from fedhet.runtime.validation import UpdateSpec, expected_update
from fedhet.strategies import build_strategy
from fedhet.strategies.base import Strategy

log = logging.getLogger("flwr.fedhet")  # a child of Flower's logger: shown in `flwr run --stream`
QUERY_ATTEMPTS = 3  # a node that fails or misses the who-are-you query is asked again

RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "configs/smoke.yaml",
    "set": "",
    "min-nodes": 0,
    "wait-timeout": 300.0,
    "server-eval": True,
    "clock": "wall",
}
"""The run config keys the ServerApp reads (``[tool.flwr.app.config]``)."""


@dataclass(frozen=True)
class FlowerOptions:
    """How the ServerApp drives the federation (Flower run config keys in brackets).

    Attributes:
        min_nodes: SuperNodes to wait for before the first round [``min-nodes``];
            0 means one per client of the experiment (``data.partition.num_clients``).
        wait_timeout: seconds to wait for them before failing [``wait-timeout``].
        server_eval: evaluate the global adapter on the global test set on the
            server, which then needs the experiment's data source [``server-eval``].
        clock: ``wall`` or ``virtual`` (module docstring) [``clock``].
        poll_interval: seconds between polls of the node list and of replies.
    """

    min_nodes: int = 0
    wait_timeout: float = 300.0
    server_eval: bool = True
    clock: Literal["wall", "virtual"] = "wall"
    poll_interval: float = 0.1

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "virtual"):
            raise FedhetError(f"run config clock={self.clock!r}: use wall or virtual")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerOptions:
        values = {**RUN_CONFIG_DEFAULTS, **run_config}
        return cls(
            min_nodes=int(values["min-nodes"]),
            wait_timeout=float(values["wait-timeout"]),
            server_eval=bool(values["server-eval"]),
            clock=str(values["clock"]),  # type: ignore[arg-type]  (checked in __post_init__)
        )


def experiment_from_run_config(
    run_config: Mapping[str, Any], app_dir: Path | None = None
) -> ExperimentConfig:
    """The experiment named by the run config: ``config`` (a YAML path; a relative
    one is looked up in the Flower app's directory, then in the working directory)
    with ``set`` (``;``-separated ``key=value`` overrides, as ``fedhet run --set``)."""
    values = {**RUN_CONFIG_DEFAULTS, **run_config}
    path = Path(str(values["config"]))
    if not path.is_absolute() and app_dir is not None and (app_dir / path).is_file():
        path = app_dir / path
    overrides = [item.strip() for item in str(values["set"]).split(";") if item.strip()]
    return load_config(path, overrides)


def _app_dir(grid: Grid) -> Path | None:
    """Where Flower installed the app (FAB) this ServerApp runs from, if any."""
    run = grid.run
    try:
        return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    except ValueError:  # no FAB: run_simulation with app objects
        return None


@dataclass
class _Node:
    """What the server learns about a node from its query reply."""

    node_id: int
    num_samples: int
    histogram: dict[str, int]
    lengths: list[int]  # tokens of each training example (the hierarchical planner's costs)


@dataclass
class _Sent:
    """One train message awaiting its reply."""

    inst: Instruction
    event: int
    spec: UpdateSpec
    plan: TrainPlan
    sent: float  # perf_counter at push
    start: float = 0.0  # async: the driver's clock at dispatch
    lost: bool = False


class FlowerExecutor(Executor):
    """The driver's executor on a Flower ``Grid`` (module docstring)."""

    resumable = False

    def __init__(self, cfg: ExperimentConfig, grid: Grid, options: FlowerOptions) -> None:
        if cfg.eval.unseen_clients:
            raise FedhetError("eval.unseen_clients: not supported on Flower (set it to 0)")
        if cfg.faults or cfg.federation.dropout:
            log.warning("faults / federation.dropout: simulator features, ignored on Flower")
        self.cfg = cfg
        self.grid = grid
        self.options = options
        self.virtual = options.clock == "virtual"  # type: ignore[misc]  (per instance here)
        self.dropout = 0.0  # type: ignore[misc]  (no simulated crashes on real nodes)
        model, self.tokenizer = load_base_model(
            cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device
        )
        self.lm = LoraModel(model, cfg.lora, seed=cfg.seed)
        self.init_state = self.lm.init_state(cfg.seed, rank=cfg.lora.rank)
        self.base_plan = TrainPlan(**cfg.train.model_dump())
        self.num_training = cfg.data.partition.num_clients
        fleet = load_fleet(cfg.fleet.name, self.num_training, cfg.seed)
        self.costs = ClientCosts(fleet, model_info(model)["flops_per_token"], self.lm.num_layers)
        self.global_test: list[Record] = (
            build_federated_data(cfg.data).global_test if options.server_eval else []
        )
        self.experiment = cfg.model_dump_json()
        self.nodes: dict[int, _Node] = {}
        self.pending: dict[str, _Sent] = {}
        self.replies: dict[str, tuple[ClientRun, float]] = {}  # async: back, not yet released
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ nodes
    def connect(self) -> list[ClientInfo]:
        """Wait for the nodes, learn who they are, return the strategy's client infos."""
        want = self.options.min_nodes or self.num_training
        deadline = time.monotonic() + self.options.wait_timeout
        while len(node_ids := sorted(self.grid.get_node_ids())) < want:
            if time.monotonic() > deadline:
                raise FedhetError(
                    f"min-nodes: {len(node_ids)} of {want} SuperNodes connected after "
                    f"wait-timeout={self.options.wait_timeout:g} s"
                )
            time.sleep(self.options.poll_interval)
        log.info("%d SuperNodes connected; asking who they are", len(node_ids))
        unanswered = node_ids
        for attempt in range(1, QUERY_ATTEMPTS + 1):
            unanswered = self._query(unanswered, deadline)
            if not unanswered or time.monotonic() > deadline:
                break
            log.warning("%d nodes did not answer the query (attempt %d of %d)%s",
                        len(unanswered), attempt, QUERY_ATTEMPTS,
                        "; asking them again" if attempt < QUERY_ATTEMPTS else "")
        if not self.nodes:
            raise FedhetError("no SuperNode answered the query; see the SuperNodes' logs")
        self._started = time.perf_counter()  # the run's clock starts with the nodes
        fleet = self.costs.fleet
        return [
            ClientInfo(
                client_id=cid,
                num_samples=node.num_samples,
                flops=fleet[cid].speed,
                memory_bytes=fleet[cid].memory_bytes,
                histogram=node.histogram,
            )
            for cid, node in sorted(self.nodes.items())
        ]

    def _query(self, node_ids: list[int], deadline: float) -> list[int]:
        """Ask ``node_ids`` who they are (partition, data sizes), record the answers in
        ``self.nodes`` and return the nodes that failed or did not answer by ``deadline``
        (a node's app can fail transiently, e.g. a simulation actor restarting)."""
        content = RecordDict({"meta": ConfigRecord({"experiment": self.experiment})})
        queries = [Message(content, node, MessageType.QUERY) for node in node_ids]
        timeout = max(deadline - time.monotonic(), self.options.poll_interval)
        answered = set()
        for reply in self.grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s failed its query: %s", node, reply.error.reason)
                continue
            answered.add(node)
            meta = reply.content.config_records["meta"]
            cid = int(meta["client_id"])
            if cid in self.nodes:
                raise FedhetError(
                    f"partition-id {cid}: claimed by nodes {self.nodes[cid].node_id} and {node}"
                )
            if not 0 <= cid < self.num_training:
                log.warning("node %s: partition-id %d is not in the run; unused", node, cid)
                continue
            self.nodes[cid] = _Node(
                node,
                int(meta["num_samples"]),
                json.loads(str(meta["histogram"])),
                json.loads(str(meta["lengths"])),
            )
        return [node for node in node_ids if node not in answered]

    def online(self, event: int) -> list[int]:
        return sorted(self.nodes)

    # ------------------------------------------------------------- training
    def _push(self, inst: Instruction, event: int, group: str) -> tuple[str, _Sent]:
        """Send one instruction. The client starts from the instruction's tensors
        over its own (unknown here) or the initial ones; keys it uploads without
        having received them are checked against the initial adapter's shapes."""
        plan = self.base_plan.with_overrides(inst.plan)
        spec = expected_update(
            inst.client_id,
            {**self.init_state, **inst.state},
            upload_keys=plan.upload_keys,
            kind=plan.send,
            num_samples=self.nodes[inst.client_id].num_samples,
        )
        seed = client_seed(self.cfg.seed, event, inst.client_id)
        content = encode_instruction(inst, seed=seed, experiment=self.experiment)
        node = self.nodes[inst.client_id].node_id
        message = Message(content, node, MessageType.TRAIN, group_id=group)
        (message_id,) = self.grid.push_messages([message])
        return message_id, _Sent(inst, event, spec, plan, time.perf_counter())

    def _run_of(self, sent: _Sent, reply: Message | None, arrived: float) -> ClientRun:
        """The driver's view of a reply (``None``: not back by the deadline, a
        ``timeout`` that lasted until ``arrived``)."""
        cid = sent.inst.client_id
        run = ClientRun(cid, sent.spec, None, duration=arrived - sent.sent)
        if reply is None:
            log.warning("client %d: no reply by the deadline", cid)
            run.fault = "timeout"
            return run
        if reply.has_error():
            log.warning("client %d failed: %s", cid, reply.error.reason)
            return run
        try:
            run.update = decode_update(reply.content)
        except Exception as err:  # a malformed reply is a rejection, never a crash
            run.rejection = f"malformed reply: {type(err).__name__}: {err}"
            return run
        run.bytes_up = state_bytes(run.update.state)
        if self.virtual:
            bytes_down = state_bytes(sent.inst.state)
            lan = self.cfg.federation.lan_mbps if sent.inst.link == "lan" else None
            run.duration = self.costs.duration(
                cid, sent.plan, run.update.metrics, bytes_down, run.bytes_up, sent.event, lan
            )
        return run

    def execute(
        self, jobs: list[tuple[Instruction, int]], *, deadline: float | None = None
    ) -> list[ClientRun]:
        if self.virtual:
            deadline = None  # virtual durations: the driver applies the deadline to them
        group = f"batch-{jobs[0][1]}"
        sent = dict(self._push(inst, event, group) for inst, event in jobs)
        replies: dict[str, tuple[Message, float]] = {}
        started = time.perf_counter()
        while len(replies) < len(sent):
            if deadline is not None and time.perf_counter() - started > deadline:
                break
            back = list(self.grid.pull_messages([m for m in sent if m not in replies]))
            now = time.perf_counter()
            for reply in back:
                replies[reply.metadata.reply_to_message_id] = (reply, now)
            if not back:
                time.sleep(self.options.poll_interval)
        return [
            self._run_of(s, *replies.get(m, (None, time.perf_counter()))) for m, s in sent.items()
        ]

    def submit(self, jobs: list[tuple[Instruction, int, bool]], now: float) -> None:
        for inst, event, lost in jobs:
            message_id, sent = self._push(inst, event, str(event))
            sent.start, sent.lost = now, lost
            self.pending[message_id] = sent

    def next_arrival(self) -> Arrival:
        """Wall clock: the first reply to come. Virtual clock: once every message
        in flight has its reply, the earliest virtual finish (ties: dispatch order)."""
        while not self.replies or (self.virtual and len(self.replies) < len(self.pending)):
            waiting = [m for m in self.pending if m not in self.replies]
            back = list(self.grid.pull_messages(waiting))
            now = time.perf_counter()
            for reply in back:
                message_id = reply.metadata.reply_to_message_id
                self.replies[message_id] = (self._run_of(self.pending[message_id], reply, now), now)
            if not back:
                time.sleep(self.options.poll_interval)
        if self.virtual:
            finish = {m: self.pending[m].start + r.duration for m, (r, _) in self.replies.items()}
            chosen = min(finish, key=lambda m: (finish[m], self.pending[m].event))
            when = finish[chosen]
        else:
            chosen = min(self.replies, key=lambda m: self.replies[m][1])
            when = self.replies[chosen][1] - self._started
        sent = self.pending.pop(chosen)
        run, _ = self.replies.pop(chosen)
        return Arrival(when, run, sent.lost)

    def in_flight(self) -> set[int]:
        return {s.inst.client_id for s in self.pending.values()}

    def planner_costs(self) -> CostModel:
        """The simulator's cost figures, with each client's example lengths as its
        node reported them (clients without a node get the mean length)."""
        lengths = {cid: node.lengths for cid, node in self.nodes.items()}
        mean = [round(float(np.mean([n for ns in lengths.values() for n in ns])))]
        every = {cid: lengths.get(cid, mean) for cid in range(self.num_training)}
        return planner_costs(self.cfg, self.lm, self.costs, self.init_state, every)

    def close(self) -> None:
        if self.pending:
            log.info("%d updates still in flight at the end are ignored", len(self.pending))
        self.lm.restore_base()  # the server's model back to W0 (base deltas, if any)

    # ------------------------------------------------------------ evaluation
    def evaluate(
        self, strategy: Strategy, state: AdapterState, *, final: bool = False
    ) -> dict[str, Any]:
        row: dict[str, Any] = {}
        ev = self.cfg.eval
        if self.global_test:
            glob = evaluate_adapter(
                self.lm,
                self.tokenizer,
                strategy.evaluation_state(state),
                self.global_test[: ev.global_size],
                ev,
                max_length=self.cfg.data.max_length,
            )
            row |= {f"global_{k}": v for k, v in glob.items()}
        if final or not self.pending:  # nodes busy training are asked only at the end
            row |= self._evaluate_local(state)
        return row

    def _evaluate_local(self, state: AdapterState) -> dict[str, Any]:
        """Federated evaluation on the first ``eval.local_clients`` clients' test splits."""
        key = result_key(self.cfg.eval.metric)
        targets = [cid for cid in sorted(self.nodes) if cid < self.cfg.eval.local_clients]
        if not targets:
            return {}
        content = RecordDict(
            {"state": to_arrays(state), "meta": ConfigRecord({"experiment": self.experiment})}
        )
        messages = [
            Message(content, self.nodes[cid].node_id, MessageType.EVALUATE) for cid in targets
        ]
        results: dict[int, dict[str, float]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.options.wait_timeout):
            if reply.has_error():
                node = reply.metadata.src_node_id
                log.warning("evaluation failed on node %s: %s", node, reply.error.reason)
                continue
            metrics = reply.content.metric_records["metrics"]
            if key in metrics:  # absent: the client has no test records
                cid = int(reply.content.config_records["meta"]["client_id"])
                results[cid] = {k: float(v) for k, v in metrics.items()}
        return spread_fields("local", results, key)


class FlowerServer:
    """One experiment on a Flower ``Grid``: the driver over a :class:`FlowerExecutor`."""

    def __init__(
        self, cfg: ExperimentConfig, grid: Grid, options: FlowerOptions | None = None
    ) -> None:
        self.cfg = cfg
        self.executor = FlowerExecutor(cfg, grid, options or FlowerOptions())
        self.strategy: Strategy = build_strategy(cfg.strategy.name, cfg.strategy.params)
        self.init_state = self.executor.init_state

    def run(self) -> RunResult:
        result = Driver(self.cfg, self.strategy, self.executor, log=log).run(self.init_state)
        log.info("outputs in %s", result.run_dir.resolve())
        return result


def make_server_app(
    cfg: ExperimentConfig | None = None, options: FlowerOptions | None = None
) -> ServerApp:
    """A ServerApp running ``cfg`` (default: the experiment named by the Flower run
    config, see :func:`experiment_from_run_config`) with ``options`` (default: from
    the run config, see :class:`FlowerOptions`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        experiment = cfg or experiment_from_run_config(context.run_config, _app_dir(grid))
        opts = options or FlowerOptions.from_run_config(context.run_config)
        FlowerServer(experiment, grid, opts).run()

    return app


__all__ = [
    "FlowerExecutor",
    "FlowerOptions",
    "FlowerServer",
    "experiment_from_run_config",
    "make_server_app",
]
