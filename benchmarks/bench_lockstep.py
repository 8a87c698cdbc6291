"""Lockstep vs one-by-one local training: client updates per hour, side by side.

For G clients of a round (G in --groups), each with its own data, seed and
adapter (LoRA r=8 on q,v), one local update of --steps steps of batch 4:
* sequential: ``local_update`` for each client in turn (today's simulator);
* lockstep: ``lockstep_updates`` for all G at once (one forward pass per step).
Sequence lengths of PROTOCOL's scenarios: S-cls (AG News, ≤ 64 tokens) and S-gen
(Dolly, ≤ 128). Reported: updates per hour of each, their ratio, and the largest
difference between the two paths' adapters (exactness). On the CPU, and on the GPU
when one is present (bf16 autocast there).

    python benchmarks/bench_lockstep.py [--model smollm2-135m] [--groups 1,4,8,16,32]
        [--steps 1] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedhet.client.batched import ClientJob, lockstep_updates
from fedhet.client.train import TrainPlan, local_update
from fedhet.data import encode, load_source
from fedhet.model import load_base_model
from fedhet.model.lora import LoraModel, LoraSpec
from fedhet.reports.results import write_section

SCENARIOS = {"S-cls": ("agnews", "dev", 64), "S-gen": ("dolly", "train", 128)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(lm, tokenizer, scenario: str, groups: list[int], steps: int, device: str) -> list:
    source, split, max_length = SCENARIOS[scenario]
    records = load_source(source, split=split, limit=32 * max(groups), seed=0)
    examples = encode(records, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id
    rows = []
    for g in groups:
        per = len(examples) // g
        jobs = [
            ClientJob(examples[c * per : (c + 1) * per], lm.init_state(c),
                      TrainPlan(steps=steps, batch_size=4, lr=1e-3, seed=c))
            for c in range(g)
        ]
        lockstep_updates(lm, jobs[:2] if g > 1 else jobs, pad_id=pad_id)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        alone = [local_update(lm, j.examples, j.start, j.plan, pad_id=pad_id) for j in jobs]
        _sync(device)
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = lockstep_updates(lm, jobs, pad_id=pad_id)
        _sync(device)
        t_lock = time.perf_counter() - t0
        error = max(
            float((a.state[k] - t.state[k]).abs().max())
            for a, t in zip(alone, together, strict=True)
            for k in a.state
        )
        rows.append({"scenario": scenario, "G": g, "seq": 3600 * g / t_seq,
                     "lock": 3600 * g / t_lock, "error": error})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--groups", default="1,4,8,16,32")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    groups = [int(g) for g in args.groups.split(",")]

    model, tokenizer = load_base_model(args.model, device=args.device)
    lm = LoraModel(model, LoraSpec(rank=8, alpha=16))
    rows = [r for s in SCENARIOS for r in measure(lm, tokenizer, s, groups, args.steps,
                                                  args.device)]
    lines = [
        "| scenario | clients per pass | updates/h one by one | updates/h lockstep "
        "| lockstep / one by one | max adapter difference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['scenario']} | {r['G']} | {r['seq']:.0f} | {r['lock']:.0f} | "
        f"**{r['lock'] / r['seq']:.2f}×** | {r['error']:.1e} |"
        for r in rows
    ]
    body = "\n".join(lines) + (
        f"\n\nModel `{args.model}` on `{args.device}`, LoRA r=8 on q,v; one local update = "
        f"{args.steps} step(s) of batch 4 per client (S-cls: AG News ≤ 64 tokens, S-gen: Dolly "
        "≤ 128); both paths timed in the same process after a warm-up. The adapter "
        "difference is the largest absolute difference between a client's adapter from the "
        "two paths (floating-point reduction order)."
    )
    name = f"lockstep-{args.device}"
    path = write_section(name, f"Lockstep vs one-by-one local training ({args.device})", body,
                         args.out)
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
