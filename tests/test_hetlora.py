"""HetLoRA: sparsity weights, zero-padding, truncation and self-pruning on hand-built cases."""

import math

import torch

from fedhet.model.lora import factor_keys, ranks
from fedhet.protocol import ClientInfo, ClientUpdate
from fedhet.runtime.sim import Simulation
from fedhet.strategies import HetLoRA
from fedhet.strategies.hetlora import pruned_rank, update_norm

MOD = "m.layers.0.self_attn.q_proj"
A, B = factor_keys(MOD)
F64 = torch.float64


def _strategy(levels, n=2, **kw):
    """Clients 0..n-1; with profile [1, 1, 0, 0] and n = 2, client types are a seeded
    shuffle of {0, 1}, so the ranks are looked up rather than assumed."""
    strategy = HetLoRA(rank_profile=[1, 1, 0, 0], rank_levels=levels, **kw)
    state = {A: torch.arange(16.0, dtype=F64).reshape(4, 4), B: -torch.ones(4, 4, dtype=F64)}
    strategy.initialize(state, [ClientInfo(c, 10) for c in range(n)])
    return strategy, state


def _by_rank(strategy):
    return {r[MOD]: cid for cid, r in strategy.ranks.items()}


def test_update_norm_is_the_frobenius_norm_over_the_rank():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)
    assert math.isclose(update_norm(a, b), float((b @ a).norm()) / 3, rel_tol=1e-12)


def test_weights_padding_and_untouched_slots_on_a_hand_built_round():
    strategy, state = _strategy([1, 2, 3, 4])  # shared rank R = 4
    small, big = _by_rank(strategy)[1], _by_rank(strategy)[2]
    # rank 1: B A has one entry 2: ||B A||_F / r = 2
    up_small = {
        A: torch.tensor([[1.0, 0, 0, 0]], dtype=F64),
        B: torch.tensor([[2.0], [0], [0], [0]], dtype=F64),
    }
    # rank 2: B A has two entries 6: ||B A||_F / r = 6√2 / 2 = 3√2
    up_big = {
        A: torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0]], dtype=F64),
        B: torch.tensor([[6.0, 0], [0, 6], [0, 0], [0, 0]], dtype=F64),
    }
    out = strategy.aggregate(
        1, state, [ClientUpdate(small, up_small, 10), ClientUpdate(big, up_big, 10)]
    )
    w_small, w_big = 2 / (2 + 3 * math.sqrt(2)), 3 * math.sqrt(2) / (2 + 3 * math.sqrt(2))
    f_small, f_big = math.sqrt(4 / 1), math.sqrt(4 / 2)  # √(R/r): scale-free factors
    slot0_a = w_small * f_small * up_small[A][0] + w_big * f_big * up_big[A][0]
    slot1_a = w_big * f_big * up_big[A][1]  # the rank-1 client pads slot 1 with zeros
    assert torch.allclose(out[A][0], slot0_a) and torch.allclose(out[A][1], slot1_a)
    assert torch.allclose(
        out[B][:, 0], w_small * f_small * up_small[B][:, 0] + w_big * f_big * up_big[B][:, 0]
    )
    assert torch.allclose(out[B][:, 1], w_big * f_big * up_big[B][:, 1])
    # slots 2, 3: no upload holds them, so they keep the previous global values
    assert torch.equal(out[A][2:], state[A][2:]) and torch.equal(out[B][:, 2:], state[B][:, 2:])


def test_truncation_hands_out_the_prefix_of_the_global_update():
    strategy, state = _strategy([1, 3, 3, 4])
    alpha = 16.0
    for inst in strategy.configure(1, state, [0, 1]):
        r = strategy.ranks[inst.client_id][MOD]
        assert ranks(inst.state) == {MOD: r}
        mine = alpha / r * inst.state[B] @ inst.state[A]
        prefix = alpha / 4 * state[B][:, :r] @ state[A][:r]
        assert torch.allclose(mine, prefix)
        assert inst.plan == {"rank_reg": (1e-3, 0.99)}


def test_pruned_rank_cuts_a_small_tail_only():
    a = torch.ones(4, 3)
    b = torch.ones(5, 4)
    assert pruned_rank(a, b, 0.99, 0.1, 1) == 4  # equal slots: kept
    b[:, 3] = 1e-3  # the tail (slot ⌊0.99·4⌋ = 3) nearly vanished
    assert pruned_rank(a, b, 0.99, 0.1, 1) == 3
    assert pruned_rank(a, b, 0.99, 0.1, 4) == 4  # never below min_rank
    assert pruned_rank(a[:1], b[:, :1], 0.99, 0.1, 1) == 1  # rank 1: nothing to cut


def test_a_pruned_client_trains_a_smaller_rank_next_round_and_it_is_checkpointed():
    strategy, state = _strategy([2, 4, 4, 4])
    cid = _by_rank(strategy)[4]
    gen = torch.Generator().manual_seed(0)
    up = {
        A: torch.randn(4, 4, generator=gen, dtype=F64),
        B: torch.randn(4, 4, generator=gen, dtype=F64),
    }
    up[B][:, 3] *= 1e-4
    out = strategy.aggregate(1, state, [ClientUpdate(cid, up, 10)])
    assert strategy.ranks[cid][MOD] == 3
    assert torch.equal(out[A][3], state[A][3])  # the pruned tail never reached the global
    (inst,) = strategy.configure(2, out, [cid])
    assert ranks(inst.state) == {MOD: 3}
    restored, _ = _strategy([2, 4, 4, 4])
    restored.load_state_dict(strategy.state_dict())
    assert restored.ranks == strategy.ranks


def test_pruning_keeps_the_trained_update_of_the_kept_slots():
    """A rank-2 client pruned to 1 counts with its own ΔW = (α/2)·b a, not twice it."""
    strategy, state = _strategy([2, 4, 4, 4])
    cid = _by_rank(strategy)[2]
    up = {
        A: torch.tensor([[1.0, 2, 0, 0], [0, 0, 1, 0]], dtype=F64),
        B: torch.tensor([[3.0, 1e-5], [1, 0], [0, 0], [0, 0]], dtype=F64),
    }
    out = strategy.aggregate(1, state, [ClientUpdate(cid, up, 10)])
    assert strategy.ranks[cid][MOD] == 1
    alpha = 16.0
    kept = alpha / 2 * up[B][:, :1] @ up[A][:1]
    assert torch.allclose(alpha / 4 * out[B][:, :1] @ out[A][:1], kept)
    assert "aggregation_error" in strategy.metrics()


def test_hetlora_runs_in_the_simulator_with_the_regulariser(smoke_config):
    cfg = smoke_config(
        "strategy.name=hetlora",
        "strategy.params={rank_profile: heavy-tail-strong}",
        "lora.rank=6",
        "federation.rounds=1",
        "eval.local_clients=1",
    )
    sim = Simulation(cfg)
    result = sim.run()
    assert max(r for c in sim.strategy.ranks.values() for r in c.values()) == 6
    assert result.summary["rejected"] == 0 and result.summary["updates_applied"] == 3
    assert all(torch.isfinite(t).all() for t in result.state.values())
    assert math.isfinite(result.metrics[-1]["global_loss"])
