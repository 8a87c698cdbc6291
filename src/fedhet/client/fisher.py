"""Fisher information on the client: sample difficulty, layer and neuron scores.

Everything here is computed from gradients of the loss w.r.t. the LoRA
parameters θ (all LoRA factors of the shared :class:`~fedhet.model.lora.LoraModel`,
trainable or not). Three statistics, used by FibecFed
(:mod:`fedhet.strategies.fibecfed`):

* **Sample difficulty** (curriculum): the trace of the diagonal empirical Fisher
  of sample i, d_i = Σ_θ (∂ℓ_i/∂θ)², ℓ_i the mean next-token NLL over the
  sample's response tokens. :func:`per_sample_fisher` computes the per-sample
  gradients of a whole chunk from one batched backward (each LoRA factor's
  inputs and output gradients), never one backward per sample.
* **Neuron scores** (sparse local update): for every LoRA factor, the Fisher
  mass of each row (a neuron: row j of B is output unit j, row i of A is rank
  component i), f_j = Σ_{θ ∈ row j} g_θ², smoothed over gradient observations by
  the momentum β: f ← β f + (1 − β) f_new (the first observation initialises).
* **Layer scores** (global aggregation layers, and the layer-granular sparse
  update): per transformer block l, the sensitivity s_l = Σ_{θ ∈ l} |θ · g_θ| or
  the Fisher mass m_l = Σ_{θ ∈ l} g_θ², both smoothed by the same momentum β.

A cheaper difficulty proxy, ``score_with="loss"``: d_i = ℓ_i, the sample's mean
NLL from one forward pass (no per-sample gradients). It costs a third of a Fisher
pass; how well it ranks samples like the Fisher trace (Spearman's ρ) is measured
by ``benchmarks/bench_fibecfed_scoring.py``.

Choices the paper leaves open:

* One gradient observation is the mean gradient g of one optimiser step's batch
  during local training (observed before masking and clipping, so masked neurons
  keep being scored), and of each chunk of ``batch_size`` samples in a scoring
  pass (the mean of that chunk's per-sample gradients): neuron and layer scores
  therefore use one estimator, the squared mini-batch gradient, everywhere.
* The scoring pass runs on the start state of a local update, in eval mode
  (no dropout); chunks are formed after sorting by length. Sequences are
  right-padded and attention is causal, so the pad tokens at the end never
  influence the loss: d_i equals (up to rounding) the value of a one-sample
  backward through the usual loss.
* Scores are computed once per client and cached (client state, below); a
  client rescores after ``rescore_every`` of its own local updates (None: never),
  counted in its cache, so a client that rarely takes part never pays twice. The
  pass's tokens are reported apart (``scoring_tokens``); the virtual clock
  charges a Fisher pass as a forward and a backward through every block, a loss
  pass as a forward (:mod:`fedhet.runtime.cost`).
* Warm-up: in a block whose LoRA B factors are all zero (LoRA's initial adapter,
  or a block a client has never trained) a gradient carries no layer or A-neuron
  signal (θ_B = 0 makes θ_B·g_B = 0 and ∂L/∂A ∝ B = 0), so such blocks are
  skipped in that observation; a client's first local update from the initial
  adapter therefore scores layers from its optimiser steps after the first
  (B ≠ 0). Only observed blocks move; a block never observed scores NaN (reported
  as 0, ranked first for training), so a frozen block keeps its score rather
  than decaying toward 0. Sample difficulties are still computed at B = 0 when a
  client first scores there: the Fisher trace then covers only ∂ℓ_i/∂B, which
  ``benchmarks/bench_fibecfed_scoring.py`` finds unrelated to the sample's loss
  (the paper's choice; ``score_with="loss"`` does not have this blind spot).

The smoothed statistics are client state: they live in the client's cache (a
plain dict the runtime keeps per client and checkpoints, see
:mod:`fedhet.runtime.sim`), under the keys ``difficulty`` (tensor [n]),
``neuron`` (key → tensor [rows]), ``layer_sensitivity`` and ``layer_fisher``
(tensors [num_layers]), all on the CPU between updates, and the counters
``updates`` (local updates run) and ``scored_at`` (the update that last scored).

Sparse local update (``sparse_layers``, γ = ``neuron_keep``), two granularities:

* ``sparse_unit="neuron"`` (the paper's): in each sparse layer the top γ rows of
  every factor by neuron score train, the others are masked (their gradient
  zeroed before the step, their values restored after it; their AdamW moments
  stay zero but are allocated with the tensor: freezing single rows outright
  would mean splitting PEFT's factors per row). This saves no compute: the
  activation gradients still flow through the layer to the ones below, and
  LoRA's weight gradients are a few percent of a backward pass; the cost model
  charges the full backward, which is the work done.
* ``sparse_unit="layer"``: of the sparse layers, the top ⌈γ·n⌉ by the client's
  smoothed layer score (``layer_score``, Fisher mass when none is asked) train
  and the others are frozen: no ``requires_grad``, no gradient, no optimiser
  state, and autograd stops below the lowest trainable block, which is what the
  cost model charges (``lowest_layer`` in the metrics). Without layer scores yet
  every layer trains.

:class:`FisherSession` is what :func:`fedhet.client.train.local_update` calls:
it reads the plan's fields (``curriculum_fraction``, ``rescore_every``,
``score_with``, ``layer_score``, ``sparse_layers``, ``sparse_unit``,
``neuron_keep``, ``score_momentum``),
scores, picks the curriculum subset, builds the neuron masks, observes every
optimiser step and reports the layer scores in ``extras["layer_scores"]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedhet.client.curriculum import easiest
from fedhet.client.loss import target_nll
from fedhet.data.encode import Example, collate
from fedhet.model.lora import AdapterState, LoraModel, is_lora_a, layer_index

if TYPE_CHECKING:
    from fedhet.client.train import TrainPlan

LAYER_SCORES = "layer_scores"
"""Key of the per-layer scores (tensor [num_layers]) in an update's extras."""

