import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.dissect.activations import MemorySource, make_batch
from diffbias_core.dissect.sparse_grad import (
    gather_encode,
    row_plan,
    scatter_rows,
    sparse_decode,
)
from diffbias_core.dissect.train import (
    SaeTrainer,
    TrainConfig,
    geometric_median,
    remove_parallel_component_,
    train_sae,
)
from diffbias_core.dissect.train_state import load_checkpoint, state_path
from diffbias_core.sae.formats import FormatError, load_sae
from diffbias_core.sae.model import fvu

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


def _source(x, hook="test.hook"):
    return MemorySource(make_batch(x, 0), hook=hook)


# ---------------------------------------------------------------------------------------------- math
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 12), latents=st.integers(4, 30), width=st.integers(1, 9), seed=st.integers(0, 99),
       shared=st.booleans())  # fmt: skip
def test_sparse_backward_matches_dense_autograd(rows, latents, width, seed, shared):
    g = torch.Generator().manual_seed(seed)
    k = min(3, latents)
    x, w_enc, b_enc, w_dec = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
                              for s in ((rows, width), (latents, width), (latents,), (latents, width)))  # fmt: skip
    target = torch.randn(rows, width, generator=g, dtype=torch.float64)
    pre = torch.relu(x @ w_enc.T + b_enc).detach()  # the SAE's pre-activations, without autograd
    idx = pre.topk(k, dim=1).indices
    plan = row_plan(idx, latents) if shared else None
    out = sparse_decode(idx, gather_encode(x, w_enc, b_enc, idx, pre, plan), w_dec, plan)
    (out - target).pow(2).sum().backward()
    ours = [t.grad.clone() for t in (x, w_enc, b_enc, w_dec)]
    for t in (x, w_enc, b_enc, w_dec):
        t.grad = None
    dense = torch.zeros(rows, latents, dtype=torch.float64)
    dense = dense.scatter(1, idx, torch.relu(x @ w_enc.T + b_enc).gather(1, idx))  # naive TopK latents
    (dense @ w_dec - target).pow(2).sum().backward()
    for mine, ref in zip(ours, (x.grad, w_enc.grad, b_enc.grad, w_dec.grad), strict=True):
        torch.testing.assert_close(mine, ref)


def test_scatter_rows_matches_loop():
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(5)])
    coef, rhs = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    ref = torch.zeros(9, 4)
    for r in range(5):
        for j in range(3):
            ref[idx[r, j]] += coef[r, j] * rhs[r]
    torch.testing.assert_close(scatter_rows(row_plan(idx, 9), coef, rhs), ref)


def test_parallel_gradient_removal_matches_naive_projection():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(7, 5, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    grad = torch.randn(7, 5, generator=g)
    ref = torch.stack([grad[j] - torch.dot(grad[j], w[j]) * w[j] for j in range(7)])
    remove_parallel_component_(w, grad)
    torch.testing.assert_close(grad, ref)
    torch.testing.assert_close((grad * w).sum(1), torch.zeros(7), atol=1e-6, rtol=0)


def test_trainer_step_removes_parallel_gradient_and_keeps_unit_norm(planted):
    x, _ = planted.planted_rows(0, width=12, atoms=16, k=2, rows=600, noise=0.01)
    config = TrainConfig(num_latents=24, k=3, batch_size=100, buffer_batches=1, warmup_steps=0, lr=1e-2)
    trainer = SaeTrainer(config, 12)
    seen = []
    original = trainer.optimizer.step

    def step(*args, **kwargs):  # look at the gradient the optimizer receives
        w = trainer.sae.W_dec.detach()
        seen.append((trainer.sae.W_dec.grad * w).sum(1).abs().max() / trainer.sae.W_dec.grad.abs().max())
        return original(*args, **kwargs)

    trainer.optimizer.step = step
    trainer.feed(x)
    assert len(seen) == 6 and max(seen) < 1e-5
    torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(24))


def test_geometric_median_beats_the_mean_on_outliers():
    g = torch.Generator().manual_seed(3)
    points = torch.cat([torch.randn(50, 3, generator=g) * 0.1, torch.full((5, 3), 100.0)])
    median = geometric_median(points)
    assert median.norm() < 1.0 < points.mean(0).norm()
    cost = lambda c: (points - c).norm(dim=1).sum()  # noqa: E731
    assert cost(median) <= cost(points.mean(0))
    assert cost(median) <= cost(median + 0.01 * torch.randn(3, generator=g)) + 1e-4


