"""Converters of the offline datasets' rows to :class:`~fedhet.data.records.Record`.

One function per named source (:data:`fedhet.data.sources.SOURCES`; the
assumptions made for each are listed in that module's docstring). A converter
raises ValueError with a short reason on a bad row; the loader adds the file
and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fedhet.data.readers import Row
from fedhet.data.records import Record

Converter = Callable[[Row], Record]
"""Turns one row into a Record; raises ValueError with a short reason on a bad row."""


def text(row: Row, key: str) -> str:
    """The field as text; numbers and booleans are written out, anything else is an error."""
    value = row.get(key)
    if value is None:
        raise ValueError(f"missing field {key!r}")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"field {key!r} is not text")


def label(row: Row, key: str, options: tuple[str, ...]) -> str:
    """A label given by name or by its index into ``options`` (the hub stores indices)."""
    value = text(row, key).strip()
    if value in options:
        return value
    if value.isdigit() and int(value) < len(options):
        return options[int(value)]
    raise ValueError(f"label {value!r} in field {key!r} is not one of {options}")


def number(value: str) -> str:
    """A numeric answer without thousands separators; integral values without ``.0``."""
    text = value.strip().replace(",", "")
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def classification(
    instruction: str, label: str, options: tuple[str, ...], context: str = ""
) -> Record:
    return Record(instruction, label, context=context, category=label, options=options)


def dolly(row: Row) -> Record:
    return Record(
        text(row, "instruction"),
        text(row, "response"),
        context=text(row, "context"),
        category=text(row, "category"),
    )


def gsm8k(row: Row) -> Record:
    answer = text(row, "answer")
    if "####" not in answer:
        raise ValueError("field 'answer' has no final '#### <number>' line")
    final = number(answer.rsplit("####", 1)[1])
    return Record(text(row, "question"), answer, category="gsm8k", answer=final)


_SST2 = ("negative", "positive")
_AGNEWS = ("World", "Sports", "Business", "Sci/Tech")
_RTE = ("entailment", "not_entailment")
_TREC = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
_BOOLQ = ("true", "false")


def sst2(row: Row) -> Record:
    sentence = text(row, "sentence").strip()
    return classification(
        f"Classify the sentiment of the sentence as negative or positive.\nSentence: {sentence}",
        label(row, "label", _SST2),
        _SST2,
    )


def agnews(row: Row) -> Record:
    return classification(
        "Classify the news article into one of the topics World, Sports, Business or "
        f"Sci/Tech.\nArticle: {text(row, 'text').strip()}",
        label(row, "label", _AGNEWS),
        _AGNEWS,
    )


def rte(row: Row) -> Record:
    return classification(
        "Does the passage entail the hypothesis? Answer entailment or not_entailment.\n"
        f"Hypothesis: {text(row, 'hypothesis').strip()}",
        label(row, "label", _RTE),
        _RTE,
        context=text(row, "premise").strip(),
    )


def trec(row: Row) -> Record:
    coarse = text(row, "coarse")
    if coarse not in _TREC:
        raise ValueError(f"unknown TREC coarse label {coarse!r}")
    return classification(
        "Classify the question by the type of its answer: abbreviation, description, "
        f"entity, human, location or number.\nQuestion: {text(row, 'question')}",
        _TREC[coarse],
        tuple(_TREC.values()),
    )


def boolq(row: Row) -> Record:
    return classification(
        text(row, "instruction"),
        label(row, "answer", _BOOLQ),
        _BOOLQ,
        context=text(row, "input"),
    )


def superni(row: Row) -> Record:
    outputs = row.get("output")
    if not isinstance(outputs, list) or not outputs:
        raise ValueError("field 'output' is not a non-empty list")
    return Record(
        f"{text(row, 'definition')}\n\n{text(row, 'input')}",
        str(outputs[0]),
        category=text(row, "task"),
        options=row["options"],
    )


def instruction_input_output(row: Row, *, category: str) -> Record:
    return Record(
        text(row, "instruction"),
        text(row, "output"),
        context=text(row, "input"),
        category=category,
    )


_CHOICES = ("A", "B", "C", "D", "E")


def math(row: Row) -> Record:
    benchmark = text(row, "benchmark")
    mawps = "ans" in row  # MAWPS keeps its original fields
    instruction = text(row, "original_text" if mawps else "instruction").strip()
    context = "" if mawps else text(row, "input")
    answer = text(row, "ans" if mawps else "answer")
    options = _CHOICES if benchmark in ("aqua", "mathqa") else ()
    answer = answer.strip() if options else number(answer)
    return Record(
        instruction, answer, context=context, category=benchmark, options=options, answer=answer
    )


_MMLU_OPTIONS = re.compile(r"Options: A\. (.*), B\. (.*), C\. (.*), D\. (.*)", re.DOTALL)
_MMLU_ANSWER = re.compile(r"The answer is: ([A-D])\.")


def mmlu(row: Row) -> Record:
    question, response = text(row, "input"), text(row, "output")
    found = _MMLU_OPTIONS.search(question)
    options = (
        tuple(
            f"The answer is: {letter}. {text}"
            for letter, text in zip("ABCD", found.groups(), strict=True)
        )
        if found
        else ()
    )
    letter = _MMLU_ANSWER.match(response)
    return Record(
        text(row, "instruction"),
        response,
        context=question,
        category=text(row, "class"),
        options=options if response in options else (),
        answer=letter.group(1) if letter else "",
    )
