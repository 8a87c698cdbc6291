"""FedAsync (Xie et al., 2019): mix every arriving client model into the global one.

On each arrival of client k's trained adapter x_k, with staleness τ:

    α_t = α · s(τ),        x ← (1 − α_t) · x + α_t · x_k

key by key over the tensors the client sent (LoRA A and B mixed separately,
as FedIT averages them). s is a staleness function of
:mod:`fedhet.strategies.staleness`. Defaults: α = 0.9, polynomial s with
a = 0.5. Every arrival is applied (the global version moves each time).

Choices the paper leaves open: the mixing is done in float32 and cast back to
the global tensor's dtype; the update is not weighted by the client's data
size (the paper mixes one model at a time); who is dispatched after an
arrival is the runtime's ``federation.regime`` (default ``bounded``).
"""

from __future__ import annotations

import torch

from fedhet.model.lora import AdapterState
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.base import Strategy
from fedhet.strategies.staleness import Staleness, StalenessKind


class FedAsync(Strategy):
    """x ← (1 − α·s(τ))·x + α·s(τ)·x_k on every arrival."""

    name = "fedasync"
    mode = "async"

    def __init__(
        self,
        alpha: float = 0.9,
        staleness: StalenessKind = "polynomial",
        a: float = 0.5,
        b: float = 4.0,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"fedasync: alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = Staleness(staleness, a, b)

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        return [Instruction(cid, state, {"send": "state"}) for cid in client_ids]

    @torch.no_grad()
    def on_arrival(self, state: AdapterState, update: ClientUpdate) -> AdapterState:
        mix = self.alpha * self.staleness(update.staleness)
        out = dict(state)
        for key, x_k in update.state.items():
            x = state[key]
            out[key] = torch.lerp(x.float(), x_k.float(), mix).to(x.dtype)
        return out
