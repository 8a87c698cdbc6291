"""The Flower ClientApp of fedhet: one data owner's side of a federation.

Every message carries the experiment config (JSON), so a SuperNode needs no
config file. The base model is loaded once per process and kept in this module
(:data:`_WORKER`); clients are swapped by copying adapter tensors into it. A
node's data is its partition of the experiment's federated data (node config
``partition-id``, simulation) or its own files (node config ``data-path`` and
optional ``test-path``: JSON/JSONL/CSV/TSV with Record columns, deployment).
A node keeps its own adapter (strategies with ``keeps_local_state``, or
``federation.keep_client_states``) and its local-update cache (e.g. Fisher
scores) in its Flower ``Context``.

Handlers: ``query`` (who the node is: client id, sample count, category
histogram, example lengths), ``train`` (:func:`fedhet.client.train.run_instruction`,
the simulator's own client step, with the seed the server sends) and
``evaluate`` (the node's test split; strategies with local state merge the
node's own tensors into the global adapter, as the simulator does).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhet.client.train import TrainPlan, run_instruction
from fedhet.config import ExperimentConfig, validate_config
from fedhet.data.encode import Example, encode
from fedhet.data.federated import DataConfig, FederatedData, build_federated_data, with_options
from fedhet.data.records import Record
from fedhet.data.sources import FORMATS, load_source
from fedhet.errors import FedhetError
from fedhet.model.base import load_base_model
from fedhet.model.lora import AdapterState, LoraModel
from fedhet.runtime.evaluation import evaluate_adapter
from fedhet.runtime.flower_codec import (
    decode_instruction,
    encode_update,
    load_tree,
    save_tree,
    to_arrays,
    to_tensors,
)
from fedhet.strategies import build_strategy
from fedhet.strategies.base import Strategy


@dataclass
class _Worker:
    """What one process keeps between messages: the base model with LoRA."""

    key: str
    lm: LoraModel
    tokenizer: Any
    init_state: AdapterState


@dataclass
class _NodeData:
    """One node's data: its client id, encoded training examples and test records."""

    client_id: int
    examples: list[Example]
    test: list[Record]
    histogram: dict[str, int]


_WORKER: _Worker | None = None
"""The process's base model (one slot: a new model/LoRA config replaces it)."""
_DATA: dict[tuple, _NodeData] = {}
"""Each node's data by (data config, node config); a Ray actor serves many nodes."""
_OWN_STATE = "fedhet.own_state"
"""Key of a node's own adapter in its Flower Context (strategies with local state)."""
_CACHE = "fedhet.cache"
"""Key of the node's local-update cache in its Flower Context (e.g. Fisher scores)."""


@lru_cache(maxsize=4)
def _experiment(text: str) -> ExperimentConfig:
    return validate_config(json.loads(text), source="experiment sent by the ServerApp")


@lru_cache(maxsize=4)
def _strategy(text: str) -> Strategy:
    cfg = _experiment(text)
    return build_strategy(cfg.strategy.name, cfg.strategy.params)


def _worker(cfg: ExperimentConfig) -> _Worker:
    """The cached base model for ``cfg`` (loaded at most once per process and model)."""
    global _WORKER
    key = json.dumps([cfg.model.model_dump(), cfg.lora.model_dump(), cfg.seed])
    if _WORKER is None or _WORKER.key != key:
        _WORKER = None  # release the previous model before loading the next
        model, tokenizer = load_base_model(
            cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device
        )
        lm = LoraModel(model, cfg.lora, seed=cfg.seed)
        _WORKER = _Worker(key, lm, tokenizer, lm.init_state(cfg.seed, rank=cfg.lora.rank))
    return _WORKER


