"""Shared test fixtures.

Tests never touch the network (hub lookups fail at once instead of retrying for ~45 s) and
never write the user's model cache: ``FEDHET_CACHE`` points at one temporary folder for the
whole run, so the SmolLM2 tokenizer and model are converted at most once per worker.

``make test`` runs the tests in two pytest-xdist workers, a test file at a time
(``-n 2 --dist loadfile``: a module's fixtures are set up once): many slow tests mostly
wait (Flower processes starting, sockets polled), so two workers overlap them. Each worker
computes with one thread (``OMP_NUM_THREADS=1``, inherited by the processes the tests
start), two threads in all on the 2-core machines the suite is sized for, and the workers
share one model cache (conversions write atomically, so two workers converting at once
cannot corrupt it). Tests that start a Ray cluster (Flower's simulation engine) take
:func:`ray_cluster_lock`: two clusters started at once by the two workers failed. The
slowest files are handed out first (:func:`pytest_collection_modifyitems`).
"""

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import: set before importing it
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch at import: set before importing it

from fedhet.model import load_base_model, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def fedhet_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's model cache folder, also exported as ``$FEDHET_CACHE``."""
    cache = _shared_root(tmp_path_factory) / "fedhet-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHET_CACHE", str(cache))
        yield cache


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's base temporary folder, common to the xdist workers."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture
def ray_cluster_lock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Held (an exclusive file lock across the workers) while a test runs Ray."""
    with open(_shared_root(tmp_path_factory) / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (first use in a session converts it from the GGUF file, ~6 s)."""
    return load_tokenizer()


@pytest.fixture
def tiny_model():
    """A fresh ``"tiny"`` model and its tokenizer (~0.3 s once the tokenizer is cached)."""
    return load_base_model("tiny")


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def smoke_config(tmp_path):
    """A factory: ``configs/smoke.yaml`` (tiny model, Dolly slice) with ``--set``-style
    overrides, writing into ``tmp_path``. Use it for every simulator-level test."""
    from fedhet.config import load_config

    def make(*overrides: str):
        return load_config(REPO / "configs" / "smoke.yaml", [f"output_dir={tmp_path}", *overrides])

    return make


SLOWEST_FILES = (
    "test_flower_deploy.py",
    "test_flower.py",
    "test_kill_resume.py",
    "test_sim.py",
    "test_lockstep.py",
    "test_experiments.py",
    "test_hierfedlora.py",
    "test_cli.py",
    "test_own_data.py",
    "test_model_base.py",
)
"""Test files by decreasing wall time (measured); the rest take seconds each."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest files first, so that the two workers do not end on one long file while
    the other idles (``--dist loadfile`` hands out files in this order); inside
    test_flower_deploy the TLS deployment first, so that its Ray test starts late, after
    test_flower's."""

    def rank(item: pytest.Item) -> tuple[int, bool]:
        name = item.path.name
        first = SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
        return first, "tls" not in item.name

    items.sort(key=rank)
