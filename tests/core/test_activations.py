import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core.dissect.activations import (
    MemorySource,
    ShardReader,
    ShardSet,
    concat_batches,
    make_batch,
    read_shard,
    to_sae_inputs,
    write_shard,
)
from diffbias_core.sae.formats import write_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


def _batch(n=6, shape=(3, 2, 2), dtype=torch.float32, seed=0, step=None):
    g = torch.Generator().manual_seed(seed)
    return make_batch(
        torch.randn(n, *shape, generator=g).to(dtype),
        torch.arange(n) % 3 if step is None else step,
        label=torch.arange(n) % 2,
        sample=torch.arange(n) // 2,
        timestep=torch.linspace(999, 0, n),
        cond=torch.arange(n) % 3 != 0,
    )


def _assert_batch_equal(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (3, 2, 2)])
def test_shard_round_trip(tmp_path, dtype, shape):
    batch = _batch(shape=shape, dtype=dtype)
    write_shard(tmp_path / "a.safetensors", batch, hook="unet.middle", classes=["male", "female"])
    loaded, info = read_shard(tmp_path / "a.safetensors")
    _assert_batch_equal(loaded, batch)
    assert loaded.activations.dtype == dtype
    assert info.hook == "unet.middle" and info.classes == ("male", "female")
    assert info.rows == 6 and info.row_shape == shape


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 9), width=st.integers(1, 5), rows=st.integers(1, 4))
def test_shardset_iterates_every_row_once(tmp_path_factory, n, width, rows):
    folder = tmp_path_factory.mktemp("shards")
    batches = [_batch(n=n, shape=(width,), seed=s) for s in range(2)]
    for i, batch in enumerate(batches):
        write_shard(folder / f"{i}.safetensors", batch, hook="h", classes=["a", "b"])
    shards = ShardSet([folder / "0.safetensors", folder / "1.safetensors"])
    chunks = list(shards.iter_batches(rows))
    assert all(c.num_rows <= rows for c in chunks)
    if n:
        _assert_batch_equal(concat_batches(chunks), concat_batches(batches))
    # every-th chunks from two offsets partition the stream
    split = [list(shards.iter_batches(rows, start=s, every=2)) for s in (0, 1)]
    assert sum(c.num_rows for part in split for c in part) == 2 * n
    assert shards.num_rows == 2 * n


def test_select_step_gathers_across_shards(tmp_path):
    a, b = _batch(seed=1), _batch(seed=2)
    write_shard(tmp_path / "a.safetensors", a, hook="h", classes=["x", "y"])
    write_shard(tmp_path / "b.safetensors", b, hook="h", classes=["x", "y"])
    shards = ShardSet([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert shards.steps() == [0, 1, 2]
    both = concat_batches([a, b])
    _assert_batch_equal(shards.select_step(1), both.select(both.step == 1))
    memory = MemorySource(both, hook="h", classes=["x", "y"])
    _assert_batch_equal(memory.select_step(1), shards.select_step(1))
    with pytest.raises(ValueError, match="no activations of step 7"):
        shards.select_step(7)


def test_optional_columns_default(tmp_path):
    tensors = {
        "activations": torch.randn(3, 4),
        "step": torch.zeros(3, dtype=torch.int32),
        "label": torch.zeros(3, dtype=torch.int64),
        "sample": torch.arange(3),
    }
    write_safetensors(tensors, {"hook": "h", "classes": "a,b"}, tmp_path / "s.safetensors")
    batch, _ = read_shard(tmp_path / "s.safetensors")
    assert batch.step.dtype == torch.int64 and batch.cond.all() and batch.timestep.isnan().all()


def test_mixed_shards_are_refused_naming_both_files(tmp_path):
    write_shard(tmp_path / "a.safetensors", _batch(shape=(4,)), hook="h", classes=["x", "y"])
    write_shard(tmp_path / "b.safetensors", _batch(shape=(5,)), hook="h", classes=["x", "y"])
    write_shard(tmp_path / "c.safetensors", _batch(shape=(4,)), hook="other", classes=["x", "y"])
    write_shard(tmp_path / "d.safetensors", _batch(shape=(4,)), hook="h", classes=["y", "x"])
    for other, what in (("b", "row shape"), ("c", "hook"), ("d", "classes")):
        with pytest.raises(ValueError, match=f"disagree on {what}.*a.safetensors.*{other}.safetensors"):
            ShardSet([tmp_path / "a.safetensors", tmp_path / f"{other}.safetensors"])


def test_missing_tensor_and_length_mismatch_name_the_file(tmp_path):
    good = {
        "activations": torch.randn(3, 4),
        "step": torch.zeros(3, dtype=torch.int64),
        "label": torch.zeros(3, dtype=torch.int64),
        "sample": torch.arange(3),
    }
    missing = dict(good)
    del missing["sample"]
    write_safetensors(missing, {"hook": "h"}, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing\.safetensors.*missing tensors \['sample'\]"):
        ShardReader(tmp_path / "missing.safetensors")
    short = dict(good, label=torch.zeros(2, dtype=torch.int64))
    write_safetensors(short, {"hook": "h"}, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"short\.safetensors.*'label' has shape \(2,\), expected \(3,\)"):
        ShardReader(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(ValueError, match="junk.safetensors"):
        ShardReader(tmp_path / "junk.safetensors")
    write_safetensors(good, {}, tmp_path / "nohook.safetensors")
    with pytest.raises(ValueError, match="nohook.safetensors.*metadata 'hook'"):
        ShardReader(tmp_path / "nohook.safetensors")


def test_write_shard_validates(tmp_path):
    batch = _batch()
    with pytest.raises(ValueError, match=r"labels must be in \[-1, 1\)"):
        write_shard(tmp_path / "x.safetensors", batch, hook="h", classes=["only"])
    with pytest.raises(ValueError, match="without commas"):
        write_shard(tmp_path / "x.safetensors", batch, hook="h", classes=["a,b", "c"])
    with pytest.raises(ValueError, match="unique"):
        write_shard(tmp_path / "x.safetensors", batch, hook="h", classes=["a", "a"])
    with pytest.raises(ValueError, match="one entry per activation"):
        make_batch(torch.randn(4, 3), torch.arange(3))
    assert not (tmp_path / "x.safetensors").exists()
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "s.safetensors"
    write_shard(path, _batch(), hook="h", classes=["a", "b"])
    before = path.read_bytes()
    bad = _batch()._replace(activations=torch.randn(6, 2, 2, 2, 2))  # 5-D: refused before writing
    with pytest.raises(ValueError):
        write_shard(path, bad, hook="h", classes=["a", "b"])
    assert path.read_bytes() == before


def test_to_sae_inputs_layouts():
    maps = torch.randn(2, 3, 4, 4)
    rows = to_sae_inputs(maps)
    torch.testing.assert_close(rows[5], maps[0, :, 1, 1])  # row n*H*W + h*W + w
    assert rows.shape == (32, 3)
    whole = to_sae_inputs(maps, kernel_size=4)
    torch.testing.assert_close(whole[1], maps[1].reshape(-1))
    with pytest.raises(ValueError, match="2x2 maps, but the map is 4x4"):
        to_sae_inputs(maps, kernel_size=2)


def test_metadata_is_recorded(tmp_path):
    write_shard(
        tmp_path / "m.safetensors",
        _batch(),
        hook="h",
        classes=["a", "b"],
        metadata={"prompts": json.dumps(["x"])},
    )
    _, info = read_shard(tmp_path / "m.safetensors")
    assert json.loads(info.metadata["prompts"]) == ["x"] and info.metadata["format"] == "diffbias.activations"
