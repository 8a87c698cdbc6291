"""The strategy interface: server logic as pure functions of adapter states.

A strategy never touches a model, a dataset, a socket or a clock. It sees
adapter states (``dict[str, Tensor]``, see :mod:`fedhet.model.lora`) with
metadata, and returns states and instructions. The same object runs under the
simulator and under Flower.

Two forms, chosen by ``mode``:

* synchronous (``"sync"``): each round the runtime samples the available
  clients, calls :meth:`Strategy.configure` for their instructions, runs them,
  and calls :meth:`Strategy.aggregate` on the replies that came back;
* asynchronous (``"async"``): the runtime keeps clients in flight; each arrival
  goes to :meth:`Strategy.on_arrival`, which may apply it (the global model
  version then increases by one), and the next dispatch asks
  :meth:`Strategy.configure` for a single client;
* hierarchical (``"hier"``): each global round the runtime hands the online
  clients and its :class:`~fedhet.protocol.CostModel` to
  :meth:`Strategy.plan_round`, which returns one
  :class:`~fedhet.protocol.GroupRound` per group; for each of a group's stages it
  runs :meth:`Strategy.configure_group`'s instructions and folds the validated
  updates in with :meth:`Strategy.aggregate_group`; the groups' results go to
  :meth:`Strategy.aggregate_groups`.

The loops themselves live in one place, :mod:`fedhet.runtime.driver`, for the
simulator and for Flower alike.

Strategy-internal server state (a buffer, a window of models, selected layers)
lives on the object and must round-trip through :meth:`state_dict` /
:meth:`load_state_dict` so checkpoints resume exactly.
"""

from __future__ import annotations

import inspect
from abc import ABC
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from fedhet.errors import FedhetError
from fedhet.model.lora import AdapterState, delta_key, factor_keys, modules
from fedhet.protocol import (
    ClientInfo,
    ClientUpdate,
    CostModel,
    GroupResult,
    GroupRound,
    Instruction,
)


