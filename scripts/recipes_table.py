"""Run every loss recipe on the quickstart for seeds 0-4 and print the Markdown table of docs/benchmarks.md.

    nice -n 10 python scripts/recipes_table.py [--seeds 0 1 2 3 4] [--out outputs/recipes_table] [override ...]

Each seed's ResNet-18 teacher, its replayable outputs and the scratch baseline (same student init,
same schedule) are trained once and reused by the other recipes through the runner's cache
(outputs/cache/), exactly as in a sweep. Per recipe: the KD student's test accuracy (mean ± std over
seeds), and the paired gain over the scratch baseline: per seed student minus baseline, its mean ±
std. A gain larger than its std is marked with *. Extra arguments are Hydra overrides applied to
every run (e.g. trainer.epochs=2 for a smoke test); `<recipe>:<override>` applies to that recipe's
runs only (multi_teacher:distill.teachers.cnn.epochs=1).

Every YAML of conf/distill is a recipe here (default: all of them); one this file does not describe gets its YAML's
first comment line and its terms' keys. A recipe's YAML may name the overrides it needs on the quickstart in a
comment line `# quickstart overrides: ...` (scripts/recipe_confs.py), applied to its runs. --merge keeps the rows
of recipes an earlier run wrote to <out>/results.json, so a run of a few new recipes prints the whole table.
--combine DIR ... prints one table from runs made as separate processes (say seeds 0-2 and 3-4, each its --out).
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

from omegaconf import OmegaConf
from recipe_confs import RECIPES_DIR, all_recipes, quickstart_overrides, summary

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
    "rkd": (
        "RKD: smooth-L1 of the batch's normalized pairwise distances (25) and triplet angles (50) of the embeddings",
        "Park et al., CVPR 2019",
        "`terms.rkd.weight`, `terms.rkd.w_d`, `terms.rkd.w_a`, `terms.rkd.student`, `terms.rkd.teacher`",
    ),
    "pkt": (
        "PKT: KL between the batch's cosine-similarity distributions of the embeddings",
        "Passalis & Tefas, ECCV 2018",
        "`terms.pkt.weight`, `terms.pkt.student`, `terms.pkt.teacher`",
    ),
    "sp": (
        "similarity-preserving: distance of the row-normalized batch Gram matrices of a stage's maps",
        "Tung & Mori, ICCV 2019",
        "`terms.sp.weight`, `terms.sp.row_norm`, `terms.sp.student`, `terms.sp.teacher`",
    ),
    "cc": (
        "correlation congruence: correlation of consecutive samples' embedding differences (128-wide heads)",
        "Peng et al., ICCV 2019",
        "`terms.cc.weight`, `terms.cc.embed_dim`, `terms.cc.kernel`",
    ),
    "nst": (
        "neuron selectivity transfer: squared MMD, polynomial kernel, of the channels' spatial patterns",
        "Huang & Wang, 2017",
        "`terms.nst.weight`, `terms.nst.pairs`",
    ),
    "fsp": (
        "FSP matrices between consecutive maps (student of resnet18's widths, `tiny_cnn[64,128]`)",
        "Yim et al., CVPR 2017",
        "`terms.fsp.weight`, `terms.fsp.style`, `terms.fsp.pairs`",
    ),
    "kdsvd": (
        "KDSVD: RBF relations of consecutive maps' leading singular vectors (student `tiny_cnn[64,128]`)",
        "Lee et al., ECCV 2018",
        "`terms.kdsvd.weight`, `terms.kdsvd.k`, `terms.kdsvd.reshape`, `terms.kdsvd.pairs`",
    ),
    "ickd": (
        "inter-channel correlation: distance of the channel Gram matrices, student through 1x1 conv + BN",
        "Liu et al., ICCV 2021",
        "`terms.ickd.weight`, `terms.ickd.pairs`",
    ),
    "crd": (
        "contrastive representation distillation: NCE over a memory bank of every training image's embedding",
        "Tian et al., ICLR 2020",
        "`terms.crd.weight`, `terms.crd.feat_dim`, `terms.crd.nce_k`, `terms.crd.nce_t`, `terms.crd.nce_m`",
    ),
    "vid": (
        "variational information distillation: Gaussian likelihood of teacher maps under student regressors",
        "Ahn et al., CVPR 2019",
        "`terms.vid.weight`, `terms.vid.init_pred_var`, `terms.vid.pairs`",
    ),
    "reviewkd": (
        "knowledge review: ABF-fused student stages to the teacher's, hierarchical context loss, warm-up",
        "Chen et al., CVPR 2021",
        "`terms.reviewkd.weight`, `terms.reviewkd.pairs`, `schedule.reviewkd`",
    ),
    "ofd": (
        "overhaul of feature distillation: partial L2 of connected pre-ReLU student maps to the teacher's, clamped "
        "at its BatchNorm margins",
        "Heo et al., ICCV 2019",
        "`terms.ofd.weight`, `terms.ofd.pairs`",
    ),
    "ab": (
        "activation boundaries: 30 epochs initialising the student's layers on the teacher's pre-ReLU signs, then CE",
        "Heo et al., AAAI 2019",
        "`terms.ab.prepare_epochs`, `terms.ab.margin`, `terms.ab.weight`, `terms.ab.pairs`",
    ),
    "ft": (
        "factor transfer: a paraphraser trained 30 epochs on the teacher's last map, the student's translator "
        "matches its factors",
        "Kim et al., NeurIPS 2018",
        "`terms.ft.weight`, `terms.ft.k`, `terms.ft.prepare_epochs`, `terms.ft.pairs`",
    ),
    "sdd_kd": (
        "scale decoupled KD: KD on the logits of the final map's 1x1, 2x2 and 4x4 regions",
        "Wei et al., CVPR 2024",
        "`terms.sdd.weight`, `terms.sdd.scales`, `terms.sdd.student`, `terms.sdd.teacher`",
    ),
    "sdd_dkd": ("SDD over DKD, DKD's warm-up", "Wei et al., CVPR 2024", "as `sdd_kd`, `alpha`, `beta`"),
    "sdd_nkd": ("SDD over NKD, warm-up", "Wei et al., CVPR 2024", "as `sdd_kd`, `terms.sdd.gamma`"),
    "catkd": (
        "class attention transfer: MSE of pooled class activation maps (classifier weights at every position)",
        "Guo et al., CVPR 2023",
        "`terms.catkd.weight`, `terms.catkd.resolution`, `terms.catkd.normalize`",
    ),
    "simkd": (
        "SimKD: a projector maps the student's last map to the teacher's, read by the teacher's classifier (both ship)",
        "Chen et al., CVPR 2022",
        "`terms.simkd.factor`, `terms.simkd.student`, `terms.simkd.teacher`",
    ),
    "crld": (
        "cross-view consistency: KL within and across a weak and a strong view, gated by the teacher's confidence",
        "Zhang et al., ACM MM 2024",
        "`terms.crld.tau_w`, `terms.crld.tau_s`, `terms.crld.wv_weight`, `terms.crld.cv_weight`, `terms.crld.strong`",
    ),
    "srd": (
        "SRD: projected student feature vs the teacher's, batch-normalized, log-sum of 4th powers, + KD at T 1",
        "Miles & Mikolajczyk, AAAI 2024",
        "`terms.srd.feature_weight`, `terms.srd.logit_weight`, `terms.srd.exponent`, `terms.srd.projector`",
    ),
    "wsld": (
        "weighted soft labels: KD per sample weighted by the student's and teacher's CE on the label",
        "Zhou et al., ICLR 2021",
        "`temperature`, `terms.wsl.weight`",
    ),
    "mlkd_strong": (
        "MLKD with its strong-view branch (two augmentations per batch)",
        "Jin et al., CVPR 2023",
        "as `mlkd`, `terms.mlkd.strong_view`, `terms.mlkd.strong`",
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


def ordered_recipes() -> list[str]:
    """Every recipe of conf/distill: those described here in the table's order, then the others by name."""
    found = all_recipes()
    return [r for r in RECIPES if r in found] + [r for r in found if r not in RECIPES]


