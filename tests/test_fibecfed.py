import shutil

import pytest
import torch

from fedhet.client.curriculum import pacing
from fedhet.client.fisher import LAYER_SCORES
from fedhet.errors import FedhetError
from fedhet.model.lora import layer_index, state_bytes
from fedhet.protocol import ClientInfo, ClientUpdate
from fedhet.runtime.sim import Simulation
from fedhet.strategies import FibecFed, build_strategy
from fedhet.strategies.fibecfed import select_gal

LAYERS = 4


def _state(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        f"m.layers.{i}.q.lora_{f}.weight": torch.full((2, 2), value)
        for i in range(LAYERS)
        for f in "AB"
    }


def _strategy(horizon: int | None = 12, **params) -> FibecFed:
    strategy = FibecFed(**params)
    strategy.horizon = horizon  # the driver sets the run's rounds
    strategy.initialize(_state(), [ClientInfo(c, 10) for c in range(6)])
    return strategy


def _update(cid, state, n=10, scores=None):
    extras = {} if scores is None else {LAYER_SCORES: torch.tensor(scores)}
    return ClientUpdate(cid, state, num_samples=n, extras=extras)


def test_select_gal_on_a_hand_built_score_table():
    reports = {
        0: torch.tensor([1.0, 0.0, 3.0, 0.0]),  # normalised: .25 0 .75 0
        1: torch.tensor([0.0, 10.0, 0.0, 10.0]),  # normalised: 0 .5 0 .5
        2: torch.tensor([0.0, 0.0, 0.0, 0.0]),  # no mass: ignored
    }
    # weights 3:1 → .1875 .125 .5625 .125
    assert select_gal(reports, {0: 3.0, 1: 1.0, 2: 5.0}, [0, 1, 2, 3], 0.5) == [0, 2]
    # weights 1:3 → .0625 .375 .1875 .375
    assert select_gal(reports, {0: 1.0, 1: 3.0, 2: 5.0}, [0, 1, 2, 3], 0.5) == [1, 3]
    assert select_gal(reports, {0: 1.0, 1: 3.0}, [0, 1, 2, 3], 0.25) == [1]  # tie → lower
    assert select_gal(reports, {0: 1.0, 1: 3.0}, [0, 1, 2, 3], 0.6) == [1, 2, 3]  # ⌈2.4⌉
    assert select_gal({}, {}, [0, 1, 2, 3], 0.5) == [0, 1]  # nothing reported


def test_round_one_is_global_then_only_gal_travels_with_refresh_rounds():
    strategy = _strategy(6, gal_every=2, warmup_rounds=0, rescore_every=3)
    state = _state()
    first = strategy.configure(1, state, [0, 1])
    assert all(set(i.state) == set(state) for i in first)
    assert first[0].plan["sparse_layers"] == [] and first[0].plan["rescore_every"] == 3
    assert first[0].plan["curriculum_fraction"] == pytest.approx(0.3)
    assert first[0].plan["layer_score"] == "sensitivity"
    updates = [
        _update(0, _state(1.0), 10, [4.0, 1.0, 3.0, 2.0]),
        _update(1, _state(3.0), 30, [4.0, 1.0, 3.0, 2.0]),
    ]
    state = strategy.aggregate(1, state, updates)
    assert all(torch.allclose(v, torch.full((2, 2), 2.5)) for v in state.values())

    # round 2 selects GAL: only GAL goes down, but it is a refresh round: all come up
    second = strategy.configure(2, state, [1, 2])
    assert strategy.global_layers() == [0, 2] and strategy.refreshes(2)
    for inst in second:
        assert {layer_index(k) for k in inst.state} == {0, 2}
        assert sorted(inst.plan["upload_keys"]) == sorted(state)
        assert inst.plan["sparse_layers"] == [1, 3] and inst.plan["neuron_keep"] == 0.5
        assert inst.plan["curriculum_fraction"] == pytest.approx(pacing(1, 0.3, 5))
    both = [_update(1, _state(4.0), 10), _update(2, _state(8.0), 30)]
    refreshed = strategy.aggregate(2, state, both)
    assert all(torch.equal(v, torch.full((2, 2), 7.0)) for v in refreshed.values())

    # round 3: only GAL travels both ways and only GAL is averaged
    third = strategy.configure(3, refreshed, [1])
    gal_keys = third[0].plan["upload_keys"]
    assert sorted(gal_keys) == sorted(third[0].state) and not strategy.refreshes(3)
    new = strategy.aggregate(
        3,
        refreshed,
        [_update(1, {k: torch.ones(2, 2) for k in gal_keys}, 10, [0.0, 5.0, 0.0, 5.0])],
    )
    assert all(torch.equal(new[k], torch.ones(2, 2)) for k in gal_keys)
    assert all(torch.equal(new[k], refreshed[k]) for k in new if k not in gal_keys)
    # reselection waits E = 2 rounds, then uses each client's latest report
    strategy.configure(4, new, [0])
    assert strategy.global_layers() == [1, 3] and strategy.refreshes(4)
    strategy.configure(5, new, [0])
    assert not strategy.refreshes(5)
    (last,) = strategy.configure(6, new, [0])
    assert strategy.refreshes(6) and sorted(last.plan["upload_keys"]) == sorted(new)
    assert last.plan["curriculum_fraction"] == 1.0  # pacing reaches 1 in the last round


