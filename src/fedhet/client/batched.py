"""Lockstep local training: several clients' updates in one forward pass.

The clients of a group start at the same time (a synchronous round, a
hierarchical stage, the asynchronous clients dispatched together at the start)
and follow compatible plans (:func:`compatible`). Each step concatenates every client's
micro-batch into one batch (right-padded to the longest sequence) and runs the
one shared base model once. Each sample is routed through its own client's LoRA
factors: for a target module with input x_n of sample n, owned by client c(n),

    y_n = W x_n + s_{c(n)} · B_{c(n)} A_{c(n)} x_n

computed for all samples at once as two batched matmuls over the factors
gathered per sample (the PEFT adapter is switched off meanwhile: W x_n is the
base layer, the sum is added by a forward hook). Client c's loss is its own
samples' token-mean negative log-likelihood, exactly what it would be alone;
the step minimises Σ_c L_c, whose gradient with respect to client c's factors
is ∂L_c (no sample of c touches another client's factors). The factors of all
clients are stacked ``[G, …]`` leaf tensors; AdamW is element-wise, so one
optimizer over the stacks is G independent optimizers; gradient clipping uses
each client's own norm; masks (frozen entries) are applied per client.

Exactness: every client ends with the adapter that :func:`~fedhet.client.train.
local_update` gives it alone, up to floating-point reduction order (the base
model's matmuls run on a different batch shape). Ranks may differ: every client
is held at the allocated rank with zeros beyond its own (as the sequential path
does), which stay zero. Not batched (the caller falls back to the sequential
path, :func:`compatible` says why): dropout in LoRA or the base model (its random
masks), FedProx
and HetLoRA's regulariser terms, FibecFed's Fisher scoring and curriculum, and
plans that differ in anything but their data, seed, masks and start state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch

from fedhet.client.loss import target_nll
from fedhet.client.train import (
    TrainPlan,
    UpdateResult,
    batch_stream,
    lr_lambda,
    masked_step,
    place_masks,
)
from fedhet.data.encode import IGNORE_INDEX, Batch, Example
from fedhet.model.lora import AdapterState, LoraModel, factor_keys, ranks

_PER_CLIENT = {"seed", "masks", "sample_indices", "upload_keys", "send"}
"""Plan fields that may differ between the clients of a group."""


@dataclass
class ClientJob:
    """One client's local update: its examples, start state and plan."""

    examples: Sequence[Example]
    start: AdapterState
    plan: TrainPlan


def compatible(lm: LoraModel, plans: Sequence[TrainPlan]) -> str | None:
    """``None`` when these plans can train in lockstep, else the reason they cannot."""
    first = plans[0]
    if lm.spec.dropout > 0:
        return "lora.dropout > 0 (random masks differ from a client's own)"
    config = lm.model.get_base_model().config
    rates = [getattr(config, name, 0.0) or 0.0 for name in ("attention_dropout", "hidden_dropout")]
    rates += [m.p for m in lm.model.modules() if isinstance(m, torch.nn.Dropout)]
    if any(rate > 0 for rate in rates):
        return "the base model uses dropout (random masks differ from a client's own)"
    for plan in plans:
        if plan.prox_mu or plan.rank_reg is not None:
            return "a proximal or rank-regulariser term"
        if plan.curriculum_fraction is not None or plan.layer_score:
            return "Fisher scoring (FibecFed)"
        if plan.sparse_layers is not None:
            return "Fisher-selected sparse layers (FibecFed)"
        shared = [f.name for f in fields(TrainPlan) if f.name not in _PER_CLIENT]
        if any(_normal(getattr(plan, n)) != _normal(getattr(first, n)) for n in shared):
            return "plans that differ in steps, schedule, layers or optimiser settings"
    return None


def _normal(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple | range) else value


