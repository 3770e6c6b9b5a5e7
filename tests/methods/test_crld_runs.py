"""CRLD (and MLKD with its strong branch) end to end: the teacher's logits on both views replay exactly what the
online teacher gives, per batch (loss and student gradient), over two epochs whose strong views differ; one epoch
runs on digits with the quickstart pair and with a CIFAR-zoo pair, cached and online; bad settings are one line
before any training."""

import math

import pytest
import torch
from conftest import TINY, compose_config
from one_epoch import ZOO, one_epoch, saved_teacher, teacher_fixture

from distill_runner import runner
from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.distill.contract import strong_augment
from distill_runner.distill.signals import ReplayedTeacher, compute_teacher_outputs, online_signal, views_needed
from distill_runner.errors import ConfigError
from distill_runner.train import engine

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)
CRLD = ("distill=crld",)


def _step(recipe, model, batch, signal):
    model.zero_grad(set_to_none=True)
    student = {"logits": model(batch["image"]), "strong_logits": model(batch["image_strong"])}
    out = recipe(batch, student, signal(batch))
    sum(out.values()).backward()
    return {k: v.item() for k, v in out.items()}, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("crld", ["distill.terms.crld.tau_w=0.1"]), ("mlkd_strong", [])])
def test_replayed_equals_online_per_batch_on_both_views(name, extra):
    cfg = compose_config(TINY + [f"distill={name}", "dataset.limit=32", *extra])
    data = build_data(cfg)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    student = build_model(cfg.student, "student", data, cfg.seed).eval()  # eval: two equal forwards per batch
    recipe = build_recipe(cfg, data, student)
    data.train.set_strong(strong_augment(recipe))
    assert views_needed(data.train, 2) == 2  # the strong view differs per epoch even where the weak one would not
    online = online_signal([teacher])
    entry = compute_teacher_outputs(online, data.train, 2, CPU, FP32, torch.float32, False, recipe.summarize)
    assert entry["strong_logits"].shape == entry["logits"].shape == (2, data.train.num_samples, 10)
    assert not torch.equal(entry["strong_logits"][0], entry["strong_logits"][1])
    replayed = ReplayedTeacher(entry["logits"], entry["summaries"], entry["strong_logits"])
    for epoch in (0, 1):
        data.train.set_epoch(epoch)
        replayed.set_epoch(epoch)
        for batch in data.train:
            (a, grad_a), (b, grad_b) = (_step(recipe, student, batch, s) for s in (online, replayed))
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7) and a[name.removesuffix("_strong")] > 0, (a, b)
            torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)


quickstart = teacher_fixture([], CRLD)


def _one_epoch(overrides, tmp_path, caplog, term="crld"):
    with caplog.at_level("INFO"):
        _, record = one_epoch(compose_config(overrides), tmp_path)
    assert math.isfinite(record[f"loss/{term}"]) and record[f"loss/{term}"] > 0, record
    return caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("outputs", ["cached", "online"])
def test_one_epoch_with_the_quickstart_pair(outputs, quickstart, tmp_path, caplog):
    log = _one_epoch(quickstart + [f"distill.teacher_outputs={outputs}"], tmp_path, caplog)
    if outputs == "cached":  # both views' logits stored: "10 logits + 10 strong_logits" per image and view
        assert "teacher outputs: cached" in log and "strong_logits" in log
    else:
        assert "teacher outputs: online" in log


@pytest.mark.slow
def test_mlkd_with_its_strong_branch_runs_one_epoch(quickstart, tmp_path, caplog):
    log = _one_epoch(quickstart + ["distill=mlkd_strong"], tmp_path, caplog, term="mlkd")
    assert "teacher outputs: cached" in log and "strong_logits" in log


@pytest.mark.slow
def test_one_epoch_with_a_cifar_zoo_pair(tmp_path_factory, tmp_path, caplog):
    _one_epoch(saved_teacher(tmp_path_factory, ZOO, CRLD), tmp_path, caplog)


@pytest.mark.parametrize(
    "override,key",
    [("distill.terms.crld.tau_w=1.5", "distill.terms.crld.tau_w"),
     ("distill.terms.crld.strong.ops=-2", "distill.terms.crld.strong.ops"),
     ("distill.terms.crld.strong.cutout=3", "distill.terms.crld.strong.cutout")],
)  # fmt: skip
def test_bad_settings_are_one_line_before_training(override, key, quickstart, tmp_path):
    with pytest.raises(ConfigError) as err:
        runner.run(compose_config(quickstart + [override]), tmp_path)
    assert err.value.key == key and "\n" not in str(err.value), str(err.value)
    assert not list(tmp_path.rglob("*.pt"))
