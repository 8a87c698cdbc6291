"""FibecFed's difficulty scores: the per-sample Fisher trace vs the loss proxy (issue #21).

FibecFed ranks a client's samples by the trace of their empirical Fisher,
d_i = Σ_θ (∂ℓ_i/∂θ)² over the LoRA parameters (:func:`fedhet.client.fisher.per_sample_fisher`,
one forward and one backward per sample); the cheap proxy ranks them by their
loss ℓ_i (:func:`fedhet.client.fisher.per_sample_loss`, one forward). On the first
clients of S-cls v2 (AG News, Dirichlet α = 0.5, ``configs/s-cls-<size>.yaml``),
side by side in one run, at two adapters:

* ``initial``: LoRA's initial adapter (B = 0), where most clients score (their
  first participation comes early and scores are cached);
* ``trained``: after ``--steps`` local steps on the client's own data (B ≠ 0).

Reported per client and adapter: Spearman's ρ between the two scores, the overlap
of the easiest 30 % (FibecFed's p0: the samples the curriculum starts with), and
the wall time of each pass and their ratio (one thread).

    python benchmarks/bench_fibecfed_scoring.py --size cpu             # → RESULTS.md
    python benchmarks/bench_fibecfed_scoring.py --size smoke --clients 2 --out /tmp/b.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from fedhet.client import TrainPlan, local_update
from fedhet.client.curriculum import easiest
from fedhet.client.fisher import per_sample_fisher, per_sample_loss
from fedhet.config import load_config
from fedhet.data.encode import encode
from fedhet.data.federated import build_federated_data
from fedhet.model import load_base_model
from fedhet.model.lora import LoraModel
from fedhet.reports.results import write_section

SECTION = "bench_fibecfed_scoring"
P0 = 0.3


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="cpu", choices=["smoke", "cpu", "gpu"])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--samples", type=int, default=96, help="samples scored per client (at most)")
    ap.add_argument("--steps", type=int, default=8, help="local steps before the trained pass")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"s-cls-{args.size}.yaml")
    fed = build_federated_data(cfg.data)
    model, tok = load_base_model(cfg.model.name)
    lm = LoraModel(model, cfg.lora, seed=cfg.seed)
    init = lm.init_state(cfg.seed, rank=cfg.lora.rank)
    pad, batch = tok.pad_token_id, cfg.train.batch_size
    rows, rhos, overlaps, ratios = [], [], [], []
    for client in fed.clients[: args.clients]:
        examples = encode(client.train, tok, cfg.data.max_length)[: args.samples]
        plan = TrainPlan(**{**cfg.train.model_dump(), "steps": args.steps, "seed": 1})
        trained = local_update(lm, examples, init, plan, pad_id=pad).state
        for name, adapter in (("initial", init), ("trained", trained)):
            lm.load_state(adapter)
            fisher, t_fisher = timed(per_sample_fisher, lm, examples, pad_id=pad, batch_size=batch)
            loss, t_loss = timed(per_sample_loss, lm, examples, pad_id=pad, batch_size=batch)
            rho = float(spearmanr(fisher.numpy(), loss.numpy()).statistic)
            a, b = set(easiest(fisher, P0)), set(easiest(loss, P0))
            overlap = len(a & b) / len(a)
            rhos.append(rho)
            overlaps.append(overlap)
            ratios.append(t_fisher / t_loss)
            rows.append(
                f"| {client.client_id} | {len(examples)} | {name} | {rho:.2f} | {overlap:.2f} "
                f"| {t_fisher:.1f} | {t_loss:.1f} | {t_fisher / t_loss:.1f} |"
            )
    lines = [
        f"Model {cfg.model.name}, S-cls ({cfg.data.source}, α = {cfg.data.partition.alpha}), "
        f"the first {args.clients} clients, ≤ {args.samples} samples each, ≤ "
        f"{cfg.data.max_length} tokens, chunks of {batch}; trained = {args.steps} local steps "
        f"(lr {cfg.train.lr}) from the initial adapter on the client's data.",
        "",
        "| client | samples | adapter | Spearman ρ | easiest-30 % overlap | Fisher [s] "
        "| loss [s] | Fisher / loss time |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Mean ρ {np.mean(rhos):.2f} (range {min(rhos):.2f} … {max(rhos):.2f}); mean overlap "
        f"of the easiest 30 % {np.mean(overlaps):.2f}; the loss pass is "
        f"{np.mean(ratios):.1f}× cheaper in wall time.",
    ]
    title = "FibecFed difficulty scores: Fisher trace vs loss proxy"
    print(write_section(SECTION, title, "\n".join(lines), args.out))


if __name__ == "__main__":
    main()
