"""The run's comparison: metrics.json, report.md (+ curves.png, confusion.png), TensorBoard and the
table printed at the end of a run.

Everything here is a function of :class:`~distill_runner.reporting.results.RunResults`, so
``distill-export`` can rewrite the report of a finished run from its metrics.json.

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distill_runner.io.storage import atomic_write_text
from distill_runner.reporting.results import ROLE_LABELS, STUDENTS, RunResults, label, model_order
from distill_runner.reporting.verdict import _gain_images, cka_text, export_line, num, verdict

MAX_CLASSES_IN_TABLES = 20  # larger confusion matrices only go to confusion.png and metrics.json


def count(n: float) -> str:
    """12.3G, 4.56M, 789k: multiply-adds and the like."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e8 else f"{n / 1e6:.0f} MB"


HEADER = [
    "model",
    "architecture",
    "parameters",
    "size",
    "MACs/image",
    "test acc",
    "macro-F1",
    "ECE",
    "latency",
    "images/s",
    "speed-up",
]


def comparison_rows(metrics: RunResults) -> list[list[str]]:
    rows = []
    for role in model_order(metrics.models):
        m = metrics.models[role]
        rows.append(
            [
                label(role),
                m.name,
                f"{m.params:,}",
                megabytes(m.size_bytes),
                count(m.macs),
                f"{m.test_acc:.4f}",
                num(m.macro_f1),
                num(m.ece, ".3f"),
                f"{m.latency_ms:.2f} ms",
                f"{m.images_per_s:,.0f}",
                "-" if m.speedup is None else f"{m.speedup:.1f}x",
            ]
        )
    return rows


def markdown_table(header: list[str], rows: list[list[str]], left: int = 2) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def summary_line(metrics: RunResults) -> str:
    line = (
        f"retention (student/teacher accuracy) {num(metrics.retention, '.3f')}"
        + (f" ({metrics.retention_reason})" if metrics.retention_reason else "")
        + "; "
        f"KD gain over scratch baseline {metrics.kd_gain:+.4f}{_gain_images(metrics)}"
    )
    cka = [
        f"{label(r)} {cka_text(metrics.models[r].cka['penultimate'])}"
        for r in STUDENTS
        if "penultimate" in metrics.models[r].cka and "teacher" in metrics.models
    ]
    if cka:
        line += "\nlinear CKA to the teacher (penultimate features): " + ", ".join(cka)
    for export in metrics.exports.values():
        line += "\n" + export_line(export)
    return line


def cast_note(metrics: RunResults) -> list[str]:
    """Which teacher the comparisons refer to, when that is not obvious."""
    extra = [label(r) for r in model_order(metrics.models) if r not in ("teacher", *STUDENTS)]
    if "teacher" not in metrics.models:
        return ["No teacher in this run: retention, speed-ups, compression and CKA to the teacher are not defined.", ""]
    if extra:
        return [
            f"The student learned from every teacher ({', '.join(['teacher', *extra])}); "
            "`teacher` is the run's first teacher: retention, speed-ups, compression and CKA refer to it.",
            "",
        ]
    return []


def shipped_note(metrics: RunResults) -> list[str]:
    """What ships with the KD student beyond its own layers (SimKD), so the comparison is read honestly."""
    stage = metrics.stages.get("student")
    if stage is None or not stage.includes:
        return []
    return [
        f"The KD student includes {stage.includes}: its parameters, size, MACs, latency and exports count them; "
        "the scratch baseline is the plain student.",
        "",
    ]


def per_class_table(metrics: RunResults) -> str:
    names = metrics.class_names
    roles = model_order(metrics.models)
    support = metrics.models["student"].per_class["support"]
    header = ["class", "support"] + [f"{label(r)} {k}" for r in roles for k in ("P", "R", "F1")]
    rows = []
    for c, name in enumerate(names):
        row = [str(name), str(support[c])]
        for r in roles:
            pc = metrics.models[r].per_class
            row += [f"{pc['precision'][c]:.3f}", f"{pc['recall'][c]:.3f}", f"{pc['f1'][c]:.3f}"]
        rows.append(row)
    rows.append(
        ["macro", str(sum(support))] + [x for r in roles for x in ("", "", num(metrics.models[r].macro_f1, ".3f"))]
    )
    return markdown_table(header, rows, left=1)


