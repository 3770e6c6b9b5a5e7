"""What each feature/relation recipe of conf/distill costs over training the student alone, on the quickstart.

Every recipe whose terms read the teacher's features (RKD, PKT, SP, CC, NST, FSP, KDSVD, ICKD, CRD, VID, ReviewKD,
FitNets, attention, and any recipe added to conf/distill later) is composed as the runner composes it
(``distill=<recipe>`` plus the overrides its YAML names for the quickstart, scripts/recipe_confs.py), built with the
runner's builders, and one training epoch is timed (median of ``repeats``, after a warm-up) three ways with the
runner's loop: the student with cross-entropy alone (the same student: FSP's and KDSVD's are wider), the recipe with
the teacher online, and the recipe replaying what ``distill.teacher_outputs=cached`` stores for it (the teacher's
logits and the recipe's teacher summaries, float16). Ratios are epoch times over the CE-only epoch; trainable parts
(embedding heads, regressors, ABFs, CRD's memory bank) run in both, as the runner runs them.

    python scripts/bench.py --only recipes [--recipes rkd crd]
"""

from __future__ import annotations

import time

import torch
from bench import epoch_seconds
from recipe_confs import all_recipes, quickstart_overrides

from distill_runner import build as builders
from distill_runner.config import compose
from distill_runner.distill.signals import OnlineTeacher, ReplayedTeacher, compute_teacher_outputs


def build(recipe: str, overrides: list[str]):
    """The quickstart's data, untrained teacher and student, and the recipe bound to them (timing needs no
    trained teacher), as the runner builds them."""
    cfg = compose([f"distill={recipe}", *quickstart_overrides(recipe), *overrides])
    torch.manual_seed(cfg.seed)
    data = builders.build_data(cfg)
    teacher = builders.build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    student = builders.build_student(cfg.student, data, cfg.seed)
    return data, teacher, student, builders.build_recipe(cfg, data, student, teacher)


def measure_recipe(built, recipe: str, device, precision, repeats: int, ce_seconds: dict) -> dict:
    data, teacher, student, bound = built
    train, n = data.train, data.train.num_samples
    width = str(student)  # one CE timing per student architecture
    if width not in ce_seconds:
        ce = builders.cross_entropy(data, student)
        ce_seconds[width] = epoch_seconds(student, ce, None, train, device, precision, repeats)
    ce_s = ce_seconds[width]
    online = OnlineTeacher(teacher, bound.teacher_layers)
    start = time.perf_counter()
    outputs = compute_teacher_outputs(online, train, 1, device, precision, torch.float16, False, bound.summarize)
    build_s = time.perf_counter() - start
    replayed = ReplayedTeacher(outputs["logits"], outputs["summaries"])
    stored = [v for layers in outputs["summaries"].values() for v in layers.values()]
    online_s = epoch_seconds(student, bound, online, train, device, precision, repeats)
    replayed_s = epoch_seconds(student, bound, replayed, train, device, precision, repeats)
    result = {
        "images": n,
        "ce_images_per_s": n / ce_s,
        "online_images_per_s": n / online_s,
        "replayed_images_per_s": n / replayed_s,
        "online_over_ce": online_s / ce_s,
        "replayed_over_ce": replayed_s / ce_s,
        "teacher_outputs_build_s": build_s,
        "summaries_mb": sum(v.numel() * v.element_size() for v in stored) / 2**20,
        "recipe_parameters": sum(p.numel() for p in bound.parameters()),
    }
    print(
        f"{recipe:<14} {data.image_size:>3}px  CE {n / ce_s:7.0f}  online {n / online_s:7.0f}  replayed "
        f"{n / replayed_s:7.0f} images/s   online/CE {result['online_over_ce']:5.2f}x  replayed/CE "
        f"{result['replayed_over_ce']:5.2f}x  {result['summaries_mb']:.1f} MB of summaries  "
        f"{result['recipe_parameters']:,} recipe parameters",
        flush=True,
    )
    return result


def measure_recipes(recipes: list[str] | None, overrides: list[str], device, precision, repeats: int) -> dict:
    """Every recipe of conf/distill whose terms read teacher features (or those of ``recipes``) on the quickstart
    with ``overrides`` (quick mode: a smaller ``dataset.limit``): ``{recipe: {...over_ce...}}``, one CE timing per
    student architecture, all in one run. A term names its teacher layers once bound, so each recipe is built."""
    ce_seconds: dict[str, float] = {}
    results = {}
    for name in recipes or all_recipes():
        built = build(name, overrides)
        if built[3].teacher_layers:  # logit-only and teacher-free recipes have no feature cost to show
            results[name] = measure_recipe(built, name, device, precision, repeats, ce_seconds)
    return results
