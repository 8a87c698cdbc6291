"""RoLoRA (Chen et al., 2025): alternate rounds that train and average only B, then only A.

In odd rounds every client trains B with A frozen at the global A; in even
rounds A with B frozen at the global B. Since the frozen factor is the same on
every client, each round's average is exact:

    odd:  Σ_k p_k B_k A = (Σ_k p_k B_k) A,    even: Σ_k p_k B A_k = B (Σ_k p_k A_k),

so the global ΔW is the average of the clients' ΔW (aggregation error 0), which
FedIT's separate averaging of both factors is not. Only the trained factor
travels up; both go down (a client needs the current global A and B: the one
not trained last round may still have changed in the round before).

Choices: the paper alternates the factors within its communication scheme; as
issue #22 asks, one factor per round, B first (with LoRA's B = 0 at the start,
∂L/∂A ∝ B = 0, so an A-first round would not move); a client's local steps per
round are the run's ``train.steps`` whichever factor trains.
"""

from __future__ import annotations

from fedhet.model.lora import AdapterState, is_lora_a
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.base import (
    Strategy,
    data_weights,
    require_nonempty,
    weighted_average,
)


def trained_factor(rnd: int) -> str:
    """``"lora_B"`` in odd rounds, ``"lora_A"`` in even ones."""
    return "lora_B" if rnd % 2 == 1 else "lora_A"


class RoLoRA(Strategy):
    """Alternating B-only and A-only rounds (see the module docstring)."""

    name = "rolora"

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        train_b = trained_factor(rnd) == "lora_B"
        up = sorted(k for k in state if is_lora_a(k) != train_b)
        plan = {"frozen": ("lora_A",) if train_b else ("lora_B",), "upload_keys": up}
        return [Instruction(cid, dict(state), dict(plan)) for cid in client_ids]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        train_b = trained_factor(rnd) == "lora_B"
        weights = data_weights(updates)
        averaged = weighted_average([u.state for u in updates], weights)
        new = {**state, **{k: v for k, v in averaged.items() if is_lora_a(k) != train_b}}
        return self.measured(new, state, updates, weights)
