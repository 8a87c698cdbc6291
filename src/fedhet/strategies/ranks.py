"""Heterogeneous LoRA ranks: which rank each client trains, and the prefix truncation
FlexLoRA and HetLoRA share. Pure functions of states and client metadata.

Client types (FlexLoRA, Bai et al. 2024; the authors' code, ``config_types``):

    type 0: rank 8 on every module          type 2: 30 on attention, 200 on MLP
    type 1: rank 30 on every module         type 3: 200 on every module

These ranks were chosen for a model of hidden width 2048 (DataJuicer LLaMA-1.3B).
By default they are scaled to the model: ``r = max(1, round(r_paper · width / 2048))``
with ``width`` the largest ``min(d_out, d_in)`` over the LoRA modules (the hidden
size); SmolLM2-135M (576) gets 2, 8, 8/56, 56. ``rank_levels`` sets the four types
explicitly (an int for every module, or ``[attention, mlp]``), unscaled. A module is
*attention* when its name contains ``attn`` or ``attention``, otherwise *MLP*. A rank
is capped at its module's ``min(d_out, d_in)`` (more adds nothing).

Profiles (``rank_profile``), the shares of the four types in the order above:

* ``homo``: (1, 0, 0, 0): everyone at the smallest type (the bucket effect);
* ``uniform``: ¼ each (the authors' ``random``);
* ``heavy-tail``: (0.85, 0.05, 0.05, 0.05): most clients small;
* ``heavy-tail-strong``: (0.05, 0.05, 0.05, 0.85): most clients large;
* ``normal``: ∝ N(i; 1.5, 0.7) over the types ordered by size, i = 0..3, which
  is (0.057, 0.443, 0.443, 0.057);
* a list of four shares;
* ``memory``: from each device's memory (:class:`ClientInfo.memory_bytes`): the
  largest type i with memory ≥ ``memory_gb[i]`` GiB. The default thresholds
  (0, 8, 16, 24) give the ``edge-mix`` fleet's phones, Jetsons, laptops and
  workstations the four types in order.

Choices the paper leaves open:

* The heavy-tail shares follow the paper's README (85 % at one end, the rest
  uniform); the authors' code draws 80/10/5/5 with the 10 % on the largest type
  (heavy-tail) or on 30/200 (heavy-tail-strong). A share list reproduces either.
* The authors' ``normal`` evaluates the density at the type's *label* (0, 1 = 200,
  2 = 30/200, 3 = 30), which puts 44 % on rank 200; here the density is over the
  types ordered by size, so the middle types get the mass, as the name says.
* Clients get exact counts (largest-remainder rounding of share × N, then a
  shuffle seeded by ``seed``) rather than independent draws, so a federation of
  20 holds the profile's mix (heavy-tail: 17/1/1/1) instead of a lucky draw.

One shared model, many ranks: the global adapter has the rank the runtime
initialised (``lora.rank``); every rank handed out must fit in it, which
:meth:`RankPlan.assign` checks (:class:`FedhetError` naming ``lora.rank``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedhet.errors import FedhetError
from fedhet.model.lora import AdapterState, factor_keys, is_lora_a, module_name, modules, ranks
from fedhet.protocol import ClientInfo

PAPER_LEVELS: tuple[tuple[int, int], ...] = ((8, 8), (30, 30), (30, 200), (200, 200))
"""The four client types of FlexLoRA as (attention rank, MLP rank)."""

PAPER_WIDTH = 2048
"""Hidden width of the model the paper's ranks were chosen for."""

PROFILES: dict[str, tuple[float, ...]] = {
    "homo": (1.0, 0.0, 0.0, 0.0),
    "uniform": (0.25, 0.25, 0.25, 0.25),
    "heavy-tail": (0.85, 0.05, 0.05, 0.05),
    "heavy-tail-strong": (0.05, 0.05, 0.05, 0.85),
    "normal": tuple(math.exp(-((i - 1.5) ** 2) / (2 * 0.7**2)) for i in range(4)),
}
"""Shares of the four client types (normalised when used)."""

MEMORY_PROFILE = "memory"

Ranks = dict[str, int]
"""Rank per LoRA module name."""


def is_attention(module: str) -> bool:
    return "attn" in module or "attention" in module


def model_width(state: Mapping[str, torch.Tensor]) -> int:
    """The largest ``min(d_out, d_in)`` over the state's modules (the hidden size)."""
    widths = []
    for mod in modules(state):
        a_key, b_key = factor_keys(mod)
        widths.append(min(state[b_key].shape[0], state[a_key].shape[1]))
    return max(widths)


def scaled_levels(width: int) -> list[tuple[int, int]]:
    """The paper's four types scaled to a model of hidden size ``width``."""
    return [
        (max(1, round(attn * width / PAPER_WIDTH)), max(1, round(mlp * width / PAPER_WIDTH)))
        for attn, mlp in PAPER_LEVELS
    ]


def parse_levels(levels: Sequence[int | Sequence[int]]) -> list[tuple[int, int]]:
    """``rank_levels`` as four (attention, MLP) pairs; ValueError when malformed."""
    if len(levels) != 4:
        raise ValueError(f"rank_levels needs 4 entries (the client types), got {len(levels)}")
    out = []
    for level in levels:
        pair = (level, level) if isinstance(level, int) else tuple(level)
        if len(pair) != 2 or not all(isinstance(r, int) and r >= 1 for r in pair):
            raise ValueError(f"rank_levels entry {level!r}: expected a rank or [attention, mlp]")
        out.append(pair)
    return out


