"""Sweep summary: one row per job of a multirun, a table and a plot.

Written by a Hydra callback after every multirun (:class:`distill_runner.callbacks.SweepSummary`), and
rebuilt for any sweep folder with ``distill-report PATH``. It reads what each job wrote (``metrics.json``
and ``.hydra/overrides.yaml``), so it works with every launcher (basic, joblib, submitit) and sweeper.

Docs: docs/guide/sweeps-and-cache.md
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import statistics
import sys
from pathlib import Path

import yaml

from distill_runner.errors import ConfigError, UserError
from distill_runner.io.storage import atomic_write_text
from distill_runner.reporting.results import RunResults
from distill_runner.reporting.tensorboard import SHORT, plumbing

log = logging.getLogger(__name__)

COLUMNS = ["job", "overrides", "student_val_acc", "student_acc", "baseline_acc", "teacher_acc", "retention", "kd_gain",
           "wall_time_s"]  # fmt: skip
SEED = "seed"  # jobs that differ only in it are one setting
SWEPT_ENV = "DISTILL_RUNNER_SWEPT_KEYS"  # set by the launching process, inherited by launcher workers
MAX_FOLDER_NAME = 120  # characters of settings in a job folder's name
VAL = "student_val_acc"  # what the best setting is chosen on (never test), and what the plot shows


def job_folder(num, overrides) -> str:
    """A sweep job's folder (``hydra.sweep.subdir``): its number, then the settings the sweep varies, e.g.
    ``3_T=4,alpha=0.5``; TensorBoard names the job's runs by it (``3_T=4,alpha=0.5/tb/student``). The swept keys
    come from the launching process (:meth:`distill_runner.callbacks.SweepSummary.on_multirun_start`); without
    them every override but plumbing (cache.dir, trainer.resume, ...) counts. Path values are left out; the
    number keeps names unique."""
    swept = set(filter(None, os.environ.get(SWEPT_ENV, "").split(",")))
    parts = []
    for override in overrides or []:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if (key in swept if swept else not plumbing(key)) and "/" not in value:
            parts.append(f"{SHORT.get(key, key)}={value}")
    name = re.sub(r"[^\w.=,+\-\[\]]", "_", ",".join(parts))[:MAX_FOLDER_NAME]
    return f"{num}_{name}" if name else str(num)


def collect(sweep_dir: Path, skipped: list[str] | None = None) -> list[dict]:
    """One row per job folder that holds a readable metrics.json, in job order. A job whose files cannot be read
    (damaged, or from another version) is left out with a warning, and named in ``skipped``."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: _job_order(p.parent.name)):
        try:
            rows.append(_row(metrics_file.parent))
        except (ConfigError, OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("sweep summary: skipping job %s (%s): cannot read its results: %s", metrics_file.parent.name,
                        metrics_file, why)  # fmt: skip
            if skipped is not None:
                skipped.append(f"{metrics_file.parent.name} ({why})")
    return rows


def _job_order(name: str) -> tuple:
    """Job folders in job order: by the leading job number (``0``, ``1_T=4,alpha=0.5``), then by name."""
    number = name.split("_", 1)[0]
    return (0, int(number), name) if number.isdigit() else (1, 0, name)


def _row(job: Path) -> dict:
    results = RunResults.load(job / "metrics.json")
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return {
        "job": job.name,
        "overrides": " ".join(overrides),
        "params": dict(o.split("=", 1) for o in overrides if "=" in o),
        "student_val_acc": _number(results.stages["student"].final_val_acc),
        "baseline_val_acc": _number(results.stages["baseline"].final_val_acc),
        "teacher_acc": results.models["teacher"].test_acc if "teacher" in results.models else float("nan"),
        "student_acc": results.models["student"].test_acc,
        "baseline_acc": results.models["baseline"].test_acc,
        "retention": results.retention if results.retention is not None else float("nan"),
        "kd_gain": results.kd_gain,
        "wall_time_s": results.wall_time_s if results.wall_time_s is not None else float("nan"),
    }


def _number(v) -> float:
    return float("nan") if v is None else float(v)


def settings(rows: list[dict], swept: list[str]) -> list[dict]:
    """Jobs that differ only in the seed, as one setting: mean and std (over seeds) of the student's
    validation and test accuracy, in first-job order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(
            " ".join(f"{k}={r['params'][k]}" for k in swept if k != SEED and k in r["params"]), []
        ).append(r)
    out = []
    for name, members in groups.items():
        val, test = [m["student_val_acc"] for m in members], [m["student_acc"] for m in members]
        std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        out.append({"setting": name, "seeds": len(members), "val": statistics.mean(val), "val_std": std(val),
                    "test": statistics.mean(test), "test_std": std(test)})  # fmt: skip
    return out


def swept_keys(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs, temperature and alpha first."""
    keys = sorted({k for r in rows for k in r["params"]})
    varying = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]
    order = {"distill.temperature": 0, "distill.alpha": 1}
    return sorted(varying, key=lambda k: (order.get(k, 2), k))


