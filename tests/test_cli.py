import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedhet.cli import app
from fedhet.config import load_config
from fedhet.errors import FedhetError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
runner = CliRunner()


def _write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_errors_name_the_file_and_the_field(tmp_path):
    with pytest.raises(FedhetError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad_yaml = _write(tmp_path, "name: x\ndata: [unclosed\n")
    with pytest.raises(FedhetError, match=r"exp.yaml: invalid YAML at line 3"):
        load_config(bad_yaml)
    unknown = _write(tmp_path, "data: {source: dolly}\nfederation: {roundz: 3}\n")
    with pytest.raises(FedhetError, match=r"field federation.roundz: Extra inputs"):
        load_config(unknown)
    negative = _write(tmp_path, "data: {source: dolly}\ntrain: {lr: -1}\n")
    with pytest.raises(FedhetError, match=r"field train.lr"):
        load_config(negative)
    with pytest.raises(FedhetError, match=r"field data: Field required"):
        load_config(_write(tmp_path, "name: x\n"))
    with pytest.raises(FedhetError, match="expected key=value"):
        load_config(SMOKE, ["federation.rounds"])


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(SMOKE, ["federation.rounds=7", "lora.target_modules=[q_proj]"])
    assert cfg.federation.rounds == 7 and cfg.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.name=no-such-model-anywhere"], "no-such-model-anywhere"),
        (["data.source=nosuchsource"], "nosuchsource"),
        (["strategy.name=nosuchstrategy"], "nosuchstrategy"),
        (["fleet.name=nosuchfleet"], "nosuchfleet"),
        (["lora.target_modules=[nosuchmodule]"], "nosuchmodule"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(tmp_path, overrides, expected):
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = runner.invoke(app, ["run", str(SMOKE), "--set", f"output_dir={tmp_path}", *sets])
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output


def test_malformed_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"q": "a", "a": "b"}\n{"q": broken\n')
    result = runner.invoke(
        app,
        ["run", str(SMOKE), "--set", f"output_dir={tmp_path}", "--set", "data.source=jsonl",
         "--set", f"data.path={data}", "--set", "data.fields={instruction: q, response: a}"],
    )
    assert result.exit_code == 2
    assert "mine.jsonl:2:" in result.output  # file:line


def test_data_describe_prints_per_client_counts():
    result = runner.invoke(app, ["data", "describe", str(SMOKE)])
    assert result.exit_code == 0, result.output
    assert "6 clients, 8 categories" in result.output


@pytest.mark.slow
def test_run_report_and_compare_end_to_end(tmp_path):
    out = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(SMOKE), "--set", f"output_dir={out}",
                                 "--set", "federation.rounds=1"])
    assert result.exit_code == 0, result.output
    run_dir = out / "smoke"
    report = runner.invoke(app, ["report", str(run_dir)])
    assert report.exit_code == 0, report.output
    assert (run_dir / "loss_vs_virtual_time.png").stat().st_size > 0
    cmp = runner.invoke(app, ["compare", str(SMOKE), "--strategies", "fedit,ffa-lora",
                              "--set", f"output_dir={out}", "--set", "federation.rounds=1",
                              "--set", "name=cmp"])
    assert cmp.exit_code == 0, cmp.output
    table = (out / "cmp" / "compare.md").read_text()
    assert "| fedit |" in table and "| ffa-lora |" in table
    assert (out / "cmp" / "compare.png").is_file()
    summary = json.loads((out / "cmp" / "fedit" / "summary.json").read_text())
    assert summary["final_global"] is not None
    # report on a compare folder: every run's plots and the comparison
    (out / "cmp" / "compare.png").unlink()
    report = runner.invoke(app, ["report", str(out / "cmp")])
    assert report.exit_code == 0, report.output
    assert (out / "cmp" / "compare.png").is_file()
    assert (out / "cmp" / "ffa-lora" / "loss_vs_step.png").is_file()


@pytest.mark.slow
def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedhet.cli", "run", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
