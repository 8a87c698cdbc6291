"""FlexLoRA: the factored SVD against the dense construction, the redistribution,
update checks, and the rank profiles of :mod:`fedhet.strategies.ranks`."""

import math
from collections import Counter

import pytest
import torch

from fedhet.errors import FedhetError
from fedhet.model.lora import delta_key, factor_keys, ranks
from fedhet.protocol import ClientInfo, ClientUpdate
from fedhet.runtime.sim import Simulation
from fedhet.strategies import FlexLoRA, build_strategy
from fedhet.strategies.flexlora import aggregate_module, factored_svd
from fedhet.strategies.ranks import (
    RankPlan,
    memory_type,
    profile_shares,
    profile_types,
    scaled_levels,
)

F64 = torch.float64
ATTN = "base_model.model.model.layers.0.self_attn.q_proj"
MLP = "base_model.model.model.layers.0.mlp.up_proj"
SHAPES = {ATTN: (48, 40), MLP: (96, 40)}  # (d_out, d_in)
ALPHA = 16.0


def _factors(ranks_, d_out, d_in, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(d_out, r, generator=gen, dtype=F64),
            torch.randn(r, d_in, generator=gen, dtype=F64),
        )
        for r in ranks_
    ]


def _dense_truncation(m, r):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _rel(x, y):
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize(
    ("client_ranks", "d_out", "d_in"),
    [
        ([2, 8, 8, 30, 2, 2], 96, 64),  # Σr = 52 < both widths: QRs and a 52 × 52 core
        ([8, 30, 30, 30, 8], 160, 64),  # d_in < Σr = 106 < d_out: the product
        ([30] * 8, 64, 96),  # Σr = 240 > both: the product
    ],
)
def test_factored_svd_equals_the_dense_construction_for_every_rank_handed_out(
    client_ranks, d_out, d_in
):
    factors = _factors(client_ranks, d_out, d_in, seed=len(client_ranks))
    p = torch.rand(len(client_ranks), generator=torch.Generator().manual_seed(1), dtype=F64)
    weights = [float(pk / p.sum()) * ALPHA / r for pk, r in zip(p, client_ranks, strict=True)]
    dense = sum(w * b @ a for (b, a), w in zip(factors, weights, strict=True))
    top = max(client_ranks)
    exact = torch.linalg.svdvals(dense)[:top]
    # the small-core path is float64 throughout; the dense path (Σr ≥ width) forms and
    # decomposes the product in float32 unless told otherwise
    dense_path = sum(client_ranks) >= min(d_out, d_in)
    u, s, v = factored_svd(factors, weights, top)
    assert torch.allclose(s, exact, rtol=1e-5 if dense_path else 1e-10, atol=0)
    for r in sorted(set(client_ranks)):
        assert _rel((u[:, :r] * s[:r]) @ v[:, :r].T, _dense_truncation(dense, r)) <= 1e-5
    _, s64, _ = factored_svd(factors, weights, top, dense_dtype=F64)
    assert torch.allclose(s64, exact, rtol=1e-10, atol=0)


def test_truncation_at_full_rank_reproduces_the_average_update():
    factors = _factors([1, 3, 2], 30, 20, seed=3)
    weights = [0.2, 0.5, 0.3]
    dense = sum(w * b @ a for (b, a), w in zip(factors, weights, strict=True))
    u, s, v = factored_svd(factors, weights, 6)  # Σr = 6: ΔW_g has rank 6
    assert _rel((u * s) @ v.T, dense) <= 1e-12


def test_truncation_is_the_best_rank_r_approximation():
    """Eckart–Young: ||ΔW − T_r||_F² = Σ_{i>r} σ_i², the least any rank-r matrix reaches."""
    factors = _factors([4, 8, 2, 8], 50, 40, seed=5)
    weights = [0.1, 0.4, 0.3, 0.2]
    dense = sum(w * b @ a for (b, a), w in zip(factors, weights, strict=True))
    sigma = torch.linalg.svdvals(dense)
    for r in (1, 4, 8, 15):
        u, s, v = factored_svd(factors, weights, r)
        error = float((dense - (u * s) @ v.T).norm() ** 2)
        assert math.isclose(error, float((sigma[r:] ** 2).sum()), rel_tol=1e-9)


