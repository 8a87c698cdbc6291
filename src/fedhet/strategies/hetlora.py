"""HetLoRA (Cho et al., 2024): heterogeneous ranks by zero-padding, sparsity-weighted
averaging and truncation, with local rank self-pruning.

Per LoRA module, with R the shared adapter's rank (``lora.rank``) and client k of
rank r_k (:mod:`fedhet.strategies.ranks`), s_k = alpha / r_k, ΔW_k = s_k B_k A_k:

1. Distribution: client k gets the first r_k slots of the global factors
   (truncation).
2. Local training adds the self-pruning regulariser
   λ·||B[:, ⌊γr⌋:]||_F·||A[⌊γr⌋:, :]||_F (``TrainPlan.rank_reg``; γ = 0.99, λ = 1e-3).
3. Self-pruning: when the tail's norm is small, the client's rank drops to ⌊γr⌋
   (at least ``min_rank``) and the tail is cut from its upload.
4. Aggregation: each upload is zero-padded to R and weighted by
   w_k = ||ΔW_k||_F / Σ_j ||ΔW_j||_F:  A ← Σ_k w_k pad(A_k),  B ← Σ_k w_k pad(B_k).

Choices the paper leaves open:

* Scaling. Factors are averaged in the scale-free parametrisation
  (√s_k B_k, √s_k A_k), whose product is ΔW_k whatever the rank: a client of rank
  r gets ``A[:r]·√(r/R)``, ``B[:, :r]·√(r/R)`` and its upload is multiplied by
  √(R/r_k) before padding (the FlexLoRA authors' HetLoRA, ``handle_alpha``). The
  stored global is then the adapter at rank R, so s_r B A of a client equals the
  first r slots of the global update, and raw factors of different ranks are
  never mixed at different scales.
* The global model (evaluation, the saved adapter) is those factors at rank R
  (``lora.rank``, the largest rank handed out or more).
* Weights are computed per module, from the factors:
  ||B A||_F² = Σ (BᵀB) ⊙ (AAᵀ), never forming d_out × d_in. When every norm is
  zero the weights are equal.
* Slots beyond the largest rank among this round's uploads keep their
  previous global values (zero-padding them would leave both factors zero there,
  a point where neither receives gradient again); slots some uploads hold are
  zero-padded averages, as in the paper.
* Pruning is decided by the server from the uploaded factors, which is the
  client's own test on the same tensors: with c = ⌊γr⌋ (1 ≤ c < r), the tail
  is pruned when its norm per slot is below ``prune_threshold`` times the head's,

      ||B[:, c:]||·||A[c:]|| / (r − c)  <  τ · ||B[:, :c]||·||A[:c]|| / c,

  a scale-free test (absolute norms depend on width, alpha and learning rate);
  τ = 0.1 by default. The client's next instruction carries the reduced rank;
  ranks only shrink, and are checkpointed (:meth:`HetLoRA.state_dict`). The kept
  slots were trained at the scaling α/r, and the upload now counts at α/c, so both
  kept factors are multiplied by √(c/r): the upload's ΔW is the trained ΔW minus
  the cut tail, exactly (without it a rank-2 client pruned to 1 would count twice).
* The aggregation error (:func:`fedhet.strategies.base.aggregation_error`, logged
  every round) compares the global update with the data-weighted average
  Σ p_k ΔW_k (p_k ∝ n_k) of the pruned uploads, the yardstick of every method, so
  it counts the norm weighting's departure from data weights as well as the
  error of averaging factors.
* Updates arrive validated by the runtime (:mod:`fedhet.runtime.validation`:
  each has exactly the shapes, hence the ranks, it was sent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedhet.model.lora import AdapterState, factor_keys, modules, ranks
from fedhet.protocol import ClientInfo, ClientUpdate, Instruction
from fedhet.strategies.base import Strategy, data_weights
from fedhet.strategies.ranks import RankPlan, Ranks, rescaled_prefix


def update_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """||ΔW||_F / alpha = ||B A||_F / r from the factors (r × r Gram matrices only)."""
    a64, b64 = a.double(), b.double()
    sq = float(((b64.T @ b64) * (a64 @ a64.T)).sum().clamp_min(0))
    return math.sqrt(sq) / a.shape[0]


def pruned_rank(
    a: torch.Tensor, b: torch.Tensor, gamma: float, threshold: float, min_rank: int
) -> int:
    """The rank after self-pruning (module docstring); the current rank if kept."""
    r = a.shape[0]
    cut = math.floor(gamma * r)
    if not 1 <= cut < r or r <= min_rank:
        return r
    head = float(b[:, :cut].norm() * a[:cut].norm())
    tail = float(b[:, cut:].norm() * a[cut:].norm())
    if head > 0 and tail / (r - cut) < threshold * head / cut:
        return max(cut, min_rank)
    return r


class HetLoRA(Strategy):
    """HetLoRA aggregation, truncation and self-pruning (module docstring).

    Args:
        rank_profile, rank_levels, memory_gb, seed: initial ranks
            (:class:`fedhet.strategies.ranks.RankPlan`).
        lam, gamma: the regulariser λ·||B[:, ⌊γr⌋:]||·||A[⌊γr⌋:, :]||.
        prune_threshold: τ of the pruning test.
        min_rank: pruning never goes below it.
    """

    name = "hetlora"

    def __init__(
        self,
        rank_profile: str | list[float] = "uniform",
        rank_levels: list[int | list[int]] | None = None,
        memory_gb: Sequence[float] = (0.0, 8.0, 16.0, 24.0),
        seed: int = 0,
        lam: float = 1e-3,
        gamma: float = 0.99,
        prune_threshold: float = 0.1,
        min_rank: int = 1,
    ) -> None:
        if lam < 0 or not 0 < gamma <= 1 or prune_threshold < 0 or min_rank < 1:
            raise ValueError("need lam >= 0, 0 < gamma <= 1, prune_threshold >= 0, min_rank >= 1")
        self.rank_plan = RankPlan(rank_profile, rank_levels, memory_gb, seed)
        self.lam, self.gamma = lam, gamma
        self.prune_threshold, self.min_rank = prune_threshold, min_rank

    def initialize(self, state: AdapterState, clients: list[ClientInfo]) -> AdapterState:
        super().initialize(state, clients)
        self.shared = ranks(state)
        self.ranks: dict[int, Ranks] = self.rank_plan.assign(state, clients)
        return state

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        """Truncation to each client's current rank, scaled by √(r/R) on both factors."""
        plan = {"rank_reg": (self.lam, self.gamma)}
        return [
            Instruction(
                cid, rescaled_prefix(state, self.ranks[cid], a_power=0.5, b_power=0.5), dict(plan)
            )
            for cid in client_ids
        ]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        uploads = [self._self_prune(u) for u in updates]
        out = dict(state)
        for mod in modules(state):
            a_key, b_key = factor_keys(mod)
            held = [(up[a_key], up[b_key]) for up in uploads if a_key in up]
            if not held:
                continue
            norms = [update_norm(a, b) for a, b in held]
            total = sum(norms)
            weights = [n / total for n in norms] if total > 0 else [1 / len(held)] * len(held)
            big_r, top = self.shared[mod], max(a.shape[0] for a, _ in held)
            new_a = torch.zeros(top, state[a_key].shape[1], dtype=torch.float64)
            new_b = torch.zeros(state[b_key].shape[0], top, dtype=torch.float64)
            for (a, b), w in zip(held, weights, strict=True):
                r = a.shape[0]
                scale = w * math.sqrt(big_r / r)
                new_a[:r] += scale * a.double()
                new_b[:, :r] += scale * b.double()
            out[a_key] = torch.cat([new_a.to(state[a_key].dtype), state[a_key][top:]], 0)
            out[b_key] = torch.cat([new_b.to(state[b_key].dtype), state[b_key][:, top:]], 1)
        return self.measured(out, state, updates, data_weights(updates), uploads)

    def _self_prune(self, update: ClientUpdate) -> AdapterState:
        """The upload with pruned tails cut; the client's ranks updated."""
        upload = dict(update.state)
        mine = self.ranks[update.client_id]
        for mod in modules(upload):
            a_key, b_key = factor_keys(mod)
            a, b = upload[a_key], upload[b_key]
            r = pruned_rank(a, b, self.gamma, self.prune_threshold, self.min_rank)
            if r < a.shape[0]:
                keep = math.sqrt(r / a.shape[0])  # α/r_k → α/r: the kept ΔW unchanged
                upload[a_key], upload[b_key] = a[:r] * keep, b[:, :r] * keep
                mine[mod] = min(mine[mod], r)
        return upload

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": {cid: dict(r) for cid, r in self.ranks.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.ranks = {int(cid): dict(r) for cid, r in sd["ranks"].items()}
