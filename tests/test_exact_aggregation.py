"""The exact-aggregation family (issue #22): FedEx-LoRA, RoLoRA, FedSVD, FedSA-LoRA on
hand-made states, the base delta on the shared model (exact, restored, resumed, exported
as a PEFT folder), and the aggregation error every factor-averaging method logs."""

import shutil

import pytest
import torch
from peft import PeftModel

from fedhet.data import encode, load_source
from fedhet.data.encode import collate
from fedhet.model import load_base_model
from fedhet.model.lora import LoraModel, LoraSpec, delta_key, state_bytes
from fedhet.protocol import ClientInfo, ClientUpdate
from fedhet.runtime.sim import Simulation
from fedhet.strategies import FedExLoRA, FedIT, FedSALoRA, FedSVD, FLoRA, RoLoRA
from fedhet.strategies.base import aggregation_error
from fedhet.strategies.fedsvd import refactor

A = "m.layers.0.q.lora_A.weight"
B = "m.layers.0.q.lora_B.weight"


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _product(state):
    return state[B].double() @ state[A].double()


def test_aggregation_error_by_hand_for_fedit():
    start = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    one = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [0.0]])}
    two = {A: torch.tensor([[0.0, 1.0]]), B: torch.tensor([[0.0], [1.0]])}
    fedit = FedIT()
    new = fedit.aggregate(1, start, [ClientUpdate(0, one, 1), ClientUpdate(1, two, 1)])
    # mean(B)·mean(A) = [[.25, .25], [.25, .25]]; mean(B·A) = [[.5, 0], [0, .5]]
    # error ‖[[−.25, .25], [.25, −.25]]‖ = 0.5 over ‖mean(B·A)‖ = √0.5
    assert fedit.metrics()["aggregation_error"] == pytest.approx(0.5 / 0.5**0.5)
    assert aggregation_error(new, [one, two], [1.0, 1.0]) == pytest.approx(0.5 / 0.5**0.5)
    assert aggregation_error(start, [start], [1.0]) == 0.0


def test_rolora_alternates_factors_and_aggregates_exactly():
    strategy = RoLoRA()
    state = {A: _rand(4, 6, seed=0), B: _rand(5, 4, seed=1)}
    for rnd, trained in ((1, B), (2, A), (3, B)):
        insts = strategy.configure(rnd, state, [0, 1])
        frozen = "lora_A" if trained == B else "lora_B"
        assert all(i.plan["frozen"] == (frozen,) and i.plan["upload_keys"] == [trained]
                   for i in insts)
        assert all(set(i.state) == {A, B} for i in insts)  # both factors go down
        sent = [
            ClientUpdate(c, {trained: state[trained] + _rand(*state[trained].shape, seed=9 + c)},
                         n)
            for c, n in ((0, 10), (1, 30))
        ]
        clients = [{**state, **u.state} for u in sent]
        new = strategy.aggregate(rnd, state, sent)
        other = A if trained == B else B
        assert torch.equal(new[other], state[other])
        target = 0.25 * _product(clients[0]) + 0.75 * _product(clients[1])
        assert torch.allclose(_product(new), target, atol=1e-5)
        assert strategy.metrics()["aggregation_error"] < 1e-6
        state = new


