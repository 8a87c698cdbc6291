"""Asynchronous federated fine-tuning (issue #5): time to accuracy of FedIT (synchronous)
vs FedBuff vs FedAsync vs FedFa on one S-cls scenario.

All four run on the identical scenario (data, partition, fleet, seed, training plan,
evaluation; the federated data is built once) with equal client-update budgets:
FedIT runs ``rounds`` rounds of ``clients_per_round`` clients and the asynchronous
methods ``max_arrivals = rounds × clients_per_round`` arrivals with ``concurrency``
clients in flight (set to that product here, whatever the config says). FedIT is
evaluated every round, the others every ``clients_per_round`` arrivals, so all have
the same number of evaluation points. Strategy parameters in the config apply to the
strategy they name; the others use DESIGN.md's defaults.

Reference points (PROTOCOL.md), per seed: base = the model with no adapter (step 0);
central = ``Simulation(cfg).run_central()`` (one adapter trained on the union of the
clients' data, as many samples as the federated budget), final figure; target =
base + 0.9·(central − base). "Time to target" is the virtual time at which the global
metric first reaches it (at an evaluation point).

Reported per method: virtual time to target and its speed-up over FedIT, final global
metric and its difference from FedIT, final local metric (mean ± spread over the
evaluated clients), client idle fraction, client updates applied, virtual time, bytes,
wall time, and where the delivered updates came from (share per device class). Plus a
plot of the global metric vs virtual time and vs client updates.

    python benchmarks/exp_async.py --config configs/s-cls-cpu.yaml            # → RESULTS.md
    python benchmarks/exp_async.py --config configs/s-cls-smoke.yaml \\
        --set output_dir=/tmp/runs --out /tmp/exp_async.md                      # smoke

``--reuse`` takes a method's (or the central reference's) figures from its run
directory when that holds a finished run of exactly the same config, instead of
running it again. So seeds can run as separate processes (side by side, one thread
each) and one last ``--reuse`` call over all of them writes the table; a comparison
that was stopped resumes at the first unfinished run. The section (and its plot) is
named after the scenario and the seeds, so runs over different seeds do not replace
each other.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedhet.config import ExperimentConfig, load_config  # noqa: E402
from fedhet.data.federated import FederatedData, build_federated_data  # noqa: E402
from fedhet.devices.profiles import Fleet, load_fleet  # noqa: E402
from fedhet.reports.plots import save_figure
from fedhet.reports.results import RESULTS, write_section  # noqa: E402
from fedhet.reports.summary import read_metrics
from fedhet.runtime.compare import protocol_reference, reference_points
from fedhet.runtime.sim import Simulation  # noqa: E402
from fedhet.strategies import STRATEGIES  # noqa: E402

SECTION = "exp_async"
METHODS = ("fedit", "fedbuff", "fedasync", "fedfa")
SYNC = "fedit"


def method_config(base: ExperimentConfig, method: str, seed: int, target: float | None):
    """The scenario with one method, one seed and the target set (module docstring)."""
    cfg = base.model_copy(deep=True)
    cfg.name, cfg.seed = f"{base.name}/{method}-seed{seed}", seed
    cfg.strategy.name = method
    cfg.strategy.params = base.strategy.params if method == base.strategy.name else {}
    cfg.eval.target = target
    fed = cfg.federation
    fed.max_arrivals = fed.rounds * fed.clients_per_round
    if STRATEGIES[method].mode == "async":
        cfg.eval.every = fed.clients_per_round
    return cfg


def finished_run(cfg: ExperimentConfig) -> tuple[dict, list[dict]] | None:
    """(summary, metrics rows) of a finished run of exactly ``cfg`` in its run
    directory, or None (``--reuse``; module docstring)."""
    run_dir = cfg.run_dir
    if not (run_dir / "summary.json").is_file():
        return None
    if load_config(run_dir / "config.yaml").model_dump() != cfg.model_dump():
        return None
    return json.loads((run_dir / "summary.json").read_text()), read_metrics(run_dir)


def reference(cfg: ExperimentConfig, fed: FederatedData, reuse: bool) -> dict[str, float]:
    """PROTOCOL.md's reference points, from a finished central run when reused."""
    done = finished_run(cfg) if reuse else None
    if done is None:
        return protocol_reference(cfg, fed)
    summary, rows = done
    return reference_points(rows, summary["metric"])


