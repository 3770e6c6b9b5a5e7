"""The CIFAR-100 benchmark table: the standard teacher-student pairs of the CRD and DKD papers, each run with the
chosen recipes under experiment=cifar100_bench, printed beside the published numbers (cifar100_published.json).

    python scripts/cifar100_table.py [--recipes kd dkd] [--pairs resnet32x4:resnet8x4 ...] [--teachers DIR]
                                     [--out outputs/cifar100_table] [override ...]
    python scripts/cifar100_table.py --smoke dataset.root=DIR dataset.download=false   # a few batches per pair
    python scripts/cifar100_table.py --check --recipes ofd catkd dataset.root=DIR  # bind every run, train nothing

A full run trains every teacher with the protocol (240 epochs, once: the runner's cache reuses it for every recipe
and pair), or loads RepDistiller's published teachers with --teachers DIR (its layout, as scripts/
fetch_pretrained_teachers.sh saves them: DIR/<teacher>_vanilla/ckpt_epoch_240.pth, used with teacher.epochs=0).
The scratch student (the baseline stage) is trained once per student. It needs a GPU (a full run's time is not
measured yet). Each recipe runs with the papers' settings (recipes in the JSON), the pair's own where the papers
set one (DKD's and SDD's beta, ReviewKD's weight), and the layers its term reads on the zoo models (the JSON's
layers and form): SDD each model's final map before pooling with its own classifier, SimKD the last stage's map
with the teacher's classifier. Our numbers: best-epoch test accuracy (what the papers report) and, in brackets,
last-epoch; the published number follows the slash, or '-' where none could be read in a named source (the
JSON's not_yet_sourced says which and why). Extra arguments are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from distill_runner import runner
from distill_runner.build import build_data, build_recipe, build_student
from distill_runner.config import compose
from distill_runner.io.storage import atomic_write_text
from distill_runner.models.features import INPUT
from distill_runner.spec import typed

PUBLISHED = Path(__file__).with_name("cifar100_published.json")
ZOO_PREFIX = "cifar_"  # the zoo's config options: conf/teacher/cifar_<published name>.yaml
RECIPES_DIR = Path(__file__).resolve().parents[1] / "conf" / "distill"
# --smoke: one epoch per stage on at most SMOKE_IMAGES images per split (a few batches of 64), short timings.
# Teacher outputs in float32: a deep teacher after two steps, in eval mode with BN statistics that have not
# followed the data yet, can give logits beyond float16's range (resnet110 did).
SMOKE_IMAGES = 128
SMOKE = ["teacher.epochs=1", "trainer.epochs=1", f"dataset.limit={SMOKE_IMAGES}", "eval.latency_budget_s=0.01",
         "eval.throughput_budget_s=0.01", f"dataset.eval_batch_size={SMOKE_IMAGES}",
         "cache.teacher_outputs_dtype=float32"]  # fmt: skip


def teacher_checkpoint(folder: Path | None, teacher: str) -> list[str]:
    """Overrides that load RepDistiller's published teacher, when --teachers holds it; none otherwise."""
    if folder is None:
        return []
    path = folder / f"{teacher}_vanilla" / "ckpt_epoch_240.pth"
    if not path.is_file():
        print(f"{teacher}: no {path}, training it with the protocol", file=sys.stderr)
        return []
    return [f"teacher.checkpoint={path.resolve()}", "teacher.epochs=0"]


