"""The context study's tables and its verdicts on CLLoRA's two claims.

CLLoRA (Wang et al. 2025, arXiv:2502.18910): "an imbalance in context quality not only
affects local training on clients but also impacts the global model's performance.
However, context length has a minimal effect on local training but a more significant
influence on the global model." Per model, on the primary metric (loss), with the effects
of :func:`fedhet.study.cells.effect` (gain at the largest α − gain at the smallest α,
paired per seed, positive = skew hurts):

* quality hurts local training: Δ local-only gain (quality) > 0;
* quality hurts the global model: Δ global gain (quality) > 0;
* length barely affects local training: |Δ local-only gain (length)| < ε, where
  ε = ``margin`` × the local-only gain at the largest α (length axis, mean over seeds): an
  effect under that share of what local training achieves at all is "minimal" (our
  operational reading; the paper gives no bound);
* length affects the global model: Δ global gain (length) > 0.

Verdicts (PROTOCOL v2): *confirmed* when the 95 % interval over seeds lies on the claimed
side (for "minimal": inside ±ε), *refuted* when it lies on the other side (outside ±ε),
else *inconclusive* with the seeds that would decide it at the observed spread
(:func:`fedhet.experiments.stats.seeds_needed`). The quantity axis (ours, not the paper's)
reports its effects without a claim.
"""

from __future__ import annotations

import math

from fedhet.experiments.stats import Interval, interval, seeds_needed, verdict
from fedhet.study.cells import (
    QUANTITIES,
    Cell,
    alphas,
    effect,
    global_gain,
    over_seeds,
    pairs,
    select,
)

PRIMARY = "loss"


def fmt_ci(est: Interval | None, digits: int = 3) -> str:
    """``mean [low, high]`` to ``digits`` significant digits, the mean alone for one seed,
    or — without a value."""
    if est is None:
        return "—"
    if est.low is None:
        return f"{est.mean:.{digits}g} (1 seed)"
    return f"{est.mean:.{digits}g} [{est.low:.{digits}g}, {est.high:.{digits}g}]"


def gain_table(cells: list[Cell]) -> str:
    """One row per (model, axis, α): every gain of :data:`QUANTITIES` in every metric,
    mean and 95 % interval over seeds."""
    metrics = list(dict.fromkeys(m for c in cells for m in c.metrics))
    cols = [(name, m) for m in metrics for name in QUANTITIES]
    head = "| model | axis | α | seeds | α̂ | " + " | ".join(f"{n} ({m})" for n, m in cols)
    lines = [head + " | wall s |", "|---" * (6 + len(cols)) + "|"]
    for model, axis in pairs(cells):
        for a in alphas(select(cells, model, axis)):
            row = select(cells, model, axis, a)
            hat = interval([c.alpha_hat for c in row if math.isfinite(c.alpha_hat)])
            values = [fmt_ci(over_seeds(row, QUANTITIES[n], m)) for n, m in cols]
            wall = sum(c.wall_s for c in row) / len(row)
            lines.append(
                f"| {model} | {axis} | {a:g} | {len(row)} | {fmt_ci(hat, 2)} | "
                + " | ".join(values) + f" | {wall:.0f} |"
            )
    return "\n".join(lines) + (
        "\n\nGains over the base model (positive = better), paired client by client on the "
        "same test records; local gains are means over the scored clients. Each entry: mean "
        "over seeds [95 % t interval]. α̂: the α estimated back from the clients' group counts "
        "(mean over seeds of the finite ones).\n"
    )


def _claim_line(text: str, est: Interval | None, low: float, high: float | None) -> str:
    """One claim: ``est`` > ``low`` (``high`` None), or inside (``low``, ``high``) = ±ε."""
    if high is None:
        result, needed = verdict(est, low, ">=")
    elif est is None or est.low is None or est.high is None:
        result, needed = "inconclusive", seeds_needed(est, high if est and est.mean >= 0 else low)
    elif low < est.low and est.high < high:
        result, needed = "confirmed", None
    elif est.low >= high or est.high <= low:
        result, needed = "refuted", None
    else:  # until the interval fits inside, or clears the bound on the mean's side
        result, needed = "inconclusive", seeds_needed(est, high if est.mean >= 0 else low)
    extra = f"; seeds that would decide it: {needed}" if needed else ""
    bound = f"> {low:.3g}" if high is None else f"inside ±{high:.3g}"
    return f"- {text}: Δ = {fmt_ci(est)} (claimed {bound}) → **{result}**{extra}"


