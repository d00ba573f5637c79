"""torch.distributed meta-training: 2 gloo processes on loopback match 1 process; failures stop every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import bilevel as bl
from tasks.omniglot import train
from tasks.omniglot.config import load_config
from tasks.omniglot.data import load_omniglot, resolve_root
from tasks.omniglot.distributed import Context

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BILEVEL_DATA", REPO / ".." / "shared" / "data"))
SMALL = [f"data.root={DATA}", "data.background=images_background_small1", "data.evaluation=null",
         "data.num_train=100", "data.num_val=16", "wandb.mode=disabled", "run.progress=false",
         "eval.every=0", "eval.test_tasks=4", "inner.test_steps=2", "method.name=fomaml", "meta.batch=4",
         "meta.steps=2", "meta.optimizer=sgd", "meta.lr=0.05", "run.threads=1"]


def test_two_processes_match_one_process(tmp_path, monkeypatch):
    if not (resolve_root(DATA) / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot small zips not found under {DATA} (set BILEVEL_DATA)")
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # --standalone: torchrun picks a free port itself (no window between choosing a port and binding it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "examples" / "omniglot_fewshot.py"), *SMALL,
           f"run.dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_omniglot(("images_background_small1",), DATA, download=False)
        one = train.main(load_config("demo", SMALL + [f"run.dir={tmp_path / 'one'}"]), data)
    finally:
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    # Plain SGD: the weights after k steps are theta_0 - lr * (sum of the k mean hypergradients), so equal weights
    # mean equal hypergradients; the only difference allowed is the order of float additions.
    for k in a["hparams"]:
        torch.testing.assert_close(b["hparams"][k], a["hparams"][k], rtol=1e-5, atol=1e-6)
    assert a["history"]["loss"] == pytest.approx(b["history"]["loss"], rel=1e-5)
    assert not list((tmp_path / "two").glob("*.tmp")) and (tmp_path / "two" / "results.json").is_file()
    assert b["config"]["meta"]["batch"] == 4 and one["machine"]["world_size"] == 1


def test_meta_batch_not_divisible_by_world_size_is_a_clear_error():
    with pytest.raises(ValueError, match="meta.batch=6 is not divisible by the world size 4"):
        Context(rank=0, world_size=4).shard(6)
    assert Context(rank=1, world_size=4).shard(8) == 2


def _nonfinite_worker(rank: int, out: str):
    # A file rendezvous: no port to race for with other processes on the machine.
    torch_dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    results = []
    for policy in ("raise", "ignore"):
        ctx = Context(rank, 2, on_nonfinite=policy)
        grad = {"w": torch.full((3,), float("nan") if rank == 1 else 1.0)}   # only rank 1 sees a NaN
        try:
            grad, metrics = ctx.all_reduce_mean(grad, {"loss": torch.tensor(1.0 + rank)},
                                                nonfinite=torch.tensor(rank == 1))
            step = "skipped" if grad is None else grad["w"].tolist()
            results.append(f"{policy}: step {step}, loss {metrics['loss']}")
        except bl.NonFiniteError:
            results.append(f"{policy}: raised")
    Path(out, f"rank{rank}").write_text("; ".join(results))
    torch_dist.destroy_process_group()


def test_a_nonfinite_rank_stops_or_skips_every_rank(tmp_path):
    mp.spawn(_nonfinite_worker, args=(str(tmp_path),), nprocs=2, join=True)
    expected = "raise: raised; ignore: step skipped, loss 1.5"    # both ranks agree; no hang
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == [expected, expected]