def layer_pairs(spec: dict, teacher: str, student: str, published: dict) -> list[str]:
    """A feature recipe's layers for this teacher and student (the official codes' choice, by module path):
    ``hint``: the second stage output (FitNets, --hint_layer 2); ``all``: every stage output, zipped
    (feat[1:-1]); ``last``: the last (feat[-2]: SP, ICKD, SimKD); ``pooled``: the pooled vector (feat[-1]);
    ``all+pooled``: both (ReviewKD); ``final``: the map each classifier pools (its pooling's input, SDD).
    ``form``: the term's keys: ``pairs`` (a list), ``single`` (``student``/``teacher``), ``layer``
    (``student_layer``/...), ``heads`` (``single`` + both classifiers, ``student_head``/``teacher_head``) or
    ``teacher_head`` (``single`` + the teacher's classifier)."""
    if "layers" not in spec:
        return []
    stages, pooled = published["stage_outputs"]["models"], published["pooled_outputs"]["models"]
    t, s = stages[teacher], stages[student]
    chosen = {
        "hint": [(s[1], t[1])],
        "all": list(zip(s, t)),
        "last": [(s[-1], t[-1])],
        "pooled": [(pooled[student], pooled[teacher])],
        "all+pooled": [*zip(s, t), (pooled[student], pooled[teacher])],
        "final": [(f"{pooled[student]}{INPUT}", f"{pooled[teacher]}{INPUT}")],
    }[spec["layers"]]
    key, form = f"distill.terms.{spec['term']}", spec.get("form", "pairs")
    (s_layer, t_layer), heads = chosen[0], published["classifiers"]["models"]
    if form == "layer":
        return [f"{key}.student_layer={s_layer}", f"{key}.teacher_layer={t_layer}"]
    if form in ("single", "heads", "teacher_head"):  # quoted: a tap's ':' stays in the string
        single = [f"{key}.student='{s_layer}'", f"{key}.teacher='{t_layer}'"]
        student_head = [f"{key}.student_head={heads[student]}"] if form == "heads" else []
        teacher_head = [f"{key}.teacher_head={heads[teacher]}"] if form != "single" else []
        return [*single, *student_head, *teacher_head]
    items = ", ".join(f"{{student: {a}, teacher: {b}}}" for a, b in chosen)
    return [f"{key}.pairs=[{items}]"]


def stage_accuracy(results, stage: str, model: str) -> dict:
    """Best-epoch and last-epoch test accuracy of a stage; a teacher used as loaded has only its final one."""
    found = results.stages.get(stage)
    if found is not None and found.best_test_acc is not None:
        return {"best": found.best_test_acc, "last": found.last_test_acc, "best_epoch": found.best_test_epoch}
    final = results.models[model].test_acc
    return {"best": final, "last": final, "best_epoch": None}


def run_overrides(pair: dict, recipe: str, published: dict, args) -> list[str] | None:
    """The overrides of one recipe on one pair: the papers' settings, the pair's layers and own settings, a published
    teacher, smoke sizes, the command line's; None where the recipe does not apply (FSP, KDSVD: equal channels; OFD,
    AB: a student with no pre-ReLU stage outputs), said in one line."""
    teacher, student = pair["teacher"], pair["student"]
    spec = published["recipes"].get(recipe, {})
    if spec.get("equal_channels") and "different" in pair["table"]:
        print(f"{teacher} -> {student} {recipe}: skipped (it pairs maps of equal channels)", flush=True)
        return None
    if student in spec.get("skip_students", {}):  # OFD, AB on ShuffleV2: no pre-ReLU tap to read
        print(f"{teacher} -> {student} {recipe}: skipped ({spec['skip_students'][student]})", flush=True)
        return None
    settings = [*spec.get("overrides", []), *layer_pairs(spec, teacher, student, published)]
    return [
        f"teacher={ZOO_PREFIX}{teacher}", f"student={ZOO_PREFIX}{student}", f"distill={recipe}",
        "trainer.progress=false", *settings,
        *pair["overrides"].get(recipe, []), *teacher_checkpoint(args.teachers, teacher),
        *(SMOKE if args.smoke else []), *args.overrides,
    ]  # fmt: skip


