"""Readers of the offline data files: each yields ``(where, row)`` pairs.

``where`` names the file and line (or item) for error messages; a malformed
file raises :class:`~fedhet.errors.FedhetError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedhet.errors import FedhetError

Row = dict[str, Any]
Reader = Callable[[Path], Iterator[tuple[str, Row]]]
"""Yields ``(where, row)``: ``where`` names the file and line (or item) for error messages."""


def read_json(path: Path) -> Iterator[tuple[str, Row]]:
    """A JSON array of objects; ``where`` is the 1-based item number."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FedhetError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise FedhetError(f"{path}: expected a JSON array of objects")
    for i, row in enumerate(data, 1):
        yield f"{path} item {i}", row


def read_jsonl(path: Path) -> Iterator[tuple[str, Row]]:
    """One JSON object per line; blank lines are skipped; ``where`` is ``path:line``."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedhetError(f"{path}:{n}: malformed JSON line ({exc.msg})") from None
            if not isinstance(row, dict):
                raise FedhetError(f"{path}:{n}: expected a JSON object")
            yield f"{path}:{n}", row


def read_table(
    path: Path, *, delimiter: str, header: tuple[str, ...] | None = None
) -> Iterator[tuple[str, Row]]:
    """CSV (standard quoting) or TSV (no quoting: quotes are text, as in GLUE).

    The first line is the header unless ``header`` gives the column names. A row with
    too few or too many columns is an error naming its line.
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, fieldnames=header, delimiter=delimiter, quoting=quoting)
        try:
            for row in reader:
                if None in row or None in row.values():
                    raise FedhetError(
                        f"{path}:{reader.line_num}: expected {len(reader.fieldnames or ())} "
                        f"columns {tuple(reader.fieldnames or ())}"
                    )
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise FedhetError(f"{path}:{reader.line_num}: {exc}") from None


def read_trec(path: Path) -> Iterator[tuple[str, Row]]:
    """Lines ``COARSE:fine question``."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            label, _, question = line.strip().partition(" ")
            coarse, colon, fine = label.partition(":")
            if not colon or not question:
                raise FedhetError(f"{path}:{n}: expected 'COARSE:fine question'")
            yield f"{path}:{n}", {"coarse": coarse, "fine": fine, "question": question}


def read_superni(path: Path) -> Iterator[tuple[str, Row]]:
    """A Super-NaturalInstructions task file: one row per instance, with task-level fields.

    Each row carries ``task`` (file stem), ``definition``, ``input``, ``output`` (the list of
    acceptable outputs) and ``options`` (see the module docstring).
    """
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
        definition = task["Definition"]
        instances = task["Instances"]
        categories = task.get("Categories", [])
    except json.JSONDecodeError as exc:
        raise FedhetError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except (KeyError, TypeError):
        raise FedhetError(f"{path}: not a task file (needs Definition and Instances)") from None
    if isinstance(definition, list):  # the official SNI files store it as a list
        definition = "\n".join(definition)
    firsts = {str(inst["output"][0]) for inst in instances if inst.get("output")}
    options = tuple(sorted(firsts)) if "Classification" in categories and len(firsts) <= 10 else ()
    for i, inst in enumerate(instances, 1):
        row = {"task": path.stem, "definition": definition, "options": options, **inst}
        yield f"{path} instance {i}", row


def read_math(path: Path) -> Iterator[tuple[str, Row]]:
    """A math_word_problems JSON file; adds ``benchmark``, the file name before ``_``."""
    benchmark = path.stem.split("_")[0]
    for where, row in read_json(path):
        yield where, {**row, "benchmark": benchmark}
