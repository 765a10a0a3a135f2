import pytest
import torch

from diffbias_core.attribute.attribution import (
    AttributionConfig,
    attribute,
    integrated_gradients,
    mean_diff_scores,
)
from diffbias_core.attribute.features import load_features, save_features
from diffbias_core.attribute.probes import ProbeConfig, StepProbes, fit_probes
from diffbias_core.dissect.activations import MemorySource, make_batch
from diffbias_core.dissect.train import TrainConfig, train_sae
from diffbias_core.sae.model import SparseAutoencoder

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


def _random_setup(seed=0, width=6, size=2, latents=20, k=3, classes=3):
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(width, latents, k, hook="h", dtype=torch.float64, device="meta")
    sae.to_empty(device="cpu")
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(latents, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(width, generator=g))
    features = width * size * size
    probes = StepProbes(torch.tensor([0, 3]), torch.randn(2, classes, features, generator=g, dtype=torch.float64),
                        torch.randn(2, classes, generator=g, dtype=torch.float64),
                        classes=[f"c{i}" for i in range(classes)], hook="h", row_shape=(width, size, size),
                        accuracy=torch.zeros(2), train_accuracy=torch.zeros(2))  # fmt: skip
    acts = torch.randn(4, width, size, size, generator=g, dtype=torch.float64) + 0.5
    partners = torch.randn(4, 2, width, size, size, generator=g, dtype=torch.float64) + 0.5
    share = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    return sae, probes, acts, (partners, share), torch.tensor([0, 2, 1, 0])


def _naive_ig(sae, probes, acts, base, target, step, points, temperature):
    """One interpolation point at a time, dense latents, autograd per point."""

    def dense(x):  # (P, n) -> (P, L) TopK latents, error
        code = sae.encode(x)
        z = torch.zeros(x.shape[0], sae.num_latents, dtype=x.dtype).scatter(1, code.indices, code.values)
        return z, x - (z @ sae.w_dec_flat + sae.b_dec_flat)

    out = []
    for i in range(acts.shape[0]):
        z, err = dense(sae.map_to_inputs(acts[i : i + 1])[0])
        if base is None:
            z0, err0 = torch.zeros_like(z), err
        else:
            pairs = [dense(sae.map_to_inputs(base[0][i, j : j + 1])[0]) for j in range(base[0].shape[1])]
            z0 = sum(w * zz for w, (zz, _) in zip(base[1][i], pairs, strict=True))
            err0 = sum(w * ee for w, (_, ee) in zip(base[1][i], pairs, strict=True))
        grads_z, grads_e = [], []
        for a in ((torch.arange(points, dtype=z.dtype) + 0.5) / points).tolist():
            za = (z0 + a * (z - z0)).requires_grad_()
            ea = (err0 + a * (err - err0)).requires_grad_()
            x = za @ sae.w_dec_flat.detach() + sae.b_dec_flat.detach() + ea  # (P, n)
            h = sae.inputs_to_map(x[None], acts.shape[2], acts.shape[3])
            prob = (probes.logits(h, step) / temperature).softmax(-1)[0, target[i]]
            gz, ge = torch.autograd.grad(prob, [za, ea])
            grads_z.append(gz)
            grads_e.append(ge)
        gz, ge = torch.stack(grads_z).mean(0), torch.stack(grads_e).mean(0)
        out.append(((gz * (z - z0)).sum(0), (ge * (err - err0)).sum(), (gz * (z - z0).abs()).sum(0)))
    return [torch.stack(parts) for parts in zip(*out, strict=True)]


@pytest.mark.parametrize("paired", [True, False])
def test_batched_ig_matches_a_naive_per_point_loop(paired):
    sae, probes, acts, base, target = _random_setup()
    base = base if paired else None
    config = AttributionConfig(points=5, temperature=2.0)
    result = integrated_gradients(sae, probes, acts, target, 3, config, base)
    latents, error, score = _naive_ig(sae, probes, acts, base, target, 3, 5, 2.0)
    torch.testing.assert_close(result.latents, latents)
    torch.testing.assert_close(result.error, error)
    torch.testing.assert_close(result.score, score)
    assert sae.W_dec.grad is None  # the SAE is left untouched


