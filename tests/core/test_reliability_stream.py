"""Case 15 (issue 13), attribution: activations stream through shard files, one step in memory at a time.

The spool gives the same probes and features as the in-memory path, removes its files whatever ends the
run, and the peak memory of a whole attribution run grows with one step's activations, not with all steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffbias_core.attribute.attribution import AttributionConfig, attribute
from diffbias_core.attribute.budget import attribution_memory, check_attribution_fits
from diffbias_core.attribute.features import load_features
from diffbias_core.attribute.probes import ProbeConfig, fit_probes
from diffbias_core.base import memory
from diffbias_core.base.progress import Cancelled
from diffbias_core.cli import dissect as cli_dissect
from diffbias_core.dissect.activations import MemorySource, concat_batches, read_shard, write_shard
from diffbias_core.dissect.spool import ActivationSpool, StepShards, spool_folders
from diffbias_core.sae.formats import save_sae
from diffbias_core.sae.model import SparseAutoencoder

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _recorded(batch, steps):
    """The batch as a sampler records it: for every class (a run), one part per step of that class's images."""
    parts = []
    for label in batch.label.unique().tolist():
        for step in range(steps):
            parts.append(batch.select((batch.label == label) & (batch.step == step)))
    return parts


def _same_features(a, b) -> None:
    assert a.classes == b.classes and a.provenance == b.provenance
    for ids_a, ids_b, scores_a, scores_b in zip(a.ids, b.ids, a.scores, b.scores, strict=True):
        assert torch.equal(ids_a, ids_b) and torch.equal(scores_a, scores_b)


@pytest.mark.parametrize("method,baseline", [("ig", "paired"), ("ig", "zero"), ("mean-diff", "paired")])
def test_reliability_spooled_attribution_equals_the_in_memory_path(tmp_path, planted, method, baseline):
    """Case 15: probes and features from the spool (rows of a step spread over several shard files) are
    bit-identical to those from the same activations held in memory."""
    problem = planted.planted_maps(5, samples=10, steps=3, noise=0.05)
    sae = planted.oracle_sae(problem.dictionary, k=4)
    parts = _recorded(problem.batch, 3)
    memory = MemorySource(concat_batches(parts), hook="test.hook", classes=problem.classes)
    config = AttributionConfig(method=method, baseline=baseline, top_k=6, points=4)
    with ActivationSpool(tmp_path, hook="test.hook", classes=problem.classes, chunk_bytes=8000) as spool:
        for part in parts:
            spool.add(part)
        source = spool.source()
        assert len(spool.files) == 3  # two recorded parts a file: every step has rows in two files
        probes = fit_probes(source, ProbeConfig(iterations=20))
        expected = fit_probes(memory, ProbeConfig(iterations=20))
        assert torch.equal(probes.weight, expected.weight) and torch.equal(probes.bias, expected.bias)
        _same_features(attribute(sae, source, config, probes), attribute(sae, memory, config, expected))
    assert spool_folders(tmp_path) == []


def test_reliability_float16_spool_reads_back_the_float32_values(tmp_path, planted):
    """Case 15: a float16 model's activations are spooled in float16 (half the disk) and read as float32:
    exactly the values the in-memory path gets from ``.float()``."""
    problem = planted.planted_maps(6, samples=6, steps=2)
    half = problem.batch._replace(activations=problem.batch.activations.half())
    with ActivationSpool(tmp_path, hook="h", classes=problem.classes, chunk_bytes=3000) as spool:
        for part in _recorded(half, 2):
            spool.add(part)
        source = spool.source(torch.float32)
        assert source.row_bytes == 4 * half.activations[0].numel()
        on_disk = sum(p.stat().st_size for p in spool.files)
        assert on_disk < 0.5 * problem.batch.activations.numel() * 4 + 2048 * len(spool.files)
        recorded = concat_batches(_recorded(half, 2))
        memory = MemorySource(recorded._replace(activations=recorded.activations.float()), hook="h",
                              classes=problem.classes)  # fmt: skip
        for step in (0, 1):
            got, want = source.select_step(step), memory.select_step(step)
            assert got.activations.dtype == torch.float32
            assert torch.equal(got.activations, want.activations) and torch.equal(got.sample, want.sample)


