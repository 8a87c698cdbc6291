"""HierFedLoRA: near-IID groups, per-group aggregation frequency and depth.

Clients are partitioned into G groups whose pooled label/category
distribution is close to the global one (:mod:`fedhet.strategies.grouping`).
A global round r (strategy mode ``"hier"``, driven by
:mod:`fedhet.runtime.driver`) is, for every group g with members online:

    x_g ← x                                  (the group aggregator downloads the global adapter)
    repeat τ_g times:                        (intra-group rounds, over the group's LAN)
        x_k ← E local steps of member k from x_g, training only the top d_g blocks
        x_g ← Σ_k n_k x_k / Σ_k n_k          (intra-group FedAvg of A and B, top d_g blocks)

and then the server aggregates across groups block by block, over the groups
that trained the block, with data-size weights n_g = Σ_{k∈g} n_k:

    x[ℓ] ← Σ_{g: ℓ ∈ top(d_g)} n_g x_g[ℓ] / Σ_{g: ℓ ∈ top(d_g)} n_g
    (blocks no group trained keep their value).

E is the run's local steps (``train.steps``): each intra-group round is an
ordinary local update, with a fresh AdamW as in every FedIT round, so τ_g = 1
at full depth is FedIT within the group, and a group of faster members can run
more intra-group rounds in the time a slower group runs one (the coupling the
paper exploits). (τ_g, d_g) come from :mod:`fedhet.strategies.hier_planner`
(cost model, progress model and search are documented there), re-planned every
``replan_every`` rounds from the members' observed / estimated duration ratios
and the progress the groups measured: each stage's members report the loss of
their first and last local step, and (ℓ_first − ℓ_last) / ℓ_first averaged over
the stage is one measurement of ρ(d_g) (a stage whose mean is not positive, noise
of two mini-batches, is dropped: log ρ needs ρ > 0); a round's measurements refit the
progress model at the end of the round (its fit, ``progress_a`` and
``progress_b``, is in every metrics row; the plans are in the rows' ``groups``).
Blocks below the top d_g get no ``requires_grad`` tensor, so members neither
backpropagate through them nor send them. Members talk to their group
aggregator over the LAN (``Instruction.link = "lan"``, ``federation.lan_mbps``);
the aggregator talks to the server over ``federation.group_*_mbps``.

Privacy: with ``grouping="kl"`` (default) clients share only their
label/category histogram (counts per class), once, for grouping; no sample
leaves a client. ``grouping="updates"`` needs no histogram: round 1 uses a
balanced random grouping; from then on, at every re-plan, clients are regrouped
so that each group's data-weighted mean update sketch (a seeded Gaussian
projection to ``sketch_dim`` numbers of the client's first-stage change of the
top block, which the group aggregator receives anyway) is close to the overall
mean (squared L2 objective, same greedy + local search). ``grouping="random"``
is the balanced random baseline.

Choices the paper leaves open (parameters, defaults): G = 4 groups (capped at
the number of clients); τ ∈ {1, 2, 3, 4} (``taus``); depths any of 1..L
(``depths``; ``full_depth=True``: every group at L whatever its memory, an
ablation); the progress prior b₀ = 0.5 with
weight 1, measurement EMA η = 0.5; ``memory_fraction`` = 1 (the share of a
device's memory fine-tuning may use); re-plan every round; EMA weight 0.5 for
the duration ratios. Every online member of a group takes part in every round
(``federation.clients_per_round`` is not used).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import torch

from fedhet.errors import FedhetError
from fedhet.model.lora import AdapterState, layer_index, select_layers, top_layers
from fedhet.protocol import (
    ClientInfo,
    ClientUpdate,
    CostModel,
    GroupResult,
    GroupRound,
    Instruction,
)
from fedhet.strategies.base import Strategy, data_weights, weighted_average
from fedhet.strategies.grouping import balanced_groups, random_groups
from fedhet.strategies.hier_planner import (
    Choice,
    Member,
    Policy,
    ProgressModel,
    member_time,
    plan_groups,
)


@torch.no_grad()
def layerwise_average(state: AdapterState, results: list[GroupResult]) -> AdapterState:
    """x[ℓ] ← data-weighted mean over the groups that trained block ℓ; blocks
    that no group trained keep ``state``'s tensors."""
    out = dict(state)
    for key in state:
        layer = layer_index(key)
        trained = [r for r in results if layer in r.layers]
        if trained:
            averaged = weighted_average(
                [{key: r.state[key]} for r in trained], [float(r.num_samples) for r in trained]
            )
            out[key] = averaged[key]
    return out


