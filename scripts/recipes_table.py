"""Run every loss recipe on the quickstart for seeds 0-4 and print the Markdown table of docs/benchmarks.md.

    nice -n 10 python scripts/recipes_table.py [--seeds 0 1 2 3 4] [--out outputs/recipes_table] [override ...]

Each seed's ResNet-18 teacher, its replayable outputs and the scratch baseline (same student init,
same schedule) are trained once and reused by the other recipes through the runner's cache
(outputs/cache/), exactly as in a sweep. Per recipe: the KD student's test accuracy (mean ± std over
seeds), and the paired gain over the scratch baseline: per seed student minus baseline, its mean ±
std. A gain larger than its std is marked with *. Extra arguments are Hydra overrides applied to
every run (e.g. trainer.epochs=2 for a smoke test); `<recipe>:<override>` applies to that recipe's
runs only (multi_teacher:distill.teachers.cnn.epochs=1).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distill_runner import runner
from distill_runner.config import compose

# recipe -> (what it does, paper, config keys); the order of the table
RECIPES = {
    "kd": ("soft teacher targets: (1-alpha)·CE + alpha·T²·KL", "Hinton et al. 2015", "`temperature`, `alpha`"),
    "kd_ls": (
        "KD on z-scored logits (logit standardization), T 2, 0.1·CE + 9·KD",
        "Sun et al., CVPR 2024",
        "`temperature`, `terms.kd.weight`, `terms.kd.logit_standardization`",
    ),
    "dkd": (
        "decoupled KD: alpha·TCKD + beta·NCKD, warm-up over 20/240 of training, + CE",
        "Zhao et al., CVPR 2022",
        "`alpha` (1), `beta` (8), `temperature`, `schedule.dkd`",
    ),
    "dkd_ls": (
        "DKD on z-scored logits, T 2, DKD weight 9",
        "Sun et al., CVPR 2024",
        "`alpha`, `beta`, `temperature`, `terms.dkd.weight`",
    ),
    "dist": (
        "DIST: Pearson-correlation relations, inter-class (per sample) and intra-class (per class over the batch)",
        "Huang et al., NeurIPS 2022",
        "`temperature` (tau), `terms.dist.beta`, `terms.dist.gamma`, `terms.dist.weight`",
    ),
    "ttm": (
        "transformed teacher matching: KL to the power-transformed teacher, student at T 1",
        "Zheng & Yang, ICLR 2024",
        "`terms.ttm.gamma`, `terms.ttm.weight`",
    ),
    "wttm": (
        "TTM weighted per sample by the teacher's power sum",
        "Zheng & Yang, ICLR 2024",
        "`terms.wttm.gamma`, `terms.wttm.weight`",
    ),
    "nkd": (
        "normalized KD: target part + normalized non-target part",
        "Yang et al., ICCV 2023",
        "`temperature`, `terms.nkd.gamma`",
    ),
    "ctkd": (
        "KD at a learned temperature, adversarial through gradient reversal, cosine curriculum",
        "Li et al., AAAI 2023",
        "`terms.kd.t_min`, `terms.kd.t_range`, `terms.kd.lambda_*`",
    ),
    "mlkd": (
        "multi-level KD: instance, batch and class alignment over 5 temperatures (weak view only)",
        "Jin et al., CVPR 2023",
        "`temperature`, `terms.mlkd.extra_temperatures`, `terms.mlkd.weight`",
    ),
    "mlkd_ls": (
        "MLKD with logit standardization, T 2, weight 9",
        "Sun et al., CVPR 2024",
        "as `mlkd`",
    ),
    "feature": (
        "FitNets hints: MSE of adapted student maps to teacher maps + CE",
        "Romero et al., ICLR 2015",
        "`terms.feature.weight`, `terms.feature.pairs`, `terms.feature.adapter`",
    ),
    "attention": (
        "attention transfer: squared distance of normalized spatial attention maps + CE",
        "Zagoruyko & Komodakis, ICLR 2017",
        "`terms.attention.weight`, `terms.attention.p`, `terms.attention.pairs`",
    ),
    "multi_teacher": (
        "KD from the averaged logits of ResNet-18 and a wide CNN teacher",
        "Hinton et al. 2015; You et al., KDD 2017",
        "`teachers.<name>` (teacher configs), `teacher_weights`, `temperature`, `alpha`",
    ),
    "self": (
        "no teacher: an auxiliary head learns from the student's own final logits and features",
        "Zhang et al., ICCV 2019",
        "`terms.self.heads`, `terms.self.deepest`, `terms.self.hint_weight`, `alpha`, `temperature`",
    ),
    "balanced": (
        "KD with per-sample weights by class (effective number of samples)",
        "Cui et al., CVPR 2019",
        "`class_balance`, `class_balance_beta`, `alpha`, `temperature`",
    ),
    "combo": ("(1-alpha)·CE + alpha·KD + feature + attention", "—", "`terms.<name>.weight`, `schedule.<name>`"),
}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict[str, list[dict]]) -> list[str]:
    """The Markdown rows: student mean ± std, baseline mean, paired gain mean ± std (in points)."""
    lines = [
        "| recipe | what it does | paper | config keys (`distill.`) | student acc | baseline acc | paired gain |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for recipe, rows in results.items():
        what, paper, keys = RECIPES[recipe]
        student, student_sd = mean_std([r["student"] for r in rows])
        baseline, baseline_sd = mean_std([r["baseline"] for r in rows])
        gain, gain_sd = mean_std([(r["student"] - r["baseline"]) * 100 for r in rows])
        mark = "*" if gain > gain_sd else ""
        lines.append(
            f"| `{recipe}` | {what} | {paper} | {keys} | {student:.4f} ± {student_sd:.4f} | "
            f"{baseline:.4f} ± {baseline_sd:.4f} | {gain:+.2f} ± {gain_sd:.2f} pts{mark} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", default="outputs/recipes_table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    results: dict[str, list[dict]] = {r: [] for r in args.recipes}
    start = time.perf_counter()
    for seed in args.seeds:
        for recipe in ["kd", *[r for r in args.recipes if r != "kd"]]:
            own = [o.split(":", 1)[1] for o in args.overrides if o.startswith(f"{recipe}:")]
            common = [o for o in args.overrides if o.split(":", 1)[0] not in RECIPES]
            overrides = [f"seed={seed}", f"distill={recipe}", "trainer.progress=false", *common, *own]
            run_dir = out / f"seed{seed}" / recipe
            t0 = time.perf_counter()
            metrics = runner.run(compose(overrides), run_dir, overrides)
            m = metrics.models
            row = {
                "seed": seed,
                "teacher": m["teacher"].test_acc if "teacher" in m else None,  # self-distillation has none
                "student": m["student"].test_acc,
                "baseline": m["baseline"].test_acc,
            }
            if recipe in results:
                results[recipe].append(row)
            teacher = "none" if row["teacher"] is None else f"{row['teacher']:.4f}"
            print(
                f"seed {seed} {recipe:14s} student {row['student']:.4f} baseline {row['baseline']:.4f} teacher "
                f"{teacher} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    (out / "results.json").write_text(json.dumps(results, indent=2))

    seeds = ",".join(map(str, args.seeds))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    teacher, teacher_sd = mean_std([r["teacher"] for r in results["kd" if "kd" in results else args.recipes[0]]])
    command = " ".join(["python scripts/recipes_table.py", *sys.argv[1:]])
    print()
    print("\n".join(table(results)))
    print(
        f"\nTest accuracy on the quickstart (359 test images), mean ± std over seeds {seeds}; paired gain: per seed "
        f"student minus scratch baseline (same init, schedule, seed), mean ± std, * where the gain exceeds its std; "
        f"teacher (ResNet-18) {teacher:.4f} ± {teacher_sd:.4f}. `{command}` "
        f"at commit {commit}, wall time {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
