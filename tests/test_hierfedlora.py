import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedhet.client.train import TrainPlan, local_update
from fedhet.data.encode import Example
from fedhet.errors import FedhetError
from fedhet.model.lora import LoraModel, LoraSpec, select_layers, state_bytes, top_layers
from fedhet.protocol import ClientInfo, ClientUpdate, CostModel, GroupResult
from fedhet.runtime.sim import Simulation
from fedhet.strategies import build_strategy
from fedhet.strategies.hier_planner import (
    Member,
    ProgressModel,
    group_time,
    max_depth,
    plan_groups,
)
from fedhet.strategies.hierfedlora import HierFedLoRA, layerwise_average


def _key(layer: int, factor: str) -> str:
    return f"m.layers.{layer}.q.lora_{factor}.weight"


def _state(num_layers: int, value: float = 0.0) -> dict[str, torch.Tensor]:
    return {_key(layer, f): torch.full((2, 2), value) for layer in range(num_layers) for f in "AB"}


def _cost(num_layers: int, clients: list[int], steps: int = 4) -> CostModel:
    return CostModel(
        num_layers=num_layers,
        round_steps=steps,
        flops_per_token=tuple(1e9 * (1 + 2 * d / num_layers) for d in range(num_layers + 1)),
        memory_bytes=tuple(1e9 + d * 1e8 for d in range(num_layers + 1)),
        layer_bytes=(1e5,) * num_layers,
        tokens_per_step={c: 100.0 for c in clients},
        up_bps={c: 1e7 for c in clients},
        down_bps={c: 1e7 for c in clients},
        group_up_bps=1e9,
        group_down_bps=1e9,
        lan_bps=1e8,
    )


# ---------------------------------------------------------------- server aggregation
def test_layerwise_aggregation_averages_each_block_over_the_groups_that_trained_it():
    glob = _state(3, value=-1.0)
    deep = GroupResult(0, select_layers(_state(3, 1.0), [1, 2]), num_samples=30, layers=[1, 2])
    shallow = GroupResult(1, select_layers(_state(3, 5.0), [2]), num_samples=10, layers=[2])
    out = layerwise_average(glob, [deep, shallow])
    for f in "AB":
        # block 2: both groups, weights 30/40 and 10/40
        assert torch.allclose(out[_key(2, f)], torch.full((2, 2), 0.75 * 1.0 + 0.25 * 5.0))
        # block 1: the deep group only
        assert torch.equal(out[_key(1, f)], torch.full((2, 2), 1.0))
        # block 0: trained by nobody, the global tensor is kept
        assert torch.equal(out[_key(0, f)], glob[_key(0, f)])


# ---------------------------------------------------------------- depth and backward work
def _layer_flops(counter: FlopCounterMode, layer: int) -> int:
    counts = counter.get_flop_counts()
    (name,) = [k for k in counts if k.endswith(f".layers.{layer}")]
    return sum(counts[name].values())


def test_blocks_below_the_depth_get_no_gradient_and_no_backward_flops(tiny_model):
    model, tokenizer = tiny_model
    lm = LoraModel(model, LoraSpec(rank=4, alpha=8))
    assert lm.num_layers == 2
    start = lm.init_state(0)
    start = {k: v + 0.01 if k.endswith("lora_B.weight") else v for k, v in start.items()}
    ids = list(range(5, 29))
    examples = [Example(input_ids=ids, labels=ids)]  # one example: every batch is the same
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        lm.load_state(start)
        lm.model(input_ids=torch.tensor([ids]))
    forward = _layer_flops(forward_only, 0)

    flops, total, trained = {}, {}, {}
    for depth in (1, 2):
        plan = TrainPlan(
            steps=1, batch_size=1, lr=1e-2, trainable_layers=top_layers(lm.num_layers, depth)
        )
        with FlopCounterMode(display=False) as counter:
            result = local_update(lm, examples, start, plan, pad_id=tokenizer.pad_token_id)
        flops[depth], total[depth] = _layer_flops(counter, 0), counter.get_total_flops()
        trained[depth] = result.state
    # depth 1: block 0 runs its forward pass and nothing else
    assert flops[1] == forward
    assert flops[2] >= 1.5 * forward  # depth 2 backpropagates through block 0
    assert total[2] - total[1] >= forward // 2
    for key in select_layers(start, [0]):
        assert torch.equal(trained[1][key], start[key])  # no gradient reached block 0
        assert not torch.equal(trained[2][key], start[key])
    assert any(not torch.equal(trained[1][k], start[k]) for k in select_layers(start, [1]))


