"""The pieces of the toy world that its ComfyUI adapter stands on, without ComfyUI: the sigma form of the
schedule, the block seams of the UNet, the pictures and the oracle classifier."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.base.hooks import edit_outputs
from diffbias_core.toy import diffusion as D
from diffbias_core.toy import world as W
from diffbias_core.toy.classifier import ToyOracle
from diffbias_core.toy.display import (
    latent_rgb_factors,
    latent_to_picture,
    picture_to_latent,
    picture_to_world,
)
from diffbias_core.toy.model import BlockSeams, ToyUNet, UNetConfig

TINY = UNetConfig(widths=(8, 16, 16), text_dim=8, time_dim=16, heads=2)


def test_edm_sigma_is_sigma_over_alpha_and_edm_time_inverts_it():
    t = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)
    alpha, sigma = D.alpha_sigma(t)
    torch.testing.assert_close(D.edm_sigma(t), sigma / alpha)
    torch.testing.assert_close(D.edm_time(D.edm_sigma(t)), t, atol=1e-9, rtol=0)


def test_pure_noise_stands_at_sigma_max():
    assert float(D.edm_sigma(torch.tensor(1.0))) == D.SIGMA_MAX
    assert float(D.edm_time(torch.tensor(D.SIGMA_MAX))) == 1.0
    assert float(D.edm_time(torch.tensor(1e9))) == 1.0
    # 1 / sqrt(1 + SIGMA_MAX^2): the signal left in the first step's input
    assert 1 / math.sqrt(1 + D.SIGMA_MAX**2) < 1e-3


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(n, 3, 16, 16, generator=g), torch.rand(n, generator=g)
    return x, t, W.tokens(torch.randint(3, (n,), generator=g))


class _Trace(BlockSeams):
    def __init__(self, edit_middle=None):
        self.calls = []
        self.edit_middle = edit_middle

    def enter(self, stage, index):
        self.calls.append((stage, index))

    def before_output(self, index, h, skip):
        if index == 0 and self.edit_middle is not None:
            h = self.edit_middle(h)
        return h, skip


def test_seams_are_called_per_block_and_output_0_sees_the_middle_block():
    torch.manual_seed(0)
    model = ToyUNet(TINY).eval()
    x, t, prompt = _inputs(3)
    trace = _Trace(edit_middle=lambda h: h * 0.5 + 1.0)
    with torch.no_grad():
        edited = model.denoise(x, t, model.embed_prompt(prompt), trace)
        with edit_outputs(model, "middle", lambda h: h * 0.5 + 1.0):
            hooked = model(x, t, prompt)
        plain = model(x, t, prompt)
    expected = [
        ("input", 0),
        ("input", 1),
        ("input", 2),
        ("middle", 0),
        ("output", 0),
        ("output", 1),
        ("output", 2),
    ]
    assert trace.calls == expected
    torch.testing.assert_close(edited, hooked)
    assert not torch.allclose(edited, plain)


def test_identity_seams_leave_forward_bit_identical():
    torch.manual_seed(1)
    model = ToyUNet(TINY).eval()
    x, t, prompt = _inputs(4)
    with torch.no_grad():
        assert torch.equal(model(x, t, prompt), model.denoise(x, t, model.embed_prompt(prompt), BlockSeams()))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), gamma=st.sampled_from([0.4, 1.0]))
def test_pictures_round_trip_to_the_world_and_the_latent(seed, gamma):
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    latent = D.to_model_space(rgb, gamma)
    picture = latent_to_picture(latent, gamma)
    assert picture.shape == (2, 128, 128, 3) and 0 <= picture.min() and picture.max() <= 1
    torch.testing.assert_close(picture_to_world(picture, 16), rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(picture_to_latent(picture, gamma), latent, atol=1e-6, rtol=0)


def test_pictures_of_other_sizes_are_resampled_and_bad_latent_sizes_refused():
    picture = torch.full((1, 100, 100, 3), 0.25)
    torch.testing.assert_close(picture_to_world(picture, 16), torch.full((1, 3, 16, 16), -0.5))
    with pytest.raises(ValueError, match="multiples of 8"):
        picture_to_latent(picture, 0.4)


def test_latent_rgb_factors_are_the_linear_map_to_rgb():
    latent = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    factors = torch.tensor(latent_rgb_factors(0.4))  # (channel, rgb)
    torch.testing.assert_close(torch.einsum("bchw,cr->brhw", latent, factors), D.to_rgb(latent, 0.4))


def _scene_pictures(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = W.WorldConfig()
    scenes = W.sample_scenes(config, torch.arange(n) % 3, g, colour=torch.randint(3, (n,), generator=g))
    images = W.render(scenes, config.image_size)  # (n, 3, 16, 16) in [-1, 1]
    return scenes, latent_to_picture(D.to_model_space(images, 0.4), 0.4)


def test_oracle_classifier_reads_colour_grouped_by_shape_and_the_reverse():
    scenes, pictures = _scene_pictures()
    colour = ToyOracle("colour")
    probs = colour.probabilities(pictures)
    assert colour.classes == W.COLOURS and probs.dtype == torch.float32
    assert torch.equal(probs.argmax(1), scenes.colour) and torch.equal(probs.max(1).values, torch.ones(30))
    names, groups = colour.groups(pictures)
    assert names == W.SHAPES and torch.equal(groups, scenes.shape)
    shape = ToyOracle("shape")
    assert shape.classes == W.SHAPES and torch.equal(shape.probabilities(pictures).argmax(1), scenes.shape)
    assert torch.equal(shape.groups(pictures)[1], scenes.colour)


def test_oracle_classifier_gives_a_uniform_row_for_an_unreadable_picture():
    _, pictures = _scene_pictures(3)
    pictures = torch.cat([pictures, torch.zeros(1, 128, 128, 3)])  # a black picture: no shape
    oracle = ToyOracle()
    assert oracle.readable(pictures).tolist() == [True, True, True, False]
    torch.testing.assert_close(oracle.probabilities(pictures)[3], torch.full((3,), 1 / 3))
    assert oracle.groups(pictures)[1][3] == -1
    with pytest.raises(ValueError, match="colour' or 'shape"):
        ToyOracle("size")  # type: ignore[arg-type]
