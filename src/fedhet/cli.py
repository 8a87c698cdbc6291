"""The ``fedhet`` command line.

Every command turns a :class:`~fedhet.errors.FedhetError` into one red line on
stderr and exit code 2; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedhet.errors import FedhetError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Federated LoRA fine-tuning of LLMs across heterogeneous clients.",
)


@app.callback()
def _quiet_libraries() -> None:
    """Library progress bars (weight loading, conversion) would bury fedhet's own, and
    their deprecation warnings are nothing a user can act on. When stdout is not a
    terminal (a log file), fedhet logs one line per round or arrival instead of a
    progress bar."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for module in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    fedhet_log = logging.getLogger("fedhet")
    for old in [h for h in fedhet_log.handlers if isinstance(h, _LogFileLines)]:
        fedhet_log.removeHandler(old)  # one per command, also when called again in-process
    if not sys.stdout.isatty():
        handler = _LogFileLines(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        fedhet_log.addHandler(handler)
        fedhet_log.setLevel(logging.INFO)


class _LogFileLines(logging.StreamHandler):
    """fedhet's log lines on stdout when it is not a terminal (a line per round)."""


data_app = typer.Typer(no_args_is_help=True, help="Inspect federated datasets.")
app.add_typer(data_app, name="data")
study_app = typer.Typer(no_args_is_help=True, help="Measurement studies (sweeps, one report).")
app.add_typer(study_app, name="study")
console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="experiment YAML file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a field: --set federation.rounds=3")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="delete an earlier run of the same name first")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="dataset folder (else $FEDHET_DATA, ../shared/data)"),
]


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedhetError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


@app.command()
@_user_errors
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Simulate one experiment: N clients, any strategy, on a virtual clock."""
    from fedhet.config import load_config
    from fedhet.runtime.run_dir import check_run_dir, clear_run_dir
    from fedhet.runtime.sim import Simulation

    cfg = load_config(config, set_)
    check_run_dir(cfg, resume=resume, overwrite=overwrite)
    sim = Simulation(cfg, data_dir=data_dir, show_progress=sys.stdout.isatty())
    if overwrite:
        clear_run_dir(cfg)
    result = sim.run(resume=resume)
    _print_summary({cfg.strategy.name: result.summary})
    console.print(f"outputs in [bold]{result.run_dir}[/]")


@app.command()
@_user_errors
def compare(
    config: ConfigArg,
    strategies: Annotated[str, typer.Option(help="comma-separated strategy names")],
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run several strategies on the identical scenario; one table, one plot."""
    from fedhet.runtime.compare import compare_strategies

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    out = compare_strategies(config, names, set_ or [], data_dir=data_dir, overwrite=overwrite)
    _print_summary(out.summaries)
    console.print(f"table and plot in [bold]{out.out_dir}[/]")


@app.command()
@_user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run's or a comparison's output folder")],
) -> None:
    """Plot a run's metrics (PNG files next to metrics.jsonl); for a `compare` folder,
    every run's and the comparison's plots."""
    from fedhet.reports.plots import plot_report

    for path in plot_report(run_dir):
        console.print(f"wrote {path}")


@app.command("train-central")
@_user_errors
def train_central(
    config: ConfigArg,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train one adapter on the union of all clients' data (the upper bound)."""
    from fedhet.config import load_config
    from fedhet.runtime.run_dir import check_run_dir, clear_run_dir
    from fedhet.runtime.sim import Simulation

    cfg = load_config(config, set_)
    cfg.name = f"{cfg.name}-central"
    check_run_dir(cfg, overwrite=overwrite)
    sim = Simulation(cfg, data_dir=data_dir)
    if overwrite:
        clear_run_dir(cfg)
    result = sim.run_central()
    _print_summary({"central": result.summary})
    console.print(f"outputs in [bold]{result.run_dir}[/]")


@data_app.command("describe")
@_user_errors
def data_describe(config: ConfigArg, set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Per-client record counts by category for a config's partition."""
    from fedhet.config import load_config
    from fedhet.data.describe import describe_table
    from fedhet.data.federated import build_federated_data

    cfg = load_config(config, set_)
    console.print(describe_table(build_federated_data(cfg.data, data_dir=data_dir)))


@data_app.command("check")
@_user_errors
def data_check(config: ConfigArg, set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Load and map a config's data and summarise it (no model is loaded): records,
    fields, label set, token lengths, per-client counts, and any problem."""
    from fedhet.config import load_config
    from fedhet.data.check import data_report
    from fedhet.data.encode import encode
    from fedhet.data.federated import build_federated_data
    from fedhet.model.base import load_tokenizer

    cfg = load_config(config, set_)
    fed = build_federated_data(cfg.data, data_dir=data_dir)
    try:
        tokenizer = load_tokenizer(cfg.model.name)
    except FedhetError as err:
        console.print(f"token lengths unavailable: {err}", highlight=False)
        lengths = None
    else:
        train = [r for c in fed.clients for r in c.train]
        lengths = [len(e.input_ids) for e in encode(train, tokenizer, 10**9)]
    report = data_report(fed, cfg.eval.metric, lengths, cfg.data.max_length)
    console.print(report, highlight=False, markup=False, soft_wrap=True)


@study_app.command("context")
@_user_errors
def study_context(
    config: Annotated[Path, typer.Argument(help="study YAML: an experiment + a study section")],
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="also write the report section into this file")
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", min=1, help="units side by side, one thread each")
    ] = 1,
) -> None:
    """Context length/quality/quantity as non-IID dimensions (CLLoRA): a paired
    model x axis x alpha x seed sweep; finished units are reused."""
    import shlex

    from fedhet.study.context import load_study, run_context_study

    cfg, study = load_study(config, set_)
    command = shlex.join(["fedhet", *sys.argv[1:]])
    result = run_context_study(
        cfg, study, data_dir=data_dir, out=out, command=command, jobs=jobs,
        log=lambda line: console.print(line, markup=False, highlight=False),
    )
    console.print(result.report, markup=False, highlight=False)
    console.print(f"outputs in [bold]{result.out_dir}[/]")


def _print_summary(summaries: dict[str, dict]) -> None:
    """One column per strategy, one row per figure."""
    from rich.table import Table

    from fedhet.reports.summary import fmt

    table = Table(title="results")
    table.add_column("")
    for name in summaries:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s))
    for key in keys:
        table.add_row(key, *[fmt(s.get(key)) for s in summaries.values()])
    console.print(table)


if __name__ == "__main__":
    app()
