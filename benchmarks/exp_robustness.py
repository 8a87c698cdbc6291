"""Robustness and privacy (issue #10): FedIT under a boosting attack, with and without
robust aggregation, and DP-FedAvg's accuracy against its privacy budget ε.

All runs share one scenario (a config plus ``--set`` overrides; the federated data is
built once) and differ only in strategy and injected faults. Arm names (and run
folders): clean, undefended, clip, median, trimmed-mean, dp-sigma<σ>.

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

One experiment (:mod:`fedhet.experiments`), baseline ``clean``, budget ``equal``
(every arm the config's rounds), cells with 95 % CIs over seeds, a verdict per
defence on "within 2 points of clean" (paired accuracy difference ≥ −2).

    python benchmarks/exp_robustness.py --size cpu --jobs 2                 # → RESULTS.md
    python benchmarks/exp_robustness.py --size smoke --seeds 0 --set output_dir=/tmp/runs \\
        --out /tmp/exp_robustness.md                                         # smoke
"""

from __future__ import annotations

from fedhet.experiments import script
from fedhet.experiments.runner import Arm, Run
from fedhet.experiments.tables import Claim, Column, final, summary

DEFENCES = {
    "clip": "{aggregator: mean, clip_norm: median}",
    "median": "{aggregator: median}",
    "trimmed-mean": "{aggregator: trimmed_mean, trim_ratio: 0.2}",
}


def boosted(run: Run) -> float:
    """Boosted updates sent over the run (fault ``scale`` in the rows)."""
    return float(sum(list(r.get("faults", {}).values()).count("scale") for r in run.rows))


def last(key: str):
    return lambda run: run.rows[-1].get(key)


def main() -> None:
    ap = script.parser(__doc__.split("\n")[0], "s-cls")
    ap.add_argument("--attack-fraction", type=float, default=0.2)
    ap.add_argument("--attack-scale", type=float, default=100.0)
    ap.add_argument("--dp-sigmas", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--dp-clip", type=float, default=0.5)
    ap.add_argument("--dp-delta", type=float, default=1e-5)
    ap.set_defaults(budget="equal")
    args = ap.parse_args()
    attack = (
        f"faults=[{{kind: scale, fraction: {args.attack_fraction}, scale: {args.attack_scale}}}]"
    )
    arms = [
        Arm("clean", ("strategy.name=fedit", "strategy.params={}")),
        Arm("undefended", ("strategy.name=fedit", "strategy.params={}", attack)),
        *(
            Arm(name, ("strategy.name=robust", f"strategy.params={params}", attack))
            for name, params in DEFENCES.items()
        ),
        *(
            Arm(
                f"dp-sigma{sigma:g}",
                (
                    "strategy.name=dp-fedavg",
                    f"strategy.params={{noise_multiplier: {sigma}, clip_norm: {args.dp_clip}, "
                    f"delta: {args.dp_delta}}}",
                ),
            )
            for sigma in args.dp_sigmas
        ),
    ]
    exp = script.experiment(args, "exp_robustness", arms, "clean")
    results = script.run(exp, args)
    accuracy = final("accuracy", 100.0)
    columns = [
        Column("final accuracy [%]", accuracy, ".1f"),
        Column("Δ vs clean [points]", accuracy, "+.1f", paired="difference"),
        Column("final global loss", final("loss"), ".3f"),
        Column("boosted updates sent", boosted, ".0f"),
        Column("updates clipped", last("clipped"), ".0f"),
        Column("ε", last("dp_epsilon"), ".3g"),
        Column("wall [s]", summary("wall_time"), ".0f"),
    ]
    claims = [
        Claim(f"{name} within 2 points of clean under attack", name, accuracy, "difference",
              -2.0, ">=")
        for name in DEFENCES
    ]
    notes = [
        f"Attack: {args.attack_fraction:.0%} of the clients boost every update "
        f"{args.attack_scale:g}× (fault `scale`); no norm bound in validation. DP-FedAvg "
        f"around FedIT, no attack: clip norm C = {args.dp_clip:g}, δ = {args.dp_delta:g}, ε from "
        "dp-accounting's RDP accountant (m of N clients sampled without replacement)."
    ]
    script.publish(
        results, args, f"Robustness and privacy ({exp.config.stem})", columns, claims, notes,
        plot_key="accuracy",
    )


if __name__ == "__main__":
    main()
