"""Statistics of the benchmarks: a ratio of paired timings with a distribution-free interval, peak memory.

Pure Python (no torch, no ComfyUI): the tests import it alone. Timings are paired: sample i of the treated
and of the control series were measured next to each other (call by call), so drifting machine load hits
both members of a pair alike and cancels in their ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class RatioInterval(NamedTuple):
    """Median of paired ratios treated_i / control_i with a confidence interval for the population median."""

    ratio: float
    """Median of the per-pair ratios."""
    low: float
    """Lower end of the interval (an order statistic of the ratios)."""
    high: float
    """Upper end of the interval."""
    confidence: float
    """Exact coverage of [low, high] for any continuous distribution of the ratios: the requested one or
    more, or less when there are too few pairs (with n pairs at most 1 - 2 * 0.5**n, for [min, max])."""
    pairs: int
    """Number of pairs."""

    def as_dict(self) -> dict[str, float]:
        return self._asdict()

    def __str__(self) -> str:
        return (
            f"{self.ratio:.4f} [{self.low:.4f}, {self.high:.4f}] "
            f"({100 * self.confidence:.1f}% CI, {self.pairs} pairs)"
        )


def median_interval(values: Sequence[float], confidence: float = 0.95) -> RatioInterval:
    """Median of ``values`` with the distribution-free order-statistic interval for the median.

    With n sorted values v_(1) <= ... <= v_(n), [v_(j), v_(n+1-j)] covers the population median with
    probability 1 - 2 P(Binomial(n, 1/2) < j) whatever the (continuous) distribution; j is the largest
    index that keeps this at or above ``confidence``. Fewer than 6 values cannot reach 95%: the interval
    is then [min, max] and ``confidence`` says its real coverage.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    data = sorted(float(v) for v in values)
    n = len(data)
    if n == 0:
        raise ValueError("median_interval needs at least one value, got none")
    if not all(math.isfinite(v) for v in data):
        raise ValueError(f"median_interval needs finite values, got {data}")
    below = 0.0  # P(Binomial(n, 1/2) < j), for j = 1, 2, ...
    j, coverage = 1, 1.0 - 2.0 * 0.5**n
    for candidate in range(1, n // 2 + 1):
        below += math.comb(n, candidate - 1) * 0.5**n
        if 1.0 - 2.0 * below < confidence:
            break
        j, coverage = candidate, 1.0 - 2.0 * below
    return RatioInterval(statistics.median(data), data[j - 1], data[n - j], coverage, n)


def paired_ratio(
    treated: Sequence[float], control: Sequence[float], confidence: float = 0.95
) -> RatioInterval:
    """Median of treated_i / control_i over pairs measured side by side, with :func:`median_interval`'s CI."""
    if len(treated) != len(control):
        raise ValueError(f"paired_ratio needs pairs: {len(treated)} treated vs {len(control)} control values")
    if any(c <= 0 for c in control):
        raise ValueError(f"control timings must be > 0, got {list(control)}")
    return median_interval([t / c for t, c in zip(treated, control, strict=True)], confidence)


def implied_ratio(
    extra: Sequence[float], control: Sequence[float], confidence: float = 0.95
) -> RatioInterval:
    """1 + extra_i / control_i (a hook's own time inside a step over the paired unpatched step), with a CI."""
    return paired_ratio([c + e for c, e in zip(control, extra, strict=True)], control, confidence)


# ----------------------------------------------------------------------------------------- memory
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started or since :func:`reset_peak_rss` (Linux)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{_STATUS} has no VmHWM line: peak RSS is not available on this system")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{_STATUS} has no VmRSS line: RSS is not available on this system")


def reset_peak_rss() -> None:
    """Start a new peak: the kernel sets VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0)."""
    _CLEAR_REFS.write_text("5")


__all__ = [
    "RatioInterval",
    "implied_ratio",
    "median_interval",
    "paired_ratio",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
]