def test_reliability_spool_files_are_removed_on_error_and_on_cancel(tmp_path, planted):
    """Case 15: leaving the spool's block by an error or by a cancel inside the integrated gradients removes
    its folder and every shard in it."""
    problem = planted.planted_maps(7, samples=6, steps=2)
    sae = planted.oracle_sae(problem.dictionary, k=4)
    with pytest.raises(RuntimeError, match="planted"):
        with ActivationSpool(tmp_path, hook="test.hook", classes=problem.classes, chunk_bytes=2000) as spool:
            for part in _recorded(problem.batch, 2):
                spool.add(part)
            assert len(list(spool.folder.iterdir())) > 1
            raise RuntimeError("planted")
    assert spool_folders(tmp_path) == []
    calls = []
    with pytest.raises(Cancelled):
        with ActivationSpool(tmp_path, hook="test.hook", classes=problem.classes, chunk_bytes=2000) as spool:
            for part in _recorded(problem.batch, 2):
                spool.add(part)
            source = spool.source()
            probes = fit_probes(source, ProbeConfig(iterations=5))
            attribute(
                sae,
                source,
                AttributionConfig(points=2),
                probes,
                should_stop=lambda: calls.append(1) or len(calls) > 1,
            )
    assert len(calls) == 2 and spool_folders(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_reliability_cli_attribute_streams_the_same_features(tmp_path, planted, capsys):
    """Case 15: the CLI's ``attribute`` reads its shards one step at a time (StepShards), states its RAM need,
    and writes the features the in-memory path ranks."""
    problem = planted.planted_maps(8, samples=12, steps=2, noise=0.03)
    sae = planted.oracle_sae(problem.dictionary, k=4, hook="toy.mid")
    save_sae(sae, tmp_path / "sae.safetensors")
    paths = []
    for i, part in enumerate((problem.batch.sample < 6, problem.batch.sample >= 6)):
        paths.append(tmp_path / f"acts{i}.safetensors")
        write_shard(paths[-1], problem.batch.select(part), hook="toy.mid", classes=problem.classes)
    parser = argparse.ArgumentParser()
    cli_dissect.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attribute", "--sae", str(tmp_path / "sae.safetensors"), *map(str, paths),
                              "--out", str(tmp_path / "f.safetensors"), "--top-k", "4", "--points", "4",
                              "--probe-iterations", "20"])  # fmt: skip
    assert args.run(args) == 0
    assert "of RAM at most" in capsys.readouterr().out
    assert StepShards(paths).num_rows == problem.batch.num_rows
    memory = MemorySource(
        concat_batches([read_shard(p)[0] for p in paths]), hook="toy.mid", classes=problem.classes
    )
    config = AttributionConfig(top_k=4, points=4)
    expected = attribute(sae, memory, config, fit_probes(memory, ProbeConfig(iterations=20, holdout=0.25)))
    written = load_features(tmp_path / "f.safetensors")
    for got, want in zip(written.scores, expected.scores, strict=True):
        assert torch.equal(got, want)


def test_reliability_budget_states_ram_and_disk_and_refuses_what_does_not_fit(tmp_path, monkeypatch):
    """Case 15: at SDXL's bottleneck (1280 x 32 x 32, node defaults: 64 images, 30 steps) the RAM need does not
    grow with the steps except by the probes; the disk holds every activation once, half for float16; a
    machine without the memory or the disk is refused with both figures."""
    sae = SparseAutoencoder(1280, 5120, 32, hook="unet.middle", device="meta")
    features = 1280 * 32 * 32

    def need(steps, itemsize=4):
        return attribution_memory(sae, (1280, 32, 32), images=64, steps=steps, classes=2,
                                  attribution=AttributionConfig(), probes=ProbeConfig(), recorded_itemsize=itemsize)  # fmt: skip

    base, longer, half = need(30), need(60), need(30, 2)
    assert base.step == 64 * features * 4 and base.disk >= 64 * 30 * features * 4
    assert base.disk < 64 * 30 * (features * 4 + 29) + 4096 * 200
    assert 0.49 < half.disk / base.disk < 0.51 and half.ram == base.ram
    probes_grow = 30 * (2 * features + 2) * 4
    assert longer.ram - base.ram == probes_grow + 64 * 30 * 29 * 2  # the probes and the small columns only
    assert longer.ram < 0.2 * 64 * 60 * features * 4  # far below keeping every activation (20 GiB)
    assert "RAM" in base.describe() and "temporary disk 9.4 GiB" in base.describe()
    monkeypatch.setattr(memory, "free_disk", lambda folder: 1000)
    with pytest.raises(OSError, match=r"needs 9\.4 GiB of disk in .*only 1000 B is free"):
        check_attribution_fits(base, tmp_path, "the run")
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match="only 1000 B is available"):
        check_attribution_fits(base, tmp_path, "the run")