def test_warm_up_ignores_reports_from_the_initial_adapter():
    strategy = _strategy(gal_every=5)  # W = 1
    state = _state()
    strategy.configure(1, state, [0])
    strategy.aggregate(1, state, [_update(0, _state(1.0), scores=[0.0, 1.0, 0.0, 1.0])])
    assert strategy.reports == {}  # round 1 started from B = 0: its report is not used
    strategy.configure(2, state, [0])
    assert strategy.selected is None  # still every layer global
    strategy.aggregate(2, state, [_update(0, _state(1.0), scores=[1.0, 0.0, 1.0, 0.0])])
    strategy.configure(3, state, [0])
    assert strategy.global_layers() == [0, 2] and strategy.selected_round == 3


def test_pacing_spans_the_configured_run():
    with pytest.raises(ValueError, match="pacing_rounds"):
        _strategy(None).curriculum_fraction(1)
    strategy = _strategy(12)
    fractions = [strategy.curriculum_fraction(t) for t in range(1, 13)]
    assert fractions[0] == pytest.approx(0.3) and fractions[-1] == 1.0
    assert all(a < b for a, b in zip(fractions, fractions[1:], strict=False))
    assert _strategy(pacing_rounds=4).curriculum_fraction(4) == 1.0  # the config says otherwise


def test_bad_reports_and_updates_never_crash_the_server():
    strategy = _strategy(warmup_rounds=0)
    state = _state()
    strategy.configure(1, state, [0, 1, 2])
    good = _update(0, _state(2.0), scores=[1.0, 2.0, 3.0, 4.0])
    bad_scores = _update(1, _state(2.0), scores=[1.0, float("nan"), 0.0, 0.0])
    short = _update(2, {k: v for k, v in _state(9.0).items() if "layers.3" not in k})
    out = strategy.aggregate(1, state, [good, bad_scores, short])
    assert all(torch.equal(v, torch.full((2, 2), 2.0)) for v in out.values())
    assert set(strategy.reports) == {0}
    nan = _update(0, {k: torch.full((2, 2), float("nan")) for k in state})
    assert strategy.aggregate(1, state, [nan]) is state


def test_local_evaluation_uses_the_clients_own_non_gal_layers_and_state_round_trips():
    strategy = _strategy(warmup_rounds=0)
    strategy.configure(1, _state(), [0])
    strategy.aggregate(1, _state(), [_update(0, _state(1.0), scores=[0.0, 1.0, 0.0, 1.0])])
    strategy.configure(2, _state(), [0])
    merged = strategy.evaluation_state(_state(5.0), _state(7.0))
    assert {k: float(v[0, 0]) for k, v in merged.items()} == {
        k: 5.0 if layer_index(k) in (1, 3) else 7.0 for k in merged
    }
    server = _state(5.0)
    assert strategy.evaluation_state(server) is server  # global: the server's state
    copy = _strategy()
    copy.load_state_dict(strategy.state_dict())
    assert copy.global_layers() == [1, 3] and copy.selected_round == strategy.selected_round
    assert torch.equal(copy.reports[0], strategy.reports[0])


