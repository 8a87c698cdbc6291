"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, merge them into the base,
start a fresh adapter every round.

Client k trains a fresh adapter (B_k = 0, A_k a new random init) of its own rank
r_k on the current base. Stacking the factors, B = [p_1 B_1 … p_K B_K] and
A = [A_1; …; A_K], gives B·A = Σ_k p_k B_k A_k: the exact average of the clients'
updates, whatever their ranks. The server merges it into the base and the next
round starts from a fresh adapter again:

    E ← E + Σ_k p_k (R / r_k) B_k A_k      (weight W0 + (α/R)·E, R the global rank)

(the factor R / r_k converts client k's scaling α/r_k into the global α/R). E is
the state's base delta (:mod:`fedhet.model.lora`), applied exactly to the
simulator's shared model; a client of rank r_k receives it as (r_k / R)·E so
that its own scaling α/r_k gives the same weight. Aggregation error 0 (logged every
round: each client's full adapter is its factors over the (r_k / R)·E it trained on).

Authors' code: github.com/ATP-1010/FederatedLLM (``fed_utils/model_aggregation.py``,
``stacking``: the p_k-weighted lora_A of the clients concatenated along the rank,
their lora_B likewise, the product merged into the base weights before the next
round re-initialises LoRA). Choices: the fresh A of round t is drawn from the seed
(``seed``, t) with PEFT's kaiming-uniform bound 1/√d_in, shared by every client
(a client of rank r_k takes its first r_k rows); the bytes down count the fresh
factors and the dense E a client without the history needs (the paper sends the
stacked factors to clients that keep the merged model); synchronous only. Ranks:
every client at the global rank, or with ``rank_profile`` set
:class:`fedhet.strategies.ranks.RankPlan`'s assignment, as FlexLoRA and HetLoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedhet.model.lora import AdapterState, delta_key, factor_keys, factors_only, modules, ranks
from fedhet.protocol import ClientInfo, ClientUpdate, Instruction
from fedhet.strategies.base import (
    Strategy,
    data_weights,
    require_nonempty,
)
from fedhet.strategies.ranks import RankPlan, Ranks


class FLoRA(Strategy):
    """Stacked factors merged into the base, a fresh adapter each round."""

    name = "flora"

    def __init__(
        self,
        rank_profile: str | list[float] | None = None,
        rank_levels: list[int | list[int]] | None = None,
        memory_gb: Sequence[float] = (0.0, 8.0, 16.0, 24.0),
        seed: int = 0,
    ) -> None:
        self.rank_plan = (
            None if rank_profile is None else RankPlan(rank_profile, rank_levels, memory_gb, seed)
        )
        self.seed = seed

    def initialize(self, state: AdapterState, clients: list[ClientInfo]) -> AdapterState:
        super().initialize(state, clients)
        self.shared = ranks(state)
        self.ranks: dict[int, Ranks] = (
            {c.client_id: dict(self.shared) for c in clients}
            if self.rank_plan is None
            else self.rank_plan.assign(state, clients)
        )
        return state

    def fresh(self, state: AdapterState, rnd: int) -> AdapterState:
        """Round ``rnd``'s fresh adapter at the global ranks: A seeded, B = 0."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd)
        out: AdapterState = {}
        for mod in modules(state):
            a_key, b_key = factor_keys(mod)
            r, d_in = self.shared[mod], state[a_key].shape[1]
            out[a_key] = (torch.rand(r, d_in, generator=gen) * 2 - 1) / d_in**0.5
            out[b_key] = torch.zeros(state[b_key].shape[0], r)
        return out

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        adapter = self.fresh(state, rnd)
        out = []
        for cid in client_ids:
            mine: AdapterState = {}
            for mod in modules(adapter):
                a_key, b_key = factor_keys(mod)
                r = self.ranks[cid][mod]
                mine[a_key] = adapter[a_key][:r].clone()
                mine[b_key] = adapter[b_key][:, :r].clone()
                if delta_key(mod) in state:
                    mine[delta_key(mod)] = self.received_delta(state, mod, r)
            out.append(Instruction(cid, mine, {"upload_keys": sorted(factors_only(mine))}))
        return out

    @torch.no_grad()
    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        weights = data_weights(updates)
        total = float(sum(weights))
        new = {**state, **self.fresh(state, rnd + 1)}
        for mod in modules(state):
            a_key, b_key = factor_keys(mod)
            big_r = self.shared[mod]
            merged = sum(
                (w / total) * (big_r / u.state[a_key].shape[0])
                * (u.state[b_key].double() @ u.state[a_key].double())
                for u, w in zip(updates, weights, strict=True)
            )
            old = state.get(delta_key(mod))
            new[delta_key(mod)] = (merged if old is None else old.double() + merged).float()
        trained = [self.trained(state, u) for u in updates]
        return self.measured(new, state, updates, weights, trained)

    def trained(self, state: AdapterState, update: ClientUpdate) -> AdapterState:
        """Client k's full adapter: its factors over the base delta it received, (r_k / R)·E."""
        out = dict(update.state)
        for mod in modules(update.state):
            if delta_key(mod) in state:
                rank = update.state[factor_keys(mod)[0]].shape[0]
                out[delta_key(mod)] = self.received_delta(state, mod, rank)
        return out

    def received_delta(self, state: AdapterState, module: str, rank: int) -> torch.Tensor:
        """The base delta as a client of ``rank`` holds it: (r_k / R)·E (module docstring)."""
        return state[delta_key(module)] * (rank / self.shared[module])
