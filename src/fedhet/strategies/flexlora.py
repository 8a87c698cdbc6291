"""FlexLoRA (Bai et al., 2024): heterogeneous ranks through an SVD of the averaged update.

Client k trains rank r_k (its device decides, see :mod:`fedhet.strategies.ranks`).
Per LoRA module, with s_k = alpha / r_k and p_k = n_k / Σ n_j over this round's
updates:

    ΔW_g = Σ_k p_k s_k B_k A_k = U S Vᵀ

and a client of rank r receives the rank-r truncation

    A = V[:, :r]ᵀ,    B = U[:, :r] · diag(S[:r]) / s_r,    so s_r B A = U_r S_r V_rᵀ.

Clients' adapters are replaced by these every round (nothing is kept locally).
This is the authors' ``distribute_weight_fast`` (``merge_rate = alpha / rank``).

The SVD is computed from the factors (:func:`factored_svd`): with
``B_cat = [w_1 B_1 | … | w_K B_K]`` (``w_k = p_k / r_k``) and ``A_cat = [A_1; …; A_K]``,
``ΔW_g / alpha = B_cat A_cat``; thin QRs ``B_cat = Q_B R_B`` and ``A_catᵀ = Q_A R_A``
leave the small core ``R_B R_Aᵀ`` (Σr_k × Σr_k) to decompose, and
``U = Q_B U_c``, ``V = Q_A V_c``. The SVD needs no d_out × d_in matrix while
Σ r_k < min(d_out, d_in) (beyond that ΔW_g may have full rank and the core is as
large as ΔW_g: the function then decomposes the product, the cheapest exact
route); the result is the dense SVD's, up to rounding. alpha cancels: it scales
ΔW_g and s_r alike. The exact global model (below) needs ΔW_g's part beyond
rank R: the thin SVD's tail below the width, one product of the stacked factors
beyond it.

Choices the paper leaves open:

* The global model (the global state: what the runtime evaluates and saves) is
  ΔW_g itself, as the authors keep it: its truncation at the shared adapter's
  rank R (``lora.rank``) as the factors, plus the remainder as the state's base
  delta (:mod:`fedhet.model.lora`), E = R·(ΔW_g/alpha) − B A, so that
  (alpha/R)·(B A + E) = ΔW_g exactly (to float32 rounding when Σr reaches the
  width, float64 below). Below the width E is the SVD's tail beyond rank R
  (zero while Σr ≤ R: no d_out × d_in product at all); beyond it ΔW_g is formed
  once per module, one product of the stacked factors, and serves the SVD too
  (:func:`aggregate_module`). Clients get prefixes of the truncated factors only
  (truncations nest); E is never sent to train (the global model evaluated on
  Flower nodes is sent whole, E included). The PEFT folder holds ΔW_g at the rank it
  needs (:func:`fedhet.model.lora.fold_base_delta`).
* When ΔW_g has rank below R (e.g. few clients of small rank in a round), the
  missing singular directions are completed with an orthonormal basis of the
  complement (singular value 0), as a dense SVD would return: the client's A rows
  there are orthonormal and B zero, so those slots still train. The completion
  is seeded (``seed``).
* The SVD runs in float64 while Σr < width (the small core). Beyond, the product
  of the stacked factors is formed in float32 (its cost grows with Σr) and its
  top-R SVD comes from the float64 eigendecomposition of its smaller Gram matrix
  (:func:`gram_svd`): one GEMM and a symmetric eigensolver of min(d_out, d_in)²
  instead of LAPACK's SVD of the whole matrix, faster, and exact for the float32
  product, whose rounding is then the only error left
  (``benchmarks/bench_flexlora_svd.py`` reports it against float64; a float32
  SVD added 1e-5). Results are cast back to the state's dtype.
* p_k is normalised over the updates that hold the module; a module no update
  holds keeps its global factors. Updates arrive validated by the runtime
  (:mod:`fedhet.runtime.validation`: each has exactly the shapes, hence the
  ranks, it was sent).
* The aggregation error (:func:`fedhet.strategies.base.aggregation_error`, logged
  every round) compares the global model with Σ p_k ΔW_k of the clients' uploads
  (each a whole adapter: clients start from truncations, without E), so it
  measures only the rounding of the exact global model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedhet.model.lora import AdapterState, delta_key, factor_keys, factors_only, modules, ranks
from fedhet.protocol import ClientInfo, ClientUpdate, Instruction
from fedhet.strategies.base import Strategy, data_weights
from fedhet.strategies.ranks import RankPlan, Ranks, rescaled_prefix


@torch.no_grad()
def factored_svd(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    *,
    dtype: torch.dtype = torch.float64,
    dense_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    product: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``(U, S, V)`` of ``M = Σ_k w_k B_k A_k`` from the factors.

    ``factors`` holds ``(B_k, A_k)`` (``d_out × r_k``, ``r_k × d_in``). Returns U
    (``d_out × rank``), S (``rank``, descending) and V (``d_in × rank``) with
    orthonormal columns and ``U diag(S) Vᵀ`` the best rank-``rank`` approximation
    of M. While K = Σ r_k < min(d_out, d_in), thin QRs of the stacked factors leave
    a K × K core (:func:`thin_svd`); from there on no exact method has less to
    decompose than M itself (its rank can be min(d_out, d_in)), so M is formed as
    the product of the stacked factors in ``dense_dtype`` (float32: its cost grows
    with Σr; ``product``: M when the caller has formed it) and its top-``rank``
    SVD taken in ``dtype`` by :func:`gram_svd`. Singular directions beyond the rank
    of M are completed orthonormally (seeded) with singular value 0.
    """
    if not is_dense(factors):
        u, s, v = thin_svd(factors, weights, dtype)
    else:
        core = stacked_product(factors, weights, dense_dtype) if product is None else product
        u, s, v = gram_svd(core.to(dtype), rank)
    return _top(u, s, v, rank, seed)


