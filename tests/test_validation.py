import dataclasses
import logging

import pytest
import torch

from fedhet.protocol import ClientUpdate
from fedhet.runtime.validation import expected_update, validate_update

A = "m.layers.0.q.lora_A.weight"
B = "m.layers.0.q.lora_B.weight"
A1 = "m.layers.1.q.lora_A.weight"


def _start():
    return {A: torch.randn(4, 6), B: torch.zeros(5, 4), A1: torch.randn(4, 6)}


def _honest(spec, version=3):
    state = {k: v + 0.01 for k, v in spec.reference.items()}
    return ClientUpdate(7, state, num_samples=10, version=version, kind=spec.kind)


def _spec(upload_keys=(A, B), kind="state"):
    return expected_update(7, _start(), upload_keys=upload_keys, kind=kind, num_samples=10)


def test_the_spec_follows_the_plans_upload_keys_or_takes_every_key():
    assert set(_spec().reference) == {A, B}
    assert set(_spec(upload_keys=None).reference) == {A, B, A1}
    with pytest.raises(ValueError, match="absent"):
        _spec(upload_keys=("nope.lora_A.weight",))


def test_an_honest_update_is_accepted():
    spec = _spec()
    assert validate_update(_honest(spec), spec, version=3) is None
    assert validate_update(_honest(spec), spec, version=5, max_staleness=2, max_norm=1.0) is None


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda u: dataclasses.replace(u, client_id=8), "claims to come from client 8"),
        (lambda u: dataclasses.replace(u, kind="delta"), "kind 'delta'"),
        (lambda u: dataclasses.replace(u, state={A: u.state[A]}), "missing keys"),
        (lambda u: dataclasses.replace(u, state={**u.state, A1: u.state[A]}), "unexpected keys"),
        (lambda u: dataclasses.replace(u, state={**u.state, A: torch.zeros(5, 6)}), "shape (5, 6)"),
        (lambda u: dataclasses.replace(u, state={**u.state, B: torch.zeros(5, 3)}), "shape (5, 3)"),
        (
            lambda u: dataclasses.replace(
                u, state={**u.state, A: torch.zeros(4, 6, dtype=torch.int64)}
            ),
            "not floating-point",
        ),
        (lambda u: dataclasses.replace(u, state={**u.state, A: [[0.0] * 6] * 4}), "not a tensor"),
        (
            lambda u: dataclasses.replace(
                u, state={**u.state, B: u.state[B].clone().fill_(float("nan"))}
            ),
            "non-finite",
        ),
        (
            lambda u: dataclasses.replace(
                u, state={**u.state, B: torch.full((5, 4), float("-inf"))}
            ),
            "non-finite",
        ),
        (
            lambda u: dataclasses.replace(u, extras={"scores": torch.tensor([1.0, float("nan")])}),
            "extras",
        ),
        (lambda u: dataclasses.replace(u, num_samples=10**9), "num_samples"),
        (lambda u: dataclasses.replace(u, num_samples=0), "num_samples"),
        (lambda u: dataclasses.replace(u, version=4), "newer"),
        (lambda u: dataclasses.replace(u, version="3"), "not an integer"),
        (lambda u: dataclasses.replace(u, state=None), "not a mapping"),
        (lambda u: "garbage", "not a ClientUpdate"),
        (lambda u: dataclasses.replace(u, metrics=None, extras=None), "malformed"),
    ],
)
def test_every_kind_of_bad_update_is_rejected_with_its_reason(corrupt, reason, caplog):
    spec = _spec()
    with caplog.at_level(logging.WARNING):
        got = validate_update(corrupt(_honest(spec)), spec, version=3)
    assert got is not None and reason in got
    assert "client 7" in caplog.text and reason in caplog.text


def test_staleness_is_bounded_only_when_configured():
    spec = _spec()
    old = _honest(spec, version=1)
    assert validate_update(old, spec, version=3) is None
    assert validate_update(old, spec, version=3, max_staleness=2) is None
    assert "stale: 2 versions old" in validate_update(old, spec, version=3, max_staleness=1)


def test_the_norm_bound_measures_the_change_from_the_start_state():
    spec = _spec()
    honest = _honest(spec)  # every entry moved by 0.01: norm 0.01·√(24 + 20)
    change = 0.01 * (24 + 20) ** 0.5
    assert validate_update(honest, spec, version=3, max_norm=change * 1.01) is None
    assert "exceeds max_update_norm" in validate_update(
        honest, spec, version=3, max_norm=change * 0.99
    )
    boosted = dataclasses.replace(
        honest,
        state={
            k: spec.reference[k] + 100 * (v - spec.reference[k]) for k, v in honest.state.items()
        },
    )
    assert "update norm" in validate_update(boosted, spec, version=3, max_norm=change * 10)
    # a delta upload is its own change
    dspec = _spec(kind="delta")
    delta = ClientUpdate(7, {A: torch.full((4, 6), 0.5), B: torch.zeros(5, 4)}, 10, 3, "delta")
    assert validate_update(delta, dspec, version=3, max_norm=0.5 * 24**0.5 * 1.01) is None
    assert validate_update(delta, dspec, version=3, max_norm=0.5 * 24**0.5 * 0.99) is not None


def test_a_lower_precision_float_update_is_accepted():
    spec = _spec()
    update = _honest(spec)
    update.state = {k: v.to(torch.bfloat16) for k, v in update.state.items()}
    assert validate_update(update, spec, version=3, max_norm=10.0) is None