LAYER_SCORE_KINDS = ("sensitivity", "fisher")
SCORE_WITH = ("fisher", "loss")
SPARSE_UNITS = ("neuron", "layer")

Grads = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------
# Per-sample Fisher traces
# ---------------------------------------------------------------------------


def per_sample_fisher(
    lm: LoraModel,
    examples: Sequence[Example],
    *,
    pad_id: int,
    batch_size: int = 8,
    observe: Callable[[Grads], None] | None = None,
) -> torch.Tensor:
    """d_i = Σ_θ (∂ℓ_i/∂θ)² over all LoRA parameters θ of ``lm`` for each example,
    at the model's current adapter (a float32 CPU tensor [n], in example order).

    Examples are sorted by length and cut into chunks of ``batch_size``; each chunk
    takes one forward and one backward of Σ_i ℓ_i. A LoRA factor is a linear map
    y = W x, so sample i's gradient is exactly G_i = Σ_t (∂ℓ_i/∂y_{i,t}) x_{i,t}ᵀ from
    the factor's inputs and output gradients at its own tokens (each sample's
    loss reaches only its own row; right padding after a causal model's tokens
    gets zero output gradient), the per-example trick of Goodfellow (2015,
    arXiv:1510.01799). When given, ``observe`` receives each chunk's mean gradient
    by adapter key.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params = lm.parameters()
    owner = {id(p): key for key, p in params.items()}
    factors = {
        owner[id(m.weight)]: m
        for m in lm.model.modules()
        if isinstance(m, torch.nn.Linear) and id(m.weight) in owner
    }
    missing = sorted(set(params) - set(factors))
    if missing:
        raise ValueError(f"per_sample_fisher: LoRA factors not in a linear layer: {missing[:2]}")
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(key: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor):
            seen[key] = (args[0].detach(), out)

        return hook

    device = next(iter(params.values())).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros(len(examples), dtype=torch.float32, device=device)
    wanted = {key: p.requires_grad for key, p in params.items()}
    handles = [m.register_forward_hook(keep(key)) for key, m in factors.items()]
    try:
        for p in params.values():
            p.requires_grad_(True)  # so autograd reaches every factor, trainable or not
        with _scoring_mode(lm.model):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                seen.clear()
                batch = collate([examples[i] for i in idx], pad_id).to(device)
                nll, rows = target_nll(lm.model, batch)
                total = torch.zeros(len(idx), device=device).index_add(0, rows, nll)
                count = torch.zeros(len(idx), device=device).index_add_(
                    0, rows, torch.ones_like(nll)
                )
                keys = list(seen)
                outs = torch.autograd.grad(
                    (total / count.clamp(min=1)).sum(), [seen[k][1] for k in keys]
                )
                chunk = {
                    k: torch.einsum("bto,bti->boi", g.float(), seen[k][0].float())
                    for k, g in zip(keys, outs, strict=True)
                }
                trace = sum(g.pow(2).flatten(1).sum(1) for g in chunk.values())
                out[torch.tensor(idx, device=device)] = trace
                if observe is not None:
                    observe({k: g.mean(0) for k, g in chunk.items()})
    finally:
        for handle in handles:
            handle.remove()
        for key, p in params.items():
            p.requires_grad_(wanted[key])
        seen.clear()
    return out.cpu()


@contextlib.contextmanager
def _scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration of a scoring pass."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def per_sample_loss(
    lm: LoraModel, examples: Sequence[Example], *, pad_id: int, batch_size: int = 8
) -> torch.Tensor:
    """d_i = ℓ_i, each example's mean NLL over its response tokens at the model's
    current adapter (one forward pass, eval mode; a float32 CPU tensor [n] in
    example order): the cheap difficulty proxy (module docstring)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros(len(examples), dtype=torch.float32)
    device = next(lm.model.parameters()).device
    with _scoring_mode(lm.model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            nll, rows = target_nll(lm.model, collate([examples[i] for i in idx], pad_id).to(device))
            total = torch.zeros(len(idx), device=device).index_add_(0, rows, nll.float())
            count = torch.zeros(len(idx), device=device).index_add_(0, rows, torch.ones_like(nll))
            out[torch.tensor(idx)] = (total / count.clamp(min=1)).cpu()
    return out


# ---------------------------------------------------------------------------
# Smoothed neuron and layer scores
# ---------------------------------------------------------------------------


def untrained_layers(theta: Grads) -> set[int]:
    """The blocks whose LoRA B factors in ``theta`` are all zero (as at LoRA's
    initial adapter): a gradient taken there carries no layer or A-neuron signal."""
    nonzero: dict[int, bool] = {}
    for key, value in theta.items():
        if not is_lora_a(key):
            layer = layer_index(key)
            nonzero[layer] = nonzero.get(layer, False) or bool(value.detach().any())
    return {layer for layer, any_nonzero in nonzero.items() if not any_nonzero}


class ScoreTracker:
    """Momentum-smoothed neuron Fisher scores and layer scores (module docstring)."""

    def __init__(self, num_layers: int, momentum: float, cache: Mapping[str, Any] | None = None):
        if not 0 <= momentum < 1:
            raise ValueError(f"score_momentum must be in [0, 1), got {momentum}")
        self.num_layers = num_layers
        self.momentum = momentum
        cache = cache or {}
        self.neuron: dict[str, torch.Tensor] = dict(cache.get("neuron", {}))
        self.layer: dict[str, torch.Tensor | None] = {
            kind: cache.get(f"layer_{kind}") for kind in LAYER_SCORE_KINDS
        }

    def _ema(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        if old is None or old.shape != new.shape:
            return new
        return self.momentum * old.to(new.device) + (1 - self.momentum) * new

    @torch.no_grad()
    def observe(self, theta: Grads, grads: Grads) -> None:
        """One gradient observation: ``grads`` by adapter key (keys absent are
        skipped), ``theta`` the parameter values they were taken at. Only the
        layers observed move: those with a gradient here whose B is not all zero
        (warm-up, module docstring); a layer never observed scores NaN (frozen
        layers keep their score instead of decaying)."""
        untrained = untrained_layers(theta)
        grads = {k: g for k, g in grads.items() if layer_index(k) not in untrained}
        some = next(iter(grads.values()), None)
        if some is None:
            return
        sens = torch.zeros(self.num_layers, device=some.device)
        mass = torch.zeros(self.num_layers, device=some.device)
        seen = torch.zeros(self.num_layers, dtype=torch.bool, device=some.device)
        for key, g in grads.items():
            g = g.detach().float()
            sq = g.pow(2)
            self.neuron[key] = self._ema(self.neuron.get(key), sq.sum(1))
            layer = layer_index(key)
            seen[layer] = True
            mass[layer] += sq.sum()
            sens[layer] += (theta[key].detach().float() * g).abs().sum()
        for kind, new in (("sensitivity", sens), ("fisher", mass)):
            old = self.layer[kind]
            if old is None or old.shape != new.shape:
                old = torch.full_like(new, float("nan"))
            old = old.to(new.device)
            blended = torch.where(old.isnan(), new, self._ema(old, new))
            self.layer[kind] = torch.where(seen, blended, old)

    def save(self, cache: dict[str, Any]) -> None:
        """Write the smoothed scores into the client cache (on the CPU)."""
        cache["neuron"] = {k: v.cpu() for k, v in self.neuron.items()}
        for kind, value in self.layer.items():
            if value is not None:
                cache[f"layer_{kind}"] = value.cpu()


def neuron_masks(
    scores: Mapping[str, torch.Tensor],
    state: AdapterState,
    layers: Sequence[int],
    keep: float,
) -> dict[str, torch.Tensor]:
    """Masks (True = trainable) at the state's shapes for the LoRA factors of
    ``layers``: the ⌈keep·rows⌉ rows with the highest scores (ties to the lower
    row). Factors without a score yet get no mask (all trainable)."""
    if not 0 < keep <= 1:
        raise ValueError(f"neuron_keep must be in (0, 1], got {keep}")
    wanted = set(layers)
    masks: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if layer_index(key) not in wanted or key not in scores:
            continue
        rows = tensor.shape[0]
        score = scores[key][:rows].float().cpu()
        if score.numel() != rows:
            continue
        top = torch.argsort(-score, stable=True)[: max(1, math.ceil(keep * rows - 1e-9))]
        mask = torch.zeros(tensor.shape, dtype=torch.bool)
        mask[top] = True
        masks[key] = mask
    return masks


# ---------------------------------------------------------------------------
# The session a local update runs
# ---------------------------------------------------------------------------


class FisherSession:
    """FibecFed's client side of one local update (see the module docstring).

    Build it with :meth:`start` (None when the plan asks for nothing); then use
    :attr:`indices` (the examples to train on), :attr:`masks` (the plan's masks
    combined with the neuron masks by logical and), :attr:`frozen_layers` (the
    sparse layers frozen whole), call :meth:`observe` after each optimiser
    step's backward, and :meth:`finish` at the end (saves the cache, returns the
    update's extras). :attr:`tokens` counts the scoring pass's tokens.
    """

    def __init__(self, lm: LoraModel, tracker: ScoreTracker, cache: dict[str, Any]) -> None:
        self.lm = lm
        self.tracker = tracker
        self.cache = cache
        self.indices: Sequence[int] | None = None
        self.masks: dict[str, torch.Tensor] | None = None
        self.frozen_layers: list[int] = []
        self.tokens = 0
        self.layer_score: str | None = None

    @classmethod
    def start(
        cls,
        lm: LoraModel,
        examples: Sequence[Example],
        start: AdapterState,
        plan: TrainPlan,
        cache: dict[str, Any] | None,
        *,
        pad_id: int,
    ) -> FisherSession | None:
        """Score (when the curriculum needs scores the cache lacks or holds for
        ``rescore_every`` updates), pick the curriculum subset, build the neuron
        masks or choose the frozen layers; ``lm`` holds ``start``."""
        wanted = (
            plan.curriculum_fraction is not None
            or plan.layer_score is not None
            or plan.sparse_layers is not None
        )
        if not wanted:
            return None
        checks = {
            "layer_score": (plan.layer_score, (None, *LAYER_SCORE_KINDS)),
            "score_with": (plan.score_with, SCORE_WITH),
            "sparse_unit": (plan.sparse_unit, SPARSE_UNITS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if plan.curriculum_fraction is not None and plan.sample_indices is not None:
            raise ValueError("curriculum_fraction and sample_indices are exclusive")
        cache = {} if cache is None else cache
        session = cls(lm, ScoreTracker(lm.num_layers, plan.score_momentum, cache), cache)
        session.layer_score = plan.layer_score
        updates = cache.get("updates", 0)
        cache["updates"] = updates + 1
        if plan.curriculum_fraction is not None:
            if _needs_scores(cache, len(examples), updates, plan.rescore_every):
                cache["difficulty"] = session._score(examples, plan, pad_id)
                cache["scored_at"] = updates
            session.indices = easiest(cache["difficulty"], plan.curriculum_fraction)
        else:
            session.indices = plan.sample_indices
        neuron: dict[str, torch.Tensor] = {}
        if plan.sparse_layers is not None and plan.sparse_unit == "neuron":
            neuron = neuron_masks(
                session.tracker.neuron, start, plan.sparse_layers, plan.neuron_keep
            )
        elif plan.sparse_layers is not None:
            scores = session.tracker.layer[plan.layer_score or "fisher"]
            session.frozen_layers = frozen_layers(scores, plan.sparse_layers, plan.neuron_keep)
        session.masks = _combine(plan.masks, neuron)
        return session

    def _score(self, examples: Sequence[Example], plan: TrainPlan, pad_id: int) -> torch.Tensor:
        """Difficulty scores of every example (Fisher trace or loss proxy); counts
        the pass's tokens; a Fisher pass also feeds the smoothed scores."""
        self.tokens = sum(len(e.input_ids) for e in examples)
        if plan.score_with == "loss":
            return per_sample_loss(self.lm, examples, pad_id=pad_id, batch_size=plan.batch_size)
        theta = self.lm.parameters()
        return per_sample_fisher(
            self.lm,
            examples,
            pad_id=pad_id,
            batch_size=plan.batch_size,
            observe=lambda g: self.tracker.observe(theta, g),
        )

    def observe(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Observe the accumulated gradients of the trainable parameters."""
        grads = {k: p.grad for k, p in params.items() if p.grad is not None}
        self.tracker.observe(params, grads)

    def finish(self) -> dict[str, Any]:
        """Save the smoothed scores to the cache; the extras to report."""
        self.tracker.save(self.cache)
        if self.layer_score is None or self.tracker.layer[self.layer_score] is None:
            return {}
        # a layer this client never observed reports 0 (no evidence for it)
        return {LAYER_SCORES: self.tracker.layer[self.layer_score].nan_to_num(0.0).cpu()}


def _needs_scores(
    cache: Mapping[str, Any], n: int, updates: int, rescore_every: int | None
) -> bool:
    """Whether a client scores now: no scores for its ``n`` examples yet, or its
    scores are ``rescore_every`` of its own local updates old."""
    difficulty = cache.get("difficulty")
    if difficulty is None or difficulty.numel() != n:
        return True
    return rescore_every is not None and updates - cache.get("scored_at", 0) >= rescore_every


def frozen_layers(
    scores: torch.Tensor | None, layers: Sequence[int], keep: float
) -> list[int]:
    """The layer-granular sparse update: of ``layers``, all but the top
    ⌈keep·n⌉ by ``scores`` (ties to the lower layer; a layer never observed, NaN,
    counts as the top), sorted; none without scores."""
    if not 0 < keep <= 1:
        raise ValueError(f"neuron_keep must be in (0, 1], got {keep}")
    if scores is None or not layers:
        return []
    candidates = sorted(layers)
    ranked = scores.float().cpu().nan_to_num(float("inf"))[candidates]
    order = torch.argsort(-ranked, stable=True)
    kept = {candidates[i] for i in order[: max(1, math.ceil(keep * len(candidates) - 1e-9))]}
    return [layer for layer in candidates if layer not in kept]


def _combine(
    plan_masks: Mapping[str, torch.Tensor] | None, extra: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """Plan masks and neuron masks together (logical and where both exist)."""
    out = dict(plan_masks or {})
    for key, mask in extra.items():
        out[key] = mask if key not in out else out[key].bool() & mask
    return out or None