def test_ablations_and_parameter_errors():
    only_sparse = _strategy(curriculum=False, gal=False, sparse_unit="layer")
    (inst,) = only_sparse.configure(1, _state(), [0])
    assert inst.plan["sparse_layers"] == [0, 1, 2, 3] and inst.plan["sparse_unit"] == "layer"
    assert "curriculum_fraction" not in inst.plan and "rescore_every" not in inst.plan
    assert "layer_score" not in inst.plan
    (inst,) = _strategy(sparse=False).configure(1, _state(), [0])
    assert "sparse_layers" not in inst.plan
    with pytest.raises(FedhetError, match="rho"):
        build_strategy("fibecfed", {"rho": 0})
    with pytest.raises(FedhetError, match="pacing"):
        build_strategy("fibecfed", {"pacing": "cubic"})
    with pytest.raises(FedhetError, match="sparse_unit"):
        build_strategy("fibecfed", {"sparse_unit": "head"})
    with pytest.raises(FedhetError, match="score_with"):
        build_strategy("fibecfed", {"score_with": "entropy"})


def test_simulation_sends_only_gal_tensors_and_resumes_exactly(smoke_config, monkeypatch):
    overrides = (
        "strategy.name=fibecfed",
        "strategy.params={gal_every: 2, warmup_rounds: 0}",
        "data.limit=80",
        "data.global_test_size=4",
        "data.max_length=32",
        "federation.rounds=4",
        "train.steps=2",  # a 1-step update from B = 0 has no layer signal to report
        "eval.global_size=4",
        "eval.local_clients=1",
    )
    sent: list[tuple[int, set[str], list[str]]] = []
    original = FibecFed.configure

    def record(self, rnd, state, client_ids):
        instructions = original(self, rnd, state, client_ids)
        glob = set(self.global_layers())
        for inst in instructions:
            assert {layer_index(k) for k in inst.state} == glob
            sent.append((rnd, set(inst.state), inst.plan["upload_keys"]))
        return instructions

    monkeypatch.setattr(FibecFed, "configure", record)
    sim = Simulation(smoke_config("name=full", *overrides))
    full = sim.run()
    full_bytes = state_bytes(sim.init_state)
    # round 1 every layer; GAL from round 2; rounds 2 (selection) and 4 (selection, last)
    # refresh: every layer comes up; round 3 sends only GAL both ways
    for rnd, keys, upload in sent:
        assert len(keys) == len(sim.init_state) // (1 if rnd == 1 else 2)
        assert set(upload) == (keys if rnd == 3 else set(sim.init_state))
    rounds = [r for r in full.metrics if "round" in r]
    down = [0] + [r["bytes_down"] for r in rounds]
    up = [0] + [r["bytes_up"] for r in rounds]
    per_round = [b - a for a, b in zip(down, down[1:], strict=False)]
    assert per_round == [3 * full_bytes] + [3 * full_bytes // 2] * 3
    assert [b - a for a, b in zip(up, up[1:], strict=False)] == [3 * full_bytes] * 2 + [
        3 * full_bytes // 2, 3 * full_bytes
    ]
    assert all("difficulty" in sim.client_cache[c] for c in sim.client_states)
    assert all(sim.client_cache[c]["scored_at"] == 0 for c in sim.client_states)  # once each

    # resume from the round-3 checkpoint: the client caches and the strategy state come back
    cut = full.run_dir.parent / "cut"
    shutil.copytree(full.run_dir, cut)
    (cut / "checkpoints" / "ckpt-00000004.pt").unlink()
    resumed = Simulation(smoke_config("name=cut", *overrides)).run(resume=True)
    assert all(torch.equal(full.state[k], resumed.state[k]) for k in full.state)
    assert resumed.metrics[-1]["global_loss"] == full.metrics[-1]["global_loss"]
