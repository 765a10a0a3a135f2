"""Reliability of the edit and the analysis loops (issue 13): no overflow, cancellable, bounded."""

from __future__ import annotations

import pytest
import torch

from diffbias_core import FeatureSet, SparseAutoencoder
from diffbias_core.attribute.attribution import AttributionConfig, attribute
from diffbias_core.attribute.probes import ProbeConfig, fit_probes
from diffbias_core.base.progress import Cancelled
from diffbias_core.dissect.activations import MemorySource
from diffbias_core.intervene.intervention import EditSpec, apply_edit, feature_table

STRENGTH_LIMIT = 1000.0  # the Apply node's largest |strength| (nodes/apply.py)


def _fp16_setup(dtype: torch.dtype):
    """A float16/bfloat16 SAE and inputs whose selected latents are about 139 (as in the issue's case)."""
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(64, 128, 8)
    sae.reset_parameters(g)
    x = sae.W_dec.detach()[:4].repeat(3, 1) * 139.0 + 0.01 * torch.randn(12, 64, generator=g)  # (12, 64)
    sae = sae.to(dtype)
    features = FeatureSet(("a", "b"), (torch.arange(4), torch.arange(4, 8)), (torch.linspace(1, 0, 4),) * 2,
                          sae.fingerprint(), sae.hook, "ig")  # fmt: skip
    table = feature_table(features, 4)
    return sae, x.reshape(3, 4, 64).to(dtype), table


def _reference(x, sae, table, rows, spec):
    """The same edit written out naively in float64, then clamped into x's dtype."""
    w_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    w_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    xd = x.double()
    pre = torch.relu((xd - b_dec) @ w_enc.T + b_enc)  # (B, P, L)
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    out = xd.clone()
    for b in range(x.shape[0]):
        for j in table.ids[rows[b]].tolist():
            new = z[b, :, j] * spec.strength if spec.mode == "scale" else z[b, :, j] + spec.strength
            out[b] += (new - z[b, :, j])[:, None] * w_dec[j]
    limit = torch.finfo(x.dtype).max
    return out.clamp(-limit, limit).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("mode", "strength"), [("scale", STRENGTH_LIMIT), ("add", STRENGTH_LIMIT),
                                                ("add", -STRENGTH_LIMIT)])  # fmt: skip
def test_reliability_half_precision_edit_at_maximum_strength_is_finite(dtype, mode, strength):
    """Case 9: scale 1000 on z ~ 139 in float16 used to give inf and NaN: the edit is computed in float32 and
    the result, clamped into the model's dtype, is finite and equals a float64 reference."""
    sae, x, table = _fp16_setup(dtype)
    rows = torch.tensor([0, 1, 0])
    spec = EditSpec(mode=mode, strength=strength, top_k=4)
    out = apply_edit(x, sae, table, rows, spec)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = _reference(x, sae, table, rows, spec)
    torch.testing.assert_close(
        out.float(), expected.float(), rtol=2e-2, atol=2e-2 * float(expected.abs().max())
    )
    assert not torch.equal(out, x)


# ------------------------------------------------------------------------------------------------ case 14
class StopAfter:
    """should_stop that answers True from its n-th call on, counting the calls."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def test_reliability_probe_fitting_stops_inside_a_fit(planted):
    """Case 14: should_stop is polled inside every probe's L-BFGS fit, not only between steps: a request
    during the first step's fit ends it within one loss evaluation."""
    problem = planted.planted_maps(3, samples=12, steps=3)
    source = MemorySource(problem.batch, hook="toy.mid", classes=problem.classes)
    stop = StopAfter(5)  # 1 before step 0, then loss evaluations of its fit
    with pytest.raises(Cancelled):
        fit_probes(source, ProbeConfig(iterations=100), should_stop=stop)
    assert stop.calls == 5
    probes = fit_probes(source, ProbeConfig(iterations=5), should_stop=lambda: False)  # polled, never stops
    assert probes.steps.numel() == 3


@pytest.mark.parametrize(("method", "calls"), [("ig", 2), ("mean-diff", 1)])  # mean-diff: one batch here
def test_reliability_attribution_stops_on_request(planted, method, calls):
    """Case 14: integrated gradients and the mean-difference ranking poll should_stop before every batch."""
    problem = planted.planted_maps(4, samples=12, steps=3)
    source = MemorySource(problem.batch, hook="toy.mid", classes=problem.classes)
    probes = fit_probes(source, ProbeConfig(iterations=5)) if method == "ig" else None
    sae = planted.oracle_sae(problem.dictionary, k=4, hook="toy.mid")
    stop = StopAfter(calls)
    done = []
    with pytest.raises(Cancelled):
        attribute(sae, source, AttributionConfig(method=method, top_k=3), probes, should_stop=stop,
                  progress=lambda d, t: done.append(d))  # fmt: skip
    assert stop.calls == calls and len(done) == calls - 1
