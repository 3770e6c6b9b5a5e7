"""A run killed mid-stage resumes from its last epoch checkpoint and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import TINY, compose_config
from distill_process import distill_run, start_distill_run

from distill_runner import runner
from distill_runner.reporting.results import RunResults

RUN = TINY + ["trainer.epochs=12", "cache.enabled=false", "distill.teacher_outputs=online"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    proc = start_distill_run(
        *RUN, f"hydra.run.dir={killed}", cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = killed / "checkpoints" / "student_last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= epoch < 12

    resumed = distill_run(*RUN, f"trainer.resume={killed}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (killed / "distill-run.log").read_text()  # one log: the resumed run's goes on in the killed run's
    assert not (tmp_path / "again").exists()
    assert "stage teacher: finished before" in log and f"student: resuming after epoch {epoch}/12" in log
    kept = sorted(p.name for p in (killed / "checkpoints").glob("*.pt"))  # final and best weights, no _last
    assert kept == ["baseline.pt", "baseline_best.pt", "student.pt", "student_best.pt", "teacher.pt", "teacher_best.pt"]

    whole = distill_run(*RUN, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
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


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """A finished TINY run started as a requeued Slurm job starts (``trainer.resume=auto``, a fixed run folder):
    its command, working folder (its cache is outputs/cache there) and first start. Shared by the tests below:
    one of them starts the same command again, another resumes the folder with another config."""
    cwd = tmp_path_factory.mktemp("auto")
    args = [*TINY, "trainer.resume=auto", f"hydra.run.dir={cwd / 'run'}"]
    return args, cwd, distill_run(*args, cwd=cwd)


@pytest.mark.slow
def test_resume_with_another_config_is_refused(auto_run, tmp_path):
    _, cwd, first = auto_run
    assert first.returncode == 0
    resume = f"trainer.resume={cwd / 'run'}"
    proc = distill_run(*TINY, "distill.alpha=0.9", resume, f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert proc.returncode != 0 and "trainer.resume" in proc.stderr and "(distill.alpha 0.5 -> 0.9)" in proc.stderr


@pytest.mark.slow
def test_resume_true_without_an_unfinished_run_says_how(tmp_path):
    proc = distill_run(*TINY, "trainer.resume=true", cwd=tmp_path)
    assert proc.returncode != 0 and "trainer.resume=True: no unfinished run" in proc.stderr


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues_the_same_folder(auto_run):
    """What a requeued Slurm job does: the same command, the same fixed run folder."""
    args, cwd, first = auto_run
    assert first.returncode == 0, first.stderr[-2000:]
    log = next((cwd / "run").glob("*.log"))
    assert "nothing to resume yet (trainer.resume=auto)" in log.read_text()
    again = distill_run(*args, cwd=cwd)
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
