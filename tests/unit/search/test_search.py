"""distill-search: a 4-trial search on digits (1-epoch trials, one pruned), its Pareto files and plots, the
budget respected by the choice, the one-line errors, and a killed search resumed from its journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from search_setup import SMALL, write_search
from search_setup import SPACE as SMALL_SPACE

optuna = pytest.importorskip("optuna", minversion="4")

from distill_runner.config import validate  # noqa: E402
from distill_runner.errors import ConfigError  # noqa: E402
from distill_runner.search import driver  # noqa: E402

PARAMS_BUDGET = 60_000  # tiny_cnn [4, 8] and [8, 16] are within it, [16, 32] (~104k) is not
SPACE = {
    **SMALL_SPACE,
    "objective": "latency_ms",
    "budget": {"latency_ms": None, "params": PARAMS_BUDGET, "macs": None},
    "space": {
        "student.model.channels": {"choices": [[4, 8], [8, 16], [16, 32]]},
        "distill.temperature": {"low": 1.0, "high": 8.0},
        "trainer.optimizer.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
    },
    # A learning rate that cannot learn in one epoch (outside the searched range: Optuna warns and runs it): at
    # chance, under the pruner's threshold, so pruned; the searched rates all pass it.
    "enqueue": [{"student.model.channels": [8, 16], "trainer.optimizer.lr": 1.0e-6}],
    "pruner": {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.2},
    "final": True,
}


def write_space(conf_dir: Path, name: str, **changes) -> str:
    """A search config of the user's own (conf_dir/search/<name>.yaml), found through hydra.searchpath."""
    return write_search(conf_dir, name, {**SPACE, **changes})


def run_search(folder: Path, overrides: list[str]):
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        spec = validate(compose(config_name="distill_search", overrides=overrides))  # as distill-search does
        folder.mkdir(parents=True, exist_ok=True)
        return driver.search(spec, folder, [o for o in overrides if not o.startswith("hydra.")])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the module's searches: the teacher is fine-tuned once for all of them."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, cache_dir):
    """One 4-trial search (module-wide: the tests below read its folder)."""
    root = tmp_path_factory.mktemp("search")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        overrides = [*SMALL, f"cache.dir={cache_dir}", "search=tiny", write_space(root / "conf", "tiny")]
        best = run_search(root / "s", overrides)
    finally:
        os.chdir(cwd)
    return root, root / "s", best, overrides


