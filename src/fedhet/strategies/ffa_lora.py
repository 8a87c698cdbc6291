"""FFA-LoRA: freeze A at its shared random initialisation, train and average B.

Every client holds the same A (drawn from the run's seed), so

    ΔW = s · (Σ_k p_k B_k) A = Σ_k p_k (s B_k A)

is the exact average of the clients' updates. Only B travels, in both
directions, which halves the bytes of FedIT at equal rank.
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


class FFALoRA(Strategy):
    """A frozen at the shared seeded init; B trained, sent and averaged."""

    name = "ffa-lora"

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        b_only = {k: v for k, v in state.items() if not is_lora_a(k)}
        plan = {"frozen": ("lora_A",), "upload_keys": sorted(b_only)}
        return [Instruction(cid, b_only, dict(plan)) for cid in client_ids]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        weights = data_weights(updates)
        b_avg = weighted_average([u.state for u in updates], weights)
        new = {**state, **{k: v for k, v in b_avg.items() if not is_lora_a(k)}}
        return self.measured(new, state, updates, weights)
