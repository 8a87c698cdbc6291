"""Simulator scale (resident memory vs number of clients) and per-round overhead.

Scale: for N = 10, 100, 1,000 clients (each in a fresh subprocess, so RSS is
clean), build the simulator with one shared base model (tiny and SmolLM2-135M),
run one real local update, then let every client hold its own adapter (a
distinct copy of the trained one — what a client costs once it has
participated). Reported: RSS after set-up, RSS with N client adapters, and the
growth per client next to the adapter's and the model's size.

Overhead: a full synchronous run (FedIT, SmolLM2 or tiny); time outside local
training and evaluation (selection, aggregation, bookkeeping, logging,
checkpoints), as a fraction of the run's time without evaluation. Target ≤ 5 %.

    python benchmarks/bench_sim.py [--models tiny,smollm2-135m] [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedhet.reports.results import write_section

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """Resident set size, after handing freed heap pages back to the OS (glibc
    ``malloc_trim``), so that later allocations show up instead of reusing them."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _scale_child(model: str, n: int) -> dict:
    """Runs inside a subprocess: one (model, N) point."""
    from fedhet.config import load_config
    from fedhet.model.base import model_info
    from fedhet.model.lora import state_bytes
    from fedhet.protocol import Instruction
    from fedhet.runtime.sim import Simulation

    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"model.name={model}", "output_dir=/tmp/fedhet-bench-scale", f"name=scale-{n}",
        "data.limit=" + str(max(400, 8 * n + 16)), f"data.partition.num_clients={n}",
        "data.partition.method=iid", "data.partition.min_size=4", "data.global_test_size=16",
        "lora.rank=8", "lora.alpha=16", "federation.keep_client_states=true",
    ])
    sim = Simulation(cfg)
    run = sim.run_client(Instruction(0, sim.init_state, {"steps": 1}), event=1)
    trained = sim.client_states[0]
    base_rss = _rss_mb()  # model, data, one update's buffers and one stored adapter
    for cid in range(1, n):
        sim.client_states[cid] = {k: v + 1e-3 * cid for k, v in trained.items()}
    full_rss = _rss_mb()
    info = model_info(sim.lm.model.get_base_model())
    return {
        "model": model, "n": n, "base_rss": base_rss, "full_rss": full_rss,
        "adapter_mb": state_bytes(trained) / 2**20,
        "model_mb": info["num_parameters"] * 4 / 2**20,
        "update_tokens": run.update.metrics["tokens"],
    }


def scale(models: list[str], sizes: list[int]) -> str:
    rows = []
    for model in models:
        for n in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", model, str(n)],
                capture_output=True, text=True, check=True, cwd=REPO,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [
        "| model | clients N | RSS after set-up (MB) | RSS with N adapters (MB) "
        "| growth per client (MB) | adapter (MB) | base model (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_client = (r["full_rss"] - r["base_rss"]) / (r["n"] - 1)
        lines.append(
            f"| {r['model']} | {r['n']} | {r['base_rss']:.0f} | {r['full_rss']:.0f} | "
            f"{per_client:.3f} | {r['adapter_mb']:.3f} | {r['model_mb']:.0f} |"
        )
    return "\n".join(lines)


def overhead(model: str, rounds: int) -> str:
    from fedhet.config import load_config
    from fedhet.runtime.sim import Simulation

    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"model.name={model}", "output_dir=/tmp/fedhet-bench-overhead", f"name=ovh-{model}",
        f"federation.rounds={rounds}", "federation.clients_per_round=5",
        "data.partition.num_clients=20", "data.limit=800", "train.steps=4", "train.batch_size=4",
        "data.max_length=128", "lora.rank=8", "lora.alpha=16", "eval.every=1000",
    ])
    sim = Simulation(cfg)
    t0 = time.perf_counter()
    result = sim.run()
    total = time.perf_counter() - t0
    rows = result.metrics
    train = sum(r.get("train_s", 0.0) for r in rows)
    evaluation = sum(r.get("eval_s", 0.0) for r in rows)
    without_eval = total - evaluation
    outside = without_eval - train
    return (
        f"| {model} | {rounds} | {total:.1f} | {train:.1f} | {evaluation:.1f} | "
        f"{outside:.2f} | **{outside / without_eval:.1%}** |"
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_scale_child(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    models = args.models.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    body = (
        "### Resident memory vs number of clients\n\n" + scale(models, sizes) +
        "\n\nOne frozen base model per process; a client that has participated holds only "
        "its adapter (LoRA r=8 on q,v). Growth per client = (RSS with N adapters − RSS "
        "with one) / (N − 1); set-up RSS is measured after one real local update."
        "\n\n### Per-round overhead\n\n"
        "| model | rounds | run wall (s) | local training (s) | evaluation (s) | outside "
        "training and evaluation (s) | overhead share |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(overhead(m, args.rounds) for m in models)
        + "\n\nFedIT, 20 clients, 5 per round, 4 local steps of batch 4 × ≤128 tokens; overhead "
        "share = (wall − training − evaluation) / (wall − evaluation); it includes selection, "
        "aggregation, logging and the per-round checkpoint. Target ≤ 5 %."
    )
    path = write_section("sim", "Simulator: memory scale and per-round overhead", body, args.out)
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
