"""FedSVD (Lee et al., 2025): clients train B only; the server re-factors B·A by SVD.

Every client trains B with A frozen at the global A, so the average of the
clients' updates is exact, B̄A = Σ_k p_k B_k A. The server then refactors the
product into a new orthonormal A:

    B̄ A = U S Vᵀ (thin SVD, rank r),    A ← Vᵀ,    B ← U S,

which leaves B·A (and the model) unchanged and gives the next round an A whose
rows are the directions the federation has used most, instead of the random
initial A that FFA-LoRA keeps for ever. The SVD runs on an r × r core
(thin QRs of B̄ and Aᵀ, :func:`fedhet.strategies.flexlora.factored_svd`), in
float64. Only B travels up; A and B go down. (The paper's motivation is
differentially private training, where noise is added to B only and a
well-conditioned A keeps it from being amplified; here it is the aggregation.)

Choices: the SVD keeps all r directions (the product has rank ≤ r), ordered by
singular value; a direction with singular value 0 (a zero product, as in round
0) is completed orthonormally, so A always has orthonormal rows.
"""

from __future__ import annotations

import torch

from fedhet.model.lora import AdapterState, factor_keys, is_lora_a, modules
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.base import (
    Strategy,
    data_weights,
    require_nonempty,
    weighted_average,
)
from fedhet.strategies.flexlora import factored_svd


@torch.no_grad()
def refactor(state: AdapterState, seed: int = 0) -> AdapterState:
    """Each module's (B, A) → (U S, Vᵀ) from the thin SVD of B·A (same product)."""
    out = dict(state)
    for mod in modules(state):
        a_key, b_key = factor_keys(mod)
        a, b = state[a_key], state[b_key]
        u, s, v = factored_svd([(b, a)], [1.0], a.shape[0], seed=seed)
        out[b_key] = (u * s).to(b.dtype)
        out[a_key] = v.T.contiguous().to(a.dtype)
    return out


class FedSVD(Strategy):
    """B trained and averaged with A frozen; B·A refactored by SVD each round."""

    name = "fedsvd"

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        plan = {"frozen": ("lora_A",), "upload_keys": sorted(k for k in state if not is_lora_a(k))}
        return [Instruction(cid, dict(state), dict(plan)) for cid in client_ids]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        weights = data_weights(updates)
        b_avg = weighted_average([u.state for u in updates], weights)
        averaged = {**state, **{k: v for k, v in b_avg.items() if not is_lora_a(k)}}
        new = refactor(averaged, seed=rnd)
        return self.measured(new, state, updates, weights)
