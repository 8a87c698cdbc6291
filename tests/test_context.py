"""Context-length/-quality partitioners, quality transformations and the context study."""

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhet.cli import app
from fedhet.client.evaluate import evaluate
from fedhet.data import DataConfig, Record, build_federated_data, partition
from fedhet.data.context import (
    QUALITY_LEVELS,
    QUANTITY_LEVELS,
    apply_levels,
    assign_levels,
    estimate_alpha,
    length_buckets,
    split_sentences,
)
from fedhet.data.sources import load_source
from fedhet.errors import FedhetError
from fedhet.model import load_base_model
from fedhet.study import load_study, run_context_study
from fedhet.study.cells import Cell, Scores, client_gains, effect, global_gain, local_gain
from fedhet.study.report import claims

REPO = Path(__file__).resolve().parents[1]

DOLLY_CONTEXT = ["closed_qa", "information_extraction", "summarization"]


def _counts(parts: list[np.ndarray], groups: np.ndarray) -> np.ndarray:
    """Clients × groups histogram of a partition."""
    return np.array([np.bincount(groups[p], minlength=groups.max() + 1) for p in parts])


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 100.0])
def test_length_partition_histograms_match_alpha(alpha):
    rng = np.random.default_rng(1)
    lengths = rng.lognormal(5, 1, size=12_000).astype(int)
    labels = ["x"] * len(lengths)
    parts = partition(labels, 200, "context-length", alpha=alpha, seed=3, lengths=lengths)
    everything = np.concatenate(parts)
    assert np.array_equal(np.sort(everything), np.arange(len(lengths)))  # disjoint, complete
    assert {len(p) for p in parts} == {60}  # equal client sizes
    buckets, _ = length_buckets(lengths, num_buckets=4, seed=3)
    estimate = estimate_alpha(_counts(parts, buckets))
    if alpha < 10:
        assert alpha / 1.3 < estimate < alpha * 1.3
    else:  # near-IID: every client holds about a quarter of each bucket
        assert estimate > 20
        assert np.abs(_counts(parts, buckets) / 60 - 0.25).max() < 0.1


def test_quality_partition_skews_levels_like_length():
    labels = ["x"] * 4_000
    parts = partition(labels, 100, "context-quality", alpha=0.1, seed=0)
    levels = assign_levels(len(labels), len(QUALITY_LEVELS), 0)
    counts = _counts(parts, levels)
    assert np.bincount(levels).tolist() == [1_000] * 4  # levels in equal numbers
    assert (counts.max(axis=1) / counts.sum(axis=1)).mean() > 0.8  # mostly one level each
    assert 0.1 / 1.3 < estimate_alpha(counts) < 0.1 * 1.3


def test_length_buckets_quantile_and_fixed_edges():
    lengths = np.array([5, 5, 5, 5, 40, 90, 120, 300])
    bucket, names = length_buckets(lengths, num_buckets=4, seed=0)
    assert np.bincount(bucket).tolist() == [2, 2, 2, 2]
    assert names[0] == "len0:5-5" and names[3] == "len3:120-300"
    bucket, names = length_buckets(lengths, edges=[10, 100])
    assert bucket.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert names == ["len0:0-9", "len1:10-99", "len2:100+"]
    with pytest.raises(FedhetError, match="edges"):
        length_buckets(lengths, edges=[100, 10])


def _records() -> list[Record]:
    return [
        Record(
            f"Question {i}?",
            f"Answer {i}.",
            context=" ".join(f"Record {i} sentence {j}." for j in range(2 + i % 5)),
            category="qa",
            answer=str(i),
        )
        for i in range(40)
    ]


def test_transformations_are_deterministic_and_leave_answers_intact():
    records = _records()
    levels = [
        ["intact", "drop:0.5", "distract:0.5", "unrelated", "keep:2"][i % 5] for i in range(40)
    ]
    once = apply_levels(records, levels, seed=7)
    assert once == apply_levels(records, levels, seed=7)
    assert once != apply_levels(records, levels, seed=8)
    for i, (before, after) in enumerate(zip(records, once, strict=True)):
        assert replace(after, context=before.context) == before  # only the context changes
        own, new = split_sentences(before.context), split_sentences(after.context)
        kind = levels[i].split(":")[0]
        if kind == "intact":
            assert after.context == before.context
        elif kind == "keep":
            assert new == own[:2]
        elif kind == "drop":
            assert [s for s in own if s in new] == new and len(new) < len(own) + 1
        elif kind == "distract":
            assert [s for s in new if s in own] == own  # the own sentences, in order
            inserted = [s for s in new if s not in own]
            assert inserted and all(not s.startswith(f"Record {i} ") for s in inserted)
        else:  # unrelated: another record's whole context
            assert after.context != before.context
            assert after.context in {r.context for r in records}