def _as_number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def plot(rows: list[dict], path: Path) -> str:
    """The metric the best setting is chosen on, the KD student's validation accuracy: a heatmap over two swept
    keys, a line over one (the scratch baseline's beside it), bars otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = swept_keys(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if len(keys) == 2:
        kx, ky = keys
        xs = sorted({r["params"][kx] for r in rows}, key=_as_number)
        ys = sorted({r["params"][ky] for r in rows}, key=_as_number)
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in rows:  # several jobs in one cell (e.g. seeds): their mean
            i, j = ys.index(r["params"][ky]), xs.index(r["params"][kx])
            grid[i, j] = np.nanmean([grid[i, j], r[VAL]]) if not np.isnan(grid[i, j]) else r[VAL]
        image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set_xlabel(kx)
        ax.set_ylabel(ky)
        for i in range(len(ys)):
            for j in range(len(xs)):
                if not np.isnan(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.4f}",
                        ha="center",
                        va="center",
                        color="w" if grid[i, j] < np.nanmean(grid) else "k",
                    )
        fig.colorbar(image, ax=ax, label="KD student validation accuracy")
        kind = "heatmap"
    elif len(keys) == 1:
        (k,) = keys
        pts = sorted(((_as_number(r["params"][k]), r[VAL], r["baseline_val_acc"]) for r in rows), key=lambda t: t[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="student (KD)")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="student (scratch)")
        ax.set_xlabel(k)
        ax.set_ylabel("validation accuracy")
        ax.legend()
        kind = "line"
    else:
        ax.bar([r["job"] for r in rows], [r[VAL] for r in rows])
        ax.set_xlabel("job")
        ax.set_ylabel("KD student validation accuracy")
        kind = "bars"
    ax.set_title("distill-runner sweep: KD student validation accuracy (what the choice is made on)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return kind


# How summary.md shows each numeric column
FORMATS = {
    "student_val_acc": "{:.4f}",
    "teacher_acc": "{:.4f}",
    "student_acc": "{:.4f}",
    "baseline_acc": "{:.4f}",
    "retention": "{:.3f}",
    "kd_gain": "{:+.4f}",
    "wall_time_s": "{:.1f}",
}


def write_summary(sweep_dir: str | Path) -> list[dict]:
    """Write summary.csv, summary.md and summary.png into ``sweep_dir``; return the rows."""
    sweep_dir = Path(sweep_dir)
    skipped: list[str] = []
    rows = collect(sweep_dir, skipped)
    if not rows:
        unread = f" ({len(skipped)} unreadable: {'; '.join(skipped)})" if skipped else ""
        raise FileNotFoundError(f"no job folder with a readable metrics.json under {sweep_dir}{unread}")
    swept = swept_keys(rows)
    common = " ".join(f"{k}={v}" for k, v in rows[0]["params"].items() if k not in swept)
    for r in rows:  # the table shows what differs between jobs; what they share is said once
        r["overrides"] = " ".join(f"{k}={r['params'][k]}" for k in swept if k in r["params"])
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "summary.csv", table.getvalue())
    atomic_write_text(sweep_dir / "summary.md", summary_markdown(sweep_dir, rows, swept, common, skipped))
    kind = plot(rows, sweep_dir / "summary.png")
    log.info("sweep summary of %d jobs (%s plot) written to %s/summary.{csv,md,png}", len(rows), kind, sweep_dir)
    return rows


def summary_markdown(sweep_dir: Path, rows: list[dict], swept: list[str], common: str, skipped: list[str]) -> str:
    """summary.md: one row per job, the settings over seeds, the best setting (chosen on validation)."""
    # the best is chosen on validation, never on test (as the Optuna sweeper's objective); test is reported beside it
    per_setting = settings(rows, swept)
    best = max(per_setting, key=lambda g: (g["val"], -g["val_std"]))
    seeded = any(g["seeds"] > 1 for g in per_setting)
    pm = lambda mean, std: f"{mean:.4f} ± {std:.4f}" if seeded else f"{mean:.4f}"
    setting_table = [
        "Per setting, over seeds (mean ± standard deviation):",
        "",
        "| setting | seeds | student val acc | student test acc |",
        "|---|---:|---:|---:|",
        *[f"| `{g['setting'] or '(all)'}` | {g['seeds']} | {pm(g['val'], g['val_std'])} | "
          f"{pm(g['test'], g['test_std'])} |" for g in per_setting],
        "",
    ] if seeded else []  # fmt: skip
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(rows)} jobs; shared overrides: `{common or '(none)'}`",
        "",
        *jobs_table(rows),
        "",
        *setting_table,
        f"Best setting, chosen on the KD student's validation accuracy{' (mean over seeds)' if seeded else ''}: "
        f"`{best['setting'] or '(all)'}`, validation {pm(best['val'], best['val_std'])}, "
        f"test {pm(best['test'], best['test_std'])} (test accuracy is reported, never used to choose)."
        + tie_note(per_setting, best, seeded),
        "",
        *([f"Skipped {len(skipped)} job(s) whose results cannot be read: {'; '.join(skipped)}.", ""] * bool(skipped)),
        *failed_on_cluster(sweep_dir),
        "![student accuracy](summary.png)",
        "",
    ]
    return "\n".join(lines)


def failed_on_cluster(sweep_dir: Path) -> list[str]:
    """The jobs the Slurm launcher found failed (``failed_jobs.json``, distill_runner/slurm.py), with their logs."""
    path = sweep_dir / "failed_jobs.json"
    failed = json.loads(path.read_text()) if path.is_file() else []
    return [f"Failed on the cluster: {len(failed)} job(s)", "", "| job | log | last error |", "|---|---|---|",
            *[f"| {f['job']} | {f['log']} | {f['why']} |" for f in failed], ""] if failed else []  # fmt: skip


def jobs_table(rows: list[dict]) -> list[str]:
    """The markdown table of the jobs, one row each (COLUMNS)."""

    def cell(r: dict, c: str) -> str:
        return FORMATS[c].format(r[c]) if c in FORMATS else f"`{r[c]}`" if c == "overrides" else str(r[c])

    return [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in ("job", "overrides") else "---:" for c in COLUMNS) + "|",
        *["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows],
    ]


def tie_note(per_setting: list[dict], best: dict, seeded: bool) -> str:
    """ " 3 settings tie on validation (0.9700); chosen: the first." when the best validation accuracy is shared."""
    tied = [g for g in per_setting if g["val"] == best["val"]]
    if len(tied) < 2:
        return ""
    rule = "the one with the smallest standard deviation over seeds, else the first" if seeded else "the first"
    return f" {len(tied)} settings tie on validation ({best['val']:.4f}); chosen: {rule} (in job order)."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distill-report", description="Rebuild the summary (csv, md, png) of a distill-run sweep folder."
    )
    parser.add_argument("path", type=Path, help="a multirun folder, e.g. outputs/multirun/2026-11-23/10-00-00")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rows = write_summary(args.path)
    except (FileNotFoundError, UserError) as exc:
        print(f"distill-report: error: {exc}", file=sys.stderr)
        return 2
    print((args.path / "summary.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