# ---------------------------------------------------------------- the planner
def test_a_faster_group_runs_more_intra_group_rounds_in_the_slower_groups_time():
    cost = _cost(4, [0, 1, 2, 3])
    rate = ProgressModel(4)  # the prior: ρ(d) = (d/4)^0.5
    fast = [Member(0, 1e13, 1e12), Member(1, 1e13, 1e12)]
    slow = [Member(2, 1e12, 1e12), Member(3, 1e12, 1e12)]
    fast_choice, slow_choice = plan_groups([fast, slow], cost, rate)
    assert fast_choice.tau > slow_choice.tau and fast_choice.stages == fast_choice.tau
    # the slow group takes its fastest plan that makes one FedIT round's progress ρ(L) ...
    target = rate.rate(4)
    assert slow_choice.progress >= target * (1 - 1e-9)
    for tau in (1, 2, 3, 4):
        for d in range(1, 5):
            if tau * rate.rate(d) >= target * (1 - 1e-9):
                assert group_time(cost, slow, tau, d) >= slow_choice.time - 1e-12
    # ... which sets the round's time; the fast group makes the most progress within it
    assert fast_choice.time <= slow_choice.time * (1 + 1e-9)
    for tau in (1, 2, 3, 4):
        for d in range(1, 5):
            if group_time(cost, fast, tau, d) <= slow_choice.time:
                assert tau * rate.rate(d) <= fast_choice.progress + 1e-12


def test_depths_differ_across_groups_with_different_memory():
    cost = _cost(4, [0, 1, 2, 3])
    small = [Member(0, 1e12, 1.25e9), Member(1, 1e12, 1e12)]  # M(d) = 1e9 + d·1e8: d ≤ 2
    large = [Member(2, 1e12, 1e12), Member(3, 1e12, 1e12)]
    assert max_depth(cost, small) == 2 and max_depth(cost, large) == 4
    deep_pays = ProgressModel(4, exponent=1.5)  # progress that grows fast with depth
    small_choice, large_choice = plan_groups([small, large], cost, deep_pays)
    assert small_choice.depth <= 2 < large_choice.depth
    # the shallow group needs more intra-group rounds for one FedIT round's progress
    assert small_choice.tau >= 2
    ablation = HierFedLoRA(num_groups=1, full_depth=True)  # memory ignored: every group at L
    ablation.initialize(_state(4), [ClientInfo(0, 5, 1e12, 1.25e9, {"a": 5})])
    (planned,) = ablation.plan_round(1, [0], cost)
    assert planned.depth == 4 and max_depth(cost, [Member(0, 1e12, 1.25e9)]) == 2
    (deepest,) = plan_groups([small], cost, ProgressModel(4), policy="max_depth")
    assert (deepest.depth, deepest.tau, deepest.stages) == (2, 1, 1)
    with pytest.raises(ValueError, match="taus"):
        plan_groups([small], cost, ProgressModel(4), taus=[0])


def test_the_estimate_is_the_documented_formula():
    cost = _cost(4, [0])
    m = Member(0, 1e12, 1e12)
    # 8·B(L)/down_G + τ rounds of E·tok·F(d)/speed + LAN transfers + 8·B(d)/up_G; τ = 2, d = 1
    compute = 4 * 100 * 1e9 * 1.5 / 1e12
    expected = (
        8 * 4e5 / 1e9
        + (compute + 8 * (4e5 + 1e5) / 1e8)
        + (compute + 8 * (1e5 + 1e5) / 1e8)
        + 8 * 1e5 / 1e9
    )
    assert group_time(cost, [m], 2, 1) == pytest.approx(expected)


def test_the_progress_estimate_moves_toward_the_measured_progress():
    rate = ProgressModel(30, exponent=0.5, prior_weight=1.0, ema=0.5)
    assert rate.rate(30) == 1.0 and rate.rate(15) == pytest.approx(0.5**0.5)
    truth = {8: 0.02 * (8 / 30) ** 1.5, 30: 0.02}  # measured: progress falls fast with depth
    errors = []
    for _ in range(6):
        rate.observe_round([(d, r) for d, r in truth.items()])
        errors.append(abs(rate.b - 1.5))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 < errors[0]
    assert rate.rate(30) == pytest.approx(0.02, rel=0.1)
    # measurements at a single depth fit the scale and leave the exponent at the prior
    single = ProgressModel(30)
    single.observe_round([(8, 0.05)])
    assert single.b == pytest.approx(0.5) and single.rate(8) == pytest.approx(0.05)
    copy = ProgressModel(30)
    copy.load_state_dict(rate.state_dict())
    assert (copy.a, copy.b) == pytest.approx((rate.a, rate.b))


# ---------------------------------------------------------------- the strategy
def _infos(histograms: list[dict[str, int]], speeds: list[float]) -> list[ClientInfo]:
    return [
        ClientInfo(c, sum(h.values()) or 10, flops=s, memory_bytes=1e12, histogram=h)
        for c, (h, s) in enumerate(zip(histograms, speeds, strict=True))
    ]