def test_drop_removes_the_requested_share_on_average():
    records = _records() * 5
    dropped = apply_levels(records, ["drop:0.5"] * len(records), seed=0)
    kept = sum(len(split_sentences(r.context)) for r in dropped)
    total = sum(len(split_sentences(r.context)) for r in records)
    assert kept / total == pytest.approx(0.5, abs=0.05)


def _dolly(method: str, **params) -> DataConfig:
    return DataConfig(
        source="dolly",
        tasks=DOLLY_CONTEXT,
        limit=200,
        global_test_size=20,
        partition={"method": method, "num_clients": 8, "alpha": 0.1, "params": params},
    )


def test_quality_partition_transforms_clients_records_only():
    fed = build_federated_data(_dolly("context-quality"))
    plain = build_federated_data(_dolly("iid"))
    assert fed.global_test == plain.global_test  # never transformed
    records = [r for c in fed.clients for r in (*c.train, *c.test)]
    originals = [r for c in plain.clients for r in (*c.train, *c.test)]

    def gold(rs):
        return Counter((r.instruction, r.response, r.answer, r.options) for r in rs)

    assert gold(records) == gold(originals)  # answers intact, each with its own question
    assert all(r.category.startswith("q") for r in records)
    unchanged = {(r.instruction, r.context) for r in originals}
    changed = sum((r.instruction, r.context) not in unchanged for r in records)
    assert changed > 0.5 * len(records)
    again = build_federated_data(_dolly("context-quality"))
    assert [c.train for c in again.clients] == [c.train for c in fed.clients]


def test_length_partition_on_dolly_labels_clients_by_bucket():
    fed = build_federated_data(_dolly("context-length", num_buckets=3))
    buckets = [c for c in fed.categories if c.startswith("len")]
    assert len(buckets) == 3
    top = [max(fed.category_histogram(c.client_id).values()) for c in fed.clients]
    sizes = [len(c.train) + len(c.test) for c in fed.clients]
    assert np.mean(np.array(top) / np.array(sizes)) > 0.7  # α = 0.1: mostly one bucket


def test_bad_context_inputs_name_the_field():
    with pytest.raises(FedhetError, match="no context"):
        build_federated_data(_dolly("context-quality").model_copy(update={"tasks": None}))
    with pytest.raises(FedhetError, match="data.partition.params.bucket"):
        build_federated_data(_dolly("context-length", bucket=3))
    with pytest.raises(FedhetError, match="unknown context level"):
        build_federated_data(_dolly("context-quality", levels=["intact", "shuffle"]))
    with pytest.raises(FedhetError, match="drop:2"):
        build_federated_data(_dolly("context-quality", levels=["intact", "drop:2"]))
    result = CliRunner().invoke(
        app,
        ["study", "context", str(REPO / "configs/s-ctx-smoke.yaml"), "--set", "study.alphas=[]"],
    )
    assert result.exit_code == 2 and "study.alphas" in result.output


