"""Measure: the report's figures against formulas written out here; the linear probe; its file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.measure import (
    EmbeddingClassifier,
    FitConfig,
    ImageClassifier,
    fit_probe,
    format_report,
    load_probe,
    measure,
    measure_images,
    per_image_table,
    preservation,
    save_probe,
)
from diffbias_core.measure.classifier import check_same_model, reference_image, split_indices
from diffbias_core.sae.formats import FormatError, read_header, write_safetensors

Z95 = 1.959963984540054


def naive_fd(mean, target):
    return math.sqrt(sum((m - t) ** 2 for m, t in zip(mean, target, strict=True)))


def naive_wilson(p, n):
    z = Z95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def naive_kl(mean, target):
    return sum(m * math.log(m / t) for m, t in zip(mean, target, strict=True) if m > 0)


def blobs(n_per_class: int, classes: int, width: int, seed: int, separation: float = 4.0):
    """Gaussian blobs: (N, width) embeddings, (N,) labels; class c is shifted along axis c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(labels.numel(), width, generator=generator)
    x[torch.arange(labels.numel()), labels] += separation
    return x, labels


# ------------------------------------------------------------------------------------------ figures
def test_report_figures_match_the_formulas():
    probs = torch.tensor(
        [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]
    )
    readable = torch.tensor([True, True, True, True, False])
    groups = (("circle", "square", "never"), torch.tensor([0, 0, 1, 1, 1]))
    report = measure(
        probs, ("red", "green", "blue"), "red:2,green:1,blue:1", readable=readable, groups=groups
    )
    target = [0.5, 0.25, 0.25]
    used = probs[:4].tolist()
    mean = [sum(r[c] for r in used) / 4 for c in range(3)]
    counts = [2, 1, 1]  # argmax of the four readable rows: red, green, red, blue
    assert report.target == pytest.approx(target)
    assert (report.n, report.unreadable) == (4, 1)
    assert report.labels.tolist() == [0, 1, 0, 2, -1]
    assert report.soft_fd == pytest.approx(naive_fd(mean, target), abs=1e-7)
    assert report.hard_fd == pytest.approx(naive_fd([c / 4 for c in counts], target), abs=1e-12)
    assert report.hard_fd == pytest.approx(0.0, abs=1e-12)
    assert report.kl == pytest.approx(naive_kl(mean, target), abs=1e-7)
    for c in range(3):
        assert float(report.soft.proportion[c]) == pytest.approx(mean[c], abs=1e-7)
        low, high = naive_wilson(counts[c] / 4, 4)
        assert float(report.hard.low[c]) == pytest.approx(low, abs=1e-12)
        assert float(report.hard.high[c]) == pytest.approx(high, abs=1e-12)
    circle = [used[0], used[1]]
    square = [used[2], used[3]]
    fd_circle = naive_fd([sum(r[c] for r in circle) / 2 for c in range(3)], target)
    fd_square = naive_fd([sum(r[c] for r in square) / 2 for c in range(3)], target)
    assert [g.name for g in report.groups] == ["circle", "square"]  # "never" has no readable image
    assert [g.n for g in report.groups] == [2, 2]
    assert report.groups[0].soft_fd == pytest.approx(fd_circle, abs=1e-7)
    assert report.group_fd_soft == pytest.approx((fd_circle + fd_square) / 2, abs=1e-7)
    assert report.groups[0].hard_fd == pytest.approx(naive_fd([0.5, 0.5, 0.0], target), abs=1e-12)
    assert report.fd == report.group_fd_soft


def test_preservation_matches_the_formulas():
    generator = torch.Generator().manual_seed(3)
    images, twins = torch.rand(3, 4, 5, 3, generator=generator), torch.rand(3, 4, 5, 3, generator=generator)
    emb, twin_emb = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    kept = preservation(images, twins, emb, twin_emb)
    for i in range(3):
        diffs = [
            abs(a - b) for a, b in zip(images[i].flatten().tolist(), twins[i].flatten().tolist(), strict=True)
        ]
        assert float(kept.pixel[i]) == pytest.approx(1 - sum(diffs) / len(diffs), abs=1e-12)
        a, b = emb[i].tolist(), twin_emb[i].tolist()
        cos = sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )
        assert float(kept.clip_i[i]) == pytest.approx((cos + 1) / 2, abs=1e-7)
    assert kept.pixel_mean == pytest.approx(float(kept.pixel.mean()))
    same = preservation(images, images, emb, emb)
    assert same.pixel_mean == 1.0 and same.clip_i_mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="twin images must match"):
        preservation(images, twins[:2])


