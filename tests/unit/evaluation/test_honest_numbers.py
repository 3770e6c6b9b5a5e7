"""Issue 26, items 4, 10 and 15: latency measured the way deployment runs it and never trusted (cached, used to
choose) when taken under contention; a report that says "slower", "at chance", "within N test images" and
"unavailable"; divergence and a teacher at chance named; a run estimate."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config

from distill_runner.evaluation import evaluate
from distill_runner.evaluation import metrics as M
from distill_runner.io.cache import Cache
from distill_runner.models.factories import tiny_cnn
from distill_runner.reporting import report
from distill_runner.reporting.results import ModelResult, RunResults, StageResult
from distill_runner.search.final import best_of, within
from distill_runner.spec import typed
from distill_runner.train import engine, health

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)


# --------------------------------------------------------------------------- contention


def test_contention_names_a_spread_between_rounds_and_a_starved_process():
    assert M.contention([1e-3, 1.1e-3, 1e-3, 1.05e-3, 1e-3], cpu_share=0.98) is None
    spread = M.contention([1e-3, 1e-3, 100e-3, 1e-3, 1e-3], cpu_share=0.98)
    assert "rounds range 1-100 ms (100.0x" in spread
    starved = M.contention([1e-3] * 5, cpu_share=0.4)
    assert "0.40 CPU-seconds per second" in starved
    assert M.contention([1e-3] * 5, cpu_share=None) is None  # a GPU measurement: no CPU-time rule


class FakeClock:
    """Wall and process CPU time that advance only when the fake forward pass runs."""

    def __init__(self, step_s, cpu_share: float):
        self.wall = self.cpu = 0.0
        self.steps, self.share = iter(step_s), cpu_share

    def timed(self) -> float:
        d = next(self.steps)
        self.wall += d
        self.cpu += d * self.share
        return d


def fake_latency(monkeypatch, step_s, cpu_share: float, threads: int = 1):
    clock = FakeClock(step_s, cpu_share)
    monkeypatch.setattr(M, "_timer", lambda *args: clock.timed)
    monkeypatch.setattr(M.time, "perf_counter", lambda: clock.wall)
    monkeypatch.setattr(M.time, "process_time", lambda: clock.cpu)
    model = tiny_cnn(num_classes=2, channels=(4,), hidden=8)
    return M.latency(model, (3, 8, 8), CPU, FP32, threads=threads, warmup=1, min_repeats=2, budget_s=0.0)


def test_a_stable_latency_is_the_median_of_the_rounds_with_the_stated_threads(monkeypatch):
    before = torch.get_num_threads()
    found = fake_latency(monkeypatch, [1e-3] * 1000, cpu_share=1.0, threads=2)
    assert found.contention is None and found.seconds == pytest.approx(1e-3) and found.threads == 2
    assert len(found.rounds) == M.LATENCY_ROUNDS and found.repeats == 2 * M.LATENCY_ROUNDS
    assert torch.get_num_threads() == before  # the run's own thread count is back


def test_a_busy_machine_is_detected_and_measured_again(monkeypatch):
    # a starved process in every attempt: the last attempt's figure comes back, saying why not to trust it
    found = fake_latency(monkeypatch, [100e-3] * 1000, cpu_share=0.3)
    assert found.contention is not None and "CPU-seconds per second" in found.contention
    # one slow round (another program ran) in the first attempt only: the second attempt is stable
    slow_first = [1e-3] + [1e-3, 1e-3] * 2 + [100e-3] * 2 + [1e-3] * 1000
    found = fake_latency(monkeypatch, slow_first, cpu_share=1.0)
    assert found.contention is None and found.seconds == pytest.approx(1e-3)


def _speeds(monkeypatch, tmp_path, contention: str | None):
    monkeypatch.setattr(M, "latency", lambda *a, **k: M.Latency(2e-3, 10, 1, [2e-3] * 5, 0.3, contention))
    monkeypatch.setattr(M, "throughput", lambda *a, **k: 500.0)
    cfg = typed(compose_config(["eval.latency_threads=1", "eval.speed=cached"]))
    data = SimpleNamespace(in_channels=3, image_size=8, test=SimpleNamespace(batch_size=4))
    models = {"student": tiny_cnn(num_classes=2, channels=(4,), hidden=8)}
    settings = {**evaluate.EVAL_DEFAULTS, "latency_budget_s": 0.01, "throughput_budget_s": 0.01}
    return evaluate.speeds(cfg, models, data, CPU, FP32, settings, Cache(tmp_path / "cache"))


def test_a_latency_measured_under_contention_is_never_cached(monkeypatch, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        timed, source = _speeds(monkeypatch, tmp_path, "rounds range 1-100 ms")
    assert source == "timed in this run, under contention (not cached)"
    assert timed["student"]["latency_contention"] == "rounds range 1-100 ms"
    assert not list((tmp_path / "cache" / "speeds").glob("*.pt")) and "not cached" in caplog.text
    timed, source = _speeds(monkeypatch, tmp_path, None)  # a stable session is stored, then reused
    assert source == "timed in this run" and len(list((tmp_path / "cache" / "speeds").glob("*.pt"))) == 1
    assert "earlier run" in _speeds(monkeypatch, tmp_path, None)[1]


# --------------------------------------------------------------------------- the search's choice


def trial(number, val_acc, latency_ms, macs, contention=None):
    return {"number": number, "val_acc": val_acc, "latency_ms": latency_ms, "macs": macs, "params": 10,
            "latency_contention": contention}  # fmt: skip


def test_a_tie_is_broken_on_macs_when_a_tied_latency_is_contended():
    noisy = [trial(0, 0.9, 108.0, 1000, "rounds range"), trial(1, 0.9, 0.2, 5000)]
    best, note = best_of(noisy, "latency_ms")
    assert best["number"] == 0 and "2 trials tie" in note and "broken on macs" in note and "contention" in note
    stable = [trial(0, 0.9, 0.3, 1000), trial(1, 0.9, 0.2, 5000)]
    best, note = best_of(stable, "latency_ms")
    assert best["number"] == 1 and "broken on latency_ms" in note
    assert best_of([trial(0, 0.9, 0.3, 1000), trial(1, 0.8, 0.2, 5000)], "latency_ms") == (stable[0], None)


def test_a_contended_latency_is_checked_against_its_budget_on_macs():
    found = [trial(0, 0.9, 0.5, 4000), trial(1, 0.8, 108.0, 1000, "rounds range"), trial(2, 0.7, 90.0, 9000, "x")]
    budget = {"latency_ms": 1.0}
    assert within(found[0], budget, found)  # stable and within
    assert within(found[1], budget, found)  # 108 ms under contention, but fewer MACs than trial 0 (0.5 ms)
    assert not within(found[2], budget, found)  # more MACs than any stable trial within the budget


# --------------------------------------------------------------------------- the report's wording


def model(acc, latency_ms, support=(20, 20), cka=None, contention=None):
    right = round(acc * sum(support))
    return ModelResult(name="m", params=1000, size_bytes=4000, flops=2000, macs=1000, test_acc=acc, macro_f1=acc,
                       ece=0.1, roc_auc=None, per_class={"precision": [0.5, 0.5], "recall": [0.5, 0.5],
                       "f1": [0.5, 0.5], "support": list(support)}, confusion=[[right, 0], [0, 0]],
                       latency_ms=latency_ms, latency_repeats=25, images_per_s=1000 / latency_ms,
                       latency_threads=1, latency_contention=contention,
                       cka={"penultimate": cka} if cka is not None else {})  # fmt: skip


def results(teacher, student, baseline, history=None, val_acc=0.9) -> RunResults:
    models = {"teacher": teacher, "student": student, "baseline": baseline}
    for m in models.values():
        m.speedup = m.images_per_s / teacher.images_per_s
        m.latency_speedup = teacher.latency_ms / m.latency_ms
    stages = {s: StageResult(2, val_acc if s == "teacher" else 0.9, 1.0, history or []) for s in models}
    return RunResults(dataset="d", num_classes=2, class_names=["a", "b"], class_counts={"val": [20, 20]},
                      device="cpu", processes=1, precision="32", seed=0, eval_batch_size=4, torch_threads=1,
                      models=models, stages=stages, **evaluate.comparison(models))  # fmt: skip


def test_a_slower_student_is_called_slower():
    text = "\n".join(report.verdict(results(model(0.9, 1.0), model(0.9, 1.1, cka=0.5), model(0.9, 1.0, cka=0.5))))
    assert "1.1x slower at batch 1 with 1 thread" in text and "lower latency" not in text
    assert "1.1x lower throughput (slower)" in text


def test_all_models_at_chance_are_named_not_called_a_retention():
    text = "\n".join(report.verdict(results(model(0.5, 1.0), model(0.5, 0.1, cka=0.5), model(0.5, 0.1, cka=0.5))))
    assert "**At chance**" in text and "chance (0.5000" in text and "say nothing" in text


def test_a_gain_of_one_or_two_test_images_is_called_no_difference():
    one = results(model(0.9, 1.0), model(0.925, 0.1, cka=0.5), model(0.9, 0.1, cka=0.5))
    assert "(+1 of 40 test images; within 1 test image: no difference to act on)" in "\n".join(report.verdict(one))
    many = results(model(0.9, 1.0), model(0.975, 0.1, cka=0.5), model(0.9, 0.1, cka=0.5))
    assert "(+3 of 40 test images)" in "\n".join(report.verdict(many))


def test_a_nan_cka_is_unavailable_and_contention_is_said(tmp_path):
    teacher = model(0.9, 1.0, contention="rounds range 1-100 ms (100.0x, over 1.5x)")
    metrics = results(teacher, model(0.9, 0.1, cka=float("nan")), model(0.9, 0.1, cka=0.5))
    report.write_report(tmp_path, metrics, [])
    md = (tmp_path / "report.md").read_text()
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    assert "penultimate features unavailable (constant or non-finite features)" in md
    assert "latency measured under contention (teacher: rounds range 1-100 ms" in md
    # metrics.json holds null for the NaN: the report rebuilt from it says the same
    again = RunResults.load(tmp_path / "metrics.json")
    assert "unavailable" in "\n".join(report.verdict(again))


def test_a_diverged_stage_and_a_teacher_at_chance_are_warned_of_in_the_report():
    exploded = [{"loss/total": 2.3, "val/acc": 0.5}, {"loss/total": 1e11, "val/acc": 0.5}]
    text = "\n".join(report.verdict(results(model(0.9, 1.0), model(0.9, 0.1), model(0.9, 0.1), exploded, 0.5)))
    assert "student: training diverged: the loss is 1e+11" in text and "trainer.optimizer.lr ten times smaller" in text
    assert "teacher: the teacher is at chance (validation accuracy 0.500, chance 0.500)" in text


# --------------------------------------------------------------------------- health and estimates


def test_divergence_and_a_teacher_at_chance_are_named_with_their_fix():
    assert health.divergence_check([{"loss/total": 2.3}, {"loss/total": 0.9}], "student") is None
    assert "teacher.optimizer.lr ten times smaller" in health.divergence_check([{"loss/total": 3e11}], "teacher")
    assert "trainer.optimizer.lr" in health.divergence_check([{"loss/total": 2.0}, {"loss/total": 500.0}], "baseline")
    assert health.teacher_check("teacher", 0.95, [20, 20], 2) is None
    warning = health.teacher_check("teacher", 0.52, [20, 20], 2)  # e.g. teacher.label_smoothing=0.999
    assert "at chance" in warning and "teacher.label_smoothing" in warning


def test_the_run_estimate_scales_the_students_by_their_cost(caplog):
    estimate = health.RunEstimate(teacher_epochs=3, student_epochs=100000, relative=0.01, online=False)
    with caplog.at_level(logging.INFO):
        estimate(0, {"epoch_time_s": 10.0}, None)
        estimate(1, {"epoch_time_s": 10.0}, None)  # once per run
    lines = [r.getMessage() for r in caplog.records if "run estimate" in r.getMessage()]
    # teacher: 2 more x 10 s; students: 2 x 100000 x 10 s x 0.01 = 20000 s; replayed outputs: 10/3 s
    assert len(lines) == 1 and lines[0].startswith("run estimate: about 5.6 h more") and "estimate" in lines[0]
    assert health.eta("student", 1, 100000, 0.5).startswith("student: ETA about 13.9 h for the 99999 epoch(s)")


# --------------------------------------------------------------------------- report.md last


def test_report_md_is_written_atomically_and_after_everything_else(tmp_path, monkeypatch):
    from distill_runner import runner
    from distill_runner.reporting import plots

    metrics = results(model(0.9, 1.0), model(0.9, 0.1, cka=0.5), model(0.8, 0.1, cka=0.5))
    monkeypatch.setattr(plots, "save_side_by_side", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        report.write_report(tmp_path, metrics, [])
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / "report.md").exists()  # not taken for finished
    monkeypatch.undo()
    written = []
    monkeypatch.setattr(report, "atomic_write_text", lambda path, text: written.append(path.name))
    report.write_report(tmp_path, metrics, [])
    assert written == ["report.md"]
    # the runner writes TensorBoard first, then the run folder's files with report.md last
    order = []
    monkeypatch.setattr(runner.tensorboard, "write_tensorboard", lambda *a: order.append("tensorboard"))
    monkeypatch.setattr(runner, "write_report", lambda *a: order.append("report") or "table")
    for name in ("recipe_name", "run_name", "hparams"):
        monkeypatch.setattr(runner.tensorboard, name, lambda *a: "x")
    ctx = SimpleNamespace(spec=None, tb_dir=tmp_path / "tb", run_dir=tmp_path)
    runner.report(ctx, SimpleNamespace(recipe=SimpleNamespace(terms={})), metrics, [])
    assert order == ["tensorboard", "report"]
