"""Calibration: the search on functions with a known answer, and on the toy world with its own sampler.

The toy test calibrates the SAE edit's strength on calibration seeds and checks it on 500 fresh images per
shape: the mean over shapes of the FD must be at most 0.03, with no strength given by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.intervene.intervention import EditSpec, assign_classes
from diffbias_core.measure import CalibrationConfig, calibrate, measure


def two_class_batch(share_a: float, n: int = 200) -> torch.Tensor:
    """(n, 2) one-hot rows, round(share_a * n) of them class a."""
    k = round(share_a * n)
    return torch.nn.functional.one_hot((torch.arange(n) >= k).long(), 2).float()


def falling(crossing: float):
    """A calibration batch whose class-a share falls from 0.9 towards 0.5 as the strength rises; FD reaches 0
    at ``crossing``. Returns (evaluate, calls)."""
    calls: list[float] = []

    def evaluate(strength: float) -> torch.Tensor:
        calls.append(strength)
        return two_class_batch(0.9 - 0.4 * min(max(strength / crossing, 0.0), 1.0))

    return evaluate, calls


@settings(max_examples=40, deadline=None)
@given(crossing=st.floats(0.5, 19.5))
def test_weakest_strength_on_target_within_the_resolution(crossing):
    evaluate, calls = falling(crossing)
    config = CalibrationConfig(end=20.0, tolerance=0.01, resolution=0.1, max_runs=14)
    result = calibrate(evaluate, config, classes=("a", "b"))
    # FD = sqrt(2) |k / 200 - 1/2| with k = round(200 * share) images of class a: <= 0.01 once k <= 101, i.e.
    # 200 * share < 101.5, share = 0.9 - 0.4 s / crossing < 0.5075: s > 0.98125 * crossing
    first_on_target = 0.98125 * crossing
    assert result.on_target and result.fd <= 0.01
    assert first_on_target - 1e-9 <= result.strength <= first_on_target + 0.1 * result.strength + 1e-9
    assert measure(two_class_batch(0.9 - 0.4 * first_on_target * 0.999 / crossing), ("a", "b")).fd > 0.01
    assert len(result.trials) == len(calls) == len(set(calls)) <= config.max_runs
    assert [t.strength for t in result.trials] == calls
    assert result.trials[0].phase == "start" and result.trials[0].strength == 0.0


def test_on_target_without_an_edit_takes_one_run():
    evaluate, calls = falling(1.0)
    result = calibrate(lambda s: two_class_batch(0.5), CalibrationConfig(), classes=("a", "b"))
    assert result.strength == 0.0 and result.on_target and len(result.trials) == 1
    assert calls == []


def test_unreachable_target_finds_the_smallest_fd_by_golden_section():
    """FD is a parabola in the strength with its minimum 0.05 at 7.3: the target 0.01 is never reached."""

    def evaluate(strength: float):
        return torch.tensor([[0.5 + 0.05 / math.sqrt(2) + 0.004 * (strength - 7.3) ** 2,
                              0.5 - 0.05 / math.sqrt(2) - 0.004 * (strength - 7.3) ** 2]])  # fmt: skip

    result = calibrate(
        evaluate, CalibrationConfig(end=20.0, max_runs=20, resolution=0.05), classes=("a", "b")
    )
    assert not result.on_target
    assert result.strength == pytest.approx(7.3, abs=0.05 * 7.3)
    assert {t.phase for t in result.trials} == {"start", "bracket", "golden"}
    assert "not reached" in result.reason


def test_budget_and_range_end_are_reported():
    evaluate, _ = falling(100.0)
    result = calibrate(evaluate, CalibrationConfig(end=20.0), classes=("a", "b"))
    assert not result.on_target and result.strength == 20.0 and "widen the range" in result.reason
    evaluate, _ = falling(19.0)
    result = calibrate(evaluate, CalibrationConfig(end=20.0, max_runs=3), classes=("a", "b"))
    assert len(result.trials) == 3 and "budget" in result.reason


def test_a_negative_range_and_scale_start():
    evaluate, _ = falling(3.0)
    result = calibrate(lambda s: evaluate(-s), CalibrationConfig(start=0.0, end=-20.0), classes=("a", "b"))
    assert result.on_target and -3.3 <= result.strength <= -2.9
    result = calibrate(
        lambda s: evaluate(s - 1.0), CalibrationConfig(start=1.0, end=11.0), classes=("a", "b")
    )
    assert result.on_target and 3.9 <= result.strength <= 4.3  # offset within 10% above the crossing (3.95)


def test_config_is_checked():
    with pytest.raises(ValueError, match="two different finite strengths"):
        CalibrationConfig(start=1.0, end=1.0)
    with pytest.raises(ValueError, match="max_runs must be >= 2"):
        CalibrationConfig(max_runs=1)


# ------------------------------------------------------------------------------------------ toy world
CALIBRATION_PER_SHAPE = 60
FRESH_PER_SHAPE = 500


@pytest.fixture(scope="module")
def toy():
    from diffbias_core.toy import world as W
    from diffbias_core.toy.demo import DemoConfig, _attribute, _attribution_data, _Stage
    from diffbias_core.toy.dissect import SAE_FILE, load_toy_sae
    from diffbias_core.toy.train import WEIGHTS_DIR, load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = load_model()
        sae = load_toy_sae(WEIGHTS_DIR / SAE_FILE)
        config = DemoConfig(pairs=16, show_progress=False)
        stage = _Stage(False)
        source, _, _ = _attribution_data(model, config, stage)
        features, _, _ = _attribute(sae, source, config, stage)
    finally:
        torch.set_num_threads(threads)
    return model, sae, features, config, W


def toy_run(toy, strength: float, per_shape: int, seed: int):
    """Sample ``per_shape`` neutral images per shape with the SAE edit at ``strength``; their MeasureReport
    (oracle colours, readable images only, grouped by the prompted shape)."""
    from diffbias_core.toy.diffusion import initial_noise
    from diffbias_core.toy.edits import feature_edit
    from diffbias_core.toy.oracles import read
    from diffbias_core.toy.sampling import generate

    model, sae, features, config, W = toy
    shape = torch.arange(len(W.SHAPES)).repeat_interleave(per_shape)
    assigned = torch.cat([assign_classes(per_shape, [1.0] * len(W.COLOURS), seed=seed * 101 + k)
                          for k in range(len(W.SHAPES))])  # fmt: skip
    noise = initial_noise(shape.numel(), model.config.image_size, seed)
    spec = EditSpec(mode="add", strength=strength, top_k=config.top_k)
    edit = feature_edit(sae, features, assigned, spec, config.window) if strength != 0 else None
    images = generate(model, W.tokens(shape), noise, config.steps, edit=edit, chunk=config.chunk)
    colour = read(images).colour
    probs = torch.nn.functional.one_hot(colour.clamp_min(0), len(W.COLOURS)).float()
    return measure(probs, W.COLOURS, readable=colour >= 0, groups=(W.SHAPES, shape))


@pytest.mark.slow
def test_toy_calibrated_strength_balances_fresh_images(toy):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = calibrate(lambda s: toy_run(toy, s, CALIBRATION_PER_SHAPE, seed=1000), CalibrationConfig())
        fresh = toy_run(toy, result.strength, FRESH_PER_SHAPE, seed=0)
    finally:
        torch.set_num_threads(threads)
    trials = ", ".join(f"{t.strength:.3f}: {t.fd:.4f}" for t in result.trials)
    print(f"\ncalibrated strength {result.strength:.4f} in {len(result.trials)} sampler runs "
          f"({CALIBRATION_PER_SHAPE} images per shape each; {result.reason}); trials {trials}; "
          f"fresh {FRESH_PER_SHAPE} per shape: FD (mean over shapes) "
          f"{fresh.group_fd_hard:.4f}, per shape {[round(g.hard_fd, 4) for g in fresh.groups]}")  # fmt: skip
    assert result.on_target
    assert result.trials[0].fd > 0.3  # the toy model is biased without the edit
    assert fresh.group_fd_hard <= 0.03
    assert len(result.trials) <= CalibrationConfig().max_runs
