"""The experiment runner and its statistics (PROTOCOL v2): intervals, paired
comparisons and verdicts on made-up per-seed numbers; the runner's budgets,
reference points, reuse and table on the smoke scenario."""

import math
from dataclasses import replace
from pathlib import Path

import pytest

from fedhet.client.evaluate import _option_cross_entropy  # noqa: PLC2701 (unit under test)
from fedhet.experiments import runner as runner_module
from fedhet.experiments.runner import Arm, Experiment, load_results, run_experiment, same_run
from fedhet.experiments.stats import interval, paired, seeds_needed, verdict
from fedhet.experiments.tables import Claim, report, standard_columns, time_to_target

REPO = Path(__file__).resolve().parents[1]


def test_interval_is_the_t_interval_by_hand():
    est = interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, t_{0.975, 2} = 4.302653 → half-width 4.302653 / √3
    assert est.mean == 2.0 and est.std == pytest.approx(1.0)
    assert est.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    one = interval([5.0, None])
    assert one.mean == 5.0 and one.low is None and one.n == 1
    assert interval([None, None]) is None


def test_paired_ratios_shares_and_differences():
    arm, base = [2.0, 4.0, None, 0.0], [6.0, 4.0, 1.0, 3.0]
    assert paired(arm, base, "ratio") == [3.0, 1.0, None, None]  # base / arm; arm 0: none
    assert paired(arm, base, "relative") == [pytest.approx(1 / 3), 1.0, None, 0.0]
    assert paired(arm, base, "difference") == [-4.0, 0.0, None, -3.0]


def test_verdicts_and_the_seeds_that_would_decide():
    est = interval([2.0, 2.2, 1.8])  # mean 2, s = 0.2, half-width 0.497
    assert verdict(est, 1.0, ">=") == ("confirmed", None)
    assert verdict(est, 3.0, ">=") == ("refuted", None)
    assert verdict(est, 3.0, "<=") == ("confirmed", None)
    assert verdict(est, 1.0, "<=") == ("refuted", None)
    word, needed = verdict(est, 1.8, ">=")
    # smallest n with t_{0.975, n−1} · 0.2 / √n < 0.2: n = 6 gives 1.05, n = 7 gives 0.925
    assert word == "inconclusive" and needed == 7
    assert seeds_needed(est, 2.0) is None  # the mean on the threshold: no n decides it
    assert verdict(interval([2.0]), 1.0, ">=")[0] == "inconclusive"  # one seed: no interval


def test_option_cross_entropy():
    # −log of the gold option's probability normalised over the options
    scores = [(1.0, 1), (2.0, 3)]
    expected = -math.log(math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0)))
    assert _option_cross_entropy(scores, 0) == pytest.approx(expected)
    assert _option_cross_entropy([(3.0, 1)] * 4, 2) == pytest.approx(math.log(4))


@pytest.fixture
def experiment(tmp_path):
    return Experiment(
        key="exp_test",
        config=REPO / "configs" / "s-cls-smoke.yaml",
        arms=[
            Arm("fedit", ("strategy.name=fedit",)),
            Arm("fedasync", ("strategy.name=fedasync", "federation.regime=bounded")),
        ],
        seeds=[0, 1],
        overrides=[f"output_dir={tmp_path}", "eval.local_clients=0", "eval.global_size=8"],
        baseline="fedit",
    )


