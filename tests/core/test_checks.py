"""Stages that check themselves: FVU for tiny inputs, the automatic training length and verdict, the probe
test against chance, feature warnings, and where they are recorded."""

import math

import pytest
import torch

from diffbias_core.attribute.attribution import AttributionConfig, attribute
from diffbias_core.attribute.features import (
    FeatureSet,
    feature_warnings,
    load_features,
    probe_accuracy,
    save_features,
)
from diffbias_core.attribute.probes import (
    ProbeConfig,
    StepProbes,
    binomial_tail,
    chance_threshold,
    check_chance,
    fit_probes,
)
from diffbias_core.dissect.activations import MemorySource, make_batch
from diffbias_core.dissect.train import SaeTrainer, TrainConfig, config_for_rows, train_sae
from diffbias_core.dissect.train_check import (
    FVU_CEILING,
    Plateau,
    Reservoir,
    auto_batch_size,
    heldout_fvu,
    judge,
)
from diffbias_core.sae.model import SparseAutoencoder, fvu

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


def _sae(width=6, latents=12, k=2, seed=0):
    sae = SparseAutoencoder(width, latents, k, hook="h", device="meta")
    sae.to_empty(device="cpu")
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


# ---------------------------------------------------------------------------------------------- FVU
def test_heldout_fvu_matches_the_definition_and_refuses_what_has_no_variance():
    sae = _sae()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1)) + 3.0
    with torch.no_grad():
        reference = ((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert heldout_fvu(sae, x) == pytest.approx(reference, rel=1e-5)
    assert heldout_fvu(sae, x) == pytest.approx(float(fvu(x, sae(x).detach())), rel=1e-5)
    with pytest.raises(ValueError, match=r"at least two different rows, got 1 row"):
        heldout_fvu(sae, x[:1])
    with pytest.raises(ValueError, match="without variance"):
        heldout_fvu(sae, x[:1].expand(5, -1))


def test_train_sae_refuses_a_single_row():
    with pytest.raises(ValueError, match="needs at least 2 activation rows .* got 1"):
        train_sae(MemorySource(make_batch(torch.randn(1, 6), 0), hook="h"), TrainConfig(num_latents=8, k=2))


def test_a_one_row_last_batch_has_a_finite_fvu(planted):
    x, _ = planted.planted_rows(3, width=8, atoms=8, k=2, rows=16 * 20 + 1, noise=0.0)  # last batch: 1 row
    seen = []
    config = TrainConfig(num_latents=8, k=2, batch_size=16, buffer_batches=2, warmup_steps=0, ema_span=1)
    trainer = SaeTrainer(config, 8, progress=seen.append)
    trainer.feed(x)
    stats = trainer.finish()
    assert stats.step == 21 and seen[-1].step == 21  # the 1-row batch was a step
    assert math.isfinite(stats.fvu) and stats.fvu < 2.0, stats.fvu  # was |error|^2 / 0 = 8e26
    assert 0 < trainer.run.variance < 10


# ---------------------------------------------------------------------------------------------- length
def test_automatic_sizes():
    assert [auto_batch_size(r) for r in (100, 12_000, 10**5, 10**8)] == [256, 375, 3125, 4096]
    config = config_for_rows(128, 8, 12_000)
    assert (config.epochs, config.batch_size, config.warmup_steps, config.dead_after_rows) == (
        None,
        375,
        200,
        12_000,
    )
    assert config.min_steps == 2000 and config.plateau == 0.02 and config.holdout == 0.1
    assert config_for_rows(128, 8, 10**9).dead_after_rows == 1_000_000
    assert config_for_rows(128, 8, 500, batch_size=64, min_steps=100).warmup_steps == 10


def test_plateau_rule():
    rule = Plateau(window=100, plateau=0.02)
    for step, value in ((100, 0.5), (200, 0.3)):
        rule.add(step, value)
    assert rule.improvement() == pytest.approx(0.4) and not rule.converged()
    rule.add(300, 0.297)
    assert rule.improvement() == pytest.approx(0.01) and rule.converged()  # 1% < 2%
    low = Plateau(window=100, plateau=0.02)
    low.add(100, 0.010)
    low.add(200, 0.0095)  # 5% of itself, but 0.0005 of the variance: below the resolution
    assert low.converged()
    assert Plateau(window=100, plateau=0.02).improvement() is None


def _judge(**changes):
    values = dict(fvu=0.1, heldout_rows=100, fvu_on="held-out rows", steps=2000, min_steps=2000,
                  dead_fraction=0.1, improvement=0.01, still_improving=False, rows=10_000, num_latents=128,
                  stopped="held-out FVU converged")  # fmt: skip
    return judge(**{**values, **changes})


@pytest.mark.parametrize("changes, reason", [
    ({"steps": 3}, "3 optimizer steps, fewer than the 2000"),
    ({"fvu": 0.65}, f"FVU 0.650 is above {FVU_CEILING}"),
    ({"fvu": float("nan")}, "FVU nan is above"),
    ({"still_improving": True, "improvement": 0.09}, "still fell 9.0%"),
    ({"rows": 100}, "100 training rows for 128 latents"),
])  # fmt: skip
def test_each_rule_makes_the_verdict_under_trained(changes, reason):
    assert _judge().verdict == "trained" and _judge().ok
    check = _judge(**changes)
    assert check.verdict == "under-trained" and len(check.reasons) == 1 and reason in check.reasons[0]
    assert f"verdict: under-trained ({check.reasons[0]})" in check.summary()


def test_warnings_do_not_change_the_verdict():
    check = _judge(dead_fraction=0.8, fvu_on="training rows")
    assert check.verdict == "trained" and not check.ok and len(check.warnings) == 2
    assert "80% of the latents are dead" in check.summary() and "optimistic" in check.summary()


def test_three_steps_on_12000_rows_are_reported_under_trained(planted):
    x, _ = planted.planted_rows(21, width=64, atoms=64, k=4, rows=12_000, noise=0.02)
    result = train_sae(MemorySource(make_batch(x, 0), hook="h"), TrainConfig(num_latents=128, k=8))
    check = result.check
    assert result.stats.step == 3 and check.verdict == "under-trained"  # batch 4096, one pass: as before
    assert check.heldout_rows == 1200 and check.fvu_on == "held-out rows"
    assert any("3 optimizer steps" in r for r in check.reasons) and any(
        "above 0.5" in r for r in check.reasons
    )


def test_automatic_length_takes_at_least_min_steps_then_stops_at_the_plateau(planted):
    x, _ = planted.planted_rows(22, width=16, atoms=16, k=3, rows=3_000, noise=0.01)
    config = config_for_rows(32, 3, 3_000, min_steps=300)
    result = train_sae(MemorySource(make_batch(x, 0), hook="h"), config)
    check = result.check
    assert config.batch_size == 256 and config.warmup_steps == 30
    assert 300 <= check.steps < 3000 and check.stopped == "held-out FVU converged", check
    assert check.verdict == "trained" and check.heldout_fvu < 0.1, check
    assert check.heldout_fvu == pytest.approx(heldout_fvu(result.sae, x[torch.isin(torch.arange(3000), _held(3000))]),
                                              rel=1e-6)  # fmt: skip


def _held(n):
    from diffbias_core.attribute.probes import holdout_samples

    return holdout_samples(torch.arange(n), 0.1, 0)


def test_held_out_rows_are_never_trained_on():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(5))
    held = _held(200)
    x[held] = float("nan")  # a held-out row reaching the trainer would be counted as skipped
    result = train_sae(MemorySource(make_batch(x, 0), hook="h"),
                       TrainConfig(num_latents=8, k=2, batch_size=32, holdout=0.1))  # fmt: skip
    assert result.stats.skipped == 0 and result.stats.rows == 180


def test_reservoir_keeps_a_uniform_sample():
    store = Reservoir(1000, seed=0)
    for start in range(0, 10_000, 250):
        ids = torch.arange(start, start + 250)
        store.add(ids[:, None].float(), ids, ids % 7)
    kept = store.batch()
    assert kept.num_rows == 1000 and torch.equal(kept.activations[:, 0].long(), kept.sample)
    assert torch.equal(kept.step, kept.sample % 7)
    halves = int((kept.sample < 5000).sum())
    assert 430 <= halves <= 570, halves  # binomial(1000, 0.5): 4.4 standard deviations
    small = Reservoir(10)
    small.add(torch.ones(4, 2), torch.arange(4), torch.zeros(4))
    assert small.batch().num_rows == 4 and Reservoir(3).batch() is None


# ---------------------------------------------------------------------------------------------- probes
def test_binomial_tail_and_threshold_match_a_naive_sum():
    for n, p in ((10, 0.5), (17, 1 / 3), (40, 0.25)):
        for c in range(n + 1):
            naive = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(c, n + 1))
            assert binomial_tail(c, n, p) == pytest.approx(naive, rel=1e-9, abs=1e-15)
    assert chance_threshold(10, 2, 0.01) == 10  # P(X >= 10) = 0.00098, P(X >= 9) = 0.0107
    assert chance_threshold(6, 2, 0.01) is None  # 1/64 > 0.01: six held-out activations cannot tell
    assert chance_threshold(100, 2, 0.01) == 63


