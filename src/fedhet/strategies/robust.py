"""Robust aggregation for the averaging strategies (FedIT, FedProx, FFA-LoRA).

``Robust`` wraps one of them (``base``): configuration, local training and
uploads stay the base's; only the round's mean is replaced. With x the global
state the round starts from and x_k what client k uploaded (the plan's keys),
each client's change is δ_k = x_k − x (``state`` uploads) or δ_k = x_k
(``delta`` uploads). Then:

1. clipping (``clip_norm``; off by default): δ_k ← δ_k · min(1, C / ||δ_k||₂),
   the norm taken over all the update's tensors together. C is a number, or
   ``"median"``: the median of the round's ||δ_k|| (a bound that follows the
   honest majority's scale, no tuning; with fewer than half of the clients
   malicious it caps every malicious update at an honest norm);
2. combining, coordinate by coordinate over the K updates (``aggregator``):
   ``mean``: Σ p_k δ_k with p_k ∝ n_k (the base's own rule);
   ``median``: the coordinate-wise median (Yin et al., 2018), unweighted, the
   mean of the two middle values when K is even (``numpy.median``'s rule);
   ``trimmed_mean``: drop the ⌊βK⌋ largest and ⌊βK⌋ smallest values of each
   coordinate and average the rest (Yin et al., 2018), unweighted;
   β = ``trim_ratio`` (default 0.2, Flower's ``FedTrimmedAvg`` default);
3. the base aggregates the single update x + δ̂ (a delta upload: δ̂). For an
   averaging strategy the mean of one update is that update, so the base's
   own post-processing (FFA-LoRA keeps A frozen) still applies.

Default: ``aggregator="median"``, no clipping. The median and trimmed mean are
unweighted, as in the paper and in Flower's ``FedMedian``/``FedTrimmedAvg``
(whose numpy functions they match, see tests/test_robust.py): weighting by the
declared sample count would let a client buy influence. They run in torch on
the states' device (no host round trip, no dependency on Flower).
"""

from __future__ import annotations

import statistics
from typing import Any, Literal

import torch

from fedhet.model.lora import AdapterState
from fedhet.model.norms import l2_norm, update_delta
from fedhet.protocol import ClientInfo, ClientUpdate, Instruction
from fedhet.strategies.base import (
    Strategy,
    apply_delta,
    data_weights,
    instantiate,
    require_nonempty,
    weighted_average,
)
from fedhet.strategies.fedit import FedIT
from fedhet.strategies.fedprox import FedProx
from fedhet.strategies.ffa_lora import FFALoRA

AVERAGING: dict[str, type[Strategy]] = {"fedit": FedIT, "fedprox": FedProx, "ffa-lora": FFALoRA}
"""Strategies whose aggregate is a mean of the uploads: the ones a wrapper accepts."""

Aggregator = Literal["mean", "median", "trimmed_mean"]


# ---------------------------------------------------------------------------
# Functions over states
# ---------------------------------------------------------------------------


@torch.no_grad()
def clip(states: list[AdapterState], bound: float) -> tuple[list[AdapterState], int]:
    """Each state scaled by min(1, bound/||x||₂); also returns how many were scaled."""
    out, clipped = [], 0
    for s in states:
        norm = l2_norm(s)
        if norm > bound:
            clipped += 1
            s = {k: v * (bound / norm) for k, v in s.items()}
        out.append(s)
    return out, clipped