def lockstep_updates(
    lm: LoraModel, jobs: Sequence[ClientJob], *, pad_id: int
) -> list[UpdateResult]:
    """Train every job's client in one loop (module docstring); one result per job,
    as :func:`~fedhet.client.train.local_update` returns it. The plans must be
    :func:`compatible`."""
    reason = compatible(lm, [j.plan for j in jobs])
    if reason is not None:
        raise ValueError(f"lockstep training: {reason}")
    lm.restore_base()  # jobs carry no base delta (the simulator runs those one by one)
    plan = jobs[0].plan
    device = next(lm.model.parameters()).device
    G = len(jobs)
    start_ranks = [ranks(j.start) for j in jobs]
    for j, r in zip(jobs, start_ranks, strict=True):
        unknown = set(j.start) - set(lm.keys)
        if unknown or any(v > lm.rank for v in r.values()):
            raise ValueError(f"lockstep training: keys {sorted(unknown)[:3]} or ranks {r} "
                             f"do not fit the model (allocated rank {lm.rank})")
    stacks, scaling = _stack(lm, jobs, start_ranks, device)
    trainable = lm.set_trainable(plan.trainable_layers, plan.frozen)
    for key, stack in stacks.items():
        stack.requires_grad_(key in trainable)
    params = {k: s for k, s in stacks.items() if s.requires_grad}
    masks = _stacked_masks(jobs, params, device)
    frozen_copy = {k: params[k].detach().clone() for k in masks}
    optimizer = torch.optim.AdamW(params.values(), lr=plan.lr, weight_decay=plan.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(plan))
    streams = []
    for j in jobs:
        data = j.examples if j.plan.sample_indices is None else [
            j.examples[i] for i in j.plan.sample_indices
        ]
        streams.append(batch_stream(list(data), j.plan.batch_size, j.plan.seed, pad_id))
    use_bf16 = device.type == "cuda"
    clip = None
    if plan.max_grad_norm is not None:
        clip = partial(_clip_per_client, params, plan.max_grad_norm)

    loss_sums = torch.zeros(G, device=device)
    step_losses = []  # per step, each client's summed micro-batch losses (first, last reported)
    tokens = [0] * G
    owner = torch.zeros(0, dtype=torch.long)
    hooks = _route(lm, stacks, scaling, lambda: owner)
    started = time.perf_counter()
    lm.model.train()
    try:
        with lm.model.disable_adapter():
            for _ in range(plan.steps):
                step_loss = torch.zeros(G, device=device)
                for _ in range(plan.grad_accum):
                    parts = [next(s) for s in streams]
                    for c, b in enumerate(parts):
                        tokens[c] += b.num_tokens
                    batch, owner_cpu = _concat(parts, pad_id)
                    batch = batch.to(device)
                    owner = owner_cpu.to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        nll, rows = target_nll(lm.model, batch)
                    per_client = _client_means(nll, owner[rows], G)
                    step_loss += per_client.detach()
                    (per_client.sum() / plan.grad_accum).backward()
                loss_sums += step_loss
                step_losses.append(step_loss)
                masked_step(params, masks, frozen_copy, optimizer, scheduler, clip)
    finally:
        for hook in hooks:
            hook.remove()
        lm.model.eval()
    seconds = (time.perf_counter() - started) / G
    micro_batches = max(1, plan.steps * plan.grad_accum)
    results = []
    for c, j in enumerate(jobs):
        state: AdapterState = {}
        for mod in lm.modules:
            a_key, b_key = factor_keys(mod)
            r = start_ranks[c].get(mod, lm.rank)
            state[a_key] = stacks[a_key][c, :r].detach().to("cpu", copy=True)
            state[b_key] = stacks[b_key][c, :, :r].detach().to("cpu", copy=True)
        n_data = len(j.examples) if j.plan.sample_indices is None else len(j.plan.sample_indices)
        metrics = {
            "train_loss": float(loss_sums[c]) / micro_batches,
            "first_loss": float(step_losses[0][c]) / plan.grad_accum if step_losses else 0.0,
            "last_loss": float(step_losses[-1][c]) / plan.grad_accum if step_losses else 0.0,
            "tokens": float(tokens[c]),
            "steps": float(plan.steps),
            "seconds": seconds,
            "num_samples": float(n_data),
        }
        results.append(UpdateResult(state, metrics, {}))
    return results


