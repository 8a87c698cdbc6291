"""Norms and changes of adapter states.

The update gate (:mod:`fedhet.runtime.validation`) bounds a client's change by
its L2 norm; the robust aggregators (:mod:`fedhet.strategies.robust`) clip by
it. Both measure the same way, so the two functions live here, below both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from fedhet.model.lora import AdapterState


def update_delta(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    kind: Literal["state", "delta"],
) -> AdapterState:
    """A client's change: ``state − reference`` for a state upload, the upload
    itself for a delta."""
    if kind == "delta":
        return dict(state)
    return {k: state[k] - reference[k] for k in state}


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """||x||₂ over all tensors together (float64 accumulation)."""
    total = sum(float(t.double().pow(2).sum()) for t in state.values())
    return math.sqrt(total)
