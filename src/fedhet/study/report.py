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
from fedhet.study.cells import QUANTITIES, Cell, alphas, effect, global_gain, over_seeds, pairs
from fedhet.study.cells import select as cells_of

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
        for a in alphas(cells_of(cells, model, axis)):
            row = cells_of(cells, model, axis, a)
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
    """Per model, the verdicts on CLLoRA's claims (module docstring)."""
    local, glob = QUANTITIES["local-only gain"], global_gain
    lines: list[str] = []
    for model in dict.fromkeys(c.model for c in cells):
        axes = {a for m, a in pairs(cells) if m == model and cells_of(cells, m, a)}
        lines.append(f"\n**{model}** (effect Δ = gain at the largest α − gain at the smallest, "
                     f"{PRIMARY}; positive = skew hurts)\n")
        if "quality" in axes:
            lines.append(_claim_line("quality imbalance hurts local training",
                                     effect(cells, model, "quality", local, PRIMARY), 0.0, None))
            lines.append(_claim_line("quality imbalance hurts the global model",
                                     effect(cells, model, "quality", glob, PRIMARY), 0.0, None))
        if "length" in axes:
            row = cells_of(cells, model, "length")
            top = over_seeds(cells_of(cells, model, "length", alphas(row)[-1]), local, PRIMARY)
            eps = None if top is None else margin * abs(top.mean)
            est = effect(cells, model, "length", local, PRIMARY)
            if eps:
                lines.append(_claim_line(
                    f"length imbalance barely affects local training (ε = {margin:g} × the "
                    f"local-only gain at α = {alphas(row)[-1]:g})", est, -eps, eps))
            lines.append(_claim_line("length imbalance affects the global model",
                                     effect(cells, model, "length", glob, PRIMARY), 0.0, None))
        if "quantity" in axes:
            lines.append(
                f"- quantity (no claim): Δ local-only = "
                f"{fmt_ci(effect(cells, model, 'quantity', local, PRIMARY))}, Δ global = "
                f"{fmt_ci(effect(cells, model, 'quantity', glob, PRIMARY))}"
            )
    return "\n".join(lines) + "\n"


def sizing(cells: list[Cell]) -> str:
    """Per model and axis at the largest α: the federated global gain (mean and std over
    seeds) against the between-seed standard deviation of the federated global loss (the
    issue's sizing rule: the gain should be several times the spread; the loss's spread
    includes each seed's own global test draw, the gain's does not)."""
    lines = []
    for model, axis in pairs(cells):
        row = cells_of(cells, model, axis)
        if not row:
            continue
        top = cells_of(cells, model, axis, alphas(row)[-1])
        gain = interval([global_gain(c, PRIMARY) for c in top])
        spread = interval([c.federated.global_.get(PRIMARY) for c in top])
        if gain is None or gain.std is None or spread is None or spread.std is None:
            continue
        ratio = gain.mean / spread.std if spread.std > 0 else math.inf
        lines.append(f"- {model}, {axis}, α = {alphas(row)[-1]:g}: global gain "
                     f"{gain.mean:.3g} (std over seeds {gain.std:.2g}), between-seed std of "
                     f"the global loss {spread.std:.3g}: gain / loss std = {ratio:.1f}")
    return "\n".join(lines) + ("\n" if lines else "")


def study_report(cells: list[Cell], margin: float) -> str:
    """The gain table, the claims and the sizing lines."""
    if not cells:
        return "No finished cell yet.\n"
    spread = sizing(cells) or "One seed per cell: no spread to compare with.\n"
    return f"{gain_table(cells)}\n### Claims\n{claims(cells, margin)}\n### Sizing\n{spread}"
