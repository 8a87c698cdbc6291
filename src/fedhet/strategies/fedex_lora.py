"""FedEx-LoRA (Singhal et al., ACL 2025): exact aggregation through a residual in the base.

FedIT's global update s·Ā·B̄ (s = α/r) is not the average of the clients' updates
s·Σ_k p_k B_k A_k. FedEx-LoRA averages the factors as FedIT does and adds the
difference, a dense residual per module, into the frozen weights:

    A ← Σ_k p_k A_k,   B ← Σ_k p_k B_k,
    E ← E + Σ_k p_k B_k A_k − B A          (the weight is W0 + s·(B A + E))

so the global model's update is exactly the clients' average (aggregation error
0, :func:`fedhet.strategies.base.aggregation_error`). E is the state's base
delta (:mod:`fedhet.model.lora`): the simulator applies it to its one shared
model exactly; every client receives the factors and the accumulated E each
round, and the bytes down count the dense E (out × in per module: the method's
real cost, which the paper trades for exactness). Clients send only their
factors. The final PEFT folder folds E into factors of the rank it needs
(:func:`fedhet.model.lora.fold_base_delta`).

Authors' code: github.com/RaghavSinghal10/fedex-lora (the residual of the
averaged factors is added to each client's ``base_layer.weight`` after every
aggregation). Choices: E accumulates in float32 on the server; data-size
weights p_k as FedIT; synchronous only (a stale client would train on an older
base, which this version does not track).
"""

from __future__ import annotations

import torch

from fedhet.model.lora import AdapterState, delta_key, factor_keys, factors_only, modules
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.base import (
    Strategy,
    data_weights,
    require_nonempty,
    weighted_average,
)


class FedExLoRA(Strategy):
    """FedIT's factor averages plus the residual kept in the base (module docstring)."""

    name = "fedex-lora"

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        plan = {"upload_keys": sorted(factors_only(state))}
        return [Instruction(cid, dict(state), dict(plan)) for cid in client_ids]

    @torch.no_grad()
    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        weights = data_weights(updates)
        total = float(sum(weights))
        new = {**state, **weighted_average([u.state for u in updates], weights)}
        for mod in modules(new):
            a_key, b_key = factor_keys(mod)
            mean_product = sum(
                (w / total) * (u.state[b_key].double() @ u.state[a_key].double())
                for u, w in zip(updates, weights, strict=True)
            )
            residual = mean_product - new[b_key].double() @ new[a_key].double()
            old = state.get(delta_key(mod))
            delta = residual if old is None else old.double() + residual
            new[delta_key(mod)] = delta.float()
        return self.measured(new, state, updates, weights)