def time_to_loss(rows: list[dict], target: float) -> float | None:
    """Virtual time of the first evaluation whose global loss is ≤ ``target``."""
    return next((r["virtual_time"] for r in rows if r.get("global_loss", np.inf) <= target), None)


def run_seed(
    base: ExperimentConfig, fed: FederatedData, seed: int, methods: list[str], reuse: bool
):
    """Central reference, then every method; returns (reference, {method: run}), a run
    being its summary, metrics rows, delivered updates per client and device shares
    (the simulation is let go: it holds a base model)."""
    cfg = method_config(base, SYNC, seed, None)
    cfg.name = f"{base.name}/central-seed{seed}"
    ref = reference(cfg, fed, reuse)
    fleet = load_fleet(base.fleet.name, len(fed.clients), seed)
    runs = {}
    for method in methods:
        cfg = method_config(base, method, seed, ref["target"])
        done = finished_run(cfg) if reuse else None
        if done is None:
            result = Simulation(cfg, fed=fed).run()
            done = result.summary, result.metrics
        summary, metrics = done
        senders = Counter(row["client"] for row in metrics if "staleness" in row)
        runs[method] = {
            "summary": summary,
            "metrics": metrics,
            "senders": senders,
            "shares": device_shares(senders, fleet),
        }
        print(method, seed, summary, flush=True)
    return ref, runs


def device_shares(senders: Counter, fleet: Fleet) -> dict[str, float]:
    """Share of the delivered asynchronous updates (``senders``: count per client) per
    device class; empty for sync, whose rows do not name clients (it samples uniformly
    among the online ones)."""
    counts: Counter = Counter()
    for cid, n in senders.items():
        counts[fleet[cid].name] += n
    total = senders.total()
    return {name: n / total for name, n in counts.items()} if total else {}


def cell(values: list[float | None], fmt: str) -> str:
    """mean ± std over seeds; a dash when nothing; "(k/n)" when some are missing."""
    got = [v for v in values if v is not None]
    if not got:
        return "—" if len(values) == 1 else f"— (0/{len(values)})"
    text = format(float(np.mean(got)), fmt)
    if len(got) > 1:
        text += " ± " + format(float(np.std(got)), fmt.lstrip("+"))
    if len(got) < len(values):
        text += f" ({len(got)}/{len(values)})"
    return text


def speedup(t_sync: float | None, t: float | None) -> float | None:
    """FedIT's time to target over a method's; None unless both reach it after time 0."""
    return t_sync / t if t_sync is not None and t else None


def loss_table(per_seed: list[tuple[dict, dict]], methods: list[str]) -> list[str]:
    """Final global loss and time to the loss target (reference's ``loss_target``), a
    smoother statistic than accuracy on a two-label task."""
    lines = [
        "| method | final global loss | time to loss target [virtual s] | speed-up vs FedIT |",
        "|---" * 4 + "|",
    ]
    for method in methods:
        loss, ttl, fast = [], [], []
        for ref, runs in per_seed:
            rows = runs[method]["metrics"]
            loss.append(runs[method]["summary"]["final_global_loss"])
            ttl.append(time_to_loss(rows, ref["loss_target"]))
            sync = time_to_loss(runs[SYNC]["metrics"], ref["loss_target"]) if SYNC in runs else None
            fast.append(speedup(sync, ttl[-1]))
        lines.append(
            f"| {method} | {cell(loss, '.3f')} | {cell(ttl, '.3g')} | {cell(fast, '.2f')} |"
        )
    return lines