@torch.no_grad()
def coordinate_median(states: list[AdapterState]) -> AdapterState:
    """Coordinate-wise median over states (mean of the two middle values for an
    even count), in float32, cast back to the first state's dtype."""
    k = len(states)
    out: AdapterState = {}
    for key, first in states[0].items():
        ordered = _stack(states, key).sort(dim=0).values
        out[key] = ((ordered[(k - 1) // 2] + ordered[k // 2]) / 2).to(first.dtype)
    return out


@torch.no_grad()
def trimmed_mean(states: list[AdapterState], ratio: float) -> AdapterState:
    """Coordinate-wise mean after dropping the ⌊ratio·K⌋ largest and smallest values."""
    if not 0 <= ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {ratio}")
    k = len(states)
    cut = int(ratio * k)
    out: AdapterState = {}
    for key, first in states[0].items():
        ordered = _stack(states, key).sort(dim=0).values
        out[key] = ordered[cut : k - cut].mean(dim=0).to(first.dtype)
    return out


def _stack(states: list[AdapterState], key: str) -> torch.Tensor:
    return torch.stack([s[key].float() for s in states])


# ---------------------------------------------------------------------------
# Wrapping an averaging strategy
# ---------------------------------------------------------------------------


class AveragingWrapper(Strategy):
    """Runs an averaging strategy (``base``, one of :data:`AVERAGING`) unchanged
    except for its mean: :meth:`aggregate` hands the base one update, the
    reference plus :meth:`combine` of the clients' changes (module docstring,
    step 3). Subclasses implement :meth:`combine` and keep their own state in
    :meth:`own_state` / :meth:`load_own_state`."""

    def __init__(self, base: str, base_params: dict[str, Any] | None) -> None:
        if base not in AVERAGING:
            raise ValueError(f"base must be one of {tuple(AVERAGING)}, got {base!r}")
        self.base = instantiate(AVERAGING[base], base_params)

    def combine(
        self, rnd: int, deltas: list[AdapterState], updates: list[ClientUpdate]
    ) -> AdapterState:
        """The round's change from the clients' changes."""
        raise NotImplementedError

    def own_state(self) -> dict[str, Any]:
        return {}

    def load_own_state(self, sd: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`own_state` returned."""

    def initialize(self, state: AdapterState, clients: list[ClientInfo]) -> AdapterState:
        self.clients = {c.client_id: c for c in clients}
        return self.base.initialize(state, clients)

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        return self.base.configure(rnd, state, client_ids)

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        kind = updates[0].kind
        keys = set(updates[0].state)
        for u in updates:
            if u.kind != kind or set(u.state) != keys:
                raise ValueError(f"{self.name}: updates of one round differ in kind or keys")
        reference = {k: state[k] for k in updates[0].state}
        deltas = [update_delta(u.state, reference, kind) for u in updates]
        change = self.combine(rnd, deltas, updates)
        combined = apply_delta(reference, change) if kind == "state" else change
        single = ClientUpdate(-1, combined, num_samples=1, version=updates[0].version, kind=kind)
        new = self.base.aggregate(rnd, state, [single])
        if self.base.last_aggregation_error is not None and kind == "state":
            # against the data-weighted mean of the clients' own updates, not the one
            # combined update: it folds in what the robust statistic, clipping and noise
            # change, so it is not FedIT's factor-averaging error alone
            return self.measured(new, state, updates, data_weights(updates))
        return new

    def evaluation_state(
        self, state: AdapterState, client_state: AdapterState | None = None
    ) -> AdapterState:
        return self.base.evaluation_state(state, client_state)

    def metrics(self) -> dict[str, float]:
        return {**self.base.metrics(), **super().metrics()}

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), **self.own_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.base.load_state_dict(sd["base"])
        self.load_own_state(sd)


class Robust(AveragingWrapper):
    """Clipping and coordinate-wise median / trimmed mean around FedIT, FedProx
    or FFA-LoRA (see the module docstring). Reports ``clipped`` (updates scaled
    down so far) when clipping."""

    name = "robust"

    def __init__(
        self,
        base: str = "fedit",
        base_params: dict[str, Any] | None = None,
        aggregator: Aggregator = "median",
        clip_norm: float | Literal["median"] | None = None,
        trim_ratio: float = 0.2,
    ) -> None:
        super().__init__(base, base_params)
        if aggregator not in ("mean", "median", "trimmed_mean"):
            raise ValueError(f"aggregator must be mean, median or trimmed_mean, got {aggregator!r}")
        if clip_norm is not None and clip_norm != "median" and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, 'median' or None, got {clip_norm!r}")
        if not 0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.aggregator = aggregator
        self.clip_norm = clip_norm
        self.trim_ratio = trim_ratio
        self.clipped = 0

    def combine(
        self, rnd: int, deltas: list[AdapterState], updates: list[ClientUpdate]
    ) -> AdapterState:
        if self.clip_norm is not None:
            bound = self.clip_norm
            if bound == "median":
                bound = statistics.median(l2_norm(d) for d in deltas)
            deltas, clipped = clip(deltas, bound)
            self.clipped += clipped
        if self.aggregator == "median":
            return coordinate_median(deltas)
        if self.aggregator == "trimmed_mean":
            return trimmed_mean(deltas, self.trim_ratio)
        return weighted_average(deltas, data_weights(updates))

    def metrics(self) -> dict[str, float]:
        own = {"clipped": self.clipped} if self.clip_norm is not None else {}
        return {**super().metrics(), **own}

    def own_state(self) -> dict[str, Any]:
        return {"clipped": self.clipped}

    def load_own_state(self, sd: dict[str, Any]) -> None:
        self.clipped = sd["clipped"]