def test_fedsvd_keeps_the_product_and_gives_an_orthonormal_a():
    state = {A: _rand(4, 9, seed=2), B: _rand(7, 4, seed=3)}
    out = refactor(state)
    assert torch.allclose(_product(out), _product(state), atol=1e-5)
    assert torch.allclose(out[A] @ out[A].T, torch.eye(4), atol=1e-5)
    norms = out[B].norm(dim=0)
    assert (norms[:-1] >= norms[1:] - 1e-6).all()  # columns U·S by singular value
    zero = refactor({A: _rand(4, 9, seed=4), B: torch.zeros(7, 4)})  # B = 0 at the start
    assert torch.allclose(zero[A] @ zero[A].T, torch.eye(4), atol=1e-5)
    assert torch.equal(zero[B], torch.zeros(7, 4))

    strategy = FedSVD()
    (inst,) = strategy.configure(1, state, [0])
    assert inst.plan["frozen"] == ("lora_A",) and inst.plan["upload_keys"] == [B]
    sent = [ClientUpdate(c, {B: _rand(7, 4, seed=5 + c)}, n) for c, n in ((0, 1), (1, 3))]
    new = strategy.aggregate(1, state, sent)
    weights = (0.25, 0.75)
    target = sum(
        w * (u.state[B].double() @ state[A].double()) for u, w in zip(sent, weights, strict=True)
    )
    assert torch.allclose(_product(new), target, atol=1e-5)
    assert strategy.metrics()["aggregation_error"] < 1e-6


def test_fedsa_lora_never_sends_b_down_and_keeps_it_personal():
    state = {A: torch.ones(2, 3), B: torch.full((4, 2), 5.0)}
    strategy = FedSALoRA()
    (inst,) = strategy.configure(1, state, [0])
    assert set(inst.state) == {A} and set(inst.plan["upload_keys"]) == {A, B}
    (a_only,) = FedSALoRA(share_b=False).configure(1, state, [0])
    assert a_only.plan["upload_keys"] == [A] and set(a_only.state) == {A}
    sent = [ClientUpdate(0, {A: torch.zeros(2, 3), B: torch.ones(4, 2)}, 1),
            ClientUpdate(1, {A: torch.full((2, 3), 2.0), B: torch.full((4, 2), 3.0)}, 1)]
    new = strategy.aggregate(1, state, sent)
    assert torch.equal(new[A], torch.ones(2, 3)) and torch.equal(new[B], torch.full((4, 2), 2.0))
    own = {A: torch.zeros(2, 3), B: torch.full((4, 2), 7.0)}
    local = strategy.evaluation_state(new, own)
    assert torch.equal(local[A], new[A]) and torch.equal(local[B], own[B])
    assert strategy.evaluation_state(new) is new


def test_the_simulator_logs_the_aggregation_error(smoke_config):
    common = ("federation.rounds=2", "train.batch_size=2", "data.max_length=32",
              "eval.global_size=4", "eval.local_clients=0")
    errors = {}
    for name in ("fedit", "rolora", "fedsvd", "flora"):
        run = Simulation(smoke_config(*common, f"name={name}", f"strategy.name={name}")).run()
        rows = [r for r in run.metrics if "round" in r]
        errors[name] = [r["aggregation_error"] for r in rows]
    assert all(e < 1e-5 for e in errors["rolora"] + errors["fedsvd"] + errors["flora"])
    assert errors["fedit"][-1] > 1e-4  # separate averages of A and B are not the average


def test_aggregation_error_takes_each_state_at_its_own_rank():
    """ΔW/α = B·A / r: a rank-1 client and a rank-2 one with the same ΔW average to it."""
    one = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [0.0]])}
    two = {A: torch.tensor([[1.0, 0.0], [1.0, 0.0]]), B: torch.tensor([[1.0, 1.0], [0.0, 0.0]])}
    # two: B·A = [[2, 0], [0, 0]] at scaling α/2, the same ΔW as one at α/1
    assert aggregation_error(one, [one, two], [1.0, 3.0]) == pytest.approx(0.0)
    assert aggregation_error(two, [one], [1.0]) == pytest.approx(0.0)
    half = {A: one[A], B: one[B] / 2}
    assert aggregation_error(half, [two], [1.0]) == pytest.approx(0.5)


