"""Data sources: the offline datasets of ``shared/data`` and generic files, read as Records.

A *named source* (see :data:`SOURCES`) is a folder of the offline data collection with one
file pattern per split, a reader and a converter to :class:`~fedhet.data.records.Record`.
A *generic format* (see :data:`FORMATS`: json, jsonl, csv, tsv) reads one user file through
a field mapping.

Where a named source's folder is looked for, in order (the first folder that exists wins):

1. the ``data_dir`` argument;
2. the directory in the ``FEDHET_DATA`` environment variable;
3. ``../shared/data`` relative to the current working directory;
4. ``../shared/data`` relative to the repository root, found from this file's location
   (``<repo>/src/fedhet/data/sources.py``); meaningless, and harmless, for an installed wheel;
5. the Hugging Face hub, for the sources and splits listed in their ``hub`` entry, when the
   ``datasets`` package is importable. Hub rows go through the same converters as file rows.

Assumptions, per source (classification sources put the label in ``response`` and
``category`` and list the labels in ``options``; the other sources without a natural
category use the source name as ``category`` so that mixed sources can be told apart):

- dolly: ``category`` is Dolly's category; ``context`` is kept. Split: train.
- gsm8k: ``response`` is the full worked answer; ``answer`` is the number after ``####``,
  without thousands separators. Splits: train, test.
- sst2: options negative/positive. Splits: train, dev (both re-split from GLUE train by
  ALPS) and test (the labelled GLUE dev set).
- agnews: options World/Sports/Business/Sci/Tech. Splits: dev, test (no train file).
- rte: the premise is the ``context``, the hypothesis is in the instruction; options
  entailment/not_entailment. Splits: train, val; test is unlabelled and refused.
- trec: the coarse label, spelled out (abbreviation, description, entity, human,
  location, number), is the category and the response. Splits: train, test.
- boolq: options true/false; the question is in the instruction (this LLM-Adapters
  version has no passage). Splits: train, test.
- superni: every task file (``tasks`` selects some); ``category`` is the task name (file
  stem); the instruction is the task Definition, a blank line, then the instance input;
  ``response`` is the first acceptable output. ``options`` are the task's distinct outputs
  when the task is a Classification task with at most 10 of them, else empty. Split: train.
- alpaca (Alpaca-GPT4 demo) and code_alpaca (Code Alpaca 2k): ``input`` is the
  ``context``. Split: train. From the hub they are the full sets.
- math_word_problems: ``category`` is the benchmark (addsub, aqua, mathqa, mawps,
  multiarith, singleeq, svamp); ``response`` and ``answer`` are the gold ``answer`` field
  (the ``output`` rationales are not used: some are model-generated and wrong); aqua and
  mathqa are multiple choice with options A-E. Splits: train and valid (MAWPS only),
  test (all seven benchmarks).
- mmlu: ``category`` is the MMLU subject; ``input`` (question and options) is the
  ``context``; ``options`` are the four "The answer is: X. ..." responses; ``answer`` is the
  letter. Split: test.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fedhet.data import converters, readers
from fedhet.data.converters import Converter
from fedhet.data.readers import Reader, Row
from fedhet.data.records import Record
from fedhet.errors import FedhetError

_REPO_ROOT = Path(__file__).resolve().parents[3]
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))
_REQUIRED_FIELDS = ("instruction", "response")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Hub:
    """Where a source lives on the Hugging Face hub: repository, config, split names."""

    repo: str
    config: str | None
    splits: Mapping[str, str]
    """Our split name → the hub's split name; only labelled splits."""


@dataclass(frozen=True)
class Source:
    """A named dataset: its folder under the data directory and how to read it."""

    folder: str
    splits: Mapping[str, str]
    """Split name → file name or glob pattern inside ``folder`` (matches read in name order)."""
    read: Reader
    convert: Converter
    unlabelled: tuple[str, ...] = ()
    """Splits that exist but have no labels; loading them is refused."""
    hub: Hub | None = None
    task_files: bool = False
    """Each file is one task whose name (the category) is the file stem, so that ``tasks``
    selects files before they are read."""


