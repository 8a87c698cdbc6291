"""The protocol between strategies and runtimes: what travels and what is known.

These types sit on the lowest floor: :mod:`fedhet.strategies`, :mod:`fedhet.client`
and :mod:`fedhet.runtime` all import them, and this module imports nothing of
fedhet but the adapter-state alias.

* :class:`ClientInfo` — what the server may know about a client (metadata, no data);
* :class:`Instruction` — what a client is told to do (start tensors and a plan);
* :class:`ClientUpdate` — what a client sends back;
* hierarchical mode (``Strategy.mode == "hier"``): :class:`CostModel` (the
  runtime's cost figures the strategy plans with), :class:`GroupRound` (one
  group's work in a global round) and :class:`GroupResult` (what a group sends
  the server).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedhet.model.lora import AdapterState


@dataclass(frozen=True)
class ClientInfo:
    """What the server may know about a client (no data, only metadata).

    ``histogram`` is the client's label/category counts; clients share it only
    when a method needs it (grouping), as the method's docstring says.
    """

    client_id: int
    num_samples: int
    flops: float = 1e12
    memory_bytes: float = 8e9
    histogram: dict[str, int] = field(default_factory=dict)


@dataclass
class Instruction:
    """What a client is told to do.

    Attributes:
        client_id: the client.
        state: the tensors to load before training. Keys absent here are taken
            from the client's own last state (strategies with
            ``keeps_local_state``) or from the shared initial adapter. Its size
            is what travels down.
        plan: overrides of the run's training plan (fields of
            :class:`fedhet.client.TrainPlan`: ``rank``, ``trainable_layers``,
            ``frozen``, ``masks``, ``prox_mu``, ``upload_keys``, ``send`` ...).
        version: the global model version the client starts from (set by the
            runtime; staleness = version at arrival − this).
        link: ``"wan"``, the device's wide-area link to the server, or ``"lan"``,
            the local link to a group aggregator (``federation.lan_mbps``), which
            the virtual clock charges the transfers to.
    """

    client_id: int
    state: AdapterState
    plan: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    link: Literal["wan", "lan"] = "wan"


@dataclass
class ClientUpdate:
    """What a client sends back.

    ``state`` is the trained adapter (``kind="state"``) or its difference from
    the start (``kind="delta"``), restricted to the plan's ``upload_keys``.
    ``staleness`` is filled in by the runtime at arrival (0 in synchronous mode).
    ``extras`` carries method-specific client statistics (e.g. Fisher scores of
    layers or neurons), tensors allowed; the strategy defines their keys.
    """

    client_id: int
    state: AdapterState
    num_samples: int
    version: int = 0
    kind: Literal["state", "delta"] = "state"
    metrics: dict[str, float] = field(default_factory=dict)
    staleness: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CostModel:
    """What the runtime tells a hierarchical planner: estimated costs of training
    and moving each depth of the adapter (:mod:`fedhet.strategies.hier_planner`
    gives the equations, :func:`fedhet.runtime.cost.planner_costs` the figures).

    ``flops_per_token[d]`` and ``memory_bytes[d]`` are indexed by depth
    d = 0..L; ``layer_bytes[ℓ]`` by block ℓ = 0..L−1; per-client figures by
    client id; links in bit/s (``up_bps``/``down_bps``: each device's wide-area
    link, ``group_*_bps``: group aggregator ↔ server, ``lan_bps``: device ↔ group
    aggregator).
    """

    num_layers: int
    round_steps: int
    flops_per_token: tuple[float, ...]
    memory_bytes: tuple[float, ...]
    layer_bytes: tuple[float, ...]
    tokens_per_step: Mapping[int, float]
    up_bps: Mapping[int, float]
    down_bps: Mapping[int, float]
    group_up_bps: float
    group_down_bps: float
    lan_bps: float

    def top_bytes(self, depth: int) -> float:
        """B(d): bytes of the top ``depth`` blocks' adapter."""
        return float(sum(self.layer_bytes[self.num_layers - depth :])) if depth else 0.0


@dataclass(frozen=True)
class GroupRound:
    """One group's work in one global round: its participating members, τ
    intra-group rounds (``stages`` = τ, the driver's loop count), the depth d and
    the blocks it trains."""

    group: int
    members: list[int]
    tau: int
    stages: int
    depth: int
    layers: list[int]
    planned_time: float


@dataclass(frozen=True)
class GroupResult:
    """What a group sends the server: its trained blocks and its data size."""

    group: int
    state: AdapterState
    num_samples: int
    layers: list[int]


__all__ = [
    "ClientInfo",
    "ClientUpdate",
    "CostModel",
    "GroupResult",
    "GroupRound",
    "Instruction",
]
