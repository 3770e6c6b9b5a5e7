"""Run every loss recipe on the quickstart for seeds 0, 1, 2 and print the README's Markdown table.

    nice -n 10 python scripts/recipes_table.py [--seeds 0 1 2] [--out outputs/recipes_table] [override ...]

Each seed's ResNet-18 teacher, its replayable outputs and the scratch baseline (same student init,
same schedule) are trained once and reused by the other recipes through the runner's cache
(outputs/cache/), exactly as in a sweep. "gain" is the KD student's test accuracy minus the
baseline's, per seed, then averaged.
Extra arguments are Hydra overrides applied to every run (e.g. trainer.epochs=2 for a smoke test);
`<recipe>:<override>` applies to that recipe's runs only (multi_teacher:distill.teachers.cnn.epochs=1).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from distill_runner import runner

# recipe -> (what it does, paper, config keys); the order of the table
RECIPES = {
    "kd": ("soft teacher targets: (1-alpha)·CE + alpha·T²·KL", "Hinton et al. 2015", "`temperature`, `alpha`"),
    "feature": (
        "FitNets hints: MSE of adapted student maps to teacher maps (features.0→layer2, features.1→layer3) + CE",
        "Romero et al., ICLR 2015",
        "`terms.feature.weight`, `terms.feature.pairs`, `terms.feature.adapter`",
    ),
    "attention": (
        "attention transfer: squared distance of normalized spatial attention maps, same pairs, + CE",
        "Zagoruyko & Komodakis, ICLR 2017",
        "`terms.attention.weight` (1000), `terms.attention.p`, `terms.attention.pairs`",
    ),
    "multi_teacher": (
        "KD from the averaged logits of ResNet-18 and a wide CNN teacher",
        "Hinton et al. 2015; You et al., KDD 2017",
        "`teachers.<name>` (teacher configs), `teacher_weights`, `temperature`, `alpha`",
    ),
    "self": (
        "no teacher: an auxiliary head on features.0 learns from the student's own final logits and features",
        "Zhang et al., ICCV 2019",
        "`terms.self.heads`, `terms.self.deepest`, `terms.self.hint_weight`, `alpha`, `temperature`",
    ),
    "balanced": (
        "KD with per-sample weights by class (effective number of samples)",
        "Cui et al., CVPR 2019",
        "`class_balance`, `class_balance_beta`, `alpha`, `temperature`",
    ),
    "dkd": (
        "decoupled KD: alpha·TCKD + beta·NCKD, warm-up over 10% of training, + CE",
        "Zhao et al., CVPR 2022",
        "`alpha` (1), `beta` (8), `temperature`, `schedule.dkd`",
    ),
    "combo": ("(1-alpha)·CE + alpha·KD + 1·feature + 1000·attention", "—", "`terms.<name>.weight`, `schedule.<name>`"),
}


def compose_cfg(overrides: list[str]):
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
            metrics = runner.run(compose_cfg(overrides), run_dir, overrides)
            m = metrics.models
            row = {
                "seed": seed,
                "teacher": m["teacher"].test_acc,
                "student": m["student"].test_acc,
                "baseline": m["baseline"].test_acc,
            }
            if recipe in results:
                results[recipe].append(row)
            print(
                f"seed {seed} {recipe:14s} student {row['student']:.4f} baseline {row['baseline']:.4f} teacher "
                f"{row['teacher']:.4f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    (out / "results.json").write_text(json.dumps(results, indent=2))

    seeds = ",".join(map(str, args.seeds))
    lines = [
        "| recipe | what it does | paper | config keys (`distill.`) | student acc | baseline acc | gain |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for recipe, rows in results.items():
        what, paper, keys = RECIPES[recipe]
        mean = lambda k, rows=rows: statistics.mean(r[k] for r in rows)
        gain = statistics.mean(r["student"] - r["baseline"] for r in rows)
        lines.append(
            f"| `{recipe}` | {what} | {paper} | {keys} | {mean('student'):.4f} | {mean('baseline'):.4f} | "
            f"{gain * 100:+.2f} pts |"
        )
    teacher = statistics.mean(r["teacher"] for r in results["kd" if "kd" in results else args.recipes[0]])
    print()
    print("\n".join(lines))
    print(
        f"\nTest accuracy on the quickstart (359 test images), mean of seeds {seeds}; "
        f"teacher (ResNet-18) {teacher:.4f}. "
        f"Overrides: {' '.join(args.overrides) or '(none)'}. Wall time {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