def test_configure_group_sends_the_whole_adapter_first_then_only_the_trained_blocks():
    strategy = build_strategy("hierfedlora", {"num_groups": 2})
    hists = [{"a": 10}, {"b": 10}, {"a": 10}, {"b": 10}]
    strategy.initialize(_state(3), _infos(hists, [1e12] * 4))
    # each group holds one client of each label
    assert all(sorted(hists[c].popitem()[0] for c in g) == ["a", "b"] for g in strategy.groups)
    (plan, *_) = strategy.plan_round(1, [0, 1, 2, 3], _cost(3, [0, 1, 2, 3]))
    first = strategy.configure_group(1, plan, 0, _state(3))
    assert [i.client_id for i in first] == plan.members
    assert all(set(i.state) == set(_state(3)) for i in first)
    arrived, crashed = plan.members
    trained = select_layers(_state(3), plan.layers)
    strategy.aggregate_group(plan, 0, _state(3), [ClientUpdate(arrived, trained, 10)])
    later = {i.client_id: i for i in strategy.configure_group(1, plan, 1, _state(3))}
    assert set(later[arrived].state) == set(trained)
    assert set(later[crashed].state) == set(_state(3))  # it missed the first download
    assert "steps" not in first[0].plan and all(i.link == "lan" for i in first)  # E steps
    assert first[0].plan["trainable_layers"] == plan.layers == top_layers(3, plan.depth)
    assert first[0].plan["upload_keys"] == list(trained)
    with pytest.raises(FedhetError, match="histograms"):
        HierFedLoRA().initialize(_state(3), _infos([{}, {}], [1e12] * 2))


def test_replanning_uses_observed_durations_and_progress_and_state_round_trips():
    strategy = HierFedLoRA(num_groups=1, replan_every=2)
    strategy.initialize(_state(4), _infos([{"a": 5}, {"b": 5}], [1e12, 1e12]))
    cost = _cost(4, [0, 1])
    (plan,) = strategy.plan_round(1, [0, 1], cost)
    before = strategy.choices[0].time
    group_state = _state(4)
    trained = select_layers(group_state, plan.layers)
    metrics = {"duration": 1e3, "first_loss": 2.0, "last_loss": 1.5}  # far slower than estimated
    strategy.aggregate_group(plan, 0, group_state, [ClientUpdate(0, trained, 5, metrics=metrics)])
    assert strategy.ratio[0] > 1
    rose = {"first_loss": 1.0, "last_loss": 1.2}  # noise, not progress: no measurement
    strategy.aggregate_group(plan, 1, group_state, [ClientUpdate(1, trained, 5, metrics=rose)])
    strategy.aggregate_groups(1, group_state, [])
    assert strategy.rate.observations == [(plan.depth, 0.25, 0.5)]  # (2 − 1.5) / 2
    assert strategy.metrics()["progress_a"] == strategy.rate.a
    strategy.plan_round(2, [0, 1], cost)
    assert strategy.choices[0].time == before  # not a re-plan round
    strategy.plan_round(3, [0, 1], cost)
    assert strategy.choices[0].time > before

    clone = HierFedLoRA(num_groups=1, replan_every=2)
    clone.initialize(_state(4), _infos([{"a": 5}, {"b": 5}], [1e12, 1e12]))
    clone.load_state_dict(strategy.state_dict())
    assert (clone.groups, clone.choices, clone.ratio) == (
        strategy.groups,
        strategy.choices,
        strategy.ratio,
    )
    assert clone.rate.observations == strategy.rate.observations


def test_update_similarity_grouping_mixes_clients_with_different_updates():
    strategy = HierFedLoRA(num_groups=2, grouping="updates", replan_every=1, sketch_dim=8)
    strategy.initialize(_state(2), _infos([{}] * 4, [1e12] * 4))
    cost = _cost(2, [0, 1, 2, 3])
    plans = strategy.plan_round(1, [0, 1, 2, 3], cost)
    start = _state(2)
    for plan in plans:
        updates = []
        for cid in plan.members:
            sign = 1.0 if cid < 2 else -1.0  # clients 0, 1 move one way, 2, 3 the other
            moved = {k: v + sign * (1 + 0.1 * cid) for k, v in start.items()}
            updates.append(ClientUpdate(cid, select_layers(moved, plan.layers), 10))
        strategy.aggregate_group(plan, 0, start, updates)
    strategy.plan_round(2, [0, 1, 2, 3], cost)
    assert all(sorted(c < 2 for c in g) == [False, True] for g in strategy.groups)


