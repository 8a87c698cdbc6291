"""What every ``benchmarks/exp_*.py`` shares: its command-line options and the
run → table → RESULTS.md section sequence.

    --size S | --config FILE   the scenario (``configs/<scenario>-<S>.yaml``)
    --set KEY=VALUE            overrides for every arm (repeatable)
    --seeds 0 1 2              seeds (default: PROTOCOL v2's 0, 1, 2)
    --arms A B                 where the script offers it (:func:`add_arms`): these arms
                               and the baseline
    --jobs N                   worker processes, one thread each (default 1)
    --budget protocol|time|equal  PROTOCOL v2's chase budget; the same without the stop
                               at the target (every arm to the baseline's virtual time
                               T: final figures at equal time); or every arm the config's
    --central                  also run the central reference (PROTOCOL's v1 target line)
    --table-only               run nothing: the table of the finished runs on disk
    --unfinished               with --table-only, also the runs still going (marked)
    --out FILE                 write the section here instead of benchmarks/RESULTS.md
    --records DIR              keep finished runs' records here (default: benchmarks/records,
                               kept in git, so a comparison resumes on a fresh clone; none
                               at --size smoke); --no-records keeps none
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from fedhet.experiments.runner import Arm, Experiment, Results, load_results, run_experiment
from fedhet.experiments.tables import Claim, Column, plot, report
from fedhet.reports.results import RESULTS, write_section

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
RECORDS = CONFIGS.parent / "benchmarks" / "records"
PROTOCOL_SEEDS = (0, 1, 2)  # PROTOCOL v2: "seeds 0, 1, 2 at least"


def parser(description: str, scenario: str, default_size: str = "cpu") -> argparse.ArgumentParser:
    """The shared options (module docstring); ``scenario`` names the config family."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--size", choices=("smoke", "cpu", "gpu"), default=default_size)
    ap.add_argument("--config", type=Path, default=None, help=f"default: {scenario}-<size>.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(PROTOCOL_SEEDS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument(
        "--unfinished", action="store_true",
        help="with --table-only: include the runs still going, as far as they got",
    )
    ap.add_argument("--budget", choices=("protocol", "time", "equal"), default="protocol")
    ap.add_argument("--central", action="store_true", help="also the central reference")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of RESULTS.md")
    ap.add_argument("--records", type=Path, default=None,
                    help="finished runs' records (default: benchmarks/records; none for smoke)")
    ap.add_argument("--no-records", action="store_true", help="keep no records")
    ap.set_defaults(scenario=scenario)
    return ap


def add_arms(ap: argparse.ArgumentParser, names: Sequence[str],
             default: Sequence[str] | None = None) -> None:
    """The ``--arms`` option of a script whose arms are ``names``."""
    ap.add_argument("--arms", nargs="+", choices=list(names), default=list(default or names),
                    help="the arms to run or tabulate (the baseline always)")


def chosen(arms: Sequence[Arm], names: Sequence[str], baseline: str) -> list[Arm]:
    """``arms`` (in their order) that are the baseline or named in ``names``."""
    return [arm for arm in arms if arm.name == baseline or arm.name in names]


def config_path(args: argparse.Namespace) -> Path:
    return args.config or CONFIGS / f"{args.scenario}-{args.size}.yaml"


def experiment(
    args: argparse.Namespace,
    name: str,
    arms: list[Arm],
    baseline: str,
    overrides: Sequence[str] = (),
) -> Experiment:
    """The experiment ``<name>-<config stem>[-<variant>]`` of ``arms`` with the shared
    options (seeds, ``--set`` overrides then ``overrides``, budget, data folder,
    central). A variant of the scenario gets its own key, hence its own runs, records
    and RESULTS.md section, never replacing the scenario's: ``-at-T`` for the
    ``time`` budget, ``-seeds-<s>-…`` for seeds other than PROTOCOL's 0, 1, 2 (e.g.
    more seeds for an undecided claim), ``-set-<hash>`` for ``--set`` overrides (but
    ``output_dir``). Runs that are the same computation are still shared (the runner's
    twins), so the section of seeds 0–4 reuses the runs of seeds 0–2."""
    config = config_path(args)
    key = f"{name}-{config.stem}"
    if args.budget == "time":
        key += "-at-T"
    if list(args.seeds) != list(PROTOCOL_SEEDS):
        key += "-seeds-" + "-".join(map(str, args.seeds))
    changes = sorted(o for o in args.overrides if not o.startswith("output_dir="))
    if changes:
        key += "-set-" + hashlib.sha1("\n".join(changes).encode()).hexdigest()[:6]
    return Experiment(
        key=key,
        config=config,
        arms=arms,
        seeds=args.seeds,
        overrides=[*args.overrides, *overrides],
        baseline=baseline,
        budget=args.budget,
        central=args.central,
        data_dir=args.data_dir,
        records=records_dir(args),
    )


def records_dir(args: argparse.Namespace) -> Path | None:
    """Where finished runs' records are kept (module docstring): none at smoke size."""
    if args.no_records:
        return None
    return args.records or (None if args.size == "smoke" else RECORDS)


def run(exp: Experiment, args: argparse.Namespace) -> Results:
    """Run (or, with ``--table-only``, load) the experiment's runs; exits when none
    has finished."""
    if args.table_only:
        results = load_results(exp, unfinished=args.unfinished)
    else:
        results = run_experiment(exp, jobs=args.jobs)
    if not any(results.runs.values()):
        raise SystemExit(f"{exp.key}: no finished runs under {exp.config}'s output_dir")
    return results


def publish(
    results: Results,
    args: argparse.Namespace,
    title: str,
    columns: Sequence[Column],
    claims: Sequence[Claim] = (),
    notes: Sequence[str] = (),
    plot_key: str | None = None,
    extra: Callable[[Results], list[str]] | None = None,
) -> Path:
    """Write the experiment's section (named after its key) with its plot."""
    exp = results.experiment
    if exp.budget == "time":
        title += ", every arm to the baseline's virtual time T"
    where = (args.out or RESULTS).parent
    figure = None
    if any(results.runs.values()):
        figure = plot(results, where / f"{exp.key}.png", plot_key)
    body = report(results, columns, claims, [*notes, *(extra(results) if extra else [])], figure)
    path = write_section(exp.key, title, body, args.out)
    print(path)
    return path
