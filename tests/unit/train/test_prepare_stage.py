"""Term.prepare, the stage before training: engine.fit runs it once before the first epoch, and a resumed stage
(whose checkpoint holds what it trained) does not run it again."""

import functools

import torch
from conftest import TINY, compose_config

from distill_runner.build import build_data, build_model
from distill_runner.distill.contract import Term
from distill_runner.distill.recipe import Recipe
from distill_runner.train import engine

PREPARED = []  # one entry per call of CountingPrepare.prepare


class CountingPrepare(Term):
    needs_teacher = False

    def prepare(self, student, batches, device):
        pairs = list(batches(0))
        assert all(teacher is None for _, teacher in pairs)  # no teacher in this stage
        PREPARED.append(sum(len(batch["image"]) for batch, _ in pairs))
        return [0.5]

    def forward(self, batch, student, teacher, state):
        return torch.zeros(())


def _stage(model, epochs):
    recipe = Recipe(
        {
            "ce": {"_target_": "distill_runner.distill.terms.CrossEntropy"},
            "count": {"_target_": f"{__name__}.CountingPrepare"},
        }
    )
    optimizer = functools.partial(torch.optim.SGD, lr=0.01)
    scheduler = lambda optimizer, epochs, steps_per_epoch: torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)
    return engine.Stage("student", model, recipe, epochs, optimizer, scheduler)


def test_prepare_runs_once_before_training_and_not_again_on_a_resume(tmp_path, caplog):
    cfg = compose_config(TINY)
    data = build_data(cfg)
    model = build_model(cfg.student, "student", data, 0)
    cpu, fp32 = torch.device("cpu"), engine.resolve_precision("32", torch.device("cpu"))
    PREPARED.clear()
    with caplog.at_level("INFO"):
        engine.fit(_stage(model, 1), data.train, data.val, cpu, fp32, checkpoint_dir=tmp_path, progress=False)
    seen = sum(len(b["image"]) for b in data.train)
    assert seen == PREPARED[0] and len(PREPARED) == 1  # one epoch of the training batches
    assert "terms.count: prepare epoch 1/1, loss 0.5" in caplog.text
    engine.fit(_stage(model, 2), data.train, data.val, cpu, fp32, checkpoint_dir=tmp_path, progress=False, resume=True)
    assert len(PREPARED) == 1
