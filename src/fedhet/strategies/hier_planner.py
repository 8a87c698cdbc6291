"""HierFedLoRA's planner: the joint choice of (τ_g, d_g) for every group.

Pure arithmetic on numbers the runtime hands over in a :class:`CostModel`; no
model, data or clock. Notation: L blocks carry LoRA, a round gives every member
H local steps (``round_steps``), group g aggregates its members every τ_g steps
(so it runs K_g = H / τ_g stages per round, τ_g a divisor of H) and trains the
top d_g blocks.

Cost model (estimated virtual seconds, the simulator's duration model):

    t_k(τ, d, s) = r_k · [ τ · tok_k · F(d) / speed_k + 8·D_s / down_k + 8·B(d) / up_k ]
    T_g(τ, d)    = 8·B(L) / down_G + Σ_{s=1..K} max_{k∈g} t_k(τ, d, s) + 8·B(d) / up_G

* F(d): training FLOPs per token with the top d blocks trainable, exactly
  ``fedhet.runtime.cost.train_flops_per_token`` (forward + backward down to the lowest
  trainable block), tabulated for d = 0..L by the runtime;
* tok_k: tokens per local step of member k (batch × its mean example length);
* B(d): bytes of the top d blocks' LoRA factors; the first stage sends the full
  global adapter down (D_1 = B(L): a member needs the lower blocks too), later
  stages only the group's trainable blocks (D_s = B(d)); members always send
  B(d) up. down_G / up_G: the group ↔ server link (``federation.group_*_mbps``);
* r_k ≥ 0: member k's observed / estimated duration ratio (an EMA kept by the
  strategy; 1 until observed). Straggling, and any error of the estimate, enter
  the plan through it at the next re-plan. Group aggregation itself is free.

Memory: training the top d blocks needs (:func:`fedhet.runtime.cost.training_memory`)

    M(d) = P·b_w + 12·b·s·V + d · ( b_a/2 · s·b·h·(34 + 5·a·s/h) + 16·p_lora )

with P base parameters of b_w bytes, V the vocabulary (logits, their
log-softmax and gradient in float32; an upper bound, as if every position were
a target token), h the hidden size, a heads, micro-batch b
of s tokens, activation bytes b_a (per block, the estimate of Korthikanti et
al. 2022 for 16-bit activations, scaled to b_a), and p_lora LoRA parameters per
block with weight, gradient and two AdamW moments in float32. Blocks below the
trainable ones store no activations (no tensor there requires grad). A group
may train d blocks only if M(d) ≤ ``memory_fraction`` × memory of every member;
when even d = 1 does not fit it trains d = 1 (the smallest candidate) anyway.

Convergence proxy (a modelling choice; the paper's bound is not reproduced):
the effective progress a member makes per round,

    Φ_g(τ, d) = H · (d / L)^β / (1 + κ · δ_g · (τ − 1)),

counts its H steps, discounted by the share of the model it adapts ((d/L)^β,
β = ``depth_exponent``: top blocks matter most) and by client drift between
group aggregations, which grows with the steps between them (τ − 1) and with
the group's non-IID degree δ_g (the members' mean KL to the group's pooled
label distribution, :func:`fedhet.strategies.grouping.non_iid_degree`;
κ = ``drift``). A FedIT member on IID data at full depth has Φ = H.

Search (``policy="joint"``), over τ | H and d ≤ the memory bound:

1. each group's fastest admissible plan: T_g* = min T_g(τ, d) subject to
   Φ_g(τ, d) ≥ ``floor`` · H (when no candidate reaches the floor, the ones of
   largest Φ are admissible);
2. the round cannot end before T* = max_g T_g*; every group then takes the
   plan of largest Φ_g with T_g ≤ T* (ties: shorter time, larger τ, smaller d),
   so fast groups spend their slack on depth and frequent aggregation and all
   groups finish in similar virtual time.

``policy="max_depth"`` skips the search: the deepest block count memory allows
and the largest τ (one stage per round; with one group this is FedIT restricted
to the depth the weakest device affords).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
    """A group's plan: τ, d, K = H / τ stages, estimated time T_g and proxy Φ_g."""

    tau: int
    depth: int
    stages: int
    time: float
    progress: float


