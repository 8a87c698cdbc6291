"""Robustness and privacy (issue #10): FedIT under a boosting attack, with and without
robust aggregation, and DP-FedAvg's accuracy against its privacy budget ε.

All runs share one scenario (a config plus ``--set`` overrides; the federated data is
built once) and differ only in strategy and injected faults.

Attack: a fraction of the clients (default 20 %, drawn from the seed) send every
update boosted 100×: x_start + 100·(x_k − x_start) (fault ``scale``, see
:mod:`fedhet.runtime.faults`). Variants:

* ``clean``: FedIT, no attack (the reference);
* ``undefended``: FedIT under attack;
* ``clip``: ``robust`` (mean, every update clipped to the round's median norm);
* ``median``: ``robust`` (coordinate-wise median);
* ``trimmed-mean``: ``robust`` (trimmed mean, β = 0.2);

no update norm bound in validation, so every boosted update reaches the aggregator.
Reported: final global accuracy, its difference from ``clean`` in points, whether
a defence is within 2 points of ``clean``, and the final global loss (mean NLL of the
gold label), which moves smoothly where accuracy on a label-skewed federation can
swing by many points from one round to the next.

Privacy: ``dp-fedavg`` around FedIT, no attack, clip norm C (``--dp-clip``, set a
priori, not tuned) and each noise multiplier σ of ``--dp-sigmas``; reported: final
accuracy and ε at ``--dp-delta`` from the dp-accounting RDP accountant (fixed-size
sampling of m of N clients, what the simulator does).

    python benchmarks/exp_robustness.py --config configs/s-cls-cpu.yaml --set eval.every=6
    python benchmarks/exp_robustness.py --config configs/s-cls-smoke.yaml \\
        --set output_dir=/tmp/runs --out /tmp/exp_robustness.md              # smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedhet.config import ExperimentConfig, load_config
from fedhet.data.federated import FederatedData, build_federated_data
from fedhet.reports.results import write_section
from fedhet.runtime.faults import FaultSpec
from fedhet.runtime.sim import Simulation

SECTION = "exp_robustness"
DEFENCES: dict[str, dict[str, Any] | None] = {
    "clean": None,
    "undefended": None,
    "clip": {"aggregator": "mean", "clip_norm": "median"},
    "median": {"aggregator": "median"},
    "trimmed-mean": {"aggregator": "trimmed_mean", "trim_ratio": 0.2},
}


def variant(
    base: ExperimentConfig,
    name: str,
    seed: int,
    strategy: str,
    params: dict[str, Any],
    faults: list[FaultSpec],
) -> ExperimentConfig:
    cfg = base.model_copy(deep=True)
    cfg.name, cfg.seed = f"{base.name}/robustness-{name}-seed{seed}", seed
    cfg.strategy.name, cfg.strategy.params = strategy, params
    cfg.faults = faults
    return cfg


def run(cfg: ExperimentConfig, fed: FederatedData) -> dict[str, Any]:
    started = time.perf_counter()
    result = Simulation(cfg, fed=fed).run()
    last = result.metrics[-1]
    out = {
        "final": result.summary["final_global"],
        "loss": result.summary["final_global_loss"],
        "rejected": last["rejected"],
        "clipped": last.get("clipped"),
        "epsilon": last.get("dp_epsilon"),
        "boosted": sum(list(r.get("faults", {}).values()).count("scale") for r in result.metrics),
        "wall": time.perf_counter() - started,
    }
    print(cfg.name, out, flush=True)
    return out


def cell(values: list[float | None], fmt: str) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "—"
    text = format(float(np.mean(got)), fmt)
    return text + (" ± " + format(float(np.std(got)), fmt.lstrip("+")) if len(got) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/s-cls-cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's")
    ap.add_argument("--attack-fraction", type=float, default=0.2)
    ap.add_argument("--attack-scale", type=float, default=100.0)
    ap.add_argument("--dp-sigmas", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--dp-clip", type=float, default=0.5)
    ap.add_argument("--dp-delta", type=float, default=1e-5)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write here instead of RESULTS.md")
    args = ap.parse_args()
    started = time.perf_counter()
    base = load_config(args.config, args.overrides)
    if base.eval.metric != "accuracy":
        raise SystemExit(f"{args.config}: this experiment reports accuracy (eval.metric)")
    seeds = args.seeds or [base.seed]
    fed = build_federated_data(base.data, data_dir=args.data_dir)
    attack = [FaultSpec(kind="scale", fraction=args.attack_fraction, scale=args.attack_scale)]

    robust: dict[str, list[dict[str, Any]]] = {name: [] for name in DEFENCES}
    private: dict[float, list[dict[str, Any]]] = {s: [] for s in args.dp_sigmas}
    for seed in seeds:
        for name, params in DEFENCES.items():
            strategy = "fedit" if params is None else "robust"
            faults = [] if name == "clean" else attack
            cfg = variant(base, name, seed, strategy, params or {}, faults)
            robust[name].append(run(cfg, fed))
        for sigma in args.dp_sigmas:
            params = {"noise_multiplier": sigma, "clip_norm": args.dp_clip, "delta": args.dp_delta}
            cfg = variant(base, f"dp-sigma{sigma:g}", seed, "dp-fedavg", params, [])
            private[sigma].append(run(cfg, fed))

    clean = [r["final"] for r in robust["clean"]]

    def gap(rows: list[dict[str, Any]]) -> list[float]:
        return [100 * (r["final"] - c) for r, c in zip(rows, clean, strict=True)]

    f = base.federation
    lines = [
        f"- wall time: {time.perf_counter() - started:.0f} s",
        f"- scenario: `{args.config}` {' '.join(f'--set {o}' for o in args.overrides)} — "
        f"model `{base.model.name}`, data `{base.data.source}` "
        f"({base.data.partition.method} α={base.data.partition.alpha}, "
        f"{base.data.partition.num_clients} clients), {f.rounds} rounds × "
        f"{f.clients_per_round} clients, local {base.train.steps} steps × batch "
        f"{base.train.batch_size}, fleet `{base.fleet.name}`, seeds {seeds}",
        f"- attack: {args.attack_fraction:.0%} of the clients boost every update "
        f"{args.attack_scale:g}× (fault `scale`); no norm bound in validation",
        "",
        "| variant | strategy | final accuracy [%] | vs clean [points] | within 2 points "
        "| final global loss | boosted updates sent | clipped | wall [s] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in robust.items():
        gaps = gap(rows)
        within = "—" if name == "clean" else ("yes" if all(abs(g) <= 2 for g in gaps) else "no")
        strategy = "fedit" if DEFENCES[name] is None else f"robust {DEFENCES[name]}"
        lines.append(
            f"| {name} | {strategy} | {cell([100 * r['final'] for r in rows], '.1f')} "
            f"| {cell(gaps, '+.1f')} | {within} | {cell([r['loss'] for r in rows], '.3f')} "
            f"| {cell([r['boosted'] for r in rows], '.0f')} "
            f"| {cell([r['clipped'] for r in rows], '.0f')} "
            f"| {cell([r['wall'] for r in rows], '.0f')} |"
        )
    lines += [
        "",
        f"DP-FedAvg around FedIT (no attack): clip norm C = {args.dp_clip:g}, "
        f"δ = {args.dp_delta:g}, ε from dp-accounting's RDP accountant "
        "(m of N clients sampled without replacement).",
        "",
        "| σ | ε | final accuracy [%] | vs clean [points] | final global loss "
        "| updates clipped | wall [s] |",
        "|---|---|---|---|---|---|---|",
        f"| — (FedIT) | ∞ | {cell([100 * c for c in clean], '.1f')} | 0 "
        f"| {cell([r['loss'] for r in robust['clean']], '.3f')} | — | — |",
    ]
    for sigma, rows in private.items():
        lines.append(
            f"| {sigma:g} | {cell([r['epsilon'] for r in rows], '.3g')} "
            f"| {cell([100 * r['final'] for r in rows], '.1f')} | {cell(gap(rows), '+.1f')} "
            f"| {cell([r['loss'] for r in rows], '.3f')} "
            f"| {cell([r['clipped'] for r in rows], '.0f')} "
            f"| {cell([r['wall'] for r in rows], '.0f')} |"
        )
    title = f"Robustness and privacy ({base.name})"
    print(write_section(f"{SECTION}-{base.name}", title, "\n".join(lines), args.out))


if __name__ == "__main__":
    main()