@pytest.mark.slow  # two arms × two seeds of the smoke scenario, ~30 s
def test_runner_budgets_references_reuse_and_table(experiment, monkeypatch, tmp_path):
    logged: list[str] = []
    results = run_experiment(experiment, log=logged.append)
    # the baseline on every seed first, then arm by arm
    started = [line for line in logged if line.startswith("start:")]
    assert started == [
        "start: fedit seed 0", "start: fedit seed 1",
        "start: fedasync seed 0", "start: fedasync seed 1",
    ]
    for seed in experiment.seeds:
        base, chaser = results.runs["fedit"][seed], results.runs["fedasync"][seed]
        ref = results.references[seed]
        # the seed draws the partition too; both arms share it
        assert base.cfg.data.seed == chaser.cfg.data.seed == seed
        # FedIT-reach target: base − 0.9 · (base − mean of FedIT's last 3 evaluations)
        values = [r["global_option_ce"] for r in base.evaluated()]
        final = sum(values[1:][-3:]) / len(values[1:][-3:])
        assert ref.target == pytest.approx(values[0] - 0.9 * (values[0] - final))
        assert ref.baseline_time == base.rows[-1]["virtual_time"]
        # the chase budget: 4× FedIT's updates, evaluated as often, T and the target
        fed = chaser.cfg.federation
        assert fed.max_arrivals == 4 * 4 * 3 and chaser.cfg.eval.every == 3
        assert fed.max_virtual_time == pytest.approx(ref.baseline_time)
        assert chaser.cfg.eval.stop_at_target and chaser.cfg.eval.target == ref.target
        stop, last = chaser.summary["stopped"], chaser.rows[-1]
        assert stop in {"target", "time", "budget"}
        if stop == "target":
            assert last["global_option_ce"] <= ref.target
        elif stop == "time":
            assert last["virtual_time"] >= ref.baseline_time
        else:
            assert last["step"] == fed.max_arrivals
    # finished runs are reused: nothing runs the second time
    monkeypatch.setattr(runner_module, "execute", lambda *a, **k: pytest.fail("ran again"))
    again = run_experiment(experiment, log=lambda _: None)
    assert again.references == results.references
    # ... also at another checkpoint cadence, which changes no result; not at another lr
    every_5 = [*experiment.overrides, "federation.checkpoint_every=5"]
    cadence = replace(experiment, overrides=every_5)
    assert run_experiment(cadence, log=lambda _: None).references == results.references
    cfg = results.runs["fedit"][0].cfg
    assert same_run(cfg, cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"checkpoint_every": 7})}))
    assert not same_run(cfg, cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"lr": 1.0})}))
    assert load_results(experiment).references == results.references
    # records: kept when a run finishes (or is found), reused on a fresh output folder
    records = tmp_path / "records"
    kept = replace(experiment, records=records)
    assert load_results(kept).references == results.references
    for name in ("fedit", "fedasync"):
        assert sorted(p.name for p in (records / "exp_test" / name / "seed0").iterdir()) == [
            "config.yaml", "metrics.jsonl", "summary.json"]
    fresh = replace(kept, overrides=[*experiment.overrides, f"output_dir={tmp_path / 'fresh'}"])
    again = run_experiment(fresh, log=lambda _: None)
    assert again.references == results.references
    assert again.runs["fedasync"][1].rows == results.runs["fedasync"][1].rows
    ttt = time_to_target(results)
    body = report(
        results,
        standard_columns(results),
        [Claim("FedAsync sooner than FedIT", "fedasync", ttt, "ratio", 1.0, ">=")],
    )
    assert "| fedit |" in body and "| fedasync |" in body and " ± " in body
    assert "FedAsync sooner than FedIT:" in body


def test_driver_stops_at_the_virtual_time_limit_and_at_the_target(smoke_config):
    from fedhet.runtime.sim import Simulation

    full = Simulation(smoke_config("name=full", "federation.rounds=4")).run().metrics
    limit = full[2]["virtual_time"]  # the end of round 2
    cut = Simulation(
        smoke_config("name=cut", "federation.rounds=4", f"federation.max_virtual_time={limit}")
    ).run()
    assert cut.metrics[-1]["step"] == 2 and cut.summary["stopped"] == "time"
    target = full[1]["global_loss"]  # the loss after round 1
    early = Simulation(
        smoke_config(
            "name=early", "federation.rounds=4", f"eval.target={target}", "eval.stop_at_target=true"
        )
    ).run()
    assert early.summary["stopped"] == "target" and early.metrics[-1]["step"] <= 1
    assert early.summary["time_to_target"] is not None
    assert "global_loss" in early.metrics[-1]  # it stops only on an evaluated step
    # resuming a run that had stopped trains nothing more
    again = Simulation(
        smoke_config("name=cut", "federation.rounds=4", f"federation.max_virtual_time={limit}")
    ).run(resume=True)
    assert [r["step"] for r in again.metrics] == [r["step"] for r in cut.metrics]


def test_an_async_run_stopped_at_the_target_dispatches_nothing_after_it(smoke_config):
    from fedhet.runtime.sim import Simulation

    flags = ("strategy.name=fedasync", "federation.max_arrivals=6", "eval.every=1")
    full = Simulation(smoke_config("name=all", *flags)).run().metrics
    target = full[2]["global_loss"]
    rows = Simulation(
        smoke_config("name=stop", *flags, f"eval.target={target}", "eval.stop_at_target=true")
    ).run().metrics
    assert rows[-1]["stopped"] == "target" and "dispatched" not in rows[-1]
    assert all("dispatched" in r for r in rows[1:-1])


