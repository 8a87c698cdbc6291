"""Context-length/-quality partitioners, quality transformations and the context study."""

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhet.cli import app
from fedhet.data import DataConfig, Record, build_federated_data, partition
from fedhet.data.context import (
    QUALITY_LEVELS,
    apply_levels,
    assign_levels,
    estimate_alpha,
    length_buckets,
    split_sentences,
)
from fedhet.errors import FedhetError
from fedhet.study import load_study, run_context_study

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


@pytest.mark.slow
def test_study_table_has_every_cell(tmp_path):
    cfg, study = load_study(
        REPO / "configs" / "s-ctx-smoke.yaml",
        [
            f"output_dir={tmp_path}",
            "study.alphas=[0.1,100]",
            "data.partition.num_clients=4",
            "data.limit=80",
            "data.max_length=32",
            "federation.rounds=1",
            "federation.clients_per_round=2",
            "eval.global_size=4",
            "eval.local_size=1",
        ],
    )
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n<!-- s-ctx-smoke:start -->\nold\n<!-- s-ctx-smoke:end -->\nkept\n")
    result = run_context_study(cfg, study, out=out, command="fedhet study context smoke")
    assert [(c.axis, c.alpha) for c in result.cells] == [
        ("length", 0.1),
        ("length", 100),
        ("quality", 0.1),
        ("quality", 100),
    ]
    for cell in result.cells:
        assert len(cell.local_before) == len(cell.local_only) == len(cell.local_federated) == 4
        assert np.isfinite([cell.global_before, cell.global_federated]).all()
        assert cell.alpha_hat > 0  # inf when every client holds an even mix
    rows = [line for line in result.report.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 4 + 2  # every cell, then one contrast row per axis
    assert all("—" not in row and "nan" not in row for row in rows)
    text = out.read_text()
    assert "old" not in text and text.endswith("kept\n") and text.count(":start -->") == 1
    assert "fedhet study context smoke" in text
    assert all(p.is_file() for p in result.plots)
    assert (tmp_path / "figures" / "s-ctx-smoke-perf_vs_alpha.png").is_file()
