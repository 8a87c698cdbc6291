"""FibecFed (Liu et al., EMNLP 2024): Fisher-information curriculum and sparse layers.

Three parts; the client-side work (scoring, curriculum subset, neuron masks or
frozen layers) is done by the client (:mod:`fedhet.client.fisher`,
:mod:`fedhet.client.curriculum`) following the plan fields this strategy sets;
the server only chooses layers and aggregates.

1. Curriculum. Client k scores its samples once by the trace of the diagonal
   empirical Fisher w.r.t. the LoRA parameters, d_i = Σ_θ (∂ℓ_i/∂θ)² (or, with
   ``score_with="loss"``, by the cheaper proxy d_i = ℓ_i), keeps the scores as
   its own state and rescores after R = ``rescore_every`` of its own local
   updates (None: never). In round t it trains on its ⌈p(t)·n_k⌉ easiest
   samples, p(t) = pacing(t − 1; p0, T − 1) growing from p0 in round 1 to 1 in
   round T = ``pacing_rounds``, by default the run's configured rounds (the
   driver's ``horizon``), so the whole of every client's data is in use by the
   last round (``pacing``: linear, root or geometric). A run stopped before its
   configured rounds (at a target or a time limit) stops before p = 1 and
   before its last refresh round (below).
2. Global aggregation layers (GAL). Each client reports a score per transformer
   block, the sensitivity Σ_{θ∈l} |θ·∂L/∂θ| (default) or the Fisher mass
   Σ_{θ∈l} (∂L/∂θ)², momentum-smoothed; the server normalises each report to sum
   1, averages the latest report of every client with data-size weights p_k,
   and keeps the top ⌈ρ·L⌉ blocks (ties to the lower block) as GAL, re-selected
   every E = ``gal_every`` rounds. Only GAL tensors travel down; they are
   averaged as FedIT does, A ← Σ p_k A_k, B ← Σ p_k B_k.
3. Sparse local update. Outside GAL, only the top γ of each LoRA factor's
   neurons (rows of B and rows of A) by momentum-smoothed (β) Fisher score stay
   trainable (``sparse_unit="neuron"``, the paper's; it saves no compute, see
   :mod:`fedhet.client.fisher`), or only the top ⌈γ·n⌉ of the n non-GAL layers
   by the client's layer score train and the rest are frozen
   (``sparse_unit="layer"``: no gradient, no optimiser state, a shallower
   backward that the cost model charges).

Choices the paper leaves open (each a parameter where it is a number):

* Warm-up: during the first W = ``warmup_rounds`` rounds every layer is global
  and the layer reports of those rounds are not used: an update that starts
  from LoRA's initial adapter (B = 0) has θ_B·g_B = 0 and ∂L/∂A ∝ B = 0, so its
  sensitivities say nothing (the client also skips score observations taken at
  B = 0). GAL is first selected in the first round after a report from round
  W + 1 or later has arrived, from those reports, then every E rounds.
* Non-GAL layers are never sent down. They are each client's own, starting from
  the shared initial adapter (so a client joining late starts its local layers
  there). When a layer enters GAL the clients receive the server's copy over
  their own; when it leaves GAL each client keeps its own.
* The global model's non-GAL layers: in a refresh round — a round in which GAL
  is (re)selected, and the run's last round — every client uploads all its
  layers; the server averages the non-GAL ones (data-weighted) into its copy,
  which is what global evaluation and the final adapter use (never sent down).
  Their bytes count. Between refreshes the global figure uses the last refresh;
  local evaluation uses each client's own non-GAL layers under the global GAL
  layers (the personalised model).
* Neuron masks are built by the client from its own smoothed scores (the server
  sends the layers to sparsify and γ, never masks or scores). GAL layers train
  all their neurons. A client with no neuron (or layer) scores yet trains every
  neuron (layer); its scores come from its gradient observations in blocks whose
  B is not zero (a Fisher scoring pass and every optimiser step).
* A layer report is used until the same client sends a newer one; malformed
  reports are ignored (logged) and never stop aggregation.
* Ablations: ``curriculum``, ``gal`` and ``sparse`` switch the parts off. With
  ``gal=False`` every layer is aggregated every round and the sparse update (if
  on) covers every layer.

Defaults: p0 = 0.3, linear pacing over the run, R = 10 updates, Fisher scores,
W = 1, ρ = 0.5, E = 5, sensitivity scores, neuron unit, γ = 0.5, β = 0.9.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch

from fedhet.client.curriculum import PACINGS, Pacing
from fedhet.client.curriculum import pacing as pacing_fraction
from fedhet.client.fisher import LAYER_SCORE_KINDS, LAYER_SCORES, SCORE_WITH, SPARSE_UNITS
from fedhet.model.lora import AdapterState, layer_index
from fedhet.protocol import ClientInfo, ClientUpdate, Instruction
from fedhet.strategies.base import Strategy, data_weights, require_nonempty, weighted_average

log = logging.getLogger(__name__)


def select_gal(
    reports: dict[int, torch.Tensor], weights: dict[int, float], layers: list[int], rho: float
) -> list[int]:
    """The top ⌈ρ·|layers|⌉ of ``layers`` by Σ_k w_k ŝ_k[l] / Σ_k w_k, where ŝ_k is
    client k's report normalised to sum 1 (ties to the lower layer; the lowest layers
    when no report carries weight); sorted."""
    total = torch.zeros(max(layers) + 1, dtype=torch.float64)
    weight_sum = 0.0
    for cid, scores in reports.items():
        w = weights.get(cid, 0.0)
        mass = float(scores.sum())
        if w <= 0 or mass <= 0:
            continue
        total += w * scores.double() / mass
        weight_sum += w
    k = max(1, math.ceil(rho * len(layers) - 1e-9))
    candidates = torch.tensor(sorted(layers))
    if weight_sum == 0:
        return candidates[:k].tolist()
    order = torch.argsort(-total[candidates], stable=True)
    return sorted(candidates[order[:k]].tolist())


class FibecFed(Strategy):
    """Fisher curriculum + global aggregation layers + sparse local update
    (see the module docstring)."""

    name = "fibecfed"
    keeps_local_state = True

    def __init__(
        self,
        curriculum: bool = True,
        p0: float = 0.3,
        pacing: Pacing = "linear",
        pacing_rounds: int | None = None,
        rescore_every: int | None = 10,
        score_with: Literal["fisher", "loss"] = "fisher",
        gal: bool = True,
        rho: float = 0.5,
        gal_every: int = 5,
        warmup_rounds: int = 1,
        layer_score: Literal["sensitivity", "fisher"] = "sensitivity",
        sparse: bool = True,
        sparse_unit: Literal["neuron", "layer"] = "neuron",
        gamma: float = 0.5,
        beta: float = 0.9,
    ) -> None:
        checks = {
            "p0 must be in (0, 1]": 0 < p0 <= 1,
            f"pacing must be one of {PACINGS}": pacing in PACINGS,
            "pacing_rounds must be >= 1": pacing_rounds is None or pacing_rounds >= 1,
            "rescore_every must be >= 1": rescore_every is None or rescore_every >= 1,
            f"score_with must be one of {SCORE_WITH}": score_with in SCORE_WITH,
            "rho must be in (0, 1]": 0 < rho <= 1,
            "gal_every must be >= 1": gal_every >= 1,
            "warmup_rounds must be >= 0": warmup_rounds >= 0,
            f"layer_score must be one of {LAYER_SCORE_KINDS}": layer_score in LAYER_SCORE_KINDS,
            f"sparse_unit must be one of {SPARSE_UNITS}": sparse_unit in SPARSE_UNITS,
            "gamma must be in (0, 1]": 0 < gamma <= 1,
            "beta must be in [0, 1)": 0 <= beta < 1,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"fibecfed: {'; '.join(failed)}")
        self.curriculum, self.p0, self.pacing = curriculum, p0, pacing
        self.pacing_rounds, self.rescore_every, self.score_with = (
            pacing_rounds, rescore_every, score_with
        )
        self.gal, self.rho, self.gal_every, self.layer_score = gal, rho, gal_every, layer_score
        self.warmup_rounds = warmup_rounds
        self.sparse, self.sparse_unit, self.gamma, self.beta = sparse, sparse_unit, gamma, beta
        self.selected: list[int] | None = None  # GAL; None = every layer (warm-up)
        self.selected_round = 0
        self.reports: dict[int, torch.Tensor] = {}
        self.report_weights: dict[int, float] = {}
        self.layers: list[int] = []

    # ------------------------------------------------------------- protocol
    def initialize(self, state: AdapterState, clients: list[ClientInfo]) -> AdapterState:
        self.layers = sorted({layer_index(k) for k in state})
        return super().initialize(state, clients)

    def global_layers(self) -> list[int]:
        """The layers aggregated now (all of them until GAL is first selected)."""
        return list(self.layers) if self.selected is None else list(self.selected)

    def curriculum_fraction(self, rnd: int) -> float:
        """p(t) of round ``rnd``: p0 in round 1, 1 from round T on (module docstring)."""
        horizon = self.pacing_rounds or self.horizon
        if horizon is None:
            raise ValueError("fibecfed: pacing_rounds is needed when the run length is unknown")
        return pacing_fraction(rnd - 1, self.p0, horizon - 1, self.pacing)

    def refreshes(self, rnd: int) -> bool:
        """Whether every client uploads all its layers in round ``rnd`` (a GAL
        selection round or the run's last round; module docstring)."""
        return self.selected is not None and (
            rnd == self.selected_round or rnd == self.horizon
        )

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        self._maybe_select(rnd)
        glob = set(self.global_layers())
        down = {k: v for k, v in state.items() if layer_index(k) in glob}
        up = sorted(state) if self.refreshes(rnd) else sorted(down)
        plan: dict[str, Any] = {"upload_keys": up, "score_momentum": self.beta}
        if self.curriculum:
            plan |= {
                "curriculum_fraction": self.curriculum_fraction(rnd),
                "rescore_every": self.rescore_every,
                "score_with": self.score_with,
            }
        if self.gal:
            plan["layer_score"] = self.layer_score
        if self.sparse:
            plan["sparse_layers"] = [i for i in self.layers if i not in glob or not self.gal]
            plan |= {"neuron_keep": self.gamma, "sparse_unit": self.sparse_unit}
        return [Instruction(cid, dict(down), dict(plan)) for cid in client_ids]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        if rnd > self.warmup_rounds:
            for u in updates:
                self._record_report(u)
        keys = sorted(state) if self.refreshes(rnd) else [
            k for k in state if layer_index(k) in set(self.global_layers())
        ]
        valid = [u for u in updates if self._carries(u, state, keys)]
        if not valid:
            log.warning("%s round %d: no valid update, global state unchanged", self.name, rnd)
            return state
        sent = [{k: u.state[k] for k in keys} for u in valid]
        averaged = weighted_average(sent, data_weights(valid))
        return {**state, **averaged}

    def evaluation_state(
        self, state: AdapterState, client_state: AdapterState | None = None
    ) -> AdapterState:
        """Global: the server's state (non-GAL layers as of the last refresh).
        Local: the client's own non-GAL layers under the global GAL layers."""
        if client_state is None:
            return state
        glob = set(self.global_layers())
        return {**state, **{k: v for k, v in client_state.items() if layer_index(k) not in glob}}

    # --------------------------------------------------------------- helpers
    def _maybe_select(self, rnd: int) -> None:
        if not self.gal or not self.reports or rnd <= self.warmup_rounds + 1:
            return
        if self.selected is not None and rnd - self.selected_round < self.gal_every:
            return
        self.selected = select_gal(self.reports, self.report_weights, self.layers, self.rho)
        self.selected_round = rnd
        log.info("%s round %d: global aggregation layers %s", self.name, rnd, self.selected)

    def _record_report(self, update: ClientUpdate) -> None:
        scores = update.extras.get(LAYER_SCORES)
        if scores is None:
            return
        n = (max(self.layers) + 1) if self.layers else 0
        ok = (
            isinstance(scores, torch.Tensor)
            and scores.shape == (n,)
            and bool(torch.isfinite(scores).all())
            and bool((scores >= 0).all())
        )
        if not ok:
            log.warning("%s: ignoring bad layer scores of client %d", self.name, update.client_id)
            return
        self.reports[update.client_id] = scores.detach().float().cpu()
        self.report_weights[update.client_id] = float(update.num_samples)

    def _carries(self, update: ClientUpdate, state: AdapterState, keys: list[str]) -> bool:
        ok = update.kind == "state" and all(
            k in update.state
            and update.state[k].shape == state[k].shape
            and bool(torch.isfinite(update.state[k]).all())
            for k in keys
        )
        if not ok:
            log.warning("%s: rejecting the update of client %d", self.name, update.client_id)
        return ok

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "selected_round": self.selected_round,
            "reports": dict(self.reports),
            "report_weights": dict(self.report_weights),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.selected = sd["selected"]
        self.selected_round = sd["selected_round"]
        self.reports = dict(sd["reports"])
        self.report_weights = dict(sd["report_weights"])
