"""The sweep summary chooses on validation accuracy, reports test beside it, and averages seeds."""

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
