"""FedSA-LoRA (Guo et al., ICLR 2025): share and average A, keep B with the client.

The paper observes that the A factors learn what is general across clients and
the B factors what is client-specific, so only A is aggregated:

    A ← Σ_k p_k A_k   (sent down to every client),   B_k stays on client k,

and client k trains (A, B_k) from (A, its own last B_k) — its model is
personalised, W + s·B_k A. Authors' code: github.com/Pengxin-Guo/FedSA-LoRA
(built on FederatedScope-LLM; the shared-key filter keeps ``lora_A`` and drops
``lora_B`` from the aggregated state).

Choices the paper leaves open:

* A client taking part for the first time starts its B from the shared initial
  adapter (B = 0), as every client did in round 1.
* The global model: the paper evaluates personalised models only. A global
  figure needs some B; ours is the data-weighted mean of the B factors that the
  round's clients send along with A (``share_b=True``, default): the server keeps
  it for global evaluation and the final adapter and never sends it down, so
  the clients' models stay personalised. Its upload is counted in the bytes.
  With ``share_b=False`` only A travels up and the global figures use the
  initial B (the base model's outputs: ΔW = 0).
* Local evaluation (the personalised model): the global A under the client's
  own B; a client that has not trained yet is evaluated with the global model.
"""

from __future__ import annotations

from fedhet.model.lora import AdapterState, is_lora_a
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.base import Strategy, data_weights, require_nonempty, weighted_average


class FedSALoRA(Strategy):
    """A averaged and shared; B personal (see the module docstring)."""

    name = "fedsa-lora"
    keeps_local_state = True

    def __init__(self, share_b: bool = True) -> None:
        self.share_b = share_b

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        a_only = {k: v for k, v in state.items() if is_lora_a(k)}
        upload = sorted(state) if self.share_b else sorted(a_only)
        return [Instruction(cid, dict(a_only), {"upload_keys": upload}) for cid in client_ids]

    def aggregate(self, rnd: int, state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        require_nonempty(updates, self.name)
        averaged = weighted_average([u.state for u in updates], data_weights(updates))
        return {**state, **averaged}

    def evaluation_state(
        self, state: AdapterState, client_state: AdapterState | None = None
    ) -> AdapterState:
        """Global: the server's A and mean B. Local: the global A under the
        client's own B."""
        if client_state is None:
            return state
        return {**state, **{k: v for k, v in client_state.items() if not is_lora_a(k)}}
