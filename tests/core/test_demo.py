"""A reduced run of ``python -m diffbias_core demo`` on the shipped toy model.

The assertions are about the direction and size of the effect, with margins wide enough for 60 images
per shape (binomial standard error of a proportion <= 0.065), never exact figures of a run.
"""

import argparse
import json

import pytest
import torch

from diffbias_core.toy import cli

SAMPLES = 60


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread beats two fighting for busy cores
    out = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--samples", str(SAMPLES), "--pairs", "16", "--out", str(out), "--quiet",
                              "--threads", "1"])  # fmt: skip
    try:
        assert args.run(args) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "report.json").read_text())


def test_report_has_the_documented_fields(demo):
    _, report = demo
    for key in ("fd_before", "fd_after", "shape_accuracy_before", "shape_accuracy_after", "twin_mask_kept",
                "assignment_hit_rate", "per_shape", "controls"):  # fmt: skip
        assert key in report
    assert set(report["per_shape"]) == {"circle", "square", "triangle"}
    assert set(report["controls"]) == {"random_features", "mean_difference", "prompting"}
    for control in report["controls"].values():
        assert "fd_after" in control
    assert report["runs"]["before"]["n"] == 3 * SAMPLES


def test_pictures_are_written(demo):
    out, _ = demo
    for name in ("twins.png", "charts.png"):
        assert (out / name).stat().st_size > 1000
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_model_is_biased_and_the_intervention_balances_it(demo):
    _, report = demo
    # The shipped skews put >= 70% on one colour: FD >= 0.45 in the world, well above noise at n = 60.
    for figures in report["per_shape"].values():
        assert figures["fd_before"] > 0.3
        assert figures["fd_after"] < 0.15
        assert figures["assignment_hit_rate"] > 0.8
    assert report["fd_before"] - report["fd_after"] > 0.3
    assert report["assignment_hit_rate"] > 0.9


def test_the_rest_of_the_image_survives(demo):
    _, report = demo
    assert report["shape_accuracy_after"] >= report["shape_accuracy_before"] - 0.08
    assert report["twin_mask_kept"] > 0.7


def test_controls_behave_as_controls(demo):
    _, report = demo
    moved = report["fd_before"] - report["fd_after"]
    random = report["controls"]["random_features"]
    assert abs(report["fd_before"] - random["fd_after"]) < 0.5 * moved
    assert random["assignment_hit_rate"] < 0.6  # about chance plus the images that already had the colour
    assert report["controls"]["prompting"]["fd_after"] < 0.15


def test_parse_bias_accepts_a_majority_or_rows_and_rejects_nonsense():
    assert cli.parse_bias("0.9")[0] == pytest.approx((0.9, 0.05, 0.05))
    skew = cli.parse_bias("circle=0.2/0.7/0.1")
    assert skew[0] == (0.2, 0.7, 0.1) and skew[1] == pytest.approx((0.10, 0.15, 0.75))
    with pytest.raises(argparse.ArgumentTypeError, match="hexagon"):
        cli.parse_bias("hexagon=1/0/0")
    with pytest.raises(argparse.ArgumentTypeError, match="summing to 1"):
        cli.parse_bias("circle=0.5/0.5/0.5")
    with pytest.raises(argparse.ArgumentTypeError, match="bias"):
        cli.parse_bias("0.1")


def test_summarize_matches_hand_counts():
    from diffbias_core.toy.measure import summarize
    from diffbias_core.toy.oracles import Reading

    shape = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    colour = torch.tensor([0, 0, 0, 1, 2, 1, 0, -1])
    read_shape = torch.tensor([0, 0, 1, 0, 1, 1, 1, -1])
    mask = torch.zeros(8, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    twin_mask = mask.clone()
    twin_mask[0] = False
    twin_mask[0, 2:, 2:] = True  # disjoint: IoU 0
    reading = Reading(colour, read_shape, mask, torch.ones(8))
    twin = Reading(colour, read_shape, twin_mask, torch.ones(8))
    assigned = torch.tensor([0, 1, 0, 1, 2, 1, 2, 0])
    figures = summarize(reading, shape, assigned, twin)
    circle = figures["per_shape"]["circle"]
    assert circle["proportions"] == {"red": 0.75, "green": 0.25, "blue": 0.0}
    fd_circle = ((0.75 - 1 / 3) ** 2 + (0.25 - 1 / 3) ** 2 + (1 / 3) ** 2) ** 0.5
    fd_square = 0.0  # red, green and blue once each (the fourth is unreadable): uniform
    assert circle["fd"] == pytest.approx(fd_circle, abs=1e-4)
    assert figures["per_shape"]["square"]["fd"] == pytest.approx(fd_square, abs=1e-4)
    assert figures["fd"] == pytest.approx((fd_circle + fd_square) / 2, abs=1e-4)
    assert figures["per_shape"]["square"]["unreadable"] == 0.25
    assert figures["shape_accuracy"] == pytest.approx(6 / 8)
    assert figures["assignment_hit_rate"] == pytest.approx(5 / 8)
    assert figures["twin_mask_kept"] == pytest.approx(7 / 8)
