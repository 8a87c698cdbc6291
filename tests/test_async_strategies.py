"""The asynchronous update rules (FedAsync, FedBuff, FedFa) on small tensors,
against hand-computed values."""

import pytest
import torch

from fedhet.errors import FedhetError
from fedhet.protocol import ClientUpdate
from fedhet.strategies import FedAsync, FedBuff, FedFa, build_strategy
from fedhet.strategies.staleness import Staleness

A = "m.layers.0.q.lora_A.weight"
B = "m.layers.0.q.lora_B.weight"


def _up(cid, a, *, n=1, tau=0, kind="state", b=None):
    state = {A: torch.tensor(a)}
    if b is not None:
        state[B] = torch.tensor(b)
    return ClientUpdate(cid, state, num_samples=n, kind=kind, staleness=tau)


def test_staleness_functions_hand_values():
    assert Staleness("constant")(7) == 1.0
    poly = Staleness("polynomial", a=0.5)
    assert poly(0) == 1.0 and poly(3) == pytest.approx(0.5) and poly(8) == pytest.approx(1 / 3)
    hinge = Staleness("hinge", a=10, b=4)
    assert hinge(0) == hinge(4) == 1.0
    assert hinge(5) == pytest.approx(1 / 11) and hinge(6) == pytest.approx(1 / 21)
    with pytest.raises(ValueError):
        poly(-1)
    with pytest.raises(ValueError):
        Staleness("cubic")
    with pytest.raises(ValueError):
        Staleness("hinge", a=-1)


def test_fedasync_mixes_with_staleness_discounted_alpha():
    x = {A: torch.tensor([0.0, 4.0]), B: torch.tensor([1.0])}
    strategy = FedAsync()  # α = 0.9, s = (τ+1)^-0.5
    (inst,) = strategy.configure(3, x, [5])
    assert inst.plan == {"send": "state"}
    out = strategy.on_arrival(x, _up(5, [2.0, 0.0], tau=3))  # α_t = 0.9 · 0.5 = 0.45
    assert torch.allclose(out[A], torch.tensor([0.45 * 2, 0.55 * 4]))
    assert torch.equal(out[B], x[B])  # keys the client did not send are unchanged
    fresh = strategy.on_arrival(x, _up(5, [2.0, 0.0], tau=0))  # α_t = 0.9
    assert torch.allclose(fresh[A], torch.tensor([1.8, 0.4]))
    hinge = FedAsync(alpha=0.5, staleness="hinge", a=1, b=1)
    out = hinge.on_arrival(x, _up(5, [2.0, 0.0], tau=3))  # s = 1/(1·2+1), α_t = 1/6
    assert torch.allclose(out[A], torch.tensor([2 / 6, 4 * 5 / 6]))


def test_fedbuff_holds_until_k_then_applies_the_discounted_mean():
    x = {A: torch.tensor([1.0, 1.0]), B: torch.tensor([3.0])}
    strategy = FedBuff(buffer_size=2)
    (inst,) = strategy.configure(0, x, [1])
    assert inst.plan == {"send": "delta"}
    assert strategy.on_arrival(x, _up(1, [2.0, 0.0], kind="delta", tau=0)) is None
    out = strategy.on_arrival(x, _up(2, [0.0, 4.0], kind="delta", tau=3))  # s(3) = 0.5
    # buffer = 1·[2, 0] + 0.5·[0, 4] = [2, 2]; x + η·buffer/K = [1, 1] + [1, 1]
    assert torch.allclose(out[A], torch.tensor([2.0, 2.0]))
    assert torch.equal(out[B], x[B])
    assert strategy.count == 0 and strategy.buffer == {}
    lr = FedBuff(buffer_size=1, server_lr=0.5)
    assert torch.allclose(lr.on_arrival(x, _up(0, [2.0, 2.0], kind="delta"))[A], x[A] + 1)


def test_fedbuff_server_momentum():
    strategy = FedBuff(buffer_size=1, momentum=0.5)
    x = {A: torch.tensor([0.0])}
    x = strategy.on_arrival(x, _up(0, [2.0], kind="delta"))  # m = 2, x = 2
    assert torch.allclose(x[A], torch.tensor([2.0]))
    x = strategy.on_arrival(x, _up(0, [2.0], kind="delta"))  # m = 0.5·2 + 2 = 3, x = 5
    assert torch.allclose(x[A], torch.tensor([5.0]))


