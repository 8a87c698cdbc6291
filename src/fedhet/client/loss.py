"""Next-token loss computed only where it counts.

A causal LM's output layer (hidden × vocabulary; 49k tokens for SmolLM2) is
applied by ``model(...).logits`` to every position. The loss needs it only at
positions whose next token is a target (response tokens; prompt and padding
carry label -100), so :func:`target_nll` runs the decoder, keeps those
positions' hidden states and applies the output layer to them alone. The
result equals the usual shifted cross-entropy exactly; the saving is the share
of prompt and padding positions (about half on Dolly, most of the tiny model's
cost).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedhet.data.encode import IGNORE_INDEX, Batch
from fedhet.model.base import base_causal_lm


def target_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token negative log-likelihood and the batch row of each.

    ``model`` is a causal LM (a PEFT wrapper is unwrapped) with ``.model``
    (the decoder) and ``.lm_head``. Returns ``(nll, rows)``, both of length
    ``batch.num_target_tokens`` minus the targets at position 0 (none in practice:
    a response follows a prompt).
    """
    causal_lm = base_causal_lm(model)
    hidden = causal_lm.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    nll = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    return nll, rows
