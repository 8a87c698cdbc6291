import pytest
import torch

from fedhet.errors import FedhetError
from fedhet.protocol import ClientUpdate
from fedhet.strategies import FedIT, FedProx, FFALoRA, build_strategy
from fedhet.strategies.base import weighted_average

A = "m.layers.0.q.lora_A.weight"
B = "m.layers.0.q.lora_B.weight"


def _update(cid, a, b, n):
    return ClientUpdate(cid, {A: torch.tensor(a), B: torch.tensor(b)}, num_samples=n)


def test_fedit_is_the_hand_computed_weighted_mean():
    global_state = {A: torch.zeros(2), B: torch.zeros(2)}
    ups = [_update(0, [1.0, 2.0], [0.0, 4.0], 1), _update(1, [3.0, 6.0], [8.0, 0.0], 3)]
    out = FedIT().aggregate(1, global_state, ups)
    # p = (1/4, 3/4)
    assert torch.allclose(out[A], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]))
    assert torch.allclose(out[B], torch.tensor([0.75 * 8, 0.25 * 4]))


def test_fedprox_sets_the_proximal_term_and_aggregates_like_fedit():
    inst = FedProx(mu=0.1).configure(1, {A: torch.zeros(2)}, [3, 4])
    assert [i.plan["prox_mu"] for i in inst] == [0.1, 0.1]
    with pytest.raises(ValueError):
        FedProx(mu=-1)


def test_ffa_lora_sends_only_b_and_never_changes_a():
    a0 = torch.tensor([1.0, -1.0])
    global_state = {A: a0.clone(), B: torch.zeros(2)}
    strategy = FFALoRA()
    (inst,) = strategy.configure(1, global_state, [0])
    assert set(inst.state) == {B}
    assert inst.plan["frozen"] == ("lora_A",)
    assert inst.plan["upload_keys"] == [B]
    ups = [
        ClientUpdate(0, {B: torch.tensor([2.0, 2.0])}, 1),
        ClientUpdate(1, {B: torch.tensor([4.0, 0.0])}, 1),
    ]
    out = strategy.aggregate(1, global_state, ups)
    assert torch.equal(out[A], a0)
    assert torch.allclose(out[B], torch.tensor([3.0, 1.0]))


def test_weighted_average_rejects_zero_weights():
    with pytest.raises(ValueError):
        weighted_average([{A: torch.ones(1)}], [0.0])


def test_build_strategy_errors_name_the_culprit():
    with pytest.raises(FedhetError, match="nope"):
        build_strategy("nope")
    with pytest.raises(FedhetError, match="bogus"):
        build_strategy("fedprox", {"bogus": 1})
    assert isinstance(build_strategy("fedprox", {"mu": 0.5}), FedProx)
