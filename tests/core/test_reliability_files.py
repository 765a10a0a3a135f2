"""Reliability of files (issue 13): late failures checked up front, checkpoints, temporaries, digests."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffbias_core import (
    FeatureSet,
    SparseAutoencoder,
    load_features,
    save_features,
    save_sae,
)
from diffbias_core.cli import dissect as cli_dissect
from diffbias_core.cli.info import describe
from diffbias_core.dissect import train_state
from diffbias_core.dissect.activations import MemorySource, make_batch, write_shard
from diffbias_core.dissect.train import TrainConfig, train_sae
from diffbias_core.dissect.train_state import state_path
from diffbias_core.sae.formats import FormatError, load_sae, read_header

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend
REPO = Path(__file__).resolve().parents[2]


def cli(argv) -> int:
    parser = argparse.ArgumentParser()
    cli_dissect.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)


def rows(n: int = 512, width: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ case 2
@pytest.mark.parametrize("which", ["out", "checkpoint"])
def test_reliability_too_long_name_fails_before_training(tmp_path, which):
    """Case 2: a name that passes as a file name but not as the temporary one (or the checkpoint's state
    sidecar) is refused before the first step, not after the whole run."""
    steps = []
    long_name = "a" * 235 + ".safetensors"  # 247 bytes: fits 255, its temporary name does not
    out = tmp_path / (long_name if which == "out" else "sae.safetensors")
    checkpoint = tmp_path / (long_name if which == "checkpoint" else "ckpt.safetensors")
    source = MemorySource(make_batch(rows(), 0), hook="test.hook")
    with pytest.raises(ValueError, match="exceeds the 255-byte limit"):
        train_sae(source, TrainConfig(num_latents=16, k=2, batch_size=32, warmup_steps=0), out=out,
                  checkpoint=checkpoint, progress=lambda stats: steps.append(stats.step))  # fmt: skip
    assert steps == []
    assert list(tmp_path.iterdir()) == []


def test_reliability_attribute_cli_checks_its_output_name_first(tmp_path, capsys):
    """Case 2: attribute refuses an unwritable --out before loading anything."""
    shard = tmp_path / "acts.safetensors"
    batch = make_batch(rows(8), 0, label=torch.tensor([0, 1] * 4), sample=torch.arange(8) // 2)
    write_shard(shard, batch, hook="test.hook", classes=("a", "b"))
    assert cli(["attribute", "--sae", tmp_path / "missing_sae.safetensors", shard,
                "--out", tmp_path / ("f" * 240 + ".safetensors")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "exceeds the 255-byte limit" in err and "missing_sae" not in err


# ------------------------------------------------------------------------------------------------ case 3
def _weights(path):
    sae = load_sae(path)
    return [getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")]


def test_reliability_crash_between_checkpoint_writes_resumes_exactly(tmp_path, monkeypatch):
    """Case 3: a crash after the state sidecar was written but before the SAE file loses nothing: the resume
    continues from the state and ends bit-identical to an uninterrupted run."""
    source = MemorySource(make_batch(rows(1024, seed=1), 0), hook="test.hook")
    config = TrainConfig(
        num_latents=16, k=2, batch_size=32, warmup_steps=0, epochs=2, checkpoint_every=8, seed=3
    )
    reference = train_sae(
        source, config, out=tmp_path / "ref.safetensors", checkpoint=tmp_path / "ref.ckpt.safetensors"
    )
    calls = []
    real = train_state.write_current

    def crash_on_third(trainer, path):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError(
                "power cut"
            )  # the sidecar of the 3rd checkpoint is written, the SAE file is not
        real(trainer, path)

    ckpt = tmp_path / "run.ckpt.safetensors"
    monkeypatch.setattr(train_state, "write_current", crash_on_third)
    with pytest.raises(RuntimeError, match="power cut"):
        train_sae(source, config, out=tmp_path / "run.safetensors", checkpoint=ckpt)
    monkeypatch.setattr(train_state, "write_current", real)
    sidecar_steps = json.loads(read_header(state_path(ckpt))[1]["run"])["step"]
    assert load_sae(ckpt).provenance["steps"] != str(sidecar_steps)  # the torn pair of the issue
    resumed = train_sae(source, config, out=tmp_path / "run.safetensors", checkpoint=ckpt, resume=True)
    assert resumed.stats.step == reference.stats.step and resumed.stats.rows == reference.stats.rows
    for mine, ref in zip(
        _weights(tmp_path / "run.safetensors"), _weights(tmp_path / "ref.safetensors"), strict=True
    ):
        assert torch.equal(mine, ref)


# ------------------------------------------------------------------------------------------------ case 4
def test_reliability_sigint_then_resume_is_exact(tmp_path):
    """Case 4: Ctrl-C in the middle of a chunk (here: inside an optimizer step) stops at the end of that chunk,
    so the resume neither re-feeds nor skips rows: it ends bit-identical to an uninterrupted run."""
    source = MemorySource(make_batch(rows(1000, seed=2), 0), hook="test.hook")
    config = TrainConfig(
        num_latents=16, k=2, batch_size=32, warmup_steps=0, epochs=2, seed=4, buffer_batches=2
    )
    reference = train_sae(
        source, config, out=tmp_path / "ref.safetensors", checkpoint=tmp_path / "ref.ckpt.safetensors"
    )

    def ctrl_c_at_step_10(stats) -> None:
        if stats.step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    out, ckpt = tmp_path / "run.safetensors", tmp_path / "run.ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_sae(source, config, out=out, checkpoint=ckpt, progress=ctrl_c_at_step_10)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = train_sae(source, config, out=out, checkpoint=ckpt, resume=True)
    assert (resumed.stats.step, resumed.stats.rows) == (reference.stats.step, reference.stats.rows)
    for mine, ref in zip(_weights(out), _weights(tmp_path / "ref.safetensors"), strict=True):
        assert torch.equal(mine, ref)


def _train_cli(shard, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "diffbias_core", "train-sae", str(shard), "--latents", "16",
                             "--k", "2", "--batch-size", "16", "--steps", "1200", "--warmup-steps", "0",
                             "--out", str(out), *extra], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_reliability_sigkill_then_resume_continues_from_the_default_checkpoint(tmp_path):
    """Case 4: with the default options a SIGKILLed train-sae has a checkpoint, and --resume continues from it
    to the same final SAE as an uninterrupted run; --resume without a checkpoint says so (rc 2)."""
    shard = tmp_path / "acts.safetensors"
    write_shard(shard, make_batch(rows(512, seed=5), 0), hook="test.hook")
    reference = _train_cli(shard, tmp_path / "ref.safetensors")
    assert reference.wait(timeout=240) == 0, reference.communicate()[1]
    out = tmp_path / "run.safetensors"
    state = tmp_path / "run.ckpt.state.safetensors"
    missing = _train_cli(shard, out, "--resume")
    _, err = missing.communicate(timeout=240)
    assert missing.returncode == 2 and "no checkpoint" in err and "without --resume" in err, err
    killed = _train_cli(shard, out)
    deadline = time.monotonic() + 240
    while not state.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed: make it longer"
    assert state.exists()
    resumed = _train_cli(shard, out, "--resume")
    stdout, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "trained 1200 steps" in stdout
    for mine, ref in zip(_weights(out), _weights(tmp_path / "ref.safetensors"), strict=True):
        assert torch.equal(mine, ref)


# ------------------------------------------------------------------------------------------------ case 5
_SLOW_SAVE = """
import sys, torch
from diffbias_core import SparseAutoencoder, save_sae
sae = SparseAutoencoder(1024, 16384, 8)  # 128 MiB of float32 weights
print("ready", flush=True)
save_sae(sae, sys.argv[1])
"""


def test_reliability_sigkill_during_save_leaves_nothing_after_the_next_write(tmp_path):
    """Case 5: a save killed half-way leaves its temporary file; the next write of that file removes it (and
    an older version's leftovers after an hour), and ComfyUI-style listings (*.safetensors) never show one."""
    target = tmp_path / "big.safetensors"
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert writer.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and writer.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.stat().st_size > 0]
        if temps:
            break
        time.sleep(0.001)
    writer.kill()
    writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL and not target.exists(), "the save finished before the kill"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers and all(name.startswith(".") for name in leftovers)
    assert not list(tmp_path.glob("*.safetensors")), "a temporary file would be listed"
    old_ours, old_theirs = tmp_path / ".big.safetensors.k3j4l5m6.tmp", tmp_path / ".tmpA1b2C3"
    for old in (old_ours, old_theirs):
        old.write_bytes(b"x" * 100)
        os.utime(old, (time.time() - 7200, time.time() - 7200))
    young = tmp_path / ".tmpZ9y8X7"
    young.write_bytes(b"x")  # someone's write in progress: not touched
    save_sae(SparseAutoencoder(8, 16, 2), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [young.name, target.name]


# ------------------------------------------------------------------------------------------------ case 7
def _small_sae() -> SparseAutoencoder:
    sae = SparseAutoencoder(8, 32, 4, hook="unet.middle", model_family="sd15", provenance={"steps": "3"})
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(1))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(2))
    return sae