@pytest.mark.parametrize("dense", [False, True])
def test_missing_singular_directions_are_completed_orthonormally(dense):
    factors = _factors([1, 1], 12, 10, seed=7)  # ΔW_g has rank 2, 5 slots asked
    if dense:  # a zero-B client of rank 10 makes Σr ≥ width: the Gram path, rank 2 still
        factors.append((torch.zeros(12, 10, dtype=F64), torch.randn(10, 10, dtype=F64)))
    u, s, v = factored_svd(factors, [0.5, 0.5, 0.1][: len(factors)], 5)
    assert u.shape == (12, 5) and v.shape == (10, 5)
    assert torch.allclose(v.T @ v, torch.eye(5, dtype=F64), atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=F64), atol=1e-12)
    assert torch.all(s[2:] == 0) and torch.all(s[:2] > 0)


@pytest.mark.parametrize(
    ("client_ranks", "tol"),
    [
        ([2, 2], 1e-12),  # Σr = 4 ≤ R = 6: the truncation is ΔW_g, the remainder exactly 0
        ([2, 8, 8], 1e-12),  # R < Σr = 18 < width 40: the remainder is the SVD's tail
        ([30, 30], 1e-5),  # Σr = 60 ≥ width: the float32 product
    ],
)
def test_aggregate_module_keeps_the_whole_update_in_factors_plus_remainder(client_ranks, tol):
    factors = _factors(client_ranks, 48, 40, seed=3)
    weights = [0.25 / r for r in client_ranks]
    a, b, delta = aggregate_module(factors, weights, 6)
    m = sum(w * bk @ ak for (bk, ak), w in zip(factors, weights, strict=True))
    assert _rel(b @ a, 6 * _dense_truncation(m, 6)) <= 1e-5
    assert _rel(b @ a + delta, 6 * m) <= tol
    assert torch.all(delta == 0) == (sum(client_ranks) <= 6)


# ------------------------------------------------------------------ strategy


def _global_state(rank):
    state = {}
    for mod, (d_out, d_in) in SHAPES.items():
        a_key, b_key = factor_keys(mod)
        state[a_key] = torch.randn(rank, d_in, generator=torch.Generator().manual_seed(0))
        state[b_key] = torch.zeros(d_out, rank)
    return state


def _clients(n, samples=10):
    return [ClientInfo(c, samples + c) for c in range(n)]


