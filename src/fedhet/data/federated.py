"""Data configuration and the assembly of a federated dataset.

``build_federated_data`` does, in order:

1. load the pool: ``source``/``split`` (``limit`` caps it, after a shuffle seeded by
   ``seed``);
2. take the GLOBAL test set: ``global_test_size`` records of ``test_source``/``test_split``
   when either is set (the first ones after a shuffle seeded by ``seed``; a different
   ``test_source`` is read without ``path``, ``fields`` and ``tasks``, which describe the
   training source), otherwise ``global_test_size`` records held out of the pool at random;
3. partition the rest of the pool among the clients by category (:mod:`.partition`); a
   method with a record hook (:data:`RECORD_HOOKS`) first computes its partitioner's
   arguments from the records and ``partition.params``, and may transform the pool's
   records (never the global test set);
4. split each client's records at random into local train and local test: the test part
   has ``round(n * local_test_fraction)`` records, capped at ``n - 1`` so that every client
   keeps at least one training record. A client's test part is therefore empty when
   ``n * local_test_fraction < 0.5`` or ``n == 1`` (tiny partitions, or fraction 0).

**Paired local test sets** (``local_test_size``, the context study's design): before step 3,
``num_clients × local_test_size`` records are drawn from the pool at random with a stream of
their own (seeded by ``seed`` alone) and dealt to the clients in order, ``local_test_size``
each; they leave the pool, are never transformed and are the clients' whole test parts
(step 4 then keeps every partitioned record for training). Two configs that differ only in
the partition (method, α, params) therefore give every client the same test records, so
per-client scores of different partitions are paired record for record. These test records
are a sample of the whole pool, not of the client's own (skewed) mix: that mix changes with
the partition, and a paired test set cannot.

Everything is deterministic given the config (one ``seed``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedhet.data.partition import partition
from fedhet.data.records import Record
from fedhet.data.sources import FORMATS, load_source
from fedhet.errors import FedhetError


class PartitionConfig(BaseModel):
    """How records are divided among clients (see :func:`fedhet.data.partition.partition`)."""

    model_config = ConfigDict(extra="forbid")

    method: str = "dirichlet"
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0)
    min_size: int = Field(4, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    """The partitioner's extra keyword arguments (through its record hook, if it has one)."""


RecordHook = Callable[
    [list[Record], dict[str, Any], int],
    tuple[dict[str, Any], Callable[[list[Record]], list[Record]] | None],
]
"""``(pool, partition.params, seed) -> (partitioner keyword arguments, transform or None)``;
the transform returns the pool's records as the clients hold them, same length and order."""

RECORD_HOOKS: dict[str, RecordHook] = {}
"""Record hooks by partition method: for partitioners that need the records themselves."""


def register_record_hook(name: str) -> Callable[[RecordHook], RecordHook]:
    """Decorator adding a record hook to :data:`RECORD_HOOKS` under the partition method."""

    def add(fn: RecordHook) -> RecordHook:
        RECORD_HOOKS[name] = fn
        return fn

    return add


class DataConfig(BaseModel):
    """The data of an experiment (the ``data:`` section of an experiment file)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    """A named source or generic format (:func:`fedhet.data.sources.load_source`)."""
    path: str | None = None
    """The data file of a generic format (json, jsonl, csv, tsv). A relative path is
    taken from the config file's folder when the file is there, else from
    ``--data-dir``, else from the working directory."""
    fields: dict[str, str] | None = None
    """Generic formats: Record field → column name (``{response: label, ...}``)."""
    options: list[str] | None = None
    """The label list of a classification task: every record's ``options`` (a record's
    own ``options`` column, if any, must agree). Needed by ``eval.metric: accuracy``
    unless every record carries its options."""
    tasks: list[str] | None = None
    split: str = "train"
    test_path: str | None = None
    """Generic formats: a separate file (same format and fields) for the global test
    set, instead of records held out of ``path``."""
    test_source: str | None = None
    """Source of the global test set; with ``test_split``, a separate labelled split."""
    test_split: str | None = None
    limit: int | None = Field(None, ge=1)
    global_test_size: int = Field(256, ge=0)
    local_test_fraction: float = Field(0.2, ge=0, lt=1)
    local_test_size: int | None = Field(None, ge=1)
    """Paired local test sets (module docstring): this many records per client, the same
    for every partition of the pool; ``local_test_fraction`` is then unused."""
    max_length: int = Field(128, ge=1)
    """Tokens per example; used when the records are encoded for training."""
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        generic = self.source in FORMATS
        if generic and self.path is None:
            raise ValueError(f"source {self.source!r} reads a file: set data.path")
        if not generic and (self.path or self.test_path or self.fields):
            raise ValueError(
                f"data.path, data.test_path and data.fields are for the file formats "
                f"{', '.join(FORMATS)}; {self.source!r} is a named source (use --data-dir)"
            )
        if generic and self.test_split is not None:
            raise ValueError(
                f"source {self.source!r} reads one file, it has no splits: give the test "
                "file as data.test_path"
            )
        if self.test_path is not None and self.test_source is not None:
            raise ValueError("data.test_path and data.test_source: give one of them")
        if self.options is not None and len(set(self.options)) < 2:
            raise ValueError(f"data.options needs at least two distinct labels: {self.options}")
        return self


@dataclass
class ClientData:
    """One client's records."""

    client_id: int
    train: list[Record]
    test: list[Record]


