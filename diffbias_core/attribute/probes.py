"""Per-step linear probes: the DiffLens "h-classifier".

One multiclass logistic regression ``Linear(C*H*W -> classes)`` per sampling step, trained on the
hooked activations labelled by the class their prompt named. Features are standardised for the fit and
the scaling is folded back into the weights, so :meth:`StepProbes.logits` takes raw activations. The
held-out split is by sample id (both images of a pair fall on the same side), the same for every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base.progress import check_stop
from ..dissect.activations import ActivationBatch, ActivationSource
from ..dissect.train_check import holdout_samples


@dataclass(frozen=True)
class ProbeConfig:
    """How the per-step probes are fitted."""

    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    """Full-batch L-BFGS (default, deterministic) or full-batch Adam."""
    iterations: int = 100
    """L-BFGS iterations or Adam steps (>= 1)."""
    lr: float | None = None
    """Learning rate; None: 1.0 for L-BFGS (with a line search), 1e-2 for Adam."""
    weight_decay: float = 1e-3
    """L2 penalty weight_decay / 2 * |W|^2 on the standardised weights (>= 0)."""
    holdout: float = 0.25
    """Fraction of sample ids held out to measure accuracy, in [0, 1)."""
    seed: int = 0
    """Seed of the held-out split."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"ProbeConfig.optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"ProbeConfig.iterations must be a positive integer, got {self.iterations!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"ProbeConfig.lr must be > 0 or None, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"ProbeConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"ProbeConfig.holdout must be in [0, 1), got {self.holdout!r}")


class StepProbes:
    """Linear probes, one per sampling step, for activations of one hook.

    steps: (S,) int64 sorted step indices. weight: (S, classes, features). bias: (S, classes).
    accuracy: (S,) held-out accuracy per step (NaN without a held-out split). train_accuracy: (S,).
    heldout: (S,) int64 held-out activations per step (None: unknown). row_shape: shape of one activation,
    (d_in,) or (C, H, W); features = its product.
    """

    def __init__(self, steps: Tensor, weight: Tensor, bias: Tensor, *, classes: Sequence[str], hook: str,
                 row_shape: tuple[int, ...], accuracy: Tensor, train_accuracy: Tensor,
                 heldout: Tensor | None = None) -> None:  # fmt: skip
        self.steps, self.weight, self.bias = steps, weight, bias
        self.classes, self.hook, self.row_shape = tuple(classes), hook, tuple(row_shape)
        self.accuracy, self.train_accuracy, self.heldout = accuracy, train_accuracy, heldout

    @property
    def features(self) -> int:
        """Input width of every probe: the product of ``row_shape``."""
        return math.prod(self.row_shape)

    def check(self, hook: str, row_shape: tuple[int, ...], where: str = "the activations") -> None:
        """Raise ValueError unless ``hook`` and ``row_shape`` are the ones these probes were fitted on."""
        if hook != self.hook or tuple(row_shape) != self.row_shape:
            raise ValueError(
                f"these probes were fitted on hook {self.hook!r} with activations of shape {self.row_shape}, "
                f"but {where} are from hook {hook!r} with shape {tuple(row_shape)}; fit probes on this hook"
            )

    def logits(self, x: Tensor, step: int | Tensor) -> Tensor:
        """Class logits of activations x: (N, *row_shape) or (N, features) at ``step`` (int or (N,)) -> (N, classes)."""
        flat = x.reshape(x.shape[0], -1)  # (N, features)
        if flat.shape[1] != self.features:
            raise ValueError(
                f"probes for hook {self.hook!r} take {self.features} features (activations {self.row_shape}), "
                f"got {flat.shape[1]} (shape {tuple(x.shape[1:])})"
            )
        position = self.position(step).to(x.device)
        weight, bias = self.weight.to(x.device, x.dtype), self.bias.to(x.device, x.dtype)
        if position.ndim == 0:
            return flat @ weight[position].T + bias[position]
        out = flat.new_empty(flat.shape[0], len(self.classes))
        for p in position.unique():  # one matmul per step present: no (N, classes, features) gather
            rows = position == p
            out[rows] = flat[rows] @ weight[p].T + bias[p]
        return out

    def position(self, step: int | Tensor) -> Tensor:
        """Index into :attr:`steps` of every step given; ValueError for a step without a probe."""
        step = torch.as_tensor(step, dtype=torch.int64).cpu()
        position = torch.searchsorted(self.steps, step).clamp_max(len(self.steps) - 1)
        missing = (
            step[self.steps[position] != step] if step.ndim else step[None][self.steps[position] != step]
        )
        if missing.numel():
            raise ValueError(
                f"no probe for step {int(missing[0])}; probes exist for steps {self.steps.tolist()}"
            )
        return position


