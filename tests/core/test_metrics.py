"""Fairness metrics against formulas written out here."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core import fairness_discrepancy
from diffbias_core.measure.metrics import class_proportions, kl_to_target


def naive_fd(rows, target):
    classes = len(target)
    mean = [sum(row[c] for row in rows) / len(rows) for c in range(classes)]
    return math.sqrt(sum((mean[c] - target[c]) ** 2 for c in range(classes)))


def naive_wilson(successes, n, z):
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


@settings(max_examples=50, deadline=None)
@given(
    logits=st.lists(st.lists(st.floats(-5, 5), min_size=3, max_size=3), min_size=1, max_size=20),
    target=st.lists(st.floats(0.01, 1), min_size=3, max_size=3),
)
def test_soft_fd_matches_naive(logits, target):
    probs = torch.tensor(logits, dtype=torch.float64).softmax(-1)
    goal = [t / sum(target) for t in target]
    assert fairness_discrepancy(probs, goal) == pytest.approx(naive_fd(probs.tolist(), goal), abs=1e-12)
    uniform = [1 / 3] * 3
    assert fairness_discrepancy(probs) == pytest.approx(naive_fd(probs.tolist(), uniform), abs=1e-12)


def test_hard_fd_from_counts_and_the_paper_example():
    # DiffLens, SD1.5 "firefighter": 89.2:10.8 male:female -> FD = sqrt(2) * 0.392
    assert fairness_discrepancy(torch.tensor([892, 108])) == pytest.approx(math.sqrt(2) * 0.392)
    assert fairness_discrepancy([505, 495]) == pytest.approx(math.sqrt(2) * 0.005)
    assert fairness_discrepancy([3, 1], target=[0.75, 0.25]) == pytest.approx(0.0)
    one_hot = torch.eye(2)[torch.tensor([0] * 892 + [1] * 108)]
    assert fairness_discrepancy(one_hot) == pytest.approx(fairness_discrepancy([892, 108]))


@pytest.mark.parametrize(
    ("p", "target", "message"),
    [
        ([[0.5, 0.6]], None, "each row of p must sum to 1"),
        ([[1.2, -0.2]], None, "must be >= 0"),
        ([1.0], None, ">= 2 classes"),
        ([0, 0], None, "positive total"),
        ([[[0.5, 0.5]]], None, r"got shape \(1, 1, 2\)"),
        ([1, 1], [0.5, 0.3], "target must sum to 1"),
        ([1, 1], [1.0], "one entry per class"),
        ([1, float("nan")], None, "finite"),
    ],
)
def test_validation(p, target, message):
    with pytest.raises(ValueError, match=message):
        fairness_discrepancy(p, target)


def test_kl_to_target():
    counts = [3, 1]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_to_target(counts) == pytest.approx(expected)
    assert kl_to_target([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2)), "0 log 0 = 0"
    assert kl_to_target([1, 1], [1.0, 0.0]) == math.inf
    assert kl_to_target(
        torch.tensor([[0.2, 0.8], [0.4, 0.6]], dtype=torch.float64), [0.3, 0.7]
    ) == pytest.approx(0.0)


def test_wilson_intervals_match_the_formula():
    labels = torch.tensor([0] * 7 + [1] * 2 + [2] * 1)
    result = class_proportions(labels, 3, confidence=0.9)
    z = 1.6448536269514722  # two-sided 90%
    for c, successes in enumerate((7, 2, 1)):
        p, low, high = naive_wilson(successes, 10, z)
        assert (result.proportion[c].item(), result.low[c].item(), result.high[c].item()) == pytest.approx(
            (p, low, high)
        )
    assert result.n == 10
    empty_class = class_proportions(torch.tensor([0, 0, 0]), 2)
    assert empty_class.low[1] == 0 and 0 < empty_class.high[1] < 1


def test_soft_proportions():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    result = class_proportions(probs, 2)
    torch.testing.assert_close(result.proportion, torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert result.low[0] < 0.8 < result.high[0] and result.n == 2


def test_wilson_coverage_is_near_nominal():
    """Statistical: over 400 seeded binomial samples the 95% interval covers the truth 90-99% of the time."""
    g = torch.Generator().manual_seed(0)
    covered = 0
    for _ in range(400):
        labels = (torch.rand(60, generator=g) < 0.3).long()
        result = class_proportions(labels, 2)
        covered += int(result.low[1] <= 0.3 <= result.high[1])
    assert 0.90 <= covered / 400 <= 0.99


@pytest.mark.parametrize(
    ("data", "classes", "kwargs", "message"),
    [
        (torch.tensor([0, 3]), 3, {}, r"ints in \[0, 3\)"),
        (torch.tensor([], dtype=torch.long), 2, {}, "non-empty"),
        (torch.tensor([[0.5, 0.5]]), 3, {}, r"\(n, 3\) probabilities"),
        (torch.tensor([0, 1]), 1, {}, "num_classes must be an integer >= 2"),
        (torch.tensor([0, 1]), 2, {"confidence": 1.0}, r"confidence must be in \(0, 1\)"),
    ],
)
def test_proportions_validation(data, classes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_proportions(data, classes, **kwargs)
