import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.toy import oracles
from diffbias_core.toy import world as W


def _clean(n, seed, config=None):
    config = config or W.WorldConfig()
    scenes = W.sample_training_scenes(config, n, torch.Generator().manual_seed(seed))
    return scenes, W.render(scenes, config.image_size)


def test_oracles_read_clean_renders_at_least_99_percent():
    scenes, images = _clean(3000, seed=1)
    reading = oracles.read(images)
    assert (reading.colour == scenes.colour).float().mean() >= 0.99
    assert (reading.shape == scenes.shape).float().mean() >= 0.99
    truth = W.shape_masks(scenes.shape, scenes.centre, scenes.size, images.shape[-1])
    assert (oracles.mask_iou(truth, reading.mask) >= 0.99).float().mean() >= 0.99


def test_oracles_tolerate_mild_pixel_noise():
    scenes, images = _clean(1000, seed=2)
    noisy = images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    reading = oracles.read(noisy)
    assert (reading.colour == scenes.colour).float().mean() >= 0.98
    assert (reading.shape == scenes.shape).float().mean() >= 0.95


def test_blank_dark_image_is_unreadable():
    images = torch.full((2, 3, 16, 16), -0.6)
    reading = oracles.read(images)
    assert reading.colour.tolist() == [-1, -1] and reading.shape.tolist() == [-1, -1]
    assert not reading.mask.any()


def test_shape_masks_match_a_naive_per_pixel_reference():
    shape = torch.tensor([0, 1, 2])
    centre = torch.tensor([[8.0, 8.0], [6.3, 9.1], [9.5, 7.2]])
    size = torch.tensor([9.0, 7.5, 11.0])
    got = W.shape_masks(shape, centre, size, 16)
    for b in range(3):
        cx, cy, half = float(centre[b, 0]), float(centre[b, 1]), float(size[b]) / 2
        for row in range(16):
            for col in range(16):
                x, y = col + 0.5 - cx, row + 0.5 - cy
                inside = [
                    x * x + y * y <= half * half,
                    abs(x) <= half and abs(y) <= half,
                    abs(y) <= half and abs(x) <= (y + half) / 2,
                ][int(shape[b])]
                assert bool(got[b, row, col]) == inside, (b, row, col)


def test_neutral_prompts_follow_the_skew_within_margins():
    config = W.WorldConfig()
    n = 4000
    g = torch.Generator().manual_seed(4)
    for k, row in enumerate(config.skew):
        scenes = W.sample_scenes(config, torch.full((n,), k), g)
        props = torch.bincount(scenes.colour, minlength=3).float() / n
        margin = 4 * (torch.tensor(row) * (1 - torch.tensor(row)) / n).sqrt() + 1e-3
        assert ((props - torch.tensor(row)).abs() <= margin).all(), (W.SHAPES[k], props, row)
        assert not scenes.named.any()


def test_training_scenes_name_uniform_colours_at_the_configured_rate():
    config = W.WorldConfig(named_colour_rate=0.5)
    scenes = W.sample_training_scenes(config, 6000, torch.Generator().manual_seed(5))
    rate = scenes.named.float().mean()
    assert abs(rate - 0.5) < 4 * (0.25 / 6000) ** 0.5
    named_props = torch.bincount(scenes.colour[scenes.named], minlength=3).float() / scenes.named.sum()
    assert (named_props - 1 / 3).abs().max() < 0.04


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8))
def test_renders_are_in_range_and_shapes_fit_inside(seed, n):
    config = W.WorldConfig()
    scenes, images = _clean(n, seed, config)
    assert images.shape == (n, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    truth = W.shape_masks(scenes.shape, scenes.centre, scenes.size, 16)
    assert truth.flatten(1).sum(1).min() >= oracles.MIN_AREA


def test_prompt_parsing_round_trips_and_rejects_bad_words():
    for shape in range(len(W.SHAPES)):
        for colour in (-1, 0, 1, 2):
            text = W.prompt_text(shape, colour)
            expected = W.tokens(torch.tensor([shape]), torch.tensor([colour]))[0]
            assert torch.equal(W.parse_prompt(text), expected)
    with pytest.raises(ValueError, match="hexagon"):
        W.parse_prompt("a red hexagon")
    with pytest.raises(ValueError, match="at most one colour"):
        W.parse_prompt("a red blue circle")


def test_skew_from_majority_and_config_validation():
    skew = W.skew_from_majority(0.9)
    assert skew[0] == pytest.approx((0.9, 0.05, 0.05))
    assert skew[1] == pytest.approx((0.05, 0.05, 0.9))
    with pytest.raises(ValueError, match="bias"):
        W.skew_from_majority(0.2)
    with pytest.raises(ValueError, match="summing to 1"):
        W.WorldConfig(skew=((0.5, 0.5, 0.5),) * 3)
    with pytest.raises(ValueError, match="image_size"):
        W.WorldConfig(image_size=8)


def test_foreground_is_the_bright_part_and_colour_the_strongest_channel():
    images = torch.full((1, 3, 16, 16), -0.7)
    images[0, :, 4:12, 3:11] = torch.tensor([0.0, 0.0, 0.9]).view(3, 1, 1)  # a light blue square
    images[0, :, 0, 0] = 0.9  # a bright speck, not connected
    reading = oracles.read(images)
    assert reading.mask.sum() == 64 and reading.mask[0, 4:12, 3:11].all()
    assert reading.colour.tolist() == [2] and reading.shape.tolist() == [1]


def test_largest_component_drops_specks():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:5, 1:5] = True
    mask[0, 7, 7] = True
    kept = oracles.largest_component(mask)
    assert kept.sum() == 16 and not kept[0, 7, 7]
