"""The Flower wire format of fedhet: instructions, updates and trees as records.

Adapter states, plan tensors (masks) and tensor statistics travel as Flower
``ArrayRecord``s (numpy arrays); plans and ``extras`` are JSON trees (tuples,
dicts with any scalar keys and tensor references allowed), never pickles, so a
client cannot make the server execute code. bfloat16 tensors travel as float32
(numpy has no bfloat16), exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhet.protocol import ClientUpdate, Instruction


def pack_tree(obj: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """JSON text and tensors of a plan or extras tree (see :func:`unpack_tree`).

    Tensors (and numpy arrays) become ``{"$tensor": key}``, tuples ``{"$tuple": [...]}``,
    mappings ``{"$dict": [[key, value], ...]}`` (keys of any scalar type); lists,
    ranges, strings, numbers, booleans and None pass through. Anything else is a
    TypeError naming its type.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu()
            return {"$tensor": key}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, Mapping):
            return {"$dict": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"$tuple": [enc(v) for v in x]}
        if isinstance(x, list | range):
            return [enc(v) for v in x]
        if x is None or isinstance(x, str | int | float | bool):
            return x
        raise TypeError(f"cannot send a {type(x).__name__} over Flower (plan or extras)")

    return json.dumps(enc(obj)), tensors


def unpack_tree(text: str, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_tree`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "$tensor" in x:
                return tensors[x["$tensor"]]
            if "$tuple" in x:
                return tuple(dec(v) for v in x["$tuple"])
            return {_hashable(dec(k)): dec(v) for k, v in x["$dict"]}
        return x

    return dec(json.loads(text))


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an ArrayRecord (numpy has no bfloat16: those travel as float32, exactly)."""
    return ArrayRecord(
        torch_state_dict={
            k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu()
            for k, v in state.items()
        }
    )


def to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def encode_instruction(inst: Instruction, *, seed: int, experiment: str) -> RecordDict:
    """A train message's content: the start tensors, the plan, the seed, the config."""
    plan, plan_tensors = pack_tree(inst.plan)
    return RecordDict(
        {
            "state": to_arrays(inst.state),
            "plan_tensors": to_arrays(plan_tensors),
            "meta": ConfigRecord(
                {
                    "client_id": inst.client_id,
                    "version": inst.version,
                    "seed": seed,
                    "plan": plan,
                    "experiment": experiment,
                }
            ),
        }
    )


def decode_instruction(content: RecordDict) -> tuple[Instruction, int]:
    """(instruction, seed) from :func:`encode_instruction`'s content."""
    meta = content.config_records["meta"]
    plan = unpack_tree(str(meta["plan"]), to_tensors(content.array_records["plan_tensors"]))
    inst = Instruction(
        client_id=int(meta["client_id"]),
        state=to_tensors(content.array_records["state"]),
        plan=plan,
        version=int(meta["version"]),
    )
    return inst, int(meta["seed"])


def encode_update(update: ClientUpdate) -> RecordDict:
    """A train reply's content (the upload, metadata, metrics and extras)."""
    extras, extra_tensors = pack_tree(update.extras)
    return RecordDict(
        {
            "state": to_arrays(update.state),
            "extras_tensors": to_arrays(extra_tensors),
            "meta": ConfigRecord(
                {
                    "client_id": update.client_id,
                    "num_samples": update.num_samples,
                    "version": update.version,
                    "kind": update.kind,
                    "extras": extras,
                }
            ),
            "metrics": MetricRecord({k: float(v) for k, v in update.metrics.items()}),
        }
    )


def decode_update(content: RecordDict) -> ClientUpdate:
    """Inverse of :func:`encode_update`; malformed content raises (KeyError,
    ValueError, TypeError ...), which the server counts as a rejection."""
    meta = content.config_records["meta"]
    kind = str(meta["kind"])
    if kind not in ("state", "delta"):
        raise ValueError(f"unknown update kind {kind!r}")
    extras = unpack_tree(str(meta["extras"]), to_tensors(content.array_records["extras_tensors"]))
    if not isinstance(extras, dict):
        raise ValueError("extras must be a mapping")
    return ClientUpdate(
        client_id=int(meta["client_id"]),
        state=to_tensors(content.array_records["state"]),
        num_samples=int(meta["num_samples"]),
        version=int(meta["version"]),
        kind=kind,  # type: ignore[arg-type]
        metrics={k: float(v) for k, v in content.metric_records["metrics"].items()},
        extras=extras,
    )


def save_tree(state: RecordDict, name: str, tree: Any) -> None:
    """Keep a JSON/tensor tree (:func:`pack_tree`) in a node's Context state."""
    text, tensors = pack_tree(tree)
    state[f"{name}.tree"] = ConfigRecord({"json": text})
    state[f"{name}.tensors"] = to_arrays(tensors)


def load_tree(state: RecordDict, name: str, default: Any) -> Any:
    if f"{name}.tree" not in state:
        return default
    text = str(state.config_records[f"{name}.tree"]["json"])
    return unpack_tree(text, to_tensors(state.array_records[f"{name}.tensors"]))
