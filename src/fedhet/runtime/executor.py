"""What the federation driver needs from an execution back-end.

:class:`~fedhet.runtime.driver.Driver` owns the federation loops (sync, async,
hierarchical); an :class:`Executor` only runs client instructions and reports
what came back, with times, and evaluates adapters. Two implement it:

* :class:`fedhet.runtime.sim.Simulation` — in-process, one shared base model, a
  virtual clock from the cost model (:mod:`fedhet.runtime.cost`), simulated
  availability, stragglers and faults;
* :class:`fedhet.runtime.flower.FlowerExecutor` — a Flower ``Grid``: messages
  to SuperNodes, replies in wall-clock order (or, on request, in the virtual
  clock's order, so a simulation on Flower reproduces the simulator).

Times are the executor's clock: virtual seconds for the simulator (and for
Flower with ``clock="virtual"``), wall seconds since dispatch for Flower.

Seeds: every random choice derives from ``(seed, purpose, event)``
(:func:`seed_of`), never from a running stream, so a resumed run and the two
executors make the same choices. Purposes used: 3 a client's training seed,
5 central training chunks, 17 sync selection and crashes, 19 the first async
dispatch, 23 async crashes, 29 async slot hand-over, 37 hierarchical crashes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedhet.model.lora import AdapterState
from fedhet.protocol import ClientInfo, ClientUpdate, CostModel, Instruction
from fedhet.runtime.validation import UpdateSpec
from fedhet.strategies.base import Strategy


def seed_of(*parts: int) -> int:
    """A 31-bit seed derived from integers (stable across runs and platforms)."""
    return int(np.random.default_rng(list(parts)).integers(2**31 - 1))


def round_event(rnd: int, cid: int) -> int:
    """The event number of client ``cid``'s update in synchronous round ``rnd``."""
    return rnd * 1_000_003 + cid


def stage_event(rnd: int, stage: int, cid: int) -> int:
    """A hierarchical member's event: the sync round's number for the first stage
    (so a one-stage group draws exactly what FedIT's round draws), shifted by
    ``stage · 10¹⁵`` for later stages (a client is in one group)."""
    return round_event(rnd, cid) + stage * 10**15


def client_seed(run_seed: int, event: int, cid: int) -> int:
    """The training seed of client ``cid`` at ``event`` (both executors use it)."""
    return seed_of(run_seed, 3, event, cid)


@dataclass
class ClientRun:
    """One executed instruction, as the driver sees it.

    Attributes:
        client_id: the instructed client.
        expected: what the server asked for (validated at arrival).
        update: what came back; ``None`` when nothing usable did.
        duration: the executor's seconds from dispatch to arrival.
        bytes_up: bytes of the upload (0 when nothing arrived).
        fault: an injected fault (simulator), if any; ``"crash"``: nothing arrived.
        rejection: why an arrived reply could not be read (a malformed message):
            a rejection, not a drop.
    """

    client_id: int
    expected: UpdateSpec
    update: ClientUpdate | None
    duration: float = 0.0
    bytes_up: int = 0
    fault: str | None = None
    rejection: str | None = None

    @property
    def arrived(self) -> bool:
        """Something reached the server (an update, or a reply it could not read)."""
        return self.fault != "crash" and (self.update is not None or self.rejection is not None)


@dataclass
class Arrival:
    """An asynchronous arrival: its time on the executor's clock, its run, and
    whether the driver had doomed it to be lost (simulated dropout)."""

    time: float
    run: ClientRun
    lost: bool


class Executor(ABC):
    """The execution back-end of a run (module docstring).

    ``virtual``: durations are the cost model's virtual seconds (rows then carry
    ``virtual_time``). ``resumable``: :meth:`state_dict` captures everything
    needed to continue a run (checkpoints are written only then). ``dropout``:
    the probability with which the driver makes a dispatched client crash
    (``federation.dropout`` in simulation; real nodes fail by themselves).
    """

    virtual: bool = True
    resumable: ClassVar[bool] = False
    dropout: float = 0.0

    @abstractmethod
    def connect(self) -> list[ClientInfo]:
        """Make the clients ready; returns the training clients' metadata."""

    @abstractmethod
    def online(self, event: int) -> list[int]:
        """The training clients available at a decision point (ascending ids)."""

    @abstractmethod
    def execute(
        self, jobs: list[tuple[Instruction, int]], *, deadline: float | None = None
    ) -> list[ClientRun]:
        """Run instructions at once (with their event numbers) and wait for them;
        one run per job, in the jobs' order (``deadline``: give up waiting after
        that many seconds of the executor's clock; a run not back is lost)."""

    @abstractmethod
    def submit(self, jobs: list[tuple[Instruction, int, bool]], now: float) -> None:
        """Asynchronous: start instructions at time ``now``, each with its event
        number and whether the driver dooms it to be lost (simulated dropout)."""

    @abstractmethod
    def next_arrival(self) -> Arrival:
        """Asynchronous: the next arrival (the executor's clock decides the order)."""

    @abstractmethod
    def in_flight(self) -> set[int]:
        """Asynchronous: the clients whose update has not arrived yet."""

    @abstractmethod
    def evaluate(
        self, strategy: Strategy, state: AdapterState, *, final: bool = False
    ) -> dict[str, Any]:
        """Evaluation fields of a metrics row for the global ``state`` (global,
        local and unseen clients, as far as the executor can; ``final``: the
        run's last evaluation)."""

    @abstractmethod
    def planner_costs(self) -> CostModel:
        """The hierarchical planner's cost figures (:mod:`fedhet.runtime.cost`)."""

    def state_dict(self) -> dict[str, Any]:
        """Executor-side run state for checkpoints (client states, in-flight work)."""
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Called once when the run ends."""