def test_aggregation_error_from_the_factors_matches_the_dense_products():
    """Below the module's width the norms come from thin QRs of the stacked factors;
    with a base delta (or a stack as wide as the module) from dense products.
    Both match the error computed from each state's dense ΔW/α."""
    a, b = "m.q.lora_A.weight", "m.q.lora_B.weight"

    def state(r, seed, delta=False):
        s = {a: _rand(r, 40, seed=seed), b: _rand(30, r, seed=seed + 1)}
        return {**s, delta_key("m.q"): _rand(30, 40, seed=seed + 2)} if delta else s

    def dense(s):
        full = s[b].double() @ s[a].double()
        if delta_key("m.q") in s:
            full = full + s[delta_key("m.q")].double()
        return full / s[a].shape[0]

    clients, weights = [state(2, 10), state(4, 20), state(1, 30)], [1.0, 2.0, 5.0]
    for applied in (state(4, 40), state(4, 40, delta=True)):
        target = sum(w / 8.0 * dense(c) for c, w in zip(clients, weights, strict=True))
        want = float((dense(applied) - target).norm() / target.norm())
        assert aggregation_error(applied, clients, weights) == pytest.approx(want, rel=1e-9)
    wide = [state(8, 50 + i) for i in range(6)]  # Σr = 56 > 30: the dense product
    target = sum(dense(c) for c in wide) / 6
    want = float((dense(wide[0]) - target).norm() / target.norm())
    assert aggregation_error(wide[0], wide, [1.0] * 6) == pytest.approx(want, rel=1e-9)
    # a tiny departure is resolved far below √ε (the thin-QR path, no cancellation)
    exact = {k: v.double() for k, v in clients[0].items()}
    near = {a: exact[a], b: exact[b] * (1 + 1e-9)}
    assert aggregation_error(near, [exact], [1.0]) == pytest.approx(1e-9, rel=1e-4)


def test_aggregation_error_of_wide_stacks_is_a_seeded_probe_estimate():
    """Beyond SKETCH_RANK stacked columns the dense difference is not formed: the norms
    are estimated from Gaussian probes (relative std ≤ √(2/m) per module's squared
    norm), reproducibly; an exact global model still reads as exact."""
    mods = [f"m.layers.{i}.q" for i in range(6)]

    def state(r, seed):
        out = {}
        for j, m in enumerate(mods):
            out[f"{m}.lora_A.weight"] = _rand(r, 70, seed=seed + 10 * j)
            out[f"{m}.lora_B.weight"] = _rand(60, r, seed=seed + 10 * j + 1)
        return out

    clients = [state(48, 100 * i) for i in range(6)]  # Σr = 288 + the applied 48 > 256
    applied = state(48, 999)
    dense = {m: sum(c[f"{m}.lora_B.weight"].double() @ c[f"{m}.lora_A.weight"].double()
                    for c in clients) / 6 / 48 for m in mods}
    mine = {m: applied[f"{m}.lora_B.weight"].double() @ applied[f"{m}.lora_A.weight"].double()
            / 48 for m in mods}
    want = (sum(float((mine[m] - dense[m]).pow(2).sum()) for m in mods)
            / sum(float(dense[m].pow(2).sum()) for m in mods)) ** 0.5
    got = aggregation_error(applied, clients, [1.0] * 6)
    assert got == pytest.approx(want, rel=0.1)  # 6 modules: std of the ratio ≈ 5 %
    assert got != pytest.approx(want, rel=1e-6)  # an estimate, not the dense figure
    assert aggregation_error(applied, clients, [1.0] * 6) == got  # seeded
    # an exact global model (the stacked factors themselves) reads as exact
    stacked = {}
    for m in mods:
        stacked[f"{m}.lora_A.weight"] = torch.cat([c[f"{m}.lora_A.weight"] for c in clients])
        stacked[f"{m}.lora_B.weight"] = torch.cat([c[f"{m}.lora_B.weight"] for c in clients], 1)
    assert aggregation_error(stacked, clients, [1.0] * 6) < 1e-6