def describe(recipe: str) -> tuple[str, str, str]:
    """(what it does, paper, config keys) of a recipe; from its YAML where this file does not describe it."""
    if recipe in RECIPES:
        return RECIPES[recipe]
    terms = OmegaConf.load(RECIPES_DIR / f"{recipe}.yaml").get("terms", {})
    keys = [f"`terms.{t}.{k}`" for t, node in terms.items() if t != "ce" for k in node if k != "_target_"]
    return summary(recipe), f"conf/distill/{recipe}.yaml", ", ".join(keys)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict[str, list[dict]]) -> list[str]:
    """The Markdown rows: student mean ± std, baseline mean, paired gain mean ± std (in points)."""
    lines = [
        "| recipe | what it does | paper | config keys (`distill.`) | student acc | baseline acc | paired gain |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for recipe, rows in results.items():
        what, paper, keys = describe(recipe)
        student, student_sd = mean_std([r["student"] for r in rows])
        baseline, baseline_sd = mean_std([r["baseline"] for r in rows])
        gain, gain_sd = mean_std([(r["student"] - r["baseline"]) * 100 for r in rows])
        mark = "*" if gain > gain_sd else ""
        lines.append(
            f"| `{recipe}` | {what} | {paper} | {keys} | {student:.4f} ± {student_sd:.4f} | "
            f"{baseline:.4f} ± {baseline_sd:.4f} | {gain:+.2f} ± {gain_sd:.2f} pts{mark} |"
        )
    return lines


def save(out: Path, results: dict[str, list[dict]], earlier: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Write <out>/results.json: this run's rows, and an earlier run's for the recipes this one has none of."""
    merged = {r: results.get(r) or earlier[r] for r in ordered_recipes() if results.get(r) or earlier.get(r)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    return merged


def combine(folders: list[Path]) -> dict[str, list[dict]]:
    """The rows of several runs' results.json per recipe, in the table's order, by seed; a seed twice is an error."""
    rows: dict[str, list[dict]] = {}
    for folder in folders:
        for recipe, found in json.loads((folder / "results.json").read_text()).items():
            rows.setdefault(recipe, []).extend(found)
    for recipe, found in rows.items():
        seeds = [r["seed"] for r in found]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"{recipe}: seeds {sorted(seeds)} appear in more than one of {[str(f) for f in folders]}")
        found.sort(key=lambda r: r["seed"])
    return {r: rows[r] for r in ordered_recipes() if r in rows}


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--recipes", nargs="+", default=ordered_recipes(), choices=ordered_recipes())
    parser.add_argument("--out", default="outputs/recipes_table")
    parser.add_argument("--merge", action="store_true", help="keep the other recipes' rows of <out>/results.json")
    parser.add_argument(
        "--combine", nargs="+", metavar="DIR", help="train nothing: print the table of these runs' results.json "
        "together (seeds run as separate processes, each with its own --out)"
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.combine:
        results = combine([Path(d) for d in args.combine])
        print("\n".join(table(results)))
        return results
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    results: dict[str, list[dict]] = {r: [] for r in args.recipes}
    known = ordered_recipes()
    earlier = json.loads((out / "results.json").read_text()) if args.merge and (out / "results.json").is_file() else {}
    start = time.perf_counter()
    for seed in args.seeds:
        for recipe in ["kd", *[r for r in args.recipes if r != "kd"]]:
            own = [o.split(":", 1)[1] for o in args.overrides if o.startswith(f"{recipe}:")]
            common = [o for o in args.overrides if o.split(":", 1)[0] not in known]
            overrides = [f"seed={seed}", f"distill={recipe}", "trainer.progress=false", *common]
            overrides += [*quickstart_overrides(recipe), *own]
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
            save(out, results, earlier)  # after every run: a run cut short keeps its finished seeds
    results = save(out, results, earlier)

    seeds = ",".join(map(str, args.seeds))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    teacher, teacher_sd = mean_std([r["teacher"] for r in results["kd" if "kd" in results else args.recipes[0]]])
    command = " ".join(["python scripts/recipes_table.py", *(sys.argv[1:] if argv is None else argv)])
    print()
    print("\n".join(table(results)))
    print(
        f"\nTest accuracy on the quickstart (359 test images), mean ± std over seeds {seeds}; paired gain: per seed "
        f"student minus scratch baseline (same init, schedule, seed), mean ± std, * where the gain exceeds its std; "
        f"teacher (ResNet-18) {teacher:.4f} ± {teacher_sd:.4f}. `{command}` "
        f"at commit {commit}, wall time {time.perf_counter() - start:.0f} s."
    )
    return results


if __name__ == "__main__":
    main()
