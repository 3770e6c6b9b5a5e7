"""The run's comparison: metrics.json, report.md and the table printed at the end of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROLES = ("teacher", "student", "baseline")
ROLE_LABELS = {"teacher": "teacher", "student": "student (KD)", "baseline": "student (scratch)"}


def comparison_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for role in ROLES:
        m = metrics["models"][role]
        rows.append([
            ROLE_LABELS[role],
            m["name"],
            f"{m['params']:,}",
            f"{m['test_acc']:.4f}",
            f"{m['images_per_s']:,.0f}",
            f"{m['speedup']:.1f}x",
        ])
    return rows


HEADER = ["model", "architecture", "parameters", "test acc", "images/s", "speed-up"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def summary_line(metrics: dict) -> str:
    return (
        f"retention (student/teacher accuracy) {metrics['retention']:.3f}; "
        f"KD gain over scratch baseline {metrics['kd_gain']:+.4f}"
    )


def write_report(run_dir: str | os.PathLike, metrics: dict, overrides: list[str]) -> str:
    """Write metrics.json and report.md into ``run_dir``; return the console table."""
    run_dir = Path(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = comparison_rows(metrics)
    counts = metrics.get("class_counts", {})
    md = [
        f"# distill-runner report: {metrics['dataset']}",
        "",
        f"Overrides: `{' '.join(overrides) or '(none)'}`  ",
        f"Device: {metrics['device']}, precision: {metrics['precision']}, seed: {metrics['seed']}",
        "",
        markdown_table(HEADER, rows),
        "",
        summary_line(metrics) + ".",
        "",
        "images/s: inference throughput at the evaluation batch size on the run's device; "
        "speed-up: images/s relative to the teacher.",
        "",
        "## Data",
        "",
        f"{metrics['num_classes']} classes; images per split and class ({', '.join(metrics['class_names'])}):",
        "",
        *[f"- {split}: {c} (total {sum(c)})" for split, c in counts.items()],
        "",
        "## Stages",
        "",
        markdown_table(["stage", "epochs", "final val acc", "wall time"], [
            [s, str(v["epochs"]), f"{v['final_val_acc']:.4f}" if v["final_val_acc"] is not None else "-", f"{v['wall_time_s']:.1f}s"]
            for s, v in metrics["stages"].items()
        ]),
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(md))
    return text_table(HEADER, rows) + "\n" + summary_line(metrics)
