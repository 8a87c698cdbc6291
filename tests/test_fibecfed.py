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


def _strategy(**params) -> FibecFed:
    strategy = FibecFed(**params)
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


def test_round_one_is_global_then_only_gal_travels():
    strategy = _strategy(gal_every=2, rescore_every=3)
    state = _state()
    first = strategy.configure(1, state, [0, 1])
    assert all(set(i.state) == set(state) for i in first)
    assert first[0].plan["sparse_layers"] == [] and first[0].plan["fisher_rescore"]
    assert first[0].plan["curriculum_fraction"] == pytest.approx(0.3)
    assert first[0].plan["layer_score"] == "sensitivity"
    updates = [
        _update(0, _state(1.0), 10, [4.0, 1.0, 3.0, 2.0]),
        _update(1, _state(3.0), 30, [4.0, 1.0, 3.0, 2.0]),
    ]
    state = strategy.aggregate(1, state, updates)
    assert all(torch.allclose(v, torch.full((2, 2), 2.5)) for v in state.values())

    second = strategy.configure(2, state, [1, 2])
    assert strategy.global_layers() == [0, 2]
    for inst in second:
        assert {layer_index(k) for k in inst.state} == {0, 2}
        assert sorted(inst.plan["upload_keys"]) == sorted(inst.state)
        assert inst.plan["sparse_layers"] == [1, 3] and inst.plan["neuron_keep"] == 0.5
        assert inst.plan["curriculum_fraction"] == pytest.approx(pacing(1, 0.3, 20))
    assert [i.plan["fisher_rescore"] for i in second] == [False, True]  # 1 scored in round 1

    # only GAL tensors are averaged; the others keep the server's values
    gal_keys = second[0].plan["upload_keys"]
    new = strategy.aggregate(
        2,
        state,
        [_update(1, {k: torch.ones(2, 2) for k in gal_keys}, 10, [0.0, 5.0, 0.0, 5.0])],
    )
    assert all(torch.equal(new[k], torch.ones(2, 2)) for k in gal_keys)
    assert all(torch.equal(new[k], state[k]) for k in new if k not in gal_keys)
    # reselection waits E = 2 rounds, then uses each client's latest report
    strategy.configure(3, new, [0])
    assert strategy.global_layers() == [0, 2]
    strategy.configure(4, new, [0])
    assert strategy.global_layers() == [1, 3]
    assert strategy.configure(5, new, [1])[0].plan["fisher_rescore"]  # R = 3 rounds after 1


def test_bad_reports_and_updates_never_crash_the_server():
    strategy = _strategy()
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
    strategy = _strategy()
    strategy.configure(1, _state(), [0])
    strategy.aggregate(1, _state(), [_update(0, _state(1.0), scores=[0.0, 1.0, 0.0, 1.0])])
    strategy.configure(2, _state(), [0])
    merged = strategy.evaluation_state(_state(5.0), _state(7.0))
    assert {k: float(v[0, 0]) for k, v in merged.items()} == {
        k: 5.0 if layer_index(k) in (1, 3) else 7.0 for k in merged
    }
    assert strategy.evaluation_state(_state(5.0)) is not None
    copy = _strategy()
    copy.load_state_dict(strategy.state_dict())
    assert copy.global_layers() == [1, 3] and copy.scored == strategy.scored
    assert torch.equal(copy.reports[0], strategy.reports[0])


def test_ablations_and_parameter_errors():
    only_sparse = _strategy(curriculum=False, gal=False)
    (inst,) = only_sparse.configure(1, _state(), [0])
    assert inst.plan["sparse_layers"] == [0, 1, 2, 3]
    assert "curriculum_fraction" not in inst.plan and not inst.plan["fisher_rescore"]
    assert "layer_score" not in inst.plan
    (inst,) = _strategy(sparse=False).configure(1, _state(), [0])
    assert "sparse_layers" not in inst.plan
    with pytest.raises(FedhetError, match="rho"):
        build_strategy("fibecfed", {"rho": 0})
    with pytest.raises(FedhetError, match="pacing"):
        build_strategy("fibecfed", {"pacing": "cubic"})


def test_simulation_sends_only_gal_tensors_and_resumes_exactly(smoke_config, monkeypatch):
    overrides = (
        "strategy.name=fibecfed",
        "strategy.params={gal_every: 1, pacing_rounds: 2}",
        "data.limit=80",
        "data.global_test_size=4",
        "data.max_length=32",
        "federation.rounds=3",
        "train.steps=1",
        "eval.global_size=4",
        "eval.local_clients=1",
    )
    sent: list[tuple[list[int], set[str], list[str]]] = []
    original = FibecFed.configure

    def record(self, rnd, state, client_ids):
        instructions = original(self, rnd, state, client_ids)
        for inst in instructions:
            sent.append((self.global_layers(), set(inst.state), inst.plan["upload_keys"]))
        return instructions

    monkeypatch.setattr(FibecFed, "configure", record)
    sim = Simulation(smoke_config("name=full", *overrides))
    full = sim.run()
    full_bytes = state_bytes(sim.init_state)
    for glob, keys, upload in sent:
        assert {layer_index(k) for k in keys} == set(glob) and set(upload) == keys
    assert any(len(glob) < sim.lm.num_layers for glob, _, _ in sent)
    rounds = [r for r in full.metrics if "round" in r]
    down = [0] + [r["bytes_down"] for r in rounds]
    per_round = [b - a for a, b in zip(down, down[1:], strict=False)]
    assert per_round == [3 * full_bytes, 3 * full_bytes // 2, 3 * full_bytes // 2]
    assert rounds[-1]["bytes_up"] == rounds[-1]["bytes_down"]
    assert all("difficulty" in sim.client_cache[c] for c in sim.client_states)

    # resume from the round-2 checkpoint: the client caches and the strategy state come back
    cut = full.run_dir.parent / "cut"
    shutil.copytree(full.run_dir, cut)
    (cut / "checkpoints" / "ckpt-00000003.pt").unlink()
    resumed = Simulation(smoke_config("name=cut", *overrides)).run(resume=True)
    assert all(torch.equal(full.state[k], resumed.state[k]) for k in full.state)
    assert resumed.metrics[-1]["global_loss"] == full.metrics[-1]["global_loss"]