def _probes(accuracy, heldout):
    s = len(accuracy)
    return StepProbes(torch.arange(s), torch.zeros(s, 2, 3), torch.zeros(s, 2), classes=["a", "b"], hook="h",
                      row_shape=(3,), accuracy=torch.tensor(accuracy), train_accuracy=torch.ones(s),
                      heldout=torch.tensor(heldout))  # fmt: skip


def test_chance_check_per_step_with_a_bonferroni_split():
    check = check_chance(_probes([0.5, 0.63, 0.7], [100, 100, 100]))
    # alpha 0.01 over 3 steps: a step needs the fewest c of 100 with P(X >= c) <= 0.01 / 3
    need = next(c for c in range(101) if sum(math.comb(100, i) for i in range(c, 101)) / 2**100 <= 0.01 / 3)
    assert need == 64
    assert check.decidable and check.above.tolist() == [False, False, True] and not check.at_chance
    assert check.threshold.tolist() == pytest.approx([need / 100] * 3)
    assert check_chance(_probes([0.5, 0.6], [100, 100])).at_chance
    undecided = check_chance(_probes([1.0, 1.0], [4, 4]))
    assert not undecided.decidable and not undecided.at_chance


def _identical_pairs(planted, samples):
    """Two classes whose activations are identical (the same prompt twice, the same noise)."""
    batch = planted.planted_maps(9, samples=samples, steps=2).batch
    first = batch.select(batch.label == 0)
    copy = first._replace(label=torch.ones_like(first.label))
    from diffbias_core.dissect.activations import concat_batches

    return MemorySource(concat_batches([first, copy]), hook="test.hook", classes=("class0", "class1"))


