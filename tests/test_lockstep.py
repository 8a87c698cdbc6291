"""Lockstep training (fedhet.client.batched): several clients in one forward pass give
each client what it gets alone."""

import pytest
import torch

from fedhet.client.batched import ClientJob, compatible, lockstep_updates, split_for_memory
from fedhet.client.train import TrainPlan, local_update
from fedhet.data import encode, load_source
from fedhet.model.lora import LoraModel, LoraSpec, is_lora_a
from fedhet.runtime import sim as sim_module
from fedhet.runtime.sim import Simulation


@pytest.fixture(scope="module")
def setup():
    from fedhet.model import load_base_model

    model, tokenizer = load_base_model("tiny")
    lm = LoraModel(model, LoraSpec(rank=8, alpha=16))
    examples = encode(load_source("dolly", limit=100, seed=0), tokenizer, 64)
    return lm, examples, tokenizer.pad_token_id


def _jobs(lm, examples, ranks=(8, 4, 8, 2), masked=2, steps=3):
    """Clients with different ranks, data and seeds; client ``masked`` trains half of
    one B factor only."""
    jobs = []
    for c, rank in enumerate(ranks):
        gen = torch.Generator().manual_seed(100 + c)
        start = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen)
            for k, v in lm.init_state(c, rank=rank).items()
        }
        masks = None
        if c == masked:
            key = next(k for k in start if not is_lora_a(k))
            masks = {key: torch.rand(start[key].shape, generator=gen) > 0.5}
        plan = TrainPlan(steps=steps, batch_size=4, lr=1e-2, seed=c, masks=masks)
        jobs.append(ClientJob(examples[20 * c : 20 * (c + 1)], start, plan))
    return jobs


@pytest.fixture
def pass_sizes(monkeypatch) -> list[int]:
    """The number of clients of every lockstep pass the simulator makes."""
    sizes: list[int] = []
    original = sim_module.lockstep_updates

    def record(lm, jobs, *, pad_id):
        sizes.append(len(jobs))
        return original(lm, jobs, pad_id=pad_id)

    monkeypatch.setattr(sim_module, "lockstep_updates", record)
    return sizes


def _close(a, b, atol=1e-5):
    return all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a) and a.keys() == b.keys()


def test_lockstep_gives_each_client_its_own_update(setup):
    lm, examples, pad_id = setup
    jobs = _jobs(lm, examples)
    alone = [local_update(lm, j.examples, j.start, j.plan, pad_id=pad_id) for j in jobs]
    together = lockstep_updates(lm, jobs, pad_id=pad_id)
    for a, t, job in zip(alone, together, jobs, strict=True):
        assert _close(a.state, t.state)  # mixed ranks, one masked client: ≤ 1e-5
        assert {k: v.shape for k, v in t.state.items()} == {
            k: v.shape for k, v in job.start.items()
        }
        for key in ("train_loss", "first_loss", "last_loss"):  # the last two: HierFedLoRA's
            assert t.metrics[key] == pytest.approx(a.metrics[key], abs=1e-5)
        assert t.metrics["tokens"] == a.metrics["tokens"]
    masked_key, mask = next(iter(jobs[2].plan.masks.items()))
    frozen = ~mask
    assert torch.equal(together[2].state[masked_key][frozen], jobs[2].start[masked_key][frozen])


def test_a_clients_update_does_not_depend_on_its_group(setup):
    lm, examples, pad_id = setup
    jobs = _jobs(lm, examples)
    with_1 = lockstep_updates(lm, [jobs[0], jobs[1]], pad_id=pad_id)[0]
    with_3 = lockstep_updates(lm, [jobs[3], jobs[0], jobs[2]], pad_id=pad_id)[1]
    assert with_1.metrics["train_loss"] == pytest.approx(with_3.metrics["train_loss"], abs=1e-6)
    assert _close(with_1.state, with_3.state, atol=1e-6)


def test_incompatible_plans_are_named(setup):
    lm = setup[0]
    assert compatible(lm, [TrainPlan(), TrainPlan(seed=3)]) is None
    assert "proximal" in compatible(lm, [TrainPlan(), TrainPlan(prox_mu=0.1)])
    assert "differ" in compatible(lm, [TrainPlan(), TrainPlan(steps=7)])
    assert "Fisher" in compatible(lm, [TrainPlan(curriculum_fraction=0.5)])
    from fedhet.model import load_base_model

    with_dropout = LoraModel(load_base_model("tiny")[0], LoraSpec(rank=4, dropout=0.1))
    assert "dropout" in compatible(with_dropout, [TrainPlan()])