def test_encoder_scale_is_fitted_to_the_first_rows(planted):
    x, _ = planted.planted_rows(13, width=16, atoms=24, k=3, rows=512, noise=0.01)
    trainer = SaeTrainer(
        TrainConfig(num_latents=32, k=3, batch_size=512, buffer_batches=1, lr=1e-12, warmup_steps=0), 16
    )
    trainer.feed(x)  # one step at a negligible learning rate: the weights are the initial ones
    sae = trainer.sae

    def error(scale):
        with torch.no_grad():
            code = sae.encode(x)
            return (x - sae.b_dec - scale * sae.decode_sparse(code.indices, code.values)).pow(2).sum()

    assert error(1.0) < min(error(0.9), error(1.1))  # the least-squares scale: a minimum in the scale
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x), rtol=1e-4, atol=1e-4)


def test_lr_warmup_and_linear_decay():
    cfg = TrainConfig(num_latents=8, k=2, lr=1.0, warmup_steps=4, lr_schedule="linear", max_steps=10)
    assert [cfg.lr_at(s) for s in (0, 3)] == [0.25, 1.0]
    assert cfg.lr_at(9) == pytest.approx(1 / 6) and cfg.lr_at(10) == 0.0
    assert TrainConfig(num_latents=2**14, k=4).base_lr == pytest.approx(2e-4)


@pytest.mark.parametrize("bad, match", [
    ({"k": 9}, "k must be <= num_latents"), ({"batch_size": 0}, "batch_size must be a positive"),
    ({"lr": -1.0}, "lr must be > 0"), ({"lr_schedule": "linear"}, "needs max_steps"),
    ({"b_dec_init": "median"}, "b_dec_init must be"), ({"auxk_alpha": -0.1}, "auxk_alpha must be >= 0"),
])  # fmt: skip
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"num_latents": 8, "k": 2, **bad})


# ---------------------------------------------------------------------------------------------- planted
@pytest.mark.parametrize("seed, width, atoms, latents, k, noise", [
    (0, 16, 16, 32, 3, 0.0),
    (1, 24, 20, 40, 3, 0.02),
    (2, 32, 24, 48, 4, 0.05),
    (3, 16, 24, 48, 2, 0.02),  # overcomplete: more atoms than dimensions
    (4, 32, 32, 32, 3, 0.02),  # exactly as many latents as atoms
])  # fmt: skip
def test_recovers_planted_dictionary(planted, seed, width, atoms, latents, k, noise):
    x, dictionary = planted.planted_rows(100 + seed, width, atoms, k, rows=12_000, noise=noise)
    config = TrainConfig(num_latents=latents, k=k, batch_size=256, lr=6e-3, warmup_steps=10, epochs=4,
                         dead_after_rows=4_000, seed=seed)  # fmt: skip
    result = train_sae(_source(x), config)
    cosine = planted.best_cosine(dictionary, result.sae.w_dec_flat.detach())
    assert cosine.mean() >= 0.9, cosine
    assert result.stats.fvu < 0.2 and result.stats.l0 == pytest.approx(k)
    # a random dictionary of the same size is far from it: the measure can fail
    assert planted.best_cosine(dictionary, torch.randn(latents, width)).mean() < 0.8


def test_auxk_revives_dead_latents(planted):
    x, _ = planted.planted_rows(5, width=16, atoms=32, k=3, rows=12_000, noise=0.01)
    dead_fraction = {}
    for alpha in (0.0, 1 / 32):
        config = TrainConfig(num_latents=32, k=3, batch_size=200, lr=5e-3, warmup_steps=0, epochs=2,
                             dead_after_rows=1_000, auxk_alpha=alpha, b_dec_init="mean")  # fmt: skip
        trainer = SaeTrainer(config, 16)
        with torch.no_grad():  # half of the latents start nearly silent: they never win the TopK
            trainer.sae.W_enc[16:] *= 0.02
        for _ in range(config.epochs):
            trainer.feed(x)
        dead_fraction[alpha] = trainer.finish().dead_fraction
    assert dead_fraction[0.0] >= 0.4
    assert dead_fraction[1 / 32] <= dead_fraction[0.0] - 0.3


def test_non_finite_rows_are_skipped_counted_and_never_trained_on(planted):
    x, _ = planted.planted_rows(6, width=8, atoms=8, k=2, rows=1_000, noise=0.0)
    dirty = x.clone()
    dirty = torch.cat([dirty[:300], torch.full((2, 8), float("nan")), dirty[300:]])
    dirty[10, 3] = float("inf")
    clean = torch.cat([x[:10], x[11:]])
    config = TrainConfig(num_latents=8, k=2, batch_size=100, buffer_batches=2, warmup_steps=0)
    a, b = SaeTrainer(config, 8), SaeTrainer(config, 8)
    a.feed(dirty)
    b.feed(clean)
    stats = a.finish()
    b.finish()
    assert stats.skipped == 3 and stats.rows == 999
    for pa, pb in zip(a.params, b.params, strict=True):
        assert torch.isfinite(pa).all()
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_maps_and_rows_train_identically():
    maps = torch.randn(40, 6, 3, 3, generator=torch.Generator().manual_seed(7))
    config = TrainConfig(num_latents=12, k=2, batch_size=64, warmup_steps=0)
    a, b = SaeTrainer(config, 6), SaeTrainer(config, 6)
    a.feed(maps)
    b.feed(maps.permute(0, 2, 3, 1).reshape(-1, 6))  # (N*H*W, C)
    a.finish(), b.finish()
    torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows of width 6"):
        a.stopped = False
        a.feed(torch.randn(3, 5))