def _fake_run(arm, seed, times_values, primary="option_ce"):
    from fedhet.experiments.runner import Run

    rows = [{"step": i, "virtual_time": t, f"global_{primary}": v}
            for i, (t, v) in enumerate(times_values)]
    return Run(arm, seed, None, {"primary": primary, "metric": "accuracy"}, rows)


def test_a_claim_is_not_confirmed_over_a_seed_that_never_reached_the_target():
    from fedhet.experiments.runner import References, Results
    from fedhet.experiments.tables import last_virtual_time, verdict_lines

    exp = Experiment("x", REPO / "configs" / "s-cls-smoke.yaml",
                     [Arm("base"), Arm("fast")], seeds=[0, 1, 2, 3])
    target = 1.0
    base = {s: _fake_run("base", s, [(0, 2.0), (60, 1.5), (100, 0.9)]) for s in range(4)}
    fast = {s: _fake_run("fast", s, [(0, 2.0), (10, 0.9)]) for s in range(3)}
    fast[3] = _fake_run("fast", 3, [(0, 2.0), (5, 1.8), (20, 1.5)])  # never reaches
    refs = {s: References(2.0, 0.9, target, 100.0) for s in range(4)}
    results = Results(exp, {"base": base, "fast": fast}, refs, 0.0)
    ttt = time_to_target(results)
    claim = Claim("fast ≥ 2× sooner", "fast", ttt, "ratio", 2.0, ">=", censored=last_virtual_time)
    (line,) = verdict_lines(results, [claim])
    # three seeds at exactly 10× with no spread would confirm; the fourth stops it
    assert "**inconclusive**" in line and "1 of 4 seeds run have no paired value" in line
    assert "seed 3: < 5 (none by 20)" in line  # 100 s / 20 s: at most 5× on that seed


def test_upper_bounds_of_seeds_that_never_reached_the_target_can_refute_a_speed_up():
    from fedhet.experiments.runner import References, Results
    from fedhet.experiments.tables import last_virtual_time, verdict_lines

    exp = Experiment("x", REPO / "configs" / "s-cls-smoke.yaml",
                     [Arm("base"), Arm("slow")], seeds=[0, 1, 2])
    base = {s: _fake_run("base", s, [(0, 2.0), (100, 0.9)]) for s in range(3)}
    # none reaches the target 1.0; their last evaluations: 20, 25, 22 virtual s
    slow = {s: _fake_run("slow", s, [(0, 2.0), (t, 1.5)]) for s, t in enumerate((20, 25, 22))}
    refs = {s: References(2.0, 0.9, 1.0, 100.0) for s in range(3)}
    results = Results(exp, {"base": base, "slow": slow}, refs, 0.0)
    ttt = time_to_target(results)
    six, one = (
        Claim(f"slow ≥ {k}×", "slow", ttt, "ratio", k, ">=", censored=last_virtual_time)
        for k in (6.0, 1.0)
    )
    refuted, open_ = verdict_lines(results, [six, one])
    # bounds 5, 4, 4.545: mean 4.52, t-interval up to ≈ 5.76 < 6
    assert "**refuted**: with the seeds that did not reach it" in refuted
    assert "**inconclusive**" in open_  # bounds below 6 say nothing about ≥ 1


def test_the_figure_at_the_baseline_time_ignores_evaluations_after_t():
    from fedhet.experiments.runner import References, Results
    from fedhet.experiments.tables import at_baseline_time, final

    exp = Experiment("x", REPO / "configs" / "s-cls-smoke.yaml", [Arm("base"), Arm("hier")],
                     seeds=[0, 1])
    # a run that ends with the round that crosses T = 80: its final row is at 86 s
    hier = {s: _fake_run("hier", s, [(0, 0.5), (76, 0.7), (86, 0.8)]) for s in range(2)}
    late = {0: _fake_run("hier", 0, [(90, 0.9)])}  # no evaluation by T
    refs = {0: References(2.0, 0.9, 1.0, 80.0), 1: References(2.0, 0.9, 1.0, 86.0)}
    results = Results(exp, {"base": {}, "hier": hier}, refs, 0.0)
    at_t = at_baseline_time(results, "option_ce")
    assert final("option_ce")(hier[0]) == 0.8
    assert at_t(hier[0]) == 0.7  # the 86 s row lies past seed 0's T
    assert at_t(hier[1]) == 0.8  # seed 1's T is 86 s: the row at T counts
    assert at_t(late[0]) is None
    assert at_t(_fake_run("hier", 5, [(0, 0.5)])) is None  # a seed without references