def test_the_memory_budget_caps_the_group_size():
    assert split_for_memory(32, per_client_bytes=1e9, budget_bytes=None) == 32
    assert split_for_memory(32, per_client_bytes=1e9, budget_bytes=5.5e9) == 5
    assert split_for_memory(32, per_client_bytes=1e9, budget_bytes=1e8) == 1  # at least one


@pytest.mark.slow
def test_a_lockstep_simulation_equals_the_sequential_one(smoke_config, pass_sizes):
    """FedIT, 4 clients per round, lockstep on with a budget that fits two clients per
    pass: the same adapter and figures as one-by-one training."""
    sizes = pass_sizes
    base = ("federation.rounds=2", "federation.clients_per_round=4", "fleet.name=uniform")
    sequential = Simulation(smoke_config(*base, "execution.lockstep=false", "name=seq")).run()
    assert sizes == []
    lockstep_sim = Simulation(smoke_config(*base, "execution.lockstep=true", "name=lock"))
    per_client = sim_module.client_training_bytes(lockstep_sim.cfg, lockstep_sim.lm)
    lockstep_sim.cfg.execution.memory_gb = 2.5 * per_client / 2**30
    lockstep = lockstep_sim.run()
    assert sizes == [2, 2, 2, 2]  # two rounds of 4 clients, 2 per pass
    assert _close(lockstep.state, sequential.state)
    for a, b in zip(lockstep.metrics, sequential.metrics, strict=True):
        for key in ("global_loss", "train_loss", "virtual_time", "bytes_up"):
            assert a.get(key) == (None if b.get(key) is None else pytest.approx(b[key], 1e-5))


@pytest.mark.slow
def test_incompatible_strategies_fall_back_to_one_by_one(smoke_config, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(sim_module, "lockstep_updates", lambda *a, **k: calls.append(1))
    cfg = smoke_config("strategy.name=fedprox", "federation.rounds=1", "execution.lockstep=true")
    with caplog.at_level("INFO", logger="fedhet.runtime.sim"):
        Simulation(cfg).run()
    assert calls == [] and "proximal" in caplog.text


@pytest.mark.slow
def test_activation_checkpointing_changes_no_result(smoke_config):
    base = ("federation.rounds=1", "fleet.name=uniform")
    plain = Simulation(smoke_config(*base, "name=plain")).run()
    recomputed = Simulation(
        smoke_config(*base, "execution.activation_checkpointing=true", "name=ckpt")
    ).run()
    assert _close(plain.state, recomputed.state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lockstep_on_cuda_matches_one_by_one():
    """On CUDA both paths autocast to bf16: each client's update agrees to bf16
    precision (relative to the size of the update)."""
    from fedhet.model import load_base_model

    model, tokenizer = load_base_model("tiny", device="cuda")
    lm = LoraModel(model, LoraSpec(rank=8, alpha=16))
    examples = encode(load_source("dolly", limit=100, seed=0), tokenizer, 64)
    jobs = _jobs(lm, examples)
    pad_id = tokenizer.pad_token_id
    alone = [local_update(lm, j.examples, j.start, j.plan, pad_id=pad_id) for j in jobs]
    together = lockstep_updates(lm, jobs, pad_id=pad_id)
    for a, t, j in zip(alone, together, jobs, strict=True):
        diff = sum(float((a.state[k] - t.state[k]).pow(2).sum()) for k in a.state) ** 0.5
        step = sum(float((a.state[k] - j.start[k]).pow(2).sum()) for k in a.state) ** 0.5
        assert diff <= 0.05 * step


@pytest.mark.slow
def test_asynchronous_clients_dispatched_together_train_in_one_pass(smoke_config, pass_sizes):
    sizes = pass_sizes
    base = ("strategy.name=fedasync", "federation.max_arrivals=4", "fleet.name=uniform")
    one_by_one = Simulation(smoke_config(*base, "execution.lockstep=false", "name=a")).run()
    together = Simulation(smoke_config(*base, "execution.lockstep=true", "name=b")).run()
    assert sizes == [3]  # the three first dispatches; later ones start alone
    assert [r.get("client") for r in together.metrics] == [
        r.get("client") for r in one_by_one.metrics
    ]
    assert _close(together.state, one_by_one.state)
