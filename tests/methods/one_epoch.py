"""Shared by the methods' end-to-end tests: a pair's untrained teacher saved once per module, and one epoch of a
run with what every such run shows (one epoch recorded, a test accuracy that is a fraction)."""

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner import runner
from distill_runner.build import build_data, build_teacher
from distill_runner.train import engine

ZOO = ["teacher=cifar_resnet20", "student=cifar_resnet8"]  # a CIFAR-zoo pair: resnet20 -> resnet8


def saved_teacher(tmp_path_factory, extra: list[str], then: tuple[str, ...] = ()) -> list[str]:
    """Overrides for a seconds-long run of TINY + ``extra`` (+ ``then``): the untrained teacher, saved, used as
    loaded; no cache."""
    cfg = compose_config(TINY + extra)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_teacher(cfg.teacher, "teacher", build_data(cfg), cfg.seed).state_dict(), path)
    return [*TINY, *extra, "teacher.epochs=0", f"teacher.checkpoint={path}", "cache.enabled=false", *then]


def teacher_fixture(extra: list[str], then: tuple[str, ...] = ()):
    """A module-scoped fixture of :func:`saved_teacher`'s overrides; pytest names it after the module's variable
    it is assigned to (``quickstart = teacher_fixture([])``)."""

    @pytest.fixture(scope="module")
    def overrides(tmp_path_factory):
        return saved_teacher(tmp_path_factory, extra, then)

    return overrides


def one_epoch(cfg, tmp_path):
    """Runs ``cfg`` in ``tmp_path``: the student stage recorded one epoch and the student's test accuracy is in
    [0, 1]. Returns the run's metrics and the epoch's record."""
    metrics = runner.run(cfg, tmp_path)
    history = metrics.stages["student"].history
    assert len(history) == 1, history
    assert 0 <= metrics.models["student"].test_acc <= 1
    return metrics, history[0]


def fit_from_seed(stage, data, folder, resume=False):
    """``stage`` fitted on CPU in fp32 from seed 0, checkpointed in ``folder`` (resumed from it with ``resume``):
    a resumed stage and an uninterrupted one are compared this way."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    fp32 = engine.resolve_precision("32", cpu)
    return engine.fit(stage, data.train, data.val, cpu, fp32, checkpoint_dir=folder, progress=False, resume=resume)