def _sae_content(sae):
    return ([getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")],
            (sae.k, sae.hook, sae.model_family, sae.provenance))  # fmt: skip


def _features_content(features):
    return (list(features.ids) + list(features.scores),
            (features.classes, features.sae_fingerprint, features.hook, features.method, features.provenance))  # fmt: skip


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True)) and a[1] == b[1]


@pytest.mark.parametrize("kind", ["sae", "features"])
def test_reliability_byte_flips_never_load_changed_content(tmp_path, kind):
    """Case 7: 150 single-byte flips anywhere in an SAE or feature file (header and data): every one is
    refused with a FormatError naming the file, or loads exactly the written content."""
    sae = _small_sae()
    path = tmp_path / f"file.{kind}.safetensors"
    if kind == "sae":
        save_sae(sae, path)
        load, content = load_sae, _sae_content
    else:
        ids = torch.tensor([3, 1, 7], dtype=torch.int64)
        save_features(FeatureSet(("male", "female"), (ids, ids + 10), (torch.tensor([3.0, 2.0, 1.0]),) * 2,
                                 sae.fingerprint(), sae.hook, "ig", {"seed": "0"}), path)  # fmt: skip
        load, content = load_features, _features_content
    good = path.read_bytes()
    expected = content(load(path))
    generator = torch.Generator().manual_seed(7)
    positions = torch.randint(0, len(good), (150,), generator=generator).tolist()
    accepted = refused = 0
    for position in positions:
        damaged = bytearray(good)
        damaged[position] ^= 1 << int(torch.randint(0, 8, (1,), generator=generator))
        path.write_bytes(bytes(damaged))
        try:
            loaded = content(load(path))
        except ValueError as error:  # FormatError or a check naming the file
            assert str(path) in str(error), error
            refused += 1
            continue
        assert _same(loaded, expected), f"a flip at byte {position} loaded changed content"
        accepted += 1
    assert refused > 100, (refused, accepted)


