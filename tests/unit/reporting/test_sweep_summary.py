"""The sweep summary chooses on validation accuracy, reports test beside it, and averages seeds."""

import pytest
import yaml

from distill_runner.reporting import sweep
from distill_runner.reporting.results import ModelResult, RunResults, StageResult


def model(test_acc: float) -> ModelResult:
    per_class = {"precision": [1.0], "recall": [1.0], "f1": [1.0], "support": [10]}
    return ModelResult("m", 1, 1, 2, 1, test_acc, test_acc, 0.0, None, per_class, [[10]], 1.0, 5, 100.0)


def job(root, num: int, overrides: list[str], val: float, test: float) -> None:
    folder = root / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    stages = {s: StageResult(1, val if s == "student" else 0.5, 1.0) for s in ("teacher", "student", "baseline")}
    models = {"teacher": model(0.99), "student": model(test), "baseline": model(0.9)}
    RunResults("digits", 1, ["a"], {}, "cpu", 1, "32", 0, 16, 2, models, stages, test / 0.99, test - 0.9, 0.0, 10,
               wall_time_s=1.0).save(folder / "metrics.json")  # fmt: skip


def test_best_is_chosen_on_validation_and_test_is_reported_beside_it(tmp_path):
    job(tmp_path, 0, ["distill.temperature=1"], val=0.95, test=0.99)  # best on test, not on validation
    job(tmp_path, 1, ["distill.temperature=4"], val=0.97, test=0.93)
    sweep.write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "Best setting, chosen on the KD student's validation accuracy: `distill.temperature=4`" in md
    assert "validation 0.9700, test 0.9300 (test accuracy is reported, never used to choose)" in md
    assert "student_val_acc" in (tmp_path / "summary.csv").read_text().splitlines()[0]


def test_several_seeds_give_mean_and_std_per_setting(tmp_path):
    runs = [("1", 0, 0.90, 0.91), ("1", 1, 0.94, 0.93), ("4", 0, 0.93, 0.95), ("4", 1, 0.93, 0.97)]
    for num, (t, seed, val, test) in enumerate(runs):
        job(tmp_path, num, [f"distill.temperature={t}", f"seed={seed}"], val=val, test=test)
    sweep.write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "| `distill.temperature=1` | 2 | 0.9200 ± 0.0283 | 0.9200 ± 0.0141 |" in md
    assert "| `distill.temperature=4` | 2 | 0.9300 ± 0.0000 | 0.9600 ± 0.0141 |" in md
    assert "(mean over seeds): `distill.temperature=4`, validation 0.9300 ± 0.0000, test 0.9600 ± 0.0141" in md


def test_ties_on_validation_are_named_and_the_first_is_chosen(tmp_path):
    for num, t in enumerate((1, 2, 4)):
        job(tmp_path, num, [f"distill.temperature={t}"], val=0.97, test=0.9 + num / 100)
    sweep.write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "validation accuracy: `distill.temperature=1`" in md
    assert "3 settings tie on validation (0.9700); chosen: the first (in job order)." in md


def test_an_unreadable_job_is_skipped_with_a_warning_and_the_rest_reported(tmp_path, caplog, capsys):
    job(tmp_path, 0, ["distill.temperature=1"], val=0.95, test=0.99)
    job(tmp_path, 1, ["distill.temperature=4"], val=0.97, test=0.93)
    job(tmp_path, 2, ["distill.temperature=8"], val=0.99, test=0.93)
    (tmp_path / "2" / "metrics.json").write_text('{"version": 2, "models": {"stud')  # cut short
    assert sweep.main([str(tmp_path)]) == 0
    assert "skipping job 2" in caplog.text and str(tmp_path / "2" / "metrics.json") in caplog.text
    md = (tmp_path / "summary.md").read_text()
    assert "2 jobs;" in md and "`distill.temperature=4`, validation 0.9700" in md and "Skipped 1 job(s)" in md
    assert "distill-report: error" not in capsys.readouterr().err


