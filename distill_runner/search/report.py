"""What a search leaves in its folder: every trial (trials.csv), the Pareto front (pareto.csv, a table
in report.md), plots of accuracy against latency, MACs and size (budget lines, the teacher marked),
optimization history and parameter importances, best.json; and the same in TensorBoard (``tb/``).

Docs: docs/guide/search.md
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from distill_runner.io.storage import atomic_write_text
from distill_runner.reporting.report import markdown_table
from distill_runner.search import study as studies
from distill_runner.search.final import rows, within
from distill_runner.search.trial import COSTS
from distill_runner.search_spec import SearchSpec

log = logging.getLogger(__name__)

LABELS = {"latency_ms": "batch-1 latency (ms)", "macs": "MACs per image", "params": "parameters"}
PLOTS = {"latency_ms": "pareto_latency.png", "macs": "pareto_macs.png", "params": "pareto_params.png"}
COLUMNS = [
    "number",
    "state",
    "val_acc",
    "latency_ms",
    "macs",
    "params",
    "within_budget",
    "overrides",
    "latency_contention",
]


def pareto(trials: list[dict], cost: str) -> list[dict]:
    """The complete trials no other beats on both validation accuracy (higher) and ``cost`` (lower), by cost."""
    complete = [r for r in trials if r["state"] == "COMPLETE" and r["val_acc"] is not None and cost in r]
    front = [r for r in complete if not any(o["val_acc"] >= r["val_acc"] and o[cost] <= r[cost] and
                                            (o["val_acc"] > r["val_acc"] or o[cost] < r[cost])
                                            for o in complete)]  # fmt: skip
    return sorted(front, key=lambda r: r[cost])


def _cells(r: dict, budgets: dict, trials: list[dict]) -> dict:
    return {"number": r["number"], "state": r["state"], "val_acc": r["val_acc"], "latency_ms": r.get("latency_ms"),
            "macs": r.get("macs"), "params": r.get("params"), "within_budget": within(r, budgets, trials),
            "latency_contention": r.get("latency_contention") or "",
            "overrides": " ".join(r["overrides"])}  # fmt: skip


def write_csv(path: Path, rows: list[dict], budgets: dict, trials: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS)
    writer.writeheader()
    writer.writerows(_cells(r, budgets, trials) for r in rows)
    atomic_write_text(path, out.getvalue())


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def table(rows: list[dict], budgets: dict, chosen: int | None, trials: list[dict]) -> str:
    header = ["trial", "state", "val acc", "latency ms", "MACs", "params", "within budget", "overrides"]
    body = [[f"**{r['number']}**" if r["number"] == chosen else str(r["number"]), r["state"].lower(),
             _num(r["val_acc"], ".4f"),
             _num(r.get("latency_ms"), ".3f") + (" (contended)" if r.get("latency_contention") else ""),
             _num(r.get("macs"), ","), _num(r.get("params"), ","),
             "yes" if within(r, budgets, trials) else "no", " ".join(r["overrides"])] for r in rows]  # fmt: skip
    return markdown_table(header, body)


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    tmp.replace(path)


def pareto_figure(trials: list[dict], cost: str, budgets: dict, teacher: dict | None, chosen: int | None):
    fig = Figure(figsize=(6.4, 4.4))  # not pyplot's: nothing global, no display
    ax = fig.add_subplot()
    for state, style in (("COMPLETE", {"c": "tab:blue", "marker": "o"}), ("PRUNED", {"c": "0.6", "marker": "x"})):
        pts = [r for r in trials if r["state"] == state and r["val_acc"] is not None and cost in r]
        ax.scatter([r[cost] for r in pts], [r["val_acc"] for r in pts], label=state.lower(), **style)
    front = pareto(trials, cost)
    ax.step([r[cost] for r in front], [r["val_acc"] for r in front], where="post", c="tab:blue", label="Pareto front")
    for r in trials:
        if r["number"] == chosen and cost in r:
            ax.scatter([r[cost]], [r["val_acc"]], s=180, facecolors="none", edgecolors="tab:green", label="chosen")
    if teacher is not None:
        ax.scatter([teacher[cost]], [teacher["val_acc"]], marker="*", s=160, c="k", label="teacher")
    if cost in budgets:
        ax.axvline(budgets[cost], ls="--", c="tab:red", label=f"budget {budgets[cost]:g}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    ax.set_xlabel(LABELS[cost])
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"accuracy vs {LABELS[cost].split(' (')[0]}")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def optuna_figures(study, search_dir: Path) -> dict:
    """History and importances of validation accuracy (Optuna's matplotlib plots); a note when impossible."""
    opt = studies.optuna()
    target = {"target": lambda t: t.values[0], "target_name": "validation accuracy"}
    figures, notes = {}, []
    warnings.simplefilter("ignore", opt.exceptions.ExperimentalWarning)  # the matplotlib plots are "experimental"
    try:
        figures["history.png"] = opt.visualization.matplotlib.plot_optimization_history(study, **target).figure
    except Exception as exc:  # e.g. no complete trial
        notes.append(f"history: {type(exc).__name__}: {exc}")
    try:
        # fANOVA: direction-free (Optuna 5's default, PED-ANOVA, ranks parameters for low values, not high accuracy)
        evaluator = opt.importance.FanovaImportanceEvaluator(seed=0)
        importances = opt.importance.get_param_importances(study, evaluator=evaluator, target=target["target"])
        atomic_write_text(search_dir / "importances.csv",
                          "param,importance\n" + "".join(f"{k},{v}\n" for k, v in importances.items()))  # fmt: skip
        figures["importances.png"] = opt.visualization.matplotlib.plot_param_importances(
            study, evaluator, **target
        ).figure
    except Exception as exc:  # fewer than two complete trials, or one parameter that never varied
        notes.append(f"importances: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return {"figures": figures, "notes": notes}


def write(study, search: SearchSpec, chosen: dict, outcome: dict, search_dir: Path) -> dict:
    """Every report file of the search folder; returns best.json's content."""
    budgets, trials = search.budgets(), rows(study)
    teacher_file = search_dir / "teacher.json"
    teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
    cost = search.objective or "latency_ms"
    front = pareto(trials, cost)
    write_csv(search_dir / "trials.csv", trials, budgets, trials)
    write_csv(search_dir / "pareto.csv", front, budgets, trials)
    figures = {PLOTS[c]: pareto_figure(trials, c, budgets, teacher, chosen["number"]) for c in COSTS}
    extra = optuna_figures(study, search_dir)
    figures.update(extra["figures"])
    for name, fig in figures.items():
        save_figure(fig, search_dir / name)
    best = {"trial": chosen, "final": outcome, "teacher": teacher, "objective": search.objective, "budget": budgets,
            "trials": studies.counts(study), "pareto": [r["number"] for r in front]}  # fmt: skip
    atomic_write_text(search_dir / "best.json", json.dumps(best, indent=2, default=str))
    markdown = render(best, front, trials, budgets, cost, list(figures), extra["notes"])
    atomic_write_text(search_dir / "report.md", markdown)
    tensorboard(search_dir / "tb", figures, markdown, trials)
    plt.close("all")  # Optuna's plots are pyplot figures
    log.info("search report: %s (chosen trial %d)", search_dir / "report.md", chosen["number"])
    return best


def render(best: dict, front, trials, budgets: dict, cost: str, figures: list[str], notes: list[str]) -> str:
    chosen, final = best["trial"], best["final"]
    lines = ["# Which student should I ship?", "",
             f"Chosen: trial {chosen['number']}, `{' '.join(chosen['overrides'])}`: validation accuracy "
             f"{chosen['val_acc']:.4f}, {chosen['latency_ms']:.3f} ms, {chosen['macs']:,} MACs, {chosen['params']:,} "
             "params (chosen by validation accuracy within budget; the test split is reported, never used to choose).",
             *[f"{note[0].upper()}{note[1:]}." for note in chosen.get("notes", [])],
             "", f"Budgets: {budgets or 'none'}; trials: {best['trials']}."]  # fmt: skip
    if final:
        lines += ["", f"Final run (`{final['folder']}/`, {'retrained' if final['retrained'] else 'trial weights'}, "
                  f"{final['epochs']} epochs): test accuracy {final['test_acc']:.4f} (scratch baseline "
                  f"{final['baseline_test_acc']:.4f}, teacher {_num(final['teacher_test_acc'], '.4f')}), "
                  f"{final['latency_ms']:.3f} ms. Reproduce: `{final['command']}`."]  # fmt: skip
        for fmt in ("onnx", "torchscript"):
            entry = (final.get("export") or {}).get(fmt) or {}
            state = entry.get("status") or f"max |logit diff| {_num(entry.get('max_abs_diff'), '.3g')}, test acc " \
                                            f"{_num(entry.get('test_acc'), '.4f')}"  # fmt: skip
            lines.append(f"- {fmt}: {entry.get('path')}: {state}")
        if (int8 := final.get("int8")) is not None:
            lines.append(f"- int8: {int8['status']}" if "status" in int8 else
                         f"- int8 ({int8['method']}, {int8['calibration_images']} calibration images): test acc "
                         f"{int8['int8']['test_acc']:.4f} vs fp32 {int8['fp32']['test_acc']:.4f}; latency "
                         f"{int8['int8']['latency_ms']:.3f} vs {int8['fp32']['latency_ms']:.3f} ms; size "
                         f"{int8['int8']['size_bytes']:,} vs {int8['fp32']['size_bytes']:,} bytes")  # fmt: skip
    if best["teacher"]:
        t = best["teacher"]
        lines += ["", f"Teacher: validation accuracy {t['val_acc']:.4f}, {t['latency_ms']:.3f} ms, {t['macs']:,} MACs, "
                  f"{t['params']:,} params."]  # fmt: skip
    number = chosen["number"]
    lines += ["", f"## Pareto front (validation accuracy vs {LABELS[cost]})", "", table(front, budgets, number, trials),
              "", "## Every trial", "", table(trials, budgets, number, trials), "", "## Figures", ""]  # fmt: skip
    lines += [f"![{name}]({name})" for name in figures] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def tensorboard(tb_dir: Path, figures: dict, markdown: str, trials: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tb_dir) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"search/{name.removesuffix('.png')}", fig, close=False)
        writer.add_text("search/report", markdown)
        for r in trials:
            if r["val_acc"] is not None:
                writer.add_scalar("trial/val_acc", r["val_acc"], r["number"])
            for c in COSTS:
                if c in r:
                    writer.add_scalar(f"trial/{c}", r[c], r["number"])
