"""FibecFed vs FedIT on non-IID classification, with ablations (issues #6, #21).

Scenario: S-cls v2 (``configs/s-cls-<size>.yaml``: AG News, Dirichlet α = 0.5
over the topics, 50 clients, 8 per round, the ``jetson`` fleet; primary figure
the option cross-entropy). The ``--set`` overrides apply to every arm. Arms, on
the identical federated data, devices and availability draws:

* ``fedit``: FedAvg on the LoRA factors (the baseline);
* ``fibecfed``: curriculum + global aggregation layers (GAL) + sparse local update;
* ``curriculum-only``, ``GAL-only``, ``sparse-only``: FibecFed with the other two
  parts switched off (``sparse-only`` masks neurons in every layer, all aggregated);
* optional (``--arms``): ``fibecfed-layer``, FibecFed whose sparse update freezes
  whole layers (``sparse_unit=layer``: the variant that saves backward compute),
  and ``fibecfed-loss``, FibecFed scoring difficulty by the per-sample loss.

FibecFed's parameters are DESIGN.md's defaults; when the config's strategy is
``fibecfed`` its ``strategy.params`` apply to every FibecFed arm, each ablation
setting its own switches on top.

Budget ``equal`` by default (every arm the config's rounds): issue #6's claims
compare bytes and final accuracy, which a run stopped at the target (PROTOCOL
v2's chase budget, ``--budget protocol``) would decide by construction; the
loss target (from FedIT's run) still gives "time to target". Reported per arm
with 95 % CIs over seeds: the standard columns (time to target, speed-up, final
figures, bytes, …), bytes as a share of FedIT's, and the share of client tokens
spent in scoring passes (``scoring_tokens`` of the updates over all their tokens);
verdicts, for FibecFed and each single-component arm, on "faster than FedIT"
(time-to-target speed-up ≥ 1) and "at least as accurate" (final accuracy
difference ≥ 0), and on issue #6's bytes target (≤ 0.6× FedIT).

    python benchmarks/exp_fibecfed.py --size cpu --jobs 2                  # → RESULTS.md
    python benchmarks/exp_fibecfed.py --size smoke --seeds 0 --set output_dir=/tmp/runs \\
        --out /tmp/exp_fibecfed.md                                           # smoke
"""

from __future__ import annotations

from typing import Any

from fedhet.experiments import script
from fedhet.experiments.runner import Arm, Run
from fedhet.experiments.tables import (
    Claim,
    Column,
    final,
    last_virtual_time,
    standard_columns,
    time_to_target,
)
from fedhet.protocol import Instruction
from fedhet.runtime.executor import ClientRun
from fedhet.runtime.sim import Simulation
from fedhet.strategies.base import Strategy

ABLATIONS: dict[str, tuple[str, ...]] = {
    "fedit": ("strategy.name=fedit", "strategy.params={}"),
    "fibecfed": ("strategy.name=fibecfed",),
    "curriculum-only": (
        "strategy.name=fibecfed", "strategy.params.gal=false", "strategy.params.sparse=false"
    ),
    "GAL-only": (
        "strategy.name=fibecfed", "strategy.params.curriculum=false", "strategy.params.sparse=false"
    ),
    "sparse-only": (
        "strategy.name=fibecfed", "strategy.params.curriculum=false", "strategy.params.gal=false"
    ),
    "fibecfed-layer": ("strategy.name=fibecfed", "strategy.params.sparse_unit=layer"),
    "fibecfed-loss": ("strategy.name=fibecfed", "strategy.params.score_with=loss"),
}
DEFAULT_ARMS = ["fedit", "fibecfed", "curriculum-only", "GAL-only", "sparse-only"]
COMPONENTS = ["fibecfed", "curriculum-only", "GAL-only", "sparse-only", "fibecfed-layer"]


class CountingSimulation(Simulation):
    """The simulator, also summing the client tokens its updates report (training
    ``tokens`` and ``scoring_tokens`` of difficulty passes) into every evaluated row."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scoring_tokens = 0.0
        self.client_tokens = 0.0

    def run_client(self, inst: Instruction, event: int) -> ClientRun:
        run = super().run_client(inst, event)
        if run.update is not None:
            metrics = run.update.metrics
            self.scoring_tokens += metrics["scoring_tokens"]
            self.client_tokens += metrics["tokens"] + metrics["scoring_tokens"]
        return run

    def evaluate(self, strategy: Strategy, state, *, final: bool = False) -> dict[str, Any]:
        row = super().evaluate(strategy, state, final=final)
        return row | {"scoring_tokens": self.scoring_tokens, "client_tokens": self.client_tokens}

    def state_dict(self) -> dict[str, Any]:  # the counts survive a resume
        return super().state_dict() | {"counts": (self.scoring_tokens, self.client_tokens)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.scoring_tokens, self.client_tokens = sd["counts"]


def scoring_share(run: Run) -> float | None:
    """Percentage of all client tokens spent in scoring passes (last evaluated row)."""
    rows = [r for r in run.rows if "client_tokens" in r]
    if not rows or not rows[-1]["client_tokens"]:
        return None
    return 100 * rows[-1]["scoring_tokens"] / rows[-1]["client_tokens"]


def total_bytes(run: Run) -> float:
    return float(run.summary["bytes_up"] + run.summary["bytes_down"])


def main() -> None:
    ap = script.parser(__doc__.split("\n")[0], "s-cls")
    script.add_arms(ap, list(ABLATIONS), DEFAULT_ARMS)
    ap.set_defaults(budget="equal")  # the claims compare bytes and accuracy at equal rounds
    args = ap.parse_args()
    every = [Arm(name, overrides, CountingSimulation) for name, overrides in ABLATIONS.items()]
    arms = script.chosen(every, args.arms, "fedit")
    names = [arm.name for arm in arms]
    exp = script.experiment(args, "exp_fibecfed", arms, "fedit")
    results = script.run(exp, args)
    ttt = time_to_target(results)
    accuracy = final("accuracy", 100.0)
    columns = [
        *standard_columns(results),
        Column("bytes vs FedIT", total_bytes, ".2f", paired="relative"),
        Column("scoring share of client tokens [%]", scoring_share, ".0f"),
    ]
    claims = [
        claim
        for arm in COMPONENTS
        if arm in names
        for claim in (
            Claim(f"{arm} reaches the target sooner than FedIT (speed-up ≥ 1)", arm, ttt,
                  "ratio", 1.0, ">=", censored=last_virtual_time),
            Claim(f"{arm} is at least as accurate as FedIT (Δ accuracy ≥ 0)", arm, accuracy,
                  "difference", 0.0, ">="),
        )
    ]
    if "fibecfed" in names:
        claims.append(
            Claim("FibecFed bytes ≤ 0.6× FedIT's", "fibecfed", total_bytes, "relative", 0.6, "<=")
        )
    notes = [
        "Bytes: all tensors sent down and up (FibecFed: every layer during the warm-up, then "
        "the GAL tensors down, and up except in refresh rounds, where every layer comes up). "
        "Virtual time charges every client token, scoring passes included (a Fisher pass as "
        "forward + backward through every block, a loss pass as a forward); neuron masks save "
        "no time, a frozen layer saves the backward below it. Global = GAL layers and the last "
        "refresh's average of the others; local (personalised) = each evaluated client's own "
        "test split with its own non-GAL layers."
    ]
    script.publish(
        results, args, f"FibecFed vs FedIT with ablations ({exp.config.stem})", columns, claims,
        notes,
    )


if __name__ == "__main__":
    main()