SOURCES: dict[str, Source] = {
    "dolly": Source(
        "dolly15k",
        {"train": "databricks-dolly-15k.jsonl"},
        readers.read_jsonl,
        converters.dolly,
        hub=Hub("databricks/databricks-dolly-15k", None, {"train": "train"}),
    ),
    "gsm8k": Source(
        "gsm8k",
        {"train": "train.jsonl", "test": "test.jsonl"},
        readers.read_jsonl,
        converters.gsm8k,
        hub=Hub("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    ),
    "sst2": Source(
        "glue_sst2",
        {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
        partial(readers.read_table, delimiter="\t"),
        converters.sst2,
        hub=Hub("nyu-mll/glue", "sst2", {"train": "train", "test": "validation"}),
    ),
    "agnews": Source(
        "agnews_alps",
        {"dev": "dev.tsv", "test": "test.tsv"},
        partial(readers.read_table, delimiter="\t", header=("text", "label")),
        converters.agnews,
        hub=Hub("fancyzhx/ag_news", None, {"test": "test"}),
    ),
    "rte": Source(
        "superglue_rte",
        {"train": "train.jsonl", "val": "val.jsonl"},
        readers.read_jsonl,
        converters.rte,
        unlabelled=("test",),
        hub=Hub("aps/super_glue", "rte", {"train": "train", "val": "validation"}),
    ),
    "trec": Source(
        "trec", {"train": "train.txt", "test": "test.txt"}, readers.read_trec, converters.trec
    ),
    "boolq": Source(
        "boolq", {"train": "train.json", "test": "test.json"}, readers.read_json, converters.boolq
    ),
    "superni": Source(
        "superni_tasks_subset",
        {"train": "task*.json"},
        readers.read_superni,
        converters.superni,
        task_files=True,
    ),
    "alpaca": Source(
        "alpaca_gpt4_en_demo",
        {"train": "alpaca_en_demo.json"},
        readers.read_json,
        partial(converters.instruction_input_output, category="alpaca"),
        hub=Hub("vicgalle/alpaca-gpt4", None, {"train": "train"}),
    ),
    "code_alpaca": Source(
        "code_alpaca_2k",
        {"train": "code_alpaca_2k.json"},
        readers.read_json,
        partial(converters.instruction_input_output, category="code_alpaca"),
        hub=Hub("sahil2801/CodeAlpaca-20k", None, {"train": "train"}),
    ),
    "math_word_problems": Source(
        "math_word_problems",
        {"train": "mawps_train.json", "valid": "mawps_valid.json", "test": "*_test.json"},
        readers.read_math,
        converters.math,
    ),
    "mmlu": Source(
        "mmlu_subset", {"test": "mmlu_test_1444.json"}, readers.read_json, converters.mmlu
    ),
}
"""Named sources, by the name given to :func:`load_source`."""

FORMATS: dict[str, Reader] = {
    "json": readers.read_json,
    "jsonl": readers.read_jsonl,
    "csv": partial(readers.read_table, delimiter=","),
    "tsv": partial(readers.read_table, delimiter="\t"),
}
"""Generic file formats, read from ``path`` through a field mapping (first line = header)."""


# ----------------------------------------------------------------------------- loading


def _options(raw: Any) -> tuple[str, ...]:
    """Options from a list, or from a string of labels separated by ``|``."""
    if isinstance(raw, list):
        return tuple(str(option) for option in raw)
    return tuple(str(raw).split("|")) if raw != "" else ()


def _field_converter(fields: Mapping[str, str] | None, path: Path) -> Converter:
    """A converter for generic files: Record field → source column.

    Unmapped Record fields read the column of the same name: required for ``instruction``
    and ``response``, taken when present for the others. A mapped column must be present in
    every row. ``options`` is a JSON list, or a string of labels separated by ``|``.
    """
    mapping = dict(fields or {})
    unknown = sorted(set(mapping) - set(_RECORD_FIELDS))
    if unknown:
        raise FedhetError(
            f"{path}: unknown Record field(s) {unknown} in the field mapping; "
            f"Record fields are {list(_RECORD_FIELDS)}"
        )

    def convert(row: Row) -> Record:
        values: dict[str, Any] = {}
        for name in _RECORD_FIELDS:
            column = mapping.get(name, name)
            if row.get(column) is None:
                if name in mapping or name in _REQUIRED_FIELDS:
                    raise ValueError(f"missing column {column!r} for Record field {name!r}")
                continue
            if name == "options":
                values[name] = _options(row[column])
            else:
                values[name] = converters.text(row, column)
        return Record(**values)

    return convert


def _load_file(path: Path, read: Reader, convert: Converter) -> list[Record]:
    if not path.is_file():
        raise FedhetError(f"data file not found: {path}")
    records = []
    try:
        for where, row in read(path):
            try:
                records.append(convert(row))
            except ValueError as exc:
                raise FedhetError(f"{where}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise FedhetError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    return records


def _search_dirs(data_dir: str | Path | None) -> list[Path]:
    """The data directories to look in, in order, without duplicates."""
    candidates = [
        data_dir,
        os.environ.get("FEDHET_DATA") or None,
        Path.cwd().parent / "shared" / "data",
        _REPO_ROOT.parent / "shared" / "data",
    ]
    dirs: list[Path] = []
    for candidate in candidates:
        if candidate is not None and Path(candidate).resolve() not in dirs:
            dirs.append(Path(candidate).resolve())
    return dirs


def _load_hub(name: str, hub: Hub, split: str, convert: Converter) -> list[Record] | None:
    """The split from the hub, or None when the ``datasets`` package is not installed."""
    try:
        import datasets
    except ImportError:
        return None
    try:
        rows = datasets.load_dataset(hub.repo, hub.config, split=hub.splits[split])
    except Exception as exc:  # network, authentication or a renamed repository
        raise FedhetError(
            f"{name}: not found locally and the hub failed ({hub.repo}): {exc}"
        ) from exc
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(convert(row))
        except ValueError as exc:
            raise FedhetError(f"{hub.repo} {hub.splits[split]} row {i}: {exc}") from None
    return records


def _load_named(
    name: str, source: Source, split: str, data_dir: str | Path | None, tasks: list[str] | None
) -> list[Record]:
    if split in source.unlabelled:
        raise FedhetError(
            f"{name}: split {split!r} is unlabelled and cannot be used for supervised training "
            f"or evaluation; labelled splits: {', '.join(source.splits)}"
        )
    if split not in source.splits:
        raise FedhetError(f"{name}: no split {split!r}; splits: {', '.join(source.splits)}")
    searched = _search_dirs(data_dir)
    for base in searched:
        folder = base / source.folder
        if folder.is_dir():
            files = sorted(folder.glob(source.splits[split]))
            if not files:
                raise FedhetError(f"data file not found: {folder / source.splits[split]}")
            if source.task_files and tasks is not None:
                _check_tasks(tasks, {f.stem for f in files}, name)
                files = [f for f in files if f.stem in tasks]
            return [r for f in files for r in _load_file(f, source.read, source.convert)]
    if source.hub is not None and split in source.hub.splits:
        records = _load_hub(name, source.hub, split, source.convert)
        if records is not None:
            return records
        hub_note = "; the Hugging Face hub needs the 'datasets' package"
    else:
        hub_note = f"; the Hugging Face hub has no copy of {name} split {split!r}"
    raise FedhetError(
        f"{name}: data folder {source.folder!r} not found; searched "
        + ", ".join(str(d) for d in searched)
        + " (set data_dir or FEDHET_DATA)"
        + hub_note
    )


def _check_tasks(tasks: list[str], available: set[str], name: str) -> None:
    unknown = sorted(set(tasks) - available)
    if unknown:
        raise FedhetError(f"{name}: unknown task(s) {unknown}; available: {sorted(available)}")


def _select_tasks(records: list[Record], tasks: list[str], name: str) -> list[Record]:
    _check_tasks(tasks, {r.category for r in records}, name)
    wanted = set(tasks)
    return [r for r in records if r.category in wanted]


def load_source(
    name: str,
    *,
    split: str = "train",
    data_dir: str | Path | None = None,
    path: str | Path | None = None,
    fields: dict[str, str] | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> list[Record]:
    """Load a named source (:data:`SOURCES`) or a generic file (:data:`FORMATS`) as Records.

    Args:
        name: a key of :data:`SOURCES` or :data:`FORMATS`.
        split: a split of the named source; generic files have only ``"train"`` (so that
            asking one file for a test split cannot silently return the training data).
        data_dir: first directory searched for a named source (module docstring).
        path: the file of a generic format; not accepted for named sources. A relative
            path is looked for in ``data_dir`` first, then in the working directory.
        fields: the field mapping of a generic format (Record field → column).
        tasks: keep only records whose ``category`` is one of these (SuperNI task names,
            Dolly categories, math benchmarks, ...); an unknown one is an error.
        limit: keep at most this many records: the first ones in file order, or, when
            ``seed`` is given, the first ones after a shuffle seeded with it.
        seed: see ``limit``; without ``limit`` it has no effect.

    Raises:
        FedhetError: unknown name, split or task; missing file or folder; bad row (the
            message names the file and line or item); bad field mapping.
    """
    if name in FORMATS:
        if path is None:
            raise FedhetError(f"source {name!r} reads a file: set data.path")
        if split != "train":
            raise FedhetError(
                f"source {name!r} reads one file and has only the split 'train' "
                "(a separate test file: data.test_path)"
            )
        file = Path(path)
        if not file.is_absolute() and data_dir is not None and (Path(data_dir) / file).is_file():
            file = Path(data_dir) / file
        records = _load_file(file, FORMATS[name], _field_converter(fields, file))
    elif name in SOURCES:
        if path is not None or fields is not None:
            raise FedhetError(
                f"source {name!r}: path and fields apply to the generic formats "
                f"{', '.join(FORMATS)} only; use data_dir to point at the data directory"
            )
        records = _load_named(name, SOURCES[name], split, data_dir, tasks)
    else:
        raise FedhetError(f"unknown data source {name!r}; known: {', '.join([*SOURCES, *FORMATS])}")
    if tasks is not None:
        records = _select_tasks(records, tasks, name)
    if limit is None:
        return records
    if limit < 0:
        raise FedhetError(f"limit must be >= 0, got {limit}")
    if seed is None:
        return records[:limit]
    order = np.random.default_rng(seed).permutation(len(records))[:limit]
    return [records[i] for i in order]