def member_time(cost: CostModel, member: Member, tau: int, depth: int, first_stage: bool) -> float:
    """t_k(τ, d, s): one member's estimated stage duration, ratio included."""
    cid = member.client_id
    down = cost.top_bytes(cost.num_layers if first_stage else depth)
    compute = tau * cost.tokens_per_step[cid] * cost.flops_per_token[depth] / member.speed
    transfer = 8 * down / cost.down_bps[cid] + 8 * cost.top_bytes(depth) / cost.up_bps[cid]
    return member.ratio * (compute + transfer)


def group_time(cost: CostModel, members: Sequence[Member], tau: int, depth: int) -> float:
    """T_g(τ, d): the group's estimated round time."""
    stages = cost.round_steps // tau
    first = max(member_time(cost, m, tau, depth, True) for m in members)
    later = max(member_time(cost, m, tau, depth, False) for m in members)
    return (
        8 * cost.top_bytes(cost.num_layers) / cost.group_down_bps
        + first
        + (stages - 1) * later
        + 8 * cost.top_bytes(depth) / cost.group_up_bps
    )


def progress(
    cost: CostModel, tau: int, depth: int, delta: float, depth_exponent: float, drift: float
) -> float:
    """Φ_g(τ, d): the convergence proxy."""
    share = (depth / cost.num_layers) ** depth_exponent
    return cost.round_steps * share / (1.0 + drift * delta * (tau - 1))


def max_depth(cost: CostModel, members: Sequence[Member]) -> int:
    """The deepest d whose memory M(d) every member affords (0 when none does)."""
    budget = min(m.memory for m in members)
    fitting = [d for d in range(1, cost.num_layers + 1) if cost.memory_bytes[d] <= budget]
    return max(fitting, default=0)


def tau_candidates(round_steps: int, taus: Sequence[int] | None) -> list[int]:
    """The divisors of H, or the given τ values (each must divide H)."""
    if taus is None:
        return [t for t in range(1, round_steps + 1) if round_steps % t == 0]
    bad = [t for t in taus if t < 1 or round_steps % t]
    if bad or not taus:
        raise ValueError(f"taus {list(taus)} must be non-empty divisors of {round_steps}")
    return sorted(set(taus))


def plan_groups(
    groups: Sequence[tuple[Sequence[Member], float]],
    cost: CostModel,
    *,
    taus: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    policy: Policy = "joint",
    depth_exponent: float = 0.5,
    drift: float = 0.5,
    floor: float = 0.5,
) -> list[Choice]:
    """One :class:`Choice` per (members, δ_g) group (module docstring)."""
    tau_set = tau_candidates(cost.round_steps, taus)
    depth_set = sorted(set(range(1, cost.num_layers + 1) if depths is None else depths))
    if not depth_set or depth_set[0] < 1 or depth_set[-1] > cost.num_layers:
        raise ValueError(f"depths {depths} must lie in [1, {cost.num_layers}]")
    options: list[list[Choice]] = []
    for members, delta in groups:
        bound = max_depth(cost, members)
        allowed = [d for d in depth_set if d <= bound] or depth_set[:1]
        if policy == "max_depth":
            tau_opts, allowed = tau_set[-1:], allowed[-1:]
        else:
            tau_opts = tau_set
        options.append(
            [
                Choice(
                    tau,
                    d,
                    cost.round_steps // tau,
                    group_time(cost, members, tau, d),
                    progress(cost, tau, d, delta, depth_exponent, drift),
                )
                for tau in tau_opts
                for d in allowed
            ]
        )
    if policy == "max_depth":
        return [opts[0] for opts in options]
    fastest = []
    for opts in options:
        best = max(c.progress for c in opts)
        admissible = [c for c in opts if c.progress >= min(floor * cost.round_steps, best)]
        fastest.append(min(c.time for c in admissible))
    horizon = max(fastest) * (1 + 1e-9)
    return [
        min(
            (c for c in opts if c.time <= horizon),
            key=lambda c: (-c.progress, c.time, -c.tau, c.depth),
        )
        for opts in options
    ]
