import pytest
import torch

from fedhet.protocol import ClientInfo, ClientUpdate
from fedhet.runtime.sim import Simulation
from fedhet.strategies import DPFedAvg, build_strategy
from fedhet.strategies.robust import clip

dp = pytest.importorskip("dp_accounting")
from dp_accounting.rdp import RdpAccountant  # noqa: E402

A = "m.layers.0.q.lora_A.weight"
B = "m.layers.0.q.lora_B.weight"


def _ready(strategy, glob, num_clients, sampled):
    strategy.initialize(glob, [ClientInfo(i, 10) for i in range(num_clients)])
    strategy.configure(1, glob, list(range(sampled)))


def _updates(glob, k, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            i, {key: v + scale * torch.randn(v.shape, generator=gen) for key, v in glob.items()}, 10
        )
        for i in range(k)
    ]


def test_without_noise_it_is_the_clipped_sum_over_the_sampled_count():
    glob = {A: torch.randn(3, 4), B: torch.zeros(5, 3)}
    strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=0.5)
    _ready(strategy, glob, num_clients=20, sampled=5)
    ups = _updates(glob, 4)  # one of the five sampled clients dropped out
    out = strategy.aggregate(1, glob, ups)
    clipped, n = clip([{k: u.state[k] - glob[k] for k in glob} for u in ups], 0.5)
    assert n == 4 and strategy.metrics()["clipped"] == 4
    for key in glob:
        want = glob[key] + sum(c[key] for c in clipped) / 5
        torch.testing.assert_close(out[key], want)


def test_the_noise_has_standard_deviation_sigma_c_on_the_sum():
    glob = {B: torch.zeros(400, 50)}
    sigma, c, m = 2.0, 0.1, 4
    strategy = DPFedAvg(noise_multiplier=sigma, clip_norm=c)
    _ready(strategy, glob, num_clients=10, sampled=m)
    out = strategy.aggregate(1, glob, [ClientUpdate(0, {B: torch.zeros(400, 50)}, 10)])
    noise = out[B] * m  # zero updates: the sum is pure noise
    assert noise.std().item() == pytest.approx(sigma * c, rel=0.03)
    assert abs(noise.mean().item()) < 0.05 * sigma * c


def test_noise_is_reproducible_per_round_and_absent_from_frozen_a():
    a0 = torch.randn(3, 4)
    glob = {A: a0.clone(), B: torch.zeros(5, 3)}

    def run(rnd):
        strategy = DPFedAvg(base="ffa-lora", noise_multiplier=1.0, clip_norm=1.0, noise_seed=7)
        strategy.initialize(glob, [ClientInfo(i, 10) for i in range(10)])
        (inst,) = strategy.configure(rnd, glob, [0])
        assert set(inst.state) == {B}
        return strategy.aggregate(rnd, glob, [ClientUpdate(0, {B: torch.ones(5, 3)}, 10)])

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first[B], again[B]) and not torch.equal(first[B], other[B])
    assert torch.equal(first[A], a0)


def _accountant_epsilon(event, rounds, delta, relation):
    return RdpAccountant(neighboring_relation=relation).compose(event, rounds).get_epsilon(delta)


def test_poisson_accounting_is_the_accountants_figure_and_survives_a_checkpoint():
    glob = {B: torch.zeros(2, 2)}
    strategy = DPFedAvg(noise_multiplier=1.1, clip_norm=1.0, delta=1e-5, sampling="poisson")
    strategy.initialize(glob, [ClientInfo(i, 10) for i in range(100)])
    for rnd in range(1, 11):
        strategy.configure(rnd, glob, list(range(10)))
        strategy.aggregate(rnd, glob, _updates(glob, 8, seed=rnd))
    want = _accountant_epsilon(
        dp.PoissonSampledDpEvent(0.1, dp.GaussianDpEvent(1.1)),
        10,
        1e-5,
        dp.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    assert strategy.metrics()["dp_epsilon"] == pytest.approx(want, rel=1e-12)
    restored = build_strategy("dp-fedavg", {"noise_multiplier": 1.1, "sampling": "poisson"})
    restored.load_state_dict(strategy.state_dict())
    assert restored.epsilon() == pytest.approx(want, rel=1e-12)


def test_a_dp_run_reports_the_accountants_epsilon_in_its_metrics(smoke_config):
    sigma, rounds, clients, per_round, delta = 0.8, 2, 6, 2, 1e-4
    cfg = smoke_config(
        "strategy.name=dp-fedavg",
        f"strategy.params={{noise_multiplier: {sigma}, clip_norm: 0.05, delta: {delta}}}",
        f"federation.rounds={rounds}",
        f"federation.clients_per_round={per_round}",
        "fleet.name=uniform",  # every client online: m = clients_per_round each round
        "eval.every=100",
        "eval.local_clients=0",
        "eval.global_size=4",
        "train.steps=1",
    )
    metrics = Simulation(cfg).run().metrics
    want = _accountant_epsilon(
        dp.SampledWithoutReplacementDpEvent(clients, per_round, dp.GaussianDpEvent(sigma / 2)),
        rounds,
        delta,
        dp.NeighboringRelation.REPLACE_ONE,
    )
    assert metrics[0]["dp_epsilon"] == 0.0
    assert metrics[-1]["dp_epsilon"] == pytest.approx(want, rel=1e-12)
    assert metrics[-1]["dp_delta"] == delta
    assert 0 < metrics[1]["dp_epsilon"] < metrics[-1]["dp_epsilon"]
    assert metrics[-1]["clipped"] == rounds * per_round  # C = 0.05 is below every update's norm


def test_bad_parameters_are_refused():
    for params in ({"noise_multiplier": -1}, {"clip_norm": 0}, {"delta": 1}, {"sampling": "x"}):
        with pytest.raises(Exception, match=next(iter(params))):
            build_strategy("dp-fedavg", params)