def confusion_table(matrix: list[list[int]], names: list[str]) -> str:
    header = ["true \\ predicted"] + [str(n) for n in names]
    return markdown_table(header, [[str(names[i])] + [str(v) for v in row] for i, row in enumerate(matrix)], left=1)


def cka_table(metrics: RunResults) -> str:
    keys = list(metrics.models["student"].cka)
    s_head, t_head = (
        metrics.models["student"].penultimate_layer,
        metrics.models["teacher"].penultimate_layer,
    )
    rows = []
    for key in keys:
        label = (
            f"penultimate (input of teacher `{t_head}` ~ student `{s_head}`)" if key == "penultimate" else f"`{key}`"
        )
        rows.append([label] + [cka_text(metrics.models[r].cka.get(key)).split(" (")[0] for r in STUDENTS])
    return markdown_table(["teacher ~ student features", ROLE_LABELS["student"], ROLE_LABELS["baseline"]], rows, left=1)


def export_section(export: dict) -> list[str]:
    rows = []
    for fmt in ("onnx", "torchscript"):
        e = export.get(fmt)
        if not e:
            continue
        if "max_abs_diff" in e:
            rows.append(
                [
                    fmt,
                    f"`{e['path']}`",
                    megabytes(e["size_bytes"]),
                    f"{e['max_abs_diff']:.2g}",
                    f"{e['test_acc']:.4f}",
                    f"{e['agreement']:.4f}",
                ]
            )
        else:
            rows.append([fmt, f"`{e['path']}`" if e.get("path") else "-", "-", "-", "-", e.get("status", "skipped")])
    return [
        f"The {label(export['model'])} was exported on the CPU in fp32 and run on the "
        "whole test split "
        f"({export['runtime']}); differences are against the same model in PyTorch (fp32, CPU, test accuracy "
        f"{export['reference_test_acc']:.4f}).",
        "",
        markdown_table(
            ["format", "file", "size", "max abs logit diff", "test acc after export", "same prediction"], rows, left=2
        ),
        "",
    ]


DEFINITIONS = """\
- **test acc**: share of test images whose top logit is the true class. **retention** = student / teacher
  test accuracy; **KD gain** = KD student - scratch baseline test accuracy.
- **P / R / F1**: per-class precision, recall and F1 on the test split; **macro-F1** is their unweighted
  mean over the classes present in the labels or predictions. **ROC-AUC** (two-class data sets only) is
  that of the softmax probability of class 1.
- **ECE**: expected calibration error, 15 equal-width confidence bins: sum over bins of
  (bin share of images) x |accuracy - mean top-softmax probability| in the bin; 0 = calibrated.
- **size**: bytes of the saved state_dict in `checkpoints/<model>.pt` (1 MB = 10^6 bytes).
- **MACs/image**: multiply-adds of matmuls and convolutions in one forward pass on one image, counted with
  `torch.utils.flop_counter.FlopCounterMode` (FLOPs = 2 x MACs; elementwise ops, normalisation and pooling
  are not counted).
- **latency**: wall time of a batch-1 forward pass with `eval.latency_threads` torch threads (as a deployment
  runs it), after warm-up: the median of 5 rounds' medians within a time budget (`eval.latency_budget_s`).
  Measured under contention (rounds more than 1.5x apart, or the process getting under 0.7 CPU-seconds per
  second) it is measured again, then marked, said in the summary and never cached. **images/s**: throughput
  at the evaluation batch size (median of timed batches); **speed-up**: images/s relative to the teacher
  (the summary also gives the latency ratio).
- **linear CKA** (Kornblith et al. 2019): similarity of the teacher's and a student's features on the same
  test images, ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) for column-centred feature matrices;
  1 = the same up to rotation and scale. Penultimate features are the input of each model's last
  `nn.Linear`.
"""


def stages_table(metrics: RunResults) -> list[str]:
    """Epochs, final validation accuracy and wall time per stage; with eval.test_every_epoch also the best
    and the last epoch's test accuracy, labelled as such (papers on CIFAR-100 report the best)."""
    tested = any(v.best_test_acc is not None for v in metrics.stages.values())
    header = ["stage", "epochs", "final val acc", "wall time"]
    if tested:
        header += ["best-epoch test acc (epoch)", "last-epoch test acc"]
    rows = []
    for s, v in metrics.stages.items():
        row = [s, str(v.epochs), num(v.final_val_acc), f"{v.wall_time_s:.1f}s"]
        if tested:
            best = f"{v.best_test_acc:.4f} ({v.best_test_epoch})" if v.best_test_acc is not None else "-"
            row += [best, num(v.last_test_acc)]
        rows.append(row)
    lines = [markdown_table(header, rows)]
    if tested:
        note = ("Best-epoch: the highest test accuracy over the epochs, as the CIFAR-100 papers report it (the epoch "
                "is chosen on the test split itself); last-epoch: the final model's, with no selection.")  # fmt: skip
        lines += ["", note]
    return lines


