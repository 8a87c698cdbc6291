"""The local update: one client's training, in plain PyTorch.

A client update knows nothing of the strategy or runtime that called it. It
gets a starting adapter state and a :class:`TrainPlan`, trains, and returns the
new state (or its delta) and metrics. Read :func:`local_update` top to bottom:
load → choose trainable tensors → loop (forward, loss terms, backward, mask,
clip, step) → read the state back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal

import torch

from fedhet.client.fisher import FisherSession
from fedhet.client.loss import target_nll
from fedhet.data.encode import Batch, Example, batches
from fedhet.model.lora import AdapterState, LoraModel, factor_keys, layer_index, ranks
from fedhet.protocol import ClientUpdate, Instruction


@dataclass
class TrainPlan:
    """Everything a local update needs besides the data and the start state.

    Attributes:
        steps: optimiser steps (each of ``grad_accum`` micro-batches).
        batch_size: examples per micro-batch.
        lr, schedule, warmup_steps: AdamW learning rate and its schedule
            (``constant``, ``linear`` or ``cosine`` decay to 0 after warm-up).
        weight_decay: AdamW decoupled weight decay (0: LoRA's usual choice).
        grad_accum: micro-batches per step.
        max_grad_norm: global gradient-norm clip (None: no clipping).
        prox_mu: FedProx term (μ/2)·||θ − θ_start||² over trainable LoRA tensors.
        trainable_layers: transformer blocks whose LoRA tensors train (None: all).
        frozen: factor names kept fixed (``"lora_A"`` for FFA-LoRA).
        masks: key → bool tensor (True = trainable) of the parameter's shape, at
            the state's rank; masked entries never change.
        rank_reg: HetLoRA's self-pruning regulariser (λ, γ): adds
            λ·||B[:, ⌊γr⌋:]||·||A[⌊γr⌋:, :]|| per module.
        sample_indices: which local examples to use, in this order of
            preference (a curriculum's subset); None = all.
        send: return the trained ``state`` or the ``delta`` from the start.
        upload_keys: keys to return (None = all).
        seed: seeds batching order and dropout.
        curriculum_fraction, rescore_every, score_with, layer_score,
            sparse_layers, sparse_unit, neuron_keep, score_momentum: Fisher-based
            client work (FibecFed): train on the easiest fraction of the examples
            (scored once, by Fisher trace or loss, again after ``rescore_every`` of
            the client's updates), report layer scores, keep only the top
            ``neuron_keep`` neurons (or layers) of ``sparse_layers`` trainable,
            smoothing scores with ``score_momentum``; see :mod:`fedhet.client.fisher`.
    """

    steps: int = 4
    batch_size: int = 4
    lr: float = 3e-4
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    prox_mu: float = 0.0
    trainable_layers: Sequence[int] | None = None
    frozen: Sequence[str] = ()
    masks: Mapping[str, torch.Tensor] | None = None
    rank_reg: tuple[float, float] | None = None
    sample_indices: Sequence[int] | None = None
    send: Literal["state", "delta"] = "state"
    upload_keys: Sequence[str] | None = None
    seed: int = 0
    curriculum_fraction: float | None = None
    rescore_every: int | None = None
    score_with: Literal["fisher", "loss"] = "fisher"
    layer_score: Literal["sensitivity", "fisher"] | None = None
    sparse_layers: Sequence[int] | None = None
    sparse_unit: Literal["neuron", "layer"] = "neuron"
    neuron_keep: float = 0.5
    score_momentum: float = 0.9

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainPlan:
        """A copy with a strategy's overrides applied (unknown names rejected)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown training-plan fields: {sorted(unknown)}")
        return TrainPlan(**{**{n: getattr(self, n) for n in names}, **overrides})


@dataclass
class UpdateResult:
    """The output of a local update: the full trained adapter and metrics
    (what is sent is :func:`make_upload` of it)."""

    state: AdapterState
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    """Method statistics for the server (:attr:`ClientUpdate.extras`)."""


def local_update(
    lm: LoraModel,
    examples: Sequence[Example],
    start: AdapterState,
    plan: TrainPlan,
    *,
    pad_id: int,
    cache: dict[str, Any] | None = None,
) -> UpdateResult:
    """Train ``lm`` from ``start`` on ``examples`` following ``plan``; ``cache`` is
    the client's own state kept between updates (Fisher scores)."""
    device = next(lm.model.parameters()).device
    torch.manual_seed(plan.seed)
    lm.load_state(start)
    start_ranks = ranks(start)
    fisher = FisherSession.start(lm, examples, start, plan, cache, pad_id=pad_id)
    layers = plan.trainable_layers
    if fisher and fisher.frozen_layers:
        kept = range(lm.num_layers) if layers is None else layers
        layers = [layer for layer in kept if layer not in fisher.frozen_layers]
    params = lm.set_trainable(layers, plan.frozen)
    anchor = {k: p.detach().clone() for k, p in params.items()} if plan.prox_mu else {}
    masks = place_masks(fisher.masks if fisher else plan.masks, params, device)
    frozen_copy = {k: params[k].detach().clone() for k in masks}

    optimizer = torch.optim.AdamW(params.values(), lr=plan.lr, weight_decay=plan.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(plan))
    indices = fisher.indices if fisher else plan.sample_indices
    data = list(examples) if indices is None else [examples[i] for i in indices]
    stream = batch_stream(data, plan.batch_size, plan.seed, pad_id)
    use_bf16 = device.type == "cuda"
    clip = None
    if plan.max_grad_norm is not None:
        clip = partial(torch.nn.utils.clip_grad_norm_, list(params.values()), plan.max_grad_norm)

    lm.model.train()
    loss_sum = torch.zeros((), device=device)
    step_losses = []  # each step's summed micro-batch losses (first and last are reported)
    tokens = 0
    started = time.perf_counter()
    for _ in range(plan.steps):
        step_loss = torch.zeros((), device=device)
        for _ in range(plan.grad_accum):
            batch = next(stream).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = target_nll(lm.model, batch)[0].mean()
            step_loss += loss.detach()
            if plan.prox_mu:
                loss = loss + 0.5 * plan.prox_mu * sum(
                    (p - anchor[k]).pow(2).sum() for k, p in params.items()
                )
            if plan.rank_reg is not None:
                loss = loss + _rank_regulariser(params, start_ranks, *plan.rank_reg)
            (loss / plan.grad_accum).backward()
            tokens += batch.num_tokens
        loss_sum += step_loss
        step_losses.append(step_loss)
        if fisher:
            fisher.observe(params)
        masked_step(params, masks, frozen_copy, optimizer, scheduler, clip)
    lm.model.eval()
    seconds = time.perf_counter() - started

    state = lm.state({m: start_ranks.get(m, lm.rank) for m in lm.modules})
    micro_batches = max(1, plan.steps * plan.grad_accum)
    return UpdateResult(
        state,
        {
            "train_loss": float(loss_sum) / micro_batches,
            "first_loss": float(step_losses[0]) / plan.grad_accum if step_losses else 0.0,
            "last_loss": float(step_losses[-1]) / plan.grad_accum if step_losses else 0.0,
            "tokens": float(tokens),
            "scoring_tokens": float(fisher.tokens if fisher else 0),
            "lowest_layer": float(min((layer_index(k) for k in params), default=lm.num_layers)),
            "steps": float(plan.steps),
            "seconds": seconds,
            "num_samples": float(len(data)),
        },
        fisher.finish() if fisher else {},
    )


def masked_step(
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    frozen: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    clip: Callable[[], object] | None,
) -> None:
    """One optimiser step: zero the masked gradients, ``clip``, step AdamW and the
    schedule, then put the masked entries back to their ``frozen`` values (AdamW's
    weight decay and momentum would move them otherwise)."""
    for key, mask in masks.items():
        if params[key].grad is not None:
            params[key].grad.mul_(mask)
    if clip is not None:
        clip()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for key, mask in masks.items():
            params[key].copy_(torch.where(mask, params[key], frozen[key]))


def make_upload(trained: AdapterState, start: AdapterState, plan: TrainPlan) -> AdapterState:
    """What the client sends: the trained state or its delta from ``start``,
    restricted to ``plan.upload_keys``."""
    keys = list(trained) if plan.upload_keys is None else list(plan.upload_keys)
    if plan.send == "delta":
        return {k: trained[k] - start[k] for k in keys}
    return {k: trained[k] for k in keys}


def run_instruction(
    lm: LoraModel,
    examples: Sequence[Example],
    inst: Instruction,
    base: AdapterState,
    base_plan: TrainPlan,
    *,
    seed: int,
    pad_id: int,
    cache: dict[str, Any] | None = None,
) -> tuple[ClientUpdate, AdapterState, TrainPlan]:
    """One client's local update as every runtime runs it (the simulator and the
    Flower ClientApp): start from the instruction's tensors over ``base`` (the
    client's own last state, or the initial adapter), apply the plan overrides and
    ``seed``, train (``cache``: the client's own cache, kept between its updates),
    and build the upload. Returns (update, full trained state, plan)."""
    start, plan = instruction_plan(inst, base, base_plan, seed)
    result = local_update(lm, examples, start, plan, pad_id=pad_id, cache=cache)
    return build_update(inst, len(examples), start, plan, result), result.state, plan


def instruction_plan(
    inst: Instruction, base: AdapterState, base_plan: TrainPlan, seed: int
) -> tuple[AdapterState, TrainPlan]:
    """The start state (the instruction's tensors over ``base``) and the plan (the
    run's, with the instruction's overrides and ``seed``) of an instruction."""
    return {**base, **inst.state}, base_plan.with_overrides({**inst.plan, "seed": seed})


def build_update(
    inst: Instruction, num_samples: int, start: AdapterState, plan: TrainPlan, result: UpdateResult
) -> ClientUpdate:
    """What the client sends back for ``inst`` after training (:func:`make_upload`)."""
    return ClientUpdate(
        client_id=inst.client_id,
        state=make_upload(result.state, start, plan),
        num_samples=num_samples,
        version=inst.version,
        kind=plan.send,
        metrics=result.metrics,
        extras=result.extras,
    )


def batch_stream(
    data: Sequence[Example], batch_size: int, seed: int, pad_id: int
) -> Iterator[Batch]:
    """Endless batches: epoch after epoch, each shuffled with its own seed."""
    if not data:
        raise ValueError("local update with no training examples")
    epoch = 0
    while True:
        yield from batches(data, batch_size, seed=seed * 1_000_003 + epoch, pad_id=pad_id)
        epoch += 1


def lr_lambda(plan: TrainPlan):
    def factor(step: int) -> float:
        if step < plan.warmup_steps:
            return (step + 1) / plan.warmup_steps
        if plan.schedule == "constant":
            return 1.0
        progress = (step - plan.warmup_steps) / max(1, plan.steps - plan.warmup_steps)
        if plan.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def place_masks(
    masks: Mapping[str, torch.Tensor] | None,
    params: Mapping[str, torch.nn.Parameter],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Masks padded (with False) to the allocated shape of each parameter."""
    placed: dict[str, torch.Tensor] = {}
    for key, mask in (masks or {}).items():
        if key not in params:
            continue
        full = torch.zeros(params[key].shape, dtype=torch.bool, device=device)
        full[tuple(slice(0, s) for s in mask.shape)] = mask.to(device=device, dtype=torch.bool)
        placed[key] = full
    return placed


def _rank_regulariser(
    params: Mapping[str, torch.nn.Parameter],
    start_ranks: Mapping[str, int],
    lam: float,
    gamma: float,
) -> torch.Tensor:
    """HetLoRA: Σ_modules λ·||B[:, ⌊γr⌋:r]||_F · ||A[⌊γr⌋:r, :]||_F."""
    total = torch.zeros((), device=next(iter(params.values())).device)
    for mod, r in start_ranks.items():
        a_key, b_key = factor_keys(mod)
        if a_key not in params or b_key not in params:
            continue
        cut = math.floor(gamma * r)
        if cut >= r:
            continue
        a, b = params[a_key], params[b_key]
        total = total + lam * b[:, cut:r].norm() * a[cut:r].norm()
    return total
