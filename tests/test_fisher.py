import math

import pytest
import torch

from fedhet.client import TrainPlan, local_update
from fedhet.client import fisher as fisher_module
from fedhet.client.curriculum import easiest, pacing
from fedhet.client.fisher import (
    LAYER_SCORES,
    FisherSession,
    ScoreTracker,
    frozen_layers,
    neuron_masks,
    per_sample_fisher,
    per_sample_loss,
    untrained_layers,
)
from fedhet.client.loss import target_nll
from fedhet.data import encode, load_source
from fedhet.data.encode import IGNORE_INDEX, Example, collate
from fedhet.devices.profiles import load_fleet
from fedhet.model.lora import LoraModel, LoraSpec, factor_keys
from fedhet.runtime.cost import ClientCosts


@pytest.fixture
def lm_setup(tiny_model):
    model, tok = tiny_model
    lm = LoraModel(model, LoraSpec(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    start = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in lm.init_state(0).items()}
    return lm, start, tok.pad_token_id


def _examples(n: int, seed: int = 0) -> list[Example]:
    """Random token sequences of different lengths, the first tokens a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=gen))
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        ids = torch.randint(5, 2000, (length,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def _one_backward_each(lm: LoraModel, examples, pad_id):
    """The slow reference: one backward per sample, through the model's usual loss."""
    params = lm.parameters()
    for p in params.values():
        p.requires_grad_(True)
    traces, grads = [], []
    for e in examples:
        batch = collate([e], pad_id)
        for p in params.values():
            p.grad = None
        out = lm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        out.loss.backward()
        traces.append(sum(float(p.grad.pow(2).sum()) for p in params.values()))
        grads.append({k: p.grad.clone() for k, p in params.items()})
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    return torch.tensor(traces), grads


def test_per_sample_fisher_matches_one_backward_per_sample(lm_setup):
    lm, start, pad = lm_setup
    lm.load_state(start)
    mode = lm.model.training
    examples = _examples(6)
    seen = []
    fast = per_sample_fisher(lm, examples, pad_id=pad, batch_size=6, observe=seen.append)
    slow, grads = _one_backward_each(lm, examples, pad)
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-9)
    assert (fast > 0).all()
    # one chunk of 6: the observation is the mean of the per-sample gradients
    (chunk,) = seen
    for key, g in chunk.items():
        assert torch.allclose(g, torch.stack([s[key] for s in grads]).mean(0), atol=1e-6)
    # chunking does not change the scores; the model is left as it was found
    again = per_sample_fisher(lm, examples, pad_id=pad, batch_size=4)
    assert torch.allclose(again, fast, rtol=1e-5)
    assert lm.model.get_base_model().config._attn_implementation != "eager"
    assert lm.model.training == mode


def test_score_tracker_smooths_neuron_and_layer_scores():
    a, b = "m.layers.0.q.lora_A.weight", "m.layers.1.q.lora_B.weight"
    theta = {a: torch.tensor([[1.0, -2.0], [0.0, 1.0]]), b: torch.tensor([[2.0], [1.0]])}
    g1 = {a: torch.tensor([[1.0, 1.0], [0.0, 2.0]]), b: torch.tensor([[1.0], [-1.0]])}
    g2 = {a: torch.tensor([[0.0, 3.0], [1.0, 0.0]]), b: torch.tensor([[0.0], [2.0]])}
    tracker = ScoreTracker(num_layers=2, momentum=0.9)
    tracker.observe(theta, g1)
    assert torch.allclose(tracker.neuron[a], torch.tensor([2.0, 4.0]))  # first initialises
    tracker.observe(theta, g2)
    first, second = torch.tensor([2.0, 4.0, 1.0, 1.0]), torch.tensor([9.0, 1.0, 0.0, 4.0])
    smoothed = 0.9 * first + 0.1 * second
    assert torch.allclose(torch.cat([tracker.neuron[a], tracker.neuron[b]]), smoothed)
    # sensitivity Σ|θ·g| and Fisher mass Σ g² per layer
    sens1, sens2 = torch.tensor([3.0 + 2.0, 2.0 + 1.0]), torch.tensor([6.0 + 0.0, 0.0 + 2.0])
    mass1, mass2 = torch.tensor([6.0, 2.0]), torch.tensor([10.0, 4.0])
    assert torch.allclose(tracker.layer["sensitivity"], 0.9 * sens1 + 0.1 * sens2)
    assert torch.allclose(tracker.layer["fisher"], 0.9 * mass1 + 0.1 * mass2)
    cache: dict = {}
    tracker.save(cache)
    resumed = ScoreTracker(2, 0.9, cache)
    assert torch.equal(resumed.neuron[a], tracker.neuron[a])
    with pytest.raises(ValueError, match="score_momentum"):
        ScoreTracker(2, 1.0)