def test_a_record_of_another_config_is_replaced_not_kept(tmp_path):
    from fedhet.config import dump_config, load_config
    from fedhet.experiments.runner import keep_record, read_run

    def finished_run(*overrides: str):
        cfg = load_config(REPO / "configs" / "s-cls-smoke.yaml", [
            f"output_dir={tmp_path / 'runs'}", "name=exp/fedit/seed0", *overrides])
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, cfg.run_dir / "config.yaml")
        (cfg.run_dir / "metrics.jsonl").write_text('{"step": 0, "global_loss": 1.0}\n')
        (cfg.run_dir / "summary.json").write_text('{"stopped": "budget"}')
        return cfg

    records = tmp_path / "records"
    old = finished_run("train.lr=3e-4")
    keep_record(old, records)
    assert read_run(records / old.name, old) is not None
    new = finished_run("train.lr=1e-3")  # the scenario changed: same name, another run
    assert read_run(records / new.name, new) is None
    keep_record(new, records)
    assert read_run(records / new.name, new) is not None
    assert read_run(records / old.name, old) is None


def test_time_budget_runs_every_arm_to_t_without_stopping_at_the_target(experiment):
    from fedhet.experiments.runner import References, arm_config

    refs = References(base=2.0, baseline_final=1.0, target=1.1, baseline_time=42.0)
    for budget, stops in (("protocol", True), ("time", False)):
        exp = replace(experiment, budget=budget)
        chaser = arm_config(exp, exp.arms[1], 0, refs)
        assert chaser.eval.stop_at_target is stops
        assert chaser.federation.max_virtual_time == 42.0
        assert chaser.eval.target == 1.1
        baseline = arm_config(exp, exp.arms[0], 0, refs)
        assert not baseline.eval.stop_at_target
        assert baseline.federation.max_virtual_time is None


def test_a_variant_gets_its_own_key_and_shares_identical_runs(tmp_path):
    import argparse

    from fedhet.config import dump_config, load_config
    from fedhet.experiments import script
    from fedhet.experiments.runner import finished

    def key(budget: str = "protocol", *sets: str, seeds: tuple[int, ...] = (0, 1, 2)) -> str:
        args = argparse.Namespace(
            config=None, scenario="s-cls", size="smoke", overrides=list(sets), seeds=list(seeds),
            budget=budget, central=False, data_dir=None, records=None, no_records=True,
        )
        return script.experiment(args, "exp_x", [Arm("fedit")], "fedit").key

    assert key() == "exp_x-s-cls-smoke" == key("protocol", "output_dir=/tmp/r")
    assert key("time") == "exp_x-s-cls-smoke-at-T"
    assert key("time", seeds=(0, 1, 2, 3)) == "exp_x-s-cls-smoke-at-T-seeds-0-1-2-3"
    lr = key("protocol", "train.lr=1e-3")
    assert lr.startswith("exp_x-s-cls-smoke-set-") and lr != key("protocol", "train.lr=3e-4")
    # a record kept by another experiment with the same config but for its name is reused
    records = tmp_path / "records"
    smoke = REPO / "configs" / "s-cls-smoke.yaml"
    kept = load_config(smoke, [f"output_dir={tmp_path}", "name=exp_a/fedit/seed0"])
    (records / kept.name).mkdir(parents=True)
    dump_config(kept, records / kept.name / "config.yaml")
    (records / kept.name / "metrics.jsonl").write_text('{"step": 0, "global_loss": 1.0}\n')
    (records / kept.name / "summary.json").write_text('{"stopped": "budget"}')
    wanted = load_config(smoke, [f"output_dir={tmp_path}", "name=exp_b/fedit/seed0"])
    run = finished(wanted, records=records)
    assert run is not None and run.cfg.name == "exp_b/fedit/seed0" and run.arm == "fedit"
    other = load_config(smoke, [f"output_dir={tmp_path}", "name=exp_b/fedit/seed0",
                                "train.lr=0.5"])
    assert finished(other, records=records) is None
