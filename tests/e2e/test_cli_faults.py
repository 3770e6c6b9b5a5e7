"""The command line as a new user types it: `~` in a path (the README's own example), another data set without an
experiment (named after what ran, not "quickstart"), and Ctrl-C (one line saying how to continue, exit 130)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, TINY_IMAGES
from fake_data import make_xray_folder
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from distill_runner.cli import command_line, expand_home


def distill_run(*args, cwd, env=None):
    command = [sys.executable, "-m", "distill_runner", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_tilde_in_a_value_is_the_home_folder(monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    assert expand_home("dataset.root=~/kaggle/chest_xray") == "dataset.root=/home/me/kaggle/chest_xray"
    assert expand_home("+cache.dir=~") == "+cache.dir=/home/me"
    monkeypatch.setenv("HOME", "/home/my name")
    assert expand_home("dataset.root=~/x") == "dataset.root='/home/my name/x'"  # Hydra reads a space only quoted
    for untouched in ("~teacher.label_smoothing", "dataset.root=a/~b", "dataset.root=~/a,~/b", "dataset.root='~/x'"):
        assert expand_home(untouched) == untouched


@pytest.mark.slow
def test_the_readmes_tilde_example_parses_as_written(tmp_path):
    """README: distill-run experiment=xray_kd dataset.root=~/kaggle/chest_xray dataset.balance=class_weights"""
    env = {**os.environ, "HOME": str(tmp_path)}
    args = ["experiment=xray_kd", "dataset.root=~/kaggle/chest_xray", "dataset.balance=class_weights", "--cfg", "job"]
    proc = distill_run(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.dataset.root == str(tmp_path / "kaggle" / "chest_xray") and cfg.dataset.name == "chest_xray"


def test_another_data_set_leaves_the_quickstart_out():
    assert command_line([]) == [] and command_line(["dataset=digits"]) == ["dataset=digits"]  # the quickstart
    assert command_line(["dataset=imagefolder", "dataset.root=x", "--cfg", "job"]) == [
        "dataset=imagefolder", "~experiment", "dataset.root=x", "--cfg", "job"
    ]  # fmt: skip
    for chosen in (["experiment=quickstart"], ["experiment=xray_kd"], ["+experiment=mine"], ["~experiment"]):
        assert command_line(["dataset=imagefolder", *chosen]) == ["dataset=imagefolder", *chosen]


@pytest.mark.slow
def test_an_image_folder_run_is_named_after_it_with_its_own_settings(tmp_path):
    """`distill-run dataset=imagefolder dataset.root=~/...`: the teacher has the resnet18 defaults, not the
    quickstart's digits-tuned ones, and the run is named imagefolder in TensorBoard and the log."""
    make_xray_folder(tmp_path / "kaggle" / "xray")
    run_dir = tmp_path / "run"
    env = {**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = ["dataset=imagefolder", "dataset.root=~/kaggle/xray", *TINY_IMAGES, "dataset.num_workers=0"]
    proc = distill_run(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.teacher.label_smoothing == 0.0 and cfg.teacher.optimizer.lr == 1.0e-3  # conf/teacher/resnet18.yaml
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    start = HParamsPluginData.FromString(acc.summary_metadata["_hparams_/session_start_info"].plugin_data.content)
    assert start.session_start_info.group_name.startswith("imagefolder kd T=4 alpha=0.5")
    assert "quickstart" not in (run_dir / "distill-run.log").read_text()


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout_s} s"
        time.sleep(0.05)


def interruptible(command: list[str], cwd: Path) -> subprocess.Popen:
    """A process Ctrl-C can stop: a test runner started in the background ignores SIGINT, and its children
    would inherit that (Python then never raises KeyboardInterrupt)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_in_distill_run_says_how_to_continue(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "teacher.epochs=3", "trainer.epochs=2", f"hydra.run.dir={run_dir}"]
    process = interruptible([sys.executable, "-m", "distill_runner", *args], tmp_path)
    wait_for(run_dir / "checkpoints" / "teacher_last.pt", process)  # the teacher has trained an epoch
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("distill-run: interrupted; continue with: distill-run ")
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert f"hydra.run.dir={run_dir}" in command and command[-1] == "trainer.resume=auto"
    done = distill_run(*command[1:], cwd=tmp_path)  # the printed command, as pasted
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "metrics.json").is_file() and "resuming the run in" in (run_dir / "distill-run.log").read_text()