def test_neuron_masks_keep_the_top_rows_at_the_state_rank():
    a, b = "m.layers.0.q.lora_A.weight", "m.layers.0.q.lora_B.weight"
    other = "m.layers.1.q.lora_A.weight"
    state = {a: torch.zeros(3, 5), b: torch.zeros(4, 3), other: torch.zeros(3, 5)}
    scores = {  # A scored at an allocated rank of 4: the padded row must be ignored
        a: torch.tensor([0.1, 0.5, 0.5, 9.0]),
        b: torch.tensor([3.0, 1.0, 2.0, 0.0]),
        other: torch.tensor([1.0, 2.0, 3.0]),
    }
    masks = neuron_masks(scores, state, layers=[0], keep=0.5)
    assert set(masks) == {a, b}
    assert masks[a].shape == (3, 5) and masks[b].shape == (4, 3)
    assert masks[a].all(1).tolist() == [False, True, True]  # ⌈1.5⌉ = 2, tie → lower rows
    assert masks[b].all(1).tolist() == [True, False, True, False]
    assert not (masks[a].any(1) & ~masks[a].all(1)).any()  # whole rows
    with pytest.raises(ValueError, match="neuron_keep"):
        neuron_masks(scores, state, [0], keep=0.0)


@pytest.mark.parametrize("kind", ["linear", "root", "geometric"])
def test_pacing_grows_from_p0_to_one(kind):
    values = [pacing(t, 0.3, 10, kind) for t in range(15)]
    assert values[0] == pytest.approx(0.3)
    assert values[10:] == [1.0] * 5
    assert all(x < y for x, y in zip(values[:10], values[1:11], strict=True))
    expected = {
        "linear": 0.3 + 0.7 * 0.4,
        "root": math.sqrt(0.09 + 0.91 * 0.4),
        "geometric": 0.3**0.6,
    }
    assert pacing(4, 0.3, 10, kind) == pytest.approx(expected[kind])


def test_pacing_and_easiest_reject_bad_values():
    with pytest.raises(ValueError, match="p0"):
        pacing(0, 0.0, 10)
    with pytest.raises(ValueError, match="pacing"):
        pacing(0, 0.3, 10, "cubic")
    with pytest.raises(ValueError, match="curriculum_fraction"):
        easiest(torch.ones(3), 1.5)


def test_easiest_picks_exactly_the_easiest_fraction():
    scores = torch.rand(37, generator=torch.Generator().manual_seed(1))
    for p in (0.01, 0.3, 0.5, 0.9):
        picked = easiest(scores, p)
        k = math.ceil(p * 37)
        assert len(picked) == len(set(picked)) == k
        assert set(picked) == set(torch.argsort(scores)[:k].tolist())
        assert scores[picked].max() < scores[[i for i in range(37) if i not in picked]].min()
    assert sorted(easiest(scores, 1.0)) == list(range(37))
    assert easiest(torch.tensor([2.0, 1.0, 1.0, 3.0]), 0.5) == [1, 2]  # ties → lower index
    assert easiest(torch.tensor([5.0, 1.0]), 0.3) == [1]  # at least one