# ---------------------------------------------------------------- the hierarchical simulator
HIER = (
    "strategy.name=hierfedlora",
    "strategy.params={num_groups: 2, replan_every: 1}",
    "federation.group_up_mbps=100",
    "train.batch_size=2",
    "data.max_length=32",
    "eval.every=5",
    "eval.global_size=4",
    "eval.local_clients=0",
)


def _poison_first_update_of_round_one(sim: Simulation, monkeypatch) -> None:
    run_client = sim.run_client
    done: list[int] = []

    def flaky(inst, event):
        run = run_client(inst, event)
        if event < 2 * 1_000_003 and not done:  # round 1, first stage, first member
            done.append(inst.client_id)
            key = next(iter(run.update.state))
            run.update.state[key] = torch.full_like(run.update.state[key], float("nan"))
        return run

    monkeypatch.setattr(sim, "run_client", flaky)


def test_the_simulator_honours_tau_counts_both_links_rejects_bad_updates_and_resumes(
    smoke_config, monkeypatch
):
    cfg = smoke_config(*HIER, "name=whole", "federation.rounds=2")
    sim = Simulation(cfg)
    _poison_first_update_of_round_one(sim, monkeypatch)
    result = sim.run()
    rows = [m for m in result.metrics if "groups" in m]
    assert len(rows) == 2
    full = state_bytes(sim.init_state)
    down = up = 0
    for row in rows:
        times = []
        assert "progress_b" in row
        for g in row["groups"].values():
            assert g["tau"] == g["stages"] == len(g["stage_log"])  # τ intra-group rounds
            for stage in g["stage_log"]:
                assert stage["steps"] == [cfg.train.steps] * len(stage["members"])  # E each
            trained = state_bytes(select_layers(sim.init_state, top_layers(2, g["depth"])))
            assert g["time"] == pytest.approx(
                8 * full / 1e9 + sum(s["time"] for s in g["stage_log"]) + 8 * trained / 1e8
            )
            times.append(g["time"])
            down += full
            up += trained
        assert row["round_time"] == pytest.approx(max(times))
        assert (row["group_bytes_down"], row["group_bytes_up"]) == (down, up)
    assert result.summary["rejected"] == 1
    assert all(torch.isfinite(t).all() for t in result.state.values())
    assert result.metrics[-1]["virtual_time"] == pytest.approx(sum(r["round_time"] for r in rows))

    # interrupted after round 1 and resumed: the same final adapter and clock
    cut = Simulation(smoke_config(*HIER, "name=cut", "federation.rounds=1"))
    _poison_first_update_of_round_one(cut, monkeypatch)
    cut.run()
    resumed = Simulation(smoke_config(*HIER, "name=cut", "federation.rounds=2")).run(resume=True)
    assert all(torch.equal(result.state[k], resumed.state[k]) for k in result.state)
    for field in ("virtual_time", "group_bytes_up", "bytes_up", "rejected", "updates_applied"):
        assert resumed.metrics[-1][field] == result.metrics[-1][field]


def test_one_group_one_round_at_full_depth_is_fedit(smoke_config, tmp_path):
    # one device kind whose wide-area link equals the LAN: member durations match FedIT's
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "profiles:\n  - {name: board, speed: 1.0e11, memory_gb: 8, up_mbps: 100, down_mbps: 100}\n"
    )
    common = ("federation.rounds=1", "train.batch_size=2", "data.max_length=32")
    common += ("eval.global_size=4", "eval.local_clients=0", "federation.clients_per_round=6")
    common += (f"fleet.name={fleet}", "federation.lan_mbps=100")
    fedit = Simulation(smoke_config(*common, "name=fedit")).run()
    one_group = (
        "strategy.name=hierfedlora",
        "strategy.params={num_groups: 1, taus: [1], depths: [2]}",
    )
    hier = Simulation(smoke_config(*common, *one_group, "name=hier")).run()
    for key, value in fedit.state.items():
        assert torch.allclose(hier.state[key], value, atol=1e-6)
    hop = 2 * 8 * state_bytes(fedit.state) / 1e9  # server → group → server, 1 Gbit/s
    assert hier.metrics[-1]["virtual_time"] == pytest.approx(
        fedit.metrics[-1]["virtual_time"] + hop
    )
    for field in ("bytes_up", "bytes_down", "updates_applied", "clients", "train_loss"):
        assert hier.metrics[-1][field] == pytest.approx(fedit.metrics[-1][field])
    # the same members over a slower LAN take longer: the LAN carries their transfers
    slow = smoke_config(*common, *one_group, "name=slow", "federation.lan_mbps=1")
    slow_lan = Simulation(slow).run()
    assert slow_lan.metrics[-1]["virtual_time"] > hier.metrics[-1]["virtual_time"]