def _trained(strategy, cid, seed):
    """A client's upload: random factors at its assigned ranks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for mod, r in strategy.ranks[cid].items():
        a_key, b_key = factor_keys(mod)
        d_out, d_in = SHAPES[mod]
        out[a_key] = torch.randn(r, d_in, generator=gen, dtype=F64)
        out[b_key] = torch.randn(d_out, r, generator=gen, dtype=F64)
    return out


def _delta_w(state, mod):
    a_key, b_key = factor_keys(mod)
    a, b = state[a_key].double(), state[b_key].double()
    return ALPHA / a.shape[0] * b @ a


def _product(state, mod):
    a_key, b_key = factor_keys(mod)
    return state[b_key].double() @ state[a_key].double()


def test_flexlora_aggregates_and_hands_each_client_its_truncation():
    strategy = FlexLoRA(rank_profile="uniform", rank_levels=[1, 2, [2, 6], 6])
    state = {k: v.double() for k, v in _global_state(6).items()}
    clients = _clients(8)
    state = strategy.initialize(state, clients)
    assert Counter(r[MLP] for r in strategy.ranks.values()) == {1: 2, 2: 2, 6: 4}
    assert Counter(r[ATTN] for r in strategy.ranks.values()) == {1: 2, 2: 4, 6: 2}
    updates = [
        ClientUpdate(c.client_id, _trained(strategy, c.client_id, c.client_id), c.num_samples)
        for c in clients
    ]
    new = strategy.aggregate(1, state, updates)
    total = sum(c.num_samples for c in clients)
    for mod in SHAPES:
        target = sum(u.num_samples / total * _delta_w(u.state, mod) for u in updates)
        assert _rel(_delta_w(new, mod), _dense_truncation(target, 6)) <= 1e-5
        # the global model is ΔW_g itself: the truncated factors plus the base delta
        exact = ALPHA / 6 * (new[delta_key(mod)].double() + _product(new, mod))
        assert _rel(exact, target) <= 1e-10
        for inst in strategy.configure(2, new, [c.client_id for c in clients]):
            assert not any(k.endswith(".base_delta") for k in inst.state)  # never sent
            r = strategy.ranks[inst.client_id][mod]
            assert ranks(inst.state)[mod] == r
            assert _rel(_delta_w(inst.state, mod), _dense_truncation(target, r)) <= 1e-5
    assert strategy.metrics()["aggregation_error"] <= 1e-10  # logged: the global is exact


def test_ranks_above_the_shared_adapter_fail_naming_lora_rank():
    strategy = FlexLoRA(rank_profile="uniform", rank_levels=[1, 2, 4, 8])
    with pytest.raises(FedhetError, match="lora.rank"):
        strategy.initialize(_global_state(6), _clients(4))


# ------------------------------------------------------------------ rank profiles


def test_paper_levels_scale_to_the_model_width():
    assert scaled_levels(2048) == [(8, 8), (30, 30), (30, 200), (200, 200)]
    assert scaled_levels(576) == [(2, 2), (8, 8), (8, 56), (56, 56)]  # SmolLM2-135M
    assert scaled_levels(64) == [(1, 1), (1, 1), (1, 6), (6, 6)]  # the tiny test model


def test_profiles_give_exact_counts_reproducibly():
    types = profile_types(profile_shares("heavy-tail"), 20, seed=0)
    assert Counter(types) == {0: 17, 1: 1, 2: 1, 3: 1}
    assert types == profile_types(profile_shares("heavy-tail"), 20, seed=0)
    assert types != profile_types(profile_shares("heavy-tail"), 20, seed=1)
    assert Counter(profile_types(profile_shares("heavy-tail-strong"), 20, 0))[3] == 17
    assert set(profile_types(profile_shares("homo"), 7, 0)) == {0}
    normal = profile_shares("normal")
    assert normal[1] == normal[2] > 0.4 and normal[0] == normal[3] < 0.06
    assert profile_shares([1, 1, 0, 2]) == (0.25, 0.25, 0.0, 0.5)


def test_memory_profile_follows_the_devices():
    gib = 2**30
    assert [memory_type(m * gib, (0, 8, 16, 24)) for m in (4, 8, 16, 24, 64)] == [0, 1, 2, 3, 3]
    plan = RankPlan("memory", [1, 2, [2, 5], 5])
    clients = [ClientInfo(0, 5, memory_bytes=4 * gib), ClientInfo(1, 5, memory_bytes=16 * gib)]
    assigned = plan.assign(_global_state(6), clients)
    assert assigned == {0: {ATTN: 1, MLP: 1}, 1: {ATTN: 2, MLP: 5}}


def test_bad_rank_parameters_are_config_errors():
    with pytest.raises(FedhetError, match="rank_profile"):
        build_strategy("flexlora", {"rank_profile": "fat-tail"})
    with pytest.raises(FedhetError, match="rank_levels"):
        build_strategy("flexlora", {"rank_levels": [1, 2, 3]})
    with pytest.raises(FedhetError, match="memory_gb"):
        build_strategy("hetlora", {"memory_gb": [0, 16, 8, 24]})


# ------------------------------------------------------------------ simulator


def test_flexlora_runs_in_the_simulator_with_mixed_ranks(smoke_config):
    cfg = smoke_config(
        "strategy.name=flexlora",
        "strategy.params={rank_profile: uniform}",
        "lora.rank=6",
        "federation.rounds=1",
        "eval.local_clients=1",
    )
    sim = Simulation(cfg)
    result = sim.run()
    assert {r for c in sim.strategy.ranks.values() for r in c.values()} == {1, 6}
    assert set(ranks(result.state).values()) == {6}
    assert result.summary["rejected"] == 0 and result.summary["updates_applied"] == 3
    assert all(torch.isfinite(t).all() for t in result.state.values())
    assert math.isfinite(result.metrics[-1]["global_loss"])