class Strategy(ABC):
    """Base class of every federated strategy (see the module docstring).

    Subclasses set ``name`` (the registry name), ``mode`` and implement
    :meth:`configure` and :meth:`aggregate` (sync), :meth:`on_arrival`
    (async) or the four hierarchical hooks (hier). ``keeps_local_state`` tells
    the runtime that clients keep their own tensors between participations
    (personalised or local layers).
    ``regime`` (async) is the strategy's default dispatch regime, PROTOCOL v2's
    ``full`` (every client in flight, an arrival restarts the same client) or
    ``bounded`` (``concurrency`` in flight, a freed slot goes to a random idle
    client); ``federation.regime`` overrides it.
    ``horizon`` is the run's configured number of rounds (sync and hier; None in
    async or when unknown), set by the driver before :meth:`initialize`, for
    schedules that span the run (FibecFed's curriculum pacing).
    """

    name: ClassVar[str]
    mode: ClassVar[Literal["sync", "async", "hier"]] = "sync"
    keeps_local_state: ClassVar[bool] = False
    regime: ClassVar[Literal["full", "bounded"]] = "bounded"
    horizon: int | None = None
    last_aggregation_error: float | None = None

    def initialize(self, state: AdapterState, clients: list[ClientInfo]) -> AdapterState:
        """Called once before training with the initial global adapter and the
        clients' metadata; returns the initial global state."""
        self.clients = {c.client_id: c for c in clients}
        return state

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        """Instructions for the clients the runtime picked (sync: a round's
        selection; async: one client being dispatched, ``rnd`` = version).
        Default: everyone starts from the global state with the run's plan."""
        return [Instruction(cid, state) for cid in client_ids]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        """Synchronous: the new global state from a round's updates."""
        raise NotImplementedError(f"{self.name} is not a synchronous strategy")

    def on_arrival(self, state: AdapterState, update: ClientUpdate) -> AdapterState | None:
        """Asynchronous: the new global state after one arrival, or ``None``
        when the arrival is held (e.g. buffered) and the version does not move."""
        raise NotImplementedError(f"{self.name} is not an asynchronous strategy")

    def plan_round(self, rnd: int, online: list[int], cost: CostModel) -> list[GroupRound]:
        """Hierarchical: round ``rnd``'s work per group, given the online clients
        and the runtime's cost figures."""
        raise NotImplementedError(f"{self.name} is not a hierarchical strategy")

    def configure_group(
        self, rnd: int, group: GroupRound, stage: int, state: AdapterState
    ) -> list[Instruction]:
        """Hierarchical: the instructions of one stage of ``group`` from the
        group's current state."""
        raise NotImplementedError(f"{self.name} is not a hierarchical strategy")

    def aggregate_group(
        self, group: GroupRound, stage: int, state: AdapterState, updates: list[ClientUpdate]
    ) -> AdapterState:
        """Hierarchical: the group's state after one stage's validated updates."""
        raise NotImplementedError(f"{self.name} is not a hierarchical strategy")

    def aggregate_groups(
        self, rnd: int, state: AdapterState, results: list[GroupResult]
    ) -> AdapterState:
        """Hierarchical: the new global state from the groups' results."""
        raise NotImplementedError(f"{self.name} is not a hierarchical strategy")

    def evaluation_state(
        self, state: AdapterState, client_state: AdapterState | None = None
    ) -> AdapterState:
        """The adapter to evaluate: the global state, merged over a client's own
        tensors for methods that keep local layers (local evaluation)."""
        if client_state is None or not self.keeps_local_state:
            return state
        return {**client_state, **state}

    def measured(
        self,
        new: AdapterState,
        state: AdapterState,
        updates: list[ClientUpdate],
        weights: list[float],
        clients: list[AdapterState] | None = None,
    ) -> AdapterState:
        """``new``, after recording its :func:`aggregation_error` against the round's
        clients' full adapters: ``clients`` when the strategy gives them (a client
        that did not start from the global ``state``, e.g. a truncation of it),
        else their updates over the ``state`` they started from."""
        own = client_states(state, updates) if clients is None else clients
        self.last_aggregation_error = aggregation_error(new, own, weights)
        return new

    def metrics(self) -> dict[str, float]:
        """Figures the runtime adds to every metrics row (e.g. DP-FedAvg's ε; the
        last round's :func:`aggregation_error` where the strategy measures it)."""
        if self.last_aggregation_error is None:
            return {}
        return {"aggregation_error": self.last_aggregation_error}

    def state_dict(self) -> dict[str, Any]:
        """Server-side strategy state for checkpoints (tensors allowed)."""
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned."""


def instantiate(cls: type[Strategy], params: dict[str, Any] | None = None) -> Strategy:
    """``cls(**params)``; parameters it does not accept, or values it refuses,
    raise :class:`FedhetError` naming them (``strategy.params``)."""
    params = params or {}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(params) - accepted
    if unknown:
        raise FedhetError(
            f"strategy.params: {sorted(unknown)} not accepted by {cls.name!r}; "
            f"accepted: {sorted(accepted)}"
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise FedhetError(f"strategy.params for {cls.name!r}: {err}") from err


def require_nonempty(updates: list[ClientUpdate], who: str) -> None:
    if not updates:
        raise ValueError(f"{who}: no updates to aggregate")


@torch.no_grad()
def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Σ_k w_k x_k / Σ_k w_k, key by key, in float32 (keys of the first state)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: AdapterState = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for s, w in zip(states, weights, strict=True):
            acc.add_(s[key].float(), alpha=w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


SKETCH_PROBES = 64
"""Gaussian probes of :func:`aggregation_error`'s estimate for wide dense modules."""
SKETCH_RANK = 4 * SKETCH_PROBES
"""Stacked columns beyond which :func:`aggregation_error` estimates instead of
forming the dense difference (there the probes cost a small share of the product)."""


