"""The answer to "should you ship the student?" in report.md: numbers in words that do not mislead (slower
when slower, at chance when at chance, no difference within a test image or two, unavailable for a NaN).

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import math

from distill_runner.reporting.results import STUDENTS, RunResults, label
from distill_runner.train import health
from distill_runner.train.health import CHANCE_MARGIN

THROUGHPUT = "the teacher's throughput"
NOISE_IMAGES = 2  # a KD gain of this many test images or fewer is called out as no difference


def num(v, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


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