def table(
    base: ExperimentConfig, per_seed: list[tuple[dict, dict]], methods: list[str], metric: str
) -> list[str]:
    points = 100.0 if metric == "accuracy" else 1.0
    unit = " [points]" if metric == "accuracy" else ""
    lines = [
        f"| method | mode | client updates | updates applied | time to target [virtual s] "
        f"| speed-up vs FedIT | final global {metric}{unit} | Δ vs FedIT{unit} "
        f"| final local {metric}{unit} (mean, spread) | idle fraction | virtual time [s] "
        "| MB up / down | wall [s] | delivered updates by device | clients delivering "
        "(top client's share) |",
        "|---" * 15 + "|",
    ]
    for method in methods:
        col: dict[str, list[Any]] = {}
        shares: Counter = Counter()
        for _, runs in per_seed:
            s = runs[method]["summary"]
            sync = runs[SYNC]["summary"] if SYNC in runs else None
            ttt, final = s["time_to_target"], s["final_global"]
            col.setdefault("ttt", []).append(ttt)
            col.setdefault("speedup", []).append(speedup(sync and sync["time_to_target"], ttt))
            col.setdefault("final", []).append(final * points)
            col.setdefault("delta", []).append(
                (final - sync["final_global"]) * points if sync else None
            )
            for key in ("final_local_mean", "final_local_std"):
                col.setdefault(key, []).append(None if s[key] is None else s[key] * points)
            for key in ("updates_applied", "idle_fraction", "virtual_time", "wall_time"):
                col.setdefault(key, []).append(s[key])
            col.setdefault("up", []).append(s["bytes_up"] / 1e6)
            col.setdefault("down", []).append(s["bytes_down"] / 1e6)
            shares.update(runs[method]["shares"])
            senders = runs[method]["senders"]
            col.setdefault("senders", []).append(len(senders))
            col.setdefault("top", []).append(
                100 * max(senders.values()) / senders.total() if senders else None
            )
        n_seeds = len(per_seed)
        fed = base.federation
        budget = fed.rounds * fed.clients_per_round
        mode = STRATEGIES[method].mode
        mode_text = (
            f"sync, {fed.rounds}×{fed.clients_per_round}"
            if mode == "sync"
            else f"async, {fed.concurrency} in flight"
        )
        senders_text = (
            f"{cell(col['senders'], '.0f')} ({cell(col['top'], '.0f')} %)"
            if mode != "sync"
            else "sampled each round"
        )
        by_device = ", ".join(f"{k} {v / n_seeds:.0%}" for k, v in sorted(shares.items()))
        lines.append(
            f"| {method} | {mode_text} | {budget} | {cell(col['updates_applied'], '.0f')} "
            f"| {cell(col['ttt'], '.3g')} | {cell(col['speedup'], '.2f')} "
            f"| {cell(col['final'], '.1f')} | {cell(col['delta'], '+.1f')} "
            f"| {cell(col['final_local_mean'], '.1f')}, {cell(col['final_local_std'], '.1f')} "
            f"| {cell(col['idle_fraction'], '.2f')} | {cell(col['virtual_time'], '.3g')} "
            f"| {cell(col['up'], '.1f')} / {cell(col['down'], '.1f')} "
            f"| {cell(col['wall_time'], '.0f')} | {by_device or 'uniform over online'} "
            f"| {senders_text} |"
        )
    return lines


def verdict(seeds: list[int], per_seed: list[tuple[dict, dict]], metric: str) -> str:
    """The issue's claim: FedFa reaches the target ≥ 3× sooner than FedIT, final within 1 point."""
    if not all({"fedfa", SYNC} <= set(runs) for _, runs in per_seed):
        return "FedFa vs FedIT: not both run."
    points = 100.0 if metric == "accuracy" else 1.0
    parts = []
    for seed, (_, runs) in zip(seeds, per_seed, strict=True):
        fa, it = runs["fedfa"]["summary"], runs[SYNC]["summary"]
        gap = (fa["final_global"] - it["final_global"]) * points
        t_fa, t_it = fa["time_to_target"], it["time_to_target"]
        if t_fa is None or t_it is None:
            missed = "FedFa" if t_fa is None else "FedIT"
            speed, fast = f"n/a (target not reached by {missed})", False
        elif t_fa == 0:
            speed, fast = "n/a (the base model already meets the target)", False
        else:
            speed, fast = f"{t_it / t_fa:.2f}×", t_it / t_fa >= 3
        within = (
            "" if metric != "accuracy" else f" ({'within' if gap >= -1 else 'outside'} 1 point)"
        )
        parts.append(
            f"seed {seed}: speed-up {speed} ({'meets' if fast else 'misses'} ≥ 3×), "
            f"final Δ {gap:+.3g}{within}"
        )
    return "FedFa vs FedIT — " + "; ".join(parts) + "."


