"""One table writer for every experiment: mean ± 95 % CI over seeds, paired
comparisons with the baseline, verdicts on claims, and the plot of the primary
figure against virtual time (PROTOCOL v2, "Every results table states").

A column is a :class:`Column`: a label and a function of one run (one seed)
giving a number; the cell is the mean ± the 95 % t half-width over the seeds
(:mod:`fedhet.experiments.stats`), ``(k/n)`` when only k of n seeds have a value.
A paired column compares each seed's value with the reference arm's on the
same seed (ratio or difference) before averaging. Scripts add their own
columns to :func:`standard_columns`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhet.client.evaluate import LOWER_IS_BETTER
from fedhet.experiments.runner import Results, Run
from fedhet.experiments.stats import MAX_SEEDS, Interval, Kind, Side, interval, paired, verdict

Value = Callable[[Run], float | None]


@dataclass(frozen=True)
class Column:
    """A table column (module docstring). ``paired``: compare with the baseline arm
    per seed first (``ratio``: baseline / arm, ``relative``: arm / baseline,
    ``difference``: arm − baseline)."""

    label: str
    value: Value
    fmt: str = ".3g"
    paired: Kind | None = None


@dataclass(frozen=True)
class Claim:
    """"``arm`` ``side`` ``threshold``" on a paired comparison with ``versus`` (the
    baseline when None): e.g. a speed-up ratio of times to target ≥ 6."""

    text: str
    arm: str
    value: Value
    kind: Kind
    threshold: float
    side: Side
    versus: str | None = None
    censored: Value | None = None
    """For a seed where ``value`` is None on the arm (e.g. the target not reached):
    how far the arm got without it (e.g. its last virtual time), giving a bound
    (a ratio below reference / this, a share above this / reference)."""


def cell(est: Interval | None, fmt: str, total: int) -> str:
    """``mean ± half-width`` (one seed: the value alone), ``(k/n)`` when seeds miss."""
    if est is None:
        return "—"
    text = format(est.mean, fmt)
    if est.half_width is not None:
        text += " ± " + format(est.half_width, fmt.lstrip("+"))
    if est.n < total:
        text += f" ({est.n}/{total})"
    return text


def time_to_target(results: Results) -> Value:
    """A run's virtual time to its seed's loss target (None: not reached)."""
    refs = results.references
    return lambda run: run.time_to(refs[run.seed].target) if run.seed in refs else None


def final(key: str, scale: float = 1.0) -> Value:
    """The last evaluated ``global_<key>`` of a run (× ``scale``)."""

    def value(run: Run) -> float | None:
        rows = run.evaluated(key)
        return rows[-1][f"global_{key}"] * scale if rows else None

    return value


def at_baseline_time(results: Results, key: str, scale: float = 1.0) -> Value:
    """The last evaluated ``global_<key>`` of a run at a virtual time ≤ its seed's
    baseline time T (× ``scale``): with the ``time`` budget a run ends with the round
    that reaches T, so its final figure may come up to one round after T; this one
    never does (it may come up to one evaluation interval before T)."""
    refs = results.references

    def value(run: Run) -> float | None:
        if run.seed not in refs:
            return None
        limit = refs[run.seed].baseline_time * (1 + 1e-9)
        rows = [r for r in run.evaluated(key) if r.get("virtual_time", 0.0) <= limit]
        return rows[-1][f"global_{key}"] * scale if rows else None

    return value


def summary(key: str, scale: float = 1.0) -> Value:
    return lambda run: None if run.summary.get(key) is None else run.summary[key] * scale


def updates_used(run: Run) -> float:
    """Client updates the run spent: arrivals (async), the members of every
    intra-group round (hier), else the clients of every round (PROTOCOL v2's
    "updates it used", applied or not)."""
    arrivals = [r for r in run.rows if "arrival" in r]
    if arrivals:
        return float(len(arrivals))
    return float(sum(_round_updates(r) for r in run.rows))


def _round_updates(row: dict) -> int:
    if "groups" in row:
        stages = (s for g in row["groups"].values() for s in g["stage_log"])
        return sum(len(s["members"]) for s in stages)
    return row.get("clients", 0)


def delivering(run: Run) -> float | None:
    """Distinct clients whose asynchronous updates arrived (None for round-based runs)."""
    senders = Counter(r["client"] for r in run.rows if "staleness" in r)
    return float(len(senders)) if senders else None


def busiest_share(run: Run) -> float | None:
    """Percentage of the delivered asynchronous updates sent by the busiest client."""
    senders = Counter(r["client"] for r in run.rows if "staleness" in r)
    return 100 * max(senders.values()) / senders.total() if senders else None


def mean_aggregation_error(run: Run) -> float | None:
    """The run's aggregation error ‖ΔW_applied − Σ p_k ΔW_k‖ / ‖Σ p_k ΔW_k‖ averaged over
    its rounds (:func:`fedhet.strategies.base.aggregation_error`; None: not measured)."""
    values = [r["aggregation_error"] for r in run.rows if "aggregation_error" in r]
    return sum(values) / len(values) if values else None


def duration_span(run: Run) -> tuple[float, float] | None:
    """Shortest and longest client update (virtual s) logged in the run's rows."""
    spans = [r["update_span"] for r in run.rows if r.get("update_span")]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans)


