"""Today's numbers, pinned before the recipe-layer refactor (issue 13): they must not move.

- per-batch loss terms of every shipped recipe on fixed inputs (tiny digits, seeded models), at the
  first epoch and mid-schedule, plus a few variants (sample weighting, class balance);
- every recipe's one-epoch end-to-end run (loss per term, accuracies);
- the quickstart at seed 0 on a short schedule (accuracies of the three models).

Reference values live in ``tests/pinned/*.json``, recorded from the code as it was (commit named in
the file) with ``PIN_RECORD=1 python -m pytest tests/e2e/test_pinned_behaviour.py``. Only the adapter
functions below may change when the code moves; the reference values and assertions may not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config

PINNED = Path(__file__).resolve().parents[2] / "tests" / "pinned"
RECORD = os.environ.get("PIN_RECORD") == "1"
CONF = Path(__file__).resolve().parents[2] / "conf"
# the recipes that existed when these values were pinned (before the one-contract refactor); later
# recipes are pinned to the official code instead (tests/test_ref_*.py)
RECIPES = ["attention", "balanced", "combo", "dkd", "feature", "kd", "multi_teacher", "self"]
VARIANTS = {
    **{r: [f"distill={r}"] for r in RECIPES},
    # pinned with dkd's former warm-up (10% of training; mdistiller's 20 of 240 epochs since)
    "dkd": ["distill=dkd", "distill.schedule.dkd.ramp=0.1"],
    # pinned with attention transfer's former weight (the paper's 1000; 10 since it was tuned on validation)
    "attention": ["distill=attention", "distill.terms.attention.weight=1000.0"],
    "combo": ["distill=combo", "distill.terms.attention.weight=1000.0"],
    "combo_teacher_confidence": [
        "distill=combo",
        "distill.sample_weighting=teacher_confidence",
        "distill.terms.attention.weight=1000.0",
    ],
    "balanced_inverse_frequency": ["distill=balanced", "distill.class_balance=inverse_frequency"],
    "kd_t1_alpha0.9": ["distill=kd", "distill.temperature=1.0", "distill.alpha=0.9"],
    "dkd_ce_weighted": [
        "distill=dkd",
        "distill.terms.ce.weight=0.5",
        "distill.beta=2.0",
        "distill.schedule.dkd.ramp=0.1",
    ],
}


# ------------------------------------------------------------------ adapters (the only code that may change)


def recipe_losses(cfg, batches: int = 2, epochs: int = 10, at_epochs=(0, 5)) -> dict:
    """{f"epoch{e}/batch{i}": {term: value}} for the run's recipe on the first training batches."""
    from distill_runner.build import build_data, build_model, build_recipe, build_teacher
    from distill_runner.distill import signals
    from distill_runner.models.features import FeatureTap

    data = build_data(cfg, torch.device("cpu"))
    student = build_model(cfg.student, "student", data, cfg.seed)
    recipe = build_recipe(cfg, data, student)
    teachers = [build_teacher(cfg.teacher, "teacher", data, cfg.seed)]
    for key, node in signals.extra_teachers(cfg.distill).items():
        teachers.append(build_teacher(node, key, data, cfg.seed))
    weights = signals.teacher_weights(cfg.distill)
    signal = signals.online_signal(teachers, weights, recipe.teacher_layers).to(torch.device("cpu"))
    tap = FeatureTap(student, recipe.student_layers)
    student.train()
    recipe.train()
    out = {}
    for epoch in at_epochs:
        recipe.set_epoch(epoch, epochs)
        for i, batch in zip(range(batches), data.train):
            torch.manual_seed(0)
            with torch.no_grad():
                terms = recipe(batch, tap(batch["image"]), signal(batch) if recipe.needs_teacher else None)
            out[f"epoch{epoch}/batch{i}"] = {k: float(v) for k, v in terms.items()}
    tap.remove()
    return out


