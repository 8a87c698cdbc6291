"""Evaluation: loss/perplexity, label-option accuracy, exact match, ROUGE-L.

* ``loss``: mean negative log-likelihood per response token (prompt tokens
  masked), and ``ppl = exp(loss)``.
* ``accuracy``: for records with label ``options``, the prediction is the
  option o maximising Σ_t log p(o_t | prompt, o_<t) summed over the option's
  tokens and the closing EOS (the option as the complete answer, the way the
  model is trained to give it); accuracy is the
  fraction where it equals ``record.response``. Each prompt runs once, its options
  continuing from its KV cache (:func:`option_nll`); when every response is one of
  its record's options, the loss is read off the gold options' scores (the very tokens
  the loss pass would score), so no separate loss pass runs. When every gold
  response is one of its options, also ``option_ce`` (PROTOCOL v2's primary
  S-cls figure): the mean over records of −log of the gold option's probability
  normalised over the record's options (uninformed: log of the number of options).
* ``exact_match``: greedy generation; the last number in the output compared
  numerically with ``record.answer`` (GSM8K's final number).
* ``rouge``: ROUGE-L F1 (``rouge-score``, stemming on) between greedy
  generations and the responses, averaged over records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import DynamicCache

from fedhet.client.loss import target_nll
from fedhet.data.encode import IGNORE_INDEX, Example, batches, encode, format_prompt
from fedhet.data.records import Record
from fedhet.model.base import base_causal_lm

METRICS = ("loss", "accuracy", "exact_match", "rouge")


LOWER_IS_BETTER = frozenset({"loss", "ppl", "option_ce"})
"""Result keys of loss-like figures: a target on them is reached from above."""


def result_key(metric: str) -> str:
    """The key under which :func:`evaluate` reports ``metric`` (``rouge`` → ``rouge_l``)."""
    return {"rouge": "rouge_l"}.get(metric, metric)


def reaches(key: str, value: float | None, target: float | None) -> bool:
    """Whether ``value`` of the result ``key`` meets ``target`` (≤ for the
    loss-like keys of :data:`LOWER_IS_BETTER`, ≥ otherwise)."""
    if value is None or target is None:
        return False
    return value <= target if key in LOWER_IS_BETTER else value >= target

_NUMBER_RE = re.compile(r"-?\d[\d,]*\.?\d*")


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, examples: Sequence[Example], *, pad_id: int, batch_size: int = 8
) -> dict[str, float]:
    """Token-weighted mean NLL over response tokens, and perplexity."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for batch in batches(examples, batch_size, seed=0, shuffle=False, pad_id=pad_id):
        nll, _ = target_nll(model, batch.to(device))
        total += nll.sum()
        count += nll.numel()
    loss = float(total) / max(1, count)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def option_nll(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    max_length: int = 128,
    batch_size: int = 16,
) -> list[list[tuple[float, int]]]:
    """Per record, per label option: (summed NLL of the option's tokens and closing EOS,
    number of those tokens), the option given as the complete response.

    The options of a record share their prompt, so the prompt is run once: each distinct
    prompt (an encoded example's tokens before its first target) goes through the decoder
    left-padded with its KV cache kept, then every option's tokens run on a copy of its
    prompt's cache (``DynamicCache.batch_select_indices``) at the positions that follow. The
    result equals scoring each (prompt, option) example on its own (up to float
    rounding), at the cost of one pass over the prompts instead of one per option.
    """
    pairs = [Record(r.instruction, o, r.context, r.category) for r in records for o in r.options]
    examples = encode(pairs, tokenizer, max_length)
    offsets = [0]
    for r in records:
        offsets.append(offsets[-1] + len(r.options))
    causal_lm = base_causal_lm(model)
    device = next(model.parameters()).device
    per_chunk = max(1, batch_size // max(len(r.options) for r in records))
    # records of similar length share a chunk (less padding); results go back in order
    order = sorted(range(len(records)), key=lambda i: len(examples[offsets[i]].input_ids))
    out: list[list[tuple[float, int]]] = [[] for _ in records]
    for start in range(0, len(order), per_chunk):
        chunk = order[start : start + per_chunk]
        scores = _score_after_prompts(
            causal_lm,
            [e for i in chunk for e in examples[offsets[i] : offsets[i + 1]]],
            tokenizer.pad_token_id,
            device,
        )
        for i in chunk:
            out[i], scores = scores[: len(records[i].options)], scores[len(records[i].options) :]
    return out


def _score_after_prompts(
    causal_lm: torch.nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device
) -> list[tuple[float, int]]:
    """(summed NLL, target count) per example, each distinct prompt (the tokens before
    the first target, at least one) run once with its KV cache kept."""
    prompt_len = [
        max(1, next(t for t, label in enumerate(e.labels) if label != IGNORE_INDEX))
        for e in examples
    ]
    keys = [tuple(e.input_ids[:n]) for e, n in zip(examples, prompt_len, strict=True)]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    distinct, owner = list(index), [index[k] for k in keys]
    width = max(len(p) for p in distinct)
    ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for i, p in enumerate(distinct):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    cache = DynamicCache()
    head = causal_lm.model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device),
        cache=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    rows = torch.tensor(owner, dtype=torch.long)
    cache.batch_select_indices(rows.to(device))
    tails = [len(e.input_ids) - n for e, n in zip(examples, prompt_len, strict=True)]
    tail_width = max(1, *tails)
    tail_ids = torch.full((len(examples), tail_width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros((len(examples), tail_width), dtype=torch.long)
    labels = torch.full((len(examples), tail_width), IGNORE_INDEX, dtype=torch.long)
    for k, (e, n, tail) in enumerate(zip(examples, prompt_len, tails, strict=True)):
        tail_ids[k, :tail] = torch.tensor(e.input_ids[n:], dtype=torch.long)
        tail_mask[k, :tail] = 1
        labels[k, :tail] = torch.tensor(e.labels[n:], dtype=torch.long)
    tail_hidden = causal_lm.model(
        input_ids=tail_ids.to(device),
        attention_mask=torch.cat([mask[rows], tail_mask], dim=1).to(device),
        position_ids=(torch.tensor(prompt_len).unsqueeze(1) + torch.arange(tail_width)).to(device),
        cache=cache,
        use_cache=True,
    ).last_hidden_state
    # the state predicting tail token j: the prompt's last state for j = 0, else tail j - 1
    predictors = torch.cat([head[rows.to(device)].unsqueeze(1), tail_hidden[:, :-1]], dim=1)
    labels = labels.to(device)
    keep = labels != IGNORE_INDEX
    nll = F.cross_entropy(
        causal_lm.lm_head(predictors[keep]).float(), labels[keep], reduction="none"
    )
    per_row = torch.zeros(len(examples), dtype=torch.float64, device=device)
    per_row.index_add_(0, keep.nonzero()[:, 0], nll.double())
    counts = keep.sum(1)
    return [(float(v), int(c)) for v, c in zip(per_row.tolist(), counts.tolist(), strict=True)]


def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    option_scoring: str = "sum",
) -> dict[str, float]:
    """Accuracy by the label options' log-likelihood, summed over the option's tokens
    (``option_scoring="sum"``, module docstring) or averaged per token (``"mean"``,
    length-normalised), and, when
    every record's response is one of its options, the loss on the responses (the gold
    options' scores: the same tokens :func:`evaluate_loss` would score)."""
    scored = [r for r in records if r.options]
    if not scored:
        raise ValueError("accuracy needs records with label options")
    per_record = option_nll(model, tokenizer, scored, max_length=max_length, batch_size=batch_size)
    gold_known = all(r.response in r.options for r in scored)
    with_loss = gold_known and len(scored) == len(records)
    correct, gold_nll, gold_tokens, option_ce = 0, 0.0, 0, 0.0
    for r, options in zip(scored, per_record, strict=True):
        best = min(range(len(r.options)), key=lambda j: _option_score(options[j], option_scoring))
        correct += r.options[best] == r.response
        if gold_known:
            gold = r.options.index(r.response)
            option_ce += _option_cross_entropy(options, gold)
            nll, count = options[gold]
            gold_nll, gold_tokens = gold_nll + nll, gold_tokens + count
    result = {"accuracy": correct / len(scored)}
    if gold_known:
        result["option_ce"] = option_ce / len(scored)
    if with_loss:
        loss = gold_nll / max(1, gold_tokens)
        result |= {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    return result


def _option_cross_entropy(options: list[tuple[float, int]], gold: int) -> float:
    """PROTOCOL v2's option cross-entropy of one record: −log of the gold option's
    probability normalised over the options, p(o) ∝ exp(−summed NLL of o's tokens
    and closing EOS); log(number of options) when the model cannot tell them apart."""
    neg = torch.tensor([-nll for nll, _ in options], dtype=torch.float64)
    return float(torch.logsumexp(neg, 0) - neg[gold])


def _option_score(scored: tuple[float, int], option_scoring: str) -> float:
    """An option's negative log-likelihood, summed or per token (lower is better)."""
    nll, count = scored
    return nll / max(1, count) if option_scoring == "mean" else nll


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    max_new_tokens: int = 64,
    max_length: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy generations for the records' prompts (batched, left-padded)."""
    device = next(model.parameters()).device
    prompts = [format_prompt(r, tokenizer) for r in records]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            ).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in outputs]


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (commas allowed), or None."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions whose last number equals the gold number."""
    hits = 0
    for pred, gold in zip(predictions, answers, strict=True):
        p, g = last_number(pred), last_number(gold)
        hits += p is not None and g is not None and math.isclose(p, g, abs_tol=1e-6)
    return hits / max(1, len(answers))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (stemmed)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = list(zip(predictions, references, strict=True))
    return sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs) / max(
        1, len(pairs)
    )


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Record],
    metric: str,
    *,
    max_length: int = 128,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    option_scoring: str = "sum",
) -> dict[str, float]:
    """Loss on ``records`` plus the chosen task metric (one of ``METRICS``;
    ``option_scoring``: see :func:`evaluate_accuracy`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {METRICS}")
    if not records:
        return {}
    if metric == "accuracy":
        result = evaluate_accuracy(
            model,
            tokenizer,
            records,
            max_length=max_length,
            batch_size=2 * batch_size,
            option_scoring=option_scoring,
        )
        if "loss" in result:
            return result
    else:
        result = {}
    examples = encode(records, tokenizer, max_length)
    result |= evaluate_loss(model, examples, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    if metric in ("exact_match", "rouge"):
        preds = generate(
            model,
            tokenizer,
            records,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            batch_size=batch_size,
        )
        if metric == "exact_match":
            result["exact_match"] = exact_match(preds, [r.answer or r.response for r in records])
        else:
            result["rouge_l"] = rouge_l(preds, [r.response for r in records])
    return result
