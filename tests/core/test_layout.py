"""The layout helper: exact round trips between maps, tokens and SAE rows, against written-out indexing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.base import layout

sizes = st.integers(min_value=1, max_value=5)


def _values(*shape: int) -> torch.Tensor:
    """Distinct values, so that any misplaced element shows."""
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(b=sizes, c=sizes, h=sizes, w=sizes)
def test_per_token_map_round_trips_and_orders_positions_row_by_row(b, c, h, w):
    maps = _values(b, c, h, w)
    inputs = layout.map_to_inputs(maps)
    rows = layout.map_to_rows(maps)
    assert inputs.shape == (b, h * w, c) and rows.shape == (b * h * w, c)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                assert torch.equal(inputs[i, y * w + x], maps[i, :, y, x])
                assert torch.equal(rows[(i * h + y) * w + x], maps[i, :, y, x])
    assert torch.equal(layout.inputs_to_map(inputs, h, w), maps)
    assert torch.equal(layout.rows_to_map(rows, h, w), maps)
    assert torch.equal(layout.activations_to_rows(maps), rows)
    assert torch.equal(layout.map_to_tokens(maps), inputs)


@settings(max_examples=40, deadline=None)
@given(b=sizes, c=sizes, k=st.integers(min_value=2, max_value=4))
def test_kernel_map_is_one_row_in_channel_row_column_order(b, c, k):
    maps = _values(b, c, k, k)
    inputs = layout.map_to_inputs(maps, k)
    assert inputs.shape == (b, 1, c * k * k)
    for i in range(b):
        for ch in range(c):
            for y in range(k):
                for x in range(k):
                    assert inputs[i, 0, (ch * k + y) * k + x] == maps[i, ch, y, x]
    assert torch.equal(layout.inputs_to_map(inputs, k, k, k), maps)
    rows = layout.map_to_rows(maps, k)
    assert torch.equal(rows, inputs[:, 0]) and torch.equal(layout.rows_to_map(rows, k, k, k), maps)


@settings(max_examples=40, deadline=None)
@given(b=sizes, t=sizes, c=sizes)
def test_tokens_round_trip_and_equal_a_width_one_map(b, t, c):
    tokens = _values(b, t, c)
    as_map = layout.tokens_to_map(tokens)
    assert as_map.shape == (b, c, t, 1)
    for i in range(b):
        for j in range(t):
            assert torch.equal(as_map[i, :, j, 0], tokens[i, j])
    assert torch.equal(layout.to_map(tokens), as_map) and layout.to_map(as_map) is as_map
    assert torch.equal(layout.map_to_tokens(as_map), tokens)
    rows = layout.tokens_to_rows(tokens)
    assert torch.equal(rows, layout.map_to_rows(as_map))  # a token is a position of its map
    assert torch.equal(layout.activations_to_rows(tokens), rows)
    assert torch.equal(layout.rows_to_tokens(rows, t), tokens)


def test_rows_pass_through_and_bad_shapes_are_named():
    rows = torch.randn(6, 3)
    assert layout.activations_to_rows(rows) is rows
    with pytest.raises(ValueError, match="2x2 kernel and codes whole 2x2 maps, but the map is 4x3"):
        layout.map_to_inputs(torch.zeros(1, 3, 4, 3), 2)
    with pytest.raises(ValueError, match=r"expected a \(B, C, H, W\) map, got shape \(3, 4\)"):
        layout.map_to_rows(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="codes .* maps, not .* tokens"):
        layout.activations_to_rows(torch.zeros(2, 3, 4), kernel_size=2)
    with pytest.raises(ValueError, match=r"expected \(B\*4, n_in\) SAE rows, got shape \(6, 3\)"):
        layout.rows_to_map(rows, 2, 2)
    with pytest.raises(ValueError, match=r"expected \(B\*4, C\) SAE rows"):
        layout.rows_to_tokens(rows, 4)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4, 5, 6\)"):
        layout.activations_to_rows(torch.zeros(2, 3, 4, 5, 6))
