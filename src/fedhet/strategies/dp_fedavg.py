"""DP-FedAvg: client-level differential privacy (McMahan et al., ICLR 2018).

Wraps an averaging strategy (``base``: FedIT, FedProx or FFA-LoRA; see
:class:`fedhet.strategies.robust.AveragingWrapper`). In round t the runtime
samples m clients out of the N training clients; with x the global state and
δ_k the change client k uploaded (x_k − x, or its delta):

    δ̄_k = δ_k · min(1, C / ||δ_k||₂)                      (clip every update to C)
    x  ← x + ( Σ_k δ̄_k + N(0, σ²C² I) ) / m               (noise on the sum)

over the uploaded coordinates (FFA-LoRA: B only). Updates are weighted
uniformly: data-size weights would change the sensitivity and leak sizes. The
sum is divided by the number of clients *sampled*, m, a public number; clients
that dropped out or were rejected simply contribute nothing (DP-FedAvg's fixed
denominator), which shrinks the step but keeps the release a post-processing of
the noisy sum.

Privacy accounting uses Google's ``dp-accounting`` RDP accountant (never
hand-written bounds); each round with a release composes one event, and ε(δ) of
the whole run so far is reported in the metrics as ``dp_epsilon``
(with ``dp_delta``). ``sampling`` names how the runtime samples clients:

* ``"fixed"`` (default; what the simulator does): m of N uniformly without
  replacement, ``SampledWithoutReplacementDpEvent(N, m, Gaussian)`` under the
  replace-one relation. Replacing one client moves the clipped sum by up to 2C,
  so the accountant's noise multiplier is σ/2.
* ``"poisson"``: each client independently with probability q = m/N (the
  paper's scheme), ``PoissonSampledDpEvent(q, Gaussian(σ))`` under add/remove.
  Only valid when the runtime really samples that way.

Assumptions (stated, not enforced): a client participates through its updates
only; which clients are online does not depend on their data. ``noise_seed``
makes the noise reproducible (simulation, resume); set it to None in a real
deployment, where predictable noise would give no privacy. Defaults: σ = 1,
C = 1, δ = 1e-5.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import numpy as np
import torch

from fedhet.errors import FedhetError
from fedhet.model.lora import AdapterState
from fedhet.protocol import ClientUpdate, Instruction
from fedhet.strategies.robust import AveragingWrapper, clip


class DPFedAvg(AveragingWrapper):
    """DP-FedAvg around FedIT, FedProx or FFA-LoRA (see the module docstring).
    Reports ``dp_epsilon``, ``dp_delta`` and ``clipped`` (updates scaled down)."""

    name = "dp-fedavg"

    def __init__(
        self,
        base: str = "fedit",
        base_params: dict[str, Any] | None = None,
        noise_multiplier: float = 1.0,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
        sampling: Literal["fixed", "poisson"] = "fixed",
        noise_seed: int | None = 0,
    ) -> None:
        super().__init__(base, base_params)
        # YAML 1.1 reads 1e-5 as a string: accept numbers written either way
        noise_multiplier, clip_norm, delta = float(noise_multiplier), float(clip_norm), float(delta)
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be ≥ 0, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if sampling not in ("fixed", "poisson"):
            raise ValueError(f"sampling must be 'fixed' or 'poisson', got {sampling!r}")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.delta = delta
        self.sampling = sampling
        self.noise_seed = noise_seed
        self.releases: list[tuple[int, int]] = []  # (N, m) of every noisy round
        self.clipped = 0
        self._sampled: int | None = None
        self._epsilon: tuple[int, float] = (0, 0.0)  # (releases counted, ε)
        _accounting()  # fail fast when dp-accounting is missing

    def configure(self, rnd: int, state: AdapterState, client_ids: list[int]) -> list[Instruction]:
        self._sampled = len(client_ids)
        return self.base.configure(rnd, state, client_ids)

    def combine(
        self, rnd: int, deltas: list[AdapterState], updates: list[ClientUpdate]
    ) -> AdapterState:
        if self._sampled is None:
            raise ValueError("dp-fedavg: aggregate() before configure() in this round")
        m, self._sampled = self._sampled, None
        deltas, clipped = clip(deltas, self.clip_norm)
        self.clipped += clipped
        gen = torch.Generator()
        if self.noise_seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(np.random.default_rng([self.noise_seed, rnd]).integers(2**63 - 1)))
        std = self.noise_multiplier * self.clip_norm
        out: AdapterState = {}
        for key in sorted(deltas[0]):
            first = deltas[0][key]
            total = torch.stack([d[key].float() for d in deltas]).sum(dim=0)
            noise = torch.randn(first.shape, generator=gen, dtype=torch.float32) * std
            out[key] = ((total + noise.to(total.device)) / m).to(first.dtype)
        self.releases.append((len(self.clients), m))
        return out

    def epsilon(self) -> float:
        """ε(δ) of all releases so far, from the dp-accounting RDP accountant."""
        if self._epsilon[0] != len(self.releases):
            self._epsilon = (len(self.releases), self._account())
        return self._epsilon[1]

    def _account(self) -> float:
        if self.noise_multiplier == 0:
            return math.inf  # no noise, no privacy
        dp = _accounting()
        from dp_accounting.rdp import RdpAccountant

        relation = (
            dp.NeighboringRelation.REPLACE_ONE
            if self.sampling == "fixed"
            else dp.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        accountant = RdpAccountant(neighboring_relation=relation)
        for (n, m), count in Counter(self.releases).items():
            accountant.compose(self.event(n, m), count)
        return float(accountant.get_epsilon(self.delta))

    def event(self, num_clients: int, sampled: int):
        """The dp-accounting event of one round (see the module docstring)."""
        dp = _accounting()
        if self.sampling == "fixed":
            return dp.SampledWithoutReplacementDpEvent(
                num_clients, sampled, dp.GaussianDpEvent(self.noise_multiplier / 2)
            )
        return dp.PoissonSampledDpEvent(
            sampled / num_clients, dp.GaussianDpEvent(self.noise_multiplier)
        )

    def metrics(self) -> dict[str, float]:
        return {
            **super().metrics(),
            "dp_epsilon": self.epsilon(),
            "dp_delta": self.delta,
            "clipped": self.clipped,
        }

    def own_state(self) -> dict[str, Any]:
        return {"releases": list(self.releases), "clipped": self.clipped}

    def load_own_state(self, sd: dict[str, Any]) -> None:
        self.releases = [tuple(r) for r in sd["releases"]]
        self.clipped = sd["clipped"]


def _accounting():
    try:
        import dp_accounting
    except ImportError as err:
        raise FedhetError(
            "strategy 'dp-fedavg' needs the dp-accounting package: pip install 'fedhet[privacy]'"
        ) from err
    return dp_accounting
