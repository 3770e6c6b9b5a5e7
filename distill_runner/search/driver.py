"""A search from start to end: check the space, fine-tune the teacher once, run trials (in this process
and ``search.workers - 1`` more sharing the study), then choose, retrain, export and report.

Docs: docs/guide/search.md
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_runner.config import compose
from distill_runner.errors import ConfigError
from distill_runner.io import storage
from distill_runner.search import space
from distill_runner.search import study as studies
from distill_runner.search.trial import prepare_teacher, run_trial
from distill_runner.search_spec import SearchSpec
from distill_runner.spec import RunSpec
from distill_runner.train import engine

log = logging.getLogger(__name__)


def base_overrides(task_overrides: list[str], entries: list[space.Entry]) -> list[str]:
    """The user's distill-run overrides a trial starts from: no search.* key, none the space sets."""
    keys = {e.key for e in entries}
    out = []
    for item in task_overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key == "search" or key.startswith("search.") or key in keys:
            continue
        out.append(item)
    return out


def search(spec: RunSpec, search_dir: Path, task_overrides: list[str], hydra_overrides: list[str] = ()) -> dict | None:
    """Run (or resume) the search in ``search_dir``; the main process returns best.json's content. ``spec``: the
    distill-search config, validated once (:func:`distill_runner.config.validate`: the search node and its
    space too). ``hydra_overrides`` (e.g. ``hydra.searchpath`` naming the user's own search configs) reach
    the workers."""
    node = spec.search
    entries = space.entries(node.space)
    base = base_overrides(task_overrides, entries)
    space.check(entries, base, compose)
    study, twin = studies.studies(node, search_dir)
    studies.enqueue_requested(study, node, entries)
    if existing := len(study.get_trials(deepcopy=False)):
        log.info("the study holds %d trials already (%s): resuming it", existing, studies.counts(study))
    studies.recover_orphans(study, twin)
    main = node.role == "main" and node.worker == 0  # a launcher sweeping search.worker: job 0 is main
    if main:
        # resume=auto: a search run again in its folder continues there (and must keep the distill-run config)
        teacher = prepare_teacher(
            compose(base + ["trainer.progress=false", "trainer.resume=auto"]), search_dir / "teacher"
        )
        storage.atomic_write_text(search_dir / "teacher.json", json.dumps(teacher, indent=2))
    workers = start_workers(node.workers - 1, search_dir, [*hydra_overrides, *task_overrides]) if main else []
    trials = Trials(study, twin, node, entries, base, node.trial_epochs or spec.trainer.epochs, search_dir)
    try:
        optimize(trials, workers)
    except KeyboardInterrupt:
        interrupt(workers)  # Ctrl-C reaches them too; a SIGINT sent to this process alone does not
        raise
    finally:
        failed = [w.wait() for w in workers]
    if any(failed):
        log.warning("%d of %d worker processes failed (see distill-search-worker*.log, *.err)", sum(map(bool, failed)),
                    len(workers))  # fmt: skip
    if not main:
        return None
    from distill_runner.search import final, report

    chosen = final.choose(study, node, spec.trainer.epochs)
    outcome = final.finish(chosen, node, base, spec.trainer.epochs, search_dir) if node.final else {}
    return report.write(study, node, chosen, outcome, search_dir)


def start_workers(n: int, search_dir: Path, overrides: list[str]) -> list[subprocess.Popen]:
    """``n`` more processes running trials of the same study (each logs to distill-search-worker<i>.log)."""
    keep = ("hydra.run.dir", "hydra.output_subdir", "hydra.job.name", "search.worker=")  # each worker sets its own
    overrides = [o for o in overrides if not o.startswith(keep)]
    workers = []
    for i in range(1, n + 1):
        command = [sys.executable, "-m", "distill_runner.search", *overrides, "search.role=worker",
                   f"search.worker={i}", f"hydra.run.dir={search_dir.resolve()}", "hydra.output_subdir=null",
                   f"hydra.job.name=distill-search-worker{i}"]  # fmt: skip
        # errors to a file of its own: Ctrl-C reaches a worker still importing, whose traceback is no news
        with (search_dir / f"distill-search-worker{i}.err").open("ab") as errors:
            workers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors))
    if n:
        log.info("started %d worker processes sharing the study", n)
    return workers


def interrupt(workers: list[subprocess.Popen], grace_s: float = 60.0) -> None:
    """Stop the workers as Ctrl-C does (each fails its running trial and enqueues it again); one that has not
    stopped after ``grace_s`` is killed (its trial is retried on the next start too)."""
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for w in workers:
        try:
            w.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()