@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.lists(st.floats(-6, 6), min_size=3, max_size=3), min_size=1, max_size=25),
    seed=st.integers(0, 1000),
)
def test_report_is_order_free_and_bounded(logits, seed):
    probs = torch.tensor(logits).softmax(-1)
    order = torch.randperm(probs.shape[0], generator=torch.Generator().manual_seed(seed))
    a = measure(probs, ("a", "b", "c"))
    b = measure(probs[order], ("a", "b", "c"))
    assert a.soft_fd == pytest.approx(b.soft_fd, abs=1e-6) and a.hard_fd == b.hard_fd
    assert 0.0 <= a.soft_fd <= math.sqrt(2 / 3) + 1e-6  # farthest point of the simplex from uniform
    assert bool(((a.soft.low <= a.soft.proportion + 1e-9) & (a.soft.proportion <= a.soft.high + 1e-9)).all())
    onto_mean = measure(probs, ("a", "b", "c"), a.soft.proportion.tolist())
    assert onto_mean.soft_fd == pytest.approx(0.0, abs=1e-6)


def test_no_readable_image_is_an_error_and_shapes_are_checked():
    probs = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="none of the 2 images could be read"):
        measure(probs, ("a", "b"), readable=torch.tensor([False, False]), classifier="oracle")
    with pytest.raises(ValueError, match=r"probabilities must be \(images, 3\)"):
        measure(probs, ("a", "b", "c"))
    with pytest.raises(ValueError, match="unknown class 'x'"):
        measure(probs, ("a", "b"), "x:1")


class _Oracle:
    """A classifier with every optional member: class = brightest channel of the first pixel."""

    classes = ("red", "green", "blue")
    name = "test oracle"

    def probabilities(self, images):
        return torch.nn.functional.one_hot(images[:, 0, 0].argmax(-1), 3).float()

    def readable(self, images):
        return images[:, 0, 0].max(-1).values > 0.1

    def groups(self, images):
        return ("left", "right"), (images[:, 0, -1, 0] > 0.5).long()

    def embed(self, images):
        return images.flatten(1)


def test_measure_images_uses_the_optional_members():
    images = torch.zeros(4, 2, 2, 3)
    images[0, 0, 0, 0] = images[1, 0, 0, 1] = images[2, 0, 0, 2] = 1.0  # image 3 is unreadable
    images[1, 0, -1, 0] = 0.9  # image 1 is in group "right"
    twins = images.clone()
    twins[0] = 0.0
    assert isinstance(_Oracle(), ImageClassifier)
    report = measure_images(_Oracle(), images, None, twins)
    assert report.labels.tolist() == [0, 1, 2, -1] and report.unreadable == 1
    assert [g.name for g in report.groups] == ["left", "right"]
    assert report.preservation.clip_i is not None
    assert float(report.preservation.pixel[0]) == pytest.approx(1 - 1 / 12)
    assert report.classifier == "test oracle"
    text = format_report(report)
    assert "FD soft 0.0000" in text and "1 unreadable" in text and "CLIP-I" in text
    table = per_image_table(report).splitlines()
    assert table[0] == "image,label,p_red,p_green,p_blue,pixel_similarity,clip_i"
    assert table[4].split(",")[:2] == ["3", "unreadable"]
    with pytest.raises(TypeError, match="not an image classifier"):
        measure_images(object(), images)


# ------------------------------------------------------------------------------------------ probe
@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(2, 12), min_size=2, max_size=4),
    holdout=st.floats(0.05, 0.95),
    seed=st.integers(0, 100),
)
def test_split_is_stratified_disjoint_and_complete(counts, holdout, seed):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]
    train, held = split_indices(labels, len(counts), holdout, seed)
    assert sorted(train.tolist() + held.tolist()) == list(range(labels.numel()))
    for c in range(len(counts)):
        assert (labels[train] == c).sum() >= 1 and (labels[held] == c).sum() >= 1
    again = split_indices(labels, len(counts), holdout, seed)
    assert torch.equal(train, again[0]) and torch.equal(held, again[1])


def test_probe_separates_blobs_and_reports_naive_heldout_accuracy():
    x, y = blobs(30, 3, 8, seed=0)
    probe, report = fit_probe(x, y, ("a", "b", "c"), FitConfig(seed=1))
    again, _ = fit_probe(x, y, ("a", "b", "c"), FitConfig(seed=1))
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)  # deterministic
    _, held = split_indices(y, 3, FitConfig().holdout, 1)
    unit = x / x.norm(dim=1, keepdim=True)
    logits = ((unit - probe.mean) / probe.scale) @ probe.weight.T + probe.bias  # the formula, written out
    torch.testing.assert_close(probe.logits(x), logits)
    predicted = logits.argmax(1)
    for c in range(3):
        rows = held[y[held] == c]
        assert report.heldout_accuracy[c] == pytest.approx(float((predicted[rows] == c).float().mean()))
    assert report.mean_heldout_accuracy >= 0.95
    assert report.heldout == (8, 8, 8) and report.train == (22, 22, 22)
    assert probe.provenance["heldout_accuracy"]["a"] == round(report.heldout_accuracy[0], 4)
    torch.testing.assert_close(probe.probabilities(x).sum(1), torch.ones(x.shape[0]))


def test_probe_on_labels_it_cannot_learn_is_at_chance():
    x, _ = blobs(40, 2, 6, seed=2, separation=0.0)
    y = torch.arange(2).repeat(40)  # labels unrelated to the embeddings
    _, report = fit_probe(x, y, ("a", "b"))
    assert report.mean_heldout_accuracy < 0.8


