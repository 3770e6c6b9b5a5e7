"""The end of a search: the best student within budget by validation accuracy (the test split is never
looked at to choose), run as a normal distill-run (trained with ``trainer.epochs`` unless its trial already
was, tested next to the teacher and the scratch baseline, exported with the parity check), and int8.

Docs: docs/guide/search.md
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

from distill_runner.config import compose, validate
from distill_runner.errors import ConfigError
from distill_runner.io import storage
from distill_runner.search import study as studies
from distill_runner.search_spec import SearchSpec

log = logging.getLogger(__name__)


def trial_row(t) -> dict:
    """What the report and the choice read of one trial (pruned: its last validation accuracy)."""
    per_epoch = t.user_attrs.get("val_acc_per_epoch", [])
    acc = t.user_attrs.get("val_acc", per_epoch[-1] if per_epoch else None)
    return {"number": t.number, "state": t.state.name, "overrides": t.user_attrs.get("overrides", []),
            "epochs": t.user_attrs.get("epochs"), "folder": t.user_attrs.get("folder"), "val_acc": acc,
            **(t.user_attrs.get("cost") or {})}  # fmt: skip


def rows(study) -> list[dict]:
    return [trial_row(t) for t in study.get_trials(deepcopy=False) if t.state.name in (*studies.FINISHED, "FAIL")]


def within(row: dict, budgets: dict, trials: list[dict] = ()) -> bool:
    """Whether ``row`` meets every budget. A latency measured under contention is not trusted: the trial is then
    judged on MACs (:func:`latency_by_macs`) against the stable measurements among ``trials``."""
    for key, limit in budgets.items():
        if key not in row:
            return False
        if key == "latency_ms" and row.get("latency_contention"):
            if not latency_by_macs(row, limit, trials):
                return False
        elif row[key] > limit:
            return False
    return True


def latency_by_macs(row: dict, limit: float, trials: list[dict]) -> bool:
    """Within the latency budget when a trial with at least as many MACs had a stable latency within it."""
    return any(not o.get("latency_contention") and o.get("latency_ms", math.inf) <= limit
               and o.get("macs", -1) >= row.get("macs", math.inf) for o in trials)  # fmt: skip


def budget_note(ok: list[dict], budgets: dict) -> str | None:
    """How the latency budget was checked, when some latency was measured under contention."""
    contended = [r["number"] for r in ok if r.get("latency_contention")]
    if "latency_ms" not in budgets or not contended:
        return None
    return (f"latency budget checked on MACs for trials {contended} (their latency was measured under contention: "
            "within it when a trial with at least as many MACs had a stable latency within it); on the stable "
            "measured latency for the others")  # fmt: skip


def student_text(row: dict) -> str:
    chosen = [o for o in row["overrides"] if o.startswith("student")]
    return " ".join(chosen) or "the configured student"


def choose(study, search: SearchSpec, full_epochs: int) -> dict:
    """The complete trial with the best validation accuracy within every budget (ties: the cheaper)."""
    trials = rows(study)
    complete = [r for r in trials if r["state"] == "COMPLETE" and r["val_acc"] is not None and "params" in r]
    if not complete:
        states = studies.counts(study)
        fix = f"no trial finished ({states}); see trials/*/ and distill-search*.log, then run again in this folder"
        raise ConfigError("search.trials", search.trials, fix)
    budgets = search.budgets()
    ok = [r for r in complete if within(r, budgets, trials)]
    if not ok:
        key, limit = next(iter(budgets.items()))
        smallest = min((r for r in trials if key in r), key=lambda r: r[key])
        fix = (f"no student tried meets it; the smallest tried is trial {smallest['number']} "
               f"({student_text(smallest)}) at {smallest['latency_ms']:.3f} ms batch-1 latency, "
               f"{smallest['params']:,} params, {smallest['macs']:,} MACs; raise the budget or add smaller students "
               "to search.space")  # fmt: skip
        raise ConfigError(f"search.budget.{key}", limit, fix)
    best, tie_note = best_of(ok, search.objective or "latency_ms")
    best["notes"] = [n for n in (tie_note, budget_note(ok, budgets)) if n]
    best["shortened"] = (best["epochs"] or full_epochs) < full_epochs
    log.info("chosen: trial %d (%s), val acc %.4f", best["number"], " ".join(best["overrides"]), best["val_acc"])
    for note in best["notes"]:
        log.info("%s", note)
    return best


def best_of(ok: list[dict], cheaper: str) -> tuple[dict, str | None]:
    """The best validation accuracy; ties go to the cheaper by ``cheaper``, by MACs when that is a latency
    measured under contention. Returns the trial and, when there was a tie, what broke it."""
    top = max(r["val_acc"] for r in ok)
    tied = [r for r in ok if r["val_acc"] == top]
    if cheaper == "latency_ms" and any(r.get("latency_contention") for r in tied):
        cheaper, why = "macs", " (a tied trial's latency was measured under contention)"
    else:
        why = ""
    best = min(tied, key=lambda r: r[cheaper])
    if len(tied) == 1:
        return best, None
    return best, f"{len(tied)} trials tie on validation accuracy {top:.4f}; broken on {cheaper}{why}"


def finish(chosen: dict, search: SearchSpec, base: list[str], full_epochs: int, search_dir: Path) -> dict:
    """The chosen student as a distill-run in ``final-<trial>/``: trained fully (or its finished trial's
    weights loaded), tested, exported (ONNX, TorchScript, parity checked), and int8 when asked."""
    from distill_runner import runner

    number = chosen["number"]
    final_dir = search_dir / f"final-{number:04d}"
    extra = ["export=onnx", "trainer.resume=auto", "trainer.progress=false"]
    overrides = [*[o for o in base if o not in extra], *chosen["overrides"], *extra]
    trial_dir = Path(chosen.get("folder") or search_dir / "trials" / f"{number:04d}")
    reused = not chosen["shortened"] and copy_finished_student(trial_dir, final_dir)
    what = "its trial's weights (trained as long)" if reused else f"retrained with trainer.epochs={full_epochs}"
    log.info("final: trial %d as a distill-run in %s, %s", number, final_dir, what)
    spec = validate(compose(overrides))
    results = runner.run(spec, final_dir, overrides)
    student = results.models["student"]
    outcome = {
        "folder": final_dir.name,
        "command": "distill-run " + " ".join(o for o in overrides if o != "trainer.resume=auto"),
        "retrained": not reused,
        "epochs": full_epochs,
        "test_acc": student.test_acc,
        "latency_ms": student.latency_ms,
        "params": student.params,
        "macs": student.macs,
        "baseline_test_acc": results.models["baseline"].test_acc,
        "teacher_test_acc": results.models["teacher"].test_acc if "teacher" in results.models else None,
        "export": results.exports.get("student"),
    }
    if search.int8:
        from distill_runner.search.int8 import quantize

        onnx_path = (outcome["export"] or {}).get("onnx", {}).get("path")
        outcome["int8"] = quantize(final_dir / onnx_path if onnx_path else None, spec, final_dir / "export",
                                   search.int8_calibration_images)  # fmt: skip
    return outcome


def copy_finished_student(trial_dir: Path, final_dir: Path) -> bool:
    """A trial that trained as long as the final run would: its finished student (weights, record and
    their checksums) goes into the final run folder, which then loads it instead of training it again."""
    files = [trial_dir / "checkpoints" / f for f in ("student.pt", "student.json")]
    try:
        if not all(storage.verify(p) for p in files):
            return False
    except storage.DamagedFile as exc:
        log.warning("trial's student is damaged (%s): the final run trains it again", exc.reason)
        return False
    (final_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for path in files:
        for f in (path, storage.sidecar(path)):
            target = final_dir / "checkpoints" / f.name
            if not target.exists():
                shutil.copyfile(f, target.with_name(target.name + ".tmp"))
                target.with_name(target.name + ".tmp").replace(target)
    return True
