"""What each recipe of conf/distill costs over training the student alone, on the quickstart.

Every recipe whose terms read the teacher's features or a second view (RKD, PKT, SP, CC, NST, FSP, KDSVD, ICKD, CRD,
VID, ReviewKD, OFD, AB, FT, SDD, CAT-KD, SimKD, SRD, CRLD, FitNets, attention, and any recipe added to conf/distill
later; a logit-only recipe when named) is composed as the runner composes it (``distill=<recipe>`` plus the
overrides its YAML names for the quickstart, scripts/recipe_confs.py), built with the runner's builders, and one
training epoch is timed (median of ``repeats``, after a warm-up) three ways with the runner's loop: the student with
cross-entropy alone (the same student: FSP's and KDSVD's are wider), the recipe with the teacher online, and the
recipe replaying what ``distill.teacher_outputs=cached`` stores for it (the teacher's logits, on the strong view too
where a term asks for one, and the recipe's teacher summaries, float16). Ratios are epoch times over the CE-only
epoch; trainable parts (embedding heads, regressors, ABFs, CRD's memory bank) run in both, as the runner runs them.
A term's stage before training (AB's initialisation, FT's paraphraser) is timed once, online, on its own
(``prepare_s``); the epochs are timed without it. ``dot`` times the DOT optimizer (``+trainer/optimizer=dot``) on
``distill=kd`` replayed, over SGD with the same momentum, learning rate and weight decay.

    python scripts/bench.py --only recipes [--recipes rkd crd dot]
"""

from __future__ import annotations

import copy
import time
from functools import partial

import torch
from bench import epoch_seconds
from recipe_confs import all_recipes, quickstart_overrides

from distill_runner import build as builders
from distill_runner.config import compose
from distill_runner.distill.contract import Term, strong_augment
from distill_runner.distill.signals import OnlineTeacher, ReplayedTeacher, compute_teacher_outputs
from distill_runner.train.optimizers import DOT


def build(recipe: str, overrides: list[str]):
    """The quickstart's data, untrained teacher and student, and the recipe bound to them (timing needs no
    trained teacher), as the runner builds them."""
    cfg = compose([f"distill={recipe}", *quickstart_overrides(recipe), *overrides])
    torch.manual_seed(cfg.seed)
    data = builders.build_data(cfg)
    teacher = builders.build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    student = builders.build_student(cfg.student, data, cfg.seed)
    return data, teacher, student, builders.build_recipe(cfg, data, student, teacher)


def replayed_signal(bound, online: OnlineTeacher, train, device, precision) -> tuple[ReplayedTeacher, float, float]:
    """What the cache would store for the recipe (one view: each timed epoch is a stage's epoch 0), its build
    seconds and its MB."""
    train.set_strong(strong_augment(bound))
    start = time.perf_counter()
    outputs = compute_teacher_outputs(online, train, 1, device, precision, torch.float16, False, bound.summarize)
    build_s = time.perf_counter() - start
    beyond_logits = [v for layers in outputs["summaries"].values() for v in layers.values()]
    beyond_logits += [outputs["strong_logits"]] if "strong_logits" in outputs else []
    mb = sum(v.numel() * v.element_size() for v in beyond_logits) / 2**20
    replayed = ReplayedTeacher(outputs["logits"], outputs["summaries"], outputs.get("strong_logits"))
    return replayed, build_s, mb


def prepare_seconds(bound, student, online, train, device) -> float | None:
    """The terms' stage before training (AB, FT), timed once online; afterwards the timed epochs skip it."""
    if all(type(term).prepare is Term.prepare for term in bound.terms.values()):
        return None
    start = time.perf_counter()
    bound.prepare(student.to(device), online.to(device), train, device)
    seconds = time.perf_counter() - start
    bound.prepare = lambda *args, **kwargs: None  # this instance only: the epochs below time training alone
    return seconds


def measure_recipe(built, recipe: str, device, precision, repeats: int, ce_seconds: dict) -> dict:
    data, teacher, student, bound = built
    train, n = data.train, data.train.num_samples
    width = str(student)  # one CE timing per student architecture
    if width not in ce_seconds:
        ce = builders.cross_entropy(data, student)
        ce_seconds[width] = epoch_seconds(student, ce, None, train, device, precision, repeats)
    ce_s = ce_seconds[width]
    online = OnlineTeacher(teacher, bound.teacher_layers)
    replayed, build_s, summaries_mb = replayed_signal(bound, online, train, device, precision)
    prepare_s = prepare_seconds(bound, copy.deepcopy(student), online, train, device)
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
        "summaries_mb": summaries_mb,
        "recipe_parameters": sum(p.numel() for p in bound.parameters()),
        "prepare_s": prepare_s,
    }
    print(
        f"{recipe:<14} {data.image_size:>3}px  CE {n / ce_s:7.0f}  online {n / online_s:7.0f}  replayed "
        f"{n / replayed_s:7.0f} images/s   online/CE {result['online_over_ce']:5.2f}x  replayed/CE "
        f"{result['replayed_over_ce']:5.2f}x  {result['summaries_mb']:.1f} MB of summaries  "
        f"{result['recipe_parameters']:,} recipe parameters"
        + ("" if prepare_s is None else f"  stage before training {prepare_s:.1f} s"),
        flush=True,
    )
    return result


def measure_dot(overrides: list[str], device, precision, repeats: int) -> dict:
    """One ``distill=kd`` epoch, replayed, with DOT over one with SGD at DOT's learning rate, momentum and weight
    decay (conf/trainer/optimizer/dot.yaml)."""
    data, teacher, student, bound = build("kd", overrides)
    replayed, _, _ = replayed_signal(bound, OnlineTeacher(teacher, bound.teacher_layers), data.train, device, precision)
    settings = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    sgd_s = epoch_seconds(
        student, bound, replayed, data.train, device, precision, repeats, partial(torch.optim.SGD, **settings)
    )
    dot_s = epoch_seconds(
        student, bound, replayed, data.train, device, precision, repeats, partial(DOT, delta=0.075, **settings)
    )
    n = data.train.num_samples
    print(f"{'kd + DOT':<14} {data.image_size:>3}px  SGD {n / sgd_s:7.0f}  DOT {n / dot_s:7.0f} images/s (replayed)  "
          f"DOT/SGD {dot_s / sgd_s:5.2f}x", flush=True)  # fmt: skip
    return {"images": n, "sgd_images_per_s": n / sgd_s, "dot_images_per_s": n / dot_s, "dot_over_sgd": dot_s / sgd_s}


def measure_recipes(recipes: list[str] | None, overrides: list[str], device, precision, repeats: int) -> dict:
    """The recipes of conf/distill whose terms read teacher features or a strong view (or those named in
    ``recipes``, ``dot`` for the optimizer) on the quickstart with ``overrides`` (quick mode: a smaller
    ``dataset.limit``): ``{recipe: {...over_ce...}}``, one CE timing per student architecture, all in one run. A
    term names its teacher layers once bound, so each recipe is built."""
    ce_seconds: dict[str, float] = {}
    results = {}
    for name in recipes or all_recipes():
        if name == "dot":
            results[name] = measure_dot(overrides, device, precision, repeats)
            continue
        built = build(name, overrides)
        bound = built[3]
        if bound.needs_teacher and (recipes or bound.teacher_layers or strong_augment(bound) is not None):
            results[name] = measure_recipe(built, name, device, precision, repeats, ce_seconds)
    return results
