"""The relation recipes (RKD, PKT, SP, CC, NST, FSP, KDSVD, ICKD) replay their teacher side: the per-sample
teacher summaries stored once give, per batch, the loss of every term and every gradient (student, and the
recipe's embeddings/adapters) of the online teacher, over an augmented epoch, on the quickstart pair."""

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.distill.signals import ReplayedTeacher, compute_teacher_outputs, online_signal
from distill_runner.models.features import FeatureTap
from distill_runner.train import engine

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)
RELATION = ["rkd", "pkt", "sp", "cc", "nst", "fsp", "kdsvd", "ickd"]
EQUAL_WIDTHS = ["student.model.channels=[64,128]"]  # FSP and KDSVD pair equal channels (resnet18 layer1, layer2)


def overrides(name: str) -> list[str]:
    return TINY + [f"distill={name}"] + (EQUAL_WIDTHS if name in ("fsp", "kdsvd") else [])


def _step(recipe, tap, params, batch, signal):
    for p in params:
        p.grad = None
    out = recipe(batch, tap(batch["image"]), signal(batch))
    sum(out.values()).backward()
    return {k: v.item() for k, v in out.items()}, torch.cat([p.grad.flatten() for p in params if p.grad is not None])


@pytest.mark.slow
@pytest.mark.parametrize("name", RELATION)
def test_replayed_equals_online_per_batch(name):
    cfg = compose_config(overrides(name))
    data = build_data(cfg)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    student = build_model(cfg.student, "student", data, cfg.seed)
    recipe = build_recipe(cfg, data, student)
    online = online_signal([teacher], None, recipe.teacher_layers)
    entry = compute_teacher_outputs(online, data.train, 1, CPU, FP32, torch.float32, False, recipe.summarize)
    assert set(entry["summaries"]) == set(recipe.summary_spec()) == {name}
    replayed = ReplayedTeacher(entry["logits"], entry["summaries"])
    tap, params = FeatureTap(student, recipe.student_layers), [*student.parameters(), *recipe.parameters()]
    data.train.set_epoch(0)
    replayed.set_epoch(0)
    for batch in data.train:
        (a, grad_a), (b, grad_b) = (_step(recipe, tap, params, batch, s) for s in (online, replayed))
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), (a, b)
        assert grad_a.isfinite().all()
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
    tap.remove()


def test_replay_stores_per_sample_rows_for_the_batch_relations():
    """RKD's summary is the teacher's pooled row [N, 512] (not the batch's relation matrix); KDSVD's only its
    singular vectors and values [N, C + 1, k]."""
    for name, layer, shape in (("rkd", "avgpool", (512,)), ("kdsvd", "layer2", (129, 1))):
        cfg = compose_config(overrides(name))
        data = build_data(cfg)
        teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
        recipe = build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed))
        online = online_signal([teacher], None, recipe.teacher_layers)
        entry = compute_teacher_outputs(online, data.train, 1, CPU, FP32, torch.float16, False, recipe.summarize)
        assert entry["summaries"][name][layer].shape == (1, data.train.num_samples, *shape)
