"""Heterogeneous ranks (issues #4, #22): FedIT at the smallest rank vs HetLoRA vs FlexLoRA vs FLoRA.

Scenario S-task with heterogeneous devices (``configs/hetrank-<size>.yaml``):
Super-NaturalInstructions, one task per client; the last 4 clients (by task name)
are held out as unseen clients; the heavy-tail rank profile over the four client
types (the config's ``strategy.params``). Arms, on the same data, fleet and seeds:

* ``fedit``: FedIT with every client at the smallest rank (type 0, MLP and
  attention alike): the bucket effect;
* ``hetlora``, ``flexlora`` and ``flora``: each client at its own rank; the shared
  adapter has ``lora.rank`` = the largest rank (FlexLoRA's global model is ΔW_g
  itself, FLoRA's the stacked products merged into the base).

Budget ``equal`` by default (every arm the config's rounds: the claims here are
about accuracy at equal rounds, not time). Reported per arm with 95 % CIs over
seeds (:mod:`fedhet.experiments`): ROUGE-L and loss on the global test set, on
the clients' own test splits (local) and on the unseen clients, paired
differences from FedIT, bytes and wall time.

    python benchmarks/exp_hetrank.py --size smoke --seeds 0 --set output_dir=/tmp/runs \\
        --out /tmp/hetrank.md                                          # seconds
    python benchmarks/exp_hetrank.py --size cpu --jobs 2               # → RESULTS.md
"""

from __future__ import annotations

from fedhet.config import load_config
from fedhet.experiments import script
from fedhet.experiments.runner import Arm
from fedhet.experiments.tables import Column, final, summary

METHODS = ("fedit", "hetlora", "flexlora", "flora")


def last_row(key: str):
    """The last evaluated row's ``key`` (local and unseen means live there)."""

    def value(run):
        rows = [r for r in run.rows if key in r]
        return rows[-1][key] if rows else None

    return value


COLUMNS = [
    Column("global ROUGE-L", final("rouge_l"), ".4f"),
    Column("Δ global ROUGE-L vs FedIT", final("rouge_l"), "+.4f", paired="difference"),
    Column("global loss", final("loss"), ".4f"),
    Column("Δ global loss vs FedIT", final("loss"), "+.4f", paired="difference"),
    Column("local ROUGE-L", last_row("local_rouge_l_mean"), ".4f"),
    Column("local loss", last_row("local_loss_mean"), ".4f"),
    Column("unseen ROUGE-L", last_row("unseen_rouge_l_mean"), ".4f"),
    Column("Δ unseen ROUGE-L vs FedIT", last_row("unseen_rouge_l_mean"), "+.4f", "difference"),
    Column("unseen loss", last_row("unseen_loss_mean"), ".4f"),
    Column("MB up", summary("bytes_up", 1e-6), ".1f"),
    Column("MB down", summary("bytes_down", 1e-6), ".1f"),
    Column("wall [s]", summary("wall_time"), ".0f"),
]


def main() -> None:
    ap = script.parser(__doc__.split("\n")[0], "hetrank")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.set_defaults(budget="equal")
    args = ap.parse_args()
    config = script.config_path(args)
    levels = load_config(config, args.overrides).strategy.params.get("rank_levels")
    if levels is None:
        raise SystemExit(f"{config}: strategy.params.rank_levels must name the four types' ranks")
    smallest = min(levels[0]) if isinstance(levels[0], list) else levels[0]
    arms = {
        "fedit": ("strategy.name=fedit", "strategy.params={}", f"lora.rank={smallest}"),
        "hetlora": ("strategy.name=hetlora",),
        "flexlora": ("strategy.name=flexlora",),
        "flora": ("strategy.name=flora",),
    }
    chosen = [Arm(n, arms[n]) for n in METHODS if n == "fedit" or n in args.methods]
    exp = script.experiment(args, "exp_hetrank", chosen, "fedit")
    results = script.run(exp, args)
    notes = [
        f"Ranks: FedIT at the smallest rank ({smallest}) for every client; HetLoRA, "
        f"FlexLoRA and FLoRA by the config's profile ({levels}). Local = each evaluated "
        "client's own test split; unseen = the held-out clients' data, global model."
    ]
    script.publish(
        results,
        args,
        f"Heterogeneous ranks: FedIT (smallest rank) vs HetLoRA vs FlexLoRA vs FLoRA "
        f"({config.stem})",
        COLUMNS,
        notes=notes,
        plot_key="loss",
    )


if __name__ == "__main__":
    main()
