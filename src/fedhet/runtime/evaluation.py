"""Evaluation of adapters with a run's settings, and the metrics fields it fills.

:func:`evaluate_adapter` is the one call every runtime, the context study and
the benchmarks use: load an adapter into the shared model and score records
with ``eval.metric``, ``eval.batch_size`` and ``eval.max_new_tokens``
(:func:`fedhet.client.evaluate.evaluate`). :func:`spread_fields` turns several
clients' results into a row's ``local_*`` / ``unseen_*`` fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedhet.client.evaluate import evaluate
from fedhet.config import EvalConfig
from fedhet.data.records import Record
from fedhet.model.lora import AdapterState, LoraModel


def evaluate_adapter(
    lm: LoraModel,
    tokenizer: Any,
    state: AdapterState,
    records: Sequence[Record],
    ev: EvalConfig,
    *,
    max_length: int,
) -> dict[str, float]:
    """``state`` loaded into ``lm``, scored on ``records`` with the settings of ``ev``
    (``loss`` always, plus the metric's own key)."""
    lm.load_state(state)
    return evaluate(
        lm.model,
        tokenizer,
        records,
        ev.metric,
        max_length=max_length,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        option_scoring=ev.option_scoring,
    )


def spread_fields(
    prefix: str, results: Mapping[int, Mapping[str, float]], key: str, *, per_client: bool = True
) -> dict[str, Any]:
    """Mean and standard deviation over clients of the metric ``key`` and of the
    loss, as ``{prefix}_{key}_mean`` … ``{prefix}_loss_std``; with ``per_client``
    also ``{prefix}_per_client`` (the metric by client id). Empty without results."""
    if not results:
        return {}
    order = sorted(results)
    row: dict[str, Any] = {}
    for name in dict.fromkeys((key, "loss")):
        values = np.array([float(results[c][name]) for c in order])
        row[f"{prefix}_{name}_mean"] = float(values.mean())
        row[f"{prefix}_{name}_std"] = float(values.std())
    if per_client:
        row[f"{prefix}_per_client"] = {str(c): float(results[c][key]) for c in order}
    return row
