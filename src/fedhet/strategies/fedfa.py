"""FedFa (Xu et al., IJCAI 2024): fully asynchronous aggregation over a sliding window.

No barrier and no waiting. The server keeps a window W of the K most recent
client uploads with their data sizes n_i and staleness τ_i (at arrival). On
every arrival it pushes the new upload (dropping the oldest once K are held)
and, with weights w_i = n_i · s(τ_i),

* model variant (``variant="model"``, clients send x_k):
  x ← Σ_{i∈W} w_i x_i / Σ_{i∈W} w_i;
* delta variant (``variant="delta"``, clients send Δ_k = x_k − x_start):
  x ← x + η · Σ_{i∈W} w_i Δ_i / Σ_{i∈W} w_i.

FedFa's default regime is PROTOCOL v2's ``full`` (``regime``), the paper's fully
asynchronous training: every client is in flight and an arriving client restarts
at once from the new global model (the runtime starts another online client
instead when it has gone offline), so no client ever waits for another.
``federation.regime: bounded`` is the ablation with ``concurrency`` clients in
flight, a freed slot going to a random idle client, as in FedBuff's paper; there
a few fast clients can fill the window, which is why experiment tables report
how many clients delivered and the busiest one's share. Warm start:
until K uploads have arrived the window averages what it holds. Defaults:
K = 5, model variant, no staleness weighting (``staleness="constant"``; the
functions of :mod:`fedhet.strategies.staleness` are the option).

Choices the paper leaves open: τ_i is an upload's staleness when it arrived
(it does not age in the window); averaging is in float32 (``weighted_average``)
and LoRA A and B are averaged separately, as FedIT does. In the delta variant
each Δ stays K arrivals in the window, so it is applied repeatedly; the
default η = 2/(K+1) makes the global model advance, in steady state, at the
rate of the model variant (with constant Δ = d and immediate restarts the
model variant's x grows by 2d/(K+1) per arrival; the delta variant by η·d).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fedhet.model.lora import AdapterState
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.base import Strategy, apply_delta, weighted_average
from fedhet.strategies.staleness import Staleness, StalenessKind


@dataclass
class WindowEntry:
    """One upload held in the window."""

    client_id: int
    state: AdapterState
    num_samples: int
    staleness: int


class FedFa(Strategy):
    """Global model = weighted average of the last K uploads (or x + η·their mean Δ)."""

    name = "fedfa"
    mode = "async"
    regime = "full"

    def __init__(
        self,
        window: int = 5,
        variant: Literal["model", "delta"] = "model",
        server_lr: float | None = None,
        staleness: StalenessKind = "constant",
        a: float = 0.5,
        b: float = 4.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"fedfa: window must be ≥ 1, got {window}")
        if variant not in ("model", "delta"):
            raise ValueError(f"fedfa: variant must be 'model' or 'delta', got {variant!r}")
        if server_lr is not None and (variant != "delta" or server_lr <= 0):
            raise ValueError("fedfa: server_lr applies to the delta variant and must be > 0")
        self.window = window
        self.variant = variant
        self.send: Literal["state", "delta"] = "state" if variant == "model" else "delta"
        self.server_lr = 2 / (window + 1) if server_lr is None else server_lr
        self.staleness = Staleness(staleness, a, b)
        self.entries: deque[WindowEntry] = deque(maxlen=window)

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        return [Instruction(cid, state, {"send": self.send}) for cid in client_ids]

    def on_arrival(self, state: AdapterState, update: ClientUpdate) -> AdapterState:
        self.entries.append(
            WindowEntry(update.client_id, update.state, update.num_samples, update.staleness)
        )
        entries = list(self.entries)
        mean = weighted_average(
            [e.state for e in entries],
            [e.num_samples * self.staleness(e.staleness) for e in entries],
        )
        if self.variant == "model":
            return {**state, **mean}
        return apply_delta(state, mean, self.server_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"entries": [asdict(e) for e in self.entries]}  # asdict deep-copies the tensors

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.entries = deque((WindowEntry(**e) for e in sd["entries"]), maxlen=self.window)
