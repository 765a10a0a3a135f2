"""The benchmarks' statistics (benchmarks/bench_stats.py): intervals that cover a known ratio, exact ranks."""

from __future__ import annotations

import importlib.util
import math
import mmap
import random
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_stats.py"
_spec = importlib.util.spec_from_file_location("diffbias_bench_stats", _path)
bench_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_stats)


def _binomial_coverage(n: int, j: int) -> float:
    """Written out: P(X_(j) <= median <= X_(n+1-j)) = P(j <= Binomial(n, 1/2) <= n - j)."""
    return sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2**n


@pytest.mark.parametrize(("n", "rank"), [(6, 1), (8, 1), (9, 2), (20, 6), (50, 18), (100, 40)])
def test_median_interval_takes_the_textbook_ranks(n: int, rank: int) -> None:
    """Tables of the sign-test interval: n=20 -> [x_(6), x_(15)] at 95.9%, n=100 -> [x_(40), x_(61)]."""
    values = [float(v) for v in random.Random(n).sample(range(1000), n)]
    got = bench_stats.median_interval(values, 0.95)
    ordered = sorted(values)
    assert (got.low, got.high) == (ordered[rank - 1], ordered[n - rank])
    assert got.confidence == pytest.approx(_binomial_coverage(n, rank))
    assert got.confidence >= 0.95 and _binomial_coverage(n, rank + 1) < 0.95
    assert got.pairs == n


def test_too_few_values_give_min_max_with_their_real_coverage() -> None:
    got = bench_stats.median_interval([3.0, 1.0, 2.0])
    assert (got.ratio, got.low, got.high) == (2.0, 1.0, 3.0)
    assert got.confidence == pytest.approx(0.75)


def test_paired_ratio_covers_a_known_ratio_under_drifting_load() -> None:
    """Synthetic timings: a load that drifts by 2x between pairs, 3% noise, a true ratio of 1.03.

    The interval must cover 1.03 in about 95% of the trials (it is exact for the median), and it must
    exclude 1.0 when the pairs are many: it resolves a 3% overhead that the unpaired medians would not.
    """
    rng = random.Random(0)
    covered, resolved, trials = 0, 0, 400
    for _ in range(trials):
        load = [1.0 + rng.random() for _ in range(30)]  # drifts between 1x and 2x
        control = [10.0 * m * math.exp(rng.gauss(0, 0.01)) for m in load]
        treated = [1.03 * 10.0 * m * math.exp(rng.gauss(0, 0.01)) for m in load]
        got = bench_stats.paired_ratio(treated, control)
        covered += got.low <= 1.03 <= got.high
        resolved += got.low > 1.0
    assert 0.92 <= covered / trials <= 0.995
    assert resolved == trials


def test_implied_ratio_is_one_plus_extra_over_control() -> None:
    got = bench_stats.implied_ratio([0.1, 0.2, 0.1, 0.1, 0.3, 0.1], [10.0, 10.0, 5.0, 10.0, 10.0, 10.0])
    assert got.ratio == pytest.approx(1.015)  # ratios 1.01 1.02 1.02 1.01 1.03 1.01: median of six
    assert (got.low, got.high) == pytest.approx((1.01, 1.03))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="pairs"):
        bench_stats.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="> 0"):
        bench_stats.paired_ratio([1.0], [0.0])
    with pytest.raises(ValueError, match="at least one"):
        bench_stats.median_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bench_stats.median_interval([1.0], 1.5)


def test_peak_rss_follows_an_allocation_and_resets() -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS needs Linux /proc/self/clear_refs")
    bench_stats.reset_peak_rss()
    before = bench_stats.peak_rss_bytes()
    # 64 MiB of fresh pages, each written once: a mapping of its own, so memory that earlier tests freed into
    # the heap (resident, reused by a plain allocation) cannot hide it
    block = mmap.mmap(-1, 64 << 20)
    for page in range(0, len(block), mmap.PAGESIZE):
        block[page] = 1
    assert bench_stats.peak_rss_bytes() >= before + (60 << 20)
    block.close()  # unmapped: the pages leave the RSS
    bench_stats.reset_peak_rss()
    assert bench_stats.peak_rss_bytes() < before + (32 << 20)
