"""Validation of incoming client updates: the one gate every runtime puts before
a strategy's ``aggregate`` / ``on_arrival``.

The server knows what it asked each client for. :func:`expected_update` turns
that into an :class:`UpdateSpec` (the keys the plan's ``upload_keys`` named, or
all keys of the start state; each key's shape, hence the client's rank per
module and its layers; the kind, ``state`` or ``delta``; the client's declared
sample count). :func:`validate_update` checks an arriving update against it
and returns ``None`` (accept) or the reason for rejecting it, in this order:

1. it is a :class:`~fedhet.strategies.base.ClientUpdate` from the instructed
   client, of the instructed kind;
2. its keys are exactly the expected ones (none missing, none extra);
3. every tensor is a floating-point ``torch.Tensor`` of the expected shape;
4. every value is finite (tensors and numbers in ``extras`` included);
5. ``1 ≤ num_samples ≤`` the declared count (a client cannot inflate its
   aggregation weight);
6. its model version is not newer than the server's, and its staleness
   ``τ = version_now − update.version ≤ max_staleness`` (when set);
7. the L2 norm of its change, over all its tensors together, is at most
   ``max_norm`` (when set): ``||x_k − x_start||`` for a state,
   ``||Δ_k||`` for a delta (:func:`fedhet.model.norms.update_delta`).

Choices: any floating dtype is accepted (a client may train in bf16; the
aggregators compute in float32); the norm is measured from the state the client
started from, so an honest update's norm does not depend on the size of the
adapter it received. Validation never raises: a malformed update (a non-tensor,
a missing attribute) is itself a rejection. Each rejection is logged (warning)
with the client id and the reason; the runtime counts it and keeps the update
away from the strategy and the global state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedhet.model.lora import AdapterState
from fedhet.model.norms import l2_norm, update_delta
from fedhet.protocol import ClientUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateSpec:
    """What the server expects back from one instruction.

    ``reference`` holds the start tensors of the expected keys: their shapes are
    the expected shapes, and a state update's norm is measured from them.
    """

    client_id: int
    reference: AdapterState
    kind: Literal["state", "delta"]
    num_samples: int


def expected_update(
    client_id: int,
    start: Mapping[str, torch.Tensor],
    *,
    upload_keys: Sequence[str] | None,
    kind: Literal["state", "delta"],
    num_samples: int,
) -> UpdateSpec:
    """The spec of the reply to an instruction: ``start`` is the state the client
    starts from (the instruction's tensors over its own or the initial ones),
    ``upload_keys`` and ``kind`` the plan's ``upload_keys`` and ``send``."""
    keys = list(start) if upload_keys is None else list(upload_keys)
    missing = [k for k in keys if k not in start]
    if missing:
        raise ValueError(f"upload keys absent from the start state: {missing[:3]}")
    return UpdateSpec(client_id, {k: start[k] for k in keys}, kind, num_samples)


def validate_update(
    update: ClientUpdate,
    spec: UpdateSpec,
    *,
    version: int,
    max_staleness: int | None = None,
    max_norm: float | None = None,
) -> str | None:
    """``None`` when ``update`` may reach the strategy, else why not (logged).

    ``version`` is the server's global model version at arrival.
    """
    try:
        reason = _check(update, spec, version, max_staleness, max_norm)
    except Exception as err:  # a malformed update is a rejection, never a crash
        reason = f"malformed update: {type(err).__name__}: {err}"
    if reason is not None:
        log.warning("rejected the update of client %d: %s", spec.client_id, reason)
    return reason


def _check(
    update: ClientUpdate,
    spec: UpdateSpec,
    version: int,
    max_staleness: int | None,
    max_norm: float | None,
) -> str | None:
    if not isinstance(update, ClientUpdate):
        return f"not a ClientUpdate but a {type(update).__name__}"
    if update.client_id != spec.client_id:
        return f"claims to come from client {update.client_id}"
    if update.kind != spec.kind:
        return f"kind {update.kind!r}, expected {spec.kind!r}"
    if not isinstance(update.state, Mapping):
        return f"state is a {type(update.state).__name__}, not a mapping"
    missing = sorted(set(spec.reference) - set(update.state))
    extra = sorted(set(update.state) - set(spec.reference))
    if missing:
        return f"{len(missing)} missing keys, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected keys, e.g. {extra[0]}"
    for key, tensor in update.state.items():
        want = spec.reference[key].shape
        if not isinstance(tensor, torch.Tensor):
            return f"{key}: a {type(tensor).__name__}, not a tensor"
        if not tensor.is_floating_point():
            return f"{key}: dtype {tensor.dtype} is not floating-point"
        if tensor.shape != want:
            return f"{key}: shape {tuple(tensor.shape)}, expected {tuple(want)}"
        if not bool(torch.isfinite(tensor).all()):
            return f"{key}: non-finite values (NaN or Inf)"
    for name, value in update.extras.items():
        if not _finite(value):
            return f"extras[{name!r}]: non-finite values"
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= spec.num_samples:
        return f"num_samples {n!r} outside [1, {spec.num_samples}]"
    if isinstance(update.version, bool) or not isinstance(update.version, int):
        return f"model version {update.version!r} is not an integer"
    staleness = version - update.version
    if staleness < 0:
        return f"model version {update.version} is newer than the server's {version}"
    if max_staleness is not None and staleness > max_staleness:
        return f"stale: {staleness} versions old (max_staleness {max_staleness})"
    if max_norm is not None:
        norm = l2_norm(update_delta(update.state, spec.reference, spec.kind))
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm {max_norm:.4g}"
    return None


def _finite(value: object) -> bool:
    """Tensors and numbers must be finite; other values are the strategy's business."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True
