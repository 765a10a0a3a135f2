"""Feature intervention against a naive dense reference written out here."""

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core import FeatureSet, SparseAutoencoder
from diffbias_core.intervene.intervention import (
    SUPPRESS,
    EditSpec,
    FeatureTable,
    apply_edit,
    assign_classes,
    edit_map,
    feature_table,
    parse_target,
)

CLASS_IDS = [[3, 7, 1, 9], [7, 2], [5, 3, 11]]  # latent 7 and 3 are listed by two classes each


def make_sae(d_in=6, num_latents=12, k=5, kernel_size=1, dtype=torch.float32, seed=0):
    sae = SparseAutoencoder(d_in, num_latents, k, kernel_size=kernel_size, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae.requires_grad_(False)


def make_features(class_ids=CLASS_IDS):
    return FeatureSet(
        classes=tuple(f"c{i}" for i in range(len(class_ids))),
        ids=tuple(torch.tensor(ids, dtype=torch.int64) for ids in class_ids),
        scores=tuple(torch.linspace(1, 0, len(ids)) for ids in class_ids),
        sae_fingerprint="0" * 16,
        hook="unet.middle",
        method="test",
    )


def naive_edit(x, sae, class_ids, sample_class, spec):
    """x + (z' - z) W_dec with z' built latent by latent, row by row, in float64."""
    code = sae.encode(x)
    z = torch.zeros(*x.shape[:-1], sae.num_latents, dtype=torch.float64)
    z.scatter_(-1, code.indices, code.values.double())
    lists = [ids[: spec.top_k] for ids in class_ids]
    new = z.clone()
    for b, c in enumerate(sample_class):
        if c == SUPPRESS:
            for ids in lists:
                for j in ids:
                    new[b, :, j] = 0.0
        elif 0 <= c < len(lists):
            own = lists[c]
            if spec.others == "ablate":
                for other, ids in enumerate(lists):
                    for j in ids:
                        if other != c and j not in own:
                            new[b, :, j] = 0.0
            for j in own:
                old = z[b, :, j]
                new[b, :, j] = {
                    "scale": old * spec.strength,
                    "add": old + spec.strength,
                    "set": torch.full_like(old, spec.strength),
                    "ablate": torch.zeros_like(old),
                }[spec.mode]
    w = sae.W_dec.double().reshape(sae.num_latents, -1)
    return x.double() + (new - z) @ w


SPECS = [
    EditSpec("scale", 2.5, top_k=3),
    EditSpec("scale", 1.0, top_k=4, others="ablate"),
    EditSpec("add", -0.7, top_k=2),
    EditSpec("add", 1.5, top_k=4, others="ablate"),
    EditSpec("set", 0.8, top_k=3),
    EditSpec("ablate", top_k=4),
    EditSpec("ablate", top_k=1, others="ablate"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-{s.strength}-{s.top_k}-{s.others}")
def test_apply_edit_matches_naive_reference(spec):
    sae = make_sae()
    x = torch.randn(6, 9, 6, generator=torch.Generator().manual_seed(1))
    sample_class = [0, 1, 2, -1, SUPPRESS, 0]
    table = feature_table(make_features(), spec.top_k)
    out = apply_edit(x, sae, table, torch.tensor(sample_class), spec)
    expected = naive_edit(x, sae, CLASS_IDS, sample_class, spec)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert out.dtype == x.dtype
    assert torch.equal(out[3], x[3]), "a -1 row is untouched"
    assert not torch.equal(out[4], x[4]), "the fixture must make SUPPRESS change something"


def test_fixture_edits_active_latents():
    """Guard: the listed features are among the top-k of many tokens, so the comparisons above are not vacuous."""
    sae = make_sae()
    x = torch.randn(6, 9, 6, generator=torch.Generator().manual_seed(1))
    active = sae.encode(x).indices
    for ids in CLASS_IDS:
        assert (active[..., None] == torch.tensor(ids)).any(-1).any(-1).float().mean() > 0.3


@settings(max_examples=40, deadline=None)
@given(
    spec=st.sampled_from([EditSpec("scale", 1.0), EditSpec("add", 0.0), EditSpec("ablate", top_k=0)]),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 4),
)
def test_identity_spec_returns_the_input_itself(spec, seed, batch):
    sae = make_sae()
    x = torch.randn(batch, 5, 6, generator=torch.Generator().manual_seed(seed))
    sample_class = torch.randint(-2, 3, (batch,), generator=torch.Generator().manual_seed(seed))
    assert spec.is_identity
    assert apply_edit(x, sae, feature_table(make_features(), 4), sample_class, spec) is x
    h = torch.randn(batch, 6, 2, 3)
    assert edit_map(h, sae, feature_table(make_features(), 4), sample_class, spec) is h


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["scale", "add", "set", "ablate"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_rows_marked_minus_one_are_bit_identical(seed, mode, dtype):
    sae = make_sae()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, 6, generator=g).to(dtype)
    x[0, 0, 0] = -0.0  # a negative zero would turn positive under x + 0
    x[2, 1, 3] = -0.0
    out = apply_edit(x, sae, feature_table(make_features(), 3), torch.tensor([-1, 0, -1, SUPPRESS]),
                     EditSpec(mode, 2.0, top_k=3, others="ablate"))  # fmt: skip
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(out[[0, 2]].view(bits), x[[0, 2]].view(bits))


@pytest.mark.parametrize(
    ("sae_dtype", "x_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.float16), (torch.float16, torch.float32)],
)  # fmt: skip
def test_low_precision_keeps_the_callers_dtype(sae_dtype, x_dtype):
    sae = make_sae(dtype=sae_dtype)
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    spec = EditSpec("add", 1.0, top_k=3)
    out = apply_edit(x, sae, feature_table(make_features(), 3), torch.tensor([0, 1, 2]), spec)
    assert out.dtype == x_dtype and out.shape == x.shape
    expected = naive_edit(x.to(sae_dtype), sae, CLASS_IDS, [0, 1, 2], spec)
    torch.testing.assert_close(out.double(), expected, atol=0.1, rtol=0.05)


def test_edit_map_per_token_and_kernel_variant():
    for kernel, size in ((1, (3, 4)), (2, (2, 2))):
        sae = make_sae(kernel_size=kernel, seed=kernel)
        h = torch.randn(3, 6, *size, generator=torch.Generator().manual_seed(3))
        spec = EditSpec("scale", 3.0, top_k=4, others="ablate")
        out = edit_map(h, sae, feature_table(make_features(), 4), torch.tensor([2, -1, 0]), spec)
        x = sae.map_to_inputs(h)
        expected = naive_edit(x, sae, CLASS_IDS, [2, -1, 0], spec)
        torch.testing.assert_close(out.double(), sae.inputs_to_map(expected, *size), atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1], h[1])


def test_out_of_range_classes_leave_rows_unchanged():
    sae = make_sae()
    x = torch.randn(2, 4, 6)
    out = apply_edit(x, sae, feature_table(make_features(), 3), torch.tensor([3, -5]), EditSpec("add", 1.0))
    assert torch.equal(out, x)


def test_feature_table_pads_short_classes():
    table = feature_table(make_features(), 3)
    assert torch.equal(table.ids, torch.tensor([[3, 7, 1], [7, 2, 0], [5, 3, 11]]))
    assert torch.equal(
        table.valid, torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    )
    assert table.ids.dtype == torch.int64
    empty = feature_table(make_features(), 0)
    assert empty.ids.shape == (3, 0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        feature_table(make_features(), -1)


def test_apply_edit_rejects_bad_shapes():
    sae = make_sae()
    table = FeatureTable(torch.tensor([[1], [2]]), torch.tensor([[True], [True]]))
    with pytest.raises(ValueError, match=r"x of shape \(B, P, n_in\).*got x \(4, 6\)"):
        apply_edit(torch.zeros(4, 6), sae, table, torch.zeros(4, dtype=torch.long), EditSpec("add", 1.0))
    with pytest.raises(ValueError, match=r"sample_class \(3,\)"):
        apply_edit(torch.zeros(2, 1, 6), sae, table, torch.zeros(3, dtype=torch.long), EditSpec("add", 1.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "multiply"}, "mode must be one of"),
        ({"others": "drop"}, "others must be one of"),
        ({"strength": float("nan")}, "strength must be finite"),
        ({"strength": "1"}, "strength must be a number"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
    ],
)
def test_edit_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EditSpec(**kwargs)


def test_is_identity():
    assert EditSpec().is_identity
    assert EditSpec("scale", 1.0).is_identity
    assert EditSpec("set", 5.0, top_k=0).is_identity
    assert not EditSpec("scale", 1.0, others="ablate").is_identity
    assert not EditSpec("add", 0.1).is_identity
    assert not EditSpec("set", 0.0).is_identity
    assert not EditSpec("ablate").is_identity


@settings(max_examples=60, deadline=None)
@given(
    num_images=st.integers(0, 64),
    weights=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=5).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 2**31),
)
def test_assign_classes_hits_largest_remainder_counts(num_images, weights, seed):
    labels = assign_classes(num_images, weights, seed)
    assert labels.dtype == torch.int64 and labels.shape == (num_images,)
    counts = Counter(labels.tolist())
    quotas = [w / sum(weights) * num_images for w in weights]
    for i, quota in enumerate(quotas):
        assert int(quota) <= counts.get(i, 0) <= int(quota) + 1, (counts, quotas)
    assert sum(counts.values()) == num_images
    assert torch.equal(labels, assign_classes(num_images, weights, seed)), "reproducible from the seed"