@pytest.mark.parametrize("paired", [True, False])
def test_ig_completeness_within_the_riemann_error(paired):
    sae, probes, acts, base, target = _random_setup(seed=1)
    base = base if paired else None
    gaps = []
    for points in (2, 64):
        r = integrated_gradients(
            sae, probes, acts, target, 0, AttributionConfig(points=points, temperature=1.0), base
        )
        gaps.append((r.latents.sum(1) + r.error - (r.f_actual - r.f_baseline)).abs())
    total = (r.f_actual - r.f_baseline).abs()
    assert (gaps[1] <= 2e-3 * total.max() + 1e-9).all(), (gaps, total)
    assert gaps[1].max() < gaps[0].max()  # the midpoint rule converges
    assert total.max() > 0.1  # a non-trivial change to explain
    # the probe sees the real activation at the end of the path
    exact = (probes.logits(acts, 0) / 1.0).softmax(-1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(r.f_actual, exact)


def test_reconstruction_error_is_kept_so_the_probe_sees_real_activations(planted):
    problem = planted.planted_maps(3, noise=0.01)
    source = MemorySource(problem.batch, hook="test.hook", classes=problem.classes)
    probes = fit_probes(source, ProbeConfig(iterations=50))
    class_span = torch.linalg.qr(problem.dictionary[:4].T).Q  # (width, 4)
    background = problem.dictionary[4:] - problem.dictionary[4:] @ class_span @ class_span.T
    blind = planted.oracle_sae(
        background / background.norm(dim=1, keepdim=True), k=2
    )  # blind to the class atoms
    batch = source.select_step(0)
    first, second = batch.select(batch.label == 0), batch.select(batch.label == 1)  # pairs, in sample order
    assert torch.equal(first.sample, second.sample)
    acts, target = first.activations[:4].double(), first.label[:4]
    partners = (second.activations[:4, None].double(), torch.ones(4, 1, dtype=torch.float64))
    blind = blind.double()
    probes64 = StepProbes(probes.steps, probes.weight.double(), probes.bias.double(), classes=probes.classes,
                          hook=probes.hook, row_shape=probes.row_shape, accuracy=probes.accuracy,
                          train_accuracy=probes.train_accuracy)  # fmt: skip
    result = integrated_gradients(
        blind, probes64, acts, target, 0, AttributionConfig(temperature=1.0), partners
    )

    def prob(h):
        return probes64.logits(h, 0).softmax(-1).gather(1, target[:, None])[:, 0]

    # both ends of the path are the real activations, not SAE reconstructions
    torch.testing.assert_close(result.f_actual, prob(acts))
    torch.testing.assert_close(result.f_baseline, prob(partners[0][:, 0]))
    assert (result.f_actual - result.f_baseline).min() > 0.5
    # the SAE cannot explain the class: the error path carries the attribution, not its latents
    assert result.error.abs().sum() > 5 * result.latents.abs().sum()


def test_mean_diff_matches_a_naive_reference(planted):
    problem = planted.planted_maps(4, classes=3, noise=0.05)
    sae = planted.oracle_sae(problem.dictionary, k=4)
    source = MemorySource(problem.batch, hook="test.hook", classes=problem.classes)
    scores = mean_diff_scores(sae, source)
    rows = sae.map_to_inputs(problem.batch.activations)  # (N, P, n)
    code = sae.encode(rows)
    dense = torch.zeros(*rows.shape[:2], sae.num_latents).scatter(-1, code.indices, code.values)
    means = torch.stack([dense[problem.batch.label == c].mean((0, 1)) for c in range(3)])
    reference = torch.stack([means[c] - means[[o for o in range(3) if o != c]].mean(0) for c in range(3)])
    torch.testing.assert_close(scores.float(), reference, rtol=1e-5, atol=1e-6)


def _precision(features, class_atoms):
    hits = [len(set(features.ids[c].tolist()) & set(atoms.tolist())) for c, atoms in enumerate(class_atoms)]
    return sum(hits) / sum(len(atoms) for atoms in class_atoms)


@pytest.mark.parametrize("seed, classes, per_class, width, atoms, noise", [
    (0, 2, 2, 24, 20, 0.02),
    (1, 3, 2, 24, 20, 0.05),
    (2, 4, 1, 16, 16, 0.02),
    (3, 2, 2, 24, 20, 0.1),
    (4, 3, 2, 32, 24, 0.1),
])  # fmt: skip
def test_planted_class_atoms_are_ranked_first(planted, seed, classes, per_class, width, atoms, noise):
    problem = planted.planted_maps(
        seed, width=width, atoms=atoms, classes=classes, per_class=per_class, noise=noise
    )
    sae = planted.oracle_sae(problem.dictionary, k=2 + per_class)
    source = MemorySource(problem.batch, hook="test.hook", classes=problem.classes)
    probes = fit_probes(source, ProbeConfig(iterations=50))
    for method, baseline in (("ig", "paired"), ("ig", "zero"), ("mean-diff", "paired")):
        features = attribute(
            sae, source, AttributionConfig(method=method, baseline=baseline, top_k=per_class), probes
        )
        assert _precision(features, problem.class_atoms) >= 0.9, (method, baseline, features.ids)
        assert features.method == method and features.sae_fingerprint == sae.fingerprint()
    control = attribute(sae, source, AttributionConfig(method="random", top_k=per_class, seed=seed))
    assert _precision(control, problem.class_atoms) <= 0.5
    assert all(len(ids) == per_class for ids in control.ids)


def test_trained_sae_attribution_end_to_end(planted, tmp_path):
    problem = planted.planted_maps(5, samples=150, steps=2, noise=0.02)
    source = MemorySource(problem.batch, hook="test.hook", classes=problem.classes)
    config = TrainConfig(
        num_latents=40, k=4, batch_size=256, lr=1e-2, warmup_steps=5, epochs=25, dead_after_rows=2000
    )
    sae = train_sae(source, config).sae
    rows = sae.w_dec_flat.detach() / sae.w_dec_flat.detach().norm(dim=1, keepdim=True)  # (L, width)
    cosine = rows @ problem.dictionary.T  # (L, atoms)
    align = torch.stack([cosine[:, atoms].max(1).values for atoms in problem.class_atoms])  # (classes, L)
    probes = fit_probes(source, ProbeConfig(iterations=50))
    steps = []
    ig = attribute(
        sae, source, AttributionConfig(top_k=2), probes, progress=lambda d, t: steps.append((d, t))
    )
    assert steps == [(1, 2), (2, 2)]
    top_align = {}
    for features in (ig, attribute(sae, source, AttributionConfig(method="mean-diff", top_k=2)),
                     attribute(sae, source, AttributionConfig(method="random", top_k=2))):  # fmt: skip
        top_align[features.method] = torch.stack(
            [align[c, features.ids[c]] for c in range(2)]
        )  # (classes, 2)
    # the best feature of each class is a learned copy of one of its planted atoms; random ones are not
    assert (top_align["ig"][:, 0] > 0.6).all() and (top_align["mean-diff"][:, 0] > 0.6).all(), top_align
    assert top_align["random"].mean() < top_align["ig"].mean() - 0.3
    save_features(ig, tmp_path / "f.safetensors")
    loaded = load_features(tmp_path / "f.safetensors")
    assert loaded.classes == problem.classes and all(
        torch.equal(a, b) for a, b in zip(loaded.ids, ig.ids, strict=True)
    )
    assert float(loaded.provenance["error_share"]) < 0.5


def test_probes_and_attribution_work_inside_inference_mode(planted):
    problem = planted.planted_maps(8)
    sae = planted.oracle_sae(problem.dictionary, k=4)
    source = MemorySource(problem.batch, hook="test.hook", classes=problem.classes)
    config, probe_config = AttributionConfig(top_k=4), ProbeConfig(iterations=20)
    outside = attribute(sae, source, config, fit_probes(source, probe_config))
    with torch.inference_mode():  # how ComfyUI runs a node
        inside = attribute(sae, source, config, fit_probes(source, probe_config))
        # as in a node: the SAE loaded and the activations recorded there are inference tensors
        node_sae = sae.copy_to()
        node_source = MemorySource(type(problem.batch)(*(t.clone() for t in problem.batch)), hook="test.hook",
                                   classes=problem.classes)  # fmt: skip
        assert node_sae.W_dec.is_inference() and node_source.batch.activations.is_inference()
        in_node = attribute(node_sae, node_source, config, fit_probes(node_source, probe_config))
    for a, b, c in zip(inside.scores, outside.scores, in_node.scores, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)


def test_attribution_errors(planted):
    problem = planted.planted_maps(6)
    sae = planted.oracle_sae(problem.dictionary, k=4)
    source = MemorySource(problem.batch, hook="test.hook", classes=problem.classes)
    probes = fit_probes(source, ProbeConfig(iterations=10))
    batch = problem.batch
    only_first = MemorySource(batch.select(batch.label == 0), hook="test.hook", classes=problem.classes)
    with pytest.raises(ValueError, match="class 'class1' has no activations"):
        attribute(sae, only_first, AttributionConfig(method="mean-diff"))
    unpaired = MemorySource(
        batch._replace(sample=torch.arange(batch.num_rows)), hook="test.hook", classes=problem.classes
    )
    with pytest.raises(
        ValueError, match="'class0' activation of sample 0 has no activation of another class"
    ):
        attribute(sae, unpaired, AttributionConfig(), probes)
    other_hook = MemorySource(batch, hook="unet.middle", classes=problem.classes)
    other_sae = planted.oracle_sae(problem.dictionary, k=4, hook="unet.middle")
    with pytest.raises(ValueError, match="fitted on hook 'test.hook'.*from hook 'unet.middle'"):
        attribute(other_sae, other_hook, AttributionConfig(), probes)
    with pytest.raises(
        ValueError, match="trained on hook 'unet.middle', the activations are from hook 'test.hook'"
    ):
        attribute(other_sae, source, AttributionConfig(), probes)
    wide = MemorySource(make_batch(torch.randn(4, 30, 2, 2), 0, label=torch.tensor([0, 1, 0, 1])), hook="test.hook",
                        classes=problem.classes)  # fmt: skip
    with pytest.raises(ValueError, match="expects width 24, but the activations has width 30"):
        attribute(sae, wide, AttributionConfig(method="mean-diff"))
    with pytest.raises(ValueError, match="needs per-step probes"):
        attribute(sae, source, AttributionConfig())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        AttributionConfig(temperature=0.0)