def _node_data(cfg: ExperimentConfig, node_config: Mapping[str, Any], worker: _Worker) -> _NodeData:
    """The node's data (see the module docstring), cached per process."""
    if "partition-id" not in node_config:
        raise FedhetError("node config: partition-id (this node's client id) is not set")
    cid = int(node_config["partition-id"])
    key = (cfg.data.model_dump_json(), worker.key, tuple(sorted(node_config.items())))
    if key in _DATA:
        return _DATA[key]
    if "data-path" in node_config:
        train = _read_records(str(node_config["data-path"]), "data-path")
        test = (
            _read_records(str(node_config["test-path"]), "test-path")
            if "test-path" in node_config
            else []
        )
        labels = cfg.data.options
        if labels:  # the experiment's label list applies to every node's files
            train, test = with_options(train, labels), with_options(test, labels)
        counts = Counter(r.category for r in (*train, *test))
        histogram = {c: counts[c] for c in sorted(counts)}
    else:
        fed = _federated(cfg.data.model_dump_json())
        if not 0 <= cid < len(fed.clients):
            raise FedhetError(
                f"node config: partition-id={cid} but the experiment has {len(fed.clients)} "
                "clients (set num-supernodes to data.partition.num_clients)"
            )
        train, test = fed.clients[cid].train, fed.clients[cid].test
        histogram = fed.category_histogram(cid)
    examples = encode(train, worker.tokenizer, cfg.data.max_length)
    _DATA[key] = _NodeData(cid, examples, test, histogram)
    return _DATA[key]


@lru_cache(maxsize=2)
def _federated(data: str) -> FederatedData:
    """The experiment's federated data (datasets found as the simulator finds them:
    ``$FEDHET_DATA``, ``../shared/data``), built once per process: a Ray actor
    serves many simulated nodes."""
    return build_federated_data(DataConfig.model_validate_json(data))


def _read_records(path: str, field_name: str) -> list[Record]:
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise FedhetError(f"node config: {field_name}={path}: use one of .{', .'.join(FORMATS)}")
    return load_source(fmt, path=path)


def _query(msg: Message, context: Context) -> Message:
    cfg = _experiment(str(msg.content.config_records["meta"]["experiment"]))
    data = _node_data(cfg, context.node_config, _worker(cfg))
    meta = {
        "client_id": data.client_id,
        "num_samples": len(data.examples),
        "histogram": json.dumps(data.histogram),
        "lengths": json.dumps([len(e.input_ids) for e in data.examples]),
    }
    return Message(RecordDict({"meta": ConfigRecord(meta)}), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    text = str(msg.content.config_records["meta"]["experiment"])
    cfg = _experiment(text)
    worker = _worker(cfg)
    data = _node_data(cfg, context.node_config, worker)
    inst, seed = decode_instruction(msg.content)
    if inst.client_id != data.client_id:
        raise FedhetError(f"instruction for client {inst.client_id} sent to {data.client_id}")
    keeps = _strategy(text).keeps_local_state or cfg.federation.keep_client_states
    own = context.state.array_records.get(_OWN_STATE) if keeps else None
    cache = load_tree(context.state, _CACHE, {})
    update, trained, _ = run_instruction(
        worker.lm,
        data.examples,
        inst,
        worker.init_state if own is None else to_tensors(own),
        TrainPlan(**cfg.train.model_dump()),
        seed=seed,
        pad_id=worker.tokenizer.pad_token_id,
        cache=cache,
    )
    save_tree(context.state, _CACHE, cache)
    if keeps:
        context.state[_OWN_STATE] = to_arrays(trained)
    return Message(encode_update(update), reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    text = str(msg.content.config_records["meta"]["experiment"])
    cfg = _experiment(text)
    worker = _worker(cfg)
    data = _node_data(cfg, context.node_config, worker)
    metrics: dict[str, float] = {}
    if data.test:
        own = context.state.array_records.get(_OWN_STATE)
        state = _strategy(text).evaluation_state(
            to_tensors(msg.content.array_records["state"]),
            None if own is None else to_tensors(own),
        )
        metrics = evaluate_adapter(
            worker.lm,
            worker.tokenizer,
            state,
            data.test[: cfg.eval.local_size],
            cfg.eval,
            max_length=cfg.data.max_length,
        )
    content = RecordDict(
        {
            "metrics": MetricRecord({k: float(v) for k, v in metrics.items()}),
            "meta": ConfigRecord({"client_id": data.client_id}),
        }
    )
    return Message(content, reply_to=msg)


def make_client_app() -> ClientApp:
    """The ClientApp: ``query``, ``train`` and ``evaluate`` handlers. It needs no
    config (each message carries the experiment) and keeps the base model in this
    module, so Flower's pickling of the app never copies it."""
    app = ClientApp()
    app.query()(_query)
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app