@torch.no_grad()
def aggregation_error(
    applied: AdapterState, clients: list[AdapterState], weights: list[float]
) -> float | None:
    """‖ΔW_applied − Σ_k p_k ΔW_k‖_F / ‖Σ_k p_k ΔW_k‖_F over all modules together,
    with p_k = w_k / Σ_j w_j and ΔW / α = (B·A + E) / r of each module: how far the
    global adapter is from the average of the clients' trained adapters (each
    client's full adapter: what it trained over what it started from). Each state
    is taken at its own LoRA scaling α/r (r: its rank, the rows of A), so clients
    of different ranks compare with each other and with the global state; α is
    common and cancels (with one rank throughout, r cancels too). 0 when the
    average is 0; None when no module has both factors, as matrices, in every state.

    The norms come from the stacked factors, ``X = [c_1 B_1 / r_1 | … ]`` and
    ``Y = [A_1; …]`` with Σ_s c_s (B_s A_s + E_s) / r_s = X·Y + Σ_s c_s E_s / r_s.
    Without base deltas (or with zero ones) and while the stack's R = Σ r_s is
    below min(d_out, d_in), thin QRs ``X = Q_X R_X`` and ``Yᵀ = Q_Y R_Y`` give
    ‖X·Y‖ = ‖R_X R_Yᵀ‖: O((d_out + d_in) R²) and no d_out × d_in matrix. The QRs
    are orthogonal, so a difference that cancels to δ is resolved to
    ~1e-16·‖X‖‖Y‖, as a dense difference would be (a Gram form XᵀX ⊙ YYᵀ would
    resolve only ~1e-8).
    Otherwise (a base delta, or a stack as wide as the module) the difference is
    dense. While the stack holds at most ``SKETCH_RANK`` columns it is formed
    exactly, one product of the stacked factors per side. Beyond, forming it costs
    as much as the aggregation's own product (O(d_out d_in Σr), twice, in float64:
    at 1,000 clients of SmolLM2 shapes, more than the round it measures), so both
    squared norms are estimated from ``SKETCH_PROBES`` = m Gaussian probes Ω
    (d_in × m, seeded per module): ‖D‖²_F = E‖DΩ‖²_F / m (Hutchinson), with
    DΩ = Σ_s c_s (B_s(A_sΩ) + E_sΩ) / r_s state by state (no stacked copy),
    O(m (Σr (d_out + d_in) + d_out d_in)).
    The estimate of one module's squared norm has relative standard deviation at
    most √(2/m) = 0.18 (so ≤ 9 % on the norm), less when the singular values are
    spread and less again summed over many modules; the logged error is then an
    estimate, good to its first digit, which is what it is read for (is the
    global model exact to rounding, or off by a percent?)."""
    total = float(sum(weights))
    shares = [(c, w / total) for c, w in zip(clients, weights, strict=True)]
    error, norm, measured = 0.0, 0.0, False
    for index, mod in enumerate(modules(applied)):
        a_key, b_key = factor_keys(mod)
        if not all(_factor_pair(s, a_key, b_key) for s in (applied, *clients)):
            continue
        measured = True
        d_out, d_in = applied[b_key].shape[0], applied[a_key].shape[1]
        live = sum(int(s[b_key].any(0).sum()) for s in (applied, *clients))
        # scanning a dense delta costs as much as reading it: once per state and module
        mine_delta, *their_delta = (_nonzero_delta(s, mod) for s in (applied, *clients))
        delta = mine_delta or any(their_delta)
        if live > SKETCH_RANK and (delta or live >= min(d_out, d_in)):
            gen = torch.Generator().manual_seed(index)
            omega = torch.randn(d_in, SKETCH_PROBES, generator=gen, dtype=torch.float64)
            average = _probed(mod, shares, their_delta, omega)
            norm += float(average.pow(2).sum()) / SKETCH_PROBES
            mine = _probed(mod, [(applied, 1.0)], [mine_delta], omega)
            error += float((mine - average).pow(2).sum()) / SKETCH_PROBES
            continue
        x_t, y_t, e_t = stacked_factors(mod, shares, their_delta)  # the average
        x_g, y_g, e_g = stacked_factors(mod, [(applied, 1.0)], [mine_delta])  # the global
        if not delta and live < min(d_out, d_in):
            norm += _thin_norm(x_t, y_t) ** 2
            error += _thin_norm(torch.cat([x_g, -x_t], 1), torch.cat([y_g, y_t])) ** 2
        else:
            average = _dense(x_t, y_t, e_t)
            norm += float(average.pow(2).sum())
            error += float((_dense(x_g, y_g, e_g) - average).pow(2).sum())
    if not measured:
        return None
    return (error / norm) ** 0.5 if norm > 0 else 0.0


