"""Each client's partition as files: the data of a deployed Flower SuperNode.

A deployment gives each data owner its own files (node config ``data-path`` and
``test-path``, :mod:`fedhet.runtime.flower_client`); for a rehearsal or a test,
:func:`export_client_data` writes them from an experiment's partition, so the
deployed run trains exactly what the simulated one does.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedhet.data.federated import DataConfig, build_federated_data
from fedhet.data.records import Record


def export_client_data(
    data: DataConfig, out_dir: str | Path, *, data_dir: str | Path | None = None
) -> list[tuple[Path, Path]]:
    """Write each client's partition (``data``: an experiment's ``data`` section)
    as ``client-<id>.train.jsonl`` and ``client-<id>.test.jsonl`` (Record fields),
    the ``data-path``/``test-path`` of a deployed SuperNode; returns the
    (train, test) paths by client id."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for client in build_federated_data(data, data_dir=data_dir).clients:
        pair = []
        for part, records in (("train", client.train), ("test", client.test)):
            path = out / f"client-{client.client_id}.{part}.jsonl"
            path.write_text("".join(json.dumps(_record_row(r)) + "\n" for r in records))
            pair.append(path)
        paths.append((pair[0], pair[1]))
    return paths


def _record_row(record: Record) -> dict[str, Any]:
    row = asdict(record)
    row["options"] = list(record.options)
    return row
