"""fedhet on Flower vs the in-process simulator vs a straightforward Flower app.

The same FedIT experiment (same model, data, clients, rounds, local steps), run
three ways, each in a fresh subprocess:

* ``sim``: fedhet's in-process simulator (``Simulation(cfg).run()``), one
  process, one base model;
* ``fedhet-flower``: fedhet's ServerApp/ClientApp (:mod:`fedhet.runtime.flower`)
  on Flower's simulation engine (Ray): each ClientApp process loads the base
  model once and swaps adapters;
* ``flower-baseline``: the pattern of Flower's LLM example (flowertune-llm): a
  ClientApp that builds the model (base model + PEFT LoRA) in every call, and
  Flower's built-in ``FedAvg`` on the server (the data partition is cached per
  process, as the example caches its dataset). Its local training is fedhet's
  ``local_update`` with the same plan, so only the model handling differs.

Every variant evaluates the global adapter on the global test set before the
first and after the last round (server side) and nothing else. Flower runs use
one Ray actor with all cores (``client_resources.num_cpus`` = cores), so every
variant trains with the same number of threads. Reported: wall time of the
whole subprocess (imports included), peak resident memory summed over the
subprocess and all its descendants (Ray's GCS, raylet and workers included;
sampled every 0.1 s), their ratios to the simulator, and the final global loss
(the Flower baseline samples its own clients, so its loss differs slightly).

    python benchmarks/bench_flower.py [--model tiny|smollm2-135m] [--rounds 3]
        [--clients 6] [--per-round 3] [--steps 2] [--set model.device=cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from fedhet.reports.results import write_section

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("sim", "fedhet-flower", "flower-baseline")


def experiment(args: argparse.Namespace):
    from fedhet.config import load_config

    return load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"model.name={args.model}",
            f"output_dir={args.workdir}",
            f"data.partition.num_clients={args.clients}",
            f"data.limit={max(400, 40 * args.clients)}",
            f"federation.rounds={args.rounds}",
            f"federation.clients_per_round={args.per_round}",
            f"train.steps={args.steps}",
            "fleet.name=uniform",
            f"eval.every={args.rounds}",
            "eval.local_clients=0",
            *args.set,
        ],
    )


def _backend(cfg) -> dict[str, Any]:
    """One Ray actor with every core (and the GPU when the model is on one)."""
    cores = os.cpu_count() or 1
    gpus = 1 if cfg.model.device.startswith("cuda") else 0
    return {
        "client_resources": {"num_cpus": cores, "num_gpus": gpus},
        "init_args": {"num_cpus": cores, "num_gpus": gpus},
    }


# --------------------------------------------------------------- the baseline


_BASELINE: dict[str, Any] = {}
"""The baseline's per-process data cache (this module is imported, never
``__main__``, in the Ray workers, so the cache is real)."""


def baseline_train(msg, context):
    """Flower's LLM-example pattern: build the model in every call."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fedhet.client.train import TrainPlan, local_update
    from fedhet.config import validate_config
    from fedhet.data.encode import encode
    from fedhet.data.federated import build_federated_data
    from fedhet.model.base import load_base_model
    from fedhet.model.lora import LoraModel

    config = msg.content.config_records["config"]
    cfg = validate_config(json.loads(str(config["experiment"])))
    model, tokenizer = load_base_model(  # every call
        cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device
    )
    lm = LoraModel(model, cfg.lora, seed=cfg.seed)
    pid = int(context.node_config["partition-id"])
    if pid not in _BASELINE:
        fed = _BASELINE.setdefault("fed", build_federated_data(cfg.data))
        _BASELINE[pid] = encode(fed.clients[pid].train, tokenizer, cfg.data.max_length)
    examples = _BASELINE[pid]
    start = dict(msg.content.array_records["arrays"].to_torch_state_dict())
    plan = TrainPlan(**cfg.train.model_dump()).with_overrides(
        {"seed": int(config["server-round"]) * 1000 + pid}
    )
    result = local_update(lm, examples, start, plan, pad_id=tokenizer.pad_token_id)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=result.state),
            "metrics": MetricRecord(
                {"num-examples": len(examples), "train_loss": result.metrics["train_loss"]}
            ),
        }
    )
    return Message(reply, reply_to=msg)


