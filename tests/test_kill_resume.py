"""Kill -9 ``fedhet run`` at random points five times, resume each time with
``--resume``: the final adapter equals an uninterrupted run's bit for bit, and
metrics.jsonl holds exactly the uninterrupted run's rows (timings aside).

Each ``fedhet run`` is a separate process, forked from a multiprocessing
forkserver that has imported fedhet once, so five restarts cost seconds instead
of five interpreter start-ups; the process runs the real CLI entry point and
dies by SIGKILL like any other.
"""

import json
import multiprocessing
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from fedhet.model.lora import load_adapter

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 10
SETTINGS = [
    f"federation.rounds={ROUNDS}",
    f"eval.every={ROUNDS}",
    "eval.local_clients=0",
    "eval.global_size=4",
    "train.steps=1",
    "federation.clients_per_round=2",
]
TIMINGS = {"wall_time", "eval_s", "train_s", "overhead_s"}


def fedhet_run(args: list[str]) -> None:
    """The ``fedhet`` command line, in the child process."""
    from fedhet.cli import app

    app(args, prog_name="fedhet")


def _start(ctx, out: Path, resume: bool):
    args = ["run", str(REPO / "configs" / "smoke.yaml"), "--set", f"output_dir={out}"]
    for item in SETTINGS:
        args += ["--set", item]
    process = ctx.Process(target=fedhet_run, args=(args + ["--resume"] * resume,))
    process.start()
    return process


def _rows(path: Path, since: int) -> int:
    """Rows of a metrics file last written after ``since`` (ns), else 0."""
    if not path.exists() or path.stat().st_mtime_ns <= since:
        return 0
    return path.read_text().count("\n")


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


@pytest.mark.slow
def test_kill_nine_five_times_and_resume_gives_the_same_adapter(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fedhet.cli", "fedhet.runtime.sim"])
    reference = _start(ctx, tmp_path / "reference", resume=False)  # runs alongside

    rng = random.Random(0)
    run_dir = tmp_path / "killed" / "smoke"
    metrics = run_dir / "metrics.jsonl"
    # kill once the run has logged at least `target` rows (steps 0..ROUNDS give ROUNDS+1),
    # plus a random delay: the kill lands anywhere in the next step (training, evaluation,
    # between the metrics row and the checkpoint, inside the checkpoint write ...)
    targets = sorted(rng.choices(range(1, ROUNDS - 4), k=5))  # slack: never finishes first
    for target in targets:
        since = metrics.stat().st_mtime_ns if metrics.exists() else 0
        process = _start(ctx, tmp_path / "killed", resume=True)
        deadline = time.monotonic() + 300
        while _rows(metrics, since) < target and process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.2))
        assert process.is_alive(), f"the run ended before its kill at row {target}"
        process.kill()  # SIGKILL
        process.join()
        assert process.exitcode == -signal.SIGKILL
    final = _start(ctx, tmp_path / "killed", resume=True)
    final.join(300)
    reference.join(300)
    assert final.exitcode == 0 and reference.exitcode == 0

    want, _ = load_adapter(tmp_path / "reference" / "smoke" / "final_adapter")
    got, _ = load_adapter(run_dir / "final_adapter")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert _metrics(run_dir) == _metrics(tmp_path / "reference" / "smoke")
