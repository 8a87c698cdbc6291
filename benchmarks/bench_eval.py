"""Accuracy evaluation: one pass per (prompt, option) pair vs the prompt run once.

Measures, side by side in one run, on S-cls's evaluation sets (PROTOCOL.md: 256
records of SST-2's dev split, 2 options; and AG News's test split, 4 options; at
most 64 tokens):

* ``per-option``: what :func:`fedhet.client.evaluate.evaluate` did before: a loss pass
  over the records, then every (prompt, option) example scored on its own
  (:func:`fedhet.client.loss.target_nll`, right-padded batches);
* ``shared prompt``: :func:`fedhet.client.evaluate.evaluate` now: each prompt runs once
  with its KV cache kept, the options continue from it, and the loss is read off the
  gold options.

Both give the same accuracy and loss (the table shows the largest difference of an
option's summed NLL). Times are wall seconds of one call after a warm-up call on 8
records.

    python benchmarks/bench_eval.py                  # SmolLM2-135M → RESULTS.md
    python benchmarks/bench_eval.py --model tiny --records 32 --out /tmp/bench_eval.md
"""

from __future__ import annotations

import argparse
import time

import torch

from fedhet.client.evaluate import evaluate, evaluate_loss, option_nll
from fedhet.client.loss import target_nll
from fedhet.data import Record, encode, load_source
from fedhet.data.encode import collate
from fedhet.model import load_base_model
from fedhet.model.lora import LoraModel, LoraSpec
from fedhet.reports.results import write_section


@torch.no_grad()
def per_option(model, tok, records, max_length: int, batch_size: int):
    """The loss pass plus every (prompt, option) example scored on its own."""
    loss = evaluate_loss(model, encode(records, tok, max_length), pad_id=tok.pad_token_id,
                         batch_size=batch_size)["loss"]
    pairs = [Record(r.instruction, o, r.context, r.category) for r in records for o in r.options]
    examples = encode(pairs, tok, max_length)
    sums: list[float] = []
    for start in range(0, len(examples), 2 * batch_size):
        chunk = examples[start : start + 2 * batch_size]
        nll, rows = target_nll(model, collate(chunk, tok.pad_token_id))
        sums.extend(torch.zeros(len(chunk)).index_add_(0, rows, nll).tolist())
    scores, pos = [], 0
    for r in records:
        scores.append(sums[pos : pos + len(r.options)])
        pos += len(r.options)
    correct = sum(r.options[max(range(len(s)), key=lambda j: -s[j])] == r.response
                  for r, s in zip(records, scores, strict=True))
    return {"accuracy": correct / len(records), "loss": loss}, scores


def timed(fn, records):
    fn(records[:8])  # warm-up
    t0 = time.perf_counter()
    out = fn(records)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="eval.batch_size of S-cls")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok = load_base_model(args.model)
    lm = LoraModel(model, LoraSpec(rank=8, alpha=16))
    lm.load_state(lm.init_state(0))
    rows = []
    for source, split in (("sst2", "dev"), ("agnews", "test")):
        records = load_source(source, split=split, limit=args.records, seed=0)
        (old, old_scores), t_old = timed(
            lambda r: per_option(model, tok, r, args.max_length, args.batch_size), records)
        new, t_new = timed(lambda r: evaluate(
            model, tok, r, "accuracy", max_length=args.max_length, batch_size=args.batch_size),
            records)
        new_scores = option_nll(model, tok, records, max_length=args.max_length,
                                batch_size=2 * args.batch_size)
        diff = max(abs(a - b[0]) for o, n in zip(old_scores, new_scores, strict=True)
                   for a, b in zip(o, n, strict=True))
        rows.append((source, len(records[0].options), len(records), t_old, t_new, old, new, diff))
        print(rows[-1], flush=True)
    lines = [
        "| data | options | records | per-option s | shared prompt s | speed-up "
        "| accuracy (both) | loss per-option / shared | max NLL diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source, k, n, t_old, t_new, old, new, diff in rows:
        same = "" if old["accuracy"] == new["accuracy"] else f" / {new['accuracy']:.4f}"
        lines.append(
            f"| {source} | {k} | {n} | {t_old:.1f} | {t_new:.1f} | **{t_old / t_new:.2f}×** "
            f"| {old['accuracy']:.4f}{same} | {old['loss']:.6f} / {new['loss']:.6f} "
            f"| {diff:.1e} |"
        )
    body = "\n".join(lines) + (
        f"\n\nModel `{args.model}` with a freshly initialised LoRA adapter (r=8 on q,v: "
        f"B = 0, so the base model's scores), ≤ {args.max_length} tokens, batch "
        f"{args.batch_size} records (2× that many option examples), wall seconds of one call "
        "after a warm-up call on 8 records. The loss of `shared prompt` is read off the gold "
        "options; `per-option` runs a separate loss pass, as evaluation did before."
    )
    path = write_section("bench_eval", "Accuracy evaluation: per-option passes vs a shared "
                         "prompt", body, args.out)
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
