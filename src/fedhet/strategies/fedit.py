"""FedIT: FedAvg on the LoRA factors.

    A ← Σ_k p_k A_k,    B ← Σ_k p_k B_k,    p_k = n_k / Σ_j n_j

over the clients k that replied this round. A and B are averaged separately,
so the aggregate of ΔW is Σ p_k B_k · Σ p_k A_k, not Σ p_k B_k A_k (the
well-known inexactness that FFA-LoRA, RoLoRA, FedSVD and FlexLoRA address); its
size, :func:`~fedhet.strategies.base.aggregation_error`, is in every metrics row.
All clients use the same rank.
"""

from __future__ import annotations

from fedhet.model.lora import AdapterState
from fedhet.protocol import ClientUpdate
from fedhet.strategies.base import (
    Strategy,
    data_weights,
    require_nonempty,
    weighted_average,
)


class FedIT(Strategy):
    """FedAvg on LoRA A and B with data-size weights."""

    name = "fedit"

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        weights = data_weights(updates)
        new = {**state, **weighted_average([u.state for u in updates], weights)}
        return self.measured(new, state, updates, weights)