def test_feeding_inside_inference_mode_trains(planted):
    x, _ = planted.planted_rows(14, width=8, atoms=8, k=2, rows=600, noise=0.0)
    config = TrainConfig(num_latents=8, k=2, batch_size=100, buffer_batches=2, warmup_steps=0)
    a, b = SaeTrainer(config, 8), SaeTrainer(config, 8)
    with torch.inference_mode():  # how ComfyUI runs every node
        captured = x.clone()
        a.feed(captured)
        stats = a.finish()
    with torch.no_grad():
        b.feed(x)
    b.finish()
    assert stats.step == 6 and not a.sae.W_dec.is_inference()
    torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec, rtol=0, atol=0)


def test_a_whole_run_and_a_resume_inside_inference_mode_equal_the_same_outside(tmp_path, planted):
    """A ComfyUI node calls the trainer in inference mode, with inference tensors: the trainer is built, fed,
    checkpointed and resumed there, and trains exactly as outside."""
    x, _ = planted.planted_rows(15, width=8, atoms=8, k=2, rows=800, noise=0.01)
    results = {}
    for mode in ("inference", "grad"):
        with torch.inference_mode(mode == "inference"):
            rows = x.clone()  # an inference tensor in the first round
            ck = tmp_path / f"{mode}.safetensors"
            train_sae(_source(rows), _config(epochs=1), checkpoint=ck)
            results[mode] = train_sae(_source(rows), _config(epochs=2), checkpoint=ck, resume=True).sae
    assert results["inference"].fingerprint() == results["grad"].fingerprint()


def test_kernel_sae_training_lowers_fvu():
    g = torch.Generator().manual_seed(8)
    basis = torch.randn(6, 3 * 2 * 2, generator=g)
    maps = (torch.rand(600, 6, generator=g) @ basis).reshape(600, 3, 2, 2)
    config = TrainConfig(num_latents=12, k=3, batch_size=100, warmup_steps=0, lr=1e-2, epochs=20)
    result = train_sae(_source(maps), config, sae_options={"kernel_size": 2})
    sae = result.sae
    assert sae.W_dec.shape == (12, 3, 2, 2)
    rows = sae.map_to_inputs(maps)  # (600, 1, 12)
    untrained = SaeTrainer(config, 3, kernel_size=2).sae
    assert fvu(rows, sae(rows).detach()) < 0.3 < fvu(rows, untrained(rows).detach())


# ---------------------------------------------------------------------------------------------- files
def _config(**kw):
    return TrainConfig(
        **{
            "num_latents": 16,
            "k": 2,
            "batch_size": 64,
            "buffer_batches": 4,
            "warmup_steps": 3,
            "lr": 3e-3,
            "epochs": 2,
            "dead_after_rows": 300,
            "checkpoint_every": 4,
            **kw,
        }
    )


def test_resume_continues_identically(tmp_path, planted):
    x, _ = planted.planted_rows(9, width=8, atoms=12, k=2, rows=1_500, noise=0.01)
    source = _source(x)
    full = train_sae(
        source, _config(), checkpoint=tmp_path / "full.safetensors", out=tmp_path / "full_best.safetensors"
    )
    steps = []
    first = train_sae(source, _config(), checkpoint=tmp_path / "part.safetensors",
                      progress=lambda s: steps.append(s.step), stop=lambda: len(steps) >= 17)  # fmt: skip
    assert first.interrupted and first.stats.step < full.stats.step
    rest = train_sae(source, _config(), checkpoint=tmp_path / "part.safetensors", resume=True,
                     out=tmp_path / "part_best.safetensors")  # fmt: skip
    assert rest.stats.step == full.stats.step and rest.stats.rows == full.stats.rows
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        for a, b in (("full", "part"), ("full_best", "part_best")):
            torch.testing.assert_close(
                getattr(load_sae(tmp_path / f"{a}.safetensors"), name),
                getattr(load_sae(tmp_path / f"{b}.safetensors"), name),
                rtol=0,
                atol=0,
            )