def standard_columns(results: Results) -> list[Column]:
    """PROTOCOL v2's columns: time to the loss target and speed-up, final primary and
    secondary figures with their paired differences, local figure, bytes, updates,
    idle fraction, clients delivering and the busiest one's share, wall time."""
    first = next(iter(r for runs in results.runs.values() for r in runs.values()))
    primary, metric = first.primary, first.summary["metric"]
    points = 100.0 if metric == "accuracy" else 1.0
    unit = " [points]" if points == 100 else ""
    fmt = ".1f" if points == 100 else ".4f"  # points, or a fraction (ROUGE-L) to 4 places
    ttt = time_to_target(results)
    scale = points if primary == metric else 1.0
    figures = [
        Column(f"final {primary}", final(primary, scale), ".4f"),
        Column(f"Δ {primary} vs baseline", final(primary, scale), "+.4f", paired="difference"),
    ]
    if primary != metric:
        figures += [
            Column(f"final {metric}{unit}", final(metric, points), fmt),
            Column(f"Δ {metric} vs baseline{unit}", final(metric, points), f"+{fmt}",
                   "difference"),
        ]
    return [
        Column("client updates used", updates_used, ".0f"),
        Column("updates applied", summary("updates_applied"), ".0f"),
        Column("time to target [virtual s]", ttt, ".3g"),
        Column("speed-up vs baseline", ttt, ".2f", paired="ratio"),
        *figures,
        Column(f"final local {metric}{unit} (mean)", summary("final_local_mean", points), fmt),
        Column("local spread (std)", summary("final_local_std", points), fmt),
        Column("MB up", summary("bytes_up", 1e-6), ".1f"),
        Column("MB down", summary("bytes_down", 1e-6), ".1f"),
        Column("idle fraction", summary("idle_fraction"), ".2f"),
        Column("clients delivering", delivering, ".0f"),
        Column("busiest client [%]", busiest_share, ".0f"),
        Column("wall [s]", summary("wall_time"), ".0f"),
    ]


def estimate(results: Results, arm: str, col: Column, versus: str | None = None) -> Interval | None:
    """The interval of a column for one arm (paired with ``versus``/the baseline)."""
    values = results.values(arm, col.value)
    if col.paired:
        reference = results.values(versus or results.experiment.baseline, col.value)
        values = paired(values, reference, col.paired)
    return interval(values)


