import pytest
import torch
import torch.nn.functional as F

from diffbias_core.attribute.probes import ProbeConfig, fit_logistic, fit_probes, holdout_samples
from diffbias_core.dissect.activations import MemorySource, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


@pytest.fixture(scope="module")
def maps(planted):
    problem = planted.planted_maps(1, classes=3, samples=16, steps=3, noise=0.05)
    return problem, MemorySource(problem.batch, hook="test.hook", classes=problem.classes)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_probes_classify_held_out_samples(maps, optimizer):
    _, source = maps
    probes = fit_probes(
        source, ProbeConfig(optimizer=optimizer, iterations=60 if optimizer == "lbfgs" else 300)
    )
    assert probes.steps.tolist() == [0, 1, 2] and probes.weight.shape == (3, 3, 24 * 2 * 2)
    assert (probes.accuracy >= 0.9).all() and (probes.train_accuracy >= 0.95).all()
    # chance on shuffled labels: the accuracy measure can fail
    batch = source.batch
    shuffled = batch._replace(
        label=batch.label[torch.randperm(batch.num_rows, generator=torch.Generator().manual_seed(0))]
    )
    chance = fit_probes(MemorySource(shuffled, hook="test.hook", classes=source.classes))
    assert chance.accuracy.mean() < 0.7


def test_fit_is_a_stationary_point_of_the_standardised_objective():
    g = torch.Generator().manual_seed(2)
    x = (
        torch.randn(60, 5, generator=g, dtype=torch.float64)
        * torch.tensor([1.0, 10, 0.1, 3, 1], dtype=torch.float64)
        + 4
    )
    y = (x[:, 0] + 0.3 * torch.randn(60, generator=g, dtype=torch.float64) > 4).long()
    config = ProbeConfig(weight_decay=0.05)
    weight, bias = fit_logistic(x, y, 2, config)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    w_std = (weight * std).requires_grad_()  # the weights in standardised space
    b_std = (bias + weight @ mean).requires_grad_()
    loss = F.cross_entropy(((x - mean) / std) @ w_std.T + b_std, y) + 0.025 * w_std.pow(2).sum()
    loss.backward()
    assert w_std.grad.abs().max() < 1e-6 and b_std.grad.abs().max() < 1e-6
    torch.testing.assert_close(x @ weight.T + bias, ((x - mean) / std) @ w_std.detach().T + b_std.detach())


def test_logits_per_row_steps_match_a_loop(maps):
    _, source = maps
    probes = fit_probes(source, ProbeConfig(iterations=20))
    batch = source.batch
    mixed = probes.logits(batch.activations, batch.step)
    loop = torch.stack(
        [probes.logits(batch.activations[i : i + 1], int(batch.step[i]))[0] for i in range(batch.num_rows)]
    )
    torch.testing.assert_close(mixed, loop)
    flat = probes.logits(batch.activations.flatten(1), 1)
    torch.testing.assert_close(flat, probes.logits(batch.activations, 1))


def test_probe_errors(maps):
    _, source = maps
    probes = fit_probes(source, ProbeConfig(iterations=5))
    with pytest.raises(ValueError, match="take 96 features .*got 80"):
        probes.logits(torch.randn(2, 20, 2, 2), 0)
    with pytest.raises(ValueError, match=r"no probe for step 9; probes exist for steps \[0, 1, 2\]"):
        probes.logits(source.batch.activations[:2], torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="fitted on hook 'test.hook'.*from hook 'other'"):
        probes.check("other", (24, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(24, 2, 2\).*shape \(24, 4, 4\)"):
        probes.check("test.hook", (24, 4, 4))
    one = make_batch(torch.randn(6, 4), 0, label=torch.tensor([0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"step 0: .*at least two classes, found \['a'\]"):
        fit_probes(MemorySource(one, hook="h", classes=["a", "b"]))
    with pytest.raises(ValueError, match="holdout must be in"):
        ProbeConfig(holdout=1.0)


def test_holdout_keeps_pairs_together_and_is_seeded():
    samples = torch.arange(20).repeat_interleave(2)  # pairs share a sample id
    held = holdout_samples(samples, 0.25, seed=3)
    assert held.numel() == 5 and torch.equal(held, holdout_samples(samples, 0.25, seed=3))
    assert not torch.equal(held, holdout_samples(samples, 0.25, seed=4))
    assert holdout_samples(samples, 0.0, seed=0).numel() == 0