def test_the_plot_shows_what_the_choice_is_made_on(tmp_path, monkeypatch):
    import matplotlib.axes

    plotted, draw = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *a, **k: plotted.append(list(y)) or draw(
        self, x, y, *a, **k))  # fmt: skip
    job(tmp_path, 0, ["distill.temperature=1"], val=0.95, test=0.99)
    job(tmp_path, 1, ["distill.temperature=4"], val=0.97, test=0.93)
    sweep.write_summary(tmp_path)
    assert plotted[0] == [0.95, 0.97]  # validation, not test (0.99, 0.93)


def test_tensorboard_declares_and_writes_the_validation_metrics(tmp_path):
    from distill_runner.reporting import tensorboard

    job(tmp_path, 0, ["distill.temperature=1"], val=0.95, test=0.99)
    results = RunResults.load(tmp_path / "0" / "metrics.json")
    assert {"val/student_acc", "val/baseline_acc", "val/teacher_acc"} <= set(tensorboard.METRICS)
    assert tensorboard.METRICS[:5][0] == "test/student_acc"  # the ticked five stay as they were
    final = tensorboard.final_scalars(results)
    assert final["val/student_acc"] == 0.95 and final["val/baseline_acc"] == 0.5


def test_job_folders_are_named_by_the_swept_settings(monkeypatch):
    from omegaconf import OmegaConf

    from distill_runner import callbacks

    monkeypatch.setenv(sweep.SWEPT_ENV, "")  # restored after the test: on_multirun_start below sets it
    overrides = ["distill.temperature=4", "distill.alpha=0.5", "trainer.resume=auto", "dataset.root=data/x"]
    assert sweep.job_folder(3, overrides) == "3_T=4,alpha=0.5"  # no plumbing, no paths
    assert sweep.job_folder(0, []) == "0"
    multirun = OmegaConf.create({"hydra": {"overrides": {"task": ["distill.temperature=1,4", "seed=0,1",
                                                                  "student.model.channels=[4,8]", "trainer.epochs=1"]},
                                           "sweeper": {"params": {"distill.alpha": "0.1,0.9"}}}})  # fmt: skip
    assert callbacks.swept_in(multirun) == ["distill.temperature", "seed", "distill.alpha"]
    callbacks.SweepSummary().on_multirun_start(multirun)  # what the launching process does before the jobs
    job = ["distill.temperature=4", "seed=1", "student.model.channels=[4,8]", "trainer.epochs=1", "distill.alpha=0.1"]
    assert sweep.job_folder(2, job) == "2_T=4,seed=1,alpha=0.1"  # what is shared by every job is left out


@pytest.mark.slow
def test_a_sweeps_tensorboard_runs_are_named_by_their_settings(tmp_path):
    import subprocess
    import sys

    from conftest import TINY

    sweep_dir = tmp_path / "sweep"
    args = [*TINY, "distill.temperature=1,4", f"hydra.sweep.dir={sweep_dir}", f"cache.dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, "-m", "distill_runner", "-m", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent.relative_to(sweep_dir).as_posix() for p in sweep_dir.glob("*/tb/*/events.out.*"))
    assert {"0_T=1/tb/student", "1_T=4/tb/student"} <= set(runs)
    assert all(run.startswith(("0_T=1/tb/", "1_T=4/tb/")) for run in runs)
    assert "| 1_T=4 | `distill.temperature=4` |" in (sweep_dir / "summary.md").read_text()


def test_a_full_disk_is_a_storage_error_and_distill_report_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    from distill_runner.errors import ConfigError, StorageError, UserError

    assert issubclass(StorageError, UserError) and not issubclass(StorageError, ConfigError)
    job(tmp_path, 0, ["distill.temperature=2"], 0.8, 0.7)

    def full(path, text):
        raise StorageError("folder", str(path.parent), "the disk holding it is full; free space there")

    monkeypatch.setattr(sweep, "atomic_write_text", full)
    assert sweep.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill-report: error: folder=") and "is full" in err and err.count("\n") == 1