@dataclass
class Trials:
    """The trials this process runs: Optuna's objective (one trial, trained and measured, pruned through its
    twin in the pruning study) and what every trial shares."""

    study: Any
    twin: Any  # the pruning study
    search: SearchSpec
    entries: list[space.Entry]
    base: list[str]  # the distill-run overrides every trial starts from
    epochs: int
    search_dir: Path

    def __call__(self, trial) -> float | tuple[float, float]:
        twin_trial, trial_overrides = self.start(trial)
        extra = [f"trainer.epochs={self.epochs}", "trainer.progress=false", "export=null"]
        cfg = compose([*self.base, *trial_overrides, *extra])
        found: dict = {}
        log.info("trial %d: %s", trial.number, " ".join(trial_overrides))
        folder = self.search_dir.resolve() / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("folder", str(folder))  # workers of a Hydra launcher each write under their own folder
        try:
            acc = run_trial(cfg, folder, self.measured(trial, found), self.pruning(trial, twin_trial))
        except studies.optuna().TrialPruned as exc:
            log.info("trial %d pruned: %s", trial.number, exc)
            raise
        except BaseException as exc:
            self.failed(trial, twin_trial, exc)
            raise
        self.twin.tell(twin_trial, acc)
        trial.set_user_attr("val_acc", acc)
        log.info("trial %d: val acc %.4f, %s", trial.number, acc, _cost_text(found))
        return acc if self.search.objective is None else (acc, found[self.search.objective])

    def start(self, trial) -> tuple[Any, list[str]]:
        """Record who runs ``trial`` and what it tries; its twin in the pruning study, and its overrides."""
        studies.mark(trial)
        trial.set_user_attr("val_acc_per_epoch", [])  # a retried trial starts with the attributes of the one it retries
        trial_overrides = space.overrides(space.sample(self.entries, trial))
        trial.set_user_attr("overrides", trial_overrides)
        trial.set_user_attr("epochs", self.epochs)
        twin_trial = self.twin.ask()
        trial.set_user_attr("twin", twin_trial.number)
        return twin_trial, trial_overrides

    def measured(self, trial, found: dict) -> Callable[[dict], None]:
        """The student's cost, before training: recorded, and each budget's excess told to the sampler."""
        budgets = self.search.budgets()

        def record(cost: dict) -> None:
            found.update(cost)
            trial.set_user_attr("cost", cost)
            studies.set_constraints(trial, {k: float(cost[k] - v) for k, v in budgets.items()})

        return record

    def pruning(self, trial, twin_trial) -> engine.EpochHook:
        """The epoch hook: each validation accuracy reported to the twin, whose pruner may stop the trial."""
        opt = studies.optuna()

        def on_epoch(epoch: int, record: dict, model) -> None:
            acc = record["val/acc"]
            twin_trial.report(acc, epoch)
            trial.set_user_attr("val_acc_per_epoch", [*trial.user_attrs.get("val_acc_per_epoch", []), acc])
            if twin_trial.should_prune():
                self.twin.tell(twin_trial, state=opt.trial.TrialState.PRUNED)
                raise opt.TrialPruned(f"validation accuracy {acc:.4f} after epoch {epoch + 1}")

        return on_epoch

    def failed(self, trial, twin_trial, exc: BaseException) -> None:
        """Why ``trial`` failed, its twin failed too; interrupted (Ctrl-C), its parameters are enqueued again."""
        opt = studies.optuna()
        trial.set_user_attr("failed_because", f"{type(exc).__name__}: {exc}".splitlines()[0])
        self.twin.tell(twin_trial, state=opt.trial.TrialState.FAIL, skip_if_finished=True)
        if isinstance(exc, KeyboardInterrupt):  # retried on the next start, as a killed trial is
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            log.info("trial %d interrupted: its parameters are enqueued again", trial.number)
            opt.logging.set_verbosity(opt.logging.ERROR)  # Optuna would log the KeyboardInterrupt's traceback


def optimize(trials: Trials, workers=()) -> None:
    """Run trials until the study holds ``search.trials`` finished ones (``workers``: this process's own)."""
    study, wanted = trials.study, trials.search.trials
    failures = 0
    while True:
        while studies.should_start(study, wanted):
            before = studies.counts(study).get("FAIL", 0)
            study.optimize(trials, n_trials=1, catch=(ConfigError, FloatingPointError))
            failures += studies.counts(study).get("FAIL", 0) - before
            if failures >= wanted:
                last = study.get_trials(deepcopy=False)[-1].user_attrs.get("failed_because", "?")
                fix = f"{failures} trials failed, the last: {last}; fix search.space (see distill-search*.log)"
                raise ConfigError("search.space", "failing trials", fix)
        if not wait_for_running(study, trials.twin, workers):
            return


def dead_workers(workers) -> set[int]:
    """The process ids of this process's workers that have ended. ``poll`` reaps them: an unreaped child (a
    zombie) still answers ``kill(pid, 0)``, so a worker killed mid-trial would look alive forever."""
    return {w.pid for w in workers if w.poll() is not None}


def wait_for_running(study, twin, workers=(), poll_s: float = 2.0) -> bool:
    """Wait for the trials this host's other live processes still run (other hosts' are left: the report
    covers the finished trials; running distill-search again in the folder updates it). True: a dead worker's
    trial was enqueued again, so more trials are wanted."""
    opt = studies.optuna()
    while True:
        if (dead := dead_workers(workers)) and studies.recover_orphans(study, twin, pids=dead):
            return True
        running = study.get_trials(deepcopy=False, states=(opt.trial.TrialState.RUNNING,))
        here = [t for t in running if studies.runs_here(t) is True and t.user_attrs["pid"] != os.getpid()]
        if not here:
            if running:
                log.info("%d trials still run elsewhere; the report covers the finished ones", len(running))
            return False
        time.sleep(poll_s)


def _cost_text(cost: dict) -> str:
    return f"{cost['latency_ms']:.3f} ms, {cost['macs']:,} MACs, {cost['params']:,} params" if cost else "no cost"
