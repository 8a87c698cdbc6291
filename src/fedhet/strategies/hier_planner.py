"""HierFedLoRA's planner: the joint choice of (τ_g, d_g) for every group.

Pure arithmetic on numbers the runtime hands over in a :class:`CostModel` and on
the progress the groups measured; no model, data or clock. Notation: L blocks
carry LoRA; in a global round group g runs τ_g intra-group rounds, each an
ordinary local update of E = ``round_steps`` steps (the run's ``train.steps``) of
every member from the group model, training the top d_g blocks, followed by the
group's FedAvg over the group's LAN.

Cost model (estimated virtual seconds, the simulator's duration model):

    t_k(d, s) = r_k · [ E · tok_k · F(d) / speed_k + 8·D_s / lan + 8·B(d) / lan ]
    T_g(τ, d) = 8·B(L) / down_G + max_k t_k(d, 1) + (τ − 1) · max_k t_k(d, 2) + 8·B(d) / up_G

* F(d): training FLOPs per token with the top d blocks trainable, exactly
  ``fedhet.runtime.cost.train_flops_per_token`` (forward + backward down to the lowest
  trainable block), tabulated for d = 0..L by the runtime;
* tok_k: tokens per local step of member k (batch × its mean example length);
* B(d): bytes of the top d blocks' LoRA factors; the first intra-group round
  sends the full global adapter down (D_1 = B(L): a member needs the lower blocks
  too), later ones only the group's trainable blocks (D_s = B(d)); members always
  send B(d) up. lan: the device ↔ group-aggregator link
  (``federation.lan_mbps``); down_G / up_G: the group ↔ server link
  (``federation.group_*_mbps``, the wide-area link in PROTOCOL v2);
* r_k ≥ 0: member k's observed / estimated duration ratio (an EMA kept by the
  strategy; 1 until observed). Group aggregation itself is free.

Memory: training the top d blocks needs (:func:`fedhet.runtime.cost.training_memory`)

    M(d) = P·b_w + 12·b·s·V + d · ( b_a/2 · s·b·h·(34 + 5·a·s/h) + 16·p_lora )

with P base parameters of b_w bytes, V the vocabulary (logits, their
log-softmax and gradient in float32; an upper bound, as if every position were
a target token), h the hidden size, a heads, micro-batch b
of s tokens, activation bytes b_a (per block, the estimate of Korthikanti et
al. 2022 for 16-bit activations, scaled to b_a), and p_lora LoRA parameters per
block with weight, gradient and two AdamW moments in float32. Blocks below the
trainable ones store no activations (no tensor there requires grad). Group g
may train d blocks only if M(d) ≤ ``memory_fraction`` × memory of its own
weakest member, so groups of weaker devices get shallower bounds; when even
d = 1 does not fit it trains d = 1 (the smallest candidate) anyway.

Progress, measured (:class:`ProgressModel`): one intra-group round at depth d
lowers the members' training loss by a relative amount ρ(d), modelled as

    ρ(d) = a · (d / L)^b,   Φ_g(τ, d) = τ · ρ(d)

(a group's progress in a global round). a and b are fitted by weighted least
squares on log ρ over the groups' measurements (each member's relative loss
decrease over its local update, (ℓ_first − ℓ_last) / ℓ_first, averaged over a
stage's members), each measurement's weight decaying by (1 − η) per round
(η = ``progress_ema``), with a prior pseudo-measurement pulling b toward b₀
(``depth_exponent``) whose weight w₀ (``prior_weight``) decays by the same
(1 − η) per round of measurements: with measurements at a single depth b stays
b₀ and a fits them; at several depths b moves to what they show. Before any
measurement ρ(d) = (d / L)^b₀.

Search (``policy="joint"``), over τ ∈ ``taus`` and d ≤ the group's memory bound,
minimising the time to the next global round's progress P* = ρ(L) (what one
FedIT round at full depth makes; a cancels out of every comparison):

1. each group's fastest plan reaching P*: T_g* = min T_g(τ, d) subject to
   Φ_g(τ, d) ≥ P* (when none does, the plans of largest Φ_g are admissible);
2. the round cannot end before T* = max_g T_g*; every group then takes the plan
   of largest Φ_g with T_g ≤ T* (ties: shorter time, smaller τ, larger d), so a
   group of faster members spends its slack on more intra-group rounds or more
   depth, and all groups finish in similar virtual time.

``policy="max_depth"`` skips the search: the deepest block count memory allows
and the smallest τ of ``taus`` (one intra-group round by default; with one group
this is FedIT restricted to the depth the weakest device affords).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedhet.protocol import CostModel

Policy = Literal["joint", "max_depth"]


@dataclass(frozen=True)
class Member:
    """A member as the planner sees it: FLOP/s, bytes of memory usable for
    fine-tuning, and its observed / estimated duration ratio."""

    client_id: int
    speed: float
    memory: float
    ratio: float = 1.0


@dataclass(frozen=True)
class Choice:
    """A group's plan: τ intra-group rounds (``stages`` = τ), depth d, estimated
    time T_g and estimated progress Φ_g = τ·ρ(d)."""

    tau: int
    depth: int
    stages: int
    time: float
    progress: float


def member_time(cost: CostModel, member: Member, depth: int, first_stage: bool) -> float:
    """t_k(d, s): one member's estimated duration of one intra-group round, ratio included."""
    cid = member.client_id
    down = cost.top_bytes(cost.num_layers if first_stage else depth)
    compute = cost.round_steps * cost.tokens_per_step[cid] * cost.flops_per_token[depth]
    transfer = 8 * (down + cost.top_bytes(depth)) / cost.lan_bps
    return member.ratio * (compute / member.speed + transfer)


