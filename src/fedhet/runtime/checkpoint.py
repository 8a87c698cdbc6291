"""Atomic, self-checking checkpoints.

Each checkpoint is one file ``ckpt-<step>.pt`` holding ``torch.save`` bytes
prefixed by their SHA-256 (hex, one line). It is written to a temporary file,
flushed and fsync'ed, then renamed into place (``os.replace`` is atomic on
POSIX), and the directory is fsync'ed. The newest ``keep`` checkpoints are kept;
:func:`load_latest` verifies the hash and falls back to the previous checkpoint,
with a warning, when the newest is corrupt or truncated.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_PREFIX = "ckpt-"


def save_checkpoint(
    directory: str | Path, step: int, payload: dict[str, Any], keep: int = 2
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    final = directory / f"{_PREFIX}{step:08d}.pt"
    write_atomic(final, digest + b"\n" + data, durable=True)
    for old in _checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def write_atomic(path: str | Path, data: bytes | str, *, durable: bool = False) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path``: a reader
    sees the old file or the new one, never half of one. ``durable``: also fsync the
    file and its folder (survives a power cut, not only a killed process)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def load_latest(directory: str | Path) -> dict[str, Any] | None:
    """The newest valid checkpoint's payload, or None when there is none."""
    for path in reversed(_checkpoints(Path(directory))):
        payload = _read(path)
        if payload is not None:
            return payload
        log.warning("checkpoint %s is corrupt; falling back to the previous one", path)
    return None


def truncate_rows(path: Path, count: int) -> list[dict[str, Any]]:
    """Keep the first ``count`` rows of a JSON-lines file (a resumed run's metrics,
    as many as its checkpoint counted); returns them."""
    lines = (path.read_text() if path.exists() else "").splitlines()[:count]
    path.write_text("".join(line + "\n" for line in lines))
    return [json.loads(line) for line in lines]


def _read(path: Path) -> dict[str, Any] | None:
    raw = path.read_bytes()
    head, sep, data = raw.partition(b"\n")
    if not sep or hashlib.sha256(data).hexdigest().encode() != head:
        return None
    return torch.load(io.BytesIO(data), weights_only=False)


def _checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{_PREFIX}*.pt"))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