def test_probe_input_errors():
    x, y = blobs(3, 2, 4, seed=0)
    with pytest.raises(ValueError, match=r"class 1 has 1 sample.*samples per class \{'a': 3, 'b': 1\}"):
        fit_probe(x[:4], y[:4], ("a", "b"))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        fit_probe(x, y + 1, ("a", "b"))
    probe, _ = fit_probe(x, y, ("a", "b"))
    with pytest.raises(ValueError, match="reads embeddings of width 4"):
        probe.logits(torch.zeros(2, 5))


def test_probe_file_round_trip_and_errors(tmp_path):
    x, y = blobs(6, 2, 5, seed=4)
    reference = torch.randn(5)
    probe, _ = fit_probe(x, y, ("male", "female"), vision_model="clip_l.safetensors",
                         reference_embedding=reference, provenance={"prompts": "a | b"})  # fmt: skip
    path = tmp_path / "gender.safetensors"
    save_probe(probe, path)
    loaded = load_probe(path)
    assert loaded.classes == ("male", "female") and loaded.vision_model == "clip_l.safetensors"
    assert loaded.provenance["prompts"] == "a | b" and "heldout_accuracy" in loaded.provenance
    torch.testing.assert_close(loaded.probabilities(x), probe.probabilities(x))
    torch.testing.assert_close(loaded.reference_embedding, reference)
    _, metadata = read_header(path)
    assert metadata["embedding_width"] == "5" and json.loads(metadata["classes"]) == ["male", "female"]

    check_same_model(loaded, reference * 2, "here")  # same direction: same model
    with pytest.raises(ValueError, match="not the one the classifier was trained with"):
        check_same_model(loaded, torch.randn(5, generator=torch.Generator().manual_seed(9)), "here")
    with pytest.raises(ValueError, match="5-wide embeddings.*makes 7-wide"):
        check_same_model(loaded, torch.randn(7), "here")

    tensors = {k: getattr(probe, k) for k in ("weight", "bias", "mean", "scale")}
    bad = tmp_path / "bad.safetensors"
    write_safetensors(tensors, {"format": "diffbias.sae", "format_version": "1"}, bad)
    with pytest.raises(FormatError, match="expected 'diffbias.classifier'"):
        load_probe(bad)
    meta = {"format": "diffbias.classifier", "format_version": "1", "classes": '["a", "b", "c"]',
            "embedding_width": "5", "provenance": "{}"}  # fmt: skip
    write_safetensors(tensors, meta, bad)
    with pytest.raises(FormatError, match=r"tensor 'weight' has shape \(2, 5\), expected \(3, 5\)"):
        load_probe(bad)
    write_safetensors(tensors, {**meta, "classes": '["a", "a"]'}, bad)
    with pytest.raises(FormatError, match="'classes' must list >= 2 distinct names"):
        load_probe(bad)
    with pytest.raises(FormatError, match="refusing to load a pickle"):
        load_probe(tmp_path / "probe.pt")


def test_embedding_classifier_chunks_and_reads_images():
    x, y = blobs(10, 2, 12, seed=5)
    probe, _ = fit_probe(x, y, ("a", "b"))
    calls = []

    def embed(images):
        calls.append(images.shape[0])
        return images.flatten(1)[:, :12]

    classifier = EmbeddingClassifier(probe, embed, chunk=3)
    images = x.view(20, 2, 2, 3)
    torch.testing.assert_close(classifier.probabilities(images), probe.probabilities(x))
    assert calls == [3] * 6 + [2]
    assert "2 classes (a, b)" in classifier.name
    assert isinstance(classifier, ImageClassifier)
    picture = reference_image(32)
    assert picture.shape == (1, 32, 32, 3) and 0 <= float(picture.min()) and float(picture.max()) <= 1


def test_twins_are_embedded_with_the_images_in_one_call():
    x, y = blobs(4, 2, 12, seed=6)
    probe, _ = fit_probe(x, y, ("a", "b"))
    calls = []

    def embed(images):
        calls.append(images.shape[0])
        return images.flatten(1)[:, :12]

    images = x.view(8, 2, 2, 3)
    report = measure_images(EmbeddingClassifier(probe, embed, chunk=64), images, "1,1", images.flip(0))
    assert calls == [16]
    torch.testing.assert_close(report.probabilities, probe.probabilities(x))
    cos = torch.nn.functional.cosine_similarity(x, x.flip(0), dim=-1).double()
    torch.testing.assert_close(report.preservation.clip_i, (cos + 1) / 2)


def test_fit_report_warns_near_chance():
    from diffbias_core.measure import FitReport, format_fit

    good = format_fit(FitReport((0.9, 1.0), (5, 5), (15, 15), 1.0), ("a", "b"))
    assert "held-out accuracy (balanced) 0.950, chance 0.500" in good and "WARNING" not in good
    assert "  a: 0.900 on 5 held-out images (15 used to fit)" in good
    poor = format_fit(FitReport((0.6, 0.7), (5, 5), (15, 15), 1.0), ("a", "b"))
    assert "WARNING: held-out accuracy is near chance" in poor
