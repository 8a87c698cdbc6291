"""Balanced client grouping: groups whose pooled data looks like the whole federation.

Client k brings a *mass* vector m_k and a weight w_k; a group's pooled vector is
P_g = Σ_{k∈g} m_k / Σ_{k∈g} w_k and the federation's is P = Σ_k m_k / Σ_k w_k.

* Histograms (``divergence="kl"``, HierFedLoRA's default): m_k = the client's
  label/category counts, w_k = Σ m_k, so P_g is the group's pooled label
  distribution; a group costs KL(P_g ‖ P) = Σ_c P_g(c) log(P_g(c) / P(c)), finite
  because P_g's support lies inside P's (0·log 0 = 0).
* Update sketches (``divergence="l2"``, the option for clients that share no
  histogram): m_k = n_k·u_k for a sketch u_k of the client's update, w_k = n_k,
  so P_g is the group's data-weighted mean update; a group costs ‖P_g − P‖².

Objective: minimise Σ_g cost(P_g) over partitions into ``num_groups`` groups of
balanced sizes (⌊n/G⌋ or ⌈n/G⌉ clients, the larger groups first).

Algorithm (deterministic):

1. greedy: clients in order of decreasing weight (ties by id); the first G seed
   one group each; every later client joins the group with room left whose cost
   grows least by taking it (ties: the lower group index);
2. local search: repeated passes over the clients; for client i in group a, try
   every swap with a client j of another group (sizes unchanged) and every move
   to a group with one client fewer than a (balance kept); apply the best
   change if it lowers the objective by more than ``tol``; stop after a pass
   with no change or after ``max_passes`` passes.

Each candidate is scored in one vectorised step over all j, so a pass costs
O(n²·C) arithmetic for n clients and C categories (sketch dimensions).

:func:`random_groups` is the balanced random baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Divergence = Literal["kl", "l2"]


def kl_to(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) along the last axis (0·log 0 = 0); ``p``'s support must lie in ``q``'s."""
    ratio = np.where(p > 0, p / np.where(q > 0, q, 1.0), 1.0)
    return np.sum(np.where(p > 0, p * np.log(ratio), 0.0), axis=-1)


def group_sizes(num_clients: int, num_groups: int) -> list[int]:
    """Balanced sizes: ⌈n/G⌉ for the first n mod G groups, ⌊n/G⌋ for the rest."""
    if not 1 <= num_groups <= num_clients:
        raise ValueError(f"num_groups must be in [1, {num_clients}], got {num_groups}")
    base, extra = divmod(num_clients, num_groups)
    return [base + (g < extra) for g in range(num_groups)]


def _costs(
    mass: np.ndarray, weight: np.ndarray, total: np.ndarray, divergence: Divergence
) -> np.ndarray:
    """Cost of pooled groups given their summed masses (…×C) and weights (…)."""
    safe = np.where(weight > 0, weight, 1.0)[..., None]
    pooled = mass / safe
    if divergence == "kl":
        return np.where(weight > 0, kl_to(pooled, total), 0.0)
    return np.where(weight > 0, np.sum((pooled - total) ** 2, axis=-1), 0.0)


def objective(
    masses: np.ndarray,
    weights: np.ndarray,
    groups: Sequence[Sequence[int]],
    divergence: Divergence = "kl",
) -> float:
    """Σ_g cost(P_g) of a grouping (see the module docstring)."""
    masses, weights = _as_arrays(masses, weights)
    total = masses.sum(0) / max(weights.sum(), 1e-300)
    gm = np.stack([masses[list(g)].sum(0) for g in groups])
    gw = np.array([weights[list(g)].sum() for g in groups])
    return float(_costs(gm, gw, total, divergence).sum())


