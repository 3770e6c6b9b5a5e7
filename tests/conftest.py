from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distill_runner.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
# a recipe YAML's `# quickstart overrides:` line, for the tests that run every recipe on the quickstart pair
from recipe_confs import quickstart_overrides  # noqa: F401

# A run that takes seconds: tiny images, a few dozen of them, one epoch per stage.
TINY = [
    "dataset.image_size=16",
    "dataset.crop_padding=2",  # the digits' augmentation before the 8 px quickstart: tests exercise replayed views
    "dataset.limit=48",
    "dataset.batch_size=16",
    "dataset.eval_batch_size=16",
    "teacher.epochs=1",
    "trainer.epochs=1",
    "trainer.progress=false",
    # the speed columns at the smallest budgets (5 rounds of 5 runs still): timing every tiny run at the
    # defaults (0.5 s latency + 1 s throughput per model) cost minutes of the suite
    "eval.latency_budget_s=0.02",
    "eval.throughput_budget_s=0.02",
]
# TINY for the image-folder data sets (chest X-ray, ImageFolder), whose augmentation has other keys
TINY_IMAGES = [o for o in TINY if not o.startswith("dataset.crop_padding")]


def compose_config(overrides: list[str] | None = None, experiment: str | None = None):
    overrides = list(overrides or [])
    if experiment is not None:
        overrides.insert(0, f"experiment={experiment}")
    return compose(overrides)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, saying why, where CUDA is not available (CI runs on CPUs)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    return lambda extra=(): compose_config(TINY + list(extra))


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Relative paths (outputs/, the cache, data roots) land in the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """Overrides for a seconds-long run: a saved untrained teacher, used as loaded."""
    from distill_runner.build import build_data, build_teacher

    cfg = compose_config(TINY)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_teacher(cfg.teacher, "teacher", build_data(cfg), cfg.seed).state_dict(), path)
    return [*TINY, "teacher.epochs=0", f"teacher.checkpoint={path}", "cache.enabled=false"]


def reference_cases(method: str) -> dict[str, dict]:
    """The official code's reference values for ``method`` (tests/reference/<method>.json), by case name."""
    reference = json.loads((Path(__file__).parent / "reference" / f"{method}.json").read_text())
    return {case["name"]: case for case in reference["cases"]}


def reference_inputs(case: dict):
    """A reference case's ``(batch, student outputs, teacher outputs)``; the student logits take gradients."""
    student = torch.tensor(case["student_logits"], dtype=torch.float32, requires_grad=True)
    teacher = torch.tensor(case["teacher_logits"], dtype=torch.float32)
    return {"target": torch.tensor(case["target"])}, {"logits": student}, {"logits": teacher}