def test_attribution_on_identical_classes_is_an_error_not_a_ranking(planted):
    source = _identical_pairs(planted, samples=60)
    probes = fit_probes(source, ProbeConfig(iterations=20))
    assert probes.heldout.tolist() == [30, 30] and probes.accuracy.tolist() == [0.5, 0.5]
    sae = planted.oracle_sae(planted.planted_maps(9).dictionary, k=4)
    for method in ("ig", "mean-diff"):
        with pytest.raises(
            ValueError, match="do not separate the classes .* at hook 'test.hook'.*chance 0.50"
        ):
            attribute(sae, source, AttributionConfig(method=method), probes)


def test_too_few_held_out_samples_is_a_warning(planted):
    source = _identical_pairs(planted, samples=8)  # 2 held-out pairs: 4 activations per step
    probes = fit_probes(source, ProbeConfig(iterations=20))
    sae = planted.oracle_sae(planted.planted_maps(9).dictionary, k=4)
    features = attribute(sae, source, AttributionConfig(method="mean-diff", top_k=3), probes)
    assert features.provenance["probe_check"].startswith("undecided: too few held-out activations (4)")
    assert any(w.startswith("probe test undecided") for w in feature_warnings(features))


def test_probe_accuracy_is_stored_in_the_feature_file_and_old_files_still_load(planted, tmp_path):
    problem = planted.planted_maps(10, samples=40)
    source = MemorySource(problem.batch, hook="test.hook", classes=problem.classes)
    probes = fit_probes(source, ProbeConfig(iterations=30))
    sae = planted.oracle_sae(problem.dictionary, k=4)
    features = attribute(sae, source, AttributionConfig(top_k=2), probes)
    save_features(features, tmp_path / "f.safetensors")
    loaded = load_features(tmp_path / "f.safetensors")
    expected = [
        (s, round(a, 4)) for s, a in zip(probes.steps.tolist(), probes.accuracy.tolist(), strict=True)
    ]
    assert probe_accuracy(loaded) == expected and loaded.provenance["probe_heldout"] == "0:20,1:20"
    assert loaded.provenance["probe_check"] == "2 of 2 steps above chance (p < 0.01)"
    assert feature_warnings(loaded, 2) == []
    old = FeatureSet(features.classes, features.ids, features.scores, features.sae_fingerprint, features.hook, "ig",
                     {"steps": "0,1"})  # a file written before the probe entries existed  # fmt: skip
    save_features(old, tmp_path / "old.safetensors")
    assert probe_accuracy(load_features(tmp_path / "old.safetensors")) == []


def test_feature_warnings_name_zero_scores_and_shared_features():
    ids = (torch.tensor([3, 1, 2]), torch.tensor([3, 5, 6]))
    scores = (torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 0.5, 0.2]))
    features = FeatureSet(("a", "b"), ids, scores, "fp", "h", "ig")
    warnings = feature_warnings(features)
    assert warnings == ["class 'a': 2 of its top 3 features have a score of zero or less (they do not carry the class)",
                        "1 feature(s) listed under several classes: #3 (a/b)"]  # fmt: skip
    assert feature_warnings(features, top_k=1) == ["1 feature(s) listed under several classes: #3 (a/b)"]
    control = FeatureSet(("a", "b"), (torch.tensor([1]), torch.tensor([2])), (torch.zeros(1), torch.zeros(1)), "fp",
                         "h", "random")  # fmt: skip
    assert feature_warnings(control) == []  # the random control has no scores by design