def claims(cells: list[Cell], margin: float) -> str:
    """Per model, the verdicts on CLLoRA's claims (module docstring); each line names the
    two α its effect compares (in a study stopped early they may not be the extremes)."""
    local, glob = QUANTITIES["local-only gain"], global_gain
    lines: list[str] = []
    for model in dict.fromkeys(c.model for c in cells):
        lines.append(f"\n**{model}** (effect Δ = gain at the largest α − gain at the smallest, "
                     f"{PRIMARY}; positive = skew hurts)\n")
        for axis in dict.fromkeys(c.axis for c in cells if c.model == model):
            row = select(cells, model, axis)
            span = f"α {alphas(row)[0]:g} vs {alphas(row)[-1]:g}"
            d_local = effect(cells, model, axis, local, PRIMARY)
            d_global = effect(cells, model, axis, glob, PRIMARY)
            if axis == "quality":
                lines.append(_claim_line(f"quality imbalance hurts local training ({span})",
                                         d_local, 0.0, None))
                lines.append(_claim_line(f"quality imbalance hurts the global model ({span})",
                                         d_global, 0.0, None))
            elif axis == "length":
                top = over_seeds(select(row, model, axis, alphas(row)[-1]), local, PRIMARY)
                eps = None if top is None else margin * abs(top.mean)
                text = f"length imbalance barely affects local training ({span}"
                if eps:
                    lines.append(_claim_line(
                        f"{text}; ε = {margin:g} × the local-only gain at α = "
                        f"{alphas(row)[-1]:g})", d_local, -eps, eps))
                else:
                    lines.append(f"- {text}): Δ = {fmt_ci(d_local)}; no local-only gain at "
                                 "the largest α to bound a minimal effect → **inconclusive**")
                lines.append(_claim_line(f"length imbalance affects the global model ({span})",
                                         d_global, 0.0, None))
            else:
                lines.append(f"- {axis} ({span}; no claim): Δ local-only = {fmt_ci(d_local)}, "
                             f"Δ global = {fmt_ci(d_global)}")
    return "\n".join(lines) + "\n"


def sizing(cells: list[Cell]) -> str:
    """Per model and axis at the largest α: the federated global gain (mean and std over
    seeds) against the between-seed standard deviation of the federated global loss (the
    issue's sizing rule: the gain should be several times the spread). The loss's spread
    includes each seed's own global test draw; the gain's does not, since it is paired
    with the base model on the same records, so gain / gain std is the ratio that decides
    whether α cells can be told apart."""
    lines = []
    for model, axis in pairs(cells):
        row = select(cells, model, axis)
        if not row:
            continue
        top = select(cells, model, axis, alphas(row)[-1])
        gain = interval([global_gain(c, PRIMARY) for c in top])
        spread = interval([c.federated.global_.get(PRIMARY) for c in top])
        if gain is None or gain.std is None or spread is None or spread.std is None:
            continue
        ratio = gain.mean / spread.std if spread.std > 0 else math.inf
        paired = gain.mean / gain.std if gain.std > 0 else math.inf
        lines.append(f"- {model}, {axis}, α = {alphas(row)[-1]:g}: global gain "
                     f"{gain.mean:.3g} (std over seeds {gain.std:.2g}), between-seed std of "
                     f"the global loss {spread.std:.3g}: gain / loss std = {ratio:.1f}, "
                     f"gain / gain std = {paired:.1f}")
    return "\n".join(lines) + ("\n" if lines else "")


def study_report(cells: list[Cell], margin: float) -> str:
    """The gain table, the claims and the sizing lines."""
    if not cells:
        return "No finished cell yet.\n"
    spread = sizing(cells) or "One seed per cell: no spread to compare with.\n"
    return f"{gain_table(cells)}\n### Claims\n{claims(cells, margin)}\n### Sizing\n{spread}"
