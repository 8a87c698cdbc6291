"""fedhet on real Flower processes, on loopback only (127.0.0.1).

* ``flwr run`` of the project's Flower app on a local simulation federation
  (the default ``local`` SuperLink connection, started by the Flower CLI);
* the deployment recipe (``scripts/deploy/deploy.py``): TLS certificates and
  SuperNode keys, a SuperLink with TLS and SuperNode authentication, three
  registered SuperNodes each with its own data files, a FedAsync job (three
  arrivals); a fourth SuperNode whose key is not registered is refused; the final
  adapters load with PEFT and beat the base model on the clients' data.

Every message of a deployed run starts a ClientApp process (Flower's design),
so these tests take minutes: about 3 on an idle 2-core machine (longer when it
is shared). ``FEDHET_SKIP_DEPLOY=1`` skips them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from peft import PeftModel

from fedhet.client.evaluate import evaluate
from fedhet.data.sources import load_source
from fedhet.model import load_base_model

pytestmark = [
    pytest.mark.flower,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FEDHET_SKIP_DEPLOY") == "1", reason="FEDHET_SKIP_DEPLOY=1"),
]

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
HOST = "127.0.0.1"


def _deploy_module():
    spec = importlib.util.spec_from_file_location("deploy", REPO / "scripts/deploy/deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port(span: int = 1) -> int:
    """A loopback port p with p .. p + span − 1 free (checked now)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port + span < 65536 and all(_is_free(p) for p in range(port, port + span)):
            return port
    raise RuntimeError("no free loopback ports")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) != 0


def _kill_tree(proc: psutil.Process) -> None:
    for member in [*proc.children(recursive=True), proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def _beats_base(run_dir: Path, data_files: list[Path], cfg_max_length: int) -> tuple[float, float]:
    """(base loss, adapted loss) on the clients' training files; the adapter is
    loaded from the run's PEFT folder with ``PeftModel.from_pretrained``."""
    model, tokenizer = load_base_model("tiny")
    records = [r for path in data_files for r in load_source("jsonl", path=path)]
    base = evaluate(model, tokenizer, records, "loss", max_length=cfg_max_length)["loss"]
    peft = PeftModel.from_pretrained(model, str(run_dir / "final_adapter"))
    adapted = evaluate(peft, tokenizer, records, "loss", max_length=cfg_max_length)["loss"]
    return base, adapted


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_flwr_run_local_simulation(tmp_path, ray_cluster_lock):
    """``flwr run .`` with the default local connection: the Flower CLI starts a
    local simulation SuperLink (killed at the end, found by its FLWR_HOME)."""
    home = tmp_path / "flwr-home"
    http, control = _free_port(), _free_port()
    venv = Path(sys.executable).parent  # flwr starts `flower-superlink` from the PATH
    env = {
        **os.environ,
        "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    flwr = venv / "flwr"
    overrides = (
        f"output_dir={tmp_path};federation.rounds=1;eval.local_clients=1;"
        "data.partition.num_clients=3"
    )
    command = [
        str(flwr),
        "run",
        str(REPO),
        "--run-config",
        f'set="{overrides}"',
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=1",
        "--stream",
    ]
    try:
        done = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900
        )
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(home) in part for part in proc.info["cmdline"] or []):
                _kill_tree(proc)  # the local SuperLink this test's Flower CLI started
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _metrics(tmp_path / "smoke")
    assert rows[-1]["round"] == 1 and rows[-1]["clients"] == 3
    assert rows[-1]["global_loss"] < rows[0]["global_loss"]
    assert (tmp_path / "smoke" / "final_adapter" / "adapter_model.safetensors").is_file()


def test_deployment_with_tls_and_supernode_auth(tmp_path):
    deploy = _deploy_module()
    folder = tmp_path / "deployment"
    port = _free_port(span=5)
    superlink = f"{HOST}:{port}"
    common = [
        "data.partition.num_clients=3",
        f"output_dir={tmp_path / 'runs'}",
        "train.steps=4",
        "train.lr=0.02",
        "eval.local_clients=0",
    ]
    # one asynchronous job (the synchronous path over a real SuperLink is
    # test_flwr_run_local_simulation's; both share the Flower executor's transport)
    jobs = {
        "fedasync": [
            "name=fedasync",
            "strategy.name=fedasync",
            "federation.concurrency=3",
            "federation.max_arrivals=3",
        ],
    }
    try:
        deploy.up(folder, SMOKE, common, nodes=3, port=port)
        deploy.node_key(folder / "intruder")  # a key nobody registered
        deploy.start(
            folder,
            "intruder",
            deploy.supernode_command(
                folder,
                3,
                superlink,
                folder / "data" / "client-0.train.jsonl",
                None,
                runtime_port=port + 4,
                key=folder / "intruder",
            ),
        )
        for overrides in jobs.values():
            assert deploy.run(folder, SMOKE, [*common, *overrides], superlink, timeout=900) == 0
        refused = "No SuperNode found with the given public key"
        deadline = time.monotonic() + 120
        while refused not in (folder / "logs" / "superlink.log").read_text():
            assert time.monotonic() < deadline, "the unregistered SuperNode was not refused"
            time.sleep(1)
        listing = subprocess.run(
            [str(deploy.BIN / "flwr"), "supernode", "list", deploy.CONNECTION, "--format", "json"],
            env=deploy._env(folder),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        deploy.down(folder)
    nodes = json.loads(listing.stdout)["nodes"]
    assert len(nodes) == 3, listing.stdout  # the three registered keys, not the intruder

    files = [folder / "data" / f"client-{i}.train.jsonl" for i in range(3)]
    fedasync = _metrics(tmp_path / "runs" / "fedasync")
    assert [row.get("arrival") for row in fedasync[1:]] == [1, 2, 3]
    assert fedasync[-1]["updates_applied"] == 3
    for name in jobs:
        base, adapted = _beats_base(tmp_path / "runs" / name, files, cfg_max_length=64)
        assert adapted < base, (name, base, adapted)
