"""The asynchronous strategies through the simulator's event loop, on scripted
schedules: every client update is real (tiny model) but its virtual duration is
fixed per client, so arrival order, staleness and idle time are hand-computable."""

import numpy as np
import pytest
import torch

from fedhet.data.federated import build_federated_data
from fedhet.model import load_base_model
from fedhet.runtime.checkpoint import load_latest
from fedhet.runtime.sim import Simulation

DURATIONS = {0: 1.0, 1: 2.4, 2: 3.5}  # virtual seconds per update, by client
SMALL = (
    "data.partition.num_clients=3",
    "train.steps=1",
    "train.batch_size=2",
    "data.max_length=32",
    "eval.every=1000",
    "eval.local_clients=0",
    "eval.global_size=4",
    "federation.checkpoint_every=1000",
)


class Scripted(Simulation):
    """The simulator with each client's update lasting ``DURATIONS[client]``."""

    def run_client(self, inst, event):
        run = super().run_client(inst, event)
        run.duration = DURATIONS[inst.client_id]
        return run


@pytest.fixture
def make(smoke_config, tmp_path):
    """A scripted simulation of the smoke scenario cut to 3 clients, on a fleet whose
    devices are online with probability ``online`` (the durations are scripted)."""
    fed_cache = {}

    def build(*overrides, online=1.0):
        fleet = tmp_path / f"fleet-{online}.yaml"
        fleet.write_text(
            "profiles: [{name: dev, speed: 1.0e12, memory_gb: 8, up_mbps: 100, "
            f"down_mbps: 100, online_prob: {online}}}]\n"
        )
        cfg = smoke_config(*SMALL, f"fleet.name={fleet}", *overrides)
        if "fed" not in fed_cache:
            fed_cache["fed"] = build_federated_data(cfg.data)
        return Scripted(cfg, fed=fed_cache["fed"], base=load_base_model("tiny"))

    return build


FULL = ["federation.regime=full"]


@pytest.mark.parametrize(("name", "regime"), [("fedfa", []), ("fedasync", FULL)])
def test_staleness_on_a_scripted_schedule_and_no_idle(make, name, regime):
    # the full regime (FedFa's default): all three start at t=0 from version 0 and
    # restart at once on arrival:
    # t=1 c0 (v0→1), t=2 c0 (from v1), t=2.4 c1 (from v0), t=3 c0 (from v2), t=3.5 c2 (from v0)
    sim = make(f"strategy.name={name}", *regime, "federation.max_arrivals=5")
    result = sim.run()
    rows = result.metrics[1:]
    assert [r["client"] for r in rows] == [0, 0, 1, 0, 2]
    assert [r["virtual_time"] for r in rows] == pytest.approx([1.0, 2.0, 2.4, 3.0, 3.5])
    assert [r["staleness"] for r in rows] == [0, 0, 2, 1, 4]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["dispatched"] == r["client"] and r["idle"] == 0.0 for r in rows[:-1])
    assert "dispatched" not in rows[-1]  # nothing is dispatched after the last arrival
    assert result.summary["idle_fraction"] == 0.0
    assert result.summary["updates_applied"] == 5


def test_synchronous_idle_time_on_the_same_schedule(make):
    # one round of the three: it lasts 3.5; the others wait 2.5 and 1.1
    sim = make("strategy.name=fedit", "federation.rounds=1", "federation.clients_per_round=3")
    summary = sim.run().summary
    assert summary["idle_fraction"] == pytest.approx((2.5 + 1.1) / (2.5 + 1.1 + 1.0 + 2.4 + 3.5))


