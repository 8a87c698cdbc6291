"""fedhet on Flower (:mod:`fedhet.runtime.flower`).

One run on Flower's simulation engine (Ray, one actor) drives FedIT and FedAsync
through the real ServerApp/ClientApp plumbing; FedIT must reproduce the
in-process simulator. The other tests drive the same server loops over
``LocalGrid``, a Flower ``Grid`` that runs the ClientApp in this process (no
Ray, seconds), for every registered strategy and for the failure cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedhet.data.export import export_client_data
from fedhet.errors import FedhetError
from fedhet.model.lora import load_adapter
from fedhet.protocol import ClientUpdate
from fedhet.runtime.flower import (
    FlowerOptions,
    FlowerServer,
    experiment_from_run_config,
)
from fedhet.runtime.flower_client import make_client_app
from fedhet.runtime.flower_codec import decode_update, encode_update, pack_tree, unpack_tree
from fedhet.runtime.sim import Simulation
from fedhet.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
FAST = FlowerOptions(wait_timeout=30, poll_interval=0.01)


pytestmark = pytest.mark.flower


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """What a ServerApp process knows about itself (Flower sets it at start):
    Flower's ``Message`` reads it."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


Handler = Callable[[Message, Context], Message]


class LocalGrid(Grid):
    """A Grid whose nodes run ``app`` in this process, one node per client
    (node config ``partition-id`` i, plus ``extra(i)``). ``get_node_ids`` answers an
    empty list the first ``empty_polls`` times, as Flower does while SuperNodes connect."""

    def __init__(
        self,
        app: Handler,
        num_nodes: int,
        *,
        empty_polls: int = 0,
        extra: Callable[[int], dict] = lambda i: {},
    ) -> None:
        self.app = app
        self.contexts = {
            1000 + i: Context(1, 1000 + i, {"partition-id": i, **extra(i)}, RecordDict(), {})
            for i in range(num_nodes)
        }
        self.empty_polls = empty_polls
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        if self.empty_polls:
            self.empty_polls -= 1
            return []
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # what a SuperNode sends back when its ClientApp fails
                reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def test_plan_and_extras_trees_round_trip():
    tree = {
        "frozen": ("lora_A",),
        "masks": {"m.lora_A.weight": torch.rand(2, 3) > 0.5},
        "trainable_layers": range(1, 3),
        "scores": {3: np.float32(0.5), "x": None, "flag": True},
        "nested": [torch.arange(4.0), {"k": (1, 2.5)}],
    }
    text, tensors = pack_tree(tree)
    back = unpack_tree(text, tensors)
    assert back["frozen"] == ("lora_A",)
    assert torch.equal(back["masks"]["m.lora_A.weight"], tree["masks"]["m.lora_A.weight"])
    assert back["trainable_layers"] == [1, 2]
    assert back["scores"] == {3: 0.5, "x": None, "flag": True}
    assert torch.equal(back["nested"][0], torch.arange(4.0))
    assert back["nested"][1] == {"k": (1, 2.5)}
    with pytest.raises(TypeError, match="set"):
        pack_tree({"bad": {1, 2}})