def _stack(
    lm: LoraModel, jobs: Sequence[ClientJob], start_ranks: list[dict[str, int]], device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every key's factors of all clients ``[G, …]`` at the allocated rank, and each
    module's per-client scaling α / r ``[G]``."""
    shapes = {k: p.shape for k, p in lm.parameters().items()}
    dtype = next(iter(lm.parameters().values())).dtype
    stacks = {
        k: torch.zeros((len(jobs), *shape), dtype=dtype, device=device)
        for k, shape in shapes.items()
    }
    scaling = {}
    for mod in lm.modules:
        a_key, b_key = factor_keys(mod)
        values = []
        for c, j in enumerate(jobs):
            r = start_ranks[c].get(mod)
            if r is None:  # absent module: ΔW = 0, as load_state leaves it
                values.append(lm.alpha / lm.rank)
                continue
            stacks[a_key][c, :r] = j.start[a_key].to(device)
            stacks[b_key][c, :, :r] = j.start[b_key].to(device)
            values.append(lm.alpha / r)
        scaling[mod] = torch.tensor(values, dtype=dtype, device=device)
    return stacks, scaling


def _route(lm: LoraModel, stacks, scaling, owner) -> list:
    """Forward hooks adding each sample's own client's LoRA term to every target
    module's (adapter-free) output."""
    hooks = []
    for name, module in lm.model.named_modules():
        if name not in lm.modules:
            continue
        a_key, b_key = factor_keys(name)

        def hook(mod, inputs, output, a_key=a_key, b_key=b_key, name=name):
            x = inputs[0]
            who = owner()
            a = stacks[a_key].index_select(0, who)  # [N, r, in]
            b = stacks[b_key].index_select(0, who)  # [N, out, r]
            s = scaling[name].index_select(0, who).view(-1, 1, 1).to(x.dtype)
            low = torch.bmm(x, a.transpose(1, 2).to(x.dtype))
            return output + s * torch.bmm(low, b.transpose(1, 2).to(x.dtype))

        hooks.append(module.register_forward_hook(hook))
    return hooks


def _concat(parts: list[Batch], pad_id: int) -> tuple[Batch, torch.Tensor]:
    """One right-padded batch of every client's micro-batch, and each row's client."""
    width = max(b.input_ids.shape[1] for b in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    batch = Batch(
        torch.cat([pad(b.input_ids, pad_id) for b in parts]),
        torch.cat([pad(b.attention_mask, 0) for b in parts]),
        torch.cat([pad(b.labels, IGNORE_INDEX) for b in parts]),
        sum(b.num_tokens for b in parts),
        sum(b.num_target_tokens for b in parts),
    )
    owner = torch.cat(
        [torch.full((b.input_ids.shape[0],), c, dtype=torch.long) for c, b in enumerate(parts)]
    )
    return batch, owner


def _client_means(nll: torch.Tensor, who: torch.Tensor, G: int) -> torch.Tensor:
    """Each client's token-mean loss ``[G]`` (what its batch alone gives)."""
    total = torch.zeros(G, device=nll.device, dtype=nll.dtype).index_add(0, who, nll)
    count = torch.zeros(G, device=nll.device, dtype=nll.dtype).index_add(
        0, who, torch.ones_like(nll)
    )
    return total / count


@torch.no_grad()
def _clip_per_client(params: dict[str, torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` of each client's own gradients (the stacks' slices)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return
    squares = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # [G]
    coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def _stacked_masks(
    jobs: Sequence[ClientJob], params: dict[str, torch.Tensor], device
) -> dict[str, torch.Tensor]:
    """Per key, the clients' masks stacked ``[G, …]`` (True = trainable; a client
    without a mask for the key trains it whole)."""
    keys = {k for j in jobs for k in (j.plan.masks or {}) if k in params}
    out = {}
    for key in keys:
        rows = []
        for j in jobs:
            own = place_masks({key: j.plan.masks[key]} if key in (j.plan.masks or {}) else {},
                              {key: params[key][0]}, device)
            rows.append(own.get(key, torch.ones_like(params[key][0], dtype=torch.bool)))
        out[key] = torch.stack(rows)
    return out


def split_for_memory(count: int, per_client_bytes: float, budget_bytes: float | None) -> int:
    """How many clients one lockstep group may hold within ``budget_bytes`` (≥ 1)."""
    if budget_bytes is None or per_client_bytes <= 0:
        return count
    return max(1, min(count, int(budget_bytes // per_client_bytes)))


__all__ = ["ClientJob", "compatible", "lockstep_updates", "split_for_memory"]