@pytest.mark.slow
def test_four_trials_one_pruned_pareto_files_and_budget(searched, cache_dir):
    _, folder, best, _ = searched
    rows = list(csv_rows(folder / "trials.csv"))
    assert len(rows) == 4 and best["trials"] == {"COMPLETE": 3, "PRUNED": 1}
    pruned = next(r for r in rows if r["state"] == "PRUNED")
    assert "trainer.optimizer.lr=1e-06" in pruned["overrides"]
    assert float(pruned["val_acc"]) < 0.2  # the pruner's threshold
    for name in ("pareto.csv", "report.md", "best.json", "pareto_latency.png", "pareto_macs.png", "pareto_params.png",
                 "history.png", "teacher.json"):  # fmt: skip
        assert (folder / name).stat().st_size > 0, name
    assert "## Pareto front" in (folder / "report.md").read_text()
    assert list((folder / "tb").glob("events.out.tfevents.*"))
    chosen = best["trial"]
    assert chosen["params"] <= PARAMS_BUDGET and chosen["state"] == "COMPLETE"
    within = [r for r in rows if r["state"] == "COMPLETE" and int(r["params"]) <= PARAMS_BUDGET]
    assert chosen["val_acc"] == max(float(r["val_acc"]) for r in within)  # best on validation within budget
    # the teacher was fine-tuned once: one cached teacher, reused by every trial
    assert len(list((cache_dir / "teachers").glob("*.model.pt"))) == 1
    final = best["final"]
    assert final["params"] == chosen["params"] and 0 <= final["test_acc"] <= 1
    assert final["export"]["onnx"]["max_abs_diff"] < 1e-3 and final["export"]["torchscript"]["max_abs_diff"] < 1e-3
    assert not final["retrained"]  # its trial trained as many epochs as trainer.epochs: its weights are shipped


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_a_budget_no_student_meets_is_one_line_naming_the_smallest(searched, monkeypatch):
    root, folder, _, overrides = searched
    monkeypatch.chdir(root)
    with pytest.raises(ConfigError) as err:  # the study already holds 4 trials: no new one runs
        run_search(folder, [*overrides, "search.budget.params=100"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("search.budget.params=100: no student tried meets it")
    smallest = min(csv_rows(folder / "trials.csv"), key=lambda r: int(r["params"]))
    assert f"trial {smallest['number']} (student.model.channels=[4,8])" in message and " ms batch-1 latency" in message


def test_an_unknown_key_in_the_space_is_one_line_naming_it(tmp_path):
    space = {**SPACE["space"], "trainer.optimiser.lr": {"low": 0.1, "high": 1.0}}
    overrides = [*SMALL, "search=bad", write_space(tmp_path / "conf", "bad", space=space)]
    with pytest.raises(ConfigError, match=r"^search.space.trainer.optimiser.lr='trainer.optimiser.lr': no such key"):
        run_search(tmp_path / "s", overrides)
    assert not (tmp_path / "s" / "trials").exists()  # refused before any trial


def trials(journal: Path, *states: str) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not journal.is_file():
        return []
    study = optuna.load_study(study_name="distill-search", storage=JournalStorage(JournalFileBackend(str(journal))))
    return [t for t in study.get_trials() if t.state.name in states]


@pytest.mark.slow
def test_a_killed_search_resumes_from_its_journal(tmp_path, searched, cache_dir):
    folder = tmp_path / "s"  # the searched fixture has the teacher in the cache: no process here trains it
    space = write_space(tmp_path / "conf", "tiny", final=False, enqueue=[])
    overrides = [*SMALL, f"cache.dir={cache_dir}", "search=tiny", space]
    command = [sys.executable, "-m", "distill_runner.search", *overrides, f"hydra.run.dir={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal, deadline = folder / "study.journal", time.monotonic() + 300
    # killed once a trial has finished and the next one is training (measured: its student is built)
    while not (
        trials(journal, "COMPLETE", "PRUNED") and any("cost" in t.user_attrs for t in trials(journal, "RUNNING"))
    ):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {t.number: t.values for t in trials(journal, "COMPLETE", "PRUNED")}
    killed = trials(journal, "RUNNING")
    assert 1 <= len(before) < 4 and len(killed) == 1
    # resumed with a second process sharing the study (which trials it gets depends on timing)
    done = subprocess.run([*command, "search.workers=2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (folder / "distill-search.log").read_text()
    assert "started 1 worker processes" in log and "worker processes failed" not in log
    assert (folder / "distill-search-worker1.log").is_file()
    after = trials(journal, "COMPLETE", "PRUNED")
    assert len(after) == 4  # the requested total, not 4 more
    assert all(before[t.number] == t.values for t in after if t.number in before)  # finished trials are kept
    # the trial the kill interrupted is failed and the same student tried again
    assert [t.number for t in trials(journal, "FAIL")] == [killed[0].number]
    retry = next(t for t in after if t.user_attrs.get("retry_of") == killed[0].number)
    assert retry.params == killed[0].params
    best = json.loads((folder / "best.json").read_text())
    assert best["trial"]["params"] <= PARAMS_BUDGET and best["final"] == {}


def parse_space(raw: dict) -> list:
    """``raw`` as search.space, checked by the schema as distill-search checks it."""
    from omegaconf import OmegaConf

    from distill_runner.schema import parse
    from distill_runner.search import space
    from distill_runner.search_spec import SearchSpec

    return space.entries(parse(SearchSpec, OmegaConf.create({**SPACE, "space": raw}), "search").space)


def test_space_entries_sample_into_overrides_and_bad_entries_are_one_line():
    from distill_runner.search import space

    entries = parse_space(
        {
            "student": {"choices": ["tiny_cnn", "mobilenet_v2"]},
            "student.model.channels": {"choices": [[8, 16], [16, 32]], "when": {"student": "tiny_cnn"}},
            "student.model.width_mult": {"choices": [0.5, 1.0], "when": {"student": "mobilenet_v2"}},
            "distill.temperature": {"low": 1.0, "high": 8.0},
        }
    )
    trial = optuna.trial.FixedTrial(
        {"student": "tiny_cnn", "student.model.channels": "[16, 32]", "distill.temperature": 2.5}
    )
    values = space.sample(entries, trial)
    assert values == {"student": "tiny_cnn", "student.model.channels": [16, 32], "distill.temperature": 2.5}
    assert space.overrides(values) == ["student=tiny_cnn", "student.model.channels=[16,32]", "distill.temperature=2.5"]
    bad = {
        "distill.alpha": ({"low": 0.9, "high": 0.1}, "search.space.distill.alpha="),
        "distill.beta": ({"choices": []}, "search.space.distill.beta.choices=[]"),
        "trainer.optimizer.lr": ({"low": 1e-3, "high": 1e-2, "lgo": True}, "search.space.trainer.optimizer.lr.lgo="),
        "distill.gamma": (5, "search.space.distill.gamma=5: give {choices: [...]} or {low: L, high: H}"),
        "distill.delta": ({"low": 1, "high": 2, "when": "kd"}, "search.space.distill.delta.when='kd': give {group"),
    }
    for key, (spec, start) in bad.items():
        with pytest.raises(ConfigError) as err:
            parse_space({key: spec})
        assert str(err.value).startswith(start) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^search.space.student='resnet50': not an option of the student group"):
        space.check(parse_space({"student": {"choices": ["tiny_cnn", "resnet50"]}}), [], None)


def test_an_entrys_unknown_field_is_named_with_its_value_though_the_key_holds_dots():
    with pytest.raises(ConfigError) as err:
        parse_space({"trainer.optimizer.lr": {"low": 1e-3, "high": 1e-2, "lgo": True}})
    assert str(err.value) == (
        "search.space.trainer.optimizer.lr.lgo=True: an entry takes only choices, low, high, log, step, when"
    )


def test_a_trial_runs_the_runners_own_pipeline(monkeypatch, tmp_path):
    """run_trial is the runner's session, build and train (stopped after the KD student), not a copy of them."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from distill_runner import runner
    from distill_runner.search import trial

    calls = []

    @contextmanager
    def session(cfg, run_dir, overrides=None):
        calls.append(("session", run_dir))
        yield SimpleNamespace(data=None, device=None, precision=None, spec=SimpleNamespace(eval=None))

    def train(ctx, built, stages, on_student_epoch):
        calls.append(("train", stages, on_student_epoch))
        return {}, {"student": SimpleNamespace(final_val_acc=0.75)}

    monkeypatch.setattr(runner, "session", session)
    monkeypatch.setattr(runner, "train", train)
    shipped = SimpleNamespace(deployed=lambda student: student)  # the student as it ships (SimKD: with its head)
    built = SimpleNamespace(student="model", recipe=shipped)
    monkeypatch.setattr(runner, "build", lambda ctx: calls.append(("build",)) or built)
    monkeypatch.setattr(trial, "cost", lambda model, *rest: {"params": 1, "model": model})
    measured, hook = [], lambda *a: None
    assert trial.run_trial("cfg", tmp_path, measured.append, hook) == 0.75
    assert calls == [("session", tmp_path), ("build",), ("train", ("teachers", "student"), hook)]
    assert measured == [{"params": 1, "model": "model"}]  # measured before training


def test_the_kd_preset_is_the_old_kd_search():
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        node = compose(config_name="distill_search", overrides=["search=kd"]).search
    assert node.objective is None and node.trials == 20  # validation accuracy alone, 20 trials
    assert dict(node.space) == {
        "distill.temperature": {"low": 1.0, "high": 10.0},
        "distill.alpha": {"low": 0.0, "high": 1.0},
    }


def test_a_bad_storage_is_one_line(tmp_path):
    from distill_runner.search import study

    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        node = validate(compose(config_name="distill_search", overrides=["search.storage=my-db"])).search
    with pytest.raises(ConfigError, match=r"^search.storage='my-db': use null .* or an RDB URL"):
        study.storage(node, tmp_path)


def test_int8_beside_fp32_and_one_line_without_onnxruntime(searched, tmp_path, monkeypatch):
    from distill_runner.config import compose as compose_run
    from distill_runner.search import int8

    _, folder, best, _ = searched
    onnx_path = folder / best["final"]["folder"] / best["final"]["export"]["onnx"]["path"]
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        spec = validate(compose_run([*SMALL, *best["trial"]["overrides"]]))
    result = int8.quantize(onnx_path, spec, tmp_path, calibration_images=32)
    assert result["calibration_images"] == 32 and (tmp_path / "student.int8.onnx").is_file()
    assert result["int8"]["size_bytes"] < result["fp32"]["size_bytes"]
    assert result["fp32"]["test_acc"] == pytest.approx(best["final"]["test_acc"], abs=1e-6)  # the same fp32 model
    assert abs(result["int8"]["test_acc"] - result["fp32"]["test_acc"]) < 0.1 and result["int8"]["latency_ms"] > 0
    monkeypatch.setattr(int8, "missing_modules", lambda *names: ["onnxruntime"])
    skipped = int8.quantize(onnx_path, spec, tmp_path, calibration_images=32)
    assert skipped == {
        "status": "skipped: onnxruntime not installed; pip install -e '.[export]' adds int8 quantization"
    }