@torch.no_grad()
def stacked_factors(
    module: str, terms: list[tuple[AdapterState, float]], with_delta: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(X, Y, D)`` in float64 with X·Y + D = Σ_s c_s (B_s·A_s + E_s) / r_s for
    ``terms`` ``(state_s, c_s)`` of one module: ``X = [c_1 B_1 / r_1 | … ]``,
    ``Y = [A_1; …]``, D = Σ c_s E_s / r_s over the states with a nonzero base delta
    E_s (``with_delta``, one flag per term; D is None when none has one); r_s is
    the rank of state s. Slots whose B column is zero add nothing and are dropped (a
    fresh LoRA's B; FlexLoRA's completed directions), which keeps the thin QRs of
    :func:`aggregation_error` small."""
    a_key, b_key = factor_keys(module)
    d_key = delta_key(module)
    x = torch.cat([(c / s[a_key].shape[0]) * s[b_key].double() for s, c in terms], 1)
    y = torch.cat([s[a_key].double() for s, _ in terms], 0)
    live = x.any(0)
    x, y = x[:, live], y[live]
    delta = None
    for (s, c), nonzero in zip(terms, with_delta, strict=True):
        if nonzero:
            part = (c / s[a_key].shape[0]) * s[d_key].double()
            delta = part if delta is None else delta + part
    return x, y, delta


def _probed(
    module: str,
    terms: list[tuple[AdapterState, float]],
    with_delta: Sequence[bool],
    omega: torch.Tensor,
) -> torch.Tensor:
    """Σ_s c_s (B_s·A_s + E_s)·Ω / r_s in float64, state by state: the probes of
    :func:`aggregation_error`, with no stacked copy of the factors (E_s only where
    ``with_delta`` flags it nonzero)."""
    a_key, b_key = factor_keys(module)
    d_key = delta_key(module)
    out = omega.new_zeros(terms[0][0][b_key].shape[0], omega.shape[1])
    for (s, c), nonzero in zip(terms, with_delta, strict=True):
        part = s[b_key].double() @ (s[a_key].double() @ omega)
        if nonzero:
            part += s[d_key].double() @ omega
        out.add_(part, alpha=c / s[a_key].shape[0])
    return out


def _nonzero_delta(state: AdapterState, module: str) -> bool:
    """Whether ``state`` holds a nonzero base delta for ``module``."""
    d_key = delta_key(module)
    return d_key in state and bool(state[d_key].any())


def _factor_pair(state: AdapterState, a_key: str, b_key: str) -> bool:
    """Whether ``state`` holds both factors of a module as matrices."""
    return a_key in state and b_key in state and state[a_key].dim() == state[b_key].dim() == 2


def _thin_norm(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖X·Y‖_F from thin QRs of X and Yᵀ (:func:`aggregation_error`)."""
    return float(torch.linalg.matrix_norm(torch.linalg.qr(x)[1] @ torch.linalg.qr(y.T)[1].T))


def _dense(x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """X·Y + D (:func:`stacked_factors`)."""
    return x @ y if delta is None else torch.addmm(delta, x, y)


def client_states(state: AdapterState, updates: list[ClientUpdate]) -> list[AdapterState]:
    """Each client's full adapter in a synchronous round: what it sent over the
    global ``state`` it started from."""
    return [{**state, **u.state} for u in updates]


def data_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k ∝ n_k."""
    return [float(u.num_samples) for u in updates]


def apply_delta(state: AdapterState, delta: AdapterState, scale: float = 1.0) -> AdapterState:
    """x + scale·Δ for the keys of Δ; other keys unchanged."""
    out = dict(state)
    for key, d in delta.items():
        out[key] = state[key] + scale * d
    return out


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    """a − b over the keys of a."""
    return {k: a[k] - b[k] for k in a}
