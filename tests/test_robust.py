import numpy as np
import pytest
import torch

from fedhet.errors import FedhetError
from fedhet.model.norms import l2_norm
from fedhet.protocol import ClientInfo, ClientUpdate
from fedhet.strategies import FedIT, FFALoRA, Robust, build_strategy
from fedhet.strategies.robust import clip, coordinate_median, trimmed_mean

A = "m.layers.0.q.lora_A.weight"
B = "m.layers.0.q.lora_B.weight"


def _states(k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {A: torch.randn(3, 4, generator=gen), B: torch.randn(5, 3, generator=gen)} for _ in range(k)
    ]


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_median_and_trimmed_mean_match_flowers_implementations(k):
    aggregate = pytest.importorskip("flwr.server.strategy.aggregate")
    states = _states(k, seed=k)
    results = [([s[A].numpy(), s[B].numpy()], 1) for s in states]
    med = coordinate_median(states)
    ref = aggregate.aggregate_median(results)
    np.testing.assert_allclose(med[A].numpy(), ref[0], rtol=1e-6)
    np.testing.assert_allclose(med[B].numpy(), ref[1], rtol=1e-6)
    trim = trimmed_mean(states, 0.2)
    ref = aggregate.aggregate_trimmed_avg(results, 0.2)
    np.testing.assert_allclose(trim[A].numpy(), ref[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trim[B].numpy(), ref[1], rtol=1e-5, atol=1e-7)


def test_median_and_trimmed_mean_by_hand():
    states = [{A: torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 100.0)]
    assert torch.equal(coordinate_median(states)[A], torch.tensor([2.5, -2.5]))
    assert torch.equal(trimmed_mean(states, 0.25)[A], torch.tensor([2.5, -2.5]))
    assert torch.equal(trimmed_mean(states, 0.0)[A], torch.tensor([26.5, -26.5]))
    with pytest.raises(ValueError):
        trimmed_mean(states, 0.5)


def test_clip_scales_only_updates_above_the_bound():
    small, big = {A: torch.tensor([0.3, 0.4])}, {A: torch.tensor([3.0, 4.0])}
    out, clipped = clip([small, big], 1.0)
    assert clipped == 1
    assert torch.equal(out[0][A], small[A])
    assert l2_norm(out[1]) == pytest.approx(1.0)
    assert torch.allclose(out[1][A], torch.tensor([0.6, 0.8]))


def _round(states, ns=None):
    ns = ns or [1] * len(states)
    return [
        ClientUpdate(i, s, num_samples=n) for i, (s, n) in enumerate(zip(states, ns, strict=True))
    ]


def _init(strategy, state, k):
    strategy.initialize(state, [ClientInfo(i, 10) for i in range(k)])


def test_robust_mean_without_clipping_is_fedit():
    glob = _states(1, seed=9)[0]
    states = _states(4)
    ups = _round(states, [1, 2, 3, 4])
    robust = Robust(aggregator="mean")
    _init(robust, glob, 4)
    got = robust.aggregate(1, glob, ups)
    want = FedIT().aggregate(1, glob, ups)
    for key in glob:
        torch.testing.assert_close(got[key], want[key])


def test_median_and_clipping_neutralise_a_boosted_client():
    glob = {A: torch.zeros(3, 4), B: torch.zeros(5, 3)}
    common = _states(1, seed=3)[0]  # honest clients agree on a direction, up to noise
    honest = [{k: 0.01 * (common[k] + 0.2 * v) for k, v in s.items()} for s in _states(4)]
    boosted = {k: 100 * v for k, v in honest[0].items()}
    ups = _round([*honest, boosted])
    clean = FedIT().aggregate(1, glob, _round(honest))
    attacked = FedIT().aggregate(1, glob, ups)
    err = {"undefended": l2_norm({k: attacked[k] - clean[k] for k in glob})}
    for name, strategy in {
        "median": Robust(aggregator="median"),
        "trimmed": Robust(aggregator="trimmed_mean", trim_ratio=0.2),
        "clip": Robust(aggregator="mean", clip_norm="median"),
    }.items():
        _init(strategy, glob, 5)
        out = strategy.aggregate(1, glob, ups)
        err[name] = l2_norm({k: out[k] - clean[k] for k in glob})
    scale = l2_norm(clean)
    assert err["undefended"] > 10 * scale
    for name in ("median", "trimmed", "clip"):
        assert err[name] < 0.3 * scale, (name, err, scale)


def test_median_clipping_is_counted_and_round_trips_through_state_dict():
    glob = {A: torch.zeros(3, 4), B: torch.zeros(5, 3)}
    states = _states(5)
    states[0] = {k: 50 * v for k, v in states[0].items()}
    strategy = Robust(aggregator="mean", clip_norm="median")
    _init(strategy, glob, 5)
    strategy.aggregate(1, glob, _round(states))
    metrics = strategy.metrics()
    assert metrics["clipped"] == 2  # the two norms above the median of five
    # measured against the clients' own updates: clipping moves the model off their mean
    assert set(metrics) == {"clipped", "aggregation_error"} and metrics["aggregation_error"] > 0
    restored = build_strategy("robust", {"aggregator": "mean", "clip_norm": "median"})
    restored.load_state_dict(strategy.state_dict())
    assert restored.metrics() == {"clipped": 2}


def test_robust_ffa_lora_keeps_a_frozen_and_robustly_combines_b():
    a0 = torch.randn(3, 4)
    glob = {A: a0.clone(), B: torch.zeros(5, 3)}
    strategy = Robust(base="ffa-lora", aggregator="median")
    _init(strategy, glob, 3)
    (inst,) = strategy.configure(1, glob, [0])
    assert inst.plan == FFALoRA().configure(1, glob, [0])[0].plan  # the base's plan, unchanged
    ups = _round([{B: torch.full((5, 3), v)} for v in (1.0, 2.0, 1000.0)])
    out = strategy.aggregate(1, glob, ups)
    assert torch.equal(out[A], a0)
    assert torch.equal(out[B], torch.full((5, 3), 2.0))


def test_robust_fedprox_keeps_the_proximal_term():
    strategy = build_strategy("robust", {"base": "fedprox", "base_params": {"mu": 0.3}})
    (inst,) = strategy.configure(1, {A: torch.zeros(2)}, [0])
    assert inst.plan["prox_mu"] == 0.3


@pytest.mark.parametrize(
    ("params", "culprit"),
    [
        ({"base": "fedasync"}, "base"),
        ({"aggregator": "mode"}, "aggregator"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"trim_ratio": 0.5}, "trim_ratio"),
        ({"base": "fedprox", "base_params": {"nope": 1}}, "nope"),
    ],
)
def test_bad_parameters_fail_fast_naming_the_culprit(params, culprit):
    with pytest.raises(FedhetError, match=culprit):
        build_strategy("robust", params)
