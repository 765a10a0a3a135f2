"""Apply Feature Intervention on ComfyUI's Flux model class (width 64, two double and two single blocks):
only the image tokens leaving the hooked block change."""

from __future__ import annotations

import pytest
import torch

from .harness import assert_differs, assert_identical, dit_block_inputs, random_conds, tiny_flux

WIDTH, TEXT_TOKENS = 64, 5


@pytest.fixture(scope="module")
def model():
    return tiny_flux(seed=1)


@pytest.fixture(scope="module")
def conds():
    """Random T5-like (1, 5, 48) tokens with a (1, 32) pooled vector: the tiny Flux's context and vec widths."""
    return random_conds(tokens=TEXT_TOKENS, dim=48, pooled=32)


def latent():
    return torch.zeros(2, 16, 4, 4)  # (batch, 16 Flux latent channels, 32 px / 8, 32 px / 8)


def test_double_block_edits_image_tokens_only(model, conds, make_sae, make_features, apply_intervention):
    sae = make_sae(WIDTH, "dit.double.0", "flux", seed=2)
    edited = apply_intervention(model, sae, make_features(sae))
    plain = dit_block_inputs(model, "double_block", 1, *conds, latent())
    after = dit_block_inputs(edited, "double_block", 1, *conds, latent())
    assert_identical(after["txt"], plain["txt"], "the text tokens leaving double block 0")
    assert_differs(after["img"], plain["img"], "the image tokens leaving double block 0")


def test_single_block_edits_image_tokens_only(model, conds, make_sae, make_features, apply_intervention):
    sae = make_sae(WIDTH, "dit.single.0", "flux", seed=2)
    edited = apply_intervention(model, sae, make_features(sae))
    plain = dit_block_inputs(model, "single_block", 1, *conds, latent())["img"]  # (batch, txt + img, C)
    after = dit_block_inputs(edited, "single_block", 1, *conds, latent())["img"]
    assert_identical(after[:, :TEXT_TOKENS], plain[:, :TEXT_TOKENS], "the text tokens leaving single block 0")
    unchanged = ~(after[:, TEXT_TOKENS:] != plain[:, TEXT_TOKENS:]).any(-1)  # (batch, img tokens)
    assert not unchanged.any(), (
        f"{int(unchanged.sum())} of {unchanged.numel()} image tokens leaving single block 0 are unchanged "
        f"(batch, token): {unchanged.nonzero().tolist()[:10]}"
    )
