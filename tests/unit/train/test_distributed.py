"""torchrun: a 2-process gloo run of a small config against the same run in one process."""

import os
import subprocess
import sys

import pytest
import torch

from distill_runner.data.bundle import shard_order, shard_size
from distill_runner.reporting.results import RunResults

# Digits at 16 px with the small wide_cnn teacher: long enough to learn (~0.9+ test accuracy),
# short enough for CI (~15 s a run on 2 cores).
SMALL = [
    "dataset.image_size=16",
    "teacher=wide_cnn",
    "teacher.epochs=2",
    "trainer.epochs=3",
    "trainer.progress=false",
    "eval.latency_budget_s=0.05",
    "eval.throughput_budget_s=0.1",
]


def launch(args, cwd, processes):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes on 2 cores
    prefix = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    return subprocess.run(
        [*prefix, "-m", "distill_runner", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_two_gloo_processes_give_one_set_of_outputs_and_the_accuracy_of_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    # The same effective batch: 1 process x 32 images, 2 processes x 16 (batch_size is per process).
    one = launch([*SMALL, "dataset.batch_size=32", "hydra.run.dir=run"], tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([*SMALL, "dataset.batch_size=16", "hydra.run.dir=run"], tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]

    assert sorted(os.listdir(tmp_path / "two")) == ["outputs", "run"]  # rank 1 wrote no run folder of its own
    assert sorted(os.listdir(tmp_path / "two" / "outputs")) == ["cache"]
    (log_file,) = (tmp_path / "two" / "run").glob("*.log")
    m1 = RunResults.load(tmp_path / "one" / "run" / "metrics.json")
    m2 = RunResults.load(tmp_path / "two" / "run" / "metrics.json")
    assert m1.processes == 1 and m2.processes == 2
    for role in ("teacher", "student", "baseline"):
        assert m2.models[role].test_acc > 0.8, role
        assert m2.models[role].test_acc == pytest.approx(m1.models[role].test_acc, abs=0.05), role
    # every epoch of every stage was logged once, with validation accuracy over both processes' shards
    for stage in ("teacher", "student", "baseline"):
        assert len(m2.stages[stage].history) == m2.stages[stage].epochs
    log = log_file.read_text()
    assert "rank 0 of 2, backend gloo" in log and "teacher outputs: cached" in log


@pytest.mark.slow
def test_sweeps_are_refused_under_torchrun(tmp_path):
    proc = launch(["-m", "distill.temperature=1,4"], tmp_path, 2)
    assert proc.returncode != 0 and "cannot run under torchrun" in proc.stderr


@pytest.mark.parametrize("n,world", [(10, 2), (11, 3), (2, 4), (7, 1)])
def test_shards_split_an_epoch_like_distributed_sampler(n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    padded = [shard_order(order, r, world, pad=True) for r in range(world)]
    assert {len(p) for p in padded} == {shard_size(n, 0, world)}  # equal steps in every process
    assert set(torch.cat(padded).tolist()) == set(order.tolist())
    exact = [shard_order(order, r, world, pad=False) for r in range(world)]
    assert sorted(torch.cat(exact).tolist()) == sorted(order.tolist())  # evaluation: every sample once
    assert [len(e) for e in exact] == [shard_size(n, r, world, pad=False) for r in range(world)]