def test_session_scores_when_needed_and_reuses_the_cache(lm_setup):
    lm, start, pad = lm_setup
    lm.load_state(start)
    examples = _examples(10, seed=2)
    cache: dict = {}
    plan = TrainPlan(batch_size=4, curriculum_fraction=0.3)
    session = FisherSession.start(lm, examples, start, plan, cache, pad_id=pad)
    difficulty = cache["difficulty"]
    assert difficulty.shape == (10,) and session.tokens == sum(len(e.input_ids) for e in examples)
    assert session.indices == easiest(difficulty, 0.3) and len(session.indices) == 3
    assert cache == {"difficulty": difficulty, "updates": 1, "scored_at": 0}
    session.finish()
    assert set(cache["neuron"]) == set(lm.keys)
    # cached scores are reused (no pass, no tokens) while they are fresh
    cache["difficulty"] = torch.arange(10.0).flip(0)
    reuse = FisherSession.start(lm, examples, start, plan, cache, pad_id=pad)
    assert reuse.tokens == 0 and reuse.indices == [9, 8, 7]
    assert FisherSession.start(lm, examples, start, TrainPlan(), cache, pad_id=pad) is None


def test_scores_are_computed_once_per_client_then_every_r_of_its_updates(lm_setup, monkeypatch):
    lm, start, pad = lm_setup
    examples = _examples(6, seed=3)
    calls = []
    real = per_sample_fisher

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(fisher_module, "per_sample_fisher", counting)
    cache: dict = {}
    tokens = []
    for _ in range(7):  # seven participations of one client, whatever the rounds between
        plan = TrainPlan(batch_size=4, curriculum_fraction=0.5, rescore_every=3)
        tokens.append(FisherSession.start(lm, examples, start, plan, cache, pad_id=pad).tokens)
    assert calls == [6, 6, 6]  # participations 0, 3 and 6
    assert [t > 0 for t in tokens] == [True, False, False, True, False, False, True]
    never = {}
    for _ in range(4):
        plan = TrainPlan(batch_size=4, curriculum_fraction=0.5, rescore_every=None)
        FisherSession.start(lm, examples, start, plan, never, pad_id=pad)
    assert len(calls) == 4 and never["updates"] == 4


def test_loss_proxy_scores_each_sample_by_its_own_loss(lm_setup):
    lm, start, pad = lm_setup
    lm.load_state(start)
    examples = _examples(7, seed=4)
    proxy = per_sample_loss(lm, examples, pad_id=pad, batch_size=3)
    for i, e in enumerate(examples):
        batch = collate([e], pad)
        with torch.no_grad():
            nll, _ = target_nll(lm.model, batch)
        assert proxy[i] == pytest.approx(float(nll.mean()), rel=1e-4)
    cache: dict = {}
    plan = TrainPlan(batch_size=4, curriculum_fraction=0.5, score_with="loss")
    session = FisherSession.start(lm, examples, start, plan, cache, pad_id=pad)
    assert torch.allclose(cache["difficulty"], proxy) and session.tokens > 0
    assert "neuron" not in session.finish() and session.tracker.neuron == {}  # no gradients


def test_observations_at_the_initial_adapter_are_skipped(lm_setup):
    lm, _, pad = lm_setup
    init = lm.init_state(0)  # B = 0
    assert untrained_layers(init) == set(range(lm.num_layers))
    tracker = ScoreTracker(lm.num_layers, 0.9)
    grads = {k: torch.ones_like(v) for k, v in init.items()}
    tracker.observe(init, grads)
    assert tracker.neuron == {} and tracker.layer["sensitivity"] is None
    trained = {k: v + 0.01 for k, v in init.items()}
    assert untrained_layers(trained) == set()
    tracker.observe(trained, grads)
    assert (tracker.layer["sensitivity"] > 0).all()
    # a block never trained by this client (B = 0 there) is skipped, the others move
    half = {k: v if ".layers.0." in k and ".lora_B." in k else v + 0.01 for k, v in init.items()}
    assert untrained_layers(half) == {0}
    fresh = ScoreTracker(lm.num_layers, 0.9)
    fresh.observe(half, grads)
    assert fresh.layer["fisher"][0].isnan() and fresh.layer["fisher"][1] > 0
    # a frozen block (no gradient) keeps its score instead of decaying
    before = tracker.layer["fisher"].clone()
    tracker.observe(trained, {k: g for k, g in grads.items() if ".layers.1." in k})
    assert tracker.layer["fisher"][0] == before[0] and tracker.layer["fisher"][1] != before[1]
    # a client's first update from the initial adapter: the scoring pass at B = 0 feeds
    # nothing, so its layer report comes only from optimiser steps after the first
    lm.load_state(init)
    cache: dict = {}
    plan = TrainPlan(batch_size=4, curriculum_fraction=0.5, layer_score="sensitivity")
    session = FisherSession.start(lm, _examples(6), init, plan, cache, pad_id=pad)
    assert cache["difficulty"].gt(0).all() and session.tracker.layer["sensitivity"] is None


