"""A run killed mid-stage resumes from its last epoch checkpoint and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner import runner
from distill_runner.reporting.results import RunResults

RUN = TINY + ["trainer.epochs=12", "cache.enabled=false", "distill.teacher_outputs=online"]


def start(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "distill_runner", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    proc = start(*RUN, f"hydra.run.dir={killed}", cwd=tmp_path)
    last = killed / "checkpoints" / "student_last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= epoch < 12

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_runner",
            *RUN,
            f"trainer.resume={killed}",
            f"hydra.run.dir={tmp_path / 'again'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (killed / "distill-run.log").read_text()  # one log: the resumed run's goes on in the killed run's
    assert not (tmp_path / "again").exists()
    assert "stage teacher: finished before" in log and f"student: resuming after epoch {epoch}/12" in log
    kept = sorted(p.name for p in (killed / "checkpoints").glob("*.pt"))  # final and best weights, no _last
    assert kept == ["baseline.pt", "baseline_best.pt", "student.pt", "student_best.pt", "teacher.pt", "teacher_best.pt"]

    whole = subprocess.run(
        [sys.executable, "-m", "distill_runner", *RUN, f"hydra.run.dir={tmp_path / 'whole'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = (RunResults.load(d / "metrics.json") for d in (killed, tmp_path / "whole"))
    for role in ("teacher", "student", "baseline"):
        assert a.models[role].test_acc == b.models[role].test_acc
    assert [h["loss/total"] for h in a.stages["student"].history] == pytest.approx(
        [h["loss/total"] for h in b.stages["student"].history], rel=1e-6
    )
    sa = torch.load(killed / "checkpoints" / "student.pt", weights_only=True)
    sb = torch.load(tmp_path / "whole" / "checkpoints" / "student.pt", weights_only=True)
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


@pytest.mark.slow
def test_resume_with_another_config_is_refused(tmp_path):
    run = tmp_path / "run"
    assert (
        subprocess.run(
            [sys.executable, "-m", "distill_runner", *TINY, f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True
        ).returncode
        == 0
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_runner",
            *TINY,
            "distill.alpha=0.9",
            f"trainer.resume={run}",
            f"hydra.run.dir={tmp_path / 'x'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "trainer.resume" in proc.stderr and "(distill.alpha 0.5 -> 0.9)" in proc.stderr


@pytest.mark.slow
def test_resume_true_without_an_unfinished_run_says_how(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distill_runner", *TINY, "trainer.resume=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "trainer.resume=True: no unfinished run" in proc.stderr


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues_the_same_folder(tmp_path):
    """What a requeued Slurm job does: the same command, the same fixed run folder."""
    cmd = [sys.executable, "-m", "distill_runner", *TINY, "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'run'}"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    log = next((tmp_path / "run").glob("*.log"))
    assert "nothing to resume yet (trainer.resume=auto)" in log.read_text()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    text = log.read_text()
    assert "resuming the run in" in text and "stage student: finished before" in text and "reusing baseline" in text


@pytest.mark.slow
def test_a_finished_run_keeps_final_and_best_weights_drops_resumable_states_and_still_resumes(fast, tmp_path, caplog):
    run = tmp_path / "run"
    first = runner.run(compose_config(fast), run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.suffix == ".pt")
    assert names == ["baseline.pt", "baseline_best.pt", "student.pt", "student_best.pt", "teacher.pt"]
    with caplog.at_level("INFO"):
        again = runner.run(compose_config([*fast, "trainer.resume=auto"]), run)
    assert "stage student: finished before" in caplog.text and "stage baseline: finished before" in caplog.text
    assert again.models["student"].test_acc == first.models["student"].test_acc
