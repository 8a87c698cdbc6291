"""FedBuff (Nguyen et al., 2022): buffered, semi-asynchronous aggregation of deltas.

Clients send Δ_k = x_k − x_start. On each arrival, with staleness τ (in
server versions, i.e. buffer flushes):

    buffer ← buffer + s(τ) · Δ_k,        count ← count + 1

and once count = K the server applies the buffer and empties it:

    m ← β · m + buffer / K,        x ← x + η · m        (β = 0: x ← x + η · buffer / K)

Defaults K = 10, s(τ) = 1/√(1 + τ) (polynomial, a = 0.5), η = 1, server
momentum β = 0. Arrivals before the K-th are held (``on_arrival`` returns
None and the global version does not move).

Choices the paper leaves open: updates are averaged with equal weights (not
by data size), as in the paper's buffer mean; the buffer and momentum are kept
in float32 and the result cast to the global dtype; clients are never held
back waiting for a flush (they restart per ``federation.regime``, from the
current global model). The buffer, its count and the momentum are server
state, saved by :meth:`state_dict`.
"""

from __future__ import annotations

from typing import Any

import torch

from fedhet.model.lora import AdapterState
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.base import Strategy, apply_delta
from fedhet.strategies.staleness import Staleness, StalenessKind


class FedBuff(Strategy):
    """Sum s(τ)·Δ_k over K arrivals, then x ← x + η·(momentum of) buffer / K."""

    name = "fedbuff"
    mode = "async"

    def __init__(
        self,
        buffer_size: int = 10,
        server_lr: float = 1.0,
        momentum: float = 0.0,
        staleness: StalenessKind = "polynomial",
        a: float = 0.5,
        b: float = 4.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"fedbuff: buffer_size must be ≥ 1, got {buffer_size}")
        if server_lr <= 0:
            raise ValueError(f"fedbuff: server_lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"fedbuff: momentum must be in [0, 1), got {momentum}")
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.momentum = momentum
        self.staleness = Staleness(staleness, a, b)
        self.buffer: AdapterState = {}
        self.count = 0
        self.velocity: AdapterState = {}

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        return [Instruction(cid, state, {"send": "delta"}) for cid in client_ids]

    @torch.no_grad()
    def on_arrival(self, state: AdapterState, update: ClientUpdate) -> AdapterState | None:
        weight = self.staleness(update.staleness)
        for key, delta in update.state.items():
            acc = self.buffer.setdefault(key, torch.zeros_like(delta, dtype=torch.float32))
            acc.add_(delta.float(), alpha=weight)
        self.count += 1
        if self.count < self.buffer_size:
            return None
        step = {k: v / self.buffer_size for k, v in self.buffer.items()}
        if self.momentum:
            for key, g in step.items():
                v = self.velocity.get(key)
                self.velocity[key] = g if v is None else v.mul_(self.momentum).add_(g)
            step = dict(self.velocity)
        self.buffer, self.count = {}, 0
        out = apply_delta(state, step, self.server_lr)
        return {k: v.to(state[k].dtype) for k, v in out.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": {k: v.clone() for k, v in self.buffer.items()},
            "count": self.count,
            "velocity": {k: v.clone() for k, v in self.velocity.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.buffer = {k: v.clone() for k, v in sd["buffer"].items()}
        self.count = int(sd["count"])
        self.velocity = {k: v.clone() for k, v in sd["velocity"].items()}
