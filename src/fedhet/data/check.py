"""Checks and a summary of an experiment's data, before any model is loaded.

:func:`check_data` enforces what evaluation will need (the run fails in seconds,
not after the model has loaded): with ``eval.metric: accuracy`` every test record
carries label options (its own ``options`` column or ``data.options``), and
every record that has options has its response among them — accuracy would be
silently 0 otherwise. :func:`data_report` is ``fedhet data check``: records,
fields, label set, token lengths and per-client counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from typing import Any

import numpy as np

from fedhet.data.federated import FederatedData
from fedhet.data.records import Record
from fedhet.errors import FedhetError


def _all_records(fed: FederatedData) -> list[Record]:
    return [r for c in fed.clients for r in (*c.train, *c.test)] + list(fed.global_test)


def data_problems(fed: FederatedData, metric: str) -> list[str]:
    """What would make evaluation wrong or fail, one line each (empty: none)."""
    problems = []
    records = _all_records(fed)
    with_options = [r for r in records if r.options]
    stray = [r for r in with_options if r.response not in r.options]
    if stray:
        example = stray[0]
        problems.append(
            f"{len(stray)} of {len(with_options)} records have a response that is not among "
            f"their options (e.g. {example.response!r} not in {list(example.options)}); "
            "accuracy would count them wrong: fix the responses or data.options"
        )
    if metric == "accuracy":
        tests = [r for c in fed.clients for r in c.test] + list(fed.global_test)
        missing = sum(not r.options for r in tests)
        if missing:
            problems.append(
                f"eval.metric=accuracy needs label options: {missing} of {len(tests)} test "
                "records have none (give the label list as data.options, or an options "
                "column)"
            )
    return problems


def check_data(fed: FederatedData, metric: str) -> None:
    """Raise :class:`FedhetError` with the first problem of :func:`data_problems`."""
    problems = data_problems(fed, metric)
    if problems:
        raise FedhetError(f"data: {problems[0]}")


def data_report(fed: FederatedData, metric: str, lengths: list[int] | None, max_length: int) -> str:
    """``fedhet data check``'s text: counts, fields, labels, token lengths, clients
    (``lengths``: tokens of every training example, None without a tokenizer)."""
    records = _all_records(fed)
    train = sum(len(c.train) for c in fed.clients)
    local_test = sum(len(c.test) for c in fed.clients)
    filled = [
        f.name for f in fields(Record) if any(getattr(r, f.name) for r in records)
    ]
    labels = Counter(o for r in records for o in r.options)
    lines = [
        f"records: {len(records)} = {train} client train + {local_test} client test + "
        f"{len(fed.global_test)} global test",
        f"fields with values: {', '.join(filled)}",
        f"categories: {len(fed.categories)} ({_head(fed.categories)})",
        "label options: "
        + (f"{len(labels)} ({_head(sorted(labels))})" if labels else "none (no classification)"),
    ]
    if lengths:
        v = np.asarray(lengths)
        cut = float(np.mean(v >= max_length))
        lines.append(
            f"tokens per training example: min {v.min()}, median {int(np.median(v))}, "
            f"max {v.max()} (data.max_length={max_length}: {cut:.0%} cut)"
        )
    sizes = [len(c.train) for c in fed.clients]
    lines.append(
        f"clients: {len(fed.clients)}; train records per client min {min(sizes)}, "
        f"median {int(np.median(sizes))}, max {max(sizes)}; "
        f"{sum(1 for c in fed.clients if not c.test)} without a test record"
    )
    problems = data_problems(fed, metric)
    lines += [f"problem: {p}" for p in problems] or ["no problems found"]
    return "\n".join(lines)


def _head(items: list[Any], n: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", … {len(items) - n} more" if len(items) > n else "")