def test_interrupted_training_leaves_valid_files(tmp_path, planted):
    x, _ = planted.planted_rows(10, width=8, atoms=12, k=2, rows=2_000, noise=0.01)

    def interrupt(stats):
        if stats.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(_source(x), _config(), out=tmp_path / "sae.safetensors", checkpoint=tmp_path / "ck.safetensors",
                  progress=interrupt)  # fmt: skip
    sae = load_sae(tmp_path / "sae.safetensors")
    assert sae.provenance["steps"] == "5" and sae.hook == "test.hook"
    assert load_checkpoint(tmp_path / "ck.safetensors").run.step == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ck.safetensors",
        "ck.state.safetensors",
        "sae.safetensors",
    ]


def test_checkpoint_errors(tmp_path, planted):
    x, _ = planted.planted_rows(11, width=8, atoms=12, k=2, rows=500, noise=0.01)
    train_sae(_source(x), _config(epochs=1), checkpoint=tmp_path / "ck.safetensors")
    with pytest.raises(ValueError, match="cannot continue with num_latents 32"):
        load_checkpoint(tmp_path / "ck.safetensors", _config(num_latents=32))
    with pytest.raises(ValueError, match="trained on hook 'test.hook' width 8"):
        train_sae(_source(torch.randn(10, 8), hook="other"), _config(), checkpoint=tmp_path / "ck.safetensors",
                  resume=True)  # fmt: skip
    state_path(tmp_path / "ck.safetensors").unlink()
    with pytest.raises(FormatError, match="ck.safetensors: no training state"):
        load_checkpoint(tmp_path / "ck.safetensors")


def test_stats_and_progress(planted):
    x, _ = planted.planted_rows(12, width=8, atoms=8, k=2, rows=1_000, noise=0.0)
    seen = []
    trainer = SaeTrainer(_config(max_steps=7), 8, progress=seen.append)
    trainer.feed(x)
    stats = trainer.finish()
    assert [s.step for s in seen] == list(range(1, 8)) and stats.step == 7 and trainer.stopped
    assert stats.rows == 7 * 64 and math.isfinite(stats.fvu) and 0 <= stats.dead_fraction <= 1
    assert stats.best_fvu == seen[-1].fvu  # no periodic check in 7 steps (every 10): the end is checked


def test_a_checkpoint_of_format_version_1_resumes(tmp_path, planted):
    """``data/checkpoint_v1``: a checkpoint (stopped at step 18) written by the trainer of commit d96769f (before the
    trainer had ``state_dict``), and what that code's resume of it gave (``resumed_*``, ``resumed.json``)."""
    data = Path(__file__).parent / "data" / "checkpoint_v1"
    for name in ("ck.safetensors", "ck.state.safetensors"):
        shutil.copy(data / name, tmp_path / name)
    restored = load_checkpoint(tmp_path / "ck.safetensors")
    # stopped after step 17's chunk
    assert restored.run.step == 18 and restored.best is not None and restored.fill > 0
    assert restored.optimizer.state and restored.facts == {"epoch": "0", "chunk": "23"}
    x, _ = planted.planted_rows(9, width=8, atoms=12, k=2, rows=1_500, noise=0.01)
    rest = train_sae(_source(x), _config(), checkpoint=tmp_path / "ck.safetensors", resume=True,
                     out=tmp_path / "best.safetensors")  # fmt: skip
    recorded = json.loads((data / "resumed.json").read_text())
    assert (rest.stats.step, rest.stats.rows) == (recorded["step"], recorded["rows"])
    for ours, theirs in (("ck", "resumed_current"), ("best", "resumed_best")):
        a, b = load_sae(tmp_path / f"{ours}.safetensors"), load_sae(data / f"{theirs}.safetensors")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 2])
def test_trainer_codes_are_the_sae_encode_codes(planted, kernel_size):
    """Training codes with the SAE's own encode: the same latents, values and order, bit for bit (also for
    rows with fewer than k positive pre-activations, and with dead latents, when AuxK runs too)."""
    width = 3 if kernel_size == 2 else 8
    trainer = SaeTrainer(_config(num_latents=24, k=4, dead_after_rows=1), width, kernel_size=kernel_size)
    g = torch.Generator().manual_seed(kernel_size)
    x = torch.randn(300, width * kernel_size**2, generator=g)
    with torch.no_grad():
        trainer.sae.b_enc.copy_(torch.randn(24, generator=g) - 1.5)  # many rows have < k positive entries
    trainer.rows_since_fired.fill_(10)  # every latent is dead: AuxK runs
    losses = trainer.losses(x)
    code = trainer.sae.encode(x)
    assert losses.auxk > 0 and bool((code.values == 0).any())
    assert torch.equal(losses.indices, code.indices) and torch.equal(losses.values, code.values)
