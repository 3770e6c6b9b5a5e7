"""A small distill-search, shared by the search tests (tests/unit/search) and the scaling-out ones (tests/e2e): 4
one-epoch trials of tiny CNNs on 16 px digits, no final retraining; the search config is written to the test's
folder (found through hydra.searchpath)."""

from __future__ import annotations

from pathlib import Path

import yaml

# Seconds-long trials: 16 px digits, a few hundred images, 1 epoch, a 1-epoch teacher; latency timed briefly.
SMALL = [
    "dataset.image_size=16",
    "dataset.limit=400",
    "dataset.batch_size=8",
    "dataset.eval_batch_size=64",
    "teacher=wide_cnn",  # a small teacher, trained for 1 epoch
    "teacher.epochs=1",
    "trainer.epochs=1",
    "trainer.progress=false",
    "eval.latency_budget_s=0.02",
    "eval.throughput_budget_s=0.05",
]
SPACE = {
    "trials": 4,
    "trial_epochs": None,
    "objective": None,
    "budget": {"latency_ms": None, "params": None, "macs": None},
    "space": {
        "student.model.channels": {"choices": [[4, 8], [8, 16]]},
        "distill.temperature": {"low": 1.0, "high": 8.0},
    },
    "enqueue": [],
    "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 0},
    "pruner": {"_target_": "optuna.pruners.NopPruner"},
    "storage": None,
    "study_name": "distill-search",
    "workers": 1,
    "role": "main",
    "worker": 0,
    "final": False,
    "int8": False,
    "int8_calibration_images": 32,
}


def write_search(conf_dir: Path, name: str, search: dict) -> str:
    """A search config of the user's own (conf_dir/search/<name>.yaml); returns the override that finds it."""
    (conf_dir / "search").mkdir(parents=True, exist_ok=True)
    (conf_dir / "search" / f"{name}.yaml").write_text(yaml.safe_dump(search))
    return f"hydra.searchpath=[file://{conf_dir}]"


def search_config(conf_dir: Path, **changes) -> list[str]:
    """Overrides naming a search config of the test's own (``search=small`` under ``conf_dir``)."""
    return [write_search(conf_dir, "small", {**SPACE, **changes}), "search=small"]


def trials(url: str, study: str, *states: str) -> list:
    import optuna

    if study not in [s.study_name for s in optuna.get_all_study_summaries(url)]:
        return []
    found = optuna.load_study(study_name=study, storage=url).get_trials()
    return [t for t in found if not states or t.state.name in states]
