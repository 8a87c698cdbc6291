"""Tests of fedhet.data: sources, partitioners, encoding, batching, federated assembly."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from fedhet.data import (
    IGNORE_INDEX,
    PARTITIONERS,
    SOURCES,
    DataConfig,
    Example,
    Record,
    batches,
    build_federated_data,
    collate,
    describe_table,
    encode,
    format_prompt,
    load_source,
    padding_waste,
    partition,
    register_partitioner,
)
from fedhet.data import sources as sources_module
from fedhet.errors import FedhetError

# ------------------------------------------------------------------------------ sources

ALL_SPLITS = [(name, split) for name, source in SOURCES.items() for split in source.splits]


@pytest.mark.parametrize(("name", "split"), ALL_SPLITS)
def test_every_source_and_split_loads(name: str, split: str) -> None:
    records = load_source(name, split=split, limit=5)
    assert len(records) == 5
    for r in records:
        assert isinstance(r, Record)
        assert r.instruction and r.response and r.category
        assert not r.options or r.response in r.options


def test_sst2_first_row_and_labelled_test() -> None:
    first = load_source("sst2", limit=1)[0]
    assert "Sentence: when are bears bears and" in first.instruction
    assert (first.response, first.category) == ("positive", "positive")
    assert first.options == ("negative", "positive")
    test = load_source("sst2", split="test")
    assert len(test) == 872
    assert {r.response for r in test} == {"negative", "positive"}


def test_gsm8k_final_number() -> None:
    natalia = load_source("gsm8k", limit=1)[0]
    assert natalia.instruction.startswith("Natalia sold clips to 48 of her friends")
    assert natalia.response.endswith("#### 72")
    assert natalia.answer == "72"
    assert all("," not in r.answer and r.answer for r in load_source("gsm8k"))


def test_dolly_category_and_context() -> None:
    records = load_source("dolly")
    assert len(records) == 15011
    assert records[0].category == "brainstorming" and records[0].context == ""
    virgin = next(
        r for r in records if r.instruction == "When did Virgin Australia start operating?"
    )
    assert virgin.category == "closed_qa"
    assert "Virgin Australia" in virgin.context
    assert Counter(r.category for r in records)["creative_writing"] == 709


def test_classification_sources_hand_checked() -> None:
    rte = load_source("rte", limit=1)[0]
    assert rte.context == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert "Hypothesis: Weapons of Mass Destruction Found in Iraq." in rte.instruction
    assert rte.response == "not_entailment"
    trec = load_source("trec", limit=1)[0]
    assert trec.response == trec.category == "description"
    assert "How did serfdom develop" in trec.instruction
    agnews = load_source("agnews", split="dev", limit=1)[0]
    assert agnews.response == "Sci/Tech" and agnews.options[3] == "Sci/Tech"
    boolq = load_source("boolq", limit=1)[0]
    assert boolq.response == "true" and boolq.options == ("true", "false")
    assert "iran and afghanistan" in boolq.instruction


def test_instruction_sources_hand_checked() -> None:
    alpaca = load_source("alpaca", limit=1)[0]
    assert alpaca.instruction == "Describe a process of making crepes."
    code = load_source("code_alpaca", limit=1)[0]
    assert code.context == "dataList = [3, 9, 3, 5, 7, 9, 5]"
    mmlu = load_source("mmlu", split="test", limit=1)[0]
    assert mmlu.category == "medical_genetics" and mmlu.answer == "C"
    assert mmlu.response == mmlu.options[2] == "The answer is: C. Hurler syndrome"


def test_math_word_problems_use_answer_field() -> None:
    mawps = load_source("math_word_problems", limit=1)[0]
    assert (mawps.category, mawps.answer, mawps.response) == ("mawps", "2", "2")
    test = load_source("math_word_problems", split="test")
    assert {r.category for r in test} == {
        "addsub", "aqua", "mathqa", "mawps", "multiarith", "singleeq", "svamp"
    }  # fmt: skip
    aqua = next(r for r in test if r.category == "aqua")
    assert aqua.answer == "A" and aqua.options == ("A", "B", "C", "D", "E")
    svamp = [r.answer for r in test if r.category == "svamp"]
    assert "2" in svamp and "2.0" not in svamp


def test_superni_task_selection() -> None:
    task = "task321_stereoset_classification_religion"
    records = load_source("superni", tasks=[task])
    assert len(records) == 228
    first = records[0]
    assert first.category == task
    assert first.instruction.startswith("Given two sentences regarding the stereotypes")
    assert first.instruction.endswith(
        "Brahmins are highly respected in India. Poor people lack food."
    )
    assert first.response == "unrelated"
    assert first.options == ("anti-stereotype", "stereotype", "unrelated")
    jeopardy = load_source("superni", tasks=["task305_jeopardy_answer_generation_normal"], limit=1)
    assert jeopardy[0].options == ()


def test_tasks_filter_and_limit() -> None:
    closed = load_source("trec", tasks=["location", "number"])
    assert {r.category for r in closed} == {"location", "number"}
    assert len(closed) == 835 + 896
    with pytest.raises(FedhetError, match="unknown task.*nope"):
        load_source("trec", tasks=["nope"])
    with pytest.raises(FedhetError, match="unknown task.*task999"):
        load_source("superni", tasks=["task999"])
    first = load_source("trec", limit=20)
    assert first == load_source("trec")[:20]
    shuffled = load_source("trec", limit=20, seed=3)
    assert shuffled == load_source("trec", limit=20, seed=3)
    assert shuffled != first and shuffled != load_source("trec", limit=20, seed=4)


# ----------------------------------------------------------------------- generic files

ROWS = [
    {"q": "What is 2+2?", "a": "4", "kind": "math"},
    {"q": "Capital of France?", "a": "Paris", "kind": "geo"},
]
MAPPING = {"instruction": "q", "response": "a", "category": "kind"}
EXPECTED = [
    Record("What is 2+2?", "4", category="math"),
    Record("Capital of France?", "Paris", category="geo"),
]


def _write(path: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(rows[0]), *(sep.join(r.values()) for r in rows)]
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "tsv"])
def test_generic_formats_with_field_mapping(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / f"data.{fmt}", fmt, ROWS)
    assert load_source(fmt, path=path, fields=MAPPING) == EXPECTED


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "tsv"])
def test_generic_missing_column_names_file_and_field(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / f"data.{fmt}", fmt, ROWS)
    with pytest.raises(FedhetError, match=r"data\.\w+.*'answer_col'.*'response'"):
        load_source(fmt, path=path, fields={**MAPPING, "response": "answer_col"})


def test_generic_identity_mapping_and_options(tmp_path: Path) -> None:
    rows = [{"instruction": "Pick", "response": "b", "options": ["a", "b"], "extra": 1}]
    assert load_source("json", path=_write(tmp_path / "d.json", "json", rows)) == [
        Record("Pick", "b", options=("a", "b"))
    ]
    tsv = tmp_path / "d.tsv"
    tsv.write_text('instruction\tresponse\toptions\nSay "x"\tb\ta|b\n')
    assert load_source("tsv", path=tsv) == [Record('Say "x"', "b", options=("a", "b"))]


def test_generic_unknown_record_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.json", "json", ROWS)
    with pytest.raises(FedhetError, match=r"data\.json.*unknown Record field.*'question'"):
        load_source("json", path=path, fields={"question": "q", "response": "a"})


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": oops}\n')
    with pytest.raises(FedhetError, match=r"bad\.jsonl:2: malformed JSON"):
        load_source("jsonl", path=path)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FedhetError, match="not found: .*missing.json"):
        load_source("json", path=tmp_path / "missing.json")
    with pytest.raises(FedhetError, match="unknown data source 'nope'.*dolly"):
        load_source("nope")
    with pytest.raises(FedhetError, match="rte: split 'test' is unlabelled"):
        load_source("rte", split="test")
    with pytest.raises(FedhetError, match="dolly: no split 'test'; splits: train"):
        load_source("dolly", split="test")
    with pytest.raises(FedhetError, match="only the split 'train'"):
        load_source("json", path=tmp_path / "x.json", split="test")
    with pytest.raises(FedhetError, match="path and fields apply to the generic formats"):
        load_source("dolly", path=tmp_path / "x.jsonl")
    with pytest.raises(FedhetError, match="reads a file: set data.path"):
        load_source("csv")


def test_bad_row_in_named_source_names_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        '{"question": "1+1?", "answer": "2\\n#### 2"}\n{"question": "no answer"}\n'
    )
    monkeypatch.setenv("FEDHET_DATA", str(tmp_path))
    with pytest.raises(FedhetError, match=r"train\.jsonl:2: missing field 'answer'"):
        load_source("gsm8k")


def test_search_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "env" / "gsm8k"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n')
    monkeypatch.setenv("FEDHET_DATA", str(tmp_path / "env"))
    assert [r.answer for r in load_source("gsm8k")] == ["2"]
    # an explicit data_dir comes first; a data_dir without the folder falls through
    assert len(load_source("gsm8k", data_dir=tmp_path / "env")) == 1
    assert len(load_source("gsm8k", data_dir=tmp_path / "elsewhere")) == 1
    monkeypatch.delenv("FEDHET_DATA")
    assert len(load_source("gsm8k")) == 7473  # <repo>/../shared/data


def test_not_found_lists_places_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDHET_DATA", raising=False)
    monkeypatch.setattr(sources_module, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub
    with pytest.raises(FedhetError) as err:
        load_source("dolly", data_dir=tmp_path / "mine")
    message = str(err.value)
    assert "dolly15k" in message and str(tmp_path / "mine") in message
    assert str(tmp_path.parent / "shared" / "data") in message
    assert "'datasets' package" in message


def test_hub_rows_go_through_the_same_converter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return [{"premise": "P.", "hypothesis": "H.", "label": 1, "idx": 0}]

    monkeypatch.delenv("FEDHET_DATA", raising=False)
    monkeypatch.setattr(sources_module, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    (record,) = load_source("rte", split="val")
    assert calls == [("aps/super_glue", "rte", "validation")]
    assert (record.context, record.response) == ("P.", "not_entailment")
    with pytest.raises(FedhetError, match="hub has no copy of trec"):
        load_source("trec")


# ------------------------------------------------------------------------- partitioners

LABELS = [c for c, n in [("a", 300), ("b", 200), ("c", 100), ("d", 50)] for _ in range(n)]


def _histograms(parts: list[np.ndarray], labels: list[str]) -> np.ndarray:
    cats = sorted(set(labels))
    arr = np.asarray(labels)
    return np.array([[np.sum(arr[p] == c) for c in cats] for p in parts])


@pytest.mark.parametrize("method", ["iid", "dirichlet", "task", "quantity"])
def test_partitioners_cover_disjoint_deterministic(method: str) -> None:
    parts = partition(LABELS, 6, method, alpha=0.5, seed=1, min_size=5)
    assert len(parts) == 6
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(len(LABELS)))  # disjoint and complete
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert min(len(p) for p in parts) >= 5
    again = partition(LABELS, 6, method, alpha=0.5, seed=1, min_size=5)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    other = partition(LABELS, 6, method, alpha=0.5, seed=2, min_size=5)
    assert not all(np.array_equal(x, y) for x, y in zip(parts, other, strict=True))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    def skew(alpha: float) -> float:
        hist = _histograms(partition(LABELS, 5, "dirichlet", alpha=alpha, seed=0), LABELS)
        shares = hist / hist.sum(axis=1, keepdims=True)
        glob = np.bincount(np.unique(LABELS, return_inverse=True)[1]) / len(LABELS)
        return float(np.mean(np.abs(shares - glob).sum(axis=1) / 2))  # total variation

    assert skew(0.1) > 2 * skew(100.0)
    assert skew(100.0) < 0.1


def test_dirichlet_min_size_gives_up() -> None:
    with pytest.raises(FedhetError, match="no draw in .* raise alpha"):
        partition(LABELS[:40], 8, "dirichlet", alpha=0.01, seed=0, min_size=5)


def test_task_partition_one_category_per_client() -> None:
    hist = _histograms(partition(LABELS, 4, "task"), LABELS)
    assert np.array_equal(hist, np.diag([300, 200, 100, 50]))
    hist = _histograms(partition(LABELS, 7, "task"), LABELS)
    assert all(np.count_nonzero(row) == 1 for row in hist)
    assert hist.sum(axis=0).tolist() == [300, 200, 100, 50]
    assert np.count_nonzero(hist[:, 0]) == 3  # the largest category is split the most
    with pytest.raises(FedhetError, match="at least one client per category"):
        partition(LABELS, 3, "task")


def test_quantity_skews_sizes_not_labels() -> None:
    parts = partition(LABELS, 5, "quantity", alpha=0.2, seed=0, min_size=10)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 10 and sizes[-1] > 3 * sizes[0]


def test_partition_errors() -> None:
    with pytest.raises(FedhetError, match="unknown partition method 'nope'.*dirichlet"):
        partition(LABELS, 2, "nope")
    with pytest.raises(FedhetError, match="min_size"):
        partition(LABELS[:10], 4, "iid", min_size=3)


def test_registered_partitioner_gets_extra_keywords() -> None:
    @register_partitioner("stride")
    def stride(labels, num_clients, *, alpha, seed, min_size, offset=0):
        return [np.arange(k + offset, len(labels), num_clients) for k in range(num_clients)]

    try:
        parts = partition(LABELS[:10], 2, "stride", offset=1)
        assert [p.tolist() for p in parts] == [[1, 3, 5, 7, 9], [2, 4, 6, 8]]
    finally:
        del PARTITIONERS["stride"]


# ----------------------------------------------------------------------------- encoding


def test_format_prompt_chat_and_plain(tokenizer) -> None:
    record = Record("Summarise.", "Short.", context="Long text.")
    prompt = format_prompt(record, tokenizer)
    assert "<|im_start|>user\nSummarise.\n\nLong text.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    class Plain:
        chat_template = None

    assert format_prompt(record, Plain()) == (
        "### Instruction:\nSummarise.\n\n### Context:\nLong text.\n\n### Response:\n"
    )
    assert format_prompt(Record("Hi.", "Hello."), Plain()) == (
        "### Instruction:\nHi.\n\n### Response:\n"
    )


def test_encode_masks_prompt_and_appends_eos(tokenizer) -> None:
    record = Record("What is the capital of France?", "Paris is the capital.")
    (example,) = encode([record], tokenizer, max_length=256)
    prompt_ids = tokenizer(format_prompt(record, tokenizer), add_special_tokens=False).input_ids
    response_ids = tokenizer(record.response, add_special_tokens=False).input_ids
    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    n = len(prompt_ids)
    assert example.labels[:n] == [IGNORE_INDEX] * n
    assert example.labels[n:] == example.input_ids[n:]
    assert IGNORE_INDEX not in example.labels[n:]


def test_encode_truncates_prompt_from_the_left(tokenizer) -> None:
    long_text = " ".join(f"word{i}" for i in range(400))  # no context: the prompt itself is cut
    record = Record(f"Answer the question. {long_text}", "The answer is blue. " * 10)
    (full,) = encode([record], tokenizer, max_length=4096)
    (cut,) = encode([record], tokenizer, max_length=64)
    full_prompt = sum(label == IGNORE_INDEX for label in full.labels)
    full_response = full.input_ids[full_prompt:]
    assert len(cut.input_ids) == len(cut.labels) == 64
    kept = [t for t, label in zip(cut.input_ids, cut.labels, strict=True) if label != IGNORE_INDEX]
    assert len(kept) >= min(len(full_response), 32)
    assert kept == full_response[: len(kept)]  # the response's start is kept
    prompt_part = cut.input_ids[: 64 - len(kept)]
    assert prompt_part == full.input_ids[full_prompt - len(prompt_part) : full_prompt]
    (tiny,) = encode([Record("x" * 500, "")], tokenizer, max_length=1)
    assert tiny.input_ids == [tokenizer.eos_token_id] and tiny.labels == tiny.input_ids
    with pytest.raises(FedhetError, match="max_length"):
        encode([record], tokenizer, max_length=0)


def _examples(n: int) -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 40))
        ids = [i] + [7] * (length - 1)
        out.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    return out


def test_collate_right_pads() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert (batch.num_tokens, batch.num_target_tokens) == (4, 3)


@pytest.mark.parametrize(("shuffle", "bucket"), [(True, True), (True, False), (False, True)])
def test_batches_cover_each_example_once_deterministically(shuffle: bool, bucket: bool) -> None:
    examples = _examples(1003)
    first = batches(examples, 8, seed=5, shuffle=shuffle, bucket=bucket)
    seen = sorted(int(b.input_ids[i, 0]) for b in first for i in range(b.input_ids.shape[0]))
    assert seen == list(range(1003))
    assert sum(b.num_tokens for b in first) == sum(len(e.input_ids) for e in examples)
    again = batches(examples, 8, seed=5, shuffle=shuffle, bucket=bucket)
    assert all(x.input_ids.equal(y.input_ids) for x, y in zip(first, again, strict=True))
    if shuffle:
        other = batches(examples, 8, seed=6, shuffle=shuffle, bucket=bucket)
        assert not all(
            x.input_ids.shape == y.input_ids.shape and x.input_ids.equal(y.input_ids)
            for x, y in zip(first, other, strict=True)
        )


def test_padding_waste_on_dolly_with_bucketing(tokenizer) -> None:
    records = load_source("dolly", limit=2000, seed=0)
    examples = encode(records, tokenizer, max_length=128)
    bucketed = padding_waste(batches(examples, 8, seed=0))
    unbucketed = padding_waste(batches(examples, 8, seed=0, bucket=False))
    assert bucketed < 0.10, f"padding waste {bucketed:.1%} bucketed, {unbucketed:.1%} unbucketed"
    assert bucketed < unbucketed


# ---------------------------------------------------------------------------- federated


def _ids(records: list[Record]) -> set[int]:
    return {id(r) for r in records}


def test_build_federated_data_held_out_global_test() -> None:
    cfg = DataConfig(source="dolly", limit=3000, global_test_size=100, partition={"num_clients": 6})
    fed = build_federated_data(cfg)
    assert len(fed.clients) == 6 and len(fed.global_test) == 100
    owned = [_ids(c.train) | _ids(c.test) for c in fed.clients]
    assert sum(len(o) for o in owned) == 2900 == len(set().union(*owned))  # disjoint
    assert not _ids(fed.global_test) & set().union(*owned)
    for client in fed.clients:
        assert len(client.train) >= 1 and not _ids(client.train) & _ids(client.test)
        n = len(client.train) + len(client.test)
        assert len(client.test) == min(int(n * 0.2 + 0.5), n - 1)
        assert sum(fed.category_histogram(client.client_id).values()) == n
    assert fed.categories == sorted({r.category for r in load_source("dolly")})
    again = build_federated_data(cfg)
    assert [c.train for c in again.clients] == [c.train for c in fed.clients]
    assert again.global_test == fed.global_test


def test_build_federated_data_separate_test_split() -> None:
    cfg = DataConfig(
        source="sst2", test_split="dev", limit=500, global_test_size=50,
        partition={"method": "iid", "num_clients": 4}, local_test_fraction=0.0,
    )  # fmt: skip
    fed = build_federated_data(cfg)
    assert len(fed.global_test) == 50
    assert sum(len(c.train) for c in fed.clients) == 500
    assert all(not c.test for c in fed.clients)
    dev = load_source("sst2", split="dev")
    assert set(fed.global_test) <= set(dev)
    with pytest.raises(FedhetError, match="name the training data"):
        build_federated_data(DataConfig(source="sst2", test_source="sst2"))


def test_data_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="num_clientz"):
        DataConfig(source="dolly", partition={"num_clientz": 3})


def test_describe_table_renders() -> None:
    fed = build_federated_data(
        DataConfig(source="trec", global_test_size=20, partition={"num_clients": 3, "alpha": 1.0})
    )
    console = Console(record=True, width=200)
    console.print(describe_table(fed))
    text = console.export_text()
    assert "description" in text and "global test" in text and "all clients" in text
    train = sum(len(c.train) for c in fed.clients)
    assert str(train) in text


def test_long_context_is_cut_before_the_instruction(tokenizer) -> None:
    context = " ".join(f"Sentence number {i} of a very long context." for i in range(200))
    record = Record("What is the QUESTIONWORD here?", "Short answer.", context=context)
    (example,) = encode([record], tokenizer, 128)
    text = tokenizer.decode(example.input_ids)
    assert len(example.input_ids) <= 128
    assert "QUESTIONWORD" in text and "Sentence number 0 " in text
    assert "Sentence number 199" not in text
    assert tokenizer.decode([t for t in example.labels if t != -100]).startswith("Short answer.")
