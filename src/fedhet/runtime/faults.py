"""Fault injection in the simulator: misbehaving clients, configured per experiment.

The ``faults:`` section of an experiment is a list of :class:`FaultSpec`; each
names a kind, the faulty clients (``clients``: ids, or ``fraction``: that share
of the training clients, drawn from the run's seed) and the probability that a
faulty client misbehaves on a given participation. Kinds:

* ``crash``: the client dies during its local update; no reply arrives (the
  runtime counts it in ``dropped``, like ``federation.dropout``);
* ``nan`` / ``inf``: one value of the first tensor (sorted keys) is NaN / +Inf;
* ``shape``: the first tensor comes back at rank r+1 (zero-padded);
* ``scale``: the change is boosted ``scale`` times (default 100):
  x_start + s·(x_k − x_start) for a state, s·Δ_k for a delta (the "boosting"
  model-poisoning attack);
* ``stale``: the update claims a model ``staleness`` versions older than the
  one it started from, as a client replaying an old update (early in a run
  the claimed version is negative: older than the run itself).

Decisions are drawn from generators seeded by (seed, spec index, event,
client), never from a running stream, so a resumed run injects exactly the
faults of an uninterrupted one. When several specs hit one participation the
first in the list applies. Validation
(:mod:`fedhet.runtime.validation`) and robust aggregation
(:mod:`fedhet.strategies.robust`) are what must catch or absorb them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedhet.errors import FedhetError
from fedhet.model.lora import module_name, ranks, resize_rank

if TYPE_CHECKING:
    from fedhet.protocol import ClientUpdate
    from fedhet.runtime.validation import UpdateSpec

FaultKind = Literal["crash", "nan", "inf", "shape", "scale", "stale"]


class FaultSpec(BaseModel):
    """One kind of misbehaviour and who shows it (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    clients: list[int] | None = None
    fraction: float | None = Field(None, ge=0, le=1)
    probability: float = Field(1.0, gt=0, le=1)
    scale: float = 100.0
    staleness: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _who(self) -> FaultSpec:
        if (self.clients is None) == (self.fraction is None):
            raise ValueError("give exactly one of clients (ids) or fraction")
        return self


class FaultInjector:
    """Decides and applies the configured faults of one run."""

    def __init__(self, specs: list[FaultSpec], num_clients: int, seed: int) -> None:
        self.specs = specs
        self.seed = seed
        self.faulty: list[frozenset[int]] = []
        for i, spec in enumerate(specs):
            if spec.clients is not None:
                unknown = [c for c in spec.clients if not 0 <= c < num_clients]
                if unknown:
                    raise FedhetError(
                        f"faults[{i}].clients: {unknown} are not training clients "
                        f"(0..{num_clients - 1})"
                    )
                self.faulty.append(frozenset(spec.clients))
            else:
                count = round(spec.fraction * num_clients)
                rng = np.random.default_rng([seed, 43, i])
                chosen = rng.choice(num_clients, count, replace=False).tolist()
                self.faulty.append(frozenset(chosen))

    def draw(self, event: int, client_id: int) -> FaultSpec | None:
        """The fault of this participation, if any."""
        for i, (spec, faulty) in enumerate(zip(self.specs, self.faulty, strict=True)):
            if client_id in faulty:
                u = np.random.default_rng([self.seed, 47, i, event, client_id]).random()
                if u < spec.probability:
                    return spec
        return None

    def apply(
        self, update: ClientUpdate, expected: UpdateSpec, event: int
    ) -> tuple[ClientUpdate, FaultKind | None]:
        """The update as the faulty client sends it, and the fault's kind (None:
        an honest reply). A ``crash`` leaves the update alone: the runtime drops it."""
        spec = self.draw(event, update.client_id)
        if spec is None:
            return update, None
        return corrupt(update, spec, expected.reference), spec.kind


@torch.no_grad()
def corrupt(
    update: ClientUpdate, spec: FaultSpec, reference: Mapping[str, torch.Tensor]
) -> ClientUpdate:
    """A copy of ``update`` showing the fault ``spec`` (module docstring);
    ``reference`` is the state the client started from, for ``scale``."""
    state = dict(update.state)
    first = sorted(state)[0]
    if spec.kind in ("nan", "inf"):
        bad = state[first].clone(memory_format=torch.contiguous_format)
        bad.view(-1)[0] = float("nan") if spec.kind == "nan" else float("inf")
        state[first] = bad
    elif spec.kind == "shape":
        r = ranks({first: state[first]})[module_name(first)]
        state[first] = resize_rank({first: state[first]}, r + 1)[first]
    elif spec.kind == "scale":
        s = spec.scale
        if update.kind == "delta":
            state = {k: s * v for k, v in state.items()}
        else:
            state = {k: reference[k] + s * (v - reference[k]) for k, v in state.items()}
    elif spec.kind == "stale":
        return dataclasses.replace(update, version=update.version - spec.staleness)
    return dataclasses.replace(update, state=state)
