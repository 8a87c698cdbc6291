"""Bringing one's own data, and runs that never lose results (README "Your own data").

Every bad input is one line naming the file or field, exit code 2, and leaves an
existing run folder exactly as it was.
"""

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedhet.cli import app
from fedhet.config import load_config
from fedhet.model.lora import load_adapter

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "own_data"
REVIEWS = EXAMPLES / "reviews.yaml"
runner = CliRunner()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _fedhet(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of the reviews example (CSV, label list, separate test file)."""
    out = tmp_path_factory.mktemp("runs")
    result = _fedhet("run", REVIEWS, "--set", f"output_dir={out}")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_a_csv_with_a_label_list_and_a_test_file_runs(finished_run):
    run_dir = finished_run / "reviews"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert 0.0 <= rows[-1]["global_accuracy"] <= 1.0 and "global_loss" in rows[-1]
    cfg = load_config(REVIEWS)
    assert Path(cfg.data.test_path).is_absolute()  # relative to the config file
    assert "accuracy by mean log-likelihood" in (run_dir / "summary.md").read_text()
    _, adapter_config = load_adapter(run_dir / "final_adapter")
    assert adapter_config["base_model_name_or_path"] == "tiny"


def test_data_check_summarises_without_a_model():
    result = _fedhet("data", "check", REVIEWS)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "30 global test" in out  # the whole test file (global_test_size 30)
    assert "label options: 3 (negative, neutral, positive)" in out
    assert "tokens per training example" in out and "clients: 4" in out
    assert "no problems found" in out


def _bad_utf8(tmp_path: Path) -> list[str]:
    path = tmp_path / "latin1.csv"
    path.write_bytes("review,label\ncaf\xe9 is nice,positive\n".encode("latin-1"))
    return [f"data.path={path}", "data.test_path=null", "data.global_test_size=1"]


BAD = {
    "no path": (["data.path=null"], "set data.path"),
    "unknown key": (["data.option=[a, b]"], "did you mean 'options'"),
    "a split of a file": (["data.test_split=test", "data.test_path=null"], "data.test_path"),
    "too many per round": (["federation.clients_per_round=9"], "federation.clients_per_round=9"),
    "unknown strategy": (["strategy.name=fedx"], "unknown strategy 'fedx'"),
    "responses not among the options": (
        ["data.options=[negative, positive]"],
        r"\d+ of \d+ records have a response that is not among their options",
    ),
    "accuracy without options": (["data.options=null"], "eval.metric=accuracy needs label options"),
    "bad model name": (["model.name=no-such-org/no-such-model"], "unknown model"),
    "not utf-8": (_bad_utf8, r"latin1\.csv: not UTF-8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(finished_run, tmp_path, case):
    overrides, expected = BAD[case]
    overrides = overrides(tmp_path) if callable(overrides) else overrides
    before = _snapshot(finished_run)
    sets = [arg for o in [f"output_dir={finished_run}", "name=fresh", *overrides]
            for arg in ("--set", o)]
    result = _fedhet("run", REVIEWS, *sets)
    assert result.exit_code == 2, result.output
    assert re.search(expected, result.output), result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one message (wrapped at most once)
    assert _snapshot(finished_run) == before  # no file written, none changed
    assert not (finished_run / "fresh").exists()


@pytest.mark.slow
def test_an_existing_run_name_is_never_silently_reused(finished_run):
    before = _snapshot(finished_run)
    again = _fedhet("run", REVIEWS, "--set", f"output_dir={finished_run}")
    assert again.exit_code == 2
    assert "--resume" in again.output and "--overwrite" in again.output
    changed = _fedhet("run", REVIEWS, "--set", f"output_dir={finished_run}",
                      "--set", "federation.rounds=3", "--resume")
    assert changed.exit_code == 2
    assert "federation.rounds: 2 → 3" in changed.output
    other = _fedhet("compare", REVIEWS, "--strategies", "fedit,nosuch",
                    "--set", f"output_dir={finished_run}", "--set", "name=cmp")
    assert other.exit_code == 2 and "nosuch" in other.output
    assert not (finished_run / "cmp").exists()  # refused before the first run
    assert _snapshot(finished_run) == before


@pytest.mark.slow
def test_resume_of_a_finished_run_with_its_config_changes_no_result(finished_run, tmp_path):
    cfg_args = ["--set", f"output_dir={tmp_path}"]
    assert _fedhet("run", REVIEWS, *cfg_args).exit_code == 0
    metrics = (tmp_path / "reviews" / "metrics.jsonl").read_text()
    resumed = _fedhet("run", REVIEWS, *cfg_args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "reviews" / "metrics.jsonl").read_text() == metrics
    overwritten = _fedhet("run", REVIEWS, *cfg_args, "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    first = _fedhet("run", EXAMPLES / "qa.yaml", *cfg_args, "--resume")  # nothing to resume yet
    assert first.exit_code == 0, first.output
    assert (tmp_path / "qa" / "final_adapter").is_dir()


def _readme_commands() -> list[str]:
    """The ``fedhet`` commands of the README's "Your own data" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [
        line.split("#", 1)[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.startswith("fedhet ")
    ]


@pytest.mark.slow
def test_every_command_of_the_readme_section_runs(tmp_path, monkeypatch):
    commands = _readme_commands()
    assert len(commands) >= 5
    monkeypatch.chdir(tmp_path)  # runs/ lands here; the configs are found in the repo
    for command in commands:
        args = [a.replace("examples/", f"{REPO}/examples/") for a in shlex.split(command)[1:]]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{command}\n{result.output}"
    for name in ("reviews", "reviews-tsv", "qa", "quiz"):
        assert (tmp_path / "runs" / name / "final_adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_a_log_file_gets_a_line_per_round_with_an_eta(tmp_path):
    """stdout is not a terminal here (as when redirected to a file): no progress bar,
    one line per round with the elapsed time and the ETA, as the run goes."""
    result = _fedhet("run", EXAMPLES / "qa.yaml", "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "step " in line]
    assert any("step 1/2" in line and "ETA" in line for line in lines)
    assert any("step 2/2" in line for line in lines)
    assert "FutureWarning" not in result.output


def test_the_adapter_names_a_base_model_peft_can_find(tmp_path):
    from fedhet.model.base import base_model_reference

    assert base_model_reference("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_reference("some-org/some-model") == "some-org/some-model"
    assert base_model_reference(tmp_path) == str(tmp_path.resolve())
