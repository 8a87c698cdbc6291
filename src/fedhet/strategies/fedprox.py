"""FedProx: FedIT with a proximal term in every client's local loss.

    L_k(θ) + (μ / 2) · ||θ − θ_global||²

over the LoRA parameters, θ_global being the state the client started from.
Aggregation is FedIT's. Default μ = 0.01.
"""

from __future__ import annotations

from fedhet.model.lora import AdapterState
from fedhet.protocol import Instruction
from fedhet.strategies.fedit import FedIT


class FedProx(FedIT):
    """FedIT + proximal term μ/2·||θ − θ_global||² in local training."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError("fedprox: mu must be ≥ 0")
        self.mu = mu

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        return [Instruction(cid, state, {"prox_mu": self.mu}) for cid in client_ids]