def test_update_travels_as_array_records():
    update = ClientUpdate(
        client_id=2,
        state={"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4)},
        num_samples=17,
        version=3,
        kind="delta",
        metrics={"train_loss": 1.25},
        extras={"layer_scores": torch.rand(2)},
    )
    content = encode_update(update)
    assert set(content.array_records["state"]) == set(update.state)
    back = decode_update(content)
    assert (back.client_id, back.num_samples, back.version, back.kind) == (2, 17, 3, "delta")
    assert all(torch.equal(back.state[k], v) for k, v in update.state.items())
    assert torch.equal(back.extras["layer_scores"], update.extras["layer_scores"])
    assert back.metrics == {"train_loss": 1.25}


def test_run_config_names_the_experiment(tmp_path):
    """``config`` relative to the installed app (else the working directory), ``set``
    as ``;``-separated overrides, the other keys as options."""
    app = tmp_path / "app"
    (app / "configs").mkdir(parents=True)
    (app / "configs" / "smoke.yaml").write_text((REPO / "configs" / "smoke.yaml").read_text())
    run_config = {
        "config": "configs/smoke.yaml",
        "set": "federation.rounds=7; strategy.name=fedasync",
        "min-nodes": 4,
        "server-eval": False,
    }
    cfg = experiment_from_run_config(run_config, app)
    assert (cfg.federation.rounds, cfg.strategy.name) == (7, "fedasync")
    options = FlowerOptions.from_run_config(run_config)
    assert (options.min_nodes, options.server_eval, options.wait_timeout) == (4, False, 300.0)
    with pytest.raises(FedhetError, match="federation.rounds"):
        experiment_from_run_config({**run_config, "set": "federation.rounds=0"}, app)


def test_server_waits_for_the_nodes_then_trains(smoke_config):
    cfg = smoke_config("federation.rounds=1", "eval.local_clients=2")
    grid = LocalGrid(make_client_app(), 6, empty_polls=3)
    result = FlowerServer(cfg, grid, FAST).run()
    assert grid.empty_polls == 0
    assert [row["step"] for row in result.metrics] == [0, 1]
    last = result.metrics[-1]
    assert last["clients"] == 3 and last["updates_applied"] == 3
    assert last["rejected"] == last["dropped"] == 0
    assert set(last["local_per_client"]) == {"0", "1"}
    assert last["global_loss"] < result.metrics[0]["global_loss"]
    state, _ = load_adapter(result.run_dir / "final_adapter")
    assert all(torch.equal(state[k], v) for k, v in result.state.items())


def test_nodes_reading_their_own_files_train_like_partitions(smoke_config, tmp_path):
    """Deployment data (node config ``data-path``/``test-path``, files written by
    ``export_client_data``) gives exactly the run of the partitioned simulation."""
    cfg = smoke_config(
        "data.partition.num_clients=3",
        "federation.rounds=1",
        "eval.global_size=4",
        "eval.local_clients=1",
    )
    files = export_client_data(cfg.data, tmp_path / "data")

    def own_files(i: int) -> dict:
        return {"data-path": str(files[i][0]), "test-path": str(files[i][1])}

    partitions = FlowerServer(cfg, LocalGrid(make_client_app(), 3), FAST).run()
    deployed_cfg = cfg.model_copy(update={"name": "deployed"})
    deployed = FlowerServer(
        deployed_cfg, LocalGrid(make_client_app(), 3, extra=own_files), FAST
    ).run()
    assert all(torch.equal(deployed.state[k], v) for k, v in partitions.state.items())
    assert deployed.metrics[-1]["local_loss_mean"] == partitions.metrics[-1]["local_loss_mean"]


def test_too_few_nodes_fail_naming_the_field(smoke_config):
    grid = LocalGrid(make_client_app(), 2)
    with pytest.raises(FedhetError, match="min-nodes"):
        FlowerServer(smoke_config(), grid, FlowerOptions(wait_timeout=0.2)).run()


def test_bad_and_failed_replies_never_reach_the_strategy(smoke_config):
    """Client 0 sends NaNs, client 2 claims another client id, client 4's ClientApp
    fails: the round aggregates the others, counts 2 rejections and 1 drop. Client 3's
    node fails its first who-are-you query (a restarting simulation actor): it is
    asked again and trains."""
    app = make_client_app()
    query_failures = {3: 1}

    def misbehaving(msg: Message, context: Context) -> Message:
        cid = context.node_config["partition-id"]
        if cid == 4 and msg.metadata.message_type == "train":
            raise RuntimeError("out of memory")
        if msg.metadata.message_type == "query" and query_failures.get(cid):
            query_failures[cid] -= 1
            raise RuntimeError("actor restarting")
        reply = app(msg, context)
        if msg.metadata.message_type != "train" or cid not in (0, 2):
            return reply
        update = decode_update(reply.content)
        if cid == 0:
            update.state = {k: torch.full_like(v, math.nan) for k, v in update.state.items()}
        else:
            update.client_id = 1
        return Message(encode_update(update), reply_to=msg)

    cfg = smoke_config(
        "federation.rounds=1", "federation.clients_per_round=6", "eval.local_clients=0"
    )
    result = FlowerServer(cfg, LocalGrid(misbehaving, 6), FAST).run()
    row = result.metrics[-1]
    assert query_failures == {3: 0}
    assert (row["clients"], row["rejected"], row["dropped"]) == (3, 2, 1)
    assert "non-finite" in row["rejections"]["0"] and "client 1" in row["rejections"]["2"]
    assert all(bool(torch.isfinite(v).all()) for v in result.state.values())


# What a strategy needs on the smoke scenario (as in its own simulator tests), or to
# apply something within this test's few updates.
SETUP = {
    "fedbuff": ["strategy.params.buffer_size=2"],
    "flexlora": ["lora.rank=6", "strategy.params={rank_profile: uniform}"],
    "hetlora": ["lora.rank=6", "strategy.params={rank_profile: heavy-tail-strong}"],
}


# One strategy for each way a strategy reaches the executor: a plain sync, async and
# hierarchical loop, client-kept tensors and method extras (FibecFed, FedSA-LoRA),
# per-client ranks (FlexLoRA), a base delta in the instructions (FedEx-LoRA) and a
# wrapper (DP-FedAvg). The others share these paths (their own logic is tested pure).
FLOWER_PATHS = ("fedit", "fedasync", "hierfedlora", "fibecfed", "fedsa-lora", "flexlora",
                "fedex-lora", "dp-fedavg")


def test_the_flower_paths_cover_every_registered_strategy_kind():
    assert set(FLOWER_PATHS) <= set(STRATEGIES)
    assert {STRATEGIES[n].mode for n in FLOWER_PATHS} == {s.mode for s in STRATEGIES.values()}


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOWER_PATHS)
def test_every_kind_of_strategy_runs_on_flower(smoke_config, name):
    """Whatever the mode (sync, async, hier) and what its instructions carry, a
    strategy runs on Flower unchanged: updates are applied, none is rejected, the
    adapter moves."""
    cfg = smoke_config(
        f"strategy.name={name}",
        *SETUP.get(name, []),
        "train.steps=1",
        "federation.rounds=1",
        "federation.clients_per_round=2",
        "federation.concurrency=2",
        "federation.max_arrivals=3",
        "eval.every=100",
        "eval.global_size=4",
        "eval.local_clients=1",
    )
    server = FlowerServer(cfg, LocalGrid(make_client_app(), 6), FAST)
    result = server.run()
    last = result.metrics[-1]
    assert last["updates_applied"] > 0 and last["rejected"] == 0 and last["dropped"] == 0
    assert "local_loss_mean" in last
    assert any(not torch.equal(v, server.init_state[k]) for k, v in result.state.items())


