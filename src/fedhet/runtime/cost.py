"""The cost model of the virtual clock, shared by both executors.

A client's update lasts (:mod:`fedhet.devices.profiles`)

    t_k = tokens_k · F_train / speed_k · u_k + 8·bytes_down / down_k + 8·bytes_up / up_k

with ``F_train = F_fwd · (1 + 2·f)``: a forward pass, and a backward pass (about
twice a forward) through the fraction ``f`` of blocks that are backpropagated
(all blocks from the lowest trained one to the output, as the update reports it);
``u_k`` is the device's straggler draw for that event. A difficulty-scoring pass
(FibecFed) adds its tokens at 3·F_fwd (per-sample Fisher: forward and backward
through every block) or F_fwd (loss proxy: forward only).

:class:`ClientCosts` computes ``t_k``; the virtual-clock executor charges it to
every update, and the Flower executor uses it to order replies when asked to
follow the virtual clock. :func:`planner_costs` tabulates what a hierarchical
strategy plans with (:class:`~fedhet.protocol.CostModel`): F(d) and the memory
M(d) (:func:`training_memory`) for every depth d, the bytes per block, each
client's tokens per local step and the links.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhet.client.train import TrainPlan
from fedhet.devices.profiles import Fleet
from fedhet.model.base import model_info
from fedhet.model.lora import AdapterState, LoraModel, select_layers, state_bytes, top_layers
from fedhet.protocol import CostModel


def train_flops_per_token(
    flops_per_token: float, num_layers: int, trainable_layers: Sequence[int] | None
) -> float:
    """F_train: forward FLOPs per token times (1 + 2·f) (module docstring)."""
    lowest = 0 if trainable_layers is None or not len(trainable_layers) else min(trainable_layers)
    depth_fraction = (num_layers - lowest) / num_layers
    return flops_per_token * (1 + 2 * depth_fraction)


@dataclass(frozen=True)
class ClientCosts:
    """Durations of client updates on a fleet (module docstring)."""

    fleet: Fleet
    flops_per_token: float
    num_layers: int

    def update_flops(self, plan: TrainPlan, metrics: Mapping[str, float]) -> float:
        """FLOPs of one local update from its reported work: ``tokens`` trained at
        F_train down to the lowest block it trained (``lowest_layer``; the plan's
        when not reported), plus ``scoring_tokens`` of a difficulty pass, charged
        as a forward and a backward through every block (Fisher) or a forward
        (``plan.score_with == "loss"``)."""
        lowest = metrics.get("lowest_layer")
        layers = plan.trainable_layers if lowest is None else [int(lowest)]
        trained = metrics.get("tokens", 0.0) * train_flops_per_token(
            self.flops_per_token, self.num_layers, layers
        )
        passes = 1 if plan.score_with == "loss" else 3
        return trained + metrics.get("scoring_tokens", 0.0) * passes * self.flops_per_token

    def duration(
        self,
        client_id: int,
        plan: TrainPlan,
        metrics: Mapping[str, float],
        bytes_down: int,
        bytes_up: int,
        event: int,
        link_mbps: float | None = None,
    ) -> float:
        """Virtual seconds of one update of ``client_id`` at ``event`` that
        reported ``metrics`` (:meth:`update_flops`), over the device's wide-area
        link or, given ``link_mbps``, a local one (hierarchical members)."""
        return self.fleet[client_id].duration(
            self.update_flops(plan, metrics),
            bytes_down,
            bytes_up,
            self.fleet.slowdown(client_id, event),
            link_mbps,
        )


def training_memory(
    num_layers: int,
    *,
    num_parameters: int,
    hidden_size: int,
    num_heads: int,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    weight_bytes: int,
    activation_bytes: int,
    lora_params_per_block: float,
) -> tuple[float, ...]:
    """M(d) for d = 0..L, the memory of training the top d blocks (the equation
    is in :mod:`fedhet.strategies.hier_planner`)."""
    s, b, h = seq_len, batch_size, hidden_size
    fixed = num_parameters * weight_bytes + 12 * b * s * vocab_size
    block = activation_bytes / 2 * s * b * h * (34 + 5 * num_heads * s / h)
    block += 16 * lora_params_per_block
    return tuple(fixed + d * block for d in range(num_layers + 1))


def model_training_memory(cfg: Any, lm: LoraModel) -> tuple[float, ...]:
    """M(d) for d = 0..L of the run's model, micro-batch and sequence length
    (:func:`training_memory`; activations in bf16 on CUDA, where training autocasts)."""
    info = model_info(lm.model)
    weight = next(lm.model.parameters())
    on_gpu = weight.device.type == "cuda"
    return training_memory(
        lm.num_layers,
        num_parameters=info["num_parameters"],
        hidden_size=info["hidden_size"],
        num_heads=lm.model.get_base_model().config.num_attention_heads,
        vocab_size=info["vocab_size"],
        seq_len=cfg.data.max_length,
        batch_size=cfg.train.batch_size,
        weight_bytes=weight.element_size(),
        activation_bytes=2 if on_gpu else weight.element_size(),
        lora_params_per_block=sum(p.numel() for p in lm.parameters().values()) / lm.num_layers,
    )


def client_training_bytes(cfg: Any, lm: LoraModel) -> float:
    """One more client's share of a lockstep pass at full depth: M(L) without the
    base model's weights (its activations, logits, adapter and optimizer state); an
    upper bound with activation checkpointing, which stores fewer activations."""
    info = model_info(lm.model)
    weight_bytes = next(lm.model.parameters()).element_size()
    return model_training_memory(cfg, lm)[-1] - info["num_parameters"] * weight_bytes


def planner_costs(
    cfg: Any,
    lm: LoraModel,
    costs: ClientCosts,
    init_state: AdapterState,
    example_lengths: Mapping[int, Sequence[int]],
) -> CostModel:
    """The hierarchical planner's view of a run (``cfg``: the experiment config):
    F(d) from :func:`train_flops_per_token` (forward-only FLOPs at d = 0), M(d)
    from the model's sizes, B per block from the initial adapter, tokens per
    step from each training client's example lengths (batch × grad_accum × mean
    length), and the device, group and LAN links."""
    num_layers = lm.num_layers
    flops = [float(costs.flops_per_token)] + [
        train_flops_per_token(costs.flops_per_token, num_layers, top_layers(num_layers, d))
        for d in range(1, num_layers + 1)
    ]
    memory = model_training_memory(cfg, lm)
    step_sequences = cfg.train.batch_size * cfg.train.grad_accum
    fleet = costs.fleet
    return CostModel(
        num_layers=num_layers,
        round_steps=cfg.train.steps,
        flops_per_token=tuple(flops),
        memory_bytes=memory,
        layer_bytes=tuple(
            float(state_bytes(select_layers(init_state, [layer]))) for layer in range(num_layers)
        ),
        tokens_per_step={
            c: step_sequences * float(np.mean(lengths)) for c, lengths in example_lengths.items()
        },
        up_bps={c: fleet[c].up_mbps * 1e6 for c in example_lengths},
        down_bps={c: fleet[c].down_mbps * 1e6 for c in example_lengths},
        group_up_bps=cfg.federation.group_up_mbps * 1e6,
        group_down_bps=cfg.federation.group_down_mbps * 1e6,
        lan_bps=cfg.federation.lan_mbps * 1e6,
    )