def _hand_made(path: Path, n: int = 48, sentences: int = 6) -> Path:
    """``n`` records with ``sentences``-sentence contexts of varied lengths, as JSONL."""
    rows = [
        {
            "instruction": f"Question {i}?",
            "context": " ".join(
                f"Record {i} sentence {j}" + " word" * (i % 7) + "." for j in range(sentences)
            ),
            "response": f"Answer {i}.",
            "category": "qa",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _paired(path: Path, method: str, alpha: float, seed: int = 0, **params) -> DataConfig:
    return DataConfig(
        source="jsonl",
        path=str(path),
        global_test_size=4,
        local_test_size=2,
        seed=seed,
        partition={"method": method, "num_clients": 4, "alpha": alpha, "params": params},
    )


def test_paired_test_sets_are_the_same_records_and_base_losses_in_every_cell(tmp_path):
    path = _hand_made(tmp_path / "records.jsonl")
    originals = {r.instruction: r for r in load_source("jsonl", path=path)}
    cells = [
        _paired(path, "context-length", 0.1, num_buckets=3),
        _paired(path, "context-length", 100, num_buckets=3),
        _paired(path, "context-quality", 0.1),
        _paired(path, "context-quality", 100, levels=list(QUANTITY_LEVELS)),
    ]
    feds = [build_federated_data(cfg) for cfg in cells]
    tests = [[c.test for c in fed.clients] for fed in feds]
    assert all(t == tests[0] for t in tests)  # the same records, client by client
    assert [len(t) for t in tests[0]] == [2] * 4
    for fed in feds:
        assert fed.global_test == feds[0].global_test
        for client in fed.clients:
            assert all(r == originals[r.instruction] for r in client.test)  # never transformed
            held = {r.instruction for r in client.test}
            assert not held & {r.instruction for c in fed.clients for r in c.train}
        assert sum(len(c.train) + len(c.test) for c in fed.clients) == 48 - 4
    skewed = [[r.category for r in c.train] for c in feds[0].clients]
    even = [[r.category for r in c.train] for c in feds[1].clients]
    assert skewed != even  # the partition differs, the test records do not
    other = build_federated_data(_paired(path, "context-length", 0.1, seed=1, num_buckets=3))
    assert [c.test for c in other.clients] != tests[0]  # a seed redraws them

    model, tokenizer = load_base_model("tiny")
    losses = [
        [evaluate(model, tokenizer, c.test, "loss", max_length=64)["loss"] for c in fed.clients]
        for fed in feds
    ]
    assert all(row == losses[0] for row in losses)  # one base model score per client
    with pytest.raises(FedhetError, match="local_test_size=20"):
        build_federated_data(_paired(path, "iid", 1.0).model_copy(update={"local_test_size": 20}))


def test_quantity_partition_keeps_first_sentences_and_skews_the_counts(tmp_path):
    path = _hand_made(tmp_path / "records.jsonl", n=404)
    originals = {r.instruction: r for r in load_source("jsonl", path=path)}
    levels = {f"q{i}:{name}": name for i, name in enumerate(QUANTITY_LEVELS)}
    shares = {}
    for alpha in (0.1, 100):
        cfg = _paired(path, "context-quality", alpha, levels=list(QUANTITY_LEVELS))
        fed = build_federated_data(cfg.model_copy(update={"partition": cfg.partition.model_copy(
            update={"num_clients": 8})}))
        for client in fed.clients:
            for r in client.train:
                own = split_sentences(originals[r.instruction].context)
                kept = split_sentences(r.context)
                level = levels[r.category]
                assert kept == (own if level == "intact" else own[: int(level.split(":")[1])])
                assert replace(r, context="", category="") == replace(
                    originals[r.instruction], context="", category=""
                )
        counts = np.array([[sum(r.category == g for r in c.train) for g in levels]
                           for c in fed.clients])
        shares[alpha] = (counts.max(axis=1) / counts.sum(axis=1)).mean()
        assert counts.sum(axis=0).max() - counts.sum(axis=0).min() <= 1  # levels in equal numbers
    assert shares[0.1] > 0.7 and shares[100] < 0.45  # mostly one level vs an even mix


@pytest.mark.slow
def test_study_pairs_its_cells_reuses_units_and_reports_the_claims(tmp_path):
    cfg, study = load_study(
        REPO / "configs" / "s-ctx-smoke.yaml",
        [
            f"output_dir={tmp_path}",
            "study.alphas=[0.1,100]",
            "study.axes=[quality]",
            "study.rouge_local=1",
            "study.rouge_global=2",
            "data.partition.num_clients=3",
            "data.limit=60",
            "data.max_length=32",
            "federation.rounds=1",
            "federation.clients_per_round=2",
            "eval.global_size=4",
        ],
    )
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n<!-- s-ctx-smoke:start -->\nold\n<!-- s-ctx-smoke:end -->\nkept\n")
    lines: list[str] = []
    result = run_context_study(cfg, study, out=out, command="fedhet study context smoke",
                               log=lines.append)
    assert lines[0] == "context study: 6 units to run, 0 reused"  # 2 seeds x (base + 2 cells)
    assert [(c.axis, c.alpha, c.seed) for c in result.cells] == [
        ("quality", alpha, seed) for alpha in (0.1, 100) for seed in (0, 1)
    ]
    for cell in result.cells:
        for scores in (cell.base, cell.federated):
            assert set(scores.local) == set(scores.global_) == {"loss", "rouge_l"}
            assert set(scores.local["rouge_l"]) == {"0", "1", "2"}
        assert set(cell.local_only.local) == {"loss"}  # client models: loss alone
        assert set(cell.local_only.local["loss"]) == set(cell.federated.local["loss"]) == {
            "0", "1", "2"
        }
        same_seed = [c for c in result.cells if c.seed == cell.seed]
        assert all(c.base == cell.base for c in same_seed)  # one base model score per seed
        assert np.isfinite(list(cell.federated.global_.values())).all()
    assert result.cells[0].base != result.cells[1].base  # seeds 0 and 1: other test records
    report = result.report
    assert report.count("| tiny | quality |") == 2
    assert "quality imbalance hurts local training (α 0.1 vs 100): Δ = " in report
    assert "→ **" in report and "between-seed std of the global loss" in report
    text = out.read_text()
    assert "old" not in text and text.endswith("kept\n") and text.count(":start -->") == 1
    assert "fedhet study context smoke" in text
    assert (tmp_path / "figures" / "s-ctx-smoke-gains-tiny.png").is_file()

    lines.clear()
    again = run_context_study(cfg, study, log=lines.append)
    assert lines == ["context study: 0 units to run, 6 reused"]
    assert again.cells == result.cells
    compute = re.compile(r"wall times sum to ([0-9.]+) core-min")
    first = compute.search(result.report)[1]
    assert float(first) > 0 and compute.search(again.report)[1] == first  # reused units count


def _cell(axis: str, alpha: float, seed: int, local: float, glob: float) -> Cell:
    """A made-up cell: base loss 2.0 for both clients and globally; the local-only models
    gain ``local`` (one client ``local`` − 0.01, the other + 0.01), the global model ``glob``."""
    base = Scores({"loss": {"0": 2.0, "1": 2.0}}, {"loss": 2.0})
    only = Scores({"loss": {"0": 2.0 - local + 0.01, "1": 2.0 - local - 0.01}})
    fed = Scores({"loss": {"0": 1.9, "1": 1.9}}, {"loss": 2.0 - glob})
    return Cell("m", axis, alpha, seed, 1.0, 0.0, 1.0, base, only, fed)


def test_claims_on_made_up_gains():
    cells = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        cells += [  # quality: skew costs 0.1 of local gain and 0.05 of global gain
            _cell("quality", 0.1, seed, 0.2 + noise, 0.25 + noise),
            _cell("quality", 100, seed, 0.3 + noise, 0.3 + noise),
            # length: no local effect (ε = 0.25 x 0.4), global effect of -0.2 (skew helps)
            _cell("length", 0.1, seed, 0.4 + noise, 0.5 + noise),
            _cell("length", 100, seed, 0.4 - noise, 0.3),
        ]
    assert local_gain(cells[0], "local_only", "loss") == pytest.approx(0.2)
    assert client_gains(cells[0], "local_only", "loss") == pytest.approx({"0": 0.19, "1": 0.21})
    assert global_gain(cells[0], "loss") == pytest.approx(0.25)
    scored_globally = Scores({"loss": {"0": 2.0}}, {"loss": 2.0, "rouge_l": 0.1})
    assert replace(cells[0], base=scored_globally).metrics == ["loss", "rouge_l"]
    quality = effect(cells, "m", "quality", global_gain, "loss")
    assert (quality.mean, quality.n) == (pytest.approx(0.05), 3)
    text = claims(cells, margin=0.25)
    assert "quality imbalance hurts local training (α 0.1 vs 100): Δ = 0.1 [0.1, 0.1]" in text
    lines = {line.split(" (")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert lines["- quality imbalance hurts local training"].endswith("**confirmed**")
    assert lines["- quality imbalance hurts the global model"].endswith("**confirmed**")
    minimal = lines["- length imbalance barely affects local training"]
    assert "inside ±0.1" in minimal and "**confirmed**" in minimal  # Δ = 0 ± 0.05 in ±0.1
    assert lines["- length imbalance affects the global model"].endswith("**refuted**")
    noisy = [replace(c, local_only=Scores({"loss": {"0": 2.0 - 0.5 * c.seed, "1": 2.0}}))
             if c.axis == "length" and c.alpha == 100 else c for c in cells]
    minimal = next(line for line in claims(noisy, 0.25).splitlines() if "barely" in line)
    assert "**inconclusive**; seeds that would decide it:" in minimal
