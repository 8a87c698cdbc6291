"""PROTOCOL v2's statistics: means with 95 % t intervals over seeds, paired
comparisons against a baseline, and verdicts on claims.

* Interval of values x_1..x_n (one per seed): mean x̄ ± t_{0.975, n−1} · s / √n,
  s the sample standard deviation (n − 1 in the denominator); no interval for
  n < 2.
* Paired comparison of a method with a reference on the same seeds: per seed the
  ratio r_i = reference_i / method_i (``ratio``; times: > 1 means the method is
  faster), the share method_i / reference_i (``relative``; bytes or times as a
  fraction of the baseline's) or the difference d_i = method_i − reference_i
  (``difference``; final figures), then the interval of those per-seed values.
  Seeds where either value is missing are left out (and counted as missing).
* Verdict on a claim "value ⋚ threshold" (e.g. speed-up ≥ 6, difference ≥ −0.01):
  *confirmed* when the whole interval lies on the claimed side, *refuted* when it
  lies entirely on the other side, otherwise *inconclusive*, together with the
  number of seeds that would decide it at the observed mean and spread: the
  smallest n with t_{0.975, n−1} · s / √n < |x̄ − threshold| (capped at
  :data:`MAX_SEEDS`; None when the mean sits on the threshold or s is unknown).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats as _scipy_stats

LEVEL = 0.95
MAX_SEEDS = 1000


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its 95 % t interval (``low``/``high`` None for n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    std: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean


def t_quantile(n: int) -> float:
    """t_{0.975, n−1}: the two-sided 95 % quantile for n values."""
    return float(_scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def interval(values: Sequence[float | None]) -> Interval | None:
    """The mean and 95 % t interval of the values that are not None (None without any)."""
    got = [float(v) for v in values if v is not None]
    if not got:
        return None
    n, mean = len(got), math.fsum(got) / len(got)
    if n < 2:
        return Interval(mean, None, None, n, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in got) / (n - 1))
    half = t_quantile(n) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std)


Kind = Literal["ratio", "relative", "difference"]


def paired(
    method: Sequence[float | None],
    reference: Sequence[float | None],
    kind: Kind,
) -> list[float | None]:
    """Per seed: reference / method (``ratio``), method / reference (``relative``) or
    method − reference (``difference``); None where either is missing or a divisor is 0."""
    out: list[float | None] = []
    for m, r in zip(method, reference, strict=True):
        divisor = {"ratio": m, "relative": r, "difference": 1.0}[kind]
        if m is None or r is None or divisor == 0:
            out.append(None)
        elif kind == "difference":
            out.append(m - r)
        else:
            out.append(r / m if kind == "ratio" else m / r)
    return out


Verdict = Literal["confirmed", "refuted", "inconclusive"]
Side = Literal[">=", "<="]


def verdict(
    est: Interval | None, threshold: float, side: Side
) -> tuple[Verdict, int | None]:
    """The verdict on "value ``side`` threshold" and, when inconclusive, the seeds that
    would decide it (module docstring)."""
    if est is None or est.low is None or est.high is None:
        return "inconclusive", seeds_needed(est, threshold)
    above, below = est.low >= threshold, est.high <= threshold
    if (above and side == ">=") or (below and side == "<="):
        return "confirmed", None
    if (below and side == ">=") or (above and side == "<="):
        return "refuted", None
    return "inconclusive", seeds_needed(est, threshold)


def seeds_needed(est: Interval | None, threshold: float) -> int | None:
    """Smallest n whose 95 % half-width at the observed std is below the distance
    from the mean to ``threshold``; None when unknown or beyond :data:`MAX_SEEDS`."""
    if est is None or est.std is None:
        return None
    gap = abs(est.mean - threshold)
    if est.std == 0:
        return 2 if gap > 0 else None
    for n in range(2, MAX_SEEDS + 1):
        if t_quantile(n) * est.std / math.sqrt(n) < gap:
            return n
    return None