def table(results: Results, columns: Sequence[Column]) -> list[str]:
    """The markdown table: one row per arm, one column per :class:`Column`, plus how
    each arm's runs stopped and the measured span of update durations."""
    seeds = len(results.experiment.seeds)
    head = ["method", *(c.label for c in columns), "stopped by", "update durations [s]"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm in results.experiment.arms:
        runs = list(results.runs[arm.name].values())
        if not runs:
            lines.append(f"| {arm.name} | " + " | ".join(["not run"] * (len(head) - 1)) + " |")
            continue
        cells = [cell(estimate(results, arm.name, c), c.fmt, seeds) for c in columns]
        stops = Counter(r.summary.get("stopped", "budget") for r in runs)
        spans = [s for s in map(duration_span, runs) if s]
        span = f"{min(s[0] for s in spans):.2g}–{max(s[1] for s in spans):.2g}" if spans else "—"
        stopped = ", ".join(f"{k} {v}" for k, v in sorted(stops.items()))
        lines.append(f"| {arm.name} | " + " | ".join([*cells, stopped, span]) + " |")
    return lines


def verdict_lines(results: Results, claims: Sequence[Claim]) -> list[str]:
    """One line per claim: the paired estimate with its CI and the verdict.

    Seeds without a paired value but with a censored bound (:class:`Claim`) cannot
    confirm a claim, but they can refute it: a ratio claim "≥ k" is refuted when the
    95 % interval over the seeds, each taken at its value or at its upper bound, lies
    below k (the true values are lower still); a share claim "≤ k" likewise from lower
    bounds."""
    lines = []
    exp = results.experiment
    for claim in claims:
        col = Column(claim.text, claim.value, ".3g", paired=claim.kind)
        est = estimate(results, claim.arm, col, claim.versus)
        word, needed = verdict(est, claim.threshold, claim.side)
        both = set(results.runs[claim.arm]) & set(results.runs[claim.versus or exp.baseline])
        bounds = censored_bounds(results, claim)
        text = (
            f"- {claim.text}: {cell(est, '.3g', len(exp.seeds))} "
            f"(claim {claim.side} {claim.threshold:g})"
        )
        bounded = bounded_estimate(results, claim, col, bounds)
        refutes = bounded is not None and bounded.low is not None and (
            (claim.kind == "ratio" and claim.side == ">=" and bounded.high < claim.threshold)
            or (claim.kind == "relative" and claim.side == "<=" and bounded.low > claim.threshold)
        )
        if word != "refuted" and refutes:
            text += (
                f" — **refuted**: with the seeds that did not reach it taken at their bounds, "
                f"{cell(bounded, '.3g', len(exp.seeds))} lies entirely on the other side"
            )
        elif est is None:
            text += " — no paired value (target not reached or run missing): **inconclusive**"
        elif word == "confirmed" and est.n < len(both):
            # a seed that ran both but has no paired value (e.g. never reached the target)
            # may be the one that contradicts the claim: it is not left out silently
            text += (
                f" — **inconclusive**: {len(both) - est.n} of {len(both)} seeds run have no "
                "paired value (target not reached)"
            )
        else:
            text += f" — **{word}**"
            if word == "inconclusive" and est.n < 2:
                text += f"; {est.n} seed with a value: no interval"
            elif word == "inconclusive":
                text += (
                    f"; about {needed} seeds would decide it at this spread"
                    if needed
                    else f"; no number of seeds up to {MAX_SEEDS} would at this spread"
                )
        if bounds:
            text += "; seeds without a value: " + ", ".join(t for _, t in bounds.values())
        lines.append(text)
    return lines


def bounded_estimate(
    results: Results, claim: Claim, col: Column, bounds: dict[int, tuple[float, str]]
) -> Interval | None:
    """The interval over the seeds run by both arms, each at its paired value or,
    without one, at its censored bound; None without bounds."""
    if not bounds:
        return None
    exp = results.experiment
    values = paired(
        results.values(claim.arm, col.value),
        results.values(claim.versus or exp.baseline, col.value),
        claim.kind,
    )
    return interval(
        [
            bounds[s][0] if v is None and s in bounds else v
            for s, v in zip(exp.seeds, values, strict=True)
        ]
    )


def censored_bounds(results: Results, claim: Claim) -> dict[int, tuple[float, str]]:
    """Per seed where the arm ran but ``claim.value`` is None: the bound its
    ``censored`` figure gives on the paired value (ratio: upper, share: lower) and
    its text; ratio and share claims only."""
    if claim.censored is None or claim.kind == "difference":
        return {}
    reference = results.runs[claim.versus or results.experiment.baseline]
    out: dict[int, tuple[float, str]] = {}
    for seed, run in sorted(results.runs[claim.arm].items()):
        ref = claim.value(reference[seed]) if seed in reference else None
        got, reached = claim.censored(run), claim.value(run)
        if reached is not None or ref is None or not got:
            continue
        if claim.kind == "ratio":
            out[seed] = (ref / got, f"seed {seed}: < {ref / got:.3g} (none by {got:.3g})")
        elif ref:
            out[seed] = (got / ref, f"seed {seed}: > {got / ref:.3g} (none by {got:.3g})")
    return out


def last_virtual_time(run: Run) -> float | None:
    """The virtual time of a run's last evaluation (a target is checked only there)."""
    rows = run.evaluated()
    return rows[-1].get("virtual_time") if rows else None


def reference_lines(results: Results) -> list[str]:
    """Each seed's reference points (PROTOCOL v2)."""
    lines = []
    for seed, ref in sorted(results.references.items()):
        text = (
            f"- seed {seed}: base {ref.base:.4f}, baseline final {ref.baseline_final:.4f} "
            f"→ target {ref.target:.4f}; baseline virtual time T = {ref.baseline_time:.4g} s"
        )
        if ref.central is not None:
            text += f"; central {ref.central:.4f} → v1 target {ref.v1_target:.4f}"
        primary = results.runs[results.experiment.baseline][seed].primary
        lower = primary in LOWER_IS_BETTER
        if not (ref.baseline_final < ref.base if lower else ref.baseline_final > ref.base):
            text += " — **the baseline did not improve on the base: mis-sized (PROTOCOL v2)**"
        lines.append(text)
    return lines


def plot(results: Results, path: Path, key: str | None = None) -> Path:
    """The primary figure (or ``key``) vs virtual time: per arm the mean over seeds
    (each seed's curve held constant between its evaluations, the mean drawn up to
    the shortest seed's last evaluation) with the seeds' min–max range shaded, and
    the targets of the seeds as a dotted band."""
    import matplotlib.pyplot as plt

    from fedhet.reports.plots import STYLES, save_figure

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, arm in enumerate(results.experiment.arms):
        runs = list(results.runs[arm.name].values())
        if not runs:
            continue
        name = key or runs[0].primary
        curves = []
        for run in runs:
            rows = run.evaluated(name)
            curves.append(
                (np.array([r.get("virtual_time", 0.0) for r in rows]),
                 np.array([r[f"global_{name}"] for r in rows]))
            )
        end = min(t[-1] for t, _ in curves)
        grid = np.unique(np.concatenate([t[t <= end] for t, _ in curves]))
        ys = np.array([v[np.searchsorted(t, grid, side="right") - 1] for t, v in curves])
        style = STYLES[i % len(STYLES)]
        ax.plot(grid, ys.mean(0), label=f"{arm.name} ({len(runs)} seeds)", drawstyle="steps-post",
                markersize=3, **style)
        if len(runs) > 1:
            ax.fill_between(grid, ys.min(0), ys.max(0), step="post", alpha=0.15)
    targets = [r.target for r in results.references.values()]
    if targets:
        ax.axhspan(min(targets), max(targets) + 1e-9, color="grey", alpha=0.3, label="target")
    ax.set_xlabel("virtual time [s]")
    primary = next((r.primary for runs in results.runs.values() for r in runs.values()), "")
    ax.set_ylabel(f"global {key or primary}")
    ax.set_title(results.experiment.key)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def shown(path: Path) -> Path:
    """``path`` relative to the working folder when it lies under it (a section then
    names ``configs/x.yaml``, not the machine's checkout), else as given."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def report(
    results: Results,
    columns: Sequence[Column],
    claims: Sequence[Claim] = (),
    notes: Sequence[str] = (),
    figure: Path | None = None,
) -> str:
    """The body of an experiment's RESULTS.md section: scenario, budget, wall time,
    references, the table, the verdicts, the notes and the figure's link."""
    exp = results.experiment
    finished = [run for runs in results.runs.values() for run in runs.values()]
    walls = [run.summary.get("wall_time") or 0.0 for run in finished]
    budget = {
        "protocol": "PROTOCOL v2: the baseline's budget as configured; every other arm "
        "until the target, the baseline's virtual time T or 4× its client updates",
        "time": "the baseline's budget as configured; every other arm until the "
        "baseline's virtual time T or 4× its client updates (no stop at the target: "
        "final figures at about equal virtual time; a run ends with the round or arrival "
        "that reaches T, so it may run up to one round past T)",
        "equal": "every arm the configured budget",
    }[exp.budget]
    lines = [
        f"- scenario: `{shown(exp.config)}`"
        + (f" with `{' '.join(exp.overrides)}`" if exp.overrides else ""),
        f"- seeds: {', '.join(map(str, exp.seeds))}; baseline: {exp.baseline}; budget: {budget}",
        f"- wall time of this invocation: {results.wall_time:.0f} s (finished runs reused); "
        f"the wall times of the {len(finished)} runs tabulated sum to {sum(walls) / 60:.0f} min",
        "- arms: " + "; ".join(
            f"{a.name} = `{' '.join(a.overrides) or 'scenario as configured'}`" for a in exp.arms
        ),
        "",
        "Reference points (primary figure):",
        "",
        *reference_lines(results),
        "",
        *table(results, columns),
        "",
        "Cells: mean ± 95 % t half-width over seeds; (k/n): only k of n seeds have a value "
        "(e.g. the target not reached). Paired columns compare each seed with the "
        "baseline's run on the same seed first.",
    ]
    if claims:
        lines += ["", "Verdicts (PROTOCOL v2):", "", *verdict_lines(results, claims)]
    if notes:
        lines += ["", *notes]
    if figure is not None:
        lines += ["", f"![primary figure vs virtual time]({figure.name})"]
    return "\n".join(lines)