# ---------------------------------------------------------------- FedEx-LoRA and the base delta
def test_fedex_lora_applies_exactly_the_average_of_the_clients_updates():
    strategy = FedExLoRA()
    state = {A: _rand(3, 5, seed=10), B: _rand(4, 3, seed=11)}
    for rnd in (1, 2):  # the second round starts from a state holding a delta
        (inst,) = strategy.configure(rnd, state, [0])
        assert set(inst.state) == set(state) and inst.plan["upload_keys"] == [A, B]
        sent = [
            ClientUpdate(c, {A: state[A] + _rand(3, 5, seed=20 + c), B: _rand(4, 3, seed=30 + c)},
                         n)
            for c, n in ((0, 1), (1, 3))
        ]
        new = strategy.aggregate(rnd, state, sent)
        old = state.get(delta_key("m.layers.0.q"), torch.zeros(4, 5)).double()
        target = sum(
            w * (u.state[B].double() @ u.state[A].double())
            for u, w in zip(sent, (0.25, 0.75), strict=True)
        ) + old
        got = _product(new) + new[delta_key("m.layers.0.q")].double()
        assert torch.allclose(got, target, atol=1e-5)
        assert torch.allclose(new[A], 0.25 * sent[0].state[A] + 0.75 * sent[1].state[A])
        assert strategy.metrics()["aggregation_error"] < 1e-6
        state = new


def test_a_base_delta_is_applied_exactly_and_w0_comes_back_bit_for_bit(tiny_model):
    model, tok = tiny_model
    lm = LoraModel(model, LoraSpec(rank=4, alpha=8))
    mod = lm.modules[0]
    weight = lm._layers[mod].base_layer.weight  # noqa: SLF001 (the shared model's W0)
    w0 = weight.detach().clone()
    init = lm.init_state(0)
    delta = _rand(*w0.shape, seed=40) * 1e-2
    lm.load_state({**init, delta_key(mod): delta})
    assert torch.allclose(weight, w0 + (8 / 4) * delta, atol=1e-7)
    lm.load_state(init)
    assert torch.equal(weight, w0)
    with pytest.raises(KeyError, match="not in the model"):
        lm.load_state({**init, delta_key("nope.layers.0.q"): delta})


