"""Device profiles and fleets: how fast, how big and how available clients are.

A profile drives the simulator's virtual clock. One local update of a client
lasts

    t = tokens · F_train / (speed · u) + 8·bytes_down / down_bps + 8·bytes_up / up_bps

where ``F_train = 3 × forward FLOPs per token`` (forward + backward),
``speed`` is the device's sustained FLOP/s and ``u ≥ 1`` is a straggler draw:
``u = 1`` with probability 1 − ``straggler_prob``, else ``straggler_factor``.
Availability: each time a client could be picked it is online with
probability ``online_prob`` (independent draws, seeded per round/dispatch).

Built-in fleets (speeds are sustained fine-tuning throughput, not peak):

* ``jetson`` — PROTOCOL v2's default: four classes of edge boards in equal
  shares, sustained speeds in ratio 1 : 2 : 4 : 8 (0.1, 0.2, 0.4, 0.8 TFLOP/s),
  memory 4 / 8 / 16 / 32 GB, every board on the same wide-area link (20 Mbit/s
  up, 50 Mbit/s down), always online, no stragglers. The class names follow the
  Jetson line-up, but the speeds are scaled down ~100× with PROTOCOL's cpu-size
  local work (16 short samples) so that compute, not the link, dominates an
  update, as on the papers' testbeds;
* ``uniform`` — every client a laptop-class device;
* ``edge-mix`` — phones, Jetson-class boards, laptops and workstation GPUs in
  proportions 40/25/25/10 %, speeds 0.2 → 30 TFLOP/s (150×, about two orders of
  magnitude), memory 4 → 24 GB, bandwidth 10 → 1000 Mbit/s;
* a YAML file: ``profiles: [{name, speed, memory_gb, up_mbps, down_mbps,
  online_prob, straggler_prob, straggler_factor, share}]``; ``share`` values are
  the fractions of clients of each profile.

Clients are assigned profiles by a seeded shuffle of the exact shares
(largest-remainder rounding), so a fleet of N clients is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedhet.errors import FedhetError


class DeviceProfile(BaseModel):
    """One kind of device."""

    model_config = ConfigDict(extra="forbid")

    name: str
    speed: float = Field(gt=0, description="sustained training FLOP/s")
    memory_gb: float = Field(gt=0)
    up_mbps: float = Field(gt=0)
    down_mbps: float = Field(gt=0)
    online_prob: float = Field(1.0, gt=0, le=1)
    straggler_prob: float = Field(0.0, ge=0, le=1)
    straggler_factor: float = Field(1.0, ge=1)
    share: float = Field(1.0, gt=0)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 2**30

    def duration(
        self,
        train_flops: float,
        bytes_down: float,
        bytes_up: float,
        slowdown: float = 1.0,
        link_mbps: float | None = None,
    ) -> float:
        """Virtual seconds for one update (see the module docstring); ``link_mbps``:
        a local link used both ways instead of the device's wide-area link (a
        hierarchical member talking to its group aggregator)."""
        down = self.down_mbps if link_mbps is None else link_mbps
        up = self.up_mbps if link_mbps is None else link_mbps
        compute = train_flops * slowdown / self.speed
        return compute + 8 * bytes_down / (down * 1e6) + 8 * bytes_up / (up * 1e6)


_WAN = {"up_mbps": 20, "down_mbps": 50}  # PROTOCOL v2's device ↔ server link

_BUILTIN: dict[str, list[DeviceProfile]] = {
    "jetson": [
        DeviceProfile(name=name, speed=speed, memory_gb=memory, share=0.25, **_WAN)
        for name, speed, memory in (
            ("nano", 1e11, 4),
            ("tx2", 2e11, 8),
            ("xavier-nx", 4e11, 16),
            ("agx-orin", 8e11, 32),
        )
    ],
    "uniform": [
        DeviceProfile(name="laptop", speed=2e12, memory_gb=16, up_mbps=50, down_mbps=200),
    ],
    "edge-mix": [
        DeviceProfile(
            name="phone",
            speed=2e11,
            memory_gb=4,
            up_mbps=10,
            down_mbps=40,
            online_prob=0.8,
            straggler_prob=0.1,
            straggler_factor=2.0,
            share=0.40,
        ),
        DeviceProfile(
            name="jetson",
            speed=1e12,
            memory_gb=8,
            up_mbps=20,
            down_mbps=100,
            online_prob=0.9,
            straggler_prob=0.05,
            straggler_factor=1.5,
            share=0.25,
        ),
        DeviceProfile(
            name="laptop",
            speed=3e12,
            memory_gb=16,
            up_mbps=50,
            down_mbps=200,
            online_prob=0.9,
            share=0.25,
        ),
        DeviceProfile(
            name="workstation", speed=3e13, memory_gb=24, up_mbps=500, down_mbps=1000, share=0.10
        ),
    ],
}

FLEETS = sorted(_BUILTIN)


class Fleet:
    """The device profile of each client, plus seeded availability and straggling."""

    def __init__(self, profiles: list[DeviceProfile], num_clients: int, seed: int = 0) -> None:
        shares = np.array([p.share for p in profiles], dtype=float)
        exact = shares / shares.sum() * num_clients
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
            counts[i] += 1
        kinds = np.repeat(np.arange(len(profiles)), counts)
        np.random.default_rng([seed, 7]).shuffle(kinds)
        self.seed = seed
        self.profiles = profiles
        self.clients: list[DeviceProfile] = [profiles[k] for k in kinds]

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, client_id: int) -> DeviceProfile:
        return self.clients[client_id]

    def online(self, event: int) -> np.ndarray:
        """Boolean mask of online clients at a decision point ``event``
        (round number or dispatch count), reproducible per seed."""
        rng = np.random.default_rng([self.seed, 11, event])
        probs = np.array([p.online_prob for p in self.clients])
        return rng.random(len(self.clients)) < probs

    def slowdown(self, client_id: int, event: int) -> float:
        """The straggler draw u of one client at one event."""
        profile = self.clients[client_id]
        rng = np.random.default_rng([self.seed, 13, event, client_id])
        return profile.straggler_factor if rng.random() < profile.straggler_prob else 1.0


def load_fleet(name_or_path: str, num_clients: int, seed: int = 0) -> Fleet:
    """A built-in fleet by name, or a YAML file of profiles."""
    if name_or_path in _BUILTIN:
        return Fleet(_BUILTIN[name_or_path], num_clients, seed)
    path = Path(name_or_path)
    if not path.is_file():
        raise FedhetError(
            f"fleet {name_or_path!r}: not a built-in fleet {FLEETS} nor an existing YAML file"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise FedhetError(f"{path}: invalid YAML: {err}") from err
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("profiles"), list)
        or not raw["profiles"]
    ):
        raise FedhetError(f"{path}: expected a mapping with a non-empty list 'profiles'")
    profiles = []
    for i, entry in enumerate(raw["profiles"]):
        try:
            profiles.append(DeviceProfile.model_validate(entry))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(x) for x in first["loc"])
            raise FedhetError(f"{path}: profiles[{i}].{field}: {first['msg']}") from err
    return Fleet(profiles, num_clients, seed)