def test_fedbuff_staleness_counts_flushes_and_resume_is_exact(make):
    # K=2: t=1 c0 held; t=2 c0 (from v0) flush → v1; t=2.4 c1 (from v0) held;
    # t=3 c0 (from v1) flush → v2; t=3.5 c2 (from v0) held
    flags = (
        "strategy.name=fedbuff",
        "strategy.params.buffer_size=2",
        "federation.regime=full",
    )
    whole = make(*flags, "name=whole", "federation.max_arrivals=5").run()
    rows = whole.metrics[1:]
    assert [r["staleness"] for r in rows] == [0, 0, 1, 0, 2]
    assert [r["version"] for r in rows] == [0, 1, 1, 2, 2]
    assert [r["applied"] for r in rows] == [False, True, False, True, False]
    assert whole.summary["updates_applied"] == 4  # two flushes of two; one still held

    make(*flags, "name=cut", "federation.max_arrivals=3").run()  # stops holding c1's delta
    sim = make(*flags, "name=cut", "federation.max_arrivals=5")
    assert load_latest(sim.run_dir / "checkpoints")["strategy"]["count"] == 1
    resumed = sim.run(resume=True)
    staleness = [r.get("staleness") for r in whole.metrics]
    assert [r.get("staleness") for r in resumed.metrics] == staleness
    assert resumed.state.keys() == whole.state.keys()
    assert all(torch.equal(resumed.state[k], whole.state[k]) for k in whole.state)


def test_fedfa_with_dropouts_and_availability(make):
    sim = make(
        "strategy.name=fedfa",
        "federation.max_arrivals=8",
        "federation.dropout=0.4",
        online=0.5,
    )
    rows = sim.run().metrics[1:]
    first = int(sim.fleet.online(0)[:3].sum())  # initial dispatches: every online client
    start = {c: 0 for c in range(3)}  # version each in-flight client started from
    version, dropped, replaced = 0, 0, 0
    for r in rows:
        if "staleness" in r:  # delivered: applied at once, τ = version before − start
            assert r["version"] == version + 1
            assert r["staleness"] == version - start[r["client"]]
        else:  # crashed: the update is lost, the model does not move
            dropped += 1
            assert r["version"] == version
        assert r["dropped"] == dropped
        version = r["version"]
        if r is rows[-1]:
            assert "dispatched" not in r  # work after the last arrival would be thrown away
            break
        online = sim.fleet.online(first + r["step"])
        if online[r["client"]]:
            assert r["dispatched"] == r["client"]  # restarts at once
        else:  # released: an online client takes the slot (itself only if none is free)
            replaced += r["dispatched"] != r["client"]
            assert online[r["dispatched"]] or r["dispatched"] == r["client"]
        assert r["idle"] == 0.0
        start[r["dispatched"]] = version
    assert 0 < dropped < len(rows) and replaced > 0


def test_both_regimes_dispatch_as_defined_on_a_scripted_fleet(make):
    # three clients, all online, updates of 1.0 / 2.4 / 3.5 s
    flags = ("strategy.name=fedfa", "federation.max_arrivals=8")
    full = make(*flags, "name=full").run().metrics[1:]
    # full: every client starts at t=0 and each arrival restarts the same client
    assert [r["client"] for r in full[:5]] == [0, 0, 1, 0, 2]
    assert all(r["dispatched"] == r["client"] for r in full[:-1])
    sim = make(*flags, "federation.regime=bounded", "federation.concurrency=2", "name=bounded")
    rows = sim.run().metrics[1:]
    # bounded: two in flight (the documented first draw), a freed slot goes to an idle
    # client: the arriving one or the one not in flight, never a busy one
    first = np.random.default_rng([sim.cfg.seed, 19, 0]).choice([0, 1, 2], 2, replace=False)
    in_flight = {int(c) for c in first}
    for r in rows:
        in_flight.remove(r["client"])  # only clients in flight arrive
        if "dispatched" in r:
            assert r["dispatched"] not in in_flight
            in_flight.add(r["dispatched"])
            assert len(in_flight) == 2
    assert {r["client"] for r in rows} == {0, 1, 2}  # the third client gets slots too
    assert all(r["idle"] == 0.0 for r in full[:-1])