@dataclass
class FederatedData:
    """Clients' data, the global test set and the sorted category names of all records."""

    clients: list[ClientData]
    global_test: list[Record]
    categories: list[str]

    def category_histogram(self, client_id: int) -> dict[str, int]:
        """Records per category in the client's train and test parts together.

        Every category of :attr:`categories` is a key, in that order (zeros included).
        """
        client = self.clients[client_id]
        counts = Counter(r.category for r in (*client.train, *client.test))
        return {c: counts[c] for c in self.categories}


def _global_test(cfg: DataConfig, data_dir: str | Path | None) -> list[Record]:
    """The global test set from ``test_path`` or ``test_source``/``test_split``."""
    if cfg.test_path is not None:
        return load_source(
            cfg.source,
            data_dir=data_dir,
            path=cfg.test_path,
            fields=cfg.fields,
            limit=cfg.global_test_size,
            seed=cfg.seed,
        )
    source = cfg.test_source or cfg.source
    split = cfg.test_split or cfg.split
    if (source, split) == (cfg.source, cfg.split):
        raise FedhetError(
            f"data.test_source/data.test_split name the training data ({source} {split}); "
            "set another test_split, or neither to hold the global test set out of the pool"
        )
    same = source == cfg.source
    return load_source(
        source,
        split=split,
        data_dir=data_dir,
        path=cfg.path if same else None,
        fields=cfg.fields if same else None,
        tasks=cfg.tasks if same else None,
        limit=cfg.global_test_size,
        seed=cfg.seed,
    )


def with_options(records: list[Record], options: list[str]) -> list[Record]:
    """The records with the label list as their ``options`` (``data.options``); a
    record that lists other options is an error naming the field."""
    labels = tuple(options)
    out = []
    for r in records:
        if r.options and set(r.options) != set(labels):
            raise FedhetError(
                f"data.options {list(labels)} disagrees with a record's own options "
                f"{list(r.options)} (response {r.response!r})"
            )
        out.append(replace(r, options=labels))
    return out


def _paired_test_sets(
    pool: list[Record], num_clients: int, size: int, rng: np.random.Generator
) -> tuple[list[Record], list[list[Record]]]:
    """The pool without the paired test records, and each client's ``size`` of them
    (module docstring)."""
    need = num_clients * size
    if need >= len(pool):
        raise FedhetError(
            f"data.local_test_size={size} × {num_clients} clients takes {need} of the pool's "
            f"{len(pool)} records and leaves too few to train on"
        )
    order = rng.permutation(len(pool))
    tests = [
        [pool[i] for i in np.sort(order[k * size : (k + 1) * size])] for k in range(num_clients)
    ]
    return [pool[i] for i in np.sort(order[need:])], tests


def build_federated_data(cfg: DataConfig, data_dir: str | Path | None = None) -> FederatedData:
    """Load, hold out the global test set, partition and split per client (module docstring)."""
    pool = load_source(
        cfg.source,
        split=cfg.split,
        data_dir=data_dir,
        path=cfg.path,
        fields=cfg.fields,
        tasks=cfg.tasks,
        limit=cfg.limit,
        seed=cfg.seed,
    )
    holdout_rng, split_rng, paired_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3)
    )
    if cfg.test_path is None and cfg.test_source is None and cfg.test_split is None:
        if len(pool) <= cfg.global_test_size:
            raise FedhetError(
                f"data.global_test_size={cfg.global_test_size} leaves nothing to train on: "
                f"{cfg.source} has {len(pool)} records"
            )
        order = holdout_rng.permutation(len(pool))
        global_test = [pool[i] for i in order[: cfg.global_test_size]]
        pool = [pool[i] for i in np.sort(order[cfg.global_test_size :])]
    else:
        global_test = _global_test(cfg, data_dir)
    if cfg.options:
        pool, global_test = with_options(pool, cfg.options), with_options(global_test, cfg.options)
    p = cfg.partition
    paired: list[list[Record]] | None = None
    if cfg.local_test_size is not None:
        pool, paired = _paired_test_sets(pool, p.num_clients, cfg.local_test_size, paired_rng)
    hook = RECORD_HOOKS.get(p.method)
    extras, transform = hook(pool, p.params, cfg.seed) if hook else (p.params, None)
    parts = partition(
        [r.category for r in pool],
        p.num_clients,
        p.method,
        alpha=p.alpha,
        seed=cfg.seed,
        min_size=p.min_size,
        **extras,
    )
    if transform is not None:
        pool = transform(pool)
    clients = []
    for client_id, indices in enumerate(parts):
        if paired is not None:
            clients.append(ClientData(client_id, [pool[i] for i in indices], paired[client_id]))
            continue
        shuffled = split_rng.permutation(indices)
        n_test = min(int(len(indices) * cfg.local_test_fraction + 0.5), len(indices) - 1)
        clients.append(
            ClientData(
                client_id,
                train=[pool[i] for i in np.sort(shuffled[n_test:])],
                test=[pool[i] for i in np.sort(shuffled[:n_test])],
            )
        )
    categories = sorted({r.category for r in (*pool, *global_test)})
    return FederatedData(clients, global_test, categories)
