"""Calibrate the edit strength: the weakest strength whose calibration batch is on target, in few runs.

The caller gives ``evaluate(strength)``: sample the calibration batch (the same seeds every time) with the
intervention at ``strength`` and return the classifier's probabilities (B, C), or a whole
:class:`~diffbias_core.measure.measure.MeasureReport` (to use groups). Every call is one sampler run; the
search makes as few as it can. Its objective is the report's headline FD (soft; the mean over groups when
the report has groups).

Search, in the offset ``u = (strength - start) / (end - start)`` in [0, 1]:

1. ``start`` (the neutral strength: 0 for add, 1 for scale); done if it is already on target (FD <= tolerance).
2. Bracketing: u = first_step, then doubling (1/16, 1/8, ... 1), until a trial is on target, or FD rises
   again (the minimum is passed), or u = 1.
3. Refinement. When a trial is on target: bisection between it and the strongest trial below it that is
   not, for the weakest strength on target (FD falls with strength in balance mode: a stronger edit sends more
   images to their assigned class; a weaker edit keeps more of the image). Otherwise a golden-section
   search for the smallest FD inside the bracket. It stops when the interval is narrower than
   ``resolution`` times the strength, or after ``max_runs`` runs.

Result: the weakest trial on target, else the trial with the smallest FD; every trial is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from .measure import MeasureReport, measure

GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0
"""Golden-section fraction, 0.382."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Where and how long :func:`calibrate` searches."""

    start: float = 0.0
    """The neutral strength where the search starts (0 for add, 1 for scale); finite."""
    end: float = 20.0
    """The strongest strength tried (may be below ``start``, e.g. a negative add); finite, != start."""
    tolerance: float = 0.01
    """FD accepted as on target (>= 0): the search takes the weakest strength whose FD is at most this."""
    max_runs: int = 12
    """Sampler runs at most, the neutral run included (>= 2)."""
    resolution: float = 0.1
    """Refinement stops when the interval is narrower than this fraction of the strength's distance from
    ``start``, in (0, 1)."""
    first_step: float = 1.0 / 16.0
    """First bracketing trial, as a fraction of the range (0, 1]; then doubling."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.start == self.end:
            raise ValueError(
                f"calibration range must be two different finite strengths, got start {self.start}, end {self.end}"
            )
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"CalibrationConfig.tolerance must be finite and >= 0, got {self.tolerance!r}")
        if self.max_runs < 2:
            raise ValueError(f"CalibrationConfig.max_runs must be >= 2, got {self.max_runs!r}")
        if not 0.0 < self.resolution < 1.0:
            raise ValueError(f"CalibrationConfig.resolution must be in (0, 1), got {self.resolution!r}")
        if not 0.0 < self.first_step <= 1.0:
            raise ValueError(f"CalibrationConfig.first_step must be in (0, 1], got {self.first_step!r}")


class Trial(NamedTuple):
    """One sampler run of the calibration batch."""

    strength: float
    """Edit strength of the run."""
    fd: float
    """Objective: the report's headline FD."""
    phase: str
    """``start``, ``bracket``, ``bisect`` or ``golden``."""
    report: MeasureReport
    """Every figure of the run."""


class CalibrationResult(NamedTuple):
    """What :func:`calibrate` found."""

    strength: float
    """The chosen strength."""
    fd: float
    """Its FD on the calibration batch."""
    on_target: bool
    """True when ``fd <= tolerance``."""
    trials: tuple[Trial, ...]
    """Every run, in the order made."""
    reason: str
    """Why the search stopped, in words."""


Evaluate = Callable[[float], "Tensor | MeasureReport"]