def profile_shares(profile: str | Sequence[float]) -> tuple[float, ...]:
    """Normalised type shares of a named profile or an explicit list; ValueError otherwise."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(
                f"rank_profile {profile!r} unknown; known: {[*PROFILES, MEMORY_PROFILE]} "
                "or a list of 4 shares"
            )
        shares = PROFILES[profile]
    else:
        shares = tuple(float(s) for s in profile)
    if len(shares) != 4 or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"rank_profile shares {list(shares)}: need 4 non-negative, sum > 0")
    total = sum(shares)
    return tuple(s / total for s in shares)


def profile_types(shares: Sequence[float], num_clients: int, seed: int) -> list[int]:
    """Type of each of ``num_clients`` clients: exact largest-remainder counts, seeded shuffle."""
    exact = np.asarray(shares) * num_clients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    types = np.repeat(np.arange(len(shares)), counts)
    np.random.default_rng([seed, 31]).shuffle(types)
    return types.tolist()


def memory_type(memory_bytes: float, memory_gb: Sequence[float]) -> int:
    """The largest type whose memory threshold (GiB) the device meets (type 0 at least)."""
    fits = [i for i, gb in enumerate(memory_gb) if memory_bytes >= gb * 2**30]
    return max(fits, default=0)


def module_ranks(state: Mapping[str, torch.Tensor], level: tuple[int, int]) -> Ranks:
    """Per-module ranks of one client type, capped at each module's min(d_out, d_in)."""
    out: Ranks = {}
    for mod in modules(state):
        a_key, b_key = factor_keys(mod)
        cap = min(state[b_key].shape[0], state[a_key].shape[1])
        out[mod] = min(cap, level[0] if is_attention(mod) else level[1])
    return out


@dataclass
class RankPlan:
    """How clients get their ranks (module docstring); the strategies' shared parameters.

    Attributes:
        profile: a profile name, ``"memory"``, or four type shares.
        levels: the four types' ranks (int or [attention, mlp]); None: the paper's,
            scaled to the model's width.
        memory_gb: type thresholds for ``"memory"`` (GiB, increasing).
        seed: seeds the assignment of types to clients.
    """

    profile: str | Sequence[float] = "uniform"
    levels: Sequence[int | Sequence[int]] | None = None
    memory_gb: Sequence[float] = (0.0, 8.0, 16.0, 24.0)
    seed: int = 0
    _levels: list[tuple[int, int]] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.profile != MEMORY_PROFILE:
            profile_shares(self.profile)
        if self.levels is not None:
            self._levels = parse_levels(self.levels)
        gb = list(self.memory_gb)
        if len(gb) != 4 or any(b < a for a, b in zip(gb, gb[1:], strict=False)):
            raise ValueError(f"memory_gb {gb}: need 4 increasing thresholds (GiB)")

    def types(self, clients: Sequence[ClientInfo]) -> dict[int, int]:
        """Client id → type index."""
        if self.profile == MEMORY_PROFILE:
            return {c.client_id: memory_type(c.memory_bytes, self.memory_gb) for c in clients}
        ids = sorted(c.client_id for c in clients)
        types = profile_types(profile_shares(self.profile), len(ids), self.seed)
        return dict(zip(ids, types, strict=True))

    def assign(self, state: AdapterState, clients: Sequence[ClientInfo]) -> dict[int, Ranks]:
        """Client id → per-module ranks, each ≤ the global state's rank (else FedhetError)."""
        levels = self._levels or scaled_levels(model_width(state))
        by_type = [module_ranks(state, level) for level in levels]
        shared = ranks(state)
        for t, mod_ranks in enumerate(by_type):
            for mod, r in mod_ranks.items():
                if r > shared[mod]:
                    raise FedhetError(
                        f"strategy.params.rank_levels: client type {t} trains rank {r} on "
                        f"{mod}, above the shared adapter's rank {shared[mod]} (lora.rank); "
                        f"set lora.rank to at least the largest rank handed out "
                        f"({max(max(m.values()) for m in by_type)})"
                    )
        return {cid: dict(by_type[t]) for cid, t in self.types(clients).items()}


def rescaled_prefix(
    state: Mapping[str, torch.Tensor], to: Ranks, *, a_power: float, b_power: float
) -> AdapterState:
    """Each module's first r rank slots, A times (r/R)^a_power, B times (r/R)^b_power,
    R the module's rank in ``state``.

    With ``s = alpha/r`` the client's scaling, ``s_r B A`` of the result is
    ``(r/R)^(a_power + b_power - 1) · s_R B[:, :r] A[:r]``: exponents summing to 1
    keep the product of the first r slots unchanged (FlexLoRA: (0, 1), HetLoRA: (½, ½)).
    """
    have = ranks(state)
    out: AdapterState = {}
    for key, tensor in state.items():
        mod = module_name(key)
        r = to[mod]
        factor = (r / have[mod]) ** (a_power if is_lora_a(key) else b_power)
        part = tensor[:r] if is_lora_a(key) else tensor[:, :r]
        out[key] = part * factor if factor != 1 else part.clone()
    return out
