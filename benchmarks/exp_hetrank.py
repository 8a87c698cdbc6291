"""Heterogeneous ranks (issues #4, #22): FedIT at the smallest rank vs HetLoRA vs FlexLoRA vs FLoRA.

Scenario S-task with heterogeneous ranks (``configs/hetrank-<size>.yaml``, PROTOCOL
v2): Super-NaturalInstructions, one task per client; the last 4 clients (by task
name) are held out as unseen clients; the ``jetson`` fleet; the heavy-tail-strong
rank profile over the four client types (the config's ``strategy.params``: most
clients at the largest type, so the large-rank clients hold most of the data).
Arms, on the same data, fleet and seeds:

* ``fedit``: FedIT with every client at the smallest rank (type 0, MLP and
  attention alike): the bucket effect;
* ``hetlora``, ``flexlora`` and ``flora``: each client at its own rank; the shared
  adapter has ``lora.rank`` = the largest rank (FlexLoRA's global model is ΔW_g
  itself, FLoRA's the stacked products merged into the base).

Budget ``equal`` by default (every arm the config's rounds): the papers' claims are
about the model reached at equal rounds; the loss target from FedIT's run still
gives "time to target". Reported per arm with 95 % CIs over seeds: the standard
columns (time to the loss target, final global loss and ROUGE-L, local figure,
bytes, …), the loss and ROUGE-L on the unseen clients, the aggregation error
averaged over the rounds (every state at its own scaling α/r, so ranks mix), and
verdicts on each paper's claim over FedIT:

* HetLoRA (Cho et al., 2024): heterogeneous ranks beat homogeneous LoRA at the
  smallest rank; FlexLoRA (Bai et al., 2024): it beats FedIT at the smallest rank
  (the bucket effect), on the seen tasks and on unseen ones; FLoRA (Wang et al.,
  2024): exact stacking beats FedIT and HetLoRA. Each as "final global loss no
  higher" (paired difference ≤ 0), FlexLoRA's second claim on the unseen loss.

    python benchmarks/exp_hetrank.py --size smoke --seeds 0 --set output_dir=/tmp/runs \\
        --out /tmp/hetrank.md                                          # seconds
    python benchmarks/exp_hetrank.py --size cpu --jobs 2               # → RESULTS.md
"""

from __future__ import annotations

from fedhet.config import load_config
from fedhet.experiments import script
from fedhet.experiments.runner import Arm, Run
from fedhet.experiments.tables import (
    Claim,
    Column,
    final,
    mean_aggregation_error,
    standard_columns,
)

METHODS = ("fedit", "hetlora", "flexlora", "flora")


def last_row(key: str):
    """The last evaluated row's ``key`` (the unseen clients' means live there)."""

    def value(run: Run) -> float | None:
        rows = [r for r in run.rows if key in r]
        return rows[-1][key] if rows else None

    return value


UNSEEN = [
    Column("unseen loss", last_row("unseen_loss_mean"), ".4f"),
    Column("Δ unseen loss vs FedIT", last_row("unseen_loss_mean"), "+.4f", "difference"),
    Column("unseen ROUGE-L", last_row("unseen_rouge_l_mean"), ".4f"),
    Column("aggregation error (mean over rounds)", mean_aggregation_error, ".3g"),
]


def claims(names: list[str]) -> list[Claim]:
    """Each paper's claim over FedIT at the smallest rank (module docstring)."""
    loss, unseen = final("loss"), last_row("unseen_loss_mean")
    out = []
    if "hetlora" in names:
        out.append(Claim("HetLoRA at least as good as FedIT@min-rank (Δ final loss ≤ 0)",
                         "hetlora", loss, "difference", 0.0, "<="))
    if "flexlora" in names:
        out += [
            Claim("FlexLoRA at least as good as FedIT@min-rank (Δ final loss ≤ 0)",
                  "flexlora", loss, "difference", 0.0, "<="),
            Claim("FlexLoRA at least as good on unseen tasks (Δ unseen loss ≤ 0)",
                  "flexlora", unseen, "difference", 0.0, "<="),
        ]
    if "flora" in names:
        out.append(Claim("FLoRA at least as good as FedIT@min-rank (Δ final loss ≤ 0)",
                         "flora", loss, "difference", 0.0, "<="))
        if "hetlora" in names:
            out.append(Claim("FLoRA at least as good as HetLoRA (Δ final loss ≤ 0)",
                             "flora", loss, "difference", 0.0, "<=", versus="hetlora"))
    return out


def main() -> None:
    ap = script.parser(__doc__.split("\n")[0], "hetrank")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.set_defaults(budget="equal")
    args = ap.parse_args()
    config = script.config_path(args)
    params = load_config(config, args.overrides).strategy.params
    levels = params.get("rank_levels")
    if levels is None:
        raise SystemExit(f"{config}: strategy.params.rank_levels must name the four types' ranks")
    smallest = min(levels[0]) if isinstance(levels[0], list) else levels[0]
    arms = {
        "fedit": ("strategy.name=fedit", "strategy.params={}", f"lora.rank={smallest}"),
        "hetlora": ("strategy.name=hetlora",),
        "flexlora": ("strategy.name=flexlora",),
        "flora": ("strategy.name=flora",),
    }
    names = [n for n in METHODS if n == "fedit" or n in args.methods]
    exp = script.experiment(args, "exp_hetrank", [Arm(n, arms[n]) for n in names], "fedit")
    results = script.run(exp, args)
    notes = [
        f"Ranks: FedIT at the smallest rank ({smallest}) for every client; HetLoRA, "
        f"FlexLoRA and FLoRA by the config's profile ({params.get('rank_profile')}, "
        f"levels {levels}). Local = each evaluated client's own test split; unseen = the "
        "held-out clients' data, global model. Aggregation error: each state at its own "
        "scaling α/r against the data-weighted average of the clients' uploads (HetLoRA "
        "weights by update norm, which the error counts too)."
    ]
    script.publish(
        results,
        args,
        f"Heterogeneous ranks: FedIT (smallest rank) vs HetLoRA vs FlexLoRA vs FLoRA "
        f"({config.stem})",
        [*standard_columns(results), *UNSEEN],
        claims(names),
        notes,
    )


if __name__ == "__main__":
    main()