def test_reliability_files_without_digests_still_load_and_info_says_so(tmp_path, capsys):
    """Case 7: a file written without digests (an older version, or safetensors itself) loads; `info` reports
    'no digest' for it, 'ok' for a new file, and fails on a damaged one."""
    from safetensors.torch import save_file

    sae = _small_sae()
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    save_sae(sae, new)
    metadata = {k: v for k, v in read_header(new)[1].items() if k != "digests"}
    save_file({n: getattr(sae, n).detach().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, str(old),
              metadata=metadata)  # fmt: skip
    assert _same(_sae_content(load_sae(old)), _sae_content(sae))
    assert describe(old)["digest"] == "no digest"
    assert describe(new)["digest"] == "ok"
    data = bytearray(new.read_bytes())
    data[-3] ^= 0x10  # inside b_dec
    new.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="b_dec"):
        describe(new)
    with pytest.raises(FormatError, match="does not match the recorded digest"):
        load_sae(new)


# ------------------------------------------------------------------------------------------------ case 15
_MEASURE_LOAD = """
import json, sys
from diffbias_core import load_sae

def status(key):  # VmHWM: this process's peak RSS (getrusage's maxrss starts at the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

before = status("VmHWM")
sae = load_sae(sys.argv[1])
first = sae.fingerprint()
again = sae.fingerprint()  # remembered: no second pass
print(json.dumps({"before": before, "peak": status("VmHWM"), "same": first == again}))
"""


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_reliability_load_sae_peak_memory_is_near_the_file_size(tmp_path, dtype):
    """Case 15: load_sae and the fingerprint allocate the SAE once: the peak RSS of a fresh process grows by
    about the file size (it was 1.9x for float32 and 3x for float16, the fingerprint copied all of W_dec)."""
    path = tmp_path / "sae.safetensors"
    latents = 32768 if dtype == torch.float16 else 16384  # 128 MiB files
    save_sae(SparseAutoencoder(1024, latents, 8, dtype=dtype), path)
    size = path.stat().st_size
    result = subprocess.run([sys.executable, "-c", _MEASURE_LOAD, str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    grown = measured["peak"] - measured["before"]
    assert measured["same"]
    assert grown < 1.1 * size + 64 * 2**20, f"peak grew by {grown / size:.2f}x the file size ({measured})"


def test_reliability_fingerprint_of_an_sae_loaded_in_inference_mode():
    """Case 15: ComfyUI loads under torch.inference_mode(): the remembered fingerprint works on inference tensors."""
    sae = _small_sae()
    expected = sae.fingerprint()
    with torch.inference_mode():
        copy = SparseAutoencoder.from_weights(*(getattr(sae, n).detach().clone() for n in
                                                ("W_enc", "b_enc", "W_dec", "b_dec")), sae.k)  # fmt: skip
        assert copy.W_dec.is_inference()
        assert copy.fingerprint() == expected == copy.fingerprint()