def _standardise(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(0)
    largest = torch.maximum(x.max(), -x.min())  # max |x| without a copy of x
    std = x.std(0, unbiased=False).clamp_min(1e-6 * (1.0 + largest))
    return mean, std


def fit_logistic(x: Tensor, y: Tensor, classes: int, config: ProbeConfig,
                 should_stop: Callable[[], bool] | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Multiclass logistic regression on raw x: (N, F), y: (N,) -> weight (classes, F), bias (classes,).

    Works inside ``torch.inference_mode()`` (as in a ComfyUI node): the fit leaves it. ``should_stop`` is
    polled at every loss evaluation; True raises :class:`~.progress.Cancelled`.
    """
    with torch.inference_mode(False):  # inference tensors cannot enter autograd: copy those only
        x, y = (t.clone() if t.is_inference() else t for t in (x, y))
        return _fit_logistic(x, y, classes, config, should_stop)


def _fit_logistic(x: Tensor, y: Tensor, classes: int, config: ProbeConfig,
                  should_stop: Callable[[], bool] | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    mean, std = _standardise(x)
    z = (x - mean).div_(std)  # (N, F), one copy of x
    weight = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)

    def loss() -> Tensor:
        check_stop(should_stop)
        return F.cross_entropy(z @ weight.T + bias, y) + 0.5 * config.weight_decay * weight.pow(2).sum()

    with torch.enable_grad():
        if config.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(
                [weight, bias],
                lr=config.lr or 1.0,
                max_iter=config.iterations,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-9,
                tolerance_change=1e-12,
            )

            def closure() -> Tensor:
                opt.zero_grad()
                value = loss()
                value.backward()
                return value

            opt.step(closure)
        else:
            opt = torch.optim.Adam([weight, bias], lr=config.lr or 1e-2)
            for _ in range(config.iterations):
                opt.zero_grad()
                loss().backward()
                opt.step()
    w = weight.detach() / std  # fold the standardisation back: logits = x @ w.T + b
    return w, bias.detach() - w @ mean


def _fit_step(batch: ActivationBatch, held: Tensor, classes: Sequence[str], config: ProbeConfig, step: int,
              should_stop: Callable[[], bool] | None = None):  # fmt: skip
    # no copy when every row is labelled
    labelled = batch if bool((batch.label >= 0).all()) else batch.select(batch.label >= 0)
    test = torch.isin(labelled.sample, held)
    x = labelled.activations.reshape(labelled.num_rows, -1).float()  # (N, features)
    y = labelled.label
    train_labels = y[~test].unique().tolist()
    if len(train_labels) < 2:
        present = [classes[i] for i in train_labels]
        raise ValueError(
            f"step {step}: the probe needs training activations of at least two classes, found {present}"
        )
    weight, bias = fit_logistic(x[~test], y[~test], len(classes), config, should_stop)
    predicted = (x @ weight.T + bias).argmax(1)
    correct = predicted == y
    accuracy = correct[test].float().mean() if bool(test.any()) else torch.tensor(float("nan"))
    return weight, bias, accuracy, correct[~test].float().mean(), test.sum()


def fit_probes(source: ActivationSource, config: ProbeConfig = ProbeConfig(), *,
               progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> StepProbes:  # fmt: skip
    """Fit one probe per step of ``source`` on its labelled activations (label >= 0).

    progress: called with (steps done, steps in all). should_stop: polled before every step and at every
    loss evaluation of the fit; True raises :class:`~.progress.Cancelled`. Raises ValueError when the source
    has fewer than two classes or a step has training activations of only one class.
    """
    if len(source.classes) < 2:
        raise ValueError(f"probes need at least two classes, the activations name {list(source.classes)}")
    steps = source.steps()
    held = holdout_samples(source.column("sample"), config.holdout, config.seed)
    stacked: list[Tensor] = []  # weight (S, classes, F), bias, accuracy, train_accuracy, heldout (S, ...)
    for i, step in enumerate(steps):  # one step in memory at a time
        check_stop(should_stop)
        result = _fit_step(source.select_step(step), held, source.classes, config, step, should_stop)
        with torch.inference_mode(False):  # probes made in a ComfyUI node must still serve autograd (IG)
            if not stacked:  # filled in place: no second copy of every step's weights
                stacked = [part.new_empty(len(steps), *part.shape) for part in result]
            for out, part in zip(stacked, result, strict=True):
                out[i] = part
        if progress is not None:
            progress(i + 1, len(steps))
    weight, bias, accuracy, train_accuracy, heldout = stacked
    return StepProbes(torch.tensor(steps, dtype=torch.int64), weight, bias, classes=source.classes,
                      hook=source.hook, row_shape=source.row_shape, accuracy=accuracy,
                      train_accuracy=train_accuracy, heldout=heldout)  # fmt: skip


CHANCE_ALPHA = 0.01
"""Significance of the test that a step's probe beats chance (Bonferroni-split over the steps)."""


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), summed exactly in log space."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) + i * log_p
             + (trials - i) * log_q for i in range(successes, trials + 1)]  # fmt: skip
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def chance_threshold(trials: int, classes: int, alpha: float) -> int | None:
    """Fewest correct of ``trials`` held-out predictions that guessing (p = 1 / classes) reaches with
    probability <= alpha; None when even all correct is not that unlikely (too few held-out activations)."""
    for correct in range(trials + 1):
        if binomial_tail(correct, trials, 1.0 / classes) <= alpha:
            return correct
    return None