def baseline_apps(cfg):
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fedhet.client.evaluate import evaluate
    from fedhet.data.federated import build_federated_data
    from fedhet.model.base import load_base_model
    from fedhet.model.lora import LoraModel

    client = ClientApp()
    client.train()(baseline_train)
    server = ServerApp()
    outcome: dict[str, float] = {}

    @server.main()
    def main(grid, context) -> None:
        model, tokenizer = load_base_model(
            cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device
        )
        lm = LoraModel(model, cfg.lora, seed=cfg.seed)
        init = lm.init_state(cfg.seed, rank=cfg.lora.rank)
        test = build_federated_data(cfg.data).global_test[: cfg.eval.global_size]
        rounds = cfg.federation.rounds

        def central(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            if rnd not in (0, rounds):
                return None
            lm.load_state(dict(arrays.to_torch_state_dict()))
            loss = evaluate(lm.model, tokenizer, test, "loss", max_length=cfg.data.max_length)
            outcome["final_global_loss"] = loss["loss"]
            return MetricRecord({"global_loss": loss["loss"]})

        n = cfg.data.partition.num_clients
        k = cfg.federation.clients_per_round
        FedAvg(
            fraction_train=k / n,
            fraction_evaluate=0.0,
            min_train_nodes=k,
            min_available_nodes=n,
        ).start(
            grid=grid,
            initial_arrays=ArrayRecord(torch_state_dict=init),
            num_rounds=rounds,
            train_config=ConfigRecord({"experiment": cfg.model_dump_json()}),
            evaluate_fn=central,
        )

    return server, client, outcome


# ------------------------------------------------------------------- variants


def child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the subprocess: one variant, its final global loss."""
    cfg = experiment(args)
    if variant == "sim":
        from fedhet.runtime.sim import Simulation

        result = Simulation(cfg).run()
        return {"final_global_loss": result.metrics[-1]["global_loss"]}
    from flwr.simulation import run_simulation

    n = cfg.data.partition.num_clients
    if variant == "fedhet-flower":
        from fedhet.runtime.flower import FlowerOptions, make_server_app
        from fedhet.runtime.flower_client import make_client_app

        server = make_server_app(cfg, FlowerOptions(wait_timeout=600))
        run_simulation(server, make_client_app(), num_supernodes=n, backend_config=_backend(cfg))
        rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        return {"final_global_loss": rows[-1]["global_loss"]}
    import bench_flower  # by name, not __main__: Ray pickles its functions by reference

    server, client, outcome = bench_flower.baseline_apps(cfg)
    run_simulation(server, client, num_supernodes=n, backend_config=_backend(cfg))
    return outcome


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Wall time and peak RSS (process tree) of one variant in a fresh subprocess."""
    command = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(root))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {"variant": variant, "wall_s": wall, "peak_mb": peak / 2**20, **result}


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def table(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]
    lines = [
        "| variant | wall (s) | wall / sim | peak RSS, process tree (MB) | peak / sim "
        "| final global loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['wall_s']:.1f} | **{r['wall_s'] / ref['wall_s']:.2f}×** | "
            f"{r['peak_mb']:.0f} | **{r['peak_mb'] / ref['peak_mb']:.2f}×** | "
            f"{r['final_global_loss']:.4f} |"
        )
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--workdir", default="/tmp/fedhet-bench-flower")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        variant, args = sys.argv[2], parse(sys.argv[3:])
        print(json.dumps(child(variant, args)))
        return
    args = parse(sys.argv[1:])
    rows = [measure(variant, args) for variant in VARIANTS]
    body = (
        table(rows)
        + f"\n\nFedIT, model `{args.model}`, {args.clients} clients, {args.per_round} per "
        f"round, {args.rounds} rounds, {args.steps} local steps of batch 4 (configs/smoke.yaml "
        "otherwise); global loss on 16 held-out records before the first and after the last "
        "round. Wall: the whole subprocess, imports and Ray start-up included. Peak RSS: summed "
        "over the subprocess and its descendants (a shared page counts in each process mapping "
        "it). "
        "fedhet-flower loads the base model once per Ray actor; flower-baseline once per "
        "ClientApp call (Flower's LLM-example pattern)."
    )
    path = write_section("flower", "fedhet on Flower vs the simulator", body, args.out)
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
