"""Every logit recipe replays its teacher's outputs by default, and replayed equals online per batch
(loss of every term, and the student's gradient), over several augmented epochs."""

from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.distill.signals import (
    OnlineTeacher,
    Replay,
    ReplayedTeacher,
    compute_teacher_logits,
    replay_blocker,
)
from distill_runner.train import engine

CONF = Path(__file__).resolve().parents[1] / "conf"
CPU = torch.device("cpu")
ONLINE_ONLY = {"feature", "attention", "combo", "multi_teacher", "self"}  # teacher features / several teachers
LOGIT_RECIPES = sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if p.stem not in ONLINE_ONLY)


@pytest.fixture(scope="module")
def teacher_and_data():
    cfg = compose_config(TINY + ["dataset.crop_padding=2"])
    data = build_data(cfg)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    return data, teacher


def test_the_online_only_list_is_exactly_the_recipes_that_need_features_or_several_teachers(teacher_and_data):
    data, _ = teacher_and_data
    for name in sorted(p.stem for p in (CONF / "distill").glob("*.yaml")):
        cfg = compose_config(TINY + [f"distill={name}"])
        recipe = build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed))
        needs_online = bool(recipe.teacher_layers) or bool(cfg.distill.get("teachers")) or not recipe.needs_teacher
        assert needs_online == (name in ONLINE_ONLY), name


@pytest.mark.parametrize("name", LOGIT_RECIPES)
def test_replayed_teacher_outputs_equal_online_per_batch(name, teacher_and_data):
    data, teacher = teacher_and_data
    cfg = compose_config(TINY + [f"distill={name}"])
    assert cfg.distill.get("teacher_outputs", "cached") == "cached"  # replayed by default (the runner's default)
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data, cfg.seed)
    recipe = build_recipe(cfg, data, student)
    assert replay_blocker(recipe, data.train, Replay("cached", 3, torch.float32, 1e9, False), data.num_classes) is None

    online = OnlineTeacher(teacher)
    fp32 = engine.resolve_precision("32", CPU)
    views = compute_teacher_logits(online, data.train, 3, CPU, fp32, torch.float32, progress=False)
    replayed = ReplayedTeacher(views)
    compared = 0
    for epoch in range(3):
        data.train.set_epoch(epoch)
        replayed.set_epoch(epoch)
        recipe.set_epoch(epoch, 3)
        for batch in data.train:
            losses = []
            for signal in (online, replayed):
                student.zero_grad()
                out = recipe(batch, {"logits": student(batch["image"])}, signal(batch))
                sum(out.values()).backward()
                grads = torch.cat([p.grad.flatten() for p in student.parameters()])
                losses.append(({k: v.item() for k, v in out.items()}, grads))
            (a, grad_a), (b, grad_b) = losses
            assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-5, abs=1e-6), (name, epoch)
            torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == 3 * len(data.train)