def group_time(cost: CostModel, members: Sequence[Member], tau: int, depth: int) -> float:
    """T_g(τ, d): the group's estimated round time."""
    first = max(member_time(cost, m, depth, True) for m in members)
    later = max(member_time(cost, m, depth, False) for m in members)
    return (
        8 * cost.top_bytes(cost.num_layers) / cost.group_down_bps
        + first
        + (tau - 1) * later
        + 8 * cost.top_bytes(depth) / cost.group_up_bps
    )


class ProgressModel:
    """ρ(d) = a·(d/L)^b fitted to measured progress (module docstring)."""

    def __init__(
        self, num_layers: int, exponent: float = 0.5, prior_weight: float = 1.0, ema: float = 0.5
    ) -> None:
        self.num_layers, self.exponent, self.prior_weight, self.ema = (
            num_layers, exponent, prior_weight, ema
        )
        self.observations: list[tuple[int, float, float]] = []  # (depth, ρ measured, weight)
        self.rounds = 0  # rounds with measurements: the prior's weight is w₀·(1 − η)^rounds
        self.a, self.b = 1.0, exponent

    def observe_round(self, measured: Sequence[tuple[int, float]]) -> None:
        """One round's measurements (depth, relative loss decrease): older ones decay
        by (1 − η), the new ones enter with weight η, and (a, b) are refitted."""
        if not measured:
            return
        decayed = [(d, r, w * (1 - self.ema)) for d, r, w in self.observations]
        self.observations = [o for o in decayed if o[2] > 1e-6]
        self.observations += [(d, max(r, 1e-6), self.ema) for d, r in measured]
        self.rounds += 1
        self._fit()

    def _fit(self) -> None:
        if not self.observations:
            self.a, self.b = 1.0, self.exponent
            return
        x = np.array([math.log(d / self.num_layers) for d, _, _ in self.observations])
        y = np.array([math.log(r) for _, r, _ in self.observations])
        w = np.array([w for _, _, w in self.observations])
        # minimise Σ w (y − α − b x)² + w₀ (b − b₀)²: the 2×2 normal equations
        sw, sx, sy = w.sum(), w @ x, w @ y
        sxx, sxy = w @ (x * x), w @ (x * y)
        w0 = max(self.prior_weight * (1 - self.ema) ** self.rounds, 1e-9)
        b0 = self.exponent
        matrix = np.array([[sw, sx], [sx, sxx + w0]])
        alpha, self.b = np.linalg.solve(matrix, np.array([sy, sxy + w0 * b0]))
        self.a = math.exp(alpha)

    def rate(self, depth: int) -> float:
        """ρ(d), the estimated relative loss decrease of one intra-group round."""
        return self.a * (depth / self.num_layers) ** self.b

    def state_dict(self) -> dict[str, Any]:
        return {"observations": list(self.observations), "rounds": self.rounds}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.observations = [tuple(o) for o in sd["observations"]]
        self.rounds = sd["rounds"]
        self._fit()


def max_depth(cost: CostModel, members: Sequence[Member]) -> int:
    """The deepest d whose memory M(d) every member affords (0 when none does)."""
    budget = min(m.memory for m in members)
    fitting = [d for d in range(1, cost.num_layers + 1) if cost.memory_bytes[d] <= budget]
    return max(fitting, default=0)


def plan_groups(
    groups: Sequence[Sequence[Member]],
    cost: CostModel,
    rate: ProgressModel,
    *,
    taus: Sequence[int] = (1, 2, 3, 4),
    depths: Sequence[int] | None = None,
    policy: Policy = "joint",
) -> list[Choice]:
    """One :class:`Choice` per group of members (module docstring)."""
    tau_set = sorted(set(taus))
    if not tau_set or tau_set[0] < 1:
        raise ValueError(f"taus {list(taus)} must be positive numbers of intra-group rounds")
    depth_set = sorted(set(range(1, cost.num_layers + 1) if depths is None else depths))
    if not depth_set or depth_set[0] < 1 or depth_set[-1] > cost.num_layers:
        raise ValueError(f"depths {depths} must lie in [1, {cost.num_layers}]")
    options: list[list[Choice]] = []
    for members in groups:
        bound = max_depth(cost, members)
        allowed = [d for d in depth_set if d <= bound] or depth_set[:1]
        if policy == "max_depth":
            tau_opts, allowed = tau_set[:1], allowed[-1:]
        else:
            tau_opts = tau_set
        options.append(
            [
                Choice(tau, d, tau, group_time(cost, members, tau, d), tau * rate.rate(d))
                for tau in tau_opts
                for d in allowed
            ]
        )
    if policy == "max_depth":
        return [opts[0] for opts in options]
    target = rate.rate(cost.num_layers)
    fastest = []
    for opts in options:
        best = max(c.progress for c in opts)
        admissible = [c for c in opts if c.progress >= min(target, best) * (1 - 1e-9)]
        fastest.append(min(c.time for c in admissible))
    horizon = max(fastest) * (1 + 1e-9)
    return [
        min(
            (c for c in opts if c.time <= horizon),
            key=lambda c: (-c.progress, c.time, c.tau, -c.depth),
        )
        for opts in options
    ]