def render_markdown(metrics: RunResults, overrides: list[str]) -> str:
    md = [*_headline(metrics, overrides), *_per_class(metrics)]
    if metrics.models["student"].cka and "teacher" in metrics.models:
        md += ["## Representation similarity (linear CKA to the teacher, test split)", "", cka_table(metrics), ""]
    if metrics.exports:
        md += ["## Export", ""]
        for export in metrics.exports.values():
            md += export_section(export)
    md += [
        "## Data",
        "",
        f"{metrics.num_classes} classes; images per split and class ({', '.join(map(str, metrics.class_names))}):",
        "",
        *[f"- {split}: {c} (total {sum(c)})" for split, c in metrics.class_counts.items()],
        "",
        "## Stages",
        "",
        *stages_table(metrics),
        "",
        "## Definitions",
        "",
        DEFINITIONS,
    ]
    return "\n".join(md)


def _headline(metrics: RunResults, overrides: list[str]) -> list[str]:
    """The report's top: the run, the comparison table, the verdict, the plots."""
    threads = f" ({metrics.torch_threads} torch threads)" if "cpu" in metrics.device and metrics.torch_threads else ""
    return [
        f"# distill-runner report: {metrics.dataset}",
        "",
        f"Overrides: `{' '.join(overrides) or '(none)'}`  ",
        f"Device: {metrics.device}" + threads + f", precision: {metrics.precision}, seed: {metrics.seed}",
        "",
        markdown_table(HEADER, comparison_rows(metrics)),
        "",
        summary_line(metrics).replace("\n", "  \n") + ".",
        "",
        *cast_note(metrics),
        *shipped_note(metrics),
        "## Should you ship the student?",
        "",
        *verdict(metrics),
        "",
        "## Plots",
        "",
        "![Training loss and validation accuracy per epoch](curves.png)",
        "",
        "![Confusion matrices on the test split](confusion.png)",
        "",
    ]


def _per_class(metrics: RunResults) -> list[str]:
    """Per-class metrics, ROC-AUC for two classes, confusion matrices (of few classes)."""
    roles, names = model_order(metrics.models), metrics.class_names
    md = ["## Per-class metrics (test split)", "", per_class_table(metrics), ""]
    if metrics.num_classes == 2:
        md += ["ROC-AUC: " + ", ".join(f"{label(r)} {num(metrics.models[r].roc_auc)}" for r in roles), ""]
    md += ["## Confusion matrices (test split; rows: true class, columns: predicted class)", ""]
    if len(names) <= MAX_CLASSES_IN_TABLES:
        for r in roles:
            md += [f"### {label(r)}", "", confusion_table(metrics.models[r].confusion, names), ""]
    else:
        md += [f"{len(names)} classes: see `confusion.png` and `metrics.json`.", ""]
    return md


def confusions(metrics: RunResults) -> dict[str, np.ndarray]:
    """Each model's confusion matrix as an image, by role (``plots.confusion_images`` draws each matrix once per
    process: the run folder and TensorBoard, and a sweep's later jobs, share the images)."""
    from distill_runner.reporting import plots

    roles = model_order(metrics.models)
    drawn = plots.confusion_images({label(r): metrics.models[r].confusion for r in roles}, metrics.class_names)
    return {role: drawn[label(role)] for role in roles}


def write_report(run_dir: str | os.PathLike, metrics: RunResults, overrides: list[str]) -> str:
    """Write metrics.json, curves.png, confusion.png and, last and atomically, report.md into ``run_dir`` (a folder
    without report.md is not a finished run); return the console table."""
    from distill_runner.reporting import plots

    run_dir = Path(run_dir)
    metrics.save(run_dir / "metrics.json")
    plots.save_curves(run_dir / "curves.png", metrics.stages)
    plots.save_side_by_side(run_dir / "confusion.png", list(confusions(metrics).values()))
    atomic_write_text(run_dir / "report.md", render_markdown(metrics, overrides))
    return text_table(HEADER, comparison_rows(metrics)) + "\n" + summary_line(metrics)
