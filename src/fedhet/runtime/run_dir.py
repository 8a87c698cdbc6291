"""A run's folder is never silently reused.

:func:`check_run_dir` decides, before any data or model is loaded and without
touching anything, what happens to ``output_dir/name``:

* empty or absent: the run starts there;
* it holds an earlier run: an error naming ``--resume`` (continue it) and
  ``--overwrite`` (delete it and start again: :func:`clear_run_dir`, called once
  data and model have loaded), so nothing in it changes;
* ``resume``: the saved ``config.yaml``, if any, must equal the config given now
  (the error lists the fields that differ); the run continues from the newest
  checkpoint, or starts when there is none yet (a supervisor may always pass
  ``--resume``, also before the first checkpoint was written).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from fedhet.config import ExperimentConfig
from fedhet.errors import FedhetError


def check_run_dir(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Raise :class:`FedhetError` unless the run may use its folder (module docstring)."""
    run_dir = cfg.run_dir
    if resume and overwrite:
        raise FedhetError("--resume and --overwrite: give one of them")
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "config.yaml").is_file():
            return run_dir  # nothing to continue yet: the run starts
        differences = config_differences(run_dir / "config.yaml", cfg)
        if differences:
            raise FedhetError(
                f"--resume: the config differs from the one {run_dir} was run with: "
                + "; ".join(differences)
                + " (resume with the same config, or start again with --overwrite)"
            )
    elif used and not overwrite:
        raise FedhetError(
            f"{run_dir} holds an earlier run: --resume continues it, --overwrite deletes "
            "it and starts again (or choose another name: --set name=...)"
        )
    return run_dir


def clear_run_dir(cfg: ExperimentConfig) -> None:
    """Delete the run folder (``--overwrite``, after :func:`check_run_dir`)."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)


def config_differences(saved: Path, cfg: ExperimentConfig) -> list[str]:
    """``field: saved → now`` for every dotted field that differs (empty: same)."""
    before = _flat(yaml.safe_load(saved.read_text()) or {})
    now = _flat(cfg.model_dump(mode="json"))
    return [
        f"{key}: {before.get(key)!r} → {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.")
    return out
