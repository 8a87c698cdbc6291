import math

import numpy as np
import pytest

from fedhet.strategies.grouping import (
    balanced_groups,
    group_sizes,
    kl_to,
    objective,
    random_groups,
)


def _single_label_clients(num_clients: int, num_labels: int) -> np.ndarray:
    """Client k holds only label k mod C, with a size that varies by client."""
    h = np.zeros((num_clients, num_labels))
    for k in range(num_clients):
        h[k, k % num_labels] = 10 + 3 * (k % 5)
    return h


def test_kl_grouping_beats_every_random_grouping_and_is_balanced():
    h = _single_label_clients(14, 4)
    groups = balanced_groups(h, num_groups=3)
    assert sorted(c for g in groups for c in g) == list(range(14))
    assert sorted(len(g) for g in groups) == [4, 5, 5]
    ours = objective(h, h.sum(1), groups)
    randoms = [objective(h, h.sum(1), random_groups(14, 3, seed)) for seed in range(50)]
    assert ours < min(randoms)
    assert ours < 0.1 * float(np.mean(randoms))
    # every group holds every label: its pooled distribution covers the global one
    assert all(len({k % 4 for k in g}) == 4 for g in groups)


def test_an_exactly_balanced_case_reaches_zero_kl():
    # 4 labels × 3 equal clients each, 3 groups: one client of each label per group is optimal
    h = np.kron(np.eye(4), np.ones((3, 1))) * 7
    groups = balanced_groups(h, num_groups=3)
    assert objective(h, h.sum(1), groups) == pytest.approx(0.0, abs=1e-12)


def test_the_objective_is_the_sum_of_group_kls():
    h = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 4.0], [2.0, 0.0]])
    groups = [[0, 3], [1, 2]]
    glob = h.sum(0) / h.sum()
    expected = sum(kl_to(h[g].sum(0) / h[g].sum(), glob) for g in groups)
    assert objective(h, h.sum(1), groups) == pytest.approx(float(expected))
    # KL(p‖q) by hand: p = (1, 0), q = (10/18, 8/18)
    assert float(kl_to(np.array([1.0, 0.0]), glob)) == pytest.approx(math.log(18 / 10))


def test_update_similarity_grouping_spreads_each_cluster_over_the_groups():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    vectors = np.repeat(centres, 4, axis=0) + 0.1 * rng.normal(size=(12, 3))
    n = np.full(12, 10.0)
    groups = balanced_groups(vectors * n[:, None], n, 4, divergence="l2")
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    assert all(sorted(k // 4 for k in g) == [0, 1, 2] for g in groups)
    ours = objective(vectors * n[:, None], n, groups, "l2")
    assert ours < min(
        objective(vectors * n[:, None], n, random_groups(12, 4, s), "l2") for s in range(30)
    )


def test_sizes_and_bad_input():
    assert group_sizes(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError):
        group_sizes(3, 4)
    with pytest.raises(ValueError):
        balanced_groups(np.ones(5), num_groups=2)
    with pytest.raises(ValueError):
        balanced_groups(np.ones((4, 2)), np.ones(3), 2)


def test_random_groups_are_balanced_and_seeded():
    a = random_groups(11, 3, seed=5)
    assert sorted(len(g) for g in a) == [3, 4, 4]
    assert a == random_groups(11, 3, seed=5)
    assert sorted(c for g in a for c in g) == list(range(11))