def balanced_groups(
    masses: np.ndarray,
    weights: np.ndarray | None = None,
    num_groups: int = 4,
    *,
    divergence: Divergence = "kl",
    max_passes: int = 50,
    tol: float = 1e-12,
) -> list[list[int]]:
    """Partition clients (rows of ``masses``) into balanced groups minimising
    Σ_g cost(P_g) by greedy assignment then local search (module docstring).

    ``weights`` default to the row sums (histograms). Returns the groups as
    sorted lists of row indices, in group order.
    """
    masses, weights = _as_arrays(masses, weights)
    n = len(masses)
    sizes = group_sizes(n, num_groups)
    total = masses.sum(0) / max(weights.sum(), 1e-300)
    order = sorted(range(n), key=lambda k: (-weights[k], k))
    assign = np.full(n, -1)
    gm = np.zeros((num_groups, masses.shape[1]))
    gw = np.zeros(num_groups)
    count = np.zeros(num_groups, dtype=int)

    def place(k: int, g: int) -> None:
        assign[k] = g
        gm[g] += masses[k]
        gw[g] += weights[k]
        count[g] += 1

    for g, k in enumerate(order[:num_groups]):
        place(k, g)
    for k in order[num_groups:]:
        room = np.flatnonzero(count < sizes)
        before = _costs(gm[room], gw[room], total, divergence)
        after = _costs(gm[room] + masses[k], gw[room] + weights[k], total, divergence)
        place(k, int(room[np.argmin(after - before)]))

    for _ in range(max_passes):
        changed = False
        for i in range(n):
            changed |= _improve(i, assign, masses, weights, gm, gw, count, total, divergence, tol)
        if not changed:
            break
    return [sorted(np.flatnonzero(assign == g).tolist()) for g in range(num_groups)]


def _improve(
    i: int,
    assign: np.ndarray,
    masses: np.ndarray,
    weights: np.ndarray,
    gm: np.ndarray,
    gw: np.ndarray,
    count: np.ndarray,
    total: np.ndarray,
    divergence: Divergence,
    tol: float,
) -> bool:
    """Apply the best swap or move of client ``i`` if it lowers the objective."""
    a = assign[i]
    cost_now = _costs(gm, gw, total, divergence)
    # swaps with every client j of another group b = assign[j]
    others = np.flatnonzero(assign != a)
    b = assign[others]
    new_a = _costs(
        gm[a] - masses[i] + masses[others],
        gw[a] - weights[i] + weights[others],
        total,
        divergence,
    )
    new_b = _costs(
        gm[b] - masses[others] + masses[i],
        gw[b] - weights[others] + weights[i],
        total,
        divergence,
    )
    swap_gain = cost_now[a] + cost_now[b] - new_a - new_b
    # moves to groups holding one client fewer (sizes stay balanced)
    targets = np.flatnonzero(count == count[a] - 1)
    move_gain = (
        cost_now[a]
        + cost_now[targets]
        - _costs(gm[a] - masses[i], gw[a] - weights[i], total, divergence)
        - _costs(gm[targets] + masses[i], gw[targets] + weights[i], total, divergence)
    )
    best_swap = int(np.argmax(swap_gain)) if len(others) else -1
    best_move = int(np.argmax(move_gain)) if len(targets) else -1
    swap_value = swap_gain[best_swap] if best_swap >= 0 else -np.inf
    move_value = move_gain[best_move] if best_move >= 0 else -np.inf
    if max(swap_value, move_value) <= tol:
        return False
    if swap_value >= move_value:
        j, b_j = int(others[best_swap]), int(b[best_swap])
        _relocate(j, a, assign, masses, weights, gm, gw, count)
        _relocate(i, b_j, assign, masses, weights, gm, gw, count)
    else:
        _relocate(i, int(targets[best_move]), assign, masses, weights, gm, gw, count)
    return True


def _relocate(
    k: int,
    to: int,
    assign: np.ndarray,
    masses: np.ndarray,
    weights: np.ndarray,
    gm: np.ndarray,
    gw: np.ndarray,
    count: np.ndarray,
) -> None:
    frm = assign[k]
    gm[frm] -= masses[k]
    gw[frm] -= weights[k]
    count[frm] -= 1
    gm[to] += masses[k]
    gw[to] += weights[k]
    count[to] += 1
    assign[k] = to


def random_groups(num_clients: int, num_groups: int, seed: int = 0) -> list[list[int]]:
    """A balanced random partition (the baseline the KL grouping must beat)."""
    sizes = group_sizes(num_clients, num_groups)
    perm = np.random.default_rng(seed).permutation(num_clients)
    bounds = np.cumsum([0, *sizes])
    return [sorted(perm[bounds[g] : bounds[g + 1]].tolist()) for g in range(num_groups)]


def _as_arrays(masses: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    masses = np.asarray(masses, dtype=float)
    if masses.ndim != 2:
        raise ValueError(f"expected a clients × features matrix, got shape {masses.shape}")
    weights = masses.sum(1) if weights is None else np.asarray(weights, dtype=float)
    if weights.shape != (len(masses),) or np.any(weights < 0):
        raise ValueError("weights must be one non-negative number per client")
    return masses, weights
