"""Encoder-free edits (add, others kept) against the encoder path ``apply_edit`` / ``edit_map``."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.intervene.additive import (
    add_deltas,
    class_deltas,
    listed_latents,
    needs_encoder,
)
from diffbias_core.intervene.intervention import (
    SUPPRESS,
    EditSpec,
    FeatureTable,
    apply_edit,
    edit_map,
    feature_table,
)
from tests.core.test_intervention import make_features, make_sae

CLASS_IDS = [[3, 7, 1, 9], [7, 2], [5, 3, 11], [4]]  # 7 and 3 listed twice; short classes are padded


def deltas_for(sae, table, spec):
    latents = listed_latents(table)
    return class_deltas(sae.w_dec_flat[latents], latents, table, spec)


ROWS = torch.tensor([0, 1, 2, -1, 3, 0, 7])  # 7: out of range, acts as -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("top_k", [1, 3, 4])
def test_tokens_equal_the_encoder_path(dtype, top_k):
    sae = make_sae(dtype=dtype)
    spec = EditSpec("add", 1.7, top_k=top_k)
    table = feature_table(make_features(CLASS_IDS), top_k)
    x = torch.randn(7, 9, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = add_deltas(x, deltas_for(sae, table, spec), ROWS)
    expected = apply_edit(x, sae, table, ROWS, spec)
    assert out.dtype == dtype and out.shape == x.shape
    if top_k == 1:  # one row per class: the same multiplications and additions, bit for bit
        assert torch.equal(out, expected)
    else:  # the class's rows are summed before, not after, the positions are spread: rounding only
        torch.testing.assert_close(
            out, expected, rtol=0, atol=4 * torch.finfo(dtype).eps * float(x.abs().max())
        )
    for row in (3, 6):
        assert torch.equal(out[row], x[row]), f"row {row} (class {int(ROWS[row])}) must stay bit for bit"
    assert not torch.equal(out[0], x[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel_size", [1, 4])
def test_maps_equal_the_encoder_path(dtype, kernel_size):
    sae = make_sae(kernel_size=kernel_size, dtype=dtype)
    spec = EditSpec("add", -2.5, top_k=1)
    table = feature_table(make_features(CLASS_IDS), 1)
    side = 4 if kernel_size > 1 else 5
    h = torch.randn(7, 6, side, side, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = add_deltas(h, deltas_for(sae, table, spec), ROWS)
    expected = edit_map(h, sae, table, ROWS, spec)
    assert out.shape == h.shape and out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(out[3], h[3]) and not torch.equal(out[1], h[1])


def test_a_class_without_features_leaves_its_rows_bit_for_bit():
    """A table row of padding only (a FeatureSet never has one, a hand-made table can): -0.0 stays -0.0."""
    sae = make_sae()
    table = FeatureTable(torch.tensor([[3, 0], [0, 0]]), torch.tensor([[True, False], [False, False]]))
    spec = EditSpec("add", 3.0, top_k=2)
    x = -torch.zeros(2, 3, 6)
    out = add_deltas(x, deltas_for(sae, table, spec), torch.tensor([0, 1]))
    assert torch.equal(out, apply_edit(x, sae, table, torch.tensor([0, 1]), spec))
    assert torch.equal(out[1], x[1]) and torch.signbit(out[1]).all()


def test_a_wrong_map_size_is_refused():
    sae = make_sae(kernel_size=4)
    table = feature_table(make_features(CLASS_IDS), 2)
    deltas = deltas_for(sae, table, EditSpec("add", 1.0, top_k=2))
    with pytest.raises(ValueError, match=r"width 96 does not fit an activation of shape \(2, 6, 8, 8\)"):
        add_deltas(torch.zeros(2, 6, 8, 8), deltas, torch.tensor([0, 1]))


@settings(max_examples=40, deadline=None)
@given(
    strength=st.floats(-1000, 1000, allow_nan=False).filter(lambda s: s != 0),
    top_k=st.integers(1, 4),
    rows=st.lists(st.sampled_from([-1, 0, 1, 2, 3]), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_random_edits_match_within_rounding(strength, top_k, rows, seed):
    sae = make_sae(seed=seed)
    spec = EditSpec("add", strength, top_k=top_k)
    table = feature_table(make_features(CLASS_IDS), top_k)
    x = torch.randn(len(rows), 5, 6, generator=torch.Generator().manual_seed(seed))
    classes = torch.tensor(rows)
    out = add_deltas(x, deltas_for(sae, table, spec), classes)
    expected = apply_edit(x, sae, table, classes, spec)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * max(1.0, abs(strength)))


def test_half_precision_at_maximum_strength_stays_finite():
    """As reliability case 9 for the encoder path: float32 arithmetic, clamped into float16, equal to a float64
    reference (here the float16 encoder itself would overflow on x: the encoder-free edit never runs it)."""
    sae = make_sae(dtype=torch.float16)
    with torch.no_grad():
        sae.W_dec.mul_(200.0)
    spec = EditSpec("add", 1000.0, top_k=1)
    table = feature_table(make_features(CLASS_IDS), 1)
    x = torch.full((3, 2, 6), 60000.0, dtype=torch.float16)
    out = add_deltas(x, deltas_for(sae, table, spec), torch.tensor([0, 1, 2]))
    rows = sae.W_dec.double()[table.ids[:3, 0]]  # (3, 6) the one row of each class
    limit = torch.finfo(torch.float16).max
    expected = (x.double() + 1000.0 * rows[:, None, :]).clamp(-limit, limit).to(torch.float16)
    assert torch.isfinite(out).all() and (out.abs() == limit).any(), "the fixture must reach the clamp"
    assert torch.equal(out, expected)


def test_needs_encoder():
    assert not needs_encoder(EditSpec("add", 1.0))
    assert not needs_encoder(EditSpec("add", 1.0), torch.tensor([0, 1, -1]))
    assert needs_encoder(EditSpec("add", 1.0), torch.tensor([0, SUPPRESS]))
    assert needs_encoder(EditSpec("add", 1.0, others="ablate"))
    for mode in ("scale", "set", "ablate"):
        assert needs_encoder(EditSpec(mode, 1.0))


def test_class_deltas_refuses_what_it_cannot_do():
    sae = make_sae()
    table = feature_table(make_features(CLASS_IDS), 2)
    latents = listed_latents(table)
    with pytest.raises(ValueError, match="needs an 'add' edit"):
        class_deltas(sae.w_dec_flat[latents], latents, table, EditSpec("scale", 2.0))
    with pytest.raises(ValueError, match="do not hold every id"):
        class_deltas(sae.w_dec_flat[latents[1:]], latents[1:], table, EditSpec("add", 2.0))
    assert listed_latents(table).tolist() == [2, 3, 4, 5, 7]  # the top 2 of each class, once