def test_fedbuff_state_dict_resumes_mid_buffer_exactly():
    x = {A: torch.tensor([1.0, -1.0])}
    ups = [_up(i, [float(i), 1.0], kind="delta", tau=i) for i in range(5)]
    straight = FedBuff(buffer_size=3, momentum=0.9)
    outs = [straight.on_arrival(x, u) for u in ups]
    first = FedBuff(buffer_size=3, momentum=0.9)
    for u in ups[:4]:  # one flush (momentum set), one arrival held
        first.on_arrival(x, u)
    sd = first.state_dict()
    assert sd["count"] == 1
    second = FedBuff(buffer_size=3, momentum=0.9)
    second.load_state_dict(sd)
    assert outs[4] is None and second.on_arrival(x, ups[4]) is None
    after = {A: torch.tensor([0.5, 0.5])}
    extra = _up(9, [1.0, 2.0], kind="delta")
    assert torch.equal(straight.on_arrival(after, extra)[A], second.on_arrival(after, extra)[A])


def test_fedfa_window_after_a_scripted_arrival_sequence():
    strategy = FedFa(window=3)
    assert strategy.regime == "full" and strategy.mode == "async"
    x = {A: torch.tensor([9.0]), B: torch.tensor([7.0])}
    (inst,) = strategy.configure(0, x, [0])
    assert inst.plan == {"send": "state"}
    # client k sends x_k = k with n_k = k + 1 samples
    expected = [0.0, 2 / 3, 8 / 6, 20 / 9, 38 / 12]  # Σ n_i x_i / Σ n_i over the window
    windows = [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    for k in range(5):
        out = strategy.on_arrival(x, _up(k, [float(k)], n=k + 1))
        assert [e.client_id for e in strategy.entries] == windows[k]
        assert torch.allclose(out[A], torch.tensor([expected[k]]))
        assert torch.equal(out[B], x[B])


def test_fedfa_staleness_weighting_and_delta_variant():
    weighted = FedFa(window=2, staleness="polynomial", a=1.0)
    x = {A: torch.tensor([0.0])}
    weighted.on_arrival(x, _up(0, [4.0], n=2, tau=1))  # w = 2 · 1/2 = 1
    out = weighted.on_arrival(x, _up(1, [1.0], n=1, tau=0))  # w = 1
    assert torch.allclose(out[A], torch.tensor([2.5]))
    delta = FedFa(window=3, variant="delta")  # η = 2/(K+1) = 0.5
    assert delta.configure(0, x, [0])[0].plan == {"send": "delta"}
    x1 = delta.on_arrival(x, _up(0, [2.0], kind="delta"))  # x + 0.5·2
    assert torch.allclose(x1[A], torch.tensor([1.0]))
    x2 = delta.on_arrival(x1, _up(1, [4.0], kind="delta", n=3))  # 1 + 0.5·(2·1 + 4·3)/4
    assert torch.allclose(x2[A], torch.tensor([1.0 + 0.5 * 3.5]))
    with pytest.raises(ValueError):
        FedFa(server_lr=0.5)  # only for the delta variant


def test_fedfa_state_dict_round_trip():
    ups = [_up(k, [float(k)], n=k + 1, tau=k % 2) for k in range(7)]
    x = {A: torch.tensor([0.0])}
    straight = FedFa(window=3, staleness="polynomial")
    for u in ups:
        out = straight.on_arrival(x, u)
    first = FedFa(window=3, staleness="polynomial")
    for u in ups[:5]:
        first.on_arrival(x, u)
    second = FedFa(window=3, staleness="polynomial")
    second.load_state_dict(first.state_dict())
    assert [e.client_id for e in second.entries] == [2, 3, 4]
    for u in ups[5:]:
        resumed = second.on_arrival(x, u)
    assert torch.equal(resumed[A], out[A])


def test_registry_builds_the_async_strategies():
    assert isinstance(build_strategy("fedasync", {"alpha": 0.5}), FedAsync)
    assert build_strategy("fedbuff", {"buffer_size": 4}).buffer_size == 4
    assert build_strategy("fedfa", {"window": 2, "variant": "delta"}).server_lr == pytest.approx(
        2 / 3
    )
    with pytest.raises(FedhetError, match="alpha"):
        build_strategy("fedasync", {"alpha": 0})
    with pytest.raises(FedhetError, match="buffer_size"):
        build_strategy("fedbuff", {"buffer_size": 0})
    with pytest.raises(FedhetError, match="staleness"):
        build_strategy("fedfa", {"staleness": "cubic"})
