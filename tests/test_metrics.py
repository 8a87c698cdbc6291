import pytest

from fedhet.client.evaluate import exact_match, last_number, rouge_l


def test_last_number_handles_commas_signs_and_decimals():
    assert last_number("so 1,234 apples and then -3.5") == -3.5
    assert last_number("#### 72") == 72
    assert last_number("The answer is 1,000.") == 1000
    assert last_number("no digits") is None


def test_exact_match_on_hand_checked_cases():
    preds = ["She sold 72 clips.", "It is 8.0", "unknown", "10"]
    golds = ["72", "8", "5", "11"]
    assert exact_match(preds, golds) == pytest.approx(0.5)


def test_rouge_l_on_hand_checked_cases():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["dog"], ["the cat sat"]) == pytest.approx(0.0)
    # LCS("the cat", "the cat sat") = 2: P = 2/2, R = 2/3, F = 0.8
    assert rouge_l(["the cat"], ["the cat sat"]) == pytest.approx(0.8)


def test_accuracy_picks_the_option_with_the_highest_likelihood(tiny_model):
    import torch

    from fedhet.client.evaluate import evaluate_accuracy
    from fedhet.data import Record, encode

    model, tok = tiny_model
    records = [Record("Is this positive? great film", "positive", options=("negative", "positive")),
               Record("Is this positive? awful", "negative", options=("negative", "positive"))]
    # reference: score every option with the plain model loss × number of target tokens
    predictions = []
    for r in records:
        scores = []
        for option in r.options:
            (ex,) = encode([Record(r.instruction, option)], tok, 64)
            ids = torch.tensor([ex.input_ids])
            with torch.no_grad():
                loss = model(input_ids=ids, labels=torch.tensor([ex.labels])).loss
            scores.append(-loss.item() * (sum(x != -100 for x in ex.labels) - 0))
        predictions.append(r.options[max(range(2), key=scores.__getitem__)])
    expected = sum(p == r.response for p, r in zip(predictions, records, strict=True)) / 2
    assert evaluate_accuracy(model, tok, records)["accuracy"] == pytest.approx(expected)


def test_option_scores_with_shared_prompts_equal_scoring_each_option_alone(tiny_model):
    """The prompt runs once per record (KV cache): the scores must equal those of each
    (prompt, option) example scored on its own, for options of several tokens and records
    with different numbers of options; evaluate()'s loss must equal evaluate_loss()."""
    import torch

    from fedhet.client.evaluate import evaluate, evaluate_loss, option_nll
    from fedhet.client.loss import target_nll
    from fedhet.data import Record, encode
    from fedhet.data.encode import collate

    model, tok = tiny_model
    records = [
        Record("Topic of: stocks fell sharply", "business", options=("world", "sports",
               "business", "science and technology")),
        Record("Is this positive? great film", "positive", context="A long review " * 5,
               options=("negative", "positive")),
        Record("Pick one", "b c d", options=("a", "b c d", "e f")),
    ]
    scores = option_nll(model, tok, records, max_length=48, batch_size=4)
    for record, per_option in zip(records, scores, strict=True):
        assert len(per_option) == len(record.options)
        for option, (nll_sum, count) in zip(record.options, per_option, strict=True):
            (ex,) = encode([Record(record.instruction, option, record.context)], tok, 48)
            with torch.no_grad():
                nll, _ = target_nll(model, collate([ex], tok.pad_token_id))
            assert count == nll.numel()
            assert nll_sum == pytest.approx(nll.sum().item(), rel=1e-5, abs=1e-5)
    got = evaluate(model, tok, records, "accuracy", max_length=48, batch_size=2)
    want = evaluate_loss(model, encode(records, tok, 48), pad_id=tok.pad_token_id)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