GRAM_CUTOFF = 1e-6
"""Singular values below this share of the largest are taken as 0 by :func:`gram_svd`."""


def gram_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ≤ ``rank`` singular triplets ``(U, S, V)`` of ``m`` from the
    eigendecomposition of its smaller Gram matrix: with d_in ≤ d_out,
    ``mᵀm = V S² Vᵀ`` and ``U = m V / S`` (the transpose otherwise). In float64
    the squared spectrum loses nothing the truncation needs: eigenvalues carry an
    absolute error ~1e-16·σ_1², so every σ_i above ``GRAM_CUTOFF``·σ_1 is resolved
    and its U column is accurate to ~1e-16·(σ_1/σ_i)²; smaller ones are dropped
    (left to :func:`_top`'s completion, as singular value 0)."""
    if m.shape[1] > m.shape[0]:
        v, s, u = gram_svd(m.T, rank)
        return u, s, v
    lam, vecs = torch.linalg.eigh(m.T @ m)
    lam, vecs = lam.flip(0)[:rank], vecs.flip(1)[:, :rank]
    s = lam.clamp_min(0).sqrt()
    keep = s > GRAM_CUTOFF * s[0]  # all False when m = 0: every direction completed
    s, v = s[keep], vecs[:, keep]
    return (m @ v) / s, s, v


def thin_svd(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole thin SVD (all K = Σ r_k triplets) of M = Σ_k w_k B_k A_k without
    forming M: ``B_cat = Q_B R_B``, ``A_catᵀ = Q_A R_A``, ``R_B R_Aᵀ = U_c S V_cᵀ``,
    so ``M = (Q_B U_c) S (Q_A V_c)ᵀ``. Costs O((d_out + d_in) K²); worth it while
    K < min(d_out, d_in)."""
    b_cat = torch.cat([w * b.to(dtype) for (b, _), w in zip(factors, weights, strict=True)], 1)
    a_cat = torch.cat([a.to(dtype) for _, a in factors], 0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u_c, s, q_a @ vh_c.T


def _top(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` triplets of a thin SVD, completed orthonormally (seeded)
    with singular value 0 where the SVD has fewer."""
    k = min(rank, s.numel())
    gen = torch.Generator().manual_seed(seed)
    return (
        _complete(u[:, :k], rank, gen),
        torch.cat([s[:k], s.new_zeros(rank - k)]),
        _complete(v[:, :k], rank, gen),
    )


def is_dense(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether Σ r_k reaches min(d_out, d_in): no core smaller than M itself."""
    b0, a0 = factors[0]
    return sum(a.shape[0] for _, a in factors) >= min(b0.shape[0], a0.shape[1])


def stacked_product(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """M = Σ_k w_k B_k A_k as one product of the stacked factors, in ``dtype``."""
    b_cat = torch.cat([w * b.to(dtype) for (b, _), w in zip(factors, weights, strict=True)], 1)
    return b_cat @ torch.cat([a.to(dtype) for _, a in factors], 0)


@torch.no_grad()
def aggregate_module(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One module's global (A, B, E) in float64 (module docstring): A = Vᵀ, B = U S R
    of the rank-R truncation of M = ΔW_g/alpha, E = R·M − B A. While Σr is below the
    width, E is R times M's SVD tail beyond rank R (:func:`thin_svd`; zero when
    Σr ≤ R), so no d_out × d_in product is formed unless the tail exists; beyond,
    M is formed once in float32 and serves the SVD and E alike."""
    if is_dense(factors):
        product = stacked_product(factors, weights, torch.float32)
        u, s, v = factored_svd(factors, weights, rank, seed=seed, product=product)
        a, b = v.T.contiguous(), u * (s * rank)
        return a, b, rank * product.double() - b @ a
    u_all, s_all, v_all = thin_svd(factors, weights)
    u, s, v = _top(u_all, s_all, v_all, rank, seed)
    tail = (u_all[:, rank:] * (s_all[rank:] * rank)) @ v_all[:, rank:].T
    return v.T.contiguous(), u * (s * rank), tail


def _complete(basis: torch.Tensor, width: int, gen: torch.Generator) -> torch.Tensor:
    """``basis`` (orthonormal columns) extended to ``width`` columns: orthonormal up
    to its dimension, zero beyond (a rank above min(d_out, d_in) has nothing to add)."""
    dim, have = basis.shape
    missing = min(width, dim) - have
    if missing > 0:
        extra = torch.randn(dim, missing, generator=gen, dtype=basis.dtype)
        for _ in range(2):  # project out the basis twice: orthogonal to rounding error
            extra, _ = torch.linalg.qr(extra - basis @ (basis.T @ extra))
        basis = torch.cat([basis, extra], 1)
    return torch.cat([basis, basis.new_zeros(dim, width - basis.shape[1])], 1)


class FlexLoRA(Strategy):
    """FlexLoRA aggregation and SVD redistribution (module docstring).

    Args:
        rank_profile, rank_levels, memory_gb, seed: who trains which rank
            (:class:`fedhet.strategies.ranks.RankPlan`); ``seed`` also seeds the
            completion of missing singular directions.
    """

    name = "flexlora"

    def __init__(
        self,
        rank_profile: str | list[float] = "uniform",
        rank_levels: list[int | list[int]] | None = None,
        memory_gb: Sequence[float] = (0.0, 8.0, 16.0, 24.0),
        seed: int = 0,
    ) -> None:
        self.rank_plan = RankPlan(rank_profile, rank_levels, memory_gb, seed)
        self.seed = seed

    def initialize(self, state: AdapterState, clients: list[ClientInfo]) -> AdapterState:
        super().initialize(state, clients)
        self.shared = ranks(state)
        self.ranks: dict[int, Ranks] = self.rank_plan.assign(state, clients)
        return state

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        """Each client gets the rank-r truncation: a prefix of the global factors with
        B rescaled by s_R / s_r = r / R."""
        factors = factors_only(state)  # the base delta stays on the server
        return [
            Instruction(cid, rescaled_prefix(factors, self.ranks[cid], a_power=0.0, b_power=1.0))
            for cid in client_ids
        ]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        out = dict(state)
        for mod in modules(state):
            a_key, b_key = factor_keys(mod)
            holders = [u for u in updates if a_key in u.state]
            if not holders:
                continue
            total = float(sum(u.num_samples for u in holders))
            factors = [(u.state[b_key], u.state[a_key]) for u in holders]
            weights = [u.num_samples / total / u.state[a_key].shape[0] for u in holders]
            # ΔW_g / alpha = U S Vᵀ  →  A = Vᵀ, B = U S / (s_R / alpha) = U S R, and the
            # remainder beyond rank R as the base delta E = R·M − B A
            a, b, delta = aggregate_module(factors, weights, self.shared[mod], self.seed)
            out[a_key] = a.to(state[a_key].dtype)
            out[b_key] = b.to(state[b_key].dtype)
            out[delta_key(mod)] = delta.to(state[a_key].dtype)
        # clients start from truncations without E: each one's full adapter is what it sent
        trained = [factors_only(u.state) for u in updates]
        return self.measured(out, state, updates, data_weights(updates), trained)