def plot(
    per_seed: list[tuple[dict, dict]], methods: list[str], metric: str, per_round: int, path: Path
) -> Path:
    """Global metric vs virtual time (log scale) and vs client updates (a sync round
    is ``per_round`` updates, an arrival one), first seed."""
    ref, runs = per_seed[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for method in methods:
        per_step = per_round if STRATEGIES[method].mode == "sync" else 1
        rows = [m for m in runs[method]["metrics"] if f"global_{metric}" in m]
        y = [m[f"global_{metric}"] for m in rows]
        axes[0].plot([max(m["virtual_time"], 1e-3) for m in rows], y, marker=".", label=method)
        axes[1].plot([m["step"] * per_step for m in rows], y, marker=".", label=method)
    for ax in axes:
        ax.axhline(ref["target"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.axhline(ref["central"], color="black", linestyle=":", linewidth=1, label="central")
        ax.set_ylabel(f"global {metric}")
        ax.legend(fontsize=8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("virtual time [s] (log)")
    axes[1].set_xlabel("client updates")
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/s-cls-cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write here instead of RESULTS.md")
    ap.add_argument(
        "--reuse", action="store_true", help="take finished runs of the same config from disk"
    )
    args = ap.parse_args()
    started = time.perf_counter()
    base = load_config(args.config, args.overrides)
    seeds = args.seeds or [base.seed]
    fed = build_federated_data(base.data, data_dir=args.data_dir)
    per_seed = [run_seed(base, fed, seed, args.methods, args.reuse) for seed in seeds]
    metric = per_seed[0][1][args.methods[0]]["summary"]["metric"]
    where = (args.out or RESULTS).parent
    key = f"{SECTION}-{base.name}-seeds-" + "-".join(map(str, seeds))
    f = base.federation
    figure = plot(per_seed, args.methods, metric, f.clients_per_round, where / f"{key}.png")
    seeds_text = ", ".join(map(str, seeds))
    refs = "; ".join(
        f"seed {s}: base {r['base']:.4g}, central {r['central']:.4g}, target {r['target']:.4g}"
        f" (loss: base {r['loss_base']:.4g}, central {r['loss_central']:.4g}, "
        f"target {r['loss_target']:.4g})"
        for s, (r, _) in zip(seeds, per_seed, strict=True)
    )
    lines = [
        f"- wall time: {time.perf_counter() - started:.0f} s",
        f"- scenario: `{args.config}` — model `{base.model.name}`, data `{base.data.source}` "
        f"({base.data.partition.method} α={base.data.partition.alpha} over labels, "
        f"{base.data.partition.num_clients} clients), fleet `{base.fleet.name}`, "
        f"{f.rounds * f.clients_per_round} client updates per method "
        f"(sync {f.rounds} rounds × {f.clients_per_round}; async {f.concurrency} in flight), "
        f"local {base.train.steps} steps × batch {base.train.batch_size}, seeds {seeds}",
        f"- references ({metric}): {refs}",
        "",
        *table(base, per_seed, args.methods, metric),
        "",
        verdict(seeds, per_seed, metric),
        "",
        "Global loss (on the gold options), target from the same 0.9 rule:",
        "",
        *loss_table(per_seed, args.methods),
        "",
        "Idle fraction: a client's wait between delivering an update and starting the next one "
        "the server kept it for, over wait + busy time (sync: waiting for the round's slowest "
        "client; async: none, every arrival is re-dispatched at once). Updates applied: client "
        "updates incorporated into the global model (FedBuff: those in flushed buffers). A time "
        "to target of 0 means the base model already meets the target. Delivered updates by "
        "device: where the asynchronous arrivals came from (fast devices arrive more often). "
        "Clients delivering: how many distinct clients sent the delivered updates, and the "
        "share of the busiest one.",
        "",
        f"![{metric} vs virtual time and client updates]({figure.name})",
    ]
    title = f"Asynchronous methods: time to target ({base.name}, seeds {seeds_text})"
    print(write_section(key, title, "\n".join(lines), args.out))


if __name__ == "__main__":
    main()