def test_assign_classes_exact_counts_and_shuffle():
    labels = assign_classes(10, [0.3, 0.7], seed=0)
    assert Counter(labels.tolist()) == {0: 3, 1: 7}
    assert Counter(assign_classes(7, [1, 1, 1], seed=0).tolist()) == {0: 3, 1: 2, 2: 2}, (
        "ties go to the lower class"
    )
    orders = {tuple(assign_classes(8, [1, 1], seed=s).tolist()) for s in range(20)}
    assert len(orders) > 10, "different seeds give different orders"
    with pytest.raises(ValueError, match="weight 1 must be a finite number >= 0"):
        assign_classes(4, [1, -1], 0)
    with pytest.raises(ValueError, match="positive sum"):
        assign_classes(4, [0, 0], 0)
    with pytest.raises(ValueError, match="num_images must be an integer >= 0"):
        assign_classes(-1, [1], 0)


def test_parse_target():
    classes = ["male", "female"]
    assert parse_target("", classes) == (0.5, 0.5)
    assert parse_target("  ", ["a", "b", "c", "d"]) == (0.25,) * 4
    assert parse_target("1,3", classes) == (0.25, 0.75)
    assert parse_target("female:0.7, male : 0.3", classes) == pytest.approx((0.3, 0.7))
    assert parse_target("female:2", classes) == (0.0, 1.0)
    for text, message in [
        ("1,2,3", "expected 2 weights"),
        ("1,-1", "finite and >= 0"),
        ("0,0", "sum to 0"),
        ("man:1", "unknown class 'man'"),
        ("male:1,male:2", "given twice"),
        ("male:1,2", "not both"),
        ("1,x", "'x' is not a number"),
        ("inf,1", "finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_target(text, classes)