# The same run on the simulator and on Flower (clock "virtual": replies taken in the
# simulator's virtual-clock order), one strategy per loop of the driver.
PARITY = {
    "sync": ("strategy.name=fedit", "federation.rounds=2"),
    "async": ("strategy.name=fedasync", "federation.max_arrivals=6", "eval.every=3"),
    "hier": ("strategy.name=hierfedlora", "federation.rounds=2", "strategy.params.num_groups=2"),
}
PARITY_KEYS = ("global_loss", "local_loss_mean", "train_loss", "bytes_up", "bytes_down")


def _simulated(smoke_config, *overrides: str):
    """The in-process reference, trained on one thread (as a Ray actor is: float
    reductions split across threads differ in the last bits, which AdamW amplifies
    for near-zero gradients)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Simulation(smoke_config(*overrides, "name=reference")).run()
    finally:
        torch.set_num_threads(threads)


def _assert_same_run(on_flower, reference, keys=PARITY_KEYS) -> None:
    """Same final adapter (≤ 1e-6) and the same figures in every row; Flower asks
    nodes busy training for no local evaluation (async: only the last row has it)."""
    for key, value in reference.state.items():
        torch.testing.assert_close(on_flower.state[key], value, rtol=0, atol=1e-6)
    assert len(on_flower.metrics) == len(reference.metrics)
    assert "local_loss_mean" in on_flower.metrics[-1]
    for ours, theirs in zip(on_flower.metrics, reference.metrics, strict=True):
        for key in keys:
            if key == "local_loss_mean" and key not in ours and "arrival" in ours:
                continue
            expected = theirs.get(key)
            assert ours.get(key) == (None if expected is None else pytest.approx(expected, 1e-5))


@pytest.mark.slow
def test_the_simulator_and_flowers_simulation_engine_agree(smoke_config, ray_cluster_lock):
    """Flower's simulation engine (Ray, six virtual SuperNodes) runs FedIT (wall
    clock), FedAsync and HierFedLoRA (virtual clock: arrivals in the simulator's
    order) one after the other; each run's final adapter equals the in-process
    simulator's to 1e-6 and its rows carry the same figures (every client online:
    fleet ``uniform``)."""
    from flwr.simulation import run_simulation

    runs = {
        mode: (smoke_config(*PARITY[mode], "fleet.name=uniform", f"name={mode}"), clock)
        for mode, clock in (("sync", "wall"), ("async", "virtual"), ("hier", "virtual"))
    }
    results = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # the default wait (300 s): Ray start-up and six model loads can take minutes
        # on a loaded 2-core machine (120 s timed out with an experiment running)
        for mode, (cfg, clock) in runs.items():
            results[mode] = FlowerServer(cfg, grid, FlowerOptions(clock=clock)).run()

    run_simulation(
        app,
        make_client_app(),
        num_supernodes=6,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}},
    )
    assert len(results) == 3, "the ServerApp failed (see the log)"
    for mode in runs:
        reference = _simulated(smoke_config, *PARITY[mode], "fleet.name=uniform")
        keys = PARITY_KEYS if mode == "sync" else (*PARITY_KEYS, "virtual_time", "staleness")
        _assert_same_run(results[mode], reference, keys)
    rows = results["async"].metrics[1:]
    assert [row["arrival"] for row in rows] == list(range(1, 7))
    assert max(row["staleness"] for row in rows) > 0  # three in flight
    state, _ = load_adapter(results["async"].run_dir / "final_adapter")
    assert all(torch.equal(state[k], v) for k, v in results["async"].state.items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(PARITY))
def test_flower_with_the_virtual_clock_reproduces_the_simulator(smoke_config, mode):
    """Every loop of the driver (sync FedIT, async FedAsync, hierarchical
    HierFedLoRA) gives the simulator's run on a Flower grid: same adapter, same rows."""
    overrides = (*PARITY[mode], "fleet.name=uniform")
    virtual = FlowerOptions(wait_timeout=30, poll_interval=0.01, clock="virtual")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        on_flower = FlowerServer(
            smoke_config(*overrides), LocalGrid(make_client_app(), 6), virtual
        ).run()
    finally:
        torch.set_num_threads(threads)
    reference = _simulated(smoke_config, *overrides)
    if mode == "async":
        assert max(row.get("staleness", 0) for row in reference.metrics) > 0
    _assert_same_run(on_flower, reference, (*PARITY_KEYS, "virtual_time", "staleness", "client"))