class ChanceCheck(NamedTuple):
    """Which probes beat chance (one-sided binomial test per step at ``alpha / steps``).

    above: (S,) bool, the step's held-out accuracy is above chance. threshold: (S,) accuracy a step
    needed (NaN: too few held-out activations to tell). decidable: every step had enough held-out
    activations. chance: 1 / classes. alpha: the overall significance.
    """

    above: Tensor
    threshold: Tensor
    decidable: bool
    chance: float
    alpha: float

    @property
    def at_chance(self) -> bool:
        """True when the test could decide and no step's probe beat chance."""
        return self.decidable and not bool(self.above.any())


def check_chance(probes: StepProbes, alpha: float = CHANCE_ALPHA) -> ChanceCheck:
    """Test every step's held-out accuracy against guessing; see :class:`ChanceCheck`."""
    steps = len(probes.steps)
    counts = probes.heldout if probes.heldout is not None else torch.zeros(steps, dtype=torch.int64)
    above, threshold = [], []
    for accuracy, n in zip(probes.accuracy.tolist(), counts.tolist(), strict=True):
        need = chance_threshold(int(n), len(probes.classes), alpha / max(1, steps)) if n else None
        threshold.append(float("nan") if need is None else need / n)
        above.append(need is not None and round(accuracy * n) >= need)
    decidable = all(t == t for t in threshold)
    return ChanceCheck(torch.tensor(above), torch.tensor(threshold), decidable, 1.0 / len(probes.classes),
                       alpha)  # fmt: skip


__all__ = ["CHANCE_ALPHA", "ChanceCheck", "ProbeConfig", "StepProbes", "binomial_tail", "chance_threshold",
           "check_chance", "fit_logistic", "fit_probes", "holdout_samples"]  # fmt: skip
