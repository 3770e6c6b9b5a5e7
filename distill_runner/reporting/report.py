"""The run's comparison: metrics.json, report.md (+ curves.png, confusion.png), TensorBoard and the
table printed at the end of a run.

Everything here is a function of :class:`~distill_runner.reporting.results.RunResults`, so
``distill-export`` can rewrite the report of a finished run from its metrics.json.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from distill_runner.reporting.results import ROLE_LABELS, STUDENTS, RunResults, label, model_order
from distill_runner.storage import atomic_write_text
from distill_runner.train import health
from distill_runner.train.health import CHANCE_MARGIN

MAX_CLASSES_IN_TABLES = 20  # larger confusion matrices only go to confusion.png and metrics.json
THROUGHPUT = "the teacher's throughput"
NOISE_IMAGES = 2  # a KD gain of this many test images or fewer is called out as no difference


def count(n: float) -> str:
    """12.3G, 4.56M, 789k: multiply-adds and the like."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e8 else f"{n / 1e6:.0f} MB"


def num(v, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


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


def _gain_images(metrics: RunResults) -> str:
    n = metrics.test_size
    if not n:
        return ""
    images = round(metrics.kd_gain * n)
    small = f"; within {abs(images)} test image{'s' if abs(images) != 1 else ''}: no difference to act on" if (
        0 < abs(images) <= NOISE_IMAGES) else ""  # fmt: skip
    return f" ({images:+d} of {n} test images{small})"


def cka_text(value) -> str:
    """A CKA figure, or why there is none (constant or non-finite features, e.g. a diverged model)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "unavailable (constant or non-finite features)"
    return f"{value:.3f}"


def chance_note(metrics: RunResults) -> str | None:
    """When every model scores at chance (the test split's largest class share, or 1/classes), what to say."""
    support = metrics.models["student"].per_class["support"]
    n = sum(support)
    if not n or metrics.num_classes < 2:
        return None
    chance = max(max(support) / n, 1 / metrics.num_classes)
    if any(m.test_acc > chance + CHANCE_MARGIN for m in metrics.models.values()):
        return None
    return (f"- **At chance**: every model's test accuracy is within {CHANCE_MARGIN} of chance ({chance:.4f}, the "
            "largest class's share of the test split): no model learned the task, so retention and the KD gain "
            "say nothing; check the data, the learning rate and the teacher's training.")  # fmt: skip


def health_notes(metrics: RunResults) -> list[str]:
    """A diverged stage and a teacher at chance, as the log warned of them."""
    notes = [health.divergence_check(stage.history, name) for name, stage in metrics.stages.items()]
    counts = metrics.class_counts.get("val")
    notes += [health.teacher_check(name, stage.final_val_acc, counts, metrics.num_classes)
              for name, stage in metrics.stages.items() if name not in STUDENTS]  # fmt: skip
    return [f"- **Warning**: {note}." for note in notes if note]


def latency_note(metrics: RunResults) -> str:
    """The thread count of the latency figures and, when any was measured under contention, which and why."""
    threads = {m.latency_threads for m in metrics.models.values() if m.latency_threads}
    n = threads.pop() if len(threads) == 1 else None
    note = f" with {n} thread{'s' if n != 1 else ''}" if n else ""
    contended = [f"{label(r)}: {m.latency_contention}" for r, m in metrics.models.items() if m.latency_contention]
    if contended:
        note += "; latency measured under contention (" + "; ".join(contended) + "): not to be trusted or cached"
    return note


def _times(ratio: float, better: str, worse: str) -> str:
    """ "2.0x lower latency" for a ratio >= 1, "1.1x slower" (its inverse) for one below."""
    return f"{ratio:.1f}x {better}" if ratio >= 1 else f"{1 / ratio:.1f}x {worse}"


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


def export_line(export: dict, prefix: bool = True) -> str:
    parts = []
    for fmt in ("onnx", "torchscript"):
        e = export.get(fmt, {})
        if "max_abs_diff" in e:
            parts.append(f"{fmt} max |logit diff| {e['max_abs_diff']:.2g}, test acc {e['test_acc']:.4f}")
        elif e:
            parts.append(f"{fmt} {e.get('status', 'skipped')}")
    return (f"export ({export['model']}): " if prefix else "") + "; ".join(parts)


def verdict(metrics: RunResults) -> list[str]:
    """The answer to "should I ship the student?" as bullet points of numbers."""
    t, s, b = (metrics.models.get(r) for r in ("teacher", *STUDENTS))
    gain = (
        f"- **KD vs scratch**: accuracy {metrics.kd_gain:+.4f}{_gain_images(metrics)}, macro-F1 "
        f"{metrics.kd_gain_macro_f1:+.4f} over the same student trained without the teacher."
    )
    if t is None:
        return [
            f"- **Accuracy**: no teacher in this run ({metrics.retention_reason}): retention is not defined; "
            f"the KD student's test accuracy is {s.test_acc:.4f} (macro-F1 {num(s.macro_f1)}).",
            gain,
            f"- **Calibration**: ECE {num(s.ece, '.3f')} (scratch {num(b.ece, '.3f')}).",
        ]
    kept = num(None if metrics.retention is None else metrics.retention * 100, ".1f")
    lines = [
        f"- **Accuracy**: the KD student keeps **{kept}%** of the teacher's test accuracy "
        f"({s.test_acc:.4f} vs {t.test_acc:.4f}; macro-F1 {num(s.macro_f1)} vs {num(t.macro_f1)}).",
        gain,
        f"- **Cost**: {t.params / s.params:.1f}x fewer parameters, {t.size_bytes / s.size_bytes:.1f}x smaller on disk, "
        f"{t.macs / max(s.macs, 1):.1f}x fewer multiply-adds per image than the teacher.",
        f"- **Speed on {metrics.device}**: {_times(s.speedup, THROUGHPUT, 'lower throughput (slower)')} "
        f"at batch {metrics.eval_batch_size}, "
        f"{_times(s.latency_speedup, 'lower latency', 'slower')} at batch 1{latency_note(metrics)} "
        f"({s.latency_ms:.2f} ms vs {t.latency_ms:.2f} ms); {metrics.speed_source}.",
        f"- **Calibration**: ECE {num(s.ece, '.3f')} (teacher {num(t.ece, '.3f')}, scratch {num(b.ece, '.3f')}).",
    ]
    if "penultimate" in s.cka:
        lines.append(
            f"- **Representations**: linear CKA to the teacher's penultimate features {cka_text(s.cka['penultimate'])} "
            f"(scratch {cka_text(b.cka.get('penultimate'))})."
        )
    for e in metrics.exports.values():
        lines.append(
            f"- **Export** ({label(e['model'])}, PyTorch fp32 test acc "
            f"{e['reference_test_acc']:.4f}): {export_line(e, prefix=False)}."
        )
    if (note := chance_note(metrics)) is not None:
        lines.insert(0, note)
    lines[:0] = health_notes(metrics)
    if not metrics.exports:
        lines.append("- **Export**: not exported in this run (`export=onnx`, or `distill-export RUN_DIR` afterwards).")
    return lines


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
- **latency**: median wall time of a batch-1 forward pass after warm-up, repeated for a time budget
  (`eval.latency_budget_s`); **images/s**: throughput at the evaluation batch size (median of timed
  batches); **speed-up**: images/s relative to the teacher (the summary also gives the latency ratio).
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
    counts = metrics.class_counts
    names = metrics.class_names
    roles = model_order(metrics.models)
    md = [
        f"# distill-runner report: {metrics.dataset}",
        "",
        f"Overrides: `{' '.join(overrides) or '(none)'}`  ",
        f"Device: {metrics.device}"
        + (f" ({metrics.torch_threads} torch threads)" if "cpu" in metrics.device and metrics.torch_threads else "")
        + f", precision: {metrics.precision}, seed: {metrics.seed}",
        "",
        markdown_table(HEADER, comparison_rows(metrics)),
        "",
        summary_line(metrics).replace("\n", "  \n") + ".",
        "",
        *cast_note(metrics),
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
        "## Per-class metrics (test split)",
        "",
        per_class_table(metrics),
        "",
    ]
    if metrics.num_classes == 2:
        md += ["ROC-AUC: " + ", ".join(f"{label(r)} {num(metrics.models[r].roc_auc)}" for r in roles), ""]
    md += ["## Confusion matrices (test split; rows: true class, columns: predicted class)", ""]
    if len(names) <= MAX_CLASSES_IN_TABLES:
        for r in roles:
            md += [f"### {label(r)}", "", confusion_table(metrics.models[r].confusion, names), ""]
    else:
        md += [f"{len(names)} classes: see `confusion.png` and `metrics.json`.", ""]
    if metrics.models["student"].cka and "teacher" in metrics.models:
        md += ["## Representation similarity (linear CKA to the teacher, test split)", "", cka_table(metrics), ""]
    if metrics.exports:
        md += ["## Export", ""]
        for export in metrics.exports.values():
            md += export_section(export)
    md += [
        "## Data",
        "",
        f"{metrics.num_classes} classes; images per split and class ({', '.join(map(str, names))}):",
        "",
        *[f"- {split}: {c} (total {sum(c)})" for split, c in counts.items()],
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