class HierFedLoRA(Strategy):
    """Hierarchical FedLoRA (module docstring)."""

    name = "hierfedlora"
    mode = "hier"
    keeps_local_state = True  # members keep the lower blocks between stages

    def __init__(
        self,
        num_groups: int = 4,
        grouping: Literal["kl", "updates", "random"] = "kl",
        taus: list[int] | None = None,
        depths: list[int] | None = None,
        full_depth: bool = False,
        planner: Policy = "joint",
        depth_exponent: float = 0.5,
        prior_weight: float = 1.0,
        progress_ema: float = 0.5,
        memory_fraction: float = 1.0,
        replan_every: int = 1,
        ema: float = 0.5,
        sketch_dim: int = 64,
        seed: int = 0,
    ) -> None:
        if num_groups < 1:
            raise ValueError("hierfedlora: num_groups must be ≥ 1")
        if grouping not in ("kl", "updates", "random"):
            raise ValueError(f"hierfedlora: grouping {grouping!r} not in kl, updates, random")
        if planner not in ("joint", "max_depth"):
            raise ValueError(f"hierfedlora: planner {planner!r} not in joint, max_depth")
        if depth_exponent < 0 or prior_weight < 0:
            raise ValueError("hierfedlora: depth_exponent and prior_weight must be ≥ 0")
        if not 0 < memory_fraction <= 1 or not 0 < ema <= 1 or not 0 < progress_ema <= 1:
            raise ValueError(
                "hierfedlora: memory_fraction, ema and progress_ema must lie in (0, 1]"
            )
        if replan_every < 1 or sketch_dim < 1:
            raise ValueError("hierfedlora: replan_every and sketch_dim must be ≥ 1")
        self.num_groups = num_groups
        self.grouping = grouping
        self.taus = [1, 2, 3, 4] if taus is None else list(taus)
        self.depths = depths
        self.full_depth = full_depth
        self.planner = planner
        self.depth_exponent = depth_exponent
        self.prior_weight = prior_weight
        self.progress_ema = progress_ema
        self.memory_fraction = memory_fraction
        self.replan_every = replan_every
        self.ema = ema
        self.sketch_dim = sketch_dim
        self.seed = seed

    # ------------------------------------------------------------ grouping
    def initialize(self, state: AdapterState, clients: list[ClientInfo]) -> AdapterState:
        state = super().initialize(state, clients)
        self.ids = [c.client_id for c in clients]
        self.num_layers = 1 + max(layer_index(k) for k in state)
        categories = sorted({c for info in clients for c in info.histogram})
        self.histograms = np.array(
            [[info.histogram.get(c, 0) for c in categories] for info in clients], dtype=float
        ).reshape(len(clients), len(categories))
        g = min(self.num_groups, len(clients))
        if self.grouping == "kl":
            if self.histograms.sum() <= 0:
                raise FedhetError(
                    "strategy.params.grouping='kl' needs the clients' category histograms; "
                    "none were given (use grouping='updates')"
                )
            rows = balanced_groups(self.histograms, num_groups=g)
        else:
            rows = random_groups(len(clients), g, self.seed)
        self.groups = [[self.ids[i] for i in row] for row in rows]
        self.ratio: dict[int, float] = {}
        self.sketches: dict[int, np.ndarray] = {}
        self.choices: list[Choice] = []
        self.rate = ProgressModel(
            self.num_layers, self.depth_exponent, self.prior_weight, self.progress_ema
        )
        self._measured: list[tuple[int, float]] = []  # this round's (depth, ρ) measurements
        self._cost: CostModel | None = None
        self._projection: torch.Tensor | None = None
        self._holding: dict[int, set[int]] = {}  # per group: members holding this round's blocks
        return state

    def _regroup_by_updates(self) -> None:
        """Balanced groups whose mean update sketch is close to the overall mean."""
        if not self.sketches:
            return
        n = np.array([self.clients[c].num_samples for c in self.ids], dtype=float)
        known = [c for c in self.ids if c in self.sketches]
        weights = np.array([self.clients[c].num_samples for c in known], dtype=float)
        mean = np.average([self.sketches[c] for c in known], axis=0, weights=weights)
        vectors = np.stack([self.sketches.get(c, mean) for c in self.ids])
        rows = balanced_groups(
            vectors * n[:, None], n, num_groups=len(self.groups), divergence="l2"
        )
        self.groups = [[self.ids[i] for i in row] for row in rows]

    # ------------------------------------------------------------ planning
    def _member(self, cid: int) -> Member:
        info = self.clients[cid]
        return Member(
            cid, info.flops, self.memory_fraction * info.memory_bytes, self.ratio.get(cid, 1.0)
        )

    def plan_round(self, rnd: int, online: list[int], cost: CostModel) -> list[GroupRound]:
        """This round's :class:`GroupRound` per group with online members;
        re-plans (and, with ``grouping="updates"``, regroups) every
        ``replan_every`` rounds and whenever no plan is held."""
        self._cost = cost
        if not self.choices or (rnd - 1) % self.replan_every == 0:
            if self.grouping == "updates" and rnd > 1:
                self._regroup_by_updates()
            groups = [[self._member(c) for c in g] for g in self.groups]
            try:
                self.choices = plan_groups(
                    groups,
                    cost,
                    self.rate,
                    taus=self.taus,
                    depths=[self.num_layers] if self.full_depth else self.depths,
                    policy=self.planner,
                )
            except ValueError as err:
                raise FedhetError(f"strategy.params (hierfedlora): {err}") from err
        up = set(online)
        rounds = []
        for g, (members, choice) in enumerate(zip(self.groups, self.choices, strict=True)):
            present = [c for c in members if c in up]
            if present:
                rounds.append(
                    GroupRound(
                        g,
                        present,
                        choice.tau,
                        choice.stages,
                        choice.depth,
                        top_layers(self.num_layers, choice.depth),
                        choice.time,
                    )
                )
        return rounds

    # ------------------------------------------------------------ a group
    def configure_group(
        self, rnd: int, group: GroupRound, stage: int, state: AdapterState
    ) -> list[Instruction]:
        """E local steps on the top d blocks from the group state, over the LAN: the
        whole adapter at the first intra-group round, afterwards only the trained
        blocks to the members whose update of this round arrived (they hold the
        lower blocks; one that crashed gets the whole adapter again)."""
        if stage == 0:
            self._holding[group.group] = set()
        holding = self._holding.get(group.group, set())
        trained = select_layers(state, group.layers)
        plan = {
            "trainable_layers": list(group.layers),
            "upload_keys": list(trained),
            "send": "state",
        }
        return [
            Instruction(cid, dict(trained if cid in holding else state), dict(plan), link="lan")
            for cid in group.members
        ]

    def aggregate_group(
        self, group: GroupRound, stage: int, state: AdapterState, updates: list[ClientUpdate]
    ) -> AdapterState:
        """Intra-group FedAvg of the trained blocks (validated updates only);
        records duration ratios (``metrics["duration"]``), the stage's progress
        measurement (module docstring) and update sketches."""
        if not updates:
            return state
        for u in updates:
            self._observe(group, stage, state, u)
        decreases = [
            (u.metrics["first_loss"] - u.metrics["last_loss"]) / u.metrics["first_loss"]
            for u in updates
            if u.metrics.get("first_loss", 0) > 0 and "last_loss" in u.metrics
        ]
        if decreases and np.mean(decreases) > 0:  # a stage that did not descend says
            self._measured.append((group.depth, float(np.mean(decreases))))  # nothing of ρ
        self._holding.setdefault(group.group, set()).update(u.client_id for u in updates)
        averaged = weighted_average([u.state for u in updates], data_weights(updates))
        return {**state, **averaged}

    def _observe(
        self, group: GroupRound, stage: int, start: AdapterState, update: ClientUpdate
    ) -> None:
        cid = update.client_id
        seconds = update.metrics.get("duration")
        if seconds is not None and self._cost is not None:
            member = Member(cid, self.clients[cid].flops, 0.0)
            estimate = member_time(self._cost, member, group.depth, stage == 0)
            if estimate > 0:
                old = self.ratio.get(cid, 1.0)
                self.ratio[cid] = (1 - self.ema) * old + self.ema * seconds / estimate
        if self.grouping == "updates" and stage == 0:
            top = self.num_layers - 1
            keys = sorted(k for k in update.state if layer_index(k) == top)
            change = torch.cat([(update.state[k] - start[k]).float().flatten() for k in keys])
            self.sketches[cid] = (change @ self._sketch_matrix(change.numel())).numpy()

    def _sketch_matrix(self, dim: int) -> torch.Tensor:
        if self._projection is None or self._projection.shape[0] != dim:
            gen = torch.Generator().manual_seed(self.seed)
            self._projection = torch.randn(dim, self.sketch_dim, generator=gen)
            self._projection /= self.sketch_dim**0.5
        return self._projection

    # ------------------------------------------------------------ the server
    def aggregate_groups(
        self, rnd: int, state: AdapterState, results: list[GroupResult]
    ) -> AdapterState:
        """Cross-group, block-wise, data-weighted (:func:`layerwise_average`); the
        round's progress measurements refit the progress model."""
        self.rate.observe_round(self._measured)
        self._measured = []
        return layerwise_average(state, results)

    def metrics(self) -> dict[str, float]:
        """The progress model's fit ρ(d) = a·(d/L)^b (every metrics row; none before
        :meth:`initialize`, e.g. in a central reference run)."""
        rate = getattr(self, "rate", None)
        return {} if rate is None else {"progress_a": rate.a, "progress_b": rate.b}

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": [list(g) for g in self.groups],
            "choices": [asdict(c) for c in self.choices],
            "ratio": dict(self.ratio),
            "sketches": {c: s.tolist() for c, s in self.sketches.items()},
            "progress": self.rate.state_dict(),
            "measured": list(self._measured),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.groups = [list(g) for g in sd["groups"]]
        self.choices = [Choice(**c) for c in sd["choices"]]
        self.ratio = dict(sd["ratio"])
        self.sketches = {int(c): np.array(s) for c, s in sd["sketches"].items()}
        self.rate.load_state_dict(sd["progress"])
        self._measured = [tuple(m) for m in sd["measured"]]


__all__ = ["HierFedLoRA", "layerwise_average"]