def test_fedex_lora_resumes_bit_identically_and_its_peft_folder_gives_the_same_logits(
    smoke_config,
):
    common = ("strategy.name=fedex-lora", "federation.rounds=2", "train.batch_size=2",
              "data.max_length=32", "eval.global_size=4", "eval.local_clients=0")
    sim = Simulation(smoke_config(*common, "name=fedex"))
    full = sim.run()
    fresh, _ = load_base_model("tiny")
    w0 = dict(fresh.named_parameters())
    assert all(torch.equal(p, w0[n]) for n, p in sim.lm.model.get_base_model().named_parameters()
               if n in w0)  # the run leaves the shared model's base weights at W0
    deltas = {k for k in full.state if k.endswith(".base_delta")}
    assert deltas and all(r["aggregation_error"] < 1e-5 for r in full.metrics if "round" in r)
    rows = [r for r in full.metrics if "round" in r]
    factors = state_bytes({k: v for k, v in full.state.items() if k not in deltas})
    per_client_down = rows[-1]["bytes_down"] - rows[0]["bytes_down"]  # round 2 sends E too
    assert per_client_down == rows[-1]["clients"] * state_bytes(full.state) > factors

    cut = full.run_dir.parent / "cut"
    shutil.copytree(full.run_dir, cut)
    (cut / "checkpoints" / "ckpt-00000002.pt").unlink()
    resumed = Simulation(smoke_config(*common, "name=cut")).run(resume=True)
    assert set(resumed.state) == set(full.state)
    assert all(torch.equal(full.state[k], resumed.state[k]) for k in full.state)

    # the PEFT folder (E folded into factors of the rank it needs) reproduces the model
    batch = collate(encode(load_source("dolly", limit=4), sim.tokenizer, 32), sim.pad_id)
    sim.lm.load_state(full.state)
    with torch.no_grad():
        ours = sim.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    sim.lm.restore_base()
    peft = PeftModel.from_pretrained(fresh, str(full.run_dir / "final_adapter"))
    with torch.no_grad():
        theirs = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_flora_merges_the_stacked_product_and_restarts_the_adapter():
    mod = "m.layers.0.q"
    state = {A: _rand(4, 8, seed=50), B: torch.zeros(6, 4)}
    strategy = FLoRA(rank_profile=[0.5, 0.0, 0.0, 0.5], rank_levels=[2, 2, 4, 4], seed=1)
    strategy.initialize(state, [ClientInfo(0, 10), ClientInfo(1, 30)])
    ranks_ = {c: strategy.ranks[c][mod] for c in (0, 1)}
    assert sorted(ranks_.values()) == [2, 4]
    first = {i.client_id: i for i in strategy.configure(1, state, [0, 1])}
    for c, inst in first.items():  # a fresh adapter: B = 0, the shared seeded A's first rows
        assert inst.state[A].shape == (ranks_[c], 8) and not inst.state[B].any()
    assert torch.equal(first[0].state[A], first[1].state[A][: ranks_[0]]) or torch.equal(
        first[1].state[A], first[0].state[A][: ranks_[1]]
    )
    sent = [
        ClientUpdate(c, {A: _rand(ranks_[c], 8, seed=60 + c), B: _rand(6, ranks_[c], seed=70 + c)},
                     n)
        for c, n in ((0, 10), (1, 30))
    ]
    new = strategy.aggregate(1, state, sent)
    # E = Σ p_k (R / r_k) B_k A_k: every client's update in the global scaling α/R
    merged = sum(
        w * (4 / ranks_[u.client_id]) * (u.state[B].double() @ u.state[A].double())
        for u, w in zip(sent, (0.25, 0.75), strict=True)
    )
    assert torch.allclose(new[delta_key(mod)].double(), merged, atol=1e-5)
    assert not new[B].any() and not torch.equal(new[A], state[A])  # a fresh adapter again
    # mixed ranks: each state at its own scaling α/r, so the exact merge measures 0
    assert strategy.metrics()["aggregation_error"] < 1e-6
    # a second round over a non-zero E: each client trained on (r_k / R)·E
    again = [ClientUpdate(u.client_id, {A: u.state[A] * 2, B: u.state[B]}, u.num_samples)
             for u in sent]
    strategy.aggregate(2, new, again)
    assert strategy.metrics()["aggregation_error"] < 1e-6
    # the next round sends E scaled to each client's rank: (α/r_k)·(r_k/R)·E = (α/R)·E
    for inst in strategy.configure(2, new, [0, 1]):
        r = ranks_[inst.client_id]
        assert torch.allclose(inst.state[delta_key(mod)], new[delta_key(mod)] * (r / 4))
        assert inst.plan["upload_keys"] == [A, B]


def test_fedsa_lora_keeps_each_clients_b_in_the_simulator(smoke_config):
    cfg = smoke_config("strategy.name=fedsa-lora", "federation.rounds=2", "train.batch_size=2",
                       "data.max_length=32", "eval.global_size=4", "eval.local_clients=1")
    sim = Simulation(cfg)
    result = sim.run()
    b_keys = [k for k in result.state if ".lora_B." in k]
    own = list(sim.client_states.values())
    assert len(own) >= 2 and not torch.equal(own[0][b_keys[0]], own[1][b_keys[0]])
    last = result.metrics[-1]
    updates = sum(r["clients"] for r in result.metrics if "round" in r)
    a_bytes = state_bytes({k: v for k, v in result.state.items() if k not in b_keys})
    b_bytes = state_bytes({k: result.state[k] for k in b_keys})
    assert last["bytes_down"] == updates * a_bytes  # only A goes down
    assert last["bytes_up"] == updates * (a_bytes + b_bytes)  # A, and B for the global figure
    assert "local_loss_mean" in last