def test_layer_sparse_update_freezes_layers_and_charges_only_their_backward(tiny_model):
    model, tok = tiny_model
    lm = LoraModel(model, LoraSpec(rank=4, alpha=8))
    examples = encode(load_source("dolly", limit=12), tok, 32)
    start = {k: v + 0.01 for k, v in lm.init_state(1).items()}
    assert frozen_layers(None, [0, 1], 0.5) == []  # no scores yet: every layer trains
    assert frozen_layers(torch.tensor([1.0, 3.0]), [0, 1], 0.5) == [0]
    assert frozen_layers(torch.tensor([float("nan"), 3.0]), [0, 1], 0.5) == [1]  # unobserved
    cache = {"layer_fisher": torch.tensor([1.0, 3.0])}  # layer 1 matters more
    seen = []
    original = lm.set_trainable

    def record(layers=None, frozen=()):
        params = original(layers, frozen)
        seen.append({k: p.requires_grad for k, p in lm.parameters().items()})
        return params

    lm.set_trainable = record
    plan = TrainPlan(steps=2, batch_size=4, lr=1e-2, sparse_layers=[0, 1], sparse_unit="layer")
    result = local_update(lm, examples, start, plan, pad_id=tok.pad_token_id, cache=cache)
    layer0 = [k for k in start if ".layers.0." in k]
    assert all(not seen[0][k] for k in layer0)  # no requires_grad: no gradient, no state
    assert all(torch.equal(result.state[k], start[k]) for k in layer0)
    assert all(not torch.equal(result.state[k], start[k]) for k in start if k not in layer0)
    assert result.metrics["lowest_layer"] == 1
    # the cost model charges the backward through block 1 only: F (1 + 2 · 1/2)
    costs = ClientCosts(load_fleet("uniform", 1, 0), 1e6, lm.num_layers)
    assert costs.update_flops(plan, result.metrics) == pytest.approx(
        result.metrics["tokens"] * 1e6 * 2.0
    )
    full = {**result.metrics, "lowest_layer": 0.0}
    assert costs.update_flops(plan, full) == pytest.approx(result.metrics["tokens"] * 1e6 * 3.0)


def test_local_update_masks_non_gal_neurons_and_reports_layer_scores(tiny_model):
    model, tok = tiny_model
    lm = LoraModel(model, LoraSpec(rank=4, alpha=8))
    examples = encode(load_source("dolly", limit=12), tok, 32)
    start = {k: v + 0.01 for k, v in lm.init_state(1).items()}
    a_key, b_key = factor_keys(next(m for m in lm.modules if ".layers.1." in m))
    cache = {"neuron": {a_key: torch.tensor([0.0, 5.0, 1.0, 3.0]), b_key: torch.arange(64.0)}}
    plan = TrainPlan(
        steps=3, batch_size=4, lr=1e-2, sparse_layers=[1], neuron_keep=0.5,
        layer_score="sensitivity", curriculum_fraction=0.5,
    )
    result = local_update(lm, examples, start, plan, pad_id=tok.pad_token_id, cache=cache)
    out = result.state
    assert torch.equal(out[a_key][[0, 2]], start[a_key][[0, 2]])  # rows 1 and 3 are kept
    assert not torch.equal(out[a_key][[1, 3]], start[a_key][[1, 3]])
    assert torch.equal(out[b_key][:32], start[b_key][:32])  # top half of B's rows: 32..63
    assert not torch.equal(out[b_key][32:], start[b_key][32:])
    layer0 = [k for k in out if ".layers.0." in k]
    assert all(not torch.equal(out[k], start[k]) for k in layer0)  # not sparse: all rows move
    scores = result.extras[LAYER_SCORES]
    assert scores.shape == (lm.num_layers,) and (scores > 0).all()
    assert result.metrics["num_samples"] == 6
    assert result.metrics["scoring_tokens"] > 0  # the scoring pass's tokens are charged
    assert torch.equal(cache["layer_sensitivity"], scores)
