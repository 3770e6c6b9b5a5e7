"""The run in TensorBoard's ``tb/`` folder: final numbers, HParams, confusion figures, the report.

The HParams dashboard ticks by default the first five hyperparameters of the experiment summary
(those marked ``differs`` first, then by name) and its first five metrics, in order. So the summary
declares what people compare (recipe, temperature, alpha, student, seed; the student's accuracy,
the KD gain, the retention) as those, never plumbing (``cache.NOT_RESULTS``), and every run
declares the same metric names: the dashboard reads the declaration of one run only.

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import math
import os

from distill_runner.io.cache import NOT_RESULTS
from distill_runner.reporting.results import EXTRA_TEACHER, ROLES, STUDENTS, RunResults
from distill_runner.spec import RunSpec, typed

# Ticked by default in the HParams table: at most five are (the dashboard's limit).
HEADLINE_HPARAMS = ("recipe", "distill.temperature", "distill.alpha", "student", "seed")
MODEL_METRICS = ("acc", "macro_f1", "ece", "roc_auc", "latency_ms", "images_per_s", "macs", "params", "size_bytes",
                 "speedup")  # fmt: skip
# Final validation accuracy per stage: what a sweep (the summary, the Optuna sweeper) chooses on.
VAL_METRICS = ("val/student_acc", "val/baseline_acc", "val/teacher_acc")
# Declared in this order by every run, whatever models it has; the first five are ticked.
METRICS = (
    "test/student_acc", "test/kd_gain", "test/retention", "test/baseline_acc", "test/teacher_acc",
    *VAL_METRICS,
    "test/student_cka", "test/baseline_cka",
    *(f"test/{role}_{key}" for role in ("student", "baseline", "teacher") for key in MODEL_METRICS if key != "acc"),
)  # fmt: skip
# Named in every run name, shortened.
SHORT = {"distill.temperature": "T", "distill.alpha": "alpha"}


def final_scalars(metrics: RunResults) -> dict[str, float]:
    """The run's final numbers as ``test/...`` tags (extra teachers: ``test/teacher_<name>_...``)."""
    out = {}
    for role, m in metrics.models.items():
        tag = role if role in ROLES else "teacher_" + role.removeprefix(EXTRA_TEACHER)
        for key in MODEL_METRICS:
            out[f"test/{tag}_{key}"] = getattr(m, "test_acc" if key == "acc" else key)
        if role in STUDENTS:
            out[f"test/{role}_cka"] = m.cka.get("penultimate")
    out.update({"test/retention": metrics.retention, "test/kd_gain": metrics.kd_gain})
    out.update({f"val/{role}_acc": stage.final_val_acc for role, stage in metrics.stages.items() if role in ROLES})
    for fmt in ("onnx", "torchscript"):
        for role, export in metrics.exports.items():
            e = export.get(fmt, {})
            out[f"export/{role}_{fmt}_max_abs_diff"], out[f"export/{role}_{fmt}_acc"] = (
                e.get("max_abs_diff"),
                e.get("test_acc"),
            )
    return {k: float(v) for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def plumbing(key: str) -> bool:
    """Where or how fast, never what: left out of the HParams table."""
    return key.startswith("hydra.") or any(key == p or key.startswith(p + ".") for p in NOT_RESULTS)


def recipe_name(terms, overrides: list[str]) -> str:
    """The ``distill`` option (kd, dkd, ...) as chosen, else the recipe's term names (ce+kd)."""
    return _choice("distill", overrides) or "+".join(terms)


def _choice(group: str, overrides: list[str]) -> str | None:
    """The option of a config group: Hydra's record of the run, else the overrides."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice is not None:
            return choice
    return next((o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") == group), None)


def _select(values: dict, path: str, default=None):
    """The value at the dotted ``path`` in plain config values, else ``default``."""
    for name in path.split("."):
        if not isinstance(values, dict) or name not in values:
            return default
        values = values[name]
    return values


def run_name(spec: RunSpec, overrides: list[str], recipe: str) -> str:
    """A readable name for the run: experiment (else data set), recipe, T and alpha, the other
    overrides that change results, e.g. ``quickstart kd T=4 alpha=0.5 seed=1``."""
    values = typed(spec).as_dict()  # SHORT's keys are the recipe's own (not declared by the schema)
    parts = [_choice("experiment", overrides) or str(_select(values, "dataset.name", "run")), recipe]
    for key, short in SHORT.items():
        value = _select(values, key)
        if value is not None:
            parts.append(f"{short}={value:g}" if isinstance(value, (int, float)) else f"{short}={value}")
    named = {}  # a key given twice: Hydra uses the last value
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key not in ("experiment", "distill", *SHORT) and not plumbing(key):
            named[key] = value
    return " ".join(parts + [f"{k}={v}" for k, v in named.items()])


def hparams(spec: RunSpec, results: RunResults, recipe: str, name: str) -> dict:
    """The HParams columns: the headline ones first, then every config value that is not plumbing."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not str(k).startswith("_") and not plumbing(f"{prefix}{k}"):
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(typed(spec).as_dict(), "")
    teacher = results.models.get("teacher")
    named = {"recipe": recipe, "student": results.models["student"].name, "run": name,
             "teacher": teacher.name if teacher is not None else "none"}  # fmt: skip
    headline = {k: named.get(k, flat.get(k)) for k in HEADLINE_HPARAMS}
    return {**{k: v for k, v in headline.items() if v is not None}, **named, **flat}


def hparams_summaries(hparams: dict, group: str) -> list:
    """The experiment, session-start and session-end summaries (``summary.hparams``), with the
    headline hyperparameters marked to be ticked and the session named ``group``."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    summaries = hparams_summary(hparams, dict.fromkeys(METRICS, 0.0))
    exp, ssi = (HParamsPluginData.FromString(s.value[0].metadata.plugin_data.content) for s in summaries[:2])
    for info in exp.experiment.hparam_infos:
        info.differs = info.name in HEADLINE_HPARAMS  # the dashboard ticks these first
    ssi.session_start_info.group_name = group  # the name in the table instead of the run folder's
    for summary, data in zip(summaries, (exp, ssi)):
        summary.value[0].metadata.plugin_data.content = data.SerializeToString()
    return list(summaries)


def write_tensorboard(
    tb_dir: str | os.PathLike,
    metrics: RunResults,
    hparams: dict,
    overrides: list[str],
    name: str | None = None,
) -> None:
    """Into ``tb_dir`` itself: the run's hyperparameters and final numbers (HParams, the session
    named ``name`` and the run folder), a confusion matrix image per model (``confusion/<model>``)
    and the report as text (``report``)."""
    from pathlib import Path

    from torch.utils.tensorboard import SummaryWriter

    from distill_runner.reporting.report import confusions, render_markdown

    run_dir = Path(tb_dir).resolve().parent  # Hydra's run folder tells repeats of one setting apart
    job = run_dir.name.split("_", 1)[0].isdigit()  # a sweep job: 3, or 3_T=4,alpha=0.5
    folder = f"{run_dir.parent.name}/{run_dir.name}" if job else run_dir.name
    name = name or hparams.get("run") or folder
    with SummaryWriter(tb_dir) as writer:
        for role, image in confusions(metrics).items():
            writer.add_image(f"confusion/{role}", image, dataformats="HWC")
        writer.add_text("report", render_markdown(metrics, overrides))
        writer.add_text("run", name)
        for summary in hparams_summaries(hparams, f"{name} ({folder})"):
            writer.file_writer.add_summary(summary)
        for tag, value in final_scalars(metrics).items():
            writer.add_scalar(tag, value)
