"""Data-parallel training in two CPU processes (gloo), each a fresh interpreter."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from diffbias_core.dissect.train import SaeTrainer, TrainConfig
from diffbias_core.sae.formats import read_safetensors

REPO = Path(__file__).resolve().parents[2]
CONFIG = dict(  # holdout 0: every row is trained on, so the processes' row counts are known exactly
    num_latents=16,
    k=2,
    batch_size=64,
    buffer_batches=2,
    warmup_steps=2,
    lr=5e-3,
    dead_after_rows=200,
    holdout=0.0,
)
SAME = {**CONFIG, "dead_after_rows": 10**9}  # dead counters advance by the global row count: keep AuxK out

WORKER = textwrap.dedent(f"""
    import sys
    import torch
    import torch.distributed as dist
    from diffbias_core.dissect import distributed as ddp
    from diffbias_core.dissect.activations import MemorySource, make_batch
    from diffbias_core.sae.formats import write_safetensors
    from diffbias_core.dissect.train import SaeTrainer, TrainConfig, train_sae

    rank, folder = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{{folder}}/rendezvous", rank=rank, world_size=2)
    assert ddp.world() == (rank, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    # 1. every process feeds the same rows: the averaged gradient is the single-process gradient
    trainer = SaeTrainer(TrainConfig(**{SAME!r}), 8)
    trainer.feed(x)
    same = trainer.finish()
    # 2. the processes split 15 chunks of 70 rows (8 and 7): they must still stop together
    config = TrainConfig(**{{**{CONFIG!r}, "batch_size": 70, "buffer_batches": 1}})
    result = train_sae(MemorySource(make_batch(x[:1030], 0), hook="h"), config)
    tensors = {{f"same.{{i}}": p.detach() for i, p in enumerate(trainer.params)}}
    split = (result.sae.W_enc, result.sae.b_enc, result.sae.W_dec, result.sae.b_dec)
    tensors.update({{f"split.{{i}}": p.detach() for i, p in enumerate(split)}})
    tensors["counts"] = torch.tensor([same.step, result.stats.step, result.stats.rows])
    write_safetensors(tensors, {{}}, f"{{folder}}/rank{{rank}}.safetensors")
    dist.destroy_process_group()
""")


def _rows():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1000, 8, generator=g) @ torch.randn(8, 8, generator=g)


def test_two_process_training_matches_one_process_and_stays_in_sync(tmp_path, one_thread):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]  # fmt: skip
    logs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    ranks = [read_safetensors(tmp_path / f"rank{r}.safetensors")[0] for r in (0, 1)]
    for name in ranks[0]:  # identical parameters and counts in both processes
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
    single = SaeTrainer(TrainConfig(**SAME), 8)
    single.feed(_rows())
    assert int(ranks[0]["counts"][0]) == single.finish().step
    for i, p in enumerate(single.params):
        torch.testing.assert_close(ranks[0][f"same.{i}"], p.detach(), rtol=1e-5, atol=1e-6)
    # uneven split: each process trains on its own chunks, 7 steps of 2 x 70 rows before one runs dry
    assert ranks[0]["counts"][1:].tolist() == [7, 7 * 2 * 70]