# ---------------------------------------------------------------------------------------------- peak memory
_MEASURE = """
import json, sys, tempfile, torch
from diffbias_core.attribute.attribution import AttributionConfig, attribute
from diffbias_core.attribute.budget import attribution_memory, check_attribution_fits
from diffbias_core.attribute.probes import ProbeConfig, fit_probes
from diffbias_core.dissect.activations import MemorySource, concat_batches, make_batch
from diffbias_core.dissect.spool import ActivationSpool
from diffbias_core.sae.model import SparseAutoencoder

mode, steps, channels, size, samples, latents = sys.argv[1], *map(int, sys.argv[2:7])
torch.set_num_threads(1)

def peak():  # VmHWM: this process's peak RSS
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

def recorded(step, label):  # one sampler call: the maps of one class's images at one step
    g = torch.Generator().manual_seed(1000 * step + label)
    maps = torch.randn(samples, channels, size, size, generator=g) + 0.5 * label
    return make_batch(maps, step, label=label, sample=torch.arange(samples))

sae = SparseAutoencoder(channels, latents, 4, hook="h")
sae.reset_parameters(torch.Generator().manual_seed(0))
probe_config, config = ProbeConfig(iterations=3), AttributionConfig(points=2, top_k=5)

def rank(source):
    return attribute(sae, source, config, fit_probes(source, probe_config), ).ids[0].tolist()

torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo: not measured
before = peak()
with tempfile.TemporaryDirectory() as folder:
    if mode == "spool":
        with ActivationSpool(folder, hook="h", classes=("a", "b"), chunk_bytes=1 << 20) as spool:
            for label in (0, 1):
                for step in range(steps):
                    spool.add(recorded(step, label))
            ids = rank(spool.source())
    else:  # what Attribute did before: every part kept, then joined
        parts = [recorded(step, label) for label in (0, 1) for step in range(steps)]
        ids = rank(MemorySource(concat_batches(parts), hook="h", classes=("a", "b")))
need = attribution_memory(sae, (channels, size, size), images=2 * samples, steps=steps, classes=2,
                          attribution=config, probes=probe_config, chunk_bytes=1 << 20)
probes = steps * 2 * channels * size * size * 4
print(json.dumps({"grown": peak() - before, "need": need.ram, "step": need.step, "probes": probes, "ids": ids}))
"""


def _measure(
    mode: str, steps: int, channels: int = 32, size: int = 32, samples: int = 16, latents: int = 64
) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks go back
    argv = [mode, *map(str, (steps, channels, size, samples, latents))]
    result = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_reliability_attribution_peak_memory_grows_with_one_step_not_all_steps():
    """Case 15: the peak RSS of a fresh process spooling and attributing 2 and 6 steps (4 MiB of activations a
    step, 32 per step) differs by less than one step plus the probes of the 4 extra steps, and stays under the
    budget stated beforehand (also for a shape where the dense latents dominate); the in-memory path, measured
    the same way, grows by all the extra steps twice (the parts and their join): the measurement can fail."""
    few, many = _measure("spool", 2), _measure("spool", 6)
    step = few["step"]
    assert many["grown"] - few["grown"] < step + many["probes"] - few["probes"], (few, many)
    wide = _measure("spool", 2, channels=16, size=16, latents=2048)
    for run in (few, many, wide):
        assert run["grown"] <= run["need"], run  # the stated need is an upper bound
    kept_few, kept_many = _measure("memory", 2), _measure("memory", 6)
    assert kept_many["grown"] - kept_few["grown"] > 1.5 * 4 * step, (kept_few, kept_many)
    assert few["ids"] == kept_few["ids"] and many["ids"] == kept_many["ids"]  # the same features either way


def test_step_shards_refuse_shards_that_disagree(tmp_path):
    """StepShards, like ShardSet, names both files when two shards disagree on hook or row shape."""
    from diffbias_core.dissect.activations import make_batch

    write_shard(tmp_path / "a.safetensors", make_batch(torch.randn(2, 3), 0), hook="h")
    write_shard(tmp_path / "b.safetensors", make_batch(torch.randn(2, 3), 0), hook="other")
    write_shard(tmp_path / "c.safetensors", make_batch(torch.randn(2, 4), 0), hook="h")
    with pytest.raises(ValueError, match=r"hook: .*a\.safetensors has 'h', .*b\.safetensors has 'other'"):
        StepShards([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    with pytest.raises(ValueError, match=r"row shape: .*c\.safetensors"):
        StepShards([tmp_path / "a.safetensors", tmp_path / "c.safetensors"])
    with pytest.raises(ValueError, match="no activations of step 5"):
        StepShards([tmp_path / "a.safetensors"]).select_step(5)