def calibrate(
    evaluate: Evaluate,
    config: CalibrationConfig = CalibrationConfig(),
    *,
    classes: Sequence[str] | None = None,
    target: str | Sequence[float] | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> CalibrationResult:
    """Search the strength (see the module docstring). ``classes``/``target`` turn probabilities returned by
    ``evaluate`` into a report (not needed when it returns reports); ``on_trial`` sees every trial."""
    search = _Search(evaluate, config, classes, target, on_trial)
    if search.run(0.0, "start").fd <= config.tolerance:
        return search.done("already on target without an edit")
    return search.bracket_then_refine()


class _Search:
    """The trials of one :func:`calibrate` run, keyed by their position u in [0, 1] of the strength range."""

    def __init__(self, evaluate: Evaluate, config: CalibrationConfig, classes, target, on_trial) -> None:
        self.evaluate, self.config, self.classes, self.target, self.on_trial = (
            evaluate, config, classes, target, on_trial,
        )  # fmt: skip
        self.trials: dict[float, Trial] = {}
        self.order: list[Trial] = []

    def run(self, u: float, phase: str) -> Trial:
        """The trial at u (evaluated once; clamped to [0, 1])."""
        u = min(max(u, 0.0), 1.0)
        if u in self.trials:
            return self.trials[u]
        strength = self.config.start + u * (self.config.end - self.config.start)
        got = self.evaluate(strength)
        if isinstance(got, Tensor):
            names = self.classes if self.classes is not None else tuple(str(c) for c in range(got.shape[-1]))
            got = measure(got, names, self.target)
        trial = Trial(strength, float(got.fd), phase, got)
        self.trials[u] = trial
        self.order.append(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def done(self, reason: str) -> CalibrationResult:
        """The weakest trial on target, else the one with the smallest FD."""
        trials, tolerance = self.trials, self.config.tolerance
        passing = [u for u, t in trials.items() if t.fd <= tolerance]
        u = min(passing) if passing else min(trials, key=lambda key: (trials[key].fd, key))
        best = trials[u]
        return CalibrationResult(best.strength, best.fd, best.fd <= tolerance, tuple(self.order), reason)

    def bracket_then_refine(self) -> CalibrationResult:
        """Double u from ``first_step`` until FD is on target or rises; then bisect or golden-section search."""
        config, trials = self.config, self.trials
        points, u = [0.0], config.first_step
        while True:
            trial = self.run(u, "bracket")
            points.append(u)
            if trial.fd <= config.tolerance or trial.fd > trials[points[-2]].fd:
                break
            if u >= 1.0:
                return self.done("FD still falls at the end of the range: widen the range")
            if len(self.order) >= config.max_runs:
                return self.done(f"run budget ({config.max_runs}) spent while bracketing")
            u = min(2.0 * u, 1.0)
        bracket = (points[-3] if len(points) >= 3 else 0.0, points[-2], points[-1])
        return self._refine(bracket if trial.fd > config.tolerance else None)

    def _refine(self, bracket: tuple[float, float, float] | None) -> CalibrationResult:
        """Bisect to the weakest strength on target; without one, golden-section search in ``bracket``
        (low, mid, high: FD rose after mid, so the minimum lies between low and high)."""
        config, trials = self.config, self.trials
        while len(self.order) < config.max_runs:
            passing = [v for v, t in trials.items() if t.fd <= config.tolerance]
            if passing:
                hi = min(passing)
                lo = max(v for v in trials if v < hi)
                if hi - lo <= config.resolution * hi:
                    return self.done("weakest strength on target found to the resolution")
                self.run((lo + hi) / 2.0, "bisect")
                continue
            low, mid, high = bracket
            if high - low <= config.resolution * max(mid, config.first_step):
                return self.done("smallest FD found to the resolution; the target was not reached")
            right = high - mid > mid - low
            x = mid + GOLDEN * (high - mid) if right else mid - GOLDEN * (mid - low)
            if self.run(x, "golden").fd < trials[mid].fd:
                bracket = (mid, x, high) if right else (low, x, mid)
            else:
                bracket = (low, mid, x) if right else (x, mid, high)
        return self.done(f"run budget ({config.max_runs}) spent")


__all__ = ["CalibrationConfig", "CalibrationResult", "Trial", "calibrate"]