def run_pair(pair: dict, recipes: list[str], published: dict, args, out: Path) -> dict:
    teacher, student = pair["teacher"], pair["student"]
    row = {"teacher": teacher, "student": student, "ours": {}, "published": pair["published"]}
    for recipe in recipes:
        overrides = run_overrides(pair, recipe, published, args)
        if overrides is None:
            continue
        start = time.perf_counter()
        cfg = compose(["experiment=cifar100_bench", *overrides])
        results = runner.run(cfg, out / f"{teacher}-{student}" / recipe, overrides)
        row["ours"]["teacher"] = stage_accuracy(results, "teacher", "teacher")
        row["ours"]["student"] = stage_accuracy(results, "baseline", "baseline")
        row["ours"][recipe] = stage_accuracy(results, "student", "student")
        print(f"{teacher} -> {student} {recipe}: {cell(row['ours'][recipe], None)} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
    return row


def check_pair(pair: dict, recipes: list[str], published: dict, args, data_sets: dict) -> list[str]:
    """Every recipe composed, validated and bound to this pair's (untrained) models, nothing trained: one line per
    recipe that would fail (a layer missing, a shape that cannot pair, a bad key), before a 240-epoch run meets it."""
    problems = []
    for recipe in recipes:
        overrides = run_overrides(pair, recipe, published, args)
        if overrides is None:
            continue
        where = f"{pair['teacher']} -> {pair['student']} {recipe}"
        try:
            spec = typed(compose(["experiment=cifar100_bench", *overrides]))
            key = repr(spec.dataset)  # one data set built for every run that shares its settings
            if key not in data_sets:
                data_sets[key] = build_data(spec)
            build_recipe(spec, data_sets[key], build_student(spec.student, data_sets[key], spec.seed))
        except Exception as err:  # every pair's problem is reported, not the first alone
            problems.append(f"{where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            print(problems[-1], flush=True)
        else:
            print(f"{where}: ok", flush=True)
    return problems


def cell(ours: dict | None, paper: float | None) -> str:
    """``best (last) / published`` in percent."""
    mine = f"{100 * ours['best']:.2f} ({100 * ours['last']:.2f})" if ours else "-"
    return f"{mine} / {paper:.2f}" if paper is not None else f"{mine} / -"


def table(rows: list[dict], recipes: list[str], published: dict) -> list[str]:
    columns = ["teacher", "student", *recipes]
    names = {"teacher": "teacher", "student": "student (scratch)"}
    lines = [
        "| teacher -> student | " + " | ".join(names.get(c, c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = []
        for c in columns:
            column = c if c in names else published["recipes"].get(c, {}).get("column")
            cells.append(cell(row["ours"].get(c), row["published"].get(column) if column else None))
        lines.append(f"| {row['teacher']} -> {row['student']} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["kd", "dkd"], help="recipes of conf/distill (those "
                        "with layers in cifar100_published.json get the pair's; others run as configured)")  # fmt: skip
    parser.add_argument("--pairs", nargs="+", default=None, help="teacher:student pairs (default: all published)")
    parser.add_argument("--teachers", type=Path, default=None, help="folder of RepDistiller's published teachers")
    parser.add_argument("--out", type=Path, default=Path("outputs/cifar100_table"))
    parser.add_argument("--smoke", action="store_true", help="a few batches per pair (checks the script, not numbers)")
    parser.add_argument("--check", action="store_true", help="train nothing: compose and bind every recipe on every "
                        "pair (untrained models) and list what would fail")  # fmt: skip
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    published = json.loads(PUBLISHED.read_text())
    unknown = [r for r in args.recipes if not (RECIPES_DIR / f"{r}.yaml").is_file()]
    pairs = published["pairs"]
    if args.pairs is not None:
        wanted = [tuple(p.split(":", 1)) for p in args.pairs]
        known = {(p["teacher"], p["student"]) for p in pairs}
        unknown += [":".join(w) for w in wanted if w not in known]
        pairs = [p for p in pairs if (p["teacher"], p["student"]) in wanted]
    if unknown:
        choices = ", ".join(f"{p['teacher']}:{p['student']}" for p in published["pairs"])
        parser.error(f"unknown recipe or pair {', '.join(unknown)}; recipes are conf/distill/*.yaml, pairs: {choices}")
    logging.basicConfig(level=logging.WARNING)
    if args.check:
        data_sets: dict = {}
        problems = [line for pair in pairs for line in check_pair(pair, args.recipes, published, args, data_sets)]
        print(f"\n{len(problems)} of the runs would fail" + "".join(f"\n  {line}" for line in problems))
        if problems:
            raise SystemExit(1)
        return []
    rows = [run_pair(pair, args.recipes, published, args, args.out) for pair in pairs]
    lines = table(rows, args.recipes, published)
    note = ("Top-1 test accuracy (%), ours: best epoch (last epoch) / published (best epoch; "
            "CRD: Tian et al. ICLR 2020 Tables 1-2, also SP, CC, VID, RKD, PKT, FSP, NST; ICKD: its README; "
            "DKD: Zhao et al. CVPR 2022 Tables 1-2; ReviewKD, OFD, SimKD, SDD: cifar100_published.json's "
            "sources; '-': none sourced, its not_yet_sourced says why)"
            + (". SMOKE RUN: a few batches, the numbers mean nothing." if args.smoke else "."))  # fmt: skip
    atomic_write_text(args.out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(args.out / "table.md", "\n".join([*lines, "", note]) + "\n")
    print("\n".join(["", *lines, "", note]))
    return rows


if __name__ == "__main__":
    main()