def run_summary(metrics) -> dict:
    """Accuracies and per-term training losses of a finished run."""
    stages = {role: metrics.stages[role] for role in ("teacher", "student", "baseline")}
    return {
        "test_acc": {role: metrics.models[role].test_acc for role in ("teacher", "student", "baseline")},
        "losses": {
            stage: {k: v for k, v in s.history[-1].items() if k.startswith("loss/")}
            for stage, s in stages.items()
            if s.history
        },
    }


# Pinned with the online teacher: since issue 18 these recipes replay their teacher outputs by default,
# stored as float16, which moves combo's one-epoch KD loss by 1.9e-4 (> rel 1e-4; float32 storage repeats
# the pins exactly, and tests/unit/distill/test_replay_recipes.py checks replayed against online per batch).
PINNED_ONLINE = ("distill=feature", "distill=attention", "distill=combo")


def run(overrides, tmp_path):
    from distill_runner import runner

    if any(o in PINNED_ONLINE for o in overrides):
        overrides = [*overrides, "+distill.teacher_outputs=online"]
    return runner.run(compose_config(overrides), tmp_path)


# ------------------------------------------------------------------ the checks


def _check(name: str, got: dict, rel: float = 1e-5, acc_abs: float = 0.0) -> None:
    path = PINNED / f"{name}.json"
    if RECORD:
        path.parent.mkdir(exist_ok=True)
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**old, **got}, indent=1, sort_keys=True) + "\n")
        return
    expected = json.loads(path.read_text())
    for key, value in got.items():
        assert key in expected, f"{key} was not pinned"
        _close(expected[key], value, rel, acc_abs, key)


def _close(expected, got, rel, acc_abs, where):
    if isinstance(expected, dict):
        assert set(got) == set(expected), f"{where}: keys {sorted(got)} != pinned {sorted(expected)}"
        for k in expected:
            _close(expected[k], got[k], rel, acc_abs, f"{where}/{k}")
    elif "test_acc" in where:
        assert got == pytest.approx(expected, abs=acc_abs + 1e-9), where
    else:
        assert got == pytest.approx(expected, rel=rel, abs=1e-7), where


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_per_batch_losses_of_every_recipe(variant):
    extra = ["distill.teachers.cnn.epochs=1"] if variant == "multi_teacher" else []
    cfg = compose_config(TINY + VARIANTS[variant] + extra)
    _check("per_batch_losses", {variant: recipe_losses(cfg)})


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    from distill_runner.build import build_data, build_teacher

    cfg = compose_config(TINY)
    data = build_data(cfg)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_teacher(cfg.teacher, "teacher", data, cfg.seed).state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_one_epoch_run_of_every_recipe(recipe, saved_teacher, tmp_path):
    extra = ["distill.teachers.cnn.epochs=1"] if recipe == "multi_teacher" else []
    overrides = (
        TINY
        + ["teacher.epochs=0", f"teacher.checkpoint={saved_teacher}", *VARIANTS[recipe], "cache.enabled=false"]
        + extra
    )
    _check("one_epoch_runs", {recipe: run_summary(run(overrides, tmp_path))}, rel=1e-4)


@pytest.mark.slow
def test_quickstart_short_schedule_seed_0(tmp_path):
    """The quickstart (digits, ResNet-18 -> tiny CNN, Hinton KD) at 16 px, teacher 1 epoch, students 2, with the
    data and teacher settings it had when this was pinned."""
    overrides = [
        "seed=0",
        "dataset.image_size=16",
        "dataset.crop_padding=2",
        "dataset.batch_size=32",
        "teacher.optimizer.lr=1e-3",
        "teacher.optimizer.weight_decay=5e-4",
        "teacher.epochs=1",
        "teacher.label_smoothing=0",
        "trainer.epochs=2",
        "trainer.progress=false",
        "cache.enabled=false",
    ]
    # accuracies within one test image (360 images): CPUs may differ in the last bits of a sum
    _check("quickstart", {"short_schedule": run_summary(run(overrides, tmp_path))}, rel=1e-3, acc_abs=1 / 360)
